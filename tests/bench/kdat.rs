//! CRIU's kernel-feature cache, as hosts with a tmpfs /run have it: CRIU writes
//! /run/criu.kdat there after its first run and loads it at every later start instead of
//! probing the kernel. /run is not a tmpfs on this machine, so the benchmark makes a mount
//! namespace whose /run is one, and runs commands inside it.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::Res;

/// A mount namespace, held open by a sleeping process, whose /run is a tmpfs holding CRIU's
/// cache.
pub(crate) struct TmpfsRun {
    holder: Child,
    ns: File,
}

impl TmpfsRun {
    /// Makes the namespace and the cache (one `criu check` inside).
    pub(crate) fn new(criu: &Path) -> Res<TmpfsRun> {
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=0755 crac-bench-run /run && exec sleep 1000000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        let mountinfo = format!("/proc/{}/mountinfo", holder.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&mountinfo).is_ok_and(|m| m.contains("crac-bench-run")) {
            if Instant::now() > deadline {
                return Err("no tmpfs on /run in the benchmark's mount namespace".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ns = File::open(format!("/proc/{}/ns/mnt", holder.id())).map_err(|e| e.to_string())?;
        let run = TmpfsRun { holder, ns };
        let status = criu_check(criu, Some(&run))
            .status()
            .map_err(|e| format!("criu check: {e}"))?;
        let cache = format!("/proc/{}/root/run/criu.kdat", run.holder.id());
        if !status.success() || !Path::new(&cache).exists() {
            return Err(format!(
                "criu check made no /run/criu.kdat on the tmpfs ({status})"
            ));
        }
        Ok(run)
    }

    /// Makes `cmd` run inside the namespace.
    pub(crate) fn enter(&self, cmd: &mut Command) {
        let fd = self.ns.as_raw_fd();
        // SAFETY: setns is a plain system call, safe between fork and exec; the namespace file
        // stays open in the parent until the child has exec'd (self outlives the spawn).
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(
                    BorrowedFd::borrow_raw(fd),
                    nix::sched::CloneFlags::CLONE_NEWNS,
                )
                .map_err(std::io::Error::from)
            });
        }
    }
}

/// A quiet `criu check`, inside `tmpfs_run` if given: what makes CRIU load or write its cache.
pub(crate) fn criu_check(criu: &Path, tmpfs_run: Option<&TmpfsRun>) -> Command {
    let mut check = Command::new(criu);
    check
        .arg("check")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(run) = tmpfs_run {
        run.enter(&mut check);
    }
    check
}

impl Drop for TmpfsRun {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
