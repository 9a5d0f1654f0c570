//! `crac migrate` and podman containers: a process inside a container is refused (it would come
//! out of its container), naming the container-level path; a container moves whole between
//! the two hosts of scripts/hosts.sh (`--container`), each with podman storage of its own, or
//! is refused before anything stops.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::migrate::{
    ask, finish, key, migrate_command, migrated, receiver_with, stats, Hosts, Upstream, SERVICE,
    SERVICE_PORT, UPSTREAM,
};
use crate::oci::{self, in_netns, Podman, Runc};
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
    let (_podman, pid) = oci::podman_with_target(&env, &scratch, "c22-inside");
    let before = in_netns(pid, || status(8080));
    let key = key(&scratch, "key", 'k');
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
        let said = refused(&crac, process, &key);
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

/// `crac migrate PID` of a runc container's init (runc gone, its init left to a subreaper)
/// refuses, saying that it is pid 1 of a pid namespace of its own and that crac cannot move it.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn a_runc_container_is_refused_saying_why_it_cannot_move() {
    let Some(env) = util::env() else { return };
    if !oci::runtimes_present() {
        return;
    }
    let scratch = Scratch::new("mig-runc");
    let mut runc = Runc::new(&env, &scratch);
    let (bundle, _) = runc.target_bundle(&scratch, &[("CRAC_TEST_LISTEN", "8080")]);
    runc.run("c22-runc", &bundle);
    let pid = runc.pid("c22-runc");
    let before = in_netns(pid, || status(8080));
    let key = key(&scratch, "key", 'k');
    let crac = Crac::new(&scratch);
    let said = refused(&crac, pid, &key);
    assert!(
        said.contains(&format!(
            "pid {pid} runs in a pid namespace of its own, as its pid 1 (a container's init)"
        )) && said.contains("cannot recreate this container at the destination")
            && said.contains("nothing was stopped"),
        "{said}"
    );
    let after = in_netns(pid, || status(8080));
    assert_eq!(field(&after, "token"), field(&before, "token"));
    assert_eq!(field(&after, "generation"), 0, "{after}");
}

/// `crac migrate PID` with `key`, to a destination it never reaches: asserts that it refused
/// (bad input, exit 2); what it said.
fn refused(crac: &Crac, pid: u32, key: &Path) -> String {
    let out = crac.run(&[
        "migrate",
        &pid.to_string(),
        "--to",
        "127.0.0.1:9",
        "--key",
        &key.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The two hosts of the container tests: this module's own namespaces (issue 22, podman).
const PREFIX: &str = "c22pod";
const NAME: &str = "c22-cache";

/// The image copied from `from`'s storage into `to`'s, with its id (as a registry would: a new
/// `podman import` of the same files makes another image, of another creation time).
fn copy_image(from: &Podman, to: &Podman, scratch: &Scratch) {
    let archive = scratch.join("image.tar");
    let archive = archive.to_str().expect("utf-8");
    from.run(&["save", "--output", archive, IMAGE], "podman save at A");
    to.run(&["load", "--input", archive], "podman load at B");
}

/// A container test's world: the two hosts, the cache-server's upstream, podman at A and at
/// B (storage of its own each), and the cache-server running in container [`NAME`] at A. The
/// fields drop in this order: the containers first, the hosts and the scratch folder, then
/// the test's right to run alone.
struct Setup {
    podman_b: Podman,
    podman_a: Podman,
    config: PathBuf,
    _upstream: Upstream,
    hosts: Hosts,
    scratch: Scratch,
    _env: util::Env,
}

impl Setup {
    /// Sets it up in the scratch folder `name`; B's storage has the cache-server's image if
    /// `image_at_b`. None where the test cannot run (not root, no CRIU, runc or podman).
    fn new(name: &str, image_at_b: bool) -> Option<Setup> {
        let env = util::env()?;
        if !oci::runtimes_present() {
            return None;
        }
        let scratch = Scratch::new(name);
        let hosts = Hosts::up_as(PREFIX);
        let upstream = Upstream::start(&hosts, &scratch);
        let rootfs = oci::rootfs_of(&scratch, "cache-server");
        let config = oci::criu_config(&scratch, &bin("crac-action"));
        let podman_a = podman_on(&hosts, "a", &scratch.join("pa"), &env.criu.path);
        let podman_b = podman_on(&hosts, "b", &scratch.join("pb"), &env.criu.path);
        oci::import(&podman_a, &rootfs, IMAGE);
        if image_at_b {
            copy_image(&podman_a, &podman_b, &scratch);
        }
        run_cache_server(&hosts, &podman_a, &config);
        Some(Setup {
            podman_b,
            podman_a,
            config,
            _upstream: upstream,
            hosts,
            scratch,
            _env: env,
        })
    }
}

const IMAGE: &str = "localhost/crac-cache:e2e";

/// podman on host `host`, its storage in the scratch folder `dir`.
fn podman_on(hosts: &Hosts, host: &'static str, dir: &Path, criu: &Path) -> Podman {
    let wrapper = hosts.wrapper(host);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Podman::new(dir, criu).under(&wrapper)
}

/// `--podman-arg=ARG` for each of `podman`'s global options.
fn podman_args(podman: &Podman) -> Vec<String> {
    podman
        .global_options()
        .into_iter()
        .map(|o| format!("--podman-arg={o}"))
        .collect()
}

/// Starts the cache-server in the container [`NAME`] at A, on A's network (`--network host`),
/// with crac's CRIU configuration named by its annotation; waits until it answers.
fn run_cache_server(hosts: &Hosts, podman: &Podman, config: &Path) {
    let port = SERVICE_PORT.to_string();
    oci::podman_run(
        podman,
        NAME,
        "host",
        config,
        &[
            IMAGE,
            "/cache-server",
            "--address",
            SERVICE,
            "--port",
            &port,
            "--upstream",
            UPSTREAM,
        ],
    );
    assert_eq!(ask(hosts, "GET a"), "value-of-a");
}

/// `crac migrate --container` of [`NAME`] at A, to the receiver at B.
fn migrate_container(setup: &Setup, store: &Path, key: &Path, strategy: &str) -> Output {
    migrate_command(&setup.hosts, store, &["--container", NAME], key, strategy)
        .args(["--link-timeout", "5"])
        .args(podman_args(&setup.podman_a))
        .output()
        .expect("crac migrate runs")
}

/// Asserts that `podman` has no container, running or not (`host` names it).
fn no_containers(podman: &Podman, host: &str) {
    let left = podman.run(&["ps", "--all", "--quiet"], &format!("podman ps at {host}"));
    assert!(
        left.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// The lines of container [`NAME`]'s log that contain `what`.
fn log_lines(podman: &Podman, what: &str) -> usize {
    let out = podman.run(&["logs", NAME], "podman logs");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains(what))
        .count()
}

/// A podman container running the cache-server moves from A to B whole: podman's checkpoint
/// with crac's hooks at A, its archive over the sealed channel, podman's restore at B. The
/// cache answers at B at the same address with the entries it had, `restored` was told once,
/// and nothing is left at A.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn a_podman_container_moves_whole_with_its_state() {
    let Some(setup) = Setup::new("mig-pod", true) else {
        return;
    };
    for k in ["b", "c"] {
        assert_eq!(
            ask(&setup.hosts, &format!("GET {k}")),
            format!("value-of-{k}")
        );
    }
    let before = stats(&ask(&setup.hosts, "STATS"));
    assert_eq!(before["entries"], 3, "{before}");

    let key = key(&setup.scratch, "key", 'k');
    let store_b = setup.scratch.join("store-b");
    let (receiver, receiver_log) = receiver_with(
        &setup.hosts,
        &setup.scratch,
        &key,
        &store_b.display().to_string(),
        None,
        &[podman_args(&setup.podman_b), vec!["--json".to_owned()]].concat(),
    );
    let store_a = setup.scratch.join("store-a");
    let out = migrate_container(&setup, &store_a, &key, "stop-and-copy");
    let received = migrated(&out, receiver, &receiver_log);
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["strategy"], "stop-and-copy", "{outcome}");
    assert!(
        outcome["bytes_sent"].as_u64() > outcome["image_bytes"].as_u64(),
        "the archive went through the channel: {outcome}"
    );
    let said_at_b: serde_json::Value = serde_json::from_slice(&received.stdout).unwrap();
    assert_eq!(said_at_b["container"], NAME, "{said_at_b}");

    // The same cache, restored once, answering at the same address from B.
    let after = stats(&ask(&setup.hosts, "STATS"));
    assert_eq!(after["entries"], 3, "{after}");
    assert_eq!(after["generation"], 1, "{after}");
    assert_eq!(after["last_restore"], "restored", "{after}");
    assert_eq!(after["upstream_connection"], 2, "{after}");
    assert_eq!(ask(&setup.hosts, "GET a"), "value-of-a");
    assert_eq!(
        stats(&ask(&setup.hosts, "STATS"))["hits"].as_u64(),
        before["hits"].as_u64().map(|h| h + 1)
    );
    assert!(setup
        .hosts
        .ip("c", &["route", "get", SERVICE])
        .contains("10.77.2.2"));
    assert_eq!(
        setup.podman_b.pid(NAME),
        said_at_b["pid"].as_u64().unwrap() as u32
    );
    assert_eq!(log_lines(&setup.podman_b, "before_checkpoint cache"), 1);
    assert_eq!(log_lines(&setup.podman_b, "after_restore cache"), 1);
    // Nothing left at A: no container, no process, no address, no archive.
    no_containers(&setup.podman_a, "A");
    assert!(
        setup.hosts.pids("a").is_empty(),
        "{:?}",
        setup.hosts.pids("a")
    );
    assert!(!setup.hosts.ip("a", &["-4", "addr"]).contains(SERVICE));
    assert!(setup.hosts.ip("b", &["-4", "addr"]).contains(SERVICE));
    let crac_a = Crac { store: store_a };
    assert!(crac_a.listing().is_empty(), "{:?}", crac_a.listing());
}

/// A container cannot move post-copy (podman has no lazy pages), and a destination whose
/// podman storage lacks the container's image refuses before the freeze: the container runs on
/// at A, never stopped.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn a_destination_without_the_image_refuses_and_the_container_runs_on() {
    let Some(setup) = Setup::new("mig-pod-no", false) else {
        return;
    };
    let pid = setup.podman_a.pid(NAME);
    let before = stats(&ask(&setup.hosts, "STATS"));
    let image_id = setup
        .podman_a
        .run(&["inspect", "-f", "{{.Image}}", NAME], "podman inspect");
    let image_id = String::from_utf8_lossy(&image_id.stdout)[..12].to_owned();
    let key = key(&setup.scratch, "key", 'k');
    let store_a = setup.scratch.join("store-a");

    let out = migrate_container(&setup, &store_a, &key, "post-copy");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("a container cannot move post-copy: podman passes CRIU no lazy-pages or page-server options")
            && said.contains("nothing was stopped"),
        "{said}"
    );

    let (receiver, _) = receiver_with(
        &setup.hosts,
        &setup.scratch,
        &key,
        &setup.scratch.join("store-b").display().to_string(),
        None,
        &podman_args(&setup.podman_b),
    );
    let out = migrate_container(&setup, &store_a, &key, "stop-and-copy");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("cannot run the service, checked before anything was stopped")
            && said.contains(&format!(
                "the container's image {IMAGE} ({image_id}) is not in this host's podman storage"
            ))
            && said.contains("nothing was stopped: the service runs on here"),
        "{said}"
    );
    let received = finish(receiver);
    assert_eq!(received.status.code(), Some(1), "{}", text(&received));
    // Never stopped: the same process, no hook ran, nothing at B.
    assert_eq!(setup.podman_a.pid(NAME), pid);
    let after = stats(&ask(&setup.hosts, "STATS"));
    assert_eq!(after["generation"], 0, "{after}");
    assert_eq!(after["upstream_connection"], before["upstream_connection"]);
    assert_eq!(log_lines(&setup.podman_a, "before_checkpoint"), 0);
    no_containers(&setup.podman_b, "B");
    assert!(setup.hosts.ip("a", &["-4", "addr"]).contains(SERVICE));
}

/// The restore fails at B after the freeze (there, the CRIU configuration's action script
/// fails): B gives the address back and says so, and A restores its container from the
/// checkpoint podman kept: it runs at A again with its state, and nothing runs at B.
#[test]
#[ignore = "needs root, CRIU >= 4.2, runc and podman: scripts/test.sh runs it"]
fn a_restore_failing_at_the_destination_brings_the_container_back_at_the_source() {
    let Some(setup) = Setup::new("mig-pod-back", true) else {
        return;
    };
    assert_eq!(ask(&setup.hosts, "GET b"), "value-of-b");
    let before = stats(&ask(&setup.hosts, "STATS"));
    // At B (its own mount namespace), the same path names a configuration whose action
    // script fails: the checks pass, the restore does not.
    let failing = setup.scratch.join("failing.conf");
    fs::write(&failing, "action-script /bin/false\n").unwrap();
    let key = key(&setup.scratch, "key", 'k');
    let (receiver, receiver_log) = receiver_with(
        &setup.hosts,
        &setup.scratch,
        &key,
        &setup.scratch.join("store-b").display().to_string(),
        Some(&format!(
            "mount --bind {} {}",
            failing.display(),
            setup.config.display()
        )),
        &podman_args(&setup.podman_b),
    );
    let store_a = setup.scratch.join("store-a");
    let out = migrate_container(&setup, &store_a, &key, "stop-and-copy");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("the destination could not restore it: podman container restore failed")
            && said.contains("it was restored here from its checkpoint and runs here again"),
        "{said}"
    );
    let received = finish(receiver);
    assert_eq!(received.status.code(), Some(1), "{}", text(&received));
    let receiver_said = fs::read_to_string(&receiver_log).unwrap();
    assert!(
        receiver_said.contains(&format!("could not restore the container {NAME} here"))
            && receiver_said.contains("the source restores it"),
        "{receiver_said}"
    );
    // At A again, restored once, its state whole; nothing at B, the address back at A.
    let after = stats(&ask(&setup.hosts, "STATS"));
    assert_eq!(after["entries"], before["entries"], "{after}");
    assert_eq!(after["generation"], 1, "{after}");
    assert_eq!(after["last_restore"], "restored", "{after}");
    assert_eq!(log_lines(&setup.podman_a, "after_restore cache"), 1);
    no_containers(&setup.podman_b, "B");
    assert!(setup.hosts.ip("a", &["-4", "addr"]).contains(SERVICE));
    assert!(!setup.hosts.ip("b", &["-4", "addr"]).contains(SERVICE));
    let crac_a = Crac { store: store_a };
    assert!(crac_a.listing().is_empty(), "{:?}", crac_a.listing());
}
