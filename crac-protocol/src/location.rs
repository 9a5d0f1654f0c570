//! Where an agent's socket is: `<base>/<pid>/agent.sock`, the base chosen so that no other
//! user can deny or take it.
//!
//! The base folder, in this order (the first that applies):
//!
//! 1. `$CRAC_AGENT_DIR`, when set: it overrides everything.
//! 2. For a process running as root: [`ROOT_DIR`] (`/run/crac`), a folder only root can write
//!    (mode 0700), when `/run` is a folder of root's that nobody else may write to and root
//!    can write to (not a read-only file system).
//! 3. For any other user: `$XDG_RUNTIME_DIR/crac`, when `XDG_RUNTIME_DIR` is an absolute path
//!    to a folder of the process's own uid that nobody else may write to (the user's runtime
//!    folder that the login manager makes, `/run/user/<uid>`).
//! 4. [`FALLBACK_DIR`] (`/tmp/crac`), shared by every user like /tmp itself (mode 1777,
//!    sticky): when none of the above applies (a container without a writable /run, a service
//!    of a user who has no runtime folder).
//!
//! A base that is missing is made: mode 1777 when its parent is a folder every user may write
//! to (`/tmp`: then it is shared, as /tmp is), otherwise 0700, the process's own. An existing
//! base must belong to root or the process's uid, and be writable by nobody else unless sticky.
//! When the fallback `/tmp/crac` fails that (another user made it first), an agent that was not
//! told its base makes a private one instead, `/tmp/crac-<uid>.XXXXXX` (`mkdtemp`, 0700),
//! removed at exit ([`private_base_uid`] recognises its name).
//!
//! Each process's folder is its own (mode 0700), so only its uid and root can reach the
//! socket. When something that is not the process's own folder sits at `<base>/<pid>` (another
//! user made it, perhaps for pids to come), the agent does not give up:
//!
//! - when it may, it moves that entry aside, to `<pid>.foreign-<random>` in the same base,
//!   and makes its own folder at `<base>/<pid>` (`crac_agent::Agent::moved_aside`
//!   says where it went). Root may always; another user may not in a sticky base such as
//!   `/tmp/crac`;
//! - when it may not, it makes a folder with an unguessable name, `<pid>.XXXXXX` (`mkdtemp`),
//!   in the same base, and listens there (`crac_agent::Agent::socket_path`).
//!   crac-action finds such a folder from the process's listening socket (see crac-action's
//!   `namespace` module), so the service can still be checkpointed.
//!
//! Copies restored from one image at once, each in a pid namespace of its own (the same pid
//! in each) on one file system, share `<base>/<pid>`: the copy restored last binds the socket
//! there. Every other agent, at its next socket check, finds another live agent at its path
//! (`SO_PEERCRED` says whose) and moves to a folder `<pid>.XXXXXX` of its own in the same base,
//! where crac-action finds it by its listening socket in the same way.
//!
//! Nothing is printed (a library does not); the outcome is on crac-agent's `Agent`. The
//! folders are made by crac-agent (through crac-fs); this module only says where they are.
//!
//! crac-action reads the service's own `CRAC_AGENT_DIR` and `XDG_RUNTIME_DIR` from its
//! environment (/proc/PID/environ): a service that sets its folder in code instead
//! (`crac_agent::Builder::base_dir`) must have CRIU's environment name the
//! same folder.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{access, geteuid, AccessFlags};

/// The environment variable that moves the base folder ([`crate::env::AGENT_DIR`]).
pub const DIR_ENV: &str = crate::env::AGENT_DIR;

/// The base folder of root's agents, unless [`DIR_ENV`] says otherwise.
pub const ROOT_DIR: &str = "/run/crac";

/// The environment variable naming a user's runtime folder; other users' agents use its
/// [`RUNTIME_SUBDIR`].
pub const RUNTIME_DIR_ENV: &str = "XDG_RUNTIME_DIR";

/// The base folder's name inside the user's runtime folder.
pub const RUNTIME_SUBDIR: &str = "crac";

/// The base folder when no other applies: shared by every user, like /tmp.
pub const FALLBACK_DIR: &str = "/tmp/crac";

/// The socket's file name inside the process's folder.
pub const SOCKET_NAME: &str = "agent.sock";

/// The base folder this process's agent uses, the first that applies:
///
/// 1. `$CRAC_AGENT_DIR` ([`DIR_ENV`]), when set: it overrides everything;
/// 2. for a process running as root, [`ROOT_DIR`] (`/run/crac`, mode 0700, only root can
///    write to it), when `/run` is a folder of root's that nobody else may write to and that
///    is not read-only;
/// 3. for any other user, `$XDG_RUNTIME_DIR/crac`, when `XDG_RUNTIME_DIR` is an absolute path
///    to a folder of the process's own uid that nobody else may write to;
/// 4. [`FALLBACK_DIR`] (`/tmp/crac`), shared by every user like /tmp (mode 1777, sticky; each
///    process's folder in it 0700, its own).
///
/// It looks at the environment and at `/run` or the runtime folder as they are now. In
/// `<base>/<pid>`, another user's entry is moved aside when the agent may (root), else the
/// agent uses a folder `<base>/<pid>.XXXXXX` of its own (`crac_agent::Agent::moved_aside`,
/// `crac_agent::Agent::socket_path`).
pub fn base_dir() -> PathBuf {
    match std::env::var_os(DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => default_base(
            geteuid().as_raw(),
            std::env::var_os(RUNTIME_DIR_ENV).as_deref(),
        ),
    }
}

/// The base for a process of `uid` whose `XDG_RUNTIME_DIR` is `runtime_dir`, when
/// `CRAC_AGENT_DIR` is not set.
fn default_base(uid: u32, runtime_dir: Option<&OsStr>) -> PathBuf {
    if uid == 0 {
        if run_usable(Path::new(ROOT_DIR)) {
            return PathBuf::from(ROOT_DIR);
        }
    } else if let Some(runtime) = runtime_dir.map(Path::new) {
        if runtime.is_absolute() && runtime_trusted(runtime, uid) {
            return runtime.join(RUNTIME_SUBDIR);
        }
    }
    PathBuf::from(FALLBACK_DIR)
}

/// Whether root may use `base` (/run/crac): it is there already as root's own folder, or its
/// parent is a folder of root's that nobody else may write to and root can write to.
fn run_usable(base: &Path) -> bool {
    match fs::symlink_metadata(base) {
        Ok(meta) => meta.is_dir() && meta.uid() == 0 && meta.mode() & 0o022 == 0,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let Some(parent) = base.parent() else {
                return false;
            };
            fs::metadata(parent)
                .is_ok_and(|meta| meta.is_dir() && meta.uid() == 0 && meta.mode() & 0o022 == 0)
                // Says EROFS on a read-only file system, as a container's /run may be.
                && access(parent, AccessFlags::W_OK).is_ok()
        }
        Err(_) => false,
    }
}

/// Whether `runtime` is a folder of `uid`'s own that nobody else may write to.
fn runtime_trusted(runtime: &Path, uid: u32) -> bool {
    fs::metadata(runtime).is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0)
}

/// The usual folder of process `pid`'s agent, `<base>/<pid>`, with this process's
/// [`base_dir`]. An agent that found another user's entry there and could not move it aside
/// uses another folder (`crac_agent::Agent::socket_path` says which).
pub fn agent_dir(pid: u32) -> PathBuf {
    base_dir().join(pid.to_string())
}

/// The usual socket of process `pid`'s agent: what an agent started in this process, with
/// this environment, would use, unless its folder was taken (see [`agent_dir`]).
///
/// ```
/// std::env::set_var("CRAC_AGENT_DIR", "/srv/agents");
/// assert_eq!(crac_protocol::location::socket_path(42), std::path::Path::new("/srv/agents/42/agent.sock"));
/// std::env::remove_var("CRAC_AGENT_DIR");
/// if nix::unistd::geteuid().is_root() && std::path::Path::new("/run").is_dir() {
///     // Unless /run is read-only.
///     # if nix::unistd::access("/run", nix::unistd::AccessFlags::W_OK).is_ok() {
///     assert_eq!(crac_protocol::location::socket_path(42), std::path::Path::new("/run/crac/42/agent.sock"));
///     # }
/// }
/// ```
pub fn socket_path(pid: u32) -> PathBuf {
    agent_dir(pid).join(SOCKET_NAME)
}

/// The pid an agent folder's name is for, and whether it is an alternative folder: `4242`
/// (the usual folder) or `4242.Ab3xYz` (six letters or digits, made by `mkdtemp` when
/// `4242` was taken). `None` for any other name (`4242.foreign-...`, moved aside, included).
pub fn parse_folder_name(name: &str) -> Option<(u32, bool)> {
    let (pid, suffix) = match name.split_once('.') {
        Some((pid, suffix)) => (pid, Some(suffix)),
        None => (name, None),
    };
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || pid.starts_with('0') {
        return None;
    }
    let pid = pid.parse().ok()?;
    match suffix {
        None => Some((pid, false)),
        Some(s) if s.len() == 6 && s.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            Some((pid, true))
        }
        Some(_) => None,
    }
}

/// `crac-<uid>`: the prefix of a private base's name (see [`private_base_uid`]).
pub fn private_prefix(uid: u32) -> String {
    format!("crac-{uid}")
}

/// The uid whose private base `path` is: `/tmp/crac-<uid>.XXXXXX` (six letters or digits),
/// the base an agent makes for itself when the shared `/tmp/crac` cannot be trusted.
pub fn private_base_uid(path: &Path) -> Option<u32> {
    let fallback = Path::new(FALLBACK_DIR);
    if path.parent() != fallback.parent() {
        return None;
    }
    let name = path.file_name()?.to_str()?;
    let (uid, suffix) = name.strip_prefix("crac-")?.split_once('.')?;
    if uid.is_empty()
        || !uid.bytes().all(|b| b.is_ascii_digit())
        || (uid.len() > 1 && uid.starts_with('0'))
        || suffix.len() != 6
        || !suffix.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    uid.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_default_base_is_root_s_run_then_the_runtime_folder_then_tmp() {
        let run_ok = run_usable(Path::new(ROOT_DIR));
        assert_eq!(
            default_base(0, Some(OsStr::new("/run/user/0"))),
            PathBuf::from(if run_ok { ROOT_DIR } else { FALLBACK_DIR })
        );
        // A runtime folder that is not the user's own is not trusted.
        let scratch = std::env::temp_dir().join(format!("crac-location-{}", std::process::id()));
        crac_fs::ensure_dir(&scratch).unwrap();
        let me = geteuid().as_raw();
        if me != 0 {
            assert_eq!(
                default_base(me, Some(scratch.as_os_str())),
                scratch.join(RUNTIME_SUBDIR)
            );
        }
        assert_eq!(
            default_base(me + 1, Some(scratch.as_os_str())),
            PathBuf::from(FALLBACK_DIR)
        );
        fs::set_permissions(&scratch, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            default_base(me.max(1), Some(scratch.as_os_str())),
            PathBuf::from(FALLBACK_DIR)
        );
        assert_eq!(
            default_base(me.max(1), Some(OsStr::new("relative"))),
            PathBuf::from(FALLBACK_DIR)
        );
        assert_eq!(default_base(me.max(1), None), PathBuf::from(FALLBACK_DIR));
        // /run/crac is usable only when /run is root's own folder, closed to others.
        assert!(!run_usable(&scratch.join("crac")) || me == 0);
        let _ = fs::remove_dir_all(&scratch);
    }

    #[test]
    fn private_bases_are_crac_uid_and_six_random_characters_in_tmp() {
        assert_eq!(
            private_base_uid(Path::new("/tmp/crac-1000.Ab3xYz")),
            Some(1000)
        );
        assert_eq!(private_base_uid(Path::new("/tmp/crac-0.Ab3xYz")), Some(0));
        for path in [
            "/tmp/crac",
            "/tmp/crac-1000",
            "/tmp/crac-1000.Ab3xY",
            "/tmp/crac-01000.Ab3xYz",
            "/tmp/crac-.Ab3xYz",
            "/var/tmp/crac-1000.Ab3xYz",
            "/tmp/sub/crac-1000.Ab3xYz",
            "/tmp/crac-1000.Ab-xYz",
        ] {
            assert_eq!(private_base_uid(Path::new(path)), None, "{path}");
        }
    }

    #[test]
    fn folder_names_are_a_pid_or_a_pid_and_six_random_characters() {
        assert_eq!(parse_folder_name("4242"), Some((4242, false)));
        assert_eq!(parse_folder_name("4242.Ab3xYz"), Some((4242, true)));
        for name in [
            "",
            "0",
            "042",
            "-1",
            "4242.",
            "4242.abc",
            "4242.Ab3xYz7",
            "4242.foreign-0123456789abcdef",
            "4242.Ab/xYz",
            "..",
            "99999999999",
        ] {
            assert_eq!(parse_folder_name(name), None, "{name:?}");
        }
    }
}
