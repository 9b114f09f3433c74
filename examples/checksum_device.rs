//! A device of your own, written against `vfio_user_server`'s public API
//! only: a PCI function that sums guest memory. The guest writes an
//! address and a length, writes 1 to `CTRL`, and the device reads that
//! memory by DMA (through the core's IOAS, as every device does), stores
//! a 64-bit FNV-1a hash of it in `RESULT`, sets `STATUS` and raises
//! interrupt vector 0 (MSI, or INTx without it).
//!
//! `cargo run --example checksum_device -- SOCKET CORE_SOCKET` serves it;
//! `cargo test --example checksum_device` drives it through the project's
//! vfio-user client. `docs/devices/writing-a-device.md` explains each part.
//!
//! BAR 0 (4 KiB, 32- or 64-bit accesses):
//! | offset | name | |
//! |---|---|---|
//! | 0x00 | ID | reads 0xc5c5_0001 |
//! | 0x08 | ADDR | 64-bit IOVA of the bytes to hash |
//! | 0x10 | LEN | byte count, at most 1 MiB (more: STATUS = 2 at once) |
//! | 0x14 | CTRL | write 1: start (ignored while busy) |
//! | 0x18 | STATUS | 0 idle, 1 done, 2 error (DMA fault or bad length), 3 busy |
//! | 0x20 | RESULT | 64-bit hash of the last job that finished |

// Examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use vfio_user_server::device::{reg_merge, reg_read, Device, DeviceContext, DeviceDesc, Errno, RegionDesc};
use vfio_user_server::dma::{DeviceDma, DmaSpace, Route};
use vfio_user_server::irq::IrqLayout;
use vfio_user_server::pci::{BarKind, PciConfig, PciIds};

const ID: u32 = 0xc5c5_0001;
const MAX_LEN: u32 = 1 << 20;
const IDLE: u32 = 0;
const DONE: u32 = 1;
const ERROR: u32 = 2;
const BUSY: u32 = 3;

#[derive(Default)]
struct Regs {
    addr: u64,
    len: u32,
    status: u32,
    result: u64,
    /// Bumped by a reset: a job of an older generation is dropped.
    generation: u64,
}

/// The device. Jobs run on a thread of their own: the device thread must
/// not wait for DMA (guest RAM reached through the client is served only
/// after the device thread has answered).
#[derive(Default)]
pub struct Checksum {
    regs: Arc<Mutex<Regs>>,
    jobs: Option<std::sync::mpsc::Sender<(u64, u64, u32)>>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

impl Device for Checksum {
    fn describe(&self) -> DeviceDesc {
        let ids = PciIds {
            vendor: 0x1b36,
            device: 0xc5c5,
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
            caps: Default::default(),
            io_fds: Vec::new(),
        }
    }

    fn start(&mut self, ctx: DeviceContext) {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, u64, u32)>();
        let regs = self.regs.clone();
        std::thread::spawn(move || {
            for (generation, addr, len) in rx {
                let mut buf = vec![0u8; len as usize];
                // Untagged DMA (no PASID), translated by the core's IOAS.
                let read = ctx.dma.space(Route::Rid).read(addr, &mut buf);
                let mut r = regs.lock().unwrap();
                if r.generation != generation {
                    continue; // reset meanwhile: no result, no interrupt
                }
                (r.status, r.result) = match read {
                    Ok(()) => (DONE, fnv1a(&buf)),
                    Err(_) => (ERROR, r.result),
                };
                drop(r);
                ctx.irqs.notify(0);
            }
        });
        self.jobs = Some(tx);
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if index != 0 || buf.len() > 8 {
            return Err(libc::EINVAL);
        }
        let r = self.regs.lock().unwrap();
        let (base, v) = match offset & !7 {
            0x00 => (0, u64::from(ID)),
            0x08 => (0x08, r.addr),
            0x10 => (0x10, u64::from(r.len)), // CTRL (0x14) reads 0
            0x18 => (0x18, u64::from(r.status)),
            0x20 => (0x20, r.result),
            other => (other, 0),
        };
        reg_read(v, offset - base, buf);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if index != 0 || data.len() > 8 {
            return Err(libc::EINVAL);
        }
        let mut r = self.regs.lock().unwrap();
        match offset & !7 {
            0x08 => r.addr = reg_merge(r.addr, offset - 0x08, data),
            0x10 => {
                let v = reg_merge(u64::from(r.len), offset - 0x10, data);
                r.len = v as u32;
                if v >> 32 == 1 && r.status != BUSY {
                    if r.len == 0 || r.len > MAX_LEN {
                        r.status = ERROR;
                    } else if let Some(jobs) = &self.jobs {
                        r.status = BUSY;
                        let _ = jobs.send((r.generation, r.addr, r.len));
                    }
                }
            }
            _ => {} // read-only or unknown: dropped, as guests expect of MMIO
        }
        Ok(())
    }

    fn reset(&mut self) {
        let mut r = self.regs.lock().unwrap();
        *r = Regs { generation: r.generation + 1, status: IDLE, ..Regs::default() };
    }

    fn client_gone(&mut self) {
        self.reset(); // its addresses mean nothing to the next client
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, core] = args.as_slice() else {
        anyhow::bail!("usage: checksum_device SOCKET CORE_SOCKET");
    };
    let opts = vfio_user_server::server::Options::new(socket, core);
    vfio_user_server::server::Server::new(Box::new(Checksum::default()), opts)?.run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use vfio_user_server::client::Client;
    use vfio_user_server::proto::{self, irq_index};

    fn rd(c: &mut Client, off: u64) -> u64 {
        u64::from_le_bytes(c.region_read(0, off, 8).unwrap().try_into().unwrap())
    }

    #[test]
    fn hashes_guest_memory_by_dma_and_interrupts() {
        let dir = std::env::temp_dir().join(format!("checksum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let core = iommu_core::server::spawn(&dir.join("core.sock"), Default::default()).unwrap();
        let opts = vfio_user_server::server::Options::new(dir.join("dev.sock"), dir.join("core.sock"));
        let server = vfio_user_server::server::spawn(Box::new(Checksum::default()), opts).unwrap();

        // The VMM's part: guest RAM in a memfd, mapped at IOVA 1 MiB; MSI
        // vector 0 on an eventfd; memory decoding and bus mastering on.
        let mut c = Client::connect(dir.join("dev.sock")).unwrap();
        c.enable_function().unwrap();
        let ram = iommu_core::memfd::create("guest-ram", 1 << 20).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&ram, &data, 0x3000).unwrap();
        let rw = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;
        c.dma_map(rw, 0, 0x10_0000, 1 << 20, Some(ram.as_fd())).unwrap();
        let mut irq = vfio_user_server::irq::eventfd().unwrap();
        let trigger = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
        c.set_irqs(irq_index::MSI, trigger, 0, 1, &[], &[irq.as_fd()]).unwrap();

        assert_eq!(rd(&mut c, 0x00), u64::from(ID));
        let mut run = |c: &mut Client, addr: u64, len: u32| {
            c.region_write(0, 0x08, &addr.to_le_bytes()).unwrap();
            c.region_write(0, 0x10, &(u64::from(len) | 1 << 32).to_le_bytes()).unwrap();
            // The eventfd is non-blocking: wait for it to be readable.
            let mut p = [nix::poll::PollFd::new(irq.as_fd(), nix::poll::PollFlags::POLLIN)];
            assert_eq!(nix::poll::poll(&mut p, 10_000u16).unwrap(), 1, "no interrupt in 10 s");
            irq.read_exact(&mut [0u8; 8]).unwrap();
            rd(c, 0x18)
        };
        assert_eq!(run(&mut c, 0x10_3000, 8192), u64::from(DONE));
        assert_eq!(rd(&mut c, 0x20), fnv1a(&data));
        // Past the end of the mapping: the DMA faults, the job fails.
        assert_eq!(run(&mut c, 0x1f_f000, 8192), u64::from(ERROR));
        assert_eq!(rd(&mut c, 0x20), fnv1a(&data), "a failed job keeps the last result");
        // Too long: refused at once, no DMA.
        c.region_write(0, 0x10, &(u64::from(MAX_LEN + 1) | 1 << 32).to_le_bytes()).unwrap();
        assert_eq!(rd(&mut c, 0x18), u64::from(ERROR));
        // A device reset clears the registers (and the command register:
        // BARs decode again once memory space is enabled).
        c.reset().unwrap();
        assert_eq!(rd(&mut c, 0x00), u64::MAX, "no decoding after a reset");
        c.enable_function().unwrap();
        assert_eq!((rd(&mut c, 0x18), rd(&mut c, 0x20)), (u64::from(IDLE), 0));

        drop(c);
        server.stop().unwrap();
        core.stop().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
