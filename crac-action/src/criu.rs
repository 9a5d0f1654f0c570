//! What CRIU tells an action script, read from the `CRTOOLS_*` environment into typed values.
//!
//! CRIU runs the script with no arguments, stdin closed, stdout and stderr in its log, and
//! these variables (criu/action-scripts.c):
//! - `CRTOOLS_SCRIPT_ACTION`: the step; the list grows between CRIU releases.
//! - `CRTOOLS_INIT_PID`: the real PID of the tree's root (unset during pre-restore).
//! - `CRTOOLS_IMAGE_DIR`: `/proc/<criu>/fd/<n>`, CRIU's images folder. It is also how the
//!   script knows which process is CRIU: not its parent, which is a shell when an operator
//!   wraps the script (`#!/bin/sh` setting `CRAC_*`, then running crac-action without `exec`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The step CRIU is at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Before the tree is seized for a dump: run every `before_checkpoint`.
    PreDump,
    /// The dump succeeded; the tree is still frozen.
    PostDump,
    /// Before a restore: the agents' socket folders the image needs are recreated.
    PreRestore,
    /// The restored tree's namespaces exist; its tasks do not run yet.
    SetupNamespaces,
    /// Restored tasks run again: run every `after_restore` with reason `restored`.
    PostResume,
    /// A step this script has nothing to do at (network-lock, post-restore, ...), or one a
    /// newer CRIU added. Ignored with exit code 0.
    Other(String),
}

impl Action {
    /// Parses a `CRTOOLS_SCRIPT_ACTION` value.
    pub fn parse(name: &str) -> Action {
        match name {
            "pre-dump" => Action::PreDump,
            "post-dump" => Action::PostDump,
            "pre-restore" => Action::PreRestore,
            "setup-namespaces" => Action::SetupNamespaces,
            "post-resume" => Action::PostResume,
            other => Action::Other(other.to_owned()),
        }
    }
}

/// The `CRTOOLS_*` environment of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The step.
    pub action: Action,
    /// The tree's root, when CRIU gives one.
    pub init_pid: Option<u32>,
    /// CRIU's images folder, as CRIU passes it (a `/proc/<criu>/fd/<n>` path).
    pub image_dir: Option<PathBuf>,
    /// The CRIU process, read from `image_dir`.
    pub criu_pid: Option<u32>,
}

/// Why the environment is not a CRIU action-script environment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvocationError {
    /// Not run by CRIU.
    #[error(
        "CRTOOLS_SCRIPT_ACTION is not set: crac-action is run by CRIU, as in \
         `criu dump --action-script $(command -v crac-action) ...`"
    )]
    NotRunByCriu,
    /// A step that needs the root PID did not get a valid one.
    #[error("CRTOOLS_INIT_PID is {0:?}, not a process id")]
    BadPid(String),
    /// `CRTOOLS_IMAGE_DIR` does not say which process is CRIU.
    #[error(
        "CRTOOLS_IMAGE_DIR is {}, not /proc/<criu pid>/fd/<n>: cannot tell which process is CRIU",
        .0.as_deref().map_or("not set".to_owned(), |d| format!("{d:?}"))
    )]
    NoCriuPid(Option<String>),
}

/// The pid in `/proc/<pid>/fd/<n>`, CRIU's form of `CRTOOLS_IMAGE_DIR`.
fn criu_pid_of(dir: &Path) -> Option<u32> {
    let rest = dir.to_str()?.strip_prefix("/proc/")?;
    let (pid, fd) = rest.split_once("/fd/")?;
    fd.parse::<u32>().ok()?;
    pid.parse().ok().filter(|&pid| pid > 0)
}

impl Invocation {
    /// Reads the invocation from `vars` (the process environment in production).
    ///
    /// # Errors
    ///
    /// When `CRTOOLS_SCRIPT_ACTION` is missing or `CRTOOLS_INIT_PID` is not a PID.
    pub fn from_vars(
        vars: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Invocation, InvocationError> {
        let action = vars("CRTOOLS_SCRIPT_ACTION")
            .ok_or(InvocationError::NotRunByCriu)?
            .to_string_lossy()
            .into_owned();
        let init_pid = match vars("CRTOOLS_INIT_PID") {
            None => None,
            Some(raw) => {
                let text = raw.to_string_lossy().into_owned();
                match text.trim().parse::<u32>() {
                    Ok(pid) if pid > 0 => Some(pid),
                    _ => return Err(InvocationError::BadPid(text)),
                }
            }
        };
        let image_dir = vars("CRTOOLS_IMAGE_DIR").map(PathBuf::from);
        Ok(Invocation {
            action: Action::parse(&action),
            init_pid,
            criu_pid: image_dir.as_deref().and_then(criu_pid_of),
            image_dir,
        })
    }

    /// The CRIU process, for the steps that must know it.
    ///
    /// # Errors
    ///
    /// [`InvocationError::NoCriuPid`] when `CRTOOLS_IMAGE_DIR` does not name it.
    pub fn criu(&self) -> Result<u32, InvocationError> {
        self.criu_pid.ok_or_else(|| {
            InvocationError::NoCriuPid(self.image_dir.as_ref().map(|dir| dir.display().to_string()))
        })
    }

    /// Reads the invocation from the process environment.
    ///
    /// # Errors
    ///
    /// As [`from_vars`](Self::from_vars).
    pub fn from_env() -> Result<Invocation, InvocationError> {
        Invocation::from_vars(|name| std::env::var_os(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Invocation, InvocationError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Invocation::from_vars(|name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn known_and_unknown_actions() {
        let inv = parse(&[
            ("CRTOOLS_SCRIPT_ACTION", "pre-dump"),
            ("CRTOOLS_INIT_PID", "42"),
            ("CRTOOLS_IMAGE_DIR", "/proc/7/fd/3"),
        ])
        .unwrap();
        assert_eq!(inv.action, Action::PreDump);
        assert_eq!(inv.init_pid, Some(42));
        assert_eq!(inv.image_dir, Some(PathBuf::from("/proc/7/fd/3")));
        assert_eq!(inv.criu(), Ok(7));
        let inv = parse(&[("CRTOOLS_SCRIPT_ACTION", "pre-restore")]).unwrap();
        assert_eq!(inv.action, Action::PreRestore);
        let inv = parse(&[("CRTOOLS_SCRIPT_ACTION", "query-ext-files")]).unwrap();
        assert_eq!(inv.action, Action::Other("query-ext-files".into()));
        assert_eq!(inv.init_pid, None);
    }

    #[test]
    fn criu_is_named_by_the_images_folder_alone() {
        for (dir, pid) in [
            ("/proc/4242/fd/5", Some(4242)),
            ("/proc/self/fd/5", None),
            ("/proc/4242/fd/x", None),
            ("/srv/images", None),
            ("/proc/0/fd/3", None),
        ] {
            let inv = parse(&[
                ("CRTOOLS_SCRIPT_ACTION", "pre-dump"),
                ("CRTOOLS_IMAGE_DIR", dir),
            ])
            .unwrap();
            assert_eq!(inv.criu_pid, pid, "{dir}");
        }
        let inv = parse(&[("CRTOOLS_SCRIPT_ACTION", "pre-dump")]).unwrap();
        assert_eq!(
            inv.criu().unwrap_err().to_string(),
            "CRTOOLS_IMAGE_DIR is not set, not /proc/<criu pid>/fd/<n>: cannot tell which process is CRIU"
        );
    }

    #[test]
    fn missing_action_and_bad_pid_are_errors() {
        assert_eq!(parse(&[]).unwrap_err(), InvocationError::NotRunByCriu);
        assert_eq!(
            parse(&[
                ("CRTOOLS_SCRIPT_ACTION", "pre-dump"),
                ("CRTOOLS_INIT_PID", "x1")
            ])
            .unwrap_err(),
            InvocationError::BadPid("x1".into())
        );
    }
}
