//! post-resume: the restored tree runs again; every agent in it runs its `after_restore` hooks
//! with reason `restored`, parents first, and this step returns when all are done.
//!
//! CRIU has already let the tasks go when it runs this step, so application threads run while
//! the hooks are being triggered; critical sections (crac-core) hold application work off
//! until the hooks are done.

use std::collections::BTreeMap;
use std::io::Write;

use crac_agent::protocol::{code, Request, MAX_REQUEST_LEN};
use crac_core::RestoreReason;

use crate::agents::{self, ask, describe_hooks, describe_no_answer, log, Deadline, Outcome};
use crate::criu::Invocation;
use crate::error::ActionError;
use crate::settings::Settings;

const STEP: &str = "post-resume";

/// Settings for the restored processes, as a JSON object of strings (`{"LOG_LEVEL":"debug"}`):
/// whoever runs `criu restore` sets it (`crac restore --env`), CRIU passes its environment on
/// to this step, and every agent hands them to its hooks as `RestoreInfo::env`.
pub const RESTORE_ENV: &str = "CRAC_RESTORE_ENV";

/// The value of [`RESTORE_ENV`] for `env`.
///
/// # Errors
///
/// When the settings would not fit in one request to an agent, with the sizes.
pub fn encode_env(env: &BTreeMap<String, String>) -> Result<String, String> {
    let line = Request::after_restore(
        RestoreReason::Restored,
        Some("criu-4194304-18446744073709551615".into()),
    )
    .with_env(env.clone())
    .to_line();
    if line.len() > MAX_REQUEST_LEN {
        return Err(format!(
            "the settings for the restored process take {} bytes in the agent's request, and a \
             request holds at most {MAX_REQUEST_LEN}: pass fewer or shorter values",
            line.len()
        ));
    }
    Ok(serde_json::to_string(env).expect("a map of strings serialises"))
}

/// The settings [`RESTORE_ENV`] holds, if any.
fn restore_env() -> Result<BTreeMap<String, String>, String> {
    match std::env::var(RESTORE_ENV) {
        Err(_) => Ok(BTreeMap::new()),
        Ok(json) if json.is_empty() => Ok(BTreeMap::new()),
        Ok(json) => serde_json::from_str(&json).map_err(|err| {
            format!(
                "{RESTORE_ENV} is not a JSON object of strings ({err}): the restored processes \
                 were not told their settings"
            )
        }),
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
    let request = Request::after_restore(RestoreReason::Restored, None).with_env(env);
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
            Outcome::Refused(reply) if reply.code.as_deref() == Some(code::NOT_CHECKPOINTING) => {
                log(
                    out,
                    STEP,
                    &format!("pid {pid}: no checkpoint pending, already came back up"),
                )
            }
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
