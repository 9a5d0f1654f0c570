//! Item 16: live migration (`crac migrate`) between two hosts on this machine
//! (`scripts/hosts.sh`), stop-and-copy against post-copy, for the cache-server holding 64 MiB
//! and 1 GiB of touched memory that it keeps dirtying (every page once a second). A client in
//! its own namespace keeps one connection open and sends a request every 10 ms through the
//! move: the longest gap between its answers is the downtime clients saw. Besides: the freeze
//! to the destination's confirmation (crac's own figure), CRIU's dump, the whole migration, and
//! the bytes sent over the link.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::procs::Res;
use crate::stats::{fmt_ratio, fmt_us, Report};
use crate::Ctx;

const PREFIX: &str = "c22b";
const SERVICE: &str = "10.77.9.1";
const PORT: u16 = 7070;
const RECEIVER: &str = "10.77.0.2:7777";
const SIZES_MIB: [u64; 2] = [64, 1024];
const STRATEGIES: [&str; 2] = ["stop-and-copy", "post-copy"];

fn hosts_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("hosts.sh")
}

/// The hosts, torn down when dropped.
struct Hosts;

impl Hosts {
    fn up() -> Res<Hosts> {
        let out = Command::new(hosts_script())
            .args(["up", PREFIX])
            .output()
            .map_err(|e| format!("hosts.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "hosts.sh up: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Hosts)
    }

    fn command(&self, host: &str, program: &Path) -> Command {
        let mut cmd = Command::new(hosts_script());
        cmd.args(["exec", PREFIX, host])
            .arg(program)
            .stdin(Stdio::null());
        cmd
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new(hosts_script()).args(["down", PREFIX]).output();
    }
}

/// One migration's figures.
struct Run {
    gap: Duration,
    frozen_to_confirmed_ms: f64,
    dump_ms: f64,
    total_ms: f64,
    bytes: u64,
}

/// The client's session: a request every 10 ms, each answer's time kept.
struct Client {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Instant>>>,
    thread: std::thread::JoinHandle<Res<()>>,
}

impl Client {
    fn start() -> Res<Client> {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (Arc::clone(&stop), Arc::clone(&answers));
        let thread = std::thread::spawn(move || -> Res<()> {
            let ns =
                std::fs::File::open(format!("/run/netns/{PREFIX}-c")).map_err(|e| e.to_string())?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| e.to_string())?;
            let mut stream = TcpStream::connect((SERVICE, PORT)).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(120)))
                .map_err(|e| e.to_string())?;
            request(&mut stream, "SESSION")?;
            while !s.load(Ordering::SeqCst) {
                request(&mut stream, "GET a")?;
                a.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        Ok(Client {
            stop,
            answers,
            thread,
        })
    }

    /// Stops; the longest gap between answers.
    fn stop(self) -> Res<Duration> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| "the client panicked".to_owned())??;
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        Ok(answers
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default())
    }
}

fn request(stream: &mut TcpStream, line: &str) -> Res<String> {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send {line}: {e}"))?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream
            .read(&mut byte)
            .map_err(|e| format!("the answer to {line}: {e}"))?;
        if n == 0 {
            return Err(format!("the connection closed during {line}"));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&reply).into_owned());
        }
        reply.push(byte[0]);
    }
}

/// Waits until `path` holds `text`.
fn wait_for(path: &Path, text: &str, limit: Duration) -> Res<()> {
    let deadline = Instant::now() + limit;
    while !std::fs::read_to_string(path).is_ok_and(|l| l.contains(text)) {
        if Instant::now() > deadline {
            return Err(format!("{} never said {text:?}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn migrate_once(ctx: &Ctx, strategy: &str, mib: u64) -> Res<Run> {
    let dir = ctx.scratch.join(format!("migrate-{strategy}-{mib}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let key = dir.join("key");
    std::fs::write(&key, "k".repeat(44)).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    let hosts = Hosts::up()?;
    let file = |name: &str| std::fs::File::create(dir.join(name)).map_err(|e| e.to_string());
    let _upstream = Killed(
        hosts
            .command("c", &ctx.bins.upstream)
            .arg("7071")
            .env("UPSTREAM_ADDRESS", "10.77.3.1")
            .env("UPSTREAM_DELAY_MS", "1")
            .stdout(Stdio::null())
            .stderr(file("upstream.log")?)
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_for(
        &dir.join("upstream.log"),
        "listening",
        Duration::from_secs(10),
    )?;
    let mut server = hosts.command("a", &ctx.bins.cache_server);
    server
        .args([
            "--address",
            SERVICE,
            "--port",
            "7070",
            "--upstream",
            "10.77.3.1:7071",
        ])
        .args(["--ballast", &mib.to_string(), "--dirty"])
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("server.log"))
                .map_err(|e| e.to_string())?,
        );
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        server.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let server = server.spawn().map_err(|e| e.to_string())?;
    let pid = server.id();
    // Reaped when the dump has killed it (this process is its parent).
    let reaper = std::thread::spawn(move || {
        let mut server = server;
        let _ = server.wait();
    });
    wait_for(
        &dir.join("server.log"),
        "serving GET/STATS",
        Duration::from_secs(60),
    )?;
    let hook = format!("nsenter --net=/run/netns/{PREFIX}-c ip route replace \"$1\" via 10.77.2.2");
    let receiver = Killed(
        hosts
            .command("b", &ctx.bins.crac)
            .arg("--store")
            .arg(dir.join("store-b"))
            .args(["migrate", "--receive", "--listen", RECEIVER, "--key"])
            .arg(&key)
            .args(["--on-address", &hook])
            .stdout(Stdio::null())
            .stderr(file("receiver.log")?)
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_for(
        &dir.join("receiver.log"),
        "waiting for a migration",
        Duration::from_secs(10),
    )?;
    let client = Client::start()?;
    std::thread::sleep(Duration::from_millis(500));
    let out = hosts
        .command("a", &ctx.bins.crac)
        .arg("--store")
        .arg(dir.join("store-a"))
        .args(["migrate", &pid.to_string(), "--to", RECEIVER, "--key"])
        .arg(&key)
        .args([
            "--address",
            &format!("{SERVICE}/32"),
            "--tcp-established",
            "--strategy",
            strategy,
            "--json",
        ])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    let gap = client.stop()?;
    let _ = reaper.join();
    drop(receiver);
    if !out.status.success() {
        return Err(format!(
            "crac migrate --strategy {strategy} ({mib} MiB) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let outcome: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let number = |name: &str| outcome[name].as_f64().unwrap_or(0.0);
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Run {
        gap,
        frozen_to_confirmed_ms: number("downtime_ms"),
        dump_ms: number("dump_ms"),
        total_ms: number("total_ms"),
        bytes: number("bytes_sent") as u64,
    })
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("16. Live migration: stop-and-copy and post-copy, 64 MiB and 1 GiB");
    report.line(
        "The cache-server example, its memory touched and dirtied (every page once a second), moves from host A to host B (`scripts/hosts.sh`: network namespaces joined by a veth pair) with its address and a client's established connection (`--tcp-established`); the client, in a namespace of its own, sends a request every 10 ms on that connection. One migration per row (each takes the hosts up and down).",
    );
    let mut rows = Vec::new();
    let mut gaps = std::collections::BTreeMap::new();
    for strategy in STRATEGIES {
        for mib in SIZES_MIB {
            report.note(&format!("{strategy}, {mib} MiB"));
            let run = migrate_once(ctx, strategy, mib)?;
            gaps.insert((strategy, mib), run.gap.as_secs_f64() * 1e3);
            rows.push(vec![
                strategy.to_owned(),
                format!("{mib} MiB"),
                fmt_us(run.gap.as_secs_f64() * 1e6),
                fmt_us(run.frozen_to_confirmed_ms * 1e3),
                fmt_us(run.dump_ms * 1e3),
                fmt_us(run.total_ms * 1e3),
                format!("{:.1} MB", run.bytes as f64 / 1e6),
            ]);
        }
    }
    report.table(
        &[
            "strategy",
            "touched memory",
            "client downtime (longest gap)",
            "freeze to running at B",
            "crac's checkpoint (hooks + dump)",
            "total",
            "bytes sent",
        ],
        &rows,
    );
    let post_small = gaps[&("post-copy", 64)];
    let post_big = gaps[&("post-copy", 1024)];
    let stop_big = gaps[&("stop-and-copy", 1024)];
    let growth = post_big / post_small;
    let against = post_big / stop_big;
    report.line(&format!(
        "Post-copy's client downtime at 1 GiB / at 64 MiB: {}; at 1 GiB against stop-and-copy's: {}. Client gaps round up to TCP's retransmission timer (200 ms, then 400 ms): an outage shorter than that shows as about 200 ms.",
        fmt_ratio(growth),
        fmt_ratio(against)
    ));
    report.verdict(
        "16: post-copy's downtime at 1 GiB / at 64 MiB",
        "<= 1.5x",
        Some(growth <= 1.5),
    );
    report.verdict(
        "16: post-copy's downtime at 1 GiB / stop-and-copy's",
        "<= 0.25x",
        Some(against <= 0.25),
    );
    Ok(())
}
