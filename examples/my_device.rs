//! A device of your own, written against the public API of
//! `vfio_user_server` only: a checksum engine with five registers, one DMA
//! and one interrupt. `docs/devices/writing-a-device.md` explains each
//! part; `tests/example_device.rs` drives this device through the
//! project's client.
//!
//! BAR 0 (4 KiB): 0x00 ID (RO, 0x5eed0001), 0x08 ADDR (u64, an IOVA),
//! 0x10 LEN (bytes, 1 to 64 KiB), 0x14 CMD (write 1: read LEN bytes at
//! ADDR by DMA and sum them), 0x18 STATUS (0 idle, 1 busy, 2 done,
//! 3 error), 0x1c SUM (the byte sum, wrapping at 2^32). The end of each
//! command raises interrupt vector 0 (MSI, else INTx).
//!
//! `cargo run --example my_device -- --socket-path PATH [--core PATH]`

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use iommu_core::sync;
use iommu_core::types::DeviceCaps;
use vfio_user_server::device::{reg_merge, reg_read, Device, DeviceContext, DeviceDesc, Errno, RegionDesc};
use vfio_user_server::dma::{DeviceDma, DmaSpace, Route};
use vfio_user_server::irq::IrqLayout;
use vfio_user_server::pci::{BarKind, ConfigEvent, PciConfig, PciIds};

/// Register offsets and values.
pub mod regs {
    pub const ID: u64 = 0x00;
    pub const ADDR: u64 = 0x08;
    pub const LEN: u64 = 0x10;
    pub const CMD: u64 = 0x14;
    pub const STATUS: u64 = 0x18;
    pub const SUM: u64 = 0x1c;
    pub const ID_VALUE: u32 = 0x5eed_0001;
    pub const MAX_LEN: u32 = 64 * 1024;
    pub const IDLE: u32 = 0;
    pub const BUSY: u32 = 1;
    pub const DONE: u32 = 2;
    pub const ERROR: u32 = 3;
}

#[derive(Default)]
struct Regs {
    addr: u64,
    len: u32,
    status: u32,
    sum: u32,
}

/// The checksum engine.
#[derive(Default)]
pub struct Checksum {
    regs: Arc<Mutex<Regs>>,
    /// Held while a command's DMA runs: taking it waits for that DMA.
    dma_in_flight: Arc<Mutex<()>>,
    /// Bumped by resets: a command of an older generation is dropped.
    generation: Arc<AtomicU64>,
    ctx: Option<DeviceContext>,
}

impl Checksum {
    /// Waits until no command does DMA. DMA waiting for the client (guest
    /// RAM without an fd) is given up first: the client answers it only
    /// after we answer the command we are working on.
    fn quiesce(&self) {
        let _fence = self.ctx.as_ref().map(|c| c.dma.fence_client());
        drop(sync::lock(&self.dma_in_flight));
    }

    /// Runs one command on a thread of its own: the device thread never
    /// waits for DMA.
    fn run_command(&self, ctx: DeviceContext, addr: u64, len: u32) {
        let (regs, busy, gen) = (self.regs.clone(), self.dma_in_flight.clone(), self.generation.clone());
        let mine = gen.load(Ordering::SeqCst);
        std::thread::spawn(move || {
            let _running = sync::lock(&busy);
            if gen.load(Ordering::SeqCst) != mine {
                return;
            }
            let mut buf = vec![0u8; len as usize];
            let read = ctx.dma.space(Route::Rid).read(addr, &mut buf);
            let mut r = sync::lock(&regs);
            match read {
                Ok(()) => {
                    r.sum = buf.iter().fold(0u32, |s, b| s.wrapping_add(u32::from(*b)));
                    r.status = regs::DONE;
                }
                // A fault (reported to the core already), bus mastering
                // off, a client that did not serve its memory.
                Err(_) => r.status = regs::ERROR,
            }
            drop(r);
            ctx.irqs.notify(0);
        });
    }
}

impl Device for Checksum {
    fn describe(&self) -> DeviceDesc {
        let ids = PciIds {
            vendor: 0x1b36,
            device: 0x5eed,
            subsystem_vendor: 0x1b36,
            subsystem: 1,
            class: 0xff_0000,
            revision: 1,
        };
        let mut config = PciConfig::new(ids, true);
        config.set_bar(0, BarKind::Mem32, 0x1000, false);
        config.set_interrupt_pin(1);
        config.add_pm();
        config.add_msi(1);
        config.add_pcie();
        DeviceDesc {
            name: "checksum",
            config,
            regions: vec![RegionDesc { index: 0, size: 0x1000, read: true, write: true, mmap: None }],
            irqs: IrqLayout { intx: true, msi: 1, msix: 0 },
            msix: None,
            caps: DeviceCaps { pasid_width: 0, pri: false, dirty_tracking: false },
            io_fds: Vec::new(),
        }
    }

    fn start(&mut self, ctx: DeviceContext) {
        self.ctx = Some(ctx);
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let base = offset & !7;
        if index != 0 || (offset - base) as usize + buf.len() > 8 {
            return Err(libc::EINVAL);
        }
        let r = sync::lock(&self.regs);
        let word = match base {
            regs::ID => u64::from(regs::ID_VALUE),
            regs::ADDR => r.addr,
            regs::LEN => u64::from(r.len),
            regs::STATUS => u64::from(r.status) | (u64::from(r.sum) << 32),
            _ => 0,
        };
        reg_read(word, offset - base, buf);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let base = offset & !7;
        if index != 0 || (offset - base) as usize + data.len() > 8 {
            return Err(libc::EINVAL);
        }
        let mut r = sync::lock(&self.regs);
        match base {
            regs::ADDR => r.addr = reg_merge(r.addr, offset - base, data),
            regs::LEN => {
                let v = reg_merge(u64::from(r.len), offset - base, data);
                r.len = v as u32;
                // CMD is the upper half of this word.
                if offset + data.len() as u64 > regs::CMD && (v >> 32) as u32 == 1 {
                    let (addr, len) = (r.addr, r.len);
                    if len == 0 || len > regs::MAX_LEN || r.status == regs::BUSY {
                        r.status = regs::ERROR;
                        return Ok(());
                    }
                    r.status = regs::BUSY;
                    drop(r);
                    if let Some(ctx) = self.ctx.clone() {
                        self.run_command(ctx, addr, len);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn config_event(&mut self, ev: ConfigEvent) {
        if ev == ConfigEvent::BusMaster(false) {
            // No DMA may follow the config write's reply.
            self.quiesce();
        }
    }

    fn reset(&mut self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.quiesce();
        *sync::lock(&self.regs) = Regs::default();
    }
}

fn main() -> anyhow::Result<()> {
    use vfio_user_server::server::{Options, Server};
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let mut args = std::env::args().skip(1);
    let (mut socket, mut core) = (None, iommu_core::server::default_socket_path());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket-path" => socket = args.next(),
            "--core" => core = args.next().map(Into::into).unwrap_or(core),
            other => anyhow::bail!("unknown argument {other:?}: my_device --socket-path PATH [--core PATH]"),
        }
    }
    let Some(socket) = socket else { anyhow::bail!("give --socket-path PATH") };
    let mut server = Server::new(Box::new(Checksum::default()), Options::new(socket, core))?;
    server.handle_signals()?;
    server.run()?;
    Ok(())
}
