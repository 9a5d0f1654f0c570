//! The process tree below a PID, read from /proc, and process identities that survive PID
//! reuse (PID plus start time).

use std::collections::HashMap;

use crate::procfs;

/// A process, told apart from a later one with the same PID by its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessId {
    /// The PID.
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcessId {
    /// The identity of the live (not zombie) process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<ProcessId> {
        let stat = procfs::stat(pid)?;
        if matches!(stat.state, 'Z' | 'X' | 'x') {
            return None;
        }
        Some(ProcessId {
            pid,
            start_time: stat.start_time,
        })
    }

    /// Whether this very process is still alive (not exited, not a zombie, PID not reused).
    pub fn is_alive(&self) -> bool {
        ProcessId::of(self.pid) == Some(*self)
    }
}

/// The state letter of `pid` (`R`, `S`, `Z`, ... as in /proc/PID/stat), if it exists.
pub fn state_of(pid: u32) -> Option<char> {
    procfs::stat(pid).map(|s| s.state)
}

/// The parent of `pid`, if it exists.
pub fn parent_of(pid: u32) -> Option<u32> {
    procfs::stat(pid).map(|s| s.ppid)
}

/// `root` and every process below it, parents before their children (pre-order), each
/// level in PID order.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    let mut scanned: Option<HashMap<u32, Vec<u32>>> = None;
    while let Some(pid) = stack.pop() {
        out.push(pid);
        let mut kids = match procfs::children(pid) {
            Some(kids) => kids,
            // No /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN off): one pass over /proc.
            None => scanned
                .get_or_insert_with(children_map)
                .get(&pid)
                .cloned()
                .unwrap_or_default(),
        };
        kids.sort_unstable();
        stack.extend(kids.iter().rev());
    }
    out
}

/// Parent to children, from one pass over /proc: the fallback when the kernel has no
/// /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN).
fn children_map() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    for pid in procfs::pids() {
        if let Some(stat) = procfs::stat(pid) {
            map.entry(stat.ppid).or_default().push(pid);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_and_its_child_are_found() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let tree = descendants(me);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()));
        let id = ProcessId::of(child.id()).unwrap();
        assert!(id.is_alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!id.is_alive());
    }
}
