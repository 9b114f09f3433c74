//! End to end with real processes: `iommu-core`, `vfio-user-server
//! dma-engine`, and this test as the VMM (a core session plus a vfio-user
//! client using the ioasid extension), over real sockets.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use ioasid_stack::engine::{Doorbell, Engine, GuestRam, Queue};
use iommu_core::pagetable::Perm;
use iommu_core::types::{FaultReason, MapArgs};
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{flag, op, regs, status, Descriptor};

const KIOVA: u64 = 0x1000_0000;
const DIOVA: u64 = 0x2000_0000;
const DSIZE: u64 = 4 << 20;

struct Vm {
    sess: iommu_core::client::Client,
    eng: Engine,
    kram: GuestRam,
    a: GuestRam,
    b: GuestRam,
    ioas_k: u32,
    ioas_a: u32,
    ioas_b: u32,
    dev: u32,
    q: Queue,
    mem_a: u32,
}

fn map(sess: &mut iommu_core::client::Client, ioas: u32, mem: u32, len: u64, iova: u64) {
    sess.map(MapArgs { ioas, mem, offset: 0, length: len, iova: Some(iova), perm: Perm::RW }).unwrap();
}

/// Kernel RAM (ring, completions) in IOAS K on the RID; guest data in
/// IOASes A (vPASID 5) and B (vPASID 9) at the same IOVA.
fn vm(st: &mut Stack, name: &str) -> Vm {
    let sock = st.server("dma-engine", name);
    let mut sess = st.session();
    let kram = GuestRam::new("kram", 1 << 20).unwrap();
    let a = GuestRam::new("a", DSIZE).unwrap();
    let b = GuestRam::new("b", DSIZE).unwrap();
    let mk = sess.register_memory(kram.file.as_fd()).unwrap().id;
    let mem_a = sess.register_memory(a.file.as_fd()).unwrap().id;
    let mb = sess.register_memory(b.file.as_fd()).unwrap().id;
    let (ioas_k, ioas_a, ioas_b) = (sess.ioas_alloc().unwrap(), sess.ioas_alloc().unwrap(), sess.ioas_alloc().unwrap());
    map(&mut sess, ioas_k, mk, 1 << 20, KIOVA);
    map(&mut sess, ioas_a, mem_a, DSIZE, DIOVA);
    map(&mut sess, ioas_b, mb, DSIZE, DIOVA);
    let (_, chan) = sess.open_device_channel().unwrap();
    let mut c = Client::connect(&sock).unwrap();
    let bound = c.ioasid_bind(chan.as_fd()).unwrap();
    c.ioasid_attach(None, ioas_k, false).unwrap();
    c.ioasid_attach(Some(5), ioas_a, false).unwrap();
    c.ioasid_attach(Some(9), ioas_b, false).unwrap();
    let mut eng = Engine::new(c).unwrap();
    let q = eng.setup_queue(0, 64, KIOVA, 0, KIOVA + 0x10000, 0x10000, None, false).unwrap();
    Vm { sess, eng, kram, a, b, ioas_k, ioas_a, ioas_b, dev: bound.dev_id, q, mem_a }
}

fn copy(pasid: Option<u32>, src: u64, dst: u64, len: u32) -> Descriptor {
    Descriptor {
        opcode: op::COPY,
        flags: if pasid.is_some() { flag::PASID } else { 0 },
        pasid: pasid.unwrap_or(0),
        len,
        src,
        dst,
        ..Default::default()
    }
}

#[test]
fn two_address_spaces_two_vpasids_and_rid_dma() {
    let mut st = Stack::new("two");
    let mut v = vm(&mut st, "eng");
    v.a.write(0, b"only in A").unwrap();
    v.b.write(0, b"only in B").unwrap();
    v.kram.write(0x8_0000, b"kernel").unwrap();
    let c = v.eng.run(&v.kram, &mut v.q, copy(Some(5), DIOVA, DIOVA + 0x1000, 9), Doorbell::Mmap).unwrap();
    assert_eq!((c.status, c.bytes_done), (status::SUCCESS, 9));
    let c = v.eng.run(&v.kram, &mut v.q, copy(Some(9), DIOVA, DIOVA + 0x2000, 9), Doorbell::Posted).unwrap();
    assert_eq!(c.status, status::SUCCESS);
    let c = v.eng.run(&v.kram, &mut v.q, copy(None, KIOVA + 0x8_0000, KIOVA + 0x9_0000, 6), Doorbell::Register);
    assert_eq!(c.unwrap().status, status::SUCCESS);
    assert_eq!(v.a.read(0x1000, 9).unwrap(), b"only in A");
    assert_eq!(v.b.read(0x1000, 9).unwrap(), [0; 9], "vPASID 5's copy stayed out of B");
    assert_eq!(v.b.read(0x2000, 9).unwrap(), b"only in B");
    assert_eq!(v.a.read(0x2000, 9).unwrap(), [0; 9], "vPASID 9's copy stayed out of A");
    assert_eq!(v.kram.read(0x9_0000, 6).unwrap(), b"kernel");
    // Fill, compare and CRC-32C, in both spaces.
    let fill = Descriptor {
        opcode: op::FILL,
        flags: flag::PASID,
        pasid: 5,
        len: 1000,
        dst: DIOVA + 0x3000,
        pattern: 0x0807_0605_0403_0201,
        ..Default::default()
    };
    assert_eq!(v.eng.run(&v.kram, &mut v.q, fill, Doorbell::Mmap).unwrap().status, status::SUCCESS);
    let want: Vec<u8> = (0..1000).map(|i| (i % 8 + 1) as u8).collect();
    assert_eq!(v.a.read(0x3000, 1000).unwrap(), want);
    let crc = Descriptor {
        opcode: op::CRC32C,
        flags: flag::PASID,
        pasid: 5,
        len: 1000,
        src: DIOVA + 0x3000,
        ..Default::default()
    };
    let c = v.eng.run(&v.kram, &mut v.q, crc, Doorbell::Mmap).unwrap();
    assert_eq!((c.status, c.result), (status::SUCCESS, u64::from(crc32c_of(&want))));
    let mut other = want.clone();
    other[777] ^= 1;
    v.a.write(0x4000, &other).unwrap();
    let cmp = Descriptor {
        opcode: op::COMPARE,
        flags: flag::PASID,
        pasid: 5,
        len: 1000,
        src: DIOVA + 0x3000,
        dst: DIOVA + 0x4000,
        ..Default::default()
    };
    let c = v.eng.run(&v.kram, &mut v.q, cmp, Doorbell::Mmap).unwrap();
    assert_eq!((c.status, c.result), (status::MISMATCH, 777));
    // The server's map as observers read it: vPASIDs 5 and 9, nothing else.
    let snap = st.observer().status().unwrap();
    let s = snap.sessions.iter().find(|s| s.id == v.sess.session_id()).unwrap();
    let d = s.devices.iter().find(|d| d.id == v.dev).unwrap();
    assert_eq!(d.name, "dma-engine");
    let drv = st.observer().driver_state(v.sess.session_id(), v.dev).unwrap();
    let vp: Vec<(u32, u32)> = drv.vpasids.iter().map(|e| (e.vpasid, e.pt_id)).collect();
    assert_eq!(vp, vec![(5, v.ioas_a), (9, v.ioas_b)]);
    assert_eq!(v.eng.queue_reg(0, regs::Q_ERRORS).unwrap(), 1, "the mismatch counts as an error completion");
}

fn crc32c_of(b: &[u8]) -> u32 {
    // Bitwise CRC-32C (Castagnoli, reflected 0x82F63B78), as a reference.
    let mut crc = !0u32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn unattached_vpasid_and_unmapped_iova_fail_alone() {
    let mut st = Stack::new("faults");
    let mut v = vm(&mut st, "eng");
    // Queue 1 keeps working while queue 0 sees errors.
    let mut q1 = v.eng.setup_queue(1, 16, KIOVA + 0x4000, 0x4000, KIOVA + 0x20000, 0x20000, None, false).unwrap();
    v.a.write(0, b"data").unwrap();
    let c = v.eng.run(&v.kram, &mut v.q, copy(Some(7), DIOVA, DIOVA + 0x1000, 4), Doorbell::Mmap).unwrap();
    assert_eq!(c.status, status::NO_PASID);
    let c = v.eng.run(&v.kram, &mut v.q, copy(Some(5), DIOVA + DSIZE, DIOVA + 0x1000, 4), Doorbell::Mmap).unwrap();
    assert_eq!((c.status, c.fault_addr), (status::FAULT_SRC, DIOVA + DSIZE));
    let c = v.eng.run(&v.kram, &mut v.q, copy(Some(5), DIOVA, DIOVA + DSIZE - 2, 4), Doorbell::Mmap).unwrap();
    assert_eq!(c.status, status::FAULT_DST);
    let bad = Descriptor { opcode: 99, ..copy(None, KIOVA, KIOVA, 4) };
    assert_eq!(v.eng.run(&v.kram, &mut v.q, bad, Doorbell::Mmap).unwrap().status, status::INVALID);
    // No stray write anywhere.
    assert_eq!(v.a.read(0x1000, 4).unwrap(), [0; 4]);
    assert_eq!(v.b.read(0x1000, 4).unwrap(), [0; 4]);
    assert_eq!(v.a.read(DSIZE - 2, 2).unwrap(), [0; 2]);
    // The session sees the faults.
    let t0 = std::time::Instant::now();
    let mut faults = Vec::new();
    while faults.len() < 2 && t0.elapsed() < Duration::from_secs(5) {
        faults.extend(v.sess.read_faults(64).unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(faults.iter().all(|f| f.dev_id == v.dev), "{faults:?}");
    assert!(faults.iter().any(|f| f.iova == DIOVA + DSIZE && f.reason == FaultReason::NotPresent), "{faults:?}");
    let c = v.eng.run(&v.kram, &mut q1, copy(Some(5), DIOVA, DIOVA + 0x2000, 4), Doorbell::Mmap).unwrap();
    assert_eq!(c.status, status::SUCCESS);
    assert_eq!(v.a.read(0x2000, 4).unwrap(), b"data");
    assert_eq!(v.eng.queue_reg(0, regs::Q_ERRORS).unwrap(), 4);
    // A ring the queue cannot fetch halts that queue only.
    let mut q2 = v.eng.setup_queue(2, 16, 0x7000_0000, 0x6000, KIOVA + 0x30000, 0x30000, None, false).unwrap();
    v.eng.push(&v.kram, &mut q2, copy(None, KIOVA, KIOVA + 8, 4)).unwrap();
    v.eng.ring(&q2, Doorbell::Register).unwrap();
    let t0 = std::time::Instant::now();
    while v.eng.queue_reg(2, regs::Q_STATUS).unwrap() & 2 == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "queue 2 did not halt");
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = v.eng.run(&v.kram, &mut q1, copy(Some(9), DIOVA, DIOVA + 0x2000, 4), Doorbell::Mmap).unwrap();
    assert_eq!(c.status, status::SUCCESS);
}

#[test]
fn unmap_while_the_device_copies_leaves_no_byte_changed_after_it_returns() {
    let mut st = Stack::new("unmap");
    let mut v = vm(&mut st, "eng");
    // A second mapping of A's memory that we unmap under the device.
    let zone = 0x4000_0000u64;
    v.sess
        .map(MapArgs {
            ioas: v.ioas_a,
            mem: v.mem_a,
            offset: 0x20_0000,
            length: 0x10_0000,
            iova: Some(zone),
            perm: Perm::RW,
        })
        .unwrap();
    v.a.write(0, &vec![0x5a; 0x10_0000]).unwrap();
    // Keep the queue full of 1 MiB copies into the zone.
    let mut submitted = 0u32;
    for _ in 0..32 {
        v.eng.push(&v.kram, &mut v.q, copy(Some(5), DIOVA, zone, 0x10_0000)).unwrap();
        submitted += 1;
    }
    v.eng.ring(&v.q, Doorbell::Mmap).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    v.sess.unmap(v.ioas_a, zone, 0x10_0000).unwrap();
    // After the unmap returned: put a sentinel and watch it.
    v.a.write(0x20_0000, &vec![0xee; 0x10_0000]).unwrap();
    for _ in 0..8 {
        v.eng.push(&v.kram, &mut v.q, copy(Some(5), DIOVA, zone, 0x10_0000)).unwrap();
        submitted += 1;
    }
    v.eng.ring(&v.q, Doorbell::Mmap).unwrap();
    let t0 = std::time::Instant::now();
    while v.eng.queue_reg(0, regs::Q_HEAD).unwrap() != submitted {
        assert!(t0.elapsed() < Duration::from_secs(20), "the queue did not drain");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(v.a.read(0x20_0000, 0x10_0000).unwrap().iter().all(|&b| b == 0xee), "a byte changed after unmap");
    assert!(v.eng.queue_reg(0, regs::Q_ERRORS).unwrap() >= 8);
}

#[test]
fn page_requests_fill_an_empty_address_space_on_demand() {
    let mut st = Stack::new("pri");
    let mut v = vm(&mut st, "eng");
    let lazy = v.sess.ioas_alloc().unwrap();
    v.sess.set_page_faults(lazy, true).unwrap();
    let src_ram = GuestRam::new("lazy", 2 << 20).unwrap();
    src_ram.write(0x1234, b"paged in").unwrap();
    let ml = v.sess.register_memory(src_ram.file.as_fd()).unwrap().id;
    v.eng.client.ioasid_attach(Some(11), lazy, false).unwrap();
    // Serve page requests as a VMM's fault handler does.
    let slot = v.eng.push(&v.kram, &mut v.q, copy(Some(11), 0x5000_1234, 0x5010_0000, 8)).unwrap();
    v.eng.ring(&v.q, Doorbell::Mmap).unwrap();
    let mut served = 0;
    let t0 = std::time::Instant::now();
    while served < 2 && t0.elapsed() < Duration::from_secs(10) {
        for f in v.sess.read_faults(16).unwrap() {
            if f.cookie == 0 {
                continue;
            }
            let page = f.iova & !0xfff;
            let off = if page < 0x5010_0000 { page - 0x5000_0000 } else { 0x10_0000 + (page - 0x5010_0000) };
            v.sess
                .map(MapArgs { ioas: lazy, mem: ml, offset: off, length: 0x1000, iova: Some(page), perm: Perm::RW })
                .unwrap();
            v.sess.respond_fault(f.cookie, iommu_core::types::page_response::SUCCESS).unwrap();
            served += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(served, 2, "one page request for the source, one for the destination");
    let c = v.eng.wait(&v.kram, &mut v.q, slot, Duration::from_secs(10)).unwrap();
    assert_eq!(c.status, status::SUCCESS);
    assert_eq!(src_ram.read(0x10_0000, 8).unwrap(), b"paged in");
}

fn eventfd() -> std::fs::File {
    vfio_user_server::irq::eventfd().unwrap()
}

fn wait_count(f: &std::fs::File) -> u64 {
    vfio_user_server::irq::wait_eventfd(f, Duration::from_secs(5))
}

#[test]
fn interrupts_dirty_bitmap_reset_and_migration_to_another_server() {
    use vfio_user_server::proto::{self, irq_index};
    use vfio_user_server::worker::mig;
    let mut st = Stack::new("mig");
    let mut v = vm(&mut st, "src");
    // MSI-X: one vector per queue; queue 0 raises vector 0.
    let irq0 = eventfd();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    v.eng.client.set_irqs(irq_index::MSIX, trig, 0, 1, &[], &[irq0.as_fd()]).unwrap();
    v.q = v.eng.setup_queue(0, 64, KIOVA, 0, KIOVA + 0x10000, 0x10000, None, true).unwrap();
    // Dirty tracking on A: the copies' destinations, exactly. The range is
    // mapped so that it gets 4 KiB leaves (IOVA and memory are not 2 MiB
    // congruent); dirty state is kept per leaf.
    let z = 0x6000_0000u64;
    let args =
        MapArgs { ioas: v.ioas_a, mem: v.mem_a, offset: 0x1000, length: 0x20_0000, iova: Some(z), perm: Perm::RW };
    v.sess.map(args).unwrap();
    v.sess.set_dirty_tracking(v.ioas_a, true).unwrap();
    v.a.write(0x30_0000, &[7u8; 0x3000]).unwrap();
    let d =
        Descriptor { flags: flag::PASID | flag::INTERRUPT, ..copy(Some(5), DIOVA + 0x30_0000, z + 0x10_0000, 0x2000) };
    assert_eq!(v.eng.run(&v.kram, &mut v.q, d, Doorbell::Mmap).unwrap().status, status::SUCCESS);
    assert_eq!(wait_count(&irq0), 1);
    let d = copy(Some(5), DIOVA + 0x30_0000, z + 0x5800, 0x1000);
    assert_eq!(v.eng.run(&v.kram, &mut v.q, d, Doorbell::Mmap).unwrap().status, status::SUCCESS);
    let bm = v.sess.dirty_bitmap(v.ioas_a, z, 0x20_0000, 4096, false).unwrap();
    let dirty: Vec<u64> = (0..0x200u64).filter(|&p| bm[(p / 64) as usize] & (1 << (p % 64)) != 0).collect();
    assert_eq!(dirty, vec![0x5, 0x6, 0x100, 0x101]);
    let bm = v.sess.dirty_bitmap(v.ioas_a, z, 0x20_0000, 4096, false).unwrap();
    assert!(bm.iter().all(|&w| w == 0), "reading cleared the bits");

    // Migration: stop, save, start a second server, restore, continue.
    for i in 0..3u64 {
        let d = copy(Some(9), DIOVA, DIOVA + 0x1000 * (i + 1), 16);
        v.eng.push(&v.kram, &mut v.q, d).unwrap();
    }
    assert_eq!(v.eng.client.set_mig_state(mig::STOP_COPY).unwrap(), mig::STOP_COPY);
    let mut blob = Vec::new();
    loop {
        let c = v.eng.client.mig_data_read(1 << 16).unwrap();
        let end = c.len() < 1 << 16;
        blob.extend(c);
        if end {
            break;
        }
    }
    let head_before = v.eng.queue_reg(0, regs::Q_HEAD).unwrap();
    let dst_sock = st.server("dma-engine", "dst");
    let mut dst = Client::connect(&dst_sock).unwrap();
    let (_, chan) = v.sess.open_device_channel().unwrap();
    dst.ioasid_bind(chan.as_fd()).unwrap();
    dst.ioasid_attach(None, v.ioas_k, false).unwrap();
    dst.ioasid_attach(Some(5), v.ioas_a, false).unwrap();
    dst.ioasid_attach(Some(9), v.ioas_b, false).unwrap();
    assert_eq!(dst.set_mig_state(mig::RESUMING).unwrap(), mig::RESUMING);
    dst.mig_data_write(&blob).unwrap();
    assert_eq!(dst.set_mig_state(mig::RUNNING).unwrap(), mig::RUNNING);
    // The source is gone (as after a real migration).
    drop(v.eng);
    st.servers.remove(0);
    let mut eng2 = Engine::new(dst).unwrap();
    assert_eq!(eng2.queue_reg(0, regs::Q_HEAD).unwrap(), head_before);
    // The three descriptors queued before the stop run on the destination
    // once its doorbell is rung; new ones follow.
    v.b.write(0, b"after migration!").unwrap();
    eng2.ring(&v.q, Doorbell::Register).unwrap();
    let d = copy(Some(9), DIOVA, DIOVA + 0x8000, 16);
    let c = eng2.run(&v.kram, &mut v.q, d, Doorbell::Mmap).unwrap();
    assert_eq!(c.status, status::SUCCESS);
    assert_eq!(v.b.read(0x8000, 16).unwrap(), b"after migration!");
    for i in 1..=3u64 {
        assert_eq!(v.b.read(0x1000 * i, 16).unwrap(), b"after migration!");
    }
    // Reset empties the queues (and clears the command register: the
    // driver enables the function again).
    eng2.client.reset().unwrap();
    eng2.client.enable_function().unwrap();
    assert_eq!(eng2.queue_reg(0, regs::Q_CTRL).unwrap() & regs::Q_CTRL_ENABLE, 0);
    assert_eq!(eng2.queue_reg(0, regs::Q_HEAD).unwrap(), 0);
    assert_eq!(ioasid_stack::engine::read32(&mut eng2.client, regs::CTRL).unwrap(), 0);
}

#[test]
fn the_rust_vmm_client_drives_a_copy_through_the_compat_ioas() {
    use std::os::fd::AsRawFd;
    let mut st = Stack::new("rustvmm");
    let sock = st.server("dma-engine", "eng");
    let ram = GuestRam::new("ram", 1 << 20).unwrap();
    let mut c = vfio_user::Client::new(&sock).unwrap();
    c.dma_map(0, 0x8000_0000, 1 << 20, ram.file.as_raw_fd()).unwrap();
    let w = |c: &mut vfio_user::Client, off: u64, v: &[u8]| c.region_write(0, off, v).unwrap();
    let q0 = regs::QUEUE;
    // Memory space and bus mastering on, as a guest's driver does.
    c.region_write(vfio_user_server::proto::region::CONFIG, 4, &6u16.to_le_bytes()).unwrap();
    w(&mut c, regs::CTRL, &1u32.to_le_bytes());
    w(&mut c, q0 + regs::Q_RING_BASE, &0x8000_0000u64.to_le_bytes());
    w(&mut c, q0 + regs::Q_RING_SIZE, &16u32.to_le_bytes());
    w(&mut c, q0 + regs::Q_CTRL, &1u32.to_le_bytes());
    ram.write(0x1_0000, b"through compat").unwrap();
    let d = Descriptor { completion: 0x8000_f000, ..copy(None, 0x8001_0000, 0x8002_0000, 14) };
    ram.write(0, &d.to_bytes()).unwrap();
    w(&mut c, q0 + regs::Q_TAIL, &1u32.to_le_bytes());
    let t0 = std::time::Instant::now();
    while ram.read(0xf000, 1).unwrap()[0] == status::NONE {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(ram.read(0xf000, 1).unwrap()[0], status::SUCCESS);
    assert_eq!(ram.read(0x2_0000, 14).unwrap(), b"through compat");
    let mut b = [0u8; 4];
    c.region_read(0, q0 + regs::Q_HEAD, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 1);
}

#[test]
fn a_departed_client_cannot_ring_or_truncate_the_next_clients_doorbells() {
    let mut st = Stack::new("bells");
    let mut v = vm(&mut st, "eng");
    // The doorbell page cannot be truncated under the server's mapping.
    let r = v.eng.client.region_info(2).unwrap();
    let bar2 = std::fs::File::from(r.fd.unwrap());
    assert!(bar2.set_len(0).is_err(), "the doorbell memfd is sealed against shrinking");
    let old = memmap2::MmapOptions::new().len(4096).map_raw(&bar2).unwrap();
    let sock = st.dir.join("eng.sock");
    drop(v.eng);
    // The next client sets queue 0 up; the old mapping's stores are ignored.
    let t0 = std::time::Instant::now();
    let mut c = loop {
        match Client::connect(&sock) {
            Ok(c) => break c,
            Err(_) if t0.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    };
    let (_, chan) = v.sess.open_device_channel().unwrap();
    c.ioasid_bind(chan.as_fd()).unwrap();
    c.ioasid_attach(None, v.ioas_k, false).unwrap();
    let mut eng = Engine::new(c).unwrap();
    let mut q = eng.setup_queue(0, 64, KIOVA, 0, KIOVA + 0x10000, 0x10000, None, false).unwrap();
    for _ in 0..4 {
        eng.push(&v.kram, &mut q, copy(None, KIOVA + 0x8_0000, KIOVA + 0x9_0000, 8)).unwrap();
    }
    let head0 = eng.queue_reg(0, regs::Q_HEAD).unwrap();
    // SAFETY: the old mapping is 4 KiB; slot 0 is aligned; the test owns it.
    unsafe {
        (*(old.as_mut_ptr() as *const std::sync::atomic::AtomicU32))
            .store(head0 + 4, std::sync::atomic::Ordering::Release)
    };
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(eng.queue_reg(0, regs::Q_HEAD).unwrap(), head0, "the old client's doorbell ran the new client's ring");
    eng.ring(&q, Doorbell::Mmap).unwrap();
    let t0 = std::time::Instant::now();
    while eng.queue_reg(0, regs::Q_HEAD).unwrap() != head0 + 4 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn disabling_a_busy_queue_neither_loses_nor_repeats_work_and_intx_clears() {
    use vfio_user_server::proto::{self, irq_index};
    let mut st = Stack::new("busy");
    let mut v = vm(&mut st, "eng");
    for _ in 0..16 {
        v.eng.push(&v.kram, &mut v.q, copy(Some(5), DIOVA, DIOVA + 0x20_0000, 1 << 20)).unwrap();
    }
    v.eng.ring(&v.q, Doorbell::Mmap).unwrap();
    let base = regs::QUEUE + regs::Q_CTRL;
    ioasid_stack::engine::write32(&mut v.eng.client, base, 0).unwrap();
    ioasid_stack::engine::write32(&mut v.eng.client, base, regs::Q_CTRL_ENABLE).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let head = v.eng.queue_reg(0, regs::Q_HEAD).unwrap();
    let tail = v.eng.queue_reg(0, regs::Q_TAIL).unwrap();
    assert_eq!(head, tail, "re-enabling starts the ring empty at the doorbell");
    let done = v.eng.queue_reg(0, regs::Q_COMPLETED).unwrap();
    assert!(done <= 16, "the queue ran away: {done} completions");
    // A doorbell further ahead than the ring holds halts the queue.
    ioasid_stack::engine::write32(&mut v.eng.client, regs::QUEUE + regs::Q_TAIL, head.wrapping_add(65)).unwrap();
    let t0 = std::time::Instant::now();
    while v.eng.queue_reg(0, regs::Q_STATUS).unwrap() & 2 == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "not halted");
        std::thread::sleep(Duration::from_millis(2));
    }
    // INTx without MSI-X: the status bit and the eventfd, cleared by W1C.
    let intx = eventfd();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    v.eng.client.set_irqs(irq_index::INTX, trig, 0, 1, &[], &[intx.as_fd()]).unwrap();
    let mut q1 = v.eng.setup_queue(1, 16, KIOVA + 0x4000, 0x4000, KIOVA + 0x20000, 0x20000, None, true).unwrap();
    let d = Descriptor { flags: flag::INTERRUPT, ..copy(None, KIOVA + 0x8_0000, KIOVA + 0x9_0000, 8) };
    assert_eq!(v.eng.run(&v.kram, &mut q1, d, Doorbell::Mmap).unwrap().status, status::SUCCESS);
    assert_eq!(wait_count(&intx), 1);
    assert_eq!(ioasid_stack::engine::read32(&mut v.eng.client, regs::INTX_STATUS).unwrap(), 0b10);
    // A write to the upper bytes clears nothing.
    v.eng.client.region_write(0, regs::INTX_STATUS + 1, &[0xff]).unwrap();
    assert_eq!(ioasid_stack::engine::read32(&mut v.eng.client, regs::INTX_STATUS).unwrap(), 0b10);
    ioasid_stack::engine::write32(&mut v.eng.client, regs::INTX_STATUS, 0b10).unwrap();
    assert_eq!(ioasid_stack::engine::read32(&mut v.eng.client, regs::INTX_STATUS).unwrap(), 0);
}
