//! The in-process CRaC agent: lets CRIU's action script drive a service's checkpoint hooks.
//!
//! A service calls [`start`] once. The agent listens on a Unix socket whose path follows from
//! the process's PID and user ([`socket_path`]; [`base_dir`] says which base folder and why),
//! in a folder only the process's uid (and root) can enter. When an operator runs `criu dump --action-script crac-action`, `crac-action`
//! connects at pre-dump and asks for `before-checkpoint`: the agent runs every
//! `before_checkpoint` hook of the [global](crac_core::Coordinator::global) coordinator and
//! replies only when they are done (or refused, after rolling back). After a restore it asks
//! for `after-restore` with the reason. The wire format is in [`protocol`].
//!
//! # Anatomy
//!
//! - [`start`], [`Builder`], [`Agent`]: the agent's thread, an event loop that sleeps while
//!   idle (it wakes once a minute to see that its socket is still there, and makes it again if
//!   a /tmp cleaner removed it). It serves several connections at once, a slow client holding
//!   only its own, handles their requests one at a time, and closes each connection after its
//!   reply, so that no connection to the outside exists when CRIU freezes the process.
//! - A checkpoint cannot stay pending for good: a before-checkpoint has a lease, after which
//!   the agent ends the cycle itself if nobody did (time frozen by a dump does not count); one
//!   whose client already left is not run at all.
//! - [`protocol`]: the line-based JSON requests and replies, with a version field and reply
//!   codes.
//! - [`client`]: the other end, as used by `crac-action` and `crac`.
//! - Peer check: only root and the process's own uid are served (`SO_PEERCRED`).
//! - [`SelfCheckpoint`]: the process checkpoints itself (through the `crac` command, which
//!   runs CRIU from outside the process's tree).
//! - Cleanup: the socket and its folder are removed at normal exit and when SIGTERM/SIGINT end
//!   the process, keeping the application's own handling of those signals: a service that
//!   handles SIGTERM and drains keeps its agent until it exits. A socket left by a dead process
//!   with the same PID is replaced.
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
//! # Containers
//!
//! The pid and the folder in the path are the process's own view: in a container that is
//! `/run/crac/1/agent.sock` (or `/tmp/crac/1/agent.sock` when the container's /run is not
//! writable) inside the container's root. crac-action finds it from outside (the process's
//! `NSpid`, root, `CRAC_AGENT_DIR` and listening socket), and this agent needs nothing else.
//! Being pid 1 there changes one thing: a SIGTERM left at its default does not end pid 1 of a
//! namespace, so the agent does not remove its socket for it.
//!
//! # Limitations
//!
//! A process in a user namespace of its own cannot be served: root outside the namespace
//! connects as an unmapped uid, which the peer check refuses (crac-action says so first).
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

mod agent;
mod cleanup;
pub mod client;
mod descriptor_owners;
pub mod fd_facts;
pub mod fd_policy;
mod handler;
mod location;
mod peer;
pub mod protocol;
mod self_checkpoint;
mod server;
mod tcp;

/// Unit tests that open or close descriptors take turns: some watch which numbers a hook
/// opened, and a number another test's thread took or freed meanwhile fools them.
#[cfg(test)]
pub(crate) fn descriptor_table_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub use agent::{start, Agent, Builder, StartError, SOCKET_CHECK};
pub use descriptor_owners::{Owner, Ownership};
pub use location::{
    agent_dir, base_dir, parse_folder_name, private_base_uid, socket_path, DIR_ENV, FALLBACK_DIR,
    ROOT_DIR, RUNTIME_DIR_ENV, RUNTIME_SUBDIR, SOCKET_NAME,
};
pub use self_checkpoint::{
    checkpoint_self, SelfCheckpoint, SelfCheckpointError, CHECKPOINT_TO_ENV, CRAC_BIN_ENV,
};
