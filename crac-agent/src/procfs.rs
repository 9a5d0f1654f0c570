//! What the agent reads about its own process, mostly from /proc/self: its descriptor table
//! (which numbers are open: one `poll`, checked against the size of /proc/self/fd, the
//! table's size from `FDSize` in /proc/self/status), each descriptor's file (`fstat`) and
//! link (/proc/self/fd/N), its start time (/proc/self/stat); and whether another pid runs.
//!
//! A leaf: the agent's other modules use it, and it uses none of them.

use std::fs;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

/// A descriptor's file: its device and inode.
pub(crate) type Identity = (u64, u64);

/// Every descriptor of this process, ascending, `O_PATH` ones included, which `poll` does not
/// see: one `poll`, and one `stat` of /proc/self/fd, whose size is how many descriptors are
/// open (Linux >= 6.2). When the two agree, that is all; otherwise every number below the
/// table's size is tried (a closed one costs a failed `fstat`, ~270 ns). A very big table is
/// listed from /proc/self/fd instead.
pub(crate) fn every_descriptor() -> Vec<RawFd> {
    let Some(size) = table_size().filter(|&size| size <= POLL_UP_TO) else {
        return listed_descriptors();
    };
    let open_count = fs::metadata("/proc/self/fd")
        .ok()
        .and_then(|m| usize::try_from(m.len()).ok())
        .filter(|&n| n > 0);
    match polled_below(size) {
        Some(open) if Some(open.len()) == open_count => open,
        _ => (0..size).collect(),
    }
}

/// Above this table size, descriptors are listed from /proc/self/fd instead of tried by
/// number.
const POLL_UP_TO: RawFd = 16_384;

/// This process's descriptors as /proc/self/fd lists them, ascending.
fn listed_descriptors() -> Vec<RawFd> {
    let mut listed: Vec<RawFd> = fs::read_dir("/proc/self/fd")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    listed.sort_unstable();
    listed
}

/// This process's open descriptors but `O_PATH` ones (never sockets), ascending: one `poll`
/// over every number below the descriptor table's size (~25 ns a number here, where a failed
/// system call costs ~270 ns); a very big table, or one bigger than the soft limit on open
/// files (which poll cannot take), is listed instead.
pub(crate) fn open_descriptors() -> Vec<RawFd> {
    table_size()
        .filter(|&size| size <= POLL_UP_TO)
        .and_then(polled_below)
        .unwrap_or_else(listed_descriptors)
}

/// The size of this process's descriptor table (`FDSize` in /proc/self/status): every
/// descriptor is below it.
pub(crate) fn table_size() -> Option<RawFd> {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("FDSize:"))
                .and_then(|n| n.trim().parse().ok())
        })
}

/// The open descriptor numbers below `size`, ascending: one poll (a closed number comes back
/// POLLNVAL), which looks at no descriptor's file; none if the poll fails. poll takes no more
/// numbers than the soft limit on open files (EINVAL), so a descriptor at or above the limit
/// (opened before the limit was lowered) is not seen.
pub(crate) fn open_below(size: RawFd) -> Vec<RawFd> {
    polled_below(size.min(soft_limit())).unwrap_or_default()
}

/// The soft limit on open files.
fn soft_limit() -> RawFd {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into `limit`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        RawFd::try_from(limit.rlim_cur).unwrap_or(RawFd::MAX)
    } else {
        RawFd::MAX
    }
}

/// [`open_below`] when `size` is within the soft limit on open files, or `None` (also when
/// the poll fails).
fn polled_below(size: RawFd) -> Option<Vec<RawFd>> {
    if size > soft_limit() {
        return None;
    }
    let mut fds: Vec<libc::pollfd> = (0..size)
        .map(|fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries for the call's duration;
    // poll with no events and a zero timeout only reports on each number, open or not.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if ready < 0 {
        return None;
    }
    Some(
        fds.iter()
            .filter(|p| p.revents & libc::POLLNVAL == 0)
            .map(|p| p.fd)
            .collect(),
    )
}

/// The device and inode of descriptor `fd`, if it is open.
pub(crate) fn identity(fd: RawFd) -> Option<Identity> {
    // SAFETY: `fstat` only reads the descriptor's file; if another thread closed `fd` since it
    // was listed, the call fails with EBADF (or describes whatever now has the number, which
    // the caller treats as another file). The borrow ends with the call.
    let stat = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).ok()?;
    Some((stat.st_dev, stat.st_ino))
}

/// What descriptor `fd` links to in /proc/self/fd (a path, `socket:[N]`, `anon_inode:[...]`).
pub(crate) fn link(fd: RawFd) -> Option<PathBuf> {
    fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

/// Every descriptor of this process with its link, as /proc/self/fd lists them (unsorted).
pub(crate) fn links() -> Vec<(RawFd, String)> {
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            Some((fd, target))
        })
        .collect()
}

/// This process's start time, field 22 of /proc/self/stat (clock ticks after boot).
pub(crate) fn start_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether a process `pid` exists (in this process's pid namespace).
pub(crate) fn runs(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_descriptor_above_a_lowered_limit_is_still_listed() {
        let _turn = crate::descriptor_table_turn();
        // It changes the process's limit on open files: in a process of its own, away from
        // the tests running beside it.
        const ALONE: &str = "CRAC_FD_FACTS_TEST_ALONE";
        if std::env::var_os(ALONE).is_none() {
            let me = "procfs::tests::a_descriptor_above_a_lowered_limit_is_still_listed";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([me, "--exact", "--test-threads=1"])
                .env(ALONE, "1")
                .output()
                .unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let set = |soft: libc::rlim_t, hard: libc::rlim_t| {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit reads `limit`, a valid rlimit on this stack.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        };
        let mut was = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the limits into `was`, a valid rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut was) }, 0);
        let top = was.rlim_max.min(4096);
        set(top, was.rlim_max);
        let null = fs::File::open("/dev/null").unwrap();
        let high = RawFd::try_from(top - 1).unwrap();
        // SAFETY: F_GETFD only asks about the number; it is not open in this fresh process.
        assert_eq!(unsafe { libc::fcntl(high, libc::F_GETFD) }, -1);
        // SAFETY: dup2 onto that free number; the duplicate is this test's, closed below.
        assert_eq!(unsafe { libc::dup2(null.as_raw_fd(), high) }, high);
        // Lowered below the table's size: poll could not take it.
        set(top / 2, was.rlim_max);
        let listed = open_descriptors();
        // SAFETY: `high` is the duplicate made above.
        unsafe { libc::close(high) };
        assert!(listed.contains(&high) && listed.contains(&null.as_raw_fd()));
        assert!(listed.windows(2).all(|w| w[0] < w[1]), "ascending");
    }
}
