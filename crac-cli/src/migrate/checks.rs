//! What the destination checks before the source stops anything: that it could run the
//! service it is offered. Each problem is one line with what to do; none means go.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::Path;

use super::net::{self, ServiceAddress};
use super::Offer;
use crate::criu::CriuCommand;
use crate::units::bytes;

/// Room kept besides the image on the destination's disk, and besides the service in its
/// memory.
const MARGIN: u64 = 16 << 20;

/// The problems that would make `offer` fail here, with the store at `store`.
pub fn problems(offer: &Offer, store: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    if offer.version != super::VERSION {
        problems.push(format!(
            "the source speaks migration protocol {}, this crac {}: run the same crac version at both ends",
            offer.version,
            super::VERSION
        ));
    }
    let post_copy = offer.strategy == super::POST_COPY;
    if !post_copy && offer.strategy != super::STOP_AND_COPY {
        problems.push(format!(
            "this crac cannot receive a {} migration (it runs {} and {})",
            offer.strategy,
            super::STOP_AND_COPY,
            super::POST_COPY
        ));
    }
    match crate::criu::find() {
        Err(e) => problems.push(e.message),
        Ok(criu) => {
            // Post-copy restores with userfaultfd, which a kernel may lack.
            let uffd = CriuCommand::check_feature(&criu.path, "uffd-noncoop")
                .command()
                .output()
                .is_ok_and(|out| out.status.success());
            if post_copy && !uffd {
                problems.push(
                    "this kernel cannot restore lazily (`criu check --feature uffd-noncoop` fails: no userfaultfd): migrate with --strategy stop-and-copy".to_owned(),
                );
            }
        }
    }
    let (_, arch) = crate::metadata::this_machine();
    if arch != offer.arch {
        problems.push(format!(
            "the service runs on {}, this machine is {arch}: CRIU restores on the same architecture only",
            offer.arch
        ));
    }
    let missing = crate::cpu::missing(&offer.cpu_features);
    if !missing.is_empty() {
        problems.push(format!(
            "this machine's CPU lacks {} the source's has, which the service may rely on: migrate it to a machine with them",
            missing.join(", ")
        ));
    }
    for &pid in &offer.pids {
        if let Some(holder) = crac_action::tree::ProcessId::of(pid) {
            let cmd = crate::process::read_cmdline(holder.pid).join(" ");
            problems.push(format!(
                "pid {pid} is in use here by `{cmd}`: the service needs its pids back; stop that process, or receive in a pid namespace of its own"
            ));
        }
    }
    let available_memory = mem_available();
    let needed = offer.resident_bytes + MARGIN;
    if let Some(available) = available_memory.filter(|&a| a < needed) {
        problems.push(format!(
            "this machine has {} of memory available, the service needs about {}: free memory or pick another destination",
            bytes(available),
            bytes(needed)
        ));
    }
    match free_disk(store) {
        Some(free) if free < needed => problems.push(format!(
            "the store {} has {} free, the image needs about {}: free space or receive into another store (--store)",
            store.display(),
            bytes(free),
            bytes(needed)
        )),
        _ => {}
    }
    let address = offer
        .address
        .as_deref()
        .and_then(|a| ServiceAddress::parse(a).ok());
    if let Some(address) = address {
        match net::device_of(address) {
            Ok(Some(device)) => problems.push(format!(
                "the service address {address} is already on {device} here: remove it, or this host would answer for the service before it runs"
            )),
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    for listening in &offer.listening {
        if let Some(problem) = bindable(listening, address) {
            problems.push(problem);
        }
    }
    problems
}

/// Whether the listening address `listening` (`IP:PORT`) could be bound here: the port free
/// on that address (the service address, which is not here yet, is tried with IP_FREEBIND).
fn bindable(listening: &str, address: Option<ServiceAddress>) -> Option<String> {
    let addr: SocketAddrV4 = listening.parse().ok()?;
    let moving = address.is_some_and(|a| a.0 == *addr.ip());
    let result = if moving || addr.ip().is_unspecified() || *addr.ip() == Ipv4Addr::LOCALHOST {
        bind_freely(addr)
    } else {
        TcpListener::bind(addr).map(drop)
    };
    match result {
        Ok(()) => None,
        Err(e) => Some(format!(
            "the service listens on {listening}, which cannot be bound here ({}): free the port, or give this host the address",
            crate::error::why(&e)
        )),
    }
}

/// Binds a TCP socket to `addr` with IP_FREEBIND (the address need not be here), and closes it.
fn bind_freely(addr: SocketAddrV4) -> std::io::Result<()> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(addr),
    )?;
    Ok(())
}

/// `MemAvailable` from `/proc/meminfo`, bytes.
fn mem_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Free bytes for an unprivileged writer on the file system of `path` (or of its nearest
/// ancestor that exists).
fn free_disk(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let stat = nix::sys::statvfs::statvfs(existing).ok()?;
    Some(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}
