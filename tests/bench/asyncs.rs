//! Item 7: async services. (a) Async dispatch: `Coordinator::simulate()` over 100 async
//! no-op resources on a tokio runtime against 100 sync ones, same coordinator settings, in
//! alternating rounds. (b) Request gating: an axum hello-world served with and without
//! `CheckpointGateLayer`, driven by keep-alive clients in alternating rounds; throughput ratio.
//! (c) Warm start of the PostgreSQL example (pg-service against a throwaway cluster of
//! scripts/postgres.sh): time to the first answer, cold start against `crac restore`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use crac_core::tower::CheckpointGateLayer;
use crac_core::{from_async_fns, from_fns, Coordinator, Registration};

use crate::line::free_port;
use crate::procs::{self, Proc, Res};
use crate::stats::{fmt_ratio, fmt_us, time, verdict, Report, Samples};
use crate::Ctx;

const RESOURCES: usize = 100;

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("7. Async services: async dispatch, request gating, PostgreSQL warm start");
    dispatch(ctx, report)?;
    gating(ctx, report)?;
    pg_warm_start(ctx, report)
}

/// (a) One cycle over RESOURCES async resources against RESOURCES sync ones.
fn dispatch(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let sync = Coordinator::new();
    let asyncs = Coordinator::new();
    let waiting = Coordinator::new();
    let _sync: Vec<Registration> = (0..RESOURCES)
        .map(|i| {
            sync.context()
                .register(from_fns(format!("r{i}"), |_| Ok(()), |_| Ok(())))
        })
        .collect();
    let _async: Vec<Registration> = (0..RESOURCES)
        .map(|i| {
            asyncs.context().register_async(
                runtime.handle().clone(),
                from_async_fns(format!("r{i}"), |_| async { Ok(()) }, |_| async { Ok(()) }),
            )
        })
        .collect();
    let _waiting: Vec<Registration> = (0..RESOURCES)
        .map(|i| {
            let wait = || async {
                tokio::task::yield_now().await;
                Ok(())
            };
            waiting.context().register_async(
                runtime.handle().clone(),
                from_async_fns(format!("r{i}"), move |_| wait(), move |_| wait()),
            )
        })
        .collect();
    let rounds = if ctx.quick { 50 } else { 400 };
    let (mut s, mut a, mut w) = (Samples::new(), Samples::new(), Samples::new());
    for round in 0..rounds + 5 {
        let (rs, ts) = time(|| sync.simulate());
        let (ra, ta) = time(|| asyncs.simulate());
        let (rw, tw) = time(|| waiting.simulate());
        rs.map_err(|e| e.to_string())?;
        ra.map_err(|e| e.to_string())?;
        rw.map_err(|e| e.to_string())?;
        if round >= 5 {
            s.push(ts);
            a.push(ta);
            w.push(tw);
        }
    }
    let per = |x: &Samples| x.median() / (2 * RESOURCES) as f64;
    let ratio = a.median() / s.median();
    report.line(&format!(
        "(a) Method: coordinators with default Limits (hooks on the hook thread): one with \
         {RESOURCES} sync no-op resources (from_fns), one with {RESOURCES} async no-op ones \
         (from_async_fns, a 2-worker tokio runtime), one with {RESOURCES} async ones that yield \
         once; simulate() on each in turn, {rounds} rounds after 5 warm-up ones."
    ));
    report.table(
        &["resources", "cycle median", "cycle p90", "per hook"],
        &[
            vec![
                format!("{RESOURCES} sync"),
                fmt_us(s.median()),
                fmt_us(s.p90()),
                fmt_us(per(&s)),
            ],
            vec![
                format!("{RESOURCES} async"),
                fmt_us(a.median()),
                fmt_us(a.p90()),
                fmt_us(per(&a)),
            ],
            vec![
                format!("{RESOURCES} async that wait once"),
                fmt_us(w.median()),
                fmt_us(w.p90()),
                fmt_us(per(&w)),
            ],
        ],
    );
    let met = ratio <= 2.0;
    report.line(&format!(
        "Async/sync per hook: {}. Target at most 2x: {}. A hook that finishes without waiting \
         runs on the hook thread inside the runtime's context; one that waits (here a \
         `yield_now`) moves to the runtime as a task, and the hand-off between threads costs \
         {} per hook ({} sync).",
        fmt_ratio(ratio),
        verdict(met),
        fmt_us(per(&w)),
        fmt_ratio(w.median() / s.median())
    ));
    report.verdict("7a. async dispatch per hook / sync", "<= 2x", Some(met));
    Ok(())
}

/// (b) Throughput of a hello-world with and without the gating layer.
fn gating(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let coordinator = Coordinator::new();
    let plain = Router::new().route("/", get(|| async { "hello" }));
    let gated = Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(CheckpointGateLayer::with_coordinator(coordinator));
    let serve = |app: Router| -> Res<SocketAddr> {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        runtime.spawn(async move { axum::serve(listener, app).await });
        Ok(addr)
    };
    let (plain, gated) = (serve(plain)?, serve(gated)?);
    let clients = 4;
    let window = Duration::from_millis(if ctx.quick { 300 } else { 1000 });
    let rounds = if ctx.quick { 3 } else { 15 };
    let (mut p, mut g, mut paired) = (Samples::new(), Samples::new(), Samples::new());
    load(plain, clients, Duration::from_millis(200))?;
    load(gated, clients, Duration::from_millis(200))?;
    for round in 0..rounds {
        // Alternate which goes first, so drift in the machine's load falls on both.
        let (first, second) = if round % 2 == 0 {
            (plain, gated)
        } else {
            (gated, plain)
        };
        let a = load(first, clients, window)?;
        let b = load(second, clients, window)?;
        let (pr, gr) = if round % 2 == 0 { (a, b) } else { (b, a) };
        p.push_us(pr);
        g.push_us(gr);
        paired.push_us(gr / pr);
    }
    drop(runtime);
    // Each round's two runs are a second apart: their ratio is what the machine's drift
    // touches least.
    let ratio = paired.median();
    report.line(&format!(
        "(b) Method: axum 0.8 hello-world on a 1-worker tokio runtime, without and with \
         CheckpointGateLayer (no checkpoint running); {clients} client threads on kept-alive \
         connections for {} per round, {rounds} rounds, the two servers alternating first. \
         Requests per second, median of the rounds; the ratio is the median of the rounds' \
         own gated/plain ratios.",
        fmt_us(window.as_secs_f64() * 1e6)
    ));
    report.table(
        &[
            "server",
            "requests/s median",
            "lowest round",
            "µs per request",
        ],
        &[
            vec![
                "without the layer".into(),
                format!("{:.0}", p.median()),
                format!("{:.0}", p.min()),
                format!("{:.1}", 1e6 / p.median()),
            ],
            vec![
                "with CheckpointGateLayer".into(),
                format!("{:.0}", g.median()),
                format!("{:.0}", g.min()),
                format!("{:.1}", 1e6 / g.median()),
            ],
        ],
    );
    let met = ratio >= 0.98;
    report.line(&format!(
        "Gated/plain throughput: {} ({:+.1} %). Target at most 2 % lower: {}.",
        fmt_ratio(ratio),
        (ratio - 1.0) * 100.0,
        verdict(met)
    ));
    report.verdict("7b. gating's throughput cost", "<= 2 %", Some(met));
    Ok(())
}

/// Requests per second that `clients` kept-alive connections get from `addr` in `window`.
pub(crate) fn load(addr: SocketAddr, clients: usize, window: Duration) -> Res<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            std::thread::spawn(move || -> Res<()> {
                let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
                let mut writer = stream;
                let mut line = String::new();
                while !stop.load(Ordering::Relaxed) {
                    writer
                        .write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
                        .map_err(|e| e.to_string())?;
                    let mut length = 0;
                    loop {
                        line.clear();
                        reader.read_line(&mut line).map_err(|e| e.to_string())?;
                        if line == "\r\n" || line.is_empty() {
                            break;
                        }
                        if let Some(v) = line.strip_prefix("content-length: ") {
                            length = v.trim().parse().map_err(|_| "bad length".to_owned())?;
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(window);
    let counted = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| "a client panicked".to_owned())??;
    }
    Ok(counted as f64 / elapsed.as_secs_f64())
}

/// (c) pg-service: cold start against restore, to the first answer.
fn pg_warm_start(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let service = ctx
        .bins
        .crac
        .parent()
        .ok_or("no bin folder")?
        .join("pg-service");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh");
    // The server runs as the `postgres` user, which must reach its folder whatever the umask.
    std::fs::set_permissions(
        &ctx.scratch,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| format!("{}: {e}", ctx.scratch.display()))?;
    let data = ctx.scratch.join("pg");
    let pg_port = free_port()?;
    let out = Command::new(&script)
        .arg("start")
        .arg(&data)
        .arg(pg_port.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "(c) PostgreSQL did not start (as root: scripts/postgres.sh install): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let result = pg_rounds(ctx, report, &service, &url);
    let _ = Command::new(&script).arg("stop").arg(&data).status();
    result
}

fn pg_rounds(ctx: &Ctx, report: &mut Report, service: &Path, url: &str) -> Res<()> {
    let store = ctx.scratch.join("pg-store");
    let rounds = if ctx.quick { 3 } else { 7 };
    let (mut cold, mut warm) = (Samples::new(), Samples::new());
    for round in 0..rounds {
        let port = free_port()?;
        let mut cmd = Command::new(service);
        cmd.args(["--port", &port.to_string(), "--database", url]);
        let log = ctx.scratch.join("pg-service.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let proc = Proc::start_with(cmd, Stdio::null(), stderr, Duration::from_secs(30), || {
            answers(port)
        })?;
        cold.push(started.elapsed());

        let name = format!("pg{round}");
        let out = Command::new(&ctx.bins.crac)
            .arg("--store")
            .arg(&store)
            .args(["checkpoint", &proc.pid.to_string(), "--name", &name])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            proc.kill();
            return Err(format!(
                "crac checkpoint of pg-service failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let pid = proc.pid;
        proc.reap_dumped(Duration::from_secs(10))?;
        let started = Instant::now();
        let status = Command::new(&ctx.bins.crac)
            .arg("--store")
            .arg(&store)
            .args(["restore", &name, "--detach"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("crac restore of pg-service failed ({status})"));
        }
        while !answers(port) {
            if started.elapsed() > Duration::from_secs(30) {
                return Err("the restored pg-service does not answer".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        warm.push(started.elapsed());
        Proc::adopt(pid).kill();
        procs::reap_zombies(&[]);
    }
    let ratio = warm.median() / cold.median();
    report.line(&format!(
        "(c) Method: pg-service (axum, sqlx pool, PostgreSQL on loopback) started cold (to the \
         first 200 on GET /instance: runtime, pool, table check, agent, listener), then \
         `crac checkpoint` and `crac restore --detach` (to the first answer: CRIU's restore and \
         the pool's reconnect in after_restore); {rounds} rounds."
    ));
    report.table(
        &["start", "median", "p90"],
        &[
            vec!["cold".into(), fmt_us(cold.median()), fmt_us(cold.p90())],
            vec![
                "restored (crac restore)".into(),
                fmt_us(warm.median()),
                fmt_us(warm.p90()),
            ],
        ],
    );
    report.line(&format!(
        "Restored/cold: {}. This service has little to warm (no cache), so a restore is no faster \
         than its cold start: what it shows is what a restore costs an async service with a pool \
         (no target).",
        fmt_ratio(ratio)
    ));
    Ok(())
}

/// Whether pg-service answers GET /instance with 200.
fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /instance HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}
