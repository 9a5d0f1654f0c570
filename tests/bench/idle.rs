//! Item 5: the idle agent. crac-bench-target (no resources, no memory, main thread parked for
//! good) with and without the agent, started side by side: extra threads, extra resident
//! memory (and the agent thread's own stack), and the agent thread's context switches over an
//! idle period.

use std::fs;
use std::process::Command;
use std::time::Duration;

use crate::procs::{self, Proc, Res};
use crate::stats::{verdict, Report, Samples};
use crate::Ctx;

struct Sample {
    threads: u64,
    rss_kb: u64,
    anon_kb: u64,
    file_kb: u64,
}

fn sample(pid: u32) -> Res<Sample> {
    let path = format!("/proc/{pid}/status");
    let field =
        |key: &str| procs::status_field(&path, key).ok_or_else(|| format!("no {key} in {path}"));
    Ok(Sample {
        threads: field("Threads")?,
        rss_kb: field("VmRSS")?,
        anon_kb: field("RssAnon")?,
        file_kb: field("RssFile")?,
    })
}

/// The resident size (kB) and size of the mapping holding the stack pointer of a thread
/// blocked in a system call (/proc/PID/task/TID/syscall ends with "SP PC").
fn stack_of(pid: u32, tid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() < 3 {
        return None;
    }
    let sp = u64::from_str_radix(fields[fields.len() - 2].trim_start_matches("0x"), 16).ok()?;
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut inside = false;
    let mut size = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                inside = lo <= sp && sp < hi;
                size = (hi - lo) / 1024;
                continue;
            }
        }
        if inside {
            if let Some(rest) = line.strip_prefix("Rss:") {
                return Some((rest.split_whitespace().next()?.parse().ok()?, size));
            }
        }
    }
    None
}

/// Context switches (voluntary + non-voluntary) of every thread of `pid`, by TID.
fn switches(pid: u32) -> Vec<(u32, String, u64)> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|tid| {
            let (v, n) = procs::ctxt_switches(pid, tid)?;
            let comm = fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .unwrap_or_default()
                .trim_end()
                .to_owned();
            Some((tid, comm, v + n))
        })
        .collect()
}

fn delta(
    before: &[(u32, String, u64)],
    after: &[(u32, String, u64)],
    pred: impl Fn(&str) -> bool,
) -> u64 {
    after
        .iter()
        .filter(|(_, comm, _)| pred(comm))
        .map(|(tid, _, n)| {
            let was = before.iter().find(|(t, _, _)| t == tid).map_or(0, |b| b.2);
            n - was.min(*n)
        })
        .sum()
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let pairs = if ctx.quick { 2 } else { 5 };
    let idle = Duration::from_secs(ctx.idle_secs);
    report.section("5. The idle agent");
    let dir = ctx.scratch.join("idle");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let start = |name: String, agent: bool| -> Res<Proc> {
        let mut cmd = Command::new(&ctx.bins.bench_target);
        cmd.arg("--dir").arg(dir.join(&name));
        if !agent {
            cmd.arg("--no-agent");
        }
        Proc::start(
            cmd,
            &dir.join(&name).join("ready"),
            &dir.join(format!("{name}.stderr")),
            Duration::from_secs(10),
        )
    };
    let mut with = Vec::new();
    let mut without = Vec::new();
    for i in 0..pairs {
        with.push(start(format!("agent-{i}"), true)?);
        without.push(start(format!("plain-{i}"), false)?);
    }
    // Let start-up finish (the agent thread reaches accept()).
    std::thread::sleep(Duration::from_millis(300));
    let mut agent_tids = Vec::new();
    for p in &with {
        let tid = procs::thread_named(p.pid, "crac-agent")
            .ok_or_else(|| format!("pid {}: no thread named crac-agent", p.pid))?;
        agent_tids.push(tid);
    }
    let before_with: Vec<_> = with.iter().map(|p| switches(p.pid)).collect();
    let before_without: Vec<_> = without.iter().map(|p| switches(p.pid)).collect();
    report.note(&format!(
        "idle for {}s, {pairs} processes with and {pairs} without the agent",
        idle.as_secs()
    ));
    std::thread::sleep(idle);
    let after_with: Vec<_> = with.iter().map(|p| switches(p.pid)).collect();
    let after_without: Vec<_> = without.iter().map(|p| switches(p.pid)).collect();

    let mut threads_with = Vec::new();
    let mut threads_without = Vec::new();
    let (mut rss, mut anon, mut file) = (Samples::new(), Samples::new(), Samples::new());
    let mut stacks = Vec::new();
    let mut agent_wakeups = Vec::new();
    let mut other_wakeups_with = Vec::new();
    let mut wakeups_without = Vec::new();
    for i in 0..pairs {
        let a = sample(with[i].pid)?;
        let b = sample(without[i].pid)?;
        threads_with.push(a.threads);
        threads_without.push(b.threads);
        rss.push_us(a.rss_kb as f64 - b.rss_kb as f64);
        anon.push_us(a.anon_kb as f64 - b.anon_kb as f64);
        file.push_us(a.file_kb as f64 - b.file_kb as f64);
        stacks.push(stack_of(with[i].pid, agent_tids[i]));
        agent_wakeups.push(delta(&before_with[i], &after_with[i], |c| {
            c == "crac-agent"
        }));
        other_wakeups_with.push(delta(&before_with[i], &after_with[i], |c| {
            c != "crac-agent"
        }));
        wakeups_without.push(delta(&before_without[i], &after_without[i], |_| true));
    }
    drop(with);
    drop(without);

    let extra_threads: Vec<i64> = threads_with
        .iter()
        .zip(&threads_without)
        .map(|(a, b)| *a as i64 - *b as i64)
        .collect();
    let max_wakeups = agent_wakeups.iter().copied().max().unwrap_or(0);
    let stack_rss: Vec<String> = stacks
        .iter()
        .map(|s| match s {
            Some((rss, size)) => format!("{rss} kB of {size} kB"),
            None => "?".to_owned(),
        })
        .collect();
    report.line(&format!(
        "Method: {pairs} crac-bench-target processes with the agent and {pairs} without (no \
         resources, no heap to speak of, main thread parked), started side by side; 300 ms to \
         settle, then context switches of every thread (voluntary + non-voluntary, \
         /proc/PID/task/TID/status) over {} s of idle; Threads and VmRSS/RssAnon/RssFile from \
         /proc/PID/status; the agent thread's stack: the mapping holding its stack pointer \
         (/proc/PID/task/TID/syscall, /proc/PID/smaps).",
        idle.as_secs()
    ));
    let kb = |x: f64| format!("{x:.0} kB");
    report.table(
        &["figure", "value (median over pairs)", "each", "target"],
        &[
            vec![
                "extra threads".into(),
                format!("{}", median_i(&extra_threads)),
                format!("{extra_threads:?}"),
                "1".into(),
            ],
            vec![
                "extra VmRSS".into(),
                kb(rss.median()),
                String::new(),
                "< 1024 kB".into(),
            ],
            vec![
                "  of which RssAnon".into(),
                kb(anon.median()),
                String::new(),
                String::new(),
            ],
            vec![
                "  of which RssFile".into(),
                kb(file.median()),
                String::new(),
                String::new(),
            ],
            vec![
                "agent thread stack resident".into(),
                stack_rss.first().cloned().unwrap_or_default(),
                format!("{stack_rss:?}"),
                "(part of VmRSS)".into(),
            ],
            vec![
                format!("agent thread wake-ups in {} s", idle.as_secs()),
                format!("{max_wakeups} (max)"),
                format!("{agent_wakeups:?}"),
                "0".into(),
            ],
            vec![
                "other threads' wake-ups, with agent".into(),
                String::new(),
                format!("{other_wakeups_with:?}"),
                String::new(),
            ],
            vec![
                "all wake-ups, without agent".into(),
                String::new(),
                format!("{wakeups_without:?}"),
                String::new(),
            ],
        ],
    );
    let threads_ok = extra_threads.iter().all(|&t| t == 1);
    let rss_ok = rss.median() < 1024.0;
    let wake_ok = max_wakeups == 0;
    report.line(&format!(
        "Targets: one thread: {}; no wake-ups: {}; under 1 MiB: {}.",
        verdict(threads_ok),
        verdict(wake_ok),
        verdict(rss_ok)
    ));
    report.verdict("5. idle agent: extra threads", "1", Some(threads_ok));
    report.verdict(
        &format!("5. idle agent: wake-ups in {} s", idle.as_secs()),
        "0",
        Some(wake_ok),
    );
    report.verdict(
        "5. idle agent: extra resident memory",
        "< 1 MiB",
        Some(rss_ok),
    );
    Ok(())
}

fn median_i(v: &[i64]) -> i64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}
