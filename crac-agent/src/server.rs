//! The agent's thread: accept a connection, check the peer, read one request, act on the
//! coordinator, reply, close. One connection at a time, so requests are naturally serialised.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use nix::sys::socket::{send, MsgFlags};

use crac_core::{Checkpoint, CheckpointError, Coordinator, ErrorKind, Phase, RestoreReason};

use crate::peer;
use crate::protocol::{code, op, HookReport, Reply, Request, MAX_REQUEST_LEN, VERSION};
use crate::tcp;

/// How long a client may take to send its request or read the reply. Bounds how long a stuck
/// or hostile client can keep the agent (and so every other client) waiting.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Server {
    coordinator: Coordinator,
    pending: Option<Pending>,
}

/// A checkpoint between before-checkpoint and after-restore.
struct Pending {
    cycle: Option<String>,
    checkpoint: Checkpoint,
    /// The TCP connections open when the hooks had gone down (see [`tcp`]).
    connections: Vec<std::os::fd::RawFd>,
}

impl Server {
    pub(crate) fn new(coordinator: Coordinator) -> Server {
        Server {
            coordinator,
            pending: None,
        }
    }

    /// Serves until `stopping` is set and the listener is shut down. Blocks in `accept` while
    /// idle: no polling, no wake-ups.
    pub(crate) fn run(mut self, listener: UnixListener, stopping: Arc<AtomicBool>) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => self.serve_connection(stream),
                Err(_) if stopping.load(Ordering::SeqCst) => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Out of file descriptors or memory: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        // A checkpoint still pending when the agent stops is aborted by Checkpoint's Drop.
    }

    fn serve_connection(&mut self, stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        // Read the request even from a peer about to be refused: closing a Unix socket with
        // unread data makes the peer's read fail (ECONNRESET) instead of showing our reply.
        let request = read(&stream);
        let checked = peer::check(&stream)
            .map_err(|message| (code::PERMISSION_DENIED, message))
            .and(request.map_err(|message| (code::BAD_REQUEST, message)));
        let (reply, started_checkpoint) = match checked {
            Err((code, message)) => (self.error("", code, message), false),
            Ok(request) => {
                let started = request.op == op::BEFORE_CHECKPOINT;
                let reply = self.serve(&request);
                let started = started && reply.ok;
                (reply, started)
            }
        };
        let delivered = send_all(&stream, reply.to_line().as_bytes()).is_ok();
        let _ = stream.shutdown(Shutdown::Both);
        drop(stream);
        if started_checkpoint && !delivered {
            // Nobody heard that the hooks ran, so no dump will follow: come back up now rather
            // than stay quiesced for a checkpoint that will never happen.
            if let Some(pending) = self.pending.take() {
                let _ = pending.checkpoint.complete(RestoreReason::Aborted);
            }
        }
    }

    pub(crate) fn serve(&mut self, request: &Request) -> Reply {
        if request.v != VERSION {
            return self.error(
                &request.op,
                code::BAD_REQUEST,
                format!(
                    "unsupported protocol version {} (this agent speaks version {VERSION})",
                    request.v
                ),
            );
        }
        match request.op.as_str() {
            op::BEFORE_CHECKPOINT => self.before_checkpoint(request),
            op::AFTER_RESTORE => self.after_restore(request),
            op::STATUS => self.reply(op::STATUS, true, Vec::new(), None, None),
            other => self.error(
                other,
                code::BAD_REQUEST,
                format!(
                    "unknown op {other:?}: expected {:?}, {:?} or {:?}",
                    op::BEFORE_CHECKPOINT,
                    op::AFTER_RESTORE,
                    op::STATUS
                ),
            ),
        }
    }

    fn before_checkpoint(&mut self, request: &Request) -> Reply {
        if let Some(pending) = &self.pending {
            if pending.cycle.is_some() && pending.cycle == request.cycle {
                // The same cycle asked again (a CRIU that runs its action script twice): it is
                // ready for the dump already.
                return self.reply(
                    op::BEFORE_CHECKPOINT,
                    true,
                    Vec::new(),
                    Some(code::ALREADY),
                    None,
                );
            }
            let message = format!(
                "a checkpoint is already in progress{}: it must be ended with after-restore before another can start",
                describe_cycle(&pending.cycle)
            );
            return self.error(op::BEFORE_CHECKPOINT, code::BUSY, message);
        }
        match self.coordinator.checkpoint() {
            Ok(checkpoint) => {
                let hooks = checkpoint.hooks().iter().map(HookReport::from).collect();
                self.pending = Some(Pending {
                    cycle: request.cycle.clone(),
                    checkpoint,
                    connections: tcp::connections(),
                });
                self.reply(op::BEFORE_CHECKPOINT, true, hooks, None, None)
            }
            Err(err) => self.failed(op::BEFORE_CHECKPOINT, &err, None),
        }
    }

    fn after_restore(&mut self, request: &Request) -> Reply {
        let reason = match request.reason.as_deref().map(RestoreReason::parse) {
            Some(Some(reason)) => reason,
            Some(None) | None => {
                return self.error(
                    op::AFTER_RESTORE,
                    code::BAD_REQUEST,
                    format!(
                        "after-restore needs a reason, \"restored\", \"resumed\" or \"aborted\"; got {:?}",
                        request.reason
                    ),
                )
            }
        };
        let Some(pending) = self.pending.take() else {
            return self.error(
                op::AFTER_RESTORE,
                code::NOT_CHECKPOINTING,
                "no checkpoint in progress: after-restore must follow a successful before-checkpoint"
                    .into(),
            );
        };
        if let (Some(expected), Some(got)) = (&pending.cycle, &request.cycle) {
            if expected != got {
                let message = format!(
                    "cycle mismatch: the pending checkpoint is cycle {expected:?}, this after-restore is for cycle {got:?}"
                );
                self.pending = Some(pending);
                return self.error(op::AFTER_RESTORE, code::CYCLE_MISMATCH, message);
            }
        }
        let connections = tcp::fate(&pending.connections);
        match pending.checkpoint.complete_with(reason, connections) {
            Ok(report) => {
                let hooks = report
                    .phase(Phase::AfterRestore)
                    .map(HookReport::from)
                    .collect();
                self.reply(op::AFTER_RESTORE, true, hooks, None, None)
            }
            Err(err) => self.failed(op::AFTER_RESTORE, &err, Some(Phase::AfterRestore)),
        }
    }

    fn failed(&self, op: &str, err: &CheckpointError, only: Option<Phase>) -> Reply {
        let hooks = err
            .hooks()
            .iter()
            .filter(|r| only.is_none_or(|phase| r.phase() == phase))
            .map(HookReport::from)
            .collect();
        let code = match err.kind() {
            ErrorKind::InProgress => code::BUSY,
            _ => code::FAILED,
        };
        self.reply(op, false, hooks, Some(code), Some(err.to_string()))
    }

    fn error(&self, op: &str, code: &'static str, message: String) -> Reply {
        self.reply(op, false, Vec::new(), Some(code), Some(message))
    }

    fn reply(
        &self,
        op: &str,
        ok: bool,
        hooks: Vec<HookReport>,
        code: Option<&'static str>,
        error: Option<String>,
    ) -> Reply {
        let last_restore_unix_ms = self.coordinator.last_restore().and_then(|info| {
            info.at
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        Reply {
            v: VERSION,
            ok,
            op: op.to_owned(),
            pid: std::process::id(),
            state: self.coordinator.state().as_str().to_owned(),
            generation: self.coordinator.generation(),
            cycle: self.pending.as_ref().and_then(|p| p.cycle.clone()),
            resources: self.coordinator.context().resource_names(),
            last_restore_unix_ms,
            hooks,
            error,
            code: code.map(str::to_owned),
        }
    }
}

/// Reads and drops the rest of an oversized line (at most 1 MiB, within the read time-out), so
/// the client gets to read the error reply instead of a connection reset.
fn discard_line(mut stream: &UnixStream) {
    let mut chunk = [0u8; 4096];
    let mut left = 1usize << 20;
    while left > 0 {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) if chunk[..n].contains(&b'\n') => return,
            Ok(n) => left = left.saturating_sub(n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Writes all of `bytes` with MSG_NOSIGNAL: a client that went away must show up as an error
/// here (so a checkpoint nobody heard about is rolled back), not as a SIGPIPE that kills an
/// application that did not ignore it.
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> nix::Result<()> {
    while !bytes.is_empty() {
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn describe_cycle(cycle: &Option<String>) -> String {
    match cycle {
        Some(cycle) => format!(" (cycle {cycle:?})"),
        None => String::new(),
    }
}

/// Reads one request line: at most MAX_REQUEST_LEN bytes, ended by `\n` or by the client
/// closing its side.
fn read(mut stream: &UnixStream) -> Result<Request, String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no complete request line within {}s",
                    IO_TIMEOUT.as_secs()
                ))
            }
            Err(err) => return Err(format!("cannot read the request: {err}")),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let newline = buf.iter().position(|&b| b == b'\n');
        if newline.map_or(buf.len(), |end| end + 1) > MAX_REQUEST_LEN {
            if newline.is_none() {
                discard_line(stream);
            }
            return Err(format!(
                "request too long: no newline within {MAX_REQUEST_LEN} bytes"
            ));
        }
        if let Some(end) = newline {
            buf.truncate(end);
            break;
        }
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "empty request: send one JSON object on one line, e.g. {\"v\":1,\"op\":\"status\"}"
                .into(),
        );
    }
    serde_json::from_slice(&buf).map_err(|err| {
        format!(
            "malformed request ({err}): send one JSON object on one line, e.g. {{\"v\":1,\"op\":\"status\"}}"
        )
    })
}
