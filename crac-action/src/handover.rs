//! A process seen from outside for `crac upgrade`: its listening sockets copied without its
//! help (`pidfd_getfd`, root or the right to ptrace it; Linux >= 5.6), its TCP connections
//! named, its end awaited and signalled through a handle that cannot reach a reused pid.
//!
//! A copied listening socket is the same socket: both processes accept from one queue, and a
//! connection waiting in it is taken by whichever accepts first, so none is refused while one
//! of them still listens.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt};

use crate::preflight::pidfd::Pidfd;
use crate::procfs;

/// A handle on a running process.
pub struct Process {
    pid: u32,
    handle: Pidfd,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process").field("pid", &self.pid).finish()
    }
}

/// A listening TCP socket copied from a process.
#[derive(Debug)]
pub struct Listener {
    /// Its descriptor number in the process.
    pub fd: u32,
    /// Its address, as people write it.
    pub local: String,
    /// The copy.
    pub socket: OwnedFd,
}

impl Process {
    /// A handle on `pid`.
    ///
    /// # Errors
    ///
    /// When there is no such process, or the kernel has no pidfd_open (Linux < 5.3).
    pub fn open(pid: u32) -> io::Result<Process> {
        let handle = Pidfd::open(pid).ok_or_else(io::Error::last_os_error)?;
        Ok(Process { pid, handle })
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Copies of the process's listening TCP sockets, in descriptor order.
    ///
    /// # Errors
    ///
    /// When its descriptors cannot be read, or a socket cannot be copied (not root, or
    /// ptrace not allowed over it).
    pub fn listeners(&self) -> io::Result<Vec<Listener>> {
        let links = procfs::fd_links(self.pid)
            .ok_or_else(|| io::Error::other(format!("cannot read /proc/{}/fd", self.pid)))?;
        let mut sockets: Vec<u32> = links
            .filter(|link| link.socket_inode().is_some())
            .map(|link| link.fd)
            .collect();
        sockets.sort_unstable();
        let mut found = Vec::new();
        for fd in sockets {
            let socket = self.handle.copy(fd).ok_or_else(|| {
                let err = io::Error::last_os_error();
                io::Error::new(
                    err.kind(),
                    format!("cannot copy descriptor {fd} of pid {}: {err} (pidfd_getfd needs root, or the right to ptrace it)", self.pid),
                )
            })?;
            let listening = getsockopt(&socket, sockopt::AcceptConn).unwrap_or(false);
            let tcp =
                matches!(
                    getsockopt(&socket, sockopt::SockType),
                    Ok(nix::sys::socket::SockType::Stream)
                ) && crac_protocol::fd_facts::tcp_info(std::os::fd::AsRawFd::as_raw_fd(&socket))
                    .is_some();
            if listening && tcp {
                let local = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                )
                .map(|a| a.to_string())
                .unwrap_or_default();
                found.push(Listener { fd, local, socket });
            }
        }
        Ok(found)
    }

    /// The process's TCP connections, `local -> peer` each (those it could be asked about).
    pub fn connections(&self) -> Vec<String> {
        let Some(links) = procfs::fd_links(self.pid) else {
            return Vec::new();
        };
        links
            .filter(|link| link.socket_inode().is_some())
            .filter_map(|link| self.handle.socket(link.fd))
            .filter(|facts| facts.tcp_peer)
            .map(|facts| format!("{} -> {}", facts.local, facts.peer))
            .collect()
    }

    /// Waits until the process has ended, at most `timeout`; whether it has.
    pub fn wait_end(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(self.handle.as_fd(), PollFlags::POLLIN)];
            match poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(n) if n > 0 => return true,
                Ok(_) => return false,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return false,
            }
            if left.is_zero() {
                return false;
            }
        }
    }

    /// Sends `signal` to the process (never to another that took its pid since).
    ///
    /// # Errors
    ///
    /// When the signal cannot be sent (the process has ended, or no right to).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes our pidfd, a signal number, a null siginfo and
        // flags; no memory is passed.
        let done = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(&self.handle.as_fd()),
                signal as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if done < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
