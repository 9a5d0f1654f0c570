//! post-dump: the dump succeeded and the tree is frozen. Nothing in it can answer now. Two
//! things are written:
//! - a marker in each agent's folder, so the watcher knows once CRIU exits that an image was
//!   made (a still-running process was then resumed, not aborted); the watcher removes it.
//!   It is not put in the images folder, which a tool may rename as soon as CRIU exits;
//! - `crac-agents.json` in the images folder, the agents' socket folders, which belong to the
//!   image: CRIU restores each agent's listening socket by binding its path again, so
//!   pre-restore recreates the folders when they are gone (a reboot, or the original process
//!   exited cleanly).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::agents::{self, log};
use crate::criu::Invocation;
use crate::error::ActionError;

const STEP: &str = "post-dump";

/// The file in the images folder that lists the agents' socket folders.
pub const AGENTS_FILE: &str = "crac-agents.json";

/// The contents of [`AGENTS_FILE`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFolders {
    /// Format version (1).
    pub format: u32,
    /// One entry per agent in the dumped tree.
    pub agents: Vec<AgentFolder>,
}

/// One agent's socket folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFolder {
    /// The process.
    pub pid: u32,
    /// Its folder (absolute).
    pub dir: PathBuf,
    /// The folder's owner.
    pub uid: u32,
    /// The folder's group.
    pub gid: u32,
}

/// The marker post-dump leaves in the folder of agent `pid` for the CRIU process `criu_pid`.
/// Named after the CRIU process, so that a marker of another dump is never mistaken for this
/// one's.
pub fn marker_path(pid: u32, criu_pid: u32) -> PathBuf {
    crac_agent::agent_dir(pid).join(format!("post-dump.{criu_pid}"))
}

/// Runs the step.
///
/// # Errors
///
/// When CRIU gave no root PID. Failing to write the marker is only logged: failing post-dump
/// would fail a dump that succeeded.
pub fn run(inv: &Invocation, out: &mut dyn Write) -> Result<(), ActionError> {
    let init = inv.init_pid.ok_or(ActionError::NoInitPid(STEP))?;
    // Walked once: this step runs while the tree is frozen.
    let agents = agents::in_tree(init);
    if agents.is_empty() {
        return Ok(());
    }
    let dir = match &inv.image_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    };
    let criu_pid = std::os::unix::process::parent_id();
    let folders: Vec<AgentFolder> = agents
        .into_iter()
        .filter_map(|pid| {
            let dir = crac_agent::agent_dir(pid);
            let meta = std::fs::metadata(&dir).ok()?;
            Some(AgentFolder {
                pid,
                dir,
                uid: meta.uid(),
                gid: meta.gid(),
            })
        })
        .collect();
    let record = AgentFolders {
        format: 1,
        agents: folders,
    };
    if let Err(err) = std::fs::write(
        dir.join(AGENTS_FILE),
        serde_json::to_vec_pretty(&record).expect("serialises"),
    ) {
        log(
            out,
            STEP,
            &format!(
                "cannot record the agents' socket folders in {}: {err}; a restore needs them to exist",
                dir.display()
            ),
        );
    }
    for agent in &record.agents {
        if let Err(err) = std::fs::write(marker_path(agent.pid, criu_pid), b"") {
            log(
                out,
                STEP,
                &format!(
                    "cannot leave the dump marker for pid {}: {err}; if it keeps running it will be told \"aborted\" instead of \"resumed\"",
                    agent.pid
                ),
            );
        }
    }
    Ok(())
}
