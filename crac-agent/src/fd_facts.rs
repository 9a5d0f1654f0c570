//! What the preflight must know about this process's descriptors, found from inside it: an
//! `fstat` per descriptor, socket calls only for sockets, and the `/proc/self/fd` link only
//! for the few kinds whose path decides (terminals, anonymous inodes, deleted files).
//!
//! crac-action's preflight otherwise reads every `/proc/PID/fd` link from outside (a path
//! lookup and a formatted name each, ~3 µs) and copies each socket (`pidfd_getfd`) to ask it
//! about itself. An agent sends [`Facts`] with its before-checkpoint reply when asked
//! ([`Request::facts`](crate::protocol::Request::facts)); crac-action applies CRIU's options
//! and the operator's policy to them exactly as to what it reads itself, so the verdicts are
//! the same either way.

use std::fs;
use std::os::fd::{BorrowedFd, RawFd};

use nix::sys::socket::{
    getpeername, getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike,
    SockaddrStorage,
};
use nix::sys::stat::{fstat, FileStat, SFlag};

/// The descriptors of a process that can matter to CRIU, as the process sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    /// The inode of every socket: a Unix socket whose peer is among them is inside the tree.
    pub sockets: Vec<u64>,
    /// The connected sockets: TCP ones with a peer, and Unix ones with a peer (of any type).
    pub connected: Vec<Connected>,
    /// The descriptors whose `/proc/PID/fd` link decides (terminals and character devices
    /// other than the memory ones, anonymous inodes, deleted files), with the link.
    pub linked: Vec<Linked>,
}

/// A connected socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Connected {
    /// The descriptor.
    pub fd: RawFd,
    /// Its inode.
    pub inode: u64,
    /// `true` for TCP, `false` for a Unix socket.
    pub tcp: bool,
    /// Its address and its peer's, as people write them (TCP only; empty for Unix, and then
    /// left out of the wire).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub local: String,
    /// See `local`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
}

/// A descriptor and its `/proc/PID/fd` link.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Linked {
    /// The descriptor.
    pub fd: RawFd,
    /// The link: a path (`/dev/pts/3`, `/tmp/x (deleted)`) or `anon_inode:[io_uring]`.
    pub target: String,
    /// Its size, for a regular file (0 otherwise).
    pub size: u64,
}

/// The major number of the memory devices (`/dev/null`, `/dev/zero`, `/dev/urandom`, ...):
/// never a terminal, and the commonest character devices by far.
const MEM_MAJOR: u64 = 1;

/// Looks at every descriptor of this process but those in `skip` (the agent's own).
pub fn gather(skip: &[RawFd]) -> Facts {
    let mut facts = Facts::default();
    let anon_dev = anonymous_inode_device();
    for fd in open_descriptors() {
        if skip.contains(&fd) {
            continue;
        }
        // SAFETY: `fd` is a number that may be open (it is below the table's size, or was
        // listed); `fstat` of one that is not fails with EBADF, and the socket calls below
        // only run on a socket `fstat` found. The borrow is used for these calls alone and
        // nothing here closes it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let Ok(stat) = fstat(borrowed) else {
            continue;
        };
        let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFSOCK {
            facts.sockets.push(stat.st_ino);
            if let Some(connected) = connected(borrowed, stat.st_ino) {
                facts.connected.push(connected);
            }
        } else if needs_link(&stat, kind, anon_dev) {
            if let Ok(target) = fs::read_link(format!("/proc/self/fd/{fd}")) {
                facts.linked.push(Linked {
                    fd,
                    target: target.to_string_lossy().into_owned(),
                    size: if kind == SFlag::S_IFREG {
                        u64::try_from(stat.st_size).unwrap_or(0)
                    } else {
                        0
                    },
                });
            }
        }
    }
    facts
}

/// Whether a descriptor's path can decide anything: a character device that is not a memory
/// device (a terminal is one), an anonymous inode (io_uring, userfaultfd, perf, KVM; mode
/// without a type, or on the anonymous-inode file system), a regular file no link names
/// any more.
fn needs_link(stat: &FileStat, kind: SFlag, anon_dev: Option<u64>) -> bool {
    if kind == SFlag::S_IFCHR {
        return nix::sys::stat::major(stat.st_rdev) != MEM_MAJOR;
    }
    if kind.is_empty() || anon_dev == Some(stat.st_dev) {
        return true;
    }
    kind == SFlag::S_IFREG && stat.st_nlink == 0
}

/// The device of the anonymous-inode file system, from an eventfd made for the purpose.
fn anonymous_inode_device() -> Option<u64> {
    let probe =
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC).ok()?;
    fstat(&probe).ok().map(|s| s.st_dev)
}

/// This process's descriptor numbers: every number below the descriptor table's size is tried
/// when the table is small, since a failed `fstat` costs less than a directory entry of
/// /proc/self/fd; a big table is listed instead.
pub(crate) fn open_descriptors() -> Vec<RawFd> {
    const PROBE_UP_TO: RawFd = 16_384;
    match table_size() {
        Some(size) if size <= PROBE_UP_TO => (0..size).collect(),
        _ => fs::read_dir("/proc/self/fd")
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default(),
    }
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
/// POLLNVAL), which looks at no descriptor's file.
pub(crate) fn open_below(size: RawFd) -> Vec<RawFd> {
    // poll takes no more numbers than the soft limit on open files (EINVAL), and no
    // descriptor is above it.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into `limit`, a valid rlimit.
    let size = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        size.min(RawFd::try_from(limit.rlim_cur).unwrap_or(RawFd::MAX))
    } else {
        size
    };
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
        return Vec::new();
    }
    fds.iter()
        .filter(|p| p.revents & libc::POLLNVAL == 0)
        .map(|p| p.fd)
        .collect()
}

/// A socket's peer, as crac-action's copy of it would find it: none when `getpeername`
/// fails; TCP for an Internet stream socket; any Unix socket with a peer (its type is left to
/// the preflight, which has it from sock_diag: one system call less per socket).
fn connected(socket: BorrowedFd<'_>, inode: u64) -> Option<Connected> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let peer = getpeername::<SockaddrStorage>(raw).ok()?;
    match peer.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6)
            if getsockopt(&socket, sockopt::SockType).ok()? == SockType::Stream =>
        {
            let local = getsockname::<SockaddrStorage>(raw)
                .map(|a| crate::fd_policy::address(&a))
                .unwrap_or_default();
            Some(Connected {
                fd: raw,
                inode,
                tcp: true,
                local,
                peer: crate::fd_policy::address(&peer),
            })
        }
        Some(AddressFamily::Unix) => Some(Connected {
            fd: raw,
            inode,
            tcp: false,
            local: String::new(),
            peer: String::new(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn connections_terminal_like_devices_and_deleted_files_are_told_and_the_rest_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let null = fs::File::open("/dev/null").unwrap();
        let path = std::env::temp_dir().join(format!("crac-fd-facts-{}", std::process::id()));
        let deleted = fs::File::create(&path).unwrap();
        deleted.set_len(3).unwrap();
        fs::remove_file(&path).unwrap();

        let facts = gather(&[]);
        let tcp = facts
            .connected
            .iter()
            .find(|c| c.fd == client.as_raw_fd())
            .expect("the client is connected");
        assert!(tcp.tcp);
        assert_eq!(tcp.peer, listener.local_addr().unwrap().to_string());
        let unix = facts
            .connected
            .iter()
            .find(|c| c.fd == a.as_raw_fd())
            .expect("the pair is connected");
        assert!(!unix.tcp && unix.local.is_empty());
        assert!(
            !facts.connected.iter().any(|c| c.fd == listener.as_raw_fd()),
            "a listener has no peer"
        );
        assert!(facts.sockets.len() >= 3);
        assert!(!facts.linked.iter().any(|l| l.fd == null.as_raw_fd()));
        let ghost = facts
            .linked
            .iter()
            .find(|l| l.fd == deleted.as_raw_fd())
            .expect("a deleted file is linked");
        assert_eq!(ghost.target, format!("{} (deleted)", path.display()));
        assert_eq!(ghost.size, 3);

        // What the agent keeps for itself is not looked at.
        let without = gather(&[client.as_raw_fd()]);
        assert!(!without.connected.iter().any(|c| c.fd == client.as_raw_fd()));
    }
}
