//! The watcher: ends a cycle that CRIU leaves open.
//!
//! CRIU runs no action when a dump fails after pre-dump, and none when a `--leave-running`
//! dump is over (criu/cr-dump.c), so nothing would tell a tree that keeps running to come back
//! up. pre-dump therefore leaves this watcher: a fork of crac-action named `crac-watcher`, in
//! its own process group, that is re-parented away from CRIU when pre-dump exits, so it is
//! never part of a dumped tree. It waits (bounded) for the CRIU process to exit, then tells
//! each told process that is still the same live process `after-restore` with reason:
//! - `resumed` if post-dump ran (the image exists: post-dump said so to the watcher), or
//! - `aborted` if it did not (the dump failed or was cancelled).
//!
//! The watcher listens on an abstract Unix socket named after its CRIU process
//! (`@crac-watcher/<criu pid>/<criu start time>`), which does two things: post-dump connects
//! to it to say that the image was made, and it is the lock that keeps a CRIU that runs its
//! action script twice (CRIU 4.1 under runc) down to one watcher. Only its own uid (and root)
//! are heard. No file is written anywhere, so nothing is left in a container's file system.
//!
//! A process that no longer lives (killed by a normal dump) is left alone: its image will be
//! restored, and post-resume tells the restored copy. Every request carries the cycle token,
//! so a late watcher cannot end a newer cycle. The watcher exits when this is done; it never
//! outlives its dump by more than its own time limits.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

use crac_protocol::wire::{Code, Reason, Request};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{geteuid, setpgid, ForkResult, Pid};

use crate::agent_socket::AgentSocket;
use crate::agents::{ask, describe_hooks, log, Deadline, Outcome};
use crate::settings::Settings;
use crate::tree::{self, ProcessId};

const STEP: &str = "watcher";

/// What post-dump tells the watcher.
const DUMPED: &[u8] = b"post-dump\n";

/// The watcher's process name (`comm`), as `ps` and `pgrep` show it.
pub const PROCESS_NAME: &str = "crac-watcher";

/// What a watcher watches.
#[derive(Debug)]
pub struct Watch {
    /// The CRIU process.
    pub criu: ProcessId,
    /// The cycle token sent with before-checkpoint.
    pub cycle: String,
    /// The processes told before-checkpoint, children first, each with its agent.
    pub targets: Vec<(ProcessId, AgentSocket)>,
    /// The most to wait for CRIU.
    pub wait_limit: Duration,
    /// The most to wait for all agents.
    pub timeout: Duration,
}

impl Watch {
    /// A watch on `criu` for `targets`, with the limits of `settings`.
    pub fn new(
        criu: ProcessId,
        cycle: &str,
        targets: Vec<(ProcessId, AgentSocket)>,
        settings: &Settings,
    ) -> Watch {
        Watch {
            criu,
            cycle: cycle.to_owned(),
            targets,
            wait_limit: settings.watcher_timeout,
            timeout: settings.timeout,
        }
    }
}

/// The watcher's address for one CRIU process.
fn address(criu: ProcessId) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("crac-watcher/{}/{}", criu.pid, criu.start_time))
}

/// Whether a watcher for this CRIU process must be started.
#[derive(Debug)]
pub enum Claim {
    /// None runs yet: this is its socket, to hand to [`spawn`].
    New(UnixListener),
    /// One runs already (this step ran before, for the same CRIU).
    Running,
}

/// Takes the watcher's address for `criu`, or finds the watcher that holds it.
///
/// # Errors
///
/// When the address cannot be taken and is not held by a process of this uid.
pub fn claim(criu: ProcessId) -> io::Result<Claim> {
    let addr = address(criu)?;
    match UnixListener::bind_addr(&addr) {
        Ok(listener) => Ok(Claim::New(listener)),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            let holder = UnixStream::connect_addr(&addr)?;
            check_peer(&holder)?;
            Ok(Claim::Running)
        }
        Err(err) => Err(err),
    }
}

/// Only this uid and root may talk to a watcher, or be one.
fn check_peer(stream: &UnixStream) -> io::Result<()> {
    let peer = getsockopt(stream, PeerCredentials).map_err(io::Error::from)?;
    let own = geteuid().as_raw();
    if peer.uid() == own || peer.uid() == 0 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the watcher's address is held by uid {} (pid {}), not by uid {own}",
            peer.uid(),
            peer.pid()
        )))
    }
}

/// Tells the watcher of `criu` that post-dump ran: the image exists.
///
/// # Errors
///
/// When no watcher of this uid listens (pre-dump left none: no agent was told).
pub fn tell_dumped(criu: ProcessId) -> io::Result<()> {
    let mut stream = UnixStream::connect_addr(&address(criu)?)?;
    check_peer(&stream)?;
    stream.write_all(DUMPED)
}

/// Starts a watcher for `watch` on `listener` (from [`claim`]) and returns without waiting
/// for it. The caller keeps `watch` (the watcher has its own copy): to roll its targets back
/// when this fails.
///
/// The watcher is a plain fork: this runs on CRIU's critical path, and a fork returns in a
/// fraction of the time of starting a program. It inherits the agents' folder handles, so it
/// reaches them as pre-dump did.
///
/// # Errors
///
/// When this process has more than one thread (the child of a fork may then only call
/// async-signal-safe functions; crac-action has one), or cannot fork.
pub fn spawn(watch: &Watch, listener: UnixListener) -> io::Result<()> {
    if !single_threaded() {
        return Err(io::Error::other(
            "the watcher is forked, which needs a single-threaded process",
        ));
    }
    // SAFETY: this process has one thread (checked just above, and nothing here starts one
    // in between), so the child may run any code, as after fork in any single-threaded
    // program.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        ForkResult::Parent { .. } => Ok(()),
        ForkResult::Child => {
            // Its own process group: job-control signals aimed at CRIU's group do not reach
            // it. stdout/stderr stay CRIU's log; stdin is CRIU's (closed) one.
            let _ = setpgid(Pid::from_raw(0), Pid::from_raw(0));
            let _ = nix::sys::prctl::set_name(c"crac-watcher");
            let code = run(watch, &listener, &mut io::stderr().lock());
            std::process::exit(code);
        }
    }
}

fn single_threaded() -> bool {
    crate::procfs::own_threads() == Some(1)
}

/// Runs a watcher to the end; returns the exit code.
pub fn run(watch: &Watch, listener: &UnixListener, out: &mut dyn Write) -> i32 {
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
    // post-dump ran before CRIU exited, so what it said is waiting in the queue.
    let reason = if dumped(listener) {
        Reason::Resumed
    } else {
        Reason::Aborted
    };
    let deadline = Deadline::after(watch.timeout);
    let request = Request::after_restore(reason.clone(), Some(watch.cycle.clone()));
    let mut code = 0;
    // Parents come back up before their children.
    for (target, agent) in watch.targets.iter().rev() {
        if !target.is_alive() {
            continue;
        }
        let line = match ask(agent, &request, &deadline) {
            Outcome::Done(reply) => format!(
                "pid {}: after_restore ({reason}) ok, {}",
                target.pid,
                describe_hooks(&reply)
            ),
            Outcome::Refused(reply) if reply.code == Some(Code::NotCheckpointing) => {
                format!("pid {}: already came back up", target.pid)
            }
            Outcome::Refused(reply) => {
                code = 1;
                format!(
                    "pid {}: after_restore ({reason}) failed: {}",
                    target.pid,
                    reply.error.unwrap_or_default()
                )
            }
            Outcome::NoAgent => format!("pid {}: no agent any more", target.pid),
            Outcome::NoAnswer(err) => {
                code = 1;
                format!(
                    "pid {}: after_restore ({reason}) got no answer: {err}",
                    target.pid
                )
            }
            Outcome::Untrusted(err) => {
                code = 1;
                err.to_string()
            }
        };
        log(out, STEP, &line);
    }
    code
}

/// Whether post-dump said the image was made: reads every connection waiting on `listener`.
fn dumped(listener: &UnixListener) -> bool {
    if listener.set_nonblocking(true).is_err() {
        return false;
    }
    let mut dumped = false;
    while let Ok((mut stream, _)) = listener.accept() {
        if check_peer(&stream).is_err() {
            continue;
        }
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut said = Vec::new();
        let _ = (&mut stream).take(64).read_to_end(&mut said);
        dumped |= said == DUMPED;
    }
    dumped
}

fn pids(targets: &[(ProcessId, AgentSocket)]) -> String {
    targets
        .iter()
        .map(|(t, _)| t.pid.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn ancestor_in(targets: &[(ProcessId, AgentSocket)]) -> Option<u32> {
    let mut pid = std::process::id();
    for _ in 0..4096 {
        pid = tree::parent_of(pid)?;
        if pid <= 1 {
            return None;
        }
        if targets.iter().any(|(t, _)| t.pid == pid) {
            return Some(pid);
        }
    }
    None
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
    use std::process::Command;

    #[test]
    fn waits_for_a_process_to_exit_and_gives_up_in_time() {
        let mut child = Command::new("sleep").arg("0.2").spawn().unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        assert!(!wait_for_exit(id, Duration::from_millis(20)));
        let reaper = std::thread::spawn(move || child.wait());
        assert!(wait_for_exit(id, Duration::from_secs(10)));
        reaper.join().unwrap().unwrap();
    }

    #[test]
    fn one_watcher_per_criu_and_post_dump_is_heard() {
        // Any live process stands in for CRIU: the address is made of its pid and start time.
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let criu = ProcessId::of(child.id()).unwrap();
        let Claim::New(listener) = claim(criu).unwrap() else {
            panic!("the first claim must get the address");
        };
        assert!(matches!(claim(criu).unwrap(), Claim::Running));
        // The probe of the second claim said nothing: it does not count as post-dump.
        assert!(!dumped(&listener));
        tell_dumped(criu).unwrap();
        assert!(dumped(&listener));
        drop(listener);
        // Another test's fork may hold a copy of the socket until it execs: wait for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while tell_dumped(criu).is_ok() {
            assert!(
                Instant::now() < deadline,
                "still heard after the watcher ended"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(claim(criu).unwrap(), Claim::New(_)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
