#![deny(clippy::cast_possible_truncation)]
//! [`Port`]: server-to-client DMA_READ/DMA_WRITE requests matched to their
//! replies, with fences and the twin socket.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use iommu_core::sync;
use iommu_core::tu::{ClientFailure, ClientMemory};
use zerocopy::IntoBytes;

use super::{Fill, Msg, MsgReader, Writer};
use crate::dma::ClientDma;
use crate::proto::{self, cmd, Header};

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

    /// Fails the requests waiting for the client's replies and every
    /// later one, but leaves the socket open: the device thread still
    /// answers the commands queued before (then [`Port::close`]).
    pub fn stop_requests(&self) {
        {
            let mut st = sync::lock(&self.state);
            st.closed = true;
            st.waiting.clear();
            st.abandoned.clear();
            st.owed = 0;
        }
        self.changed.notify_all();
    }

    /// Fails every waiting request and every later one (the client went
    /// away), and shuts the socket so that nothing more is sent on it.
    pub fn close(&self) {
        self.stop_requests();
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
