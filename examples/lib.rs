//! Code shared by the example programs (`cache-server`, `warm-start`): a TCP listener kept
//! across checkpoints, whose accept loop holds still while one is taken
//! ([`listener::GatedListener`]), the one-line protocol both
//! speak ([`answer_one_line`]), and two small helpers, [`Log`] for the one-line-per-hook logs
//! and [`lock`].
//!
//! It is a library of the examples package only, not part of crac-rs's API: it exists so the
//! examples do not each carry their own copy of the listener.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub mod listener;

/// How an example program signs its log lines on stderr: `cache-server: ...`.
///
/// Every hook writes one line with [`Log::hook`], so the order in which the hooks ran can be
/// read in the program's log.
#[derive(Clone, Copy, Debug)]
pub struct Log {
    program: &'static str,
}

impl Log {
    /// Lines signed by `program`, e.g. `Log::new("cache-server")`.
    pub const fn new(program: &'static str) -> Log {
        Log { program }
    }

    /// The program name lines start with.
    pub fn program(&self) -> &'static str {
        self.program
    }

    /// Writes one line for a hook to stderr: `PROGRAM: HOOK RESOURCE: WHAT`, e.g.
    /// `cache-server: before_checkpoint cache: keeping 3 entries in memory ...`.
    pub fn hook(&self, hook: &str, resource: &str, what: fmt::Arguments<'_>) {
        eprintln!("{}: {hook} {resource}: {what}", self.program);
    }
}

/// Locks `mutex`, taking the data of a poisoned lock as it is.
///
/// The examples keep every update under their locks to a single assignment, so a thread that
/// panicked while holding one cannot have left the data half-changed.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves one request of the examples' line protocol on `stream`: reads one line (at most
/// `max_request` bytes, within `timeout`), writes `answer(line)` and a newline. The caller
/// closes the connection, so that none is open when CRIU freezes the process.
///
/// # Errors
///
/// A line saying which step failed.
pub fn answer_one_line(
    stream: &TcpStream,
    timeout: Duration,
    max_request: u64,
    answer: impl FnOnce(&str) -> String,
) -> Result<(), String> {
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|err| format!("cannot set client timeouts: {err}"))?;
    let mut line = String::new();
    BufReader::new(stream.take(max_request))
        .read_line(&mut line)
        .map_err(|err| format!("cannot read the request: {err}"))?;
    let reply = answer(line.trim_end_matches(['\r', '\n']));
    let mut writer = stream;
    writer
        .write_all(format!("{reply}\n").as_bytes())
        .map_err(|err| format!("cannot send the reply: {err}"))
}
