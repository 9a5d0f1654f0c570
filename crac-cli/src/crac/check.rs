//! `crac check`: is checkpoint/restore possible here? One verdict line, then the details.

use serde::Serialize;

use crac_cli::criu;
use crac_cli::error::OpError;
use crac_cli::locate;
use crac_cli::store::Store;

use crate::output::Out;

mod sockets;

#[derive(Debug, Serialize)]
struct Report {
    possible: bool,
    verdict: String,
    checks: Vec<Check>,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

pub(crate) fn run(store: &Store, out: Out) -> Result<u8, OpError> {
    let mut checks = Vec::new();
    let mut fixes = Vec::new();

    match store.check_writable() {
        Ok(()) => checks.push(Check {
            name: "store",
            ok: true,
            detail: format!("image store {} is writable", store.root().display()),
        }),
        Err(err) => {
            checks.push(Check {
                name: "store",
                ok: false,
                detail: err.to_string(),
            });
            fixes.push("give crac a writable image store (--store DIR or CRAC_STORE)".to_owned());
        }
    }

    let criu = locate::locate();
    match &criu {
        Ok(criu) => checks.push(Check {
            name: "criu",
            ok: true,
            detail: format!(
                "CRIU {} at {} ({})",
                criu.version,
                criu.path.display(),
                match criu.source {
                    locate::Source::Env => "named by CRAC_CRIU",
                    locate::Source::Path => "found on PATH",
                    locate::Source::Provisioned => "installed by scripts/provision-criu.sh",
                }
            ),
        }),
        Err(err) => {
            checks.push(Check {
                name: "criu",
                ok: false,
                detail: err.to_string(),
            });
            fixes.push("run scripts/provision-criu.sh as root, or set CRAC_CRIU".to_owned());
        }
    }

    let privileges = criu::require_root("checkpoint");
    let root = privileges.is_ok();
    let who = if nix::unistd::geteuid().is_root() {
        "root".to_owned()
    } else {
        format!("uid {}", nix::unistd::geteuid())
    };
    checks.push(Check {
        name: "privileges",
        ok: root,
        detail: match &privileges {
            // CRIU is judged (`criu check`, the probe dump) in the mode crac runs it in.
            Ok(()) if criu::unprivileged() => format!(
                "running as {who} with CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, without all that CRIU's full mode needs: CRIU runs in its unprivileged mode (--unprivileged)"
            ),
            Ok(()) => format!("running as {who} with CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_SYS_TIME"),
            Err(err) => err.message.clone(),
        },
    });
    if !root {
        fixes.push(
            "give crac CAP_CHECKPOINT_RESTORE (a container: --cap-add CHECKPOINT_RESTORE)"
                .to_owned(),
        );
    }

    if let (Ok(criu), true) = (&criu, root) {
        let output = criu::CriuCommand::check(&criu.path).command().output();
        let (ok, detail) = match output {
            Ok(output) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains("RLIMIT_NOFILE") && !l.trim().is_empty())
                    .collect();
                // A read-only /proc/sys (a container without --privileged) is no obstacle:
                // CRIU gives pids back with clone3's set_tid, which CAP_CHECKPOINT_RESTORE
                // allows, and `criu check` complains of ns_last_pid alone.
                let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("Error")).collect();
                let only_ns_last_pid = !errors.is_empty()
                    && errors.iter().all(|l| l.contains("ns_last_pid"))
                    && criu::unprivileged();
                (
                    (output.status.success() && text.contains("Looks good")) || only_ns_last_pid,
                    format!(
                        "`criu check`: {}{}",
                        lines.join(" / "),
                        if only_ns_last_pid {
                            " (not needed: CRIU sets pids with clone3, allowed by CAP_CHECKPOINT_RESTORE)"
                        } else {
                            ""
                        }
                    ),
                )
            }
            Err(err) => (false, format!("cannot run `criu check`: {err}")),
        };
        if !ok {
            fixes.push(
                "read `criu check`'s complaint above; a kernel feature may be missing".to_owned(),
            );
        }
        checks.push(Check {
            name: "criu check",
            ok,
            detail,
        });
        let (ok, detail) = sockets::probe(&criu.path);
        if !ok {
            fixes.push(
                "use a CRIU that can dump the sockets services hold here (CRIU >= 4.2: scripts/provision-criu.sh)"
                    .to_owned(),
            );
        }
        checks.push(Check {
            name: "sockets",
            ok,
            detail,
        });
        checks.push(Check {
            name: "migration",
            // What `crac migrate` can do here; checkpoint/restore does not depend on it.
            ok: true,
            detail: migration(&criu.path),
        });
    }

    match criu::action_script() {
        Ok(path) => checks.push(Check {
            name: "crac-action",
            ok: true,
            detail: format!("{}", path.display()),
        }),
        Err(err) => {
            checks.push(Check {
                name: "crac-action",
                ok: false,
                detail: err.message.clone(),
            });
            fixes.push("install crac-action next to crac, or set CRAC_ACTION".to_owned());
        }
    }

    let (kernel, arch) = crac_cli::metadata::this_machine();
    checks.push(Check {
        name: "kernel",
        ok: true,
        detail: format!("Linux {kernel} on {arch}"),
    });
    let ptrace_scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "absent".to_owned());
    checks.push(Check {
        name: "ptrace",
        ok: ptrace_scope != "3",
        detail: format!(
            "yama ptrace_scope {ptrace_scope}{}",
            if ptrace_scope == "3" {
                ": ptrace is disabled, CRIU cannot seize processes"
            } else {
                ""
            }
        ),
    });
    checks.push(Check {
        name: "kdat cache",
        // Not having it costs time, not correctness.
        ok: true,
        detail: kdat_cache(),
    });
    let agent_dir = crac_protocol::location::base_dir();
    checks.push(Check {
        name: "agents",
        ok: true,
        detail: format!(
            "agent sockets under {} ({} set by {})",
            agent_dir.display(),
            if std::env::var_os(crac_protocol::location::DIR_ENV).is_some() {
                "as"
            } else {
                "default, can be"
            },
            crac_protocol::location::DIR_ENV
        ),
    });

    let possible = checks.iter().all(|c| c.ok);
    let verdict = if possible {
        "checkpoint/restore is possible here".to_owned()
    } else {
        format!(
            "checkpoint/restore is NOT possible here: {}",
            fixes.join("; ")
        )
    };
    let report = Report {
        possible,
        verdict,
        checks,
    };
    out.print(&report, || {
        let mut text = format!("{}\n", report.verdict);
        for check in &report.checks {
            text.push_str(&format!(
                "  [{}] {:<12} {}\n",
                if check.ok { "ok" } else { "!!" },
                check.name,
                check.detail
            ));
        }
        text
    });
    Ok(if possible { 0 } else { 3 })
}

/// Which `crac migrate` strategies this kernel allows: post-copy needs userfaultfd
/// (`criu check --feature uffd-noncoop`); pre-copy, which crac does not offer, would need the
/// kernel's memory tracking (soft-dirty bits, `--feature mem_dirty_track`), so `crac check`
/// says whether a kernel has it.
fn migration(criu: &std::path::Path) -> String {
    let has = |feature: &str| {
        criu::CriuCommand::check_feature(criu, feature)
            .command()
            .output()
            .is_ok_and(|out| out.status.success())
    };
    format!(
        "stop-and-copy: possible; post-copy: {}; pre-copy: {}",
        if has("uffd-noncoop") {
            "possible (userfaultfd)"
        } else {
            "NOT possible: no userfaultfd (`criu check --feature uffd-noncoop` fails)"
        },
        if has("mem_dirty_track") {
            "the kernel tracks memory (soft-dirty), but crac does not offer it yet"
        } else {
            "NOT possible: the kernel does not track changed memory (no soft-dirty bits, CONFIG_MEM_SOFT_DIRTY; `criu check --feature mem_dirty_track`: Dirty tracking is OFF)"
        }
    )
}

/// Whether CRIU keeps its kernel-feature probe (`/run/criu.kdat`) between runs. CRIU saves it
/// only where `/run` is a tmpfs, which a reboot empties: a cache on a disk would outlive a
/// kernel update, and every CRIU on the machine would trust it. So crac does not place one
/// itself; it says what each CRIU start then costs.
fn kdat_cache() -> String {
    let tmpfs = nix::sys::statfs::statfs("/run")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    let present = std::path::Path::new("/run/criu.kdat").exists();
    match (tmpfs, present) {
        (true, true) => "in use: CRIU loads /run/criu.kdat (a tmpfs, emptied at reboot) instead of probing the kernel at every start".to_owned(),
        (true, false) => "not yet made: CRIU writes /run/criu.kdat (a tmpfs) at its next run, and later runs skip the kernel probe".to_owned(),
        (false, _) => "not in use: /run is not a tmpfs, so CRIU probes the kernel at every start (about 25-40 ms here; BENCHMARKS.md has the figures with and without)".to_owned(),
    }
}
