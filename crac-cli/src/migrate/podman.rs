//! Containers and `crac migrate`: whether a process runs in a container (which a process-level
//! migration must not take out of it), and podman as the container-level migration runs it
//! (`crac migrate --container`, see [`super::container`]).

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::process::{parent_of, read_cmdline};

/// The container a process runs in, as far as its ancestors and namespaces tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enclosure {
    /// A podman container (its conmon is an ancestor).
    Podman {
        /// The container's name.
        name: String,
    },
    /// A container of another engine or runtime: what gave it away.
    Other {
        /// Which engine or runtime, or what makes it look like a container.
        what: String,
    },
}

/// How many ancestors are looked at: a container's monitor is a close one.
const MAX_ANCESTORS: usize = 64;

/// The container process `pid` runs in, if any: an ancestor that is podman's `conmon`, a
/// containerd shim (Docker, Kubernetes) or runc in the foreground; else, a process that is pid
/// 1 of a pid namespace other than this crac's.
pub fn enclosure(pid: u32) -> Option<Enclosure> {
    let mut current = pid;
    for _ in 0..MAX_ANCESTORS {
        let Some(parent) = parent_of(current).filter(|&p| p > 1) else {
            break;
        };
        let cmdline = read_cmdline(parent);
        let program = cmdline
            .first()
            .and_then(|p| p.rsplit('/').next())
            .unwrap_or_default();
        if program == "conmon" {
            return Some(match option_value(&cmdline, &["-n", "--name"]) {
                Some(name) => Enclosure::Podman { name },
                None => Enclosure::Other {
                    what: "a container of conmon (podman or CRI-O) whose name it does not give"
                        .to_owned(),
                },
            });
        }
        if program.starts_with("containerd-shim") {
            return Some(Enclosure::Other {
                what: format!("a containerd container ({program}: Docker or Kubernetes)"),
            });
        }
        if matches!(program, "runc" | "crun") {
            return Some(Enclosure::Other {
                what: format!("a {program} container"),
            });
        }
        current = parent;
    }
    // Not under a known monitor (runc -d leaves its container to init): pid 1 of a pid
    // namespace of its own is a container's init, or something as whole.
    (pid != 1 && crac_action::procfs::ns_pid(pid) == Some(1)).then(|| Enclosure::Other {
        what: "a pid namespace of its own, as its pid 1 (a container's init)".to_owned(),
    })
}

/// The value of the first of `names` in `args` (`-n NAME`, `--name NAME` or `--name=NAME`).
fn option_value(args: &[String], names: &[&str]) -> Option<String> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if names.contains(&arg.as_str()) {
            return args.next().cloned();
        }
        for name in names {
            if let Some(value) = arg
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
            {
                return Some(value.to_owned());
            }
        }
    }
    None
}

/// Why `crac migrate PID` refuses a process in `enclosure`, and what moves it instead.
pub fn refusal(pid: u32, enclosure: &Enclosure) -> String {
    match enclosure {
        Enclosure::Podman { name } => format!(
            "pid {pid} runs in the podman container {name}: taken out of it, it would lose its container (root file system, namespaces, cgroup) at the destination; move the container whole: crac migrate --container {name} --to HOST:PORT --key FILE (nothing was stopped)"
        ),
        Enclosure::Other { what } => format!(
            "pid {pid} runs in {what}: crac migrate moves a process tree of the host, or a podman container whole (--container NAME), and cannot recreate this container at the destination; move it with its engine's own checkpoint and restore (nothing was stopped)"
        ),
    }
}

/// podman as crac runs it: with the operator's global options (`--podman-arg`: its storage,
/// runtime, ...) before every command, and with the CRIU crac found first on its `PATH`, so that
/// podman runs the CRIU crac checked.
#[derive(Clone, Debug)]
pub struct Podman {
    global: Vec<String>,
    path: Option<OsString>,
}

/// A podman container, as `podman container inspect` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// Its name.
    pub name: String,
    /// Its full id.
    pub id: String,
    /// Its state (`running`, `exited`, ...).
    pub state: String,
    /// The host pid of its init (0 when it does not run).
    pub pid: u32,
    /// The image it was made from, by name (`localhost/web:1`).
    pub image: String,
    /// The image's id.
    pub image_id: String,
    /// The CRIU configuration file its `org.criu.config` annotation names, if any.
    pub criu_config: Option<String>,
    /// Whether it shares the host's network namespace (`--network host`).
    pub host_network: bool,
    /// Whether it shares the host's pid namespace (`--pid host`): its pids must then be free
    /// at the destination.
    pub host_pids: bool,
}

/// The annotation that names a container's CRIU configuration file (runc reads it).
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

impl Podman {
    /// podman with these global options.
    pub fn new(global: Vec<String>) -> Podman {
        let criu_dir = crate::criu::find()
            .ok()
            .and_then(|criu| criu.path.parent().map(Path::to_owned));
        let path = criu_dir.map(|dir| {
            let mut path = OsString::from(dir);
            if let Some(rest) = std::env::var_os("PATH") {
                path.push(":");
                path.push(rest);
            }
            path
        });
        Podman { global, path }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        cmd.args(&self.global)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(path) = &self.path {
            cmd.env("PATH", path);
        }
        cmd
    }

    fn output(&self, args: &[&str]) -> Result<Output, String> {
        self.command(args).output().map_err(|e| {
            format!(
                "cannot run podman ({}): install it (apt-get install podman)",
                crate::error::why(&e)
            )
        })
    }

    /// Runs `podman ARGS`; its standard output, or what it said when it failed.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = self.output(args)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(failure(args, &out))
    }

    /// podman's version, which says it runs.
    ///
    /// # Errors
    ///
    /// When podman is missing or does not run, saying so.
    pub fn version(&self) -> Result<String, String> {
        self.run(&["version", "--format", "{{.Client.Version}}"])
            .map(|v| v.trim().to_owned())
    }

    /// The container `name`.
    ///
    /// # Errors
    ///
    /// podman's word when there is no such container, or its answer cannot be read.
    pub fn inspect(&self, name: &str) -> Result<Container, String> {
        let out = self.run(&["container", "inspect", "--format", "json", name])?;
        let doc: Value = serde_json::from_str(&out)
            .map_err(|e| format!("podman container inspect gave no JSON: {e}"))?;
        let c = &doc[0];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let id = text(&c["Id"]);
        if id.is_empty() {
            return Err(format!(
                "podman container inspect {name} named no container"
            ));
        }
        Ok(Container {
            name: c["Name"].as_str().unwrap_or(name).to_owned(),
            id,
            state: text(&c["State"]["Status"]),
            pid: c["State"]["Pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
            image: text(&c["ImageName"]),
            image_id: text(&c["Image"]),
            criu_config: c["Config"]["Annotations"][CRIU_CONFIG_ANNOTATION]
                .as_str()
                .map(str::to_owned),
            host_network: c["HostConfig"]["NetworkMode"] == "host",
            host_pids: c["HostConfig"]["PidMode"] == "host",
        })
    }

    /// Whether the image `id` is in this podman's storage.
    ///
    /// # Errors
    ///
    /// When podman cannot tell.
    pub fn image_exists(&self, id: &str) -> Result<bool, String> {
        self.exists(&["image", "exists", id])
    }

    /// Whether a container named `name` exists.
    ///
    /// # Errors
    ///
    /// When podman cannot tell.
    pub fn container_exists(&self, name: &str) -> Result<bool, String> {
        self.exists(&["container", "exists", name])
    }

    /// `podman ... exists`: 0 yes, 1 no, anything else an error.
    fn exists(&self, args: &[&str]) -> Result<bool, String> {
        let out = self.output(args)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(failure(args, &out)),
        }
    }

    /// Checkpoints the container `name` into the archive `archive`, and keeps the checkpoint in
    /// podman's storage too (`--keep`), so that [`Podman::restore_kept`] can bring it back here.
    /// crac's hooks run through crac-action, which the container's CRIU configuration names.
    ///
    /// # Errors
    ///
    /// podman's word, with the last lines of CRIU's log (crac-action's among them).
    pub fn checkpoint_export(&self, name: &str, archive: &Path) -> Result<(), Vec<String>> {
        let archive = archive.to_string_lossy();
        self.run_logged(&[
            "container",
            "checkpoint",
            "--keep",
            "--export",
            &archive,
            name,
        ])
    }

    /// Restores a container from the archive `archive` (under the name it had).
    ///
    /// # Errors
    ///
    /// As [`Podman::checkpoint_export`].
    pub fn restore_import(&self, archive: &Path) -> Result<(), Vec<String>> {
        let archive = archive.to_string_lossy();
        self.run_logged(&["container", "restore", "--import", &archive])
    }

    /// Restores the container `name` from the checkpoint kept in podman's storage.
    ///
    /// # Errors
    ///
    /// As [`Podman::checkpoint_export`].
    pub fn restore_kept(&self, name: &str) -> Result<(), Vec<String>> {
        self.run_logged(&["container", "restore", name])
    }

    /// Removes the container `name` (stopped or not), with what it kept.
    ///
    /// # Errors
    ///
    /// podman's word.
    pub fn remove(&self, name: &str) -> Result<(), String> {
        self.run(&["container", "rm", "--force", "--time", "0", name])
            .map(drop)
    }

    /// Runs a checkpoint or restore: on failure, podman's lines and the last errors of the
    /// CRIU log it names (`log file: PATH`).
    fn run_logged(&self, args: &[&str]) -> Result<(), Vec<String>> {
        let out = self.output(args).map_err(|e| vec![e])?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut lines = vec![failure(args, &out)];
        let log = stderr
            .split_whitespace()
            .skip_while(|w| *w != "file:")
            .nth(1)
            .map(|p| p.trim_end_matches(['"', ')', ',']));
        if let Some(log) = log {
            let text = crac_fs::read_bounded(Path::new(log), LOG_LIMIT)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let interesting: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("Error") || l.contains("crac-action:"))
                .collect();
            let start = interesting.len().saturating_sub(LOG_LINES);
            lines.extend(interesting[start..].iter().map(|l| l.trim().to_owned()));
        }
        Err(lines)
    }
}

/// How much of CRIU's log is read, and how many of its lines are kept, for a failure.
const LOG_LIMIT: u64 = 4 << 20;
const LOG_LINES: usize = 12;

/// What `podman ARGS` said when it failed: its verb and its error lines.
fn failure(args: &[&str], out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("level=warning"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let verb: Vec<&str> = args
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .copied()
        .collect();
    format!(
        "podman {} failed ({}): {}",
        verb.join(" "),
        out.status,
        if said.is_empty() {
            "it said nothing".to_owned()
        } else {
            said.join("; ")
        }
    )
}

/// Whether the CRIU configuration file `path` names an action script: without one, podman's
/// CRIU runs no crac hooks. The problem, with what to do, if not.
pub fn criu_config_problem(path: &str) -> Option<String> {
    let text = match crac_fs::read_bounded(Path::new(path), 1 << 20) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => {
            return Some(format!(
                "cannot read the container's CRIU configuration {path} (its {CRIU_CONFIG_ANNOTATION} annotation): {}; put one there with the line `action-script /path/to/crac-action`",
                crate::error::why(&e)
            ))
        }
    };
    let names_script = text.lines().any(|line| {
        let line = line.trim();
        line.strip_prefix("action-script")
            .or_else(|| line.strip_prefix("--action-script"))
            .is_some_and(|rest| rest.starts_with([' ', '\t', '=']))
    });
    (!names_script).then(|| {
        format!(
            "the container's CRIU configuration {path} names no action-script: crac's hooks would not run; add the line `action-script /path/to/crac-action`"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn conmon_names_its_container_in_each_spelling() {
        for line in [
            "/usr/bin/conmon --api-version 1 -c abc -u abc -n web --exit-dir /x",
            "conmon --cid abc --name web",
            "conmon --name=web -c abc",
        ] {
            assert_eq!(
                option_value(&args(line), &["-n", "--name"]).as_deref(),
                Some("web"),
                "{line}"
            );
        }
        assert_eq!(option_value(&args("conmon -c abc -n"), &["-n"]), None);
    }

    #[test]
    fn the_refusal_names_the_container_path_or_says_why_not() {
        let podman = refusal(
            42,
            &Enclosure::Podman {
                name: "web".to_owned(),
            },
        );
        assert!(
            podman.contains("crac migrate --container web --to"),
            "{podman}"
        );
        assert!(podman.contains("nothing was stopped"), "{podman}");
        let other = refusal(
            42,
            &Enclosure::Other {
                what: "a runc container".to_owned(),
            },
        );
        assert!(
            other.starts_with("pid 42 runs in a runc container"),
            "{other}"
        );
        assert!(other.contains("its engine's own checkpoint"), "{other}");
    }
}
