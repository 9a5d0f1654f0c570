//! What the preflight must know about a process's descriptors ([`Facts`], sent by an agent
//! with its before-checkpoint reply when asked, [`crate::wire::BeforeCheckpoint::facts`]), and
//! how one socket is sorted ([`sort_socket`]), the same way by the agent, from inside its
//! process, and by crac-action, through a copy of a process's descriptor: so that the
//! verdicts are the same either way.
//!
//! The agent finds the facts with an `fstat` per descriptor, a `TCP_INFO` per socket (which
//! tells a TCP connection from anything else in one call), the addresses of each TCP
//! connection only when they will be shown or matched, and the `/proc/self/fd` link only for
//! the few kinds whose path decides (terminals, anonymous inodes, deleted files), and each
//! regular file's inode (which the preflight matches with the kernel's lock table). Which other
//! sockets are connected Unix ones, and to whom, crac-action finds in one sock_diag dump of
//! the namespace, by inode (readers from before [`crate::wire::Lean`] get them found by the
//! agent, a `getpeername` each, and every TCP connection's addresses).

use std::os::fd::{BorrowedFd, RawFd};

use nix::sys::socket::{getpeername, getsockname, SockaddrLike, SockaddrStorage};

/// The descriptors of a process that can matter to CRIU, as the process sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    /// The inode of every socket: a Unix socket whose peer is among them is inside the tree.
    pub sockets: Vec<u64>,
    /// The descriptor of each of `sockets`, in the same order (empty from agents before it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub socket_fds: Vec<RawFd>,
    /// The TCP connections (TCP sockets neither listening nor closed), and, when asked
    /// ([`Ask::unix_peers`]), the sockets with a Unix peer.
    pub connected: Vec<Connected>,
    /// The TCP listeners with connections waiting to be accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listening: Vec<Listening>,
    /// The descriptors whose `/proc/PID/fd` link decides (terminals and character devices
    /// other than the memory ones, anonymous inodes, deleted files), with the link.
    pub linked: Vec<Linked>,
    /// Each descriptor open on a regular file, with the file's inode (`[fd, inode]`): the
    /// preflight finds the file locks held through them without reading `/proc` for every
    /// descriptor. Absent from agents before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<(RawFd, u64)>>,
}

/// A TCP connection, or a socket with a Unix peer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Connected {
    /// The descriptor.
    pub fd: RawFd,
    /// Its inode.
    pub inode: u64,
    /// `true` for a TCP connection, `false` for a socket with a Unix peer.
    pub tcp: bool,
    /// Its address and its peer's, as people write them, for a TCP connection when they were
    /// asked for ([`Ask::tcp_addresses`]); empty otherwise (a connection still being made has
    /// no peer yet), and then left out of the wire.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub local: String,
    /// See `local`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
}

/// A TCP listener with connections waiting to be accepted: CRIU's "In-flight connection"
/// unless it is told to leave them out (`--skip-in-flight`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listening {
    /// The descriptor.
    pub fd: RawFd,
    /// How many connections wait.
    pub waiting: u32,
    /// Its address, as people write it.
    pub local: String,
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

/// What the facts' reader wants found beyond each descriptor's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    /// The addresses of each TCP connection.
    pub tcp_addresses: bool,
    /// Which sockets have a Unix peer (listed among `connected`, `tcp: false`): a reader that
    /// asks sock_diag by inode (crac-action since `socket_fds`) does not need them, one
    /// `getpeername` a socket.
    pub unix_peers: bool,
}

impl Ask {
    /// Everything: what readers that predate [`Lean`](crate::wire::Lean)
    /// expect.
    pub const ALL: Ask = Ask {
        tcp_addresses: true,
        unix_peers: true,
    };
}

/// One socket as the preflight sorts it, asked directly: by its own process (an agent's
/// facts) or through a copy of its descriptor (crac-action, for a process without an agent),
/// so that both sort alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sorted {
    /// A TCP connection (neither listening nor closed; one still being made included), with
    /// its address and its peer's if asked for ([`Ask::tcp_addresses`]).
    Connection {
        /// Its address, as people write it.
        local: String,
        /// Its peer's (empty while the connection is being made).
        peer: String,
    },
    /// A TCP listener with connections waiting to be accepted.
    Queued {
        /// How many wait.
        waiting: u32,
        /// Its address, as people write it.
        local: String,
    },
    /// A socket with a Unix peer, of any type (only if asked for, [`Ask::unix_peers`]): the
    /// preflight tells the types apart.
    UnixPeer,
    /// Anything else, which the socket itself gives no reason to refuse.
    Other,
}

/// Sorts `socket`: one `TCP_INFO` (only a TCP socket answers it; it gives the state and, for a
/// listener, its accept queue), then only the calls `ask` needs.
pub fn sort_socket(socket: BorrowedFd<'_>, ask: Ask) -> Sorted {
    match tcp_info(std::os::fd::AsRawFd::as_raw_fd(&socket)) {
        Some((state, _)) if is_connection(state) => {
            let (local, peer) = if ask.tcp_addresses {
                addresses(socket)
            } else {
                Default::default()
            };
            Sorted::Connection { local, peer }
        }
        Some((state, waiting @ 1..)) if is_listening(state) => Sorted::Queued {
            waiting,
            local: addresses(socket).0,
        },
        Some(_) => Sorted::Other,
        None if ask.unix_peers && has_unix_peer(socket) => Sorted::UnixPeer,
        None => Sorted::Other,
    }
}

/// Whether `socket` has a Unix peer (of any type: the preflight tells the types apart).
fn has_unix_peer(socket: BorrowedFd<'_>) -> bool {
    getpeername::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&socket))
        .is_ok_and(|peer| peer.family() == Some(nix::sys::socket::AddressFamily::Unix))
}

/// A socket's own address and its peer's, as people write them (empty where there is none).
fn addresses(socket: BorrowedFd<'_>) -> (String, String) {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let text = |addr: nix::Result<SockaddrStorage>| addr.map(|a| address(&a)).unwrap_or_default();
    (
        text(getsockname::<SockaddrStorage>(raw)),
        text(getpeername::<SockaddrStorage>(raw)),
    )
}

/// `TCP_CLOSE` and `TCP_LISTEN` in the kernel's TCP states (include/net/tcp_states.h): the
/// two states of a TCP socket that is not a connection.
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

/// What `TCP_INFO` tells of descriptor `fd`, if it is a TCP socket: its state (the first
/// byte of `struct tcp_info`) and `tcpi_unacked`, which for a listener is how many connections
/// wait to be accepted. Only a TCP socket answers `TCP_INFO`; any other descriptor fails the
/// call (not a socket, or no such option at that level), so one call both tells a TCP socket
/// and describes it.
pub fn tcp_info(fd: RawFd) -> Option<(u8, u32)> {
    // Up to and including tcpi_unacked (offset 24): the kernel copies no more than asked.
    let mut info = [0u8; 28];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a buffer on this stack, and
    // updates `len`. `fd` is only a number: if another thread closed it in the meantime the
    // call fails (EBADF), or it inspects whatever now has that number, which only changes
    // what this counts.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || len < 1 {
        return None;
    }
    let unacked = if len >= 28 {
        u32::from_ne_bytes([info[24], info[25], info[26], info[27]])
    } else {
        0
    };
    Some((info[0], unacked))
}

/// Whether a TCP socket in `state` is a connection: neither listening nor closed.
pub fn is_connection(state: u8) -> bool {
    state != TCP_CLOSE && state != TCP_LISTEN
}

/// Whether a TCP socket in `state` listens.
pub fn is_listening(state: u8) -> bool {
    state == TCP_LISTEN
}

/// A socket address as people write it: `127.0.0.1:8080`, `[::1]:80`, a path, `@abstract`,
/// or `(unnamed)`.
pub fn address(addr: &SockaddrStorage) -> String {
    if let Some(v4) = addr.as_sockaddr_in() {
        return std::net::SocketAddrV4::from(*v4).to_string();
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return std::net::SocketAddrV6::from(*v6).to_string();
    }
    match addr.as_unix_addr() {
        Some(unix) => match (unix.path(), unix.as_abstract()) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
            _ => "(unnamed)".to_owned(),
        },
        None => "(unnamed)".to_owned(),
    }
}
