//! `crac ps` and `crac status`: ask agents for their state.

use std::time::Duration;

use serde::Serialize;

use crac_action::driver::{read_cmdline, FailureKind, OpError};
use crac_action::tree::ProcessId;
use crac_agent::client::{self, ClientError};
use crac_agent::protocol::{Reply, Request};

use crate::output::Out;

const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
struct Row {
    pid: u32,
    command: String,
    /// `idle`, `checkpointing`, or `stale` (a socket with no live agent), `unresponsive`.
    state: String,
    generation: Option<u64>,
    resources: Vec<String>,
    error: Option<String>,
}

fn row(pid: u32) -> Row {
    let command = read_cmdline(pid).join(" ");
    let mut row = Row {
        pid,
        command,
        state: "stale".into(),
        generation: None,
        resources: Vec::new(),
        error: None,
    };
    if ProcessId::of(pid).is_none() {
        row.error = Some("no such process: a socket left by a killed process".into());
        return row;
    }
    match client::request(pid, &Request::status(), TIMEOUT) {
        Ok(Reply {
            state,
            generation,
            resources,
            ..
        }) => {
            row.state = state;
            row.generation = Some(generation);
            row.resources = resources;
        }
        Err(ClientError::NoAgent { .. }) => {
            row.error = Some("nobody listens on its socket".into());
        }
        Err(err) => {
            row.state = "unresponsive".into();
            row.error = Some(err.to_string());
        }
    }
    row
}

pub fn ps(out: Out) -> Result<u8, OpError> {
    let base = crac_agent::base_dir();
    let mut pids: Vec<u32> = std::fs::read_dir(&base)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&pid| crac_agent::socket_path(pid).exists())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    let rows: Vec<Row> = pids.into_iter().map(row).collect();
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
        }
        if rows.is_empty() {
            text = format!("no agents under {}\n", base.display());
        }
        text
    });
    Ok(0)
}

pub fn status(pid: u32, out: Out) -> Result<u8, OpError> {
    if ProcessId::of(pid).is_none() {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!("no process with pid {pid}"),
        ));
    }
    let reply = client::request(pid, &Request::status(), TIMEOUT).map_err(|err| match err {
        ClientError::NoAgent { path, .. } => OpError::new(
            FailureKind::BadInput,
            format!(
                "pid {pid} runs no agent (no socket at {}): the service must call crac_agent::start()",
                path.display()
            ),
        ),
        other => OpError::new(FailureKind::Failed, other.to_string()),
    })?;
    out.print(&reply, || {
        format!(
            "pid {}: {}, generation {}{}\n  resources (after_restore order): {}\n  command: {}\n",
            reply.pid,
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
