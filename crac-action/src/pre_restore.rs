//! pre-restore: recreate the agents' socket folders the image needs.
//!
//! CRIU restores an agent's listening socket by binding its path again, which fails ("unix:
//! Can't bind ... No such file or directory") when the folder is gone: after a reboot, or
//! when the original process exited cleanly and removed it. post-dump recorded the folders in
//! the image ([`AGENTS_FILE`]); this step puts back the missing ones, with their owner and
//! mode 0700, and the shared base folder (mode 1777) if it is missing too. CRIU gives no PID
//! yet at this step, which is why the list comes from the image.

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
    for agent in &record.agents {
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
