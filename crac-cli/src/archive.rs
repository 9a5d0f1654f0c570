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
//! # Limits
//!
//! An archive comes from someone else, and a few kilobytes of zstd can declare gigabytes of
//! zeros. Before it writes a byte, an import refuses an archive whose files add up to more
//! than [`ImportOptions::max_ratio`] times the archive's own size (default
//! [`DEFAULT_MAX_RATIO`]; real images compress 2 to 10 times), or to more than the store's
//! free space less a margin ([`free_margin`]). While writing, no file can grow past the size
//! the manifest declares for it: each entry's size must be the manifest's, and only that many
//! bytes are read from it.
//!
//! # Encryption
//!
//! [`export_with`] can encrypt the archive to one or more age recipients (X25519 public keys,
//! `age1…`): the file is then an [age](https://age-encryption.org/v1) file whose payload is
//! the zstd stream above, and only a holder of a matching identity (secret key) can import it.
//! age's payload is authenticated chunk by chunk (ChaCha20-Poly1305), so a modified or cut
//! archive fails to decrypt, and nothing of it is filed. An import recognises an age file by
//! its header and needs [`ImportOptions::identities`] for it. Identities are only ever read
//! from a file of the caller's that no other user can read ([`Identities::read`]), never taken
//! from the command line. [`keygen`] makes one.
//!
//! # Failure
//!
//! Neither side leaves half a result: an export writes a temporary file beside the target and
//! renames it into place when complete; an import writes into a [`Staging`] folder that is
//! removed on any error, and commits it only once every file matched its digest and the image
//! passed [`metadata::validate`].

use std::fs::{self, File};
use std::io::{self, BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use age::secrecy::ExposeSecret;

use serde::{Deserialize, Serialize};

use crate::error::why;
use crate::hashing::{copy_hashed, digest, CheckedReader, CopyError};
use crate::metadata::{self, Metadata, MetadataError, ValidateError, METADATA_FILE};
use crate::store::{self, Staging, Store, StoreError};

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
/// How many times its own size an archive's image may be, unless the importer says otherwise
/// ([`ImportOptions::max_ratio`]). CRIU's images compress 2 to 10 times at zstd's level 3;
/// an image of nothing but zero pages can reach a few thousand, a decompression bomb millions.
pub const DEFAULT_MAX_RATIO: u64 = 1000;
/// The smallest room an import leaves free on the store's file system (see [`free_margin`]).
const MIN_FREE_MARGIN: u64 = 64 << 20;
/// How an age file starts (the binary format; [`AGE_ARMOR`] is its text form).
const AGE_MAGIC: &[u8] = b"age-encryption.org/";
/// How a version 1 age file starts, the version this crac reads.
const AGE_V1: &[u8] = b"age-encryption.org/v1\n";
/// How an ASCII-armored age file starts.
const AGE_ARMOR: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";
/// The largest identity or recipients file accepted; a key is a line of 74 characters.
const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

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
    /// The encrypted payload fails age's authentication: modified, cut short, or not made by
    /// age.
    #[error(
        "its encrypted data fails authentication (it was modified or truncated after it was \
         encrypted)"
    )]
    Authentication,
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
    /// The archive is encrypted and no identity was given.
    #[error(
        "archive {path} is encrypted (age); pass --identity FILE, a file with a secret key it \
         was encrypted to; nothing was imported"
    )]
    Encrypted {
        /// The archive.
        path: PathBuf,
    },
    /// An identity was given for an archive that is not encrypted: the importer expected an
    /// encrypted one, and this may be a substitute.
    #[error(
        "archive {path} is not encrypted, but --identity was given: it is not the encrypted \
         archive you expected (check where it came from; import it without --identity only if \
         you trust it); nothing was imported"
    )]
    NotEncrypted {
        /// The archive.
        path: PathBuf,
    },
    /// The archive could not be decrypted with the identities given.
    #[error("cannot decrypt archive {path}: {reason}; nothing was imported")]
    Decrypt {
        /// The archive.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// A recipient given on the command line is not an age X25519 public key.
    #[error(
        "invalid recipient {text:?} ({reason}): a recipient is an age X25519 public key, \
         `age1` and 58 more characters, as `crac images keygen` or `age-keygen` print it; \
         nothing was exported"
    )]
    Recipient {
        /// The text as given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A secret key was given where a recipient belongs (on the command line, so exposed).
    #[error(
        "a secret key (AGE-SECRET-KEY-1…) was given as a recipient: give its recipient, the \
         public key `age1…` that `crac images keygen` printed, and count the secret key as \
         exposed (other users can see command lines); nothing was exported"
    )]
    SecretKeyAsRecipient,
    /// An image kept encrypted was to be exported encrypted to other recipients.
    #[error(
        "image {name} is kept encrypted (to the recipients it was checkpointed for) and is \
         exported as it is: leave out --encrypt-to and --recipients-file, and import it with \
         the identity of one of those recipients; nothing was exported"
    )]
    AlreadySealed {
        /// The image.
        name: String,
    },
    /// A key file (identities or recipients) cannot be used.
    #[error("cannot use key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// The archive's image is implausibly large for its size: a decompression bomb, or an
    /// image of mostly zero pages.
    #[error(
        "archive {path} ({}) declares an image of {}, {ratio} times its own size, more than \
         the {max} times an image archive is let expand (real images compress 2 to 10 times): \
         it may be a decompression bomb; if you trust its sender and the image is mostly zero \
         pages, import it with --max-ratio {}; nothing was imported",
        crate::units::bytes(*.archive_bytes),
        crate::units::bytes(*.declared),
        .ratio.saturating_add(1)
    )]
    TooExpanded {
        /// The archive.
        path: PathBuf,
        /// The total size its manifest declares.
        declared: u64,
        /// The archive's size.
        archive_bytes: u64,
        /// `declared / archive_bytes`, rounded down.
        ratio: u64,
        /// The limit.
        max: u64,
    },
    /// The store's file system has no room for the archive's image.
    #[error(
        "archive {path} declares an image of {}, but only {} are free in {} ({} needed, \
         leaving {} free for everything else): free some space (`crac images prune`) or \
         import into a store on a file system with room (--store DIR); nothing was imported",
        crate::units::bytes(*.declared),
        crate::units::bytes(*.free),
        .store.display(),
        crate::units::bytes(.declared.saturating_add(*.margin)),
        crate::units::bytes(*.margin)
    )]
    NoRoom {
        /// The archive.
        path: PathBuf,
        /// The total size its manifest declares.
        declared: u64,
        /// The bytes free for this user on the store's file system.
        free: u64,
        /// The room left free beside the image ([`free_margin`]).
        margin: u64,
        /// The store's root.
        store: PathBuf,
    },
    /// [`keygen`] was asked to write where a file exists.
    #[error(
        "{path} exists: crac never overwrites a key file; choose another --output, or remove \
         the old key first if nothing is encrypted to it any more; no key was made"
    )]
    KeyExists {
        /// The file.
        path: PathBuf,
    },
    /// [`keygen`] could not write its identity file.
    #[error("cannot write identity file {path} ({}); no key was made", why(.source))]
    Keygen {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
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
    export_with(store, name, file, None)
}

/// As [`export`], and with `encrypt_to`, the archive is an age file that only a holder of one
/// of these recipients' identities can import (see the module documentation).
///
/// # Errors
///
/// As [`export`].
pub fn export_with(
    store: &Store,
    name: &str,
    file: &Path,
    encrypt_to: Option<&Recipients>,
) -> Result<ExportSummary, ArchiveError> {
    let dir = store.resolve(name)?;
    if is_sealed(&dir) {
        return export_sealed(&dir, name, file, encrypt_to);
    }
    export_dir(&dir, file, encrypt_to)
}

/// An image kept encrypted ([`seal`]) is an encrypted archive already: exported as it is, for
/// `import --identity` with the identity of a recipient it was checkpointed for.
fn export_sealed(
    dir: &Path,
    name: &str,
    file: &Path,
    encrypt_to: Option<&Recipients>,
) -> Result<ExportSummary, ArchiveError> {
    if encrypt_to.is_some() {
        return Err(ArchiveError::AlreadySealed {
            name: name.to_owned(),
        });
    }
    let sealed = dir.join(SEALED_FILE);
    let mut source = crac_fs::open_regular(&sealed).map_err(|source| ArchiveError::ReadImage {
        path: sealed.clone(),
        source,
    })?;
    let write_error = |source| ArchiveError::Write {
        path: file.to_owned(),
        source,
    };
    let mut out = TempOut::create(file).map_err(write_error)?;
    let bytes_in = io::copy(&mut source, &mut out.file).map_err(write_error)?;
    let bytes_out = out.persist().map_err(write_error)?;
    Ok(ExportSummary {
        files: 1,
        bytes_in,
        bytes_out,
    })
}

/// [`export_with`] of the image folder `dir`.
fn export_dir(
    dir: &Path,
    file: &Path,
    encrypt_to: Option<&Recipients>,
) -> Result<ExportSummary, ArchiveError> {
    let dir = dir.to_owned();
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
    let sink = match encrypt_to {
        None => Sink::Plain(handle),
        Some(recipients) => {
            let encryptor = age::Encryptor::with_recipients(
                recipients.keys.iter().map(|r| r as &dyn age::Recipient),
            )
            .map_err(|e| write_error(io::Error::other(e.to_string())))?;
            Sink::Age(WriteBehind::spawn(
                encryptor.wrap_output(handle).map_err(write_error)?,
            ))
        }
    };
    let mut encoder = zstd::Encoder::new(sink, ZSTD_LEVEL).map_err(write_error)?;
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
        if reader.count != entry.size || reader.sha256() != entry.sha256 {
            return Err(ArchiveError::Changed { path });
        }
        bytes_in += entry.size;
    }
    let encoder = builder.into_inner().map_err(write_error)?;
    encoder
        .finish()
        .and_then(Sink::finish)
        .map_err(write_error)?;
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

/// Where the zstd stream of an export goes: the file, or age's encryption in front of it (on
/// a thread of its own, so that encrypting overlaps hashing and compressing).
enum Sink {
    Plain(File),
    Age(WriteBehind),
}

impl Sink {
    /// Ends the stream (age's last chunk).
    fn finish(self) -> io::Result<()> {
        match self {
            Sink::Plain(_) => Ok(()),
            Sink::Age(writer) => writer.finish(),
        }
    }
}

/// How much data the threads of [`WriteBehind`] and [`ReadAhead`] hand over at a time.
const HANDOVER_BYTES: usize = 1 << 20;
/// How many such pieces may wait between the threads.
const HANDOVER_DEPTH: usize = 4;

enum Piece {
    Data(Vec<u8>),
    /// The end of the stream: finish it (age's last chunk). Without it, the thread stops
    /// without finishing, as for an export that failed.
    Finish,
}

/// Writes to an age stream on a thread of its own.
struct WriteBehind {
    buf: Vec<u8>,
    pieces: Option<std::sync::mpsc::SyncSender<Piece>>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl WriteBehind {
    fn spawn(mut writer: age::stream::StreamWriter<File>) -> WriteBehind {
        let (pieces, received) = std::sync::mpsc::sync_channel(HANDOVER_DEPTH);
        let thread = std::thread::spawn(move || {
            // A write error ends the thread, and with it the channel: the next hand-over
            // fails, and the error is taken from here.
            while let Ok(piece) = received.recv() {
                match piece {
                    Piece::Data(data) => writer.write_all(&data)?,
                    Piece::Finish => return writer.finish().map(drop),
                }
            }
            Ok(())
        });
        WriteBehind {
            buf: Vec::with_capacity(HANDOVER_BYTES),
            pieces: Some(pieces),
            thread: Some(thread),
        }
    }

    fn hand_over(&mut self, piece: Piece) -> io::Result<()> {
        let sent = self.pieces.as_ref().map(|pieces| pieces.send(piece));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.join().err().unwrap_or_else(|| {
                io::Error::other("the encryption thread stopped before the end")
            })),
        }
    }

    fn join(&mut self) -> io::Result<()> {
        self.pieces = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the encryption thread panicked")),
            None => Ok(()),
        }
    }

    fn finish(mut self) -> io::Result<()> {
        let rest = std::mem::take(&mut self.buf);
        self.hand_over(Piece::Data(rest))?;
        self.hand_over(Piece::Finish)?;
        self.join()
    }
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        if self.buf.len() >= HANDOVER_BYTES {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(HANDOVER_BYTES));
            self.hand_over(Piece::Data(full))?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        // Unfinished (a failed export): the thread stops without finishing the stream.
        let _ = self.join();
    }
}

/// Reads an age stream on a thread of its own, so that decrypting overlaps decompressing,
/// hashing and writing.
struct ReadAhead {
    pieces: Option<std::sync::mpsc::Receiver<io::Result<Vec<u8>>>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReadAhead {
    fn spawn(mut reader: impl Read + Send + 'static) -> ReadAhead {
        let (pieces, received) = std::sync::mpsc::sync_channel(HANDOVER_DEPTH);
        let thread = std::thread::spawn(move || loop {
            let mut piece = vec![0; HANDOVER_BYTES];
            let mut filled = 0;
            let result = loop {
                match reader.read(&mut piece[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == piece.len() {
                            break Ok(());
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => break Err(err),
                }
            };
            piece.truncate(filled);
            let last = result.is_err() || filled == 0;
            // Data read before an error still goes first.
            if filled > 0 && pieces.send(Ok(piece)).is_err() {
                return;
            }
            if let Err(err) = result {
                let _ = pieces.send(Err(err));
            } else if filled == 0 {
                let _ = pieces.send(Ok(Vec::new()));
            }
            if last {
                return;
            }
        });
        ReadAhead {
            pieces: Some(received),
            current: Vec::new(),
            pos: 0,
            done: false,
            thread: Some(thread),
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            let piece = self.pieces.as_ref().map(std::sync::mpsc::Receiver::recv);
            match piece {
                Some(Ok(Ok(piece))) => {
                    self.done = piece.is_empty();
                    self.current = piece;
                    self.pos = 0;
                }
                Some(Ok(Err(err))) => {
                    self.done = true;
                    return Err(err);
                }
                _ => {
                    self.done = true;
                    return Err(io::Error::other(
                        "the decryption thread stopped before the end",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Its next hand-over fails, and it stops.
        self.pieces = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(file) => file.write(buf),
            Sink::Age(writer) => writer.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(file) => file.flush(),
            Sink::Age(writer) => writer.flush(),
        }
    }
}

/// The age recipients (X25519 public keys) an export is encrypted to.
#[derive(Clone, Debug, Default)]
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
}

impl Recipients {
    /// No recipients yet.
    pub fn new() -> Recipients {
        Recipients::default()
    }

    /// Adds one recipient, `age1…`.
    ///
    /// # Errors
    ///
    /// [`ArchiveError::Recipient`] quoting the text and saying what a recipient looks like;
    /// [`ArchiveError::SecretKeyAsRecipient`], not quoting it, for a secret key.
    pub fn add(&mut self, text: &str) -> Result<(), ArchiveError> {
        if text
            .trim()
            .get(..15)
            .is_some_and(|start| start.eq_ignore_ascii_case("AGE-SECRET-KEY-"))
        {
            // Never repeated back: it is a secret.
            return Err(ArchiveError::SecretKeyAsRecipient);
        }
        let key = text
            .trim()
            .parse::<age::x25519::Recipient>()
            .map_err(|reason| ArchiveError::Recipient {
                text: text.to_owned(),
                reason: reason.to_owned(),
            })?;
        self.keys.push(key);
        Ok(())
    }

    /// Adds the recipients listed in `path`, as age's `--recipients-file` reads them: one per
    /// line, blank lines and lines starting with `#` ignored.
    ///
    /// # Errors
    ///
    /// [`ArchiveError::KeyFile`] when the file cannot be read (a regular file of at most 1 MiB)
    /// or a line is not a recipient (its number is given), or when it lists none.
    pub fn add_file(&mut self, path: &Path) -> Result<(), ArchiveError> {
        let bad = |reason: String| ArchiveError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        let bytes = crac_fs::read_bounded(path, MAX_KEY_FILE_BYTES).map_err(|e| bad(why(&e)))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("it is not UTF-8 text".into()))?;
        let before = self.keys.len();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = line.parse::<age::x25519::Recipient>().map_err(|reason| {
                bad(format!(
                    "line {} is not an age X25519 recipient ({reason}): list one `age1…` \
                     public key per line",
                    number + 1
                ))
            })?;
            self.keys.push(key);
        }
        if self.keys.len() == before {
            return Err(bad("it lists no recipient".into()));
        }
        Ok(())
    }

    /// How many recipients there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The age identities (X25519 secret keys) an import decrypts with, read from a file.
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
    path: PathBuf,
}

impl Identities {
    /// Reads the identity file `path`, as `age-keygen` and [`keygen`] write it: one
    /// `AGE-SECRET-KEY-1…` per line, blank lines and `#` comments ignored. The file holds
    /// secret keys, so it is refused unless it is a regular file of the caller's (or root's)
    /// that no other user can read ([`crac_fs::read_private`]).
    ///
    /// # Errors
    ///
    /// [`ArchiveError::KeyFile`] saying what is wrong (its line number for a bad line, never
    /// its contents) and what to do.
    pub fn read(path: &Path) -> Result<Identities, ArchiveError> {
        let bad = |reason: String| ArchiveError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        let bytes = crac_fs::read_private(path, MAX_KEY_FILE_BYTES).map_err(|e| bad(why(&e)))?;
        let text = age::secrecy::SecretString::from(
            String::from_utf8(bytes).map_err(|_| bad("it is not UTF-8 text".into()))?,
        );
        let mut keys = Vec::new();
        for (number, line) in text.expose_secret().lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = line.parse::<age::x25519::Identity>().map_err(|_| {
                bad(format!(
                    "line {} is not an age X25519 identity (`AGE-SECRET-KEY-1…`, as \
                     `crac images keygen` writes it)",
                    number + 1
                ))
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(bad("it holds no identity".into()));
        }
        Ok(Identities {
            keys,
            path: path.to_owned(),
        })
    }

    /// The recipients that encrypt to these identities.
    pub fn recipients(&self) -> Recipients {
        Recipients {
            keys: self
                .keys
                .iter()
                .map(age::x25519::Identity::to_public)
                .collect(),
        }
    }
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Identities")
            .field("path", &self.path)
            .field("count", &self.keys.len())
            .finish()
    }
}

/// Makes a new age identity and writes it to `output` (which must not exist) as
/// `age-keygen` does: a comment with the time and the public key, then the secret key. The
/// file is mode 0600 whatever the umask ([`crac_fs::create_file`]). Returns the recipient
/// (public key) to give `export --encrypt-to`.
///
/// # Errors
///
/// [`ArchiveError::KeyExists`] when `output` exists (a key is never overwritten),
/// [`ArchiveError::Keygen`] when it cannot be written; nothing is left then.
pub fn keygen(output: &Path) -> Result<String, ArchiveError> {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut file = crac_fs::create_file(output).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            ArchiveError::KeyExists {
                path: output.to_owned(),
            }
        } else {
            ArchiveError::Keygen {
                path: output.to_owned(),
                source,
            }
        }
    })?;
    let secret = identity.to_string();
    let text = age::secrecy::SecretString::from(format!(
        "# created by crac {} at unix time {}\n# public key: {recipient}\n{}\n",
        env!("CARGO_PKG_VERSION"),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        secret.expose_secret()
    ));
    let written = file
        .write_all(text.expose_secret().as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(source) = written {
        drop(file);
        let _ = fs::remove_file(output);
        return Err(ArchiveError::Keygen {
            path: output.to_owned(),
            source,
        });
    }
    Ok(recipient)
}

fn entry_header(size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(mtime);
    header
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
        let (file, temp) = crac_fs::create_temp_beside(target)?;
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

/// How an import goes: the defaults of [`ImportOptions::default`] are those of [`import`].
#[derive(Debug)]
pub struct ImportOptions<'a> {
    /// The name to give the image (default: its name in the archive).
    pub name: Option<&'a str>,
    /// The identities to decrypt an encrypted archive with. An encrypted archive is refused
    /// without them, and a plain archive is refused with them (it is not the one expected).
    pub identities: Option<&'a Identities>,
    /// How many times its own size the archive's image may be ([`DEFAULT_MAX_RATIO`]).
    pub max_ratio: u64,
}

impl Default for ImportOptions<'_> {
    fn default() -> Self {
        ImportOptions {
            name: None,
            identities: None,
            max_ratio: DEFAULT_MAX_RATIO,
        }
    }
}

/// Adds the image in the archive `file` to `store`, under `name` or else the name in the
/// archive, and returns that name. An existing image is never replaced. [`import_with`] with
/// the default options: a plain (not encrypted) archive, expanding at most
/// [`DEFAULT_MAX_RATIO`] times.
///
/// # Errors
///
/// As [`import_with`].
pub fn import(store: &Store, file: &Path, name: Option<&str>) -> Result<String, ArchiveError> {
    import_with(
        store,
        file,
        &ImportOptions {
            name,
            ..ImportOptions::default()
        },
    )
}

/// Adds the image in the archive `file` (a regular file) to `store`, decrypting it first if it
/// is an age file, and returns its name in the store. An existing image is never replaced.
///
/// Before anything is written, the manifest's sizes are checked against the archive's size
/// (at most [`ImportOptions::max_ratio`] times it) and against the store's free space (with
/// [`free_margin`] to spare). Every entry is then checked against the manifest before the image
/// becomes visible: only regular files under `image/` that the manifest lists, each once, with
/// its size and SHA-256; an encrypted archive must also pass age's authentication to its end;
/// then the image must pass [`metadata::validate`] (so an image made on another CPU
/// architecture is refused). If the archive was renamed on the way, the image's metadata is
/// updated to its new name. The image is written into a working folder of its own kind
/// ([`Store::begin_import`]), so an import killed half-way is removed by the next
/// [`Store::recover`], never filed.
///
/// # Errors
///
/// [`ArchiveError`]; on any error nothing is left in the store.
pub fn import_with(
    store: &Store,
    file: &Path,
    options: &ImportOptions<'_>,
) -> Result<String, ArchiveError> {
    let name = options.name;
    if let Some(name) = name {
        check_free(store, name)?;
    }
    let path = file.to_owned();
    // Set when age's authentication fails, which reaches us through zstd and tar as a mere
    // read error.
    let unauthentic = Arc::new(AtomicBool::new(false));
    let damaged = |damage| ArchiveError::Damaged {
        path: path.clone(),
        damage,
    };
    let stream = |source| {
        if unauthentic.load(Ordering::SeqCst) {
            damaged(Damage::Authentication)
        } else {
            damaged(Damage::Stream { source })
        }
    };
    let refused = |entry: &str, reason: &str| ArchiveError::Refused {
        path: path.clone(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let not_archive = |reason: &str| ArchiveError::NotAnArchive {
        path: path.clone(),
        reason: reason.to_owned(),
    };
    let read_error = |source| ArchiveError::Read {
        path: path.clone(),
        source,
    };

    let mut input = crac_fs::open_regular(file).map_err(read_error)?;
    let archive_bytes = input.metadata().map_err(read_error)?.len();
    let mut head = Vec::with_capacity(AGE_ARMOR.len());
    (&mut input)
        .take(AGE_ARMOR.len() as u64)
        .read_to_end(&mut head)
        .and_then(|_| input.rewind())
        .map_err(read_error)?;
    let source: Box<dyn Read> = if head.starts_with(AGE_MAGIC) {
        let identities = options
            .identities
            .ok_or_else(|| ArchiveError::Encrypted { path: path.clone() })?;
        Box::new(ReadAhead::spawn(Authenticated {
            inner: decrypt(&path, input, identities, head.starts_with(AGE_V1))?,
            failed: Arc::clone(&unauthentic),
        }))
    } else if head.starts_with(AGE_ARMOR) {
        return Err(ArchiveError::Decrypt {
            path: path.clone(),
            reason: "it is an ASCII-armored age file, and crac reads binary ones (as `crac \
                     images export --encrypt-to` writes them): decode it with `age --decrypt` \
                     or re-export it"
                .to_owned(),
        });
    } else if options.identities.is_some() {
        return Err(ArchiveError::NotEncrypted { path: path.clone() });
    } else {
        Box::new(input)
    };
    let decoder = zstd::Decoder::new(source).map_err(stream)?;
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
    check_room(store, &path, &manifest, archive_bytes, options.max_ratio)?;

    let staging = store.begin_import(&target)?;
    let mut seen = vec![false; manifest.files.len()];
    for entry in entries {
        let entry = entry.map_err(stream)?;
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
        let mut out = crac_fs::create_file(&out_path).map_err(store_write)?;
        // tar reads no more than the entry's size, checked above; the bound says so here.
        let (count, sha256) =
            copy_hashed(&mut entry.take(expected.size), &mut out).map_err(|e| match e {
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
    // And to the end of the file: age authenticates its last chunk only there.
    let mut source = rest.into_inner().finish();
    if source.fill_buf().map_err(stream)?.iter().any(|_| true) {
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

/// Opens age's decryption of `input` with `identities`; `v1`: whether the file says it is of
/// age's version 1 (then a header age cannot parse is damaged, not newer).
fn decrypt(
    path: &Path,
    input: File,
    identities: &Identities,
    v1: bool,
) -> Result<age::stream::StreamReader<io::BufReader<File>>, ArchiveError> {
    let failed = |reason: String| ArchiveError::Decrypt {
        path: path.to_owned(),
        reason,
    };
    let header = |err: age::DecryptError| match err {
        age::DecryptError::InvalidHeader | age::DecryptError::InvalidMac => {
            "its age header is damaged or was modified".to_owned()
        }
        age::DecryptError::UnknownFormat if v1 => {
            "its age header is damaged or was modified".to_owned()
        }
        age::DecryptError::UnknownFormat => {
            "it is an age file of a newer version than this crac reads".to_owned()
        }
        age::DecryptError::Io(err) => format!("its age header is unreadable ({})", why(&err)),
        other => other.to_string(),
    };
    let decryptor = age::Decryptor::new_buffered(io::BufReader::with_capacity(1 << 16, input))
        .map_err(|e| failed(header(e)))?;
    if decryptor.is_scrypt() {
        return Err(failed(
            "it is encrypted with a passphrase, and crac decrypts with identity files only: \
             decrypt it with `age --decrypt` first"
                .to_owned(),
        ));
    }
    decryptor
        .decrypt(identities.keys.iter().map(|k| k as &dyn age::Identity))
        .map_err(|err| {
            failed(match err {
                age::DecryptError::NoMatchingKeys => format!(
                    "no identity in {} opens it: it was encrypted to other recipients (use the \
                     identity file of one it was exported to), or its header was modified",
                    identities.path.display()
                ),
                other => header(other),
            })
        })
}

/// A reader that notes when the one it reads fails: age's failed authentication of a chunk
/// reaches the importer through zstd and tar, which do not keep the cause.
struct Authenticated<R> {
    inner: R,
    failed: Arc<AtomicBool>,
}

impl<R: Read> Read for Authenticated<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|err| {
            if err.kind() != io::ErrorKind::Interrupted {
                self.failed.store(true, Ordering::SeqCst);
            }
        })
    }
}

/// How much room an import of `declared` bytes leaves free on the store's file system beside
/// the image: a twentieth of it, at least 64 MiB, so that an import does not fill the disk the
/// services and their logs share.
pub fn free_margin(declared: u64) -> u64 {
    (declared / 20).max(MIN_FREE_MARGIN)
}

/// Refuses a manifest that declares more than `max_ratio` times the archive's size, or more
/// than the store's file system has room for: before anything is written.
fn check_room(
    store: &Store,
    path: &Path,
    manifest: &Manifest,
    archive_bytes: u64,
    max_ratio: u64,
) -> Result<(), ArchiveError> {
    let declared = manifest
        .files
        .iter()
        .fold(0u64, |sum, f| sum.saturating_add(f.size));
    let ratio = declared / archive_bytes.max(1);
    if declared > archive_bytes.max(1).saturating_mul(max_ratio) {
        return Err(ArchiveError::TooExpanded {
            path: path.to_owned(),
            declared,
            archive_bytes,
            ratio,
            max: max_ratio,
        });
    }
    // The store's root may not exist yet: its nearest existing folder is on the same file
    // system as it will be.
    let mut dir = store.root();
    let stat = loop {
        match nix::sys::statvfs::statvfs(dir) {
            Ok(stat) => break stat,
            Err(nix::errno::Errno::ENOENT) if dir.parent().is_some() => {
                dir = dir.parent().unwrap_or(dir);
            }
            Err(err) => {
                return Err(ArchiveError::Store(StoreError::Io {
                    action: "measure the free space of",
                    path: dir.to_owned(),
                    source: err.into(),
                }))
            }
        }
    };
    let free = stat.blocks_available().saturating_mul(stat.fragment_size());
    let margin = free_margin(declared);
    if declared.saturating_add(margin) > free {
        return Err(ArchiveError::NoRoom {
            path: path.to_owned(),
            declared,
            free,
            margin,
            store: store.root().to_owned(),
        });
    }
    Ok(())
}

/// The one file of an image kept encrypted in the store ([`seal`]): an archive as
/// [`export_with`] writes it, encrypted.
pub const SEALED_FILE: &str = "crac-image.age";

/// Where images are decrypted for a restore, and dumped before they are encrypted: a tmpfs,
/// so that the plaintext of a sealed image lives in memory only.
pub const PLAIN_TMPFS: &str = "/dev/shm";

/// Whether the image folder `dir` holds an image encrypted at rest ([`seal`]).
pub fn is_sealed(dir: &Path) -> bool {
    dir.join(SEALED_FILE).is_file() && !dir.join(METADATA_FILE).exists()
}

/// A private folder (0700, an unguessable name) on the tmpfs [`PLAIN_TMPFS`], for the
/// plaintext of a sealed image; removed with its contents when dropped.
///
/// # Errors
///
/// When [`PLAIN_TMPFS`] is missing or not a tmpfs (the plaintext would reach a disk), or the
/// folder cannot be made.
pub fn plain_tmpfs(prefix: &str) -> io::Result<crac_fs::TempDir> {
    let base = Path::new(PLAIN_TMPFS);
    let stat = nix::sys::statfs::statfs(base).map_err(|err| {
        io::Error::new(
            io::Error::from(err).kind(),
            format!("{PLAIN_TMPFS} is unusable ({})", err.desc()),
        )
    })?;
    if stat.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{PLAIN_TMPFS} is not a tmpfs, so the plaintext image would be written to a \
                 disk; mount one there (mount -t tmpfs tmpfs {PLAIN_TMPFS})"
            ),
        ));
    }
    crac_fs::TempDir::new_in(base, prefix)
}

/// Files the plaintext image folder `plain` in `store` as the image `name`, encrypted to
/// `recipients`: its folder holds only [`SEALED_FILE`]. An image of that name is replaced only
/// with `replace`; with `durable`, the image is flushed to disk before it gets its name.
/// Returns the image's folder. `plain` is left as it is, for the caller to remove.
///
/// # Errors
///
/// [`ArchiveError`]; on any error nothing is left in the store.
pub fn seal(
    store: &Store,
    name: &str,
    plain: &Path,
    recipients: &Recipients,
    replace: bool,
    durable: bool,
) -> Result<PathBuf, ArchiveError> {
    let mut staging = store.begin(name)?;
    staging.set_durable(durable);
    export_dir(plain, &staging.path().join(SEALED_FILE), Some(recipients))?;
    match staging.commit(replace) {
        Ok(dir) => Ok(dir),
        Err(StoreError::Exists { .. }) => Err(ArchiveError::Exists {
            name: name.to_owned(),
        }),
        Err(err) => Err(err.into()),
    }
}

/// Decrypts the sealed image in `dir` ([`seal`]) into a folder of the same name under `into`
/// (a [`plain_tmpfs`] folder), checking every file as an import does, and returns that
/// folder.
///
/// # Errors
///
/// As [`import_with`]: a wrong identity, a modified or damaged image, no room on the tmpfs.
pub fn unseal(dir: &Path, identities: &Identities, into: &Path) -> Result<PathBuf, ArchiveError> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| store::validate_name(n).is_ok())
        .unwrap_or("image");
    let options = ImportOptions {
        name: Some(name),
        identities: Some(identities),
        // The store is the caller's own (no one else may write to it): no bomb to fear, and an
        // image of mostly zero pages must restore.
        max_ratio: u64::MAX,
    };
    let name = import_with(&Store::open(into), &dir.join(SEALED_FILE), &options)?;
    Ok(into.join(name))
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
