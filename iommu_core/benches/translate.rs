//! Translation-unit benches: IOTLB-hit and cold translations, DMA copy
//! throughput through translation against plain memcpy of the same sizes,
//! and unmap latency with 1 and 4 device servers attached. After the
//! criterion groups, one table: the unit's direct copy between two ranges
//! of a memory object ÷ `memmove` of the same bytes in a mapping of the
//! same file, measured interleaved in the same run.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, BenchmarkId, Criterion, Throughput};
use iommu_core::client::Client;
use iommu_core::device::Channel;
use iommu_core::tu::{self, At, TranslationUnit};
use iommu_core::types::*;

struct Rig {
    _srv: iommu_core::server::Running,
    s: Client,
    mem: u32,
    ioas: u32,
    _file: std::fs::File,
}

fn rig(name: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("ioasid-bench-tu-{}-{name}", std::process::id()));
    let path = dir.join("core.sock");
    let srv = iommu_core::server::spawn(&path, Limits { table_pool_bytes: 64 << 20, ..Limits::default() }).unwrap();
    let mut s = Client::session(&path).unwrap();
    let file = iommu_core::memfd::create("bench", 8 << 20).unwrap();
    file.write_all_at(&[1], (8 << 20) - 1).unwrap();
    let mem = s.register_memory(&file).unwrap().id;
    let ioas = s.ioas_alloc().unwrap();
    Rig { _srv: srv, s, mem, ioas, _file: file }
}

fn device(r: &mut Rig, cfg: tu::Config) -> (Arc<TranslationUnit>, u32) {
    let (_, fd) = r.s.open_device_channel().unwrap();
    let tu = TranslationUnit::new(Arc::new(Channel::new(fd).unwrap()), cfg).unwrap();
    let caps = DeviceCaps { pasid_width: 20, pri: false, dirty_tracking: false };
    let d = tu.bind(BindArgs { name: "bench".into(), pci_address: "0000:00:04.0".into(), caps }).unwrap().dev_id;
    tu.channel().attach(d, None, r.ioas).unwrap();
    (tu, d)
}

fn translate(c: &mut Criterion) {
    let mut r = rig("xlate");
    r.s.map(MapArgs { ioas: r.ioas, mem: r.mem, offset: 0, length: 8 << 20, iova: Some(0x100_0000), perm: Perm::RW })
        .unwrap();
    // 4 KiB leaves (the object's offset is not 2 MiB aligned): a walk
    // there reads all four levels.
    r.s.map(MapArgs {
        ioas: r.ioas,
        mem: r.mem,
        offset: 0x1000,
        length: 1 << 20,
        iova: Some(0x800_0000),
        perm: Perm::RW,
    })
    .unwrap();
    let (hot, d) = device(&mut r, tu::Config::default());
    // One IOTLB entry and two pages used in turn: every access walks.
    let (cold, dc) = device(&mut r, tu::Config { iotlb_entries: 1, ..tu::Config::default() });
    let mut g = c.benchmark_group("translate");
    // A whole access that only translates (the DMA guard, the thread's
    // IOTLB, the rights and the memory object), no byte copied.
    g.bench_function("iotlb_hit", |b| b.iter(|| hot.check(d, 0, black_box(0x100_0040), 64, Perm::R).unwrap()));
    let mut flip = 0u64;
    g.bench_function("cold_walk_4level", |b| {
        b.iter(|| {
            flip ^= 0x2_0000;
            cold.check(dc, 0, black_box(0x800_0040 + flip), 64, Perm::R).unwrap()
        })
    });
    let mut w = [0u8; 8];
    g.bench_function("read_8B_hit", |b| b.iter(|| hot.read(d, 0, black_box(0x100_0040), black_box(&mut w)).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("dma_copy");
    for (size, name) in [(4096usize, "4K"), (64 << 10, "64K"), (1 << 20, "1M")] {
        let src = vec![0x5au8; size];
        let mut dst = vec![0u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::new("tu_write", name), |b| {
            b.iter(|| hot.write(d, 0, 0x100_0000, black_box(&src)).unwrap())
        });
        g.bench_function(BenchmarkId::new("tu_read", name), |b| {
            b.iter(|| hot.read(d, 0, 0x100_0000, black_box(&mut dst)).unwrap())
        });
        g.bench_function(BenchmarkId::new("memcpy", name), |b| {
            b.iter(|| black_box(&mut dst).copy_from_slice(black_box(&src)))
        });
        g.bench_function(BenchmarkId::new("tu_copy", name), |b| {
            b.iter(|| hot.copy(at(d, 0x100_0000), at(d, 0x140_0000), black_box(size)).unwrap())
        });
    }
    g.finish();
}

fn at(dev: u32, iova: u64) -> At {
    At { dev, pasid: 0, iova }
}

/// Median nanoseconds per call of `f` over `rounds` rounds of `n` calls.
fn per_call(rounds: &mut Vec<f64>, n: u32, mut f: impl FnMut()) {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    rounds.push(t.elapsed().as_nanos() as f64 / f64::from(n));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The unit's copy between two ranges of an 8 MiB memory object (2 MiB
/// leaves) ÷ `memmove` between the same ranges of the same file mapped
/// here, rounds of each interleaved; printed as throughput ratios.
fn copy_ratio() {
    let mut r = rig("ratio");
    r.s.map(MapArgs { ioas: r.ioas, mem: r.mem, offset: 0, length: 8 << 20, iova: Some(0x100_0000), perm: Perm::RW })
        .unwrap();
    let (tu, d) = device(&mut r, tu::Config::default());
    // SAFETY: a shared mapping of the bench's own memfd, which nothing
    // shrinks; only this thread and the unit's copies on this thread touch
    // it, never at once.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&r._file) }.unwrap();
    println!("\nDMA copy through the translation unit ÷ memmove of the same bytes (median of 15 interleaved rounds)");
    println!("{:>6}  {:>12}  {:>12}  {:>8}", "size", "tu copy ns", "memmove ns", "ratio");
    for size in [4usize << 10, 64 << 10, 1 << 20] {
        let n = u32::try_from((64u64 << 20) / size as u64).unwrap().clamp(50, 20_000);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            per_call(&mut a, n, || tu.copy(at(d, 0x100_0000), at(d, 0x140_0000), black_box(size)).unwrap());
            per_call(&mut b, n, || black_box(&mut map[..]).copy_within(0..black_box(size), 4 << 20));
        }
        let (t, m) = (median(a), median(b));
        println!("{:>5}K  {:>12.1}  {:>12.1}  {:>8.3}", size >> 10, t, m, m / t);
    }
}

fn unmap_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmap_with_devices");
    for n in [0usize, 1, 4] {
        let mut r = rig(&format!("unmap{n}"));
        let devs: Vec<_> = (0..n).map(|_| device(&mut r, tu::Config::default())).collect();
        let (ioas, mem) = (r.ioas, r.mem);
        g.bench_function(BenchmarkId::from_parameter(format!("{n}_servers")), |b| {
            b.iter(|| {
                let args = MapArgs { ioas, mem, offset: 0, length: 4096, iova: Some(0x1000), perm: Perm::RW };
                r.s.map(args).unwrap();
                r.s.unmap(ioas, 0x1000, 4096).unwrap();
            })
        });
        drop(devs);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = translate, unmap_latency
}
fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    benches();
    if filter.as_deref().is_none_or(|f| "copy_ratio".contains(f) || f.contains("copy_ratio")) {
        copy_ratio();
    }
    Criterion::default().configure_from_args().final_summary();
}
