//! The options of a CRIU run that decide what it accepts: its command line and the
//! configuration files it reads (`/proc/<criu>/cmdline` and `environ`, through
//! [`crate::procfs`]).

use std::fs;
use std::path::Path;

use crate::procfs;

/// CRIU's default `--ghost-limit`: 1 MiB.
const DEFAULT_GHOST_LIMIT: u64 = 1 << 20;

/// The options of a CRIU run that decide what it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriuOptions {
    /// Whether the options could be read (not under `criu swrk`).
    pub known: bool,
    /// `--tcp-established`.
    pub tcp_established: bool,
    /// `--ext-unix-sk`.
    pub ext_unix_sk: bool,
    /// `--shell-job`.
    pub shell_job: bool,
    /// `--ghost-limit`, in bytes.
    pub ghost_limit: u64,
    /// `--tcp-close`: connections are not dumped but closed, so CRIU takes them too.
    pub tcp_close: bool,
    /// `--skip-in-flight`: connections waiting on a listener are left out of the image.
    pub skip_in_flight: bool,
    /// `--file-locks`: the tree's file locks go into the image.
    pub file_locks: bool,
}

impl CriuOptions {
    /// Options as CRIU accepts them when it is given none.
    pub fn defaults() -> CriuOptions {
        CriuOptions {
            known: true,
            tcp_established: false,
            ext_unix_sk: false,
            shell_job: false,
            ghost_limit: DEFAULT_GHOST_LIMIT,
            tcp_close: false,
            skip_in_flight: false,
            file_locks: false,
        }
    }

    /// Options that could not be read: only the checks no option changes run.
    pub fn unknown() -> CriuOptions {
        CriuOptions {
            known: false,
            ..CriuOptions::defaults()
        }
    }

    /// The options of the CRIU process `pid`: the configuration files it read, then its
    /// command line. The default files (`/etc/criu/default.conf`, `~/.criu/default.conf`)
    /// count unless `--no-default-config` or `--config FILE` replaced them; `CRIU_CONFIG_FILE`
    /// counts either way.
    pub fn of_process(pid: u32) -> CriuOptions {
        let Some(args) = procfs::cmdline(pid) else {
            return CriuOptions::unknown();
        };
        if args.iter().any(|a| a == "swrk") {
            return CriuOptions::unknown();
        }
        let environ = procfs::environ(pid);
        let var = |name: &str| {
            environ
                .var(name)
                .map(|value| String::from_utf8_lossy(value).into_owned())
        };
        let mut files = Vec::new();
        let config = args
            .iter()
            .position(|a| a == "--config")
            .and_then(|at| args.get(at + 1));
        match config {
            Some(file) => files.push(file.clone()),
            None if !args.iter().any(|a| a == "--no-default-config") => {
                files.push("/etc/criu/default.conf".to_owned());
                if let Some(home) = var("HOME") {
                    files.push(format!("{home}/.criu/default.conf"));
                }
            }
            None => {}
        }
        files.extend(var("CRIU_CONFIG_FILE"));
        let mut words: Vec<String> = Vec::new();
        for file in files {
            words.extend(config_words(Path::new(&file)));
        }
        words.extend(args);
        CriuOptions::from_words(&words)
    }

    /// Options from command-line words (`--tcp-established`, `--ghost-limit 4M`, ...) and
    /// configuration lines (`tcp-established`).
    pub fn from_words(words: &[String]) -> CriuOptions {
        let mut opts = CriuOptions::defaults();
        let mut words = words.iter().map(|w| w.trim_start_matches('-'));
        while let Some(word) = words.next() {
            let (name, inline) = match word.split_once(['=', ' ']) {
                Some((name, value)) => (name, Some(value.trim().to_owned())),
                None => (word, None),
            };
            match name {
                "tcp-established" => opts.tcp_established = true,
                "ext-unix-sk" => opts.ext_unix_sk = true,
                "tcp-close" => opts.tcp_close = true,
                "skip-in-flight" => opts.skip_in_flight = true,
                "file-locks" | "l" => opts.file_locks = true,
                "shell-job" | "j" => opts.shell_job = true,
                "ghost-limit" => {
                    let value = inline.or_else(|| words.next().map(str::to_owned));
                    if let Some(limit) = value.as_deref().and_then(parse_size) {
                        opts.ghost_limit = limit;
                    }
                }
                _ => {}
            }
        }
        opts
    }
}

/// The option lines of a CRIU configuration file (comments and blanks dropped).
fn config_words(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `1048576`, `512K`, `4M`, `1G`, as CRIU reads sizes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last()? {
        'k' | 'K' => (&text[..text.len() - 1], 10),
        'm' | 'M' => (&text[..text.len() - 1], 20),
        'g' | 'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok().map(|n| n << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_flags_and_config_lines() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let opts = CriuOptions::from_words(&words(&[
            "criu",
            "dump",
            "--tcp-established",
            "--ghost-limit",
            "4M",
        ]));
        assert!(opts.tcp_established && !opts.shell_job && !opts.ext_unix_sk);
        assert_eq!(opts.ghost_limit, 4 << 20);
        let opts = CriuOptions::from_words(&words(&["shell-job", "ext-unix-sk", "ghost-limit 2K"]));
        assert!(opts.shell_job && opts.ext_unix_sk && !opts.tcp_established);
        assert_eq!(opts.ghost_limit, 2048);
        let opts = CriuOptions::from_words(&words(&["-j", "--ghost-limit=1G"]));
        assert!(opts.shell_job && !opts.skip_in_flight && !opts.tcp_close);
        assert_eq!(opts.ghost_limit, 1 << 30);
        let opts = CriuOptions::from_words(&words(&["--skip-in-flight", "tcp-close"]));
        assert!(opts.skip_in_flight && opts.tcp_close && !opts.tcp_established);
        assert!(!opts.file_locks);
        assert!(CriuOptions::from_words(&words(&["--file-locks"])).file_locks);
        assert!(CriuOptions::from_words(&words(&["file-locks"])).file_locks);
    }
}
