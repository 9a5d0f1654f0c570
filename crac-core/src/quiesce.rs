//! Critical sections: work that a checkpoint must not cut in half (DMTCP's
//! `disable_ckpt`/`enable_ckpt`).
//!
//! A checkpoint first shuts the gate: new critical sections wait. It then waits (bounded) for
//! the ones already held to end, and only then runs `before_checkpoint`. The gate stays shut
//! until every `after_restore` hook has returned, which covers the window between "hooks done"
//! and "CRIU froze us", and, in a restored process, the window between "CRIU let the threads
//! go" and "after_restore has reopened what the work needs".

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::dispatch::in_hook;
use crate::drain::Drain;

thread_local! {
    /// Critical sections this thread holds; lets a thread nest them, and refuses a checkpoint
    /// requested by a thread that would wait for itself.
    static HELD_HERE: Cell<usize> = const { Cell::new(0) };
}

pub(crate) fn held_by_this_thread() -> bool {
    HELD_HERE.with(Cell::get) > 0
}

/// The gate's word: bit 0 set while it is shut, the rest counts the sections held (in steps of
/// [`ONE`]). Entering and leaving an open gate is one atomic add each, with no lock: the lock
/// and the condition variable are only for waiting, on either side.
const SHUT: usize = 1;
const ONE: usize = 2;

pub(crate) struct Gate {
    word: AtomicUsize,
    /// The coordinator's draining flag, which the sections it lets in can read.
    drain: Arc<Drain>,
    /// Taken only to wait or to wake: tasks waiting in [`EnterAsync`] for the gate to open.
    waiting: Mutex<Vec<Waker>>,
    /// Signalled when the gate opens and when the last section held ends while it is shut.
    changed: Condvar,
}

impl Gate {
    pub(crate) fn new(drain: Arc<Drain>) -> Gate {
        Gate {
            word: AtomicUsize::new(0),
            drain,
            waiting: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Waker>> {
        // The list is only pushed to and taken whole, so a poisoned lock holds consistent data.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_shut_now(&self) -> bool {
        self.word.load(SeqCst) & SHUT != 0
    }

    /// Counts a section in if the gate is open (or `nested`); otherwise leaves the count as it
    /// was and says no.
    fn try_enter(&self, nested: bool) -> bool {
        let before = self.word.fetch_add(ONE, SeqCst);
        if before & SHUT == 0 || nested {
            return true;
        }
        // Shut meanwhile: take the count back, telling a checkpoint waiting for it to reach 0.
        self.leave();
        false
    }

    /// Enters a critical section, waiting while the gate is shut (at most `timeout`, if given).
    pub(crate) fn enter(self: &Arc<Self>, timeout: Option<Duration>) -> Option<CriticalSection> {
        if in_hook() {
            // Hooks run while the gate is shut on purpose; they must not wait for themselves.
            return Some(CriticalSection::new(None));
        }
        // A thread that already holds one may nest another even while the gate is shut: the
        // checkpoint is waiting for it anyway.
        let nested = held_by_this_thread();
        let deadline = timeout.map(|t| Instant::now() + t);
        while !self.try_enter(nested) {
            let waiting = self.lock();
            let (waiting, opened) =
                crate::wait::wait_while(&self.changed, waiting, deadline, |_| self.is_shut_now());
            drop(waiting);
            if !opened {
                return None;
            }
        }
        Some(CriticalSection::new(Some(Arc::clone(self))))
    }

    /// Shuts the gate and waits up to `limit` for held sections to end. On time-out the gate is
    /// opened again and the number still held is returned.
    pub(crate) fn shut_and_drain(&self, limit: Duration) -> Result<(), usize> {
        let deadline = Instant::now() + limit;
        self.word.fetch_or(SHUT, SeqCst);
        let mut waiting = self.lock();
        loop {
            let held = self.word.load(SeqCst) / ONE;
            if held == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                drop(waiting);
                self.open();
                return Err(held);
            }
            waiting = self
                .changed
                .wait_timeout(waiting, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    pub(crate) fn open(&self) {
        self.word.fetch_and(!SHUT, SeqCst);
        // Whoever saw the gate shut did so holding the lock, before it was taken here: it has
        // either seen it open since or registered to be woken below.
        let waiting = std::mem::take(&mut *self.lock());
        self.changed.notify_all();
        waiting.into_iter().for_each(Waker::wake);
    }

    /// Enters a critical section without blocking: see [`EnterAsync`].
    pub(crate) fn enter_async(self: &Arc<Self>) -> EnterAsync {
        EnterAsync {
            gate: Some(Arc::clone(self)),
        }
    }

    /// Counts a section in without waiting, for the async path: `None` while the gate is shut
    /// (nothing counted).
    pub(crate) fn try_enter_async(self: &Arc<Self>) -> Option<AsyncCriticalSection> {
        if in_hook() {
            // An async hook runs while the gate is shut on purpose: it must not wait for itself.
            return Some(AsyncCriticalSection { gate: None });
        }
        self.try_enter(false).then(|| AsyncCriticalSection {
            gate: Some(Arc::clone(self)),
        })
    }

    pub(crate) fn is_shut(&self) -> bool {
        self.is_shut_now()
    }

    fn leave(&self) {
        let before = self.word.fetch_sub(ONE, SeqCst);
        if before == SHUT | ONE {
            // The last one out while a checkpoint waits: wake it (under the lock, so that it
            // cannot be between its check and its wait).
            let _waiting = self.lock();
            self.changed.notify_all();
        }
    }
}

/// A guard that holds checkpoints off while it lives; see
/// [`Coordinator::critical_section`](crate::Coordinator::critical_section).
///
/// It is neither `Send` nor `Sync`: it belongs to the thread that entered it, which is what
/// lets a thread nest critical sections and lets a checkpoint requested by a thread that holds
/// one fail at once instead of waiting for itself.
#[must_use = "a critical section ends when the guard is dropped"]
pub struct CriticalSection {
    gate: Option<Arc<Gate>>,
    _not_send: PhantomData<*const ()>,
}

impl CriticalSection {
    fn new(gate: Option<Arc<Gate>>) -> CriticalSection {
        if gate.is_some() {
            HELD_HERE.with(|held| held.set(held.get() + 1));
        }
        CriticalSection {
            gate,
            _not_send: PhantomData,
        }
    }
}

impl Drop for CriticalSection {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            HELD_HERE.with(|held| held.set(held.get() - 1));
            gate.leave();
        }
    }
}

impl fmt::Debug for CriticalSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CriticalSection").finish_non_exhaustive()
    }
}

/// The future of [`Coordinator::critical_section_async`](crate::Coordinator::critical_section_async):
/// ready at once while no checkpoint is in progress; otherwise pending, without blocking its
/// thread, until the cycle's `after_restore` hooks have finished.
#[must_use = "futures do nothing unless awaited"]
pub struct EnterAsync {
    gate: Option<Arc<Gate>>,
}

impl Future for EnterAsync {
    type Output = AsyncCriticalSection;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AsyncCriticalSection> {
        let gate = self
            .gate
            .take()
            .expect("EnterAsync polled after it completed");
        if let Some(section) = gate.try_enter_async() {
            return Poll::Ready(section);
        }
        {
            // Registered before looking again, under the lock `open` takes after opening: no
            // wake-up is lost between the look and the registration.
            let mut waiting = gate.lock();
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
        }
        if let Some(section) = gate.try_enter_async() {
            return Poll::Ready(section);
        }
        self.gate = Some(gate);
        Poll::Pending
    }
}

impl fmt::Debug for EnterAsync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnterAsync").finish_non_exhaustive()
    }
}

/// A guard that holds checkpoints off while it lives, for async code: the `Send` twin of
/// [`CriticalSection`], taken with
/// [`Coordinator::critical_section_async`](crate::Coordinator::critical_section_async).
///
/// It may move between threads with its task and be held across `.await`s. Unlike the
/// thread-bound guard it cannot tell that its holder is the one asking for a checkpoint, so
/// do not nest one inside another in the same task while a checkpoint may start: the inner
/// one would wait for a checkpoint that waits for the outer one (the checkpoint then gives
/// up after [`Limits::quiesce`](crate::Limits::quiesce) and both go on).
#[must_use = "a critical section ends when the guard is dropped"]
pub struct AsyncCriticalSection {
    gate: Option<Arc<Gate>>,
}

impl AsyncCriticalSection {
    /// Whether the coordinator [drains](crate::Coordinator::is_draining) now, asked through
    /// the guard a request already holds (always `false` for one taken inside a hook).
    pub fn is_draining(&self) -> bool {
        self.gate.as_ref().is_some_and(|gate| gate.drain.is_on())
    }
}

impl Drop for AsyncCriticalSection {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.leave();
        }
    }
}

impl fmt::Debug for AsyncCriticalSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncCriticalSection")
            .finish_non_exhaustive()
    }
}
