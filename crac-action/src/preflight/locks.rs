//! File locks held by the tree (flocks, POSIX and OFD locks), from the kernel's lock table:
//! CRIU refuses to dump a process holding one ("Some file locks are hold by dumping tasks")
//! unless told `--file-locks`, which takes them into the image.
//!
//! `/proc/locks` names each lock's file by inode; the tree's descriptors on such a file are
//! found from the inodes a process's agent tells with its facts, or else from `/proc/PID/fd`
//! (a `stat` each, only when the table holds a lock at all), and each one's `fdinfo` says
//! which locks are held through it.
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

/// Every lock held through a descriptor of the processes `pids`, each once (a flock shared by
/// several descriptors is named at the one of the process that took it, if it is in the tree).
/// A process whose agent told its regular files (`facts`) is not looked at through `/proc`.
pub fn held(pids: &[u32], facts: &AgentFacts) -> Vec<HeldLock> {
    let table = procfs::file_locks();
    let inodes: HashSet<u64> = table
        .iter()
        .filter(|l| l.kind != LockKind::Other)
        .map(|l| l.inode)
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut held: Vec<HeldLock> = Vec::new();
    for &pid in pids {
        let told = facts.get(&pid).and_then(|f| f.files.as_ref()).map(|files| {
            files
                .iter()
                .filter_map(|&(fd, inode)| Some((u32::try_from(fd).ok()?, inode)))
                .collect::<Vec<_>>()
        });
        let Some(files) = told.or_else(|| procfs::regular_file_inodes(pid)) else {
            continue;
        };
        let mut mapped = None;
        for (fd, inode) in files {
            if !inodes.contains(&inode) {
                continue;
            }
            let Some(path) = procfs::fd_target(pid, fd) else {
                continue;
            };
            for lock in procfs::fd_locks(pid, fd) {
                if lock.kind == LockKind::Other || lock.inode != inode {
                    continue;
                }
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
                let same =
                    |h: &HeldLock| h.lock == lock && (lock.kind != LockKind::Posix || h.pid == pid);
                match held.iter_mut().find(|h| same(h)) {
                    // The one that took it, rather than a child that shares it.
                    Some(known) if known.inherited_from.is_some() && inherited_from.is_none() => {
                        *known = HeldLock {
                            pid,
                            fd,
                            path: path.clone(),
                            lock,
                            inherited_from,
                            on_mapped_file,
                        };
                    }
                    Some(_) => {}
                    None => held.push(HeldLock {
                        pid,
                        fd,
                        path: path.clone(),
                        lock,
                        inherited_from,
                        on_mapped_file,
                    }),
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
