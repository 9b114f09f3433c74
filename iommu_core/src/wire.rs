#![deny(clippy::cast_possible_truncation)]
//! The core's wire protocol.
//!
//! A connection is a Unix stream socket. Every message is a frame:
//!
//! | bytes | field                                              |
//! |-------|----------------------------------------------------|
//! | 0-3   | payload length, u32 little endian                  |
//! | 4-5   | number of fds attached, u16 little endian          |
//! | 6-7   | reserved, zero                                     |
//! | 8-    | payload: an [`Envelope`] encoded with `postcard`   |
//!
//! The fds of a frame travel as SCM_RIGHTS ancillary data on the
//! `sendmsg` that carries the frame's first byte. The first request on a
//! connection is [`Request::Hello`]; every request gets exactly one reply
//! with the same `seq`. Errors carry an errno from [`Errno`] and a sentence.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::errno::Errno;
use crate::types::*;

/// Magic at the start of a hello.
pub const MAGIC: [u8; 4] = *b"IOAS";
/// Protocol major version: a peer with another major is refused.
pub const VERSION_MAJOR: u16 = 1;
/// Protocol minor version: additions only.
pub const VERSION_MINOR: u16 = 0;
/// Size of a frame header.
pub const HEADER_LEN: usize = 8;
/// Hard ceiling on fds per frame, whatever the configuration says.
pub const MAX_FDS_CEILING: usize = 253;

/// Errors of framing and encoding.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The frame is larger than the receiver accepts.
    #[error("frame of {0} bytes exceeds the limit of {1} bytes")]
    TooBig(usize, usize),
    /// The frame announces more fds than allowed.
    #[error("frame carries {0} fds, at most {1} allowed")]
    TooManyFds(usize, usize),
    /// Reserved header bits are set.
    #[error("reserved bytes of the frame header are not zero")]
    Reserved,
    /// The frame announced fds that did not arrive, or fds came unannounced.
    #[error("frame announced {0} fds but {1} arrived with it")]
    FdMismatch(usize, usize),
    /// The payload could not be decoded.
    #[error("cannot decode the message: {0}")]
    Decode(postcard::Error),
    /// The payload could not be encoded.
    #[error("cannot encode the message: {0}")]
    Encode(postcard::Error),
    /// Ancillary data was cut (too many fds sent at once).
    #[error("ancillary data was truncated: the peer sent more fds than allowed")]
    Truncated,
    /// A system call failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The errno a peer is told for this error.
    pub fn errno(&self) -> Errno {
        match self {
            Error::TooBig(..) => Errno::E2BIG,
            Error::TooManyFds(..) | Error::Truncated => Errno::E2BIG,
            _ => Errno::EPROTO,
        }
    }
}

/// What a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A session: the analog of an open `/dev/iommu`.
    Session,
    /// A read-only observer (the file system, `ioasidctl status`).
    Observer,
    /// A device channel: made only by the core and handed to a session.
    DeviceChannel,
}

/// A message with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Sequence number chosen by the requester, echoed in the reply.
    pub seq: u64,
    /// The message.
    pub body: T,
}

/// A request to the core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// First message of every connection.
    Hello {
        /// [`MAGIC`].
        magic: [u8; 4],
        /// Protocol major version.
        major: u16,
        /// Protocol minor version.
        minor: u16,
        /// What the connection is.
        role: Role,
    },
    /// Register the attached fd as a memory object.
    RegisterMemory,
    /// Allocate a paging IOAS.
    IoasAlloc,
    /// Allocate a nested IOAS.
    NestedAlloc {
        /// Parent IOAS.
        parent: u32,
        /// Stage-1 root (parent IOVA).
        s1_root: u64,
    },
    /// Destroy an object.
    Destroy {
        /// Object id.
        id: u32,
    },
    /// Map memory into an IOAS.
    Map(MapArgs),
    /// Unmap whole mappings.
    Unmap {
        /// IOAS.
        ioas: u32,
        /// First IOVA.
        iova: u64,
        /// Length (`(0, u64::MAX)` = everything).
        length: u64,
    },
    /// Copy mappings to another IOAS.
    Copy(CopyArgs),
    /// Query usable IOVA ranges.
    IovaRanges {
        /// IOAS.
        ioas: u32,
    },
    /// Replace the allowed ranges.
    AllowIovas {
        /// IOAS.
        ioas: u32,
        /// Ranges (empty = whole aperture).
        ranges: Vec<IovaRange>,
    },
    /// Add a reserved range.
    AddReserved {
        /// IOAS.
        ioas: u32,
        /// First IOVA.
        start: u64,
        /// Last IOVA (inclusive).
        last: u64,
    },
    /// Session: flush the stage-1 caches of a nested IOAS after the user
    /// edited its stage-1 table (not to be confused with
    /// [`Notice::Invalidate`], which the core sends to device servers).
    InvalidateStage1 {
        /// Nested IOAS.
        nested: u32,
        /// What to invalidate.
        scope: InvalidateScope,
    },
    /// Allocate a global pPASID.
    PpasidAlloc,
    /// Free a pPASID.
    PpasidFree {
        /// The pPASID.
        pasid: u32,
    },
    /// Turn dirty tracking on or off.
    SetDirtyTracking {
        /// IOAS.
        ioas: u32,
        /// On or off.
        enable: bool,
    },
    /// Read the dirty bitmap of a range.
    DirtyBitmap(DirtyBitmapArgs),
    /// Take fault records from the session's queue.
    ReadFaults {
        /// At most this many.
        max: u32,
    },
    /// Answer a page request.
    RespondFault {
        /// Cookie of the request.
        cookie: u64,
        /// `page_response::SUCCESS` or `INVALID`.
        code: u32,
    },
    /// Translate one IOVA through a paging IOAS.
    Translate {
        /// IOAS.
        ioas: u32,
        /// IOVA.
        iova: u64,
    },
    /// Everything visible to this connection.
    Status,
    /// Session: turn page-fault handling of an IOAS on or off.
    SetPageFaults {
        /// IOAS.
        ioas: u32,
        /// On or off.
        enable: bool,
    },
    /// Session: make a device channel; the reply carries its fd.
    OpenDeviceChannel,
    /// Channel: bind a device.
    BindDevice(BindArgs),
    /// Channel: unbind a device.
    UnbindDevice {
        /// Device.
        dev: u32,
    },
    /// Channel: attach the RID (`pasid` None) or a pPASID to an IOAS or
    /// nested IOAS; with `replace`, move an existing attachment.
    Attach {
        /// Device.
        dev: u32,
        /// pPASID, or None for the RID.
        pasid: Option<u32>,
        /// IOAS or nested IOAS.
        pt_id: u32,
        /// Replace an existing attachment.
        replace: bool,
    },
    /// Channel: detach the RID or a pPASID (no-op if not attached).
    Detach {
        /// Device.
        dev: u32,
        /// pPASID, or None for the RID.
        pasid: Option<u32>,
    },
    /// Channel: allocate a global pPASID for a device.
    DevicePasidAlloc {
        /// Device.
        dev: u32,
    },
    /// Channel: free a device's global pPASID.
    DevicePasidFree {
        /// Device.
        dev: u32,
        /// The pPASID.
        pasid: u32,
    },
    /// Channel: the table pool and dirty pool fds.
    GetPools,
    /// Channel: the fd of the memory object holding a system address.
    GetMemory {
        /// A system address.
        system_address: u64,
    },
    /// Channel: an unrecoverable fault.
    ReportFault(FaultRecord),
    /// Channel: a page request; answered when the session responds.
    PageRequest(FaultRecord),
    /// Channel: the answer to a [`Notice::Invalidate`]; gets no reply.
    InvalidateDone {
        /// Id of the invalidation.
        id: u64,
    },
    /// Observer or session: the driver-private state of a device (its
    /// vPASID map), asked of its device server at this moment.
    DriverState {
        /// Session the device is bound in.
        session: u64,
        /// Device id in that session.
        dev: u32,
    },
    /// A number that changes whenever anything a snapshot shows may have
    /// changed (cheap: lets an observer reuse its last snapshot).
    Generation,
    /// Observer or session: the page-table entries of a paging IOAS.
    PageTable {
        /// Session owning the IOAS.
        session: u64,
        /// IOAS id.
        ioas: u32,
    },
    /// Channel: the answer to a [`Notice::DriverQuery`]; gets no reply.
    DriverStateDone {
        /// Id of the query.
        id: u64,
        /// The state.
        state: DriverState,
    },
    /// Observer or session: up to `max` mappings of a paging IOAS (at most
    /// [`MAPPINGS_PAGE`]), from the first whose IOVA is `from` or above.
    /// Pages through what a `Status` reply did not list.
    Mappings {
        /// Session owning the IOAS.
        session: u64,
        /// IOAS id.
        ioas: u32,
        /// Lowest IOVA to list.
        from: u64,
        /// Most mappings to list.
        max: u32,
    },
    /// Register client memory: a memory object without an fd, which the
    /// session's device servers reach through their own client (a
    /// vfio-user client's DMA_READ/DMA_WRITE), never by mapping it.
    RegisterClientMemory {
        /// Size in bytes (a multiple of 4 KiB).
        size: u64,
        /// Whether device writes may be allowed by its mappings.
        writable: bool,
        /// The client's address of byte 0 (reported back to channels and
        /// observers, never interpreted by the core).
        address: u64,
    },
    /// Session: map many ranges into one IOAS, in order, all or nothing
    /// (at most [`BATCH_ENTRIES`](crate::model::BATCH_ENTRIES) entries);
    /// answered with [`Reply::Iovas`], one IOVA per entry.
    MapBatch {
        /// IOAS.
        ioas: u32,
        /// The mappings.
        entries: Vec<MapEntry>,
    },
    /// Session: unmap many ranges of one IOAS, all or nothing (each covers
    /// whole mappings, no two the same one; at most
    /// [`BATCH_ENTRIES`](crate::model::BATCH_ENTRIES)); answered with
    /// [`Reply::Bytes`], the bytes unmapped in all.
    UnmapBatch {
        /// IOAS.
        ioas: u32,
        /// The ranges.
        ranges: Vec<UnmapEntry>,
    },
    /// Observer or session: a read-only fd of the generation page: word 0
    /// (a native-endian `u64` at offset 0) is the state generation, stored
    /// before any reply to what moved it is sent. Lets an observer check
    /// for changes without a round trip.
    GenerationPage,
    /// Observer or session: `Status` without mappings (each IOAS's
    /// `mappings` empty, `mappings_total` set); read them with
    /// [`Request::MappingsPiece`].
    Overview,
    /// Observer or session: the core's counters (what changes with every
    /// request, read-only ones too, without moving the generation).
    Counters,
    /// Observer or session: up to `max` mappings of a paging IOAS (at most
    /// [`MAPPINGS_PAGE`]) from the first whose IOVA is `from` or above,
    /// with the IOAS's change count: pieces with the same count are of the
    /// same mappings.
    MappingsPiece {
        /// Session owning the IOAS.
        session: u64,
        /// IOAS id.
        ioas: u32,
        /// Lowest IOVA to list.
        from: u64,
        /// Most mappings to list.
        max: u32,
    },
}

/// Bytes of the generation page ([`Request::GenerationPage`]).
pub const GENERATION_PAGE_BYTES: u64 = 4096;

/// Most mappings one `Mappings` reply lists, and one `Status` reply lists
/// in all (about 14 bytes each, so either stays under 1 MiB).
pub const MAPPINGS_PAGE: u32 = 65_536;

impl Request {
    /// The number of fds this request must carry.
    pub fn fds_expected(&self) -> usize {
        usize::from(matches!(self, Request::RegisterMemory))
    }

    /// True for requests an observer may send.
    pub fn read_only(&self) -> bool {
        matches!(
            self,
            Request::Hello { .. }
                | Request::Status
                | Request::Mappings { .. }
                | Request::DriverState { .. }
                | Request::PageTable { .. }
                | Request::Generation
                | Request::GenerationPage
                | Request::Overview
                | Request::Counters
                | Request::MappingsPiece { .. }
        )
    }

    /// True for requests only a device channel may send.
    pub fn channel_only(&self) -> bool {
        matches!(
            self,
            Request::BindDevice(_)
                | Request::UnbindDevice { .. }
                | Request::Attach { .. }
                | Request::Detach { .. }
                | Request::DevicePasidAlloc { .. }
                | Request::DevicePasidFree { .. }
                | Request::GetPools
                | Request::GetMemory { .. }
                | Request::ReportFault(_)
                | Request::PageRequest(_)
                | Request::InvalidateDone { .. }
                | Request::DriverStateDone { .. }
        )
    }
}

/// A reply from the core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to a hello.
    Hello {
        /// Server's major version.
        major: u16,
        /// Server's minor version.
        minor: u16,
        /// Session id (0 for observers).
        session: u64,
        /// Limits in force.
        limits: Limits,
    },
    /// Done, nothing to return.
    Ok,
    /// A new object id.
    Id(u32),
    /// A registered memory object.
    Memory(MemInfo),
    /// An IOVA.
    Iova(u64),
    /// A byte count.
    Bytes(u64),
    /// IOVA ranges.
    Ranges(IovaRanges),
    /// A pPASID.
    Pasid(u32),
    /// A dirty bitmap.
    Bitmap(Vec<u64>),
    /// Fault records.
    Faults(Vec<FaultRecord>),
    /// The page request that was answered.
    Fault(FaultRecord),
    /// A translation.
    Translation(Translation),
    /// A snapshot.
    Status(Box<Snapshot>),
    /// A device channel; its fd is attached.
    Channel {
        /// Channel id.
        channel: u64,
    },
    /// A bound device.
    Device(BoundDevice),
    /// The pools; fds attached: table pool (map read-only), dirty pool.
    Pools {
        /// Table pool size.
        table_bytes: u64,
        /// Dirty pool size.
        dirty_bytes: u64,
    },
    /// A memory object; its fd is attached.
    MemoryFd {
        /// Its base in the system address space.
        base: u64,
        /// Its size.
        size: u64,
        /// Sealed against shrinking (safe to mmap).
        sealed: bool,
    },
    /// A memory object without an fd ([`Request::RegisterClientMemory`]):
    /// the device server reaches it through its client.
    ClientMemory {
        /// Its base in the system address space.
        base: u64,
        /// Its size.
        size: u64,
        /// The client's address of byte 0.
        address: u64,
    },
    /// The session's answer to a page request.
    PageResponse {
        /// `page_response::SUCCESS` or `INVALID`.
        code: u32,
    },
    /// The request failed.
    Error {
        /// Linux errno number.
        errno: i32,
        /// What went wrong.
        message: String,
    },
    /// A device's driver state, as its server answered.
    DriverState(DriverState),
    /// Lines of text (a page-table dump).
    Lines(Vec<String>),
    /// The state generation.
    Generation(u64),
    /// Mappings of one IOAS, in IOVA order.
    Mappings(Vec<MappingInfo>),
    /// The IOVAs of a batched map, one per entry in order.
    Iovas(Vec<u64>),
    /// The generation page: its fd (read-only) is attached.
    GenerationPage {
        /// Its size in bytes.
        bytes: u64,
    },
    /// The core's counters.
    Counters(Counters),
    /// A piece of one IOAS's mappings.
    MappingsPiece(MappingsPiece),
}

/// A message the core starts itself, toward a device channel (sent with
/// `seq` 0): not the reply to any request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Notice {
    /// Drop these translations, finish DMA that started before this
    /// message, then send [`Request::InvalidateDone`] with `id`.
    Invalidate {
        /// Id to answer with.
        id: u64,
        /// What to drop.
        targets: Vec<InvalidateTarget>,
        /// System bases of memory objects that are gone: unmap them.
        forget: Vec<u64>,
    },
    /// Report the driver state of `dev` with [`Request::DriverStateDone`]
    /// and `id`.
    DriverQuery {
        /// Id to answer with.
        id: u64,
        /// Device.
        dev: u32,
    },
}

/// What the core sends on a connection: the reply to a request (with its
/// `seq`), or a notice of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromCore {
    /// The reply to the request with the envelope's `seq`.
    Reply(Reply),
    /// A notice (`seq` 0).
    Notice(Notice),
}

/// [`FromCore`] by reference, for encoding without a copy: the same
/// variants in the same order, so it encodes exactly as [`FromCore`].
#[derive(Serialize)]
enum FromCoreRef<'a> {
    Reply(&'a Reply),
    Notice(&'a Notice),
}

/// Encodes the reply to request `seq`.
pub fn encode_reply(seq: u64, reply: &Reply, nfds: usize) -> Result<Vec<u8>, Error> {
    encode(seq, &FromCoreRef::Reply(reply), nfds)
}

/// Encodes a notice.
pub fn encode_notice(notice: &Notice) -> Result<Vec<u8>, Error> {
    encode(0, &FromCoreRef::Notice(notice), 0)
}

impl Reply {
    /// An error reply.
    pub fn error(errno: Errno, message: impl Into<String>) -> Reply {
        Reply::Error { errno: errno.code(), message: message.into() }
    }
}

/// A request the core refused: its errno and its sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", errno.map_or_else(|| format!("errno {code}"), |e| e.name().to_string()))]
pub struct Refusal {
    /// The errno, if it is in the vocabulary.
    pub errno: Option<Errno>,
    /// The raw errno number.
    pub code: i32,
    /// The core's sentence.
    pub message: String,
}

impl Reply {
    /// Splits an error reply off: `Err` for [`Reply::Error`], else the reply.
    pub fn into_result(self) -> Result<Reply, Refusal> {
        match self {
            Reply::Error { errno, message } => Err(Refusal { errno: Errno::from_code(errno), code: errno, message }),
            r => Ok(r),
        }
    }
}

/// Encodes a frame: header and payload.
pub fn encode<T: Serialize>(seq: u64, body: &T, nfds: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; HEADER_LEN];
    let env = Envelope { seq, body };
    buf = postcard::to_extend(&env, buf).map_err(Error::Encode)?;
    let len = u32::try_from(buf.len() - HEADER_LEN).map_err(|_| Error::TooBig(buf.len(), u32::MAX as usize))?;
    let nfds = u16::try_from(nfds).map_err(|_| Error::TooManyFds(nfds, MAX_FDS_CEILING))?;
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..6].copy_from_slice(&nfds.to_le_bytes());
    Ok(buf)
}

/// Decodes a payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<Envelope<T>, Error> {
    postcard::from_bytes(payload).map_err(Error::Decode)
}

/// A decoded frame: payload bytes and attached fds.
#[derive(Debug)]
pub struct Frame {
    /// Payload (an encoded [`Envelope`]).
    pub payload: Vec<u8>,
    /// Attached fds.
    pub fds: Vec<OwnedFd>,
}

/// Bytes of receive buffer a reader keeps between messages unless told
/// otherwise ([`FrameReader::set_retain`]): most requests and replies are
/// far smaller, so one `recvmsg` usually takes every frame waiting.
pub const DEFAULT_RETAIN: usize = 8 << 10;

/// What one [`FrameReader::recv`] brought.
#[derive(Debug)]
pub struct Received {
    /// Bytes added to the reader; 0 at the end of the stream.
    pub bytes: usize,
    /// The fds that came with them: the caller checks them and hands them
    /// to [`FrameReader::push_fds`] before it takes the next frame.
    pub fds: Vec<OwnedFd>,
    /// The read took fewer bytes than it had room for and brought no fd:
    /// the socket held nothing more at that moment, so another read would
    /// only say `EAGAIN` until the socket is readable again.
    pub drained: bool,
}

/// Reassembles frames from a byte stream with fds attached.
///
/// Bytes are received straight into one buffer the reader keeps (zeroed
/// once when it grows, never per message; a buffer grown for a large frame
/// shrinks back to its retained size once it is empty), and as many frames
/// are cut from one read as it holds. Fds are matched to frames in order:
/// the kernel hands a frame's fds over with its first byte and never
/// past them in one read, so those of a read belong to the frames it
/// starts.
#[derive(Debug)]
pub struct FrameReader {
    /// Received bytes are `buf[start..end]`; `buf` past `end` is room.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    retain: usize,
    fds: VecDeque<OwnedFd>,
    max_payload: usize,
    max_fds: usize,
}

impl FrameReader {
    /// A reader accepting payloads up to `max_payload` bytes and `max_fds` fds.
    pub fn new(max_payload: usize, max_fds: usize) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            retain: DEFAULT_RETAIN,
            fds: VecDeque::new(),
            max_payload,
            max_fds: max_fds.min(MAX_FDS_CEILING),
        }
    }

    /// Sets how many bytes of buffer the reader keeps while it holds no
    /// unfinished frame (and so reads at once at least).
    pub fn set_retain(&mut self, bytes: usize) {
        self.retain = bytes.max(HEADER_LEN);
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Bytes of memory the buffer holds, consumed or not.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Most bytes worth buffering before a frame must be complete.
    pub fn max_buffer(&self) -> usize {
        self.max_payload + HEADER_LEN
    }

    /// Most fds one read may bring.
    pub fn max_fds(&self) -> usize {
        self.max_fds
    }

    /// Adds received bytes and fds.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        self.room(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
        self.fds.extend(fds);
    }

    /// Adds fds that came with bytes [`recv`](Self::recv) added.
    pub fn push_fds(&mut self, fds: Vec<OwnedFd>) {
        self.fds.extend(fds);
    }

    /// At least `n` bytes of room after the buffered bytes (moved to the
    /// front first; the buffer zeroed only where it grows).
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < n {
            self.buf.resize(self.end + n, 0);
        }
        &mut self.buf[self.end..]
    }

    /// How many bytes the next read should ask for, at most `room`: what
    /// the frame being received still lacks, and at least the retained
    /// buffer's free part.
    pub fn read_size(&self, room: usize) -> usize {
        let have = self.buffered();
        let head = &self.buf[self.start..self.end];
        let frame = if head.len() >= HEADER_LEN {
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            HEADER_LEN.saturating_add(len.min(self.max_payload))
        } else {
            HEADER_LEN
        };
        frame.saturating_sub(have).max(self.retain.saturating_sub(have)).clamp(1, room.max(1))
    }

    /// One `recvmsg` of at most `room` bytes straight into the buffer
    /// (see [`read_size`](Self::read_size)), with up to
    /// [`max_fds`](Self::max_fds) fds. The fds are returned, not queued:
    /// hand them (or their stand-ins) to [`push_fds`](Self::push_fds).
    /// Errors as [`recv_with_fds`]: the fds of a truncated control buffer
    /// are closed off this thread.
    pub fn recv(&mut self, sock: BorrowedFd<'_>, room: usize) -> Result<Received, Error> {
        let want = self.read_size(room);
        let max_fds = self.max_fds;
        let buf = &mut self.room(want)[..want];
        let (bytes, fds) = recv_with_fds(sock, buf, max_fds)?;
        self.end += bytes;
        let drained = bytes < want && fds.is_empty();
        Ok(Received { bytes, fds, drained })
    }

    /// Takes the next complete frame, if any. An error means the stream can
    /// no longer be trusted and the connection should be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        self.next_frame_with(|payload, fds| Frame { payload: payload.to_vec(), fds })
    }

    /// Like [`next_frame`](Self::next_frame), lending the payload to `f`
    /// instead of copying it out.
    pub fn next_frame_with<R>(&mut self, f: impl FnOnce(&[u8], Vec<OwnedFd>) -> R) -> Result<Option<R>, Error> {
        // Fds come with the first byte of their frame, so more than one
        // frame's worth can only be waiting if the peer is cheating.
        if self.fds.len() > self.max_fds {
            return Err(Error::TooManyFds(self.fds.len(), self.max_fds));
        }
        let buf = &self.buf[self.start..self.end];
        if buf.len() < HEADER_LEN {
            if buf.is_empty() && !self.fds.is_empty() {
                return Err(Error::FdMismatch(0, self.fds.len()));
            }
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let nfds = u16::from_le_bytes([buf[4], buf[5]]) as usize;
        if buf[6] != 0 || buf[7] != 0 {
            return Err(Error::Reserved);
        }
        if len > self.max_payload {
            return Err(Error::TooBig(len, self.max_payload));
        }
        if nfds > self.max_fds {
            return Err(Error::TooManyFds(nfds, self.max_fds));
        }
        // The fds come with the first byte of the frame, so they are here now.
        if self.fds.len() < nfds {
            return Err(Error::FdMismatch(nfds, self.fds.len()));
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let last = buf.len() == HEADER_LEN + len;
        // Fds beyond this frame's with no byte left to start another frame.
        if last && self.fds.len() > nfds {
            return Err(Error::FdMismatch(nfds, self.fds.len()));
        }
        let fds: Vec<OwnedFd> = self.fds.drain(..nfds).collect();
        let out = f(&buf[HEADER_LEN..HEADER_LEN + len], fds);
        self.start += HEADER_LEN + len;
        if last {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > self.retain {
                self.buf.truncate(self.retain);
                self.buf.shrink_to(self.retain);
            }
        }
        Ok(Some(out))
    }
}

/// Sends `bytes` with `fds` attached in one `sendmsg`; returns bytes sent.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(bytes)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cm: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cm, MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)
}

/// Receives bytes and up to `max_fds` fds. Returns `(0, [])` at end of
/// stream. If the peer sent more fds than `max_fds` (or than the kernel
/// could hand over), every fd that did arrive is closed, off this thread,
/// and the call fails with [`Error::Truncated`].
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> Result<(usize, Vec<OwnedFd>), Error> {
    let r = crate::scm::recv(sock, buf, MAX_FDS_CEILING)?;
    if r.truncated || r.fds.len() > max_fds {
        // Closing some files can block (FUSE, network file systems): not
        // on the caller's thread.
        r.fds.into_iter().for_each(crate::memfd::close_elsewhere);
        return Err(Error::Truncated);
    }
    Ok((r.bytes, r.fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let a = encode(7, &Request::Unmap { ioas: 3, iova: 0x1000, length: 0x2000 }, 0).unwrap();
        let b = encode(8, &Request::Status, 0).unwrap();
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut r = FrameReader::new(1024, 4);
        for chunk in all.chunks(3) {
            r.push(chunk, Vec::new());
        }
        let f = r.next_frame().unwrap().unwrap();
        let e: Envelope<Request> = decode(&f.payload).unwrap();
        assert_eq!((e.seq, e.body), (7, Request::Unmap { ioas: 3, iova: 0x1000, length: 0x2000 }));
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(decode::<Request>(&f.payload).unwrap().body, Request::Status);
        assert!(r.next_frame().unwrap().is_none());
    }

    #[test]
    fn one_read_cuts_every_frame_it_holds_with_their_fds() {
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let m = crate::memfd::create("wire-fds", 4096).unwrap();
        // Three frames without fds, then one with an fd, then one more.
        let mut plain = Vec::new();
        for seq in 1..=3 {
            plain.extend(encode(seq, &Request::Status, 0).unwrap());
        }
        std::io::Write::write_all(&mut &a, &plain).unwrap();
        let with = encode(4, &Request::RegisterMemory, 1).unwrap();
        send_with_fds(a.as_fd(), &with, &[m.as_fd()]).unwrap();
        std::io::Write::write_all(&mut &a, &encode(5, &Request::Status, 0).unwrap()).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut r = FrameReader::new(1024, 4);
        // The first read stops after the bytes the fd came with.
        let got = r.recv(b.as_fd(), 1 << 16).unwrap();
        assert_eq!((got.bytes, got.fds.len(), got.drained), (plain.len() + with.len(), 1, false));
        r.push_fds(got.fds);
        let mut seen = Vec::new();
        while let Some((seq, nfds)) =
            r.next_frame_with(|p, fds| (decode::<Request>(p).unwrap().seq, fds.len())).unwrap()
        {
            seen.push((seq, nfds));
        }
        assert_eq!(seen, [(1, 0), (2, 0), (3, 0), (4, 1)]);
        let got = r.recv(b.as_fd(), 1 << 16).unwrap();
        assert!(got.drained, "a short read without fds finds the socket empty");
        assert_eq!(r.next_frame().unwrap().map(|f| decode::<Request>(&f.payload).unwrap().seq), Some(5));
        let e = r.recv(b.as_fd(), 1 << 16).unwrap_err();
        assert!(matches!(e, Error::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }

    #[test]
    fn the_buffer_is_kept_between_messages_and_shrinks_after_a_large_one() {
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let mut r = FrameReader::new(1 << 20, 0);
        let small = encode(1, &Request::Status, 0).unwrap();
        std::io::Write::write_all(&mut &a, &small).unwrap();
        r.recv(b.as_fd(), 1 << 20).unwrap();
        assert!(r.next_frame().unwrap().is_some());
        let kept = r.capacity();
        assert_eq!(kept, DEFAULT_RETAIN);
        for _ in 0..100 {
            std::io::Write::write_all(&mut &a, &small).unwrap();
            r.recv(b.as_fd(), 1 << 20).unwrap();
            assert!(r.next_frame().unwrap().is_some());
            assert_eq!(r.capacity(), kept, "no new buffer per message");
        }
        // A frame larger than the retained buffer: read whole, then the
        // buffer goes back to its retained size.
        let ranges = vec![IovaRange { start: 1, last: 2 }; 20_000];
        let big = encode(2, &Request::AllowIovas { ioas: 1, ranges }, 0).unwrap();
        assert!(big.len() > 4 * DEFAULT_RETAIN);
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut &a, &big).unwrap());
        let frame = loop {
            let got = r.recv(b.as_fd(), 1 << 20).unwrap();
            assert!(got.bytes > 0);
            if let Some(f) = r.next_frame().unwrap() {
                break f;
            }
        };
        writer.join().unwrap();
        assert!(matches!(decode::<Request>(&frame.payload).unwrap().body, Request::AllowIovas { .. }));
        assert_eq!((r.buffered(), r.capacity()), (0, DEFAULT_RETAIN));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut r = FrameReader::new(16, 2);
        r.push(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0], Vec::new());
        assert!(matches!(r.next_frame(), Err(Error::TooBig(..))));
        let mut r = FrameReader::new(16, 2);
        r.push(&[1, 0, 0, 0, 9, 0, 0, 0, 0], Vec::new());
        assert!(matches!(r.next_frame(), Err(Error::TooManyFds(9, 2))));
        let mut r = FrameReader::new(16, 2);
        r.push(&[1, 0, 0, 0, 1, 0, 0, 0, 0], Vec::new());
        assert!(matches!(r.next_frame(), Err(Error::FdMismatch(1, 0))));
        let mut r = FrameReader::new(16, 2);
        r.push(&[1, 0, 0, 0, 0, 0, 1, 0, 0], Vec::new());
        assert!(matches!(r.next_frame(), Err(Error::Reserved)));
        assert!(decode::<Request>(&[0xff, 0xff, 0xff]).is_err());
    }
}
