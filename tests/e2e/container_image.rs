//! Warm start inside a container image, with podman: an image made by
//! scripts/container-image.sh (entrypoint `crac run`, CRIU and crac inside), a warm-up
//! container in which the warm-start example checkpoints itself, `podman commit`, and
//! containers of the committed image that start restored, or cold, saying why, when the
//! checkpoint is missing, damaged or refused (fewer capabilities than the warm-up, a CRIU that
//! hangs); and the same with capabilities instead of `--privileged`, as root and as a user,
//! read-only, and as copies pulled from a private registry into another storage root.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::oci;
use crate::util::{self, ask, bin, free_port, text, wait_until, Scratch};
use crac_test_support::podman::{
    Podman, CAPABILITY_RUN_OPTIONS, WARM_RUN_OPTIONS, WARM_UP_OPTIONS,
};
use crac_test_support::registry::Registry;

/// The warm-start example's STATS.
fn stats(port: u16) -> Value {
    let line = ask(port, "STATS");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Container `name`'s output: crac run's lines.
fn logs(podman: &Podman, name: &str) -> String {
    text(&podman.run(&["logs", name], "podman logs"))
}

/// Waits until crac run in container `name` said how the service started; returns its lines.
fn started(podman: &Podman, name: &str) -> String {
    let mut lines = String::new();
    wait_until(
        Duration::from_secs(30),
        "crac run to start the service",
        || {
            lines = logs(podman, name);
            lines.contains("crac run: restored image") || lines.contains("crac run: started cold")
        },
    );
    lines
}

/// Creates a container of `image` whose store the test changes with `edit` (the image folder
/// on the host) before it starts; returns crac run's lines once the service answers.
fn start_edited(
    podman: &Podman,
    image: &str,
    name: &str,
    port: u16,
    edit: impl FnOnce(&Path),
) -> (String, Value) {
    start_edited_with(podman, &WARM_RUN_OPTIONS, image, name, port, edit)
}

/// [`start_edited`] with these `podman run` options.
fn start_edited_with(
    podman: &Podman,
    options: &[&str],
    image: &str,
    name: &str,
    port: u16,
    edit: impl FnOnce(&Path),
) -> (String, Value) {
    let lines = run_edited(podman, options, image, name, edit);
    let stats = stats(port);
    podman.run(&["rm", "--force", "--time", "0", name], "podman rm");
    (lines, stats)
}

/// Creates container `name` of `image` with `options`, changes its store with `edit` (the
/// image folder on the host) and starts it; returns crac run's lines once it started the
/// service.
fn run_edited(
    podman: &Podman,
    options: &[&str],
    image: &str,
    name: &str,
    edit: impl FnOnce(&Path),
) -> String {
    let mut args = vec!["create", "--name", name];
    args.extend(options);
    args.push(image);
    podman.run(&args, "podman create");
    let mount = podman.run(&["mount", name], "podman mount");
    let root = String::from_utf8_lossy(&mount.stdout).trim().to_owned();
    edit(&Path::new(&root).join("var/lib/crac/images/warm"));
    podman.run(&["umount", name], "podman umount");
    podman.run(&["start", name], "podman start");
    started(podman, name)
}

/// Cuts the image's page file short: damage `crac run` finds before CRIU runs.
fn cut_pages(dir: &Path) {
    let pages = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("pages-1.img"))
        .expect("the page file");
    pages.set_len(4096).expect("truncate");
}

/// Makes an image with scripts/container-image.sh in `podman`'s storage: `options` (the
/// script's, its tag last), then `program` and its `args`, the service it runs.
pub(crate) fn container_image(podman: &Podman, options: &[&str], program: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/container-image.sh");
    let built = Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(bin("crac").parent().expect("the binaries' folder"))
        .args(options)
        .arg("--")
        .arg(program)
        .args(args)
        .env(
            "PODMAN",
            format!("podman {}", podman.global_options().join(" ")),
        )
        .output()
        .expect("run scripts/container-image.sh");
    assert!(built.status.success(), "{}", text(&built));
}

/// Makes image `tag` with scripts/container-image.sh (`options` before the tag): the
/// warm-start example on `port`, its checkpoint named `warm`.
fn build_image(podman: &Podman, tag: &str, port: u16, options: &[&str]) {
    let options = [options, &["--name", "warm", tag]].concat();
    container_image(
        podman,
        &options,
        &bin("warm-start"),
        &["--port", &port.to_string(), "--docs", "2000"],
    );
}

/// Runs a warm-up container `name` of image `cold` with `options`: the service starts cold at
/// pid 1001 and checkpoints itself; the container is committed as `warm`. Returns the warm
/// service's STATS.
fn warm_up(
    podman: &Podman,
    options: &[&str],
    cold: &str,
    name: &str,
    warm: &str,
    port: u16,
) -> Value {
    let mut args = vec!["run", "-d", "--name", name];
    args.extend(options);
    args.push(cold);
    podman.run(&args, "podman run (warm-up)");
    let lines = started(podman, name);
    assert!(
        lines.contains("crac run: started cold as pid 1001"),
        "{lines}"
    );
    wait_until(Duration::from_secs(60), "the self-checkpoint", || {
        let image = stats(port)["image"].clone();
        assert_ne!(image, "failed", "{}", logs(podman, name));
        image == "saved"
    });
    let stats = stats(port);
    podman.run(&["stop", "--time", "10", name], "podman stop");
    podman.run(&["commit", "--quiet", name, warm], "podman commit");
    podman.run(&["rm", name], "podman rm");
    stats
}

/// Runs container `name` of image `image` with `options`; asserts that crac run restored the
/// service with `warm`'s memory, and removes the container.
fn restores(podman: &Podman, options: &[&str], image: &str, name: &str, port: u16, warm: &Value) {
    let mut args = vec!["run", "-d", "--name", name];
    args.extend(options);
    args.push(image);
    podman.run(&args, "podman run (restore)");
    let lines = started(podman, name);
    assert!(
        lines.contains("crac run: restored image \"warm\" as pid 1001"),
        "{name}: {lines}"
    );
    let restored = stats(port);
    assert_eq!(restored["started"], "restored", "{name}: {restored}");
    for same in ["pid", "docs", "warmup_ms"] {
        assert_eq!(
            restored[same], warm[same],
            "{name}: {same}: {restored} vs {warm}"
        );
    }
    assert_ne!(restored["instance"], warm["instance"], "{name}: {restored}");
    podman.run(&["rm", "--force", "--time", "0", name], "podman rm");
}

/// `options` with a network namespace of the container's own (`--network none`: loopback
/// only) in place of the host's.
fn own_network<'a>(options: &[&'a str]) -> Vec<&'a str> {
    let mut out = options.to_vec();
    let at = out
        .iter()
        .position(|&o| o == "--network")
        .expect("a --network option");
    out[at + 1] = "none";
    out
}

/// Changes the metadata of the image in `dir` with `edit`.
fn edit_metadata(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("crac-meta.json");
    let mut meta: Value =
        serde_json::from_slice(&fs::read(&path).expect("metadata")).expect("JSON");
    edit(&mut meta);
    // An image made elsewhere, on purpose: sealed as crac would have (an unsealed edit reads
    // as damage).
    crac_cli::metadata::seal(&mut meta);
    fs::write(&path, serde_json::to_vec(&meta).expect("JSON")).expect("write metadata");
}

/// The image's entrypoint restores the checkpoint the warm-up left in it, with the warm-up's
/// memory and a new instance id, its output in the container's log; a container whose
/// checkpoint is missing, damaged, refused for the CPU, or that lacks the privileges CRIU
/// needs, starts cold and its first lines say which and why; another kernel is said, and left
/// to CRIU.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn a_committed_warm_up_starts_restored_and_cold_when_its_checkpoint_cannot_be_used() {
    let Some(env) = util::env() else { return };
    if !oci::runtimes_present() {
        return;
    }
    let scratch = Scratch::new("image");
    let podman = Podman::new(&scratch.join("podman"), &env.criu.path);
    let port = free_port();
    build_image(&podman, "localhost/warm-start:cold", port, &[]);

    // The warm-up: no checkpoint yet, so a cold start, after which the service checkpoints
    // itself and keeps serving.
    let mut args = vec!["run", "-d", "--name", "warmup"];
    args.extend(WARM_RUN_OPTIONS);
    args.push("localhost/warm-start:cold");
    podman.run(&args, "podman run (warm-up)");
    let lines = started(&podman, "warmup");
    assert!(
        lines.contains(
            "crac run: no warm start: no image named warm in /var/lib/crac/images (see `crac images list`)"
        ) && lines.contains("crac run: started cold as pid 1001"),
        "{lines}"
    );
    wait_until(Duration::from_secs(60), "the self-checkpoint", || {
        stats(port)["image"] == "saved"
    });
    let warm = stats(port);
    assert_eq!(warm["started"], "cold", "{warm}");
    podman.run(&["stop", "--time", "10", "warmup"], "podman stop");
    podman.run(
        &["commit", "--quiet", "warmup", "localhost/warm-start:warm"],
        "podman commit",
    );
    podman.run(&["rm", "warmup"], "podman rm");

    // Restored: the warm-up's index and pid, a new instance id.
    let mut args = vec!["run", "-d", "--name", "warm"];
    args.extend(WARM_RUN_OPTIONS);
    args.push("localhost/warm-start:warm");
    podman.run(&args, "podman run (warm)");
    let lines = started(&podman, "warm");
    assert!(
        lines.contains("crac run: restored image \"warm\" as pid 1001"),
        "{lines}"
    );
    let restored = stats(port);
    assert_eq!(restored["started"], "restored", "{restored}");
    for same in ["pid", "docs", "terms", "postings", "warmup_ms"] {
        assert_eq!(restored[same], warm[same], "{same}: {restored} vs {warm}");
    }
    assert_ne!(restored["instance"], warm["instance"], "{restored}");
    // The restored service writes to the new container's log, not to the warm-up's pipe.
    let said = format!(
        "warm-start: pid 1001: started warm from image \"warm\" (instance {})",
        restored["instance"].as_str().expect("an instance id")
    );
    wait_until(
        Duration::from_secs(10),
        "the restored service's line in its log",
        || logs(&podman, "warm").contains(&said),
    );
    podman.run(&["rm", "--force", "--time", "0", "warm"], "podman rm");

    // Fewer capabilities than the warm-up had (--privileged): CRIU could not give them back
    // (and would hang), so the restore is refused up front, naming them, and the service
    // starts cold.
    let capability_only: Vec<&str> = WARM_RUN_OPTIONS
        .iter()
        .copied()
        .filter(|&o| o != "--privileged")
        .chain(["--cap-add", "CHECKPOINT_RESTORE"])
        .collect();
    let mut args = vec!["run", "-d", "--name", "fewer-caps"];
    args.extend(&capability_only);
    args.push("localhost/warm-start:warm");
    podman.run(&args, "podman run (fewer capabilities)");
    let lines = started(&podman, "fewer-caps");
    assert!(
        lines.contains("crac run: no warm start: the image's processes held capabilities that this crac lacks (")
            && lines.contains("CAP_SYS_ADMIN")
            && lines.contains("which CRIU must give back")
            && lines.contains("crac run: started cold"),
        "{lines}"
    );
    assert_eq!(stats(port)["started"], "cold");
    podman.run(&["rm", "--force", "--time", "0", "fewer-caps"], "podman rm");

    // The same from an image that does not record its capabilities (an older crac's): CRIU
    // hangs giving them back, and crac run gives up after CRAC_RESTORE_TIMEOUT, kills CRIU
    // and what it restored, and starts cold.
    let mut enough_for_criu = capability_only.clone();
    enough_for_criu.extend([
        "--cap-add",
        "SYS_ADMIN,NET_ADMIN,SYS_TIME",
        "--env",
        "CRAC_RESTORE_TIMEOUT=3",
    ]);
    let (lines, cold) = start_edited_with(
        &podman,
        &enough_for_criu,
        "localhost/warm-start:warm",
        "hangs",
        port,
        |dir| {
            edit_metadata(dir, |meta| {
                meta.as_object_mut()
                    .expect("an object")
                    .remove("capabilities")
                    .expect("the image records its capabilities");
            })
        },
    );
    assert!(
        lines.contains("crac run: no warm start: criu restore did not finish within 3 s: CRIU and the processes it had begun to restore were killed")
            && lines.contains("Unable to restore capabilities")
            && lines.contains("crac run: started cold"),
        "{lines}"
    );
    assert_eq!(cold["started"], "cold", "{cold}");

    // Damaged: a page file cut short.
    let (lines, cold) = start_edited(
        &podman,
        "localhost/warm-start:warm",
        "damaged",
        port,
        |dir| {
            let pages = fs::OpenOptions::new()
                .write(true)
                .open(dir.join("pages-1.img"))
                .expect("the page file");
            pages.set_len(4096).expect("truncate");
        },
    );
    assert!(
        lines.contains("crac run: no warm start: image /var/lib/crac/images/warm cannot be restored: image file pages-1.img is truncated: 4096 bytes")
            && lines.contains("(the image is damaged: make it again with `crac checkpoint`)")
            && lines.contains("crac run: started cold as pid 1001"),
        "{lines}"
    );
    assert_eq!(cold["started"], "cold", "{cold}");

    // Refused: the image says its CPU had a feature this one lacks.
    let (lines, cold) = start_edited(&podman, "localhost/warm-start:warm", "cpu", port, |dir| {
        edit_metadata(dir, |meta| {
            meta["cpu_features"]
                .as_array_mut()
                .expect("the image records CPU features")
                .push("avx9000".into())
        })
    });
    assert!(
        lines.contains("crac run: no warm start: this machine's CPU lacks a feature the image's machine had, which the service may rely on (avx9000)")
            && lines.contains("crac run: started cold"),
        "{lines}"
    );
    assert_eq!(cold["started"], "cold", "{cold}");

    // Another kernel: said, and left to CRIU, which restores this image there.
    let (lines, restored) = start_edited(
        &podman,
        "localhost/warm-start:warm",
        "kernel",
        port,
        |dir| edit_metadata(dir, |meta| meta["kernel"] = "5.10.0-older".into()),
    );
    assert!(
        lines.contains("crac run: the image was made on Linux 5.10.0-older, this machine runs ")
            && lines.contains("crac run: restored image \"warm\" as pid 1001"),
        "{lines}"
    );
    assert_eq!(restored["started"], "restored", "{restored}");

    // Without --privileged or CHECKPOINT_RESTORE CRIU cannot restore: said before it runs.
    let mut args = vec!["run", "-d", "--name", "unprivileged"];
    args.extend(WARM_RUN_OPTIONS.iter().filter(|&&o| o != "--privileged"));
    args.push("localhost/warm-start:warm");
    podman.run(&args, "podman run (unprivileged)");
    let lines = started(&podman, "unprivileged");
    assert!(
        lines.contains("crac run: no warm start: crac restore runs as root but without CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN), which CRIU needs: run the container with --cap-add CHECKPOINT_RESTORE (root in a container has neither by default), or give crac one of them")
            && lines.contains("crac run: started cold"),
        "{lines}"
    );
    assert_eq!(stats(port)["started"], "cold");
    let check = podman.try_run(&["exec", "unprivileged", "crac", "check"]);
    assert!(
        !check.status.success()
            && text(&check).contains(
                "crac checkpoint runs as root but without CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN)"
            )
            && text(&check).contains(
                "give crac CAP_CHECKPOINT_RESTORE (a container: --cap-add CHECKPOINT_RESTORE)"
            ),
        "{}",
        text(&check)
    );
}

/// Capabilities, not privileges: the warm-up with CAP_CHECKPOINT_RESTORE and no seccomp filter
/// (no --privileged, a read-only /proc/sys: the cold service is still moved up to pid 1001),
/// restores with CAP_CHECKPOINT_RESTORE alone under the default seccomp profile, as root and
/// as a user of the container, on a read-only root file system too; `crac check` judges the
/// container by CRIU's unprivileged mode; a user without the capability is told which one it
/// lacks; and a cold service replaces the checkpoint committed in the image.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn capabilities_alone_warm_up_and_restore_as_root_and_as_a_user() {
    let Some(env) = util::env() else { return };
    if !oci::runtimes_present() {
        return;
    }
    let scratch = Scratch::new("image-caps");
    let podman = Podman::new(&scratch.join("podman"), &env.criu.path);
    let port = free_port();
    let warm_up_options: Vec<&str> = CAPABILITY_RUN_OPTIONS
        .iter()
        .chain(&WARM_UP_OPTIONS)
        .copied()
        .collect();

    // Root.
    build_image(&podman, "localhost/caps:cold", port, &[]);
    let mut args = vec!["run", "-d", "--name", "check"];
    args.extend(&warm_up_options);
    args.extend([
        "--entrypoint",
        "/usr/local/bin/crac",
        "localhost/caps:cold",
        "check",
    ]);
    podman.run(&args, "podman run (crac check)");
    podman.run(&["wait", "check"], "podman wait");
    let check = logs(&podman, "check");
    assert!(
        check.contains("stdout: checkpoint/restore is possible here\n")
            && check.contains("running as root with CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, without all that CRIU's full mode needs: CRIU runs in its unprivileged mode (--unprivileged)"),
        "{check}"
    );
    podman.run(&["rm", "check"], "podman rm");
    let warm = warm_up(
        &podman,
        &warm_up_options,
        "localhost/caps:cold",
        "warmup",
        "localhost/caps:warm",
        port,
    );
    restores(
        &podman,
        &CAPABILITY_RUN_OPTIONS,
        "localhost/caps:warm",
        "caps",
        port,
        &warm,
    );
    let read_only: Vec<&str> = CAPABILITY_RUN_OPTIONS
        .iter()
        .copied()
        .chain(["--read-only"])
        .collect();
    restores(
        &podman,
        &read_only,
        "localhost/caps:warm",
        "read-only",
        port,
        &warm,
    );

    // A fleet from one warm image: pushed to a registry, pulled into another storage root
    // (another machine's), three copies restored there, each in a network namespace of its
    // own, each renewing what is unique, and each reachable by crac status and checkpoint.
    let registry = Registry::start(&scratch.join("registry"));
    let remote = format!("{}/caps:warm", registry.host());
    podman.run(
        &[
            "push",
            "--quiet",
            "--tls-verify=false",
            "localhost/caps:warm",
            &remote,
        ],
        "podman push",
    );
    let elsewhere = Podman::new(&scratch.join("podman-2"), &env.criu.path);
    elsewhere.run(
        &["pull", "--quiet", "--tls-verify=false", &remote],
        "podman pull",
    );
    let mut instances = vec![warm["instance"].clone()];
    for copy in ["copy-1", "copy-2", "copy-3"] {
        let mut args = vec!["run", "-d", "--name", copy];
        args.extend(own_network(&warm_up_options));
        args.push(&remote);
        elsewhere.run(&args, "podman run (a copy)");
        let lines = started(&elsewhere, copy);
        assert!(
            lines.contains("crac run: restored image \"warm\" as pid 1001"),
            "{copy}: {lines}"
        );
        let restored = oci::in_netns(elsewhere.pid(copy), || stats(port));
        assert_eq!(restored["started"], "restored", "{copy}: {restored}");
        assert_eq!(restored["docs"], warm["docs"], "{copy}: {restored}");
        instances.push(restored["instance"].clone());
    }
    for copy in ["copy-1", "copy-2", "copy-3"] {
        let status = elsewhere.run(&["exec", copy, "crac", "status", "1001"], "crac status");
        assert!(text(&status).contains("1001"), "{copy}: {}", text(&status));
        let again = elsewhere.run(
            &[
                "exec",
                copy,
                "crac",
                "checkpoint",
                "--leave-running",
                "--name",
                "again",
                "1001",
            ],
            "crac checkpoint in a copy",
        );
        assert!(text(&again).contains("again"), "{copy}: {}", text(&again));
    }
    instances.sort_by_key(|v| v.to_string());
    instances.dedup();
    assert_eq!(
        instances.len(),
        4,
        "each copy renews its instance: {instances:?}"
    );
    drop(elsewhere);
    drop(registry);

    // A cold start in the committed image (its checkpoint cut short) checkpoints the service
    // again, over the image's committed one, which overlayfs cannot move.
    let lines = run_edited(
        &podman,
        &warm_up_options,
        "localhost/caps:warm",
        "recheckpoint",
        cut_pages,
    );
    assert!(lines.contains("crac run: started cold"), "{lines}");
    wait_until(Duration::from_secs(60), "the self-checkpoint", || {
        let image = stats(port)["image"].clone();
        assert_ne!(image, "failed", "{}", logs(&podman, "recheckpoint"));
        image == "saved"
    });
    podman.run(
        &["rm", "--force", "--time", "0", "recheckpoint"],
        "podman rm",
    );

    // A user of the container, with the capabilities as ambient ones: CHECKPOINT_RESTORE, and
    // SETPCAP, without which CRIU cannot give the restored service its bounding set.
    build_image(
        &podman,
        "localhost/caps:user-cold",
        port,
        &["--user", "1000:1000"],
    );
    let as_user: Vec<&str> = ["--user", "1000:1000", "--cap-add", "SETPCAP"]
        .into_iter()
        .chain(warm_up_options.iter().copied())
        .collect();
    let warm = warm_up(
        &podman,
        &as_user,
        "localhost/caps:user-cold",
        "user-warmup",
        "localhost/caps:user-warm",
        port,
    );
    let restore_as_user: Vec<&str> = ["--user", "1000:1000", "--cap-add", "SETPCAP"]
        .into_iter()
        .chain(CAPABILITY_RUN_OPTIONS)
        .collect();
    restores(
        &podman,
        &restore_as_user,
        "localhost/caps:user-warm",
        "user",
        port,
        &warm,
    );

    // Without SETPCAP, the restore is refused up front, naming it, and the service starts
    // cold; without CHECKPOINT_RESTORE the user is told it lacks that.
    let mut args = vec!["run", "-d", "--name", "user-setpcap", "--user", "1000:1000"];
    args.extend(CAPABILITY_RUN_OPTIONS);
    args.push("localhost/caps:user-warm");
    podman.run(&args, "podman run (no SETPCAP)");
    let lines = started(&podman, "user-setpcap");
    assert!(
        lines.contains("crac run: no warm start: the image's processes held a capability that this crac lacks (CAP_SETPCAP)")
            && lines.contains("crac run: started cold"),
        "{lines}"
    );
    podman.run(
        &["rm", "--force", "--time", "0", "user-setpcap"],
        "podman rm",
    );
    let mut args = vec!["run", "-d", "--name", "user-without", "--user", "1000:1000"];
    args.extend(CAPABILITY_RUN_OPTIONS.iter().skip(2));
    args.push("localhost/caps:user-warm");
    podman.run(&args, "podman run (no capability)");
    let lines = started(&podman, "user-without");
    assert!(
        lines.contains("crac run: no warm start: crac restore runs as uid 1000 without CAP_CHECKPOINT_RESTORE, which CRIU needs to stop, read and recreate processes: give it that capability (a container: --cap-add CHECKPOINT_RESTORE")
            && lines.contains("crac run: started cold"),
        "{lines}"
    );
    assert_eq!(stats(port)["started"], "cold");
}
