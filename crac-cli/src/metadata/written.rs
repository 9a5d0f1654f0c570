//! Files the dumped tree wrote to: recorded at the checkpoint ([`WrittenFile::record`]) and
//! checked before a restore ([`check`]).
//!
//! A restore resumes the process where it left its files: its caches, a database's page cache
//! and WAL index, the offsets it writes at, the rows it counted, all describe each file as it
//! was at the dump. CRIU checks only that such a file is still there with its size. So every
//! regular file the tree has open for writing (`O_WRONLY` or `O_RDWR`) or mapped shared and
//! writable when `crac checkpoint` starts (before the hooks: a database the hooks close counts,
//! the service's memory was made from it) is recorded with its identity (device, inode), size
//! and modification time, and, up to [`HASH_LIMIT`], its SHA-256; a restore refuses the image
//! once such a file has changed, naming it, unless the operator allows that file. Not
//! recorded: files open for appending only (`O_WRONLY|O_APPEND`: logs, which a restored
//! service goes on appending to whatever came since), deleted files (CRIU copies them into the
//! image) and files open read-only (the executable and mapped files are hashed apart).
//!
//! The SHA-256 is taken after the dump, through a handle opened before it (the file the
//! process had, even if its path was replaced since): without `--leave-running` the service
//! is gone by then and the file is as it left it. With `--leave-running` it runs on and may
//! write at once, so a file whose modification time changed while the checkpoint ran is
//! recorded as changed then: crac cannot tell which of its states the image holds, and such an
//! image is restored only if the operator allows that file.
//!
//! A restore compares a file's identity first: the same device, inode, size, modification and
//! change times need no reading. Otherwise the file is hashed again (up to [`HASH_LIMIT`]) or,
//! above it, compared by size and modification time.

use std::fs;
use std::io::{self, Seek};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Problem;
use crate::hashing::sha256_of;

/// The largest file hashed: 64 MiB (some 40 ms at SHA-NI speed). Larger ones are recorded and
/// compared by size and modification time.
pub const HASH_LIMIT: u64 = 64 << 20;

/// A file the dumped tree had open for writing, or mapped shared and writable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenFile {
    /// Its path, as the process saw it.
    pub path: String,
    /// Its device on the machine of the checkpoint.
    pub dev: u64,
    /// Its inode there.
    pub ino: u64,
    /// Its size, in bytes.
    pub size: u64,
    /// Its modification time, in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Its change time, in nanoseconds since the Unix epoch.
    pub ctime_ns: i64,
    /// Its SHA-256 (lowercase hex), for a file up to [`HASH_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// It changed while a `--leave-running` checkpoint ran: the image may hold any of its
    /// states, and is restored only when the operator allows this file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub changed_during_checkpoint: bool,
}

/// What a file's `stat` says, as compared here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stat {
    /// The stat of the file `meta` describes.
    pub fn of(meta: &fs::Metadata) -> Stat {
        Stat {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
}

impl WrittenFile {
    fn from_stat(path: String, stat: Stat) -> WrittenFile {
        WrittenFile {
            path,
            dev: stat.dev,
            ino: stat.ino,
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            ctime_ns: stat.ctime_ns,
            sha256: None,
            changed_during_checkpoint: false,
        }
    }

    fn stat(&self) -> Stat {
        Stat {
            dev: self.dev,
            ino: self.ino,
            size: self.size,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
        }
    }

    /// Records the file at `path`, open as `file` (read-only, a handle of its own), after the
    /// dump; `before` is its stat when the checkpoint started, and `leave_running` whether the
    /// service runs on (see the module documentation).
    ///
    /// # Errors
    ///
    /// A read error.
    pub fn record(
        path: String,
        file: &fs::File,
        before: Stat,
        leave_running: bool,
    ) -> io::Result<WrittenFile> {
        let now = Stat::of(&file.metadata()?);
        if leave_running && (now.mtime_ns != before.mtime_ns || now.size != before.size) {
            return Ok(WrittenFile {
                changed_during_checkpoint: true,
                ..WrittenFile::from_stat(path, before)
            });
        }
        let mut written = WrittenFile::from_stat(path, now);
        if now.size <= HASH_LIMIT {
            // From the start, whatever was read through this handle before.
            let mut from_start = file.try_clone()?;
            from_start.seek(io::SeekFrom::Start(0))?;
            let sha256 = sha256_of(from_start)?;
            // Written to while it was read: the digest is of no state; the size and times
            // recorded then differ from any later ones.
            if Stat::of(&file.metadata()?) == now {
                written.sha256 = Some(sha256);
            }
        }
        Ok(written)
    }
}

/// How a recorded file differs now, if it does.
fn changed(file: &WrittenFile) -> Option<&'static str> {
    if file.changed_during_checkpoint {
        return Some(
            "it changed while the checkpoint ran, with --leave-running: the image may hold any of its states",
        );
    }
    let now = match fs::metadata(&file.path) {
        Ok(meta) => Stat::of(&meta),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Some("it is gone"),
        Err(_) => return Some("it cannot be read"),
    };
    if now == file.stat() {
        return None;
    }
    if now.size != file.size {
        return Some("its size differs");
    }
    match &file.sha256 {
        Some(expected) => {
            // Only a regular file is read (a FIFO would hang the check).
            let found = crac_fs::open_regular(Path::new(&file.path)).and_then(sha256_of);
            match found {
                Ok(found) if &found == expected => None,
                Ok(_) => Some("its SHA-256 differs"),
                Err(_) => Some("it cannot be read"),
            }
        }
        None if now.mtime_ns == file.mtime_ns => None,
        None => Some("its modification time differs; a file over 64 MiB is compared by size and modification time"),
    }
}

/// The recorded `files` that changed since the checkpoint, but those in `allowed`: what a
/// restore checks of them ([`verify_allowing`](super::verify_allowing)).
pub fn check(files: &[WrittenFile], allowed: &[PathBuf]) -> Vec<Problem> {
    files
        .iter()
        .filter(|f| {
            // As recorded, or a relative path or a link that leads there.
            let path = Path::new(&f.path);
            !allowed
                .iter()
                .any(|a| a == path || fs::canonicalize(a).is_ok_and(|c| c == path))
        })
        .filter_map(|f| {
            changed(f).map(|how| Problem::WrittenFileChanged {
                path: PathBuf::from(&f.path),
                how,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_written_file_is_refused_once_it_changed_unless_allowed() {
        let dir = std::env::temp_dir().join(format!("crac-written-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db");
        fs::write(&path, b"one").unwrap();
        let open = || fs::File::open(&path).unwrap();
        let before = Stat::of(&open().metadata().unwrap());
        let recorded =
            WrittenFile::record(path.display().to_string(), &open(), before, false).unwrap();
        assert_eq!(recorded.size, 3);
        assert!(recorded.sha256.is_some());
        let handle = open();
        let twice = [(); 2].map(|()| {
            WrittenFile::record(path.display().to_string(), &handle, before, false)
                .unwrap()
                .sha256
        });
        assert_eq!(twice, [recorded.sha256.clone(), recorded.sha256.clone()]);
        assert!(check(std::slice::from_ref(&recorded), &[]).is_empty());

        // Same size, new contents: the digest tells.
        fs::write(&path, b"two").unwrap();
        let problems = check(std::slice::from_ref(&recorded), &[]);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].to_string(),
            format!(
                "the file {} changed since the checkpoint (its SHA-256 differs): the process had \
                 it open for writing; restoring would resume it against a newer file",
                path.display()
            )
        );
        assert!(check(std::slice::from_ref(&recorded), std::slice::from_ref(&path)).is_empty());
        let through = dir.join("link");
        std::os::unix::fs::symlink(&path, &through).unwrap();
        assert!(check(std::slice::from_ref(&recorded), &[through]).is_empty());

        // Put back as it was (new times): the same again.
        fs::write(&path, b"one").unwrap();
        assert!(check(std::slice::from_ref(&recorded), &[]).is_empty());
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"!")
            .unwrap();
        let problems = check(std::slice::from_ref(&recorded), &[]);
        assert!(problems[0].to_string().contains("(its size differs)"));

        // With --leave-running, a change while the checkpoint ran is never taken for the
        // image's state.
        let moved_on =
            WrittenFile::record(path.display().to_string(), &open(), before, true).unwrap();
        assert!(moved_on.changed_during_checkpoint && moved_on.sha256.is_none());
        assert_eq!(check(std::slice::from_ref(&moved_on), &[]).len(), 1);
        fs::remove_file(&path).unwrap();
        assert!(check(std::slice::from_ref(&recorded), &[])[0]
            .to_string()
            .contains("(it is gone)"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
