//! Where an agent's socket is: a path derived from the PID alone.
//!
//! `$CRAC_AGENT_DIR/<pid>/agent.sock`, with `CRAC_AGENT_DIR` defaulting to `/tmp/crac`. The
//! base folder is shared by every user (mode 1777, like /tmp itself); each process's folder is
//! its own (mode 0700), so only its uid and root can reach the socket. A client that knows the
//! PID knows the path: no wildcard, no scanning. crac-action reads the service's own
//! `CRAC_AGENT_DIR` from its environment (/proc/PID/environ): a service that sets its folder
//! in code instead ([`Builder::base_dir`](crate::Builder::base_dir)) must have CRIU's
//! environment name the same folder.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::unistd::geteuid;

use crate::StartError;

/// The environment variable that moves the base folder.
pub const DIR_ENV: &str = "CRAC_AGENT_DIR";

/// The base folder when [`DIR_ENV`] is not set.
pub const DEFAULT_DIR: &str = "/tmp/crac";

/// The socket's file name inside the process's folder.
pub const SOCKET_NAME: &str = "agent.sock";

/// The base folder: `$CRAC_AGENT_DIR`, or [`DEFAULT_DIR`].
pub fn base_dir() -> PathBuf {
    match std::env::var_os(DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_DIR),
    }
}

/// The folder of process `pid`'s agent.
pub fn agent_dir(pid: u32) -> PathBuf {
    base_dir().join(pid.to_string())
}

/// The socket of process `pid`'s agent.
///
/// ```
/// std::env::remove_var("CRAC_AGENT_DIR");
/// assert_eq!(crac_agent::socket_path(42), std::path::Path::new("/tmp/crac/42/agent.sock"));
/// ```
pub fn socket_path(pid: u32) -> PathBuf {
    agent_dir(pid).join(SOCKET_NAME)
}

/// Creates (or checks) the base folder and this process's folder, and clears a stale socket.
/// Returns the folder and the socket path.
pub(crate) fn prepare(base: &Path, pid: u32) -> Result<(PathBuf, PathBuf), StartError> {
    let own_uid = geteuid().as_raw();
    prepare_base(base, own_uid)?;
    sweep_stale(base, own_uid, pid);
    let dir = base.join(pid.to_string());
    match DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            // Left by an earlier process with this PID (killed, or dumped and now restored).
            let meta =
                fs::symlink_metadata(&dir).map_err(|e| StartError::io("inspect", &dir, e))?;
            if !meta.file_type().is_dir() || meta.uid() != own_uid {
                return Err(StartError::UnsafeDir {
                    path: dir,
                    reason: format!(
                        "it is not a folder owned by uid {own_uid} (left by another user?); remove it"
                    ),
                });
            }
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| StartError::io("set permissions of", &dir, e))?;
        }
        Err(err) => return Err(StartError::io("create", &dir, err)),
    }
    let socket = dir.join(SOCKET_NAME);
    clear_stale(&socket)?;
    Ok((dir, socket))
}

fn prepare_base(base: &Path, own_uid: u32) -> Result<(), StartError> {
    match fs::symlink_metadata(base) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = base.parent() {
                fs::create_dir_all(parent).map_err(|e| StartError::io("create", parent, e))?;
            }
            match DirBuilder::new().mode(0o700).create(base) {
                // Shared by every user, like /tmp: sticky, so nobody removes another's folder.
                // Set after creation because the umask trims the mode given to mkdir.
                Ok(()) => fs::set_permissions(base, fs::Permissions::from_mode(0o1777))
                    .map_err(|e| StartError::io("set permissions of", base, e)),
                // Someone else created it in between: check theirs.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    prepare_base(base, own_uid)
                }
                Err(err) => Err(StartError::io("create", base, err)),
            }
        }
        Err(err) => Err(StartError::io("inspect", base, err)),
        Ok(meta) => {
            if !meta.file_type().is_dir() {
                return Err(StartError::UnsafeDir {
                    path: base.to_owned(),
                    reason: "it is not a folder (a symbolic link is not accepted either)".into(),
                });
            }
            let owner = meta.uid();
            let others_write = meta.mode() & 0o002 != 0;
            let sticky = meta.mode() & 0o1000 != 0;
            if owner != 0 && owner != own_uid {
                return Err(StartError::UnsafeDir {
                    path: base.to_owned(),
                    reason: format!(
                        "it belongs to uid {owner}, who could replace the agent folders in it; \
                         remove it, or set {DIR_ENV} to a folder of your own"
                    ),
                });
            }
            if others_write && !sticky {
                return Err(StartError::UnsafeDir {
                    path: base.to_owned(),
                    reason: "anyone may write to it but it is not sticky (chmod 1777 it)".into(),
                });
            }
            Ok(())
        }
    }
}

/// Removes the folders that processes of this uid left when they were killed (a killed process
/// cannot clean up). Only folders untouched for a minute are swept, so a folder that a restore
/// has just recreated for a process not yet running is left alone; an image restored later
/// gets its folder back from crac-action's pre-restore step.
fn sweep_stale(base: &Path, own_uid: u32, own_pid: u32) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let a_minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
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
            || Path::new(&format!("/proc/{pid}")).exists()
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
