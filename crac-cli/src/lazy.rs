//! Lazy restore: the restored tree starts running before its memory has arrived, and CRIU's
//! page server (`criu lazy-pages`) hands it each page when it is first touched (userfaultfd),
//! then the rest in the background, and exits once every page is in.
//!
//! So the time to a restored service's first answer stops growing with its memory. The price
//! is a dependency: until the server has exited, the tree's missing pages exist only in the
//! server. If the server dies early, the kernel would satisfy the missing pages with zeroes
//! and the service would run on with silently wrong memory; so [`PageServer::wait`] kills the
//! tree then, and says so.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::criu::CriuCommand;
use crate::error::{FailureKind, OpError};

/// Where CRIU's page server listens, in its work folder (the image folder).
const SOCKET: &str = "lazy-pages.socket";
/// Its log, in the image folder.
pub const LOG: &str = "lazy-pages.log";
/// How long the server may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A running `criu lazy-pages` serving one restore's memory.
#[derive(Debug)]
pub struct PageServer {
    child: Child,
    dir: PathBuf,
    started: Instant,
}

impl PageServer {
    /// Starts CRIU's page server for the image in `dir`, and waits until it listens. The
    /// pages come from the image folder, or over `remote` (a connected socket to a post-copy
    /// migration's source).
    ///
    /// # Errors
    ///
    /// When it cannot be started or exits before it listens, with the end of its log.
    pub(crate) fn start(
        criu: &Path,
        dir: &Path,
        remote: Option<OwnedFd>,
    ) -> Result<PageServer, OpError> {
        let socket = dir.join(SOCKET);
        // A socket left by an earlier lazy restore of this image would look like a live one.
        let _ = fs::remove_file(&socket);
        let mut cmd = CriuCommand::lazy_pages(criu, dir, LOG);
        if let Some(remote) = remote {
            cmd = cmd.pages_from(remote);
        }
        let child = cmd.command().spawn().map_err(|e| {
            OpError::new(
                FailureKind::Unavailable,
                format!("cannot run {} lazy-pages: {e}", criu.display()),
            )
        })?;
        let mut server = PageServer {
            child,
            dir: dir.to_owned(),
            started: Instant::now(),
        };
        while !socket.exists() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(server.failed(&format!(
                    "CRIU's page server exited ({status}) before it listened"
                )));
            }
            if server.started.elapsed() > START_LIMIT {
                server.stop();
                return Err(OpError::new(
                    FailureKind::Failed,
                    format!(
                        "CRIU's page server did not listen within {}s",
                        START_LIMIT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(server)
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server (the restore that needed it failed).
    pub(crate) fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until every page has reached the tree restored as `root`, and returns how long
    /// that took from the server's start. If the server fails instead, the tree is killed
    /// (its memory is incomplete) and the error says so.
    ///
    /// # Errors
    ///
    /// When the server exits with a failure or is killed; the tree under `root` is gone then.
    pub fn wait(mut self, root: u32) -> Result<Duration, OpError> {
        let status = self.child.wait().map_err(|e| {
            OpError::new(
                FailureKind::Failed,
                format!("cannot wait for CRIU's page server: {e}"),
            )
        })?;
        self.ended(
            status
                .success()
                .then_some(())
                .ok_or_else(|| describe(status)),
            root,
        )
    }

    /// The server was reaped by the caller (a subreaper reaping every child), `status` being
    /// how it ended: as [`wait`](Self::wait) from there.
    ///
    /// # Errors
    ///
    /// As [`wait`](Self::wait).
    pub fn reaped(self, status: WaitStatus, root: u32) -> Result<Duration, OpError> {
        let how = match status {
            WaitStatus::Exited(_, 0) => Ok(()),
            WaitStatus::Exited(_, code) => Err(format!("exited with code {code}")),
            WaitStatus::Signaled(_, signal, _) => Err(format!("was killed by {signal}")),
            other => Err(format!("stopped ({other:?})")),
        };
        self.ended(how, root)
    }

    fn ended(self, how: Result<(), String>, root: u32) -> Result<Duration, OpError> {
        match how {
            Ok(()) => Ok(self.started.elapsed()),
            Err(how) => {
                let killed = kill_tree(root);
                Err(self.failed(&format!(
                    "CRIU's page server {how} before every page of the restored tree had \
                     arrived; {killed}"
                )))
            }
        }
    }

    fn failed(&self, what: &str) -> OpError {
        let log = fs::read_to_string(self.dir.join(LOG)).unwrap_or_default();
        let details: Vec<String> = log
            .lines()
            .filter(|l| l.contains("Error"))
            .rev()
            .take(5)
            .map(str::to_owned)
            .collect();
        OpError::new(FailureKind::Failed, what.to_owned()).with_details(details)
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!(
            "was killed by {}",
            Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.to_string())
        ),
        _ => "stopped".to_owned(),
    }
}

/// Kills the tree under `root`, children first; says what was done.
fn kill_tree(root: u32) -> String {
    let pids: Vec<u32> = crac_action::tree::descendants(root)
        .into_iter()
        .filter(|&pid| crac_action::tree::state_of(pid).is_some_and(|s| s != 'Z'))
        .collect();
    if pids.is_empty() {
        // Most likely of a page that never came (SIGBUS): no agent could remove its folder.
        if crac_action::tree::state_of(root).is_none_or(|s| s == 'Z') {
            let _ = fs::remove_dir_all(crac_protocol::location::agent_dir(root));
        }
        return format!("the restored tree (pid {root}) had already exited");
    }
    for &pid in pids.iter().rev() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        // A killed agent cannot remove its socket's folder: nothing else will.
        let _ = fs::remove_dir_all(crac_protocol::location::agent_dir(pid));
    }
    format!(
        "the restored tree (pid {root}, {} process{}) was killed rather than left to run on \
         with memory that never arrived",
        pids.len(),
        if pids.len() == 1 { "" } else { "es" }
    )
}
