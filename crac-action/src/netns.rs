//! Network namespaces: running code in a process's network namespace and coming back, and
//! bringing up a restored namespace's loopback interface.
//!
//! setup-namespaces brings up the loopback of a container's restored namespace
//! ([`loopback_up`]), and the preflight asks each network namespace of a tree for its Unix
//! sockets (a sock_diag socket answers for the namespace it was made in: made through
//! `in_network_of`). Only the calling thread moves, and it always comes back.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;

use nix::sched::{setns, CloneFlags};

use crate::procfs;

/// Brings up the loopback interface of process `pid`'s network namespace, when that namespace
/// is not crac-action's own and its loopback is down; returns whether it did.
///
/// runc (1.1) has CRIU restore a container's network namespace empty ("runc doesn't manage
/// network devices": it passes CRIU `--empty-ns network`), so the loopback interface comes
/// back down, where the container had it up: a listener on 127.0.0.1 restored with the service
/// is there, and every client gets "Network is unreachable". podman's `--network none` is the
/// same. A namespace that the runtime kept (Kubernetes' pod namespace) is left as it is.
///
/// # Errors
///
/// When the namespace cannot be entered, or the interface not set up.
pub fn loopback_up(pid: u32) -> io::Result<bool> {
    if procfs::namespace(pid, "net") == procfs::thread_namespace("net") {
        return Ok(false);
    }
    in_network_of(pid, || interface_up(c"lo"))
}

/// Runs `f` in the network namespace of process `pid`, then comes back to this one. What `f`
/// makes there stays there: a socket keeps the namespace it was made in (a sock_diag socket
/// made there answers for that namespace). Only the calling thread moves.
///
/// # Errors
///
/// When the namespace cannot be entered (it needs CAP_SYS_ADMIN), or `f` fails.
pub(crate) fn in_network_of<T>(pid: u32, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let ours = procfs::open_thread_net_namespace()?;
    let theirs = procfs::open_net_namespace(pid)?;
    setns(&theirs, CloneFlags::CLONE_NEWNET)?;
    let _back = BackTo(ours);
    f()
}

/// Brings the calling thread back to the network namespace it holds, when dropped (after a
/// panic too).
struct BackTo(fs::File);

impl Drop for BackTo {
    fn drop(&mut self) {
        if let Err(err) = setns(&self.0, CloneFlags::CLONE_NEWNET) {
            // Going on in the service's namespace would have every later step look at the
            // wrong sockets: crac-action stops here, and CRIU with it (the agents roll back
            // when their lease ends).
            eprintln!("crac-action: cannot come back to its own network namespace: {err}");
            std::process::abort();
        }
    }
}

/// Sets interface `name` up in the current network namespace; false if it was up already.
fn interface_up(name: &std::ffi::CStr) -> io::Result<bool> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data (a name and a union of integers and addresses): all zeroes
    // is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.to_bytes()) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from `request` and writes the flags into it; the
    // pointer is to a live ifreq on this stack.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS just filled in the flags member of the union.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(false);
    }
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `request`, a live ifreq on this stack.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}
