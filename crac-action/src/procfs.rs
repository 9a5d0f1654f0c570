//! Everything crac-action reads from `/proc`: the one place that knows its paths and formats.
//!
//! What other processes tell there: `stat` (state, parent, start time), the children of each
//! task, `status` (`Uid:`, `NSpid:`, the capability sets), `cgroup`, `environ`, `cmdline`, `root`, `ns/*`, the names of their
//! threads, their descriptors (`fd/*`, and `fdinfo/*` for their flags and the locks held
//! through them), the inodes they map (`maps`) and their network namespace's socket tables (`net/*`); and the kernel's lock
//! table (`/proc/locks`).
//! And what crac-action reads of itself: its namespaces (this thread's, `/proc/thread-self`,
//! for the network one it may have moved to), its sockets and its threads.
//!
//! Everything here runs for every process of a dumped tree, on CRIU's critical path: each read
//! takes as few system calls as it can (one open and two reads for a status file).
//! A process that is gone, or a file that cannot be read, reads as nothing (`None`, empty): the
//! callers decide what that means.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::fcntl::OFlag;

/// Reads a /proc file in as few system calls as it takes: /proc reports a size of 0, on which
/// `fs::read` asks for the size and position, then starts with a small read and doubles (eight
/// reads for a status file).
fn read(path: &str) -> Option<Vec<u8>> {
    let mut file = fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    buf.truncate(len);
    Some(buf)
}

/// A /proc file as text; empty when it cannot be read or is not UTF-8.
fn read_text(path: &str) -> String {
    read(path)
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_default()
}

/// What /proc/PID/stat says about a process.
pub(crate) struct Stat {
    /// Its state letter (`R`, `S`, `Z`, ...).
    pub(crate) state: char,
    /// Its parent.
    pub(crate) ppid: u32,
    /// Field 22: its start time in clock ticks after boot.
    pub(crate) start_time: u64,
}

/// /proc/PID/stat of process `pid`, if it exists.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    // One read into a buffer that always fits (the line is a few hundred bytes).
    let mut buf = [0u8; 1024];
    let n = fs::File::open(format!("/proc/{pid}/stat"))
        .and_then(|mut f| f.read(&mut buf))
        .ok()?;
    parse_stat(std::str::from_utf8(&buf[..n]).ok()?)
}

/// Parses /proc/PID/stat. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field N is fields[N - 3].
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The children of `pid` from /proc/PID/task/*/children (a few reads for a small tree, where
/// a scan of /proc reads every process on the machine). None if the kernel lacks the file
/// (CONFIG_PROC_CHILDREN off).
pub(crate) fn children(pid: u32) -> Option<Vec<u32>> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut kids = Vec::new();
    for task in tasks.flatten() {
        match fs::read_to_string(task.path().join("children")) {
            Ok(text) => kids.extend(
                text.split_whitespace()
                    .filter_map(|k| k.parse::<u32>().ok()),
            ),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // The task exited, or the kernel has no such file: tell them apart.
                if task.path().exists() {
                    return None;
                }
            }
            Err(_) => {}
        }
    }
    Some(kids)
}

/// Every process on the machine, ascending (one pass over /proc).
pub(crate) fn pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The words after `name` on its line of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> Option<Vec<String>> {
    let status = String::from_utf8(read(&format!("/proc/{pid}/status"))?).ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix(name))?;
    Some(line.split_whitespace().map(str::to_owned).collect())
}

/// The effective uid of process `pid`.
pub(crate) fn euid(pid: u32) -> Option<u32> {
    // Uid: real, effective, saved, filesystem.
    status_field(pid, "Uid:")?.get(1)?.parse().ok()
}

/// A process's capability sets (`CapInh:`, `CapPrm:`, `CapEff:`, `CapBnd:`, `CapAmb:` of
/// /proc/PID/status), one bit per capability number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapabilitySets {
    /// The inheritable set.
    pub inheritable: u64,
    /// The permitted set.
    pub permitted: u64,
    /// The effective set.
    pub effective: u64,
    /// The bounding set.
    pub bounding: u64,
    /// The ambient set.
    pub ambient: u64,
}

/// The capability sets of process `pid` (`"self"` for this one), if it runs.
pub fn capabilities(pid: &str) -> Option<CapabilitySets> {
    let status = String::from_utf8(read(&format!("/proc/{pid}/status"))?).ok()?;
    let field = |name: &str| -> Option<u64> {
        let hex = status.lines().find_map(|line| line.strip_prefix(name))?;
        u64::from_str_radix(hex.trim(), 16).ok()
    };
    Some(CapabilitySets {
        inheritable: field("CapInh:")?,
        permitted: field("CapPrm:")?,
        effective: field("CapEff:")?,
        bounding: field("CapBnd:")?,
        // Absent before Linux 4.3.
        ambient: field("CapAmb:").unwrap_or(0),
    })
}

/// The cgroups of process `pid` (`/proc/PID/cgroup`): each hierarchy's controllers (empty
/// for cgroup v2's) and the path in it.
pub(crate) fn cgroups(pid: u32) -> Option<Vec<(String, String)>> {
    let text = String::from_utf8(read(&format!("/proc/{pid}/cgroup"))?).ok()?;
    Some(
        text.lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ':');
                let _id = fields.next()?;
                Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
            })
            .collect(),
    )
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`).
pub fn cap_last_cap() -> Option<u32> {
    read_text("/proc/sys/kernel/cap_last_cap")
        .trim()
        .parse()
        .ok()
}

/// Process `pid`'s pid as it sees itself (the innermost of `NSpid`), if it runs.
pub fn ns_pid(pid: u32) -> Option<u32> {
    static OWN: OnceLock<Option<PathBuf>> = OnceLock::new();
    // In crac-action's own pid namespace the pid is the same (one readlink, where the
    // status file is a read of a few kilobytes); otherwise NSpid lists the pid in every
    // namespace from the outermost, and the process sees the last.
    let own = OWN.get_or_init(|| own_namespace("pid"));
    if namespace(pid, "pid")? == *own.as_ref()? {
        Some(pid)
    } else {
        status_field(pid, "NSpid:")?.last()?.parse().ok()
    }
}

/// A process's environment (/proc/PID/environ): empty when it cannot be read.
pub(crate) struct Environ(Vec<u8>);

/// The environment of process `pid`.
pub(crate) fn environ(pid: u32) -> Environ {
    Environ(read(&format!("/proc/{pid}/environ")).unwrap_or_default())
}

impl Environ {
    /// The value of the first `name=value` in it, as bytes.
    pub(crate) fn var(&self, name: &str) -> Option<&[u8]> {
        self.0.split(|&b| b == 0).find_map(|var| {
            var.strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })
    }
}

/// The command line of process `pid` (/proc/PID/cmdline), its empty words dropped.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let cmdline = read(&format!("/proc/{pid}/cmdline"))?;
    Some(
        cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The namespace of `kind` (`pid`, `mnt`, `net`, `user`) process `pid` is in: its
/// /proc/PID/ns link (`net:[4026531840]`), equal for two processes in the same one.
pub(crate) fn namespace(pid: u32, kind: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()
}

/// crac-action's own namespace of `kind`, as [`namespace`] tells it.
pub(crate) fn own_namespace(kind: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/self/ns/{kind}")).ok()
}

/// The calling thread's namespace of `kind` (/proc/self is the thread group leader's, which
/// stays where it was when this thread enters another network namespace).
pub(crate) fn thread_namespace(kind: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/thread-self/ns/{kind}")).ok()
}

/// The inode of process `pid`'s network namespace, 0 when it cannot be told.
pub(crate) fn net_namespace_inode(pid: u32) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/net")).map_or(0, |m| m.ino())
}

/// The inode of the calling thread's network namespace, 0 when it cannot be told.
pub(crate) fn thread_net_namespace_inode() -> u64 {
    fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino())
}

/// Process `pid`'s network namespace, open, to enter it (`setns`).
pub(crate) fn open_net_namespace(pid: u32) -> io::Result<fs::File> {
    fs::File::open(format!("/proc/{pid}/ns/net"))
}

/// The calling thread's network namespace, open, to come back to it.
pub(crate) fn open_thread_net_namespace() -> io::Result<fs::File> {
    fs::File::open("/proc/thread-self/ns/net")
}

/// A handle (`O_PATH`) on the root folder of process `pid` as it sees it (/proc/PID/root,
/// which the kernel resolves in the process's mount namespace), to resolve its paths from.
pub(crate) fn open_root(pid: u32) -> nix::Result<OwnedFd> {
    nix::fcntl::open(
        Path::new(&format!("/proc/{pid}/root")),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
}

/// Whether a thread of process `pid` is named `name` (/proc/PID/task/*/comm).
pub(crate) fn runs_thread_named(pid: u32, name: &[u8]) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        read(&format!(
            "/proc/{pid}/task/{}/comm",
            task.file_name().to_string_lossy()
        ))
        .is_some_and(|comm| comm.strip_suffix(b"\n").unwrap_or(&comm) == name)
    })
}

/// How many threads crac-action has (/proc/self/task).
pub(crate) fn own_threads() -> Option<usize> {
    fs::read_dir("/proc/self/task").ok().map(Iterator::count)
}

/// How many descriptors process `pid` has open.
pub(crate) fn fd_count(pid: u32) -> Option<usize> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(Iterator::count)
}

/// The path of crac-action's own descriptor `fd` (`/proc/self/fd/N`): a folder's held
/// descriptor reaches the files in it however long their path is.
pub(crate) fn own_fd_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// The descriptors of process `pid` with what each links to (/proc/PID/fd), in the order
/// /proc lists them; `None` when they cannot be read.
pub(crate) fn fd_links(pid: u32) -> Option<FdLinks> {
    fd_links_in(&format!("/proc/{pid}/fd"))
}

fn fd_links_in(fd_dir: &str) -> Option<FdLinks> {
    let (Ok(entries), Ok(dir)) = (fs::read_dir(fd_dir), fs::File::open(fd_dir)) else {
        return None;
    };
    Some(FdLinks { entries, dir })
}

/// The descriptors of a process, from [`fd_links`].
pub(crate) struct FdLinks {
    entries: fs::ReadDir,
    dir: fs::File,
}

/// A descriptor of a process and its link (`socket:[123]`, `/dev/pts/0`, a path).
pub(crate) struct FdLink {
    /// Its number.
    pub(crate) fd: u32,
    /// What /proc/PID/fd/N links to.
    pub(crate) target: String,
    entry: fs::DirEntry,
}

impl FdLink {
    /// The file the descriptor is open on (whether or not a link names it any more).
    pub(crate) fn metadata(&self) -> io::Result<fs::Metadata> {
        fs::metadata(self.entry.path())
    }

    /// The inode of the socket it is, if it is one.
    pub(crate) fn socket_inode(&self) -> Option<u64> {
        socket_inode(&self.target)
    }
}

impl Iterator for FdLinks {
    type Item = FdLink;

    fn next(&mut self) -> Option<FdLink> {
        for entry in self.entries.by_ref().flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Relative to the open folder: no walk of /proc/PID/fd/ per descriptor.
            let Ok(target) =
                nix::fcntl::readlinkat(self.dir.as_fd(), entry.file_name().as_os_str())
            else {
                continue;
            };
            return Some(FdLink {
                fd,
                target: target.to_string_lossy().into_owned(),
                entry,
            });
        }
        None
    }
}

/// The socket inode in a /proc/PID/fd link (`socket:[123]`).
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inodes of the sockets among process `pid`'s descriptors.
pub(crate) fn socket_inodes(pid: u32) -> HashSet<u64> {
    fd_links(pid)
        .map(|links| links.filter_map(|l| l.socket_inode()).collect())
        .unwrap_or_default()
}

/// The inodes of the sockets among crac-action's own descriptors.
pub(crate) fn own_socket_inodes() -> HashSet<u64> {
    fd_links_in("/proc/self/fd")
        .map(|links| links.filter_map(|l| l.socket_inode()).collect())
        .unwrap_or_default()
}

/// The Unix sockets of process `pid`'s network namespace (/proc/PID/net/unix), with the
/// paths as their processes bound them.
pub(crate) fn unix_sockets(pid: u32) -> Option<UnixSockets> {
    read(&format!("/proc/{pid}/net/unix")).map(UnixSockets)
}

/// A network namespace's Unix sockets, from [`unix_sockets`].
pub(crate) struct UnixSockets(Vec<u8>);

/// One line of /proc/PID/net/unix.
pub(crate) struct UnixSocket<'a> {
    /// Its flags: `__SO_ACCEPTCON` (0x10000) when it listens.
    pub(crate) flags: u32,
    /// Its type: 1 `SOCK_STREAM`, 2 `SOCK_DGRAM`, 5 `SOCK_SEQPACKET`.
    pub(crate) kind: u16,
    /// Its state: 3 when connected.
    pub(crate) state: u8,
    /// Its inode.
    pub(crate) inode: u64,
    /// The path it is bound to (`@name` for an abstract one), if any.
    pub(crate) path: Option<&'a Path>,
}

impl UnixSockets {
    /// Every socket listed, in the table's order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = UnixSocket<'_>> {
        // Num RefCount Protocol Flags Type St Inode Path, in hex but the last two.
        self.0.split(|&b| b == b'\n').skip(1).filter_map(|line| {
            let fields: Vec<&[u8]> = line
                .split(|&b| b == b' ')
                .filter(|field| !field.is_empty())
                .collect();
            let text = |at: usize| fields.get(at).and_then(|f| std::str::from_utf8(f).ok());
            Some(UnixSocket {
                flags: text(3)
                    .and_then(|f| u32::from_str_radix(f, 16).ok())
                    .unwrap_or(0),
                kind: text(4)
                    .and_then(|f| u16::from_str_radix(f, 16).ok())
                    .unwrap_or(0),
                state: text(5)
                    .and_then(|f| u8::from_str_radix(f, 16).ok())
                    .unwrap_or(0),
                inode: text(6)?.parse().ok()?,
                path: fields.get(7).map(|path| Path::new(OsStr::from_bytes(path))),
            })
        })
    }
}

/// The text of a socket table of process `pid`'s network namespace (/proc/PID/net/NAME:
/// `tcp`, `tcp6`); empty when it cannot be read. Reading a TCP one walks the kernel's whole
/// TCP hash table.
pub(crate) fn net_table(pid: u32, name: &str) -> String {
    read_text(&format!("/proc/{pid}/net/{name}"))
}

/// The IPv4 TCP addresses (`IP:PORT`) the processes `pids` listen on: the listening sockets
/// of their network namespace (the first one's `net/tcp`) that one of their descriptors
/// holds, sorted.
pub fn listening_tcp(pids: &[u32]) -> Vec<String> {
    let Some(&root) = pids.first() else {
        return Vec::new();
    };
    let inodes: HashSet<u64> = pids.iter().flat_map(|&pid| socket_inodes(pid)).collect();
    let mut found = std::collections::BTreeSet::new();
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    for line in net_table(root, "tcp").lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10
            || fields[3] != "0A"
            || !fields[9].parse().is_ok_and(|inode| inodes.contains(&inode))
        {
            continue;
        }
        let Some((ip, port)) = fields[1].split_once(':') else {
            continue;
        };
        let (Ok(ip), Ok(port)) = (u32::from_str_radix(ip, 16), u16::from_str_radix(port, 16))
        else {
            continue;
        };
        // The kernel prints the address's four bytes as a u32 in this machine's byte order.
        found.insert(format!(
            "{}:{port}",
            std::net::Ipv4Addr::from(ip.to_ne_bytes())
        ));
    }
    found.into_iter().collect()
}

/// The kind of a file lock, as the kernel's lock table names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// `flock(2)`: owned by the open file, so shared by every descriptor (and process) that
    /// has it, as a child inherits it.
    Flock,
    /// A POSIX record lock (`fcntl(F_SETLK)`, `lockf`): owned by the process.
    Posix,
    /// An open file description lock (`fcntl(F_OFD_SETLK)`): owned by the open file.
    Ofd,
    /// Anything else (a lease, a delegation): not a lock a process holds through a descriptor.
    Other,
}

impl LockKind {
    /// Its name in a message: `flock`, `POSIX lock`, `OFD lock`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::Flock => "flock",
            LockKind::Posix => "POSIX lock",
            LockKind::Ofd => "OFD lock",
            LockKind::Other => "lease",
        }
    }
}

/// One lock of the kernel's lock table (`/proc/locks`, or a `lock:` line of
/// `/proc/PID/fdinfo/FD`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileLock {
    /// Its kind.
    pub kind: LockKind,
    /// Whether it is exclusive (`WRITE`) rather than shared (`READ`).
    pub exclusive: bool,
    /// The process that took it (a POSIX lock's owner; for a flock, whoever called `flock`);
    /// `None` for an OFD lock, which the kernel does not tie to a process.
    pub pid: Option<u32>,
    /// The inode of the locked file (the table gives the device as the kernel numbers it,
    /// which a `stat` does not always show: the inode is what is matched).
    pub inode: u64,
    /// The locked range, `0 EOF` for the whole file.
    pub range: String,
}

/// Parses one lock line (`1: FLOCK  ADVISORY  WRITE 1234 08:02:5678 0 EOF`); `None` for a
/// blocked request (`1: -> FLOCK ...`) or a line it does not know.
fn parse_lock(line: &str) -> Option<FileLock> {
    let mut words = line.split_whitespace();
    let _id = words.next()?.strip_suffix(':')?;
    let kind = match words.next()? {
        "FLOCK" => LockKind::Flock,
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        "->" => return None,
        _ => LockKind::Other,
    };
    let _mode = words.next()?;
    let exclusive = words.next()? == "WRITE";
    let pid = words.next()?.parse::<i64>().ok()?;
    let inode = words.next()?.rsplit(':').next()?.parse().ok()?;
    let range: Vec<&str> = words.collect();
    Some(FileLock {
        kind,
        exclusive,
        pid: u32::try_from(pid).ok().filter(|&p| p > 0),
        inode,
        range: range.join(" "),
    })
}

/// The kernel's lock table (`/proc/locks`, of this pid namespace): every lock held on the
/// machine, without the requests waiting for one.
pub fn file_locks() -> Vec<FileLock> {
    read_text("/proc/locks")
        .lines()
        .filter_map(parse_lock)
        .collect()
}

/// The locks held through descriptor `fd` of process `pid` (its `fdinfo` lines `lock:`):
/// the flocks and OFD locks of its open file, and the POSIX locks the process took through it.
pub fn fd_locks(pid: u32, fd: u32) -> Vec<FileLock> {
    read_text(&format!("/proc/{pid}/fdinfo/{fd}"))
        .lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .filter_map(parse_lock)
        .collect()
}

/// The descriptors of process `pid` open on regular files, each with the file's inode;
/// `None` when they cannot be read. One `stat` a descriptor, relative to the folder.
pub fn regular_file_inodes(pid: u32) -> Option<Vec<(u32, u64)>> {
    let dir = format!("/proc/{pid}/fd");
    let (Ok(entries), Ok(fds)) = (fs::read_dir(&dir), fs::File::open(&dir)) else {
        return None;
    };
    Some(
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let fd = name.to_str()?.parse::<u32>().ok()?;
                let st = nix::sys::stat::fstatat(
                    fds.as_fd(),
                    name.as_os_str(),
                    nix::fcntl::AtFlags::empty(),
                )
                .ok()?;
                (st.st_mode & libc::S_IFMT == libc::S_IFREG).then_some((fd, st.st_ino))
            })
            .collect(),
    )
}

/// What descriptor `fd` of process `pid` links to (a path, `socket:[N]`, ...).
pub fn fd_target(pid: u32, fd: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|t| t.to_string_lossy().into_owned())
}

/// The inodes of the files process `pid` has mapped (`/proc/PID/maps`).
pub fn mapped_inodes(pid: u32) -> HashSet<u64> {
    // start-end perms offset dev inode path
    read_text(&format!("/proc/{pid}/maps"))
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4)?.parse().ok())
        .filter(|&inode| inode != 0)
        .collect()
}

/// A descriptor of a process open for writing on a regular file: what
/// [`files_open_for_writing`] finds.
#[derive(Debug)]
pub struct WritableFile {
    /// The descriptor.
    pub fd: u32,
    /// Its path (the `/proc/PID/fd` link).
    pub path: String,
    /// Its flags (`fdinfo`'s `flags:`, `O_APPEND` among them).
    pub flags: u32,
    /// The file, opened read-only through the link: the file itself, even if its path was
    /// replaced since.
    pub file: fs::File,
    /// Its `stat` when it was opened.
    pub meta: fs::Metadata,
}

/// The descriptors of process `pid` open for writing (`O_WRONLY` or `O_RDWR`) on a regular
/// file that still has a name. The kernel shows the open mode as the mode of each
/// `/proc/PID/fd` link (`S_IWUSR` when open for writing), so only those are followed: one
/// `lstat` a descriptor, then a `readlink`, a `stat` (a device is never opened), an open and
/// the `fdinfo` for each one open for writing, all relative to the folders opened once.
pub fn files_open_for_writing(pid: u32) -> Vec<WritableFile> {
    let dir = format!("/proc/{pid}/fd");
    let (Ok(entries), Ok(fds), Ok(infos)) = (
        fs::read_dir(&dir),
        fs::File::open(&dir),
        fs::File::open(format!("/proc/{pid}/fdinfo")),
    ) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(fd) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let at = |flags| nix::sys::stat::fstatat(fds.as_fd(), name.as_os_str(), flags);
        let writable = at(nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| st.st_mode & libc::S_IWUSR != 0);
        if !writable {
            continue;
        }
        let Ok(target) = nix::fcntl::readlinkat(fds.as_fd(), name.as_os_str()) else {
            continue;
        };
        let path = target.to_string_lossy().into_owned();
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        // Regular files only: opening a device may do something (a watchdog's).
        if !at(nix::fcntl::AtFlags::empty())
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        {
            continue;
        }
        let Ok(handle) = nix::fcntl::openat(
            fds.as_fd(),
            name.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        ) else {
            continue;
        };
        let file = fs::File::from(handle);
        let Ok(meta) = file.metadata() else {
            continue;
        };
        let flags = nix::fcntl::openat(
            infos.as_fd(),
            name.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()
        .and_then(|info| {
            let mut buf = [0u8; 256];
            let n = nix::unistd::read(&info, &mut buf).ok()?;
            let text = std::str::from_utf8(&buf[..n]).ok()?;
            let flags = text.lines().find_map(|l| l.strip_prefix("flags:"))?;
            u32::from_str_radix(flags.trim(), 8).ok()
        })
        .unwrap_or(0);
        found.push(WritableFile {
            fd,
            path,
            flags,
            file,
            meta,
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_names() {
        let line =
            "123 (a) b (c)) S 1 123 123 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 1);
        assert_eq!(stat.start_time, 98765);
    }

    #[test]
    fn lock_lines_as_the_kernel_writes_them() {
        let flock = parse_lock("1: FLOCK  ADVISORY  WRITE 1234 08:02:5678 0 EOF").unwrap();
        assert_eq!(
            flock,
            FileLock {
                kind: LockKind::Flock,
                exclusive: true,
                pid: Some(1234),
                inode: 5678,
                range: "0 EOF".into(),
            }
        );
        let ofd = parse_lock("2: OFDLCK ADVISORY  READ -1 00:2a:99 128 128").unwrap();
        assert_eq!(
            (ofd.kind, ofd.exclusive, ofd.pid),
            (LockKind::Ofd, false, None)
        );
        assert_eq!(ofd.range, "128 128");
        assert_eq!(
            parse_lock("3: POSIX  ADVISORY  WRITE 77 fd:01:12 0 EOF").map(|l| l.kind),
            Some(LockKind::Posix)
        );
        assert!(parse_lock("1: -> FLOCK  ADVISORY  WRITE 1235 08:02:5678 0 EOF").is_none());
    }
}
