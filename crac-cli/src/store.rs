//! The image store: one folder per image under a root, each named by the operator.
//!
//! ```text
//! ROOT/                              $CRAC_STORE, /var/lib/crac/images or ~/.local/share/crac/images
//!   web/                             an image: CRIU's *.img files, crac-meta.json, logs
//!   .staging-web-4242-1718…          an image being written by a dump
//!   .importing-web-4242-1718…        an image being written by an import (never filed)
//!   .old-web-4242-1718…              an image being replaced, removed right after
//!   .removing-web-4242-1718…         an image being removed
//! ```
//!
//! # Crash safety
//!
//! An image is written into a staging folder and renamed to its name only when complete
//! ([`Staging::commit`]), so the store never shows half an image: a failed dump or import drops
//! its [`Staging`], which removes the folder, and a killed one leaves a hidden folder that
//! [`Store::list`] ignores. [`Store::recover`] (run by `crac` before it writes to the store,
//! and by `crac images prune`) deals with those once their process is gone and no process
//! works in them (CRIU's working folder is the image folder): a complete image whose crac was
//! killed after CRIU's dump succeeded is filed under its name (the service is in it: CRIU
//! stopped it), the rest is removed ([`Store::clean_stale_staging`]).
//! Replacing and removing rename the old image to a hidden name first for the same reason.
//!
//! # Permissions
//!
//! Folders the store creates are mode 0700, for the system store as well as a user's: an image
//! holds the whole memory of a process, keys and passwords included.
//!
//! # Errors
//!
//! Each error's message is complete on its own, the cause's text included, and says what to do.
//! The cause is also kept as the error's `source` for callers that inspect it.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::why;
use crate::metadata::{self, Metadata, MetadataError};

/// Names the store's root folder, overriding the default.
pub const STORE_ENV: &str = crac_protocol::env::STORE;
/// The store root when running as root and `$CRAC_STORE` is not set.
pub const SYSTEM_ROOT: &str = "/var/lib/crac/images";
/// The longest image name, in characters.
pub const MAX_NAME_LEN: usize = 100;

/// The kinds of hidden working folders, by prefix; see the module documentation.
const STAGING: &str = "staging";
/// An import's staging folder: never mistaken for an interrupted dump, whose complete image
/// [`Store::recover`] files; an interrupted import was never verified, so it is removed.
const IMPORTING: &str = "importing";
const OLD: &str = "old";
const REMOVING: &str = "removing";

/// The store's root folder when none is given:
///
/// 1. `$CRAC_STORE`, if set and not empty;
/// 2. [`SYSTEM_ROOT`] (`/var/lib/crac/images`) when the effective user is root;
/// 3. `$XDG_DATA_HOME/crac/images` if that variable is an absolute path;
/// 4. `$HOME/.local/share/crac/images` (the home folder from the password database if `HOME`
///    is not set);
/// 5. [`SYSTEM_ROOT`] when there is no home folder either; writing there then fails with an
///    error that says to set `CRAC_STORE`.
///
/// Root gets one system-wide store because checkpoints of services are taken by root (CRIU
/// needs it) from wherever: a unit file, a script, an operator's shell, and each must find the
/// images of the others. Anyone else gets a store of their own, following the XDG base
/// directory convention, because images hold process memory and must not be shared.
pub fn default_root() -> PathBuf {
    if let Some(root) = non_empty_env(STORE_ENV) {
        return root;
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from(SYSTEM_ROOT);
    }
    if let Some(data) = non_empty_env("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return data.join("crac/images");
    }
    let home = non_empty_env("HOME").or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|user| user.dir)
    });
    match home {
        Some(home) => home.join(".local/share/crac/images"),
        None => PathBuf::from(SYSTEM_ROOT),
    }
}

fn non_empty_env(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Checks that `name` can name an image: 1 to 100 ASCII letters, digits, `.`, `_` and `-`, not
/// starting with `.` (hidden names are the store's working folders) or `-` (it would read as
/// an option).
///
/// # Errors
///
/// [`StoreError::InvalidName`], quoting the name and saying what is wrong.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        Some("it is empty".to_owned())
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(format!("{c:?} is not allowed"))
    } else if name.len() > MAX_NAME_LEN {
        Some(format!("it is {} characters long", name.len()))
    } else if name.starts_with('.') {
        Some("it starts with '.'".to_owned())
    } else if name.starts_with('-') {
        Some("it starts with '-'".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Parses an age such as `90s`, `30m`, `12h` or `7d`: a whole number and a unit (seconds,
/// minutes, hours or days).
///
/// # Errors
///
/// A message that quotes the input and shows the accepted forms.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid age {s:?}: use a whole number followed by s, m, h or d (e.g. 90s, 30m, 12h, 7d)"
        )
    };
    let units = [("s", 1), ("m", 60), ("h", 60 * 60), ("d", 24 * 60 * 60)];
    let Some((number, unit_secs)) = units
        .iter()
        .find_map(|&(unit, secs)| s.strip_suffix(unit).map(|n| (n, secs)))
    else {
        return Err(invalid());
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_secs))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("age {s:?} is too large"))
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A name that cannot name an image.
    #[error(
        "invalid image name {name:?}: {reason}; use 1 to 100 letters, digits, '.', '_' or '-', \
         not starting with '.' or '-'"
    )]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No image by that name.
    #[error("no image named {name} in {root} (see `crac images list`)")]
    NotFound {
        /// The name.
        name: String,
        /// The store's root.
        root: PathBuf,
    },
    /// A folder given by path does not exist or is not a folder.
    #[error("no image folder at {path} ({})", why(.source))]
    NoFolder {
        /// The path as given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An image by that name exists and replacing it was not asked for.
    #[error("an image named {name} already exists: use --replace or another --name")]
    Exists {
        /// The name.
        name: String,
    },
    /// The store cannot be written by this user.
    #[error(
        "image store {root} is not writable ({}): set CRAC_STORE to a writable folder or run as root",
        why(.source)
    )]
    NotWritable {
        /// The store's root.
        root: PathBuf,
        /// The cause (permission denied, read-only file system).
        #[source]
        source: io::Error,
    },
    /// The store's root, or a folder above it, is not the caller's own and private: another
    /// user may have planted or changed images there, so nothing in it is listed, restored or
    /// filed.
    #[error(
        "{source}; crac neither lists, restores nor files images in the store {root} until that \
         is fixed"
    )]
    Untrusted {
        /// The store's root.
        root: PathBuf,
        /// What is wrong, from [`crac_fs`].
        #[source]
        source: io::Error,
    },
    /// [`Store::prune`] was given nothing to prune by.
    #[error("prune needs a number of images to keep, an age, or both")]
    NoPruneRule,
    /// Any other file-system error.
    #[error("cannot {action} {path} ({})", why(.source))]
    Io {
        /// What was being done.
        action: &'static str,
        /// To what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One folder of the store, as [`Store::list`] found it.
#[derive(Debug)]
pub struct Entry {
    /// The image's name (its folder's name).
    pub name: String,
    /// The image folder.
    pub path: PathBuf,
    /// Its metadata, or why it could not be read (the image is still listed, so that it can be
    /// seen and removed).
    pub metadata: Result<Metadata, MetadataError>,
    /// When it was made, in milliseconds since the Unix epoch: the metadata's
    /// `created_unix_ms`, or the folder's modification time if the metadata is unreadable.
    pub created_unix_ms: u64,
    /// The total size of its files in bytes (their apparent size, as `du -b` counts).
    pub bytes: u64,
}

/// What the store takes on disk, from [`Store::du`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Each image's name and size in bytes, in [`Store::list`] order.
    pub images: Vec<(String, u64)>,
    /// The hidden working folders: dumps in progress, or left by killed ones (see
    /// [`Store::clean_stale_staging`]).
    pub staging: u64,
    /// Everything: the images and the working folders.
    pub total: u64,
}

/// The image store rooted at one folder. Opening does not touch the file system; the root is
/// created by the first [`Store::begin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// The store at [`default_root`].
    pub fn open_default() -> Store {
        Store::open(default_root())
    }

    /// The store's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checks that images can be written here: makes and removes an empty hidden folder in the
    /// root, or, while the root does not exist yet, in its nearest existing parent (the root is
    /// made by the first write).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotWritable`] (permissions, a read-only file system), [`StoreError::Io`].
    pub fn check_writable(&self) -> Result<(), StoreError> {
        self.trusted()?;
        let mut dir = self.root.as_path();
        while fs::symlink_metadata(dir).is_err() {
            match dir.parent() {
                Some(parent) => dir = parent,
                None => break,
            }
        }
        let probe = crac_fs::TempDir::new_in(dir, ".crac-check")
            .map_err(|e| self.create_error("write into", dir, e))?;
        drop(probe);
        Ok(())
    }

    /// The free function [`validate_name`], reachable through the type.
    ///
    /// # Errors
    ///
    /// As [`validate_name`].
    pub fn validate_name(name: &str) -> Result<(), StoreError> {
        validate_name(name)
    }

    /// The folder of an image: `name_or_dir` is an image name, or, when it contains a `/`, a
    /// folder anywhere (`./img` for one in the current folder; links are followed there).
    ///
    /// To check that a name is free, use [`Store::check_absent`]: `resolve` also fails for an
    /// invalid name or an unreadable store.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidName`] or [`StoreError::NotFound`] for a name, and
    /// [`StoreError::NoFolder`] for a path that is not a folder.
    pub fn resolve(&self, name_or_dir: &str) -> Result<PathBuf, StoreError> {
        if name_or_dir.contains('/') {
            let path = PathBuf::from(name_or_dir);
            return match fs::metadata(&path) {
                Ok(found) if found.is_dir() => Ok(path),
                Ok(_) => Err(StoreError::NoFolder {
                    path,
                    source: io::Error::from_raw_os_error(libc::ENOTDIR),
                }),
                Err(source) => Err(StoreError::NoFolder { path, source }),
            };
        }
        validate_name(name_or_dir)?;
        self.trusted()?;
        let path = self.root.join(name_or_dir);
        // Not following links, as `list` and `remove` do not: a link is not an image the
        // store made.
        match fs::symlink_metadata(&path) {
            Ok(found) if found.is_dir() => Ok(path),
            Ok(_) => Err(self.not_found(name_or_dir)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(self.not_found(name_or_dir)),
            Err(source) => Err(StoreError::Io {
                action: "open",
                path,
                source,
            }),
        }
    }

    /// Fails if an image named `name` exists, so that a caller can refuse before a long dump
    /// or import rather than after. [`Staging::commit`] checks again, atomically.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidName`], [`StoreError::Exists`], or the I/O error of looking.
    pub fn check_absent(&self, name: &str) -> Result<(), StoreError> {
        validate_name(name)?;
        let path = self.root.join(name);
        match fs::symlink_metadata(&path) {
            Ok(_) => Err(StoreError::Exists {
                name: name.to_owned(),
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                action: "look for",
                path,
                source,
            }),
        }
    }

    /// Starts writing an image named `name`: creates the store's root if missing and an empty
    /// staging folder in it (both mode 0700), which also proves the store is writable. Write
    /// the image into [`Staging::path`], then [`Staging::commit`] it.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidName`], [`StoreError::NotWritable`] when permissions or a read-only
    /// file system stand in the way, [`StoreError::Io`] otherwise.
    pub fn begin(&self, name: &str) -> Result<Staging, StoreError> {
        self.begin_as(STAGING, name)
    }

    /// [`Store::begin`] in a working folder of the `kind` given.
    fn begin_as(&self, kind: &str, name: &str) -> Result<Staging, StoreError> {
        validate_name(name)?;
        crac_fs::ensure_dir(&self.root).map_err(|e| self.create_error("create", &self.root, e))?;
        let path = self.hidden(kind, name);
        crac_fs::create_dir(&path).map_err(|e| self.create_error("create", &path, e))?;
        Ok(Staging {
            root: self.root.clone(),
            name: name.to_owned(),
            path,
            committed: false,
            durable: false,
        })
    }

    /// Starts an import of an image named `name`: as [`Store::begin`], but in a folder of its
    /// own kind (`.importing-…`), so that an import killed half-way is never taken for the
    /// complete image of an interrupted checkpoint: [`Store::recover`] removes it (its files
    /// were never all checked against the archive) instead of filing it.
    ///
    /// # Errors
    ///
    /// As [`Store::begin`].
    pub fn begin_import(&self, name: &str) -> Result<Staging, StoreError> {
        self.begin_as(IMPORTING, name)
    }

    /// The images, oldest first: by creation time, then by name. Hidden folders (the store's
    /// working folders), plain files, links and folders whose names are not image names are
    /// not images and are left out. A store whose root does not exist yet is empty.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the root or an image folder cannot be read. An image with
    /// unreadable metadata is listed, with the error in [`Entry::metadata`].
    pub fn list(&self) -> Result<Vec<Entry>, StoreError> {
        self.trusted()?;
        let read = match fs::read_dir(&self.root) {
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(self.io("read", &self.root, source)),
        };
        let mut entries = Vec::new();
        for item in read {
            let item = item.map_err(|e| self.io("read", &self.root, e))?;
            let Ok(name) = item.file_name().into_string() else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            let path = item.path();
            // Does not follow links: a link is not an image the store made.
            let is_dir = item
                .file_type()
                .map_err(|e| self.io("inspect", &path, e))?
                .is_dir();
            if !is_dir {
                continue;
            }
            let bytes = match dir_bytes(&path) {
                Ok(bytes) => bytes,
                // Removed while listing.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(self.io("measure", &path, source)),
            };
            let metadata = metadata::read(&path);
            let created_unix_ms = match &metadata {
                Ok(meta) => meta.created_unix_ms,
                Err(_) => mtime_ms(&path),
            };
            entries.push(Entry {
                name,
                path,
                metadata,
                created_unix_ms,
                bytes,
            });
        }
        entries.sort_by(|a, b| {
            a.created_unix_ms
                .cmp(&b.created_unix_ms)
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(entries)
    }

    /// Removes the image named `name`, whatever its state (a corrupt image can be removed).
    ///
    /// The folder is renamed to a hidden name first and deleted after, so an interrupted
    /// removal never leaves a half image under the name.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidName`], [`StoreError::NotFound`], [`StoreError::NotWritable`] or
    /// [`StoreError::Io`]. If deleting fails after the rename, the image is already gone from
    /// the store and the error names the hidden folder left behind.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        validate_name(name)?;
        self.trusted()?;
        let path = self.root.join(name);
        match fs::symlink_metadata(&path) {
            Ok(found) if found.is_dir() => {}
            Ok(_) => return Err(self.not_found(name)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(self.not_found(name)),
            Err(source) => return Err(self.io("inspect", &path, source)),
        }
        let aside = self.hidden(REMOVING, name);
        fs::rename(&path, &aside).map_err(|e| self.write_error("remove", &path, e))?;
        fs::remove_dir_all(&aside).map_err(|e| self.write_error("remove", &aside, e))?;
        sync_dir(&self.root).map_err(|e| self.io("flush", &self.root, e))
    }

    /// How much space each image takes, what the working folders take, and the total.
    ///
    /// # Errors
    ///
    /// As [`Store::list`].
    pub fn du(&self) -> Result<DiskUsage, StoreError> {
        let images: Vec<(String, u64)> = self
            .list()?
            .into_iter()
            .map(|entry| (entry.name, entry.bytes))
            .collect();
        let mut staging = 0;
        for (_, _, path) in self.working_folders()? {
            match dir_bytes(&path) {
                Ok(bytes) => staging += bytes,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(self.io("measure", &path, source)),
            }
        }
        let total = images.iter().map(|(_, bytes)| bytes).sum::<u64>() + staging;
        Ok(DiskUsage {
            images,
            staging,
            total,
        })
    }

    /// Removes old images and returns their names, newest first.
    ///
    /// * `keep` alone: removes all but the `keep` newest images.
    /// * `older_than` alone: removes the images made more than `older_than` ago.
    /// * both: removes the images made more than `older_than` ago, except the `keep` newest,
    ///   which are kept whatever their age ("remove old images, but leave me N").
    ///
    /// Age and newness come from [`Entry::created_unix_ms`].
    ///
    /// # Errors
    ///
    /// [`StoreError::NoPruneRule`] when both are `None`; otherwise the error of the first image
    /// that cannot be removed. Images removed before it stay removed.
    pub fn prune(
        &self,
        keep: Option<usize>,
        older_than: Option<Duration>,
    ) -> Result<Vec<String>, StoreError> {
        if keep.is_none() && older_than.is_none() {
            return Err(StoreError::NoPruneRule);
        }
        let now = now_ms();
        let mut removed = Vec::new();
        for (rank, entry) in self.list()?.into_iter().rev().enumerate() {
            let beyond_keep = keep.is_none_or(|keep| rank >= keep);
            let too_old = older_than.is_none_or(|age| {
                u128::from(now.saturating_sub(entry.created_unix_ms)) > age.as_millis()
            });
            if beyond_keep && too_old {
                match self.remove(&entry.name) {
                    // Removed by someone else meanwhile: the goal is reached.
                    Ok(()) | Err(StoreError::NotFound { .. }) => removed.push(entry.name),
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(removed)
    }

    /// Files the complete images of checkpoints whose crac was killed after CRIU's dump had
    /// succeeded (see [`metadata::complete_pending`]), then removes the other working folders of
    /// processes that are gone ([`Store::clean_stale_staging`]).
    ///
    /// An image is filed under the name it was to have, or, if that is taken by now, under
    /// `NAME-recovered-SECONDS` (SECONDS: when CRIU finished): a recovered image never replaces
    /// another one.
    ///
    /// # Errors
    ///
    /// As [`Store::clean_stale_staging`], and the error of finishing an image's metadata, which
    /// leaves that folder where it is for the next attempt.
    pub fn recover(&self) -> Result<Recovery, StoreError> {
        let mut recovered = Vec::new();
        let mut stuck = Vec::new();
        for (kind, image, path) in self.working_folders()? {
            if kind != STAGING || pid_alive(folder_pid(&path)) || in_use(&path) {
                continue;
            }
            let meta = match metadata::complete_pending(&path, &image) {
                Ok(Some(meta)) => meta,
                Ok(None) => continue,
                // Left where it is (clean_stale_staging never removes a complete dump): the
                // next attempt may succeed, and the caller says where it is meanwhile.
                Err(source) => {
                    stuck.push(self.io("finish the image in", &path, source));
                    continue;
                }
            };
            let mut name = image.clone();
            let mut target = self.root.join(&name);
            if rename_noreplace(&path, &target).is_err() {
                let secs = meta.created_unix_ms / 1000;
                let suffix = format!("-recovered-{secs}");
                name = format!(
                    "{}{suffix}",
                    &image[..image.len().min(MAX_NAME_LEN - suffix.len())]
                );
                target = self.root.join(&name);
                let mut renamed = meta.clone();
                renamed.name = name.clone();
                metadata::write(&path, &renamed).map_err(|e| self.io("recover", &path, e))?;
                rename_noreplace(&path, &target)
                    .map_err(|e| self.write_error("recover", &path, e))?;
            }
            recovered.push(Recovered {
                name,
                pid: meta.pid,
                from: path,
            });
        }
        let removed = self.clean_stale_staging()?;
        Ok(Recovery {
            recovered,
            removed,
            stuck,
        })
    }

    /// Cleans up after crac processes that were killed while writing, replacing or removing an
    /// image: removes their hidden working folders, and returns what was removed. A folder
    /// some process works in (CRIU, still dumping after its crac was killed) is left alone, and
    /// so is a complete dump ([`metadata::is_complete_dump`]): that is [`Store::recover`]'s.
    ///
    /// A folder belongs to a process whose PID is in its name; it is left alone while that
    /// process exists (a reused PID keeps it until the next cleanup, which is the safe side). A
    /// replaced image set aside by a process killed before the new one was in place is renamed
    /// back instead of removed.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotWritable`] or [`StoreError::Io`] for the first folder that cannot be
    /// removed.
    pub fn clean_stale_staging(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut removed = Vec::new();
        for (kind, image, path) in self.working_folders()? {
            if pid_alive(folder_pid(&path))
                || in_use(&path)
                || (kind == STAGING && metadata::is_complete_dump(&path))
            {
                continue;
            }
            let home = self.root.join(&image);
            if kind == OLD && fs::symlink_metadata(&home).is_err() {
                fs::rename(&path, &home).map_err(|e| self.write_error("restore", &path, e))?;
                continue;
            }
            match fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(self.write_error("remove", &path, err)),
            }
        }
        Ok(removed)
    }

    /// Fails unless the root (when it exists) and every folder above it can be trusted
    /// ([`crac_fs::check_dir`]): a store another user can write to may hold images they
    /// planted, which a restore would run as root.
    fn trusted(&self) -> Result<(), StoreError> {
        match crac_fs::check_dir(&self.root) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) if crac_fs::is_untrusted(&source) => Err(StoreError::Untrusted {
                root: self.root.clone(),
                source,
            }),
            Err(source) => Err(self.io("open", &self.root, source)),
        }
    }

    /// The hidden working folders: kind, image name and path.
    fn working_folders(&self) -> Result<Vec<(&'static str, String, PathBuf)>, StoreError> {
        self.trusted()?;
        let read = match fs::read_dir(&self.root) {
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(self.io("read", &self.root, source)),
        };
        let mut found = Vec::new();
        for item in read {
            let item = item.map_err(|e| self.io("read", &self.root, e))?;
            let Ok(name) = item.file_name().into_string() else {
                continue;
            };
            if let Some((kind, image, _pid)) = parse_hidden(&name) {
                found.push((kind, image.to_owned(), item.path()));
            }
        }
        Ok(found)
    }

    /// A fresh hidden folder name of this process for `name`.
    fn hidden(&self, kind: &str, name: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.root
            .join(format!(".{kind}-{name}-{}-{nanos}", std::process::id()))
    }

    fn not_found(&self, name: &str) -> StoreError {
        StoreError::NotFound {
            name: name.to_owned(),
            root: self.root.clone(),
        }
    }

    fn io(&self, action: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }

    /// The error of creating the store's root or a folder in it through [`crac_fs`].
    fn create_error(&self, action: &'static str, path: &Path, source: io::Error) -> StoreError {
        if crac_fs::is_untrusted(&source) {
            StoreError::Untrusted {
                root: self.root.clone(),
                source,
            }
        } else {
            self.write_error(action, path, source)
        }
    }

    /// A failed write: permissions and read-only file systems get the advice of
    /// [`StoreError::NotWritable`].
    fn write_error(&self, action: &'static str, path: &Path, source: io::Error) -> StoreError {
        match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => StoreError::NotWritable {
                root: self.root.clone(),
                source,
            },
            _ => self.io(action, path, source),
        }
    }
}

/// What [`Store::recover`] did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The complete images of interrupted checkpoints, now in the store.
    pub recovered: Vec<Recovered>,
    /// The working folders removed (incomplete dumps and imports, set-aside images).
    pub removed: Vec<PathBuf>,
    /// Complete images that could not be finished or filed (a full disk, say), each error
    /// naming its folder; they stay where they are.
    pub stuck: Vec<StoreError>,
}

/// One image [`Store::recover`] filed in the store.
#[derive(Debug)]
pub struct Recovered {
    /// Its name in the store.
    pub name: String,
    /// The process it holds (CRIU stopped it, unless it was dumped with `--leave-running`).
    pub pid: u32,
    /// The working folder it was found in.
    pub from: PathBuf,
}

/// Whether some process works in `dir`: CRIU's working folder is its images folder, and CRIU
/// goes on after the crac that started it was killed.
fn in_use(dir: &Path) -> bool {
    let Ok(procs) = fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|entry| {
        entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            && fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
    })
}

/// `.KIND-NAME-PID-NANOS` → (KIND, NAME, PID), for the kinds the store makes.
fn parse_hidden(folder: &str) -> Option<(&'static str, &str, u32)> {
    let rest = folder.strip_prefix('.')?;
    let (kind, rest) = rest.split_once('-')?;
    let kind = [STAGING, IMPORTING, OLD, REMOVING]
        .into_iter()
        .find(|k| *k == kind)?;
    let mut parts = rest.rsplitn(3, '-');
    let nanos = parts.next()?;
    let pid = parts.next()?;
    let image = parts.next()?;
    nanos.parse::<u128>().ok()?;
    let pid = pid.parse::<u32>().ok()?;
    validate_name(image).ok()?;
    Some((kind, image, pid))
}

/// Whether `path` is the working folder of an import (see [`Store::begin_import`]), as
/// [`Recovery::removed`] lists them: so that a caller can say an interrupted import was
/// removed, not filed.
pub fn is_import_folder(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_hidden)
        .is_some_and(|(kind, _, _)| kind == IMPORTING)
}

fn folder_pid(path: &Path) -> u32 {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_hidden)
        .map_or(0, |(_, _, pid)| pid)
}

/// Whether a process with this PID exists. PID 0 (unparsable) counts as gone.
fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        // EPERM: it exists but belongs to someone else.
        Err(_) => true,
    }
}

/// An image being written. Dropping it without [`Staging::commit`] removes the folder and
/// everything in it, so a failed dump or import leaves nothing in the store.
#[derive(Debug)]
pub struct Staging {
    root: PathBuf,
    name: String,
    path: PathBuf,
    committed: bool,
    /// Flush to disk before the rename (see [`Staging::set_durable`]).
    durable: bool,
}

impl Staging {
    /// The folder to write the image into (give it to `criu dump -D`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name the image will have.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether [`commit`](Self::commit) first flushes every file to disk (`fsync`), so that the
    /// image survives a power loss as soon as it has its name. Off by default, as CRIU itself
    /// does not flush its images: flushing costs time that grows with the image (about 30 ms
    /// per 64 MiB on a virtual disk, BENCHMARKS.md), and a torn image is still caught, by the
    /// size checks of [`metadata::validate`], before a restore.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Moves the image to its name in one rename (flushing it to disk first if
    /// [`set_durable`](Self::set_durable)), and returns its folder.
    ///
    /// With `replace`, an existing image of that name is swapped out atomically (on file
    /// systems without `RENAME_EXCHANGE`, renamed aside first) and removed after, so a crash
    /// leaves the old image or the new one under the name, never neither: a set-aside old
    /// image is put back by [`Store::clean_stale_staging`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Exists`] if the name is taken and `replace` is false; I/O errors as
    /// [`StoreError::NotWritable`] or [`StoreError::Io`]. On error the staging folder is
    /// left as it was: dropping the [`Staging`] removes it, [`Staging::keep`] keeps it (an
    /// image that holds a service CRIU stopped must not be lost to a full disk). Failing to
    /// remove a replaced image is not an error: the new image is in place and the old one is
    /// left in a hidden folder for [`Store::clean_stale_staging`].
    pub fn commit(&mut self, replace: bool) -> Result<PathBuf, StoreError> {
        let store = Store::open(self.root.clone());
        if self.durable {
            sync_tree(&self.path).map_err(|e| store.io("flush", &self.path, e))?;
        }
        let target = self.root.join(&self.name);
        match rename_noreplace(&self.path, &target) {
            Ok(()) => {
                self.committed = true;
                if self.durable {
                    sync_dir(&self.root).map_err(|e| store.io("flush", &self.root, e))?;
                }
                return Ok(target);
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                if !replace {
                    return Err(StoreError::Exists {
                        name: self.name.clone(),
                    });
                }
            }
            Err(err) => return Err(store.write_error("move into place", &self.path, err)),
        }
        match fs::symlink_metadata(&target) {
            Ok(found) if found.is_dir() => {}
            Ok(_) => {
                return Err(store.io(
                    "replace",
                    &target,
                    io::Error::from_raw_os_error(libc::ENOTDIR),
                ))
            }
            Err(source) => return Err(store.io("replace", &target, source)),
        }
        let old = match exchange(&self.path, &target) {
            // The staging path now holds the old image.
            Ok(true) => {
                self.committed = true;
                self.path.clone()
            }
            Ok(false) => {
                let aside = store.hidden(OLD, &self.name);
                fs::rename(&target, &aside)
                    .map_err(|e| store.write_error("replace", &target, e))?;
                if let Err(err) = fs::rename(&self.path, &target) {
                    // Put the old image back; if even that fails, clean_stale_staging will.
                    let _ = fs::rename(&aside, &target);
                    return Err(store.write_error("move into place", &self.path, err));
                }
                self.committed = true;
                aside
            }
            // The old image is in a lower layer of an overlay file system (an image committed
            // into a container image): overlayfs moves no folder of a lower layer. It is
            // removed (whited out) and the new one, all in the upper layer, moved in; a crash
            // between the two leaves the new image in its staging folder, complete, which
            // Store::recover files under its name.
            Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
                fs::remove_dir_all(&target)
                    .map_err(|e| store.write_error("replace", &target, e))?;
                rename_noreplace(&self.path, &target)
                    .map_err(|e| store.write_error("move into place", &self.path, e))?;
                self.committed = true;
                return Ok(target);
            }
            Err(err) => return Err(store.write_error("replace", &target, err)),
        };
        if self.durable {
            sync_dir(&self.root).map_err(|e| store.io("flush", &self.root, e))?;
        }
        let _ = fs::remove_dir_all(&old);
        Ok(target)
    }
}

impl Staging {
    /// Leaves the staging folder where it is, image and all, and returns its path: for an image
    /// that could not be committed but must not be lost. [`Store::recover`] files it later if
    /// it is a complete dump.
    pub fn keep(mut self) -> PathBuf {
        self.committed = true;
        self.path.clone()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Nowhere to report a failure from here; a folder left behind is hidden from
            // `list` and removed by `clean_stale_staging` once this process is gone.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Flushes every file in `dir` and the folder itself: the rename that publishes an image must
/// not reach the disk before the image does.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for item in fs::read_dir(dir)? {
        let item = item?;
        let file_type = item.file_type()?;
        if file_type.is_dir() {
            sync_tree(&item.path())?;
        } else if file_type.is_file() {
            File::open(item.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `renameat2(2)` through `syscall(2)`: libc's wrapper is missing from older glibc and musl.
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both arguments are NUL-terminated strings that live until the call returns; the
    // kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `renameat2` failed because the kernel or file system lacks the flag.
fn unsupported(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

/// Renames `from` to `to` unless `to` exists (`AlreadyExists`). A plain rename would silently
/// replace an empty folder.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Err(err) if unsupported(&err) => {
            // Not atomic: another writer can take the name between the check and the rename.
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            fs::rename(from, to)
        }
        other => other,
    }
}

/// Swaps `a` and `b` atomically; `Ok(false)` if the file system cannot.
fn exchange(a: &Path, b: &Path) -> io::Result<bool> {
    match renameat2(a, b, libc::RENAME_EXCHANGE) {
        Ok(()) => Ok(true),
        Err(err) if unsupported(&err) => Ok(false),
        Err(err) => Err(err),
    }
}

/// The apparent size of everything under `dir`; links are counted, not followed.
/// The bytes of the files under `dir`, folders included (what `crac images du` counts).
///
/// # Errors
///
/// The first error of reading the tree (a file removed meanwhile, say).
pub fn dir_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for item in fs::read_dir(dir)? {
        let item = item?;
        if item.file_type()?.is_dir() {
            total += dir_bytes(&item.path())?;
        } else {
            total += item.metadata()?.len();
        }
    }
    Ok(total)
}

fn mtime_ms(path: &Path) -> u64 {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
