//! CRIU's command lines, and what running CRIU needs.
//!
//! Every CRIU that crac runs is built here by [`CriuCommand`]: a checkpoint's `criu dump`, a
//! restore's `criu restore` (and the one printed for an image that could not be filed), the
//! page server's `criu lazy-pages`, and `crac check`'s `criu check` and probe dump. Each
//! option is one line of its constructor, in the order CRIU is given them, so adding a flag is
//! one line (FastFreeze's `criu.rs` is the model). Which CRIU runs is [`crate::locate`]'s
//! business ([`find`]); the action script it runs is [`action_script`]; [`require_root`] says
//! before CRIU does that it cannot run.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::capabilities;
use crate::error::{FailureKind, OpError};
use crate::locate::{self, Criu};
use crate::metadata::{DumpOptions, Metadata};
use crac_action::settings::TIMEOUT_ENV;
use crac_protocol::records::HOOK_REPORT_ENV;

/// How `crac` has CRIU lock the TCP connections it dumps (`--network-lock`): nftables, not
/// CRIU's default iptables. With iptables, a restore with `--tcp-close` never removes the
/// rules that locked the connections at the dump (CRIU skips that unlock), and the peers'
/// packets are dropped for good; the nftables lock is one table, which every restore deletes.
/// It also needs no `iptables-restore` on the machine.
pub const TCP_NETWORK_LOCK: &str = "nftables";

/// Finds CRIU, as an [`OpError`].
///
/// # Errors
///
/// [`FailureKind::Unavailable`] with what was tried.
pub fn find() -> Result<Criu, OpError> {
    locate::locate().map_err(|e| OpError::new(FailureKind::Unavailable, e.to_string()))
}

/// The crac-action binary: `$CRAC_ACTION`, else beside this executable, else on `PATH`.
///
/// # Errors
///
/// [`FailureKind::Unavailable`] when none is found.
pub fn action_script() -> Result<PathBuf, OpError> {
    if let Some(path) = std::env::var_os(crac_protocol::env::ACTION).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("crac-action")));
    if let Some(path) = beside.filter(|p| p.is_file()) {
        return Ok(path);
    }
    locate::on_path("crac-action").ok_or_else(|| {
            OpError::new(
                FailureKind::Unavailable,
                "crac-action not found beside crac nor on PATH: install it next to crac, or set CRAC_ACTION",
            )
        })
}

/// Whether crac runs CRIU in its unprivileged mode (`--unprivileged`): unless it holds the
/// capabilities CRIU's full mode uses from its first step (CAP_SYS_ADMIN for its kernel
/// probes' namespaces, CAP_NET_ADMIN to force socket buffer sizes, CAP_SYS_TIME for time
/// namespaces' offsets), as root on a host or in a `--privileged` container does. Otherwise,
/// as root in a container given `--cap-add CHECKPOINT_RESTORE` (or Docker 20.10's `SYS_ADMIN`,
/// which does not know that capability) or as another user, the unprivileged mode needs only
/// CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, where the full one fails. Not always: in that
/// mode CRIU leaves out, even when it could, what needs privileges (kernel probes, restoring
/// namespaces and mounts, resources only CAP_SYS_ADMIN may set).
pub fn unprivileged() -> bool {
    use capabilities::{has_effective, NET_ADMIN, SYS_ADMIN, SYS_TIME};
    ![SYS_ADMIN, NET_ADMIN, SYS_TIME]
        .into_iter()
        .all(has_effective)
}

/// Says, before CRIU does (with a bare exit code), that it cannot run: CRIU needs
/// CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (then [`unprivileged`]), whoever runs it; root in a
/// container without privileges has neither, and another user neither unless given one.
///
/// # Errors
///
/// [`FailureKind::Unavailable`] naming the capability that is missing and how to give it.
pub fn require_root(what: &str) -> Result<(), OpError> {
    use crate::capabilities::{has_effective, CHECKPOINT_RESTORE, SYS_ADMIN};
    if has_effective(SYS_ADMIN) || has_effective(CHECKPOINT_RESTORE) {
        return Ok(());
    }
    let uid = nix::unistd::geteuid();
    Err(OpError::new(
        FailureKind::Unavailable,
        if uid.is_root() {
            format!(
                "crac {what} runs as root but without CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN), which CRIU needs: run the container with --cap-add CHECKPOINT_RESTORE (root in a container has neither by default), or give crac one of them"
            )
        } else {
            format!(
                "crac {what} runs as uid {uid} without CAP_CHECKPOINT_RESTORE, which CRIU needs to stop, read and recreate processes: give it that capability (a container: --cap-add CHECKPOINT_RESTORE, which a non-root user gets as an ambient capability; a host: an ambient capability from the service manager, e.g. systemd's AmbientCapabilities=CAP_CHECKPOINT_RESTORE), or run it as root (sudo crac {what} ...)"
            )
        },
    ))
}

/// Where CRIU gets this process's stdout (and stderr): descriptor numbers well above what
/// CRIU opens before it reads its options.
const INHERITED_STDIO_FD: RawFd = 200;
/// Where a post-copy's CRIU gets the socket to the other end's page traffic.
const PS_SOCKET_FD: RawFd = 230;
/// Where a post-copy's dump says its image is written.
const STATUS_FD: RawFd = 231;

/// A CRIU command line: the program, its arguments in the order CRIU gets them, the variables
/// it adds to CRIU's environment (which crac-action, run by CRIU, inherits), and where CRIU's
/// standard streams go. Made by one constructor per use; [`CriuCommand::command`] turns it into
/// the [`Command`] to run, and its [`Display`](fmt::Display) is the command line as an operator
/// would type it.
#[derive(Debug)]
#[must_use]
pub struct CriuCommand {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(&'static str, OsString)>,
    streams: Streams,
    own_process_group: bool,
    /// Descriptors handed to CRIU under these numbers ([`CriuCommand::inherit_stdio`]).
    inherited: Vec<(RawFd, OwnedFd)>,
}

/// Where a CRIU's standard streams go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Streams {
    /// As [`Command::output`] leaves them: stdout and stderr read by the caller.
    Captured,
    /// No input, output thrown away, stderr read (into an error's details).
    ErrorsOnly,
    /// None at all: the page server writes its log.
    Detached,
}

impl CriuCommand {
    fn new(criu: &Path, verb: &str, streams: Streams) -> CriuCommand {
        CriuCommand {
            program: criu.to_owned(),
            args: vec![verb.into()],
            env: Vec::new(),
            streams,
            own_process_group: false,
            inherited: Vec::new(),
        }
        .flag(unprivileged(), "--unprivileged")
    }

    fn arg(mut self, arg: impl Into<OsString>) -> CriuCommand {
        self.args.push(arg.into());
        self
    }

    /// `flag` when `on`.
    fn flag(self, on: bool, flag: &str) -> CriuCommand {
        if on {
            self.arg(flag)
        } else {
            self
        }
    }

    /// `name VALUE` when there is a value.
    fn option(self, name: &str, value: Option<&str>) -> CriuCommand {
        match value {
            Some(value) => self.arg(name).arg(value),
            None => self,
        }
    }

    pub(crate) fn env(mut self, name: &'static str, value: impl Into<OsString>) -> CriuCommand {
        self.env.push((name, value.into()));
        self
    }

    /// `criu dump` of a checkpoint: the tree of `pid` into `images`, with crac-action as the
    /// action script (told the hooks' time limit and where to leave its `report`), and the
    /// operator's `options`.
    pub fn dump(
        criu: &Path,
        pid: u32,
        images: &Path,
        action: &Path,
        report: &Path,
        options: &DumpOptions,
    ) -> CriuCommand {
        let mut cmd = CriuCommand::new(criu, "dump", Streams::ErrorsOnly)
            .arg("-t")
            .arg(pid.to_string())
            .arg("-D")
            .arg(images)
            .arg("-o")
            .arg("dump.log")
            .arg("--action-script")
            .arg(action)
            .env(TIMEOUT_ENV, options.timeout_secs.to_string())
            .env(HOOK_REPORT_ENV, report)
            .flag(options.leave_running, "--leave-running")
            .flag(options.tcp_established, "--tcp-established")
            .option("--network-lock", options.network_lock.as_deref())
            // A service keeps its listener: a client that connects during the dump waits in
            // the listener's queue, which CRIU cannot dump ("In-flight connection"). Leave it
            // out of the image: after --leave-running the process serves it; a restored copy
            // never had it.
            .arg("--skip-in-flight")
            .flag(options.file_locks, "--file-locks");
        cmd.args
            .extend(options.extra_criu_args.iter().map(OsString::from));
        // A Ctrl-C at the terminal goes to the whole foreground process group: CRIU killed
        // half-way would leave the service half-dumped. crac, which gets the signal, lets the
        // dump end (see `crac checkpoint`).
        cmd.own_process_group = true;
        cmd
    }

    /// `criu restore` of the image in `dir`, writing the restored root's pid to `pidfile`, with
    /// crac-action as the action script; detached (`-d`) or staying the tree's parent. The
    /// options the image was dumped with follow ([`CriuCommand::dumped_with`]).
    pub fn restore(
        criu: &Path,
        dir: &Path,
        pidfile: &Path,
        action: &Path,
        detach: bool,
    ) -> CriuCommand {
        CriuCommand::new(criu, "restore", Streams::ErrorsOnly)
            .arg("-D")
            .arg(dir)
            .arg("-o")
            .arg("restore.log")
            .arg("--pidfile")
            .arg(pidfile)
            .arg("--action-script")
            .arg(action)
            .flag(detach, "-d")
    }

    /// The `criu restore` an operator runs for a dumped image crac could not finish: detached,
    /// with crac-action as the action script and the options it was dumped with.
    pub fn restore_by_hand(
        criu: &Path,
        dir: &Path,
        action: &Path,
        options: &DumpOptions,
    ) -> CriuCommand {
        CriuCommand::new(criu, "restore", Streams::ErrorsOnly)
            .arg("-D")
            .arg(dir)
            .arg("-d")
            .arg("--action-script")
            .arg(action)
            .dumped_with(options, false)
    }

    /// What a restore repeats of the options an image was dumped with: TCP connections
    /// (restored, or closed with `tcp_close`), how they were locked, file locks.
    pub fn dumped_with(self, options: &DumpOptions, tcp_close: bool) -> CriuCommand {
        self.flag(tcp_close, "--tcp-close")
            .flag(!tcp_close && options.tcp_established, "--tcp-established")
            .option("--network-lock", options.network_lock.as_deref())
            .flag(options.file_locks, "--file-locks")
    }

    /// CRIU writes its log and figures into `dir` (`--work-dir`) instead of the image folder:
    /// a restore of an image on a read-only file system.
    pub fn work_dir(self, dir: &Path) -> CriuCommand {
        self.arg("--work-dir").arg(dir)
    }

    /// A lazy restore: memory comes from the page server ([`CriuCommand::lazy_pages`]).
    pub fn lazy(self) -> CriuCommand {
        self.arg("--lazy-pages")
    }

    /// `criu lazy-pages`, the page server of a lazy restore of the image in `dir`, logging to
    /// `log` there.
    pub fn lazy_pages(criu: &Path, dir: &Path, log: &str) -> CriuCommand {
        CriuCommand::new(criu, "lazy-pages", Streams::Detached)
            .arg("-D")
            .arg(dir)
            .arg("-o")
            .arg(log)
    }

    /// Makes this `criu dump` keep the tree's memory for a post-copy migration: it writes the
    /// image without the pages, says so on `status` (one byte, `--status-fd`), then serves the
    /// pages on `socket` (`--ps-socket`, a connected socket: no port is opened) and ends,
    /// killing the tree, once the destination's `criu lazy-pages` has them all.
    pub fn serve_pages(mut self, socket: OwnedFd, status: OwnedFd) -> CriuCommand {
        self = self
            .arg("--lazy-pages")
            .arg("--ps-socket")
            .arg(PS_SOCKET_FD.to_string())
            .arg("--status-fd")
            .arg(STATUS_FD.to_string());
        self.inherited.push((PS_SOCKET_FD, socket));
        self.inherited.push((STATUS_FD, status));
        self
    }

    /// Makes this `criu lazy-pages` fetch the pages from the source's dump over `socket`
    /// (`--page-server --ps-socket`, a connected socket) rather than from the image folder.
    pub fn pages_from(mut self, socket: OwnedFd) -> CriuCommand {
        self = self
            .arg("--page-server")
            .arg("--ps-socket")
            .arg(PS_SOCKET_FD.to_string());
        self.inherited.push((PS_SOCKET_FD, socket));
        self
    }

    /// `criu check`, whose output the caller reads.
    pub fn check(criu: &Path) -> CriuCommand {
        CriuCommand::new(criu, "check", Streams::Captured)
    }

    /// `criu check --feature FEATURE`: whether this kernel has it (the exit code says).
    pub fn check_feature(criu: &Path, feature: &str) -> CriuCommand {
        CriuCommand::new(criu, "check", Streams::Captured)
            .arg("--feature")
            .arg(feature)
    }

    /// `crac check`'s probe: a `criu dump --leave-running` of `pid` into `images`, without an
    /// action script.
    pub fn probe_dump(criu: &Path, pid: u32, images: &Path) -> CriuCommand {
        CriuCommand::new(criu, "dump", Streams::ErrorsOnly)
            .arg("--leave-running")
            .arg("-o")
            .arg("dump.log")
            .arg("-t")
            .arg(pid.to_string())
            .arg("-D")
            .arg(images)
    }

    /// Makes this `criu restore` hand the restored tree this process's stdout and stderr in
    /// place of the pipes the image's root had there: each is passed to CRIU under a number
    /// of its own, named by `--inherit-fd fd[N]:pipe:[INODE]`.
    ///
    /// # Errors
    ///
    /// [`FailureKind::Unavailable`] when a descriptor cannot be copied.
    pub fn inherit_stdio(mut self, meta: &Metadata) -> Result<CriuCommand, OpError> {
        let mut keys = BTreeSet::new();
        for (&fd, key) in &meta.stdio_pipes {
            // The same pipe as stdout and stderr (`2>&1`) is one file to CRIU.
            if !keys.insert(key) {
                continue;
            }
            let Ok(own) = RawFd::try_from(fd) else {
                continue;
            };
            // The copy is numbered above the numbers CRIU gets them under, so that putting one
            // in place never closes another.
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads `own` (stdout or stderr, open for this
            // process's life) and returns a new descriptor, which the OwnedFd then owns alone.
            let copy = unsafe {
                let copy = libc::fcntl(own, libc::F_DUPFD_CLOEXEC, INHERITED_STDIO_FD + 16);
                if copy == -1 {
                    return Err(OpError::new(
                        FailureKind::Unavailable,
                        format!(
                            "cannot pass descriptor {fd} on to CRIU: {}",
                            std::io::Error::last_os_error()
                        ),
                    ));
                }
                OwnedFd::from_raw_fd(copy)
            };
            let number = INHERITED_STDIO_FD + own;
            self = self.arg("--inherit-fd").arg(format!("fd[{number}]:{key}"));
            self.inherited.push((number, copy));
        }
        Ok(self)
    }

    /// The [`Command`] that runs this CRIU.
    pub fn command(self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (name, value) in &self.env {
            cmd.env(name, value);
        }
        match self.streams {
            Streams::Captured => {}
            Streams::ErrorsOnly => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
            }
            Streams::Detached => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            }
        }
        if self.own_process_group {
            cmd.process_group(0);
        }
        let passed = self.inherited;
        if !passed.is_empty() {
            // SAFETY: dup2 is async-signal-safe; the copies (close-on-exec, so CRIU gets only
            // the duplicates dup2 makes) live in the closure until the child has exec'd.
            unsafe {
                cmd.pre_exec(move || {
                    for (number, copy) in &passed {
                        if libc::dup2(copy.as_raw_fd(), *number) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        cmd
    }
}

impl fmt::Display for CriuCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program.display())?;
        for arg in &self.args {
            write!(f, " {}", arg.to_string_lossy())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> DumpOptions {
        DumpOptions {
            leave_running: true,
            tcp_established: true,
            file_locks: true,
            timeout_secs: 30.0,
            extra_criu_args: vec!["--shell-job".to_owned()],
            network_lock: Some(TCP_NETWORK_LOCK.to_owned()),
            lazy_restore: false,
        }
    }

    impl CriuCommand {
        /// The command line without `--unprivileged`, which follows the verb exactly when
        /// crac runs CRIU in its unprivileged mode.
        fn line(self) -> String {
            let line = self.to_string();
            let verb = self.args[0].to_string_lossy().into_owned();
            let marked = format!("/c {verb} --unprivileged");
            assert_eq!(line.starts_with(&marked), unprivileged(), "{line}");
            line.replacen(" --unprivileged", "", usize::from(unprivileged()))
        }
    }

    /// The command lines as crac gave them to CRIU before they had a builder: same arguments,
    /// same order.
    #[test]
    fn each_command_line_keeps_its_arguments_in_order() {
        let (criu, dir, action) = (Path::new("/c"), Path::new("/i"), Path::new("/a"));
        let report = Path::new("/i/.crac-hooks.json");
        assert_eq!(
            CriuCommand::dump(criu, 7, dir, action, report, &options()).line(),
            "/c dump -t 7 -D /i -o dump.log --action-script /a --leave-running \
             --tcp-established --network-lock nftables --skip-in-flight --file-locks --shell-job"
        );
        assert_eq!(
            CriuCommand::dump(criu, 7, dir, action, report, &DumpOptions::default()).line(),
            "/c dump -t 7 -D /i -o dump.log --action-script /a --skip-in-flight"
        );
        let pidfile = Path::new("/t/restored.pid");
        assert_eq!(
            CriuCommand::restore(criu, dir, pidfile, action, true)
                .dumped_with(&options(), false)
                .lazy()
                .line(),
            "/c restore -D /i -o restore.log --pidfile /t/restored.pid --action-script /a -d \
             --tcp-established --network-lock nftables --file-locks --lazy-pages"
        );
        assert_eq!(
            CriuCommand::restore(criu, dir, pidfile, action, false)
                .dumped_with(&options(), true)
                .line(),
            "/c restore -D /i -o restore.log --pidfile /t/restored.pid --action-script /a \
             --tcp-close --network-lock nftables --file-locks"
        );
        assert_eq!(
            CriuCommand::restore_by_hand(criu, dir, action, &options()).line(),
            "/c restore -D /i -d --action-script /a --tcp-established --network-lock nftables \
             --file-locks"
        );
        assert_eq!(
            CriuCommand::lazy_pages(criu, dir, "lazy-pages.log").line(),
            "/c lazy-pages -D /i -o lazy-pages.log"
        );
        assert_eq!(CriuCommand::check(criu).line(), "/c check");
        assert_eq!(
            CriuCommand::check_feature(criu, "uffd-noncoop").line(),
            "/c check --feature uffd-noncoop"
        );
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            CriuCommand::lazy_pages(criu, dir, "lazy-pages.log")
                .pages_from(a.into())
                .line(),
            "/c lazy-pages -D /i -o lazy-pages.log --page-server --ps-socket 230"
        );
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            CriuCommand::dump(criu, 7, dir, action, report, &DumpOptions::default())
                .serve_pages(b.into(), c.into())
                .line(),
            "/c dump -t 7 -D /i -o dump.log --action-script /a --skip-in-flight --lazy-pages \
             --ps-socket 230 --status-fd 231"
        );
        assert_eq!(
            CriuCommand::probe_dump(criu, 9, dir).line(),
            "/c dump --leave-running -o dump.log -t 9 -D /i"
        );
    }

    #[test]
    fn the_dump_tells_crac_action_its_time_limit_and_where_to_report() {
        let cmd = CriuCommand::dump(
            Path::new("/c"),
            7,
            Path::new("/i"),
            Path::new("/a"),
            Path::new("/i/.crac-hooks.json"),
            &options(),
        );
        assert_eq!(
            cmd.env,
            [
                (TIMEOUT_ENV, OsString::from("30")),
                (HOOK_REPORT_ENV, OsString::from("/i/.crac-hooks.json"))
            ]
        );
        assert!(cmd.own_process_group);
    }
}
