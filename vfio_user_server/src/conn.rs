#![deny(clippy::cast_possible_truncation)]
//! One client connection: splitting the byte stream into messages with
//! their fds, writing messages, and server-to-client DMA_READ/DMA_WRITE
//! requests matched to their replies.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use iommu_core::tu::{ClientFailure, ClientMemory};
use iommu_core::{memfd, sync};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use zerocopy::IntoBytes;

use crate::dma::ClientDma;
use crate::proto::{self, cmd, Header, HEADER_SIZE};

/// Errors of the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket failure.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// A header that cannot be followed (size below the header).
    #[error("message {msg_id} declares {size} bytes, less than its header; the stream cannot be followed")]
    BadSize {
        /// Message id.
        msg_id: u16,
        /// Declared size.
        size: u32,
    },
    /// The peer did not read for too long.
    #[error("the client stopped reading for {0:?}")]
    Stalled(Duration),
}

/// Most fds a client may send with one message (advertised as `max_msg_fds`).
pub const MAX_MSG_FDS: usize = 16;

/// A received message.
#[derive(Debug)]
pub struct Msg {
    /// Header.
    pub hdr: Header,
    /// Everything after the header.
    pub payload: Vec<u8>,
    /// Fds that came with it.
    pub fds: Vec<OwnedFd>,
    /// More fds were sent than can be received, an fd was refused on
    /// arrival (see [`MsgReader`]), or the payload was too large and was
    /// skipped: the command must fail with this errno.
    pub fail: Option<i32>,
}

/// Why closing `fd` might block the thread that closes it, if it might:
/// a file of a FUSE, network or unknown file system (closing one sends a
/// flush its server may never answer; procfs tells the file system without
/// asking it), or a socket of another family than `AF_UNIX` (`SO_LINGER`
/// makes `close` wait for the peer). Files of devices and kernel interfaces
/// are reported too: they are never what a client should send.
pub fn close_may_block(fd: BorrowedFd<'_>) -> Option<String> {
    if memfd::on_blocking_fs(fd) {
        return Some(match memfd::check_memory_fd(fd) {
            Err(why) => why.to_string(),
            Ok(()) => "the file is on a file system whose operations may wait on another process".into(),
        });
    }
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    match getsockname::<SockaddrStorage>(fd.as_raw_fd()).map(|a| a.family()) {
        Ok(Some(AddressFamily::Unix)) | Err(_) => None,
        Ok(_) => Some("the fd is a network socket, whose close may linger waiting for its peer".into()),
    }
}

/// Splits a stream into messages. It never reads past the end of the
/// current message, so the fds that arrive belong to it: a sender attaches
/// a message's fds to its first byte, and the kernel may merge bytes of
/// several messages into one read.
///
/// Every fd that arrives is looked at before anything else happens to it:
/// one whose close could block (see [`close_may_block`]) is closed on
/// another thread at once and fails its message with EINVAL, so neither
/// the event loop nor the device thread ever holds such a file.
pub struct MsgReader {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    truncated: bool,
    /// Why fds of the current message were refused on arrival.
    refused: Vec<String>,
    max_payload: usize,
    /// Oversized message being skipped: (header, bytes still to drop).
    skipping: Option<(Header, u64)>,
}

/// What a read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Some bytes arrived.
    Data,
    /// Nothing more for now.
    WouldBlock,
    /// The peer closed.
    Eof,
}

impl MsgReader {
    /// A reader accepting payloads up to `max_payload` bytes; bigger ones
    /// are skipped and failed with E2BIG.
    pub fn new(max_payload: usize) -> MsgReader {
        MsgReader {
            buf: Vec::new(),
            fds: Vec::new(),
            truncated: false,
            refused: Vec::new(),
            max_payload,
            skipping: None,
        }
    }

    fn want(&self) -> usize {
        if let Some((_, left)) = self.skipping {
            return usize::try_from(left).unwrap_or(usize::MAX).min(256 * 1024);
        }
        match proto::read::<Header>(&self.buf) {
            None => HEADER_SIZE - self.buf.len(),
            Some(h) => (h.msg_size as usize).saturating_sub(self.buf.len()).min(256 * 1024),
        }
    }

    /// One non-blocking read from `sock`, never past the current message.
    pub fn fill(&mut self, sock: BorrowedFd<'_>) -> Result<Fill, Error> {
        let want = self.want();
        if want == 0 {
            return Ok(Fill::Data);
        }
        let mut chunk = vec![0u8; want];
        // Every fd the kernel installs is owned here, even when more were
        // sent than the buffer holds (the kernel closed those).
        let got = match iommu_core::scm::recv(sock, &mut chunk, MAX_MSG_FDS) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(Fill::Data),
            Err(e) => return Err(Error::Io(e)),
        };
        self.truncated |= got.truncated;
        for fd in got.fds {
            if let Some(why) = close_may_block(fd.as_fd()) {
                self.refused.push(why);
                memfd::close_elsewhere(fd);
            } else if self.fds.len() >= MAX_MSG_FDS {
                // Closed at once: a message cannot hoard descriptors.
                self.truncated = true;
            } else {
                self.fds.push(fd);
            }
        }
        let n = got.bytes;
        if n == 0 {
            return Ok(Fill::Eof);
        }
        match self.skipping.as_mut() {
            Some((_, left)) => *left -= n as u64,
            None => self.buf.extend_from_slice(&chunk[..n]),
        }
        Ok(Fill::Data)
    }

    /// The next complete message, if any.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, Error> {
        if let Some((hdr, left)) = self.skipping {
            if left > 0 {
                return Ok(None);
            }
            self.skipping = None;
            self.fds.clear();
            self.truncated = false;
            self.refused.clear();
            return Ok(Some(Msg { hdr, payload: Vec::new(), fds: Vec::new(), fail: Some(libc::E2BIG) }));
        }
        let Some(hdr) = proto::read::<Header>(&self.buf) else { return Ok(None) };
        let size = hdr.msg_size as usize;
        if size < HEADER_SIZE {
            return Err(Error::BadSize { msg_id: hdr.msg_id, size: hdr.msg_size });
        }
        if size - HEADER_SIZE > self.max_payload {
            tracing::warn!(
                "message {} ({}) declares {} bytes, more than the {} accepted; skipping it",
                hdr.msg_id,
                cmd::name(hdr.command),
                size,
                self.max_payload + HEADER_SIZE
            );
            self.skipping = Some((hdr, (size - self.buf.len()) as u64));
            self.buf.clear();
            return self.next_msg();
        }
        if self.buf.len() < size {
            return Ok(None);
        }
        let payload = self.buf[HEADER_SIZE..size].to_vec();
        self.buf.clear();
        let fds = std::mem::take(&mut self.fds);
        let trunc = std::mem::replace(&mut self.truncated, false);
        let refused = std::mem::take(&mut self.refused);
        let what = format!("message {} ({})", hdr.msg_id, cmd::name(hdr.command));
        if trunc {
            tracing::warn!(
                "{what} came with more than {MAX_MSG_FDS} fds (max_msg_fds); all were closed and it fails with EINVAL"
            );
        }
        for why in &refused {
            tracing::warn!(
                "{what}: an fd was refused and closed on another thread: {why}; the command fails with EINVAL"
            );
        }
        let fail = (trunc || !refused.is_empty()).then_some(libc::EINVAL);
        Ok(Some(Msg { hdr, payload, fds, fail }))
    }
}

/// Writes whole messages to the socket from any thread.
pub struct Writer {
    sock: OwnedFd,
    lock: Mutex<()>,
    broken: AtomicBool,
    timeout: Duration,
}

impl Writer {
    /// A writer over a (non-blocking) duplicate of the connection.
    pub fn new(sock: OwnedFd) -> Writer {
        Writer { sock, lock: Mutex::new(()), broken: AtomicBool::new(false), timeout: Duration::from_secs(10) }
    }

    /// Sends one message made of `parts`, with `fds` attached to it.
    pub fn send(&self, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe)));
        }
        let bytes: Vec<u8> = parts.concat();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let _g = sync::lock(&self.lock);
        let mut off = 0;
        let mut first = true;
        // One deadline for the whole message: a client reading a byte now
        // and then cannot hold the sender forever.
        let deadline = std::time::Instant::now() + self.timeout;
        while off < bytes.len() {
            let iov = [std::io::IoSlice::new(&bytes[off..])];
            let cmsgs = [ControlMessage::ScmRights(&raw)];
            let cm: &[ControlMessage] = if first && !raw.is_empty() { &cmsgs } else { &[] };
            match sendmsg::<()>(self.sock.as_raw_fd(), &iov, cm, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => {
                    off += n;
                    first = false;
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    let mut p = [nix::poll::PollFd::new(self.sock.as_fd(), nix::poll::PollFlags::POLLOUT)];
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                    match nix::poll::poll(&mut p, nix::poll::PollTimeout::from(ms)) {
                        Ok(0) => {
                            self.kill();
                            return Err(Error::Stalled(self.timeout));
                        }
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            self.kill();
                            return Err(Error::Io(e.into()));
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    self.kill();
                    return Err(Error::Io(e.into()));
                }
            }
        }
        Ok(())
    }

    /// Marks the connection dead and shuts the socket down, so the event
    /// loop sees the end of the stream.
    pub fn kill(&self) {
        self.broken.store(true, Ordering::Release);
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// Most bytes of client memory one DMA_READ asks for, and most DMA_READ
/// reply bytes the client may owe the connection at any time (see
/// [`Port`]).
pub const DMA_READ_CHUNK: usize = 64 * 1024;

/// How long a DMA_READ or DMA_WRITE waits for the client's reply (and a
/// DMA_READ for the client to finish earlier replies) before the access
/// fails with `ETIMEDOUT`.
pub const DMA_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests given up whose replies are still remembered (a client that
/// never answers cannot grow the list past this).
const MAX_ABANDONED: usize = 1024;

/// A request waiting for its reply.
struct Waiter {
    tx: Sender<Msg>,
    /// DMA_READ reply bytes it is owed (0 for DMA_WRITE).
    owed: usize,
}

#[derive(Default)]
struct PortState {
    waiting: HashMap<u16, Waiter>,
    /// Requests given up (cancelled or timed out) whose replies may still
    /// come, with the DMA_READ bytes each is owed and when it was given up.
    abandoned: HashMap<u16, (usize, Instant)>,
    /// DMA_READ reply bytes the client owes: waiting and abandoned reads.
    owed: usize,
    /// Fences up ([`Port::fence`]): accesses fail at once with
    /// `ECANCELED`.
    fences: u32,
    closed: bool,
}

impl PortState {
    fn abandon(&mut self, id: u16, w: Waiter) {
        if self.abandoned.len() >= MAX_ABANDONED {
            // Replies this old will not come: forget what they owed.
            let forgotten: usize = self.abandoned.drain().map(|(_, (n, _))| n).sum();
            self.owed -= forgotten;
        }
        if let Some((n, _)) = self.abandoned.insert(id, (w.owed, Instant::now())) {
            self.owed -= n;
        }
    }

    /// Forgets what requests given up longer than `after` ago were owed:
    /// their replies are taken to be lost (a client that dropped them must
    /// not hold later reads back for ever). A reply that still comes is
    /// dropped.
    fn expire(&mut self, after: Duration) {
        let mut forgotten = 0;
        self.abandoned.retain(|_, (n, at)| {
            let keep = at.elapsed() < after;
            if !keep {
                forgotten += *n;
            }
            keep
        });
        self.owed -= forgotten;
    }
}

/// Server-to-client requests of one connection: DMA_READ and DMA_WRITE of
/// client memory, each matched to its reply, answered within
/// [`DMA_REPLY_TIMEOUT`] or failed with `ETIMEDOUT`.
///
/// **Reply bytes in flight.** DMA_READs ask for at most
/// [`DMA_READ_CHUNK`] bytes (or the client's `max_data_xfer_size`, if
/// smaller), and a DMA_READ is sent only while the client owes no more
/// than that in all, so reply data in flight from the client stays well
/// inside a default Unix socket buffer (208 KiB on Linux). QEMU's
/// vfio-user client (hw/vfio-user/proxy.c, `vfio_user_send_qio`) takes a
/// short non-blocking write of a message for a whole one and drops the
/// rest: a reply larger than the room left in its send buffer would reach
/// us truncated, and the stream could no longer be followed.
///
/// **Fences.** QEMU serves server-to-client requests on its main loop,
/// which waits while a vCPU waits for the reply to a register access. A
/// device thread answering such an access must therefore never wait for
/// a DMA that needs the client: [`Port::fence`] gives up every access
/// waiting for a reply (`ECANCELED`; a reply that comes later is dropped)
/// and fails new ones at once until [`Port::unfence`]. A DMA_WRITE already
/// sent may still be applied by the client after the fence.
///
/// **Twin socket.** When the client offered the `twin_socket` capability,
/// requests and their replies use a socket pair of their own
/// ([`Port::use_twin`]), so they never queue behind the client's commands
/// and our replies on the main socket.
pub struct Port {
    /// Read-held from a request's fence check until it was sent;
    /// [`Port::fence`] takes it for writing, so nothing is sent once a
    /// fence is up.
    send_gate: std::sync::RwLock<()>,
    /// The main socket's writer.
    main: Arc<Writer>,
    /// Where requests go: the main socket, or the twin socket.
    out: std::sync::RwLock<Arc<Writer>>,
    state: Mutex<PortState>,
    changed: Condvar,
    next_id: AtomicU16,
    /// The client's `max_data_xfer_size`.
    max_xfer: std::sync::atomic::AtomicUsize,
    timeout: Duration,
}

fn failure(errno: i32, message: String) -> ClientFailure {
    ClientFailure { errno, message }
}

impl Port {
    /// A port writing through `writer`.
    pub fn new(writer: Arc<Writer>) -> Arc<Port> {
        Port::with_timeout(writer, DMA_REPLY_TIMEOUT)
    }

    /// A port whose requests wait `timeout` for a reply.
    pub fn with_timeout(writer: Arc<Writer>, timeout: Duration) -> Arc<Port> {
        Arc::new(Port {
            send_gate: std::sync::RwLock::new(()),
            main: writer.clone(),
            out: std::sync::RwLock::new(writer),
            state: Mutex::new(PortState::default()),
            changed: Condvar::new(),
            next_id: AtomicU16::new(0x8000),
            max_xfer: std::sync::atomic::AtomicUsize::new(1 << 20),
            timeout,
        })
    }

    /// Sets the client's `max_data_xfer_size`.
    pub fn set_max_xfer(&self, n: usize) {
        self.max_xfer.store(n.max(1), Ordering::Relaxed);
    }

    /// Hands a reply from the client to the request waiting for it.
    /// Returns false if no request of that id was sent (or remembered).
    pub fn deliver(&self, m: Msg) -> bool {
        let mut st = sync::lock(&self.state);
        let id = m.hdr.msg_id;
        if let Some(w) = st.waiting.remove(&id) {
            st.owed -= w.owed;
            drop(st);
            self.changed.notify_all();
            // The waiter may just have timed out: nothing to do then.
            let _ = w.tx.send(m);
            return true;
        }
        if let Some((n, _)) = st.abandoned.remove(&id) {
            st.owed -= n;
            drop(st);
            self.changed.notify_all();
            tracing::debug!("late reply to message {id:#x}, given up earlier, dropped");
            return true;
        }
        false
    }

    /// Fails every waiting request and every later one (the client went
    /// away), and shuts the socket so that nothing more is sent on it.
    pub fn close(&self) {
        {
            let mut st = sync::lock(&self.state);
            st.closed = true;
            st.waiting.clear();
            st.abandoned.clear();
            st.owed = 0;
        }
        self.changed.notify_all();
        self.main.kill();
        // The twin socket's reader sees the end and stops.
        sync::read(&self.out).kill();
    }

    /// Sends requests on `sock` (the server's end of the twin socket pair,
    /// whose other end went to the client with the VERSION reply) and
    /// receives their replies there, on a thread of its own.
    pub fn use_twin(self: &Arc<Self>, sock: OwnedFd) -> std::io::Result<()> {
        let flags = nix::fcntl::fcntl(sock.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(sock.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        let read_end = sock.try_clone()?;
        let port = Arc::downgrade(self);
        std::thread::Builder::new().name("vfio-user-twin".into()).spawn(move || twin_replies(&read_end, &port))?;
        *sync::write(&self.out) = Arc::new(Writer::new(sock));
        Ok(())
    }

    /// Gives up every access waiting for the client and fails new ones at
    /// once, until as many [`Port::unfence`] calls: an access not sent yet
    /// fails with `ECANCELED`, one already sent with `EINPROGRESS` (the
    /// client may still carry out a DMA_WRITE). When this returns, nothing
    /// more is sent until the last fence is down.
    pub fn fence(&self) {
        {
            let mut st = sync::lock(&self.state);
            st.fences += 1;
            let waiting: Vec<(u16, Waiter)> = st.waiting.drain().collect();
            for (id, w) in waiting {
                // Dropping the sender wakes the waiter.
                st.abandon(id, w);
            }
        }
        self.changed.notify_all();
        // A request that passed its fence check before is sent by now.
        drop(sync::write(&self.send_gate));
    }

    /// Takes down one fence.
    pub fn unfence(&self) {
        {
            let mut st = sync::lock(&self.state);
            st.fences = st.fences.saturating_sub(1);
        }
        self.changed.notify_all();
    }

    /// Waits until no fence is up (or the client left), `max` at most.
    pub fn wait_unfenced(&self, max: Duration) {
        let deadline = Instant::now() + max;
        let mut st = sync::lock(&self.state);
        while st.fences > 0 && !st.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = sync::wait_timeout(&self.changed, st, left);
        }
    }

    /// Sends one request owing `owed` DMA_READ reply bytes and waits for
    /// its reply.
    fn request(&self, command: u16, parts: &[&[u8]], owed: usize) -> Result<Msg, ClientFailure> {
        let deadline = Instant::now() + self.timeout;
        let (tx, rx) = bounded(1);
        let gate = sync::read(&self.send_gate);
        let id;
        {
            let mut st = sync::lock(&self.state);
            loop {
                if st.closed {
                    return Err(failure(libc::ENOTCONN, "the client left".into()));
                }
                if st.fences > 0 {
                    return Err(failure(libc::ECANCELED, "given up: the device is being quiesced".into()));
                }
                st.expire(self.timeout);
                if st.owed + owed <= DMA_READ_CHUNK.max(owed) {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(failure(
                        libc::ETIMEDOUT,
                        format!("the client still owes {} bytes of DMA_READ replies after {:?}", st.owed, self.timeout),
                    ));
                }
                // Woken by replies; every 50 ms, replies given up on expire.
                st = sync::wait_timeout(&self.changed, st, left.min(Duration::from_millis(50)));
            }
            // An id no reply is expected for (ids wrap after 32768).
            let mut next = self.next_id.fetch_add(1, Ordering::Relaxed) | 0x8000;
            while st.waiting.contains_key(&next) || st.abandoned.contains_key(&next) {
                next = self.next_id.fetch_add(1, Ordering::Relaxed) | 0x8000;
            }
            id = next;
            st.owed += owed;
            st.waiting.insert(id, Waiter { tx, owed });
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let hdr = Header::command(id, command, len);
        let mut all: Vec<&[u8]> = vec![hdr.as_bytes()];
        all.extend_from_slice(parts);
        let out = sync::read(&self.out).clone();
        let sent = out.send(&all, &[]);
        drop(gate);
        if let Err(e) = sent {
            let mut st = sync::lock(&self.state);
            if let Some(w) = st.waiting.remove(&id) {
                st.owed -= w.owed;
            }
            return Err(failure(libc::ENOTCONN, format!("request not sent: {e}")));
        }
        // The reply gets the whole timeout, however long the send waited.
        let r = rx.recv_timeout(self.timeout);
        let m = match r {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                let mut st = sync::lock(&self.state);
                if let Some(w) = st.waiting.remove(&id) {
                    // Waited for long enough: its reply is taken to be
                    // lost, and later reads do not wait for it.
                    st.owed -= w.owed;
                    st.abandon(id, Waiter { owed: 0, ..w });
                }
                drop(st);
                self.changed.notify_all();
                tracing::warn!(
                    "{} (message {id:#x}) got no reply from the client in {:?}; the device sees a DMA error",
                    cmd::name(command),
                    self.timeout
                );
                return Err(failure(libc::ETIMEDOUT, format!("no reply in {:?}", self.timeout)));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let closed = sync::lock(&self.state).closed;
                return Err(if closed {
                    failure(libc::ENOTCONN, "the client left".into())
                } else {
                    failure(libc::EINPROGRESS, "given up after it was sent: the device is being quiesced".into())
                });
            }
        };
        if m.hdr.flags & proto::flags::ERROR != 0 {
            // The errnos that mean something inside the server are not the
            // client's to give.
            let e = match m.hdr.error as i32 {
                0 | libc::ECANCELED | libc::EINPROGRESS | libc::ETIMEDOUT | libc::ENOTCONN => libc::EIO,
                e => e,
            };
            return Err(failure(e, format!("{} refused by the client: errno {e}", cmd::name(command))));
        }
        Ok(m)
    }
}

/// Replies on the twin socket, handed to `port` until the socket ends or
/// the port goes away.
fn twin_replies(sock: &OwnedFd, port: &std::sync::Weak<Port>) {
    // A DMA_READ reply holds at most DMA_READ_CHUNK bytes of data.
    let mut reader = MsgReader::new(DMA_READ_CHUNK + 64);
    let mut warned = false;
    loop {
        let mut p = [nix::poll::PollFd::new(sock.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut p, nix::poll::PollTimeout::from(200u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!("twin socket: {e}; no more replies are read from it");
                return;
            }
        }
        let Some(port) = port.upgrade() else { return };
        match reader.fill(sock.as_fd()) {
            Ok(Fill::Eof) => {
                // The client closed its end: requests have nowhere to go.
                port.close();
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("twin socket: {e}; closing the client connection");
                port.close();
                return;
            }
        }
        loop {
            match reader.next_msg() {
                Ok(Some(m)) if m.hdr.is_reply() => {
                    if !port.deliver(m) {
                        tracing::debug!("a reply nobody waits for was dropped (twin socket)");
                    }
                }
                Ok(Some(m)) => {
                    if !warned {
                        warned = true;
                        tracing::warn!(
                            "the client sent {} on the twin socket, which carries only our requests' replies; \
                             ignored (and so is whatever else it sends there)",
                            cmd::name(m.hdr.command)
                        );
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("twin socket: {e}; closing the client connection");
                    port.close();
                    return;
                }
            }
        }
    }
}

impl ClientMemory for Port {
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), ClientFailure> {
        let step = self.max_xfer.load(Ordering::Relaxed).min(DMA_READ_CHUNK);
        for (i, chunk) in buf.chunks_mut(step).enumerate() {
            let a = address + (i * step) as u64;
            let req = proto::DmaRw { address: a, count: chunk.len() as u64 };
            let m = self.request(cmd::DMA_READ, &[req.as_bytes()], chunk.len())?;
            let echo: Option<proto::DmaRw> = proto::read(&m.payload);
            if echo.is_none_or(|e| e.address != a || e.count != chunk.len() as u64) {
                return Err(failure(libc::EPROTO, format!("DMA_READ reply does not echo {a:#x}+{:#x}", chunk.len())));
            }
            let data = m.payload.get(16..16 + chunk.len()).ok_or_else(|| {
                failure(libc::EPROTO, format!("DMA_READ reply of {} bytes is short", m.payload.len()))
            })?;
            chunk.copy_from_slice(data);
        }
        Ok(())
    }

    fn write(&self, address: u64, data: &[u8]) -> Result<(), ClientFailure> {
        // 64 KiB at most too: a send never waits long for room in the
        // socket while the device holds its locks.
        let step = self.max_xfer.load(Ordering::Relaxed).min(DMA_READ_CHUNK);
        for (i, chunk) in data.chunks(step).enumerate() {
            let a = address + (i * step) as u64;
            let req = proto::DmaRw { address: a, count: chunk.len() as u64 };
            self.request(cmd::DMA_WRITE, &[req.as_bytes(), chunk], 0)?;
        }
        Ok(())
    }
}

impl ClientDma for Port {
    fn fence(&self) {
        Port::fence(self);
    }
    fn unfence(&self) {
        Port::unfence(self);
    }
    fn wait_unfenced(&self, max: Duration) {
        Port::wait_unfenced(self, max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn msg(id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
        let h = Header::command(id, command, payload.len());
        [h.as_bytes(), payload].concat()
    }

    #[test]
    fn splits_messages_and_attaches_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        let f = crate::irq::eventfd().unwrap();
        w.send(&[&msg(1, 9, &[0; 16])], &[]).unwrap();
        w.send(&[&msg(2, 2, &[7; 32])], &[f.as_fd()]).unwrap();
        w.send(&[&msg(3, 13, &[])], &[]).unwrap();
        let mut r = MsgReader::new(1024);
        let mut got = vec![];
        while got.len() < 3 {
            match r.fill(b.as_fd()).unwrap() {
                Fill::Eof => break,
                Fill::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Fill::Data => {}
            }
            while let Some(m) = r.next_msg().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.iter().map(|m| (m.hdr.msg_id, m.fds.len())).collect::<Vec<_>>(), vec![(1, 0), (2, 1), (3, 0)]);
        assert_eq!(got[1].payload, vec![7; 32]);
    }

    #[test]
    fn oversized_messages_are_skipped_and_small_sizes_are_fatal() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        w.send(&[&msg(1, 10, &[1; 300])], &[]).unwrap();
        w.send(&[&msg(2, 13, &[])], &[]).unwrap();
        let mut bad = Header::command(3, 13, 0);
        bad.msg_size = 4;
        w.send(&[bad.as_bytes()], &[]).unwrap();
        let mut r = MsgReader::new(100);
        let mut got = vec![];
        let err = loop {
            match r.next_msg() {
                Ok(Some(m)) => got.push((m.hdr.msg_id, m.fail)),
                Ok(None) => {
                    assert_eq!(r.fill(b.as_fd()).unwrap(), Fill::Data);
                }
                Err(e) => break e,
            }
        };
        assert_eq!(got, vec![(1, Some(libc::E2BIG)), (2, None)]);
        assert!(matches!(err, Error::BadSize { msg_id: 3, size: 4 }));
    }

    /// Open fds of this process that refer to the memfd called `name`.
    fn open_copies(name: &str) -> usize {
        let want = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy() == want)
            .count()
    }

    #[test]
    fn too_many_fds_fail_the_message_and_none_stays_open() {
        let name = format!("conn-flood-{}", std::process::id());
        let m = iommu_core::memfd::create(&name, 4096).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        let fds = vec![m.as_fd(); 64];
        w.send(&[&msg(1, 2, &[0; 32])], &fds).unwrap();
        w.send(&[&msg(2, 2, &[0; 32])], &fds[..MAX_MSG_FDS]).unwrap();
        let mut r = MsgReader::new(1024);
        let mut got = vec![];
        while got.len() < 2 {
            assert_eq!(r.fill(b.as_fd()).unwrap(), Fill::Data);
            while let Some(m) = r.next_msg().unwrap() {
                got.push(m);
            }
        }
        assert_eq!((got[0].hdr.msg_id, got[0].fail), (1, Some(libc::EINVAL)));
        assert_eq!((got[1].hdr.msg_id, got[1].fail, got[1].fds.len()), (2, None, MAX_MSG_FDS));
        drop(got);
        assert_eq!(open_copies(&name), 1, "fds of the refused message stayed open");
    }

    #[test]
    fn fds_whose_close_may_block_are_refused_on_arrival() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let efd = crate::irq::eventfd().unwrap();
        w.send(&[&msg(1, 2, &[0; 32])], &[zero.as_fd()]).unwrap();
        w.send(&[&msg(2, 8, &[0; 20])], &[tcp.as_fd()]).unwrap();
        w.send(&[&msg(3, 8, &[0; 20])], &[efd.as_fd()]).unwrap();
        let mut r = MsgReader::new(1024);
        let mut got = vec![];
        while got.len() < 3 {
            assert_eq!(r.fill(b.as_fd()).unwrap(), Fill::Data);
            while let Some(m) = r.next_msg().unwrap() {
                got.push(m);
            }
        }
        let seen: Vec<(u16, Option<i32>, usize)> = got.iter().map(|m| (m.hdr.msg_id, m.fail, m.fds.len())).collect();
        assert_eq!(seen, vec![(1, Some(libc::EINVAL), 0), (2, Some(libc::EINVAL), 0), (3, None, 1)]);
        assert!(close_may_block(zero.as_fd()).is_some_and(|w| w.contains("devices or kernel interfaces")));
        assert!(close_may_block(tcp.as_fd()).is_some_and(|w| w.contains("network socket")));
        assert_eq!(close_may_block(efd.as_fd()), None);
    }
}
