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
    /// then wakes the waiters. The hooks that panicked, by name.
    pub(crate) fn begin(&self) -> Vec<String> {
        let hooks = {
            let mut state = lock(&self.state);
            if state.started {
                return Vec::new();
            }
            state.started = true;
            state.hooks.clone()
        };
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
        failed
    }

    pub(crate) fn begun(&self) -> bool {
        lock(&self.state).started
    }

    pub(crate) fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        while !state.done {
            state = match deadline {
                None => self
                    .begun
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    self.begun
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
            };
        }
        true
    }
}

fn lock(mutex: &Mutex<State>) -> MutexGuard<'_, State> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
