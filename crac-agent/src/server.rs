//! The agent's thread: one event loop over the listening socket and the connections in
//! progress. Each connection gets one request and one reply ([`crac_protocol::wire`]); requests
//! are handled one at a time by the [`Handler`], in the order they are complete, while slow or
//! silent clients only hold their own connection, up to [`REQUEST_TIMEOUT`].
//!
//! While a checkpoint is pending the process may be frozen and dumped at any moment, and CRIU
//! refuses a process that holds a connection to the outside ("External socket is used"). So
//! when a before-checkpoint succeeds, every other connection is told to ask again later and
//! closed, and until the cycle ends a connection is closed as soon as it is answered, and gets
//! [`PENDING_REQUEST_TIMEOUT`] to send its request.
//!
//! The loop sleeps in `poll` with no timeout while idle (no wake-ups), except for a rare look
//! at its socket ([`Options::socket_check`]): a socket or folder removed by someone else (a
//! /tmp cleaner, an operator) is made again, so that the service does not lose its agent for
//! the rest of its life. While a checkpoint is pending it ticks, for the lease
//! ([`crate::handler`]).

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};

use crate::handler::{Handler, TICK};
use crate::peer;
use crac_protocol::wire::{Code, Op, OpName, Reply, Request, MAX_REQUEST_LEN, REQUEST_TIMEOUT};

/// How long a client has, after the reply, to close its end; until then what it sends is read
/// and dropped (closing with unread data would reset the connection and lose the reply).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The most a client may send after its request line.
const MAX_DRAIN: usize = 64 * 1024;
/// Connections served at once; more wait in the listening socket's queue.
const MAX_CONNECTIONS: usize = 32;
/// The most a reply may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// While a checkpoint is pending: how long a client has to send its request.
const PENDING_REQUEST_TIMEOUT: Duration = Duration::from_millis(100);

/// What the loop is given.
pub(crate) struct Options {
    /// What to close once a checkpoint's hooks have run.
    pub(crate) fd_policy: crac_protocol::fd_policy::Policy,
    /// Where [`crate::Agent::socket_path`] reads the socket's path (it follows a move).
    pub(crate) published: crate::agent::Published,
    /// Where the socket is, its folder, and the folder's base (to make them again).
    pub(crate) socket: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) base: PathBuf,
    /// Whether `base` is the agent's private one (made again 0700 if removed).
    pub(crate) private_base: bool,
    /// How often the loop looks at its socket while idle (None: never).
    pub(crate) socket_check: Option<Duration>,
}

pub(crate) struct Server {
    handler: Handler,
    listener: UnixListener,
    /// The inode of the socket file this agent bound, to tell it from a replacement.
    socket_inode: Option<(u64, u64)>,
    options: Options,
    conns: Vec<Conn>,
    next_check: Option<Instant>,
    /// The last socket check found nothing at the socket's path.
    found_gone: bool,
    /// The pipe `run` watches to stop (one of the agent's own descriptors).
    stop_fd: Option<std::os::fd::RawFd>,
}

enum Stage {
    /// Reading the request line, until the deadline.
    Reading,
    /// Replied; dropping what else comes until the client closes, or the deadline.
    Draining { drained: usize },
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
    /// The time it was given to send its request.
    limit: Duration,
    stage: Stage,
    /// The peer check, done when it connected.
    peer: Result<(), String>,
}

/// What reading from a connection gave.
enum Received {
    /// Not all there yet.
    More,
    /// The request line, or what the client sent before closing its end.
    Line(Vec<u8>),
    /// Something that is not a request line, with the reply's message.
    Bad(String),
}

impl Server {
    pub(crate) fn new(handler: Handler, listener: UnixListener, options: Options) -> Server {
        let now = Instant::now();
        let mut server = Server {
            handler,
            socket_inode: None,
            next_check: options.socket_check.map(|every| now + every),
            found_gone: false,
            listener,
            options,
            conns: Vec::new(),
            stop_fd: None,
        };
        server.own_the_socket_file();
        server
    }

    /// Notes that the file at the socket's path is this agent's socket: just bound, or a
    /// client just reached this listener through it (in a restored copy, CRIU made the file
    /// anew; crac-action's post-resume reaches it while the restore still holds its turn, so
    /// no copy restored after it has bound the path yet). Never later, at the end of a
    /// cycle: by then another copy may have.
    fn own_the_socket_file(&mut self) {
        self.socket_inode = socket_inode(&self.options.socket);
        crate::cleanup::own_socket_file(self.socket_inode);
    }

    /// Serves until `stop` becomes readable (the other end written to or closed).
    pub(crate) fn run(mut self, stop: OwnedFd) {
        self.stop_fd = Some(stop.as_raw_fd());
        let _ = self.listener.set_nonblocking(true);
        loop {
            let now = Instant::now();
            self.expire(now);
            let was_pending = self.handler.is_pending();
            if was_pending {
                self.handler.tick(now);
            }
            if self.next_check.is_some_and(|at| now >= at) {
                self.check_socket();
                self.next_check = self.options.socket_check.map(|every| now + every);
            }
            let timeout = self.timeout(now);
            let (stopped, accept, ready) = {
                let mut fds = Vec::with_capacity(self.conns.len() + 2);
                fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
                let accepting = self.conns.len() < MAX_CONNECTIONS;
                fds.push(PollFd::new(
                    self.listener.as_fd(),
                    if accepting {
                        PollFlags::POLLIN
                    } else {
                        PollFlags::empty()
                    },
                ));
                for conn in &self.conns {
                    fds.push(PollFd::new(conn.stream.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => {
                        // Out of memory for the poll set: back off instead of spinning.
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
                let woke = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                let ready: Vec<bool> = fds[2..].iter().map(woke).collect();
                (woke(&fds[0]), accepting && woke(&fds[1]), ready)
            };
            if stopped {
                break;
            }
            // Connections that were there when poll returned, by position; new ones go after.
            // Serving one may close others: a checkpoint that begins closes them all.
            for index in (0..ready.len()).rev() {
                if ready[index] && index < self.conns.len() {
                    self.serve(index);
                }
            }
            if accept {
                self.accept();
            }
        }
        // A checkpoint still pending when the agent stops is aborted by Checkpoint's Drop.
    }

    /// How long poll may sleep: until the next connection deadline, tick or socket check.
    fn timeout(&self, now: Instant) -> PollTimeout {
        let mut next = self.conns.iter().map(|c| c.deadline).min();
        if self.handler.is_pending() {
            next = Some(next.map_or(now + TICK, |at| at.min(now + TICK)));
        }
        if let Some(check) = self.next_check {
            next = Some(next.map_or(check, |at| at.min(check)));
        }
        match next {
            None => PollTimeout::NONE,
            Some(at) => {
                let left = at.saturating_duration_since(now) + Duration::from_millis(1);
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
        }
    }

    fn accept(&mut self) {
        while self.conns.len() < MAX_CONNECTIONS {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Clients connect through the path: the file there led to this listener
                    // (after a restore, CRIU made it anew).
                    if socket_inode(&self.options.socket) != self.socket_inode {
                        self.own_the_socket_file();
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let peer = peer::check(&stream);
                    let limit = if self.handler.is_pending() {
                        PENDING_REQUEST_TIMEOUT
                    } else {
                        REQUEST_TIMEOUT
                    };
                    self.conns.push(Conn {
                        stream,
                        buf: Vec::with_capacity(256),
                        deadline: Instant::now() + limit,
                        limit,
                        stage: Stage::Reading,
                        peer,
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock, or out of file descriptors: poll again later.
                Err(_) => return,
            }
        }
    }

    /// Connections past their deadline: a request not complete in time gets an error reply;
    /// a client that does not close after its reply is closed.
    fn expire(&mut self, now: Instant) {
        let mut index = 0;
        while index < self.conns.len() {
            if now < self.conns[index].deadline {
                index += 1;
                continue;
            }
            match self.conns[index].stage {
                Stage::Reading => {
                    let message = format!(
                        "no complete request line within {} ms",
                        self.conns[index].limit.as_millis()
                    );
                    let reply = self
                        .handler
                        .error(OpName::default(), Code::BadRequest, message);
                    self.reply(index, &reply);
                    index += 1;
                }
                Stage::Draining { .. } => {
                    self.conns.swap_remove(index);
                }
            }
        }
    }

    /// Reads what a ready connection has; acts on a complete request.
    fn serve(&mut self, index: usize) {
        match self.conns[index].stage {
            Stage::Draining { mut drained } => {
                if drop_input(&self.conns[index].stream, &mut drained) {
                    self.conns[index].stage = Stage::Draining { drained };
                } else {
                    self.conns.swap_remove(index);
                }
            }
            Stage::Reading => match read_request(&mut self.conns[index]) {
                Received::More => {}
                Received::Bad(message) => {
                    let reply = self
                        .handler
                        .error(OpName::default(), Code::BadRequest, message);
                    self.reply(index, &reply);
                }
                Received::Line(line) => self.answer(index, &line),
            },
        }
    }

    fn answer(&mut self, index: usize, line: &[u8]) {
        let checked = self.conns[index]
            .peer
            .clone()
            .map_err(|message| (Code::PermissionDenied, message))
            .and(parse(line).map_err(|message| (Code::BadRequest, message)));
        let request = match checked {
            Ok(request) => request,
            Err((code, message)) => {
                let reply = self.handler.error(OpName::default(), code, message);
                self.reply(index, &reply);
                return;
            }
        };
        let before = match &request.op {
            Op::BeforeCheckpoint(before) => Some(before),
            _ => None,
        };
        let starts_a_checkpoint = before.is_some();
        if starts_a_checkpoint && hung_up(&self.conns[index].stream) {
            // The client gave up and left: nobody would hear that the hooks ran, and a dump
            // will not follow. Running them now would be a cycle of nobody's.
            self.conns.swap_remove(index);
            return;
        }
        let was_pending = self.handler.is_pending();
        let mut reply = self.handler.serve(&request);
        if matches!(request.op, Op::Listeners) && reply.ok {
            // Under the registry's lock: the names and the descriptors sent agree.
            crate::upgrade::shared(|shared| {
                reply.listeners = shared.iter().map(|(name, _)| name.clone()).collect();
                self.reply_passing(index, &reply, &crate::upgrade::raw(shared));
            });
            return;
        }
        if let Some(before) = before.filter(|_| reply.ok && !was_pending) {
            reply.closed = self.close_by_policy(before.dry_run);
            // After the policy's closes: what is left is what CRIU will dump.
            let ask = before.facts.then_some(match before.lean {
                Some(lean) => crac_protocol::fd_facts::Ask {
                    tcp_addresses: lean.tcp_addresses,
                    unix_peers: false,
                },
                None => crac_protocol::fd_facts::Ask::ALL,
            });
            let look = crate::fd_facts::look(&self.own_fds(), ask);
            self.handler.note_connections(look.connections);
            reply.facts = look.facts;
            self.ready_for_the_dump(index, &reply);
            return;
        }
        self.reply(index, &reply);
    }

    /// A checkpoint has begun: the process may be frozen at any moment. Its client gets its
    /// reply, every other connection is told to ask again later, and none is left open.
    ///
    /// The client's connection is closed at once, not when the client closes its end: the
    /// client (crac-action) reads to the end of the reply, and the end is this close, so by
    /// the time the client has its reply this process holds no socket of it. Waiting for the
    /// client instead left a moment, after the client had closed and CRIU had begun to freeze
    /// the tree, when this process still held a socket whose peer was gone, and CRIU failed
    /// the dump ("Unix socket N not found"). What the client sent after its line and before
    /// now is read first, so nothing unread resets the connection.
    fn ready_for_the_dump(&mut self, index: usize, reply: &Reply) {
        let conn = self.conns.swap_remove(index);
        let busy = self.handler.error(
            OpName::default(),
            Code::Busy,
            "a checkpoint is being taken now: ask again when it is over".into(),
        );
        // The others first: once the checkpoint's client has its reply, the dump may begin,
        // and no connection to the outside may be left then.
        for other in std::mem::take(&mut self.conns) {
            // One that has its reply already is only waiting for the client to close.
            let unanswered = matches!(other.stage, Stage::Reading);
            close_with(other.stream, unanswered.then_some(&busy), Duration::ZERO);
        }
        let delivered = close_with(conn.stream, Some(reply), Duration::ZERO);
        if !delivered {
            self.handler.unheard();
        }
    }

    /// Carries out the descriptor policy's `close` rules (or only lists them, in a dry run),
    /// leaving the agent's own socket and connections alone.
    fn close_by_policy(&self, dry_run: bool) -> Vec<crac_protocol::fd_policy::Descriptor> {
        crate::fd_policy::close_matching(&self.options.fd_policy, &self.own_fds(), dry_run)
    }

    /// The agent's own descriptors: its socket, its connections (closed before any dump) and
    /// its stop pipe.
    fn own_fds(&self) -> Vec<std::os::fd::RawFd> {
        let mut own: Vec<std::os::fd::RawFd> =
            self.conns.iter().map(|c| c.stream.as_raw_fd()).collect();
        own.push(self.listener.as_raw_fd());
        own.extend(self.stop_fd);
        own
    }

    /// Writes `reply` on connection `index`, then lets the client read it to the end: the
    /// connection drains what else comes until the client closes.
    ///
    /// While a checkpoint is pending the connection is closed at once instead.
    fn reply(&mut self, index: usize, reply: &Reply) {
        if self.handler.is_pending() {
            close_with(
                self.conns.swap_remove(index).stream,
                Some(reply),
                Duration::ZERO,
            );
            return;
        }
        let conn = &mut self.conns[index];
        let _ = send_all(&conn.stream, reply.to_line().as_bytes());
        let _ = conn.stream.shutdown(Shutdown::Write);
        conn.stage = Stage::Draining { drained: 0 };
        conn.deadline = Instant::now() + DRAIN_TIMEOUT;
    }

    /// As [`reply`](Self::reply), passing `fds` with the reply's first bytes (`SCM_RIGHTS`).
    fn reply_passing(&mut self, index: usize, reply: &Reply, fds: &[std::os::fd::RawFd]) {
        let line = reply.to_line();
        let sent = if fds.is_empty() || self.handler.is_pending() {
            0
        } else {
            let iov = [io::IoSlice::new(line.as_bytes())];
            let rights = [nix::sys::socket::ControlMessage::ScmRights(fds)];
            nix::sys::socket::sendmsg::<()>(
                self.conns[index].stream.as_raw_fd(),
                &iov,
                &rights,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .unwrap_or(0)
        };
        if sent == 0 {
            // Not sent (the socket's buffer was full, or a checkpoint pending): the names alone
            // would mislead, so none.
            let mut bare = reply.clone();
            bare.listeners.clear();
            self.reply(index, &bare);
            return;
        }
        let conn = &mut self.conns[index];
        let _ = send_all(&conn.stream, &line.as_bytes()[sent..]);
        let _ = conn.stream.shutdown(Shutdown::Write);
        conn.stage = Stage::Draining { drained: 0 };
        conn.deadline = Instant::now() + DRAIN_TIMEOUT;
    }

    /// Makes the socket again if it is gone, or another file took its path. A live socket
    /// there is asked who listens (`SO_PEERCRED`): this very listener, in a file a restore
    /// made, is noted as this agent's; another process's (a copy restored from the same image
    /// into a pid namespace of its own, in the same file system, bound it after this one) is
    /// left to it, and this agent moves to a folder of its own ([`Self::move_out`]).
    ///
    /// A path found empty is made again only if the next check finds it empty too: CRIU,
    /// restoring another copy of the same image, removes the file and binds the path a few
    /// tens of milliseconds later, and taking it in between made that restore fail ("Address
    /// already in use").
    fn check_socket(&mut self) {
        let now = socket_inode(&self.options.socket);
        if self.socket_inode.is_some() && now == self.socket_inode {
            self.found_gone = false;
            return;
        }
        let seen_gone_before = std::mem::replace(&mut self.found_gone, now.is_none());
        if now.is_none() && !seen_gone_before {
            return;
        }
        if now.is_some() {
            match holder(&self.options.socket) {
                // This listener, in a file a restore made: ours from now on.
                Holder::This => {
                    self.own_the_socket_file();
                    return;
                }
                // Not while a checkpoint is pending: crac-action holds this folder for the
                // cycle. Moving after it ends is soon enough.
                Holder::Another if !self.handler.is_pending() => {
                    self.move_out();
                    return;
                }
                Holder::Another | Holder::Unknown => return,
                Holder::Nobody => {}
            }
        }
        let Ok(socket) = crate::location::prepare_again(
            &self.options.base,
            self.options.private_base,
            &self.options.dir,
        ) else {
            return;
        };
        let Ok(listener) = crate::location::listen(&socket) else {
            return;
        };
        let _ = listener.set_nonblocking(true);
        self.listener = listener;
        self.own_the_socket_file();
    }

    /// Another live agent listens at this agent's path: a copy restored from the same image
    /// in a pid namespace of its own (the same pid there), sharing the file system, bound it
    /// after this one. This agent moves to a folder of its own, `<base>/<pid>.XXXXXX`, where
    /// crac-action finds it by its listening socket; the path and what is there are left to
    /// the other.
    fn move_out(&mut self) {
        let Ok(dir) = crate::location::alternative(&self.options.base, std::process::id()) else {
            return;
        };
        let socket = dir.join(crac_protocol::location::SOCKET_NAME);
        let Ok(listener) = crate::location::listen(&socket) else {
            let _ = std::fs::remove_dir(&dir);
            return;
        };
        let _ = listener.set_nonblocking(true);
        self.listener = listener;
        crate::cleanup::arm(
            &socket,
            &dir,
            self.options
                .private_base
                .then_some(self.options.base.as_path()),
            false,
        );
        crate::agent::moved_to(&self.options.published, &socket);
        self.options.socket = socket;
        self.options.dir = dir;
        self.own_the_socket_file();
    }
}

/// Who listens at a socket's path, by the listening end's pid (`SO_PEERCRED`, in this
/// process's pid namespace: 0 for a process in a sibling namespace).
enum Holder {
    /// This process.
    This,
    /// Another process.
    Another,
    /// Nobody: a file left over.
    Nobody,
    /// Not known now (its queue is full, or the path cannot be connected to): look again later.
    Unknown,
}

fn holder(path: &Path) -> Holder {
    use nix::sys::socket::{
        connect, getsockopt, socket, sockopt::PeerCredentials, AddressFamily, SockFlag, SockType,
        UnixAddr,
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return Holder::Unknown;
    };
    // Non-blocking: a full queue must not stall the agent's thread.
    let Ok(probe) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return Holder::Unknown;
    };
    match connect(probe.as_raw_fd(), &addr) {
        Ok(()) => match getsockopt(&probe, PeerCredentials) {
            Ok(cred) if u32::try_from(cred.pid()).ok() == Some(std::process::id()) => Holder::This,
            Ok(_) => Holder::Another,
            Err(_) => Holder::Unknown,
        },
        Err(nix::errno::Errno::ECONNREFUSED) => Holder::Nobody,
        Err(_) => Holder::Unknown,
    }
}

/// Writes `reply`, if any, and closes the connection, first reading and dropping what the
/// client sends until it closes its end, for at most `linger` (zero: only what is there
/// already): closing with unread data would reset the connection and lose the reply. Whether
/// the reply was written.
fn close_with(stream: UnixStream, reply: Option<&Reply>, linger: Duration) -> bool {
    let delivered = reply.is_none_or(|reply| send_all(&stream, reply.to_line().as_bytes()).is_ok());
    if !linger.is_zero() {
        // The client reads to the end: it sees it now, while what it sends is still read.
        // Without lingering the end is the close itself, so the client cannot see it while
        // this process still holds the socket.
        let _ = stream.shutdown(Shutdown::Write);
    }
    let deadline = Instant::now() + linger;
    let mut drained = 0;
    while drop_input(&stream, &mut drained) {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        if left.is_zero()
            || poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            )
            .is_err()
        {
            break;
        }
    }
    delivered
}

/// Reads and drops what the client has sent so far, adding it to `drained`. Whether the
/// connection is still worth keeping: false once the client has closed its end, the
/// connection failed, or it sent more than MAX_DRAIN in all.
fn drop_input(stream: &UnixStream, drained: &mut usize) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match (&*stream).read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => *drained += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
        if *drained > MAX_DRAIN {
            return false;
        }
    }
}

/// The inode of the file at `path`, if there is one.
fn socket_inode(path: &Path) -> Option<(u64, u64)> {
    crate::cleanup::file_identity(path)
}

/// Whether the client closed its connection entirely (not just its writing side).
fn hung_up(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Reads what the connection has. A request is a line of at most MAX_REQUEST_LEN bytes, ended
/// by `\n` or by the client closing its side.
fn read_request(conn: &mut Conn) -> Received {
    let mut chunk = [0u8; 4096];
    loop {
        match (&conn.stream).read(&mut chunk) {
            Ok(0) => return Received::Line(std::mem::take(&mut conn.buf)),
            Ok(n) => {
                let searched = conn.buf.len();
                conn.buf.extend_from_slice(&chunk[..n]);
                if let Some(at) = conn.buf[searched..].iter().position(|&b| b == b'\n') {
                    let end = searched + at;
                    if end + 1 > MAX_REQUEST_LEN {
                        return Received::Bad(too_long());
                    }
                    // What follows the line is drained after the reply.
                    conn.buf.truncate(end);
                    return Received::Line(std::mem::take(&mut conn.buf));
                }
                if conn.buf.len() > MAX_REQUEST_LEN {
                    return Received::Bad(too_long());
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Received::More,
            Err(err) => return Received::Bad(format!("cannot read the request: {err}")),
        }
    }
}

fn too_long() -> String {
    format!("request too long: no newline within {MAX_REQUEST_LEN} bytes")
}

fn parse(line: &[u8]) -> Result<Request, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "empty request: send one JSON object on one line, e.g. {\"v\":1,\"op\":\"status\"}"
                .into(),
        );
    }
    serde_json::from_slice(line).map_err(|err| {
        format!(
            "malformed request ({err}): send one JSON object on one line, e.g. {{\"v\":1,\"op\":\"status\"}}"
        )
    })
}

/// Writes all of `bytes` (a reply: a few kilobytes at most, which a socket buffer takes at
/// once), waiting at most WRITE_TIMEOUT for room, with MSG_NOSIGNAL: a client that went away
/// must show up as an error here (so a checkpoint nobody heard about is rolled back), not as a
/// SIGPIPE that kills an application that did not ignore it.
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> nix::Result<()> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    while !bytes.is_empty() {
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(nix::errno::Errno::ETIMEDOUT);
                }
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
                poll(
                    &mut fds,
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
                )?;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
