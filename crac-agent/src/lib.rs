//! The in-process CRaC agent: lets CRIU's action script drive a service's checkpoint hooks.
//!
//! A service calls [`start`] once. The agent listens on a Unix socket whose path follows from
//! the process's PID alone ([`socket_path`]), in a folder only the process's uid (and root)
//! can enter. When an operator runs `criu dump --action-script crac-action`, `crac-action`
//! connects at pre-dump and asks for `before-checkpoint`: the agent runs every
//! `before_checkpoint` hook of the [global](crac_core::Coordinator::global) coordinator and
//! replies only when they are done (or refused, after rolling back). After a restore it asks
//! for `after-restore` with the reason. The wire format is in [`protocol`].
//!
//! # Anatomy
//!
//! - [`start`], [`Builder`], [`Agent`]: the agent's thread, which blocks in `accept` while
//!   idle (no polling) and serves one connection at a time, closing each after its reply so
//!   that no connection to the outside exists when CRIU freezes the process.
//! - [`protocol`]: the line-based JSON requests and replies, with a version field.
//! - [`client`]: the other end, as used by `crac-action` and `crac`.
//! - Peer check: only root and the process's own uid are served (`SO_PEERCRED`).
//! - [`SelfCheckpoint`]: the process checkpoints itself (through the `crac` command, which
//!   runs CRIU from outside the process's tree).
//! - Cleanup: the socket and its folder are removed at normal exit and when SIGTERM/SIGINT end
//!   the process, keeping the application's own handling of those signals. A socket left by a
//!   dead process with the same PID is replaced.
//!
//! # Example
//!
//! ```no_run
//! use crac_core::{from_fns, global_context};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     global_context()
//!         .register(from_fns("upstream", |_| Ok(()), |_| Ok(())))
//!         .keep();
//!     let agent = crac_agent::start()?;
//!     eprintln!("checkpointable: criu dump -t {} --action-script crac-action", std::process::id());
//!     # let _ = agent;
//!     Ok(())
//! }
//! ```
//!
//! # Limitations
//!
//! The PID in the path is the process's PID as it sees it. A service in its own PID namespace
//! (a container) must be reached through its namespace's view; container runtimes come later.
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

mod agent;
mod cleanup;
pub mod client;
mod location;
mod peer;
pub mod protocol;
mod self_checkpoint;
mod server;
mod tcp;

pub use agent::{start, Agent, Builder, StartError};
pub use location::{agent_dir, base_dir, socket_path, DEFAULT_DIR, DIR_ENV, SOCKET_NAME};
pub use self_checkpoint::{
    checkpoint_self, SelfCheckpoint, SelfCheckpointError, CHECKPOINT_TO_ENV, CRAC_BIN_ENV,
};
