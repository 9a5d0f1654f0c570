//! The progress line of a long checkpoint or restore: on a terminal only, never with `--json`,
//! and cleared when the operation ends, so what stays on the screen is the same as without it.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crac_cli::progress::Phase;

/// A progress line on stderr, or nothing.
pub(crate) struct Bar(Option<ProgressBar>);

impl Bar {
    /// A progress line, when stderr is a terminal and the output is not JSON; with bytes
    /// written against `resident` (the service's resident memory, which the image roughly
    /// matches) if given.
    pub(crate) fn new(json: bool, resident: Option<u64>) -> Bar {
        if json || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = ProgressBar::with_draw_target(resident, ProgressDrawTarget::stderr());
        let template = if resident.is_some() {
            "{spinner} {elapsed:>3} {msg:<34} {bytes:>10} of ~{total_bytes}"
        } else {
            "{spinner} {elapsed:>3} {msg}"
        };
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        Bar(Some(bar))
    }

    /// Shows `phase`, and `written` bytes of image during the dump.
    pub(crate) fn update(&self, phase: Phase, written: u64) {
        let Some(bar) = &self.0 else { return };
        bar.set_message(match phase {
            Phase::Hooks => "running before_checkpoint hooks",
            Phase::Dump => "freezing and writing the image",
            Phase::Hash => "hashing the image",
            Phase::Commit => "filing the image",
            Phase::Verify => "verifying the image",
            Phase::Restore => "restoring, then after_restore hooks",
            _ => "working",
        });
        bar.set_position(written);
    }

    /// Prints `line` on stderr above the progress line, made safe for a terminal (it may
    /// quote an image's metadata: [`crate::output::safe`]).
    pub(crate) fn note(&self, line: &str) {
        match &self.0 {
            Some(bar) => bar.suspend(|| crate::output::say(line)),
            None => crate::output::say(line),
        }
    }

    /// Whether a line is shown.
    pub(crate) fn shown(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// The resident memory of `pid` in bytes (`VmRSS`), 0 if unknown.
pub(crate) fn resident(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}
