//! The translation unit against a real core over real sockets: device
//! channels, RID and PASID DMA, nested two-stage walks with stage-1
//! invalidation, page requests, dirty tracking, unbinding and fencing.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use iommu_core::client::Client;
use iommu_core::device::Channel;
use iommu_core::pagetable::{PTE_LEAF, PTE_PRESENT, PTE_READ, PTE_WRITE};
use iommu_core::server::Running;
use iommu_core::tu::{self, TranslationUnit};
use iommu_core::types::*;
use iommu_core::Errno;

struct Rig {
    _srv: Running,
    path: std::path::PathBuf,
    s: Client,
}

fn rig(name: &str, limits: Limits) -> Rig {
    let dir = std::env::temp_dir().join(format!("ioasid-tu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("core.sock");
    let srv = iommu_core::server::spawn(&path, Limits { table_pool_bytes: 64 << 20, ..limits }).unwrap();
    let s = Client::session(&path).unwrap();
    Rig { _srv: srv, path, s }
}

fn caps(pasid_width: u8, pri: bool, dirty: bool) -> DeviceCaps {
    DeviceCaps { pasid_width, pri, dirty_tracking: dirty }
}

fn device(r: &mut Rig, c: DeviceCaps) -> (Arc<TranslationUnit>, u32) {
    let (_, fd) = r.s.open_device_channel().unwrap();
    let ch = Arc::new(Channel::new(fd).unwrap());
    assert_eq!(ch.session(), r.s.session_id());
    let tu = TranslationUnit::new(ch, tu::Config::default()).unwrap();
    let b = tu.bind(BindArgs { name: "test-dev".into(), pci_address: "0000:00:04.0".into(), caps: c }).unwrap();
    (tu, b.dev_id)
}

fn fault_of(e: tu::Error) -> (u64, FaultReason) {
    match e {
        tu::Error::Fault { iova, reason, .. } => (iova, reason),
        other => panic!("expected a fault, got {other}"),
    }
}

#[test]
fn rid_dma_reads_and_writes_the_mapped_memory_and_faults_elsewhere() {
    let mut r = rig("rid", Limits::default());
    let (f, m) = common::memory(&mut r.s, 4 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0x1000, 0x3000, 0x10_0000, Perm::RW);
    common::map_at(&mut r.s, ioas, m, 0x8000, 0x1000, 0x20_0000, Perm::R);
    let (tu, dev) = device(&mut r, caps(0, false, false));
    tu.channel().attach(dev, None, ioas).unwrap();

    // A write spanning two pages lands at the right offsets.
    let data: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    tu.write(dev, 0, 0x10_0100, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 0x1100).unwrap();
    assert_eq!(back, data);
    let mut via_dma = vec![0u8; data.len()];
    tu.read(dev, 0, 0x10_0100, &mut via_dma).unwrap();
    assert_eq!(via_dma, data);
    assert_eq!(tu.translate(dev, 0, 0x10_0100, 6000, Perm::R).unwrap().len(), 1, "contiguous pages merge");

    // Unmapped, read-only and PASID-tagged accesses fault.
    assert_eq!(fault_of(tu.write(dev, 0, 0x30_0000, b"x").unwrap_err()), (0x30_0000, FaultReason::NotPresent));
    assert_eq!(fault_of(tu.write(dev, 0, 0x20_0010, b"x").unwrap_err()), (0x20_0010, FaultReason::Permission));
    let mut one = [0u8];
    tu.read(dev, 0, 0x20_0010, &mut one).unwrap();
    assert_eq!(fault_of(tu.read(dev, 7, 0x10_0000, &mut one).unwrap_err()).1, FaultReason::NoPasid);
    // Faults reach the session's queue and the global log.
    let faults = r.s.read_faults(16).unwrap();
    assert_eq!(faults.len(), 3);
    assert_eq!((faults[0].dev_id, faults[0].iova, faults[0].reason), (dev, 0x30_0000, FaultReason::NotPresent));
    assert_eq!(faults[1].reason, FaultReason::Permission);
    assert!(tu.iotlb_hits() > 0);

    // The core's view of the device.
    let st = r.s.status().unwrap();
    let d = &st.sessions[0].devices[0];
    assert_eq!((d.id, d.pci_address.as_str(), d.attachments.len()), (dev, "0000:00:04.0", 1));
    assert_eq!(st.sessions[0].ioas[0].attached, vec![(dev, 0)]);
    let text = iommu_core::script::render_status(&st);
    assert!(
        text.contains(&format!(
            "device {dev} 0000:00:04.0 test-dev: channel 1, PASID width 0, PRI no, dirty no; attached RID->{ioas}"
        )),
        "{text}"
    );
    // An attached IOAS cannot be destroyed.
    assert_eq!(r.s.destroy(ioas).unwrap_err().errno(), Some(Errno::EBUSY));
    assert_eq!(r.s.destroy(dev).unwrap_err().errno(), Some(Errno::EBUSY));
}

#[test]
fn iommufd_attach_rules_hold_on_the_device_channel() {
    let mut r = rig("rules", Limits::default());
    let a = r.s.ioas_alloc().unwrap();
    let b = r.s.ioas_alloc().unwrap();
    let (tu, dev) = device(&mut r, caps(20, false, false));
    let (_, plain) = {
        let b2 = tu.bind(BindArgs {
            name: "no-pasid".into(),
            pci_address: "0000:00:05.0".into(),
            caps: caps(0, false, false),
        });
        (0, b2.unwrap().dev_id)
    };
    let ch = tu.channel();
    ch.attach(dev, Some(5), a).unwrap();
    assert_eq!(ch.attach(dev, Some(5), b).unwrap_err().errno(), Some(Errno::EBUSY), "attach of an attached PASID");
    ch.replace(dev, Some(5), b).unwrap();
    assert_eq!(ch.replace(dev, Some(6), b).unwrap_err().errno(), Some(Errno::EINVAL), "replace of an unattached PASID");
    ch.detach(dev, Some(6)).unwrap();
    assert_eq!(ch.attach(plain, Some(5), a).unwrap_err().errno(), Some(Errno::EINVAL), "PASID on a non-PASID device");
    assert_eq!(ch.attach(dev, Some(1 << 20), a).unwrap_err().errno(), Some(Errno::EINVAL));
    assert_eq!(ch.attach(dev, Some(0), a).unwrap_err().errno(), Some(Errno::EINVAL));
    assert_eq!(ch.attach(dev, None, 999).unwrap_err().errno(), Some(Errno::ENOENT));
    assert_eq!(ch.attach(999, None, a).unwrap_err().errno(), Some(Errno::ENOENT));
    let p1 = ch.pasid_alloc(dev).unwrap();
    let p2 = ch.pasid_alloc(dev).unwrap();
    assert_ne!(p1, p2);
    assert_eq!(r.s.ppasid_free(p1).unwrap_err().errno(), Some(Errno::ENOENT), "the device owns it, not the session");
    let st = Client::observer(&r.path).unwrap().status().unwrap();
    assert_eq!(st.ppasids.len(), 2);
    // Unbinding frees everything of the device.
    tu.unbind(dev).unwrap();
    let st = Client::observer(&r.path).unwrap().status().unwrap();
    assert!(st.ppasids.is_empty());
    assert_eq!(st.sessions[0].devices.len(), 1);
    r.s.destroy(b).unwrap();
    // A session cannot speak for a channel.
    let e = r.s.call(&iommu_core::wire::Request::GetPools, &[]).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EPERM));
}

#[test]
fn two_pasids_in_two_address_spaces_never_cross() {
    let mut r = rig("pasids", Limits::default());
    let (fa, ma) = common::memory(&mut r.s, 1 << 20);
    let (fb, mb) = common::memory(&mut r.s, 1 << 20);
    let a = r.s.ioas_alloc().unwrap();
    let b = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, a, ma, 0, 1 << 20, 0x100_0000, Perm::RW);
    common::map_at(&mut r.s, b, mb, 0, 1 << 20, 0x100_0000, Perm::RW);
    let (tu, dev) = device(&mut r, caps(20, false, false));
    tu.channel().attach(dev, Some(0x11), a).unwrap();
    tu.channel().attach(dev, Some(0x22), b).unwrap();
    tu.write(dev, 0x11, 0x100_0040, b"to-A").unwrap();
    tu.write(dev, 0x22, 0x100_0040, b"to-B").unwrap();
    let mut x = [0u8; 4];
    fa.read_exact_at(&mut x, 0x40).unwrap();
    assert_eq!(&x, b"to-A");
    fb.read_exact_at(&mut x, 0x40).unwrap();
    assert_eq!(&x, b"to-B");
    // Replace moves PASID 0x11 to B; the IOTLB entry for A is dropped.
    tu.channel().replace(dev, Some(0x11), b).unwrap();
    tu.write(dev, 0x11, 0x100_0080, b"now").unwrap();
    let mut y = [0u8; 3];
    fb.read_exact_at(&mut y, 0x80).unwrap();
    assert_eq!(&y, b"now");
    fa.read_exact_at(&mut y, 0x80).unwrap();
    assert_eq!(y, [0; 3]);
    tu.channel().detach(dev, Some(0x11)).unwrap();
    assert_eq!(fault_of(tu.write(dev, 0x11, 0x100_0000, b"z").unwrap_err()).1, FaultReason::NoPasid);
}

fn put(f: &File, off: u64, v: u64) {
    f.write_all_at(&v.to_le_bytes(), off).unwrap();
}

#[test]
fn nested_two_stage_translation_follows_the_users_stage1_table_and_its_invalidation() {
    let mut r = rig("nested", Limits::default());
    let (guest, m) = common::memory(&mut r.s, 16 << 20);
    let parent = r.s.ioas_alloc().unwrap();
    // Guest physical = parent IOVA: RAM at 0, stage-2 read-write.
    common::map_at(&mut r.s, parent, m, 0, 16 << 20, 0, Perm::RW);
    // A stage-1 table the guest builds in its RAM: root 0x1000, L3 0x2000,
    // L2 0x3000, L1 0x4000, mapping stage-1 IOVA 0x4000_0000 -> GPA 0x10_0000
    // (rw) and 0x4000_1000 -> GPA 0x20_0000 (read only); 0x4060_0000 is a
    // 2 MiB leaf -> GPA 0x40_0000.
    put(&guest, 0x1000, 0x2000 | PTE_PRESENT);
    put(&guest, 0x2000 + 8, 0x3000 | PTE_PRESENT);
    put(&guest, 0x3000, 0x4000 | PTE_PRESENT);
    put(&guest, 0x4000, 0x10_0000 | PTE_PRESENT | PTE_READ | PTE_WRITE | PTE_LEAF);
    put(&guest, 0x4000 + 8, 0x20_0000 | PTE_PRESENT | PTE_READ | PTE_LEAF);
    put(&guest, 0x3000 + 3 * 8, 0x40_0000 | PTE_PRESENT | PTE_READ | PTE_WRITE | PTE_LEAF);
    let nested = r.s.nested_alloc(parent, 0x1000).unwrap();
    let (tu, dev) = device(&mut r, caps(20, false, false));
    tu.channel().attach(dev, Some(5), nested).unwrap();
    tu.channel().attach(dev, None, parent).unwrap();

    tu.write(dev, 5, 0x4000_0010, b"s1").unwrap();
    let mut b = [0u8; 2];
    guest.read_exact_at(&mut b, 0x10_0010).unwrap();
    assert_eq!(&b, b"s1");
    tu.write(dev, 5, 0x4061_2345, b"big").unwrap();
    let mut c = [0u8; 3];
    guest.read_exact_at(&mut c, 0x41_2345).unwrap();
    assert_eq!(&c, b"big");
    assert_eq!(fault_of(tu.write(dev, 5, 0x4000_1000, b"w").unwrap_err()).1, FaultReason::Permission);
    tu.read(dev, 5, 0x4000_1000, &mut b).unwrap();
    assert_eq!(fault_of(tu.read(dev, 5, 0x4000_2000, &mut b).unwrap_err()).1, FaultReason::NotPresent);
    // The RID sees guest physical addresses directly.
    tu.read(dev, 0, 0x10_0010, &mut b).unwrap();
    assert_eq!(&b, b"s1");

    // The guest repoints 0x4000_0000 at GPA 0x30_0000. Until it
    // invalidates, the device may keep using its cached translation, as
    // hardware does; after the invalidation it must use the new one.
    put(&guest, 0x4000, 0x30_0000 | PTE_PRESENT | PTE_READ | PTE_WRITE | PTE_LEAF);
    tu.write(dev, 5, 0x4000_0020, b"old").unwrap();
    guest.read_exact_at(&mut c, 0x10_0020).unwrap();
    assert_eq!(&c, b"old", "IOTLB hit before the invalidation");
    r.s.invalidate(nested, InvalidateScope::Range { iova: 0x4000_0000, length: 0x1000 }).unwrap();
    tu.write(dev, 5, 0x4000_0020, b"new").unwrap();
    guest.read_exact_at(&mut c, 0x30_0020).unwrap();
    assert_eq!(&c, b"new");
    // Clearing the guest's entry and invalidating everything makes it fault.
    put(&guest, 0x4000, 0);
    r.s.invalidate(nested, InvalidateScope::All).unwrap();
    assert_eq!(fault_of(tu.write(dev, 5, 0x4000_0000, b"x").unwrap_err()).1, FaultReason::NotPresent);
    // A stage-2 unmap under the stage-1 table faults the nested walk too.
    r.s.unmap(parent, 0, 16 << 20).unwrap();
    assert!(tu.read(dev, 5, 0x4061_0000, &mut b).is_err());
}

#[test]
fn page_requests_are_served_by_the_session() {
    let mut r = rig("pri", Limits::default());
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    r.s.set_page_faults(ioas, true).unwrap();
    let (tu, dev) = device(&mut r, caps(0, true, false));
    tu.channel().attach(dev, None, ioas).unwrap();
    let t = tu.clone();
    let dma = std::thread::spawn(move || t.write(dev, 0, 0x50_0010, b"on-demand"));
    // The session serves the page request by mapping, then answers SUCCESS.
    let t0 = Instant::now();
    let fault = loop {
        let f = r.s.read_faults(1).unwrap();
        if let Some(x) = f.into_iter().next() {
            break x;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no page request arrived");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(
        (fault.dev_id, fault.iova, fault.access, fault.reason),
        (dev, 0x50_0000, Perm::W, FaultReason::NotPresent)
    );
    assert_ne!(fault.cookie, 0);
    common::map_at(&mut r.s, ioas, m, 0x3000, 0x1000, 0x50_0000, Perm::RW);
    r.s.respond_fault(fault.cookie, page_response::SUCCESS).unwrap();
    dma.join().unwrap().unwrap();
    let mut b = [0u8; 9];
    f.read_exact_at(&mut b, 0x3010).unwrap();
    assert_eq!(&b, b"on-demand");

    // INVALID fails the DMA.
    let t = tu.clone();
    let dma = std::thread::spawn(move || t.write(dev, 0, 0x60_0000, b"no"));
    let t0 = Instant::now();
    let fault = loop {
        if let Some(x) = r.s.read_faults(1).unwrap().into_iter().next() {
            break x;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no page request arrived");
        std::thread::sleep(Duration::from_millis(2));
    };
    r.s.respond_fault(fault.cookie, page_response::INVALID).unwrap();
    assert_eq!(fault_of(dma.join().unwrap().unwrap_err()).0, 0x60_0000);
}

#[test]
fn dirty_bitmap_matches_exactly_the_pages_written() {
    let mut r = rig("dirty", Limits::default());
    let (_f, m) = common::memory(&mut r.s, 8 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 64 << 10, 0x10_0000, Perm::RW); // 4 KiB leaves
    common::map_at(&mut r.s, ioas, m, 2 << 20, 2 << 20, 0x40_0000, Perm::RW); // one 2 MiB leaf
    let (tu, dev) = device(&mut r, caps(0, false, true));
    tu.channel().attach(dev, None, ioas).unwrap();
    r.s.set_dirty_tracking(ioas, true).unwrap();
    for page in [0u64, 3, 4, 15] {
        tu.write(dev, 0, 0x10_0000 + page * 4096 + 7, b"d").unwrap();
    }
    // Reads do not dirty.
    let mut b = [0u8; 1];
    tu.read(dev, 0, 0x10_0000 + 5 * 4096, &mut b).unwrap();
    let bm = r.s.dirty_bitmap(ioas, 0x10_0000, 64 << 10, 4096, true).unwrap();
    assert_eq!(bm, vec![(1 << 0) | (1 << 3) | (1 << 4) | (1 << 15)]);
    // 16 KiB granularity: pages 0, 3 -> granules 0; 4 -> 1; 15 -> 3.
    let bm = r.s.dirty_bitmap(ioas, 0x10_0000, 64 << 10, 16 << 10, true).unwrap();
    assert_eq!(bm, vec![0b1011]);
    // Read and clear, then nothing is dirty.
    assert_eq!(r.s.dirty_bitmap(ioas, 0x10_0000, 64 << 10, 4096, false).unwrap()[0].count_ones(), 4);
    assert_eq!(r.s.dirty_bitmap(ioas, 0x10_0000, 64 << 10, 4096, false).unwrap(), vec![0]);
    // A write through the 2 MiB leaf dirties the whole leaf (hardware granularity).
    tu.write(dev, 0, 0x40_1000, b"D").unwrap();
    let bm = r.s.dirty_bitmap(ioas, 0x40_0000, 2 << 20, 2 << 20, false).unwrap();
    assert_eq!(bm, vec![1]);
    // Tracking cannot be enabled with a device that cannot track.
    let (_, fd) = r.s.open_device_channel().unwrap();
    let ch = Arc::new(Channel::new(fd).unwrap());
    let b2 = ch
        .bind(BindArgs { name: "x".into(), pci_address: "0000:00:06.0".into(), caps: caps(0, false, false) })
        .unwrap();
    assert_eq!(ch.attach(b2.dev_id, None, ioas).unwrap_err().errno(), Some(Errno::EINVAL));
    r.s.set_dirty_tracking(ioas, false).unwrap();
    ch.attach(b2.dev_id, None, ioas).unwrap();
    assert_eq!(r.s.set_dirty_tracking(ioas, true).unwrap_err().errno(), Some(Errno::EOPNOTSUPP));
}

#[test]
fn unmap_waits_for_dma_in_flight_and_no_write_lands_after_it() {
    let mut r = rig("handshake", Limits::default());
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    let (tu, dev) = device(&mut r, caps(0, false, false));
    tu.channel().attach(dev, None, ioas).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (t, st) = (tu.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        let mut ok = 0u64;
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let v = [0xAAu8; 4096];
            if t.write(dev, 0, 0x10_0000, &v).is_ok() {
                ok += 1;
            }
        }
        (n, ok)
    });
    let sentinel = [0x55u8; 4096];
    let mut buf = [0u8; 4096];
    for i in 0..300u64 {
        let off = (i % 16) * 4096;
        common::map_at(&mut r.s, ioas, m, off, 4096, 0x10_0000, Perm::RW);
        std::thread::sleep(Duration::from_micros(200));
        r.s.unmap(ioas, 0x10_0000, 4096).unwrap();
        // The memory is ours again: reuse it and check nobody writes it.
        f.write_all_at(&sentinel, off).unwrap();
        std::thread::sleep(Duration::from_micros(100));
        f.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(buf, sentinel, "a DMA write landed after unmap returned (iteration {i})");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, ok) = writer.join().unwrap();
    assert!(ok > 0 && ok < n, "the device both succeeded and faulted ({ok} of {n})");
    for i in 0..16 {
        f.read_exact_at(&mut buf, i * 4096).unwrap();
        assert_eq!(buf, sentinel);
    }
}

#[test]
fn a_device_server_that_does_not_answer_is_fenced() {
    struct Stuck;
    impl iommu_core::device::InvalidationHandler for Stuck {
        fn invalidate(&self, _: &[InvalidateTarget], _: &[u64]) {
            std::thread::sleep(Duration::from_millis(1500));
        }
    }
    let mut r = rig("fence", Limits { invalidate_timeout_ms: 200, ..Limits::default() });
    let (_f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x1000, Perm::RW);
    let (_, fd) = r.s.open_device_channel().unwrap();
    let ch = Arc::new(Channel::new(fd).unwrap());
    let b = ch
        .bind(BindArgs { name: "stuck".into(), pci_address: "0000:00:07.0".into(), caps: caps(0, false, false) })
        .unwrap();
    ch.attach(b.dev_id, None, ioas).unwrap();
    ch.set_handler(Arc::new(Stuck));
    let t0 = Instant::now();
    assert_eq!(r.s.unmap(ioas, 0x1000, 0x1000).unwrap(), 0x1000);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(150), "the unmap waited for the timeout ({waited:?})");
    let st = r.s.status().unwrap();
    assert!(st.sessions[0].devices[0].fenced);
    assert!(st.faults.iter().any(|f| f.record.reason == FaultReason::Fenced && f.record.dev_id == b.dev_id));
}

#[test]
fn closing_a_channel_unbinds_its_devices_and_others_keep_working() {
    let mut r = rig("close", Limits::default());
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 1 << 20, 0x10_0000, Perm::RW);
    let (tu1, d1) = device(&mut r, caps(20, false, false));
    let (tu2, d2) = device(&mut r, caps(20, false, false));
    tu1.channel().attach(d1, None, ioas).unwrap();
    tu1.channel().pasid_alloc(d1).unwrap();
    tu2.channel().attach(d2, Some(9), ioas).unwrap();
    drop(tu1);
    let t0 = Instant::now();
    loop {
        let st = r.s.status().unwrap();
        if st.sessions[0].devices.len() == 1 {
            assert!(st.ppasids.is_empty());
            assert_eq!(st.sessions[0].ioas[0].attached, vec![(d2, 9)]);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "device of the closed channel still bound");
        std::thread::sleep(Duration::from_millis(5));
    }
    tu2.write(d2, 9, 0x10_0000, b"still").unwrap();
    let mut b = [0u8; 5];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"still");
    // Session close: channels and devices go with it.
    drop(r.s);
    let t0 = Instant::now();
    while !tu2.channel().is_closed() {
        assert!(t0.elapsed() < Duration::from_secs(10), "channel not closed with its session");
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = Client::observer(&r.path).unwrap().status().unwrap();
    assert!(st.sessions.is_empty());
    assert_eq!(st.pool.tables_in_use, 0);
}

#[test]
fn the_table_pool_fd_a_channel_gets_cannot_be_mapped_writable() {
    let mut r = rig("ro-pool", Limits::default());
    let (_, fd) = r.s.open_device_channel().unwrap();
    let ch = Channel::new(fd).unwrap();
    let (pool, size, _dirty, _) = ch.pools().unwrap();
    let f = File::from(pool);
    assert!(memmap2::MmapOptions::new().len(size as usize).map_raw(&f).is_err(), "writable mapping refused");
    assert!(memmap2::MmapOptions::new().len(size as usize).map_raw_read_only(&f).is_ok());
    assert!(f.write_all_at(&[1], 0).is_err(), "write refused");
}

#[test]
fn a_failed_attach_leaves_no_page_linked_and_others_unharmed() {
    // A pool small enough to run dry: 8 tables.
    let mut r = rig("attach-oom", Limits { table_pool_bytes: 9 * 4096, ..Limits::default() });
    let (tu, dev) = device(&mut r, caps(20, false, false)); // PASID root: 1 table
    let mut ioases = Vec::new();
    while let Ok(i) = r.s.ioas_alloc() {
        ioases.push(i);
    }
    r.s.destroy(ioases.pop().unwrap()).unwrap(); // exactly one table free
    let a = ioases[0];
    // Needs two directory pages: the first is linked, the second fails.
    assert_eq!(tu.channel().attach(dev, Some(0x12345), a).unwrap_err().errno(), Some(Errno::ENOMEM));
    let st = r.s.status().unwrap();
    assert_eq!(st.pool.tables_in_use, st.pool.capacity - 1, "the page came back");
    // The freed page is reused by another IOAS and the device cannot reach it.
    let b = r.s.ioas_alloc().unwrap();
    assert_eq!(fault_of(tu.write(dev, 0x12345, 0, b"x").unwrap_err()).1, FaultReason::NoPasid);
    tu.unbind(dev).unwrap();
    r.s.destroy(b).unwrap();
    let st = r.s.status().unwrap();
    assert_eq!(st.pool.tables_in_use as usize, ioases.len());
}

#[test]
fn map_with_an_offset_that_wraps_is_refused() {
    let mut r = rig("wrap", Limits::default());
    let (_f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    let args =
        MapArgs { ioas, mem: m, offset: 0u64.wrapping_sub(0x1000), length: 0x1000, iova: Some(0x1000), perm: Perm::RW };
    assert_eq!(r.s.map(args).unwrap_err().errno(), Some(Errno::EINVAL));
}

#[test]
fn device_pasids_count_against_the_session_cap() {
    let mut r = rig("pasid-cap", Limits { max_ppasids_per_session: 3, ..Limits::default() });
    let (tu, dev) = device(&mut r, caps(20, false, false));
    r.s.ppasid_alloc().unwrap();
    tu.channel().pasid_alloc(dev).unwrap();
    tu.channel().pasid_alloc(dev).unwrap();
    assert_eq!(tu.channel().pasid_alloc(dev).unwrap_err().errno(), Some(Errno::ENOSPC));
    assert_eq!(r.s.ppasid_alloc().unwrap_err().errno(), Some(Errno::ENOSPC));
}

#[test]
fn channels_per_session_are_capped() {
    let mut r = rig("chan-cap", Limits { max_channels_per_session: 2, ..Limits::default() });
    let _a = r.s.open_device_channel().unwrap();
    let _b = r.s.open_device_channel().unwrap();
    assert_eq!(r.s.open_device_channel().unwrap_err().errno(), Some(Errno::ENOSPC));
}

#[test]
fn devices_bound_per_session_are_capped() {
    let mut r = rig("dev-cap", Limits { max_devices_per_session: 2, ..Limits::default() });
    let (_, fd) = r.s.open_device_channel().unwrap();
    let ch = Channel::new(fd).unwrap();
    let args =
        |name: &str| BindArgs { name: name.into(), pci_address: "0000:00:05.0".into(), caps: caps(0, false, false) };
    let first = ch.bind(args("first")).unwrap().dev_id;
    ch.bind(args("second")).unwrap();
    assert_eq!(ch.bind(args("third")).unwrap_err().errno(), Some(Errno::ENOSPC));
    // The cap counts bound devices, not attempts: an unbind frees a place.
    ch.unbind(first).unwrap();
    ch.bind(args("third")).unwrap();
    assert_eq!(ch.bind(args("fourth")).unwrap_err().errno(), Some(Errno::ENOSPC));
}

/// Two-stage reference: random stage-1 tables built in guest memory, a
/// stage 2 with read-write, read-only and unmapped guest ranges, and the
/// translation unit checked against the composition for every mapped page
/// and for holes, round after round with a stage-1 invalidate between.
#[test]
fn nested_translation_matches_a_two_stage_reference_model() {
    use std::collections::BTreeMap;
    const MIB: u64 = 1 << 20;
    let mut r = rig("nested-model", Limits::default());
    let (guest, m) = common::memory(&mut r.s, 8 * MIB);
    let parent = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, parent, m, 0, 4 * MIB, 0, Perm::RW);
    common::map_at(&mut r.s, parent, m, 4 * MIB, 2 * MIB, 4 * MIB, Perm::R);
    // [6, 8) MiB of guest memory is not mapped at stage 2.
    let s2 = |gpa: u64| -> Option<Perm> {
        match gpa {
            g if g < 4 * MIB => Some(Perm::RW),
            g if g < 6 * MIB => Some(Perm::R),
            _ => None,
        }
    };
    let nested = r.s.nested_alloc(parent, 0x1000).unwrap();
    let (tu, dev) = device(&mut r, caps(20, false, false));
    tu.channel().attach(dev, Some(3), nested).unwrap();

    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let leaf_bits = PTE_PRESENT | PTE_LEAF;
    let mut checked = 0u32;
    for round in 0..60u64 {
        // Fresh stage-1 tables in guest memory [0x1000, 0x80000).
        guest.write_all_at(&vec![0u8; 0x7f000], 0x1000).unwrap();
        let mut next_table = 0x2000u64;
        let table_for = |parent_table: u64, index: u64, next: &mut u64| -> u64 {
            let mut b = [0u8; 8];
            guest.read_exact_at(&mut b, parent_table + index * 8).unwrap();
            let e = u64::from_le_bytes(b);
            if e & PTE_PRESENT != 0 {
                return e & 0x000f_ffff_ffff_f000;
            }
            let t = *next;
            *next += 0x1000;
            put(&guest, parent_table + index * 8, t | PTE_PRESENT);
            t
        };
        // reference: stage-1 leaf base -> (gpa base, perm, size)
        let mut reference: BTreeMap<u64, (u64, Perm, u64)> = BTreeMap::new();
        for _ in 0..12 {
            let perm = if rnd(3) == 0 { Perm::R } else { Perm::RW };
            let bits = leaf_bits | PTE_READ | if perm.write { PTE_WRITE } else { 0 };
            if rnd(4) == 0 {
                // A 2 MiB stage-1 leaf at 0x8000_0000 + k * 2 MiB.
                let iova = 0x8000_0000 + rnd(4) * 2 * MIB;
                let gpa = (1 + rnd(3)) * 2 * MIB;
                let l3 = table_for(0x1000, iova >> 39, &mut next_table);
                let l2 = table_for(l3, (iova >> 30) & 511, &mut next_table);
                put(&guest, l2 + ((iova >> 21) & 511) * 8, gpa | bits);
                reference.insert(iova, (gpa, perm, 2 * MIB));
            } else {
                let iova = 0x4000_0000 + rnd(64) * 0x1000;
                let gpa = MIB + rnd(7 * 256) * 0x1000;
                let l3 = table_for(0x1000, iova >> 39, &mut next_table);
                let l2 = table_for(l3, (iova >> 30) & 511, &mut next_table);
                let l1 = table_for(l2, (iova >> 21) & 511, &mut next_table);
                put(&guest, l1 + ((iova >> 12) & 511) * 8, gpa | bits);
                reference.insert(iova, (gpa, perm, 0x1000));
            }
        }
        r.s.invalidate(nested, InvalidateScope::All).unwrap();
        let mut probes: Vec<u64> = reference.iter().map(|(i, (_, _, size))| i + rnd(*size / 8) * 8).collect();
        probes.extend((0..8).map(|_| 0x4000_0000 + rnd(80) * 0x1000 + 8));
        for iova in probes {
            let expect = reference
                .range(..=iova)
                .next_back()
                .filter(|(base, (_, _, size))| iova < *base + size)
                .map(|(base, (gpa, perm, _))| (gpa + (iova - base), *perm));
            let stamp = (round << 48 | iova).to_le_bytes();
            let got = tu.write(dev, 3, iova, &stamp);
            match expect {
                None => assert_eq!(fault_of(got.unwrap_err()).1, FaultReason::NotPresent, "hole {iova:#x}"),
                Some((gpa, s1)) => match s2(gpa) {
                    None => assert_eq!(fault_of(got.unwrap_err()).1, FaultReason::NotPresent, "{iova:#x}"),
                    Some(p2) if s1.write && p2.write => {
                        got.unwrap();
                        let mut b = [0u8; 8];
                        guest.read_exact_at(&mut b, gpa).unwrap();
                        assert_eq!(b, stamp, "write through {iova:#x} landed at GPA {gpa:#x}");
                        let mut back = [0u8; 8];
                        tu.read(dev, 3, iova, &mut back).unwrap();
                        assert_eq!(back, stamp);
                    }
                    Some(_) => {
                        assert_eq!(fault_of(got.unwrap_err()).1, FaultReason::Permission, "{iova:#x}");
                        let mut b = [0u8; 8];
                        tu.read(dev, 3, iova, &mut b).unwrap();
                    }
                },
            }
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked} probes");
}

#[test]
fn a_channel_cannot_touch_another_sessions_dirty_bits() {
    let mut a = rig("dirty-iso", Limits::default());
    let (_f, m) = common::memory(&mut a.s, 1 << 20);
    let ioas = a.s.ioas_alloc().unwrap();
    common::map_at(&mut a.s, ioas, m, 0, 64 << 10, 0x10_0000, Perm::RW);
    let (tu, dev) = device(&mut a, caps(0, false, true));
    tu.channel().attach(dev, None, ioas).unwrap();
    a.s.set_dirty_tracking(ioas, true).unwrap();
    tu.write(dev, 0, 0x10_2000, b"a").unwrap();
    // Another session's channel gets a dirty pool of its own: filling it
    // with ones changes nothing for the first session.
    let mut b = Client::session(&a.path).unwrap();
    let (_, fd) = b.open_device_channel().unwrap();
    let ch = Channel::new(fd).unwrap();
    let (_pool, _, dirty, size) = ch.pools().unwrap();
    let f = File::from(dirty);
    f.write_all_at(&vec![0xffu8; size as usize], 0).unwrap();
    assert_eq!(a.s.dirty_bitmap(ioas, 0x10_0000, 64 << 10, 4096, false).unwrap(), vec![1 << 2]);
}

#[test]
fn an_unanswered_page_request_times_out_and_fault_reports_are_rate_limited() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut r = rig("pri-timeout", Limits::default());
    let ioas = r.s.ioas_alloc().unwrap();
    r.s.set_page_faults(ioas, true).unwrap();
    let (_, fd) = r.s.open_device_channel().unwrap();
    let cfg = tu::Config {
        page_request_timeout: Duration::from_millis(200),
        fault_reports_per_sec: 2,
        ..tu::Config::default()
    };
    let tu = TranslationUnit::new(Arc::new(Channel::new(fd).unwrap()), cfg).unwrap();
    let pri = tu.bind(BindArgs { name: "pri".into(), pci_address: "0000:00:0a.0".into(), caps: caps(0, true, false) });
    let pri = pri.unwrap().dev_id;
    tu.channel().attach(pri, None, ioas).unwrap();
    let t0 = Instant::now();
    assert_eq!(fault_of(tu.write(pri, 0, 0x7000, b"x").unwrap_err()).0, 0x7000);
    assert!(t0.elapsed() >= Duration::from_millis(200), "waited for the answer until the timeout");
    assert_eq!(tu.stats().page_requests.load(Relaxed), 1);
    // A device without PRI reports faults, at most 2 per second.
    let plain =
        tu.bind(BindArgs { name: "plain".into(), pci_address: "0000:00:0b.0".into(), caps: caps(0, false, false) });
    let plain = plain.unwrap().dev_id;
    tu.channel().attach(plain, None, ioas).unwrap();
    r.s.read_faults(100).unwrap();
    for i in 0..10u64 {
        assert!(tu.write(plain, 0, 0x10_0000 + i * 4096, b"y").is_err());
    }
    assert_eq!(r.s.read_faults(100).unwrap().len(), 2);
    assert_eq!(tu.stats().faults_suppressed.load(Relaxed), 8);
}

/// Driver-state queries: relayed to the device's channel, answered by its
/// provider; a server that never answers gets ETIMEDOUT; a closed channel
/// gives ENOENT; nothing hangs.
#[test]
fn driver_state_is_relayed_and_bounded() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    struct Fixed;
    impl iommu_core::device::DriverStateProvider for Fixed {
        fn driver_state(&self, dev: u32) -> DriverState {
            DriverState {
                server: format!("fixed {dev}"),
                vpasids: vec![VpasidEntry { vpasid: 7, ppasid: 0x21, pt_id: 3 }],
                lines: vec![],
            }
        }
    }
    let mut r = rig("driver-state", Limits::default());
    let (tu, dev) = device(&mut r, caps(20, false, false));
    let sid = r.s.session_id();
    let mut obs = Client::observer(&r.path).unwrap();
    // Without a provider: an empty answer that says so.
    let st = obs.driver_state(sid, dev).unwrap();
    assert!(st.vpasids.is_empty() && st.server.contains("without driver state"));
    tu.channel().set_driver_state_provider(Arc::new(Fixed));
    let st = obs.driver_state(sid, dev).unwrap();
    assert_eq!(st.server, format!("fixed {dev}"));
    assert_eq!(st.vpasids, vec![VpasidEntry { vpasid: 7, ppasid: 0x21, pt_id: 3 }]);
    // The session itself may ask; a device id that does not exist is ENOENT.
    assert_eq!(r.s.driver_state(sid, dev).unwrap().vpasids.len(), 1);
    assert_eq!(obs.driver_state(sid, dev + 100).unwrap_err().errno(), Some(Errno::ENOENT));

    // A raw channel that binds a device and then never answers.
    let (_, fd) = r.s.open_device_channel().unwrap();
    let mut raw = UnixStream::from(fd);
    let send = |s: &mut UnixStream, seq: u64, req: &iommu_core::wire::Request| {
        s.write_all(&iommu_core::wire::encode(seq, req, 0).unwrap()).unwrap();
    };
    let mut reader = iommu_core::wire::FrameReader::new(1 << 20, 4);
    let mut recv = |s: &mut UnixStream| -> iommu_core::wire::FromCore {
        loop {
            if let Some(f) = reader.next_frame().unwrap() {
                return iommu_core::wire::decode::<iommu_core::wire::FromCore>(&f.payload).unwrap().body;
            }
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).unwrap();
            assert!(n > 0);
            reader.push(&b[..n], Vec::new());
        }
    };
    let hello = iommu_core::wire::Request::Hello {
        magic: iommu_core::wire::MAGIC,
        major: iommu_core::wire::VERSION_MAJOR,
        minor: iommu_core::wire::VERSION_MINOR,
        role: iommu_core::wire::Role::DeviceChannel,
    };
    send(&mut raw, 1, &hello);
    recv(&mut raw);
    let bind = BindArgs { name: "mute".into(), pci_address: "0000:00:05.0".into(), caps: caps(0, false, false) };
    send(&mut raw, 2, &iommu_core::wire::Request::BindDevice(bind));
    let iommu_core::wire::FromCore::Reply(iommu_core::wire::Reply::Device(b)) = recv(&mut raw) else {
        panic!("bind failed")
    };
    let t0 = Instant::now();
    assert_eq!(obs.driver_state(sid, b.dev_id).unwrap_err().errno(), Some(Errno::ETIMEDOUT));
    assert!(t0.elapsed() >= Duration::from_secs(1));
    // The query did arrive; an answer for someone else's id is ignored.
    assert!(matches!(recv(&mut raw), iommu_core::wire::FromCore::Notice(iommu_core::wire::Notice::DriverQuery { .. })));
    send(&mut raw, 0, &iommu_core::wire::Request::DriverStateDone { id: 9999, state: DriverState::default() });
    // Closing the channel while a query waits ends it with ENOENT.
    let path = r.path.clone();
    let h = std::thread::spawn(move || {
        let mut o = Client::observer(&path).unwrap();
        o.driver_state(sid, b.dev_id).unwrap_err().errno()
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(raw);
    assert_eq!(h.join().unwrap(), Some(Errno::ENOENT));
    // The core still serves.
    assert_eq!(obs.driver_state(sid, dev).unwrap().vpasids.len(), 1);
}

/// Page-table dumps: what an observer sees of an IOAS's tables, capped;
/// a session may ask only about its own IOASes.
#[test]
fn page_table_dumps_are_exact_and_bounded() {
    let mut r = rig("pt-dump", Limits::default());
    let (_f, m) = common::memory(&mut r.s, 64 << 20);
    let a = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, a, m, 0, 2 << 20, 0x4000_0000, Perm::RW);
    common::map_at(&mut r.s, a, m, 2 << 20, 0x2000, 0x1000, Perm::R);
    let sid = r.s.session_id();
    let mut obs = Client::observer(&r.path).unwrap();
    let lines = obs.page_table(sid, a).unwrap();
    let leaves: Vec<&String> = lines.iter().filter(|l| !l.contains("-> table")).collect();
    assert_eq!(leaves.len(), 3, "{lines:#?}");
    assert!(leaves.iter().any(|l| l.starts_with("L2 ") && l.contains("0x40000000-0x401fffff") && l.ends_with("rw 2M")));
    assert_eq!(leaves.iter().filter(|l| l.starts_with("L1 ") && l.ends_with("r 4K")).count(), 2);
    // Another session may not look; an observer may; unknown ids are ENOENT.
    let mut other = Client::session(&r.path).unwrap();
    assert_eq!(other.page_table(sid, a).unwrap_err().errno(), Some(Errno::ENOENT));
    assert_eq!(obs.page_table(sid, 999).unwrap_err().errno(), Some(Errno::ENOENT));
    // 10,000 4 KiB leaves: the dump stops at 8192 lines and says so.
    let b = r.s.ioas_alloc().unwrap();
    for i in 0..10_000u64 {
        common::map_at(&mut r.s, b, m, 0, 0x1000, 0x1000_0000 + i * 0x2000, Perm::RW);
    }
    let lines = obs.page_table(sid, b).unwrap();
    assert_eq!(lines.len(), 8193);
    assert!(lines[8192].starts_with("... ") && lines[8192].ends_with(" more entries left out"), "{}", lines[8192]);
}

/// The state generation moves with changes, not with reads.
#[test]
fn the_state_generation_moves_only_with_changes() {
    let mut r = rig("generation", Limits::default());
    let mut obs = Client::observer(&r.path).unwrap();
    let g0 = obs.generation().unwrap();
    obs.status().unwrap();
    obs.page_table(r.s.session_id(), 999).unwrap_err();
    assert_eq!(obs.generation().unwrap(), g0, "reads changed it");
    let a = r.s.ioas_alloc().unwrap();
    let g1 = obs.generation().unwrap();
    assert!(g1 > g0);
    // A refused change may still have changed counters: it moves too.
    r.s.destroy(a).unwrap();
    assert!(obs.generation().unwrap() > g1);
    let g2 = obs.generation().unwrap();
    drop(Client::session(&r.path).unwrap());
    std::thread::sleep(Duration::from_millis(50));
    assert!(obs.generation().unwrap() > g2, "a session that came and went");
}

fn temp_file(name: &str, size: u64) -> (std::path::PathBuf, File) {
    let path = std::env::temp_dir().join(format!("ioasid-tu-file-{}-{name}", std::process::id()));
    let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    f.set_len(size).unwrap();
    (path, f)
}

/// A regular file cannot be sealed: its owner may shrink it under a
/// mapping. DMA past the new end is a translation fault with a record in
/// the session's queue, reads and writes alike, and nothing grows the file.
#[test]
fn dma_past_the_end_of_a_shrunk_file_faults_and_never_grows_it() {
    let mut r = rig("shrunk-file", Limits::default());
    let (path, f) = temp_file("shrunk", 0x4000);
    let m = r.s.register_memory(&f).unwrap();
    assert!(!m.sealed);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m.id, 0, 0x4000, 0x10_0000, Perm::RW);
    let (tu, dev) = device(&mut r, caps(0, false, false));
    tu.channel().attach(dev, None, ioas).unwrap();
    tu.write(dev, 0, 0x10_3000, b"before").unwrap();

    f.set_len(0x1000).unwrap();
    tu.write(dev, 0, 0x10_0000, b"still here").unwrap();
    assert_eq!(fault_of(tu.write(dev, 0, 0x10_2010, b"beyond").unwrap_err()), (0x10_2010, FaultReason::NotPresent));
    assert_eq!(f.metadata().unwrap().len(), 0x1000, "a DMA write grew the file");
    let mut buf = [0u8; 6];
    assert_eq!(fault_of(tu.read(dev, 0, 0x10_3000, &mut buf).unwrap_err()), (0x10_3000, FaultReason::NotPresent));
    // A copy that starts inside the file and runs past its end faults too.
    let mut two = vec![0u8; 0x1800];
    assert!(matches!(tu.read(dev, 0, 0x10_0800, &mut two), Err(tu::Error::Fault { .. })));
    assert_eq!(f.metadata().unwrap().len(), 0x1000);
    let faults = r.s.read_faults(16).unwrap();
    let at: Vec<(u64, FaultReason)> = faults.iter().map(|x| (x.iova, x.reason)).collect();
    assert!(at.contains(&(0x10_2010, FaultReason::NotPresent)), "{at:x?}");
    assert!(at.contains(&(0x10_3000, FaultReason::NotPresent)), "{at:x?}");
    let mut head = [0u8; 10];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"still here");

    // Grown back, the pages are reachable again.
    f.set_len(0x4000).unwrap();
    tu.write(dev, 0, 0x10_3000, b"after").unwrap();
    tu.read(dev, 0, 0x10_3000, &mut buf[..5]).unwrap();
    assert_eq!(&buf[..5], b"after");
    std::fs::remove_file(path).unwrap();
}

/// The core seals a memfd before it reads its size: a client that flips
/// the size while registering never gets an object recorded larger than
/// its file, and DMA over the whole recorded size never raises SIGBUS.
#[test]
fn a_memfd_resized_during_registration_is_never_recorded_larger_than_it_is() {
    use std::sync::atomic::AtomicBool;
    let mut r = rig("size-race", Limits::default());
    let (tu, dev) = device(&mut r, caps(0, false, false));
    let ioas = r.s.ioas_alloc().unwrap();
    tu.channel().attach(dev, None, ioas).unwrap();
    for round in 0..300 {
        let f = Arc::new(iommu_core::memfd::create("flip", 2 << 20).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || {
                let sealed = |f: &File| {
                    iommu_core::memfd::seals(std::os::fd::AsFd::as_fd(f))
                        .is_some_and(|s| s.contains(nix::fcntl::SealFlag::F_SEAL_SHRINK))
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = f.set_len(4096);
                    // Once sealed, leave the file as it is: growing it back
                    // would hide an object recorded larger than its file.
                    if sealed(&f) {
                        break;
                    }
                    let _ = f.set_len(2 << 20);
                }
            })
        };
        let m = r.s.register_memory(&*f);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper.join().unwrap();
        let Ok(m) = m else { continue };
        let len = f.metadata().unwrap().len();
        assert!(m.size <= len, "round {round}: object of {:#x} bytes over a file of {len:#x}", m.size);
        assert!(m.sealed);
        common::map_at(&mut r.s, ioas, m.id, 0, m.size, 0x100_0000, Perm::RW);
        // The last page of the recorded size.
        tu.write(dev, 0, 0x100_0000 + m.size - 8, &[0xa5; 8]).unwrap();
        r.s.unmap(ioas, 0x100_0000, m.size).unwrap();
        r.s.destroy(m.id).unwrap();
    }
}

/// Write permission is granted only on memory the session can write: a
/// read-only fd and a write-sealed memfd map read-only, and a writable
/// mapping of them is EACCES at map time.
#[test]
fn writable_mappings_of_memory_the_session_cannot_write_are_refused() {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use std::os::fd::AsRawFd;
    let mut r = rig("ro-memory", Limits::default());
    let ioas = r.s.ioas_alloc().unwrap();
    let (path, f) = temp_file("ro", 0x2000);
    let ro = File::open(&path).unwrap();
    let sealed_write = iommu_core::memfd::create("sealed-write", 0x2000).unwrap();
    fcntl(sealed_write.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).unwrap();
    let sealed_future = iommu_core::memfd::create("sealed-future", 0x2000).unwrap();
    fcntl(sealed_future.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE)).unwrap();
    for (i, file) in [&ro, &sealed_write, &sealed_future].into_iter().enumerate() {
        let m = r.s.register_memory(file).unwrap();
        let iova = 0x100_0000 * (i as u64 + 1);
        let args = |perm| MapArgs { ioas, mem: m.id, offset: 0, length: 0x2000, iova: Some(iova), perm };
        assert_eq!(r.s.map(args(Perm::RW)).unwrap_err().errno(), Some(Errno::EACCES), "file {i}");
        assert_eq!(r.s.map(args(Perm::W)).unwrap_err().errno(), Some(Errno::EACCES), "file {i}");
        r.s.map(args(Perm::R)).unwrap();
    }
    // The same file through a read-write fd maps writable.
    let m = r.s.register_memory(&f).unwrap();
    r.s.map(MapArgs { ioas, mem: m.id, offset: 0, length: 0x2000, iova: Some(0x800_0000), perm: Perm::RW }).unwrap();
    std::fs::remove_file(path).unwrap();
}

/// A session that ends takes its device channels with it: whatever the
/// translation unit had cached or mapped through the channel is void, so a
/// DMA that hit the IOTLB a moment before fails once the channel is gone.
#[test]
fn a_closed_channel_leaves_no_cached_translation_behind() {
    let mut r = rig("closed-channel", Limits::default());
    let (tu, dev) = device(&mut r, caps(0, false, false));
    let (_f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 1 << 20, 0x10_0000, Perm::RW);
    tu.channel().attach(dev, None, ioas).unwrap();
    let mut b = [0u8; 8];
    tu.read(dev, 0, 0x10_0000, &mut b).unwrap();
    // The session goes, and with it the channel.
    let Rig { _srv: core, path: _, s } = r;
    drop(s);
    let t0 = Instant::now();
    loop {
        match tu.read(dev, 0, 0x10_0000, &mut b) {
            Err(tu::Error::NoDevice(d)) => {
                assert_eq!(d, dev);
                break;
            }
            other => assert!(t0.elapsed() < Duration::from_secs(20), "DMA after the session closed: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(core);
}
