//! Calling hooks: panic capture, timing, and time limits.
//!
//! Without limits, hooks run on the calling thread. With limits, they run in order on the
//! coordinator's hook thread while the caller waits with a deadline. A hook cannot be
//! cancelled, so one that overruns is abandoned: its thread is told to stop after it returns,
//! and a new thread carries on with the next hook. The cost per hook is two uncontended lock
//! round trips, not a thread hand-off, so a cycle over thousands of resources stays cheap.
//!
//! A resource whose hook was abandoned is [`Busy`] until that call returns: hooks never
//! overlap, so no cycle calls it meanwhile (its hook is reported as still running, which
//! refuses a checkpoint). When an abandoned `before_checkpoint` returns `Ok` after all, its
//! resource went down for a checkpoint that was refused: it is told `after_restore` with
//! reason `aborted` then, on the same thread, like every resource of that cycle was.

use std::cell::Cell;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::coordinator::Limits;
use crate::hook_thread::HookThread;
use crate::report::{HookFailure, HookRecord, Phase};
use crate::resource::{
    CheckpointInfo, HookError, Resource, RestoreInfo, RestoreReason, TcpConnections,
};

/// A resource as one cycle sees it: its full name and the resource itself.
pub(crate) struct Target {
    pub(crate) name: Arc<str>,
    pub(crate) resource: Arc<dyn Resource>,
}

/// Which hook to call, with its argument.
#[derive(Clone)]
pub(crate) enum Call {
    Before(CheckpointInfo),
    After(RestoreInfo),
}

impl Call {
    fn phase(&self) -> Phase {
        match self {
            Call::Before(_) => Phase::BeforeCheckpoint,
            Call::After(_) => Phase::AfterRestore,
        }
    }

    fn invoke(&self, resource: &dyn Resource) -> Result<(), HookError> {
        match self {
            Call::Before(info) => resource.before_checkpoint(info),
            Call::After(info) => resource.after_restore(info),
        }
    }
}

thread_local! {
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is running a hook (used to refuse re-entrant cycles and to let
/// hooks enter critical sections while a checkpoint holds them shut).
pub(crate) fn in_hook() -> bool {
    IN_HOOK.with(Cell::get)
}

/// The resources with a hook still running on an abandoned thread (see the module
/// documentation), by the address of the resource.
#[derive(Default)]
pub(crate) struct Busy(Mutex<HashSet<usize>>);

impl Busy {
    fn key(target: &Target) -> usize {
        Arc::as_ptr(&target.resource) as *const () as usize
    }

    fn set(&self) -> MutexGuard<'_, HashSet<usize>> {
        // Each critical section is one set operation: a poisoned lock holds usable data.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn contains(&self, target: &Target) -> bool {
        self.set().contains(&Busy::key(target))
    }

    fn insert(&self, target: &Target) {
        self.set().insert(Busy::key(target));
    }

    fn remove(&self, target: &Target) {
        self.set().remove(&Busy::key(target));
    }
}

/// The records of one phase, in the order the hooks were due.
pub(crate) struct PhaseRun {
    pub(crate) records: Vec<HookRecord>,
}

impl PhaseRun {
    pub(crate) fn failed(&self) -> bool {
        self.records.iter().any(|r| r.failure.is_some())
    }
}

fn call_one(targets: &[Target], index: usize, call: &Call, busy: &Busy) -> HookRecord {
    let target = &targets[index];
    if busy.contains(target) {
        return not_called(target, index, call, HookFailure::StillRunning);
    }
    invoke(target, index, call)
}

/// Calls the hook (marked as in a hook, panics caught) and records how it went.
fn invoke(target: &Target, index: usize, call: &Call) -> HookRecord {
    let was_in_hook = IN_HOOK.with(|flag| flag.replace(true));
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| call.invoke(&*target.resource)));
    let duration = start.elapsed();
    IN_HOOK.with(|flag| flag.set(was_in_hook));
    let failure = match result {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(HookFailure::Error(err)),
        Err(payload) => Some(HookFailure::Panicked(panic_message(payload.as_ref()))),
    };
    HookRecord {
        resource: Arc::clone(&target.name),
        phase: call.phase(),
        duration,
        failure,
        target: index,
    }
}

/// The record of a hook that was not called, and why.
fn not_called(target: &Target, index: usize, call: &Call, why: HookFailure) -> HookRecord {
    HookRecord {
        resource: Arc::clone(&target.name),
        phase: call.phase(),
        duration: Duration::ZERO,
        failure: Some(why),
        target: index,
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic with a non-string payload)".to_owned()
    }
}

/// Runs the hooks of `order` (indices into `targets`) on this thread, with no time limit.
pub(crate) fn run_inline(
    targets: &[Target],
    order: impl IntoIterator<Item = usize>,
    call: &Call,
    busy: &Busy,
) -> PhaseRun {
    let records = order
        .into_iter()
        .map(|index| call_one(targets, index, call, busy))
        .collect();
    PhaseRun { records }
}

/// The records of the hooks at `rest` that the phase's time limit left no time for.
fn not_run<'a>(
    targets: &'a [Target],
    rest: &'a [usize],
    call: &'a Call,
    limits: &Limits,
) -> impl Iterator<Item = HookRecord> + 'a {
    let phase_limit = limits.phase.unwrap_or_default();
    rest.iter().map(move |&index| {
        not_called(
            &targets[index],
            index,
            call,
            HookFailure::NotRun { phase_limit },
        )
    })
}

/// Runs the hooks of `order` (indices into `targets`) under `limits`, on `thread` when there
/// are limits.
pub(crate) fn run(
    thread: &HookThread,
    busy: &Arc<Busy>,
    targets: &Arc<[Target]>,
    order: Vec<usize>,
    call: &Call,
    limits: &Limits,
) -> PhaseRun {
    if limits.hook.is_none() && limits.phase.is_none() {
        return run_inline(targets, order, call, busy);
    }
    run_limited(thread, busy, targets, order, call, limits)
}

struct Progress {
    records: Vec<HookRecord>,
    /// The hook now running (its index into the targets) and when it started; None between
    /// hooks.
    current: Option<(usize, Instant)>,
    /// Since when no hook runs (the worker has not started one yet, or is between two).
    idle_since: Instant,
    finished: bool,
    /// Set by the caller when it stops waiting for this worker.
    abandoned: bool,
}

struct Shared {
    progress: Mutex<Progress>,
    finished: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // Hooks run outside this lock, so a poisoned lock only means a panic in our own
        // bookkeeping; the data is still consistent.
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn run_limited(
    thread: &HookThread,
    busy: &Arc<Busy>,
    targets: &Arc<[Target]>,
    order: Vec<usize>,
    call: &Call,
    limits: &Limits,
) -> PhaseRun {
    let phase_deadline = limits.phase.map(|limit| Instant::now() + limit);
    let mut records = Vec::with_capacity(order.len());
    let mut pos = 0;
    while pos < order.len() {
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress {
                records: Vec::new(),
                current: None,
                idle_since: Instant::now(),
                finished: false,
                abandoned: false,
            }),
            finished: Condvar::new(),
        });
        let job = {
            let shared = Arc::clone(&shared);
            let busy = Arc::clone(busy);
            let targets = Arc::clone(targets);
            let order = order[pos..].to_vec();
            let call = call.clone();
            Box::new(move || work(&shared, &busy, &targets, &order, &call))
        };
        if thread.run(job).is_err() {
            // No thread to be had: run the rest here rather than not at all.
            records.extend(
                order[pos..]
                    .iter()
                    .map(|&i| call_one(targets, i, call, busy)),
            );
            break;
        }

        let mut progress = shared.lock();
        let overran_at = loop {
            if progress.finished {
                break None;
            }
            let now = Instant::now();
            let since = progress
                .current
                .map_or(progress.idle_since, |(_, started)| started);
            let hook_deadline = limits.hook.map(|limit| since + limit);
            let deadline = match (hook_deadline, phase_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let phase_over = phase_deadline.is_some_and(|deadline| now >= deadline);
            progress = match deadline {
                // No hook runs: the worker is late to start the next one, not overrunning.
                Some(deadline) if now >= deadline && progress.current.is_none() && !phase_over => {
                    progress.idle_since = now;
                    continue;
                }
                Some(deadline) if now >= deadline => break Some(now),
                Some(deadline) => {
                    shared
                        .finished
                        .wait_timeout(progress, deadline - now)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
                None => shared
                    .finished
                    .wait(progress)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        };
        pos += progress.records.len();
        records.append(&mut progress.records);
        let Some(now) = overran_at else {
            break;
        };

        // Leave the thread behind and go on without it.
        progress.abandoned = true;
        thread.abandon();
        let Some((index, started)) = progress.current else {
            // The phase's time ran out between two hooks: the worker stops before the next.
            drop(progress);
            records.extend(not_run(targets, &order[pos..], call, limits));
            break;
        };
        // The hook at `pos` overran. Marked busy under the worker's lock, so that its late
        // return (which takes the same lock) always comes after.
        debug_assert_eq!(index, order[pos]);
        busy.insert(&targets[index]);
        drop(progress);
        let phase_over = phase_deadline.is_some_and(|deadline| now >= deadline);
        let hook_over = limits.hook.is_some_and(|limit| now >= started + limit);
        let limit = match (hook_over, limits.hook, limits.phase) {
            (true, Some(hook), _) => hook,
            (_, _, Some(phase)) => phase,
            (_, Some(hook), None) => hook,
            (_, None, None) => unreachable!("run_limited is only called with a limit"),
        };
        records.push(HookRecord {
            resource: Arc::clone(&targets[order[pos]].name),
            phase: call.phase(),
            duration: now - started,
            failure: Some(HookFailure::TimedOut { limit }),
            target: order[pos],
        });
        pos += 1;
        if phase_over {
            records.extend(not_run(targets, &order[pos..], call, limits));
            break;
        }
    }
    PhaseRun { records }
}

fn work(shared: &Shared, busy: &Busy, targets: &[Target], order: &[usize], call: &Call) {
    for &index in order {
        {
            let mut progress = shared.lock();
            if progress.abandoned {
                return;
            }
            progress.current = Some((index, Instant::now()));
        }
        let record = call_one(targets, index, call, busy);
        let mut progress = shared.lock();
        if progress.abandoned {
            drop(progress);
            returned_late(&targets[index], call, &record, busy);
            return;
        }
        progress.current = None;
        progress.idle_since = Instant::now();
        progress.records.push(record);
    }
    shared.lock().finished = true;
    shared.finished.notify_all();
}

/// An abandoned hook has returned, its cycle over. A `before_checkpoint` that succeeded took
/// its resource down for a checkpoint that was refused (its overrun refused it): bring it
/// back up as the others were, with reason `aborted`. Then the resource may be called again.
fn returned_late(target: &Target, call: &Call, record: &HookRecord, busy: &Busy) {
    if let (Call::Before(info), None) = (call, &record.failure) {
        let back = Call::After(RestoreInfo {
            reason: RestoreReason::Aborted,
            generation: info.generation,
            at: SystemTime::now(),
            tcp: TcpConnections::default(),
        });
        invoke(target, record.target, &back);
    }
    busy.remove(target);
}
