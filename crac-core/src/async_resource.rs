//! [`AsyncResource`]: the async twin of [`Resource`](crate::Resource), for services whose
//! connections, pools and clients live on an async runtime.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;

use crate::resource::{CheckpointInfo, HookError, RestoreInfo};

/// A boxed future that can move between threads: what [`AsyncResource`]'s hooks return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A resource whose hooks are async: they run in the application's own runtime, so they can
/// use its I/O (close a pool and wait until its sockets are shut, reconnect a client).
///
/// A hook starts on the coordinator's thread, inside the runtime's context, and goes on as a
/// task of the runtime once it waits for something; so it must not rely on running on one of
/// the runtime's worker threads (`block_in_place`, task-locals of the caller).
///
/// The methods return boxed futures, which keeps the trait object-safe: async resources are
/// stored beside sync [`Resource`](crate::Resource)s in the same [`Context`](crate::Context)
/// and are ordered, prioritised, limited, rolled back and reported exactly like them (see
/// [`Resource`](crate::Resource) for the contract). AWS Lambda's `SnapStartResource` has the
/// same shape.
///
/// Register one with [`Context::register_async`](crate::Context::register_async) (feature
/// `tokio`), naming the runtime its hooks run on.
///
/// # Time limits
///
/// An async hook that is still pending at its limit is cancelled: its future is dropped,
/// which runs the destructors of whatever it held, and the hook is reported as
/// [`HookFailure::Cancelled`](crate::HookFailure::Cancelled). Code that blocks its thread
/// inside the future cannot be cancelled that way; it is then treated like an overrunning sync
/// hook.
///
/// # Example
///
/// ```
/// use crac_core::{AsyncResource, BoxFuture, CheckpointInfo, HookError, RestoreInfo};
/// use std::sync::atomic::{AtomicBool, Ordering};
///
/// struct Client { connected: AtomicBool }
///
/// impl AsyncResource for Client {
///     fn name(&self) -> std::borrow::Cow<'_, str> { "client".into() }
///     fn before_checkpoint<'a>(&'a self, _: &'a CheckpointInfo)
///         -> BoxFuture<'a, Result<(), HookError>> {
///         Box::pin(async move {
///             self.connected.store(false, Ordering::SeqCst); // close().await here
///             Ok(())
///         })
///     }
///     fn after_restore<'a>(&'a self, _: &'a RestoreInfo)
///         -> BoxFuture<'a, Result<(), HookError>> {
///         Box::pin(async move {
///             self.connected.store(true, Ordering::SeqCst); // connect().await here
///             Ok(())
///         })
///     }
/// }
/// # let _ = Client { connected: AtomicBool::new(true) };
/// ```
pub trait AsyncResource: Send + Sync {
    /// The name used in errors, reports and logs. Defaults to the type's name. It is asked
    /// once, when the resource is registered.
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(std::any::type_name::<Self>())
    }

    /// Called before the process is checkpointed; see
    /// [`Resource::before_checkpoint`](crate::Resource::before_checkpoint).
    fn before_checkpoint<'a>(
        &'a self,
        checkpoint: &'a CheckpointInfo,
    ) -> BoxFuture<'a, Result<(), HookError>>;

    /// Called when the process runs again; see
    /// [`Resource::after_restore`](crate::Resource::after_restore).
    fn after_restore<'a>(
        &'a self,
        restore: &'a RestoreInfo,
    ) -> BoxFuture<'a, Result<(), HookError>>;

    /// The descriptors this resource holds open; see
    /// [`Resource::descriptors`](crate::Resource::descriptors). Defaults to none.
    fn descriptors(&self) -> Vec<RawFd> {
        Vec::new()
    }
}

impl<R: AsyncResource + ?Sized> AsyncResource for Arc<R> {
    fn name(&self) -> Cow<'_, str> {
        (**self).name()
    }
    fn before_checkpoint<'a>(
        &'a self,
        checkpoint: &'a CheckpointInfo,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        (**self).before_checkpoint(checkpoint)
    }
    fn after_restore<'a>(
        &'a self,
        restore: &'a RestoreInfo,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        (**self).after_restore(restore)
    }
    fn descriptors(&self) -> Vec<RawFd> {
        (**self).descriptors()
    }
}

impl<R: AsyncResource + ?Sized> AsyncResource for Box<R> {
    fn name(&self) -> Cow<'_, str> {
        (**self).name()
    }
    fn before_checkpoint<'a>(
        &'a self,
        checkpoint: &'a CheckpointInfo,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        (**self).before_checkpoint(checkpoint)
    }
    fn after_restore<'a>(
        &'a self,
        restore: &'a RestoreInfo,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        (**self).after_restore(restore)
    }
    fn descriptors(&self) -> Vec<RawFd> {
        (**self).descriptors()
    }
}

/// An async resource made of two closures that return futures: the async twin of
/// [`from_fns`](crate::from_fns).
///
/// The closures get the info by value, so the futures they return can own everything they
/// use (clone an `Arc` of the state into an `async move` block).
///
/// ```
/// # #[cfg(feature = "tokio")] {
/// use std::sync::Arc;
/// use tokio::sync::Mutex;
///
/// let runtime = tokio::runtime::Runtime::new().unwrap();
/// let log = Arc::new(Mutex::new(Vec::new()));
/// let (b, a) = (log.clone(), log.clone());
/// let coordinator = crac_core::Coordinator::new();
/// let _reg = coordinator.context().register_async(
///     runtime.handle().clone(),
///     crac_core::from_async_fns(
///         "pool",
///         move |_| { let b = b.clone(); async move { b.lock().await.push("closed"); Ok(()) } },
///         move |info| {
///             let a = a.clone();
///             async move { a.lock().await.push(info.reason.as_str()); Ok(()) }
///         },
///     ),
/// );
/// coordinator.simulate().unwrap();
/// assert_eq!(*log.blocking_lock(), ["closed", "restored"]);
/// # }
/// ```
pub fn from_async_fns<B, FB, A, FA>(
    name: impl Into<String>,
    before: B,
    after: A,
) -> AsyncFnResource<B, A>
where
    B: Fn(CheckpointInfo) -> FB + Send + Sync,
    FB: Future<Output = Result<(), HookError>> + Send + 'static,
    A: Fn(RestoreInfo) -> FA + Send + Sync,
    FA: Future<Output = Result<(), HookError>> + Send + 'static,
{
    AsyncFnResource {
        name: name.into(),
        before,
        after,
    }
}

/// The resource [`from_async_fns`] makes.
pub struct AsyncFnResource<B, A> {
    name: String,
    before: B,
    after: A,
}

impl<B, FB, A, FA> AsyncResource for AsyncFnResource<B, A>
where
    B: Fn(CheckpointInfo) -> FB + Send + Sync,
    FB: Future<Output = Result<(), HookError>> + Send + 'static,
    A: Fn(RestoreInfo) -> FA + Send + Sync,
    FA: Future<Output = Result<(), HookError>> + Send + 'static,
{
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.name)
    }
    fn before_checkpoint<'a>(
        &'a self,
        checkpoint: &'a CheckpointInfo,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin((self.before)(checkpoint.clone()))
    }
    fn after_restore<'a>(
        &'a self,
        restore: &'a RestoreInfo,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin((self.after)(restore.clone()))
    }
}

impl<B, A> fmt::Debug for AsyncFnResource<B, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncFnResource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}
