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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::dispatch::in_hook;

thread_local! {
    /// Critical sections this thread holds; lets a thread nest them, and refuses a checkpoint
    /// requested by a thread that would wait for itself.
    static HELD_HERE: Cell<usize> = const { Cell::new(0) };
}

pub(crate) fn held_by_this_thread() -> bool {
    HELD_HERE.with(Cell::get) > 0
}

#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    shut: bool,
    held: usize,
    /// Tasks waiting in [`EnterAsync`] for the gate to open.
    waiting: Vec<Waker>,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Every update is a single field write, so a poisoned lock holds consistent data.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Enters a critical section, waiting while the gate is shut (at most `timeout`, if given).
    pub(crate) fn enter(self: &Arc<Self>, timeout: Option<Duration>) -> Option<CriticalSection> {
        if in_hook() {
            // Hooks run while the gate is shut on purpose; they must not wait for themselves.
            return Some(CriticalSection::new(None));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        // A thread that already holds one may nest another even while the gate is shut: the
        // checkpoint is waiting for it anyway.
        while state.shut && !held_by_this_thread() {
            state = match deadline {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    self.changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
            };
        }
        state.held += 1;
        Some(CriticalSection::new(Some(Arc::clone(self))))
    }

    /// Shuts the gate and waits up to `limit` for held sections to end. On time-out the gate is
    /// opened again and the number still held is returned.
    pub(crate) fn shut_and_drain(&self, limit: Duration) -> Result<(), usize> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        state.shut = true;
        while state.held > 0 {
            let now = Instant::now();
            if now >= deadline {
                let held = state.held;
                drop(state);
                self.open();
                return Err(held);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        Ok(())
    }

    pub(crate) fn open(&self) {
        let waiting = {
            let mut state = self.lock();
            state.shut = false;
            std::mem::take(&mut state.waiting)
        };
        self.changed.notify_all();
        waiting.into_iter().for_each(Waker::wake);
    }

    /// Enters a critical section without blocking: see [`EnterAsync`].
    pub(crate) fn enter_async(self: &Arc<Self>) -> EnterAsync {
        EnterAsync {
            gate: Some(Arc::clone(self)),
        }
    }

    pub(crate) fn is_shut(&self) -> bool {
        self.lock().shut
    }

    fn leave(&self) {
        let mut state = self.lock();
        state.held -= 1;
        if state.held == 0 {
            drop(state);
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
        if in_hook() {
            // An async hook runs while the gate is shut on purpose: it must not wait for itself.
            return Poll::Ready(AsyncCriticalSection { gate: None });
        }
        let mut state = gate.lock();
        if state.shut {
            if !state.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                state.waiting.push(cx.waker().clone());
            }
            drop(state);
            self.gate = Some(gate);
            return Poll::Pending;
        }
        state.held += 1;
        drop(state);
        Poll::Ready(AsyncCriticalSection { gate: Some(gate) })
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
