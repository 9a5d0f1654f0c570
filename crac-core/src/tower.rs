//! Request gating as a tower layer (feature `tower`): every request is a critical section, so
//! a checkpoint waits (bounded) for the requests in flight, and requests that arrive during a
//! checkpoint wait, without blocking a thread, until its `after_restore` hooks have finished.
//!
//! ```
//! # fn app() -> tower::util::ServiceFn<fn(()) -> std::future::Ready<Result<(), ()>>> {
//! #     tower::service_fn(|()| std::future::ready(Ok(())))
//! # }
//! use tower::ServiceBuilder;
//!
//! // axum: Router::new().route(...).layer(crac_core::tower::CheckpointGateLayer::new())
//! let service = ServiceBuilder::new()
//!     .layer(crac_core::tower::CheckpointGateLayer::new())
//!     .service(app());
//! # let _ = service;
//! ```
//!
//! The guard is held until the inner service's future resolves: for an HTTP server, until the
//! response's head is ready. A response whose body streams on after that is not covered; take
//! a [`critical_section_async`](crate::Coordinator::critical_section_async) guard into the
//! body's stream for those.

use std::fmt;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use crate::async_resource::BoxFuture;
use crate::coordinator::Coordinator;

/// A [`Layer`] that gates every request on the checkpoint cycle; see the
/// [module documentation](self).
#[derive(Clone)]
pub struct CheckpointGateLayer {
    coordinator: Coordinator,
}

impl CheckpointGateLayer {
    /// Gates requests on the [global](Coordinator::global) coordinator, the one the agent
    /// drives.
    pub fn new() -> CheckpointGateLayer {
        CheckpointGateLayer::with_coordinator(Coordinator::global().clone())
    }

    /// Gates requests on `coordinator` (for tests with a coordinator of their own).
    pub fn with_coordinator(coordinator: Coordinator) -> CheckpointGateLayer {
        CheckpointGateLayer { coordinator }
    }
}

impl Default for CheckpointGateLayer {
    fn default() -> CheckpointGateLayer {
        CheckpointGateLayer::new()
    }
}

impl fmt::Debug for CheckpointGateLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointGateLayer")
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for CheckpointGateLayer {
    type Service = CheckpointGate<S>;

    fn layer(&self, inner: S) -> CheckpointGate<S> {
        CheckpointGate {
            inner,
            coordinator: self.coordinator.clone(),
        }
    }
}

/// The service [`CheckpointGateLayer`] makes: `S`, with every call inside a critical section.
#[derive(Clone)]
pub struct CheckpointGate<S> {
    inner: S,
    coordinator: Coordinator,
}

impl<S: fmt::Debug> fmt::Debug for CheckpointGate<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointGate")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, Request> Service<Request> for CheckpointGate<S>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Future: Send + 'static,
    Request: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service that was driven to readiness serves this request; a clone takes its
        // place for the next (tower's usual way to move a ready service into a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let enter = self.coordinator.critical_section_async();
        Box::pin(async move {
            let _request = enter.await;
            inner.call(request).await
        })
    }
}
