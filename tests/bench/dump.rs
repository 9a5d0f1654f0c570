//! Item 3: what we add to a checkpoint, and dump/restore time against resident memory size.
//!
//! A. `crac checkpoint PID --name bench --replace` (into a store in the scratch folder)
//!    against a plain `criu dump -t PID -D DIR` with no action script, of the same kind of
//!    process (crac-bench-target with 10 no-op resources and its agent), a fresh one for each
//!    dump; the two kinds alternate, and the medians and the median of paired differences are
//!    reported, with CRIU's own figures from each image's `stats-dump`.
//! B. `criu dump` and `criu restore -d`, both with `--action-script crac-action`, of a target
//!    that has touched 64 MiB, 256 MiB, 1 GiB; the restored process is dumped again in the next
//!    round. Reported as MB/s (10^6 bytes/s) next to this machine's memory copy speed, measured
//!    here in the same run.
//! C. `crac checkpoint --leave-running --tcp-established` of a service holding a TCP listener
//!    and 100 idle client connections, against the same service holding none, in alternation.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::procs::{self, Proc, Res};
use crate::stats::{fmt_us, time, verdict, Report, Samples};
use crate::Ctx;

const RESOURCES: usize = 10;
const MIB: f64 = 1048576.0;

/// CRIU's timing figures for one dump or restore (its `stats-dump`/`stats-restore` image).
#[derive(Clone, Copy, Debug, Default)]
struct CriuStats {
    /// Dump: freezing_time, frozen_time, memdump_time, memwrite_time (µs), pages_written.
    /// Restore: forking_time, restore_time (µs), pages_restored.
    fields: [u64; 16],
}

impl CriuStats {
    fn get(&self, field: usize) -> u64 {
        self.fields.get(field).copied().unwrap_or(0)
    }
}

/// Reads a CRIU stats image: two magics, a u32 size, a StatsEntry whose field 1 (dump) or 2
/// (restore) holds the figures as varints.
fn read_stats(path: &Path) -> Option<CriuStats> {
    let raw = fs::read(path).ok()?;
    let size = u32::from_le_bytes(raw.get(8..12)?.try_into().ok()?) as usize;
    let entry = raw.get(12..12 + size)?;
    let (tag, rest) = varint(entry)?;
    if tag & 7 != 2 {
        return None;
    }
    let (len, mut rest) = varint(rest)?;
    rest = rest.get(..len as usize)?;
    let mut stats = CriuStats::default();
    while !rest.is_empty() {
        let (key, r) = varint(rest)?;
        if key & 7 != 0 {
            return None;
        }
        let (value, r) = varint(r)?;
        if let Some(slot) = stats.fields.get_mut((key >> 3) as usize) {
            *slot = value;
        }
        rest = r;
    }
    Some(stats)
}

/// CRIU's restore_time (µs) from a `stats-restore` image.
pub(crate) fn read_restore_time(path: &Path) -> Option<u64> {
    read_stats(path).map(|s| s.get(4))
}

fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

fn target(ctx: &Ctx, dir: &Path, name: &str, mib: usize) -> Res<Proc> {
    let mut cmd = Command::new(&ctx.bins.bench_target);
    cmd.arg("--dir")
        .arg(dir.join(name))
        .arg("--resources")
        .arg(RESOURCES.to_string())
        .arg("--mib")
        .arg(mib.to_string());
    Proc::start(
        cmd,
        &dir.join(name).join("ready"),
        &dir.join(format!("{name}.stderr")),
        Duration::from_secs(60),
    )
}

fn criu(ctx: &Ctx) -> Command {
    let mut cmd = Command::new(&ctx.bins.criu);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn run_ok(cmd: &mut Command, what: &str, log: &Path) -> Res<Duration> {
    let (status, took) = procs::run_timed(cmd)?;
    if !status.success() {
        let log = fs::read_to_string(log).unwrap_or_default();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
            .take(5)
            .collect();
        return Err(format!("{what} failed ({status}): {}", errors.join(" | ")));
    }
    Ok(took)
}

fn image_pages_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("3. What we add to a checkpoint");
    overhead(ctx, report)?;
    connections(ctx, report)?;
    throughput(ctx, report)
}

/// Idle client connections the service holds in part C.
const CONNECTIONS: usize = 100;

/// C: the cost of established connections in a dump.
fn connections(ctx: &Ctx, report: &mut Report) -> Res<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;

    let rounds = if ctx.quick { 5 } else { 15 };
    let dir = ctx.scratch.join("connections");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let start = |name: &str| -> Res<(Proc, u16)> {
        let mut cmd = Command::new(&ctx.bins.test_target);
        cmd.env("CRAC_TEST_DIR", dir.join(name))
            .env("CRAC_TEST_LISTEN", "0");
        let proc = Proc::start(
            cmd,
            &dir.join(name).join("ready"),
            &dir.join(format!("{name}.stderr")),
            Duration::from_secs(10),
        )?;
        let ports = fs::read_to_string(dir.join(name).join("ports")).map_err(|e| e.to_string())?;
        let port = ports
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or("no port")?;
        Ok((proc, port))
    };
    let (idle, _) = start("none")?;
    let (busy, port) = start("held")?;
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut stream =
            TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"HOLD\nping\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut echo = String::new();
        BufReader::new(&stream)
            .read_line(&mut echo)
            .map_err(|e| format!("echo: {e}"))?;
        if echo.trim_end() != "echo:ping" {
            return Err(format!("unexpected echo {echo:?}"));
        }
        clients.push(stream);
    }
    let (mut wall, mut dump, mut frozen) = (
        [Samples::new(), Samples::new()],
        [Samples::new(), Samples::new()],
        [Samples::new(), Samples::new()],
    );
    for round in 0..rounds + 1 {
        for turn in 0..2 {
            let k = (turn + round) % 2;
            let target = if k == 0 { &idle } else { &busy };
            let images = dir.join(format!("img-{round}-{k}"));
            let mut cmd = Command::new(&ctx.bins.crac);
            cmd.args([
                "checkpoint",
                &target.pid.to_string(),
                "--leave-running",
                "--tcp-established",
                "--json",
                "--dir",
            ])
            .arg(&images)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            let (output, took) = time(|| cmd.output());
            let output = output.map_err(|e| format!("crac: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "crac checkpoint --tcp-established failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            let json: serde_json::Value = serde_json::from_slice(&output.stdout)
                .map_err(|e| format!("crac checkpoint --json: {e}"))?;
            if round > 0 {
                wall[k].push(took);
                dump[k].push_us(
                    json["metadata"]["timings"]["dump_ms"]
                        .as_f64()
                        .unwrap_or(f64::NAN)
                        * 1e3,
                );
                if let Some(s) = read_stats(&images.join("stats-dump")) {
                    frozen[k].push_us(s.get(2) as f64);
                }
            }
            let _ = fs::remove_dir_all(&images);
            // The watcher tells the target "resumed"; the next dump waits for that (untimed).
            wait_idle(target.pid)?;
            procs::reap_zombies(&[]);
        }
    }
    // The connections still carry data after every dump.
    for stream in &mut clients {
        stream
            .write_all(b"pong\n")
            .map_err(|e| format!("send after the dumps: {e}"))?;
        let mut echo = String::new();
        BufReader::new(&*stream)
            .read_line(&mut echo)
            .map_err(|e| format!("echo after the dumps: {e}"))?;
        if echo.trim_end() != "echo:pong" {
            return Err(format!("after the dumps, unexpected echo {echo:?}"));
        }
    }
    drop(clients);
    drop(busy);
    drop(idle);

    report.line(&format!(
        "Method C: {rounds} rounds (after one warm-up round); in each, `crac checkpoint PID \
         --leave-running --tcp-established --dir DIR` of two crac-test-targets serving TCP \
         (CRAC_TEST_LISTEN), one holding {CONNECTIONS} idle client connections from this \
         process (each echoed a line before, and again after all the dumps), one holding none, \
         in alternating order. CRIU locks each connection (nftables) and dumps its state \
         (TCP repair)."
    ));
    let row = |name: &str, s: &Samples| vec![name.to_owned(), fmt_us(s.median()), fmt_us(s.p90())];
    report.table(
        &["run", "median", "p90"],
        &[
            row("crac checkpoint, no connections", &wall[0]),
            row(
                &format!("crac checkpoint, {CONNECTIONS} connections"),
                &wall[1],
            ),
            row("  criu dump (dump_ms), no connections", &dump[0]),
            row(
                &format!("  criu dump (dump_ms), {CONNECTIONS} connections"),
                &dump[1],
            ),
            row("  CRIU frozen time, no connections", &frozen[0]),
            row(
                &format!("  CRIU frozen time, {CONNECTIONS} connections"),
                &frozen[1],
            ),
        ],
    );
    report.line(&format!(
        "{CONNECTIONS} established connections: dump {} against {} with none ({}), {} per \
         connection; frozen {} against {}.",
        fmt_us(dump[1].median()),
        fmt_us(dump[0].median()),
        crate::stats::fmt_ratio(dump[1].median() / dump[0].median()),
        fmt_us((dump[1].median() - dump[0].median()) / CONNECTIONS as f64),
        fmt_us(frozen[1].median()),
        fmt_us(frozen[0].median()),
    ));
    Ok(())
}

/// Waits until the agent of `pid` has ended its cycle.
fn wait_idle(pid: u32) -> Res<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = crac_protocol::client::request(
            pid,
            &crac_protocol::wire::Request::status(),
            Duration::from_secs(5),
        )
        .map_err(|e| format!("status of pid {pid}: {e}"))?;
        if status.state == "idle" {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("pid {pid} still {} after 10 s", status.state));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What `crac checkpoint --sync` does to an image after CRIU wrote it, before publishing it:
/// every file and the folder flushed to disk (the default path does not flush). Returns the
/// time it took.
fn sync_tree(dir: &Path) -> Duration {
    let (_, took) = time(|| {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    if let Ok(file) = fs::File::open(entry.path()) {
                        let _ = file.sync_all();
                    }
                }
            }
        }
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    });
    took
}

const KINDS: [&str; 3] = ["plain", "action", "crac"];

fn overhead(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let rounds = if ctx.quick { 5 } else { 20 };
    let dir = ctx.scratch.join("dump");
    let store = dir.join("store");
    fs::create_dir_all(&store).map_err(|e| e.to_string())?;
    let mut wall: [Samples; 3] = Default::default();
    let mut frozen: [Samples; 3] = Default::default();
    let mut diff = Samples::new();
    // Paired per round: (criu dump with crac-action) − (plain), wall and frozen time.
    let (mut action_diff, mut frozen_diff) = (Samples::new(), Samples::new());
    let (mut version, mut hooks, mut criu_in_crac, mut crac_total, mut flush) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    let mut hash_ms = Samples::new();
    report.note(&format!(
        "{rounds} rounds of: plain criu dump, criu dump --action-script crac-action, crac checkpoint (rotating order)"
    ));
    for round in 0..rounds + 1 {
        let keep = round > 0; // the first round warms the caches
        procs::reap_zombies(&[]);
        let (_, d) = time(|| criu(ctx).arg("--version").status());
        if keep {
            version.push(d);
        }
        let mut took = [Duration::ZERO; 3];
        let mut frozen_us = [f64::NAN; 3];
        for turn in 0..KINDS.len() {
            let k = (turn + round) % KINDS.len();
            let kind = KINDS[k];
            let t = target(ctx, &dir, &format!("{kind}-{round}"), 0)?;
            let pid = t.pid;
            let images = dir.join(format!("{kind}-{round}-images"));
            nix::unistd::sync();
            let stats_file = if kind == "crac" {
                let mut cmd = Command::new(&ctx.bins.crac);
                cmd.arg("--store")
                    .arg(&store)
                    .args([
                        "checkpoint",
                        &pid.to_string(),
                        "--name",
                        "bench",
                        "--replace",
                        "--json",
                    ])
                    .stdin(Stdio::null())
                    .stderr(Stdio::piped())
                    .stdout(Stdio::piped());
                let (output, d) = time(|| cmd.output());
                took[k] = d;
                let output = output.map_err(|e| format!("crac: {e}"))?;
                if !output.status.success() {
                    return Err(format!(
                        "crac checkpoint failed ({}): {}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    ));
                }
                let json: serde_json::Value = serde_json::from_slice(&output.stdout)
                    .map_err(|e| format!("crac checkpoint --json: {e}"))?;
                let timing = |k: &str| json["metadata"]["timings"][k].as_f64().unwrap_or(f64::NAN);
                if keep {
                    hooks.push_us(timing("hooks_ms") * 1e3);
                    criu_in_crac.push_us(timing("dump_ms") * 1e3);
                    hash_ms.push_us(timing("hash_ms") * 1e3);
                    crac_total.push_us(timing("total_ms") * 1e3);
                }
                store.join("bench/stats-dump")
            } else {
                fs::create_dir_all(&images).map_err(|e| e.to_string())?;
                let mut cmd = criu(ctx);
                cmd.args(["dump", "-t", &pid.to_string(), "-D"])
                    .arg(&images)
                    .args(["-o", "dump.log"]);
                if kind == "action" {
                    cmd.arg("--action-script").arg(&ctx.bins.crac_action);
                }
                took[k] = run_ok(&mut cmd, "criu dump", &images.join("dump.log"))?;
                if kind == "plain" && keep {
                    flush.push(sync_tree(&images));
                }
                images.join("stats-dump")
            };
            if keep {
                wall[k].push(took[k]);
                if let Some(s) = read_stats(&stats_file) {
                    frozen[k].push_us(s.get(2) as f64);
                    frozen_us[k] = s.get(2) as f64;
                }
            }
            t.reap_dumped(Duration::from_secs(10))?;
            let _ = fs::remove_dir_all(crac_protocol::location::agent_dir(pid));
            let _ = fs::remove_dir_all(&images);
        }
        if keep {
            diff.push_us((took[2].as_secs_f64() - took[0].as_secs_f64()) * 1e6);
            action_diff.push_us((took[1].as_secs_f64() - took[0].as_secs_f64()) * 1e6);
            if frozen_us[0].is_finite() && frozen_us[1].is_finite() {
                frozen_diff.push_us(frozen_us[1] - frozen_us[0]);
            }
        }
    }
    procs::reap_zombies(&[]);
    let _ = fs::remove_dir_all(&store);

    report.line(&format!(
        "Method A: {rounds} rounds (after one warm-up round); in each, three fresh \
         crac-bench-targets ({RESOURCES} no-op resources, agent) are dumped, one each by plain \
         `criu dump -t PID -D DIR` (no action script), by `criu dump ... --action-script \
         crac-action`, and by `crac --store DIR checkpoint PID --name bench --replace --json`, \
         the order rotating from round to round; wall time of the command (`sync` before each, \
         untimed); CRIU's frozen time from each image's stats-dump; crac's own timings from its \
         JSON output. Images in {}.",
        dir.display()
    ));
    let [plain, action, crac] = &wall;
    let row = |name: &str, s: &Samples| vec![name.to_owned(), fmt_us(s.median()), fmt_us(s.p90())];
    report.table(
        &["run", "median", "p90"],
        &[
            row("plain criu dump", plain),
            row("criu dump --action-script crac-action", action),
            row("crac checkpoint", crac),
            row("crac checkpoint − plain criu dump, paired per round", &diff),
            row(
                "criu dump with crac-action − plain criu dump, paired per round",
                &action_diff,
            ),
            row(
                "  criu --version, uncached (how crac finds CRIU's version)",
                &version,
            ),
            row("  crac: hooks (pre-dump's agent requests)", &hooks),
            row("  crac: the criu dump it runs (dump_ms)", &criu_in_crac),
            row(
                "  crac: SHA-256 of the image files, executable and libraries, after the dump (hash_ms)",
                &hash_ms,
            ),
            row(
                "  crac: total_ms (find CRIU, staging, dump, metadata)",
                &crac_total,
            ),
            row(
                "  fsync of every image file + folder (what `--sync` would add)",
                &flush,
            ),
            row("  CRIU frozen time, plain", &frozen[0]),
            row("  CRIU frozen time, with crac-action", &frozen[1]),
            row("  CRIU frozen time, crac checkpoint", &frozen[2]),
        ],
    );
    let added = diff.median();
    let met = added < 5000.0;
    report.line(&format!(
        "Added by crac checkpoint: {} (median of paired differences; difference of medians {}). \
         Where it goes (medians): crac-action as CRIU's action script (pre-dump, post-dump, \
         hooks, watcher) = (criu with crac-action) − (plain), paired per round = {}, of which \
         {} while the tree is frozen (post-dump; paired difference of CRIU's frozen time); \
         crac's own work before and after the dump (finding CRIU, hashing, \
         staging, metadata) ≈ total_ms − dump_ms = {} (an uncached `criu --version` alone takes \
         {}; crac caches it); crac's process start and what follows total_ms (the store's \
         commit without fsync: atomic metadata, rename, removal of the replaced image; JSON \
         output) ≈ wall − total_ms = {} (an fsync of the image, which only `crac checkpoint \
         --sync` adds, would take {}). Target < 5 ms: {}.",
        fmt_us(added),
        fmt_us(crac.median() - plain.median()),
        fmt_us(action_diff.median()),
        fmt_us(frozen_diff.median()),
        fmt_us(crac_total.median() - criu_in_crac.median()),
        fmt_us(version.median()),
        fmt_us(crac.median() - crac_total.median()),
        fmt_us(flush.median()),
        verdict(met)
    ));
    report.verdict("3. added by crac checkpoint", "< 5 ms", Some(met));
    Ok(())
}

/// Memory copy speed of this machine (MB/s): a copy between two touched buffers, and the
/// first write of freshly allocated memory (page faults included, as a restore pays them).
fn memory_speed(quick: bool) -> (f64, f64) {
    let size = 256usize << 20;
    let reps = if quick { 3 } else { 7 };
    let src = vec![0x5au8; size];
    let mut dst = vec![0xa5u8; size];
    let mut copy = Samples::new();
    for _ in 0..reps {
        let (_, d) = time(|| dst.copy_from_slice(std::hint::black_box(&src)));
        copy.push(d);
        std::hint::black_box(&dst);
    }
    drop(dst);
    let mut fresh = Samples::new();
    for _ in 0..reps {
        let (v, d) = time(|| vec![0x5au8; size]);
        std::hint::black_box(&v);
        fresh.push(d);
    }
    let mbps = |us: f64| size as f64 / us; // bytes per µs = MB/s
    (mbps(copy.median()), mbps(fresh.median()))
}

/// The images filesystem's own speed for `bytes`, in MB/s: writing a file (into the page
/// cache, as CRIU's dump does), flushing it to disk (as `crac checkpoint`'s commit does), and
/// reading it back into fresh memory (as a restore does, page faults included).
fn file_speed(dir: &Path, bytes: u64) -> Res<(f64, f64, f64)> {
    use std::io::{Read, Write};
    let path = dir.join("file-speed");
    let chunk = vec![0x5au8; 4 << 20];
    nix::unistd::sync();
    let mut file = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (written, write) = time(|| -> std::io::Result<()> {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    written.map_err(|e| e.to_string())?;
    let (synced, flush) = time(|| file.sync_all());
    synced.map_err(|e| e.to_string())?;
    drop(file);
    let (read, read_time) = time(|| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; bytes as usize];
        fs::File::open(&path)?.read_exact(&mut buf)?;
        Ok(buf)
    });
    std::hint::black_box(read.map_err(|e| e.to_string())?);
    let _ = fs::remove_file(&path);
    let mbps = |d: Duration| bytes as f64 / (d.as_secs_f64() * 1e6);
    Ok((mbps(write), mbps(flush), mbps(read_time)))
}

fn throughput(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let dir = ctx.scratch.join("memory");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (copy_mbps, fresh_mbps) = memory_speed(ctx.quick);
    let sizes: [(usize, usize); 3] = if ctx.quick {
        [(64, 2), (256, 1), (1024, 1)]
    } else {
        [(64, 7), (256, 5), (1024, 3)]
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (mib, rounds) in sizes {
        let bytes = (mib as u64) << 20;
        let avail = procs::mem_available().unwrap_or(0);
        let free = procs::fs_info(&dir).map_or(0, |f| f.0);
        // The target and its restored copy never live together, but the page cache holds the
        // image too.
        if avail < 3 * bytes + (512 << 20) || free < 2 * bytes + (1 << 30) {
            notes.push(format!(
                "{mib} MiB skipped: {:.1} GiB memory available and {:.1} GiB disk free; needs {:.1} and {:.1}",
                avail as f64 / 1073741824.0,
                free as f64 / 1073741824.0,
                (3 * bytes + (512 << 20)) as f64 / 1073741824.0,
                (2 * bytes + (1 << 30)) as f64 / 1073741824.0
            ));
            continue;
        }
        report.note(&format!("{mib} MiB: {rounds} dump/restore rounds"));
        let (write_mbps, flush_mbps, read_mbps) = file_speed(&dir, bytes)?;
        let mut flush = Samples::new();
        let mut proc = target(ctx, &dir, &format!("mem-{mib}"), mib)?;
        let pid = proc.pid;
        let (mut dump, mut restore) = (Samples::new(), Samples::new());
        let (mut frozen, mut memdump, mut memwrite, mut restore_criu) = (
            Samples::new(),
            Samples::new(),
            Samples::new(),
            Samples::new(),
        );
        let mut pages_bytes = 0;
        let mut hash = Samples::new();
        let mut previous: Option<PathBuf> = None;
        for round in 0..rounds {
            let images = dir.join(format!("images-{mib}-{round}"));
            fs::create_dir_all(&images).map_err(|e| e.to_string())?;
            procs::reap_zombies(&[]);
            // Write back what the previous round left dirty, outside the timed region.
            nix::unistd::sync();
            let d = run_ok(
                criu(ctx)
                    .args(["dump", "-t", &pid.to_string(), "-D"])
                    .arg(&images)
                    .args(["-o", "dump.log", "--action-script"])
                    .arg(&ctx.bins.crac_action),
                "criu dump",
                &images.join("dump.log"),
            )?;
            dump.push(d);
            if let Some(s) = read_stats(&images.join("stats-dump")) {
                frozen.push_us(s.get(2) as f64);
                memdump.push_us(s.get(3) as f64);
                memwrite.push_us(s.get(4) as f64);
            }
            pages_bytes = image_pages_bytes(&images);
            // What `crac checkpoint` adds after CRIU exits: the SHA-256 of every image file.
            let mut files = crac_cli::metadata::list_image_files(&images)
                .map_err(|e| format!("{}: {e}", images.display()))?;
            let (hashed, d) = time(|| crac_cli::metadata::hash_files(&images, &mut files));
            hashed.map_err(|e| e.to_string())?;
            hash.push(d);
            proc.reap_dumped(Duration::from_secs(30))?;
            if let Some(old) = previous.take() {
                let _ = fs::remove_dir_all(old);
            }
            flush.push(sync_tree(&images));
            nix::unistd::sync();
            let d = run_ok(
                criu(ctx)
                    .args(["restore", "-d", "-D"])
                    .arg(&images)
                    .args(["-o", "restore.log", "--action-script"])
                    .arg(&ctx.bins.crac_action),
                "criu restore",
                &images.join("restore.log"),
            )?;
            restore.push(d);
            if let Some(s) = read_stats(&images.join("stats-restore")) {
                restore_criu.push_us(s.get(4) as f64);
            }
            proc = Proc::adopt(pid);
            let rss = procs::status_field(&format!("/proc/{pid}/status"), "VmRSS").unwrap_or(0);
            if rss * 1024 < bytes {
                return Err(format!(
                    "the restored pid {pid} has VmRSS {rss} kB, less than the {mib} MiB it touched"
                ));
            }
            previous = Some(images);
        }
        proc.kill();
        if let Some(old) = previous.take() {
            let _ = fs::remove_dir_all(old);
        }
        procs::reap_zombies(&[]);
        let mbps = |us: f64| bytes as f64 / us;
        rows.push(vec![
            format!("{mib} MiB"),
            format!("{:.0} MiB", pages_bytes as f64 / MIB),
            format!("{} ({} runs)", fmt_us(dump.median()), dump.len()),
            format!("{:.0} MB/s", mbps(dump.median())),
            format!(
                "{} / {} / {}",
                fmt_us(frozen.median()),
                fmt_us(memdump.median()),
                fmt_us(memwrite.median())
            ),
            fmt_us(restore.median()),
            format!("{:.0} MB/s", mbps(restore.median())),
            fmt_us(restore_criu.median()),
            format!("{:.2}", mbps(dump.median()) / copy_mbps),
            format!("{:.2}", mbps(restore.median()) / copy_mbps),
            format!("{write_mbps:.0} / {flush_mbps:.0} / {read_mbps:.0}"),
            fmt_us(flush.median()),
            format!(
                "{} ({:.0} MB/s)",
                fmt_us(hash.median()),
                mbps(hash.median())
            ),
        ]);
    }
    let fs_name = procs::fs_info(&dir).map(|f| f.1).unwrap_or_default();
    report.line(&format!(
        "Method B: crac-bench-target touching N MiB (every page written), {RESOURCES} no-op \
         resources and the agent; `criu dump -t PID -D DIR --action-script crac-action`, then \
         `criu restore -d` of that image (same action script), the restored process being \
         dumped in the next round; `sync` before each timed command (untimed). Images in {} \
         ({fs_name}); a restore reads them back from the page cache. MB/s = 10^6 bytes of \
         touched memory per second of the command's wall time. Memory copy on this machine, \
         same run: {copy_mbps:.0} MB/s (copy_from_slice between two touched 256 MiB buffers); \
         first write of fresh memory (page faults): {fresh_mbps:.0} MB/s. The filesystem's own \
         speed for the same size, same run: writing a file of that size (page cache), its \
         fsync, and reading it back into fresh memory; the fsync of each image (what \
         `crac checkpoint --sync` adds at that size; untimed for the dump and restore); and \
         the SHA-256 of every image file as `crac checkpoint` computes it after CRIU exited, \
         before the image is filed (crac_cli::metadata::hash_files, two threads; untimed for \
         the dump).",
        dir.display()
    ));
    report.table(
        &[
            "touched",
            "pages in image",
            "dump (median)",
            "dump MB/s",
            "CRIU frozen / memdump / memwrite",
            "restore (median)",
            "restore MB/s",
            "CRIU restore_time",
            "dump / memcpy",
            "restore / memcpy",
            "file write / fsync / read-back MB/s",
            "fsync of the image",
            "SHA-256 of the image (crac, after the dump)",
        ],
        &rows,
    );
    for note in notes {
        report.line(&note);
    }
    Ok(())
}
