//! Preflight: every descriptor in the tree that CRIU, with the options it was given, will
//! refuse to dump, found after the hooks ran and before CRIU seizes the tree, and listed in
//! one refusal (pid, fd, kind, address or path, and what to do).
//!
//! CRIU's own refusals come one at a time, in its words ("Connected TCP socket, consider using
//! --tcp-established", "External socket is used"), after the service was quiesced and frozen.
//! A process with an agent tells its own descriptors with its before-checkpoint reply
//! ([`crac_protocol::fd_facts`]: an `fstat` each and a `TCP_INFO` per socket, from inside, in the
//! pass the agent makes anyway to count its TCP connections; about eight times cheaper than
//! from outside). The addresses of TCP connections are asked for only when they will be shown
//! or matched ([`needs_tcp_addresses`]). For any other process this looks at `/proc/PID/fd`,
//! and asks each socket about itself through a copy of its descriptor (`pidfd_getfd`); the
//! namespace's socket tables in `/proc/PID/net` are the fallback (they list every socket of
//! the namespace, and reading the TCP ones walks the kernel's whole hash table). The verdicts
//! are the same either way. Which sockets are connected Unix ones, who is at the other end and
//! the socket's type come from sock_diag dumps of connected Unix sockets: one for this network
//! namespace and one for each other namespace a process of the tree is in. Where the
//! process's agent can tell, each refused descriptor names the resource most likely holding it
//! (asked only once there is something to refuse). What it checks:
//!
//! | descriptor | CRIU refuses it | unless |
//! |---|---|---|
//! | a TCP connection (established, being made, closing) | "Connected TCP socket" | `--tcp-established` or `--tcp-close` |
//! | a TCP listener with connections not accepted yet | "In-flight connection" | `--skip-in-flight` |
//! | a Unix stream or seqpacket socket whose peer is outside the tree | "External socket is used" | `--ext-unix-sk` |
//! | a terminal (`/dev/pts/N`, `/dev/ttyN`) whose other side is outside the tree | the session's terminal | `--shell-job` |
//! | an io_uring, userfaultfd, perf event or KVM descriptor | "unsupported" | never |
//! | a deleted file (no link left) bigger than the ghost limit | "Can't dump ghost file" | a bigger `--ghost-limit` |
//!
//! CRIU's options come from its command line and the configuration files it reads. Under a
//! container runtime CRIU runs as `criu swrk` and gets its options over RPC, which cannot be
//! read from outside: then only the checks that no option changes run.
//!
//! A [`Policy`] (`CRAC_POLICY`, a file) ignores or refuses descriptors by kind and pattern;
//! its `close` rules are for a service's own agent ([`crac_protocol::fd_policy`]). An agent's
//! own connections are left to the agent, which closes them while a checkpoint is pending.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crac_protocol::fd_facts::{self, Facts};
use crac_protocol::fd_policy;
pub use crac_protocol::fd_policy::{Kind, Policy, PolicyError, Verdict};

use crate::pidfd::{Pidfd, SocketFacts};

/// Turns the preflight off (`CRAC_PREFLIGHT=off`): CRIU then finds what it finds.
pub const PREFLIGHT_ENV: &str = crac_protocol::env::PREFLIGHT;
/// A [`Policy`] file.
pub const POLICY_ENV: &str = crac_protocol::env::POLICY;

/// CRIU's default `--ghost-limit`: 1 MiB.
const DEFAULT_GHOST_LIMIT: u64 = 1 << 20;

/// The options of a CRIU run that decide what it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriuOptions {
    /// Whether the options could be read (not under `criu swrk`).
    pub known: bool,
    /// `--tcp-established`.
    pub tcp_established: bool,
    /// `--ext-unix-sk`.
    pub ext_unix_sk: bool,
    /// `--shell-job`.
    pub shell_job: bool,
    /// `--ghost-limit`, in bytes.
    pub ghost_limit: u64,
    /// `--tcp-close`: connections are not dumped but closed, so CRIU takes them too.
    pub tcp_close: bool,
    /// `--skip-in-flight`: connections waiting on a listener are left out of the image.
    pub skip_in_flight: bool,
}

impl CriuOptions {
    /// Options as CRIU accepts them when it is given none.
    pub fn defaults() -> CriuOptions {
        CriuOptions {
            known: true,
            tcp_established: false,
            ext_unix_sk: false,
            shell_job: false,
            ghost_limit: DEFAULT_GHOST_LIMIT,
            tcp_close: false,
            skip_in_flight: false,
        }
    }

    /// Options that could not be read: only the checks no option changes run.
    pub fn unknown() -> CriuOptions {
        CriuOptions {
            known: false,
            ..CriuOptions::defaults()
        }
    }

    /// The options of the CRIU process `pid`: the configuration files it read, then its
    /// command line. The default files (`/etc/criu/default.conf`, `~/.criu/default.conf`)
    /// count unless `--no-default-config` or `--config FILE` replaced them; `CRIU_CONFIG_FILE`
    /// counts either way.
    pub fn of_process(pid: u32) -> CriuOptions {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return CriuOptions::unknown();
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "swrk") {
            return CriuOptions::unknown();
        }
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let var = |name: &str| {
            environ.split(|&b| b == 0).find_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('='))
                    .map(str::to_owned)
            })
        };
        let mut files = Vec::new();
        let config = args
            .iter()
            .position(|a| a == "--config")
            .and_then(|at| args.get(at + 1));
        match config {
            Some(file) => files.push(file.clone()),
            None if !args.iter().any(|a| a == "--no-default-config") => {
                files.push("/etc/criu/default.conf".to_owned());
                if let Some(home) = var("HOME") {
                    files.push(format!("{home}/.criu/default.conf"));
                }
            }
            None => {}
        }
        files.extend(var("CRIU_CONFIG_FILE"));
        let mut words: Vec<String> = Vec::new();
        for file in files {
            words.extend(config_words(Path::new(&file)));
        }
        words.extend(args);
        CriuOptions::from_words(&words)
    }

    /// Options from command-line words (`--tcp-established`, `--ghost-limit 4M`, ...) and
    /// configuration lines (`tcp-established`).
    pub fn from_words(words: &[String]) -> CriuOptions {
        let mut opts = CriuOptions::defaults();
        let mut words = words.iter().map(|w| w.trim_start_matches('-'));
        while let Some(word) = words.next() {
            let (name, inline) = match word.split_once(['=', ' ']) {
                Some((name, value)) => (name, Some(value.trim().to_owned())),
                None => (word, None),
            };
            match name {
                "tcp-established" => opts.tcp_established = true,
                "ext-unix-sk" => opts.ext_unix_sk = true,
                "tcp-close" => opts.tcp_close = true,
                "skip-in-flight" => opts.skip_in_flight = true,
                "shell-job" | "j" => opts.shell_job = true,
                "ghost-limit" => {
                    let value = inline.or_else(|| words.next().map(str::to_owned));
                    if let Some(limit) = value.as_deref().and_then(parse_size) {
                        opts.ghost_limit = limit;
                    }
                }
                _ => {}
            }
        }
        opts
    }
}

/// The option lines of a CRIU configuration file (comments and blanks dropped).
fn config_words(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `1048576`, `512K`, `4M`, `1G`, as CRIU reads sizes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last()? {
        'k' | 'K' => (&text[..text.len() - 1], 10),
        'm' | 'M' => (&text[..text.len() - 1], 20),
        'g' | 'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok().map(|n| n << shift)
}

/// A descriptor CRIU would refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The process (as this side sees it).
    pub pid: u32,
    /// The descriptor.
    pub fd: u32,
    /// Its kind.
    pub kind: Kind,
    /// What it is: an address (`127.0.0.1:40000 -> 127.0.0.1:5432`) or a path.
    pub what: String,
    /// Why CRIU refuses it, and what to do.
    pub why: &'static str,
    /// The resource most likely holding it, when the process's agent can tell (asked only
    /// once there is something to refuse).
    pub owner: Option<crac_protocol::fd_policy::Owner>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} fd {}: {} {} ({})",
            self.pid,
            self.fd,
            self.kind.as_str(),
            self.what,
            self.why
        )?;
        if let Some(owner) = &self.owner {
            write!(f, " [{owner}]")?;
        }
        Ok(())
    }
}

/// The preflight as the environment sets it: `None` when it is turned off
/// ([`PREFLIGHT_ENV`]`=off`), else the [`Policy`] of [`POLICY_ENV`] (empty without one).
///
/// # Errors
///
/// A bad setting, or a policy file that does not parse (with its line and column).
pub fn configured(vars: impl Fn(&str) -> Option<String>) -> Result<Option<Policy>, String> {
    match vars(PREFLIGHT_ENV).as_deref().map(str::trim) {
        None | Some("" | "on" | "1") => {}
        Some("off" | "0") => return Ok(None),
        Some(other) => return Err(format!("{PREFLIGHT_ENV}={other:?}: expected on or off")),
    }
    match vars(POLICY_ENV).filter(|p| !p.is_empty()) {
        None => Ok(Some(Policy::default())),
        Some(path) => Policy::load(Path::new(&path))
            .map(Some)
            .map_err(|err| format!("{POLICY_ENV}: {err}")),
    }
}

/// Everything in the tree under `root` that CRIU with `opts` will refuse, or `policy`
/// refuses, as one line for a refusal; `None` when there is nothing.
pub fn check(root: u32, opts: &CriuOptions, policy: &Policy) -> Option<String> {
    refusal(&problems(
        &crate::tree::descendants(root),
        &AgentFacts::new(),
        opts,
        policy,
    ))
}

/// The refusal that lists `problems`, as one line; `None` when there are none.
pub fn refusal(problems: &[Problem]) -> Option<String> {
    if problems.is_empty() {
        return None;
    }
    let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
    Some(format!(
        "preflight: CRIU would refuse {} descriptor{} of the tree: {} (CRAC_PREFLIGHT=off skips this check)",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        list.join("; ")
    ))
}

/// What the agents in a tree told of their processes' descriptors, by pid (as this side sees
/// it): [`crac_protocol::fd_facts`], sent with their before-checkpoint replies. A process not in
/// it is looked at through `/proc`.
pub type AgentFacts = HashMap<u32, Facts>;

/// What CRIU with `opts` will refuse in the processes `pids`, and what `policy` refuses.
pub fn problems(
    pids: &[u32],
    facts: &AgentFacts,
    opts: &CriuOptions,
    policy: &Policy,
) -> Vec<Problem> {
    let mut problems = scan(pids, facts, opts, policy);
    for refused in refused_by_policy(pids, facts, policy) {
        if !problems
            .iter()
            .any(|p| p.pid == refused.pid && p.fd == refused.fd)
        {
            problems.push(refused);
        }
    }
    problems
}

/// One descriptor, as the preflight knows it.
enum Seen {
    /// A socket: its inode, and what it says about itself (`None`: nothing to say).
    Socket(u64, Option<SocketFacts>),
    /// Anything else: its `/proc/PID/fd` link, and its size if it is a regular file no link
    /// names any more (0 otherwise).
    Linked(String, u64),
}

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
        let netns = fs::metadata(format!("/proc/{pid}/ns/net")).map_or(0, |m| m.ino());
        let seen = match facts.get(&pid) {
            Some(facts) => from_facts(facts),
            None => from_proc(pid, netns, &mut tables),
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
    let own_netns = fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino());
    let mut asked = vec![own_netns];
    let mut diag: Vec<OwnedFd> = crate::sock_diag::socket().into_iter().collect();
    for &(pid, _, _, netns) in &unix_fds {
        if !asked.contains(&netns) {
            asked.push(netns);
            diag.extend(crate::namespace::in_network_of(
                pid,
                crate::sock_diag::socket,
            ));
        }
    }
    let dump = |names: bool| {
        let mut sockets = HashMap::new();
        for sock in &diag {
            sockets
                .extend(crate::sock_diag::connected_unix(sock.as_fd(), names).unwrap_or_default());
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
    let ours = own_socket_inodes();
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

/// Whether the preflight will show or match the addresses of TCP connections with `opts` and
/// `policy`: when CRIU refuses connections, or a policy may refuse anything. Otherwise an
/// agent need not find them ([`crac_protocol::wire::Lean::tcp_addresses`]).
pub fn needs_tcp_addresses(opts: &CriuOptions, policy: &Policy) -> bool {
    (opts.known && !opts.tcp_established && !opts.tcp_close) || policy.says(Verdict::Refuse)
}

/// Descriptors a policy refuses whatever CRIU's options (they are not problems to CRIU).
pub fn refused_by_policy(pids: &[u32], facts: &AgentFacts, policy: &Policy) -> Vec<Problem> {
    if !policy.says(Verdict::Refuse) {
        return Vec::new();
    }
    let lenient = CriuOptions {
        known: true,
        tcp_established: false,
        ext_unix_sk: false,
        shell_job: false,
        ghost_limit: 0,
        tcp_close: false,
        // A listener is refused by a rule for what it is, not for a client that happens to
        // be waiting.
        skip_in_flight: true,
    };
    scan(pids, facts, &lenient, &Policy::default())
        .into_iter()
        .filter(|p| policy.verdict(p.kind, &p.what) == Some(Verdict::Refuse))
        .map(|mut p| {
            p.why = "refused by the preflight policy (CRAC_POLICY)";
            p
        })
        .collect()
}

/// A process's descriptors as its agent told them: every socket, the TCP connections with
/// what they say, and the links that decide.
fn from_facts(facts: &Facts) -> Vec<(u32, Seen)> {
    let connected: HashMap<u64, &fd_facts::Connected> =
        facts.connected.iter().map(|c| (c.inode, c)).collect();
    let mut seen: Vec<(u32, Seen)> = Vec::with_capacity(facts.sockets.len() + facts.linked.len());
    for c in &facts.connected {
        let Ok(fd) = u32::try_from(c.fd) else {
            continue;
        };
        seen.push((
            fd,
            Seen::Socket(
                c.inode,
                Some(SocketFacts {
                    tcp_peer: c.tcp,
                    unix_connected: !c.tcp,
                    local: c.local.clone(),
                    peer: c.peer.clone(),
                    waiting: 0,
                }),
            ),
        ));
    }
    let others = facts
        .sockets
        .iter()
        .enumerate()
        .filter(|(_, inode)| !connected.contains_key(inode));
    if facts.socket_fds.len() == facts.sockets.len() {
        let listening: HashMap<RawFd, &fd_facts::Listening> =
            facts.listening.iter().map(|l| (l.fd, l)).collect();
        seen.extend(others.filter_map(|(i, &inode)| {
            let raw = facts.socket_fds[i];
            let fd = u32::try_from(raw).ok()?;
            let other = match listening.get(&raw) {
                Some(l) => SocketFacts {
                    waiting: l.waiting,
                    local: l.local.clone(),
                    ..SocketFacts::default()
                },
                // Any of the others may be a connected Unix socket: the sock_diag dump tells
                // which.
                None => SocketFacts {
                    unix_connected: true,
                    ..SocketFacts::default()
                },
            };
            Some((fd, Seen::Socket(inode, Some(other))))
        }));
    } else {
        // An older agent listed its connected Unix sockets among `connected`: the others
        // count only as members of the tree (a Unix peer among them is inside it). It tells
        // no listener's queue either: CRIU alone finds an in-flight connection there.
        seen.extend(others.map(|(_, &inode)| (u32::MAX, Seen::Socket(inode, None))));
    }
    for l in &facts.linked {
        if let Ok(fd) = u32::try_from(l.fd) {
            seen.push((fd, Seen::Linked(l.target.clone(), l.size)));
        }
    }
    // In the order /proc lists them, so a refusal reads the same either way.
    seen.sort_by_key(|(fd, _)| *fd);
    seen
}

/// A process's descriptors from `/proc/PID/fd`: every link read, each socket asked through a
/// copy of its descriptor, or found in its namespace's `tables` when it cannot be copied.
fn from_proc(pid: u32, netns: u64, tables: &mut HashMap<u64, NetTables>) -> Vec<(u32, Seen)> {
    let fd_dir = format!("/proc/{pid}/fd");
    let (Ok(entries), Ok(dir)) = (fs::read_dir(&fd_dir), fs::File::open(&fd_dir)) else {
        return Vec::new();
    };
    let pidfd = Pidfd::open(pid);
    let mut seen = Vec::new();
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Relative to the open folder: no walk of /proc/PID/fd/ per descriptor.
        let Ok(target) = nix::fcntl::readlinkat(dir.as_fd(), entry.file_name().as_os_str()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = socket_inode(&target) {
            // Each socket is asked directly (a few system calls); the namespace's tables,
            // which list every socket of the namespace (the TCP ones by walking the kernel's
            // whole hash table), are the fallback.
            let facts = pidfd.as_ref().and_then(|p| p.socket(fd)).or_else(|| {
                let table = tables.entry(netns).or_insert_with(|| NetTables::read(pid));
                table.unix(inode).or_else(|| table.tcp(pid, inode))
            });
            seen.push((fd, Seen::Socket(inode, facts)));
            continue;
        }
        // Only a regular file that no link names any more is a ghost to CRIU (one still
        // linked elsewhere is dumped as a link, whatever its size).
        let size = if target.ends_with(" (deleted)") {
            fs::metadata(entry.path()).map_or(0, |m| {
                if m.is_file() && m.nlink() == 0 {
                    m.len()
                } else {
                    0
                }
            })
        } else {
            0
        };
        seen.push((fd, Seen::Linked(target, size)));
    }
    seen
}

fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn own_socket_inodes() -> HashSet<u64> {
    fs::read_dir("/proc/self/fd")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .filter_map(|t| socket_inode(&t.to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

/// One network namespace's sockets, by inode, from `/proc/PID/net`: its Unix sockets (a
/// short read), and its TCP sockets, read only for a socket that cannot be asked directly
/// (reading them walks the kernel's whole TCP hash table).
#[derive(Default)]
struct NetTables {
    /// Unix sockets, and whether each is a connected stream or seqpacket one.
    unix: HashMap<u64, bool>,
    /// TCP sockets: what they say, without their descriptors.
    tcp: Option<HashMap<u64, SocketFacts>>,
}

impl NetTables {
    /// The Unix sockets as `pid` sees them (its network namespace).
    fn read(pid: u32) -> NetTables {
        let mut unix = HashMap::new();
        let text = fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(kind), Some(state), Some(inode)) = (f.get(4), f.get(5), f.get(6)) {
                if let Ok(inode) = inode.parse() {
                    // Type 0001 is SOCK_STREAM, 0005 SOCK_SEQPACKET; state 03 is connected.
                    let connected = (*kind == "0001" || *kind == "0005") && *state == "03";
                    unix.insert(inode, connected);
                }
            }
        }
        NetTables { unix, tcp: None }
    }

    fn unix(&self, inode: u64) -> Option<SocketFacts> {
        self.unix.get(&inode).map(|&connected| SocketFacts {
            unix_connected: connected,
            ..SocketFacts::default()
        })
    }

    /// A TCP socket as `pid`'s namespace lists it (the tables are read on first use).
    fn tcp(&mut self, pid: u32, inode: u64) -> Option<SocketFacts> {
        let tcp = self.tcp.get_or_insert_with(|| {
            let mut tcp = HashMap::new();
            for file in ["tcp", "tcp6"] {
                let text =
                    fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
                for line in text.lines().skip(1) {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let (Some(local), Some(remote), Some(state), Some(inode)) =
                        (f.get(1), f.get(2), f.get(3), f.get(9))
                    else {
                        continue;
                    };
                    let Ok(inode) = inode.parse::<u64>() else {
                        continue;
                    };
                    // 0A is LISTEN, 07 CLOSE (bound, never connected); others have a peer.
                    let has_peer = *state != "0A" && *state != "07";
                    // tx_queue:rx_queue; a listener's rx_queue is its accept queue.
                    let waiting = f
                        .get(4)
                        .and_then(|q| q.split_once(':'))
                        .and_then(|(_, rx)| u32::from_str_radix(rx, 16).ok())
                        .filter(|_| *state == "0A")
                        .unwrap_or(0);
                    let facts = SocketFacts {
                        tcp_peer: has_peer,
                        local: address(local),
                        peer: if has_peer {
                            address(remote)
                        } else {
                            String::new()
                        },
                        waiting,
                        ..SocketFacts::default()
                    };
                    tcp.insert(inode, facts);
                }
            }
            tcp
        });
        tcp.get(&inode).map(|facts| SocketFacts {
            local: facts.local.clone(),
            peer: facts.peer.clone(),
            ..*facts
        })
    }
}

/// `0100007F:1F90` -> `127.0.0.1:8080`; IPv6 likewise, in brackets.
fn address(hex: &str) -> String {
    let Some((ip, port)) = hex.split_once(':') else {
        return hex.to_owned();
    };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    let words: Vec<u32> = (0..ip.len() / 8)
        .filter_map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok())
        .collect();
    match words.as_slice() {
        [v4] => format!("{}:{port}", std::net::Ipv4Addr::from(v4.swap_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            format!("[{}]:{port}", std::net::Ipv6Addr::from(bytes))
        }
        _ => hex.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crac_agent::facts_for_tests as fd_facts;

    #[test]
    fn options_come_from_flags_and_config_lines() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let opts = CriuOptions::from_words(&words(&[
            "criu",
            "dump",
            "--tcp-established",
            "--ghost-limit",
            "4M",
        ]));
        assert!(opts.tcp_established && !opts.shell_job && !opts.ext_unix_sk);
        assert_eq!(opts.ghost_limit, 4 << 20);
        let opts = CriuOptions::from_words(&words(&["shell-job", "ext-unix-sk", "ghost-limit 2K"]));
        assert!(opts.shell_job && opts.ext_unix_sk && !opts.tcp_established);
        assert_eq!(opts.ghost_limit, 2048);
        let opts = CriuOptions::from_words(&words(&["-j", "--ghost-limit=1G"]));
        assert!(opts.shell_job && !opts.skip_in_flight && !opts.tcp_close);
        assert_eq!(opts.ghost_limit, 1 << 30);
        let opts = CriuOptions::from_words(&words(&["--skip-in-flight", "tcp-close"]));
        assert!(opts.skip_in_flight && opts.tcp_close && !opts.tcp_established);
    }

    #[test]
    fn addresses_read_as_people_write_them() {
        assert_eq!(address("0100007F:1F90"), "127.0.0.1:8080");
        assert_eq!(address("00000000000000000000000001000000:0050"), "[::1]:80");
    }

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
