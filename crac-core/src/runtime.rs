//! Running [`AsyncResource`] hooks on the application's tokio runtime (feature `tokio`): the
//! one place where a cycle crosses from the coordinator's threads into a runtime.
//!
//! A hook's future is first polled on the hook thread, inside the runtime's context (so it can
//! use the runtime's I/O, timers and `spawn`): a hook that finishes without waiting costs no
//! hop between threads. If it waits for something, the future moves to the runtime as a task
//! and the runtime drives it from there; the hook thread waits for it on a plain channel,
//! never on the runtime, so a runtime whose threads are all busy or stopped cannot hang a
//! cycle past its deadline. At the deadline the task is aborted (its future dropped, which
//! closes what it held) and the hook thread waits for the drop to finish, so hooks of one
//! resource still never overlap.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use once_cell::sync::Lazy;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::async_resource::{AsyncResource, BoxFuture};
use crate::dispatch::{panic_message, set_in_hook, Call, Deadline};
use crate::report::HookFailure;
use crate::resource::HookError;
use crate::trace::HookSpan;

/// An async resource and the runtime its hooks run on.
pub(crate) struct AsyncHooks {
    resource: Arc<dyn AsyncResource>,
    runtime: Handle,
    /// Cleared when the runtime shuts down: a task that never ends is spawned on it, and
    /// clears it when the runtime drops it.
    runtime_alive: Arc<AtomicBool>,
    sentinel: AbortHandle,
}

/// Clears its flag when dropped.
struct Sentinel(Arc<AtomicBool>);

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The waker of a hook's first poll, on the hook thread: if the hook waits, it is polled
/// again as a task, with the task's waker, which is the one it must wake.
static FIRST_POLL: Lazy<Waker> = Lazy::new(|| {
    struct Nobody;
    impl Wake for Nobody {
        fn wake(self: Arc<Self>) {}
    }
    Waker::from(Arc::new(Nobody))
});

impl Drop for AsyncHooks {
    fn drop(&mut self) {
        self.sentinel.abort();
    }
}

/// How a hook's task ended: its result, or the message of its panic.
type Outcome = Result<Result<(), HookError>, String>;

impl AsyncHooks {
    /// The descriptors the resource declares it holds.
    pub(crate) fn descriptors(&self) -> Vec<std::os::fd::RawFd> {
        self.resource.descriptors()
    }

    pub(crate) fn new(resource: Arc<dyn AsyncResource>, runtime: Handle) -> AsyncHooks {
        let runtime_alive = Arc::new(AtomicBool::new(true));
        let sentinel = Sentinel(Arc::clone(&runtime_alive));
        let sentinel = runtime
            .spawn(async move {
                let _sentinel = sentinel;
                std::future::pending::<()>().await;
            })
            .abort_handle();
        AsyncHooks {
            resource,
            runtime,
            runtime_alive,
            sentinel,
        }
    }

    /// Runs the hook `call` names to completion, or cancels it at `deadline`.
    pub(crate) fn run(
        &self,
        call: &Call,
        deadline: Option<Deadline>,
        span: &HookSpan,
    ) -> Option<HookFailure> {
        if Handle::try_current().is_ok() {
            // Waiting here would block a thread of some runtime (a current-thread one for
            // good): this happens only when hooks run on the caller's thread (no time limits)
            // and the caller runs inside a runtime.
            return Some(HookFailure::NoRuntime(
                "it was due on a thread of a tokio runtime with no time limits, and waiting for \
                 it there would block that runtime; request the checkpoint from outside the \
                 runtime, or set Limits so hooks run on the coordinator's own thread"
                    .into(),
            ));
        }
        if !self.runtime_alive.load(Ordering::SeqCst) {
            return Some(runtime_shut_down());
        }
        let resource = Arc::clone(&self.resource);
        let call = call.clone();
        let mut hook = InHook {
            future: Box::pin(async move {
                match &call {
                    Call::Before(info) => resource.before_checkpoint(info).await,
                    Call::After(info, _) => resource.after_restore(info).await,
                }
            }),
            span: span.clone(),
        };
        let first = {
            let _context = self.runtime.enter();
            Pin::new(&mut hook).poll(&mut Context::from_waker(&FIRST_POLL))
        };
        let outcome = match first {
            Poll::Ready(outcome) => outcome,
            Poll::Pending => match self.finish_on_runtime(hook, deadline) {
                Ok(outcome) => outcome,
                Err(failure) => return Some(failure),
            },
        };
        match outcome {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(HookFailure::Error(err)),
            Err(message) => Some(HookFailure::Panicked(message)),
        }
    }

    /// Hands a hook that waits to the runtime, and waits for it until `deadline`.
    fn finish_on_runtime(
        &self,
        hook: InHook,
        deadline: Option<Deadline>,
    ) -> Result<Outcome, HookFailure> {
        let (done, outcome) = mpsc::sync_channel::<Outcome>(1);
        let task = self.runtime.spawn(async move {
            let _ = done.send(hook.await);
        });
        let received = match deadline {
            None => outcome.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(deadline) => {
                outcome.recv_timeout(deadline.at.saturating_duration_since(Instant::now()))
            }
        };
        match received {
            Ok(outcome) => Ok(outcome),
            Err(RecvTimeoutError::Timeout) => {
                task.abort();
                // Wait until the future is dropped; it may also have finished meanwhile.
                outcome.recv().map_err(|_| HookFailure::Cancelled {
                    limit: deadline.map(|d| d.limit).unwrap_or_default(),
                })
            }
            // The task was dropped unrun or half-run without us aborting it: the runtime
            // has shut down.
            Err(RecvTimeoutError::Disconnected) => Err(runtime_shut_down()),
        }
    }
}

fn runtime_shut_down() -> HookFailure {
    HookFailure::NoRuntime(
        "the tokio runtime this resource was registered with has shut down; keep the runtime \
         alive for as long as the resource is registered (drop the Registration before \
         shutting the runtime down)"
            .into(),
    )
}

/// A hook's future, polled as a hook: marked as in a hook (so it may enter critical sections
/// while a checkpoint holds them shut, and may not start a cycle), inside the hook's span,
/// with panics caught and turned into the outcome rather than the task's.
struct InHook {
    future: BoxFuture<'static, Result<(), HookError>>,
    span: HookSpan,
}

impl Future for InHook {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = &mut *self;
        let _entered = this.span.enter();
        let was_in_hook = set_in_hook(true);
        let polled = catch_unwind(AssertUnwindSafe(|| this.future.as_mut().poll(cx)));
        set_in_hook(was_in_hook);
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}
