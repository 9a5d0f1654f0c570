//! Post-copy's page traffic over the migration channel: CRIU's page-server protocol between
//! the source's `criu dump --lazy-pages` and the destination's `criu lazy-pages`, each of
//! which holds one end of a socket pair whose other end a [`Relay`] copies to and from the
//! sealed channel. No port serves pages: only a peer that passed the handshake reaches them.
//!
//! Messages still flow both ways meanwhile ([`Relay::send`], [`Relay::recv`]). When one
//! CRIU closes its end, the relay says so ([`Message::PagesEnd`]) and the other end's CRIU
//! sees its socket closed; when the link fails, the relay closes its CRIU's socket, so that
//! CRIU gives up rather than waits.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::channel::{self, Channel, Frame, Sender};
use super::Message;

/// A channel relaying one CRIU's page traffic, and carrying messages besides.
#[derive(Debug)]
pub struct Relay {
    tx: Arc<Mutex<Sender>>,
    messages: mpsc::Receiver<io::Result<Message>>,
    local: UnixStream,
    threads: Vec<JoinHandle<()>>,
    at_source: bool,
}

/// What the source's relay writes to its dump before it cuts it off: a page-server request of
/// no known command (CRIU's requests are 24 bytes: command, pages, address, image id). The
/// dump's page server takes a plain end of its socket for the end of the transfer, ends
/// well and kills the tree; an unknown command is an error, after which CRIU resumes the
/// tree instead.
const NO_SUCH_REQUEST: [u8; 24] = [0xff; 24];

/// Cuts a CRIU off: at the source, its dump fails (and resumes the service) rather than ends.
pub fn cut_off(criu: &UnixStream, at_source: bool) {
    if at_source {
        let mut criu = criu;
        let _ = criu.write_all(&NO_SUCH_REQUEST);
    }
    let _ = criu.shutdown(Shutdown::Both);
}

impl Relay {
    /// Starts relaying between `channel` and `local` (this host's end of CRIU's socket; the
    /// source's dump's when `at_source`, whom a failed link must make fail: [`cut_off`]).
    ///
    /// # Errors
    ///
    /// When the socket cannot be duplicated for the two threads.
    pub fn start(channel: Channel, local: UnixStream, at_source: bool) -> io::Result<Relay> {
        let (tx, mut rx) = channel.split();
        let tx = Arc::new(Mutex::new(tx));
        let (post, messages) = mpsc::channel();
        let mut from_criu = local.try_clone()?;
        let to_peer = Arc::clone(&tx);
        let outgoing = std::thread::spawn(move || {
            let mut buf = vec![0u8; channel::MAX_PAYLOAD];
            loop {
                let n = match from_criu.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let sent = to_peer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send_data(&buf[..n]);
                if sent.is_err() {
                    let _ = from_criu.shutdown(Shutdown::Both);
                    return;
                }
            }
            let _ = to_peer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(&Message::PagesEnd);
        });
        let mut to_criu = local.try_clone()?;
        let incoming = std::thread::spawn(move || loop {
            match rx.recv_frame() {
                Ok(Frame::Data(bytes)) => {
                    // Once this CRIU has ended, what still arrives for it is dropped.
                    let _ = to_criu.write_all(&bytes);
                }
                Ok(Frame::Message(bytes)) => match channel::parse::<Message>(&bytes) {
                    Ok(Message::PagesEnd) => {
                        let _ = to_criu.shutdown(Shutdown::Write);
                    }
                    Ok(message) => {
                        let _ = post.send(Ok(message));
                    }
                    Err(e) => {
                        cut_off(&to_criu, at_source);
                        let _ = post.send(Err(e));
                        return;
                    }
                },
                Err(e) => {
                    // The link failed: this CRIU must not wait for pages that cannot come.
                    cut_off(&to_criu, at_source);
                    let _ = post.send(Err(e));
                    return;
                }
            }
        });
        Ok(Relay {
            tx,
            messages,
            local,
            threads: vec![outgoing, incoming],
            at_source,
        })
    }

    /// Sends a message.
    ///
    /// # Errors
    ///
    /// When the connection fails.
    pub fn send(&self, message: &Message) -> io::Result<()> {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(message)
    }

    /// The next message, waiting at most `limit`.
    ///
    /// # Errors
    ///
    /// When the link failed, or nothing came within `limit`.
    pub fn recv(&self, limit: Duration) -> io::Result<Message> {
        match self.messages.recv_timeout(limit) {
            Ok(message) => message,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no word from the peer within {}s", limit.as_secs()),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the link to the peer is gone",
            )),
        }
    }

    /// Bytes sent to the peer so far, on the channel before the relay too.
    pub fn bytes_sent(&self) -> u64 {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Cuts this CRIU off: it gives up ([`cut_off`]).
    pub fn cut(&self) {
        cut_off(&self.local, self.at_source);
    }

    /// Ends the relay once its CRIU has ended: the connection and the socket close, the
    /// threads end.
    pub fn close(self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).close();
        let _ = self.local.shutdown(Shutdown::Both);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
