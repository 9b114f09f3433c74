//! The core over its socket, as a separate `iommu-core` process (the
//! release binary of this build):
//!
//! - 10^6 mappings of 4 KiB made with batched map requests
//!   ([`Client::map_batch`], 4,096 per request), and unmapped again with
//!   batched unmaps; the time of each, and the core's memory per mapping
//!   (its anonymous resident memory before and after, the page tables
//!   aside: those live in the table pool, counted apart);
//! - client and core pinned to CPU 0: a map+unmap pair of 4 KiB (one
//!   request each) in raw-echo round trips, the echo (one `recv` and one
//!   `send` on a Unix socket) measured in the same run.
//!
//! Run: `cargo bench -p iommu_core --bench batch` (prints the figures).

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use iommu_core::client::Client;
use iommu_core::model::BATCH_ENTRIES;
use iommu_core::types::{MapArgs, MapEntry, Perm, UnmapEntry};

const MAPPINGS: u64 = 1_000_000;
const PAGE: u64 = 4096;
const PAIRS: u32 = 20_000;
const ECHOES: u32 = 50_000;

struct Core {
    child: Child,
    dir: PathBuf,
}

impl Core {
    fn start(name: &str) -> Core {
        let dir = std::env::temp_dir().join(format!("ioasid-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("core.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_iommu-core"))
            .arg("--socket")
            .arg(&sock)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let start = Instant::now();
        while Client::observer(&sock).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "the core did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Core { child, dir }
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("core.sock")
    }

    /// A field of `/proc/PID/status`, in KiB.
    fn status_kib(&self, field: &str) -> u64 {
        status_kib(Path::new(&format!("/proc/{}/status", self.child.id())), field)
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn status_kib(path: &Path, field: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Pins this thread, and so the threads and processes it starts, to CPU 0.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(0, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(r, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

fn batched() {
    let core = Core::start("batch");
    let mut s = Client::session(core.sock()).unwrap();
    let mem = iommu_core::memfd::create("batch", 2 << 20).unwrap();
    let m = s.register_memory(&mem).unwrap();
    let ioas = s.ioas_alloc().unwrap();
    let base = 1u64 << 32;
    let entries: Vec<MapEntry> = (0..MAPPINGS)
        .map(|i| MapEntry {
            mem: m.id,
            offset: (i % 512) * PAGE,
            length: PAGE,
            iova: Some(base + i * PAGE),
            perm: Perm::RW,
        })
        .collect();
    let anon0 = core.status_kib("RssAnon:");
    let shmem0 = core.status_kib("RssShmem:");
    let t = Instant::now();
    let mut n = 0;
    for chunk in entries.chunks(BATCH_ENTRIES) {
        n += s.map_batch(ioas, chunk).unwrap().len();
    }
    let map_time = t.elapsed();
    assert_eq!(n as u64, MAPPINGS);
    let anon1 = core.status_kib("RssAnon:");
    let shmem1 = core.status_kib("RssShmem:");
    let snap = s.status().unwrap();
    let tables = snap.sessions[0].ioas.iter().find(|i| i.id == ioas).unwrap().tables;
    let ranges: Vec<UnmapEntry> = (0..MAPPINGS).map(|i| UnmapEntry { iova: base + i * PAGE, length: PAGE }).collect();
    let t = Instant::now();
    let mut bytes = 0;
    for chunk in ranges.chunks(BATCH_ENTRIES) {
        bytes += s.unmap_batch(ioas, chunk).unwrap();
    }
    let unmap_time = t.elapsed();
    assert_eq!(bytes, MAPPINGS * PAGE);
    println!(
        "batched map of {MAPPINGS} x 4 KiB over the socket ({} per request): {:.3} s ({:.0} ns per mapping)",
        BATCH_ENTRIES,
        map_time.as_secs_f64(),
        map_time.as_nanos() as f64 / MAPPINGS as f64
    );
    println!(
        "batched unmap of the same: {:.3} s ({:.0} ns per mapping)",
        unmap_time.as_secs_f64(),
        unmap_time.as_nanos() as f64 / MAPPINGS as f64
    );
    println!(
        "core memory: anonymous RSS +{} KiB for {MAPPINGS} mappings = {:.1} bytes per mapping; \
         page tables: {tables} tables ({} KiB; shared-memory RSS +{} KiB)",
        anon1 - anon0,
        (anon1 - anon0) as f64 * 1024.0 / MAPPINGS as f64,
        u64::from(tables) * 4,
        shmem1 - shmem0
    );
}

/// A raw echo: one `recv` and one `send` per round trip, on a thread.
fn echo_round_trip() -> Duration {
    let (mut a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut b = b;
        let mut buf = [0u8; 64];
        loop {
            match b.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => b.write_all(&buf[..n]).unwrap(),
            }
        }
    });
    let msg = [7u8; 32];
    let mut buf = [0u8; 32];
    for _ in 0..1000 {
        a.write_all(&msg).unwrap();
        a.read_exact(&mut buf).unwrap();
    }
    let start = Instant::now();
    for _ in 0..ECHOES {
        a.write_all(&msg).unwrap();
        a.read_exact(&mut buf).unwrap();
    }
    let per = start.elapsed() / ECHOES;
    drop(a);
    t.join().unwrap();
    per
}

fn pinned_pairs() {
    pin_to_cpu0();
    let core = Core::start("pairs");
    let mut s = Client::session(core.sock()).unwrap();
    let mem = iommu_core::memfd::create("pairs", 2 << 20).unwrap();
    let m = s.register_memory(&mem).unwrap();
    let ioas = s.ioas_alloc().unwrap();
    let args = MapArgs { ioas, mem: m.id, offset: 0, length: PAGE, iova: Some(1 << 30), perm: Perm::RW };
    for _ in 0..1000 {
        let iova = s.map(args).unwrap();
        s.unmap(ioas, iova, PAGE).unwrap();
    }
    let echo_before = echo_round_trip();
    let start = Instant::now();
    for _ in 0..PAIRS {
        let iova = s.map(args).unwrap();
        s.unmap(ioas, iova, PAGE).unwrap();
    }
    let pair = start.elapsed() / PAIRS;
    let echo_after = echo_round_trip();
    let echo = (echo_before + echo_after) / 2;
    println!(
        "pinned to CPU 0: echo round trip {:.2} us (before {:.2}, after {:.2}); map+unmap 4 KiB pair {:.2} us = {:.2} echo round trips",
        echo.as_nanos() as f64 / 1000.0,
        echo_before.as_nanos() as f64 / 1000.0,
        echo_after.as_nanos() as f64 / 1000.0,
        pair.as_nanos() as f64 / 1000.0,
        pair.as_nanos() as f64 / echo.as_nanos() as f64
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it too:
    // then only the quick pinned part, shortened.
    if std::env::args().any(|a| a == "--bench") {
        batched();
    }
    pinned_pairs();
}
