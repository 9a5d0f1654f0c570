//! Linux capabilities: which ones a dumped tree held, which ones this crac holds, and which a
//! restore would lack.
//!
//! CRIU gives every restored process the capabilities it had, with `capset` from inside the
//! restored tree, which may only keep or drop what CRIU itself holds: an image of a service
//! that held a capability CRIU lacks (made in a `--privileged` container, restored in one with
//! a few added capabilities) fails there ("Unable to restore capabilities"), and CRIU 4.2 then
//! hangs on a BUG in its restorer. The image records what its tree held
//! ([`Metadata::capabilities`](crate::metadata::Metadata::capabilities)), and a restore that
//! would lack one is refused up front ([`missing`]); so is one that cannot shrink the restored
//! processes' bounding sets ([`can_drop_to`]: CAP_SETPCAP, which a non-root user lacks unless
//! given it). The sets are read from /proc by
//! [`crac_action::procfs::capabilities`].

use crac_action::procfs::{self, CapabilitySets};

/// The capabilities' names by number (`linux/capability.h`).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// CAP_SETPCAP's number.
pub const SETPCAP: u32 = 8;
/// CAP_NET_ADMIN's number.
pub const NET_ADMIN: u32 = 12;
/// CAP_SYS_TIME's number.
pub const SYS_TIME: u32 = 25;
/// CAP_SYS_ADMIN's number.
pub const SYS_ADMIN: u32 = 21;
/// CAP_CHECKPOINT_RESTORE's number.
pub const CHECKPOINT_RESTORE: u32 = 40;

/// The name of capability `number` (`CAP_41` for one this table does not know).
pub fn name(number: u32) -> String {
    NAMES
        .get(number as usize)
        .map_or_else(|| format!("CAP_{number}"), |&name| name.to_owned())
}

/// The number of capability `name`, as [`name`] spells it.
fn number(name: &str) -> Option<u32> {
    if let Some(found) = NAMES.iter().position(|&n| n == name) {
        return u32::try_from(found).ok();
    }
    name.strip_prefix("CAP_")?.parse().ok().filter(|&n| n < 64)
}

/// The names of the capabilities in `set`, in number order.
pub fn names(set: u64) -> Vec<String> {
    (0..64).filter(|n| set & (1 << n) != 0).map(name).collect()
}

/// This process's capability sets, if /proc tells them.
pub fn own() -> Option<CapabilitySets> {
    procfs::capabilities("self")
}

/// Whether this process has capability `number` in its effective set (true when /proc does
/// not say: then CRIU decides).
pub fn has_effective(number: u32) -> bool {
    own().is_none_or(|sets| sets.effective & (1 << number) != 0)
}

/// What the processes `tree` held that a restore must give back: the union of their
/// permitted and inheritable sets (the effective and ambient ones are within those), by name.
pub fn held_by(tree: &[u32]) -> Vec<String> {
    let set = tree
        .iter()
        .filter_map(|pid| procfs::capabilities(&pid.to_string()))
        .fold(0, |set, caps| set | caps.permitted | caps.inheritable);
    names(set)
}

/// The capabilities in the bounding set of every process of `tree`, by name.
pub fn bounded_by(tree: &[u32]) -> Vec<String> {
    let set = tree
        .iter()
        .filter_map(|pid| procfs::capabilities(&pid.to_string()))
        .fold(u64::MAX, |set, caps| set & caps.bounding);
    if set == u64::MAX {
        return Vec::new();
    }
    names(set)
}

/// Whether this process can give restored processes a bounding set without the capabilities
/// `bounding` (an image's, by name) lacks: CRIU drops each with `PR_CAPBSET_DROP`, which
/// needs CAP_SETPCAP whatever the set holds. True when nothing need be dropped, or /proc
/// does not say.
pub fn can_drop_to(bounding: &[String]) -> bool {
    if bounding.is_empty() || has_effective(SETPCAP) {
        return true;
    }
    let Some(last) = procfs::cap_last_cap() else {
        return true;
    };
    let kept: u64 = bounding
        .iter()
        .filter_map(|name| number(name))
        .fold(0, |set, n| set | 1 << n);
    (0..=last.min(63)).all(|n| kept & (1 << n) != 0)
}

/// Which of the capabilities `recorded` (an image's, by name) this process cannot give back:
/// those outside its permitted set, which the restored processes' `capset` may not exceed.
/// Empty when /proc does not say.
pub fn missing(recorded: &[String]) -> Vec<String> {
    let Some(own) = own() else {
        return Vec::new();
    };
    recorded
        .iter()
        .filter(|name| number(name).is_none_or(|n| own.permitted & (1 << n) == 0))
        .cloned()
        .collect()
}

/// `capget`/`capset`'s header (`linux/capability.h`, version 3: 64-bit sets in two halves).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// One half of the sets `capget`/`capset` exchange.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Makes the capabilities a non-root crac was given as file capabilities (`setcap ...+ip` on
/// crac, as a container image can carry them, where Docker 20.10 gives a non-root user no
/// ambient ones) effective, and ambient, so that the CRIU it runs (a wrapper script and a
/// loader, which file capabilities on criu itself would not reach) inherits them. Nothing to
/// do for root (its children get every capability) or when every permitted capability is
/// ambient already (podman's `--cap-add` for a `--user`).
pub fn pass_on() -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() || nix::unistd::getuid().is_root() {
        return Ok(());
    }
    let Some(sets) = own() else {
        return Ok(());
    };
    let raise = sets.permitted & !sets.ambient;
    if raise == 0 {
        return Ok(());
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (version 3) through a valid, writable pointer and
    // reads the header, both live for the call.
    let got = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for (half, data) in data.iter_mut().enumerate() {
        let permitted = (sets.permitted >> (32 * half)) as u32;
        data.effective |= permitted;
        data.inheritable |= permitted;
    }
    // SAFETY: capset reads the header and two CapData (version 3) through valid pointers that
    // live for the call.
    let set = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for number in (0..64u32).filter(|n| raise & (1 << n) != 0) {
        // SAFETY: prctl with integer arguments only.
        let raised = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                libc::c_ulong::from(number),
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if raised != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_go_both_ways() {
        assert_eq!(name(SETPCAP), "CAP_SETPCAP");
        assert_eq!(name(SYS_ADMIN), "CAP_SYS_ADMIN");
        assert_eq!(name(CHECKPOINT_RESTORE), "CAP_CHECKPOINT_RESTORE");
        assert_eq!(name(41), "CAP_41");
        for n in 0..64 {
            assert_eq!(number(&name(n)), Some(n));
        }
        assert_eq!(number("CAP_NONSENSE"), None);
        assert_eq!(
            names(1 << 12 | 1 << 40),
            ["CAP_NET_ADMIN", "CAP_CHECKPOINT_RESTORE"]
        );
    }

    #[test]
    fn nothing_this_process_holds_is_missing_and_an_unknown_name_is() {
        let own = own().expect("/proc/self/status");
        assert!(missing(&names(own.permitted)).is_empty());
        assert_eq!(missing(&["CAP_NONSENSE".to_owned()]), ["CAP_NONSENSE"]);
        let lacking = !own.permitted & (1 << 41);
        assert_eq!(missing(&names(lacking)), names(lacking));
    }
}
