//! A process's descriptors as the preflight sees them: from its agent's facts, or from
//! outside (its `/proc/PID/fd` links, each socket asked through a copy of its descriptor, its
//! namespace's socket tables as the fallback). The verdicts are the same either way.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;

use crac_protocol::fd_facts::{self, Facts};

use super::pidfd::{Pidfd, SocketFacts};
use crate::procfs;

/// What the agents in a tree told of their processes' descriptors, by pid (as this side sees
/// it): [`crac_protocol::fd_facts`], sent with their before-checkpoint replies. A process not in
/// it is looked at through `/proc`.
pub type AgentFacts = HashMap<u32, Facts>;

/// One descriptor, as the preflight knows it.
pub(super) enum Seen {
    /// A socket: its inode, and what it says about itself (`None`: nothing to say).
    Socket(u64, Option<SocketFacts>),
    /// Anything else: its `/proc/PID/fd` link, and its size if it is a regular file no link
    /// names any more (0 otherwise).
    Linked(String, u64),
}

/// A process's descriptors as its agent told them: every socket, the TCP connections with
/// what they say, and the links that decide.
pub(super) fn from_facts(facts: &Facts) -> Vec<(u32, Seen)> {
    let connected: HashMap<u64, &fd_facts::Connected> =
        facts.connected.iter().map(|c| (c.inode, c)).collect();
    let mut seen: Vec<(u32, Seen)> = Vec::with_capacity(facts.sockets.len() + facts.linked.len());
    for c in &facts.connected {
        let Ok(fd) = u32::try_from(c.fd) else {
            continue;
        };
        seen.push((
            fd,
            Seen::Socket(
                c.inode,
                Some(SocketFacts {
                    tcp_peer: c.tcp,
                    unix_connected: !c.tcp,
                    local: c.local.clone(),
                    peer: c.peer.clone(),
                    waiting: 0,
                }),
            ),
        ));
    }
    let others = facts
        .sockets
        .iter()
        .enumerate()
        .filter(|(_, inode)| !connected.contains_key(inode));
    if facts.socket_fds.len() == facts.sockets.len() {
        let listening: HashMap<RawFd, &fd_facts::Listening> =
            facts.listening.iter().map(|l| (l.fd, l)).collect();
        seen.extend(others.filter_map(|(i, &inode)| {
            let raw = facts.socket_fds[i];
            let fd = u32::try_from(raw).ok()?;
            let other = match listening.get(&raw) {
                Some(l) => SocketFacts {
                    waiting: l.waiting,
                    local: l.local.clone(),
                    ..SocketFacts::default()
                },
                // Any of the others may be a connected Unix socket: the sock_diag dump tells
                // which.
                None => SocketFacts {
                    unix_connected: true,
                    ..SocketFacts::default()
                },
            };
            Some((fd, Seen::Socket(inode, Some(other))))
        }));
    } else {
        // An older agent listed its connected Unix sockets among `connected`: the others
        // count only as members of the tree (a Unix peer among them is inside it). It tells
        // no listener's queue either: CRIU alone finds an in-flight connection there.
        seen.extend(others.map(|(_, &inode)| (u32::MAX, Seen::Socket(inode, None))));
    }
    for l in &facts.linked {
        if let Ok(fd) = u32::try_from(l.fd) {
            seen.push((fd, Seen::Linked(l.target.clone(), l.size)));
        }
    }
    // In the order /proc lists them, so a refusal reads the same either way.
    seen.sort_by_key(|(fd, _)| *fd);
    seen
}

/// A process's descriptors from `/proc/PID/fd`: every link read, each socket asked through a
/// copy of its descriptor, or found in its namespace's `tables` when it cannot be copied.
pub(super) fn from_proc(
    pid: u32,
    netns: u64,
    tables: &mut HashMap<u64, NetTables>,
) -> Vec<(u32, Seen)> {
    let Some(links) = procfs::fd_links(pid) else {
        return Vec::new();
    };
    let pidfd = Pidfd::open(pid);
    let mut seen = Vec::new();
    for link in links {
        let fd = link.fd;
        if let Some(inode) = link.socket_inode() {
            // Each socket is asked directly (a few system calls); the namespace's tables,
            // which list every socket of the namespace (the TCP ones by walking the kernel's
            // whole hash table), are the fallback.
            let facts = pidfd.as_ref().and_then(|p| p.socket(fd)).or_else(|| {
                let table = tables.entry(netns).or_insert_with(|| NetTables::read(pid));
                table.unix(inode).or_else(|| table.tcp(pid, inode))
            });
            seen.push((fd, Seen::Socket(inode, facts)));
            continue;
        }
        // Only a regular file that no link names any more is a ghost to CRIU (one still
        // linked elsewhere is dumped as a link, whatever its size).
        let size = if link.target.ends_with(" (deleted)") {
            link.metadata().map_or(0, |m| {
                if m.is_file() && m.nlink() == 0 {
                    m.len()
                } else {
                    0
                }
            })
        } else {
            0
        };
        seen.push((fd, Seen::Linked(link.target, size)));
    }
    seen
}

/// One network namespace's sockets, by inode, from `/proc/PID/net`: its Unix sockets (a
/// short read), and its TCP sockets, read only for a socket that cannot be asked directly
/// (reading them walks the kernel's whole TCP hash table).
#[derive(Default)]
pub(super) struct NetTables {
    /// Unix sockets, and whether each is a connected stream or seqpacket one.
    unix: HashMap<u64, bool>,
    /// TCP sockets: what they say, without their descriptors.
    tcp: Option<HashMap<u64, SocketFacts>>,
}

impl NetTables {
    /// The Unix sockets as `pid` sees them (its network namespace).
    pub(super) fn read(pid: u32) -> NetTables {
        let mut unix = HashMap::new();
        for socket in procfs::unix_sockets(pid)
            .iter()
            .flat_map(procfs::UnixSockets::iter)
        {
            // Type 1 is SOCK_STREAM, 5 SOCK_SEQPACKET; state 3 is connected.
            let connected = (socket.kind == 1 || socket.kind == 5) && socket.state == 3;
            unix.insert(socket.inode, connected);
        }
        NetTables { unix, tcp: None }
    }

    fn unix(&self, inode: u64) -> Option<SocketFacts> {
        self.unix.get(&inode).map(|&connected| SocketFacts {
            unix_connected: connected,
            ..SocketFacts::default()
        })
    }

    /// A TCP socket as `pid`'s namespace lists it (the tables are read on first use).
    fn tcp(&mut self, pid: u32, inode: u64) -> Option<SocketFacts> {
        let tcp = self.tcp.get_or_insert_with(|| {
            let mut tcp = HashMap::new();
            for file in ["tcp", "tcp6"] {
                let text = procfs::net_table(pid, file);
                for line in text.lines().skip(1) {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let (Some(local), Some(remote), Some(state), Some(inode)) =
                        (f.get(1), f.get(2), f.get(3), f.get(9))
                    else {
                        continue;
                    };
                    let Ok(inode) = inode.parse::<u64>() else {
                        continue;
                    };
                    // 0A is LISTEN, 07 CLOSE (bound, never connected); others have a peer.
                    let has_peer = *state != "0A" && *state != "07";
                    // tx_queue:rx_queue; a listener's rx_queue is its accept queue.
                    let waiting = f
                        .get(4)
                        .and_then(|q| q.split_once(':'))
                        .and_then(|(_, rx)| u32::from_str_radix(rx, 16).ok())
                        .filter(|_| *state == "0A")
                        .unwrap_or(0);
                    let facts = SocketFacts {
                        tcp_peer: has_peer,
                        local: address(local),
                        peer: if has_peer {
                            address(remote)
                        } else {
                            String::new()
                        },
                        waiting,
                        ..SocketFacts::default()
                    };
                    tcp.insert(inode, facts);
                }
            }
            tcp
        });
        tcp.get(&inode).map(|facts| SocketFacts {
            local: facts.local.clone(),
            peer: facts.peer.clone(),
            ..*facts
        })
    }
}

/// `0100007F:1F90` -> `127.0.0.1:8080`; IPv6 likewise, in brackets.
fn address(hex: &str) -> String {
    let Some((ip, port)) = hex.split_once(':') else {
        return hex.to_owned();
    };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    let words: Vec<u32> = (0..ip.len() / 8)
        .filter_map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok())
        .collect();
    match words.as_slice() {
        [v4] => format!("{}:{port}", std::net::Ipv4Addr::from(v4.swap_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            format!("[{}]:{port}", std::net::Ipv6Addr::from(bytes))
        }
        _ => hex.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_people_write_them() {
        assert_eq!(address("0100007F:1F90"), "127.0.0.1:8080");
        assert_eq!(address("00000000000000000000000001000000:0050"), "[::1]:80");
    }
}
