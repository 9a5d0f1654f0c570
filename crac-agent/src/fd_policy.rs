//! The agent's side of file-descriptor policies ([`crac_protocol::fd_policy`]): this
//! process's descriptors as a policy sees them ([`descriptors`]), and carrying out `close`
//! rules.

use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use crac_protocol::fd_facts::address;
use crac_protocol::fd_policy::{is_terminal, unsupported, Descriptor, Kind, Policy, Verdict};

use crate::procfs;
use nix::sys::socket::{
    getpeername, getsockname, getsockopt, sockopt, SockType, SockaddrLike, SockaddrStorage,
};

/// This process's descriptors, each with its kind and what it is: what the agent reports.
pub(crate) fn descriptors() -> Vec<Descriptor> {
    let mut out: Vec<Descriptor> = procfs::links()
        .into_iter()
        .map(|(fd, target)| describe(fd, &target))
        .collect();
    out.sort_by_key(|d| d.fd);
    out
}

fn describe(fd: RawFd, target: &str) -> Descriptor {
    let (kind, what) = if target.starts_with("socket:[") {
        socket(fd).unwrap_or((None, target.to_owned()))
    } else if is_terminal(target) {
        (Some(Kind::Tty), target.to_owned())
    } else if let Some(path) = target.strip_suffix(" (deleted)") {
        (Some(Kind::Ghost), path.to_owned())
    } else if unsupported(target).is_some() {
        (Some(Kind::Unsupported), target.to_owned())
    } else {
        (None, target.to_owned())
    };
    Descriptor {
        fd,
        kind: kind.map(|k| k.as_str().to_owned()),
        what,
        owner: None,
    }
}

/// A socket of this process: its kind and `local -> peer` when connected.
fn socket(fd: RawFd) -> Option<(Option<Kind>, String)> {
    let peer = getpeername::<SockaddrStorage>(fd).ok()?;
    let local = getsockname::<SockaddrStorage>(fd).ok()?;
    // SAFETY: `fd` is open in this process for the length of this call (it was just listed
    // in /proc/self/fd); the borrow does not outlive it and does not close it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stream = matches!(
        getsockopt(&borrowed, sockopt::SockType).ok()?,
        SockType::Stream | SockType::SeqPacket
    );
    let kind =
        match peer.family() {
            Some(
                nix::sys::socket::AddressFamily::Inet | nix::sys::socket::AddressFamily::Inet6,
            ) if stream => Some(Kind::Tcp),
            Some(nix::sys::socket::AddressFamily::Unix) if stream => Some(Kind::Unix),
            _ => None,
        };
    Some((kind, format!("{} -> {}", address(&local), address(&peer))))
}

/// Points every descriptor of this process that `policy` says to `close` at `/dev/null`
/// (`dup2`), and says which; a `dry_run` only says. The descriptors in `keep` (the agent's
/// own) are left alone.
pub(crate) fn close_matching(policy: &Policy, keep: &[RawFd], dry_run: bool) -> Vec<Descriptor> {
    if !policy.says(Verdict::Close) {
        return Vec::new();
    }
    let Ok(null) = fs::File::open("/dev/null") else {
        return Vec::new();
    };
    descriptors()
        .into_iter()
        .filter(|d| d.fd != null.as_raw_fd() && !keep.contains(&d.fd))
        .filter(|d| {
            let kind = d.kind.as_deref().and_then(Kind::parse);
            let verdict = match kind {
                Some(kind) => policy.verdict(kind, &d.what),
                None => policy.verdict_any(&d.what),
            };
            verdict == Some(Verdict::Close)
        })
        .filter_map(|d| {
            if !dry_run {
                // SAFETY: both descriptors are open in this process; dup2 replaces `d.fd` by a
                // duplicate of /dev/null atomically, so its owner keeps a valid descriptor.
                let replaced = unsafe { libc::dup2(null.as_raw_fd(), d.fd) };
                if replaced != d.fd {
                    return None;
                }
            }
            Some(d)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn this_process_s_descriptors_are_described_and_a_close_rule_points_them_at_dev_null() {
        let _turn = crate::descriptor_table_turn();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let fd = client.as_raw_fd();
        let mine = descriptors().into_iter().find(|d| d.fd == fd).unwrap();
        assert_eq!(mine.kind.as_deref(), Some("tcp"));
        assert!(
            mine.what.ends_with(&format!(" -> 127.0.0.1:{port}")),
            "{mine:?}"
        );

        let policy = Policy::parse("p", &format!("close tcp * -> 127.0.0.1:{port}")).unwrap();
        let listed = close_matching(&policy, &[], true);
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(
            listed[0].to_string(),
            format!(
                "fd {fd}: {}",
                mine.kind.map_or(String::new(), |k| format!("{k} ")) + &mine.what
            )
        );
        // A dry run leaves it open.
        assert!(fs::read_link(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .to_string_lossy()
            .starts_with("socket:"));
        let closed = close_matching(&policy, &[], false);
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert_eq!(
            fs::read_link(format!("/proc/self/fd/{fd}")).unwrap(),
            Path::new("/dev/null")
        );
    }
}
