//! Calling hooks: panic capture, timing, and time limits.
//!
//! Without limits, hooks run on the calling thread. With limits, they run in order on the
//! coordinator's hook thread while the caller waits with a deadline. A hook cannot be
//! cancelled, so one that overruns is abandoned: its thread is told to stop after it returns,
//! and a new thread carries on with the next hook. The cost per hook is two uncontended lock round trips, not a thread
//! hand-off, so a cycle over thousands of resources stays cheap.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::coordinator::Limits;
use crate::hook_thread::HookThread;
use crate::report::{HookFailure, HookRecord, Phase};
use crate::resource::{CheckpointInfo, HookError, Resource, RestoreInfo};

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

/// The records of one phase, in the order the hooks were due.
pub(crate) struct PhaseRun {
    pub(crate) records: Vec<HookRecord>,
}

impl PhaseRun {
    pub(crate) fn failed(&self) -> bool {
        self.records.iter().any(|r| r.failure.is_some())
    }
}

fn call_one(targets: &[Target], index: usize, call: &Call) -> HookRecord {
    let target = &targets[index];
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
) -> PhaseRun {
    let records = order
        .into_iter()
        .map(|index| call_one(targets, index, call))
        .collect();
    PhaseRun { records }
}

/// Runs the hooks of `order` (indices into `targets`) under `limits`, on `thread` when there
/// are limits.
pub(crate) fn run(
    thread: &HookThread,
    targets: &Arc<[Target]>,
    order: Vec<usize>,
    call: &Call,
    limits: &Limits,
) -> PhaseRun {
    if limits.hook.is_none() && limits.phase.is_none() {
        return run_inline(targets, order, call);
    }
    run_limited(thread, targets, order, call, limits)
}

struct Progress {
    records: Vec<HookRecord>,
    /// When the hook now running started.
    current_started: Instant,
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
                current_started: Instant::now(),
                finished: false,
                abandoned: false,
            }),
            finished: Condvar::new(),
        });
        let job = {
            let shared = Arc::clone(&shared);
            let targets = Arc::clone(targets);
            let order = order[pos..].to_vec();
            let call = call.clone();
            Box::new(move || work(&shared, &targets, &order, &call))
        };
        if thread.run(job).is_err() {
            // No thread to be had: run the rest here rather than not at all.
            records.extend(order[pos..].iter().map(|&i| call_one(targets, i, call)));
            break;
        }

        let mut progress = shared.lock();
        let overran_at = loop {
            if progress.finished {
                break None;
            }
            let now = Instant::now();
            let hook_deadline = limits.hook.map(|limit| progress.current_started + limit);
            let deadline = match (hook_deadline, phase_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            progress = match deadline {
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

        // The hook at `pos` overran: leave its thread behind and go on without it.
        progress.abandoned = true;
        thread.abandon();
        let started = progress.current_started;
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
            let phase_limit = limits.phase.unwrap_or_default();
            records.extend(order[pos..].iter().map(|&index| HookRecord {
                resource: Arc::clone(&targets[index].name),
                phase: call.phase(),
                duration: Duration::ZERO,
                failure: Some(HookFailure::NotRun { phase_limit }),
                target: index,
            }));
            break;
        }
    }
    PhaseRun { records }
}

fn work(shared: &Shared, targets: &[Target], order: &[usize], call: &Call) {
    for &index in order {
        {
            let mut progress = shared.lock();
            if progress.abandoned {
                return;
            }
            progress.current_started = Instant::now();
        }
        let record = call_one(targets, index, call);
        let mut progress = shared.lock();
        if progress.abandoned {
            return;
        }
        progress.records.push(record);
    }
    shared.lock().finished = true;
    shared.finished.notify_all();
}
