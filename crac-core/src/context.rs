//! [`Context`]: an ordered, nestable set of resources, and the [`Registration`] handle.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::dispatch::{self, Busy, Call, Hooks, Target};
use crate::error::CheckpointError;
use crate::ordering::{insertion_index, visit_order, Direction, Priority};
use crate::resource::{CheckpointInfo, HookError, Resource, RestoreInfo, RestoreReason};
use crate::trace::CycleSpan;

/// An ordered set of resources; itself a [`Resource`], so contexts nest.
///
/// Cloning a `Context` gives another handle to the same set. Resources are held strongly until
/// their [`Registration`] is dropped: unlike org.crac's weak references, a resource cannot
/// silently disappear because nothing else held it.
///
/// Registering while a notification is running is safe and takes effect in the next cycle: a
/// cycle works on the list as it was when the cycle began, and a resource told
/// `before_checkpoint` is always told `after_restore` in the same cycle, even if it is
/// unregistered in between.
///
/// ```
/// use crac_core::{Context, Coordinator, Priority};
///
/// let coordinator = Coordinator::new();
/// let storage = Context::new("storage");
/// let _pool = storage.register(crac_core::from_fns("pool", |_| Ok(()), |_| Ok(())));
/// // The whole "storage" context comes up before application resources.
/// let _storage = coordinator.context().register_with(Priority::Infrastructure, storage.clone());
/// assert_eq!(coordinator.context().resource_names(), ["storage/pool"]);
/// ```
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    name: String,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    next_seq: u64,
    /// Sorted by (priority, seq): the `after_restore` order.
    list: Vec<Entry>,
}

struct Entry {
    seq: u64,
    priority: Priority,
    node: Node,
}

/// Nested contexts are kept as contexts (not as opaque resources) so that a cycle can expand
/// them and time, name and report each resource inside on its own.
enum Node {
    /// A resource and its name, asked once at registration: a cycle over thousands of
    /// resources then shares names instead of building them.
    Resource(Hooks, Arc<str>),
    Context(Context),
}

impl Context {
    /// An empty context. The name prefixes the names of the resources inside it in reports
    /// (`storage/pool`).
    pub fn new(name: impl Into<String>) -> Context {
        Context {
            inner: Arc::new(ContextInner {
                name: name.into(),
                entries: Mutex::new(Entries::default()),
            }),
        }
    }

    /// The context's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Registers `resource` at [`Priority::Application`]. See [`register_with`](Self::register_with).
    pub fn register<R: Resource + 'static>(&self, resource: R) -> Registration {
        self.register_with(Priority::Application, resource)
    }

    /// Registers `resource` at `priority`. The resource stays registered until the returned
    /// handle is dropped or [`unregister`](Registration::unregister)ed; call
    /// [`Registration::keep`] for a resource that lives as long as the process.
    ///
    /// Passing a [`Context`] nests it: its resources are notified in its slot, in its order.
    ///
    /// # Panics
    ///
    /// When `resource` is a context that contains this one (or is this one): the nesting would
    /// be a cycle.
    pub fn register_with<R: Resource + 'static>(
        &self,
        priority: Priority,
        resource: R,
    ) -> Registration {
        let node = match (&resource as &dyn Any).downcast_ref::<Context>() {
            Some(child) => {
                assert!(
                    !child.contains_context(self),
                    "crac: registering context {:?} inside context {:?} would make a cycle",
                    child.name(),
                    self.name()
                );
                Node::Context(child.clone())
            }
            None => {
                let name: Arc<str> = Arc::from(resource.name().as_ref());
                Node::Resource(Hooks::Sync(Arc::new(resource)), name)
            }
        };
        self.insert(priority, node)
    }

    /// Registers an async resource at [`Priority::Application`], its hooks to run on
    /// `runtime`. See [`register_async_with`](Self::register_async_with).
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn register_async<R: crate::AsyncResource + 'static>(
        &self,
        runtime: tokio::runtime::Handle,
        resource: R,
    ) -> Registration {
        self.register_async_with(Priority::Application, runtime, resource)
    }

    /// Registers an async resource at `priority`, its hooks to run on `runtime` (usually
    /// `tokio::runtime::Handle::current()` from the service's `main`): each hook starts on the
    /// coordinator's thread inside the runtime's context, and once it waits for something it
    /// goes on as a task of the runtime. So a hook that does not wait costs about what a sync
    /// one does, and one that does uses the runtime's I/O and timers.
    ///
    /// It takes its place among the sync resources by priority and registration order like
    /// any other, and is limited, rolled back and reported the same way; a hook still pending
    /// at its limit is cancelled (see [`AsyncResource`](crate::AsyncResource)).
    ///
    /// ```
    /// # async fn example() {
    /// let _pool = crac_core::global_context().register_async(
    ///     tokio::runtime::Handle::current(),
    ///     crac_core::from_async_fns(
    ///         "db-pool",
    ///         |_| async { /* pool.close().await */ Ok(()) },
    ///         |_| async { /* reconnect */ Ok(()) },
    ///     ),
    /// );
    /// # }
    /// ```
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn register_async_with<R: crate::AsyncResource + 'static>(
        &self,
        priority: Priority,
        runtime: tokio::runtime::Handle,
        resource: R,
    ) -> Registration {
        let name: Arc<str> = Arc::from(resource.name().as_ref());
        let hooks = crate::runtime::AsyncHooks::new(Arc::new(resource), runtime);
        self.insert(
            priority,
            Node::Resource(Hooks::Async(Arc::new(hooks)), name),
        )
    }

    fn insert(&self, priority: Priority, node: Node) -> Registration {
        let mut entries = self.lock();
        let seq = entries.next_seq;
        entries.next_seq += 1;
        let at = insertion_index(&entries.list, priority, |e| e.priority);
        entries.list.insert(
            at,
            Entry {
                seq,
                priority,
                node,
            },
        );
        Registration {
            context: Arc::downgrade(&self.inner),
            seq: Some(seq),
        }
    }

    /// The names of the resources in `after_restore` order, nested ones as `context/name`.
    pub fn resource_names(&self) -> Vec<String> {
        self.targets()
            .into_iter()
            .map(|t| t.name.as_ref().to_owned())
            .collect()
    }

    /// How many resources a cycle would notify, counting those in nested contexts.
    pub fn len(&self) -> usize {
        self.targets().len()
    }

    /// Whether a cycle would notify no resource at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The resources, nested contexts expanded, in `after_restore` order: the list a cycle
    /// works on.
    pub(crate) fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        self.collect_targets("", &mut out);
        out
    }

    fn collect_targets(&self, prefix: &str, out: &mut Vec<Target>) {
        // Clone the nodes out so no lock is held while names are computed (a name() that
        // registers something must not deadlock).
        let nodes: Vec<NodeRef> = self
            .lock()
            .list
            .iter()
            .map(|e| match &e.node {
                Node::Resource(hooks, name) => NodeRef::Resource(hooks.clone(), Arc::clone(name)),
                Node::Context(c) => NodeRef::Context(c.clone()),
            })
            .collect();
        for node in nodes {
            match node {
                NodeRef::Resource(hooks, name) => out.push(Target {
                    name: if prefix.is_empty() {
                        name
                    } else {
                        Arc::from(join_name(prefix, &name))
                    },
                    hooks,
                }),
                NodeRef::Context(child) => {
                    child.collect_targets(&join_name(prefix, child.name()), out)
                }
            }
        }
    }

    fn contains_context(&self, other: &Context) -> bool {
        if Arc::ptr_eq(&self.inner, &other.inner) {
            return true;
        }
        let children: Vec<Context> = self
            .lock()
            .list
            .iter()
            .filter_map(|e| match &e.node {
                Node::Context(c) => Some(c.clone()),
                Node::Resource(..) => None,
            })
            .collect();
        children.iter().any(|c| c.contains_context(other))
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding this lock cannot leave the list half-edited (every edit is
        // one Vec operation), so a poisoned lock is safe to use.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

enum NodeRef {
    Resource(Hooks, Arc<str>),
    Context(Context),
}

fn join_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Used on its own (registered somewhere that is not a [`Context`], or driven by hand), a
/// context notifies its resources with the usual ordering and aggregation, without time
/// limits, and returns a [`CheckpointError`] naming every failure.
impl Resource for Context {
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.inner.name)
    }

    fn before_checkpoint(&self, checkpoint: &CheckpointInfo) -> Result<(), HookError> {
        let targets = self.targets();
        let run = dispatch::run_inline(
            &targets,
            visit_order(targets.len(), Direction::Down),
            &Call::Before(checkpoint.clone()),
            // Driven without limits, its hooks cannot be abandoned: nothing is ever busy.
            &Busy::default(),
            &CycleSpan::current(),
        );
        if run.failed() {
            return Err(Box::new(CheckpointError::refused(run.records, Vec::new())));
        }
        Ok(())
    }

    fn after_restore(&self, restore: &RestoreInfo) -> Result<(), HookError> {
        let targets = self.targets();
        let run = dispatch::run_inline(
            &targets,
            visit_order(targets.len(), Direction::Up),
            &Call::After(restore.clone(), None),
            &Busy::default(),
            &CycleSpan::current(),
        );
        if run.failed() {
            let err = if restore.reason == RestoreReason::Aborted {
                CheckpointError::refused(Vec::new(), run.records)
            } else {
                CheckpointError::after_restore_failed(run.records)
            };
            return Err(Box::new(err));
        }
        Ok(())
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.inner.name)
            .field("resources", &self.resource_names())
            .finish()
    }
}

/// Keeps a resource registered; dropping it unregisters the resource.
#[must_use = "dropping a Registration unregisters the resource at once; call .keep() to keep it for the life of the process"]
pub struct Registration {
    context: Weak<ContextInner>,
    seq: Option<u64>,
}

impl Registration {
    /// Unregisters the resource now (the same as dropping the handle).
    pub fn unregister(mut self) {
        self.remove();
    }

    /// Keeps the resource registered for as long as its context exists, and lets go of the
    /// handle.
    pub fn keep(mut self) {
        self.seq = None;
    }

    fn remove(&mut self) {
        let (Some(seq), Some(inner)) = (self.seq.take(), self.context.upgrade()) else {
            return;
        };
        let removed = {
            let mut entries = inner
                .entries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            entries
                .list
                .iter()
                .position(|e| e.seq == seq)
                .map(|at| entries.list.remove(at))
        };
        // Dropped outside the lock: a resource whose Drop touches the context must not
        // deadlock.
        drop(removed);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.remove();
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("registered", &self.seq.is_some())
            .finish()
    }
}
