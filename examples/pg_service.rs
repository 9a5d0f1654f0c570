//! `pg-service`: an axum service backed by PostgreSQL that survives a checkpoint and restore,
//! the example to copy for an async service.
//!
//! # What it does
//!
//! HTTP/1.1 on `127.0.0.1:PORT`:
//!
//! ```text
//! POST /notes   (body: text)  -> {"id":N,"instance":"..."}   writes a row
//! GET  /notes                 -> [{"id":N,"body":"...","instance":"..."},...]
//! GET  /instance              -> {"instance":"...","pid":N,"generation":N,"last_restore":"restored"|null}
//! ```
//!
//! `instance` is a random id made at start and renewed whenever the process is restored from
//! an image: every copy restored from one image would otherwise share it.
//!
//! # How it is made ready for checkpoints (the part to copy)
//!
//! - The pool is [sqlx]'s `PgPool`, chosen over deadpool-postgres because `PgPool::close()`
//!   resolves only once every connection is closed: its sockets are shut inside the hook.
//!   With tokio-postgres (under deadpool-postgres) each connection's socket belongs to a
//!   background task that ends some time after the client is dropped, so a hook would have
//!   to build connections by hand and join those tasks, or CRIU would find a connected TCP
//!   socket and refuse the dump.
//! - `postgres-pool`, an async resource at [`Priority::Infrastructure`] (down last, up
//!   first): `before_checkpoint` closes the pool and waits until PostgreSQL's connections are
//!   gone; `after_restore` opens a new pool (whatever the reason: the old one is closed) and
//!   checks it with `SELECT 1`, so requests find a working pool.
//! - `instance-id`, a sync resource: renews the id after `restored`.
//! - [`CheckpointGateLayer`]: every request is a critical section. A checkpoint waits for the
//!   requests in flight, and requests that come in during a checkpoint wait, without blocking
//!   a worker, until every `after_restore` (the reconnect included) has finished. None fails.
//! - The listener stays open across the checkpoint: a restored service answers on its port at
//!   once, and connections that arrived while it was dumped are served after the restore.
//! - `tracing`: crac-core's `crac.cycle` and `crac.hook` spans and the service's own events go
//!   to stderr, one line each.
//!
//! # Running it
//!
//! ```text
//! scripts/postgres.sh start /tmp/pg 55432        # a throwaway cluster, prints its URL
//! setsid pg-service --port 7080 --database postgres://postgres@127.0.0.1:55432/postgres \
//!     </dev/null >>service.log 2>&1 &
//! crac checkpoint PID --name pg && crac restore pg --detach
//! scripts/postgres.sh stop /tmp/pg
//! ```
//!
//! `scripts/pg-demo.sh` does all of it and shows each step. Options: `--port PORT` (default
//! `$PG_SERVICE_PORT`, then 7080), `--database URL` (default `$DATABASE_URL`).

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use crac_core::tower::CheckpointGateLayer;
use crac_core::{
    from_fns, global_context, AsyncResource, BoxFuture, CheckpointInfo, Coordinator, HookError,
    Priority, RestoreInfo, RestoreReason,
};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

const DEFAULT_PORT: u16 = 7080;
/// What PostgreSQL shows in `pg_stat_activity.application_name` for this service.
const APPLICATION_NAME: &str = "crac-pg-service";

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let (port, url) = options()?;
    let connect: PgConnectOptions = url
        .parse::<PgConnectOptions>()
        .map_err(|err| format!("--database {url:?} is not a PostgreSQL URL: {err}"))?
        .application_name(APPLICATION_NAME);
    let db = Arc::new(Database {
        pool: RwLock::new(open_pool(&connect).await.map_err(|err| {
            format!("cannot connect to PostgreSQL at {url}: {err} (is it running?)")
        })?),
        connect,
    });
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS notes \
         (id bigserial PRIMARY KEY, body text NOT NULL, instance text NOT NULL)",
    )
    .execute(&db.pool())
    .await
    .map_err(|err| format!("cannot create the notes table: {err}"))?;
    let instance = Arc::new(RwLock::new(new_instance_id()));

    // Infrastructure: closed after the application's resources, reopened before them.
    global_context()
        .register_async_with(
            Priority::Infrastructure,
            tokio::runtime::Handle::current(),
            PoolResource(Arc::clone(&db)),
        )
        .keep();
    let id = Arc::clone(&instance);
    global_context()
        .register(from_fns(
            "instance-id",
            |_| Ok(()),
            move |info| {
                if info.reason == RestoreReason::Restored {
                    let renewed = new_instance_id();
                    tracing::info!(instance = %renewed, "restored: instance id renewed");
                    *id.write().unwrap_or_else(|p| p.into_inner()) = renewed;
                }
                Ok(())
            },
        ))
        .keep();
    let _agent =
        crac_agent::start().map_err(|err| format!("cannot start the CRaC agent: {err}"))?;

    let app = Router::new()
        .route("/notes", get(list_notes).post(add_note))
        .route("/instance", get(show_instance))
        .with_state(App { db, instance })
        .layer(CheckpointGateLayer::new());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .map_err(|err| format!("cannot listen on 127.0.0.1:{port}: {err}"))?;
    tracing::info!(
        pid = std::process::id(),
        "pg-service: listening on 127.0.0.1:{port}"
    );
    axum::serve(listener, app)
        .await
        .map_err(|err| format!("serving failed: {err}"))
}

fn options() -> Result<(u16, String), String> {
    let mut port = std::env::var("PG_SERVICE_PORT").ok();
    let mut url = std::env::var("DATABASE_URL").ok();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next(),
            "--database" => url = args.next(),
            other => {
                return Err(format!(
                    "unknown argument {other:?} (usage: pg-service [--port PORT] [--database URL])"
                ))
            }
        }
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse()
            .map_err(|_| format!("--port {p:?} is not a port number"))?,
    };
    let url = url.ok_or("no database: pass --database URL or set DATABASE_URL")?;
    Ok((port, url))
}

/// The pool, replaced by a new one after each checkpoint (a closed `PgPool` stays closed).
struct Database {
    connect: PgConnectOptions,
    pool: RwLock<PgPool>,
}

impl Database {
    fn pool(&self) -> PgPool {
        self.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn open_pool(connect: &PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(connect.clone())
        .await
}

/// Closes every connection before a checkpoint, opens a new pool after.
struct PoolResource(Arc<Database>);

impl AsyncResource for PoolResource {
    fn name(&self) -> Cow<'_, str> {
        "postgres-pool".into()
    }

    fn before_checkpoint<'a>(
        &'a self,
        _: &'a CheckpointInfo,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async move {
            let pool = self.0.pool();
            let open = pool.size();
            // Resolves once every connection is closed (requests are gated, so none is in
            // use): no socket to PostgreSQL is left for CRIU to find.
            pool.close().await;
            tracing::info!(closed = open, "postgres pool closed");
            Ok(())
        })
    }

    fn after_restore<'a>(&'a self, info: &'a RestoreInfo) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async move {
            let pool = open_pool(&self.0.connect).await?;
            sqlx::query("SELECT 1").execute(&pool).await?;
            *self.0.pool.write().unwrap_or_else(|p| p.into_inner()) = pool;
            tracing::info!(reason = %info.reason, "postgres pool reopened");
            Ok(())
        })
    }
}

#[derive(Clone)]
struct App {
    db: Arc<Database>,
    instance: Arc<RwLock<String>>,
}

impl App {
    fn instance(&self) -> String {
        self.instance
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

type Reply = Result<Json<Value>, (StatusCode, String)>;

fn unavailable(err: sqlx::Error) -> (StatusCode, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("database unavailable: {err}\n"),
    )
}

async fn add_note(State(app): State<App>, body: String) -> Reply {
    let instance = app.instance();
    let row = sqlx::query("INSERT INTO notes (body, instance) VALUES ($1, $2) RETURNING id")
        .bind(&body)
        .bind(&instance)
        .fetch_one(&app.db.pool())
        .await
        .map_err(unavailable)?;
    let id: i64 = row.get(0);
    tracing::info!(id, "note written");
    Ok(Json(json!({ "id": id, "instance": instance })))
}

async fn list_notes(State(app): State<App>) -> Reply {
    let rows = sqlx::query("SELECT id, body, instance FROM notes ORDER BY id")
        .fetch_all(&app.db.pool())
        .await
        .map_err(unavailable)?;
    let notes: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "id": row.get::<i64, _>(0),
                "body": row.get::<String, _>(1),
                "instance": row.get::<String, _>(2),
            })
        })
        .collect();
    Ok(Json(Value::Array(notes)))
}

async fn show_instance(State(app): State<App>) -> Json<Value> {
    let coordinator = Coordinator::global();
    Json(json!({
        "instance": app.instance(),
        "pid": std::process::id(),
        "generation": coordinator.generation(),
        "last_restore": coordinator.last_restore().map(|r| r.reason.as_str()),
    }))
}

/// 16 random hex digits from the kernel.
fn new_instance_id() -> String {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("reading /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
