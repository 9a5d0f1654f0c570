//! Coordinated Restore at Checkpoint for Rust: the API and its semantics.
//!
//! A service registers [`Resource`]s: things that must be told before the process is
//! checkpointed (close a connection, flush a cache, stop accepting) and after it runs again
//! (reconnect, reseed, resume). This crate decides who is told what, in which order, with which
//! time limits, and what happens when a hook fails. It does no I/O: the `crac-agent` crate lets
//! CRIU's action script (`crac-action`) drive the [global](Coordinator::global) coordinator
//! over a Unix socket, and [`Coordinator::simulate`] drives it with no CRIU at all, for tests.
//!
//! # Anatomy
//!
//! - [`Resource`]: the two hooks, [`CheckpointInfo`] and [`RestoreInfo`] (with the
//!   [`RestoreReason`]: `restored`, `resumed` or `aborted`).
//! - [`Context`]: an ordered, nestable set of resources; [`Registration`] keeps one
//!   registered; [`Priority`] levels; [`register_static!`] for compile-time registration.
//! - [`Coordinator`]: runs a cycle in two halves ([`Coordinator::checkpoint`] then
//!   [`Checkpoint::complete`]), one cycle at a time, under [`Limits`]; keeps the generation and
//!   the last restore time; [`CriticalSection`]s hold checkpoints off.
//! - [`CheckpointError`] and [`CycleReport`]: every hook's outcome and duration, by name.
//! - The retire phase of an upgrade: [`Coordinator::on_retire`], [`Coordinator::retire`],
//!   [`Coordinator::wait_retired`], and draining ([`Coordinator::is_draining`]).
//! - Who holds a descriptor, for a refused checkpoint to name: [`Resource::descriptors`]
//!   (declared), [`Coordinator::declared_descriptors`], and an [`AfterRestoreWatcher`] told
//!   around each `after_restore` (the agent notes what each one opened).
//!
//! # The contract
//!
//! 1. `before_checkpoint` runs in reverse registration order, `after_restore` in registration
//!    order; [`Priority`] levels and nested contexts let infrastructure go down last and come
//!    up first.
//! 2. Everyone is told: a failing, panicking or overrunning hook never skips the others. If
//!    any `before_checkpoint` fails, the checkpoint is refused, every resource that was told is
//!    told `after_restore` with [`RestoreReason::Aborted`], and the [`CheckpointError`] names
//!    every failure of both phases.
//! 3. `after_restore` says why it runs, with a generation counter and the time.
//! 4. Registration is owned: dropping the [`Registration`] unregisters. Registering during a
//!    cycle takes effect in the next one.
//! 5. One cycle at a time; a cycle requested from inside a hook is an error, not a deadlock.
//! 6. Per-hook and per-phase [`Limits`]; an overrun is an error naming the resource, and
//!    that resource's hooks still never overlap (it sits out cycles until the call returns).
//! 7. [`CriticalSection`]s: a checkpoint waits (bounded) for them, and new ones wait until
//!    `after_restore` has finished.
//! 8. [`Coordinator::simulate`]: a whole cycle without CRIU.
//! 9. Draining: a checkpoint turns [draining](Coordinator::is_draining) on first, and waits
//!    (at most [`Limits::drain`]) for the client [connections](Coordinator::connection)
//!    servers count to close before it quiesces; draining is off again when the cycle ends,
//!    however it ends.
//! 10. Retirement (a successor has taken over: `crac upgrade`): [`Coordinator::retire`] turns
//!     draining on ([`Coordinator::is_draining`]), runs every hook added with
//!     [`Coordinator::on_retire`] once, in order, everyone told even if one panics (it is
//!     named), then wakes [`Coordinator::wait_retired`]; the application stops accepting, lets
//!     its requests finish and exits. A second call does nothing.
//!
//! # Example
//!
//! ```
//! use crac_core::{CheckpointInfo, HookError, Resource, RestoreInfo, RestoreReason};
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::sync::Arc;
//!
//! struct Upstream { connected: AtomicBool }
//!
//! impl Resource for Upstream {
//!     fn name(&self) -> std::borrow::Cow<'_, str> { "upstream".into() }
//!     fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
//!         self.connected.store(false, Ordering::SeqCst); // disconnect
//!         Ok(())
//!     }
//!     fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
//!         self.connected.store(true, Ordering::SeqCst); // reconnect, whatever the reason
//!         Ok(())
//!     }
//! }
//!
//! let upstream = Arc::new(Upstream { connected: AtomicBool::new(true) });
//! // In a service: crac_core::global_context().register(...).keep()
//! let coordinator = crac_core::Coordinator::new();
//! let _registration = coordinator.context().register(upstream.clone());
//!
//! let report = coordinator.simulate().unwrap();
//! assert_eq!(report.hooks().len(), 2);
//! assert!(upstream.connected.load(Ordering::SeqCst));
//! assert_eq!(coordinator.last_restore().unwrap().reason, RestoreReason::Restored);
//! ```
//!
//! # Async services
//!
//! [`AsyncResource`] is the async twin of [`Resource`] (and [`from_async_fns`] of
//! [`from_fns`]): hooks that return futures, run as tasks on the application's own runtime
//! ([`Context::register_async`], feature `tokio`), in the same order and under the same limits
//! as sync ones; one still pending at its limit is cancelled. Request handlers take a `Send`
//! guard with [`Coordinator::critical_section_async`], or let the [`tower`] layer (feature
//! `tower`) take one per request.
//!
//! # Draining
//!
//! A checkpoint starts by turning draining on ([`Coordinator::is_draining`],
//! [`Coordinator::draining`]) and waits, at most [`Limits::drain`], for the client connections
//! servers count ([`Coordinator::connection`]) to close before it quiesces, so that CRIU finds
//! no established connection to refuse. Servers stop accepting, answer with
//! `Connection: close` and close idle connections meanwhile: `serve` (feature `serve`) does
//! it for hyper and axum.
//!
//! # Features
//!
//! All off by default; the crate then depends on nothing async.
//!
//! - `tokio`: [`Context::register_async`], hooks run on a tokio runtime.
//! - `tower`: the [`tower`] module's request-gating layer.
//! - `http`: the gate's `Connection: close` while draining, for `http` services (implies
//!   `tower`).
//! - `serve`: `serve`, a hyper/axum serve loop that drains (implies `http` and `tokio`).
//! - `tracing`: a `crac.cycle` span per cycle and a `crac.hook` span per hook (resource,
//!   phase, reason, duration, outcome), and a warning per failed hook. Without it the crate
//!   logs nothing.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod async_resource;
mod context;
mod coordinator;
mod dispatch;
mod drain;
mod error;
mod hook_thread;
mod hook_watch;
mod ordering;
mod quiesce;
mod report;
mod resource;
mod retire;
#[cfg(feature = "tokio")]
mod runtime;
#[cfg(feature = "serve")]
#[cfg_attr(docsrs, doc(cfg(feature = "serve")))]
pub mod serve;
mod statics;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;
mod trace;
mod wait;

pub use async_resource::{from_async_fns, AsyncFnResource, AsyncResource, BoxFuture};
pub use context::{Context, Registration};
pub use coordinator::{Checkpoint, Coordinator, CycleState, Limits};
pub use drain::{ClientConnection, DrainChange};
pub use error::{CheckpointError, ErrorKind};
pub use hook_watch::AfterRestoreWatcher;
pub use ordering::Priority;
pub use quiesce::{AsyncCriticalSection, CriticalSection, EnterAsync};
pub use report::{CycleReport, HookFailure, HookRecord, Phase};
pub use resource::{
    from_fns, CheckpointInfo, FnResource, HookError, Resource, RestoreDetails, RestoreInfo,
    RestoreReason, TcpConnections,
};
pub use retire::Retired;
pub use statics::StaticResource;

/// The global coordinator's root context: `crac_core::global_context().register(r).keep()`.
pub fn global_context() -> &'static Context {
    Coordinator::global().context()
}

/// Enters a critical section of the global coordinator; see
/// [`Coordinator::critical_section`].
pub fn critical_section() -> CriticalSection {
    Coordinator::global().critical_section()
}

/// Enters a critical section of the global coordinator from async code; see
/// [`Coordinator::critical_section_async`].
pub fn critical_section_async() -> EnterAsync {
    Coordinator::global().critical_section_async()
}

/// Whether the current thread is running a hook (of any coordinator). Whatever would wait for
/// a cycle (a checkpoint of this process, say) must not be started from inside one.
pub fn in_hook() -> bool {
    dispatch::in_hook()
}

/// Whether the current thread holds a [`CriticalSection`] (of any coordinator). A thread that
/// does must not wait for a checkpoint: the checkpoint waits for it.
pub fn in_critical_section() -> bool {
    quiesce::held_by_this_thread()
}

#[doc(hidden)]
pub mod __private {
    pub use inventory;
}
