//! `dma-engine`: a PASID-capable DMA engine with several work queues,
//! descriptors that carry a vPASID, completion records written by DMA,
//! an interrupt per completion, and doorbells in an mmap-able BAR. The
//! register interface is in `docs/devices/dma-engine.md`.
//!
//! Each queue has its own engine thread: a fault, a vPASID without a map
//! or a bad descriptor ends that descriptor with an error status (and a
//! fault record in the core) while the other queues keep running. The
//! server's vPASID map is the mediation path: a descriptor's vPASID
//! becomes the pPASID the core routes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use iommu_core::sync;
use iommu_core::types::{DeviceCaps, FaultReason};
use memmap2::MmapRaw;
use serde::{Deserialize, Serialize};

use crate::device::{reg_merge, reg_read, Device, DeviceContext, DeviceDesc, Errno, MmapDesc, MsixDesc, RegionDesc};
use crate::dma::{self, Route};
use crate::irq::IrqLayout;
use crate::pci::{BarKind, PciConfig, PciIds};
use crate::proto::SparseArea;

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from(le32(b, o)) | (u64::from(le32(b, o + 4)) << 32)
}

impl Descriptor {
    /// Parses the 64 bytes of a descriptor (any bytes are a descriptor;
    /// validity is checked when it runs).
    pub fn parse(b: &[u8; 64]) -> Descriptor {
        Descriptor {
            opcode: b[0],
            flags: b[1],
            pasid: le32(b, 4),
            len: le32(b, 8),
            src: le64(b, 0x10),
            dst: le64(b, 0x18),
            completion: le64(b, 0x20),
            pattern: le64(b, 0x28),
        }
    }

    /// The 64 bytes of this descriptor.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.pasid.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[0x10..0x18].copy_from_slice(&self.src.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&self.dst.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&self.completion.to_le_bytes());
        b[0x28..0x30].copy_from_slice(&self.pattern.to_le_bytes());
        b
    }

    fn route(&self) -> Result<Route, u8> {
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

impl Completion {
    /// Parses a record.
    pub fn parse(b: &[u8]) -> Option<Completion> {
        if b.len() < COMPLETION_SIZE {
            return None;
        }
        Some(Completion { status: b[0], bytes_done: le32(b, 4), fault_addr: le64(b, 8), result: le64(b, 16) })
    }

    fn to_bytes(self) -> [u8; COMPLETION_SIZE] {
        let mut b = [0u8; COMPLETION_SIZE];
        b[0] = self.status;
        b[4..8].copy_from_slice(&self.bytes_done.to_le_bytes());
        b[8..16].copy_from_slice(&self.fault_addr.to_le_bytes());
        b[16..24].copy_from_slice(&self.result.to_le_bytes());
        b
    }
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct QueueRegs {
    ring_base: u64,
    ring_size: u32,
    ring_pasid: u32,
    ctrl: u32,
    head: u32,
    tail: u32,
    halted: bool,
    completed: u64,
    errors: u32,
    /// Bumped at each enable/disable: work fetched before it is void.
    epoch: u32,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Regs {
    enabled: bool,
    intx_status: u32,
    queues: [QueueRegs; QUEUES],
}

struct Shared {
    regs: Mutex<Regs>,
    /// Read-held while a descriptor runs; a stop takes it for writing.
    gate: RwLock<bool>,
    kick: Mutex<u64>,
    kicked: Condvar,
    /// The doorbell page (swapped for a fresh one when a client leaves).
    doorbells: RwLock<MmapRaw>,
    stop: std::sync::atomic::AtomicBool,
    busy: [AtomicU32; QUEUES],
    generation: AtomicU64,
}

impl Shared {
    fn doorbell(&self, q: usize) -> u32 {
        let m = sync::read(&self.doorbells);
        let p = m.as_mut_ptr();
        // SAFETY: the mapping is 4 KiB of a memfd sealed against shrinking
        // and lives while the read guard is held; slot q (q < QUEUES) is
        // 8-byte aligned inside it. The client may write it at any time
        // through its own mapping, so it is read atomically.
        unsafe { (*(p.add(q * 8) as *const AtomicU32)).load(Ordering::Acquire) }
    }

    fn set_doorbell(&self, q: usize, v: u32) {
        let m = sync::read(&self.doorbells);
        let p = m.as_mut_ptr();
        // SAFETY: as in `doorbell`.
        unsafe { (*(p.add(q * 8) as *const AtomicU32)).store(v, Ordering::Release) }
    }

    fn wake(&self) {
        {
            let mut k = sync::lock(&self.kick);
            *k = k.wrapping_add(1);
        }
        self.kicked.notify_all();
    }
}

/// A doorbell page: a memfd sealed against shrinking and growing (a client
/// that maps it cannot truncate it under our mapping), mapped; with the
/// contents of `from` if given.
fn doorbell_page(from: Option<&File>) -> std::io::Result<(File, MmapRaw)> {
    let f = iommu_core::memfd::create_sealed("dma-engine-doorbells", 4096).map_err(std::io::Error::other)?;
    if let Some(old) = from {
        let mut b = [0u8; 4096];
        old.read_exact_at(&mut b, 0)?;
        f.write_all_at(&b, 0)?;
    }
    let m = memmap2::MmapOptions::new().len(4096).map_raw(&f)?;
    Ok((f, m))
}

/// The DMA engine.
pub struct DmaEngine {
    shared: Arc<Shared>,
    bar2: Arc<File>,
    threads: Vec<std::thread::JoinHandle<()>>,
    irqs: Option<Arc<crate::irq::Irqs>>,
}

impl DmaEngine {
    /// A DMA engine with its doorbell page in a new memfd.
    pub fn new() -> std::io::Result<DmaEngine> {
        let (bar2, doorbells) = doorbell_page(None)?;
        Ok(DmaEngine {
            shared: Arc::new(Shared {
                regs: Mutex::new(Regs::default()),
                gate: RwLock::new(true),
                kick: Mutex::new(0),
                kicked: Condvar::new(),
                doorbells: RwLock::new(doorbells),
                stop: Default::default(),
                busy: Default::default(),
                generation: AtomicU64::new(0),
            }),
            bar2: Arc::new(bar2),
            threads: Vec::new(),
            irqs: None,
        })
    }

    fn queue_loop(shared: Arc<Shared>, ctx: DeviceContext, q: usize) {
        let mut idle_rounds = 0u32;
        while !shared.stop.load(Ordering::Acquire) {
            let seen = *sync::lock(&shared.kick);
            let did = Self::drain(&shared, &ctx, q);
            if did {
                idle_rounds = 0;
                continue;
            }
            // Doorbells written through an mmap are not trapped: while the
            // queue can run, poll them, briefly often, then less often while
            // idle. A queue that cannot run (device or queue disabled, or
            // halted) waits for a kick alone: every register write, reset,
            // state load and stop kicks, so an idle device costs nothing.
            let runnable = {
                let r = sync::lock(&shared.regs);
                let qr = &r.queues[q];
                r.enabled && qr.ctrl & regs::Q_CTRL_ENABLE != 0 && !qr.halted
            };
            idle_rounds = idle_rounds.saturating_add(1);
            let wait = if idle_rounds < 100 { Duration::from_micros(50) } else { Duration::from_millis(2) };
            let k = sync::lock(&shared.kick);
            if *k == seen {
                if runnable {
                    drop(super::wait_timeout(&shared.kicked, &shared.kick, k, wait));
                } else {
                    idle_rounds = 0;
                    drop(super::wait(&shared.kicked, &shared.kick, k));
                }
            }
        }
    }

    /// Runs the queue's pending descriptors; true if any ran.
    fn drain(shared: &Shared, ctx: &DeviceContext, q: usize) -> bool {
        let mut did = false;
        loop {
            let gate = sync::read(&shared.gate);
            if !*gate || shared.stop.load(Ordering::Acquire) {
                return did;
            }
            let gen = shared.generation.load(Ordering::Acquire);
            let tail = shared.doorbell(q);
            let (qr, enabled) = {
                let mut r = sync::lock(&shared.regs);
                r.queues[q].tail = tail;
                (r.queues[q], r.enabled)
            };
            let on = enabled && qr.ctrl & regs::Q_CTRL_ENABLE != 0 && !qr.halted;
            if !on || qr.head == tail || qr.ring_size == 0 {
                return did;
            }
            if tail.wrapping_sub(qr.head) > qr.ring_size {
                // More submitted than the ring holds: a broken driver.
                sync::lock(&shared.regs).queues[q].halted = true;
                return did;
            }
            did = true;
            shared.busy[q].store(1, Ordering::Release);
            let ring_route = if qr.ring_pasid & regs::PASID_VALID != 0 {
                Route::Vpasid(qr.ring_pasid & 0xf_ffff)
            } else {
                Route::Rid
            };
            let slot = u64::from(qr.head % qr.ring_size);
            let at = qr.ring_base.wrapping_add(slot * DESC_SIZE);
            let mut raw = [0u8; 64];
            if let Err(e) = ctx.dma.read(ring_route, at, &mut raw) {
                tracing::debug!("dma-engine queue {q}: cannot fetch descriptor at {at:#x}: {e}");
                if let dma::Error::NoPasid(_) = e {
                    ctx.dma.report_fault(ring_route, at, false, FaultReason::NotPresent);
                }
                let mut r = sync::lock(&shared.regs);
                if shared.generation.load(Ordering::Acquire) == gen && r.queues[q].epoch == qr.epoch {
                    r.queues[q].halted = true;
                }
                drop(r);
                shared.busy[q].store(0, Ordering::Release);
                return did;
            }
            let d = Descriptor::parse(&raw);
            // A reset or a departed client voids the work: stop between chunks.
            let void = || shared.generation.load(Ordering::Acquire) != gen;
            let Some(c) = execute(&*ctx.dma, &d, &void) else {
                shared.busy[q].store(0, Ordering::Release);
                return did;
            };
            if let Some(rest) = d.completion.checked_add(1).filter(|_| d.completion != 0) {
                // The record goes through the queue's address space; the
                // status byte lands last.
                let b = c.to_bytes();
                let ok = ctx
                    .dma
                    .write(ring_route, rest, &b[1..])
                    .and_then(|_| ctx.dma.write(ring_route, d.completion, &b[..1]));
                if let Err(e) = ok {
                    tracing::debug!("dma-engine queue {q}: completion record at {:#x}: {e}", d.completion);
                }
            }
            let irq = d.flags & flag::INTERRUPT != 0;
            {
                let mut r = sync::lock(&shared.regs);
                // A reset, a departed client, or the queue being disabled or
                // re-enabled meanwhile made this work void.
                if shared.generation.load(Ordering::Acquire) == gen && r.queues[q].epoch == qr.epoch {
                    let qq = &mut r.queues[q];
                    qq.head = qq.head.wrapping_add(1);
                    qq.completed = qq.completed.wrapping_add(1);
                    if c.status != status::SUCCESS {
                        qq.errors = qq.errors.wrapping_add(1);
                    }
                    if irq && qq.ctrl & regs::Q_CTRL_IRQ != 0 {
                        if !ctx.irqs.wired(crate::proto::irq_index::MSIX) {
                            r.intx_status |= 1 << q;
                        }
                        // Raised under the register lock, so a concurrent
                        // INTX_STATUS clear cannot be overtaken.
                        ctx.irqs.notify(q as u32);
                    }
                }
            }
            shared.busy[q].store(0, Ordering::Release);
            drop(gate);
        }
    }
}

/// The DMA a descriptor does, as [`execute`] needs it: implemented by the
/// server's [`dma::Dma`], and by fakes in tests and fuzz targets.
pub trait EngineDma {
    /// Reads `buf.len()` bytes at `iova` through `route`.
    fn read(&self, route: Route, iova: u64, buf: &mut [u8]) -> Result<(), dma::Error>;
    /// Writes `data` at `iova` through `route`.
    fn write(&self, route: Route, iova: u64, data: &[u8]) -> Result<(), dma::Error>;
    /// Checks that `[iova, iova+len)` can be written, writing nothing.
    fn check_write(&self, route: Route, iova: u64, len: usize) -> Result<(), dma::Error>;
    /// Reports an unrecoverable fault.
    fn report_fault(&self, route: Route, iova: u64, write: bool, reason: FaultReason);
}

impl EngineDma for dma::Dma {
    fn read(&self, route: Route, iova: u64, buf: &mut [u8]) -> Result<(), dma::Error> {
        dma::Dma::read(self, route, iova, buf)
    }
    fn write(&self, route: Route, iova: u64, data: &[u8]) -> Result<(), dma::Error> {
        dma::Dma::write(self, route, iova, data)
    }
    fn check_write(&self, route: Route, iova: u64, len: usize) -> Result<(), dma::Error> {
        dma::Dma::check_write(self, route, iova, len)
    }
    fn report_fault(&self, route: Route, iova: u64, write: bool, reason: FaultReason) {
        dma::Dma::report_fault(self, route, iova, write, reason)
    }
}

/// Executes one descriptor with the DMA of `mem`: every field is the
/// guest's and is checked here. Returns the completion record, or `None`
/// if `void` said the work was cancelled (between 256 KiB steps).
pub fn execute(mem: &dyn EngineDma, d: &Descriptor, void: &dyn Fn() -> bool) -> Option<Completion> {
    let mut c = Completion::default();
    let route = match d.route() {
        Ok(r) => r,
        Err(s) => {
            c.status = s;
            return Some(c);
        }
    };
    if d.len > MAX_XFER || (d.len == 0 && d.opcode != op::NOP) {
        c.status = status::INVALID;
        return Some(c);
    }
    // `second`: the fault is on the destination buffer (written by COPY and
    // FILL, read by COMPARE).
    let fail = |c: &mut Completion, e: dma::Error, at: u64, second: bool, write: bool| {
        c.fault_addr = at;
        c.status = match e {
            dma::Error::NoPasid(_) => {
                mem.report_fault(route, at, write, FaultReason::NotPresent);
                status::NO_PASID
            }
            dma::Error::Fault(iommu_core::tu::Error::Fault { iova, .. }) => {
                c.fault_addr = iova;
                if second {
                    status::FAULT_DST
                } else {
                    status::FAULT_SRC
                }
            }
            _ if second => status::FAULT_DST,
            _ => status::FAULT_SRC,
        };
    };
    // A destination is checked whole before the first byte is written.
    if matches!(d.opcode, op::COPY | op::FILL) {
        if let Err(e) = mem.check_write(route, d.dst, d.len as usize) {
            fail(&mut c, e, d.dst, true, true);
            return Some(c);
        }
    }
    const CHUNK: usize = 256 * 1024;
    let len = d.len as usize;
    match d.opcode {
        op::NOP => c.status = status::SUCCESS,
        op::COPY => {
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK);
                let (s, t) = (d.src.wrapping_add(done as u64), d.dst.wrapping_add(done as u64));
                if void() {
                    return None;
                }
                if let Err(e) = mem.read(route, s, &mut buf[..n]) {
                    fail(&mut c, e, s, false, false);
                    break;
                }
                if let Err(e) = mem.write(route, t, &buf[..n]) {
                    fail(&mut c, e, t, true, true);
                    break;
                }
                done += n;
            }
            c.bytes_done = done as u32;
            if done == len {
                c.status = status::SUCCESS;
            }
        }
        op::FILL => {
            let pat = d.pattern.to_le_bytes();
            let buf: Vec<u8> = (0..len.min(CHUNK)).map(|i| pat[i % 8]).collect();
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK);
                let t = d.dst.wrapping_add(done as u64);
                // Chunks start at multiples of 8, so the pattern lines up.
                if void() {
                    return None;
                }
                if let Err(e) = mem.write(route, t, &buf[..n]) {
                    fail(&mut c, e, t, true, true);
                    break;
                }
                done += n;
            }
            c.bytes_done = done as u32;
            if done == len {
                c.status = status::SUCCESS;
            }
        }
        op::COMPARE => {
            let mut a = vec![0u8; len.min(CHUNK)];
            let mut b = vec![0u8; len.min(CHUNK)];
            let mut done = 0;
            c.status = status::SUCCESS;
            while done < len {
                let n = (len - done).min(CHUNK);
                let (s, t) = (d.src.wrapping_add(done as u64), d.dst.wrapping_add(done as u64));
                if void() {
                    return None;
                }
                if let Err(e) = mem.read(route, s, &mut a[..n]) {
                    fail(&mut c, e, s, false, false);
                    break;
                }
                if let Err(e) = mem.read(route, t, &mut b[..n]) {
                    fail(&mut c, e, t, true, false);
                    break;
                }
                if let Some(i) = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y) {
                    c.status = status::MISMATCH;
                    c.result = (done + i) as u64;
                    done += i;
                    break;
                }
                done += n;
            }
            c.bytes_done = done as u32;
        }
        op::CRC32C => {
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut crc = d.pattern as u32;
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK);
                let s = d.src.wrapping_add(done as u64);
                if void() {
                    return None;
                }
                if let Err(e) = mem.read(route, s, &mut buf[..n]) {
                    fail(&mut c, e, s, false, false);
                    break;
                }
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                done += n;
            }
            c.bytes_done = done as u32;
            if done == len {
                c.status = status::SUCCESS;
                c.result = u64::from(crc);
            }
        }
        _ => c.status = status::INVALID,
    }
    Some(c)
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl DmaEngine {
    /// Voids queued and running work and waits for the descriptor in
    /// flight to stop; the returned guard keeps the engines out while the
    /// caller changes registers.
    fn cancel(shared: &Shared) -> std::sync::RwLockWriteGuard<'_, bool> {
        shared.generation.fetch_add(1, Ordering::AcqRel);
        sync::write(&shared.gate)
    }

    /// The 8-byte register word at `base` (8-aligned) of BAR 0.
    fn reg_word(&self, r: &Regs, base: u64) -> u64 {
        match base {
            0x000 => u64::from(regs::ID_VALUE) | (1u64 << 32),
            0x008 => QUEUES as u64 | (u64::from(MAX_XFER) << 32),
            0x010 => u64::from(r.enabled) | (u64::from(r.enabled) << 32),
            0x018 => u64::from(r.intx_status),
            b if (regs::QUEUE..regs::QUEUE + regs::QUEUE_STRIDE * QUEUES as u64).contains(&b) => {
                let q = &r.queues[((b - regs::QUEUE) / regs::QUEUE_STRIDE) as usize];
                match (b - regs::QUEUE) % regs::QUEUE_STRIDE {
                    0x00 => q.ring_base,
                    0x08 => u64::from(q.ring_size) | (u64::from(q.ring_pasid) << 32),
                    0x10 => u64::from(q.ctrl) | (u64::from(q.head) << 32),
                    0x18 => {
                        let st = (q.ctrl & regs::Q_CTRL_ENABLE) | (u32::from(q.halted) << 1);
                        let qi = ((b - regs::QUEUE) / regs::QUEUE_STRIDE) as usize;
                        u64::from(self.shared.doorbell(qi)) | (u64::from(st) << 32)
                    }
                    0x20 => q.completed,
                    0x28 => u64::from(q.errors),
                    _ => 0,
                }
            }
            _ => 0,
        }
    }
}

impl Device for DmaEngine {
    fn describe(&self) -> DeviceDesc {
        let ids = PciIds {
            vendor: 0x1b36,
            device: 0xd3a0,
            subsystem_vendor: 0x1b36,
            subsystem: 0x0001,
            // System peripheral, DMA controller.
            // System peripheral, other: 08:01 would claim an 8237
            // compatible DMA controller (prog-if 00), which this is not.
            class: 0x08_8000,
            revision: 1,
        };
        let mut c = PciConfig::new(ids, true);
        c.set_bar(0, BarKind::Mem32, 0x1000, false);
        c.set_bar(2, BarKind::Mem32, 0x1000, false);
        c.set_bar(4, BarKind::Mem32, 0x1000, false);
        c.set_interrupt_pin(1);
        c.add_pm();
        c.add_msix(QUEUES as u16, 4, 0, 4, 0x800);
        c.add_pcie();
        c.add_pasid(20);
        c.add_ats();
        c.add_pri(32);
        let doorbells = RegionDesc {
            index: 2,
            size: 0x1000,
            read: true,
            write: true,
            mmap: Some(MmapDesc {
                file: self.bar2.clone(),
                file_offset: 0,
                areas: vec![SparseArea { offset: 0, size: 0x1000 }],
            }),
        };
        DeviceDesc {
            name: "dma-engine",
            config: c,
            regions: vec![
                RegionDesc { index: 0, size: 0x1000, read: true, write: true, mmap: None },
                doorbells,
                RegionDesc { index: 4, size: 0x1000, read: true, write: true, mmap: None },
            ],
            irqs: IrqLayout { intx: true, msi: 0, msix: QUEUES as u32 },
            msix: Some(MsixDesc {
                table_bar: 4,
                table_offset: 0,
                pba_bar: 4,
                pba_offset: 0x800,
                vectors: QUEUES as u32,
            }),
            caps: DeviceCaps { pasid_width: 20, pri: true, dirty_tracking: true },
            io_fds: Vec::new(),
        }
    }

    fn start(&mut self, ctx: DeviceContext) {
        self.irqs = Some(ctx.irqs.clone());
        for q in 0..QUEUES {
            let (s, c) = (self.shared.clone(), ctx.clone());
            match std::thread::Builder::new().name(format!("dma-engine-q{q}")).spawn(move || Self::queue_loop(s, c, q))
            {
                Ok(t) => self.threads.push(t),
                Err(e) => tracing::error!("dma-engine cannot start queue {q}: {e}"),
            }
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        match index {
            0 => {
                let base = offset & !7;
                if (offset - base) as usize + buf.len() > 8 {
                    return Err(libc::EINVAL);
                }
                let r = sync::lock(&self.shared.regs);
                reg_read(self.reg_word(&r, base), offset - base, buf);
                Ok(())
            }
            2 => self.bar2.read_exact_at(buf, offset).map_err(|_| libc::EIO),
            _ => Err(libc::EINVAL),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            0 => {
                let base = offset & !7;
                let off = offset - base;
                if off as usize + data.len() > 8 {
                    return Err(libc::EINVAL);
                }
                let mut r = sync::lock(&self.shared.regs);
                let old = self.reg_word(&r, base);
                let v = reg_merge(old, off, data);
                let mut doorbell = None;
                match base {
                    0x010 => {
                        let en = v & 1 != 0;
                        if r.enabled && !en {
                            drop(r);
                            // Disabling lets the descriptor in flight finish
                            // (and complete) and keeps the engines out.
                            let _gate = sync::write(&self.shared.gate);
                            let mut r2 = sync::lock(&self.shared.regs);
                            r2.enabled = false;
                            return Ok(());
                        }
                        r.enabled = en;
                    }
                    0x018 => {
                        // Write 1 to clear (only the bytes written count);
                        // INTx drops when nothing is left.
                        r.intx_status &= !(reg_merge(0, off, data) as u32);
                        if r.intx_status == 0 {
                            if let Some(i) = &self.irqs {
                                i.set_intx(false);
                            }
                        }
                    }
                    b if (regs::QUEUE..regs::QUEUE + regs::QUEUE_STRIDE * QUEUES as u64).contains(&b) => {
                        let qi = ((b - regs::QUEUE) / regs::QUEUE_STRIDE) as usize;
                        let q = &mut r.queues[qi];
                        let on = q.ctrl & regs::Q_CTRL_ENABLE != 0;
                        match (b - regs::QUEUE) % regs::QUEUE_STRIDE {
                            0x00 if !on => q.ring_base = v,
                            0x08 if !on => {
                                let size = v as u32;
                                q.ring_size =
                                    if size.is_power_of_two() && (2..=MAX_RING).contains(&size) { size } else { 0 };
                                q.ring_pasid = (v >> 32) as u32 & (regs::PASID_VALID | 0xf_ffff);
                            }
                            0x10 if off < 4 => {
                                let ctrl = v as u32 & (regs::Q_CTRL_ENABLE | regs::Q_CTRL_IRQ);
                                if ctrl & regs::Q_CTRL_ENABLE != 0 && !on {
                                    // Enabling starts the ring empty at the
                                    // doorbell's current value.
                                    q.head = self.shared.doorbell(qi);
                                    q.tail = q.head;
                                    q.halted = false;
                                }
                                if (ctrl ^ q.ctrl) & regs::Q_CTRL_ENABLE != 0 {
                                    // Work fetched before the edge is void.
                                    q.epoch = q.epoch.wrapping_add(1);
                                }
                                q.ctrl = ctrl;
                            }
                            0x18 if off < 4 => doorbell = Some((qi, v as u32)),
                            _ => {}
                        }
                    }
                    _ => {}
                }
                drop(r);
                if let Some((q, t)) = doorbell {
                    self.shared.set_doorbell(q, t);
                }
                self.shared.wake();
                Ok(())
            }
            2 => {
                self.bar2.write_all_at(data, offset).map_err(|_| libc::EIO)?;
                self.shared.wake();
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }

    fn reset(&mut self) {
        // The engines stay out until the registers are zero.
        let shared = self.shared.clone();
        let _gate = Self::cancel(&shared);
        *sync::lock(&self.shared.regs) = Regs::default();
        for q in 0..QUEUES {
            self.shared.set_doorbell(q, 0);
        }
        if let Some(i) = &self.irqs {
            i.set_intx(false);
        }
    }

    fn client_gone(&mut self) {
        // Descriptors address the departed client's memory: the queues stop
        // (a driver enables them again).
        let shared = self.shared.clone();
        let _gate = Self::cancel(&shared);
        for q in sync::lock(&self.shared.regs).queues.iter_mut() {
            q.ctrl &= !regs::Q_CTRL_ENABLE;
            q.epoch = q.epoch.wrapping_add(1);
        }
        // The departed client may keep BAR 2 mapped: the next one gets a
        // new doorbell page with the same contents.
        match doorbell_page(Some(&self.bar2)) {
            Ok((f, m)) => {
                *sync::write(&self.shared.doorbells) = m;
                self.bar2 = Arc::new(f);
            }
            Err(e) => tracing::warn!("dma-engine keeps sharing its doorbell page with the departed client: {e}"),
        }
    }

    fn set_running(&mut self, running: bool) {
        *sync::write(&self.shared.gate) = running;
        self.shared.wake();
    }

    fn save(&mut self) -> Result<Vec<u8>, Errno> {
        let regs = sync::lock(&self.shared.regs).clone();
        let bells: Vec<u32> = (0..QUEUES).map(|q| self.shared.doorbell(q)).collect();
        postcard::to_allocvec(&(regs, bells)).map_err(|_| libc::ENOMEM)
    }

    fn load(&mut self, data: &[u8]) -> Result<(), Errno> {
        let (regs, bells): (Regs, Vec<u32>) = postcard::from_bytes(data).map_err(|_| libc::EINVAL)?;
        let valid_ring = |q: &QueueRegs| {
            q.ring_size == 0 || (q.ring_size.is_power_of_two() && (2..=MAX_RING).contains(&q.ring_size))
        };
        if bells.len() != QUEUES || !regs.queues.iter().all(valid_ring) {
            return Err(libc::EINVAL);
        }
        // Never more submitted than a ring holds.
        if regs.queues.iter().zip(&bells).any(|(q, b)| q.ring_size != 0 && b.wrapping_sub(q.head) > q.ring_size) {
            return Err(libc::EINVAL);
        }
        let _gate = sync::write(&self.shared.gate);
        for (q, b) in bells.iter().enumerate() {
            self.shared.set_doorbell(q, *b);
        }
        let pending = regs.intx_status != 0;
        *sync::lock(&self.shared.regs) = regs;
        if pending {
            if let Some(i) = &self.irqs {
                i.set_intx(true);
            }
        }
        self.shared.wake();
        Ok(())
    }

    fn status(&self) -> Vec<String> {
        let r = sync::lock(&self.shared.regs);
        r.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                format!("queue {i}: head {} tail {} completed {} errors {}", q.head, q.tail, q.completed, q.errors)
            })
            .collect()
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
    fn crc32c_matches_the_known_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }
}
