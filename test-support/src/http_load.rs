//! A bounded HTTP/1.1 load on loopback, from threads of the test itself: clients that keep
//! their connection alive and clients that open a new connection per request, each pausing
//! between requests. It counts what clients of a service being upgraded or checkpointed see:
//! refused connections, failed requests, every answer with its latency.
//!
//! A keep-alive client whose reused connection is closed by the server before any byte of the
//! answer came sends the request again on a new connection, as HTTP clients do for idempotent
//! requests (RFC 9112, 9.3.1): that is counted as `retried`, not failed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What load to put.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The service's loopback port.
    pub port: u16,
    /// Clients that keep their connection alive.
    pub keep_alive: usize,
    /// Clients that open a new connection per request.
    pub fresh: usize,
    /// Each client's pause between requests.
    pub pause: Duration,
}

/// One answer.
#[derive(Clone, Debug)]
pub struct Answer {
    /// When the request was sent.
    pub sent: Instant,
    /// How long the answer took.
    pub took: Duration,
    /// The answer's body.
    pub body: String,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Every answer, in no particular order.
    pub answers: Vec<Answer>,
    /// Connections refused (nothing listened).
    pub refused: usize,
    /// Requests that failed otherwise, with how.
    pub failed: Vec<String>,
    /// Requests sent again on a new connection after the server closed a reused one.
    pub retried: usize,
}

impl Tally {
    /// The answers to requests sent at or after `from` (and before `to`, if given).
    pub fn between(&self, from: Instant, to: Option<Instant>) -> impl Iterator<Item = &Answer> {
        self.answers
            .iter()
            .filter(move |a| a.sent >= from && to.is_none_or(|to| a.sent < to))
    }

    /// The 99th percentile of the latencies of `answers` (zero for none).
    pub fn p99<'a>(answers: impl Iterator<Item = &'a Answer>) -> Duration {
        let mut took: Vec<Duration> = answers.map(|a| a.took).collect();
        if took.is_empty() {
            return Duration::ZERO;
        }
        took.sort_unstable();
        took[(took.len() * 99).div_ceil(100).saturating_sub(1)]
    }
}

/// The load, running.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    clients: Vec<JoinHandle<Tally>>,
}

impl Load {
    /// Starts the clients.
    pub fn start(options: Options) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let addr = SocketAddr::from(([127, 0, 0, 1], options.port));
        let clients = (0..options.keep_alive + options.fresh)
            .map(|i| {
                let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
                let keep_alive = i < options.keep_alive;
                std::thread::spawn(move || {
                    client(addr, keep_alive, options.pause, &stop, &answered)
                })
            })
            .collect();
        Load {
            stop,
            answered,
            clients,
        }
    }

    /// How many requests have been answered so far, by all clients.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Stops the clients (each finishes its request) and adds up what they saw.
    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Tally::default();
        for client in self.clients {
            let tally = client.join().expect("a load client panicked");
            all.answers.extend(tally.answers);
            all.refused += tally.refused;
            all.failed.extend(tally.failed);
            all.retried += tally.retried;
        }
        all
    }
}

/// How one request went.
enum Outcome {
    Answered(String),
    Refused,
    /// The reused connection was closed before any byte of the answer.
    Closed,
    Failed(String),
}

fn client(
    addr: SocketAddr,
    keep_alive: bool,
    pause: Duration,
    stop: &AtomicBool,
    answered: &AtomicUsize,
) -> Tally {
    let mut tally = Tally::default();
    let mut connection: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::SeqCst) {
        let sent = Instant::now();
        let reused = connection.is_some();
        let mut outcome = request(addr, &mut connection, keep_alive);
        if reused && matches!(outcome, Outcome::Closed) {
            tally.retried += 1;
            outcome = request(addr, &mut connection, keep_alive);
        }
        match outcome {
            Outcome::Answered(body) => {
                answered.fetch_add(1, Ordering::SeqCst);
                tally.answers.push(Answer {
                    sent,
                    took: sent.elapsed(),
                    body,
                });
            }
            Outcome::Refused => tally.refused += 1,
            Outcome::Closed => tally
                .failed
                .push("the connection closed before any answer".into()),
            Outcome::Failed(how) => tally.failed.push(how),
        }
        std::thread::sleep(pause);
    }
    tally
}

/// One request on `connection` (a new one if there is none); the connection is kept for the
/// next request if both sides keep it alive.
fn request(
    addr: SocketAddr,
    connection: &mut Option<BufReader<TcpStream>>,
    keep_alive: bool,
) -> Outcome {
    if connection.is_none() {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(stream) => {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = stream.set_nodelay(true);
                *connection = Some(BufReader::new(stream));
            }
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => return Outcome::Refused,
            Err(err) => return Outcome::Failed(format!("connect: {err}")),
        }
    }
    let reader = connection.as_mut().expect("connected above");
    let line = if keep_alive {
        "GET / HTTP/1.1\r\nhost: localhost\r\n\r\n"
    } else {
        "GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    };
    let outcome = match reader.get_mut().write_all(line.as_bytes()) {
        Ok(()) => read_answer(reader),
        Err(err) => Err((false, format!("send: {err}"))),
    };
    match outcome {
        Ok((body, close)) => {
            if close || !keep_alive {
                *connection = None;
            }
            Outcome::Answered(body)
        }
        Err((nothing_came, how)) => {
            *connection = None;
            if nothing_came {
                Outcome::Closed
            } else {
                Outcome::Failed(how)
            }
        }
    }
}

/// Reads one answer: its body and whether the server closes the connection. On error, whether
/// nothing at all came, and how it failed.
fn read_answer(reader: &mut BufReader<TcpStream>) -> Result<(String, bool), (bool, String)> {
    let mut status = String::new();
    match reader.read_line(&mut status) {
        Ok(0) => return Err((true, "closed before the answer".into())),
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {
            return Err((true, format!("reset before the answer: {err}")))
        }
        Err(err) => return Err((false, format!("reading the answer: {err}"))),
    }
    if !status.starts_with("HTTP/1.1 200") {
        return Err((false, format!("answer {:?}", status.trim_end())));
    }
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) => return Err((false, "closed in the answer's headers".into())),
            Ok(_) => {}
            Err(err) => return Err((false, format!("reading the headers: {err}"))),
        }
        let header = header.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(value) = header.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        if header == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .map_err(|err| (false, format!("reading the body: {err}")))?;
    Ok((String::from_utf8_lossy(&body).into_owned(), close))
}
