//! The watcher: ends a cycle that CRIU leaves open.
//!
//! CRIU runs no action when a dump fails after pre-dump, and none when a `--leave-running`
//! dump is over (criu/cr-dump.c), so nothing would tell a tree that keeps running to come back
//! up. pre-dump therefore leaves this watcher: a fork of crac-action named `crac-watcher`, in
//! its own process group, that is re-parented away from CRIU when pre-dump exits, so it is
//! never part of a dumped tree. It waits (bounded) for the CRIU process to exit, then tells each told process that is
//! still the same live process `after-restore` with reason:
//! - `resumed` if post-dump ran (the image exists; its marker in the agent's folder says so), or
//! - `aborted` if it did not (the dump failed or was cancelled).
//!
//! A process that no longer lives (killed by a normal dump) is left alone: its image will be
//! restored, and post-resume tells the restored copy. Every request carries the cycle token,
//! so a late watcher cannot end a newer cycle. The watcher exits when this is done; it never
//! outlives its dump by more than its own time limits.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crac_agent::protocol::Request;
use crac_core::RestoreReason;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::{setpgid, ForkResult, Pid};

use crate::agents::{ask, describe_hooks, log, Deadline, Outcome};
use crate::post_dump::marker_path;
use crate::settings::Settings;
use crate::tree::{self, ProcessId};

const STEP: &str = "watcher";

/// The first argument that makes crac-action a watcher.
pub const WATCH_ARG: &str = "--watch";

/// What a watcher watches, passed on its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The CRIU process.
    pub criu: ProcessId,
    /// The cycle token sent with before-checkpoint.
    pub cycle: String,
    /// The processes told before-checkpoint, children first.
    pub targets: Vec<ProcessId>,
    /// The most to wait for CRIU.
    pub wait_limit: Duration,
    /// The most to wait for all agents.
    pub timeout: Duration,
}

impl Watch {
    /// A watch on CRIU process `criu_pid` (which must be alive now).
    pub fn new(criu_pid: u32, cycle: &str, targets: &[ProcessId], settings: &Settings) -> Watch {
        Watch {
            criu: ProcessId::of(criu_pid).unwrap_or(ProcessId {
                pid: criu_pid,
                start_time: 0,
            }),
            cycle: cycle.to_owned(),
            targets: targets.to_vec(),
            wait_limit: settings.watcher_timeout,
            timeout: settings.timeout,
        }
    }

    /// The command-line arguments after [`WATCH_ARG`].
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--criu".into(),
            self.criu.to_arg().into(),
            "--cycle".into(),
            self.cycle.clone().into(),
            "--wait".into(),
            self.wait_limit.as_secs_f64().to_string().into(),
            "--timeout".into(),
            self.timeout.as_secs_f64().to_string().into(),
        ];
        args.extend(self.targets.iter().map(|t| OsString::from(t.to_arg())));
        args
    }

    /// Parses [`to_args`](Self::to_args)'s output.
    ///
    /// # Errors
    ///
    /// A line naming the bad argument.
    pub fn from_args(args: &[OsString]) -> Result<Watch, String> {
        let mut watch = Watch {
            criu: ProcessId {
                pid: 0,
                start_time: 0,
            },
            cycle: String::new(),
            targets: Vec::new(),
            wait_limit: Settings::default().watcher_timeout,
            timeout: Settings::default().timeout,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let arg = arg.to_string_lossy();
            let mut value = || {
                it.next()
                    .map(|v| v.to_string_lossy().into_owned())
                    .ok_or_else(|| format!("{arg} needs a value"))
            };
            let secs = |v: String| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| format!("bad number of seconds {v:?}"))
            };
            match &*arg {
                "--criu" => {
                    let v = value()?;
                    watch.criu = ProcessId::parse_arg(&v).ok_or(format!("bad --criu {v:?}"))?;
                }
                "--cycle" => watch.cycle = value()?,
                "--wait" => watch.wait_limit = secs(value()?)?,
                "--timeout" => watch.timeout = secs(value()?)?,
                target => watch
                    .targets
                    .push(ProcessId::parse_arg(target).ok_or(format!("bad target {target:?}"))?),
            }
        }
        if watch.criu.pid == 0 || watch.cycle.is_empty() || watch.targets.is_empty() {
            return Err("a watch needs --criu, --cycle and at least one target".into());
        }
        Ok(watch)
    }
}

/// The watcher's process name (`comm`), as `ps` and `pgrep` show it.
pub const PROCESS_NAME: &str = "crac-watcher";

/// Starts a watcher for `watch` and returns without waiting for it.
///
/// In a single-threaded process (crac-action) the watcher is a plain fork: this runs on
/// CRIU's critical path, and a fork returns in a fraction of the time of starting a program.
/// In a process with threads, where the child of a fork may only call async-signal-safe
/// functions, it is crac-action started again with [`WATCH_ARG`].
///
/// # Errors
///
/// When the process cannot fork, or crac-action's own executable cannot be found or run.
pub fn spawn(watch: &Watch) -> io::Result<()> {
    if single_threaded() {
        // SAFETY: this process has one thread (checked just above, and nothing here starts
        // one in between), so the child may run any code, as after fork in any
        // single-threaded program.
        match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
            ForkResult::Parent { .. } => return Ok(()),
            ForkResult::Child => {
                // Its own process group: job-control signals aimed at CRIU's group do not
                // reach it. stdout/stderr stay CRIU's log; stdin is CRIU's (closed) one.
                let _ = setpgid(Pid::from_raw(0), Pid::from_raw(0));
                let _ = nix::sys::prctl::set_name(c"crac-watcher");
                let code = run(watch, &mut io::stderr().lock());
                std::process::exit(code);
            }
        }
    }
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .arg(WATCH_ARG)
        .args(watch.to_args())
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}

fn single_threaded() -> bool {
    fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// Runs a watcher to the end; returns the exit code.
pub fn run(watch: &Watch, out: &mut dyn Write) -> i32 {
    if let Some(pid) = ancestor_in(&watch.targets) {
        log(
            out,
            STEP,
            &format!(
                "refusing to run: pid {pid}, which is being dumped, is an ancestor of this watcher"
            ),
        );
        return 1;
    }
    if !wait_for_exit(watch.criu, watch.wait_limit) {
        log(
            out,
            STEP,
            &format!(
                "CRIU (pid {}) still runs after {}s; giving up, pids {} stay quiesced until told after-restore",
                watch.criu.pid,
                watch.wait_limit.as_secs(),
                pids(&watch.targets)
            ),
        );
        return 1;
    }
    let deadline = Deadline::after(watch.timeout);
    let mut code = 0;
    // Parents come back up before their children.
    for target in watch.targets.iter().rev() {
        let reason = if take_marker(target.pid, watch.criu.pid) {
            RestoreReason::Resumed
        } else {
            RestoreReason::Aborted
        };
        if !target.is_alive() {
            continue;
        }
        let request = Request::after_restore(reason, Some(watch.cycle.clone()));
        let line = match ask(target.pid, &request, &deadline) {
            Outcome::Done(reply) => format!(
                "pid {}: after_restore ({reason}) ok, {}",
                target.pid,
                describe_hooks(&reply)
            ),
            Outcome::Refused(reply) => {
                let error = reply.error.unwrap_or_default();
                if error.starts_with("no checkpoint in progress") {
                    format!("pid {}: already came back up", target.pid)
                } else {
                    code = 1;
                    format!(
                        "pid {}: after_restore ({reason}) failed: {error}",
                        target.pid
                    )
                }
            }
            Outcome::NoAgent => format!("pid {}: no agent any more", target.pid),
            Outcome::NoAnswer(err) => {
                code = 1;
                format!(
                    "pid {}: after_restore ({reason}) got no answer: {err}",
                    target.pid
                )
            }
        };
        log(out, STEP, &line);
    }
    code
}

fn pids(targets: &[ProcessId]) -> String {
    targets
        .iter()
        .map(|t| t.pid.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn ancestor_in(targets: &[ProcessId]) -> Option<u32> {
    let mut pid = std::process::id();
    for _ in 0..4096 {
        pid = tree::parent_of(pid)?;
        if pid <= 1 {
            return None;
        }
        if targets.iter().any(|t| t.pid == pid) {
            return Some(pid);
        }
    }
    None
}

/// Whether post-dump of this CRIU left its marker for `pid`; removes it.
fn take_marker(pid: u32, criu_pid: u32) -> bool {
    fs::remove_file(marker_path(pid, criu_pid)).is_ok()
}

/// Waits until `process` has exited; false if it still runs after `limit`.
fn wait_for_exit(process: ProcessId, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    // SAFETY: pidfd_open takes two integers and returns a new file descriptor or -1; no memory
    // is shared with the kernel.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, process.pid as libc::c_int, 0) };
    if raw < 0 {
        // No pidfd (old kernel) or the process is gone already.
        while process.is_alive() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        return true;
    }
    // SAFETY: `raw` is a file descriptor pidfd_open just created; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // Checked after opening, so the pidfd is known to refer to this very process.
    if !process.is_alive() {
        return true;
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout =
            PollTimeout::try_from(left.min(Duration::from_secs(3600))).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(n) if n > 0 => return true,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return !process.is_alive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let watch = Watch {
            criu: ProcessId {
                pid: 10,
                start_time: 99,
            },
            cycle: "criu-10-5".into(),
            targets: vec![
                ProcessId {
                    pid: 12,
                    start_time: 100,
                },
                ProcessId {
                    pid: 11,
                    start_time: 101,
                },
            ],
            wait_limit: Duration::from_millis(1500),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(Watch::from_args(&watch.to_args()).unwrap(), watch);
        assert!(Watch::from_args(&["--criu".into()])
            .unwrap_err()
            .contains("--criu needs a value"));
    }

    #[test]
    fn waits_for_a_process_to_exit_and_gives_up_in_time() {
        let mut child = Command::new("sleep").arg("0.2").spawn().unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        assert!(!wait_for_exit(id, Duration::from_millis(20)));
        let reaper = std::thread::spawn(move || child.wait());
        assert!(wait_for_exit(id, Duration::from_secs(10)));
        reaper.join().unwrap().unwrap();
    }
}
