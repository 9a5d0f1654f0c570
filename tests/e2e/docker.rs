//! Docker (Debian 12's dockerd 20.10 with containerd 1.6 and runc), started privately by the
//! test: `docker checkpoint create` and `docker start --checkpoint` of a running container
//! with crac-action as CRIU's action script (named in dockerd's environment by
//! `CRIU_CONFIG_FILE`; nothing in /etc/criu), and the warm-start image built with the
//! project's Dockerfile, warmed up and restored with capabilities, not `--privileged`, as
//! root and as a user.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::{self, ask, bin, free_port, text, wait_until, Scratch};
use crac_test_support::docker::{self, Docker, CAPABILITY_RUN_OPTIONS, WARM_UP_OPTIONS};

/// Whether Docker is here (in CI its absence fails the test).
fn docker_present() -> bool {
    crac_test_support::may_run(
        "Docker test",
        docker::missing(),
        "as root, scripts/test.sh (scripts/install-runtimes.sh installs Debian's docker.io)",
    )
}

/// The test's environment, where Docker is here too (see [`util::env`], [`docker_present`]).
fn docker_env() -> Option<util::Env> {
    let env = util::env()?;
    docker_present().then_some(env)
}

/// The warm-start example's STATS.
fn stats(port: u16) -> Value {
    let line = ask(port, "STATS");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Container `name`'s output.
fn logs(docker: &Docker, name: &str) -> String {
    text(&docker.run(&["logs", name], "docker logs"))
}

/// Waits until crac run in container `name` said how the service started; returns its lines.
fn started(docker: &Docker, name: &str) -> String {
    let mut lines = String::new();
    wait_until(
        Duration::from_secs(30),
        "crac run to start the service",
        || {
            lines = logs(docker, name);
            lines.contains("crac run: restored image") || lines.contains("crac run: started cold")
        },
    );
    lines
}

/// Asserts that STATS `after` is of the service whose STATS were `before`, restored: the same
/// pid, documents and warm-up time, a new instance.
fn assert_restored_from(after: &Value, before: &Value) {
    assert_eq!(after["started"], "restored", "{after}");
    for same in ["pid", "docs", "warmup_ms"] {
        assert_eq!(after[same], before[same], "{same}: {after} vs {before}");
    }
    assert_ne!(after["instance"], before["instance"], "{after}");
}

/// The warm-start example's command line in the image, serving on port `port`.
fn service_command(port: &str) -> [&str; 5] {
    ["/app/service", "--port", port, "--docs", "2000"]
}

/// Runs container `warmup` of `image` (with `options`, the capabilities and the warm-up's
/// options) serving on `port`, asserts crac run said `said`, and waits for its
/// self-checkpoint; returns the service's STATS then.
fn warm_up(docker: &Docker, port: u16, options: &[&str], image: &str, said: &str) -> Value {
    let port_arg = port.to_string();
    let mut args = vec!["run", "-d", "--name", "warmup"];
    args.extend(options);
    args.extend(CAPABILITY_RUN_OPTIONS);
    args.extend(WARM_UP_OPTIONS);
    args.push(image);
    args.extend(service_command(&port_arg));
    docker.run(&args, "docker run (warm-up)");
    let lines = started(docker, "warmup");
    assert!(lines.contains(said), "{lines}");
    wait_until(Duration::from_secs(60), "the self-checkpoint", || {
        let image = stats(port)["image"].clone();
        assert_ne!(image, "failed", "{}", logs(docker, "warmup"));
        image == "saved"
    });
    stats(port)
}

/// Stops container `warmup`, commits it as `image` and removes it.
fn commit_warmup(docker: &Docker, image: &str) {
    docker.run(&["stop", "--time", "10", "warmup"], "docker stop");
    docker.run(&["commit", "warmup", image], "docker commit");
    docker.run(&["rm", "warmup"], "docker rm");
}

/// Runs container `warm` of `image` (with `options` and the capabilities), asserts crac run
/// said `said` and that the service is the one whose STATS were `warm`, restored; removes it.
fn restore_warm(
    docker: &Docker,
    port: u16,
    options: &[&str],
    image: &str,
    said: &str,
    warm: &Value,
) {
    let mut args = vec!["run", "-d", "--name", "warm"];
    args.extend(options);
    args.extend(CAPABILITY_RUN_OPTIONS);
    args.push(image);
    docker.run(&args, "docker run (restore)");
    let lines = started(docker, "warm");
    assert!(lines.contains(said), "{lines}");
    assert_restored_from(&stats(port), warm);
    docker.run(&["rm", "--force", "warm"], "docker rm");
}

/// A private dockerd whose CRIU runs this build's crac-action, and the warm-start image
/// `tag` built for it by scripts/container-image.sh --docker.
fn docker_with_image(scratch: &Scratch, criu: &Path, tag: &str) -> Docker {
    docker_with_image_for(scratch, criu, tag, &[])
}

/// [`docker_with_image`], with more options of scripts/container-image.sh (`--user`).
fn docker_with_image_for(scratch: &Scratch, criu: &Path, tag: &str, options: &[&str]) -> Docker {
    let config = scratch.join("criu.conf");
    fs::write(
        &config,
        format!("action-script {}\n", bin("crac-action").display()),
    )
    .expect("CRIU configuration");
    let docker = Docker::start(&scratch.join("docker"), criu, &config);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/container-image.sh");
    let built = Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(bin("crac").parent().expect("the binaries' folder"))
        .args(options)
        .args(["--docker", tag, "--"])
        .arg(bin("warm-start"))
        .env(
            "DOCKER",
            format!("{} {}", docker::CLIENT, docker_host_args(&docker).join(" ")),
        )
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("run scripts/container-image.sh");
    assert!(built.status.success(), "{}", text(&built));
    docker
}

/// The client's options that name this dockerd.
fn docker_host_args(docker: &Docker) -> Vec<String> {
    let cmd = docker.command(&[]);
    cmd.get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// `docker checkpoint create` of a running container: crac-action thaws the tree containerd
/// froze, its hooks run before the dump, and `docker start --checkpoint` restores it with its
/// memory, telling it `restored`.
#[test]
#[ignore = "needs root, CRIU >= 4.2 and Debian's docker.io: scripts/test.sh runs it"]
fn docker_checkpoint_and_restore_run_the_hooks_of_a_frozen_container() {
    let Some(env) = docker_env() else { return };
    let scratch = Scratch::new("docker-cp");
    let docker = docker_with_image(&scratch, &env.criu.path, "localhost/warm-start:docker");
    // The private dockerd leaves the host's network alone: no bridge, no iptables chains.
    assert!(!Path::new("/sys/class/net/docker0").exists());
    let rules = Command::new("iptables").arg("-S").output();
    if let Ok(rules) = rules {
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(!rules.contains("DOCKER"), "{rules}");
    }
    let port = free_port();
    let port_arg = port.to_string();
    docker.run(
        &[
            "run",
            "-d",
            "--name",
            "svc",
            "--network",
            "host",
            "--ulimit",
            "nofile=1024:1024",
            // Docker masks /proc/acpi, /proc/scsi and /sys/firmware with empty tmpfs mounts,
            // which CRIU saves as identical files, and dockerd 20.10 then fails to restore
            // ("content sha256:... already exists", moby#42900).
            "--security-opt",
            "systempaths=unconfined",
            "localhost/warm-start:docker",
            "/app/service",
            "--port",
            &port_arg,
            "--docs",
            "500",
            "--no-checkpoint",
        ],
        "docker run",
    );
    started(&docker, "svc");
    wait_until(Duration::from_secs(30), "the service to answer", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let before = stats(port);
    docker.run(
        &["checkpoint", "create", "svc", "cp1"],
        "docker checkpoint create",
    );
    // containerd froze the container before runc ran CRIU: without crac-action thawing it,
    // the agent could not answer and the checkpoint failed after 30 s.
    let lines = logs(&docker, "svc");
    assert!(lines.contains("before_checkpoint"), "{lines}");
    // dockerd 20.10 uploads the checkpoint to containerd again, and fails while containerd
    // still holds the same blob from the checkpoint (its garbage collection runs a moment
    // later: "content sha256:... already exists", moby#42900): that is said, and tried again.
    let mut tries = 0;
    loop {
        let out = docker.try_run(&["start", "--checkpoint", "cp1", "svc"]);
        if out.status.success() {
            break;
        }
        tries += 1;
        assert!(
            tries < 10 && text(&out).contains("already exists"),
            "docker start --checkpoint: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_restored_from(&stats(port), &before);
    let lines = logs(&docker, "svc");
    let checkpoint = lines.find("before_checkpoint").expect(&lines);
    let restored = lines.find("restored: reseeded").expect(&lines);
    assert!(checkpoint < restored, "{lines}");
}

/// The warm-start image built with scripts/warm-start.Dockerfile: the warm-up with
/// SYS_ADMIN (which Docker 20.10 has in place of CHECKPOINT_RESTORE), no seccomp filter and
/// unmasked system paths, committed; a container of the committed image with SYS_ADMIN only
/// restores it; without it, the service starts cold saying which capability is missing; and
/// `--restore-only` fails instead.
#[test]
#[ignore = "needs root, CRIU >= 4.2 and Debian's docker.io: scripts/test.sh runs it"]
fn a_docker_warm_image_restores_with_capabilities_not_privileges() {
    let Some(env) = docker_env() else { return };
    let scratch = Scratch::new("docker-warm");
    let docker = docker_with_image(&scratch, &env.criu.path, "localhost/warm-start:cold");
    let port = free_port();
    let warm = warm_up(
        &docker,
        port,
        &[],
        "localhost/warm-start:cold",
        "crac run: started cold as pid 1001",
    );
    commit_warmup(&docker, "localhost/warm-start:warm");
    restore_warm(
        &docker,
        port,
        &[],
        "localhost/warm-start:warm",
        "crac run: restored image \"service\" as pid 1001",
        &warm,
    );

    // Without the capability: cold, saying which one is missing.
    let mut args = vec!["run", "-d", "--name", "nocap"];
    args.extend(CAPABILITY_RUN_OPTIONS.iter().skip(2));
    args.push("localhost/warm-start:warm");
    docker.run(&args, "docker run (no capability)");
    let lines = started(&docker, "nocap");
    assert!(
        lines.contains("crac run: no warm start: crac restore runs as root but without CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN)")
            && lines.contains("crac run: started cold"),
        "{lines}"
    );
    assert_eq!(stats(port)["started"], "cold");
    docker.run(&["rm", "--force", "nocap"], "docker rm");

    // XTDB's restore-only mode: the container fails, with the reason, instead of starting cold.
    let mut args = vec![
        "run",
        "--name",
        "restore-only",
        "--entrypoint",
        "/usr/local/bin/crac",
    ];
    args.extend(CAPABILITY_RUN_OPTIONS.iter().skip(2));
    args.extend([
        "localhost/warm-start:warm",
        "run",
        "--restore-only",
        "--log",
        "-",
        "--image",
        "service",
        "--",
    ]);
    let port_arg = port.to_string();
    args.extend(service_command(&port_arg));
    let out = docker.try_run(&args);
    assert!(
        !out.status.success()
            && text(&out).contains("no warm start (--restore-only): crac restore runs as root but without CAP_CHECKPOINT_RESTORE"),
        "{}",
        text(&out)
    );
}

/// A non-root user in the container, under Docker 20.10, which gives it no ambient
/// capabilities: crac's file capabilities in the image (SYS_ADMIN and SETPCAP, which
/// `--cap-add SYS_ADMIN` leaves in the bounding set) are passed on to CRIU, and the warm-up
/// and the restore both work with SYS_ADMIN only, no `--privileged`.
#[test]
#[ignore = "needs root, CRIU >= 4.2 and Debian's docker.io: scripts/test.sh runs it"]
fn a_docker_warm_image_restores_as_a_user_with_capabilities_not_privileges() {
    let Some(env) = docker_env() else { return };
    let scratch = Scratch::new("docker-user");
    let docker = docker_with_image_for(
        &scratch,
        &env.criu.path,
        "localhost/warm-start:user",
        &["--user", "1000:1000"],
    );
    let port = free_port();
    let warm = warm_up(
        &docker,
        port,
        &["--user", "1000:1000"],
        "localhost/warm-start:user",
        "crac run: started cold",
    );
    // crac run (the container's init) runs as the user, not root.
    let uid = fs::read_to_string(format!("/proc/{}/status", docker.pid("warmup")))
        .expect("the container's process status");
    assert!(uid.lines().any(|l| l.starts_with("Uid:\t1000\t")), "{uid}");
    commit_warmup(&docker, "localhost/warm-start:user-warm");
    restore_warm(
        &docker,
        port,
        &["--user", "1000:1000"],
        "localhost/warm-start:user-warm",
        "crac run: restored image \"service\"",
        &warm,
    );
}
