//! A restore, as a pipeline of named steps: [`restore`] checks that it can run (root,
//! [`validate`]: the image, this machine, its pids), takes the pid's lock and the image's turn,
//! builds CRIU's command line from what the image was dumped with, runs it (with CRIU's page
//! server for a lazy restore, [`restore_lazily`]), and reads the outcome from CRIU's log.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use serde::Serialize;

use crate::criu::{self, require_root, CriuCommand};
use crate::diagnosis::{criu_lines, hints, log_incomplete, status_text};
use crate::error::{FailureKind, OpError};
use crate::lazy::PageServer;
use crate::locate::Criu;
use crate::lock::{lock_pid, restore_turn};
use crate::metadata::{self, Metadata};
use crate::process::read_cmdline;
use crate::progress::{Phase, Progress};
use crate::units::ms;
use crac_action::tree::ProcessId;
use crac_protocol::records::AgentFolders;

/// A restore to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The image folder.
    pub dir: PathBuf,
    /// Whether CRIU detaches (`-d`) instead of staying the restored tree's parent.
    pub detach: bool,
    /// Restore established TCP connections closed (CRIU's `--tcp-close`, podman's option):
    /// for an image made with `--tcp-established` whose peers are gone.
    pub tcp_close: bool,
    /// Settings for the restored processes' after_restore hooks (`RestoreInfo::env`).
    pub env: BTreeMap<String, String>,
    /// Give the restored tree this process's stdout and stderr in place of the pipes its root
    /// wrote to when it was dumped ([`Metadata::stdio_pipes`]).
    pub inherit_stdio: bool,
    /// How long CRIU may take: when it has not finished by then, it and every process it
    /// made are killed and the restore fails ([`RESTORE_TIMED_OUT`]). `None`: no limit.
    pub timeout: Option<Duration>,
    /// Files the service wrote to that may have changed since the checkpoint
    /// ([`Metadata::written_files`]): the operator's `--allow-changed`.
    pub allow_changed: Vec<PathBuf>,
}

impl RestoreRequest {
    /// A detached restore of the image in `dir` as it was dumped: connections, settings,
    /// stdio and files as the image has them, no time limit. What the restores crac runs on
    /// its own (an upgrade's, a migration's at either end) start from.
    pub fn detached(dir: PathBuf) -> RestoreRequest {
        RestoreRequest {
            dir,
            detach: true,
            tcp_close: false,
            env: BTreeMap::new(),
            inherit_stdio: false,
            timeout: None,
            allow_changed: Vec::new(),
        }
    }
}

/// How an error of a restore that ran out of time ([`RestoreRequest::timeout`]) begins.
pub const RESTORE_TIMED_OUT: &str = "criu restore did not finish within";

/// A restore done.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RestoreOutcome {
    /// The restored root.
    pub pid: u32,
    /// How long CRIU took (until it detached, or until the tree exited if not detached).
    pub restore_ms: f64,
    /// crac-action's lines from CRIU's log (hook order and durations).
    pub hook_lines: Vec<String>,
    /// What crac-action's post-resume said failed: after_restore hooks that failed or timed
    /// out, each naming its resource, and agents that did not answer. The service was restored
    /// and runs either way.
    pub hook_failures: Vec<String>,
    /// Why CRIU's log of the restore holds none of crac-action's lines, when it does not (it
    /// could not be written: a full disk): then [`RestoreOutcome::hook_lines`] and
    /// [`RestoreOutcome::hook_failures`] say nothing about the after_restore hooks, which may
    /// have run and failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_incomplete: Option<String>,
    /// The restored tree's exit code, when CRIU stayed its parent.
    pub exit_code: Option<i32>,
    /// CRIU's own figures (from its `stats-restore`), when it wrote them.
    pub criu: Option<crate::stats::RestoreStats>,
}

/// How long a restore waits for a zombie that holds one of the image's pids to be reaped: the
/// process a checkpoint just stopped stays a zombie until its parent waits for it.
pub const ZOMBIE_WAIT: Duration = Duration::from_secs(10);

/// Checks that the image in `dir` can be restored here, and returns its metadata: its files
/// (sizes, and contents changed since last found intact: [`metadata::verify_allowing`] with
/// [`metadata::Check::Changed`]), the executable, the files the service wrote to (but those
/// `allowed` to have changed), the architecture, CRIU, and
/// that the image's pids are free, waiting up to [`ZOMBIE_WAIT`] for zombies that hold them
/// (`notice` is told once per zombie it waits for).
///
/// # Errors
///
/// [`FailureKind::BadInput`] for a missing, corrupt, incomplete or foreign image, a changed
/// executable, a changed file the service wrote to, or a PID in use;
/// [`FailureKind::Unavailable`] when no CRIU can run, or when this crac lacks a capability the
/// image's processes held ([`crate::capabilities`]).
pub fn validate(
    dir: &Path,
    allowed: &[PathBuf],
    notice: &mut dyn FnMut(&str),
) -> Result<(Metadata, Criu), OpError> {
    let meta =
        metadata::read(dir).map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
    let (kernel, _) = metadata::this_machine();
    if meta.kernel != kernel {
        // Not refused: CRIU restores across kernels, and says which feature is missing if one is.
        notice(&format!(
            "the image was made on Linux {}, this machine runs {kernel}: CRIU refuses the restore if the image needs a kernel feature missing here",
            meta.kernel
        ));
    }
    if meta.cpu_features.is_empty() {
        notice("the image records no CPU features (made by an older crac): not checked");
    } else {
        let missing = crate::cpu::missing(&meta.cpu_features);
        if !missing.is_empty() {
            return Err(OpError::new(
                FailureKind::BadInput,
                format!(
                    "this machine's CPU lacks {} the image's machine had, which the service may \
                     rely on ({}): restore it on a machine with them, or start the service cold",
                    if missing.len() == 1 {
                        "a feature"
                    } else {
                        "features"
                    },
                    missing.join(", ")
                ),
            ));
        }
    }
    let lacking = crate::capabilities::missing(&meta.capabilities);
    if !lacking.is_empty() {
        // CRIU would fail giving them back, and 4.2 then hangs ("Unable to restore
        // capabilities", a BUG in its restorer).
        return Err(OpError::new(
            FailureKind::Unavailable,
            format!(
                "the image's processes held {} that this crac lacks ({}), which CRIU must give \
                 back: restore it with them (a container: run it with the capabilities, or the \
                 --privileged, its warm-up had), or make the image with a service that holds \
                 fewer",
                if lacking.len() == 1 {
                    "a capability"
                } else {
                    "capabilities"
                },
                lacking.join(", ")
            ),
        ));
    }
    if !crate::capabilities::can_drop_to(&meta.bounding_set) {
        // CRIU's PR_CAPBSET_DROP fails, and 4.2 then hangs as above.
        return Err(OpError::new(
            FailureKind::Unavailable,
            "the image's processes had a bounding set without some capabilities, which CRIU \
             must drop from the restored ones, and that needs CAP_SETPCAP, which this crac \
             lacks: give it CAP_SETPCAP (a container run as a user: --cap-add SETPCAP, at the \
             warm-up too, so that the image records it), or restore as root",
        ));
    }
    metadata::verify_allowing(dir, &meta, metadata::Check::Changed, allowed)
        .map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
    let criu = criu::find()?;
    // The root, and every process with an agent (recorded by crac-action's post-dump), must
    // get its pid back.
    // A tree that had a pid namespace of its own (its root was pid 1 there: a container, or
    // `unshare --pid --fork`) is restored into a new one, where its pids are free by
    // construction; so is any agent that had one.
    let mut pids = Vec::new();
    if !meta.in_own_pid_namespace() {
        pids.push(meta.pid);
        if let Ok(Some(record)) = AgentFolders::read(dir) {
            pids.extend(
                record
                    .agents
                    .iter()
                    .filter(|a| a.pid != meta.pid && !a.in_own_pid_namespace())
                    .map(|a| a.pid),
            );
        }
    }
    for pid in pids {
        if crac_action::tree::state_of(pid) == Some('Z') {
            let parent = crac_action::tree::parent_of(pid).unwrap_or(0);
            notice(&format!(
                "waiting for pid {pid} to be reaped (a zombie: the process the checkpoint stopped, not yet waited for by its parent, pid {parent} `{}`), at most {}s",
                read_cmdline(parent).join(" "),
                ZOMBIE_WAIT.as_secs()
            ));
            let deadline = Instant::now() + ZOMBIE_WAIT;
            while crac_action::tree::state_of(pid) == Some('Z') && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(holder) = ProcessId::of(pid) {
            let cmd = read_cmdline(holder.pid).join(" ");
            return Err(OpError::new(
                FailureKind::BadInput,
                format!(
                    "pid {pid} is in use by `{}`: the image must get its original pid back; stop that process first",
                    if cmd.is_empty() { "?".to_owned() } else { cmd }
                ),
            ));
        }
    }
    Ok((meta, criu))
}

/// Restores the image in `request.dir` (validated first; `notice` as for [`validate`];
/// `progress`, if given, is told [`Phase::Verify`] then [`Phase::Restore`]).
///
/// # Errors
///
/// As [`validate`], [`FailureKind::Unavailable`] when not root, and [`FailureKind::Failed`]
/// when CRIU fails (its lines in the details).
pub fn restore(
    request: &RestoreRequest,
    notice: &mut dyn FnMut(&str),
    progress: Option<Progress<'_>>,
) -> Result<RestoreOutcome, OpError> {
    restore_with(request, notice, progress, None).map(|(outcome, _)| outcome)
}

/// [`restore`], lazily: the tree runs as soon as CRIU has made it, and its memory arrives
/// from CRIU's page server as it is touched ([`crate::lazy`]). The caller must
/// [`PageServer::wait`](crate::lazy::PageServer::wait) for the server, which kills the tree if
/// it fails.
///
/// # Errors
///
/// As [`restore`]; when the page server cannot start, nothing was restored.
pub fn restore_lazily(
    request: &RestoreRequest,
    notice: &mut dyn FnMut(&str),
    progress: Option<Progress<'_>>,
) -> Result<(RestoreOutcome, PageServer), OpError> {
    let (outcome, server) = restore_with(request, notice, progress, Some(Pages::Local))?;
    Ok((outcome, server.expect("a lazy restore has a page server")))
}

/// [`restore_lazily`] for a post-copy migration: the page server fetches the memory over
/// `pages` (a connected socket to the source's dump) instead of from the image folder.
///
/// # Errors
///
/// As [`restore_lazily`].
pub fn restore_pages_from(
    request: &RestoreRequest,
    notice: &mut dyn FnMut(&str),
    pages: OwnedFd,
) -> Result<(RestoreOutcome, PageServer), OpError> {
    let (outcome, server) = restore_with(request, notice, None, Some(Pages::Remote(pages)))?;
    Ok((outcome, server.expect("a lazy restore has a page server")))
}

/// Where a lazy restore's memory comes from.
enum Pages {
    /// The image folder.
    Local,
    /// The source's dump, over this socket.
    Remote(OwnedFd),
}

fn restore_with(
    request: &RestoreRequest,
    notice: &mut dyn FnMut(&str),
    progress: Option<Progress<'_>>,
    lazy: Option<Pages>,
) -> Result<(RestoreOutcome, Option<PageServer>), OpError> {
    require_root("restore")?;
    if let Some(progress) = progress {
        progress(Phase::Verify, 0);
    }
    let (meta, criu) = validate(&request.dir, &request.allow_changed, notice)?;
    // While CRIU gives the image's pid back (a detached restore: one that CRIU stays the parent
    // of lasts as long as the service), a checkpoint or another restore of that pid is told.
    let _lock = if request.detach && !meta.in_own_pid_namespace() {
        lock_pid(meta.pid, "restore")?
    } else {
        None
    };
    if let Some(progress) = progress {
        progress(Phase::Restore, 0);
    }
    let action = criu::action_script()?;
    // The restored root's pid: the image's, unless the tree had a pid namespace of its own,
    // which the restore makes anew (and CRIU says where the root landed). CRIU creates the
    // file (O_EXCL) at a path its command line shows to everyone: in a private folder of an
    // unguessable name, nobody can make it first and fail the restore.
    let scratch = crac_fs::TempDir::new("crac-restore").map_err(|e| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot make a private folder for CRIU's pidfile: {e}"),
        )
    })?;
    let pidfile = scratch.path().join("restored.pid");
    let mut cmd = restore_command(request, &meta, &criu.path, &action, &pidfile, notice)?;
    // Restores of one image take turns: CRIU writes its log and figures into the image
    // folder, and a lazy restore's page server listens there. Copies restored at once (each
    // into a pid namespace of its own) come up one after the other, tens of ms apart. An
    // image on a read-only file system (a container run with --read-only) is only read: CRIU
    // writes into the private folder instead, and nothing needs a turn.
    let read_only = nix::unistd::access(&request.dir, nix::unistd::AccessFlags::W_OK)
        .is_err_and(|e| e == nix::errno::Errno::EROFS);
    let work = if read_only && lazy.is_none() {
        cmd = cmd.work_dir(scratch.path());
        scratch.path().to_owned()
    } else {
        request.dir.clone()
    };
    let _turn = if work == request.dir {
        Some(restore_turn(&request.dir)?)
    } else {
        None
    };
    let log_path = work.join("restore.log");
    let started = Instant::now();
    let (cmd, server) = match lazy {
        Some(pages) => {
            let remote = match pages {
                Pages::Local => None,
                Pages::Remote(socket) => Some(socket),
            };
            let server = PageServer::start(&criu.path, &request.dir, remote)?;
            (cmd.lazy(), Some(server))
        }
        None => (cmd, None),
    };
    let output = match run_within(cmd.command(), request.timeout) {
        Ok(Some(output)) => output,
        Ok(None) => {
            if let Some(server) = server {
                server.stop();
            }
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let mut details = criu_lines(&log, &[]);
            details.extend(hints(&log));
            return Err(OpError::new(
                FailureKind::Failed,
                format!(
                    "{RESTORE_TIMED_OUT} {} s: CRIU and the processes it had begun to restore \
                     were killed (its log: {}; allow more time if the image is that slow to \
                     restore)",
                    request.timeout.unwrap_or_default().as_secs_f64(),
                    log_path.display()
                ),
            )
            .with_details(details));
        }
        Err(e) => {
            if let Some(server) = server {
                server.stop();
            }
            return Err(OpError::new(
                FailureKind::Unavailable,
                format!("cannot run {}: {e}", criu.path.display()),
            ));
        }
    };
    let restore_ms = ms(started.elapsed());
    let pid = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(meta.pid);
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let (hook_lines, hook_failures) = hook_lines(&log);
    let restored = log.contains("Restore finished successfully") || request.detach;
    if !output.status.success() && (request.detach || !restored) {
        if let Some(server) = server {
            server.stop();
        }
        let mut details = criu_lines(&log, &output.stderr);
        details.extend(hints(&log));
        return Err(OpError::new(
            FailureKind::Failed,
            format!(
                "criu restore of {} failed ({})",
                request.dir.display(),
                status_text(&output.status)
            ),
        )
        .with_details(details));
    }
    // crac-action writes at least one line at every restore ("no agent in the process tree"
    // when there is none): a log without any was not written whole.
    let log_incomplete = hook_lines
        .is_empty()
        .then(|| log_incomplete(&log_path, log.len(), pid));
    let outcome = RestoreOutcome {
        pid,
        restore_ms,
        hook_lines,
        hook_failures,
        log_incomplete,
        exit_code: if request.detach {
            None
        } else {
            output.status.code()
        },
        criu: crate::stats::restore(&work),
    };
    Ok((outcome, server))
}

/// Runs `cmd` (a CRIU) to the end, its output captured, or for at most `timeout`: then CRIU
/// and every process below it are killed and the answer is `None`. A CRIU that meets a BUG in
/// its restorer waits forever for the tree it was making.
fn run_within(mut cmd: Command, timeout: Option<Duration>) -> std::io::Result<Option<Output>> {
    let Some(timeout) = timeout else {
        return cmd.output().map(Some);
    };
    let child = cmd.spawn()?;
    let pid = child.id();
    let (done, wait) = mpsc::channel();
    std::thread::Builder::new()
        .name("crac-criu-wait".into())
        .spawn(move || {
            let _ = done.send(child.wait_with_output());
        })?;
    match wait.recv_timeout(timeout) {
        Ok(output) => output.map(Some),
        Err(_) => {
            // CRIU is reaped only by that thread: unless it has just sent what it reaped, the
            // pid is still CRIU's (the window between the two is a few instructions).
            if let Ok(output) = wait.try_recv() {
                return output.map(Some);
            }
            kill_tree(pid);
            // Killed, CRIU ends at once (its output is not wanted); a process stuck in the
            // kernel is not waited for beyond this.
            let _ = wait.recv_timeout(Duration::from_secs(5));
            Ok(None)
        }
    }
}

/// Kills `root` and every process below it: each is stopped first, level by level, so that
/// none forks or re-parents its children while the tree is read, then all are killed.
fn kill_tree(root: u32) {
    let mut stopped = BTreeSet::new();
    loop {
        let new: Vec<u32> = crac_action::tree::descendants(root)
            .into_iter()
            .filter(|&pid| stopped.insert(pid))
            .collect();
        if new.is_empty() {
            break;
        }
        for pid in new {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
        }
    }
    for pid in stopped {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// The `criu restore` of `request`, with the options the image `meta` was dumped with, the
/// restored tree's stdio, and the after_restore hooks' settings in CRIU's environment (which
/// CRIU hands to crac-action, whose post-resume hands it to agents). `notice` is told when the
/// restored service gets pipes nobody reads.
fn restore_command(
    request: &RestoreRequest,
    meta: &Metadata,
    criu: &Path,
    action: &Path,
    pidfile: &Path,
    notice: &mut dyn FnMut(&str),
) -> Result<CriuCommand, OpError> {
    let mut cmd = CriuCommand::restore(criu, &request.dir, pidfile, action, request.detach)
        .dumped_with(&meta.options, request.tcp_close);
    if request.inherit_stdio {
        cmd = cmd.inherit_stdio(meta)?;
    } else if !meta.stdio_pipes.is_empty() {
        notice(&format!(
            "the service wrote its output to a pipe ({}), which the restored one gets back with nobody reading it: its writes there fail (`crac run --log -` hands it its own output instead)",
            meta.stdio_pipes
                .iter()
                .map(|(fd, key)| format!("descriptor {fd}: {key}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !request.env.is_empty() {
        let encoded = crac_protocol::records::encode_restore_env(&request.env)
            .map_err(|e| OpError::new(FailureKind::BadInput, e))?;
        cmd = cmd.env(crac_protocol::records::RESTORE_ENV, encoded);
    }
    Ok(cmd)
}

/// crac-action's lines in CRIU's restore log, and of those, what its post-resume said failed.
fn hook_lines(log: &str) -> (Vec<String>, Vec<String>) {
    let lines: Vec<String> = log
        .lines()
        .filter(|l| l.starts_with("crac-action:"))
        .map(str::to_owned)
        .collect();
    // crac-action's post-resume: "crac-action: post-resume: after-restore failed: pid N: ..."
    // (crac_action::ActionError::AfterRestore).
    let failures = lines
        .iter()
        .filter_map(|l| l.strip_prefix("crac-action: post-resume: after-restore failed: "))
        .map(str::to_owned)
        .collect();
    (lines, failures)
}
