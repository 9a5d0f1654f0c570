//! Moving one image between machines: [`export`] packs it into a single file, [`import`] checks
//! such a file and adds its image to a store.
//!
//! # Format
//!
//! An archive is a tar stream compressed with zstd (one frame, with zstd's content checksum).
//! Its first entry is the manifest [`MANIFEST_FILE`] (`crac-archive.json`); the image's files
//! follow as `image/<file>`, regular files only, in the manifest's order:
//!
//! ```json
//! {
//!   "format": 1,
//!   "name": "web",
//!   "crac_version": "0.1.0",
//!   "files": [
//!     { "name": "crac-meta.json", "size": 1234, "sha256": "9f86d0…" },
//!     { "name": "core-1.img", "size": 4096, "sha256": "…" }
//!   ]
//! }
//! ```
//!
//! `format` is [`ARCHIVE_FORMAT`]; a reader refuses others. Readers ignore fields they do not
//! know. `name` is the image's name in the store it came from; `files` lists the metadata file
//! and every image file of [`Metadata::files`](crate::metadata::Metadata::files), with sizes
//! in bytes and SHA-256 digests in lowercase hex. Logs are not exported.
//!
//! The manifest comes first so that an import knows every expected size and digest before it
//! writes a byte, and can refuse an archive with anything else in it.
//!
//! # Failure
//!
//! Neither side leaves half a result: an export writes a temporary file beside the target and
//! renames it into place when complete; an import writes into a [`Staging`] folder that is
//! removed on any error, and commits it only once every file matched its digest and the image
//! passed [`metadata::validate`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::metadata::{self, Metadata, MetadataError, ValidateError, METADATA_FILE};
use crate::store::{self, why, Staging, Store, StoreError};

/// The manifest's name: the archive's first entry.
pub const MANIFEST_FILE: &str = "crac-archive.json";
/// The archive layout version this crac writes and reads.
pub const ARCHIVE_FORMAT: u32 = 1;

/// The folder, inside the archive, that holds the image's files.
const IMAGE_PREFIX: &str = "image/";
/// zstd's default level: fast, and CRIU's page images compress well at it.
const ZSTD_LEVEL: i32 = 3;
/// The largest manifest accepted; a real one is a few kilobytes.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// How much may follow the tar stream's end (its zero blocks and padding) before the archive
/// counts as damaged.
const MAX_TRAILER_BYTES: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    name: String,
    #[serde(default)]
    crac_version: String,
    files: Vec<ManifestFile>,
}

#[derive(Serialize, Deserialize)]
struct ManifestFile {
    name: String,
    size: u64,
    sha256: String,
}

/// What [`export`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    /// How many files of the image the archive holds, the metadata file included.
    pub files: usize,
    /// Their total size, in bytes.
    pub bytes_in: u64,
    /// The archive's size, in bytes.
    pub bytes_out: u64,
}

/// What is wrong with the contents of an archive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Damage {
    /// The zstd or tar stream could not be read: corrupt or cut short.
    #[error("the compressed data is corrupt or truncated ({})", why(.source))]
    Stream {
        /// The cause, from zstd or tar.
        #[source]
        source: io::Error,
    },
    /// The archive ends in the middle of a file.
    #[error("it ends in the middle of {file} (the archive is truncated)")]
    Truncated {
        /// The file.
        file: String,
    },
    /// A file's SHA-256 digest is not the manifest's.
    #[error("{file} does not match its checksum (the file was modified or corrupted in transit)")]
    Checksum {
        /// The file.
        file: String,
    },
    /// A file's size is not the manifest's.
    #[error("{file} has {actual} bytes, crac-archive.json says {expected}")]
    Size {
        /// The file.
        file: String,
        /// Its size in the archive.
        actual: u64,
        /// The manifest's size.
        expected: u64,
    },
    /// A file in the manifest is not in the archive.
    #[error("{file} is missing")]
    Missing {
        /// The file.
        file: String,
    },
    /// The manifest is not valid JSON, lacks a field, or lists files wrongly.
    #[error("crac-archive.json is unreadable ({reason})")]
    Manifest {
        /// What is wrong.
        reason: String,
        /// The JSON error, if that is what is wrong.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// The image's metadata file, though it matched its digest, cannot be used.
    #[error("its crac-meta.json is unusable ({reason})")]
    Metadata {
        /// What is wrong.
        reason: String,
        /// The cause.
        #[source]
        source: MetadataError,
    },
    /// Data follows the end of the tar stream.
    #[error("unexpected data after the last file")]
    Trailer,
}

/// Why an export or an import failed. Nothing was written in either case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// Finding, staging or committing an image in the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image to export has unusable metadata.
    #[error("{source}; nothing was exported")]
    Metadata {
        /// The cause.
        #[from]
        source: MetadataError,
    },
    /// The image to export failed [`metadata::validate`].
    #[error("{source}; nothing was exported")]
    Invalid {
        /// The cause.
        #[from]
        source: ValidateError,
    },
    /// A file of the image to export could not be read.
    #[error("cannot read image file {path} ({}); nothing was exported", why(.source))]
    ReadImage {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file of the image changed between checksumming and packing.
    #[error(
        "image file {path} changed while it was being exported: make sure nothing writes to \
         the image and try again; nothing was exported"
    )]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// The archive could not be written.
    #[error(
        "cannot write archive {path} ({}): choose a folder you can write to with enough space; \
         nothing was exported",
        why(.source)
    )]
    Write {
        /// The archive as named by the caller.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive could not be opened or read.
    #[error("cannot read archive {path} ({}); nothing was imported", why(.source))]
    Read {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is a readable tar stream but not one `crac images export` made.
    #[error("{path} is not a crac image archive: {reason}; nothing was imported")]
    NotAnArchive {
        /// The archive.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The archive has a format this crac does not read.
    #[error(
        "archive {path} has format {found}, but this crac ({}) reads only format {}: import it \
         with a newer crac; nothing was imported",
        env!("CARGO_PKG_VERSION"),
        ARCHIVE_FORMAT
    )]
    UnsupportedFormat {
        /// The archive.
        path: PathBuf,
        /// The format it declares.
        found: u32,
    },
    /// The archive's contents do not match its manifest, or its streams are corrupt.
    #[error("archive {path} is damaged: {damage}; nothing was imported")]
    Damaged {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        #[source]
        damage: Damage,
    },
    /// The archive holds an entry an image archive never has: a link, a folder, a device,
    /// a path outside `image/`, a file not in the manifest, or a file twice.
    #[error("archive {path} contains {entry:?}, which {reason}; nothing was imported")]
    Refused {
        /// The archive.
        path: PathBuf,
        /// The entry's path as stored.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// The archive is intact but its image cannot be restored on this machine.
    #[error(
        "archive {path} holds an image that cannot be restored here: {}; nothing was imported",
        .source.summary()
    )]
    Unusable {
        /// The archive.
        path: PathBuf,
        /// The problems.
        #[source]
        source: ValidateError,
    },
    /// The import's name is taken.
    #[error(
        "an image named {name} already exists: import under another name with --name, or \
         remove the old one with `crac images rm {name}`; nothing was imported"
    )]
    Exists {
        /// The name.
        name: String,
    },
    /// Writing the imported image into the store failed.
    #[error("cannot write {path} into the image store ({}); nothing was imported", why(.source))]
    StoreWrite {
        /// The file being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Packs the image `name` (an image name or, with a `/`, a folder; see [`Store::resolve`]) of
/// `store` into the archive `file`, replacing any file there. The archive is readable by its
/// owner only: it holds process memory.
///
/// The image is checked first ([`metadata::validate`]), each file is checksummed, then packed;
/// a file that changes in between fails the export rather than produce an archive that would
/// not import.
///
/// # Errors
///
/// [`ArchiveError`]; on any error no archive and no temporary file is left.
pub fn export(store: &Store, name: &str, file: &Path) -> Result<ExportSummary, ArchiveError> {
    let dir = store.resolve(name)?;
    let meta = metadata::read(&dir)?;
    metadata::validate(&dir, &meta)?;

    let mut names = vec![METADATA_FILE.to_owned()];
    names.extend(meta.files.iter().map(|f| f.name.clone()));
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let (size, sha256) = File::open(&path)
            .and_then(|f| digest(f, &mut io::sink()))
            .map_err(|source| ArchiveError::ReadImage {
                path: path.clone(),
                source,
            })?;
        files.push(ManifestFile { name, size, sha256 });
    }
    let manifest = Manifest {
        format: ARCHIVE_FORMAT,
        name: archive_name(&dir, &meta),
        crac_version: env!("CARGO_PKG_VERSION").to_owned(),
        files,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).map_err(|e| ArchiveError::Write {
        path: file.to_owned(),
        source: io::Error::other(e),
    })?;
    json.push(b'\n');

    let write_error = |source| ArchiveError::Write {
        path: file.to_owned(),
        source,
    };
    let mut out = TempOut::create(file).map_err(write_error)?;
    let handle = out.file.try_clone().map_err(write_error)?;
    let mut encoder = zstd::Encoder::new(handle, ZSTD_LEVEL).map_err(write_error)?;
    encoder.include_checksum(true).map_err(write_error)?;
    let mut builder = tar::Builder::new(encoder);
    let mtime = meta.created_unix_ms / 1000;

    let mut header = entry_header(json.len() as u64, mtime);
    builder
        .append_data(&mut header, MANIFEST_FILE, json.as_slice())
        .map_err(write_error)?;
    let mut bytes_in = 0;
    for entry in &manifest.files {
        let path = dir.join(&entry.name);
        let source = File::open(&path).map_err(|source| ArchiveError::ReadImage {
            path: path.clone(),
            source,
        })?;
        let mut reader = CheckedReader::new(source.take(entry.size));
        let mut header = entry_header(entry.size, mtime);
        let appended = builder.append_data(
            &mut header,
            format!("{IMAGE_PREFIX}{}", entry.name),
            &mut reader,
        );
        if let Some(source) = reader.read_error.take() {
            return Err(ArchiveError::ReadImage { path, source });
        }
        appended.map_err(write_error)?;
        // `take` stops at the recorded size; a shorter read or another digest means the
        // file changed since it was checksummed, and the entry just written is wrong.
        if reader.count != entry.size || hex(reader.hasher.finalize()) != entry.sha256 {
            return Err(ArchiveError::Changed { path });
        }
        bytes_in += entry.size;
    }
    let encoder = builder.into_inner().map_err(write_error)?;
    encoder.finish().map_err(write_error)?;
    let bytes_out = out.persist().map_err(write_error)?;
    Ok(ExportSummary {
        files: manifest.files.len(),
        bytes_in,
        bytes_out,
    })
}

/// The name the manifest carries: the store name of the image's folder, or the metadata's
/// name for a folder outside the store whose name is not an image name.
fn archive_name(dir: &Path, meta: &Metadata) -> String {
    dir.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| store::validate_name(n).is_ok())
        .map_or_else(|| meta.name.clone(), str::to_owned)
}

fn entry_header(size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(mtime);
    header
}

/// Reads, counts and hashes; remembers a read error so it is not mistaken for a write error
/// of the archive.
struct CheckedReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    read_error: Option<io::Error>,
}

impl<R: Read> CheckedReader<R> {
    fn new(inner: R) -> Self {
        CheckedReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            read_error: None,
        }
    }
}

impl<R: Read> Read for CheckedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.count += n as u64;
                Ok(n)
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Err(err),
            Err(err) => {
                let copy = io::Error::new(err.kind(), err.to_string());
                self.read_error = Some(err);
                Err(copy)
            }
        }
    }
}

/// The archive being written, under a temporary name beside its final one; removed unless
/// persisted.
struct TempOut {
    file: File,
    temp: PathBuf,
    target: PathBuf,
    persisted: bool,
}

impl TempOut {
    fn create(target: &Path) -> io::Result<TempOut> {
        let file_name = target.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file")
        })?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(file_name);
        temp_name.push(format!(".tmp-{}-{nanos}", std::process::id()));
        let temp = parent.join(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        Ok(TempOut {
            file,
            temp,
            target: target.to_owned(),
            persisted: false,
        })
    }

    /// Flushes the file, renames it into place and returns its size.
    fn persist(&mut self) -> io::Result<u64> {
        self.file.sync_all()?;
        let size = self.file.metadata()?.len();
        fs::rename(&self.temp, &self.target)?;
        self.persisted = true;
        if let Some(parent) = self.temp.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(size)
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.persisted {
            // Nowhere to report a failure from here; the name is hidden and unique.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Copies `from` to `to` and returns the size and SHA-256 (lowercase hex) of what was copied.
pub(crate) fn digest(mut from: impl Read, to: &mut impl Write) -> io::Result<(u64, String)> {
    copy_hashed(&mut from, to).map_err(|(CopyError::Read(err) | CopyError::Write(err))| err)
}

fn hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds the image in the archive `file` to `store`, under `name` or else the name in the
/// archive, and returns that name. An existing image is never replaced.
///
/// Every entry is checked against the manifest before the image becomes visible: only regular
/// files under `image/` that the manifest lists, each once, with its size and SHA-256; then the
/// image must pass [`metadata::validate`] (so an image made on another CPU architecture is
/// refused). If the archive was renamed on the way, the image's metadata is updated to its new
/// name.
///
/// # Errors
///
/// [`ArchiveError`]; on any error nothing is left in the store.
pub fn import(store: &Store, file: &Path, name: Option<&str>) -> Result<String, ArchiveError> {
    if let Some(name) = name {
        check_free(store, name)?;
    }
    let path = file.to_owned();
    let damaged = |damage| ArchiveError::Damaged {
        path: path.clone(),
        damage,
    };
    let stream = |source| damaged(Damage::Stream { source });
    let refused = |entry: &str, reason: &str| ArchiveError::Refused {
        path: path.clone(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let not_archive = |reason: &str| ArchiveError::NotAnArchive {
        path: path.clone(),
        reason: reason.to_owned(),
    };

    let input = File::open(file).map_err(|source| ArchiveError::Read {
        path: path.clone(),
        source,
    })?;
    let decoder = zstd::Decoder::new(input).map_err(stream)?;
    let mut archive = tar::Archive::new(decoder);
    let mut entries = archive.entries().map_err(stream)?;

    // The manifest.
    let mut first = entries
        .next()
        .ok_or_else(|| not_archive("it is empty"))?
        .map_err(stream)?;
    if first.header().entry_type() != tar::EntryType::Regular
        || first.path_bytes().as_ref() != MANIFEST_FILE.as_bytes()
    {
        return Err(not_archive("it does not start with crac-archive.json"));
    }
    if first.size() > MAX_MANIFEST_BYTES {
        return Err(not_archive("its crac-archive.json is implausibly large"));
    }
    let mut json = Vec::new();
    first.read_to_end(&mut json).map_err(stream)?;
    let manifest = parse_manifest(&path, &json)?;
    let target = name.unwrap_or(&manifest.name).to_owned();
    if name.is_none() {
        check_free(store, &target)?;
    }

    let staging = store.begin(&target)?;
    let mut seen = vec![false; manifest.files.len()];
    for entry in entries {
        let mut entry = entry.map_err(stream)?;
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let entry_type = entry.header().entry_type();
        if entry_type != tar::EntryType::Regular {
            return Err(refused(
                &shown,
                &format!("is not a regular file (tar type {entry_type:?})"),
            ));
        }
        let index = shown
            .strip_prefix(IMAGE_PREFIX)
            .filter(|n| metadata::is_plain_name(n))
            .ok_or_else(|| refused(&shown, "is not a file directly under image/"))?
            .to_owned();
        let index = manifest
            .files
            .iter()
            .position(|f| f.name == index)
            .ok_or_else(|| refused(&shown, "is not listed in crac-archive.json"))?;
        if seen[index] {
            return Err(refused(&shown, "appears twice"));
        }
        let expected = &manifest.files[index];
        if entry.size() != expected.size {
            return Err(damaged(Damage::Size {
                file: expected.name.clone(),
                actual: entry.size(),
                expected: expected.size,
            }));
        }
        let out_path = staging.path().join(&expected.name);
        let store_write = |source| ArchiveError::StoreWrite {
            path: out_path.clone(),
            source,
        };
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&out_path)
            .map_err(store_write)?;
        let (count, sha256) = copy_hashed(&mut entry, &mut out).map_err(|e| match e {
            CopyError::Read(source) => stream(source),
            CopyError::Write(source) => store_write(source),
        })?;
        if count != expected.size {
            return Err(damaged(Damage::Truncated {
                file: expected.name.clone(),
            }));
        }
        if sha256 != expected.sha256 {
            return Err(damaged(Damage::Checksum {
                file: expected.name.clone(),
            }));
        }
        seen[index] = true;
    }
    if let Some(missing) = seen.iter().position(|seen| !seen) {
        return Err(damaged(Damage::Missing {
            file: manifest.files[missing].name.clone(),
        }));
    }
    // Read to the end of the zstd frame: that is where zstd checks the whole stream's
    // checksum, and where a cut after the last file shows.
    let mut rest = archive.into_inner().take(MAX_TRAILER_BYTES + 1);
    let trailer = io::copy(&mut rest, &mut io::sink()).map_err(stream)?;
    if trailer > MAX_TRAILER_BYTES {
        return Err(damaged(Damage::Trailer));
    }

    let dir = staging.path().to_owned();
    let mut meta = metadata::read(&dir).map_err(|source| {
        damaged(Damage::Metadata {
            reason: metadata_reason(&source),
            source,
        })
    })?;
    metadata::validate(&dir, &meta).map_err(|source| ArchiveError::Unusable {
        path: path.clone(),
        source,
    })?;
    if meta.name != target {
        meta.name.clone_from(&target);
        metadata::write(&dir, &meta).map_err(|source| ArchiveError::StoreWrite {
            path: dir.join(METADATA_FILE),
            source,
        })?;
    }
    commit(staging, &target)?;
    Ok(target)
}

fn check_free(store: &Store, name: &str) -> Result<(), ArchiveError> {
    match store.check_absent(name) {
        Err(StoreError::Exists { name }) => Err(ArchiveError::Exists { name }),
        other => Ok(other?),
    }
}

fn commit(mut staging: Staging, name: &str) -> Result<(), ArchiveError> {
    match staging.commit(false) {
        Ok(_) => Ok(()),
        Err(StoreError::Exists { .. }) => Err(ArchiveError::Exists {
            name: name.to_owned(),
        }),
        Err(err) => Err(err.into()),
    }
}

fn parse_manifest(path: &Path, json: &[u8]) -> Result<Manifest, ArchiveError> {
    let bad = |reason: String, source: Option<serde_json::Error>| ArchiveError::Damaged {
        path: path.to_owned(),
        damage: Damage::Manifest { reason, source },
    };
    // The version first, as for crac-meta.json: a newer layout may not parse as this one.
    #[derive(Deserialize)]
    struct Probe {
        format: u32,
    }
    let probe: Probe = serde_json::from_slice(json).map_err(|e| bad(e.to_string(), Some(e)))?;
    if probe.format != ARCHIVE_FORMAT {
        return Err(ArchiveError::UnsupportedFormat {
            path: path.to_owned(),
            found: probe.format,
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(json).map_err(|e| bad(e.to_string(), Some(e)))?;
    for (i, file) in manifest.files.iter().enumerate() {
        if !metadata::is_plain_name(&file.name) {
            return Err(bad(
                format!("file name {:?} is not a plain file name", file.name),
                None,
            ));
        }
        if manifest.files[..i].iter().any(|f| f.name == file.name) {
            return Err(bad(format!("{} is listed twice", file.name), None));
        }
    }
    if !manifest.files.iter().any(|f| f.name == METADATA_FILE) {
        return Err(bad(format!("{METADATA_FILE} is not listed"), None));
    }
    Ok(manifest)
}

/// A metadata error's gist, without the temporary folder it names.
fn metadata_reason(err: &MetadataError) -> String {
    match err {
        MetadataError::Missing { .. } => "it is missing".to_owned(),
        MetadataError::Unreadable { source, .. } => why(source),
        MetadataError::Corrupt { source, .. } => source.to_string(),
        MetadataError::Tampered { missing: true, .. } => "it has no digest of itself".to_owned(),
        MetadataError::Tampered { .. } => "it does not match its digest".to_owned(),
        MetadataError::UnsupportedFormat { found, .. } => format!(
            "format {found}, this crac reads format {}",
            metadata::FORMAT
        ),
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `from` to `to` and returns the size and SHA-256 (lowercase hex) of what was copied,
/// telling read errors (the archive's, on import) from write errors (the store's).
fn copy_hashed(from: &mut impl Read, to: &mut impl Write) -> Result<(u64, String), CopyError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    let mut count = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(CopyError::Read(err)),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        count += n as u64;
    }
    Ok((count, hex(hasher.finalize())))
}
