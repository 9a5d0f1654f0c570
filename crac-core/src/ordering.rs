//! The ordering rules, all in one place.
//!
//! A [`Context`](crate::Context) keeps its entries sorted by ([`Priority`], registration
//! sequence). That sorted order is the `after_restore` order; `before_checkpoint` runs the same
//! list backwards. A nested context is expanded in place, so its resources keep their slot in
//! the parent's order and their own order inside it. This mirrors org.crac (reverse order on the
//! way down, registration order on the way up) and its JDK-internal priority sub-contexts.

/// How early a resource comes up after a restore, and so how late it goes down before a
/// checkpoint.
///
/// Within one level, resources are ordered by registration. Application resources are the
/// default: they go down first and come up last, so the infrastructure they use (connection
/// pools, clients, the agent itself) is there for both of their hooks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Priority {
    /// Comes up first and goes down last: what everything else relies on.
    Core,
    /// Shared infrastructure: pools, clients, caches that application resources use.
    Infrastructure,
    /// Ordinary application resources.
    #[default]
    Application,
}

/// Where an entry registered with `priority` goes in a list already sorted by
/// (priority, sequence): after every entry of the same or a lower level.
pub(crate) fn insertion_index<T>(
    sorted: &[T],
    priority: Priority,
    priority_of: impl Fn(&T) -> Priority,
) -> usize {
    sorted.partition_point(|entry| priority_of(entry) <= priority)
}

/// Which way a phase walks the `after_restore`-ordered list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// `before_checkpoint`: last registered first.
    Down,
    /// `after_restore`: first registered first.
    Up,
}

/// Indices of `len` targets in the order a phase visits them.
pub(crate) fn visit_order(len: usize, direction: Direction) -> Box<dyn Iterator<Item = usize>> {
    match direction {
        Direction::Up => Box::new(0..len),
        Direction::Down => Box::new((0..len).rev()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insertion_keeps_priority_then_registration_order() {
        let mut list: Vec<(Priority, &str)> = Vec::new();
        for (p, name) in [
            (Priority::Application, "a1"),
            (Priority::Core, "c1"),
            (Priority::Application, "a2"),
            (Priority::Infrastructure, "i1"),
            (Priority::Core, "c2"),
        ] {
            let at = insertion_index(&list, p, |e| e.0);
            list.insert(at, (p, name));
        }
        let names: Vec<_> = list.iter().map(|e| e.1).collect();
        assert_eq!(names, ["c1", "c2", "i1", "a1", "a2"]);
    }

    #[test]
    fn down_is_the_reverse_of_up() {
        assert_eq!(visit_order(3, Direction::Up).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(
            visit_order(3, Direction::Down).collect::<Vec<_>>(),
            [2, 1, 0]
        );
    }
}
