//! Load harness: vfio-user round trips against the test device, with the
//! machine's raw Unix-socket round trip measured in the same run as the
//! reference.
//!
//! `cargo bench -p vfio_user_server --bench vfio_user` prints, for each
//! operation, the best of 3 runs in operations per second and its time as
//! a multiple of the raw round trip.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vfio_user_server::client::Client;
use vfio_user_server::devices::testdev::{regs, TestDevice};
use vfio_user_server::proto;
use vfio_user_server::server::{self, Options};

fn best<F: FnMut(u64)>(n: u64, mut f: F) -> Duration {
    (0..3)
        .map(|_| {
            let t0 = Instant::now();
            f(n);
            t0.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    // Under `cargo test --benches` libtest passes --bench only for real runs.
    let quick = !std::env::args().any(|a| a == "--bench");
    let scale = if quick { 100 } else { 1 };
    let dir = std::env::temp_dir().join(format!("vus-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let core_path = dir.join("core.sock");
    let core = iommu_core::server::spawn(&core_path, iommu_core::types::Limits::default()).unwrap();
    let sock = dir.join("dev.sock");
    let opts = Options::new(&sock, &core_path);
    let srv = server::spawn(Box::new(TestDevice::new().unwrap()), opts).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    c.enable_function().unwrap();

    // Reference: a 32-byte request and a 36-byte answer over a socketpair
    // to an echo thread (the size of a 4-byte REGION_READ).
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 32];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&[0u8; 36]).is_err() {
                break;
            }
        }
    });
    let n_rt = 20_000 / scale;
    let raw = best(n_rt, |n| {
        let mut r = [0u8; 36];
        for _ in 0..n {
            a.write_all(&[1u8; 32]).unwrap();
            a.read_exact(&mut r).unwrap();
        }
    });
    drop(a);
    let _ = echo.join();

    let n = 20_000 / scale;
    let write = best(n, |n| {
        for i in 0..n {
            c.region_write(0, regs::SCRATCH, &(i as u32).to_le_bytes()).unwrap();
        }
    });
    let read = best(n, |n| {
        for _ in 0..n {
            c.region_read(0, regs::SCRATCH, 4).unwrap();
        }
    });
    let posted = best(n, |n| {
        for _ in 0..n {
            c.region_write_posted(0, regs::DOORBELL, &1u32.to_le_bytes()).unwrap();
        }
        c.region_read(0, regs::DOORBELL, 4).unwrap();
    });
    let cfg = best(n / 4, |n| {
        for _ in 0..n {
            c.region_read(proto::region::CONFIG, 0, 4096).unwrap();
        }
    });
    let mem = iommu_core::memfd::create("bench", 1 << 21).unwrap();
    let rw = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;
    let nm = 5_000 / scale;
    let map4k = best(nm, |n| {
        for _ in 0..n {
            c.dma_map(rw, 0, 0x10_0000, 4096, Some(mem.as_fd())).unwrap();
            c.dma_unmap(0x10_0000, 4096, 0).unwrap();
        }
    });
    let map2m = best(nm, |n| {
        for _ in 0..n {
            c.dma_map(rw, 0, 0x20_0000, 1 << 21, Some(mem.as_fd())).unwrap();
            c.dma_unmap(0x20_0000, 1 << 21, 0).unwrap();
        }
    });

    let per = |d: Duration, n: u64| d.as_secs_f64() / n as f64;
    let raw_s = per(raw, n_rt);
    println!("{:<44} {:>12} {:>10} {:>10}", "operation", "ops/s", "us/op", "x raw RTT");
    let row = |name: &str, d: Duration, n: u64, rts: f64| {
        let s = per(d, n);
        println!("{name:<44} {:>12.0} {:>10.2} {:>10.2}", 1.0 / s, s * 1e6, s / (raw_s * rts));
    };
    row("raw Unix-socket round trip (32 B / 36 B)", raw, n_rt, 1.0);
    row("REGION_WRITE 4 B (round trip)", write, n, 1.0);
    row("REGION_READ 4 B (round trip)", read, n, 1.0);
    row("REGION_WRITE 4 B posted (NO_REPLY)", posted, n, 1.0);
    row("REGION_READ 4 KiB of config space", cfg, n / 4, 1.0);
    row("DMA_MAP+DMA_UNMAP 4 KiB (2 round trips)", map4k, nm, 2.0);
    row("DMA_MAP+DMA_UNMAP 2 MiB (2 round trips)", map2m, nm, 2.0);
    println!("(last column: time per op / (raw round trip x round trips per op))");
    drop(c);
    srv.stop().unwrap();
    core.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
