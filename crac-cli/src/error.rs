//! The operator's error type: what failed, in one line with the lines that explain it, and
//! the kind of failure, which decides `crac`'s exit code (a contract: scripts and `crac run`
//! act on it). Also how an I/O error reads in a message (`why`).

use std::io;

use serde::Serialize;

/// How an operation failed, which decides the `crac` exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The operation ran and failed (CRIU failed, a hook failed): exit code 1.
    Failed,
    /// The input was wrong (unknown PID, missing or invalid image): exit code 2.
    BadInput,
    /// Checkpoint/restore is not possible here (no CRIU, no privileges, store not writable):
    /// exit code 3.
    Unavailable,
    /// A checkpoint's image was made (the service stopped, unless `--leave-running`) but could
    /// not be finished or filed in the store: it is kept where it is, and the message says how
    /// to restore it: exit code 4.
    ImageKept,
    /// A restore brought the service back, but an after_restore hook failed or timed out (the
    /// message names the resource; see
    /// [`RestoreOutcome::hook_failures`](crate::restore::RestoreOutcome::hook_failures)):
    /// exit code 5.
    HooksFailed,
}

impl FailureKind {
    /// The `crac` exit code for this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Failed => 1,
            FailureKind::BadInput => 2,
            FailureKind::Unavailable => 3,
            FailureKind::ImageKept => 4,
            FailureKind::HooksFailed => 5,
        }
    }
}

/// A failed operation: one line, and the details that explain it (CRIU's error lines,
/// crac-action's lines, hints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// Which kind of failure.
    pub kind: FailureKind,
    /// One line saying what went wrong and what to do.
    pub message: String,
    /// Supporting lines.
    pub details: Vec<String>,
}

impl OpError {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub(crate) fn with_details(mut self, details: Vec<String>) -> OpError {
        self.details = details;
        self
    }
}

/// The short text of an I/O error: `Permission denied` rather than
/// `Permission denied (os error 13)`.
pub(crate) fn why(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => err.to_string(),
    }
}
