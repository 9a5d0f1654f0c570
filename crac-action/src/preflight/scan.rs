//! What CRIU refuses, descriptor kind by descriptor kind (the table in the
//! [preflight](super) documentation), and why each is refused, with what to do.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};

use crac_protocol::fd_policy::{self, Kind, Policy, Verdict};

use super::criu_options::CriuOptions;
use super::report::Problem;
use super::seen::{self, AgentFacts, NetTables, Seen};
use super::sock_diag;
use crate::procfs;

/// The problems in the tree of `pids`: what CRIU with `opts` will refuse, with `policy`
/// applied. Each process is looked at through its agent's `facts` if there are any, else
/// through `/proc`; the verdicts are the same.
pub fn scan(pids: &[u32], facts: &AgentFacts, opts: &CriuOptions, policy: &Policy) -> Vec<Problem> {
    let mut found = Vec::new();
    let mut tables: HashMap<u64, NetTables> = HashMap::new();
    let mut tree_sockets: HashSet<u64> = HashSet::new();
    let mut unix_fds: Vec<(u32, u32, u64, u64)> = Vec::new();
    let mut ptmx_in_tree = false;
    let mut ttys: Vec<(u32, u32, String)> = Vec::new();
    for &pid in pids {
        let netns = procfs::net_namespace_inode(pid);
        let seen = match facts.get(&pid) {
            Some(facts) => seen::from_facts(facts),
            None => seen::from_proc(pid, netns, &mut tables),
        };
        for (fd, seen) in seen {
            let target = match seen {
                Seen::Socket(inode, facts) => {
                    tree_sockets.insert(inode);
                    let Some(facts) = facts else {
                        continue;
                    };
                    let takes_connections = opts.tcp_established || opts.tcp_close;
                    if facts.tcp_peer && opts.known && !takes_connections {
                        found.push(Problem {
                            pid,
                            fd,
                            kind: Kind::Tcp,
                            what: format!("{} -> {}", facts.local, facts.peer),
                            why: "CRIU refuses a connected TCP socket without --tcp-established: \
                                  close it in a before_checkpoint hook, or dump with \
                                  --tcp-established",
                            owner: None,
                        });
                    } else if facts.waiting > 0 && opts.known && !opts.skip_in_flight {
                        let (n, s) = (facts.waiting, if facts.waiting == 1 { "" } else { "s" });
                        found.push(Problem {
                            pid,
                            fd,
                            kind: Kind::Tcp,
                            what: format!(
                                "{} (listening, {n} connection{s} not accepted)",
                                facts.local
                            ),
                            why: "CRIU refuses a listener with connections not accepted yet \
                                  (\"In-flight connection\"): dump with --skip-in-flight, which \
                                  leaves them out of the image (crac checkpoint passes it)",
                            owner: None,
                        });
                    } else if facts.unix_connected {
                        unix_fds.push((pid, fd, inode, netns));
                    }
                    continue;
                }
                Seen::Linked(target, size) => (target, size),
            };
            let (target, size) = target;
            if target == "/dev/ptmx" || target == "/dev/pts/ptmx" {
                ptmx_in_tree = true;
            } else if fd_policy::is_terminal(&target) {
                ttys.push((pid, fd, target));
            } else if let Some(kind) = fd_policy::unsupported(&target) {
                found.push(Problem {
                    pid,
                    fd,
                    kind: Kind::Unsupported,
                    what: kind.to_owned(),
                    why: "CRIU cannot dump this kind of descriptor: close it in a \
                          before_checkpoint hook and make a new one after",
                    owner: None,
                });
            } else if let Some(path) = target.strip_suffix(" (deleted)") {
                if opts.known && size > opts.ghost_limit {
                    found.push(Problem {
                        pid,
                        fd,
                        kind: Kind::Ghost,
                        what: format!("{path} ({size} bytes, deleted)"),
                        why: "CRIU copies an open deleted file into the image only up to \
                              --ghost-limit (1 MiB unless set): close it, or raise the limit",
                        owner: None,
                    });
                }
            }
        }
    }
    if opts.known && !opts.shell_job && !ptmx_in_tree {
        found.extend(ttys.into_iter().map(|(pid, fd, path)| Problem {
            pid,
            fd,
            kind: Kind::Tty,
            what: path,
            why: "CRIU dumps a terminal only with --shell-job: start the service with setsid \
                  and its stdio on files or /dev/null, or dump with --shell-job",
            owner: None,
        }));
    }
    if opts.known && !opts.ext_unix_sk && !unix_fds.is_empty() {
        found.extend(external_unix(unix_fds, &tree_sockets));
    }
    if opts.known {
        found.extend(super::locks::refused(pids, facts, opts.file_locks));
    }
    found.retain(|p| policy.verdict(p.kind, &p.what) != Some(Verdict::Ignore));
    found
}

/// The connected Unix sockets among `unix_fds` (pid, fd, inode, network namespace) whose
/// peer is outside the tree (`tree_sockets`): CRIU's "External socket is used".
///
/// A socket belongs to the network namespace it was made in, whoever holds it now, and a
/// sock_diag socket answers for its own namespace only: this namespace's and that of each
/// process holding a candidate are asked (one dump each), and the answers merged (socket
/// inodes are unique across namespaces).
fn external_unix(
    mut unix_fds: Vec<(u32, u32, u64, u64)>,
    tree_sockets: &HashSet<u64>,
) -> Vec<Problem> {
    // This thread's namespace (/proc/self is the thread group leader's).
    let own_netns = procfs::thread_net_namespace_inode();
    let mut asked = vec![own_netns];
    let mut diag: Vec<OwnedFd> = sock_diag::socket().into_iter().collect();
    for &(pid, _, _, netns) in &unix_fds {
        if !asked.contains(&netns) {
            asked.push(netns);
            diag.extend(crate::netns::in_network_of(pid, sock_diag::socket));
        }
    }
    let dump = |names: bool| {
        let mut sockets = HashMap::new();
        for sock in &diag {
            sockets.extend(sock_diag::connected_unix(sock.as_fd(), names).unwrap_or_default());
        }
        sockets
    };
    let peers = dump(false);
    // A datagram socket is not CRIU's concern here (the agent's facts leave its type to this
    // check).
    unix_fds.retain(|(_, _, inode, _)| {
        peers
            .get(inode)
            .is_some_and(|s| s.stream && s.peer != 0 && !tree_sockets.contains(&s.peer))
    });
    if unix_fds.is_empty() {
        return Vec::new();
    }
    // This process's own sockets (crac-action's connections to the tree) are read only now:
    // it lists this process's descriptors.
    let ours = procfs::own_socket_inodes();
    unix_fds.retain(|(_, _, inode, _)| !ours.contains(&peers[inode].peer));
    if unix_fds.is_empty() {
        return Vec::new();
    }
    // Names, for the refusal, in a second look.
    let named = dump(true);
    let agent_socket = format!("/{}", crac_protocol::location::SOCKET_NAME);
    let name_of = |inode: &u64| {
        named
            .get(inode)
            .map(|s| s.name.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or("(unnamed)")
    };
    unix_fds
        .into_iter()
        .filter_map(|(pid, fd, inode, _)| {
            // Without its name (that dump failed) it is still refused, unnamed.
            let socket = named.get(&inode).or_else(|| peers.get(&inode))?;
            // An agent's own connections (its socket's name) are the agent's to close: it
            // closes each within moments while a checkpoint is pending.
            if socket.name.ends_with(&agent_socket) {
                return None;
            }
            Some(Problem {
                pid,
                fd,
                kind: Kind::Unix,
                what: format!("{} -> {}", name_of(&inode), name_of(&socket.peer)),
                why: "CRIU refuses a Unix socket connected to a process outside the tree \
                      (\"External socket is used\"): close it in a before_checkpoint hook, or \
                      dump with --ext-unix-sk",
                owner: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crac_agent::facts_for_tests as fd_facts;
    use crac_protocol::fd_facts::Facts;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_process_with_an_established_connection_and_a_big_deleted_file_is_listed() {
        let _alone = scanning_this_process();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        // A listener with a connection it has not accepted (CRIU's "In-flight connection").
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _queued = std::net::TcpStream::connect(busy.local_addr().unwrap()).unwrap();
        let path = std::env::temp_dir().join(format!("crac-preflight-{}", std::process::id()));
        let file = fs::File::create(&path).unwrap();
        file.set_len(2 << 20).unwrap();
        fs::remove_file(&path).unwrap();

        let me = std::process::id();
        let problems = scan(
            &[me],
            &AgentFacts::new(),
            &CriuOptions::defaults(),
            &Policy::default(),
        );
        let tcp: Vec<_> = problems.iter().filter(|p| p.kind == Kind::Tcp).collect();
        // The connection both ways, the queued one's client end, and the busy listener.
        assert_eq!(tcp.len(), 4, "{problems:#?}");
        let port = listener.local_addr().unwrap().port();
        assert!(
            tcp.iter()
                .any(|p| p.what.ends_with(&format!(" -> 127.0.0.1:{port}"))),
            "{tcp:#?}"
        );
        let busy_port = busy.local_addr().unwrap().port();
        assert!(
            tcp.iter()
                .any(|p| p.fd == std::os::fd::AsRawFd::as_raw_fd(&busy) as u32
                    && p.what
                        == format!("127.0.0.1:{busy_port} (listening, 1 connection not accepted)")),
            "{tcp:#?}"
        );
        let ghost: Vec<_> = problems.iter().filter(|p| p.kind == Kind::Ghost).collect();
        assert_eq!(ghost.len(), 1, "{problems:#?}");
        assert!(ghost[0]
            .to_string()
            .contains(&format!("{} (2097152 bytes, deleted)", path.display())));

        // The process's own account of its descriptors (what its agent sends) comes to the
        // same verdicts, in the same order.
        // So does an agent's account for a reader before `lean` (Unix peers among
        // `connected`, no descriptors with `sockets`).
        let lean = fd_facts::Ask {
            tcp_addresses: true,
            unix_peers: false,
        };
        let told: AgentFacts = [(me, fd_facts::gather(&[], lean))].into();
        assert_eq!(
            scan(&[me], &told, &CriuOptions::defaults(), &Policy::default()),
            problems
        );
        let mut full = fd_facts::gather(&[], fd_facts::Ask::ALL);
        full.socket_fds.clear();
        let before: AgentFacts = [(me, full)].into();
        let told_before = scan(&[me], &before, &CriuOptions::defaults(), &Policy::default());
        // (It has no listeners' queues: the busy listener is the one thing it misses.)
        let expected: Vec<&Problem> = problems
            .iter()
            .filter(|p| !p.what.contains("listening"))
            .collect();
        assert_eq!(told_before.iter().collect::<Vec<_>>(), expected);

        // With the options that make CRIU accept them, nothing is listed.
        let accepting = CriuOptions::from_words(&[
            "--tcp-established".into(),
            "--skip-in-flight".into(),
            "--ghost-limit".into(),
            "4M".into(),
        ]);
        let closing = CriuOptions {
            tcp_established: false,
            tcp_close: true,
            ..accepting.clone()
        };
        for opts in [accepting, closing] {
            for told in [AgentFacts::new(), told.clone()] {
                let left = scan(&[me], &told, &opts, &Policy::default());
                assert!(
                    left.iter()
                        .all(|p| p.kind != Kind::Tcp && p.kind != Kind::Ghost),
                    "{left:#?}"
                );
            }
        }
        drop(file);
    }

    #[test]
    fn a_unix_socket_connected_outside_the_tree_is_listed_with_its_names() {
        let _alone = scanning_this_process();
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::process::{Command, Stdio};
        let dir = std::env::temp_dir().join(format!("crac-preflight-unix-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        // Each end in a process of its own (on its stdin); this one keeps none of them.
        let hold = |end: UnixStream| {
            Command::new("sleep")
                .arg("30")
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(end)))
                .spawn()
                .unwrap()
        };
        let mut children = [hold(client), hold(server), hold(a), hold(b)];
        drop(listener);
        let [client, server, a, b] = children.each_ref().map(std::process::Child::id);

        let refused = |pids: &[u32], opts: &CriuOptions| {
            scan(pids, &AgentFacts::new(), opts, &Policy::default())
                .into_iter()
                .filter(|p| p.kind == Kind::Unix)
                .map(|p| (p.pid, p.fd, p.what))
                .collect::<Vec<_>>()
        };
        let defaults = CriuOptions::defaults();
        assert_eq!(
            refused(&[client, a], &defaults),
            [
                (client, 0, format!("(unnamed) -> {}", path.display())),
                (a, 0, "(unnamed) -> (unnamed)".to_owned()),
            ]
        );
        assert_eq!(
            refused(&[server], &defaults),
            [(server, 0, format!("{} -> (unnamed)", path.display()))]
        );
        // What an agent in the client would tell comes to the same, and so does what agents
        // told before they gave every socket's descriptor (their connected Unix sockets
        // among `connected`).
        let inode = fs::metadata(format!("/proc/{client}/fd/0")).unwrap().ino();
        let told = |facts: Facts| -> AgentFacts { [(client, facts)].into() };
        let now = Facts {
            sockets: vec![inode],
            socket_fds: vec![0],
            ..Facts::default()
        };
        let before = Facts {
            sockets: vec![inode],
            connected: vec![fd_facts::Connected {
                fd: 0,
                inode,
                tcp: false,
                local: String::new(),
                peer: String::new(),
            }],
            ..Facts::default()
        };
        for facts in [now, before] {
            let problems = scan(&[client], &told(facts), &defaults, &Policy::default());
            assert_eq!(problems.len(), 1, "{problems:#?}");
            assert_eq!(
                (problems[0].fd, problems[0].what.as_str()),
                (0, format!("(unnamed) -> {}", path.display()).as_str())
            );
        }

        // Both ends in the tree, or CRIU told to take external sockets: nothing.
        assert!(refused(&[client, server, a, b], &defaults).is_empty());
        let mut external = defaults.clone();
        external.ext_unix_sk = true;
        assert!(refused(&[client, a], &external).is_empty());

        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Tests that scan this process, or hold sockets such a scan would list, take turns: each
    /// would see the other's.
    fn scanning_this_process() -> std::sync::MutexGuard<'static, ()> {
        static SCANS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SCANS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
