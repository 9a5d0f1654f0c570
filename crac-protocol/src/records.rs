//! The records crac-action leaves for crac (and for itself at a later step): the agents'
//! socket folders in an image ([`AGENTS_FILE`]), what pre-dump did ([`PreDumpReport`], at
//! [`HOOK_REPORT_ENV`]), and the settings for the restored processes ([`RESTORE_ENV`]).
//!
//! [`AGENTS_FILE`] is written by post-dump while the tree is frozen: CRIU restores each
//! agent's listening socket by binding its path again, so pre-restore recreates the folders
//! when they are gone (a reboot, or the original process exited cleanly). For a process with
//! a root of its own (a container) the folder is recorded as the process sees it; it travels
//! in the container's file system.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::wire::{Reason, Request, MAX_REQUEST_LEN};

/// The file in the images folder that lists the agents' socket folders.
pub const AGENTS_FILE: &str = "crac-agents.json";

/// The contents of [`AGENTS_FILE`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFolders {
    /// Format version (1).
    pub format: u32,
    /// One entry per agent in the dumped tree.
    pub agents: Vec<AgentFolder>,
}

/// One agent's socket folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFolder {
    /// The process, as CRIU saw it.
    pub pid: u32,
    /// The process's pid as it saw itself (differs in a pid namespace of its own).
    #[serde(default)]
    pub ns_pid: Option<u32>,
    /// Its folder (absolute), as the process saw it.
    pub dir: PathBuf,
    /// Whether the process had a root of its own (a container): `dir` is then inside it.
    #[serde(default)]
    pub in_own_root: bool,
    /// The folder's owner.
    pub uid: u32,
    /// The folder's group.
    pub gid: u32,
    /// The process's `CRAC_AGENT_DIR` at the checkpoint: a base folder pre-restore accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_dir_env: Option<PathBuf>,
    /// The process's `XDG_RUNTIME_DIR` at the checkpoint: `<it>/crac` is a base folder
    /// pre-restore accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_dir: Option<PathBuf>,
}

/// The most [`AGENTS_FILE`] may hold: a few hundred bytes an agent.
pub const AGENTS_FILE_LIMIT: u64 = 1 << 20;

/// Why [`AgentFolders::read`] found no list in an image that has the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentsFileError {
    /// The file cannot be read (not a regular file, larger than [`AGENTS_FILE_LIMIT`], ...).
    #[error("cannot read {AGENTS_FILE} in the image: {0}")]
    Unreadable(#[source] io::Error),
    /// The file is not such a list.
    #[error("{AGENTS_FILE} in the image is corrupt: {0}")]
    Corrupt(#[source] serde_json::Error),
}

impl AgentFolders {
    /// The list in the images folder `images`; `None` when it has none (an image without
    /// agents, or made without crac-action).
    ///
    /// # Errors
    ///
    /// When the file is there but cannot be read, or is not such a list.
    pub fn read(images: &Path) -> Result<Option<AgentFolders>, AgentsFileError> {
        match crac_fs::read_bounded(&images.join(AGENTS_FILE), AGENTS_FILE_LIMIT) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(AgentsFileError::Corrupt),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(AgentsFileError::Unreadable(err)),
        }
    }
}

impl AgentFolder {
    /// Whether the process had a pid namespace of its own: a restore gives it a new one, so
    /// its pid on this side need not be free.
    pub fn in_own_pid_namespace(&self) -> bool {
        self.ns_pid.is_some_and(|ns_pid| ns_pid != self.pid)
    }
}

/// When set, pre-dump writes a [`PreDumpReport`] (JSON) to this path: `crac checkpoint` reads
/// the hook timings from it ([`crate::env::HOOK_REPORT`]).
pub const HOOK_REPORT_ENV: &str = crate::env::HOOK_REPORT;

/// What pre-dump did, for tools that drive CRIU and want the figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PreDumpReport {
    /// The cycle token.
    pub cycle: String,
    /// Wall time of the whole step's agent requests, in milliseconds.
    pub wall_ms: f64,
    /// Each agent told, in the order told.
    pub agents: Vec<AgentHooks>,
}

/// One agent's hooks in a [`PreDumpReport`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentHooks {
    /// The process.
    pub pid: u32,
    /// Its hooks, in the order they ran.
    pub hooks: Vec<crate::wire::HookReport>,
}

/// Settings for the restored processes, as a JSON object of strings (`{"LOG_LEVEL":"debug"}`):
/// whoever runs `criu restore` sets it (`crac restore --env`), CRIU passes its environment on
/// to post-resume, and every agent hands them to its hooks as `RestoreInfo::env`
/// ([`crate::env::RESTORE_ENV`]).
pub const RESTORE_ENV: &str = crate::env::RESTORE_ENV;

/// The value of [`RESTORE_ENV`] for `env`.
///
/// # Errors
///
/// When the settings would not fit in one request to an agent, with the sizes.
pub fn encode_restore_env(env: &BTreeMap<String, String>) -> Result<String, String> {
    let line = Request::after_restore(
        Reason::Restored,
        Some("criu-4194304-18446744073709551615".into()),
    )
    .with_env(env.clone())
    .to_line();
    if line.len() > MAX_REQUEST_LEN {
        return Err(format!(
            "the settings for the restored process take {} bytes in the agent's request, and a \
             request holds at most {MAX_REQUEST_LEN}: pass fewer or shorter values",
            line.len()
        ));
    }
    Ok(serde_json::to_string(env).expect("a map of strings serialises"))
}

/// The settings a value of [`RESTORE_ENV`] holds (none when it is empty).
///
/// # Errors
///
/// When it is not a JSON object of strings, saying that the restored processes were not told.
pub fn decode_restore_env(json: &str) -> Result<BTreeMap<String, String>, String> {
    if json.is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_str(json).map_err(|err| {
        format!(
            "{RESTORE_ENV} is not a JSON object of strings ({err}): the restored processes \
             were not told their settings"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_list_is_read_when_there_is_one_and_a_bad_one_says_why() {
        let dir = crac_fs::TempDir::new("crac-records-test").unwrap();
        assert!(AgentFolders::read(dir.path()).unwrap().is_none());
        let list = AgentFolders {
            format: 1,
            agents: vec![AgentFolder {
                pid: 42,
                ns_pid: Some(1),
                dir: "/run/crac/1".into(),
                in_own_root: true,
                uid: 0,
                gid: 0,
                agent_dir_env: None,
                runtime_dir: None,
            }],
        };
        let path = dir.path().join(AGENTS_FILE);
        crac_fs::write_atomic(&path, &serde_json::to_vec(&list).unwrap()).unwrap();
        let read = AgentFolders::read(dir.path()).unwrap().unwrap();
        assert_eq!(read, list);
        assert!(read.agents[0].in_own_pid_namespace());
        std::fs::write(&path, b"{\"format\":1}").unwrap();
        let err = AgentFolders::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("crac-agents.json in the image is corrupt: missing field `agents`"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = AgentFolders::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read crac-agents.json in the image: "),
            "{err}"
        );
    }

    #[test]
    fn restore_settings_round_trip_and_too_many_are_refused() {
        let env: BTreeMap<String, String> = [("LOG_LEVEL".to_owned(), "debug".to_owned())].into();
        let encoded = encode_restore_env(&env).unwrap();
        assert_eq!(encoded, r#"{"LOG_LEVEL":"debug"}"#);
        assert_eq!(decode_restore_env(&encoded).unwrap(), env);
        assert_eq!(decode_restore_env("").unwrap(), BTreeMap::new());
        let err = decode_restore_env("[1]").unwrap_err();
        assert!(
            err.starts_with("CRAC_RESTORE_ENV is not a JSON object of strings ("),
            "{err}"
        );
        let big: BTreeMap<String, String> = [("K".to_owned(), "v".repeat(MAX_REQUEST_LEN))].into();
        let err = encode_restore_env(&big).unwrap_err();
        assert!(err.contains("a request holds at most 4096"), "{err}");
    }
}
