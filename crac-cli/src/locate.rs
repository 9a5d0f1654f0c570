//! Finding a CRIU that works here: `$CRAC_CRIU`, then `criu` on `PATH`, then the copy that
//! `scripts/provision-criu.sh` installs. Versions before 4.1 cannot start on kernels 6.13 and
//! later ("vdso: Unexpected rt vDSO area bounds"), and 4.1 cannot dump a process holding a TCP
//! or UDP socket on recent kernels ("Can't get 1:16 opt": it asks for SO_PASSCRED on inet
//! sockets, which those kernels refuse; fixed in 4.2), so versions before 4.2 are passed over.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Names the CRIU binary to use; it must be CRIU >= 4.2.
pub const CRIU_ENV: &str = crac_protocol::env::CRIU;
/// The provisioning script's install prefix (default `/opt/crac-criu`).
pub const PREFIX_ENV: &str = crac_protocol::env::CRIU_PREFIX;
/// Where `scripts/provision-criu.sh` installs by default.
pub const DEFAULT_PREFIX: &str = "/opt/crac-criu";
/// The oldest CRIU that works on current kernels with the sockets services hold.
pub const MIN_VERSION: (u32, u32) = (4, 2);

/// Where a CRIU was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `$CRAC_CRIU`.
    Env,
    /// `criu` on `PATH`.
    Path,
    /// The provisioned copy.
    Provisioned,
}

/// A CRIU binary and its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Criu {
    /// The binary (or wrapper) to run.
    pub path: PathBuf,
    /// What `criu --version` says, e.g. `4.2.1`.
    pub version: String,
    /// Where it was found.
    pub source: Source,
}

/// No usable CRIU; the message lists what was tried and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("no usable CRIU (>= 4.2) found: {tried}; run scripts/provision-criu.sh as root, or set CRAC_CRIU to a CRIU >= 4.2")]
pub struct LocateError {
    tried: String,
}

/// Finds CRIU as described in the module documentation.
///
/// # Errors
///
/// When `$CRAC_CRIU` is set but unusable (it is not silently passed over), or nothing usable
/// was found.
pub fn locate() -> Result<Criu, LocateError> {
    if let Some(path) = std::env::var_os(CRIU_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return check(&path, Source::Env).map_err(|why| LocateError {
            tried: format!("{CRIU_ENV}={}: {why}", path.display()),
        });
    }
    let mut tried = Vec::new();
    if let Some(path) = on_path("criu") {
        match check(&path, Source::Path) {
            Ok(criu) => return Ok(criu),
            Err(why) => tried.push(format!("{} on PATH: {why}", path.display())),
        }
    } else {
        tried.push("no criu on PATH".to_owned());
    }
    let prefix = std::env::var_os(PREFIX_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PREFIX));
    let provisioned = prefix.join("bin/criu");
    match check(&provisioned, Source::Provisioned) {
        Ok(criu) => Ok(criu),
        Err(why) => {
            tried.push(format!("{}: {why}", provisioned.display()));
            Err(LocateError {
                tried: tried.join("; "),
            })
        }
    }
}

/// The first file called `name` in a folder of `PATH`.
pub(crate) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn check(path: &Path, source: Source) -> Result<Criu, String> {
    if !path.exists() {
        return Err("not found".into());
    }
    let version = match cached_version(path) {
        Some(version) => version,
        None => {
            let output = Command::new(path)
                .arg("--version")
                .output()
                .map_err(|err| format!("cannot run it: {err}"))?;
            let text = String::from_utf8_lossy(&output.stdout);
            let version = parse_version(&text)
                .ok_or_else(|| format!("`--version` printed no version ({:?})", text.trim()))?;
            remember_version(path, &version);
            version
        }
    };
    if !version_at_least(&version, MIN_VERSION) {
        return Err(format!(
            "version {version} is older than {}.{}, which current kernels need (4.1 cannot dump a process holding a TCP or UDP socket; older ones do not start)",
            MIN_VERSION.0, MIN_VERSION.1
        ));
    }
    Ok(Criu {
        path: path.to_owned(),
        version,
        source,
    })
}

/// `criu --version` takes about 7 ms (the provisioned CRIU starts through a loader), which
/// would be most of what `crac checkpoint` adds to a dump. So versions are cached in
/// `$XDG_CACHE_HOME/crac/criu-versions` (else `~/.cache/...`), keyed by the binary's path,
/// size and modification time: a replaced binary is asked again.
fn cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| Path::new(p).is_absolute())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("crac").join("criu-versions"))
}

fn cache_key(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    Some(format!(
        "{}\t{}\t{}.{}",
        canonical.display(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

fn cached_version(path: &Path) -> Option<String> {
    let key = cache_key(path)?;
    let file = cache_file()?;
    // Only a cache of our own that nobody else may write: a planted one would name another
    // version than the binary's.
    let text = String::from_utf8(crac_fs::read_trusted(&file, 1 << 20).ok()?).ok()?;
    text.lines()
        .find_map(|line| line.rsplit_once('\t').filter(|(k, _)| *k == key))
        .map(|(_, version)| version.to_owned())
}

fn remember_version(path: &Path, version: &str) {
    let (Some(key), Some(file)) = (cache_key(path), cache_file()) else {
        return;
    };
    let mut lines: Vec<String> = crac_fs::read_bounded(&file, 1 << 20)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            let path_part = line.split('\t').next().unwrap_or_default();
            path_part != key.split('\t').next().unwrap_or_default()
        })
        .map(str::to_owned)
        .collect();
    lines.push(format!("{key}\t{version}"));
    // A cache: failing to write it only costs the next run 7 ms.
    if let Some(dir) = file.parent() {
        if crac_fs::ensure_dir(dir).is_ok() {
            let _ = crac_fs::write_atomic(&file, (lines.join("\n") + "\n").as_bytes());
        }
    }
}

/// The version in `criu --version` output ("Version: 4.1.1").
pub fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether `version` ("X.Y[.Z]") is at least `min`.
pub fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= min,
        (Some(major), None) => major > min.0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("Version: 4.2.1\n"), Some("4.2.1".into()));
        assert_eq!(parse_version("GitID: x\n"), None);
        assert!(version_at_least("4.2.1", MIN_VERSION));
        assert!(version_at_least("4.3", MIN_VERSION));
        assert!(version_at_least("5.0", MIN_VERSION));
        assert!(!version_at_least("4.1.1", MIN_VERSION));
        assert!(!version_at_least("3.17.1", MIN_VERSION));
    }
}
