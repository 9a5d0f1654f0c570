//! post-resume: the restored tree runs again; every agent in it runs its `after_restore` hooks
//! with reason `restored`, parents first, and this step returns when all are done.
//!
//! CRIU has already let the tasks go when it runs this step, so application threads run while
//! the hooks are being triggered; critical sections (crac-core) hold application work off
//! until the hooks are done.

use std::collections::BTreeMap;
use std::io::Write;

use crac_protocol::records::{decode_restore_env, RESTORE_ENV};
use crac_protocol::wire::{Code, Reason, Request};

use crate::agents::{self, ask, describe_hooks, describe_no_answer, log, Deadline, Outcome};
use crate::criu::Invocation;
use crate::error::ActionError;
use crate::settings::Settings;

const STEP: &str = "post-resume";

/// The settings [`RESTORE_ENV`] holds, if any.
fn restore_env() -> Result<BTreeMap<String, String>, String> {
    match std::env::var(RESTORE_ENV) {
        Err(_) => Ok(BTreeMap::new()),
        Ok(json) => decode_restore_env(&json),
    }
}

/// Runs the step.
///
/// # Errors
///
/// When an agent's hooks failed or it did not answer in time (CRIU only logs this step's exit
/// code: the restore has happened either way).
pub fn run(inv: &Invocation, settings: &Settings, out: &mut dyn Write) -> Result<(), ActionError> {
    let init = inv.init_pid.ok_or(ActionError::NoInitPid(STEP))?;
    let found = agents::in_tree(init);
    let mut failures: Vec<String> = found.refused.iter().map(ToString::to_string).collect();
    if found.agents.is_empty() && failures.is_empty() {
        return crate::no_agent(STEP, init, settings, out);
    }
    let deadline = Deadline::after(settings.timeout);
    // Bad settings are reported, and the hooks run all the same: the tree must come back up.
    let env = restore_env().unwrap_or_else(|err| {
        failures.push(err);
        BTreeMap::new()
    });
    let request = Request::after_restore(Reason::Restored, None).with_env(env);
    for agent in &found.agents {
        let pid = agent.pid();
        match ask(agent, &request, &deadline) {
            Outcome::Done(reply) => log(
                out,
                STEP,
                &format!(
                    "pid {pid}: after_restore (restored) ok, {}",
                    describe_hooks(&reply)
                ),
            ),
            // Told already: this step ran before for the same restore (CRIU 4.1 under runc).
            Outcome::Refused(reply) if reply.code == Some(Code::NotCheckpointing) => log(
                out,
                STEP,
                &format!("pid {pid}: no checkpoint pending, already came back up"),
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
            Outcome::Untrusted(err) => failures.push(err.to_string()),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(ActionError::AfterRestore(failures.join("; ")))
    }
}
