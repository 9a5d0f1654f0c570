//! What a restore is given and checks: settings for the restored service (`crac restore
//! --env`), and the CPU features the image's machine had.

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use crate::util::{self, ask, bin, free_port, text, wait_until, Crac, Scratch, Target};

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn settings_given_to_a_restore_reach_the_hooks_and_nothing_else_changes() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("restore-env");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let pid = target.pid.to_string();
    let out = crac.run(&["checkpoint", &pid, "--name", "svc"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = Target::restored(&target);
    target.reap_dumped();

    // A setting that is not NAME=VALUE is refused before anything runs.
    let out = crac.run(&["restore", "svc", "--detach", "--env", "LOG_LEVEL"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected NAME=VALUE, e.g. LOG_LEVEL=debug"),
        "{}",
        text(&out)
    );

    let out = crac.run(&[
        "restore",
        "svc",
        "--detach",
        "--env",
        "LOG_LEVEL=debug",
        "--env",
        "UPSTREAM=10.0.0.2:80",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fs::read_to_string(restored.dir.join("restore-env")).unwrap(),
        "LOG_LEVEL=debug\nUPSTREAM=10.0.0.2:80\n"
    );
    // The process's own environment is the image's.
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("LOG_LEVEL=debug"));
    restored.terminate();
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_cpu_without_a_feature_the_image_had_is_refused_and_run_starts_cold() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("restore-cpu");
    let crac = Crac::new(&scratch);
    let target = Target::start(&scratch.join("t"), &[]);
    let (pid_number, pid) = (target.pid, target.pid.to_string());
    let out = crac.run(&["checkpoint", &pid, "--name", "svc"]);
    assert!(out.status.success(), "{}", text(&out));
    target.reap_dumped();

    // The image says its machine had a feature this one lacks.
    let meta_path = crac.store.join("svc/crac-meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    let features = meta["cpu_features"]
        .as_array_mut()
        .expect("cpu_features recorded");
    assert!(!features.is_empty());
    features.push("avx9000".into());
    crac_cli::metadata::seal(&mut meta);
    fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();

    let out = crac.run(&["restore", "svc", "--detach"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "this machine's CPU lacks a feature the image's machine had, which the service may \
             rely on (avx9000): restore it on a machine with them, or start the service cold"
        ),
        "{}",
        text(&out)
    );
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_number as i32), None).is_err());

    // crac run starts the service cold instead, saying why.
    let dir = scratch.join("cold");
    fs::create_dir_all(&dir).unwrap();
    let stderr = scratch.join("run.stderr");
    let mut run = crac
        .command(&["run", "--image", "svc", "--"])
        .arg(bin("crac-test-target"))
        .env("CRAC_TEST_DIR", &dir)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("crac run starts");
    wait_until(Duration::from_secs(20), "the cold start", || {
        dir.join("ready").exists()
    });
    let said = fs::read_to_string(&stderr).unwrap();
    assert!(
        said.contains("crac run: no warm start: this machine's CPU lacks a feature"),
        "{said}"
    );
    assert!(said.contains("crac run: started cold as pid"), "{said}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    run.wait().unwrap();
}

#[test]
#[ignore = "needs root and CRIU >= 4.2: scripts/test.sh runs it"]
fn a_restored_cache_server_reconnects_to_the_upstream_the_restore_names() {
    let Some(_env) = util::env() else { return };
    let scratch = Scratch::new("restore-upstream");
    let crac = Crac::new(&scratch);
    let (first, second, port) = (free_port(), free_port(), free_port());
    let upstream = |port: u16| {
        std::process::Command::new(bin("upstream"))
            .arg(port.to_string())
            .env("UPSTREAM_DELAY_MS", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("upstream starts")
    };
    let (mut old, mut new) = (upstream(first), upstream(second));
    let mut cmd = std::process::Command::new(bin("cache-server"));
    cmd.args(["--port", &port.to_string()])
        .args(["--upstream", &format!("127.0.0.1:{first}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(scratch.join("server.log")).unwrap());
    util::session_leader(&mut cmd);
    let mut server = cmd.spawn().expect("cache-server starts");
    let pid = server.id();
    assert_eq!(ask(port, "GET a"), "value-of-a");

    let out = crac.run(&["checkpoint", &pid.to_string(), "--name", "cache"]);
    assert!(out.status.success(), "{}", text(&out));
    server.wait().unwrap();
    // The old upstream goes away; the copy is restored next to the new one.
    old.kill().unwrap();
    old.wait().unwrap();
    let setting = format!("CACHE_SERVER_UPSTREAM=127.0.0.1:{second}");
    let out = crac.run(&["restore", "cache", "--detach", "--env", &setting]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(ask(port, "GET b"), "value-of-b");
    let stats: serde_json::Value = serde_json::from_str(&ask(port, "STATS")).unwrap();
    assert_eq!(stats["upstream_connection"], 2);
    assert_eq!(stats["entries"], 2, "the cache came back warm: {stats}");
    let log = fs::read_to_string(scratch.join("server.log")).unwrap();
    assert!(
        log.contains(&format!(
            "upstream is now 127.0.0.1:{second} (the restore's CACHE_SERVER_UPSTREAM)"
        )),
        "{log}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    util::reap(pid, Duration::from_secs(10));
    new.kill().unwrap();
    new.wait().unwrap();
}
