//! The fault matrix, against the real CRIU: each fault injected on purpose into a real dump,
//! asserting where the service ends up (running and rolled back, or dumped), what it was told,
//! what the operator reads, and that no process or file is left behind.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{
    self, after_all, agent_dir, concat, read_lines, text, wait_until, Crac, Scratch, Target,
    BEFORE_ALL,
};

/// Processes below this one (its children, and theirs) whose command name is `comm`.
fn ours_named(comm: &str) -> Vec<u32> {
    let me = std::process::id();
    util::processes_named(comm)
        .into_iter()
        .filter(|&pid| descends_from(pid, me))
        .collect()
}

fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        match crac_action::tree::parent_of(pid) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => pid = parent,
            _ => return false,
        }
    }
    false
}

/// Kills every crac-action below this process; returns how many.
fn kill_crac_action() -> usize {
    let found = ours_named("crac-action");
    for &pid in &found {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    found.len()
}

/// Nothing of crac-action's may be left running once the dust settles.
fn nothing_left_running() {
    wait_until(
        Duration::from_secs(20),
        "crac-action and its watchers to exit",
        || util::watchers().is_empty() && ours_named("crac-action").is_empty(),
    );
}

/// crac-action killed while a hook runs: the dump fails, crac says crac-action was killed,
/// and the service, whose reply nobody read, comes back up ("aborted") and runs on.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn crac_action_killed_during_pre_dump() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("fault-killed");
    let crac = Crac::new(&scratch);
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_HANG", "second:1500"),
            ("CRAC_TEST_HOOK_LIMIT_MS", "10000"),
        ],
    );
    let pid = target.pid.to_string();
    let out = std::thread::scope(|scope| {
        let checkpoint = scope.spawn(|| crac.run(&["checkpoint", &pid, "--name", "x"]));
        wait_until(Duration::from_secs(10), "the hooks to start", || {
            target.hooks().iter().any(|l| l == "before second")
        });
        assert_eq!(kill_crac_action(), 1);
        checkpoint.join().expect("crac")
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hint: crac-action was killed before it finished"),
        "{}",
        text(&out)
    );
    // What really happened to the service, not "rolled back": nobody could roll it back.
    assert!(
        stderr.starts_with(&format!(
            "crac: criu dump of pid {pid} failed (exit code 1); pid {pid} is still running; an agent that crac-action had told ends that checkpoint by itself when its lease runs out"
        )),
        "{}",
        text(&out)
    );
    wait_until(
        Duration::from_secs(10),
        "the service to come back up",
        || target.hooks().len() == 6,
    );
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    target.assert_serving(target.state().expect("state").counter);
    assert!(
        !crac.listing().contains(&"x".to_owned()),
        "{:?}",
        crac.listing()
    );
    nothing_left_running();
}

/// crac-action killed after one agent (the child's) answered and before it left a watcher:
/// nobody will end the child's checkpoint, so the child ends it when its lease runs out
/// (crac-action's limit + 10 s); the parent, whose reply was lost, comes back up at once.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn crac_action_killed_after_an_agent_answered() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("fault-lease");
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_CHILD", "1"),
            ("CRAC_TEST_HANG", "second:1500"),
            ("CRAC_TEST_HOOK_LIMIT_MS", "10000"),
        ],
    );
    let child: u32 = fs::read_to_string(target.dir.join("child/ready"))
        .expect("child ready")
        .trim()
        .parse()
        .expect("child pid");
    let child_hooks = || read_lines(&target.dir.join("child/hooks.log"));
    let dump = std::thread::scope(|scope| {
        let dump = scope.spawn(|| {
            env.dump(
                target.pid,
                &scratch.join("img"),
                &[],
                &[("CRAC_ACTION_TIMEOUT", "1")],
            )
        });
        wait_until(
            Duration::from_secs(10),
            "the parent's hooks to start",
            || target.hooks().iter().any(|l| l == "before second"),
        );
        assert_eq!(child_hooks(), ["before child-b", "before child-a"]);
        assert_eq!(kill_crac_action(), 1);
        dump.join().expect("dump")
    });
    assert!(!dump.ok(), "{dump:?}");
    assert!(dump.log.contains("killed by signal 9"), "{dump:?}");
    let started = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the child's lease to run out",
        || child_hooks().len() == 4,
    );
    assert_eq!(
        child_hooks(),
        [
            "before child-b",
            "before child-a",
            "after child-a aborted gen=0",
            "after child-b aborted gen=0"
        ]
    );
    // Not before its lease: crac-action's limit (1 s) + 10 s, less the time already gone.
    assert!(
        started.elapsed() > Duration::from_secs(5),
        "the child came back up after {:?}, before its lease ran out",
        started.elapsed()
    );
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    target.assert_serving(target.state().expect("state").counter);
    nothing_left_running();
    target.end_with_child(child);
}

/// CRIU killed after pre-dump, while it dumps memory: the watcher sees CRIU gone without a
/// post-dump, and tells the service, which runs on, "aborted".
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn criu_killed_after_pre_dump() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("fault-criu");
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_MIB", "768")]);
    let images = scratch.join("img");
    let dump = std::thread::scope(|scope| {
        let dump = scope.spawn(|| env.dump(target.pid, &images, &[], &[]));
        wait_until(Duration::from_secs(10), "pre-dump to finish", || {
            fs::read_to_string(images.join("dump.log"))
                .is_ok_and(|log| log.contains("ready for the dump"))
        });
        let criu: Vec<u32> = ours_named("ld-linux-x86-64")
            .into_iter()
            .chain(ours_named("criu"))
            .collect();
        assert!(!criu.is_empty(), "no CRIU process found");
        for pid in criu {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        dump.join().expect("dump")
    });
    assert!(!dump.ok(), "{dump:?}");
    wait_until(
        Duration::from_secs(10),
        "the watcher to end the cycle",
        || target.hooks().len() == 6,
    );
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    assert!(target.is_alive(), "the service was lost");
    target.assert_serving(target.state().expect("state").counter);
    nothing_left_running();
}

/// The service stopped (SIGSTOP) when the dump asks it: crac-action gives up after its limit
/// and the dump fails; when the service runs again, the request whose client left is not run.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_stopped_service_is_not_dumped_and_runs_no_late_hooks() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("fault-stopped");
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = Pid::from_raw(target.pid as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let dump = env.dump(
        target.pid,
        &scratch.join("img"),
        &[],
        &[("CRAC_ACTION_TIMEOUT", "1")],
    );
    assert!(!dump.ok(), "{dump:?}");
    assert!(dump.log.contains("did not reply within 1s"), "{dump:?}");
    nothing_left_running();
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let counter = target.state().expect("state").counter;
    target.assert_serving(counter);
    // Give the agent time to see the requests queued while it was stopped.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        target.hooks().is_empty(),
        "late hooks: {:?}",
        target.hooks()
    );
}

/// The agent's folder removed (a /tmp cleaner): a checkpoint is refused with the reason rather
/// than made without hooks; the agent makes its socket again, and the next one works.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_removed_agent_folder_is_refused_then_made_again() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("fault-folder");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_SOCKET_CHECK_MS", "3000")]);
    fs::remove_dir_all(agent_dir(target.pid)).expect("remove the agent folder");
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "x", "--leave-running"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "pid {pid} runs a crac agent (its crac-agent thread) but there is no socket at {}",
            agent_dir(target.pid).join("agent.sock").display()
        )),
        "{}",
        text(&out)
    );
    assert!(
        stderr.contains("hint: the service's agent socket was removed"),
        "{stderr}"
    );
    assert!(target.hooks().is_empty());
    wait_until(
        Duration::from_secs(10),
        "the agent to make its socket again",
        || agent_dir(target.pid).join("agent.sock").exists(),
    );
    let out = crac.run(&["checkpoint", &pid, "--name", "x", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
        target.hooks().len() == 6
    });
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("resumed", 1))
    );
    nothing_left_running();
}

/// A silent client and a slow one on the agent during a real dump: the dump does not wait for
/// them, and since the process may be frozen as soon as its hooks have run (and CRIU refuses
/// a process holding a connection to the outside), they are told to ask again later and their
/// connections closed.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn slow_and_silent_clients_do_not_hold_up_a_dump() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("fault-clients");
    let target = Target::start(&scratch.join("t"), &[]);
    let socket = agent_dir(target.pid).join("agent.sock");
    let silent = UnixStream::connect(&socket).expect("connect");
    let (dump, silent_reply, trickled) = std::thread::scope(|scope| {
        let trickle = scope.spawn(|| {
            let mut stream = UnixStream::connect(&socket).expect("connect");
            for byte in b"{\"v\":1,\"op\":\"status\"}\n" {
                if stream.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(400));
            }
            let mut reply = String::new();
            let _ = stream.read_to_string(&mut reply);
            reply
        });
        // Both are connected (the trickle has sent its first byte) before the dump asks.
        std::thread::sleep(Duration::from_millis(100));
        let dump = env.dump(target.pid, &scratch.join("img"), &["--leave-running"], &[]);
        let mut reply = String::new();
        (&silent)
            .read_to_string(&mut reply)
            .expect("the silent client's reply");
        (dump, reply, trickle.join().expect("trickle"))
    });
    assert!(dump.ok(), "{dump:?}");
    for reply in [&silent_reply, &trickled] {
        assert!(
            reply.contains("a checkpoint is being taken now: ask again when it is over"),
            "{reply}"
        );
    }
    wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
        target.hooks().len() == 6
    });
    assert_eq!(
        target.hooks(),
        concat(&BEFORE_ALL, &after_all("resumed", 1))
    );
    nothing_left_running();
}
