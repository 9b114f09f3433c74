//! The NVMe ABI the controller speaks: register offsets and values,
//! submission queue entries, completion queue entries, opcodes and the
//! status codes of the base specification (revision 1.4) it returns.

/// BAR 0 register offsets.
pub mod reg {
    /// Controller Capabilities (64-bit).
    pub const CAP: u64 = 0x00;
    /// Version.
    pub const VS: u64 = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: u64 = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: u64 = 0x10;
    /// Controller Configuration.
    pub const CC: u64 = 0x14;
    /// Controller Status.
    pub const CSTS: u64 = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: u64 = 0x24;
    /// Admin Submission Queue base (64-bit).
    pub const ASQ: u64 = 0x28;
    /// Admin Completion Queue base (64-bit).
    pub const ACQ: u64 = 0x30;
    /// First doorbell: SQ y tail at `DOORBELL + 8y`, CQ y head at
    /// `DOORBELL + 8y + 4` (CAP.DSTRD is 0).
    pub const DOORBELL: u64 = 0x1000;
}

/// Controller Configuration fields.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O Command Set Selected (bits 6:4); 0 is the NVM command set.
    pub const CSS_SHIFT: u32 = 4;
    /// Memory Page Size (bits 10:7): 2^(12+MPS).
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism Selected (bits 13:11); 0 is round robin.
    pub const AMS_SHIFT: u32 = 11;
    /// Shutdown Notification (bits 15:14).
    pub const SHN_SHIFT: u32 = 14;
    /// I/O Submission Queue Entry Size (bits 19:16), log2.
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size (bits 23:20), log2.
    pub const IOCQES_SHIFT: u32 = 20;
    /// Bits a host may write (everything else reads 0).
    pub const WRITABLE: u32 = 0x00ff_fff1;
}

/// Controller Status fields.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status (bits 3:2): 0 normal, 1 occurring, 2 complete.
    pub const SHST_SHIFT: u32 = 2;
    /// Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << SHST_SHIFT;
}

/// Largest queue: CAP.MQES + 1 entries.
pub const MAX_QUEUE_ENTRIES: u32 = 1024;
/// I/O queue pairs offered (Number of Queues feature).
pub const MAX_IO_QUEUES: u16 = 8;
/// MSI-X vectors: one for the admin CQ and one per I/O CQ.
pub const VECTORS: u16 = MAX_IO_QUEUES + 1;
/// Maximum Data Transfer Size as a power of two of the minimum page size
/// (4 KiB): 2^7 * 4 KiB = 512 KiB.
pub const MDTS: u8 = 7;
/// The largest transfer in bytes.
pub const MAX_TRANSFER: usize = 4096 << MDTS;
/// Asynchronous Event Request Limit (0's based): 4 outstanding.
pub const AERL: u8 = 3;
/// Abort Command Limit (0's based): 4.
pub const ACL: u8 = 3;
/// Logical block size (LBADS 9).
pub const LBA_SHIFT: u32 = 9;
/// Logical block size in bytes.
pub const LBA_SIZE: u64 = 1 << LBA_SHIFT;
/// The only namespace.
pub const NSID: u32 = 1;
/// Error Information log entries kept (ELPE + 1).
pub const ERROR_LOG_ENTRIES: usize = 16;
/// Timeout (CAP.TO) in 500 ms units: 10 s.
pub const CAP_TO: u64 = 20;

/// The CAP register: MQES, CQR (contiguous queues required), AMS none
/// beyond round robin, TO, DSTRD 0, NSSRS 0, CSS = NVM command set,
/// MPSMIN 0 (4 KiB), MPSMAX 4 (64 KiB).
pub const fn cap_value() -> u64 {
    (MAX_QUEUE_ENTRIES as u64 - 1) | (1 << 16) | (CAP_TO << 24) | (1 << 37) | (4 << 52)
}

/// The VS register: 1.4.0.
pub const VERSION: u32 = 0x0001_0400;

/// Admin opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Doorbell Buffer Config (shadow doorbells and EventIdx).
    pub const DBBUF_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Feature identifiers.
pub mod feat {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MGMT: u8 = 0x02;
    /// Temperature Threshold.
    pub const TEMP_THRESH: u8 = 0x04;
    /// Error Recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WC: u8 = 0x06;
    /// Number of Queues.
    pub const NUM_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const IRQ_COALESCE: u8 = 0x08;
    /// Interrupt Vector Configuration.
    pub const IRQ_CONFIG: u8 = 0x09;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT: u8 = 0x0b;
}

/// Log page identifiers.
pub mod log {
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FW_SLOT: u8 = 0x03;
}

/// A completion status: Status Code Type in bits 10:8, Status Code in
/// bits 7:0 and Do Not Retry in bit 14, as the CQE's status field holds
/// them shifted left by one (bit 0 is the phase tag).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status(pub u16);

impl Status {
    /// Generic (SCT 0) status `sc`, with Do Not Retry.
    pub const fn generic(sc: u8) -> Status {
        Status(sc as u16 | (1 << 14))
    }

    /// Command Specific (SCT 1) status `sc`, with Do Not Retry.
    pub const fn specific(sc: u8) -> Status {
        Status(sc as u16 | (1 << 8) | (1 << 14))
    }

    /// Media and Data Integrity (SCT 2) status `sc`.
    pub const fn media(sc: u8) -> Status {
        Status(sc as u16 | (2 << 8))
    }

    /// Status Code Type.
    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// Status Code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }

    /// The status field of a CQE (bits 15:1 of dword 3's upper half).
    pub fn field(self, phase: bool) -> u16 {
        (self.0 << 1) | u16::from(phase)
    }

    /// Decodes the status field of a CQE (the phase tag dropped).
    pub fn from_field(f: u16) -> Status {
        Status(f >> 1)
    }
}

/// Status codes.
pub mod sc {
    use super::Status;
    /// Successful Completion.
    pub const SUCCESS: Status = Status(0);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status::generic(0x01);
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status::generic(0x02);
    /// Data Transfer Error.
    pub const DATA_TRANSFER: Status = Status::generic(0x04);
    /// Internal Error.
    pub const INTERNAL: Status = Status::generic(0x06);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::generic(0x08);
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b);
    /// PRP Offset Invalid.
    pub const PRP_OFFSET_INVALID: Status = Status::generic(0x13);
    /// Namespace is Write Protected.
    pub const WRITE_PROTECTED: Status = Status::generic(0x20);
    /// LBA Out of Range.
    pub const LBA_RANGE: Status = Status::generic(0x80);
    /// Completion Queue Invalid.
    pub const CQ_INVALID: Status = Status::specific(0x00);
    /// Invalid Queue Identifier.
    pub const INVALID_QID: Status = Status::specific(0x01);
    /// Invalid Queue Size.
    pub const INVALID_QSIZE: Status = Status::specific(0x02);
    /// Abort Command Limit Exceeded.
    pub const ABORT_LIMIT: Status = Status::specific(0x03);
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT: Status = Status::specific(0x05);
    /// Invalid Interrupt Vector.
    pub const INVALID_VECTOR: Status = Status::specific(0x08);
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09);
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: Status = Status::specific(0x0c);
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0d);
    /// Write Fault.
    pub const WRITE_FAULT: Status = Status::media(0x80);
    /// Unrecovered Read Error.
    pub const READ_ERROR: Status = Status::media(0x81);
}

/// Asynchronous event types and information.
pub mod aer {
    /// Error status.
    pub const TYPE_ERROR: u8 = 0;
    /// SMART / health status.
    pub const TYPE_SMART: u8 = 1;
    /// Error status: Invalid Doorbell Write Value.
    pub const INFO_INVALID_DOORBELL_VALUE: u8 = 0x01;
    /// Error status: Invalid Doorbell Register (a doorbell of a queue
    /// that does not exist).
    pub const INFO_INVALID_DOORBELL: u8 = 0x00;
}

/// Size of a submission queue entry.
pub const SQE_SIZE: u64 = 64;
/// Size of a completion queue entry.
pub const CQE_SIZE: u64 = 16;

/// A submission queue entry, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Fused operation (bits 9:8 of dword 0).
    pub fuse: u8,
    /// PRP or SGL for Data Transfer (bits 15:14 of dword 0).
    pub psdt: u8,
    /// Command Identifier.
    pub cid: u16,
    /// Namespace Identifier.
    pub nsid: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2.
    pub prp2: u64,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
}

impl Command {
    /// Decodes 64 bytes of a submission queue.
    pub fn parse(b: &[u8; 64]) -> Command {
        let d = |i: usize| u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        let q = |i: usize| u64::from(d(i)) | (u64::from(d(i + 1)) << 32);
        let dw0 = d(0);
        Command {
            opcode: dw0 as u8,
            fuse: ((dw0 >> 8) & 3) as u8,
            psdt: ((dw0 >> 14) & 3) as u8,
            cid: (dw0 >> 16) as u16,
            nsid: d(1),
            mptr: q(4),
            prp1: q(6),
            prp2: q(8),
            cdw: [d(10), d(11), d(12), d(13), d(14), d(15)],
        }
    }

    /// Encodes the entry (for drivers and tests).
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        let dw0 = u32::from(self.opcode)
            | (u32::from(self.fuse & 3) << 8)
            | (u32::from(self.psdt & 3) << 14)
            | (u32::from(self.cid) << 16);
        b[0..4].copy_from_slice(&dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        for (i, w) in self.cdw.iter().enumerate() {
            b[40 + i * 4..44 + i * 4].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Command dword `n` (10 to 15).
    pub fn dw(&self, n: usize) -> u32 {
        n.checked_sub(10).and_then(|i| self.cdw.get(i)).copied().unwrap_or(0)
    }
}

/// A completion queue entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0.
    pub dw0: u32,
    /// SQ head pointer.
    pub sq_head: u16,
    /// SQ identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status (without the phase tag).
    pub status: Status,
    /// Phase tag.
    pub phase: bool,
}

impl Completion {
    /// Encodes the entry.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        b[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.field(self.phase).to_le_bytes());
        b
    }

    /// Decodes an entry (for drivers and tests).
    pub fn parse(b: &[u8; 16]) -> Completion {
        let h = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let field = h(14);
        Completion {
            dw0: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            sq_head: h(8),
            sq_id: h(10),
            cid: h(12),
            status: Status::from_field(field),
            phase: field & 1 != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_fields_come_from_their_dwords() {
        let mut b = [0u8; 64];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8 ^ 0xa5;
        }
        let c = Command::parse(&b);
        let d = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap_or_default());
        assert_eq!(c.opcode, b[0]);
        assert_eq!(c.fuse, (d(0) >> 8) as u8 & 3);
        assert_eq!(c.psdt, (d(0) >> 14) as u8 & 3);
        assert_eq!(c.cid, (d(0) >> 16) as u16);
        assert_eq!(c.nsid, d(1));
        assert_eq!(c.mptr, u64::from(d(4)) | u64::from(d(5)) << 32);
        assert_eq!(c.prp1, u64::from(d(6)) | u64::from(d(7)) << 32);
        assert_eq!(c.prp2, u64::from(d(8)) | u64::from(d(9)) << 32);
        assert_eq!(c.cdw, [d(10), d(11), d(12), d(13), d(14), d(15)]);
        assert_eq!((c.dw(10), c.dw(15), c.dw(9), c.dw(16), c.dw(usize::MAX)), (d(10), d(15), 0, 0, 0));
        // Re-encoding keeps every decoded field; reserved bits (dword 0
        // bits 13:10, dwords 2 and 3) read as zero.
        let again = Command::parse(&c.to_bytes());
        assert_eq!(again, c);
        let e = c.to_bytes();
        assert_eq!(&e[8..16], &[0u8; 8]);
    }

    #[test]
    fn completions_carry_the_phase_tag_apart_from_the_status() {
        for status in [sc::SUCCESS, sc::LBA_RANGE, sc::INVALID_QSIZE, sc::WRITE_FAULT, Status(0x7fff)] {
            for phase in [false, true] {
                let c = Completion { dw0: 0xdead_beef, sq_head: 7, sq_id: 3, cid: 0xffff, status, phase };
                let b = c.to_bytes();
                assert_eq!(b[14] & 1, u8::from(phase));
                assert_eq!(Completion::parse(&b), c);
            }
        }
        assert_eq!((sc::INVALID_QID.sct(), sc::INVALID_QID.sc()), (1, 0x01));
        assert_eq!((sc::LBA_RANGE.sct(), sc::LBA_RANGE.sc()), (0, 0x80));
        assert_eq!((sc::READ_ERROR.sct(), sc::READ_ERROR.sc()), (2, 0x81));
        assert_ne!(sc::INVALID_FIELD.0 & (1 << 14), 0, "errors say Do Not Retry");
    }

    #[test]
    fn cap_says_what_the_controller_does() {
        let cap = cap_value();
        assert_eq!(cap & 0xffff, u64::from(MAX_QUEUE_ENTRIES) - 1);
        assert_eq!((cap >> 16) & 1, 1, "CQR");
        assert_eq!((cap >> 24) & 0xff, CAP_TO);
        assert_eq!((cap >> 32) & 0xf, 0, "DSTRD");
        assert_eq!((cap >> 36) & 1, 0, "NSSRS");
        assert_eq!((cap >> 37) & 0xff, 1, "CSS: NVM only");
        assert_eq!((cap >> 48) & 0xf, 0, "MPSMIN 4 KiB");
        assert_eq!((cap >> 52) & 0xf, 4, "MPSMAX 64 KiB");
    }
}
