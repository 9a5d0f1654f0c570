//! A checkpoint, as a pipeline of named steps: [`checkpoint`] reads what it needs of the
//! service, prepares the destination (a staging folder of the store, or the caller's folder),
//! writes the pending metadata, has CRIU dump, hashes the image and the files outside it,
//! writes the metadata, and files the image.
//!
//! Until CRIU's dump succeeds, a failure leaves nothing behind and the service runs on. From
//! then on, the image is a `DumpedImage`: unless `--leave-running`, it is all that is left of
//! the service, and its only exits are being filed or being kept where it is with the command
//! that restores it ([`FailureKind::ImageKept`]).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::criu::{self, require_root, CriuCommand};
use crate::diagnosis::{criu_lines, dump_failure_state, hints, status_text};
use crate::error::{FailureKind, OpError};
use crate::locate::Criu;
use crate::lock::lock_pid;
use crate::metadata::{
    self, DumpOptions, HookTiming, Identity, KnownHashes, MappedFile, Metadata, Stat, Timings,
    WrittenFile,
};
use crate::process::{
    env_hashes, open_files, read_cmdline, session_of, stdio_pipes, stdio_warnings,
};
use crate::progress::{Phase, Progress};
use crate::store::{Staging, Store};
use crate::units::ms;
use crac_action::tree::ProcessId;
use crac_protocol::records::PreDumpReport;

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
    checkpoint_with(request, warn, progress, None).map(|(outcome, _)| outcome)
}

/// [`checkpoint`] for a post-copy migration: CRIU writes the image without the tree's memory,
/// which it then serves on `pages` (a connected socket) until the destination has every page.
/// The outcome comes once the image is filed, with the tree still frozen; the [`PageSource`]
/// must be waited for.
///
/// # Errors
///
/// As [`checkpoint`].
pub fn checkpoint_serving_pages(
    request: &CheckpointRequest,
    warn: &mut dyn FnMut(&str),
    pages: OwnedFd,
) -> Result<(CheckpointOutcome, PageSource), OpError> {
    let (outcome, source) = checkpoint_with(request, warn, None, Some(pages))?;
    Ok((
        outcome,
        source.expect("a dump that serves pages has a page source"),
    ))
}

/// A `criu dump` serving a frozen tree's memory to the destination of a post-copy migration.
#[derive(Debug)]
pub struct PageSource {
    child: std::process::Child,
    images: PathBuf,
    tree: Vec<u32>,
    pid: u32,
}

impl PageSource {
    /// The dump's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the dump ends: every page reached the destination, and CRIU killed the
    /// tree here.
    ///
    /// # Errors
    ///
    /// When the transfer failed: CRIU then resumes the tree here (the message says whether it
    /// runs), with CRIU's lines in the details.
    pub fn wait(self) -> Result<(), OpError> {
        let PageSource {
            child,
            images,
            tree,
            pid,
        } = self;
        let output = child.wait_with_output().map_err(|e| {
            OpError::new(
                FailureKind::Failed,
                format!("cannot wait for CRIU's dump: {e}"),
            )
        })?;
        if output.status.success() {
            remove_dead_agent_folders(&images, &tree);
            return Ok(());
        }
        let log = fs::read_to_string(images.join("dump.log")).unwrap_or_default();
        let mut details = criu_lines(&log, &output.stderr);
        details.extend(hints(&log));
        let alive = crac_action::tree::state_of(pid).is_some_and(|s| s != 'Z');
        Err(OpError::new(
            FailureKind::Failed,
            format!(
                "criu dump of pid {pid} failed while it served the memory ({}); {}",
                status_text(&output.status),
                if alive {
                    "CRIU resumed the service here"
                } else {
                    "the service is gone"
                }
            ),
        )
        .with_details(details))
    }
}

fn checkpoint_with(
    request: &CheckpointRequest,
    warn: &mut dyn FnMut(&str),
    progress: Option<Progress<'_>>,
    pages: Option<OwnedFd>,
) -> Result<(CheckpointOutcome, Option<PageSource>), OpError> {
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
    let service = Service::observe(pid);
    let criu = criu::find()?;
    let action = criu::action_script()?;
    let folder = ImageFolder::prepare(request)?;
    let mut metadata = pending_metadata(request, &service, &criu);
    let folder = write_pending(folder, &metadata)?;
    let how = match pages {
        Some(pages) => How::ServingPages(pages),
        None => How::Watched(progress),
    };
    let dumped = dump(request, &criu.path, &action, folder, &process, warn, how)?;
    // CRIU's dump succeeded: unless --leave-running, the service is stopped and this image is
    // all that is left of it. From here on nothing discards it (DumpedImage).
    let image = dumped.image;
    let page_source = dumped.serving.map(|child| PageSource {
        child,
        images: image.path().to_owned(),
        tree: service.tree.clone(),
        pid,
    });
    if !request.options.leave_running && page_source.is_none() {
        remove_dead_agent_folders(image.path(), &service.tree);
    }
    metadata.hooks = hook_timings(dumped.hook_report.as_ref());
    metadata.created_unix_ms = now_ms();
    metadata.timings = Timings {
        hooks_ms: dumped.hook_report.as_ref().map_or(0.0, |r| r.wall_ms),
        dump_ms: dumped.dump_ms,
        hash_ms: 0.0,
        total_ms: 0.0,
        criu: crate::stats::dump(image.path()),
    };
    if let Some(progress) = progress {
        progress(Phase::Hash, 0);
    }
    let known_path = known_hashes_path(&request.destination);
    let leave_running = request.options.leave_running;
    let (identities, mut known) = match hash(
        image.path(),
        &mut metadata,
        service,
        known_path.as_deref(),
        leave_running,
    ) {
        Ok(hashed) => hashed,
        Err(e) => {
            let what = format!(
                "could not read the image files in {}: {e}",
                image.path().display()
            );
            return Err(image.keep(&what, false));
        }
    };
    metadata.timings.total_ms = ms(started.elapsed());
    if let Some(progress) = progress {
        progress(Phase::Commit, 0);
    }
    if let Err(e) = write_metadata(image.path(), &metadata, &identities) {
        let what = format!(
            "could not write the metadata into {}: {e}",
            image.path().display()
        );
        return Err(image.keep(&what, false));
    }
    let path = image.file()?;
    // After the image is filed: a write the image does not wait for.
    if let Some(known_path) = &known_path {
        known.save(known_path);
    }
    // The page source follows its image: CRIU holds the folder open, whatever its name.
    let page_source = page_source.map(|source| PageSource {
        images: path.clone(),
        ..source
    });
    Ok((
        CheckpointOutcome {
            path,
            metadata,
            left_running: request.options.leave_running,
        },
        page_source,
    ))
}

/// Writes what is known before CRIU runs into `folder`: if this crac is killed while CRIU
/// dumps, the next one finishes the image from it (metadata::complete_pending).
fn write_pending(folder: ImageFolder, metadata: &Metadata) -> Result<ImageFolder, OpError> {
    match metadata::write_pending(folder.path(), metadata) {
        Ok(()) => Ok(folder),
        Err(e) => {
            let err = OpError::new(
                FailureKind::Unavailable,
                format!("cannot write into {}: {e}", folder.path().display()),
            );
            Err(folder.discard(err))
        }
    }
}

/// Where the store keeps the hashes of files outside images: libraries and the executable are
/// usually the same as at the last checkpoint, and their hashes are reused while the files
/// have the same identity (metadata::KnownHashes). None for a `--dir` image.
fn known_hashes_path(destination: &Destination) -> Option<PathBuf> {
    match destination {
        Destination::Store { store, .. } => Some(store.root().join(metadata::KNOWN_HASHES_FILE)),
        Destination::Dir(_) => None,
    }
}

/// Writes the image's metadata proper in place of the pending file, and notes the image and
/// the files outside it (`identities`) as found intact here.
fn write_metadata(
    images: &Path,
    metadata: &Metadata,
    identities: &BTreeMap<String, Identity>,
) -> io::Result<()> {
    metadata::write(images, metadata)?;
    let _ = fs::remove_file(images.join(metadata::PENDING_FILE));
    metadata::note_intact(images, metadata, identities);
    Ok(())
}

/// What a checkpoint reads of the service before the dump. The executable, the mapped files
/// and the files open for writing are opened now and hashed after the dump: they stay the
/// files the service ran even if their paths are replaced meanwhile, and hashing them costs
/// nothing while the service is frozen.
struct Service {
    pid: u32,
    command_line: Vec<String>,
    ns_pid: Option<u32>,
    executable: String,
    executable_file: Option<fs::File>,
    /// The dumped tree: the root and its descendants.
    tree: Vec<u32>,
    mapped_files: Vec<(String, fs::File)>,
    /// Open for writing, or mapped shared and writable, with their stat now
    /// ([`WrittenFile`]).
    written_files: Vec<(String, fs::File, Stat)>,
}

impl Service {
    fn observe(pid: u32) -> Service {
        let command_line = read_cmdline(pid);
        let ns_pid = crac_action::procfs::ns_pid(pid);
        let executable = fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let executable_file = fs::File::open(format!("/proc/{pid}/exe")).ok();
        let tree = crac_action::tree::descendants(pid);
        let files = open_files(&tree, &executable);
        Service {
            pid,
            command_line,
            ns_pid,
            executable,
            executable_file,
            tree,
            mapped_files: files.mapped,
            written_files: files.written,
        }
    }
}

/// The metadata known before CRIU runs (written as the pending file): no hooks, timings,
/// files or hashes yet.
fn pending_metadata(request: &CheckpointRequest, service: &Service, criu: &Criu) -> Metadata {
    let (kernel, arch) = metadata::this_machine();
    let name = match &request.destination {
        Destination::Store { name, .. } => name.clone(),
        Destination::Dir(dir) => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let pid = service.pid;
    Metadata {
        format: metadata::FORMAT,
        name,
        pid,
        ns_pid: service.ns_pid,
        command_line: service.command_line.clone(),
        executable: service.executable.clone(),
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
        capabilities: crate::capabilities::held_by(&service.tree),
        bounding_set: crate::capabilities::bounded_by(&service.tree),
        written_files: Vec::new(),
    }
}

/// The folder a dump goes into, before CRIU has dumped: a staging folder of the store, or the
/// caller's `--dir`.
struct ImageFolder {
    path: PathBuf,
    staging: Option<Staging>,
}

impl ImageFolder {
    /// Makes the folder for `request`'s destination: refuses a store name that is taken
    /// (unless replacing), or a `--dir` that is not new or empty and the caller's own.
    fn prepare(request: &CheckpointRequest) -> Result<ImageFolder, OpError> {
        match &request.destination {
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
                let mut staging = store
                    .begin(name)
                    .map_err(|e| OpError::new(FailureKind::Unavailable, e.to_string()))?;
                staging.set_durable(request.durable);
                Ok(ImageFolder {
                    path: staging.path().to_owned(),
                    staging: Some(staging),
                })
            }
            Destination::Dir(dir) => {
                prepare_dir(dir)?;
                Ok(ImageFolder {
                    path: dir.clone(),
                    staging: None,
                })
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves no half image after a failure before CRIU's dump succeeded, and returns `err`:
    /// the staging folder is removed (dropping the [`Staging`]); a caller's folder is emptied of
    /// what CRIU wrote (its log is kept for diagnosis).
    fn discard(self, err: OpError) -> OpError {
        if self.staging.is_none() {
            clean_dir_except_log(&self.path);
        }
        err
    }
}

/// An image CRIU has dumped. Unless the service was left running, it is all that is left of
/// the service, so crac never discards it: its only exits are [`DumpedImage::file`] (filed in
/// the store, or complete in the caller's folder) and [`DumpedImage::keep`] (kept where it is,
/// with the command that restores it: [`FailureKind::ImageKept`]), and both consume it.
///
/// Dropped without either (a panic, or a code path that forgot both: a debug build asserts),
/// it is kept where it is without a word: a staging folder stays for the store to file
/// ([`Store::recover`](crate::store::Store::recover)), a `--dir` folder as it is.
#[must_use = "a dumped image must be filed or kept"]
struct DumpedImage<'a> {
    path: PathBuf,
    staging: Option<Staging>,
    request: &'a CheckpointRequest,
    criu: &'a Path,
    action: &'a Path,
    /// Filed or kept.
    settled: bool,
}

impl DumpedImage<'_> {
    fn path(&self) -> &Path {
        &self.path
    }

    /// Files the image: gives a staging folder its name in the store (a `--dir` image is
    /// where it belongs already), and returns where the image is.
    ///
    /// # Errors
    ///
    /// When the store cannot file it: it is kept then ([`DumpedImage::keep`]).
    fn file(mut self) -> Result<PathBuf, OpError> {
        let (Some(mut staging), Destination::Store { replace, .. }) =
            (self.staging.take(), &self.request.destination)
        else {
            self.settled = true;
            return Ok(self.path.clone());
        };
        match staging.commit(*replace) {
            Ok(path) => {
                self.settled = true;
                Ok(path)
            }
            Err(e) => {
                self.staging = Some(staging);
                Err(self.keep(&format!("could not file it in the store: {e}"), true))
            }
        }
    }

    /// Keeps the image where it is, and returns the error that says so: `what` crac could not
    /// do, where the image is, and the exact command that restores it (`crac restore` once
    /// its metadata is written, CRIU's own before).
    fn keep(mut self, what: &str, metadata_written: bool) -> OpError {
        let path = self
            .staging
            .take()
            .map_or_else(|| self.path.clone(), Staging::keep);
        self.settled = true;
        image_kept(
            self.request,
            self.criu,
            self.action,
            &path,
            what,
            metadata_written,
        )
    }
}

impl Drop for DumpedImage<'_> {
    fn drop(&mut self) {
        if let Some(staging) = self.staging.take() {
            let _ = staging.keep();
        }
        debug_assert!(
            self.settled || std::thread::panicking(),
            "a dumped image was dropped without being filed or kept"
        );
    }
}

/// What CRIU's dump left: the image, what crac-action reported of the hooks, and how long the
/// dump took.
struct Dumped<'a> {
    image: DumpedImage<'a>,
    hook_report: Option<PreDumpReport>,
    dump_ms: f64,
    /// A post-copy's dump, still serving the memory.
    serving: Option<std::process::Child>,
}

/// Has CRIU dump `process` into `folder`. On failure, the folder is discarded and the error
/// says what became of the service, with CRIU's and crac-action's lines and hints.
fn dump<'a>(
    request: &'a CheckpointRequest,
    criu: &'a Path,
    action: &'a Path,
    folder: ImageFolder,
    process: &ProcessId,
    warn: &mut dyn FnMut(&str),
    how: How<'_>,
) -> Result<Dumped<'a>, OpError> {
    let pid = request.pid;
    let images = folder.path().to_owned();
    // In the image folder, a hidden working file: if crac is killed before it reads it, it
    // goes with the folder (or stays hidden in a recovered image), never stray in /tmp.
    let report_path = images.join(".crac-hooks.json");
    let cmd = CriuCommand::dump(criu, pid, &images, action, &report_path, &request.options);
    let dump_started = Instant::now();
    let run = match how {
        How::Watched(progress) => {
            run_watched(&mut cmd.command(), &images, &report_path, progress).map(Run::Done)
        }
        How::ServingPages(pages) => run_serving(cmd, pages),
    };
    let (output, serving) = match run {
        Ok(Run::Done(output)) => (output, None),
        Ok(Run::Serving(child)) => (success_so_far(), Some(child)),
        Err(e) => {
            let err = OpError::new(
                FailureKind::Unavailable,
                format!("cannot run {}: {e}", criu.display()),
            );
            return Err(folder.discard(err));
        }
    };
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
    if !output.status.success() {
        let log = fs::read_to_string(images.join("dump.log")).unwrap_or_default();
        let mut details = criu_lines(&log, &output.stderr);
        details.extend(hints(&log));
        let state = dump_failure_state(pid, process.is_alive(), &log);
        let err = OpError::new(
            FailureKind::Failed,
            format!(
                "criu dump of pid {pid} failed ({}); {state}",
                status_text(&output.status)
            ),
        )
        .with_details(details);
        return Err(folder.discard(err));
    }
    let ImageFolder { path, staging } = folder;
    Ok(Dumped {
        image: DumpedImage {
            path,
            staging,
            request,
            criu,
            action,
            settled: false,
        },
        hook_report,
        dump_ms,
        serving,
    })
}

/// How a dump runs: to its end, progress told; or on into serving the memory on a socket.
enum How<'p> {
    Watched(Option<Progress<'p>>),
    ServingPages(OwnedFd),
}

/// How a dump ran: to its end, or on into serving the memory.
enum Run {
    Done(Output),
    Serving(std::process::Child),
}

/// The output of a dump that has not ended and has not failed.
fn success_so_far() -> Output {
    use std::os::unix::process::ExitStatusExt;
    Output {
        status: std::process::ExitStatus::from_raw(0),
        stdout: Vec::new(),
        stderr: Vec::new(),
    }
}

/// Starts `cmd` (a dump) serving the memory on `pages`, and waits until its image is written
/// (its status byte): [`Run::Serving`] then, [`Run::Done`] if it ended first (a failure).
fn run_serving(cmd: CriuCommand, pages: OwnedFd) -> io::Result<Run> {
    let (status_read, status_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut cmd = cmd.serve_pages(pages, status_write).command();
    let child = cmd.spawn()?;
    // The status pipe's write end lives in CRIU alone now: its end of file says CRIU ended.
    drop(cmd);
    let mut byte = [0u8; 1];
    let mut status = fs::File::from(status_read);
    let ready = io::Read::read(&mut status, &mut byte)?;
    if ready == 1 {
        Ok(Run::Serving(child))
    } else {
        child.wait_with_output().map(Run::Done)
    }
}

/// Runs `cmd` (CRIU's dump into `images`) to its end; meanwhile, tells `progress`, about ten
/// times a second, whether the hooks run or CRIU dumps, and the bytes written so far.
fn run_watched(
    cmd: &mut Command,
    images: &Path,
    report_path: &Path,
    progress: Option<Progress<'_>>,
) -> io::Result<Output> {
    std::thread::scope(|scope| {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        if let Some(progress) = progress {
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
    })
}

/// After a dump that stopped the service: its agents died by CRIU's SIGKILL and could not
/// remove their socket folders; a restore makes them again (crac-action's pre-restore), so
/// none stays behind meanwhile.
fn remove_dead_agent_folders(images: &Path, tree: &[u32]) {
    // CRIU has sent SIGKILL; the processes may take a moment to be gone.
    let dead = |pid| crac_action::tree::state_of(pid).is_none_or(|state| state == 'Z');
    let deadline = Instant::now() + Duration::from_secs(1);
    for &member in tree {
        while !dead(member) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Where each agent's folder was (post-dump's list): not necessarily where this process's
    // own base would put it (another uid's, a folder of its own).
    crac_action::post_dump::remove_dead_folders(images, |member| {
        tree.contains(&member) && dead(member)
    });
}

/// Each hook that ran, from crac-action's report, in the order it ran.
fn hook_timings(report: Option<&PreDumpReport>) -> Vec<HookTiming> {
    report
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
        .collect()
}

/// The hashes of the files outside the image: the executable's and the mapped files', each
/// with the identity of the file that was hashed, the known hashes with any new ones, and the
/// files the service wrote to.
struct OutsideHashes {
    executable: Option<(String, Identity)>,
    mapped: Vec<(String, String, Identity)>,
    known: KnownHashes,
    written: Vec<WrittenFile>,
}

impl OutsideHashes {
    /// Records the hashes in `metadata`; returns the identities of the files that were hashed
    /// (noted as intact where their paths still lead to them, so that a restore on this
    /// machine need not hash them again) and the known hashes.
    fn record(self, metadata: &mut Metadata) -> (BTreeMap<String, Identity>, KnownHashes) {
        let mut identities = BTreeMap::new();
        if let Some((sha256, identity)) = self.executable {
            identities.insert(metadata.executable.clone(), identity);
            metadata.executable_sha256 = Some(sha256);
        }
        for (path, sha256, identity) in self.mapped {
            identities.insert(path.clone(), identity);
            metadata.mapped_files.push(MappedFile { path, sha256 });
        }
        metadata.written_files = self.written;
        (identities, self.known)
    }
}

/// Hashes the image files in `images`, and on a thread of their own meanwhile, the service's
/// executable and mapped files, through the handles opened before the dump (with the known
/// hashes at `known_path`), and records them all in `metadata`. Returns the identities of the
/// files outside the image that were hashed, and the known hashes with any new ones.
///
/// # Errors
///
/// When an image file cannot be read.
fn hash(
    images: &Path,
    metadata: &mut Metadata,
    service: Service,
    known_path: Option<&Path>,
    leave_running: bool,
) -> io::Result<(BTreeMap<String, Identity>, KnownHashes)> {
    let started = Instant::now();
    let mut known = known_path.map(KnownHashes::load).unwrap_or_default();
    let Service {
        executable_file,
        mapped_files,
        written_files,
        ..
    } = service;
    let executable = metadata.executable.as_str();
    let (files, outside) = std::thread::scope(|scope| {
        let outside = scope.spawn(move || {
            let executable = executable_file.and_then(|f| known.hash(executable, f).ok());
            let mapped = mapped_files
                .into_iter()
                .filter_map(|(path, file)| {
                    let (sha256, identity) = known.hash(&path, file).ok()?;
                    Some((path, sha256, identity))
                })
                .collect();
            let written = written_files
                .into_iter()
                .filter_map(|(path, file, before)| {
                    WrittenFile::record(path, &file, before, leave_running).ok()
                })
                .collect();
            OutsideHashes {
                executable,
                mapped,
                known,
                written,
            }
        });
        let files = metadata::list_image_files(images).and_then(|mut files| {
            metadata::hash_files(images, &mut files)?;
            Ok(files)
        });
        (
            files,
            outside.join().expect("the hashing thread does not panic"),
        )
    });
    let files = files?;
    let hashed = outside.record(metadata);
    metadata.timings.hash_ms = ms(started.elapsed());
    metadata.image_bytes = files.iter().map(|f| f.size).sum();
    metadata.files = files;
    Ok(hashed)
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

/// The error for an image CRIU made that crac could not finish or file: where it is, and the
/// exact command that restores it.
fn image_kept(
    request: &CheckpointRequest,
    criu: &Path,
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
        CriuCommand::restore_by_hand(criu, path, action, &request.options).to_string()
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
