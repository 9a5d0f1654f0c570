//! Item 17: what the files a service writes to cost a checkpoint and a restore (issue 23), at
//! 10 and 1,000 files this process holds open (4 KiB each), all of them for writing or 10 of
//! them (the others read-only):
//!
//! - the scan a checkpoint makes before the hooks (`crac_cli::process::open_written_files`:
//!   one `lstat` a descriptor, and a `readlink`, a `stat`, the `fdinfo` and an open for each
//!   one open for writing), against the preflight's own pass over the same descriptors
//!   through `/proc` (`crac_action::preflight::check`, item 8) for scale;
//! - recording them after the dump (`WrittenFile::record`: a `fstat` and a SHA-256 each),
//!   which runs beside the image's hashing;
//! - a restore's check (`crac_cli::metadata::check_written`): every file unchanged (a `stat`
//!   each), and every file rewritten to the same size (each hashed again, and refused).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use crac_action::preflight::{self, CriuOptions, Policy};
use crac_cli::metadata::{check_written, WrittenFile};
use crac_cli::process::open_written_files;

use crate::stats::{fmt_us, time, verdict, Report, Samples};
use crate::{Ctx, Res};

/// Files open, and how many of them for writing.
const CASES: [(usize, usize); 3] = [(10, 10), (1_000, 10), (1_000, 1_000)];
/// The target: the scan adds under this much at 1,000 files.
const TARGET_US: f64 = 1000.0;

/// Times `f` for about `budget` (at least 5 runs).
fn sample<T>(budget: Duration, mut f: impl FnMut() -> T) -> Samples {
    let mut samples = Samples::new();
    let started = Instant::now();
    while samples.len() < 5 || (started.elapsed() < budget && samples.len() < 1000) {
        let (_, took) = time(&mut f);
        samples.push(took);
    }
    samples
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("17. Files a service writes to: recorded at a checkpoint, checked at a restore");
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|e| e.to_string())?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| format!("raising the descriptor limit to {hard}: {e}"))?;
    let budget = Duration::from_millis(if ctx.quick { 300 } else { 1500 });
    let me = std::process::id();
    let taking = CriuOptions {
        tcp_established: true,
        ..CriuOptions::defaults()
    };
    let mut rows = Vec::new();
    let mut scan_at_1000 = f64::NAN;
    for (open, n) in CASES {
        let dir = ctx.scratch.join(format!("written-{open}-{n}"));
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut held = Vec::with_capacity(open);
        for i in 0..open {
            let path = dir.join(format!("file-{i}"));
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            file.write_all(&[b'a'; 4096]).map_err(|e| e.to_string())?;
            if i >= n {
                file = fs::File::open(&path).map_err(|e| e.to_string())?;
            }
            held.push((path, file));
        }
        // Only this case's files (the run may hold another open for writing).
        let mut found = open_written_files(&[me], &mut BTreeSet::new());
        found.retain(|(path, _, _)| std::path::Path::new(path).starts_with(&dir));
        if found.len() != n {
            return Err(format!(
                "the scan found {} files open for writing, not {n}",
                found.len()
            ));
        }
        let scan = sample(budget, || open_written_files(&[me], &mut BTreeSet::new()));
        let pass = sample(budget, || preflight::check(me, &taking, &Policy::default()));
        let record = sample(budget, || {
            found
                .iter()
                .filter_map(|(path, file, stat)| {
                    WrittenFile::record(path.clone(), file, *stat, false).ok()
                })
                .count()
        });
        let recorded: Vec<WrittenFile> = found
            .iter()
            .filter_map(|(path, file, stat)| {
                WrittenFile::record(path.clone(), file, *stat, false).ok()
            })
            .collect();
        if recorded.iter().any(|w| w.sha256.is_none()) || !check_written(&recorded, &[]).is_empty()
        {
            return Err("a file recorded just now does not check as unchanged".into());
        }
        let unchanged = sample(budget, || check_written(&recorded, &[]));
        for (path, _) in &held[..n] {
            fs::write(path, [b'b'; 4096]).map_err(|e| e.to_string())?;
        }
        if check_written(&recorded, &[]).len() != n {
            return Err("a rewritten file checks as unchanged".into());
        }
        let changed = sample(budget, || check_written(&recorded, &[]));
        drop(found);
        drop(held);
        fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
        if open == 1_000 && n == 1_000 {
            scan_at_1000 = scan.median();
        }
        rows.push(vec![
            open.to_string(),
            n.to_string(),
            fmt_us(scan.median()),
            fmt_us(scan.p90()),
            fmt_us(pass.median()),
            fmt_us(record.median()),
            fmt_us(unchanged.median()),
            fmt_us(changed.median()),
        ]);
    }
    report.line(&format!(
        "Method: this process holds 10 or 1,000 files open (4 KiB each), all or 10 of them \
         for writing (O_RDWR, the others read-only) and, for about {budget} each (at least 5 \
         runs), times what crac adds: the scan a checkpoint \
         makes of the tree before the hooks (every descriptor's /proc/PID/fd link mode; for \
         each one open for writing its path, stat, fdinfo flags and a read-only handle), the \
         preflight's own pass over the same descriptors through /proc (item 8's \
         preflight::check, CRIU taking connections) for scale, recording the files after the \
         dump (a SHA-256 each, beside the image's hashing, off the frozen window), and a \
         restore's check with every file unchanged (a stat each) and every file rewritten \
         to the same size (each hashed again; all refused, checked).",
        budget = fmt_us(budget.as_secs_f64() * 1e6)
    ));
    report.table(
        &[
            "files open",
            "for writing",
            "scan at checkpoint: median",
            "p90",
            "(preflight through /proc)",
            "record after the dump",
            "restore check, unchanged",
            "restore check, all rewritten",
        ],
        &rows,
    );
    let met = scan_at_1000 < TARGET_US;
    report.line(&format!(
        "At 1,000 files open, all for writing, the scan adds {} to a checkpoint. Target under \
         1 ms: {}.",
        fmt_us(scan_at_1000),
        verdict(met)
    ));
    report.verdict(
        "17. recording 1,000 open-for-writing files",
        "< 1 ms",
        Some(met),
    );
    Ok(())
}
