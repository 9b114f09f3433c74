//! `test-device`: a small PCIe function that exercises every part of the
//! framework (BARs of every kind, sparse mmap, MSI-X, INTx, an ioeventfd
//! doorbell, a DMA copy engine with vPASID tags, migration). Its register
//! interface is in `docs/devices/test-device.md`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{unbounded, Sender};
use iommu_core::sync;
use iommu_core::types::{DeviceCaps, FaultReason};
use serde::{Deserialize, Serialize};

use crate::device::{
    reg_merge, reg_read, Device, DeviceContext, DeviceDesc, Errno, IoFdDesc, MmapDesc, MsixDesc, RegionDesc,
};
use crate::dma::{DeviceDma, DmaSpace, Route};
use crate::irq::IrqLayout;
use crate::pci::{BarKind, PciConfig, PciIds};
use crate::proto::SparseArea;

/// Register offsets of BAR 0.
pub mod regs {
    /// Device id register.
    pub const ID: u64 = 0x00;
    /// Scratch register.
    pub const SCRATCH: u64 = 0x08;
    /// DMA source IOVA.
    pub const DMA_SRC: u64 = 0x10;
    /// DMA destination IOVA.
    pub const DMA_DST: u64 = 0x18;
    /// DMA length.
    pub const DMA_LEN: u64 = 0x20;
    /// DMA PASID tag.
    pub const DMA_PASID: u64 = 0x24;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x28;
    /// DMA status.
    pub const DMA_STATUS: u64 = 0x2c;
    /// Completed copies.
    pub const DMA_DONE: u64 = 0x30;
    /// Failed copies.
    pub const DMA_ERRORS: u64 = 0x34;
    /// Raise an interrupt vector.
    pub const IRQ: u64 = 0x38;
    /// Drive INTx.
    pub const INTX: u64 = 0x3c;
    /// Doorbell counter.
    pub const DOORBELL: u64 = 0x40;
    /// Value of the ID register.
    pub const ID_VALUE: u32 = 0x7e57_0001;
    /// Status: idle.
    pub const STATUS_IDLE: u32 = 0;
    /// Status: busy.
    pub const STATUS_BUSY: u32 = 1;
    /// Status: done.
    pub const STATUS_DONE: u32 = 2;
    /// Status: error.
    pub const STATUS_ERROR: u32 = 3;
    /// DMA_PASID: tagged.
    pub const PASID_VALID: u32 = 1 << 31;
}

/// Size of BAR 1.
pub const BAR1_SIZE: u64 = 64 * 1024;
/// Largest copy.
pub const MAX_COPY: u32 = 1 << 20;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Regs {
    scratch: u64,
    src: u64,
    dst: u64,
    len: u32,
    pasid: u32,
    status: u32,
    done: u32,
    errors: u32,
    doorbell: u32,
    io: Vec<u8>,
}

struct Shared {
    regs: Mutex<Regs>,
    running: Mutex<bool>,
    resume: Condvar,
    /// Bumped by reset and by a client leaving: queued copies of an older
    /// generation are dropped.
    generation: std::sync::atomic::AtomicU64,
    /// The device's DMA, once started.
    dma: std::sync::OnceLock<Arc<crate::dma::Dma>>,
}

impl Shared {
    /// Waits for the copy in flight (it runs holding `running`). A copy
    /// waiting for client memory is given up (it ends with an error): the
    /// caller answers a client command, and the client serves our DMA only
    /// after that answer.
    fn wait_copy(&self) -> std::sync::MutexGuard<'_, bool> {
        let _fence = self.dma.get().map(|d| d.fence_client());
        sync::lock(&self.running)
    }

    /// Drops queued copies and waits for the one in flight.
    fn cancel(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(self.wait_copy());
        let mut r = sync::lock(&self.regs);
        if r.status == regs::STATUS_BUSY {
            r.status = regs::STATUS_IDLE;
        }
    }
}

struct Copy {
    generation: u64,
    src: u64,
    dst: u64,
    len: u32,
    route: Route,
}

/// The test device.
pub struct TestDevice {
    shared: Arc<Shared>,
    ram: Arc<File>,
    engine: Option<Sender<Copy>>,
    irqs: Option<Arc<crate::irq::Irqs>>,
    msix: bool,
}

impl TestDevice {
    /// A test device with its BAR 1 memory in a new memfd.
    pub fn new() -> std::io::Result<TestDevice> {
        TestDevice::with_msix(true)
    }

    /// A test device with or without its MSI-X capability (and BAR 2,
    /// which holds only the MSI-X table and PBA).
    pub fn with_msix(msix: bool) -> std::io::Result<TestDevice> {
        let ram = iommu_core::memfd::create_sealed("test-device-bar1", BAR1_SIZE).map_err(std::io::Error::other)?;
        let regs = Regs { io: vec![0; 256], ..Regs::default() };
        Ok(TestDevice {
            shared: Arc::new(Shared {
                regs: Mutex::new(regs),
                running: Mutex::new(true),
                resume: Condvar::new(),
                generation: std::sync::atomic::AtomicU64::new(0),
                dma: std::sync::OnceLock::new(),
            }),
            ram: Arc::new(ram),
            engine: None,
            irqs: None,
            msix,
        })
    }

    fn engine(shared: Arc<Shared>, ctx: DeviceContext, rx: crossbeam_channel::Receiver<Copy>) {
        while let Ok(c) = rx.recv() {
            let mut run = sync::lock(&shared.running);
            while !*run {
                run = super::wait(&shared.resume, &shared.running, run);
            }
            if c.generation != shared.generation.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            // The copy runs with `running` held, so a stop waits for it.
            let mut buf = vec![0u8; c.len as usize];
            let copy = |buf: &mut [u8]| {
                let mem = ctx.dma.space(c.route);
                mem.read(c.src, buf).and_then(|_| mem.write(c.dst, buf))
            };
            let mut res = copy(&mut buf);
            // Given up for a fence (client memory; see `Shared::wait_copy`):
            // done again once the fence is down and the device runs, unless
            // the copy was dropped meanwhile.
            let mut dropped = false;
            while res.as_ref().is_err_and(|e| e.cancelled()) {
                drop(run);
                ctx.dma.wait_client(Duration::from_secs(1));
                run = sync::lock(&shared.running);
                while !*run {
                    run = super::wait(&shared.resume, &shared.running, run);
                }
                if c.generation != shared.generation.load(std::sync::atomic::Ordering::SeqCst) {
                    dropped = true;
                    break;
                }
                res = copy(&mut buf);
            }
            if dropped {
                continue;
            }
            if let Err(e) = &res {
                tracing::debug!("test-device copy failed: {e}");
                if let crate::dma::Error::NoPasid(_) = e {
                    ctx.dma.space(c.route).report_fault(c.src, false, FaultReason::NotPresent);
                }
            }
            {
                let mut r = sync::lock(&shared.regs);
                match res {
                    Ok(()) => {
                        r.status = regs::STATUS_DONE;
                        r.done = r.done.wrapping_add(1);
                    }
                    Err(_) => {
                        r.status = regs::STATUS_ERROR;
                        r.errors = r.errors.wrapping_add(1);
                    }
                }
            }
            // The interrupt is part of the copy: raised before a stop can return.
            ctx.irqs.notify(0);
            drop(run);
        }
    }
}

impl Device for TestDevice {
    fn describe(&self) -> DeviceDesc {
        let ids = PciIds {
            vendor: 0x1b36,
            device: 0x7e57,
            subsystem_vendor: 0x1b36,
            subsystem: 0x0001,
            class: 0xff_0000,
            revision: 1,
        };
        let mut c = PciConfig::new(ids, true);
        c.set_bar(0, BarKind::Mem32, 0x1000, false);
        c.set_bar(1, BarKind::Mem32, BAR1_SIZE, false);
        if self.msix {
            c.set_bar(2, BarKind::Mem32, 0x1000, false);
        }
        c.set_bar(4, BarKind::Io, 0x100, false);
        c.set_rom(0x8000);
        c.set_interrupt_pin(1);
        c.add_pm();
        c.add_msi(8);
        if self.msix {
            c.add_msix(8, 2, 0, 2, 0x800);
        }
        c.add_pcie();
        c.add_pasid(20);
        c.add_ats();
        c.add_pri(32);
        let rw = |index, size| RegionDesc { index, size, read: true, write: true, mmap: None };
        let mut bar1 = rw(1, BAR1_SIZE);
        bar1.mmap = Some(MmapDesc {
            file: self.ram.clone(),
            file_offset: 0,
            areas: vec![SparseArea { offset: 0, size: 0x4000 }, SparseArea { offset: 0x8000, size: 0x8000 }],
        });
        let mut regions = vec![rw(0, 0x1000), bar1];
        if self.msix {
            regions.push(rw(2, 0x1000));
        }
        regions.push(rw(4, 0x100));
        regions.push(RegionDesc { index: 6, size: 0x8000, read: true, write: false, mmap: None });
        DeviceDesc {
            name: "test-device",
            config: c,
            regions,
            irqs: IrqLayout { intx: true, msi: 8, msix: if self.msix { 8 } else { 0 } },
            msix: self.msix.then_some(MsixDesc {
                table_bar: 2,
                table_offset: 0,
                pba_bar: 2,
                pba_offset: 0x800,
                vectors: 8,
            }),
            caps: DeviceCaps { pasid_width: 20, pri: true, dirty_tracking: true },
            io_fds: vec![IoFdDesc { region: 0, offset: regs::DOORBELL, size: 4, datamatch: None }],
        }
    }

    fn start(&mut self, ctx: DeviceContext) {
        self.irqs = Some(ctx.irqs.clone());
        let _ = self.shared.dma.set(ctx.dma.clone());
        let (tx, rx) = unbounded();
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new().name("test-device-engine".into()).spawn(move || {
            TestDevice::engine(shared, ctx, rx);
        });
        match spawned {
            Ok(_) => self.engine = Some(tx),
            Err(e) => tracing::error!("test-device cannot start its engine: {e}"),
        }
    }

    fn answers_inline(&self, _index: u32, _offset: u64, _len: usize, _data: Option<&[u8]>) -> bool {
        // Registers, RAM and the I/O BAR are memory; a DMA command is
        // handed to the copy thread without waiting for it.
        true
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        match index {
            0 => {
                let r = sync::lock(&self.shared.regs);
                let (base, v) = match offset & !7 {
                    0x00 => (0, u64::from(regs::ID_VALUE)),
                    0x08 => (0x08, r.scratch),
                    0x10 => (0x10, r.src),
                    0x18 => (0x18, r.dst),
                    0x20 => (0x20, u64::from(r.len) | (u64::from(r.pasid) << 32)),
                    0x28 => (0x28, u64::from(r.status) << 32),
                    0x30 => (0x30, u64::from(r.done) | (u64::from(r.errors) << 32)),
                    0x40 => (0x40, u64::from(r.doorbell)),
                    _ => (offset & !7, 0),
                };
                if (offset - base) as usize + buf.len() > 8 {
                    return Err(libc::EINVAL);
                }
                reg_read(v, offset - base, buf);
                Ok(())
            }
            1 => self.ram.read_exact_at(buf, offset).map_err(|_| libc::EIO),
            4 => {
                let r = sync::lock(&self.shared.regs);
                let s = r.io.get(offset as usize..offset as usize + buf.len()).ok_or(libc::EINVAL)?;
                buf.copy_from_slice(s);
                Ok(())
            }
            6 => {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (offset as usize + i) as u8;
                }
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            0 => {
                let base = offset & !7;
                if (offset - base) as usize + data.len() > 8 {
                    return Err(libc::EINVAL);
                }
                let off = offset - base;
                let mut r = sync::lock(&self.shared.regs);
                match base {
                    0x08 => r.scratch = reg_merge(r.scratch, off, data),
                    0x10 => r.src = reg_merge(r.src, off, data),
                    0x18 => r.dst = reg_merge(r.dst, off, data),
                    0x20 => {
                        let v = reg_merge(u64::from(r.len) | (u64::from(r.pasid) << 32), off, data);
                        r.len = v as u32;
                        r.pasid = (v >> 32) as u32;
                    }
                    0x28 if off == 0 && data.first() == Some(&1) => {
                        // One copy at a time: a command while busy is an error.
                        if r.len == 0 || r.len > MAX_COPY || r.status == regs::STATUS_BUSY {
                            r.status = regs::STATUS_ERROR;
                            r.errors = r.errors.wrapping_add(1);
                            return Ok(());
                        }
                        let route = if r.pasid & regs::PASID_VALID != 0 {
                            Route::Vpasid(r.pasid & 0xf_ffff)
                        } else {
                            Route::Rid
                        };
                        r.status = regs::STATUS_BUSY;
                        let generation = self.shared.generation.load(std::sync::atomic::Ordering::SeqCst);
                        let job = Copy { generation, src: r.src, dst: r.dst, len: r.len, route };
                        drop(r);
                        if let Some(e) = &self.engine {
                            let _ = e.send(job);
                        }
                    }
                    0x38 if off == 0 => {
                        let v = reg_merge(0, 0, data) as u32;
                        drop(r);
                        if let Some(irqs) = self.irqs() {
                            irqs.notify(v);
                        }
                    }
                    0x38 if off == 4 => {
                        let level = data.first().copied().unwrap_or(0) != 0;
                        drop(r);
                        if let Some(irqs) = self.irqs() {
                            irqs.set_intx(level);
                        }
                    }
                    0x40 if off == 0 => r.doorbell = r.doorbell.wrapping_add(1),
                    _ => {}
                }
                Ok(())
            }
            1 => self.ram.write_all_at(data, offset).map_err(|_| libc::EIO),
            4 => {
                let mut r = sync::lock(&self.shared.regs);
                let s = r.io.get_mut(offset as usize..offset as usize + data.len()).ok_or(libc::EINVAL)?;
                s.copy_from_slice(data);
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }

    fn reset(&mut self) {
        self.shared.cancel();
        *sync::lock(&self.shared.regs) = Regs { io: vec![0; 256], ..Regs::default() };
    }

    fn client_gone(&mut self) {
        self.shared.cancel();
        // The departed client may still have BAR 1 mapped: the next one
        // gets a new memfd with the same contents.
        let fresh = iommu_core::memfd::create_sealed("test-device-bar1", BAR1_SIZE)
            .map_err(std::io::Error::other)
            .and_then(|f| {
                let mut buf = vec![0u8; BAR1_SIZE as usize];
                self.ram.read_exact_at(&mut buf, 0)?;
                f.write_all_at(&buf, 0)?;
                Ok(f)
            });
        match fresh {
            Ok(f) => self.ram = Arc::new(f),
            Err(e) => tracing::warn!("test-device keeps sharing BAR 1 with the departed client: {e}"),
        }
    }

    fn config_event(&mut self, ev: crate::pci::ConfigEvent) {
        if ev == crate::pci::ConfigEvent::BusMaster(false) {
            // Bus mastering may have gone off: a copy runs holding
            // `running`, so taking it waits for the one in flight, and no
            // DMA happens after the config write's reply.
            drop(self.shared.wait_copy());
        }
    }

    fn set_running(&mut self, running: bool) {
        *self.shared.wait_copy() = running;
        self.shared.resume.notify_all();
    }

    fn save(&mut self) -> Result<Vec<u8>, Errno> {
        let regs = sync::lock(&self.shared.regs).clone();
        let mut ram = vec![0u8; BAR1_SIZE as usize];
        self.ram.read_exact_at(&mut ram, 0).map_err(|_| libc::EIO)?;
        postcard::to_allocvec(&(regs, ram)).map_err(|_| libc::ENOMEM)
    }

    fn load(&mut self, data: &[u8]) -> Result<(), Errno> {
        let (regs, ram): (Regs, Vec<u8>) = postcard::from_bytes(data).map_err(|_| libc::EINVAL)?;
        if ram.len() != BAR1_SIZE as usize || regs.io.len() != 256 || regs.len > MAX_COPY {
            return Err(libc::EINVAL);
        }
        self.ram.write_all_at(&ram, 0).map_err(|_| libc::EIO)?;
        *sync::lock(&self.shared.regs) = regs;
        Ok(())
    }

    fn status(&self) -> Vec<String> {
        let r = sync::lock(&self.shared.regs);
        vec![format!("copies done {} failed {} doorbell {}", r.done, r.errors, r.doorbell)]
    }
}

impl TestDevice {
    fn irqs(&self) -> Option<Arc<crate::irq::Irqs>> {
        self.irqs.clone()
    }
}
