//! The `iommu-core` event loop: one mio poll over the listening socket and
//! every connection, serving the [`wire`](crate::wire) protocol against the
//! [`Core`] model.
//!
//! Fairness: each connection gets at most [`FRAMES_PER_TURN`] requests per
//! turn; a connection with more waiting is put at the back of a queue that is
//! served before the loop sleeps again. A connection whose replies pile up
//! (it does not read them) is not served until they drain, so its memory use
//! stays bounded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::errno::Errno;
use crate::memfd;
use crate::model::{self, Core};
use crate::types::{InvalidateTarget, Limits};
use crate::wire::{self, Envelope, FrameReader, Reply, Request, Role};

/// Requests served per connection per turn of the loop.
pub const FRAMES_PER_TURN: usize = 32;
/// Unsent reply bytes above which a connection is not served.
pub const OUT_HIGH_WATER: usize = 1 << 20;
/// A connection is not read while more fds than this wait in its output
/// (each is an open file of the core until the peer takes it).
pub const OUT_FDS_HIGH_WATER: usize = 64;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
const FIRST_CONN: usize = 16;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another core answers on the socket path.
    #[error("another iommu-core is already listening on {0}")]
    InUse(PathBuf),
    /// Setting up the socket or the poll failed.
    #[error("{what} {path}: {error}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The model could not be created.
    #[error("cannot create the core: {0}")]
    Model(#[from] model::Error),
    /// The poll failed.
    #[error("poll failed: {0}")]
    Poll(std::io::Error),
}

/// The default socket path: `$XDG_RUNTIME_DIR/ioasid/core.sock`, else
/// `/run/ioasid/core.sock`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ioasid/core.sock"),
        _ => PathBuf::from("/run/ioasid/core.sock"),
    }
}

/// A reply (or notification) waiting to be written, with its fds.
struct OutFrame {
    bytes: Vec<u8>,
    pos: usize,
    fds: Vec<OwnedFd>,
}

struct Conn {
    stream: UnixStream,
    reader: FrameReader,
    out: VecDeque<OutFrame>,
    out_bytes: usize,
    out_fds: usize,
    role: Option<Role>,
    session: u64,
    /// Non-zero for a device channel made by the core.
    channel: u64,
    pid: i32,
    uid: u32,
    /// Close once `out` is flushed.
    closing: bool,
    /// A request of this connection waits for device servers; its later
    /// requests wait in `stash` (except invalidation answers).
    blocked: bool,
    stash: VecDeque<(Envelope<Request>, Vec<OwnedFd>)>,
    /// Why each refused file (now a [`refused_stand_in`] in the reader)
    /// was refused, oldest first.
    refused: VecDeque<String>,
    /// Since when an unfinished message has waited in `reader` (reset by
    /// each whole message, and while the core itself does not read).
    input_since: Option<Instant>,
    /// Since when the reply at the head of `out` has waited to be read
    /// (reset each time one is read whole).
    output_since: Option<Instant>,
    /// Messages received and replies written whole, to see progress.
    frames_in: u64,
    frames_out: u64,
}

/// Most requests a blocked device channel may queue before it is cut off
/// (a blocked session is simply not read until its operation completes).
const STASH_LIMIT: usize = 32;

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
            frames_in: 0,
            frames_out: 0,
        }
    }
}

/// An operation whose reply waits until every device channel that could
/// hold a stale translation has answered (or has been fenced).
struct HeldOp {
    conn: Option<Token>,
    seq: u64,
    reply: Reply,
    fds: Vec<OwnedFd>,
    garbage: Vec<(u64, u64)>,
    /// Channel -> invalidation id it must answer.
    waiting: HashMap<u64, u64>,
    deadline: Instant,
}

/// A long operation in progress: its connection, request seq, the job and
/// how to make its reply from the job's result.
struct RunningJob {
    conn: Token,
    seq: u64,
    job: model::Job,
    reply: fn(u64) -> Reply,
}

/// A driver-state query relayed to a device channel.
struct DriverWaiter {
    asker: Token,
    seq: u64,
    chan: u64,
    deadline: Instant,
}

/// New peers are turned away while more refused files than this wait to
/// be closed (their file system's server is stalled): each is an open
/// file of the core.
pub const MAX_PENDING_CLOSES: usize = 256;

/// Driver-state queries one peer may have waiting at once.
pub const DRIVER_QUERIES_PER_ASKER: usize = 4;
/// Driver-state queries waiting on one device channel at once.
pub const DRIVER_QUERIES_PER_CHANNEL: usize = 16;

/// Most lines of a page-table dump (about 80 bytes each).
const PAGE_TABLE_LINES: usize = 8192;

/// How long a device server has to answer a driver-state query.
const DRIVER_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// A handle that stops a running server from another thread.
#[derive(Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl StopHandle {
    /// A handle over a loop's stop flag and its waker (for other mio
    /// loops of the stack).
    pub fn new(stop: Arc<AtomicBool>, waker: Arc<Waker>) -> StopHandle {
        StopHandle { stop, waker }
    }

    /// Asks the loop to exit; it removes its socket on the way out.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "cannot wake the event loop");
        }
    }
}

/// The core daemon's event loop.
pub struct Server {
    poll: Poll,
    listener: UnixListener,
    path: PathBuf,
    core: Core,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    backlog: VecDeque<Token>,
    /// Peers that have not said hello yet, by deadline (in accept order).
    hello_deadlines: VecDeque<(Instant, Token)>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    owner_uid: u32,
    chan_tokens: HashMap<u64, Token>,
    held: HashMap<u64, HeldOp>,
    next_op: u64,
    /// Invalidation id -> held operation.
    inval_owner: HashMap<u64, u64>,
    next_inval: u64,
    /// Page-request cookie -> (channel connection, seq) to answer.
    page_waiters: HashMap<u64, (Token, u64)>,
    /// Driver-state queries waiting for a device server: id -> waiter.
    driver_waiters: HashMap<u64, DriverWaiter>,
    next_query: u64,
    /// Bumped by everything that may change what a snapshot shows.
    generation: u64,
    /// Connections not read because the peers' buffers are full.
    starved: std::collections::BTreeSet<Token>,
    /// Long maps and unmaps, one slice per turn of the loop in turn, with
    /// the connection, request seq and how to make the reply.
    jobs: VecDeque<RunningJob>,
    /// When to look for stalled peers next.
    next_sweep: Option<Instant>,
}

/// Bytes of an unfinished message each peer may have buffered outside the
/// shared `max_peer_buffer_bytes` (most requests are far smaller).
pub const PEER_FREE_BYTES: usize = 16 << 10;
/// Replies larger than this are refused with EAGAIN while the peers'
/// buffers are full.
pub const LARGE_REPLY_BYTES: usize = 64 << 10;
/// How often starved connections are tried again.
const STARVED_RETRY: Duration = Duration::from_millis(50);

impl Server {
    /// Binds the socket at `path` (mode 0600, parent directory created with
    /// mode 0700) and creates the core with `limits`. A stale socket left by
    /// a dead core is replaced; a live one is an error.
    pub fn bind(path: &Path, limits: Limits) -> Result<Server, Error> {
        let setup = |what, error| Error::Setup { what, path: path.to_path_buf(), error };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| setup("cannot create the directory of", e))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| setup("cannot set the mode of the directory of", e))?;
            }
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|e| setup("cannot remove the stale socket", e))?;
        }
        let listener = bind_private(path, 0o600).map_err(|e| setup("cannot bind", e))?;
        listener.set_nonblocking(true).map_err(|e| setup("cannot make non-blocking the socket", e))?;
        let mut listener = UnixListener::from_std(listener);
        let poll = Poll::new().map_err(|e| setup("cannot create a poll for", e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| setup("cannot register", e))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| setup("cannot create a waker for", e))?);
        let core = Core::new(limits)?;
        Ok(Server {
            poll,
            listener,
            path: path.to_path_buf(),
            core,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            backlog: VecDeque::new(),
            hello_deadlines: VecDeque::new(),
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            signals: None,
            owner_uid: nix::unistd::geteuid().as_raw(),
            chan_tokens: HashMap::new(),
            held: HashMap::new(),
            next_op: 1,
            inval_owner: HashMap::new(),
            next_inval: 1,
            starved: std::collections::BTreeSet::new(),
            next_sweep: None,
            jobs: VecDeque::new(),
            page_waiters: HashMap::new(),
            driver_waiters: HashMap::new(),
            next_query: 1,
            generation: 1,
        })
    }

    /// Makes SIGTERM and SIGINT stop the loop cleanly.
    pub fn handle_signals(&mut self) -> Result<(), Error> {
        let mut s =
            signal_hook_mio::v1_0::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]).map_err(
                |e| Error::Setup { what: "cannot install signal handlers for", path: self.path.clone(), error: e },
            )?;
        self.poll.registry().register(&mut s, SIGNALS, Interest::READABLE).map_err(|e| Error::Setup {
            what: "cannot register signals for",
            path: self.path.clone(),
            error: e,
        })?;
        self.signals = Some(s);
        Ok(())
    }

    /// A handle to stop the loop from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle { stop: self.stop.clone(), waker: self.waker.clone() }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model (for in-process inspection).
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Runs until stopped; removes the socket on the way out.
    pub fn run(&mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(256);
        let res = loop {
            if self.stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            let timeout = if !self.backlog.is_empty() || !self.jobs.is_empty() {
                Some(Duration::ZERO)
            } else {
                let held = self.held.values().map(|o| o.deadline);
                let queries = self.driver_waiters.values().map(|w| w.deadline);
                let hello = self.hello_deadlines.front().map(|(d, _)| *d);
                let sweep = self.next_sweep;
                held.chain(queries).chain(hello).chain(sweep).min().map(|d| d.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                break Err(Error::Poll(e));
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    SIGNALS => {
                        if let Some(s) = self.signals.as_mut() {
                            for sig in s.pending() {
                                tracing::info!(signal = sig, "stopping on signal");
                                self.stop.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    t => self.service(t),
                }
            }
            let turn: Vec<Token> = self.backlog.drain(..).collect();
            for t in turn {
                self.service(t);
            }
            self.expire_held();
            self.expire_hellos();
            self.expire_stalls();
            self.run_job();
        };
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            self.drop_conn(t);
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket");
        }
        res
    }

    fn accept(&mut self) {
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
            if full {
                tracing::warn!(pid, uid, "turning a peer away: the connection limit is reached");
                let conn = self.conns.get_mut(&token).expect("just registered");
                let msg = if memfd::closes_pending() > MAX_PENDING_CLOSES {
                    "the core is waiting to close files of a stalled file system; try again later".to_string()
                } else {
                    format!("{} connections are open, the configured limit", self.core.limits().max_connections)
                };
                queue(conn, 0, &Reply::error(Errno::ENOSPC, msg), Vec::new());
                conn.closing = true;
            } else if uid != self.owner_uid && uid != 0 {
                tracing::warn!(pid, uid, "refusing a peer of another user");
                let conn = self.conns.get_mut(&token).expect("just registered");
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
    fn expire_hellos(&mut self) {
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
    fn expire_stalls(&mut self) {
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

    /// Takes a long operation on: its connection is not read until it is
    /// over, and the loop runs it one slice per turn between the other
    /// connections' requests.
    fn start_job(
        &mut self,
        token: Token,
        seq: u64,
        job: model::Job,
        reply: fn(u64) -> Reply,
    ) -> Option<(Reply, Vec<OwnedFd>)> {
        if let Some(c) = self.conns.get_mut(&token) {
            c.blocked = true;
        }
        self.jobs.push_back(RunningJob { conn: token, seq, job, reply });
        None
    }

    /// One slice of the job whose turn it is.
    fn run_job(&mut self) {
        let Some(mut j) = self.jobs.pop_front() else { return };
        let Some(res) = self.core.job_step(&mut j.job) else {
            self.jobs.push_back(j);
            return;
        };
        let RunningJob { conn: token, seq, reply: make, .. } = j;
        self.generation += 1;
        let reply = res.map(make).unwrap_or_else(|e| Reply::error(e.errno, e.message));
        self.core.count_request(matches!(reply, Reply::Error { .. }));
        let effects = self.core.take_effects();
        if let Some(c) = self.conns.get_mut(&token) {
            c.blocked = false;
        }
        self.backlog.push_back(token);
        self.apply_effects(Some(token), seq, reply, Vec::new(), effects);
    }

    /// Queues a reply, unless it is large and the peers' buffers are full:
    /// then the peer gets EAGAIN and may ask again.
    fn queue_reply(&mut self, token: Token, seq: u64, reply: &Reply, fds: Vec<OwnedFd>) {
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

    fn register(&mut self, mut stream: UnixStream, pid: i32, uid: u32) -> Option<Token> {
        let token = Token(self.next_token);
        self.next_token += 1;
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
            tracing::warn!(error = %e, "cannot register a connection");
            return None;
        }
        self.conns.insert(token, Conn::new(stream, self.core.limits(), pid, uid));
        Some(token)
    }

    fn drop_conn(&mut self, token: Token) {
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
        if c.channel != 0 {
            tracing::info!(channel = c.channel, session = c.session, "device channel closed");
            self.chan_tokens.remove(&c.channel);
            self.core.close_channel(c.channel);
            self.channel_gone(c.channel);
        } else if c.role == Some(Role::Session) {
            tracing::info!(session = c.session, pid = c.pid, "session closed");
            for chan in self.core.channels_of(c.session) {
                if let Some(t) = self.chan_tokens.get(&chan).copied() {
                    self.drop_conn(t);
                }
            }
            self.core.close_session(c.session);
        }
        let effects = self.core.take_effects();
        self.apply_effects(None, 0, Reply::Ok, Vec::new(), effects);
    }

    /// A channel that will never answer: operations stop waiting for it.
    fn channel_gone(&mut self, chan: u64) {
        let gone: Vec<u64> = self.driver_waiters.iter().filter(|(_, w)| w.chan == chan).map(|(id, _)| *id).collect();
        for id in gone {
            self.answer_query(id, Reply::error(Errno::ENOENT, "the device server went away"));
        }
        let ops: Vec<u64> =
            self.held.iter().filter(|(_, o)| o.waiting.contains_key(&chan)).map(|(id, _)| *id).collect();
        for id in ops {
            if let Some(op) = self.held.get_mut(&id) {
                if let Some(inval) = op.waiting.remove(&chan) {
                    self.inval_owner.remove(&inval);
                }
                if op.waiting.is_empty() {
                    self.complete(id);
                }
            }
        }
    }

    fn answer_query(&mut self, id: u64, reply: Reply) {
        if let Some(w) = self.driver_waiters.remove(&id) {
            if let Some(c) = self.conns.get_mut(&w.asker) {
                queue(c, w.seq, &reply, Vec::new());
                self.backlog.push_back(w.asker);
            }
        }
    }

    /// Fences channels that missed their deadline and completes their ops.
    fn expire_held(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self.driver_waiters.iter().filter(|(_, w)| w.deadline <= now).map(|(id, _)| *id).collect();
        for id in late {
            self.answer_query(id, Reply::error(Errno::ETIMEDOUT, "the device server did not answer in time"));
        }
        let late: Vec<u64> = self.held.iter().filter(|(_, o)| o.deadline <= now).map(|(id, _)| *id).collect();
        for id in late {
            let chans: Vec<(u64, u64)> =
                self.held.get(&id).map(|o| o.waiting.iter().map(|(c, i)| (*c, *i)).collect()).unwrap_or_default();
            for (chan, inval) in chans {
                self.inval_owner.remove(&inval);
                self.core.fence_channel(chan);
                self.generation += 1;
            }
            if let Some(op) = self.held.get_mut(&id) {
                op.waiting.clear();
            }
            self.complete(id);
        }
    }

    fn complete(&mut self, id: u64) {
        let Some(op) = self.held.remove(&id) else { return };
        self.core.release_tables(op.garbage);
        if let Some(t) = op.conn {
            if let Some(conn) = self.conns.get_mut(&t) {
                queue(conn, op.seq, &op.reply, op.fds);
                conn.blocked = false;
                self.backlog.push_back(t);
            }
        }
    }

    /// Sends the reply now, or holds it until every channel has answered the
    /// invalidations the operation caused.
    fn apply_effects(&mut self, conn: Option<Token>, seq: u64, reply: Reply, fds: Vec<OwnedFd>, e: model::Effects) {
        let mut waiting = HashMap::new();
        let mut per_chan: BTreeMap<u64, (Vec<InvalidateTarget>, Vec<u64>)> = BTreeMap::new();
        for (chan, t) in e.invalidations {
            per_chan.entry(chan).or_default().0 = t;
        }
        for (chan, f) in e.forget {
            per_chan.entry(chan).or_default().1 = f;
        }
        for (chan, (targets, forget)) in per_chan {
            let Some(t) = self.chan_tokens.get(&chan).copied() else { continue };
            let Some(c) = self.conns.get_mut(&t) else { continue };
            let id = self.next_inval;
            self.next_inval += 1;
            queue(c, 0, &Reply::Invalidate { id, targets, forget }, Vec::new());
            self.backlog.push_back(t);
            waiting.insert(chan, id);
        }
        if waiting.is_empty() {
            self.core.release_tables(e.garbage);
            if let Some(t) = conn {
                self.queue_reply(t, seq, &reply, fds);
            }
            return;
        }
        let op = self.next_op;
        self.next_op += 1;
        for id in waiting.values() {
            self.inval_owner.insert(*id, op);
        }
        if let Some(c) = conn.and_then(|t| self.conns.get_mut(&t)) {
            c.blocked = true;
        }
        let timeout = Duration::from_millis(u64::from(self.core.limits().invalidate_timeout_ms));
        self.held.insert(
            op,
            HeldOp { conn, seq, reply, fds, garbage: e.garbage, waiting, deadline: Instant::now() + timeout },
        );
    }

    /// Flushes, reads and serves one connection for one turn.
    fn service(&mut self, token: Token) {
        let Some(c) = self.conns.get(&token) else { return };
        let (frames_in, frames_out) = (c.frames_in, c.frames_out);
        let mut starved = false;
        self.turn(token, &mut starved);
        self.note_stalls(token, frames_in, frames_out, starved);
    }

    fn turn(&mut self, token: Token, starved: &mut bool) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        if flush(conn).is_err() {
            self.drop_conn(token);
            return;
        }
        if conn.closing {
            if conn.out.is_empty() {
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
            match conn.reader.next_frame() {
                Ok(Some(frame)) => {
                    served += 1;
                    conn.frames_in += 1;
                    self.handle_frame(token, frame);
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
            let mut buf = vec![0u8; room];
            match wire::recv_with_fds(conn.stream.as_fd(), &mut buf, conn.reader.max_fds()) {
                Ok((0, _)) => eof = true,
                Ok((n, fds)) => {
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
                    conn.reader.push(&buf[..n], kept);
                    if conn.closing {
                        let msg = "files on FUSE or network file systems cannot be memory objects";
                        queue(conn, 0, &Reply::error(Errno::EINVAL, msg), Vec::new());
                        break;
                    }
                }
                Err(wire::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
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
        if flush(conn).is_err() {
            self.drop_conn(token);
            return;
        }
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

    fn handle_frame(&mut self, token: Token, frame: wire::Frame) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        match wire::decode::<Request>(&frame.payload) {
            Ok(env) => self.handle(token, env, frame.fds),
            Err(e) => {
                tracing::warn!(pid = conn.pid, error = %e, "undecodable request; closing the connection");
                queue(conn, 0, &Reply::error(Errno::EPROTO, e.to_string()), Vec::new());
                conn.closing = true;
            }
        }
    }

    fn handle(&mut self, token: Token, env: Envelope<Request>, fds: Vec<OwnedFd>) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        if conn.blocked && !matches!(env.body, Request::InvalidateDone { .. }) {
            if conn.stash.len() >= STASH_LIMIT {
                queue(conn, 0, &Reply::error(Errno::E2BIG, "too many requests queued behind a held one"), Vec::new());
                conn.closing = true;
            } else {
                conn.stash.push_back((env, fds));
            }
            return;
        }
        let seq = env.seq;
        if !env.body.read_only() || matches!(env.body, Request::Hello { .. }) {
            self.generation += 1;
        }
        let answer = self.dispatch(token, seq, env.body, fds);
        let Some((reply, out_fds)) = answer else { return };
        self.core.count_request(matches!(reply, Reply::Error { .. }));
        let effects = self.core.take_effects();
        self.apply_effects(Some(token), seq, reply, out_fds, effects);
    }

    /// Serves one request. `None`: no reply now (an invalidation answer, or
    /// a page request answered later).
    fn dispatch(&mut self, token: Token, seq: u64, req: Request, fds: Vec<OwnedFd>) -> Option<(Reply, Vec<OwnedFd>)> {
        let conn = self.conns.get_mut(&token)?;
        let plain = |r: Reply| Some((r, Vec::new()));
        let stand_ins = fds.iter().filter(|f| is_refused_stand_in(f.as_fd())).count();
        if stand_ins > 0 {
            let mut why = String::new();
            for _ in 0..stand_ins {
                why = conn.refused.pop_front().unwrap_or_default();
            }
            return plain(Reply::error(Errno::EINVAL, why));
        }
        if fds.len() != req.fds_expected() {
            return plain(Reply::error(
                Errno::EBADF,
                format!("this request takes {} fds, {} were attached", req.fds_expected(), fds.len()),
            ));
        }
        let Some(role) = conn.role else {
            let Request::Hello { magic, major, minor, role } = req else {
                conn.closing = true;
                return plain(Reply::error(Errno::EPROTO, "the first message must be a hello"));
            };
            if magic != wire::MAGIC {
                conn.closing = true;
                return plain(Reply::error(Errno::EPROTO, "bad magic in hello"));
            }
            if major != wire::VERSION_MAJOR {
                conn.closing = true;
                return plain(Reply::error(
                    Errno::EOPNOTSUPP,
                    format!("protocol {major}.{minor} is not supported; this core speaks {}.x", wire::VERSION_MAJOR),
                ));
            }
            let (pid, uid, is_channel) = (conn.pid, conn.uid, conn.channel != 0);
            let session = match (role, is_channel) {
                (Role::DeviceChannel, true) => conn.session,
                (_, true) => {
                    conn.closing = true;
                    return plain(Reply::error(
                        Errno::EPERM,
                        "a device channel can only say hello as a device channel",
                    ));
                }
                (Role::Session, false) => match self.core.open_session(pid, uid) {
                    Ok(s) => s,
                    Err(e) => {
                        if let Some(c) = self.conns.get_mut(&token) {
                            c.closing = true;
                        }
                        return plain(Reply::error(e.errno, e.message));
                    }
                },
                (Role::Observer, false) => 0,
                (Role::DeviceChannel, false) => {
                    conn.closing = true;
                    return plain(Reply::error(
                        Errno::EPERM,
                        "device channels are made by the core and handed to a session; they cannot be opened on the socket",
                    ));
                }
            };
            let conn = self.conns.get_mut(&token)?;
            conn.role = Some(role);
            conn.session = session;
            tracing::info!(pid, uid, session, ?role, "hello");
            return plain(Reply::Hello {
                major: wire::VERSION_MAJOR,
                minor: wire::VERSION_MINOR,
                session,
                limits: *self.core.limits(),
            });
        };
        if matches!(req, Request::Hello { .. }) {
            return plain(Reply::error(Errno::EPROTO, "hello was already sent on this connection"));
        }
        if role == Role::Observer && !req.read_only() {
            return plain(Reply::error(Errno::EPERM, "observers are read-only"));
        }
        if role == Role::Session && req.channel_only() {
            return plain(Reply::error(Errno::EPERM, "this request is for device channels"));
        }
        if role == Role::DeviceChannel && !req.channel_only() && !req.read_only() {
            return plain(Reply::error(Errno::EPERM, "this request is for sessions"));
        }
        let sid = conn.session;
        let chan = conn.channel;
        let only = (role != Role::Observer).then_some(sid);
        let mut fds = fds.into_iter();
        let core = &mut self.core;
        let res: model::Result<Reply> = match req {
            Request::Hello { .. } => Ok(Reply::Ok),
            Request::RegisterMemory => match fds.next() {
                Some(fd) => core.register_memory(sid, fd).map(Reply::Memory),
                None => Ok(Reply::error(Errno::EBADF, "no fd attached")),
            },
            Request::RegisterClientMemory { size, writable, address } => {
                core.register_client_memory(sid, size, writable, address).map(Reply::Memory)
            }
            Request::IoasAlloc => core.ioas_alloc(sid).map(Reply::Id),
            Request::NestedAlloc { parent, s1_root } => core.nested_alloc(sid, parent, s1_root).map(Reply::Id),
            Request::Destroy { id } => core.destroy(sid, id).map(|_| Reply::Ok),
            Request::Map(a) => match core.map_begin(sid, a) {
                Ok(model::Started::Job(job)) => return self.start_job(token, seq, job, Reply::Iova),
                r => r.map(|s| Reply::Iova(s.done())),
            },
            Request::Unmap { ioas, iova, length } => match core.unmap_begin(sid, ioas, iova, length) {
                Ok(model::Started::Job(job)) => return self.start_job(token, seq, job, Reply::Bytes),
                r => r.map(|s| Reply::Bytes(s.done())),
            },
            Request::Copy(a) => core.copy(sid, a).map(Reply::Iova),
            Request::IovaRanges { ioas } => core.iova_ranges(sid, ioas).map(Reply::Ranges),
            Request::AllowIovas { ioas, ranges } => core.allow_iovas(sid, ioas, ranges).map(|_| Reply::Ok),
            Request::AddReserved { ioas, start, last } => core.add_reserved(sid, ioas, start, last).map(|_| Reply::Ok),
            Request::Invalidate { nested, scope } => core.invalidate(sid, nested, scope).map(|_| Reply::Ok),
            Request::PpasidAlloc => core.ppasid_alloc(sid).map(Reply::Pasid),
            Request::PpasidFree { pasid } => core.ppasid_free(sid, pasid).map(|_| Reply::Ok),
            Request::SetDirtyTracking { ioas, enable } => core.set_dirty_tracking(sid, ioas, enable).map(|_| Reply::Ok),
            Request::SetPageFaults { ioas, enable } => core.set_page_faults(sid, ioas, enable).map(|_| Reply::Ok),
            Request::DirtyBitmap { ioas, iova, length, page_size, no_clear } => {
                core.dirty_bitmap(sid, ioas, iova, length, page_size, no_clear).map(Reply::Bitmap)
            }
            Request::ReadFaults { max } => core.read_faults(sid, max).map(Reply::Faults),
            Request::RespondFault { cookie, code } => {
                let r = core.respond_fault(sid, cookie, code);
                if r.is_ok() {
                    if let Some((t, s)) = self.page_waiters.remove(&cookie) {
                        if let Some(c) = self.conns.get_mut(&t) {
                            queue(c, s, &Reply::PageResponse { code }, Vec::new());
                            self.backlog.push_back(t);
                        }
                    }
                }
                r.map(Reply::Fault)
            }
            Request::Translate { ioas, iova } => core.translate(sid, ioas, iova).map(Reply::Translation),
            Request::Status => {
                // A reply lists at most MAPPINGS_PAGE mappings in all; the
                // rest are paged with Mappings.
                Ok(Reply::Status(Box::new(core.snapshot_limited(only, wire::MAPPINGS_PAGE as usize))))
            }
            Request::Mappings { session, ioas, from, max } => core
                .mappings_page(only, session, ioas, from, max.min(wire::MAPPINGS_PAGE) as usize)
                .map(Reply::Mappings),
            Request::OpenDeviceChannel => return Some(self.open_channel(sid)),
            Request::BindDevice(a) => core.bind_device(chan, a).map(Reply::Device),
            Request::UnbindDevice { dev } => core.unbind_device(chan, dev).map(|_| Reply::Ok),
            Request::Attach { dev, pasid, pt_id, replace } => {
                core.attach(chan, dev, pasid, pt_id, replace).map(|_| Reply::Ok)
            }
            Request::Detach { dev, pasid } => core.detach(chan, dev, pasid).map(|_| Reply::Ok),
            Request::DevicePasidAlloc { dev } => core.device_ppasid_alloc(chan, dev).map(Reply::Pasid),
            Request::DevicePasidFree { dev, pasid } => core.device_ppasid_free(chan, dev, pasid).map(|_| Reply::Ok),
            Request::GetPools => {
                let (Some(pool), Some(dirty)) =
                    (core.channel_session(chan).and_then(|s| core.pool(s)), core.channel_dirty_pool(chan))
                else {
                    return plain(Reply::error(Errno::ENOENT, "the channel's session is gone"));
                };
                // The session's own pools: the table pool read-only (the
                // kernel refuses any writable route to it, see
                // `TablePool`), the dirty pool read-write.
                let fds = [reopen_read_only(pool.fd()), dirty.fd().try_clone_to_owned()];
                return Some(match fds {
                    [Ok(a), Ok(b)] => {
                        (Reply::Pools { table_bytes: pool.size(), dirty_bytes: dirty.size() }, vec![a, b])
                    }
                    _ => (Reply::error(Errno::ENOMEM, "cannot duplicate the pool fds"), Vec::new()),
                });
            }
            Request::GetMemory { system_address } => {
                return Some(match core.memory_at(chan, system_address) {
                    Ok(model::MemoryAt::File { base, size, sealed, file }) => match file.try_clone() {
                        Ok(f) => (Reply::MemoryFd { base, size, sealed }, vec![OwnedFd::from(f)]),
                        Err(e) => (Reply::error(Errno::ENOMEM, format!("cannot duplicate the fd: {e}")), Vec::new()),
                    },
                    Ok(model::MemoryAt::Client { base, size, address }) => {
                        (Reply::ClientMemory { base, size, address }, Vec::new())
                    }
                    Err(e) => (Reply::error(e.errno, e.message), Vec::new()),
                })
            }
            Request::ReportFault(rec) => core.device_fault(chan, rec, false).map(|_| Reply::Ok),
            Request::PageRequest(rec) => match core.device_fault(chan, rec, true) {
                Ok(cookie) => {
                    self.page_waiters.insert(cookie, (token, seq));
                    return None;
                }
                Err(e) => Err(e),
            },
            Request::Generation => Ok(Reply::Generation(self.generation)),
            Request::PageTable { session, ioas } => {
                if role != Role::Observer && session != sid {
                    return plain(Reply::error(Errno::ENOENT, format!("no IOAS {ioas} in this session")));
                }
                core.page_table(session, ioas, PAGE_TABLE_LINES).map(Reply::Lines)
            }
            Request::DriverState { session, dev } => {
                if role != Role::Observer && session != sid {
                    return plain(Reply::error(Errno::ENOENT, format!("no device {dev} in this session")));
                }
                let qchan = match core.device_channel(session, dev) {
                    Ok(c) => c,
                    Err(e) => return plain(Reply::error(e.errno, e.message)),
                };
                let Some(t) = self.chan_tokens.get(&qchan).copied() else {
                    return plain(Reply::error(Errno::ENOENT, "the device's channel is closed"));
                };
                // Queries wait on a device server: a peer may have only a
                // few out, and a channel only a few to answer.
                let by_asker = self.driver_waiters.values().filter(|w| w.asker == token).count();
                let by_chan = self.driver_waiters.values().filter(|w| w.chan == qchan).count();
                if by_asker >= DRIVER_QUERIES_PER_ASKER || by_chan >= DRIVER_QUERIES_PER_CHANNEL {
                    return plain(Reply::error(
                        Errno::EBUSY,
                        "too many driver-state queries are waiting; ask again when they are answered",
                    ));
                }
                let id = self.next_query;
                self.next_query += 1;
                if let Some(c) = self.conns.get_mut(&t) {
                    queue(c, 0, &Reply::DriverQuery { id, dev }, Vec::new());
                    self.backlog.push_back(t);
                }
                let deadline = Instant::now() + DRIVER_QUERY_TIMEOUT;
                self.driver_waiters.insert(id, DriverWaiter { asker: token, seq, chan: qchan, deadline });
                return None;
            }
            Request::DriverStateDone { id, state } => {
                // Only the channel the query went to can answer it.
                if self.driver_waiters.get(&id).is_some_and(|w| w.chan == chan) {
                    let reply = if state.within_limits() {
                        Reply::DriverState(state)
                    } else {
                        Reply::error(Errno::E2BIG, "the device server's answer exceeds the limits")
                    };
                    self.answer_query(id, reply);
                }
                return None;
            }
            Request::InvalidateDone { id } => {
                // Only the channel the invalidation went to can answer it.
                let op = self.inval_owner.get(&id).copied();
                let mine = op.and_then(|op| self.held.get(&op)).is_some_and(|o| o.waiting.get(&chan) == Some(&id));
                if let (Some(op), true) = (op, mine) {
                    self.inval_owner.remove(&id);
                    let done = self.held.get_mut(&op).map(|o| {
                        o.waiting.remove(&chan);
                        o.waiting.is_empty()
                    });
                    if done == Some(true) {
                        self.complete(op);
                    }
                }
                return None;
            }
        };
        plain(res.unwrap_or_else(|e| Reply::error(e.errno, e.message)))
    }

    /// Makes a device channel for session `sid`: a socketpair whose one end
    /// the loop serves and whose other end goes back in the reply.
    fn open_channel(&mut self, sid: u64) -> (Reply, Vec<OwnedFd>) {
        let fail = |e: String| (Reply::error(Errno::ENOMEM, e), Vec::new());
        let chan = match self.core.open_channel(sid) {
            Ok(c) => c,
            Err(e) => return (Reply::error(e.errno, e.message), Vec::new()),
        };
        let pair = std::os::unix::net::UnixStream::pair().and_then(|(a, b)| a.set_nonblocking(true).map(|_| (a, b)));
        let (ours, theirs) = match pair {
            Ok(p) => p,
            Err(e) => {
                self.core.close_channel(chan);
                return fail(format!("cannot make a socketpair: {e}"));
            }
        };
        let (pid, uid) =
            self.conns.values().find(|c| c.session == sid && c.channel == 0).map_or((0, 0), |c| (c.pid, c.uid));
        let Some(token) = self.register(UnixStream::from_std(ours), pid, uid) else {
            self.core.close_channel(chan);
            return fail("cannot register the channel".into());
        };
        if let Some(c) = self.conns.get_mut(&token) {
            c.channel = chan;
            c.session = sid;
        }
        self.chan_tokens.insert(chan, token);
        tracing::info!(session = sid, channel = chan, "device channel made");
        (Reply::Channel { channel: chan }, vec![OwnedFd::from(theirs)])
    }
}

/// Opens the file behind `fd` again, read-only, through `/proc/self/fd`:
/// a new open file description whose holder cannot map it writable.
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
fn is_refused_stand_in(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    // No refusal yet: no stand-in exists.
    let Some(Some(pipe)) = STAND_IN.get() else { return false };
    match (nix::sys::stat::fstat(fd.as_raw_fd()), nix::sys::stat::fstat(pipe.as_raw_fd())) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

fn reopen_read_only(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(OwnedFd::from(f))
}

fn encode_reply(seq: u64, reply: &Reply, nfds: usize) -> Option<Vec<u8>> {
    match wire::encode(seq, reply, nfds) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            wire::encode(seq, &Reply::error(Errno::E2BIG, e.to_string()), 0).ok()
        }
    }
}

fn queue(conn: &mut Conn, seq: u64, reply: &Reply, fds: Vec<OwnedFd>) {
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

/// A server running on its own thread; dropping it stops the loop and
/// removes the socket.
pub struct Running {
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
    path: PathBuf,
}

impl Running {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the loop and waits for it.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), Error> {
        self.stop.stop();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Poll(std::io::Error::other("the server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::error!(error = %e, "server thread ended with an error");
        }
    }
}

/// Binds a listening socket at `path` whose mode is `mode` from the first
/// moment it can be reached: it is bound in a new private directory (mode
/// 0700) beside `path`, given its mode there, then renamed into place.
pub fn bind_private(path: &Path, mode: u32) -> std::io::Result<std::os::unix::net::UnixListener> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let n = N.fetch_add(1, Ordering::Relaxed);
    let private = dir.join(format!(".bind-{}-{n}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("s");
    let res = std::os::unix::net::UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    res
}

/// Binds at `path` and runs the loop on a new thread.
pub fn spawn(path: &Path, limits: Limits) -> Result<Running, Error> {
    let mut server = Server::bind(path, limits)?;
    let stop = server.stop_handle();
    let thread = std::thread::Builder::new()
        .name("iommu-core".into())
        .spawn(move || server.run())
        .map_err(|e| Error::Setup { what: "cannot start a thread for", path: path.to_path_buf(), error: e })?;
    Ok(Running { stop, thread: Some(thread), path: path.to_path_buf() })
}
