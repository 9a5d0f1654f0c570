//! What crac reads about a process it is about to checkpoint, from `/proc`: its command line,
//! session, standard streams, environment and mapped files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use crate::metadata::Stat;

/// The files of the processes `pids` (the dumped tree) that a restore depends on, each
/// opened read-only through `/proc` (the file itself even if its path was replaced since).
#[derive(Debug, Default)]
pub(crate) struct OpenFiles {
    /// Mapped read-only or privately (shared libraries, locale files, a child's executable).
    pub(crate) mapped: Vec<(String, fs::File)>,
    /// Open for writing, or mapped shared and writable ([`crate::metadata::WrittenFile`]),
    /// with their stat now.
    pub(crate) written: Vec<(String, fs::File, Stat)>,
}

/// The files of the processes `pids` that a restore depends on: the regular files they have
/// mapped besides the root's `executable`, and those they have open for writing (not for
/// appending only: logs), each once. A deleted file, or one that cannot be opened, is left
/// out: it cannot be checked at a restore either (and CRIU copies a deleted one into the
/// image).
pub(crate) fn open_files(pids: &[u32], executable: &str) -> OpenFiles {
    let mut seen = BTreeSet::new();
    let mut files = OpenFiles {
        written: open_written_files(pids, &mut seen),
        mapped: Vec::new(),
    };
    for &pid in pids {
        open_mapped_files_of(pid, executable, &mut seen, &mut files);
    }
    files
}

/// The regular files the processes `pids` have open for writing (not for appending only:
/// logs), each once and not among `seen` (to which they are added), each opened read-only
/// through `/proc/PID/fd` (the file itself even if its path was replaced since), with its
/// stat now ([`crate::metadata::WrittenFile`]).
pub fn open_written_files(
    pids: &[u32],
    seen: &mut BTreeSet<String>,
) -> Vec<(String, fs::File, Stat)> {
    let mut written = Vec::new();
    for &pid in pids {
        open_written_files_of(pid, seen, &mut written);
    }
    written
}

/// [`open_written_files`] for one process.
fn open_written_files_of(
    pid: u32,
    seen: &mut BTreeSet<String>,
    written: &mut Vec<(String, fs::File, Stat)>,
) {
    const O_ACCMODE: u32 = 0o3;
    for file in crac_action::procfs::files_open_for_writing(pid) {
        let append_only = file.flags & libc::O_APPEND as u32 != 0
            && file.flags & O_ACCMODE == libc::O_WRONLY as u32;
        if append_only || !seen.insert(file.path.clone()) {
            continue;
        }
        written.push((file.path, file.file, Stat::of(&file.meta)));
    }
}

/// The mapped files of `pid`, skipping the paths in `seen`: those mapped shared and writable
/// among `files.written`, the others among `files.mapped`.
fn open_mapped_files_of(
    pid: u32,
    executable: &str,
    seen: &mut BTreeSet<String>,
    files: &mut OpenFiles,
) {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return;
    };
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut fields = line.splitn(6, char::is_whitespace);
        let Some(range) = fields.next() else { continue };
        let Some(perms) = fields.next() else { continue };
        let Some(path) = fields.nth(3).map(str::trim_start) else {
            continue;
        };
        if !path.starts_with('/')
            || path.ends_with(" (deleted)")
            || path == executable
            || !seen.insert(path.to_owned())
        {
            continue;
        }
        let Ok(file) = fs::File::open(format!("/proc/{pid}/map_files/{range}")) else {
            continue;
        };
        // `rw-s`: written through the mapping (a database's shared memory file).
        if perms.as_bytes().get(1) == Some(&b'w') && perms.as_bytes().get(3) == Some(&b's') {
            if let Ok(meta) = file.metadata() {
                files.written.push((path.to_owned(), file, Stat::of(&meta)));
            }
        } else {
            files.mapped.push((path.to_owned(), file));
        }
    }
}

/// A service whose stdout or stderr is a file opened without `O_APPEND` (`> file` rather than
/// `>> file`) makes a single-use image: CRIU records the file's size and offset, and refuses
/// to restore once the file has grown ("has bad size"), which it does as soon as the service,
/// or its restored copy, writes a line. Said before the dump, with the fix.
pub(crate) fn stdio_warnings(pid: u32) -> Vec<String> {
    const O_ACCMODE: u32 = 0o3;
    let mut warnings = Vec::new();
    for (fd, name) in [(1, "stdout"), (2, "stderr")] {
        let link = format!("/proc/{pid}/fd/{fd}");
        let Ok(target) = fs::read_link(&link) else {
            continue;
        };
        if !fs::metadata(&link).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let flags = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            });
        let Some(flags) = flags else { continue };
        let writes = flags & O_ACCMODE != 0;
        if writes && flags & libc::O_APPEND as u32 == 0 {
            warnings.push(format!(
                "pid {pid}'s {name} is the file {} opened without O_APPEND (`>` rather than `>>`): once that file grows, CRIU refuses to restore this image (\"has bad size\"); start the service with `>> {}` (or open the file with O_APPEND)",
                target.display(),
                target.display()
            ));
        }
    }
    warnings
}

/// `pid`'s stdout and stderr that are pipes ([`Metadata::stdio_pipes`](crate::metadata::Metadata::stdio_pipes)).
pub(crate) fn stdio_pipes(pid: u32) -> BTreeMap<u32, String> {
    [1, 2]
        .into_iter()
        .filter_map(|fd| {
            let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            let target = target.to_str()?;
            target
                .starts_with("pipe:[")
                .then(|| (fd, target.to_owned()))
        })
        .collect()
}

/// The session id of `pid`, as this process's pid namespace sees it (`/proc/PID/stat`).
pub(crate) fn session_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses: state, ppid, pgrp, session.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// The parent of `pid` (field 4 of /proc/PID/stat), if it can be read.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The command line of `pid`, split into arguments.
pub fn read_cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The SHA-256 of each environment variable `pid` started with, by name (see
/// [`Metadata::env_sha256`](crate::metadata::Metadata::env_sha256)).
pub(crate) fn env_hashes(pid: u32) -> BTreeMap<String, String> {
    environ(pid)
        .into_iter()
        .map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                crate::hashing::value_sha256(&value.to_string_lossy()),
            )
        })
        .collect()
}

/// The environment `pid` started with (`/proc/PID/environ`), in order; empty when it cannot
/// be read.
pub fn environ(pid: u32) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    use std::os::unix::ffi::OsStrExt;
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    environ
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let at = kv.iter().position(|&b| b == b'=')?;
            Some((
                std::ffi::OsStr::from_bytes(&kv[..at]).to_owned(),
                std::ffi::OsStr::from_bytes(&kv[at + 1..]).to_owned(),
            ))
        })
        .collect()
}

/// The file `pid` runs (`/proc/PID/exe`, followed), to tell it from another build.
///
/// # Errors
///
/// When the process is gone or may not be looked at.
pub fn executable(pid: u32) -> std::io::Result<fs::Metadata> {
    fs::metadata(format!("/proc/{pid}/exe"))
}

/// The working folder of `pid` (`/proc/PID/cwd`), if it can be read.
pub fn cwd(pid: u32) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The resident memory of the processes `pids` (`VmRSS`), in bytes: roughly what an image of
/// them takes.
pub fn resident_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
        .sum()
}
