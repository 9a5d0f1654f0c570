//! Which resource most likely holds a descriptor: what lets a refused checkpoint name, next to
//! each descriptor CRIU would refuse, the resource responsible, where the agent can tell.
//!
//! Two sources, the surer first:
//!
//! - **Declared**: a resource lists the descriptors it holds
//!   ([`Resource::descriptors`](crac_core::Resource::descriptors)). Asked only when someone
//!   wants owners (the `descriptors` request), never on a checkpoint's way.
//! - **Opened by an `after_restore`**: around each `after_restore` hook the agent notes which
//!   descriptor numbers are open, and records the file (device and inode) of each number that
//!   was closed before the hook and is open after it. A descriptor still open at the next
//!   checkpoint, under the same number and on the same file (so a number reused for something
//!   else is not taken for it), was most likely opened by that hook and left open by its
//!   resource's `before_checkpoint`. It is a guess: another thread may open a descriptor while
//!   the hook runs, and a hook that closes a descriptor and opens another under the same number
//!   is not seen. This runs after a restore, off a dump's path but on the way to the first
//!   answer, so it is cheap: one `poll` over the descriptor table says which numbers are open
//!   (once before the first hook, then once after each: the set after a hook is the next one's
//!   before), and only the newly opened descriptors are looked at (`fstat`).
//!
//! A descriptor a resource opened before it was registered, and does not declare, has no
//! owner here.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crac_core::{AfterRestoreWatcher, Coordinator};

use crac_protocol::fd_policy::{Descriptor, Owner, Ownership};

use crate::procfs::{self, Identity};

/// Notes what each `after_restore` hook opened; set on the agent's coordinator.
#[derive(Default)]
pub(crate) struct Tracker(Mutex<State>);

#[derive(Default)]
struct State {
    /// The hook now running (its resource), and the numbers open before it, ascending.
    before: Option<(String, Vec<RawFd>)>,
    /// The numbers open after the last hook, and when they were noted: the next hook's
    /// `before` when it follows at once (hooks of one cycle run back to back).
    last: Option<(Instant, Vec<RawFd>)>,
    /// The descriptor table's size (`FDSize`; 0 until read).
    size: RawFd,
    /// Descriptors that appeared during a hook: the file, and the hook's resource.
    opened: HashMap<RawFd, (Identity, String)>,
}

/// How many numbers above the highest open one a hook's new descriptors are looked for first.
const NEW_NUMBERS: RawFd = 64;

/// How soon after a hook's end the next one's start counts as the same cycle's.
const SAME_CYCLE: Duration = Duration::from_millis(1);

impl Tracker {
    fn state(&self) -> MutexGuard<'_, State> {
        // Each update is whole before the lock is let go: a poisoned lock holds usable data.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The owners of `descriptors`, filled in: a declared one first, else the `after_restore`
    /// that opened it if the descriptor is still the same file.
    pub(crate) fn attribute(&self, coordinator: &Coordinator, descriptors: &mut [Descriptor]) {
        let declared: HashMap<RawFd, String> = coordinator
            .declared_descriptors()
            .into_iter()
            .map(|(name, fd)| (fd, name))
            .collect();
        let state = self.state();
        for descriptor in descriptors {
            descriptor.owner = match declared.get(&descriptor.fd) {
                Some(resource) => Some(Owner {
                    resource: resource.clone(),
                    how: Ownership::Declared,
                }),
                None => state
                    .opened
                    .get(&descriptor.fd)
                    .filter(|(id, _)| procfs::identity(descriptor.fd) == Some(*id))
                    .map(|(_, resource)| Owner {
                        resource: resource.clone(),
                        how: Ownership::AfterRestore,
                    }),
            };
        }
    }
}

impl AfterRestoreWatcher for Tracker {
    fn before(&self, resource: &str) {
        let mut state = self.state();
        let open = match state.last.take() {
            Some((at, open)) if at.elapsed() < SAME_CYCLE => open,
            _ => {
                // A table never shrinks: its size is read once, and again when it may have grown.
                if state.size == 0 {
                    state.size = table_size();
                }
                procfs::open_below(state.size)
            }
        };
        state.before = Some((resource.to_owned(), open));
    }

    fn after(&self, resource: &str) {
        let mut state = self.state();
        // A hook that overran its limit returns while later ones run: what appeared since its
        // start is not its own doing more than theirs, so it is not noted.
        let before = match state.before.take() {
            Some((running, open)) if running == resource => open,
            other => {
                state.before = other;
                return;
            }
        };
        // A new descriptor takes the lowest free number: one a hook opened is in a hole of the
        // table before it, or just above its highest. Numbers far above are looked at only if
        // the last one looked at is open.
        let above = before.last().map_or(0, |&fd| fd + 1) + NEW_NUMBERS;
        let mut now = procfs::open_below(above.min(state.size));
        if above < state.size && now.last() == Some(&(above - 1)) {
            now = procfs::open_below(state.size);
        }
        if now.last() == Some(&(state.size - 1)) {
            // A full table may have grown while the hook ran: look at the new numbers too.
            state.size = table_size();
            now = procfs::open_below(state.size);
        }
        // What was closed is no longer what a hook opened.
        state.opened.retain(|fd, _| now.binary_search(fd).is_ok());
        for &fd in &now {
            if before.binary_search(&fd).is_err() {
                if let Some(id) = procfs::identity(fd) {
                    state.opened.insert(fd, (id, resource.to_owned()));
                }
            }
        }
        state.last = Some((Instant::now(), now));
    }
}

/// The descriptor table's size, or a common one if /proc does not say.
fn table_size() -> RawFd {
    procfs::table_size().unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    use super::*;

    fn listed(fd: RawFd) -> Descriptor {
        Descriptor {
            fd,
            kind: None,
            what: String::new(),
            owner: None,
        }
    }

    #[test]
    fn what_an_after_restore_opened_and_kept_is_its_resource_s_and_a_reused_number_is_not() {
        let _turn = crate::descriptor_table_turn();
        let coordinator = Coordinator::new();
        let tracker = Arc::new(Tracker::default());
        coordinator.set_after_restore_watcher(Some(tracker.clone()));
        let kept: Arc<Mutex<Vec<fs::File>>> = Arc::default();
        let opens = Arc::clone(&kept);
        let _opener = coordinator.context().register(crac_core::from_fns(
            "opener",
            |_| Ok(()),
            move |_| {
                let file = fs::File::open("/dev/null")?;
                opens.lock().unwrap().push(file);
                Ok(())
            },
        ));
        let _idle =
            coordinator
                .context()
                .register(crac_core::from_fns("idle", |_| Ok(()), |_| Ok(())));
        let before_any = fs::File::open("/dev/null").unwrap();

        coordinator.simulate().unwrap();
        let fd = kept.lock().unwrap()[0].as_raw_fd();
        let mut descriptors = [listed(fd), listed(before_any.as_raw_fd())];
        tracker.attribute(&coordinator, &mut descriptors);
        assert_eq!(
            descriptors[0].owner,
            Some(Owner {
                resource: "opener".into(),
                how: Ownership::AfterRestore
            })
        );
        assert_eq!(descriptors[1].owner, None, "opened before any hook");

        // The number now another file (dup2 closes and reuses it at once, so no other test's
        // thread can take it in between): not the resource's any more.
        let mut reused: std::os::fd::OwnedFd = kept.lock().unwrap().remove(0).into();
        let other = fs::File::open("/proc/self/status").unwrap();
        nix::unistd::dup2(&other, &mut reused).unwrap();
        let mut descriptors = [listed(fd)];
        tracker.attribute(&coordinator, &mut descriptors);
        assert_eq!(descriptors[0].owner, None);
    }

    #[test]
    fn a_declared_descriptor_is_held_by_the_resource_that_declares_it() {
        let _turn = crate::descriptor_table_turn();
        struct Holder(fs::File);
        impl crac_core::Resource for Holder {
            fn name(&self) -> std::borrow::Cow<'_, str> {
                "holder".into()
            }
            fn before_checkpoint(
                &self,
                _: &crac_core::CheckpointInfo,
            ) -> Result<(), crac_core::HookError> {
                Ok(())
            }
            fn after_restore(
                &self,
                _: &crac_core::RestoreInfo,
            ) -> Result<(), crac_core::HookError> {
                Ok(())
            }
            fn descriptors(&self) -> Vec<RawFd> {
                vec![self.0.as_raw_fd()]
            }
        }
        let coordinator = Coordinator::new();
        let file = fs::File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        let _holder = coordinator.context().register(Holder(file));
        let mut descriptors = [listed(fd)];
        Tracker::default().attribute(&coordinator, &mut descriptors);
        let owner = descriptors[0].owner.clone().expect("declared");
        assert_eq!(owner.how, Ownership::Declared);
        assert_eq!(
            owner.to_string(),
            "held by resource \"holder\", which declares it"
        );
    }

    #[test]
    fn a_hook_that_returns_late_while_another_runs_is_not_given_what_that_one_opened() {
        let _turn = crate::descriptor_table_turn();
        let coordinator = Coordinator::new();
        let tracker = Tracker::default();
        // "slow" overran its limit; "next" started while it still ran, and opened a file.
        tracker.before("slow");
        tracker.before("next");
        let opened = fs::File::open("/dev/null").unwrap();
        tracker.after("next");
        tracker.after("slow");
        let mut descriptors = [listed(opened.as_raw_fd()), listed(0)];
        tracker.attribute(&coordinator, &mut descriptors);
        assert_eq!(
            descriptors[0].owner.as_ref().map(|o| o.resource.as_str()),
            Some("next")
        );
        assert_eq!(descriptors[1].owner, None, "open before any hook");
    }
}
