//! Looking at another process's sockets through a copy of its descriptor (`pidfd_open` and
//! `pidfd_getfd`, Linux >= 5.6, with the right to ptrace it): asking the socket itself is a
//! few system calls, where finding it in `/proc/PID/net/tcp` walks the kernel's whole TCP hash
//! table (about 4 ms per file on this kind of machine, whatever the number of sockets).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use crac_agent::fd_facts::Tcp;

use nix::sys::socket::{
    getpeername, getsockname, getsockopt, sockopt, SockType, SockaddrLike, SockaddrStorage,
};

/// A handle on a process, to copy its descriptors.
pub(crate) struct Pidfd(OwnedFd);

/// What a socket says about itself.
#[derive(Default)]
pub(crate) struct SocketFacts {
    /// A TCP connection (neither listening nor closed).
    pub(crate) tcp_peer: bool,
    /// A connected Unix stream or seqpacket socket (from an agent's facts: a socket that may
    /// be one, which the namespace's sock_diag dump then tells).
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

    /// What the process's descriptor `fd` says about itself, if it is a socket we may copy.
    pub(crate) fn socket(&self, fd: u32) -> Option<SocketFacts> {
        let fd = i32::try_from(fd).ok()?;
        // SAFETY: pidfd_getfd takes our pidfd, the other process's descriptor number and
        // flags, and returns a new descriptor of ours or -1; no memory is passed.
        let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.0.as_raw_fd(), fd, 0) };
        let copy = i32::try_from(copy).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
        let copy = unsafe { OwnedFd::from_raw_fd(copy) };
        let raw = copy.as_raw_fd();
        let address = |addr: nix::Result<SockaddrStorage>| {
            addr.map(|a| crac_agent::fd_policy::address(&a))
                .unwrap_or_default()
        };
        // As the process's agent would tell it (crac_agent::fd_facts), so the verdicts agree.
        match crac_agent::fd_facts::tcp(copy.as_fd()) {
            Some(Tcp::Connection) => {
                return Some(SocketFacts {
                    tcp_peer: true,
                    local: address(getsockname(raw)),
                    peer: address(getpeername(raw)),
                    ..SocketFacts::default()
                })
            }
            Some(Tcp::Listening(waiting @ 1..)) => {
                return Some(SocketFacts {
                    waiting,
                    local: address(getsockname(raw)),
                    ..SocketFacts::default()
                })
            }
            Some(_) => return Some(SocketFacts::default()),
            None => {}
        }
        let unix_connected = getpeername::<SockaddrStorage>(raw)
            .is_ok_and(|peer| peer.family() == Some(nix::sys::socket::AddressFamily::Unix))
            && matches!(
                getsockopt(&copy, sockopt::SockType),
                Ok(SockType::Stream | SockType::SeqPacket)
            );
        Some(SocketFacts {
            unix_connected,
            ..SocketFacts::default()
        })
    }
}
