//! A podman container moved whole: `crac migrate --container NAME --to HOST:PORT` at the
//! source, and `crac migrate --receive` at the destination when it is offered a container.
//!
//! The steps are a process's ([module documentation](super)), with podman in CRIU's place:
//!
//! 1. The source offers the container (its image, its CRIU configuration, its memory, and its
//!    pids and ports when it shares the host's); the destination checks, besides what it checks
//!    for a process, that podman runs there, that its storage holds the image, that the name is
//!    free and that the CRIU configuration is there. A refusal stops nothing.
//! 2. `podman container checkpoint --keep --export` at the source: CRIU runs crac-action (the
//!    container's `org.criu.config` names a configuration with `action-script`), so the hooks
//!    run first and a failing one leaves the container running, rolled back. The archive is
//!    streamed over the sealed channel into a working folder of the destination's store.
//! 3. "Go" (the service address released here); `podman container restore --import` there; the
//!    destination confirms, and only then the source removes its stopped container. Any failure
//!    before the confirmation: the source restores its container from the checkpoint podman
//!    kept (`podman container restore NAME`). A link lost after "go" leaves it stopped here,
//!    checkpoint and all, and says how to restore it once the destination has been checked.
//!
//! Stop-and-copy only: podman passes CRIU no lazy-pages or page-server options, so its
//! memory cannot follow the container lazily.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::channel::Channel;
use super::net::{self, ServiceAddress};
use super::podman::{criu_config_problem, Container, Podman, CRIU_CONFIG_ANNOTATION};
use super::receive::{ReceiveOutcome, ReceiveRequest};
use super::source::{MigrateOutcome, RESTORE_WAIT};
use super::{checks, ContainerOffer, Message, Offer, POST_COPY, STOP_AND_COPY, VERSION};
use crate::criu::require_root;
use crate::error::{FailureKind, OpError};
use crate::store::Store;
use crate::units::ms;

/// The one file a container's migration sends: podman's checkpoint archive.
const ARCHIVE: &str = "checkpoint.tar";

/// A container's migration to run from this host.
#[derive(Clone, Debug)]
pub struct ContainerRequest {
    /// The podman container's name (or id).
    pub name: String,
    /// Where the destination (`crac migrate --receive`) listens.
    pub to: SocketAddr,
    /// The strategy asked for: only [`STOP_AND_COPY`] can move a container.
    pub strategy: String,
    /// The pre-shared key's file (private to its owner).
    pub key: PathBuf,
    /// This host's store: the archive is made in a working folder there.
    pub store: Store,
    /// The service address that moves with it (a container on the host's network).
    pub address: Option<ServiceAddress>,
    /// How long a silent link is waited for before it counts as cut.
    pub link_timeout: Duration,
    /// Global options for podman (its storage, runtime, ...).
    pub podman_args: Vec<String>,
}

/// Moves the container `request.name` to the destination; `notice` is told what is worth
/// knowing on the way.
///
/// # Errors
///
/// Before the checkpoint: the container runs on, untouched or rolled back by its hooks. After
/// it: the container was restored here ([`FailureKind::Failed`]), or it is kept stopped here
/// with its checkpoint and the message says why and how to restore it
/// ([`FailureKind::ImageKept`]).
pub fn migrate(
    request: &ContainerRequest,
    notice: &mut dyn FnMut(&str),
) -> Result<MigrateOutcome, OpError> {
    let started = Instant::now();
    require_root("migrate --container")?;
    if request.strategy == POST_COPY {
        return Err(OpError::new(
            FailureKind::Unavailable,
            "a container cannot move post-copy: podman passes CRIU no lazy-pages or page-server options (runc has them, podman does not use them), so its memory cannot follow it lazily; move it with --strategy stop-and-copy (nothing was stopped)",
        ));
    }
    let podman = Podman::new(request.podman_args.clone());
    let container = podman.inspect(&request.name).map_err(|e| {
        OpError::new(
            FailureKind::BadInput,
            format!("no podman container {} here ({e}): see podman ps, and give podman's storage options with --podman-arg if it keeps its containers elsewhere", request.name),
        )
    })?;
    if container.state != "running" || container.pid == 0 {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!(
                "the container {} is not running ({}): there is nothing to move",
                container.name, container.state
            ),
        ));
    }
    let criu_config = container.criu_config.clone().ok_or_else(|| {
        OpError::new(
            FailureKind::BadInput,
            format!(
                "the container {} has no {CRIU_CONFIG_ANNOTATION} annotation: podman would checkpoint it without crac's hooks; run it with one that names a CRIU configuration whose action-script is crac-action (podman run --annotation {CRIU_CONFIG_ANNOTATION}=/etc/crac/criu-runc.conf ..., see docs/containers.md); nothing was stopped",
                container.name
            ),
        )
    })?;
    if let Some(problem) = criu_config_problem(&criu_config) {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!("{problem}; nothing was stopped"),
        ));
    }
    let key = super::read_key(&request.key)?;
    let device = super::source::address_device(request.address)?;
    let mut channel = super::source::connect_and_offer(
        request.to,
        &key,
        request.link_timeout,
        offer(&container, &criu_config, request.address)?,
    )?;
    // The freeze: podman's checkpoint, crac's hooks first (crac-action under runc).
    let staging = request
        .store
        .begin_import(&format!("migrate-container-{}", now_ms()))
        .map_err(|e| OpError::new(FailureKind::Unavailable, e.to_string()))?;
    let archive = staging.path().join(ARCHIVE);
    let dump_started = Instant::now();
    if let Err(lines) = podman.checkpoint_export(&container.name, &archive) {
        let _ = channel.send(&Message::Abort {
            reason: lines[0].clone(),
        });
        return Err(checkpoint_failed(&podman, &container, lines));
    }
    let dump_ms = ms(dump_started.elapsed());
    let frozen = Stopped {
        request,
        podman: &podman,
        name: &container.name,
        device,
    };
    let image_bytes = std::fs::metadata(&archive).map(|m| m.len()).unwrap_or(0);
    let files = [(ARCHIVE.to_owned(), image_bytes)];
    if let Err(e) = super::source::send_files(&mut channel, staging.path(), &container.name, &files)
    {
        return Err(frozen.restore_here(&format!("the archive could not be sent ({e})")));
    }
    match channel.recv::<Message>() {
        Ok(Message::Ready) => {}
        Ok(Message::Abort { reason }) => {
            return Err(frozen.restore_here(&format!("the destination gave up: {reason}")))
        }
        Ok(other) => {
            return Err(frozen.restore_here(&super::source::unexpected(&other).to_string()))
        }
        Err(e) => {
            return Err(frozen.restore_here(&format!("the link failed during the transfer ({e})")))
        }
    }
    if let (Some(address), Some(device)) = (request.address, &frozen.device) {
        if let Err(e) = net::release(address, device) {
            return Err(
                frozen.restore_here(&format!("the service address could not be released: {e}"))
            );
        }
    }
    if let Err(e) = channel.send(&Message::Go) {
        frozen.take_address_back(notice);
        return Err(frozen.restore_here(&format!(
            "the link failed before the destination was told to restore ({e})"
        )));
    }
    let _ = channel.set_timeout(RESTORE_WAIT.max(request.link_timeout));
    match channel.recv::<Message>() {
        Ok(Message::Restored { pid }) => {
            let downtime_ms = ms(dump_started.elapsed());
            // It runs there: the stopped container here goes, with its checkpoint.
            if let Err(e) = podman.remove(&container.name) {
                notice(&format!(
                    "the container runs at {}, but the stopped one could not be removed here: {e}",
                    request.to
                ));
            }
            Ok(MigrateOutcome {
                strategy: STOP_AND_COPY.to_owned(),
                pid,
                downtime_ms,
                dump_ms,
                total_ms: ms(started.elapsed()),
                bytes_sent: channel.bytes_sent(),
                image_bytes,
                lock_rules_removed: 0,
            })
        }
        Ok(Message::Failed { reason }) => {
            frozen.take_address_back(notice);
            Err(frozen.restore_here(&format!("the destination could not restore it: {reason}")))
        }
        Ok(other) => Err(frozen.unknown(&super::source::unexpected(&other).to_string())),
        Err(e) => Err(frozen.unknown(&e.to_string())),
    }
}

/// What the source tells the destination about the container.
fn offer(
    container: &Container,
    criu_config: &str,
    address: Option<ServiceAddress>,
) -> Result<Offer, OpError> {
    let mut pids = crac_action::tree::descendants(container.pid);
    if !pids.contains(&container.pid) {
        pids.insert(0, container.pid);
    }
    let criu = crate::criu::find()?;
    let (kernel, arch) = crate::metadata::this_machine();
    Ok(Offer {
        version: VERSION,
        strategy: STOP_AND_COPY.to_owned(),
        resident_bytes: crate::process::resident_bytes(&pids),
        // Its ports matter at the destination only on the host's network, its pids only in
        // the host's pid namespace: otherwise podman gives it namespaces of its own there.
        listening: if container.host_network {
            crac_action::procfs::listening_tcp(&pids)
        } else {
            Vec::new()
        },
        pids: if container.host_pids {
            pids
        } else {
            Vec::new()
        },
        cpu_features: crate::cpu::features(),
        criu_version: criu.version,
        kernel,
        arch,
        address: address.map(|a| a.to_string()),
        container: Some(Box::new(ContainerOffer {
            name: container.name.clone(),
            id: container.id.clone(),
            image: container.image.clone(),
            image_id: container.image_id.clone(),
            criu_config: criu_config.to_owned(),
        })),
    })
}

/// The checkpoint failed (`lines`: podman's word and CRIU's): the container runs on, rolled
/// back by its hooks, unless podman says it does not.
fn checkpoint_failed(podman: &Podman, container: &Container, lines: Vec<String>) -> OpError {
    let runs = podman
        .inspect(&container.name)
        .is_ok_and(|c| c.state == "running");
    let outcome = if runs {
        "it runs on here (the hooks rolled it back: aborted)".to_owned()
    } else {
        format!(
            "it does not run here now: restore it with podman container restore {}",
            container.name
        )
    };
    OpError::new(
        FailureKind::Failed,
        format!(
            "podman could not checkpoint the container {}: {}; {outcome}",
            container.name, lines[0]
        ),
    )
    .with_details(lines[1..].to_vec())
}

/// The container after its checkpoint: stopped here, the checkpoint kept in podman's storage.
struct Stopped<'a> {
    request: &'a ContainerRequest,
    podman: &'a Podman,
    name: &'a str,
    device: Option<String>,
}

impl Stopped<'_> {
    /// Gives this host the service address again (it had been released for the destination).
    fn take_address_back(&self, notice: &mut dyn FnMut(&str)) {
        if let (Some(address), Some(device)) = (self.request.address, &self.device) {
            if !matches!(net::device_of(address), Ok(Some(_))) {
                if let Err(e) = net::take(address, device) {
                    notice(&format!("could not take the service address back: {e}"));
                }
            }
        }
    }

    /// The migration failed after the checkpoint, for `why`, and the destination does not run
    /// the container: it is restored here from the checkpoint podman kept.
    fn restore_here(&self, why: &str) -> OpError {
        let to = self.request.to;
        match self.podman.restore_kept(self.name) {
            Ok(()) => OpError::new(
                FailureKind::Failed,
                format!(
                    "the migration of the container {} to {to} failed after it was stopped: {why}; it was restored here from its checkpoint and runs here again",
                    self.name
                ),
            ),
            Err(lines) => OpError::new(
                FailureKind::ImageKept,
                format!(
                    "the migration of the container {} to {to} failed after it was stopped: {why}; restoring it here failed too ({}); podman keeps its checkpoint",
                    self.name, lines[0]
                ),
            )
            .with_details(
                std::iter::once(format!(
                    "restore it with: podman container restore {}",
                    self.name
                ))
                .chain(lines[1..].iter().cloned())
                .collect(),
            ),
        }
    }

    /// The destination was told to restore and then fell silent (`why`): it may run the
    /// container or not. Restoring here could make two; the stopped container stays.
    fn unknown(&self, why: &str) -> OpError {
        OpError::new(
            FailureKind::ImageKept,
            format!(
                "{} was told to restore the container {} and then the link failed ({why}): whether it runs there is unknown; it was not restored here, so that it never runs twice; it is kept here stopped, with its checkpoint",
                self.request.to, self.name
            ),
        )
        .with_details(vec![format!(
            "check the destination first (podman ps there); if it does not run there, restore it here with: podman container restore {}",
            self.name
        )])
    }
}

/// The destination's side, once the source offered the container `container`: checks, the
/// archive into a working folder of the store, the address, podman's restore, the word back.
pub(super) fn receive(
    request: &ReceiveRequest,
    mut channel: Channel,
    offer: &Offer,
    container: &ContainerOffer,
    notice: &mut dyn FnMut(&str),
) -> Result<ReceiveOutcome, OpError> {
    let source = channel.peer();
    let started = Instant::now();
    let at_source = "the container stays at the source";
    let link = |e: std::io::Error| {
        OpError::new(
            FailureKind::Failed,
            format!("the link to {source} failed ({e}); nothing runs here: {at_source}"),
        )
    };
    let podman = Podman::new(request.podman_args.clone());
    let mut problems = checks::problems(offer, request.store.root());
    problems.extend(problems_here(&podman, offer, container));
    channel
        .send(&Message::Checked {
            problems: problems.clone(),
        })
        .map_err(link)?;
    if !problems.is_empty() {
        return Err(OpError::new(
            FailureKind::Failed,
            format!(
                "refused the container {} from {source}: {}; {at_source}, which stopped nothing",
                container.name,
                problems.join("; ")
            ),
        )
        .with_details(problems));
    }
    let files = match channel.recv::<Message>().map_err(link)? {
        Message::Image { files, .. } => files,
        Message::Abort { reason } => {
            return Err(OpError::new(
                FailureKind::Failed,
                format!("the source gave up: {reason}; {at_source}"),
            ))
        }
        other => return Err(link(super::receive::unexpected(&other))),
    };
    let staging = request
        .store
        .begin_import(&format!("migrate-container-{}", now_ms()))
        .map_err(|e| OpError::new(FailureKind::Unavailable, e.to_string()))?;
    let received = if files.len() == 1 && files[0].0 == ARCHIVE {
        super::receive::receive_files(&mut channel, staging.path(), &files)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the source sent {files:?}, not one {ARCHIVE}"),
        ))
    };
    if let Err(e) = received {
        let _ = channel.send(&Message::Abort {
            reason: e.to_string(),
        });
        return Err(OpError::new(
            FailureKind::Failed,
            format!("the archive from {source} could not be received ({e}); nothing runs here: the source restores the container"),
        ));
    }
    channel.send(&Message::Ready).map_err(link)?;
    match channel.recv::<Message>() {
        Ok(Message::Go) => {}
        Ok(Message::Abort { reason }) => {
            return Err(OpError::new(
                FailureKind::Failed,
                format!("the source gave up: {reason}; {at_source}"),
            ))
        }
        Ok(other) => return Err(link(super::receive::unexpected(&other))),
        Err(e) => return Err(link(e)),
    }
    let address = ServiceAddress::parse_optional(offer.address.as_deref())?;
    let failed = |channel: &mut Channel, lines: Vec<String>| {
        if let Some(address) = address {
            let _ = net::release(address, &request.address_device);
        }
        // Whatever podman left of a failed restore under the name (it was free before).
        if podman.container_exists(&container.name).unwrap_or(false) {
            let _ = podman.remove(&container.name);
        }
        let told = channel.send(&Message::Failed {
            reason: lines[0].clone(),
        });
        OpError::new(
            FailureKind::Failed,
            format!(
                "could not restore the container {} here: {}; {}",
                container.name,
                lines[0],
                if told.is_ok() {
                    "the source restores it"
                } else {
                    "and the source could not be told: it keeps it stopped, with its checkpoint"
                }
            ),
        )
        .with_details(lines[1..].to_vec())
    };
    if let Some(address) = address {
        if let Err(e) = net::take(address, &request.address_device) {
            return Err(failed(&mut channel, vec![e]));
        }
    }
    let restore_started = Instant::now();
    if let Err(lines) = podman.restore_import(&staging.path().join(ARCHIVE)) {
        return Err(failed(&mut channel, lines));
    }
    let restore_ms = ms(restore_started.elapsed());
    drop(staging);
    let pid = match podman.inspect(&container.name) {
        Ok(restored) => restored.pid,
        Err(e) => {
            notice(&format!(
                "the container runs here, but podman does not say its pid: {e}"
            ));
            0
        }
    };
    if let (Some(hook), Some(address)) = (&request.on_address, address) {
        super::receive::run_hook(hook, address, notice);
    }
    if let Err(e) = channel.send(&Message::Restored { pid }) {
        notice(&format!(
            "the container {} runs here, but the source could not be told ({e}): it keeps its stopped copy and restores nothing",
            container.name
        ));
    }
    Ok(ReceiveOutcome {
        pid,
        image: None,
        container: Some(container.name.clone()),
        source,
        restore_ms,
        total_ms: ms(started.elapsed()),
    })
}

/// What this host lacks to run the container `container` (besides what
/// [`checks::problems`] finds for any service).
fn problems_here(podman: &Podman, offer: &Offer, container: &ContainerOffer) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = podman.version() {
        problems.push(e);
        return problems;
    }
    let short = |id: &str| id.chars().take(12).collect::<String>();
    match podman.image_exists(&container.image_id) {
        Ok(true) => {}
        Ok(false) => problems.push(format!(
            "the container's image {} ({}) is not in this host's podman storage: pull it here first (podman pull {}), or give crac the storage that holds it (--podman-arg)",
            container.image,
            short(&container.image_id),
            container.image
        )),
        Err(e) => problems.push(e),
    }
    match podman.container_exists(&container.name) {
        Ok(false) => {}
        Ok(true) => problems.push(format!(
            "a container named {} exists here already: remove it (podman rm {}) or move this one elsewhere",
            container.name, container.name
        )),
        Err(e) => problems.push(e),
    }
    if let Some(problem) = criu_config_problem(&container.criu_config) {
        problems.push(format!(
            "{problem} (here, where the restored container's CRIU reads it)"
        ));
    }
    if let Ok(criu) = crate::criu::find() {
        if older(&criu.version, &offer.criu_version) {
            problems.push(format!(
                "CRIU here is {}, older than the source's {}: it may not read the checkpoint; install CRIU {} or newer here",
                criu.version, offer.criu_version, offer.criu_version
            ));
        }
    }
    problems
}

/// Whether the version `here` (`4.1.1`) is older than `there`.
fn older(here: &str, there: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> {
        v.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    parts(here) < parts(there)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_versions_compare_by_number() {
        assert!(older("4.1.1", "4.2.1"));
        assert!(older("3.19", "4.0"));
        assert!(!older("4.2.1", "4.2.1"));
        assert!(!older("4.10", "4.9"));
    }

    #[test]
    fn a_criu_configuration_without_an_action_script_is_a_problem() {
        let dir = crac_fs::TempDir::new("crac-test-criu-conf").unwrap();
        let with = dir.path().join("with.conf");
        std::fs::write(
            &with,
            "skip-in-flight\naction-script /usr/bin/crac-action\n",
        )
        .unwrap();
        assert_eq!(criu_config_problem(&with.to_string_lossy()), None);
        let without = dir.path().join("without.conf");
        std::fs::write(&without, "skip-in-flight\n# action-script /x\n").unwrap();
        let problem = criu_config_problem(&without.to_string_lossy()).unwrap();
        assert!(problem.contains("names no action-script"), "{problem}");
        let missing = criu_config_problem(&dir.path().join("nope").to_string_lossy()).unwrap();
        assert!(
            missing.starts_with("cannot read the container's CRIU configuration"),
            "{missing}"
        );
    }
}
