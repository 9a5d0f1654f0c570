//! A TCP listener that stays open across checkpoints, with an accept loop that holds still
//! while one is taken: [`GatedListener`].
//!
//! # Why nothing needs to close
//!
//! CRIU (4.2 and later) dumps a listening socket and restores it bound and listening on the
//! same address: a service keeps its listener, and a restored copy answers on the same port
//! at once. What CRIU cannot dump is an established connection to a client (unless told
//! `--tcp-established`), and a connection that the kernel has queued on the listener but the
//! service has not accepted yet ("In-flight connection"; `--skip-in-flight` leaves such
//! connections out of the image, and `crac checkpoint` passes it).
//!
//! So the accept loop takes a [critical section](crac_core::critical_section) *before* each
//! `accept`, and serves the connection inside it:
//!
//! - a checkpoint waits for the request in progress (its critical section), and that
//!   connection is closed before the section ends;
//! - while a checkpoint is in progress the loop does not accept: it waits for the critical
//!   section, and clients that connect meanwhile wait in the listener's queue. After a
//!   `--leave-running` dump (or a refused one) they are served as soon as every after_restore
//!   has run, none lost; a copy restored from the image starts with an empty queue;
//! - after a restore nothing is accepted before every `after_restore` hook has returned.
//!
//! The listener itself therefore needs no hooks. A service would still close and reopen it
//! in hooks when the restored copy must listen elsewhere: another address (a restore on a
//! machine with another IP address), or the same port beside the running original in one
//! network namespace.
//!
//! # Use
//!
//! ```no_run
//! use crac_examples::listener::GatedListener;
//! use crac_examples::Log;
//!
//! const LOG: Log = Log::new("my-server");
//!
//! fn main() -> Result<(), String> {
//!     let _agent = crac_agent::start().map_err(|e| e.to_string())?;
//!     let listener = GatedListener::bind("127.0.0.1:7070".parse().unwrap(), LOG)?;
//!     listener.serve(|stream| {
//!         // read one request from `stream`, write the reply
//!         # let _ = stream;
//!         Ok(())
//!     })
//! }
//! ```

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::Duration;

use crac_core::CriticalSection;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::Log;

/// A listening TCP socket kept across checkpoints, whose accept loop holds still while one
/// is taken; see the [module documentation](self). Connections are accepted and served one
/// at a time.
#[derive(Debug)]
pub struct GatedListener {
    listener: TcpListener,
    log: Log,
}

/// One accepted connection, served inside a critical section: a checkpoint waits until it is
/// dropped, and by then the connection is closed.
#[derive(Debug)]
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

impl GatedListener {
    /// Listens on `addr`. Port 0 picks a free port (see [`local_addr`](Self::local_addr)).
    /// `log` signs the accept loop's lines.
    ///
    /// # Errors
    ///
    /// When the socket cannot be bound (typically: another process uses the port).
    pub fn bind(addr: SocketAddr, log: Log) -> Result<GatedListener, String> {
        let listener = TcpListener::bind(addr).map_err(|err| {
            format!("cannot listen on {addr}: {err} (is another process using the port?)")
        })?;
        // Accepting never blocks: the loop waits for a client in poll, outside any critical
        // section, and accepts inside one.
        listener
            .set_nonblocking(true)
            .map_err(|err| format!("cannot make the listener non-blocking: {err}"))?;
        Ok(GatedListener { listener, log })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Waits for the next connection and returns it inside a critical section of the global
    /// [`Coordinator`](crac_core::Coordinator).
    ///
    /// It waits for a client outside any critical section, then for the critical section
    /// (which waits while a checkpoint is in progress, until every after_restore has run),
    /// then accepts. A client that went away meanwhile, or a queue that a restore left empty,
    /// sends it back to waiting. A failed `accept` is logged and retried.
    pub fn accept(&self) -> Connection {
        loop {
            let mut ready = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut ready, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(err) => {
                    eprintln!("{}: poll failed: {err}", self.log.program());
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            let request = crac_core::critical_section();
            match self.listener.accept() {
                Ok((stream, _peer)) => match stream.set_nonblocking(false) {
                    Ok(()) => {
                        return Connection {
                            stream,
                            _request: request,
                        }
                    }
                    Err(err) => eprintln!("{}: cannot use a connection: {err}", self.log.program()),
                },
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(err) => {
                    eprintln!("{}: accept failed: {err}", self.log.program());
                    drop(request);
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// The accept loop: [`accept`](Self::accept)s connections one at a time, on this thread,
    /// and calls `handle` with each (which reads the request and writes the reply); the
    /// connection is closed when `handle` returns. An error of `handle` is logged as
    /// `PROGRAM: request failed: ...`. It never returns.
    pub fn serve(self, mut handle: impl FnMut(&TcpStream) -> Result<(), String>) -> ! {
        loop {
            let connection = self.accept();
            if let Err(err) = handle(connection.stream()) {
                eprintln!("{}: request failed: {err}", self.log.program());
            }
            // `connection` is closed here, still inside its critical section.
        }
    }
}
