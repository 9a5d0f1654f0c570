//! Item 1: the coordination cost of one CRIU event.
//!
//! crac-action is run as CRIU runs it (CRTOOLS_SCRIPT_ACTION, CRTOOLS_INIT_PID, stdin
//! /dev/null, output to a log file) against a target with 10 no-op resources: pre-dump, then
//! post-resume to end the cycle. In the same rounds, interleaved so that noise hits all alike:
//! (a) the floor, spawn + wait of /bin/true, and (b) the Java `checkpointer` approach, a
//! `#!/bin/sh` action script that sends one byte with socat to a minimal Unix socket server (a
//! thread here that accepts, reads one byte and closes). Also measured, to see where the time
//! goes: crac-action --version (the exec of our binary), pre-dump against a process with no
//! agent (exec + the walk of the tree in /proc), and the agent round trips without any exec
//! (crac_protocol::client from this process).
//!
//! The same pre-dump and post-resume also run against a target in namespaces of its own (pid
//! 1 of a pid namespace, its agent folder on a tmpfs of a mount namespace of its own, as in a
//! container), in the same rounds: what reaching an agent across namespaces costs.
//!
//! This process stands in for CRIU (`CRTOOLS_IMAGE_DIR=/proc/<this pid>/fd/0`). pre-dump
//! leaves a watcher (`crac-watcher`) waiting for its "CRIU" to exit; it is killed after each
//! pre-dump and post-resume pair, outside the timed region.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crac_protocol::client;
use crac_protocol::wire::{Reason, Request};

use crate::procs::{self, Proc, Res};
use crate::stats::{fmt_ratio, fmt_us, time, verdict, Report, Samples};
use crate::Ctx;

const RESOURCES: usize = 10;

struct Baseline {
    script: std::path::PathBuf,
    socket: std::path::PathBuf,
    tool: String,
    received: Arc<AtomicU64>,
}

/// The `checkpointer`-style action script and its socket server.
fn baseline(dir: &Path) -> Res<Baseline> {
    let socket = dir.join("checkpointer.sock");
    let _ = fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).map_err(|e| format!("bind {}: {e}", socket.display()))?;
    let received = Arc::new(AtomicU64::new(0));
    {
        let received = Arc::clone(&received);
        std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let mut byte = [0u8; 1];
                    if matches!(stream.read(&mut byte), Ok(1)) {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    // Closing tells the client that the event was taken.
                }
            })
            .map_err(|e| format!("server thread: {e}"))?;
    }
    let (tool, send) = if which("socat") {
        (
            "socat",
            "printf x | socat - UNIX-CONNECT:\"$CHECKPOINTER_SOCKET\"",
        )
    } else if which("nc") {
        ("nc -U", "printf x | nc -U -N \"$CHECKPOINTER_SOCKET\"")
    } else {
        return Err(
            "neither socat nor nc found: apt-get install -y socat (scripts/bench.sh does)".into(),
        );
    };
    let script = dir.join("checkpointer-action.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             # The approach of the Java `checkpointer` project: the action script tells the\n\
             # process about the event with one byte on a Unix socket.\n\
             case \"$CRTOOLS_SCRIPT_ACTION\" in\n\
             pre-dump|post-resume) {send} ;;\n\
             esac\n"
        ),
    )
    .map_err(|e| format!("{}: {e}", script.display()))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", script.display()))?;
    Ok(Baseline {
        script,
        socket,
        tool: tool.to_owned(),
        received,
    })
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// An action-script invocation as CRIU makes it: the step and the root PID in the
/// environment, stdin /dev/null, stdout and stderr in the log.
fn action(program: &Path, step: &str, pid: u32, log: &File, cwd: &Path) -> Res<Command> {
    let mut cmd = Command::new(program);
    cmd.env("CRTOOLS_SCRIPT_ACTION", step)
        .env("CRTOOLS_INIT_PID", pid.to_string())
        .env(
            "CRTOOLS_IMAGE_DIR",
            format!("/proc/{}/fd/0", std::process::id()),
        )
        .current_dir(cwd)
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log.try_clone().map_err(|e| e.to_string())?);
    Ok(cmd)
}

fn ok(what: &str, run: Res<(std::process::ExitStatus, Duration)>) -> Res<Duration> {
    let (status, took) = run?;
    if !status.success() {
        return Err(format!("{what} failed ({status}); see the log"));
    }
    Ok(took)
}

/// Waits (untimed) until pre-dump's watcher has started and is asleep (waiting for its
/// "CRIU"), so that its start-up does not compete with the next timed run on this 2-core
/// machine. It busy-waits: a sleep here would let the CPU idle, and on a VM the next exec
/// after an idle period runs slower, which would bias the run that follows.
fn settle_watcher() {
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        let watchers = procs::our_watchers();
        if !watchers.is_empty()
            && watchers
                .iter()
                .all(|&pid| crac_action::tree::state_of(pid) == Some('S'))
        {
            return;
        }
        std::thread::yield_now();
    }
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let iterations = if ctx.quick { 40 } else { 200 };
    let warmup = 5;
    report.section("1. Coordination cost of one CRIU event");
    let dir = ctx.scratch.join("coord");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let log_path = dir.join("action.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| e.to_string())?;

    let names: Vec<String> = (0..RESOURCES).map(|i| format!("r{i}")).collect();
    let mut bench = Command::new(&ctx.bins.bench_target);
    bench
        .arg("--dir")
        .arg(dir.join("target"))
        .arg("--resources")
        .arg(RESOURCES.to_string());
    let target = Proc::start(
        bench,
        &dir.join("target/ready"),
        &dir.join("target.stderr"),
        Duration::from_secs(10),
    )?;
    // crac-test-target's resources log each hook to a file (not quite no-ops), and its
    // heartbeat holds a critical section every 20 ms: shown for comparison.
    let mut test = Command::new(&ctx.bins.test_target);
    test.env("CRAC_TEST_DIR", dir.join("test-target"))
        .env("CRAC_TEST_RESOURCES", names.join(","));
    let test_target = Proc::start(
        test,
        &dir.join("test-target/ready"),
        &dir.join("test-target.stderr"),
        Duration::from_secs(10),
    )?;
    let mut quiet = Command::new(&ctx.bins.bench_target);
    quiet
        .arg("--dir")
        .arg(dir.join("no-agent"))
        .arg("--no-agent");
    let no_agent = Proc::start(
        quiet,
        &dir.join("no-agent/ready"),
        &dir.join("no-agent.stderr"),
        Duration::from_secs(10),
    )?;
    // The same target, as a container's pid 1: its own pid and mount namespaces, its agent
    // folder (/run/crac/1, root's agents' base) on a tmpfs only it sees. --kill-child: it dies
    // with unshare.
    let mut contained = Command::new("unshare");
    contained
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mkdir -p -m 0700 /run/crac && mount -t tmpfs -o mode=0700 tmpfs /run/crac && exec setsid \"$@\"",
            "sh",
        ])
        .arg(&ctx.bins.bench_target)
        .arg("--dir")
        .arg(dir.join("ns-target"))
        .arg("--resources")
        .arg(RESOURCES.to_string());
    let unshare = Proc::start(
        contained,
        &dir.join("ns-target/ready"),
        &dir.join("ns-target.stderr"),
        Duration::from_secs(10),
    )?;
    let ns_target = fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.pid))
        .ok()
        .and_then(|kids| kids.split_whitespace().next()?.parse::<u32>().ok())
        .ok_or("the namespaced target has no pid")?;
    let base = baseline(&dir)?;

    let mut floor = Samples::new();
    let mut version = Samples::new();
    let mut scan = Samples::new();
    let mut checkpointer = Samples::new();
    let mut pre = Samples::new();
    let mut post = Samples::new();
    let mut test_pre = Samples::new();
    let mut test_post = Samples::new();
    let mut ns_pre = Samples::new();
    let mut ns_post = Samples::new();
    let mut rt_before = Samples::new();
    let mut rt_after = Samples::new();
    let mut rt_status = Samples::new();
    // Another build of crac-action to compare (--alt-action): its --version, pre-dump and
    // post-resume.
    let mut alt: [Samples; 3] = Default::default();
    let mut watchers = 0;
    report.note(&format!(
        "{iterations} rounds (+{warmup} warm-up), target pid {}, {} processes on the machine",
        target.pid,
        procs::all_pids().len()
    ));
    let crac_action = &ctx.bins.crac_action;
    for round in 0..warmup + iterations {
        let keep = round >= warmup;
        let record = |s: &mut Samples, d: Duration| {
            if keep {
                s.push(d)
            }
        };
        let d = ok(
            "/bin/true",
            procs::run_timed(
                Command::new("/bin/true")
                    .stdout(log.try_clone().map_err(|e| e.to_string())?)
                    .stderr(log.try_clone().map_err(|e| e.to_string())?),
            ),
        )?;
        record(&mut floor, d);
        let d = ok(
            "crac-action --version",
            procs::run_timed(
                Command::new(crac_action)
                    .arg("--version")
                    .stdout(log.try_clone().map_err(|e| e.to_string())?)
                    .stderr(log.try_clone().map_err(|e| e.to_string())?),
            ),
        )?;
        record(&mut version, d);
        let d = ok(
            "checkpointer script",
            procs::run_timed(
                action(&base.script, "pre-dump", target.pid, &log, &dir)?
                    .env("CHECKPOINTER_SOCKET", &base.socket),
            ),
        )?;
        record(&mut checkpointer, d);
        let d = ok(
            "crac-action pre-dump (no agent)",
            procs::run_timed(&mut action(
                crac_action,
                "pre-dump",
                no_agent.pid,
                &log,
                &dir,
            )?),
        )?;
        record(&mut scan, d);

        let d = ok(
            "crac-action pre-dump",
            procs::run_timed(&mut action(
                crac_action,
                "pre-dump",
                target.pid,
                &log,
                &dir,
            )?),
        )?;
        record(&mut pre, d);
        settle_watcher();
        let d = ok(
            "crac-action post-resume",
            procs::run_timed(&mut action(
                crac_action,
                "post-resume",
                target.pid,
                &log,
                &dir,
            )?),
        )?;
        record(&mut post, d);
        watchers += procs::kill_watchers();

        if let Some(alt_action) = &ctx.alt_action {
            let d = ok(
                "alternative crac-action --version",
                procs::run_timed(
                    Command::new(alt_action)
                        .arg("--version")
                        .stdout(log.try_clone().map_err(|e| e.to_string())?)
                        .stderr(log.try_clone().map_err(|e| e.to_string())?),
                ),
            )?;
            record(&mut alt[0], d);
            let d = ok(
                "alternative crac-action pre-dump",
                procs::run_timed(&mut action(alt_action, "pre-dump", target.pid, &log, &dir)?),
            )?;
            record(&mut alt[1], d);
            settle_watcher();
            let d = ok(
                "alternative crac-action post-resume",
                procs::run_timed(&mut action(
                    alt_action,
                    "post-resume",
                    target.pid,
                    &log,
                    &dir,
                )?),
            )?;
            record(&mut alt[2], d);
            watchers += procs::kill_watchers();
        }

        let d = ok(
            "crac-action pre-dump (crac-test-target)",
            procs::run_timed(&mut action(
                crac_action,
                "pre-dump",
                test_target.pid,
                &log,
                &dir,
            )?),
        )?;
        record(&mut test_pre, d);
        settle_watcher();
        let d = ok(
            "crac-action post-resume (crac-test-target)",
            procs::run_timed(&mut action(
                crac_action,
                "post-resume",
                test_target.pid,
                &log,
                &dir,
            )?),
        )?;
        record(&mut test_post, d);
        watchers += procs::kill_watchers();

        let d = ok(
            "crac-action pre-dump (namespaced)",
            procs::run_timed(&mut action(crac_action, "pre-dump", ns_target, &log, &dir)?),
        )?;
        record(&mut ns_pre, d);
        settle_watcher();
        let d = ok(
            "crac-action post-resume (namespaced)",
            procs::run_timed(&mut action(
                crac_action,
                "post-resume",
                ns_target,
                &log,
                &dir,
            )?),
        )?;
        record(&mut ns_post, d);
        watchers += procs::kill_watchers();

        // The same two requests with no process started: the agent's own share; and a
        // status request, which runs no hook.
        let limit = Duration::from_secs(30);
        let (reply, d) = time(|| client::request(target.pid, &Request::status(), limit));
        reply.map_err(|e| format!("status from crac-bench: {e}"))?;
        record(&mut rt_status, d);
        let (reply, d) = time(|| {
            client::request(
                target.pid,
                &Request::before_checkpoint(format!("bench-{round}")),
                limit,
            )
        });
        let reply = reply.map_err(|e| format!("before-checkpoint from crac-bench: {e}"))?;
        if !reply.ok {
            return Err(format!("before-checkpoint refused: {:?}", reply.error));
        }
        record(&mut rt_before, d);
        let (reply, d) = time(|| {
            client::request(
                target.pid,
                &Request::after_restore(Reason::Restored, Some(format!("bench-{round}"))),
                limit,
            )
        });
        let reply = reply.map_err(|e| format!("after-restore from crac-bench: {e}"))?;
        if !reply.ok {
            return Err(format!("after-restore refused: {:?}", reply.error));
        }
        record(&mut rt_after, d);
    }

    // Every cycle really ran the hooks: the generation counts them (two per round, three
    // with an alternative crac-action).
    let status = client::request(target.pid, &Request::status(), Duration::from_secs(5))
        .map_err(|e| format!("status: {e}"))?;
    let rounds = (warmup + iterations) as u64;
    let cycles = if ctx.alt_action.is_some() { 3 } else { 2 } * rounds;
    if status.generation != cycles || status.resources.len() != RESOURCES {
        return Err(format!(
            "the target's generation is {} with {} resources; expected {} with {RESOURCES}",
            status.generation,
            status.resources.len(),
            cycles
        ));
    }
    let received = base.received.load(Ordering::Relaxed);
    if received != rounds {
        return Err(format!(
            "the checkpointer server got {received} bytes in {rounds} rounds ({} failed?)",
            base.tool
        ));
    }
    let action_log = fs::read_to_string(&log_path).unwrap_or_default();
    let sample_line = action_log
        .lines()
        .find(|l| l.contains("pre-dump: pid") && l.contains("before_checkpoint ok"))
        .unwrap_or("")
        .to_owned();
    let ns_cycles = action_log
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "pre-dump: pid {ns_target}: before_checkpoint ok, {RESOURCES} hooks"
            ))
        })
        .count();
    if ns_cycles != rounds as usize {
        return Err(format!(
            "the namespaced target ran its hooks in {ns_cycles} of {rounds} pre-dumps"
        ));
    }
    drop(target);
    drop(test_target);
    drop(no_agent);
    drop(unshare);

    report.line(&format!(
        "Method: {iterations} rounds after {warmup} warm-up rounds; in each round every variant \
         runs once, in turn (spawn + wait, timed from this process; stdin /dev/null, output to \
         a log file, as CRIU runs action scripts); after each pre-dump, an untimed busy wait \
         until its watcher sleeps. Target: crac-bench-target with {RESOURCES} no-op \
         resources. {} processes on the machine (pre-dump and post-resume walk the tree in /proc). \
         Watchers killed after each round, untimed: {watchers}.",
        procs::all_pids().len()
    ));
    let row = |name: &str, s: &Samples| {
        vec![
            name.to_owned(),
            fmt_us(s.median()),
            fmt_us(s.p90()),
            fmt_us(s.min()),
            fmt_ratio(s.median() / floor.median()),
            fmt_ratio(s.median() / checkpointer.median()),
        ]
    };
    let mut rows = vec![
        row("(a) floor: /bin/true", &floor),
        row(
            &format!("(b) checkpointer: sh + {}", base.tool),
            &checkpointer,
        ),
        row("crac-action pre-dump", &pre),
        row("crac-action post-resume", &post),
        row("  crac-action --version (exec only)", &version),
        row("  crac-action pre-dump, no agent (exec + tree walk)", &scan),
        row("  agent round trip before-checkpoint (no exec)", &rt_before),
        row("  agent round trip after-restore (no exec)", &rt_after),
        row("  agent round trip status, no hooks (no exec)", &rt_status),
        row("  pre-dump, crac-test-target (logging hooks)", &test_pre),
        row(
            "  post-resume, crac-test-target (logging hooks)",
            &test_post,
        ),
        row(
            "  pre-dump, the same target in its own pid + mount namespaces",
            &ns_pre,
        ),
        row(
            "  post-resume, the same target in its own pid + mount namespaces",
            &ns_post,
        ),
    ];
    if let Some(alt_action) = &ctx.alt_action {
        let name = alt_action.display();
        rows.push(row(&format!("  alternative {name} --version"), &alt[0]));
        rows.push(row(&format!("  alternative {name} pre-dump"), &alt[1]));
        rows.push(row(&format!("  alternative {name} post-resume"), &alt[2]));
    }
    report.table(
        &[
            "run",
            "median",
            "p90",
            "min",
            "/ floor (a)",
            "/ checkpointer (b)",
        ],
        &rows,
    );
    let watcher_cost = pre.median() - post.median();
    report.line(&format!(
        "Where pre-dump's time goes (medians): exec of crac-action {} (floor {}), + tree walk \
         and no-agent path {}, + before-checkpoint round trip with {RESOURCES} hooks {}, + the \
         watcher's start ≈ pre-dump − post-resume = {}; agent round trips measured from this \
         process: a status request (no hooks) {}, after-restore {}.",
        fmt_us(version.median()),
        fmt_us(floor.median()),
        fmt_us(scan.median() - version.median()),
        fmt_us(rt_before.median()),
        fmt_us(watcher_cost),
        fmt_us(rt_status.median()),
        fmt_us(rt_after.median()),
    ));
    if !sample_line.is_empty() {
        report.line(&format!("A pre-dump log line: `{sample_line}`"));
    }
    for (name, ns, host) in [
        ("pre-dump", &ns_pre, &pre),
        ("post-resume", &ns_post, &post),
    ] {
        let ratio = ns.median() / host.median();
        report.line(&format!(
            "{name} against the target in its own pid + mount namespaces (found as pid 1 in its \
             own root): {} = {} the same target on the host (target <= 1.2x: {})",
            fmt_us(ns.median()),
            fmt_ratio(ratio),
            verdict(ratio <= 1.2),
        ));
        report.verdict(
            &format!("1. crac-action {name}, namespaced / host"),
            "<= 1.2x",
            Some(ratio <= 1.2),
        );
    }
    for (name, s) in [("pre-dump", &pre), ("post-resume", &post)] {
        let floor_ratio = s.median() / floor.median();
        let cp_ratio = s.median() / checkpointer.median();
        report.line(&format!(
            "{name}: {} = {} the floor (target <= 2x: {}), {} the checkpointer script (target <= 0.25x: {})",
            fmt_us(s.median()),
            fmt_ratio(floor_ratio),
            verdict(floor_ratio <= 2.0),
            fmt_ratio(cp_ratio),
            verdict(cp_ratio <= 0.25),
        ));
        report.verdict(
            &format!("1. crac-action {name} / floor"),
            "<= 2x",
            Some(floor_ratio <= 2.0),
        );
        report.verdict(
            &format!("1. crac-action {name} / checkpointer script"),
            "<= 0.25x",
            Some(cp_ratio <= 0.25),
        );
    }
    Ok(())
}
