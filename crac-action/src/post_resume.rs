//! post-resume: the restored tree runs again; every agent in it runs its `after_restore` hooks
//! with reason `restored`, parents first, and this step returns when all are done.
//!
//! CRIU has already let the tasks go when it runs this step, so application threads run while
//! the hooks are being triggered; critical sections (crac-core) hold application work off
//! until the hooks are done.

use std::io::Write;

use crac_agent::protocol::Request;
use crac_core::RestoreReason;

use crate::agents::{self, ask, describe_hooks, describe_no_answer, log, Deadline, Outcome};
use crate::criu::Invocation;
use crate::error::ActionError;
use crate::settings::Settings;

const STEP: &str = "post-resume";

/// Runs the step.
///
/// # Errors
///
/// When an agent's hooks failed or it did not answer in time (CRIU only logs this step's exit
/// code: the restore has happened either way).
pub fn run(inv: &Invocation, settings: &Settings, out: &mut dyn Write) -> Result<(), ActionError> {
    let init = inv.init_pid.ok_or(ActionError::NoInitPid(STEP))?;
    let agents = agents::in_tree(init);
    if agents.is_empty() {
        return crate::no_agent(STEP, init, settings, out);
    }
    let deadline = Deadline::after(settings.timeout);
    let request = Request::after_restore(RestoreReason::Restored, None);
    let mut failures = Vec::new();
    for pid in agents {
        match ask(pid, &request, &deadline) {
            Outcome::Done(reply) => log(
                out,
                STEP,
                &format!(
                    "pid {pid}: after_restore (restored) ok, {}",
                    describe_hooks(&reply)
                ),
            ),
            Outcome::Refused(reply) => failures.push(format!(
                "pid {pid}: {}",
                reply.error.as_deref().unwrap_or("refused without a reason")
            )),
            Outcome::NoAgent => log(
                out,
                STEP,
                &format!("pid {pid}: stale socket, no agent; skipped"),
            ),
            Outcome::NoAnswer(err) => failures.push(describe_no_answer(pid, &err)),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(ActionError::AfterRestore(failures.join("; ")))
    }
}
