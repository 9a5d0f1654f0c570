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
//! SESSION\n  ->  OK session\n   and the connection stays open: one reply per request line,
//!                               for as long as the client keeps it (see below)
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
//! not expect the connection to come back from the dead (a database closes it). The state
//! that matters here, a warm cache, is plain memory, which CRIU saves as it is; the listening
//! socket is kept too, so a restored server answers on its port at once. The server registers
//! two resources in the global context:
//!
//! | resource | priority | before_checkpoint | after_restore |
//! |---|---|---|---|
//! | `upstream-connection` | [`Priority::Infrastructure`] | closes the connection | reconnects (bounded retry) |
//! | `cache` | [`Priority::Application`] | keeps every entry (logs the size) | finds them all still there |
//!
//! Infrastructure goes down last and comes up first, so the cache can rely on upstream in
//! both of its hooks: the checkpoint runs `cache`, then `upstream-connection`; the restore
//! runs them the other way round. Every hook writes one line to stderr
//! (`cache-server: before_checkpoint upstream-connection: closed ...`) so the order is
//! visible. When CRIU freezes the process it holds its listener and no connection, and the
//! dump needs no extra flag.
//!
//! The listener needs no hooks ([`GatedListener`], shared with the `warm-start` example): its
//! accept loop takes a [critical section](crac_core::critical_section) before each accept and
//! serves the request inside it. A checkpoint waits for the request in progress; while it is
//! taken nothing is accepted, and clients that connect wait in the listener's queue, to be
//! served once every `after_restore` hook has returned (the reconnect included). Each
//! connection is closed after its reply, so that none is open when CRIU freezes the process.
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
//! Options: `--port PORT` (default `$CACHE_SERVER_PORT`, then 7070), `--address IP` (where to
//! listen, default 127.0.0.1: a service address that moves with it in a migration),
//! `--upstream HOST:PORT` (default `$CACHE_SERVER_UPSTREAM`, then `127.0.0.1:7071`), and for
//! benchmarks `--ballast MIB` (that much memory, touched) and `--dirty` (a thread writes to
//! every page of it once a second, as a busy service changes its memory).
//!
//! # Sessions
//!
//! `SESSION` keeps a client's connection open, served on a thread of its own, each request
//! inside a critical section. Such a connection is open whenever CRIU may freeze the server,
//! so a checkpoint of a server with a session needs `--tcp-established` (CRIU then dumps the
//! connection and a restore with the same addresses brings it back: what `crac migrate` does
//! when the server's address moves with it).
//!
//! # Configuration after a restore
//!
//! A restored process keeps the environment it started with. The upstream address can change
//! anyway: `crac restore NAME --env CACHE_SERVER_UPSTREAM=HOST:PORT` (or `crac run` with a new
//! `CACHE_SERVER_UPSTREAM` in its own environment) hands it to the restored server, whose
//! `upstream-connection` hook reads it from [`RestoreInfo::env`] and reconnects there.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crac_core::{
    from_fns, global_context, CheckpointInfo, Coordinator, HookError, Priority, Resource,
    RestoreInfo,
};
use crac_examples::listener::GatedListener;
use crac_examples::{lock, Log};

const DEFAULT_PORT: u16 = 7070;
const DEFAULT_UPSTREAM: &str = "127.0.0.1:7071";
/// Where upstream is, at start and (as a restore's setting) after a restore.
const UPSTREAM_ENV: &str = "CACHE_SERVER_UPSTREAM";

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
/// Signs the log lines: one per hook, in the order they run:
/// `cache-server: before_checkpoint cache: ...`.
const LOG: Log = Log::new("cache-server");

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
    let listener = GatedListener::bind(SocketAddr::from((config.address, config.port)), LOG)?;
    hold_ballast(config.ballast_mib, config.dirty);
    let local = listener.local_addr();

    let upstream = Arc::new(Upstream::new(config.upstream));
    upstream
        .connect_with_retry()
        .map_err(|err| format!("{err} (start `upstream` first, or pass --upstream HOST:PORT)"))?;
    let cache = Arc::new(Cache::default());

    // Infrastructure: goes down last, comes up first.
    global_context()
        .register_with(Priority::Infrastructure, Arc::clone(&upstream))
        .keep();
    global_context().register(cache_resource(&cache)).keep();

    let _agent =
        crac_agent::start().map_err(|err| format!("cannot start the CRaC agent: {err}"))?;

    let pid = std::process::id();
    eprintln!(
        "cache-server: pid {pid} serving GET/STATS on {local}, upstream {} (connection #{}); \
         checkpoint it with: criu dump -t {pid} -D IMAGES_DIR --skip-in-flight --action-script {}",
        upstream.addr(),
        upstream.connections(),
        action_script_hint()
    );

    let service = Arc::new(Service {
        cache,
        upstream,
        coordinator: Coordinator::global(),
    });
    // Serves connections one at a time, on this thread, for good (sessions on their own).
    listener.serve(|stream| service.handle(stream))
}

/// Holds `mib` MiB of memory for the rest of the process, every page touched; with `dirty`, a
/// thread writes to each page again once a second (a benchmark's busy service).
fn hold_ballast(mib: usize, dirty: bool) {
    const PAGE: usize = 4096;
    if mib == 0 {
        return;
    }
    let mut ballast = vec![0u8; mib << 20];
    for (n, page) in ballast.chunks_mut(PAGE).enumerate() {
        page[0] = n as u8 | 1;
    }
    thread::spawn(move || {
        let pages = ballast.len() / PAGE;
        let mut round: u8 = 0;
        loop {
            if !dirty {
                thread::park();
                continue;
            }
            round = round.wrapping_add(1);
            let started = Instant::now();
            // In 100 slices, each followed by a pause, so the writes spread over the second.
            for slice in 0..100 {
                for page in (slice * pages / 100)..((slice + 1) * pages / 100) {
                    ballast[page * PAGE] = round;
                }
                let due = started + Duration::from_millis(10 * (slice as u64 + 1));
                thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
    });
}

// --- Configuration --------------------------------------------------------------------------

struct Config {
    port: u16,
    address: Ipv4Addr,
    upstream: SocketAddr,
    ballast_mib: usize,
    dirty: bool,
}

impl Config {
    fn from_args() -> Result<Config, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut port = env("CACHE_SERVER_PORT");
        let mut upstream = env(UPSTREAM_ENV);
        let mut address = None;
        let mut ballast = None;
        let mut dirty = false;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| {
                args.next()
                    .ok_or_else(|| format!("{flag} needs a value (try --help)"))
            };
            match arg.as_str() {
                "--port" => port = Some(value("--port")?),
                "--upstream" => upstream = Some(value("--upstream")?),
                "--address" => address = Some(value("--address")?),
                "--ballast" => ballast = Some(value("--ballast")?),
                "--dirty" => dirty = true,
                "-h" | "--help" => {
                    println!(
                        "usage: cache-server [--port PORT] [--address IP] [--upstream HOST:PORT]\n  \
                         --port      where to serve (default $CACHE_SERVER_PORT, then {DEFAULT_PORT})\n  \
                         --address   the address to serve on (default 127.0.0.1)\n  \
                         --ballast   MiB of memory to hold, touched (default 0)\n  \
                         --dirty     write to every page of the ballast once a second\n  \
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
        let address = match address {
            None => Ipv4Addr::LOCALHOST,
            Some(raw) => raw
                .parse()
                .map_err(|_| format!("invalid --address {raw:?}: expected an IPv4 address"))?,
        };
        let upstream = resolve(&upstream.unwrap_or_else(|| DEFAULT_UPSTREAM.to_owned()))?;
        let ballast_mib = match ballast {
            None => 0,
            Some(raw) => raw
                .parse()
                .map_err(|_| format!("invalid --ballast {raw:?}: expected a number of MiB"))?,
        };
        Ok(Config {
            port,
            address,
            upstream,
            ballast_mib,
            dirty,
        })
    }
}

/// The first address `upstream` (HOST:PORT) resolves to.
fn resolve(upstream: &str) -> Result<SocketAddr, String> {
    upstream
        .to_socket_addrs()
        .map_err(|err| format!("invalid upstream address {upstream:?}: {err}"))?
        .next()
        .ok_or_else(|| format!("upstream address {upstream:?} resolves to nothing"))
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
    /// Reads one request line, answers it and returns; the caller closes the connection,
    /// unless the request was `SESSION`: a copy of the connection then goes on, served by a
    /// thread of its own ([`Service::session`]).
    fn handle(self: &Arc<Self>, stream: &TcpStream) -> Result<(), String> {
        let mut session = false;
        crac_examples::answer_one_line(stream, CLIENT_TIMEOUT, MAX_REQUEST, |request| {
            if request == "SESSION" {
                session = true;
                "OK session".to_owned()
            } else {
                self.answer(request)
            }
        })?;
        if session {
            let stream = stream
                .try_clone()
                .map_err(|err| format!("cannot keep the session's connection: {err}"))?;
            let service = Arc::clone(self);
            thread::spawn(move || service.session(stream));
        }
        Ok(())
    }

    /// Answers each request line of a session's connection until the client closes it. Each
    /// is served inside a critical section; between requests the connection is simply open
    /// (a checkpoint needs `--tcp-established`).
    fn session(&self, stream: TcpStream) {
        let _ = stream.set_read_timeout(None);
        let mut writer = match stream.try_clone() {
            Ok(writer) => writer,
            Err(err) => {
                eprintln!("cache-server: session ended: {err}");
                return;
            }
        };
        let mut lines = BufReader::new(stream);
        loop {
            let mut line = String::new();
            match lines.by_ref().take(MAX_REQUEST).read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(err) => {
                    eprintln!("cache-server: session ended: {err}");
                    return;
                }
            }
            let _request = crac_core::critical_section();
            let reply = self.answer(line.trim_end_matches(['\r', '\n']));
            if let Err(err) = writer.write_all(format!("{reply}\n").as_bytes()) {
                eprintln!("cache-server: session ended: {err}");
                return;
            }
        }
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
            LOG.hook(
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
            LOG.hook(
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
    /// Where upstream is; a restore may move it (see `after_restore`).
    addr: Mutex<SocketAddr>,
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
            addr: Mutex::new(addr),
            conn: Mutex::new(None),
            connections: AtomicU64::new(0),
        }
    }

    fn addr(&self) -> SocketAddr {
        *lock(&self.addr)
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn is_connected(&self) -> bool {
        lock(&self.conn).is_some()
    }

    /// One connection attempt; on success the connection replaces any previous one.
    fn connect(&self) -> io::Result<u64> {
        let stream = TcpStream::connect_timeout(&self.addr(), UPSTREAM_TIMEOUT)?;
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
                        self.addr(),
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
                .map_err(|err| format!("cannot connect to {}: {err}", self.addr()))?;
            guard = lock(&self.conn);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(format!("no connection to {}", self.addr()));
        };
        let number = conn.number;
        let result = ask_upstream(conn, key);
        if result.is_err() {
            *guard = None;
        }
        result.map_err(|err| format!("connection #{number} to {}: {err}", self.addr()))
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
            Some(number) => format!("closed connection #{number} to {}", self.addr()),
            None => "no connection was open".to_owned(),
        };
        LOG.hook(
            "before_checkpoint",
            "upstream-connection",
            format_args!("{what}"),
        );
        Ok(())
    }

    /// Whatever the reason (restored, resumed, aborted), the connection was closed: reopen it,
    /// at the address the restore says if it says one (`crac restore --env
    /// CACHE_SERVER_UPSTREAM=HOST:PORT`, or `crac run` under a new `CACHE_SERVER_UPSTREAM`):
    /// a copy restored elsewhere talks to the upstream there.
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        let started = Instant::now();
        if let Some(moved) = info.var(UPSTREAM_ENV) {
            let addr = resolve(moved).map_err(|err| format!("{UPSTREAM_ENV}: {err}"))?;
            *lock(&self.addr) = addr;
            LOG.hook(
                "after_restore",
                "upstream-connection",
                format_args!("upstream is now {addr} (the restore's {UPSTREAM_ENV})"),
            );
        }
        let number = self.connect_with_retry().inspect_err(|err| {
            LOG.hook(
                "after_restore",
                "upstream-connection",
                format_args!("FAILED: {err}"),
            )
        })?;
        LOG.hook(
            "after_restore",
            "upstream-connection",
            format_args!(
                "reconnected to {} (connection #{number}) in {:.1} ms ({}, generation {})",
                self.addr(),
                started.elapsed().as_secs_f64() * 1000.0,
                info.reason,
                info.generation
            ),
        );
        Ok(())
    }
}
