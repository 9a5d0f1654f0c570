//! The process tree below a PID, read from /proc, and process identities that survive PID
//! reuse (PID plus start time).

use std::collections::HashMap;
use std::fs;
use std::io::Read;

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
        let stat = read_stat(pid)?;
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

struct Stat {
    state: char,
    ppid: u32,
    start_time: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    // One read into a buffer that always fits (the line is a few hundred bytes): this runs
    // for every process in a tree on CRIU's critical path.
    let mut buf = [0u8; 1024];
    let n = fs::File::open(format!("/proc/{pid}/stat"))
        .and_then(|mut f| f.read(&mut buf))
        .ok()?;
    parse_stat(std::str::from_utf8(&buf[..n]).ok()?)
}

/// Parses /proc/PID/stat. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field N is fields[N - 3].
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The state letter of `pid` (`R`, `S`, `Z`, ... as in /proc/PID/stat), if it exists.
pub fn state_of(pid: u32) -> Option<char> {
    read_stat(pid).map(|s| s.state)
}

/// The parent of `pid`, if it exists.
pub fn parent_of(pid: u32) -> Option<u32> {
    read_stat(pid).map(|s| s.ppid)
}

/// `root` and every process below it, parents before their children (pre-order), each
/// level in PID order.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    let mut scanned: Option<HashMap<u32, Vec<u32>>> = None;
    while let Some(pid) = stack.pop() {
        out.push(pid);
        let mut kids = match children_of(pid) {
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

/// The children of `pid` from /proc/PID/task/*/children (a few reads for a small tree, where
/// a scan of /proc reads every process on the machine). None if the kernel lacks the file.
fn children_of(pid: u32) -> Option<Vec<u32>> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut kids = Vec::new();
    for task in tasks.flatten() {
        match fs::read_to_string(task.path().join("children")) {
            Ok(text) => kids.extend(
                text.split_whitespace()
                    .filter_map(|k| k.parse::<u32>().ok()),
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                // The task exited, or the kernel has no such file: tell them apart.
                if task.path().exists() {
                    return None;
                }
            }
            Err(_) => {}
        }
    }
    Some(kids)
}

/// Parent to children, from one pass over /proc: the fallback when the kernel has no
/// /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN).
fn children_map() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return map;
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        if let Some(stat) = read_stat(pid) {
            map.entry(stat.ppid).or_default().push(pid);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_names() {
        let line =
            "123 (a) b (c)) S 1 123 123 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 1);
        assert_eq!(stat.start_time, 98765);
    }

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
