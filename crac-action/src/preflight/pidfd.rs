//! Looking at another process's sockets through a copy of its descriptor (`pidfd_open` and
//! `pidfd_getfd`, Linux >= 5.6, with the right to ptrace it): asking the socket itself is a
//! few system calls, where finding it in `/proc/PID/net/tcp` walks the kernel's whole TCP hash
//! table (about 4 ms per file on this kind of machine, whatever the number of sockets).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use crac_protocol::fd_facts::{self, Sorted};

/// A handle on a process, to copy its descriptors.
pub(crate) struct Pidfd(OwnedFd);

/// What a socket says about itself.
#[derive(Default)]
pub(crate) struct SocketFacts {
    /// A TCP connection (neither listening nor closed).
    pub(crate) tcp_peer: bool,
    /// A socket that may be a connected Unix stream or seqpacket one: it has a Unix peer, or
    /// (from an agent's facts) is no TCP connection. The namespace's sock_diag dump tells.
    pub(crate) unix_connected: bool,
    /// Its address, and its peer's when it has one.
    pub(crate) local: String,
    pub(crate) peer: String,
    /// For a TCP listener: how many connections wait to be accepted.
    pub(crate) waiting: u32,
}

impl Pidfd {
    /// A handle on `pid`, if the kernel and our rights allow.
    pub(crate) fn open(pid: u32) -> Option<Pidfd> {
        let pid = libc::pid_t::try_from(pid).ok()?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
        // memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
        Some(Pidfd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A copy of the process's descriptor `fd` (close-on-exec, as pidfd_getfd makes it), if
    /// our rights allow.
    pub(crate) fn copy(&self, fd: u32) -> Option<OwnedFd> {
        let fd = i32::try_from(fd).ok()?;
        // SAFETY: pidfd_getfd takes our pidfd, the other process's descriptor number and
        // flags, and returns a new descriptor of ours or -1; no memory is passed.
        let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.0.as_raw_fd(), fd, 0) };
        let copy = i32::try_from(copy).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
        Some(unsafe { OwnedFd::from_raw_fd(copy) })
    }

    /// The handle itself: readable once the process has ended.
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// What the process's descriptor `fd` says about itself, if it is a socket we may copy.
    pub(crate) fn socket(&self, fd: u32) -> Option<SocketFacts> {
        let copy = self.copy(fd)?;
        // As the process's agent would tell it, so the verdicts agree.
        Some(
            match fd_facts::sort_socket(copy.as_fd(), fd_facts::Ask::ALL) {
                Sorted::Connection { local, peer } => SocketFacts {
                    tcp_peer: true,
                    local,
                    peer,
                    ..SocketFacts::default()
                },
                Sorted::Queued { waiting, local } => SocketFacts {
                    waiting,
                    local,
                    ..SocketFacts::default()
                },
                Sorted::UnixPeer => SocketFacts {
                    unix_connected: true,
                    ..SocketFacts::default()
                },
                Sorted::Other => SocketFacts::default(),
            },
        )
    }
}
