//! The `iommu-core` event loop: one mio poll over the listening socket and
//! every connection, serving the [`wire`](crate::wire) protocol against the
//! [`Core`] model.
//!
//! Fairness: each connection gets at most [`FRAMES_PER_TURN`] requests per
//! turn; a connection with more waiting is put at the back of a queue that is
//! served before the loop sleeps again. A connection whose replies pile up
//! (it does not read them) is not served until they drain, so its memory use
//! stays bounded.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::errno::Errno;
use crate::model::{self, Core};
use crate::types::Limits;
use crate::wire::{self, Envelope, FrameReader, Reply, Request, Role};

/// Requests served per connection per turn of the loop.
pub const FRAMES_PER_TURN: usize = 32;
/// Unsent reply bytes above which a connection is not served.
pub const OUT_HIGH_WATER: usize = 1 << 20;

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

struct Conn {
    stream: UnixStream,
    reader: FrameReader,
    out: VecDeque<u8>,
    role: Option<Role>,
    session: u64,
    pid: i32,
    uid: u32,
    /// Close once `out` is flushed.
    closing: bool,
}

/// A handle that stops a running server from another thread.
#[derive(Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl StopHandle {
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
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    owner_uid: u32,
}

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
        let listener = UnixListener::bind(path).map_err(|e| setup("cannot bind", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| setup("cannot set the mode of", e))?;
        let poll = Poll::new().map_err(|e| setup("cannot create a poll for", e))?;
        let mut listener = listener;
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
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            signals: None,
            owner_uid: nix::unistd::geteuid().as_raw(),
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
            let timeout = if self.backlog.is_empty() { None } else { Some(Duration::ZERO) };
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
            let (mut stream, _) = match self.listener.accept() {
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
            let token = Token(self.next_token);
            self.next_token += 1;
            if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
                tracing::warn!(error = %e, "cannot register a connection");
                continue;
            }
            let lim = self.core.limits();
            let mut conn = Conn {
                stream,
                reader: FrameReader::new(lim.max_message_bytes as usize, lim.max_fds_per_message as usize),
                out: VecDeque::new(),
                role: None,
                session: 0,
                pid,
                uid,
                closing: false,
            };
            if uid != self.owner_uid && uid != 0 {
                tracing::warn!(pid, uid, "refusing a peer of another user");
                queue_reply(&mut conn, 0, &Reply::error(Errno::EPERM, "only the core's owner or root may connect"));
                conn.closing = true;
            }
            tracing::debug!(pid, uid, token = token.0, "connection");
            self.conns.insert(token, conn);
            self.service(token);
        }
    }

    fn drop_conn(&mut self, token: Token) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            if c.role == Some(Role::Session) {
                tracing::info!(session = c.session, pid = c.pid, "session closed");
                self.core.close_session(c.session);
            }
        }
    }

    /// Flushes, reads and serves one connection for one turn.
    fn service(&mut self, token: Token) {
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
        loop {
            let conn = self.conns.get_mut(&token).expect("connection present");
            if conn.out.len() > OUT_HIGH_WATER || conn.closing {
                break;
            }
            if served == FRAMES_PER_TURN {
                // Fair share used: come back after the other connections.
                self.backlog.push_back(token);
                break;
            }
            match conn.reader.next_frame() {
                Ok(Some(frame)) => {
                    served += 1;
                    self.handle_frame(token, frame);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(pid = conn.pid, error = %e, "protocol error; closing the connection");
                    queue_reply(conn, 0, &Reply::error(e.errno(), e.to_string()));
                    conn.closing = true;
                    break;
                }
            }
            if eof {
                break;
            }
            // Need more bytes.
            let room = conn.reader.max_buffer().saturating_sub(conn.reader.buffered()).clamp(1, 64 * 1024);
            let mut buf = vec![0u8; room];
            match wire::recv_with_fds(conn.stream.as_fd(), &mut buf, conn.reader.max_fds()) {
                Ok((0, _)) => eof = true,
                Ok((n, fds)) => conn.reader.push(&buf[..n], fds),
                Err(wire::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                Err(wire::Error::Io(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(e @ wire::Error::Truncated) => {
                    tracing::warn!(pid = conn.pid, error = %e, "closing the connection");
                    queue_reply(conn, 0, &Reply::error(e.errno(), e.to_string()));
                    conn.closing = true;
                    break;
                }
                Err(_) => eof = true,
            }
        }
        let Some(conn) = self.conns.get_mut(&token) else { return };
        if eof && conn.out.is_empty() || flush(conn).is_err() {
            self.drop_conn(token);
            return;
        }
        if eof {
            conn.closing = true;
        }
        if conn.closing && conn.out.is_empty() {
            self.drop_conn(token);
        }
    }

    fn handle_frame(&mut self, token: Token, frame: wire::Frame) {
        let conn = self.conns.get_mut(&token).expect("connection present");
        let env: Envelope<Request> = match wire::decode(&frame.payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(pid = conn.pid, error = %e, "undecodable request; closing the connection");
                queue_reply(conn, 0, &Reply::error(Errno::EPROTO, e.to_string()));
                conn.closing = true;
                return;
            }
        };
        let seq = env.seq;
        let reply = self.dispatch(token, env.body, frame.fds);
        self.core.count_request(matches!(reply, Reply::Error { .. }));
        if let Some(conn) = self.conns.get_mut(&token) {
            queue_reply(conn, seq, &reply);
        }
    }

    fn dispatch(&mut self, token: Token, req: Request, fds: Vec<OwnedFd>) -> Reply {
        let conn = self.conns.get_mut(&token).expect("connection present");
        if fds.len() != req.fds_expected() {
            return Reply::error(
                Errno::EBADF,
                format!("this request takes {} fds, {} were attached", req.fds_expected(), fds.len()),
            );
        }
        let Some(role) = conn.role else {
            let Request::Hello { magic, major, minor, role } = req else {
                conn.closing = true;
                return Reply::error(Errno::EPROTO, "the first message must be a hello");
            };
            if magic != wire::MAGIC {
                conn.closing = true;
                return Reply::error(Errno::EPROTO, "bad magic in hello");
            }
            if major != wire::VERSION_MAJOR {
                conn.closing = true;
                return Reply::error(
                    Errno::EOPNOTSUPP,
                    format!("protocol {major}.{minor} is not supported; this core speaks {}.x", wire::VERSION_MAJOR),
                );
            }
            let (pid, uid) = (conn.pid, conn.uid);
            let session = match role {
                Role::Session => match self.core.open_session(pid, uid) {
                    Ok(s) => s,
                    Err(e) => {
                        let conn = self.conns.get_mut(&token).expect("connection present");
                        conn.closing = true;
                        return Reply::error(e.errno, e.message);
                    }
                },
                Role::Observer => 0,
                Role::DeviceChannel => {
                    conn.closing = true;
                    return Reply::error(
                        Errno::EPERM,
                        "device channels are made by the core and handed to a session; they cannot be opened on the socket",
                    );
                }
            };
            let conn = self.conns.get_mut(&token).expect("connection present");
            conn.role = Some(role);
            conn.session = session;
            tracing::info!(pid, uid, session, ?role, "hello");
            return Reply::Hello {
                major: wire::VERSION_MAJOR,
                minor: wire::VERSION_MINOR,
                session,
                limits: *self.core.limits(),
            };
        };
        if matches!(req, Request::Hello { .. }) {
            return Reply::error(Errno::EPROTO, "hello was already sent on this connection");
        }
        if role == Role::Observer && !req.read_only() {
            return Reply::error(Errno::EPERM, "observers are read-only");
        }
        let sid = conn.session;
        let only = (role == Role::Session).then_some(sid);
        let mut fds = fds.into_iter();
        let core = &mut self.core;
        let res: model::Result<Reply> = match req {
            Request::Hello { .. } => Ok(Reply::Ok),
            Request::RegisterMemory => match fds.next() {
                Some(fd) => core.register_memory(sid, fd).map(Reply::Memory),
                None => Ok(Reply::error(Errno::EBADF, "no fd attached")),
            },
            Request::IoasAlloc => core.ioas_alloc(sid).map(Reply::Id),
            Request::NestedAlloc { parent, s1_root } => core.nested_alloc(sid, parent, s1_root).map(Reply::Id),
            Request::Destroy { id } => core.destroy(sid, id).map(|_| Reply::Ok),
            Request::Map(a) => core.map(sid, a).map(Reply::Iova),
            Request::Unmap { ioas, iova, length } => core.unmap(sid, ioas, iova, length).map(Reply::Bytes),
            Request::Copy(a) => core.copy(sid, a).map(Reply::Iova),
            Request::IovaRanges { ioas } => core.iova_ranges(sid, ioas).map(Reply::Ranges),
            Request::AllowIovas { ioas, ranges } => core.allow_iovas(sid, ioas, ranges).map(|_| Reply::Ok),
            Request::AddReserved { ioas, start, last } => core.add_reserved(sid, ioas, start, last).map(|_| Reply::Ok),
            Request::Invalidate { nested, scope } => core.invalidate(sid, nested, scope).map(|_| Reply::Ok),
            Request::PpasidAlloc => core.ppasid_alloc(sid).map(Reply::Pasid),
            Request::PpasidFree { pasid } => core.ppasid_free(sid, pasid).map(|_| Reply::Ok),
            Request::SetDirtyTracking { ioas, enable } => core.set_dirty_tracking(sid, ioas, enable).map(|_| Reply::Ok),
            Request::DirtyBitmap { ioas, iova, length, page_size, no_clear } => {
                core.dirty_bitmap(sid, ioas, iova, length, page_size, no_clear).map(Reply::Bitmap)
            }
            Request::ReadFaults { max } => core.read_faults(sid, max).map(Reply::Faults),
            Request::RespondFault { cookie, code } => core.respond_fault(sid, cookie, code).map(Reply::Fault),
            Request::Translate { ioas, iova } => core.translate(sid, ioas, iova).map(Reply::Translation),
            Request::Status => Ok(Reply::Status(Box::new(core.snapshot(only)))),
        };
        res.unwrap_or_else(|e| Reply::error(e.errno, e.message))
    }
}

fn queue_reply(conn: &mut Conn, seq: u64, reply: &Reply) {
    match wire::encode(seq, reply, 0) {
        Ok(bytes) => conn.out.extend(bytes),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            if let Ok(bytes) = wire::encode(seq, &Reply::error(Errno::E2BIG, e.to_string()), 0) {
                conn.out.extend(bytes);
            }
        }
    }
}

/// Writes as much of the output as the socket takes.
fn flush(conn: &mut Conn) -> std::io::Result<()> {
    use std::io::Write;
    while !conn.out.is_empty() {
        let (a, _) = conn.out.as_slices();
        match conn.stream.write(a) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.out.drain(..n);
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
