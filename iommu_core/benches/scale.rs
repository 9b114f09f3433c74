//! Scale run: 10^6 mappings in one IOAS. Reports the time to map and unmap
//! them all, page-table bytes, and the core's own memory per mapping
//! (anonymous RSS growth; the table pool is shared memory and counted
//! separately). Run with `cargo bench -p iommu_core --bench scale`; set
//! `IOASID_SCALE_MAPPINGS` to change the count.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::OwnedFd;
use std::time::Instant;

use iommu_core::model::{Core, Effects};
use iommu_core::pagetable::walk;
use iommu_core::types::{Limits, MapArgs, Perm};

/// (resident, shared) pages of this process.
fn statm() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let v: Vec<u64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    (v.get(1).copied().unwrap_or(0), v.get(2).copied().unwrap_or(0))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` and `cargo test --benches` probe with this.
        return;
    }
    let n: u64 = std::env::var("IOASID_SCALE_MAPPINGS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let mut core = Core::new(Limits { table_pool_bytes: 1 << 30, ..Limits::default() }).unwrap();
    let sid = core.open_session(1, 0).unwrap();
    let mem = core.register_memory(sid, OwnedFd::from(iommu_core::memfd::create("scale", 1 << 20).unwrap())).unwrap();
    let ioas = core.ioas_alloc(sid).unwrap();
    let (rss0, shr0) = statm();
    // No device server: unlinked tables are freed right after each call.
    let mut fx = Effects::default();
    let t = Instant::now();
    for i in 0..n {
        // 4 KiB mappings of one page of a small memfd, automatic IOVA.
        let args = MapArgs { ioas, mem: mem.id, offset: (i % 256) * 4096, length: 4096, iova: None, perm: Perm::RW };
        core.map(sid, args, &mut fx).unwrap();
    }
    let map_time = t.elapsed();
    let (rss1, shr1) = statm();
    let page = 4096u64;
    let tables = core.tables_in_use() as u64;
    let anon = (rss1.saturating_sub(shr1)).saturating_sub(rss0.saturating_sub(shr0)) * page;
    // Spot-check the tables against the mappings.
    let root = core.ioas_root(sid, ioas).unwrap();
    for i in (0..n).step_by((n as usize / 1000).max(1)) {
        let leaf = walk(core.pool(sid).unwrap(), root, 0x1000 + i * 4096).unwrap();
        assert_eq!(leaf.address, mem.system_address + (i % 256) * 4096);
    }
    let t = Instant::now();
    let bytes = core.unmap(sid, ioas, 0, u64::MAX, &mut fx).unwrap();
    core.release_tables(fx.garbage);
    let unmap_time = t.elapsed();
    assert_eq!(bytes, n * 4096);
    println!("scale: {n} mappings of 4 KiB in one IOAS");
    println!(
        "  map all:   {:.3} s ({:.0} maps/s, {:.0} ns/map)",
        map_time.as_secs_f64(),
        n as f64 / map_time.as_secs_f64(),
        map_time.as_nanos() as f64 / n as f64
    );
    println!(
        "  unmap all: {:.3} s ({:.0} ns/mapping)",
        unmap_time.as_secs_f64(),
        unmap_time.as_nanos() as f64 / n as f64
    );
    println!(
        "  page tables: {tables} tables = {} bytes ({:.1} bytes/mapping)",
        tables * page,
        (tables * page) as f64 / n as f64
    );
    println!("  core anonymous memory: {anon} bytes ({:.1} bytes/mapping)", anon as f64 / n as f64);
    println!("  tables after unmap-all: {}", core.tables_in_use());
}
