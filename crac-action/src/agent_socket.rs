//! Finding a process's agent socket and deciding whether to trust it, wherever the process
//! runs: on the host, or in a container with its own pid and mount namespaces (runc, podman,
//! Kubernetes through runc), or a chroot. What /proc says about the process comes from
//! [`crate::procfs`]; entering its network namespace is [`crate::netns`]'s.
//!
//! crac-action runs in CRIU's namespaces and knows a process by its pid there
//! (`CRTOOLS_INIT_PID` and the tree below it). The agent made its socket in its own view of
//! the world: `<base>/<pid>/agent.sock`, with its own pid (the innermost of `NSpid:` in
//! /proc/PID/status) and its own root (/proc/PID/root, which the kernel resolves in the
//! process's mount namespace). [`AgentSocket::find`] tries the bases in the agent's own order
//! (`crac_protocol::location::base_dir`): the process's `CRAC_AGENT_DIR` (from /proc/PID/environ),
//! crac-action's, `/run/crac`, the process's `$XDG_RUNTIME_DIR/crac`, `/tmp/crac`. An agent
//! whose usual folder another user took listens elsewhere (`<base>/<pid>.XXXXXX`, or a private
//! base `/tmp/crac-<uid>.XXXXXX`): for a process that runs an agent found at none of those,
//! the path its listening socket is bound to says where (its socket inodes from /proc/PID/fd,
//! their bound paths from /proc/PID/net/unix), and that folder gets the same checks. So does
//! a process in a pid namespace of its own whose usual folder holds a socket it does not
//! listen on: copies restored from one image share that path, and all but the one that bound
//! it last move to `<base>/<pid>.XXXXXX` (only for such a process are its sockets read, so the
//! look costs nothing on the host). Each look is made without trusting the process's file
//! system:
//!
//! - the path is resolved with `openat2(RESOLVE_IN_ROOT)` from the process's root, so an
//!   absolute symbolic link planted in a container resolves inside the container, never on
//!   the host;
//! - the agent makes the base folder and its pid folder itself, never as links, so a symbolic
//!   link at either is a trap: refused, naming the path and where it points; so is a link in
//!   place of the socket;
//! - the folder must belong to the process's own uid and be writable by nobody else;
//! - the socket is reached through the folder's handle (`/proc/self/fd/N/agent.sock`), so a
//!   path longer than a `sockaddr_un` holds (108 bytes) still works;
//! - once connected, the listening end must belong to the process itself (`SO_PEERCRED`):
//!   anything else is refused before a byte is sent.
//!
//! A process in its own user namespace is refused with the reason: its agent checks its peer's
//! uid, and root outside that namespace is an unmapped uid (nobody) inside it, so the agent
//! would refuse every request anyway.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, readlinkat, OFlag, OpenHow, ResolveFlag};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::{fstat, fstatat, FileStat, SFlag};

use crac_protocol::client::ClientError;

use crate::procfs;

/// An agent's socket, found and checked; see the [module documentation](self).
///
/// It holds a handle on the agent's folder: the folder stays reachable through it (to
/// connect, or to remove a file) for as long as the value lives, even when the path changes.
#[derive(Debug)]
pub struct AgentSocket {
    pid: u32,
    ns_pid: u32,
    dir: PathBuf,
    /// The process's `CRAC_AGENT_DIR` and `XDG_RUNTIME_DIR`.
    env_dirs: (Option<PathBuf>, Option<PathBuf>),
    in_own_root: bool,
    uid: u32,
    gid: u32,
    folder: OwnedFd,
}

/// Why crac-action will not talk to a process's agent. Each says what was found and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// A folder or the socket on the agent's path is a symbolic link.
    #[error(
        "pid {pid}: {} is a symbolic link (to {target:?}){}; crac-action does not follow it: \
         the agent makes that path itself, so remove the link",
        path.display(),
        where_(*in_own_root)
    )]
    Symlink {
        /// The process.
        pid: u32,
        /// The link, as the process sees it.
        path: PathBuf,
        /// Where it points.
        target: OsString,
        /// Whether the path is inside the process's own root (a container).
        in_own_root: bool,
    },
    /// The agent's folder belongs to another uid, or others may write to it.
    #[error(
        "pid {pid}: its agent folder {}{} {problem}; refusing to use it (the agent makes \
         it with mode 0700 as the process's own uid {uid}: remove it and restart the agent)",
        path.display(),
        where_(*in_own_root)
    )]
    Folder {
        /// The process.
        pid: u32,
        /// The folder, as the process sees it.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// The process's effective uid.
        uid: u32,
        /// Whether the path is inside the process's own root (a container).
        in_own_root: bool,
    },
    /// What sits where the socket should be is not a socket.
    #[error("pid {pid}: {}{} is not a socket; refusing to use it", path.display(), where_(*in_own_root))]
    NotSocket {
        /// The process.
        pid: u32,
        /// The path, as the process sees it.
        path: PathBuf,
        /// Whether the path is inside the process's own root (a container).
        in_own_root: bool,
    },
    /// The process runs an agent, but its socket is gone.
    #[error(
        "pid {pid} runs a crac agent (its crac-agent thread) but there is no socket at \
         {socket}: it was removed (by a /tmp cleaner, or by hand). The agent makes it again \
         within two minutes (two looks, crac_agent::SOCKET_CHECK apart): retry then"
    )]
    SocketGone {
        /// The process.
        pid: u32,
        /// Where the socket should be, as the process sees it.
        socket: String,
    },
    /// The process runs in a user namespace of its own.
    #[error(
        "pid {pid} runs in a user namespace of its own, which crac-action does not support: its \
         agent checks the uid of whoever asks, and root outside that namespace is an unmapped \
         uid (nobody) inside it. Run the container without a user namespace (podman: \
         --userns=host; runc: no \"user\" namespace in config.json)"
    )]
    UserNamespace {
        /// The process.
        pid: u32,
    },
    /// The folder could not be examined.
    #[error("pid {pid}: cannot examine {}: {message}", path.display())]
    Io {
        /// The process.
        pid: u32,
        /// The path, as the process sees it.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

fn where_(in_own_root: bool) -> &'static str {
    if in_own_root {
        " inside the process's own root"
    } else {
        ""
    }
}

/// Why connecting to a found agent did not give a connection crac-action may use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Connecting failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The listening end belongs to another process: the socket leads somewhere else.
    #[error(
        "pid {pid}: the socket {} is held by pid {peer}, not by pid {pid}; refusing to talk to it",
        path.display()
    )]
    NotTheProcess {
        /// The process.
        pid: u32,
        /// Who holds the socket.
        peer: i32,
        /// The socket, as the process sees it.
        path: PathBuf,
    },
}

/// What /proc says about a process: what it takes to know where its agent would be.
struct Proc {
    ns_pid: u32,
    /// Its `CRAC_AGENT_DIR`.
    agent_dir: Option<PathBuf>,
    /// Its `XDG_RUNTIME_DIR`.
    runtime_dir: Option<PathBuf>,
}

impl Proc {
    fn read(pid: u32) -> Option<Proc> {
        let ns_pid = procfs::ns_pid(pid)?;
        let environ = procfs::environ(pid);
        let var = |name: &str| {
            environ
                .var(name)
                .filter(|value| !value.is_empty())
                .map(|value| PathBuf::from(OsStr::from_bytes(value)))
        };
        Some(Proc {
            ns_pid,
            agent_dir: var(crac_protocol::location::DIR_ENV),
            runtime_dir: var(crac_protocol::location::RUNTIME_DIR_ENV),
        })
    }
}

/// The base folders to look in, in order: the process's own `CRAC_AGENT_DIR`, then
/// crac-action's (a service that set its folder in code, with an operator who told CRIU the
/// same), then the defaults in the agent's order (`crac_protocol::location::base_dir`): /run/crac (root's),
/// the process's `$XDG_RUNTIME_DIR/crac`, /tmp/crac. Only absolute paths: a relative one
/// would depend on whose working folder it is taken from.
fn base_candidates(own: Option<PathBuf>, runtime: Option<PathBuf>) -> Vec<PathBuf> {
    let ours = std::env::var_os(crac_protocol::location::DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let runtime = runtime
        .filter(|r| r.is_absolute())
        .map(|r| r.join(crac_protocol::location::RUNTIME_SUBDIR));
    let mut bases: Vec<PathBuf> = Vec::with_capacity(5);
    for base in [
        own,
        ours,
        Some(PathBuf::from(crac_protocol::location::ROOT_DIR)),
        runtime,
        Some(PathBuf::from(crac_protocol::location::FALLBACK_DIR)),
    ]
    .into_iter()
    .flatten()
    {
        if base.is_absolute() && base.parent().is_some() && !bases.contains(&base) {
            bases.push(base);
        }
    }
    bases
}

/// Whether process `pid` (whose root is `root`) sees a file system of its own: another root
/// (a chroot, a container) or another mount namespace (mounts of its own, such as a private
/// /tmp), so that its paths mean something else on this side.
fn own_root(pid: u32, root: &OwnedFd) -> bool {
    let same_root = match (fstat(root), &ours().root) {
        (Ok(theirs), Some(ours)) => same_file(&theirs, ours),
        _ => false,
    };
    !same_root || procfs::namespace(pid, "mnt") != ours().mnt
}

/// crac-action's own root and namespaces, looked up once: every process of a tree is
/// compared with them.
struct Ours {
    root: Option<FileStat>,
    mnt: Option<PathBuf>,
    user: Option<PathBuf>,
}

fn ours() -> &'static Ours {
    static OURS: std::sync::OnceLock<Ours> = std::sync::OnceLock::new();
    OURS.get_or_init(|| Ours {
        root: nix::sys::stat::stat("/").ok(),
        mnt: procfs::own_namespace("mnt"),
        user: procfs::own_namespace("user"),
    })
}

/// Whether two open files are the same inode.
fn same_file(a: &FileStat, b: &FileStat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

fn is(stat: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == kind
}

fn open_how(resolve: ResolveFlag) -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(resolve)
}

impl AgentSocket {
    /// Finds the agent of process `pid` (a pid in crac-action's namespace).
    ///
    /// `Ok(None)` when it has none: the process is gone, or there is no agent folder or no
    /// socket in it (the same as on the host).
    ///
    /// # Errors
    ///
    /// A [`Refusal`] when something on the way is not what the agent would have made.
    pub fn find(pid: u32) -> Result<Option<AgentSocket>, Refusal> {
        let Some(proc) = Proc::read(pid) else {
            return Ok(None);
        };
        let Ok(root) = procfs::open_root(pid) else {
            return Ok(None);
        };
        let in_own_root = own_root(pid, &root);
        let pid_name = proc.ns_pid.to_string();
        // Another user's folder (or a link) at a usual path: the agent may have made one of its
        // own elsewhere (see below); if not, this is the answer.
        let mut taken = None;
        let mut euid = None;
        // The folders its listening sockets are bound in, once read (see `listens_at`).
        let mut listening = None;
        for base in base_candidates(proc.agent_dir.clone(), proc.runtime_dir.clone()) {
            let folder = match open_folder(&root, &base, OsStr::new(&pid_name), pid, in_own_root) {
                Ok(Some(folder)) => folder,
                Ok(None) => continue,
                // A link where the agent would have made a folder: it went elsewhere, or this
                // is the answer.
                Err(refusal @ Refusal::Symlink { .. }) => {
                    taken.get_or_insert(refusal);
                    continue;
                }
                Err(refusal) => return Err(refusal),
            };
            // Read only now: most processes of a tree have no agent folder.
            let Some(uid) = euid.or_else(|| procfs::euid(pid)) else {
                return Ok(None);
            };
            euid = Some(uid);
            let dir = base.join(&pid_name);
            match AgentSocket::check(pid, proc.ns_pid, uid, dir, folder, in_own_root) {
                Ok(Some(_)) if !listens_at(&mut listening, pid, proc.ns_pid, &base, &pid_name) => {}
                Ok(Some(found)) => return found.in_our_user_namespace(&proc),
                Ok(None) => {}
                Err(refusal @ Refusal::Folder { .. }) => {
                    taken.get_or_insert(refusal);
                }
                Err(refusal) => return Err(refusal),
            }
        }
        if !runs_an_agent(pid) {
            return taken.map_or(Ok(None), Err);
        }
        // An agent whose usual folder was taken listens in `<base>/<pid>.XXXXXX`: its
        // listening socket says where.
        let listening = listening.unwrap_or_else(|| listening_folders(pid, proc.ns_pid));
        for (base, name) in listening {
            let Some(folder) = open_folder(&root, &base, &name, pid, in_own_root)? else {
                continue;
            };
            let Some(uid) = euid.or_else(|| procfs::euid(pid)) else {
                return Ok(None);
            };
            euid = Some(uid);
            let dir = base.join(&name);
            if let Some(found) =
                AgentSocket::check(pid, proc.ns_pid, uid, dir, folder, in_own_root)?
            {
                return found.in_our_user_namespace(&proc);
            }
        }
        Err(taken.unwrap_or_else(|| Refusal::SocketGone {
            pid,
            socket: expected_socket(pid),
        }))
    }

    /// The agent, unless its process is in a user namespace of its own.
    fn in_our_user_namespace(mut self, proc: &Proc) -> Result<Option<AgentSocket>, Refusal> {
        if procfs::namespace(self.pid, "user") != ours().user {
            return Err(Refusal::UserNamespace { pid: self.pid });
        }
        self.env_dirs = (proc.agent_dir.clone(), proc.runtime_dir.clone());
        Ok(Some(self))
    }

    /// Checks the folder's owner and mode and the socket in it.
    fn check(
        pid: u32,
        ns_pid: u32,
        euid: u32,
        dir: PathBuf,
        folder: OwnedFd,
        in_own_root: bool,
    ) -> Result<Option<AgentSocket>, Refusal> {
        let io_refusal = |path: &Path, err: Errno| Refusal::Io {
            pid,
            path: path.to_owned(),
            message: err.desc().to_owned(),
        };
        let meta = fstat(&folder).map_err(|e| io_refusal(&dir, e))?;
        let problem = if meta.st_uid != euid {
            Some(format!(
                "belongs to uid {}, not to the process's uid {euid}",
                meta.st_uid
            ))
        } else if meta.st_mode & 0o022 != 0 {
            Some(format!(
                "may be written by others (mode {:o})",
                meta.st_mode & 0o7777
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Refusal::Folder {
                pid,
                path: dir,
                problem,
                uid: euid,
                in_own_root,
            });
        }
        let socket = dir.join(crac_protocol::location::SOCKET_NAME);
        match fstatat(
            &folder,
            crac_protocol::location::SOCKET_NAME,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Err(Errno::ENOENT) => Ok(None),
            Err(err) => Err(io_refusal(&socket, err)),
            Ok(stat) if is(&stat, SFlag::S_IFLNK) => Err(Refusal::Symlink {
                pid,
                target: readlinkat(&folder, crac_protocol::location::SOCKET_NAME)
                    .unwrap_or_default(),
                path: socket,
                in_own_root,
            }),
            Ok(stat) if !is(&stat, SFlag::S_IFSOCK) => Err(Refusal::NotSocket {
                pid,
                path: socket,
                in_own_root,
            }),
            Ok(_) => Ok(Some(AgentSocket {
                pid,
                ns_pid,
                dir,
                env_dirs: (None, None),
                in_own_root,
                uid: meta.st_uid,
                gid: meta.st_gid,
                folder,
            })),
        }
    }

    /// The process, by its pid in crac-action's namespace.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's pid as it sees itself (differs inside a container).
    pub fn ns_pid(&self) -> u32 {
        self.ns_pid
    }

    /// The agent's folder, as the process sees it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process's own `CRAC_AGENT_DIR`, if set.
    pub fn agent_dir_env(&self) -> Option<&Path> {
        self.env_dirs.0.as_deref()
    }

    /// The process's own `XDG_RUNTIME_DIR`, if set.
    pub fn runtime_dir(&self) -> Option<&Path> {
        self.env_dirs.1.as_deref()
    }

    /// Whether the process has a root of its own (a container, a chroot): then
    /// [`dir`](Self::dir) is not a path on this side.
    pub fn in_own_root(&self) -> bool {
        self.in_own_root
    }

    /// The folder's owner and group.
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// The socket, as the process sees it, with "inside the root of pid N" for a process
    /// with a root of its own: for messages.
    pub fn describe(&self) -> String {
        shown(
            &self.dir.join(crac_protocol::location::SOCKET_NAME),
            self.pid,
            self.in_own_root,
        )
    }

    /// Connects to the agent, through the folder's handle, and checks that the listening end
    /// is the process itself.
    ///
    /// # Errors
    ///
    /// [`ConnectError::Client`] when nobody listens ([`ClientError::NoAgent`], a socket left
    /// by a killed process) or connecting fails; [`ConnectError::NotTheProcess`] when the
    /// socket is held by another process.
    pub fn connect(&self) -> Result<UnixStream, ConnectError> {
        let shown = PathBuf::from(self.describe());
        let through =
            procfs::own_fd_path(self.folder.as_raw_fd()).join(crac_protocol::location::SOCKET_NAME);
        let stream = crac_protocol::client::connect_via(&through, &shown)?;
        let peer = getsockopt(&stream, PeerCredentials)
            .map_err(|err| ClientError::Io {
                path: shown.clone(),
                source: err.into(),
            })?
            .pid();
        if u32::try_from(peer).ok() != Some(self.pid) {
            return Err(ConnectError::NotTheProcess {
                pid: self.pid,
                peer,
                path: self.dir.join(crac_protocol::location::SOCKET_NAME),
            });
        }
        Ok(stream)
    }

    /// The folder's handle, to reach files in it.
    pub fn folder(&self) -> impl AsFd + '_ {
        self.folder.as_fd()
    }
}

impl fmt::Display for AgentSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Whether process `pid` has the agent's thread (named `crac-agent`): it has an agent, whether
/// or not its socket can be found.
fn runs_an_agent(pid: u32) -> bool {
    procfs::runs_thread_named(pid, b"crac-agent")
}

/// Where the socket of process `pid`'s agent would usually be, for a message saying there is
/// none: by the agent's own rule (`crac_protocol::location::base_dir`), as far as it can be told from
/// outside: `/run/crac/4242/agent.sock`, or `/tmp/crac/1/agent.sock inside the root of pid
/// 4242`.
pub fn expected_socket(pid: u32) -> String {
    let proc = Proc::read(pid);
    let ns_pid = proc.as_ref().map_or(pid, |p| p.ns_pid);
    let root = procfs::open_root(pid).ok();
    let base = match proc {
        Some(Proc {
            agent_dir: Some(dir),
            ..
        }) => dir,
        proc => match procfs::euid(pid) {
            Some(0) if root.as_ref().is_some_and(run_usable_in) => {
                PathBuf::from(crac_protocol::location::ROOT_DIR)
            }
            Some(uid) if uid != 0 => proc
                .and_then(|p| p.runtime_dir)
                .filter(|dir| {
                    root.as_ref()
                        .is_some_and(|root| runtime_usable_in(root, dir, uid))
                })
                .map_or_else(
                    || PathBuf::from(crac_protocol::location::FALLBACK_DIR),
                    |dir| dir.join(crac_protocol::location::RUNTIME_SUBDIR),
                ),
            _ => PathBuf::from(crac_protocol::location::FALLBACK_DIR),
        },
    };
    let socket = base
        .join(ns_pid.to_string())
        .join(crac_protocol::location::SOCKET_NAME);
    let in_own_root = root.is_some_and(|root| own_root(pid, &root));
    shown(&socket, pid, in_own_root)
}

/// Whether an agent running as root in the process whose root is `root` would use /run/crac:
/// it is there, or /run is root's, closed to others, and not read-only.
fn run_usable_in(root: &OwnedFd) -> bool {
    let in_root = |path: &str| {
        openat2(
            root,
            path,
            open_how(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS),
        )
        .ok()
    };
    if in_root("run/crac").is_some() {
        return true;
    }
    in_root("run").is_some_and(|run| {
        fstat(&run).is_ok_and(|st| st.st_uid == 0 && st.st_mode & 0o022 == 0)
            && nix::sys::statvfs::fstatvfs(&run)
                .is_ok_and(|vfs| !vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
    })
}

/// Whether `dir`, inside `root`, is a runtime folder the agent of `uid` would trust.
fn runtime_usable_in(root: &OwnedFd, dir: &Path, uid: u32) -> bool {
    let relative = dir.strip_prefix("/").unwrap_or(dir);
    openat2(
        root,
        relative,
        open_how(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS),
    )
    .ok()
    .and_then(|fd| fstat(&fd).ok())
    .is_some_and(|st| st.st_uid == uid && st.st_mode & 0o022 == 0)
}

/// The folders in which process `pid` (`ns_pid` as it sees itself) listens on an agent's
/// socket, as `(base, folder name)`: the bound paths of the listening Unix sockets among its
/// descriptors (/proc/PID/fd, then /proc/PID/net/unix: its network namespace's sockets, with
/// the paths as the process bound them) that end in `<pid>/agent.sock` or
/// `<pid>.XXXXXX/agent.sock`. Each is checked like a usual folder before anything is sent.
fn listening_folders(pid: u32, ns_pid: u32) -> Vec<(PathBuf, OsString)> {
    let inodes = procfs::socket_inodes(pid);
    if inodes.is_empty() {
        return Vec::new();
    }
    let Some(table) = procfs::unix_sockets(pid) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for socket in table.iter() {
        // __SO_ACCEPTCON: listening.
        if socket.flags & 0x10000 == 0 || !inodes.contains(&socket.inode) {
            continue;
        }
        let Some(path) = socket.path else {
            continue;
        };
        if path.file_name() != Some(OsStr::new(crac_protocol::location::SOCKET_NAME))
            || !path.is_absolute()
        {
            continue;
        }
        let Some(folder) = path.parent() else {
            continue;
        };
        let (Some(base), Some(name)) = (folder.parent(), folder.file_name()) else {
            continue;
        };
        if name
            .to_str()
            .and_then(crac_protocol::location::parse_folder_name)
            .is_some_and(|(p, _)| p == ns_pid)
            && base.parent().is_some()
        {
            found.push((base.to_owned(), name.to_owned()));
        }
    }
    found
}

/// Whether the socket in `<base>/<name>`, the usual folder of process `pid` (`ns_pid` as it
/// sees itself), can be its own. Copies restored from one image into pid namespaces of their
/// own, sharing a file system, share that path (the same pid in each); the copy that bound it
/// last has it, and the others move to folders of their own (`<base>/<pid>.XXXXXX`), where
/// their listening sockets say they are. Only a process in a pid namespace of its own can
/// meet that, so only for one are its listening sockets read (once, into `listening`): on
/// the host this costs nothing. A process that listens on no agent socket found this way
/// (its table cannot be read) keeps its usual folder.
fn listens_at(
    listening: &mut Option<Vec<(PathBuf, OsString)>>,
    pid: u32,
    ns_pid: u32,
    base: &Path,
    name: &str,
) -> bool {
    if pid == ns_pid {
        return true;
    }
    let folders = listening.get_or_insert_with(|| listening_folders(pid, ns_pid));
    folders.is_empty()
        || folders
            .iter()
            .any(|(b, n)| b == base && n.as_os_str() == OsStr::new(name))
}

/// `socket`, a path as process `pid` sees it, for a message: with "inside the root of pid N"
/// when the process has a root of its own.
fn shown(socket: &Path, pid: u32, in_own_root: bool) -> String {
    if in_own_root {
        format!("{} inside the root of pid {pid}", socket.display())
    } else {
        socket.display().to_string()
    }
}

/// Opens `<base>/<folder>` inside `root`: `Ok(None)` when it is not there.
fn open_folder(
    root: &OwnedFd,
    base: &Path,
    folder: &OsStr,
    pid: u32,
    in_own_root: bool,
) -> Result<Option<OwnedFd>, Refusal> {
    let (Some(parent), Some(name)) = (base.parent(), base.file_name()) else {
        return Ok(None);
    };
    // Above the base folder the process's links are followed, inside its root only.
    let relative_parent = parent.strip_prefix("/").unwrap_or(parent);
    let parent_fd = match openat2(
        root,
        if relative_parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative_parent
        },
        open_how(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES) => return Ok(None),
        Err(err) => {
            return Err(Refusal::Io {
                pid,
                path: parent.to_owned(),
                message: err.desc().to_owned(),
            })
        }
    };
    // The base folder and the pid folder: made by the agent, never links.
    let mut dir_fd = parent_fd;
    let mut path = parent.to_owned();
    for component in [name, folder] {
        path.push(component);
        match openat2(
            &dir_fd,
            component,
            open_how(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH),
        ) {
            Ok(fd) => dir_fd = fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
            Err(Errno::ELOOP) => {
                return Err(Refusal::Symlink {
                    pid,
                    target: readlinkat(&dir_fd, component).unwrap_or_default(),
                    path,
                    in_own_root,
                })
            }
            Err(err) => {
                return Err(Refusal::Io {
                    pid,
                    path,
                    message: err.desc().to_owned(),
                })
            }
        }
    }
    Ok(Some(dir_fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};

    #[test]
    fn bases_are_tried_in_the_agents_order_absolute_and_each_once() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::remove_var(crac_protocol::location::DIR_ENV);
        assert_eq!(
            base_candidates(
                Some(PathBuf::from("/srv/agents")),
                Some(PathBuf::from("/run/user/1000"))
            ),
            [
                "/srv/agents",
                "/run/crac",
                "/run/user/1000/crac",
                "/tmp/crac"
            ]
            .map(PathBuf::from)
        );
        // crac-action's own comes right after the process's.
        std::env::set_var(crac_protocol::location::DIR_ENV, "/var/lib/agents");
        assert_eq!(
            base_candidates(Some(PathBuf::from("/srv/agents")), None),
            ["/srv/agents", "/var/lib/agents", "/run/crac", "/tmp/crac"].map(PathBuf::from)
        );
        std::env::remove_var(crac_protocol::location::DIR_ENV);
        // Relative ones are dropped; each base once.
        assert_eq!(
            base_candidates(
                Some(PathBuf::from("relative/dir")),
                Some(PathBuf::from("relative"))
            ),
            ["/run/crac", "/tmp/crac"].map(PathBuf::from)
        );
        assert_eq!(
            base_candidates(Some(PathBuf::from("/tmp/crac")), None),
            ["/tmp/crac", "/run/crac"].map(PathBuf::from)
        );
    }

    /// Tests that set crac-action's own environment take turns.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn an_agent_in_an_alternative_folder_is_found_by_its_listening_socket() {
        let root = scratch("alternative");
        let folder = root.join("7.Ab3xYz");
        fs::DirBuilder::new().mode(0o700).create(&folder).unwrap();
        let socket = folder.join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // Neither a socket that only has the name, nor one of another pid's.
        let other = root.join("8");
        fs::DirBuilder::new().mode(0o700).create(&other).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(other.join("agent.sock")).unwrap();
        let found = listening_folders(std::process::id(), 7);
        assert_eq!(found, vec![(root.clone(), OsString::from("7.Ab3xYz"))]);
        assert!(listening_folders(std::process::id(), 9).is_empty());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_namespaced_process_listening_elsewhere_is_not_taken_for_its_usual_folder() {
        let root = scratch("moved");
        let me = std::process::id();
        // As a copy that moved: it listens in `17.Ab3xYz`, another copy's socket is at `17`.
        let folder = root.join("17.Ab3xYz");
        fs::DirBuilder::new().mode(0o700).create(&folder).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(folder.join("agent.sock")).unwrap();
        let usual = root.join("17");
        fs::DirBuilder::new().mode(0o700).create(&usual).unwrap();
        let mut listening = None;
        assert!(!listens_at(&mut listening, me, 17, &root, "17"));
        assert_eq!(
            listening,
            Some(vec![(root.clone(), OsString::from("17.Ab3xYz"))])
        );
        // Read once.
        assert!(listens_at(&mut listening, me, 17, &root, "17.Ab3xYz"));
        // The copy that bound the usual path listens there.
        let _usual = std::os::unix::net::UnixListener::bind(usual.join("agent.sock")).unwrap();
        assert!(listens_at(&mut None, me, 17, &root, "17"));
        // Nothing found (no agent socket for pid 19): the usual folder stands.
        assert!(listens_at(&mut None, me, 19, &root, "19"));
        // A process in crac-action's pid namespace: not looked at.
        let mut untouched = None;
        assert!(listens_at(&mut untouched, me, me, &root, "17"));
        assert_eq!(untouched, None);
        let _ = fs::remove_dir_all(&root);
    }

    /// A scratch root with `base/<pid>` in it, as an agent would make it.
    fn scratch(name: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("crac-namespace-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        root
    }

    fn root_fd(path: &Path) -> OwnedFd {
        nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn links_on_the_agents_path_are_refused_and_named() {
        let root = scratch("links");
        fs::create_dir_all(root.join("etc/7")).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        // The trap: the base folder is a link to somewhere else.
        symlink("/etc", root.join("tmp/crac")).unwrap();
        let err = open_folder(
            &root_fd(&root),
            Path::new("/tmp/crac"),
            OsStr::new("7"),
            42,
            true,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "pid 42: /tmp/crac is a symbolic link (to \"/etc\") inside the process's own root; \
             crac-action does not follow it: the agent makes that path itself, so remove the link"
        );
        // A link above the base folder is followed, but inside the root: /run -> /var/run.
        fs::create_dir_all(root.join("var/run/crac/7")).unwrap();
        symlink("/var/run", root.join("run")).unwrap();
        assert!(open_folder(
            &root_fd(&root),
            Path::new("/run/crac"),
            OsStr::new("7"),
            42,
            true
        )
        .unwrap()
        .is_some());
        // An absolute link that would leave the root stays inside it.
        symlink("/", root.join("up")).unwrap();
        assert!(open_folder(
            &root_fd(&root),
            Path::new("/up/run/crac"),
            OsStr::new("7"),
            42,
            true
        )
        .unwrap()
        .is_some());
        assert!(open_folder(
            &root_fd(&root),
            Path::new("/missing/crac"),
            OsStr::new("7"),
            42,
            true
        )
        .unwrap()
        .is_none());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_folder_must_be_the_processs_own_and_closed_to_others() {
        let root = scratch("owner");
        let dir = root.join("base/7");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let folder = || {
            open_folder(
                &root_fd(&root),
                Path::new("/base"),
                OsStr::new("7"),
                42,
                false,
            )
            .unwrap()
            .unwrap()
        };
        // No socket in it: no agent.
        assert!(AgentSocket::check(42, 7, me, dir.clone(), folder(), false)
            .unwrap()
            .is_none());
        let err = AgentSocket::check(42, 7, me + 1, dir.clone(), folder(), false).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "pid 42: its agent folder {} belongs to uid {me}, not to the process's uid {}",
                dir.display(),
                me + 1
            )),
            "{err}"
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = AgentSocket::check(42, 7, me, dir.clone(), folder(), false).unwrap_err();
        assert!(
            err.to_string()
                .contains("may be written by others (mode 777)"),
            "{err}"
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        symlink("/run/elsewhere.sock", dir.join("agent.sock")).unwrap();
        let err = AgentSocket::check(42, 7, me, dir.clone(), folder(), false).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "pid 42: {}/agent.sock is a symbolic link (to \"/run/elsewhere.sock\")",
                dir.display()
            )),
            "{err}"
        );
        fs::remove_file(dir.join("agent.sock")).unwrap();
        fs::write(dir.join("agent.sock"), b"").unwrap();
        let err = AgentSocket::check(42, 7, me, dir.clone(), folder(), false).unwrap_err();
        assert!(err
            .to_string()
            .ends_with("agent.sock is not a socket; refusing to use it"));
        let _ = fs::remove_dir_all(&root);
    }
}
