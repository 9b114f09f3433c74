//! The device side of a device channel: a device server binds its devices,
//! attaches them, fetches the pools and memory objects, reports faults and
//! answers invalidations over the fd a session handed it.
//!
//! A reader thread owns the receiving half. Replies are matched to calls by
//! `seq` (a page request may be answered after later calls). An
//! invalidation is passed to the [`InvalidationHandler`], and answered
//! when the handler returns. A call must never be made while holding
//! something the handler waits for (the translation unit's DMA guard).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};

use crate::errno::Errno;
use crate::sync;
use crate::types::*;
use crate::wire::{self, Envelope, FrameReader, FromCore, Notice, Reply, Request, Role};

/// Errors of the device channel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket failure.
    #[error("device channel: {0}")]
    Io(#[from] std::io::Error),
    /// Framing failure.
    #[error("device channel protocol error: {0}")]
    Wire(#[from] wire::Error),
    /// The core closed the channel.
    #[error("the core closed the device channel")]
    Closed,
    /// No answer in time.
    #[error("no answer from the core within {0:?}")]
    Timeout(Duration),
    /// The core refused the request.
    #[error(transparent)]
    Core(wire::Refusal),
    /// A reply of the wrong kind.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

impl Error {
    /// The errno of a refused request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Core(r) => r.errno,
            _ => None,
        }
    }
}

/// Result of a channel call.
pub type Result<T> = std::result::Result<T, Error>;

/// Receives the core's invalidations.
pub trait InvalidationHandler: Send + Sync {
    /// Drops cached translations of `targets`, forgets the memory objects
    /// at the bases in `forget`, and returns only once every DMA that
    /// started before the call has finished.
    fn invalidate(&self, targets: &[InvalidateTarget], forget: &[u64]);

    /// The channel is closed: every translation it gave is void (the
    /// core tears the devices down with the session, and may not get to
    /// say so before the socket goes). Drops them all, waiting for DMA in
    /// flight as [`InvalidationHandler::invalidate`] does.
    fn closed(&self) {}
}

/// Answers the core's driver-state queries (observers reading a device's
/// vPASID map). Must not block on anything held across a channel call.
pub trait DriverStateProvider: Send + Sync {
    /// The driver state of device `dev`.
    fn driver_state(&self, dev: u32) -> DriverState;
}

type Waiter = Sender<(Reply, Vec<OwnedFd>)>;

struct Inner {
    stream: Mutex<UnixStream>,
    pending: Mutex<HashMap<u64, Waiter>>,
    seq: AtomicU64,
    closed: AtomicBool,
    handler: Mutex<Option<Arc<dyn InvalidationHandler>>>,
    provider: Mutex<Option<Arc<dyn DriverStateProvider>>>,
    invalidations: AtomicU64,
}

impl Inner {
    fn send(&self, seq: u64, req: &Request) -> Result<()> {
        let bytes = wire::encode(seq, req, 0)?;
        let s = sync::lock(&self.stream);
        use std::io::Write;
        (&*s).write_all(&bytes)?;
        Ok(())
    }
}

/// The device end of a device channel.
pub struct Channel {
    inner: Arc<Inner>,
    reader: Option<std::thread::JoinHandle<()>>,
    session: u64,
}

impl Channel {
    /// Takes the fd a session got from `OpenDeviceChannel`, says hello and
    /// starts the reader thread.
    pub fn new(fd: OwnedFd) -> Result<Channel> {
        let stream = UnixStream::from(fd);
        let read_half = stream.try_clone()?;
        let inner = Arc::new(Inner {
            stream: Mutex::new(stream),
            pending: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            handler: Mutex::new(None),
            provider: Mutex::new(None),
            invalidations: AtomicU64::new(0),
        });
        let r = inner.clone();
        let reader =
            std::thread::Builder::new().name("ioasid-channel".into()).spawn(move || read_loop(&r, read_half))?;
        let mut ch = Channel { inner, reader: Some(reader), session: 0 };
        let hello = Request::Hello {
            magic: wire::MAGIC,
            major: wire::VERSION_MAJOR,
            minor: wire::VERSION_MINOR,
            role: Role::DeviceChannel,
        };
        // A real core answers at once; a peer that does not is not a core.
        let hello_timeout = Some(Duration::from_secs(2));
        ch.session = expect!(ch.call(&hello, hello_timeout)?.0, Reply::Hello { session, .. } => session)?;
        Ok(ch)
    }

    /// The session this channel speaks for.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Invalidations answered so far.
    pub fn invalidations(&self) -> u64 {
        self.inner.invalidations.load(Ordering::Relaxed)
    }

    /// Installs the provider of driver state (the device server).
    pub fn set_driver_state_provider(&self, p: Arc<dyn DriverStateProvider>) {
        *sync::lock(&self.inner.provider) = Some(p);
    }

    /// Installs the handler of invalidations (the translation unit).
    pub fn set_handler(&self, h: Arc<dyn InvalidationHandler>) {
        *sync::lock(&self.inner.handler) = Some(h);
    }

    /// True once the core has closed the channel.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Sends a request and waits for its reply (at most `timeout`).
    pub fn call(&self, req: &Request, timeout: Option<Duration>) -> Result<(Reply, Vec<OwnedFd>)> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = bounded(1);
        sync::lock(&self.inner.pending).insert(seq, tx);
        if self.is_closed() {
            return Err(Error::Closed);
        }
        if let Err(e) = self.inner.send(seq, req) {
            sync::lock(&self.inner.pending).remove(&seq);
            return Err(e);
        }
        let got = match timeout {
            Some(t) => rx.recv_timeout(t).map_err(|e| if e.is_timeout() { Error::Timeout(t) } else { Error::Closed }),
            None => rx.recv().map_err(|_| Error::Closed),
        };
        if got.is_err() {
            sync::lock(&self.inner.pending).remove(&seq);
        }
        let (reply, fds) = got?;
        Ok((reply.into_result().map_err(Error::Core)?, fds))
    }

    fn ok(&self, req: &Request) -> Result<()> {
        expect!(self.call(req, None)?.0, Reply::Ok => ())
    }

    /// Binds a device; returns its id and PASID table root.
    pub fn bind(&self, args: BindArgs) -> Result<BoundDevice> {
        expect!(self.call(&Request::BindDevice(args), None)?.0, Reply::Device(d) => d)
    }

    /// Unbinds a device.
    pub fn unbind(&self, dev: u32) -> Result<()> {
        self.ok(&Request::UnbindDevice { dev })
    }

    /// Attaches the RID (`pasid` None) or a pPASID to an IOAS.
    pub fn attach(&self, dev: u32, pasid: Option<u32>, pt_id: u32) -> Result<()> {
        self.ok(&Request::Attach { dev, pasid, pt_id, replace: false })
    }

    /// Moves an attachment to another IOAS.
    pub fn replace(&self, dev: u32, pasid: Option<u32>, pt_id: u32) -> Result<()> {
        self.ok(&Request::Attach { dev, pasid, pt_id, replace: true })
    }

    /// Detaches the RID or a pPASID.
    pub fn detach(&self, dev: u32, pasid: Option<u32>) -> Result<()> {
        self.ok(&Request::Detach { dev, pasid })
    }

    /// Allocates a global pPASID for a device.
    pub fn pasid_alloc(&self, dev: u32) -> Result<u32> {
        expect!(self.call(&Request::DevicePasidAlloc { dev }, None)?.0, Reply::Pasid(p) => p)
    }

    /// Frees a device's global pPASID.
    pub fn pasid_free(&self, dev: u32, pasid: u32) -> Result<()> {
        self.ok(&Request::DevicePasidFree { dev, pasid })
    }

    /// The table pool and dirty pool: (pool fd, pool size, dirty fd, dirty size).
    pub fn pools(&self) -> Result<(OwnedFd, u64, OwnedFd, u64)> {
        let (r, mut fds) = self.call(&Request::GetPools, None)?;
        let (tb, db) = expect!(r, Reply::Pools { table_bytes, dirty_bytes } => (table_bytes, dirty_bytes))?;
        if fds.len() != 2 {
            return Err(Error::Unexpected(format!("pools reply carried {} fds", fds.len())));
        }
        let dirty = fds.pop().ok_or(Error::Closed)?;
        let pool = fds.pop().ok_or(Error::Closed)?;
        Ok((pool, tb, dirty, db))
    }

    /// The memory object holding a system address.
    pub fn memory(&self, system_address: u64) -> Result<Memory> {
        let (r, mut fds) = self.call(&Request::GetMemory { system_address }, None)?;
        match r {
            Reply::MemoryFd { base, size, sealed } => {
                let fd = fds.pop().ok_or_else(|| Error::Unexpected("memory reply carried no fd".into()))?;
                Ok(Memory::File { fd, base, size, sealed })
            }
            Reply::ClientMemory { base, size, address } => Ok(Memory::Client { base, size, address }),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reports an unrecoverable fault.
    pub fn report_fault(&self, rec: FaultRecord) -> Result<()> {
        self.ok(&Request::ReportFault(rec))
    }

    /// Sends a page request and waits for the session's answer.
    pub fn page_request(&self, rec: FaultRecord, timeout: Duration) -> Result<u32> {
        expect!(self.call(&Request::PageRequest(rec), Some(timeout))?.0, Reply::PageResponse { code } => code)
    }
}

/// A memory object as [`Channel::memory`] gives it.
#[derive(Debug)]
pub enum Memory {
    /// Backed by a file: a duplicate of its fd.
    File {
        /// The file.
        fd: OwnedFd,
        /// Base in the system address space.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// Sealed against shrinking (safe to access through a mapping).
        sealed: bool,
    },
    /// Client memory: the device server reaches it through its own client,
    /// from the client's `address` onwards.
    Client {
        /// Base in the system address space.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// The client's address of byte 0.
        address: u64,
    },
}

impl Drop for Channel {
    fn drop(&mut self) {
        let _ = sync::lock(&self.inner.stream).shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            // The reader thread itself may drop the last reference (from an
            // invalidation handler); it cannot join itself.
            if r.thread().id() != std::thread::current().id() {
                let _ = r.join();
            }
        }
    }
}

fn read_loop(inner: &Inner, stream: UnixStream) {
    let mut reader = FrameReader::new(64 << 20, 16);
    reader.set_retain(64 << 10);
    'outer: loop {
        match reader.recv(stream.as_fd(), 64 << 20) {
            Ok(wire::Received { bytes: 0, .. }) => break,
            Ok(got) => reader.push_fds(got.fds),
            Err(wire::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(wire::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                tracing::debug!("the core closed the device channel");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "device channel read failed");
                break;
            }
        }
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from the core");
                    break 'outer;
                }
            };
            let env: Envelope<FromCore> = match wire::decode(&frame.payload) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable message from the core");
                    break 'outer;
                }
            };
            let reply = match env.body {
                FromCore::Reply(r) => r,
                FromCore::Notice(n) => {
                    if !notice(inner, n) {
                        break 'outer;
                    }
                    continue;
                }
            };
            let waiter = sync::lock(&inner.pending).remove(&env.seq);
            match waiter {
                Some(tx) => {
                    let _ = tx.send((reply, frame.fds));
                }
                None => tracing::debug!(seq = env.seq, "reply nobody waits for"),
            }
        }
    }
    inner.closed.store(true, Ordering::SeqCst);
    sync::lock(&inner.pending).clear();
    let h = sync::lock(&inner.handler).clone();
    if let Some(h) = h {
        h.closed();
    }
}

/// Carries out a notice of the core; false if the channel cannot answer
/// any more.
fn notice(inner: &Inner, n: Notice) -> bool {
    match n {
        Notice::Invalidate { id, targets, forget } => {
            let h = sync::lock(&inner.handler).clone();
            if let Some(h) = h {
                h.invalidate(&targets, &forget);
            }
            inner.invalidations.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = inner.send(0, &Request::InvalidateDone { id }) {
                tracing::warn!(error = %e, "cannot answer an invalidation");
                return false;
            }
        }
        Notice::DriverQuery { id, dev } => {
            let p = sync::lock(&inner.provider).clone();
            let state = match p {
                Some(p) => p.driver_state(dev),
                None => DriverState { server: "a device server without driver state".into(), ..Default::default() },
            };
            if let Err(e) = inner.send(0, &Request::DriverStateDone { id, state }) {
                tracing::warn!(error = %e, "cannot answer a driver-state query");
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use crate::sync::tests::CHILD;
    use crate::tu::tests::{assert_unmap_aborts, rig};

    #[test]
    #[ignore = "child process of an_invalidation_meeting_a_poisoned_handler_lock_aborts; not a test by itself"]
    fn poisoned_handler_child() {
        if std::env::var(CHILD).is_err() {
            return;
        }
        let mut r = rig();
        let ch = r.tu.channel().clone();
        let poisoner = std::thread::spawn(move || {
            let _h = ch.inner.handler.lock().unwrap();
            panic!("panicking while holding the invalidation handler, on purpose");
        });
        assert!(poisoner.join().is_err());
        r.unmap_and_read();
    }

    /// An invalidation whose handler cannot be reached (its lock is
    /// poisoned) ends the process; it is never answered as done with the
    /// IOTLB left as it was.
    #[test]
    fn an_invalidation_meeting_a_poisoned_handler_lock_aborts() {
        assert_unmap_aborts("device::tests::poisoned_handler_child");
    }
}
