//! podman for the end-to-end tests and the benchmarks: Debian 12's podman with
//! `--runtime runc`, its storage, state and blob cache kept where the caller says and removed
//! when it is dropped, and `criu` found on its PATH (a folder of its own holds a link to the
//! CRIU to use).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// podman, with `--runtime runc`, all its storage and state in one folder.
#[derive(Debug)]
pub struct Podman {
    dir: PathBuf,
    path: String,
    /// Whether podman's blob cache (written by `podman import` whatever the storage options)
    /// was absent before: then it goes when the test ends.
    remove_cache: bool,
    /// The same for the state folder of the runc that podman runs.
    remove_runc_state: bool,
    /// A command that runs podman somewhere else (another host's namespaces), if any.
    wrapper: Vec<String>,
}

/// What `podman run` needs for crac run and CRIU inside an image scripts/container-image.sh
/// made (its usage says why): privileges, the host's network, and limits runc can set here.
pub const WARM_RUN_OPTIONS: [&str; 7] = [
    "--privileged",
    "--network",
    "host",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// What `podman run` needs for crac run and CRIU without `--privileged`: the limits and
/// network of [`WARM_RUN_OPTIONS`] and CAP_CHECKPOINT_RESTORE, with which crac runs CRIU in
/// its unprivileged mode. Enough for a restore; a warm-up (a dump) needs
/// [`WARM_UP_OPTIONS`] as well.
pub const CAPABILITY_RUN_OPTIONS: [&str; 8] = [
    "--cap-add",
    "CHECKPOINT_RESTORE",
    "--network",
    "host",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// The limits of [`WARM_RUN_OPTIONS`] alone: ones runc can set here.
pub const LIMIT_OPTIONS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// What a dump needs beyond [`CAPABILITY_RUN_OPTIONS`]: no seccomp filter (CRIU suspends the
/// service's filter, which the kernel lets only an unfiltered tracer do).
pub const WARM_UP_OPTIONS: [&str; 2] = ["--security-opt", "seccomp=unconfined"];

/// Where the runc that podman runs keeps its state.
const RUNC_STATE: &str = "/run/runc";

/// podman's blob cache, which `podman import` writes outside the storage it is given.
const PODMAN_CACHE: &str = "/var/lib/containers/cache";

impl Podman {
    /// podman keeping everything in `dir`, running `criu` (found on its PATH).
    pub fn new(dir: &Path, criu: &Path) -> Podman {
        let dir = dir.to_owned();
        let bin_dir = dir.join("bin");
        fs::create_dir_all(&bin_dir).expect("podman folder");
        // podman checks for `criu` on PATH, and runs runc, which runs it from there too.
        symlink(criu, bin_dir.join("criu")).expect("criu link");
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Podman {
            remove_cache: !Path::new(PODMAN_CACHE).exists(),
            remove_runc_state: !Path::new(RUNC_STATE).exists(),
            dir,
            path,
            wrapper: Vec::new(),
        }
    }

    /// This podman, run through `wrapper` (a command that runs the rest of its command line
    /// elsewhere: `scripts/hosts.sh exec PREFIX b`), for every command and its cleanup.
    pub fn under(mut self, wrapper: &[&str]) -> Podman {
        self.wrapper = wrapper.iter().map(|w| (*w).to_owned()).collect();
        self
    }

    /// podman's options for this test's storage and runtime, before the command's own.
    pub fn global_options(&self) -> Vec<String> {
        let dir = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
        let mut options = vec![
            "--root".to_owned(),
            dir("root"),
            "--runroot".to_owned(),
            dir("runroot"),
            "--tmpdir".to_owned(),
            dir("tmp"),
            "--network-config-dir".to_owned(),
            dir("cni"),
        ];
        options.extend(
            [
                "--storage-driver",
                "overlay",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]
            .map(str::to_owned),
        );
        options
    }

    /// A podman command with `args`, on this storage.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg("podman");
                cmd
            }
            None => Command::new("podman"),
        };
        cmd.args(self.global_options())
            .args(args)
            .env("PATH", &self.path);
        cmd
    }

    /// Runs podman with `args`, asserting that it succeeded (`what` says what it did).
    pub fn run(&self, args: &[&str], what: &str) -> Output {
        crate::engine::succeeded(self.try_run(args), what)
    }

    /// Runs podman with `args`.
    pub fn try_run(&self, args: &[&str]) -> Output {
        crate::engine::output(self.command(args), "podman")
    }

    /// The host pid of container `name`'s init.
    pub fn pid(&self, name: &str) -> u32 {
        let out = self.run(&["inspect", "-f", "{{.State.Pid}}", name], "podman inspect");
        crate::engine::init_pid(&out)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.try_run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.try_run(&["rmi", "--all", "--force"]);
        // The overlay driver mounts its home on itself and unmounts it only in some exits; a
        // mount left there keeps the scratch folder from being removed.
        let overlay = self.dir.join("root/overlay");
        if fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.lines().any(|l| l.contains(&*overlay.to_string_lossy())))
        {
            let _ = Command::new("umount").arg("-l").arg(&overlay).status();
        }
        if self.remove_cache {
            let _ = fs::remove_dir_all(PODMAN_CACHE);
            // /var/lib/containers itself, if the cache was all podman put there.
            let _ = fs::remove_dir(Path::new(PODMAN_CACHE).parent().expect("a parent"));
        }
        if self.remove_runc_state {
            // Empty once the containers are gone.
            let _ = fs::remove_dir(RUNC_STATE);
        }
        // The cgroups cgroupfs made for conmon and the containers, when nothing uses them.
        if let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") {
            for controller in controllers.flatten() {
                let parent = controller.path().join("libpod_parent");
                let _ = fs::remove_dir(parent.join("conmon"));
                let _ = fs::remove_dir(&parent);
            }
        }
        // conmon, re-parented to this subreaper once its container is gone.
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
    }
}
