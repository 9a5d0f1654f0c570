//! Containers, end to end with real runtimes: runc and podman (with runc), CRIU run by them
//! over RPC, crac-action named in the container's CRIU configuration. The service is
//! crac-test-target as the container's pid 1, with a child, both with agents, both serving TCP
//! in the container's own network namespace; the Kubernetes path (kubelet -> CRI-O or
//! containerd -> runc -> CRIU) is this same runc path.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::oci::{self, in_netns, Runc};
use crate::util::{
    self, after_all, bin, concat, field, read_lines, status, status_hooks, text, wait_until,
    Scratch, BEFORE_ALL,
};

/// Waits until the target (and its child, if any) in `state` said it is ready.
fn wait_ready(state: &Path, child: bool) {
    wait_until(
        Duration::from_secs(15),
        "the container's service to be ready",
        || state.join("ready").exists() && (!child || state.join("child/ready").exists()),
    );
}

/// `runc checkpoint` runs the hooks, children first; `runc restore` brings pid 1 and its
/// child back with their memory and their listeners, and tells them "restored", parents first.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn runc_checkpoint_and_restore_coordinate_pid_1_and_its_child() {
    let Some(env) = util::env() else { return };
    if !oci::runtimes_present() {
        return;
    }
    let scratch = Scratch::new("runc");
    let mut runc = Runc::new(&env, &scratch);
    let (bundle, state) = runc.target_bundle(
        &scratch,
        &[
            ("CRAC_TEST_CHILD", "1"),
            ("CRAC_TEST_LISTEN", "8080"),
            ("CRAC_TEST_ORDER_LOG", "/state/order.log"),
        ],
    );
    let id = "crac-e2e-runc";
    runc.run(id, &bundle);
    wait_ready(&state, true);
    let pid = runc.pid(id);
    let child: u32 = fs::read_to_string(state.join("child/ready"))
        .expect("child pid")
        .trim()
        .parse()
        .expect("a pid");
    let (before, child_before) = in_netns(pid, || (status(8080), status(8081)));
    assert_eq!(field(&before, "pid"), 1);

    let images = scratch.join("img");
    let (out, log) = runc.checkpoint(id, &images, &[], &[]);
    assert!(out.status.success(), "{}\n{log}", text(&out));
    let down = [
        format!("{child} before child-b"),
        format!("{child} before child-a"),
        "1 before third".to_owned(),
        "1 before second".to_owned(),
        "1 before first".to_owned(),
    ];
    assert_eq!(read_lines(&state.join("order.log")), down, "{log}");
    assert!(
        log.contains(&format!(
            "crac-action: pre-dump: pid {pid}: before_checkpoint ok, 4 hooks"
        )),
        "{log}"
    );

    let (result, log) = runc.restore(id, &bundle, &images);
    assert!(result.is_ok(), "{result:?}\n{log}");
    let restored = runc.pid(id);
    let mut expected = down.to_vec();
    expected.extend(
        ["first", "second", "third"]
            .iter()
            .map(|r| format!("1 after {r} restored gen=1")),
    );
    expected.extend(
        ["child-a", "child-b"]
            .iter()
            .map(|r| format!("{child} after {r} restored gen=1")),
    );
    assert_eq!(read_lines(&state.join("order.log")), expected, "{log}");
    assert!(
        log.contains("inside the root of a container, which CRIU does not name at this step"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "crac-action: setup-namespaces: brought up the loopback interface of pid {restored}'s network namespace"
        )),
        "{log}"
    );
    // crac status and crac ps find the agents in the container too.
    let crac = util::Crac::new(&scratch);
    let status_doc = crac.json(&["status", &restored.to_string(), "--json"]);
    assert_eq!(status_doc["state"], "idle");
    assert_eq!(status_doc["generation"], 1);
    let ps = crac.json(&["ps", "--json"]);
    let row = ps
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["pid"] == restored)
        .unwrap_or_else(|| panic!("crac ps does not list pid {restored}: {ps}"));
    assert_eq!(row["ns_pid"], 1);
    assert_eq!(
        row["socket"],
        format!("/tmp/crac/1/agent.sock inside the root of pid {restored}")
    );
    // The listeners came back with the processes: the same memory answers on the same ports.
    let (after, child_after) = in_netns(restored, || (status(8080), status(8081)));
    for (was, is) in [(&before, &after), (&child_before, &child_after)] {
        assert_eq!(
            field(is, "token"),
            field(was, "token"),
            "not the same memory"
        );
        assert_eq!(field(is, "generation"), 1);
        assert_ne!(field(is, "instance"), field(was, "instance"));
    }
}

/// `runc checkpoint --leave-running`: the container is told "resumed" and serves on. A hook
/// that fails makes `runc checkpoint` fail; the container is rolled back ("aborted") and
/// serves on. A container without an agent is dumped as on the host, with one log line.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn runc_leave_running_resumes_and_a_failing_hook_leaves_the_container_serving() {
    let Some(env) = util::env() else { return };
    if !oci::runtimes_present() {
        return;
    }
    let scratch = Scratch::new("runc-outcomes");
    let rootfs = oci::rootfs(&scratch);
    let config = oci::criu_config(&scratch, &bin("crac-action"));
    let mut runc = Runc::new(&env, &scratch);
    let start = |runc: &mut Runc, name: &str, env: &[(&str, &str)]| {
        let state = scratch.join(&format!("{name}-state"));
        let mut vars = vec![("CRAC_TEST_LISTEN", "8080")];
        vars.extend_from_slice(env);
        let bundle = runc.bundle(&scratch.join(name), &rootfs, &config, &state, &vars);
        runc.run(name, &bundle);
        wait_ready(&state, false);
        state
    };

    let state = start(&mut runc, "resumed", &[]);
    let pid = runc.pid("resumed");
    let (out, log) = runc.checkpoint(
        "resumed",
        &scratch.join("img-resumed"),
        &["--leave-running"],
        &[],
    );
    assert!(out.status.success(), "{}\n{log}", text(&out));
    wait_until(Duration::from_secs(10), "after_restore (resumed)", || {
        read_lines(&state.join("hooks.log")).len() == 6
    });
    assert_eq!(
        read_lines(&state.join("hooks.log")),
        concat(&BEFORE_ALL, &after_all("resumed", 1))
    );
    assert!(runc.running("resumed"));
    assert_eq!(field(&in_netns(pid, || status(8080)), "generation"), 1);

    let state = start(&mut runc, "failing", &[("CRAC_TEST_FAIL", "second")]);
    let pid = runc.pid("failing");
    let (out, log) = runc.checkpoint("failing", &scratch.join("img-failing"), &[], &[]);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "crac-action: pre-dump: pid {pid}: checkpoint refused: before_checkpoint of \"second\" failed: second cannot go down"
        )),
        "{log}"
    );
    assert_eq!(
        read_lines(&state.join("hooks.log")),
        concat(&BEFORE_ALL, &after_all("aborted", 0))
    );
    assert!(runc.running("failing"));
    let now = in_netns(pid, || status(8080));
    assert_eq!(field(&now, "generation"), 0);

    start(&mut runc, "no-agent", &[("CRAC_TEST_NO_AGENT", "1")]);
    let pid = runc.pid("no-agent");
    let (out, log) = runc.checkpoint(
        "no-agent",
        &scratch.join("img-no-agent"),
        &["--leave-running"],
        &[],
    );
    assert!(out.status.success(), "{}\n{log}", text(&out));
    assert!(
        log.contains(&format!(
            "crac-action: pre-dump: no agent in the process tree of pid {pid} (no socket at /tmp/crac/1/agent.sock inside the root of pid {pid}); nothing to coordinate"
        )),
        "{log}"
    );
}

/// podman: a service checkpointed into one archive, restored from it under its own name and,
/// at the same time, as a second copy under another: each has the image's memory, and each
/// renewed what must be unique.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn podman_export_import_and_a_second_copy_each_renew_what_is_unique() {
    let Some(env) = util::env() else { return };
    if !oci::runtimes_present() {
        return;
    }
    let scratch = Scratch::new("podman");
    let (podman, pid) = oci::podman_with_target(&env, &scratch, "svc");
    let before = in_netns(pid, || status(8080));

    let archive = scratch.join("svc.tar.zst");
    let archive = archive.to_str().expect("utf-8");
    podman.run(
        &["container", "checkpoint", "--export", archive, "svc"],
        "podman container checkpoint",
    );
    podman.run(&["rm", "svc"], "podman rm");
    podman.run(
        &["container", "restore", "--import", archive],
        "podman container restore",
    );
    podman.run(
        &[
            "container",
            "restore",
            "--import",
            archive,
            "--name",
            "copy",
        ],
        "podman container restore --name copy",
    );

    let mut instances = vec![field(&before, "instance")];
    for name in ["svc", "copy"] {
        let pid = podman.pid(name);
        let (parent, child) = in_netns(pid, || (status(8080), status(8081)));
        assert_eq!(
            field(&parent, "token"),
            field(&before, "token"),
            "{name}: not the image's memory"
        );
        for is in [&parent, &child] {
            assert_eq!(field(is, "generation"), 1, "{name}: {is}");
            assert!(
                status_hooks(is)
                    .iter()
                    .any(|l| l.ends_with("restored gen=1")),
                "{name}: no after_restore ran: {is}"
            );
        }
        assert_eq!(
            status_hooks(&parent),
            concat(&BEFORE_ALL, &after_all("restored", 1)),
            "{name}"
        );
        instances.push(field(&parent, "instance"));
    }
    let unique: std::collections::BTreeSet<u64> = instances.iter().copied().collect();
    assert_eq!(unique.len(), 3, "instances must differ: {instances:?}");
}
