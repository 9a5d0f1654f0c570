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

/// Lets another socket bind the port `socket` listens on (SO_REUSEPORT), so that a restored copy
/// of its process can listen again while this copy still holds the queue: the two then form one
/// reuseport group. Set on the copy after the checkpoint, so the image keeps the service's own
/// setting (CRIU restores it once the new socket is bound).
///
/// # Errors
///
/// When the kernel refuses the option.
pub fn share_port(socket: &OwnedFd) -> io::Result<()> {
    nix::sys::socket::setsockopt(socket, sockopt::ReusePort, &true).map_err(io::Error::from)
}

/// Makes the kernel move the connections waiting in `socket`'s accept queue to another listener
/// of its reuseport group when `socket` is closed, instead of resetting them: a minimal
/// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` program (it returns SK_PASS, so the kernel picks the
/// listener by hash) is attached to the group, which needs no `net.ipv4.tcp_migrate_req` sysctl
/// (Linux >= 5.14; loading it needs CAP_BPF or root). The program stays with the group, where it
/// changes nothing: with SK_PASS and no choice made, the kernel selects as it would without it.
///
/// # Errors
///
/// When the program cannot be loaded (no CAP_BPF, an older kernel) or attached (`socket` is in
/// no reuseport group yet: [`share_port`] it and let the other listener bind first).
pub fn migrate_on_close(socket: &OwnedFd) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};

    // r0 = SK_PASS (1); exit.
    const PROGRAM: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
    const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;
    /// The leading fields of the kernel's `union bpf_attr` for BPF_PROG_LOAD (the kernel takes
    /// the ones not passed as zero).
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let license = c"GPL";
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
        insn_cnt: PROGRAM.len() as u32,
        insns: PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"crac_migrate\0\0\0\0",
        prog_ifindex: 0,
        expected_attach_type: BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
    };
    // SAFETY: bpf(2) reads `attr` (size given) and the program and license it points to, all
    // alive for the call; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("cannot load the reuseport migration program: {err} (it needs CAP_BPF and Linux >= 5.14)"),
        ));
    }
    // SAFETY: the descriptor was just returned by bpf(2) and is owned by no one else.
    let program = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let raw: libc::c_int = program.as_raw_fd();
    // SAFETY: setsockopt reads an int (the program's descriptor) of the size given.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_EBPF,
            (&raw as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("cannot attach the reuseport migration program: {err}"),
        ));
    }
    Ok(())
}
