//! What the preflight reports: each descriptor CRIU would refuse ([`Problem`]), and the one
//! refusal that lists them all.

use std::fmt;

use crac_protocol::fd_policy::Kind;

/// A descriptor CRIU would refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The process (as this side sees it).
    pub pid: u32,
    /// The descriptor.
    pub fd: u32,
    /// Its kind.
    pub kind: Kind,
    /// What it is: an address (`127.0.0.1:40000 -> 127.0.0.1:5432`) or a path.
    pub what: String,
    /// Why CRIU refuses it, and what to do.
    pub why: &'static str,
    /// The resource most likely holding it, when the process's agent can tell (asked only
    /// once there is something to refuse).
    pub owner: Option<crac_protocol::fd_policy::Owner>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} fd {}: {} {} ({})",
            self.pid,
            self.fd,
            self.kind.as_str(),
            self.what,
            self.why
        )?;
        if let Some(owner) = &self.owner {
            write!(f, " [{owner}]")?;
        }
        Ok(())
    }
}

/// The refusal that lists `problems`, as one line; `None` when there are none.
pub fn refusal(problems: &[Problem]) -> Option<String> {
    if problems.is_empty() {
        return None;
    }
    let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
    Some(format!(
        "preflight: CRIU would refuse {} descriptor{} of the tree: {} (CRAC_PREFLIGHT=off skips this check)",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        list.join("; ")
    ))
}
