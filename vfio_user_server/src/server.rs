//! The event loop of one device's vfio-user socket: accepts a client (one
//! at a time, as the protocol has one client per socket), watches
//! ioeventfds and stops on SIGTERM/SIGINT, removing its socket. The
//! client's stream is read by a thread of its own, blocked in `recvmsg`
//! (a round trip costs the server one read and one write, as an echo
//! server): it splits the stream into messages, answers register accesses
//! that cannot wait, hands other commands to the device thread and the
//! client's replies to server-to-client requests.
//!
//! With a control socket (`Options::control`), an orchestrator (one at a
//! time, same credential rules) sends the ioasid extension's commands on
//! a second socket, read by a thread of its own ([`CtlReader`]); each
//! command runs on the device thread in order with the device's other
//! work, and the binding it makes outlives vfio-user clients and ends
//! with the control connection.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use iommu_core::types::BindArgs;

use crate::conn::{Fill, MsgReader, Port, Writer};
use crate::device::Device;
use crate::dma::{Dma, PasidPolicy};
use crate::worker::{Backlog, Job, Stats, Worker, MAX_PAYLOAD};

/// Errors of setting up or running a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The core could not be reached or refused the compat setup.
    #[error(
        "no iommu-core answers at {path} ({error}); start one with `iommu-core --socket {path}` or pass --core PATH"
    )]
    Core {
        /// Core socket.
        path: PathBuf,
        /// What failed.
        error: String,
    },
    /// Socket setup failed.
    #[error("{what} {path}: {error}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// Socket path.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// Another server listens on the socket.
    #[error("another server is already listening on {0}")]
    InUse(PathBuf),
    /// The fd given with `--fd` is not a Unix socket.
    #[error("fd {0} is not a Unix stream socket")]
    BadFd(RawFd),
    /// The event loop failed.
    #[error("event loop: {0}")]
    Poll(std::io::Error),
}

/// Where clients come from.
#[derive(Debug)]
pub enum Listen {
    /// Bind a socket at this path.
    Path(PathBuf),
    /// A socket fd handed to us: a listening socket, or one connected
    /// client (the server then exits when it leaves).
    Fd(OwnedFd),
}

/// Settings of a server.
#[derive(Debug)]
pub struct Options {
    /// Where clients come from.
    pub listen: Listen,
    /// The core's socket.
    pub core: PathBuf,
    /// PCI address reported to the core.
    pub pci_address: String,
    /// How pPASIDs are chosen.
    pub pasid_policy: PasidPolicy,
    /// Users besides the server's own user and root whose processes may
    /// connect (for a VMM running as another user).
    pub allow_uids: Vec<u32>,
    /// How long the device's DMA to client memory (DMA_READ/DMA_WRITE)
    /// waits for the client's reply before it fails with `ETIMEDOUT`.
    pub dma_timeout: std::time::Duration,
    /// A second socket where an orchestrator binds the device and attaches
    /// its RID and vPASIDs (the ioasid extension's commands).
    pub control: Option<PathBuf>,
}

impl Options {
    /// Listening on `socket`, with the core at `core`, PCI address
    /// `0000:00:04.0` and pPASIDs from the global allocator.
    pub fn new(socket: impl Into<PathBuf>, core: impl Into<PathBuf>) -> Options {
        Options {
            listen: Listen::Path(socket.into()),
            core: core.into(),
            pci_address: "0000:00:04.0".into(),
            pasid_policy: PasidPolicy::default(),
            allow_uids: Vec::new(),
            dma_timeout: crate::conn::DMA_REPLY_TIMEOUT,
            control: None,
        }
    }
}

const LISTENER: Token = Token(0);
const CONTROL_LISTENER: Token = Token(1);
const SIGNALS: Token = Token(2);
const WAKER: Token = Token(3);
const IOFD_BASE: usize = 16;

/// How long the loop waits for the reader of a client that hung up to
/// finish its last messages before a new client is taken or refused.
const HANGUP_WAIT: Duration = Duration::from_millis(500);

/// The connected client, as the loop holds it.
struct Conn {
    /// The socket (blocking reads belong to the reader thread; the loop
    /// only shuts it down and looks for a hang-up).
    stream: std::os::unix::net::UnixStream,
    port: Arc<Port>,
    /// Set by the reader when it is told to stop.
    stop: Arc<AtomicBool>,
    /// Set by the reader when it has stopped (the loop is woken then).
    ended: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// The reader thread's side of the connection.
struct ConnReader {
    stream: std::os::unix::net::UnixStream,
    reader: MsgReader,
    port: Arc<Port>,
    device: Arc<Mutex<Worker>>,
    /// Where inline replies are built.
    reply: Vec<u8>,
    jobs: Sender<Job>,
    backlog: Arc<Backlog>,
    stop: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ConnReader {
    /// Reads and dispatches until the client leaves, the connection fails
    /// or the loop says stop; then tells the loop.
    fn run(mut self) {
        loop {
            if !self.dispatch_buffered() || self.stop.load(Ordering::SeqCst) {
                break;
            }
            // Over the backlog's limits: resumed by the device thread.
            while self.backlog.over() && !self.stop.load(Ordering::SeqCst) {
                std::thread::park_timeout(Duration::from_millis(100));
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            match self.reader.fill(self.stream.as_fd()) {
                Ok(Fill::Data | Fill::Drained) => {}
                // The socket is blocking; a non-blocking description (a
                // peer sharing it) only costs a wait here.
                Ok(Fill::WouldBlock) => {
                    let mut p = [nix::poll::PollFd::new(self.stream.as_fd(), nix::poll::PollFlags::POLLIN)];
                    let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(100u16));
                }
                Ok(Fill::Eof) => break,
                Err(e) => {
                    tracing::info!("client connection failed: {e}");
                    break;
                }
            }
        }
        self.ended.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Dispatches every whole message in the buffer; false when the
    /// connection must end.
    fn dispatch_buffered(&mut self) -> bool {
        loop {
            match self.reader.next_view() {
                Ok(Some(m)) if m.hdr.is_reply() => {
                    if !self.port.deliver(m.to_msg()) {
                        tracing::debug!("a reply nobody waits for was dropped");
                    }
                }
                Ok(Some(m)) => {
                    // A register access is answered here when the device
                    // thread is idle and the access cannot wait.
                    if m.fail.is_none() && m.fds.is_empty() && m.payload.len() <= 24 && self.backlog.idle() {
                        if let Ok(mut w) = self.device.try_lock() {
                            if w.try_inline(&m.hdr, m.payload, &mut self.reply) {
                                continue;
                            }
                        }
                    }
                    self.backlog.add(m.payload.len());
                    self.backlog.job_sent();
                    if self.jobs.send(Job::Command(m.to_msg())).is_err() {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(e) => {
                    tracing::warn!("closing the client connection: {e}");
                    return false;
                }
            }
        }
    }
}

/// Largest payload of a control-socket message: the extension's commands
/// are small (a larger one is skipped and fails with `E2BIG`).
const CONTROL_MAX_PAYLOAD: usize = 4096;

/// The orchestrator's control connection, as the loop holds it.
struct CtlConn {
    stream: std::os::unix::net::UnixStream,
    stop: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// The thread reading the orchestrator's control socket: one command at a
/// time goes to the device thread (so it runs in order with the device's
/// work, and the orchestrator has at most one command queued), and its
/// reply is written before the next message is looked at.
struct CtlReader {
    stream: std::os::unix::net::UnixStream,
    reader: MsgReader,
    writer: Writer,
    jobs: Sender<Job>,
    backlog: Arc<Backlog>,
    stop: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl CtlReader {
    fn run(mut self) {
        'conn: loop {
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    break 'conn;
                }
                match self.reader.next_msg() {
                    Ok(Some(m)) if m.hdr.is_reply() => {
                        tracing::debug!("the orchestrator sent a reply nobody asked for; dropped");
                    }
                    Ok(Some(m)) => {
                        let (tx, rx) = crossbeam_channel::bounded(1);
                        self.backlog.job_sent();
                        if self.jobs.send(Job::Control(m, tx)).is_err() {
                            break 'conn;
                        }
                        match rx.recv() {
                            Ok(Some(reply)) => {
                                if let Err(e) = self.writer.send(&[&reply], &[]) {
                                    tracing::info!("control connection: reply not sent: {e}");
                                    break 'conn;
                                }
                            }
                            Ok(None) => {}
                            Err(_) => break 'conn,
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("closing the control connection: {e}");
                        break 'conn;
                    }
                }
            }
            match self.reader.fill(self.stream.as_fd()) {
                Ok(Fill::Data | Fill::Drained) => {}
                Ok(Fill::WouldBlock) => {
                    let mut p = [nix::poll::PollFd::new(self.stream.as_fd(), nix::poll::PollFlags::POLLIN)];
                    let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(100u16));
                }
                Ok(Fill::Eof) => break,
                Err(e) => {
                    tracing::info!("control connection failed: {e}");
                    break;
                }
            }
        }
        // The binding the orchestrator made ends with its connection.
        self.backlog.job_sent();
        let _ = self.jobs.send(Job::ControlGone);
        self.ended.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

pub use iommu_core::server::StopHandle;

/// A vfio-user server for one device.
pub struct Server {
    poll: Poll,
    listener: Option<UnixListener>,
    single: Option<UnixStream>,
    path: Option<PathBuf>,
    conn: Option<Conn>,
    control: Option<UnixListener>,
    control_path: Option<PathBuf>,
    ctl: Option<CtlConn>,
    jobs: Sender<Job>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The device thread's state, taken by the connection's reader to
    /// answer a register access itself while the device thread is idle.
    device: Arc<Mutex<Worker>>,
    io_fds: Vec<Arc<File>>,
    io_queued: Vec<Arc<AtomicBool>>,
    io_descs: usize,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    dma: Arc<Dma>,
    stats: Arc<Stats>,
    backlog: Arc<Backlog>,
    owner_uid: u32,
    allow_uids: Vec<u32>,
    dma_timeout: std::time::Duration,
}

fn bind_path(path: &Path, mode: u32) -> Result<UnixListener, Error> {
    let setup = |what, error| Error::Setup { what, path: path.to_path_buf(), error };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| setup("cannot remove the stale socket", e))?;
    }
    let l = iommu_core::server::bind_private(path, mode).map_err(|e| setup("cannot bind", e))?;
    l.set_nonblocking(true).map_err(|e| setup("cannot make non-blocking the socket", e))?;
    Ok(UnixListener::from_std(l))
}

impl Server {
    /// Connects the device to the core (compat session and IOAS), binds
    /// the socket and starts the device thread.
    pub fn new(device: Box<dyn Device>, opts: Options) -> Result<Server, Error> {
        let desc = device.describe();
        let bind = BindArgs { name: desc.name.to_string(), pci_address: opts.pci_address.clone(), caps: desc.caps };
        drop(desc);
        let dma = Dma::new(&opts.core, bind.clone(), opts.pasid_policy)
            .map_err(|e| Error::Core { path: opts.core.clone(), error: e.to_string() })?;
        let poll = Poll::new().map_err(Error::Poll)?;
        let at = match &opts.listen {
            Listen::Path(p) => format!("socket {}", p.display()),
            Listen::Fd(f) => format!("fd {}", f.as_raw_fd()),
        };
        dma.set_description(format!(
            "vfio-user-server pid {} device {} {at} pci {}",
            std::process::id(),
            bind.name,
            opts.pci_address
        ));
        let (listener, single, path) = match opts.listen {
            Listen::Path(p) => {
                let mode = if opts.allow_uids.is_empty() { 0o600 } else { 0o666 };
                let mut l = bind_path(&p, mode)?;
                poll.registry().register(&mut l, LISTENER, Interest::READABLE).map_err(Error::Poll)?;
                (Some(l), None, Some(p))
            }
            Listen::Fd(fd) => {
                let raw = fd.as_raw_fd();
                let listening = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
                    .map_err(|_| Error::BadFd(raw))?;
                if listening {
                    let std_l = std::os::unix::net::UnixListener::from(fd);
                    std_l.set_nonblocking(true).map_err(Error::Poll)?;
                    let mut l = UnixListener::from_std(std_l);
                    poll.registry().register(&mut l, LISTENER, Interest::READABLE).map_err(Error::Poll)?;
                    (Some(l), None, None)
                } else {
                    let s = std::os::unix::net::UnixStream::from(fd);
                    s.set_nonblocking(true).map_err(Error::Poll)?;
                    (None, Some(UnixStream::from_std(s)), None)
                }
            }
        };
        let control = match &opts.control {
            Some(p) => {
                let mode = if opts.allow_uids.is_empty() { 0o600 } else { 0o666 };
                let bound = bind_path(p, mode).and_then(|mut l| {
                    poll.registry().register(&mut l, CONTROL_LISTENER, Interest::READABLE).map_err(Error::Poll)?;
                    Ok(l)
                });
                match bound {
                    Ok(l) => Some(l),
                    Err(e) => {
                        // The vfio-user socket bound above goes too.
                        if let Some(main) = &path {
                            let _ = std::fs::remove_file(main);
                        }
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(Error::Poll)?);
        let worker = Worker::new(device, dma.clone()).map_err(Error::Poll)?;
        let io_descs = worker.io_fd_descs().len();
        let stats = worker.stats();
        let (tx, rx) = unbounded();
        let backlog = Backlog::new();
        let b2 = backlog.clone();
        let device = Arc::new(Mutex::new(worker));
        let d2 = device.clone();
        let handle = std::thread::Builder::new()
            .name("vfio-user-device".into())
            .spawn(move || Worker::run(d2, rx, b2))
            .map_err(Error::Poll)?;
        Ok(Server {
            poll,
            listener,
            single,
            path,
            conn: None,
            control,
            control_path: opts.control,
            ctl: None,
            jobs: tx,
            worker: Some(handle),
            device,
            io_fds: Vec::new(),
            io_queued: Vec::new(),
            io_descs,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            signals: None,
            dma,
            stats,
            backlog,
            owner_uid: nix::unistd::geteuid().as_raw(),
            allow_uids: opts.allow_uids,
            dma_timeout: opts.dma_timeout,
        })
    }

    /// Makes SIGTERM and SIGINT stop the loop cleanly.
    pub fn handle_signals(&mut self) -> Result<(), Error> {
        let mut s = signal_hook_mio::v1_0::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
            .map_err(Error::Poll)?;
        self.poll.registry().register(&mut s, SIGNALS, Interest::READABLE).map_err(Error::Poll)?;
        self.signals = Some(s);
        Ok(())
    }

    /// A handle to stop the loop from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle::new(self.stop.clone(), self.waker.clone())
    }

    /// The DMA state (compat session, binding, vPASID map).
    pub fn dma(&self) -> Arc<Dma> {
        self.dma.clone()
    }

    /// Counters of the device thread.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    fn connect(&mut self, stream: UnixStream) -> Result<(), Error> {
        // Reads block (on the reader thread); writes never do: the writer
        // sends with MSG_DONTWAIT and waits in poll with a deadline.
        let stream = std::os::unix::net::UnixStream::from(stream);
        stream.set_nonblocking(false).map_err(Error::Poll)?;
        let fd: OwnedFd = stream.as_fd().try_clone_to_owned().map_err(Error::Poll)?;
        let read_fd = stream.try_clone().map_err(Error::Poll)?;
        let writer = Arc::new(Writer::new(fd));
        let port = Port::with_timeout(writer.clone(), self.dma_timeout);
        // Fresh ioeventfds per client: a departed client keeps its copies,
        // which must not reach the next client's device.
        self.io_fds.clear();
        // Fresh flags too: a job of the departed client may still be queued.
        self.io_queued = (0..self.io_descs).map(|_| Arc::new(AtomicBool::new(false))).collect();
        for i in 0..self.io_descs {
            let f = Arc::new(crate::irq::eventfd().map_err(Error::Poll)?);
            self.poll
                .registry()
                .register(&mut SourceFd(&f.as_raw_fd()), Token(IOFD_BASE + i), Interest::READABLE)
                .map_err(Error::Poll)?;
            self.io_fds.push(f);
        }
        self.send_job(Job::Connected(writer, port.clone(), self.io_fds.clone()));
        let (stop, ended) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let reader = ConnReader {
            stream: read_fd,
            reader: MsgReader::new(MAX_PAYLOAD),
            port: port.clone(),
            device: self.device.clone(),
            reply: Vec::with_capacity(64),
            jobs: self.jobs.clone(),
            backlog: self.backlog.clone(),
            stop: stop.clone(),
            ended: ended.clone(),
            waker: self.waker.clone(),
        };
        let thread = match std::thread::Builder::new().name("vfio-user-conn".into()).spawn(move || reader.run()) {
            Ok(t) => t,
            Err(e) => {
                port.close();
                self.send_job(Job::Disconnected);
                return Err(Error::Poll(e));
            }
        };
        self.backlog.set_reader(Some(thread.thread().clone()));
        self.conn = Some(Conn { stream, port, stop, ended, thread });
        tracing::info!("client connected");
        Ok(())
    }

    /// Ends the connection if its reader has stopped, or if the client
    /// hung up (then the reader gets [`HANGUP_WAIT`] to finish what the
    /// client sent before it left).
    fn reap_conn(&mut self, hung_up_too: bool) {
        if self.conn.as_ref().is_some_and(|c| reader_done(&c.stream, &c.ended, hung_up_too)) {
            self.disconnect();
        }
    }

    fn disconnect(&mut self) {
        for f in self.io_fds.drain(..) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&f.as_raw_fd()));
        }
        if let Some(c) = self.conn.take() {
            // The reader wakes from its read (or its pause) and stops, so
            // every command it queued comes before the disconnection. Only
            // the reading side is shut: the device thread still answers
            // the commands queued before.
            c.stop.store(true, Ordering::SeqCst);
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
            // DMA requests waiting for the client fail now; the device
            // thread answers what was queued and then closes the socket.
            c.port.stop_requests();
            c.thread.thread().unpark();
            let _ = c.thread.join();
            self.backlog.set_reader(None);
            self.send_job(Job::Disconnected);
            tracing::info!("client disconnected; its DMA regions and fds are released, the device keeps its state");
        }
    }

    /// Hands a job to the device thread.
    fn send_job(&self, job: Job) -> bool {
        self.backlog.job_sent();
        self.jobs.send(job).is_ok()
    }

    /// Runs until stopped (or, for a single handed-over connection, until
    /// the client leaves); removes the socket on the way out.
    pub fn run(&mut self) -> Result<(), Error> {
        if let Some(s) = self.single.take() {
            self.connect(s)?;
        }
        let mut events = Events::with_capacity(64);
        let res = loop {
            if self.stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            if self.listener.is_none() && self.conn.is_none() {
                break Ok(());
            }
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(Error::Poll(e));
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    SIGNALS => {
                        if let Some(s) = self.signals.as_mut() {
                            for sig in s.pending() {
                                tracing::info!("signal {sig}: stopping");
                                self.stop.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    CONTROL_LISTENER => self.accept_control(),
                    WAKER => {
                        self.reap_conn(false);
                        self.reap_ctl(false);
                    }
                    Token(t) if t >= IOFD_BASE => {
                        let i = t - IOFD_BASE;
                        if let (Some(f), Some(queued)) = (self.io_fds.get(i), self.io_queued.get(i)) {
                            let mut b = [0u8; 8];
                            let mut rang = false;
                            while (&**f).read(&mut b).is_ok() {
                                rang = true;
                            }
                            // Rings while a job is queued fold into it (a
                            // doorbell write of the same value).
                            if rang && !queued.swap(true, Ordering::AcqRel) {
                                self.backlog.job_sent();
                                let _ = self.jobs.send(Job::IoFd(i, queued.clone()));
                            }
                        }
                    }
                    _ => {}
                }
            }
        };
        self.disconnect();
        self.end_ctl();
        self.shutdown();
        res
    }

    /// Whether the peer of `s`, accepted on the socket at `path`, may stay:
    /// its user is this server's, root or an `--allow-uid` one (on an
    /// inherited listener, `path` is `None`: whoever made it decides).
    fn admit(&self, s: &UnixStream, path: Option<&PathBuf>, what: &str) -> bool {
        if path.is_none() {
            return true;
        }
        match nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) if self.allowed(c.uid()) => true,
            Ok(c) => {
                tracing::warn!(
                    "refusing {what} pid {} of user {}: only this server's user, root and --allow-uid users may connect",
                    c.pid(),
                    c.uid()
                );
                false
            }
            Err(e) => {
                tracing::warn!("refusing {what} whose credentials cannot be read: {e}");
                false
            }
        }
    }

    fn accept_control(&mut self) {
        loop {
            let Some(l) = self.control.as_ref() else { return };
            match l.accept() {
                Ok((s, _)) => {
                    // The current orchestrator may have just left.
                    self.reap_ctl(true);
                    if !self.admit(&s, self.control_path.as_ref(), "an orchestrator") {
                        continue;
                    }
                    if self.ctl.is_some() {
                        tracing::warn!("refusing a second orchestrator: the control socket serves one at a time");
                        continue;
                    }
                    if let Err(e) = self.connect_ctl(s) {
                        tracing::warn!("cannot take the orchestrator: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("accept on the control socket failed: {e}");
                    break;
                }
            }
        }
    }

    fn connect_ctl(&mut self, stream: UnixStream) -> Result<(), Error> {
        let stream = std::os::unix::net::UnixStream::from(stream);
        stream.set_nonblocking(false).map_err(Error::Poll)?;
        let fd: OwnedFd = stream.as_fd().try_clone_to_owned().map_err(Error::Poll)?;
        let read_fd = stream.try_clone().map_err(Error::Poll)?;
        let (stop, ended) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let reader = CtlReader {
            stream: read_fd,
            reader: MsgReader::new(CONTROL_MAX_PAYLOAD),
            writer: Writer::new(fd),
            jobs: self.jobs.clone(),
            backlog: self.backlog.clone(),
            stop: stop.clone(),
            ended: ended.clone(),
            waker: self.waker.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("vfio-user-ctl".into())
            .spawn(move || reader.run())
            .map_err(Error::Poll)?;
        self.ctl = Some(CtlConn { stream, stop, ended, thread });
        tracing::info!("orchestrator connected on the control socket");
        Ok(())
    }

    /// Forgets the control connection if its reader has stopped (it told
    /// the device thread already), or if the orchestrator hung up (its
    /// reader then gets [`HANGUP_WAIT`] to finish what it sent before).
    fn reap_ctl(&mut self, hung_up_too: bool) {
        if self.ctl.as_ref().is_some_and(|c| reader_done(&c.stream, &c.ended, hung_up_too)) {
            self.end_ctl();
        }
    }

    /// Stops the control connection's reader and waits for it.
    fn end_ctl(&mut self) {
        if let Some(c) = self.ctl.take() {
            c.stop.store(true, Ordering::SeqCst);
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
            let _ = c.thread.join();
            tracing::info!("orchestrator disconnected");
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(l) = self.listener.as_ref() else { return };
            match l.accept() {
                Ok((s, _)) => {
                    // The current client may have just left: notice that
                    // before turning the new one away.
                    self.reap_conn(true);
                    // On an inherited listener, whoever made it decides who
                    // may connect.
                    if !self.admit(&s, self.path.as_ref(), "a client") {
                        continue;
                    }
                    if self.conn.is_some() {
                        tracing::warn!("refusing a second client: this socket serves one client at a time");
                        drop(s);
                        continue;
                    }
                    if let Err(e) = self.connect(s) {
                        tracing::warn!("cannot take the client: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    break;
                }
            }
        }
    }

    fn allowed(&self, uid: u32) -> bool {
        uid == 0 || uid == self.owner_uid || self.allow_uids.contains(&uid)
    }

    fn shutdown(&mut self) {
        self.send_job(Job::Stop);
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(&p);
        }
        if let Some(p) = self.control_path.take() {
            let _ = std::fs::remove_file(&p);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A server running on its own thread (tests, examples).
pub struct Running {
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
    dma: Arc<Dma>,
    stats: Arc<Stats>,
}

impl Running {
    /// The DMA state.
    pub fn dma(&self) -> &Arc<Dma> {
        &self.dma
    }

    /// Counters of the device thread.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Stops the server and waits for it.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop.stop();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sets a server up and runs it on a thread.
pub fn spawn(device: Box<dyn Device>, opts: Options) -> Result<Running, Error> {
    let mut server = Server::new(device, opts)?;
    let stop = server.stop_handle();
    let dma = server.dma();
    let stats = server.stats();
    let thread =
        std::thread::Builder::new().name("vfio-user-loop".into()).spawn(move || server.run()).map_err(Error::Poll)?;
    Ok(Running { stop, thread: Some(thread), dma, stats })
}

/// Whether a connection whose reader sets `ended` when it stops is over:
/// its reader stopped, or (with `hung_up_too`) the peer closed its end,
/// in which case the reader first gets [`HANGUP_WAIT`] to finish what the
/// peer sent before it left.
fn reader_done(stream: &std::os::unix::net::UnixStream, ended: &AtomicBool, hung_up_too: bool) -> bool {
    if !ended.load(Ordering::SeqCst) && hung_up_too && hung_up(stream.as_fd()) {
        let deadline = Instant::now() + HANGUP_WAIT;
        while !ended.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    ended.load(Ordering::SeqCst) || (hung_up_too && hung_up(stream.as_fd()))
}

/// Whether the peer of `sock` has closed its end (data it
/// sent before may still be unread).
fn hung_up(sock: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // No events asked: poll still reports POLLHUP (the peer closed its
    // end, so both directions are shut) and POLLERR.
    let mut p = [PollFd::new(sock, PollFlags::empty())];
    matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
        && p[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Takes ownership of an inherited fd number (`--fd`).
///
/// # Safety
/// `fd` must be an open descriptor that nothing else in the process owns.
pub unsafe fn inherited_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
