//! Finding the agents of a process tree and telling them things, with a shared deadline.

use std::io::Write;
use std::time::{Duration, Instant};

use crac_protocol::client::{self, ClientError};
use crac_protocol::wire::{Code, Reply, Request};

use crate::agent_socket::{AgentSocket, ConnectError, Refusal};
use crate::tree;

/// The agents of a process tree.
#[derive(Debug, Default)]
pub struct Found {
    /// The agents, parents first.
    pub agents: Vec<AgentSocket>,
    /// The processes whose agent crac-action will not talk to, and why.
    pub refused: Vec<Refusal>,
}

/// The agents of the tree rooted at `root` (wherever each process's root and pid namespace
/// are; see [`crate::agent_socket`]).
pub fn in_tree(root: u32) -> Found {
    let mut found = Found::default();
    for pid in tree::descendants(root) {
        match AgentSocket::find(pid) {
            Ok(Some(agent)) => found.agents.push(agent),
            Ok(None) => {}
            Err(refusal) => found.refused.push(refusal),
        }
    }
    found
}

/// A shared deadline for one step.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }

    /// Time left, at least a millisecond (so a late request still gets a clean time-out).
    pub fn remaining(&self) -> Duration {
        self.at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    /// The limit this deadline was made with.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

/// What one agent said.
#[derive(Debug)]
pub enum Outcome {
    /// It did what was asked.
    Done(Reply),
    /// It answered that it could not (hooks failed, wrong state); it has rolled back.
    Refused(Reply),
    /// There was no agent after all (a stale socket).
    NoAgent,
    /// No answer (time-out, broken connection): what the agent did is unknown.
    NoAnswer(ClientError),
    /// The socket is not the process's own: nothing was sent.
    Untrusted(ConnectError),
}

/// Sends `request` to `agent` within `deadline`.
pub fn ask(agent: &AgentSocket, request: &Request, deadline: &Deadline) -> Outcome {
    let stream = match agent.connect() {
        Ok(stream) => stream,
        Err(ConnectError::Client(ClientError::NoAgent { .. })) => return Outcome::NoAgent,
        Err(ConnectError::Client(err)) => return Outcome::NoAnswer(err),
        Err(err) => return Outcome::Untrusted(err),
    };
    let shown = std::path::PathBuf::from(agent.describe());
    match client::exchange(stream, &shown, request, deadline.remaining()) {
        Ok(reply) if reply.ok => Outcome::Done(reply),
        Ok(reply) => Outcome::Refused(reply),
        Err(ClientError::NoAgent { .. }) => Outcome::NoAgent,
        // Report the step's limit, not the sliver of it that was left for this agent.
        Err(ClientError::TimedOut { path, .. }) => Outcome::NoAnswer(ClientError::TimedOut {
            path,
            after: deadline.limit(),
        }),
        Err(err) => Outcome::NoAnswer(err),
    }
}

/// A line for an agent that did not answer, with a hint for time-outs.
pub fn describe_no_answer(pid: u32, err: &ClientError) -> String {
    match err {
        ClientError::TimedOut { .. } => format!(
            "pid {pid}: {err} ({} sets this limit)",
            crate::settings::TIMEOUT_ENV
        ),
        _ => format!("pid {pid}: {err}"),
    }
}

/// "3 hooks in 1.2ms: upstream 1.0ms, cache 0.1ms": the hooks in the order they ran.
pub fn describe_hooks(reply: &Reply) -> String {
    if reply.code == Some(Code::Already) {
        return "already done for this cycle (this step ran before), nothing run again".to_owned();
    }
    if reply.hooks.is_empty() {
        return "no resources registered".to_owned();
    }
    let total: u64 = reply.hooks.iter().map(|h| h.duration_us).sum();
    let each: Vec<String> = reply
        .hooks
        .iter()
        .map(|h| match &h.error {
            None => format!("{} {}", h.resource, micros(h.duration_us)),
            Some(err) => format!("{} FAILED ({err})", h.resource),
        })
        .collect();
    format!(
        "{} hook{} in {}: {}",
        reply.hooks.len(),
        if reply.hooks.len() == 1 { "" } else { "s" },
        micros(total),
        each.join(", ")
    )
}

fn micros(us: u64) -> String {
    if us >= 1000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{us}µs")
    }
}

/// Writes one log line, prefixed with the program and step. CRIU's log is the only place
/// these go, so a failed write is not worth failing the step for.
pub fn log(out: &mut dyn Write, step: &str, line: &str) {
    let _ = writeln!(out, "crac-action: {step}: {line}");
}
