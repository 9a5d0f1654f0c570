//! The agent from outside: raw request lines in, reply lines decoded with this file's own
//! types (not the crate's), so a change to the wire format shows up here.
//!
//! One agent runs per process, so the tests take turns (SERIAL) and each stops its agent.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crac_core::{from_fns, Coordinator, Registration};
use serde::Deserialize;

static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReply {
    v: u32,
    ok: bool,
    op: String,
    pid: u32,
    state: String,
    generation: u64,
    cycle: Option<String>,
    resources: Vec<String>,
    last_restore_unix_ms: Option<u64>,
    hooks: Vec<WireHook>,
    error: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    last_cycle: Option<String>,
    #[serde(default)]
    last_failures: Vec<WireHook>,
    #[serde(default)]
    facts: Option<WireFacts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireFacts {
    sockets: Vec<u64>,
    #[serde(default)]
    socket_fds: Vec<i32>,
    connected: Vec<WireConnected>,
    #[serde(default)]
    listening: Vec<WireListening>,
    linked: Vec<WireLinked>,
    #[serde(default)]
    files: Option<Vec<(i32, u64)>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireListening {
    fd: i32,
    waiting: u32,
    local: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireConnected {
    fd: i32,
    inode: u64,
    tcp: bool,
    #[serde(default)]
    local: String,
    #[serde(default)]
    peer: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireLinked {
    fd: i32,
    target: String,
    size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHook {
    resource: String,
    phase: String,
    duration_us: u64,
    error: Option<String>,
}

struct Fixture {
    base: PathBuf,
    agent: crac_agent::Agent,
    coordinator: Coordinator,
    log: Arc<Mutex<Vec<String>>>,
    _registrations: Vec<Registration>,
    _serial: MutexGuard<'static, ()>,
}

fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "crac-agent-test-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&dir);
    dir
}

/// An agent over a fresh coordinator with resources "a" and "b" (b's before fails if asked).
fn fixture(name: &str, fail_b: bool) -> Fixture {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let base = scratch(name);
    let coordinator = Coordinator::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut registrations = Vec::new();
    for name in ["a", "b"] {
        let (l1, l2) = (log.clone(), log.clone());
        let fail = fail_b && name == "b";
        registrations.push(coordinator.context().register(from_fns(
            name,
            move |_| {
                l1.lock().unwrap().push(format!("before {name}"));
                if fail {
                    return Err("b refuses".into());
                }
                Ok(())
            },
            move |info| {
                l2.lock()
                    .unwrap()
                    .push(format!("after {name} {}", info.reason));
                Ok(())
            },
        )));
    }
    let agent = crac_agent::Builder::new()
        .coordinator(coordinator.clone())
        .base_dir(&base)
        .signal_cleanup(false)
        .start()
        .expect("agent starts");
    Fixture {
        base,
        agent,
        coordinator,
        log,
        _registrations: registrations,
        _serial: serial,
    }
}

impl Fixture {
    fn send(&self, line: &[u8]) -> WireReply {
        send_to(self.agent.socket_path(), line)
    }

    fn log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.agent.stop();
        let _ = fs::remove_dir_all(&self.base);
    }
}

fn send_to(path: &Path, line: &[u8]) -> WireReply {
    let mut stream = UnixStream::connect(path).expect("connect");
    stream.write_all(line).expect("write");
    // Say we are done, so that even an unterminated line is answered at once.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    // The agent closes after its one reply: read to EOF.
    stream.read_to_string(&mut reply).expect("read");
    assert_eq!(reply.matches('\n').count(), 1, "one reply line: {reply:?}");
    serde_json::from_str(reply.trim_end()).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

#[test]
fn status_reports_the_state() {
    let f = fixture("status", false);
    let reply = f.send(b"{\"v\":1,\"op\":\"status\"}\n");
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.v, 1);
    assert_eq!(reply.op, "status");
    assert_eq!(reply.pid, std::process::id());
    assert_eq!(reply.state, "idle");
    assert_eq!(reply.generation, 0);
    assert_eq!(reply.resources, ["a", "b"]);
    assert_eq!(reply.cycle, None);
    assert_eq!(reply.last_restore_unix_ms, None);
    assert!(reply.hooks.is_empty());
    assert_eq!(reply.error, None);
    assert_eq!(reply.code, None);
}

#[test]
fn a_full_cycle_over_the_socket() {
    let f = fixture("cycle", false);
    let reply = f.send(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"c1\"}\n");
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.state, "checkpointing");
    assert_eq!(reply.cycle.as_deref(), Some("c1"));
    let ran: Vec<_> = reply
        .hooks
        .iter()
        .map(|h| format!("{} {}", h.phase, h.resource))
        .collect();
    assert_eq!(ran, ["before_checkpoint b", "before_checkpoint a"]);
    assert!(reply
        .hooks
        .iter()
        .all(|h| h.error.is_none() && h.duration_us < 5_000_000));
    assert!(f.coordinator.is_quiesced());
    assert_eq!(reply.code, None);
    // The same cycle asked again (CRIU 4.1 under runc runs each action twice): ready already,
    // nothing runs again.
    let again = f.send(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"c1\"}\n");
    assert!(again.ok, "{again:?}");
    assert_eq!(again.code.as_deref(), Some("already"));
    assert!(again.hooks.is_empty());
    assert_eq!(again.state, "checkpointing");

    let reply =
        f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"restored\",\"cycle\":\"c1\"}\n");
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.state, "idle");
    assert_eq!(reply.generation, 1);
    assert!(reply.last_restore_unix_ms.is_some());
    let ran: Vec<_> = reply.hooks.iter().map(|h| h.resource.as_str()).collect();
    assert_eq!(ran, ["a", "b"]);
    assert_eq!(
        f.log(),
        [
            "before b",
            "before a",
            "after a restored",
            "after b restored"
        ]
    );
    assert!(!f.coordinator.is_quiesced());
}

#[test]
fn a_before_checkpoint_that_asks_gets_the_process_s_own_account_of_its_descriptors() {
    use std::os::fd::AsRawFd;
    let f = fixture("facts", false);
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let conn = std::net::TcpStream::connect(upstream.local_addr().unwrap()).unwrap();
    let (pair, _other_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let null = fs::File::open("/dev/null").unwrap();
    let path = scratch("facts-deleted");
    let deleted = fs::File::create(&path).unwrap();
    deleted.set_len(5).unwrap();
    fs::remove_file(&path).unwrap();

    let reply = f.send(
        b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"f\",\"facts\":true,\"lean\":{\"tcp_addresses\":true}}\n",
    );
    assert!(reply.ok, "{reply:?}");
    let facts = reply.facts.expect("facts, as asked");
    let tcp: Vec<&WireConnected> = facts
        .connected
        .iter()
        .filter(|c| c.fd == conn.as_raw_fd())
        .collect();
    assert_eq!(tcp.len(), 1, "{facts:?}");
    assert!(tcp[0].tcp);
    assert_eq!(tcp[0].local, conn.local_addr().unwrap().to_string());
    assert_eq!(tcp[0].peer, upstream.local_addr().unwrap().to_string());
    assert!(facts.sockets.contains(&tcp[0].inode));
    // Every socket with its descriptor; only TCP connections among `connected`.
    assert_eq!(facts.sockets.len(), facts.socket_fds.len(), "{facts:?}");
    assert!(facts.socket_fds.contains(&pair.as_raw_fd()), "{facts:?}");
    assert!(facts.connected.iter().all(|c| c.tcp), "{facts:?}");
    // The listener has one connection it has not accepted (`conn`).
    let listening: Vec<&WireListening> = facts
        .listening
        .iter()
        .filter(|l| l.fd == upstream.as_raw_fd())
        .collect();
    assert_eq!(listening.len(), 1, "{facts:?}");
    assert_eq!(listening[0].waiting, 1);
    assert_eq!(
        listening[0].local,
        upstream.local_addr().unwrap().to_string()
    );
    // A deleted file is told with its link and size; a memory device is nothing to CRIU.
    let ghost: Vec<&WireLinked> = facts
        .linked
        .iter()
        .filter(|l| l.fd == deleted.as_raw_fd())
        .collect();
    assert_eq!(ghost.len(), 1, "{facts:?}");
    assert_eq!(ghost[0].target, format!("{} (deleted)", path.display()));
    assert_eq!(ghost[0].size, 5);
    assert!(
        !facts.linked.iter().any(|l| l.fd == null.as_raw_fd()),
        "{facts:?}"
    );
    // Every regular file with its inode (the preflight matches them with the lock table):
    // the deleted one is, /dev/null is not.
    let files = facts.files.as_ref().expect("the regular files are told");
    let inode = std::os::unix::fs::MetadataExt::ino(&deleted.metadata().unwrap());
    assert!(files.contains(&(deleted.as_raw_fd(), inode)), "{facts:?}");
    assert!(
        !files.iter().any(|&(fd, _)| fd == null.as_raw_fd()),
        "{facts:?}"
    );
    f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"aborted\",\"cycle\":\"f\"}\n");

    // Without tcp_addresses the connection comes without them.
    let reply = f.send(
        b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"h\",\"facts\":true,\"lean\":{}}\n",
    );
    let facts = reply.facts.expect("facts, as asked");
    let tcp = facts.connected.iter().find(|c| c.fd == conn.as_raw_fd());
    assert!(
        tcp.is_some_and(|c| c.local.is_empty() && c.peer.is_empty()),
        "{facts:?}"
    );
    f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"aborted\",\"cycle\":\"h\"}\n");

    // A reader before `lean` gets what it expects: addresses, and the Unix pair among
    // `connected`.
    let reply = f.send(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"i\",\"facts\":true}\n");
    let facts = reply.facts.expect("facts, as asked");
    let tcp = facts.connected.iter().find(|c| c.fd == conn.as_raw_fd());
    assert!(
        tcp.is_some_and(|c| c.tcp && !c.peer.is_empty()),
        "{facts:?}"
    );
    let unix = facts.connected.iter().find(|c| c.fd == pair.as_raw_fd());
    assert!(unix.is_some_and(|c| !c.tcp), "{facts:?}");
    f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"aborted\",\"cycle\":\"i\"}\n");

    // Not asked, not sent.
    let reply = f.send(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"g\"}\n");
    assert!(reply.ok && reply.facts.is_none(), "{reply:?}");
    f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"aborted\",\"cycle\":\"g\"}\n");
}

#[test]
fn a_failing_hook_is_reported_and_rolled_back() {
    let f = fixture("failing", true);
    let reply = f.send(b"{\"v\":1,\"op\":\"before-checkpoint\"}\n");
    assert!(!reply.ok);
    assert_eq!(reply.code.as_deref(), Some("failed"));
    assert_eq!(reply.state, "idle");
    assert_eq!(
        reply.error.as_deref(),
        Some(
            "checkpoint refused: before_checkpoint of \"b\" failed: b refuses; \
             the resources that were told were rolled back (after_restore, reason aborted)"
        )
    );
    let failed: Vec<_> = reply.hooks.iter().filter(|h| h.error.is_some()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].resource, "b");
    assert_eq!(reply.hooks.len(), 4, "both phases are reported: {reply:?}");
    assert_eq!(
        f.log(),
        ["before b", "before a", "after a aborted", "after b aborted"]
    );
    // A status afterwards still says how the last cycle went, and what failed in it.
    let status = f.send(b"{\"v\":1,\"op\":\"status\"}\n");
    assert_eq!(status.last_cycle.as_deref(), Some("aborted"));
    let failed: Vec<_> = status
        .last_failures
        .iter()
        .map(|h| (h.resource.as_str(), h.phase.as_str()))
        .collect();
    assert_eq!(failed, [("b", "before_checkpoint")]);
}

#[test]
fn requests_out_of_order_are_refused_without_changing_state() {
    let f = fixture("order", false);
    let reply = f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"restored\"}\n");
    assert!(!reply.ok);
    assert_eq!(
        reply.error.as_deref(),
        Some("no checkpoint in progress: after-restore must follow a successful before-checkpoint")
    );
    assert_eq!(reply.code.as_deref(), Some("not-checkpointing"));
    assert!(
        f.send(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"c1\"}\n")
            .ok
    );
    let reply = f.send(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"c2\"}\n");
    assert!(!reply.ok);
    assert_eq!(
        reply.error.as_deref(),
        Some("a checkpoint is already in progress (cycle \"c1\"): it must be ended with after-restore before another can start")
    );
    assert_eq!(reply.code.as_deref(), Some("busy"));
    let reply =
        f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"aborted\",\"cycle\":\"c0\"}\n");
    assert!(!reply.ok);
    assert_eq!(
        reply.error.as_deref(),
        Some("cycle mismatch: the pending checkpoint is cycle \"c1\", this after-restore is for cycle \"c0\"")
    );
    assert_eq!(reply.code.as_deref(), Some("cycle-mismatch"));
    assert_eq!(reply.state, "checkpointing");
    let reply =
        f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"aborted\",\"cycle\":\"c1\"}\n");
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.generation, 0, "an aborted cycle does not count");
    assert_eq!(
        f.log(),
        ["before b", "before a", "after a aborted", "after b aborted"]
    );
}

#[test]
fn bad_input_gets_an_error_reply_and_the_agent_carries_on() {
    let f = fixture("bad-input", false);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json\n".to_vec(), "malformed request (expected ident"),
        (b"\n".to_vec(), "empty request"),
        (b"".to_vec(), "empty request"),
        (vec![b'x'; 5000], "request too long: no newline within 4096 bytes"),
        (
            [b"{\"v\":1,\"op\":\"status\",\"pad\":\"".as_slice(), &[b'y'; 5000], b"\"}\n"].concat(),
            "request too long",
        ),
        (b"{\"v\":1}\n".to_vec(), "malformed request (missing field `op`"),
        (b"{\"v\":2,\"op\":\"status\"}\n".to_vec(), "unsupported protocol version 2 (this agent speaks version 1)"),
        (b"{\"v\":1,\"op\":\"explode\"}\n".to_vec(), "unknown op \"explode\""),
        (
            b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"later\"}\n".to_vec(),
            "after-restore needs a reason, \"restored\", \"resumed\" or \"aborted\"; got Some(\"later\")",
        ),
        (vec![0xff, 0xfe, b'\n'], "malformed request"),
    ];
    for (input, expected) in cases {
        let reply = f.send(&input);
        assert!(!reply.ok);
        assert_eq!(reply.code.as_deref(), Some("bad-request"));
        let error = reply.error.unwrap_or_default();
        assert!(
            error.starts_with(expected),
            "for {:?}: {error:?} does not start with {expected:?}",
            String::from_utf8_lossy(&input[..input.len().min(40)])
        );
    }
    assert!(f.send(b"{\"v\":1,\"op\":\"status\"}\n").ok);
    assert!(f.log().is_empty());
}

/// A resource whose before_checkpoint says when it has started, then waits to be let go.
fn gated(f: &Fixture, name: &'static str) -> (Registration, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let registration = f.coordinator.context().register(from_fns(
        name,
        move |_| {
            let _ = started_tx.send(());
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            Ok(())
        },
        |_| Ok(()),
    ));
    (registration, started, release)
}

/// Holds the agent inside a cycle's after_restore: registers a resource "slow-up" whose
/// after_restore waits to be let go (then logs `after slow-up <reason>`), begins cycle "c1",
/// and ends it from another thread. Returns once the agent is held: the registration, that
/// thread (its reply), and what lets the hook go.
fn held_in_after_restore(
    f: &Fixture,
) -> (
    Registration,
    std::thread::JoinHandle<WireReply>,
    mpsc::Sender<()>,
) {
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let log = f.log.clone();
    let registration = f.coordinator.context().register(from_fns(
        "slow-up",
        |_| Ok(()),
        move |info| {
            let _ = started_tx.send(());
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            log.lock()
                .unwrap()
                .push(format!("after slow-up {}", info.reason));
            Ok(())
        },
    ));
    assert!(
        f.send(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"c1\"}\n")
            .ok
    );
    let path = f.agent.socket_path().to_owned();
    let ender = std::thread::spawn(move || {
        send_to(
            &path,
            b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"aborted\",\"cycle\":\"c1\"}\n",
        )
    });
    started
        .recv_timeout(Duration::from_secs(5))
        .expect("the after_restore hooks started");
    (registration, ender, release)
}

/// The client hangs up while the hooks run: nobody heard that they did, so no dump follows,
/// and the agent comes back up at once.
#[test]
fn a_checkpoint_whose_reply_nobody_reads_is_rolled_back() {
    let f = fixture("unheard", false);
    let (_slow, started, release) = gated(&f, "slow");
    let mut stream = UnixStream::connect(f.agent.socket_path()).unwrap();
    stream
        .write_all(b"{\"v\":1,\"op\":\"before-checkpoint\"}\n")
        .unwrap();
    started
        .recv_timeout(Duration::from_secs(5))
        .expect("the hooks started");
    drop(stream);
    release.send(()).unwrap();
    let reply = f.send(b"{\"v\":1,\"op\":\"status\"}\n");
    assert_eq!(reply.state, "idle", "{reply:?}");
    assert_eq!(
        f.log(),
        ["before b", "before a", "after a aborted", "after b aborted"]
    );
}

/// A before-checkpoint whose client gave up and left before the agent got to it is not run:
/// no "ghost" cycle after the client's dump has failed. Here the agent is busy ending a cycle
/// (an after_restore that takes its time) while a client asks for a checkpoint and leaves.
#[test]
fn a_before_checkpoint_whose_client_left_is_not_run() {
    let f = fixture("ghost", false);
    let (_slow_up, ender, release) = held_in_after_restore(&f);
    {
        let mut gone = UnixStream::connect(f.agent.socket_path()).unwrap();
        gone.write_all(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"ghost\"}\n")
            .unwrap();
    }
    release.send(()).unwrap();
    assert!(ender.join().unwrap().ok);
    let reply = f.send(b"{\"v\":1,\"op\":\"status\"}\n");
    assert_eq!(reply.state, "idle", "{reply:?}");
    // One cycle, and nothing of the ghost's.
    assert_eq!(
        f.log(),
        [
            "before b",
            "before a",
            "after a aborted",
            "after b aborted",
            "after slow-up aborted"
        ]
    );
}

/// A checkpoint begins while other clients wait in the same round of the agent's loop: they
/// are told to ask again later, and the agent carries on (it once served a connection it had
/// just closed, and its thread died). The agent is held in an after_restore hook while two
/// clients connect, so that it takes both at once.
#[test]
fn a_checkpoint_that_begins_while_others_wait_closes_them_and_the_agent_carries_on() {
    let f = fixture("together", false);
    let (_slow_up, ender, release) = held_in_after_restore(&f);
    let mut waiting = UnixStream::connect(f.agent.socket_path()).unwrap();
    waiting.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
    let mut starting = UnixStream::connect(f.agent.socket_path()).unwrap();
    starting
        .write_all(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"c2\"}\n")
        .unwrap();
    release.send(()).unwrap();
    assert!(ender.join().unwrap().ok);
    let read = |stream: &mut UnixStream| -> WireReply {
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        serde_json::from_str(reply.trim_end()).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
    };
    let started = read(&mut starting);
    assert!(started.ok, "{started:?}");
    let told = read(&mut waiting);
    assert_eq!(told.code.as_deref(), Some("busy"), "{told:?}");
    assert_eq!(
        told.error.as_deref(),
        Some("a checkpoint is being taken now: ask again when it is over")
    );
    let reply = f.send(b"{\"v\":1,\"op\":\"status\"}\n");
    assert_eq!(reply.state, "checkpointing", "{reply:?}");
    assert_eq!(reply.cycle.as_deref(), Some("c2"));
}

/// More data after the request line, in the same write: the reply still arrives (closing
/// with unread data would reset the connection), and it says what happened.
#[test]
fn a_request_followed_by_more_data_still_gets_its_reply() {
    let f = fixture("trailing", false);
    let mut line = b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"t\"}\n".to_vec();
    line.extend(std::iter::repeat_n(b'x', 8000));
    let mut stream = UnixStream::connect(f.agent.socket_path()).unwrap();
    stream.write_all(&line).unwrap();
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .expect("the reply, not a reset connection");
    let reply: WireReply = serde_json::from_str(reply.trim_end()).unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.state, "checkpointing");
    assert_eq!(f.log(), ["before b", "before a"]);
}

/// A silent client, and one that sends a byte now and then, hold only their own connection:
/// others are answered at once, and they get an error when their time is up.
#[test]
fn slow_and_silent_clients_delay_nobody() {
    let f = fixture("slow-clients", false);
    let silent = UnixStream::connect(f.agent.socket_path()).unwrap();
    let path = f.agent.socket_path().to_owned();
    let trickle = std::thread::spawn(move || {
        let mut stream = UnixStream::connect(&path).unwrap();
        let started = Instant::now();
        for byte in b"{\"v\":1,\"op\":\"status\"}\n" {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            if started.elapsed() > Duration::from_secs(4) {
                break;
            }
        }
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        (reply, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let reply = f.send(b"{\"v\":1,\"op\":\"status\"}\n");
    assert!(reply.ok);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a status request waited {:?} behind slow clients",
        started.elapsed()
    );
    let (reply, took) = trickle.join().unwrap();
    let reply: WireReply = serde_json::from_str(reply.trim_end()).unwrap();
    assert_eq!(
        reply.error.as_deref(),
        Some("no complete request line within 2000 ms")
    );
    assert!(
        took < Duration::from_secs(4),
        "the slow client was served for {took:?}"
    );
    let mut reply = String::new();
    (&silent).read_to_string(&mut reply).unwrap();
    assert!(
        reply.contains("no complete request line within 2000 ms"),
        "{reply}"
    );
}

/// A checkpoint that nobody ends (its client went away after the reply, before a watcher
/// existed) is ended by the agent when its lease runs out: "aborted", and the service runs on.
#[test]
fn a_checkpoint_nobody_ends_is_rolled_back_when_its_lease_runs_out() {
    let f = fixture("lease", false);
    let reply =
        f.send(b"{\"v\":1,\"op\":\"before-checkpoint\",\"cycle\":\"left\",\"lease_ms\":300}\n");
    assert!(reply.ok);
    assert!(f.coordinator.is_quiesced());
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.coordinator.is_quiesced() {
        assert!(Instant::now() < deadline, "still quiesced after 5 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        f.log(),
        ["before b", "before a", "after a aborted", "after b aborted"]
    );
    let late =
        f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"resumed\",\"cycle\":\"left\"}\n");
    assert_eq!(late.code.as_deref(), Some("not-checkpointing"));
}

/// The socket's folder removed by someone else (a /tmp cleaner): the agent makes it again.
#[test]
fn a_removed_socket_is_made_again() {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let base = scratch("heal");
    let coordinator = Coordinator::new();
    let agent = crac_agent::Builder::new()
        .coordinator(coordinator)
        .base_dir(&base)
        .signal_cleanup(false)
        .socket_check(Some(Duration::from_millis(100)))
        .start()
        .expect("agent starts");
    let socket = agent.socket_path().to_owned();
    fs::remove_dir_all(socket.parent().unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the socket was not made again");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(send_to(&socket, b"{\"v\":1,\"op\":\"status\"}\n").ok);
    assert_eq!(
        fs::metadata(socket.parent().unwrap()).unwrap().mode() & 0o7777,
        0o700
    );
    agent.stop();
    let _ = fs::remove_dir_all(&base);
    drop(serial);
}

#[test]
fn the_socket_lives_in_a_private_folder_and_is_removed_at_stop() {
    let f = fixture("layout", false);
    let dir = f.base.join(std::process::id().to_string());
    let socket = dir.join("agent.sock");
    assert_eq!(f.agent.socket_path(), socket);
    assert_eq!(fs::metadata(&f.base).unwrap().mode() & 0o7777, 0o1777);
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
    f.agent.stop();
    assert!(!socket.exists());
    assert!(!dir.exists());
    f.agent.stop();
}

#[test]
fn a_second_agent_in_the_same_process_is_refused() {
    let f = fixture("twice", false);
    let err = crac_agent::Builder::new()
        .base_dir(&f.base)
        .start()
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("an agent is already running in this process"),
        "{err}"
    );
}

#[test]
fn a_stale_socket_is_replaced() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let base = scratch("stale");
    let dir = base.join(std::process::id().to_string());
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&base, fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    // A socket file with nobody listening, as a killed process leaves it.
    drop(UnixListener::bind(dir.join("agent.sock")).unwrap());
    let agent = crac_agent::Builder::new()
        .coordinator(Coordinator::new())
        .base_dir(&base)
        .signal_cleanup(false)
        .start()
        .expect("a stale socket does not stop the agent");
    assert!(send_to(agent.socket_path(), b"{\"v\":1,\"op\":\"status\"}\n").ok);
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    agent.stop();
    let _ = fs::remove_dir_all(&base);
}

#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn a_base_folder_owned_by_another_user_is_refused() {
    if !crac_test_support::root("to create a folder owned by another user") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let base = scratch("foreign");
    fs::create_dir_all(&base).unwrap();
    std::os::unix::fs::chown(&base, Some(65534), Some(65534)).unwrap();
    let err = crac_agent::Builder::new()
        .base_dir(&base)
        .start()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "refusing to use {}: it belongs to uid 65534, who could replace the agent folders in it; \
             remove it, or set CRAC_AGENT_DIR to a folder of your own",
            base.display()
        )
    );
    let _ = fs::remove_dir_all(&base);
}

/// Even with the folder and socket opened up, a client of another uid is refused by the
/// SO_PEERCRED check. The client is a forked child that drops to nobody.
#[test]
#[ignore = "needs root: scripts/test.sh runs it"]
fn a_client_of_another_uid_is_refused() {
    if !crac_test_support::root("to drop a child to another uid") {
        return;
    }
    let f = fixture("peer", false);
    let dir = f.agent.socket_path().parent().unwrap().to_owned();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).unwrap();
    fs::set_permissions(f.agent.socket_path(), fs::Permissions::from_mode(0o666)).unwrap();
    let reply = as_nobody(
        f.agent.socket_path(),
        b"{\"v\":1,\"op\":\"before-checkpoint\"}\n",
    );
    let reply: WireReply = serde_json::from_slice(&reply)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&reply)));
    assert!(!reply.ok);
    assert_eq!(
        reply.error.as_deref(),
        Some(
            format!(
                "permission denied: uid 65534 may not control this process; only root and uid {} may",
                nix::unistd::geteuid()
            )
            .as_str()
        )
    );
    assert_eq!(reply.code.as_deref(), Some("permission-denied"));
    assert!(f.log().is_empty(), "no hook may run for a refused client");
    assert_eq!(f.coordinator.generation(), 0);
}

/// Forks a child that becomes uid/gid 65534, sends `request` to `socket` and passes the reply
/// back through a pipe. Only system calls run between fork and _exit (nothing allocates).
fn as_nobody(socket: &Path, request: &[u8]) -> Vec<u8> {
    use nix::sys::socket::{
        connect, socket as new_socket, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    use nix::unistd::{fork, pipe, read, write, ForkResult};
    use std::os::fd::AsRawFd;

    let addr = UnixAddr::new(socket).unwrap();
    let (rx, tx) = pipe().unwrap();
    // SAFETY: the child only makes system calls (setgid, setuid, socket, connect, write, read,
    // _exit) on data prepared before the fork; it never returns into the test harness.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            // SAFETY: a watchdog so a stuck child cannot hang the tests; async-signal-safe.
            unsafe { libc::alarm(10) };
            // Exit code: 0 done, or the step that failed (2 setgid .. 6 read).
            let code = (|| -> Result<(), i32> {
                nix::unistd::setgid(65534.into()).map_err(|_| 2)?;
                nix::unistd::setuid(65534.into()).map_err(|_| 3)?;
                let fd = new_socket(
                    AddressFamily::Unix,
                    SockType::Stream,
                    SockFlag::empty(),
                    None,
                )
                .map_err(|_| 4)?;
                connect(fd.as_raw_fd(), &addr).map_err(|_| 5)?;
                write(&fd, request).map_err(|_| 6)?;
                let mut buf = [0u8; 4096];
                loop {
                    let n = read(&fd, &mut buf).map_err(|_| 7)?;
                    if n == 0 {
                        break;
                    }
                    write(&tx, &buf[..n]).map_err(|_| 8)?;
                }
                Ok(())
            })()
            .err()
            .unwrap_or(0);
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(tx);
            let mut out = Vec::new();
            fs::File::from(rx).read_to_end(&mut out).unwrap();
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "the nobody client failed"
            );
            out
        }
    }
}

/// A self-checkpoint asked for from inside a hook fails at once: it would wait for the hook
/// that asked for it (and, left alone, run a nested dump after that hook's limit).
#[test]
fn a_self_checkpoint_from_inside_a_hook_is_refused() {
    let f = fixture("self-in-hook", false);
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let _r = f.coordinator.context().register(from_fns(
        "asks-for-a-checkpoint",
        move |_| {
            let result = crac_agent::SelfCheckpoint::new()
                .to("never-made")
                .crac_binary("/nonexistent/crac")
                .run();
            *s.lock().unwrap() = Some(result.map_err(|e| e.to_string()));
            Ok(())
        },
        |_| Ok(()),
    ));
    f.coordinator.simulate().unwrap();
    assert_eq!(
        seen.lock().unwrap().clone(),
        Some(Err("called from inside a crac hook: a checkpoint runs the hooks, so it cannot be started from one; call it outside hooks".to_owned()))
    );
}

#[test]
fn settings_sent_with_after_restore_reach_the_hooks() {
    let f = fixture("env", false);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let _r = f.coordinator.context().register(from_fns(
        "config",
        |_| Ok(()),
        move |info| {
            s.lock().unwrap().push(format!(
                "{:?} {:?} {}",
                info.var("LOG_LEVEL"),
                info.var("MISSING"),
                info.env.len()
            ));
            Ok(())
        },
    ));
    assert!(f.send(b"{\"v\":1,\"op\":\"before-checkpoint\"}\n").ok);
    let reply = f.send(
        b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"restored\",\
          \"env\":{\"LOG_LEVEL\":\"debug\",\"UPSTREAM\":\"10.0.0.2:80\"}}\n",
    );
    assert!(reply.ok, "{reply:?}");
    assert_eq!(*seen.lock().unwrap(), ["Some(\"debug\") None 2"]);
    // Settings that are not strings are a bad request, and the checkpoint stays pending.
    assert!(f.send(b"{\"v\":1,\"op\":\"before-checkpoint\"}\n").ok);
    let bad =
        f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"restored\",\"env\":{\"N\":3}}\n");
    assert!(!bad.ok);
    assert_eq!(bad.code.as_deref(), Some("bad-request"));
    assert!(f.coordinator.is_quiesced());
    assert!(
        f.send(b"{\"v\":1,\"op\":\"after-restore\",\"reason\":\"aborted\"}\n")
            .ok
    );
}

/// `crac upgrade`'s two ops: the listeners the service shares, passed with their names
/// (decoded by crac-protocol's client: the descriptors come with `recvmsg`), and the retire
/// phase.
#[test]
fn listeners_are_passed_by_name_and_retire_drains_and_runs_the_hooks_once() {
    use std::os::fd::AsRawFd;
    let f = fixture("upgrade", false);
    let ask = || {
        let stream = UnixStream::connect(f.agent.socket_path()).expect("connect");
        crac_protocol::client::exchange_with_fds(
            stream,
            f.agent.socket_path(),
            &crac_protocol::wire::Request::listeners(),
            Duration::from_secs(2),
        )
        .expect("a reply")
    };
    // Nothing shared: nothing passed.
    let (reply, fds) = ask();
    assert!(
        reply.ok && reply.listeners.is_empty() && fds.is_empty(),
        "{reply:?}"
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    crac_agent::upgrade::share_listener("http", &listener).unwrap();
    let (reply, fds) = ask();
    assert_eq!(reply.listeners, ["http"]);
    assert_eq!(fds.len(), 1);
    let inode = |fd: i32| fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
    assert_eq!(inode(fds[0].as_raw_fd()), inode(listener.as_raw_fd()));
    // The very socket: a client of the service's address is accepted through the copy.
    let copy = std::net::TcpListener::from(fds.into_iter().next().unwrap());
    let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    copy.accept().expect("accepted through the passed copy");

    let told = f.log.clone();
    f.coordinator.on_retire("flush", move || {
        told.lock().unwrap().push("retire flush".into())
    });
    assert!(!f.coordinator.is_draining());
    let reply = f.send(b"{\"v\":1,\"op\":\"retire\"}\n");
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.op, "retire");
    assert_eq!(f.log(), ["retire flush"]);
    assert!(f.coordinator.is_draining());
    assert!(f.coordinator.wait_retired(Some(Duration::ZERO)));
    // Once only.
    assert!(f.send(b"{\"v\":1,\"op\":\"retire\"}\n").ok);
    assert!(f.log().is_empty());
}
