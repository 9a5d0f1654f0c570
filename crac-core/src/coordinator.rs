//! [`Coordinator`]: runs cycles over a root [`Context`], one at a time, and keeps the state that
//! outlives them (generation, last restore, the critical-section gate, the draining flag).

use std::fmt;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use once_cell::sync::Lazy;

use crate::context::Context;
use crate::dispatch::{self, in_hook, Busy, Call, Target};
use crate::drain::{ClientConnection, Drain, DrainChange};
use crate::error::{CheckpointError, ErrorKind};
use crate::hook_thread::HookThread;
use crate::hook_watch::AfterRestoreWatcher;
use crate::ordering::{visit_order, Direction};
use crate::quiesce::{held_by_this_thread, CriticalSection, EnterAsync, Gate};
use crate::report::{CycleReport, HookRecord};
use crate::resource::{CheckpointInfo, RestoreDetails, RestoreInfo, RestoreReason};
use crate::retire::{Retired, Retirement};
use crate::trace::CycleSpan;

/// Time limits for a cycle.
///
/// A hook cannot be cancelled: one that overruns is reported as
/// [`HookFailure::TimedOut`](crate::HookFailure::TimedOut) and left running on its own thread
/// while the cycle goes on; its resource sits out later cycles until it returns (see
/// [`Resource`](crate::Resource), "Threads and blocking"). Set both hook limits to `None` to run
/// hooks on the calling thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The most one hook may take. Default: 10 s.
    pub hook: Option<Duration>,
    /// The most all hooks of one phase (all `before_checkpoint`s, or all `after_restore`s) may
    /// take together; hooks whose turn has not come when it runs out are not called.
    /// Default: 20 s, which leaves room below crac-action's 30 s wait.
    pub phase: Option<Duration>,
    /// How long a checkpoint waits for critical sections to end. Default: 5 s.
    pub quiesce: Duration,
    /// How long a checkpoint waits, draining, for the client connections servers count
    /// ([`Coordinator::connection`]) to end before it quiesces; it goes on either way (what is
    /// still open is then CRIU's to dump or the preflight's to refuse). Default: 3 s, so that
    /// draining, quiescing and a phase's hooks (3 + 5 + 20 s) stay below crac-action's 30 s.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            hook: Some(Duration::from_secs(10)),
            phase: Some(Duration::from_secs(20)),
            quiesce: Duration::from_secs(5),
            drain: Duration::from_secs(3),
        }
    }
}

impl Limits {
    /// No hook time limits (hooks then run on the calling thread); the default quiescing limit.
    pub fn unlimited() -> Limits {
        Limits {
            hook: None,
            phase: None,
            ..Limits::default()
        }
    }

    /// These limits with the per-hook limit set.
    pub fn with_hook(mut self, limit: Option<Duration>) -> Limits {
        self.hook = limit;
        self
    }

    /// These limits with the per-phase limit set.
    pub fn with_phase(mut self, limit: Option<Duration>) -> Limits {
        self.phase = limit;
        self
    }

    /// These limits with the quiescing limit set.
    pub fn with_quiesce(mut self, limit: Duration) -> Limits {
        self.quiesce = limit;
        self
    }

    /// These limits with the draining limit set.
    pub fn with_drain(mut self, limit: Duration) -> Limits {
        self.drain = limit;
        self
    }
}

/// Whether a cycle is in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CycleState {
    /// No cycle in progress.
    Idle,
    /// `before_checkpoint` is running or has run, and `after_restore` has not finished.
    Checkpointing,
}

impl CycleState {
    /// `idle` or `checkpointing`.
    pub fn as_str(self) -> &'static str {
        match self {
            CycleState::Idle => "idle",
            CycleState::Checkpointing => "checkpointing",
        }
    }
}

/// Runs checkpoint/restore cycles over a root [`Context`].
///
/// There is one [`global`](Coordinator::global) coordinator per process, which the agent
/// drives; separate ones ([`Coordinator::new`]) are for tests and for libraries that keep their
/// resources apart. Cloning gives another handle to the same coordinator.
///
/// A cycle has two halves because CRIU runs between them: [`checkpoint`](Self::checkpoint) runs
/// every `before_checkpoint` and returns a [`Checkpoint`]; once the process runs again,
/// [`Checkpoint::complete`] runs every `after_restore` with the reason.
/// [`simulate`](Self::simulate) runs both halves with no CRIU, for applications' own tests.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    context: Context,
    gate: Arc<Gate>,
    drain: Arc<Drain>,
    limits: Mutex<Limits>,
    state: Mutex<State>,
    /// Signalled when a cycle ends.
    cycle_ended: Condvar,
    /// Where hooks run when there are time limits.
    hooks: HookThread,
    /// Resources whose hook overran and still runs.
    busy: Arc<Busy>,
    /// Told around each `after_restore` hook.
    watcher: Mutex<Option<Arc<dyn AfterRestoreWatcher>>>,
    /// The retire phase: who is told, and whether it has begun ([`Coordinator::retire`]).
    retirement: Retirement,
}

struct State {
    in_cycle: bool,
    generation: u64,
    last_restore: Option<RestoreInfo>,
    last_cycle: Option<RestoreInfo>,
}

static GLOBAL: Lazy<Coordinator> = Lazy::new(|| {
    let coordinator = Coordinator::new();
    crate::statics::register_all(coordinator.context());
    coordinator
});

impl Default for Coordinator {
    fn default() -> Coordinator {
        Coordinator::new()
    }
}

impl Coordinator {
    /// A coordinator with an empty root context and default [`Limits`].
    pub fn new() -> Coordinator {
        let drain = Arc::<Drain>::default();
        Coordinator {
            inner: Arc::new(Inner {
                context: Context::new(""),
                gate: Arc::new(Gate::new(Arc::clone(&drain))),
                drain,
                limits: Mutex::new(Limits::default()),
                state: Mutex::new(State {
                    in_cycle: false,
                    generation: 0,
                    last_restore: None,
                    last_cycle: None,
                }),
                cycle_ended: Condvar::new(),
                hooks: HookThread::default(),
                busy: Arc::default(),
                watcher: Mutex::new(None),
                retirement: Retirement::default(),
            }),
        }
    }

    /// The process's coordinator: the one the agent drives. Resources submitted with
    /// [`register_static!`](crate::register_static) are registered in it on first use.
    pub fn global() -> &'static Coordinator {
        &GLOBAL
    }

    /// The root context: register resources here.
    pub fn context(&self) -> &Context {
        &self.inner.context
    }

    /// The current time limits.
    pub fn limits(&self) -> Limits {
        *lock(&self.inner.limits)
    }

    /// Sets the time limits for cycles that start from now on.
    pub fn set_limits(&self, limits: Limits) {
        *lock(&self.inner.limits) = limits;
    }

    /// Sets what is told around each `after_restore` hook of the cycles that end from now on
    /// (`None`: nothing). The agent sets one to note which descriptors each hook opened.
    pub fn set_after_restore_watcher(&self, watcher: Option<Arc<dyn AfterRestoreWatcher>>) {
        *lock(&self.inner.watcher) = watcher;
    }

    /// The descriptors each registered resource declares it holds
    /// ([`Resource::descriptors`](crate::Resource::descriptors)), with its full name, in
    /// registration order. A resource whose `descriptors` panics declares none.
    pub fn declared_descriptors(&self) -> Vec<(String, RawFd)> {
        self.inner
            .context
            .targets()
            .iter()
            .flat_map(|target| {
                let name = target.name.to_string();
                target
                    .hooks
                    .descriptors()
                    .into_iter()
                    .map(move |fd| (name.clone(), fd))
            })
            .collect()
    }

    /// Completed checkpoints (restored or resumed, not aborted) in this process's history,
    /// counting those of the images it was restored from.
    pub fn generation(&self) -> u64 {
        lock(&self.inner.state).generation
    }

    /// The last time this process came back from a checkpoint (restored or resumed), if ever.
    pub fn last_restore(&self) -> Option<RestoreInfo> {
        lock(&self.inner.state).last_restore.clone()
    }

    /// How the last cycle ended, whatever the reason (aborted included), if any did.
    pub fn last_cycle(&self) -> Option<RestoreInfo> {
        lock(&self.inner.state).last_cycle.clone()
    }

    /// Waits until no cycle is in progress, at most `timeout` if given; returns whether none
    /// is.
    pub fn wait_idle(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let state = lock(&self.inner.state);
        crate::wait::wait_while(&self.inner.cycle_ended, state, deadline, |s| s.in_cycle).1
    }

    /// Adds `hook` to what the retire phase tells, after those added before: a resource
    /// flushes what its successor may want (state to a file, a cache to its store) and stops
    /// taking new work. See [`retire`](Self::retire).
    pub fn on_retire(&self, name: impl Into<String>, hook: impl Fn() + Send + Sync + 'static) {
        self.inner.retirement.add(name.into(), Arc::new(hook));
    }

    /// The retire phase: a successor has taken over this process's listening sockets (`crac
    /// upgrade`, level handoff) and this process is to finish what it has and exit.
    ///
    /// Turns draining on ([`is_draining`](Self::is_draining)), runs every hook added with
    /// [`on_retire`](Self::on_retire), in order (a panicking hook is named and the others still
    /// run), then wakes [`wait_retired`](Self::wait_retired): the application stops accepting,
    /// lets the requests in flight finish and exits (with axum:
    /// `serve(...).with_graceful_shutdown(...)`). Connections that arrive meanwhile wait in the
    /// listening socket's queue, which the successor shares and accepts from.
    ///
    /// Runs once: a second call does nothing and returns no failures. Says which hooks
    /// panicked, and whether anything listens for retirement (a hook, or a thread waiting).
    pub fn retire(&self) -> Retired {
        self.set_draining(true);
        self.inner.retirement.begin()
    }

    /// Whether the retire phase has begun.
    pub fn is_retiring(&self) -> bool {
        self.inner.retirement.begun()
    }

    /// Waits until the retire phase has begun (its hooks have run), at most `timeout` if
    /// given; returns whether it has. A service's main thread (or a blocking task) waits here
    /// and then shuts down gracefully.
    pub fn wait_retired(&self, timeout: Option<Duration>) -> bool {
        self.inner.retirement.wait(timeout)
    }

    /// Whether a cycle is in progress.
    pub fn state(&self) -> CycleState {
        if lock(&self.inner.state).in_cycle {
            CycleState::Checkpointing
        } else {
            CycleState::Idle
        }
    }

    /// Enters a critical section: work that a checkpoint must not cut in half, and that must
    /// not run between a checkpoint's `before_checkpoint` and the end of its `after_restore`.
    ///
    /// Waits while a checkpoint is in progress. A checkpoint that starts while critical
    /// sections are held waits for them to end (at most [`Limits::quiesce`], then it is
    /// refused). Entering from inside a hook, or nesting in a thread that already holds one,
    /// never waits.
    ///
    /// ```
    /// let coordinator = crac_core::Coordinator::new();
    /// {
    ///     let _work = coordinator.critical_section();
    ///     // ... a request that must finish before any checkpoint ...
    /// }
    /// coordinator.simulate().unwrap();
    /// ```
    pub fn critical_section(&self) -> CriticalSection {
        self.inner
            .gate
            .enter(None)
            .expect("entering a critical section with no time limit always succeeds")
    }

    /// Enters a critical section from async code: the same gate as
    /// [`critical_section`](Self::critical_section), but the wait is a future that never
    /// blocks its thread, and the guard is `Send`, so it can be held across `.await`s in a
    /// request handler. The [`tower`](crate::tower) layer (feature `tower`) takes one per
    /// request.
    ///
    /// ```
    /// # async fn handler(coordinator: crac_core::Coordinator) {
    /// let _request = coordinator.critical_section_async().await;
    /// // ... a request that a checkpoint must not cut in half ...
    /// # }
    /// ```
    pub fn critical_section_async(&self) -> EnterAsync {
        self.inner.gate.enter_async()
    }

    /// The gate itself, for the tower layer's path with no future to wait on.
    #[cfg(feature = "tower")]
    pub(crate) fn gate(&self) -> &Arc<Gate> {
        &self.inner.gate
    }

    /// Like [`critical_section`](Self::critical_section), but gives up after `timeout`.
    pub fn try_critical_section(&self, timeout: Duration) -> Option<CriticalSection> {
        self.inner.gate.enter(Some(timeout))
    }

    /// Whether new critical sections would wait now.
    pub fn is_quiesced(&self) -> bool {
        self.inner.gate.is_shut()
    }

    /// Whether servers should drain now: answer with `Connection: close`, close idle
    /// keep-alive connections, and accept no new ones (leaving them in the listen queue).
    /// On from the start of a checkpoint until its cycle ends (restored, resumed or aborted),
    /// and for good once the process [retires](Self::retire) (its successor takes the
    /// connections); one atomic load.
    pub fn is_draining(&self) -> bool {
        self.inner.drain.is_on()
    }

    /// Turns draining on or off, waking what waits in [`draining`](Self::draining).
    pub(crate) fn set_draining(&self, on: bool) {
        self.inner.drain.set(on);
    }

    /// A future that is ready once [`is_draining`](Self::is_draining) is `on`: a server
    /// selects on `draining(true)` beside each connection to close it gracefully, and waits
    /// for `draining(false)` before it accepts again.
    pub fn draining(&self, on: bool) -> DrainChange {
        self.inner.drain.change(on)
    }

    /// Counts a client connection until the guard is dropped: a checkpoint, once draining is
    /// on, waits up to [`Limits::drain`] for every connection counted to end before it
    /// quiesces and tells the resources, so CRIU finds none. Take one per accepted
    /// connection, drop it when the connection is closed.
    pub fn connection(&self) -> ClientConnection {
        self.inner.drain.connection()
    }

    /// The client connections counted now (see [`connection`](Self::connection)).
    pub fn connections(&self) -> usize {
        self.inner.drain.connections()
    }

    /// First half of a cycle: drains (turns [draining](Self::is_draining) on and waits, at
    /// most [`Limits::drain`], for the [connections](Self::connection) counted to end),
    /// quiesces, then runs every `before_checkpoint` (last registered first).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Refused`] if any hook failed, panicked or timed out: every resource that
    /// was told has then been told `after_restore` with [`RestoreReason::Aborted`], and the
    /// error names every failure of both phases. Also [`ErrorKind::InProgress`],
    /// [`ErrorKind::Recursive`], [`ErrorKind::HeldByCaller`] and [`ErrorKind::Quiesce`], where
    /// no hook was called.
    pub fn checkpoint(&self) -> Result<Checkpoint, CheckpointError> {
        if in_hook() {
            return Err(CheckpointError::new(ErrorKind::Recursive));
        }
        if held_by_this_thread() {
            return Err(CheckpointError::new(ErrorKind::HeldByCaller));
        }
        let generation = {
            let mut state = lock(&self.inner.state);
            if state.in_cycle {
                return Err(CheckpointError::new(ErrorKind::InProgress));
            }
            state.in_cycle = true;
            state.generation
        };
        let limits = self.limits();
        let span = CycleSpan::start(generation);
        self.set_draining(true);
        self.inner.drain.wait_gone(limits.drain);
        let quiesce_started = Instant::now();
        if let Err(held) = self.inner.gate.shut_and_drain(limits.quiesce) {
            span.end(None, "critical sections still held");
            self.end_cycle(None);
            return Err(CheckpointError::new(ErrorKind::Quiesce {
                held,
                waited: quiesce_started.elapsed(),
            }));
        }

        let targets: Arc<[Target]> = self.inner.context.targets().into();
        let order = visit_order(targets.len(), Direction::Down).collect();
        let before = dispatch::run(
            &self.inner.hooks,
            &self.inner.busy,
            &targets,
            order,
            &Call::Before(CheckpointInfo { generation }),
            &limits,
            &span,
        );
        let mut checkpoint = Checkpoint {
            coordinator: self.clone(),
            told: told(&before.records),
            records: before.records,
            targets,
            span,
            done: false,
        };
        if checkpoint.records.iter().any(|r| r.failure.is_some()) {
            let rollback = checkpoint.finish(RestoreReason::Aborted, RestoreDetails::default());
            checkpoint.span.end(Some(RestoreReason::Aborted), "refused");
            return Err(CheckpointError::refused(
                checkpoint.take_records(),
                rollback,
            ));
        }
        Ok(checkpoint)
    }

    /// A whole cycle with no CRIU: `before_checkpoint`, then `after_restore` with reason
    /// [`RestoreReason::Restored`]. For applications' tests of their own hooks.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let coordinator = crac_core::Coordinator::new();
    /// let (b, a) = (log.clone(), log.clone());
    /// let _r = coordinator.context().register(crac_core::from_fns(
    ///     "conn",
    ///     move |_| { b.lock().unwrap().push("closed"); Ok(()) },
    ///     move |info| { a.lock().unwrap().push(info.reason.as_str()); Ok(()) },
    /// ));
    /// coordinator.simulate().unwrap();
    /// assert_eq!(*log.lock().unwrap(), ["closed", "restored"]);
    /// assert_eq!(coordinator.generation(), 1);
    /// ```
    ///
    /// # Errors
    ///
    /// As [`checkpoint`](Self::checkpoint) and [`Checkpoint::complete`].
    pub fn simulate(&self) -> Result<CycleReport, CheckpointError> {
        self.simulate_with(RestoreReason::Restored)
    }

    /// Like [`simulate`](Self::simulate), with the `after_restore` reason of your choice.
    ///
    /// # Errors
    ///
    /// As [`checkpoint`](Self::checkpoint) and [`Checkpoint::complete`].
    pub fn simulate_with(&self, reason: RestoreReason) -> Result<CycleReport, CheckpointError> {
        self.checkpoint()?.complete(reason)
    }

    fn end_cycle(&self, restore: Option<RestoreInfo>) {
        {
            let mut state = lock(&self.inner.state);
            if let Some(info) = restore {
                if info.reason != RestoreReason::Aborted {
                    state.generation = info.generation;
                    state.last_restore = Some(info.clone());
                }
                state.last_cycle = Some(info);
            }
            state.in_cycle = false;
        }
        // A retiring process keeps draining: its successor takes the connections.
        self.set_draining(self.is_retiring());
        self.inner.gate.open();
        self.inner.cycle_ended.notify_all();
    }
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("state", &self.state())
            .field("generation", &self.generation())
            .field("resources", &self.context().resource_names())
            .finish()
    }
}

/// The targets that must be told `after_restore`: those whose `before_checkpoint` was
/// called and returned (an overrunning hook is still running and is left alone).
fn told(records: &[HookRecord]) -> Vec<usize> {
    let mut told: Vec<usize> = records
        .iter()
        .filter(|r| r.failure.as_ref().is_none_or(|f| f.hook_returned()))
        .map(|r| r.target)
        .collect();
    told.sort_unstable();
    told
}

/// A checkpoint between its two halves: every `before_checkpoint` succeeded, critical
/// sections are held off, and the image may be taken now.
///
/// Call [`complete`](Self::complete) when the process runs again. Dropping it without doing so
/// completes it with [`RestoreReason::Aborted`], so a forgotten checkpoint never leaves the
/// resources down and the gate shut.
#[must_use = "dropping a Checkpoint aborts it at once (after_restore with reason aborted)"]
pub struct Checkpoint {
    coordinator: Coordinator,
    targets: Arc<[Target]>,
    told: Vec<usize>,
    records: Vec<HookRecord>,
    span: CycleSpan,
    done: bool,
}

impl Checkpoint {
    /// The `before_checkpoint` hooks, in the order they ran.
    pub fn hooks(&self) -> &[HookRecord] {
        &self.records
    }

    /// Second half of the cycle: runs every `after_restore` (first registered first) with
    /// `reason`, then lets critical sections in again.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::AfterRestoreFailed`] naming every hook that failed; the others were told
    /// all the same, and the cycle is over either way.
    pub fn complete(self, reason: RestoreReason) -> Result<CycleReport, CheckpointError> {
        self.complete_with(reason, RestoreDetails::default())
    }

    /// [`complete`](Self::complete), telling the hooks more about how the process came back
    /// ([`RestoreInfo::tcp`], [`RestoreInfo::env`]): the agent counts the connections and
    /// passes on the settings the restore was given.
    ///
    /// # Errors
    ///
    /// As [`complete`](Self::complete).
    pub fn complete_with(
        mut self,
        reason: RestoreReason,
        details: RestoreDetails,
    ) -> Result<CycleReport, CheckpointError> {
        let after = self.finish(reason, details);
        let failed = after.iter().any(|r| r.failure.is_some());
        let outcome = if failed { "after_restore failed" } else { "ok" };
        self.span.end(Some(reason), outcome);
        let mut records = self.take_records();
        records.extend(after);
        if failed {
            return Err(CheckpointError::after_restore_failed(records));
        }
        Ok(CycleReport { records })
    }

    fn take_records(&mut self) -> Vec<HookRecord> {
        std::mem::take(&mut self.records)
    }

    fn finish(&mut self, reason: RestoreReason, details: RestoreDetails) -> Vec<HookRecord> {
        self.done = true;
        let generation =
            self.coordinator.generation() + u64::from(reason != RestoreReason::Aborted);
        let info = RestoreInfo {
            reason,
            generation,
            at: SystemTime::now(),
            tcp: details.tcp,
            env: Arc::new(details.env),
        };
        let limits = self.coordinator.limits();
        let order = std::mem::take(&mut self.told);
        let after = dispatch::run(
            &self.coordinator.inner.hooks,
            &self.coordinator.inner.busy,
            &self.targets,
            order,
            &Call::After(info.clone(), lock(&self.coordinator.inner.watcher).clone()),
            &limits,
            &self.span,
        );
        self.coordinator.end_cycle(Some(info));
        after.records
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        if !self.done {
            self.finish(RestoreReason::Aborted, RestoreDetails::default());
            self.span
                .end(Some(RestoreReason::Aborted), "dropped without complete");
        }
    }
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("hooks", &self.records.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Coordinator state is updated field by field; a poisoned lock still holds usable data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
