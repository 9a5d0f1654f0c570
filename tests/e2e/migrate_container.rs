//! `crac migrate` and podman containers: a process inside a container is refused (it would come
//! out of its container), naming the container-level path.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::oci::{self, in_netns, Podman};
use crate::util::{self, bin, field, status, status_hooks, text, Crac, Scratch};

/// `crac migrate PID` of a process in a podman container refuses before anything happens,
/// naming the container and `--container`; the container's service was never stopped.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn a_process_in_a_podman_container_is_refused_naming_the_container() {
    let Some(env) = util::env() else { return };
    if !oci::runtimes_present() {
        return;
    }
    let scratch = Scratch::new("mig-inside");
    let rootfs = oci::rootfs(&scratch);
    let config = oci::criu_config(&scratch, &bin("crac-action"));
    let podman = Podman::new(&scratch.join("podman"), &env.criu.path);
    let image = "localhost/crac-test:e2e";
    oci::import(&podman, &rootfs, image);
    let annotation = format!("org.criu.config={}", config.display());
    podman.run(
        &[
            "run",
            "-d",
            "--name",
            "c22-inside",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            "--annotation",
            &annotation,
            "-e",
            "CRAC_TEST_DIR=/state",
            "-e",
            "CRAC_TEST_LISTEN=8080",
            "-e",
            "CRAC_TEST_CHILD=1",
            image,
        ],
        "podman run",
    );
    let pid = podman.pid("c22-inside");
    let before = in_netns(pid, || status(8080));
    let key = scratch.join("key");
    fs::write(&key, "k".repeat(44)).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let crac = Crac::new(&scratch);
    // The container's init, and its child (conmon is an ancestor of both).
    let child: u32 = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the target's child")
        .parse()
        .unwrap();
    for process in [pid, child] {
        let out = crac.run(&[
            "migrate",
            &process.to_string(),
            "--to",
            "127.0.0.1:9",
            "--key",
            &key.display().to_string(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains(&format!(
                "pid {process} runs in the podman container c22-inside"
            )) && said.contains(
                "move the container whole: crac migrate --container c22-inside --to HOST:PORT"
            ) && said.contains("nothing was stopped"),
            "{said}"
        );
    }
    // Never stopped: the same memory, no hook ran, nothing in the store.
    let after = in_netns(pid, || status(8080));
    assert_eq!(field(&after, "token"), field(&before, "token"));
    assert_eq!(field(&after, "generation"), 0, "{after}");
    assert!(status_hooks(&after).is_empty(), "{after}");
    assert!(crac.listing().is_empty(), "{:?}", crac.listing());
}
