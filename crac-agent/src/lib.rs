//! The in-process CRaC agent: lets CRIU's action script drive a service's checkpoint hooks.
//!
//! A service calls [`start`] once. The agent listens on a Unix socket whose path follows from
//! the process's PID and user ([`crac_protocol::location`] says which base folder and why),
//! in a folder only the process's uid (and root) can enter. When an operator runs `criu dump --action-script crac-action`, `crac-action`
//! connects at pre-dump and asks for `before-checkpoint`: the agent runs every
//! `before_checkpoint` hook of the [global](crac_core::Coordinator::global) coordinator and
//! replies only when they are done (or refused, after rolling back). After a restore it asks
//! for `after-restore` with the reason. The wire format, the client and every other contract
//! between crac-rs's parts are in [`crac_protocol`]; this crate is what a service uses.
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
//! - [`crac_protocol::wire`]: the line-based JSON requests and replies it serves, with a
//!   version field and reply codes; [`crac_protocol::client`] is the other end, as used by
//!   `crac-action` and `crac`.
//! - [`Policy`]: the service's descriptor policy (`CRAC_POLICY`, or
//!   [`Builder::fd_policy`]), whose `close` rules the agent carries out.
//! - Peer check: only root and the process's own uid are served (`SO_PEERCRED`).
//! - [`upgrade`]: sharing listening sockets with a successor (`crac upgrade`), taking them as
//!   the successor (the systemd convention, `LISTEN_FDS`), saying it is ready (`READY=1`);
//!   the agent's `listeners` and `retire` ops serve them.
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
mod descriptor_owners;
mod error;
mod fd_facts;
mod fd_policy;
mod handler;
mod location;
mod peer;
mod procfs;
mod self_checkpoint;
mod server;
mod tcp;
pub mod upgrade;

/// Unit tests that open or close descriptors take turns: some watch which numbers a hook
/// opened, and a number another test's thread took or freed meanwhile fools them.
#[cfg(test)]
pub(crate) fn descriptor_table_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub use agent::{start, Agent, Builder, SOCKET_CHECK};
pub use crac_protocol::fd_policy::{Policy, PolicyError};
pub use error::StartError;
pub use self_checkpoint::{
    checkpoint_self, SelfCheckpoint, SelfCheckpointError, CHECKPOINT_TO_ENV, CRAC_BIN_ENV,
};

/// Not part of the API: the descriptor facts as this agent finds them in its own process,
/// for crac-action's tests, which hold its reading from outside against the agent's.
#[doc(hidden)]
pub mod facts_for_tests {
    pub use crac_protocol::fd_facts::*;

    /// Every descriptor of this process but those in `skip`, as the agent tells them.
    pub fn gather(skip: &[std::os::fd::RawFd], ask: Ask) -> Facts {
        crate::fd_facts::gather(skip, ask)
    }
}
