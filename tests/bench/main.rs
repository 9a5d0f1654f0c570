//! `crac-bench`: the benchmarks of issue 4, each figure a median over repeated runs and each
//! claim a ratio against a baseline measured in the same run. Run it through
//! `scripts/bench.sh`, which provisions CRIU and socat and builds the workspace first.
//!
//! ```text
//! crac-bench [--quick] [--only 1,3] [--out FILE] [--idle-secs N] [--alt-action PATH]
//! ```
//!
//! Items: 1 coordination cost of one CRIU event (crac-action vs exec floor vs a
//! socat-based action script), 2 dispatch scaling (Coordinator::simulate), 3 what we add to a
//! checkpoint (crac checkpoint vs plain criu dump; dump/restore throughput vs memory size),
//! 4 warm start through `crac run`, 5 the idle agent, 6 soak (repeated checkpoints of the
//! cache server, killing and under load), 7 async services (async dispatch, request gating,
//! the PostgreSQL example's warm start), 8 preflight per descriptor count, 9 time to first
//! answer against memory (cold, eager and lazy restore), 10 warm start inside a container
//! image (podman), 11 archive throughput, plain against encrypted (age), 12 what the security
//! checks (issue 18) cost a checkpoint and a restore, 13 what clients see during an upgrade
//! (`crac upgrade`: handoff, state, against kill + start), 14 draining (the tower layer's cost
//! per request, and what clients see of a drained checkpoint), 15 capabilities, not privileges
//! (a container restored with capabilities only against `--privileged` and cold, podman and
//! Docker, and through a registry), 16 live migration between two hosts in namespaces
//! (stop-and-copy against post-copy, 64 MiB and 1 GiB), 17 what the files a service writes to
//! cost a checkpoint and a restore (issue 23). Needs root (CRIU) for all but 2 and 5.

mod archive;
mod asyncs;
mod capabilities;
mod container;
mod coord;
mod dispatch;
mod drain;
mod dump;
mod files;
mod idle;
mod kdat;
mod lazy;
mod line;
mod migrate;
mod preflight;
mod procs;
mod soak;
mod stats;
mod trust;
mod upgrade;
mod warm;

use std::path::PathBuf;
use std::process::ExitCode;

use procs::{Bins, Res};
use stats::Report;

const USAGE: &str = "\
usage: crac-bench [--quick] [--only LIST] [--out FILE] [--idle-secs N] [--alt-action PATH]
                  [--soak N]

  --quick         fewer repetitions (a smoke run; figures are noisier)
  --only LIST     items to run, e.g. 1 or 1,3,5 (default: all of 1-17)
  --out FILE      also write the results as a markdown section to FILE
  --idle-secs N   how long item 5 watches the idle agent (default 10; 3 with --quick)
  --alt-action P  item 1 also measures this other build of crac-action (e.g. a static one)
  --soak N        item 6's cycles of each kind (default 100; 10 with --quick)

items: 1 coordination cost of one CRIU event; 2 dispatch scaling; 3 what we add to a
checkpoint, and dump/restore throughput; 4 warm start through `crac run`; 5 the idle agent;
6 soak; 7 async services; 8 preflight; 9 time to first answer against memory;
10 warm start inside a container image (podman); 11 archive throughput, plain vs encrypted;
12 what the security checks cost; 13 what clients see during an upgrade; 14 draining: the
tower layer's cost, a drained checkpoint; 15 capabilities, not privileges (podman, Docker, a
registry); 16 live migration (stop-and-copy, post-copy); 17 files a service writes to,
recorded and checked.
Run as root (CRIU). scripts/bench.sh provisions CRIU and socat and builds everything first.";

/// What every item needs.
#[derive(Debug)]
pub struct Ctx {
    /// The binaries under measure.
    pub bins: Bins,
    /// Fewer repetitions (`--quick`).
    pub quick: bool,
    /// A scratch folder of this run (removed at the end).
    pub scratch: PathBuf,
    /// How long item 5 watches the idle agent.
    pub idle_secs: u64,
    /// Another crac-action build that item 1 measures beside this one (--alt-action).
    pub alt_action: Option<PathBuf>,
    /// Item 6's cycles of each kind.
    pub soak_cycles: usize,
}

/// The items there are.
const ITEMS: [u32; 17] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17];

struct Options {
    quick: bool,
    only: Vec<u32>,
    out: Option<PathBuf>,
    idle_secs: Option<u64>,
    alt_action: Option<PathBuf>,
    soak: Option<usize>,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        quick: false,
        only: ITEMS.to_vec(),
        out: None,
        idle_secs: None,
        alt_action: None,
        soak: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--only" => {
                opts.only = value()?
                    .split(',')
                    .map(|n| match n.trim().parse::<u32>() {
                        Ok(n) if ITEMS.contains(&n) => Ok(n),
                        _ => Err(format!(
                            "--only takes the item numbers {ITEMS:?}, got {n:?}"
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--out" => opts.out = Some(PathBuf::from(value()?)),
            "--alt-action" => opts.alt_action = Some(PathBuf::from(value()?)),
            "--soak" => {
                opts.soak = Some(
                    value()?
                        .parse()
                        .map_err(|_| "--soak takes a number of cycles".to_owned())?,
                )
            }
            "--idle-secs" => {
                opts.idle_secs = Some(
                    value()?
                        .parse()
                        .map_err(|_| "--idle-secs takes a number of seconds".to_owned())?,
                )
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(opts) => opts,
        Err(err) => {
            eprintln!("crac-bench: {err}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("crac-bench: {err}");
            ExitCode::from(1)
        }
    }
}

fn run(opts: &Options) -> Res<bool> {
    if !nix::unistd::geteuid().is_root() && opts.only.iter().any(|n| ![2, 5].contains(n)) {
        return Err(
            "every item but 2 and 5 runs CRIU and needs root (try --only 2,5, or sudo)".into(),
        );
    }
    let bins = Bins::find()?;
    procs::become_subreaper()?;
    let scratch = std::env::temp_dir().join(format!("crac-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let ctx = Ctx {
        quick: opts.quick,
        idle_secs: opts.idle_secs.unwrap_or(if opts.quick { 3 } else { 10 }),
        scratch,
        bins,
        alt_action: opts.alt_action.clone(),
        soak_cycles: opts.soak.unwrap_or(if opts.quick { 10 } else { 100 }),
    };
    let mut report = Report::default();
    machine(&ctx, &mut report, opts);
    let mut all_ok = true;
    for &item in &opts.only {
        let result = match item {
            1 => coord::run(&ctx, &mut report),
            2 => dispatch::run(&ctx, &mut report),
            3 => dump::run(&ctx, &mut report),
            4 => warm::run(&ctx, &mut report),
            5 => idle::run(&ctx, &mut report),
            6 => soak::run(&ctx, &mut report),
            7 => asyncs::run(&ctx, &mut report),
            8 => preflight::run(&ctx, &mut report),
            9 => lazy::run(&ctx, &mut report),
            10 => container::run(&ctx, &mut report),
            11 => archive::run(&ctx, &mut report),
            12 => trust::run(&ctx, &mut report),
            13 => upgrade::run(&ctx, &mut report),
            14 => drain::run(&ctx, &mut report),
            15 => capabilities::run_item(&ctx, &mut report),
            16 => migrate::run(&ctx, &mut report),
            17 => files::run(&ctx, &mut report),
            _ => unreachable!("checked by the parser"),
        };
        if let Err(err) = result {
            all_ok = false;
            report.line(&format!("**Item {item} FAILED**: {err}"));
        }
        procs::kill_watchers();
        procs::reap_zombies(&[]);
    }
    report.summary();
    if let Some(out) = &opts.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::write(out, report.markdown()).map_err(|e| format!("{}: {e}", out.display()))?;
        println!("\nresults written to {}", out.display());
    }
    let _ = std::fs::remove_dir_all(&ctx.scratch);
    Ok(all_ok)
}

/// The machine, as the figures must be read against it.
fn machine(ctx: &Ctx, report: &mut Report, opts: &Options) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "?".into());
    let mem_gib = procs::status_field("/proc/meminfo", "MemTotal").unwrap_or(0) as f64 / 1048576.0;
    let avail_gib = procs::mem_available().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (free, fs) = procs::fs_info(&ctx.scratch).unwrap_or((0, "?".into()));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    report.section("Machine");
    report.line(&format!(
        "{nproc} CPUs ({model}), {mem_gib:.1} GiB memory ({avail_gib:.1} GiB available), \
         kernel {kernel}, CRIU {} ({}), scratch and images in {} on {fs} with {:.1} GiB free; \
         load average at start {}; mode: {}.",
        ctx.bins.criu_version,
        ctx.bins.criu.display(),
        ctx.scratch.display(),
        free as f64 / (1u64 << 30) as f64,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        if opts.quick { "--quick" } else { "full" },
    ));
}
