//! `crac` loses nothing, against the real CRIU: an image CRIU made is never discarded (a failed
//! metadata write or commit keeps it, with the command that restores it; an interrupted
//! checkpoint finishes, or the next crac files its image), damaged images and changed
//! executables are refused by name, a failed after_restore has its own exit code, a restore
//! waits for the zombie of the process it brings back, and what cannot work is refused up front
//! with the reason.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{self, bin, text, wait_until, Crac, Scratch, Target};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The folder named after `the complete image is kept in ` on the message's first line.
fn kept_folder(stderr: &str) -> PathBuf {
    let first = stderr.lines().next().unwrap_or_default();
    let (_, path) = first
        .split_once("the complete image is kept in ")
        .unwrap_or_else(|| panic!("no kept folder in: {stderr}"));
    PathBuf::from(path)
}

/// The command after `restore it with: `, as printed.
fn printed_command(stderr: &str) -> Vec<String> {
    let line = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("restore it with: "))
        .unwrap_or_else(|| panic!("no restore command in: {stderr}"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// Runs a printed command; `crac` is this build's.
fn run_printed(command: &[String]) -> Output {
    let program = if command[0] == "crac" {
        bin("crac")
    } else {
        PathBuf::from(&command[0])
    };
    Command::new(program)
        .args(&command[1..])
        .stdin(Stdio::null())
        .output()
        .expect("the printed command runs")
}

/// The store's working folder of image `name` (there must be exactly one).
fn staging_of(crac: &Crac, name: &str) -> PathBuf {
    let found: Vec<String> = crac
        .listing()
        .into_iter()
        .filter(|n| n.starts_with(&format!(".staging-{name}-")))
        .collect();
    assert_eq!(found.len(), 1, "{:?}", crac.listing());
    crac.store.join(&found[0])
}

/// Whether some process's working folder is `dir` (CRIU works in its images folder).
fn someone_works_in(dir: &Path) -> bool {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .any(|e| fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir)))
        })
        .unwrap_or(false)
}

/// The name was taken while CRIU dumped (another crac, an operator): the commit fails after
/// CRIU stopped the service. The image stays, and the printed command restores it.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_image_that_cannot_be_filed_is_kept_with_the_command_that_restores_it() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("kept-commit");
    let crac = Crac::new(&scratch);
    let mkdir = format!("first:mkdir {}", crac.store.join("web").display());
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_BEFORE_SH", &mkdir)]);
    let pid = target.pid.to_string();
    let before = target.assert_serving(1);

    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = stderr(&out);
    let kept = kept_folder(&err);
    assert_eq!(
        err.lines().next().unwrap(),
        format!(
            "crac: criu dumped pid {pid} and stopped it, but crac could not file it in the store: an image named web already exists: use --replace or another --name; the complete image is kept in {}",
            kept.display()
        )
    );
    assert_eq!(
        printed_command(&err),
        ["crac", "restore", &kept.display().to_string(), "--detach"]
    );
    assert!(kept.join("pages-1.img").is_file(), "{:?}", crac.listing());

    let restored = Target::restored(&target);
    target.reap_dumped();
    let out = run_printed(&printed_command(&err));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(restored.assert_serving(before.counter).token, before.token);
}

/// The metadata cannot be written (here a folder is in its way, as a full disk would be):
/// the image stays, the printed CRIU command restores it, and the next store write, which
/// cannot finish it either, leaves it where it is and says so.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_image_whose_metadata_cannot_be_written_is_kept_and_restored_by_the_printed_command() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("kept-meta");
    let crac = Crac::new(&scratch);
    let mkdir = format!(
        "first:for d in {}/.staging-web-*; do mkdir \"$d/crac-meta.json\"; done",
        crac.store.display()
    );
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_BEFORE_SH", &mkdir)]);
    let pid = target.pid.to_string();
    let before = target.assert_serving(1);

    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = stderr(&out);
    let kept = kept_folder(&err);
    assert_eq!(kept, staging_of(&crac, "web"));
    assert!(
        err.starts_with(&format!(
            "crac: criu dumped pid {pid} and stopped it, but crac could not write the metadata into {}: ",
            kept.display()
        )),
        "{err}"
    );
    let command = printed_command(&err);
    assert_eq!(
        command[1..5],
        ["restore", "-D", &kept.display().to_string(), "-d"]
    );

    let restored = Target::restored(&target);
    target.reap_dumped();
    let out = run_printed(&command);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(restored.assert_serving(before.counter).token, before.token);

    let out = crac.run(&["images", "prune", "--keep", "5"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).starts_with(&format!(
            "crac: warning: a complete image of an interrupted checkpoint stays where it is: cannot finish the image in {}",
            kept.display()
        )),
        "{}",
        text(&out)
    );
    assert!(kept.join("pages-1.img").is_file());
}

/// Starts `crac checkpoint PID --name web` with a hook that takes a while, and returns it once
/// the hooks run.
fn checkpoint_under_way(crac: &Crac, target: &Target) -> std::process::Child {
    let pid = target.pid.to_string();
    let child = crac
        .command(&["checkpoint", &pid, "--name", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("crac starts");
    wait_until(Duration::from_secs(10), "the hooks to start", || {
        target.hooks().iter().any(|l| l == "before second")
    });
    child
}

fn slow_target(scratch: &Scratch) -> Target {
    Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_HANG", "second:1500"),
            ("CRAC_TEST_HOOK_LIMIT_MS", "10000"),
        ],
    )
}

/// SIGINT or SIGTERM during a checkpoint: crac says it finishes first, and does: a complete,
/// listed image that restores.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_interrupted_checkpoint_finishes_into_a_listed_image() {
    let Some(_env) = util::env() else { return };
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let scratch = Scratch::new("interrupted");
        let crac = Crac::new(&scratch);
        let target = slow_target(&scratch);
        let before = target.assert_serving(1);
        let child = checkpoint_under_way(&crac, &target);
        kill(Pid::from_raw(child.id() as i32), signal).expect("signal crac");
        let out = child.wait_with_output().expect("crac ends");
        assert!(out.status.success(), "{signal}: {}", text(&out));
        assert!(
            stderr(&out).starts_with(&format!(
                "crac: {signal} received: finishing this checkpoint first, so that the service ends up either running (rolled back) or in a complete image"
            )),
            "{}",
            text(&out)
        );
        let list = crac.json(&["images", "list", "--json"]);
        assert_eq!(list[0]["name"], "web", "{list}");
        let restored = Target::restored(&target);
        target.reap_dumped();
        let out = crac.run(&["restore", "web", "--detach"]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(restored.assert_serving(before.counter).token, before.token);
    }
}

/// crac killed outright during a checkpoint: CRIU finishes and stops the service; `images du`
/// says what the working folder is and what to do; the next store write files the image under
/// its name, and it restores.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_killed_checkpoint_is_filed_by_the_next_store_write() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("killed-crac");
    let crac = Crac::new(&scratch);
    let target = slow_target(&scratch);
    let pid = target.pid;
    let before = target.assert_serving(1);
    let mut child = checkpoint_under_way(&crac, &target);
    let staging = staging_of(&crac, "web");
    child.kill().expect("SIGKILL crac");
    child.wait().expect("reap crac");
    wait_until(Duration::from_secs(30), "CRIU to finish the dump", || {
        staging.join("stats-dump").exists() && !someone_works_in(&staging)
    });
    let restored = Target::restored(&target);
    target.reap_dumped();
    util::reap_orphans();
    wait_until(
        Duration::from_secs(20),
        "crac-action's watcher to exit",
        || util::watchers().is_empty(),
    );

    let out = crac.run(&["images", "du"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "  working folders of checkpoints and imports in progress or interrupted: `crac images prune` (and any crac that writes to the store) files the complete images among them in the store and removes the rest\n"
        ),
        "{}",
        text(&out)
    );
    let out = crac.run(&["images", "prune", "--keep", "5"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "recovered web (the complete image of an interrupted checkpoint of pid {pid}, found in {})\n",
            staging.display()
        )
    );
    assert_eq!(crac.listing(), ["web"]);
    let out = crac.run(&["restore", "web", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(restored.assert_serving(before.counter).token, before.token);
}

/// An after_restore that fails: the service is restored and runs, and crac exits 5 naming the
/// resource.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_failed_after_restore_has_its_own_exit_code() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("restore-hook");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_FAIL_RESTORE", "second")]);
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();
    let out = crac.run(&["restore", "web", "--detach"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "crac: pid {pid} was restored and runs, but after_restore failed: pid {pid}: "
        )) && err.contains("second cannot come back up"),
        "{err}"
    );
    assert!(restored.is_alive());
    // crac status and crac ps still say so afterwards.
    let out = crac.run(&["status", &pid]);
    assert!(out.status.success(), "{}", text(&out));
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(
            "  last cycle: restored, with failures:\n    after_restore of \"second\": failed: \
             second cannot come back up\n"
        ),
        "{status}"
    );
    let ps = crac.json(&["ps", "--json"]);
    let row = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == restored.pid)
        .expect("the restored target is listed");
    assert_eq!(row["last_cycle"], "restored");
    assert_eq!(
        row["last_failures"],
        serde_json::json!(["after_restore of \"second\": failed: second cannot come back up"])
    );
    restored.terminate();
}

/// Restoring while the dumped process is still a zombie: crac waits for it to be reaped.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_restore_waits_for_the_zombie_of_the_dumped_process() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("zombie");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid.to_string();
    let before = target.assert_serving(1);
    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert!(out.status.success(), "{}", text(&out));

    let mut restore = crac
        .command(&["restore", "web", "--detach"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("crac starts");
    let mut err = BufReader::new(restore.stderr.take().expect("stderr"));
    let mut first = String::new();
    err.read_line(&mut first).expect("a line");
    assert!(
        first.starts_with(&format!(
            "crac: waiting for pid {pid} to be reaped (a zombie: "
        )),
        "{first}"
    );
    let restored = Target::restored(&target);
    target.reap_dumped();
    let mut rest = String::new();
    err.read_to_string(&mut rest).expect("stderr");
    let status = restore.wait().expect("crac ends");
    assert!(status.success(), "{rest}");
    assert_eq!(restored.assert_serving(before.counter).token, before.token);
}

/// pid 1, crac's own ancestors and a caller who is not root are refused before anything runs,
/// with the reason; so is a store crac cannot write, by `crac check`.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn what_cannot_work_is_refused_up_front_with_the_reason() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("refused");
    let crac = Crac::new(&scratch);

    let out = crac.run(&["checkpoint", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).starts_with(
            "crac: pid 1 is this system's init: dumping it would stop every process on the machine"
        ),
        "{}",
        text(&out)
    );
    let me = std::process::id().to_string();
    let out = crac.run(&["checkpoint", &me, "--name", "me"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).starts_with(&format!("crac: pid {me} is an ancestor of this crac (`")),
        "{}",
        text(&out)
    );
    assert!(crac.listing().is_empty(), "{:?}", crac.listing());

    // Not a session leader (it shares this test's session): CRIU would refuse after the hooks.
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .expect("sleep starts");
    let sleeper_pid = sleeper.id().to_string();
    let out = crac.run(&["checkpoint", &sleeper_pid, "--name", "sleep"]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).starts_with(&format!(
            "crac: pid {sleeper_pid} is not a session leader (its session is "
        )) && stderr(&out).contains("start the service with setsid, or pass -- --shell-job"),
        "{}",
        text(&out)
    );

    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid.to_string();
    // Run from a folder any user can reach: the checkout may sit in one only root can (a
    // mktemp -d clone).
    let unprivileged = scratch.join("unprivileged");
    fs::create_dir_all(&unprivileged).expect("a folder for nobody");
    fs::set_permissions(&scratch.path, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::set_permissions(&unprivileged, fs::Permissions::from_mode(0o755)).expect("chmod");
    let crac_copy = unprivileged.join("crac");
    fs::copy(bin("crac"), &crac_copy).expect("copy crac");
    let out = Command::new(&crac_copy)
        .args(["--store"])
        .arg(&crac.store)
        .args(["checkpoint", &pid, "--name", "web"])
        .current_dir(&unprivileged)
        .stdin(Stdio::null())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("crac runs");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        stderr(&out).starts_with(
            "crac: crac checkpoint runs as uid 65534 without CAP_CHECKPOINT_RESTORE, which CRIU needs to stop, read and recreate processes: give it that capability"
        ),
        "{}",
        text(&out)
    );
    target.assert_serving(target.state().expect("state").counter);

    let out = Command::new(bin("crac"))
        .args(["--store", "/sys/crac-images", "check"])
        .stdin(Stdio::null())
        .output()
        .expect("crac runs");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "  [!!] store        image store /sys/crac-images is not writable (Operation not permitted): set CRAC_STORE to a writable folder or run as root\n"
        ),
        "{}",
        text(&out)
    );
}

/// Flips one byte of `path` at `offset` (same size, other content).
/// A file a child of the dumped root had mapped is checked too.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_changed_file_a_child_had_mapped_is_refused_by_name() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("integrity-child");
    let crac = Crac::new(&scratch);
    let data = scratch.join("child-data.bin");
    fs::write(&data, vec![7u8; 8192]).expect("a file to map");
    let target = Target::start(
        &scratch.join("t"),
        &[
            ("CRAC_TEST_CHILD", "1"),
            ("CRAC_TEST_CHILD_MAP", &data.display().to_string()),
        ],
    );
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();
    // The dumped child, re-parented to this test (a subreaper) when its parent went.
    util::reap_orphans();
    flip_byte(&data, 100);
    let out = crac.run(&["restore", "web", "--detach"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!(
            "the file {} that the service had mapped is not the one it had",
            data.display()
        )),
        "{}",
        text(&out)
    );
    flip_byte(&data, 100);
    let out = crac.run(&["restore", "web", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let child: u32 = fs::read_to_string(restored.dir.join("child/state"))
        .expect("the child's state")
        .split_whitespace()
        .next()
        .expect("its pid")
        .parse()
        .expect("a pid");
    restored.end_with_child(child);
}

fn flip_byte(path: &Path, offset: u64) {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.read_exact(&mut byte).expect("read");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(&[byte[0] ^ 0xff]).expect("write");
}

/// A same-size corrupted image file, a same-size changed executable and a changed mapped file:
/// `images verify` and `restore` refuse, naming the file; put back, the image verifies and
/// restores.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_corrupted_image_or_a_changed_executable_or_library_is_refused_by_name() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("integrity");
    let crac = Crac::new(&scratch);
    let exe = scratch.join("service");
    fs::copy(bin("crac-test-target"), &exe).expect("copy the target");
    let data = scratch.join("data.bin");
    fs::write(&data, vec![7u8; 8192]).expect("a file to map");
    let target = Target::start_with(
        &exe,
        &scratch.join("t"),
        &[("CRAC_TEST_MAP", &data.display().to_string())],
        None,
    );
    let pid = target.pid.to_string();
    let before = target.assert_serving(1);
    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();

    let pages = crac.store.join("web/pages-1.img");
    flip_byte(&pages, 100);
    let damaged = "image file pages-1.img does not hold what was dumped (its SHA-256 differs)";
    for args in [
        &["images", "verify", "web"][..],
        &["restore", "web", "--detach"],
    ] {
        let out = crac.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(stderr(&out).contains(damaged), "{args:?}: {}", text(&out));
    }
    flip_byte(&pages, 100);
    let out = crac.run(&["images", "verify", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("image web: intact ("),
        "{}",
        text(&out)
    );

    let len = fs::metadata(&exe).expect("exe").len();
    flip_byte(&exe, len - 1);
    let changed = format!(
        "the executable {} is not the one the service ran (its SHA-256 differs)",
        exe.display()
    );
    for args in [
        &["images", "verify", "web"][..],
        &["restore", "web", "--detach"],
    ] {
        let out = crac.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(stderr(&out).contains(&changed), "{args:?}: {}", text(&out));
    }
    assert!(!restored.is_alive());
    flip_byte(&exe, len - 1);

    flip_byte(&data, 100);
    let changed = format!(
        "the file {} that the service had mapped is not the one it had (its SHA-256 differs)",
        data.display()
    );
    for args in [
        &["images", "verify", "web"][..],
        &["restore", "web", "--detach"],
    ] {
        let out = crac.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(stderr(&out).contains(&changed), "{args:?}: {}", text(&out));
    }
    flip_byte(&data, 100);
    let out = crac.run(&["restore", "web", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(restored.assert_serving(before.counter).token, before.token);
}

/// Stdout to a file opened without O_APPEND is warned about at the checkpoint, with the fix;
/// with O_APPEND it is not.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn stdout_to_a_file_opened_without_o_append_is_warned_about() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("append");
    let crac = Crac::new(&scratch);
    let exe = bin("crac-test-target");
    for append in [false, true] {
        let log = scratch.join(&format!("out-{append}.log"));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&log)
            .expect("log file");
        let target =
            Target::start_with(&exe, &scratch.join(&format!("t-{append}")), &[], Some(file));
        let pid = target.pid.to_string();
        let name = format!("web-{append}");
        let out = crac.run(&["checkpoint", &pid, "--name", &name, "--leave-running"]);
        assert!(out.status.success(), "{}", text(&out));
        let warning = format!(
            "crac: warning: pid {pid}'s stdout is the file {} opened without O_APPEND (`>` rather than `>>`): once that file grows, CRIU refuses to restore this image (\"has bad size\"); start the service with `>> {}` (or open the file with O_APPEND)\n",
            log.display(),
            log.display()
        );
        assert_eq!(stderr(&out).contains(&warning), !append, "{}", text(&out));
        target.assert_serving(target.state().expect("state").counter);
    }
}
