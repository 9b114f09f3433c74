//! BAR 0: the controller registers and the CC/CSTS state machine
//! (enable, disable, shutdown), and the doorbells reached by REGION_WRITE.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use iommu_core::sync;

use crate::device::{reg_merge, reg_read, DeviceContext, Errno};

use super::abi::{cap_value, cc, csts, reg, MAX_IO_QUEUES, MAX_QUEUE_ENTRIES, VERSION};
use super::queue::{Cq, Sq};
use super::{bell_offset, Ctrl};

/// Over Temperature Threshold at reset: 343 K (70 °C).
pub(super) const TEMP_OVER_DEFAULT: u16 = 343;

/// The registers a host writes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Regs {
    pub(super) cc: u32,
    /// RDY and SHST (CFS comes from the controller's fatal flag).
    pub(super) csts: u32,
    pub(super) intms: u32,
    pub(super) aqa: u32,
    pub(super) asq: u64,
    pub(super) acq: u64,
}

/// CSTS as read.
pub(super) fn csts(ctrl: &Ctrl, r: &Regs) -> u32 {
    r.csts | if ctrl.fatal.load(Ordering::Acquire) { csts::CFS } else { 0 }
}

/// The 8-byte register word at `base` (8-aligned).
fn word(ctrl: &Ctrl, r: &Regs, base: u64) -> u64 {
    match base {
        reg::CAP => cap_value(),
        0x08 => u64::from(VERSION) | (u64::from(r.intms) << 32),
        0x10 => u64::from(r.intms) | (u64::from(r.cc) << 32),
        0x18 => u64::from(csts(ctrl, r)) << 32,
        0x20 => u64::from(r.aqa) << 32,
        reg::ASQ => r.asq,
        reg::ACQ => r.acq,
        _ => 0,
    }
}

/// A read of BAR 0.
pub(super) fn read(ctrl: &Ctrl, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
    let base = offset & !7;
    let off = offset - base;
    if off as usize + buf.len() > 8 {
        return Err(libc::EINVAL);
    }
    if offset >= reg::DOORBELL {
        // Doorbells read back what was written (hosts do not read them).
        let mut v = 0u64;
        for half in 0..2u64 {
            if let Some(rel) = (base + half * 4).checked_sub(reg::DOORBELL) {
                let qid = rel / 8;
                if qid <= u64::from(MAX_IO_QUEUES) {
                    v |= u64::from(ctrl.doorbell(qid as u16, rel % 8 == 4)) << (32 * half);
                }
            }
        }
        reg_read(v, off, buf);
        return Ok(());
    }
    let r = sync::lock(&ctrl.regs);
    reg_read(word(ctrl, &r, base), off, buf);
    Ok(())
}

/// A write of BAR 0: each 32-bit register the bytes touch gets its new
/// value (64-bit ASQ and ACQ take either half).
pub(super) fn write(ctrl: &Arc<Ctrl>, ctx: &DeviceContext, offset: u64, data: &[u8]) -> Result<(), Errno> {
    let base = offset & !7;
    let off = offset - base;
    if off as usize + data.len() > 8 || data.is_empty() {
        return Err(libc::EINVAL);
    }
    let written = reg_merge(0, off, data);
    let mask = reg_merge(0, off, &[0xff; 8][..data.len()]);
    if offset >= reg::DOORBELL {
        for half in 0..2u64 {
            let m = (mask >> (32 * half)) as u32;
            if m == 0 {
                continue;
            }
            let at = base + half * 4;
            let old = doorbell_at(ctrl, at).unwrap_or(0);
            let v = (old & !m) | ((written >> (32 * half)) as u32 & m);
            doorbell_write(ctrl, at, v);
        }
        return Ok(());
    }
    for half in 0..2u64 {
        let m = (mask >> (32 * half)) as u32;
        if m == 0 {
            continue;
        }
        let at = base + half * 4;
        let bits = (written >> (32 * half)) as u32;
        reg_write(ctrl, ctx, at, bits, m);
    }
    Ok(())
}

fn doorbell_at(ctrl: &Ctrl, at: u64) -> Option<u32> {
    let rel = at.checked_sub(reg::DOORBELL)?;
    let qid = u16::try_from(rel / 8).ok().filter(|q| *q <= MAX_IO_QUEUES)?;
    Some(ctrl.doorbell(qid, rel % 8 == 4))
}

/// A doorbell written by REGION_WRITE: stored where a mapping would have
/// put it, and the queue's thread kicked. A doorbell of a queue that does
/// not exist raises an Invalid Doorbell Register event.
fn doorbell_write(ctrl: &Ctrl, at: u64, v: u32) {
    let rel = at - reg::DOORBELL;
    let qid = rel / 8;
    let cq = rel % 8 == 4;
    let exists = qid <= u64::from(MAX_IO_QUEUES) && {
        let q = qid as u16;
        if cq {
            sync::read(&ctrl.cqs).get(usize::from(q)).is_some_and(Option::is_some)
        } else {
            sync::lock(&ctrl.threads).sqs.get(usize::from(q)).is_some_and(Option::is_some)
        }
    };
    if !exists {
        if sync::lock(&ctrl.regs).csts & csts::RDY != 0 {
            ctrl.event(
                u32::from(super::abi::aer::TYPE_ERROR)
                    | (u32::from(super::abi::aer::INFO_INVALID_DOORBELL) << 8)
                    | (u32::from(super::abi::log::ERROR) << 16),
            );
        }
        return;
    }
    let q = qid as u16;
    ctrl.set_doorbell(q, cq, v);
    if cq {
        if ctrl.intx_asserted() {
            ctrl.recheck_intx();
        }
    } else {
        ctrl.kick_sq(q);
    }
    debug_assert_eq!(bell_offset(q, cq), at);
}

/// A write of the 32-bit register at `at`: bits `bits` under mask `m`.
fn reg_write(ctrl: &Arc<Ctrl>, ctx: &DeviceContext, at: u64, bits: u32, m: u32) {
    let mut r = sync::lock(&ctrl.regs);
    let merge = |old: u32| (old & !m) | (bits & m);
    match at {
        reg::INTMS => {
            r.intms |= bits & m;
            drop(r);
            if ctrl.intx_asserted() {
                ctrl.recheck_intx();
            }
        }
        reg::INTMC => {
            let cleared = bits & m & r.intms;
            r.intms &= !(bits & m);
            drop(r);
            ctrl.release_msi(cleared);
            ctrl.recheck_intx();
        }
        reg::CC => {
            let new = merge(r.cc) & cc::WRITABLE;
            let old = r.cc;
            r.cc = new;
            drop(r);
            cc_changed(ctrl, ctx, old, new);
        }
        0x24 => r.aqa = merge(r.aqa) & 0x0fff_0fff,
        0x28 => r.asq = (r.asq & !u64::from(m)) | u64::from(bits & m & 0xffff_f000),
        0x2c => r.asq = (r.asq & !(u64::from(m) << 32)) | (u64::from(bits & m) << 32),
        0x30 => r.acq = (r.acq & !u64::from(m)) | u64::from(bits & m & 0xffff_f000),
        0x34 => r.acq = (r.acq & !(u64::from(m) << 32)) | (u64::from(bits & m) << 32),
        _ => {}
    }
}

/// CC went from `old` to `new`.
fn cc_changed(ctrl: &Arc<Ctrl>, ctx: &DeviceContext, old: u32, new: u32) {
    let was = old & cc::EN != 0;
    let en = new & cc::EN != 0;
    if was && !en {
        // Controller reset: queues deleted after the commands in flight
        // ended, then RDY clears. AQA, ASQ and ACQ stay.
        ctrl.reset_state();
        let mut r = sync::lock(&ctrl.regs);
        r.csts = 0;
        r.intms = 0;
        return;
    }
    if !was && en {
        enable(ctrl, ctx, new);
        return;
    }
    let shn = (new >> cc::SHN_SHIFT) & 3;
    if en && shn != 0 && (old >> cc::SHN_SHIFT) & 3 == 0 {
        // Shutdown: the queues stop after their commands in flight, what
        // was written is made durable, then SHST says complete.
        sync::lock(&ctrl.regs).csts |= 1 << csts::SHST_SHIFT;
        ctrl.stop_all();
        if let Err(e) = ctrl.backing.flush() {
            tracing::warn!("nvme: flush at shutdown failed: {e}");
        }
        let mut r = sync::lock(&ctrl.regs);
        r.csts = (r.csts & !(3 << csts::SHST_SHIFT)) | csts::SHST_COMPLETE;
    } else if shn == 0 && (old >> cc::SHN_SHIFT) & 3 != 0 {
        // A new enable after shutdown goes through EN; clearing SHN alone
        // only ends the shutdown status.
        sync::lock(&ctrl.regs).csts &= !(3 << csts::SHST_SHIFT);
    }
}

/// CC.EN 0 → 1: checks the configuration and the admin queue registers,
/// creates the admin queues and their thread, and sets RDY. A
/// configuration the controller does not support leaves RDY clear and sets
/// CFS.
fn enable(ctrl: &Arc<Ctrl>, ctx: &DeviceContext, cc_v: u32) {
    let r = *sync::lock(&ctrl.regs);
    let css = (cc_v >> cc::CSS_SHIFT) & 7;
    let mps = (cc_v >> cc::MPS_SHIFT) & 0xf;
    let ams = (cc_v >> cc::AMS_SHIFT) & 7;
    let sqs = (r.aqa & 0xfff) + 1;
    let cqs = ((r.aqa >> 16) & 0xfff) + 1;
    let ok = css == 0
        && mps <= 4
        && ams == 0
        && (2..=MAX_QUEUE_ENTRIES).contains(&sqs)
        && (2..=MAX_QUEUE_ENTRIES).contains(&cqs)
        && r.asq != 0
        && r.acq != 0;
    if !ok {
        tracing::debug!("nvme: enable refused: CC {cc_v:#x} AQA {:#x} ASQ {:#x} ACQ {:#x}", r.aqa, r.asq, r.acq);
        ctrl.set_fatal();
        return;
    }
    ctrl.page.store(4096 << mps, Ordering::Release);
    ctrl.fatal.store(false, Ordering::Release);
    let cq = Arc::new(Cq::new(0, r.acq, cqs, 0, true));
    sync::write(&ctrl.cqs)[0] = Some(cq.clone());
    let sq = Arc::new(Sq::new(0, r.asq, sqs, cq));
    if ctrl.spawn_sq(ctx, sq) {
        let mut r = sync::lock(&ctrl.regs);
        r.csts = (r.csts & !(3 << csts::SHST_SHIFT)) | csts::RDY;
    } else {
        ctrl.set_fatal();
    }
}
