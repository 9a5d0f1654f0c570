//! Item 9: time to first answer against touched memory, side by side: a cold start, an eager
//! `crac restore`, and a lazy one (`crac restore --lazy`), for crac-test-target holding 16,
//! 256, 1,024 and 4,096 MiB of touched memory (4 GiB once, and not with --quick) (each page its own content); and the price of lazy:
//! the time until every page has arrived, and a request's latency while pages still arrive.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kdat::TmpfsRun;
use crate::line::{self, free_port};
use crate::procs::{self, Proc, Res};
use crate::stats::{fmt_ratio, fmt_us, verdict, Report, Samples};
use crate::Ctx;

const SIZES_MIB: [u64; 4] = [16, 256, 1024, 4096];
/// From this size on, one round: a round writes and reads the image several times over.
const BIG_MIB: u64 = 4096;

/// Waits for the first STATUS answer on `port`; the time since `since`.
fn first_answer(port: u16, since: Instant, limit: Duration) -> Res<Duration> {
    loop {
        if line::ask(port, "STATUS", Duration::from_millis(100)).is_ok() {
            return Ok(since.elapsed());
        }
        if since.elapsed() > limit {
            return Err(format!("nothing answered on port {port} within {limit:?}"));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

struct Row {
    mib: u64,
    cold: Samples,
    eager: Samples,
    lazy: Samples,
    all_in: Samples,
    latency_during: Samples,
    latency_after: Samples,
}

fn measure(ctx: &Ctx, mib: u64, rounds: usize) -> Res<Row> {
    let mut row = Row {
        mib,
        cold: Samples::new(),
        eager: Samples::new(),
        lazy: Samples::new(),
        all_in: Samples::new(),
        latency_during: Samples::new(),
        latency_after: Samples::new(),
    };
    let store = ctx.scratch.join(format!("lazy-store-{mib}"));
    let dir = ctx.scratch.join(format!("lazy-target-{mib}"));
    let crac = |args: &[&str]| {
        let mut cmd = Command::new(&ctx.bins.crac);
        cmd.arg("--store")
            .arg(&store)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    for round in 0..rounds {
        let port = free_port()?;
        let name = format!("m{round}");
        let started = Instant::now();
        let (pid, cold) = checkpointed(ctx, &store, &dir, mib, port, &name)?;
        row.cold.push(cold.saturating_duration_since(started));

        // Eager: every page is in before the service runs.
        let started = Instant::now();
        let mut eager = crac(&["restore", &name, "--detach", "--eager"])
            .spawn()
            .map_err(|e| e.to_string())?;
        row.eager
            .push(first_answer(port, started, Duration::from_secs(120))?);
        let _ = eager.wait();
        Proc::adopt(pid).kill();
        procs::reap_zombies(&[]);

        // Lazy: the service answers first; crac returns once every page has arrived.
        let started = Instant::now();
        let mut lazy = crac(&["restore", &name, "--detach", "--lazy"])
            .spawn()
            .map_err(|e| e.to_string())?;
        row.lazy
            .push(first_answer(port, started, Duration::from_secs(120))?);
        while lazy.try_wait().map_err(|e| e.to_string())?.is_none() {
            let asked = Instant::now();
            if line::ask(port, "STATUS", Duration::from_secs(5)).is_ok() {
                row.latency_during.push(asked.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        row.all_in.push(started.elapsed());
        let status = lazy.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            Proc::adopt(pid).kill();
            return Err(format!("crac restore --lazy failed ({status})"));
        }
        for _ in 0..20 {
            let asked = Instant::now();
            if line::ask(port, "STATUS", Duration::from_secs(5)).is_ok() {
                row.latency_after.push(asked.elapsed());
            }
        }
        let heap = line::ask(port, "HEAP", Duration::from_secs(5))?;
        if heap != format!("heap ok {mib} MiB") {
            Proc::adopt(pid).kill();
            return Err(format!("the lazily restored heap is wrong: {heap}"));
        }
        Proc::adopt(pid).kill();
        procs::reap_zombies(&[]);
        let _ = std::fs::remove_dir_all(store.join(&name));
    }
    Ok(row)
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("9. Time to first answer against memory: cold, eager and lazy restore");
    let rounds = if ctx.quick { 1 } else { 3 };
    let mut rows = Vec::new();
    for mib in SIZES_MIB {
        if mib >= BIG_MIB {
            if ctx.quick {
                continue;
            }
            // The service, its restored copy's page cache and the image's pages at once.
            let needed = 3 * mib * 1024 * 1024;
            if procs::mem_available().is_some_and(|m| m < needed) {
                report.line(&format!(
                    "{mib} MiB not measured: less than {} GiB of memory available.",
                    needed >> 30
                ));
                continue;
            }
        }
        report.note(&format!("{mib} MiB"));
        rows.push(measure(ctx, mib, if mib >= BIG_MIB { 1 } else { rounds })?);
    }
    report.line(&format!(
        "Method: crac-test-target touching N MiB (each page its own content), serving STATUS on \
         TCP. Cold: from spawning it to the first STATUS answer (it fills its memory first). Then \
         `crac checkpoint` (stopped), and from spawning `crac restore --detach --eager`, then \
         `crac restore --detach --lazy` (CRIU's page server), to the first answer. 'All in': \
         until the lazy `crac restore` returned (every page arrived). Latency: STATUS round trips \
         while pages still arrive, and 20 after. {rounds} round(s) each ({BIG_MIB} MiB: one); medians. After each \
         lazy restore the service checks its whole heap (HEAP): correct in every run."
    ));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                format!("{} MiB", r.mib),
                fmt_us(r.cold.median()),
                fmt_us(r.eager.median()),
                fmt_us(r.lazy.median()),
                fmt_us(r.all_in.median()),
                if r.latency_during.len() == 0 {
                    "(none: all in first)".into()
                } else {
                    format!(
                        "{} (p90 {}, {} asked)",
                        fmt_us(r.latency_during.median()),
                        fmt_us(r.latency_during.p90()),
                        r.latency_during.len()
                    )
                },
                fmt_us(r.latency_after.median()),
            ]
        })
        .collect();
    report.table(
        &[
            "memory",
            "cold",
            "eager restore",
            "lazy restore",
            "lazy: all in",
            "latency while arriving",
            "latency after",
        ],
        &table,
    );
    let lazy_of = |mib: u64| {
        rows.iter()
            .find(|r| r.mib == mib)
            .map_or(f64::NAN, |r| r.lazy.median())
    };
    let ratio = lazy_of(1024) / lazy_of(16);
    let met = ratio <= 1.5;
    report.line(&format!(
        "Lazy restore's first answer at 1 GiB / at 16 MiB: {}. Target at most 1.5x: {}.",
        fmt_ratio(ratio),
        verdict(met)
    ));
    report.verdict("9. lazy first answer, 1 GiB / 16 MiB", "<= 1.5x", Some(met));
    let startup = kdat(ctx, report)?;
    breakdown(ctx, report, startup)
}

/// Where an eager `crac restore` of a small service spends its time, part by part.
fn breakdown(ctx: &Ctx, report: &mut Report, startup: (f64, f64)) -> Res<()> {
    let rounds = if ctx.quick { 3 } else { 9 };
    let store = ctx.scratch.join("breakdown-store");
    let dir = ctx.scratch.join("breakdown-target");
    let port = free_port()?;
    let (pid, _) = checkpointed(ctx, &store, &dir, 16, port, "b")?;
    let (mut answer, mut wall, mut criu, mut criu_restore, mut hooks) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    for _ in 0..rounds {
        let started = Instant::now();
        let restore = Command::new(&ctx.bins.crac)
            .arg("--store")
            .arg(&store)
            .args(["restore", "b", "--detach", "--eager", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        answer.push(first_answer(port, started, Duration::from_secs(60))?);
        let out = restore.wait_with_output().map_err(|e| e.to_string())?;
        wall.push(started.elapsed());
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("crac restore --json: {e}"))?;
        criu.push_us(json["restore_ms"].as_f64().unwrap_or(f64::NAN) * 1e3);
        criu_restore.push_us(json["criu"]["restore_ms"].as_f64().unwrap_or(f64::NAN) * 1e3);
        // "... after_restore (restored) ok, 3 hooks in 41µs: ..." from crac-action.
        let hook_us = json["hook_lines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .filter_map(|l| l.split(" hooks in ").nth(1))
            .filter_map(|rest| rest.split(':').next())
            .map(parse_duration_us)
            .sum::<f64>();
        hooks.push_us(hook_us);
        Proc::adopt(pid).kill();
        procs::reap_zombies(&[]);
    }
    let (probe, cached) = startup;
    let rows = vec![
        vec![
            "crac restore, spawn to exit".to_owned(),
            fmt_us(wall.median()),
        ],
        vec![
            "  of which CRIU's process (start to exit)".to_owned(),
            fmt_us(criu.median()),
        ],
        vec![
            "    of which CRIU's restore proper (its restore_time)".to_owned(),
            fmt_us(criu_restore.median()),
        ],
        vec![
            "    of which CRIU's start-up, kernel probe included (`criu check`)".to_owned(),
            fmt_us(probe),
        ],
        vec![
            "      of which the kernel probe (saved by a kdat cache)".to_owned(),
            fmt_us(probe - cached),
        ],
        vec![
            "  crac's own (validation, hashes of changed files, lock, pidfile, output)".to_owned(),
            fmt_us(wall.median() - criu.median()),
        ],
        vec![
            "after_restore hooks (inside CRIU's post-resume)".to_owned(),
            fmt_us(hooks.median()),
        ],
        vec![
            "first answer, from spawning crac".to_owned(),
            fmt_us(answer.median()),
        ],
    ];
    report.line(&format!(
        "Where a restore's time goes: crac-test-target with 16 MiB, `crac restore --detach --eager \
         --json`, {rounds} rounds, medians. CRIU's start-up is measured apart (`criu check`, \
         above), so the parts overlap rather than add up."
    ));
    report.table(&["part", "median"], &rows);
    Ok(())
}

/// Starts crac-test-target with `mib` MiB serving on `port`, and `crac checkpoint`s it (it
/// stops) into image `name` of `store`: its pid, and when it first answered.
fn checkpointed(
    ctx: &Ctx,
    store: &std::path::Path,
    dir: &std::path::Path,
    mib: u64,
    port: u16,
    name: &str,
) -> Res<(u32, Instant)> {
    let mut cmd = Command::new(&ctx.bins.test_target);
    cmd.env("CRAC_TEST_DIR", dir)
        .env("CRAC_TEST_MIB", mib.to_string())
        .env("CRAC_TEST_LISTEN", port.to_string());
    let started = Instant::now();
    let target = Proc::start(
        cmd,
        &dir.join("ready"),
        &ctx.scratch.join("lazy-target.stderr"),
        Duration::from_secs(120),
    )?;
    let answered = started + first_answer(port, started, Duration::from_secs(120))?;
    let out = Command::new(&ctx.bins.crac)
        .arg("--store")
        .arg(store)
        .args(["checkpoint", &target.pid.to_string(), "--name", name])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        target.kill();
        return Err(format!(
            "crac checkpoint failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let pid = target.pid;
    target.reap_dumped(Duration::from_secs(30))?;
    Ok((pid, answered))
}

/// `41µs`, `3ms`, `1.2s` (crac-core's durations) in microseconds.
fn parse_duration_us(text: &str) -> f64 {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("µs") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        (text, f64::NAN)
    };
    number.parse::<f64>().map_or(f64::NAN, |n| n * scale)
}

const KDAT_RUNS: usize = 21;

/// CRIU's start-up with and without its kernel-feature cache. /run is not a tmpfs here, so
/// CRIU keeps no cache; `with` is measured in a mount namespace whose /run is one
/// ([`TmpfsRun`], which makes the cache first).
fn kdat(ctx: &Ctx, report: &mut Report) -> Res<(f64, f64)> {
    let without = criu_check_runs(&ctx.bins.criu, None, KDAT_RUNS)?;
    let tmpfs_run = TmpfsRun::new(&ctx.bins.criu)?;
    let with = criu_check_runs(&ctx.bins.criu, Some(&tmpfs_run), KDAT_RUNS)?;
    report.line(&format!(
        "CRIU's start-up (`criu check`, {KDAT_RUNS} runs, median): {} probing the kernel (no \
         cache: /run is not a tmpfs here), {} loading /run/criu.kdat from a tmpfs (in a mount \
         namespace of the benchmark's own): the cache saves {} per CRIU run, so per restore \
         (and per dump). crac places no cache on a disk-backed /run: it would outlive a reboot \
         and a kernel update, and every CRIU on the machine would trust it; `crac check` says \
         whether one is in use.",
        fmt_us(without),
        fmt_us(with),
        fmt_us(without - with)
    ));
    Ok((without, with))
}

/// Median microseconds of `runs` `criu check`, inside `tmpfs_run` if given.
fn criu_check_runs(criu: &std::path::Path, tmpfs_run: Option<&TmpfsRun>, runs: usize) -> Res<f64> {
    let mut samples = Samples::new();
    for _ in 0..runs {
        let mut check = crate::kdat::criu_check(criu, tmpfs_run);
        let started = Instant::now();
        let status = check.status().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("criu check failed ({status})"));
        }
        samples.push(started.elapsed());
    }
    Ok(samples.median())
}
