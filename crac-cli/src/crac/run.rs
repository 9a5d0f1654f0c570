//! `crac run`: the warm-start launcher. Restore the image if it is there and valid, otherwise
//! (or when the restore fails, unless --restore-only) start the command cold. Either way stay
//! in the foreground as the service's parent: forward signals to it and exit with its status.
//!
//! crac run makes itself a child subreaper, so a service restored by `criu restore -d` is
//! re-parented to it when CRIU exits, and can be waited for like a child it started itself.
//! A cold-started service gets what a self-checkpoint needs: it is a session leader, its
//! output goes to a log file (not a terminal, which would stop a dump), and its environment
//! names the image (`CRAC_CHECKPOINT_TO`), the store (`CRAC_STORE`) and crac (`CRAC_BIN`).
//! With `--log -` its output is crac run's own instead (in a container: the pipes the
//! runtime's log reads), and a restore hands the restored service the new run's in place of
//! the pipes it had (CRIU's `--inherit-fd`), which nobody reads any more.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crac_cli::error::{FailureKind, OpError};
use crac_cli::lazy::PageServer;
use crac_cli::restore::RestoreRequest;
use crac_cli::store::{Store, STORE_ENV};

use crate::cli::RunArgs;
use crate::output::{millis, say};

/// Names the image a service checkpoints itself into (read by crac_agent::SelfCheckpoint).
const CHECKPOINT_TO_ENV: &str = crac_protocol::env::CHECKPOINT_TO;
/// Names the crac binary for the service's self-checkpoint.
const CRAC_BIN_ENV: &str = crac_protocol::env::BIN;

pub(crate) fn run(store: &Store, args: RunArgs) -> Result<u8, OpError> {
    let started = Instant::now();
    Store::validate_name(&args.image)
        .map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
    if store
        .resolve(&args.image)
        .is_ok_and(|dir| crac_cli::archive::is_sealed(&dir))
    {
        // A cold start would end in the service's self-checkpoint, unencrypted, in its place.
        return Err(OpError::new(
            FailureKind::BadInput,
            format!(
                "image {0} is kept encrypted (crac checkpoint --encrypt-to), which crac run does \
                 not restore, and a cold start's self-checkpoint would replace it with an \
                 unencrypted one: restore it with `crac restore {0} --identity FILE`, or give \
                 crac run another --image",
                args.image
            ),
        ));
    }
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot become a child subreaper: {e}"),
        )
    })?;
    // The service's PID once there is one; signals that come before are delivered then.
    let service = Arc::new(AtomicI32::new(0));
    forward_signals(Arc::clone(&service))?;

    let (pid, server) = match warm(store, &args) {
        Ok((pid, server)) => {
            eprintln!(
                "crac run: restored image {:?} as pid {pid} in {}",
                args.image,
                millis(started.elapsed().as_secs_f64() * 1e3)
            );
            (pid, server)
        }
        Err(err) if args.restore_only => {
            return Err(OpError {
                message: format!("no warm start (--restore-only): {}", err.message),
                ..err
            })
        }
        Err(err) => {
            say(&format!("crac run: no warm start: {}", err.message));
            for line in &err.details {
                say(&format!("crac run:   {line}"));
            }
            let pid = cold(store, &args)?;
            eprintln!(
                "crac run: started cold as pid {pid} in {}",
                millis(started.elapsed().as_secs_f64() * 1e3)
            );
            (pid, None)
        }
    };
    service.store(pid as i32, Ordering::SeqCst);
    let (status, lost) = wait_for(pid, server);
    let Some(err) = lost else {
        return Ok(status);
    };
    // The restored copy was killed: its memory never arrived. Start afresh.
    say(&format!("crac run: {}", err.message));
    for line in &err.details {
        say(&format!("crac run:   {line}"));
    }
    let pid = cold(store, &args)?;
    eprintln!("crac run: started cold as pid {pid} instead");
    service.store(pid as i32, Ordering::SeqCst);
    Ok(wait_for(pid, None).0)
}

fn warm(store: &Store, args: &RunArgs) -> Result<(u32, Option<PageServer>), OpError> {
    let dir = store
        .resolve(&args.image)
        .map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
    let env = changed_env(&dir);
    let lazy = crate::restore::lazy(&dir, args.lazy, args.eager);
    let request = RestoreRequest {
        dir,
        detach: true,
        tcp_close: false,
        env,
        inherit_stdio: args.output_passed_on(),
        allow_changed: args.allow_changed.clone(),
    };
    let mut notice = |notice: &str| say(&format!("crac run: {notice}"));
    let (outcome, server) = if lazy {
        let (outcome, server) = crac_cli::restore::restore_lazily(&request, &mut notice, None)?;
        (outcome, Some(server))
    } else {
        (
            crac_cli::restore::restore(&request, &mut notice, None)?,
            None,
        )
    };
    // Restored and running: starting cold now would make a second copy. Say what failed.
    for failure in &outcome.hook_failures {
        say(&format!(
            "crac run: restored, but after_restore failed: {failure}"
        ));
    }
    Ok((outcome.pid, server))
}

/// What this command's environment changes from the one the image's service started with:
/// the settings a restored service gets (`RestoreInfo::env`). crac's own `CRAC_*` variables
/// are not settings of the service.
fn changed_env(dir: &std::path::Path) -> BTreeMap<String, String> {
    let Ok(meta) = crac_cli::metadata::read(dir) else {
        return BTreeMap::new();
    };
    if meta.env_sha256.is_empty() {
        return BTreeMap::new();
    }
    let changed: BTreeMap<String, String> = std::env::vars()
        .filter(|(name, _)| !name.starts_with("CRAC_"))
        .filter(|(name, value)| {
            meta.env_sha256.get(name) != Some(&crac_cli::hashing::value_sha256(value))
        })
        .collect();
    if let Err(err) = crac_protocol::records::encode_restore_env(&changed) {
        eprintln!(
            "crac run: the {} changed environment variables are not passed on: {err}",
            changed.len()
        );
        return BTreeMap::new();
    }
    changed
}

fn cold(store: &Store, args: &RunArgs) -> Result<u32, OpError> {
    raise_pid_floor();
    let crac_bin = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("crac"));
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .stdin(Stdio::null())
        .env(CHECKPOINT_TO_ENV, &args.image)
        .env(STORE_ENV, store.root())
        .env(CRAC_BIN_ENV, crac_bin);
    if !args.output_passed_on() {
        let (stdout, stderr) = open_log(store, args)?;
        cmd.stdout(stdout).stderr(stderr);
    } else if [std::io::stdout().as_fd(), std::io::stderr().as_fd()]
        .into_iter()
        .any(|fd| nix::unistd::isatty(fd).unwrap_or(false))
    {
        eprintln!(
            "crac run: --log -: the service writes to this terminal, so it cannot be checkpointed (CRIU cannot dump a terminal outside the tree); give it a file with --log FILE, or run crac run with its output in a pipe"
        );
    }
    // SAFETY: setsid is async-signal-safe and is the only call made between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        OpError::new(
            FailureKind::BadInput,
            format!("cannot start {:?}: {e}", args.command[0]),
        )
    })?;
    Ok(child.id())
}

/// The log a cold-started service writes to (`--log`, default `STORE/IMAGE.log`), twice.
fn open_log(store: &Store, args: &RunArgs) -> Result<(std::fs::File, std::fs::File), OpError> {
    let log = args
        .log
        .clone()
        .unwrap_or_else(|| store.root().join(format!("{}.log", args.image)));
    if let Some(dir) = log
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        crac_fs::ensure_dir(dir).map_err(|e| {
            OpError::new(
                FailureKind::BadInput,
                format!("cannot create the log's folder: {e} (choose another with --log)"),
            )
        })?;
    }
    // Appending: a service restored later writes at the end, not over what came since. The
    // log is the service's output (it may hold secrets): private, and never one another user
    // made or linked elsewhere.
    let open_log = || {
        crac_fs::open_append(&log).map_err(|e| {
            OpError::new(
                FailureKind::BadInput,
                format!(
                    "cannot open the log {}: {e} (choose another with --log)",
                    log.display()
                ),
            )
        })
    };
    Ok((open_log()?, open_log()?))
}

/// The lowest pid a cold-started service gets when its pid namespace is young.
///
/// A restore gives every process and thread its pids back, so they must be free then. In a
/// container crac run is pid 1: a service started cold right after it gets pids 2, 3, ...,
/// which in the container a restore starts in are CRIU's and its helpers' ("Unable to create a
/// thread: -17"). Above this floor they are free in any young namespace. (OpenJDK CRaC's
/// `-XX:CRaCMinPid` does the same, with 128.)
const PID_FLOOR: u32 = 1000;

/// Moves the pid namespace's counter up to [`PID_FLOOR`] when it is below (a young
/// namespace: a container); on a host it is far above already and nothing is done.
fn raise_pid_floor() {
    let read =
        |path: &str| -> Option<u32> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let (Some(last), Some(max)) = (
        read("/proc/sys/kernel/ns_last_pid"),
        read("/proc/sys/kernel/pid_max"),
    ) else {
        return;
    };
    if last >= PID_FLOOR || max <= PID_FLOOR * 2 {
        return;
    }
    // Needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE over the namespace, as CRIU's restore does.
    if let Err(e) = std::fs::write("/proc/sys/kernel/ns_last_pid", PID_FLOOR.to_string()) {
        eprintln!(
            "crac run: cannot move this pid namespace's pids up to {PID_FLOOR} ({e}): an image of the service made here may not restore in a new container, its pids taken by CRIU (run this container with --privileged)"
        );
    }
}

fn forward_signals(service: Arc<AtomicI32>) -> Result<(), OpError> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2]).map_err(|e| {
            OpError::new(
                FailureKind::Unavailable,
                format!("cannot handle signals: {e}"),
            )
        })?;
    std::thread::Builder::new()
        .name("crac-run-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let pid = service.load(Ordering::SeqCst);
                if pid > 0 {
                    if let Ok(signal) = Signal::try_from(signal) {
                        let _ = kill(Pid::from_raw(pid), signal);
                    }
                }
            }
        })
        .map_err(|e| {
            OpError::new(
                FailureKind::Unavailable,
                format!("cannot start a thread: {e}"),
            )
        })?;
    Ok(())
}

/// Reaps children (orphans re-parented to this subreaper included) until the service exits;
/// returns its status the way a shell does (128 + signal when killed).
/// Reaps children until `service` exits: its status. A lazy restore's page `server` is one
/// of those children; if it fails, the service is killed (see [`PageServer::reaped`]) and the
/// error comes back with the status.
fn wait_for(service: u32, mut server: Option<PageServer>) -> (u8, Option<OpError>) {
    let mut lost = None;
    let status = loop {
        let reaped = waitpid(None::<Pid>, None);
        if let (Ok(status), Some(page_server)) = (&reaped, &server) {
            if status
                .pid()
                .is_some_and(|p| p.as_raw() as u32 == page_server.pid())
            {
                let page_server = server.take().expect("checked above");
                match page_server.reaped(*status, service) {
                    Ok(took) => eprintln!(
                        "crac run: every page of pid {service} arrived {} after the restore began",
                        millis(took.as_secs_f64() * 1e3)
                    ),
                    Err(err) => lost = Some(err),
                }
                continue;
            }
        }
        match reaped {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() as u32 == service => {
                eprintln!("crac run: pid {service} exited with code {code}");
                break u8::try_from(code).unwrap_or(1);
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() as u32 == service => {
                eprintln!("crac run: pid {service} was killed by {signal}");
                break 128u8.saturating_add(signal as u8);
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => {
                eprintln!("crac run: lost track of pid {service}: {err}");
                break 1;
            }
        }
    };
    // The service ended before its page server: how the server ends says whether the
    // service's memory was whole (it may have died of a page that never came).
    if let Some(page_server) = server {
        let pid = Pid::from_raw(page_server.pid() as i32);
        if let Ok(status) = waitpid(pid, None) {
            if let Err(err) = page_server.reaped(status, service) {
                lost = Some(err);
            }
        }
    }
    (status, lost)
}
