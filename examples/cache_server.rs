//! `cache-server`: a small service with real state that survives a CRIU checkpoint/restore,
//! warm, thanks to crac-rs.
//!
//! # What it does
//!
//! It answers a one-line protocol on `127.0.0.1:PORT`, one request per connection:
//!
//! ```text
//! GET key\n  ->  value\n        from the in-memory cache (a hit), or, on a miss, through its one
//!                               persistent connection to the `upstream` "database" (slow)
//! STATS\n    ->  {"pid":..,"entries":..,"hits":..,"misses":..,"upstream_connection":..,
//!                 "upstream_connected":..,"generation":..,"last_restore":..}\n
//! ```
//!
//! `upstream_connection` counts how many times the server connected to upstream, `generation`
//! is [`Coordinator::generation`] (completed checkpoints) and `last_restore` the reason of the
//! last [`Resource::after_restore`] that brought it back (`restored`, `resumed`) or `null`.
//!
//! # What it shows
//!
//! A process holding a TCP connection to another host cannot simply be dumped: CRIU refuses
//! established TCP connections unless told `--tcp-established`, and even then the peer would
//! not expect the connection to come back from the dead. The state that matters here, a warm
//! cache, is plain memory, which CRIU saves as it is. So the server registers three resources
//! in the global context:
//!
//! | resource | priority | before_checkpoint | after_restore |
//! |---|---|---|---|
//! | `upstream-connection` | [`Priority::Infrastructure`] | closes the connection | reconnects (bounded retry) |
//! | `cache` | [`Priority::Application`] | keeps every entry (logs the size) | finds them all still there |
//! | `listener` | [`Priority::Application`], registered last | stops accepting, closes the listening socket | listens again |
//!
//! Infrastructure goes down last and comes up first, so the cache and the listener can rely on
//! upstream in both of their hooks: the checkpoint runs `listener`, `cache`,
//! `upstream-connection`; the restore runs them the other way round. Every hook writes one
//! line to stderr (`cache-server: before_checkpoint upstream-connection: closed ...`) so the
//! order is visible. When CRIU freezes the process there is no TCP connection in it at all,
//! and the dump needs no extra flag.
//!
//! Each request runs inside a [critical section](crac_core::critical_section): a checkpoint
//! waits for the request in progress to finish, and after a restore no request is served
//! before every `after_restore` hook has returned (the reconnect included). A connection that
//! comes in while a checkpoint is starting is answered `ERR checkpoint in progress` at once
//! rather than held open: an open client connection would make the dump fail. Each connection
//! is closed after its reply, for the same reason.
//!
//! # Running it
//!
//! ```text
//! upstream 7071 &
//! setsid cache-server --port 7070 --upstream 127.0.0.1:7071 </dev/null >server.log 2>&1 &
//! criu dump -t PID -D IMAGES --action-script "$PWD/target/debug/crac-action"
//! criu restore -d -D IMAGES --action-script "$PWD/target/debug/crac-action"
//! ```
//!
//! `scripts/demo.sh` runs the whole cycle and shows each step. The process must be a session
//! leader with no terminal on its stdio (hence `setsid` and the redirections) for CRIU to dump
//! it without `--shell-job`.
//!
//! Options: `--port PORT` (default `$CACHE_SERVER_PORT`, then 7070) and `--upstream HOST:PORT`
//! (default `$CACHE_SERVER_UPSTREAM`, then `127.0.0.1:7071`).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crac_core::{
    from_fns, global_context, CheckpointInfo, Coordinator, HookError, Priority, Resource,
    RestoreInfo,
};

const DEFAULT_PORT: u16 = 7070;
const DEFAULT_UPSTREAM: &str = "127.0.0.1:7071";

/// How long a client may take to send its request and read the reply. A request holds
/// checkpoints off (it runs in a critical section), so this bounds how long a slow client can
/// delay one.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long one upstream request (or connection attempt) may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection attempts to upstream, at startup and after a restore, and the pause between them.
const CONNECT_ATTEMPTS: u32 = 50;
const CONNECT_PAUSE: Duration = Duration::from_millis(100);
/// How long the listener's before_checkpoint waits for the accept loop to close the socket.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cache-server: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let config = Config::from_args()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, config.port)).map_err(|err| {
        format!(
            "cannot listen on 127.0.0.1:{}: {err} (is another process using the port?)",
            config.port
        )
    })?;
    let local = listener
        .local_addr()
        .map_err(|err| format!("cannot read the listening address: {err}"))?;

    let upstream = Arc::new(Upstream::new(config.upstream));
    upstream
        .connect_with_retry()
        .map_err(|err| format!("{err} (start `upstream` first, or pass --upstream HOST:PORT)"))?;
    let cache = Arc::new(Cache::default());
    let control = Arc::new(ListenerControl::new(local));

    // Infrastructure: goes down last, comes up first.
    global_context()
        .register_with(Priority::Infrastructure, Arc::clone(&upstream))
        .keep();
    // Application resources, in registration order: cache, then listener. The listener is
    // registered last so it stops accepting first and starts again last.
    global_context().register(cache_resource(&cache)).keep();
    global_context()
        .register(ListenerResource(Arc::clone(&control)))
        .keep();

    let _agent =
        crac_agent::start().map_err(|err| format!("cannot start the CRaC agent: {err}"))?;

    let pid = std::process::id();
    eprintln!(
        "cache-server: pid {pid} serving GET/STATS on {local}, upstream {} (connection #{}); \
         checkpoint it with: criu dump -t {pid} -D IMAGES_DIR --action-script {}",
        upstream.addr,
        upstream.connections(),
        action_script_hint()
    );

    let service = Service {
        cache,
        upstream,
        coordinator: Coordinator::global(),
    };
    accept_loop(listener, &control, &service)
}

/// Accepts and serves connections one at a time, on this thread, until the listener cannot be
/// reopened after a checkpoint.
fn accept_loop(
    mut listener: TcpListener,
    control: &ListenerControl,
    service: &Service,
) -> Result<(), String> {
    loop {
        // A checkpoint asked the loop to let go of the listening socket: close it, wait until
        // after_restore hands over a new one, then until every after_restore has finished.
        let (kept, reopened) = control.park_if_requested(listener)?;
        listener = kept;
        if reopened {
            drop(crac_core::critical_section());
            continue;
        }
        let (mut stream, _peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("cache-server: accept failed: {err}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // The wake-up connection of the listener's before_checkpoint, or a client that came in
        // just as a checkpoint started: answer at once and close, so nothing stays open.
        if control.pause_requested() {
            let _ = stream.write_all(b"ERR checkpoint in progress, try again\n");
            continue;
        }
        let Some(_request) = service.coordinator.try_critical_section(Duration::ZERO) else {
            let _ = stream.write_all(b"ERR checkpoint in progress, try again\n");
            continue;
        };
        if let Err(err) = service.handle(&stream) {
            eprintln!("cache-server: request failed: {err}");
        }
        // `stream` is closed here, still inside the critical section.
    }
}

// --- Configuration --------------------------------------------------------------------------

struct Config {
    port: u16,
    upstream: SocketAddr,
}

impl Config {
    fn from_args() -> Result<Config, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut port = env("CACHE_SERVER_PORT");
        let mut upstream = env("CACHE_SERVER_UPSTREAM");
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| {
                args.next()
                    .ok_or_else(|| format!("{flag} needs a value (try --help)"))
            };
            match arg.as_str() {
                "--port" => port = Some(value("--port")?),
                "--upstream" => upstream = Some(value("--upstream")?),
                "-h" | "--help" => {
                    println!(
                        "usage: cache-server [--port PORT] [--upstream HOST:PORT]\n  \
                         --port      where to serve (default $CACHE_SERVER_PORT, then {DEFAULT_PORT})\n  \
                         --upstream  the upstream server (default $CACHE_SERVER_UPSTREAM, then {DEFAULT_UPSTREAM})"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(raw) => raw
                .parse()
                .map_err(|_| format!("invalid port {raw:?}: expected a number from 0 to 65535"))?,
        };
        let upstream = upstream.unwrap_or_else(|| DEFAULT_UPSTREAM.to_owned());
        let upstream = upstream
            .to_socket_addrs()
            .map_err(|err| format!("invalid upstream address {upstream:?}: {err}"))?
            .next()
            .ok_or_else(|| format!("upstream address {upstream:?} resolves to nothing"))?;
        Ok(Config { port, upstream })
    }
}

/// The crac-action path to suggest: next to this binary when it was built in the same
/// workspace, else whatever is on PATH.
fn action_script_hint() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("crac-action")))
        .filter(|path| path.is_file())
        .map_or_else(
            || "\"$(command -v crac-action)\"".to_owned(),
            |path| path.display().to_string(),
        )
}

// --- Requests -------------------------------------------------------------------------------

struct Service {
    cache: Arc<Cache>,
    upstream: Arc<Upstream>,
    coordinator: &'static Coordinator,
}

impl Service {
    /// Reads one request line, answers it and returns; the caller closes the connection.
    fn handle(&self, stream: &TcpStream) -> Result<(), String> {
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
            .map_err(|err| format!("cannot set client timeouts: {err}"))?;
        let mut line = String::new();
        BufReader::new(stream.take(MAX_REQUEST))
            .read_line(&mut line)
            .map_err(|err| format!("cannot read the request: {err}"))?;
        let reply = self.answer(line.trim_end_matches(['\r', '\n']));
        let mut writer = stream;
        writer
            .write_all(format!("{reply}\n").as_bytes())
            .map_err(|err| format!("cannot send the reply: {err}"))
    }

    fn answer(&self, request: &str) -> String {
        match request.split_once(' ') {
            Some(("GET", key)) if !key.is_empty() && !key.contains(' ') => self.get(key),
            None if request == "STATS" => self.stats(),
            _ => "ERR expected: GET key | STATS".to_owned(),
        }
    }

    fn get(&self, key: &str) -> String {
        if let Some(value) = self.cache.get(key) {
            return value;
        }
        match self.upstream.lookup(key) {
            Ok(value) => {
                self.cache.insert(key, &value);
                value
            }
            Err(err) => format!("ERR upstream: {err}"),
        }
    }

    fn stats(&self) -> String {
        let (entries, hits, misses) = self.cache.stats();
        serde_json::json!({
            "pid": std::process::id(),
            "entries": entries,
            "hits": hits,
            "misses": misses,
            "upstream_connection": self.upstream.connections(),
            "upstream_connected": self.upstream.is_connected(),
            "generation": self.coordinator.generation(),
            "last_restore": self.coordinator.last_restore().map(|info| info.reason.as_str()),
        })
        .to_string()
    }
}

// --- The cache ------------------------------------------------------------------------------

/// The warm state: plain memory, which CRIU saves and restores as it is.
#[derive(Default)]
struct Cache {
    entries: Mutex<HashMap<String, String>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Cache {
    fn get(&self, key: &str) -> Option<String> {
        let found = lock(&self.entries).get(key).cloned();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn insert(&self, key: &str, value: &str) {
        lock(&self.entries).insert(key.to_owned(), value.to_owned());
    }

    fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    fn stats(&self) -> (usize, u64, u64) {
        (
            self.len(),
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// The cache needs nothing done to survive a checkpoint: it is memory. Its hooks only log the
/// size, to show the entries are all still there afterwards.
fn cache_resource(cache: &Arc<Cache>) -> impl Resource {
    let before = Arc::clone(cache);
    let after = Arc::clone(cache);
    from_fns(
        "cache",
        move |_: &CheckpointInfo| {
            log_hook(
                "before_checkpoint",
                "cache",
                format_args!(
                    "keeping {} entries in memory (they go into the image)",
                    before.len()
                ),
            );
            Ok(())
        },
        move |info: &RestoreInfo| {
            log_hook(
                "after_restore",
                "cache",
                format_args!(
                    "{} entries still warm ({}, generation {})",
                    after.len(),
                    info.reason,
                    info.generation
                ),
            );
            Ok(())
        },
    )
}

// --- The upstream connection ----------------------------------------------------------------

/// The one persistent connection to upstream.
struct Upstream {
    addr: SocketAddr,
    conn: Mutex<Option<UpstreamConn>>,
    /// How many times a connection was established.
    connections: AtomicU64,
}

struct UpstreamConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    number: u64,
}

impl Upstream {
    fn new(addr: SocketAddr) -> Upstream {
        Upstream {
            addr,
            conn: Mutex::new(None),
            connections: AtomicU64::new(0),
        }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn is_connected(&self) -> bool {
        lock(&self.conn).is_some()
    }

    /// One connection attempt; on success the connection replaces any previous one.
    fn connect(&self) -> io::Result<u64> {
        let stream = TcpStream::connect_timeout(&self.addr, UPSTREAM_TIMEOUT)?;
        stream.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
        stream.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let number = self.connections.fetch_add(1, Ordering::SeqCst) + 1;
        *lock(&self.conn) = Some(UpstreamConn {
            reader: BufReader::new(stream),
            writer,
            number,
        });
        Ok(number)
    }

    /// Connects, retrying for a while: upstream may be starting, or restarting.
    fn connect_with_retry(&self) -> Result<u64, String> {
        let mut attempt = 1;
        loop {
            match self.connect() {
                Ok(number) => return Ok(number),
                Err(err) if attempt >= CONNECT_ATTEMPTS => {
                    return Err(format!(
                        "cannot connect to upstream at {} ({attempt} attempts over {:.1} s): {err}",
                        self.addr,
                        (CONNECT_PAUSE * (attempt - 1)).as_secs_f64()
                    ))
                }
                Err(_) => {
                    attempt += 1;
                    thread::sleep(CONNECT_PAUSE);
                }
            }
        }
    }

    /// Closes the connection, if any; returns its number.
    fn disconnect(&self) -> Option<u64> {
        let conn = lock(&self.conn).take()?;
        // Dropping both halves closes the socket; shutdown says so to upstream right away.
        let _ = conn.writer.shutdown(std::net::Shutdown::Both);
        Some(conn.number)
    }

    /// Asks upstream for `key` over the persistent connection (connecting first if it is
    /// down). A connection that failed is dropped, to be reopened by the next lookup.
    fn lookup(&self, key: &str) -> Result<String, String> {
        let mut guard = lock(&self.conn);
        if guard.is_none() {
            drop(guard);
            self.connect()
                .map_err(|err| format!("cannot connect to {}: {err}", self.addr))?;
            guard = lock(&self.conn);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(format!("no connection to {}", self.addr));
        };
        let number = conn.number;
        let result = ask_upstream(conn, key);
        if result.is_err() {
            *guard = None;
        }
        result.map_err(|err| format!("connection #{number} to {}: {err}", self.addr))
    }
}

fn ask_upstream(conn: &mut UpstreamConn, key: &str) -> Result<String, String> {
    conn.writer
        .write_all(format!("GET {key}\n").as_bytes())
        .map_err(|err| format!("send failed: {err}"))?;
    let mut line = String::new();
    match conn.reader.read_line(&mut line) {
        Ok(0) => Err("closed by upstream".to_owned()),
        Ok(_) => Ok(line.trim_end().to_owned()),
        Err(err) => Err(format!("no reply: {err}")),
    }
}

impl Resource for Upstream {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        "upstream-connection".into()
    }

    /// A TCP connection cannot go into the image: close it.
    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        let what = match self.disconnect() {
            Some(number) => format!("closed connection #{number} to {}", self.addr),
            None => "no connection was open".to_owned(),
        };
        log_hook(
            "before_checkpoint",
            "upstream-connection",
            format_args!("{what}"),
        );
        Ok(())
    }

    /// Whatever the reason (restored, resumed, aborted), the connection was closed: reopen it.
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        let started = Instant::now();
        let number = self.connect_with_retry().inspect_err(|err| {
            log_hook(
                "after_restore",
                "upstream-connection",
                format_args!("FAILED: {err}"),
            )
        })?;
        log_hook(
            "after_restore",
            "upstream-connection",
            format_args!(
                "reconnected to {} (connection #{number}) in {:.1} ms ({}, generation {})",
                self.addr,
                started.elapsed().as_secs_f64() * 1000.0,
                info.reason,
                info.generation
            ),
        );
        Ok(())
    }
}

// --- The listener ---------------------------------------------------------------------------

/// Lets the listener's hooks take the listening socket away from the accept loop and give a
/// new one back.
struct ListenerControl {
    addr: SocketAddr,
    state: Mutex<ListenState>,
    changed: Condvar,
}

#[derive(Default)]
struct ListenState {
    /// before_checkpoint wants the socket closed.
    pause_requested: bool,
    /// The accept loop has closed it and waits.
    closed: bool,
    /// after_restore's new socket (or why there is none), for the waiting accept loop.
    reopened: Option<Result<TcpListener, String>>,
}

impl ListenerControl {
    fn new(addr: SocketAddr) -> ListenerControl {
        ListenerControl {
            addr,
            state: Mutex::new(ListenState::default()),
            changed: Condvar::new(),
        }
    }

    fn pause_requested(&self) -> bool {
        lock(&self.state).pause_requested
    }

    /// If a pause was requested: closes `listener`, tells before_checkpoint, waits for
    /// after_restore's new socket and returns it with `true`. Otherwise returns `listener` with
    /// `false`. Deciding under the lock means a pause request and its cancellation are never
    /// half-seen.
    fn park_if_requested(&self, listener: TcpListener) -> Result<(TcpListener, bool), String> {
        let mut state = lock(&self.state);
        if !state.pause_requested {
            return Ok((listener, false));
        }
        drop(listener);
        state.closed = true;
        self.changed.notify_all();
        loop {
            if let Some(reopened) = state.reopened.take() {
                state.closed = false;
                state.pause_requested = false;
                return reopened.map(|listener| (listener, true));
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

struct ListenerResource(Arc<ListenerControl>);

impl Resource for ListenerResource {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        "listener".into()
    }

    /// Asks the accept loop to close the listening socket, wakes it from `accept` with a
    /// connection of its own, and waits (bounded) until the socket is closed.
    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        let control = &self.0;
        lock(&control.state).pause_requested = true;
        // The accept loop answers and closes this connection before it closes the listener.
        let wake = TcpStream::connect_timeout(&control.addr, PAUSE_TIMEOUT);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut state = lock(&control.state);
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "the accept loop did not close {} within {} s",
                    control.addr,
                    PAUSE_TIMEOUT.as_secs()
                )
                .into());
            }
            state = control
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        drop(state);
        drop(wake);
        log_hook(
            "before_checkpoint",
            "listener",
            format_args!("stopped accepting, closed {}", control.addr),
        );
        Ok(())
    }

    /// Listens again on the same address, and hands the socket to the accept loop (which
    /// serves nothing until every after_restore hook has returned).
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        let control = &self.0;
        {
            let mut state = lock(&control.state);
            if !state.closed {
                // before_checkpoint gave up before the loop let go: just cancel the request.
                state.pause_requested = false;
                log_hook(
                    "after_restore",
                    "listener",
                    format_args!("{} was still open; accepting again", control.addr),
                );
                return Ok(());
            }
        }
        let result = bind_with_retry(control.addr);
        let outcome = match &result {
            Ok(_) => Ok(()),
            Err(err) => Err(err.clone()),
        };
        lock(&control.state).reopened = Some(result);
        control.changed.notify_all();
        match outcome {
            Ok(()) => {
                log_hook(
                    "after_restore",
                    "listener",
                    format_args!(
                        "listening again on {} ({}, generation {})",
                        control.addr, info.reason, info.generation
                    ),
                );
                Ok(())
            }
            Err(err) => {
                log_hook("after_restore", "listener", format_args!("FAILED: {err}"));
                Err(err.into())
            }
        }
    }
}

fn bind_with_retry(addr: SocketAddr) -> Result<TcpListener, String> {
    let mut attempt = 1;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(err) if attempt >= CONNECT_ATTEMPTS => {
                return Err(format!(
                    "cannot listen on {addr} again ({attempt} attempts): {err}; \
                     the server will exit"
                ))
            }
            Err(_) => {
                attempt += 1;
                thread::sleep(CONNECT_PAUSE);
            }
        }
    }
}

// --- Helpers --------------------------------------------------------------------------------

/// One line per hook, in the order they run: `cache-server: before_checkpoint cache: ...`.
fn log_hook(hook: &str, resource: &str, what: fmt::Arguments<'_>) {
    eprintln!("cache-server: {hook} {resource}: {what}");
}

/// Every update under these locks is a single assignment, so a poisoned lock holds consistent
/// data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
