//! Running [`AsyncResource`] hooks on the application's tokio runtime (feature `tokio`): the
//! one place where a cycle crosses from the coordinator's threads into a runtime.
//!
//! The hook's future is spawned on the runtime the resource was registered with, so it can
//! use that runtime's I/O and timers; the hook thread waits for it on a plain channel, never
//! on the runtime, so a runtime whose threads are all busy or stopped cannot hang a cycle
//! past its deadline. At the deadline the task is aborted (its future dropped, which closes
//! what it held) and the hook thread waits for the drop to finish, so hooks of one resource
//! still never overlap.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::runtime::Handle;

use crate::async_resource::{AsyncResource, BoxFuture};
use crate::dispatch::{panic_message, set_in_hook, Call, Deadline};
use crate::report::HookFailure;
use crate::resource::HookError;
use crate::trace::HookSpan;

/// An async resource and the runtime its hooks run on.
pub(crate) struct AsyncHooks {
    pub(crate) resource: Arc<dyn AsyncResource>,
    pub(crate) runtime: Handle,
}

/// How a hook's task ended: its result, or the message of its panic.
type Outcome = Result<Result<(), HookError>, String>;

impl AsyncHooks {
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
        let resource = Arc::clone(&self.resource);
        let call = call.clone();
        let hook = InHook {
            future: Box::pin(async move {
                match &call {
                    Call::Before(info) => resource.before_checkpoint(info).await,
                    Call::After(info) => resource.after_restore(info).await,
                }
            }),
            span: span.clone(),
        };
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
        let outcome = match received {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout) => {
                task.abort();
                // Wait until the future is dropped; it may also have finished meanwhile.
                match outcome.recv() {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        let limit = deadline.map(|d| d.limit).unwrap_or_default();
                        return Some(HookFailure::Cancelled { limit });
                    }
                }
            }
            // The task was dropped unrun or half-run without us aborting it: the runtime
            // has shut down.
            Err(RecvTimeoutError::Disconnected) => {
                return Some(HookFailure::NoRuntime(
                    "the tokio runtime this resource was registered with has shut down; keep \
                     the runtime alive for as long as the resource is registered (drop the \
                     Registration before shutting the runtime down)"
                        .into(),
                ))
            }
        };
        match outcome {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(HookFailure::Error(err)),
            Err(message) => Some(HookFailure::Panicked(message)),
        }
    }
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
