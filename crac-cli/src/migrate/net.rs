//! The service address that moves with a migrated service, and what CRIU's network lock
//! leaves behind: `ip` and `iptables` command lines, run in crac's own network namespace.
//!
//! A service address is a single IPv4 address (`/32`) on a device of the host (`lo` will do:
//! Linux answers for any of its addresses on any interface). The source releases it after the
//! dump, the destination takes it before the restore, so that CRIU can bind the service's
//! sockets to it again; how clients' packets find the new host (a route, a gratuitous ARP, a
//! load balancer) is the operator's hook.
//!
//! `crac migrate` dumps established connections with CRIU's iptables network lock: two DROP
//! rules per connection (marked `0xc114`, CRIU's `SOCCR_MARK`), which keep the kernel from
//! resetting the clients while the dumped sockets are gone and the address still here. CRIU
//! removes them only at a restore in the same network namespace; after a migration they are
//! removed here, once the address has left.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::error::{FailureKind, OpError};

/// CRIU's mark on the packets of its own repair sockets (`SOCCR_MARK`), in its lock's rules.
const CRIU_MARK: &str = "0xc114";

/// A service address, `IP/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAddress(pub Ipv4Addr);

impl ServiceAddress {
    /// Parses `IP` or `IP/32`.
    ///
    /// # Errors
    ///
    /// For anything else, saying what is expected.
    pub fn parse(text: &str) -> Result<ServiceAddress, String> {
        let ip = text.strip_suffix("/32").unwrap_or(text);
        ip.parse().map(ServiceAddress).map_err(|_| {
            format!("{text:?} is not a service address: expected one IPv4 address, as 10.0.0.5/32")
        })
    }

    /// [`ServiceAddress::parse`] of `text`, if there is one.
    ///
    /// # Errors
    ///
    /// A text that is not a service address, as bad input.
    pub fn parse_optional(text: Option<&str>) -> Result<Option<ServiceAddress>, OpError> {
        text.map(ServiceAddress::parse)
            .transpose()
            .map_err(|e| OpError::new(FailureKind::BadInput, e))
    }

    /// The address as `ip` takes it.
    pub fn cidr(&self) -> String {
        format!("{}/32", self.0)
    }
}

impl std::fmt::Display for ServiceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/32", self.0)
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e} (install iproute2 and iptables)"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The device that holds `address` here, if one does.
///
/// # Errors
///
/// When `ip` cannot be run.
pub fn device_of(address: ServiceAddress) -> Result<Option<String>, String> {
    // `2: lo    inet 10.0.0.5/32 scope global lo ...`
    let listing = run("ip", &["-o", "-4", "addr", "show"])?;
    Ok(listing.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let _index = words.next()?;
        let device = words.next()?;
        let _family = words.next()?;
        let cidr = words.next()?;
        (cidr.split('/').next()? == address.0.to_string()).then(|| device.to_owned())
    }))
}

/// Removes `address` from `device`.
///
/// # Errors
///
/// What `ip` said.
pub fn release(address: ServiceAddress, device: &str) -> Result<(), String> {
    run("ip", &["addr", "del", &address.cidr(), "dev", device]).map(drop)
}

/// Adds `address` to `device`.
///
/// # Errors
///
/// What `ip` said.
pub fn take(address: ServiceAddress, device: &str) -> Result<(), String> {
    run("ip", &["addr", "add", &address.cidr(), "dev", device]).map(drop)
}

/// Removes the rules of CRIU's iptables network lock that concern `address`, and returns how
/// many there were.
///
/// # Errors
///
/// What `iptables` said.
pub fn remove_lock_rules(address: ServiceAddress) -> Result<usize, String> {
    let mut removed = 0;
    let ip = address.cidr();
    for chain in ["INPUT", "OUTPUT"] {
        let rules = run("iptables", &["-w", "-t", "filter", "-S", chain])?;
        for rule in rules.lines().filter(|r| is_lock_rule(r, &ip)) {
            let Some(spec) = rule.strip_prefix("-A ") else {
                continue;
            };
            let mut args = vec!["-w", "-t", "filter", "-D"];
            args.extend(spec.split_whitespace());
            run("iptables", &args)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether `rule` (as `iptables -S` prints it) is one of CRIU's lock rules for a connection of
/// `ip` (`IP/32`).
fn is_lock_rule(rule: &str, ip: &str) -> bool {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words.contains(&CRIU_MARK)
        && words.ends_with(&["-j", "DROP"])
        && words
            .windows(2)
            .any(|w| matches!(w[0], "-s" | "-d") && w[1] == ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses_are_single_ipv4_addresses() {
        assert_eq!(
            ServiceAddress::parse("10.0.0.5/32").unwrap().cidr(),
            "10.0.0.5/32"
        );
        assert_eq!(
            ServiceAddress::parse("10.0.0.5").unwrap().to_string(),
            "10.0.0.5/32"
        );
        for bad in ["10.0.0.0/24", "host", "::1"] {
            assert!(ServiceAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_criu_lock_rules_for_the_address_are_picked() {
        let ip = "10.77.9.1/32";
        assert!(is_lock_rule(
            "-A INPUT -s 10.77.3.1/32 -d 10.77.9.1/32 -p tcp -m tcp --sport 40000 --dport 7070 -m mark ! --mark 0xc114 -j DROP",
            ip
        ));
        assert!(is_lock_rule(
            "-A OUTPUT -s 10.77.9.1/32 -d 10.77.3.1/32 -p tcp -m tcp --sport 7070 --dport 40000 -m mark ! --mark 0xc114 -j DROP",
            ip
        ));
        assert!(!is_lock_rule(
            "-A INPUT -s 10.1.1.1/32 -d 10.1.1.2/32 -p tcp -m mark ! --mark 0xc114 -j DROP",
            ip
        ));
        assert!(!is_lock_rule("-A INPUT -d 10.77.9.1/32 -j DROP", ip));
    }
}
