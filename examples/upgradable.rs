//! An HTTP service that `crac upgrade` replaces with a new version without refusing a client:
//! the README's upgrade walkthrough and `scripts/upgrade-demo.sh`.
//!
//! Every answer names the version (`APP_VERSION`, default `v1`) and counts the requests the
//! service has answered across its versions: `v1 hits=41 pid=4242`. When it is told to
//! retire (its successor is ready), it flushes the count to `STATE_FILE`, stops accepting (the
//! connections waiting in the listening socket's queue, which the successor shares, are the
//! successor's), and shuts down gracefully (requests in flight finish, idle keep-alive
//! connections are closed); the next version reads the count back, when it starts and
//! whenever the file changes. At level state (same executable), the count is simply kept in
//! memory and the new `APP_VERSION` arrives through `RestoreInfo::env`.
//!
//! ```text
//! PORT=7090 upgradable &                               # its count in ./upgradable.state
//! crac upgrade $! --env APP_VERSION=v2 -- ./upgradable-v2   # another build: handoff
//! crac upgrade $PID --env APP_VERSION=v3 -- ./upgradable-v2 # the same one, as root: state
//! ```
//!
//! `CRASH` makes a version fail, for rollback demos and tests: `start` (exits at start),
//! `never-ready` (never says READY=1), `after-ready` (exits right after READY=1);
//! `RETIRE=ignore` makes one that never goes when told to retire (crac's drain timeout).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use crac_core::tower::CheckpointGateLayer;
use crac_core::{from_fns, global_context, Coordinator};
use tokio::signal::unix::SignalKind;

#[derive(Debug)]
struct App {
    version: Mutex<String>,
    /// Requests answered by this process.
    own: AtomicU64,
    /// Requests answered by the versions before, as the last of them flushed it, and when it
    /// was flushed: re-read when the file changes (the old version flushes when it retires,
    /// after this one has started).
    before: Mutex<(u64, Option<std::time::SystemTime>)>,
    state_file: std::path::PathBuf,
}

impl App {
    /// The requests answered by every version so far.
    fn hits(&self) -> u64 {
        let changed = std::fs::metadata(&self.state_file)
            .and_then(|m| m.modified())
            .ok();
        let mut before = self.before.lock().unwrap();
        if changed.is_some() && changed != before.1 {
            let flushed = std::fs::read_to_string(&self.state_file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            *before = (flushed.unwrap_or(before.0), changed);
        }
        before.0 + self.own.load(Ordering::SeqCst)
    }

    /// Writes the count for the next version.
    fn flush(&self) {
        let hits = self.hits();
        let mut before = self.before.lock().unwrap();
        let _ = std::fs::write(&self.state_file, hits.to_string());
        // Its own write is not a predecessor's count.
        before.1 = std::fs::metadata(&self.state_file)
            .and_then(|m| m.modified())
            .ok();
    }
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn main() -> Result<(), String> {
    let version = env("APP_VERSION", "v1");
    let crash = env("CRASH", "");
    if crash == "start" {
        eprintln!("upgradable {version}: CRASH=start: giving up before listening");
        std::process::exit(2);
    }
    let port: u16 = env("PORT", "7090")
        .parse()
        .map_err(|e| format!("PORT: {e}"))?;
    let state_file = std::path::PathBuf::from(env("STATE_FILE", "upgradable.state"));
    let app = Arc::new(App {
        version: Mutex::new(version.clone()),
        own: AtomicU64::new(0),
        before: Mutex::new((0, None)),
        state_file,
    });
    // What the previous version flushed when it retired.
    let hits = app.hits();

    // A restore with new settings (crac upgrade --level state) changes the version in place.
    let restored = Arc::clone(&app);
    global_context()
        .register(from_fns(
            "version",
            |_| Ok(()),
            move |info| {
                if let Some(version) = info.var("APP_VERSION") {
                    *restored.version.lock().unwrap() = version.to_owned();
                }
                Ok(())
            },
        ))
        .keep();
    // The retire phase: flush what the successor reads.
    let flushed = Arc::clone(&app);
    Coordinator::global().on_retire("hits", move || flushed.flush());
    let _agent = crac_agent::start().map_err(|e| e.to_string())?;

    // The listener crac upgrade passed (LISTEN_FDS), or a fresh one; shared for the next.
    let listener =
        crac_agent::upgrade::tcp_listener("http", SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|e| format!("cannot listen on port {port}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| e.to_string())?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let router = Router::new()
            .route("/", get(answer))
            .with_state(Arc::clone(&app))
            .layer(CheckpointGateLayer::new());
        eprintln!(
            "upgradable {version}: pid {} serving on 127.0.0.1:{port} from hits={hits}",
            std::process::id()
        );
        if crash != "never-ready" {
            crac_agent::upgrade::notify_ready().map_err(|e| format!("READY=1: {e}"))?;
        }
        if crash == "after-ready" {
            eprintln!("upgradable {version}: CRASH=after-ready: exiting after READY=1");
            std::process::exit(3);
        }
        let (retire, retired) = tokio::sync::watch::channel(false);
        let retire = Arc::new(retire);
        // SIGTERM, the ordinary stop (a restart, or crac upgrade rolling back a version that
        // served but never said READY=1): the same graceful end, but nothing is flushed.
        let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())
            .map_err(|e| format!("SIGTERM: {e}"))?;
        let stop = Arc::clone(&retire);
        tokio::spawn(async move {
            terminate.recv().await;
            let _ = stop.send(true);
        });
        // RETIRE=ignore: a version that never goes when told to retire.
        if env("RETIRE", "") != "ignore" {
            tokio::task::spawn_blocking(move || {
                Coordinator::global().wait_retired(None);
                let _ = retire.send(true);
            });
        }
        let mut shutdown = retired.clone();
        let listener = UntilRetired { listener, retired };
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                retirement(&mut shutdown).await;
                // A client that connected just before may not have sent its request yet: the
                // graceful shutdown would take its connection for an idle one and close it.
                tokio::time::sleep(GRACE).await;
            })
            .await
            .map_err(|e| e.to_string())?;
        // Again once the requests in flight have finished: they count too. Only for a
        // successor: a version stopped by SIGTERM leaves the count to the one that serves on.
        let retiring = Coordinator::global().is_retiring();
        if retiring {
            app.flush();
        }
        eprintln!(
            "upgradable {}: {} after hits={}",
            app.version.lock().unwrap(),
            if retiring {
                "retired"
            } else {
                "stopped (SIGTERM)"
            },
            app.hits()
        );
        Ok(())
    });
    // Not waiting for the blocking task that waits for retirement, which a SIGTERM never ends.
    runtime.shutdown_background();
    served
}

/// How long a retiring service keeps serving the connections it has before it closes the idle
/// ones (and finishes the others).
const GRACE: Duration = Duration::from_millis(250);

/// The listener as axum accepts from it until the service retires; from then on it accepts
/// nothing: the connections waiting in the shared queue are the successor's.
#[derive(Debug)]
struct UntilRetired {
    listener: tokio::net::TcpListener,
    retired: tokio::sync::watch::Receiver<bool>,
}

impl axum::serve::Listener for UntilRetired {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => return accepted,
                    // Out of descriptors, or a connection reset before it was taken.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                () = retirement(&mut self.retired) => break,
            }
        }
        std::future::pending().await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Until the service retires.
async fn retirement(retired: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = retired.wait_for(|retired| *retired).await.map(drop);
}

async fn answer(State(app): State<Arc<App>>) -> String {
    app.own.fetch_add(1, Ordering::SeqCst);
    let hits = app.hits();
    format!(
        "{} hits={hits} pid={}\n",
        app.version.lock().unwrap(),
        std::process::id()
    )
}
