//! The `crac` command end to end, against the real CRIU: every command, and its bad inputs.
//! Each failure must give a clear message and a non-zero exit code, and leave the store and
//! the process as they were.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::util::{self, agent_dir, bin, read_lines, text, wait_until, Crac, Scratch, Target};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fails_with(out: &Output, code: i32, message: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", text(out));
    assert!(
        stderr(out).contains(message),
        "expected {message:?} in:\n{}",
        text(out)
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn check_gives_a_verdict() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("check");
    let crac = Crac::new(&scratch);
    let out = crac.run(&["check"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().next(),
        Some("checkpoint/restore is possible here")
    );
    let report = crac.json(&["check", "--json"]);
    assert_eq!(report["possible"], true);
    assert!(report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "criu check" && c["ok"] == true));
    // CRIU was asked to dump a process holding TCP and UDP sockets, and could.
    let sockets = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sockets")
        .expect("a sockets check");
    assert_eq!(sockets["ok"], true, "{sockets}");
    assert!(sockets["detail"]
        .as_str()
        .unwrap()
        .starts_with("CRIU dumps a process holding a TCP listener and a UDP socket ("));
    assert!(
        stdout.contains("[ok] sockets"),
        "the probe's line is missing: {stdout}"
    );
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn checkpoint_list_show_restore_status_and_remove() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-cycle");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid.to_string();
    let frozen_before = target.assert_serving(2);

    let ps = crac.json(&["ps", "--json"]);
    let row = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == target.pid)
        .expect("the target is listed by crac ps");
    assert_eq!(row["state"], "idle");
    assert_eq!(
        row["resources"],
        serde_json::json!(["first", "second", "third"])
    );

    let done = crac.json(&["checkpoint", &pid, "--name", "web", "--json"]);
    assert_eq!(done["left_running"], false);
    let meta = &done["metadata"];
    assert_eq!(meta["pid"], target.pid);
    assert_eq!(meta["name"], "web");
    assert_eq!(meta["arch"], std::env::consts::ARCH);
    let hooks: Vec<&str> = meta["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["resource"].as_str().unwrap())
        .collect();
    assert_eq!(hooks, ["third", "second", "first"]);
    assert!(meta["timings"]["dump_ms"].as_f64().unwrap() > 0.0);
    assert!(crac.store.join("web/crac-meta.json").exists());
    assert!(crac.store.join("web/stats-dump").exists());
    let restored = Target::restored(&target);
    target.reap_dumped();

    let list = crac.json(&["images", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "web");
    let shown = crac.json(&["images", "show", "web", "--json"]);
    assert_eq!(shown["valid"], true);
    let du = crac.json(&["images", "du", "--json"]);
    assert!(du["total"].as_u64().unwrap() > 100_000);

    let out = crac.run(&["restore", "web", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("restored pid {pid} from ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("after_restore (restored) ok, 3 hooks"),
        "{stdout}"
    );
    assert_eq!(
        restored.hooks()[3..],
        [
            "after first restored gen=1",
            "after second restored gen=1",
            "after third restored gen=1"
        ]
    );
    let state = restored.assert_serving(frozen_before.counter);
    assert_eq!(state.token, frozen_before.token);
    let status = crac.json(&["status", &pid, "--json"]);
    assert_eq!(status["generation"], 1);
    assert_eq!(status["state"], "idle");

    let out = crac.run(&["images", "rm", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(crac.listing().iter().all(|n| n != "web"));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn checkpoint_bad_inputs_leave_store_and_process_as_they_were() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-bad-checkpoint");
    let crac = Crac::new(&scratch);

    // An unknown pid.
    let out = crac.run(&["checkpoint", "999999999", "--name", "x"]);
    fails_with(&out, 2, "crac: no process with pid 999999999");
    assert!(crac.listing().is_empty());

    // A bad name.
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_FAIL", "second")]);
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "../evil"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(target.hooks().is_empty(), "hooks ran for a refused request");

    // A failing hook: exit 1, the service rolled back and running, nothing in the store.
    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    fails_with(
        &out,
        1,
        &format!("crac: criu dump of pid {pid} failed (exit code 1); pid {pid} is still running; hooks that ran were rolled back"),
    );
    assert!(stderr(&out).contains("before_checkpoint of \"second\" failed: second cannot go down"));
    assert!(stderr(&out).contains("hint: a before_checkpoint hook failed"));
    assert!(target.is_alive());
    assert_eq!(
        crac.listing(),
        Vec::<String>::new(),
        "a failed dump left something in the store"
    );
    let state = target.state().unwrap();
    target.assert_serving(state.counter);

    // A store that cannot be written: nothing is dumped, no hook runs.
    let hooks_before = target.hooks().len();
    let out = Command::new(bin("crac"))
        .args([
            "--store",
            "/sys/crac-store",
            "checkpoint",
            &pid,
            "--name",
            "web",
        ])
        .output()
        .unwrap();
    fails_with(&out, 3, "image store /sys/crac-store is not writable");
    assert_eq!(target.hooks().len(), hooks_before);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn an_existing_name_is_refused_unless_replaced() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-replace");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "web", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    let first =
        crac.json(&["images", "show", "web", "--json"])["metadata"]["created_unix_ms"].clone();
    wait_until(Duration::from_secs(10), "resumed", || {
        target.hooks().len() == 6
    });

    let out = crac.run(&["checkpoint", &pid, "--name", "web", "--leave-running"]);
    fails_with(&out, 2, "an image named web already exists");
    assert_eq!(
        target.hooks().len(),
        6,
        "hooks ran for a refused checkpoint"
    );

    // --sync: the replacement is flushed to disk before it takes the name.
    let out = crac.run(&[
        "checkpoint",
        &pid,
        "--name",
        "web",
        "--leave-running",
        "--replace",
        "--sync",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let second =
        crac.json(&["images", "show", "web", "--json"])["metadata"]["created_unix_ms"].clone();
    assert_ne!(first, second);
    assert_eq!(crac.listing(), ["web"]);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn restore_bad_inputs_are_refused_before_criu_runs() {
    let Some(env) = util::env() else { return };
    let scratch = Scratch::new("cli-bad-restore");
    let crac = Crac::new(&scratch);

    let out = crac.run(&["restore", "nothing"]);
    fails_with(&out, 2, "no image named nothing in ");

    // An image of a process that still runs: its pid is in use.
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "web", "--leave-running"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = crac.run(&["restore", "web", "--detach"]);
    fails_with(&out, 2, &format!("pid {pid} is in use by `"));
    assert!(target.is_alive());
    drop(target);
    let _ = env;

    let listing = crac.listing();
    let image = crac.store.join("web");

    // A truncated image file.
    let pages = fs::read_dir(&image)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages image");
    let original = fs::read(&pages).unwrap();
    fs::write(&pages, &original[..original.len() / 2]).unwrap();
    let out = crac.run(&["restore", "web", "--detach"]);
    fails_with(&out, 2, "is truncated");
    fs::write(&pages, &original).unwrap();

    // Corrupt metadata.
    let meta = image.join("crac-meta.json");
    let saved = fs::read(&meta).unwrap();
    fs::write(&meta, b"{ not json").unwrap();
    let out = crac.run(&["restore", "web", "--detach"]);
    fails_with(&out, 2, "crac-meta.json in");
    fails_with(&out, 2, "is corrupt");
    fs::remove_file(&meta).unwrap();
    let out = crac.run(&["restore", "web", "--detach"]);
    fails_with(&out, 2, "no crac-meta.json in");
    fs::write(&meta, saved).unwrap();

    assert_eq!(crac.listing(), listing);
    let out = crac.run(&["images", "show", "web"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn export_and_import_round_trip_and_a_damaged_archive_is_refused() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-archive");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();

    let archive = scratch.join("web.crac");
    let out = crac.run(&["images", "export", "web", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    // Damaged in transit: one byte flipped in the middle.
    let mut bytes = fs::read(&archive).unwrap();
    let damaged = scratch.join("damaged.crac");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    fs::write(&damaged, &bytes).unwrap();
    let before = crac.listing();
    let out = crac.run(&[
        "images",
        "import",
        damaged.to_str().unwrap(),
        "--name",
        "copy",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("damaged"), "{}", text(&out));
    assert_eq!(
        crac.listing(),
        before,
        "a damaged import left something behind"
    );

    // A good import, under a new name, restores.
    fs::remove_dir_all(crac.store.join("web")).unwrap();
    let out = crac.run(&[
        "images",
        "import",
        archive.to_str().unwrap(),
        "--name",
        "copy",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = crac.run(&["restore", "copy", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    restored.assert_serving(0);
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn status_and_ps_explain_what_is_missing() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-status");
    let crac = Crac::new(&scratch);
    let out = crac.run(&["status", "999999999"]);
    fails_with(&out, 2, "crac: no process with pid 999999999");
    let target = Target::start(&scratch.join("t"), &[("CRAC_TEST_NO_AGENT", "1")]);
    let out = crac.run(&["status", &target.pid.to_string()]);
    fails_with(
        &out,
        2,
        &format!(
            "crac: pid {} runs no agent (no socket at {})",
            target.pid,
            agent_dir(target.pid).join("agent.sock").display()
        ),
    );
    let out = crac.run(&["status", &target.pid.to_string(), "--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("a JSON error document");
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["error"]["kind"], "bad-input");
    // --store is global, and these two read no store: refused rather than ignored.
    for command in ["ps", "status"] {
        let mut args = vec!["--store", "/tmp", command];
        let pid = target.pid.to_string();
        if command == "status" {
            args.push(&pid);
        }
        let out = Command::new(bin("crac"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("crac runs");
        fails_with(
            &out,
            2,
            "crac: --store: `crac ps` and `crac status` read no image store (they ask running processes); drop --store",
        );
    }
}

/// `crac run` with self-checkpoint: the first run starts cold, the service warms up and
/// checkpoints itself (leave-running); the second run starts warm from that image.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn run_starts_cold_then_warm_from_the_services_own_checkpoint() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-run");
    let crac = Crac::new(&scratch);
    let dir = scratch.join("t");
    fs::create_dir_all(&dir).unwrap();
    let log = scratch.join("service.log");
    let run = |name: &str, setting: Option<(&str, &str)>| {
        let stderr = scratch.join(name);
        let child = crac
            .command(&[
                "run",
                "--image",
                "svc",
                "--log",
                log.to_str().unwrap(),
                "--",
            ])
            .arg(bin("crac-test-target"))
            .env("CRAC_TEST_DIR", &dir)
            .env("CRAC_TEST_SELF_CHECKPOINT", "leave")
            .envs(setting)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("crac run starts");
        (child, stderr)
    };
    let hooks = || read_lines(&dir.join("hooks.log"));

    let (mut cold, cold_err) = run("cold.stderr", None);
    wait_until(Duration::from_secs(30), "the self-checkpoint", || {
        hooks().iter().any(|l| l.starts_with("self-checkpoint"))
    });
    assert_eq!(
        hooks(),
        [
            "before third",
            "before second",
            "before first",
            "after first resumed gen=1",
            "after second resumed gen=1",
            "after third resumed gen=1",
            "self-checkpoint: resumed"
        ],
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(crac.store.join("svc/crac-meta.json").exists());
    kill(Pid::from_raw(cold.id() as i32), Signal::SIGTERM).unwrap();
    let status = cold.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "SIGTERM forwarded and the status returned"
    );
    let said = fs::read_to_string(&cold_err).unwrap();
    assert!(
        said.contains("crac run: no warm start: no image named svc in "),
        "{said}"
    );
    assert!(said.contains("crac run: started cold as pid"), "{said}");

    // What the restoring command's environment changes is handed to the restored service.
    let (mut warm, warm_err) = run("warm.stderr", Some(("E2E_LOG_LEVEL", "debug")));
    wait_until(Duration::from_secs(30), "the restored service", || {
        hooks().iter().any(|l| l == "self-checkpoint: restored")
    });
    assert_eq!(
        hooks()[7..],
        [
            "after first restored gen=1",
            "after second restored gen=1",
            "after third restored gen=1",
            "self-checkpoint: restored"
        ]
    );
    // crac run says so once CRIU has exited, which can be after the hooks ran.
    wait_until(
        Duration::from_secs(10),
        "crac run to report the restore",
        || {
            fs::read_to_string(&warm_err)
                .unwrap()
                .contains("crac run: restored image \"svc\" as pid")
        },
    );
    assert_eq!(
        fs::read_to_string(dir.join("restore-env")).unwrap(),
        "E2E_LOG_LEVEL=debug\n"
    );
    kill(Pid::from_raw(warm.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(warm.wait().unwrap().code(), Some(128 + 15));
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn run_restore_only_fails_without_an_image_and_starts_nothing() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-run-only");
    let crac = Crac::new(&scratch);
    let marker = scratch.join("started");
    let out = crac
        .command(&["run", "--image", "none", "--restore-only", "--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    fails_with(
        &out,
        2,
        "crac: no warm start (--restore-only): no image named none in ",
    );
    assert!(!Path::new(&marker).exists(), "the command was started");
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn run_returns_the_services_exit_status() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-run-exit");
    let crac = Crac::new(&scratch);
    let out = crac
        .command(&["run", "--image", "none", "--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(stderr(&out).contains("crac run: pid "), "{}", text(&out));
}

/// On a terminal (`script` gives crac one), a checkpoint shows its phase while the hooks run,
/// and the line is gone at the end; off a terminal nothing but the outcome is written.
#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_checkpoint_shows_its_progress_on_a_terminal_only() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("cli-progress");
    let crac = Crac::new(&scratch);
    let slow = [
        ("CRAC_TEST_HANG", "second:1500"),
        ("CRAC_TEST_HOOK_LIMIT_MS", "10000"),
    ];
    let target = Target::start(&scratch.join("t"), &slow);
    let command = format!(
        "{} --store {} checkpoint {} --name web --leave-running",
        bin("crac").display(),
        crac.store.display(),
        target.pid
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    assert!(out.status.success(), "{}", text(&out));
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("running before_checkpoint hooks"),
        "{screen}"
    );
    assert!(
        screen.contains(&format!("checkpointed pid {} (", target.pid)),
        "{screen}"
    );

    let other = Target::start(&scratch.join("u"), &slow);
    let out = crac.run(&[
        "checkpoint",
        &other.pid.to_string(),
        "--name",
        "web-2",
        "--leave-running",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with(&format!("checkpointed pid {} (", other.pid)));
}
