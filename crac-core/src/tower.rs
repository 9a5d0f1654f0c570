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
//!
//! With no checkpoint running a request costs the gate two atomic additions (and the two of
//! the reference it keeps to the gate): no lock, no allocation. The inner service is called
//! at once; it is moved into the future only when the request has to wait.
//!
//! # Draining (HTTP, feature `http`)
//!
//! [`CheckpointGateLayer::close_connections`] makes a layer for `http` services that adds
//! `Connection: close` to every response while the coordinator
//! [drains](crate::Coordinator::is_draining), so HTTP/1.1 clients open a new connection for
//! their next request, which waits in the listen queue until the checkpoint is over. Closing
//! idle keep-alive connections and not accepting new ones is the server's part:
//! `crac_core::serve` (feature `serve`) does both for hyper and axum, and
//! docs/service-guide.md shows how for other servers.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::coordinator::Coordinator;
use crate::quiesce::{AsyncCriticalSection, EnterAsync};

/// What the gate does to a response that is ready while the coordinator drains.
pub trait OnDrain<Response> {
    /// Marks `response`, made while draining.
    fn on_drain(response: &mut Response);
}

/// Responses go out as they are: the plain gate's marker.
#[derive(Clone, Copy, Debug, Default)]
pub struct Untouched;

impl<Response> OnDrain<Response> for Untouched {
    fn on_drain(_: &mut Response) {}
}

/// HTTP responses get `Connection: close` while draining (feature `http`); hyper leaves the
/// header out of HTTP/2 responses, where it has no meaning.
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloseConnection;

#[cfg(feature = "http")]
impl<B> OnDrain<http::Response<B>> for CloseConnection {
    fn on_drain(response: &mut http::Response<B>) {
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

/// A [`Layer`] that gates every request on the checkpoint cycle; see the
/// [module documentation](self). `M` says what happens to responses while draining
/// ([`Untouched`], or [`CloseConnection`] from [`close_connections`](Self::close_connections)).
pub struct CheckpointGateLayer<M = Untouched> {
    coordinator: Coordinator,
    mark: PhantomData<fn() -> M>,
}

impl CheckpointGateLayer {
    /// Gates requests on the [global](Coordinator::global) coordinator, the one the agent
    /// drives.
    pub fn new() -> CheckpointGateLayer {
        CheckpointGateLayer::with_coordinator(Coordinator::global().clone())
    }

    /// Gates requests on `coordinator` (for tests with a coordinator of their own).
    pub fn with_coordinator(coordinator: Coordinator) -> CheckpointGateLayer {
        CheckpointGateLayer {
            coordinator,
            mark: PhantomData,
        }
    }
}

impl<M> CheckpointGateLayer<M> {
    /// The same gate for `http` services, adding `Connection: close` to the responses made
    /// while the coordinator drains (feature `http`).
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn close_connections(self) -> CheckpointGateLayer<CloseConnection> {
        CheckpointGateLayer {
            coordinator: self.coordinator,
            mark: PhantomData,
        }
    }
}

impl<M> Clone for CheckpointGateLayer<M> {
    fn clone(&self) -> Self {
        CheckpointGateLayer {
            coordinator: self.coordinator.clone(),
            mark: PhantomData,
        }
    }
}

impl Default for CheckpointGateLayer {
    fn default() -> CheckpointGateLayer {
        CheckpointGateLayer::new()
    }
}

impl<M> fmt::Debug for CheckpointGateLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointGateLayer")
            .finish_non_exhaustive()
    }
}

impl<S, M> Layer<S> for CheckpointGateLayer<M> {
    type Service = CheckpointGate<S, M>;

    fn layer(&self, inner: S) -> CheckpointGate<S, M> {
        CheckpointGate {
            inner,
            coordinator: self.coordinator.clone(),
            mark: PhantomData,
        }
    }
}

/// The service [`CheckpointGateLayer`] makes: `S`, with every call inside a critical section.
pub struct CheckpointGate<S, M = Untouched> {
    inner: S,
    coordinator: Coordinator,
    mark: PhantomData<fn() -> M>,
}

impl<S: Clone, M> Clone for CheckpointGate<S, M> {
    fn clone(&self) -> Self {
        CheckpointGate {
            inner: self.inner.clone(),
            coordinator: self.coordinator.clone(),
            mark: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for CheckpointGate<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointGate")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, M, Request> Service<Request> for CheckpointGate<S, M>
where
    S: Service<Request> + Clone,
    M: OnDrain<S::Response>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = GateFuture<S, Request, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let state = match self.coordinator.gate().try_enter_async() {
            // The usual case: the gate is open, the request is served at once.
            Some(section) => State::Serving {
                future: self.inner.call(request),
                section: Some(section),
            },
            // A checkpoint is on: the service that was driven to readiness waits with the
            // request, and a clone takes its place for the next (tower's usual way to move a
            // ready service into a future).
            None => {
                let clone = self.inner.clone();
                State::Waiting {
                    enter: self.coordinator.critical_section_async(),
                    service: Some(std::mem::replace(&mut self.inner, clone)),
                    request: Some(request),
                }
            }
        };
        GateFuture {
            state,
            mark: PhantomData,
        }
    }
}

pin_project! {
    /// The future of a [`CheckpointGate`]: the inner service's, inside a critical section.
    pub struct GateFuture<S, Request, M>
    where
        S: Service<Request>,
    {
        #[pin]
        state: State<S, Request, S::Future>,
        mark: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Request, F> {
        Waiting {
            enter: EnterAsync,
            service: Option<S>,
            request: Option<Request>,
        },
        Serving {
            #[pin]
            future: F,
            section: Option<AsyncCriticalSection>,
        },
    }
}

impl<S, Request, M> Future for GateFuture<S, Request, M>
where
    S: Service<Request>,
    M: OnDrain<S::Response>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting {
                    enter,
                    service,
                    request,
                } => {
                    let section = ready!(Pin::new(enter).poll(cx));
                    let (Some(mut service), Some(request)) = (service.take(), request.take())
                    else {
                        panic!("GateFuture polled after it completed");
                    };
                    let future = service.call(request);
                    this.state.set(State::Serving {
                        future,
                        section: Some(section),
                    });
                }
                StateProj::Serving { future, section } => {
                    let mut output = ready!(future.poll(cx));
                    let section = section.take();
                    if let (Ok(response), Some(section)) = (&mut output, &section) {
                        if section.is_draining() {
                            M::on_drain(response);
                        }
                    }
                    return Poll::Ready(output);
                }
            }
        }
    }
}

impl<S, Request, M> fmt::Debug for GateFuture<S, Request, M>
where
    S: Service<Request>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GateFuture").finish_non_exhaustive()
    }
}
