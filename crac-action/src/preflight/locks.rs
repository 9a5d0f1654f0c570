//! File locks held by the tree (flocks, POSIX and OFD locks), from the kernel's lock table:
//! CRIU refuses to dump a process holding one ("Some file locks are hold by dumping tasks")
//! unless told `--file-locks`, which takes them into the image.
//!
//! The tree's descriptors on regular files come from the inodes a process's agent tells with
//! its facts, or else from `/proc/PID/fd` (a `stat` each); each one's `fdinfo` says which
//! locks are held through it. `/proc/locks`, the kernel's whole table, is read first only
//! when the tree has many such descriptors (over [`TABLE_ABOVE`]), to skip those whose file
//! no lock names: its first read in a while costs an RCU grace period (the kernel takes the
//! table's lock for writing, `percpu_down_write`), 9-19 ms measured here against ~10 µs a
//! `fdinfo`. CRIU itself reads the `fdinfo` lines, not the table, on kernels that have them.
//!
//! **Inherited descriptors.** A flock (and an OFD lock) belongs to the open file, which every
//! descriptor made from it shares, in whatever process: a child started by `flock(1)` without
//! `-o` holds its parent's lock through the descriptor it inherited. The kernel records which
//! process called `flock`: a flock held through a descriptor of a process other than that one
//! came with a descriptor it inherited (by `fork`, kept across `exec`), and is named so, with
//! the process that took it and whether it is in the tree. An OFD lock records no process, and
//! a POSIX lock is the process's own (a child does not inherit it): neither is named inherited.
//!
//! **A POSIX lock on a mapped file** is refused even with `--file-locks`: CRIU 4.2 does not
//! bring it back (restoring the mapping opens and closes the file, and closing any descriptor
//! of a file drops the process's POSIX locks on it; measured with SQLite's `-shm` file in WAL
//! mode, and a plain lock on a mapped file). A restored database connection without its
//! `-shm` lock lets the next connection take the file for the first and reset it under it.

use std::collections::HashSet;
use std::fmt;

use crac_protocol::fd_policy::Kind;

use super::report::Problem;
use super::seen::AgentFacts;
use crate::procfs::{self, FileLock, LockKind};

/// A lock held through a descriptor of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLock {
    /// The process holding the descriptor.
    pub pid: u32,
    /// The descriptor.
    pub fd: u32,
    /// The locked file.
    pub path: String,
    /// The lock.
    pub lock: FileLock,
    /// For a flock taken by another process: that process, and whether it is in the tree.
    pub inherited_from: Option<(u32, bool)>,
    /// A POSIX lock on a file the process also has mapped, which CRIU does not restore.
    pub on_mapped_file: bool,
}

impl HeldLock {
    /// The lock as the preflight names it: `/run/web.pid (flock, exclusive)`.
    fn what(&self) -> String {
        let mut what = format!(
            "{} ({}, {}",
            self.path,
            self.lock.kind.as_str(),
            if self.lock.exclusive {
                "exclusive"
            } else {
                "shared"
            }
        );
        if self.lock.range != "0 EOF" {
            what.push_str(&format!(", bytes {}", self.lock.range.replace(' ', "-")));
        }
        match self.inherited_from {
            Some((pid, false)) => what.push_str(&format!(
                ", on an inherited descriptor: taken by pid {pid}, outside the tree"
            )),
            Some((pid, true)) => {
                what.push_str(&format!(", on a descriptor inherited from pid {pid}"));
            }
            None => {}
        }
        if self.on_mapped_file {
            what.push_str(", on a file it has mapped");
        }
        what.push(')');
        what
    }
}

impl fmt::Display for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} fd {}: lock {}", self.pid, self.fd, self.what())
    }
}

/// Above this many descriptors on regular files in the tree, `/proc/locks` is read first to
/// skip the files no lock names (one grace period, ~10 ms, against ~10 µs a `fdinfo`).
const TABLE_ABOVE: usize = 1000;

/// Every lock held through a descriptor of the processes `pids`, each once (a flock shared by
/// several descriptors is named at the one of the process that took it, if it is in the tree).
/// A process whose agent told its regular files (`facts`) is not looked at through `/proc`.
pub fn held(pids: &[u32], facts: &AgentFacts) -> Vec<HeldLock> {
    let files: Vec<(u32, Vec<(u32, u64)>)> = pids
        .iter()
        .filter_map(|&pid| {
            let told = facts.get(&pid).and_then(|f| f.files.as_ref()).map(|files| {
                files
                    .iter()
                    .filter_map(|&(fd, inode)| Some((u32::try_from(fd).ok()?, inode)))
                    .collect::<Vec<_>>()
            });
            Some((pid, told.or_else(|| procfs::regular_file_inodes(pid))?))
        })
        .collect();
    // The inodes some lock names, when reading the whole table is the cheaper way.
    let locked: Option<HashSet<u64>> =
        (files.iter().map(|(_, f)| f.len()).sum::<usize>() > TABLE_ABOVE).then(|| {
            procfs::file_locks()
                .iter()
                .filter(|l| l.kind != LockKind::Other)
                .map(|l| l.inode)
                .collect()
        });
    let mut held: Vec<HeldLock> = Vec::new();
    for (pid, files) in files {
        let mut mapped = None;
        for (fd, inode) in files {
            if locked.as_ref().is_some_and(|l| !l.contains(&inode)) {
                continue;
            }
            let locks: Vec<FileLock> = procfs::fd_locks(pid, fd)
                .into_iter()
                .filter(|lock| lock.kind != LockKind::Other && lock.inode == inode)
                .collect();
            if locks.is_empty() {
                continue;
            }
            let Some(path) = procfs::fd_target(pid, fd) else {
                continue;
            };
            for lock in locks {
                let inherited_from = match lock.pid {
                    Some(taker) if lock.kind == LockKind::Flock && taker != pid => {
                        Some((taker, pids.contains(&taker)))
                    }
                    _ => None,
                };
                let on_mapped_file = lock.kind == LockKind::Posix
                    && mapped
                        .get_or_insert_with(|| procfs::mapped_inodes(pid))
                        .contains(&inode);
                let found = HeldLock {
                    pid,
                    fd,
                    path: path.clone(),
                    lock,
                    inherited_from,
                    on_mapped_file,
                };
                let same = |h: &HeldLock| {
                    h.lock == found.lock && (found.lock.kind != LockKind::Posix || h.pid == pid)
                };
                match held.iter_mut().find(|h| same(h)) {
                    // The one that took it, rather than a child that shares it.
                    Some(known) if known.inherited_from.is_some() && inherited_from.is_none() => {
                        *known = found;
                    }
                    Some(_) => {}
                    None => held.push(found),
                }
            }
        }
    }
    held
}

/// Whether `--file-locks` brings `lock` back after a restore.
pub fn restorable(lock: &HeldLock) -> bool {
    !lock.on_mapped_file
}

/// What the preflight says of each lock CRIU would refuse without `--file-locks`, or (with
/// `file_locks`) would not bring back.
pub(super) fn refused(pids: &[u32], facts: &AgentFacts, file_locks: bool) -> Vec<Problem> {
    held(pids, facts)
        .into_iter()
        .filter(|h| !file_locks || !restorable(h))
        .map(|h| Problem {
            pid: h.pid,
            fd: h.fd,
            kind: Kind::Lock,
            what: h.what(),
            why: if h.on_mapped_file {
                "CRIU does not bring back a POSIX lock on a file the process has mapped, \
                 --file-locks or not (restoring the mapping closes the file, which drops the \
                 lock; SQLite's -shm file in WAL mode is one, and a restored connection without \
                 its lock lets another reset the file under it): close it in a \
                 before_checkpoint hook (a database: close it, and open it again in \
                 after_restore)"
            } else if matches!(h.inherited_from, Some((_, false))) {
                "CRIU refuses a process holding a file lock without --file-locks, and this one \
                 came with a descriptor the service inherited (a service started under \
                 flock(1) without -o): start it with flock -o, or checkpoint with --file-locks, \
                 which takes the lock into the image (a restore then needs the same file, and \
                 fails while another process holds a conflicting lock on it)"
            } else {
                "CRIU refuses a process holding a file lock without --file-locks: release it in \
                 a before_checkpoint hook (a database: close it, and open it again in \
                 after_restore), or checkpoint with --file-locks, which takes the lock into the \
                 image (a restore then needs the same file, and fails while another process \
                 holds a conflicting lock on it)"
            },
            owner: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Over `TABLE_ABOVE` descriptors the kernel's table picks the files first: the lock is
    /// still found, on its one descriptor among the many.
    #[test]
    fn a_lock_among_many_descriptors_is_found_through_the_table() {
        let dir = std::env::temp_dir().join(format!("crac-locks-many-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (locked, other) = (dir.join("locked"), dir.join("other"));
        std::fs::write(&locked, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        let many = TABLE_ABOVE + 10;
        // A shell that opens `other` on many descriptors and `locked` on 9, flocks 9 (the
        // lock stays with the open file after flock(1) exits), and waits.
        let script = format!(
            "ulimit -n 4096; for fd in $(seq 10 {}); do eval \"exec $fd<\\\"$1\\\"\"; done; \
             exec 9<\"$2\"; flock -n 9 || exit 1; echo ready; exec sleep 30",
            9 + many
        );
        let mut shell = Command::new("bash")
            .args(["-c", &script, "bash"])
            .arg(&other)
            .arg(&locked)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(shell.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready, "ready\n");
        let pid = shell.id();
        let found = held(&[pid], &AgentFacts::new());
        let _ = shell.kill();
        let _ = shell.wait();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [format!(
                "pid {pid} fd 9: lock {} (flock, exclusive, on an inherited descriptor: taken \
                 by pid {}, outside the tree)",
                locked.display(),
                found[0].lock.pid.unwrap()
            )]
        );
    }

    #[test]
    fn a_flock_is_named_at_its_taker_and_inherited_in_its_child() {
        let path = std::env::temp_dir().join(format!("crac-locks-{}", std::process::id()));
        // flock(1) takes the lock and runs sleep, which inherits the descriptor.
        let mut flock = Command::new("flock")
            .arg("-n")
            .arg(&path)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let taker = flock.id();
        let child = || {
            std::fs::read_to_string(format!("/proc/{taker}/task/{taker}/children"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u32>()
                .ok()
        };
        let started = std::time::Instant::now();
        let sleeper = loop {
            if let Some(pid) = child().filter(|&pid| !held(&[pid], &AgentFacts::new()).is_empty()) {
                break pid;
            }
            assert!(started.elapsed().as_secs() < 10, "flock(1) never ran sleep");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let names = |pids: &[u32]| -> Vec<String> {
            held(pids, &AgentFacts::new())
                .iter()
                .filter(|h| h.path == path.display().to_string())
                .map(ToString::to_string)
                .collect()
        };
        let fd = held(&[sleeper], &AgentFacts::new())[0].fd;
        assert_eq!(
            names(&[sleeper]),
            [format!(
                "pid {sleeper} fd {fd}: lock {} (flock, exclusive, on an inherited descriptor: \
                 taken by pid {taker}, outside the tree)",
                path.display()
            )]
        );
        // Both in the tree: once, at the process that took it.
        let both = names(&[taker, sleeper]);
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(
            both[0].starts_with(&format!("pid {taker} fd "))
                && both[0].ends_with(&format!("lock {} (flock, exclusive)", path.display())),
            "{both:?}"
        );
        let refused = refused(&[sleeper], &AgentFacts::new(), false);
        assert!(
            refused[0].why.contains("start it with flock -o"),
            "{refused:?}"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sleeper as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = flock.kill();
        let _ = flock.wait();
        std::fs::remove_file(&path).unwrap();
    }
}
