//! CRIU failure diagnosis: CRIU's log and stderr turned into what went wrong and what to do.
//!
//! CRIU's own errors name its internals ("Can't fork for 8996: File exists"); the lines kept
//! here (`criu_lines`) and the hints added to them ([`hints`]) are what `crac` prints under a
//! failed dump or restore. The table for people is docs/troubleshooting.md; CRIU's own figures
//! are read by [`crate::stats`].

use std::path::Path;
use std::process::ExitStatus;

/// CRIU's error lines and crac-action's lines, which together say what went wrong.
pub(crate) fn criu_lines(log: &str, stderr: &[u8]) -> Vec<String> {
    let stderr = String::from_utf8_lossy(stderr);
    log.lines()
        .chain(stderr.lines())
        .filter(|l| {
            (l.contains("Error (") && !l.contains("RLIMIT_NOFILE")) || l.starts_with("crac-action:")
        })
        .map(str::to_owned)
        .collect()
}

/// What to do about the CRIU errors people hit most.
pub fn hints(log: &str) -> Vec<String> {
    const HINTS: &[(&str, &str)] = &[
        ("not a session leader", "hint: start the service as a session leader (setsid) with stdio redirected to files or /dev/null, or pass -- --shell-job"),
        ("Found dangling tty", "hint: the service has a terminal on its stdio: redirect stdin/stdout/stderr to files or /dev/null"),
        ("External socket is used", "hint: the service holds a Unix connection to a process outside the tree: close it in a before_checkpoint hook"),
        ("Found a closed in-flight socket", "hint: a connection was closed by its peer before the service accepted it; retry the checkpoint"),
        ("Connected TCP socket", "hint: the service holds established TCP connections: close them in a before_checkpoint hook, or pass --tcp-established"),
        ("Unexpected rt vDSO area bounds", "hint: this CRIU is too old for the kernel: run scripts/provision-criu.sh and use CRIU >= 4.2"),
        ("Can't get 1:16 opt", "hint: this CRIU cannot dump TCP or UDP sockets on this kernel (CRIU 4.1 asks for SO_PASSCRED on them): use CRIU >= 4.2 (scripts/provision-criu.sh)"),
        ("iptables-restore", "hint: CRIU locks TCP connections with iptables by default and found no iptables-restore: install iptables, or pass -- --network-lock nftables (crac checkpoint --tcp-established does)"),
        ("In-flight connection", "hint: a client connected to a listener the service keeps while it was being dumped, and was not accepted yet: pass --skip-in-flight to criu (crac checkpoint does), which leaves such connections out of the image"),
        ("Can't open file", "hint: a file the image refers to is gone or changed (rebuilt binary?): restore needs the same files"),
        ("Some file locks are hold by dumping tasks", "hint: the service holds a file lock (a pidfile's flock, a database's locks, a descriptor inherited from flock(1)): release it in a before_checkpoint hook (a database: close it, and open it again in after_restore), or pass --file-locks, which takes the locks into the image (a restore then needs the same files, and fails while another process holds a conflicting lock); `crac checkpoint --dry-run` names each lock"),
        ("has bad size", "hint: a file the service had open changed size since the checkpoint: most often a log it writes to, opened without O_APPEND (`>` rather than `>>`), that grew; start the service with `>>` and checkpoint it again"),
    ];
    let mut hints: Vec<String> = HINTS
        .iter()
        .filter(|(needle, _)| log.contains(needle))
        .map(|(_, hint)| (*hint).to_owned())
        .collect();
    // CRIU says "File exists" of any file it creates (its pidfile too): only a fork that found
    // the pid taken is about a pid.
    if log
        .lines()
        .any(|l| l.contains("Can't fork for") && l.ends_with("File exists"))
    {
        hints.push("hint: a pid of the image is in use (often a dumped process not yet reaped): wait for it to exit, then retry".to_owned());
    }
    if log.contains("Pre dump script failed") {
        hints.push(pre_dump_hint(log).to_owned());
    }
    hints
}

/// What a failed dump left of the service `pid` (`alive` or not), from CRIU's `log`: for the
/// error's first line.
pub(crate) fn dump_failure_state(pid: u32, alive: bool, log: &str) -> String {
    if !alive {
        format!("pid {pid} is no longer running")
    } else if log.contains("killed by signal") && log.contains("Pre dump script failed") {
        // Nobody rolled back an agent that had answered: its lease does (crac-agent).
        format!(
            "pid {pid} is still running; an agent that crac-action had told ends that checkpoint by itself when its lease runs out (--timeout + 10 s at the most)"
        )
    } else if log.contains("did not reply within") {
        format!(
            "pid {pid} is still running; an agent that did not answer in time rolls back when its hooks are done"
        )
    } else {
        format!("pid {pid} is still running; hooks that ran were rolled back")
    }
}

/// Why pre-dump failed, from what crac-action (or CRIU, about crac-action) wrote.
fn pre_dump_hint(log: &str) -> &'static str {
    let said = |what: &str| {
        log.lines()
            .any(|l| l.starts_with("crac-action: pre-dump:") && l.contains(what))
    };
    if log.contains("killed by signal") {
        "hint: crac-action was killed before it finished (CRIU's line above says by which signal): the service keeps running, and an agent it had told ends that checkpoint by itself when its lease runs out (CRAC_ACTION_TIMEOUT + 10 s at the most)"
    } else if said("checkpoint refused:") {
        "hint: a before_checkpoint hook failed or timed out (see the crac-action line above); the service was rolled back and keeps running"
    } else if said("did not reply within") {
        "hint: an agent did not answer within crac-action's time limit (CRAC_ACTION_TIMEOUT, --timeout): its hooks are slower than that, or the process is stopped; it rolls itself back when it is done"
    } else if said("no agent in the process tree") {
        "hint: CRAC_REQUIRE_AGENT=1 refuses a tree without an agent: start one in the service (crac_agent::start()), or unset CRAC_REQUIRE_AGENT"
    } else if said("runs a crac agent") {
        "hint: the service's agent socket was removed; the agent makes it again within two minutes: retry then"
    } else if said("symbolic link")
        || said("belongs to uid")
        || said("may be written by others")
        || said("is not a socket")
        || said("refusing to talk to it")
        || said("user namespace")
    {
        "hint: crac-action refused what it found where an agent's socket should be (see its line above); nothing was told, and the service keeps running"
    } else {
        "hint: the action script failed before the dump (see its lines above); the service keeps running"
    }
}

pub(crate) fn status_text(status: &ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("{status}"),
    }
}

/// Why CRIU's log at `log_path` (`len` bytes) holds none of crac-action's lines, for a restore
/// whose root is `pid`: a full file system, when it is one.
pub(crate) fn log_incomplete(log_path: &Path, len: usize, pid: u32) -> String {
    let dir = log_path.parent().unwrap_or(Path::new("/"));
    // Root may use the blocks kept back for it: only none at all is full for root.
    let free = nix::sys::statvfs::statvfs(dir)
        .ok()
        .map(|fs| fs.blocks_free() * fs.fragment_size());
    let why = match free {
        Some(free) if free < 64 << 10 => format!(
            "the file system it is on is full ({}), so CRIU could not write it; free space there",
            if free == 0 {
                "no space left".to_owned()
            } else {
                format!("{free} bytes free")
            }
        ),
        _ => "it could not be written, or crac-action did not run at the restore".to_owned(),
    };
    format!(
        "CRIU's log {} ({len} bytes) holds none of crac-action's lines: {why}. The restore \
         succeeded, but whether the after_restore hooks ran, and how, is not known from here: \
         `crac status {pid}` asks its agent",
        log_path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last line of a failed pre-dump, as CRIU writes it.
    const FAILED: &str = "Error (criu/cr-dump.c:2011): Pre dump script failed with -1!";

    fn hint(lines: &[&str]) -> String {
        let log = lines.join("\n") + "\n" + FAILED;
        let hints = hints(&log);
        assert_eq!(hints.len(), 1, "{hints:?}");
        hints[0].clone()
    }

    #[test]
    fn only_a_pid_taken_is_blamed_on_a_pid_in_use() {
        let taken = "Error (criu/cr-restore.c:1237): Can't fork for 8996: File exists\nError (criu/cr-restore.c:2331): Restoring FAILED.";
        assert_eq!(
            hints(taken),
            ["hint: a pid of the image is in use (often a dumped process not yet reaped): wait for it to exit, then retry"]
        );
        // A pidfile someone made first: "File exists" too, and no pid is in use.
        let pidfile = "Error (criu/log.c:416): pidfile: Can't open /tmp/x.pid: File exists\nError (criu/cr-restore.c:1986): Can't write pidfile: File exists\nError (criu/cr-restore.c:2331): Restoring FAILED.";
        assert!(hints(pidfile).is_empty(), "{:?}", hints(pidfile));
    }

    #[test]
    fn a_failed_pre_dump_is_explained_by_its_cause() {
        for (lines, expected) in [
            (
                &["crac-action: pre-dump: pid 7: checkpoint refused: before_checkpoint of \"db\" failed: down"][..],
                "hint: a before_checkpoint hook failed or timed out",
            ),
            (
                &["crac-action: pre-dump: pid 7: the agent at /tmp/crac/7/agent.sock did not reply within 30s (CRAC_ACTION_TIMEOUT sets this limit)"],
                "hint: an agent did not answer within crac-action's time limit",
            ),
            (
                &["crac-action: pre-dump: no agent in the process tree of pid 7 (no socket at /tmp/crac/7/agent.sock); start one in the service with crac_agent::start(), or unset CRAC_REQUIRE_AGENT"],
                "hint: CRAC_REQUIRE_AGENT=1 refuses a tree without an agent",
            ),
            (
                &["crac-action: pre-dump: pid 7: /tmp/crac is a symbolic link (to \"/etc\")"],
                "hint: crac-action refused what it found",
            ),
            (
                &["Error (criu/util.c:660): killed by signal 9: Killed"],
                "hint: crac-action was killed before it finished",
            ),
            (&["something else"], "hint: the action script failed before the dump"),
        ] {
            let got = hint(lines);
            assert!(got.starts_with(expected), "{lines:?}: {got}");
        }
    }

    #[test]
    fn criu_s_refusal_of_file_locks_says_what_to_do() {
        let log = "Error (criu/file-lock.c:110): Some file locks are hold by dumping tasks! You can try --file-locks to dump them.\nError (criu/cr-dump.c:2111): Dumping FAILED.";
        let hints = hints(log);
        assert_eq!(hints.len(), 1, "{hints:?}");
        assert!(
            hints[0].starts_with("hint: the service holds a file lock")
                && hints[0].contains("release it in a before_checkpoint hook")
                && hints[0].contains("--file-locks"),
            "{hints:?}"
        );
    }
}
