#![deny(clippy::cast_possible_truncation)]
//! The vfio-user wire format: the 16-byte header, command numbers, the
//! fixed payload layouts of every command (as zerocopy structs with their
//! sizes checked at compile time) and the ioasid extension's commands.
//!
//! All values are host-endian, as the protocol says. Layouts follow QEMU's
//! `docs/interop/vfio-user.rst`; offsets in comments are from the end of
//! the header.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

/// Command numbers of the protocol.
pub mod cmd {
    /// Version and capability negotiation.
    pub const VERSION: u16 = 1;
    /// Add a DMA region.
    pub const DMA_MAP: u16 = 2;
    /// Remove a DMA region.
    pub const DMA_UNMAP: u16 = 3;
    /// Device flags and counts.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// One region's description.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// ioeventfds of a region.
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// One IRQ index's description.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// Configure IRQs.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// Read a region.
    pub const REGION_READ: u16 = 9;
    /// Write a region.
    pub const REGION_WRITE: u16 = 10;
    /// Server to client: read client memory.
    pub const DMA_READ: u16 = 11;
    /// Server to client: write client memory.
    pub const DMA_WRITE: u16 = 12;
    /// Reset the device.
    pub const DEVICE_RESET: u16 = 13;
    /// Several small writes in one message.
    pub const REGION_WRITE_MULTI: u16 = 15;
    /// Get, set or probe a device feature.
    pub const DEVICE_FEATURE: u16 = 16;
    /// Read migration data.
    pub const MIG_DATA_READ: u16 = 17;
    /// Write migration data.
    pub const MIG_DATA_WRITE: u16 = 18;

    /// First command number of the ioasid extension.
    pub const EXT_BASE: u16 = 0x4000;
    /// Extension: bind the device through a session's device channel (1 fd).
    pub const EXT_BIND: u16 = 0x4001;
    /// Extension: drop the binding made by [`EXT_BIND`].
    pub const EXT_UNBIND: u16 = 0x4002;
    /// Extension: attach (or replace) the RID or a vPASID to an IOAS.
    pub const EXT_ATTACH: u16 = 0x4003;
    /// Extension: detach the RID or a vPASID.
    pub const EXT_DETACH: u16 = 0x4004;
    /// Extension: list the vPASID -> pPASID map.
    pub const EXT_LIST_PASIDS: u16 = 0x4005;

    /// A name for logs.
    pub fn name(c: u16) -> &'static str {
        match c {
            VERSION => "VERSION",
            DMA_MAP => "DMA_MAP",
            DMA_UNMAP => "DMA_UNMAP",
            DEVICE_GET_INFO => "DEVICE_GET_INFO",
            DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
            DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
            DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
            DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
            REGION_READ => "REGION_READ",
            REGION_WRITE => "REGION_WRITE",
            DMA_READ => "DMA_READ",
            DMA_WRITE => "DMA_WRITE",
            DEVICE_RESET => "DEVICE_RESET",
            REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
            DEVICE_FEATURE => "DEVICE_FEATURE",
            MIG_DATA_READ => "MIG_DATA_READ",
            MIG_DATA_WRITE => "MIG_DATA_WRITE",
            EXT_BIND => "IOASID_BIND",
            EXT_UNBIND => "IOASID_UNBIND",
            EXT_ATTACH => "IOASID_ATTACH",
            EXT_DETACH => "IOASID_DETACH",
            EXT_LIST_PASIDS => "IOASID_LIST_PASIDS",
            _ => "UNKNOWN",
        }
    }
}

/// Header flag bits.
pub mod flags {
    /// Mask of the type field.
    pub const TYPE_MASK: u32 = 0xf;
    /// Type: command.
    pub const COMMAND: u32 = 0;
    /// Type: reply.
    pub const REPLY: u32 = 1;
    /// The sender wants no reply.
    pub const NO_REPLY: u32 = 1 << 4;
    /// The reply reports an error in the `error` field.
    pub const ERROR: u32 = 1 << 5;
}

/// The message header.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    /// Chosen by the sender, echoed in the reply.
    pub msg_id: u16,
    /// Command number.
    pub command: u16,
    /// Size of the whole message including this header.
    pub msg_size: u32,
    /// Type and flag bits.
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}
const _: () = assert!(size_of::<Header>() == HEADER_SIZE);

/// `msg_size` of a message with `payload` bytes after the header. Every
/// message this crate builds is far below 4 GiB (payloads are bounded by
/// `max_data_xfer_size` and the reply caps); one that were not could not
/// be framed at all, and would say `u32::MAX`.
fn msg_size(payload: usize) -> u32 {
    HEADER_SIZE.checked_add(payload).and_then(|n| u32::try_from(n).ok()).unwrap_or(u32::MAX)
}

impl Header {
    /// A command header.
    pub fn command(msg_id: u16, command: u16, payload: usize) -> Header {
        Header { msg_id, command, msg_size: msg_size(payload), flags: flags::COMMAND, error: 0 }
    }

    /// The reply header to this command.
    pub fn reply(&self, payload: usize) -> Header {
        Header {
            msg_id: self.msg_id,
            command: self.command,
            msg_size: msg_size(payload),
            flags: flags::REPLY,
            error: 0,
        }
    }

    /// The error reply to this command.
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            msg_id: self.msg_id,
            command: self.command,
            msg_size: msg_size(0),
            flags: flags::REPLY | flags::ERROR,
            error: errno as u32,
        }
    }

    /// The message is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & flags::TYPE_MASK == flags::REPLY
    }

    /// The sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & flags::NO_REPLY != 0
    }
}

/// VERSION payload (followed by NUL-terminated JSON).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}
const _: () = assert!(size_of::<Version>() == 4);

/// DMA_MAP flag: the region may be read.
pub const DMA_MAP_READ: u32 = 1;
/// DMA_MAP flag: the region may be written.
pub const DMA_MAP_WRITE: u32 = 2;
/// DMA_UNMAP flag (VFIO's value): return a dirty bitmap (legacy, refused).
pub const DMA_UNMAP_GET_DIRTY_BITMAP: u32 = 1;
/// DMA_UNMAP flag (VFIO's value): unmap everything (`address` = `size` = 0).
pub const DMA_UNMAP_ALL: u32 = 2;

/// DMA_MAP payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DmaMap {
    /// Size of this structure.
    pub argsz: u32,
    /// READ/WRITE.
    pub flags: u32,
    /// Offset in the passed fd.
    pub offset: u64,
    /// Client DMA address.
    pub address: u64,
    /// Length.
    pub size: u64,
}
const _: () = assert!(size_of::<DmaMap>() == 32);

/// DMA_UNMAP payload (and reply).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DmaUnmap {
    /// Maximum reply payload.
    pub argsz: u32,
    /// Flags.
    pub flags: u32,
    /// Client DMA address.
    pub address: u64,
    /// Length.
    pub size: u64,
}
const _: () = assert!(size_of::<DmaUnmap>() == 24);

/// DEVICE_GET_INFO flag: DEVICE_RESET is supported.
pub const DEVICE_FLAGS_RESET: u32 = 1;
/// DEVICE_GET_INFO flag: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 2;

/// DEVICE_GET_INFO payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DeviceInfo {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// RESET, PCI.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}
const _: () = assert!(size_of::<DeviceInfo>() == 16);

/// Region flag: readable.
pub const REGION_READ: u32 = 1;
/// Region flag: writable.
pub const REGION_WRITE: u32 = 2;
/// Region flag: mmap-able through the passed fd.
pub const REGION_MMAP: u32 = 4;
/// Region flag: a capability chain follows.
pub const REGION_CAPS: u32 = 8;
/// Region capability id: sparse mmap areas.
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// Region capability id: region type.
pub const REGION_CAP_TYPE: u16 = 2;

/// DEVICE_GET_REGION_INFO payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RegionInfo {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// READ/WRITE/MMAP/CAPS.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of this structure.
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// Offset to use with the fd for mmap.
    pub offset: u64,
}
const _: () = assert!(size_of::<RegionInfo>() == 32);

/// A capability header in a region info chain.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CapHeader {
    /// Capability id.
    pub id: u16,
    /// Capability version.
    pub version: u16,
    /// Offset of the next one, 0 at the end.
    pub next: u32,
}
const _: () = assert!(size_of::<CapHeader>() == 8);

/// One sparse mmap area.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SparseArea {
    /// Offset in the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
}
const _: () = assert!(size_of::<SparseArea>() == 16);

/// DEVICE_GET_REGION_IO_FDS payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoFdsInfo {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// Must be 0.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Entries that follow.
    pub count: u32,
}
const _: () = assert!(size_of::<IoFdsInfo>() == 16);

/// IO fd type: ioeventfd.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// KVM ioeventfd flag: match `datamatch`.
pub const IOEVENTFD_FLAG_DATAMATCH: u32 = 1;

/// One sub-region entry of DEVICE_GET_REGION_IO_FDS.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoFdEntry {
    /// Offset in the region.
    pub offset: u64,
    /// Access size (0 = any).
    pub size: u64,
    /// Index in the passed fds.
    pub fd_index: u32,
    /// [`IO_FD_TYPE_IOEVENTFD`].
    pub kind: u32,
    /// KVM ioeventfd flags.
    pub flags: u32,
    /// Zero.
    pub padding: u32,
    /// Value to match.
    pub datamatch: u64,
}
const _: () = assert!(size_of::<IoFdEntry>() == 40);

/// IRQ info flag: eventfd signalling.
pub const IRQ_INFO_EVENTFD: u32 = 1;
/// IRQ info flag: MASK/UNMASK supported.
pub const IRQ_INFO_MASKABLE: u32 = 2;
/// IRQ info flag: masks itself when triggered.
pub const IRQ_INFO_AUTOMASKED: u32 = 4;
/// IRQ info flag: set as a whole.
pub const IRQ_INFO_NORESIZE: u32 = 8;

/// DEVICE_GET_IRQ_INFO payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IrqInfo {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// IRQ info flags.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Vectors of the index.
    pub count: u32,
}
const _: () = assert!(size_of::<IrqInfo>() == 16);

/// SET_IRQS data: none.
pub const IRQ_SET_DATA_NONE: u32 = 1;
/// SET_IRQS data: one bool byte per vector.
pub const IRQ_SET_DATA_BOOL: u32 = 2;
/// SET_IRQS data: eventfds in the message's fds.
pub const IRQ_SET_DATA_EVENTFD: u32 = 4;
/// SET_IRQS action: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 8;
/// SET_IRQS action: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 16;
/// SET_IRQS action: trigger.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 32;

/// DEVICE_SET_IRQS payload (followed by bools for DATA_BOOL).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IrqSet {
    /// Size of the request payload.
    pub argsz: u32,
    /// DATA and ACTION bits.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Vectors.
    pub count: u32,
}
const _: () = assert!(size_of::<IrqSet>() == 20);

/// REGION_READ / REGION_WRITE payload (followed by data).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes.
    pub count: u32,
}
const _: () = assert!(size_of::<RegionAccess>() == 16);

/// DMA_READ / DMA_WRITE payload (followed by data).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DmaRw {
    /// Client DMA address.
    pub address: u64,
    /// Bytes.
    pub count: u64,
}
const _: () = assert!(size_of::<DmaRw>() == 16);

/// One write of REGION_WRITE_MULTI.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct WriteMultiEntry {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes, at most 8.
    pub count: u32,
    /// Data.
    pub data: [u8; 8],
}
const _: () = assert!(size_of::<WriteMultiEntry>() == 24);

/// Most writes in one REGION_WRITE_MULTI we accept.
pub const MAX_WRITE_MULTI: u64 = 1024;

/// DEVICE_FEATURE head (followed by feature data).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Feature {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// Feature index and GET/SET/PROBE.
    pub flags: u32,
}
const _: () = assert!(size_of::<Feature>() == 8);

/// DEVICE_FEATURE: mask of the feature index.
pub const FEATURE_MASK: u32 = 0xffff;
/// DEVICE_FEATURE: get.
pub const FEATURE_GET: u32 = 1 << 16;
/// DEVICE_FEATURE: set.
pub const FEATURE_SET: u32 = 1 << 17;
/// DEVICE_FEATURE: probe.
pub const FEATURE_PROBE: u32 = 1 << 18;
/// Feature: migration support flags.
pub const FEATURE_MIGRATION: u32 = 1;
/// Feature: migration device state.
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// Feature: start DMA logging.
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
/// Feature: stop DMA logging.
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// Feature: report DMA logging.
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// Migration flag: STOP_COPY supported.
pub const MIGRATION_STOP_COPY: u64 = 1;
/// Migration flag: PRE_COPY supported.
pub const MIGRATION_PRE_COPY: u64 = 4;

/// MIG_DEVICE_STATE data.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MigState {
    /// State.
    pub device_state: u32,
    /// Unused in vfio-user.
    pub data_fd: u32,
}
const _: () = assert!(size_of::<MigState>() == 8);

/// DMA_LOGGING_START/STOP data head (followed by ranges).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct LoggingControl {
    /// Tracking granularity.
    pub page_size: u64,
    /// Ranges that follow (0 = everything).
    pub num_ranges: u32,
    /// Zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<LoggingControl>() == 16);

/// One DMA logging range.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct LoggingRange {
    /// First IOVA.
    pub iova: u64,
    /// Length.
    pub length: u64,
}
const _: () = assert!(size_of::<LoggingRange>() == 16);

/// DMA_LOGGING_REPORT data head (followed by the bitmap in the reply).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct LoggingReport {
    /// First IOVA.
    pub iova: u64,
    /// Length.
    pub length: u64,
    /// Granularity of the bitmap.
    pub page_size: u64,
}
const _: () = assert!(size_of::<LoggingReport>() == 24);

/// MIG_DATA_READ / MIG_DATA_WRITE head (followed by data).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MigData {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// Bytes of data.
    pub size: u32,
}
const _: () = assert!(size_of::<MigData>() == 8);

/// Extension attach flag: `vpasid` is valid (otherwise the RID).
pub const EXT_FLAG_PASID: u32 = 1;
/// Extension attach flag: replace an existing attachment.
pub const EXT_FLAG_REPLACE: u32 = 2;

/// IOASID_BIND request (1 fd: the device channel) and reply.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ExtBind {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// Zero.
    pub flags: u32,
    /// Reply: device id in the session.
    pub dev_id: u32,
    /// Reply: PASID width the device supports.
    pub pasid_width: u32,
    /// Reply: the session the channel speaks for.
    pub session: u64,
}
const _: () = assert!(size_of::<ExtBind>() == 24);

/// IOASID_ATTACH / IOASID_DETACH request and reply.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ExtAttach {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// [`EXT_FLAG_PASID`], [`EXT_FLAG_REPLACE`].
    pub flags: u32,
    /// The guest's PASID.
    pub vpasid: u32,
    /// IOAS or nested IOAS id in the bound session (attach only).
    pub pt_id: u32,
    /// Reply: the pPASID the server chose (0 for the RID).
    pub ppasid: u32,
    /// Zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<ExtAttach>() == 24);

/// IOASID_LIST_PASIDS request head and reply head (entries follow).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ExtList {
    /// Maximum / needed reply payload.
    pub argsz: u32,
    /// Zero.
    pub flags: u32,
    /// Entries in the reply.
    pub count: u32,
    /// Reply: IOAS the RID is attached to, 0 if none.
    pub rid_pt_id: u32,
}
const _: () = assert!(size_of::<ExtList>() == 16);

/// One vPASID map entry.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ExtPasidEntry {
    /// Guest PASID.
    pub vpasid: u32,
    /// Physical PASID.
    pub ppasid: u32,
    /// IOAS or nested IOAS.
    pub pt_id: u32,
    /// Zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<ExtPasidEntry>() == 16);

/// PCI region indexes.
pub mod region {
    /// First BAR.
    pub const BAR0: u32 = 0;
    /// Expansion ROM.
    pub const ROM: u32 = 6;
    /// Config space.
    pub const CONFIG: u32 = 7;
    /// VGA.
    pub const VGA: u32 = 8;
    /// Regions a PCI device reports.
    pub const NUM: u32 = 9;
}

/// PCI IRQ indexes.
pub mod irq_index {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// Error reporting.
    pub const ERR: u32 = 3;
    /// Device request (hot-unplug).
    pub const REQ: u32 = 4;
    /// IRQ indexes a PCI device reports.
    pub const NUM: u32 = 5;
}

/// Reads a fixed structure from the start of `bytes`.
pub fn read<T: FromBytes>(bytes: &[u8]) -> Option<T> {
    T::read_from_prefix(bytes).ok().map(|(t, _)| t)
}
