//! The register and descriptor ABI of the dma-engine, as
//! `docs/devices/dma-engine.md` gives it: BAR 0 register offsets, opcodes,
//! flags, completion statuses, and the 64-byte descriptor and 32-byte
//! completion record with their wire layouts (little-endian zerocopy
//! structs, their sizes checked at compile time).

use serde::{Deserialize, Serialize};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::dma::Route;

/// Work queues.
pub const QUEUES: usize = 4;
/// Largest transfer of one descriptor.
pub const MAX_XFER: u32 = 16 << 20;
/// Largest ring.
pub const MAX_RING: u32 = 4096;
/// Descriptor size.
pub const DESC_SIZE: u64 = 64;
/// Completion record size.
pub const COMPLETION_SIZE: usize = 32;

/// BAR 0 registers.
pub mod regs {
    /// Device id (RO).
    pub const ID: u64 = 0x000;
    /// Interface version (RO).
    pub const VERSION: u64 = 0x004;
    /// Number of queues (RO).
    pub const NUM_QUEUES: u64 = 0x008;
    /// Largest transfer (RO).
    pub const MAX_XFER: u64 = 0x00c;
    /// Device control: bit 0 enable.
    pub const CTRL: u64 = 0x010;
    /// Device status: bit 0 enabled.
    pub const STATUS: u64 = 0x014;
    /// INTx status: bit q = queue q interrupted; write 1 to clear.
    pub const INTX_STATUS: u64 = 0x018;
    /// First queue block; queue q is at `QUEUE + q * QUEUE_STRIDE`.
    pub const QUEUE: u64 = 0x100;
    /// Size of a queue block.
    pub const QUEUE_STRIDE: u64 = 0x40;
    /// Queue: ring base IOVA (u64).
    pub const Q_RING_BASE: u64 = 0x00;
    /// Queue: ring entries (power of two, 2..=4096).
    pub const Q_RING_SIZE: u64 = 0x08;
    /// Queue: PASID of the ring and completion records (bit 31 valid).
    pub const Q_RING_PASID: u64 = 0x0c;
    /// Queue control: bit 0 enable, bit 1 interrupts.
    pub const Q_CTRL: u64 = 0x10;
    /// Queue: descriptors consumed (RO).
    pub const Q_HEAD: u64 = 0x14;
    /// Queue: doorbell, descriptors submitted (also in BAR 2).
    pub const Q_TAIL: u64 = 0x18;
    /// Queue status (RO): bit 0 enabled, bit 1 halted on a ring fault.
    pub const Q_STATUS: u64 = 0x1c;
    /// Queue: descriptors completed (RO, u64).
    pub const Q_COMPLETED: u64 = 0x20;
    /// Queue: descriptors completed with an error (RO).
    pub const Q_ERRORS: u64 = 0x28;
    /// ID value.
    pub const ID_VALUE: u32 = 0xd3a0_0001;
    /// VERSION value.
    pub const VERSION_VALUE: u32 = 1;
    /// PASID valid bit (ring PASID, descriptor flags use their own bit).
    pub const PASID_VALID: u32 = 1 << 31;
    /// Q_CTRL: enable.
    pub const Q_CTRL_ENABLE: u32 = 1;
    /// Q_CTRL: interrupts.
    pub const Q_CTRL_IRQ: u32 = 2;
}

/// Descriptor opcodes.
pub mod op {
    /// Nothing (a completion record only).
    pub const NOP: u8 = 0;
    /// Copy `len` bytes from `src` to `dst`.
    pub const COPY: u8 = 1;
    /// Fill `len` bytes at `dst` with the 8-byte `pattern`.
    pub const FILL: u8 = 2;
    /// Compare `len` bytes at `src` and `dst`.
    pub const COMPARE: u8 = 3;
    /// CRC-32C of `len` bytes at `src`, seeded with `pattern` (low 32 bits).
    pub const CRC32C: u8 = 4;
}

/// Descriptor flags.
pub mod flag {
    /// Raise the queue's interrupt on completion.
    pub const INTERRUPT: u8 = 1;
    /// `pasid` holds a vPASID for the data accesses.
    pub const PASID: u8 = 2;
}

/// Completion status.
pub mod status {
    /// Not written yet.
    pub const NONE: u8 = 0;
    /// Done.
    pub const SUCCESS: u8 = 1;
    /// Reading the source faulted.
    pub const FAULT_SRC: u8 = 2;
    /// Writing the destination faulted.
    pub const FAULT_DST: u8 = 3;
    /// COMPARE found a difference.
    pub const MISMATCH: u8 = 4;
    /// Bad opcode, length or flags.
    pub const INVALID: u8 = 5;
    /// The vPASID has no pPASID.
    pub const NO_PASID: u8 = 6;
}

/// A descriptor as the guest writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Opcode.
    pub opcode: u8,
    /// Flags.
    pub flags: u8,
    /// vPASID (with [`flag::PASID`]).
    pub pasid: u32,
    /// Bytes.
    pub len: u32,
    /// Source IOVA.
    pub src: u64,
    /// Destination IOVA.
    pub dst: u64,
    /// Completion record IOVA (0 = none), in the queue's address space.
    pub completion: u64,
    /// FILL pattern, CRC seed.
    pub pattern: u64,
}

/// A descriptor's 64 bytes in the ring. Reserved bytes are ignored when
/// read and written as zero.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct DescriptorWire {
    /// 0x00.
    opcode: u8,
    /// 0x01.
    flags: u8,
    _reserved0: [u8; 2],
    /// 0x04.
    pasid: U32,
    /// 0x08.
    len: U32,
    _reserved1: [u8; 4],
    /// 0x10.
    src: U64,
    /// 0x18.
    dst: U64,
    /// 0x20.
    completion: U64,
    /// 0x28.
    pattern: U64,
    _reserved2: [u8; 16],
}
const _: () = assert!(size_of::<DescriptorWire>() == DESC_SIZE as usize);

impl Descriptor {
    /// Parses the 64 bytes of a descriptor (any bytes are a descriptor;
    /// validity is checked when it runs).
    pub fn parse(b: &[u8; 64]) -> Descriptor {
        let w: DescriptorWire = zerocopy::transmute!(*b);
        Descriptor {
            opcode: w.opcode,
            flags: w.flags,
            pasid: w.pasid.get(),
            len: w.len.get(),
            src: w.src.get(),
            dst: w.dst.get(),
            completion: w.completion.get(),
            pattern: w.pattern.get(),
        }
    }

    /// The 64 bytes of this descriptor.
    pub fn to_bytes(&self) -> [u8; 64] {
        let w = DescriptorWire {
            opcode: self.opcode,
            flags: self.flags,
            pasid: self.pasid.into(),
            len: self.len.into(),
            src: self.src.into(),
            dst: self.dst.into(),
            completion: self.completion.into(),
            pattern: self.pattern.into(),
            ..DescriptorWire::default()
        };
        zerocopy::transmute!(w)
    }

    /// The route of the data accesses, or the status that ends the
    /// descriptor (a PASID flag with a vPASID out of range).
    pub(super) fn route(&self) -> Result<Route, u8> {
        if self.flags & flag::PASID == 0 {
            return Ok(Route::Rid);
        }
        match self.pasid {
            p if p == 0 || p >= 1 << 20 => Err(status::INVALID),
            p => Ok(Route::Vpasid(p)),
        }
    }
}

/// A completion record as the device writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// Status.
    pub status: u8,
    /// Bytes processed.
    pub bytes_done: u32,
    /// Faulting IOVA.
    pub fault_addr: u64,
    /// CRC, or offset of the first difference.
    pub result: u64,
}

/// A completion record's 32 bytes in guest memory. Reserved bytes are
/// written as zero.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct CompletionWire {
    /// 0x00.
    status: u8,
    _reserved0: [u8; 3],
    /// 0x04.
    bytes_done: U32,
    /// 0x08.
    fault_addr: U64,
    /// 0x10.
    result: U64,
    _reserved1: [u8; 8],
}
const _: () = assert!(size_of::<CompletionWire>() == COMPLETION_SIZE);

impl Completion {
    /// Parses a record.
    pub fn parse(b: &[u8]) -> Option<Completion> {
        let (w, _) = CompletionWire::read_from_prefix(b).ok()?;
        Some(Completion {
            status: w.status,
            bytes_done: w.bytes_done.get(),
            fault_addr: w.fault_addr.get(),
            result: w.result.get(),
        })
    }

    /// The record's bytes; the status byte is the first.
    pub(super) fn to_bytes(self) -> [u8; COMPLETION_SIZE] {
        let w = CompletionWire {
            status: self.status,
            bytes_done: self.bytes_done.into(),
            fault_addr: self.fault_addr.into(),
            result: self.result.into(),
            ..CompletionWire::default()
        };
        zerocopy::transmute!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip() {
        let d = Descriptor {
            opcode: op::CRC32C,
            flags: flag::PASID | flag::INTERRUPT,
            pasid: 0x1234,
            len: 4096,
            src: 0x1000,
            dst: 0x2000,
            completion: 0x3000,
            pattern: 0xffff_ffff,
        };
        assert_eq!(Descriptor::parse(&d.to_bytes()), d);
        assert_eq!(d.route(), Ok(Route::Vpasid(0x1234)));
        assert_eq!(Descriptor { flags: flag::PASID, pasid: 0, ..d }.route(), Err(status::INVALID));
        assert_eq!(Descriptor { flags: flag::PASID, pasid: 1 << 20, ..d }.route(), Err(status::INVALID));
        assert_eq!(Descriptor { flags: 0, ..d }.route(), Ok(Route::Rid));
        let c = Completion { status: 1, bytes_done: 9, fault_addr: 7, result: 5 };
        assert_eq!(Completion::parse(&c.to_bytes()), Some(c));
        assert_eq!(Completion::parse(&[0; 8]), None);
    }

    #[test]
    fn fields_sit_at_their_documented_offsets() {
        let d = Descriptor {
            opcode: 0x11,
            flags: 0x22,
            pasid: 0x4433_2211,
            len: 0x8877_6655,
            src: 0x0102_0304_0506_0708,
            dst: 0x1112_1314_1516_1718,
            completion: 0x2122_2324_2526_2728,
            pattern: 0x3132_3334_3536_3738,
        };
        let b = d.to_bytes();
        assert_eq!(b[0x00], 0x11);
        assert_eq!(b[0x01], 0x22);
        assert_eq!(b[0x04..0x08], 0x4433_2211u32.to_le_bytes());
        assert_eq!(b[0x08..0x0c], 0x8877_6655u32.to_le_bytes());
        assert_eq!(b[0x10..0x18], d.src.to_le_bytes());
        assert_eq!(b[0x18..0x20], d.dst.to_le_bytes());
        assert_eq!(b[0x20..0x28], d.completion.to_le_bytes());
        assert_eq!(b[0x28..0x30], d.pattern.to_le_bytes());
        // Reserved bytes are written as zero and ignored when read.
        for r in [0x02..0x04, 0x0c..0x10, 0x30..0x40] {
            assert!(b[r].iter().all(|&x| x == 0));
        }
        let mut dirty = [0xa5u8; 64];
        dirty[..0x30].copy_from_slice(&b[..0x30]);
        dirty[0x0c..0x10].fill(0x5a);
        dirty[0x02..0x04].fill(0x5a);
        assert_eq!(Descriptor::parse(&dirty), d);

        let c = Completion { status: 3, bytes_done: 0x0403_0201, fault_addr: 0x0807_0605_0403_0201, result: 0xfeed };
        let r = c.to_bytes();
        assert_eq!(r[0], 3);
        assert_eq!(r[1..4], [0, 0, 0]);
        assert_eq!(r[4..8], c.bytes_done.to_le_bytes());
        assert_eq!(r[8..16], c.fault_addr.to_le_bytes());
        assert_eq!(r[16..24], c.result.to_le_bytes());
        assert_eq!(r[24..32], [0; 8]);
        // A record is parsed from the first 32 bytes of a longer buffer.
        let mut long = [0xffu8; 40];
        long[..32].copy_from_slice(&r);
        assert_eq!(Completion::parse(&long), Some(c));
    }
}
