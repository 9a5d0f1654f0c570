//! [`AfterRestoreWatcher`]: something told around each `after_restore` hook a coordinator
//! runs. The agent uses one to note which descriptors each hook opened, so that a checkpoint
//! refused for a descriptor can name the resource most likely responsible.

/// Told right before and right after each `after_restore` hook of a
/// [`Coordinator`](crate::Coordinator), on the thread that runs the hook; set with
/// [`Coordinator::set_after_restore_watcher`](crate::Coordinator::set_after_restore_watcher).
///
/// Only `after_restore` is watched: it runs once the process runs again, off a dump's path,
/// while `before_checkpoint` is on it. Hooks run one at a time, with one exception: a hook
/// that overran its time limit is left running while the next ones run, and is told `after`
/// when it returns at last, maybe between another hook's `before` and `after`. A watcher
/// matches each `after` to its `before` by the resource's name.
///
/// # Panics and blocking
///
/// Both methods run between hooks, so they must be quick, must not block and must not panic
/// (a panic there is not caught as a hook's is).
pub trait AfterRestoreWatcher: Send + Sync {
    /// Right before `resource`'s (its full name) `after_restore` is called.
    fn before(&self, resource: &str);
    /// Right after it returned, failed, panicked or was cancelled.
    fn after(&self, resource: &str);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{from_fns, Coordinator, Limits};

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl AfterRestoreWatcher for Log {
        fn before(&self, resource: &str) {
            self.0.lock().unwrap().push(format!("before {resource}"));
        }
        fn after(&self, resource: &str) {
            self.0.lock().unwrap().push(format!("after {resource}"));
        }
    }

    #[test]
    fn each_after_restore_is_watched_around_its_call_and_before_checkpoint_is_not() {
        for limits in [Limits::default(), Limits::unlimited()] {
            let coordinator = Coordinator::new();
            coordinator.set_limits(limits);
            let log = Arc::new(Log::default());
            coordinator.set_after_restore_watcher(Some(log.clone()));
            let hooks = Arc::clone(&log);
            let _a = coordinator.context().register(from_fns(
                "a",
                |_| Ok(()),
                move |_| {
                    hooks.0.lock().unwrap().push("hook a".into());
                    Ok(())
                },
            ));
            let _b = coordinator.context().register(from_fns(
                "b",
                |_| Ok(()),
                |_| Err("b failed".into()),
            ));
            assert!(coordinator.simulate().is_err());
            assert_eq!(
                *log.0.lock().unwrap(),
                ["before a", "hook a", "after a", "before b", "after b"]
            );
            coordinator.set_after_restore_watcher(None);
            assert!(coordinator.simulate().is_err());
            assert_eq!(
                log.0.lock().unwrap().len(),
                6,
                "only the hook itself logged"
            );
        }
    }

    #[test]
    fn declared_descriptors_come_with_their_resource_s_full_name() {
        struct Holds(Vec<std::os::fd::RawFd>);
        impl crate::Resource for Holds {
            fn name(&self) -> std::borrow::Cow<'_, str> {
                "holds".into()
            }
            fn before_checkpoint(&self, _: &crate::CheckpointInfo) -> Result<(), crate::HookError> {
                Ok(())
            }
            fn after_restore(&self, _: &crate::RestoreInfo) -> Result<(), crate::HookError> {
                Ok(())
            }
            fn descriptors(&self) -> Vec<std::os::fd::RawFd> {
                self.0.clone()
            }
        }
        let coordinator = Coordinator::new();
        let db = crate::Context::new("db");
        let _inner = db.register(Holds(vec![7, 9]));
        let _db = coordinator.context().register(db);
        let _none = coordinator
            .context()
            .register(from_fns("none", |_| Ok(()), |_| Ok(())));
        assert_eq!(
            coordinator.declared_descriptors(),
            [("db/holds".to_owned(), 7), ("db/holds".to_owned(), 9)]
        );
    }
}
