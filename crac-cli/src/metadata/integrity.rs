//! Integrity: the SHA-256 of every image file and of the files outside the image that a
//! restore maps (the executable, shared libraries), checked by [`verify`]; the note of what was
//! found intact on this machine ([`VERIFIED_FILE`]), so that a restore re-hashes only what
//! changed; and the hashes of files outside images that a store reuses across checkpoints
//! ([`KnownHashes`]).
//!
//! # Where the hashing runs
//!
//! The hashes are computed by `crac checkpoint` after CRIU has exited, before the image gets its
//! name in the store: never while the service is frozen, and the executable is hashed through a
//! handle opened before the dump, so it is the file the service ran even if it was replaced
//! meanwhile. At SHA-NI speeds (about 1.5-2 GB/s on one core) that is some 40 ms per 64 MiB of
//! image, spread over both cores when there are several files (BENCHMARKS.md, item 2).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::schema::with_path;
use super::{validate, FileEntry, Metadata, Problem, ValidateError, METADATA_FILE};
use crate::hashing::sha256_of;

/// The largest cache file ([`VERIFIED_FILE`], [`KNOWN_HASHES_FILE`]) read.
const MAX_CACHE_BYTES: u64 = 16 << 20;

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
    verify_allowing(dir, meta, check, &[])
}

/// [`verify`], and the files the process wrote to ([`WrittenFile`](super::WrittenFile)) but
/// those in `allowed` (the operator's `--allow-changed`), which may have changed.
///
/// # Errors
///
/// As [`verify`], with each written file that changed.
pub fn verify_allowing(
    dir: &Path,
    meta: &Metadata,
    check: Check,
    allowed: &[PathBuf],
) -> Result<(), ValidateError> {
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
    problems.extend(super::written::check(&meta.written_files, allowed));
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
