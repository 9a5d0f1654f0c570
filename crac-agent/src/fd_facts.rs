//! Finding, from inside this process, what the preflight must know about its descriptors
//! ([`Facts`], the model in [`crac_protocol::fd_facts`]): an `fstat` per descriptor, a
//! `TCP_INFO` per socket (which tells a TCP connection from anything else in one call), the
//! addresses of each TCP connection only when they will be shown or matched, and the
//! `/proc/self/fd` link only for the few kinds whose path decides (terminals, anonymous
//! inodes, deleted files), and each regular file's inode, for the file locks. Which other sockets are connected Unix ones, and to whom,
//! crac-action finds in one sock_diag dump of the namespace, by inode (readers from before
//! [`Lean`](crac_protocol::wire::Lean) get them found here, a `getpeername` each, and every
//! TCP connection's addresses).
//!
//! crac-action's preflight otherwise reads every `/proc/PID/fd` link from outside (a path
//! lookup and a formatted name each, ~3 µs) and copies each socket (`pidfd_getfd`) to ask it
//! about itself. An agent sends [`Facts`] with its before-checkpoint reply when asked
//! ([`BeforeCheckpoint::facts`](crac_protocol::wire::BeforeCheckpoint::facts)); crac-action
//! applies CRIU's options and the operator's policy to them exactly as to what it reads
//! itself, so the verdicts are the same either way. The same pass finds the TCP connections
//! the agent counts across the checkpoint ([`crac_core::RestoreInfo::tcp`]), so the preflight
//! adds little to a before-checkpoint.

use std::os::fd::{BorrowedFd, RawFd};

use crac_protocol::fd_facts::{sort_socket, Ask, Connected, Facts, Linked, Listening, Sorted};
use nix::sys::stat::{fstat, FileStat, SFlag};

use crate::procfs;

/// The major number of the memory devices (`/dev/null`, `/dev/zero`, `/dev/urandom`, ...):
/// never a terminal, and the commonest character devices by far.
const MEM_MAJOR: u64 = 1;

/// One look at this process's descriptors once the hooks ran: its TCP connections, which
/// the agent counts again after the restore ([`crac_core::RestoreInfo::tcp`]), and, when the
/// preflight asks, its [`Facts`]. One pass finds both.
pub(crate) struct Look {
    /// One descriptor per TCP connection (see [`crate::tcp`]).
    pub(crate) connections: Vec<RawFd>,
    /// The preflight's facts, if asked for.
    pub(crate) facts: Option<Facts>,
}

/// Looks at this process's descriptors: only for its TCP connections, or (`facts`) at every
/// descriptor but those in `skip` (the agent's own) for the preflight too.
pub(crate) fn look(skip: &[RawFd], facts: Option<Ask>) -> Look {
    let Some(ask) = facts else {
        return Look {
            connections: crate::tcp::connections(),
            facts: None,
        };
    };
    let mut connections = crate::tcp::Connections::default();
    let facts = gather_noting(skip, ask, &mut connections);
    Look {
        connections: connections.into_fds(),
        facts: Some(facts),
    }
}

/// Looks at every descriptor of this process but those in `skip` (the agent's own), finding
/// what `ask` says.
pub(crate) fn gather(skip: &[RawFd], ask: Ask) -> Facts {
    gather_noting(skip, ask, &mut crate::tcp::Connections::default())
}

/// [`gather`], noting the TCP connections on the way.
fn gather_noting(skip: &[RawFd], ask: Ask, connections: &mut crate::tcp::Connections) -> Facts {
    let mut facts = Facts::default();
    let mut files = Vec::new();
    let anon_dev = anonymous_inode_device();
    for fd in procfs::every_descriptor() {
        if skip.contains(&fd) {
            continue;
        }
        // SAFETY: `fd` is a number that may be open (listed, or below the table's size);
        // `fstat` of a closed number fails with EBADF, and the socket calls below only run
        // on a socket `fstat` found. The borrow is used for these calls alone and nothing
        // here closes it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let Ok(stat) = fstat(borrowed) else {
            continue;
        };
        let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFREG {
            files.push((fd, stat.st_ino));
        }
        if kind == SFlag::S_IFSOCK {
            facts.sockets.push(stat.st_ino);
            facts.socket_fds.push(fd);
            match sort_socket(borrowed, ask) {
                Sorted::Connection { local, peer } => {
                    connections.add(fd, stat.st_ino);
                    facts.connected.push(Connected {
                        fd,
                        inode: stat.st_ino,
                        tcp: true,
                        local,
                        peer,
                    });
                }
                Sorted::Queued { waiting, local } => {
                    facts.listening.push(Listening { fd, waiting, local });
                }
                Sorted::UnixPeer => facts.connected.push(Connected {
                    fd,
                    inode: stat.st_ino,
                    tcp: false,
                    local: String::new(),
                    peer: String::new(),
                }),
                // Whether it is a connected Unix one is sock_diag's to tell.
                Sorted::Other => {}
            }
        } else if needs_link(&stat, kind, anon_dev) {
            if let Some(target) = procfs::link(fd) {
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
    facts.files = Some(files);
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

/// The device of the anonymous-inode file system, from an eventfd made for the purpose (once:
/// it is the same for every process until the machine restarts).
fn anonymous_inode_device() -> Option<u64> {
    static DEVICE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *DEVICE.get_or_init(|| {
        let probe =
            nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
                .ok()?;
        fstat(&probe).ok().map(|s| s.st_dev)
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn connections_terminal_like_devices_and_deleted_files_are_told_and_the_rest_counted() {
        let _turn = crate::descriptor_table_turn();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(listener.local_addr().unwrap()).unwrap();
        let null = fs::File::open("/dev/null").unwrap();
        let path = std::env::temp_dir().join(format!("crac-fd-facts-{}", std::process::id()));
        let deleted = fs::File::create(&path).unwrap();
        deleted.set_len(3).unwrap();
        fs::remove_file(&path).unwrap();

        let lean = Ask {
            tcp_addresses: true,
            unix_peers: false,
        };
        let facts = gather(&[], lean);
        let tcp = facts
            .connected
            .iter()
            .find(|c| c.fd == client.as_raw_fd())
            .expect("the client is a connection");
        assert!(tcp.tcp);
        assert_eq!(tcp.peer, listener.local_addr().unwrap().to_string());
        assert_eq!(tcp.local, client.local_addr().unwrap().to_string());
        // Only TCP connections: not a listener, a Unix pair or a UDP socket with a peer.
        for other in [listener.as_raw_fd(), a.as_raw_fd(), udp.as_raw_fd()] {
            assert!(!facts.connected.iter().any(|c| c.fd == other), "{other}");
        }
        // Every socket is told with its descriptor: which are connected Unix sockets is the
        // preflight's to find.
        assert_eq!(facts.sockets.len(), facts.socket_fds.len());
        for socket in [&listener.as_raw_fd(), &a.as_raw_fd(), &client.as_raw_fd()] {
            assert!(facts.socket_fds.contains(socket), "{socket}");
        }
        assert!(!facts.linked.iter().any(|l| l.fd == null.as_raw_fd()));
        let ghost = facts
            .linked
            .iter()
            .find(|l| l.fd == deleted.as_raw_fd())
            .expect("a deleted file is linked");
        assert_eq!(ghost.target, format!("{} (deleted)", path.display()));
        assert_eq!(ghost.size, 3);

        // Addresses only when asked for.
        let bare = Ask {
            tcp_addresses: false,
            unix_peers: false,
        };
        let facts = gather(&[], bare);
        let tcp = facts.connected.iter().find(|c| c.fd == client.as_raw_fd());
        assert!(tcp.is_some_and(|c| c.local.is_empty() && c.peer.is_empty()));

        // For a reader before `lean`: the Unix pair among `connected` too, addresses always.
        let facts = gather(&[], Ask::ALL);
        let unix = facts.connected.iter().find(|c| c.fd == a.as_raw_fd());
        assert!(unix.is_some_and(|c| !c.tcp), "{facts:?}");
        let tcp = facts.connected.iter().find(|c| c.fd == client.as_raw_fd());
        assert!(
            tcp.is_some_and(|c| c.tcp && !c.peer.is_empty()),
            "{facts:?}"
        );
        for other in [listener.as_raw_fd(), udp.as_raw_fd()] {
            assert!(!facts.connected.iter().any(|c| c.fd == other), "{other}");
        }

        // An O_PATH descriptor on a deleted file counts as much as any other.
        let opath_path = path.with_extension("opath");
        fs::write(&opath_path, b"x").unwrap();
        let opath = nix::fcntl::open(
            &opath_path,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        fs::remove_file(&opath_path).unwrap();
        let facts = gather(&[], bare);
        assert!(
            facts.linked.iter().any(|l| l.fd == opath.as_raw_fd()),
            "{facts:?}"
        );

        // What the agent keeps for itself is not looked at.
        let without = gather(&[client.as_raw_fd()], bare);
        assert!(!without.connected.iter().any(|c| c.fd == client.as_raw_fd()));
        assert!(!without.socket_fds.contains(&client.as_raw_fd()));
    }
}
