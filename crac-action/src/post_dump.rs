//! post-dump: the dump succeeded and the tree is frozen. Nothing in it can answer now; leave a
//! marker in the images folder so the watcher knows, once CRIU exits, that an image was made
//! (a still-running tree was then resumed, not aborted).

use std::io::Write;
use std::path::PathBuf;

use crate::agents::{self, log};
use crate::criu::Invocation;
use crate::error::ActionError;

const STEP: &str = "post-dump";

/// The marker's file name in the images folder. It holds the PID of the CRIU that made the
/// image, so a marker left by another dump into the same folder is not mistaken for this one.
pub const MARKER: &str = ".crac-post-dump";

/// Runs the step.
///
/// # Errors
///
/// When CRIU gave no root PID. Failing to write the marker is only logged: failing post-dump
/// would fail a dump that succeeded.
pub fn run(inv: &Invocation, out: &mut dyn Write) -> Result<(), ActionError> {
    let init = inv.init_pid.ok_or(ActionError::NoInitPid(STEP))?;
    if agents::in_tree(init).is_empty() {
        return Ok(());
    }
    let dir = match &inv.image_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    };
    let criu_pid = std::os::unix::process::parent_id();
    if let Err(err) = std::fs::write(dir.join(MARKER), format!("{criu_pid}\n")) {
        log(
            out,
            STEP,
            &format!(
                "cannot leave the dump marker in {}: {err}; a --leave-running tree will be told \"aborted\" instead of \"resumed\"",
                dir.display()
            ),
        );
    }
    Ok(())
}
