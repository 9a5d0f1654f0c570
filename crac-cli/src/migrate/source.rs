//! The source of a migration, `crac migrate PID --to HOST:PORT`: see the
//! [module documentation](super) for the steps and who holds the service at each.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::channel::{Channel, HandshakeError, Key32};
use super::net::{self, ServiceAddress};
use super::relay::Relay;
use super::{Message, Offer, POST_COPY, STOP_AND_COPY, VERSION};
use crate::checkpoint::{CheckpointRequest, Destination, PageSource};
use crate::criu::{self, require_root};
use crate::error::{FailureKind, OpError};
use crate::metadata::DumpOptions;
use crate::restore::RestoreRequest;
use crate::store::Store;
use crate::units::ms;

/// How long the source waits for the destination's restore.
pub(super) const RESTORE_WAIT: Duration = Duration::from_secs(300);

/// A migration to run from this host.
#[derive(Clone, Debug)]
pub struct MigrateRequest {
    /// The root of the service's process tree.
    pub pid: u32,
    /// Where the destination (`crac migrate --receive`) listens.
    pub to: SocketAddr,
    /// [`STOP_AND_COPY`] or [`POST_COPY`].
    pub strategy: String,
    /// The pre-shared key's file (private to its owner).
    pub key: PathBuf,
    /// This host's store: the image is kept there until the destination runs the service.
    pub store: Store,
    /// The service address that moves with it.
    pub address: Option<ServiceAddress>,
    /// Move established TCP connections too (CRIU's `--tcp-established`).
    pub tcp_established: bool,
    /// Seconds the hooks may take.
    pub timeout_secs: f64,
    /// How long a silent link is waited for before it counts as cut.
    pub link_timeout: Duration,
    /// More options for `criu dump`.
    pub criu_args: Vec<String>,
}

/// A migration done: the service runs at the destination.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MigrateOutcome {
    /// The strategy.
    pub strategy: String,
    /// The restored root's pid at the destination.
    pub pid: u32,
    /// From the start of the dump to the destination's confirmation: how long the service did
    /// not run anywhere.
    pub downtime_ms: f64,
    /// CRIU's dump, hooks included.
    pub dump_ms: f64,
    /// From the connection to the confirmation.
    pub total_ms: f64,
    /// Bytes sent to the destination (the sealed stream).
    pub bytes_sent: u64,
    /// The image's size.
    pub image_bytes: u64,
    /// CRIU's network-lock rules removed here once the address had left.
    pub lock_rules_removed: usize,
}

/// Migrates the service `request.pid` to the destination; `notice` is told what is worth
/// knowing on the way.
///
/// # Errors
///
/// Before the dump: the service runs on, untouched or rolled back (the message says which).
/// After it: the service was restored here from its image ([`FailureKind::Failed`]), or the
/// image is kept here and the message says why and how to restore it
/// ([`FailureKind::ImageKept`]).
pub fn migrate(
    request: &MigrateRequest,
    notice: &mut dyn FnMut(&str),
) -> Result<MigrateOutcome, OpError> {
    let started = Instant::now();
    let pid = request.pid;
    require_root("migrate")?;
    if crac_action::tree::ProcessId::of(pid).is_none() {
        return Err(OpError::new(
            FailureKind::BadInput,
            format!("no process with pid {pid} (see `crac ps` for processes with an agent)"),
        ));
    }
    // A process in a container would come out of it at the destination: refused before
    // anything happens, naming what moves it.
    if let Some(enclosure) = super::podman::enclosure(pid) {
        return Err(OpError::new(
            FailureKind::BadInput,
            super::podman::refusal(pid, &enclosure),
        ));
    }
    let key = super::read_key(&request.key)?;
    let device = address_device(request.address)?;
    let mut channel = connect_and_offer(request.to, &key, request.link_timeout, offer(request)?)?;
    // The freeze: crac's checkpoint, hooks and all. A failure here rolls the service back.
    let name = format!("migrate-{pid}-{}", now_ms());
    let dump_started = Instant::now();
    let checkpoint_request = checkpoint_request(request, &name);
    if request.strategy == POST_COPY {
        let context = PostCopy {
            request,
            name,
            device,
            started,
            dump_started,
        };
        return context.run(channel, &checkpoint_request, notice);
    }
    let checkpoint = crate::checkpoint::checkpoint(
        &checkpoint_request,
        &mut |warning| notice(&format!("warning: {warning}")),
        None,
    );
    let checkpoint = match checkpoint {
        Ok(outcome) => outcome,
        Err(e) => {
            let _ = channel.send(&Message::Abort {
                reason: e.message.clone(),
            });
            return Err(e);
        }
    };
    let dump_ms = ms(dump_started.elapsed());
    let frozen = Frozen {
        request,
        image: checkpoint.path.clone(),
        name,
        device: device.clone(),
    };
    let image_bytes = checkpoint.metadata.image_bytes;
    if let Err(e) = send_image(&mut channel, &frozen) {
        return Err(frozen.restore_here(&format!("the image could not be sent ({e})"), notice));
    }
    match channel.recv::<Message>() {
        Ok(Message::Ready) => {}
        Ok(Message::Abort { reason }) => {
            return Err(frozen.restore_here(&format!("the destination gave up: {reason}"), notice))
        }
        Ok(other) => return Err(frozen.restore_here(&unexpected(&other).to_string(), notice)),
        Err(e) => {
            return Err(frozen.restore_here(
                &format!("the link failed during the transfer ({e})"),
                notice,
            ))
        }
    }
    if let (Some(address), Some(device)) = (request.address, &device) {
        if let Err(e) = net::release(address, device) {
            return Err(frozen.restore_here(
                &format!("the service address could not be released: {e}"),
                notice,
            ));
        }
    }
    if let Err(e) = channel.send(&Message::Go) {
        frozen.take_address_back(notice);
        return Err(frozen.restore_here(
            &format!("the link failed before the destination was told to restore ({e})"),
            notice,
        ));
    }
    let _ = channel.set_timeout(RESTORE_WAIT.max(request.link_timeout));
    match channel.recv::<Message>() {
        Ok(Message::Restored { pid: restored }) => {
            let downtime_ms = ms(dump_started.elapsed());
            let lock_rules_removed = frozen.clean_up(notice);
            Ok(MigrateOutcome {
                strategy: STOP_AND_COPY.to_owned(),
                pid: restored,
                downtime_ms,
                dump_ms,
                total_ms: ms(started.elapsed()),
                bytes_sent: channel.bytes_sent(),
                image_bytes,
                lock_rules_removed,
            })
        }
        Ok(Message::Failed { reason }) => {
            frozen.take_address_back(notice);
            Err(frozen.restore_here(
                &format!("the destination could not restore it: {reason}"),
                notice,
            ))
        }
        Ok(other) => Err(frozen.unknown(&unexpected(&other).to_string())),
        Err(e) => Err(frozen.unknown(&e.to_string())),
    }
}

/// The checkpoint a migration takes, into the image `name` of the source's store.
fn checkpoint_request(request: &MigrateRequest, name: &str) -> CheckpointRequest {
    CheckpointRequest {
        pid: request.pid,
        destination: Destination::Store {
            store: request.store.clone(),
            name: name.to_owned(),
            replace: false,
        },
        options: DumpOptions {
            leave_running: false,
            tcp_established: request.tcp_established,
            file_locks: false,
            timeout_secs: request.timeout_secs,
            extra_criu_args: request.criu_args.clone(),
            // CRIU's iptables lock, not crac's usual nftables one: its rules are found and
            // removed here once the address has left (net::remove_lock_rules), and the
            // restore at the destination, which has none, only logs that it found nothing.
            network_lock: request.tcp_established.then(|| "iptables".to_owned()),
            lazy_restore: false,
        },
        durable: false,
    }
}

/// A post-copy migration once the destination has accepted the offer.
struct PostCopy<'a> {
    request: &'a MigrateRequest,
    name: String,
    device: Option<String>,
    started: Instant,
    dump_started: Instant,
}

impl PostCopy<'_> {
    /// Dumps without the memory, sends the image, and once the destination runs the service,
    /// serves its memory until the last page is there. Until then the tree stays frozen here;
    /// if the transfer fails, CRIU resumes it here, and the destination kills its copy (its
    /// memory is incomplete).
    fn run(
        self,
        mut channel: Channel,
        checkpoint_request: &CheckpointRequest,
        notice: &mut dyn FnMut(&str),
    ) -> Result<MigrateOutcome, OpError> {
        let request = self.request;
        let _pipes = match super::pipes::raise(notice) {
            Ok(raised) => raised,
            Err(e) => {
                let _ = channel.send(&Message::Abort { reason: e.clone() });
                return Err(OpError::new(
                    FailureKind::Unavailable,
                    format!("{e}; nothing was stopped: the service runs on here"),
                ));
            }
        };
        let (mine, criu_end) = std::os::unix::net::UnixStream::pair().map_err(|e| {
            OpError::new(
                FailureKind::Unavailable,
                format!("cannot make a socket pair: {e}"),
            )
        })?;
        let dumped = crate::checkpoint::checkpoint_serving_pages(
            checkpoint_request,
            &mut |warning| notice(&format!("warning: {warning}")),
            criu_end.into(),
        );
        let (checkpoint, pages) = match dumped {
            Ok(dumped) => dumped,
            Err(e) => {
                let _ = channel.send(&Message::Abort {
                    reason: e.message.clone(),
                });
                return Err(e);
            }
        };
        let dump_ms = ms(self.dump_started.elapsed());
        let frozen = Frozen {
            request,
            image: checkpoint.path.clone(),
            name: self.name.clone(),
            device: self.device.clone(),
        };
        // Until "go", a failure cuts CRIU off: it resumes the service here.
        let resume_here = |why: String, mine: std::os::unix::net::UnixStream, pages: PageSource| {
            super::relay::cut_off(&mine, true);
            drop(mine);
            frozen.resumed(&why, pages.wait())
        };
        if let Err(e) = send_image(&mut channel, &frozen) {
            return Err(resume_here(
                format!("the image could not be sent ({e})"),
                mine,
                pages,
            ));
        }
        match channel.recv::<Message>() {
            Ok(Message::Ready) => {}
            Ok(Message::Abort { reason }) => {
                return Err(resume_here(
                    format!("the destination gave up: {reason}"),
                    mine,
                    pages,
                ))
            }
            Ok(other) => return Err(resume_here(unexpected(&other).to_string(), mine, pages)),
            Err(e) => {
                return Err(resume_here(
                    format!("the link failed during the transfer ({e})"),
                    mine,
                    pages,
                ))
            }
        }
        if let (Some(address), Some(device)) = (request.address, &self.device) {
            if let Err(e) = net::release(address, device) {
                return Err(resume_here(
                    format!("the service address could not be released: {e}"),
                    mine,
                    pages,
                ));
            }
        }
        if let Err(e) = channel.send(&Message::Go) {
            frozen.take_address_back(notice);
            return Err(resume_here(
                format!("the link failed before the destination was told to restore ({e})"),
                mine,
                pages,
            ));
        }
        let relay = Relay::start(channel, mine, true).map_err(|e| {
            OpError::new(FailureKind::Failed, format!("cannot relay the pages: {e}"))
        })?;
        let wait = RESTORE_WAIT.max(request.link_timeout);
        let restored = match relay.recv(wait) {
            Ok(Message::Restored { pid }) => pid,
            Ok(Message::Failed { reason }) => {
                relay.cut();
                frozen.take_address_back(notice);
                let err = frozen.resumed(
                    &format!("the destination could not restore it: {reason}"),
                    pages.wait(),
                );
                relay.close();
                return Err(err);
            }
            other => {
                let why = match other {
                    Ok(message) => unexpected(&message).to_string(),
                    Err(e) => e.to_string(),
                };
                relay.cut();
                let dump = pages.wait();
                if dump.is_ok() {
                    // The dump ends well only when the destination's page server said it has
                    // every page (a link that failed before makes it fail: relay::cut_off).
                    // Only the destination's word was lost: its page server's exit does not
                    // depend on the dump's last reply (CRIU's cr_lazy_pages), so its copy runs.
                    notice(&format!(
                        "{} has the service and all its memory, but its confirmation was lost ({why})",
                        request.to
                    ));
                    let bytes_sent = relay.bytes_sent();
                    relay.close();
                    let lock_rules_removed = frozen.clean_up(notice);
                    return Ok(MigrateOutcome {
                        strategy: POST_COPY.to_owned(),
                        pid: request.pid,
                        downtime_ms: ms(self.dump_started.elapsed()),
                        dump_ms,
                        total_ms: ms(self.started.elapsed()),
                        bytes_sent,
                        image_bytes: checkpoint.metadata.image_bytes,
                        lock_rules_removed,
                    });
                }
                let err = self.after_cut(&frozen, &relay, &why, dump, notice);
                relay.close();
                return Err(err);
            }
        };
        let downtime_ms = ms(self.dump_started.elapsed());
        // The service runs there; its memory arrives until the dump here has sent it all.
        if let Err(e) = pages.wait() {
            // The destination kills its copy unless its memory was all in, which a link that
            // failed in the transfer's last round trip allows (docs/migration.md).
            let why = format!(
                "{} (pid {restored} at {} ends there unless its page server had every page: \
                 check that only one copy runs)",
                e.message, request.to
            );
            let err = self.after_cut(&frozen, &relay, &why, Err(e), notice);
            relay.close();
            return Err(err);
        }
        match relay.recv(request.link_timeout) {
            Ok(Message::PagesDone { ok: true, .. }) => {}
            Ok(Message::PagesDone { ok: false, reason }) => notice(&format!(
                "every page was sent, but the destination says its page server failed: {}",
                reason.unwrap_or_default()
            )),
            _ => notice(
                "every page was sent, but the destination did not confirm them (the link failed)",
            ),
        }
        let bytes_sent = relay.bytes_sent();
        relay.close();
        let lock_rules_removed = frozen.clean_up(notice);
        Ok(MigrateOutcome {
            strategy: POST_COPY.to_owned(),
            pid: restored,
            downtime_ms,
            dump_ms,
            total_ms: ms(self.started.elapsed()),
            bytes_sent,
            image_bytes: checkpoint.metadata.image_bytes,
            lock_rules_removed,
        })
    }

    /// The transfer failed after "go" (`why`; `dump` is how the dump here ended): CRIU resumed
    /// the service here, and the destination kills its copy, whose memory is incomplete, and
    /// releases the address. Its word on that is waited for, or, if the link is gone, as long
    /// as it takes it to notice (twice the link timeout); then the address comes back here.
    fn after_cut(
        &self,
        frozen: &Frozen<'_>,
        relay: &Relay,
        why: &str,
        dump: Result<(), OpError>,
        notice: &mut dyn FnMut(&str),
    ) -> OpError {
        let deadline = Instant::now() + self.request.link_timeout * 2;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match relay.recv(left) {
                Ok(Message::PagesDone { .. } | Message::Failed { .. }) => break,
                Ok(_) => {}
                Err(_) => {
                    // The link is gone: give the destination the time it needs to notice.
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    break;
                }
            }
        }
        frozen.take_address_back(notice);
        frozen.resumed(why, dump)
    }
}

/// The device the service address is on here (`None` without an address).
///
/// # Errors
///
/// When the address is not on this host, or `ip` cannot tell.
pub(super) fn address_device(address: Option<ServiceAddress>) -> Result<Option<String>, OpError> {
    let Some(address) = address else {
        return Ok(None);
    };
    net::device_of(address)
        .map_err(|e| OpError::new(FailureKind::Unavailable, e))?
        .ok_or_else(|| {
            OpError::new(
                FailureKind::BadInput,
                format!("the service address {address} is not on this host: give the address the service listens on (ip -4 addr)"),
            )
        })
        .map(Some)
}

/// Connects to the destination `to`, offers it the service and waits for its checks.
///
/// # Errors
///
/// When it cannot be reached or authenticated, the link fails, or it refuses (the problems in
/// the details): nothing was stopped.
pub(super) fn connect_and_offer(
    to: SocketAddr,
    key: &Key32,
    link_timeout: Duration,
    offer: Offer,
) -> Result<Channel, OpError> {
    let untouched = "nothing was stopped: the service runs on here";
    let mut channel = Channel::connect(to, key, link_timeout).map_err(|e| {
        let what = match e {
            HandshakeError::Refused(why) => why,
            HandshakeError::Io(e) => format!("cannot reach {to}: {e}"),
        };
        OpError::new(FailureKind::Failed, format!("{what}; {untouched}"))
    })?;
    let link = |e: std::io::Error| {
        OpError::new(
            FailureKind::Failed,
            format!("the link to {to} failed before anything was stopped ({e}); {untouched}"),
        )
    };
    channel.send(&Message::Offer(offer)).map_err(link)?;
    match channel.recv::<Message>().map_err(link)? {
        Message::Checked { problems } if problems.is_empty() => Ok(channel),
        Message::Checked { problems } => Err(OpError::new(
            FailureKind::Failed,
            format!(
                "{to} cannot run the service, checked before anything was stopped: {}; {untouched}",
                problems.join("; ")
            ),
        )
        .with_details(problems)),
        other => Err(link(unexpected(&other))),
    }
}

/// What the source tells the destination about the service.
fn offer(request: &MigrateRequest) -> Result<Offer, OpError> {
    let pids = crac_action::tree::descendants(request.pid);
    let criu = criu::find()?;
    let (kernel, arch) = crate::metadata::this_machine();
    Ok(Offer {
        version: VERSION,
        strategy: request.strategy.clone(),
        resident_bytes: crate::process::resident_bytes(&pids),
        listening: crac_action::procfs::listening_tcp(&pids),
        pids,
        cpu_features: crate::cpu::features(),
        criu_version: criu.version,
        kernel,
        arch,
        address: request.address.map(|a| a.to_string()),
        container: None,
    })
}

pub(super) fn unexpected(message: &Message) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the peer sent {message:?} out of turn"),
    )
}

/// Sends the image's files: their names and sizes, then each one's bytes.
fn send_image(channel: &mut Channel, frozen: &Frozen<'_>) -> std::io::Result<()> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&frozen.image)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.metadata()?.len(),
            ));
        }
    }
    files.sort();
    send_files(channel, &frozen.image, &frozen.name, &files)
}

/// Sends the image `name`: its `files` (names and sizes) in `dir`, then each one's bytes.
pub(super) fn send_files(
    channel: &mut Channel,
    dir: &Path,
    name: &str,
    files: &[(String, u64)],
) -> std::io::Result<()> {
    channel.send(&Message::Image {
        name: name.to_owned(),
        files: files.to_vec(),
    })?;
    let mut buf = vec![0u8; super::channel::MAX_PAYLOAD];
    for (file, size) in files {
        use std::io::Read;
        let mut reader = crac_fs::open_regular(&dir.join(file))?.take(*size);
        let mut left = *size;
        while left > 0 {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{file} shrank while it was sent"),
                ));
            }
            channel.send_data(&buf[..n])?;
            left -= n as u64;
        }
    }
    Ok(())
}

/// The service after the dump: its image here, and the address it had.
struct Frozen<'a> {
    request: &'a MigrateRequest,
    image: PathBuf,
    name: String,
    device: Option<String>,
}

impl Frozen<'_> {
    /// The service runs at the destination: removes CRIU's lock rules (the address has left)
    /// and the image here; returns how many rules there were.
    fn clean_up(&self, notice: &mut dyn FnMut(&str)) -> usize {
        let removed = match self.request.address {
            Some(address) if self.request.tcp_established => net::remove_lock_rules(address)
                .unwrap_or_else(|e| {
                    notice(&format!("could not remove CRIU's network-lock rules: {e}"));
                    0
                }),
            _ => 0,
        };
        if let Err(e) = self.request.store.remove(&self.name) {
            notice(&format!(
                "the service runs at {}, but its image could not be removed here: {e}",
                self.request.to
            ));
        }
        removed
    }

    /// A post-copy failed (`why`) with the tree still here, and its dump ended as `dump` says:
    /// CRIU resumed the service here (the image goes), or the service is gone (the image
    /// stays).
    fn resumed(&self, why: &str, dump: Result<(), OpError>) -> OpError {
        let alive = crac_action::tree::state_of(self.request.pid).is_some_and(|s| s != 'Z');
        if alive {
            let _ = self.request.store.remove(&self.name);
            return OpError::new(
                FailureKind::Failed,
                format!(
                    "the migration to {} failed after the service was frozen: {why}; CRIU resumed it here, where it runs on (pid {})",
                    self.request.to, self.request.pid
                ),
            );
        }
        let details = match dump {
            Ok(()) => Vec::new(),
            Err(e) => e.details,
        };
        OpError::new(
            FailureKind::ImageKept,
            format!(
                "the migration to {} failed after the service was frozen: {why}; it does not run here, and its image (without its memory) is kept in {}",
                self.request.to,
                self.image.display()
            ),
        )
        .with_details(details)
    }

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

    /// The migration failed after the dump, for `why`, and the destination does not run the
    /// service: it is restored here from its image, which is then removed.
    fn restore_here(&self, why: &str, notice: &mut dyn FnMut(&str)) -> OpError {
        let restored =
            crate::restore::restore(&RestoreRequest::detached(self.image.clone()), notice, None);
        match restored {
            Ok(outcome) => {
                if let Err(e) = self.request.store.remove(&self.name) {
                    notice(&format!("could not remove the image {}: {e}", self.image.display()));
                }
                OpError::new(
                    FailureKind::Failed,
                    format!(
                        "the migration to {} failed after the service was stopped: {why}; the service was restored here from its image and runs here again (pid {})",
                        self.request.to, outcome.pid
                    ),
                )
            }
            Err(e) => OpError::new(
                FailureKind::ImageKept,
                format!(
                    "the migration to {} failed after the service was stopped: {why}; restoring it here failed too ({}); its image is kept in {}",
                    self.request.to,
                    e.message,
                    self.image.display()
                ),
            )
            .with_details(vec![format!("restore it with: crac --store {} restore {} --detach", store_root(self.request), self.name)]),
        }
    }

    /// The destination was told to restore and then fell silent (`why`): it may run the service
    /// or not. Restoring here could make two copies, so nothing is restored; the image stays.
    fn unknown(&self, why: &str) -> OpError {
        OpError::new(
            FailureKind::ImageKept,
            format!(
                "{} was told to restore the service and then the link failed ({why}): whether it runs there is unknown; it was not restored here, so that it never runs twice; its image is kept in {}",
                self.request.to,
                self.image.display()
            ),
        )
        .with_details(vec![
            format!("check the destination first (crac ps there); if it does not run there, restore it here with: crac --store {} restore {} --detach", store_root(self.request), self.name),
        ])
    }
}

fn store_root(request: &MigrateRequest) -> String {
    Path::display(request.store.root()).to_string()
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}
