//! Connections: accepting and registering peers, each one's buffers and
//! fds, turns of reading and writing, stall deadlines, the byte budget
//! shared by every peer, and teardown.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::{Interest, Token};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::Server;
use crate::errno::Errno;
use crate::memfd;
use crate::model;
use crate::types::Limits;
use crate::wire::{self, Envelope, FrameReader, Notice, Reply, Request, Role};

/// Requests served per connection per turn of the loop.
pub const FRAMES_PER_TURN: usize = 32;
/// Unsent reply bytes above which a connection is not served.
pub const OUT_HIGH_WATER: usize = 1 << 20;
/// A connection is not read while more fds than this wait in its output
/// (each is an open file of the core until the peer takes it).
pub const OUT_FDS_HIGH_WATER: usize = 64;
/// New peers are turned away while more refused files than this wait to
/// be closed (their file system's server is stalled): each is an open
/// file of the core.
pub const MAX_PENDING_CLOSES: usize = 256;
/// Bytes of an unfinished message each peer may have buffered outside the
/// shared `max_peer_buffer_bytes` (most requests are far smaller).
pub const PEER_FREE_BYTES: usize = 16 << 10;
/// Replies larger than this are refused with EAGAIN while the peers'
/// buffers are full.
pub const LARGE_REPLY_BYTES: usize = 64 << 10;
/// How often starved connections are tried again.
const STARVED_RETRY: Duration = Duration::from_millis(50);

/// A reply (or notification) waiting to be written, with its fds.
struct OutFrame {
    bytes: Vec<u8>,
    pos: usize,
    fds: Vec<OwnedFd>,
}

pub(super) struct Conn {
    stream: UnixStream,
    reader: FrameReader,
    out: VecDeque<OutFrame>,
    out_bytes: usize,
    out_fds: usize,
    pub(super) role: Option<Role>,
    pub(super) session: u64,
    /// Non-zero for a device channel made by the core.
    pub(super) channel: u64,
    pub(super) pid: i32,
    pub(super) uid: u32,
    /// Close once `out` is flushed.
    pub(super) closing: bool,
    /// A request of this connection waits for device servers; its later
    /// requests wait in `stash` (except invalidation answers).
    pub(super) blocked: bool,
    pub(super) stash: VecDeque<(Envelope<Request>, Vec<OwnedFd>)>,
    /// Why each refused file (now a [`refused_stand_in`] in the reader)
    /// was refused, oldest first.
    pub(super) refused: VecDeque<String>,
    /// Since when an unfinished message has waited in `reader` (reset by
    /// each whole message, and while the core itself does not read).
    input_since: Option<Instant>,
    /// Since when the reply at the head of `out` has waited to be read
    /// (reset each time one is read whole).
    output_since: Option<Instant>,
    /// The socket may hold bytes the core has not read: set by a readable
    /// event, cleared by a read that found the socket empty.
    pub(super) may_read: bool,
    /// An event reported the end of the peer's stream (or an error): a
    /// short read is then no sign of an empty socket, and reads go on
    /// until one returns the end (no further event would come for it).
    pub(super) read_closed: bool,
    /// Registered for writable events (while `out` holds bytes).
    watch_writable: bool,
    /// Messages received and replies written whole, to see progress.
    frames_in: u64,
    frames_out: u64,
}

/// Most requests a blocked device channel may queue before it is cut off
/// (a blocked session is simply not read until its operation completes).
pub(super) const STASH_LIMIT: usize = 32;

impl Conn {
    fn new(stream: UnixStream, limits: &Limits, pid: i32, uid: u32) -> Conn {
        Conn {
            stream,
            reader: FrameReader::new(limits.max_message_bytes as usize, limits.max_fds_per_message as usize),
            out: VecDeque::new(),
            out_bytes: 0,
            out_fds: 0,
            role: None,
            session: 0,
            channel: 0,
            pid,
            uid,
            closing: false,
            blocked: false,
            stash: VecDeque::new(),
            refused: VecDeque::new(),
            input_since: None,
            output_since: None,
            may_read: true,
            read_closed: false,
            watch_writable: false,
            frames_in: 0,
            frames_out: 0,
        }
    }
}

impl Server {
    pub(super) fn accept(&mut self) {
        loop {
            let (stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            let (pid, uid) = match getsockopt(&stream.as_fd(), PeerCredentials) {
                Ok(c) => (c.pid(), c.uid()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read peer credentials; closing");
                    continue;
                }
            };
            let full = self.conns.len() >= self.core.limits().max_connections as usize
                || memfd::closes_pending() > MAX_PENDING_CLOSES;
            let Some(token) = self.register(stream, pid, uid) else { continue };
            // `register` has just put it there.
            let Some(conn) = self.conns.get_mut(&token) else { continue };
            if full {
                tracing::warn!(pid, uid, "turning a peer away: the connection limit is reached");
                let msg = if memfd::closes_pending() > MAX_PENDING_CLOSES {
                    "the core is waiting to close files of a stalled file system; try again later".to_string()
                } else {
                    format!("{} connections are open, the configured limit", self.core.limits().max_connections)
                };
                queue(conn, 0, &Reply::error(Errno::ENOSPC, msg), Vec::new());
                conn.closing = true;
            } else if uid != self.owner_uid && uid != 0 {
                tracing::warn!(pid, uid, "refusing a peer of another user");
                queue(conn, 0, &Reply::error(Errno::EPERM, "only the core's owner or root may connect"), Vec::new());
                conn.closing = true;
            }
            tracing::debug!(pid, uid, token = token.0, "connection");
            let wait = Duration::from_millis(u64::from(self.core.limits().hello_timeout_ms));
            self.hello_deadlines.push_back((Instant::now() + wait, token));
            self.service(token);
        }
    }

    /// Turns away peers that did not say hello in time: an idle connection
    /// would hold a connection slot and a buffer for ever.
    pub(super) fn expire_hellos(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, token)) = self.hello_deadlines.front() {
            if deadline > now {
                break;
            }
            self.hello_deadlines.pop_front();
            let Some(conn) = self.conns.get_mut(&token) else { continue };
            if conn.role.is_some() || conn.closing {
                continue;
            }
            tracing::info!(pid = conn.pid, "closing a connection that did not say hello in time");
            let ms = self.core.limits().hello_timeout_ms;
            queue(conn, 0, &Reply::error(Errno::ETIMEDOUT, format!("no hello within {ms} ms")), Vec::new());
            conn.closing = true;
            self.service(token);
        }
    }

    /// Bytes buffered for every peer: unfinished messages past each one's
    /// free allowance, and unread replies.
    fn peer_buffers(&self) -> usize {
        self.conns.values().map(|c| c.reader.buffered().saturating_sub(PEER_FREE_BYTES) + c.out_bytes).sum()
    }

    /// Starts or resets a connection's stall timers after a turn.
    fn note_stalls(&mut self, token: Token, frames_in: u64, frames_out: u64, starved: bool) {
        let stall = Duration::from_millis(u64::from(self.core.limits().peer_stall_ms));
        let Some(c) = self.conns.get_mut(&token) else { return };
        let now = Instant::now();
        c.input_since = match c.input_since {
            _ if c.reader.buffered() == 0 => None,
            // The core itself did not read: not the peer's delay.
            _ if c.blocked || starved => Some(now),
            Some(t) if c.frames_in == frames_in => Some(t),
            _ => Some(now),
        };
        c.output_since = match c.output_since {
            _ if c.out.is_empty() => None,
            Some(t) if c.frames_out == frames_out => Some(t),
            _ => Some(now),
        };
        let due = c.input_since.into_iter().chain(c.output_since).min().map(|t| t + stall);
        if starved {
            self.starved.insert(token);
        }
        let retry = (!self.starved.is_empty()).then(|| now + STARVED_RETRY);
        self.next_sweep = self.next_sweep.into_iter().chain(due).chain(retry).min();
    }

    /// Drops peers that left a message unfinished, or a reply unread, for
    /// longer than `peer_stall_ms`, and tries starved connections again.
    pub(super) fn expire_stalls(&mut self) {
        let now = Instant::now();
        if self.next_sweep.is_none_or(|t| t > now) {
            return;
        }
        self.next_sweep = None;
        let stall = Duration::from_millis(u64::from(self.core.limits().peer_stall_ms));
        let mut stalled = Vec::new();
        for (&t, c) in self.conns.iter_mut() {
            // While the core itself does not read a peer (its operation is
            // running, or the shared budget is full), its unfinished
            // message is not its delay.
            if c.blocked || self.starved.contains(&t) {
                c.input_since = c.input_since.map(|_| now);
            }
            let since = c.input_since.into_iter().chain(c.output_since).min();
            match since {
                Some(s) if now.duration_since(s) >= stall => stalled.push(t),
                Some(s) => self.next_sweep = Some(self.next_sweep.map_or(s + stall, |n| n.min(s + stall))),
                None => {}
            }
        }
        for t in stalled {
            if let Some(c) = self.conns.get(&t) {
                let what = if c.output_since.is_some_and(|s| now.duration_since(s) >= stall) {
                    "did not read its reply"
                } else {
                    "did not finish its message"
                };
                tracing::warn!(pid = c.pid, ms = stall.as_millis() as u64, "dropping a peer that {what} in time");
            }
            self.drop_conn(t);
        }
        if self.starved.is_empty() {
            return;
        }
        // Starved peers are tried again once there is room for at least one
        // more read (so a full budget costs one sum per retry, not one per
        // starved peer).
        let cap = usize::try_from(self.core.limits().max_peer_buffer_bytes).unwrap_or(usize::MAX);
        if self.peer_buffers().saturating_add(PEER_FREE_BYTES) <= cap {
            let starved = std::mem::take(&mut self.starved);
            self.backlog.extend(starved);
        } else {
            let retry = now + STARVED_RETRY;
            self.next_sweep = Some(self.next_sweep.map_or(retry, |n| n.min(retry)));
        }
    }

    /// Queues a reply, unless it is large and the peers' buffers are full:
    /// then the peer gets EAGAIN and may ask again.
    pub(super) fn queue_reply(&mut self, token: Token, seq: u64, reply: &Reply, fds: Vec<OwnedFd>) {
        let Some(bytes) = encode_reply(seq, reply, fds.len()) else { return };
        let cap = usize::try_from(self.core.limits().max_peer_buffer_bytes).unwrap_or(usize::MAX);
        let bytes = if bytes.len() > LARGE_REPLY_BYTES && self.peer_buffers().saturating_add(bytes.len()) > cap {
            let msg = format!(
                "a reply of {} bytes would pass the {cap} bytes the core buffers for its peers; try again",
                bytes.len()
            );
            tracing::warn!("{msg}");
            drop(fds);
            match encode_reply(seq, &Reply::error(Errno::EAGAIN, msg), 0) {
                Some(b) => (b, Vec::new()),
                None => return,
            }
        } else {
            (bytes, fds)
        };
        if let Some(c) = self.conns.get_mut(&token) {
            push_frame(c, bytes.0, bytes.1);
        }
    }

    pub(super) fn register(&mut self, mut stream: UnixStream, pid: i32, uid: u32) -> Option<Token> {
        let token = Token(self.next_token);
        self.next_token += 1;
        // Writable only while a reply waits for room (see `watch_output`):
        // else every reply the peer reads would wake the loop for nothing.
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE) {
            tracing::warn!(error = %e, "cannot register a connection");
            return None;
        }
        self.conns.insert(token, Conn::new(stream, self.core.limits(), pid, uid));
        Some(token)
    }

    pub(super) fn drop_conn(&mut self, token: Token) {
        self.generation += 1;
        let Some(mut c) = self.conns.remove(&token) else { return };
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.page_waiters.retain(|_, (t, _)| *t != token);
        self.driver_waiters.retain(|_, w| w.asker != token);
        for op in self.held.values_mut() {
            if op.conn == Some(token) {
                op.conn = None;
            }
        }
        // The effects of the teardown: settled with no reply.
        let mut fx = model::Effects::default();
        if c.channel != 0 {
            tracing::info!(channel = c.channel, session = c.session, "device channel closed");
            self.chan_tokens.remove(&c.channel);
            self.core.close_channel(c.channel, &mut fx);
            self.channel_gone(c.channel);
        } else if c.role == Some(Role::Session) {
            tracing::info!(session = c.session, pid = c.pid, "session closed");
            for chan in self.core.channels_of(c.session) {
                if let Some(t) = self.chan_tokens.get(&chan).copied() {
                    self.drop_conn(t);
                }
            }
            self.core.close_session(c.session, &mut fx);
        }
        self.apply_effects(None, 0, Reply::Ok, Vec::new(), fx);
    }

    /// Flushes, reads and serves one connection for one turn.
    pub(super) fn service(&mut self, token: Token) {
        let Some(c) = self.conns.get(&token) else { return };
        let (frames_in, frames_out) = (c.frames_in, c.frames_out);
        let mut starved = false;
        self.turn(token, &mut starved);
        self.note_stalls(token, frames_in, frames_out, starved);
    }

    /// Watches a connection for room to write while output waits, and
    /// only then.
    fn watch_output(&mut self, token: Token) -> std::io::Result<()> {
        let Some(conn) = self.conns.get_mut(&token) else { return Ok(()) };
        let want = !conn.out.is_empty();
        if want != conn.watch_writable {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            self.poll.registry().reregister(&mut conn.stream, token, interest)?;
            conn.watch_writable = want;
        }
        Ok(())
    }

    fn turn(&mut self, token: Token, starved: &mut bool) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        if flush(conn).is_err() {
            self.drop_conn(token);
            return;
        }
        if conn.closing {
            if conn.out.is_empty() || self.watch_output(token).is_err() {
                self.drop_conn(token);
            }
            return;
        }
        let mut served = 0;
        let mut eof = false;
        let mut yielded = false;
        loop {
            let Some(conn) = self.conns.get_mut(&token) else { return };
            if conn.out_bytes > OUT_HIGH_WATER || conn.out_fds > OUT_FDS_HIGH_WATER || conn.closing {
                break;
            }
            if served == FRAMES_PER_TURN {
                // Fair share used: come back after the other connections.
                self.backlog.push_back(token);
                yielded = true;
                break;
            }
            if !conn.blocked {
                if let Some((env, fds)) = conn.stash.pop_front() {
                    served += 1;
                    self.handle(token, env, fds);
                    continue;
                }
            } else if conn.channel == 0 {
                // A session waits for its held operation; its next requests
                // stay in the socket until then.
                break;
            }
            // Decoded straight from the receive buffer.
            match conn.reader.next_frame_with(|payload, fds| (wire::decode::<Request>(payload), fds)) {
                Ok(Some((env, fds))) => {
                    served += 1;
                    conn.frames_in += 1;
                    self.handle_decoded(token, env, fds);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(pid = conn.pid, error = %e, "protocol error; closing the connection");
                    queue(conn, 0, &Reply::error(e.errno(), e.to_string()), Vec::new());
                    conn.closing = true;
                    break;
                }
            }
            if eof {
                break;
            }
            // Need more bytes. Past its free allowance a peer's unfinished
            // message draws on the bytes shared by every peer.
            let buffered = conn.reader.buffered();
            let mut room = conn.reader.max_buffer().saturating_sub(buffered).clamp(1, 64 * 1024);
            let growth = (buffered + room).saturating_sub(buffered.max(PEER_FREE_BYTES));
            if growth > 0 {
                let cap = usize::try_from(self.core.limits().max_peer_buffer_bytes).unwrap_or(usize::MAX);
                if self.peer_buffers().saturating_add(growth) > cap {
                    room = PEER_FREE_BYTES.saturating_sub(buffered);
                    if room == 0 {
                        *starved = true;
                        break;
                    }
                }
            }
            let Some(conn) = self.conns.get_mut(&token) else { return };
            if !conn.may_read {
                // The last read emptied the socket and it has not been
                // readable since: a read now would only say EAGAIN.
                break;
            }
            match conn.reader.recv(conn.stream.as_fd(), room) {
                Ok(wire::Received { bytes: 0, .. }) => eof = true,
                Ok(wire::Received { fds, drained, .. }) => {
                    conn.may_read = !drained || conn.read_closed;
                    // Files of FUSE or network file systems are never
                    // memory objects, and even closing one can block: each
                    // is closed on another thread and takes a stand-in's
                    // place, so that the one request that carried it is
                    // refused and the connection goes on.
                    let mut kept = Vec::with_capacity(fds.len());
                    for fd in fds {
                        if !memfd::on_blocking_fs(fd.as_fd()) {
                            kept.push(fd);
                            continue;
                        }
                        let why = match memfd::check_memory_fd(fd.as_fd()) {
                            Err(r) => format!("not a memory object: {r}"),
                            Ok(()) => "not a memory object: its file system may block".to_string(),
                        };
                        memfd::close_elsewhere(fd);
                        match refused_stand_in() {
                            Some(stand_in) => {
                                tracing::warn!(pid = conn.pid, "{why}; refusing the request that carries it");
                                conn.refused.push_back(why);
                                kept.push(stand_in);
                            }
                            None => {
                                tracing::warn!(pid = conn.pid, "{why}; no stand-in fd left, closing the connection");
                                conn.closing = true;
                            }
                        }
                    }
                    conn.reader.push_fds(kept);
                    if conn.closing {
                        let msg = "files on FUSE or network file systems cannot be memory objects";
                        queue(conn, 0, &Reply::error(Errno::EINVAL, msg), Vec::new());
                        break;
                    }
                }
                Err(wire::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    conn.may_read = false;
                    break;
                }
                Err(wire::Error::Io(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(e @ wire::Error::Truncated) => {
                    tracing::warn!(pid = conn.pid, error = %e, "closing the connection");
                    queue(conn, 0, &Reply::error(e.errno(), e.to_string()), Vec::new());
                    conn.closing = true;
                    break;
                }
                Err(_) => eof = true,
            }
        }
        let Some(conn) = self.conns.get_mut(&token) else { return };
        if flush(conn).is_err() || self.watch_output(token).is_err() {
            self.drop_conn(token);
            return;
        }
        let Some(conn) = self.conns.get_mut(&token) else { return };
        if yielded || conn.blocked {
            // Requests may still be waiting; the end of stream is seen again
            // on the next turn.
            return;
        }
        if eof {
            conn.closing = true;
        }
        if conn.closing && conn.out.is_empty() && !conn.blocked {
            self.drop_conn(token);
        }
    }
}

/// The file that stands in for a refused one in a connection's queue of
/// received fds: one pipe of the process, duplicated per refusal.
fn refused_stand_in() -> Option<OwnedFd> {
    STAND_IN
        .get_or_init(|| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok().map(|(r, _w)| r))
        .as_ref()?
        .try_clone()
        .ok()
}

/// The pipe behind every stand-in, made at the first refusal.
static STAND_IN: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();

/// Whether `fd` is a [`refused_stand_in`] (same pipe: the same inode).
pub(super) fn is_refused_stand_in(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    // No refusal yet: no stand-in exists.
    let Some(Some(pipe)) = STAND_IN.get() else { return false };
    match (nix::sys::stat::fstat(fd.as_raw_fd()), nix::sys::stat::fstat(pipe.as_raw_fd())) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

fn encode_reply(seq: u64, reply: &Reply, nfds: usize) -> Option<Vec<u8>> {
    match wire::encode_reply(seq, reply, nfds) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            wire::encode_reply(seq, &Reply::error(Errno::E2BIG, e.to_string()), 0).ok()
        }
    }
}

/// Queues a notice of the core's own (`seq` 0) to a device channel.
pub(super) fn queue_notice(conn: &mut Conn, notice: &Notice) {
    match wire::encode_notice(notice) {
        Ok(bytes) => push_frame(conn, bytes, Vec::new()),
        Err(e) => tracing::error!(error = %e, "cannot encode a notice"),
    }
}

pub(super) fn queue(conn: &mut Conn, seq: u64, reply: &Reply, fds: Vec<OwnedFd>) {
    if let Some(bytes) = encode_reply(seq, reply, fds.len()) {
        push_frame(conn, bytes, fds);
    }
}

fn push_frame(conn: &mut Conn, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
    conn.out_bytes += bytes.len();
    conn.out_fds += fds.len();
    conn.out.push_back(OutFrame { bytes, pos: 0, fds });
}

/// Writes as much of the output as the socket takes; a frame's fds go with
/// its first byte.
fn flush(conn: &mut Conn) -> std::io::Result<()> {
    use std::io::Write;
    while let Some(f) = conn.out.front_mut() {
        let res = if f.pos == 0 && !f.fds.is_empty() {
            let fds: Vec<_> = f.fds.iter().map(|fd| fd.as_fd()).collect();
            wire::send_with_fds(conn.stream.as_fd(), &f.bytes, &fds)
        } else {
            conn.stream.write(&f.bytes[f.pos..])
        };
        match res {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                f.pos += n;
                conn.out_bytes -= n;
                conn.out_fds -= f.fds.len();
                f.fds.clear();
                if f.pos == f.bytes.len() {
                    conn.out.pop_front();
                    conn.frames_out += 1;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
