//! Interop: the rust-vmm `vfio_user` crate's `Client`, an independent
//! implementation of the protocol, drives the test device: version, region
//! info (with sparse mmap and fds), region read/write, DMA map/unmap with
//! memfds (through the compat IOAS), IRQ eventfds and reset.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::*;
use vfio_user_server::devices::testdev::regs;
use vfio_user_server::proto;

fn rd(c: &mut vfio_user::Client, region: u32, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn wr(c: &mut vfio_user::Client, region: u32, off: u64, v: &[u8]) {
    c.region_write(region, off, v).unwrap();
}

#[test]
fn rust_vmm_client_drives_the_test_device() {
    let s = Stack::new("interop");
    let mut c = vfio_user::Client::new(&s.sock).unwrap();

    // Region infos were read at connect, with the sparse areas and fd.
    let cfg = c.region(proto::region::CONFIG).unwrap();
    assert_eq!(cfg.size, 4096);
    let bar1 = c.region(1).unwrap();
    assert_eq!(bar1.size, 0x10000);
    assert_ne!(bar1.flags & proto::REGION_MMAP, 0);
    let areas: Vec<(u64, u64)> = bar1.sparse_areas.iter().map(|a| (a.offset, a.size)).collect();
    assert_eq!(areas, vec![(0, 0x4000), (0x8000, 0x8000)]);
    assert!(bar1.file_offset.is_some());
    assert_eq!(c.region(0).unwrap().size, 0x1000);

    // Register access and config space: BARs decode once the command
    // register enables them (I/O, memory, bus mastering).
    assert_eq!(rd(&mut c, 0, regs::ID), u32::MAX);
    wr(&mut c, proto::region::CONFIG, 4, &7u16.to_le_bytes());
    assert_eq!(rd(&mut c, 0, regs::ID), regs::ID_VALUE);
    wr(&mut c, 0, regs::SCRATCH, &0x5a5a_5a5au32.to_le_bytes());
    assert_eq!(rd(&mut c, 0, regs::SCRATCH), 0x5a5a_5a5a);
    assert_eq!(rd(&mut c, proto::region::CONFIG, 0), 0x7e57_1b36);
    wr(&mut c, 1, 0x8000, b"via rust-vmm");
    let fo = c.region(1).unwrap().file_offset.as_ref().unwrap();
    let mut b = [0u8; 12];
    fo.file().read_exact_at(&mut b, fo.start() + 0x8000).unwrap();
    assert_eq!(&b, b"via rust-vmm");

    // DMA through the compat IOAS: a memfd mapped by the client.
    let mem = memfd("guest", 0x40000);
    mem.write_all_at(b"guest data!!", 0x1000).unwrap();
    c.dma_map(0, 0x8000_0000, 0x40000, mem.as_raw_fd()).unwrap();
    let copy = |c: &mut vfio_user::Client, src: u64, dst: u64, len: u32| {
        let done0 = rd(c, 0, regs::DMA_DONE) + rd(c, 0, regs::DMA_ERRORS);
        wr(c, 0, regs::DMA_SRC, &src.to_le_bytes());
        wr(c, 0, regs::DMA_DST, &dst.to_le_bytes());
        wr(c, 0, regs::DMA_LEN, &len.to_le_bytes());
        wr(c, 0, regs::DMA_PASID, &0u32.to_le_bytes());
        wr(c, 0, regs::DMA_CMD, &1u32.to_le_bytes());
        let t0 = std::time::Instant::now();
        while rd(c, 0, regs::DMA_DONE) + rd(c, 0, regs::DMA_ERRORS) == done0 {
            assert!(t0.elapsed().as_secs() < 10);
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        rd(c, 0, regs::DMA_STATUS)
    };
    assert_eq!(copy(&mut c, 0x8000_1000, 0x8000_3000, 12), regs::STATUS_DONE);
    let mut b = [0u8; 12];
    mem.read_exact_at(&mut b, 0x3000).unwrap();
    assert_eq!(&b, b"guest data!!");

    // MSI-X eventfd: completion of a copy signals vector 0.
    let irq = eventfd();
    let info = c.get_irq_info(proto::irq_index::MSIX).unwrap();
    assert_eq!(info.count, 8);
    c.set_irqs(
        proto::irq_index::MSIX,
        proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[irq.as_raw_fd()],
    )
    .unwrap();
    assert_eq!(copy(&mut c, 0x8000_1000, 0x8000_5000, 12), regs::STATUS_DONE);
    assert_eq!(wait_count(&irq), 1);

    // Unmap: the device can no longer reach the memory.
    c.dma_unmap(0x8000_0000, 0x40000).unwrap();
    assert_eq!(s.server().dma().map_count(), 0);
    assert_eq!(copy(&mut c, 0x8000_1000, 0x8000_7000, 12), regs::STATUS_ERROR);
    mem.read_exact_at(&mut b, 0x7000).unwrap();
    assert_eq!(b, [0; 12]);

    // Reset clears the registers, the command register included.
    c.reset().unwrap();
    assert_eq!(rd(&mut c, proto::region::CONFIG, 4) & 0xffff, 0);
    wr(&mut c, proto::region::CONFIG, 4, &7u16.to_le_bytes());
    assert_eq!(rd(&mut c, 0, regs::SCRATCH), 0);
    c.shutdown().unwrap();
}
