//! `web-service`: an axum hello-world that drains for checkpoints, the example to copy for an
//! HTTP service whose clients keep their connections open.
//!
//! ```text
//! GET /   -> pid=N generation=N
//! ```
//!
//! It serves through [`crac_core::serve::serve`] rather than `axum::serve`, and gates its
//! requests with [`CheckpointGateLayer::close_connections`]: during a checkpoint it accepts
//! nothing (new clients wait in the listen queue), answers with `Connection: close`, and closes
//! idle keep-alive connections, so a plain `crac checkpoint` (killing or `--leave-running`)
//! finds no client connection to refuse and needs no `--tcp-established`.
//!
//! ```text
//! setsid web-service --port 7090 </dev/null >>web.log 2>&1 &
//! crac checkpoint PID --name web --leave-running
//! ```
//!
//! `--plain` serves with `axum::serve` and the plain gate instead (no draining): what a
//! service looks like before it adopts draining, kept for comparison (its keep-alive clients
//! make a plain `crac checkpoint` refuse).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use axum::routing::get;
use axum::Router;
use crac_core::tower::CheckpointGateLayer;
use crac_core::Coordinator;

const DEFAULT_PORT: u16 = 7090;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("web-service: error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn hello() -> String {
    let generation = Coordinator::global().generation();
    format!("pid={} generation={generation}", std::process::id())
}

async fn run() -> Result<(), String> {
    let (port, plain) = options()?;
    let _agent =
        crac_agent::start().map_err(|err| format!("cannot start the CRaC agent: {err}"))?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .map_err(|err| format!("cannot listen on 127.0.0.1:{port}: {err}"))?;
    eprintln!("web-service: listening on 127.0.0.1:{port}");
    let app = Router::new().route("/", get(hello));
    if plain {
        let app = app.layer(CheckpointGateLayer::new());
        axum::serve(listener, app)
            .await
            .map_err(|err| format!("serving failed: {err}"))
    } else {
        let app = app.layer(CheckpointGateLayer::new().close_connections());
        match crac_core::serve::serve(listener, app).await {}
    }
}

fn options() -> Result<(u16, bool), String> {
    let (mut port, mut plain) = (None, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next(),
            "--plain" => plain = true,
            other => {
                return Err(format!(
                    "unknown argument {other:?} (usage: web-service [--port PORT] [--plain])"
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
    Ok((port, plain))
}
