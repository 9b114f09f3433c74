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
//!
//! One job per file: `abi` is the register and descriptor ABI, `execute`
//! runs one descriptor in steps, `queue` holds the state shared with the
//! queue threads and the threads themselves, and this module is the PCI
//! function (its description, BAR decoding, resets, config events,
//! migration state and status).

mod abi;
mod execute;
mod queue;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use iommu_core::sync;
use iommu_core::types::DeviceCaps;

use crate::device::{reg_merge, reg_read, Device, DeviceContext, DeviceDesc, Errno, MmapDesc, MsixDesc, RegionDesc};
use crate::irq::IrqLayout;
use crate::pci::{BarKind, ConfigEvent, PciConfig, PciIds};
use crate::proto::SparseArea;

use super::Options;
use queue::{doorbell_page, QueueRegs, Regs, Shared};

pub use abi::{flag, op, regs, status, Completion, Descriptor, COMPLETION_SIZE, DESC_SIZE, MAX_RING, MAX_XFER, QUEUES};
pub use execute::{execute, Outcome, Progress, Step, STEP};

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
            shared: Arc::new(Shared::new(doorbells)),
            bar2: Arc::new(bar2),
            threads: Vec::new(),
            irqs: None,
            opts,
        })
    }

    /// The 8-byte register word at `base` (8-aligned) of BAR 0.
    fn reg_word(&self, r: &Regs, base: u64) -> u64 {
        match base {
            // ID, VERSION.
            regs::ID => u64::from(regs::ID_VALUE) | (u64::from(regs::VERSION_VALUE) << 32),
            // NUM_QUEUES, MAX_XFER.
            regs::NUM_QUEUES => QUEUES as u64 | (u64::from(MAX_XFER) << 32),
            // CTRL, STATUS.
            regs::CTRL => u64::from(r.enabled) | (u64::from(r.enabled) << 32),
            regs::INTX_STATUS => u64::from(r.intx_status),
            _ => {
                let Some((qi, reg)) = queue_reg(base) else { return 0 };
                let q = &r.queues[qi];
                match reg {
                    regs::Q_RING_BASE => q.ring_base,
                    // RING_SIZE, RING_PASID.
                    regs::Q_RING_SIZE => u64::from(q.ring_size) | (u64::from(q.ring_pasid) << 32),
                    // Q_CTRL, HEAD.
                    regs::Q_CTRL => u64::from(q.ctrl) | (u64::from(q.head) << 32),
                    // TAIL, Q_STATUS.
                    regs::Q_TAIL => {
                        let st = (q.ctrl & regs::Q_CTRL_ENABLE)
                            | (u32::from(q.halted) << 1)
                            | (u32::from(q.cmpl_fault) << 2);
                        u64::from(self.shared.doorbell(qi)) | (u64::from(st) << 32)
                    }
                    regs::Q_COMPLETED => q.completed,
                    regs::Q_ERRORS => u64::from(q.errors),
                    _ => 0,
                }
            }
        }
    }
}

/// The queue and the offset within its block of the BAR 0 offset `off`,
/// if `off` is in a queue block.
fn queue_reg(off: u64) -> Option<(usize, u64)> {
    let rel = off.checked_sub(regs::QUEUE)?;
    let q = rel / regs::QUEUE_STRIDE;
    (q < QUEUES as u64).then_some((q as usize, rel % regs::QUEUE_STRIDE))
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
            match std::thread::Builder::new().name(format!("dma-engine-q{q}")).spawn(move || queue::queue_loop(s, c, q))
            {
                Ok(t) => self.threads.push(t),
                Err(e) => tracing::error!("dma-engine cannot start queue {q}: {e}"),
            }
        }
    }

    fn answers_inline(&self, index: u32, offset: u64, _len: usize, data: Option<&[u8]>) -> bool {
        let Some(data) = data else { return true };
        if index != 0 {
            // Doorbells in BAR 2.
            return true;
        }
        // What waits for the queue threads: disabling the device, and
        // either edge of a queue's enable.
        let base = offset & !7;
        let off = offset - base;
        let r = sync::lock(&self.shared.regs);
        match base {
            regs::CTRL => !(r.enabled && reg_merge(self.reg_word(&r, base), off, data) & 1 == 0),
            _ => match queue_reg(base) {
                Some((qi, regs::Q_CTRL)) if off < 4 => {
                    let q = &r.queues[qi];
                    let ctrl = reg_merge(u64::from(q.ctrl) | (u64::from(q.head) << 32), off, data) as u32;
                    (ctrl ^ q.ctrl) & regs::Q_CTRL_ENABLE == 0
                }
                _ => true,
            },
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
                // Which queue threads the write concerns.
                let mut wake = None;
                match base {
                    regs::CTRL => {
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
                        if en != r.enabled {
                            wake = Some(None);
                        }
                        r.enabled = en;
                    }
                    regs::INTX_STATUS => {
                        // Write 1 to clear (only the bytes written count);
                        // INTx drops when nothing is left.
                        r.intx_status &= !(reg_merge(0, off, data) as u32);
                        if r.intx_status == 0 {
                            if let Some(i) = &self.irqs {
                                i.set_intx(false);
                            }
                        }
                    }
                    _ => {
                        if let Some((qi, reg)) = queue_reg(base) {
                            let q = &mut r.queues[qi];
                            let on = q.ctrl & regs::Q_CTRL_ENABLE != 0;
                            match reg {
                                regs::Q_RING_BASE if !on => q.ring_base = v,
                                regs::Q_RING_SIZE if !on => {
                                    let size = v as u32;
                                    q.ring_size =
                                        if size.is_power_of_two() && (2..=MAX_RING).contains(&size) { size } else { 0 };
                                    q.ring_pasid = (v >> 32) as u32 & (regs::PASID_VALID | 0xf_ffff);
                                }
                                regs::Q_CTRL if off < 4 => {
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
                                        self.shared.wake_queue(qi);
                                        return Ok(());
                                    }
                                    // Only Q_CTRL_IRQ changed: nothing to wake.
                                    q.ctrl = ctrl;
                                }
                                regs::Q_TAIL if off < 4 => {
                                    doorbell = Some((qi, v as u32));
                                    // A doorbell at HEAD submits nothing.
                                    if v as u32 != q.head {
                                        wake = Some(Some(qi));
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                }
                drop(r);
                if let Some((q, t)) = doorbell {
                    self.shared.set_doorbell(q, t);
                }
                match wake {
                    Some(Some(q)) => self.shared.wake_queue(q),
                    Some(None) => self.shared.wake(),
                    None => {}
                }
                Ok(())
            }
            2 => {
                self.bar2.write_all_at(data, offset).map_err(|_| libc::EIO)?;
                // Doorbells are 8 bytes apart: wake the queues whose
                // doorbell the write touched.
                let first = offset / 8;
                let last = (offset + data.len().max(1) as u64 - 1) / 8;
                for q in first..=last.min(QUEUES as u64 - 1) {
                    self.shared.wake_queue(q as usize);
                }
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
