//! `examples/my_device.rs`, the device of your own in 200 lines, driven
//! through the project's client as a VMM drives any device: its checksum
//! over guest RAM, its interrupt, a fault, a reset.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "../examples/my_device.rs"]
#[allow(dead_code)]
mod my_device;

use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use ioasid_stack::engine::{read32, write32, write64, GuestRam};
use my_device::regs;
use vfio_user_server::client::Client;
use vfio_user_server::proto::{self, irq_index, DMA_MAP_READ, DMA_MAP_WRITE};

const IOVA: u64 = 0x4000_0000;

#[test]
fn the_example_device_sums_guest_memory_and_interrupts() {
    let st = Stack::new("example");
    let sock = st.dir.join("checksum.sock");
    let opts = vfio_user_server::server::Options::new(&sock, &st.core_sock);
    let _server =
        vfio_user_server::server::spawn(Box::new(my_device::Checksum::default()), opts).expect("start the server");
    wait_for(&sock);
    let mut c = Client::connect(&sock).unwrap();
    let ram = GuestRam::new("example", 1 << 20).unwrap();
    c.dma_map(DMA_MAP_READ | DMA_MAP_WRITE, 0, IOVA, 1 << 20, Some(ram.file.as_fd())).unwrap();
    c.enable_function().unwrap();
    let msi = vfio_user_server::irq::eventfd().unwrap();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    c.set_irqs(irq_index::MSI, trig, 0, 1, &[], &[msi.as_fd()]).unwrap();
    assert_eq!(read32(&mut c, regs::ID).unwrap(), regs::ID_VALUE);

    // 40000 bytes at 0x1234: their sum, and one interrupt.
    let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 + 3) as u8).collect();
    ram.write(0x1234, &data).unwrap();
    write64(&mut c, regs::ADDR, IOVA + 0x1234).unwrap();
    write32(&mut c, regs::LEN, data.len() as u32).unwrap();
    write32(&mut c, regs::CMD, 1).unwrap();
    assert_eq!(vfio_user_server::irq::wait_eventfd(&msi, Duration::from_secs(10)), 1);
    assert_eq!(read32(&mut c, regs::STATUS).unwrap(), regs::DONE);
    let want = data.iter().fold(0u32, |s, b| s.wrapping_add(u32::from(*b)));
    assert_eq!(read32(&mut c, regs::SUM).unwrap(), want);

    // Memory that is not mapped: an error, and the interrupt anyway.
    write64(&mut c, regs::ADDR, 0x9000_0000).unwrap();
    write32(&mut c, regs::CMD, 1).unwrap();
    assert_eq!(vfio_user_server::irq::wait_eventfd(&msi, Duration::from_secs(10)), 1);
    assert_eq!(read32(&mut c, regs::STATUS).unwrap(), regs::ERROR);
    // A length the device refuses: an error at once.
    write32(&mut c, regs::LEN, regs::MAX_LEN + 1).unwrap();
    write32(&mut c, regs::CMD, 1).unwrap();
    assert_eq!(read32(&mut c, regs::STATUS).unwrap(), regs::ERROR);

    // A reset puts every register back.
    c.reset().unwrap();
    c.enable_function().unwrap();
    assert_eq!(read32(&mut c, regs::STATUS).unwrap(), regs::IDLE);
    assert_eq!(read32(&mut c, regs::LEN).unwrap(), 0);
}
