//! post-dump: the dump succeeded and the tree is frozen. Nothing in it can answer now. Two
//! things are done:
//! - the watcher that pre-dump left is told that an image was made, so a process that keeps
//!   running is told `resumed`, not `aborted`, once CRIU exits (see [`crate::watcher`]);
//! - `crac-agents.json` ([`AGENTS_FILE`]) is written in the images folder: the agents' socket folders, which
//!   belong to the image. CRIU restores each agent's listening socket by binding its path
//!   again, so pre-restore recreates the folders when they are gone (a reboot, or the original
//!   process exited cleanly). For a process with a root of its own (a container) the folder
//!   is recorded as the process sees it; it travels in the container's file system.

use std::io::Write;
use std::path::PathBuf;

use crac_protocol::records::{AgentFolder, AgentFolders, AGENTS_FILE};

use crate::agents::{self, log};
use crate::criu::Invocation;
use crate::error::ActionError;
use crate::tree::ProcessId;
use crate::watcher;

const STEP: &str = "post-dump";

/// Runs the step.
///
/// # Errors
///
/// When CRIU gave no root PID. Everything else is only logged: failing post-dump would fail a
/// dump that succeeded.
pub fn run(inv: &Invocation, out: &mut dyn Write) -> Result<(), ActionError> {
    let init = inv.init_pid.ok_or(ActionError::NoInitPid(STEP))?;
    // Walked once: this step runs while the tree is frozen.
    let found = agents::in_tree(init);
    for refusal in &found.refused {
        log(out, STEP, &refusal.to_string());
    }
    if found.agents.is_empty() {
        return Ok(());
    }
    match inv.criu().map(ProcessId::of) {
        Ok(Some(criu)) => {
            if let Err(err) = watcher::tell_dumped(criu) {
                log(
                    out,
                    STEP,
                    &format!(
                        "cannot tell the watcher that the image was made ({err}); a process that keeps running will be told \"aborted\" instead of \"resumed\""
                    ),
                );
            }
        }
        Ok(None) => log(out, STEP, "CRIU is gone; no watcher to tell"),
        Err(err) => log(out, STEP, &err.to_string()),
    }
    let dir = match &inv.image_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    };
    let record = AgentFolders {
        format: 1,
        agents: found
            .agents
            .iter()
            .map(|agent| {
                let (uid, gid) = agent.owner();
                AgentFolder {
                    pid: agent.pid(),
                    ns_pid: Some(agent.ns_pid()),
                    dir: agent.dir().to_owned(),
                    in_own_root: agent.in_own_root(),
                    uid,
                    gid,
                    agent_dir_env: agent.agent_dir_env().map(ToOwned::to_owned),
                    runtime_dir: agent.runtime_dir().map(ToOwned::to_owned),
                }
            })
            .collect(),
    };
    // Private, and never through a link planted where it goes.
    if let Err(err) = crac_fs::write_atomic(
        &dir.join(AGENTS_FILE),
        &serde_json::to_vec_pretty(&record).expect("serialises"),
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
    Ok(())
}

/// Removes the agent folders that post-dump recorded in `images` whose process `is_gone`
/// (killed by the dump: a killed agent cannot remove its folder, and a restore makes it again).
/// Only a folder that is still what was recorded is removed: a real folder (not a link) of the
/// recorded uid, on this side (not inside a container's root).
pub fn remove_dead_folders(images: &std::path::Path, is_gone: impl Fn(u32) -> bool) {
    use std::os::unix::fs::MetadataExt;
    let Ok(Some(record)) = AgentFolders::read(images) else {
        return;
    };
    for agent in record
        .agents
        .iter()
        .filter(|a| !a.in_own_root && is_gone(a.pid))
    {
        let recorded = std::fs::symlink_metadata(&agent.dir)
            .is_ok_and(|meta| meta.is_dir() && meta.uid() == agent.uid);
        if recorded {
            let _ = std::fs::remove_dir_all(&agent.dir);
        }
    }
}
