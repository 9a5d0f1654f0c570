//! What the agent does with a request: the state machine of a checkpoint cycle (idle, then
//! checkpointing from a successful before-checkpoint until after-restore), its lease, and the
//! replies. The connections are [`crate::server`]'s.
//!
//! # The lease
//!
//! A checkpoint pending with nobody to end it would keep the service quiesced forever: the
//! client that asked for it went away (crac-action killed before it left its watcher, or a
//! client that read the reply and left). So a before-checkpoint takes a lease (the request's
//! `lease_ms`, [`DEFAULT_LEASE`] without one): if no after-restore has come when it runs out,
//! the agent ends the cycle itself, with reason `aborted` (or `restored`, when this process is
//! not the one that was asked: a copy restored from an image by a tool that never said so).
//!
//! A dump freezes the process, and a lease must not run out while it is frozen: the dump is
//! going on, and the watcher tells the process as soon as CRIU exits. The agent's thread ticks
//! while a checkpoint is pending ([`TICK`]); a tick that comes much later than due ([`GAP`]),
//! or with the clock gone back (a copy restored on another machine), means the process was
//! frozen or restored, and the lease starts again from then.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use crac_core::{
    Checkpoint, CheckpointError, Coordinator, ErrorKind, Phase, RestoreDetails, RestoreReason,
};

use crate::descriptor_owners::Tracker;
use crate::procfs;
use crate::tcp;
use crac_protocol::wire::{
    AfterRestore, BeforeCheckpoint, Code, HookReport, Op, OpName, Reason, Reply, Request, State,
    VERSION,
};

/// The lease of a before-checkpoint that names none.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// How often the agent's thread looks at the lease while a checkpoint is pending (it sleeps
/// while idle).
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// A tick this much later than due means the process did not run in between.
const GAP: Duration = Duration::from_secs(1);

pub(crate) struct Handler {
    coordinator: Coordinator,
    /// What each after_restore opened, to name who holds a descriptor.
    owners: Arc<Tracker>,
    pending: Option<Pending>,
    /// The hooks that failed in the last cycle that ended.
    last_failures: Vec<HookReport>,
}

/// A checkpoint between before-checkpoint and after-restore.
struct Pending {
    cycle: Option<String>,
    checkpoint: Checkpoint,
    /// The TCP connections open when the hooks had gone down and the descriptor policy had
    /// closed what it closes: those CRIU dumps (see [`tcp`]).
    connections: Vec<RawFd>,
    lease: Lease,
}

/// How long a pending checkpoint may wait for its after-restore; see the module documentation.
struct Lease {
    limit: Duration,
    since: Instant,
    last_tick: Instant,
    /// This process's start time when the checkpoint began: a restored copy has another.
    started_as: Option<u64>,
}

impl Lease {
    fn new(limit: Duration, now: Instant) -> Lease {
        Lease {
            limit,
            since: now,
            last_tick: now,
            started_as: procfs::start_time(),
        }
    }

    /// Whether the lease has run out at `now`.
    fn expired(&mut self, now: Instant) -> bool {
        let frozen = now < self.last_tick || now - self.last_tick > GAP;
        if frozen {
            self.since = now;
        }
        self.last_tick = now;
        now.saturating_duration_since(self.since) >= self.limit
    }
}

impl Handler {
    pub(crate) fn new(coordinator: Coordinator) -> Handler {
        let owners = Arc::new(Tracker::default());
        coordinator.set_after_restore_watcher(Some(owners.clone()));
        Handler {
            coordinator,
            owners,
            pending: None,
            last_failures: Vec::new(),
        }
    }

    /// Whether a checkpoint is pending (the agent's thread then ticks).
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The TCP connections the pending checkpoint's process holds, one descriptor each, as the
    /// server's look after the hooks found them ([`crate::fd_facts::look`]): after the restore
    /// the same descriptors tell which survived.
    pub(crate) fn note_connections(&mut self, connections: Vec<RawFd>) {
        if let Some(pending) = &mut self.pending {
            pending.connections = connections;
        }
    }

    /// Ends a pending checkpoint whose lease ran out.
    pub(crate) fn tick(&mut self, now: Instant) {
        let Some(pending) = &mut self.pending else {
            return;
        };
        if !pending.lease.expired(now) {
            return;
        }
        let restored = procfs::start_time() != pending.lease.started_as;
        let reason = if restored {
            RestoreReason::Restored
        } else {
            RestoreReason::Aborted
        };
        if let Some(pending) = self.pending.take() {
            let tcp = tcp::fate(&pending.connections);
            let details = RestoreDetails::default().with_tcp(tcp);
            let outcome = pending.checkpoint.complete_with(reason, details);
            self.ended(failures_of(outcome.err().as_ref()));
        }
    }

    /// The before-checkpoint just answered was not heard (its reply could not be sent): no dump
    /// will follow, so the process comes back up now rather than at the end of the lease.
    pub(crate) fn unheard(&mut self) {
        if let Some(pending) = self.pending.take() {
            let outcome = pending.checkpoint.complete(RestoreReason::Aborted);
            self.ended(failures_of(outcome.err().as_ref()));
        }
    }

    pub(crate) fn serve(&mut self, request: &Request) -> Reply {
        if request.v != VERSION {
            return self.error(
                request.op.name(),
                Code::BadRequest,
                format!(
                    "unsupported protocol version {} (this agent speaks version {VERSION})",
                    request.v
                ),
            );
        }
        match &request.op {
            Op::BeforeCheckpoint(before) => self.before_checkpoint(before),
            Op::AfterRestore(after) => self.after_restore(after),
            Op::Status => self.reply(OpName::Status, true, Vec::new(), None, None),
            Op::Descriptors => {
                let mut descriptors = crate::fd_policy::descriptors();
                self.owners.attribute(&self.coordinator, &mut descriptors);
                Reply {
                    descriptors,
                    ..self.reply(OpName::Descriptors, true, Vec::new(), None, None)
                }
            }
            // The server passes the descriptors and their names with this reply.
            Op::Listeners => self.reply(OpName::Listeners, true, Vec::new(), None, None),
            Op::Retire => {
                let retired = self.coordinator.retire();
                if !retired.failed.is_empty() {
                    let message = format!(
                        "retiring, but retire hooks failed: {}",
                        retired.failed.join("; ")
                    );
                    self.error(OpName::Retire, Code::Failed, message)
                } else if !retired.heard {
                    self.reply(OpName::Retire, true, Vec::new(), Some(Code::Unheard), None)
                } else {
                    self.reply(OpName::Retire, true, Vec::new(), None, None)
                }
            }
            // An op this agent does not know (`Op::Unknown`, or one added to the protocol later).
            other => self.error(
                other.name(),
                Code::BadRequest,
                format!(
                    "unknown op {:?}: expected {:?}, {:?}, {:?}, {:?}, {:?} or {:?}",
                    other.name().as_str(),
                    OpName::BeforeCheckpoint.as_str(),
                    OpName::AfterRestore.as_str(),
                    OpName::Status.as_str(),
                    OpName::Descriptors.as_str(),
                    OpName::Listeners.as_str(),
                    OpName::Retire.as_str()
                ),
            ),
        }
    }

    fn before_checkpoint(&mut self, request: &BeforeCheckpoint) -> Reply {
        if let Some(pending) = &self.pending {
            if pending.cycle.is_some() && pending.cycle == request.cycle {
                // The same cycle asked again (a CRIU that runs its action script twice): it is
                // ready for the dump already.
                return self.reply(
                    OpName::BeforeCheckpoint,
                    true,
                    Vec::new(),
                    Some(Code::Already),
                    None,
                );
            }
            let message = format!(
                "a checkpoint is already in progress{}: it must be ended with after-restore before another can start",
                describe_cycle(&pending.cycle)
            );
            return self.error(OpName::BeforeCheckpoint, Code::Busy, message);
        }
        match self.coordinator.checkpoint() {
            Ok(checkpoint) => {
                let hooks = checkpoint.hooks().iter().map(hook_report).collect();
                let lease = request
                    .lease_ms
                    .map_or(DEFAULT_LEASE, Duration::from_millis);
                self.pending = Some(Pending {
                    cycle: request.cycle.clone(),
                    checkpoint,
                    connections: Vec::new(),
                    lease: Lease::new(lease, Instant::now()),
                });
                self.reply(OpName::BeforeCheckpoint, true, hooks, None, None)
            }
            Err(err) => {
                if matches!(err.kind(), ErrorKind::Refused) {
                    self.ended(failures_of(Some(&err)));
                }
                self.failed(OpName::BeforeCheckpoint, &err, None)
            }
        }
    }

    fn after_restore(&mut self, request: &AfterRestore) -> Reply {
        // Converted by word: the protocol's words are crac-core's.
        let reason = request
            .reason
            .as_ref()
            .map(|r| RestoreReason::parse(r.as_str()));
        let reason = match reason {
            Some(Some(reason)) => reason,
            Some(None) | None => {
                return self.error(
                    OpName::AfterRestore,
                    Code::BadRequest,
                    format!(
                        "after-restore needs a reason, \"restored\", \"resumed\" or \"aborted\"; got {:?}",
                        request.reason.as_ref().map(Reason::as_str)
                    ),
                )
            }
        };
        let Some(pending) = self.pending.take() else {
            return self.error(
                OpName::AfterRestore,
                Code::NotCheckpointing,
                "no checkpoint in progress: after-restore must follow a successful before-checkpoint"
                    .into(),
            );
        };
        if let (Some(expected), Some(got)) = (&pending.cycle, &request.cycle) {
            if expected != got {
                let message = format!(
                    "cycle mismatch: the pending checkpoint is cycle {expected:?}, this after-restore is for cycle {got:?}"
                );
                self.pending = Some(pending);
                return self.error(OpName::AfterRestore, Code::CycleMismatch, message);
            }
        }
        let details = RestoreDetails::default()
            .with_tcp(tcp::fate(&pending.connections))
            .with_env(request.env.clone());
        match pending.checkpoint.complete_with(reason, details) {
            Ok(report) => {
                self.ended(Vec::new());
                let hooks = report.phase(Phase::AfterRestore).map(hook_report).collect();
                self.reply(OpName::AfterRestore, true, hooks, None, None)
            }
            Err(err) => {
                self.ended(failures_of(Some(&err)));
                self.failed(OpName::AfterRestore, &err, Some(Phase::AfterRestore))
            }
        }
    }

    /// Keeps what failed in a cycle that just ended (nothing when `report` is a success).
    fn ended(&mut self, failed: Vec<HookReport>) {
        self.last_failures = failed;
    }

    fn failed(&self, op: OpName, err: &CheckpointError, only: Option<Phase>) -> Reply {
        let hooks = err
            .hooks()
            .iter()
            .filter(|r| only.is_none_or(|phase| r.phase() == phase))
            .map(hook_report)
            .collect();
        let code = match err.kind() {
            ErrorKind::InProgress => Code::Busy,
            _ => Code::Failed,
        };
        self.reply(op, false, hooks, Some(code), Some(err.to_string()))
    }

    pub(crate) fn error(&self, op: OpName, code: Code, message: String) -> Reply {
        self.reply(op, false, Vec::new(), Some(code), Some(message))
    }

    fn reply(
        &self,
        op: OpName,
        ok: bool,
        hooks: Vec<HookReport>,
        code: Option<Code>,
        error: Option<String>,
    ) -> Reply {
        let last_restore_unix_ms = self.coordinator.last_restore().and_then(|info| {
            info.at
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        Reply {
            v: VERSION,
            ok,
            op,
            pid: std::process::id(),
            state: State::from(self.coordinator.state().as_str()),
            generation: self.coordinator.generation(),
            cycle: self.pending.as_ref().and_then(|p| p.cycle.clone()),
            resources: self.coordinator.context().resource_names(),
            last_restore_unix_ms,
            hooks,
            error,
            code,
            last_cycle: self
                .coordinator
                .last_cycle()
                .map(|info| Reason::from(info.reason.as_str())),
            last_failures: self.last_failures.clone(),
            closed: Vec::new(),
            facts: None,
            descriptors: Vec::new(),
            listeners: Vec::new(),
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // A stopped agent answers nobody: nothing need watch its hooks any more.
        self.coordinator.set_after_restore_watcher(None);
    }
}

/// The hooks that failed in a cycle's error, both phases.
fn failures_of(err: Option<&CheckpointError>) -> Vec<HookReport> {
    err.map_or_else(Vec::new, |err| err.failures().map(hook_report).collect())
}

/// A hook's record as a reply tells it: crac-core's phase by its word.
fn hook_report(record: &crac_core::HookRecord) -> HookReport {
    HookReport {
        resource: record.resource().to_owned(),
        phase: crac_protocol::wire::Phase::from(record.phase().as_str()),
        duration_us: u64::try_from(record.duration().as_micros()).unwrap_or(u64::MAX),
        error: record.failure().map(|f| f.to_string()),
    }
}

fn describe_cycle(cycle: &Option<String>) -> String {
    match cycle {
        Some(cycle) => format!(" (cycle {cycle:?})"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_runs_out_unless_the_process_was_frozen() {
        // Lease::new and own_start_time read /proc/self/stat.
        let _turn = crate::descriptor_table_turn();
        let start = Instant::now();
        let mut lease = Lease::new(Duration::from_millis(500), start);
        let tick = |ms| start + Duration::from_millis(ms);
        assert!(!lease.expired(tick(250)));
        assert!(lease.expired(tick(500)));
        // Frozen from 250 ms to 5 s: the lease starts again when it runs again.
        let mut lease = Lease::new(Duration::from_millis(500), start);
        assert!(!lease.expired(tick(250)));
        assert!(!lease.expired(tick(5000)));
        assert!(!lease.expired(tick(5250)));
        assert!(lease.expired(tick(5500)));
        // A clock gone back (restored on another machine) starts it again too.
        let mut lease = Lease::new(Duration::from_millis(500), tick(10_000));
        assert!(!lease.expired(tick(100)));
        assert!(lease.expired(tick(600)));
    }

    #[test]
    fn crac_core_s_words_are_the_protocol_s() {
        use crac_core::CycleState as CoreState;
        for reason in [
            RestoreReason::Restored,
            RestoreReason::Resumed,
            RestoreReason::Aborted,
        ] {
            let word = Reason::from(reason.as_str());
            assert!(!matches!(word, Reason::Unknown(_)), "{reason}");
            assert_eq!(RestoreReason::parse(word.as_str()), Some(reason));
        }
        for phase in [Phase::BeforeCheckpoint, Phase::AfterRestore] {
            let word = crac_protocol::wire::Phase::from(phase.as_str());
            assert!(
                !matches!(word, crac_protocol::wire::Phase::Unknown(_)),
                "{phase:?}"
            );
        }
        for state in [CoreState::Idle, CoreState::Checkpointing] {
            assert!(
                !matches!(State::from(state.as_str()), State::Unknown(_)),
                "{state:?}"
            );
        }
    }

    #[test]
    fn the_start_time_is_read() {
        // Lease::new and own_start_time read /proc/self/stat.
        let _turn = crate::descriptor_table_turn();
        assert!(procfs::start_time().is_some_and(|t| t > 0));
    }
}
