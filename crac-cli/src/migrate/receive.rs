//! The destination of a migration, `crac migrate --receive --listen ADDR:PORT`: it waits for a
//! source that holds the key, checks that it could run the service, files the image in its
//! own store, validates it, takes the service address and restores. See the
//! [module documentation](super).

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::channel::{Channel, HandshakeError};
use super::net::{self, ServiceAddress};
use super::relay::Relay;
use super::{checks, Message};
use crate::criu::require_root;
use crate::error::{FailureKind, OpError};
use crate::restore::RestoreRequest;
use crate::store::Store;
use crate::units::ms;

/// A migration to receive on this host.
#[derive(Clone, Debug)]
pub struct ReceiveRequest {
    /// Where to listen for the source.
    pub listen: SocketAddr,
    /// The pre-shared key's file (private to its owner).
    pub key: PathBuf,
    /// This host's store: the image is filed there.
    pub store: Store,
    /// The device that gets the service address.
    pub address_device: String,
    /// A shell command run once the service runs here, with the service address as `$1`
    /// (e.g. a route or a gratuitous ARP that sends clients here).
    pub on_address: Option<String>,
    /// How long a silent link is waited for before it counts as cut.
    pub link_timeout: Duration,
    /// Global options for podman (its storage, runtime, ...), for a container's migration.
    pub podman_args: Vec<String>,
}

/// A migration received: the service runs here.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReceiveOutcome {
    /// The restored root's pid (as this crac sees it).
    pub pid: u32,
    /// Where the image is filed here (a process's migration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// The podman container that runs here (a container's migration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The source.
    pub source: SocketAddr,
    /// CRIU's restore.
    pub restore_ms: f64,
    /// From the source's offer to the confirmation.
    pub total_ms: f64,
}

/// Receives one migration: listens on `request.listen`, and serves the first source that
/// proves it holds the key (others are refused and told nothing; `notice` is told of each).
/// `listening` is told the address once it listens.
///
/// # Errors
///
/// When it cannot listen, or the migration fails: the message says where the service runs
/// (at the source, unless it says otherwise).
pub fn receive(
    request: &ReceiveRequest,
    listening: &mut dyn FnMut(SocketAddr),
    notice: &mut dyn FnMut(&str),
) -> Result<ReceiveOutcome, OpError> {
    require_root("migrate --receive")?;
    let key = super::read_key(&request.key)?;
    request
        .store
        .check_writable()
        .map_err(|e| OpError::new(FailureKind::Unavailable, e.to_string()))?;
    let listener = TcpListener::bind(request.listen).map_err(|e| {
        OpError::new(
            FailureKind::Unavailable,
            format!("cannot listen on {}: {e}", request.listen),
        )
    })?;
    listening(listener.local_addr().unwrap_or(request.listen));
    loop {
        match Channel::accept(&listener, &key, request.link_timeout) {
            Ok(channel) => return session(request, channel, notice),
            Err(HandshakeError::Refused(why)) => notice(&format!("refused: {why}")),
            Err(HandshakeError::Io(e)) => notice(&format!("a connection failed: {e}")),
        }
    }
}

fn session(
    request: &ReceiveRequest,
    mut channel: Channel,
    notice: &mut dyn FnMut(&str),
) -> Result<ReceiveOutcome, OpError> {
    let source = channel.peer();
    let started = Instant::now();
    let at_source = "the service stays at the source";
    let link = |e: std::io::Error| {
        OpError::new(
            FailureKind::Failed,
            format!("the link to {source} failed ({e}); nothing runs here: {at_source}"),
        )
    };
    let offer = match channel.recv::<Message>().map_err(link)? {
        Message::Offer(offer) => offer,
        other => return Err(link(unexpected(&other))),
    };
    if let Some(container) = offer.container.clone() {
        return super::container::receive(request, channel, &offer, &container, notice);
    }
    let problems = checks::problems(&offer, request.store.root());
    channel
        .send(&Message::Checked {
            problems: problems.clone(),
        })
        .map_err(link)?;
    if !problems.is_empty() {
        return Err(OpError::new(
            FailureKind::Failed,
            format!(
                "refused the migration from {source}: {}; {at_source}, which stopped nothing",
                problems.join("; ")
            ),
        )
        .with_details(problems));
    }
    let (name, files) = match channel.recv::<Message>().map_err(link)? {
        Message::Image { name, files } => (name, files),
        Message::Abort { reason } => {
            return Err(OpError::new(
                FailureKind::Failed,
                format!("the source gave up: {reason}; {at_source}"),
            ))
        }
        other => return Err(link(unexpected(&other))),
    };
    let image = receive_image(request, &mut channel, &name, &files).map_err(|e| {
        OpError::new(
            FailureKind::Failed,
            format!("the image from {source} could not be received ({e}); nothing runs here: the source restores the service"),
        )
    })?;
    let forget = |notice: &mut dyn FnMut(&str)| {
        if let Err(e) = request.store.remove(&name) {
            notice(&format!(
                "could not remove the image {}: {e}",
                image.display()
            ));
        }
    };
    if let Err(e) = crate::restore::validate(&image, &[], notice) {
        let _ = channel.send(&Message::Abort {
            reason: e.message.clone(),
        });
        forget(notice);
        return Err(OpError::new(
            FailureKind::Failed,
            format!("the image from {source} cannot be restored here: {}; the source restores the service", e.message),
        ));
    }
    channel.send(&Message::Ready).map_err(link)?;
    match channel.recv::<Message>() {
        Ok(Message::Go) => {}
        Ok(Message::Abort { reason }) => {
            forget(notice);
            return Err(OpError::new(
                FailureKind::Failed,
                format!("the source gave up: {reason}; {at_source}"),
            ));
        }
        Ok(other) => {
            forget(notice);
            return Err(link(unexpected(&other)));
        }
        Err(e) => {
            forget(notice);
            return Err(link(e));
        }
    }
    let address = ServiceAddress::parse_optional(offer.address.as_deref())?;
    let failed = |channel: &mut Channel, reason: String, notice: &mut dyn FnMut(&str)| {
        if let Some(address) = address {
            let _ = net::release(address, &request.address_device);
        }
        let told = channel.send(&Message::Failed {
            reason: reason.clone(),
        });
        forget(notice);
        OpError::new(
            FailureKind::Failed,
            format!(
                "could not restore the service here: {reason}; {}",
                if told.is_ok() {
                    "the source restores it"
                } else {
                    "and the source could not be told: its image is kept there"
                }
            ),
        )
    };
    if let Some(address) = address {
        if let Err(e) = net::take(address, &request.address_device) {
            return Err(failed(&mut channel, e, notice));
        }
    }
    let restore_request = RestoreRequest::detached(image.clone());
    if offer.strategy == super::POST_COPY {
        let lazily = LazyReceive {
            request,
            address,
            source,
            image: image.clone(),
            name: name.clone(),
            started,
        };
        return lazily.run(channel, &restore_request, notice);
    }
    let restored = crate::restore::restore(&restore_request, notice, None);
    let outcome = match restored {
        Ok(outcome) => outcome,
        Err(e) => return Err(failed(&mut channel, e.message, notice)),
    };
    for failure in &outcome.hook_failures {
        notice(&format!("restored, but after_restore failed: {failure}"));
    }
    if let (Some(hook), Some(address)) = (&request.on_address, address) {
        run_hook(hook, address, notice);
    }
    // Told once the service runs here and clients are sent here: the source then removes its
    // image. If this message is lost, the source keeps it and says so.
    if let Err(e) = channel.send(&Message::Restored { pid: outcome.pid }) {
        notice(&format!(
            "the service runs here (pid {}), but the source could not be told ({e}): it keeps its image and restores nothing",
            outcome.pid
        ));
    }
    Ok(ReceiveOutcome {
        pid: outcome.pid,
        image: Some(image),
        container: None,
        source,
        restore_ms: outcome.restore_ms,
        total_ms: ms(started.elapsed()),
    })
}

/// A post-copy migration at the destination, from "go" on, the address taken.
struct LazyReceive<'a> {
    request: &'a ReceiveRequest,
    address: Option<ServiceAddress>,
    source: SocketAddr,
    image: PathBuf,
    name: String,
    started: Instant,
}

impl LazyReceive<'_> {
    /// Restores lazily, the pages relayed from the source's dump; runs the hook, confirms,
    /// and waits until every page is in. A page server that fails kills the copy here (its
    /// memory is incomplete) and the address goes: the source resumes the service.
    fn run(
        self,
        channel: Channel,
        restore_request: &RestoreRequest,
        notice: &mut dyn FnMut(&str),
    ) -> Result<ReceiveOutcome, OpError> {
        let _pipes = super::pipes::raise(notice).unwrap_or_else(|e| {
            notice(&e);
            None
        });
        let (mine, criu_end) = std::os::unix::net::UnixStream::pair().map_err(|e| {
            OpError::new(
                FailureKind::Unavailable,
                format!("cannot make a socket pair: {e}"),
            )
        })?;
        let relay = Relay::start(channel, mine, false).map_err(|e| {
            OpError::new(FailureKind::Failed, format!("cannot relay the pages: {e}"))
        })?;
        let (outcome, server) =
            match crate::restore::restore_pages_from(restore_request, notice, criu_end.into()) {
                Ok(restored) => restored,
                Err(e) => {
                    self.give_up();
                    let told = relay.send(&Message::Failed {
                        reason: e.message.clone(),
                    });
                    relay.close();
                    return Err(OpError::new(
                        FailureKind::Failed,
                        format!(
                            "could not restore the service here: {}; {}",
                            e.message,
                            if told.is_ok() {
                                "the source resumes it"
                            } else {
                                "the source resumes it once it notices the link is gone"
                            }
                        ),
                    )
                    .with_details(e.details));
                }
            };
        for failure in &outcome.hook_failures {
            notice(&format!("restored, but after_restore failed: {failure}"));
        }
        if let (Some(hook), Some(address)) = (&self.request.on_address, self.address) {
            run_hook(hook, address, notice);
        }
        let _ = relay.send(&Message::Restored { pid: outcome.pid });
        let all_in = server.wait(outcome.pid);
        let result = match all_in {
            Ok(_) => {
                let _ = relay.send(&Message::PagesDone {
                    ok: true,
                    reason: None,
                });
                Ok(ReceiveOutcome {
                    pid: outcome.pid,
                    image: Some(self.image.clone()),
                    container: None,
                    source: self.source,
                    restore_ms: outcome.restore_ms,
                    total_ms: ms(self.started.elapsed()),
                })
            }
            Err(e) => {
                // The copy here was killed: the service must not answer here any more.
                self.give_up();
                let _ = relay.send(&Message::PagesDone {
                    ok: false,
                    reason: Some(e.message.clone()),
                });
                Err(OpError::new(
                    FailureKind::Failed,
                    format!(
                        "the memory did not all arrive from {}: {}; the source resumes the service",
                        self.source, e.message
                    ),
                )
                .with_details(e.details))
            }
        };
        relay.close();
        result
    }

    /// Nothing of the service runs here: the address and the image go.
    fn give_up(&self) {
        if let Some(address) = self.address {
            let _ = net::release(address, &self.request.address_device);
        }
        let _ = self.request.store.remove(&self.name);
    }
}

pub(super) fn unexpected(message: &Message) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the source sent {message:?} out of turn"),
    )
}

/// Receives the image's `files` into a staging folder of the store, and files it as `name`.
fn receive_image(
    request: &ReceiveRequest,
    channel: &mut Channel,
    name: &str,
    files: &[(String, u64)],
) -> std::io::Result<PathBuf> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut staging = request
        .store
        .begin(name)
        .map_err(|e| invalid(e.to_string()))?;
    receive_files(channel, staging.path(), files)?;
    staging.commit(false).map_err(|e| invalid(e.to_string()))
}

/// Receives `files` (names and sizes, announced by the source) into the folder `dir`.
pub(super) fn receive_files(
    channel: &mut Channel,
    dir: &std::path::Path,
    files: &[(String, u64)],
) -> std::io::Result<()> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut seen = std::collections::BTreeSet::new();
    for (file, size) in files {
        if file.is_empty()
            || file.contains('/')
            || file == "."
            || file == ".."
            || !seen.insert(file.as_str())
        {
            return Err(invalid(format!("the source sent a file named {file:?}")));
        }
        let mut out = crac_fs::create_file(&dir.join(file))?;
        let mut left = *size;
        while left > 0 {
            let piece = channel.recv_data()?;
            if piece.len() as u64 > left {
                return Err(invalid(format!("{file} is longer than announced")));
            }
            out.write_all(&piece)?;
            left -= piece.len() as u64;
        }
    }
    Ok(())
}

/// Runs the operator's hook `sh -c HOOK sh ADDRESS`; its failure is told, not fatal: the
/// service runs here either way.
pub(super) fn run_hook(hook: &str, address: ServiceAddress, notice: &mut dyn FnMut(&str)) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(hook)
        .arg("sh")
        .arg(address.to_string())
        .stdin(std::process::Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => notice(&format!(
            "the service runs here, but the address hook `{hook}` failed ({status}): clients may not find it"
        )),
        Err(e) => notice(&format!(
            "the service runs here, but the address hook `{hook}` could not run: {e}"
        )),
    }
}
