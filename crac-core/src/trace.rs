//! What a cycle tells `tracing` (feature `tracing`): one `crac.cycle` span per cycle and one
//! `crac.hook` span per hook inside it, with an event for each hook that fails and one when the
//! cycle ends. The library prints nothing itself; without the feature these types are empty
//! and every call compiles to nothing.
//!
//! Everything is under the target `crac`. Span fields: `crac.cycle` has `generation`, then `reason`, `outcome` and `duration_us` when
//! it ends; `crac.hook` has `resource` and `phase`, then `outcome` and `duration_us`.

use crate::report::{HookRecord, Phase};
use crate::resource::RestoreReason;

#[cfg(feature = "tracing")]
mod imp {
    use std::time::Instant;

    use tracing::field::Empty;

    use super::*;

    /// A cycle's span, from the first `before_checkpoint` to the end of `after_restore`.
    #[derive(Clone)]
    pub(crate) struct CycleSpan {
        span: tracing::Span,
        started: Instant,
    }

    impl CycleSpan {
        pub(crate) fn start(generation: u64) -> CycleSpan {
            CycleSpan {
                span: tracing::info_span!(
                    target: "crac",
                    "crac.cycle",
                    generation,
                    reason = Empty,
                    outcome = Empty,
                    duration_us = Empty
                ),
                started: Instant::now(),
            }
        }

        /// For hooks run outside a coordinator's cycle (a context driven by hand): their spans
        /// go under whatever span is current.
        pub(crate) fn current() -> CycleSpan {
            CycleSpan {
                span: tracing::Span::current(),
                started: Instant::now(),
            }
        }

        /// Ends the cycle: `outcome` is `ok` or what went wrong.
        pub(crate) fn end(&self, reason: Option<RestoreReason>, outcome: &str) {
            let duration_us = self.started.elapsed().as_micros() as u64;
            if let Some(reason) = reason {
                self.span.record("reason", reason.as_str());
            }
            self.span.record("outcome", outcome);
            self.span.record("duration_us", duration_us);
            let reason = reason.map_or("none", RestoreReason::as_str);
            if outcome == "ok" {
                tracing::info!(target: "crac", parent: &self.span, reason, outcome, duration_us, "crac cycle ended");
            } else {
                tracing::warn!(target: "crac", parent: &self.span, reason, outcome, duration_us, "crac cycle ended");
            }
        }
    }

    /// One hook's span.
    #[derive(Clone)]
    pub(crate) struct HookSpan(tracing::Span);

    impl HookSpan {
        pub(crate) fn start(cycle: &CycleSpan, resource: &str, phase: Phase) -> HookSpan {
            HookSpan(tracing::info_span!(
                target: "crac",
                parent: &cycle.span,
                "crac.hook",
                resource,
                phase = phase.as_str(),
                outcome = Empty,
                duration_us = Empty
            ))
        }

        /// Makes the span current while the hook runs (on whichever thread polls or runs
        /// it), so what the hook itself logs nests under it.
        pub(crate) fn enter(&self) -> tracing::span::Entered<'_> {
            self.0.enter()
        }

        pub(crate) fn end(&self, record: &HookRecord) {
            let duration_us = record.duration().as_micros() as u64;
            self.0.record("duration_us", duration_us);
            match record.failure() {
                None => {
                    self.0.record("outcome", "ok");
                }
                Some(failure) => {
                    self.0.record("outcome", "failed");
                    tracing::warn!(
                        target: "crac",
                        parent: &self.0,
                        resource = record.resource(),
                        phase = record.phase().as_str(),
                        duration_us,
                        "crac hook {failure}"
                    );
                }
            }
        }
    }
}

#[cfg(not(feature = "tracing"))]
mod imp {
    use super::*;

    #[derive(Clone)]
    pub(crate) struct CycleSpan;

    impl CycleSpan {
        pub(crate) fn start(_generation: u64) -> CycleSpan {
            CycleSpan
        }
        pub(crate) fn current() -> CycleSpan {
            CycleSpan
        }
        pub(crate) fn end(&self, _reason: Option<RestoreReason>, _outcome: &str) {}
    }

    #[derive(Clone)]
    pub(crate) struct HookSpan;

    /// Stands for `tracing`'s guard of an entered span.
    pub(crate) struct Entered;

    impl HookSpan {
        pub(crate) fn start(_cycle: &CycleSpan, _resource: &str, _phase: Phase) -> HookSpan {
            HookSpan
        }
        pub(crate) fn enter(&self) -> Entered {
            Entered
        }
        pub(crate) fn end(&self, _record: &HookRecord) {}
    }
}

pub(crate) use imp::{CycleSpan, HookSpan};
