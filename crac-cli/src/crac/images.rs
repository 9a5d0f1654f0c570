//! `crac images ...`: the image store.

use std::borrow::Cow;
use std::path::PathBuf;

use serde::Serialize;

use crac_cli::archive;
use crac_cli::driver::{FailureKind, OpError};
use crac_cli::metadata::{self, Metadata};
use crac_cli::store::{self, Store, StoreError};

use crate::cli::ImagesCommand;
use crate::output::{bytes, field, millis, say, Out};

/// An image name or folder, as an image folder.
pub fn resolve(store: &Store, image: &str) -> Result<PathBuf, OpError> {
    store.resolve(image).map_err(store_error)
}

fn store_error(err: StoreError) -> OpError {
    let kind = match err {
        StoreError::NotWritable { .. } => FailureKind::Unavailable,
        StoreError::Io { .. } => FailureKind::Failed,
        _ => FailureKind::BadInput,
    };
    OpError::new(kind, err.to_string())
}

/// Runs an images command; returns whether it printed JSON, and the outcome.
pub fn run(store: &Store, command: ImagesCommand) -> (bool, Result<u8, OpError>) {
    match command {
        ImagesCommand::List(args) => (args.json, list(store, Out::new(args.json))),
        ImagesCommand::Show(args) => (args.json, show(store, &args.name, Out::new(args.json))),
        ImagesCommand::Rm(args) => (false, rm(store, &args.names)),
        ImagesCommand::Verify(args) => (args.json, verify(store, &args.name, Out::new(args.json))),
        ImagesCommand::Du(args) => (args.json, du(store, Out::new(args.json))),
        ImagesCommand::Prune(args) => (false, prune(store, args.keep, args.older_than.as_deref())),
        ImagesCommand::Export(args) => (false, export(store, &args.name, &args.file)),
        ImagesCommand::Import(args) => (false, import(store, &args.file, args.name.as_deref())),
    }
}

#[derive(Serialize)]
struct Listed {
    name: String,
    path: PathBuf,
    created_unix_ms: u64,
    bytes: u64,
    metadata: Option<Metadata>,
    error: Option<String>,
}

fn list(store: &Store, out: Out) -> Result<u8, OpError> {
    let entries = store.list().map_err(store_error)?;
    let listed: Vec<Listed> = entries
        .into_iter()
        .map(|e| {
            let (metadata, error) = match e.metadata {
                Ok(m) => (Some(m), None),
                Err(err) => (None, Some(err.to_string())),
            };
            Listed {
                name: e.name,
                path: e.path,
                created_unix_ms: e.created_unix_ms,
                bytes: e.bytes,
                metadata,
                error,
            }
        })
        .collect();
    out.print(&listed, || {
        if listed.is_empty() {
            return format!("no images in {}\n", store.root().display());
        }
        let mut text = format!(
            "{:<24} {:>10} {:>8}  {:<24} COMMAND\n",
            "NAME", "SIZE", "PID", "CREATED"
        );
        for l in &listed {
            let (pid, command) = match &l.metadata {
                Some(m) => (m.pid.to_string(), one_line(&m.command_line)),
                None => (
                    "-".into(),
                    format!("(unreadable: {})", field(l.error.as_deref().unwrap_or("?"))),
                ),
            };
            // The image's own size, as `show` and `export` give it; `du` adds logs.
            let size = l.metadata.as_ref().map_or(l.bytes, |m| m.image_bytes);
            text.push_str(&format!(
                "{:<24} {:>10} {:>8}  {:<24} {}\n",
                l.name,
                bytes(size),
                pid,
                age(l.created_unix_ms),
                command
            ));
        }
        text
    });
    Ok(0)
}

/// A command line on one line of a table: each argument a [`field`] (newlines, tabs and other
/// control characters shown escaped, `\n`), so one image is one row.
fn one_line(args: &[String]) -> String {
    args.iter().map(|a| field(a)).collect::<Vec<_>>().join(" ")
}

fn age(created_unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let secs = now.saturating_sub(created_unix_ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn show(store: &Store, name: &str, out: Out) -> Result<u8, OpError> {
    let dir = resolve(store, name)?;
    let meta =
        metadata::read(&dir).map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
    let problems = metadata::verify(&dir, &meta, metadata::Check::Changed)
        .err()
        .map(|e| e.to_string());
    #[derive(Serialize)]
    struct Shown<'a> {
        path: &'a PathBuf,
        valid: bool,
        problems: Option<String>,
        metadata: &'a Metadata,
    }
    let shown = Shown {
        path: &dir,
        valid: problems.is_none(),
        problems: problems.clone(),
        metadata: &meta,
    };
    // Whoever made or sent the image wrote its metadata: each value is one field of its line.
    out.print(&shown, || {
        let mut text = format!("image {} at {}\n", field(&meta.name), dir.display());
        text.push_str(&format!(
            "  valid:     {}\n",
            problems.as_deref().map_or(Cow::Borrowed("yes"), field)
        ));
        text.push_str(&format!(
            "  process:   pid {} `{}`\n",
            meta.pid,
            one_line(&meta.command_line)
        ));
        text.push_str(&format!("  created:   {}\n", age(meta.created_unix_ms)));
        text.push_str(&format!(
            "  size:      {} in {} files\n",
            bytes(meta.image_bytes),
            meta.files.len()
        ));
        text.push_str(&format!(
            "  made with: CRIU {}, crac {}, Linux {} on {}\n",
            field(&meta.criu_version),
            field(&meta.crac_version),
            field(&meta.kernel),
            field(&meta.arch)
        ));
        text.push_str(&format!(
            "  options:   leave_running={} tcp_established={} file_locks={} timeout={}s {}\n",
            meta.options.leave_running,
            meta.options.tcp_established,
            meta.options.file_locks,
            meta.options.timeout_secs,
            one_line(&meta.options.extra_criu_args)
        ));
        text.push_str(&format!(
            "  timings:   hooks {}, criu dump {}, total {}\n",
            millis(meta.timings.hooks_ms),
            millis(meta.timings.dump_ms),
            millis(meta.timings.total_ms)
        ));
        for h in &meta.hooks {
            text.push_str(&format!(
                "  hook:      pid {} {} {} {}µs\n",
                h.pid,
                field(&h.phase),
                field(&h.resource),
                h.duration_us
            ));
        }
        text
    });
    Ok(0)
}

fn verify(store: &Store, name: &str, out: Out) -> Result<u8, OpError> {
    let dir = resolve(store, name)?;
    let meta =
        metadata::read(&dir).map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
    metadata::verify(&dir, &meta, metadata::Check::Full)
        .map_err(|e| OpError::new(FailureKind::BadInput, e.to_string()))?;
    let hashed = meta.files.iter().filter(|f| f.sha256.is_some()).count();
    #[derive(Serialize)]
    struct Verified {
        ok: bool,
        files_checked: usize,
        files_without_hash: usize,
        executable_checked: bool,
    }
    let verified = Verified {
        ok: true,
        files_checked: hashed,
        files_without_hash: meta.files.len() - hashed,
        executable_checked: meta.executable_sha256.is_some(),
    };
    out.print(&verified, || {
        let mut text = format!(
            "image {name}: intact ({hashed} image files hold what was dumped",
        );
        if verified.executable_checked {
            text.push_str(&format!(
                "; {} is the executable the service ran)\n",
                meta.executable
            ));
        } else {
            text.push_str(
                "; the executable was not hashed at the checkpoint, so it is not checked)\n",
            );
        }
        if verified.files_without_hash > 0 {
            text.push_str(&format!(
                "  {} files have no recorded hash (an image of an older crac): only their sizes were checked\n",
                verified.files_without_hash
            ));
        }
        text
    });
    Ok(0)
}

/// Files the complete images of interrupted checkpoints and removes what other interrupted
/// writes left, saying so on stderr (stdout stays the command's own).
pub fn recover(store: &Store) -> Result<(), OpError> {
    let recovery = store.recover().map_err(store_error)?;
    for image in &recovery.recovered {
        say(&format!(
            "crac: filed the complete image of an interrupted checkpoint of pid {} as {} (found in {})",
            image.pid,
            image.name,
            image.from.display()
        ));
    }
    for path in &recovery.removed {
        say(&format!(
            "crac: removed {}, left by an interrupted dump or import",
            path.display()
        ));
    }
    for err in &recovery.stuck {
        say(&format!(
            "crac: warning: a complete image of an interrupted checkpoint stays where it is: {err}"
        ));
    }
    Ok(())
}

fn rm(store: &Store, names: &[String]) -> Result<u8, OpError> {
    // Check every name first, so that a typo removes nothing.
    for name in names {
        store.resolve(name).map_err(store_error)?;
    }
    for name in names {
        store.remove(name).map_err(store_error)?;
        println!("removed {name}");
    }
    Ok(0)
}

fn du(store: &Store, out: Out) -> Result<u8, OpError> {
    let usage = store.du().map_err(store_error)?;
    #[derive(Serialize)]
    struct Du<'a> {
        images: &'a [(String, u64)],
        staging: u64,
        total: u64,
    }
    out.print(
        &Du {
            images: &usage.images,
            staging: usage.staging,
            total: usage.total,
        },
        || {
            let mut text = String::new();
            for (name, size) in &usage.images {
                text.push_str(&format!("{:>10}  {name}\n", bytes(*size)));
            }
            if usage.staging > 0 {
                text.push_str(&format!(
                    "{:>10}  working folders of checkpoints and imports in progress or interrupted: `crac images prune` (and any crac that writes to the store) files the complete images among them in the store and removes the rest\n",
                    bytes(usage.staging)
                ));
            }
            text.push_str(&format!(
                "{:>10}  total in {}\n",
                bytes(usage.total),
                store.root().display()
            ));
            text
        },
    );
    Ok(0)
}

fn prune(store: &Store, keep: Option<usize>, older_than: Option<&str>) -> Result<u8, OpError> {
    let older_than = older_than
        .map(store::parse_age)
        .transpose()
        .map_err(|e| OpError::new(FailureKind::BadInput, e))?;
    let recovery = store.recover().map_err(store_error)?;
    for image in &recovery.recovered {
        println!(
            "recovered {} (the complete image of an interrupted checkpoint of pid {}, found in {})",
            image.name,
            image.pid,
            image.from.display()
        );
    }
    for path in &recovery.removed {
        println!(
            "removed {} (left by an interrupted dump or import)",
            path.display()
        );
    }
    for err in &recovery.stuck {
        eprintln!(
            "crac: warning: a complete image of an interrupted checkpoint stays where it is: {err}"
        );
    }
    let removed = store.prune(keep, older_than).map_err(store_error)?;
    if removed.is_empty()
        && recovery.recovered.is_empty()
        && recovery.removed.is_empty()
        && recovery.stuck.is_empty()
    {
        println!("nothing to prune");
    }
    for name in removed {
        println!("removed {name}");
    }
    Ok(0)
}

fn export(store: &Store, name: &str, file: &std::path::Path) -> Result<u8, OpError> {
    let summary = archive::export(store, name, file).map_err(archive_error)?;
    // The image's size as `list` and `show` give it (its CRIU files), then the archive's.
    let image =
        metadata::read(&resolve(store, name)?).map_or(summary.bytes_in, |meta| meta.image_bytes);
    println!(
        "exported {name} ({}) to {}: {} files, archive {}",
        bytes(image),
        file.display(),
        summary.files,
        bytes(summary.bytes_out)
    );
    Ok(0)
}

fn import(store: &Store, file: &std::path::Path, name: Option<&str>) -> Result<u8, OpError> {
    recover(store)?;
    let imported = archive::import(store, file, name).map_err(archive_error)?;
    println!("imported {} as {imported}", file.display());
    Ok(0)
}

fn archive_error(err: archive::ArchiveError) -> OpError {
    let kind = match &err {
        archive::ArchiveError::Store(StoreError::NotWritable { .. }) => FailureKind::Unavailable,
        _ => FailureKind::BadInput,
    };
    OpError::new(kind, err.to_string())
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_command_line_with_newlines_stays_on_one_row() {
        let args = [
            "sh".to_owned(),
            "-c".to_owned(),
            "echo a\n\techo b".to_owned(),
        ];
        assert_eq!(one_line(&args), "sh -c echo a\\n\\techo b");
    }
}
