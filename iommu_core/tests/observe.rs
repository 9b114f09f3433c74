//! The requests an observer follows the state with: the generation page
//! (every change stored before its reply), the overview (a status without
//! mappings), the counters, and mappings in pieces with the IOAS's change
//! count.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;

use iommu_core::client::Client;
use iommu_core::pagetable::Perm;
use iommu_core::types::{CopyArgs, MapArgs};
use iommu_core::wire::{self, Reply, Request};
use iommu_core::Errno;

use common::{errno, Env};

const PAGE: u64 = 0x1000;

fn map(s: &mut Client, ioas: u32, mem: u32, iova: u64) {
    s.map(MapArgs { ioas, mem, offset: 0, length: PAGE, iova: Some(iova), perm: Perm::RW }).unwrap();
}

#[test]
fn the_generation_page_shows_each_change_before_its_reply() {
    let env = Env::new("observe-page");
    let mut o = env.observer();
    let page = o.generation_page().unwrap();
    assert_eq!(page.load(), o.generation().unwrap());
    let mut s = env.session();
    let ram = iommu_core::memfd::create("ram", 1 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    let ioas = s.ioas_alloc().unwrap();
    for k in 0..20 {
        let before = page.load();
        map(&mut s, ioas, mem, 0x10_0000 + k * PAGE);
        // The reply came: the page already shows the change.
        assert!(page.load() > before);
    }
    // Reads do not move it.
    let g = page.load();
    o.status().unwrap();
    o.overview().unwrap();
    o.counters().unwrap();
    o.mappings_piece(s.session_id(), ioas, 0, 10).unwrap();
    assert_eq!(page.load(), g);
    assert_eq!(o.generation().unwrap(), g);
    // A session may ask for it too; its fd is read-only.
    let p2 = s.generation_page().unwrap();
    assert_eq!(p2.load(), g);
    let (r, fds) = s.call_fds(&Request::GenerationPage, &[]).unwrap();
    assert_eq!(r, Reply::GenerationPage { bytes: wire::GENERATION_PAGE_BYTES });
    let f = std::fs::File::from(fds.into_iter().next().unwrap());
    assert!(iommu_core::shm::map(&f, wire::GENERATION_PAGE_BYTES, false).is_err(), "mapped writable");
    // Closing a connection moves it.
    drop(s);
    let t0 = std::time::Instant::now();
    while page.load() == g {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "a closed session did not move the generation");
        std::thread::yield_now();
    }
}

#[test]
fn overview_counters_and_pieces_with_a_change_count() {
    let env = Env::new("observe-pieces");
    let mut s = env.session();
    let sid = s.session_id();
    let ram = iommu_core::memfd::create("ram", 1 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    let a = s.ioas_alloc().unwrap();
    let b = s.ioas_alloc().unwrap();
    for k in 0..10 {
        map(&mut s, a, mem, 0x10_0000 + k * 2 * PAGE);
    }
    let mut o = env.observer();

    // The overview is the status without mappings.
    let full = o.status().unwrap();
    let ov = o.overview().unwrap();
    let ia = ov.sessions[0].ioas.iter().find(|i| i.id == a).unwrap();
    assert!(ia.mappings.is_empty());
    assert_eq!(ia.mappings_total, 10);
    let mut stripped = full.clone();
    for se in &mut stripped.sessions {
        for i in &mut se.ioas {
            i.mappings.clear();
        }
    }
    stripped.stats = ov.stats;
    assert_eq!(ov, stripped);

    // The counters are the status's.
    let c = o.counters().unwrap();
    let st = o.status().unwrap();
    assert_eq!((c.sessions, c.ppasids), (st.sessions.len() as u64, st.ppasids.len() as u64));
    assert_eq!(c.stats.sessions_opened, st.stats.sessions_opened);
    assert!(st.stats.requests > c.stats.requests, "every request counts");

    // Pieces: in IOVA order from `from`, at most `max`, with the count.
    let p = o.mappings_piece(sid, a, 0, 4).unwrap();
    assert_eq!((p.changes, p.total, p.mappings.len()), (10, 10, 4));
    let next = o.mappings_piece(sid, a, p.mappings[3].iova + 1, 100).unwrap();
    assert_eq!(next.mappings.len(), 6);
    assert_eq!(next.mappings[0].iova, 0x10_0000 + 8 * PAGE);
    assert_eq!(next.changes, 10);
    // Another IOAS's changes leave the count alone; its own move it.
    map(&mut s, b, mem, 0x1000);
    s.unmap(b, 0x1000, PAGE).unwrap();
    assert_eq!(o.mappings_piece(sid, a, 0, 1).unwrap().changes, 10);
    s.unmap(a, 0x10_0000, PAGE).unwrap();
    let p = o.mappings_piece(sid, a, 0, 1).unwrap();
    assert_eq!((p.changes, p.total), (11, 9));
    s.copy(CopyArgs {
        src: a,
        src_iova: 0x10_0000 + 2 * PAGE,
        dst: a,
        dst_iova: Some(0x100_0000),
        length: PAGE,
        perm: Perm::R,
    })
    .unwrap();
    let p = o.mappings_piece(sid, a, 0x100_0000, 10).unwrap();
    assert_eq!((p.changes, p.total, p.mappings.len()), (12, 10, 1));
    // A refused change counts nothing.
    assert_eq!(errno(s.unmap(a, 0x50_0000, PAGE)), Errno::ENOENT);
    assert_eq!(o.mappings_piece(sid, a, 0, 1).unwrap().changes, 12);
    // `max` is capped.
    let r = o.call(&Request::MappingsPiece { session: sid, ioas: a, from: 0, max: u32::MAX }, &[]).unwrap();
    assert!(matches!(r, Reply::MappingsPiece(p) if p.mappings.len() == 10));

    // A session sees only itself; a nested IOAS or an unknown one: ENOENT.
    let mut other = env.session();
    assert_eq!(errno(other.mappings_piece(sid, a, 0, 1)), Errno::ENOENT);
    assert_eq!(other.overview().unwrap().sessions.len(), 1);
    assert_eq!(other.counters().unwrap().sessions, 1);
    assert_eq!(o.counters().unwrap().sessions, 2);
    assert_eq!(errno(o.mappings_piece(sid, 99, 0, 1)), Errno::ENOENT);
}
