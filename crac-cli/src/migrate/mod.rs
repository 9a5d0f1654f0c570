//! Live migration: a running service moved to another host, `crac migrate` (the source,
//! [`source::migrate`]) and `crac migrate --receive` (the destination, [`receive::receive`]).
//!
//! The two ends talk over one TCP connection, authenticated both ways and sealed
//! ([`channel`]). In order:
//!
//! 1. The source offers the service (its pids, memory, CPU features, CRIU, its address); the
//!    destination checks that it could run it ([`checks`]) and answers with what it lacks.
//!    A refusal ends the migration there: nothing was stopped.
//! 2. The source checkpoints the service into its own store (crac's checkpoint, with the
//!    hooks: a failure rolls it back and it runs on) and streams the image.
//! 3. The destination files it in its store and validates it (metadata, hashes, pids), and
//!    says it is ready. Any failure so far: the source restores the service from its image.
//! 4. The source releases the service address and says go; the destination takes the
//!    address, restores, runs the operator's hook and confirms. A destination that fails to
//!    restore gives the address back and says so, and the source restores.
//! 5. On the confirmation the source removes its image and what CRIU's network lock left in
//!    its network namespace ([`net`]). Until then it keeps the image: the service is never
//!    lost. If the link fails between "go" and the confirmation, the source cannot know whether
//!    the destination restored; it restores nothing (never two copies) and keeps the image,
//!    saying so.
//!
//! A podman container moves whole the same way ([`container`]): podman checkpoints it (crac's
//! hooks run through crac-action, named by the container's CRIU configuration) into an archive
//! that is streamed, and the destination's podman restores it from that archive. Stop-and-copy
//! only: podman passes CRIU no lazy-pages or page-server options.
//!
//! Strategy: stop-and-copy (the service is down from the dump until the restore at the
//! destination). Pre-copy needs the kernel's memory tracking (`crac check` says whether it
//! has it).

pub mod channel;
pub mod checks;
pub mod container;
pub mod net;
pub mod pipes;
pub mod podman;
pub mod receive;
pub mod relay;
pub mod source;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{FailureKind, OpError};

/// What the source tells the destination about the service before anything is stopped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Offer {
    /// The protocol's version (1).
    pub version: u32,
    /// The strategy (`stop-and-copy`).
    pub strategy: String,
    /// The service's pids (root first), which it needs back at the destination.
    pub pids: Vec<u32>,
    /// Its resident memory, bytes: roughly the image's size, and the memory it takes.
    pub resident_bytes: u64,
    /// The source's CPU features (see [`crate::cpu`]).
    pub cpu_features: Vec<String>,
    /// The source's CRIU version.
    pub criu_version: String,
    /// The source's kernel release and architecture.
    pub kernel: String,
    /// The source's architecture.
    pub arch: String,
    /// The service address that moves with it (`10.0.0.5/32`), if any.
    pub address: Option<String>,
    /// The TCP addresses it listens on (`IP:PORT`).
    pub listening: Vec<String>,
    /// A podman container moved whole (`crac migrate --container`), if that is what is
    /// offered: then the pids are empty unless it shares the host's pid namespace, and the
    /// listening addresses unless it shares the host's network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Box<ContainerOffer>>,
}

/// The podman container a container-level migration offers (see [`container`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerOffer {
    /// Its name, which it keeps at the destination.
    pub name: String,
    /// Its id.
    pub id: String,
    /// Its image, by name.
    pub image: String,
    /// Its image's id: the destination's podman storage must hold it.
    pub image_id: String,
    /// The CRIU configuration file its `org.criu.config` annotation names: the destination
    /// must have one there (naming crac-action) for the hooks to run after the restore.
    pub criu_config: String,
}

/// The messages of a migration after the handshake, in the order they are sent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "message", rename_all = "kebab-case")]
pub enum Message {
    /// Source: the service ([`Offer`]).
    Offer(Offer),
    /// Destination: what it lacks to run it (empty: it can).
    Checked {
        /// Each problem, with what to do.
        problems: Vec<String>,
    },
    /// Source: the image follows, these files with these sizes, each as data frames.
    Image {
        /// The image's name at the source.
        name: String,
        /// (file name, size in bytes), in the order they follow.
        files: Vec<(String, u64)>,
    },
    /// Either end: it gives up, for this reason (nothing of the service runs there).
    Abort {
        /// What went wrong.
        reason: String,
    },
    /// Destination: the image is filed and valid; it is ready to restore.
    Ready,
    /// Source: the address is released; restore.
    Go,
    /// Destination: the service runs here as `pid` (its pid out here).
    Restored {
        /// The restored root.
        pid: u32,
    },
    /// Destination: the restore failed (the address is given back).
    Failed {
        /// What CRIU said.
        reason: String,
    },
    /// Post-copy, either end: this end's CRIU closed its page socket.
    PagesEnd,
    /// Post-copy, destination: every page arrived (`ok`), or not, and the copy here was
    /// killed and the address released.
    PagesDone {
        /// Whether every page arrived.
        ok: bool,
        /// What failed, if anything.
        reason: Option<String>,
    },
}

/// The protocol's version.
pub const VERSION: u32 = 1;
/// The service stops at the dump and runs again once the whole image is at the destination.
pub const STOP_AND_COPY: &str = "stop-and-copy";
/// The service runs at the destination before its memory has arrived: CRIU's lazy pages, the
/// source serving them until the last one is in.
pub const POST_COPY: &str = "post-copy";

/// The pre-shared key both ends read (`--key`), or an error naming the file.
fn read_key(path: &Path) -> Result<channel::Key32, OpError> {
    channel::Key32::read(path).map_err(|e| {
        OpError::new(
            FailureKind::BadInput,
            format!("cannot read the migration key {}: {e}", path.display()),
        )
    })
}
