//! Starting and stopping the agent: [`start`], [`Builder`], [`Agent`].

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crac_core::Coordinator;

use crate::cleanup;
use crate::error::StartError;
use crate::handler::Handler;
use crate::location;
use crate::server::{Options, Server};

/// The process that started the running agent (0: none). A forked child sees its parent's pid
/// here and may start its own.
static RUNNING_IN: AtomicU32 = AtomicU32::new(0);

/// The coordinator the running agent drives (for the self-checkpoint API).
static COORDINATOR: Mutex<Option<Coordinator>> = Mutex::new(None);

/// The socket of the agent running in this process (it may be in a folder of its own when its
/// usual one was taken; see [`base_dir`](crac_protocol::location::base_dir)).
static SOCKET: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Where the running agent listens, for [`Agent::socket_path`]: it changes when a copy
/// restored from the same image took the path (see `Server::check_socket`). Each path is
/// leaked (one per move, rare), so a borrowed one stays valid.
pub(crate) type Published = Arc<Mutex<&'static Path>>;

/// Notes that the running agent now listens on `socket` (its folder was taken: it moved).
pub(crate) fn moved_to(published: &Published, socket: &Path) {
    *SOCKET
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(socket.to_owned());
    *published
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = leak(socket);
}

fn leak(path: &Path) -> &'static Path {
    Box::leak(path.to_owned().into_boxed_path())
}

/// The socket of the agent running in this process, if one runs.
pub(crate) fn running_socket() -> Option<PathBuf> {
    if RUNNING_IN.load(Ordering::SeqCst) != std::process::id() {
        return None;
    }
    SOCKET
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// The coordinator of the agent running in this process, if one runs.
pub(crate) fn running_coordinator() -> Option<Coordinator> {
    if RUNNING_IN.load(Ordering::SeqCst) != std::process::id() {
        return None;
    }
    COORDINATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// Starts the agent with default options, driving the [global](Coordinator::global)
/// coordinator. Call it once, early in `main`.
///
/// ```no_run
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let _agent = crac_agent::start()?;
///     // register resources, serve...
///     Ok(())
/// }
/// ```
///
/// # Errors
///
/// See [`StartError`]; the message says what to fix.
pub fn start() -> Result<Agent, StartError> {
    Builder::new().start()
}

/// How often an idle agent looks whether its socket is still there, by default.
pub const SOCKET_CHECK: Duration = Duration::from_secs(60);

/// Options for the agent.
#[derive(Debug)]
pub struct Builder {
    coordinator: Option<Coordinator>,
    base_dir: Option<PathBuf>,
    signal_cleanup: bool,
    socket_check: Option<Duration>,
    fd_policy: Option<crac_protocol::fd_policy::Policy>,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder::new()
    }
}

impl Builder {
    /// Default options: the global coordinator, the folder from
    /// [`CRAC_AGENT_DIR`](crac_protocol::env::AGENT_DIR), cleanup on SIGTERM/SIGINT, a look at the socket
    /// every [`SOCKET_CHECK`].
    pub fn new() -> Builder {
        Builder {
            coordinator: None,
            base_dir: None,
            signal_cleanup: true,
            socket_check: Some(SOCKET_CHECK),
            fd_policy: None,
        }
    }

    /// The descriptor policy the agent carries out once a checkpoint's hooks have run: its
    /// `close` rules point what they match at `/dev/null` (see [`Policy`](crate::Policy)). Default:
    /// the file named by `CRAC_POLICY` in this process's environment, if any.
    ///
    /// ```
    /// let policy = crac_agent::Policy::parse("inline", "close tcp * -> *:8125")
    ///     .expect("a policy");
    /// let _builder = crac_agent::Builder::new().fd_policy(policy);
    /// ```
    pub fn fd_policy(mut self, policy: crac_protocol::fd_policy::Policy) -> Builder {
        self.fd_policy = Some(policy);
        self
    }

    /// Drives this coordinator instead of the global one.
    pub fn coordinator(mut self, coordinator: Coordinator) -> Builder {
        self.coordinator = Some(coordinator);
        self
    }

    /// Uses this base folder instead of the one [`base_dir`](crac_protocol::location::base_dir) chooses. `crac-action`
    /// only finds the agent if it is given the same folder through `CRAC_AGENT_DIR` (or the
    /// folder is one of those it tries anyway).
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.base_dir = Some(dir.into());
        self
    }

    /// Whether to remove the socket when SIGTERM or SIGINT ends the process (default: yes).
    /// The application's own handling of those signals is kept either way: a signal it
    /// handles is left to it, and the socket stays while the process lives on (draining);
    /// it is removed at exit.
    pub fn signal_cleanup(mut self, enabled: bool) -> Builder {
        self.signal_cleanup = enabled;
        self
    }

    /// How often the idle agent looks whether its socket is still there, and makes it again if
    /// it is gone (removed by a /tmp cleaner such as systemd-tmpfiles, or by hand) at two looks
    /// in a row; `None`: never. Default [`SOCKET_CHECK`]. It is the only time an idle agent
    /// wakes up.
    pub fn socket_check(mut self, every: Option<Duration>) -> Builder {
        self.socket_check = every;
        self
    }

    /// Creates the socket and starts the agent's thread.
    ///
    /// # Errors
    ///
    /// See [`StartError`].
    pub fn start(self) -> Result<Agent, StartError> {
        let pid = std::process::id();
        let previous = RUNNING_IN.load(Ordering::SeqCst);
        if previous == pid
            || RUNNING_IN
                .compare_exchange(previous, pid, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return Err(StartError::AlreadyRunning {
                socket: running_socket()
                    .unwrap_or_else(|| crac_protocol::location::socket_path(pid)),
            });
        }
        let started = self.start_unguarded(pid);
        if started.is_err() {
            RUNNING_IN.store(0, Ordering::SeqCst);
        }
        started
    }

    fn start_unguarded(self, pid: u32) -> Result<Agent, StartError> {
        let fd_policy = match self.fd_policy {
            Some(policy) => policy,
            None => {
                match std::env::var_os(crac_protocol::fd_policy::POLICY_ENV)
                    .filter(|p| !p.is_empty())
                {
                    Some(path) => crac_protocol::fd_policy::Policy::load(Path::new(&path))?,
                    None => crac_protocol::fd_policy::Policy::default(),
                }
            }
        };
        let chosen = self.base_dir.is_none()
            && std::env::var_os(crac_protocol::env::AGENT_DIR).is_none_or(|d| d.is_empty());
        let base = self
            .base_dir
            .unwrap_or_else(crac_protocol::location::base_dir);
        let location::Prepared {
            base,
            private_base,
            dir,
            socket,
            moved_aside,
        } = location::prepare(&base, pid, chosen)?;
        let listener = location::listen(&socket)?;
        cleanup::arm(
            &socket,
            &dir,
            private_base.then_some(base.as_path()),
            self.signal_cleanup,
        );

        // stop() wakes the agent's thread by closing the other end of this pipe.
        let (stop_read, stop_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| StartError::io("make a pipe for", &socket, e.into()))?;
        let coordinator = self
            .coordinator
            .unwrap_or_else(|| Coordinator::global().clone());
        *COORDINATOR
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(coordinator.clone());
        *SOCKET
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(socket.clone());
        let published: Published = Arc::new(Mutex::new(leak(&socket)));
        let server = Server::new(
            Handler::new(coordinator),
            listener,
            Options {
                fd_policy,
                published: published.clone(),
                socket: socket.clone(),
                dir,
                base,
                private_base,
                socket_check: self.socket_check,
            },
        );
        let thread = std::thread::Builder::new()
            .name("crac-agent".into())
            .spawn(move || server.run(stop_read));
        let thread = match thread {
            Ok(thread) => thread,
            Err(err) => {
                cleanup::remove_files();
                return Err(StartError::io("start the agent thread for", &socket, err));
            }
        };
        Ok(Agent {
            inner: Arc::new(AgentInner {
                socket: published,
                moved_aside,
                running: Mutex::new(Some((thread, stop_write))),
            }),
        })
    }
}

/// A handle to the running agent. Dropping it leaves the agent running (it serves for the
/// life of the process); [`stop`](Agent::stop) ends it.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

struct AgentInner {
    socket: Published,
    moved_aside: Option<PathBuf>,
    /// The agent's thread and the end of its stop pipe, until stopped.
    running: Mutex<Option<(JoinHandle<()>, OwnedFd)>>,
}

impl Agent {
    /// The socket the agent listens on: `<base>/<pid>/agent.sock`, or
    /// `<base>/<pid>.XXXXXX/agent.sock` when another user's entry took `<base>/<pid>` and
    /// could not be moved aside (see [`base_dir`](crac_protocol::location::base_dir)), or when
    /// another copy restored from the same image (in a pid namespace of its own, where it has
    /// the same pid) bound `<base>/<pid>/agent.sock` after this one: the agent then moves to a
    /// folder of its own, and this says where it listens now.
    pub fn socket_path(&self) -> &Path {
        *self
            .inner
            .socket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where another user's entry (a folder, a file or a link) found at this process's folder
    /// path, `<base>/<pid>`, was moved when the agent started: `<base>/<pid>.foreign-<random>`,
    /// left there for whoever made it (nothing of it was used). `None` when the path was free
    /// or the process's own.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.inner.moved_aside.as_deref()
    }

    /// Stops the agent, aborts a checkpoint it left pending, and removes its socket and
    /// folder. Calling it again does nothing.
    pub fn stop(&self) {
        let Some((thread, stop)) = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        else {
            return;
        };
        // The thread's end of the pipe becomes readable (end of file).
        drop(stop);
        let _ = thread.join();
        cleanup::remove_files();
        cleanup::disarm();
        *COORDINATOR
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        RUNNING_IN.store(0, Ordering::SeqCst);
    }
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.socket_path())
            .field("moved_aside", &self.inner.moved_aside)
            .finish()
    }
}
