//! `crac migrate` between two hosts on this machine (scripts/hosts.sh: network namespaces A and
//! B joined by a veth pair, a client namespace, B with pid and mount namespaces of its own):
//! the cache-server example moves from A to B under load, with its state, its address, and a
//! client's established connection; faults before the freeze leave it running at A, a link cut
//! after the freeze has it restored at A.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::{self, bin, text, wait_until, Scratch};

/// The namespaces' prefix: this module's own (issue 22).
const PREFIX: &str = "c22m";
pub(crate) const SERVICE: &str = "10.77.9.1";
pub(crate) const SERVICE_PORT: u16 = 7070;
pub(crate) const UPSTREAM: &str = "10.77.3.1:7071";
pub(crate) const RECEIVER: &str = "10.77.0.2:7777";

/// The two hosts and the client, set up by scripts/hosts.sh (their namespaces' names begin
/// with `prefix`) and torn down when dropped.
pub(crate) struct Hosts {
    prefix: &'static str,
}

fn hosts_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("hosts.sh")
}

impl Hosts {
    fn up() -> Hosts {
        Hosts::up_as(PREFIX)
    }

    /// The hosts, their namespaces named `PREFIX-a`, `PREFIX-b` and `PREFIX-c`.
    pub(crate) fn up_as(prefix: &'static str) -> Hosts {
        let out = Command::new(hosts_script())
            .args(["up", prefix])
            .output()
            .expect("hosts.sh runs");
        assert!(out.status.success(), "hosts.sh up: {}", text(&out));
        Hosts { prefix }
    }

    /// The command line that runs a command on host `host` (a, b or c).
    pub(crate) fn wrapper(&self, host: &'static str) -> Vec<String> {
        vec![
            hosts_script().display().to_string(),
            "exec".to_owned(),
            self.prefix.to_owned(),
            host.to_owned(),
        ]
    }

    /// `COMMAND` on host `host` (a, b or c).
    pub(crate) fn command(&self, host: &str, program: &Path) -> Command {
        let mut cmd = Command::new(hosts_script());
        cmd.args(["exec", self.prefix, host]).arg(program);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `f` on a thread in the client's network namespace: sockets it makes stay there.
    fn client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let prefix = self.prefix;
        std::thread::spawn(move || {
            let ns = fs::File::open(format!("/run/netns/{prefix}-c")).expect("client netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("client thread")
    }

    /// `ip ARGS` in host `host`'s network namespace, its output.
    pub(crate) fn ip(&self, host: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(format!("{}-{host}", self.prefix))
            .args(args)
            .output()
            .expect("ip runs");
        assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whatever runs in `host`'s network namespace.
    pub(crate) fn pids(&self, host: &str) -> Vec<u32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &format!("{}-{host}", self.prefix)])
            .output()
            .expect("ip runs");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new(hosts_script())
            .args(["down", self.prefix])
            .output();
    }
}

/// Sends one request on a new connection from the client, returns the reply line.
pub(crate) fn ask(hosts: &Hosts, request: &str) -> String {
    let request = request.to_owned();
    hosts.client(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect((SERVICE, SERVICE_PORT)) {
                Ok(mut stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    stream.write_all(format!("{request}\n").as_bytes()).unwrap();
                    let mut line = String::new();
                    BufReader::new(stream).read_line(&mut line).unwrap();
                    return line.trim_end().to_owned();
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "nothing answers {request}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    })
}

/// A client's session with the service (one established connection), and a thread sending a
/// request on it every 10 ms until stopped, keeping the replies.
struct Session {
    stream: TcpStream,
    replies: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    load: Option<std::thread::JoinHandle<()>>,
}

impl Session {
    fn open(hosts: &Hosts) -> Session {
        let stream = hosts.client(|| {
            let stream = TcpStream::connect((SERVICE, SERVICE_PORT)).expect("a session");
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            stream
        });
        let mut session = Session {
            stream,
            replies: Arc::default(),
            stop: Arc::default(),
            load: None,
        };
        assert_eq!(session.request("SESSION"), "OK session");
        session
    }

    fn request(&mut self, request: &str) -> String {
        request_on(&mut self.stream, request)
    }

    /// Starts the load: GET a every 10 ms on a copy of the connection.
    fn load(&mut self) {
        let mut stream = self.stream.try_clone().unwrap();
        let (replies, stop) = (Arc::clone(&self.replies), Arc::clone(&self.stop));
        self.load = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let reply = request_on(&mut stream, "GET a");
                replies.lock().unwrap().push(reply);
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }

    /// Stops the load; returns its replies.
    fn stop(&mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(load) = self.load.take() {
            load.join().expect("the load thread");
        }
        self.replies.lock().unwrap().clone()
    }
}

fn request_on(stream: &mut TcpStream, request: &str) -> String {
    stream
        .write_all(format!("{request}\n").as_bytes())
        .unwrap_or_else(|e| panic!("send {request}: {e}"));
    // One byte at a time: no reader buffers what belongs to the next reply.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        use std::io::Read;
        let n = stream
            .read(&mut byte)
            .unwrap_or_else(|e| panic!("read the reply to {request}: {e}"));
        assert!(n == 1, "the session was closed during {request}");
        if byte[0] == b'\n' {
            return String::from_utf8_lossy(&line).into_owned();
        }
        line.push(byte[0]);
    }
}

/// The services of a test: upstream in the client's namespace, the cache-server at A.
struct Service {
    server: Child,
    /// Killed after the server (fields drop after `drop`).
    _upstream: Upstream,
    log: PathBuf,
}

impl Service {
    fn start(hosts: &Hosts, scratch: &Scratch) -> Service {
        Service::start_with(hosts, scratch, &[])
    }

    /// [`Service::start`] with more options for the cache-server.
    fn start_with(hosts: &Hosts, scratch: &Scratch, extra: &[&str]) -> Service {
        let upstream = Upstream::start(hosts, scratch);
        let log = scratch.join("server.log");
        let mut cmd = hosts.command("a", &bin("cache-server"));
        cmd.args([
            "--address",
            SERVICE,
            "--port",
            &SERVICE_PORT.to_string(),
            "--upstream",
            UPSTREAM,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap(),
        );
        util::session_leader(&mut cmd);
        let server = cmd.spawn().expect("cache-server starts");
        let service = Service {
            server,
            _upstream: upstream,
            log,
        };
        wait_until(Duration::from_secs(10), "the cache-server to serve", || {
            fs::read_to_string(&service.log).is_ok_and(|l| l.contains("serving GET/STATS"))
        });
        service
    }

    fn pid(&self) -> u32 {
        self.server.id()
    }

    /// Reaps the server once the dump has killed it (this test is its parent), so that its
    /// pid is free for a restore here.
    fn reap_when_dumped(&self) -> std::thread::JoinHandle<()> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        std::thread::spawn(move || {
            let _ = nix::sys::wait::waitpid(pid, None);
        })
    }

    fn log_lines(&self, containing: &str) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(containing))
            .count()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // A killed agent cannot remove its folder (at A: B's are in B's own /run).
        let _ = fs::remove_dir_all(util::agent_dir(self.pid()));
    }
}

/// What most tests here begin with, in a scratch folder: the hosts, the migration key, and the
/// cache-server at A (with `extra` options). Fields drop in order: the service first, the
/// test's environment last.
struct AtA {
    service: Service,
    key: PathBuf,
    hosts: Hosts,
    scratch: Scratch,
    _env: util::Env,
}

impl AtA {
    /// The service, the key, the hosts and the scratch folder, for the test to use.
    fn parts(&self) -> (&Service, &Path, &Hosts, &Scratch) {
        (&self.service, &self.key, &self.hosts, &self.scratch)
    }
}

/// [`AtA`] for test `name`, or None where the test cannot run (see [`util::env`]).
fn at_a(name: &str, extra: &[&str]) -> Option<AtA> {
    let env = util::env()?;
    let scratch = Scratch::new(name);
    let hosts = Hosts::up();
    let key = key(&scratch, "key", 'k');
    let service = Service::start_with(&hosts, &scratch, extra);
    Some(AtA {
        service,
        key,
        hosts,
        scratch,
        _env: env,
    })
}

/// The cache-server's upstream, in the client's namespace at [`UPSTREAM`]; killed when dropped.
pub(crate) struct Upstream(Child);

impl Upstream {
    pub(crate) fn start(hosts: &Hosts, scratch: &Scratch) -> Upstream {
        let mut cmd = hosts.command("c", &bin("upstream"));
        cmd.arg("7071")
            .env("UPSTREAM_ADDRESS", "10.77.3.1")
            .env("UPSTREAM_DELAY_MS", "1")
            .stdout(Stdio::null());
        let log = scratch.join("upstream.log");
        Upstream(start_logged(cmd, &log, "upstream", "listening"))
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn key(scratch: &Scratch, name: &str, fill: char) -> PathBuf {
    let path = scratch.join(name);
    fs::write(&path, fill.to_string().repeat(44)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `crac migrate --receive` at B, started; waits until it listens.
fn receiver(
    hosts: &Hosts,
    scratch: &Scratch,
    key: &Path,
    store: &str,
    wrap: Option<&str>,
) -> (Child, PathBuf) {
    receiver_with(hosts, scratch, key, store, wrap, &[])
}

/// [`receiver`] with its store in the scratch folder, run directly.
fn receiver_at_b(hosts: &Hosts, scratch: &Scratch, key: &Path) -> (Child, PathBuf) {
    let store_b = scratch.join("store-b");
    receiver(hosts, scratch, key, &store_b.display().to_string(), None)
}

/// Ends a receiver that is left waiting.
fn stop_receiver(mut receiver: Child) {
    let _ = receiver.kill();
    let _ = receiver.wait();
}

/// Takes A's end of the link to B down once the service's log at `log` says `line`, within
/// `within` (else fails, saying `never`).
fn cut_link_when(
    log: PathBuf,
    line: &'static str,
    within: Duration,
    never: &'static str,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + within;
        while !fs::read_to_string(&log).is_ok_and(|l| l.contains(line)) {
            assert!(Instant::now() < deadline, "{never}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let down = format!("{PREFIX}-ab");
        let out = Command::new("ip")
            .args(["-n", &format!("{PREFIX}-a"), "link", "set", &down, "down"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    })
}

/// Asserts that `crac migrate`'s `out` failed before the freeze, saying each of `reasons` and
/// that nothing was stopped.
fn refused_before_the_freeze(out: &Output, reasons: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        reasons.iter().all(|reason| said.contains(reason))
            && said.contains("nothing was stopped: the service runs on here"),
        "{said}"
    );
}

/// Asserts that the service still runs at A as it was when its STATS were `before`: the same
/// process, never stopped, no hook run.
fn never_stopped(hosts: &Hosts, service: &Service, before: &serde_json::Value) {
    let after = stats(&ask(hosts, "STATS"));
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["generation"], 0, "{after}");
    assert_eq!(service.log_lines("before_checkpoint"), 0);
}

/// [`receiver`] with more options for `crac migrate --receive`.
pub(crate) fn receiver_with(
    hosts: &Hosts,
    scratch: &Scratch,
    key: &Path,
    store: &str,
    wrap: Option<&str>,
    extra: &[String],
) -> (Child, PathBuf) {
    let stderr = scratch.join("receiver.stderr");
    let hook = format!(
        "nsenter --net=/run/netns/{}-c ip route replace \"$1\" via 10.77.2.2",
        hosts.prefix
    );
    let crac = bin("crac");
    let mut args: Vec<String> = vec![
        crac.display().to_string(),
        "--store".into(),
        store.into(),
        "migrate".into(),
        "--receive".into(),
        "--listen".into(),
        RECEIVER.into(),
        "--key".into(),
        key.display().to_string(),
        "--link-timeout".into(),
        "5".into(),
        "--on-address".into(),
        hook,
    ];
    args.extend_from_slice(extra);
    let mut cmd = match wrap {
        // A shell command run first at B (a mount, say), then crac.
        Some(setup) => {
            let mut cmd = hosts.command("b", Path::new("sh"));
            cmd.arg("-c")
                .arg(format!("{setup} && exec \"$@\""))
                .arg("sh");
            cmd.args(&args);
            cmd
        }
        None => {
            let mut cmd = hosts.command("b", Path::new(&args.remove(0)));
            cmd.args(&args);
            cmd
        }
    };
    cmd.stdout(Stdio::piped());
    let child = start_logged(cmd, &stderr, "the receiver", "waiting for a migration");
    (child, stderr)
}

/// Starts `cmd` (`what`), its stderr into `log`, and waits until the log says `ready`.
fn start_logged(mut cmd: Command, log: &Path, what: &str, ready: &str) -> Child {
    let child = cmd
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    wait_until(
        Duration::from_secs(10),
        &format!("{what} to listen"),
        || fs::read_to_string(log).is_ok_and(|l| l.contains(ready)),
    );
    child
}

/// `crac migrate` of `pid` at A, to the receiver, with `key`.
fn migrate(hosts: &Hosts, store: &Path, pid: u32, key: &Path) -> Output {
    migrate_with(hosts, store, pid, key, "stop-and-copy")
}

/// [`migrate`] with a strategy.
fn migrate_with(hosts: &Hosts, store: &Path, pid: u32, key: &Path, strategy: &str) -> Output {
    migrate_command(hosts, store, &[&pid.to_string()], key, strategy)
        .args(["--tcp-established", "--link-timeout", "3"])
        .output()
        .expect("crac migrate runs")
}

/// `crac migrate WHAT` at A, to the receiver, with `key`, [`SERVICE`] and `strategy`, its
/// outcome in JSON; the caller adds its own options.
pub(crate) fn migrate_command(
    hosts: &Hosts,
    store: &Path,
    what: &[&str],
    key: &Path,
    strategy: &str,
) -> Command {
    let mut cmd = hosts.command("a", &bin("crac"));
    cmd.arg("--store")
        .arg(store)
        .arg("migrate")
        .args(what)
        .args([
            "--to",
            RECEIVER,
            "--key",
            &key.display().to_string(),
            "--address",
            &format!("{SERVICE}/32"),
            "--strategy",
            strategy,
            "--json",
        ]);
    cmd
}

/// Asserts that `crac migrate`'s `out` and the receiver's run succeeded (the receiver's log,
/// `receiver_log`, said when not); returns the receiver's output.
pub(crate) fn migrated(out: &Output, receiver: Child, receiver_log: &Path) -> Output {
    assert!(
        out.status.success(),
        "{}\nreceiver: {}",
        text(out),
        fs::read_to_string(receiver_log).unwrap_or_default()
    );
    let received = finish(receiver);
    assert!(received.status.success(), "{}", text(&received));
    received
}

pub(crate) fn finish(mut receiver: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "the receiver did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    receiver.wait_with_output().expect("the receiver's output")
}

pub(crate) fn stats(reply: &str) -> serde_json::Value {
    serde_json::from_str(reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn stop_and_copy_moves_the_cache_server_with_its_state_address_and_connection() {
    moves_the_cache_server("stop-and-copy");
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn post_copy_moves_the_cache_server_with_its_state_address_and_connection() {
    moves_the_cache_server("post-copy");
}

/// The cache-server moves from A to B by `strategy`, under load: its state, its address and
/// its client's established connection with it; `restored` told once, at B; nothing left at A.
fn moves_the_cache_server(strategy: &str) {
    let Some(at) = at_a("migrate", &[]) else {
        return;
    };
    let (service, key, hosts, scratch) = at.parts();
    for k in ["a", "b", "c"] {
        assert_eq!(ask(hosts, &format!("GET {k}")), format!("value-of-{k}"));
    }
    let mut session = Session::open(hosts);
    let before = stats(&session.request("STATS"));
    assert_eq!(before["entries"], 3, "{before}");
    session.load();
    std::thread::sleep(Duration::from_millis(200));

    let (receiver, receiver_log) = receiver_at_b(hosts, scratch, key);
    let store_a = scratch.join("store-a");
    let reaper = service.reap_when_dumped();
    let out = migrate_with(hosts, &store_a, service.pid(), key, strategy);
    reaper.join().unwrap();
    migrated(&out, receiver, &receiver_log);
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["strategy"], strategy);
    assert!(
        outcome["lock_rules_removed"].as_u64() >= Some(2),
        "{outcome}"
    );

    // The established connection carries data both ways, now from B.
    std::thread::sleep(Duration::from_millis(300));
    let replies = session.stop();
    assert!(replies.len() > 20, "{} replies", replies.len());
    assert!(replies.iter().all(|r| r == "value-of-a"), "{replies:?}");
    let after = stats(&session.request("STATS"));
    assert_eq!(after["entries"], 3, "{after}");
    assert_eq!(
        after["pid"], before["pid"],
        "the same pid, in B's pid namespace"
    );
    assert_eq!(after["last_restore"], "restored", "{after}");
    assert!(after["hits"].as_u64() > before["hits"].as_u64(), "{after}");
    // The listener answers at the same address, from B (the client's route now leads there).
    assert_eq!(ask(hosts, "GET d"), "value-of-d");
    assert!(hosts
        .ip("c", &["route", "get", SERVICE])
        .contains("10.77.2.2"));
    // `restored` told once, at B.
    assert_eq!(
        service.log_lines("after_restore cache"),
        1,
        "{}",
        fs::read_to_string(&service.log).unwrap()
    );
    // Nothing left at A: no process, no address, no lock rule, no image.
    assert!(hosts.pids("a").is_empty(), "{:?}", hosts.pids("a"));
    assert!(!hosts.ip("a", &["-4", "addr"]).contains(SERVICE));
    let rules = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{PREFIX}-a"))
        .args(["iptables", "-S"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("0xc114"),
        "{}",
        text(&rules)
    );
    let images = fs::read_dir(&store_a)
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(images, 0, "the image left at A");
    assert!(hosts.ip("b", &["-4", "addr"]).contains(SERVICE));
    drop(session);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_destination_without_the_key_is_refused_and_nothing_stops() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("migrate-key");
    let hosts = Hosts::up();
    let service = Service::start(&hosts, &scratch);
    let before = stats(&ask(&hosts, "STATS"));
    let (mut receiver, receiver_log) =
        receiver_at_b(&hosts, &scratch, &key(&scratch, "theirs", 't'));
    let store_a = scratch.join("store-a");
    let out = migrate(&hosts, &store_a, service.pid(), &key(&scratch, "ours", 'o'));
    refused_before_the_freeze(&out, &["could not prove it holds the migration key"]);
    // The receiver refused the source and sent nothing; it waits on for one with the key.
    wait_until(
        Duration::from_secs(5),
        "the receiver to say it refused",
        || fs::read_to_string(&receiver_log).is_ok_and(|l| l.contains("crac: refused: ")),
    );
    assert!(receiver.try_wait().unwrap().is_none());
    stop_receiver(receiver);
    // Never stopped: the same process answers, no hook ran.
    never_stopped(&hosts, &service, &before);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_destination_without_disk_space_refuses_before_the_freeze() {
    let Some(at) = at_a("migrate-disk", &[]) else {
        return;
    };
    let (service, key, hosts, scratch) = at.parts();
    let before = stats(&ask(hosts, "STATS"));
    // B's store on a 1 MiB file system of its own (in B's mount namespace).
    let (receiver, _) = receiver(
        hosts,
        scratch,
        key,
        "/run/small/store",
        Some("mkdir -p /run/small && mount -t tmpfs -o size=1m tmpfs /run/small"),
    );
    let store_a = scratch.join("store-a");
    let out = migrate(hosts, &store_a, service.pid(), key);
    refused_before_the_freeze(
        &out,
        &[
            "cannot run the service, checked before anything was stopped",
            "the store /run/small/store has",
        ],
    );
    let received = finish(receiver);
    assert_eq!(received.status.code(), Some(1), "{}", text(&received));
    never_stopped(hosts, service, &before);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_link_cut_before_the_freeze_stops_nothing() {
    let Some(at) = at_a("migrate-cut-early", &[]) else {
        return;
    };
    let (service, key, hosts, scratch) = at.parts();
    let before = stats(&ask(hosts, "STATS"));
    let (receiver, _) = receiver_at_b(hosts, scratch, key);
    hosts.ip("a", &["link", "set", &format!("{PREFIX}-ab"), "down"]);
    let store_a = scratch.join("store-a");
    let out = migrate(hosts, &store_a, service.pid(), key);
    refused_before_the_freeze(&out, &[&format!("cannot reach {RECEIVER}")]);
    stop_receiver(receiver);
    never_stopped(hosts, service, &before);
    assert!(hosts.ip("a", &["-4", "addr"]).contains(SERVICE));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_link_cut_after_the_freeze_has_the_service_restored_at_the_source() {
    let Some(at) = at_a("migrate-cut", &[]) else {
        return;
    };
    let (service, key, hosts, scratch) = at.parts();
    assert_eq!(ask(hosts, "GET a"), "value-of-a");
    let mut session = Session::open(hosts);
    let before = stats(&session.request("STATS"));
    let (receiver, _) = receiver_at_b(hosts, scratch, key);
    // The link goes down as soon as the service's hooks run: the freeze has begun, and not one
    // byte of the image has been sent.
    let cut = cut_link_when(
        service.log.clone(),
        "before_checkpoint",
        Duration::from_secs(30),
        "no checkpoint began",
    );
    let store_a = scratch.join("store-a");
    let reaper = service.reap_when_dumped();
    let out = migrate(hosts, &store_a, service.pid(), key);
    cut.join().unwrap();
    reaper.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("failed after the service was stopped")
            && said.contains("the service was restored here from its image and runs here again"),
        "{said}"
    );
    stop_receiver(receiver);
    // At A again, the same process, its state and its client's connection intact.
    let after = stats(&session.request("STATS"));
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["entries"], 1, "{after}");
    assert_eq!(after["last_restore"], "restored", "{after}");
    assert!(hosts.ip("a", &["-4", "addr"]).contains(SERVICE));
    assert!(!hosts.ip("b", &["-4", "addr"]).contains(SERVICE));
    assert_eq!(ask(hosts, "GET b"), "value-of-b");
    drop(session);
}

/// The TCP addresses listening in `host`'s network namespace now (`/proc/thread-self/net/tcp`,
/// read from a thread that joined it).
fn listeners(host: &'static str) -> Vec<String> {
    std::thread::spawn(move || {
        let ns = fs::File::open(format!("/run/netns/{PREFIX}-{host}")).expect("netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let table = fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.get(3) == Some(&"0A")).then(|| {
                    let (ip, port) = fields[1].split_once(':').expect("ADDR:PORT");
                    let ip = u32::from_str_radix(ip, 16).expect("hex");
                    let port = u16::from_str_radix(port, 16).expect("hex");
                    format!("{}:{port}", std::net::Ipv4Addr::from(ip.to_ne_bytes()))
                })
            })
            .collect()
    })
    .join()
    .expect("listener thread")
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn post_copy_serves_pages_on_no_port_and_refuses_a_peer_without_the_key() {
    // Enough memory that its pages take a while to arrive (sealing is slow in a debug build).
    let Some(at) = at_a("migrate-pages", &["--ballast", "8"]) else {
        return;
    };
    let (service, key, hosts, scratch) = at.parts();
    assert_eq!(ask(hosts, "GET a"), "value-of-a");
    let (receiver, _) = receiver_at_b(hosts, scratch, key);
    let stop = Arc::new(AtomicBool::new(false));
    let watch = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut intruder = None;
            while !stop.load(Ordering::SeqCst) {
                seen.extend(listeners("a").into_iter().map(|l| format!("A {l}")));
                seen.extend(listeners("b").into_iter().map(|l| format!("B {l}")));
                // A peer without the key, on the only port there is: refused, sent nothing.
                if intruder.is_none() {
                    intruder = Some(intrude());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (seen, intruder)
        })
    };
    let store_a = scratch.join("store-a");
    let reaper = service.reap_when_dumped();
    let out = migrate_with(hosts, &store_a, service.pid(), key, "post-copy");
    reaper.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    let (seen, intruder) = watch.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let received = finish(receiver);
    assert!(received.status.success(), "{}", text(&received));
    let expected: std::collections::BTreeSet<String> = [
        format!("A {SERVICE}:{SERVICE_PORT}"),
        format!("B {RECEIVER}"),
        format!("B {SERVICE}:{SERVICE_PORT}"),
    ]
    .into();
    assert!(
        seen.is_subset(&expected),
        "listening during the migration: {seen:?}"
    );
    assert_eq!(
        intruder,
        Some(Vec::new()),
        "a peer without the key was sent bytes"
    );
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        outcome["bytes_sent"].as_u64() > Some(8 << 20),
        "the memory came through the channel: {outcome}"
    );
    assert!(
        outcome["image_bytes"].as_u64() < Some(8 << 20),
        "the image went without the memory: {outcome}"
    );
    assert_eq!(stats(&ask(hosts, "STATS"))["last_restore"], "restored");
}

/// Connects to the receiver from the client's namespace as a peer without the key would, and
/// returns what it was sent beyond the handshake's first reply, within a second.
fn intrude() -> Vec<u8> {
    std::thread::spawn(|| {
        let ns = fs::File::open(format!("/run/netns/{PREFIX}-c")).expect("netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let Ok(mut stream) = TcpStream::connect(RECEIVER) else {
            return Vec::new();
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        // The handshake's hello with a nonce, then a proof made without the key.
        let mut hello = b"CRACMIG1".to_vec();
        hello.extend_from_slice(&[7u8; 32]);
        let _ = stream.write_all(&hello);
        let mut reply = [0u8; 8 + 32 + 32];
        use std::io::Read;
        if stream.read_exact(&mut reply).is_err() {
            // Not answered at all: the receiver is busy with the source.
            return Vec::new();
        }
        let _ = stream.write_all(&[0u8; 32]);
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        rest
    })
    .join()
    .expect("intruder thread")
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn crac_check_says_which_strategies_this_kernel_allows() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("migrate-check");
    let report = util::Crac::new(&scratch).run(&["check", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).expect("a report");
    let detail = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "migration")
        .expect("a migration check")["detail"]
        .as_str()
        .expect("its detail")
        .to_owned();
    let has = |feature: &str| {
        Command::new(&env.criu.path)
            .args(["check", "--feature", feature])
            .output()
            .expect("criu runs")
            .status
            .success()
    };
    assert_eq!(
        detail.contains("post-copy: possible"),
        has("uffd-noncoop"),
        "{detail}"
    );
    assert_eq!(
        detail.contains("pre-copy: NOT possible: the kernel does not track changed memory"),
        !has("mem_dirty_track"),
        "{detail}"
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_link_cut_once_post_copy_restored_leaves_the_service_at_exactly_one_end() {
    let Some(at) = at_a("migrate-cut-pages", &["--ballast", "8"]) else {
        return;
    };
    let (service, key, hosts, scratch) = at.parts();
    assert_eq!(ask(hosts, "GET a"), "value-of-a");
    let before = stats(&ask(hosts, "STATS"));
    let (receiver, receiver_log) = receiver_at_b(hosts, scratch, key);
    // The link goes down once the service runs at B, its memory still arriving or just in:
    // which decides where the service ends up, and the messages must say it.
    let cut = cut_link_when(
        service.log.clone(),
        "after_restore cache",
        Duration::from_secs(60),
        "the service never ran at B",
    );
    let store_a = scratch.join("store-a");
    let reaper = service.reap_when_dumped();
    let out = migrate_with(hosts, &store_a, service.pid(), key, "post-copy");
    cut.join().unwrap();
    let received = finish(receiver);
    let receiver_said = fs::read_to_string(&receiver_log).unwrap_or_default();
    let said = String::from_utf8_lossy(&out.stderr);
    let runs_at_b = hosts.pids("b").into_iter().any(|pid| {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "cache-server")
            && crac_action::tree::state_of(pid).is_some_and(|s| s != 'Z')
    });
    let runs_at_a = crac_action::tree::state_of(service.pid()).is_some_and(|s| s != 'Z');
    assert!(
        runs_at_a != runs_at_b,
        "at A: {runs_at_a}, at B: {runs_at_b}; {said}; receiver: {receiver_said}"
    );
    if runs_at_a {
        // Pages were missing: CRIU resumed the source, B killed its copy and let the address go.
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            said.contains("CRIU resumed it here, where it runs on"),
            "{said}"
        );
        assert_eq!(received.status.code(), Some(1), "{receiver_said}");
        assert!(
            receiver_said.contains("the memory did not all arrive"),
            "{receiver_said}"
        );
        assert!(hosts.ip("a", &["-4", "addr"]).contains(SERVICE));
        assert!(!hosts.ip("b", &["-4", "addr"]).contains(SERVICE));
        // The client's route back to A, as an operator's hook would set it.
        hosts.ip(
            "c",
            &[
                "route",
                "replace",
                &format!("{SERVICE}/32"),
                "via",
                "10.77.1.2",
            ],
        );
    } else {
        // Every page had arrived: the service runs at B, and the source says so.
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(hosts.ip("b", &["-4", "addr"]).contains(SERVICE));
        assert!(!hosts.ip("a", &["-4", "addr"]).contains(SERVICE));
        reaper.join().unwrap();
    }
    let after = stats(&ask(hosts, "STATS"));
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["entries"], 1, "{after}");
}
