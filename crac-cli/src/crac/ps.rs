//! `crac ps` and `crac status`: ask agents for their state, wherever their processes run (on
//! the host or in containers: see crac_action::namespace).

use std::time::Duration;

use serde::Serialize;

use crac_action::agents::{ask, Deadline, Outcome};
use crac_action::namespace::{expected_socket, AgentSocket};
use crac_action::tree::ProcessId;
use crac_agent::protocol::Request;
use crac_cli::driver::{read_cmdline, FailureKind, OpError};

use crate::output::Out;

const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Serialize)]
struct Row {
    pid: u32,
    /// The pid as the process sees itself, when it differs (a container).
    ns_pid: Option<u32>,
    command: String,
    /// `idle`, `checkpointing`, or `stale` (a socket with no live agent), `unresponsive`.
    state: String,
    generation: Option<u64>,
    resources: Vec<String>,
    socket: String,
    error: Option<String>,
    /// How the last cycle ended, and its hooks that failed.
    last_cycle: Option<String>,
    last_failures: Vec<String>,
}

/// A failed hook as a line: `after_restore of "db": failed: ...`.
fn failure_line(hook: &crac_agent::protocol::HookReport) -> String {
    format!(
        "{} of {:?}: {}",
        hook.phase,
        hook.resource,
        hook.error.as_deref().unwrap_or("failed")
    )
}

fn row(agent: &AgentSocket) -> Row {
    let pid = agent.pid();
    let mut row = Row {
        pid,
        ns_pid: Some(agent.ns_pid()).filter(|&n| n != pid),
        command: read_cmdline(pid).join(" "),
        state: "stale".into(),
        socket: agent.describe(),
        ..Row::default()
    };
    match ask(agent, &Request::status(), &Deadline::after(TIMEOUT)) {
        Outcome::Done(reply) | Outcome::Refused(reply) => {
            row.state = reply.state;
            row.generation = Some(reply.generation);
            row.resources = reply.resources;
            row.last_cycle = reply.last_cycle;
            row.last_failures = reply.last_failures.iter().map(failure_line).collect();
        }
        Outcome::NoAgent => row.error = Some("nobody listens on its socket".into()),
        Outcome::NoAnswer(err) => {
            row.state = "unresponsive".into();
            row.error = Some(err.to_string());
        }
        Outcome::Untrusted(err) => {
            row.state = "refused".into();
            row.error = Some(err.to_string());
        }
    }
    row
}

/// Sockets left in this side's agent folder by processes that are gone (killed).
fn stale_rows() -> Vec<Row> {
    let base = crac_agent::base_dir();
    let mut pids: Vec<u32> = std::fs::read_dir(&base)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&pid| {
                    crac_agent::socket_path(pid).exists() && ProcessId::of(pid).is_none()
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids.into_iter()
        .map(|pid| Row {
            pid,
            state: "stale".into(),
            socket: crac_agent::socket_path(pid).display().to_string(),
            error: Some("no such process: a socket left by a killed process".into()),
            ..Row::default()
        })
        .collect()
}

pub fn ps(out: Out) -> Result<u8, OpError> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    let mut rows: Vec<Row> = pids
        .into_iter()
        .filter_map(|pid| match AgentSocket::find(pid) {
            Ok(Some(agent)) => Some(row(&agent)),
            Ok(None) => None,
            Err(refusal) => Some(Row {
                pid,
                command: read_cmdline(pid).join(" "),
                state: "refused".into(),
                error: Some(refusal.to_string()),
                ..Row::default()
            }),
        })
        .collect();
    rows.extend(stale_rows());
    out.print(&rows, || {
        let mut text = format!(
            "{:>8}  {:<13} {:>4}  {:<30} COMMAND\n",
            "PID", "STATE", "GEN", "RESOURCES"
        );
        for r in &rows {
            text.push_str(&format!(
                "{:>8}  {:<13} {:>4}  {:<30} {}\n",
                r.pid,
                r.state,
                r.generation.map_or("-".to_owned(), |g| g.to_string()),
                truncate(&r.resources.join(","), 30),
                if r.command.is_empty() {
                    r.error.clone().unwrap_or_default()
                } else {
                    r.command.clone()
                }
            ));
            for failure in &r.last_failures {
                text.push_str(&format!("{:>8}  last cycle: {failure}\n", ""));
            }
        }
        if rows.is_empty() {
            text = "no process on this machine runs an agent\n".to_owned();
        }
        text
    });
    Ok(0)
}

pub fn status(pid: u32, descriptors: bool, out: Out) -> Result<u8, OpError> {
    if ProcessId::of(pid).is_none() {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!("no process with pid {pid}"),
        ));
    }
    let no_agent = || {
        OpError::new(
            FailureKind::BadInput,
            format!(
                "pid {pid} runs no agent (no socket at {}): the service must call crac_agent::start()",
                expected_socket(pid)
            ),
        )
    };
    let agent = AgentSocket::find(pid)
        .map_err(|refusal| OpError::new(FailureKind::Failed, refusal.to_string()))?
        .ok_or_else(no_agent)?;
    let request = if descriptors {
        Request::descriptors()
    } else {
        Request::status()
    };
    let reply = match ask(&agent, &request, &Deadline::after(TIMEOUT)) {
        Outcome::Done(reply) | Outcome::Refused(reply) => reply,
        Outcome::NoAgent => return Err(no_agent()),
        Outcome::NoAnswer(err) => return Err(OpError::new(FailureKind::Failed, err.to_string())),
        Outcome::Untrusted(err) => return Err(OpError::new(FailureKind::Failed, err.to_string())),
    };
    out.print(&reply, || {
        let mut last = match &reply.last_cycle {
            None => "  last cycle: none yet\n".to_owned(),
            Some(reason) if reply.last_failures.is_empty() => {
                format!("  last cycle: {reason}, every hook ok\n")
            }
            Some(reason) => format!("  last cycle: {reason}, with failures:\n"),
        };
        for hook in &reply.last_failures {
            last.push_str(&format!("    {}\n", failure_line(hook)));
        }
        if descriptors {
            last.push_str(&format!("  descriptors ({}):\n", reply.descriptors.len()));
            for descriptor in &reply.descriptors {
                last.push_str(&format!("    {descriptor}\n"));
            }
        }
        format!(
            "pid {pid}{}: {}, generation {}{}\n  resources (after_restore order): {}\n{last}  socket: {}\n  command: {}\n",
            if agent.ns_pid() == pid {
                String::new()
            } else {
                format!(" (pid {} in its namespace)", agent.ns_pid())
            },
            reply.state,
            reply.generation,
            reply
                .cycle
                .as_ref()
                .map_or(String::new(), |c| format!(", cycle {c}")),
            if reply.resources.is_empty() {
                "none".to_owned()
            } else {
                reply.resources.join(", ")
            },
            agent.describe(),
            read_cmdline(pid).join(" ")
        )
    });
    Ok(0)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(max - 1).collect::<String>())
    }
}
