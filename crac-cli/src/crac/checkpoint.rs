//! `crac checkpoint`: a dump with hooks, into the image store, with metadata and timings.
//!
//! `--self` is how a process checkpoints itself (crac_agent::SelfCheckpoint): CRIU must not be
//! part of the tree it dumps, so this copy of crac only checks the request, starts a detached
//! worker and exits; the worker waits until it has been re-parented away from the process,
//! runs the checkpoint, and writes one line with the outcome to stdout, a pipe the process
//! reads.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crac_cli::checkpoint::{CheckpointOutcome, CheckpointRequest, Destination};
use crac_cli::criu;
use crac_cli::error::{FailureKind, OpError};
use crac_cli::metadata::DumpOptions;
use crac_cli::store::Store;

use crate::cli::CheckpointArgs;
use crate::output::errln;
use crate::output::{bytes, millis, Out};
use crate::progress;

pub(crate) fn run(store: &Store, args: CheckpointArgs) -> Result<u8, OpError> {
    if args.dry_run {
        return dry_run(&args);
    }
    let mut request = request(store, &args)?;
    if args.for_self {
        return detach_worker();
    }
    let recipients = crate::images::recipients(
        &args.encrypt_to,
        &args.recipients_file,
        "nothing was checkpointed",
    )?;
    // Before the store is touched: a user who is not root gets the reason, not a store error.
    criu::require_root("checkpoint")?;
    if matches!(request.destination, Destination::Store { .. }) {
        crate::images::recover(store)?;
    }
    if args.self_worker {
        return self_worker(&request);
    }
    // --encrypt-to: CRIU dumps into a private tmpfs, and only the encrypted image is filed.
    let sealing = recipients
        .map(|recipients| crate::images::Sealing::prepare(&mut request, recipients))
        .transpose()?;
    finish_when_interrupted();
    let bar = progress::Bar::new(args.json, Some(progress::resident(args.pid)));
    let update = |phase, written| bar.update(phase, written);
    let outcome = crac_cli::checkpoint::checkpoint(
        &request,
        &mut |warning| bar.note(&format!("crac: warning: {warning}")),
        bar.shown().then_some(&update as _),
    );
    drop(bar);
    let mut outcome = outcome?;
    if let Some(sealing) = sealing {
        outcome = sealing.seal(outcome)?;
    }
    print(&outcome, Out::new(args.json));
    Ok(0)
}

/// `--dry-run`: hooks, preflight, rollback; what would stop a checkpoint.
fn dry_run(args: &CheckpointArgs) -> Result<u8, OpError> {
    criu::require_root("checkpoint --dry-run")?;
    if crac_action::tree::state_of(args.pid).is_none() {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!("no process with pid {}", args.pid),
        ));
    }
    // The options crac would give CRIU: its own, and those after `--`.
    let mut words = args.criu_args.clone();
    words.push("--skip-in-flight".into());
    if args.tcp_established {
        words.push("--tcp-established".into());
    }
    if args.file_locks {
        words.push("--file-locks".into());
    }
    let opts = crac_action::preflight::CriuOptions::from_words(&words);
    let policy = crac_action::preflight::configured(|name| std::env::var(name).ok())
        .map_err(|e| OpError::new(FailureKind::BadInput, e))?
        .unwrap_or_default();
    let settings = crac_action::settings::Settings {
        timeout: Duration::from_secs_f64(args.timeout),
        ..Default::default()
    };
    let mut log = Vec::new();
    let found = crac_action::pre_dump::dry_run(args.pid, &opts, &policy, &settings, &mut log)
        .map_err(|e| OpError::new(FailureKind::Failed, e.to_string()))?;
    let clear = found.hook_failure.is_none() && found.refused.is_empty();
    Out::new(args.json).print(&found, || {
        let mut text = String::new();
        for agent in &found.agents {
            let hooks: Vec<String> = agent
                .hooks
                .iter()
                .map(|h| match &h.error {
                    None => format!("{} ok", h.resource),
                    Some(err) => format!("{} FAILED: {err}", h.resource),
                })
                .collect();
            text.push_str(&format!(
                "pid {}: before_checkpoint: {}\n",
                agent.pid,
                if hooks.is_empty() { "no hooks".to_owned() } else { hooks.join(", ") }
            ));
        }
        for (pid, descriptor) in &found.would_close {
            text.push_str(&format!(
                "CLOSE pid {pid} {descriptor} (its descriptor policy closes it)\n"
            ));
        }
        if let Some(failure) = &found.hook_failure {
            text.push_str(&format!("BAD  hooks: {failure}\n"));
        }
        for line in &found.refused {
            text.push_str(&format!("BAD  {line}\n"));
        }
        for line in &found.file_locks {
            text.push_str(&format!("LOCK {line} (taken into the image: --file-locks)\n"));
        }
        text.push_str(&format!(
            "{}: {} descriptors looked at, {} CRIU would refuse; hooks rolled back, nothing dumped\n",
            if clear { "OK" } else { "would fail" },
            found.descriptors,
            found.refused.len()
        ));
        text
    });
    Ok(if clear {
        0
    } else {
        FailureKind::Failed.exit_code()
    })
}

fn request(store: &Store, args: &CheckpointArgs) -> Result<CheckpointRequest, OpError> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!(
                "--timeout {} is not a number of seconds above 0",
                args.timeout
            ),
        ));
    }
    let destination = match (&args.dir, &args.name) {
        (Some(dir), _) => Destination::Dir(dir.clone()),
        (None, name) => {
            let name = match name {
                Some(name) => name.clone(),
                None => default_name(args.pid)?,
            };
            Store::validate_name(&name)
                .map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
            Destination::Store {
                store: store.clone(),
                name,
                replace: args.replace,
            }
        }
    };
    Ok(CheckpointRequest {
        pid: args.pid,
        destination,
        options: DumpOptions {
            leave_running: args.leave_running,
            tcp_established: args.tcp_established,
            file_locks: args.file_locks,
            timeout_secs: args.timeout,
            extra_criu_args: args.criu_args.clone(),
            network_lock: args
                .tcp_established
                .then(|| criu::TCP_NETWORK_LOCK.to_owned()),
            lazy_restore: args.lazy_restore,
        },
        durable: args.sync,
    })
}

/// SIGINT and SIGTERM (Ctrl-C, a supervisor stopping crac) do not end a checkpoint half-way:
/// once the hooks have run or CRIU has started, stopping would leave the service quiesced, or
/// stopped with its image in a working folder. The checkpoint runs to its end (every wait in it
/// is bounded), and crac says so at once. CRIU runs in a process group of its own, out of
/// reach of the terminal's Ctrl-C. The handlers stay for the rest of this process, which ends
/// with the checkpoint.
fn finish_when_interrupted() {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) else {
        // Without handlers a signal ends crac, and the next crac recovers what it leaves.
        return;
    };
    std::thread::spawn(move || {
        for signal in signals.forever() {
            let name = if signal == signal_hook::consts::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            errln!(
                "crac: {name} received: finishing this checkpoint first, so that the service ends up either running (rolled back) or in a complete image; it ends by itself within --timeout and the dump"
            );
        }
    });
}

/// The process's executable name, made into a valid image name.
fn default_name(pid: u32) -> Result<String, OpError> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).map_err(|_| {
        OpError::new(
            FailureKind::BadInput,
            format!("no process with pid {pid} (see `crac ps` for processes with an agent)"),
        )
    })?;
    let name: String = comm
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_start_matches(['.', '-']).to_owned();
    Ok(if name.is_empty() {
        format!("pid-{pid}")
    } else {
        name
    })
}

fn print(outcome: &CheckpointOutcome, out: Out) {
    out.print(outcome, || {
        let meta = &outcome.metadata;
        let mut hooks: Vec<String> = meta
            .hooks
            .iter()
            .map(|h| format!("{} {}µs", h.resource, h.duration_us))
            .collect();
        if hooks.is_empty() {
            hooks.push("no agent in the tree".into());
        }
        let mut text = format!(
            "checkpointed pid {} ({}) into {}\n",
            meta.pid,
            meta.command_line.first().map(String::as_str).unwrap_or("?"),
            outcome.path.display()
        );
        text.push_str(&format!(
            "  hooks      {:>9}  ({})\n",
            millis(meta.timings.hooks_ms),
            hooks.join(", ")
        ));
        let criu = match &meta.timings.criu {
            Some(c) => format!(
                "frozen {}: freezing {}, memory {} + writing {}, {} pages",
                millis(c.frozen_ms),
                millis(c.freezing_ms),
                millis(c.memdump_ms),
                millis(c.memwrite_ms),
                c.pages_written
            ),
            None => "CRIU wrote no stats-dump".to_owned(),
        };
        text.push_str(&format!(
            "  criu dump  {:>9}  ({criu})\n",
            millis(meta.timings.dump_ms)
        ));
        text.push_str(&format!(
            "  total      {:>9}  image {}\n",
            millis(meta.timings.total_ms),
            bytes(meta.image_bytes)
        ));
        if crac_cli::archive::is_sealed(&outcome.path) {
            text.push_str("  encrypted at rest (age); the plaintext dump, on a tmpfs, is gone\n");
        }
        if outcome.left_running {
            text.push_str("  the process keeps running (told after_restore \"resumed\")\n");
        } else {
            text.push_str(&format!(
                "  the process was stopped; restore it with: crac restore {}{}\n",
                if outcome.path.starts_with(Path::new("/")) && meta.name.is_empty() {
                    outcome.path.display().to_string()
                } else {
                    meta.name.clone()
                },
                if crac_cli::archive::is_sealed(&outcome.path) {
                    " --identity FILE"
                } else {
                    ""
                }
            ));
        }
        text
    });
}

/// `--self`: the request checked out; start the worker in its own process group and return at
/// once, so the worker is re-parented away from the process being dumped.
fn detach_worker() -> Result<u8, OpError> {
    criu::find()?;
    criu::action_script()?;
    let exe = std::env::current_exe().map_err(|e| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot find crac's own executable: {e}"),
        )
    })?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if a == "--self" {
                "--self-worker".to_owned()
            } else {
                a
            }
        })
        .collect();
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            OpError::new(
                FailureKind::Unavailable,
                format!("cannot start the checkpoint worker: {e}"),
            )
        })?;
    Ok(0)
}

/// Whether `root` is an ancestor of this process.
fn inside_tree_of(root: u32) -> bool {
    let mut pid = std::process::id();
    while let Some(parent) = crac_action::tree::parent_of(pid) {
        if parent == root {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

/// The worker's one-line report, read by crac_agent::SelfCheckpoint.
#[derive(Serialize)]
struct SelfReport<'a> {
    outcome: &'a str,
    path: Option<String>,
    left_running: bool,
    error: Option<String>,
}

fn self_worker(request: &CheckpointRequest) -> Result<u8, OpError> {
    // Wait until the `--self` copy that started us has exited and we were re-parented: only
    // then are we outside the tree CRIU is about to dump.
    let deadline = Instant::now() + Duration::from_secs(5);
    while inside_tree_of(request.pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let result = if inside_tree_of(request.pid) {
        Err(OpError::new(
            FailureKind::Failed,
            "the checkpoint worker could not leave the process's tree",
        ))
    } else {
        // The process's own stderr, which it may read: warnings go there too.
        crac_cli::checkpoint::checkpoint(
            request,
            &mut |warning| crate::output::say(&format!("crac: warning: {warning}")),
            None,
        )
    };
    let report = match &result {
        Ok(outcome) => SelfReport {
            outcome: "dumped",
            path: Some(outcome.path.display().to_string()),
            left_running: outcome.left_running,
            error: None,
        },
        Err(err) => SelfReport {
            outcome: "failed",
            path: None,
            left_running: true,
            error: Some(
                std::iter::once(err.message.clone())
                    .chain(err.details.iter().cloned())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        },
    };
    // The reader is gone if the dump stopped the process; nothing to do about that.
    let line = serde_json::to_string(&report).expect("reports serialise");
    let _ = writeln!(std::io::stdout(), "{line}");
    result.map(|_| 0)
}
