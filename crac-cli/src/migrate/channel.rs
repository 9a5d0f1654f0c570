//! The migration channel: one TCP connection between the two ends of a migration, on which
//! both prove they hold the same pre-shared key before anything else is said, and on which
//! every later byte is sealed.
//!
//! # Handshake
//!
//! ```text
//! source -> destination   "CRACMIG1" nonce_s (32 random bytes)
//! destination -> source   "CRACMIG1" nonce_d (32) HMAC-SHA256(K, "crac-migrate destination" nonce_s nonce_d)
//! source -> destination   HMAC-SHA256(K, "crac-migrate source" nonce_s nonce_d)
//! ```
//!
//! Each side checks the other's proof (in constant time) and hangs up on a wrong one: a peer
//! without the key learns nothing but a fresh nonce and a proof bound to its own nonce, and is
//! sent nothing else. Fresh nonces on both sides make a recorded handshake useless.
//!
//! # Frames
//!
//! Then each direction has its own key, HKDF-SHA256(K, salt nonce_s nonce_d, info
//! "crac-migrate source->destination" or the reverse), and each frame is
//! `u32 length (big-endian) | ChaCha20-Poly1305(kind byte | payload)`, its nonce the frame's
//! number in that direction: a frame altered, dropped, replayed or reordered fails to open, and
//! the channel is then unusable. Kind 0 is a JSON message, kind 1 a piece of an image file (at
//! most 1 MiB).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Sha256;

const MAGIC: &[u8; 8] = b"CRACMIG1";
const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
/// The largest payload of one frame.
pub(crate) const MAX_PAYLOAD: usize = 1 << 20;
/// The shortest key accepted: 32 bytes, as many as the proofs.
const MIN_KEY: usize = 32;
/// The largest key file read.
const MAX_KEY_FILE: u64 = 4096;
/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const KIND_MESSAGE: u8 = 0;
const KIND_DATA: u8 = 1;

/// The pre-shared key both ends of a migration read.
pub struct Key32(Vec<u8>);

impl std::fmt::Debug for Key32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key32(..)")
    }
}

impl Key32 {
    /// Reads the key from `path`, which must be private to its owner (crac-fs's
    /// `read_private`): its contents, surrounding whitespace removed, at least 32 bytes.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, is readable by others, or is too short.
    pub fn read(path: &Path) -> io::Result<Key32> {
        let bytes = crac_fs::read_private(path, MAX_KEY_FILE)?;
        let text = bytes.trim_ascii();
        if text.len() < MIN_KEY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds {} bytes: a migration key needs at least {MIN_KEY} (make one with: head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE)",
                    path.display(),
                    text.len()
                ),
            ));
        }
        Ok(Key32(text.to_vec()))
    }
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer does not hold the key (or speaks another protocol).
    #[error("{0}")]
    Refused(String),
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// An authenticated, sealed connection to the other end of a migration.
#[derive(Debug)]
pub struct Channel {
    tx: Sender,
    rx: Receiver,
    peer: SocketAddr,
}

/// The sending half of a [`Channel`] (a relay's writer, on a thread of its own).
pub struct Sender {
    stream: TcpStream,
    cipher: ChaCha20Poly1305,
    count: u64,
    /// Bytes written to the connection so far.
    pub bytes: u64,
}

/// The receiving half of a [`Channel`].
pub struct Receiver {
    stream: TcpStream,
    cipher: ChaCha20Poly1305,
    count: u64,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("frames", &self.count)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("frames", &self.count)
            .finish_non_exhaustive()
    }
}

/// What arrived: a message or data.
#[derive(Debug)]
pub enum Frame {
    /// A message (JSON), parsed by the caller.
    Message(Vec<u8>),
    /// A piece of data.
    Data(Vec<u8>),
}

type HmacSha256 = Hmac<Sha256>;

fn proof(key: &Key32, label: &str, nonce_s: &[u8], nonce_d: &[u8]) -> HmacSha256 {
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(&key.0).expect("HMAC takes keys of any length");
    mac.update(label.as_bytes());
    mac.update(nonce_s);
    mac.update(nonce_d);
    mac
}

fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut bytes = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut bytes).map_err(io::Error::other)?;
    Ok(bytes)
}

fn cipher(key: &Key32, nonce_s: &[u8], nonce_d: &[u8], info: &str) -> ChaCha20Poly1305 {
    let mut salt = Vec::with_capacity(2 * NONCE_LEN);
    salt.extend_from_slice(nonce_s);
    salt.extend_from_slice(nonce_d);
    let hkdf = hkdf::Hkdf::<Sha256>::new(Some(&salt), &key.0);
    let mut okm = [0u8; 32];
    hkdf.expand(info.as_bytes(), &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    ChaCha20Poly1305::new(Key::from_slice(&okm))
}

const TO_DESTINATION: &str = "crac-migrate source->destination";
const TO_SOURCE: &str = "crac-migrate destination->source";

impl Channel {
    /// Connects to the destination at `addr` and authenticates both ways with `key`; reads and
    /// writes then time out after `timeout` (a cut link is noticed within it).
    ///
    /// # Errors
    ///
    /// [`HandshakeError::Refused`] when the destination does not prove it holds the key or
    /// hangs up on this end's proof; [`HandshakeError::Io`] when it cannot be reached.
    pub fn connect(
        addr: SocketAddr,
        key: &Key32,
        timeout: Duration,
    ) -> Result<Channel, HandshakeError> {
        let mut stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let nonce_s = nonce()?;
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&nonce_s);
        stream.write_all(&hello)?;
        let mut reply = [0u8; 8 + NONCE_LEN + PROOF_LEN];
        read_or_refused(
            &mut stream,
            &mut reply,
            "the destination closed the connection during the handshake",
        )?;
        if &reply[..8] != MAGIC {
            return Err(HandshakeError::Refused(format!(
                "{addr} does not speak crac's migration protocol"
            )));
        }
        let nonce_d = &reply[8..8 + NONCE_LEN];
        proof(key, "crac-migrate destination", &nonce_s, nonce_d)
            .verify_slice(&reply[8 + NONCE_LEN..])
            .map_err(|_| {
                HandshakeError::Refused(format!(
                    "{addr} could not prove it holds the migration key: not the destination you meant, or its key differs; nothing was sent"
                ))
            })?;
        let mine = proof(key, "crac-migrate source", &nonce_s, nonce_d).finalize();
        stream.write_all(&mine.into_bytes())?;
        // The destination hangs up on a wrong proof, or answers with its first frame.
        let mut channel = Channel::sealed(
            stream,
            key,
            &nonce_s,
            nonce_d,
            TO_DESTINATION,
            TO_SOURCE,
            addr,
        )?;
        channel.set_timeout(timeout)?;
        Ok(channel)
    }

    /// Accepts one connection on `listener` and authenticates both ways with `key`.
    ///
    /// # Errors
    ///
    /// [`HandshakeError::Refused`] for a peer without the key (it was sent nothing but a nonce
    /// and this end's proof, and the connection is closed); [`HandshakeError::Io`] otherwise.
    pub fn accept(
        listener: &TcpListener,
        key: &Key32,
        timeout: Duration,
    ) -> Result<Channel, HandshakeError> {
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut hello = [0u8; 8 + NONCE_LEN];
        read_or_refused(
            &mut stream,
            &mut hello,
            &format!("{peer} closed the connection during the handshake"),
        )?;
        if &hello[..8] != MAGIC {
            return Err(HandshakeError::Refused(format!(
                "{peer} does not speak crac's migration protocol"
            )));
        }
        let nonce_s = &hello[8..];
        let nonce_d = nonce()?;
        let mut reply = MAGIC.to_vec();
        reply.extend_from_slice(&nonce_d);
        reply.extend_from_slice(
            &proof(key, "crac-migrate destination", nonce_s, &nonce_d)
                .finalize()
                .into_bytes(),
        );
        stream.write_all(&reply)?;
        let mut theirs = [0u8; PROOF_LEN];
        read_or_refused(
            &mut stream,
            &mut theirs,
            &format!("{peer} hung up: it does not hold the migration key"),
        )?;
        proof(key, "crac-migrate source", nonce_s, &nonce_d)
            .verify_slice(&theirs)
            .map_err(|_| {
                HandshakeError::Refused(format!(
                    "{peer} could not prove it holds the migration key: refused, nothing was sent"
                ))
            })?;
        let mut channel = Channel::sealed(
            stream,
            key,
            nonce_s,
            &nonce_d,
            TO_SOURCE,
            TO_DESTINATION,
            peer,
        )?;
        channel.set_timeout(timeout)?;
        Ok(channel)
    }

    fn sealed(
        stream: TcpStream,
        key: &Key32,
        nonce_s: &[u8],
        nonce_d: &[u8],
        send: &str,
        recv: &str,
        peer: SocketAddr,
    ) -> io::Result<Channel> {
        Ok(Channel {
            rx: Receiver {
                stream: stream.try_clone()?,
                cipher: cipher(key, nonce_s, nonce_d, recv),
                count: 0,
            },
            tx: Sender {
                stream,
                cipher: cipher(key, nonce_s, nonce_d, send),
                count: 0,
                bytes: 0,
            },
            peer,
        })
    }

    /// The other end's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Makes reads and writes time out after `timeout`.
    ///
    /// # Errors
    ///
    /// When the socket refuses it.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.tx.stream.set_read_timeout(Some(timeout))?;
        self.tx.stream.set_write_timeout(Some(timeout))
    }

    /// Bytes written to the connection so far.
    pub fn bytes_sent(&self) -> u64 {
        self.tx.bytes
    }

    /// The two halves, for a relay: the receiver on one thread, the sender shared.
    pub fn split(self) -> (Sender, Receiver) {
        (self.tx, self.rx)
    }

    /// Sends one message.
    ///
    /// # Errors
    ///
    /// When the connection fails.
    pub fn send<T: Serialize>(&mut self, message: &T) -> io::Result<()> {
        self.tx.send(message)
    }

    /// Receives one message.
    ///
    /// # Errors
    ///
    /// When the connection fails, a frame does not open, or it is not such a message.
    pub fn recv<T: DeserializeOwned>(&mut self) -> io::Result<T> {
        match self.rx.recv_frame()? {
            Frame::Message(bytes) => parse(&bytes),
            Frame::Data(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent data where a message was due",
            )),
        }
    }

    /// Sends `bytes` as data frames.
    ///
    /// # Errors
    ///
    /// When the connection fails.
    pub fn send_data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tx.send_data(bytes)
    }

    /// Receives one data frame.
    ///
    /// # Errors
    ///
    /// When the connection fails, a frame does not open, or it is a message.
    pub fn recv_data(&mut self) -> io::Result<Vec<u8>> {
        match self.rx.recv_frame()? {
            Frame::Data(bytes) => Ok(bytes),
            Frame::Message(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent a message where data was due",
            )),
        }
    }
}

/// A message's JSON, parsed.
///
/// # Errors
///
/// When it is not such a message.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer sent a message this crac does not understand: {e}"),
        )
    })
}

fn frame_nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    *Nonce::from_slice(&bytes)
}

impl Sender {
    fn send_frame(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let mut plain = Vec::with_capacity(payload.len() + 1);
        plain.push(kind);
        plain.extend_from_slice(payload);
        let sealed = self
            .cipher
            .encrypt(&frame_nonce(self.count), plain.as_slice())
            .map_err(|_| io::Error::other("cannot seal a frame"))?;
        self.count += 1;
        let len = u32::try_from(sealed.len()).map_err(io::Error::other)?;
        let mut frame = Vec::with_capacity(4 + sealed.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&sealed);
        self.stream.write_all(&frame)?;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    /// Sends one message.
    ///
    /// # Errors
    ///
    /// When the connection fails.
    pub fn send<T: Serialize>(&mut self, message: &T) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        self.send_frame(KIND_MESSAGE, &bytes)
    }

    /// Sends `bytes` as data frames.
    ///
    /// # Errors
    ///
    /// When the connection fails.
    pub fn send_data(&mut self, bytes: &[u8]) -> io::Result<()> {
        for piece in bytes.chunks(MAX_PAYLOAD) {
            self.send_frame(KIND_DATA, piece)?;
        }
        Ok(())
    }

    /// Closes the connection both ways: the other half's reads end.
    pub fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Receiver {
    /// Receives one frame.
    ///
    /// # Errors
    ///
    /// When the connection fails or a frame does not open.
    pub fn recv_frame(&mut self) -> io::Result<Frame> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if !(1 + 16..=MAX_PAYLOAD + 1 + 16).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the peer sent a frame of {len} bytes"),
            ));
        }
        let mut sealed = vec![0u8; len];
        self.stream.read_exact(&mut sealed)?;
        let mut plain = self
            .cipher
            .decrypt(&frame_nonce(self.count), sealed.as_slice())
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a frame failed its integrity check (altered, replayed or out of order): the transfer is abandoned",
                )
            })?;
        self.count += 1;
        let kind = plain.remove(0);
        match kind {
            KIND_MESSAGE => Ok(Frame::Message(plain)),
            KIND_DATA => Ok(Frame::Data(plain)),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the peer sent a frame of kind {other}"),
            )),
        }
    }
}

/// `read_exact`, an early end of the connection being a refusal that says `what`.
fn read_or_refused(
    stream: &mut TcpStream,
    buf: &mut [u8],
    what: &str,
) -> Result<(), HandshakeError> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            HandshakeError::Refused(what.to_owned())
        }
        _ => HandshakeError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key32 {
        Key32(vec![byte; 32])
    }

    fn pair(
        source_key: Key32,
        destination_key: Key32,
    ) -> (
        Result<Channel, HandshakeError>,
        Result<Channel, HandshakeError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let destination = std::thread::spawn(move || {
            Channel::accept(&listener, &destination_key, Duration::from_secs(5))
        });
        let source = Channel::connect(addr, &source_key, Duration::from_secs(5));
        (source, destination.join().unwrap())
    }

    #[test]
    fn both_ends_with_the_key_talk_and_stream_data() {
        let (source, destination) = pair(key(7), key(7));
        let (mut source, mut destination) = (source.unwrap(), destination.unwrap());
        source.send(&serde_json::json!({"hello": 1})).unwrap();
        let data = vec![5u8; MAX_PAYLOAD + 10];
        source.send_data(&data).unwrap();
        let message: serde_json::Value = destination.recv().unwrap();
        assert_eq!(message["hello"], 1);
        let mut got = destination.recv_data().unwrap();
        got.extend(destination.recv_data().unwrap());
        assert_eq!(got, data);
        destination.send(&"back").unwrap();
        assert_eq!(source.recv::<String>().unwrap(), "back");
    }

    #[test]
    fn a_peer_without_the_key_is_refused_by_both_sides() {
        let (source, destination) = pair(key(1), key(2));
        assert!(
            matches!(&source, Err(HandshakeError::Refused(m)) if m.contains("could not prove")),
            "{source:?}"
        );
        assert!(destination.is_err());
    }

    #[test]
    fn an_altered_frame_does_not_open() {
        let (source, destination) = pair(key(3), key(3));
        let (mut source, mut destination) = (source.unwrap(), destination.unwrap());
        // A frame sealed for another position in the stream: what a replay looks like.
        source.tx.count += 1;
        source.send(&"late").unwrap();
        let err = destination.recv::<String>().unwrap_err();
        assert!(err.to_string().contains("integrity check"), "{err}");
    }

    #[test]
    fn a_short_or_shared_key_file_is_refused() {
        let dir = crac_fs::TempDir::new("crac-key-test").unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "short\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Key32::read(&path).unwrap_err();
        assert!(err.to_string().contains("at least 32"), "{err}");
        std::fs::write(&path, "k".repeat(40)).unwrap();
        assert!(Key32::read(&path).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Key32::read(&path).is_err());
    }
}
