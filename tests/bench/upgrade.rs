//! Item 13: what clients see while the `upgradable` example is upgraded from v1 to v2 (issue
//! 20), by `crac upgrade` at level handoff, at level state, and by a plain kill and start (the
//! baseline): refused connections, failed requests, the 99th percentile latency during the
//! upgrade against steady state just before, and the time it takes. The load is
//! crac_test_support::http_load (keep-alive clients and a connection per request, on
//! loopback, each pausing between requests), the same as the end-to-end tests put.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crac_test_support::http_load::{Load, Options, Tally};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::line::free_port;
use crate::procs::Proc;
use crate::stats::{fmt_us, verdict, Report, Samples};
use crate::{Ctx, Res};

/// The load.
const KEEP_ALIVE: usize = 4;
const FRESH: usize = 2;
const PAUSE: Duration = Duration::from_millis(5);
/// Steady state measured before each upgrade, and load kept on after it.
const STEADY: Duration = Duration::from_secs(1);
const AFTER: Duration = Duration::from_millis(300);
/// The target for the 99th percentile during an upgrade, against steady state.
const P99_RATIO: f64 = 2.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Handoff,
    State,
    KillStart,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Handoff => "crac upgrade, level handoff",
            Way::State => "crac upgrade, level state",
            Way::KillStart => "kill + start (baseline)",
        }
    }
}

/// What one way gave, over its runs.
#[derive(Default)]
struct Figures {
    refused: usize,
    failed: usize,
    retried: usize,
    answers: usize,
    steady_p99: Samples,
    during_p99: Samples,
    took: Samples,
    failures: Vec<String>,
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("13. Zero-downtime upgrades (issue 20)");
    let program = ctx
        .bins
        .crac
        .parent()
        .ok_or("no folder for crac")?
        .join("upgradable");
    if !program.is_file() {
        return Err(format!(
            "{} not found: build the examples (scripts/bench.sh does)",
            program.display()
        ));
    }
    let runs = if ctx.quick { 2 } else { 5 };
    let mut rows = Vec::new();
    let mut all = Vec::new();
    for way in [Way::Handoff, Way::State, Way::KillStart] {
        let mut figures = Figures::default();
        for run in 0..runs {
            report.note(&format!("{} ({}/{runs})", way.name(), run + 1));
            once(ctx, &program, way, &mut figures)?;
        }
        let ratio = figures.during_p99.median() / figures.steady_p99.median().max(1.0);
        rows.push(vec![
            way.name().to_owned(),
            figures.refused.to_string(),
            figures.failed.to_string(),
            figures.retried.to_string(),
            fmt_us(figures.steady_p99.median()),
            fmt_us(figures.during_p99.median()),
            format!("{ratio:.1}x"),
            fmt_us(figures.took.median()),
        ]);
        all.push((way, figures, ratio));
    }
    report.line(&format!(
        "**Method.** The `upgradable` example (axum, its agent sharing its listener) as v1, \
         upgraded to v2 under load: {KEEP_ALIVE} keep-alive clients and {FRESH} clients opening \
         a connection per request, each pausing {} ms between requests, on loopback. Each run: \
         {} s of steady state, then the upgrade, then {} ms more. handoff: `crac upgrade PID \
         --level handoff -- COPY` (another build of the same program); state: `crac upgrade \
         PID --level state` (checkpoint and restore, `--tcp-established`); baseline: SIGTERM, \
         then v2 started and answering. Refused: connections refused; failed: requests with no \
         answer; retried: requests sent again on a new connection after the server closed an \
         idle keep-alive one (as HTTP clients do). Sums over {runs} runs; latencies and times \
         are medians of the runs' figures (p99 over the requests sent during the upgrade, \
         against the p99 of the steady second before it).",
        PAUSE.as_millis(),
        STEADY.as_secs(),
        AFTER.as_millis()
    ));
    report.table(
        &[
            "way",
            "refused",
            "failed",
            "retried",
            "p99 steady",
            "p99 during",
            "during / steady",
            "time to complete",
        ],
        &rows,
    );
    for (way, figures, ratio) in &all {
        if !figures.failures.is_empty() {
            let mut seen = figures.failures.clone();
            seen.sort();
            seen.dedup();
            report.line(&format!(
                "{}: failures seen: {}.",
                way.name(),
                seen.join("; ")
            ));
        }
        if *way == Way::KillStart {
            report.verdict(
                "13 kill + start: refused connections (shown beside the others)",
                "none (baseline)",
                None,
            );
            continue;
        }
        let nothing_lost = figures.refused == 0 && figures.failed == 0;
        report.line(&format!(
            "{}: nothing refused or failed: {}; p99 during at most {P99_RATIO}x steady: {}.",
            way.name(),
            verdict(nothing_lost),
            verdict(*ratio <= P99_RATIO)
        ));
        report.verdict(
            &format!("13 {}: refused and failed", way.name()),
            "0 and 0",
            Some(nothing_lost),
        );
        report.verdict(
            &format!("13 {}: p99 during the upgrade", way.name()),
            "<= 2x steady",
            Some(*ratio <= P99_RATIO),
        );
    }
    Ok(())
}

/// One upgrade of a fresh v1 under load.
fn once(ctx: &Ctx, program: &Path, way: Way, figures: &mut Figures) -> Res<()> {
    let dir = ctx.scratch.join("upgrade");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let v1 = start(program, &dir, port, "v1")?;
    let load = Load::start(Options {
        port,
        keep_alive: KEEP_ALIVE,
        fresh: FRESH,
        pause: PAUSE,
    });
    let steady_from = Instant::now();
    std::thread::sleep(STEADY);
    let began = Instant::now();
    let outcome = upgrade(ctx, program, &dir, port, way, v1);
    let ended = Instant::now();
    std::thread::sleep(AFTER);
    let tally = load.stop();
    let new = outcome?;
    figures.took.push(ended - began);
    count(&tally, steady_from, began, ended, figures);
    // v2 (an orphan re-parented to this subreaper, or the baseline's child), killed.
    drop(new);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn count(tally: &Tally, steady_from: Instant, began: Instant, ended: Instant, f: &mut Figures) {
    f.refused += tally.refused;
    f.failed += tally.failed.len();
    f.failures.extend(tally.failed.iter().cloned());
    f.retried += tally.retried;
    f.answers += tally.answers.len();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    f.steady_p99
        .push_us(us(Tally::p99(tally.between(steady_from, Some(began)))));
    f.during_p99
        .push_us(us(Tally::p99(tally.between(began, Some(ended)))));
}

/// v1 or the baseline's v2: a session leader, its output appended to a file.
fn start(program: &Path, dir: &Path, port: u16, version: &str) -> Res<Proc> {
    let log =
        crac_fs::open_append(&dir.join(format!("{version}.log"))).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(program);
    cmd.current_dir(dir)
        .env("PORT", port.to_string())
        .env("STATE_FILE", dir.join("state"))
        .env("APP_VERSION", version);
    let out = log.try_clone().map_err(|e| e.to_string())?;
    Proc::start_with(cmd, Stdio::from(out), log, Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// Upgrades v1: the new version's process, to stop after.
fn upgrade(ctx: &Ctx, program: &Path, dir: &Path, port: u16, way: Way, v1: Proc) -> Res<Proc> {
    match way {
        Way::KillStart => {
            let _ = kill(Pid::from_raw(v1.pid as i32), Signal::SIGTERM);
            v1.reap_dumped(Duration::from_secs(30))?;
            start(program, dir, port, "v2")
        }
        Way::Handoff | Way::State => {
            let target = if way == Way::Handoff {
                // Another build of the same program: a new executable.
                let copy: PathBuf = dir.join("upgradable-v2");
                std::fs::copy(program, &copy).map_err(|e| e.to_string())?;
                copy
            } else {
                program.to_owned()
            };
            let level = if way == Way::Handoff {
                "handoff"
            } else {
                "state"
            };
            let pid = v1.pid;
            // The dumped or retired v1 is reaped as soon as it ends, as a supervisor would:
            // a restore needs its pid free.
            let reaper = std::thread::spawn(move || v1.reap_dumped(Duration::from_secs(60)));
            let out = Command::new(&ctx.bins.crac)
                .arg("--store")
                .arg(dir.join("store"))
                .args(["upgrade", &pid.to_string(), "--level", level])
                .args(["--env", "APP_VERSION=v2", "--log"])
                .arg(dir.join("v2.log"))
                .arg("--")
                .arg(&target)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| e.to_string())?;
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            reaper.join().map_err(|_| "the reaper panicked")??;
            if !out.status.success() {
                return Err(format!("crac upgrade failed: {}", stderr.trim()));
            }
            let new = match way {
                Way::State => pid,
                _ => {
                    let at = stderr.rfind(" to pid ").ok_or("crac names no new pid")?;
                    stderr[at + 8..]
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|n| n.parse().ok())
                        .ok_or("crac names no new pid")?
                }
            };
            Ok(Proc::adopt(new))
        }
    }
}
