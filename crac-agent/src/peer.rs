//! Who may talk to the agent: root and the process's own uid, checked with `SO_PEERCRED`.
//!
//! The folder's 0700 mode already keeps others out; the credential check is the second lock,
//! and the one that still holds when the agent's folder was moved somewhere looser.

use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::geteuid;

/// Accepts the peer, or says why not in a line fit for a reply.
pub(crate) fn check(stream: &UnixStream) -> Result<(), String> {
    let credentials = getsockopt(stream, PeerCredentials)
        .map_err(|err| format!("cannot read the peer's credentials (SO_PEERCRED): {err}"))?;
    let own = geteuid().as_raw();
    let peer = credentials.uid();
    if peer == 0 || peer == own {
        Ok(())
    } else {
        Err(format!(
            "permission denied: uid {peer} may not control this process; only root and uid {own} may"
        ))
    }
}
