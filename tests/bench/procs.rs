//! Processes: the binaries under test, targets started as CRIU wants them, reaping (this
//! process is a child subreaper, so dumped, restored and orphaned processes come back to it),
//! crac-action watchers, and what /proc says about a process.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crac_action::tree;
use crac_action::watcher::PROCESS_NAME;

pub(crate) type Res<T> = Result<T, String>;

/// The binaries of this build, and the CRIU to use.
#[derive(Debug)]
pub struct Bins {
    pub crac_action: PathBuf,
    pub crac: PathBuf,
    pub test_target: PathBuf,
    pub bench_target: PathBuf,
    pub warm_start: PathBuf,
    pub cache_server: PathBuf,
    pub upstream: PathBuf,
    pub criu: PathBuf,
    pub criu_version: String,
}

impl Bins {
    pub fn find() -> Res<Bins> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let dir = exe
            .parent()
            .ok_or("no folder for the executable")?
            .to_owned();
        let bin = |name: &str| -> Res<PathBuf> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{} not found: build the workspace first (cargo build --release --workspace)",
                    path.display()
                ))
            }
        };
        let criu = crac_cli::locate::locate().map_err(|e| e.to_string())?;
        Ok(Bins {
            crac_action: bin("crac-action")?,
            crac: bin("crac")?,
            test_target: bin("crac-test-target")?,
            bench_target: bin("crac-bench-target")?,
            // Optional: item 4 says so when it is missing.
            warm_start: dir.join("warm-start"),
            cache_server: bin("cache-server")?,
            upstream: bin("upstream")?,
            criu: criu.path,
            criu_version: criu.version,
        })
    }
}

/// Makes this process a child subreaper: the orphans of dumped and restored trees (and
/// crac-action's watchers) are re-parented here, so they can be reaped and their PIDs freed.
pub(crate) fn become_subreaper() -> Res<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))
}

/// A process the benchmark started or adopted (a restored one).
pub(crate) struct Proc {
    pub pid: u32,
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd` as a session leader with no terminal (as CRIU wants), its stdio on
    /// /dev/null and stderr in `stderr`, and waits (at most `limit`) for `ready` to appear.
    pub(crate) fn start(cmd: Command, ready: &Path, stderr: &Path, limit: Duration) -> Res<Proc> {
        let _ = fs::remove_file(ready);
        let log = File::create(stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        Proc::start_with(cmd, Stdio::null(), log, limit, || ready.exists()).map_err(|err| {
            let said = fs::read_to_string(stderr).unwrap_or_default();
            format!("{err}: {}", said.trim())
        })
    }

    /// Starts `cmd` as a session leader with stdin on /dev/null and the given stdout and
    /// stderr, and waits (at most `limit`) until `ready` says so.
    pub(crate) fn start_with(
        mut cmd: Command,
        stdout: impl Into<Stdio>,
        stderr: File,
        limit: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Res<Proc> {
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let mut proc = Proc {
            pid: child.id(),
            child: Some(child),
        };
        let deadline = Instant::now() + limit;
        while !ready() {
            if let Some(child) = proc.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    proc.child = None;
                    return Err(format!(
                        "{:?} exited ({status}) before it was ready",
                        cmd.get_program()
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{:?} not ready after {limit:?}", cmd.get_program()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(proc)
    }

    /// A process restored by CRIU (re-parented to this subreaper when CRIU exited).
    pub(crate) fn adopt(pid: u32) -> Proc {
        Proc { pid, child: None }
    }

    /// Waits for a process that CRIU killed after dumping it, so its PID is free.
    pub(crate) fn reap_dumped(mut self, limit: Duration) -> Res<()> {
        match self.child.take() {
            Some(mut child) => {
                let deadline = Instant::now() + limit;
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) => break,
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Ok(None) => {
                            return Err(format!("pid {} still runs after the dump", self.pid))
                        }
                        Err(e) => return Err(format!("wait for pid {}: {e}", self.pid)),
                    }
                }
            }
            None => reap(self.pid, limit)?,
        }
        self.pid = 0;
        Ok(())
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        if self.pid == 0 {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        match self.child.take() {
            Some(mut child) => {
                let _ = child.wait();
            }
            None => {
                let _ = reap(self.pid, Duration::from_secs(10));
            }
        }
        // A killed process cannot remove its agent folder.
        let _ = fs::remove_dir_all(crac_protocol::location::agent_dir(self.pid));
        self.pid = 0;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// Reaps `pid` (a child, or an orphan re-parented here), waiting at most `limit`.
pub(crate) fn reap(pid: u32, limit: Duration) -> Res<()> {
    let deadline = Instant::now() + limit;
    loop {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::ECHILD) => {
                // Not (or no longer) ours: wait until it is gone all the same.
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return Ok(());
                }
            }
            Err(e) => return Err(format!("cannot reap pid {pid}: {e}")),
        }
        if Instant::now() > deadline {
            return Err(format!("pid {pid} did not exit within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Spawns `cmd` (stdin /dev/null), waits for it, and returns its status and the wall time of
/// spawn + wait.
pub(crate) fn run_timed(cmd: &mut Command) -> Res<(ExitStatus, Duration)> {
    cmd.stdin(Stdio::null());
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    Ok((status, started.elapsed()))
}

pub(crate) fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

/// crac-action watchers (named `crac-watcher`) that are children of this process
/// (re-parented here when the crac-action that forked them exited). Others' watchers are left
/// alone.
pub(crate) fn our_watchers() -> Vec<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| {
            tree::parent_of(pid) == Some(me)
                && tree::ProcessId::of(pid).is_some()
                && comm(pid) == PROCESS_NAME
        })
        .collect()
}

/// Kills and reaps our watchers; returns how many there were.
pub(crate) fn kill_watchers() -> usize {
    let watchers = our_watchers();
    for &pid in &watchers {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    for &pid in &watchers {
        let _ = reap(pid, Duration::from_secs(5));
    }
    watchers.len()
}

/// Reaps exited children of ours (watchers that ended on their own: re-parented here, they
/// are not anyone's `Child`), except `keep`.
pub(crate) fn reap_zombies(keep: &[u32]) {
    let me = std::process::id();
    for pid in all_pids() {
        if !keep.contains(&pid)
            && tree::parent_of(pid) == Some(me)
            && tree::state_of(pid) == Some('Z')
            && matches!(comm(pid).as_str(), "crac-action" | PROCESS_NAME)
        {
            let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// A `Key:   value` field of a /proc status file, as its first number.
pub(crate) fn status_field(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The thread of `pid` named `name`, if any.
pub(crate) fn thread_named(pid: u32, name: &str) -> Option<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|tid| {
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim_end() == name)
        })
}

/// Voluntary + non-voluntary context switches of one thread.
pub(crate) fn ctxt_switches(pid: u32, tid: u32) -> Option<(u64, u64)> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    Some((
        status_field(&path, "voluntary_ctxt_switches")?,
        status_field(&path, "nonvoluntary_ctxt_switches")?,
    ))
}

/// Free bytes on the filesystem holding `path`, and its type name.
pub(crate) fn fs_info(path: &Path) -> Option<(u64, String)> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    let free = st.blocks_available() as u64 * st.block_size() as u64;
    let magic = st.filesystem_type().0 as i64;
    let name = match magic {
        0x0102_1994 => "tmpfs",
        0xEF53 => "ext2/3/4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794C_7630 => "overlayfs",
        _ => "other",
    };
    Some((free, format!("{name} (magic {magic:#x})")))
}

/// MemAvailable in bytes.
pub(crate) fn mem_available() -> Option<u64> {
    status_field("/proc/meminfo", "MemAvailable").map(|kb| kb * 1024)
}
