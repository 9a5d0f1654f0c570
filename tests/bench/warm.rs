//! Item 4: warm start. The warm-start example (examples/warm_start.rs) started through
//! `crac run --image NAME -- warm-start --port P`: time from launching `crac run` to the first
//! answer to `STATS`, cold (no image: the service indexes its documents, answers, then
//! checkpoints itself into the image) against restored (the same command once the image
//! exists). Each cold run uses an image name of its own, so each is a real first start; the
//! restored runs use the first cold run's image.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::kdat::TmpfsRun;
use crate::line::{self, free_port};
use crate::procs::{self, Res};
use crate::stats::{fmt_us, verdict, Report, Samples};
use crate::Ctx;

/// How long one start may take before it counts as failed (the cold one indexes first).
const START_LIMIT: Duration = Duration::from_secs(120);

/// One request; the reply line, unless there is none or it is an `ERR`.
fn ask(port: u16, request: &str) -> Option<String> {
    line::ask(port, request, Duration::from_millis(200)).ok()
}

pub(crate) struct Started {
    pub(crate) run: Child,
    first_answer: Duration,
    pub(crate) stats: serde_json::Value,
}

/// Launches `crac run` (inside `tmpfs_run` if given) and waits for the first answer.
pub(crate) fn launch(
    ctx: &Ctx,
    store: &Path,
    image: &str,
    port: u16,
    log: &Path,
    tmpfs_run: Option<&TmpfsRun>,
) -> Res<Started> {
    let mut cmd = Command::new(&ctx.bins.crac);
    if let Some(ns) = tmpfs_run {
        ns.enter(&mut cmd);
    }
    cmd.env("CRAC_STORE", store)
        .args(["run", "--image", image, "--"])
        .arg(&ctx.bins.warm_start)
        .args(["--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).map_err(|e| e.to_string())?);
    let started = Instant::now();
    let mut run = cmd.spawn().map_err(|e| format!("crac run: {e}"))?;
    loop {
        if let Some(reply) = ask(port, "STATS") {
            let first_answer = started.elapsed();
            let stats =
                serde_json::from_str(&reply).map_err(|e| format!("STATS reply {reply:?}: {e}"))?;
            return Ok(Started {
                run,
                first_answer,
                stats,
            });
        }
        if let Ok(Some(status)) = run.try_wait() {
            return Err(format!(
                "crac run exited ({status}) before the service answered: {}",
                fs::read_to_string(log).unwrap_or_default().trim()
            ));
        }
        if started.elapsed() > START_LIMIT {
            let _ = stop(run, None);
            return Err(format!("no answer on port {port} within {START_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// SIGTERM to crac run, which forwards it to the service and exits with it; then makes sure
/// the service is gone (its PID must be free for the next restore).
pub(crate) fn stop(mut run: Child, service: Option<u32>) -> Res<()> {
    let _ = kill(Pid::from_raw(run.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if run.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            let _ = run.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(pid) = service {
        if crac_action::tree::ProcessId::of(pid).is_some() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        // Re-parented here if crac run went first.
        procs::reap(pid, Duration::from_secs(10))?;
        let _ = fs::remove_dir_all(crac_protocol::location::agent_dir(pid));
    }
    Ok(())
}

pub(crate) fn service_pid(stats: &serde_json::Value) -> Res<u32> {
    stats["pid"]
        .as_u64()
        .map(|p| p as u32)
        .ok_or_else(|| format!("STATS has no pid: {stats}"))
}

/// Waits for the cold service to say its image is saved (or that it is not).
pub(crate) fn wait_for_image(store: &Path, image: &str) -> Res<()> {
    let log = store.join(format!("{image}.log"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&format!("image \"{image}\" saved"))
            && store.join(image).join("crac-meta.json").is_file()
        {
            return Ok(());
        }
        if let Some(line) = text.lines().find(|l| l.contains("warm-start: no image")) {
            return Err(format!("the self-checkpoint failed: {line}"));
        }
        if Instant::now() > deadline {
            return Err(format!("no image after 120 s; {}:\n{text}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("4. Warm start through `crac run`");
    if !ctx.bins.warm_start.is_file() {
        return Err(format!(
            "{} is not built: run the benchmark through scripts/bench.sh, which builds it",
            ctx.bins.warm_start.display()
        ));
    }
    let (cold_runs, warm_runs) = if ctx.quick { (1, 2) } else { (3, 5) };
    let dir = ctx.scratch.join("warm");
    let store = dir.join("store");
    fs::create_dir_all(&store).map_err(|e| e.to_string())?;
    let port = free_port()?;
    report.note(&format!(
        "{cold_runs} cold and {warm_runs} restored starts on port {port}"
    ));

    let (mut cold, mut warm) = (Samples::new(), Samples::new());
    // crac run's own "restored ... in X" (validate, find CRIU, criu restore with crac-action),
    // CRIU's restore_time (stats-restore), and a plain `criu restore -d` of the same image.
    let (mut run_restore, mut criu_restore, mut plain, mut plain_answer) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    let mut warmup_ms = Samples::new();
    let mut image_bytes = 0u64;
    for i in 0..cold_runs {
        let image = format!("warm-{i}");
        let started = launch(
            ctx,
            &store,
            &image,
            port,
            &dir.join(format!("cold-{i}.err")),
            None,
        )?;
        let pid = service_pid(&started.stats)?;
        if started.stats["started"] != "cold" {
            let _ = stop(started.run, Some(pid));
            return Err(format!("expected a cold start: {}", started.stats));
        }
        cold.push(started.first_answer);
        if let Some(ms) = started.stats["warmup_ms"].as_f64() {
            warmup_ms.push_us(ms * 1e3);
        }
        let saved = wait_for_image(&store, &image);
        stop(started.run, Some(pid))?;
        saved?;
        procs::reap_zombies(&[]);
        if i > 0 {
            let _ = fs::remove_dir_all(store.join(&image));
        }
    }
    // Restored starts as most hosts run them, with CRIU's kernel-feature cache on a tmpfs
    // /run, then as this machine runs them, without.
    let tmpfs_run = TmpfsRun::new(&ctx.bins.criu)?;
    let mut cached = Samples::new();
    for i in 0..warm_runs * 2 {
        let with_cache = i < warm_runs;
        let started = launch(
            ctx,
            &store,
            "warm-0",
            port,
            &dir.join(format!("warm-{i}.err")),
            with_cache.then_some(&tmpfs_run),
        )?;
        let pid = service_pid(&started.stats)?;
        let restored = started.stats["started"] == "restored";
        if !restored {
            let _ = stop(started.run, Some(pid));
            return Err(format!(
                "expected a restored start: {} (crac run said: {})",
                started.stats,
                fs::read_to_string(dir.join(format!("warm-{i}.err")))
                    .unwrap_or_default()
                    .trim()
            ));
        }
        if with_cache {
            cached.push(started.first_answer);
            stop(started.run, Some(pid))?;
            procs::reap_zombies(&[]);
            continue;
        }
        warm.push(started.first_answer);
        stop(started.run, Some(pid))?;
        if let Some(s) = crate::dump::read_restore_time(&store.join("warm-0/stats-restore")) {
            criu_restore.push_us(s as f64);
        }
        // Read once crac run has exited: it prints this line after CRIU exits, which may be
        // after the service's first answer.
        let said = fs::read_to_string(dir.join(format!("warm-{i}.err"))).unwrap_or_default();
        if let Some(us) = said
            .lines()
            .find(|l| l.contains("restored image"))
            .and_then(|l| l.rsplit_once(" in "))
            .and_then(|(_, t)| parse_duration_us(t))
        {
            run_restore.push_us(us);
        }
        procs::reap_zombies(&[]);
    }
    // The floor under a restored start: CRIU alone restoring the same image (with crac-action,
    // which recreates the agent folder and runs after_restore), then the first answer.
    for _ in 0..warm_runs {
        let image = store.join("warm-0");
        let started = Instant::now();
        let status = Command::new(&ctx.bins.criu)
            .args(["restore", "-d", "-D"])
            .arg(&image)
            .args(["-o", "bench-restore.log", "--action-script"])
            .arg(&ctx.bins.crac_action)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("criu restore: {e}"))?;
        let restored = started.elapsed();
        if !status.success() {
            return Err(format!(
                "plain criu restore of {} failed ({status}); see bench-restore.log there",
                image.display()
            ));
        }
        let answer = loop {
            if let Some(reply) = ask(port, "STATS") {
                break reply;
            }
            if started.elapsed() > START_LIMIT {
                return Err("the plainly restored service does not answer".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        plain.push(restored);
        plain_answer.push(started.elapsed());
        let stats: serde_json::Value =
            serde_json::from_str(&answer).map_err(|e| format!("STATS {answer:?}: {e}"))?;
        let pid = service_pid(&stats)?;
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        procs::reap(pid, Duration::from_secs(10))?;
        let _ = fs::remove_dir_all(crac_protocol::location::agent_dir(pid));
        procs::reap_zombies(&[]);
    }
    if let Ok(entries) = fs::read_dir(store.join("warm-0")) {
        image_bytes = entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
    }
    let _ = fs::remove_dir_all(&store);

    drop(tmpfs_run);
    let ratio = warm.median() / cold.median();
    let cached_ratio = cached.median() / cold.median();
    report.line(&format!(
        "Method: `crac run --image NAME -- warm-start --port P` (release build, default document \
         count), CRAC_STORE in the scratch folder; time from spawning crac run to the first \
         reply to STATS (polled every 2 ms; an `ERR` reply does not count). {cold_runs} cold \
         starts (each with an image name of its own, so each is a first start that then \
         checkpoints itself), then {warm_runs} restored starts of the first cold run's image \
         ({:.0} MiB).",
        image_bytes as f64 / 1048576.0
    ));
    report.table(
        &["start", "runs", "median", "min", "max"],
        &[
            cold.runs_row("cold"),
            warmup_ms.runs_row("  of which the service's warm-up"),
            cached.runs_row("restored, with CRIU's kdat cache (a tmpfs /run, as most hosts have)"),
            warm.runs_row("restored, without (this machine: /run is not a tmpfs)"),
            run_restore.runs_row("  crac run's restore (validate, find CRIU, criu restore)"),
            criu_restore.runs_row("  CRIU's restore_time (stats-restore)"),
            plain.runs_row("plain `criu restore -d` (with crac-action), same image"),
            plain_answer.runs_row("  ... to the first answer"),
        ],
    );
    let met = ratio <= 0.02;
    let cached_met = cached_ratio <= 0.01;
    report.line(&format!(
        "Restored / cold: {:.2}% with the kdat cache (target <= 1%: {}), {:.2}% without \
         (target < 2%: {}); speed-up {:.0}x and {:.0}x. The cache runs are made in a mount \
         namespace of the benchmark's own whose /run is a tmpfs, where one `criu check` made \
         /run/criu.kdat first.",
        cached_ratio * 100.0,
        verdict(cached_met),
        ratio * 100.0,
        verdict(met),
        1.0 / cached_ratio,
        1.0 / ratio
    ));
    report.line(&format!(
        "Where a restored start's time goes (medians): crac run's restore {} (of which CRIU's \
         own restore_time {}); a plain criu restore of the same image takes {} and answers \
         after {}: what `crac run` adds over it is {}. The 2% target needs a restored start \
         of at most {}.",
        fmt_us(run_restore.median()),
        fmt_us(criu_restore.median()),
        fmt_us(plain.median()),
        fmt_us(plain_answer.median()),
        fmt_us(warm.median() - plain_answer.median()),
        fmt_us(cold.median() * 0.02),
    ));
    report.verdict(
        "4. restored / cold time to first answer, with the kdat cache",
        "<= 1%",
        Some(cached_met),
    );
    report.verdict(
        "4. restored / cold time to first answer, without it",
        "< 2%",
        Some(met),
    );
    Ok(())
}

/// "71.2 ms" or "1.05 s" (crac's `millis`), in µs.
pub(crate) fn parse_duration_us(text: &str) -> Option<f64> {
    let (value, unit) = text.trim().split_once(' ')?;
    let value: f64 = value.parse().ok()?;
    match unit.trim() {
        "ms" => Some(value * 1e3),
        "s" => Some(value * 1e6),
        _ => None,
    }
}
