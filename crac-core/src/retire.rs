//! The retire phase ([`Coordinator::retire`](crate::Coordinator::retire)): the hooks a process
//! runs when its successor has taken over, and the wait its main thread does for it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Hook = Arc<dyn Fn() + Send + Sync>;

/// The hooks, in the order they were added, and whether the phase has begun.
#[derive(Default)]
pub(crate) struct Retirement {
    state: Mutex<State>,
    begun: Condvar,
}

#[derive(Default)]
struct State {
    hooks: Vec<(String, Hook)>,
    /// Threads waiting in `wait` now.
    waiters: usize,
    /// Set once the hooks have run.
    done: bool,
    /// Set when the phase began (its hooks may still run).
    started: bool,
}

impl Retirement {
    pub(crate) fn add(&self, name: String, hook: Hook) {
        lock(&self.state).hooks.push((name, hook));
    }

    /// Runs the hooks once (outside the lock, so that a hook may look at the coordinator),
    /// then wakes the waiters.
    pub(crate) fn begin(&self) -> Retired {
        let (hooks, waiters) = {
            let mut state = lock(&self.state);
            if state.started {
                return Retired {
                    failed: Vec::new(),
                    heard: true,
                };
            }
            state.started = true;
            (state.hooks.clone(), state.waiters)
        };
        let heard = !hooks.is_empty() || waiters > 0;
        let mut failed = Vec::new();
        for (name, hook) in hooks {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| hook())) {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic with no message".to_owned());
                failed.push(format!("{name}: panicked: {message}"));
            }
        }
        lock(&self.state).done = true;
        self.begun.notify_all();
        Retired { failed, heard }
    }

    pub(crate) fn begun(&self) -> bool {
        lock(&self.state).started
    }

    pub(crate) fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        state.waiters += 1;
        let done = self.wait_locked(state, deadline);
        lock(&self.state).waiters -= 1;
        done
    }

    fn wait_locked(&self, state: MutexGuard<'_, State>, deadline: Option<Instant>) -> bool {
        crate::wait::wait_while(&self.begun, state, deadline, |s| !s.done).1
    }
}

/// What [`Coordinator::retire`](crate::Coordinator::retire) did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retired {
    /// The retire hooks that panicked, by name, with their message.
    pub failed: Vec<String>,
    /// Whether anything in the process listens for retirement: a retire hook, or a thread in
    /// [`Coordinator::wait_retired`](crate::Coordinator::wait_retired). A process where
    /// nothing does will not go by itself (`crac upgrade` then sends it SIGTERM, its ordinary
    /// way to stop).
    pub heard: bool,
}

fn lock(mutex: &Mutex<State>) -> MutexGuard<'_, State> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
