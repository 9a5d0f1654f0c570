//! [`ActionError`] and the exit codes it maps to.

use std::io;

use crate::criu::InvocationError;

/// Why a step failed. Printed as one line in CRIU's log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    /// The environment is not what CRIU passes.
    #[error(transparent)]
    Invocation(#[from] InvocationError),
    /// A `CRAC_*` setting is malformed.
    #[error("{0}")]
    Settings(String),
    /// CRIU gave no root PID for a step that needs one.
    #[error("CRIU set no CRTOOLS_INIT_PID for {0}")]
    NoInitPid(&'static str),
    /// No agent in the tree, and `CRAC_REQUIRE_AGENT=1`.
    #[error(
        "no agent in the process tree of pid {pid} (no socket at {socket}); \
         start one in the service with crac_agent::start(), or unset CRAC_REQUIRE_AGENT"
    )]
    NoAgent {
        /// The tree's root.
        pid: u32,
        /// Where its socket would be.
        socket: String,
    },
    /// A before-checkpoint failed or timed out; agents already told were rolled back.
    #[error("{0}; the dump is aborted and the tree keeps running")]
    Refused(String),
    /// An after-restore failed or timed out.
    #[error("after-restore failed: {0}")]
    AfterRestore(String),
    /// Preparing a restore failed.
    #[error("{0}")]
    Restore(String),
    /// The CRIU process named by `CRTOOLS_IMAGE_DIR` does not run.
    #[error("CRIU (pid {0}, named by CRTOOLS_IMAGE_DIR) does not run")]
    NoCriu(u32),
    /// The watcher that ends the cycle after CRIU exits could not be started.
    #[error("cannot start the dump watcher ({0}); agents were rolled back")]
    Watcher(io::Error),
}

impl ActionError {
    /// The exit code: 2 for a malformed environment, 1 for every other failure.
    ///
    /// What CRIU does with it depends on the step: a non-zero pre-dump aborts the dump (the
    /// tree keeps running), a non-zero post-dump fails the dump after the image was written
    /// (CRIU resumes the tree), and post-resume's code is only logged.
    pub fn exit_code(&self) -> i32 {
        match self {
            ActionError::Invocation(_) | ActionError::Settings(_) => 2,
            _ => 1,
        }
    }
}
