//! The metadata file that `crac checkpoint` writes beside CRIU's images in each image folder.
//!
//! # Format
//!
//! `crac-meta.json` is one JSON object; [`Metadata`] lists its fields. `format` is the version
//! of the layout ([`FORMAT`]). Readers ignore fields they do not know, so a newer crac may add
//! fields without a new version; every field listed in [`Metadata`] is required. A change that
//! an older reader would misread gets a new `format`, and [`read`] refuses formats it does not
//! know instead of guessing.
//!
//! `files` lists every CRIU image file with its size when the dump finished. [`validate`]
//! checks it before a restore or an export, because CRIU's own errors for a truncated or
//! missing image file name an internal structure, not the file, and come after it has started
//! building the process tree.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The metadata file's name inside an image folder.
pub const METADATA_FILE: &str = "crac-meta.json";
/// The metadata layout version this crac writes and reads.
pub const FORMAT: u32 = 1;

/// The CRIU image file that every dump writes; without it CRIU cannot restore anything.
const INVENTORY: &str = "inventory.img";
/// Prefix of the temporary file [`write`] renames into place; never an image file.
const TEMP_PREFIX: &str = ".crac-meta.json.tmp-";

/// What `crac checkpoint` records about one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The layout version, [`FORMAT`] when written by this crac.
    pub format: u32,
    /// The image's name in the store.
    pub name: String,
    /// The PID of the root of the dumped process tree.
    pub pid: u32,
    /// The root's pid as it saw itself: 1 when it was the init of a pid namespace of its own
    /// (a container, `unshare --pid --fork`), which a restore makes anew. Absent in images of
    /// older versions.
    #[serde(default)]
    pub ns_pid: Option<u32>,
    /// The dumped process's command line (`/proc/PID/cmdline`).
    pub command_line: Vec<String>,
    /// The dumped process's executable (`/proc/PID/exe`).
    pub executable: String,
    /// When the dump finished, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The total size of the image files, in bytes.
    pub image_bytes: u64,
    /// What `criu --version` said.
    pub criu_version: String,
    /// The kernel release the image was made on (`uname -r`).
    pub kernel: String,
    /// The CPU architecture the image was made on ([`std::env::consts::ARCH`]).
    pub arch: String,
    /// How CRIU was asked to dump.
    pub options: DumpOptions,
    /// Each before-checkpoint hook that ran, in the order it ran.
    pub hooks: Vec<HookTiming>,
    /// How long the steps of the checkpoint took.
    pub timings: Timings,
    /// The version of crac that made the image.
    pub crac_version: String,
    /// Every CRIU image file, sorted by name (see [`list_image_files`]).
    pub files: Vec<FileEntry>,
}

impl Metadata {
    /// Whether the dumped tree had a pid namespace of its own: its pids need not be free here.
    pub fn in_own_pid_namespace(&self) -> bool {
        self.ns_pid.is_some_and(|ns_pid| ns_pid != self.pid)
    }
}

/// The CRIU options a dump was made with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DumpOptions {
    /// `--leave-running`: the process kept running after the dump.
    pub leave_running: bool,
    /// `--tcp-established`: open TCP connections were dumped.
    pub tcp_established: bool,
    /// `--file-locks`: file locks were dumped.
    pub file_locks: bool,
    /// The time limit given to the hooks, in seconds.
    pub timeout_secs: f64,
    /// Arguments passed through to CRIU unchanged.
    pub extra_criu_args: Vec<String>,
    /// How CRIU locked the dumped TCP connections (`--network-lock`), which the restore must
    /// unlock the same way; absent when it locked none, or for CRIU's default (iptables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_lock: Option<String>,
}

/// One hook call during a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookTiming {
    /// The process whose agent ran the hook.
    pub pid: u32,
    /// The resource the hook belongs to.
    pub resource: String,
    /// The phase, e.g. `before_checkpoint`.
    pub phase: String,
    /// How long the hook took, in microseconds.
    pub duration_us: u64,
}

/// How long a checkpoint took, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Running the before-checkpoint hooks.
    pub hooks_ms: f64,
    /// CRIU's dump, hooks included.
    pub dump_ms: f64,
    /// The whole `crac checkpoint`.
    pub total_ms: f64,
    /// CRIU's own figures (from its `stats-dump`), when it wrote them.
    #[serde(default)]
    pub criu: Option<crate::stats::DumpStats>,
}

/// One CRIU image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file's name, relative to the image folder.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Why [`read`] could not return an image's metadata.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The folder has no metadata file.
    #[error(
        "no crac-meta.json in {dir}: not an image made by `crac checkpoint` (or it was deleted)"
    )]
    Missing {
        /// The image folder.
        dir: PathBuf,
    },
    /// The metadata file exists but could not be read.
    #[error("cannot read {path} ({})", crate::store::why(.source))]
    Unreadable {
        /// The metadata file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The metadata file is not valid JSON or lacks a required field.
    #[error("crac-meta.json in {dir} is corrupt ({source}): remove the image with `crac images rm {name}`")]
    Corrupt {
        /// The image folder.
        dir: PathBuf,
        /// The folder's name, which is the image's name in the store.
        name: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The metadata file has a format this crac does not read.
    #[error("{}", unsupported_message(.dir, *.found, .made_by.as_deref()))]
    UnsupportedFormat {
        /// The image folder.
        dir: PathBuf,
        /// The format the file declares.
        found: u32,
        /// The crac version that wrote it, if the file says.
        made_by: Option<String>,
    },
}

fn unsupported_message(dir: &Path, found: u32, made_by: Option<&str>) -> String {
    let head = format!(
        "crac-meta.json in {} has format {found}, but this crac ({}) reads only format {FORMAT}",
        dir.display(),
        env!("CARGO_PKG_VERSION")
    );
    match (found > FORMAT, made_by) {
        (true, Some(version)) => format!("{head}: use crac {version} or newer"),
        (true, None) => format!("{head}: use a newer crac"),
        (false, _) => format!("{head}: make the image again with `crac checkpoint`"),
    }
}

/// Reads the metadata of the image in `dir`.
///
/// # Errors
///
/// [`MetadataError`]: a missing file, an unreadable one, corrupt JSON or a missing field, or a
/// `format` other than [`FORMAT`].
pub fn read(dir: &Path) -> Result<Metadata, MetadataError> {
    let path = dir.join(METADATA_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(MetadataError::Missing {
                dir: dir.to_owned(),
            })
        }
        Err(source) => return Err(MetadataError::Unreadable { path, source }),
    };
    let corrupt = |source| MetadataError::Corrupt {
        dir: dir.to_owned(),
        name: folder_name(dir),
        source,
    };
    // The version first: a newer format may have renamed fields, and "use a newer crac" helps
    // where "missing field" would only confuse.
    #[derive(Deserialize)]
    struct Probe {
        format: u32,
        #[serde(default)]
        crac_version: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if probe.format != FORMAT {
        return Err(MetadataError::UnsupportedFormat {
            dir: dir.to_owned(),
            found: probe.format,
            made_by: probe
                .crac_version
                .as_ref()
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        });
    }
    serde_json::from_slice(&bytes).map_err(corrupt)
}

fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Writes `meta` as the metadata of the image in `dir`, replacing any earlier one.
///
/// The file is written under a temporary name, flushed to disk and renamed into place, so a
/// crash leaves either the old metadata or the new, never a half-written file. It is readable
/// by its owner only: the command line may hold secrets.
///
/// # Errors
///
/// Any I/O error; the error names the file and keeps the [`io::ErrorKind`]. The temporary file
/// is removed.
pub fn write(dir: &Path, meta: &Metadata) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    json.push(b'\n');
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!("{TEMP_PREFIX}{}-{nanos}", std::process::id()));
    let target = dir.join(METADATA_FILE);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| with_path(e, "create", &tmp))?;
        file.write_all(&json)
            .map_err(|e| with_path(e, "write", &tmp))?;
        // Atomic, not durable: a reader sees the old file or the new one. Flushing is the
        // image store's business (Staging::set_durable), for the whole image at once.
        fs::rename(&tmp, &target).map_err(|e| with_path(e, "rename into place", &target))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// An I/O error that names the file it happened to; keeps the kind and the cause.
#[derive(Debug)]
struct PathError {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} {} ({})",
            self.action,
            self.path.display(),
            crate::store::why(&self.source)
        )
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn with_path(source: io::Error, action: &'static str, path: &Path) -> io::Error {
    io::Error::new(
        source.kind(),
        PathError {
            action,
            path: path.to_owned(),
            source,
        },
    )
}

/// Lists the CRIU image files in `dir`, sorted by name: every regular file except the metadata
/// file (and its temporary copy) and logs (`*.log`). Symbolic links and folders are skipped:
/// CRIU writes neither.
///
/// # Errors
///
/// Any I/O error, and a file name that is not UTF-8 (CRIU's never are).
pub fn list_image_files(dir: &Path) -> io::Result<Vec<FileEntry>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // `DirEntry::file_type` does not follow symbolic links.
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().into_string().map_err(|name| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "file name {name:?} in {} is not UTF-8; CRIU's image files are",
                    dir.display()
                ),
            )
        })?;
        // Hidden files are working files (crac-action's dump marker, our temporary files),
        // never part of CRIU's image.
        if name == METADATA_FILE || name.ends_with(".log") || name.starts_with('.') {
            continue;
        }
        files.push(FileEntry {
            size: entry.metadata()?.len(),
            name,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// This machine's kernel release (`uname -r`) and CPU architecture, as [`Metadata`] records
/// them. The kernel is `unknown` if `uname` fails, which it does not on Linux.
pub fn this_machine() -> (String, String) {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    (kernel, std::env::consts::ARCH.to_owned())
}

/// Whether `name` can only mean a file directly inside a folder.
pub(crate) fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// One reason an image cannot be restored, found by [`validate`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Problem {
    /// The image was made on another CPU architecture.
    ForeignArch {
        /// Where the image was made.
        image: String,
        /// This machine.
        here: String,
    },
    /// The file list has no `inventory.img`.
    NoInventory,
    /// A listed file name is not a plain file name (it has a `/`, or is `..`).
    BadName {
        /// The name as listed.
        name: String,
    },
    /// A listed file does not exist.
    Missing {
        /// The file.
        name: String,
    },
    /// A listed file is smaller than when the dump finished.
    Truncated {
        /// The file.
        name: String,
        /// Its size now.
        actual: u64,
        /// Its size at the dump.
        expected: u64,
    },
    /// A listed file is larger than when the dump finished.
    Grown {
        /// The file.
        name: String,
        /// Its size now.
        actual: u64,
        /// Its size at the dump.
        expected: u64,
    },
    /// A listed name is a folder, link or device rather than a regular file.
    NotAFile {
        /// The file.
        name: String,
    },
    /// A listed file could not be inspected.
    Unreadable {
        /// The file.
        name: String,
        /// The cause.
        source: io::Error,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::ForeignArch { image, here } => {
                write!(f, "image was made on {image}, this machine is {here}")
            }
            Problem::NoInventory => write!(f, "incomplete image: no {INVENTORY}"),
            Problem::BadName { name } => {
                write!(f, "image file name {name:?} is not a plain file name")
            }
            Problem::Missing { name } => write!(f, "image file {name} is missing"),
            Problem::Truncated {
                name,
                actual,
                expected,
            } => write!(
                f,
                "image file {name} is truncated: {actual} bytes, expected {expected}"
            ),
            Problem::Grown {
                name,
                actual,
                expected,
            } => write!(
                f,
                "image file {name} has grown: {actual} bytes, expected {expected}"
            ),
            Problem::NotAFile { name } => write!(f, "image file {name} is not a regular file"),
            Problem::Unreadable { name, source } => write!(
                f,
                "cannot inspect image file {name} ({})",
                crate::store::why(source)
            ),
        }
    }
}

/// Everything [`validate`] found wrong with an image, all at once.
#[derive(Debug)]
pub struct ValidateError {
    dir: PathBuf,
    problems: Vec<Problem>,
}

impl ValidateError {
    /// The image folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The problems, in the order [`validate`] checks: architecture, inventory, then each
    /// listed file by name. Never empty.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The problems and what to do about them, without the folder (for callers whose folder
    /// is a temporary one the operator never sees).
    pub(crate) fn summary(&self) -> String {
        let list: Vec<String> = self.problems.iter().map(Problem::to_string).collect();
        let mut hints = Vec::new();
        if self
            .problems
            .iter()
            .any(|p| !matches!(p, Problem::ForeignArch { .. }))
        {
            hints.push("the image is damaged: make it again with `crac checkpoint`");
        }
        if self
            .problems
            .iter()
            .any(|p| matches!(p, Problem::ForeignArch { .. }))
        {
            hints.push("restore it on a machine of that architecture");
        }
        format!("{} ({})", list.join("; "), hints.join("; "))
    }
}

impl fmt::Display for ValidateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "image {} cannot be restored: {}",
            self.dir.display(),
            self.summary()
        )
    }
}

impl std::error::Error for ValidateError {}

/// Checks that the image in `dir` can be restored on this machine: every file in
/// `meta.files` exists with its recorded size, the list includes `inventory.img`, and the
/// image was made on this CPU architecture.
///
/// Files that are not listed (CRIU's logs, `stats-restore` written by a restore) are not
/// checked. Sizes catch truncation and half-copied folders, not modified content; archives
/// carry checksums for that (see [`crate::archive`]).
///
/// # Errors
///
/// A [`ValidateError`] listing every problem found, not just the first.
pub fn validate(dir: &Path, meta: &Metadata) -> Result<(), ValidateError> {
    let mut problems = Vec::new();
    let here = std::env::consts::ARCH;
    if meta.arch != here {
        problems.push(Problem::ForeignArch {
            image: meta.arch.clone(),
            here: here.to_owned(),
        });
    }
    if !meta.files.iter().any(|f| f.name == INVENTORY) {
        problems.push(Problem::NoInventory);
    }
    for file in &meta.files {
        let name = file.name.clone();
        if !is_plain_name(&file.name) {
            problems.push(Problem::BadName { name });
            continue;
        }
        match fs::symlink_metadata(dir.join(&file.name)) {
            Ok(found) if !found.is_file() => problems.push(Problem::NotAFile { name }),
            Ok(found) if found.len() < file.size => problems.push(Problem::Truncated {
                name,
                actual: found.len(),
                expected: file.size,
            }),
            Ok(found) if found.len() > file.size => problems.push(Problem::Grown {
                name,
                actual: found.len(),
                expected: file.size,
            }),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                problems.push(Problem::Missing { name })
            }
            Err(source) => problems.push(Problem::Unreadable { name, source }),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ValidateError {
            dir: dir.to_owned(),
            problems,
        })
    }
}
