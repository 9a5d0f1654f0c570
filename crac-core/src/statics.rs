//! Static registration through `inventory`: resources declared at compile time, registered in
//! the global context the first time it is used.

use crate::context::Context;
use crate::ordering::Priority;
use crate::resource::Resource;

/// A resource declared with [`register_static!`](crate::register_static).
///
/// Static resources live as long as the process. Their relative order is by priority, then by
/// name (link order is not something to rely on).
#[derive(Debug)]
pub struct StaticResource {
    priority: Priority,
    make: fn() -> Box<dyn Resource>,
}

impl StaticResource {
    /// Declares a resource made by `make` at `priority`. Use
    /// [`register_static!`](crate::register_static) rather than calling this.
    pub const fn new(priority: Priority, make: fn() -> Box<dyn Resource>) -> StaticResource {
        StaticResource { priority, make }
    }
}

inventory::collect!(StaticResource);

/// Declares a resource at compile time; it is registered in the
/// [global](crate::Coordinator::global) context when that is first used.
///
/// ```
/// use crac_core::{CheckpointInfo, HookError, Resource, RestoreInfo};
///
/// struct Metrics;
/// impl Resource for Metrics {
///     fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> { Ok(()) }
///     fn after_restore(&self, _: &RestoreInfo) -> Result<(), HookError> { Ok(()) }
/// }
///
/// crac_core::register_static!(|| Box::new(Metrics));
/// // or, with a priority:
/// crac_core::register_static!(crac_core::Priority::Infrastructure, || Box::new(Metrics));
///
/// let names = crac_core::global_context().resource_names();
/// assert!(names.iter().filter(|n| n.ends_with("Metrics")).count() == 2);
/// ```
#[macro_export]
macro_rules! register_static {
    ($make:expr) => {
        $crate::register_static!($crate::Priority::Application, $make);
    };
    ($priority:expr, $make:expr) => {
        $crate::__private::inventory::submit! {
            $crate::StaticResource::new($priority, $make)
        }
    };
}

pub(crate) fn register_all(context: &Context) {
    let mut made: Vec<(Priority, String, Box<dyn Resource>)> = inventory::iter::<StaticResource>
        .into_iter()
        .map(|s| {
            let resource = (s.make)();
            (s.priority, resource.name().into_owned(), resource)
        })
        .collect();
    made.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    for (priority, _, resource) in made {
        context.register_with(priority, resource).keep();
    }
}
