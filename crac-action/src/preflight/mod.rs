//! Preflight: every descriptor in the tree that CRIU, with the options it was given, will
//! refuse to dump, found after the hooks ran and before CRIU seizes the tree, and listed in
//! one refusal (pid, fd, kind, address or path, and what to do).
//!
//! CRIU's own refusals come one at a time, in its words ("Connected TCP socket, consider using
//! --tcp-established", "External socket is used"), after the service was quiesced and frozen.
//! A process with an agent tells its own descriptors with its before-checkpoint reply
//! ([`crac_protocol::fd_facts`]: an `fstat` each and a `TCP_INFO` per socket, from inside, in the
//! pass the agent makes anyway to count its TCP connections; about eight times cheaper than
//! from outside). The addresses of TCP connections are asked for only when they will be shown
//! or matched ([`needs_tcp_addresses`]). For any other process this looks at `/proc/PID/fd`,
//! and asks each socket about itself through a copy of its descriptor (`pidfd_getfd`); the
//! namespace's socket tables in `/proc/PID/net` are the fallback (they list every socket of
//! the namespace, and reading the TCP ones walks the kernel's whole hash table). The verdicts
//! are the same either way. Which sockets are connected Unix ones, who is at the other end and
//! the socket's type come from sock_diag dumps of connected Unix sockets: one for this network
//! namespace and one for each other namespace a process of the tree is in. Where the
//! process's agent can tell, each refused descriptor names the resource most likely holding it
//! (asked only once there is something to refuse). What it checks:
//!
//! | descriptor | CRIU refuses it | unless |
//! |---|---|---|
//! | a TCP connection (established, being made, closing) | "Connected TCP socket" | `--tcp-established` or `--tcp-close` |
//! | a TCP listener with connections not accepted yet | "In-flight connection" | `--skip-in-flight` |
//! | a Unix stream or seqpacket socket whose peer is outside the tree | "External socket is used" | `--ext-unix-sk` |
//! | a terminal (`/dev/pts/N`, `/dev/ttyN`) whose other side is outside the tree | the session's terminal | `--shell-job` |
//! | an io_uring, userfaultfd, perf event or KVM descriptor | "unsupported" | never |
//! | a deleted file (no link left) bigger than the ghost limit | "Can't dump ghost file" | a bigger `--ghost-limit` |
//! | a file lock (flock, POSIX, OFD) held through a descriptor, an inherited one too | "Some file locks are hold by dumping tasks" | `--file-locks` |
//! | a POSIX lock on a file the process has mapped (SQLite's `-shm`) | lost at the restore, with `--file-locks` | never |
//!
//! CRIU's options come from its command line and the configuration files it reads. Under a
//! container runtime CRIU runs as `criu swrk` and gets its options over RPC, which cannot be
//! read from outside: then only the checks that no option changes run.
//!
//! A [`Policy`] (`CRAC_POLICY`, a file) ignores or refuses descriptors by kind and pattern;
//! its `close` rules are for a service's own agent ([`crac_protocol::fd_policy`]). An agent's
//! own connections are left to the agent, which closes them while a checkpoint is pending.
//!
//! # Anatomy
//!
//! - `criu_options.rs`: [`CriuOptions`], what the CRIU that runs accepts;
//! - `seen.rs`: a process's descriptors as its agent told them or as seen from outside;
//! - `scan.rs`: [`scan()`], what CRIU refuses per descriptor kind, and why;
//! - `pidfd.rs`: a socket of another process asked about itself, through a copy of it;
//! - `locks.rs`: [`held_locks`], the file locks held through the tree's descriptors;
//! - `sock_diag.rs`: who is at the other end of each Unix socket (sock_diag netlink);
//! - `policy.rs`: [`configured`] and [`refused_by_policy`], the operator's policy applied;
//! - `report.rs`: [`Problem`] and the [`refusal`] that lists them.

mod criu_options;
mod locks;
pub(crate) mod pidfd;
mod policy;
mod report;
mod scan;
mod seen;
mod sock_diag;

pub use crac_protocol::fd_policy::{Kind, Policy, PolicyError, Verdict};

pub use criu_options::CriuOptions;
pub use locks::{held as held_locks, restorable as restorable_lock, HeldLock};
pub use policy::{configured, needs_tcp_addresses, refused_by_policy, POLICY_ENV, PREFLIGHT_ENV};
pub use report::{refusal, Problem};
pub use scan::scan;
pub use seen::AgentFacts;

/// Everything in the tree under `root` that CRIU with `opts` will refuse, or `policy`
/// refuses, as one line for a refusal; `None` when there is nothing.
pub fn check(root: u32, opts: &CriuOptions, policy: &Policy) -> Option<String> {
    refusal(&problems(
        &crate::tree::descendants(root),
        &AgentFacts::new(),
        opts,
        policy,
    ))
}

/// What CRIU with `opts` will refuse in the processes `pids`, and what `policy` refuses.
pub fn problems(
    pids: &[u32],
    facts: &AgentFacts,
    opts: &CriuOptions,
    policy: &Policy,
) -> Vec<Problem> {
    let mut problems = scan(pids, facts, opts, policy);
    for refused in refused_by_policy(pids, facts, policy) {
        if !problems
            .iter()
            .any(|p| p.pid == refused.pid && p.fd == refused.fd)
        {
            problems.push(refused);
        }
    }
    problems
}
