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
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UnixListener;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::model::{self, Core};
use crate::types::Limits;
use crate::wire::Reply;

mod conn;
mod dispatch;
mod generation;
mod invalidate;

use conn::Conn;
pub use conn::{
    FRAMES_PER_TURN, LARGE_REPLY_BYTES, MAX_PENDING_CLOSES, OUT_FDS_HIGH_WATER, OUT_HIGH_WATER, PEER_FREE_BYTES,
};
use dispatch::DriverWaiter;
pub use dispatch::{DRIVER_QUERIES_PER_ASKER, DRIVER_QUERIES_PER_CHANNEL};
use invalidate::HeldOp;

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

/// A long operation in progress: its connection, request seq, the job,
/// how to make its reply from the job's result, and the effects of its
/// request, carried across its slices and settled when it ends.
struct RunningJob {
    conn: Token,
    seq: u64,
    job: model::Job,
    reply: fn(u64) -> Reply,
    fx: model::Effects,
}

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
    /// Bumped by everything that may change what a snapshot shows, and
    /// published in the generation page.
    generation: generation::Generation,
    /// Connections not read because the peers' buffers are full.
    starved: std::collections::BTreeSet<Token>,
    /// Long maps and unmaps, one slice per turn of the loop in turn, with
    /// the connection, request seq and how to make the reply.
    jobs: VecDeque<RunningJob>,
    /// When to look for stalled peers next.
    next_sweep: Option<Instant>,
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
            generation: generation::Generation::new(),
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
                    t => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            if let Some(c) = self.conns.get_mut(&t) {
                                c.may_read = true;
                                c.read_closed |= ev.is_read_closed() || ev.is_error();
                            }
                        }
                        self.service(t)
                    }
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

    /// Takes a long operation on, with the effects its request caused so
    /// far: its connection is not read until it is over, and the loop runs
    /// it one slice per turn between the other connections' requests.
    fn start_job(
        &mut self,
        token: Token,
        seq: u64,
        job: model::Job,
        reply: fn(u64) -> Reply,
        fx: &mut model::Effects,
    ) -> Option<(Reply, Vec<OwnedFd>)> {
        if let Some(c) = self.conns.get_mut(&token) {
            c.blocked = true;
        }
        self.jobs.push_back(RunningJob { conn: token, seq, job, reply, fx: std::mem::take(fx) });
        None
    }

    /// One slice of the job whose turn it is.
    fn run_job(&mut self) {
        let Some(mut j) = self.jobs.pop_front() else { return };
        let Some(res) = self.core.job_step(&mut j.job, &mut j.fx) else {
            self.jobs.push_back(j);
            return;
        };
        let RunningJob { conn: token, seq, reply: make, fx, .. } = j;
        self.generation += 1;
        let reply = res.map(make).unwrap_or_else(|e| Reply::error(e.errno, e.message));
        self.core.count_request(matches!(reply, Reply::Error { .. }));
        if let Some(c) = self.conns.get_mut(&token) {
            c.blocked = false;
        }
        self.backlog.push_back(token);
        self.apply_effects(Some(token), seq, reply, Vec::new(), fx);
    }
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
