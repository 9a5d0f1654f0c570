//! The agent's wire protocol, between `crac-action` (or any client) and the agent.
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
//! {"v":1,"op":"listeners"}
//! {"v":1,"op":"retire"}
//! ```
//!
//! - `v`: the protocol version, [`VERSION`]. A request with another version is refused.
//! - `op`: `before-checkpoint`, `after-restore`, `status` or `descriptors` (the status and
//!   every descriptor of the process: number, kind, path or addresses, and where the agent can
//!   tell, `owner`: `{"resource":"db","how":"declared"}` for one the resource declares,
//!   `"how":"after_restore"` for one that appeared while its `after_restore` ran and is still
//!   the same file, most likely its own), `listeners` or `retire` (below). A before-checkpoint from a client
//!   that has already closed its connection is not run: nobody could hear that it was.
//! - `listeners` (`crac upgrade`): the listening sockets the service shares with a successor
//!   (`crac_agent::upgrade::share_listener`), by name in `listeners`, the descriptors
//!   themselves passed with the reply line (`SCM_RIGHTS`, in the same order). A service that
//!   shares none answers with none: its consent is the sharing.
//! - `retire` (`crac upgrade`, once the successor is ready): the process's retire phase
//!   (`crac_core::Coordinator::retire`: draining on, every retire hook run, the application
//!   told to finish what it has and exit). Failed hooks are named in `error`; the phase runs
//!   once. Code `unheard` (with `ok`): nothing in the service listens for retirement, so it
//!   will not go by itself (`crac upgrade` then sends it SIGTERM).
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
//!   (see [`Code`]): `already` (ok: a before-checkpoint of the cycle already pending, nothing run
//!   again), `unheard` (ok: a retire nothing in the service listens for), `bad-request`, `permission-denied`, `busy`, `not-checkpointing`, `cycle-mismatch`,
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
//!
//! # Types
//!
//! A request is a [`Request`]: the version and an [`Op`], a `#[serde(tag = "op")]` enum whose
//! variants carry their own fields ([`BeforeCheckpoint`], [`AfterRestore`]). The words on the
//! wire are typed ([`Reason`], [`Phase`], [`State`], [`Code`], [`OpName`]), and each keeps a
//! word it does not know as `Unknown(word)`, so that peers of different versions still read
//! each other: an agent tells an unknown op or reason by name, a client reads a new code by
//! `ok` alone. The words mirror crac-core's (`crac_core::RestoreReason`, `crac_core::Phase`,
//! `crac_core::CycleState`) and are converted by word where the agent meets
//! crac-core, so that this crate does not depend on the service's library.
//!
//! Reading a request goes through the flat record the protocol has always had
//! (`WireRequest`), so that a malformed line is refused with the same words as before, and a
//! field an op does not use is ignored, as any unknown field is.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;

/// The longest request line the agent reads, newline included.
pub const MAX_REQUEST_LEN: usize = 4096;

/// How long a client has, from connecting, to send its whole request line.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Declares a typed word of the protocol: an enum of the known words and `Unknown(String)`,
/// written and read as the word itself.
macro_rules! words {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $word:literal, )+ }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A word this version does not know, as it was sent.
            Unknown(String),
        }

        impl $name {
            /// The word on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $word, )+
                    $name::Unknown(word) => word,
                }
            }
        }

        impl From<&str> for $name {
            fn from(word: &str) -> $name {
                match word {
                    $( $word => $name::$variant, )+
                    other => $name::Unknown(other.to_owned()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, word: &str) -> bool {
                self.as_str() == word
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, word: &&str) -> bool {
                self.as_str() == *word
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                let word = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Ok($name::from(&*word))
            }
        }
    };
}

words! {
    /// Why an after-restore is sent, and how a cycle ended (`crac_core::RestoreReason`'s
    /// words).
    Reason {
        /// The process was restored from an image.
        Restored => "restored",
        /// The dump succeeded and the process kept running.
        Resumed => "resumed",
        /// No image was made: the checkpoint was called off.
        Aborted => "aborted",
    }
}

words! {
    /// Which phase a hook ran in (`crac_core::Phase`'s words).
    Phase {
        /// Before the checkpoint.
        BeforeCheckpoint => "before_checkpoint",
        /// After the restore (or the abort, or the resume).
        AfterRestore => "after_restore",
    }
}

words! {
    /// The agent's state after a request (`crac_core::CycleState`'s words).
    State {
        /// No checkpoint pending.
        Idle => "idle",
        /// A checkpoint pending: between a before-checkpoint and its after-restore.
        Checkpointing => "checkpointing",
    }
}

words! {
    /// The operation a reply answers ([`Reply::op`]); `Unknown("")` when the request could
    /// not be read.
    OpName {
        /// [`Op::BeforeCheckpoint`].
        BeforeCheckpoint => "before-checkpoint",
        /// [`Op::AfterRestore`].
        AfterRestore => "after-restore",
        /// [`Op::Status`].
        Status => "status",
        /// [`Op::Descriptors`].
        Descriptors => "descriptors",
        /// [`Op::Listeners`].
        Listeners => "listeners",
        /// [`Op::Retire`].
        Retire => "retire",
    }
}

impl Default for OpName {
    /// A request that could not be read: `""`.
    fn default() -> OpName {
        OpName::Unknown(String::new())
    }
}

impl Default for State {
    /// `""`: what a reply without a state reads as.
    fn default() -> State {
        State::Unknown(String::new())
    }
}

words! {
    /// What happened, as one word a program can test ([`Reply::code`]), when it is not plain
    /// success. Readers must treat a word they do not know (`Unknown`) by `ok` alone.
    Code {
        /// `ok`: a before-checkpoint of the cycle already pending; nothing was run again.
        Already => "already",
        /// `ok`: a retire that ran, but nothing in the service listens for it (no retire hook,
        /// nobody waiting): it will not go by itself.
        Unheard => "unheard",
        /// The request could not be read, or is not a valid request.
        BadRequest => "bad-request",
        /// The peer may not control this process.
        PermissionDenied => "permission-denied",
        /// A before-checkpoint while another checkpoint is pending.
        Busy => "busy",
        /// An after-restore with no checkpoint pending (it ended already, or never began).
        NotCheckpointing => "not-checkpointing",
        /// An after-restore for another cycle than the pending one.
        CycleMismatch => "cycle-mismatch",
        /// The request ran and failed: a checkpoint refused and rolled back (a hook failed, or
        /// critical sections were held too long), or an after_restore hook that failed.
        Failed => "failed",
    }
}

/// A request line: the protocol version and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WireRequest")]
pub struct Request {
    /// The protocol version.
    pub v: u32,
    /// What to do, with its fields.
    #[serde(flatten)]
    pub op: Op,
}

/// What a request asks, by its `op` word.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Op {
    /// Run every `before_checkpoint`.
    BeforeCheckpoint(BeforeCheckpoint),
    /// Run every `after_restore` with a reason.
    AfterRestore(AfterRestore),
    /// Report the agent's state.
    Status,
    /// Report the agent's state and its process's descriptors.
    Descriptors,
    /// Pass the listening sockets the service shares with a successor.
    Listeners,
    /// Begin the process's retire phase.
    Retire,
    /// An op this version does not know, by its word (the agent refuses it by name).
    #[serde(untagged)]
    Unknown {
        /// The word.
        op: String,
    },
}

impl Op {
    /// The op's word.
    pub fn name(&self) -> OpName {
        match self {
            Op::BeforeCheckpoint(_) => OpName::BeforeCheckpoint,
            Op::AfterRestore(_) => OpName::AfterRestore,
            Op::Status => OpName::Status,
            Op::Descriptors => OpName::Descriptors,
            Op::Listeners => OpName::Listeners,
            Op::Retire => OpName::Retire,
            Op::Unknown { op } => OpName::from(op.as_str()),
        }
    }
}

/// The fields of a `before-checkpoint`; see the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BeforeCheckpoint {
    /// The cycle token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycle: Option<String>,
    /// How long it may stay pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// A dry run: the hooks run, but the descriptors the process's policy would close are
    /// only listed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Send, with the reply, what the preflight must know about the process's descriptors
    /// ([`Reply::facts`]), found once the hooks have run and the descriptor policy has closed
    /// what it closes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub facts: bool,
    /// With `facts`, from a reader that finds Unix peers itself: what it still needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lean: Option<Lean>,
}

/// The fields of an `after-restore`; see the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AfterRestore {
    /// Why: `restored`, `resumed` or `aborted`; the agent refuses a request without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The cycle token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycle: Option<String>,
    /// Settings for the restored process, handed to the hooks as `RestoreInfo::env`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// A request line as it is read: the flat record of every field any op takes.
#[derive(Deserialize)]
struct WireRequest {
    v: u32,
    op: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    cycle: Option<String>,
    #[serde(default)]
    lease_ms: Option<u64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    facts: bool,
    #[serde(default)]
    lean: Option<Lean>,
}

impl From<WireRequest> for Request {
    fn from(wire: WireRequest) -> Request {
        let op = match OpName::from(wire.op.as_str()) {
            OpName::BeforeCheckpoint => Op::BeforeCheckpoint(BeforeCheckpoint {
                cycle: wire.cycle,
                lease_ms: wire.lease_ms,
                dry_run: wire.dry_run,
                facts: wire.facts,
                lean: wire.lean,
            }),
            OpName::AfterRestore => Op::AfterRestore(AfterRestore {
                reason: wire.reason.as_deref().map(Reason::from),
                cycle: wire.cycle,
                env: wire.env,
            }),
            OpName::Status => Op::Status,
            OpName::Descriptors => Op::Descriptors,
            OpName::Listeners => Op::Listeners,
            OpName::Retire => Op::Retire,
            OpName::Unknown(op) => Op::Unknown { op },
        };
        Request { v: wire.v, op }
    }
}

/// What a reader of [`BeforeCheckpoint::facts`] that finds Unix peers itself still needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
            op: Op::BeforeCheckpoint(BeforeCheckpoint {
                cycle: Some(cycle.into()),
                ..BeforeCheckpoint::default()
            }),
        }
    }

    /// This request with a lease (before-checkpoint); see the module documentation.
    pub fn with_lease(mut self, lease: std::time::Duration) -> Request {
        if let Op::BeforeCheckpoint(before) = &mut self.op {
            before.lease_ms = Some(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        }
        self
    }

    /// This request asking for the facts or not (before-checkpoint); see
    /// [`BeforeCheckpoint::facts`].
    pub fn with_facts(mut self, facts: bool) -> Request {
        if let Op::BeforeCheckpoint(before) = &mut self.op {
            before.facts = facts;
        }
        self
    }

    /// This request from a reader that finds Unix peers itself (before-checkpoint); see
    /// [`BeforeCheckpoint::lean`].
    pub fn with_lean(mut self, lean: Lean) -> Request {
        if let Op::BeforeCheckpoint(before) = &mut self.op {
            before.lean = Some(lean);
        }
        self
    }

    /// This request as a dry run (before-checkpoint); see [`BeforeCheckpoint::dry_run`].
    pub fn with_dry_run(mut self, dry_run: bool) -> Request {
        if let Op::BeforeCheckpoint(before) = &mut self.op {
            before.dry_run = dry_run;
        }
        self
    }

    /// These settings for the restored process (after-restore only); see
    /// `RestoreInfo::env`.
    pub fn with_env(mut self, env: BTreeMap<String, String>) -> Request {
        if let Op::AfterRestore(after) = &mut self.op {
            after.env = env;
        }
        self
    }

    /// An `after-restore` request with `reason`, optionally for one cycle only.
    pub fn after_restore(reason: Reason, cycle: Option<String>) -> Request {
        Request {
            v: VERSION,
            op: Op::AfterRestore(AfterRestore {
                reason: Some(reason),
                cycle,
                env: BTreeMap::new(),
            }),
        }
    }

    /// A `descriptors` request: the state, and the process's descriptors.
    pub fn descriptors() -> Request {
        Request {
            v: VERSION,
            op: Op::Descriptors,
        }
    }

    /// A `listeners` request: the listening sockets the service shares.
    pub fn listeners() -> Request {
        Request {
            v: VERSION,
            op: Op::Listeners,
        }
    }

    /// A `retire` request: the process's retire phase.
    pub fn retire() -> Request {
        Request {
            v: VERSION,
            op: Op::Retire,
        }
    }

    /// A `status` request.
    pub fn status() -> Request {
        Request {
            v: VERSION,
            op: Op::Status,
        }
    }

    /// The request's cycle token, if its op takes one and it has one.
    pub fn cycle(&self) -> Option<&str> {
        match &self.op {
            Op::BeforeCheckpoint(before) => before.cycle.as_deref(),
            Op::AfterRestore(after) => after.cycle.as_deref(),
            _ => None,
        }
    }

    /// The request as one line, `\n` included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a request always serialises");
        line.push('\n');
        line
    }
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
    pub op: OpName,
    /// The process the agent runs in.
    #[serde(default)]
    pub pid: u32,
    /// `idle` or `checkpointing`.
    #[serde(default)]
    pub state: State,
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
    /// What happened, when it is not plain success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
    /// How the last cycle ended (`restored`, `resumed` or `aborted`), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycle: Option<Reason>,
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
    /// The names of the listening sockets passed with the reply (`listeners` only), in the
    /// order of the descriptors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<String>,
    /// What the preflight must know about the process's descriptors (a successful
    /// before-checkpoint that asked for [`BeforeCheckpoint::facts`]).
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
    pub phase: Phase,
    /// How long the hook ran, in microseconds.
    pub duration_us: u64,
    /// How it failed, if it did.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines as the protocol's version 1 has always written them (before the messages
    /// were typed): peers of either kind must read each other.
    #[test]
    fn requests_are_written_as_version_1_always_wrote_them() {
        let lease = std::time::Duration::from_secs(40);
        let cases = [
            (
                Request::before_checkpoint("criu-4242").with_lease(lease),
                r#"{"v":1,"op":"before-checkpoint","cycle":"criu-4242","lease_ms":40000}"#,
            ),
            (
                Request::before_checkpoint("c")
                    .with_lease(lease)
                    .with_facts(false)
                    .with_lean(Lean::default()),
                r#"{"v":1,"op":"before-checkpoint","cycle":"c","lease_ms":40000,"lean":{"tcp_addresses":false}}"#,
            ),
            (
                Request::before_checkpoint("c")
                    .with_dry_run(true)
                    .with_facts(true)
                    .with_lean(Lean {
                        tcp_addresses: true,
                    }),
                r#"{"v":1,"op":"before-checkpoint","cycle":"c","dry_run":true,"facts":true,"lean":{"tcp_addresses":true}}"#,
            ),
            (
                Request::after_restore(Reason::Restored, Some("criu-4242".into()))
                    .with_env([("LOG_LEVEL".to_owned(), "debug".to_owned())].into()),
                r#"{"v":1,"op":"after-restore","reason":"restored","cycle":"criu-4242","env":{"LOG_LEVEL":"debug"}}"#,
            ),
            (
                Request::after_restore(Reason::Aborted, None),
                r#"{"v":1,"op":"after-restore","reason":"aborted"}"#,
            ),
            (Request::status(), r#"{"v":1,"op":"status"}"#),
            (Request::descriptors(), r#"{"v":1,"op":"descriptors"}"#),
            (Request::listeners(), r#"{"v":1,"op":"listeners"}"#),
            (Request::retire(), r#"{"v":1,"op":"retire"}"#),
        ];
        for (request, line) in cases {
            assert_eq!(request.to_line(), format!("{line}\n"));
            let read: Request = serde_json::from_str(line).unwrap();
            assert_eq!(read, request, "{line}");
        }
    }

    #[test]
    fn unknown_ops_and_words_are_kept_by_name() {
        let read: Request = serde_json::from_str(r#"{"v":1,"op":"explode","x":1}"#).unwrap();
        assert_eq!(
            read.op,
            Op::Unknown {
                op: "explode".into()
            }
        );
        assert_eq!(read.op.name(), "explode");
        assert_eq!(read.to_line(), "{\"v\":1,\"op\":\"explode\"}\n");
        let read: Request =
            serde_json::from_str(r#"{"v":1,"op":"after-restore","reason":"later"}"#).unwrap();
        let Op::AfterRestore(after) = &read.op else {
            panic!("{read:?}");
        };
        assert_eq!(after.reason, Some(Reason::Unknown("later".into())));
        // A field another op takes is ignored, as any unknown field is.
        let read: Request =
            serde_json::from_str(r#"{"v":1,"op":"status","cycle":"c","lease_ms":5}"#).unwrap();
        assert_eq!(read, Request::status());
        // A reply with words of a later version reads, and is written back as it came.
        let line = r#"{"v":1,"ok":false,"op":"migrate","pid":7,"state":"moving","generation":0,"cycle":null,"resources":[],"last_restore_unix_ms":null,"hooks":[{"resource":"db","phase":"during_move","duration_us":3,"error":null}],"error":"no","code":"too-far","last_cycle":"migrated"}"#;
        let reply: Reply = serde_json::from_str(line).unwrap();
        assert_eq!(reply.code, Some(Code::Unknown("too-far".into())));
        assert_eq!(reply.state, State::Unknown("moving".into()));
        assert_eq!(reply.op, OpName::Unknown("migrate".into()));
        assert_eq!(reply.hooks[0].phase, Phase::Unknown("during_move".into()));
        assert_eq!(reply.last_cycle, Some(Reason::Unknown("migrated".into())));
        assert_eq!(reply.to_line(), format!("{line}\n"));
    }

    #[test]
    fn known_words_are_typed_and_written_as_before() {
        let line = r#"{"v":1,"ok":true,"op":"before-checkpoint","pid":4242,"state":"checkpointing","generation":0,"cycle":"c","resources":["upstream"],"last_restore_unix_ms":null,"hooks":[{"resource":"upstream","phase":"before_checkpoint","duration_us":41,"error":null}],"error":null,"code":"already","last_cycle":"resumed"}"#;
        let reply: Reply = serde_json::from_str(line).unwrap();
        assert_eq!(reply.op, OpName::BeforeCheckpoint);
        assert_eq!(reply.state, State::Checkpointing);
        assert_eq!(reply.code, Some(Code::Already));
        assert_eq!(reply.hooks[0].phase, Phase::BeforeCheckpoint);
        assert_eq!(reply.last_cycle, Some(Reason::Resumed));
        assert_eq!(reply.to_line(), format!("{line}\n"));
        // A request that could not be read is answered with an empty op.
        assert!(Reply::default()
            .to_line()
            .contains(r#""op":"","pid":0,"state":"""#));
    }

    #[test]
    fn malformed_requests_are_refused_in_the_same_words() {
        for (line, expected) in [
            (r#"{"v":1}"#, "missing field `op`"),
            (r#"{"op":"status"}"#, "missing field `v`"),
            ("not json", "expected ident"),
            (
                r#"{"v":1,"op":7}"#,
                "invalid type: integer `7`, expected a string",
            ),
            (
                r#"{"v":1,"op":"before-checkpoint","lease_ms":"x"}"#,
                "invalid type: string \"x\", expected u64",
            ),
        ] {
            let err = serde_json::from_str::<Request>(line)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{line}: {err}");
        }
    }
}
