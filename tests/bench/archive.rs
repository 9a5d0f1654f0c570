//! Item 11: archive throughput, plain against encrypted (age), both directions.
//!
//! A crac-test-target that has touched 256 MiB (every page with content of its own, which
//! zstd compresses about as much as a real heap) is checkpointed once into a store of the
//! scratch folder. Then, in alternating rounds, `crac images export` writes it to an archive,
//! plain or `--encrypt-to` a recipient that `crac images keygen` made, and `crac images
//! import` reads that archive into a second store (plain, or with `--identity`); each import
//! is removed again, untimed. Throughput is the image's size (its CRIU files and metadata) over
//! the wall time of the command, in MB/s (10^6 bytes/s); the claim is the ratio of the
//! medians, encrypted over plain (target: at least 0.5x each way: the cipher must not be the
//! bottleneck).

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::procs::{self, Proc, Res};
use crate::stats::{fmt_ratio, fmt_us, Report, Samples};
use crate::Ctx;

const IMAGE_MIB: usize = 256;

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("Item 11: archive throughput, plain vs encrypted (age)");
    let dir = ctx.scratch.join("archive");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let here = dir.join("here");
    let there = dir.join("there");
    let crac = |store: &Path, args: &[&str]| {
        let mut cmd = Command::new(&ctx.bins.crac);
        cmd.arg("--store")
            .arg(store)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let ok = |what: &str, cmd: &mut Command| -> Res<()> {
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{what}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    };
    let timed = |what: &str, cmd: &mut Command| -> Res<Duration> {
        let (status, took) = procs::run_timed(cmd)?;
        if status.success() {
            Ok(took)
        } else {
            Err(format!("{what} failed ({status})"))
        }
    };

    let mut target = Command::new(&ctx.bins.test_target);
    target
        .env("CRAC_TEST_DIR", dir.join("target"))
        .env("CRAC_TEST_MIB", IMAGE_MIB.to_string());
    let target = Proc::start(
        target,
        &dir.join("target/ready"),
        &dir.join("target.stderr"),
        Duration::from_secs(60),
    )?;
    ok(
        "crac checkpoint",
        &mut crac(
            &here,
            &[
                "checkpoint",
                &target.pid.to_string(),
                "--name",
                "img",
                "--leave-running",
            ],
        ),
    )?;
    target.kill();
    procs::kill_watchers();
    let image_bytes = fs::read_dir(here.join("img"))
        .map_err(|e| format!("the image: {e}"))?
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".img") || name == "crac-meta.json"
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum::<u64>();

    let key = dir.join("key.txt");
    let out = Command::new(&ctx.bins.crac)
        .args(["images", "keygen", "--output"])
        .arg(&key)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("crac images keygen: {e}"))?;
    let recipient = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !recipient.starts_with("age1") {
        return Err(format!("crac images keygen failed ({})", out.status));
    }
    let key = key.to_str().ok_or("scratch path is not UTF-8")?.to_owned();

    let rounds = if ctx.quick { 2 } else { 5 };
    // [plain, encrypted]
    let mut export = [Samples::new(), Samples::new()];
    let mut import = [Samples::new(), Samples::new()];
    let mut archive_bytes = [0u64; 2];
    for round in 0..rounds {
        report.note(&format!("round {}/{rounds}", round + 1));
        for (k, encrypted) in [false, true].into_iter().enumerate() {
            let file = dir.join(if encrypted {
                "img.crac.age"
            } else {
                "img.crac"
            });
            let file = file.to_str().ok_or("scratch path is not UTF-8")?.to_owned();
            let mut args = vec!["images", "export", "img", file.as_str()];
            if encrypted {
                args.extend(["--encrypt-to", recipient.as_str()]);
            }
            export[k].push(timed("crac images export", &mut crac(&here, &args))?);
            archive_bytes[k] = fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            let mut args = vec!["images", "import", file.as_str(), "--name", "copy"];
            if encrypted {
                args.extend(["--identity", key.as_str()]);
            }
            import[k].push(timed("crac images import", &mut crac(&there, &args))?);
            ok(
                "crac images rm",
                &mut crac(&there, &["images", "rm", "copy"]),
            )?;
            let _ = fs::remove_file(&file);
        }
    }

    let mbs = |us: f64| image_bytes as f64 / us;
    let rows: Vec<Vec<String>> = [("export", &export), ("import", &import)]
        .into_iter()
        .flat_map(|(what, samples)| {
            [("plain", 0), ("encrypted (age)", 1)].map(|(kind, k)| {
                vec![
                    format!("{what}, {kind}"),
                    samples[k].len().to_string(),
                    fmt_us(samples[k].median()),
                    format!("{:.0} MB/s", mbs(samples[k].median())),
                    format!("{:.1} MB", archive_bytes[k] as f64 / 1e6),
                ]
            })
        })
        .collect();
    report.line(&format!(
        "An image of {:.1} MB (crac-test-target, {IMAGE_MIB} MiB touched), exported from one \
         store and imported into another by the `crac` command, {rounds} rounds alternating \
         plain and encrypted; wall time of each command, medians.",
        image_bytes as f64 / 1e6
    ));
    report.table(
        &["command", "runs", "median", "throughput", "archive"],
        &rows,
    );
    for (what, samples) in [("export", &export), ("import", &import)] {
        let ratio = samples[0].median() / samples[1].median();
        report.line(&format!(
            "Encrypted {what} throughput against plain: {}.",
            fmt_ratio(ratio)
        ));
        report.verdict(
            &format!("item 11: encrypted {what} throughput / plain"),
            ">= 0.5x",
            Some(ratio >= 0.5),
        );
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}
