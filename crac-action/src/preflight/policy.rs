//! The operator's policy applied: whether the preflight runs and with which [`Policy`]
//! (`CRAC_PREFLIGHT`, `CRAC_POLICY`), what a policy refuses whatever CRIU's options, and what
//! it makes an agent find.

use std::path::Path;

use crac_protocol::fd_policy::{Policy, Verdict};

use super::criu_options::CriuOptions;
use super::report::Problem;
use super::scan::scan;
use super::seen::AgentFacts;

/// Turns the preflight off (`CRAC_PREFLIGHT=off`): CRIU then finds what it finds.
pub const PREFLIGHT_ENV: &str = crac_protocol::env::PREFLIGHT;
/// A [`Policy`] file.
pub const POLICY_ENV: &str = crac_protocol::env::POLICY;

/// The preflight as the environment sets it: `None` when it is turned off
/// ([`PREFLIGHT_ENV`]`=off`), else the [`Policy`] of [`POLICY_ENV`] (empty without one).
///
/// # Errors
///
/// A bad setting, or a policy file that does not parse (with its line and column).
pub fn configured(vars: impl Fn(&str) -> Option<String>) -> Result<Option<Policy>, String> {
    match vars(PREFLIGHT_ENV).as_deref().map(str::trim) {
        None | Some("" | "on" | "1") => {}
        Some("off" | "0") => return Ok(None),
        Some(other) => return Err(format!("{PREFLIGHT_ENV}={other:?}: expected on or off")),
    }
    match vars(POLICY_ENV).filter(|p| !p.is_empty()) {
        None => Ok(Some(Policy::default())),
        Some(path) => Policy::load(Path::new(&path))
            .map(Some)
            .map_err(|err| format!("{POLICY_ENV}: {err}")),
    }
}

/// Whether the preflight will show or match the addresses of TCP connections with `opts` and
/// `policy`: when CRIU refuses connections, or a policy may refuse anything. Otherwise an
/// agent need not find them ([`crac_protocol::wire::Lean::tcp_addresses`]).
pub fn needs_tcp_addresses(opts: &CriuOptions, policy: &Policy) -> bool {
    (opts.known && !opts.tcp_established && !opts.tcp_close) || policy.says(Verdict::Refuse)
}

/// Descriptors a policy refuses whatever CRIU's options (they are not problems to CRIU).
pub fn refused_by_policy(pids: &[u32], facts: &AgentFacts, policy: &Policy) -> Vec<Problem> {
    if !policy.says(Verdict::Refuse) {
        return Vec::new();
    }
    let lenient = CriuOptions {
        known: true,
        tcp_established: false,
        ext_unix_sk: false,
        shell_job: false,
        ghost_limit: 0,
        tcp_close: false,
        // A listener is refused by a rule for what it is, not for a client that happens to
        // be waiting.
        skip_in_flight: true,
        file_locks: false,
    };
    scan(pids, facts, &lenient, &Policy::default())
        .into_iter()
        .filter(|p| policy.verdict(p.kind, &p.what) == Some(Verdict::Refuse))
        .map(|mut p| {
            p.why = "refused by the preflight policy (CRAC_POLICY)";
            p
        })
        .collect()
}
