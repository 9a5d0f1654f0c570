//! `crac upgrade PID -- NEW_COMMAND...`: replaces a running service with a new version, at the
//! highest of three levels that applies (or the one asked for).
//!
//! - **state**: the new command is the same executable: the service is checkpointed and
//!   restored, memory kept, the new settings (`--env`) reaching its after_restore hooks as
//!   `RestoreInfo::env`. The library's checkpoint and restore do the work; copies of its
//!   listeners held from before the dump to after the restore keep its ports listening
//!   (see `state`).
//! - **handoff**: the new version starts with the old one's listening sockets, by systemd's
//!   socket-activation convention ([`crac_cli::activation`]), given by the old one's agent
//!   (the listeners it shares, by name; `listeners` op) or, for a process without an agent,
//!   copied by root (`pidfd_getfd`, [`crac_action::handover`]). Once it says `READY=1` on the
//!   private `NOTIFY_SOCKET` and has kept running for `--settle`, the old one is told to
//!   retire (its agent's `retire` op: draining on, retire hooks, the application shuts down
//!   gracefully; SIGTERM without an agent) and is given `--drain-timeout` to exit, after which
//!   its open connections are named and it is killed (SIGKILL). Connections that arrive
//!   meanwhile wait in the shared listening queue: none is refused.
//! - **restart**: nothing to hand over (no listener, or the service's agent shares none): the
//!   old one is retired as above, then the new one started; the time nothing listened is
//!   measured and reported.
//!
//! Rollback: a new version that exits, or is not ready in time, or exits during `--settle`,
//! is killed; the old one, never told anything, serves on; crac exits with 1 and the new
//! version's last lines (from its log).

use std::io::{Read, Seek, SeekFrom};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crac_action::agent_socket::AgentSocket;
use crac_action::handover::Process;
use crac_cli::activation::{self, Launch, Notify, Readiness};
use crac_cli::checkpoint::{CheckpointRequest, Destination};
use crac_cli::error::{FailureKind, OpError};
use crac_cli::metadata::DumpOptions;
use crac_cli::restore::RestoreRequest;
use crac_cli::store::Store;
use crac_protocol::wire::{Code, Request};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cli::{UpgradeArgs, UpgradeLevel};
use crate::output::{millis, say};
use std::cell::RefCell;
use std::sync::atomic::{AtomicI32, Ordering};

/// How long the old version's agent has to answer.
const AGENT_LIMIT: Duration = Duration::from_secs(5);
/// The new version's last lines shown when it is rolled back.
const LAST_LINES: usize = 20;

pub(crate) fn run(store: &Store, args: UpgradeArgs) -> Result<u8, OpError> {
    if let Some(run) = crate::run::control_of(args.pid) {
        // The service's parent is `crac run`, which must stay its parent: it upgrades it.
        return crate::run::ask_to_upgrade(run, &args);
    }
    upgrade(store, &args, None)
}

/// The upgrade itself, by `crac upgrade` (`parent` None) or by `crac run`, the service's
/// parent, which follows the service it waits for through `parent` as the upgrade goes.
pub(crate) fn upgrade(
    store: &Store,
    args: &UpgradeArgs,
    parent: Option<&AtomicI32>,
) -> Result<u8, OpError> {
    let pid = args.pid;
    if pid == std::process::id() || pid <= 1 {
        return Err(bad(format!(
            "pid {pid} cannot be upgraded: give the pid of the running service"
        )));
    }
    let old = Process::open(pid)
        .map_err(|e| bad(format!("no process with pid {pid} to upgrade ({e})")))?;
    let agent = AgentSocket::find(pid).ok().flatten();
    let plan = choose(args, &old, agent.as_ref())?;
    tell(&format!(
        "crac upgrade: pid {pid}: level {} ({})",
        plan.level_name(),
        plan.why
    ));
    let follow = |pid: u32| {
        if let Some(parent) = parent {
            parent.store(pid as i32, Ordering::SeqCst);
        }
    };
    match plan.level {
        Level::Handoff(listeners) => handoff(store, args, &old, agent.as_ref(), listeners, &follow),
        Level::Restart => restart(store, args, &old, agent.as_ref(), &follow),
        Level::State => state(store, args, &old, &follow),
    }
}

/// Where report lines go besides stderr.
pub(crate) type Sink = Box<dyn FnMut(&str)>;

thread_local! {
    /// Where this thread's report lines go besides stderr: the `crac upgrade` that asked
    /// `crac run` for the upgrade.
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// Sends this thread's report lines to `sink` as well as to stderr, until `None`.
pub(crate) fn report_to(sink: Option<Sink>) {
    SINK.with(|s| *s.borrow_mut() = sink);
}

/// A line of the upgrade's report.
fn tell(line: &str) {
    say(line);
    SINK.with(|s| {
        if let Some(sink) = s.borrow_mut().as_mut() {
            sink(line);
        }
    });
}

/// The level chosen, and why.
struct Plan {
    level: Level,
    why: String,
}

enum Level {
    State,
    Handoff(Vec<(String, OwnedFd)>),
    Restart,
}

impl Plan {
    fn level_name(&self) -> &'static str {
        match self.level {
            Level::State => "state",
            Level::Handoff(_) => "handoff",
            Level::Restart => "restart",
        }
    }
}

/// The level asked for if it applies (an error saying why not otherwise), or with `auto` the
/// highest that applies.
fn choose(args: &UpgradeArgs, old: &Process, agent: Option<&AgentSocket>) -> Result<Plan, OpError> {
    let asked = args.level;
    let mut why_not = Vec::new();
    if matches!(asked, UpgradeLevel::State | UpgradeLevel::Auto) {
        match state_applies(old.pid(), agent.is_some(), &args.command) {
            Ok(why) => {
                return Ok(Plan {
                    level: Level::State,
                    why,
                })
            }
            Err(why) if asked == UpgradeLevel::State => {
                return Err(OpError::new(
                    FailureKind::Unavailable,
                    format!("level state does not apply: {why}"),
                ))
            }
            Err(why) => why_not.push(format!("not state: {why}")),
        }
    }
    if matches!(asked, UpgradeLevel::Handoff | UpgradeLevel::Auto) {
        match take_listeners(old, agent) {
            Ok((listeners, from)) => {
                let names: Vec<String> = listeners.iter().map(|(n, _)| n.clone()).collect();
                why_not.push(format!(
                    "{} listener{} from {from}: {}",
                    names.len(),
                    if names.len() == 1 { "" } else { "s" },
                    names.join(", ")
                ));
                return Ok(Plan {
                    level: Level::Handoff(listeners),
                    why: why_not.join("; "),
                });
            }
            Err(why) if asked == UpgradeLevel::Handoff => {
                return Err(OpError::new(
                    FailureKind::Unavailable,
                    format!("level handoff does not apply: {why}; use --level restart"),
                ))
            }
            Err(why) => why_not.push(format!("not handoff: {why}")),
        }
    }
    Ok(Plan {
        level: Level::Restart,
        why: if why_not.is_empty() {
            "asked for".into()
        } else {
            why_not.join("; ")
        },
    })
}

/// Whether the state level applies: root, an agent (whose after_restore hooks get the new
/// settings), and the new command runs the old process's very executable (the restore checks the files it maps against the image).
fn state_applies(pid: u32, has_agent: bool, command: &[String]) -> Result<String, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("a checkpoint needs root".into());
    }
    if !has_agent {
        return Err(
            "no agent: nothing in it would be told of the checkpoint or get the new settings"
                .into(),
        );
    }
    let exe = crac_cli::process::executable(pid)
        .map_err(|e| format!("cannot read pid {pid}'s executable: {e}"))?;
    let program = Path::new(&command[0]);
    let new = which(program)
        .and_then(|p| std::fs::metadata(p).ok())
        .ok_or_else(|| format!("{} not found", program.display()))?;
    use std::os::unix::fs::MetadataExt;
    if (exe.dev(), exe.ino()) != (new.dev(), new.ino()) {
        return Err(format!(
            "{} is not pid {pid}'s executable (a new build)",
            program.display()
        ));
    }
    Ok("the same executable: memory kept, the new settings reach after_restore".into())
}

fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The old process's listening sockets: from its agent (those it shares, by name), or copied
/// by root when it has no agent.
fn take_listeners(
    old: &Process,
    agent: Option<&AgentSocket>,
) -> Result<(Vec<(String, OwnedFd)>, String), String> {
    if let Some(agent) = agent {
        let stream = agent.connect().map_err(|e| e.to_string())?;
        let (reply, fds) = crac_protocol::client::exchange_with_fds(
            stream,
            agent.dir(),
            &Request::listeners(),
            AGENT_LIMIT,
        )
        .map_err(|e| e.to_string())?;
        if !reply.ok && reply.code == Some(Code::BadRequest) {
            // An agent from before the `listeners` op: as if it had none.
            return copied(old, "its agent knows no listeners op (an older crac-agent)");
        }
        if !reply.ok {
            return Err(format!(
                "its agent refused: {}",
                reply.error.unwrap_or_default()
            ));
        }
        if fds.is_empty() {
            return Err(
                "its agent shares no listening socket (crac_agent::upgrade::share_listener or tcp_listener)"
                    .into(),
            );
        }
        if fds.len() != reply.listeners.len() {
            return Err(format!(
                "its agent named {} listeners but passed {}",
                reply.listeners.len(),
                fds.len()
            ));
        }
        return Ok((
            reply.listeners.into_iter().zip(fds).collect(),
            "its agent".into(),
        ));
    }
    copied(old, "no agent")
}

/// The listening sockets copied from the process (pidfd_getfd): unnamed.
fn copied(old: &Process, why: &str) -> Result<(Vec<(String, OwnedFd)>, String), String> {
    let listeners = old.listeners().map_err(|e| e.to_string())?;
    if listeners.is_empty() {
        return Err(format!("{why}, and it has no listening TCP socket"));
    }
    let addresses: Vec<String> = listeners.iter().map(|l| l.local.clone()).collect();
    Ok((
        listeners
            .into_iter()
            // systemd's name for a socket that has none.
            .map(|l| ("unknown".to_owned(), l.socket))
            .collect(),
        format!("copied with pidfd_getfd ({why}; {})", addresses.join(", ")),
    ))
}

/// The new version, started and watched.
struct NewVersion {
    child: Child,
    log: PathBuf,
    /// Where this run's lines begin in the log.
    log_from: u64,
    started: Instant,
}

/// How the old version was started: its environment and working folder.
struct Origin {
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    cwd: Option<PathBuf>,
}

impl Origin {
    fn of(old: &Process) -> Origin {
        Origin {
            env: crac_cli::process::environ(old.pid()),
            cwd: crac_cli::process::cwd(old.pid()),
        }
    }
}

/// Starts the new version as the old one was started (its environment and working folder,
/// with `--env` on top), with `listeners`; its output goes to the log.
fn start(
    store: &Store,
    args: &UpgradeArgs,
    origin: &Origin,
    listeners: Vec<(String, OwnedFd)>,
    notify: &Notify,
) -> Result<NewVersion, OpError> {
    let log = args.log.clone().unwrap_or_else(|| {
        let name = Path::new(&args.command[0])
            .file_name()
            .map_or("service".into(), |n| n.to_string_lossy().into_owned());
        store.root().join(format!("{name}.log"))
    });
    if let Some(dir) = log
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        crac_fs::ensure_dir(dir).map_err(|e| {
            bad(format!(
                "cannot create the log's folder: {e} (choose another with --log)"
            ))
        })?;
    }
    let output = crac_fs::open_append(&log).map_err(|e| {
        bad(format!(
            "cannot open the log {}: {e} (choose another with --log)",
            log.display()
        ))
    })?;
    let log_from = output.metadata().map_or(0, |m| m.len());
    let started = Instant::now();
    let child = activation::spawn(Launch {
        command: args.command.iter().map(Into::into).collect(),
        base_env: origin.env.clone(),
        cwd: origin.cwd.clone(),
        env: args.env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
        listeners,
        notify: Some(notify.path().to_owned()),
        output: Some(output),
    })
    .map_err(|e| bad(format!("cannot start {:?}: {e}", args.command[0])))?;
    Ok(NewVersion {
        child,
        log,
        log_from,
        started,
    })
}

impl NewVersion {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it has.
    fn ended(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe_exit(status)),
            Ok(None) => None,
            // Under crac run, whose loop reaps every child: it keeps how it ended (a moment
            // after it reaped it).
            Err(e) => Some(
                (0..10)
                    .find_map(|_| {
                        crate::run::reaped(self.pid()).or_else(|| {
                            std::thread::sleep(Duration::from_millis(10));
                            None
                        })
                    })
                    .unwrap_or_else(|| format!("lost track of it: {e}")),
            ),
        }
    }

    /// Kills it (if it still runs) and waits for it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its last lines in the log, from this run.
    fn last_lines(&self) -> Vec<String> {
        let Ok(mut file) = crac_fs::open_regular(&self.log) else {
            return Vec::new();
        };
        let mut text = String::new();
        let _ = file.seek(SeekFrom::Start(self.log_from));
        let _ = file.take(1 << 20).read_to_string(&mut text);
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[lines.len().saturating_sub(LAST_LINES)..].to_vec()
    }

    /// Stops it the ordinary way: SIGTERM, so that a version that already took connections
    /// from the shared queue (one that serves but never said READY=1) finishes them, and
    /// SIGKILL if it has not exited within `grace`. Not the retire phase: it has no successor,
    /// and what its retire hooks flush is for one. How it was stopped, for the report.
    fn stop(&mut self, grace: Duration) -> &'static str {
        if self.ended().is_some() {
            return "it is gone";
        }
        if kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).is_ok() {
            let until = Instant::now() + grace;
            while Instant::now() < until {
                if self.ended().is_some() {
                    return "it was stopped (SIGTERM)";
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill();
        "it was killed"
    }

    /// The rollback: stopped (within `grace`), the old one untouched; the error says what
    /// happened.
    fn roll_back(mut self, old: u32, what: String, grace: Duration) -> OpError {
        let how = self.stop(grace);
        let _ = self.child.wait();
        let mut err = OpError::new(
            FailureKind::Failed,
            format!(
                "{what}: {how} and pid {old} serves on (never told to retire); the new version's output is in {}",
                self.log.display()
            ),
        );
        let lines = self.last_lines();
        if !lines.is_empty() {
            err.details.push("its last lines:".into());
            err.details
                .extend(lines.into_iter().map(|l| format!("  {l}")));
        }
        err
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!(
            "was killed by {}",
            Signal::try_from(signal).map_or(format!("signal {signal}"), |s| s.to_string())
        ),
        _ => "ended".into(),
    }
}

fn secs(s: f64, what: &str) -> Result<Duration, OpError> {
    Duration::try_from_secs_f64(s).map_err(|_| bad(format!("{what}: expected seconds, not {s}")))
}

/// Waits for READY=1, then for `settle` more: an error naming what happened if the new
/// version does not get there (the caller rolls back).
fn wait_ready(
    new: &mut NewVersion,
    notify: &Notify,
    args: &UpgradeArgs,
) -> Result<Duration, String> {
    let ready_timeout = Duration::try_from_secs_f64(args.ready_timeout).unwrap_or_default();
    let deadline = new.started + ready_timeout;
    let pid = new.pid();
    match notify.wait_ready(deadline, || new.ended()) {
        Readiness::Ready => {}
        Readiness::Ended(how) => {
            return Err(format!(
                "the new version (pid {pid}) {how} before it was ready"
            ))
        }
        Readiness::TimedOut => {
            return Err(format!(
                "the new version (pid {pid}) did not say READY=1 (NOTIFY_SOCKET) within {}",
                millis(ready_timeout.as_secs_f64() * 1e3)
            ))
        }
    }
    let ready_in = new.started.elapsed();
    let settle_until =
        Instant::now() + Duration::try_from_secs_f64(args.settle).unwrap_or_default();
    while Instant::now() < settle_until {
        if let Some(how) = new.ended() {
            return Err(format!(
                "the new version (pid {pid}) {how} after it said it was ready, before the old one was told to retire"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(ready_in)
}

fn handoff(
    store: &Store,
    args: &UpgradeArgs,
    old: &Process,
    agent: Option<&AgentSocket>,
    listeners: Vec<(String, OwnedFd)>,
    follow: &dyn Fn(u32),
) -> Result<u8, OpError> {
    let drain = secs(args.drain_timeout, "--drain-timeout")?;
    secs(args.ready_timeout, "--ready-timeout")?;
    secs(args.settle, "--settle")?;
    let notify = notify_socket()?;
    let count = listeners.len();
    // The copies this process held are closed once the child has them.
    let mut new = start(store, args, &Origin::of(old), listeners, &notify)?;
    tell(&format!(
        "crac upgrade: started pid {} with {count} listening socket{} (LISTEN_FDS); waiting for READY=1",
        new.pid(),
        if count == 1 { "" } else { "s" }
    ));
    let ready_in = match wait_ready(&mut new, &notify, args) {
        Ok(ready_in) => ready_in,
        Err(what) => return Err(new.roll_back(old.pid(), what, drain)),
    };
    tell(&format!(
        "crac upgrade: pid {} ready in {}; telling pid {} to retire",
        new.pid(),
        millis(ready_in.as_secs_f64() * 1e3),
        old.pid()
    ));
    // From now on the new version is the service (crac run waits for it).
    follow(new.pid());
    let retired = match retire(old, agent, drain) {
        Ok(retired) => retired,
        Err(why) => {
            follow(old.pid());
            return Err(new.roll_back(
                old.pid(),
                format!("{why}, so it would not give way"),
                drain,
            ));
        }
    };
    tell(&format!(
        "crac upgrade: upgraded pid {} to pid {} (handoff: nothing refused; {}); its output goes to {}",
        old.pid(),
        new.pid(),
        retired,
        new.log.display()
    ));
    Ok(0)
}

/// Tells the old version to retire (its agent's retire op; SIGTERM without one), waits for
/// it to exit, and kills it after `drain`, naming what it still had open. What happened, for
/// the report; an error when it could not be told at all (then it runs on, untouched).
fn retire(old: &Process, agent: Option<&AgentSocket>, drain: Duration) -> Result<String, String> {
    let began = Instant::now();
    let sigterm = |why: &'static str| {
        old.signal(Signal::SIGTERM)
            .map(|()| why)
            .map_err(|e| format!("pid {} could not be sent SIGTERM ({e})", old.pid()))
    };
    let how = match agent.map(ask_to_retire) {
        Some(Ok(true)) => "told to retire by its agent",
        // An agent, but a service that does not listen for retirement: SIGTERM, its ordinary
        // way to stop.
        Some(Ok(false)) => sigterm("sent SIGTERM (its service does not listen for retirement)")?,
        Some(Err(err)) => {
            tell(&format!(
                "crac upgrade: pid {}'s agent did not take the retire request ({err}): sending SIGTERM",
                old.pid()
            ));
            sigterm("sent SIGTERM")?
        }
        None => sigterm("sent SIGTERM (no agent)")?,
    };
    if old.wait_end(drain) {
        return Ok(format!(
            "pid {} {how}, exited after {}",
            old.pid(),
            millis(began.elapsed().as_secs_f64() * 1e3)
        ));
    }
    let open = old.connections();
    tell(&format!(
        "crac upgrade: pid {} did not exit within {} of being {how}; still open: {}; killing it (SIGKILL)",
        old.pid(),
        millis(drain.as_secs_f64() * 1e3),
        if open.is_empty() {
            "no TCP connection it could be asked about".to_owned()
        } else {
            open.join(", ")
        }
    ));
    let _ = old.signal(Signal::SIGKILL);
    old.wait_end(Duration::from_secs(5));
    Ok(format!(
        "pid {} {how}, killed after the drain timeout with {} connection{} open",
        old.pid(),
        open.len(),
        if open.len() == 1 { "" } else { "s" }
    ))
}

/// Asks the agent to retire its process: whether anything in it listens (if not, it will not
/// go by itself).
fn ask_to_retire(agent: &AgentSocket) -> Result<bool, String> {
    let stream = agent.connect().map_err(|e| e.to_string())?;
    let reply =
        crac_protocol::client::exchange(stream, agent.dir(), &Request::retire(), AGENT_LIMIT)
            .map_err(|e| e.to_string())?;
    match (reply.ok, reply.code) {
        (true, Some(Code::Unheard)) => Ok(false),
        (true, _) => Ok(true),
        // Retiring, with hooks that failed: said, and the process still ends.
        (false, Some(Code::Failed)) => {
            tell(&format!(
                "crac upgrade: {}",
                reply.error.unwrap_or_default()
            ));
            Ok(true)
        }
        (false, _) => Err(reply.error.unwrap_or_default()),
    }
}

/// The addresses a process listens on (TCP), to see when the new version takes them.
fn listening_addresses(old: &Process) -> Vec<String> {
    old.listeners()
        .map(|l| l.into_iter().map(|l| l.local).collect())
        .unwrap_or_default()
}

fn restart(
    store: &Store,
    args: &UpgradeArgs,
    old: &Process,
    agent: Option<&AgentSocket>,
    follow: &dyn Fn(u32),
) -> Result<u8, OpError> {
    let drain = secs(args.drain_timeout, "--drain-timeout")?;
    secs(args.ready_timeout, "--ready-timeout")?;
    let settle = secs(args.settle, "--settle")?;
    let addresses = listening_addresses(old);
    // Read before the old version is gone.
    let origin = Origin::of(old);
    let notify = notify_socket()?;
    // Down from when the old one stops accepting.
    let down_since = Instant::now();
    // No service while none runs: the old one's end is not crac run's.
    follow(0);
    let retired = retire(old, agent, drain).map_err(|why| {
        follow(old.pid());
        OpError::new(
            FailureKind::Failed,
            format!("{why}: it runs on, and the new version was not started"),
        )
    })?;
    let ready_timeout = Duration::try_from_secs_f64(args.ready_timeout).unwrap_or_default();
    let mut new = start(store, args, &origin, Vec::new(), &notify)?;
    let pid = new.pid();
    follow(pid);
    let ready =
        wait_listening(&mut new, &notify, &addresses, ready_timeout, settle).map_err(|err| {
            OpError {
                message: format!(
                    "{}; the old one ({retired}) is gone: nothing serves",
                    err.message
                ),
                ..err
            }
        })?;
    let downtime = down_since.elapsed();
    if !ready {
        tell(&format!(
            "crac upgrade: pid {pid} did not say READY=1{} within {}; it runs",
            if addresses.is_empty() {
                ""
            } else {
                " nor listen"
            },
            millis(ready_timeout.as_secs_f64() * 1e3)
        ));
    }
    tell(&format!(
        "crac upgrade: upgraded pid {} to pid {pid} (restart: {retired}; downtime {}); its output goes to {}",
        old.pid(),
        millis(downtime.as_secs_f64() * 1e3),
        new.log.display()
    ));
    Ok(0)
}

/// Waits until the new version is ready: READY=1, or one of `addresses` accepting
/// connections again, or, with no address to watch, once it has run for `settle`. Whether it
/// was within `timeout` (it runs either way); an error if it ended.
fn wait_listening(
    new: &mut NewVersion,
    notify: &Notify,
    addresses: &[String],
    timeout: Duration,
    settle: Duration,
) -> Result<bool, OpError> {
    let deadline = new.started + timeout;
    let pid = new.pid();
    let started = new.started;
    let up = || {
        if addresses.is_empty() {
            return started.elapsed() >= settle;
        }
        addresses
            .iter()
            .filter_map(|a| a.parse::<std::net::SocketAddr>().ok())
            .any(|a| TcpStream::connect_timeout(&loopback(a), Duration::from_millis(20)).is_ok())
    };
    // An empty "how" stands for: it is up.
    let outcome = notify.wait_ready(deadline, || {
        if let Some(how) = new.ended() {
            return Some(how);
        }
        up().then(String::new)
    });
    match outcome {
        Readiness::Ready => Ok(true),
        Readiness::Ended(how) if how.is_empty() => Ok(true),
        Readiness::Ended(how) => {
            new.kill();
            let mut err = OpError::new(
                FailureKind::Failed,
                format!(
                    "the new version (pid {pid}) {how} before it was ready (its output is in {})",
                    new.log.display()
                ),
            );
            let lines = new.last_lines();
            if !lines.is_empty() {
                err.details.push("its last lines:".into());
                err.details
                    .extend(lines.into_iter().map(|l| format!("  {l}")));
            }
            Err(err)
        }
        Readiness::TimedOut => Ok(false),
    }
}

/// Where to probe a listener: its own address, or loopback for one on every address.
fn loopback(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = match addr {
            std::net::SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        };
        std::net::SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

/// The state level: checkpoint (the image filed in the store as `upgrade-PID`), restore with
/// the new settings. Established connections are dumped and restored with the process
/// (`--tcp-established`): keep-alive clients keep theirs. If the restore fails, the image is
/// kept and the new command is started instead (the restart level), said so.
///
/// CRIU cannot inherit an inet socket: the restore binds new listeners. So crac holds copies of
/// the old ones from before the dump (their queues take what arrives meanwhile), shares their
/// ports with the restored ones, and after the restore closes them with a reuseport migration
/// program attached, so the kernel moves what waited to the restored listeners
/// ([`crac_action::handover::migrate_on_close`]).
fn state(
    store: &Store,
    args: &UpgradeArgs,
    old: &Process,
    follow: &dyn Fn(u32),
) -> Result<u8, OpError> {
    crac_cli::criu::require_root("upgrade --level state")?;
    let ready_timeout = secs(args.ready_timeout, "--ready-timeout")?;
    let settle = secs(args.settle, "--settle")?;
    let origin = Origin::of(old);
    let addresses = listening_addresses(old);
    let name = format!("upgrade-{}", old.pid());
    let request = CheckpointRequest {
        pid: old.pid(),
        destination: Destination::Store {
            store: store.clone(),
            name: name.clone(),
            replace: true,
        },
        options: DumpOptions {
            tcp_established: true,
            timeout_secs: args.drain_timeout,
            ..DumpOptions::default()
        },
        durable: false,
    };
    // Copies of its listening sockets keep them listening after the dump has ended the process:
    // connections arriving until the restore wait in their queues instead of being refused.
    let held = old.listeners().map_err(|err| {
        OpError::new(
            FailureKind::Failed,
            format!(
                "cannot keep pid {}'s listening sockets across the checkpoint, so it was not upgraded (it runs on): {err}",
                old.pid()
            ),
        )
    })?;
    let began = Instant::now();
    // The dump ends the process: not the service's end (the restore brings it back).
    follow(0);
    let dumped = crac_cli::checkpoint::checkpoint(
        &request,
        &mut |warning| tell(&format!("crac upgrade: warning: {warning}")),
        None,
    )
    .inspect_err(|_| follow(old.pid()))
    .map_err(|err| OpError {
        message: format!(
            "the checkpoint failed, so pid {} was not upgraded (it runs on): {}",
            old.pid(),
            err.message
        ),
        ..err
    })?;
    let down_since = Instant::now();
    // The restored listeners bind beside the held copies (one reuseport group per port); a copy
    // that cannot share its port is let go, so the restore can bind it (what waited is reset).
    let held: Vec<_> = held
        .into_iter()
        .filter(
            |listener| match crac_action::handover::share_port(&listener.socket) {
                Ok(()) => true,
                Err(err) => {
                    tell(&format!(
                        "crac upgrade: warning: {} is not kept listening until the restore: {err}",
                        listener.local
                    ));
                    false
                }
            },
        )
        .collect();
    let restore = RestoreRequest {
        env: args.env.iter().cloned().collect(),
        ..RestoreRequest::detached(dumped.path.clone())
    };
    let mut notice = |notice: &str| tell(&format!("crac upgrade: {notice}"));
    match crac_cli::restore::restore(&restore, &mut notice, None) {
        Ok(restored) => {
            follow(restored.pid);
            // What waited in the held queues moves to the restored listeners as they close.
            for listener in held {
                if let Err(err) = crac_action::handover::migrate_on_close(&listener.socket) {
                    tell(&format!(
                        "crac upgrade: warning: the connections waiting on {} were reset: {err}",
                        listener.local
                    ));
                }
            }
            for failure in &restored.hook_failures {
                tell(&format!(
                    "crac upgrade: restored, but after_restore failed: {failure}"
                ));
            }
            tell(&format!(
                "crac upgrade: upgraded pid {} in place (state: memory kept, image {name}, the new settings in after_restore); checkpoint and restore took {}, nothing ran for {}",
                restored.pid,
                millis(began.elapsed().as_secs_f64() * 1e3),
                millis(down_since.elapsed().as_secs_f64() * 1e3)
            ));
            if restored.hook_failures.is_empty() {
                Ok(0)
            } else {
                Ok(FailureKind::HooksFailed.exit_code())
            }
        }
        Err(err) => {
            tell(&format!(
                "crac upgrade: the restore failed ({}); image {name} is kept: starting the new version instead (level restart)",
                err.message
            ));
            for line in &err.details {
                tell(&format!("crac upgrade:   {line}"));
            }
            // The new version binds the ports itself.
            drop(held);
            let notify = notify_socket()?;
            let mut new = start(store, args, &origin, Vec::new(), &notify)?;
            follow(new.pid());
            let ready = wait_listening(&mut new, &notify, &addresses, ready_timeout, settle)?;
            tell(&format!(
                "crac upgrade: pid {} replaced by pid {} (restart after a failed restore; {}downtime {})",
                old.pid(),
                new.pid(),
                if ready { "" } else { "not ready yet; " },
                millis(down_since.elapsed().as_secs_f64() * 1e3)
            ));
            Ok(FailureKind::Failed.exit_code())
        }
    }
}

fn notify_socket() -> Result<Notify, OpError> {
    Notify::new().map_err(|e| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot make a private NOTIFY_SOCKET: {e}"),
        )
    })
}

fn bad(message: String) -> OpError {
    OpError::new(FailureKind::BadInput, message)
}

/// `args` as the line `crac upgrade` sends `crac run` (see `crate::run`).
pub(crate) fn args_to_line(args: &UpgradeArgs) -> String {
    serde_json::json!({
        "command": args.command,
        "env": args.env,
        "level": format!("{:?}", args.level).to_lowercase(),
        "ready_timeout": args.ready_timeout,
        "settle": args.settle,
        "drain_timeout": args.drain_timeout,
        "log": args.log,
    })
    .to_string()
}

/// The arguments in a line from `crac upgrade`, for the service `pid`.
pub(crate) fn args_from_line(line: &str, pid: u32) -> Result<UpgradeArgs, String> {
    #[derive(serde::Deserialize)]
    struct Line {
        command: Vec<String>,
        env: Vec<(String, String)>,
        level: String,
        ready_timeout: f64,
        settle: f64,
        drain_timeout: f64,
        log: Option<PathBuf>,
    }
    let line: Line =
        serde_json::from_str(line).map_err(|e| format!("unreadable upgrade request: {e}"))?;
    use clap::ValueEnum;
    let level = UpgradeLevel::from_str(&line.level, true)?;
    if line.command.is_empty() {
        return Err("an upgrade request with no command".into());
    }
    Ok(UpgradeArgs {
        pid,
        level,
        ready_timeout: line.ready_timeout,
        settle: line.settle,
        drain_timeout: line.drain_timeout,
        env: line.env,
        log: line.log,
        command: line.command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `crac upgrade` sends `crac run` is what `crac run` reads back, for its service.
    #[test]
    fn the_request_to_crac_run_reads_back_as_it_was_sent() {
        let args = UpgradeArgs {
            pid: 42,
            level: UpgradeLevel::Handoff,
            ready_timeout: 2.5,
            settle: 0.25,
            drain_timeout: 9.0,
            env: vec![("APP_VERSION".into(), "v2".into())],
            log: Some("/var/log/web.log".into()),
            command: vec!["/app/web".into(), "--port".into(), "8080".into()],
        };
        let read = args_from_line(&args_to_line(&args), 7).unwrap();
        assert_eq!(read.pid, 7);
        assert_eq!(read.level, args.level);
        assert_eq!(
            (read.ready_timeout, read.settle, read.drain_timeout),
            (2.5, 0.25, 9.0)
        );
        assert_eq!(
            (read.env, read.log, read.command),
            (args.env, args.log, args.command)
        );
        assert!(args_from_line("{}", 7)
            .unwrap_err()
            .starts_with("unreadable upgrade request"));
    }
}
