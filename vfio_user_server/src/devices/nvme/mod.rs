//! `nvme`: an NVMe controller (NVM command set, one namespace backed by a
//! file or block device) that an unmodified host driver initialises and
//! uses. What it supports is in `docs/devices/nvme.md`.
//!
//! One job per file: `abi` is the register, command and status ABI of the
//! base specification, `prp` walks PRP entries and lists, `backing` is the
//! namespace's storage, `queue` holds the submission and completion queues
//! and the queue threads, `admin` and `io` run admin and NVM commands,
//! `regs` is the BAR 0 register file with the CC/CSTS state machine, and
//! this module is the PCI function (description, BAR decoding, resets,
//! config events).
//!
//! Every submission queue, the admin queue included, has its own thread;
//! a completion queue has its own lock. With MSI-X, the I/O path takes no
//! lock of the whole controller but the read side of the gate (which
//! quiescing takes for writing); with MSI or INTx a completion also reads
//! INTMS under the register lock (and INTx computes its level under a
//! lock of its own). The register lock is otherwise taken by register
//! accesses, queue creation and deletion, and resets.

pub mod abi;
mod admin;
mod backing;
pub mod io;
pub mod prp;
mod queue;
mod regs;

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use iommu_core::shm::Words;
use iommu_core::sync;
use iommu_core::types::DeviceCaps;

use crate::device::{Device, DeviceContext, DeviceDesc, Errno, MmapDesc, MsixDesc, RegionDesc};
use crate::dma::Dma;
use crate::irq::{IrqLayout, Irqs};
use crate::pci::{BarKind, ConfigEvent, PciConfig, PciIds};
use crate::proto::SparseArea;

use abi::{Command, Status, MAX_IO_QUEUES, VECTORS};
pub use backing::Backing;
use queue::{Cq, Sq};

/// Size of BAR 0: registers, then the doorbells from 0x1000.
pub const BAR0_SIZE: u64 = 0x4000;
/// Bytes of the doorbell file: the register page (unused) and the
/// doorbell page, so that the file offset of a doorbell is its BAR offset.
const BELL_FILE: u64 = 0x2000;

/// What an `nvme` device is made from.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The backing file or block device.
    pub backing: PathBuf,
    /// Namespace size in bytes (default: the file's).
    pub size: Option<u64>,
    /// Refuse writes.
    pub read_only: bool,
    /// Offer MSI-X.
    pub msix: bool,
    /// Do not offer the doorbell page for mmap: every doorbell write
    /// traps (a REGION_WRITE) and wakes its queue at once.
    pub trap_doorbells: bool,
}

/// Queue threads and their queues, by queue id.
#[derive(Default)]
struct Threads {
    /// Set while the controller is being reset: no queue may be added.
    closed: bool,
    sqs: Vec<Option<(Arc<Sq>, JoinHandle<()>)>>,
    /// The shadow doorbell and EventIdx buffers (Doorbell Buffer Config),
    /// which I/O queues created later use too.
    dbbuf: Option<(u64, u64)>,
}

/// Asynchronous events.
#[derive(Default)]
struct Events {
    /// Command ids of outstanding Asynchronous Event Requests.
    outstanding: Vec<u16>,
    /// Events waiting for a request (completion dword 0).
    pending: VecDeque<u32>,
    /// Event types reported and not yet cleared by reading their log page.
    masked: u8,
}

/// Settable features (their current values).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Features {
    arbitration: u32,
    power: u32,
    temp_over: u16,
    temp_under: u16,
    error_recovery: u32,
    coalescing: u32,
    /// Interrupt Vector Configuration: coalescing disabled per vector.
    iv_cd: u32,
    write_atomicity: u32,
    async_config: u32,
}

impl Default for Features {
    fn default() -> Features {
        Features {
            arbitration: 0,
            power: 0,
            temp_over: regs::TEMP_OVER_DEFAULT,
            temp_under: 0,
            error_recovery: 0,
            coalescing: 0,
            iv_cd: 0,
            write_atomicity: 0,
            async_config: 0,
        }
    }
}

/// One Error Information log entry.
#[derive(Debug, Clone, Copy, Default)]
struct ErrorEntry {
    count: u64,
    sqid: u16,
    cid: u16,
    status: u16,
    lba: u64,
    nsid: u32,
}

/// The Error Information log (newest first) and the error count.
#[derive(Default)]
struct ErrorLog {
    count: u64,
    entries: VecDeque<ErrorEntry>,
}

/// Counters of the SMART / Health log.
#[derive(Default)]
struct Stats {
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    media_errors: AtomicU64,
}

/// The controller: registers and everything the queue threads share.
pub(crate) struct Ctrl {
    regs: Mutex<regs::Regs>,
    bells: RwLock<Words>,
    backing: Backing,
    /// Completion queues by id.
    cqs: RwLock<Vec<Option<Arc<Cq>>>>,
    threads: Mutex<Threads>,
    features: Mutex<Features>,
    /// Volatile Write Cache Enable: without it every write is made
    /// durable before it completes.
    wce: AtomicBool,
    events: Mutex<Events>,
    errors: Mutex<ErrorLog>,
    /// Per doorbell: the last bad value reported (an event per change).
    bad_bells: Vec<AtomicU32>,
    /// Read-held by a queue thread while it runs a command: taking it for
    /// writing waits until every command in flight has ended. False while
    /// stopped for migration.
    gate: RwLock<bool>,
    /// Set while the gate is being taken for writing: a queue thread
    /// waiting for room in a full completion queue stops instead.
    quiescing: AtomicBool,
    /// Set while every queue is being stopped (reset, shutdown).
    stopping: AtomicBool,
    /// CSTS.CFS: a queue could not be read or written.
    fatal: AtomicBool,
    /// The memory page size (CC.MPS) the controller was enabled with.
    page: AtomicU64,
    /// Whether INTx was raised by this controller.
    intx: AtomicBool,
    /// Taken while the INTx level is computed and set.
    intx_lock: Mutex<()>,
    /// MSI vectors held back by INTMS.
    msi_pending: AtomicU32,
    stats: Stats,
    started: Instant,
    dma: OnceLock<Arc<Dma>>,
    irqs: OnceLock<Arc<Irqs>>,
}

impl Ctrl {
    /// The doorbell of queue `qid` (its CQ head doorbell if `cq`, else its
    /// SQ tail doorbell).
    fn doorbell(&self, qid: u16, cq: bool) -> u32 {
        let m = sync::read(&self.bells);
        m.u32(bell_offset(qid, cq)).map_or(0, |w| w.load(Ordering::Acquire))
    }

    fn set_doorbell(&self, qid: u16, cq: bool, v: u32) {
        let m = sync::read(&self.bells);
        if let Some(w) = m.u32(bell_offset(qid, cq)) {
            w.store(v, Ordering::Release);
        }
    }

    /// A doorbell was written with `v`, past its queue's size: an
    /// asynchronous event (once per value), the write ignored.
    fn bad_doorbell(&self, qid: u16, cq: bool, v: u32) {
        let i = usize::from(qid) * 2 + usize::from(cq);
        if let Some(last) = self.bad_bells.get(i) {
            if last.swap(v, Ordering::AcqRel) != v {
                tracing::debug!(
                    "nvme: doorbell of {} {qid} written with {v}, past the queue",
                    if cq { "CQ" } else { "SQ" }
                );
                self.event(queue::doorbell_event());
            }
        }
    }

    /// Queues an asynchronous event and wakes the admin queue's thread.
    fn event(&self, dw0: u32) {
        {
            let mut e = sync::lock(&self.events);
            if e.pending.len() < 16 && !e.pending.contains(&dw0) {
                e.pending.push_back(dw0);
            }
        }
        self.kick_sq(0);
    }

    fn kick_sq(&self, qid: u16) {
        let t = sync::lock(&self.threads);
        if let Some(Some((sq, _))) = t.sqs.get(usize::from(qid)) {
            sq.kick.kick();
        }
    }

    fn kick_all(&self) {
        let t = sync::lock(&self.threads);
        for (sq, _) in t.sqs.iter().flatten() {
            sq.kick.kick();
        }
    }

    /// A queue cannot be used: CSTS.CFS, and every queue stops.
    fn set_fatal(&self) {
        self.fatal.store(true, Ordering::Release);
    }

    /// Signals the completion interrupt of vector `iv`.
    fn interrupt(&self, iv: u16) {
        let Some(irqs) = self.irqs.get() else { return };
        if irqs.uses_intx() {
            // The level is computed from the queues' state, as every
            // other change of it is: a completion consumed before this
            // call leaves the line low.
            self.recheck_intx();
        } else if !irqs.wired(crate::proto::irq_index::MSIX) {
            let bit = 1u32 << (iv % 32);
            let masked = sync::lock(&self.regs).intms & bit != 0;
            if masked {
                self.msi_pending.fetch_or(bit, Ordering::AcqRel);
            } else {
                irqs.notify(u32::from(iv));
            }
        } else {
            irqs.notify(u32::from(iv));
        }
    }

    fn intx_asserted(&self) -> bool {
        self.intx.load(Ordering::Acquire)
    }

    /// Whether completions interrupt through INTx (nothing else wired).
    fn intx_wired(&self) -> bool {
        self.irqs.get().is_some_and(|i| i.uses_intx())
    }

    /// Lowers INTx once no completion queue with interrupts enabled holds
    /// an entry the host has not consumed (or INTMS masks it), and raises
    /// it again if one does and it is unmasked.
    ///
    /// Serialised by `intx_lock`: each change of the state (a completion
    /// posted, a head doorbell written, INTMS or INTMC) is followed by a
    /// recheck, so the last one to run sees the last change. Nothing here
    /// waits for a queue thread (the event loop calls it for doorbell and
    /// INTMS writes).
    fn recheck_intx(&self) {
        let Some(irqs) = self.irqs.get() else { return };
        let _serial = sync::lock(&self.intx_lock);
        let masked = sync::lock(&self.regs).intms & 1 != 0;
        let cqs: Vec<Arc<Cq>> = sync::read(&self.cqs).iter().flatten().cloned().collect();
        let level = !masked && irqs.uses_intx() && cqs.iter().any(|c| c.ien && c.pending(self));
        if self.intx.swap(level, Ordering::AcqRel) != level {
            irqs.set_intx(level);
        }
    }

    /// Signals the MSI vectors that INTMC unmasked while they were held.
    fn release_msi(&self, cleared: u32) {
        let due = self.msi_pending.fetch_and(!cleared, Ordering::AcqRel) & cleared;
        if let Some(irqs) = self.irqs.get() {
            for v in 0..32 {
                if due & (1 << v) != 0 {
                    irqs.notify(v);
                }
            }
        }
    }

    /// Records a failed command in the Error Information log.
    fn log_error(&self, sqid: u16, cmd: &Command, status: Status) {
        let mut l = sync::lock(&self.errors);
        l.count += 1;
        let e = ErrorEntry {
            count: l.count,
            sqid,
            cid: cmd.cid,
            status: status.0,
            lba: u64::from(cmd.cdw[0]) | (u64::from(cmd.cdw[1]) << 32),
            nsid: cmd.nsid,
        };
        l.entries.push_front(e);
        l.entries.truncate(abi::ERROR_LOG_ENTRIES);
    }

    /// Starts a thread for `sq`, unless the controller is being reset.
    fn spawn_sq(self: &Arc<Ctrl>, ctx: &DeviceContext, sq: Arc<Sq>) -> bool {
        let mut t = sync::lock(&self.threads);
        if t.closed {
            return false;
        }
        let (c, x, s) = (self.clone(), ctx.clone(), sq.clone());
        let h = match std::thread::Builder::new()
            .name(format!("nvme-sq{}", sq.id))
            .spawn(move || queue::sq_loop(c, x, s))
        {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("nvme: cannot start the thread of SQ {}: {e}", sq.id);
                return false;
            }
        };
        let i = usize::from(sq.id);
        if t.sqs.len() <= i {
            t.sqs.resize_with(i + 1, || None);
        }
        t.sqs[i] = Some((sq, h));
        true
    }

    /// Stops the thread of SQ `qid` and removes the queue; returns it.
    /// The command it runs ends first.
    fn stop_sq(&self, qid: u16) -> Option<Arc<Sq>> {
        let taken = {
            let mut t = sync::lock(&self.threads);
            t.sqs.get_mut(usize::from(qid)).and_then(Option::take)
        };
        let (sq, h) = taken?;
        sq.stop.store(true, Ordering::Release);
        sq.kick.kick();
        let _ = h.join();
        Some(sq)
    }

    /// Stops every queue thread and deletes every queue (controller reset
    /// and shutdown): the command each thread runs ends first, and nothing
    /// is completed after this returns. Commands fetched and stopped
    /// part-way are dropped.
    fn stop_all(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop_all_queues();
        self.stopping.store(false, Ordering::Release);
    }

    /// Whether a long command should stop where it is: every queue is
    /// being stopped, or the controller quiesced.
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire) || self.quiescing.load(Ordering::Acquire)
    }

    fn stop_all_queues(&self) {
        // A thread waiting for client memory gives up at once.
        let _fence = self.dma.get().map(|d| d.fence_client());
        let all: Vec<_> = {
            let mut t = sync::lock(&self.threads);
            t.closed = true;
            t.sqs.iter_mut().filter_map(Option::take).collect()
        };
        for (sq, _) in &all {
            sq.stop.store(true, Ordering::Release);
            sq.kick.kick();
        }
        for (_, h) in all {
            let _ = h.join();
        }
        // The admin thread may have started one while we took them.
        let late: Vec<_> = sync::lock(&self.threads).sqs.iter_mut().filter_map(Option::take).collect();
        for (sq, h) in late {
            sq.stop.store(true, Ordering::Release);
            sq.kick.kick();
            let _ = h.join();
        }
        sync::write(&self.cqs).iter_mut().for_each(|c| *c = None);
        let mut t = sync::lock(&self.threads);
        t.closed = false;
        t.dbbuf = None;
    }

    /// Waits until no queue thread runs a command (fencing the client's
    /// DMA, so none waits for it, and stopping any that waits for room in
    /// a completion queue), then runs `f` on the gate.
    fn quiesce(&self, f: impl FnOnce(&mut bool)) {
        self.quiescing.store(true, Ordering::Release);
        let fence = self.dma.get().map(|d| d.fence_client());
        f(&mut sync::write(&self.gate));
        drop(fence);
        self.quiescing.store(false, Ordering::Release);
    }

    /// Back to the state after a controller reset: queues gone, features,
    /// events and interrupt masks at their defaults.
    fn reset_state(&self) {
        self.stop_all();
        *sync::lock(&self.features) = Features::default();
        self.wce.store(true, Ordering::Release);
        *sync::lock(&self.events) = Events::default();
        self.fatal.store(false, Ordering::Release);
        self.msi_pending.store(0, Ordering::Release);
        for b in &self.bad_bells {
            b.store(0, Ordering::Release);
        }
        let m = sync::read(&self.bells);
        for q in 0..=MAX_IO_QUEUES {
            for cq in [false, true] {
                if let Some(w) = m.u32(bell_offset(q, cq)) {
                    w.store(0, Ordering::Release);
                }
            }
        }
        drop(m);
        if self.intx.swap(false, Ordering::AcqRel) {
            if let Some(i) = self.irqs.get() {
                i.set_intx(false);
            }
        }
    }
}

/// A completion queue as migration carries it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCq {
    id: u16,
    base: u64,
    size: u32,
    iv: u16,
    ien: bool,
    state: queue::CqState,
    shadow: Option<(u64, u64)>,
}

/// A submission queue as migration carries it (a command stopped
/// part-way included: it runs again on the destination).
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedSq {
    id: u16,
    base: u64,
    size: u32,
    cq: u16,
    state: queue::SqState,
    shadow: Option<(u64, u64)>,
}

/// The controller's state for migration.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    regs: regs::Regs,
    page: u64,
    fatal: bool,
    wce: bool,
    features: Features,
    aer_outstanding: Vec<u16>,
    aer_pending: Vec<u32>,
    aer_masked: u8,
    dbbuf: Option<(u64, u64)>,
    cqs: Vec<SavedCq>,
    sqs: Vec<SavedSq>,
    /// Doorbell registers, SQ tail then CQ head, queue by queue.
    bells: Vec<u32>,
    msi_pending: u32,
}

impl Saved {
    /// Everything a client could have made up: ids, sizes, indexes,
    /// vectors, the page size, register bits, which CQ each SQ posts to.
    fn check(&self) -> Result<(), Errno> {
        let bad = Err(libc::EINVAL);
        let entries = 2..=abi::MAX_QUEUE_ENTRIES;
        if !self.page.is_power_of_two() || !(4096..=65536).contains(&self.page) {
            return bad;
        }
        let r = &self.regs;
        if r.cc & !abi::cc::WRITABLE != 0
            || r.csts & !(abi::csts::RDY | (3 << abi::csts::SHST_SHIFT)) != 0
            || r.aqa & !0x0fff_0fff != 0
            || r.asq & 0xfff != 0
            || r.acq & 0xfff != 0
        {
            return bad;
        }
        if self.aer_outstanding.len() > usize::from(abi::AERL) + 1
            || self.aer_pending.len() > 16
            || self.bells.len() != (usize::from(MAX_IO_QUEUES) + 1) * 2
        {
            return bad;
        }
        let mut seen_cq = [false; MAX_IO_QUEUES as usize + 1];
        for q in &self.cqs {
            let i = usize::from(q.id);
            if i >= seen_cq.len()
                || seen_cq[i]
                || !entries.contains(&q.size)
                || q.iv >= abi::VECTORS
                || q.state.tail >= q.size
                || q.state.head >= q.size
            {
                return bad;
            }
            seen_cq[i] = true;
        }
        let mut seen_sq = [false; MAX_IO_QUEUES as usize + 1];
        for q in &self.sqs {
            let i = usize::from(q.id);
            let cq_ok = seen_cq.get(usize::from(q.cq)).copied().unwrap_or(false) && ((q.id == 0) == (q.cq == 0));
            if i >= seen_sq.len() || seen_sq[i] || !entries.contains(&q.size) || q.state.head >= q.size || !cq_ok {
                return bad;
            }
            seen_sq[i] = true;
        }
        // A ready controller has its admin queues.
        if r.csts & abi::csts::RDY != 0 && r.csts & (3 << abi::csts::SHST_SHIFT) == 0 && !(seen_sq[0] && seen_cq[0]) {
            return bad;
        }
        Ok(())
    }
}

/// Offset of a doorbell in BAR 0 (and in the doorbell file).
fn bell_offset(qid: u16, cq: bool) -> u64 {
    abi::reg::DOORBELL + u64::from(qid) * 8 + if cq { 4 } else { 0 }
}

/// A new doorbell file, all zeroes (sealed against resizing, so a client
/// that maps it cannot truncate it under our mapping), mapped.
fn bell_file() -> std::io::Result<(File, Words)> {
    let f = iommu_core::memfd::create_sealed("nvme-doorbells", BELL_FILE).map_err(std::io::Error::other)?;
    let m = Words::map(&f, BELL_FILE)?;
    Ok((f, m))
}

/// The NVMe controller.
pub struct Nvme {
    ctrl: Arc<Ctrl>,
    bells: Arc<File>,
    ctx: Option<DeviceContext>,
    msix: bool,
    /// The doorbell page is offered for mmap.
    mmap_bells: bool,
}

impl Nvme {
    /// A controller whose namespace is `cfg.backing`.
    pub fn new(cfg: &Config) -> std::io::Result<Nvme> {
        let backing = Backing::open(&cfg.backing, cfg.size, cfg.read_only)?;
        Ok(Nvme::with_backing(backing, cfg.msix)?.trap_doorbells(cfg.trap_doorbells))
    }

    /// The same controller with its doorbell page offered for mmap
    /// (`trap` false, the default) or not (every doorbell write traps).
    pub fn trap_doorbells(mut self, trap: bool) -> Nvme {
        self.mmap_bells = !trap;
        self
    }

    /// A controller over an opened backing store.
    pub fn with_backing(backing: Backing, msix: bool) -> std::io::Result<Nvme> {
        let (f, words) = bell_file()?;
        let ctrl = Ctrl {
            regs: Mutex::new(regs::Regs::default()),
            bells: RwLock::new(words),
            backing,
            cqs: RwLock::new(vec![None; usize::from(MAX_IO_QUEUES) + 1]),
            threads: Mutex::new(Threads::default()),
            features: Mutex::new(Features::default()),
            wce: AtomicBool::new(true),
            events: Mutex::new(Events::default()),
            errors: Mutex::new(ErrorLog::default()),
            bad_bells: (0..(usize::from(MAX_IO_QUEUES) + 1) * 2).map(|_| AtomicU32::new(0)).collect(),
            gate: RwLock::new(true),
            quiescing: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            fatal: AtomicBool::new(false),
            page: AtomicU64::new(4096),
            intx: AtomicBool::new(false),
            intx_lock: Mutex::new(()),
            msi_pending: AtomicU32::new(0),
            stats: Stats::default(),
            started: Instant::now(),
            dma: OnceLock::new(),
            irqs: OnceLock::new(),
        };
        Ok(Nvme { ctrl: Arc::new(ctrl), bells: Arc::new(f), ctx: None, msix, mmap_bells: true })
    }
}

impl Drop for Nvme {
    fn drop(&mut self) {
        self.ctrl.stop_all();
    }
}

impl Device for Nvme {
    fn describe(&self) -> DeviceDesc {
        let ids = PciIds {
            vendor: 0x1b36,
            device: 0xd3a1,
            subsystem_vendor: 0x1b36,
            subsystem: 0x0001,
            // Mass storage, non-volatile memory, NVM Express.
            class: 0x01_0802,
            revision: 1,
        };
        let mut c = PciConfig::new(ids, true);
        c.set_bar(0, BarKind::Mem64, BAR0_SIZE, false);
        c.set_interrupt_pin(1);
        c.add_pm();
        c.add_msi(8);
        if self.msix {
            c.set_bar(4, BarKind::Mem32, 0x1000, false);
            c.add_msix(VECTORS, 4, 0, 4, 0x800);
        }
        c.add_pcie();
        let bar0 = RegionDesc {
            index: 0,
            size: BAR0_SIZE,
            read: true,
            write: true,
            mmap: self.mmap_bells.then(|| MmapDesc {
                file: self.bells.clone(),
                file_offset: 0,
                areas: vec![SparseArea { offset: abi::reg::DOORBELL, size: 0x1000 }],
            }),
        };
        let mut regions = vec![bar0];
        if self.msix {
            regions.push(RegionDesc { index: 4, size: 0x1000, read: true, write: true, mmap: None });
        }
        DeviceDesc {
            name: "nvme",
            config: c,
            regions,
            irqs: IrqLayout { intx: true, msi: 8, msix: if self.msix { u32::from(VECTORS) } else { 0 } },
            msix: self.msix.then_some(MsixDesc {
                table_bar: 4,
                table_offset: 0,
                pba_bar: 4,
                pba_offset: 0x800,
                vectors: u32::from(VECTORS),
            }),
            caps: DeviceCaps { pasid_width: 0, pri: false, dirty_tracking: true },
            io_fds: Vec::new(),
        }
    }

    fn start(&mut self, ctx: DeviceContext) {
        let _ = self.ctrl.irqs.set(ctx.irqs.clone());
        let _ = self.ctrl.dma.set(ctx.dma.clone());
        self.ctx = Some(ctx);
    }

    fn answers_inline(&self, index: u32, offset: u64, _len: usize, data: Option<&[u8]>) -> bool {
        // Reads, doorbells and register writes other than CC never wait
        // for a queue thread.
        index == 0 && (data.is_none() || offset >= abi::reg::DOORBELL || offset & !7 != abi::reg::INTMC)
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if index != 0 {
            return Err(libc::EINVAL);
        }
        regs::read(&self.ctrl, offset, buf)
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if index != 0 {
            return Err(libc::EINVAL);
        }
        let Some(ctx) = self.ctx.clone() else { return Err(libc::EIO) };
        regs::write(&self.ctrl, &ctx, offset, data)
    }

    fn config_event(&mut self, ev: ConfigEvent) {
        if ev == ConfigEvent::BusMaster(false) {
            // DMA is already refused: wait until no command is running, so
            // none does DMA after the config write's reply.
            self.ctrl.quiesce(|_| {});
        }
        self.ctrl.kick_all();
    }

    fn reset(&mut self) {
        self.ctrl.reset_state();
        *sync::lock(&self.ctrl.regs) = regs::Regs::default();
    }

    fn client_gone(&mut self) {
        // Queues address the departed client's memory: the controller is
        // reset (a driver enables it again), and the next client gets a
        // new doorbell file, all zeroes: nothing the departed client writes
        // through its mapping of the old one reaches it.
        self.reset();
        match bell_file() {
            Ok((f, m)) => {
                *sync::write(&self.ctrl.bells) = m;
                self.bells = Arc::new(f);
            }
            Err(e) => tracing::warn!("nvme keeps sharing its doorbell file with the departed client: {e}"),
        }
    }

    fn set_running(&mut self, running: bool) {
        if running {
            *sync::write(&self.ctrl.gate) = true;
        } else {
            self.ctrl.quiesce(|g| *g = false);
        }
        self.ctrl.kick_all();
    }

    fn save(&mut self) -> Result<Vec<u8>, Errno> {
        // Called while stopped: no queue thread runs a command, and a
        // command stopped part-way is in its queue's `pending`.
        let c = &self.ctrl;
        let t = sync::lock(&c.threads);
        let shadow = |sh: &queue::Shadow| sh.get();
        let sqs = t
            .sqs
            .iter()
            .flatten()
            .map(|(sq, _)| SavedSq {
                id: sq.id,
                base: sq.base,
                size: sq.size,
                cq: sq.cq.id,
                state: *sync::lock(&sq.state),
                shadow: shadow(&sq.shadow),
            })
            .collect();
        let dbbuf = t.dbbuf;
        drop(t);
        let cqs = sync::read(&c.cqs)
            .iter()
            .flatten()
            .map(|cq| SavedCq {
                id: cq.id,
                base: cq.base,
                size: cq.size,
                iv: cq.iv,
                ien: cq.ien,
                state: *sync::lock(&cq.state),
                shadow: shadow(&cq.shadow),
            })
            .collect();
        let e = sync::lock(&c.events);
        let saved = Saved {
            regs: *sync::lock(&c.regs),
            page: c.page.load(Ordering::Acquire),
            fatal: c.fatal.load(Ordering::Acquire),
            wce: c.wce.load(Ordering::Acquire),
            features: *sync::lock(&c.features),
            aer_outstanding: e.outstanding.clone(),
            aer_pending: e.pending.iter().copied().collect(),
            aer_masked: e.masked,
            dbbuf,
            cqs,
            sqs,
            bells: (0..=MAX_IO_QUEUES).flat_map(|q| [c.doorbell(q, false), c.doorbell(q, true)]).collect(),
            msi_pending: c.msi_pending.load(Ordering::Acquire),
        };
        drop(e);
        postcard::to_allocvec(&saved).map_err(|_| libc::ENOMEM)
    }

    fn load(&mut self, data: &[u8]) -> Result<(), Errno> {
        if data.is_empty() {
            // A disabled controller saved before queue state was carried.
            self.reset();
            return Ok(());
        }
        let s: Saved = postcard::from_bytes(data).map_err(|_| libc::EINVAL)?;
        s.check()?;
        let Some(ctx) = self.ctx.clone() else { return Err(libc::EIO) };
        let c = &self.ctrl;
        c.stop_all();
        *sync::lock(&c.regs) = s.regs;
        c.page.store(s.page, Ordering::Release);
        c.fatal.store(s.fatal, Ordering::Release);
        c.wce.store(s.wce, Ordering::Release);
        *sync::lock(&c.features) = s.features;
        *sync::lock(&c.events) = Events {
            outstanding: s.aer_outstanding.clone(),
            pending: s.aer_pending.iter().copied().collect(),
            masked: s.aer_masked,
        };
        c.msi_pending.store(s.msi_pending, Ordering::Release);
        for (i, v) in s.bells.iter().enumerate() {
            c.set_doorbell((i / 2) as u16, i % 2 == 1, *v);
        }
        let mut cqs: Vec<Option<Arc<Cq>>> = vec![None; usize::from(MAX_IO_QUEUES) + 1];
        for q in &s.cqs {
            let cq = Cq::new(q.id, q.base, q.size, q.iv, q.ien);
            *sync::lock(&cq.state) = q.state;
            cq.posted.store(q.state.tail, Ordering::Release);
            if let Some((db, ei)) = q.shadow {
                cq.shadow.set(db, ei);
            }
            cqs[usize::from(q.id)] = Some(Arc::new(cq));
        }
        *sync::write(&c.cqs) = cqs.clone();
        sync::lock(&c.threads).dbbuf = s.dbbuf;
        for q in &s.sqs {
            let Some(cq) = cqs.get(usize::from(q.cq)).cloned().flatten() else { return Err(libc::EINVAL) };
            let sq = Sq::new(q.id, q.base, q.size, cq);
            *sync::lock(&sq.state) = q.state;
            if let Some((db, ei)) = q.shadow {
                sq.shadow.set(db, ei);
            }
            if !c.spawn_sq(&ctx, Arc::new(sq)) {
                c.stop_all();
                return Err(libc::ENOMEM);
            }
        }
        c.recheck_intx();
        Ok(())
    }

    fn status(&self) -> Vec<String> {
        let r = sync::lock(&self.ctrl.regs);
        let mut out = vec![format!(
            "cc {:#x} csts {:#x} namespace {} blocks of {} bytes{}",
            r.cc,
            regs::csts(&self.ctrl, &r),
            self.ctrl.backing.blocks(),
            abi::LBA_SIZE,
            if self.ctrl.backing.read_only() { " read-only" } else { "" }
        )];
        drop(r);
        let st = &self.ctrl.stats;
        out.push(format!(
            "reads {} ({} bytes) writes {} ({} bytes) media errors {} errors logged {}",
            st.reads.load(Ordering::Relaxed),
            st.read_bytes.load(Ordering::Relaxed),
            st.writes.load(Ordering::Relaxed),
            st.written_bytes.load(Ordering::Relaxed),
            st.media_errors.load(Ordering::Relaxed),
            sync::lock(&self.ctrl.errors).count
        ));
        let t = sync::lock(&self.ctrl.threads);
        if let Some((db, ei)) = t.dbbuf {
            out.push(format!("shadow doorbells at {db:#x}, EventIdx at {ei:#x}"));
        }
        for (sq, _) in t.sqs.iter().flatten() {
            let st = *sync::lock(&sq.state);
            out.push(format!(
                "sq {} (cq {}): {} entries at {:#x}, head {}{}",
                sq.id,
                sq.cq.id,
                sq.size,
                sq.base,
                st.head,
                if st.pending.is_some() { ", a command stopped part-way" } else { "" }
            ));
        }
        drop(t);
        for cq in sync::read(&self.ctrl.cqs).iter().flatten() {
            let s = *sync::lock(&cq.state);
            out.push(format!(
                "cq {}: {} entries at {:#x}, tail {} head {} phase {} vector {}{}",
                cq.id,
                cq.size,
                cq.base,
                s.tail,
                s.head,
                u8::from(s.phase),
                cq.iv,
                if cq.ien { "" } else { " (interrupts off)" }
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue::{CqState, SqState};

    fn valid() -> Saved {
        let cq = |id: u16| SavedCq {
            id,
            base: 0x10_0000 * u64::from(id + 1),
            size: 64,
            iv: id,
            ien: true,
            state: CqState { tail: 5, phase: true, head: 3 },
            shadow: None,
        };
        let sq = |id: u16| SavedSq {
            id,
            base: 0x20_0000 * u64::from(id + 1),
            size: 64,
            cq: id,
            state: SqState { head: 7, pending: None },
            shadow: Some((0x9000 + u64::from(id) * 8, 0xa000 + u64::from(id) * 8)),
        };
        Saved {
            regs: regs::Regs {
                cc: 0x0046_0001,
                csts: abi::csts::RDY,
                intms: 0,
                aqa: 0x003f_003f,
                asq: 0x1000,
                acq: 0x2000,
            },
            page: 4096,
            fatal: false,
            wce: true,
            features: Features::default(),
            aer_outstanding: vec![3],
            aer_pending: vec![],
            aer_masked: 0,
            dbbuf: Some((0x9000, 0xa000)),
            cqs: vec![cq(0), cq(1)],
            sqs: vec![sq(0), sq(1)],
            bells: vec![0; 18],
            msi_pending: 0,
        }
    }

    #[test]
    fn a_device_not_yet_started_describes_itself_and_reports_its_state() {
        let p = std::env::temp_dir().join(format!("nvme-status-{}", std::process::id()));
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let cfg = Config { backing: p.clone(), size: None, read_only: true, msix: false, trap_doorbells: false };
        let d = Nvme::new(&cfg).unwrap();
        let desc = d.describe();
        assert_eq!(desc.name, "nvme");
        assert!(desc.msix.is_none() && desc.irqs.msix == 0, "--no-msix");
        let bar0 = desc.regions.iter().find(|r| r.index == 0).unwrap();
        let areas = &bar0.mmap.as_ref().unwrap().areas;
        assert_eq!((areas[0].offset, areas[0].size), (abi::reg::DOORBELL, 0x1000));
        let s = d.status();
        assert!(s[0].contains("namespace 2048 blocks of 512 bytes read-only"), "{s:?}");
        assert_eq!(s.len(), 2, "no queues yet: {s:?}");
        let d = d.trap_doorbells(true);
        let bar0 = d.describe().regions.into_iter().find(|r| r.index == 0).unwrap();
        assert!(bar0.mmap.is_none(), "--trap-doorbells offers no mmap");
        drop(d);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn migration_state_a_client_made_up_is_refused() {
        assert_eq!(valid().check(), Ok(()));
        type Change = Box<dyn Fn(&mut Saved)>;
        let cases: Vec<(&str, Change)> = vec![
            ("page not a power of two", Box::new(|s| s.page = 5000)),
            ("page above 64 KiB", Box::new(|s| s.page = 1 << 17)),
            ("CC reserved bits", Box::new(|s| s.regs.cc |= 1 << 30)),
            ("CSTS.CFS carried as a register bit", Box::new(|s| s.regs.csts |= abi::csts::CFS)),
            ("ASQ unaligned", Box::new(|s| s.regs.asq |= 8)),
            ("too many AERs", Box::new(|s| s.aer_outstanding = vec![0; 9])),
            ("too many events", Box::new(|s| s.aer_pending = vec![0; 17])),
            ("doorbells", Box::new(|s| s.bells.push(0))),
            ("CQ id past the last", Box::new(|s| s.cqs[1].id = MAX_IO_QUEUES + 1)),
            ("CQ twice", Box::new(|s| s.cqs[1].id = 0)),
            ("CQ of one entry", Box::new(|s| s.cqs[1].size = 1)),
            ("CQ too big", Box::new(|s| s.cqs[1].size = abi::MAX_QUEUE_ENTRIES + 1)),
            ("CQ vector", Box::new(|s| s.cqs[1].iv = abi::VECTORS)),
            ("CQ tail outside", Box::new(|s| s.cqs[1].state.tail = 64)),
            ("CQ head outside", Box::new(|s| s.cqs[1].state.head = u32::MAX)),
            ("SQ head outside", Box::new(|s| s.sqs[1].state.head = 64)),
            ("SQ on a missing CQ", Box::new(|s| s.sqs[1].cq = 2)),
            ("I/O SQ on the admin CQ", Box::new(|s| s.sqs[1].cq = 0)),
            ("admin SQ on an I/O CQ", Box::new(|s| s.sqs[0].cq = 1)),
            ("SQ twice", Box::new(|s| s.sqs[1].id = 0)),
            (
                "ready without admin queues",
                Box::new(|s| {
                    s.sqs.remove(0);
                }),
            ),
        ];
        for (what, f) in cases {
            let mut s = valid();
            f(&mut s);
            assert_eq!(s.check(), Err(libc::EINVAL), "{what}");
        }
        // Shut down: no queues is fine.
        let mut s = valid();
        s.regs.csts |= abi::csts::SHST_COMPLETE;
        s.sqs.clear();
        s.cqs.clear();
        assert_eq!(s.check(), Ok(()));
    }
}
