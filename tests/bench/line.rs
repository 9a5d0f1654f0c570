//! The example services' one-line protocol, from the client side (items 4 and 6).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::procs::Res;

/// A loopback port free now, for a service to listen on.
pub(crate) fn free_port() -> Res<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// One request to the service on loopback `port`, connecting within `connect_limit`: the
/// reply line, or why there is none (no connection, no reply, an empty or `ERR` reply).
pub(crate) fn ask(port: u16, request: &str, connect_limit: Duration) -> Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, connect_limit).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let line = line.trim_end().to_owned();
    if line.is_empty() || line.starts_with("ERR") {
        return Err(format!("reply {line:?}"));
    }
    Ok(line)
}
