//! Driving CRIU for the `crac` command: a checkpoint into the image store, a validated restore.
//!
//! Both run CRIU with crac-action as the action script, so hooks run as they would for an
//! operator's own `criu dump --action-script`. What this adds: the image store (a failed dump
//! leaves nothing in it), a metadata file beside the images, validation before a restore, and
//! errors that quote CRIU's own lines with a hint for the ones people hit.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::locate::{self, Criu};
use crate::metadata::{self, DumpOptions, HookTiming, MappedFile, Metadata, Timings};
use crate::store::{Staging, Store};
use crac_action::settings::TIMEOUT_ENV;
use crac_action::tree::ProcessId;
use crac_protocol::records::{AgentFolders, PreDumpReport, HOOK_REPORT_ENV};

/// How `crac` has CRIU lock the TCP connections it dumps (`--network-lock`): nftables, not
/// CRIU's default iptables. With iptables, a restore with `--tcp-close` never removes the
/// rules that locked the connections at the dump (CRIU skips that unlock), and the peers'
/// packets are dropped for good; the nftables lock is one table, which every restore deletes.
/// It also needs no `iptables-restore` on the machine.
pub const TCP_NETWORK_LOCK: &str = "nftables";

/// How an operation failed, which decides the `crac` exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The operation ran and failed (CRIU failed, a hook failed): exit code 1.
    Failed,
    /// The input was wrong (unknown PID, missing or invalid image): exit code 2.
    BadInput,
    /// Checkpoint/restore is not possible here (no CRIU, no privileges, store not writable):
    /// exit code 3.
    Unavailable,
    /// A checkpoint's image was made (the service stopped, unless `--leave-running`) but could
    /// not be finished or filed in the store: it is kept where it is, and the message says how
    /// to restore it: exit code 4.
    ImageKept,
    /// A restore brought the service back, but an after_restore hook failed or timed out (the
    /// message names the resource; see [`RestoreOutcome::hook_failures`]): exit code 5.
    HooksFailed,
}

impl FailureKind {
    /// The `crac` exit code for this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Failed => 1,
            FailureKind::BadInput => 2,
            FailureKind::Unavailable => 3,
            FailureKind::ImageKept => 4,
            FailureKind::HooksFailed => 5,
        }
    }
}

/// A failed operation: one line, and the details that explain it (CRIU's error lines,
/// crac-action's lines, hints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// Which kind of failure.
    pub kind: FailureKind,
    /// One line saying what went wrong and what to do.
    pub message: String,
    /// Supporting lines.
    pub details: Vec<String>,
}

impl OpError {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub(crate) fn with_details(mut self, details: Vec<String>) -> OpError {
        self.details = details;
        self
    }
}

/// What a checkpoint or a restore is doing, for a progress display (see [`Progress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// The before_checkpoint hooks run (CRIU's pre-dump).
    Hooks,
    /// CRIU freezes the tree and writes the image.
    Dump,
    /// crac hashes the image files and the executable.
    Hash,
    /// crac writes the metadata and files the image in the store.
    Commit,
    /// A restore checks the image's files and the executable.
    Verify,
    /// CRIU restores the tree, and the after_restore hooks run.
    Restore,
}

/// Told what an operation is doing: the phase, and the bytes of image written so far (during
/// [`Phase::Dump`]; 0 otherwise). Called from a thread of the driver's too, about ten times a
/// second while CRIU dumps; with no `Progress` given, nothing polls.
pub type Progress<'a> = &'a (dyn Fn(Phase, u64) + Sync);

/// Finds CRIU, as an [`OpError`].
///
/// # Errors
///
/// [`FailureKind::Unavailable`] with what was tried.
pub fn criu() -> Result<Criu, OpError> {
    locate::locate().map_err(|e| OpError::new(FailureKind::Unavailable, e.to_string()))
}

/// The crac-action binary: `$CRAC_ACTION`, else beside this executable, else on `PATH`.
///
/// # Errors
///
/// [`FailureKind::Unavailable`] when none is found.
pub fn action_script() -> Result<PathBuf, OpError> {
    if let Some(path) = std::env::var_os(crac_protocol::env::ACTION).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("crac-action")));
    if let Some(path) = beside.filter(|p| p.is_file()) {
        return Ok(path);
    }
    locate::on_path("crac-action").ok_or_else(|| {
            OpError::new(
                FailureKind::Unavailable,
                "crac-action not found beside crac nor on PATH: install it next to crac, or set CRAC_ACTION",
            )
        })
}

/// Where a checkpoint goes.
#[derive(Clone, Debug)]
pub enum Destination {
    /// An image of this name in the store.
    Store {
        /// The store.
        store: Store,
        /// The image's name.
        name: String,
        /// Whether an existing image of that name is replaced.
        replace: bool,
    },
    /// A folder of the caller's (created; must not exist or be empty).
    Dir(PathBuf),
}

/// A checkpoint to take.
#[derive(Clone, Debug)]
pub struct CheckpointRequest {
    /// The root of the tree to dump.
    pub pid: u32,
    /// Where the images go.
    pub destination: Destination,
    /// Options passed on to CRIU.
    pub options: DumpOptions,
    /// Flush the image to disk before it gets its name in the store (see
    /// [`Staging::set_durable`]).
    pub durable: bool,
}

/// A checkpoint taken.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckpointOutcome {
    /// The image folder.
    pub path: PathBuf,
    /// Its metadata (written beside the images).
    pub metadata: Metadata,
    /// Whether the process still runs (`--leave-running`).
    pub left_running: bool,
}

/// Takes a checkpoint. The target keeps running if anything fails before CRIU's dump succeeds
/// (the hooks are rolled back), and nothing is left in the store. Once it succeeded, the image
/// is never discarded: if the metadata or the store's commit fails, it is kept where it is
/// ([`FailureKind::ImageKept`]).
///
/// Refused up front: pid 1, this process and its ancestors (CRIU cannot dump a tree it is
/// part of, and would stop the caller), and a caller that is not root.
///
/// `warn` is told, before the dump, what will make the image hard to use (stdout or stderr on a
/// file opened without `O_APPEND`); `progress`, if given, is told each phase, and the bytes
/// written while CRIU dumps.
///
/// # Errors
///
/// See [`OpError`]; CRIU's error lines and crac-action's lines are in the details.
pub fn checkpoint(
    request: &CheckpointRequest,
    warn: &mut dyn FnMut(&str),
    progress: Option<Progress<'_>>,
) -> Result<CheckpointOutcome, OpError> {
    let started = Instant::now();
    let pid = request.pid;
    let process = ProcessId::of(pid).ok_or_else(|| {
        OpError::new(
            FailureKind::BadInput,
            format!("no process with pid {pid} (see `crac ps` for processes with an agent)"),
        )
    })?;
    refuse_up_front(pid, &request.options)?;
    // Held until the image is filed: a second checkpoint of this pid meanwhile is told so,
    // rather than failing in CRIU and guessing at the state of a service the first stopped.
    let _lock = lock_pid(pid, "checkpoint")?;
    for warning in stdio_warnings(pid) {
        warn(&warning);
    }
    let command_line = read_cmdline(pid);
    let ns_pid = crac_action::namespace::ns_pid(pid);
    let executable = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    // Opened now and hashed after the dump: they stay the files the service ran even if their
    // paths are replaced meanwhile, and hashing them costs nothing while the service is frozen.
    let executable_file = fs::File::open(format!("/proc/{pid}/exe")).ok();
    let tree = crac_action::tree::descendants(pid);
    let mapped_files = open_mapped_files(&tree, &executable);
    let criu = criu()?;
    let action = action_script()?;

    let mut staging: Option<Staging> = None;
    let images: PathBuf = match &request.destination {
        Destination::Store {
            store,
            name,
            replace,
        } => {
            if !replace {
                store
                    .check_absent(name)
                    .map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
            }
            let mut s = store
                .begin(name)
                .map_err(|e| OpError::new(FailureKind::Unavailable, e.to_string()))?;
            s.set_durable(request.durable);
            let path = s.path().to_owned();
            staging = Some(s);
            path
        }
        Destination::Dir(dir) => {
            prepare_dir(dir)?;
            dir.clone()
        }
    };
    let created_dir = matches!(request.destination, Destination::Dir(_));
    let fail = |err: OpError| {
        // A failed dump leaves no half image: the staging folder goes with `staging`; a
        // caller's folder is emptied of what CRIU wrote (its log is kept for diagnosis).
        if created_dir {
            clean_dir_except_log(&images);
        }
        err
    };

    let (kernel, arch) = metadata::this_machine();
    let name = match &request.destination {
        Destination::Store { name, .. } => name.clone(),
        Destination::Dir(dir) => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let mut metadata = Metadata {
        format: metadata::FORMAT,
        name,
        pid,
        ns_pid,
        command_line,
        executable,
        created_unix_ms: 0,
        image_bytes: 0,
        criu_version: criu.version.clone(),
        kernel,
        arch,
        options: request.options.clone(),
        hooks: Vec::new(),
        timings: Timings::default(),
        crac_version: env!("CARGO_PKG_VERSION").to_owned(),
        files: Vec::new(),
        executable_sha256: None,
        mapped_files: Vec::new(),
        cpu_features: crate::cpu::features(),
        env_sha256: env_hashes(pid),
        stdio_pipes: stdio_pipes(pid),
    };
    // If this crac is killed while CRIU dumps, the next one finishes the image from this
    // (metadata::complete_pending).
    metadata::write_pending(&images, &metadata).map_err(|e| {
        fail(OpError::new(
            FailureKind::Unavailable,
            format!("cannot write into {}: {e}", images.display()),
        ))
    })?;

    // In the image folder, a hidden working file: if crac is killed before it reads it, it
    // goes with the folder (or stays hidden in a recovered image), never stray in /tmp.
    let report_path = images.join(".crac-hooks.json");
    let mut cmd = Command::new(&criu.path);
    cmd.arg("dump")
        .arg("-t")
        .arg(pid.to_string())
        .arg("-D")
        .arg(&images)
        .arg("-o")
        .arg("dump.log")
        .arg("--action-script")
        .arg(&action)
        .env(TIMEOUT_ENV, request.options.timeout_secs.to_string())
        .env(HOOK_REPORT_ENV, &report_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // A Ctrl-C at the terminal goes to the whole foreground process group: CRIU killed
        // half-way would leave the service half-dumped. crac, which gets the signal, lets the
        // dump end (see `crac checkpoint`).
        .process_group(0);
    if request.options.leave_running {
        cmd.arg("--leave-running");
    }
    if request.options.tcp_established {
        cmd.arg("--tcp-established");
    }
    if let Some(lock) = &request.options.network_lock {
        cmd.arg("--network-lock").arg(lock);
    }
    // A service keeps its listener: a client that connects during the dump waits in the
    // listener's queue, which CRIU cannot dump ("In-flight connection"). Leave it out of the
    // image: after --leave-running the process serves it; a restored copy never had it.
    cmd.arg("--skip-in-flight");
    if request.options.file_locks {
        cmd.arg("--file-locks");
    }
    cmd.args(&request.options.extra_criu_args);
    let dump_started = Instant::now();
    let output = std::thread::scope(|scope| {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        if let Some(progress) = progress {
            let (images, report_path) = (&images, &report_path);
            scope.spawn(move || loop {
                let written = image_bytes_so_far(images);
                // crac-action writes its report when the hooks are done; without agents, the
                // first image file says CRIU is dumping.
                let phase = if written > 0 || report_path.exists() {
                    Phase::Dump
                } else {
                    Phase::Hooks
                };
                progress(phase, written);
                if !matches!(
                    stopped.recv_timeout(Duration::from_millis(100)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                ) {
                    break;
                }
            });
        }
        let output = cmd.output();
        drop(stop);
        output
    });
    let output = output.map_err(|e| {
        fail(OpError::new(
            FailureKind::Unavailable,
            format!("cannot run {}: {e}", criu.path.display()),
        ))
    })?;
    let dump_ms = ms(dump_started.elapsed());
    // CRIU writes its files 0644: the folder keeps others out, and the files themselves are
    // the service's memory, so they are made private too (a copy or move of the folder keeps
    // their modes).
    if let Err(e) = crac_fs::tighten_tree(&images) {
        warn(&format!(
            "could not make the files in {} private to their owner: {e}",
            images.display()
        ));
    }
    let hook_report: Option<PreDumpReport> = fs::read(&report_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let _ = fs::remove_file(&report_path);
    let log = fs::read_to_string(images.join("dump.log")).unwrap_or_default();

    if !output.status.success() {
        let mut details = criu_lines(&log, &output.stderr);
        details.extend(hints(&log));
        let state = if !process.is_alive() {
            format!("pid {pid} is no longer running")
        } else if log.contains("killed by signal") && log.contains("Pre dump script failed") {
            // Nobody rolled back an agent that had answered: its lease does (crac-agent).
            format!(
                "pid {pid} is still running; an agent that crac-action had told ends that checkpoint by itself when its lease runs out (--timeout + 10 s at the most)"
            )
        } else if log.contains("did not reply within") {
            format!(
                "pid {pid} is still running; an agent that did not answer in time rolls back when its hooks are done"
            )
        } else {
            format!("pid {pid} is still running; hooks that ran were rolled back")
        };
        return Err(fail(
            OpError::new(
                FailureKind::Failed,
                format!(
                    "criu dump of pid {pid} failed ({}); {state}",
                    status_text(&output.status)
                ),
            )
            .with_details(details),
        ));
    }

    // CRIU's dump succeeded: unless --leave-running, the service is stopped and this image is
    // all that is left of it. From here on nothing discards it.
    if !request.options.leave_running {
        // Its agents died by CRIU's SIGKILL and could not remove their socket folders; a
        // restore makes them again (crac-action's pre-restore), so none stays behind meanwhile.
        // CRIU has sent SIGKILL; the processes may take a moment to be gone.
        let dead = |pid| crac_action::tree::state_of(pid).is_none_or(|state| state == 'Z');
        let deadline = Instant::now() + Duration::from_secs(1);
        for &member in &tree {
            while !dead(member) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Where each agent's folder was (post-dump's list): not necessarily where this
        // process's own base would put it (another uid's, a folder of its own).
        crac_action::post_dump::remove_dead_folders(&images, |member| {
            tree.contains(&member) && dead(member)
        });
    }
    metadata.hooks = hook_report
        .iter()
        .flat_map(|r| {
            r.agents.iter().flat_map(|a| {
                a.hooks.iter().map(move |h| HookTiming {
                    pid: a.pid,
                    resource: h.resource.clone(),
                    phase: h.phase.to_string(),
                    duration_us: h.duration_us,
                })
            })
        })
        .collect();
    metadata.created_unix_ms = now_ms();
    metadata.timings = Timings {
        hooks_ms: hook_report.as_ref().map_or(0.0, |r| r.wall_ms),
        dump_ms,
        hash_ms: 0.0,
        total_ms: 0.0,
        criu: crate::stats::dump(&images),
    };
    let kept = |what: String, written: bool, staging: Option<Staging>| {
        let path = staging.map_or_else(|| images.clone(), Staging::keep);
        image_kept(request, &criu, &action, &path, &what, written)
    };
    if let Some(progress) = progress {
        progress(Phase::Hash, 0);
    }
    let hash_started = Instant::now();
    // The files outside the image (the executable, the mapped ones) are hashed on a thread of
    // their own while the image files are.
    // Libraries and the executable are usually the same as at the last checkpoint: their
    // hashes are reused while the files have the same identity (metadata::KnownHashes).
    let known_path = match &request.destination {
        Destination::Store { store, .. } => Some(store.root().join(metadata::KNOWN_HASHES_FILE)),
        Destination::Dir(_) => None,
    };
    let mut known = known_path
        .as_deref()
        .map(metadata::KnownHashes::load)
        .unwrap_or_default();
    let (files, (executable_hash, mapped_hashes, mut known)) = std::thread::scope(|scope| {
        let executable_path = metadata.executable.clone();
        let outside = scope.spawn(move || {
            let executable = executable_file.and_then(|f| known.hash(&executable_path, f).ok());
            let mapped: Vec<(String, String, metadata::Identity)> = mapped_files
                .into_iter()
                .filter_map(|(path, file)| {
                    let (sha256, identity) = known.hash(&path, file).ok()?;
                    Some((path, sha256, identity))
                })
                .collect();
            (executable, mapped, known)
        });
        let files = metadata::list_image_files(&images).and_then(|mut files| {
            metadata::hash_files(&images, &mut files)?;
            Ok(files)
        });
        (
            files,
            outside.join().expect("the hashing thread does not panic"),
        )
    });
    let files = match files {
        Ok(files) => files,
        Err(e) => {
            return Err(kept(
                format!(
                    "could not read the image files in {}: {e}",
                    images.display()
                ),
                false,
                staging,
            ))
        }
    };
    // The identities of the files that were hashed, noted below as intact where their paths
    // still lead to them, so that a restore on this machine need not hash them again.
    let mut outside = BTreeMap::new();
    if let Some((sha256, identity)) = executable_hash {
        outside.insert(metadata.executable.clone(), identity);
        metadata.executable_sha256 = Some(sha256);
    }
    for (path, sha256, identity) in mapped_hashes {
        outside.insert(path.clone(), identity);
        metadata.mapped_files.push(MappedFile { path, sha256 });
    }
    metadata.timings.hash_ms = ms(hash_started.elapsed());
    metadata.image_bytes = files.iter().map(|f| f.size).sum();
    metadata.files = files;
    metadata.timings.total_ms = ms(started.elapsed());
    if let Some(progress) = progress {
        progress(Phase::Commit, 0);
    }
    if let Err(e) = metadata::write(&images, &metadata) {
        return Err(kept(
            format!(
                "could not write the metadata into {}: {e}",
                images.display()
            ),
            false,
            staging,
        ));
    }
    let _ = fs::remove_file(images.join(metadata::PENDING_FILE));
    metadata::note_intact(&images, &metadata, &outside);
    let path = match (staging, &request.destination) {
        (Some(mut staging), Destination::Store { replace, .. }) => match staging.commit(*replace) {
            Ok(path) => path,
            Err(e) => {
                return Err(kept(
                    format!("could not file it in the store: {e}"),
                    true,
                    Some(staging),
                ))
            }
        },
        _ => images,
    };
    // After the image is filed: a write the image does not wait for.
    if let Some(known_path) = &known_path {
        known.save(known_path);
    }
    Ok(CheckpointOutcome {
        path,
        metadata,
        left_running: request.options.leave_running,
    })
}

/// The regular files the processes `pids` (the dumped tree) have mapped besides the root's
/// `executable` (shared libraries, locale files, a child's own executable), each once, each
/// opened through `/proc/PID/map_files`, which is the mapped file itself even if its path was
/// replaced since. A deleted file, or one that cannot be opened, is left out: it cannot be
/// checked at a restore either.
fn open_mapped_files(pids: &[u32], executable: &str) -> Vec<(String, fs::File)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut files = Vec::new();
    for &pid in pids {
        open_mapped_files_of(pid, executable, &mut seen, &mut files);
    }
    files
}

/// [`open_mapped_files`] for one process, skipping the paths in `seen`.
fn open_mapped_files_of(
    pid: u32,
    executable: &str,
    seen: &mut std::collections::BTreeSet<String>,
    files: &mut Vec<(String, fs::File)>,
) {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return;
    };
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut fields = line.splitn(6, char::is_whitespace);
        let Some(range) = fields.next() else { continue };
        let Some(path) = fields.nth(4).map(str::trim_start) else {
            continue;
        };
        if !path.starts_with('/')
            || path.ends_with(" (deleted)")
            || path == executable
            || !seen.insert(path.to_owned())
        {
            continue;
        }
        if let Ok(file) = fs::File::open(format!("/proc/{pid}/map_files/{range}")) {
            files.push((path.to_owned(), file));
        }
    }
}

/// The bytes of CRIU image files (`*.img`) in `dir` so far.
fn image_bytes_so_far(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// What crac refuses to checkpoint before touching anything, with the reason.
fn refuse_up_front(pid: u32, options: &DumpOptions) -> Result<(), OpError> {
    if pid == 1 {
        return Err(OpError::new(
            FailureKind::BadInput,
            "pid 1 is this system's init: dumping it would stop every process on the machine; crac does not checkpoint it (a container's init has another pid out here: see `crac ps`)",
        ));
    }
    let me = std::process::id();
    let mut ancestor = Some(me);
    while let Some(p) = ancestor {
        if p == pid {
            let who = if p == me {
                "crac itself".to_owned()
            } else {
                format!("an ancestor of this crac (`{}`)", read_cmdline(p).join(" "))
            };
            return Err(OpError::new(
                FailureKind::BadInput,
                format!(
                    "pid {pid} is {who}: CRIU cannot dump a tree that it runs in, and stopping it would stop crac; run crac from outside that process tree"
                ),
            ));
        }
        ancestor = crac_action::tree::parent_of(p).filter(|&parent| parent > 0 && parent != p);
    }
    require_root("checkpoint")?;
    // What CRIU refuses without --shell-job, after the hooks would have run for nothing.
    let shell_job = options
        .extra_criu_args
        .iter()
        .any(|a| a == "--shell-job" || a == "-j");
    if shell_job {
        return Ok(());
    }
    if let Some(session) = session_of(pid).filter(|&session| session != pid) {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!(
                "pid {pid} is not a session leader (its session is {session}): CRIU dumps a tree whose root leads its own session; start the service with setsid, or pass -- --shell-job"
            ),
        ));
    }
    for (fd, name) in [(0, "stdin"), (1, "stdout"), (2, "stderr")] {
        let Ok(target) = fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
            continue;
        };
        let path = target.to_string_lossy();
        if path.starts_with("/dev/pts/") || path.starts_with("/dev/tty") || path == "/dev/console" {
            return Err(OpError::new(
                FailureKind::BadInput,
                format!(
                    "pid {pid} has the terminal {path} as its {name}: CRIU cannot dump a terminal outside the tree; start the service with its stdio redirected (setsid ./service </dev/null >>service.log 2>&1), or pass -- --shell-job"
                ),
            ));
        }
    }
    Ok(())
}

/// A service whose stdout or stderr is a file opened without `O_APPEND` (`> file` rather than
/// `>> file`) makes a single-use image: CRIU records the file's size and offset, and refuses
/// to restore once the file has grown ("has bad size"), which it does as soon as the service,
/// or its restored copy, writes a line. Said before the dump, with the fix.
fn stdio_warnings(pid: u32) -> Vec<String> {
    const O_ACCMODE: u32 = 0o3;
    let mut warnings = Vec::new();
    for (fd, name) in [(1, "stdout"), (2, "stderr")] {
        let link = format!("/proc/{pid}/fd/{fd}");
        let Ok(target) = fs::read_link(&link) else {
            continue;
        };
        if !fs::metadata(&link).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let flags = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            });
        let Some(flags) = flags else { continue };
        let writes = flags & O_ACCMODE != 0;
        if writes && flags & libc::O_APPEND as u32 == 0 {
            warnings.push(format!(
                "pid {pid}'s {name} is the file {} opened without O_APPEND (`>` rather than `>>`): once that file grows, CRIU refuses to restore this image (\"has bad size\"); start the service with `>> {}` (or open the file with O_APPEND)",
                target.display(),
                target.display()
            ));
        }
    }
    warnings
}

/// `pid`'s stdout and stderr that are pipes ([`Metadata::stdio_pipes`]).
fn stdio_pipes(pid: u32) -> BTreeMap<u32, String> {
    [1, 2]
        .into_iter()
        .filter_map(|fd| {
            let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            let target = target.to_str()?;
            target
                .starts_with("pipe:[")
                .then(|| (fd, target.to_owned()))
        })
        .collect()
}

/// The session id of `pid`, as this process's pid namespace sees it (`/proc/PID/stat`).
fn session_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses: state, ppid, pgrp, session.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// CRIU needs root (it ptraces the tree, reads its memory and recreates its resources): say so
/// before CRIU fails with a bare exit code.
///
/// # Errors
///
/// [`FailureKind::Unavailable`] when the effective user is not root.
pub fn require_root(what: &str) -> Result<(), OpError> {
    if nix::unistd::geteuid().is_root() {
        return require_criu_capability(what);
    }
    Err(OpError::new(
        FailureKind::Unavailable,
        format!(
            "crac {what} needs root: CRIU stops the process tree, reads all its memory and recreates its resources, which only root may do; run it as root (sudo crac {what} ...)"
        ),
    ))
}

/// CRIU refuses to run without CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, and says so on its
/// standard output only. Root in a container without privileges has neither.
fn require_criu_capability(what: &str) -> Result<(), OpError> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_CHECKPOINT_RESTORE: u32 = 40;
    let effective = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        });
    let Some(effective) = effective else {
        // Unknown: let CRIU decide.
        return Ok(());
    };
    if effective & (1 << CAP_SYS_ADMIN | 1 << CAP_CHECKPOINT_RESTORE) != 0 {
        return Ok(());
    }
    Err(OpError::new(
        FailureKind::Unavailable,
        format!(
            "crac {what} runs as root but without CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, one of which CRIU needs: run the container with --privileged (root in a container without privileges has neither), or give crac one of them"
        ),
    ))
}

/// The error for an image CRIU made that crac could not finish or file: where it is, and the
/// exact command that restores it.
fn image_kept(
    request: &CheckpointRequest,
    criu: &Criu,
    action: &Path,
    path: &Path,
    what: &str,
    metadata_written: bool,
) -> OpError {
    let pid = request.pid;
    let state = if request.options.leave_running {
        "it keeps running (--leave-running)"
    } else {
        "stopped it"
    };
    let command = if metadata_written {
        format!("crac restore {} --detach", path.display())
    } else {
        let mut args = vec![
            criu.path.display().to_string(),
            "restore".to_owned(),
            "-D".to_owned(),
            path.display().to_string(),
            "-d".to_owned(),
            "--action-script".to_owned(),
            action.display().to_string(),
        ];
        if request.options.tcp_established {
            args.push("--tcp-established".to_owned());
        }
        if let Some(lock) = &request.options.network_lock {
            args.extend(["--network-lock".to_owned(), lock.clone()]);
        }
        if request.options.file_locks {
            args.push("--file-locks".to_owned());
        }
        args.join(" ")
    };
    let mut details = vec![format!("restore it with: {command}")];
    if matches!(request.destination, Destination::Store { .. }) {
        details.push(
            "or leave it there: the next crac that writes to the store (`crac images prune`) files it in the store, under its name if that is free"
                .to_owned(),
        );
    }
    OpError::new(
        FailureKind::ImageKept,
        format!(
            "criu dumped pid {pid} and {state}, but crac {what}; the complete image is kept in {}",
            path.display()
        ),
    )
    .with_details(details)
}

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
}

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

/// Where CRIU gets this process's stdout (and stderr): descriptor numbers well above what
/// CRIU opens before it reads its options.
const INHERITED_STDIO_FD: RawFd = 200;

/// Makes `cmd` (a `criu restore`) hand the restored tree this process's stdout and stderr in
/// place of the pipes the image's root had there: each is passed to CRIU under a number of
/// its own, named by `--inherit-fd fd[N]:pipe:[INODE]`.
fn inherit_stdio(cmd: &mut Command, meta: &Metadata) -> Result<(), OpError> {
    let mut passed: Vec<(RawFd, OwnedFd)> = Vec::new();
    let mut keys = BTreeSet::new();
    for (&fd, key) in &meta.stdio_pipes {
        // The same pipe as stdout and stderr (`2>&1`) is one file to CRIU.
        if !keys.insert(key) {
            continue;
        }
        let Ok(own) = RawFd::try_from(fd) else {
            continue;
        };
        // The copy is numbered above the numbers CRIU gets them under, so that putting one
        // in place never closes another.
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads `own` (stdout or stderr, open for this
        // process's life) and returns a new descriptor, which the OwnedFd then owns alone.
        let copy = unsafe {
            let copy = libc::fcntl(own, libc::F_DUPFD_CLOEXEC, INHERITED_STDIO_FD + 16);
            if copy == -1 {
                return Err(OpError::new(
                    FailureKind::Unavailable,
                    format!(
                        "cannot pass descriptor {fd} on to CRIU: {}",
                        std::io::Error::last_os_error()
                    ),
                ));
            }
            OwnedFd::from_raw_fd(copy)
        };
        let number = INHERITED_STDIO_FD + own;
        cmd.arg("--inherit-fd").arg(format!("fd[{number}]:{key}"));
        passed.push((number, copy));
    }
    if passed.is_empty() {
        return Ok(());
    }
    // SAFETY: dup2 is async-signal-safe; the copies (close-on-exec, so CRIU gets only the
    // duplicates dup2 makes) live in the closure until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            for (number, copy) in &passed {
                if libc::dup2(copy.as_raw_fd(), *number) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// How long a restore waits for a zombie that holds one of the image's pids to be reaped: the
/// process a checkpoint just stopped stays a zombie until its parent waits for it.
pub const ZOMBIE_WAIT: Duration = Duration::from_secs(10);

/// Checks that the image in `dir` can be restored here, and returns its metadata: its files
/// (sizes, and contents changed since last found intact: [`metadata::verify`] with
/// [`metadata::Check::Changed`]), the executable, the architecture, CRIU, and
/// that the image's pids are free, waiting up to [`ZOMBIE_WAIT`] for zombies that hold them
/// (`notice` is told once per zombie it waits for).
///
/// # Errors
///
/// [`FailureKind::BadInput`] for a missing, corrupt, incomplete or foreign image, a changed
/// executable or a PID in use; [`FailureKind::Unavailable`] when no CRIU can run.
pub fn validate(dir: &Path, notice: &mut dyn FnMut(&str)) -> Result<(Metadata, Criu), OpError> {
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
    metadata::verify(dir, &meta, metadata::Check::Changed)
        .map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
    let criu = criu()?;
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
    restore_with(request, notice, progress, false).map(|(outcome, _)| outcome)
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
) -> Result<(RestoreOutcome, crate::lazy::PageServer), OpError> {
    let (outcome, server) = restore_with(request, notice, progress, true)?;
    Ok((outcome, server.expect("a lazy restore has a page server")))
}

fn restore_with(
    request: &RestoreRequest,
    notice: &mut dyn FnMut(&str),
    progress: Option<Progress<'_>>,
    lazy: bool,
) -> Result<(RestoreOutcome, Option<crate::lazy::PageServer>), OpError> {
    require_root("restore")?;
    if let Some(progress) = progress {
        progress(Phase::Verify, 0);
    }
    let (meta, criu) = validate(&request.dir, notice)?;
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
    let action = action_script()?;
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
    let mut cmd = Command::new(&criu.path);
    cmd.arg("restore")
        .arg("-D")
        .arg(&request.dir)
        .arg("-o")
        .arg("restore.log")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--action-script")
        .arg(&action)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if request.detach {
        cmd.arg("-d");
    }
    if request.tcp_close {
        cmd.arg("--tcp-close");
    } else if meta.options.tcp_established {
        cmd.arg("--tcp-established");
    }
    if let Some(lock) = &meta.options.network_lock {
        cmd.arg("--network-lock").arg(lock);
    }
    if meta.options.file_locks {
        cmd.arg("--file-locks");
    }
    if request.inherit_stdio {
        inherit_stdio(&mut cmd, &meta)?;
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
        // CRIU hands its environment to crac-action, whose post-resume hands this to agents.
        let encoded = crac_protocol::records::encode_restore_env(&request.env)
            .map_err(|e| OpError::new(FailureKind::BadInput, e))?;
        cmd.env(crac_protocol::records::RESTORE_ENV, encoded);
    }
    // Restores of one image take turns: CRIU writes its log and figures into the image
    // folder, and a lazy restore's page server listens there. Copies restored at once (each
    // into a pid namespace of its own) come up one after the other, tens of ms apart.
    let _turn = restore_turn(&request.dir)?;
    let started = Instant::now();
    let server = if lazy {
        cmd.arg("--lazy-pages");
        Some(crate::lazy::PageServer::start(&criu.path, &request.dir)?)
    } else {
        None
    };
    let output = match cmd.output() {
        Ok(output) => output,
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
    drop(scratch);
    let log_path = request.dir.join("restore.log");
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let hook_lines: Vec<String> = log
        .lines()
        .filter(|l| l.starts_with("crac-action:"))
        .map(str::to_owned)
        .collect();
    // crac-action's post-resume: "crac-action: post-resume: after-restore failed: pid N: ..."
    // (crac_action::ActionError::AfterRestore).
    let hook_failures: Vec<String> = hook_lines
        .iter()
        .filter_map(|l| l.strip_prefix("crac-action: post-resume: after-restore failed: "))
        .map(str::to_owned)
        .collect();
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
        criu: crate::stats::restore(&request.dir),
    };
    Ok((outcome, server))
}

/// The folder of a `--dir` image: made private (0700), or an existing empty one that is the
/// caller's own (tightened to 0700). A folder another user made, or can write to, or a link, is
/// refused: the image is the service's memory, and whoever controls the folder could read it or
/// swap its files before a restore.
fn prepare_dir(dir: &Path) -> Result<(), OpError> {
    crac_fs::ensure_dir(dir).map_err(|e| {
        OpError::new(
            if crac_fs::is_untrusted(&e) {
                FailureKind::BadInput
            } else {
                FailureKind::Unavailable
            },
            format!("cannot use {} for the image: {e}", dir.display()),
        )
    })?;
    let not_empty = fs::read_dir(dir)
        .map_err(|e| {
            OpError::new(
                FailureKind::Unavailable,
                format!("cannot read {}: {e}", dir.display()),
            )
        })?
        .next()
        .is_some();
    if not_empty {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!(
                "{} is not empty: checkpoint into a new or empty folder",
                dir.display()
            ),
        ));
    }
    Ok(())
}

fn clean_dir_except_log(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name() != "dump.log" {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The command line of `pid`, split into arguments.
pub fn read_cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// CRIU's error lines and crac-action's lines, which together say what went wrong.
fn criu_lines(log: &str, stderr: &[u8]) -> Vec<String> {
    let stderr = String::from_utf8_lossy(stderr);
    log.lines()
        .chain(stderr.lines())
        .filter(|l| {
            (l.contains("Error (") && !l.contains("RLIMIT_NOFILE")) || l.starts_with("crac-action:")
        })
        .map(str::to_owned)
        .collect()
}

/// What to do about the CRIU errors people hit most.
pub fn hints(log: &str) -> Vec<String> {
    const HINTS: &[(&str, &str)] = &[
        ("not a session leader", "hint: start the service as a session leader (setsid) with stdio redirected to files or /dev/null, or pass -- --shell-job"),
        ("Found dangling tty", "hint: the service has a terminal on its stdio: redirect stdin/stdout/stderr to files or /dev/null"),
        ("External socket is used", "hint: the service holds a Unix connection to a process outside the tree: close it in a before_checkpoint hook"),
        ("Found a closed in-flight socket", "hint: a connection was closed by its peer before the service accepted it; retry the checkpoint"),
        ("Connected TCP socket", "hint: the service holds established TCP connections: close them in a before_checkpoint hook, or pass --tcp-established"),
        ("Unexpected rt vDSO area bounds", "hint: this CRIU is too old for the kernel: run scripts/provision-criu.sh and use CRIU >= 4.2"),
        ("Can't get 1:16 opt", "hint: this CRIU cannot dump TCP or UDP sockets on this kernel (CRIU 4.1 asks for SO_PASSCRED on them): use CRIU >= 4.2 (scripts/provision-criu.sh)"),
        ("iptables-restore", "hint: CRIU locks TCP connections with iptables by default and found no iptables-restore: install iptables, or pass -- --network-lock nftables (crac checkpoint --tcp-established does)"),
        ("In-flight connection", "hint: a client connected to a listener the service keeps while it was being dumped, and was not accepted yet: pass --skip-in-flight to criu (crac checkpoint does), which leaves such connections out of the image"),
        ("Can't open file", "hint: a file the image refers to is gone or changed (rebuilt binary?): restore needs the same files"),
        ("has bad size", "hint: a file the service had open changed size since the checkpoint: most often a log it writes to, opened without O_APPEND (`>` rather than `>>`), that grew; start the service with `>>` and checkpoint it again"),
    ];
    let mut hints: Vec<String> = HINTS
        .iter()
        .filter(|(needle, _)| log.contains(needle))
        .map(|(_, hint)| (*hint).to_owned())
        .collect();
    // CRIU says "File exists" of any file it creates (its pidfile too): only a fork that found
    // the pid taken is about a pid.
    if log
        .lines()
        .any(|l| l.contains("Can't fork for") && l.ends_with("File exists"))
    {
        hints.push("hint: a pid of the image is in use (often a dumped process not yet reaped): wait for it to exit, then retry".to_owned());
    }
    if log.contains("Pre dump script failed") {
        hints.push(pre_dump_hint(log).to_owned());
    }
    hints
}

/// Why pre-dump failed, from what crac-action (or CRIU, about crac-action) wrote.
fn pre_dump_hint(log: &str) -> &'static str {
    let said = |what: &str| {
        log.lines()
            .any(|l| l.starts_with("crac-action: pre-dump:") && l.contains(what))
    };
    if log.contains("killed by signal") {
        "hint: crac-action was killed before it finished (CRIU's line above says by which signal): the service keeps running, and an agent it had told ends that checkpoint by itself when its lease runs out (CRAC_ACTION_TIMEOUT + 10 s at the most)"
    } else if said("checkpoint refused:") {
        "hint: a before_checkpoint hook failed or timed out (see the crac-action line above); the service was rolled back and keeps running"
    } else if said("did not reply within") {
        "hint: an agent did not answer within crac-action's time limit (CRAC_ACTION_TIMEOUT, --timeout): its hooks are slower than that, or the process is stopped; it rolls itself back when it is done"
    } else if said("no agent in the process tree") {
        "hint: CRAC_REQUIRE_AGENT=1 refuses a tree without an agent: start one in the service (crac_agent::start()), or unset CRAC_REQUIRE_AGENT"
    } else if said("runs a crac agent") {
        "hint: the service's agent socket was removed; the agent makes it again within two minutes: retry then"
    } else if said("symbolic link")
        || said("belongs to uid")
        || said("may be written by others")
        || said("is not a socket")
        || said("refusing to talk to it")
        || said("user namespace")
    {
        "hint: crac-action refused what it found where an agent's socket should be (see its line above); nothing was told, and the service keeps running"
    } else {
        "hint: the action script failed before the dump (see its lines above); the service keeps running"
    }
}

fn status_text(status: &std::process::ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("{status}"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The SHA-256 of each environment variable `pid` started with, by name (see
/// [`Metadata::env_sha256`]).
fn env_hashes(pid: u32) -> BTreeMap<String, String> {
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    environ
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (name, value) = kv.split_once('=')?;
            Some((name.to_owned(), value_sha256(value)))
        })
        .collect()
}

/// How [`Metadata::env_sha256`] records a value.
pub fn value_sha256(value: &str) -> String {
    crate::hashing::value_sha256(value)
}

/// Waits for this image's turn to be restored (an exclusive lock on a hidden file in its
/// folder, released when the returned guard is dropped).
fn restore_turn(dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, OpError> {
    let path = dir.join(".crac-restore.lock");
    let file = crac_fs::open_append(&path).map_err(|e| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot open {}: {e}", path.display()),
        )
    })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot lock {}: {e}", path.display()),
        )
    })
}

/// Why CRIU's log at `log_path` (`len` bytes) holds none of crac-action's lines, for a restore
/// whose root is `pid`: a full file system, when it is one.
fn log_incomplete(log_path: &Path, len: usize, pid: u32) -> String {
    let dir = log_path.parent().unwrap_or(Path::new("/"));
    // Root may use the blocks kept back for it: only none at all is full for root.
    let free = nix::sys::statvfs::statvfs(dir)
        .ok()
        .map(|fs| fs.blocks_free() * fs.fragment_size());
    let why = match free {
        Some(free) if free < 64 << 10 => format!(
            "the file system it is on is full ({}), so CRIU could not write it; free space there",
            if free == 0 {
                "no space left".to_owned()
            } else {
                format!("{free} bytes free")
            }
        ),
        _ => "it could not be written, or crac-action did not run at the restore".to_owned(),
    };
    format!(
        "CRIU's log {} ({len} bytes) holds none of crac-action's lines: {why}. The restore \
         succeeded, but whether the after_restore hooks ran, and how, is not known from here: \
         `crac status {pid}` asks its agent",
        log_path.display()
    )
}

/// Where crac keeps its per-pid locks: a folder of root's under `/run`, which only root may
/// write, so nobody else can take a pid's lock first.
const LOCK_DIR: &str = "/run/crac-locks";

/// A pid's lock, held while a checkpoint of it runs, or a detached restore gives it back: a
/// private file `LOCK_DIR/PID.lock` under `flock`, holding the holder's pid and what it does.
/// Removed when dropped (while still locked, so that one who opened it meanwhile finds the
/// name gone and takes a fresh one). A crac that is killed leaves its file, unlocked (the
/// kernel drops a dead process's locks), which the next crac to lock that pid takes over;
/// `/run` is emptied at boot.
struct PidLock {
    path: PathBuf,
    _file: nix::fcntl::Flock<fs::File>,
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Takes `pid`'s lock for `what` (`checkpoint`, `restore`), or says which crac holds it and
/// for what. Nothing (`None`) on a system without `/run`.
///
/// # Errors
///
/// [`FailureKind::Failed`] naming the crac that holds it; [`FailureKind::Unavailable`] when
/// the lock folder cannot be made or trusted.
fn lock_pid(pid: u32, what: &str) -> Result<Option<PidLock>, OpError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let dir = Path::new(LOCK_DIR);
    if !dir.parent().is_some_and(Path::is_dir) {
        return Ok(None);
    }
    let unavailable = |e: std::io::Error| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot lock pid {pid} for this {what}: {e}"),
        )
    };
    crac_fs::ensure_dir(dir).map_err(unavailable)?;
    let path = dir.join(format!("{pid}.lock"));
    // A few tries: each finds the file of a holder that has just finished gone.
    for _ in 0..100 {
        let file = crac_fs::open_append(&path).map_err(unavailable)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(held(pid, &path)),
            Err((_, e)) => return Err(unavailable(e.into())),
        };
        // Still the file at that name (not one its last holder removed as it finished)?
        let held = locked.metadata().map_err(unavailable)?;
        let named = match fs::symlink_metadata(&path) {
            Ok(named) => named,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(unavailable(e)),
        };
        if (held.dev(), held.ino()) != (named.dev(), named.ino()) {
            continue;
        }
        locked.set_len(0).map_err(unavailable)?;
        writeln!(locked, "{} {what}", std::process::id()).map_err(unavailable)?;
        return Ok(Some(PidLock {
            path,
            _file: locked,
        }));
    }
    Err(OpError::new(
        FailureKind::Unavailable,
        format!(
            "cannot lock pid {pid} for this {what}: {} keeps changing",
            path.display()
        ),
    ))
}

/// The error for `pid`'s lock at `path` held by another crac: which one, doing what.
fn held(pid: u32, path: &Path) -> OpError {
    let text = crac_fs::read_bounded(path, 64)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_default();
    let mut words = text.split_whitespace();
    let holder = words.next().and_then(|w| w.parse::<u32>().ok());
    // Written right after the lock is taken: a holder caught before it wrote is a checkpoint
    // as likely as not; say only what is known.
    let what = match words.next() {
        Some("restore") => "restore",
        Some("checkpoint") => "checkpoint",
        _ => "checkpoint or restore",
    };
    OpError::new(
        FailureKind::Failed,
        format!(
            "another crac {what} of pid {pid} is running{}; wait for it to finish{}",
            holder.map_or(String::new(), |h| format!(" (pid {h})")),
            if what == "checkpoint" {
                " (it stops the service unless it was given --leave-running)"
            } else {
                ""
            }
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last line of a failed pre-dump, as CRIU writes it.
    const FAILED: &str = "Error (criu/cr-dump.c:2011): Pre dump script failed with -1!";

    fn hint(lines: &[&str]) -> String {
        let log = lines.join("\n") + "\n" + FAILED;
        let hints = hints(&log);
        assert_eq!(hints.len(), 1, "{hints:?}");
        hints[0].clone()
    }

    #[test]
    fn only_a_pid_taken_is_blamed_on_a_pid_in_use() {
        let taken = "Error (criu/cr-restore.c:1237): Can't fork for 8996: File exists\nError (criu/cr-restore.c:2331): Restoring FAILED.";
        assert_eq!(
            hints(taken),
            ["hint: a pid of the image is in use (often a dumped process not yet reaped): wait for it to exit, then retry"]
        );
        // A pidfile someone made first: "File exists" too, and no pid is in use.
        let pidfile = "Error (criu/log.c:416): pidfile: Can't open /tmp/x.pid: File exists\nError (criu/cr-restore.c:1986): Can't write pidfile: File exists\nError (criu/cr-restore.c:2331): Restoring FAILED.";
        assert!(hints(pidfile).is_empty(), "{:?}", hints(pidfile));
    }

    #[test]
    fn a_failed_pre_dump_is_explained_by_its_cause() {
        for (lines, expected) in [
            (
                &["crac-action: pre-dump: pid 7: checkpoint refused: before_checkpoint of \"db\" failed: down"][..],
                "hint: a before_checkpoint hook failed or timed out",
            ),
            (
                &["crac-action: pre-dump: pid 7: the agent at /tmp/crac/7/agent.sock did not reply within 30s (CRAC_ACTION_TIMEOUT sets this limit)"],
                "hint: an agent did not answer within crac-action's time limit",
            ),
            (
                &["crac-action: pre-dump: no agent in the process tree of pid 7 (no socket at /tmp/crac/7/agent.sock); start one in the service with crac_agent::start(), or unset CRAC_REQUIRE_AGENT"],
                "hint: CRAC_REQUIRE_AGENT=1 refuses a tree without an agent",
            ),
            (
                &["crac-action: pre-dump: pid 7: /tmp/crac is a symbolic link (to \"/etc\")"],
                "hint: crac-action refused what it found",
            ),
            (
                &["Error (criu/util.c:660): killed by signal 9: Killed"],
                "hint: crac-action was killed before it finished",
            ),
            (&["something else"], "hint: the action script failed before the dump"),
        ] {
            let got = hint(lines);
            assert!(got.starts_with(expected), "{lines:?}: {got}");
        }
    }
}
