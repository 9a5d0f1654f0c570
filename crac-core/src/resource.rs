//! The [`Resource`] trait and the values its hooks receive.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::SystemTime;

/// The error a hook returns. Any error type converts into it with `?` or `.into()`.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Something that must be told before the process is checkpointed and after it runs again.
///
/// Typical resources close what cannot survive in an image (a connection to another host, a
/// lease, a file lock) in [`before_checkpoint`](Resource::before_checkpoint) and reopen it in
/// [`after_restore`](Resource::after_restore); anything unique or random created before the
/// checkpoint (seeds, ids, tokens) is renewed in `after_restore`, because every copy restored
/// from one image shares it.
///
/// # Threads and blocking
///
/// Hooks run one at a time, never concurrently with each other, on a thread owned by the
/// coordinator (a worker thread when time limits are set, otherwise the thread that asked for
/// the checkpoint). They may block, up to the per-hook time limit (see
/// [`Limits`](crate::Limits)); a hook that overruns is reported as failed and the cycle goes on
/// without waiting for it. It is still one at a time per resource: until that call returns, no
/// later cycle calls the resource (its hook is reported as
/// [`StillRunning`](crate::HookFailure::StillRunning), which refuses a checkpoint); and when a
/// `before_checkpoint` that overran returns `Ok` at last, the resource is told `after_restore`
/// with [`RestoreReason::Aborted`] then, since its checkpoint was refused.
///
/// # Ordering
///
/// `before_checkpoint` runs in reverse registration order, `after_restore` in registration
/// order, lower [`Priority`](crate::Priority) levels going down last and coming up first. A
/// resource whose `before_checkpoint` ran (successfully or not) is always told
/// `after_restore` in the same cycle, with [`RestoreReason::Aborted`] if the checkpoint did not
/// happen. A hook that fails or panics never stops the others from being told.
///
/// # Example
///
/// ```
/// use crac_core::{CheckpointInfo, HookError, Resource, RestoreInfo};
/// use std::sync::Mutex;
///
/// struct Pool { open: Mutex<bool> }
///
/// impl Resource for Pool {
///     fn name(&self) -> std::borrow::Cow<'_, str> { "db-pool".into() }
///     fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
///         *self.open.lock().unwrap() = false; // close the connections here
///         Ok(())
///     }
///     fn after_restore(&self, _: &RestoreInfo) -> Result<(), HookError> {
///         *self.open.lock().unwrap() = true; // and reopen them here
///         Ok(())
///     }
/// }
///
/// let coordinator = crac_core::Coordinator::new();
/// let _registration = coordinator.context().register(Pool { open: Mutex::new(true) });
/// coordinator.simulate().unwrap();
/// ```
pub trait Resource: Send + Sync {
    /// The name used in errors, reports and logs. Defaults to the type's name. It is asked
    /// once, when the resource is registered.
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(std::any::type_name::<Self>())
    }

    /// Called before the process is checkpointed. Quiesce here: stop background work, flush,
    /// close connections that cannot be part of an image.
    ///
    /// # Errors
    ///
    /// An error refuses the checkpoint: no image is made and every resource already told is
    /// told [`after_restore`](Resource::after_restore) with [`RestoreReason::Aborted`].
    fn before_checkpoint(&self, checkpoint: &CheckpointInfo) -> Result<(), HookError>;

    /// Called when the process runs again, with the reason why (see [`RestoreReason`]).
    ///
    /// # Errors
    ///
    /// An error is reported to whoever completed the cycle; the other resources are told
    /// anyway. The process runs on either way: there is nothing to roll back to.
    fn after_restore(&self, restore: &RestoreInfo) -> Result<(), HookError>;

    /// The descriptors this resource holds open and means to keep open across a checkpoint
    /// (a connection it closes only in some cases, a file it keeps). Asked only when a
    /// checkpoint is about to be refused for a descriptor, so that the refusal can name the
    /// resource that holds it ("held by resource `pool`"). Defaults to none.
    ///
    /// Asked from the agent's thread while no hook of this resource runs; it must not block.
    fn descriptors(&self) -> Vec<RawFd> {
        Vec::new()
    }
}

impl<R: Resource + ?Sized> Resource for Arc<R> {
    fn name(&self) -> Cow<'_, str> {
        (**self).name()
    }
    fn before_checkpoint(&self, checkpoint: &CheckpointInfo) -> Result<(), HookError> {
        (**self).before_checkpoint(checkpoint)
    }
    fn after_restore(&self, restore: &RestoreInfo) -> Result<(), HookError> {
        (**self).after_restore(restore)
    }
    fn descriptors(&self) -> Vec<RawFd> {
        (**self).descriptors()
    }
}

impl<R: Resource + ?Sized> Resource for Box<R> {
    fn name(&self) -> Cow<'_, str> {
        (**self).name()
    }
    fn before_checkpoint(&self, checkpoint: &CheckpointInfo) -> Result<(), HookError> {
        (**self).before_checkpoint(checkpoint)
    }
    fn after_restore(&self, restore: &RestoreInfo) -> Result<(), HookError> {
        (**self).after_restore(restore)
    }
    fn descriptors(&self) -> Vec<RawFd> {
        (**self).descriptors()
    }
}

/// A resource made of two closures, for small cases where a type of its own is too much.
///
/// ```
/// let coordinator = crac_core::Coordinator::new();
/// let _reg = coordinator.context().register(crac_core::from_fns(
///     "cache-flusher",
///     |_| { /* flush */ Ok(()) },
///     |_| { /* reseed */ Ok(()) },
/// ));
/// ```
pub fn from_fns<B, A>(name: impl Into<String>, before: B, after: A) -> FnResource<B, A>
where
    B: Fn(&CheckpointInfo) -> Result<(), HookError> + Send + Sync,
    A: Fn(&RestoreInfo) -> Result<(), HookError> + Send + Sync,
{
    FnResource {
        name: name.into(),
        before,
        after,
    }
}

/// The resource [`from_fns`] makes.
pub struct FnResource<B, A> {
    name: String,
    before: B,
    after: A,
}

impl<B, A> Resource for FnResource<B, A>
where
    B: Fn(&CheckpointInfo) -> Result<(), HookError> + Send + Sync,
    A: Fn(&RestoreInfo) -> Result<(), HookError> + Send + Sync,
{
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.name)
    }
    fn before_checkpoint(&self, checkpoint: &CheckpointInfo) -> Result<(), HookError> {
        (self.before)(checkpoint)
    }
    fn after_restore(&self, restore: &RestoreInfo) -> Result<(), HookError> {
        (self.after)(restore)
    }
}

impl<B, A> fmt::Debug for FnResource<B, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnResource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What [`Resource::before_checkpoint`] is told about the checkpoint being taken.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointInfo {
    /// How many checkpoints this process (and the images it came from) completed before this
    /// one.
    pub generation: u64,
}

/// Why [`Resource::after_restore`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RestoreReason {
    /// This is a new process, restored from an image. Renew anything unique (ids, seeds,
    /// credentials): other copies restored from the same image share it.
    Restored,
    /// The same process goes on after an image of it was taken (a `--leave-running` dump).
    Resumed,
    /// The checkpoint did not happen (a hook failed, the dump failed or was cancelled): the
    /// same process goes on, and no image of this cycle exists.
    Aborted,
}

impl RestoreReason {
    /// The reason's name on the wire and in logs: `restored`, `resumed` or `aborted`.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreReason::Restored => "restored",
            RestoreReason::Resumed => "resumed",
            RestoreReason::Aborted => "aborted",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(name: &str) -> Option<RestoreReason> {
        match name {
            "restored" => Some(RestoreReason::Restored),
            "resumed" => Some(RestoreReason::Resumed),
            "aborted" => Some(RestoreReason::Aborted),
            _ => None,
        }
    }
}

impl fmt::Display for RestoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`Resource::after_restore`] is told.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreInfo {
    /// Why the hook runs.
    pub reason: RestoreReason,
    /// Completed checkpoints, this one included unless it was [`RestoreReason::Aborted`].
    pub generation: u64,
    /// When the after-restore notification started: for a restored process, when it began
    /// to run again.
    pub at: SystemTime,
    /// What became of the established TCP connections the process held when the image was
    /// taken (counted by the agent; zero in a simulated cycle).
    pub tcp: TcpConnections,
    /// Settings handed to the restored process by whoever restored it (`crac restore --env
    /// K=V`, or what `crac run`'s own environment changes): a new log level, a new upstream
    /// address. Empty unless given. The process's own environment stays the image's: a
    /// service that wants a new value reads it here and applies it. See [`var`](Self::var).
    pub env: Arc<BTreeMap<String, String>>,
}

impl RestoreInfo {
    /// A setting handed over at restore ([`env`](Self::env)), if given.
    ///
    /// ```
    /// # fn after_restore(info: &crac_core::RestoreInfo) {
    /// if let Some(level) = info.var("LOG_LEVEL") {
    ///     // apply the new log level
    /// #   let _ = level;
    /// }
    /// # }
    /// ```
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }
}

/// How a process came back, beyond the reason: what
/// [`Checkpoint::complete_with`](crate::Checkpoint::complete_with) tells the `after_restore`
/// hooks through [`RestoreInfo`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreDetails {
    /// See [`RestoreInfo::tcp`].
    pub tcp: TcpConnections,
    /// See [`RestoreInfo::env`].
    pub env: BTreeMap<String, String>,
}

impl RestoreDetails {
    /// These details with what became of the TCP connections.
    pub fn with_tcp(mut self, tcp: TcpConnections) -> RestoreDetails {
        self.tcp = tcp;
        self
    }

    /// These details with settings for the restored process.
    pub fn with_env(mut self, env: BTreeMap<String, String>) -> RestoreDetails {
        self.env = env;
        self
    }
}

/// What became of a process's established TCP connections across a checkpoint.
///
/// A dump with `--tcp-established` keeps them; a restore with `--tcp-close` (podman's option
/// too) brings them back closed: the socket is still there, but it is no longer connected and
/// reads and writes fail. A resource that owns such a connection tells the two apart here,
/// and reconnects when it must.
///
/// ```
/// use crac_core::{RestoreInfo, TcpConnections};
///
/// fn after_restore(info: &RestoreInfo) {
///     if info.tcp.closed > 0 {
///         // reconnect what came back closed
///     }
/// }
/// # let _ = after_restore;
/// # assert_eq!(TcpConnections::default().kept, 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct TcpConnections {
    /// Connections established when the checkpoint was taken that are connected again.
    pub kept: usize,
    /// Connections established when the checkpoint was taken that came back closed.
    pub closed: usize,
}

impl TcpConnections {
    /// `kept` connections still connected, `closed` ones no longer.
    pub fn new(kept: usize, closed: usize) -> TcpConnections {
        TcpConnections { kept, closed }
    }
}
