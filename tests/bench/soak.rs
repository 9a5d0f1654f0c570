//! Item 6: soak. The cache-server example (with its upstream), checkpointed again and again:
//! N killing checkpoints, each followed by a restore, then N `--leave-running` checkpoints under
//! a steady loopback load. After each: the state is intact (the cache's entries and counters,
//! the generation, the reason, the upstream connection), and the process's descriptors,
//! threads and resident memory stay flat. Under load: the requests that failed, and the longest
//! gap between two answers, per checkpoint. Any broken promise fails the item (and so the
//! short soak that the test suite runs).

use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::line::{self, free_port};
use crate::procs::{self, Proc, Res};
use crate::stats::{fmt_us, Report, Samples};
use crate::Ctx;

/// Keys the cache is warmed with.
const KEYS: usize = 40;
/// Resident memory a process may gain over the soak before it counts as growing.
const RSS_SLACK_KIB: u64 = 2048;

/// One request to the cache server.
fn ask(port: u16, request: &str) -> Result<String, String> {
    line::ask(port, request, Duration::from_secs(2))
}

fn stats(port: u16) -> Res<serde_json::Value> {
    let reply = ask(port, "STATS").map_err(|e| format!("STATS: {e}"))?;
    serde_json::from_str(&reply).map_err(|e| format!("STATS {reply:?}: {e}"))
}

/// Descriptors, threads and resident memory (KiB) of `pid`.
fn footprint(pid: u32) -> Res<(usize, u64, u64)> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("fds of {pid}: {e}"))?
        .count();
    let status = format!("/proc/{pid}/status");
    let threads = procs::status_field(&status, "Threads").ok_or("no Threads")?;
    let rss = procs::status_field(&status, "VmRSS").ok_or("no VmRSS")?;
    Ok((fds, threads, rss))
}

/// A service process to soak: started here, or restored (then adopted by this subreaper).
fn start(ctx: &Ctx, dir: &Path, port: u16, upstream: u16) -> Res<Proc> {
    let log = dir.join("server.log");
    // Appended to, not truncated: a restored copy writes on at the end of a file that grew.
    let open = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| e.to_string())
    };
    let mut cmd = Command::new(&ctx.bins.cache_server);
    cmd.args([
        "--port",
        &port.to_string(),
        "--upstream",
        &format!("127.0.0.1:{upstream}"),
    ]);
    Proc::start_with(cmd, open()?, open()?, Duration::from_secs(10), || {
        ask(port, "STATS").is_ok()
    })
}

/// The fields of a STATS reply that differ from what is due, each as one problem.
fn differences(
    at: &str,
    stats: &serde_json::Value,
    due: &[(&str, serde_json::Value)],
) -> Vec<String> {
    due.iter()
        .filter(|(field, want)| stats[*field] != *want)
        .map(|(field, want)| format!("{at}: {field} {} where {want} was due", stats[*field]))
        .collect()
}

/// What the load saw: each answer (or failure) and when it came.
#[derive(Default)]
struct Load {
    events: Vec<(Instant, Instant, bool)>,
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let cycles = ctx.soak_cycles;
    report.section("6. Soak: repeated checkpoints of the cache server");
    let dir = ctx.scratch.join("soak");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (port, upstream_port) = (free_port()?, free_port()?);
    let mut upstream_cmd = Command::new(&ctx.bins.upstream);
    upstream_cmd.arg(upstream_port.to_string());
    let upstream = Proc::start_with(
        upstream_cmd,
        Stdio::null(),
        fs::File::create(dir.join("upstream.log")).map_err(|e| e.to_string())?,
        Duration::from_secs(10),
        || TcpStream::connect((Ipv4Addr::LOCALHOST, upstream_port)).is_ok(),
    )?;
    let mut service = start(ctx, &dir, port, upstream_port)?;
    for key in 0..KEYS {
        ask(port, &format!("GET key-{key}")).map_err(|e| format!("warming: {e}"))?;
    }
    let warm = stats(port)?;
    let baseline = footprint(service.pid)?;
    let mut worst = baseline;
    let mut problems: Vec<String> = Vec::new();
    let mut generation = 0u64;

    // Killing checkpoints, each followed by a restore.
    let mut dump_ms = Samples::new();
    let mut restore_ms = Samples::new();
    for cycle in 0..cycles {
        let images = dir.join(format!("kill-{cycle}"));
        let started = Instant::now();
        let out = crac(
            ctx,
            &["checkpoint", &service.pid.to_string(), "--dir"],
            &images,
        )?;
        dump_ms.push(started.elapsed());
        check_ok(&out, "crac checkpoint")?;
        let pid = service.pid;
        service.reap_dumped(Duration::from_secs(10))?;
        let started = Instant::now();
        let out = crac(ctx, &["restore", "--detach"], &images)?;
        restore_ms.push(started.elapsed());
        check_ok(&out, "crac restore")?;
        service = Proc::adopt(pid);
        generation += 1;
        problems.extend(differences(
            &format!("kill cycle {cycle}"),
            &stats(port)?,
            &[
                ("entries", warm["entries"].clone()),
                ("generation", generation.into()),
                ("last_restore", "restored".into()),
                ("upstream_connected", true.into()),
            ],
        ));
        let _ = fs::remove_dir_all(&images);
        let now = footprint(service.pid)?;
        worst = (worst.0.max(now.0), worst.1.max(now.1), worst.2.max(now.2));
    }

    // --leave-running checkpoints under load.
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let loader = {
        let (stop, load) = (Arc::clone(&stop), Arc::clone(&load));
        std::thread::spawn(move || {
            let mut key = 0;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let ok = ask(port, &format!("GET key-{}", key % KEYS)).is_ok();
                load.lock().unwrap_or_else(|p| p.into_inner()).events.push((
                    sent,
                    Instant::now(),
                    ok,
                ));
                key += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut windows = Vec::with_capacity(cycles);
    for cycle in 0..cycles {
        let images = dir.join(format!("live-{cycle}"));
        let started = Instant::now();
        let out = crac(
            ctx,
            &[
                "checkpoint",
                &service.pid.to_string(),
                "--leave-running",
                "--dir",
            ],
            &images,
        )?;
        check_ok(&out, "crac checkpoint --leave-running")?;
        generation += 1;
        // The watcher ends the cycle right after CRIU; the next answer shows it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = stats(port)?;
            if now["generation"] == generation {
                problems.extend(differences(
                    &format!("leave-running cycle {cycle}"),
                    &now,
                    &[
                        ("entries", warm["entries"].clone()),
                        ("last_restore", "resumed".into()),
                        ("upstream_connected", true.into()),
                    ],
                ));
                break;
            }
            if Instant::now() > deadline {
                problems.push(format!(
                    "leave-running cycle {cycle}: generation {} after 10 s, {generation} due",
                    now["generation"]
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        windows.push((started, Instant::now()));
        let _ = fs::remove_dir_all(&images);
        let now = footprint(service.pid)?;
        worst = (worst.0.max(now.0), worst.1.max(now.1), worst.2.max(now.2));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let _ = loader.join();
    let events = std::mem::take(&mut load.lock().unwrap_or_else(|p| p.into_inner()).events);
    // The coordinator's hook thread lingers a moment after a cycle (crac-core's hook_thread),
    // so the last figures are taken once it is gone.
    let settle = Instant::now() + Duration::from_secs(5);
    let mut last = footprint(service.pid)?;
    while last.1 > baseline.1 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
        last = footprint(service.pid)?;
    }

    // Per checkpoint: requests sent during it that failed, and the longest gap between two
    // answers that overlaps it.
    let (mut failed, mut stall) = (Samples::new(), Samples::new());
    let mut failed_total = 0;
    for &(from, to) in &windows {
        let lost = events
            .iter()
            .filter(|(sent, _, ok)| !ok && *sent >= from && *sent <= to)
            .count();
        failed_total += lost;
        failed.push_us(lost as f64);
        let answers: Vec<Instant> = events
            .iter()
            .filter(|(_, _, ok)| *ok)
            .map(|(_, done, _)| *done)
            .collect();
        let gap = answers
            .windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        stall.push(gap);
    }
    let between: Vec<Duration> = events
        .windows(2)
        .filter(|w| {
            windows
                .iter()
                .all(|(from, to)| w[1].1 < *from || w[0].1 > *to)
        })
        .map(|w| w[1].1 - w[0].1)
        .collect();
    let mut quiet = Samples::new();
    for gap in between {
        quiet.push(gap);
    }
    if failed_total > 0 {
        problems.push(format!(
            "{failed_total} requests failed during the leave-running checkpoints"
        ));
    }
    if last.0 > baseline.0 {
        problems.push(format!("descriptors grew: {} -> {}", baseline.0, last.0));
    }
    if last.1 > baseline.1 {
        problems.push(format!("threads grew: {} -> {}", baseline.1, last.1));
    }
    if last.2 > baseline.2 + baseline.2 / 10 + RSS_SLACK_KIB {
        problems.push(format!(
            "resident memory grew: {} -> {} KiB",
            baseline.2, last.2
        ));
    }
    drop(service);
    drop(upstream);

    report.line(&format!(
        "Method: the cache-server example (`examples/cache_server.rs`, release build) and its \
         upstream, {KEYS} keys warmed; {cycles} killing checkpoints (`crac checkpoint PID --dir \
         DIR`, then `crac restore DIR --detach`), then {cycles} `crac checkpoint PID \
         --leave-running --dir DIR` while a client sends GET requests one after another (1 ms \
         apart) over loopback. After each checkpoint: STATS must show every entry, the \
         generation and the reason due, and the upstream connected. A checkpoint's window runs \
         from the start of `crac checkpoint` to the first STATS showing its generation."
    ));
    let row = |name: &str, value: String| vec![name.to_owned(), value];
    report.table(
        &["figure", "value"],
        &[
            row(
                "killing checkpoint, then restore (medians)",
                format!(
                    "{} + {}",
                    fmt_us(dump_ms.median()),
                    fmt_us(restore_ms.median())
                ),
            ),
            row(
                "requests sent under load",
                format!("{} ({} failed)", events.len(), failed_total),
            ),
            row(
                "failed requests per leave-running checkpoint (median / max)",
                format!("{} / {}", failed.median(), failed.quantile(1.0)),
            ),
            row(
                "longest gap between answers, per checkpoint (median / p90)",
                format!("{} / {}", fmt_us(stall.median()), fmt_us(stall.p90())),
            ),
            row(
                "gap between answers outside checkpoints (median / p90)",
                format!("{} / {}", fmt_us(quiet.median()), fmt_us(quiet.p90())),
            ),
            row(
                "descriptors, threads, VmRSS: start / worst / end",
                format!(
                    "{} {} {} KiB / {} {} {} KiB / {} {} {} KiB",
                    baseline.0,
                    baseline.1,
                    baseline.2,
                    worst.0,
                    worst.1,
                    worst.2,
                    last.0,
                    last.1,
                    last.2
                ),
            ),
        ],
    );
    report.verdict(
        "6. soak: state intact, nothing lost, flat",
        &format!("{cycles} + {cycles} cycles"),
        Some(problems.is_empty()),
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn crac(ctx: &Ctx, args: &[&str], images: &Path) -> Res<std::process::Output> {
    Command::new(&ctx.bins.crac)
        .args(args)
        .arg(images)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("crac: {e}"))
}

fn check_ok(out: &std::process::Output, what: &str) -> Res<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}
