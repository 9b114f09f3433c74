//! A core in this process stops (all its connections close, as when it
//! dies) and a new one starts on the same socket, under a server and its
//! client: DMA logging loses nothing across the restart, the files the
//! server keeps for the rebuild are released with their regions, and the
//! server follows restart after restart.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::*;
use vfio_user_server::client::Client;
use vfio_user_server::devices::testdev::regs;
use vfio_user_server::proto;
use zerocopy::IntoBytes;

const RW: u32 = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;
const BASE: u64 = 0x100_0000;
const DEADLINE: Duration = Duration::from_secs(30);

/// Stops the core and waits until the server has noticed.
fn stop_core(s: &mut Stack) {
    s.core.take().expect("a running core").stop().unwrap();
    let t0 = Instant::now();
    while s.server().dma().core_connected() {
        assert!(t0.elapsed() < DEADLINE, "the server never noticed that its core went away");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts a new core on the same socket and waits until the server has
/// reconnected (its `n`th reconnect).
fn start_core(s: &mut Stack, n: u64) {
    s.core = Some(iommu_core::server::spawn(&s.core_path, iommu_core::types::Limits::default()).unwrap());
    let t0 = Instant::now();
    while s.server().dma().reconnects() < n || !s.server().dma().core_connected() {
        assert!(t0.elapsed() < DEADLINE, "the server never reconnected to the new core");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn bits_of(d: &[u8]) -> Vec<u64> {
    let words: Vec<u64> = d[24..].chunks(8).map(|b| u64::from_ne_bytes(b.try_into().unwrap())).collect();
    (0..words.len() as u64 * 64).filter(|&k| words[(k / 64) as usize] & (1 << (k % 64)) != 0).collect()
}

fn report(c: &mut Client, iova: u64, length: u64) -> Vec<u64> {
    let rep = proto::LoggingReport { iova, length, page_size: 4096 };
    let get = proto::FEATURE_GET | proto::FEATURE_DMA_LOGGING_REPORT;
    let words = (length / 4096).div_ceil(64);
    bits_of(&c.feature(get, rep.as_bytes(), (8 + 24 + 8 * words) as u32).unwrap())
}

/// Pages written before the core died and not reported yet cannot be
/// known to be clean: the first report after the restart shows every page
/// of the regions dirty (and clears them), later reports only new writes.
#[test]
fn dma_logging_reports_everything_unreported_dirty_after_a_restart() {
    let mut s = Stack::new("restart-logging");
    let mut c = s.client();
    let mem = memfd("m", 64 * 4096);
    c.dma_map(RW, 0, BASE, 64 * 4096, Some(mem.as_fd())).unwrap();
    let ctl = proto::LoggingControl { page_size: 4096, num_ranges: 0, reserved: 0 };
    c.feature(proto::FEATURE_SET | proto::FEATURE_DMA_LOGGING_START, ctl.as_bytes(), 24).unwrap();
    assert_eq!(copy(&mut c, BASE, BASE + 0x5000, 100, None), regs::STATUS_DONE);
    assert_eq!(report(&mut c, BASE, 64 * 4096), vec![5]);
    // Written, then the core goes before anyone asked.
    assert_eq!(copy(&mut c, BASE, BASE + 0x9000, 100, None), regs::STATUS_DONE);
    stop_core(&mut s);
    // No core: no report, no DMA.
    let get = proto::FEATURE_GET | proto::FEATURE_DMA_LOGGING_REPORT;
    let rep = proto::LoggingReport { iova: BASE, length: 64 * 4096, page_size: 4096 };
    let e = c.feature(get, rep.as_bytes(), 8 + 24 + 8).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENODEV));
    assert_eq!(copy(&mut c, BASE, BASE + 0x7000, 100, None), regs::STATUS_ERROR);
    start_core(&mut s, 1);
    // Half the region first: its pages are dirty, the rest still is.
    assert_eq!(report(&mut c, BASE, 32 * 4096), (0..32).collect::<Vec<u64>>());
    assert_eq!(report(&mut c, BASE, 64 * 4096), (32..64).collect::<Vec<u64>>());
    assert_eq!(report(&mut c, BASE, 64 * 4096), Vec::<u64>::new());
    // The new core tracks the device's writes.
    assert_eq!(copy(&mut c, BASE, BASE + 0x6000, 100, None), regs::STATUS_DONE);
    assert_eq!(report(&mut c, BASE, 64 * 4096), vec![6]);
    c.feature(proto::FEATURE_SET | proto::FEATURE_DMA_LOGGING_STOP, &[], 8).unwrap();
}

/// The server keeps each file of a DMA_MAP open (once per file) to map it
/// again in a new core, and closes it with the file's last region: also
/// when that region is unmapped without a core, and when the client
/// leaves. Restart after restart, the same connection keeps its DMA.
#[test]
fn kept_files_go_with_their_regions_and_restarts_repeat() {
    let mut s = Stack::new("restart-files");
    let mut c = s.client();
    let a = memfd("a", 1 << 20);
    let b = memfd("b", 1 << 20);
    c.dma_map(RW, 0, BASE, 0x8_0000, Some(a.as_fd())).unwrap();
    c.dma_map(RW, 0x8_0000, BASE + 0x8_0000, 0x8_0000, Some(a.as_fd())).unwrap();
    c.dma_map(RW, 0, BASE + 0x10_0000, 1 << 20, Some(b.as_fd())).unwrap();
    let dma = s.server().dma().clone();
    assert_eq!((dma.map_count(), dma.file_count()), (3, 2));
    for round in 1..=3u64 {
        stop_core(&mut s);
        start_core(&mut s, round);
        let msg = format!("round {round}");
        a.write_all_at(msg.as_bytes(), 0x100).unwrap();
        assert_eq!(copy(&mut c, BASE + 0x100, BASE + 0x10_0000, msg.len() as u32, None), regs::STATUS_DONE);
        let mut got = vec![0u8; msg.len()];
        b.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, msg.as_bytes());
        let snap = s.observer().status().unwrap();
        let compat = dma.compat().expect("connected");
        assert_eq!(compat.generation(), round + 1);
        let sess = snap.sessions.iter().find(|x| x.id == compat.session_id()).unwrap();
        let ioas = sess.ioas.iter().find(|i| i.id == compat.ioas()).unwrap();
        let spans: Vec<(u64, u64)> = ioas.mappings.iter().map(|m| (m.iova, m.length)).collect();
        assert_eq!(spans, vec![(BASE, 0x8_0000), (BASE + 0x8_0000, 0x8_0000), (BASE + 0x10_0000, 1 << 20)]);
        assert_eq!(sess.memory.len(), 2, "each file registered once in the new core");
    }
    // Without a core: one of a's two regions leaves, a stays open; b's only
    // region leaves, b is closed.
    stop_core(&mut s);
    c.dma_unmap(BASE, 0x8_0000, 0).unwrap();
    assert_eq!((dma.map_count(), dma.file_count()), (2, 2));
    c.dma_unmap(BASE + 0x10_0000, 1 << 20, 0).unwrap();
    assert_eq!((dma.map_count(), dma.file_count()), (1, 1));
    start_core(&mut s, 4);
    let snap = s.observer().status().unwrap();
    let compat = dma.compat().expect("connected");
    let sess = snap.sessions.iter().find(|x| x.id == compat.session_id()).unwrap();
    let ioas = sess.ioas.iter().find(|i| i.id == compat.ioas()).unwrap();
    assert_eq!(ioas.mappings.iter().map(|m| (m.iova, m.length)).collect::<Vec<_>>(), vec![(BASE + 0x8_0000, 0x8_0000)]);
    // The client leaves: nothing is kept.
    drop(c);
    let t0 = Instant::now();
    while dma.map_count() != 0 || dma.file_count() != 0 {
        assert!(t0.elapsed() < DEADLINE, "the departed client's regions or files stay");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A queue's view of the DMA (`QueueDma`) holds a translation handle to
/// the unit it reached last; when the core goes away it lets it go at its
/// next poll, though no route leads to a unit then, and after the restart
/// it reaches the new core's unit (and the memory as it is now).
#[test]
fn a_queue_view_lets_its_handle_go_with_the_core_and_reaches_the_new_one() {
    use vfio_user_server::dma::{DeviceDma, DmaSpace, Route};
    let mut s = Stack::new("restart-view");
    let mut c = s.client();
    let mem = memfd("v", 1 << 16);
    mem.write_all_at(b"first core", 0).unwrap();
    c.dma_map(RW, 0, BASE, 1 << 16, Some(mem.as_fd())).unwrap();
    let dma = s.server().dma().clone();
    let view = dma.queue();
    assert!(!view.has_handle(), "a view starts without a handle");
    let mut got = [0u8; 10];
    view.space(Route::Rid).read(BASE, &mut got).unwrap();
    assert_eq!(&got, b"first core");
    assert!(view.has_handle());
    // Polls change nothing while the units stay.
    view.let_go_stale();
    assert!(view.has_handle());

    stop_core(&mut s);
    view.let_go_stale();
    assert!(!view.has_handle(), "the handle to the gone core's unit stays");
    assert!(view.space(Route::Rid).read(BASE, &mut got).is_err());
    assert!(!view.has_handle());

    start_core(&mut s, 1);
    mem.write_all_at(b"second one", 0).unwrap();
    view.space(Route::Rid).read(BASE, &mut got).unwrap();
    assert_eq!(&got, b"second one");
    assert!(view.has_handle());
}
