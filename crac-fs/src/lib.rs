//! Private files and folders: the one place crac-rs creates them, and the one place that
//! decides whether an existing one may be trusted.
//!
//! A checkpoint image is a service's memory (its keys, tokens and passwords), and a restore
//! runs that memory with the credentials the image names, usually root's. So everything crac
//! writes is private, and nothing another local user made is ever reused. The rules, each
//! enforced here rather than at every call site:
//!
//! - **Private whatever the umask.** Folders are 0700 and files 0600: the mode is set with
//!   `fchmod` on the open descriptor after creation, so neither umask 000 nor umask 077 changes
//!   the outcome.
//! - **No links followed.** The last component is opened with `O_NOFOLLOW` (a symbolic link
//!   planted where crac is about to write is refused, not written through), and a file is
//!   created with `O_EXCL`.
//! - **Never reusing what someone else made.** An existing folder or file is accepted only if
//!   it belongs to the caller's own uid (root's folders too when the caller is root) and no
//!   other user can write to it; otherwise the error says who owns it and what to do.
//! - **A trusted path.** Each folder on the way must belong to root or the caller, and be
//!   writable by nobody else unless it is sticky (`/tmp`): then no other user can rename or
//!   replace what the caller made inside it, so a check made once still holds when the path is
//!   used.
//! - **Scratch places have unguessable names** ([`TempDir`], `mkdtemp`).
//! - **Only regular files are read**, and only up to a bound ([`open_regular`],
//!   [`read_bounded`]): a FIFO or `/dev/zero` named by an image cannot hang or exhaust crac.
//!   A file of secret keys is read only if no other user may read it ([`read_private`]).
//!
//! Errors are [`io::Error`]s, so callers keep their own error types: a refusal is
//! `PermissionDenied` with a message that names the path and the reason ([`is_untrusted`] tells
//! it from the system's own `EACCES`); the system's errors are passed on as they are, for the
//! caller to name the path it asked for.
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::unistd::geteuid;

/// The mode of every folder crac creates.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file crac creates.
pub const FILE_MODE: u32 = 0o600;

/// Why a path cannot be trusted: the payload of the `PermissionDenied` errors this crate
/// makes, told apart from the system's own by [`is_untrusted`].
#[derive(Debug)]
struct Untrusted(String);

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Untrusted {}

fn untrusted(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        Untrusted(format!("{} cannot be trusted: {why}", path.display())),
    )
}

/// Whether `err` is this crate's refusal of a path it cannot trust (another user's, a link,
/// writable by others), rather than an error of the system (such as `EACCES`).
pub fn is_untrusted(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|inner| inner.is::<Untrusted>())
}

/// Whether `uid` may own something the caller trusts: root, or the caller's own uid.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == geteuid().as_raw()
}

fn who(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

/// Why a folder that may be someone else's cannot be trusted to hold what crac or an agent puts
/// in it ([`trusted_folder`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distrust {
    /// It is not a folder: what it is instead (`"a symbolic link"`, never followed, or
    /// `"a file"`).
    NotAFolder(&'static str),
    /// It belongs to this uid, neither root nor the one it must belong to.
    Owner(u32),
    /// Other users (its group or anyone) may write to it, and it is not sticky: its mode.
    Writable(u32),
}

/// The one rule for a folder that holds private folders, wherever it is checked (crac's paths,
/// an agent's base, pre-restore's check of a base before it recreates an agent's folder): a
/// folder, not a link, of root's or of `uid`'s, that no other user may write to unless it is
/// sticky (`/tmp`, `/tmp/crac`): then nobody else can rename or replace what is made in it.
///
/// # Errors
///
/// Why it cannot be trusted.
pub fn trusted_folder(meta: &fs::Metadata, uid: u32) -> Result<(), Distrust> {
    if !meta.is_dir() {
        return Err(Distrust::NotAFolder(if meta.file_type().is_symlink() {
            "a symbolic link"
        } else {
            "a file"
        }));
    }
    if meta.uid() != 0 && meta.uid() != uid {
        return Err(Distrust::Owner(meta.uid()));
    }
    if others_can_write(meta) && meta.mode() & 0o1000 == 0 {
        return Err(Distrust::Writable(meta.mode() & 0o7777));
    }
    Ok(())
}

/// Checks every folder above `path` (not `path` itself): each belongs to root or the caller,
/// and no other user can write to it unless it is sticky. A symbolic link on the way is
/// accepted only when root or the caller owns it (`/var/run` -> `/run`).
///
/// # Errors
///
/// `PermissionDenied` naming the first folder that fails, and why.
pub fn check_ancestors(path: &Path) -> io::Result<()> {
    let absolute = absolute(path)?;
    let mut prefix = PathBuf::new();
    let mut components = absolute.components().peekable();
    while let Some(component) = components.next() {
        prefix.push(component);
        if components.peek().is_none() {
            break;
        }
        let meta = match fs::symlink_metadata(&prefix) {
            Ok(meta) => meta,
            // Missing folders are made by the caller, privately.
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        };
        let belongs = |uid: u32| {
            untrusted(
                &prefix,
                format!(
                    "it belongs to {}, who could replace what crac puts under it",
                    who(uid)
                ),
            )
        };
        if meta.file_type().is_symlink() {
            if !trusted_owner(meta.uid()) {
                return Err(belongs(meta.uid()));
            }
            // Owned by root or the caller, in a folder checked above: follow it, and check
            // what it leads to as well.
            let target = fs::metadata(&prefix)?;
            if !trusted_owner(target.uid()) || others_can_write(&target) {
                return Err(untrusted(
                    &prefix,
                    "it is a link to a folder that another user owns or may write to",
                ));
            }
            continue;
        }
        match trusted_folder(&meta, geteuid().as_raw()) {
            Ok(()) => {}
            Err(Distrust::Owner(uid)) => return Err(belongs(uid)),
            Err(Distrust::Writable(mode)) => {
                return Err(untrusted(
                    &prefix,
                    format!("other users may write to it (mode {mode:o}) and it is not sticky"),
                ))
            }
            // A file on the way: nothing can be made under it, and the system says so when
            // the path is used (`ENOTDIR`), as for any error of its own.
            Err(Distrust::NotAFolder(_)) => return Ok(()),
        }
    }
    Ok(())
}

fn others_can_write(meta: &fs::Metadata) -> bool {
    meta.mode() & 0o022 != 0
}

fn absolute(path: &Path) -> io::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}

/// Opens the folder `path` itself, refusing a symbolic link or anything that is not a folder.
fn open_dir_nofollow(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => untrusted(path, "it is a symbolic link"),
            // With O_DIRECTORY, Linux says ENOTDIR for a link too.
            Some(libc::ENOTDIR) => match fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    untrusted(path, "it is a symbolic link")
                }
                _ => untrusted(path, "it is not a folder"),
            },
            _ => err,
        })
}

/// Opens a folder this process has just made. Under umask 0777 `mkdir` gives it mode 000,
/// which only root could open: a folder of the caller's own that it cannot open is given its
/// owner's access first (nobody else can have swapped it since: the folders above it were
/// checked, and are writable by nobody else or sticky).
fn open_made_dir(path: &Path) -> io::Result<File> {
    match open_dir_nofollow(path) {
        Err(err) if err.raw_os_error() == Some(libc::EACCES) => {
            let meta = fs::symlink_metadata(path)?;
            if !meta.is_dir() || meta.uid() != geteuid().as_raw() {
                return Err(err);
            }
            fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))?;
            open_dir_nofollow(path)
        }
        other => other,
    }
}

/// Makes the folder `path` (its parent must exist) and opens it, with mode `mode` set on the
/// open folder: neither the umask nor a link swapped in after `mkdir` changes what gets it.
fn make_dir(path: &Path, mode: u32) -> io::Result<File> {
    nix::unistd::mkdir(path, nix::sys::stat::Mode::from_bits_truncate(DIR_MODE))
        .map_err(io::Error::from)?;
    let dir = open_made_dir(path)?;
    dir.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(dir)
}

/// Checks that the open folder (or file) `file` at `path` is the caller's own and private,
/// tightening the mode of one that is the caller's but readable by others (made by an older
/// crac, or by hand).
fn check_own(file: &File, path: &Path, private_mode: u32) -> io::Result<()> {
    let meta = file.metadata()?;
    let own = geteuid().as_raw();
    if meta.uid() != own {
        return Err(untrusted(
            path,
            format!(
                "it belongs to {}, not to {} who runs crac; remove it (another user may have \
                 made it to read or replace what crac writes there)",
                who(meta.uid()),
                who(own)
            ),
        ));
    }
    refuse_others_writable(path, &meta, private_mode)?;
    if meta.mode() & 0o7777 != private_mode {
        file.set_permissions(fs::Permissions::from_mode(private_mode))?;
    }
    Ok(())
}

/// Refuses a folder (or file) other users may write to: anything in it may have been planted.
fn refuse_others_writable(path: &Path, meta: &fs::Metadata, private_mode: u32) -> io::Result<()> {
    if !others_can_write(meta) {
        return Ok(());
    }
    Err(untrusted(
        path,
        format!(
            "other users may write to it (mode {:o}), so anything in it may have been \
             planted; check it, then chmod {:o} it",
            meta.mode() & 0o7777,
            private_mode
        ),
    ))
}

/// Creates the folder `path`, mode 0700; it must not exist. Its parent must exist.
///
/// # Errors
///
/// `AlreadyExists` when something is at `path` already, `PermissionDenied` when a folder above
/// is not trusted ([`check_ancestors`]), and the errors of `mkdir`.
pub fn create_dir(path: &Path) -> io::Result<()> {
    check_ancestors(path)?;
    make_dir(path, DIR_MODE).map(drop)
}

/// Makes sure the folder `path` exists and is the caller's own private folder: creates it
/// (mode 0700, and any missing folder above it too) or accepts an existing one only if it
/// belongs to the caller, is not a symbolic link, and no other user may write to it (a
/// folder of the caller's that others may read is tightened to 0700).
///
/// # Errors
///
/// `PermissionDenied` with the reason when the folder, or one above it, cannot be trusted;
/// the errors of creating it otherwise.
///
/// # Examples
///
/// ```
/// # let base = std::env::temp_dir().join(format!("crac-fs-doc-{}", std::process::id()));
/// let dir = base.join("a/b");
/// crac_fs::ensure_dir(&dir)?;
/// crac_fs::ensure_dir(&dir)?; // an existing folder of our own is fine
/// use std::os::unix::fs::PermissionsExt;
/// assert_eq!(std::fs::metadata(&dir)?.permissions().mode() & 0o777, 0o700);
/// # std::fs::remove_dir_all(&base)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn ensure_dir(path: &Path) -> io::Result<()> {
    check_ancestors(path)?;
    let absolute = absolute(path)?;
    let mut prefix = PathBuf::new();
    for component in absolute.components() {
        prefix.push(component);
        if matches!(component, Component::RootDir | Component::Prefix(_)) {
            continue;
        }
        let last = prefix == absolute;
        match make_dir(&prefix, DIR_MODE) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && last => {
                let dir = open_dir_nofollow(&prefix)?;
                check_own(&dir, &prefix, DIR_MODE)?;
            }
            // An existing folder above: check_ancestors vouched for it.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Checks that an existing folder may be trusted as the caller's: a real folder (not a link),
/// owned by root or the caller, that no other user may write to, below trusted folders. It is
/// not changed.
///
/// # Errors
///
/// `PermissionDenied` with the reason, or the error of looking.
pub fn check_dir(path: &Path) -> io::Result<()> {
    check_ancestors(path)?;
    let dir = open_dir_nofollow(path)?;
    let meta = dir.metadata()?;
    if !trusted_owner(meta.uid()) {
        return Err(untrusted(
            path,
            format!("it belongs to {}", who(meta.uid())),
        ));
    }
    refuse_others_writable(path, &meta, DIR_MODE)
}

/// Creates the file `path` for writing, mode 0600; it must not exist (`O_EXCL`), and a
/// symbolic link there is not followed.
///
/// # Errors
///
/// `AlreadyExists` when anything is at `path`, `PermissionDenied` when a folder above is not
/// trusted, and the errors of `open`.
pub fn create_file(path: &Path) -> io::Result<File> {
    check_ancestors(path)?;
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Opens the file `path` for appending, creating it (mode 0600) if missing: for logs. An
/// existing file is accepted only if it is a regular file of the caller's with no other
/// name (no hard link to a file elsewhere), that no other user may write to; its mode is
/// tightened to 0600.
///
/// # Errors
///
/// `PermissionDenied` with the reason when the file or a folder above cannot be trusted;
/// the errors of `open` otherwise.
pub fn open_append(path: &Path) -> io::Result<File> {
    check_ancestors(path)?;
    let file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|err| explain_refused_open(path, err))?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(untrusted(path, "it is not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(untrusted(
            path,
            "it has other names (a hard link to a file elsewhere); remove it",
        ));
    }
    check_own(&file, path, FILE_MODE)?;
    clear_nonblock(&file)?;
    Ok(file)
}

/// The reason behind a refused `open` of an existing path: `O_NOFOLLOW` says `ELOOP` for a
/// link, but with `O_CREAT` in a sticky folder the kernel says `EACCES` for another user's
/// link or file first.
fn explain_refused_open(path: &Path, err: io::Error) -> io::Error {
    if !matches!(err.raw_os_error(), Some(libc::ELOOP | libc::EACCES)) {
        return err;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => untrusted(path, "it is a symbolic link"),
        Ok(meta) if meta.uid() != geteuid().as_raw() => untrusted(
            path,
            format!("it belongs to {}; remove it", who(meta.uid())),
        ),
        _ => err,
    }
}

/// Writes `bytes` to `path` in one step: into a new private file beside it, then renamed over
/// it, so a reader sees the old content or the new, and a link at `path` is replaced, not
/// followed. Atomic, not durable: nothing is flushed to disk (a caller that needs that, such
/// as the image store's `--sync`, flushes the whole folder once).
///
/// # Errors
///
/// The errors of [`create_file`], of writing, and of `rename`; nothing is left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (mut file, temp) = create_temp_beside(path)?;
    let result = file.write_all(bytes).and_then(|()| fs::rename(&temp, path));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Creates a new private file ([`create_file`]) beside `target`, under a hidden name nobody can
/// guess (`.NAME.tmp-PID-RANDOM`), for content that is renamed over `target` once complete.
/// Returns the file and its path; removing it on failure is the caller's.
///
/// # Errors
///
/// `InvalidInput` when `target` names no file, and the errors of [`create_file`].
pub fn create_temp_beside(target: &Path) -> io::Result<(File, PathBuf)> {
    let name = target.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file")
    })?;
    let parent = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp-{}-{:x}", std::process::id(), random_u64()));
    let temp = parent.join(temp_name);
    Ok((create_file(&temp)?, temp))
}

/// Takes away every other user's access to the tree at `dir`: folders become 0700, files keep
/// only their owner's bits. For trees another program wrote with its own modes (CRIU writes
/// its image files 0644). Links are not followed, and left as they are.
///
/// # Errors
///
/// The first error of reading or changing the tree.
pub fn tighten_tree(dir: &Path) -> io::Result<()> {
    let top = open_dir_nofollow(dir)?;
    top.set_permissions(fs::Permissions::from_mode(DIR_MODE))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let path = entry.path();
        if meta.file_type().is_dir() {
            tighten_tree(&path)?;
        } else if meta.file_type().is_file() && meta.mode() & 0o077 != 0 {
            // The folder is already private, so nobody can swap this entry for a link now.
            fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() & 0o700))?;
        }
    }
    Ok(())
}

/// Opens `path` for reading only if it is a regular file (links are followed: image metadata
/// names files by their real paths, and a link to a regular file is still one). A FIFO, a
/// device or a folder is refused before anything is read from it, and opening never blocks.
///
/// # Errors
///
/// `InvalidInput` naming what the path is when it is not a regular file; the errors of
/// `open` otherwise.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let before = fs::metadata(path)?;
    refuse_irregular(path, &before)?;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    // Swapped between the two looks? The open file is what counts.
    refuse_irregular(path, &file.metadata()?)?;
    clear_nonblock(&file)?;
    Ok(file)
}

fn refuse_irregular(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(());
    }
    let what = if kind.is_dir() {
        "a folder"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is {what}, not a regular file: crac reads only regular files",
            path.display()
        ),
    ))
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Reads a regular file ([`open_regular`]) of at most `limit` bytes.
///
/// # Errors
///
/// `InvalidData` when the file holds more than `limit` bytes (nothing past the limit is
/// read), and the errors of [`open_regular`] and of reading.
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    read_to_limit(open_regular(path)?, path, limit)
}

/// Reads a file that holds secrets (a secret key), as [`read_bounded`] does, but only if it
/// belongs to the caller (or root) and no other user may read or write it (no group or other
/// permission bits, as ssh asks of private keys). Checked on the open file, so a file swapped
/// after the check is not read.
///
/// # Errors
///
/// `PermissionDenied` saying who owns it or what its mode is, and what to do; the errors of
/// [`read_bounded`] otherwise.
pub fn read_private(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let meta = file.metadata()?;
    if !trusted_owner(meta.uid()) {
        return Err(untrusted(
            path,
            format!(
                "it holds secret keys but belongs to {}, not to {} who runs crac; use a key \
                 file of your own",
                who(meta.uid()),
                who(geteuid().as_raw())
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} holds secret keys but other users may read it (mode {:o}): chmod 600 it, \
                 and replace the keys if someone else may have read them",
                path.display(),
                meta.mode() & 0o7777
            ),
        ));
    }
    read_to_limit(file, path, limit)
}

fn read_to_limit(file: File, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is larger than {limit} bytes, more than crac accepts for it",
                path.display()
            ),
        ));
    }
    Ok(bytes)
}

/// Reads a file crac wrote earlier and now relies on (a cache that lets it skip work, a
/// record it acts upon), only if it can still be trusted: its folder passes [`check_dir`], and
/// the file itself is a regular file, not a link, of the caller's own, that no other user may
/// write to, of at most `limit` bytes.
///
/// # Errors
///
/// `PermissionDenied` ([`is_untrusted`]) with the reason, `InvalidData` past the limit, and
/// the errors of opening and reading.
pub fn read_trusted(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        check_dir(dir)?;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| explain_refused_open(path, err))?;
    let meta = file.metadata()?;
    refuse_irregular(path, &meta)?;
    let own = geteuid().as_raw();
    if meta.uid() != own {
        return Err(untrusted(
            path,
            format!("it belongs to {}, not to {}", who(meta.uid()), who(own)),
        ));
    }
    if others_can_write(&meta) {
        return Err(untrusted(
            path,
            format!(
                "other users may write to it (mode {:o})",
                meta.mode() & 0o7777
            ),
        ));
    }
    clear_nonblock(&file)?;
    read_to_limit(file, path, limit)
}

/// A private scratch folder with an unguessable name (`mkdtemp`, mode 0700), removed with its
/// contents when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: Option<PathBuf>,
}

impl TempDir {
    /// Makes a new folder `PREFIX.XXXXXX` in `parent` (which must be trusted, like `/tmp`).
    ///
    /// # Errors
    ///
    /// `PermissionDenied` when `parent` cannot be trusted, and the errors of `mkdtemp`.
    pub fn new_in(parent: &Path, prefix: &str) -> io::Result<TempDir> {
        let template = parent.join(format!("{prefix}.XXXXXX"));
        check_ancestors(&template)?;
        let path = nix::unistd::mkdtemp(&template).map_err(io::Error::from)?;
        // mkdtemp makes it 0700 regardless of the umask; make sure of it.
        let dir = open_made_dir(&path)?;
        check_own(&dir, &path, DIR_MODE)?;
        Ok(TempDir { path: Some(path) })
    }

    /// Makes a new folder `PREFIX.XXXXXX` in the system's temporary folder (`$TMPDIR` or
    /// `/tmp`).
    ///
    /// # Errors
    ///
    /// As [`TempDir::new_in`].
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        TempDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("a TempDir has its path until dropped or kept")
    }

    /// Keeps the folder: it is no longer removed on drop.
    pub fn keep(mut self) -> PathBuf {
        self.path.take().expect("a TempDir has its path until kept")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// 64 bits from the kernel's random source, for names that must not be guessed.
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never on Linux >= 3.17 with 8 bytes; a name that is unique if not secret still works
        // here, since the file is created with O_EXCL.
        let nanos = std::time::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.as_nanos() as u64);
        return u64::from(std::process::id()) ^ nanos;
    }
    u64::from_ne_bytes(bytes)
}

/// Creates the folder `path` shared by every user like `/tmp` itself: mode 1777 (sticky: no
/// user can rename or remove what another made in it), owned by the caller. It must not exist;
/// its parent must. The mode is set on the open folder (`O_NOFOLLOW`), so neither the umask nor
/// a link swapped in after `mkdir` changes what gets it. For the fallback base of the agents'
/// folders, `/tmp/crac`.
///
/// # Errors
///
/// `AlreadyExists` when something is at `path`, `PermissionDenied` when a folder above is not
/// trusted, and the errors of `mkdir`.
pub fn create_shared_dir(path: &Path) -> io::Result<()> {
    check_ancestors(path)?;
    make_dir(path, 0o1777).map(drop)
}

/// Creates the folder `path`, mode 0700, for the user `uid` (group `gid`): root making a
/// service's own folder. It must not exist; its parent must. Owner and mode are set on the
/// open folder (`O_NOFOLLOW`), never through a link swapped in after `mkdir`. The folders
/// above are the caller's to check: which owners it trusts there depends on for whom it is.
///
/// # Errors
///
/// `AlreadyExists` when something is at `path`, and the errors of `mkdir` and `fchown`.
pub fn create_dir_for(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let dir = make_dir(path, DIR_MODE)?;
    std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))
}

/// Moves whatever is at `path` (a folder, a file or a link, whoever made it) out of the way, to
/// `<path>.foreign-<16 random hex digits>` beside it, without following a link and without
/// replacing anything. Returns the new path. In a sticky folder only root (or the entry's
/// owner) may do this; others get `PermissionDenied`.
///
/// # Errors
///
/// The errors of `renameat2(RENAME_NOREPLACE)`.
pub fn move_aside(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name to move"))?;
    let mut aside = name.to_owned();
    aside.push(format!(".foreign-{:016x}", random_u64()));
    let aside = path.with_file_name(aside);
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::AT_FDCWD,
        &aside,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(io::Error::from)?;
    Ok(aside)
}

#[cfg(test)]
mod tests;
