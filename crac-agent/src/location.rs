//! Making an agent's folders: the base folder and the process's own, where
//! [`crac_protocol::location`] says they are, through crac-fs. Another user's entry at
//! `<base>/<pid>` is moved aside when the agent may, else the agent makes a folder of its
//! own beside it (see [`crac_protocol::location`] for the rules). And binding the socket in
//! it ([`listen`]).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crac_protocol::location::{
    parse_folder_name, private_prefix, DIR_ENV, FALLBACK_DIR, SOCKET_NAME,
};
use nix::unistd::geteuid;

use crate::error::StartError;
use crate::procfs;

/// Where [`prepare`] put the agent.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The base folder used: the one asked for, or a private one when the shared fallback
    /// could not be trusted.
    pub(crate) base: PathBuf,
    /// Whether `base` is such a private base (removed with the folder at exit).
    pub(crate) private_base: bool,
    /// The process's folder.
    pub(crate) dir: PathBuf,
    /// The socket's path in it.
    pub(crate) socket: PathBuf,
    /// Where another user's entry at `<base>/<pid>` was moved, if one was.
    pub(crate) moved_aside: Option<PathBuf>,
}

/// Creates (or checks) the base folder and this process's folder, and clears a stale socket.
/// `chosen`: the base is the one [`base_dir`] chose, not one the service named; then a shared
/// fallback base that cannot be trusted (another user made `/tmp/crac`) is not fatal: the
/// agent makes a private base of its own beside it, `/tmp/crac-<uid>.XXXXXX` (`mkdtemp`,
/// 0700), removed at exit.
pub(crate) fn prepare(base: &Path, pid: u32, chosen: bool) -> Result<Prepared, StartError> {
    let own_uid = geteuid().as_raw();
    let (base, private_base) = match prepare_base(base, own_uid) {
        Ok(()) => (base.to_owned(), false),
        Err(StartError::UnsafeDir { .. }) if chosen && base == Path::new(FALLBACK_DIR) => {
            let parent = base.parent().unwrap_or(Path::new("/"));
            let private = crac_fs::TempDir::new_in(parent, &private_prefix(own_uid))
                .map(crac_fs::TempDir::keep)
                .map_err(|e| StartError::io("create a folder in", parent, e))?;
            (private, true)
        }
        Err(err) => return Err(err),
    };
    let base = base.as_path();
    sweep_stale(base, own_uid, pid);
    let dir = base.join(pid.to_string());
    let mut moved_aside = None;
    let dir = match own_folder(&dir, own_uid)? {
        Some(()) => dir,
        None => {
            // Another user's entry: out of the way if we may, else a folder of our own beside.
            match crac_fs::move_aside(&dir) {
                Ok(aside) => {
                    moved_aside = Some(aside);
                    match own_folder(&dir, own_uid)? {
                        Some(()) => dir,
                        // Made again at once: a racing user.
                        None => alternative(base, pid)?,
                    }
                }
                Err(_) => alternative(base, pid)?,
            }
        }
    };
    let socket = dir.join(SOCKET_NAME);
    clear_stale(&socket)?;
    Ok(Prepared {
        base: base.to_owned(),
        private_base,
        dir,
        socket,
        moved_aside,
    })
}

/// Makes this process's folder `dir` again (a /tmp cleaner removed it): the same path as
/// before, never another. Returns the socket's path.
pub(crate) fn prepare_again(
    base: &Path,
    private_base: bool,
    dir: &Path,
) -> Result<PathBuf, StartError> {
    let own_uid = geteuid().as_raw();
    if private_base {
        crac_fs::ensure_dir(base).map_err(|e| StartError::UnsafeDir {
            path: base.to_owned(),
            reason: e.to_string(),
        })?;
    } else {
        prepare_base(base, own_uid)?;
    }
    if own_folder(dir, own_uid)?.is_none() {
        return Err(StartError::UnsafeDir {
            path: dir.to_owned(),
            reason: format!("it is not a folder owned by uid {own_uid} (left by another user?)"),
        });
    }
    let socket = dir.join(SOCKET_NAME);
    clear_stale(&socket)?;
    Ok(socket)
}

/// Makes `dir` (mode 0700), or accepts it if it is a folder of `own_uid`'s (left by an earlier
/// process with this pid: killed, or dumped and now restored). `None` when something else is
/// there.
fn own_folder(dir: &Path, own_uid: u32) -> Result<Option<()>, StartError> {
    match crac_fs::create_dir(dir) {
        Ok(()) => Ok(Some(())),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(dir).map_err(|e| StartError::io("inspect", dir, e))?;
            if !meta.file_type().is_dir() || meta.uid() != own_uid {
                return Ok(None);
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| StartError::io("set permissions of", dir, e))?;
            Ok(Some(()))
        }
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => Err(StartError::UnsafeDir {
            path: dir.to_owned(),
            reason: err.to_string(),
        }),
        Err(err) => Err(StartError::io("create", dir, err)),
    }
}

/// A folder of this process's own with an unguessable name, `<pid>.XXXXXX`, in `base`: kept
/// for the life of the process (removed at exit, like the usual folder). Also where an agent
/// moves when a copy restored from the same image took its path (`Server::check_socket`).
pub(crate) fn alternative(base: &Path, pid: u32) -> Result<PathBuf, StartError> {
    crac_fs::TempDir::new_in(base, &pid.to_string())
        .map(crac_fs::TempDir::keep)
        .map_err(|e| StartError::io("create a folder in", base, e))
}

fn prepare_base(base: &Path, own_uid: u32) -> Result<(), StartError> {
    match fs::symlink_metadata(base) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let parent = base.parent().unwrap_or(Path::new("/"));
            // A base in a folder everyone may write to (/tmp) is shared like it; elsewhere
            // (/run, the user's runtime folder) nobody else could use it: private.
            let shared = fs::metadata(parent).is_ok_and(|m| m.mode() & 0o1002 == 0o1002);
            let made = if shared {
                crac_fs::create_shared_dir(base)
            } else {
                crac_fs::ensure_dir(base)
            };
            match made {
                Ok(()) => Ok(()),
                // Someone else created it in between: check theirs.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    prepare_base(base, own_uid)
                }
                Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                    Err(StartError::UnsafeDir {
                        path: base.to_owned(),
                        reason: err.to_string(),
                    })
                }
                Err(err) => Err(StartError::io("create", base, err)),
            }
        }
        Err(err) => Err(StartError::io("inspect", base, err)),
        Ok(meta) => crac_fs::trusted_folder(&meta, own_uid).map_err(|why| StartError::UnsafeDir {
            path: base.to_owned(),
            reason: match why {
                crac_fs::Distrust::NotAFolder(what) => {
                    format!("it is {what}, not a folder (a symbolic link is not followed)")
                }
                crac_fs::Distrust::Owner(owner) => format!(
                    "it belongs to uid {owner}, who could replace the agent folders in it; \
                     remove it, or set {DIR_ENV} to a folder of your own"
                ),
                crac_fs::Distrust::Writable(mode) => format!(
                    "other users may write to it (mode {mode:o}) but it is not sticky \
                     (chmod 1777 it, or 0755)"
                ),
            },
        }),
    }
}

/// Removes the folders that processes of this uid left when they were killed (a killed process
/// cannot clean up): usual ones and alternative ones. Only folders untouched for a minute are
/// swept, so a folder that a restore has just recreated for a process not yet running is left
/// alone; an image restored later gets its folder back from crac-action's pre-restore step.
fn sweep_stale(base: &Path, own_uid: u32, own_pid: u32) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let a_minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    for entry in entries.flatten() {
        let Some((pid, _)) = entry.file_name().to_str().and_then(parse_folder_name) else {
            continue;
        };
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        let old = meta.modified().is_ok_and(|t| t < a_minute_ago);
        if pid == own_pid
            || !meta.file_type().is_dir()
            || meta.uid() != own_uid
            || !old
            || procfs::runs(pid)
        {
            continue;
        }
        // The whole folder: the socket, and whatever else was left for that process (the
        // markers crac-action's post-dump leaves for its watcher). It is ours, and its
        // process is gone.
        let _ = fs::remove_dir_all(entry.path());
    }
}

/// A socket file with no listener behind it is left over from a dead process: remove it. One
/// that answers belongs to a live agent (another PID namespace sharing the folder?): refuse.
fn clear_stale(socket: &Path) -> Result<(), StartError> {
    match fs::symlink_metadata(socket) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(StartError::io("inspect", socket, err)),
        Ok(_) => match UnixStream::connect(socket) {
            Ok(_) => Err(StartError::InUse {
                path: socket.to_owned(),
            }),
            Err(_) => {
                fs::remove_file(socket).map_err(|e| StartError::io("remove stale", socket, e))
            }
        },
    }
}

/// Binds the agent's socket at `socket`, readable and writable by its owner only.
pub(crate) fn listen(socket: &Path) -> Result<UnixListener, StartError> {
    let listener =
        UnixListener::bind(socket).map_err(|e| StartError::io("listen on", socket, e))?;
    if let Err(err) = fs::set_permissions(socket, fs::Permissions::from_mode(0o600)) {
        let _ = fs::remove_file(socket);
        return Err(StartError::io("set permissions of", socket, err));
    }
    Ok(listener)
}
