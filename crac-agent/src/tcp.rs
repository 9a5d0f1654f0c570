//! The process's established TCP connections, counted across a checkpoint.
//!
//! When the hooks have gone down, the agent notes which descriptors are connected TCP sockets:
//! those CRIU must dump with `--tcp-established`. After the restore it looks at the same
//! descriptors again (CRIU restores descriptors under their numbers): a connection restored
//! with `--tcp-close` is a socket that is no longer connected. The hooks get the counts in
//! [`crac_core::RestoreInfo::tcp`], whichever tool restored the process (crac, criu, runc,
//! podman), since the process looks at itself.

use std::fs;
use std::os::fd::RawFd;

use crac_core::TcpConnections;

/// `TCP_CLOSE` and `TCP_LISTEN` in the kernel's TCP states (include/net/tcp_states.h): the
/// two states of a TCP socket that is not a connection.
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

/// The TCP state of descriptor `fd`, if it is a TCP socket.
fn tcp_state(fd: RawFd) -> Option<u8> {
    let mut protocol: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `protocol`, a c_int that lives on
    // this stack, and updates `len`. `fd` is only a number: if another thread closed it in the
    // meantime the call fails (EBADF), or it inspects whatever now has that number, which
    // only changes what this counts.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut protocol as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || protocol != libc::IPPROTO_TCP {
        return None;
    }
    // The state is the first byte of struct tcp_info; the kernel copies no more than asked.
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: as above; `info` is a buffer of `len` bytes on this stack.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (rc == 0 && len >= 1).then_some(info[0])
}

/// Whether descriptor `fd` is a TCP connection: a TCP socket neither listening nor closed.
fn connected(fd: RawFd) -> bool {
    tcp_state(fd).is_some_and(|s| s != TCP_CLOSE && s != TCP_LISTEN)
}

/// The inode of the socket behind descriptor `fd`: one per connection, however many
/// descriptors share it.
fn inode(fd: RawFd) -> Option<u64> {
    // SAFETY: an all-zero `stat` is a valid value, which fstat overwrites.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `stat`, a struct on this stack; `fd` is only a number (see
    // tcp_state).
    (unsafe { libc::fstat(fd, &mut stat) } == 0).then_some(stat.st_ino)
}

/// One descriptor for each of this process's TCP connections.
pub(crate) fn connections() -> Vec<RawFd> {
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| connected(fd))
        .collect();
    fds.sort_unstable();
    let mut seen = std::collections::HashSet::new();
    fds.retain(|&fd| inode(fd).is_some_and(|ino| seen.insert(ino)));
    fds
}

/// How many of `fds` (from [`connections`]) are still connected, and how many are not.
pub(crate) fn fate(fds: &[RawFd]) -> TcpConnections {
    let kept = fds.iter().filter(|&&fd| connected(fd)).count();
    TcpConnections::new(kept, fds.len() - kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn connections_are_told_from_listeners_and_closed_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // A second descriptor of the server's socket is the same connection.
        let server_again = server.try_clone().unwrap();
        let found = connections();
        assert!(found.contains(&client.as_raw_fd()));
        // One of the two, the lower number (another test's thread may have freed a number
        // below the server's before the clone took it).
        let lower = server.as_raw_fd().min(server_again.as_raw_fd());
        let higher = server.as_raw_fd().max(server_again.as_raw_fd());
        assert!(found.contains(&lower) && !found.contains(&higher));
        assert!(!found.contains(&listener.as_raw_fd()));
        let both = [client.as_raw_fd(), server.as_raw_fd()];
        assert_eq!(fate(&both), TcpConnections::new(2, 0));
        // What --tcp-close leaves: the descriptor is a TCP socket that is not connected.
        // A fresh socket dup2'ed over the client's number stands in for it.
        let fresh = socket2_unconnected();
        // SAFETY: both are descriptors this test owns; dup2 replaces the client's socket.
        assert!(unsafe { libc::dup2(fresh, client.as_raw_fd()) } >= 0);
        // SAFETY: `fresh` is ours and no longer needed.
        unsafe { libc::close(fresh) };
        assert_eq!(fate(&both), TcpConnections::new(1, 1));
        let _ = server.shutdown(Shutdown::Both);
    }

    fn socket2_unconnected() -> RawFd {
        // SAFETY: socket takes three integers and returns a new descriptor or -1.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        fd
    }
}
