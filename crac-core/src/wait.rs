//! Waiting on a condition variable with an optional deadline: the one loop the coordinator's
//! waits (a cycle's end, the retire phase, the gate opening) share.

use std::sync::{Condvar, MutexGuard, PoisonError};
use std::time::Instant;

/// Waits on `condvar` while `blocked` holds, until `deadline` if there is one. Returns the
/// guard and whether `blocked` stopped holding (`false`: the deadline passed first). A
/// poisoned lock is waited on as it is: what it guards is a few counters and flags, written
/// whole, never left half-done by a panicking hook.
pub(crate) fn wait_while<'a, T>(
    condvar: &Condvar,
    mut guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
    mut blocked: impl FnMut(&mut T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    while blocked(&mut guard) {
        guard = match deadline {
            None => condvar.wait(guard).unwrap_or_else(PoisonError::into_inner),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return (guard, false);
                }
                condvar
                    .wait_timeout(guard, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
    }
    (guard, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn it_returns_once_the_condition_clears_or_says_the_deadline_came_first() {
        let shared = Arc::new((Mutex::new(true), Condvar::new()));
        let (lock, condvar) = &*shared;
        let soon = Some(Instant::now() + Duration::from_millis(20));
        let (guard, cleared) = wait_while(condvar, lock.lock().unwrap(), soon, |busy| *busy);
        assert!(!cleared && *guard);
        drop(guard);
        let other = Arc::clone(&shared);
        let clearer = std::thread::spawn(move || {
            *other.0.lock().unwrap() = false;
            other.1.notify_all();
        });
        let (guard, cleared) = wait_while(condvar, lock.lock().unwrap(), None, |busy| *busy);
        assert!(cleared && !*guard);
        drop(guard);
        clearer.join().unwrap();
    }
}
