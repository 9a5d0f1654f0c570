//! A process checkpointing itself: CRaC's `Core.checkpointRestore()`.
//!
//! CRIU cannot dump a tree it is part of, so the process asks the `crac` command to do it
//! from outside: `crac checkpoint PID --self` starts a detached worker and exits; the worker
//! waits until it has been re-parented away from this process, then runs `criu dump` with
//! crac-action, which asks this process's agent to run the before_checkpoint hooks, as for any
//! other checkpoint. The calling thread meanwhile waits on a pipe to the worker:
//! - after a `--leave-running` dump the worker reports "dumped", the agent is told
//!   after_restore "resumed", and [`SelfCheckpoint::run`] returns [`RestoreReason::Resumed`];
//! - in a process restored from the image, the pipe's far end is gone (CRIU restores a pipe to
//!   the outside as one with no writer): the thread sees the end of the pipe, waits for
//!   crac-action's post-resume to run the after_restore hooks (or runs them itself after a
//!   grace period, when the image was restored without crac-action), and returns
//!   [`RestoreReason::Restored`];
//! - when the dump fails, the hooks have been rolled back and the error says why.
//!
//! A dump that stops the process (the default) never returns here in the original process:
//! its life goes on in the restored copies.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crac_core::{Coordinator, RestoreReason};

use crac_protocol::wire::{Reason, Request};

/// Where a self-checkpoint goes when the caller does not say: an image name in the store, or
/// a folder (a path containing `/`). Like CRaC's `-XX:CRaCCheckpointTo`.
pub const CHECKPOINT_TO_ENV: &str = crac_protocol::env::CHECKPOINT_TO;

/// The `crac` binary to use (default: `crac` beside this executable, then on `PATH`).
pub const CRAC_BIN_ENV: &str = crac_protocol::env::BIN;

/// Why a self-checkpoint did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SelfCheckpointError {
    /// The agent is not running in this process: nobody could run the hooks.
    #[error("no agent runs in this process: call crac_agent::start() before checkpointing")]
    NoAgent,
    /// No destination was given.
    #[error("no destination for the checkpoint: call .to(NAME or DIR) or set {CHECKPOINT_TO_ENV}")]
    NoDestination,
    /// Called from inside a hook: the checkpoint would run this process's hooks, and wait for
    /// the very hook that asked for it.
    #[error("called from inside a crac hook: a checkpoint runs the hooks, so it cannot be started from one; call it outside hooks")]
    InHook,
    /// The calling thread holds a critical section, which the checkpoint would wait for.
    #[error("this thread holds a crac critical section, which the checkpoint would wait for: drop it first")]
    InCriticalSection,
    /// The `crac` command was not found.
    #[error("the crac command was not found (looked at {CRAC_BIN_ENV}, beside this executable and on PATH): install it, or set {CRAC_BIN_ENV}")]
    CracNotFound,
    /// `crac` could not be started.
    #[error("cannot start {path}: {source}")]
    Start {
        /// The crac binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint failed; the process runs on and its hooks were rolled back.
    #[error("checkpoint failed: {0}")]
    Failed(String),
}

/// Options for a self-checkpoint; see the module documentation.
///
/// ```no_run
/// use crac_agent::SelfCheckpoint;
/// use crac_core::RestoreReason;
///
/// let _agent = crac_agent::start()?;
/// // ... warm up ...
/// match SelfCheckpoint::new().to("my-service").leave_running(true).run()? {
///     RestoreReason::Resumed => eprintln!("image taken, still serving"),
///     RestoreReason::Restored => eprintln!("started warm from the image"),
///     _ => {}
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct SelfCheckpoint {
    to: Option<String>,
    leave_running: bool,
    crac: Option<PathBuf>,
    timeout: Duration,
    restore_grace: Duration,
}

impl Default for SelfCheckpoint {
    fn default() -> SelfCheckpoint {
        SelfCheckpoint::new()
    }
}

impl SelfCheckpoint {
    /// Defaults: destination from [`CHECKPOINT_TO_ENV`], the process stops after the dump, 30 s
    /// for the hooks.
    pub fn new() -> SelfCheckpoint {
        SelfCheckpoint {
            to: None,
            leave_running: false,
            crac: None,
            timeout: Duration::from_secs(30),
            restore_grace: Duration::from_secs(10),
        }
    }

    /// An image name in the store, or a folder (a path containing `/`). An existing image of
    /// the same name is replaced: the newest warm state wins.
    pub fn to(mut self, destination: impl Into<String>) -> SelfCheckpoint {
        self.to = Some(destination.into());
        self
    }

    /// Keep running after the dump (`resumed`) instead of stopping.
    pub fn leave_running(mut self, leave_running: bool) -> SelfCheckpoint {
        self.leave_running = leave_running;
        self
    }

    /// The `crac` binary to run.
    pub fn crac_binary(mut self, path: impl Into<PathBuf>) -> SelfCheckpoint {
        self.crac = Some(path.into());
        self
    }

    /// How long the hooks may take before the dump is aborted.
    pub fn timeout(mut self, timeout: Duration) -> SelfCheckpoint {
        self.timeout = timeout;
        self
    }

    /// Checkpoints this process. Returns in the same process with
    /// [`RestoreReason::Resumed`] (leave-running), or in a restored one with
    /// [`RestoreReason::Restored`].
    ///
    /// # Errors
    ///
    /// See [`SelfCheckpointError`]; after [`SelfCheckpointError::Failed`] the process runs on
    /// with its hooks rolled back.
    pub fn run(&self) -> Result<RestoreReason, SelfCheckpointError> {
        let coordinator =
            crate::agent::running_coordinator().ok_or(SelfCheckpointError::NoAgent)?;
        if crac_core::in_hook() {
            return Err(SelfCheckpointError::InHook);
        }
        if crac_core::in_critical_section() {
            return Err(SelfCheckpointError::InCriticalSection);
        }
        let to = self
            .to
            .clone()
            .or_else(|| {
                std::env::var(CHECKPOINT_TO_ENV)
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .ok_or(SelfCheckpointError::NoDestination)?;
        let crac = self
            .crac
            .clone()
            .or_else(find_crac)
            .ok_or(SelfCheckpointError::CracNotFound)?;
        let pid = std::process::id();
        let before = coordinator.last_cycle().map(|c| c.at);

        let mut cmd = Command::new(&crac);
        cmd.arg("checkpoint")
            .arg(pid.to_string())
            .arg("--self")
            .arg("--replace")
            .arg("--timeout")
            .arg(self.timeout.as_secs_f64().to_string());
        if to.contains('/') {
            cmd.arg("--dir").arg(&to);
        } else {
            cmd.arg("--name").arg(&to);
        }
        if self.leave_running {
            cmd.arg("--leave-running");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SelfCheckpointError::Start {
                path: crac.clone(),
                source,
            })?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut stderr = child.stderr.take().expect("stderr is piped");
        // The first crac only checks the request and starts the worker; it exits at once.
        let status = child.wait().map_err(|source| SelfCheckpointError::Start {
            path: crac.clone(),
            source,
        })?;
        if !status.success() {
            let mut message = String::new();
            let _ = stderr.read_to_string(&mut message);
            return Err(SelfCheckpointError::Failed(message.trim().to_owned()));
        }
        drop(stderr);

        let mut line = String::new();
        // Blocks through the dump. In a restored process this pipe has no writer: end of file.
        let read = stdout.read_line(&mut line);
        let report: Option<WorkerReport> = match read {
            Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
            _ => None,
        };
        match report {
            Some(report) if report.outcome == "dumped" => {
                // The watcher crac-action left tells the agent "resumed" once CRIU exits.
                coordinator.wait_idle(Some(self.timeout + self.restore_grace));
                Ok(finished_reason(&coordinator).unwrap_or(RestoreReason::Resumed))
            }
            Some(report) => {
                coordinator.wait_idle(Some(self.timeout));
                Err(SelfCheckpointError::Failed(
                    report.error.unwrap_or_else(|| "no reason given".to_owned()),
                ))
            }
            None => self.after_restore(&coordinator, pid, before),
        }
    }

    /// The pipe ended without a report: this is a restored process (or the worker died).
    fn after_restore(
        &self,
        coordinator: &Coordinator,
        pid: u32,
        before: Option<std::time::SystemTime>,
    ) -> Result<RestoreReason, SelfCheckpointError> {
        if !coordinator.wait_idle(Some(self.restore_grace)) {
            // Restored without crac-action (a plain `criu restore`): run the hooks ourselves,
            // through our own agent so that the cycle ends the one way it always does.
            // Our agent's own socket: the usual path for this pid may not be it.
            let socket = crate::agent::running_socket()
                .unwrap_or_else(|| crac_protocol::location::socket_path(pid));
            let _ = crac_protocol::client::request_at(
                &socket,
                &Request::after_restore(Reason::Restored, None),
                self.timeout,
            );
            coordinator.wait_idle(Some(self.timeout));
        }
        let last = coordinator.last_cycle();
        match last {
            Some(cycle) if Some(cycle.at) != before && cycle.reason != RestoreReason::Aborted => {
                Ok(cycle.reason)
            }
            Some(cycle) if Some(cycle.at) != before => Err(SelfCheckpointError::Failed(
                "the dump was aborted; the hooks were rolled back".to_owned(),
            )),
            _ => Err(SelfCheckpointError::Failed(
                "the checkpoint worker ended without a result".to_owned(),
            )),
        }
    }
}

fn finished_reason(coordinator: &Coordinator) -> Option<RestoreReason> {
    coordinator.last_cycle().map(|c| c.reason)
}

#[derive(serde::Deserialize)]
struct WorkerReport {
    outcome: String,
    error: Option<String>,
}

fn find_crac() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CRAC_BIN_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("crac")))
        .filter(|p| p.is_file());
    beside.or_else(|| {
        let paths = std::env::var_os("PATH")?;
        std::env::split_paths(&paths)
            .map(|dir| dir.join("crac"))
            .find(|p| p.is_file())
    })
}

/// Checkpoints this process with the default options; see [`SelfCheckpoint`].
///
/// # Errors
///
/// See [`SelfCheckpoint::run`].
pub fn checkpoint_self() -> Result<RestoreReason, SelfCheckpointError> {
    SelfCheckpoint::new().run()
}
