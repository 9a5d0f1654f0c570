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
//!
//! `crac upgrade` of the service (its pid or crac run's) is done by crac run itself, so that
//! it stays the parent of whatever version runs: crac run listens on the abstract Unix socket
//! `@crac-run/<pid>/<start time>` (in its network namespace; peers other than root and its own
//! uid are refused, and the client checks the listener is that crac run). The client sends one
//! JSON line (`command`, `env`, `level`, `ready_timeout`, `settle`, `drain_timeout`, `log`);
//! crac run upgrades its current service, follows the new version as the one it waits for,
//! and answers with the report's lines, then `exit N`.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use crate::output::errln;
use crate::output::{millis, say};
use std::io::Read as _;

/// Names the image a service checkpoints itself into (read by crac_agent::SelfCheckpoint).
const CHECKPOINT_TO_ENV: &str = crac_protocol::env::CHECKPOINT_TO;
/// Names the crac binary for the service's self-checkpoint.
const CRAC_BIN_ENV: &str = crac_protocol::env::BIN;
/// The default of `--restore-timeout`.
const RESTORE_TIMEOUT_ENV: &str = crac_protocol::env::RESTORE_TIMEOUT;

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
            errln!(
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
            errln!(
                "crac run: started cold as pid {pid} in {}",
                millis(started.elapsed().as_secs_f64() * 1e3)
            );
            (pid, None)
        }
    };
    service.store(pid as i32, Ordering::SeqCst);
    serve_upgrades(store, Arc::clone(&service));
    let (status, lost) = wait_for(&service, server);
    let Some(err) = lost else {
        return Ok(status);
    };
    // The restored copy was killed: its memory never arrived. Start afresh.
    say(&format!("crac run: {}", err.message));
    for line in &err.details {
        say(&format!("crac run:   {line}"));
    }
    let pid = cold(store, &args)?;
    errln!("crac run: started cold as pid {pid} instead");
    service.store(pid as i32, Ordering::SeqCst);
    Ok(wait_for(&service, None).0)
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
        timeout: Some(restore_timeout(args)),
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

/// How long a restore may take: `--restore-timeout`, else `$CRAC_RESTORE_TIMEOUT`, else
/// [`RESTORE_TIMEOUT`]. A CRIU that hangs (a BUG in its restorer) must not keep a container
/// from starting at all.
fn restore_timeout(args: &RunArgs) -> Duration {
    let secs = args.restore_timeout.or_else(|| {
        let text = std::env::var(RESTORE_TIMEOUT_ENV).ok()?;
        let secs = text.trim().parse::<f64>().ok().filter(|s| *s > 0.0 && s.is_finite());
        if secs.is_none() {
            errln!(
                "crac run: {RESTORE_TIMEOUT_ENV}={text:?} is not a number of seconds above 0: {}s instead",
                RESTORE_TIMEOUT.as_secs()
            );
        }
        secs
    });
    secs.map_or(RESTORE_TIMEOUT, Duration::from_secs_f64)
}

/// The restore's time limit when neither `--restore-timeout` nor the variable gives one: far
/// above a restore's usual tens of milliseconds, and above crac-action's 30 s for the
/// after_restore hooks.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

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
        errln!(
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
        errln!(
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
/// namespace: a container); on a host it is far above already and nothing is done. By writing
/// `ns_last_pid` where `/proc/sys` is writable (a container has it only with `--privileged`),
/// else by making children that exit at once until one gets a pid at the floor (no privilege
/// needed; `clone3`'s `set_tid` gives one child a pid but leaves the counter where it was).
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
    if std::fs::write("/proc/sys/kernel/ns_last_pid", PID_FLOOR.to_string()).is_ok() {
        return;
    }
    loop {
        match passing_child() {
            Ok(pid) if pid >= PID_FLOOR => return,
            Ok(_) => {}
            Err(e) => {
                errln!(
                    "crac run: cannot move this pid namespace's pids up to {PID_FLOOR} ({e}): an image of the service made here may not restore in a new container, its pids taken by CRIU"
                );
                return;
            }
        }
    }
}

/// Makes a child that exits at once, and reaps it; returns its pid. The child shares this
/// process's memory and runs on a small stack of its own while this thread waits
/// (`CLONE_VM | CLONE_VFORK`): nothing is copied, so a thousand take a few milliseconds.
fn passing_child() -> std::io::Result<u32> {
    extern "C" fn exit_at_once(_: *mut libc::c_void) -> libc::c_int {
        0
    }
    let mut stack = vec![0u8; 16 * 1024];
    // SAFETY: the stack is ours and outlives the child (CLONE_VFORK: this thread resumes once
    // the child has exited); it grows down from its 16-byte aligned end. The child runs only
    // `exit_at_once`, which touches nothing, and then exits.
    let child = unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        let top = top.sub(top as usize % 16);
        libc::clone(
            exit_at_once,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::null_mut(),
        )
    };
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let _ = waitpid(Pid::from_raw(child), None);
    Ok(child as u32)
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
fn wait_for(current: &AtomicI32, mut server: Option<PageServer>) -> (u8, Option<OpError>) {
    let mut lost = None;
    let status = loop {
        let reaped = waitpid(None::<Pid>, None);
        // The service now: `crac upgrade` may have replaced it (0 while none runs).
        let service = current.load(Ordering::SeqCst) as u32;
        if let (Ok(status), Some(page_server)) = (&reaped, &server) {
            if status
                .pid()
                .is_some_and(|p| p.as_raw() as u32 == page_server.pid())
            {
                let page_server = server.take().expect("checked above");
                match page_server.reaped(*status, service) {
                    Ok(took) => errln!(
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
                errln!("crac run: pid {service} exited with code {code}");
                break u8::try_from(code).unwrap_or(1);
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() as u32 == service => {
                errln!("crac run: pid {service} was killed by {signal}");
                break 128u8.saturating_add(signal as u8);
            }
            // Another child (a new version `crac upgrade` started, which may be rolled back):
            // how it ended is kept for the upgrade to tell.
            Ok(WaitStatus::Exited(pid, code)) => {
                keep_reaped(pid, format!("exited with code {code}"));
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                keep_reaped(pid, format!("was killed by {signal}"));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => {
                errln!("crac run: lost track of pid {service}: {err}");
                break 1;
            }
        }
    };
    // The service ended before its page server: how the server ends says whether the
    // service's memory was whole (it may have died of a page that never came).
    let service = current.load(Ordering::SeqCst) as u32;
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

/// The control socket's abstract name for crac run `run`.
fn control_name(run: crac_action::tree::ProcessId) -> String {
    format!("crac-run/{}/{}", run.pid, run.start_time)
}

/// Serves `crac upgrade` requests for the service (see the module documentation), one at a
/// time, on a thread of its own. Without the socket crac run still runs: said, not fatal.
fn serve_upgrades(store: &Store, service: Arc<AtomicI32>) {
    use std::os::linux::net::SocketAddrExt;
    let Some(me) = crac_action::tree::ProcessId::of(std::process::id()) else {
        return;
    };
    let listener = std::os::unix::net::SocketAddr::from_abstract_name(control_name(me))
        .and_then(|addr| std::os::unix::net::UnixListener::bind_addr(&addr));
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            say(&format!(
                "crac run: no control socket ({e}): `crac upgrade` of the service is not possible"
            ));
            return;
        }
    };
    let store = store.clone();
    let spawned = std::thread::Builder::new()
        .name("crac-run-upgrades".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                serve_upgrade(&store, &service, stream);
            }
        });
    if let Err(e) = spawned {
        say(&format!("crac run: no control thread ({e})"));
    }
}

/// One `crac upgrade` request.
fn serve_upgrade(store: &Store, service: &AtomicI32, stream: std::os::unix::net::UnixStream) {
    use std::io::{BufRead, Write};
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
    let own = nix::unistd::geteuid().as_raw();
    if !peer.is_ok_and(|p| p.uid() == 0 || p.uid() == own) {
        return;
    }
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut line = String::new();
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    if std::io::BufReader::new(reader.take(64 << 10))
        .read_line(&mut line)
        .is_err()
    {
        return;
    }
    let mut out = stream;
    let code = match crate::upgrade::args_from_line(&line, service.load(Ordering::SeqCst) as u32) {
        Err(err) => {
            let _ = writeln!(out, "crac run: {err}");
            FailureKind::BadInput.exit_code()
        }
        Ok(args) => {
            let mut sink = out.try_clone().ok();
            crate::upgrade::report_to(Some(Box::new(move |line: &str| {
                if let Some(sink) = sink.as_mut() {
                    let _ = writeln!(sink, "{line}");
                }
            })));
            let result = crate::upgrade::upgrade(store, &args, Some(service));
            crate::upgrade::report_to(None);
            match result {
                Ok(code) => code,
                Err(err) => {
                    say(&format!("crac run: upgrade: {}", err.message));
                    let _ = writeln!(out, "crac: {}", err.message);
                    for detail in &err.details {
                        let _ = writeln!(out, "  {detail}");
                    }
                    err.kind.exit_code()
                }
            }
        }
    };
    let _ = writeln!(out, "exit {code}");
}

/// The crac run that is `pid` or `pid`'s parent, connected to, if there is one.
pub(crate) fn control_of(pid: u32) -> Option<std::os::unix::net::UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let candidates = [Some(pid), crac_cli::process::parent_of(pid)];
    candidates.into_iter().flatten().find_map(|candidate| {
        let run = crac_action::tree::ProcessId::of(candidate)?;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(control_name(run)).ok()?;
        let stream = std::os::unix::net::UnixStream::connect_addr(&addr).ok()?;
        // An abstract name anyone in the namespace could have taken: it must be that process.
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .ok()?;
        (u32::try_from(peer.pid()).ok() == Some(candidate)).then_some(stream)
    })
}

/// Asks the crac run on `stream` to upgrade its service: its report, then its exit code.
pub(crate) fn ask_to_upgrade(
    stream: std::os::unix::net::UnixStream,
    args: &crate::cli::UpgradeArgs,
) -> Result<u8, OpError> {
    use std::io::{BufRead, Write};
    let mut out = stream
        .try_clone()
        .map_err(|e| OpError::new(FailureKind::Failed, format!("cannot talk to crac run: {e}")))?;
    writeln!(out, "{}", crate::upgrade::args_to_line(args))
        .map_err(|e| OpError::new(FailureKind::Failed, format!("cannot talk to crac run: {e}")))?;
    errln!("crac upgrade: the service runs under crac run, which upgrades it");
    for line in std::io::BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if let Some(code) = line.strip_prefix("exit ") {
            return Ok(code.trim().parse().unwrap_or(1));
        }
        say(&line);
    }
    Err(OpError::new(
        FailureKind::Failed,
        "crac run ended the connection before the upgrade's outcome: see its output",
    ))
}

/// How the children that were not the service ended, the latest few.
static REAPED: std::sync::Mutex<Vec<(u32, String)>> = std::sync::Mutex::new(Vec::new());

fn keep_reaped(pid: Pid, how: String) {
    let mut reaped = REAPED.lock().unwrap_or_else(|p| p.into_inner());
    if reaped.len() >= 16 {
        reaped.remove(0);
    }
    reaped.push((pid.as_raw() as u32, how));
}

/// How child `pid` ended, if this crac run reaped it.
pub(crate) fn reaped(pid: u32) -> Option<String> {
    let reaped = REAPED.lock().unwrap_or_else(|p| p.into_inner());
    reaped
        .iter()
        .rev()
        .find(|(p, _)| *p == pid)
        .map(|(_, how)| how.clone())
}
