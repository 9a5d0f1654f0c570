//! pre-dump: every agent in the tree runs its `before_checkpoint` hooks, children first, and
//! the dump goes on only if all of them succeeded.
//!
//! CRIU seizes the tree only after this step exits 0. A non-zero exit aborts the dump
//! ("Pre dump script failed") and the tree runs on, so on any failure the agents already told
//! are told `after-restore` with reason `aborted` first. On success a watcher is left behind to
//! end the cycle for a tree that is still running when CRIU exits (see [`crate::watcher`]).

use std::io::Write;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crac_agent::protocol::Request;
use crac_core::RestoreReason;

use crate::agents::{self, ask, describe_hooks, describe_no_answer, log, Deadline, Outcome};
use crate::criu::Invocation;
use crate::error::ActionError;
use crate::settings::Settings;
use crate::tree::ProcessId;
use crate::watcher::{self, Watch};

const STEP: &str = "pre-dump";

/// When set, pre-dump writes a [`HookReport`] (JSON) to this path: `crac checkpoint` reads
/// the hook timings from it.
pub const HOOK_REPORT_ENV: &str = "CRAC_HOOK_REPORT";

/// What pre-dump did, for tools that drive CRIU and want the figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HookReport {
    /// The cycle token.
    pub cycle: String,
    /// Wall time of the whole step's agent requests, in milliseconds.
    pub wall_ms: f64,
    /// Each agent told, in the order told.
    pub agents: Vec<AgentHooks>,
}

/// One agent's hooks in a [`HookReport`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentHooks {
    /// The process.
    pub pid: u32,
    /// Its hooks, in the order they ran.
    pub hooks: Vec<crac_agent::protocol::HookReport>,
}

/// Runs the step.
///
/// # Errors
///
/// See [`ActionError`]; on error every agent told has been rolled back.
pub fn run(inv: &Invocation, settings: &Settings, out: &mut dyn Write) -> Result<(), ActionError> {
    let init = inv.init_pid.ok_or(ActionError::NoInitPid(STEP))?;
    let agents = agents::in_tree(init);
    if agents.is_empty() {
        return crate::no_agent(STEP, init, settings, out);
    }
    let criu_pid = std::os::unix::process::parent_id();
    let cycle = format!(
        "criu-{criu_pid}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let deadline = Deadline::after(settings.timeout);
    let request = Request::before_checkpoint(&cycle);
    let started = Instant::now();
    let mut report = HookReport {
        cycle: cycle.clone(),
        ..HookReport::default()
    };

    let mut told: Vec<ProcessId> = Vec::new();
    let mut failure = None;
    let mut unanswered: Vec<ProcessId> = Vec::new();
    // Children go down before their parents, as resources within a process do.
    for &pid in agents.iter().rev() {
        let Some(id) = ProcessId::of(pid) else {
            log(out, STEP, &format!("pid {pid}: exited; skipped"));
            continue;
        };
        match ask(pid, &request, &deadline) {
            Outcome::Done(reply) => {
                log(
                    out,
                    STEP,
                    &format!(
                        "pid {pid}: before_checkpoint ok, {}",
                        describe_hooks(&reply)
                    ),
                );
                report.agents.push(AgentHooks {
                    pid,
                    hooks: reply.hooks,
                });
                told.push(id);
            }
            Outcome::Refused(reply) => {
                failure = Some(format!(
                    "pid {pid}: {}",
                    reply.error.as_deref().unwrap_or("refused without a reason")
                ));
                break;
            }
            Outcome::NoAgent => {
                log(
                    out,
                    STEP,
                    &format!("pid {pid}: stale socket, no agent listening; skipped"),
                );
            }
            Outcome::NoAnswer(err) => {
                failure = Some(describe_no_answer(pid, &err));
                unanswered.push(id);
                break;
            }
        }
    }

    report.wall_ms = started.elapsed().as_secs_f64() * 1e3;
    if let Some(path) = std::env::var_os(HOOK_REPORT_ENV) {
        if let Ok(json) = serde_json::to_vec(&report) {
            let _ = std::fs::write(path, json);
        }
    }
    if let Some(reason) = failure {
        roll_back(&told, &cycle, settings, out);
        if !unanswered.is_empty() {
            // An agent that never answered may still finish its hooks later; the watcher ends
            // its cycle once CRIU has given up on this dump.
            let _ = watcher::spawn(&Watch::new(criu_pid, &cycle, &unanswered, settings));
        }
        return Err(ActionError::Refused(reason));
    }
    if told.is_empty() {
        return crate::no_agent(STEP, init, settings, out);
    }
    if let Err(err) = watcher::spawn(&Watch::new(criu_pid, &cycle, &told, settings)) {
        roll_back(&told, &cycle, settings, out);
        return Err(ActionError::Watcher(err));
    }
    log(
        out,
        STEP,
        &format!(
            "{} agent{} ready for the dump (cycle {cycle})",
            told.len(),
            if told.len() == 1 { "" } else { "s" }
        ),
    );
    Ok(())
}

fn roll_back(told: &[ProcessId], cycle: &str, settings: &Settings, out: &mut dyn Write) {
    let deadline = Deadline::after(settings.timeout);
    let request = Request::after_restore(RestoreReason::Aborted, Some(cycle.to_owned()));
    // Parents come back up before their children.
    for id in told.iter().rev() {
        let line = match ask(id.pid, &request, &deadline) {
            Outcome::Done(reply) => {
                format!("pid {}: rolled back, {}", id.pid, describe_hooks(&reply))
            }
            Outcome::Refused(reply) => format!(
                "pid {}: rollback failed: {}",
                id.pid,
                reply.error.unwrap_or_default()
            ),
            Outcome::NoAgent => format!("pid {}: gone before rollback", id.pid),
            Outcome::NoAnswer(err) => format!("pid {}: rollback got no answer: {err}", id.pid),
        };
        log(out, STEP, &line);
    }
}
