//! `crac restore`: validate first (metadata, complete images, architecture, CRIU, free PID),
//! then restore with crac-action so the after_restore hooks run before this returns.

use crac_cli::driver::{self, FailureKind, OpError, RestoreRequest};
use crac_cli::store::Store;

use crate::cli::RestoreArgs;
use crate::output::{millis, Out};
use crate::progress;

pub fn run(store: &Store, args: RestoreArgs) -> Result<u8, OpError> {
    let dir = crate::images::resolve(store, &args.image)?;
    // Without --detach CRIU stays until the restored service exits: no progress line then.
    let bar = progress::Bar::new(args.json || !args.detach, None);
    let update = |phase, written| bar.update(phase, written);
    let outcome = driver::restore(
        &RestoreRequest {
            dir: dir.clone(),
            detach: args.detach,
            tcp_close: args.tcp_close,
            env: args.env.into_iter().collect(),
        },
        &mut |notice| bar.note(&format!("crac: {notice}")),
        bar.shown().then_some(&update as _),
    );
    drop(bar);
    let outcome = outcome?;
    Out::new(args.json).print(&outcome, || {
        let mut text = if args.detach {
            format!(
                "restored pid {} from {} in {}\n",
                outcome.pid,
                dir.display(),
                millis(outcome.restore_ms)
            )
        } else {
            format!(
                "pid {} (restored from {}) ran to its end after {}; criu exited with {}\n",
                outcome.pid,
                dir.display(),
                millis(outcome.restore_ms),
                outcome
                    .exit_code
                    .map_or("no exit code".to_owned(), |c| format!("code {c}"))
            )
        };
        if outcome.hook_lines.is_empty() {
            text.push_str("  no agent in the restored tree\n");
        }
        for line in &outcome.hook_lines {
            text.push_str(&format!("  {line}\n"));
        }
        text
    });
    if !outcome.hook_failures.is_empty() {
        // Printed after the outcome: the service runs, restored, and what did not come back
        // up is the operator's to see to.
        eprintln!(
            "crac: pid {} was restored and runs, but after_restore failed: {}",
            outcome.pid,
            outcome.hook_failures.join("; ")
        );
        return Ok(FailureKind::HooksFailed.exit_code());
    }
    Ok(0)
}
