//! A TCP listener that steps aside for a checkpoint: [`PausableListener`].
//!
//! # Why the listener closes for a dump
//!
//! CRIU refuses to dump a process that holds an established TCP connection to the outside
//! (unless it is told `--tcp-established`, and even then the peer would not expect the
//! connection to come back from the dead). A server's client connections are exactly that, and
//! a listening socket keeps making new ones: the kernel completes the handshake of every
//! client that connects and queues the connection until the server accepts it. So one client
//! arriving at the wrong moment would make the dump fail.
//!
//! The listener therefore takes part in the checkpoint as a [`Resource`]
//! ([`PausableListener::resource`]):
//!
//! - `before_checkpoint` stops the accept loop and closes the listening socket. From then on a
//!   client is refused by the kernel, and no connection can be established to the process
//!   while it is frozen and dumped. The accept loop serves one connection at a time inside a
//!   [critical section](crac_core::critical_section) and closes it before that ends, so the
//!   checkpoint waits for the request in progress and finds no connection open.
//! - `after_restore` listens again on the same address (retrying for a while: the port may
//!   still be held for a moment) and hands the new socket to the accept loop, which serves
//!   nothing before every `after_restore` hook has returned. Whatever the reason (`restored`,
//!   `resumed`, `aborted`), the socket was closed, so it is always reopened.
//!
//! A connection accepted just as a checkpoint starts is answered
//! `ERR checkpoint in progress, try again` and closed at once rather than held open.
//!
//! # Use
//!
//! ```no_run
//! use crac_examples::listener::PausableListener;
//! use crac_examples::Log;
//!
//! const LOG: Log = Log::new("my-server");
//!
//! let listener = PausableListener::new("127.0.0.1:7070".parse().unwrap(), LOG)?;
//! // Register it last, so that it stops accepting first and starts again last.
//! crac_core::global_context().register(listener.resource()).keep();
//! listener.serve(|stream| {
//!     // read one request from `stream`, write the reply
//!     # let _ = stream;
//!     Ok(())
//! })?;
//! # Ok::<(), String>(())
//! ```

use std::borrow::Cow;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crac_core::{CheckpointInfo, Coordinator, CriticalSection, HookError, Resource, RestoreInfo};

use crate::{lock, Log};

/// How long `before_checkpoint` waits for the accept loop to close the socket.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts to listen again after a restore, and the pause between them.
const BIND_ATTEMPTS: u32 = 50;
const BIND_PAUSE: Duration = Duration::from_millis(100);
/// The reply to a connection that arrives while a checkpoint is starting.
const BUSY_REPLY: &[u8] = b"ERR checkpoint in progress, try again\n";

/// A listening TCP socket whose accept loop lets go of it for a checkpoint and gets a new one
/// after the restore; see the [module documentation](self).
///
/// The accept loop is [`accept`](Self::accept) (or [`serve`](Self::serve), which calls it);
/// the hooks that pause and resume it are in [`resource`](Self::resource), to register in a
/// crac context. Connections are accepted and served one at a time.
pub struct PausableListener {
    /// None only after the socket could not be reopened.
    listener: Option<TcpListener>,
    shared: Arc<Shared>,
}

/// One accepted connection, served inside a critical section: a checkpoint waits until it is
/// dropped, and by then the connection is closed.
pub struct Connection {
    // Declared first so dropped first: the connection is closed while the critical section
    // still holds checkpoints off.
    stream: TcpStream,
    _request: CriticalSection,
}

impl Connection {
    /// The client's connection; dropping the [`Connection`] closes it.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// The listener's [`Resource`], named `listener`: `before_checkpoint` stops the accept loop and
/// closes the listening socket, `after_restore` listens again. Made by
/// [`PausableListener::resource`].
pub struct ListenerResource(Arc<Shared>);

/// What the hooks and the accept loop share: the hooks take the listening socket away from the
/// accept loop and give a new one back.
struct Shared {
    addr: SocketAddr,
    log: Log,
    state: Mutex<ListenState>,
    changed: Condvar,
}

#[derive(Default)]
struct ListenState {
    /// before_checkpoint wants the socket closed.
    pause_requested: bool,
    /// The accept loop has closed it and waits.
    closed: bool,
    /// after_restore's new socket (or why there is none), for the waiting accept loop.
    reopened: Option<Result<TcpListener, String>>,
}

impl PausableListener {
    /// Listens on `addr`. Port 0 picks a free port, which is then kept across checkpoints (see
    /// [`local_addr`](Self::local_addr)). `log` signs the lines of the hooks and of the accept
    /// loop.
    ///
    /// # Errors
    ///
    /// When the socket cannot be bound (typically: another process uses the port).
    pub fn new(addr: SocketAddr, log: Log) -> Result<PausableListener, String> {
        let listener = TcpListener::bind(addr).map_err(|err| {
            format!("cannot listen on {addr}: {err} (is another process using the port?)")
        })?;
        let addr = listener
            .local_addr()
            .map_err(|err| format!("cannot read the listening address: {err}"))?;
        Ok(PausableListener {
            listener: Some(listener),
            shared: Arc::new(Shared {
                addr,
                log,
                state: Mutex::new(ListenState::default()),
                changed: Condvar::new(),
            }),
        })
    }

    /// The address it listens on, and listens on again after a restore.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The hooks that pause and resume this listener, to register (once) in a crac context.
    /// Register it after the resources the requests depend on, at the same priority: it then
    /// stops accepting before they are told to checkpoint, and accepts again only after they
    /// are restored.
    pub fn resource(&self) -> ListenerResource {
        ListenerResource(Arc::clone(&self.shared))
    }

    /// Waits for the next connection to serve and returns it inside a critical section of the
    /// global [`Coordinator`].
    ///
    /// While a checkpoint is in progress it does not return: it closes the listening socket
    /// when `before_checkpoint` asks, waits for `after_restore`'s new one and then until every
    /// `after_restore` hook has returned. A connection that arrives as a checkpoint starts is
    /// answered `ERR checkpoint in progress, try again` and closed. A failed `accept` is logged
    /// and retried.
    ///
    /// # Errors
    ///
    /// When the socket could not be reopened after a checkpoint; the server should exit.
    pub fn accept(&mut self) -> Result<Connection, String> {
        loop {
            // A checkpoint asked the loop to let go of the listening socket: close it, wait
            // until after_restore hands over a new one, then until every after_restore has
            // finished.
            if self.shared.park_if_requested(&mut self.listener)? {
                drop(crac_core::critical_section());
                continue;
            }
            let Some(listener) = &self.listener else {
                return Err(format!("no longer listening on {}", self.shared.addr));
            };
            let mut stream = match listener.accept() {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    eprintln!("{}: accept failed: {err}", self.shared.log.program());
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            // The wake-up connection of before_checkpoint, or a client that came in just as a
            // checkpoint started: answer at once and close, so that nothing stays open.
            if self.shared.pause_requested() {
                let _ = stream.write_all(BUSY_REPLY);
                continue;
            }
            let Some(request) = Coordinator::global().try_critical_section(Duration::ZERO) else {
                let _ = stream.write_all(BUSY_REPLY);
                continue;
            };
            return Ok(Connection {
                stream,
                _request: request,
            });
        }
    }

    /// The accept loop: [`accept`](Self::accept)s connections one at a time, on this thread,
    /// and calls `handle` with each (which reads the request and writes the reply); the
    /// connection is closed when `handle` returns. An error of `handle` is logged as
    /// `PROGRAM: request failed: ...`.
    ///
    /// # Errors
    ///
    /// It returns only when the socket could not be reopened after a checkpoint.
    pub fn serve(
        mut self,
        mut handle: impl FnMut(&TcpStream) -> Result<(), String>,
    ) -> Result<(), String> {
        loop {
            let connection = self.accept()?;
            if let Err(err) = handle(connection.stream()) {
                eprintln!("{}: request failed: {err}", self.shared.log.program());
            }
            // `connection` is closed here, still inside its critical section.
        }
    }
}

impl Shared {
    fn pause_requested(&self) -> bool {
        lock(&self.state).pause_requested
    }

    /// If a pause was requested: closes `listener`, tells before_checkpoint, waits for
    /// after_restore's new socket, puts it in `listener` and returns `true`. Otherwise returns
    /// `false`. Deciding under the lock means a pause request and its cancellation are never
    /// half-seen.
    fn park_if_requested(&self, listener: &mut Option<TcpListener>) -> Result<bool, String> {
        let mut state = lock(&self.state);
        if !state.pause_requested {
            return Ok(false);
        }
        drop(listener.take());
        state.closed = true;
        self.changed.notify_all();
        loop {
            if let Some(reopened) = state.reopened.take() {
                state.closed = false;
                state.pause_requested = false;
                *listener = Some(reopened?);
                return Ok(true);
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

impl Resource for ListenerResource {
    fn name(&self) -> Cow<'_, str> {
        "listener".into()
    }

    /// Asks the accept loop to close the listening socket, wakes it from `accept` with a
    /// connection of its own, and waits (bounded) until the socket is closed.
    fn before_checkpoint(&self, _: &CheckpointInfo) -> Result<(), HookError> {
        let shared = &self.0;
        lock(&shared.state).pause_requested = true;
        // The accept loop answers and closes this connection before it closes the listener.
        let wake = TcpStream::connect_timeout(&shared.addr, PAUSE_TIMEOUT);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut state = lock(&shared.state);
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "the accept loop did not close {} within {} s",
                    shared.addr,
                    PAUSE_TIMEOUT.as_secs()
                )
                .into());
            }
            state = shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        drop(state);
        drop(wake);
        shared.log.hook(
            "before_checkpoint",
            "listener",
            format_args!("stopped accepting, closed {}", shared.addr),
        );
        Ok(())
    }

    /// Listens again on the same address and hands the socket to the accept loop (which
    /// serves nothing until every after_restore hook has returned).
    fn after_restore(&self, info: &RestoreInfo) -> Result<(), HookError> {
        let shared = &self.0;
        {
            let mut state = lock(&shared.state);
            if !state.closed {
                // before_checkpoint gave up before the loop let go: just cancel the request.
                state.pause_requested = false;
                shared.log.hook(
                    "after_restore",
                    "listener",
                    format_args!("{} was still open; accepting again", shared.addr),
                );
                return Ok(());
            }
        }
        let result = bind_with_retry(shared.addr);
        let outcome = result.as_ref().map(|_| ()).map_err(Clone::clone);
        lock(&shared.state).reopened = Some(result);
        shared.changed.notify_all();
        match outcome {
            Ok(()) => {
                shared.log.hook(
                    "after_restore",
                    "listener",
                    format_args!(
                        "listening again on {} ({}, generation {})",
                        shared.addr, info.reason, info.generation
                    ),
                );
                Ok(())
            }
            Err(err) => {
                shared
                    .log
                    .hook("after_restore", "listener", format_args!("FAILED: {err}"));
                Err(err.into())
            }
        }
    }
}

/// Binds `addr`, retrying for a while: the port may still be held for a moment.
fn bind_with_retry(addr: SocketAddr) -> Result<TcpListener, String> {
    let mut attempt = 1;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(err) if attempt >= BIND_ATTEMPTS => {
                return Err(format!(
                    "cannot listen on {addr} again ({attempt} attempts): {err}; \
                     the server will exit"
                ))
            }
            Err(_) => {
                attempt += 1;
                thread::sleep(BIND_PAUSE);
            }
        }
    }
}
