//! `crac upgrade` under a bounded loopback load (keep-alive clients and clients that open a
//! connection per request): each level, the rollbacks, a service without an agent, and one
//! that only speaks systemd's socket-activation convention. What clients saw is counted by
//! crac_test_support::http_load.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crac_test_support::http_load::{Load, Options, Tally};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::util::{self, bin, free_port, reap, text, wait_until, Crac, Scratch};

/// A service under test: a child of this test, a session leader with its output appended to
/// a file (a checkpoint wants both). Killed when dropped, unless it ended first.
struct Service {
    pid: u32,
    child: Option<Child>,
}

impl Service {
    /// `cmd` as a session leader, its output appended to `log`.
    fn spawn(mut cmd: Command, log: &Path) -> Service {
        let log = crac_fs::open_append(log).expect("log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = util::session_leader(&mut cmd)
            .spawn()
            .expect("the service starts");
        Service {
            pid: child.id(),
            child: Some(child),
        }
    }

    fn start(program: &Path, dir: &Path, port: u16, env: &[(&str, &str)]) -> Service {
        let mut cmd = Command::new(program);
        cmd.current_dir(dir)
            .env("PORT", port.to_string())
            .env("STATE_FILE", dir.join("state"))
            .envs(env.iter().copied());
        let service = Service::spawn(cmd, &dir.join("v1.log"));
        util::wait_listening(port, Duration::from_secs(10), "the service to listen");
        service
    }

    /// The example `upgradable` (v1) in `scratch`, on `port`.
    fn upgradable(scratch: &Scratch, port: u16, env: &[(&str, &str)]) -> Service {
        Service::start(&bin("upgradable"), &scratch.path, port, env)
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for it to end by itself and asserts how it did: `status` of its pid.
    fn assert_ended(mut self, status: impl FnOnce(Pid) -> WaitStatus) {
        self.child = None;
        let pid = Pid::from_raw(self.pid as i32);
        assert_eq!(reap(self.pid, Duration::from_secs(10)), status(pid));
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A new version: an orphan re-parented to this test (its parent, crac, has exited), killed
/// and reaped when dropped, so that a failed test leaves nothing running.
struct Orphan(u32);

impl Drop for Orphan {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.0 as i32);
        if kill(pid, Signal::SIGKILL).is_ok() {
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

/// One answer, on a connection of its own.
fn get(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
}

/// The load every test puts on the service.
fn load(port: u16) -> Load {
    Load::start(Options {
        port,
        keep_alive: 4,
        fresh: 2,
        pause: Duration::from_millis(5),
    })
}

/// What each test here starts from (after util::env): a scratch folder `name`, crac with its
/// store in it, and a free port.
fn setup(name: &str) -> (Scratch, Crac, u16) {
    let scratch = Scratch::new(name);
    let crac = Crac::new(&scratch);
    (scratch, crac, free_port())
}

/// Asserts crac succeeded: its standard error.
fn succeeded(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts `stderr` says each of `says`.
fn assert_says(stderr: &str, says: &[&str]) {
    for said in says {
        assert!(stderr.contains(said), "{stderr}");
    }
}

/// The children of `pid`, whichever of its threads started them, lowest first.
fn children(pid: u32) -> Vec<u32> {
    let mut all: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    all.sort_unstable();
    all
}

/// Runs `crac upgrade` under load: the clients' tally, crac's output, and when it returned.
fn upgrade_under_load(crac: &Crac, port: u16, args: &[&str]) -> (Tally, Output, Instant) {
    let load = load(port);
    std::thread::sleep(Duration::from_millis(300));
    let out = crac.run(&[&["upgrade"], args].concat());
    let done = Instant::now();
    // At least 300 ms more, and until the clients have had answers sent after the upgrade
    // (a busy machine can keep a client in a request to the old version that long).
    let before = load.answered();
    std::thread::sleep(Duration::from_millis(300));
    let deadline = done + Duration::from_secs(10);
    while load.answered() < before + 30 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    (load.stop(), out, done)
}

/// `crac run`, stopped when dropped (SIGTERM, which it forwards to its service; SIGKILL if
/// that is not enough), so that a failed test leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pid crac's report names as the new version ("... to pid N ...").
fn new_pid(out: &Output) -> u32 {
    let err = String::from_utf8_lossy(&out.stderr);
    let at = err.rfind(" to pid ").expect("crac names the new pid");
    err[at + 8..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a pid")
}

fn assert_nothing_lost(tally: &Tally, what: &str) {
    assert_eq!(tally.refused, 0, "{what}: refused connections");
    assert!(
        tally.failed.is_empty(),
        "{what}: failed requests: {:?}",
        tally.failed
    );
    assert!(
        tally.answers.len() > 50,
        "{what}: too little load: {}",
        tally.answers.len()
    );
}

fn assert_all_from(tally: &Tally, since: Instant, version: &str) {
    let after: Vec<&str> = tally
        .between(since, None)
        .map(|a| a.body.as_str())
        .collect();
    assert!(!after.is_empty(), "no answer after the upgrade");
    let other: Vec<&&str> = after.iter().filter(|b| !b.starts_with(version)).collect();
    assert!(other.is_empty(), "answers not from {version}: {other:?}");
}

/// The highest request count any answer gave (`hits=N`).
fn max_hits(tally: &Tally) -> usize {
    tally
        .answers
        .iter()
        .filter_map(|a| {
            a.body
                .split("hits=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// A copy of `program` in `dir`: another executable, as a new build is.
fn new_build(program: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join("upgradable-v2");
    std::fs::copy(program, &copy).expect("copy the binary");
    copy
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn handoff_passes_the_listener_and_refuses_nothing() {
    let Some(_env) = util::env() else { return };
    let (scratch, crac, port) = setup("upgrade-handoff");
    let v1 = Service::upgradable(&scratch, port, &[]);
    let v2 = new_build(&bin("upgradable"), &scratch.path);
    let log = scratch.join("v2.log");
    let pid = v1.pid().to_string();
    let (tally, out, done) = upgrade_under_load(
        &crac,
        port,
        &[
            &pid,
            "--env",
            "APP_VERSION=v2",
            "--log",
            log.to_str().unwrap(),
            "--",
            v2.to_str().unwrap(),
        ],
    );
    let stderr = succeeded(&out);
    // auto: not state (another executable), so handoff, from the agent, by name.
    assert_says(
        &stderr,
        &[
            "level handoff",
            "is not pid",
            "1 listener from its agent: http",
            "told to retire by its agent",
        ],
    );
    let _new = Orphan(new_pid(&out));
    assert_nothing_lost(&tally, "handoff");
    assert!(tally.answers.iter().any(|a| a.body.starts_with("v1 ")));
    assert_all_from(&tally, done, "v2 ");
    // v1 flushed its count when it retired, and v2 read it back: the count runs on.
    assert!(
        max_hits(&tally) >= tally.answers.len(),
        "{}",
        max_hits(&tally)
    );
    // v1 retired and exited by itself.
    v1.assert_ended(|pid| WaitStatus::Exited(pid, 0));
    let v1_log = std::fs::read_to_string(scratch.join("v1.log")).unwrap();
    assert!(
        v1_log.contains("upgradable v1: retired after hits="),
        "{v1_log}"
    );
    eprintln!(
        "handoff: {} answers, {} retried on a new connection, p99 {:?}",
        tally.answers.len(),
        tally.retried,
        Tally::p99(tally.answers.iter())
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_new_version_that_fails_is_rolled_back_and_the_old_one_serves_on() {
    let Some(_env) = util::env() else { return };
    let (scratch, crac, port) = setup("upgrade-rollback");
    let v1 = Service::upgradable(&scratch, port, &[]);
    let upgradable = bin("upgradable");
    let pid = v1.pid().to_string();
    for (crash, expected, last_line) in [
        (
            "CRASH=start",
            "exited with code 2 before it was ready",
            "CRASH=start: giving up before listening",
        ),
        (
            "CRASH=never-ready",
            "did not say READY=1 (NOTIFY_SOCKET) within 2.00 s",
            "upgradable v2: pid",
        ),
        (
            "CRASH=after-ready",
            "exited with code 3 after it said it was ready, before the old one was told to retire",
            "CRASH=after-ready: exiting after READY=1",
        ),
    ] {
        let (tally, out, done) = upgrade_under_load(
            &crac,
            port,
            &[
                &pid,
                "--level",
                "handoff",
                "--ready-timeout",
                "2",
                "--settle",
                "1",
                "--env",
                "APP_VERSION=v2",
                "--env",
                crash,
                "--",
                upgradable.to_str().unwrap(),
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{crash}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{crash}: {stderr}");
        assert!(
            stderr.contains(&format!("and pid {pid} serves on (never told to retire)")),
            "{crash}: {stderr}"
        );
        assert!(stderr.contains("its last lines:"), "{crash}: {stderr}");
        assert!(stderr.contains(last_line), "{crash}: {stderr}");
        assert_nothing_lost(&tally, crash);
        // v2 may have answered while it ran (it shared the listener); after, v1 alone.
        assert_all_from(&tally, done, "v1 ");
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{crash}: v1 is gone"
        );
    }
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_service_with_no_crac_code_and_no_agent_is_handed_over_by_pidfd_and_sigterm() {
    let Some(_env) = util::env() else { return };
    let (scratch, crac, port) = setup("upgrade-activation");
    let program = bin("crac-test-activation");
    let v1 = Service::start(&program, &scratch.path, port, &[("VERSION", "v1")]);
    let pid = v1.pid().to_string();
    let (tally, out, done) = upgrade_under_load(
        &crac,
        port,
        &[&pid, "--env", "VERSION=v2", "--", program.to_str().unwrap()],
    );
    let stderr = succeeded(&out);
    assert_says(
        &stderr,
        &[
            "level handoff",
            &format!("copied with pidfd_getfd (no agent; 127.0.0.1:{port})"),
            "sent SIGTERM (no agent)",
        ],
    );
    let _new = Orphan(new_pid(&out));
    assert_nothing_lost(&tally, "activation");
    assert_all_from(&tally, done, "v2 ");
    let v2_log = std::fs::read_to_string(crac.store.join("crac-test-activation.log")).unwrap();
    assert!(v2_log.contains("activation v2: pid"), "{v2_log}");
    assert!(v2_log.contains("(passed listener)"), "{v2_log}");
    v1.assert_ended(|pid| WaitStatus::Exited(pid, 0));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn restart_stops_then_starts_and_reports_its_downtime() {
    let Some(_env) = util::env() else { return };
    let (scratch, crac, port) = setup("upgrade-restart");
    let v1 = Service::upgradable(&scratch, port, &[]);
    let pid = v1.pid().to_string();
    let upgradable = bin("upgradable");
    let (tally, out, done) = upgrade_under_load(
        &crac,
        port,
        &[
            &pid,
            "--level",
            "restart",
            "--env",
            "APP_VERSION=v2",
            "--",
            upgradable.to_str().unwrap(),
        ],
    );
    let stderr = succeeded(&out);
    assert_says(&stderr, &["level restart (asked for)", "; downtime "]);
    let _new = Orphan(new_pid(&out));
    assert_all_from(&tally, done, "v2 ");
    // Started after v1 flushed: the count runs on.
    assert!(max_hits(&tally) >= tally.answers.len());
    v1.assert_ended(|pid| WaitStatus::Exited(pid, 0));
    eprintln!(
        "restart: {} refused, {} failed, {} answers",
        tally.refused,
        tally.failed.len(),
        tally.answers.len()
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn state_keeps_the_memory_and_hands_the_new_settings_to_after_restore() {
    let Some(_env) = util::env() else { return };
    let (scratch, crac, port) = setup("upgrade-state");
    let v1 = Service::upgradable(&scratch, port, &[]);
    let pid = v1.pid();
    // The dumped v1 is reaped as soon as it is gone (the restore needs its pid free), as a
    // supervisor would.
    let mut v1 = v1;
    let mut child = v1.child.take().expect("v1 runs");
    // Right after the dump ended v1, before the restore can begin (it needs the pid this wait
    // frees), a new client connects: the one a gap with nothing listening would refuse.
    let in_the_gap = std::thread::spawn(move || {
        let _ = child.wait();
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
            .map_err(|err| format!("connect in the gap: {err}"))?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .and_then(|()| {
                let mut answer = String::new();
                stream.read_to_string(&mut answer).map(|_| answer)
            })
            .map_err(|err| format!("request in the gap: {err}"))
    });
    // The restored copy (the same pid) is an orphan re-parented to this test.
    let _restored = Orphan(pid);
    let upgradable = bin("upgradable");
    let (tally, out, done) = upgrade_under_load(
        &crac,
        port,
        &[
            &pid.to_string(),
            "--env",
            "APP_VERSION=v2",
            "--",
            upgradable.to_str().unwrap(),
        ],
    );
    let stderr = succeeded(&out);
    assert_says(
        &stderr,
        &[
            "level state (the same executable",
            &format!("upgraded pid {pid} in place"),
        ],
    );
    // The same process, its memory kept: the count went on without a state file.
    assert_all_from(&tally, done, "v2 ");
    assert!(tally
        .between(done, None)
        .all(|a| a.body.ends_with(&format!("pid={pid}\n"))));
    assert!(max_hits(&tally) >= tally.answers.len());
    assert!(!scratch.join("state").exists(), "v1 never retired");
    // crac held copies of the listener from the dump to the restore: connections that arrived
    // meanwhile waited in its queue and were answered by the restored process.
    assert_nothing_lost(&tally, "state");
    let gap = in_the_gap.join().expect("the gap's client ran");
    let gap = gap.unwrap_or_else(|err| panic!("{err}\n{stderr}"));
    assert!(
        gap.contains("v2 ") && gap.contains(&format!("pid={pid}\n")),
        "{gap}"
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn under_crac_run_the_upgrade_is_done_by_crac_run_which_stays_the_parent() {
    let Some(_env) = util::env() else { return };
    let (scratch, crac, port) = setup("upgrade-run");
    let log = scratch.join("service.log");
    let mut run = crac.command(&[
        "run",
        "--image",
        "upgradable",
        "--log",
        log.to_str().unwrap(),
        "--",
        bin("upgradable").to_str().unwrap(),
    ]);
    run.current_dir(&scratch.path)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut run = Running(run.spawn().expect("crac run starts"));
    util::wait_listening(port, Duration::from_secs(10), "the service to listen");
    let run_pid = run.0.id();
    let v1 = children(run_pid)[0];
    let v2 = new_build(&bin("upgradable"), &scratch.path);
    // Named by the service's pid: crac run, its parent, does the upgrade.
    let (tally, out, done) = upgrade_under_load(
        &crac,
        port,
        &[
            &v1.to_string(),
            "--env",
            "APP_VERSION=v2",
            "--",
            v2.to_str().unwrap(),
        ],
    );
    let stderr = succeeded(&out);
    assert_says(
        &stderr,
        &["the service runs under crac run, which upgrades it"],
    );
    let new = new_pid(&out);
    assert_nothing_lost(&tally, "under crac run");
    assert_all_from(&tally, done, "v2 ");
    // crac run is the new version's parent, and still runs.
    assert_eq!(children(run_pid), [new]);
    // A rollback, named by crac run's pid: the exit status of the new version is told.
    let out = crac.run(&[
        "upgrade",
        &run_pid.to_string(),
        "--level",
        "handoff",
        "--env",
        "CRASH=start",
        "--",
        v2.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "exited with code 2 before it was ready: it is gone and pid {new} serves on"
        )),
        "{}",
        text(&out)
    );
    assert_eq!(children(run_pid), [new]);
    // crac run exits with its (new) service's status.
    kill(Pid::from_raw(new as i32), Signal::SIGKILL).unwrap();
    let status = run.0.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 9));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_old_version_that_does_not_go_is_killed_after_the_drain_timeout_naming_its_connections() {
    let Some(_env) = util::env() else { return };
    let (scratch, crac, port) = setup("upgrade-drain");
    let v1 = Service::upgradable(&scratch, port, &[("RETIRE", "ignore")]);
    let pid = v1.pid().to_string();
    // A client that keeps its connection to v1 open.
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut client, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut answer = [0u8; 256];
    let n = std::io::Read::read(&mut client, &mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).contains("v1 hits="));
    let client_addr = client.local_addr().unwrap();
    let v2 = new_build(&bin("upgradable"), &scratch.path);
    let out = crac.run(&[
        "upgrade",
        &pid,
        "--drain-timeout",
        "1",
        "--env",
        "APP_VERSION=v2",
        "--env",
        "RETIRE=",
        "--",
        v2.to_str().unwrap(),
    ]);
    let stderr = succeeded(&out);
    assert_says(
        &stderr,
        &[
            &format!(
                "crac upgrade: pid {pid} did not exit within 1.00 s of being told to retire by its agent; still open: 127.0.0.1:{port} -> {client_addr}; killing it (SIGKILL)"
            ),
            "killed after the drain timeout with 1 connection open",
        ],
    );
    let _new = Orphan(new_pid(&out));
    v1.assert_ended(|pid| WaitStatus::Signaled(pid, Signal::SIGKILL, false));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn another_user_can_neither_take_the_listeners_nor_stop_the_service() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("upgrade-nobody");
    let port = free_port();
    let v1 = Service::upgradable(&scratch, port, &[]);
    let store = scratch.join("nobody-store");
    // A copy nobody can run: the build's own folder may be private (a clone in `mktemp -d`).
    let crac = scratch.join("crac");
    std::fs::copy(bin("crac"), &crac).expect("copy crac");
    let out = util::as_nobody(&format!(
        "{} --store {} upgrade {} --env APP_VERSION=v2 -- /bin/true",
        crac.display(),
        store.display(),
        v1.pid()
    ));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Neither its agent (in a root folder) nor its descriptors (root's /proc/PID/fd) give the
    // listener away, so only a restart would do, and nobody may not stop it.
    assert_says(
        &stderr,
        &[
            "level restart",
            &format!("not handoff: cannot read /proc/{}/fd", v1.pid()),
            &format!(
                "pid {} could not be sent SIGTERM (Operation not permitted (os error 1)): it runs on, and the new version was not started",
                v1.pid()
            ),
        ],
    );
    let answer = get(port);
    assert!(
        answer.ends_with(&format!("v1 hits=1 pid={}\n", v1.pid())),
        "{answer}"
    );
    assert!(!store.exists(), "nothing was made for nobody");
}

/// In a container whose main process is `crac run` (scripts/container-image.sh's image),
/// `podman exec ... crac upgrade 1` has crac run hand the listener to the new version, which
/// it starts as its own child: the container's main process stays crac run.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn in_a_container_crac_run_stays_the_main_process_and_hands_over() {
    let Some(env) = util::env() else { return };
    if !crate::oci::runtimes_present() {
        return;
    }
    let scratch = Scratch::new("upod");
    let podman = crac_test_support::podman::Podman::new(&scratch.join("podman"), &env.criu.path);
    let port = free_port();
    crate::container_image::container_image(
        &podman,
        &["--name", "upgradable", "localhost/upgradable:v1"],
        &bin("upgradable"),
        &[],
    );
    let port_env = format!("PORT={port}");
    let mut args = vec!["run", "-d", "--name", "web", "-e", &port_env];
    args.extend(crac_test_support::podman::WARM_RUN_OPTIONS);
    args.push("localhost/upgradable:v1");
    podman.run(&args, "podman run");
    util::wait_listening(port, Duration::from_secs(30), "the service to listen");
    let load = load(port);
    std::thread::sleep(Duration::from_millis(300));
    let out = podman.run(
        &[
            "exec",
            "web",
            "/usr/local/bin/crac",
            "upgrade",
            "1",
            "--level",
            "handoff",
            "--env",
            "APP_VERSION=v2",
            "--",
            "/app/upgradable",
        ],
        "podman exec crac upgrade",
    );
    let done = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let tally = load.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the service runs under crac run, which upgrades it")
            && stderr.contains("1 listener from its agent: http"),
        "{stderr}"
    );
    assert_nothing_lost(&tally, "in a container");
    assert_all_from(&tally, done, "v2 ");
    // The container's main process is still crac run, the parent of the new version (seen
    // from the host: the image has no shell tools).
    let run = podman.pid("web");
    let cmdline = std::fs::read(format!("/proc/{run}/cmdline")).unwrap();
    assert!(
        cmdline.starts_with(b"/usr/local/bin/crac\0run\0"),
        "{cmdline:?}"
    );
    let new = new_pid(&out);
    let children = children(run);
    let in_container = |host: u32| {
        std::fs::read_to_string(format!("/proc/{host}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|ids| ids.split_whitespace().last()?.parse::<u32>().ok())
    };
    assert_eq!(
        children
            .iter()
            .map(|&c| in_container(c))
            .collect::<Vec<_>>(),
        [Some(new)],
        "{children:?}"
    );
    podman.run(&["rm", "--force", "--time", "0", "web"], "podman rm");
}

/// A service with an agent but no listener and no thought of upgrades (the README's hello):
/// nothing to hand over, so a restart; its agent says nothing in it listens for retirement,
/// so it gets SIGTERM; the new version counts as up once it has run for --settle.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_service_that_knows_nothing_of_upgrades_is_restarted_with_sigterm() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("upgrade-hello");
    let crac = Crac::new(&scratch);
    let v1 = Service::spawn(Command::new(bin("hello")), &scratch.join("hello.log"));
    wait_until(Duration::from_secs(10), "hello's agent", || {
        crac_protocol::location::socket_path(v1.pid()).exists()
    });
    let copy = scratch.join("hello-v2");
    std::fs::copy(bin("hello"), &copy).expect("copy");
    let out = crac.run(&[
        "upgrade",
        &v1.pid().to_string(),
        "--",
        copy.to_str().unwrap(),
    ]);
    let stderr = succeeded(&out);
    assert_says(
        &stderr,
        &[
            "not handoff: its agent shares no listening socket",
            "sent SIGTERM (its service does not listen for retirement)",
            "; downtime ",
        ],
    );
    let _new = Orphan(new_pid(&out));
    v1.assert_ended(|pid| WaitStatus::Signaled(pid, Signal::SIGTERM, false));
}
