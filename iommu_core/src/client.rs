//! A blocking client of the core, for sessions and observers.
//!
//! ```no_run
//! use iommu_core::client::Client;
//! use iommu_core::types::{MapArgs, Perm};
//! let mut s = Client::session("/run/ioasid/core.sock").unwrap();
//! let mem = iommu_core::memfd::create("guest-ram", 1 << 20).unwrap();
//! let m = s.register_memory(&mem).unwrap();
//! let ioas = s.ioas_alloc().unwrap();
//! let iova = s.map(MapArgs { ioas, mem: m.id, offset: 0, length: 1 << 20, iova: None, perm: Perm::RW }).unwrap();
//! s.unmap(ioas, iova, 1 << 20).unwrap();
//! ```

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::errno::Errno;
use crate::types::*;
use crate::wire::{self, Envelope, FrameReader, FromCore, Reply, Request, Role};

/// Largest reply the client accepts (a status of a very large core).
pub const MAX_REPLY_BYTES: usize = 1 << 30;

/// Receive buffer a client keeps between replies.
const CLIENT_RETAIN: usize = 64 << 10;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting or talking to the socket failed.
    #[error("cannot talk to the core at {path}: {error}")]
    Io {
        /// Socket path.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// A frame could not be built or read.
    #[error("protocol error: {0}")]
    Wire(#[from] wire::Error),
    /// The core closed the connection.
    #[error("the core closed the connection")]
    Closed,
    /// The core refused the request.
    #[error(transparent)]
    Core(wire::Refusal),
    /// The reply did not match the request.
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

/// Result of a client call.
pub type Result<T> = std::result::Result<T, Error>;

/// A connection to the core.
pub struct Client {
    stream: UnixStream,
    reader: FrameReader,
    seq: u64,
    session: u64,
    limits: Limits,
    path: String,
}

impl Client {
    /// Connects and says hello as `role`.
    pub fn connect(path: impl AsRef<Path>, role: Role) -> Result<Client> {
        Client::connect_with_timeout(path, role, None)
    }

    /// Connects and says hello as `role`; with a `timeout`, the hello and
    /// every later call fail with [`Error::Io`] (`WouldBlock` or
    /// `TimedOut`) when the core does not answer in time (see
    /// [`Client::set_timeout`]).
    pub fn connect_with_timeout(path: impl AsRef<Path>, role: Role, timeout: Option<Duration>) -> Result<Client> {
        let path_s = path.as_ref().display().to_string();
        let stream = UnixStream::connect(path.as_ref()).map_err(|error| Error::Io { path: path_s.clone(), error })?;
        let mut reader = FrameReader::new(MAX_REPLY_BYTES, 16);
        reader.set_retain(CLIENT_RETAIN);
        let mut c = Client { stream, reader, seq: 0, session: 0, limits: Limits::default(), path: path_s };
        c.set_timeout(timeout)?;
        let hello = Request::Hello { magic: wire::MAGIC, major: wire::VERSION_MAJOR, minor: wire::VERSION_MINOR, role };
        let (session, limits) =
            expect!(c.call(&hello, &[])?, Reply::Hello { session, limits, .. } => (session, limits))?;
        c.session = session;
        c.limits = limits;
        Ok(c)
    }

    /// Opens a session.
    pub fn session(path: impl AsRef<Path>) -> Result<Client> {
        Client::connect(path, Role::Session)
    }

    /// Opens a session, giving up after `timeout` on the hello and on each
    /// later reply until [`Client::set_timeout`] changes it.
    pub fn session_with_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Client> {
        Client::connect_with_timeout(path, Role::Session, Some(timeout))
    }

    /// Connects as a read-only observer.
    pub fn observer(path: impl AsRef<Path>) -> Result<Client> {
        Client::connect(path, Role::Observer)
    }

    /// The session id (0 for an observer).
    pub fn session_id(&self) -> u64 {
        self.session
    }

    /// The limits the core announced.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bounds how long a call waits to send its request and for each read
    /// of its reply (`None`: forever, the default). A call that runs out of
    /// time fails with [`Error::Io`]; its reply may still arrive later and
    /// would be taken for the next call's, so a connection whose call timed
    /// out should be dropped.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream
            .set_read_timeout(timeout)
            .and_then(|()| self.stream.set_write_timeout(timeout))
            .map_err(|e| self.io(e))
    }

    fn io(&self, error: std::io::Error) -> Error {
        Error::Io { path: self.path.clone(), error }
    }

    /// Sends raw bytes (tests use it to send hostile frames).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        self.stream.write_all(bytes).map_err(|e| self.io(e))
    }

    /// Sends one request and waits for its reply. A [`Reply::Error`] becomes
    /// [`Error::Core`].
    pub fn call(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Reply> {
        self.call_fds(req, fds).map(|(r, _)| r)
    }

    /// Like [`call`](Self::call), also returning the fds the reply carries.
    pub fn call_fds(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(Reply, Vec<OwnedFd>)> {
        self.seq += 1;
        let seq = self.seq;
        let bytes = wire::encode(seq, req, fds.len())?;
        let sent = wire::send_with_fds(self.stream.as_fd(), &bytes, fds).and_then(|n| {
            use std::io::Write;
            self.stream.write_all(&bytes[n..])
        });
        if let Err(e) = sent {
            // The core may have said why before it hung up (a limit, a
            // foreign user): that answer is the better error.
            if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) {
                if let Ok((env, _)) = self.read_reply() {
                    if let Err(refusal) = env.body.into_result() {
                        return Err(Error::Core(refusal));
                    }
                }
            }
            return Err(self.io(e));
        }
        let (env, fds) = self.read_reply()?;
        if env.seq != seq && env.seq != 0 {
            return Err(Error::Unexpected(format!("reply to request {} while waiting for {seq}", env.seq)));
        }
        Ok((env.body.into_result().map_err(Error::Core)?, fds))
    }

    /// Reads the next reply frame and its fds.
    pub fn read_reply(&mut self) -> Result<(Envelope<Reply>, Vec<OwnedFd>)> {
        loop {
            if let Some(frame) = self.reader.next_frame()? {
                let env: Envelope<FromCore> = wire::decode(&frame.payload)?;
                return match env.body {
                    FromCore::Reply(body) => Ok((Envelope { seq: env.seq, body }, frame.fds)),
                    // Notices go to device channels only.
                    FromCore::Notice(n) => Err(Error::Unexpected(format!("a notice on a session: {n:?}"))),
                };
            }
            // Straight into the reader's buffer, as much as the reply
            // still lacks (the buffer is kept from one reply to the next).
            let got = match self.reader.recv(self.stream.as_fd(), MAX_REPLY_BYTES) {
                Ok(x) => x,
                Err(wire::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(wire::Error::Io(e)) => return Err(self.io(e)),
                Err(e) => return Err(e.into()),
            };
            if got.bytes == 0 {
                return Err(Error::Closed);
            }
            self.reader.push_fds(got.fds);
        }
    }

    /// Registers a file (memfd, tmpfs or hugetlbfs) as a memory object.
    pub fn register_memory(&mut self, fd: impl AsFd) -> Result<MemInfo> {
        expect!(self.call(&Request::RegisterMemory, &[fd.as_fd()])?, Reply::Memory(m) => m)
    }

    /// Registers client memory of `size` bytes: an object without an fd
    /// that the session's device servers reach through their own client,
    /// whose address of byte 0 is `address` (see
    /// [`Request::RegisterClientMemory`]).
    pub fn register_client_memory(&mut self, size: u64, writable: bool, address: u64) -> Result<MemInfo> {
        let r = self.call(&Request::RegisterClientMemory { size, writable, address }, &[])?;
        expect!(r, Reply::Memory(m) => m)
    }

    /// Allocates a paging IOAS.
    pub fn ioas_alloc(&mut self) -> Result<u32> {
        expect!(self.call(&Request::IoasAlloc, &[])?, Reply::Id(id) => id)
    }

    /// Allocates a nested IOAS on `parent` with stage-1 root `s1_root`.
    pub fn nested_alloc(&mut self, parent: u32, s1_root: u64) -> Result<u32> {
        expect!(self.call(&Request::NestedAlloc { parent, s1_root }, &[])?, Reply::Id(id) => id)
    }

    /// Destroys an object.
    pub fn destroy(&mut self, id: u32) -> Result<()> {
        expect!(self.call(&Request::Destroy { id }, &[])?, Reply::Ok => ())
    }

    /// Maps; returns the IOVA.
    pub fn map(&mut self, args: MapArgs) -> Result<u64> {
        expect!(self.call(&Request::Map(args), &[])?, Reply::Iova(v) => v)
    }

    /// Unmaps; returns bytes unmapped.
    pub fn unmap(&mut self, ioas: u32, iova: u64, length: u64) -> Result<u64> {
        expect!(self.call(&Request::Unmap { ioas, iova, length }, &[])?, Reply::Bytes(v) => v)
    }

    /// Maps every entry into `ioas` in one request, all or nothing
    /// (at most [`BATCH_ENTRIES`](crate::model::BATCH_ENTRIES)); returns
    /// their IOVAs in order.
    pub fn map_batch(&mut self, ioas: u32, entries: &[MapEntry]) -> Result<Vec<u64>> {
        let req = Request::MapBatch { ioas, entries: entries.to_vec() };
        let iovas = expect!(self.call(&req, &[])?, Reply::Iovas(v) => v)?;
        if iovas.len() != entries.len() {
            return Err(Error::Unexpected(format!("{} IOVAs for {} entries", iovas.len(), entries.len())));
        }
        Ok(iovas)
    }

    /// Unmaps every range of `ioas` in one request, all or nothing (each
    /// covers whole mappings; at most
    /// [`BATCH_ENTRIES`](crate::model::BATCH_ENTRIES)); returns the bytes
    /// unmapped.
    pub fn unmap_batch(&mut self, ioas: u32, ranges: &[UnmapEntry]) -> Result<u64> {
        let req = Request::UnmapBatch { ioas, ranges: ranges.to_vec() };
        expect!(self.call(&req, &[])?, Reply::Bytes(v) => v)
    }

    /// Copies mappings; returns the destination IOVA.
    pub fn copy(&mut self, args: CopyArgs) -> Result<u64> {
        expect!(self.call(&Request::Copy(args), &[])?, Reply::Iova(v) => v)
    }

    /// Usable IOVA ranges.
    pub fn iova_ranges(&mut self, ioas: u32) -> Result<IovaRanges> {
        expect!(self.call(&Request::IovaRanges { ioas }, &[])?, Reply::Ranges(r) => r)
    }

    /// Replaces the allowed ranges.
    pub fn allow_iovas(&mut self, ioas: u32, ranges: Vec<IovaRange>) -> Result<()> {
        expect!(self.call(&Request::AllowIovas { ioas, ranges }, &[])?, Reply::Ok => ())
    }

    /// Adds a reserved range.
    pub fn add_reserved(&mut self, ioas: u32, start: u64, last: u64) -> Result<()> {
        expect!(self.call(&Request::AddReserved { ioas, start, last }, &[])?, Reply::Ok => ())
    }

    /// Invalidates stage-1 caches of a nested IOAS.
    pub fn invalidate(&mut self, nested: u32, scope: InvalidateScope) -> Result<()> {
        expect!(self.call(&Request::InvalidateStage1 { nested, scope }, &[])?, Reply::Ok => ())
    }

    /// Allocates a global pPASID.
    pub fn ppasid_alloc(&mut self) -> Result<u32> {
        expect!(self.call(&Request::PpasidAlloc, &[])?, Reply::Pasid(p) => p)
    }

    /// Frees a pPASID.
    pub fn ppasid_free(&mut self, pasid: u32) -> Result<()> {
        expect!(self.call(&Request::PpasidFree { pasid }, &[])?, Reply::Ok => ())
    }

    /// Turns dirty tracking on or off.
    pub fn set_dirty_tracking(&mut self, ioas: u32, enable: bool) -> Result<()> {
        expect!(self.call(&Request::SetDirtyTracking { ioas, enable }, &[])?, Reply::Ok => ())
    }

    /// Reads the dirty bitmap of a range.
    pub fn dirty_bitmap(
        &mut self,
        ioas: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        no_clear: bool,
    ) -> Result<Vec<u64>> {
        let req = Request::DirtyBitmap(DirtyBitmapArgs { ioas, iova, length, page_size, no_clear });
        expect!(self.call(&req, &[])?, Reply::Bitmap(b) => b)
    }

    /// Takes up to `max` fault records.
    pub fn read_faults(&mut self, max: u32) -> Result<Vec<FaultRecord>> {
        expect!(self.call(&Request::ReadFaults { max }, &[])?, Reply::Faults(f) => f)
    }

    /// Answers a page request.
    pub fn respond_fault(&mut self, cookie: u64, code: u32) -> Result<FaultRecord> {
        expect!(self.call(&Request::RespondFault { cookie, code }, &[])?, Reply::Fault(f) => f)
    }

    /// Translates one IOVA through a paging IOAS.
    pub fn translate(&mut self, ioas: u32, iova: u64) -> Result<Translation> {
        expect!(self.call(&Request::Translate { ioas, iova }, &[])?, Reply::Translation(t) => t)
    }

    /// The state generation: it changes whenever anything [`Client::status`]
    /// shows may have changed.
    pub fn generation(&mut self) -> Result<u64> {
        expect!(self.call(&Request::Generation, &[])?, Reply::Generation(g) => g)
    }

    /// The page-table entries of IOAS `ioas` of session `session`, one
    /// line each (at most 8192, then a line saying how many were left out).
    pub fn page_table(&mut self, session: u64, ioas: u32) -> Result<Vec<String>> {
        expect!(self.call(&Request::PageTable { session, ioas }, &[])?, Reply::Lines(l) => l)
    }

    /// The connection's socket, to watch it (for a hang-up of the core)
    /// without reading from it.
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.stream)
    }

    /// The pid of the core at the other end (from `SO_PEERCRED`).
    pub fn core_pid(&self) -> Option<i32> {
        nix::sys::socket::getsockopt(&self.stream, nix::sys::socket::sockopt::PeerCredentials).ok().map(|c| c.pid())
    }

    /// The driver-private state (vPASID map) of device `dev` of session
    /// `session`, asked of its device server now.
    pub fn driver_state(&mut self, session: u64, dev: u32) -> Result<DriverState> {
        let req = Request::DriverState { session, dev };
        expect!(self.call(&req, &[])?, Reply::DriverState(s) => s)
    }

    /// Makes a device channel for this session; returns its id and the fd
    /// to hand to a device server.
    pub fn open_device_channel(&mut self) -> Result<(u64, OwnedFd)> {
        let (r, mut fds) = self.call_fds(&Request::OpenDeviceChannel, &[])?;
        let channel = expect!(r, Reply::Channel { channel } => channel)?;
        let fd = fds.pop().ok_or_else(|| Error::Unexpected("the channel reply carried no fd".into()))?;
        Ok((channel, fd))
    }

    /// Turns page-fault handling of an IOAS on or off.
    pub fn set_page_faults(&mut self, ioas: u32, enable: bool) -> Result<()> {
        expect!(self.call(&Request::SetPageFaults { ioas, enable }, &[])?, Reply::Ok => ())
    }

    /// A snapshot of what this connection may see.
    pub fn status(&mut self) -> Result<Snapshot> {
        let mut snap = expect!(self.call(&Request::Status, &[])?, Reply::Status(s) => *s)?;
        // A reply lists a bounded number of mappings; the rest come in
        // pages (each consistent; the whole may mix moments if the state
        // changes meanwhile, as any paged listing does).
        for s in &mut snap.sessions {
            for i in &mut s.ioas {
                while (i.mappings.len() as u64) < i.mappings_total {
                    let from = i.mappings.last().map_or(0, |m| m.iova.saturating_add(1));
                    let page = self.mappings(s.id, i.id, from, wire::MAPPINGS_PAGE)?;
                    if page.is_empty() {
                        break;
                    }
                    i.mappings.extend(page);
                }
            }
        }
        Ok(snap)
    }

    /// Up to `max` mappings of a paging IOAS of `session` (observers: any
    /// session; sessions: their own), from the first at `from` or above.
    pub fn mappings(&mut self, session: u64, ioas: u32, from: u64, max: u32) -> Result<Vec<MappingInfo>> {
        expect!(self.call(&Request::Mappings { session, ioas, from, max }, &[])?, Reply::Mappings(m) => m)
    }

    /// The generation page, mapped read-only: [`GenerationPage::load`]
    /// is what [`Client::generation`] would answer, without asking.
    pub fn generation_page(&mut self) -> Result<GenerationPage> {
        let (r, mut fds) = self.call_fds(&Request::GenerationPage, &[])?;
        let bytes = expect!(r, Reply::GenerationPage { bytes } => bytes)?;
        let fd = fds.pop().ok_or_else(|| Error::Unexpected("the generation page reply carried no fd".into()))?;
        if bytes < 8 {
            return Err(Error::Unexpected(format!("a generation page of {bytes} bytes")));
        }
        let words = crate::shm::ReadOnlyWords::map(&std::fs::File::from(fd), bytes)
            .map_err(|error| Error::Io { path: self.path.clone(), error })?;
        Ok(GenerationPage { words })
    }

    /// A snapshot without mappings: each IOAS's `mappings` is empty and
    /// `mappings_total` says how many it holds ([`Client::mappings_piece`]
    /// reads them).
    pub fn overview(&mut self) -> Result<Snapshot> {
        expect!(self.call(&Request::Overview, &[])?, Reply::Status(s) => *s)
    }

    /// The core's counters.
    pub fn counters(&mut self) -> Result<Counters> {
        expect!(self.call(&Request::Counters, &[])?, Reply::Counters(c) => c)
    }

    /// Up to `max` mappings (at most [`wire::MAPPINGS_PAGE`]) of a paging
    /// IOAS from the first at `from` or above, with the IOAS's change
    /// count (pieces with equal counts are of the same mappings).
    pub fn mappings_piece(&mut self, session: u64, ioas: u32, from: u64, max: u32) -> Result<MappingsPiece> {
        let req = Request::MappingsPiece { session, ioas, from, max };
        expect!(self.call(&req, &[])?, Reply::MappingsPiece(p) => p)
    }
}

/// The core's generation page, mapped read-only ([`Client::generation_page`]).
#[derive(Debug)]
pub struct GenerationPage {
    words: crate::shm::ReadOnlyWords,
}

impl GenerationPage {
    /// The state generation now.
    pub fn load(&self) -> u64 {
        self.words.load(0).unwrap_or(0)
    }
}

/// The connection's socket: poll it (e.g. for `POLLRDHUP`) to learn that
/// the core closed the connection; reading or writing it directly would
/// break the framing.
impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}
