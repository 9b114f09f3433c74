//! DMA_MAP + DMA_UNMAP of a 2 MiB memfd through the vfio-user server, with
//! the core, the server and the client in this process, pinned to CPU 0,
//! beside a raw Unix-socket echo (one `recv` and one `send`) measured in
//! the same run. Prints microseconds per pair and echo round trips per
//! pair. `PAIRS=n` sets the number of pairs (for `strace -f -c`: the
//! syscalls per pair are the counts divided by n, setup aside).
//!
//! Run: `cargo bench -p vfio_user_server --bench dma_pair`.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vfio_user_server::client::Client;
use vfio_user_server::devices::testdev::TestDevice;
use vfio_user_server::proto;
use vfio_user_server::server::{self, Options};

/// Pins this thread, and the threads it starts, to CPU 0.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(0, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(r, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

fn echo_round_trip(n: u32) -> Duration {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            match b.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(k) => b.write_all(&buf[..k]).unwrap(),
            }
        }
    });
    let mut r = [0u8; 32];
    let start = Instant::now();
    for _ in 0..n {
        a.write_all(&[1u8; 32]).unwrap();
        a.read_exact(&mut r).unwrap();
    }
    let per = start.elapsed() / n;
    drop(a);
    t.join().unwrap();
    per
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let pairs: u32 = std::env::var("PAIRS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 50 } else { 5000 });
    pin_to_cpu0();
    let dir = std::env::temp_dir().join(format!("vus-dma-pair-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let core_path = dir.join("core.sock");
    let core = iommu_core::server::spawn(&core_path, iommu_core::types::Limits::default()).unwrap();
    let sock = dir.join("dev.sock");
    let srv = server::spawn(Box::new(TestDevice::new().unwrap()), Options::new(&sock, &core_path)).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    c.enable_function().unwrap();
    let mem = iommu_core::memfd::create("bench", 2 << 20).unwrap();
    let rw = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;
    let mut pair = || {
        c.dma_map(rw, 0, 0x20_0000, 2 << 20, Some(mem.as_fd())).unwrap();
        c.dma_unmap(0x20_0000, 2 << 20, 0).unwrap();
    };
    for _ in 0..pairs.min(200) {
        pair();
    }
    let echo_before = echo_round_trip(pairs * 4);
    let start = Instant::now();
    for _ in 0..pairs {
        pair();
    }
    let per = start.elapsed() / pairs;
    let echo = (echo_before + echo_round_trip(pairs * 4)) / 2;
    println!(
        "pinned to CPU 0: DMA_MAP+DMA_UNMAP 2 MiB memfd {:.2} us per pair; echo round trip {:.2} us; {:.2} echo round trips per pair ({pairs} pairs)",
        per.as_nanos() as f64 / 1000.0,
        echo.as_nanos() as f64 / 1000.0,
        per.as_nanos() as f64 / echo.as_nanos() as f64
    );
    drop(c);
    srv.stop().unwrap();
    core.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
