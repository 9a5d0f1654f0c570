//! The thread hooks run on when time limits are set.
//!
//! Starting a thread per phase costs tens of microseconds (stack mapping, clone, join), more
//! than all the hooks of a typical service. So one thread is kept, and reused by the phases of
//! a cycle and by cycles in a row; it exits after [`IDLE`] without work, so an idle process
//! has no such thread. A thread stuck in a hook that overran is let go: the next phase starts
//! a new one, and the stuck one exits when its hook finally returns.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long the thread waits for more work before it exits.
const IDLE: Duration = Duration::from_secs(2);

type Job = Box<dyn FnOnce() + Send>;

/// The running thread's id and queue, if a thread runs.
type Slot = Mutex<Option<(u64, Sender<Job>)>>;

/// The coordinator's hook thread, started on demand.
#[derive(Default)]
pub(crate) struct HookThread {
    /// The running thread's id and queue. Sending and the thread's decision to exit both
    /// happen under this lock, so a job is never sent to a thread that is leaving.
    slot: Arc<Slot>,
    next_id: Mutex<u64>,
}

impl HookThread {
    /// Runs `job` on the hook thread, starting one if there is none.
    ///
    /// # Errors
    ///
    /// When no thread can be started; the job is handed back.
    pub(crate) fn run(&self, job: Job) -> Result<(), Job> {
        let mut slot = lock(&self.slot);
        let job = match slot.as_ref() {
            Some((_, sender)) => match sender.send(job) {
                Ok(()) => return Ok(()),
                // The thread is gone (it panicked outside a hook): start another.
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let id = {
            let mut next = lock(&self.next_id);
            *next += 1;
            *next
        };
        let (sender, receiver) = mpsc::channel::<Job>();
        let shared_slot = Arc::clone(&self.slot);
        let started = std::thread::Builder::new()
            .name("crac-hooks".into())
            .spawn(move || serve(id, &receiver, &shared_slot));
        if started.is_err() {
            return Err(job);
        }
        let _ = sender.send(job);
        *slot = Some((id, sender));
        Ok(())
    }

    /// Forgets the current thread (it is stuck in a hook): the next job starts a new one.
    pub(crate) fn abandon(&self) {
        lock(&self.slot).take();
    }
}

fn serve(id: u64, jobs: &Receiver<Job>, slot: &Slot) {
    loop {
        match jobs.recv_timeout(IDLE) {
            Ok(job) => job(),
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                let mut slot = lock(slot);
                // A job may have come in while we were deciding: do it, and stay.
                if let Ok(job) = jobs.try_recv() {
                    drop(slot);
                    job();
                    continue;
                }
                if slot.as_ref().is_some_and(|(current, _)| *current == id) {
                    *slot = None;
                }
                return;
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a field assignment; a poisoned lock holds usable data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
