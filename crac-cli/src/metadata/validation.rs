//! Validation: whether an image's files are all there, each with the size it had when the dump
//! finished, on this CPU architecture ([`validate`]); every problem found at once
//! ([`ValidateError`], [`Problem`]).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::Metadata;

/// The CRIU image file that every dump writes; without it CRIU cannot restore anything.
const INVENTORY: &str = "inventory.img";

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
    /// A file the process had open for writing (or mapped shared and writable) changed
    /// since the checkpoint ([`WrittenFile`](super::WrittenFile)).
    WrittenFileChanged {
        /// The file's path.
        path: PathBuf,
        /// How it differs.
        how: &'static str,
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
                crate::error::why(source)
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
            Problem::WrittenFileChanged { path, how } => write!(
                f,
                "the file {} changed since the checkpoint ({how}): the process had it open for \
                 writing; restoring would resume it against a newer file",
                path.display()
            ),
            Problem::ExecutableUnreadable { path, source } => write!(
                f,
                "cannot read {} ({})",
                path.display(),
                crate::error::why(source)
            ),
        }
    }
}

/// Everything [`validate`] found wrong with an image, all at once.
#[derive(Debug)]
pub struct ValidateError {
    pub(super) dir: PathBuf,
    pub(super) problems: Vec<Problem>,
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
        let written = |p: &Problem| matches!(p, Problem::WrittenFileChanged { .. });
        if self
            .problems
            .iter()
            .any(|p| !matches!(p, Problem::ForeignArch { .. }) && !executable(p) && !written(p))
        {
            hints.push("the image is damaged: make it again with `crac checkpoint`");
        }
        if self.problems.iter().any(executable) {
            hints.push(
                "a restore maps the executable and the libraries from their paths: put back the files the service ran with, or checkpoint the service again",
            );
        }
        if self.problems.iter().any(written) {
            hints.push(
                "restore an image made since the file last changed, or start the service cold; if the service copes with a newer file (it reopens and rereads it in after_restore), allow each with --allow-changed PATH",
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
