//! Real container runtimes for the end-to-end tests: runc and podman (Debian 12's packages,
//! podman with `--runtime runc`), each configured for the test's containers only.
//!
//! - The containers run crac-test-target from a root file system folder made here: the
//!   binary and the shared libraries it needs, nothing else (no registry is reachable).
//! - CRIU runs crac-action because of a CRIU configuration file named by the container's
//!   `org.criu.config` annotation, which runc 1.1 honours: nothing is written to /etc/criu.
//! - runc keeps its state, podman its images, containers and state, in the test's scratch
//!   folder. podman finds CRIU on `PATH`: a folder of the test's own holds a `criu` link to
//!   the CRIU the tests use.
//! - A client reaches a container's listener from a thread that entered the container's
//!   network namespace ([`in_netns`]).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::util::{bin, text, Env, Scratch};
pub(crate) use crac_test_support::podman::Podman;
use crac_test_support::podman::LIMIT_OPTIONS;

/// Whether runc and podman are here: in CI a missing one fails the test, elsewhere it is
/// skipped with a line saying how to get it.
pub(crate) fn runtimes_present() -> bool {
    let missing: Vec<&str> = ["runc", "podman"]
        .into_iter()
        .filter(|tool| {
            !Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    let problem = (!missing.is_empty()).then(|| format!("{} not installed", missing.join(" and ")));
    crac_test_support::may_run(
        "container test",
        problem,
        "as root, scripts/test.sh (it installs runc and podman)",
    )
}

/// Runs `cmd`, returning its output.
fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("command runs")
}

/// Runs `cmd` and asserts it succeeded.
fn run_ok(cmd: Command, what: &str) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "{what}: {}", text(&out));
    out
}

/// A root file system with crac-test-target at `/crac-test-target`, its libraries, and the
/// empty folders a container needs.
pub(crate) fn rootfs(scratch: &Scratch) -> PathBuf {
    rootfs_of(scratch, "crac-test-target")
}

/// A root file system with the built binary `program` at `/PROGRAM`, its libraries, and the
/// empty folders a container needs.
pub(crate) fn rootfs_of(scratch: &Scratch, program: &str) -> PathBuf {
    let root = scratch.join("rootfs");
    let target = bin(program);
    for dir in ["proc", "dev", "sys", "tmp", "state"] {
        fs::create_dir_all(root.join(dir)).expect("rootfs folder");
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("chmod");
    fs::copy(&target, root.join(program)).expect("copy the program");
    let ldd = run_ok(
        {
            let mut c = Command::new("ldd");
            c.arg(&target);
            c
        },
        "ldd",
    );
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let Some(path) = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(PathBuf::from)
        else {
            continue;
        };
        let inside = root.join(path.strip_prefix("/").expect("absolute"));
        fs::create_dir_all(inside.parent().expect("a folder")).expect("library folder");
        fs::copy(&path, &inside).unwrap_or_else(|e| panic!("copy {}: {e}", path.display()));
    }
    root
}

/// The CRIU configuration the test containers name in `org.criu.config`.
pub(crate) fn criu_config(scratch: &Scratch, action_script: &Path) -> PathBuf {
    let path = scratch.join("criu.conf");
    fs::write(
        &path,
        format!(
            "# For the test containers only (named by their org.criu.config annotation).\n\
             action-script {}\n\
             # A kept listener may have a client queued while the container is dumped.\n\
             skip-in-flight\n\
             # Lock the container's network with nftables: no iptables-restore needed.\n\
             network-lock nftables\n",
            action_script.display()
        ),
    )
    .expect("CRIU config");
    path
}

/// The `criu` a runtime should run: the one the tests found.
fn criu_path(env: &Env) -> &Path {
    &env.criu.path
}

/// runc, with its state and its log in the test's scratch folder.
pub(crate) struct Runc {
    state: PathBuf,
    log: PathBuf,
    criu: PathBuf,
    containers: BTreeSet<String>,
}

impl Runc {
    pub(crate) fn new(env: &Env, scratch: &Scratch) -> Runc {
        Runc {
            state: scratch.join("runc-state"),
            log: scratch.join("runc.log"),
            criu: criu_path(env).to_owned(),
            containers: BTreeSet::new(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(&self.state)
            .arg("--log")
            .arg(&self.log)
            .arg("--criu")
            .arg(&self.criu);
        cmd
    }

    /// Runs a command that starts a container (run, restore). The container gets runc's
    /// stdio, so it must not be a pipe of ours (we would wait for its end forever) nor a
    /// file (CRIU cannot dump a descriptor of a file outside the container): /dev/null, and
    /// runc's own messages go to its log.
    fn start(&self, mut cmd: Command) -> Result<(), String> {
        let status = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("runc runs");
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{status}; runc's log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            ))
        }
    }

    /// A bundle for `rootfs` whose process has `env`, with `/state` bound to `state` (the
    /// target's CRAC_TEST_DIR), a tmpfs `/tmp`, and the CRIU config annotation.
    pub(crate) fn bundle(
        &self,
        dir: &Path,
        rootfs: &Path,
        config: &Path,
        state: &Path,
        env: &[(&str, &str)],
    ) -> PathBuf {
        fs::create_dir_all(dir).expect("bundle folder");
        fs::create_dir_all(state).expect("state folder");
        let mut spec = Command::new("runc");
        spec.args(["spec", "--bundle"]).arg(dir);
        run_ok(spec, "runc spec");
        let path = dir.join("config.json");
        let mut config_json: Value =
            serde_json::from_slice(&fs::read(&path).expect("config.json")).expect("JSON");
        let process = &mut config_json["process"];
        process["terminal"] = json!(false);
        process["args"] = json!(["/crac-test-target"]);
        let vars = process["env"].as_array_mut().expect("env");
        vars.push(json!("CRAC_TEST_DIR=/state"));
        for (k, v) in env {
            vars.push(json!(format!("{k}={v}")));
        }
        config_json["root"] = json!({ "path": rootfs, "readonly": true });
        let mounts = config_json["mounts"].as_array_mut().expect("mounts");
        mounts.push(json!({
            "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", "size=16m"]
        }));
        mounts.push(json!({
            "destination": "/state", "type": "bind", "source": state,
            "options": ["rbind", "rw"]
        }));
        config_json["annotations"] = json!({ "org.criu.config": config });
        fs::write(
            &path,
            serde_json::to_vec_pretty(&config_json).expect("JSON"),
        )
        .expect("config.json");
        dir.to_owned()
    }

    /// A bundle in `scratch` (its `bundle` folder) for crac-test-target with `env` and crac's
    /// CRIU configuration, `/state` bound to the scratch folder's `state`; and that folder.
    pub(crate) fn target_bundle(
        &self,
        scratch: &Scratch,
        env: &[(&str, &str)],
    ) -> (PathBuf, PathBuf) {
        let rootfs = rootfs(scratch);
        let config = criu_config(scratch, &bin("crac-action"));
        let state = scratch.join("state");
        let bundle = self.bundle(&scratch.join("bundle"), &rootfs, &config, &state, env);
        (bundle, state)
    }

    /// `runc run -d`: starts container `id` from `bundle`.
    pub(crate) fn run(&mut self, id: &str, bundle: &Path) {
        let mut cmd = self.command();
        cmd.args(["run", "-d", "--bundle"]).arg(bundle).arg(id);
        if let Err(err) = self.start(cmd) {
            panic!("runc run {id}: {err}");
        }
        self.containers.insert(id.to_owned());
    }

    /// The host pid of container `id`'s init.
    pub(crate) fn pid(&self, id: &str) -> u32 {
        let mut cmd = self.command();
        cmd.args(["state", id]);
        let out = run_ok(cmd, "runc state");
        let state: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        state["pid"].as_u64().expect("pid") as u32
    }

    /// `runc checkpoint` of `id` into `images`, with `extra` options and `env` for CRIU (and
    /// so crac-action); returns runc's output and CRIU's log.
    pub(crate) fn checkpoint(
        &mut self,
        id: &str,
        images: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Output, String) {
        let mut cmd = self.command();
        cmd.args(["checkpoint", "--image-path"])
            .arg(images)
            .args(extra)
            .arg(id)
            .envs(env.iter().copied());
        let out = run(cmd);
        if out.status.success() && !extra.contains(&"--leave-running") {
            // runc removes a container it checkpointed and stopped.
            self.containers.remove(id);
        }
        (
            out,
            fs::read_to_string(images.join("dump.log")).unwrap_or_default(),
        )
    }

    /// `runc restore -d` of `id` from `images` with `bundle`; returns whether it worked
    /// (or runc's log) and CRIU's log.
    pub(crate) fn restore(
        &mut self,
        id: &str,
        bundle: &Path,
        images: &Path,
    ) -> (Result<(), String>, String) {
        let mut cmd = self.command();
        cmd.args(["restore", "-d", "--bundle"])
            .arg(bundle)
            .arg("--image-path")
            .arg(images)
            .arg(id);
        let result = self.start(cmd);
        if result.is_ok() {
            self.containers.insert(id.to_owned());
        }
        (
            result,
            fs::read_to_string(images.join("restore.log")).unwrap_or_default(),
        )
    }

    /// Whether container `id` runs.
    pub(crate) fn running(&self, id: &str) -> bool {
        let mut cmd = self.command();
        cmd.args(["state", id]);
        let out = run(cmd);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|s| s["status"] == "running")
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.containers) {
            let mut cmd = self.command();
            cmd.args(["delete", "-f", &id]);
            let _ = run(cmd);
        }
        crate::util::reap_orphans();
    }
}

/// Imports `rootfs` as image `name`, running crac-test-target.
pub(crate) fn import(podman: &Podman, rootfs: &Path, name: &str) {
    let tar = rootfs.with_extension("tar");
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(rootfs).arg("-cf").arg(&tar).arg(".");
    run_ok(cmd, "tar the rootfs");
    podman.run(
        &[
            "import",
            "--change",
            r#"CMD ["/crac-test-target"]"#,
            tar.to_str().expect("utf-8"),
            name,
        ],
        "podman import",
    );
}

/// The image crac-test-target runs from in the podman tests.
const TARGET_IMAGE: &str = "localhost/crac-test:e2e";

/// `podman run -d` of container `name` on network `network`, with limits runc can set here and
/// crac's CRIU configuration `config` named by its annotation; `rest` is the image, its command
/// and any option before them.
pub(crate) fn podman_run(podman: &Podman, name: &str, network: &str, config: &Path, rest: &[&str]) {
    let annotation = format!("org.criu.config={}", config.display());
    let mut args = vec!["run", "-d", "--name", name, "--network", network];
    args.extend(LIMIT_OPTIONS);
    args.extend(["--annotation", &annotation]);
    args.extend(rest);
    podman.run(&args, &format!("podman run {name}"));
}

/// podman with its storage in `scratch`, running crac-test-target in container `name`, with
/// no network, crac's CRIU configuration, its state in `/state`, a listener on 8080 and a
/// child; and the container's init's pid.
pub(crate) fn podman_with_target(env: &Env, scratch: &Scratch, name: &str) -> (Podman, u32) {
    let rootfs = rootfs(scratch);
    let config = criu_config(scratch, &bin("crac-action"));
    let podman = Podman::new(&scratch.join("podman"), &env.criu.path);
    import(&podman, &rootfs, TARGET_IMAGE);
    podman_run(
        &podman,
        name,
        "none",
        &config,
        &[
            "-e",
            "CRAC_TEST_DIR=/state",
            "-e",
            "CRAC_TEST_LISTEN=8080",
            "-e",
            "CRAC_TEST_CHILD=1",
            TARGET_IMAGE,
        ],
    );
    let pid = podman.pid(name);
    (podman, pid)
}

/// Runs `f` on a thread inside process `pid`'s network namespace (a socket made there stays
/// there), and returns what it returns.
pub(crate) fn in_netns<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = fs::File::open(format!("/proc/{pid}/ns/net")).expect("netns");
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("enter the network namespace");
                f()
            })
            .join()
            .expect("netns thread")
    })
}
