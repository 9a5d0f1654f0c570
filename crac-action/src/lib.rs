//! `crac-action`: the action script CRIU runs at each step of a dump or restore.
//!
//! ```text
//! criu dump    -t PID -D DIR --action-script "$(command -v crac-action)"
//! criu restore        -D DIR --action-script "$(command -v crac-action)" -d
//! ```
//!
//! | step (`CRTOOLS_SCRIPT_ACTION`) | what crac-action does | non-zero exit means |
//! |---|---|---|
//! | `pre-dump` | every agent in the tree runs `before_checkpoint`, children first; blocks until all replied; leaves a [watcher] | CRIU aborts the dump; the tree was rolled back and keeps running |
//! | `post-dump` | leaves a marker for the watcher, and records the agents' socket folders in the image (`crac-agents.json`) | never returned: it would fail a dump that succeeded |
//! | `pre-restore` | recreates those socket folders (CRIU binds the restored sockets there; after a reboot or a clean exit they are gone); a container's are in its own file system | CRIU aborts the restore |
//! | `setup-namespaces` | brings up the loopback interface of a restored network namespace that came back down (runc restores it empty) | never returned: only logged |
//! | `post-resume` | every agent in the restored tree runs `after_restore` (`restored`), parents first; blocks until done | CRIU only logs it |
//! | anything else | nothing; exit 0 (CRIU adds steps between releases) | |
//!
//! Exit code 2 means the environment was not a CRIU action-script environment or a `CRAC_*`
//! setting was malformed. Every wait is bounded ([`settings`]), because CRIU waits for the
//! script forever. A tree with no agent is logged and passed (exit 0) unless
//! `CRAC_REQUIRE_AGENT=1`.
//!
//! The modules follow CRIU's steps: [`criu`] reads the environment, [`pre_dump`],
//! [`post_dump`], [`pre_restore`], [`setup_namespaces`], [`post_resume`] and [`watcher`] are
//! the steps, [`agents`] and [`tree`] find the agents of a process tree, [`agent_socket`]
//! finds and checks an agent's socket wherever its process runs (a container's own pid and
//! mount namespaces, and what is refused there), [`netns`] enters a process's network
//! namespace, [`freezer`] thaws a tree its runtime froze before the dump, [`preflight`] says
//! what CRIU would refuse, and [`procfs`] is everything read from `/proc`.
//!
//! CRIU is known by `CRTOOLS_IMAGE_DIR` (`/proc/<criu>/fd/N`), never as the parent process, so
//! the script may be wrapped; and every step is safe to run twice for one CRIU (CRIU 4.1 under
//! runc runs each action twice): the second pre-dump finds the agents ready for the same cycle
//! and the watcher already started, the second post-resume finds nothing pending.
//!
//! This is one of the four roles of crac-rs: crac-core is the API, crac-agent the in-process
//! agent, crac-action (this crate) CRIU's action script, and crac-cli the operator's `crac`
//! command, which runs CRIU with this script and uses this library to find agents
//! ([`agents`], [`agent_socket`], [`tree`], [`procfs`]) and to read what the script recorded ([`post_dump`],
//! [`pre_dump`]).
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

pub mod agent_socket;
pub mod agents;
pub mod criu;
pub mod error;
pub mod freezer;
pub mod handover;
pub mod netns;
pub mod post_dump;
pub mod post_resume;
pub mod pre_dump;
pub mod pre_restore;
pub mod preflight;
pub mod procfs;
pub mod settings;
pub mod setup_namespaces;
pub mod tree;
pub mod watcher;

use std::io::Write;

pub use error::ActionError;

use crate::criu::{Action, Invocation};
use crate::settings::Settings;

/// Runs the step CRIU asked for.
///
/// # Errors
///
/// See [`ActionError`].
pub fn run(inv: &Invocation, settings: &Settings, out: &mut dyn Write) -> Result<(), ActionError> {
    match &inv.action {
        Action::PreDump => pre_dump::run(inv, settings, out),
        Action::PostDump => post_dump::run(inv, out),
        Action::PreRestore => pre_restore::run(inv, out),
        Action::SetupNamespaces => setup_namespaces::run(inv, out),
        Action::PostResume => post_resume::run(inv, settings, out),
        Action::Other(_) => Ok(()),
    }
}

/// A tree without any agent: a log line, or an error when agents are required.
pub(crate) fn no_agent(
    step: &str,
    pid: u32,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), ActionError> {
    let socket = agent_socket::expected_socket(pid);
    if settings.require_agent {
        return Err(ActionError::NoAgent { pid, socket });
    }
    agents::log(
        out,
        step,
        &format!("no agent in the process tree of pid {pid} (no socket at {socket}); nothing to coordinate"),
    );
    Ok(())
}
