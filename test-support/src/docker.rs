//! Docker for the end-to-end tests and the benchmarks: Debian 12's dockerd (20.10, with its
//! containerd and runc), started privately and stopped when dropped.
//!
//! Everything it keeps is in one folder: its data root, exec root, pidfile and socket. It
//! touches no iptables rule, bridge or sysctl (`--iptables=false --ip-forward=false
//! --ip-masq=false --bridge=none`: containers use the host's network or none), and CRIU gets
//! its options from the file named by `CRIU_CONFIG_FILE` in dockerd's environment, which
//! containerd, runc and CRIU inherit: nothing goes into /etc/criu. The client is Debian's
//! `/usr/bin/docker` (the API version dockerd speaks; a newer client elsewhere on PATH would
//! have to negotiate down).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Debian's dockerd.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// Debian's docker client, of dockerd's version.
pub const CLIENT: &str = "/usr/bin/docker";

/// A private dockerd.
#[derive(Debug)]
pub struct Docker {
    dir: PathBuf,
    daemon: Child,
    socket: PathBuf,
    /// The folders dockerd and containerd make under /run whatever their roots (plugin
    /// sockets, the shims' sockets), which were absent before: removed when it stops.
    made_in_run: Vec<&'static str>,
}

/// What dockerd 20.10 and containerd 1.6 make under /run outside their exec root, deepest
/// first.
const RUN_FOLDERS: [&str; 4] = [
    "/run/docker/plugins",
    "/run/docker",
    "/run/containerd/s",
    "/run/containerd",
];

/// What `docker run` needs for crac run and CRIU with capabilities instead of `--privileged`:
/// CAP_SYS_ADMIN (Docker 20.10 does not know CAP_CHECKPOINT_RESTORE; CRIU runs in full mode
/// then), the host's network, and limits runc can set here. Enough for a restore; a warm-up
/// needs [`WARM_UP_OPTIONS`] as well.
pub const CAPABILITY_RUN_OPTIONS: [&str; 8] = [
    "--cap-add",
    "SYS_ADMIN",
    "--network",
    "host",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// What a dump needs beyond [`CAPABILITY_RUN_OPTIONS`]: no seccomp filter (CRIU suspends the
/// service's filter), and the /proc and /sys paths Docker masks (CRIU reads them).
pub const WARM_UP_OPTIONS: [&str; 4] = [
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "systempaths=unconfined",
];

/// Whether Debian's dockerd and client are installed; the problem when not.
pub fn missing() -> Option<String> {
    [DOCKERD, CLIENT]
        .into_iter()
        .find(|path| !Path::new(path).exists())
        .map(|path| format!("{path} not installed (Debian's docker.io)"))
}

impl Docker {
    /// Starts dockerd keeping everything in `dir`, running `criu` (found on its PATH) with the
    /// options in `criu_config` (`CRIU_CONFIG_FILE`); waits until it answers.
    ///
    /// # Panics
    ///
    /// When dockerd does not start or answer within 60 s.
    pub fn start(dir: &Path, criu: &Path, criu_config: &Path) -> Docker {
        let bin_dir = dir.join("bin");
        fs::create_dir_all(&bin_dir).expect("docker folder");
        symlink(criu, bin_dir.join("criu")).expect("criu link");
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let made_in_run = RUN_FOLDERS
            .into_iter()
            .filter(|path| !Path::new(path).exists())
            .collect();
        let socket = dir.join("docker.sock");
        let sub = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let log = fs::File::create(dir.join("dockerd.log")).expect("dockerd log");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).expect("dockerd's TMPDIR");
        let daemon = Command::new(DOCKERD)
            .args(["--data-root", &sub("data")])
            .args(["--exec-root", &sub("exec")])
            .args(["--pidfile", &sub("docker.pid")])
            .args(["-H", &format!("unix://{}", socket.display())])
            .args([
                "--experimental",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--userland-proxy=false",
                "--storage-driver=overlay2",
            ])
            .env("PATH", path)
            .env("CRIU_CONFIG_FILE", criu_config)
            // containerd stages each checkpoint in $TMPDIR/ctrd-checkpoint*, and leaves it.
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let docker = Docker {
            dir: dir.to_owned(),
            daemon,
            socket,
            made_in_run,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !docker.try_run(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s: {}",
                fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        docker
    }

    /// A docker command with `args`, talking to this dockerd.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CLIENT);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env_remove("DOCKER_HOST")
            // The client's own configuration (credentials, contexts) stays out of the tests.
            .env("DOCKER_CONFIG", self.dir.join("client"))
            // Dockerfiles are built by the classic builder, which 20.10 has without BuildKit.
            .env("DOCKER_BUILDKIT", "0");
        cmd
    }

    /// Runs docker with `args`, asserting that it succeeded (`what` says what it did).
    pub fn run(&self, args: &[&str], what: &str) -> Output {
        crate::engine::succeeded(self.try_run(args), what)
    }

    /// Runs docker with `args`.
    pub fn try_run(&self, args: &[&str]) -> Output {
        crate::engine::output(self.command(args), "docker")
    }

    /// The host pid of container `name`'s init.
    pub fn pid(&self, name: &str) -> u32 {
        let out = self.run(&["inspect", "-f", "{{.State.Pid}}", name], "docker inspect");
        crate::engine::init_pid(&out)
    }

    /// dockerd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let ids = self.try_run(&["ps", "--all", "--quiet"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.try_run(&["rm", "--force", id]);
        }
        // dockerd stops its containerd and unmounts what it mounted.
        let pid = Pid::from_raw(self.daemon.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.daemon.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.daemon.kill();
                    let _ = self.daemon.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        // Mounts left under the private roots (overlay layers, the exec root's netns files)
        // keep the folder from being removed.
        if let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") {
            let dir = self.dir.to_string_lossy().into_owned();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter(|p| p.starts_with(&dir))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for point in points {
                let _ = Command::new("umount").arg("-l").arg(point).status();
            }
        }
        // The cgroups made for the containers, when nothing uses them.
        if let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") {
            for controller in controllers.flatten() {
                let _ = fs::remove_dir(controller.path().join("docker"));
            }
        }
        // Empty once dockerd and the shims are gone.
        for path in &self.made_in_run {
            let _ = fs::remove_dir(path);
        }
        // containerd-shims, re-parented to this subreaper once their containers are gone.
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
    }
}
