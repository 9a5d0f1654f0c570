//! Scripted clients against a real agent, decoded from bytes: the fuzz target
//! (`fuzz/fuzz_targets/agent_protocol.rs`) feeds libFuzzer's inputs, the randomized test
//! (`crac-agent/tests/random_clients.rs`) feeds seeded random ones.
//!
//! A script is a few steps: requests (well-formed ones with chosen fields, mutated ones, raw
//! bytes, overlong lines, nothing at all), sent in pieces, with more data after the line,
//! answered or abandoned; and connections held open in silence meanwhile. What must hold,
//! whatever the script:
//!
//! - every client that waits for its answer gets exactly one reply line, a valid reply, with an
//!   error and a code whenever it is not ok, and then the end of the stream;
//! - afterwards the agent answers `status`, and a pending checkpoint can be ended;
//! - hooks never overlap, and once idle every resource was told after_restore exactly as often
//!   as it was asked before_checkpoint.

use std::io::Read;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crac_core::{from_fns, Coordinator, Registration};
use crac_protocol::wire::{Reply, MAX_REQUEST_LEN, VERSION};
use nix::sys::socket::{send, MsgFlags};

/// The most steps a script has.
const MAX_STEPS: usize = 12;
/// The most connections a script holds open at once (well below the agent's limit).
const MAX_HELD: usize = 4;
/// How long a client waits for its reply before the script fails. The agent answers a
/// complete or closed request at once; this only catches an agent that does not.
const ANSWER_LIMIT: Duration = Duration::from_secs(5);

/// An agent over a coordinator of its own with two resources that count their calls.
#[derive(Debug)]
pub struct Rig {
    socket: PathBuf,
    base: PathBuf,
    agent: crac_agent::Agent,
    counts: Vec<Arc<Counts>>,
    _registrations: Vec<Registration>,
}

/// One resource's calls.
#[derive(Debug, Default)]
struct Counts {
    /// before_checkpoint calls minus after_restore calls.
    balance: AtomicI64,
    /// before_checkpoint calls.
    checkpoints: AtomicU64,
    /// Whether one of its hooks runs now.
    running: AtomicBool,
    /// Whether two of its hooks ever ran at once.
    overlapped: AtomicBool,
}

impl Counts {
    fn enter(&self) {
        if self.running.swap(true, Ordering::SeqCst) {
            self.overlapped.store(true, Ordering::SeqCst);
        }
    }

    fn leave(&self) {
        self.running.store(false, Ordering::SeqCst);
    }
}

impl Rig {
    /// Starts the agent (one per process) with its folder under `base`.
    pub fn start(base: &Path) -> Rig {
        let _ = std::fs::remove_dir_all(base);
        let coordinator = Coordinator::new();
        let mut counts = Vec::new();
        let mut registrations = Vec::new();
        for name in ["first", "second"] {
            let count = Arc::new(Counts::default());
            let (b, a) = (Arc::clone(&count), Arc::clone(&count));
            registrations.push(coordinator.context().register(from_fns(
                name,
                move |_| {
                    b.enter();
                    b.balance.fetch_add(1, Ordering::SeqCst);
                    b.checkpoints.fetch_add(1, Ordering::SeqCst);
                    b.leave();
                    Ok(())
                },
                move |_| {
                    a.enter();
                    a.balance.fetch_sub(1, Ordering::SeqCst);
                    a.leave();
                    Ok(())
                },
            )));
            counts.push(count);
        }
        let agent = crac_agent::Builder::new()
            .coordinator(coordinator)
            .base_dir(base)
            .signal_cleanup(false)
            .start()
            .expect("the agent starts");
        Rig {
            socket: agent.socket_path().to_owned(),
            base: base.to_owned(),
            agent,
            counts,
            _registrations: registrations,
        }
    }

    /// Decodes `input` into a script, runs it, and checks what must hold. Returns how many
    /// checkpoints the script began (so that a caller can see the hooks were reached).
    pub fn run(&self, input: &[u8]) -> Result<u64, String> {
        let before = self.counts[0].checkpoints.load(Ordering::SeqCst);
        let mut bytes = Bytes { input, at: 0 };
        let mut held: Vec<UnixStream> = Vec::new();
        let mut step = 0;
        while step < MAX_STEPS && !bytes.done() {
            step += 1;
            match bytes.byte() % 8 {
                0 => {
                    if held.len() < MAX_HELD {
                        held.push(self.connect()?);
                    }
                }
                1 => drop(held.pop()),
                _ => {
                    let line = request(&mut bytes);
                    self.send(&line, &mut bytes)
                        .map_err(|err| format!("step {step}, request {:?}: {err}", show(&line)))?;
                }
            }
        }
        drop(held);
        self.settle()?;
        Ok(self.counts[0].checkpoints.load(Ordering::SeqCst) - before)
    }

    fn connect(&self) -> Result<UnixStream, String> {
        UnixStream::connect(&self.socket).map_err(|e| format!("cannot connect: {e}"))
    }

    /// Sends `line` the way the script says, and checks the reply if the client waits for it.
    fn send(&self, line: &[u8], bytes: &mut Bytes<'_>) -> Result<(), String> {
        let mut stream = self.connect()?;
        let how = bytes.byte();
        // More data after the line, up to 8 KiB.
        let extra = usize::from(bytes.byte() % 4) * 2048 + usize::from(bytes.byte());
        let mut sent = line.to_vec();
        sent.resize(line.len() + extra, b'x');
        // In up to four pieces, each its own write.
        let pieces = usize::from(how % 4) + 1;
        for piece in sent.chunks(sent.len().div_ceil(pieces).max(1)) {
            if write(&stream, piece).is_err() {
                // The agent answered early (a line too long) and closed: read what it said.
                break;
            }
        }
        match (how >> 2) % 4 {
            // Gone without reading: nothing to check here; the end of the script checks that a
            // checkpoint it may have started does not stay pending for ever.
            0 => return Ok(()),
            // Waits with its side open: only a complete or overlong line is answered at once.
            1 if sent.contains(&b'\n') || sent.len() > MAX_REQUEST_LEN => {}
            _ => {
                let _ = stream.shutdown(Shutdown::Write);
            }
        }
        let reply = read_reply(&mut stream)?;
        check(&reply)
    }

    /// Ends what the script left: the agent answers, a pending checkpoint ends, and the hooks
    /// balance.
    fn settle(&self) -> Result<(), String> {
        let deadline = Instant::now() + ANSWER_LIMIT;
        loop {
            let status = self.ask(br#"{"v":1,"op":"status"}"#)?;
            if status.state == "idle" {
                break;
            }
            let end = serde_json::json!({
                "v": VERSION,
                "op": "after-restore",
                "reason": "aborted",
                "cycle": status.cycle,
            });
            // Not-checkpointing (its lease ended it meanwhile) is fine: the loop looks again.
            self.ask(end.to_string().as_bytes())?;
            if Instant::now() > deadline {
                return Err(format!("still {:?} after ending it", status.state));
            }
        }
        for (index, counts) in self.counts.iter().enumerate() {
            if counts.overlapped.load(Ordering::SeqCst) {
                return Err(format!("the hooks of resource {index} overlapped"));
            }
            let balance = counts.balance.load(Ordering::SeqCst);
            if balance != 0 {
                return Err(format!(
                    "resource {index}: {balance} more before_checkpoint than after_restore calls while idle"
                ));
            }
        }
        Ok(())
    }

    fn ask(&self, line: &[u8]) -> Result<Reply, String> {
        let mut stream = self.connect()?;
        write(&stream, line)
            .and_then(|()| stream.shutdown(Shutdown::Write))
            .map_err(|e| format!("cannot send {:?}: {e}", show(line)))?;
        let reply = read_reply(&mut stream)?;
        check(&reply)?;
        Ok(reply)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.agent.stop();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Writes all of `bytes`; an agent that closed shows as an error, never as SIGPIPE (a fuzz
/// target's process does not ignore it the way a Rust program does).
fn write(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Reads the one reply line and the end of the stream. A reset after the whole line is
/// accepted only while a checkpoint is pending: the agent then closes at once after its reply,
/// and what the client still sent after its line resets the connection (the protocol's docs
/// say so); otherwise it drains until the client closes, and a reset would lose replies.
fn read_reply(stream: &mut UnixStream) -> Result<Reply, String> {
    stream
        .set_read_timeout(Some(ANSWER_LIMIT))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let ended = stream.read_to_end(&mut got);
    let text = String::from_utf8(got).map_err(|e| format!("a reply that is not UTF-8: {e}"))?;
    let line = text.strip_suffix('\n').filter(|l| !l.contains('\n'));
    let reply: Option<Reply> = line.and_then(|line| serde_json::from_str(line).ok());
    match (ended, reply) {
        (Ok(_), Some(reply)) => Ok(reply),
        (Err(err), Some(reply))
            if err.kind() == std::io::ErrorKind::ConnectionReset
                && reply.state == "checkpointing" =>
        {
            Ok(reply)
        }
        (Err(err), _) => Err(format!("no reply and end of stream ({err}) after {text:?}")),
        (Ok(_), None) => Err(format!("not exactly one valid reply line: {text:?}")),
    }
}

/// What every reply must be.
fn check(reply: &Reply) -> Result<(), String> {
    let fine = reply.v == VERSION
        && reply.pid == std::process::id()
        && (reply.state == "idle" || reply.state == "checkpointing")
        && (reply.ok || (reply.error.is_some() && reply.code.is_some()))
        && (!reply.ok || reply.error.is_none())
        && (reply.op != "before-checkpoint" || !reply.ok || reply.state == "checkpointing");
    if fine {
        Ok(())
    } else {
        Err(format!("an inconsistent reply: {reply:?}"))
    }
}

/// The input, read one byte at a time (zeros once it is used up).
struct Bytes<'a> {
    input: &'a [u8],
    at: usize,
}

impl Bytes<'_> {
    fn done(&self) -> bool {
        self.at >= self.input.len()
    }

    fn byte(&mut self) -> u8 {
        let byte = self.input.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        byte
    }

    /// The next `n` bytes, or what is left.
    fn take(&mut self, n: usize) -> &[u8] {
        let from = self.at.min(self.input.len());
        let to = (from + n).min(self.input.len());
        self.at = to;
        &self.input[from..to]
    }
}

/// A request line of the kind the input picks.
fn request(bytes: &mut Bytes<'_>) -> Vec<u8> {
    match bytes.byte() % 8 {
        0..=3 => well_formed(bytes),
        4 => {
            // Well formed, then one byte changed.
            let mut line = well_formed(bytes);
            let at = usize::from(bytes.byte()) % line.len();
            line[at] = bytes.byte();
            line
        }
        5 => {
            let n = usize::from(bytes.byte());
            bytes.take(n).to_vec()
        }
        6 => {
            // Around the length limit, with or without a newline at the end.
            let n = MAX_REQUEST_LEN - 2 + usize::from(bytes.byte() % 4);
            let mut line = vec![b' '; n];
            if bytes.byte() % 2 == 0 {
                line.push(b'\n');
            }
            line
        }
        _ => b"\n".to_vec(),
    }
}

/// A JSON request with fields the input picks among meaningful and odd values.
fn well_formed(bytes: &mut Bytes<'_>) -> Vec<u8> {
    let mut object = serde_json::Map::new();
    let mut pick = |options: &[serde_json::Value]| {
        let index = usize::from(bytes.byte()) % (options.len() + 1);
        options.get(index).cloned()
    };
    use serde_json::json;
    let fields = [
        // Mostly meaningful, so that scripts reach the state machine and not only the parser.
        (
            "v",
            pick(&[json!(1), json!(1), json!(1), json!(1), json!(2), json!("1")]),
        ),
        (
            "op",
            pick(&[
                json!("before-checkpoint"),
                json!("after-restore"),
                json!("before-checkpoint"),
                json!("after-restore"),
                json!("before-checkpoint"),
                json!("after-restore"),
                json!("status"),
                json!("dump"),
                json!(7),
            ]),
        ),
        (
            "reason",
            pick(&[
                json!("aborted"),
                json!("resumed"),
                json!("restored"),
                json!("later"),
                json!(null),
            ]),
        ),
        (
            "cycle",
            pick(&[json!("c1"), json!("c2"), json!(""), json!(null), json!(5)]),
        ),
        (
            "lease_ms",
            pick(&[json!(0), json!(50), json!(u64::MAX), json!(-3), json!(1.5)]),
        ),
        (
            "extra",
            pick(&[json!({"nested": [1, 2]}), json!("ignored")]),
        ),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            object.insert(name.to_owned(), value);
        }
    }
    let mut line = serde_json::Value::Object(object).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A line as text for a message, cut short.
fn show(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    match text.char_indices().nth(120) {
        Some((at, _)) => format!("{}... ({} bytes)", &text[..at], line.len()),
        None => text.into_owned(),
    }
}
