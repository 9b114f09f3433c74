//! Load harness: the dma-engine end to end (descriptor submit through the
//! mmap-ed doorbell, DMA through the translation unit, completion record
//! polled in guest memory), against plain memcpy of the same sizes in the
//! same run.
//!
//! The driver side costs no system call per descriptor: descriptors are
//! stored into the ring and completion records polled through a mapping
//! of the guest RAM that holds them, and the doorbell is a store into the
//! mapped BAR 2, as a guest driver does.
//!
//! `cargo bench -p ioasid-stack --bench engine`

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use ioasid_stack::engine::{Doorbell, Engine, GuestRam};
use iommu_core::shm::Words;
use vfio_user_server::devices::dma_engine::{
    flag, op, regs, status, Descriptor, DmaEngine, COMPLETION_SIZE, DESC_SIZE,
};
use vfio_user_server::server::{self, Options};

const KIOVA: u64 = 0x1000_0000;
const DIOVA: u64 = 0x4000_0000;
const RING: u32 = 256;
/// Where the completion records are, in the ring's RAM and as IOVA.
const COMP_OFF: u64 = 0x8_0000;

/// Queue 0 as a guest driver sees it: the ring and completion records
/// through a mapping of their RAM, the doorbell through BAR 2's mapping.
struct MappedQueue {
    ram: Words,
    bar2: Words,
    tail: u32,
}

impl MappedQueue {
    /// Stores `d` into the next slot (its record cleared and pointed at
    /// the slot's) without ringing; returns the slot.
    fn push(&mut self, mut d: Descriptor) -> u32 {
        let slot = self.tail % RING;
        let rec = COMP_OFF + u64::from(slot) * COMPLETION_SIZE as u64;
        d.completion = KIOVA + rec;
        for w in 0..(COMPLETION_SIZE as u64 / 8) {
            self.ram.u64(rec + w * 8).unwrap().store(0, Ordering::Relaxed);
        }
        let b = d.to_bytes();
        let at = u64::from(slot) * DESC_SIZE;
        for (w, c) in b.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(c.try_into().unwrap());
            self.ram.u64(at + w as u64 * 8).unwrap().store(v, Ordering::Relaxed);
        }
        self.tail = self.tail.wrapping_add(1);
        slot
    }

    /// Rings the doorbell with the tail (a store into BAR 2).
    fn ring(&self) {
        self.bar2.u32(0).unwrap().store(self.tail, Ordering::Release);
    }

    /// Spins until the record of `slot` has a status; returns it.
    fn wait(&self, slot: u32) -> u8 {
        let rec = COMP_OFF + u64::from(slot) * COMPLETION_SIZE as u64;
        let w = self.ram.u32(rec).unwrap();
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            let st = (w.load(Ordering::Acquire) & 0xff) as u8;
            if st != status::NONE {
                return st;
            }
            spins += 1;
            if spins.is_multiple_of(1024) {
                assert!(t0.elapsed() < Duration::from_secs(60), "slot {slot} never completed");
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
    }
}

/// Nanoseconds on a CPU of this process's thread named `name`, from its
/// schedstat (0 if there is none).
fn thread_cpu_ns(name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let st = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            return st.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    0
}

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

    let gsize = 64u64 << 20;
    let rig = ioasid_stack::engine::TwoSpaces::new(&core_sock, &dev_sock, gsize, KIOVA, DIOVA, 5).unwrap();
    let (s, kram, mut eng) = (rig.session, rig.kram, rig.engine);
    let _q = eng.setup_queue(0, RING, KIOVA, 0, KIOVA + COMP_OFF, COMP_OFF, None, false).unwrap();
    let bar2 = {
        let r = eng.client.region_info(2).unwrap();
        Words::map_at(&std::fs::File::from(r.fd.unwrap()), r.info.offset, 4096).unwrap()
    };
    let head = eng.queue_reg(0, regs::Q_HEAD).unwrap();
    let mut mq = MappedQueue { ram: Words::map(&kram.file, 1 << 20).unwrap(), bar2, tail: head };

    println!(
        "{:<26} {:>12} {:>14} {:>14} {:>12} {:>16}",
        "descriptor size", "descr/s", "engine GiB/s", "memcpy GiB/s", "time ratio", "queue CPU us/d"
    );
    for (size, total) in [(64u32, 200_000u64), (4096, 100_000), (64 << 10, 8_000), (1 << 20, 600)] {
        let n = if quick { (total / 200).max(4) } else { total };
        let half = gsize / 2;
        let span = half.min(u64::from(size) * 256);
        let per_batch = (span / u64::from(size)).max(1) as u32;
        let run_engine = |q: &mut MappedQueue| {
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
                    pending.push_back(q.push(d));
                    i += 1;
                }
                q.ring();
                let slot = pending.pop_front().unwrap();
                assert_eq!(q.wait(slot), status::SUCCESS);
                done += 1;
            }
            t0.elapsed()
        };
        let _warm = run_engine(&mut mq);
        let cpu0 = thread_cpu_ns("dma-engine-q0");
        let te = (0..3).map(|_| run_engine(&mut mq)).min().unwrap();
        // What the queue's thread spent per descriptor: the rate it could
        // keep with a CPU of its own.
        let q_cpu = (thread_cpu_ns("dma-engine-q0") - cpu0) as f64 * 1e-9 / (3 * n) as f64;
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
            "{:<26} {:>12.0} {:>14.2} {:>14.2} {:>12.2} {:>16.3}",
            name,
            n as f64 / te.as_secs_f64(),
            gib(te),
            gib(tm),
            te.as_secs_f64() / tm.as_secs_f64(),
            q_cpu * 1e6
        );
    }
    println!(
        "(time ratio: engine time / memcpy time for the same bytes; 1 queue, 1 vPASID, ring depth {}; \
         queue CPU: the queue thread's CPU time per descriptor, polling included)",
        RING - 1
    );
    idle_cost(&mut eng, quick);
    reset_latency(&mut eng, &kram, quick);
    drop(eng);
    drop(s);
    srv.stop().unwrap();
    core.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What each queue thread costs while its queue is enabled and idle (its
/// doorbell polled, as one written through a mapping is not trapped):
/// the share of a CPU each used over 10 s.
fn idle_cost(eng: &mut Engine, quick: bool) {
    for q in 1..4u64 {
        eng.setup_queue(
            q as usize,
            RING,
            KIOVA + q * 0x4000,
            q * 0x4000,
            KIOVA + COMP_OFF + q * 0x2000,
            COMP_OFF + q * 0x2000,
            None,
            false,
        )
        .unwrap();
    }
    // Past the polling that follows work.
    std::thread::sleep(Duration::from_millis(200));
    let names: Vec<String> = (0..4).map(|q| format!("dma-engine-q{q}")).collect();
    let before: Vec<u64> = names.iter().map(|n| thread_cpu_ns(n)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(if quick { 1 } else { 10 }));
    let wall = t0.elapsed().as_secs_f64();
    let share: Vec<String> = names
        .iter()
        .zip(&before)
        .map(|(n, b)| format!("{:.3}%", (thread_cpu_ns(n) - b) as f64 * 1e-9 / wall * 100.0))
        .collect();
    println!("idle enabled queues over {wall:.1} s, CPU per queue thread: {}", share.join(" "));
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
        let mut q = eng.setup_queue(0, RING, KIOVA, 0, KIOVA + COMP_OFF, COMP_OFF, None, false).unwrap();
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
