//! Why the agent could not start: [`StartError`].

use std::io;
use std::path::{Path, PathBuf};

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
        crac_protocol::env::AGENT_DIR
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
    /// The descriptor policy (`CRAC_POLICY`) cannot be read or does not parse.
    #[error("{}: {}", crac_protocol::env::POLICY, .0)]
    Policy(#[from] crac_protocol::fd_policy::PolicyError),
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
