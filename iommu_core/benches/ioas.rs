//! Criterion benches: map+unmap of 4 KiB and 2 MiB mappings in-process and
//! over the socket, page-table walks, and the machine's raw Unix-socket
//! round trip as the reference for the socket figures.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iommu_core::client::Client;
use iommu_core::model::{Core, Effects};
use iommu_core::pagetable::walk;
use iommu_core::types::{Limits, MapArgs, Perm};

const SIZES: [(u64, &str); 2] = [(4096, "4K"), (2 << 20, "2M")];

fn limits() -> Limits {
    Limits { table_pool_bytes: 64 << 20, ..Limits::default() }
}

fn inproc(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_unmap_inproc");
    for (size, name) in SIZES {
        let mut core = Core::new(limits()).unwrap();
        let sid = core.open_session(1, 0).unwrap();
        let mem = core.register_memory(sid, OwnedFd::from(iommu_core::memfd::create("b", 4 << 20).unwrap())).unwrap();
        let ioas = core.ioas_alloc(sid).unwrap();
        let args = MapArgs { ioas, mem: mem.id, offset: 0, length: size, iova: Some(1 << 30), perm: Perm::RW };
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                // No device server: the unlinked tables are freed at once.
                let mut fx = Effects::default();
                let iova = core.map(sid, args, &mut fx).unwrap();
                black_box(core.unmap(sid, ioas, iova, size, &mut fx).unwrap());
                core.release_tables(fx.garbage);
            })
        });
    }
    g.finish();
}

fn over_socket(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("ioasid-bench-{}", std::process::id()));
    let path = dir.join("core.sock");
    let srv = iommu_core::server::spawn(&path, limits()).unwrap();
    let mut s = Client::session(&path).unwrap();
    let file = iommu_core::memfd::create("b", 4 << 20).unwrap();
    let mem = s.register_memory(&file).unwrap();
    let ioas = s.ioas_alloc().unwrap();
    let mut g = c.benchmark_group("map_unmap_socket");
    for (size, name) in SIZES {
        let args = MapArgs { ioas, mem: mem.id, offset: 0, length: size, iova: Some(1 << 30), perm: Perm::RW };
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let iova = s.map(args).unwrap();
                black_box(s.unmap(ioas, iova, size).unwrap());
            })
        });
    }
    g.bench_function("iova_ranges_round_trip", |b| b.iter(|| black_box(s.iova_ranges(ioas).unwrap())));
    g.finish();
    drop(s);
    drop(srv);
}

fn raw_unix_rtt(c: &mut Criterion) {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(n) = b.read(&mut buf) {
            if n == 0 || b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut g = c.benchmark_group("unix_socket");
    g.bench_function("round_trip_32B", |bch| {
        let mut buf = [0u8; 32];
        bch.iter(|| {
            a.write_all(&buf).unwrap();
            a.read_exact(&mut buf).unwrap();
        })
    });
    g.finish();
    drop(a);
    echo.join().unwrap();
}

fn walks(c: &mut Criterion) {
    let mut core = Core::new(limits()).unwrap();
    let sid = core.open_session(1, 0).unwrap();
    let mem = core.register_memory(sid, OwnedFd::from(iommu_core::memfd::create("w", 1 << 30).unwrap())).unwrap();
    let ioas = core.ioas_alloc(sid).unwrap();
    let mut g = c.benchmark_group("walk");
    for (size, name, iova) in [(4096u64, "4K", 0x1000u64), (2 << 20, "2M", 2 << 20), (1 << 30, "1G", 1 << 30)] {
        let args = MapArgs { ioas, mem: mem.id, offset: 0, length: size, iova: Some(iova), perm: Perm::RW };
        let mut fx = Effects::default();
        core.map(sid, args, &mut fx).unwrap();
        core.release_tables(fx.garbage);
        let root = core.ioas_root(sid, ioas).unwrap();
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| black_box(walk(core.pool(sid).unwrap(), root, black_box(iova + 0x123)).unwrap()))
        });
    }
    g.bench_function("core_translate_4K", |b| b.iter(|| black_box(core.translate(sid, ioas, 0x1123).unwrap())));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = raw_unix_rtt, inproc, over_socket, walks
}
criterion_main!(benches);
