//! Talking to an agent: one request, one reply, bounded in time. The blocking client that
//! crac-action and crac use; a service needs none (its agent is the other end).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::location;
use crate::wire::{Reply, Request};

/// The longest reply accepted; a reply is a few kilobytes even with hundreds of resources.
const MAX_REPLY_LEN: usize = 4 << 20;

/// Why a request got no reply. Each case says what it means for the caller: there is no agent,
/// the agent did not answer in time, or it answered something unreadable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No agent listens for this process: no socket file, or a stale one.
    #[error("no agent at {path}")]
    NoAgent {
        /// The socket path that was tried.
        path: PathBuf,
        /// The cause (`NotFound` or `ConnectionRefused`).
        #[source]
        source: io::Error,
    },
    /// The agent did not reply within the time limit.
    #[error("the agent at {path} did not reply within {}", crate::client::secs(*.after))]
    TimedOut {
        /// The socket path.
        path: PathBuf,
        /// The limit.
        after: Duration,
    },
    /// Connecting, writing or reading failed.
    #[error("cannot talk to the agent at {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The reply was not a reply line.
    #[error("the agent at {path} sent an unreadable reply {line:?}: {source}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What it sent (cut to 200 characters).
        line: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// Sends `request` to the agent of process `pid` and waits at most `timeout` for its reply.
///
/// # Errors
///
/// See [`ClientError`].
pub fn request(pid: u32, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    request_at(&location::socket_path(pid), request, timeout)
}

/// Whether process `pid` has an agent socket (it may still be stale).
pub fn has_agent(pid: u32) -> bool {
    location::socket_path(pid).exists()
}

/// Sends `request` to the agent listening at `path`; see [`request`].
///
/// # Errors
///
/// See [`ClientError`].
pub fn request_at(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let stream = connect(path)?;
    exchange(stream, path, request, timeout)
}

/// Connects to the agent listening at `path`.
///
/// # Errors
///
/// [`ClientError::NoAgent`] when there is no socket or nobody listens on it,
/// [`ClientError::Io`] otherwise.
pub fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    connect_via(path, path)
}

/// Connects to the agent listening at `path`, naming it `name` in errors: for a caller that
/// reaches a socket by another path than the one it is known by (crac-action reaches a
/// container's agent through a handle on its folder, `/proc/self/fd/N/agent.sock`).
///
/// # Errors
///
/// As [`connect`].
pub fn connect_via(path: &Path, name: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|err| {
        if matches!(
            err.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ) {
            ClientError::NoAgent {
                path: name.to_owned(),
                source: err,
            }
        } else {
            ClientError::Io {
                path: name.to_owned(),
                source: err,
            }
        }
    })
}

/// Sends `request` on `stream`, a connection to an agent, and waits at most `timeout` for the
/// reply. `path` names the agent in errors. For a caller that must check who it is connected
/// to before it sends anything (crac-action reaching an agent in a container).
///
/// # Errors
///
/// See [`ClientError`].
pub fn exchange(
    stream: UnixStream,
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    exchange_keeping(stream, path, request, timeout, None)
}

/// As [`exchange`], also keeping the descriptors the agent passes with its reply
/// (`SCM_RIGHTS`; the `listeners` op), close-on-exec, in the order they came.
///
/// # Errors
///
/// See [`ClientError`].
pub fn exchange_with_fds(
    stream: UnixStream,
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<(Reply, Vec<OwnedFd>), ClientError> {
    let mut fds = Vec::new();
    let reply = exchange_keeping(stream, path, request, timeout, Some(&mut fds))?;
    Ok((reply, fds))
}

fn exchange_keeping(
    mut stream: UnixStream,
    path: &Path,
    request: &Request,
    timeout: Duration,
    mut fds: Option<&mut Vec<OwnedFd>>,
) -> Result<Reply, ClientError> {
    let deadline = Instant::now() + timeout;
    let io_err = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let timed_out = || ClientError::TimedOut {
        path: path.to_owned(),
        after: timeout,
    };
    stream
        .set_write_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))
        .map_err(io_err)?;
    match stream.write_all(request.to_line().as_bytes()) {
        Ok(()) => {}
        Err(err) if is_timeout(&err) => return Err(timed_out()),
        Err(err) => return Err(io_err(err)),
    }
    // Read until the agent closes: it always closes after its one reply.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let left = remaining(deadline).ok_or_else(timed_out)?;
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        let read = match fds.as_deref_mut() {
            Some(fds) => receive(&stream, &mut chunk, fds),
            None => stream.read(&mut chunk),
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_REPLY_LEN {
                    return Err(io_err(io::Error::other("reply larger than 4 MiB")));
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if is_timeout(&err) => return Err(timed_out()),
            Err(err) => return Err(io_err(err)),
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    serde_json::from_slice(line).map_err(|source| ClientError::Protocol {
        path: path.to_owned(),
        line: String::from_utf8_lossy(line).chars().take(200).collect(),
        source,
    })
}

/// One read that also takes the descriptors passed with the bytes.
fn receive(stream: &UnixStream, chunk: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 64]);
    let mut iov = [io::IoSliceMut::new(chunk)];
    let msg = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us, and
            // nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other(
            "more descriptors passed than this client takes (64)",
        ));
    }
    Ok(msg.bytes)
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
