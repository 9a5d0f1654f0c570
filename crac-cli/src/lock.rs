//! The locks that keep crac processes from acting on one service at once: one crac at a time
//! checkpoints a pid or gives it back in a detached restore ([`lock_pid`], in `/run/crac-locks`
//! for root),
//! and restores of one image take turns ([`restore_turn`], `.crac-restore.lock` in its folder).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{FailureKind, OpError};

/// Waits for this image's turn to be restored (an exclusive lock on a hidden file in its
/// folder, released when the returned guard is dropped).
pub(crate) fn restore_turn(dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, OpError> {
    let path = dir.join(".crac-restore.lock");
    let file = crac_fs::open_append(&path).map_err(|e| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot open {}: {e}", path.display()),
        )
    })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot lock {}: {e}", path.display()),
        )
    })
}

/// Where root's crac keeps its per-pid locks: a folder of root's under `/run`, which only root
/// may write, so nobody else can take a pid's lock first.
const LOCK_DIR: &str = "/run/crac-locks";

/// Where this crac keeps its per-pid locks: [`LOCK_DIR`] for root; for another user (with
/// CAP_CHECKPOINT_RESTORE, which acts on its own processes only) a private folder of its own,
/// `$XDG_RUNTIME_DIR/crac-locks`, else `/tmp/crac-locks-UID` (crac-fs refuses one another
/// user made first).
fn lock_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from(LOCK_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() && dir.is_dir() => dir.join("crac-locks"),
        _ => std::env::temp_dir().join(format!("crac-locks-{uid}")),
    }
}

/// A pid's lock, held while a checkpoint of it runs, or a detached restore gives it back: a
/// private file `LOCK_DIR/PID.lock` under `flock`, holding the holder's pid and what it does.
/// Removed when dropped (while still locked, so that one who opened it meanwhile finds the
/// name gone and takes a fresh one). A crac that is killed leaves its file, unlocked (the
/// kernel drops a dead process's locks), which the next crac to lock that pid takes over;
/// `/run` is emptied at boot.
pub(crate) struct PidLock {
    path: PathBuf,
    _file: nix::fcntl::Flock<fs::File>,
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Takes `pid`'s lock for `what` (`checkpoint`, `restore`), or says which crac holds it and
/// for what. Nothing (`None`) on a system without `/run`.
///
/// # Errors
///
/// [`FailureKind::Failed`] naming the crac that holds it; [`FailureKind::Unavailable`] when
/// the lock folder cannot be made or trusted.
pub(crate) fn lock_pid(pid: u32, what: &str) -> Result<Option<PidLock>, OpError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let dir = &lock_dir();
    if !dir.parent().is_some_and(Path::is_dir) {
        return Ok(None);
    }
    let unavailable = |e: std::io::Error| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot lock pid {pid} for this {what}: {e}"),
        )
    };
    crac_fs::ensure_dir(dir).map_err(unavailable)?;
    let path = dir.join(format!("{pid}.lock"));
    // A few tries: each finds the file of a holder that has just finished gone.
    for _ in 0..100 {
        let file = crac_fs::open_append(&path).map_err(unavailable)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(held(pid, &path)),
            Err((_, e)) => return Err(unavailable(e.into())),
        };
        // Still the file at that name (not one its last holder removed as it finished)?
        let held = locked.metadata().map_err(unavailable)?;
        let named = match fs::symlink_metadata(&path) {
            Ok(named) => named,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(unavailable(e)),
        };
        if (held.dev(), held.ino()) != (named.dev(), named.ino()) {
            continue;
        }
        locked.set_len(0).map_err(unavailable)?;
        writeln!(locked, "{} {what}", std::process::id()).map_err(unavailable)?;
        return Ok(Some(PidLock {
            path,
            _file: locked,
        }));
    }
    Err(OpError::new(
        FailureKind::Unavailable,
        format!(
            "cannot lock pid {pid} for this {what}: {} keeps changing",
            path.display()
        ),
    ))
}

/// The error for `pid`'s lock at `path` held by another crac: which one, doing what.
fn held(pid: u32, path: &Path) -> OpError {
    let text = crac_fs::read_bounded(path, 64)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_default();
    let mut words = text.split_whitespace();
    let holder = words.next().and_then(|w| w.parse::<u32>().ok());
    // Written right after the lock is taken: a holder caught before it wrote is a checkpoint
    // as likely as not; say only what is known.
    let what = match words.next() {
        Some("restore") => "restore",
        Some("checkpoint") => "checkpoint",
        _ => "checkpoint or restore",
    };
    OpError::new(
        FailureKind::Failed,
        format!(
            "another crac {what} of pid {pid} is running{}; wait for it to finish{}",
            holder.map_or(String::new(), |h| format!(" (pid {h})")),
            if what == "checkpoint" {
                " (it stops the service unless it was given --leave-running)"
            } else {
                ""
            }
        ),
    )
}
