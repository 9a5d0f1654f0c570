//! Starting a service the way systemd's socket activation does (`sd_listen_fds(3)`,
//! `sd_notify(3)`), for `crac upgrade`: listening sockets as descriptors 3, 4, ...,
//! `LISTEN_FDS`, `LISTEN_PID` (the new process's own pid, so set after fork, before exec),
//! `LISTEN_FDNAMES`, and a private `NOTIFY_SOCKET` on which it says `READY=1`.
//!
//! `LISTEN_PID` cannot be known before the fork, and nothing between fork and exec may
//! allocate or take a lock (another thread may have held it when the process forked), so the
//! whole environment is built beforehand with the pid's digits left blank, and the child only
//! writes the digits into that buffer, moves the descriptors into place with `dup2` and calls
//! `execve` itself (all async-signal-safe).

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// `LISTEN_PID=` and room for any pid's digits and the terminating NUL.
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const PID_DIGITS: usize = 10;

/// What to start, and with what.
#[derive(Debug)]
pub struct Launch {
    /// The program and its arguments.
    pub command: Vec<OsString>,
    /// The environment it starts from (the old version's, for an upgrade), without the
    /// socket-activation variables of that one's start.
    pub base_env: Vec<(OsString, OsString)>,
    /// Variables set (or replaced) in that environment.
    pub env: Vec<(OsString, OsString)>,
    /// Its working folder (this process's when `None`).
    pub cwd: Option<PathBuf>,
    /// The listening sockets it gets, with their names, in order (descriptors 3, 4, ...).
    pub listeners: Vec<(String, OwnedFd)>,
    /// The `NOTIFY_SOCKET` it gets, if any.
    pub notify: Option<PathBuf>,
    /// Where its standard output and error go (both), or this process's own.
    pub output: Option<File>,
}

/// Starts `launch` as the leader of a session of its own; its standard input is `/dev/null`.
///
/// # Errors
///
/// When the program cannot be found or started.
pub fn spawn(launch: Launch) -> io::Result<Child> {
    let program = launch
        .command
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command to start"))?;
    let path = resolve(program)?;
    let count = RawFd::try_from(launch.listeners.len()).unwrap_or(RawFd::MAX);
    let end = LISTEN_FDS_START.saturating_add(count);

    // Every descriptor the child moves into 3.. must come from above that range (so a dup2
    // never overwrites another it still has to move), and the range must be held while
    // spawning, so that std's own descriptors (its exec-error pipe) are not made there.
    let mut sources = Vec::with_capacity(launch.listeners.len());
    for (_, fd) in &launch.listeners {
        sources.push(
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(end))
                .map_err(io::Error::from)?,
        );
    }
    let mut placeholders = Vec::new();
    loop {
        let null = File::open("/dev/null")?;
        if null.as_raw_fd() >= end {
            break;
        }
        placeholders.push(null);
    }

    let names: Vec<&str> = launch.listeners.iter().map(|(n, _)| n.as_str()).collect();
    let mut env: Vec<(OsString, OsString)> = launch
        .base_env
        .into_iter()
        .filter(|(name, _)| {
            !matches!(
                name.to_str(),
                Some("LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES" | "NOTIFY_SOCKET")
            )
        })
        .filter(|(name, _)| !launch.env.iter().any(|(set, _)| set == name))
        .collect();
    env.extend(launch.env.iter().cloned());
    if count > 0 {
        env.push(("LISTEN_FDS".into(), count.to_string().into()));
        env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
    }
    if let Some(notify) = &launch.notify {
        env.push(("NOTIFY_SOCKET".into(), notify.clone().into_os_string()));
    }
    let env: Vec<CString> = env
        .into_iter()
        .map(|(name, value)| {
            let mut entry = name.into_vec();
            entry.push(b'=');
            entry.extend(value.into_vec());
            cstring(entry)
        })
        .collect::<io::Result<_>>()?;
    let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
    listen_pid.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1, 0);
    let mut listen_pid = listen_pid.into_boxed_slice();
    let argv: Vec<CString> = launch
        .command
        .iter()
        .map(|arg| cstring(arg.as_bytes().to_vec()))
        .collect::<io::Result<_>>()?;
    let path = cstring(path.into_os_string().into_vec())?;

    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    if count > 0 {
        envp.push(listen_pid.as_ptr().cast());
    }
    envp.push(std::ptr::null());
    let mut argvp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argvp.push(std::ptr::null());
    let raw_sources: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    // Addresses as integers: the closure must be Send, and it runs only in the child, on the
    // child's copy of this memory, which outlives it (the child execs or exits).
    let child = Exec {
        path: path.as_ptr() as usize,
        argv: argvp.as_ptr() as usize,
        envp: envp.as_ptr() as usize,
        pid_digits: (count > 0).then(|| listen_pid.as_mut_ptr() as usize + LISTEN_PID_PREFIX.len()),
        sources: raw_sources,
    };

    let mut cmd = Command::new(OsStr::from_bytes(path.as_bytes()));
    cmd.stdin(Stdio::null());
    if let Some(cwd) = &launch.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(output) = launch.output {
        cmd.stdout(output.try_clone()?).stderr(output);
    }
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (setsid, getpid, dup2, execve) and writes into memory prepared
    // before the fork; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || child.exec());
    }
    let spawned = cmd.spawn();
    // Kept alive until the child has exec'd (spawn returns only then).
    drop((
        placeholders,
        sources,
        env,
        argv,
        path,
        listen_pid,
        envp,
        argvp,
    ));
    spawned
}

/// What the child does after the fork; see [`spawn`].
struct Exec {
    path: usize,
    argv: usize,
    envp: usize,
    pid_digits: Option<usize>,
    sources: Vec<RawFd>,
}

impl Exec {
    /// Runs in the child: async-signal-safe only.
    fn exec(&self) -> io::Result<()> {
        // A session of its own, with no terminal: the service outlives crac, and a
        // checkpoint (CRIU) wants the root of the tree it dumps to lead its session.
        // SAFETY: setsid has no preconditions; it fails only for a process group leader,
        // which a child just forked is not.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(at) = self.pid_digits {
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            let mut digits = [0u8; PID_DIGITS];
            let mut n = pid.unsigned_abs();
            let mut len = 0;
            loop {
                digits[len] = b'0' + (n % 10) as u8;
                n /= 10;
                len += 1;
                if n == 0 || len == PID_DIGITS {
                    break;
                }
            }
            for i in 0..len {
                // SAFETY: `at` points at PID_DIGITS + 1 bytes of this (the child's) copy of
                // the buffer made in `spawn`, zeroed, so the string stays NUL-terminated.
                unsafe { *(at as *mut u8).add(i) = digits[len - 1 - i] };
            }
        }
        for (i, &fd) in self.sources.iter().enumerate() {
            // Every source is at or above 3 + count, so none is overwritten before its turn;
            // dup2 leaves the new descriptor without close-on-exec.
            // SAFETY: dup2 on descriptors this process holds; no memory is passed.
            if unsafe { libc::dup2(fd, LISTEN_FDS_START + i as RawFd) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the three pointers are NUL-terminated strings and null-terminated arrays
        // built in `spawn`, alive in this copy of its memory.
        unsafe {
            libc::execve(
                self.path as *const libc::c_char,
                self.argv as *const *const libc::c_char,
                self.envp as *const *const libc::c_char,
            )
        };
        Err(io::Error::last_os_error())
    }
}

fn cstring(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or variable holds a NUL byte",
        )
    })
}

/// `program` as execvp would find it from here: as given if it has a slash (made absolute),
/// else in `PATH`.
fn resolve(program: &OsStr) -> io::Result<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        // From this process's working folder, not the one the child moves to.
        return Ok(std::env::current_dir()?.join(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            nix::unistd::access(candidate, nix::unistd::AccessFlags::X_OK).is_ok()
                && candidate.is_file()
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found in PATH", Path::new(program).display()),
            )
        })
}

/// A private `NOTIFY_SOCKET`: a datagram socket in a folder of its own (crac-fs, 0700),
/// removed when dropped.
#[derive(Debug)]
pub struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: crac_fs::TempDir,
}

/// How waiting for readiness ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    /// `READY=1` came.
    Ready,
    /// The process ended first: how.
    Ended(String),
    /// Nothing came in time.
    TimedOut,
}

impl Notify {
    /// Makes the folder and binds the socket.
    ///
    /// # Errors
    ///
    /// When the folder or the socket cannot be made.
    pub fn new() -> io::Result<Notify> {
        let dir = crac_fs::TempDir::new("crac-notify")?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        Ok(Notify {
            socket,
            path,
            _dir: dir,
        })
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for `READY=1` until `deadline`, asking `ended` every few milliseconds whether the
    /// process has ended (and how).
    pub fn wait_ready(
        &self,
        deadline: Instant,
        mut ended: impl FnMut() -> Option<String>,
    ) -> Readiness {
        let mut message = [0u8; 4096];
        loop {
            if let Some(how) = ended() {
                return Readiness::Ended(how);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Readiness::TimedOut;
            }
            let _ = self
                .socket
                .set_read_timeout(Some(left.min(Duration::from_millis(20))));
            if let Ok(n) = self.socket.recv(&mut message) {
                let ready = message[..n]
                    .split(|&b| b == b'\n')
                    .any(|line| line == b"READY=1");
                if ready {
                    return Readiness::Ready;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// The child sees the convention as a socket-activated service must: LISTEN_PID its own
    /// pid, the count, the names, and descriptor 3 the very socket passed; NOTIFY_SOCKET
    /// reaches the waiter.
    #[test]
    fn the_child_gets_the_listeners_by_the_systemd_convention() {
        let dir = crac_fs::TempDir::new("crac-activation-test").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = |fd: &dyn AsRawFd| {
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let (first, second) = (inode(&listener), inode(&other));
        let notify = Notify::new().unwrap();
        let out = crac_fs::create_file(&dir.path().join("out")).unwrap();
        let script = "echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES $KEPT $SET\"; \
                      stat -L -c %i /proc/$$/fd/3 /proc/$$/fd/4; echo \"$NOTIFY_SOCKET\"";
        let mut child = spawn(Launch {
            command: vec!["sh".into(), "-c".into(), script.into()],
            base_env: vec![
                ("KEPT".into(), "yes".into()),
                ("LISTEN_FDS".into(), "9".into()),
                ("SET".into(), "old".into()),
            ],
            env: vec![("SET".into(), "new".into())],
            cwd: None,
            listeners: vec![
                ("http".into(), listener.try_clone().unwrap().into()),
                ("admin".into(), other.try_clone().unwrap().into()),
            ],
            notify: Some(notify.path().to_owned()),
            output: Some(out),
        })
        .unwrap();
        let pid = child.id();
        assert!(child.wait().unwrap().success());
        // What the child would send on the socket it was named.
        UnixDatagram::unbound()
            .unwrap()
            .send_to(b"STATUS=up\nREADY=1", notify.path())
            .unwrap();
        let ready = notify.wait_ready(Instant::now() + Duration::from_secs(10), || None);
        let said = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(
            lines[0],
            format!("{pid} {pid} 2 http:admin yes new"),
            "{said}"
        );
        assert_eq!(lines[1], first.to_string(), "{said}");
        assert_eq!(lines[2], second.to_string(), "{said}");
        assert_eq!(lines[3], notify.path().to_str().unwrap(), "{said}");
        assert_eq!(ready, Readiness::Ready, "{said}");
        // Nothing more comes: the wait ends at its deadline, or when the process ends.
        let deadline = Instant::now() + Duration::from_millis(50);
        assert_eq!(notify.wait_ready(deadline, || None), Readiness::TimedOut);
        let far = Instant::now() + Duration::from_secs(10);
        let ended = notify.wait_ready(far, || Some("exited".into()));
        assert_eq!(ended, Readiness::Ended("exited".into()));
    }

    #[test]
    fn a_program_that_is_not_there_is_an_error() {
        let err = spawn(Launch {
            command: vec!["crac-no-such-program".into()],
            base_env: Vec::new(),
            env: Vec::new(),
            cwd: None,
            listeners: Vec::new(),
            notify: None,
            output: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("not found in PATH"), "{err}");
    }
}
