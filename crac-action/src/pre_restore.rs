//! pre-restore: make sure each agent's socket folder the image needs is there, and is the
//! restored process's own, before CRIU binds the agent's socket in it.
//!
//! CRIU restores an agent's listening socket by binding its path again, which fails ("unix:
//! Can't bind ... No such file or directory") when the folder is gone: after a reboot, or
//! when the original process exited cleanly and removed it. post-dump recorded the folders in
//! the image ([`AGENTS_FILE`]); CRIU gives no PID yet at this step, which is why the list comes
//! from the image. Nothing in that list is taken on trust (an image may come from elsewhere):
//!
//! - an entry is acted on only if its folder is where an agent puts one:
//!   `<base>/<pid>` or `<base>/<pid>.XXXXXX`, with the base one of `/run/crac`, `/tmp/crac`,
//!   the service's `$XDG_RUNTIME_DIR/crac` or `CRAC_AGENT_DIR` recorded at the checkpoint,
//!   this step's own `CRAC_AGENT_DIR`, or the private base `/tmp/crac-<uid>.XXXXXX` of the
//!   entry's uid; any other entry stops the restore, naming it, and nothing is created;
//! - the base must be a folder (not a link) of root's or of the entry's uid, that nobody else
//!   may write to unless it is sticky; a missing one is made as the agent makes it (`/tmp/crac`
//!   mode 1777, the others 0700);
//! - something at the folder's path that is not a folder of the image's uid closed to others
//!   (another user made it, so that root's restored socket would land in their folder, or to
//!   make the restore fail) is moved aside to `<folder>.foreign-<random>`, and the folder made
//!   again, mode 0700, owned by the image's uid and gid.
//!
//! A process that had a root of its own (a container) had its folder inside that root, which
//! CRIU names to no action script at this step: those folders are left alone (one log line),
//! and travel in the container's file system, which the container runtime restores.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::agents::log;
use crate::criu::Invocation;
use crate::error::ActionError;
use crac_protocol::records::{AgentFolder, AgentFolders, AGENTS_FILE};

const STEP: &str = "pre-restore";

/// Runs the step.
///
/// # Errors
///
/// When an entry of the image's list is not an agent folder, or a folder cannot be made (the
/// restore would fail anyway, later and less clearly).
pub fn run(inv: &Invocation, out: &mut dyn Write) -> Result<(), ActionError> {
    let Some(images) = &inv.image_dir else {
        return Ok(());
    };
    let record = match AgentFolders::read(images) {
        Ok(Some(record)) => record,
        // Not an image with agents (or made without crac-action): nothing to prepare.
        Ok(None) => return Ok(()),
        Err(err) => return Err(ActionError::Restore(err.to_string())),
    };
    let (inside, here): (Vec<_>, Vec<_>) = record.agents.iter().partition(|a| a.in_own_root);
    if !inside.is_empty() {
        let folders: Vec<String> = inside
            .iter()
            .map(|a| format!("{} (pid {})", a.dir.display(), a.pid))
            .collect();
        log(
            out,
            STEP,
            &format!(
                "{} inside the root of a container, which CRIU does not name at this step: not checked here (the container's file system brings {})",
                folders.join(", "),
                if inside.len() == 1 { "it" } else { "them" }
            ),
        );
    }
    let own_base = std::env::var_os(crac_protocol::location::DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    // Every entry is checked before any is acted on.
    let bases = here
        .iter()
        .map(|agent| plausible(agent, own_base.as_deref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ActionError::Restore)?;
    for (agent, base) in here.into_iter().zip(bases) {
        prepare(agent, &base, out).map_err(|e| {
            ActionError::Restore(format!(
                "cannot prepare the agent folder {} for pid {}: {e}",
                agent.dir.display(),
                agent.pid
            ))
        })?;
    }
    Ok(())
}

/// Which base an entry's folder is in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Base {
    /// `/run/crac`: root's.
    Root,
    /// `/tmp/crac`: shared by every user.
    Fallback,
    /// `$XDG_RUNTIME_DIR/crac`, in the folder of the entry's uid.
    Runtime(PathBuf),
    /// A `CRAC_AGENT_DIR`: the service's at the checkpoint, or this step's.
    Named(PathBuf),
    /// `/tmp/crac-<uid>.XXXXXX`: the private base an agent of the entry's uid made when
    /// `/tmp/crac` could not be trusted.
    Private(PathBuf),
}

impl Base {
    fn path(&self) -> &Path {
        match self {
            Base::Root => Path::new(crac_protocol::location::ROOT_DIR),
            Base::Fallback => Path::new(crac_protocol::location::FALLBACK_DIR),
            Base::Runtime(path) | Base::Named(path) | Base::Private(path) => path,
        }
    }
}

/// Whether `agent`'s folder is where an agent puts one: an absolute path without `.` or `..`,
/// named `<pid>` or `<pid>.XXXXXX` for the entry's pid, in a known base. The message names the
/// entry and says why not.
pub(crate) fn plausible(agent: &AgentFolder, own_base: Option<&Path>) -> Result<Base, String> {
    let refuse = |why: &str| {
        format!(
            "{AGENTS_FILE} in the image names {} as the agent folder of pid {} (owner uid {}), \
             which {why}; an agent folder is <base>/<pid> or <base>/<pid>.XXXXXX with the base \
             {}, {}, the service's $XDG_RUNTIME_DIR/crac or its {} at the checkpoint. \
             Refusing to create it or anything else: the image's list was altered, or the \
             image does not come from crac",
            agent.dir.display(),
            agent.pid,
            agent.uid,
            crac_protocol::location::ROOT_DIR,
            crac_protocol::location::FALLBACK_DIR,
            crac_protocol::location::DIR_ENV,
        )
    };
    let dir = &agent.dir;
    if !dir.is_absolute()
        || dir
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(refuse("is not an absolute path of plain names"));
    }
    let pid = agent.ns_pid.unwrap_or(agent.pid);
    let named_for = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(crac_protocol::location::parse_folder_name)
        .is_some_and(|(p, _)| p == pid);
    if !named_for {
        return Err(refuse(&format!(
            "is not named {pid} or {pid}.XXXXXX after the process"
        )));
    }
    let base = dir.parent().unwrap_or(Path::new("/"));
    let runtime = agent
        .runtime_dir
        .as_deref()
        .filter(|r| r.is_absolute())
        .map(|r| r.join(crac_protocol::location::RUNTIME_SUBDIR));
    let named = [agent.agent_dir_env.as_deref(), own_base]
        .into_iter()
        .flatten()
        .find(|named| named.is_absolute() && *named == base);
    if base == Path::new(crac_protocol::location::ROOT_DIR) {
        if agent.uid != 0 && named.is_none() {
            return Err(refuse(&format!(
                "is in {}, where only root's agents are",
                crac_protocol::location::ROOT_DIR
            )));
        }
        Ok(Base::Root)
    } else if base == Path::new(crac_protocol::location::FALLBACK_DIR) {
        Ok(Base::Fallback)
    } else if runtime.as_deref() == Some(base) {
        Ok(Base::Runtime(base.to_owned()))
    } else if let Some(named) = named {
        Ok(Base::Named(named.to_owned()))
    } else if crac_protocol::location::private_base_uid(base) == Some(agent.uid) {
        Ok(Base::Private(base.to_owned()))
    } else {
        Err(refuse("is not in a base folder agents use"))
    }
}

/// Makes sure the base is there and trusted, and the folder is the entry's own.
fn prepare(agent: &AgentFolder, base: &Base, out: &mut dyn Write) -> io::Result<()> {
    let base_path = base.path();
    if agent.uid == 0 {
        // Root's socket goes nowhere another user could redirect.
        crac_fs::check_ancestors(base_path)?;
    }
    match fs::symlink_metadata(base_path) {
        Ok(meta) => check_base(base_path, &meta, agent.uid)?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            make_base(base, agent)?;
            log(
                out,
                STEP,
                &format!("made the agents' base folder {}", base_path.display()),
            );
        }
        Err(err) => return Err(err),
    }
    let dir = &agent.dir;
    // A user racing to plant it again between the move and the mkdir gets it moved again;
    // three times is a fight, and the restore stops saying so.
    for _ in 0..3 {
        match fs::symlink_metadata(dir) {
            Ok(meta) if meta.is_dir() && meta.uid() == agent.uid && meta.mode() & 0o022 == 0 => {
                return Ok(())
            }
            Ok(meta) if meta.is_dir() && meta.uid() == agent.uid => {
                // The image's uid's own folder, but open to others: closed.
                return fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            }
            Ok(meta) => {
                let aside = crac_fs::move_aside(dir)?;
                log(
                    out,
                    STEP,
                    &format!(
                        "{} was {} of uid {}, not a folder of the image's uid {}: moved aside to {} (nothing of it is used)",
                        dir.display(),
                        kind(&meta),
                        meta.uid(),
                        agent.uid,
                        aside.display()
                    ),
                );
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        match crac_fs::create_dir_for(dir, agent.uid, agent.gid) {
            Ok(()) => {
                log(
                    out,
                    STEP,
                    &format!(
                        "recreated the agent folder {} for pid {}",
                        dir.display(),
                        agent.pid
                    ),
                );
                return Ok(());
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "another user keeps making something at its path",
    ))
}

fn kind(meta: &fs::Metadata) -> &'static str {
    if meta.file_type().is_symlink() {
        "a symbolic link"
    } else if meta.is_dir() {
        "a folder"
    } else {
        "a file"
    }
}

/// An existing base, checked by crac-fs's one rule for such folders ([`crac_fs::trusted_folder`],
/// the agent's too) for the image's `uid`.
fn check_base(base: &Path, meta: &fs::Metadata, uid: u32) -> io::Result<()> {
    crac_fs::trusted_folder(meta, uid).map_err(|why| {
        let why = match why {
            crac_fs::Distrust::NotAFolder(what) => format!("it is {what}"),
            crac_fs::Distrust::Owner(owner) => {
                format!("it belongs to uid {owner}, not to root or the image's uid {uid}")
            }
            crac_fs::Distrust::Writable(mode) => {
                format!("other users may write to it (mode {mode:o}) and it is not sticky")
            }
        };
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the base folder {} cannot be trusted: {why}; remove it (a restore makes it again)",
                base.display()
            ),
        )
    })
}

/// Makes a missing base as the agent would: /tmp/crac shared (1777), /run/crac root's, the
/// runtime one the uid's own; a `CRAC_AGENT_DIR` shared when its parent is (sticky and open to
/// all), else private to the uid. Only the base itself: a missing parent is not made.
fn make_base(base: &Base, agent: &AgentFolder) -> io::Result<()> {
    let path = base.path();
    let parent = path.parent().unwrap_or(Path::new("/"));
    let parent_meta = fs::metadata(parent)?;
    match base {
        Base::Fallback => crac_fs::create_shared_dir(path),
        Base::Root => crac_fs::create_dir(path),
        Base::Runtime(_) => {
            // The user's runtime folder: theirs, closed to others, as the agent requires.
            if parent_meta.uid() != agent.uid || parent_meta.mode() & 0o022 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is not the runtime folder of uid {} (it belongs to uid {}, mode {:o})",
                        parent.display(),
                        agent.uid,
                        parent_meta.uid(),
                        parent_meta.mode() & 0o7777
                    ),
                ));
            }
            crac_fs::create_dir_for(path, agent.uid, agent.gid)
        }
        // In /tmp, which check_ancestors vouched for when the uid is root.
        Base::Private(_) => crac_fs::create_dir_for(path, agent.uid, agent.gid),
        Base::Named(_) if parent_meta.mode() & 0o1002 == 0o1002 => crac_fs::create_shared_dir(path),
        Base::Named(_) => {
            crac_fs::check_ancestors(path)?;
            crac_fs::create_dir_for(path, agent.uid, agent.gid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dir: &str, pid: u32, uid: u32) -> AgentFolder {
        AgentFolder {
            pid,
            ns_pid: Some(pid),
            dir: PathBuf::from(dir),
            in_own_root: false,
            uid,
            gid: uid,
            agent_dir_env: None,
            runtime_dir: None,
        }
    }

    #[test]
    fn only_agent_folders_in_known_bases_are_plausible() {
        assert_eq!(
            plausible(&entry("/run/crac/42", 42, 0), None),
            Ok(Base::Root)
        );
        assert_eq!(
            plausible(&entry("/tmp/crac/42.Ab3xYz", 42, 1000), None),
            Ok(Base::Fallback)
        );
        let mut with_env = entry("/run/user/1000/crac/42", 42, 1000);
        with_env.runtime_dir = Some(PathBuf::from("/run/user/1000"));
        assert_eq!(
            plausible(&with_env, None),
            Ok(Base::Runtime(PathBuf::from("/run/user/1000/crac")))
        );
        let mut named = entry("/srv/agents/42", 42, 1000);
        named.agent_dir_env = Some(PathBuf::from("/srv/agents"));
        assert_eq!(
            plausible(&named, None),
            Ok(Base::Named(PathBuf::from("/srv/agents")))
        );
        assert_eq!(
            plausible(
                &entry("/srv/agents/42", 42, 1000),
                Some(Path::new("/srv/agents"))
            ),
            Ok(Base::Named(PathBuf::from("/srv/agents")))
        );
        assert_eq!(
            plausible(&entry("/tmp/crac-1000.Ab3xYz/42", 42, 1000), None),
            Ok(Base::Private(PathBuf::from("/tmp/crac-1000.Ab3xYz")))
        );
        for (dir, pid, uid, why) in [
            // Another uid's private base.
            (
                "/tmp/crac-1001.Ab3xYz/42",
                42,
                1000,
                "is not in a base folder agents use",
            ),
            (
                "/etc/evil",
                42,
                65534,
                "is not named 42 or 42.XXXXXX after the process",
            ),
            ("/etc/42", 42, 0, "is not in a base folder agents use"),
            (
                "/srv/agents/42",
                42,
                1000,
                "is not in a base folder agents use",
            ),
            (
                "/tmp/crac/../../etc/42",
                42,
                0,
                "is not an absolute path of plain names",
            ),
            (
                "tmp/crac/42",
                42,
                0,
                "is not an absolute path of plain names",
            ),
            (
                "/tmp/crac/43",
                42,
                0,
                "is not named 42 or 42.XXXXXX after the process",
            ),
            (
                "/tmp/crac/42.foreign-0123456789abcdef",
                42,
                0,
                "is not named 42 or 42.XXXXXX",
            ),
            (
                "/run/crac/42",
                42,
                1000,
                "is in /run/crac, where only root's agents are",
            ),
        ] {
            let err = plausible(&entry(dir, pid, uid), None).unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "crac-agents.json in the image names {dir} as the agent folder of pid {pid} \
                     (owner uid {uid}), which {why}"
                )),
                "{err}"
            );
            assert!(
                err.contains("Refusing to create it or anything else"),
                "{err}"
            );
        }
        // A runtime folder that is relative is not one.
        let mut relative = entry("/run/user/1000/crac/42", 42, 1000);
        relative.runtime_dir = Some(PathBuf::from("run/user/1000"));
        assert!(plausible(&relative, None).is_err());
    }
}
