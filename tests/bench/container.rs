//! Item 10: warm start inside a container image. The warm-start example in an image made by
//! scripts/container-image.sh (CRIU, crac and the service inside; entrypoint `crac run`), run
//! by podman as the script's usage says: time from spawning `podman run -d` to the first
//! answer to `STATS`, cold (the image as built: no checkpoint in it) against restored (the
//! image committed after a warm-up in which the service checkpointed itself). A container
//! that only runs `crac --version` gives podman's own share.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::line::{self, free_port};
use crate::procs::Res;
use crate::stats::{fmt_us, Report, Samples};
use crate::Ctx;
use crac_test_support::podman::{Podman, WARM_RUN_OPTIONS};

const COLD: &str = "localhost/crac-bench:cold";
const WARM: &str = "localhost/crac-bench:warm";
const START_LIMIT: Duration = Duration::from_secs(120);

/// `out` if its command succeeded, else an error naming `what` with its stderr.
pub(crate) fn ok(out: Output, what: &str) -> Res<Output> {
    if out.status.success() {
        return Ok(out);
    }
    Err(format!(
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// The cache server's STATS on `port`, if it answers within 200 ms.
pub(crate) fn stats(port: u16) -> Option<serde_json::Value> {
    let reply = line::ask(port, "STATS", Duration::from_millis(200)).ok()?;
    serde_json::from_str(&reply).ok()
}

/// Starts container `name` of `image` and waits for the first answer: how long that took,
/// and what the service said.
fn start(
    podman: &Podman,
    image: &str,
    name: &str,
    port: u16,
) -> Res<(Duration, serde_json::Value)> {
    let mut args = vec!["run", "-d", "--name", name];
    args.extend(WARM_RUN_OPTIONS);
    args.push(image);
    let started = Instant::now();
    ok(podman.try_run(&args), "podman run")?;
    loop {
        if let Some(stats) = stats(port) {
            return Ok((started.elapsed(), stats));
        }
        if started.elapsed() > START_LIMIT {
            let logs = podman.try_run(&["logs", name]);
            return Err(format!(
                "container {name} did not answer within {START_LIMIT:?}: {}",
                String::from_utf8_lossy(&logs.stderr).trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the service in the container says its checkpoint is saved.
fn wait_saved(port: u16) -> Res<()> {
    let deadline = Instant::now() + START_LIMIT;
    while Instant::now() < deadline {
        match stats(port) {
            Some(s) if s["image"] == "saved" => return Ok(()),
            Some(s) if s["image"].as_str().is_some_and(|i| i.starts_with("failed")) => {
                return Err(format!("the self-checkpoint failed: {s}"))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Err("the service in the container saved no checkpoint".into())
}

fn remove(podman: &Podman, name: &str) -> Res<()> {
    ok(
        podman.try_run(&["rm", "--force", "--time", "10", name]),
        "podman rm",
    )
    .map(drop)
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("10. Warm start inside a container image (podman)");
    if !Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Err(
            "podman is not installed: scripts/bench.sh installs it (scripts/install-runtimes.sh)"
                .into(),
        );
    }
    let runs = if ctx.quick { 2 } else { 5 };
    // podman refuses a run root longer than 50 characters.
    let podman = Podman::new(&ctx.scratch.join("pm"), &ctx.bins.criu);
    let port = free_port()?;
    let bin_dir = ctx.bins.crac.parent().ok_or("no folder for crac")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/container-image.sh");
    let built = Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(bin_dir)
        .args(["--name", "warm", COLD, "--"])
        .arg(&ctx.bins.warm_start)
        .args(["--port", &port.to_string()])
        .env(
            "PODMAN",
            format!("podman {}", podman.global_options().join(" ")),
        )
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    ok(built, "scripts/container-image.sh")?;
    report.note(&format!(
        "{runs} cold and {runs} restored containers on port {port}"
    ));

    let (mut cold, mut warm, mut inside) = (Samples::new(), Samples::new(), Samples::new());
    let mut warmup_stats = serde_json::Value::Null;
    for i in 0..runs {
        let name = format!("cold-{i}");
        let (took, stats) = start(&podman, COLD, &name, port)?;
        if stats["started"] != "cold" {
            return Err(format!("expected a cold start: {stats}"));
        }
        cold.push(took);
        wait_saved(port)?;
        if i == 0 {
            warmup_stats = stats;
            ok(
                podman.try_run(&["stop", "--time", "10", &name]),
                "podman stop",
            )?;
            ok(
                podman.try_run(&["commit", "--quiet", &name, WARM]),
                "podman commit",
            )?;
        }
        remove(&podman, &name)?;
    }
    for i in 0..runs {
        let name = format!("warm-{i}");
        let (took, stats) = start(&podman, WARM, &name, port)?;
        if stats["started"] != "restored" || stats["terms"] != warmup_stats["terms"] {
            return Err(format!("expected the warm-up's index, restored: {stats}"));
        }
        warm.push(took);
        let logs = podman.try_run(&["logs", &name]);
        if let Some(us) = String::from_utf8_lossy(&logs.stderr)
            .lines()
            .find(|l| l.contains("restored image"))
            .and_then(|l| l.rsplit_once(" in "))
            .and_then(|(_, t)| crate::warm::parse_duration_us(t))
        {
            inside.push_us(us);
        }
        remove(&podman, &name)?;
    }
    // podman's own share: a container of the same image that runs `crac --version`.
    let mut floor = Samples::new();
    for _ in 0..runs {
        let mut args = vec!["run", "--rm", "--entrypoint", "/usr/local/bin/crac"];
        args.extend(WARM_RUN_OPTIONS);
        args.extend([COLD, "--version"]);
        let started = Instant::now();
        ok(podman.try_run(&args), "podman run crac --version")?;
        floor.push(started.elapsed());
    }

    report.line(&format!(
        "Method: scripts/container-image.sh builds {COLD} (release build, default document \
         count), podman 4 with runc, `--privileged --network host`; time from spawning \
         `podman run -d` to the first reply to STATS (polled every 2 ms). Cold: the image as \
         built (each container then checkpoints itself; the first is committed as {WARM}). \
         Restored: {WARM}. The warm-up's index: {} terms, {} documents.",
        warmup_stats["terms"], warmup_stats["docs"]
    ));
    report.table(
        &["container", "runs", "median", "min", "max"],
        &[
            cold.runs_row("cold"),
            warm.runs_row("restored"),
            inside.runs_row("  of which crac run's restore inside"),
            floor.runs_row("`podman run --rm` of `crac --version` (podman's share)"),
        ],
    );
    report.line(&format!(
        "Restored / cold in a container: {:.2}% (speed-up {:.0}x); without podman's own \
         share (a container that does nothing: {}), {:.2}%.",
        warm.median() / cold.median() * 100.0,
        cold.median() / warm.median(),
        fmt_us(floor.median()),
        (warm.median() - floor.median()).max(0.0) / (cold.median() - floor.median()) * 100.0
    ));
    Ok(())
}
