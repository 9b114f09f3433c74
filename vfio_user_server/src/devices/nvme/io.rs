//! NVM commands: Read, Write, Flush, Write Zeroes, Dataset Management;
//! and moving a command's data between guest memory (through the
//! translation unit, range by range as its PRPs say) and the queue
//! thread's buffer.

use std::sync::atomic::Ordering;

use crate::device::DeviceContext;
use crate::dma::{DeviceDma, DmaSpace, Route};

use super::abi::{io as op, sc, Command, Status, LBA_SHIFT, MAX_TRANSFER, NSID};
use super::prp::{dma_fail, walk, Fail};
use super::queue::Scratch;
use super::Ctrl;

/// Moves `len` bytes between the command's data buffer (its PRPs) and
/// `s.buf[..len]`: to the host if `to_host`, else from it.
pub(super) fn transfer(
    ctrl: &Ctrl,
    ctx: &DeviceContext,
    cmd: &Command,
    len: usize,
    s: &mut Scratch,
    to_host: bool,
) -> Result<(), Fail> {
    if len > s.buf.len() {
        return Err(sc::INVALID_FIELD.into());
    }
    let space = ctx.dma.space(Route::Rid);
    let page = ctrl.page.load(Ordering::Acquire);
    walk(&space, cmd.prp1, cmd.prp2, len, page, &mut s.segs)?;
    let mut at = 0;
    for &(iova, n) in &s.segs {
        let chunk = &mut s.buf[at..at + n];
        let r = if to_host { space.write(iova, chunk) } else { space.read(iova, chunk) };
        r.map_err(|e| dma_fail(&e))?;
        at += n;
    }
    Ok(())
}

/// An NVM command whose fields were checked against the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Flush.
    Flush,
    /// Read `nlb` blocks from `slba`.
    Read {
        /// First block.
        slba: u64,
        /// Blocks.
        nlb: u64,
    },
    /// Write `nlb` blocks at `slba`; `fua` makes them durable first.
    Write {
        /// First block.
        slba: u64,
        /// Blocks.
        nlb: u64,
        /// Force Unit Access.
        fua: bool,
    },
    /// Write Zeroes over `nlb` blocks at `slba`, deallocating them if
    /// `deallocate`.
    WriteZeroes {
        /// First block.
        slba: u64,
        /// Blocks.
        nlb: u64,
        /// Deallocate (DEAC).
        deallocate: bool,
        /// Force Unit Access.
        fua: bool,
    },
    /// Dataset Management with Attribute Deallocate over `ranges` ranges
    /// (their list is the command's data).
    Deallocate {
        /// Number of ranges, 1 to 256.
        ranges: usize,
    },
    /// Dataset Management with hints only: nothing to do.
    Hint,
}

/// Checks NVM command `cmd` against a namespace of `blocks` blocks
/// (`read_only` if write protected): the status the specification names
/// for the first field that is wrong, else what to do.
pub fn decode(cmd: &Command, blocks: u64, read_only: bool) -> Result<IoOp, Status> {
    if cmd.fuse != 0 || cmd.psdt != 0 {
        return Err(sc::INVALID_FIELD);
    }
    if !matches!(cmd.opcode, op::FLUSH | op::WRITE | op::READ | op::WRITE_ZEROES | op::DSM) {
        return Err(sc::INVALID_OPCODE);
    }
    // Flush may name every namespace.
    if cmd.nsid != NSID && !(cmd.opcode == op::FLUSH && cmd.nsid == 0xffff_ffff) {
        return Err(sc::INVALID_NAMESPACE);
    }
    let deallocate = cmd.cdw[1] & (1 << 2) != 0;
    let writes = matches!(cmd.opcode, op::WRITE | op::WRITE_ZEROES) || (cmd.opcode == op::DSM && deallocate);
    if writes && read_only {
        return Err(sc::WRITE_PROTECTED);
    }
    let slba = u64::from(cmd.cdw[0]) | (u64::from(cmd.cdw[1]) << 32);
    let nlb = u64::from(cmd.cdw[2] & 0xffff) + 1;
    let fua = cmd.cdw[2] & (1 << 30) != 0;
    let in_range = slba.checked_add(nlb).is_some_and(|end| end <= blocks);
    match cmd.opcode {
        op::FLUSH => Ok(IoOp::Flush),
        op::READ | op::WRITE => {
            if (nlb << LBA_SHIFT) as usize > MAX_TRANSFER {
                return Err(sc::INVALID_FIELD);
            }
            if !in_range {
                return Err(sc::LBA_RANGE);
            }
            Ok(if cmd.opcode == op::READ { IoOp::Read { slba, nlb } } else { IoOp::Write { slba, nlb, fua } })
        }
        op::WRITE_ZEROES => {
            if !in_range {
                return Err(sc::LBA_RANGE);
            }
            Ok(IoOp::WriteZeroes { slba, nlb, deallocate: cmd.cdw[2] & (1 << 25) != 0, fua })
        }
        _ if deallocate => Ok(IoOp::Deallocate { ranges: (cmd.cdw[0] & 0xff) as usize + 1 }),
        _ => Ok(IoOp::Hint),
    }
}

/// The ranges `(slba, nlb)` of a Dataset Management range list (16 bytes
/// each: context attributes, length in blocks, starting LBA), each checked
/// against a namespace of `blocks` blocks, into `out` (cleared first).
pub fn dsm_ranges(list: &[u8], blocks: u64, out: &mut Vec<(u64, u64)>) -> Result<(), Status> {
    out.clear();
    for r in list.chunks_exact(16) {
        let nlb = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
        let slba = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
        if slba.checked_add(nlb).is_none_or(|e| e > blocks) {
            return Err(sc::LBA_RANGE);
        }
        out.push((slba, nlb));
    }
    Ok(())
}

/// Runs NVM command `cmd`.
pub(super) fn execute(
    ctrl: &Ctrl,
    ctx: &DeviceContext,
    cmd: &Command,
    s: &mut Scratch,
) -> Result<Option<(Status, u32)>, Fail> {
    let st = match decode(cmd, ctrl.backing.blocks(), ctrl.backing.read_only()) {
        Ok(o) => run(ctrl, ctx, cmd, o, s)?,
        Err(st) => st,
    };
    Ok(Some((st, 0)))
}

fn run(ctrl: &Ctrl, ctx: &DeviceContext, cmd: &Command, o: IoOp, s: &mut Scratch) -> Result<Status, Fail> {
    let b = &ctrl.backing;
    let stats = &ctrl.stats;
    match o {
        IoOp::Flush => Ok(durable(ctrl, true)),
        IoOp::Hint => Ok(sc::SUCCESS),
        IoOp::Read { slba, nlb } => {
            let len = (nlb << LBA_SHIFT) as usize;
            let off = slba << LBA_SHIFT;
            if let Err(e) = b.read(off, &mut s.buf[..len]) {
                tracing::debug!("nvme: read of {len} bytes at {off:#x}: {e}");
                stats.media_errors.fetch_add(1, Ordering::Relaxed);
                return Ok(sc::READ_ERROR);
            }
            transfer(ctrl, ctx, cmd, len, s, true)?;
            stats.reads.fetch_add(1, Ordering::Relaxed);
            stats.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
            Ok(sc::SUCCESS)
        }
        IoOp::Write { slba, nlb, fua } => {
            let len = (nlb << LBA_SHIFT) as usize;
            let off = slba << LBA_SHIFT;
            // All of the data is read from the guest before the first
            // byte goes to the file: a write stopped or faulting part
            // way writes nothing.
            transfer(ctrl, ctx, cmd, len, s, false)?;
            if let Err(e) = b.write(off, &s.buf[..len]) {
                tracing::debug!("nvme: write of {len} bytes at {off:#x}: {e}");
                stats.media_errors.fetch_add(1, Ordering::Relaxed);
                return Ok(sc::WRITE_FAULT);
            }
            stats.writes.fetch_add(1, Ordering::Relaxed);
            stats.written_bytes.fetch_add(len as u64, Ordering::Relaxed);
            Ok(durable(ctrl, fua))
        }
        IoOp::WriteZeroes { slba, nlb, deallocate, fua } => {
            match b.zero(slba << LBA_SHIFT, nlb << LBA_SHIFT, deallocate, &|| ctrl.stopping()) {
                Ok(()) => {}
                // Stopped by a reset or a migration stop: run again later
                // (zeroing twice is zeroing once), or dropped.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Err(Fail::Stop),
                Err(e) => {
                    tracing::debug!("nvme: write zeroes of {nlb} blocks at {slba}: {e}");
                    return Ok(sc::WRITE_FAULT);
                }
            }
            Ok(durable(ctrl, fua))
        }
        IoOp::Deallocate { ranges } => deallocate(ctrl, ctx, cmd, ranges, s),
    }
}

/// Success once what was written is durable, if `force` or the volatile
/// write cache is off.
fn durable(ctrl: &Ctrl, force: bool) -> Status {
    if force || !ctrl.wce.load(Ordering::Acquire) {
        if let Err(e) = ctrl.backing.flush() {
            tracing::warn!("nvme: fdatasync failed: {e}");
            return sc::WRITE_FAULT;
        }
    }
    sc::SUCCESS
}

/// Dataset Management with Attribute Deallocate: every range is checked
/// against the namespace first, then each is deallocated (a hole in the
/// file, which reads as zeroes).
fn deallocate(ctrl: &Ctrl, ctx: &DeviceContext, cmd: &Command, nr: usize, s: &mut Scratch) -> Result<Status, Fail> {
    transfer(ctrl, ctx, cmd, nr * 16, s, false)?;
    let mut ranges = Vec::with_capacity(nr);
    let checked = dsm_ranges(&s.buf[..nr * 16], ctrl.backing.blocks(), &mut ranges);
    let mut st = sc::SUCCESS;
    match checked {
        Err(e) => st = e,
        Ok(()) => {
            for &(slba, nlb) in ranges.iter().filter(|r| r.1 != 0) {
                match ctrl.backing.zero(slba << LBA_SHIFT, nlb << LBA_SHIFT, true, &|| ctrl.stopping()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Err(Fail::Stop),
                    Err(e) => {
                        tracing::debug!("nvme: deallocate of {nlb} blocks at {slba}: {e}");
                        st = sc::WRITE_FAULT;
                        break;
                    }
                }
            }
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(opcode: u8, slba: u64, nlb0: u32) -> Command {
        Command { opcode, nsid: NSID, cdw: [slba as u32, (slba >> 32) as u32, nlb0, 0, 0, 0], ..Command::default() }
    }

    #[test]
    fn ranges_past_the_end_and_wrapping_ranges_are_lba_out_of_range() {
        let blocks = 1000;
        assert_eq!(decode(&rw(op::READ, 0, 0), blocks, false), Ok(IoOp::Read { slba: 0, nlb: 1 }));
        assert_eq!(decode(&rw(op::READ, 999, 0), blocks, false), Ok(IoOp::Read { slba: 999, nlb: 1 }));
        assert_eq!(decode(&rw(op::READ, 1000, 0), blocks, false), Err(sc::LBA_RANGE));
        assert_eq!(decode(&rw(op::WRITE, 999, 1), blocks, false), Err(sc::LBA_RANGE));
        // SLBA + NLB wraps past 2^64.
        assert_eq!(decode(&rw(op::READ, u64::MAX, 0), blocks, false), Err(sc::LBA_RANGE));
        assert_eq!(decode(&rw(op::WRITE_ZEROES, u64::MAX - 3, 0xffff), u64::MAX, false), Err(sc::LBA_RANGE));
        // Write Zeroes is not bound by MDTS; Read and Write are.
        let wz = decode(&rw(op::WRITE_ZEROES, 0, 0xffff), 1 << 20, false);
        assert_eq!(wz, Ok(IoOp::WriteZeroes { slba: 0, nlb: 0x1_0000, deallocate: false, fua: false }));
        let most = (MAX_TRANSFER >> LBA_SHIFT) as u32;
        assert!(decode(&rw(op::READ, 0, most - 1), 1 << 20, false).is_ok());
        assert_eq!(decode(&rw(op::READ, 0, most), 1 << 20, false), Err(sc::INVALID_FIELD));
        // Upper bits of CDW12 (FUA, DEAC, PRINFO) do not widen NLB.
        let mut c = rw(op::WRITE, 10, 0xffff_0007);
        c.cdw[2] = (1 << 30) | 7;
        assert_eq!(decode(&c, blocks, false), Ok(IoOp::Write { slba: 10, nlb: 8, fua: true }));
    }

    #[test]
    fn opcodes_namespaces_fused_sgl_and_write_protection() {
        assert_eq!(decode(&rw(0x7f, 0, 0), 10, false), Err(sc::INVALID_OPCODE));
        assert_eq!(decode(&rw(0x05, 0, 0), 10, false), Err(sc::INVALID_OPCODE), "Compare is not offered");
        for nsid in [0, 2, 0xffff_fffe, 0xffff_ffff] {
            let mut c = rw(op::READ, 0, 0);
            c.nsid = nsid;
            assert_eq!(decode(&c, 10, false), Err(sc::INVALID_NAMESPACE), "nsid {nsid:#x}");
        }
        let mut f = rw(op::FLUSH, 0, 0);
        f.nsid = 0xffff_ffff;
        assert_eq!(decode(&f, 10, false), Ok(IoOp::Flush));
        let mut c = rw(op::READ, 0, 0);
        c.fuse = 1;
        assert_eq!(decode(&c, 10, false), Err(sc::INVALID_FIELD));
        c.fuse = 0;
        c.psdt = 2;
        assert_eq!(decode(&c, 10, false), Err(sc::INVALID_FIELD));
        assert_eq!(decode(&rw(op::WRITE, 0, 0), 10, true), Err(sc::WRITE_PROTECTED));
        assert_eq!(decode(&rw(op::WRITE_ZEROES, 0, 0), 10, true), Err(sc::WRITE_PROTECTED));
        assert!(decode(&rw(op::READ, 0, 0), 10, true).is_ok());
        let mut dsm = rw(op::DSM, 0xff, 1 << 2);
        dsm.cdw = [0xff, 1 << 2, 0, 0, 0, 0];
        assert_eq!(decode(&dsm, 10, false), Ok(IoOp::Deallocate { ranges: 256 }));
        assert_eq!(decode(&dsm, 10, true), Err(sc::WRITE_PROTECTED));
        dsm.cdw[1] = 1;
        assert_eq!(decode(&dsm, 10, true), Ok(IoOp::Hint), "a hint writes nothing");
    }

    #[test]
    fn dataset_management_ranges_are_checked_before_any_is_used() {
        let range = |nlb: u32, slba: u64| {
            let mut r = [0u8; 16];
            r[4..8].copy_from_slice(&nlb.to_le_bytes());
            r[8..16].copy_from_slice(&slba.to_le_bytes());
            r
        };
        let mut out = Vec::new();
        let list = [range(8, 0), range(0, 99), range(2, 98)].concat();
        assert_eq!(dsm_ranges(&list, 100, &mut out), Ok(()));
        assert_eq!(out, vec![(0, 8), (99, 0), (98, 2)]);
        let list = [range(8, 0), range(3, 98)].concat();
        assert_eq!(dsm_ranges(&list, 100, &mut out), Err(sc::LBA_RANGE));
        let list = range(u32::MAX, u64::MAX - 1);
        assert_eq!(dsm_ranges(&list, u64::MAX, &mut out), Err(sc::LBA_RANGE));
        // A short tail (not a whole range) is ignored, never read past.
        assert_eq!(dsm_ranges(&[0u8; 15], 100, &mut out), Ok(()));
        assert!(out.is_empty());
    }
}
