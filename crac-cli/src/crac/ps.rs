//! `crac ps` and `crac status`: ask agents for their state, wherever their processes run (on
//! the host or in containers: see crac_action::agent_socket).

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::Serialize;

use crac_action::agent_socket::{expected_socket, AgentSocket};
use crac_action::agents::{ask, Deadline, Outcome};
use crac_action::tree::ProcessId;
use crac_cli::error::{FailureKind, OpError};
use crac_cli::process::read_cmdline;
use crac_protocol::client::ClientError;
use crac_protocol::wire::Request;

use crate::output::{field, Out};

/// How long `crac ps` waits for every agent together. An agent answers `status` at once, even
/// while its hooks run (it serves connections side by side); one that does not is stopped, or
/// not an agent at all (any user can listen on a socket at its own agent path and never
/// answer), and is listed as not answering rather than waited for.
const PS_LIMIT: Duration = Duration::from_millis(500);

/// How long `crac status` waits for the one agent it asks: the descriptors of a process with
/// many take a while to list.
const STATUS_LIMIT: Duration = Duration::from_secs(2);

/// Asks every agent `request` at once, each from a thread of its own, within one deadline of
/// `limit`: silent agents cost one limit between them, not one each. The answer of each, in
/// order; `None` for one whose thread had nothing by the deadline (stuck connecting: a
/// listener whose queue its owner keeps full), which is left behind (crac exits soon after).
fn ask_all(
    agents: &[Arc<AgentSocket>],
    request: &Request,
    limit: Duration,
) -> Vec<Option<Outcome>> {
    let deadline = Deadline::after(limit);
    let until = Instant::now() + limit;
    let (sender, answers) = mpsc::channel();
    let mut outcomes: Vec<Option<Outcome>> = agents.iter().map(|_| None).collect();
    let mut pending = 0;
    for (index, agent) in agents.iter().enumerate() {
        let (mine, asked, sender) = (Arc::clone(agent), request.clone(), sender.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("ask {}", agent.pid()))
            .spawn(move || {
                let _ = sender.send((index, ask(&mine, &asked, &deadline)));
            });
        match spawned {
            Ok(_) => pending += 1,
            // Out of threads (thousands of agents): not asked here, where a blocking connect
            // would hold up everything; said so.
            Err(err) => {
                outcomes[index] = Some(Outcome::NoAnswer(ClientError::Io {
                    path: agent.describe().into(),
                    source: std::io::Error::other(format!("not asked: {err}")),
                }))
            }
        }
    }
    drop(sender);
    while pending > 0 {
        // A little past the deadline, for the threads to report their own time-outs.
        let left = until.saturating_duration_since(Instant::now()) + Duration::from_millis(50);
        match answers.recv_timeout(left) {
            Ok((index, outcome)) => {
                outcomes[index] = Some(outcome);
                pending -= 1;
            }
            Err(_) => break,
        }
    }
    outcomes
}

/// What is said of an agent whose thread had nothing by the deadline: as a time-out.
fn no_answer_within(agent: &AgentSocket, limit: Duration) -> String {
    format!(
        "the agent at {} did not reply within {}s",
        agent.describe(),
        limit.as_secs_f64()
    )
}

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
fn failure_line(hook: &crac_protocol::wire::HookReport) -> String {
    format!(
        "{} of {:?}: {}",
        hook.phase,
        hook.resource,
        hook.error.as_deref().unwrap_or("failed")
    )
}

fn row(agent: &AgentSocket, outcome: Option<Outcome>) -> Row {
    let pid = agent.pid();
    let mut row = Row {
        pid,
        ns_pid: Some(agent.ns_pid()).filter(|&n| n != pid),
        command: read_cmdline(pid).join(" "),
        state: "stale".into(),
        socket: agent.describe(),
        ..Row::default()
    };
    let Some(outcome) = outcome else {
        row.state = "unresponsive".into();
        row.error = Some(no_answer_within(agent, PS_LIMIT));
        return row;
    };
    match outcome {
        Outcome::Done(reply) | Outcome::Refused(reply) => {
            row.state = reply.state.to_string();
            row.generation = Some(reply.generation);
            row.resources = reply.resources;
            row.last_cycle = reply.last_cycle.map(|reason| reason.to_string());
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
    let base = crac_protocol::location::base_dir();
    let mut pids: Vec<u32> = std::fs::read_dir(&base)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&pid| {
                    crac_protocol::location::socket_path(pid).exists()
                        && ProcessId::of(pid).is_none()
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids.into_iter()
        .map(|pid| Row {
            pid,
            state: "stale".into(),
            socket: crac_protocol::location::socket_path(pid)
                .display()
                .to_string(),
            error: Some("no such process: a socket left by a killed process".into()),
            ..Row::default()
        })
        .collect()
}

pub(crate) fn ps(out: Out) -> Result<u8, OpError> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    let mut agents = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    for pid in pids {
        match AgentSocket::find(pid) {
            Ok(Some(agent)) => agents.push(Arc::new(agent)),
            Ok(None) => {}
            Err(refusal) => rows.push(Row {
                pid,
                command: read_cmdline(pid).join(" "),
                state: "refused".into(),
                error: Some(refusal.to_string()),
                ..Row::default()
            }),
        }
    }
    let outcomes = ask_all(&agents, &Request::status(), PS_LIMIT);
    rows.extend(
        agents
            .iter()
            .zip(outcomes)
            .map(|(agent, outcome)| row(agent, outcome)),
    );
    rows.sort_by_key(|r| r.pid);
    rows.extend(stale_rows());
    out.print(&rows, || {
        let mut text = format!(
            "{:>8}  {:<13} {:>4}  {:<30} COMMAND\n",
            "PID", "STATE", "GEN", "RESOURCES"
        );
        // Every value from a process or its agent is one field of its row ([`field`]): an
        // agent picks its resource names, state and errors, and any user their command line.
        for r in &rows {
            let resources: Vec<_> = r.resources.iter().map(|name| field(name)).collect();
            text.push_str(&format!(
                "{:>8}  {:<13} {:>4}  {:<30} {}\n",
                r.pid,
                field(&r.state),
                r.generation.map_or("-".to_owned(), |g| g.to_string()),
                truncate(&resources.join(","), 30),
                field(if r.command.is_empty() {
                    r.error.as_deref().unwrap_or_default()
                } else {
                    &r.command
                })
            ));
            if let Some(error) = r.error.as_deref().filter(|_| !r.command.is_empty()) {
                text.push_str(&format!("{:>8}  {}\n", "", field(error)));
            }
            for failure in &r.last_failures {
                text.push_str(&format!("{:>8}  last cycle: {}\n", "", field(failure)));
            }
        }
        if rows.is_empty() {
            text = "no process on this machine runs an agent\n".to_owned();
        }
        text
    });
    Ok(0)
}

pub(crate) fn status(pid: u32, descriptors: bool, out: Out) -> Result<u8, OpError> {
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
    let agent = Arc::new(agent);
    let outcome = ask_all(std::slice::from_ref(&agent), &request, STATUS_LIMIT)
        .pop()
        .flatten();
    let reply = match outcome {
        None => {
            return Err(OpError::new(
                FailureKind::Failed,
                no_answer_within(&agent, STATUS_LIMIT),
            ))
        }
        Some(Outcome::Done(reply) | Outcome::Refused(reply)) => reply,
        Some(Outcome::NoAgent) => return Err(no_agent()),
        Some(Outcome::NoAnswer(err)) => {
            return Err(OpError::new(FailureKind::Failed, err.to_string()))
        }
        Some(Outcome::Untrusted(err)) => {
            return Err(OpError::new(FailureKind::Failed, err.to_string()))
        }
    };
    // Every value from the agent or the process is one field of its line ([`field`]).
    out.print(&reply, || {
        let mut last = match &reply.last_cycle {
            None => "  last cycle: none yet\n".to_owned(),
            Some(reason) if reply.last_failures.is_empty() => {
                format!("  last cycle: {}, every hook ok\n", field(reason.as_str()))
            }
            Some(reason) => format!(
                "  last cycle: {}, with failures:\n",
                field(reason.as_str())
            ),
        };
        for hook in &reply.last_failures {
            last.push_str(&format!("    {}\n", field(&failure_line(hook))));
        }
        if descriptors {
            last.push_str(&format!("  descriptors ({}):\n", reply.descriptors.len()));
            for descriptor in &reply.descriptors {
                last.push_str(&format!("    {}\n", field(&descriptor.to_string())));
            }
        }
        let resources: Vec<_> = reply.resources.iter().map(|name| field(name)).collect();
        format!(
            "pid {pid}{}: {}, generation {}{}\n  resources (after_restore order): {}\n{last}  socket: {}\n  command: {}\n",
            if agent.ns_pid() == pid {
                String::new()
            } else {
                format!(" (pid {} in its namespace)", agent.ns_pid())
            },
            field(reply.state.as_str()),
            reply.generation,
            reply
                .cycle
                .as_ref()
                .map_or(String::new(), |c| format!(", cycle {}", field(c))),
            if resources.is_empty() {
                "none".to_owned()
            } else {
                resources.join(", ")
            },
            field(&agent.describe()),
            field(&read_cmdline(pid).join(" "))
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
