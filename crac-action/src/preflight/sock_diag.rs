//! Who is at the other end of each Unix socket: the kernel's sock_diag netlink interface
//! (`NETLINK_SOCK_DIAG`, `unix_diag`), which `/proc/net/unix` does not tell. A sock_diag socket
//! answers for the network namespace it was made in ([`socket`]; another namespace's through
//! [`crate::netns::in_network_of`]).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{
    recv, sendto, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_NAME: u32 = 0x1;
/// `TCP_ESTABLISHED`: the state of a connected Unix socket.
const CONNECTED: u32 = 1;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const NLMSG_HDR: usize = 16;
const UNIX_DIAG_MSG: usize = 16;

/// A Unix socket as sock_diag tells it.
pub(crate) struct UnixSocket {
    /// Its peer's inode, 0 when it has none.
    pub(crate) peer: u64,
    /// Whether it is a stream or seqpacket socket (CRIU's "external socket" check is about
    /// those).
    pub(crate) stream: bool,
    /// Its name: empty when unnamed (or not asked for), `@name` when abstract.
    pub(crate) name: String,
}

/// A sock_diag socket of the current network namespace.
///
/// # Errors
///
/// When the kernel refuses a netlink socket.
pub(crate) fn socket() -> io::Result<OwnedFd> {
    Ok(nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?)
}

/// Every connected Unix socket of the network namespace of `sock` (from [`socket`]), by
/// inode, with its name if `names`.
///
/// Only connected sockets are asked for (a socket's peer is connected too), and names only
/// when a refusal will show them: the kernel then has less to write, and this less to read.
///
/// # Errors
///
/// When the kernel has no sock_diag for Unix sockets or refuses the request.
pub(crate) fn connected_unix(
    sock: BorrowedFd<'_>,
    names: bool,
) -> io::Result<HashMap<u64, UnixSocket>> {
    let mut request = Vec::with_capacity(NLMSG_HDR + 24);
    request.extend_from_slice(&((NLMSG_HDR + 24) as u32).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    request.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]); // family, protocol, pad
    request.extend_from_slice(&(1u32 << CONNECTED).to_ne_bytes()); // states
    request.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    let show = if names {
        UDIAG_SHOW_NAME | UDIAG_SHOW_PEER
    } else {
        UDIAG_SHOW_PEER
    };
    request.extend_from_slice(&show.to_ne_bytes());
    request.extend_from_slice(&[0u8; 8]); // cookie
    sendto(
        sock.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;

    let mut sockets = HashMap::new();
    // A dump's messages come in parts of at most 32 KiB.
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < NLMSG_HDR || at + len > n {
                return Err(io::Error::other("a malformed sock_diag reply"));
            }
            match kind {
                NLMSG_DONE => return Ok(sockets),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(
                        buf[at + NLMSG_HDR..at + NLMSG_HDR + 4]
                            .try_into()
                            .expect("4 bytes"),
                    );
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => {
                    if let Some((inode, socket)) = parse_socket(&buf[at + NLMSG_HDR..at + len]) {
                        sockets.insert(inode, socket);
                    }
                }
            }
            at += align(len);
        }
    }
}

/// One `unix_diag_msg` (family, type, state, pad, inode, cookie) and its attributes.
fn parse_socket(msg: &[u8]) -> Option<(u64, UnixSocket)> {
    if msg.len() < UNIX_DIAG_MSG {
        return None;
    }
    let kind = i32::from(msg[1]);
    let stream = kind == libc::SOCK_STREAM || kind == libc::SOCK_SEQPACKET;
    let inode = u64::from(u32_at(msg, 4));
    let (mut peer, mut name) = (0, String::new());
    let mut at = UNIX_DIAG_MSG;
    while at + 4 <= msg.len() {
        let len = usize::from(u16::from_ne_bytes([msg[at], msg[at + 1]]));
        let kind = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]);
        if len < 4 || at + len > msg.len() {
            break;
        }
        let data = &msg[at + 4..at + len];
        match kind {
            UNIX_DIAG_PEER if data.len() >= 4 => peer = u64::from(u32_at(data, 0)),
            UNIX_DIAG_NAME => {
                name = match data.split_first() {
                    Some((0, abstract_name)) => {
                        format!("@{}", String::from_utf8_lossy(abstract_name))
                    }
                    _ => String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_owned(),
                };
            }
            _ => {}
        }
        at += align(len);
    }
    Some((inode, UnixSocket { peer, stream, name }))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_socketpair_is_seen_with_its_peer() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let inode = |s: &std::os::unix::net::UnixStream| {
            use std::os::fd::AsRawFd;
            std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let sock = super::socket().unwrap();
        let connected = |names| super::connected_unix(sock.as_fd(), names).unwrap();
        let peers = connected(false);
        assert_eq!(peers.get(&inode(&a)).map(|p| p.peer), Some(inode(&b)));
        assert_eq!(peers.get(&inode(&b)).map(|p| p.peer), Some(inode(&a)));
        assert!(peers[&inode(&a)].stream);

        let dir = std::env::temp_dir().join(format!("crac-sock-diag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        let named = connected(true);
        assert_eq!(named[&inode(&server)].name, path.display().to_string());
        assert_eq!(named[&inode(&client)].peer, inode(&server));
        assert!(
            !named.contains_key(&inode_of_listener(&listener)),
            "a listener is not connected"
        );
        assert!(connected(false)[&inode(&server)].name.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn inode_of_listener(listener: &std::os::unix::net::UnixListener) -> u64 {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .unwrap()
            .ino()
    }
}
