//! What a cycle reports: one [`HookRecord`] per hook that was due, with its duration and
//! failure.

use std::fmt;
use std::time::Duration;

use crate::resource::HookError;

/// The two notification phases of a cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// [`Resource::before_checkpoint`](crate::Resource::before_checkpoint).
    BeforeCheckpoint,
    /// [`Resource::after_restore`](crate::Resource::after_restore).
    AfterRestore,
}

impl Phase {
    /// The phase's name in reports and on the wire: `before_checkpoint` or `after_restore`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::BeforeCheckpoint => "before_checkpoint",
            Phase::AfterRestore => "after_restore",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a hook failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum HookFailure {
    /// The hook returned an error.
    Error(HookError),
    /// The hook panicked; the panic was caught and this is its message.
    Panicked(String),
    /// The hook did not return within the per-hook limit (or the phase's limit ran out while
    /// it ran). It was left running on its own thread; the cycle went on without it.
    TimedOut {
        /// The limit that ran out.
        limit: Duration,
    },
    /// An async hook was still pending at its limit (or the phase's limit ran out while it
    /// ran): its future was dropped, and the cycle went on.
    Cancelled {
        /// The limit that ran out.
        limit: Duration,
    },
    /// An async hook could not be run on its runtime (it has shut down, or waiting for it
    /// would block the runtime's own thread); the message says why and what to do. The hook
    /// was not called.
    NoRuntime(String),
    /// The hook was never called: the phase's time limit ran out before its turn.
    NotRun {
        /// The phase limit that ran out.
        phase_limit: Duration,
    },
    /// The hook was not called: a hook of the same resource that overran in an earlier cycle
    /// is still running, and hooks of one resource never overlap.
    StillRunning,
}

impl HookFailure {
    /// Whether the hook was actually called and is over (so a resource that failed this way
    /// has been told, and must be told to come back).
    pub(crate) fn hook_returned(&self) -> bool {
        matches!(
            self,
            HookFailure::Error(_) | HookFailure::Panicked(_) | HookFailure::Cancelled { .. }
        )
    }
}

impl fmt::Display for HookFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookFailure::Error(err) => {
                write!(f, "failed: {err}")?;
                let mut source = err.source();
                while let Some(cause) = source {
                    write!(f, ": {cause}")?;
                    source = cause.source();
                }
                Ok(())
            }
            HookFailure::Panicked(msg) => write!(f, "panicked: {msg}"),
            HookFailure::TimedOut { limit } => write!(
                f,
                "timed out: still running after {}",
                DisplayDuration(*limit)
            ),
            HookFailure::Cancelled { limit } => write!(
                f,
                "cancelled: still pending after {}, its future was dropped",
                DisplayDuration(*limit)
            ),
            HookFailure::NoRuntime(why) => write!(f, "not run: {why}"),
            HookFailure::NotRun { phase_limit } => write!(
                f,
                "not run: the phase time limit of {} ran out before its turn",
                DisplayDuration(*phase_limit)
            ),
            HookFailure::StillRunning => f.write_str(
                "not run: its hook of an earlier cycle, which overran, is still running",
            ),
        }
    }
}

/// One hook call (or one hook that was due and not called), in the order they were due.
#[derive(Debug)]
pub struct HookRecord {
    pub(crate) resource: std::sync::Arc<str>,
    pub(crate) phase: Phase,
    pub(crate) duration: Duration,
    pub(crate) failure: Option<HookFailure>,
    /// Index into the cycle's target list; lets the coordinator tell who has been told.
    pub(crate) target: usize,
}

impl HookRecord {
    /// The resource's name (`context/name` for nested ones).
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Which hook this was.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// How long the hook ran (zero if it was not run).
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// How the hook failed, if it did.
    pub fn failure(&self) -> Option<&HookFailure> {
        self.failure.as_ref()
    }

    /// Whether the hook returned `Ok`.
    pub fn is_ok(&self) -> bool {
        self.failure.is_none()
    }
}

impl fmt::Display for HookRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {:?} ", self.phase, self.resource)?;
        match &self.failure {
            None => write!(f, "ok in {}", DisplayDuration(self.duration)),
            Some(failure) => write!(f, "{failure}"),
        }
    }
}

/// Every hook of a completed cycle, both phases, in the order they ran.
#[derive(Debug, Default)]
pub struct CycleReport {
    pub(crate) records: Vec<HookRecord>,
}

impl CycleReport {
    /// The hooks, in the order they ran.
    pub fn hooks(&self) -> &[HookRecord] {
        &self.records
    }

    /// The hooks of one phase, in the order they ran.
    pub fn phase(&self, phase: Phase) -> impl Iterator<Item = &HookRecord> {
        self.records.iter().filter(move |r| r.phase == phase)
    }
}

/// Durations in reports: "250ms", "1.5s", "12µs".
pub(crate) struct DisplayDuration(pub(crate) Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d >= Duration::from_secs(1) {
            write!(f, "{}s", d.as_secs_f64())
        } else if d >= Duration::from_millis(1) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}µs", d.as_micros())
        }
    }
}
