//! `fs.pipe-max-size` for CRIU's page server: it moves pages through pipes of 4 MiB, which a
//! process without CAP_SYS_RESOURCE may not make larger than the sysctl allows (1 MiB by
//! default: `page-pipe: tee: 65536: Operation not permitted`, and the dump fails). Root on some
//! hosts lacks that capability (these test machines do), so a post-copy migration raises the
//! limit for its duration and puts it back ([`Raised`]), and says so.

use std::fs;

const SYSCTL: &str = "/proc/sys/fs/pipe-max-size";
/// What CRIU's page server needs.
const NEEDED: u64 = 4 << 20;
const CAP_SYS_RESOURCE: u32 = 24;

/// The sysctl raised for a migration: put back as it was when dropped.
#[derive(Debug)]
pub struct Raised {
    was: u64,
}

/// Raises `fs.pipe-max-size` to 4 MiB if it is lower and this process lacks CAP_SYS_RESOURCE;
/// `notice` is told. None when nothing needed raising.
///
/// # Errors
///
/// When the sysctl cannot be written: the page server would fail.
pub fn raise(notice: &mut dyn FnMut(&str)) -> Result<Option<Raised>, String> {
    let was: u64 = fs::read_to_string(SYSCTL)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(NEEDED);
    if was >= NEEDED || has_sys_resource() {
        return Ok(None);
    }
    fs::write(SYSCTL, NEEDED.to_string()).map_err(|e| {
        format!("CRIU's page server needs fs.pipe-max-size >= {NEEDED} and this crac lacks CAP_SYS_RESOURCE, but the sysctl cannot be raised: {e}; raise it (sysctl fs.pipe-max-size={NEEDED}) or run with CAP_SYS_RESOURCE")
    })?;
    notice(&format!(
        "raised fs.pipe-max-size from {was} to {NEEDED} for this migration (CRIU's page server needs it and this root lacks CAP_SYS_RESOURCE); it is put back afterwards"
    ));
    Ok(Some(Raised { was }))
}

impl Drop for Raised {
    fn drop(&mut self) {
        let _ = fs::write(SYSCTL, self.was.to_string());
    }
}

fn has_sys_resource() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}
