//! `upstream`: a tiny local stand-in for a slow database, the peer of the `cache-server`
//! example.
//!
//! It listens on `127.0.0.1:PORT` (or `$UPSTREAM_ADDRESS`) and answers a one-line protocol on every connection, for as
//! long as the connection stays open:
//!
//! ```text
//! GET key\n   ->   value-of-key\n      (after a simulated slow lookup, 20 ms by default)
//! ```
//!
//! It numbers the connections it accepts and logs each one to stderr
//! (`upstream: connection #2 from 127.0.0.1:40312`), so a demo can show that the cache server
//! closed its connection before the checkpoint and opened a new one after the restore.
//!
//! ```text
//! upstream [PORT]          PORT defaults to $UPSTREAM_PORT, then 7071
//! UPSTREAM_DELAY_MS=20     the simulated lookup time
//! UPSTREAM_ADDRESS=IP      where to listen instead of 127.0.0.1 (another host's reach)
//! ```
//!
//! This process is not checkpointed; it just stays up while the cache server goes away and
//! comes back.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const DEFAULT_PORT: u16 = 7071;
const DEFAULT_DELAY_MS: u64 = 20;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("upstream: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let port = port_from_args()?;
    let delay = Duration::from_millis(env_number("UPSTREAM_DELAY_MS", DEFAULT_DELAY_MS)?);
    let address = match std::env::var("UPSTREAM_ADDRESS") {
        Ok(raw) if !raw.is_empty() => raw
            .parse()
            .map_err(|_| format!("UPSTREAM_ADDRESS={raw:?}: expected an IPv4 address"))?,
        _ => Ipv4Addr::LOCALHOST,
    };
    let listener = TcpListener::bind((address, port)).map_err(|err| {
        format!("cannot listen on {address}:{port}: {err} (is another process using the port?)")
    })?;
    eprintln!(
        "upstream: pid {} listening on {address}:{port} (GET key -> value after {} ms)",
        std::process::id(),
        delay.as_millis()
    );
    let connections = Arc::new(AtomicU64::new(0));
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let number = connections.fetch_add(1, Ordering::SeqCst) + 1;
                thread::spawn(move || serve(stream, number, delay));
            }
            // A client that gave up before it was accepted, or a transient shortage of fds:
            // log it and go on serving the others.
            Err(err) => eprintln!("upstream: accept failed: {err}"),
        }
    }
    Ok(())
}

/// Serves one connection until the peer closes it.
fn serve(stream: TcpStream, number: u64, delay: Duration) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "an unknown peer".to_owned(), |addr| addr.to_string());
    eprintln!("upstream: connection #{number} from {peer}");
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(err) => {
            eprintln!("upstream: connection #{number}: cannot use the socket: {err}");
            return;
        }
    };
    let mut requests = 0u64;
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    let end = loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break "closed by the peer".to_owned(),
            Ok(_) => {}
            Err(err) => break format!("read failed: {err}"),
        }
        requests += 1;
        let reply = match line.trim_end().split_once(' ') {
            Some(("GET", key)) if !key.is_empty() && !key.contains(' ') => {
                thread::sleep(delay); // the "slow database lookup"
                format!("value-of-{key}")
            }
            _ => "ERR expected: GET key".to_owned(),
        };
        if let Err(err) = writer.write_all(format!("{reply}\n").as_bytes()) {
            break format!("write failed: {err}");
        }
    };
    eprintln!(
        "upstream: connection #{number} from {peer} ended after {requests} request(s): {end}"
    );
}

fn port_from_args() -> Result<u16, String> {
    let mut args = std::env::args().skip(1);
    let raw = match (args.next(), args.next()) {
        (Some(arg), None) if arg == "-h" || arg == "--help" => {
            println!("usage: upstream [PORT]   (default: $UPSTREAM_PORT, then {DEFAULT_PORT})");
            std::process::exit(0);
        }
        (Some(arg), None) => Some(arg),
        (None, _) => std::env::var("UPSTREAM_PORT")
            .ok()
            .filter(|v| !v.is_empty()),
        (Some(_), Some(_)) => return Err("usage: upstream [PORT]".to_owned()),
    };
    match raw {
        None => Ok(DEFAULT_PORT),
        Some(raw) => raw
            .parse()
            .map_err(|_| format!("invalid port {raw:?}: expected a number from 0 to 65535")),
    }
}

fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(raw) if !raw.is_empty() => raw
            .parse()
            .map_err(|_| format!("{name}={raw:?}: expected a number")),
        _ => Ok(default),
    }
}
