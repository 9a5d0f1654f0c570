//! A tree that its container runtime froze before the dump: containerd pauses a container
//! (cgroup v1 `freezer.state` FROZEN, v2 `cgroup.freeze` 1) before `runc checkpoint`, as
//! `docker checkpoint create` does, and a frozen agent cannot answer pre-dump. pre-dump
//! thaws the tree's cgroup: CRIU then freezes (or seizes) the tree again itself, and the
//! runtime resumes or removes the container after the dump as it would have.

use std::fs;
use std::path::{Path, PathBuf};

use crate::procfs;

/// Where cgroup v1's freezer hierarchy is mounted.
const FREEZER_V1: &str = "/sys/fs/cgroup/freezer";
/// Where a cgroup v2 (unified) hierarchy is mounted when it is the only one.
const UNIFIED: &str = "/sys/fs/cgroup";

/// What [`thaw`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Thawed {
    /// The cgroup was not frozen (or has no freezer): nothing done.
    NotFrozen,
    /// The cgroup at this path was frozen and is thawed.
    Thawed(PathBuf),
}

/// Thaws the freezer cgroup of process `pid` if it is frozen.
///
/// # Errors
///
/// The cgroup is frozen and cannot be thawed: the message names its file.
pub fn thaw(pid: u32) -> Result<Thawed, String> {
    let Some(cgroups) = procfs::cgroups(pid) else {
        return Ok(Thawed::NotFrozen);
    };
    for (controllers, path) in &cgroups {
        let relative = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "freezer") {
            let state = Path::new(FREEZER_V1).join(relative).join("freezer.state");
            if read_trim(&state).is_some_and(|s| s == "FROZEN" || s == "FREEZING") {
                return write(&state, "THAWED").map(|()| Thawed::Thawed(state));
            }
        } else if controllers.is_empty() && Path::new(UNIFIED).join("cgroup.controllers").exists() {
            let freeze = Path::new(UNIFIED).join(relative).join("cgroup.freeze");
            if read_trim(&freeze).is_some_and(|s| s == "1") {
                return write(&freeze, "0").map(|()| Thawed::Thawed(freeze));
            }
        }
    }
    Ok(Thawed::NotFrozen)
}

fn read_trim(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| {
        format!(
            "the tree's cgroup is frozen and cannot be thawed ({}: {e}), so its agents cannot answer",
            path.display()
        )
    })
}
