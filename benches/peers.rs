//! What misbehaving peers cost the core: the resident memory of a real
//! `iommu-core` (release build) before and after N peers that each start a
//! 1 MiB frame and never finish it, then N observers that each ask for a
//! large `Status` and never read it. Run with
//! `cargo bench --bench peers` (N = 2000; `IOASID_PEERS` to change it).

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iommu_core::client::Client;
use iommu_core::types::{MapArgs, Perm};
use iommu_core::wire::{self, Request, Role};

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn hello(role: Role) -> Vec<u8> {
    wire::encode(1, &Request::Hello { magic: wire::MAGIC, major: wire::VERSION_MAJOR, minor: 0, role }, 0)
        .expect("encode hello")
}

fn main() {
    let n: usize = std::env::var("IOASID_PEERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let dir = std::env::temp_dir().join(format!("ioasid-bench-peers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sock = dir.join("core.sock");
    let exe = std::env::current_exe().expect("bench path");
    let core_bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("iommu-core")).expect("target dir");
    let mut core = Command::new(&core_bin)
        .arg("--socket")
        .arg(&sock)
        .args(["--peer-stall-ms", "600000", "--max-connections", &(2 * n + 16).to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {} (cargo build --release first): {e}", core_bin.display()));
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the core did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = core.id();
    let mut s = Client::session(&sock).expect("session");
    let ram = iommu_core::memfd::create("ram", 1 << 20).expect("memfd");
    let m = s.register_memory(&ram).expect("register");
    let ioas = s.ioas_alloc().expect("ioas");
    for i in 0..100_000u64 {
        let iova = Some(0x1000_0000 + i * 0x2000);
        s.map(MapArgs { ioas, mem: m.id, offset: (i % 256) * 4096, length: 4096, iova, perm: Perm::R }).expect("map");
    }
    let status_bytes = wire::encode(0, &s.status().expect("status"), 0).map(|b| b.len()).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(200));
    let base = rss_kib(pid);
    println!("core RSS with one session of 100,000 mappings: {} MiB", base / 1024);

    let mut slow = Vec::new();
    for _ in 0..n {
        let mut c = UnixStream::connect(&sock).expect("connect");
        c.write_all(&hello(Role::Session)).expect("hello");
        let mut partial = (1u32 << 20).to_le_bytes().to_vec();
        partial.extend_from_slice(&[0u8; 4]);
        partial.extend(std::iter::repeat_n(0u8, 200 << 10));
        // The core stops reading: what it does not take stays in the socket.
        c.set_nonblocking(true).expect("nonblocking");
        let _ = c.write(&partial);
        slow.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after_slow = rss_kib(pid);
    println!(
        "{n} peers each starting a 1 MiB frame: +{} MiB (core RSS {} MiB)",
        after_slow.saturating_sub(base) / 1024,
        after_slow / 1024
    );
    drop(slow);
    std::thread::sleep(Duration::from_millis(500));
    let base = rss_kib(pid);
    let mut hoarders = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        let mut c = UnixStream::connect(&sock).expect("connect");
        c.write_all(&hello(Role::Observer)).expect("hello");
        c.write_all(&wire::encode(2, &Request::Status, 0).expect("encode")).expect("status");
        hoarders.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut o = Client::observer(&sock).expect("observer");
    if o.status().is_err() {
        refused += 1;
    }
    let after_hoard = rss_kib(pid);
    println!(
        "{n} observers asking for a Status ({status_bytes} bytes with all its pages) and never reading: +{} MiB \
         (core RSS {} MiB); a reading observer's Status refused meanwhile: {}",
        after_hoard.saturating_sub(base) / 1024,
        after_hoard / 1024,
        refused == 1
    );
    drop(hoarders);
    let _ = core.kill();
    let _ = core.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
