//! [`CheckpointError`]: one error value for everything a cycle can report.

use std::fmt;
use std::time::Duration;

use crate::report::{DisplayDuration, HookFailure, HookRecord};

/// What went wrong, as a value a program can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// At least one `before_checkpoint` failed: no image may be made, and every resource that
    /// was told has been told `after_restore` with reason `aborted`.
    Refused,
    /// The checkpoint itself went through, but at least one `after_restore` failed.
    AfterRestoreFailed,
    /// Another cycle is in progress. Cycles are serialised; try again when it is over.
    InProgress,
    /// A cycle was requested from inside a hook.
    Recursive,
    /// The requesting thread holds a critical section, so the checkpoint would wait for it.
    HeldByCaller,
    /// Critical sections were still held when the quiescing time limit ran out; no hook was
    /// called.
    Quiesce {
        /// How many were held.
        held: usize,
        /// How long the checkpoint waited.
        waited: Duration,
    },
}

/// A cycle's error: its kind and, for hook failures, every hook of both phases with the name of
/// its resource.
///
/// ```
/// let coordinator = crac_core::Coordinator::new();
/// let _a = coordinator.context().register(crac_core::from_fns(
///     "flaky", |_| Err("disk full".into()), |_| Ok(()),
/// ));
/// let err = coordinator.simulate().unwrap_err();
/// assert_eq!(err.kind(), crac_core::ErrorKind::Refused);
/// assert_eq!(
///     err.to_string(),
///     "checkpoint refused: before_checkpoint of \"flaky\" failed: disk full; \
///      the resources that were told were rolled back (after_restore, reason aborted)"
/// );
/// ```
pub struct CheckpointError {
    kind: ErrorKind,
    records: Vec<HookRecord>,
}

impl CheckpointError {
    pub(crate) fn new(kind: ErrorKind) -> CheckpointError {
        CheckpointError {
            kind,
            records: Vec::new(),
        }
    }

    pub(crate) fn refused(mut before: Vec<HookRecord>, rollback: Vec<HookRecord>) -> Self {
        before.extend(rollback);
        CheckpointError {
            kind: ErrorKind::Refused,
            records: before,
        }
    }

    pub(crate) fn after_restore_failed(records: Vec<HookRecord>) -> Self {
        CheckpointError {
            kind: ErrorKind::AfterRestoreFailed,
            records,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Every hook of the cycle, both phases, in the order they were due (empty when no hook
    /// was called).
    pub fn hooks(&self) -> &[HookRecord] {
        &self.records
    }

    /// The hooks that failed, both phases.
    pub fn failures(&self) -> impl Iterator<Item = &HookRecord> {
        self.records.iter().filter(|r| r.failure.is_some())
    }

    fn write_failures(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, record) in self.failures().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{record}")?;
        }
        Ok(())
    }
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Refused => {
                f.write_str("checkpoint refused: ")?;
                self.write_failures(f)?;
                f.write_str(
                    "; the resources that were told were rolled back (after_restore, reason aborted)",
                )
            }
            ErrorKind::AfterRestoreFailed => {
                f.write_str("after_restore failed: ")?;
                self.write_failures(f)
            }
            ErrorKind::InProgress => f.write_str(
                "a checkpoint is already in progress: cycles run one at a time, try again when it is over",
            ),
            ErrorKind::Recursive => f.write_str(
                "a checkpoint was requested from inside a before_checkpoint or after_restore hook: \
                 request it from outside the hooks",
            ),
            ErrorKind::HeldByCaller => f.write_str(
                "this thread holds a crac critical section, so the checkpoint would wait for itself: \
                 drop the guard before requesting a checkpoint",
            ),
            ErrorKind::Quiesce { held, waited } => write!(
                f,
                "checkpoint refused: {held} critical section(s) still held after waiting {}; \
                 no hook was called (raise Limits::quiesce or shorten the critical sections)",
                DisplayDuration(waited)
            ),
        }
    }
}

impl fmt::Debug for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointError")
            .field("kind", &self.kind)
            .field("message", &self.to_string())
            .finish()
    }
}

impl std::error::Error for CheckpointError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.failures().find_map(|r| match &r.failure {
            Some(HookFailure::Error(err)) => Some(&**err as &(dyn std::error::Error + 'static)),
            _ => None,
        })
    }
}
