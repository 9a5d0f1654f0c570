//! crac-test-activation: an HTTP service with no crac code at all, written against systemd's
//! socket-activation convention only, as any service may be: it takes its listener from
//! `LISTEN_FDS` (descriptor 3, when `LISTEN_PID` is its pid) or binds `127.0.0.1:$PORT`, says
//! `READY=1` to `NOTIFY_SOCKET`, and on SIGTERM stops accepting, finishes the requests it has,
//! closes its keep-alive connections between requests, and exits. `crac upgrade` must hand its
//! listener over without an agent (pidfd_getfd) and retire it with SIGTERM.
//!
//! Answers `VERSION pid=PID` (`VERSION` from the environment, default `v1`).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn main() -> io::Result<()> {
    let version = std::env::var("VERSION").unwrap_or_else(|_| "v1".into());
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let passed = ours && std::env::var("LISTEN_FDS").is_ok_and(|n| n == "1");
    let listener = if passed {
        // SAFETY: by the convention, descriptor 3 is the listening socket passed to this
        // process (LISTEN_PID is its own), and nothing else here owns it.
        unsafe { TcpListener::from_raw_fd(3) }
    } else {
        let port = std::env::var("PORT").unwrap_or_else(|_| "7091".into());
        TcpListener::bind(format!("127.0.0.1:{port}"))?
    };
    listener.set_nonblocking(true)?;
    let stopping = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stopping))?;
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        std::os::unix::net::UnixDatagram::unbound()?.send_to(b"READY=1", path)?;
    }
    eprintln!(
        "activation {version}: pid {} serving ({})",
        std::process::id(),
        if passed { "passed listener" } else { "bound" }
    );
    let open = Arc::new(AtomicUsize::new(0));
    while !stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (version, stopping, open) =
                    (version.clone(), Arc::clone(&stopping), Arc::clone(&open));
                open.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = serve(stream, &version, &stopping);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(err) => return Err(err),
        }
    }
    // Stopped accepting: what waits in the queue is the successor's to accept.
    drop(listener);
    while open.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("activation {version}: stopped");
    Ok(())
}

/// Serves one keep-alive connection until the client closes it, or the service stops
/// (between requests).
fn serve(stream: TcpStream, version: &str, stopping: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    loop {
        // Between requests: wait for the next one, or stop.
        let mut request = Vec::new();
        loop {
            // A read cut short by the timeout keeps its bytes in `line`: it goes on from there.
            match reader.read_line(&mut line) {
                Ok(0) => return Ok(()),
                Ok(_) if !line.ends_with('\n') => {}
                Ok(_) => {
                    let complete = std::mem::take(&mut line);
                    if complete == "\r\n" && !request.is_empty() {
                        break;
                    }
                    request.push(complete);
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if request.is_empty() && line.is_empty() && stopping.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                }
                Err(err) => return Err(err),
            }
        }
        let body = format!("{version} pid={}\n", std::process::id());
        let closing = stopping.load(Ordering::SeqCst);
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if closing { "connection: close\r\n" } else { "" }
        )?;
        if closing {
            return Ok(());
        }
    }
}
