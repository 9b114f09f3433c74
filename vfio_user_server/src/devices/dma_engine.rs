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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use iommu_core::sync;
use iommu_core::types::{DeviceCaps, FaultReason};
use memmap2::MmapRaw;
use serde::{Deserialize, Serialize};

use crate::device::{reg_merge, reg_read, Device, DeviceContext, DeviceDesc, Errno, MmapDesc, MsixDesc, RegionDesc};
use crate::dma::{self, Route};
use crate::irq::IrqLayout;
use crate::pci::{BarKind, ConfigEvent, PciConfig, PciIds};
use crate::proto::SparseArea;

use super::Options;

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

/// How far a descriptor got before it was stopped (bus mastering cleared,
/// D3hot, or a migration stop): it goes on from here when the queue can
/// run again.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// Bytes finished (for a backward COPY, counted from the end).
    pub done: u32,
    /// CRC32C so far.
    pub crc: u32,
    /// The descriptor finished with this record, which could not be
    /// written yet.
    pub result: Option<Completion>,
}

/// What the next step of a descriptor may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Go on.
    Go,
    /// Stop here and keep the progress (the descriptor resumes later).
    Stop,
    /// The work is void (a reset, a queue disable, a departed client):
    /// stop here and forget it.
    Void,
}

/// How [`execute`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The descriptor finished; its record.
    Done(Completion),
    /// It was stopped; it resumes from this.
    Stopped(Progress),
    /// It was voided.
    Void,
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
    /// A completion record could not be written (Q_STATUS bit 2).
    cmpl_fault: bool,
    completed: u64,
    errors: u32,
    /// The descriptor at HEAD, fetched and stopped part-way.
    inflight: Option<(Descriptor, Progress)>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Regs {
    enabled: bool,
    intx_status: u32,
    queues: [QueueRegs; QUEUES],
}

struct Shared {
    regs: Mutex<Regs>,
    /// Read-held by a queue thread while it works on a descriptor; taking
    /// it for writing waits until every queue is between steps.
    gate: RwLock<bool>,
    /// Set while a migration stop is asked for: descriptors stop at their
    /// next step and keep their progress.
    held: AtomicBool,
    /// Set while work is being voided (see [`Shared::void`]).
    voiding: AtomicBool,
    kick: Mutex<u64>,
    kicked: Condvar,
    /// The doorbell page (swapped for a fresh one when a client leaves).
    doorbells: RwLock<MmapRaw>,
    stop: AtomicBool,
    /// Per queue: bumped when the queue's work becomes void (reset, queue
    /// or device disable, departed client). A step of older work stops.
    voids: [AtomicU64; QUEUES],
    /// Held while a queue commits a finished descriptor (record, HEAD,
    /// interrupt) and while work is voided: a descriptor either completed
    /// before a reset was accepted or never does.
    commit: Mutex<()>,
    /// The device's DMA, once started: waiting for a step first fences the
    /// client, so that no step waits for client memory meanwhile.
    dma: std::sync::OnceLock<Arc<dma::Dma>>,
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

    /// Voids the work of the queues in `which` (accepted at once: no
    /// descriptor of theirs completes after this) and waits until every
    /// queue thread is between steps. The returned guard keeps the engines
    /// out while the caller changes registers.
    fn void(&self, which: impl Iterator<Item = usize>) -> std::sync::RwLockWriteGuard<'_, bool> {
        // A step or a record waiting for client memory gives up at once.
        let _fence = self.fence_client();
        // Until the caller holds the gate, a queue thread that stopped for
        // this must not start over (it would see the new generation and run
        // its voided descriptor again): `voiding` keeps it out.
        self.voiding.store(true, Ordering::SeqCst);
        {
            let _c = sync::lock(&self.commit);
            for q in which {
                self.voids[q].fetch_add(1, Ordering::AcqRel);
            }
        }
        self.wake();
        let g = sync::write(&self.gate);
        // The caller changes the registers before the engines can read
        // them again (they need the gate).
        self.voiding.store(false, Ordering::SeqCst);
        g
    }

    /// Waits until every queue thread is between steps (after a gate such
    /// as bus mastering closed, so that no DMA step is still running).
    fn quiesce(&self) {
        let _fence = self.fence_client();
        self.wake();
        drop(sync::write(&self.gate));
    }

    /// Fences the client's DMA while the caller waits for queue threads:
    /// the caller answers a client's command, and the client serves our
    /// DMA only after that answer (see `dma::Dma::fence_client`). A step
    /// given up this way stops with its progress and goes on later.
    fn fence_client(&self) -> Option<dma::ClientFence> {
        self.dma.get().map(|d| d.fence_client())
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
    opts: Options,
}

impl DmaEngine {
    /// A DMA engine with MSI-X, its doorbell page in a new memfd.
    pub fn new() -> std::io::Result<DmaEngine> {
        DmaEngine::with_options(Options::default())
    }

    /// A DMA engine with `opts` (without MSI-X it has MSI and INTx only,
    /// and no BAR 4, which holds only the MSI-X table and PBA).
    pub fn with_options(opts: Options) -> std::io::Result<DmaEngine> {
        let (bar2, doorbells) = doorbell_page(None)?;
        Ok(DmaEngine {
            shared: Arc::new(Shared {
                regs: Mutex::new(Regs::default()),
                gate: RwLock::new(true),
                held: AtomicBool::new(false),
                voiding: AtomicBool::new(false),
                kick: Mutex::new(0),
                kicked: Condvar::new(),
                doorbells: RwLock::new(doorbells),
                stop: Default::default(),
                voids: Default::default(),
                commit: Mutex::new(()),
                dma: std::sync::OnceLock::new(),
            }),
            bar2: Arc::new(bar2),
            threads: Vec::new(),
            irqs: None,
            opts,
        })
    }

    fn queue_loop(shared: Arc<Shared>, ctx: DeviceContext, q: usize) {
        let mut idle_rounds = 0u32;
        while !shared.stop.load(Ordering::Acquire) {
            // After client DMA was given up for a fence: try again once it
            // is down (holding nothing that the fencing thread waits for).
            ctx.dma.wait_client(Duration::from_secs(1));
            let seen = *sync::lock(&shared.kick);
            let did = Self::drain(&shared, &ctx, q);
            if did {
                idle_rounds = 0;
                continue;
            }
            // Doorbells written through an mmap are not trapped: while the
            // queue can run, poll them, briefly often, then less often while
            // idle. A queue that cannot run (device or queue disabled,
            // halted, bus mastering off) waits for a kick alone: every
            // register write, command register or power state change,
            // reset, state load and stop kicks, so an idle device costs
            // nothing.
            let runnable = ctx.dma.bus_master() && *sync::read(&shared.gate) && {
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
            if !*gate || shared.stop.load(Ordering::Acquire) || !ctx.dma.bus_master() {
                return did;
            }
            let gen = shared.voids[q].load(Ordering::SeqCst);
            if shared.voiding.load(Ordering::SeqCst) {
                return did;
            }
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
            let ring_route = if qr.ring_pasid & regs::PASID_VALID != 0 {
                Route::Vpasid(qr.ring_pasid & 0xf_ffff)
            } else {
                Route::Rid
            };
            let (d, from) = match qr.inflight {
                Some((d, p)) => (d, Some(p)),
                None => {
                    let slot = u64::from(qr.head % qr.ring_size);
                    let at = qr.ring_base.wrapping_add(slot * DESC_SIZE);
                    let mut raw = [0u8; 64];
                    match ctx.dma.read(ring_route, at, &mut raw) {
                        Ok(()) => (Descriptor::parse(&raw), None),
                        // Bus mastering went off, the client's DMA was
                        // fenced, or the client is slow: fetch it again.
                        Err(e) if e.stops_step() || e.client_timed_out() => return did,
                        Err(e) => {
                            tracing::debug!("dma-engine queue {q}: cannot fetch descriptor at {at:#x}: {e}");
                            if let dma::Error::NoPasid(_) = e {
                                ctx.dma.report_fault(ring_route, at, false, FaultReason::NotPresent);
                            }
                            let mut r = sync::lock(&shared.regs);
                            if shared.voids[q].load(Ordering::Acquire) == gen {
                                r.queues[q].halted = true;
                            }
                            return did;
                        }
                    }
                }
            };
            let step = || {
                if shared.voids[q].load(Ordering::Acquire) != gen || shared.stop.load(Ordering::Acquire) {
                    Step::Void
                } else if shared.held.load(Ordering::Acquire) || !ctx.dma.bus_master() {
                    Step::Stop
                } else {
                    Step::Go
                }
            };
            let c = match from.and_then(|p| p.result) {
                Some(c) => c,
                None => match execute(&*ctx.dma, &d, from, &step) {
                    Outcome::Done(c) => c,
                    Outcome::Stopped(p) => {
                        Self::keep(shared, q, gen, d, p);
                        return did;
                    }
                    Outcome::Void => return did,
                },
            };
            if !Self::commit(shared, ctx, q, gen, ring_route, &d, c) {
                return did;
            }
            drop(gate);
        }
    }

    /// Keeps a stopped descriptor's progress (unless its work was voided
    /// meanwhile).
    fn keep(shared: &Shared, q: usize, gen: u64, d: Descriptor, p: Progress) {
        let mut r = sync::lock(&shared.regs);
        if shared.voids[q].load(Ordering::Acquire) == gen {
            r.queues[q].inflight = Some((d, p));
        }
    }

    /// Completes a finished descriptor: its record, HEAD, the counters and
    /// the interrupt, all or nothing with respect to a reset. Returns
    /// false if the queue must stop (voided, halted, or the record waits
    /// for bus mastering).
    fn commit(
        shared: &Shared,
        ctx: &DeviceContext,
        q: usize,
        gen: u64,
        ring_route: Route,
        d: &Descriptor,
        c: Completion,
    ) -> bool {
        let _c = sync::lock(&shared.commit);
        if shared.voids[q].load(Ordering::Acquire) != gen {
            return false;
        }
        let mut record_fault = false;
        if let Some(rest) = d.completion.checked_add(1).filter(|_| d.completion != 0) {
            // The record goes through the queue's address space; the
            // status byte lands last.
            let b = c.to_bytes();
            let wrote = ctx
                .dma
                .write(ring_route, rest, &b[1..])
                .map_err(|e| (e, false))
                .and_then(|_| ctx.dma.write(ring_route, d.completion, &b[..1]).map_err(|e| (e, true)));
            match wrote {
                Ok(()) => {}
                // The status byte went to the client before a fence gave up
                // waiting for its answer: the client may still write it, so
                // the descriptor completes now (before the fencing reset or
                // disable is accepted), as if the answer had come.
                Err((e, true)) if e.maybe_applied() => {}
                Err((e, _)) if e.stops_step() || e.client_timed_out() => {
                    // Written when bus mastering is back, the fence is
                    // down, or the client answers; HEAD waits. (A record
                    // that cannot be written for a fault halts the queue
                    // below; a client that is slow to answer does not.)
                    let p = Progress { result: Some(c), ..Progress::default() };
                    sync::lock(&shared.regs).queues[q].inflight = Some((*d, p));
                    return false;
                }
                Err((e, _)) => {
                    tracing::debug!("dma-engine queue {q}: completion record at {:#x}: {e}", d.completion);
                    if let dma::Error::NoPasid(_) = e {
                        ctx.dma.report_fault(ring_route, d.completion, true, FaultReason::NotPresent);
                    }
                    record_fault = true;
                }
            }
        }
        let irq = d.flags & flag::INTERRUPT != 0;
        let mut r = sync::lock(&shared.regs);
        let qq = &mut r.queues[q];
        qq.inflight = None;
        qq.head = qq.head.wrapping_add(1);
        qq.completed = qq.completed.wrapping_add(1);
        if c.status != status::SUCCESS || record_fault {
            qq.errors = qq.errors.wrapping_add(1);
        }
        if record_fault {
            // The driver cannot learn how this descriptor ended: the queue
            // halts, as for a ring fault, and says why.
            qq.halted = true;
            qq.cmpl_fault = true;
        }
        if irq && qq.ctrl & regs::Q_CTRL_IRQ != 0 {
            if ctx.irqs.uses_intx() {
                r.intx_status |= 1 << q;
            }
            // Raised under the register lock, so a concurrent INTX_STATUS
            // clear cannot be overtaken.
            ctx.irqs.notify(q as u32);
        }
        !record_fault
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

/// Bytes of one DMA step: a reset, a bus-master disable or a stop waits
/// for at most one step of each queue.
pub const STEP: usize = 64 * 1024;

/// Executes one descriptor with the DMA of `mem`, from the start or from
/// `from`: every field is the guest's and is checked here. Before each
/// step (of at most [`STEP`] bytes) `step` says whether to go on. A step
/// refused because bus mastering is off stops the descriptor as
/// [`Step::Stop`] would.
pub fn execute(mem: &dyn EngineDma, d: &Descriptor, from: Option<Progress>, step: &dyn Fn() -> Step) -> Outcome {
    let mut c = Completion::default();
    let route = match d.route() {
        Ok(r) => r,
        Err(s) => {
            c.status = s;
            return Outcome::Done(c);
        }
    };
    if d.len > MAX_XFER || (d.len == 0 && d.opcode != op::NOP) {
        c.status = status::INVALID;
        return Outcome::Done(c);
    }
    let start = from.unwrap_or(Progress { crc: d.pattern as u32, ..Progress::default() });
    let stopped = |done: usize, crc: u32| Outcome::Stopped(Progress { done: done as u32, crc, result: None });
    let gate = |done: usize, crc: u32| match step() {
        Step::Go => None,
        Step::Stop => Some(stopped(done, crc)),
        Step::Void => Some(Outcome::Void),
    };
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
    let off = |e: &dma::Error| e.stops_step();
    let len = d.len as usize;
    let mut done = (start.done as usize).min(len);
    // One DMA of a step: bus mastering off stops the descriptor here (it
    // resumes from `done`); any other failure ends it with its status.
    macro_rules! step_dma {
        ($dma:expr, $at:expr, $second:expr, $write:expr, $crc:expr) => {
            match $dma {
                Ok(()) => {}
                Err(e) if off(&e) => return stopped(done, $crc),
                Err(e) => {
                    fail(&mut c, e, $at, $second, $write);
                    break;
                }
            }
        };
    }
    // A destination is checked whole before the first byte is written (on
    // a resume, what is left of it: a backward COPY works from the end).
    if matches!(d.opcode, op::COPY | op::FILL) && done < len {
        if let Some(o) = gate(done, start.crc) {
            return o;
        }
        let backward = d.opcode == op::COPY && d.dst > d.src && d.dst - d.src < len as u64;
        let rest = if backward { d.dst } else { d.dst.wrapping_add(done as u64) };
        match mem.check_write(route, rest, len - done) {
            Err(e) if off(&e) => return stopped(done, start.crc),
            Err(e) => {
                fail(&mut c, e, rest, true, true);
                c.bytes_done = done as u32;
                return Outcome::Done(c);
            }
            Ok(()) => {}
        }
    }
    match d.opcode {
        op::NOP => c.status = status::SUCCESS,
        op::COPY => {
            // Overlapping buffers (in the same address space) copy as
            // memmove does: backwards when the destination starts inside
            // the source, so every source byte is read before it is
            // overwritten.
            let backward = d.dst > d.src && d.dst - d.src < len as u64;
            let mut buf = vec![0u8; len.min(STEP)];
            while done < len {
                let n = (len - done).min(STEP);
                let at = if backward { len - done - n } else { done } as u64;
                let (s, t) = (d.src.wrapping_add(at), d.dst.wrapping_add(at));
                if let Some(o) = gate(done, 0) {
                    return o;
                }
                step_dma!(mem.read(route, s, &mut buf[..n]), s, false, false, 0);
                step_dma!(mem.write(route, t, &buf[..n]), t, true, true, 0);
                done += n;
            }
            c.bytes_done = done as u32;
            if done == len {
                c.status = status::SUCCESS;
            }
        }
        op::FILL => {
            let pat = d.pattern.to_le_bytes();
            let buf: Vec<u8> = (0..len.min(STEP)).map(|i| pat[i % 8]).collect();
            while done < len {
                let n = (len - done).min(STEP);
                let t = d.dst.wrapping_add(done as u64);
                // Steps start at multiples of 8, so the pattern lines up.
                if let Some(o) = gate(done, 0) {
                    return o;
                }
                step_dma!(mem.write(route, t, &buf[..n]), t, true, true, 0);
                done += n;
            }
            c.bytes_done = done as u32;
            if done == len {
                c.status = status::SUCCESS;
            }
        }
        op::COMPARE => {
            let mut a = vec![0u8; len.min(STEP)];
            let mut b = vec![0u8; len.min(STEP)];
            c.status = status::SUCCESS;
            while done < len {
                let n = (len - done).min(STEP);
                let (s, t) = (d.src.wrapping_add(done as u64), d.dst.wrapping_add(done as u64));
                if let Some(o) = gate(done, 0) {
                    return o;
                }
                step_dma!(mem.read(route, s, &mut a[..n]), s, false, false, 0);
                step_dma!(mem.read(route, t, &mut b[..n]), t, true, false, 0);
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
            let mut buf = vec![0u8; len.min(STEP)];
            let mut crc = start.crc;
            while done < len {
                let n = (len - done).min(STEP);
                let s = d.src.wrapping_add(done as u64);
                if let Some(o) = gate(done, crc) {
                    return o;
                }
                step_dma!(mem.read(route, s, &mut buf[..n]), s, false, false, crc);
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
    Outcome::Done(c)
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
                        let st = (q.ctrl & regs::Q_CTRL_ENABLE)
                            | (u32::from(q.halted) << 1)
                            | (u32::from(q.cmpl_fault) << 2);
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
        c.set_interrupt_pin(1);
        c.add_pm();
        // MSI: a vector per queue (64-bit, per-vector masking).
        c.add_msi(QUEUES as u16);
        if self.opts.msix {
            c.set_bar(4, BarKind::Mem32, 0x1000, false);
            c.add_msix(QUEUES as u16, 4, 0, 4, 0x800);
        }
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
        let mut regions = vec![RegionDesc { index: 0, size: 0x1000, read: true, write: true, mmap: None }, doorbells];
        if self.opts.msix {
            regions.push(RegionDesc { index: 4, size: 0x1000, read: true, write: true, mmap: None });
        }
        DeviceDesc {
            name: "dma-engine",
            config: c,
            regions,
            irqs: IrqLayout { intx: true, msi: QUEUES as u32, msix: if self.opts.msix { QUEUES as u32 } else { 0 } },
            msix: self.opts.msix.then_some(MsixDesc {
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
        let _ = self.shared.dma.set(ctx.dma.clone());
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
                            // Disabling is a reset of the work: each queue's
                            // descriptor in flight stops at its next step,
                            // and it and every descriptor submitted so far
                            // are dropped without records (HEAD moves to the
                            // doorbell). The queues keep their setup; what
                            // is rung from now on runs once CTRL is set.
                            let _gate = self.shared.void(0..QUEUES);
                            let mut r2 = sync::lock(&self.shared.regs);
                            r2.enabled = false;
                            for (i, q) in r2.queues.iter_mut().enumerate() {
                                q.inflight = None;
                                q.head = self.shared.doorbell(i);
                                q.tail = q.head;
                            }
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
                                if (ctrl ^ q.ctrl) & regs::Q_CTRL_ENABLE != 0 {
                                    // Either edge voids the queue's work in
                                    // flight: it stops at its next step and
                                    // never completes.
                                    drop(r);
                                    let _gate = self.shared.void(std::iter::once(qi));
                                    let mut r = sync::lock(&self.shared.regs);
                                    let q = &mut r.queues[qi];
                                    q.inflight = None;
                                    if ctrl & regs::Q_CTRL_ENABLE != 0 {
                                        // Enabling starts the ring empty at
                                        // the doorbell's current value.
                                        q.head = self.shared.doorbell(qi);
                                        q.tail = q.head;
                                        q.halted = false;
                                        q.cmpl_fault = false;
                                    }
                                    q.ctrl = ctrl;
                                    drop(r);
                                    drop(_gate);
                                    self.shared.wake();
                                    return Ok(());
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
        // Accepted at once (no descriptor completes after this); the
        // engines stay out until the registers are zero.
        let shared = self.shared.clone();
        let _gate = shared.void(0..QUEUES);
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
        let _gate = shared.void(0..QUEUES);
        for q in sync::lock(&self.shared.regs).queues.iter_mut() {
            q.ctrl &= !regs::Q_CTRL_ENABLE;
            q.inflight = None;
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

    fn config_event(&mut self, ev: ConfigEvent) {
        if ev == ConfigEvent::BusMaster(false) {
            // The framework already refuses DMA: wait until no step is still
            // running, so no DMA happens after the config write's reply.
            // Descriptors keep their progress and go on when bus mastering
            // is back, which the kick below notices.
            self.shared.quiesce();
        }
        self.shared.wake();
    }

    fn set_running(&mut self, running: bool) {
        // A stop takes effect at each descriptor's next step; its progress
        // is part of the saved state.
        self.shared.held.store(!running, Ordering::Release);
        let _fence = if running { None } else { self.shared.fence_client() };
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
        // A stopped descriptor never claims more than its length done.
        if regs.queues.iter().any(|q| q.inflight.is_some_and(|(d, p)| p.done > d.len)) {
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
