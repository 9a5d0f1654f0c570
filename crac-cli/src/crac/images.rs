//! `crac images ...`: the image store.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crac_cli::archive;
use crac_cli::checkpoint::{CheckpointOutcome, CheckpointRequest, Destination};
use crac_cli::error::{FailureKind, OpError};
use crac_cli::metadata::{self, Metadata};
use crac_cli::store::{self, Store, StoreError};

use crate::cli::{ExportArgs, ImagesCommand, ImportArgs};
use crate::output::{bytes, field, millis, say, Out};
use crate::output::{errln, outln};

/// An image name or folder, as an image folder.
pub(crate) fn resolve(store: &Store, image: &str) -> Result<PathBuf, OpError> {
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
pub(crate) fn run(store: &Store, command: ImagesCommand) -> (bool, Result<u8, OpError>) {
    match command {
        ImagesCommand::List(args) => (args.json, list(store, Out::new(args.json))),
        ImagesCommand::Show(args) => (args.json, show(store, &args.name, Out::new(args.json))),
        ImagesCommand::Rm(args) => (false, rm(store, &args.names)),
        ImagesCommand::Verify(args) => (args.json, verify(store, &args.name, Out::new(args.json))),
        ImagesCommand::Du(args) => (args.json, du(store, Out::new(args.json))),
        ImagesCommand::Prune(args) => (false, prune(store, args.keep, args.older_than.as_deref())),
        ImagesCommand::Export(args) => (false, export(store, &args)),
        ImagesCommand::Import(args) => (false, import(store, &args)),
        ImagesCommand::Keygen(args) => (false, keygen(&args.output)),
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
                None if archive::is_sealed(&l.path) => (
                    "-".into(),
                    "(encrypted at rest: crac restore NAME --identity FILE)".to_owned(),
                ),
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
        for w in &meta.written_files {
            text.push_str(&format!(
                "  written:   {} ({}{})\n",
                field(&w.path),
                bytes(w.size),
                if w.sha256.is_some() {
                    ", SHA-256"
                } else {
                    ", size and time"
                }
            ));
        }
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
    if archive::is_sealed(&dir) {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!(
                "image {name} is kept encrypted: every file is checked against its digest, and \
                 the whole against age's authentication, each time it is decrypted (`crac \
                 restore {name} --identity FILE`); images verify reads unencrypted images only"
            ),
        ));
    }
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
pub(crate) fn recover(store: &Store) -> Result<(), OpError> {
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
            "crac: removed {}, {}",
            path.display(),
            left_by(path)
        ));
    }
    for err in &recovery.stuck {
        say(&format!(
            "crac: warning: a complete image of an interrupted checkpoint stays where it is: {err}"
        ));
    }
    Ok(())
}

/// What left a working folder that recovery removed.
fn left_by(path: &std::path::Path) -> &'static str {
    if store::is_import_folder(path) {
        "left by an interrupted import: its files were never all checked, so nothing of it was \
         filed; import the archive again"
    } else {
        "left by an interrupted dump, replacement or removal"
    }
}

fn rm(store: &Store, names: &[String]) -> Result<u8, OpError> {
    // Check every name first, so that a typo removes nothing.
    for name in names {
        store.resolve(name).map_err(store_error)?;
    }
    for name in names {
        store.remove(name).map_err(store_error)?;
        outln!("removed {name}");
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
        outln!(
            "recovered {} (the complete image of an interrupted checkpoint of pid {}, found in {})",
            image.name,
            image.pid,
            image.from.display()
        );
    }
    for path in &recovery.removed {
        outln!("removed {} ({})", path.display(), left_by(path));
    }
    for err in &recovery.stuck {
        errln!(
            "crac: warning: a complete image of an interrupted checkpoint stays where it is: {err}"
        );
    }
    let removed = store.prune(keep, older_than).map_err(store_error)?;
    if removed.is_empty()
        && recovery.recovered.is_empty()
        && recovery.removed.is_empty()
        && recovery.stuck.is_empty()
    {
        outln!("nothing to prune");
    }
    for name in removed {
        outln!("removed {name}");
    }
    Ok(0)
}

fn export(store: &Store, args: &ExportArgs) -> Result<u8, OpError> {
    let (name, file) = (args.name.as_str(), args.file.as_path());
    let recipients = recipients(
        &args.encrypt_to,
        &args.recipients_file,
        "nothing was exported",
    )?
    .unwrap_or_default();
    let encrypt_to = (!recipients.is_empty()).then_some(&recipients);
    let summary = archive::export_with(store, name, file, encrypt_to).map_err(archive_error)?;
    if archive::is_sealed(&resolve(store, name)?) {
        outln!(
            "exported {name}, kept encrypted, as it is to {}: archive {}; import it with --identity",
            file.display(),
            bytes(summary.bytes_out)
        );
        return Ok(0);
    }
    // The image's size as `list` and `show` give it (its CRIU files), then the archive's.
    let image =
        metadata::read(&resolve(store, name)?).map_or(summary.bytes_in, |meta| meta.image_bytes);
    let encrypted = match recipients.len() {
        0 => String::new(),
        1 => ", encrypted to 1 recipient".to_owned(),
        n => format!(", encrypted to {n} recipients"),
    };
    outln!(
        "exported {name} ({}) to {}: {} files, archive {}{encrypted}",
        bytes(image),
        file.display(),
        summary.files,
        bytes(summary.bytes_out)
    );
    Ok(0)
}

fn import(store: &Store, args: &ImportArgs) -> Result<u8, OpError> {
    let identities = args
        .identity
        .as_deref()
        .map(archive::Identities::read)
        .transpose()
        .map_err(|err| {
            OpError::new(
                FailureKind::BadInput,
                format!("{err}; nothing was imported"),
            )
        })?;
    recover(store)?;
    let options = archive::ImportOptions {
        name: args.name.as_deref(),
        identities: identities.as_ref(),
        max_ratio: args.max_ratio,
    };
    let imported = archive::import_with(store, &args.file, &options).map_err(archive_error)?;
    let decrypted = if identities.is_some() {
        " (decrypted)"
    } else {
        ""
    };
    outln!("imported {}{decrypted} as {imported}", args.file.display());
    Ok(0)
}

fn keygen(output: &std::path::Path) -> Result<u8, OpError> {
    let recipient = archive::keygen(output).map_err(archive_error)?;
    errln!(
        "crac: wrote a new identity to {} (keep it secret; lose it and nothing encrypted to it can be imported)",
        output.display()
    );
    // The recipient alone on stdout, for scripts: `R=$(crac images keygen -o key.txt)`.
    outln!("{recipient}");
    Ok(0)
}

/// The recipients of `--encrypt-to` and `--recipients-file`, or None when neither was given;
/// `nothing` ends an error's message (what was not done).
pub(crate) fn recipients(
    encrypt_to: &[String],
    files: &[PathBuf],
    nothing: &str,
) -> Result<Option<archive::Recipients>, OpError> {
    if encrypt_to.is_empty() && files.is_empty() {
        return Ok(None);
    }
    let mut recipients = archive::Recipients::new();
    for text in encrypt_to {
        recipients.add(text).map_err(archive_error)?;
    }
    for path in files {
        recipients
            .add_file(path)
            .map_err(|err| OpError::new(FailureKind::BadInput, format!("{err}; {nothing}")))?;
    }
    Ok(Some(recipients))
}

/// A checkpoint kept encrypted at rest (`crac checkpoint --encrypt-to`): CRIU dumps into a
/// private folder on a tmpfs, and [`Sealing::seal`] files only the encrypted image in the
/// store.
pub(crate) struct Sealing {
    recipients: archive::Recipients,
    plain: crac_fs::TempDir,
    store: Store,
    name: String,
    replace: bool,
    durable: bool,
}

impl Sealing {
    /// Redirects `request`, a checkpoint into the store, into a private tmpfs folder.
    pub(crate) fn prepare(
        request: &mut CheckpointRequest,
        recipients: archive::Recipients,
    ) -> Result<Sealing, OpError> {
        let Destination::Store {
            store,
            name,
            replace,
        } = &request.destination
        else {
            return Err(OpError::new(
                FailureKind::BadInput,
                "--encrypt-to keeps an image of the store encrypted; it does not apply to --dir",
            ));
        };
        let plain = archive::plain_tmpfs("crac-dump").map_err(|err| {
            OpError::new(
                FailureKind::Unavailable,
                format!(
                    "cannot make a private folder for the dump ({err}); nothing was checkpointed"
                ),
            )
        })?;
        let sealing = Sealing {
            recipients,
            store: store.clone(),
            name: name.clone(),
            replace: *replace,
            durable: request.durable,
            plain,
        };
        request.destination = Destination::Dir(sealing.plain.path().join(&sealing.name));
        Ok(sealing)
    }

    /// Files the dumped image in the store, encrypted, and removes its plaintext. If that
    /// fails, the plaintext image is kept where CRIU wrote it (it may be the only copy of a
    /// service CRIU stopped), and the error says where.
    pub(crate) fn seal(self, mut outcome: CheckpointOutcome) -> Result<CheckpointOutcome, OpError> {
        match archive::seal(
            &self.store,
            &self.name,
            &outcome.path,
            &self.recipients,
            self.replace,
            self.durable,
        ) {
            Ok(dir) => {
                outcome.path = dir;
                Ok(outcome)
            }
            Err(err) => {
                let kept = self.plain.keep().join(&self.name);
                let restore = if outcome.left_running {
                    String::new()
                } else {
                    format!(
                        " (the process was stopped: restore it with `crac restore {}`)",
                        kept.display()
                    )
                };
                Err(OpError::new(
                    FailureKind::ImageKept,
                    format!(
                        "the image was made but could not be filed encrypted: {err}; it is kept, \
                         unencrypted, in memory at {}{restore}; remove it when done",
                        kept.display()
                    ),
                ))
            }
        }
    }
}

/// The plaintext folder of the image in `dir`: `dir` itself, or for an image kept encrypted,
/// a private tmpfs folder it is decrypted into with the identity in `identity` (returned too:
/// dropping it removes the plaintext).
pub(crate) fn unsealed(
    dir: &Path,
    identity: Option<&Path>,
) -> Result<(PathBuf, Option<crac_fs::TempDir>), OpError> {
    let bad = |message: String| OpError::new(FailureKind::BadInput, message);
    if !archive::is_sealed(dir) {
        if identity.is_some() {
            return Err(bad(format!(
                "the image at {} is not encrypted, but --identity was given: it is not the \
                 image you expected (check it with `crac images show`); nothing was restored",
                dir.display()
            )));
        }
        return Ok((dir.to_owned(), None));
    }
    let Some(identity) = identity else {
        return Err(bad(format!(
            "the image at {} is encrypted (age); pass --identity FILE, a file with a secret key \
             it was encrypted to; nothing was restored",
            dir.display()
        )));
    };
    let identities = archive::Identities::read(identity)
        .map_err(|err| bad(format!("{err}; nothing was restored")))?;
    let plain = archive::plain_tmpfs("crac-restore").map_err(|err| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot make a private folder to decrypt into ({err}); nothing was restored"),
        )
    })?;
    let image = archive::unseal(dir, &identities, plain.path()).map_err(|err| {
        bad(format!(
            "cannot decrypt the image at {}: {}",
            dir.display(),
            err.to_string()
                .replace("nothing was imported", "nothing was restored")
        ))
    })?;
    Ok((image, Some(plain)))
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
