//! One test per vfio-user command against the test device, through the
//! project's own client, with a real core behind the server.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use common::*;
use vfio_user_server::client::Client;
use vfio_user_server::devices::testdev::regs;
use vfio_user_server::proto::{self, cmd, irq_index};
use vfio_user_server::worker::mig;
use zerocopy::IntoBytes;

const RW: u32 = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;

fn errno(r: Result<impl std::fmt::Debug, vfio_user_server::client::Error>) -> i32 {
    r.expect_err("the command should fail").errno().expect("an errno from the server")
}

#[test]
fn version_negotiates_and_advertises_limits() {
    let s = Stack::new("version");
    let c = s.client();
    let (major, minor, json) = &c.server_version;
    assert_eq!((*major, *minor), (0, 0));
    let caps = &json["capabilities"];
    assert!(caps["max_msg_fds"].as_u64().unwrap() <= 16);
    assert!(caps["max_data_xfer_size"].as_u64().unwrap() <= 64 << 20);
    assert_eq!(caps["pgsizes"].as_u64().unwrap() % 4096, 0);
    assert!(caps["max_dma_maps"].as_u64().unwrap() <= 65535);
    assert_eq!(caps["write_multiple"], true);
    assert_eq!(caps["ioasid"]["version"], 1);
    drop(c);
    // A newer minor is answered with ours; no ioasid key unless proposed.
    let c = Client::connect_with(&s.sock, 7, &serde_json::json!({"capabilities": {}})).unwrap();
    assert_eq!(c.server_version.1, vfio_user_server::worker::MINOR);
    assert!(c.server_version.2["capabilities"].get("ioasid").is_none());
    drop(c);
    // No JSON at all is fine, and still answered with a JSON object.
    let mut c = Client::from_stream(std::os::unix::net::UnixStream::connect(&s.sock).unwrap());
    let r = c.call(cmd::VERSION, proto::Version { major: 0, minor: 0 }.as_bytes(), &[]).unwrap();
    assert_eq!(*r.payload.last().unwrap(), 0);
    assert!(serde_json::from_slice::<serde_json::Value>(&r.payload[4..r.payload.len() - 1]).unwrap().is_object());
    // A second VERSION is refused.
    assert_eq!(errno(c.call(cmd::VERSION, proto::Version::default().as_bytes(), &[])), libc::EINVAL);
    drop(c);
    // Major 1: error reply, then the server closes the connection.
    let mut c = Client::from_stream(std::os::unix::net::UnixStream::connect(&s.sock).unwrap());
    assert_eq!(errno(c.call(cmd::VERSION, proto::Version { major: 1, minor: 0 }.as_bytes(), &[])), libc::ENOTSUP);
    assert!(c.recv().is_err());
    drop(c);
    // JSON without its NUL, or not an object.
    for bad in [&b"{}"[..], &b"[1]\0"[..], &b"{\"capabilities\":3}\0"[..]] {
        let mut c = Client::from_stream(std::os::unix::net::UnixStream::connect(&s.sock).unwrap());
        let p = [proto::Version::default().as_bytes(), bad].concat();
        assert_eq!(errno(c.call(cmd::VERSION, &p, &[])), libc::EINVAL);
    }
    // Commands before VERSION are refused.
    let mut c = Client::from_stream(std::os::unix::net::UnixStream::connect(&s.sock).unwrap());
    assert_eq!(errno(c.call(cmd::DEVICE_RESET, &[], &[])), libc::EINVAL);
}

#[test]
fn version_reply_suits_qemu() {
    // What QEMU 10.1 proposes, byte for byte in content.
    let qemu = serde_json::json!({"capabilities": {
        "max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535,
        "migration": {"pgsize": 4096, "max_bitmap_size": 268435456u64}, "write_multiple": true}});
    let s = Stack::new("version-qemu");
    let mut c = Client::from_stream(std::os::unix::net::UnixStream::connect(&s.sock).unwrap());
    let mut p = proto::Version { major: 0, minor: 0 }.as_bytes().to_vec();
    p.extend_from_slice(qemu.to_string().as_bytes());
    p.push(0);
    let r = c.call(cmd::VERSION, &p, &[]).unwrap();
    // QEMU receives the reply into a buffer the size of its request.
    assert!(r.payload.len() <= p.len(), "reply {} > request {}", r.payload.len(), p.len());
    let v: proto::Version = proto::read(&r.payload).unwrap();
    assert_eq!((v.major, v.minor), (0, 0));
    let json: serde_json::Value = serde_json::from_slice(&r.payload[4..r.payload.len() - 1]).unwrap();
    let caps = json["capabilities"].as_object().unwrap();
    for k in caps.keys() {
        assert!(qemu["capabilities"].get(k).is_some(), "{k} was not proposed");
    }
    assert!(caps["max_msg_fds"].as_u64().unwrap() <= 16);
    assert!(caps["max_data_xfer_size"].as_u64().unwrap() <= 64 << 20);
    assert!(caps["migration"]["max_bitmap_size"].as_u64().unwrap() <= 256 << 20);
    assert_eq!(caps["pgsizes"], 4096);
    assert_eq!(caps["write_multiple"], true);
}

#[test]
fn dma_map_and_unmap_drive_the_compat_ioas() {
    let s = Stack::new("dma");
    let mut c = s.client();
    let mem = memfd("guest", 1 << 20);
    c.dma_map(RW, 0, 0x10_0000, 0x8_0000, Some(mem.as_fd())).unwrap();
    c.dma_map(proto::DMA_MAP_READ, 0x8_0000, 0x20_0000, 0x8_0000, Some(mem.as_fd())).unwrap();
    // The core's compat IOAS holds exactly these mappings.
    let snap = s.observer().status().unwrap();
    let compat = s.server().dma().compat().expect("the server is connected to its core");
    let sess = snap.sessions.iter().find(|x| x.id == compat.session_id()).unwrap();
    let ioas = sess.ioas.iter().find(|i| i.id == compat.ioas()).unwrap();
    let spans: Vec<(u64, u64)> = ioas.mappings.iter().map(|m| (m.iova, m.length)).collect();
    assert_eq!(spans, vec![(0x10_0000, 0x8_0000), (0x20_0000, 0x8_0000)]);
    assert_eq!(sess.memory.len(), 1, "one memfd, registered once");
    // A device copy through the compat IOAS.
    mem.write_all_at(b"hello, IOAS", 0x100).unwrap();
    assert_eq!(copy(&mut c, 0x10_0100, 0x10_2000, 11, None), regs::STATUS_DONE);
    let mut b = [0u8; 11];
    mem.read_exact_at(&mut b, 0x2000).unwrap();
    assert_eq!(&b, b"hello, IOAS");
    // Read-only region: a write faults, nothing lands.
    assert_eq!(copy(&mut c, 0x10_0100, 0x20_0000, 11, None), regs::STATUS_ERROR);
    mem.read_exact_at(&mut b, 0x8_0000).unwrap();
    assert_eq!(b, [0; 11]);
    // Edge cases, each with its errno.
    assert_eq!(errno(c.dma_map(RW, 0, 0x10_4000, 0x1000, Some(mem.as_fd()))), libc::EEXIST);
    assert_eq!(errno(c.dma_map(RW, 0, 0xf_f000, 0x2000, Some(mem.as_fd()))), libc::EEXIST);
    assert_eq!(errno(c.dma_map(RW, 0, 0x40_0800, 0x1000, Some(mem.as_fd()))), libc::EINVAL);
    assert_eq!(errno(c.dma_map(RW, 0, 0x40_0000, 0, Some(mem.as_fd()))), libc::EINVAL);
    assert_eq!(errno(c.dma_map(RW, 0, u64::MAX - 0xfff, 0x2000, Some(mem.as_fd()))), libc::EINVAL);
    assert_eq!(errno(c.dma_map(0, 0, 0x40_0000, 0x1000, Some(mem.as_fd()))), libc::EINVAL);
    assert_eq!(errno(c.dma_map(RW | 0x100, 0, 0x40_0000, 0x1000, Some(mem.as_fd()))), libc::EINVAL);
    assert_eq!(errno(c.dma_map(RW, 0xff000, 0x40_0000, 0x2000, Some(mem.as_fd()))), libc::EINVAL);
    assert_eq!(errno(c.dma_unmap(0x10_0000, 0x1000, 0)), libc::ENOENT);
    assert_eq!(errno(c.dma_unmap(0x30_0000, 0x1000, 0)), libc::ENOENT);
    assert_eq!(errno(c.dma_unmap(0x10_0000, 0x1000, proto::DMA_UNMAP_ALL)), libc::EINVAL);
    assert_eq!(errno(c.dma_unmap(0, 0, 0x80)), libc::EINVAL);
    // Exact unmap echoes the request.
    let r = c.dma_unmap(0x20_0000, 0x8_0000, 0).unwrap();
    assert_eq!((r.argsz, r.address, r.size), (24, 0x20_0000, 0x8_0000));
    // After the unmap returns, the device cannot reach the range.
    assert_eq!(copy(&mut c, 0x10_0100, 0x20_0000, 11, None), regs::STATUS_ERROR);
    // Unmap-all as QEMU sends it.
    c.dma_unmap(0, 0, proto::DMA_UNMAP_ALL).unwrap();
    assert_eq!(s.server().dma().map_count(), 0);
    let snap = s.observer().status().unwrap();
    let sess = snap.sessions.iter().find(|x| x.id == compat.session_id()).unwrap();
    assert!(sess.ioas.iter().all(|i| i.mappings.is_empty()));
    assert!(sess.memory.is_empty(), "memory objects are released with their last map");
}

#[test]
fn a_file_mapped_again_keeps_its_registration_until_it_changes_or_the_client_leaves() {
    let s = Stack::new("dmacache");
    let mut c = s.client();
    let compat = s.server().dma().compat().expect("the server is connected to its core");
    let objects = |s: &Stack| {
        let snap = s.observer().status().unwrap();
        let sess = snap.sessions.iter().find(|x| x.id == compat.session_id()).unwrap().clone();
        sess.memory.iter().map(|m| (m.id, m.size)).collect::<Vec<_>>()
    };
    let mem = memfd("cached", 1 << 21);
    c.dma_map(RW, 0, 0x20_0000, 1 << 21, Some(mem.as_fd())).unwrap();
    let first = objects(&s);
    assert_eq!(first.len(), 1);
    for _ in 0..3 {
        c.dma_unmap(0x20_0000, 1 << 21, 0).unwrap();
        assert_eq!((s.server().dma().file_count(), s.server().dma().idle_file_count()), (0, 1));
        c.dma_map(RW, 0, 0x20_0000, 1 << 21, Some(mem.as_fd())).unwrap();
        assert_eq!(objects(&s), first, "the same registration is used again");
    }
    // The unmap still cuts the device off at once.
    mem.write_all_at(b"cached", 0x100).unwrap();
    assert_eq!(copy(&mut c, 0x20_0100, 0x20_2000, 6, None), regs::STATUS_DONE);
    c.dma_unmap(0x20_0000, 1 << 21, 0).unwrap();
    assert_eq!(copy(&mut c, 0x20_0100, 0x20_3000, 6, None), regs::STATUS_ERROR);
    // A file that grew is registered anew (its old registration released).
    mem.set_len(4 << 20).unwrap();
    c.dma_map(RW, 2 << 20, 0x40_0000, 1 << 21, Some(mem.as_fd())).unwrap();
    let grown = objects(&s);
    assert_eq!(grown.len(), 1);
    assert_ne!(grown, first);
    assert_eq!(grown[0].1, 4 << 20);
    assert_eq!(copy(&mut c, 0x40_0000, 0x40_1000, 16, None), regs::STATUS_DONE);
    c.dma_unmap(0x40_0000, 1 << 21, 0).unwrap();
    // At most IDLE_FILES files stay registered without a region.
    let n = vfio_user_server::dma::IDLE_FILES + 3;
    let files: Vec<_> = (0..n).map(|i| memfd(&format!("idle{i}"), 1 << 16)).collect();
    for (i, f) in files.iter().enumerate() {
        let iova = 0x100_0000 + (i as u64) * 0x10_0000;
        c.dma_map(RW, 0, iova, 1 << 16, Some(f.as_fd())).unwrap();
        c.dma_unmap(iova, 1 << 16, 0).unwrap();
    }
    assert_eq!(s.server().dma().idle_file_count(), vfio_user_server::dma::IDLE_FILES);
    assert_eq!(objects(&s).len(), vfio_user_server::dma::IDLE_FILES);
    // Unmap-all (as at a disconnect) releases every one.
    c.dma_unmap(0, 0, proto::DMA_UNMAP_ALL).unwrap();
    assert_eq!(s.server().dma().idle_file_count(), 0);
    assert!(objects(&s).is_empty());
}

#[test]
fn memory_without_fd_is_reached_with_dma_read_and_write() {
    let s = Stack::new("msgdma");
    let mut c = s.client();
    let src: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    c.add_message_memory(0xfffc_0000, src.clone());
    c.add_message_memory(0xe000_0000, vec![0; 8192]);
    c.dma_map(proto::DMA_MAP_READ, 0, 0xfffc_0000, 0x2000, None).unwrap();
    c.dma_map(RW, 0, 0xe000_0000, 0x2000, None).unwrap();
    assert_eq!(copy(&mut c, 0xfffc_0000, 0xe000_0000, 8192, None), regs::STATUS_DONE);
    assert_eq!(c.message_memory(0xe000_0000).unwrap(), &src[..]);
    assert!(c.dma_requests >= 2);
    // Writing into the read-only region fails without a request.
    let before = c.dma_requests;
    assert_eq!(copy(&mut c, 0xe000_0000, 0xfffc_0000, 16, None), regs::STATUS_ERROR);
    assert_eq!(c.message_memory(0xfffc_0000).unwrap(), &src[..]);
    assert_eq!(c.dma_requests, before + 1, "only the read went to the client");
    // Mixed: from client memory to an fd region.
    let mem = memfd("g", 0x10000);
    c.dma_map(RW, 0, 0x10_0000, 0x10000, Some(mem.as_fd())).unwrap();
    assert_eq!(copy(&mut c, 0xfffc_0000, 0x10_0000, 4096, None), regs::STATUS_DONE);
    let mut b = vec![0u8; 4096];
    mem.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, src[..4096]);
}

#[test]
fn device_info_and_region_info() {
    let s = Stack::new("info");
    let mut c = s.client();
    let i = c.device_info().unwrap();
    assert_eq!(i.flags & (proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET), 3);
    assert!(i.num_regions >= 8 && i.num_irqs >= 3);
    let short = proto::DeviceInfo { argsz: 8, ..Default::default() };
    assert_eq!(errno(c.call(cmd::DEVICE_GET_INFO, short.as_bytes(), &[])), libc::EINVAL);
    assert_eq!(errno(c.call(cmd::DEVICE_GET_INFO, &[0; 4], &[])), libc::EINVAL);

    let cfg = c.region_info(proto::region::CONFIG).unwrap();
    assert_eq!(cfg.info.size, 4096);
    assert_eq!(cfg.info.flags, proto::REGION_READ | proto::REGION_WRITE);
    let bar0 = c.region_info(0).unwrap();
    assert_eq!((bar0.info.size, bar0.fd.is_none()), (0x1000, true));
    assert_eq!(c.region_info(3).unwrap().info.size, 0);
    assert_eq!(c.region_info(6).unwrap().info.flags, proto::REGION_READ);
    // BAR 1: sparse mmap with an fd, only when the whole reply fits.
    let r = c.region_info_raw(1, 32).unwrap();
    let fixed: proto::RegionInfo = proto::read(&r.payload).unwrap();
    assert_eq!(r.payload.len(), 32, "never more than argsz");
    assert!(r.fds.is_empty());
    assert_eq!(fixed.argsz, 32 + 16 + 32);
    assert_eq!(fixed.flags & proto::REGION_CAPS, 0, "CAPS only with the chain present");
    assert_eq!(fixed.cap_offset, 0);
    let bar1 = c.region_info(1).unwrap();
    assert_ne!(bar1.info.flags & proto::REGION_MMAP, 0);
    assert_ne!(bar1.info.flags & proto::REGION_CAPS, 0);
    assert_eq!(
        bar1.areas,
        vec![proto::SparseArea { offset: 0, size: 0x4000 }, proto::SparseArea { offset: 0x8000, size: 0x8000 }]
    );
    // The fd maps the same memory REGION_WRITE reaches.
    c.region_write(1, 0x8010, b"shared").unwrap();
    let f = std::fs::File::from(bar1.fd.unwrap());
    let mut b = [0u8; 6];
    f.read_exact_at(&mut b, bar1.info.offset + 0x8010).unwrap();
    assert_eq!(&b, b"shared");
    assert_eq!(errno(c.region_info_raw(9, 32)), libc::EINVAL);
    assert_eq!(errno(c.region_info_raw(0, 16)), libc::EINVAL);
}

#[test]
fn region_io_fds_offer_the_doorbell() {
    let s = Stack::new("iofds");
    let mut c = s.client();
    let (entries, fds) = c.region_io_fds(0).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0].offset, entries[0].size, entries[0].kind), (regs::DOORBELL, 4, 0));
    assert_eq!(fds.len(), 1);
    let f = std::fs::File::from(fds.into_iter().next().unwrap());
    // What KVM would do on a guest write: signal the eventfd.
    std::io::Write::write_all(&mut &f, &1u64.to_ne_bytes()).unwrap();
    let t0 = std::time::Instant::now();
    while rd32(&mut c, 0, regs::DOORBELL) == 0 {
        assert!(t0.elapsed().as_secs() < 5);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (none, nfds) = c.region_io_fds(1).unwrap();
    assert!(none.is_empty() && nfds.is_empty());
    let bad = proto::IoFdsInfo { argsz: 16, flags: 1, index: 0, count: 0 };
    assert_eq!(errno(c.call(cmd::DEVICE_GET_REGION_IO_FDS, bad.as_bytes(), &[])), libc::EINVAL);
    // Too small for the entries: the fixed part with the size needed.
    let small = proto::IoFdsInfo { argsz: 16, flags: 0, index: 0, count: 0 };
    let r = c.call(cmd::DEVICE_GET_REGION_IO_FDS, small.as_bytes(), &[]).unwrap();
    let h: proto::IoFdsInfo = proto::read(&r.payload).unwrap();
    assert_eq!((r.payload.len(), h.argsz, h.count, r.fds.len()), (16, 56, 1, 0));
}

#[test]
fn irq_info_and_set_irqs() {
    let s = Stack::new("irqs");
    let mut c = s.client();
    let counts: Vec<u32> = (0..5).map(|i| c.irq_info(i).unwrap().count).collect();
    assert_eq!(counts, vec![1, 8, 8, 1, 1]);
    assert_ne!(c.irq_info(irq_index::INTX).unwrap().flags & proto::IRQ_INFO_AUTOMASKED, 0);
    assert_ne!(c.irq_info(irq_index::MSIX).unwrap().flags & proto::IRQ_INFO_EVENTFD, 0);
    assert_eq!(errno(c.irq_info(5)), libc::EINVAL);
    // MSI-X vectors 0..3 on eventfds; the device raises vector 2.
    let efds: Vec<std::fs::File> = (0..3).map(|_| eventfd()).collect();
    let b: Vec<_> = efds.iter().map(|f| f.as_fd()).collect();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    c.set_irqs(irq_index::MSIX, trig, 0, 3, &[], &b).unwrap();
    wr32(&mut c, 0, regs::IRQ, 2);
    assert_eq!(wait_count(&efds[2]), 1);
    assert_eq!(count_now(&efds[0]), 0);
    // Masked with BOOL data: the interrupt waits in the PBA and fires on unmask.
    c.set_irqs(irq_index::MSIX, proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_ACTION_MASK, 1, 2, &[0, 1], &[]).unwrap();
    wr32(&mut c, 0, regs::IRQ, 2);
    assert_eq!(count_now(&efds[2]), 0);
    let pba = c.region_read(2, 0x800, 8).unwrap();
    assert_eq!(pba[0], 1 << 2);
    c.set_irqs(irq_index::MSIX, proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_UNMASK, 2, 1, &[], &[]).unwrap();
    assert_eq!(wait_count(&efds[2]), 1);
    // Client-injected trigger (NONE and BOOL).
    c.set_irqs(irq_index::MSIX, proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER, 0, 1, &[], &[]).unwrap();
    assert_eq!(wait_count(&efds[0]), 1);
    c.set_irqs(irq_index::MSIX, proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_ACTION_TRIGGER, 0, 2, &[0, 1], &[]).unwrap();
    assert_eq!((count_now(&efds[0]), wait_count(&efds[1])), (0, 1));
    // De-assign without fds; then disable the index.
    c.set_irqs(irq_index::MSIX, trig, 2, 1, &[], &[]).unwrap();
    wr32(&mut c, 0, regs::IRQ, 2);
    assert_eq!(count_now(&efds[2]), 0);
    c.set_irqs(irq_index::MSIX, proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER, 0, 0, &[], &[]).unwrap();
    // INTx: automasked, unmasked by the client, re-fires while the line is up.
    let intx = eventfd();
    c.set_irqs(irq_index::INTX, trig, 0, 1, &[], &[intx.as_fd()]).unwrap();
    wr32(&mut c, 0, regs::INTX, 1);
    assert_eq!(wait_count(&intx), 1);
    c.set_irqs(irq_index::INTX, proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_UNMASK, 0, 1, &[], &[]).unwrap();
    assert_eq!(wait_count(&intx), 1);
    wr32(&mut c, 0, regs::INTX, 0);
    // With nothing else wired, a copy completion raises INTx.
    c.set_irqs(irq_index::INTX, proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_UNMASK, 0, 1, &[], &[]).unwrap();
    let mem = memfd("m", 0x2000);
    c.dma_map(RW, 0, 0x1000, 0x2000, Some(mem.as_fd())).unwrap();
    assert_eq!(copy(&mut c, 0x1000, 0x2000, 64, None), regs::STATUS_DONE);
    assert_eq!(wait_count(&intx), 1);
    // ERR and REQ take one eventfd.
    let err = eventfd();
    c.set_irqs(irq_index::ERR, trig, 0, 1, &[], &[err.as_fd()]).unwrap();
    // Refusals: wrong fd count, fds with DATA_NONE, out of range, not an eventfd.
    let two = [eventfd(), eventfd()];
    let tb: Vec<_> = two.iter().map(|f| f.as_fd()).collect();
    assert_eq!(errno(c.set_irqs(irq_index::MSIX, trig, 0, 1, &[], &tb)), libc::EINVAL);
    assert_eq!(
        errno(c.set_irqs(
            irq_index::MSIX,
            proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[],
            &tb[..1]
        )),
        libc::EINVAL
    );
    assert_eq!(errno(c.set_irqs(irq_index::ERR, trig, 0, 2, &[], &tb)), libc::EINVAL);
    assert_eq!(errno(c.set_irqs(irq_index::MSIX, trig, 7, 2, &[], &tb)), libc::EINVAL);
    assert_eq!(errno(c.set_irqs(9, trig, 0, 1, &[], &tb[..1])), libc::EINVAL);
    assert_eq!(errno(c.set_irqs(irq_index::MSIX, trig | proto::IRQ_SET_ACTION_MASK, 0, 1, &[], &tb[..1])), 22);
    // A blocking eventfd whose counter is one below the maximum: a signal
    // would block forever; the server made it non-blocking and goes on.
    // SAFETY: eventfd(2) with valid flags returns a new fd or -1.
    let raw = unsafe { libc::eventfd(0, 0) };
    assert!(raw >= 0);
    // SAFETY: `raw` is a fresh fd owned by nothing else.
    let full = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    std::io::Write::write_all(&mut &full, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
    c.set_irqs(irq_index::MSIX, trig, 5, 1, &[], &[full.as_fd()]).unwrap();
    wr32(&mut c, 0, regs::IRQ, 5);
    wr32(&mut c, 0, regs::IRQ, 5);
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
    let (pr, _pw) = nix::unistd::pipe().unwrap();
    assert_eq!(errno(c.set_irqs(irq_index::MSIX, trig, 0, 1, &[], &[pr.as_fd()])), libc::EINVAL);
    let short = proto::IrqSet { argsz: 8, flags: trig, index: 2, start: 0, count: 0 };
    assert_eq!(errno(c.call(cmd::DEVICE_SET_IRQS, short.as_bytes(), &[])), libc::EINVAL);
}

#[test]
fn region_read_write_config_space_and_bar_sizing() {
    let s = Stack::new("regions");
    let mut c = s.client();
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
    wr64(&mut c, 0, regs::SCRATCH, 0x1122_3344_5566_7788);
    assert_eq!(c.region_read(0, regs::SCRATCH, 8).unwrap(), 0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(c.region_read(0, regs::SCRATCH + 2, 2).unwrap(), [0x66, 0x55]);
    // Config space in one read, as QEMU does; vendor/device ids; PCIe size.
    let cfg = c.region_read(proto::region::CONFIG, 0, 4096).unwrap();
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 0x1b36);
    assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]), 0x7e57);
    // BAR sizing through REGION_WRITE.
    for (bar, want) in [(0u64, 0xffff_f000u32), (1, 0xffff_0000), (4, 0xffff_ff01)] {
        wr32(&mut c, proto::region::CONFIG, 0x10 + 4 * bar, u32::MAX);
        assert_eq!(rd32(&mut c, proto::region::CONFIG, 0x10 + 4 * bar), want);
    }
    wr32(&mut c, proto::region::CONFIG, 0x30, u32::MAX);
    assert_eq!(rd32(&mut c, proto::region::CONFIG, 0x30), 0xffff_8001);
    // The ROM reads its pattern and refuses writes.
    assert_eq!(c.region_read(6, 0x101, 3).unwrap(), [1, 2, 3]);
    assert_eq!(errno(c.region_write(6, 0, &[1])), libc::EINVAL);
    // I/O BAR.
    c.region_write(4, 0x10, &[9, 8, 7]).unwrap();
    assert_eq!(c.region_read(4, 0x10, 3).unwrap(), [9, 8, 7]);
    // Ranges and sizes are checked.
    assert_eq!(errno(c.region_read(0, 0x1000, 4)), libc::EINVAL);
    assert_eq!(errno(c.region_read(0, u64::MAX - 1, 4)), libc::EINVAL);
    assert_eq!(errno(c.region_read(3, 0, 4)), libc::EINVAL);
    assert_eq!(errno(c.region_read(proto::region::CONFIG, 4095, 2)), libc::EINVAL);
    let huge = proto::RegionAccess { offset: 0, region: 1, count: u32::MAX };
    assert_eq!(errno(c.call(cmd::REGION_READ, huge.as_bytes(), &[])), libc::E2BIG);
    // A write whose count lies about the data that follows.
    let lie = proto::RegionAccess { offset: regs::SCRATCH, region: 0, count: 8 };
    assert_eq!(errno(c.call(cmd::REGION_WRITE, &[lie.as_bytes(), &[1, 2, 3, 4]].concat(), &[])), libc::EINVAL);
    assert_eq!(errno(c.call(cmd::REGION_WRITE, &[lie.as_bytes(), &[0; 12]].concat(), &[])), libc::EINVAL);
    assert_eq!(c.region_read(0, regs::SCRATCH, 8).unwrap(), 0x1122_3344_5566_7788u64.to_le_bytes());
}

#[test]
fn posted_writes_are_applied_in_order() {
    let s = Stack::new("posted");
    let mut c = s.client();
    for _ in 0..1000 {
        c.region_write_posted(0, regs::DOORBELL, &1u32.to_le_bytes()).unwrap();
    }
    // A failing posted write gets no reply either.
    c.region_write_posted(0, 0x2000, &[0; 4]).unwrap();
    wr64(&mut c, 0, regs::SCRATCH, 5);
    assert_eq!(rd32(&mut c, 0, regs::DOORBELL), 1000);
}

#[test]
fn region_write_multi() {
    let s = Stack::new("multi");
    let mut c = s.client();
    let one = 1u32.to_le_bytes();
    let w: Vec<(u32, u64, &[u8])> =
        vec![(0, regs::DOORBELL, &one), (0, regs::DOORBELL, &one), (0, regs::SCRATCH, &[0xaa; 8]), (4, 0x20, &[1, 2])];
    assert_eq!(c.write_multi(&w, false).unwrap(), Some(4));
    c.write_multi(&w[..1], true).unwrap();
    assert_eq!(rd32(&mut c, 0, regs::DOORBELL), 3);
    assert_eq!(c.region_read(4, 0x20, 2).unwrap(), [1, 2]);
    // Lying counts, oversized entries and bad ranges change nothing.
    let mut p = 5u64.to_ne_bytes().to_vec();
    p.extend_from_slice(&[0; 24]);
    assert_eq!(errno(c.call(cmd::REGION_WRITE_MULTI, &p, &[])), libc::EINVAL);
    let mut p = u64::MAX.to_ne_bytes().to_vec();
    p.extend_from_slice(&[0; 48]);
    assert_eq!(errno(c.call(cmd::REGION_WRITE_MULTI, &p, &[])), libc::EINVAL);
    let big = proto::WriteMultiEntry { offset: regs::DOORBELL, region: 0, count: 9, data: [0; 8] };
    let p = [&1u64.to_ne_bytes()[..], big.as_bytes()].concat();
    assert_eq!(errno(c.call(cmd::REGION_WRITE_MULTI, &p, &[])), libc::EINVAL);
    let ok = proto::WriteMultiEntry { offset: regs::DOORBELL, region: 0, count: 4, data: [1, 0, 0, 0, 0, 0, 0, 0] };
    let bad = proto::WriteMultiEntry { offset: 0x2000, region: 0, count: 4, data: [0; 8] };
    let p = [&2u64.to_ne_bytes()[..], ok.as_bytes(), bad.as_bytes()].concat();
    assert_eq!(errno(c.call(cmd::REGION_WRITE_MULTI, &p, &[])), libc::EINVAL);
    assert_eq!(rd32(&mut c, 0, regs::DOORBELL), 3, "validated before any write is applied");
}

#[test]
fn device_reset_returns_registers_to_power_on() {
    let s = Stack::new("reset");
    let mut c = s.client();
    wr64(&mut c, 0, regs::SCRATCH, 77);
    wr32(&mut c, proto::region::CONFIG, 0x04, 0x0006);
    assert_eq!(rd32(&mut c, proto::region::CONFIG, 0x04) & 0xffff, 0x0006);
    c.reset().unwrap();
    // The command register is 0 again: BARs do not decode (reads are all
    // ones, as a master abort) until the driver enables them.
    assert_eq!(rd32(&mut c, proto::region::CONFIG, 0x04) & 0xffff, 0);
    assert_eq!(rd32(&mut c, 0, regs::ID), u32::MAX);
    c.enable_function().unwrap();
    assert_eq!(rd32(&mut c, 0, regs::SCRATCH), 0);
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
}

#[test]
fn dma_logging_reports_exact_dirty_pages() {
    let s = Stack::new("logging");
    let mut c = s.client();
    let mem = memfd("m", 1 << 20);
    c.dma_map(RW, 0, 0x100_0000, 1 << 20, Some(mem.as_fd())).unwrap();
    // Probe, then report before start.
    let probe = proto::FEATURE_PROBE | proto::FEATURE_SET | proto::FEATURE_DMA_LOGGING_START;
    c.feature(probe, &[], 8).unwrap();
    let rep = proto::LoggingReport { iova: 0x100_0000, length: 1 << 20, page_size: 4096 };
    let get = proto::FEATURE_GET | proto::FEATURE_DMA_LOGGING_REPORT;
    assert_eq!(errno(c.feature(get, rep.as_bytes(), 8 + 24 + 32)), libc::EINVAL);
    let ctl = proto::LoggingControl { page_size: 4096, num_ranges: 1, reserved: 0 };
    let range = proto::LoggingRange { iova: 0x100_0000, length: 1 << 20 };
    let set = proto::FEATURE_SET | proto::FEATURE_DMA_LOGGING_START;
    c.feature(set, &[ctl.as_bytes(), range.as_bytes()].concat(), 40).unwrap();
    assert_eq!(errno(c.feature(set, &[ctl.as_bytes(), range.as_bytes()].concat(), 40)), libc::EBUSY);
    // Two copies: pages 5 and 9..=10 written (the read side stays clean).
    assert_eq!(copy(&mut c, 0x100_0000, 0x100_5000, 100, None), regs::STATUS_DONE);
    assert_eq!(copy(&mut c, 0x100_0000, 0x100_9800, 4096, None), regs::STATUS_DONE);
    let d = c.feature(get, rep.as_bytes(), 8 + 24 + 32).unwrap();
    let words: Vec<u64> = d[24..].chunks(8).map(|b| u64::from_ne_bytes(b.try_into().unwrap())).collect();
    assert_eq!(words, vec![(1 << 5) | (1 << 9) | (1 << 10), 0, 0, 0]);
    // Reading cleared it.
    let d = c.feature(get, rep.as_bytes(), 8 + 24 + 32).unwrap();
    assert!(d[24..].iter().all(|&b| b == 0));
    // Too small a reply buffer, bad page size.
    assert_eq!(errno(c.feature(get, rep.as_bytes(), 8 + 24)), libc::ENOSPC);
    let bad = proto::LoggingReport { page_size: 3000, ..rep };
    assert_eq!(errno(c.feature(get, bad.as_bytes(), 8 + 24 + 32)), libc::EINVAL);
    c.feature(proto::FEATURE_SET | proto::FEATURE_DMA_LOGGING_STOP, &[], 8).unwrap();
    assert_eq!(errno(c.feature(get, rep.as_bytes(), 8 + 24 + 32)), libc::EINVAL);
    // Huge range counts are refused.
    let many = proto::LoggingControl { page_size: 4096, num_ranges: u32::MAX, reserved: 0 };
    assert_eq!(errno(c.feature(set, many.as_bytes(), 40)), libc::EINVAL);
    assert_eq!(errno(c.feature(proto::FEATURE_GET | 99, &[], 8)), libc::ENOTSUP);
}

#[test]
fn migration_moves_device_state_to_another_server() {
    let s = Stack::new("migrate");
    let mut src = s.client();
    let d = src.feature(proto::FEATURE_GET | proto::FEATURE_MIGRATION, &[], 16).unwrap();
    assert_ne!(u64::from_ne_bytes(d[..8].try_into().unwrap()) & proto::MIGRATION_STOP_COPY, 0);
    assert_eq!(src.mig_state().unwrap(), mig::RUNNING);
    assert_eq!(errno(src.mig_data_read(64)), libc::EINVAL);
    wr64(&mut src, 0, regs::SCRATCH, 0xfeed);
    src.region_write(1, 0x100, b"device ram").unwrap();
    wr32(&mut src, proto::region::CONFIG, 0x10, 0xfe00_0000);
    // PRE_COPY has no data; STOP_COPY has everything.
    assert_eq!(src.set_mig_state(mig::PRE_COPY).unwrap(), mig::PRE_COPY);
    assert!(src.mig_data_read(4096).unwrap().is_empty());
    assert_eq!(src.set_mig_state(mig::STOP_COPY).unwrap(), mig::STOP_COPY);
    assert_eq!(errno(src.set_mig_state(mig::PRE_COPY)), libc::EINVAL);
    let mut blob = Vec::new();
    loop {
        let chunk = src.mig_data_read(16 * 1024).unwrap();
        let done = chunk.len() < 16 * 1024;
        blob.extend(chunk);
        if done {
            break;
        }
    }
    assert!(blob.len() > 64 * 1024);
    assert_eq!(src.set_mig_state(mig::STOP).unwrap(), mig::STOP);

    let dst_sock = s.dir.join("dst.sock");
    let dst_server = start_server(&s.core_path, &dst_sock, Default::default());
    let mut dst = Client::connect(&dst_sock).unwrap();
    assert_eq!(errno(dst.mig_data_write(&blob[..100])), libc::EINVAL, "only while RESUMING");
    assert_eq!(dst.set_mig_state(mig::RESUMING).unwrap(), mig::RESUMING);
    for chunk in blob.chunks(10_000) {
        dst.mig_data_write(chunk).unwrap();
    }
    assert_eq!(dst.set_mig_state(mig::RUNNING).unwrap(), mig::RUNNING);
    assert_eq!(rd32(&mut dst, 0, regs::SCRATCH), 0xfeed);
    assert_eq!(dst.region_read(1, 0x100, 10).unwrap(), b"device ram");
    assert_eq!(rd32(&mut dst, proto::region::CONFIG, 0x10), 0xfe00_0000);
    // Corrupt data: the transition fails, the device is in ERROR until reset.
    dst.set_mig_state(mig::RESUMING).unwrap();
    dst.mig_data_write(&blob[..blob.len() / 2]).unwrap();
    assert_eq!(errno(dst.set_mig_state(mig::STOP)), libc::EINVAL);
    assert_eq!(dst.mig_state().unwrap(), mig::ERROR);
    assert_eq!(errno(dst.set_mig_state(mig::RUNNING)), libc::EINVAL);
    dst.reset().unwrap();
    assert_eq!(dst.mig_state().unwrap(), mig::RUNNING);
    // The source resumes.
    assert_eq!(src.set_mig_state(mig::RUNNING).unwrap(), mig::RUNNING);
    assert_eq!(errno(src.set_mig_state(5)), libc::EINVAL);
    drop(dst);
    dst_server.stop().unwrap();
}

#[test]
fn unknown_commands_and_fds_where_none_belong() {
    let s = Stack::new("unknown");
    let mut c = s.client();
    assert_eq!(errno(c.call(14, &[], &[])), libc::ENOSYS);
    assert_eq!(errno(c.call(0x3fff, &[1, 2, 3], &[])), libc::ENOSYS);
    let e = eventfd();
    let q = proto::RegionAccess { offset: 0, region: 0, count: 4 };
    assert_eq!(errno(c.call(cmd::REGION_READ, q.as_bytes(), &[e.as_fd()])), libc::EINVAL);
    let mem = memfd("m", 0x2000);
    let m = proto::DmaMap { argsz: 32, flags: RW, offset: 0, address: 0x1000, size: 0x1000 };
    assert_eq!(errno(c.call(cmd::DMA_MAP, m.as_bytes(), &[mem.as_fd(), mem.as_fd()])), libc::EINVAL);
    let m = proto::DmaMap { argsz: 16, ..m };
    assert_eq!(errno(c.call(cmd::DMA_MAP, m.as_bytes(), &[mem.as_fd()])), libc::EINVAL);
    // More fds than max_msg_fds.
    let many: Vec<std::fs::File> = (0..20).map(|_| eventfd()).collect();
    let mb: Vec<_> = many.iter().map(|f| f.as_fd()).collect();
    let set = proto::IrqSet {
        argsz: 20,
        flags: proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
        index: 2,
        start: 0,
        count: 20,
    };
    assert_eq!(errno(c.call(cmd::DEVICE_SET_IRQS, set.as_bytes(), &mb)), libc::EINVAL);
    // Truncated payloads of every fixed-size command.
    for command in [2u16, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 18] {
        assert_eq!(errno(c.call(command, &[0; 3], &[])), libc::EINVAL, "command {command}");
    }
    // A reply sent by the client to nothing is ignored.
    let stray = proto::Header { msg_id: 9, command: 11, msg_size: 16, flags: proto::flags::REPLY, error: 0 };
    c.send_raw(stray.as_bytes(), &[]).unwrap();
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
}

#[test]
fn hostile_framing_is_survived() {
    let s = Stack::new("hostile");
    let mut c = s.client();
    // Declares 32 MiB: skipped (as it arrives) and refused with E2BIG.
    let mut h = proto::Header::command(40, cmd::REGION_WRITE, 0);
    h.msg_size = 32 << 20;
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend(vec![0u8; (32 << 20) - 16]);
    let id = 40;
    c.send_raw(&bytes, &[]).unwrap();
    assert_eq!(c.wait(id, cmd::REGION_WRITE).unwrap_err().errno(), Some(libc::E2BIG));
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
    // A size below the header cannot be followed: the connection closes,
    // and the server accepts the next client with the device intact.
    wr64(&mut c, 0, regs::SCRATCH, 31);
    let mut h = proto::Header::command(41, cmd::DEVICE_RESET, 0);
    h.msg_size = 8;
    c.send_raw(h.as_bytes(), &[]).unwrap();
    assert!(c.recv().is_err());
    let mut c2 = s.client();
    assert_eq!(rd32(&mut c2, 0, regs::SCRATCH), 31);
    // A client that sends half a message and leaves.
    drop(c2);
    let mut c3 = Client::from_stream(std::os::unix::net::UnixStream::connect(&s.sock).unwrap());
    let h = proto::Header::command(1, cmd::VERSION, 100);
    c3.send_raw(&h.as_bytes()[..10], &[]).unwrap();
    drop(c3);
    let mut c4 = s.client();
    assert_eq!(rd32(&mut c4, 0, regs::ID), regs::ID_VALUE);
}

/// A client that sends a command and the start of an oversized message
/// and shuts its end at once (the end of the stream arrives with the
/// bytes, in one readable event): the command is answered and the server
/// closes the connection, as it sees the end behind the bytes.
#[test]
fn the_end_of_the_stream_behind_the_last_bytes_is_seen() {
    let s = Stack::new("eof");
    let mut c = s.client();
    let q = proto::RegionAccess { offset: regs::ID, region: 0, count: 4 };
    let read = [proto::Header::command(7, cmd::REGION_READ, 16).as_bytes(), q.as_bytes()].concat();
    let mut big = proto::Header::command(8, cmd::REGION_WRITE, 0);
    big.msg_size = 32 << 20;
    c.send_raw(&[read.as_slice(), big.as_bytes()].concat(), &[]).unwrap();
    c.socket().shutdown(std::net::Shutdown::Write).unwrap();
    let r = c.wait(7, cmd::REGION_READ).unwrap();
    assert_eq!(r.payload[16..], regs::ID_VALUE.to_le_bytes());
    // Then the end: the server closed its side (not a read timing out).
    c.socket().set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    match c.recv() {
        Err(vfio_user_server::client::Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("the server did not close the connection: {other:?}"),
    }
}

#[test]
fn reconnect_releases_dma_and_keeps_device_state() {
    let s = Stack::new("reconnect");
    let mem = memfd("m", 0x10000);
    let irq = eventfd();
    {
        let mut c = s.client();
        c.dma_map(RW, 0, 0x1_0000, 0x10000, Some(mem.as_fd())).unwrap();
        c.set_irqs(
            irq_index::MSIX,
            proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[],
            &[irq.as_fd()],
        )
        .unwrap();
        wr64(&mut c, 0, regs::SCRATCH, 0xabc);
        // A second client is turned away while this one is connected.
        let second = Client::connect(&s.sock);
        assert!(second.is_err());
    }
    // The server notices the disconnect: DMA goes, interrupts are unwired.
    let t0 = std::time::Instant::now();
    while s.server().dma().map_count() != 0 {
        assert!(t0.elapsed().as_secs() < 5, "DMA regions of a departed client stay");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut c = s.client();
    assert_eq!(rd32(&mut c, 0, regs::SCRATCH), 0xabc);
    wr32(&mut c, 0, regs::IRQ, 0);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(count_now(&irq), 0, "the old client's eventfd was dropped");
    // The old IOVA is gone from the compat IOAS; mapping again works.
    assert_eq!(copy(&mut c, 0x1_0000, 0x1_1000, 8, None), regs::STATUS_ERROR);
    c.dma_map(RW, 0, 0x1_0000, 0x10000, Some(mem.as_fd())).unwrap();
    assert_eq!(copy(&mut c, 0x1_0000, 0x1_1000, 8, None), regs::STATUS_DONE);
    assert_eq!(s.server().stats().connections.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn a_departed_client_leaves_no_work_or_access_behind() {
    let s = Stack::new("departed");
    let a_mem = memfd("a", 0x10000);
    a_mem.write_all_at(b"A's secret", 0).unwrap();
    let (old_bar1, old_bell) = {
        let mut a = s.client();
        a.dma_map(RW, 0, 0x10_0000, 0x10000, Some(a_mem.as_fd())).unwrap();
        // Stop the device, queue a copy, leave.
        assert_eq!(a.set_mig_state(mig::STOP).unwrap(), mig::STOP);
        wr64(&mut a, 0, regs::DMA_SRC, 0x10_0000);
        wr64(&mut a, 0, regs::DMA_DST, 0x10_8000);
        wr32(&mut a, 0, regs::DMA_LEN, 10);
        wr32(&mut a, 0, regs::DMA_CMD, 1);
        assert_eq!(rd32(&mut a, 0, regs::DMA_STATUS), regs::STATUS_BUSY);
        let bar1 = a.region_info(1).unwrap();
        let (_, bell) = a.region_io_fds(0).unwrap();
        (std::fs::File::from(bar1.fd.unwrap()), std::fs::File::from(bell.into_iter().next().unwrap()))
    };
    let t0 = std::time::Instant::now();
    while s.server().dma().map_count() != 0 {
        assert!(t0.elapsed().as_secs() < 5);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // B maps its own memory at the same IOVA. The device kept its state
    // (stopped); B runs it again.
    let mut b = s.client();
    let b_mem = memfd("b", 0x10000);
    b_mem.write_all_at(b"B's data..", 0).unwrap();
    b.dma_map(RW, 0, 0x10_0000, 0x10000, Some(b_mem.as_fd())).unwrap();
    assert_eq!(b.mig_state().unwrap(), mig::STOP, "the device state is retained across a disconnect");
    assert_eq!(b.set_mig_state(mig::RUNNING).unwrap(), mig::RUNNING);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut got = [0u8; 10];
    b_mem.read_exact_at(&mut got, 0x8000).unwrap();
    assert_eq!(got, [0; 10], "A's queued copy ran against B's memory");
    assert_ne!(rd32(&mut b, 0, regs::DMA_STATUS), regs::STATUS_BUSY);
    // A's BAR 1 fd and doorbell eventfd no longer reach the device.
    old_bar1.write_all_at(b"from A", 0x8000).unwrap();
    assert_eq!(b.region_read(1, 0x8000, 6).unwrap(), [0; 6]);
    std::io::Write::write_all(&mut &old_bell, &1u64.to_ne_bytes()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(rd32(&mut b, 0, regs::DOORBELL), 0);
    // B's own copies work.
    assert_eq!(copy(&mut b, 0x10_0000, 0x10_8000, 10, None), regs::STATUS_DONE);
    b_mem.read_exact_at(&mut got, 0x8000).unwrap();
    assert_eq!(&got, b"B's data..");
}

/// Files that are not memory are refused by DMA_MAP with EINVAL, before
/// anything asks their file system; O_PATH fds of regular files included
/// (they give no access to the contents).
#[test]
fn dma_map_refuses_fds_that_are_not_memory() {
    use std::os::unix::fs::OpenOptionsExt;
    let s = Stack::new("dma-notmem");
    let mut c = s.client();
    let path = s.dir.join("plain");
    let plain = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    plain.set_len(0x10000).unwrap();
    let opath = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(&path).unwrap();
    let opath_memfd = {
        let m = memfd("m", 0x10000);
        let p = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&m));
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(p).unwrap()
    };
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let status = std::fs::File::open("/proc/self/status").unwrap();
    let dir = std::fs::File::open(&s.dir).unwrap();
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let efd = eventfd();
    let files: [(&str, std::os::fd::BorrowedFd); 7] = [
        ("O_PATH file", opath.as_fd()),
        ("O_PATH memfd", opath_memfd.as_fd()),
        ("/dev/zero", zero.as_fd()),
        ("/proc file", status.as_fd()),
        ("directory", dir.as_fd()),
        ("socket", sock.as_fd()),
        ("eventfd", efd.as_fd()),
    ];
    for (what, fd) in files {
        assert_eq!(errno(c.dma_map(proto::DMA_MAP_READ, 0, 0x10_0000, 0x1000, Some(fd))), libc::EINVAL, "{what}");
    }
    assert_eq!(s.server().dma().map_count(), 0);
    // The same client is served, and memory is still accepted.
    let mem = memfd("good", 0x10000);
    c.dma_map(RW, 0, 0x10_0000, 0x10000, Some(mem.as_fd())).unwrap();
    mem.write_all_at(b"memory", 0).unwrap();
    assert_eq!(copy(&mut c, 0x10_0000, 0x10_8000, 6, None), regs::STATUS_DONE);
}

/// DMA_MAP with write permission of memory the client cannot write (a
/// write-sealed memfd, an fd opened read-only) is refused with EACCES at map
/// time; mapping the same memory read-only is accepted (a read-only
/// mapping in the compat IOAS), and the device reads through it.
#[test]
fn dma_map_for_writing_needs_memory_the_client_can_write() {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let s = Stack::new("dma-write");
    let mut c = s.client();
    let out = memfd("out", 0x10000);
    c.dma_map(RW, 0, 0x10_0000, 0x10000, Some(out.as_fd())).unwrap();
    let sealed = |seal: SealFlag, name: &str| {
        let m = memfd("sealed", 0x10000);
        m.write_all_at(name.as_bytes(), 0).unwrap();
        fcntl(std::os::fd::AsRawFd::as_raw_fd(&m), FcntlArg::F_ADD_SEALS(seal)).unwrap();
        m
    };
    let rw = memfd("rw", 0x10000);
    rw.write_all_at(b"read-only fd", 0).unwrap();
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&rw))).unwrap();
    let cases = [
        ("F_SEAL_WRITE", sealed(SealFlag::F_SEAL_WRITE, "F_SEAL_WRITE"), b"F_SEAL_WRITE".to_vec()),
        (
            "F_SEAL_FUTURE_WRITE",
            sealed(SealFlag::F_SEAL_FUTURE_WRITE, "F_SEAL_FUTURE_WRITE"),
            b"F_SEAL_FUTURE_WRITE".to_vec(),
        ),
        ("O_RDONLY", ro, b"read-only fd".to_vec()),
    ];
    for (i, (what, f, content)) in cases.iter().enumerate() {
        let iova = 0x100_0000 * (i as u64 + 1);
        assert_eq!(errno(c.dma_map(RW, 0, iova, 0x10000, Some(f.as_fd()))), libc::EACCES, "{what}");
        assert_eq!(errno(c.dma_map(proto::DMA_MAP_WRITE, 0, iova, 0x10000, Some(f.as_fd()))), libc::EACCES, "{what}");
        c.dma_map(proto::DMA_MAP_READ, 0, iova, 0x10000, Some(f.as_fd())).unwrap();
        let snap = s.observer().status().unwrap();
        let compat = s.server().dma().compat().expect("the server is connected to its core");
        let sess = snap.sessions.iter().find(|x| x.id == compat.session_id()).unwrap();
        let ioas = sess.ioas.iter().find(|x| x.id == compat.ioas()).unwrap();
        let m = ioas.mappings.iter().find(|m| m.iova == iova).expect("the read-only mapping");
        assert_eq!((m.length, m.perm), (0x10000, iommu_core::types::Perm::R), "{what}");
        let dst = 0x10_0000 + 0x1000 * i as u64;
        assert_eq!(copy(&mut c, iova, dst, content.len() as u32, None), regs::STATUS_DONE, "{what}");
        let mut got = vec![0u8; content.len()];
        out.read_exact_at(&mut got, 0x1000 * i as u64).unwrap();
        assert_eq!(&got, content, "{what}");
        // Writing into it through the device faults.
        assert_eq!(copy(&mut c, 0x10_0000, iova, 4, None), regs::STATUS_ERROR, "{what}");
    }
}

/// The reply to DEVICE_FEATURE SET of MIG_DEVICE_STATE is the request,
/// byte for byte (`data_fd` is unused in vfio-user, and comes back as sent).
#[test]
fn mig_device_state_set_replies_with_the_request() {
    let s = Stack::new("mig-echo");
    let mut c = s.client();
    let flags = proto::FEATURE_SET | proto::FEATURE_MIG_DEVICE_STATE;
    for (state, data_fd) in [(mig::STOP, 0x1234_5678u32), (mig::RUNNING, 0), (mig::PRE_COPY, u32::MAX)] {
        let req = [
            proto::Feature { argsz: 16, flags }.as_bytes(),
            proto::MigState { device_state: state, data_fd }.as_bytes(),
        ]
        .concat();
        let r = c.call(cmd::DEVICE_FEATURE, &req, &[]).unwrap();
        assert_eq!(r.payload, req, "state {state}");
        assert_eq!(c.mig_state().unwrap(), state);
    }
    // A reply that would not fit the request's argsz.
    let req = [
        proto::Feature { argsz: 12, flags }.as_bytes(),
        proto::MigState { device_state: mig::RUNNING, data_fd: 0 }.as_bytes(),
    ]
    .concat();
    assert_eq!(errno(c.call(cmd::DEVICE_FEATURE, &req, &[])), libc::EINVAL);
    assert_eq!(c.mig_state().unwrap(), mig::PRE_COPY, "a refused SET changes nothing");
}

/// Device state, migration state and data included, is retained across a
/// client disconnect: a migration is driven across two connections on both
/// sides. The disconnect still releases the client's DMA.
#[test]
fn migration_state_is_kept_across_a_disconnect() {
    let s = Stack::new("mig-reconnect");
    let mem = memfd("m", 0x10000);
    let head = {
        let mut c = s.client();
        c.dma_map(RW, 0, 0x10_0000, 0x10000, Some(mem.as_fd())).unwrap();
        wr64(&mut c, 0, regs::SCRATCH, 0x5eed);
        c.region_write(1, 0x200, b"kept across").unwrap();
        assert_eq!(c.set_mig_state(mig::STOP_COPY).unwrap(), mig::STOP_COPY);
        c.mig_data_read(1000).unwrap()
    };
    assert_eq!(head.len(), 1000);
    let t0 = std::time::Instant::now();
    while s.server().dma().map_count() != 0 {
        assert!(t0.elapsed().as_secs() < 10, "DMA regions of a departed client stay");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut c = s.client();
    assert_eq!(c.mig_state().unwrap(), mig::STOP_COPY);
    let mut blob = head;
    loop {
        let chunk = c.mig_data_read(16 * 1024).unwrap();
        let done = chunk.len() < 16 * 1024;
        blob.extend(chunk);
        if done {
            break;
        }
    }
    assert_eq!(c.set_mig_state(mig::STOP).unwrap(), mig::STOP);
    drop(c);
    let mut c = s.client();
    assert_eq!(c.mig_state().unwrap(), mig::STOP, "a stopped device stays stopped for the next client");
    drop(c);

    // The destination loads half the data on one connection, the rest on
    // the next.
    let dst_sock = s.dir.join("dst.sock");
    let dst_server = start_server(&s.core_path, &dst_sock, Default::default());
    {
        let mut d = Client::connect(&dst_sock).unwrap();
        assert_eq!(d.set_mig_state(mig::RESUMING).unwrap(), mig::RESUMING);
        d.mig_data_write(&blob[..blob.len() / 2]).unwrap();
    }
    let mut d = Client::connect(&dst_sock).unwrap();
    assert_eq!(d.mig_state().unwrap(), mig::RESUMING);
    d.mig_data_write(&blob[blob.len() / 2..]).unwrap();
    assert_eq!(d.set_mig_state(mig::RUNNING).unwrap(), mig::RUNNING);
    assert_eq!(rd32(&mut d, 0, regs::SCRATCH), 0x5eed);
    assert_eq!(d.region_read(1, 0x200, 11).unwrap(), b"kept across");
    drop(d);
    dst_server.stop().unwrap();
}

/// SET_IRQS with DATA_BOOL carries exactly `count` bytes: more or fewer
/// are refused with EINVAL and nothing is applied.
#[test]
fn set_irqs_data_bool_needs_exactly_count_bytes() {
    let s = Stack::new("irq-bools");
    let mut c = s.client();
    let efds: Vec<std::fs::File> = (0..2).map(|_| eventfd()).collect();
    let b: Vec<_> = efds.iter().map(|f| f.as_fd()).collect();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    c.set_irqs(irq_index::MSIX, trig, 0, 2, &[], &b).unwrap();
    let bool_mask = proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_ACTION_MASK;
    assert_eq!(errno(c.set_irqs(irq_index::MSIX, bool_mask, 0, 2, &[1, 1, 1], &[])), libc::EINVAL);
    assert_eq!(errno(c.set_irqs(irq_index::MSIX, bool_mask, 0, 2, &[1], &[])), libc::EINVAL);
    let bool_trig = proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_ACTION_TRIGGER;
    assert_eq!(errno(c.set_irqs(irq_index::MSIX, bool_trig, 0, 1, &[1, 0], &[])), libc::EINVAL);
    // Nothing of the refused requests was applied: vector 0 was neither
    // triggered nor masked.
    assert_eq!(count_now(&efds[0]), 0);
    wr32(&mut c, 0, regs::IRQ, 0);
    assert_eq!(wait_count(&efds[0]), 1);
    // Exactly `count` bytes: applied.
    c.set_irqs(irq_index::MSIX, bool_mask, 0, 2, &[0, 1], &[]).unwrap();
    wr32(&mut c, 0, regs::IRQ, 1);
    assert_eq!(count_now(&efds[1]), 0, "vector 1 is masked");
    c.set_irqs(irq_index::MSIX, bool_trig, 0, 2, &[1, 0], &[]).unwrap();
    assert_eq!(wait_count(&efds[0]), 1);
}

/// SET_IRQS MASK and UNMASK (with NONE, BOOL or EVENTFD data) are refused
/// with EINVAL on an index whose GET_IRQ_INFO lacks MASKABLE (ERR, REQ);
/// TRIGGER still works there, and maskable indexes still mask.
#[test]
fn set_irqs_masks_only_maskable_indexes() {
    let s = Stack::new("irq-maskable");
    let mut c = s.client();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    for index in [irq_index::ERR, irq_index::REQ] {
        assert_eq!(c.irq_info(index).unwrap().flags & proto::IRQ_INFO_MASKABLE, 0);
        let e = eventfd();
        for act in [proto::IRQ_SET_ACTION_MASK, proto::IRQ_SET_ACTION_UNMASK] {
            let none = proto::IRQ_SET_DATA_NONE | act;
            assert_eq!(errno(c.set_irqs(index, none, 0, 1, &[], &[])), libc::EINVAL, "index {index}");
            let bools = proto::IRQ_SET_DATA_BOOL | act;
            assert_eq!(errno(c.set_irqs(index, bools, 0, 1, &[1], &[])), libc::EINVAL, "index {index}");
            let efd = proto::IRQ_SET_DATA_EVENTFD | act;
            assert_eq!(errno(c.set_irqs(index, efd, 0, 1, &[], &[e.as_fd()])), libc::EINVAL, "index {index}");
        }
        // Triggering stays allowed, and nothing was masked.
        c.set_irqs(index, trig, 0, 1, &[], &[e.as_fd()]).unwrap();
        c.set_irqs(index, proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER, 0, 1, &[], &[]).unwrap();
        assert_eq!(wait_count(&e), 1);
    }
    for index in [irq_index::INTX, irq_index::MSI, irq_index::MSIX] {
        assert_ne!(c.irq_info(index).unwrap().flags & proto::IRQ_INFO_MASKABLE, 0);
        c.set_irqs(index, proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_MASK, 0, 1, &[], &[]).unwrap();
        c.set_irqs(index, proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_UNMASK, 0, 1, &[], &[]).unwrap();
    }
}

fn bits_of(d: &[u8]) -> Vec<u64> {
    let words: Vec<u64> = d[24..].chunks(8).map(|b| u64::from_ne_bytes(b.try_into().unwrap())).collect();
    (0..words.len() as u64 * 64).filter(|&k| words[(k / 64) as usize] & (1 << (k % 64)) != 0).collect()
}

/// DMA_LOGGING_REPORT takes any power-of-two page size, whatever START
/// said: below the 4 KiB tracking granule a dirty granule sets every page
/// it covers; above it a page is dirty if any granule in it is. A report
/// clears only granules wholly inside its range, so an unaligned report
/// never hides writes outside it.
#[test]
fn dma_logging_reports_at_any_power_of_two_page_size() {
    let s = Stack::new("logging-sizes");
    let mut c = s.client();
    let mem = memfd("m", 1 << 20);
    const BASE: u64 = 0x100_0000;
    c.dma_map(RW, 0, BASE, 1 << 20, Some(mem.as_fd())).unwrap();
    let ctl = proto::LoggingControl { page_size: 4096, num_ranges: 0, reserved: 0 };
    let start = proto::FEATURE_SET | proto::FEATURE_DMA_LOGGING_START;
    c.feature(start, ctl.as_bytes(), 24).unwrap();
    let get = proto::FEATURE_GET | proto::FEATURE_DMA_LOGGING_REPORT;
    let report = |c: &mut Client, iova: u64, length: u64, page_size: u64| {
        let rep = proto::LoggingReport { iova, length, page_size };
        let words = length.div_ceil(page_size).div_ceil(64);
        let d = c.feature(get, rep.as_bytes(), (8 + 24 + 8 * words) as u32).unwrap();
        assert_eq!(&d[..24], rep.as_bytes(), "the request comes back before the bitmap");
        assert_eq!(d.len() as u64, 24 + 8 * words);
        bits_of(&d)
    };
    // Granule 5 written (100 bytes at its start).
    assert_eq!(copy(&mut c, BASE, BASE + 0x5000, 100, None), regs::STATUS_DONE);
    // 1 KiB pages over granules 4..8: the four pages of granule 5.
    assert_eq!(report(&mut c, BASE + 0x4000, 0x4000, 1024), vec![4, 5, 6, 7]);
    // Each report clears granule 5: it is written again for each size.
    assert_eq!(copy(&mut c, BASE, BASE + 0x5000, 100, None), regs::STATUS_DONE);
    assert_eq!(report(&mut c, BASE, 1 << 20, 1), (0x5000..0x6000).collect::<Vec<u64>>());
    assert_eq!(copy(&mut c, BASE, BASE + 0x5000, 100, None), regs::STATUS_DONE);
    assert_eq!(report(&mut c, BASE, 1 << 20, 64 * 1024), vec![0], "a 64 KiB page holding granule 5");
    assert_eq!(copy(&mut c, BASE, BASE + 0x5000, 100, None), regs::STATUS_DONE);
    assert_eq!(report(&mut c, BASE, 1 << 20, 1 << 20), vec![0]);
    assert_eq!(report(&mut c, BASE, 1 << 20, 4096), Vec::<u64>::new(), "every report above cleared it");

    // An unaligned report: 2 KiB pages from BASE + 0x4800 over 0x1000
    // bytes; granule 5 sticks out of its end, so it is reported and stays
    // dirty; granule 4 (its start) was not written.
    assert_eq!(copy(&mut c, BASE, BASE + 0x5800, 16, None), regs::STATUS_DONE);
    assert_eq!(report(&mut c, BASE + 0x4800, 0x1000, 2048), vec![1]);
    assert_eq!(report(&mut c, BASE, 1 << 20, 4096), vec![5], "the unaligned report did not clear granule 5");
    // Pages larger than the iova's alignment: 8 KiB pages from BASE + 0x1000.
    assert_eq!(copy(&mut c, BASE, BASE + 0x6000, 16, None), regs::STATUS_DONE);
    assert_eq!(report(&mut c, BASE + 0x1000, 0x8000, 8192), vec![2], "granule 6 is in the page at 0x5000");
    // Still refused: not a power of two, length 0, a too small buffer.
    for bad in [
        proto::LoggingReport { iova: BASE, length: 0x1000, page_size: 3000 },
        proto::LoggingReport { iova: BASE, length: 0x1000, page_size: 0 },
        proto::LoggingReport { iova: BASE, length: 0, page_size: 4096 },
    ] {
        assert_eq!(errno(c.feature(get, bad.as_bytes(), 8 + 24 + 8)), libc::EINVAL, "{bad:?}");
    }
    let rep = proto::LoggingReport { iova: BASE, length: 0x1000, page_size: 8 };
    assert_eq!(errno(c.feature(get, rep.as_bytes(), 8 + 24 + 8)), libc::ENOSPC, "512 bits need 64 bytes");
    assert_eq!(c.feature(get, rep.as_bytes(), 8 + 24 + 64).unwrap().len(), 24 + 64);
    let huge = proto::LoggingReport { iova: BASE, length: 1 << 30, page_size: 1 };
    assert_eq!(errno(c.feature(get, huge.as_bytes(), u32::MAX)), libc::E2BIG);
}
