//! The contracts between crac-rs's parts, in one small crate that each part builds on: a
//! service's agent (crac-agent), CRIU's action script (crac-action) and the operator's command
//! (crac). A change here is a change of what the parts agree on; everything else is one
//! part's own business.
//!
//! # Anatomy
//!
//! - [`wire`]: the agent's protocol, one JSON line each way, typed: [`Request`] (a version and
//!   an [`Op`]) and [`Reply`], with its words ([`Reason`], [`Phase`], [`State`], [`Code`])
//!   tolerant of words a newer peer sends.
//! - [`client`]: the blocking client, one request and one reply bounded in time, as
//!   crac-action and crac use it.
//! - [`location`]: where an agent's socket is, `<base>/<pid>/agent.sock`, and how a folder's
//!   name reads. The agent makes the folders (through crac-fs); this only names them.
//! - [`fd_facts`]: what the preflight must know about a process's descriptors, as an agent
//!   sends it, and how one socket is sorted, alike on both sides.
//! - [`fd_policy`]: the rules of a `CRAC_POLICY` file, and a descriptor as an agent reports it.
//! - [`records`]: the files and variables crac-action leaves for crac: the agents' folders in
//!   an image, pre-dump's report, the settings for restored processes.
//! - [`mod@env`]: every `CRAC_*` variable, one documented constant each.
//!
//! # Example
//!
//! ```
//! use crac_protocol::{Op, Reason, Request};
//!
//! let request = Request::after_restore(Reason::Restored, Some("criu-4242".into()));
//! assert_eq!(
//!     request.to_line(),
//!     "{\"v\":1,\"op\":\"after-restore\",\"reason\":\"restored\",\"cycle\":\"criu-4242\"}\n"
//! );
//! let read: Request = serde_json::from_str("{\"v\":1,\"op\":\"reboot\"}").unwrap();
//! assert_eq!(read.op, Op::Unknown { op: "reboot".into() });
//! ```
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

pub mod client;
pub mod env;
pub mod fd_facts;
pub mod fd_policy;
pub mod location;
pub mod records;
pub mod wire;

pub use client::ClientError;
pub use wire::{
    AfterRestore, BeforeCheckpoint, Code, HookReport, Lean, Op, OpName, Phase, Reason, Reply,
    Request, State, VERSION,
};
