//! Fairness under an expensive flood: one session maps and unmaps 64 GiB
//! in 4 KiB leaves (16 Mi leaves a map) over and over on a real
//! `iommu-core` (release build), while another session measures its own
//! 1 MiB map+unmap round trips; the same round trips are measured with the
//! core idle first. The core and the measuring session share CPU 0. Three
//! runs; prints p50 and p99 of each and their ratio.
//! `cargo bench --bench flood` (`IOASID_FLOOD_TRIPS` round trips a run).

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommu_core::client::Client;
use iommu_core::types::{MapArgs, Perm};

fn pin(pid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // inside it; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn round_trips(c: &mut Client, ioas: u32, mem: u32, n: usize) -> Vec<Duration> {
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        let args = MapArgs { ioas, mem, offset: 0, length: 1 << 20, iova: None, perm: Perm::RW };
        let iova = c.map(args).expect("map");
        c.unmap(ioas, iova, 1 << 20).expect("unmap");
        t.push(s.elapsed());
    }
    t.sort();
    t
}

fn pct(t: &[Duration], p: usize) -> Duration {
    t[(t.len() * p / 100).min(t.len() - 1)]
}

fn run(core_bin: &std::path::Path, trips: usize) -> (Duration, Duration, Duration, Duration, u64) {
    let dir = std::env::temp_dir().join(format!("ioasid-bench-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sock = dir.join("core.sock");
    let mut core = Command::new(core_bin).arg("--socket").arg(&sock).stderr(Stdio::null()).spawn().expect("core");
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the core did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    pin(core.id() as i32, 0);
    pin(0, 0);
    let mut me = Client::session(&sock).expect("session");
    let ram = iommu_core::memfd::create("ram", 1 << 20).expect("memfd");
    let m = me.register_memory(&ram).expect("register").id;
    let ioas = me.ioas_alloc().expect("ioas");
    round_trips(&mut me, ioas, m, 50);
    let idle = round_trips(&mut me, ioas, m, trips);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || {
            pin(0, 1);
            let mut s = Client::session(&sock).expect("flood session");
            let big = iommu_core::memfd::create("big", (64 << 30) + 4096).expect("memfd");
            let m = s.register_memory(&big).expect("register").id;
            let ioas = s.ioas_alloc().expect("ioas");
            let mut maps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let args =
                    MapArgs { ioas, mem: m, offset: 4096, length: 64 << 30, iova: Some(1 << 36), perm: Perm::RW };
                s.map(args).expect("flood map");
                s.unmap(ioas, 0, u64::MAX).expect("flood unmap");
                maps += 1;
            }
            maps
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let busy = round_trips(&mut me, ioas, m, trips);
    stop.store(true, Ordering::Relaxed);
    let maps = flood.join().expect("flood thread");
    let _ = core.kill();
    let _ = core.wait();
    let _ = std::fs::remove_dir_all(&dir);
    (pct(&idle, 50), pct(&idle, 99), pct(&busy, 50), pct(&busy, 99), maps)
}

fn main() {
    let trips: usize = std::env::var("IOASID_FLOOD_TRIPS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let exe = std::env::current_exe().expect("bench path");
    let core_bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("iommu-core")).expect("target dir");
    assert!(core_bin.exists(), "build the core first: cargo build --release -p iommu_core");
    let (mut r50, mut r99) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let (ip50, ip99, bp50, bp99, maps) = run(&core_bin, trips);
        r50.push(bp50.as_secs_f64() / ip50.as_secs_f64());
        r99.push(bp99.as_secs_f64() / ip99.as_secs_f64());
        println!(
            "run {i}: idle p50 {ip50:?} p99 {ip99:?}; under the flood ({maps} maps of 64 GiB) p50 {bp50:?} p99 {bp99:?}"
        );
    }
    r50.sort_by(f64::total_cmp);
    r99.sort_by(f64::total_cmp);
    println!(
        "under the flood / idle: p50 min {:.1}x median {:.1}x; p99 min {:.1}x median {:.1}x",
        r50[0], r50[1], r99[0], r99[1]
    );
}
