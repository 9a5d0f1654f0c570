//! Calling hooks: panic capture, timing, and time limits.
//!
//! Without limits, hooks run on the calling thread. With limits, they run in order on the
//! coordinator's hook thread while the caller waits with a deadline. A sync hook cannot be
//! cancelled, so one that overruns is abandoned: its thread is told to stop after it returns,
//! and a new thread carries on with the next hook. The cost per hook is two uncontended lock
//! round trips, not a thread hand-off, so a cycle over thousands of resources stays cheap.
//! An async hook runs on its runtime and is cancelled (its future dropped) at its deadline by
//! the hook thread itself; the caller only abandons it if dropping it does not finish within
//! [`ASYNC_GRACE`] (its code blocks its thread).
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
use crate::hook_watch::AfterRestoreWatcher;
use crate::report::{HookFailure, HookRecord, Phase};
use crate::resource::{
    CheckpointInfo, HookError, Resource, RestoreInfo, RestoreReason, TcpConnections,
};
use crate::trace::{CycleSpan, HookSpan};

/// How long past its deadline an async hook's cancellation may take before the hook is
/// treated like an overrunning sync hook (abandoned, its resource busy).
const ASYNC_GRACE: Duration = Duration::from_secs(1);

/// A resource's hooks, as a cycle calls them.
#[derive(Clone)]
pub(crate) enum Hooks {
    Sync(Arc<dyn Resource>),
    #[cfg(feature = "tokio")]
    Async(Arc<crate::runtime::AsyncHooks>),
}

impl Hooks {
    /// The descriptors the resource declares it holds (none if asking panicked).
    pub(crate) fn descriptors(&self) -> Vec<std::os::fd::RawFd> {
        catch_unwind(AssertUnwindSafe(|| match self {
            Hooks::Sync(resource) => resource.descriptors(),
            #[cfg(feature = "tokio")]
            Hooks::Async(hooks) => hooks.descriptors(),
        }))
        .unwrap_or_default()
    }

    /// Identifies the resource across cycles (for [`Busy`]).
    fn key(&self) -> usize {
        match self {
            Hooks::Sync(resource) => Arc::as_ptr(resource) as *const () as usize,
            #[cfg(feature = "tokio")]
            Hooks::Async(hooks) => Arc::as_ptr(hooks) as usize,
        }
    }

    fn is_async(&self) -> bool {
        match self {
            Hooks::Sync(_) => false,
            #[cfg(feature = "tokio")]
            Hooks::Async(_) => true,
        }
    }
}

/// A resource as one cycle sees it: its full name and its hooks.
pub(crate) struct Target {
    pub(crate) name: Arc<str>,
    pub(crate) hooks: Hooks,
}

/// Which hook to call, with its argument (and for `after_restore`, what watches it).
#[derive(Clone)]
pub(crate) enum Call {
    Before(CheckpointInfo),
    After(RestoreInfo, Option<Arc<dyn AfterRestoreWatcher>>),
}

impl Call {
    fn phase(&self) -> Phase {
        match self {
            Call::Before(_) => Phase::BeforeCheckpoint,
            Call::After(..) => Phase::AfterRestore,
        }
    }

    fn invoke(&self, resource: &dyn Resource) -> Result<(), HookError> {
        match self {
            Call::Before(info) => resource.before_checkpoint(info),
            Call::After(info, _) => resource.after_restore(info),
        }
    }

    fn watcher(&self) -> Option<&dyn AfterRestoreWatcher> {
        match self {
            Call::Before(_) => None,
            Call::After(_, watcher) => watcher.as_deref(),
        }
    }
}

/// When a hook must be done by, and the limit that sets it (for the report).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) limit: Duration,
}

impl Deadline {
    /// The earlier of the hook's own deadline (from `started`) and the phase's.
    fn of_hook(started: Instant, limits: &Limits, phase: Option<Deadline>) -> Option<Deadline> {
        let hook = limits.hook.map(|limit| Deadline {
            at: started + limit,
            limit,
        });
        match (hook, phase) {
            (Some(hook), Some(phase)) if phase.at < hook.at => Some(phase),
            (Some(hook), _) => Some(hook),
            (None, phase) => phase,
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

/// Marks this thread as running a hook (or not); returns what it was.
pub(crate) fn set_in_hook(value: bool) -> bool {
    IN_HOOK.with(|flag| flag.replace(value))
}

/// The resources with a hook still running on an abandoned thread (see the module
/// documentation), by the address of the resource.
#[derive(Default)]
pub(crate) struct Busy(Mutex<HashSet<usize>>);

impl Busy {
    fn set(&self) -> MutexGuard<'_, HashSet<usize>> {
        // Each critical section is one set operation: a poisoned lock holds usable data.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn contains(&self, target: &Target) -> bool {
        self.set().contains(&target.hooks.key())
    }

    fn insert(&self, target: &Target) {
        self.set().insert(target.hooks.key());
    }

    fn remove(&self, target: &Target) {
        self.set().remove(&target.hooks.key());
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

fn call_one(
    targets: &[Target],
    index: usize,
    call: &Call,
    busy: &Busy,
    span: &CycleSpan,
    deadline: Option<Deadline>,
) -> HookRecord {
    let target = &targets[index];
    if busy.contains(target) {
        return not_called(target, index, call, HookFailure::StillRunning);
    }
    invoke(target, index, call, span, deadline)
}

/// Calls the hook (marked as in a hook, panics caught; an async one cancelled at `deadline`)
/// and records how it went.
fn invoke(
    target: &Target,
    index: usize,
    call: &Call,
    span: &CycleSpan,
    deadline: Option<Deadline>,
) -> HookRecord {
    let hook_span = HookSpan::start(span, &target.name, call.phase());
    if let Some(watcher) = call.watcher() {
        watcher.before(&target.name);
    }
    let start = Instant::now();
    let failure = match &target.hooks {
        Hooks::Sync(resource) => {
            let _entered = hook_span.enter();
            let was_in_hook = set_in_hook(true);
            let result = catch_unwind(AssertUnwindSafe(|| call.invoke(&**resource)));
            set_in_hook(was_in_hook);
            match result {
                Ok(Ok(())) => None,
                Ok(Err(err)) => Some(HookFailure::Error(err)),
                Err(payload) => Some(HookFailure::Panicked(panic_message(payload.as_ref()))),
            }
        }
        #[cfg(feature = "tokio")]
        Hooks::Async(hooks) => hooks.run(call, deadline, &hook_span),
    };
    #[cfg(not(feature = "tokio"))]
    let _ = deadline;
    let duration = start.elapsed();
    if let Some(watcher) = call.watcher() {
        watcher.after(&target.name);
    }
    let record = HookRecord {
        resource: Arc::clone(&target.name),
        phase: call.phase(),
        duration,
        failure,
        target: index,
    };
    hook_span.end(&record);
    record
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

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
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
    span: &CycleSpan,
) -> PhaseRun {
    let records = order
        .into_iter()
        .map(|index| call_one(targets, index, call, busy, span, None))
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
    span: &CycleSpan,
) -> PhaseRun {
    if limits.hook.is_none() && limits.phase.is_none() {
        return run_inline(targets, order, call, busy, span);
    }
    run_limited(thread, busy, targets, order, call, limits, span)
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
    span: &CycleSpan,
) -> PhaseRun {
    let phase_deadline = limits.phase.map(|limit| Deadline {
        at: Instant::now() + limit,
        limit,
    });
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
        let job = Worker {
            shared: Arc::clone(&shared),
            busy: Arc::clone(busy),
            targets: Arc::clone(targets),
            order: order[pos..].to_vec(),
            call: call.clone(),
            limits: *limits,
            phase_deadline,
            span: span.clone(),
        };
        if let Err(job) = thread.run(Box::new(move || job.work())) {
            // No thread to be had: run the rest here rather than not at all.
            drop(job);
            records.extend(order[pos..].iter().map(|&i| {
                let deadline = Deadline::of_hook(Instant::now(), limits, phase_deadline);
                call_one(targets, i, call, busy, span, deadline)
            }));
            break;
        }

        let mut progress = shared.lock();
        let overran_at = loop {
            if progress.finished {
                break None;
            }
            let now = Instant::now();
            // An async hook cancels itself at its deadline; it is only abandoned when that
            // does not finish in time.
            let (since, grace) = match progress.current {
                Some((index, started)) if targets[index].hooks.is_async() => (started, ASYNC_GRACE),
                Some((_, started)) => (started, Duration::ZERO),
                None => (progress.idle_since, Duration::ZERO),
            };
            let hook_deadline = limits.hook.map(|limit| since + limit);
            let deadline = match (hook_deadline, phase_deadline.map(|d| d.at)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map(|deadline| deadline + grace);
            let phase_over = phase_deadline.is_some_and(|deadline| now >= deadline.at);
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
            break;
        };
        // The hook at `pos` overran. Marked busy under the worker's lock, so that its late
        // return (which takes the same lock) always comes after.
        debug_assert_eq!(index, order[pos]);
        busy.insert(&targets[index]);
        drop(progress);
        let phase_over = phase_deadline.is_some_and(|deadline| now >= deadline.at);
        let hook_over = limits.hook.is_some_and(|limit| now >= started + limit);
        let limit = match (hook_over, limits.hook, phase_deadline) {
            (true, Some(hook), _) => hook,
            (_, _, Some(phase)) => phase.limit,
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
            break;
        }
    }
    // Whatever is left had no time: the phase's limit ran out before its turn.
    let done = records.len();
    records.extend(not_run(targets, &order[done..], call, limits));
    PhaseRun { records }
}

/// What the hook thread does for one phase (or for what is left of it after an overrun).
struct Worker {
    shared: Arc<Shared>,
    busy: Arc<Busy>,
    targets: Arc<[Target]>,
    order: Vec<usize>,
    call: Call,
    limits: Limits,
    phase_deadline: Option<Deadline>,
    span: CycleSpan,
}

impl Worker {
    fn work(self) {
        let Worker {
            shared,
            busy,
            targets,
            order,
            call,
            limits,
            phase_deadline,
            span,
        } = self;
        for &index in &order {
            let started = Instant::now();
            if phase_deadline.is_some_and(|deadline| started >= deadline.at) {
                // No time left for this hook: the caller reports the rest as not run.
                break;
            }
            {
                let mut progress = shared.lock();
                if progress.abandoned {
                    return;
                }
                progress.current = Some((index, started));
            }
            let deadline = Deadline::of_hook(started, &limits, phase_deadline);
            let record = call_one(&targets, index, &call, &busy, &span, deadline);
            let mut progress = shared.lock();
            if progress.abandoned {
                drop(progress);
                returned_late(&targets[index], &call, &record, &busy, &limits, &span);
                return;
            }
            progress.current = None;
            progress.idle_since = Instant::now();
            progress.records.push(record);
        }
        shared.lock().finished = true;
        shared.finished.notify_all();
    }
}

/// An abandoned hook has returned, its cycle over. A `before_checkpoint` that succeeded took
/// its resource down for a checkpoint that was refused (its overrun refused it): bring it
/// back up as the others were, with reason `aborted`. Then the resource may be called again.
fn returned_late(
    target: &Target,
    call: &Call,
    record: &HookRecord,
    busy: &Busy,
    limits: &Limits,
    span: &CycleSpan,
) {
    if let (Call::Before(info), None) = (call, &record.failure) {
        let back = Call::After(
            RestoreInfo {
                reason: RestoreReason::Aborted,
                generation: info.generation,
                at: SystemTime::now(),
                tcp: TcpConnections::default(),
                env: Arc::default(),
            },
            // Its cycle is over, and so is the watch of it.
            None,
        );
        let deadline = Deadline::of_hook(Instant::now(), limits, None);
        invoke(target, record.target, &back, span, deadline);
    }
    busy.remove(target);
}
