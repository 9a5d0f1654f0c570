//! Containers and `crac migrate`: whether a process runs in a container (which a process-level
//! migration must not take out of it), and podman as the container-level migration runs it.

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
        let parent = parent_of(current).filter(|&p| p > 1)?;
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
        what: "pid 1 of a pid namespace of its own, as a container's init is".to_owned(),
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
