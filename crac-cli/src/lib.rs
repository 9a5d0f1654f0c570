//! `crac-cli`: the operator's `crac` command and the library it runs on.
//!
//! crac-rs has four roles, one crate each: crac-core is the API (resources, contexts,
//! ordering, rollback), crac-agent the in-process agent a service starts, crac-action the
//! action script CRIU runs at each step, and this crate the operator's command, `crac`: it runs
//! CRIU with crac-action as the action script, keeps images by name with their metadata, checks
//! them before a restore, and exports and imports them. It uses crac-action's library for what
//! the two share: finding a process tree's agents across namespaces and reading what the
//! action script recorded in an image.
//!
//! # Anatomy of the crate
//!
//! - The two operations, each a pipeline of named steps: [`checkpoint`] (read the service,
//!   prepare the destination, write the pending metadata, dump, hash, write the metadata, file;
//!   an image CRIU made is never discarded) and [`restore`] (validate, build CRIU's command
//!   line, run it, read the outcome).
//! - Running CRIU: [`criu`] builds every CRIU command line crac runs ([`criu::CriuCommand`])
//!   and says what running CRIU needs; [`locate`] finds a working CRIU (>= 4.2);
//!   [`diagnosis`] turns CRIU's log into what went wrong and what to do; [`stats`] reads
//!   CRIU's own figures from an image; [`lazy`] runs CRIU's page server for lazy restores.
//! - Reporting: [`error`] is the operator's error type ([`error::OpError`], whose
//!   [`error::FailureKind`] decides `crac`'s exit code); [`progress`] what an operation is
//!   doing; [`units`] sizes as people read them.
//! - Images: [`store`] keeps the operator's images by name and files the images of
//!   interrupted checkpoints; [`metadata`] reads, writes and checks the `crac-meta.json` beside
//!   each image (schema, integrity, validation); [`hashing`] is SHA-256, for all of them;
//!   [`archive`] exports an image to one file and imports it on another machine; [`cpu`] the
//!   CPU features a restore needs, [`capabilities`] the capabilities.
//! - The service: [`process`] reads what a checkpoint needs of it from `/proc`.
//! - Moving it: [`migrate`] runs a live migration to another host (`crac migrate`), both ends
//!   over one authenticated, sealed connection.
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

pub mod activation;
pub mod archive;
pub mod capabilities;
pub mod checkpoint;
pub mod cpu;
pub mod criu;
pub mod diagnosis;
pub mod error;
pub mod hashing;
pub mod lazy;
pub mod locate;
mod lock;
pub mod metadata;
pub mod migrate;
pub mod process;
pub mod progress;
pub mod restore;
pub mod stats;
pub mod store;
pub mod units;
