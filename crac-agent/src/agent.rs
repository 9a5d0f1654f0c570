//! Starting and stopping the agent: [`start`], [`Builder`], [`Agent`].

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::{fmt, fs, io};

use crac_core::Coordinator;

use crate::cleanup;
use crate::location;
use crate::server::Server;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// This process already runs an agent.
    #[error("an agent is already running in this process, at {socket}")]
    AlreadyRunning {
        /// Its socket.
        socket: PathBuf,
    },
    /// A folder on the socket's path could let another user interfere.
    #[error("refusing to use {path}: {reason}")]
    UnsafeDir {
        /// The folder.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
    /// A live agent already answers on this process's socket path.
    #[error(
        "another live agent answers at {path} (is {} shared between PID namespaces?)",
        location::DIR_ENV
    )]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// A file-system or socket operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// To what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl StartError {
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> StartError {
        StartError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// The process that started the running agent (0: none). A forked child sees its parent's pid
/// here and may start its own.
static RUNNING_IN: AtomicU32 = AtomicU32::new(0);

/// The coordinator the running agent drives (for the self-checkpoint API).
static COORDINATOR: Mutex<Option<Coordinator>> = Mutex::new(None);

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

/// Options for the agent.
#[derive(Debug)]
pub struct Builder {
    coordinator: Option<Coordinator>,
    base_dir: Option<PathBuf>,
    signal_cleanup: bool,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder::new()
    }
}

impl Builder {
    /// Default options: the global coordinator, the folder from
    /// [`CRAC_AGENT_DIR`](crate::DIR_ENV), cleanup on SIGTERM/SIGINT.
    pub fn new() -> Builder {
        Builder {
            coordinator: None,
            base_dir: None,
            signal_cleanup: true,
        }
    }

    /// Drives this coordinator instead of the global one.
    pub fn coordinator(mut self, coordinator: Coordinator) -> Builder {
        self.coordinator = Some(coordinator);
        self
    }

    /// Uses this base folder instead of the one from the environment. `crac-action` only
    /// finds the agent if it is given the same folder through `CRAC_AGENT_DIR`.
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.base_dir = Some(dir.into());
        self
    }

    /// Whether to remove the socket when SIGTERM or SIGINT ends the process (default: yes).
    /// The application's own handling of those signals is kept either way.
    pub fn signal_cleanup(mut self, enabled: bool) -> Builder {
        self.signal_cleanup = enabled;
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
                socket: location::socket_path(pid),
            });
        }
        let started = self.start_unguarded(pid);
        if started.is_err() {
            RUNNING_IN.store(0, Ordering::SeqCst);
        }
        started
    }

    fn start_unguarded(self, pid: u32) -> Result<Agent, StartError> {
        let base = self.base_dir.unwrap_or_else(location::base_dir);
        let (dir, socket) = location::prepare(&base, pid)?;
        let listener =
            UnixListener::bind(&socket).map_err(|e| StartError::io("listen on", &socket, e))?;
        if let Err(err) = fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)) {
            let _ = fs::remove_file(&socket);
            return Err(StartError::io("set permissions of", &socket, err));
        }
        cleanup::arm(&socket, &dir, self.signal_cleanup);

        let stopping = Arc::new(AtomicBool::new(false));
        // A second handle on the same socket, so that stop() can shut it down.
        let control = listener
            .try_clone()
            .map_err(|e| StartError::io("duplicate the listener of", &socket, e))?;
        let coordinator = self
            .coordinator
            .unwrap_or_else(|| Coordinator::global().clone());
        *COORDINATOR
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(coordinator.clone());
        let server = Server::new(coordinator);
        let thread = {
            let stopping = Arc::clone(&stopping);
            std::thread::Builder::new()
                .name("crac-agent".into())
                .spawn(move || server.run(listener, stopping))
        };
        let thread = match thread {
            Ok(thread) => thread,
            Err(err) => {
                cleanup::remove_files();
                return Err(StartError::io("start the agent thread for", &socket, err));
            }
        };
        Ok(Agent {
            inner: Arc::new(AgentInner {
                socket,
                stopping,
                running: Mutex::new(Some((thread, control))),
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
    socket: PathBuf,
    stopping: Arc<AtomicBool>,
    /// The agent's thread and a second handle on its listening socket, until stopped.
    running: Mutex<Option<(JoinHandle<()>, UnixListener)>>,
}

impl Agent {
    /// The socket the agent listens on.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    /// Stops the agent, aborts a checkpoint it left pending, and removes its socket and
    /// folder. Calling it again does nothing.
    pub fn stop(&self) {
        let Some((thread, control)) = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        else {
            return;
        };
        self.inner.stopping.store(true, Ordering::SeqCst);
        // Shutting a listening socket down makes a blocked accept() return (EINVAL) on Linux.
        let _ = nix::sys::socket::shutdown(control.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = thread.join();
        drop(control);
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
            .field("socket", &self.inner.socket)
            .finish()
    }
}
