//! The process's established TCP connections, counted across a checkpoint.
//!
//! When the hooks have gone down, the agent notes which descriptors are connected TCP sockets:
//! those CRIU must dump with `--tcp-established`. After the restore it looks at the same
//! descriptors again (CRIU restores descriptors under their numbers): a connection restored
//! with `--tcp-close` is a socket that is no longer connected. The hooks get the counts in
//! [`crac_core::RestoreInfo::tcp`], whichever tool restored the process (crac, criu, runc,
//! podman), since the process looks at itself.

use std::collections::HashSet;
use std::os::fd::RawFd;

use crac_core::TcpConnections;
use crac_protocol::fd_facts::{is_connection, tcp_info};

use crate::procfs;

/// Whether descriptor `fd` is a TCP connection.
fn connected(fd: RawFd) -> bool {
    tcp_info(fd).is_some_and(|(state, _)| is_connection(state))
}

/// Connections as a pass over the descriptors (in ascending order) finds them: the first
/// descriptor of each socket.
#[derive(Default)]
pub(crate) struct Connections {
    fds: Vec<RawFd>,
    sockets: HashSet<u64>,
}

impl Connections {
    /// Notes descriptor `fd`, a TCP connection on the socket with inode `inode`.
    pub(crate) fn add(&mut self, fd: RawFd, inode: u64) {
        if self.sockets.insert(inode) {
            self.fds.push(fd);
        }
    }

    /// One descriptor per connection, ascending.
    pub(crate) fn into_fds(self) -> Vec<RawFd> {
        self.fds
    }
}

/// One descriptor for each of this process's TCP connections: a `TCP_INFO` per descriptor,
/// and an `fstat` per connection. (When the preflight's facts are asked for, their pass finds
/// the connections instead: [`crate::fd_facts::look`].)
pub(crate) fn connections() -> Vec<RawFd> {
    let mut found = Connections::default();
    for fd in procfs::open_descriptors() {
        if connected(fd) {
            // The socket's inode: one per connection, however many descriptors share it.
            if let Some((_, inode)) = procfs::identity(fd) {
                found.add(fd, inode);
            }
        }
    }
    found.into_fds()
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
        let _turn = crate::descriptor_table_turn();
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
        // Other sockets with a peer are not TCP connections.
        let (unix, _unix_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(listener.local_addr().unwrap()).unwrap();
        let found = connections();
        assert!(!found.contains(&unix.as_raw_fd()) && !found.contains(&udp.as_raw_fd()));
        // The preflight's pass finds the same ones.
        let lean = crac_protocol::fd_facts::Ask {
            tcp_addresses: false,
            unix_peers: false,
        };
        let look = crate::fd_facts::look(&[], Some(lean));
        assert!(look.connections.contains(&client.as_raw_fd()));
        assert!(look.connections.contains(&lower) && !look.connections.contains(&higher));
        assert!(!look.connections.contains(&udp.as_raw_fd()));
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
