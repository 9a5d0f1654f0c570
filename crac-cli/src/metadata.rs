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
//! `files` lists every CRIU image file with its size when the dump finished, and its SHA-256;
//! `executable_sha256` is the SHA-256 of the dumped process's executable. [`validate`] checks
//! the sizes before a restore or an export, because CRIU's own errors for a truncated or
//! missing image file name an internal structure, not the file, and come after it has started
//! building the process tree. [`verify`] checks the contents: CRIU itself compares only the
//! size of the executable, so a same-size rebuilt binary, or a damaged page file, would be
//! restored without a word.
//!
//! # Integrity: where the hashing runs
//!
//! The hashes are computed by `crac checkpoint` after CRIU has exited, before the image gets its
//! name in the store: never while the service is frozen, and the executable is hashed through a
//! handle opened before the dump, so it is the file the service ran even if it was replaced
//! meanwhile. At SHA-NI speeds (about 1.5-2 GB/s on one core) that is some 40 ms per 64 MiB of
//! image, spread over both cores when there are several files (BENCHMARKS.md, item 2).
//!
//! # Interrupted checkpoints
//!
//! Before CRIU runs, `crac checkpoint` writes what it already knows into the image folder as
//! [`PENDING_FILE`]. CRIU writes `stats-dump` only once a dump has succeeded (after it stopped
//! or resumed the tree, `criu/cr-dump.c`, `cr_dump_finish`), so a folder that holds both is a
//! complete image whose crac was killed before it wrote the metadata: [`complete_pending`]
//! finishes it, and the store files it under its name ([`crate::store::Store::recover`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

/// The metadata file's name inside an image folder.
pub const METADATA_FILE: &str = "crac-meta.json";
/// The metadata layout version this crac writes and reads.
pub const FORMAT: u32 = 1;

/// The field of the metadata file that holds the SHA-256 of the rest of it; see [`seal`].
pub const DIGEST_FIELD: &str = "metadata_sha256";
/// The largest metadata file read: a real one is a few kilobytes (a long command line and a few
/// hundred mapped files).
const MAX_METADATA_BYTES: u64 = 16 << 20;
/// The largest cache file ([`VERIFIED_FILE`], [`KNOWN_HASHES_FILE`]) read.
const MAX_CACHE_BYTES: u64 = 16 << 20;

/// The CRIU image file that every dump writes; without it CRIU cannot restore anything.
const INVENTORY: &str = "inventory.img";
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
    /// The SHA-256 (lowercase hex) of the dumped process's executable, checked by [`verify`].
    /// Absent in images of older versions and in images recovered after crac was killed (the
    /// file the service ran can no longer be told from a replacement then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executable_sha256: Option<String>,
    /// The other files the dumped process had mapped (shared libraries, locale files), which a
    /// restore maps again from their paths, with their SHA-256, checked by [`verify`]. Absent
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
    /// Its SHA-256 (lowercase hex), checked by [`verify`]; absent in images of older versions.
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
    crate::driver::value_sha256(&canonical(value).to_string())
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
            sha256: None,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Fills in the SHA-256 of every file in `files`, read from `dir`. The files are shared out
/// between two threads (the page files hold nearly all the bytes; on a machine with two cores
/// or more, the rest are hashed beside the largest).
///
/// # Errors
///
/// The first file that cannot be read, named.
pub fn hash_files(dir: &Path, files: &mut [FileEntry]) -> io::Result<()> {
    // Largest first, alternating between the two halves, so both get a fair share of bytes.
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(files[i].size));
    let (mut left, mut right) = (Vec::new(), Vec::new());
    let (mut left_bytes, mut right_bytes) = (0u64, 0u64);
    for i in order {
        if left_bytes <= right_bytes {
            left_bytes += files[i].size;
            left.push(i);
        } else {
            right_bytes += files[i].size;
            right.push(i);
        }
    }
    let hash_all = |indices: &[usize], files: &[FileEntry]| -> io::Result<Vec<(usize, String)>> {
        indices
            .iter()
            .map(|&i| {
                let path = dir.join(&files[i].name);
                let digest = crac_fs::open_regular(&path)
                    .and_then(sha256_of)
                    .map_err(|e| with_path(e, "hash", &path))?;
                Ok((i, digest))
            })
            .collect()
    };
    let shared: &[FileEntry] = files;
    let (a, b) = std::thread::scope(|scope| {
        let other = scope.spawn(|| hash_all(&right, shared));
        let mine = hash_all(&left, shared);
        (
            mine,
            other.join().expect("the hashing thread does not panic"),
        )
    });
    for (i, digest) in a?.into_iter().chain(b?) {
        files[i].sha256 = Some(digest);
    }
    Ok(())
}

/// The SHA-256 (lowercase hex) of what `file` holds, read from where its offset is.
///
/// # Errors
///
/// A read error.
pub fn sha256_of(mut file: fs::File) -> io::Result<String> {
    crate::archive::digest(&mut file, &mut io::sink()).map(|(_, digest)| digest)
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

/// How much of an image's contents [`verify`] hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Every file, and the executable (`crac images verify`).
    Full,
    /// Only what changed since it was last found intact on this machine (a restore): a file
    /// whose device, inode, size, modification and change times are those [`VERIFIED_FILE`]
    /// noted when it matched the same hash is not read again. Any write to the file, a copy or
    /// a replacement changes one of them (and the change time cannot be set back); what this
    /// does not catch is damage below the file system, which [`Check::Full`] does.
    Changed,
}

/// Where [`verify`] (and `crac checkpoint`, right after hashing) notes what it found intact:
/// each file's identity on this machine with the hash it matched. Hidden, so not part of the
/// image nor of an export.
pub const VERIFIED_FILE: &str = ".crac-verified.json";

/// What identifies a file's contents on this machine without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &fs::Metadata) -> Identity {
        use std::os::unix::fs::MetadataExt;
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// Whether `path` is this very file (same device and inode), whatever its times.
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

/// A file found intact: its identity then, and the hash it matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Intact {
    identity: Identity,
    sha256: String,
}

/// The contents of [`VERIFIED_FILE`]: image files by name, files outside the image (the
/// executable, mapped files) by path.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Verified {
    files: BTreeMap<String, Intact>,
    outside: BTreeMap<String, Intact>,
}

fn intact(path: &Path, sha256: &str) -> Option<Intact> {
    fs::metadata(path).ok().map(|m| Intact {
        identity: Identity::of(&m),
        sha256: sha256.to_owned(),
    })
}

/// The files outside the image that `meta` recorded a hash of: path, hash, and whether it is
/// the executable.
fn outside_files(meta: &Metadata) -> Vec<(&str, &str, bool)> {
    meta.executable_sha256
        .iter()
        .map(|sha256| (meta.executable.as_str(), sha256.as_str(), true))
        .chain(
            meta.mapped_files
                .iter()
                .map(|m| (m.path.as_str(), m.sha256.as_str(), false)),
        )
        .collect()
}

/// Notes that the image in `dir` was found intact, as it is now: its files, and the files
/// outside it whose identity at their path is the one in `outside` (the file that was hashed),
/// so that [`Check::Changed`] need not read them again. Best effort: an image in a read-only
/// store is simply hashed again next time.
pub fn note_intact(dir: &Path, meta: &Metadata, outside: &BTreeMap<String, Identity>) {
    let mut verified = Verified::default();
    for file in &meta.files {
        if let Some(sha256) = &file.sha256 {
            if let Some(found) = intact(&dir.join(&file.name), sha256) {
                verified.files.insert(file.name.clone(), found);
            }
        }
    }
    for (path, sha256, _) in outside_files(meta) {
        if let Some(identity) = outside.get(path).filter(|i| i.is_at(Path::new(path))) {
            verified.outside.insert(
                path.to_owned(),
                Intact {
                    identity: identity.clone(),
                    sha256: sha256.to_owned(),
                },
            );
        }
    }
    if let Ok(json) = serde_json::to_vec(&verified) {
        let _ = crac_fs::write_atomic(&dir.join(VERIFIED_FILE), &json);
    }
}

/// Where the image store keeps [`KnownHashes`], in its root.
pub const KNOWN_HASHES_FILE: &str = ".crac-known-hashes.json";

/// The hashes of files outside images (executables, shared libraries) by path, each with the
/// identity its file had when it was hashed. `crac checkpoint` reuses a hash when the file it is
/// about to hash still has that identity (what that trusts: see [`Check::Changed`]), so a
/// library is read once, not at every checkpoint, which keeps the hashing of a small service's
/// image well under a millisecond.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KnownHashes {
    files: BTreeMap<String, Intact>,
}

impl KnownHashes {
    /// The most entries kept: far more than the libraries of the services one machine runs.
    const MAX: usize = 4096;

    /// Reads them from `path`; missing or unreadable, there are none.
    pub fn load(path: &Path) -> KnownHashes {
        // As for the image's own note: only one that nobody else could have written.
        crac_fs::read_trusted(path, MAX_CACHE_BYTES)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_default()
    }

    /// The SHA-256 of `file`, which is at `path`, and its identity: known already, or read now
    /// and remembered.
    ///
    /// # Errors
    ///
    /// A read error.
    pub fn hash(&mut self, path: &str, file: fs::File) -> io::Result<(String, Identity)> {
        let identity = Identity::of(&file.metadata()?);
        if let Some(known) = self.files.get(path).filter(|k| k.identity == identity) {
            return Ok((known.sha256.clone(), identity));
        }
        let sha256 = sha256_of(file)?;
        self.files.insert(
            path.to_owned(),
            Intact {
                identity: identity.clone(),
                sha256: sha256.clone(),
            },
        );
        Ok((sha256, identity))
    }

    /// Writes them to `path` (atomically), without the entries whose files are gone. Best
    /// effort: without them, the next checkpoint hashes those files again.
    pub fn save(&mut self, path: &Path) {
        self.files.retain(|file, _| Path::new(file).exists());
        while self.files.len() > Self::MAX {
            self.files.pop_first();
        }
        if let Ok(json) = serde_json::to_vec(self) {
            let _ = crac_fs::write_atomic(path, &json);
        }
    }
}

/// The SHA-256 of `file` and the identity of what was read.
///
/// # Errors
///
/// A read error.
pub fn hash_with_identity(file: fs::File) -> io::Result<(String, Identity)> {
    let identity = Identity::of(&file.metadata()?);
    Ok((sha256_of(file)?, identity))
}

/// Checks the image in `dir` as [`validate`] does, then its contents: each listed file against
/// its SHA-256, and the executable and the mapped files at their paths (as they are now: those
/// are the files a restore maps) against theirs; all of them, or with [`Check::Changed`] only
/// what changed since it was last found intact here. Hashes an older image lacks are not
/// checked. An image found intact is noted so ([`note_intact`]).
///
/// # Errors
///
/// A [`ValidateError`] listing every problem found, each naming its file.
pub fn verify(dir: &Path, meta: &Metadata, check: Check) -> Result<(), ValidateError> {
    if let Err(source) = crac_fs::check_dir(dir) {
        if crac_fs::is_untrusted(&source) {
            return Err(ValidateError {
                dir: dir.to_owned(),
                problems: vec![Problem::FolderUntrusted { source }],
            });
        }
    }
    validate(dir, meta)?;
    let noted: Verified = match check {
        Check::Full => Verified::default(),
        // Only a note crac itself left, in a folder nobody else may write to: a forged one
        // would vouch for replaced files. Anything else, and everything is hashed again.
        Check::Changed => crac_fs::read_trusted(&dir.join(VERIFIED_FILE), MAX_CACHE_BYTES)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_default(),
    };
    let unchanged = |noted: Option<&Intact>, path: &Path, sha256: &str| {
        noted.is_some_and(|noted| Some(noted) == intact(path, sha256).as_ref())
    };
    let recorded: Vec<&FileEntry> = meta
        .files
        .iter()
        .filter(|f| {
            f.sha256.as_deref().is_some_and(|sha256| {
                !unchanged(noted.files.get(&f.name), &dir.join(&f.name), sha256)
            })
        })
        .collect();
    let mut problems = Vec::new();
    let mut now: Vec<FileEntry> = recorded
        .iter()
        .map(|f| FileEntry {
            sha256: None,
            ..(*f).clone()
        })
        .collect();
    match hash_files(dir, &mut now) {
        Ok(()) => {
            for (recorded, found) in recorded.iter().zip(&now) {
                if recorded.sha256 != found.sha256 {
                    problems.push(Problem::Corrupted {
                        name: recorded.name.clone(),
                    });
                }
            }
        }
        Err(source) => problems.push(Problem::Unreadable {
            name: dir.display().to_string(),
            source,
        }),
    }
    let mut found_intact = BTreeMap::new();
    for (path, expected, is_executable) in outside_files(meta) {
        let noted = noted.outside.get(path);
        if unchanged(noted, Path::new(path), expected) {
            if let Some(noted) = noted {
                found_intact.insert(path.to_owned(), noted.identity.clone());
            }
            continue;
        }
        let path_buf = PathBuf::from(path);
        // Paths named by the metadata: only regular files are read (a FIFO would hang the
        // check, /dev/zero never end it).
        match crac_fs::open_regular(Path::new(path)).and_then(hash_with_identity) {
            Ok((found, identity)) if found == expected => {
                found_intact.insert(path.to_owned(), identity);
            }
            Ok(_) if is_executable => problems.push(Problem::ExecutableChanged { path: path_buf }),
            Ok(_) => problems.push(Problem::MappedFileChanged { path: path_buf }),
            Err(source) => problems.push(Problem::ExecutableUnreadable {
                path: path_buf,
                source,
            }),
        }
    }
    if problems.is_empty() {
        note_intact(dir, meta, &found_intact);
        Ok(())
    } else {
        Err(ValidateError {
            dir: dir.to_owned(),
            problems,
        })
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

/// Whether `name` can only mean a file directly inside a folder.
pub(crate) fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// One reason an image cannot be restored, found by [`validate`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Problem {
    /// The image folder, or a folder above it, is not the caller's own and private (another
    /// user's, writable by others, a link): its files could be swapped after any check, so
    /// nothing in it is checked or restored.
    FolderUntrusted {
        /// What is wrong, from [`crac_fs`].
        source: io::Error,
    },
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
    /// A listed file has its recorded size but not its recorded content (SHA-256).
    Corrupted {
        /// The file.
        name: String,
    },
    /// The executable the service ran is not the file at its path any more (SHA-256).
    ExecutableChanged {
        /// The executable's path.
        path: PathBuf,
    },
    /// A file the service had mapped (a shared library) is not the same file any more
    /// (SHA-256).
    MappedFileChanged {
        /// The file's path.
        path: PathBuf,
    },
    /// The executable, or a file the service had mapped, cannot be read at its path.
    ExecutableUnreadable {
        /// The executable's path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::FolderUntrusted { source } => write!(
                f,
                "{source}: another user could swap the image's files after any check, so it is \
                 neither verified nor restored"
            ),
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
            Problem::Corrupted { name } => write!(
                f,
                "image file {name} does not hold what was dumped (its SHA-256 differs)"
            ),
            Problem::ExecutableChanged { path } => write!(
                f,
                "the executable {} is not the one the service ran (its SHA-256 differs)",
                path.display()
            ),
            Problem::MappedFileChanged { path } => write!(
                f,
                "the file {} that the service had mapped is not the one it had (its SHA-256 differs)",
                path.display()
            ),
            Problem::ExecutableUnreadable { path, source } => write!(
                f,
                "cannot read {} ({})",
                path.display(),
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
        let executable = |p: &Problem| {
            matches!(
                p,
                Problem::ExecutableChanged { .. }
                    | Problem::MappedFileChanged { .. }
                    | Problem::ExecutableUnreadable { .. }
            )
        };
        if self
            .problems
            .iter()
            .any(|p| !matches!(p, Problem::ForeignArch { .. }) && !executable(p))
        {
            hints.push("the image is damaged: make it again with `crac checkpoint`");
        }
        if self.problems.iter().any(executable) {
            hints.push(
                "a restore maps the executable and the libraries from their paths: put back the files the service ran with, or checkpoint the service again",
            );
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
