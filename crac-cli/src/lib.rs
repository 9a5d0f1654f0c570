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
//! The modules: [`driver`] runs `criu dump` and `criu restore` and turns their outcome into a
//! report or an error that says what happened to the service (an image CRIU made is never
//! discarded); [`locate`] finds a working CRIU (>= 4.2); [`store`] keeps the operator's images
//! by name and files the images of interrupted checkpoints; [`metadata`] reads, writes and
//! checks the `crac-meta.json` beside each image (schema, integrity, validation), with the
//! SHA-256 of every image file and of the executable; [`hashing`] is SHA-256 for all of them; [`archive`] exports an image to one file and imports it on another
//! machine; [`stats`] reads CRIU's own figures from an image.
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

pub mod archive;
pub mod cpu;
pub mod driver;
pub mod hashing;
pub mod lazy;
pub mod locate;
pub mod metadata;
pub mod stats;
pub mod store;
pub mod units;
