//! Load harness: the dma-engine end to end (descriptor submit through the
//! mmap-ed doorbell, DMA through the translation unit, completion record
//! polled in guest memory), against plain memcpy of the same sizes in the
//! same run.
//!
//! `cargo bench -p ioasid-stack --bench engine`

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use ioasid_stack::engine::{Doorbell, Engine, GuestRam};
use iommu_core::pagetable::Perm;
use iommu_core::types::MapArgs;
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{flag, op, status, Descriptor, DmaEngine};
use vfio_user_server::server::{self, Options};

const KIOVA: u64 = 0x1000_0000;
const DIOVA: u64 = 0x4000_0000;
const RING: u32 = 256;

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let dir = std::env::temp_dir().join(format!("ioasid-bench-engine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let core_sock = dir.join("core.sock");
    let dev_sock = dir.join("dev.sock");
    let core = iommu_core::server::spawn(&core_sock, iommu_core::types::Limits::default()).unwrap();
    let opts = Options::new(&dev_sock, &core_sock);
    let srv = server::spawn(Box::new(DmaEngine::new().unwrap()), opts).unwrap();

    let mut s = iommu_core::client::Client::session(&core_sock).unwrap();
    let gsize = 64u64 << 20;
    let kram = GuestRam::new("k", 1 << 20).unwrap();
    let g = GuestRam::new("g", gsize).unwrap();
    let mk = s.register_memory(kram.file.as_fd()).unwrap().id;
    let mg = s.register_memory(g.file.as_fd()).unwrap().id;
    let (k, a) = (s.ioas_alloc().unwrap(), s.ioas_alloc().unwrap());
    s.map(MapArgs { ioas: k, mem: mk, offset: 0, length: 1 << 20, iova: Some(KIOVA), perm: Perm::RW }).unwrap();
    s.map(MapArgs { ioas: a, mem: mg, offset: 0, length: gsize, iova: Some(DIOVA), perm: Perm::RW }).unwrap();
    // Touch guest RAM so page faults are not measured.
    g.write(0, &vec![1u8; gsize as usize]).unwrap();
    let (_, chan) = s.open_device_channel().unwrap();
    let mut c = Client::connect(&dev_sock).unwrap();
    c.ioasid_bind(chan.as_fd()).unwrap();
    c.ioasid_attach(None, k, false).unwrap();
    c.ioasid_attach(Some(5), a, false).unwrap();
    let mut eng = Engine::new(c).unwrap();
    let mut q = eng.setup_queue(0, RING, KIOVA, 0, KIOVA + 0x8_0000, 0x8_0000, None, false).unwrap();

    println!(
        "{:<26} {:>12} {:>14} {:>14} {:>12}",
        "descriptor size", "descr/s", "engine GiB/s", "memcpy GiB/s", "time ratio"
    );
    for (size, total) in [(64u32, 200_000u64), (4096, 100_000), (64 << 10, 8_000), (1 << 20, 600)] {
        let n = if quick { (total / 200).max(4) } else { total };
        let half = gsize / 2;
        let span = half.min(u64::from(size) * 256);
        let per_batch = (span / u64::from(size)).max(1) as u32;
        let run_engine = |eng: &mut Engine, q: &mut ioasid_stack::engine::Queue| {
            let t0 = Instant::now();
            let mut done = 0u64;
            let mut pending = std::collections::VecDeque::new();
            let mut i = 0u64;
            while done < n {
                while i < n && pending.len() < (RING as usize - 1) {
                    let off = (i % u64::from(per_batch)) * u64::from(size);
                    let d = Descriptor {
                        opcode: op::COPY,
                        flags: flag::PASID,
                        pasid: 5,
                        len: size,
                        src: DIOVA + off,
                        dst: DIOVA + half + off,
                        ..Default::default()
                    };
                    pending.push_back(eng.push(&kram, q, d).unwrap());
                    i += 1;
                }
                eng.ring(q, Doorbell::Mmap).unwrap();
                let slot = pending.pop_front().unwrap();
                let c = eng.wait(&kram, q, slot, Duration::from_secs(60)).unwrap();
                assert_eq!(c.status, status::SUCCESS);
                done += 1;
            }
            t0.elapsed()
        };
        let _warm = run_engine(&mut eng, &mut q);
        let te = (0..3).map(|_| run_engine(&mut eng, &mut q)).min().unwrap();
        // memcpy of the same sizes over the same span, same count.
        let src = vec![1u8; span as usize];
        let mut dst = vec![0u8; span as usize];
        let tm = (0..3)
            .map(|_| {
                let t0 = Instant::now();
                for i in 0..n {
                    let off = ((i % u64::from(per_batch)) * u64::from(size)) as usize;
                    dst[off..off + size as usize].copy_from_slice(&src[off..off + size as usize]);
                    std::hint::black_box(&mut dst);
                }
                t0.elapsed()
            })
            .min()
            .unwrap();
        let bytes = (n * u64::from(size)) as f64;
        let gib = |t: Duration| bytes / t.as_secs_f64() / f64::from(1u32 << 30);
        let name = match size {
            64 => "64 B".to_string(),
            s if s >= 1 << 20 => format!("{} MiB", s >> 20),
            s => format!("{} KiB", s >> 10),
        };
        println!(
            "{:<26} {:>12.0} {:>14.2} {:>14.2} {:>12.2}",
            name,
            n as f64 / te.as_secs_f64(),
            gib(te),
            gib(tm),
            te.as_secs_f64() / tm.as_secs_f64()
        );
    }
    println!("(time ratio: engine time / memcpy time for the same bytes; 1 queue, 1 vPASID, ring depth {})", RING - 1);
    reset_latency(&mut eng, &kram, quick);
    drop(eng);
    drop(s);
    srv.stop().unwrap();
    core.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// How long a reset takes to be answered while 16 MiB copies run (the
/// reset waits for each queue's DMA step in flight), against a config
/// space read round trip in the same run; min and median.
fn reset_latency(eng: &mut Engine, kram: &GuestRam, quick: bool) {
    use vfio_user_server::proto::region;
    let trials = if quick { 5 } else { 40 };
    let mid = |mut v: Vec<Duration>| {
        v.sort();
        (v[0], v[v.len() / 2])
    };
    let mut rtt = Vec::new();
    for _ in 0..trials {
        let t0 = Instant::now();
        eng.client.region_read(region::CONFIG, 0, 4).unwrap();
        rtt.push(t0.elapsed());
    }
    let mut resets = Vec::new();
    for i in 0..trials {
        eng.client.enable_function().unwrap();
        ioasid_stack::engine::write32(&mut eng.client, vfio_user_server::devices::dma_engine::regs::CTRL, 1).unwrap();
        let mut q = eng.setup_queue(0, RING, KIOVA, 0, KIOVA + 0x8_0000, 0x8_0000, None, false).unwrap();
        for k in 0..4u64 {
            let d = Descriptor {
                opcode: op::COPY,
                flags: flag::PASID,
                pasid: 5,
                len: 8 << 20,
                src: DIOVA + k * (8 << 20),
                dst: DIOVA + (32 << 20) + k * (8 << 20),
                ..Default::default()
            };
            eng.push(kram, &mut q, d).unwrap();
        }
        eng.ring(&q, Doorbell::Register).unwrap();
        // Let the first copy get going (at a different point each time).
        std::thread::sleep(Duration::from_micros(200 + 37 * i));
        let t0 = Instant::now();
        eng.client.reset().unwrap();
        resets.push(t0.elapsed());
    }
    let (rmin, rmed) = mid(rtt);
    let (smin, smed) = mid(resets);
    println!(
        "DEVICE_RESET with 8 MiB copies running: min {smin:?}, median {smed:?}; config read round trip: min {rmin:?}, median {rmed:?}; reset minus round trip (median): {:?}",
        smed.saturating_sub(rmed)
    );
}
