//! End-to-end tests against a real CRIU. Those that need root and CRIU >= 4.2 (see
//! scripts/provision-criu.sh), or runc, podman or PostgreSQL besides, are marked
//! `#[ignore = "needs ..."]`: a plain `cargo test` reports them as ignored, and
//! `scripts/test.sh` runs them with `--include-ignored`. Run so, in CI (CI=true) a missing CRIU
//! fails them, elsewhere they skip with a line saying how to enable them. They run one at a
//! time: each dumps and restores whole process trees.

mod action;
mod agent_folders;
mod archives;
mod async_faults;
mod container_image;
mod containers;
mod crac_cli;
mod docker;
mod drain;
mod faults;
mod files;
mod hostile_output;
mod image_trust;
mod lazy;
mod migrate;
mod migrate_container;
mod namespaces;
mod nothing_lost;
mod oci;
mod postgres;
mod preflight;
mod restore_config;
mod signals;
mod soak;
mod sockets;
mod spine;
mod twice;
mod upgrade;
mod util;
