//! The translation unit's direct copy (`TranslationUnit::copy`) and its
//! per-thread IOTLBs, against a real core: overlapping ranges, rights,
//! faults part-way (nothing written), dirty bits, copies between PASIDs,
//! devices and memory objects, client memory, and a translation cached on
//! one thread that an invalidation completed elsewhere voids; the same
//! for a queue's handle (`tu::Handle`), moved between threads or not.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

mod common;

use iommu_core::client::Client;
use iommu_core::device::Channel;
use iommu_core::server::Running;
use iommu_core::tu::{self, At, ClientFailure, ClientMemory, Side, TranslationUnit};
use iommu_core::types::*;

struct Rig {
    _srv: Running,
    s: Client,
}

fn rig(name: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("ioasid-tucopy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("core.sock");
    let srv = iommu_core::server::spawn(&path, Limits { table_pool_bytes: 64 << 20, ..Limits::default() }).unwrap();
    let s = Client::session(&path).unwrap();
    Rig { _srv: srv, s }
}

fn unit(r: &mut Rig) -> Arc<TranslationUnit> {
    let (_, fd) = r.s.open_device_channel().unwrap();
    TranslationUnit::new(Arc::new(Channel::new(fd).unwrap()), tu::Config::default()).unwrap()
}

fn bind(tu: &TranslationUnit, pci: &str, dirty: bool) -> u32 {
    let caps = DeviceCaps { pasid_width: 20, pri: false, dirty_tracking: dirty };
    tu.bind(BindArgs { name: "copy".into(), pci_address: pci.into(), caps }).unwrap().dev_id
}

fn at(dev: u32, pasid: u32, iova: u64) -> At {
    At { dev, pasid, iova }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

fn fault(e: tu::CopyError) -> (Side, u64, FaultReason) {
    match e.error {
        tu::Error::Fault { iova, reason, .. } => (e.side, iova, reason),
        other => panic!("expected a fault, got {other}"),
    }
}

fn file_bytes(f: &File, off: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

#[test]
fn overlapping_copies_in_one_space_go_as_memmove_across_leaves() {
    let mut r = rig("overlap");
    let (f, m) = common::memory(&mut r.s, 4 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    // 4 KiB leaves (the offset is not 2 MiB aligned) and a 2 MiB leaf.
    common::map_at(&mut r.s, ioas, m, 0x1000, 0x10_0000, 0x10_0000, Perm::RW);
    common::map_at(&mut r.s, ioas, m, 2 << 20, 2 << 20, 0x40_0000, Perm::RW);
    let tu = unit(&mut r);
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    let mut model = pattern(0x10_0000, 3);
    f.write_all_at(&model, 0x1000).unwrap();
    // (source, destination, length) as offsets into the 4 KiB-leaf area:
    // destination inside the source (backward), source inside the
    // destination (forward), unaligned, several leaves, disjoint.
    for (s, d, n) in
        [(0x100, 0x1234, 0x9000), (0x5555, 0x10, 0x8000), (0x20_000, 0x20_001, 0x3fff), (0x40_000, 0x80_000, 0x2_0000)]
    {
        tu.copy(at(dev, 0, 0x10_0000 + s), at(dev, 0, 0x10_0000 + d), n).unwrap();
        model.copy_within(s as usize..s as usize + n, d as usize);
        assert_eq!(file_bytes(&f, 0x1000, model.len()), model, "copy {s:#x} -> {d:#x} of {n:#x}");
    }
    // Within one 2 MiB leaf, both ways.
    let mut big = pattern(2 << 20, 9);
    f.write_all_at(&big, 2 << 20).unwrap();
    tu.copy(at(dev, 0, 0x40_0000), at(dev, 0, 0x40_0800), 0x10_0000).unwrap();
    big.copy_within(0..0x10_0000, 0x800);
    tu.copy(at(dev, 0, 0x40_1000), at(dev, 0, 0x40_0010), 0x8_0000).unwrap();
    big.copy_within(0x1000..0x8_1000, 0x10);
    assert_eq!(file_bytes(&f, 2 << 20, 2 << 20), big);
    // From the 4 KiB leaves into the 2 MiB leaf and back.
    tu.copy(at(dev, 0, 0x10_0ff0), at(dev, 0, 0x5f_fff0), 0x10).unwrap();
    assert_eq!(file_bytes(&f, (2 << 20) + 0x1f_fff0, 0x10), model[0xff0..0x1000]);
}

#[test]
fn a_copy_that_would_fault_on_either_side_writes_nothing_and_reports_it() {
    let mut r = rig("faults");
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x4000, 0x10_0000, Perm::RW);
    // A hole at 0x10_4000, then a read-only page, then a write-only page.
    common::map_at(&mut r.s, ioas, m, 0x5000, 0x1000, 0x10_5000, Perm::R);
    common::map_at(&mut r.s, ioas, m, 0x6000, 0x1000, 0x10_6000, Perm { read: false, write: true });
    let tu = unit(&mut r);
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    let before = pattern(0x7000, 1);
    f.write_all_at(&before, 0).unwrap();
    let unchanged = || assert_eq!(file_bytes(&f, 0, 0x7000), before, "nothing is written");
    // Destination faults part-way (the hole): nothing of its first part
    // is written.
    let e = tu.copy(at(dev, 0, 0x10_0000), at(dev, 0, 0x10_2000), 0x3000).unwrap_err();
    assert_eq!(fault(e), (Side::Destination, 0x10_4000, FaultReason::NotPresent));
    unchanged();
    // Source faults part-way.
    let e = tu.copy(at(dev, 0, 0x10_3000), at(dev, 0, 0x10_0000), 0x2000).unwrap_err();
    assert_eq!(fault(e), (Side::Source, 0x10_4000, FaultReason::NotPresent));
    unchanged();
    // Rights: a read-only destination, a write-only source.
    let e = tu.copy(at(dev, 0, 0x10_0000), at(dev, 0, 0x10_5100), 0x10).unwrap_err();
    assert_eq!(fault(e), (Side::Destination, 0x10_5100, FaultReason::Permission));
    let e = tu.copy(at(dev, 0, 0x10_6000), at(dev, 0, 0x10_0000), 0x10).unwrap_err();
    assert_eq!(fault(e), (Side::Source, 0x10_6000, FaultReason::Permission));
    unchanged();
    // The allowed directions work.
    tu.copy(at(dev, 0, 0x10_5000), at(dev, 0, 0x10_6000), 0x1000).unwrap();
    assert_eq!(file_bytes(&f, 0x6000, 0x1000), before[0x5000..0x6000]);
    // Each fault reached the session.
    let faults = r.s.read_faults(16).unwrap();
    let seen: Vec<_> = faults.iter().map(|x| (x.iova, x.access.write, x.reason)).collect();
    assert_eq!(
        seen,
        vec![
            (0x10_4000, true, FaultReason::NotPresent),
            (0x10_4000, false, FaultReason::NotPresent),
            (0x10_5100, true, FaultReason::Permission),
            (0x10_6000, false, FaultReason::Permission),
        ]
    );
}

#[test]
fn a_copy_dirties_exactly_the_destination_leaves() {
    let mut r = rig("dirty");
    let (_f, m) = common::memory(&mut r.s, 4 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 64 << 10, 0x10_0000, Perm::RW);
    common::map_at(&mut r.s, ioas, m, 2 << 20, 2 << 20, 0x40_0000, Perm::RW);
    let tu = unit(&mut r);
    let dev = bind(&tu, "0000:00:04.0", true);
    tu.channel().attach(dev, None, ioas).unwrap();
    r.s.set_dirty_tracking(ioas, true).unwrap();
    // Pages 2..=5 written, pages 8..=9 only read.
    tu.copy(at(dev, 0, 0x10_8000), at(dev, 0, 0x10_2010), 0x3ff0).unwrap();
    // Read and cleared.
    let bm = r.s.dirty_bitmap(ioas, 0x10_0000, 64 << 10, 4096, false).unwrap();
    assert_eq!(bm, vec![0b11_1100]);
    // From the 4 KiB leaves into the 2 MiB leaf: only the big leaf.
    tu.copy(at(dev, 0, 0x10_0000), at(dev, 0, 0x40_1000), 0x100).unwrap();
    assert_eq!(r.s.dirty_bitmap(ioas, 0x10_0000, 64 << 10, 4096, false).unwrap(), vec![0]);
    assert_eq!(r.s.dirty_bitmap(ioas, 0x40_0000, 2 << 20, 2 << 20, false).unwrap(), vec![1]);
}

#[test]
fn copies_cross_pasids_devices_and_memory_objects() {
    let mut r = rig("cross");
    let (fa, ma) = common::memory(&mut r.s, 1 << 20);
    let (fb, mb) = common::memory(&mut r.s, 1 << 20);
    let a = r.s.ioas_alloc().unwrap();
    let b = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, a, ma, 0, 1 << 20, 0x100_0000, Perm::RW);
    common::map_at(&mut r.s, b, mb, 0, 1 << 20, 0x100_0000, Perm::RW);
    let tu = unit(&mut r);
    let d1 = bind(&tu, "0000:00:04.0", false);
    let d2 = bind(&tu, "0000:00:05.0", false);
    tu.channel().attach(d1, Some(0x11), a).unwrap();
    tu.channel().attach(d1, Some(0x22), b).unwrap();
    tu.channel().attach(d2, None, b).unwrap();
    let src = pattern(0x6000, 5);
    fa.write_all_at(&src, 0x3000).unwrap();
    // Same IOVA, other PASID: a different address space, no overlap.
    tu.copy(at(d1, 0x11, 0x100_3000), at(d1, 0x22, 0x100_3800), 0x6000).unwrap();
    assert_eq!(file_bytes(&fb, 0x3800, 0x6000), src);
    assert_eq!(file_bytes(&fa, 0x3000, 0x6000), src, "the source is unchanged");
    // Another device's RID, reaching B.
    tu.copy(at(d1, 0x11, 0x100_3000), at(d2, 0, 0x100_a000), 0x100).unwrap();
    assert_eq!(file_bytes(&fb, 0xa000, 0x100), src[..0x100]);
    // A PASID with no attachment faults with no byte written.
    let e = tu.copy(at(d1, 0x11, 0x100_3000), at(d1, 0x33, 0x100_0000), 0x10).unwrap_err();
    assert_eq!(fault(e), (Side::Destination, 0x100_0000, FaultReason::NoPasid));
}

/// Client memory at `base` in the test's own buffer.
struct Held {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl ClientMemory for Held {
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), ClientFailure> {
        let o = (address - self.base) as usize;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }

    fn write(&self, address: u64, data: &[u8]) -> Result<(), ClientFailure> {
        let o = (address - self.base) as usize;
        self.bytes.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn copies_to_and_from_client_memory_go_through_the_client() {
    let mut r = rig("client");
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let base = 0x7f00_0000_0000u64;
    let cm = r.s.register_client_memory(4 << 20, true, base).unwrap().id;
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 1 << 20, 0x10_0000, Perm::RW);
    common::map_at(&mut r.s, ioas, cm, 0, 4 << 20, 0x80_0000, Perm::RW);
    let tu = unit(&mut r);
    let held = Arc::new(Held { base, bytes: Mutex::new(pattern(4 << 20, 7)) });
    tu.set_client_memory(Some(held.clone()));
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    // Client memory to a file, more than one buffer's worth.
    tu.copy(at(dev, 0, 0x80_0100), at(dev, 0, 0x10_0000), 0x2_0000).unwrap();
    let want = held.bytes.lock().unwrap()[0x100..0x2_0100].to_vec();
    assert_eq!(file_bytes(&f, 0, 0x2_0000), want);
    // A file to client memory.
    let src = pattern(0x3000, 11);
    f.write_all_at(&src, 0x4_0000).unwrap();
    tu.copy(at(dev, 0, 0x14_0000), at(dev, 0, 0x90_0ffe), 0x3000).unwrap();
    assert_eq!(held.bytes.lock().unwrap()[0x10_0ffe..0x10_3ffe], src[..]);
    // Client memory to itself, overlapping and longer than a buffer.
    let mut model = held.bytes.lock().unwrap().clone();
    tu.copy(at(dev, 0, 0x80_0000), at(dev, 0, 0x80_0040), 0x3_0000).unwrap();
    model.copy_within(0..0x3_0000, 0x40);
    assert!(*held.bytes.lock().unwrap() == model, "client memory copies as memmove");
}

#[test]
fn a_translation_cached_on_one_thread_is_not_used_after_an_invalidation_another_thread_completed() {
    let mut r = rig("per-thread");
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    f.write_all_at(b"old page", 0).unwrap();
    f.write_all_at(b"new page", 0x1000).unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::RW);
    let tu = unit(&mut r);
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    // A device thread that reads when told to and says what it read.
    let (ask, asked) = std::sync::mpsc::channel::<()>();
    let (tell, told) = std::sync::mpsc::channel::<Result<[u8; 8], String>>();
    let t = tu.clone();
    let reader = std::thread::spawn(move || {
        for () in asked {
            let mut b = [0u8; 8];
            let r = t.read(dev, 0, 0x10_0000, &mut b).map(|()| b).map_err(|e| e.to_string());
            tell.send(r).unwrap();
        }
    });
    let read = || {
        ask.send(()).unwrap();
        told.recv().unwrap()
    };
    assert_eq!(&read().unwrap(), b"old page");
    // The second read hits the reader's IOTLB: no walk.
    let misses = tu.iotlb_misses();
    let hits = tu.iotlb_hits();
    assert_eq!(&read().unwrap(), b"old page");
    assert_eq!(tu.iotlb_misses(), misses);
    assert_eq!(tu.iotlb_hits(), hits + 1);
    // The unmap's invalidation is answered on the channel's thread; the
    // reader's cached leaf is not used after it.
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    assert!(read().unwrap_err().contains("NotPresent"), "a DMA after the unmap faults");
    // Mapped again elsewhere: the reader sees the new translation.
    common::map_at(&mut r.s, ioas, m, 0x1000, 0x1000, 0x10_0000, Perm::RW);
    assert_eq!(&read().unwrap(), b"new page");
    // Twice more, and a replacement under a cached leaf.
    assert_eq!(&read().unwrap(), b"new page");
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::RW);
    assert_eq!(&read().unwrap(), b"old page");
    drop(ask);
    reader.join().unwrap();
}

/// Client memory whose writes wait at a gate: a DMA held in flight for as
/// long as the test wants.
struct Gate {
    entered: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
    written: std::sync::atomic::AtomicBool,
}

impl ClientMemory for Gate {
    fn read(&self, _address: u64, buf: &mut [u8]) -> Result<(), ClientFailure> {
        buf.fill(0);
        Ok(())
    }

    fn write(&self, _address: u64, _data: &[u8]) -> Result<(), ClientFailure> {
        if let Some(tx) = self.entered.lock().unwrap().take() {
            tx.send(()).unwrap();
        }
        self.release.lock().unwrap().recv().unwrap();
        self.written.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The handshake itself, without timing luck: a DMA held in flight (a
/// client-memory write waiting at a gate) holds the unmap of its page
/// until it ends; the unmap returns after the write landed, never before.
#[test]
fn an_unmap_returns_only_after_the_dma_in_flight_has_ended() {
    let mut r = rig("in-flight");
    let base = 0x7e00_0000_0000u64;
    let cm = r.s.register_client_memory(2 << 20, true, base).unwrap().id;
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, cm, 0, 0x1000, 0x10_0000, Perm::RW);
    let tu = unit(&mut r);
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let gate = Arc::new(Gate {
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(release_rx),
        written: std::sync::atomic::AtomicBool::new(false),
    });
    tu.set_client_memory(Some(gate.clone()));
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    let t = tu.clone();
    let writer = std::thread::spawn(move || t.write(dev, 0, 0x10_0000, b"in flight"));
    entered.recv().unwrap();
    let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ret, g) = (returned.clone(), gate.clone());
    let mut s = r.s;
    let unmapper = std::thread::spawn(move || {
        s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
        // Whatever was in flight when the unmap began has landed.
        let landed = g.written.load(std::sync::atomic::Ordering::SeqCst);
        ret.store(true, std::sync::atomic::Ordering::SeqCst);
        (s, landed)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!returned.load(std::sync::atomic::Ordering::SeqCst), "the unmap returned while a DMA was in flight");
    release.send(()).unwrap();
    writer.join().unwrap().unwrap();
    let (_s, landed) = unmapper.join().unwrap();
    assert!(landed, "the unmap returned before the DMA in flight ended");
    // After the unmap, the page faults.
    assert!(matches!(tu.write(dev, 0, 0x10_0000, b"x"), Err(tu::Error::Fault { .. })));
}

/// A queue's handle (`tu::Handle`): what it caches is voided by an
/// invalidation answered on the channel's thread, before the unmap
/// returns. A read after it faults, a write faults and writes nothing, and
/// a write after the page is mapped again lands in the new mapping.
#[test]
fn a_handles_cached_translation_is_not_used_after_an_invalidation_answered_elsewhere() {
    let mut r = rig("handle");
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    f.write_all_at(b"old page", 0).unwrap();
    f.write_all_at(b"new page", 0x1000).unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::RW);
    let tu = unit(&mut r);
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    let mut h = tu.handle();
    let mut b = [0u8; 8];
    h.read(dev, 0, 0x10_0000, &mut b).unwrap();
    assert_eq!(&b, b"old page");
    // The second read hits the handle's IOTLB: no walk, one hit counted.
    let (hits, misses) = (tu.iotlb_hits(), tu.iotlb_misses());
    h.read(dev, 0, 0x10_0000, &mut b).unwrap();
    assert_eq!(&b, b"old page");
    assert_eq!((tu.iotlb_hits(), tu.iotlb_misses()), (hits + 1, misses));
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    assert!(matches!(h.read(dev, 0, 0x10_0000, &mut b), Err(tu::Error::Fault { reason: FaultReason::NotPresent, .. })));
    assert!(matches!(h.write(dev, 0, 0x10_0000, b"STALE!!!"), Err(tu::Error::Fault { .. })));
    assert!(matches!(
        h.copy(at(dev, 0, 0x10_0000), at(dev, 0, 0x10_0100), 8),
        Err(tu::CopyError { side: Side::Source, .. })
    ));
    assert_eq!(file_bytes(&f, 0, 8), b"old page", "nothing written through the voided translation");
    // Mapped again at another offset: the handle's write lands there.
    common::map_at(&mut r.s, ioas, m, 0x1000, 0x1000, 0x10_0000, Perm::RW);
    h.write(dev, 0, 0x10_0000, b"written!").unwrap();
    assert_eq!(file_bytes(&f, 0x1000, 8), b"written!");
    assert_eq!(file_bytes(&f, 0, 8), b"old page");
    // Now cached, and replaced under it: the next write goes to the
    // replacement.
    h.write(dev, 0, 0x10_0008, b"cached!!").unwrap();
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::RW);
    h.write(dev, 0, 0x10_0008, b"replaced").unwrap();
    assert_eq!(file_bytes(&f, 0, 16), b"old pagereplaced");
    assert_eq!(file_bytes(&f, 0x1000, 16), b"written!cached!!");
}

/// A handle changes thread between accesses (it is `Send`): the thread
/// it moves to never uses what was cached before an invalidation that
/// completed while it moved, and its own caching is voided as well by the
/// next one.
#[test]
fn a_handle_moved_between_threads_keeps_the_guarantee() {
    fn send<T: Send>(t: T) -> T {
        t
    }
    let mut r = rig("handle-moved");
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    f.write_all_at(b"old page", 0).unwrap();
    f.write_all_at(b"new page", 0x1000).unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::RW);
    let tu = unit(&mut r);
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    let mut h = send(tu.handle());
    let mut b = [0u8; 8];
    h.read(dev, 0, 0x10_0000, &mut b).unwrap();
    assert_eq!(&b, b"old page");
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    common::map_at(&mut r.s, ioas, m, 0x1000, 0x1000, 0x10_0000, Perm::RW);
    let mut h = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        h.read(dev, 0, 0x10_0000, &mut b).unwrap();
        assert_eq!(&b, b"new page", "the moved handle translates afresh");
        h
    })
    .join()
    .unwrap();
    // Cached on that thread; voided here by an unmap answered on a third.
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    assert!(matches!(h.write(dev, 0, 0x10_0000, b"STALE!!!"), Err(tu::Error::Fault { .. })));
    assert_eq!(file_bytes(&f, 0x1000, 8), b"new page");
    drop(h);
    // A dropped handle leaves the unit's list: invalidations do not wait
    // for it, and its hits stay counted.
    let hits = tu.iotlb_hits();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::RW);
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    assert_eq!(tu.iotlb_hits(), hits);
}

/// Rights are part of what a handle caches, and a change of them (an
/// unmap and a map of the same IOVA with other rights) is seen at once:
/// a write to a page made read-only faults and writes nothing; a page
/// made writable again takes the write.
#[test]
fn a_handle_sees_rights_change() {
    let mut r = rig("handle-rights");
    let (f, m) = common::memory(&mut r.s, 1 << 20);
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::RW);
    let tu = unit(&mut r);
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    let mut h = tu.handle();
    h.write(dev, 0, 0x10_0000, b"writable").unwrap();
    h.check(dev, 0, 0x10_0000, 8, Perm::W).unwrap();
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::R);
    assert!(matches!(
        h.write(dev, 0, 0x10_0000, b"readonly"),
        Err(tu::Error::Fault { reason: FaultReason::Permission, .. })
    ));
    assert!(matches!(
        h.copy(at(dev, 0, 0x10_0000), at(dev, 0, 0x10_0008), 8),
        Err(tu::CopyError { side: Side::Destination, .. })
    ));
    let mut b = [0u8; 8];
    h.read(dev, 0, 0x10_0000, &mut b).unwrap();
    assert_eq!(&b, b"writable");
    assert_eq!(file_bytes(&f, 0, 16), b"writable\0\0\0\0\0\0\0\0");
    r.s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
    common::map_at(&mut r.s, ioas, m, 0, 0x1000, 0x10_0000, Perm::RW);
    h.copy(at(dev, 0, 0x10_0000), at(dev, 0, 0x10_0008), 8).unwrap();
    assert_eq!(file_bytes(&f, 0, 16), b"writablewritable");
    assert_eq!(h.translate(dev, 0, 0x10_0000, 16, Perm::W).unwrap().len(), 1);
}

/// The handshake through a handle: a DMA held in flight through a
/// handle on another thread holds the unmap of its page until it ends.
#[test]
fn an_unmap_returns_only_after_a_handles_dma_in_flight_has_ended() {
    let mut r = rig("handle-in-flight");
    let base = 0x7e00_0000_0000u64;
    let cm = r.s.register_client_memory(2 << 20, true, base).unwrap().id;
    let ioas = r.s.ioas_alloc().unwrap();
    common::map_at(&mut r.s, ioas, cm, 0, 0x1000, 0x10_0000, Perm::RW);
    let tu = unit(&mut r);
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let gate = Arc::new(Gate {
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(release_rx),
        written: std::sync::atomic::AtomicBool::new(false),
    });
    tu.set_client_memory(Some(gate.clone()));
    let dev = bind(&tu, "0000:00:04.0", false);
    tu.channel().attach(dev, None, ioas).unwrap();
    let mut h = tu.handle();
    let writer = std::thread::spawn(move || {
        let r = h.write(dev, 0, 0x10_0000, b"in flight");
        (h, r)
    });
    entered.recv().unwrap();
    let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ret, g) = (returned.clone(), gate.clone());
    let mut s = r.s;
    let unmapper = std::thread::spawn(move || {
        s.unmap(ioas, 0x10_0000, 0x1000).unwrap();
        let landed = g.written.load(std::sync::atomic::Ordering::SeqCst);
        ret.store(true, std::sync::atomic::Ordering::SeqCst);
        (s, landed)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!returned.load(std::sync::atomic::Ordering::SeqCst), "the unmap returned while a DMA was in flight");
    release.send(()).unwrap();
    let (mut h, w) = writer.join().unwrap();
    w.unwrap();
    let (_s, landed) = unmapper.join().unwrap();
    assert!(landed, "the unmap returned before the DMA in flight ended");
    assert!(matches!(h.write(dev, 0, 0x10_0000, b"x"), Err(tu::Error::Fault { .. })));
}
