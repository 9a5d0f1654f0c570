//! The process the end-to-end tests checkpoint: resources that log their hooks, in-memory
//! state that must survive, and a heartbeat that shows whether it still runs.
//!
//! Configured by environment:
//! - `CRAC_TEST_DIR` (required): where it writes `hooks.log`, `state` and `ready`, and a
//!   restore's settings (`RestoreInfo::env`) in `restore-env`, one `K=V` a line.
//! - `CRAC_TEST_RESOURCES`: resource names, in registration order (default `first,second,third`).
//! - `CRAC_TEST_FAIL`: a resource whose before_checkpoint fails.
//! - `CRAC_TEST_HANG`: a resource whose before_checkpoint sleeps: `name` for a minute,
//!   `name:MS` for MS milliseconds.
//! - `CRAC_TEST_HOOK_LIMIT_MS`: the per-hook time limit.
//! - `CRAC_TEST_FAIL_RESTORE`: a resource whose after_restore fails when the process was
//!   restored from an image.
//! - `CRAC_TEST_BEFORE_SH=name:COMMAND`: resource `name` runs `sh -c COMMAND` in its
//!   before_checkpoint, and waits for it (a fault injected while a dump is under way).
//! - `CRAC_TEST_NO_AGENT=1`: do not start the agent.
//! - `CRAC_TEST_CHILD=1`: also start a child process like this one, in `$CRAC_TEST_DIR/child`;
//!   `CRAC_TEST_CHILD_MAP=PATH` makes it map PATH (see `CRAC_TEST_MAP`).
//! - `CRAC_TEST_OWN_SIGTERM=before|after`: handle SIGTERM itself (a graceful exit with status
//!   0), installing the handler before or after the agent starts.
//! - `CRAC_TEST_DRAIN_MS=MS`: with `CRAC_TEST_OWN_SIGTERM`, keep running (and logging
//!   `draining`) for MS milliseconds after SIGTERM before the graceful exit.
//! - `CRAC_TEST_EXIT_AFTER=N`: return from main after N heartbeats.
//! - `CRAC_TEST_SELF_CHECKPOINT=leave|stop`: once ready, checkpoint itself (destination from
//!   `CRAC_CHECKPOINT_TO`) and log `self-checkpoint: <reason>` or `self-checkpoint error: ...`.
//! - `CRAC_TEST_ORDER_LOG`: a log shared by a parent and its child; each hook appends
//!   `<pid> <line>`, so the order across processes shows.
//! - `CRAC_TEST_REUSEPORT=1`: with `CRAC_TEST_LISTEN`, bind with SO_REUSEPORT (copies restored
//!   from one image then serve the port side by side).
//! - `CRAC_TEST_LISTEN=PORT`: serve on TCP and UDP `127.0.0.1:PORT` (0: any free port; the
//!   child, if any, takes PORT+1, or 0), writing `tcp udp` ports to `$CRAC_TEST_DIR/ports`.
//!   TCP takes one request line per connection: `STATUS` answers one JSON line (pid, token,
//!   counter, generation, instance, tcp_kept, tcp_closed, hooks: the hook lines this memory
//!   holds) and closes; `HOLD` keeps the connection and echoes each line as `echo:LINE` until
//!   it ends (then `connections.log` says how). Connections are accepted with a critical
//!   section taken first, as a service that keeps its listener would. UDP answers each
//!   datagram with `udp TOKEN DATA`. An `identity` resource renews `instance` when restored.
//! - `CRAC_TEST_STOP_AGENT_ON=USR1`: SIGUSR1 stops the agent (its socket goes; the process
//!   runs on).
//! - `CRAC_TEST_SOCKET_CHECK_MS=MS`: the agent looks at its socket every MS milliseconds.
//! - `CRAC_TEST_MIB=N`: touch N MiB of memory at start (a slower dump), every page with content
//!   of its own, which the TCP request `HEAP` checks (`heap ok N MiB`).
//! - `CRAC_TEST_ASYNC=panic|pending|shutdown`: also register an async resource `async`, on a
//!   tokio runtime of the target's own, whose before_checkpoint panics, never completes, or
//!   cannot run because its runtime was shut down right after it was registered.
//! - `CRAC_TEST_CONNECT=name:ADDR`: resource `name` opens a TCP connection to ADDR at start,
//!   keeps it open across checkpoints and declares it (`Resource::descriptors`).
//! - `CRAC_TEST_RECONNECT=name:ADDR`: resource `name`'s after_restore opens a TCP connection to
//!   ADDR, which its before_checkpoint leaves open (and does not declare).
//! - `CRAC_TEST_LOCK=KIND:PATH,...`: hold an exclusive lock on each PATH (created if missing)
//!   for the life of the process: KIND `flock` (a pidfile's), `posix` (`fcntl(F_SETLK)`, as
//!   SQLite takes them) or `ofd` (`fcntl(F_OFD_SETLK)`), the whole file.
//! - `CRAC_TEST_MAP=PATH`: keep the file PATH mapped, read-only, as a service maps a library or
//!   a data file (a restore maps it again from its path).
//!
//! `state` holds `pid token counter generation`: the token is random and lives only in memory,
//! so a restored process that shows the same token really is the same memory.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crac_core::{
    CheckpointInfo, Coordinator, HookError, Limits, Resource, RestoreInfo, RestoreReason,
};

/// The hook lines this process's memory holds (a restored copy has the original's before
/// lines and its own after lines).
static HOOKS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Renewed by the `identity` resource in a restored process.
static INSTANCE: AtomicU64 = AtomicU64::new(0);
/// `RestoreInfo::tcp` of the last after_restore.
static TCP_KEPT: AtomicUsize = AtomicUsize::new(0);
static TCP_CLOSED: AtomicUsize = AtomicUsize::new(0);
/// The heartbeat counter.
static COUNTER: AtomicU64 = AtomicU64::new(0);

struct Logged {
    name: String,
    log: PathBuf,
    order_log: Option<PathBuf>,
    fail: bool,
    fail_restore: bool,
    before_sh: Option<String>,
    hang: Option<Duration>,
    /// `CRAC_TEST_CONNECT`'s connection, declared.
    declared: Option<TcpStream>,
    /// Where `CRAC_TEST_RECONNECT` connects in after_restore, and what it opened.
    reconnect: Option<String>,
    opened: Mutex<Vec<TcpStream>>,
}

impl Logged {
    fn append(&self, line: &str) {
        HOOKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line.to_owned());
        append(&self.log, line);
        if let Some(order_log) = &self.order_log {
            append(order_log, &format!("{} {line}", std::process::id()));
        }
    }
}

impl Resource for Logged {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        self.name.as_str().into()
    }
    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        self.append(&format!("before {}", self.name));
        if let Some(command) = &self.before_sh {
            let status = Command::new("sh")
                .arg("-c")
                .arg(command)
                .stdin(Stdio::null())
                .status()?;
            if !status.success() {
                return Err(format!("{} could not run {command:?}: {status}", self.name).into());
            }
        }
        if let Some(hang) = self.hang {
            std::thread::sleep(hang);
        }
        if self.fail {
            return Err(format!("{} cannot go down", self.name).into());
        }
        Ok(())
    }
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        self.append(&format!(
            "after {} {} gen={}",
            self.name, info.reason, info.generation
        ));
        if !info.env.is_empty() {
            let settings: String = info.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            if let Some(dir) = self.log.parent() {
                let _ = fs::write(dir.join("restore-env"), settings);
            }
        }
        if self.fail_restore && info.reason == RestoreReason::Restored {
            return Err(format!("{} cannot come back up", self.name).into());
        }
        if let Some(addr) = &self.reconnect {
            let stream = TcpStream::connect(addr.as_str())?;
            self.opened
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(stream);
        }
        Ok(())
    }
    fn descriptors(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.declared.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

/// Renews the instance id in a restored process, and notes what became of its TCP connections.
struct Identity;

impl Resource for Identity {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        "identity".into()
    }
    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        Ok(())
    }
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        if info.reason == RestoreReason::Restored {
            INSTANCE.store(random(), Ordering::SeqCst);
        }
        TCP_KEPT.store(info.tcp.kept, Ordering::SeqCst);
        TCP_CLOSED.store(info.tcp.closed, Ordering::SeqCst);
        Ok(())
    }
}

fn random() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 32)
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CRAC_TEST_DIR").expect("CRAC_TEST_DIR is set"));
    fs::create_dir_all(&dir).expect("test dir");
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let names = var("CRAC_TEST_RESOURCES").unwrap_or_else(|| "first,second,third".into());
    let fail = var("CRAC_TEST_FAIL");
    let hang = var("CRAC_TEST_HANG");
    let fail_restore = var("CRAC_TEST_FAIL_RESTORE");
    let before_sh = var("CRAC_TEST_BEFORE_SH");
    let of = |knob: &Option<String>, name: &str| {
        knob.as_deref()
            .and_then(|v| v.split_once(':'))
            .filter(|(resource, _)| *resource == name)
            .map(|(_, rest)| rest.to_owned())
    };
    let connect = var("CRAC_TEST_CONNECT");
    let reconnect = var("CRAC_TEST_RECONNECT");
    let coordinator = Coordinator::global();
    if let Some(ms) = var("CRAC_TEST_HOOK_LIMIT_MS") {
        let ms: u64 = ms.parse().expect("CRAC_TEST_HOOK_LIMIT_MS is a number");
        coordinator.set_limits(Limits::default().with_hook(Some(Duration::from_millis(ms))));
    }
    for name in names.split(',') {
        coordinator
            .context()
            .register(Logged {
                name: name.to_owned(),
                log: dir.join("hooks.log"),
                order_log: var("CRAC_TEST_ORDER_LOG").map(PathBuf::from),
                fail: fail.as_deref() == Some(name),
                fail_restore: fail_restore.as_deref() == Some(name),
                before_sh: of(&before_sh, name),
                hang: hang_of(hang.as_deref(), name),
                declared: of(&connect, name).map(|addr| {
                    TcpStream::connect(addr.as_str()).expect("CRAC_TEST_CONNECT connects")
                }),
                reconnect: of(&reconnect, name),
                opened: Mutex::new(Vec::new()),
            })
            .keep();
    }
    if let Some(mode) = var("CRAC_TEST_ASYNC") {
        register_async(coordinator, mode);
    }
    let terminate = Arc::new(AtomicBool::new(false));
    let own_sigterm = var("CRAC_TEST_OWN_SIGTERM");
    let handle_sigterm = || {
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&terminate))
            .expect("SIGTERM handler");
    };
    if own_sigterm.as_deref() == Some("before") {
        handle_sigterm();
    }
    let listen: Option<u16> = var("CRAC_TEST_LISTEN").map(|p| p.parse().expect("a port"));
    if listen.is_some() {
        INSTANCE.store(random(), Ordering::SeqCst);
        coordinator.context().register(Identity).keep();
    }
    let agent = if var("CRAC_TEST_NO_AGENT").is_none() {
        let mut builder = crac_agent::Builder::new();
        if let Some(ms) = var("CRAC_TEST_SOCKET_CHECK_MS") {
            builder = builder.socket_check(Some(Duration::from_millis(
                ms.parse().expect("CRAC_TEST_SOCKET_CHECK_MS is a number"),
            )));
        }
        Some(
            builder
                .start()
                .unwrap_or_else(|err| panic!("agent starts: {err}")),
        )
    } else {
        None
    };
    if let (Some("USR1"), Some(agent)) = (var("CRAC_TEST_STOP_AGENT_ON").as_deref(), &agent) {
        let agent = agent.clone();
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])
            .expect("SIGUSR1 handler");
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                agent.stop();
            }
        });
    }
    if own_sigterm.as_deref() == Some("after") {
        handle_sigterm();
    }
    let exit_after: Option<u64> = var("CRAC_TEST_EXIT_AFTER").map(|n| n.parse().expect("a count"));
    let mut child = None;
    if var("CRAC_TEST_CHILD").is_some() {
        let child_dir = dir.join("child");
        let mut command = Command::new(std::env::current_exe().expect("own exe"));
        if let Some(port) = listen {
            command.env(
                "CRAC_TEST_LISTEN",
                if port == 0 { 0 } else { port + 1 }.to_string(),
            );
        }
        if let Some(path) = var("CRAC_TEST_CHILD_MAP") {
            command.env("CRAC_TEST_MAP", path);
        }
        let spawned = command
            .env("CRAC_TEST_DIR", &child_dir)
            .env_remove("CRAC_TEST_CHILD")
            .env("CRAC_TEST_RESOURCES", "child-a,child-b")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("child starts");
        child = Some(spawned);
        // Report ready only once the child is ready, so the test dumps both with agents.
        wait_for(&child_dir.join("ready"));
    }
    // Memory the dump must write: every page touched, each with its own content, kept to the
    // end (`HEAP` checks it).
    let mib = var("CRAC_TEST_MIB").map_or(0, |n| n.parse::<usize>().expect("a size"));
    BALLAST.get_or_init(|| (0..mib << 17).map(ballast_word).collect());
    if let Some(path) = var("CRAC_TEST_MAP") {
        let file = fs::File::open(&path).expect("CRAC_TEST_MAP names a readable file");
        let len = file.metadata().expect("its size").len() as usize;
        // SAFETY: a new private read-only mapping of a file opened here, whole; nothing reads
        // through it, and it stays mapped for the life of the process on purpose.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap {path}");
    }
    if let Some(locks) = var("CRAC_TEST_LOCK") {
        for lock in locks.split(',') {
            hold_lock(lock);
        }
    }
    let token: u64 = random();
    if let Some(port) = listen {
        serve(&dir, port, token, coordinator);
    }
    fs::write(dir.join("ready"), std::process::id().to_string()).expect("ready file");
    if let Some(mode) = var("CRAC_TEST_SELF_CHECKPOINT") {
        let line = match crac_agent::SelfCheckpoint::new()
            .leave_running(mode == "leave")
            .run()
        {
            Ok(reason) => format!("self-checkpoint: {reason}"),
            Err(err) => format!("self-checkpoint error: {err}"),
        };
        append(&dir.join("hooks.log"), &line);
    }
    let drain: Option<Duration> = var("CRAC_TEST_DRAIN_MS")
        .map(|ms| Duration::from_millis(ms.parse().expect("CRAC_TEST_DRAIN_MS is a number")));
    let mut draining_until: Option<std::time::Instant> = None;
    loop {
        let counter = COUNTER.load(Ordering::SeqCst);
        if terminate.load(Ordering::SeqCst) {
            match (drain, draining_until) {
                (Some(drain), None) => {
                    append(&dir.join("hooks.log"), "draining");
                    draining_until = Some(std::time::Instant::now() + drain);
                }
                (Some(_), Some(until)) if std::time::Instant::now() < until => {}
                _ => {
                    append(&dir.join("hooks.log"), "graceful exit");
                    break;
                }
            }
        }
        if exit_after.is_some_and(|n| counter >= n) {
            break;
        }
        {
            // Work that a checkpoint must not cut, and that must not run before after_restore.
            let _work = coordinator.critical_section();
            let counter = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
            let state = format!(
                "{} {token} {counter} {}\n",
                std::process::id(),
                coordinator.generation()
            );
            // A name of its own: copies restored from one image share the folder (and pid 1).
            let tmp = dir.join(format!("state.tmp.{}", random()));
            fs::write(&tmp, state).expect("state file");
            fs::rename(&tmp, dir.join("state")).expect("state file");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Serves TCP and UDP on `127.0.0.1:port` (see the module documentation).
fn serve(dir: &Path, port: u16, token: u64, coordinator: &'static Coordinator) {
    let (tcp, udp) = if std::env::var_os("CRAC_TEST_REUSEPORT").is_some() {
        shared_sockets(port)
    } else {
        (
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("TCP listener"),
            UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).expect("UDP socket"),
        )
    };
    tcp.set_nonblocking(true).expect("non-blocking listener");
    fs::write(
        dir.join("ports"),
        format!(
            "{} {}",
            tcp.local_addr().expect("bound").port(),
            udp.local_addr().expect("bound").port()
        ),
    )
    .expect("ports file");
    let log = dir.join("connections.log");
    std::thread::spawn(move || loop {
        let mut ready = [nix::poll::PollFd::new(
            tcp.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut ready, nix::poll::PollTimeout::NONE);
        // Taken before the accept: nothing is accepted while a checkpoint is in progress.
        let section = coordinator.critical_section();
        let Ok((stream, _)) = tcp.accept() else {
            continue;
        };
        let _ = stream.set_nonblocking(false);
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut line = String::new();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        match line.trim_end() {
            "STATUS" => {
                let _ = (&stream).write_all(format!("{}\n", status(token, coordinator)).as_bytes());
            }
            "HEAP" => {
                let _ = (&stream).write_all(format!("{}\n", check_heap()).as_bytes());
            }
            "HOLD" => {
                let log = log.clone();
                drop(section);
                std::thread::spawn(move || hold(stream, reader, &log));
            }
            other => {
                let _ = (&stream).write_all(format!("ERR unknown request {other:?}\n").as_bytes());
            }
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let reply = format!("udp {token} {}", String::from_utf8_lossy(&buf[..n]));
            let _ = udp.send_to(reply.as_bytes(), from);
        }
    });
}

/// A TCP listener and a UDP socket on `127.0.0.1:port` with SO_REUSEPORT, so that several
/// processes (copies restored from one image) serve the same port side by side.
fn shared_sockets(port: u16) -> (TcpListener, UdpSocket) {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn,
    };
    let addr = SockaddrIn::new(127, 0, 0, 1, port);
    let open = |kind| {
        let fd = socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC, None).expect("socket");
        setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).expect("bind");
        fd
    };
    let tcp = open(SockType::Stream);
    listen(&tcp, Backlog::new(64).expect("a backlog")).expect("listen");
    (
        TcpListener::from(tcp),
        UdpSocket::from(open(SockType::Datagram)),
    )
}

/// `CRAC_TEST_MIB`'s memory, in 8-byte words.
static BALLAST: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();

/// What word `i` of the ballast holds: every page differs from every other.
fn ballast_word(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 >> 9)
}

/// `heap ok N MiB`, or where the ballast differs from what was written.
fn check_heap() -> String {
    let heap = BALLAST.get().map_or(&[][..], Vec::as_slice);
    match heap
        .iter()
        .enumerate()
        .find(|&(i, &w)| w != ballast_word(i))
    {
        None => format!("heap ok {} MiB", heap.len() >> 17),
        Some((i, w)) => format!(
            "heap bad at byte {} (page {}): {w:#x}, expected {:#x}",
            i * 8,
            i >> 9,
            ballast_word(i)
        ),
    }
}

fn status(token: u64, coordinator: &Coordinator) -> String {
    serde_json::json!({
        "pid": std::process::id(),
        "token": token,
        "counter": COUNTER.load(Ordering::SeqCst),
        "generation": coordinator.generation(),
        "instance": INSTANCE.load(Ordering::SeqCst),
        "tcp_kept": TCP_KEPT.load(Ordering::SeqCst),
        "tcp_closed": TCP_CLOSED.load(Ordering::SeqCst),
        "hooks": *HOOKS.lock().unwrap_or_else(|p| p.into_inner()),
    })
    .to_string()
}

/// A held connection: echoes lines until it ends, across checkpoints.
fn hold(stream: TcpStream, mut reader: BufReader<TcpStream>, log: &Path) {
    let _ = stream.set_read_timeout(None);
    let mut writer = &stream;
    loop {
        let mut line = String::new();
        let end = match reader.read_line(&mut line) {
            Ok(0) => "closed by the peer".to_owned(),
            Ok(_) => match writer.write_all(format!("echo:{}\n", line.trim_end()).as_bytes()) {
                Ok(()) => continue,
                Err(err) => format!("write failed: {err}"),
            },
            Err(err) => format!("read failed: {err}"),
        };
        append(log, &format!("held connection ended: {end}"));
        return;
    }
}

fn hang_of(spec: Option<&str>, name: &str) -> Option<Duration> {
    let (who, ms) = match spec?.split_once(':') {
        Some((who, ms)) => (who, ms.parse().expect("CRAC_TEST_HANG=name:MS")),
        None => (spec?, 60_000),
    };
    (who == name).then(|| Duration::from_millis(ms))
}

fn append(path: &Path, line: &str) {
    // One write of a short line to an O_APPEND file: lines from two processes never interleave.
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log is writable");
    file.write_all(format!("{line}\n").as_bytes())
        .expect("log is writable");
}

fn wait_for(path: &Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} did not appear", path.display());
}

/// `CRAC_TEST_ASYNC`: an async resource that misbehaves as `mode` says.
fn register_async(coordinator: &Coordinator, mode: String) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .expect("a tokio runtime");
    let shut_down = mode == "shutdown";
    coordinator
        .context()
        .register_async(
            runtime.handle().clone(),
            crac_core::from_async_fns(
                "async",
                move |_| {
                    let mode = mode.clone();
                    async move {
                        match mode.as_str() {
                            "panic" => panic!("async hook exploded"),
                            "pending" => std::future::pending().await,
                            _ => Ok(()),
                        }
                    }
                },
                |_| async { Ok(()) },
            ),
        )
        .keep();
    if shut_down {
        runtime.shutdown_background();
    } else {
        // The runtime serves the hooks for the life of the process.
        std::mem::forget(runtime);
    }
}

/// Takes the lock `KIND:PATH` (see `CRAC_TEST_LOCK`) and keeps its descriptor open for good.
fn hold_lock(lock: &str) {
    use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg};
    let (kind, path) = lock.split_once(':').expect("CRAC_TEST_LOCK is KIND:PATH");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("the lock's file opens");
    let whole = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    match kind {
        "flock" => {
            let locked = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| e)
                .expect("flock");
            std::mem::forget(locked);
            return;
        }
        "posix" => fcntl(&file, FcntlArg::F_SETLK(&whole)).expect("F_SETLK"),
        "ofd" => fcntl(&file, FcntlArg::F_OFD_SETLK(&whole)).expect("F_OFD_SETLK"),
        other => panic!("CRAC_TEST_LOCK: unknown kind {other}"),
    };
    std::mem::forget(file);
}
