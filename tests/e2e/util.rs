//! Helpers for end-to-end tests against a real CRIU: finding CRIU (a failure in CI, a skip
//! with instructions elsewhere, in tests marked `#[ignore = "needs ..."]`), targets in scratch
//! folders, dump and restore, reaping.

use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use crac_cli::locate::{self, Criu};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The before_checkpoint lines of crac-test-target's default resources, in the order they run.
pub(crate) const BEFORE_ALL: [&str; 3] = ["before third", "before second", "before first"];

/// The after_restore lines of crac-test-target's default resources for `reason`.
pub(crate) fn after_all(reason: &str, generation: u64) -> Vec<String> {
    ["first", "second", "third"]
        .iter()
        .map(|name| format!("after {name} {reason} gen={generation}"))
        .collect()
}

/// `a` then `b`, as owned lines.
pub(crate) fn concat(a: &[&str], b: &[String]) -> Vec<String> {
    a.iter()
        .map(|s| s.to_string())
        .chain(b.iter().cloned())
        .collect()
}

/// The binaries under test, built by `cargo build --workspace` (the test command does that).
pub(crate) fn bin(name: &str) -> PathBuf {
    if name == "crac-test-target" {
        return PathBuf::from(env!("CARGO_BIN_EXE_crac-test-target"));
    }
    // target/<profile>/deps/e2e-HASH -> target/<profile>/NAME
    let exe = std::env::current_exe().expect("test executable path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

static SERIAL: Mutex<()> = Mutex::new(());
static SUBREAPER: Once = Once::new();

/// What an end-to-end test needs: CRIU, and the right to run alone.
pub(crate) struct Env {
    pub criu: Criu,
    _serial: MutexGuard<'static, ()>,
}

/// Sets up an end-to-end test, or returns None (after saying why and how to enable it) when
/// CRIU cannot run here outside CI. In CI (CI=true) a missing CRIU or missing root fails, and
/// so does a test that calls it without being marked `#[ignore = "needs ..."]`.
pub(crate) fn env() -> Option<Env> {
    let root = nix::unistd::geteuid().is_root();
    let criu = locate::locate();
    let problem = match (&criu, root) {
        (Ok(_), true) => None,
        (Err(err), _) => Some(err.to_string()),
        (Ok(_), false) => Some("CRIU needs root".to_owned()),
    };
    if !crac_test_support::may_run(
        "end-to-end test",
        problem,
        "as root, scripts/provision-criu.sh, then scripts/test.sh",
    ) {
        return None;
    }
    SUBREAPER.call_once(|| {
        // Orphans of dumped and restored trees come to this process, which reaps them at
        // once: a PID held by an unreaped zombie makes the next restore fail.
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    });
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    Some(Env {
        criu: criu.expect("checked above"),
        _serial: serial,
    })
}

/// A scratch folder, removed when dropped.
pub(crate) struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub(crate) fn new(name: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "crac-e2e-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("scratch folder");
        // 0755 whatever the umask: crac refuses to write under a folder others may write to,
        // and the tests that play another user need it to reach what they try to read.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod scratch");
        Scratch { path }
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A running crac-test-target.
pub(crate) struct Target {
    pub pid: u32,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Target {
    /// Starts the target as a session leader with no terminal, as CRIU wants, and waits until
    /// it is ready.
    pub(crate) fn start(dir: &Path, env: &[(&str, &str)]) -> Target {
        Target::launch(
            Command::new(bin("crac-test-target")),
            dir,
            env,
            None,
            Stdio::null(),
        )
    }

    /// As [`Target::start`], running the executable `exe` (a copy of crac-test-target) with
    /// its stdout going to `stdout` if given.
    pub(crate) fn start_with(
        exe: &Path,
        dir: &Path,
        env: &[(&str, &str)],
        stdout: Option<fs::File>,
    ) -> Target {
        Target::launch(Command::new(exe), dir, env, stdout, Stdio::null())
    }

    /// Starts the target as pid 1 of namespaces of its own: `unshare --pid --fork` plus
    /// `unshare_args` (e.g. `--mount`), running `setup` (a shell command, e.g. a mount) first;
    /// the target is a session leader there. `pid` is its pid on this side.
    pub(crate) fn start_in_namespaces(
        dir: &Path,
        env: &[(&str, &str)],
        unshare_args: &[&str],
        setup: &str,
    ) -> Target {
        Target::start_in_namespaces_with(dir, env, unshare_args, setup, Stdio::null())
    }

    /// Starts the target under the command `prefix` (`flock -n FILE setsid`), which runs it
    /// as its child; `pid` is the target's, and the prefix's process is reaped with it.
    pub(crate) fn start_under(prefix: &[&str], dir: &Path, env: &[(&str, &str)]) -> Target {
        let mut cmd = Command::new(prefix[0]);
        cmd.args(&prefix[1..]).arg(bin("crac-test-target"));
        let mut target = Target::launch(cmd, dir, env, None, Stdio::null());
        target.pid = fs::read_to_string(dir.join("ready"))
            .expect("ready file")
            .trim()
            .parse()
            .expect("a pid");
        target
    }

    /// As [`Target::start_in_namespaces`], with `stdin` as the target's standard input (a
    /// socket whose other end stays out of its tree, say).
    pub(crate) fn start_in_namespaces_with(
        dir: &Path,
        env: &[(&str, &str)],
        unshare_args: &[&str],
        setup: &str,
        stdin: Stdio,
    ) -> Target {
        let mut cmd = Command::new("unshare");
        cmd.args(unshare_args)
            .args(["--pid", "--fork", "sh", "-c"])
            .arg(format!("{setup}\nexec setsid \"$0\"", setup = setup))
            .arg(bin("crac-test-target"));
        let mut target = Target::launch(cmd, dir, env, None, stdin);
        let unshare = target.pid;
        target.pid = fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
            .expect("unshare's children")
            .split_whitespace()
            .next()
            .expect("unshare's child")
            .parse()
            .expect("a pid");
        target
    }

    /// Runs `cmd` (which runs the target) as a session leader with no terminal and the
    /// target's settings, and waits until the target is ready; `pid` is `cmd`'s.
    fn launch(
        mut cmd: Command,
        dir: &Path,
        env: &[(&str, &str)],
        stdout: Option<fs::File>,
        stdin: Stdio,
    ) -> Target {
        cmd.env("CRAC_TEST_DIR", dir)
            .stdin(stdin)
            .stdout(stdout.map_or_else(Stdio::null, Stdio::from))
            // Appended to, as a service's log must be (a file opened without O_APPEND makes
            // an image CRIU refuses once the file grew, and crac warns about it).
            .stderr(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.with_extension("stderr"))
                    .expect("stderr file"),
            );
        for (k, v) in env {
            cmd.env(k, v);
        }
        session_leader(&mut cmd);
        let child = cmd.spawn().expect("the target starts");
        let target = Target {
            pid: child.id(),
            dir: dir.to_owned(),
            child: Some(child),
        };
        wait_until(Duration::from_secs(10), "the target to be ready", || {
            dir.join("ready").exists() && target.state().is_some()
        });
        target
    }

    /// A target restored by CRIU from an image of `original` (same PID and folder).
    pub(crate) fn restored(original: &Target) -> Target {
        Target {
            pid: original.pid,
            dir: original.dir.clone(),
            child: None,
        }
    }

    /// A copy of `original` that CRIU restored as `pid` (a tree with a pid namespace of its
    /// own gets a new pid on this side).
    pub(crate) fn restored_as(original: &Target, pid: u32) -> Target {
        Target {
            pid,
            dir: original.dir.clone(),
            child: None,
        }
    }

    /// The lines of hooks.log.
    pub(crate) fn hooks(&self) -> Vec<String> {
        read_lines(&self.dir.join("hooks.log"))
    }

    /// (pid, token, counter, generation) from the state file.
    pub(crate) fn state(&self) -> Option<State> {
        let text = fs::read_to_string(self.dir.join("state")).ok()?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        Some(State {
            pid: f[0] as u32,
            token: f[1],
            counter: f[2],
            generation: f[3],
        })
    }

    /// Waits until the heartbeat counter moves past `than`: the target is running its work.
    pub(crate) fn assert_serving(&self, than: u64) -> State {
        let mut last = None;
        wait_until(
            Duration::from_secs(10),
            "the target's heartbeat to move",
            || {
                last = self.state();
                last.is_some_and(|s| s.counter > than)
            },
        );
        last.expect("state")
    }

    pub(crate) fn is_alive(&self) -> bool {
        crac_action::tree::ProcessId::of(self.pid).is_some()
    }

    /// The TCP and UDP ports of a target started with `CRAC_TEST_LISTEN`.
    pub(crate) fn ports(&self) -> (u16, u16) {
        let text = fs::read_to_string(self.dir.join("ports")).expect("ports file");
        let mut ports = text.split_whitespace().map(|p| p.parse().expect("a port"));
        (ports.next().expect("tcp"), ports.next().expect("udp"))
    }

    /// Waits for a target that CRIU killed, so its PID is free for the restore.
    pub(crate) fn reap_dumped(mut self) {
        if let Some(mut child) = self.child.take() {
            child.wait().expect("reap the dumped target");
        } else {
            reap(self.pid, Duration::from_secs(10));
        }
    }

    /// Ends the target with SIGTERM and returns how it ended.
    pub(crate) fn terminate(self) -> WaitStatus {
        kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM).expect("SIGTERM");
        self.wait_exit(Duration::from_secs(10))
    }

    /// Kills the target and `child`, a child of its that outlives it unless killed (it then
    /// comes to this subreaper), reaps both, and removes both agent folders.
    pub(crate) fn end_with_child(self, child: u32) {
        kill(Pid::from_raw(child as i32), Signal::SIGKILL).expect("kill the child");
        drop(self);
        reap(child, Duration::from_secs(10));
        let _ = fs::remove_dir_all(agent_dir(child));
    }

    /// Waits for the target to end by itself (after a signal, say) and returns how it ended.
    pub(crate) fn wait_exit(mut self, limit: Duration) -> WaitStatus {
        let pid = Pid::from_raw(self.pid as i32);
        let Some(mut child) = self.child.take() else {
            return reap(self.pid, limit);
        };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                use std::os::unix::process::ExitStatusExt;
                return match status.signal() {
                    Some(sig) => {
                        WaitStatus::Signaled(pid, Signal::try_from(sig).expect("signal"), false)
                    }
                    None => WaitStatus::Exited(pid, status.code().unwrap_or(-1)),
                };
            }
            assert!(
                Instant::now() < deadline,
                "pid {pid} did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.child.is_none() && !self.is_alive() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        match self.child.take() {
            Some(mut child) => {
                let _ = child.wait();
            }
            None => {
                reap(self.pid, Duration::from_secs(5));
            }
        }
        // A killed agent cannot remove its folder.
        let _ = fs::remove_dir_all(agent_dir(self.pid));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct State {
    pub pid: u32,
    pub token: u64,
    pub counter: u64,
    pub generation: u64,
}

/// Reaps `pid`, which must be a child of this process by now (directly, or re-parented to
/// this subreaper).
pub(crate) fn reap(pid: u32, limit: Duration) -> WaitStatus {
    let deadline = Instant::now() + limit;
    loop {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => return status,
            Err(err) => panic!("cannot reap pid {pid}: {err}"),
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Polls `cond` every 10 ms; panics with `what` after `limit`.
pub(crate) fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to `limit`, as [`wait_until`] does for `what`) until something accepts
/// connections on loopback `port`.
pub(crate) fn wait_listening(port: u16, limit: Duration, what: &str) {
    wait_until(limit, what, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// What one criu run did.
pub(crate) struct Run {
    pub output: Output,
    /// CRIU's log file, which also holds crac-action's lines.
    pub log: String,
    pub took: Duration,
}

impl Run {
    pub(crate) fn ok(&self) -> bool {
        self.output.status.success()
    }

    /// crac-action's lines in CRIU's log.
    pub(crate) fn action_lines(&self) -> Vec<&str> {
        self.log
            .lines()
            .filter(|l| l.starts_with("crac-action:"))
            .collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "criu exited {:?} after {:?}\n--- log ---\n{}\n--- stderr ---\n{}",
            self.output.status,
            self.took,
            self.log,
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}

impl Env {
    fn criu(&self, args: &[&str], images: &Path, log_name: &str, env: &[(&str, &str)]) -> Run {
        self.criu_with(&bin("crac-action"), args, images, log_name, env)
    }

    /// `criu ARGS -D images -o log_name --action-script script`.
    pub(crate) fn criu_with(
        &self,
        script: &Path,
        args: &[&str],
        images: &Path,
        log_name: &str,
        env: &[(&str, &str)],
    ) -> Run {
        fs::create_dir_all(images).expect("images folder");
        let mut cmd = Command::new(&self.criu.path);
        cmd.args(args)
            .arg("-D")
            .arg(images)
            .arg("-o")
            .arg(log_name)
            .arg("--action-script")
            .arg(script)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let output = cmd.output().expect("criu runs");
        let took = started.elapsed();
        let log = fs::read_to_string(images.join(log_name)).unwrap_or_default();
        Run { output, log, took }
    }

    /// `criu dump -t PID` with crac-action, into `images`.
    pub(crate) fn dump(
        &self,
        pid: u32,
        images: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Run {
        fs::create_dir_all(images).expect("images folder");
        let pid = pid.to_string();
        let mut args = vec!["dump", "-t", &pid];
        args.extend_from_slice(extra);
        self.criu(&args, images, "dump.log", env)
    }

    /// `criu restore -d` with crac-action, from `images`.
    pub(crate) fn restore(&self, images: &Path) -> Run {
        self.criu(&["restore", "-d"], images, "restore.log", &[])
    }
}

/// The agent folder of `pid`.
pub(crate) fn agent_dir(pid: u32) -> PathBuf {
    crac_protocol::location::agent_dir(pid)
}

/// Live processes (not zombies: an exited one waiting to be reaped is done) whose command
/// name is `comm`, anywhere on the machine.
pub(crate) fn processes_named(comm: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
                && crac_action::tree::ProcessId::of(pid).is_some()
        })
        .collect()
}

/// PIDs of crac-action watchers (named crac-watcher) still running, re-parented to this
/// subreaper; others may be running on the machine.
pub(crate) fn watchers() -> Vec<u32> {
    processes_named(crac_action::watcher::PROCESS_NAME)
        .into_iter()
        .filter(|&pid| crac_action::tree::parent_of(pid) == Some(std::process::id()))
        .collect()
}

/// A loopback TCP port free now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `crac` command with a store of the test's own.
pub(crate) struct Crac {
    pub store: PathBuf,
}

impl Crac {
    pub(crate) fn new(scratch: &Scratch) -> Crac {
        Crac {
            store: scratch.join("store"),
        }
    }

    /// `crac ARGS`, with `--store` for the commands that use a store (`ps` and `status`
    /// refuse it).
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("crac"));
        if !matches!(args.first(), Some(&"ps" | &"status")) {
            cmd.arg("--store").arg(&self.store);
        }
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("crac runs")
    }

    /// Starts a target in `dir` (with `env`), checkpoints it into the image `name` (which
    /// stops it) and reaps it; returns the handle of the copy a restore of `name` brings back.
    pub(crate) fn checkpoint_new(&self, dir: &Path, name: &str, env: &[(&str, &str)]) -> Target {
        let target = Target::start(dir, env);
        let out = self.run(&["checkpoint", &target.pid.to_string(), "--name", name]);
        assert!(out.status.success(), "{}", text(&out));
        let restored = Target::restored(&target);
        target.reap_dumped();
        restored
    }

    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        assert!(out.status.success(), "crac {args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    }

    /// The store's entries (hidden working folders included), to show nothing changed; not
    /// the store's cache of known hashes, which any checkpoint may update.
    pub(crate) fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.store)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name != crac_cli::metadata::KNOWN_HASHES_FILE)
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// An output, for an assertion's message.
pub(crate) fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asks the target listening on TCP `port` for its STATUS (retrying for a while: a restored
/// or resumed target answers once its after_restore hooks have run).
pub(crate) fn status(port: u16) -> serde_json::Value {
    let line = ask(port, "STATUS");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Sends one `request` line to the service listening on TCP `port` and returns its reply line
/// (retrying to connect for a while: a restored or resumed service answers once its
/// after_restore hooks have run).
pub(crate) fn ask(port: u16, request: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                stream
                    .write_all(format!("{request}\n").as_bytes())
                    .unwrap_or_else(|e| panic!("send {request}: {e}"));
                let mut line = String::new();
                BufReader::new(stream)
                    .read_line(&mut line)
                    .unwrap_or_else(|e| panic!("read the reply to {request}: {e}"));
                return line.trim_end().to_owned();
            }
            Err(err) => last = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing answers {request} on port {port}: {last}");
}

/// Sends `data` to the target's UDP `port` and returns its answer.
pub(crate) fn udp_ask(port: u16, data: &str) -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    socket
        .send_to(data.as_bytes(), ("127.0.0.1", port))
        .expect("send");
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).expect("a UDP answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A number in a STATUS reply.
pub(crate) fn field(status: &serde_json::Value, name: &str) -> u64 {
    status[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {status}"))
}

/// The hook lines a STATUS reply says the target's memory holds.
pub(crate) fn status_hooks(status: &serde_json::Value) -> Vec<String> {
    status["hooks"]
        .as_array()
        .expect("hooks")
        .iter()
        .map(|h| h.as_str().expect("a line").to_owned())
        .collect()
}

/// Reaps every child that has exited: orphans re-parented to this subreaper (a container's
/// processes once its runtime let go of them, conmon).
pub(crate) fn reap_orphans() {
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Makes sure the agents' shared fallback base, `/tmp/crac`, exists as an agent of root's
/// makes it (root's, 1777) before a test runs a service as another user: that service's agent
/// would otherwise make the base its own, which later tests (and other services) refuse.
pub(crate) fn shared_agent_base() {
    let base = crac_protocol::location::FALLBACK_DIR;
    if fs::create_dir(base).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(base, fs::Permissions::from_mode(0o1777)).expect("chmod");
    }
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(base).expect("/tmp/crac");
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o1777));
}

/// Runs `script` with bash as `nobody`: the other local user of the threat model, played for
/// real.
pub(crate) fn as_nobody(script: &str) -> Output {
    Command::new("runuser")
        .args(["-u", "nobody", "--", "bash", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("runuser runs")
}

/// Makes `cmd` run under umask `mask` (set in the child: the test process's umask is shared by
/// its threads).
pub(crate) fn with_umask(cmd: &mut Command, mask: u32) -> &mut Command {
    // SAFETY: umask is async-signal-safe and touches nothing but the child's own mask.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
            Ok(())
        });
    }
    cmd
}

/// Makes `cmd` start a session of its own (no controlling terminal: what a checkpoint wants).
pub(crate) fn session_leader(cmd: &mut Command) -> &mut Command {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd
}
