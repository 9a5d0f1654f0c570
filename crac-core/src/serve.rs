//! A serve loop for hyper and axum (feature `serve`) that drains for checkpoints, so that a
//! plain `crac checkpoint` of a service with connected keep-alive clients goes through and no
//! request fails:
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! # let app = tower::service_fn(|_: http::Request<hyper::body::Incoming>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! # });
//! // axum: let app = Router::new().route(...).layer(CheckpointGateLayer::new().close_connections());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! crac_core::serve::serve(listener, app).await;
//! # Ok(())
//! # }
//! ```
//!
//! It serves HTTP/1.1 connections as [`axum::serve`] does, and while the coordinator
//! [drains](crate::Coordinator::is_draining) (from the start of a checkpoint until its cycle
//! ends):
//!
//! - it accepts nothing: the listener stays open, and new connections wait in its listen queue
//!   until the checkpoint is over (in a restored process, until `after_restore` has run);
//! - responses carry `Connection: close`, so a client that keeps sending closes its connection
//!   itself after its next answer;
//! - a connection still open after the [idle grace](Serve::idle_grace) (default 250 ms) is
//!   shut down gracefully: the request in progress is answered (`Connection: close`), an idle
//!   connection is closed;
//! - every connection is counted ([`Coordinator::connection`](crate::Coordinator::connection)),
//!   so the checkpoint waits (at most [`Limits::drain`](crate::Limits::drain)) for the last
//!   one to close before it quiesces, tells the resources, and lets the preflight look.
//!
//! Closing an idle HTTP/1.1 connection always races a request the client may be sending at
//! that instant. The grace makes it rare (a client that sent anything during it has closed by
//! itself), and clients that retry a request on a reused connection that closed before any
//! answer (curl, browsers, Go's net/http: RFC 9112, section 9.3.1) do not see it at all.
//!
//! [`axum::serve`]: https://docs.rs/axum/latest/axum/fn.serve.html

use std::convert::Infallible;
use std::fmt;
use std::future::{poll_fn, Future, IntoFuture};
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tower_service::Service;

use crate::coordinator::Coordinator;
use crate::tower::{CloseConnection, OnDrain};

/// The boxed error hyper takes from services and bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection may go on by itself once draining starts before it is shut down.
const IDLE_GRACE: Duration = Duration::from_millis(250);

/// Serves `service` on `listener`, draining for checkpoints; see the
/// [module documentation](self). Await it (it runs until its task is dropped), or set it up
/// first with [`Serve::with_coordinator`] and [`Serve::idle_grace`].
pub fn serve<S, B>(listener: TcpListener, service: S) -> Serve<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Serve {
        listener,
        service,
        coordinator: Coordinator::global().clone(),
        grace: IDLE_GRACE,
    }
}

/// A serve loop being set up: see [`serve`].
#[must_use = "a serve loop does nothing unless awaited"]
pub struct Serve<S> {
    listener: TcpListener,
    service: S,
    coordinator: Coordinator,
    grace: Duration,
}

impl<S> Serve<S> {
    /// Drains on `coordinator` rather than the [global](Coordinator::global) one (tests).
    pub fn with_coordinator(mut self, coordinator: Coordinator) -> Serve<S> {
        self.coordinator = coordinator;
        self
    }

    /// How long a connection may go on once draining starts, answering with
    /// `Connection: close`, before it is shut down (default 250 ms). Longer: fewer idle closes
    /// that race a request; shorter: a faster checkpoint when clients hold idle connections.
    pub fn idle_grace(mut self, grace: Duration) -> Serve<S> {
        self.grace = grace;
        self
    }
}

impl<S> fmt::Debug for Serve<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("listener", &self.listener)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl<S, B> IntoFuture for Serve<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Infallible;
    type IntoFuture = Pin<Box<dyn Future<Output = Infallible> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(accept_loop(self))
    }
}

async fn accept_loop<S, B>(serve: Serve<S>) -> Infallible
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Serve {
        listener,
        service,
        coordinator,
        grace,
    } = serve;
    loop {
        // While draining nothing is accepted: new clients wait in the listen queue.
        coordinator.draining(false).await;
        let accepted = {
            let mut draining = pin!(coordinator.draining(true));
            poll_fn(|cx| {
                if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                    return Poll::Ready(Some(accepted));
                }
                draining.as_mut().poll(cx).map(|()| None)
            })
            .await
        };
        match accepted {
            None => {}
            Some(Ok((stream, _))) => {
                let service = Closing {
                    inner: service.clone(),
                    coordinator: coordinator.clone(),
                };
                tokio::spawn(connection(stream, service, coordinator.clone(), grace));
            }
            // Out of descriptors or memory: as axum does, wait for some to be freed rather
            // than spin.
            Some(Err(error)) if !is_connection_error(&error) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Some(Err(_)) => {}
        }
    }
}

/// An error about one connection (the client gave up before it was accepted), not about the
/// listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn connection<S, B>(
    stream: TcpStream,
    service: Closing<S>,
    coordinator: Coordinator,
    grace: Duration,
) where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let _counted = coordinator.connection();
    let mut conn = pin!(http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)));
    if ends_before(conn.as_mut(), coordinator.draining(true)).await {
        return;
    }
    // Draining: a client that sends during the grace is answered with `Connection: close`
    // and closes by itself, with no race.
    if !ends_before(conn.as_mut(), tokio::time::sleep(grace)).await {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

/// Drives `conn` until it ends (true) or `stop` is ready first (false). How it ended is not
/// kept: its errors are the client's (it reset or sent garbage), and hyper has answered what
/// it could.
async fn ends_before<C: Future>(mut conn: Pin<&mut C>, stop: impl Future<Output = ()>) -> bool {
    let mut stop = pin!(stop);
    poll_fn(|cx| {
        if conn.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        stop.as_mut().poll(cx).map(|()| false)
    })
    .await
}

/// The application's service, with `Connection: close` on what it answers while draining.
#[derive(Clone)]
struct Closing<S> {
    inner: S,
    coordinator: Coordinator,
}

impl<S, B> Service<http::Request<Incoming>> for Closing<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ClosingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        ClosingFuture {
            inner: self.inner.call(request),
            coordinator: self.coordinator.clone(),
        }
    }
}

pin_project! {
    struct ClosingFuture<F> {
        #[pin]
        inner: F,
        coordinator: Coordinator,
    }
}

impl<F, B, E> Future for ClosingFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut output = ready!(this.inner.poll(cx));
        if let Ok(response) = &mut output {
            if this.coordinator.is_draining() {
                CloseConnection::on_drain(response);
            }
        }
        Poll::Ready(output)
    }
}
