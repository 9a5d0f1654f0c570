//! Item 15: capabilities, not privileges. The warm-start example in the image
//! scripts/container-image.sh makes, time from spawning the engine's `run -d` to the first
//! answer to `STATS`: restored with capabilities only against restored `--privileged` against
//! cold, under podman and Docker (20.10, private dockerd; its `--privileged` cannot run here:
//! root's bounding set lacks CAP_SYS_RESOURCE), and through a registry (a private
//! docker-registry on 127.0.0.1): `podman pull` plus the restored start against `podman pull`
//! plus the cold start, in another storage root with the image removed before each pull.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::container::{ok, stats};
use crate::line::free_port;
use crate::procs::Res;
use crate::stats::{Report, Samples};
use crate::Ctx;
use crac_test_support::docker::{self, Docker};
use crac_test_support::podman::{
    Podman, CAPABILITY_RUN_OPTIONS, WARM_RUN_OPTIONS, WARM_UP_OPTIONS,
};
use crac_test_support::registry::{self, Registry};

const START_LIMIT: Duration = Duration::from_secs(120);

/// An engine's command line: podman on its storage, or the private dockerd's client.
trait Engine {
    fn command(&self, args: &[&str]) -> Command;
}

impl Engine for Podman {
    fn command(&self, args: &[&str]) -> Command {
        Podman::command(self, args)
    }
}

impl Engine for Docker {
    fn command(&self, args: &[&str]) -> Command {
        Docker::command(self, args)
    }
}

fn run(engine: &dyn Engine, args: &[&str], what: &str) -> Res<Output> {
    let out = engine
        .command(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    ok(out, what)
}

/// Runs `run -d --name NAME OPTIONS IMAGE COMMAND` and waits for the first answer: how long
/// from the spawn, and what the service said.
fn first_answer(
    engine: &dyn Engine,
    options: &[&str],
    image: &str,
    command: &[&str],
    name: &str,
    port: u16,
) -> Res<(Duration, serde_json::Value)> {
    let mut args = vec!["run", "-d", "--name", name];
    args.extend(options);
    args.push(image);
    args.extend(command);
    let started = Instant::now();
    run(engine, &args, "run")?;
    loop {
        if let Some(stats) = stats(port) {
            return Ok((started.elapsed(), stats));
        }
        if started.elapsed() > START_LIMIT {
            let logs = engine.command(&["logs", name]).output();
            return Err(format!(
                "container {name} did not answer within {START_LIMIT:?}: {}",
                logs.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A warm-up container of `cold` with `options`: cold start, self-checkpoint, committed as
/// `warm`.
fn warm_up(
    engine: &dyn Engine,
    options: &[&str],
    cold: &str,
    command: &[&str],
    warm: &str,
    port: u16,
) -> Res<()> {
    let (_, stats0) = first_answer(engine, options, cold, command, "warmup", port)?;
    if stats0["started"] != "cold" {
        return Err(format!("expected a cold warm-up: {stats0}"));
    }
    let deadline = Instant::now() + START_LIMIT;
    loop {
        match stats(port) {
            Some(s) if s["image"] == "saved" => break,
            Some(s) if s["image"] == "failed" => {
                return Err(format!("the warm-up's self-checkpoint failed: {s}"))
            }
            _ if Instant::now() > deadline => return Err("no self-checkpoint".into()),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    run(engine, &["stop", "--time", "10", "warmup"], "stop")?;
    run(engine, &["commit", "warmup", warm], "commit")?;
    run(engine, &["rm", "warmup"], "rm").map(drop)
}

/// `runs` containers of `image` with `options`, each removed after its first answer, which
/// must say `started` = `expect`: the times to first answer, and crac run's own (its "restored
/// image ... in" or "started cold ... in" line).
fn starts(
    engine: &dyn Engine,
    options: &[&str],
    image: &str,
    command: &[&str],
    expect: &str,
    runs: usize,
    port: u16,
) -> Res<(Samples, Samples)> {
    let (mut samples, mut inside) = (Samples::new(), Samples::new());
    for i in 0..runs {
        let name = format!("c{i}");
        let (took, stats) = first_answer(engine, options, image, command, &name, port)?;
        if stats["started"] != expect {
            return Err(format!("{image}: expected {expect}: {stats}"));
        }
        samples.push(took);
        let logs = run(engine, &["logs", &name], "logs")?;
        if let Some(us) = String::from_utf8_lossy(&logs.stderr)
            .lines()
            .find(|l| {
                l.contains("crac run: restored image") || l.contains("crac run: started cold")
            })
            .and_then(|l| l.rsplit_once(" in "))
            .and_then(|(_, t)| crate::warm::parse_duration_us(t))
        {
            inside.push_us(us);
        }
        run(engine, &["rm", "--force", &name], "rm")?;
    }
    Ok((samples, inside))
}

/// scripts/container-image.sh with `extra` options and the service's `args`, for the engine
/// the variable `env` names.
fn build(ctx: &Ctx, tag: &str, extra: &[&str], args: &[&str], env: (&str, String)) -> Res<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/container-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(ctx.bins.crac.parent().ok_or("no folder for crac")?)
        .args(extra)
        .arg(tag)
        .arg("--")
        .arg(&ctx.bins.warm_start)
        .args(args)
        .env(env.0, env.1)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    ok(out, "scripts/container-image.sh").map(drop)
}

pub(crate) fn run_item(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("15. Capabilities, not privileges: restored with capabilities only, privileged, cold; through a registry");
    if let Some(missing) = docker::missing().or_else(registry::missing) {
        return Err(format!(
            "{missing}: scripts/bench.sh installs it (scripts/install-runtimes.sh)"
        ));
    }
    let runs = if ctx.quick { 2 } else { 5 };
    let port = free_port()?;
    let port_arg = port.to_string();
    let caps_warm_up: Vec<&str> = CAPABILITY_RUN_OPTIONS
        .iter()
        .chain(&WARM_UP_OPTIONS)
        .copied()
        .collect();

    // podman.
    let podman = Podman::new(&ctx.scratch.join("p15"), &ctx.bins.criu);
    let podman_env = (
        "PODMAN",
        format!("podman {}", podman.global_options().join(" ")),
    );
    build(
        ctx,
        "localhost/b15:cold",
        &["--name", "warm"],
        &["--port", &port_arg],
        podman_env,
    )?;
    report.note("podman: warm-ups with capabilities only and --privileged");
    warm_up(
        &podman,
        &caps_warm_up,
        "localhost/b15:cold",
        &[],
        "localhost/b15:caps",
        port,
    )?;
    warm_up(
        &podman,
        &WARM_RUN_OPTIONS,
        "localhost/b15:cold",
        &[],
        "localhost/b15:priv",
        port,
    )?;
    let (p_cold, _) = starts(
        &podman,
        &CAPABILITY_RUN_OPTIONS,
        "localhost/b15:cold",
        &[],
        "cold",
        runs,
        port,
    )?;
    let (p_caps, p_caps_in) = starts(
        &podman,
        &CAPABILITY_RUN_OPTIONS,
        "localhost/b15:caps",
        &[],
        "restored",
        runs,
        port,
    )?;
    let (p_priv, p_priv_in) = starts(
        &podman,
        &WARM_RUN_OPTIONS,
        "localhost/b15:priv",
        &[],
        "restored",
        runs,
        port,
    )?;

    // Through a registry, into another storage root.
    report.note("registry: push, then pull + start in another storage root");
    let registry = Registry::start(&ctx.scratch.join("r15"));
    let (cold_ref, warm_ref) = (
        format!("{}/b15:cold", registry.host()),
        format!("{}/b15:caps", registry.host()),
    );
    run(
        &podman,
        &[
            "push",
            "--quiet",
            "--tls-verify=false",
            "localhost/b15:cold",
            &cold_ref,
        ],
        "push",
    )?;
    run(
        &podman,
        &[
            "push",
            "--quiet",
            "--tls-verify=false",
            "localhost/b15:caps",
            &warm_ref,
        ],
        "push",
    )?;
    drop(podman);
    let elsewhere = Podman::new(&ctx.scratch.join("p15b"), &ctx.bins.criu);
    let pulled = |reference: &str, expect: &str| -> Res<Samples> {
        let mut samples = Samples::new();
        for i in 0..runs {
            let _ = elsewhere.try_run(&["rmi", "--all", "--force"]);
            let started = Instant::now();
            run(
                &elsewhere,
                &["pull", "--quiet", "--tls-verify=false", reference],
                "pull",
            )?;
            let name = format!("pulled-{i}");
            let (_, stats) = first_answer(
                &elsewhere,
                &CAPABILITY_RUN_OPTIONS,
                reference,
                &[],
                &name,
                port,
            )?;
            if stats["started"] != expect {
                return Err(format!("{reference}: expected {expect}: {stats}"));
            }
            samples.push(started.elapsed());
            run(&elsewhere, &["rm", "--force", &name], "rm")?;
        }
        Ok(samples)
    };
    let pull_cold = pulled(&cold_ref, "cold")?;
    let pull_warm = pulled(&warm_ref, "restored")?;
    drop(elsewhere);
    drop(registry);

    // Docker.
    report.note("Docker: a private dockerd, the Dockerfile's image, a warm-up with SYS_ADMIN");
    let config = ctx.scratch.join("criu15.conf");
    std::fs::write(
        &config,
        format!("action-script {}\n", ctx.bins.crac_action.display()),
    )
    .map_err(|e| format!("{}: {e}", config.display()))?;
    let dockerd = Docker::start(&ctx.scratch.join("d15"), &ctx.bins.criu, &config);
    let client = dockerd
        .command(&[])
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    build(
        ctx,
        "localhost/b15:cold",
        &["--docker"],
        &[],
        ("DOCKER", format!("{} {client}", docker::CLIENT)),
    )?;
    let command = ["/app/service", "--port", &port_arg];
    let d_warm_up: Vec<&str> = docker::CAPABILITY_RUN_OPTIONS
        .iter()
        .chain(&docker::WARM_UP_OPTIONS)
        .copied()
        .collect();
    warm_up(
        &dockerd,
        &d_warm_up,
        "localhost/b15:cold",
        &command,
        "localhost/b15:caps",
        port,
    )?;
    let (d_cold, _) = starts(
        &dockerd,
        &docker::CAPABILITY_RUN_OPTIONS,
        "localhost/b15:cold",
        &command,
        "cold",
        runs,
        port,
    )?;
    let (d_caps, d_caps_in) = starts(
        &dockerd,
        &docker::CAPABILITY_RUN_OPTIONS,
        "localhost/b15:caps",
        &[],
        "restored",
        runs,
        port,
    )?;
    drop(dockerd);

    report.line(
        "Method: the warm-start example (release build, default document count) in the image \
         scripts/container-image.sh makes (podman) or scripts/warm-start.Dockerfile builds \
         (Docker); time from spawning `run -d` to the first reply to STATS (polled every \
         2 ms). Capabilities only: podman `--cap-add CHECKPOINT_RESTORE`, Docker `--cap-add \
         SYS_ADMIN` (20.10 does not know CHECKPOINT_RESTORE), default seccomp, the warm-ups \
         with `seccomp=unconfined` as well; privileged: `--privileged` for both warm-up and \
         restore. Pull: `podman pull` from a private docker-registry on 127.0.0.1 into another \
         storage root, the image removed before each pull, then the start.",
    );
    report.table(
        &["container", "runs", "median", "min", "max"],
        &[
            p_cold.runs_row("podman, cold"),
            p_caps.runs_row("podman, restored, capabilities only"),
            p_caps_in.runs_row("  of which crac run's restore inside"),
            p_priv.runs_row("podman, restored, --privileged"),
            p_priv_in.runs_row("  of which crac run's restore inside"),
            d_cold.runs_row("Docker, cold"),
            d_caps.runs_row("Docker, restored, SYS_ADMIN only"),
            d_caps_in.runs_row("  of which crac run's restore inside"),
            pull_cold.runs_row("pull + cold start"),
            pull_warm.runs_row("pull + restored start"),
        ],
    );
    let ratio = |a: &Samples, b: &Samples| a.median() / b.median() * 100.0;
    report.line(&format!(
        "Capabilities only / privileged (podman): {:.0}%. Restored / cold: podman {:.2}%, \
         Docker {:.2}%. Pull + restored / pull + cold: {:.1}%.",
        ratio(&p_caps, &p_priv),
        ratio(&p_caps, &p_cold),
        ratio(&d_caps, &d_cold),
        ratio(&pull_warm, &pull_cold),
    ));
    report.verdict(
        "15. restored with capabilities only / --privileged (podman)",
        "<= 100%",
        Some(p_caps.median() <= p_priv.median()),
    );
    report.verdict(
        "15. restored / cold, podman, capabilities only, engine included",
        "< 5%",
        Some(ratio(&p_caps, &p_cold) < 5.0),
    );
    report.verdict(
        "15. restored / cold, Docker, SYS_ADMIN only, engine included",
        "< 5%",
        Some(ratio(&d_caps, &d_cold) < 5.0),
    );
    Ok(())
}
