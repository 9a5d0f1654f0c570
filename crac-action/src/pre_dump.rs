//! pre-dump: every agent in the tree runs its `before_checkpoint` hooks, children first, and
//! the dump goes on only if all of them succeeded.
//!
//! CRIU seizes the tree only after this step exits 0. A non-zero exit aborts the dump
//! ("Pre dump script failed") and the tree runs on, so on any failure the agents already told
//! are told `after-restore` with reason `aborted` first. On success a watcher is left behind to
//! end the cycle for a tree that is still running when CRIU exits (see [`crate::watcher`]).

use std::io::Write;
use std::time::Instant;

use crac_protocol::records::{AgentHooks, PreDumpReport, HOOK_REPORT_ENV};
use crac_protocol::wire::{Code, Lean, Reason, Request};
use serde::Serialize;

use crate::agent_socket::AgentSocket;
use crate::agents::{self, ask, describe_hooks, describe_no_answer, log, Deadline, Outcome};
use crate::criu::Invocation;
use crate::error::ActionError;
use crate::preflight::{self, AgentFacts, CriuOptions};
use crate::settings::Settings;
use crate::tree::ProcessId;
use crate::watcher::{self, Claim, Watch};

const STEP: &str = "pre-dump";

/// What a before-checkpoint's lease allows beyond this step's own time limit.
const LEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the step.
///
/// # Errors
///
/// See [`ActionError`]; on error every agent told has been rolled back.
pub fn run(inv: &Invocation, settings: &Settings, out: &mut dyn Write) -> Result<(), ActionError> {
    let init = inv.init_pid.ok_or(ActionError::NoInitPid(STEP))?;
    // Nobody told anything yet: a failure here leaves the tree as it was.
    match crate::freezer::thaw(init) {
        Ok(crate::freezer::Thawed::Thawed(path)) => log(
            out,
            STEP,
            &format!(
                "thawed the tree's cgroup ({}), frozen by its runtime before the dump, so that \
                 its agents can answer; CRIU freezes the tree itself",
                path.display()
            ),
        ),
        Ok(crate::freezer::Thawed::NotFrozen) => {}
        Err(why) => return Err(ActionError::Refused(why)),
    }
    // A bad policy stops everything before anyone is told anything. CRIU's options are read
    // only when the preflight runs.
    let checks = preflight::configured(|name| std::env::var(name).ok())
        .map_err(ActionError::Settings)?
        .map(|policy| {
            let opts = inv
                .criu()
                .ok()
                .map_or_else(CriuOptions::unknown, CriuOptions::of_process);
            (policy, opts)
        });
    // `quiet`: a tree with no agent keeps its one log line when nothing is found. The agents
    // told are asked who holds what is refused, and only then.
    let preflight = |out: &mut dyn Write,
                     quiet: bool,
                     told: &[(ProcessId, AgentSocket)],
                     facts: &AgentFacts,
                     deadline: &Deadline|
     -> Result<(), String> {
        let Some((policy, opts)) = &checks else {
            return Ok(());
        };
        let started = Instant::now();
        let pids = crate::tree::descendants(init);
        if opts.file_locks {
            for lock in preflight::held_locks(&pids, facts)
                .iter()
                .filter(|l| preflight::restorable_lock(l))
            {
                log(
                    out,
                    STEP,
                    &format!("preflight: taken into the image (--file-locks): {lock}"),
                );
            }
        }
        let mut problems = preflight::problems(&pids, facts, opts, policy);
        if problems.is_empty() {
            if !quiet {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                log(
                    out,
                    STEP,
                    &format!("preflight: nothing CRIU would refuse ({ms:.2} ms)"),
                );
            }
            return Ok(());
        }
        name_owners(&mut problems, told, deadline);
        preflight::refusal(&problems).map_or(Ok(()), Err)
    };
    // Nobody was told anything yet: refusing now leaves the tree as it was.
    let found = trusted_agents(init)?;
    if found.agents.is_empty() {
        preflight(
            out,
            true,
            &[],
            &AgentFacts::new(),
            &Deadline::after(settings.timeout),
        )
        .map_err(ActionError::Refused)?;
        return crate::no_agent(STEP, init, settings, out);
    }
    let criu_pid = inv.criu()?;
    let criu = ProcessId::of(criu_pid).ok_or(ActionError::NoCriu(criu_pid))?;
    // The same token for every run of this step by this CRIU: an agent asked twice (CRIU 4.1
    // under runc runs each action twice) answers the second time that it is ready already.
    let cycle = format!("criu-{}-{}", criu.pid, criu.start_time);
    let deadline = Deadline::after(settings.timeout);
    // If this step dies after an agent answered and before the watcher exists, the agent
    // ends its checkpoint by itself when the lease runs out: this whole step's limit, and
    // some more.
    // The agents tell the preflight about their own descriptors: cheaper from inside.
    let request = Request::before_checkpoint(&cycle)
        .with_lease(settings.timeout + LEASE_GRACE)
        .with_facts(checks.is_some())
        .with_lean(Lean {
            tcp_addresses: checks
                .as_ref()
                .is_some_and(|(policy, opts)| preflight::needs_tcp_addresses(opts, policy)),
        });
    let started = Instant::now();
    let mut report = PreDumpReport {
        cycle: cycle.clone(),
        ..PreDumpReport::default()
    };

    let Told {
        agents: told,
        hooks,
        facts,
        repeated,
        mut failure,
        unanswered,
        ..
    } = tell_before(found.agents, &request, &deadline, out);
    report.agents = hooks;
    report.wall_ms = started.elapsed().as_secs_f64() * 1e3;
    // A repeated step ran no hook: the first run's report stands.
    if repeated < told.len() {
        if let Some(path) = std::env::var_os(HOOK_REPORT_ENV) {
            if let Ok(json) = serde_json::to_vec(&report) {
                // Into the image folder crac made: private, and never through a link.
                let _ = crac_fs::write_atomic(std::path::Path::new(&path), &json);
            }
        }
    }
    // The hooks have closed what they close: what is still open is what CRIU will see.
    if failure.is_none() {
        if let Err(refusal) = preflight(out, false, &told, &facts, &deadline) {
            failure = Some(refusal);
        }
    }
    if let Some(reason) = failure {
        roll_back(&told, &cycle, settings, out);
        if !unanswered.is_empty() {
            // An agent that never answered may still finish its hooks later; the watcher ends
            // its cycle once CRIU has given up on this dump.
            let _ = start_watcher(&Watch::new(criu, &cycle, unanswered, settings), out);
        }
        return Err(ActionError::Refused(reason));
    }
    if told.is_empty() {
        return crate::no_agent(STEP, init, settings, out);
    }
    let count = told.len();
    let watch = Watch::new(criu, &cycle, told, settings);
    if let Err(err) = start_watcher(&watch, out) {
        roll_back(&watch.targets, &cycle, settings, out);
        return Err(ActionError::Watcher(err));
    }
    log(
        out,
        STEP,
        &format!(
            "{count} agent{} ready for the dump (cycle {cycle})",
            if count == 1 { "" } else { "s" }
        ),
    );
    Ok(())
}

/// What telling the agents `before_checkpoint` found; see [`tell_before`].
struct Told {
    /// The agents that answered ok, children first: the ones to roll back.
    agents: Vec<(ProcessId, AgentSocket)>,
    /// Their hooks, in the order they ran.
    hooks: Vec<AgentHooks>,
    /// The hooks of the agent that refused, if one did.
    refused_hooks: Option<AgentHooks>,
    /// What the agents told of their own descriptors (when asked).
    facts: AgentFacts,
    /// What their descriptor policies closed (in a dry run: would close), by process.
    closed: Vec<(u32, crac_protocol::fd_policy::Descriptor)>,
    /// How many had been told this cycle already (this step ran before).
    repeated: usize,
    /// Why the checkpoint cannot go on: the first refusal, silence or untrusted socket.
    failure: Option<String>,
    /// The agent that did not answer: it may still finish its hooks later.
    unanswered: Vec<(ProcessId, AgentSocket)>,
}

/// Tells each agent `request` (a before-checkpoint), children first (they go down before
/// their parents, as resources within a process do), logging each answer; stops at the first
/// that refuses, does not answer or is not trusted.
fn tell_before(
    agents: Vec<AgentSocket>,
    request: &Request,
    deadline: &Deadline,
    out: &mut dyn Write,
) -> Told {
    let mut told = Told {
        agents: Vec::new(),
        hooks: Vec::new(),
        refused_hooks: None,
        facts: AgentFacts::new(),
        closed: Vec::new(),
        repeated: 0,
        failure: None,
        unanswered: Vec::new(),
    };
    for agent in agents.into_iter().rev() {
        let pid = agent.pid();
        let Some(id) = ProcessId::of(pid) else {
            log(out, STEP, &format!("pid {pid}: exited; skipped"));
            continue;
        };
        match ask(&agent, request, deadline) {
            Outcome::Done(reply) => {
                log(
                    out,
                    STEP,
                    &format!(
                        "pid {pid}: before_checkpoint ok, {}",
                        describe_hooks(&reply)
                    ),
                );
                for closed in &reply.closed {
                    log(
                        out,
                        STEP,
                        &format!("pid {pid}: closed by its descriptor policy: {closed}"),
                    );
                }
                if reply.code == Some(Code::Already) {
                    told.repeated += 1;
                }
                if let Some(facts) = reply.facts {
                    told.facts.insert(pid, facts);
                }
                told.closed
                    .extend(reply.closed.into_iter().map(|c| (pid, c)));
                told.hooks.push(AgentHooks {
                    pid,
                    hooks: reply.hooks,
                });
                told.agents.push((id, agent));
            }
            Outcome::Refused(reply) => {
                told.failure = Some(format!(
                    "pid {pid}: {}",
                    reply.error.as_deref().unwrap_or("refused without a reason")
                ));
                told.refused_hooks = Some(AgentHooks {
                    pid,
                    hooks: reply.hooks,
                });
                break;
            }
            Outcome::NoAgent => {
                log(
                    out,
                    STEP,
                    &format!(
                        "pid {pid}: stale socket {}, no agent listening; skipped",
                        agent.describe()
                    ),
                );
            }
            Outcome::NoAnswer(err) => {
                told.failure = Some(describe_no_answer(pid, &err));
                told.unanswered.push((id, agent));
                break;
            }
            Outcome::Untrusted(err) => {
                told.failure = Some(err.to_string());
                break;
            }
        }
    }
    told
}

/// Names, in each problem, the resource most likely holding its descriptor, as the agent of
/// its process tells (the `descriptors` request, one per agent whose process has a problem).
/// A checkpoint that goes through never asks.
fn name_owners(
    problems: &mut [preflight::Problem],
    agents: &[(ProcessId, AgentSocket)],
    deadline: &Deadline,
) {
    for (id, agent) in agents {
        if !problems.iter().any(|p| p.pid == id.pid) {
            continue;
        }
        let Outcome::Done(reply) = ask(agent, &Request::descriptors(), deadline) else {
            continue;
        };
        for problem in problems.iter_mut().filter(|p| p.pid == id.pid) {
            problem.owner = reply
                .descriptors
                .iter()
                .find(|d| u32::try_from(d.fd).ok() == Some(problem.fd))
                .and_then(|d| d.owner.clone());
        }
    }
}

/// The agents in the tree under `root`, unless a socket there is not a trustworthy agent.
fn trusted_agents(root: u32) -> Result<agents::Found, ActionError> {
    let found = agents::in_tree(root);
    if found.refused.is_empty() {
        return Ok(found);
    }
    Err(ActionError::Refused(
        found
            .refused
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    ))
}

/// Starts the watcher of this CRIU unless an earlier run of this step did.
fn start_watcher(watch: &Watch, out: &mut dyn Write) -> std::io::Result<()> {
    match watcher::claim(watch.criu)? {
        Claim::New(listener) => watcher::spawn(watch, listener),
        Claim::Running => {
            log(
                out,
                STEP,
                &format!(
                    "a watcher for CRIU pid {} runs already (this step ran before)",
                    watch.criu.pid
                ),
            );
            Ok(())
        }
    }
}

fn roll_back(
    told: &[(ProcessId, AgentSocket)],
    cycle: &str,
    settings: &Settings,
    out: &mut dyn Write,
) {
    let deadline = Deadline::after(settings.timeout);
    let request = Request::after_restore(Reason::Aborted, Some(cycle.to_owned()));
    // Parents come back up before their children.
    for (id, agent) in told.iter().rev() {
        let line = match ask(agent, &request, &deadline) {
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
            Outcome::Untrusted(err) => format!("pid {}: rollback refused: {err}", id.pid),
        };
        log(out, STEP, &line);
    }
}

/// What a dry run found; see [`dry_run`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DryRun {
    /// Each agent's hooks, both phases, in the order they ran.
    pub agents: Vec<AgentHooks>,
    /// A before_checkpoint that failed, or an agent that did not answer: the dump would be
    /// refused for that first.
    pub hook_failure: Option<String>,
    /// How many descriptors the preflight looked at.
    pub descriptors: usize,
    /// What the agents' descriptor policies would close, by process.
    pub would_close: Vec<(u32, crac_protocol::fd_policy::Descriptor)>,
    /// What CRIU would refuse (see [`crate::preflight`]), one line each.
    pub refused: Vec<String>,
    /// The file locks CRIU would take into the image (with `--file-locks`), one line each.
    pub file_locks: Vec<String>,
}

/// `crac checkpoint --dry-run`: every `before_checkpoint` in the tree under `root` (children
/// first), then the preflight with `opts` and `policy`, then every `after_restore` with reason
/// `aborted` (parents first), as pre-dump would on a refusal. Nothing is dumped: the answer
/// to "what would stop a checkpoint now?".
///
/// # Errors
///
/// When the tree holds a socket that is not a trustworthy agent (nothing was told then).
pub fn dry_run(
    root: u32,
    opts: &preflight::CriuOptions,
    policy: &preflight::Policy,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<DryRun, ActionError> {
    let found = trusted_agents(root)?;
    let cycle = format!(
        "dry-run-{root}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let deadline = Deadline::after(settings.timeout);
    let request = Request::before_checkpoint(&cycle)
        .with_lease(settings.timeout + LEASE_GRACE)
        .with_dry_run(true)
        .with_facts(true)
        .with_lean(Lean {
            tcp_addresses: preflight::needs_tcp_addresses(opts, policy),
        });
    let Told {
        agents: told,
        mut hooks,
        refused_hooks,
        facts,
        closed,
        failure,
        ..
    } = tell_before(found.agents, &request, &deadline, out);
    hooks.extend(refused_hooks);
    let mut result = DryRun {
        agents: hooks,
        hook_failure: failure,
        would_close: closed,
        ..DryRun::default()
    };
    let pids = crate::tree::descendants(root);
    result.descriptors = pids
        .iter()
        .filter_map(|&pid| crate::procfs::fd_count(pid))
        .sum();
    // What a policy would close is not in the way of a real checkpoint.
    let mut refused: Vec<preflight::Problem> = preflight::problems(&pids, &facts, opts, policy)
        .into_iter()
        .filter(|p| {
            !result
                .would_close
                .iter()
                .any(|(pid, d)| *pid == p.pid && d.fd as u32 == p.fd)
        })
        .collect();
    name_owners(&mut refused, &told, &deadline);
    result.refused = refused.iter().map(ToString::to_string).collect();
    if opts.file_locks {
        result.file_locks = preflight::held_locks(&pids, &facts)
            .iter()
            .filter(|l| preflight::restorable_lock(l))
            .map(ToString::to_string)
            .collect();
    }
    roll_back(&told, &cycle, settings, out);
    Ok(result)
}
