//! pre-restore: recreate the agents' socket folders the image needs.
//!
//! CRIU restores an agent's listening socket by binding its path again, which fails ("unix:
//! Can't bind ... No such file or directory") when the folder is gone: after a reboot, or
//! when the original process exited cleanly and removed it. post-dump recorded the folders in
//! the image ([`AGENTS_FILE`]); this step puts back the missing ones, with their owner and
//! mode 0700, and the shared base folder (mode 1777) if it is missing too. CRIU gives no PID
//! yet at this step, which is why the list comes from the image.
//!
//! A process that had a root of its own (a container) had its folder inside that root, which
//! CRIU names to no action script at this step: those folders are left alone (one log line),
//! and travel in the container's file system, which the container runtime restores.

use std::fs::{self, DirBuilder};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::agents::log;
use crate::criu::Invocation;
use crate::error::ActionError;
use crate::post_dump::{AgentFolders, AGENTS_FILE};

const STEP: &str = "pre-restore";

/// Runs the step.
///
/// # Errors
///
/// When a folder cannot be made (the restore would fail anyway, later and less clearly).
pub fn run(inv: &Invocation, out: &mut dyn Write) -> Result<(), ActionError> {
    let Some(images) = &inv.image_dir else {
        return Ok(());
    };
    let record: AgentFolders = match fs::read(images.join(AGENTS_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            ActionError::Restore(format!("{AGENTS_FILE} in the image is corrupt: {e}"))
        })?,
        // Not an image with agents (or made without crac-action): nothing to prepare.
        Err(_) => return Ok(()),
    };
    let (inside, here): (Vec<_>, Vec<_>) = record.agents.iter().partition(|a| a.in_own_root);
    if !inside.is_empty() {
        let folders: Vec<String> = inside
            .iter()
            .map(|a| format!("{} (pid {})", a.dir.display(), a.pid))
            .collect();
        log(
            out,
            STEP,
            &format!(
                "{} inside the root of a container, which CRIU does not name at this step: not checked here (the container's file system brings {})",
                folders.join(", "),
                if inside.len() == 1 { "it" } else { "them" }
            ),
        );
    }
    for agent in here {
        if agent.dir.is_dir() {
            continue;
        }
        recreate(&agent.dir, agent.uid, agent.gid).map_err(|e| {
            ActionError::Restore(format!(
                "cannot recreate the agent folder {} for pid {}: {e}",
                agent.dir.display(),
                agent.pid
            ))
        })?;
        log(
            out,
            STEP,
            &format!(
                "recreated the agent folder {} for pid {}",
                agent.dir.display(),
                agent.pid
            ),
        );
    }
    Ok(())
}

fn recreate(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    if let Some(base) = dir.parent() {
        if !base.is_dir() {
            fs::create_dir_all(base)?;
            fs::set_permissions(base, fs::Permissions::from_mode(0o1777))?;
        }
    }
    DirBuilder::new().mode(0o700).create(dir)?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
}
