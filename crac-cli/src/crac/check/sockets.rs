//! Can this CRIU dump the sockets a service holds, on this kernel? Asked of CRIU itself: a
//! version says little (CRIU 4.1 dumps TCP sockets on older kernels and fails on current ones),
//! so a throwaway child holding a TCP listener and a UDP socket is dumped with
//! `--leave-running`, then ended.

use std::fs;
use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

use crac_cli::criu::CriuCommand;

/// Runs the probe: whether it passed, and a line saying what was found.
pub(super) fn probe(criu: &Path) -> (bool, String) {
    // The dump holds this process's memory and environment: a private folder with a name
    // nobody can guess or make first (a predictable one let another user redirect root's CRIU
    // through their links, and read the dump).
    let images = match crac_fs::TempDir::new("crac-check") {
        Ok(images) => images,
        Err(err) => return (false, format!("cannot create a scratch folder: {err}")),
    };
    let started = Instant::now();
    let result = dump_a_socket_holder(criu, images.path());
    let took = started.elapsed().as_secs_f64() * 1e3;
    drop(images);
    match result {
        Ok(()) => (
            true,
            format!(
                "CRIU dumps a process holding a TCP listener and a UDP socket ({took:.0} ms probe)"
            ),
        ),
        Err(log) => (false, verdict(&log)),
    }
}

/// What a failed probe's log means.
fn verdict(log: &str) -> String {
    if log.contains("Can't get 1:16 opt") {
        return "this CRIU cannot dump TCP or UDP sockets on this kernel (it asks for SO_PASSCRED \
                on them, which this kernel refuses: \"Can't get 1:16 opt\"); every service \
                holding a listener would fail to dump. CRIU 4.2 fixed it"
            .to_owned();
    }
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error (") && !l.contains("RLIMIT_NOFILE"))
        .take(3)
        .collect();
    format!(
        "CRIU could not dump a process holding a TCP listener and a UDP socket: {}",
        if errors.is_empty() {
            log.lines().last().unwrap_or("no log").to_owned()
        } else {
            errors.join(" / ")
        }
    )
}

/// Dumps a child that holds the sockets; on failure returns CRIU's log.
fn dump_a_socket_holder(criu: &Path, images: &Path) -> Result<(), String> {
    let (ready, ready_w) = nix::unistd::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    // SAFETY: `crac check` has one thread at this point (it starts none), so the child may run
    // any code; it only makes two sockets and waits to be killed.
    let child = match unsafe { fork() }.map_err(|e| format!("cannot fork: {e}"))? {
        ForkResult::Child => {
            drop(ready);
            // What CRIU wants of a dumpable root: a session leader with no terminal.
            let _ = nix::unistd::setsid();
            if let Ok(null) = fs::File::options().read(true).write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdin(&null);
                let _ = nix::unistd::dup2_stdout(&null);
                let _ = nix::unistd::dup2_stderr(&null);
            }
            let sockets = (
                TcpListener::bind("127.0.0.1:0"),
                UdpSocket::bind("127.0.0.1:0"),
            );
            drop(ready_w);
            let _sockets = sockets;
            loop {
                nix::unistd::pause();
            }
        }
        ForkResult::Parent { child } => child,
    };
    drop(ready_w);
    // The child closes its end once its sockets exist.
    let _ = fs::File::from(ready).read(&mut [0u8; 1]);
    // A child's pid is positive.
    let pid = child.as_raw().unsigned_abs();
    let output = CriuCommand::probe_dump(criu, pid, images)
        .command()
        .output();
    let _ = kill(Pid::from_raw(child.as_raw()), Signal::SIGKILL);
    let _ = waitpid(child, None);
    match output {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{}{}",
            fs::read_to_string(images.join("dump.log")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(err) => Err(format!("cannot run {}: {err}", criu.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_criu_that_cannot_dump_inet_sockets_is_named_for_what_it_is() {
        // Two lines of CRIU 4.1.1's log dumping a TCP listener on a 6.18 kernel.
        let log = "(00.011) Error (criu/sockets.c:605): sockets: Can't get 1:16 opt: Operation not supported\n\
                   (00.011) Error (criu/cr-dump.c:1689): Dump files (pid: 4242) failed with -1\n";
        assert!(verdict(log).starts_with("this CRIU cannot dump TCP or UDP sockets on this kernel"));
        let log = "(00.002) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   (00.010) Error (criu/proc_parse.c:1): can't read something\n";
        assert_eq!(
            verdict(log),
            "CRIU could not dump a process holding a TCP listener and a UDP socket: \
             (00.010) Error (criu/proc_parse.c:1): can't read something"
        );
    }
}
