//! What a service does for `crac upgrade`: share its listening sockets with a successor, take
//! them when it is the successor, and say when it is ready.
//!
//! # The convention
//!
//! `crac upgrade` starts the new version the way systemd's socket activation does
//! (`sd_listen_fds(3)`, `sd_notify(3)`): the listening sockets are descriptors 3, 4, ...,
//! `LISTEN_FDS` says how many, `LISTEN_PID` whose they are (the new process's own pid) and
//! `LISTEN_FDNAMES` their names, colon separated; the new version says it is ready by sending
//! `READY=1` to the Unix datagram socket named by `NOTIFY_SOCKET`. A service that already
//! speaks the convention (with `listenfd`, `sd-notify`, `tokio-listener`, or by hand) needs
//! nothing from this module. One that does not calls [`tcp_listener`] instead of
//! `TcpListener::bind`, and [`notify_ready`] once it serves.
//!
//! The `listenfd` crate reads the same variables, but by position only (no names), it takes
//! descriptors when `LISTEN_PID` is unset, and it neither binds when nothing was passed nor
//! shares the listener for the next upgrade: [`tcp_listener`] does all three, by name.
//!
//! # Consent
//!
//! The old process's agent passes only the listeners the service shared ([`share_listener`];
//! [`tcp_listener`] shares the one it returns), with their names, over its socket (`SCM_RIGHTS`;
//! root and the process's own uid only, as for every request). A process without an agent has
//! its listening sockets copied by root (`pidfd_getfd`) instead.
//!
//! The variables are left in the environment: changing it is not safe in a process with
//! threads, and `LISTEN_PID` keeps a child from taking the descriptors (its pid is another).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use once_cell::sync::Lazy;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The listeners shared with a successor, by name, in the order they were shared.
static SHARED: Mutex<Vec<(String, OwnedFd)>> = Mutex::new(Vec::new());

/// A descriptor this process was started with: its name, and itself until taken.
type Passed = (Option<String>, Option<OwnedFd>);

/// The descriptors this process was started with (`LISTEN_FDS`), each taken at most once.
static PASSED: Lazy<Mutex<Vec<Passed>>> = Lazy::new(|| Mutex::new(passed_from_env()));

/// Shares `listener` with a successor under `name` (replacing one shared under that name
/// before): `crac upgrade` passes it to the new version, which takes it with
/// [`tcp_listener`]`(name, ...)` or as the systemd convention's descriptor named `name`.
///
/// The agent keeps its own copy of the descriptor, so the listener it passes is this very
/// socket even if the service has closed or reused its descriptor number since.
///
/// # Errors
///
/// When the descriptor cannot be copied (out of descriptors).
pub fn share_listener(name: &str, listener: &impl AsFd) -> io::Result<()> {
    let copy = listener.as_fd().try_clone_to_owned()?;
    let mut shared = lock(&SHARED);
    shared.retain(|(shared_name, _)| shared_name != name);
    shared.push((name.to_owned(), copy));
    Ok(())
}

/// The listeners shared so far, with their names (for the agent's `listeners` op).
pub(crate) fn shared<R>(with: impl FnOnce(&[(String, OwnedFd)]) -> R) -> R {
    with(&lock(&SHARED))
}

/// A TCP listener for `name`: the one passed to this process under that name by `crac
/// upgrade` or systemd (`LISTEN_FDNAMES`; without names, the first passed one not taken yet),
/// or else one bound to `addr`, fresh. Either way it is shared with a successor under `name`
/// ([`share_listener`]), so the next upgrade hands it on.
///
/// # Errors
///
/// When binding fails, or a passed descriptor is not a TCP listener.
pub fn tcp_listener(name: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = match take_passed(name) {
        Some(fd) => {
            let kind = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
                .map_err(io::Error::from)?;
            let listening =
                nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
                    .map_err(io::Error::from)?;
            if kind != nix::sys::socket::SockType::Stream || !listening {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the descriptor passed as {name:?} is not a listening TCP socket"),
                ));
            }
            TcpListener::from(fd)
        }
        None => TcpListener::bind(addr)?,
    };
    share_listener(name, &listener)?;
    Ok(listener)
}

/// The passed descriptor named `name`, or the first unnamed one not taken yet.
fn take_passed(name: &str) -> Option<OwnedFd> {
    let mut passed = lock(&PASSED);
    let at = passed
        .iter()
        .position(|(n, fd)| n.as_deref() == Some(name) && fd.is_some())
        .or_else(|| {
            passed
                .iter()
                .position(|(n, fd)| n.is_none() && fd.is_some())
        })?;
    passed[at].1.take()
}

/// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`: nothing unless `LISTEN_PID` is this
/// process.
fn passed_from_env() -> Vec<Passed> {
    let var = |name| std::env::var(name).ok();
    if var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Vec::new();
    }
    let Some(count) = var("LISTEN_FDS").and_then(|n| n.parse::<RawFd>().ok()) else {
        return Vec::new();
    };
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    (0..count.clamp(0, 1024))
        .map(|i| {
            let fd = LISTEN_FDS_START + i;
            // SAFETY: fcntl on a number: at worst EBADF, no memory is passed.
            let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            let owned = open.then(|| {
                // SAFETY: by the convention the starter passed this descriptor to this process
                // (LISTEN_PID is ours), and this is the one place that takes it, once (the
                // list is read once into a static).
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                let _ = nix::fcntl::fcntl(
                    &owned,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                owned
            });
            let name = names
                .get(i as usize)
                .filter(|n| !n.is_empty() && *n != "unknown")
                .cloned();
            (name, owned)
        })
        .collect()
}

/// Tells whoever started this process that it is ready (`READY=1` to `NOTIFY_SOCKET`, as
/// `sd_notify(3)`): `crac upgrade` then retires the old version. Returns whether anyone was
/// told: false when `NOTIFY_SOCKET` is not set, and false when nobody listens on it any more.
/// The latter is no failure of the service: `crac upgrade` at the restart level stops
/// listening as soon as it sees the new version accept connections, which a service may do
/// before it says `READY=1`.
///
/// # Errors
///
/// When the socket named by `NOTIFY_SOCKET` exists but cannot be sent to.
pub fn notify_ready() -> io::Result<bool> {
    notify("READY=1")
}

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=...`) to `NOTIFY_SOCKET`, if set and
/// still listened on.
fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => send_state(&path, state),
        None => Ok(false),
    }
}

/// Sends `state` to the notification socket `path` (`@` for the abstract namespace): whether
/// anyone listened.
fn send_state(path: &std::ffi::OsStr, state: &str) -> io::Result<bool> {
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
        socket.send_to_addr(state.as_bytes(), &addr)
    } else {
        socket.send_to(state.as_bytes(), path)
    };
    match sent {
        Ok(_) => Ok(true),
        // The one who started the process has stopped listening (its socket's file removed,
        // or nothing bound to the name).
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

/// The raw descriptors of `shared`, for `SCM_RIGHTS`.
pub(crate) fn raw(shared: &[(String, OwnedFd)]) -> Vec<RawFd> {
    shared.iter().map(|(_, fd)| fd.as_raw_fd()).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of the test's own, removed at the end.
    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let path = std::env::temp_dir().join(format!("crac-agent-{name}-{}", std::process::id()));
        std::fs::create_dir(&path).expect("a fresh test folder");
        Dir(path)
    }

    #[test]
    fn a_listened_socket_gets_the_state() {
        let dir = dir("notify-listened");
        let path = dir.0.join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        assert!(send_state(path.as_os_str(), "READY=1").expect("sent"));
        let mut got = [0u8; 64];
        let n = listener.recv(&mut got).expect("received");
        assert_eq!(&got[..n], b"READY=1");
    }

    #[test]
    fn a_socket_nobody_listens_on_any_more_is_no_error() {
        let dir = dir("notify-gone");
        let removed = dir.0.join("removed.sock");
        assert!(!send_state(removed.as_os_str(), "READY=1").expect("no error"));
        // The file is left, the listener gone.
        let closed = dir.0.join("closed.sock");
        drop(UnixDatagram::bind(&closed).expect("bind"));
        assert!(!send_state(closed.as_os_str(), "READY=1").expect("no error"));
        let name = format!("@crac-agent-test-nobody-{}", std::process::id());
        assert!(!send_state(std::ffi::OsStr::new(&name), "READY=1").expect("no error"));
    }

    #[test]
    fn a_socket_of_the_wrong_kind_is_an_error() {
        let dir = dir("notify-stream");
        let path = dir.0.join("stream.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        assert!(send_state(path.as_os_str(), "READY=1").is_err());
    }
}
