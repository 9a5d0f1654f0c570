//! Services in namespaces of their own, against the real CRIU: crac-action finds the agent by
//! the process's own pid (`NSpid`) in its own root, and refuses what it must not follow.
//!
//! A tree with only a pid namespace of its own (`unshare --pid --fork`) is dumped and restored
//! by CRIU here. A tree with a mount namespace of its own is what CRIU leaves to container
//! runtimes (tests/e2e/containers.rs); here it shows the refusals, which happen at pre-dump,
//! before CRIU touches the tree.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{self, after_all, concat, text, wait_until, Crac, Scratch, Target, BEFORE_ALL};

/// A private /run/crac (root's agents' base) in a mount namespace of the target's own, as a
/// container has.
const PRIVATE_AGENT_DIR: &str =
    "mkdir -p -m 0700 /run/crac && mount -t tmpfs -o mode=0700 tmpfs /run/crac || exit 1";

/// pid 1 in its own pid namespace: the agent is at /run/crac/1, which crac-action finds from
/// the host pid; the image restores beside the original (CRIU makes a new pid namespace, so
/// the original's pid being in use does not matter, and `crac restore` knows it).
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_service_in_its_own_pid_namespace_is_checkpointed_and_a_copy_restored_beside_it() {
    let Some(_env) = util::env() else { return };
    // The original and its copy are pid 1 of their namespaces, sharing this file system: their
    // folder is /run/crac/1 here. pid 1 ignores SIGTERM, so they end by SIGKILL, which leaves
    // the folder: remove it once they are gone (dropped after them).
    let _folder = RemoveOnDrop(PathBuf::from("/run/crac/1"));
    let scratch = Scratch::new("pidns");
    let crac = Crac::new(&scratch);
    let target = Target::start_in_namespaces(
        &scratch.join("t"),
        &[("CRAC_TEST_STOP_AGENT_ON", "USR1")],
        &[],
        "",
    );
    assert_eq!(
        target.state().expect("state").pid,
        1,
        "not pid 1 in its namespace"
    );
    assert_ne!(target.pid, 1);
    let pid = target.pid.to_string();

    let done = crac.json(&[
        "checkpoint",
        &pid,
        "--name",
        "ns",
        "--leave-running",
        "--json",
    ]);
    assert_eq!(done["metadata"]["ns_pid"], 1);
    wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
        target.hooks().len() == 6
    });
    let mut expected = concat(&BEFORE_ALL, &after_all("resumed", 1));
    assert_eq!(target.hooks(), expected);

    // The copy binds /run/crac/1 again, on the file system it shares with the original: the
    // original's agent steps aside, while the original keeps running with its pid.
    kill(Pid::from_raw(target.pid as i32), Signal::SIGUSR1).expect("SIGUSR1");
    wait_until(
        Duration::from_secs(5),
        "the original's agent to stop",
        || !PathBuf::from("/run/crac/1/agent.sock").exists(),
    );
    assert!(target.is_alive());
    let restored = crac.json(&["restore", "ns", "--detach", "--json"]);
    let copy_pid = restored["pid"].as_u64().expect("pid") as u32;
    assert_ne!(copy_pid, target.pid, "{restored}");
    let copy = Target::restored_as(&target, copy_pid);
    assert!(copy.is_alive());
    let status = fs::read_to_string(format!("/proc/{copy_pid}/status")).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
        "{status}"
    );
    // The copy's memory is the image's: its cycle ends as generation 1 too.
    expected.extend(after_all("restored", 1));
    assert_eq!(target.hooks(), expected, "{restored}");
}

/// Many copies from one image at once: each restored into a pid namespace of its own, so
/// pids never collide; all serve the port the original listened on (SO_REUSEPORT: the kernel
/// spreads connections among them), and each renews what is unique (its instance id) in
/// after_restore. Restores of one image take turns (tens of ms each), so each copy's agent is
/// told right after its own restore; the copies share this file system, so their usual agent
/// folder is the same, /run/crac/1: the last copy keeps it, the others move to folders of
/// their own, and each answers `crac status` and `crac checkpoint`.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn copies_restored_from_one_image_at_once_share_its_port_are_each_unique_and_each_reachable() {
    let Some(_env) = util::env() else { return };
    // The original ends by SIGKILL (pid 1), which leaves its folder (dropped after it).
    let _folder = RemoveOnDrop(PathBuf::from("/run/crac/1"));
    // The folders the agents move to: each removed at its agent's graceful exit; the
    // original's (ended by SIGKILL) and a failed test's are removed here.
    let _moved = RemoveNewOnDrop::new("/run/crac", "1.");
    let scratch = Scratch::new("copies");
    let crac = Crac::new(&scratch);
    let target = Target::start_in_namespaces(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_LISTEN", "0"),
            ("CRAC_TEST_REUSEPORT", "1"),
            ("CRAC_TEST_OWN_SIGTERM", "after"),
            ("CRAC_TEST_SOCKET_CHECK_MS", "100"),
        ],
        &[],
        "",
    );
    let (port, _) = target.ports();
    let original = util::status(port);
    let pid = target.pid.to_string();
    crac.json(&[
        "checkpoint",
        &pid,
        "--name",
        "svc",
        "--leave-running",
        "--json",
    ]);

    const COPIES: usize = 3;
    let restores: Vec<_> = (0..COPIES)
        .map(|_| {
            crac.command(&["restore", "svc", "--detach", "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("crac restore starts")
        })
        .collect();
    let copies: Vec<u32> = restores
        .into_iter()
        .map(|restore| {
            let out = restore.wait_with_output().expect("crac restore ends");
            assert!(out.status.success(), "{}", util::text(&out));
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            json["pid"].as_u64().expect("pid") as u32
        })
        .collect();
    let mut distinct = copies.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), COPIES, "{copies:?}");
    for &copy in &copies {
        assert_ne!(copy, target.pid);
        let status = fs::read_to_string(format!("/proc/{copy}/status")).expect("status");
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
            "{status}"
        );
    }

    // Connections to the port reach the original and every copy: each its own instance, the
    // same memory (token) and generation 1.
    let mut instances = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let status = util::status(port);
        assert_eq!(status["token"], original["token"]);
        instances.insert(status["instance"].as_u64().expect("instance"));
    }
    assert_eq!(instances.len(), COPIES + 1, "{instances:?}");
    assert!(instances.contains(&original["instance"].as_u64().unwrap()));

    // The agent folder's path, /run/crac/1, is the same for all; the copy restored last bound
    // it. The others (the original too) find it held by another live agent at their next
    // socket check (every 100 ms here) and move to folders of their own, /run/crac/1.XXXXXX,
    // where crac-action finds each by its listening socket: every copy answers.
    let all: Vec<u32> = copies.iter().copied().chain([target.pid]).collect();
    wait_until(
        Duration::from_secs(10),
        "every copy's agent to answer",
        || {
            all.iter()
                .all(|pid| crac.run(&["status", &pid.to_string()]).status.success())
        },
    );
    let moved: Vec<u32> = copies
        .iter()
        .copied()
        .filter(|&copy| listening_agent_path(copy).is_some_and(|p| p.starts_with("/run/crac/1.")))
        .collect();
    assert_eq!(moved.len(), COPIES - 1, "copies that moved: {moved:?}");
    assert!(
        listening_agent_path(target.pid).is_some_and(|p| p.starts_with("/run/crac/1.")),
        "{:?}",
        listening_agent_path(target.pid)
    );

    // A checkpoint of a copy that moved reaches that copy's hooks: one instance's memory holds
    // them, and it is gone with that process.
    let hooks_by_instance = || {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..60 {
            let status = util::status(port);
            seen.insert(
                util::field(&status, "instance"),
                util::status_hooks(&status).len(),
            );
        }
        seen
    };
    let before = hooks_by_instance();
    assert_eq!(before.len(), COPIES + 1, "{before:?}");
    let chosen = moved[0];
    crac.json(&[
        "checkpoint",
        &chosen.to_string(),
        "--name",
        "copy",
        "--leave-running",
        "--json",
    ]);
    let after = hooks_by_instance();
    let grown: Vec<u64> = after
        .iter()
        .filter(|(instance, &hooks)| before.get(instance).is_some_and(|&b| hooks > b))
        .map(|(&instance, _)| instance)
        .collect();
    assert_eq!(grown.len(), 1, "before {before:?}, after {after:?}");
    kill(Pid::from_raw(chosen as i32), Signal::SIGTERM).expect("end the copy");
    util::reap(chosen, Duration::from_secs(10));
    let left = hooks_by_instance();
    assert!(!left.contains_key(&grown[0]), "{left:?}");
    assert_eq!(left.len(), COPIES, "{left:?}");

    for &copy in copies.iter().filter(|&&copy| copy != chosen) {
        kill(Pid::from_raw(copy as i32), Signal::SIGTERM).expect("end a copy");
        util::reap(copy, Duration::from_secs(10));
    }
}

/// The path process `pid`'s listening agent socket is bound to (a socket among its
/// descriptors, listening, named `agent.sock`, in /proc/PID/net/unix).
fn listening_agent_path(pid: u32) -> Option<String> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = fs::read_to_string(format!("/proc/{pid}/net/unix")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (flags, inode, path) = (fields.get(3)?, fields.get(6)?, fields.get(7)?);
        (*flags == "00010000" && inodes.iter().any(|i| i == inode) && path.ends_with("/agent.sock"))
            .then(|| (*path).to_owned())
    })
}

/// Removes, when dropped, the entries of `dir` whose names start with `prefix` that were not
/// there when it was made (agents' folders a test's processes left).
struct RemoveNewOnDrop {
    dir: PathBuf,
    prefix: &'static str,
    before: Vec<std::ffi::OsString>,
}

impl RemoveNewOnDrop {
    fn new(dir: &str, prefix: &'static str) -> RemoveNewOnDrop {
        let dir = PathBuf::from(dir);
        let before = RemoveNewOnDrop::entries(&dir, prefix);
        RemoveNewOnDrop {
            dir,
            prefix,
            before,
        }
    }

    fn entries(dir: &std::path::Path, prefix: &str) -> Vec<std::ffi::OsString> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with(prefix))
            .collect()
    }
}

impl Drop for RemoveNewOnDrop {
    fn drop(&mut self) {
        for name in RemoveNewOnDrop::entries(&self.dir, self.prefix) {
            if !self.before.contains(&name) {
                let _ = fs::remove_dir_all(self.dir.join(name));
            }
        }
    }
}

/// A service in network and mount namespaces of its own, whose stdin is a Unix socket
/// connected to this process: the preflight lists it as connected outside the tree, and the
/// hooks are rolled back. A socket belongs to the namespace it was made in, whoever holds it:
/// once made here (crac-action's namespace), once in the service's namespace (which only a
/// sock_diag socket made there can ask about).
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_unix_socket_connected_outside_a_service_in_its_own_network_namespace_is_listed() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("netns-unix");
    let crac = Crac::new(&scratch);
    let start = |name: &str, inside: std::os::unix::net::UnixStream, unshare: &[&str]| {
        Target::start_in_namespaces_with(
            &scratch.join(name),
            &[],
            unshare,
            PRIVATE_AGENT_DIR,
            std::process::Stdio::from(std::os::fd::OwnedFd::from(inside)),
        )
    };
    let (made_here, outside_here) = std::os::unix::net::UnixStream::pair().expect("a pair");
    let first = start("here", made_here, &["--net", "--mount"]);
    // The second is started from a thread in a network namespace of its own, where the pair
    // is made: the service runs there.
    let (second, _outside_there) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a netns");
                let (made_there, outside) = std::os::unix::net::UnixStream::pair().expect("a pair");
                (start("there", made_there, &["--mount"]), outside)
            })
            .join()
            .expect("the thread")
    });
    let netns = |pid: &str| fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    for target in [first, second] {
        let pid = target.pid.to_string();
        assert_ne!(netns(&pid), netns("self"));

        let out = crac.run(&["checkpoint", &pid, "--dry-run"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let bad: Vec<&str> = stdout.lines().filter(|l| l.starts_with("BAD  ")).collect();
        assert_eq!(bad.len(), 1, "{}", text(&out));
        assert!(
            bad[0].contains(&format!(
                "pid {pid} fd 0: unix (unnamed) -> (unnamed) (CRIU refuses a Unix socket \
                 connected to a process outside the tree"
            )),
            "{}",
            text(&out)
        );
        assert_eq!(
            target.hooks(),
            concat(&BEFORE_ALL, &after_all("aborted", 0))
        );
        assert!(target.is_alive());
    }
    drop(outside_here);
}

/// Removes a folder when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A trap: inside the container, the agent's folder is a link to another process's agent
/// folder on the host. Followed from outside, the absolute link would resolve on the host.
/// crac-action refuses, naming the link, and the host agent hears nothing.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_symlink_planted_in_a_containers_agent_folder_is_refused_and_not_followed() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("trap");
    let host = Target::start(&scratch.join("host"), &[]);
    let contained = Target::start_in_namespaces(
        &scratch.join("c"),
        &[],
        &["--mount", "--propagation", "private"],
        PRIVATE_AGENT_DIR,
    );
    let inside = PathBuf::from(format!("/proc/{}/root/run/crac", contained.pid));
    assert!(inside.join("1/agent.sock").exists());
    assert_ne!(
        fs::metadata(&inside).expect("inside").ino(),
        fs::metadata("/run/crac").expect("outside").ino(),
        "the folder is not private"
    );
    fs::rename(inside.join("1"), inside.join("1.moved")).expect("move the folder");
    let host_folder = format!("/run/crac/{}", host.pid);
    symlink(&host_folder, inside.join("1")).expect("plant the link");

    let dump = env.dump(contained.pid, &scratch.join("img"), &[], &[]);
    assert!(!dump.ok(), "{dump:?}");
    assert!(
        dump.log.contains(&format!(
            "crac-action: pre-dump: pid {}: /run/crac/1 is a symbolic link (to \"{host_folder}\") inside the process's own root; \
             crac-action does not follow it: the agent makes that path itself, so remove the link; \
             the dump is aborted and the tree keeps running",
            contained.pid
        )),
        "{dump:?}"
    );
    assert!(host.hooks().is_empty(), "the host's agent was reached");
    assert!(contained.hooks().is_empty());
    assert!(contained.is_alive() && host.is_alive());
}

/// The agent's folder in the container belongs to another uid: refused before anyone is told.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_agent_folder_owned_by_another_uid_is_refused() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("owner");
    let contained = Target::start_in_namespaces(
        &scratch.join("c"),
        &[],
        &["--mount", "--propagation", "private"],
        PRIVATE_AGENT_DIR,
    );
    let folder = PathBuf::from(format!("/proc/{}/root/run/crac/1", contained.pid));
    std::os::unix::fs::chown(&folder, Some(65534), None).expect("chown");
    let dump = env.dump(contained.pid, &scratch.join("img"), &[], &[]);
    assert!(!dump.ok(), "{dump:?}");
    assert!(
        dump.log.contains(&format!(
            "crac-action: pre-dump: pid {}: its agent folder /run/crac/1 inside the process's own root belongs to uid 65534, not to the process's uid 0; refusing to use it",
            contained.pid
        )),
        "{dump:?}"
    );
    assert!(contained.hooks().is_empty());
    contained.assert_serving(contained.state().expect("state").counter);
}

/// A service in a user namespace of its own: refused, saying why, before anyone is told.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_service_in_its_own_user_namespace_is_refused_with_the_reason() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("userns");
    let contained = Target::start_in_namespaces(
        &scratch.join("c"),
        &[],
        &[
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
        ],
        PRIVATE_AGENT_DIR,
    );
    let dump = env.dump(contained.pid, &scratch.join("img"), &[], &[]);
    assert!(!dump.ok(), "{dump:?}");
    assert!(
        dump.log.contains(&format!(
            "crac-action: pre-dump: pid {} runs in a user namespace of its own, which crac-action does not support",
            contained.pid
        )),
        "{dump:?}"
    );
    assert!(contained.hooks().is_empty());
    assert!(contained.is_alive());
}

/// The agent's folder comes from the service's own environment (CRIU's, and so
/// crac-action's, has no CRAC_AGENT_DIR), and a socket whose path, seen from outside through
/// /proc/PID/root, is longer than a socket address holds (108 bytes) is still reached: through
/// the folder's handle.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_agent_folder_named_by_the_service_with_a_long_path_is_reached() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("long");
    let prefix = scratch.path.to_str().expect("utf-8").len() + 1;
    let base = scratch.join(&"x".repeat(86 - prefix));
    let base_text = base.to_str().expect("utf-8").to_owned();
    let target = Target::start(
        &scratch.join("t"),
        &[(crac_protocol::location::DIR_ENV, base_text.as_str())],
    );
    let socket = base.join(target.pid.to_string()).join("agent.sock");
    assert!(socket.exists(), "the agent did not use its own folder");
    let outside = format!("/proc/{}/root{}", target.pid, socket.display());
    assert!(
        socket.as_os_str().len() < 108 && outside.len() > 108,
        "{outside} is not what this test is about"
    );
    assert!(std::env::var_os(crac_protocol::location::DIR_ENV).is_none());

    let dump = env.dump(target.pid, &scratch.join("img"), &["--leave-running"], &[]);
    assert!(dump.ok(), "{dump:?}");
    wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
        target.hooks().len() == 6
    });
    let expected = concat(&BEFORE_ALL, &after_all("resumed", 1));
    assert_eq!(target.hooks(), expected, "{dump:?}");
}
