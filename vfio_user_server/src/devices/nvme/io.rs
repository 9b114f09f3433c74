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

/// The first block and block count of a Read, Write or Write Zeroes,
/// checked against the namespace.
fn range(ctrl: &Ctrl, cmd: &Command) -> Result<(u64, u64), Status> {
    let slba = u64::from(cmd.cdw[0]) | (u64::from(cmd.cdw[1]) << 32);
    let nlb = u64::from(cmd.cdw[2] & 0xffff) + 1;
    match slba.checked_add(nlb) {
        Some(end) if end <= ctrl.backing.blocks() => Ok((slba, nlb)),
        _ => Err(sc::LBA_RANGE),
    }
}

/// Runs NVM command `cmd`.
pub(super) fn execute(
    ctrl: &Ctrl,
    ctx: &DeviceContext,
    cmd: &Command,
    s: &mut Scratch,
) -> Result<Option<(Status, u32)>, Fail> {
    let st = run(ctrl, ctx, cmd, s)?;
    Ok(Some((st, 0)))
}

fn run(ctrl: &Ctrl, ctx: &DeviceContext, cmd: &Command, s: &mut Scratch) -> Result<Status, Fail> {
    if cmd.fuse != 0 || cmd.psdt != 0 {
        return Ok(sc::INVALID_FIELD);
    }
    let known = matches!(cmd.opcode, op::FLUSH | op::WRITE | op::READ | op::WRITE_ZEROES | op::DSM);
    if !known {
        return Ok(sc::INVALID_OPCODE);
    }
    // Flush may name every namespace.
    if cmd.nsid != NSID && !(cmd.opcode == op::FLUSH && cmd.nsid == 0xffff_ffff) {
        return Ok(sc::INVALID_NAMESPACE);
    }
    let writes =
        matches!(cmd.opcode, op::WRITE | op::WRITE_ZEROES) || (cmd.opcode == op::DSM && cmd.cdw[1] & (1 << 2) != 0);
    if writes && ctrl.backing.read_only() {
        return Ok(sc::WRITE_PROTECTED);
    }
    let b = &ctrl.backing;
    let stats = &ctrl.stats;
    match cmd.opcode {
        op::FLUSH => Ok(durable(ctrl, true)),
        op::READ | op::WRITE => {
            let (slba, nlb) = match range(ctrl, cmd) {
                Ok(r) => r,
                Err(e) => return Ok(e),
            };
            let len = (nlb << LBA_SHIFT) as usize;
            if len > MAX_TRANSFER {
                return Ok(sc::INVALID_FIELD);
            }
            let off = slba << LBA_SHIFT;
            if cmd.opcode == op::READ {
                if let Err(e) = b.read(off, &mut s.buf[..len]) {
                    tracing::debug!("nvme: read of {len} bytes at {off:#x}: {e}");
                    stats.media_errors.fetch_add(1, Ordering::Relaxed);
                    return Ok(sc::READ_ERROR);
                }
                transfer(ctrl, ctx, cmd, len, s, true)?;
                stats.reads.fetch_add(1, Ordering::Relaxed);
                stats.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
                Ok(sc::SUCCESS)
            } else {
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
                // Force Unit Access, or no volatile write cache.
                let fua = cmd.cdw[2] & (1 << 30) != 0;
                Ok(durable(ctrl, fua))
            }
        }
        op::WRITE_ZEROES => {
            let (slba, nlb) = match range(ctrl, cmd) {
                Ok(r) => r,
                Err(e) => return Ok(e),
            };
            let deac = cmd.cdw[2] & (1 << 25) != 0;
            if let Err(e) = b.zero(slba << LBA_SHIFT, nlb << LBA_SHIFT, deac) {
                tracing::debug!("nvme: write zeroes of {nlb} blocks at {slba}: {e}");
                return Ok(sc::WRITE_FAULT);
            }
            Ok(durable(ctrl, cmd.cdw[2] & (1 << 30) != 0))
        }
        _ => dsm(ctrl, ctx, cmd, s),
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

/// Dataset Management: with Attribute Deallocate, each range is checked
/// against the namespace and then deallocated (a hole in the file, which
/// reads as zeroes); other attributes are hints and do nothing.
fn dsm(ctrl: &Ctrl, ctx: &DeviceContext, cmd: &Command, s: &mut Scratch) -> Result<Status, Fail> {
    if cmd.cdw[1] & (1 << 2) == 0 {
        return Ok(sc::SUCCESS);
    }
    let nr = (cmd.cdw[0] & 0xff) as usize + 1;
    transfer(ctrl, ctx, cmd, nr * 16, s, false)?;
    let blocks = ctrl.backing.blocks();
    let mut ranges = [(0u64, 0u64); 256];
    for (i, r) in s.buf[..nr * 16].chunks_exact(16).enumerate() {
        let nlb = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
        let mut w = [0u8; 8];
        w.copy_from_slice(&r[8..16]);
        let slba = u64::from_le_bytes(w);
        if slba.checked_add(nlb).is_none_or(|e| e > blocks) {
            return Ok(sc::LBA_RANGE);
        }
        ranges[i] = (slba, nlb);
    }
    for &(slba, nlb) in &ranges[..nr] {
        if nlb == 0 {
            continue;
        }
        if let Err(e) = ctrl.backing.zero(slba << LBA_SHIFT, nlb << LBA_SHIFT, true) {
            tracing::debug!("nvme: deallocate of {nlb} blocks at {slba}: {e}");
            return Ok(sc::WRITE_FAULT);
        }
    }
    Ok(sc::SUCCESS)
}
