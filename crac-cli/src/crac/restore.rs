//! `crac restore`: validate first (metadata, complete images, architecture, CRIU, free PID),
//! then restore with crac-action so the after_restore hooks run before this returns.

use crac_cli::error::{FailureKind, OpError};
use crac_cli::restore::RestoreRequest;
use crac_cli::store::Store;

use crate::cli::RestoreArgs;
use crate::output::outln;
use crate::output::{field, millis, say, Out};
use crate::progress;

pub(crate) fn run(store: &Store, args: RestoreArgs) -> Result<u8, OpError> {
    let shown = crate::images::resolve(store, &args.image)?;
    // An image kept encrypted is restored from its plaintext on a private tmpfs, removed (as
    // `_plain` is dropped) once this restore is done.
    let (dir, _plain) = crate::images::unsealed(&shown, args.identity.as_deref())?;
    // Without --detach CRIU stays until the restored service exits: no progress line then.
    let bar = progress::Bar::new(args.json || !args.detach, None);
    let update = |phase, written| bar.update(phase, written);
    let request = RestoreRequest {
        dir: dir.clone(),
        detach: args.detach,
        tcp_close: args.tcp_close,
        env: args.env.into_iter().collect(),
        inherit_stdio: false,
        // Without --detach CRIU lasts as long as the service.
        timeout: None,
        allow_changed: args.allow_changed,
    };
    let mut notice = |notice: &str| bar.note(&format!("crac: {notice}"));
    let progress = bar.shown().then_some(&update as _);
    let (outcome, server) = if lazy(&dir, args.lazy, args.eager) {
        let (outcome, server) = crac_cli::restore::restore_lazily(&request, &mut notice, progress)?;
        (outcome, Some(server))
    } else {
        (
            crac_cli::restore::restore(&request, &mut notice, progress)?,
            None,
        )
    };
    drop(bar);
    Out::new(args.json).print(&outcome, || {
        let mut text = if args.detach {
            format!(
                "restored pid {} from {} in {}\n",
                outcome.pid,
                shown.display(),
                millis(outcome.restore_ms)
            )
        } else {
            format!(
                "pid {} (restored from {}) ran to its end after {}; criu exited with {}\n",
                outcome.pid,
                shown.display(),
                millis(outcome.restore_ms),
                outcome
                    .exit_code
                    .map_or("no exit code".to_owned(), |c| format!("code {c}"))
            )
        };
        if let Some(why) = &outcome.log_incomplete {
            text.push_str(&format!("  {}\n", field(why)));
        }
        for line in &outcome.hook_lines {
            text.push_str(&format!("  {}\n", field(line)));
        }
        text
    });
    if let Some(server) = server {
        // The service runs already; its memory is whole only once the server is done.
        let all_in = server.wait(outcome.pid)?;
        if !args.json {
            outln!(
                "  every page arrived {} after the restore began",
                millis(all_in.as_secs_f64() * 1e3)
            );
        }
    }
    if !outcome.hook_failures.is_empty() {
        // Printed after the outcome: the service runs, restored, and what did not come back
        // up is the operator's to see to.
        say(&format!(
            "crac: pid {} was restored and runs, but after_restore failed: {}",
            outcome.pid,
            outcome.hook_failures.join("; ")
        ));
        return Ok(FailureKind::HooksFailed.exit_code());
    }
    Ok(0)
}

/// Whether to restore `dir` lazily: as asked, else as the image says (`--lazy-restore`).
pub(crate) fn lazy(dir: &std::path::Path, lazy: bool, eager: bool) -> bool {
    lazy || (!eager && crac_cli::metadata::read(dir).is_ok_and(|meta| meta.options.lazy_restore))
}
