//! Admin commands: Identify, Get/Set Features, Create/Delete I/O queues,
//! Get Log Page, Asynchronous Event Request, Abort; and delivering
//! asynchronous events to outstanding requests.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use iommu_core::sync;

use crate::device::DeviceContext;
use crate::dma::{DeviceDma, DmaSpace, Route};

use super::abi::{self, admin as op, cc, feat, log, sc, Command, Completion, Status};
use super::io::transfer;
use super::prp::Fail;
use super::queue::{post, Cq, Scratch, Sq};
use super::Ctrl;

type Outcome = Result<Option<(Status, u32)>, Fail>;

fn done(s: Status) -> Outcome {
    Ok(Some((s, 0)))
}

fn ok(dw0: u32) -> Outcome {
    Ok(Some((sc::SUCCESS, dw0)))
}

/// Runs admin command `cmd` fetched from the admin queue `sq`. `Ok(None)`
/// leaves it outstanding (an Asynchronous Event Request).
pub(super) fn execute(ctrl: &Arc<Ctrl>, ctx: &DeviceContext, sq: &Sq, cmd: &Command, s: &mut Scratch) -> Outcome {
    if cmd.fuse != 0 || cmd.psdt != 0 {
        return done(sc::INVALID_FIELD);
    }
    match cmd.opcode {
        op::IDENTIFY => identify(ctrl, ctx, cmd, s),
        op::SET_FEATURES => set_features(ctrl, cmd),
        op::GET_FEATURES => get_features(ctrl, cmd),
        op::CREATE_CQ => create_cq(ctrl, cmd),
        op::CREATE_SQ => create_sq(ctrl, ctx, cmd),
        op::DELETE_SQ => delete_sq(ctrl, ctx, sq, cmd),
        op::DELETE_CQ => delete_cq(ctrl, cmd),
        op::GET_LOG_PAGE => get_log_page(ctrl, ctx, cmd, s),
        op::ASYNC_EVENT => {
            let mut e = sync::lock(&ctrl.events);
            if e.outstanding.len() > usize::from(abi::AERL) {
                return done(sc::AER_LIMIT);
            }
            e.outstanding.push(cmd.cid);
            Ok(None)
        }
        // Commands run to the end once fetched: nothing is ever aborted
        // (dword 0 bit 0 says so).
        op::ABORT => ok(1),
        op::DBBUF_CONFIG => dbbuf_config(ctrl, ctx, cmd),
        _ => done(sc::INVALID_OPCODE),
    }
}

/// Completes outstanding Asynchronous Event Requests with pending events
/// whose type is not masked (a reported type stays masked until its log
/// page is read).
pub(super) fn deliver_events(ctrl: &Ctrl, ctx: &DeviceContext, sq: &Sq) {
    loop {
        let (cid, dw0) = {
            let mut e = sync::lock(&ctrl.events);
            if e.outstanding.is_empty() {
                return;
            }
            let masked = e.masked;
            let Some(i) = e.pending.iter().position(|d| masked & (1 << (d & 7)) == 0) else { return };
            let Some(dw0) = e.pending.remove(i) else { return };
            e.masked |= 1 << (dw0 & 7);
            (e.outstanding.remove(0), dw0)
        };
        let head = sync::lock(&sq.state).head as u16;
        let c = Completion { dw0, sq_head: head, sq_id: 0, cid, status: sc::SUCCESS, phase: false };
        if post(ctrl, ctx, &sq.cq, c, &sq.stop).is_err() {
            // Not delivered: the request stays outstanding, the event
            // pending, for the next try.
            let mut e = sync::lock(&ctrl.events);
            e.outstanding.insert(0, cid);
            e.pending.push_front(dw0);
            e.masked &= !(1 << (dw0 & 7));
            return;
        }
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// ASCII `s` padded with spaces to `len` bytes at `at`.
fn put_str(b: &mut [u8], at: usize, len: usize, s: &str) {
    let f = &mut b[at..at + len];
    f.fill(b' ');
    let n = s.len().min(len);
    f[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// FNV-1a of `parts`.
fn hash(parts: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The namespace's identifiers, made from the backing file's device and
/// inode: EUI-64, NGUID and UUID (version 8, RFC 9562).
pub(super) fn ns_ids(ctrl: &Ctrl) -> ([u8; 8], [u8; 16], [u8; 16]) {
    let (dev, ino) = ctrl.backing.id();
    let eui = hash(&[dev, ino, 1]).to_be_bytes();
    let mut nguid = [0u8; 16];
    nguid[..8].copy_from_slice(&hash(&[dev, ino, 2]).to_be_bytes());
    nguid[8..].copy_from_slice(&hash(&[dev, ino, 3]).to_be_bytes());
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&hash(&[dev, ino, 4]).to_be_bytes());
    uuid[8..].copy_from_slice(&hash(&[dev, ino, 5]).to_be_bytes());
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    (eui, nguid, uuid)
}

/// The serial number.
pub(super) fn serial(ctrl: &Ctrl) -> String {
    format!("IOASID{:014X}", hash(&[ctrl.backing.id().0, ctrl.backing.id().1]) >> 8)
}

/// Model number.
pub const MODEL: &str = "ioasid-stack NVMe";

fn identify(ctrl: &Ctrl, ctx: &DeviceContext, cmd: &Command, s: &mut Scratch) -> Outcome {
    let cns = cmd.cdw[0] as u8;
    let b = &mut s.buf[..4096];
    b.fill(0);
    match cns {
        // Namespace.
        0x00 => {
            if cmd.nsid != abi::NSID {
                return done(sc::INVALID_NAMESPACE);
            }
            let n = ctrl.backing.blocks();
            put64(b, 0, n);
            put64(b, 8, n);
            put64(b, 16, n);
            // NLBAF 0 (one format), FLBAS 0.
            // DLFEAT: deallocated blocks read as zeroes; Write Zeroes may
            // deallocate.
            b[33] = 0x09;
            // NSATTR: write protected.
            b[99] = u8::from(ctrl.backing.read_only());
            let (eui, nguid, _) = ns_ids(ctrl);
            b[104..120].copy_from_slice(&nguid);
            b[120..128].copy_from_slice(&eui);
            // LBA format 0: no metadata, 2^9-byte blocks, best performance.
            put32(b, 128, abi::LBA_SHIFT << 16);
        }
        // Controller.
        0x01 => identify_ctrl(ctrl, b),
        // Active namespace list: namespaces above NSID.
        0x02 => {
            if cmd.nsid >= 0xffff_fffe {
                return done(sc::INVALID_NAMESPACE);
            }
            if cmd.nsid < abi::NSID {
                put32(b, 0, abi::NSID);
            }
        }
        // Namespace identification descriptors.
        0x03 => {
            if cmd.nsid != abi::NSID {
                return done(sc::INVALID_NAMESPACE);
            }
            let (eui, nguid, uuid) = ns_ids(ctrl);
            let mut at = 0;
            for (t, id) in [(1u8, &eui[..]), (2, &nguid[..]), (3, &uuid[..])] {
                b[at] = t;
                b[at + 1] = id.len() as u8;
                b[at + 4..at + 4 + id.len()].copy_from_slice(id);
                at += 4 + id.len();
            }
        }
        // I/O Command Set Independent Identify Namespace (defined by
        // 2.0; Linux asks for it and falls back to CNS 00h when refused):
        // NSATTR and NSTAT (namespace ready).
        0x08 => {
            if cmd.nsid != abi::NSID {
                return done(sc::INVALID_NAMESPACE);
            }
            b[8] = u8::from(ctrl.backing.read_only());
            b[14] = 1;
        }
        // I/O command set specific controller data of the NVM command
        // set: no limits beyond MDTS (all zero).
        0x06 if (cmd.cdw[1] >> 24) == 0 => {}
        _ => return done(sc::INVALID_FIELD),
    }
    transfer(ctrl, ctx, cmd, 4096, s, true)?;
    ok(0)
}

fn identify_ctrl(ctrl: &Ctrl, b: &mut [u8]) {
    put16(b, 0, 0x1b36);
    put16(b, 2, 0x1b36);
    put_str(b, 4, 20, &serial(ctrl));
    put_str(b, 24, 40, MODEL);
    put_str(b, 64, 8, "1.0");
    // RAB, IEEE OUI (none), CMIC 0.
    b[72] = 6;
    b[77] = abi::MDTS;
    put16(b, 78, 1);
    put32(b, 80, abi::VERSION);
    // CNTRLTYPE: I/O controller.
    b[111] = 1;
    // OACS: Doorbell Buffer Config.
    put16(b, 256, 1 << 8);
    b[258] = abi::ACL;
    b[259] = abi::AERL;
    // FRMW: one slot, read-only.
    b[260] = 0x03;
    // LPA: extended data for Get Log Page (NUMDU, offsets).
    b[261] = 0x04;
    b[262] = (abi::ERROR_LOG_ENTRIES - 1) as u8;
    // NPSS 0: one power state.
    put16(b, 266, super::regs::TEMP_OVER_DEFAULT);
    put16(b, 268, 373);
    // SQES and CQES: 64 and 16 bytes.
    b[512] = 0x66;
    b[513] = 0x44;
    put32(b, 516, abi::NSID);
    // ONCS: Dataset Management, Write Zeroes.
    put16(b, 520, 0x0c);
    // VWC: a volatile write cache is present.
    b[525] = 0x01;
    let nqn = format!("nqn.2026-12.io.ioasid-stack:nvme:{}", serial(ctrl));
    b[768..768 + nqn.len()].copy_from_slice(nqn.as_bytes());
    // Power state 0: 25 W.
    put16(b, 2048, 2500);
}

fn get_log_page(ctrl: &Ctrl, ctx: &DeviceContext, cmd: &Command, s: &mut Scratch) -> Outcome {
    let lid = cmd.cdw[0] as u8;
    let rae = cmd.cdw[0] & (1 << 15) != 0;
    let numd = u64::from(cmd.cdw[0] >> 16) | (u64::from(cmd.cdw[1] & 0xffff) << 16);
    let len = (numd + 1) * 4;
    let offset = u64::from(cmd.cdw[2]) | (u64::from(cmd.cdw[3]) << 32);
    if len > abi::MAX_TRANSFER as u64 || offset & 3 != 0 {
        return done(sc::INVALID_FIELD);
    }
    let mut page = [0u8; 64 * abi::ERROR_LOG_ENTRIES];
    let (size, clears) = match lid {
        log::ERROR => {
            let l = sync::lock(&ctrl.errors);
            for (i, e) in l.entries.iter().enumerate() {
                let b = &mut page[i * 64..(i + 1) * 64];
                put64(b, 0, e.count);
                put16(b, 8, e.sqid);
                put16(b, 10, e.cid);
                put16(b, 12, e.status << 1);
                put16(b, 14, 0xffff);
                put64(b, 16, e.lba);
                put32(b, 24, e.nsid);
            }
            (64 * abi::ERROR_LOG_ENTRIES, Some(abi::aer::TYPE_ERROR))
        }
        log::SMART => {
            if !matches!(cmd.nsid, 0 | abi::NSID | 0xffff_ffff) {
                return done(sc::INVALID_NAMESPACE);
            }
            smart(ctrl, &mut page[..512]);
            (512, Some(abi::aer::TYPE_SMART))
        }
        log::FW_SLOT => {
            page[0] = 1;
            put_str(&mut page, 8, 8, "1.0");
            (512, None)
        }
        _ => return done(sc::INVALID_LOG_PAGE),
    };
    if offset >= size as u64 {
        return done(sc::INVALID_FIELD);
    }
    let len = len as usize;
    let from = offset as usize;
    let n = (size - from).min(len);
    s.buf[..len].fill(0);
    s.buf[..n].copy_from_slice(&page[from..from + n]);
    transfer(ctrl, ctx, cmd, len, s, true)?;
    if let (Some(t), false) = (clears, rae) {
        sync::lock(&ctrl.events).masked &= !(1 << t);
    }
    ok(0)
}

/// Composite temperature reported: 310 K.
const TEMPERATURE: u16 = 310;

fn smart(ctrl: &Ctrl, b: &mut [u8]) {
    let f = *sync::lock(&ctrl.features);
    // Critical warning bit 1: temperature past a threshold.
    b[0] = u8::from(TEMPERATURE >= f.temp_over || TEMPERATURE < f.temp_under) << 1;
    put16(b, 1, TEMPERATURE);
    b[3] = 100;
    b[4] = 10;
    let st = &ctrl.stats;
    // Data units are thousands of 512-byte units, rounded up.
    let units = |bytes: u64| (bytes / 512).div_ceil(1000);
    put64(b, 32, units(st.read_bytes.load(Ordering::Relaxed)));
    put64(b, 48, units(st.written_bytes.load(Ordering::Relaxed)));
    put64(b, 64, st.reads.load(Ordering::Relaxed));
    put64(b, 80, st.writes.load(Ordering::Relaxed));
    put64(b, 112, 1);
    put64(b, 128, ctrl.started.elapsed().as_secs() / 3600);
    put64(b, 160, st.media_errors.load(Ordering::Relaxed));
    put64(b, 176, sync::lock(&ctrl.errors).count);
    put16(b, 200, TEMPERATURE);
}

/// Number of Queues: I/O SQs and CQs allocated, 0's based.
fn queues_dw0() -> u32 {
    let n = u32::from(abi::MAX_IO_QUEUES - 1);
    n | (n << 16)
}

fn set_features(ctrl: &Ctrl, cmd: &Command) -> Outcome {
    let fid = cmd.cdw[0] as u8;
    let save = cmd.cdw[0] & (1 << 31) != 0;
    let v = cmd.cdw[1];
    if save {
        return done(sc::FEATURE_NOT_SAVEABLE);
    }
    let mut f = sync::lock(&ctrl.features);
    match fid {
        feat::ARBITRATION => f.arbitration = v,
        feat::POWER_MGMT => {
            if v & 0x1f != 0 {
                return done(sc::INVALID_FIELD);
            }
            f.power = v & 0xff;
        }
        feat::TEMP_THRESH => {
            // TMPSEL 0 (composite) only; THSEL 0 over, 1 under.
            let tmpsel = (v >> 16) & 0xf;
            let thsel = (v >> 20) & 3;
            if tmpsel != 0 || thsel > 1 {
                return done(sc::INVALID_FIELD);
            }
            if thsel == 0 {
                f.temp_over = v as u16;
            } else {
                f.temp_under = v as u16;
            }
            let crossed = TEMPERATURE >= f.temp_over || TEMPERATURE < f.temp_under;
            let notify = f.async_config & (1 << 1) != 0;
            drop(f);
            if crossed && notify {
                ctrl.event(u32::from(abi::aer::TYPE_SMART) | (0x01 << 8) | (u32::from(log::SMART) << 16));
            }
            return ok(0);
        }
        feat::ERROR_RECOVERY => f.error_recovery = v & 0x1_ffff,
        feat::VOLATILE_WC => {
            ctrl.wce.store(v & 1 != 0, Ordering::Release);
        }
        feat::NUM_QUEUES => {
            if v & 0xffff == 0xffff || v >> 16 == 0xffff {
                return done(sc::INVALID_FIELD);
            }
            return ok(queues_dw0());
        }
        feat::IRQ_COALESCE => f.coalescing = v & 0xffff,
        feat::IRQ_CONFIG => {
            let iv = v & 0xffff;
            if iv >= u32::from(abi::VECTORS) {
                return done(sc::INVALID_FIELD);
            }
            if v & (1 << 16) != 0 {
                f.iv_cd |= 1 << iv;
            } else {
                f.iv_cd &= !(1 << iv);
            }
        }
        feat::WRITE_ATOMICITY => f.write_atomicity = v & 1,
        feat::ASYNC_EVENT => f.async_config = v,
        _ => return done(sc::INVALID_FIELD),
    }
    ok(0)
}

fn get_features(ctrl: &Ctrl, cmd: &Command) -> Outcome {
    let fid = cmd.cdw[0] as u8;
    let sel = (cmd.cdw[0] >> 8) & 7;
    let known = matches!(
        fid,
        feat::ARBITRATION
            | feat::POWER_MGMT
            | feat::TEMP_THRESH
            | feat::ERROR_RECOVERY
            | feat::VOLATILE_WC
            | feat::NUM_QUEUES
            | feat::IRQ_COALESCE
            | feat::IRQ_CONFIG
            | feat::WRITE_ATOMICITY
            | feat::ASYNC_EVENT
    );
    if !known || sel > 3 {
        return done(sc::INVALID_FIELD);
    }
    if sel == 3 {
        // Supported capabilities: changeable, not saveable, not per
        // namespace.
        return ok(if fid == feat::NUM_QUEUES { 0 } else { 1 << 2 });
    }
    let f = if sel == 0 { *sync::lock(&ctrl.features) } else { super::Features::default() };
    let v = match fid {
        feat::ARBITRATION => f.arbitration,
        feat::POWER_MGMT => f.power,
        feat::TEMP_THRESH => {
            let thsel = (cmd.cdw[1] >> 20) & 3;
            if (cmd.cdw[1] >> 16) & 0xf != 0 || thsel > 1 {
                return done(sc::INVALID_FIELD);
            }
            u32::from(if thsel == 0 { f.temp_over } else { f.temp_under })
        }
        feat::ERROR_RECOVERY => f.error_recovery,
        feat::VOLATILE_WC => u32::from(sel != 0 || ctrl.wce.load(Ordering::Acquire)),
        feat::NUM_QUEUES => queues_dw0(),
        feat::IRQ_COALESCE => f.coalescing,
        feat::IRQ_CONFIG => {
            let iv = cmd.cdw[1] & 0xffff;
            if iv >= u32::from(abi::VECTORS) {
                return done(sc::INVALID_FIELD);
            }
            iv | (((f.iv_cd >> iv) & 1) << 16)
        }
        feat::WRITE_ATOMICITY => f.write_atomicity,
        _ => f.async_config,
    };
    ok(v)
}

/// Queue id and 0's based size of a create command.
fn qid_size(cmd: &Command) -> (u16, u32) {
    (cmd.cdw[0] as u16, cmd.cdw[0] >> 16)
}

/// Checks common to both creates, in the order a driver meets them: id,
/// size, base alignment (to CC.MPS), then contiguity and the entry sizes
/// set in CC. The interrupt vector of a CQ is checked by its caller,
/// before contiguity.
fn check_create(ctrl: &Ctrl, cmd: &Command, exists: bool) -> Result<(u16, u32), Status> {
    let (qid, qsize) = qid_size(cmd);
    if qid == 0 || qid > abi::MAX_IO_QUEUES || exists {
        return Err(sc::INVALID_QID);
    }
    if qsize == 0 || qsize >= abi::MAX_QUEUE_ENTRIES {
        return Err(sc::INVALID_QSIZE);
    }
    let page = ctrl.page.load(Ordering::Acquire);
    if cmd.prp1 & (page - 1) != 0 {
        return Err(sc::PRP_OFFSET_INVALID);
    }
    Ok((qid, qsize + 1))
}

/// CAP.CQR: queues must be physically contiguous (CDW11.PC); and CC
/// must say 64-byte SQ and 16-byte CQ entries.
fn check_layout(ctrl: &Ctrl, cmd: &Command) -> Result<(), Status> {
    if cmd.cdw[1] & 1 == 0 {
        return Err(sc::INVALID_FIELD);
    }
    let cc_v = sync::lock(&ctrl.regs).cc;
    if (cc_v >> cc::IOSQES_SHIFT) & 0xf != 6 || (cc_v >> cc::IOCQES_SHIFT) & 0xf != 4 {
        return Err(sc::INVALID_FIELD);
    }
    Ok(())
}

fn create_cq(ctrl: &Ctrl, cmd: &Command) -> Outcome {
    let (qid, _) = qid_size(cmd);
    let exists = sync::read(&ctrl.cqs).get(usize::from(qid)).is_some_and(Option::is_some);
    let (qid, size) = match check_create(ctrl, cmd, exists) {
        Ok(v) => v,
        Err(s) => return done(s),
    };
    let ien = cmd.cdw[1] & 2 != 0;
    let iv = (cmd.cdw[1] >> 16) as u16;
    if iv >= abi::VECTORS {
        return done(sc::INVALID_VECTOR);
    }
    if let Err(s) = check_layout(ctrl, cmd) {
        return done(s);
    }
    ctrl.set_doorbell(qid, true, 0);
    let cq = Arc::new(Cq::new(qid, cmd.prp1, size, iv, ien));
    if let Some((db, ei)) = sync::lock(&ctrl.threads).dbbuf {
        let at = shadow_offset(qid, true);
        cq.shadow.set(db.wrapping_add(at), ei.wrapping_add(at));
    }
    sync::write(&ctrl.cqs)[usize::from(qid)] = Some(cq);
    ok(0)
}

fn create_sq(ctrl: &Arc<Ctrl>, ctx: &DeviceContext, cmd: &Command) -> Outcome {
    let (qid, _) = qid_size(cmd);
    let cqid = (cmd.cdw[1] >> 16) as u16;
    let cq = match sync::read(&ctrl.cqs).get(usize::from(cqid)) {
        Some(Some(cq)) if cqid != 0 => cq.clone(),
        _ => return done(sc::CQ_INVALID),
    };
    let exists = sync::lock(&ctrl.threads).sqs.get(usize::from(qid)).is_some_and(Option::is_some);
    let (qid, size) = match check_create(ctrl, cmd, exists) {
        Ok(v) => v,
        Err(s) => return done(s),
    };
    if let Err(s) = check_layout(ctrl, cmd) {
        return done(s);
    }
    ctrl.set_doorbell(qid, false, 0);
    let sq = Arc::new(Sq::new(qid, cmd.prp1, size, cq));
    if let Some((db, ei)) = sync::lock(&ctrl.threads).dbbuf {
        let at = shadow_offset(qid, false);
        sq.shadow.set(db.wrapping_add(at), ei.wrapping_add(at));
    }
    if !ctrl.spawn_sq(ctx, sq) {
        return done(sc::INTERNAL);
    }
    ok(0)
}

fn delete_sq(ctrl: &Ctrl, ctx: &DeviceContext, admin: &Sq, cmd: &Command) -> Outcome {
    let qid = cmd.cdw[0] as u16;
    if qid == 0 {
        return done(sc::INVALID_QID);
    }
    let Some(sq) = ctrl.stop_sq(qid) else { return done(sc::INVALID_QID) };
    // A command the queue fetched but could not finish is aborted.
    let st = *sync::lock(&sq.state);
    if let Some((c, _)) = st.pending {
        let cqe = Completion {
            dw0: 0,
            sq_head: st.head as u16,
            sq_id: qid,
            cid: c.cid,
            status: sc::ABORTED_SQ_DELETION,
            phase: false,
        };
        let _ = post(ctrl, ctx, &sq.cq, cqe, &admin.stop);
    }
    ok(0)
}

fn delete_cq(ctrl: &Ctrl, cmd: &Command) -> Outcome {
    let qid = cmd.cdw[0] as u16;
    if qid == 0 || sync::read(&ctrl.cqs).get(usize::from(qid)).is_none_or(Option::is_none) {
        return done(sc::INVALID_QID);
    }
    let used = sync::lock(&ctrl.threads).sqs.iter().flatten().any(|(sq, _)| sq.cq.id == qid);
    if used {
        return done(sc::INVALID_QUEUE_DELETION);
    }
    sync::write(&ctrl.cqs)[usize::from(qid)] = None;
    if ctrl.intx_asserted() {
        ctrl.recheck_intx();
    }
    ok(0)
}

/// Offset of a queue's entry in the shadow doorbell and EventIdx buffers:
/// the doorbell's offset in the doorbell area (CAP.DSTRD 0).
fn shadow_offset(qid: u16, cq: bool) -> u64 {
    u64::from(qid) * 8 + if cq { 4 } else { 0 }
}

/// Doorbell Buffer Config: PRP1 is the shadow doorbell buffer and PRP2 the
/// EventIdx buffer, each one memory page, page aligned (else Invalid Field
/// in Command). Every I/O queue, existing or created later, then takes its
/// tail or head from its shadow doorbell (the admin queues keep their
/// registers); an existing queue's shadow doorbell is first written with
/// the value its register holds.
fn dbbuf_config(ctrl: &Ctrl, ctx: &DeviceContext, cmd: &Command) -> Outcome {
    let page = ctrl.page.load(Ordering::Acquire);
    if cmd.prp1 & (page - 1) != 0 || cmd.prp2 & (page - 1) != 0 {
        return done(sc::INVALID_FIELD);
    }
    let (db, ei) = (cmd.prp1, cmd.prp2);
    let space = ctx.dma.space(Route::Rid);
    let mut t = sync::lock(&ctrl.threads);
    t.dbbuf = Some((db, ei));
    let sqs: Vec<Arc<Sq>> = t.sqs.iter().flatten().map(|(sq, _)| sq.clone()).filter(|sq| sq.id != 0).collect();
    drop(t);
    let cqs: Vec<Arc<Cq>> = sync::read(&ctrl.cqs).iter().flatten().filter(|c| c.id != 0).cloned().collect();
    let queues = sqs.iter().map(|q| (q.id, false, &q.shadow)).chain(cqs.iter().map(|q| (q.id, true, &q.shadow)));
    for (qid, cq, shadow) in queues {
        let at = shadow_offset(qid, cq);
        let now = ctrl.doorbell(qid, cq);
        if let Err(e) = space.write(db.wrapping_add(at), &now.to_le_bytes()) {
            tracing::debug!("nvme: shadow doorbell of queue {qid} at {:#x}: {e}", db.wrapping_add(at));
            return Err(super::prp::dma_fail(&e));
        }
        shadow.set(db.wrapping_add(at), ei.wrapping_add(at));
    }
    ok(0)
}
