//! The wire protocol between `crac-action` (or any client) and the agent.
//!
//! One connection carries one exchange: the client writes one request, a single line of JSON
//! ending in `\n`, at most [`MAX_REQUEST_LEN`] bytes, within [`REQUEST_TIMEOUT`] of connecting;
//! the agent writes one reply line and closes the connection (reading and dropping whatever
//! else the client sent, so that the reply is not lost to a reset). Nothing stays connected,
//! so CRIU never finds a socket to the outside when it freezes the process. While a checkpoint
//! is pending that matters most: the connection is closed right after the reply, and what the
//! client still sends after its line may reset it once the reply is through (read the reply
//! line before anything else). The agent serves
//! several connections at once: a slow or silent client delays nobody else. Lines are meant to
//! be read by people in CRIU's log as much as by programs.
//!
//! # Requests
//!
//! ```text
//! {"v":1,"op":"before-checkpoint","cycle":"criu-4242","lease_ms":40000}
//! {"v":1,"op":"after-restore","reason":"restored","cycle":"criu-4242"}
//! {"v":1,"op":"status"}
//! ```
//!
//! - `v`: the protocol version, [`VERSION`]. A request with another version is refused.
//! - `op`: `before-checkpoint`, `after-restore`, `status` or `descriptors` (the status and
//!   every descriptor of the process: number, kind, path or addresses, and where the agent can
//!   tell, `owner`: `{"resource":"db","how":"declared"}` for one the resource declares,
//!   `"how":"after_restore"` for one that appeared while its `after_restore` ran and is still
//!   the same file, most likely its own). A before-checkpoint from a client
//!   that has already closed its connection is not run: nobody could hear that it was.
//! - `lease_ms` (before-checkpoint only, optional): how long the checkpoint may stay pending
//!   without an after-restore before the agent ends it itself (reason `aborted`; `restored` in
//!   a copy restored from an image); 60 s without it. Time the process spends frozen (by a
//!   dump) does not count.
//! - `reason` (after-restore only): `restored`, `resumed` or `aborted`.
//! - `dry_run` (before-checkpoint only, optional): list what the process's descriptor policy
//!   would close (`closed` in the reply) instead of closing it.
//! - `facts` (before-checkpoint only, optional): reply, once the hooks ran, with what the
//!   preflight must know about the process's descriptors (`facts` in the reply:
//!   [`crate::fd_facts::Facts`]), found from inside the process.
//! - `lean` (with `facts`, optional): `{"tcp_addresses":BOOL}` from a reader that finds which
//!   sockets are connected Unix ones itself (one sock_diag dump, by inode): the agent then
//!   asks no socket for its peer, and gives TCP connections' addresses only if
//!   `tcp_addresses` (for a refusal to show or a policy to match; two system calls a
//!   connection, spared when CRIU takes connections as they are). Without it the facts carry
//!   both, as readers before it expect.
//! - `env` (after-restore only, optional): settings for the restored process, an object of
//!   strings (`{"LOG_LEVEL":"debug"}`), handed to the hooks as `RestoreInfo::env`. The whole
//!   line still fits in [`MAX_REQUEST_LEN`].
//! - `cycle` (optional): a token naming the checkpoint cycle, chosen by whoever sent
//!   before-checkpoint. An after-restore that carries a different token than the pending
//!   checkpoint is refused, so a late message from an old cycle cannot end a new one. A
//!   before-checkpoint that carries the pending checkpoint's token is answered `ok` with code
//!   `already` and runs nothing: a CRIU that runs its action script twice (CRIU 4.1 under runc)
//!   gets the same outcome twice.
//!
//! # Replies
//!
//! ```text
//! {"v":1,"ok":true,"op":"before-checkpoint","pid":4242,"state":"checkpointing","generation":0,
//!  "cycle":"criu-4242","resources":["upstream","cache"],
//!  "hooks":[{"resource":"cache","phase":"before_checkpoint","duration_us":41,"error":null}, ...],
//!  "error":null}
//! ```
//!
//! - `ok`: whether the request did what it asked. For before-checkpoint, `true` means every hook
//!   succeeded and the process may be dumped now; `false` means the checkpoint was refused and
//!   the process has already rolled back.
//! - `error`: one line saying what went wrong, naming every failed hook; `null` when `ok`.
//! - `code`: what happened, as one word a program can test, when it is not plain success
//!   (see [`code`]): `already` (ok: a before-checkpoint of the cycle already pending, nothing run
//!   again), `bad-request`, `permission-denied`, `busy`, `not-checkpointing`, `cycle-mismatch`,
//!   `failed`. Absent on plain success. New words may be added.
//! - `hooks`: every hook the request ran, in order, with its duration in microseconds and its
//!   error, if any.
//! - `state` (`idle` or `checkpointing`), `generation`, `cycle`, `resources`, `pid`,
//!   `last_restore_unix_ms`: the agent's state after the request.
//! - `last_cycle` (`restored`, `resumed` or `aborted`) and `last_failures` (the hooks of that
//!   cycle that failed, as in `hooks`): how the last cycle that ended went; absent before any.
//!
//! Fields may be added to requests and replies in later versions of the same `v`; readers must
//! ignore fields they do not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;

/// The longest request line the agent reads, newline included.
pub const MAX_REQUEST_LEN: usize = 4096;

/// How long a client has, from connecting, to send its whole request line.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The protocol version.
    pub v: u32,
    /// What to do: `before-checkpoint`, `after-restore` or `status`.
    pub op: String,
    /// For `after-restore`: `restored`, `resumed` or `aborted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The cycle token; see the module documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle: Option<String>,
    /// For `before-checkpoint`: how long it may stay pending; see the module documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Settings for the restored process (after-restore only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A dry run (before-checkpoint only): the hooks run, but the descriptors the process's
    /// policy would close are only listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Before-checkpoint only: send, with the reply, what the preflight must know about the
    /// process's descriptors ([`Reply::facts`]), found once the hooks have run and the
    /// descriptor policy has closed what it closes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub facts: bool,
    /// With [`Request::facts`], from a reader that finds Unix peers itself: what it still
    /// needs; see the module documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lean: Option<Lean>,
}

/// What a reader of [`Request::facts`] that finds Unix peers itself still needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lean {
    /// Each TCP connection's addresses.
    #[serde(default)]
    pub tcp_addresses: bool,
}

impl Request {
    /// A `before-checkpoint` request for cycle `cycle`.
    pub fn before_checkpoint(cycle: impl Into<String>) -> Request {
        Request {
            v: VERSION,
            op: op::BEFORE_CHECKPOINT.into(),
            reason: None,
            cycle: Some(cycle.into()),
            lease_ms: None,
            env: BTreeMap::new(),
            dry_run: false,
            facts: false,
            lean: None,
        }
    }

    /// This request with a lease (before-checkpoint); see the module documentation.
    pub fn with_lease(mut self, lease: std::time::Duration) -> Request {
        self.lease_ms = Some(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// These settings for the restored process (after-restore only); see
    /// `RestoreInfo::env`.
    pub fn with_env(mut self, env: BTreeMap<String, String>) -> Request {
        self.env = env;
        self
    }

    /// An `after-restore` request with `reason`, optionally for one cycle only.
    pub fn after_restore(reason: crac_core::RestoreReason, cycle: Option<String>) -> Request {
        Request {
            v: VERSION,
            op: op::AFTER_RESTORE.into(),
            reason: Some(reason.as_str().into()),
            cycle,
            lease_ms: None,
            env: BTreeMap::new(),
            dry_run: false,
            facts: false,
            lean: None,
        }
    }

    /// A `descriptors` request: the state, and the process's descriptors.
    pub fn descriptors() -> Request {
        Request {
            op: op::DESCRIPTORS.into(),
            ..Request::status()
        }
    }

    /// A `status` request.
    pub fn status() -> Request {
        Request {
            v: VERSION,
            op: op::STATUS.into(),
            reason: None,
            cycle: None,
            lease_ms: None,
            env: BTreeMap::new(),
            dry_run: false,
            facts: false,
            lean: None,
        }
    }

    /// The request as one line, `\n` included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a request always serialises");
        line.push('\n');
        line
    }
}

/// The names of the operations.
pub mod op {
    /// Run every `before_checkpoint`.
    pub const BEFORE_CHECKPOINT: &str = "before-checkpoint";
    /// Run every `after_restore` with a reason.
    pub const AFTER_RESTORE: &str = "after-restore";
    /// Report the agent's state.
    pub const STATUS: &str = "status";
    /// Report the agent's state and its process's descriptors.
    pub const DESCRIPTORS: &str = "descriptors";
}

/// The words of [`Reply::code`]. Readers must treat a word they do not know by `ok` alone.
pub mod code {
    /// `ok`: a before-checkpoint of the cycle already pending; nothing was run again.
    pub const ALREADY: &str = "already";
    /// The request could not be read, or is not a valid request.
    pub const BAD_REQUEST: &str = "bad-request";
    /// The peer may not control this process.
    pub const PERMISSION_DENIED: &str = "permission-denied";
    /// A before-checkpoint while another checkpoint is pending.
    pub const BUSY: &str = "busy";
    /// An after-restore with no checkpoint pending (it ended already, or never began).
    pub const NOT_CHECKPOINTING: &str = "not-checkpointing";
    /// An after-restore for another cycle than the pending one.
    pub const CYCLE_MISMATCH: &str = "cycle-mismatch";
    /// The request ran and failed: a checkpoint refused and rolled back (a hook failed, or
    /// critical sections were held too long), or an after_restore hook that failed.
    pub const FAILED: &str = "failed";
}

/// A reply line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The protocol version.
    pub v: u32,
    /// Whether the request did what it asked.
    pub ok: bool,
    /// The request's operation, or `""` if the request could not be read.
    #[serde(default)]
    pub op: String,
    /// The process the agent runs in.
    #[serde(default)]
    pub pid: u32,
    /// `idle` or `checkpointing`.
    #[serde(default)]
    pub state: String,
    /// Completed checkpoints in this process's history.
    #[serde(default)]
    pub generation: u64,
    /// The pending checkpoint's cycle token, if any.
    #[serde(default)]
    pub cycle: Option<String>,
    /// The registered resources, in `after_restore` order.
    #[serde(default)]
    pub resources: Vec<String>,
    /// When the process last came back from a checkpoint, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub last_restore_unix_ms: Option<u64>,
    /// Every hook the request ran, in order.
    #[serde(default)]
    pub hooks: Vec<HookReport>,
    /// What went wrong, when `ok` is false.
    #[serde(default)]
    pub error: Option<String>,
    /// What happened as one of the words in [`code`], when it is not plain success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// How the last cycle ended (`restored`, `resumed` or `aborted`), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycle: Option<String>,
    /// The hooks of the last cycle that failed (both phases): what `crac status` and `crac ps`
    /// show after the fact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_failures: Vec<HookReport>,
    /// What the process's descriptor policy closed once the before-checkpoint hooks had run
    /// (would close, in a dry run), one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closed: Vec<crate::fd_policy::Descriptor>,
    /// The process's descriptors (`descriptors` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub descriptors: Vec<crate::fd_policy::Descriptor>,
    /// What the preflight must know about the process's descriptors (a successful
    /// before-checkpoint that asked for [`Request::facts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<crate::fd_facts::Facts>,
}

impl Reply {
    /// The reply as one line, `\n` included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a reply always serialises");
        line.push('\n');
        line
    }
}

/// One hook's outcome in a reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    /// The resource's name.
    pub resource: String,
    /// `before_checkpoint` or `after_restore`.
    pub phase: String,
    /// How long the hook ran, in microseconds.
    pub duration_us: u64,
    /// How it failed, if it did.
    pub error: Option<String>,
}

impl From<&crac_core::HookRecord> for HookReport {
    fn from(record: &crac_core::HookRecord) -> HookReport {
        HookReport {
            resource: record.resource().to_owned(),
            phase: record.phase().as_str().to_owned(),
            duration_us: u64::try_from(record.duration().as_micros()).unwrap_or(u64::MAX),
            error: record.failure().map(|f| f.to_string()),
        }
    }
}
