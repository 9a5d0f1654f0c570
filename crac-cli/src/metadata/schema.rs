//! The schema of `crac-meta.json`: the [`Metadata`] types, reading (format first, then the
//! seal), writing (sealed, atomically), the pending file of a dump in progress, and finishing
//! an interrupted checkpoint's image from it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::{hash_files, list_image_files, note_intact, validate};

/// The metadata file's name inside an image folder.
pub const METADATA_FILE: &str = "crac-meta.json";
/// The metadata layout version this crac writes and reads.
pub const FORMAT: u32 = 1;

/// The field of the metadata file that holds the SHA-256 of the rest of it; see [`seal`].
pub const DIGEST_FIELD: &str = "metadata_sha256";
/// The largest metadata file read: a real one is a few kilobytes (a long command line and a few
/// hundred mapped files).
const MAX_METADATA_BYTES: u64 = 16 << 20;

/// What `crac checkpoint` knew before CRIU ran (a [`Metadata`] without files, hashes or
/// timings), in the image folder until the metadata proper is written; see the module
/// documentation.
pub const PENDING_FILE: &str = ".crac-pending.json";
/// CRIU writes this only when a dump succeeded.
pub const DUMP_DONE_FILE: &str = "stats-dump";

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
    /// The SHA-256 (lowercase hex) of the dumped process's executable, checked by [`verify`](super::verify).
    /// Absent in images of older versions and in images recovered after crac was killed (the
    /// file the service ran can no longer be told from a replacement then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executable_sha256: Option<String>,
    /// The other files the dumped process had mapped (shared libraries, locale files), which a
    /// restore maps again from their paths, with their SHA-256, checked by [`verify`](super::verify). Absent
    /// in images of older versions and in recovered ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mapped_files: Vec<MappedFile>,
    /// The instruction-set features of the machine the image was made on
    /// ([`crate::cpu`]): a restore on a machine lacking one is refused. Absent in images of
    /// older versions (not checked then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
    /// The SHA-256 (lowercase hex) of each environment variable's value the dumped process
    /// started with, by name: `crac run` hands a restored service the variables whose value
    /// changed since (`RestoreInfo::env`), without the image's values being written down.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_sha256: BTreeMap<String, String>,
    /// The root's stdout and stderr that were pipes, by descriptor number, as CRIU names them
    /// (`pipe:[INODE]`): `crac run --log -` hands the restored tree its own in their place
    /// (CRIU's `--inherit-fd`), so the service writes where the new run's output goes (a
    /// container's log) instead of into a pipe nobody reads. Absent when there were none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stdio_pipes: BTreeMap<u32, String>,
    /// The capabilities the dumped processes held (the union of their permitted and
    /// inheritable sets, by name, e.g. `CAP_NET_BIND_SERVICE`), which CRIU gives back: a
    /// restore by a crac that lacks one is refused ([`crate::capabilities`]). Absent in images
    /// of older versions (not checked then), and when the tree held none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// The capabilities in the bounding set of every dumped process (the intersection, by
    /// name). CRIU drops the others from each restored process's bounding set, which needs
    /// CAP_SETPCAP: a restore by a crac without it is refused when this lacks one the kernel
    /// knows. Absent in images of older versions (not checked then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounding_set: Vec<String>,
    /// The regular files the dumped tree had open for writing, or mapped shared and writable,
    /// when the checkpoint started (see [`WrittenFile`](super::WrittenFile)): a restore
    /// refuses the image once one of them changed. Absent when there were none, in images of
    /// older versions and in recovered ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub written_files: Vec<super::WrittenFile>,
}

/// A file the dumped process had mapped, outside the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedFile {
    /// Its path, as the process saw it.
    pub path: String,
    /// Its SHA-256 (lowercase hex) when the process was dumped.
    pub sha256: String,
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
    /// `--lazy-restore`: restores of this image are lazy unless told `--eager`
    /// ([`crate::lazy`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lazy_restore: bool,
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
    /// Hashing the image files and the executable, after the dump (absent in older images).
    #[serde(default)]
    pub hash_ms: f64,
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
    /// Its SHA-256 (lowercase hex), checked by [`verify`](super::verify); absent in images of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
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
    #[error("cannot read {path} ({})", crate::error::why(.source))]
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
    /// The metadata does not match its own digest ([`DIGEST_FIELD`]), or has none: it was
    /// changed after `crac checkpoint` wrote it, by hand or by damage, so nothing it says
    /// (pids, options, the digests of the image's files) can be relied on.
    #[error(
        "crac-meta.json in {dir} {}: it was changed after the checkpoint (by hand or by damage), \
         so the image cannot be trusted; remove it with `crac images rm {name}` and make it again \
         with `crac checkpoint`",
        if *.missing { "has no digest of itself" } else { "does not match its digest" }
    )]
    Tampered {
        /// The image folder.
        dir: PathBuf,
        /// The folder's name, which is the image's name in the store.
        name: String,
        /// Whether the digest is missing (rather than different).
        missing: bool,
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
    // Only a regular file, and only so much: an image from elsewhere may hold a FIFO or a
    // link to /dev/zero here.
    let bytes = match crac_fs::read_bounded(&path, MAX_METADATA_BYTES) {
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
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(corrupt)?;
    let recorded = value
        .as_object_mut()
        .and_then(|fields| fields.remove(DIGEST_FIELD));
    let tampered = |missing| MetadataError::Tampered {
        dir: dir.to_owned(),
        name: folder_name(dir),
        missing,
    };
    match recorded {
        None => return Err(tampered(true)),
        Some(recorded) if recorded.as_str() != Some(digest_of(&value).as_str()) => {
            return Err(tampered(false))
        }
        Some(_) => {}
    }
    // From the bytes again (a few kilobytes): serde's errors then say where in the file.
    serde_json::from_slice(&bytes).map_err(corrupt)
}

/// The SHA-256 (lowercase hex) of the metadata `value` without its digest field: of its
/// compact JSON, keys in sorted order, so that neither the layout of the file nor the order of
/// its fields matters, and fields a newer crac added are covered too.
fn digest_of(value: &serde_json::Value) -> String {
    crate::hashing::value_sha256(&canonical(value).to_string())
}

/// `value` with every object's keys sorted (serde_json keeps them in insertion order when a
/// crate in the build asks for `preserve_order`).
fn canonical(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(fields) => {
            let sorted: BTreeMap<&String, Value> =
                fields.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Adds to the metadata `value` (a JSON object) its digest, [`DIGEST_FIELD`], replacing any it
/// had: what [`write()`] does, for a tool that edits an image's metadata on purpose (a test
/// making an image "from another machine"). [`read`] refuses metadata whose digest does not
/// match, so an edit without it reads as damage.
///
/// # Panics
///
/// When `value` is not a JSON object.
pub fn seal(value: &mut serde_json::Value) {
    let fields = value.as_object_mut().expect("metadata is a JSON object");
    fields.remove(DIGEST_FIELD);
    let digest = digest_of(value);
    value
        .as_object_mut()
        .expect("metadata is a JSON object")
        .insert(DIGEST_FIELD.to_owned(), serde_json::Value::String(digest));
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
    write_as(dir, METADATA_FILE, meta)
}

/// Writes what is known before CRIU runs as [`PENDING_FILE`] (see the module documentation).
///
/// # Errors
///
/// As [`write()`].
pub fn write_pending(dir: &Path, meta: &Metadata) -> io::Result<()> {
    write_as(dir, PENDING_FILE, meta)
}

fn write_as(dir: &Path, file_name: &str, meta: &Metadata) -> io::Result<()> {
    let mut value = serde_json::to_value(meta).map_err(io::Error::other)?;
    seal(&mut value);
    let mut json = serde_json::to_vec_pretty(&value).map_err(io::Error::other)?;
    json.push(b'\n');
    let target = dir.join(file_name);
    // Atomic, not durable: a reader sees the old file or the new one. Flushing is the image
    // store's business (Staging::set_durable), for the whole image at once.
    crac_fs::write_atomic(&target, &json).map_err(|e| with_path(e, "write", &target))
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
            crate::error::why(&self.source)
        )
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

pub(super) fn with_path(source: io::Error, action: &'static str, path: &Path) -> io::Error {
    io::Error::new(
        source.kind(),
        PathError {
            action,
            path: path.to_owned(),
            source,
        },
    )
}

/// Finishes the image in `dir` whose `crac checkpoint` was killed (or failed to file it) after
/// CRIU's dump succeeded: turns its [`PENDING_FILE`] into the metadata proper, named `name`,
/// with the files, their hashes and CRIU's figures; a folder whose metadata was written
/// already is returned as it is, once it passes [`validate`]. Returns `None` when the folder
/// is not a complete image (see [`is_complete_dump`]).
///
/// Metadata made from the pending file has no `executable_sha256` nor `mapped_files` (the files
/// the service ran can no longer be told from replacements), and its hooks and crac timings are
/// unknown (empty, zero); `created_unix_ms` is when CRIU finished.
///
/// # Errors
///
/// An I/O error reading the folder, hashing or writing the metadata.
pub fn complete_pending(dir: &Path, name: &str) -> io::Result<Option<Metadata>> {
    let Some(done) = dump_done(dir)? else {
        return Ok(None);
    };
    let bytes = match crac_fs::read_bounded(&dir.join(PENDING_FILE), MAX_METADATA_BYTES) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Ok(read(dir).ok().filter(|meta| validate(dir, meta).is_ok()))
        }
        Err(err) => return Err(err),
    };
    let Ok(mut meta) = serde_json::from_slice::<Metadata>(&bytes) else {
        return Ok(None);
    };
    let mut files = list_image_files(dir)?;
    hash_files(dir, &mut files)?;
    meta.name = name.to_owned();
    meta.image_bytes = files.iter().map(|f| f.size).sum();
    meta.files = files;
    meta.executable_sha256 = None;
    meta.mapped_files.clear();
    meta.written_files.clear();
    meta.created_unix_ms = done
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    meta.timings.criu = crate::stats::dump(dir);
    write(dir, &meta)?;
    let _ = fs::remove_file(dir.join(PENDING_FILE));
    note_intact(dir, &meta, &BTreeMap::new());
    Ok(Some(meta))
}

/// Whether `dir` holds a dump CRIU finished, made by `crac checkpoint`: its pending file, or
/// metadata that the files match ([`validate`]; an interrupted import also has metadata and a
/// `stats-dump`, but misses files). Such a folder is the only copy of a service CRIU stopped,
/// and is never removed as a leftover.
pub fn is_complete_dump(dir: &Path) -> bool {
    matches!(dump_done(dir), Ok(Some(_)))
        && (dir.join(PENDING_FILE).is_file()
            || read(dir).is_ok_and(|meta| validate(dir, &meta).is_ok()))
}

/// CRIU's `stats-dump`, if the dump finished.
fn dump_done(dir: &Path) -> io::Result<Option<fs::Metadata>> {
    match fs::metadata(dir.join(DUMP_DONE_FILE)) {
        Ok(done) => Ok(Some(done)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// This machine's kernel release (`uname -r`) and CPU architecture, as [`Metadata`] records
/// them. The kernel is `unknown` if `uname` fails, which it does not on Linux.
pub fn this_machine() -> (String, String) {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    (kernel, std::env::consts::ARCH.to_owned())
}
