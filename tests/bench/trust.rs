//! Item 12: what the security checks of issue 18 cost a checkpoint and a restore of the
//! warm-start example. Its image is made for real (`crac run`, the service checkpoints itself),
//! then the work crac does around CRIU is timed in this process, the checked way (crac-fs,
//! the sealed metadata, the trusted note) against the plain way it was done before, the
//! variants interleaved round by round. The difference of the medians is what the checks add.
//!
//! - checkpoint: the store's root and staging folder (`ensure_dir` + `create_dir` against
//!   `DirBuilder`), CRIU's files made private (`tighten_tree`, absent before), the metadata
//!   sealed and written (`metadata::write` against serializing and renaming), and the found-intact
//!   note written (`write_atomic` against `fs::write` + rename);
//! - restore: the image folder checked (`check_dir`, absent before), the metadata read and its
//!   seal checked (`metadata::read` against parsing), the note read only if trusted
//!   (`read_trusted` against `fs::read`).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use crac_cli::metadata::{self, Metadata};

use crate::line::free_port;
use crate::stats::{fmt_us, verdict, Report, Samples};
use crate::warm;
use crate::{Ctx, Res};

/// The target: each side's checks add under this much.
const TARGET_US: f64 = 1000.0;

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("12. What the security checks cost (issue 18)");
    if !ctx.bins.warm_start.is_file() {
        return Err(format!(
            "{} not found: build the examples (scripts/bench.sh does)",
            ctx.bins.warm_start.display()
        ));
    }
    let store = ctx.scratch.join("trust-store");
    let image = store.join("warm");
    let log = ctx.scratch.join("trust-run.log");
    report.note("making the warm-start example's image (crac run, cold)");
    let started = warm::launch(ctx, &store, "warm", free_port()?, &log, None)?;
    let pid = warm::service_pid(&started.stats)?;
    let made = warm::wait_for_image(&store, "warm");
    warm::stop(started.run, Some(pid))?;
    made?;
    let meta = metadata::read(&image).map_err(|e| e.to_string())?;
    let files = fs::read_dir(&image).map_err(|e| e.to_string())?.count();

    let rounds = if ctx.quick { 50 } else { 300 };
    let scratch = ctx.scratch.join("trust-work");
    let (mut ck_new, mut ck_old, mut rs_new, mut rs_old) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    for round in 0..rounds {
        // The files as CRIU leaves them, for tighten_tree to have its work to do.
        loosen(&image)?;
        let t = Instant::now();
        checkpoint_checked(&scratch, &image, &meta, round)?;
        let checked = t.elapsed();
        let t = Instant::now();
        checkpoint_plain(&scratch, &image, &meta, round)?;
        let plain = t.elapsed();
        ck_new.push(checked);
        ck_old.push(plain);

        let t = Instant::now();
        restore_checked(&image)?;
        let checked = t.elapsed();
        let t = Instant::now();
        restore_plain(&image)?;
        let plain = t.elapsed();
        rs_new.push(checked);
        rs_old.push(plain);
    }
    let _ = fs::remove_dir_all(&scratch);
    let _ = fs::remove_dir_all(&store);

    let ck_added = ck_new.median() - ck_old.median();
    let rs_added = rs_new.median() - rs_old.median();
    report.line(&format!(
        "**Method.** The warm-start example's image ({files} files, {} of image files), made \
         by `crac run`; {rounds} rounds, each timing the checked and the plain variant of the \
         same work in turn; medians.",
        crac_cli::units::bytes(meta.image_bytes)
    ));
    report.table(
        &["side", "checked", "plain", "added by the checks", "target"],
        &[
            vec![
                "checkpoint: folders, files made private, sealed metadata, note".into(),
                fmt_us(ck_new.median()),
                fmt_us(ck_old.median()),
                format!("**{}**", fmt_us(ck_added)),
                format!("< {}", fmt_us(TARGET_US)),
            ],
            vec![
                "restore: folder trusted, seal checked, note trusted".into(),
                fmt_us(rs_new.median()),
                fmt_us(rs_old.median()),
                format!("**{}**", fmt_us(rs_added)),
                format!("< {}", fmt_us(TARGET_US)),
            ],
        ],
    );
    report.line(&format!(
        "Checkpoint: {}. Restore: {}.",
        verdict(ck_added < TARGET_US),
        verdict(rs_added < TARGET_US)
    ));
    report.verdict(
        "12 checks added to a checkpoint of the warm-start example",
        "< 1 ms",
        Some(ck_added < TARGET_US),
    );
    report.verdict(
        "12 checks added to a restore of the warm-start example",
        "< 1 ms",
        Some(rs_added < TARGET_US),
    );
    Ok(())
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// CRIU writes its files 0644 and crac's folder is 0700: as found right after a dump.
fn loosen(image: &Path) -> Res<()> {
    for entry in fs::read_dir(image).map_err(err)? {
        let entry = entry.map_err(err)?;
        if entry.file_type().map_err(err)?.is_file() {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o644)).map_err(err)?;
        }
    }
    Ok(())
}

fn checkpoint_checked(scratch: &Path, image: &Path, meta: &Metadata, round: usize) -> Res<()> {
    let root = scratch.join("checked");
    crac_fs::ensure_dir(&root).map_err(err)?;
    let staging = root.join(format!(".staging-{round}"));
    crac_fs::create_dir(&staging).map_err(err)?;
    crac_fs::tighten_tree(image).map_err(err)?;
    metadata::write(&staging, meta).map_err(err)?;
    crac_fs::write_atomic(&staging.join(metadata::VERIFIED_FILE), b"{}").map_err(err)?;
    fs::remove_dir_all(&staging).map_err(err)
}

/// The same work as before issue 18: folders with the umask's help, the metadata serialized and
/// renamed into place unsealed, the note written and renamed, nothing made private.
fn checkpoint_plain(scratch: &Path, _image: &Path, meta: &Metadata, round: usize) -> Res<()> {
    let root = scratch.join("plain");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(err)?;
    let staging = root.join(format!(".staging-{round}"));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(err)?;
    let mut json = serde_json::to_vec_pretty(meta).map_err(err)?;
    json.push(b'\n');
    let tmp = staging.join(".crac-meta.json.tmp");
    fs::write(&tmp, &json).map_err(err)?;
    fs::rename(&tmp, staging.join(metadata::METADATA_FILE)).map_err(err)?;
    let tmp = staging.join(".note.tmp");
    fs::write(&tmp, b"{}").map_err(err)?;
    fs::rename(&tmp, staging.join(metadata::VERIFIED_FILE)).map_err(err)?;
    fs::remove_dir_all(&staging).map_err(err)
}

fn restore_checked(image: &Path) -> Res<()> {
    crac_fs::check_dir(image).map_err(err)?;
    metadata::read(image).map_err(err)?;
    crac_fs::read_trusted(&image.join(metadata::VERIFIED_FILE), 16 << 20).map_err(err)?;
    Ok(())
}

fn restore_plain(image: &Path) -> Res<()> {
    let bytes = fs::read(image.join(metadata::METADATA_FILE)).map_err(err)?;
    let _: Metadata = serde_json::from_slice(&bytes).map_err(err)?;
    fs::read(image.join(metadata::VERIFIED_FILE)).map_err(err)?;
    Ok(())
}
