//! Load harness: vfio-user round trips against the test device, with the
//! machine's raw Unix-socket round trip measured in the same run as the
//! reference.
//!
//! `cargo bench -p vfio_user_server --bench vfio_user` prints, for each
//! operation, the best of 3 runs in operations per second and its time as
//! a multiple of the raw round trip. Every thread (client, server loop,
//! device threads, echo) runs on CPU 0, as a VMM and its device server
//! pinned together do (cross-CPU wake-ups would drown the rest); pass
//! `--no-pin` to let them spread.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{regs as eregs, DmaEngine};
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

/// Pins the calling thread, and the threads it starts from now on, to CPU 0.
fn pin_cpu0() {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes bit 0 of
    // it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

/// The reference: a 32-byte request and a 36-byte answer over a
/// socketpair to an echo thread (one read and one write each side, the
/// size of a 4-byte REGION_READ).
struct Echo {
    a: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn new() -> Echo {
        let (a, mut b) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 32];
            while b.read_exact(&mut buf).is_ok() {
                if b.write_all(&[0u8; 36]).is_err() {
                    break;
                }
            }
        });
        Echo { a, thread: Some(thread) }
    }

    /// Seconds per round trip of one run of `n`.
    fn rtt_once(&mut self, n: u64) -> f64 {
        let a = &mut self.a;
        let mut r = [0u8; 36];
        let t0 = Instant::now();
        for _ in 0..n {
            a.write_all(&[1u8; 32]).unwrap();
            a.read_exact(&mut r).unwrap();
        }
        t0.elapsed().as_secs_f64() / n as f64
    }

    /// Seconds per round trip, best of 3 runs of `n`.
    fn rtt(&mut self, n: u64) -> f64 {
        let a = &mut self.a;
        best(n, |n| {
            let mut r = [0u8; 36];
            for _ in 0..n {
                a.write_all(&[1u8; 32]).unwrap();
                a.read_exact(&mut r).unwrap();
            }
        })
        .as_secs_f64()
            / n as f64
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.a.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `f(k)` timed against the echo in alternating slices of `n / 10` round
/// trips, 30 slices each: the fastest slice of each (the machine's other
/// load comes and goes; both are measured under the same conditions).
/// Returns (time for `n` of `f`, echo seconds per round trip).
fn paired(echo: &mut Echo, n: u64, mut f: impl FnMut(u64)) -> (Duration, f64) {
    let k = (n / 10).max(1);
    let (mut tf, mut te) = (f64::MAX, f64::MAX);
    for _ in 0..30 {
        te = te.min(echo.rtt_once(k));
        let t0 = Instant::now();
        f(k);
        tf = tf.min(t0.elapsed().as_secs_f64() / k as f64);
    }
    (Duration::from_secs_f64(tf * n as f64), te)
}

/// Round trips per register access measured, each against the echo
/// round trip measured in slices alternating with it.
fn reg_rows(c: &mut Client, echo: &mut Echo, n: u64, name: &str, reads: &[u64], writes: &[(u64, u32)]) {
    let mut buf = [0u8; 4];
    let ratios = |label: &str, times: Vec<(u64, Duration, f64)>| {
        let r: Vec<f64> = times.iter().map(|(_, d, e)| d.as_secs_f64() / n as f64 / e).collect();
        let raw_s = times.iter().map(|t| t.2).sum::<f64>() / times.len() as f64;
        let (lo, hi) = r.iter().fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
        let worst = times.iter().zip(&r).max_by(|a, b| a.1.total_cmp(b.1)).map(|(t, _)| t.0).unwrap_or(0);
        let mean = r.iter().sum::<f64>() / r.len() as f64;
        println!(
            "{:<44} {:>12.0} {:>10.2} {:>10.2}   (registers: {}, each x its echo {lo:.2}..{hi:.2}, fastest of 30 alternating slices, worst at {worst:#x}; echo {:.2} us)",
            format!("{name} {label}"),
            1.0 / (mean * raw_s),
            mean * raw_s * 1e6,
            mean,
            r.len(),
            raw_s * 1e6
        );
    };
    let t = reads
        .iter()
        .map(|&off| {
            let (t, e) = paired(echo, n, |n| {
                for _ in 0..n {
                    c.region_read_into(0, off, &mut buf).unwrap();
                }
            });
            (off, t, e)
        })
        .collect();
    ratios("REGION_READ 4 B", t);
    let t = writes
        .iter()
        .map(|&(off, v)| {
            let (t, e) = paired(echo, n, |n| {
                for _ in 0..n {
                    c.region_write(0, off, &v.to_le_bytes()).unwrap();
                }
            });
            (off, t, e)
        })
        .collect();
    ratios("REGION_WRITE 4 B", t);
}

fn main() {
    // Under `cargo test --benches` libtest passes --bench only for real runs.
    let quick = !std::env::args().any(|a| a == "--bench");
    if !std::env::args().any(|a| a == "--no-pin") {
        pin_cpu0();
    }
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

    let mut echo = Echo::new();
    let n_rt = 20_000 / scale;
    let raw = Duration::from_secs_f64(echo.rtt(n_rt) * n_rt as f64);
    let raw_s0 = raw.as_secs_f64() / n_rt as f64;
    let nr = 10_000 / scale;
    println!("{:<44} {:>12} {:>10} {:>10}", "operation", "ops/s", "us/op", "x raw RTT");
    println!(
        "{:<44} {:>12.0} {:>10.2} {:>10.2}",
        "raw Unix-socket round trip (32 B / 36 B)",
        1.0 / raw_s0,
        raw_s0 * 1e6,
        1.0
    );
    let t_reads = [
        regs::ID,
        regs::SCRATCH,
        regs::DMA_SRC,
        regs::DMA_DST,
        regs::DMA_LEN,
        regs::DMA_PASID,
        regs::DMA_STATUS,
        regs::DMA_DONE,
        regs::DMA_ERRORS,
        regs::DOORBELL,
    ];
    let t_writes = [
        (regs::SCRATCH, 5),
        (regs::DMA_SRC, 0x1000),
        (regs::DMA_DST, 0x2000),
        (regs::DMA_LEN, 0),
        (regs::DMA_PASID, 0),
        (regs::DOORBELL, 1),
    ];
    reg_rows(&mut c, &mut echo, nr, "test-device", &t_reads, &t_writes);
    {
        let esock = dir.join("engine.sock");
        let esrv = server::spawn(Box::new(DmaEngine::new().unwrap()), Options::new(&esock, &core_path)).unwrap();
        let mut e = Client::connect(&esock).unwrap();
        e.enable_function().unwrap();
        let q0 = eregs::QUEUE;
        let q1 = eregs::QUEUE + eregs::QUEUE_STRIDE;
        // Device on; queue 1 enabled with an empty ring (its doorbell
        // written with its own value submits nothing); queue 0 off.
        e.region_write(0, eregs::CTRL, &1u32.to_le_bytes()).unwrap();
        e.region_write(0, q1 + eregs::Q_RING_BASE, &0x10_0000u32.to_le_bytes()).unwrap();
        e.region_write(0, q1 + eregs::Q_RING_SIZE, &16u32.to_le_bytes()).unwrap();
        e.region_write(0, q1 + eregs::Q_CTRL, &1u32.to_le_bytes()).unwrap();
        let mut reads = vec![
            eregs::ID,
            eregs::VERSION,
            eregs::NUM_QUEUES,
            eregs::MAX_XFER,
            eregs::CTRL,
            eregs::STATUS,
            eregs::INTX_STATUS,
        ];
        for r in [
            eregs::Q_RING_BASE,
            eregs::Q_RING_SIZE,
            eregs::Q_RING_PASID,
            eregs::Q_CTRL,
            eregs::Q_HEAD,
            eregs::Q_TAIL,
            eregs::Q_STATUS,
            eregs::Q_COMPLETED,
            eregs::Q_ERRORS,
        ] {
            reads.push(q0 + r);
        }
        let writes = [
            (eregs::CTRL, 1),
            (eregs::INTX_STATUS, 0),
            (q0 + eregs::Q_RING_BASE, 0x20_0000),
            (q0 + eregs::Q_RING_SIZE, 64),
            (q0 + eregs::Q_RING_PASID, 0),
            (q0 + eregs::Q_CTRL, 2),
            (q1 + eregs::Q_CTRL, 3),
            (q1 + eregs::Q_TAIL, 0),
        ];
        reg_rows(&mut e, &mut echo, nr, "dma-engine", &reads, &writes);
        drop(e);
        esrv.stop().unwrap();
    }

    let n = 20_000 / scale;
    let write = best(n, |n| {
        for i in 0..n {
            c.region_write(0, regs::SCRATCH, &(i as u32).to_le_bytes()).unwrap();
        }
    });
    let read = best(n, |n| {
        for _ in 0..n {
            c.region_read_into(0, regs::SCRATCH, &mut [0u8; 4]).unwrap();
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
    let row = |name: &str, d: Duration, n: u64, rts: f64| {
        let s = per(d, n);
        println!("{name:<44} {:>12.0} {:>10.2} {:>10.2}", 1.0 / s, s * 1e6, s / (raw_s * rts));
    };
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
