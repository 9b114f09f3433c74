//! Data types shared by the model, the wire protocol and the client.

use serde::{Deserialize, Serialize};

pub use crate::pagetable::Perm;

/// Width of the pPASID space (20 bits, as PCIe).
pub const PASID_BITS: u32 = 20;
/// One past the largest pPASID.
pub const PASID_LIMIT: u32 = 1 << PASID_BITS;

/// Configurable caps on everything a client can grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Sessions open at once.
    pub max_sessions: u32,
    /// Objects (memory objects, IOASes, nested IOASes) per session.
    pub max_objects_per_session: u32,
    /// Mappings (areas) per IOAS.
    pub max_mappings_per_ioas: u32,
    /// Allowed or reserved ranges per IOAS.
    pub max_ranges_per_ioas: u32,
    /// pPASIDs a session may hold.
    pub max_ppasids_per_session: u32,
    /// Largest frame a peer may send, in bytes.
    pub max_message_bytes: u32,
    /// File descriptors one message may carry.
    pub max_fds_per_message: u32,
    /// Records a session's fault queue holds before it drops new ones.
    pub fault_queue_depth: u32,
    /// Size of the table pool in bytes.
    pub table_pool_bytes: u64,
    /// Devices bound per session.
    pub max_devices_per_session: u32,
    /// Device channels per session.
    pub max_channels_per_session: u32,
    /// Milliseconds a device server has to answer an invalidation before
    /// it is fenced.
    pub invalidate_timeout_ms: u32,
    /// Page tables (4 KiB each, from the shared pool) a session may hold
    /// through its IOASes and devices.
    pub max_tables_per_session: u32,
    /// Bytes of memory objects a session may register in all.
    pub max_memory_bytes_per_session: u64,
    /// Connections (sessions, observers, device channels, and peers that
    /// have not said hello yet) open at once.
    pub max_connections: u32,
    /// Milliseconds a new peer has to say hello before it is turned away.
    pub hello_timeout_ms: u32,
    /// Milliseconds a peer has to finish sending a message it started, and
    /// to read a reply the core started writing, before it is dropped.
    pub peer_stall_ms: u32,
    /// Bytes the core buffers for all peers together: unfinished messages
    /// past each peer's first 16 KiB, and unread replies. Past it, peers
    /// are not read further and large replies are refused with EAGAIN.
    pub max_peer_buffer_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 1024,
            max_objects_per_session: 65_536,
            max_mappings_per_ioas: 1 << 21,
            max_ranges_per_ioas: 256,
            max_ppasids_per_session: 4096,
            max_message_bytes: 1 << 20,
            max_fds_per_message: 16,
            fault_queue_depth: 4096,
            table_pool_bytes: 1 << 30,
            max_devices_per_session: 256,
            max_channels_per_session: 16,
            invalidate_timeout_ms: 2000,
            max_tables_per_session: 65_536,
            max_memory_bytes_per_session: 1 << 42,
            max_connections: 4096,
            hello_timeout_ms: 5000,
            peer_stall_ms: 5000,
            max_peer_buffer_bytes: 32 << 20,
        }
    }
}

/// An inclusive IOVA range `[start, last]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

/// Answer of an `iova_ranges` query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IovaRanges {
    /// Alignment every IOVA and length must have.
    pub alignment: u64,
    /// Usable ranges (the aperture minus reserved regions).
    pub ranges: Vec<IovaRange>,
}

/// Arguments of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapArgs {
    /// Target IOAS.
    pub ioas: u32,
    /// Memory object.
    pub mem: u32,
    /// Offset in the memory object.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Fixed IOVA, or `None` to let the core choose.
    pub iova: Option<u64>,
    /// Rights.
    pub perm: Perm,
}

/// Arguments of a copy between IOASes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyArgs {
    /// Destination IOAS.
    pub dst: u32,
    /// Source IOAS.
    pub src: u32,
    /// First source IOVA.
    pub src_iova: u64,
    /// Length in bytes.
    pub length: u64,
    /// Fixed destination IOVA, or `None` to let the core choose.
    pub dst_iova: Option<u64>,
    /// Rights of the new mappings (a subset of the source's).
    pub perm: Perm,
}

/// Arguments of a dirty-bitmap read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyBitmapArgs {
    /// IOAS.
    pub ioas: u32,
    /// First IOVA.
    pub iova: u64,
    /// Length.
    pub length: u64,
    /// Granularity of the bitmap.
    pub page_size: u64,
    /// Leave the dirty bits set.
    pub no_clear: bool,
}

/// What a stage-1 invalidation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InvalidateScope {
    /// Every cached stage-1 translation.
    All,
    /// `[iova, iova+length)`.
    Range {
        /// First IOVA (4 KiB aligned).
        iova: u64,
        /// Length (non-zero, 4 KiB multiple).
        length: u64,
    },
}

/// Why a DMA faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultReason {
    /// No translation.
    NotPresent,
    /// Translation exists but lacks the right asked for.
    Permission,
    /// A malformed table entry.
    Malformed,
    /// The PASID has no valid entry.
    NoPasid,
    /// The device was fenced.
    Fenced,
}

/// Response codes of a page request, as iommufd's.
pub mod page_response {
    /// The page is now mapped; retry.
    pub const SUCCESS: u32 = 0;
    /// The request cannot be served; fail the DMA.
    pub const INVALID: u32 = 1;
}

/// A fault record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// Device that faulted.
    pub dev_id: u32,
    /// pPASID (0 = RID, untagged).
    pub pasid: u32,
    /// Faulting IOVA.
    pub iova: u64,
    /// Access that was attempted.
    pub access: Perm,
    /// Why.
    pub reason: FaultReason,
    /// Page request group index.
    pub group: u32,
    /// Last request of its group.
    pub last: bool,
    /// Non-zero for a recoverable page request that must be answered.
    pub cookie: u64,
}

/// A memory object as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemInfo {
    /// Object id.
    pub id: u32,
    /// Size in bytes.
    pub size: u64,
    /// Protected against shrinking (memfd with `F_SEAL_SHRINK`).
    pub sealed: bool,
    /// Seals present, e.g. `shrink` or `unsupported`.
    pub seals: String,
    /// Base in the system address space.
    pub system_address: u64,
    /// Mappings that reference it.
    pub mappings: u32,
    /// Client memory (no fd): the address the owning device server uses
    /// for it with its own client (a vfio-user client's DMA address).
    pub client_address: Option<u64>,
}

/// One mapping (area) of an IOAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingInfo {
    /// First IOVA.
    pub iova: u64,
    /// Length.
    pub length: u64,
    /// Memory object id.
    pub mem: u32,
    /// Offset in it.
    pub offset: u64,
    /// Rights.
    pub perm: Perm,
}

/// Kind of an IOAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoasKind {
    /// A paging IOAS whose tables the core owns.
    Paging,
    /// A nested IOAS: a user-owned stage-1 table on a parent.
    Nested {
        /// Parent IOAS id.
        parent: u32,
        /// Stage-1 root, a parent IOVA.
        s1_root: u64,
    },
}

/// Counters of an IOAS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoasStats {
    /// Successful maps (and copies).
    pub maps: u64,
    /// Successful unmaps.
    pub unmaps: u64,
    /// Bytes mapped now.
    pub mapped_bytes: u64,
    /// Stage-1 invalidations (nested).
    pub invalidations: u64,
}

/// An IOAS as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoasInfo {
    /// Object id.
    pub id: u32,
    /// Paging or nested.
    pub kind: IoasKind,
    /// Mappings in IOVA order (empty for nested). A `Status` reply carries
    /// the first ones only when there are many (see `mappings_total`);
    /// `Request::Mappings` pages through the rest, and
    /// `client::Client::status` does so by itself.
    pub mappings: Vec<MappingInfo>,
    /// Usable IOVA ranges.
    pub iova_ranges: Vec<IovaRange>,
    /// Allowed ranges for automatic IOVA (empty = the whole aperture).
    pub allowed: Vec<IovaRange>,
    /// Reserved ranges.
    pub reserved: Vec<IovaRange>,
    /// Dirty tracking on.
    pub dirty_tracking: bool,
    /// Pool offset of the root table (0 for nested).
    pub root: u64,
    /// Tables in use by this IOAS.
    pub tables: u32,
    /// Nested IOASes on this one.
    pub children: u32,
    /// Device attachments to this IOAS: (device, pPASID).
    pub attached: Vec<(u32, u32)>,
    /// Counters.
    pub stats: IoasStats,
    /// Mappings the IOAS holds, all of them (`mappings` may list fewer).
    pub mappings_total: u64,
}

/// A session as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id.
    pub id: u64,
    /// Peer process id.
    pub pid: i32,
    /// Peer user id.
    pub uid: u32,
    /// Objects owned.
    pub objects: u32,
    /// Memory objects.
    pub memory: Vec<MemInfo>,
    /// IOASes (paging and nested).
    pub ioas: Vec<IoasInfo>,
    /// pPASIDs held.
    pub ppasids: Vec<u32>,
    /// Fault records waiting to be read.
    pub faults_queued: u32,
    /// Fault records dropped because the queue was full.
    pub faults_lost: u64,
    /// Devices bound through the session's channels.
    pub devices: Vec<DeviceInfo>,
}

/// A fault in the global log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultLogEntry {
    /// Sequence number.
    pub seq: u64,
    /// Owning session (0 if none).
    pub session: u64,
    /// The record.
    pub record: FaultRecord,
}

/// Core-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreStats {
    /// Sessions opened since start.
    pub sessions_opened: u64,
    /// Requests served.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Faults recorded.
    pub faults: u64,
}

/// The table pool as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Pool size in bytes.
    pub bytes: u64,
    /// Tables allocated.
    pub tables_in_use: u32,
    /// Tables the pool can hold.
    pub capacity: u32,
}

/// Everything an observer can see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Sessions and what they own.
    pub sessions: Vec<SessionInfo>,
    /// pPASIDs in use: (pasid, owning session).
    pub ppasids: Vec<(u32, u64)>,
    /// The table pool.
    pub pool: PoolInfo,
    /// Recent faults, oldest first.
    pub faults: Vec<FaultLogEntry>,
    /// Counters.
    pub stats: CoreStats,
    /// Limits in force.
    pub limits: Limits,
}

/// Result of translating one IOVA through an IOAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translation {
    /// System address.
    pub system_address: u64,
    /// Memory object id.
    pub mem: u32,
    /// Offset in the memory object.
    pub offset: u64,
    /// Rights.
    pub perm: Perm,
    /// Leaf size.
    pub page_size: u64,
}

/// What a device can do, declared when it is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceCaps {
    /// PASID width in bits (0 = no PASID support, at most 20).
    pub pasid_width: u8,
    /// The device can send page requests (PCIe PRI).
    pub pri: bool,
    /// The device can track dirty pages.
    pub dirty_tracking: bool,
}

/// Arguments of a device bind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindArgs {
    /// A name for people (e.g. `dma-engine`), at most 64 bytes.
    pub name: String,
    /// PCI address, e.g. `0000:00:04.0`, at most 32 bytes.
    pub pci_address: String,
    /// Capabilities.
    pub caps: DeviceCaps,
}

/// A bound device as its server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundDevice {
    /// Device id (an object id of the session).
    pub dev_id: u32,
    /// Pool offset of the device's PASID table root.
    pub pasid_root: u64,
}

/// One attachment of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    /// pPASID, or 0 for the RID (untagged DMA).
    pub pasid: u32,
    /// IOAS or nested IOAS id.
    pub pt_id: u32,
}

/// A device as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// PCI address.
    pub pci_address: String,
    /// Capabilities.
    pub caps: DeviceCaps,
    /// Channel it was bound through.
    pub channel: u64,
    /// Attachments by PASID.
    pub attachments: Vec<AttachmentInfo>,
    /// Global pPASIDs allocated for it.
    pub ppasids: Vec<u32>,
    /// Fenced after failing to answer an invalidation.
    pub fenced: bool,
    /// Pool offset of its PASID table root.
    pub pasid_root: u64,
}

/// Which translations a device must drop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidateTarget {
    /// Device.
    pub dev_id: u32,
    /// pPASID (0 = RID).
    pub pasid: u32,
    /// IOVA range `[start, last]` of that PASID's address space, or `None`
    /// for everything.
    pub range: Option<IovaRange>,
}

/// One vPASID of a device as its driver (the device server) keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpasidEntry {
    /// The guest's PASID.
    pub vpasid: u32,
    /// The pPASID the core routes.
    pub ppasid: u32,
    /// IOAS or nested IOAS it is attached to.
    pub pt_id: u32,
}

/// Driver-private state of a bound device, answered live by its device
/// server through the core (the core only relays it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverState {
    /// Who serves the device, e.g. `vfio-user-server pid 42 socket /run/x.sock`.
    pub server: String,
    /// The vPASID -> pPASID map.
    pub vpasids: Vec<VpasidEntry>,
    /// Further lines for people (device counters and the like).
    pub lines: Vec<String>,
}

impl DriverState {
    /// Most vPASID entries an answer may carry.
    pub const MAX_VPASIDS: usize = 1 << 16;
    /// Most lines an answer may carry.
    pub const MAX_LINES: usize = 256;
    /// Longest string in an answer.
    pub const MAX_STR: usize = 512;

    /// Whether the answer is within the caps above.
    pub fn within_limits(&self) -> bool {
        self.server.len() <= Self::MAX_STR
            && self.vpasids.len() <= Self::MAX_VPASIDS
            && self.lines.len() <= Self::MAX_LINES
            && self.lines.iter().all(|l| l.len() <= Self::MAX_STR)
    }
}

/// One mapping of a batched map ([`crate::wire::Request::MapBatch`]): a
/// [`MapArgs`] without its IOAS, which the batch names once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapEntry {
    /// Memory object.
    pub mem: u32,
    /// Offset in the memory object.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Fixed IOVA, or `None` to let the core choose.
    pub iova: Option<u64>,
    /// Rights.
    pub perm: Perm,
}

/// One range of a batched unmap ([`crate::wire::Request::UnmapBatch`]):
/// whole mappings inside `[iova, iova + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmapEntry {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The core's counters, as `Request::Counters` reports them to a
/// connection (a session counts only itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Sessions open.
    pub sessions: u64,
    /// pPASIDs in use.
    pub ppasids: u64,
    /// The core-wide counters.
    pub stats: CoreStats,
}

/// A piece of one IOAS's mappings (`Request::MappingsPiece`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingsPiece {
    /// How many times the IOAS's mappings have changed (successful maps,
    /// copies and unmaps): two pieces with the same count are of the same
    /// set of mappings.
    pub changes: u64,
    /// Mappings the IOAS holds now.
    pub total: u64,
    /// The mappings of the piece, in IOVA order.
    pub mappings: Vec<MappingInfo>,
}
