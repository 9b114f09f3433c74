//! The three figures of the file system (issue 18), on a real mount of a
//! real core (`iommu_core::server::spawn`, its own threads):
//!
//! 1. `cat` of one IOAS's `mappings` (10,000 lines) while another session
//!    maps and unmaps 4 KiB in a loop: p50 and max of 100 runs of the
//!    `cat` binary (fork and exec included), and the same without churn;
//! 2. a tree of 1,000 IOASes and 100,000 mappings: every file read;
//! 3. the same tree: `ls -R`.
//!
//! `cargo bench -p fuse_fs --bench tree` (needs root and /dev/fuse); the
//! goals are printed beside each figure. Without `--bench` (as `cargo
//! test --benches` runs it) it does the same on a small tree, as a smoke
//! test.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommu_core::client::Client;
use iommu_core::pagetable::Perm;
use iommu_core::types::{Limits, MapArgs};

fn read_all(p: &Path, files: &mut u64, bytes: &mut u64) {
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            read_all(&e.path(), files, bytes);
        } else if ft.is_file() {
            *bytes += std::fs::read(e.path()).unwrap().len() as u64;
            *files += 1;
        }
    }
}

/// A core with a mount of it, in a directory of its own.
struct Setup {
    dir: PathBuf,
    mnt: PathBuf,
    sock: PathBuf,
    core: Option<iommu_core::server::Running>,
    fs: Option<fuse_fs::fs::Mount>,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("ioasid-fs-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let sock = dir.join("core.sock");
        let core = iommu_core::server::spawn(&sock, Limits::default()).unwrap();
        Setup { dir, mnt, sock, core: Some(core), fs: None }
    }

    fn mount(&mut self) {
        self.fs = Some(fuse_fs::fs::mount(&self.sock, &self.mnt).expect("mount (needs root and /dev/fuse)"));
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(fs) = self.fs.take() {
            fs.umount_and_join().unwrap();
        }
        if let Some(c) = self.core.take() {
            c.stop().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A session with one memory object of 1 MiB.
fn session(sock: &Path) -> (Client, u32) {
    let mut s = Client::session(sock).unwrap();
    let ram = iommu_core::memfd::create("ram", 1 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    (s, mem)
}

/// `n` mappings of 4 KiB, 8 KiB apart, in a new IOAS.
fn fill(s: &mut Client, mem: u32, n: u64) -> u32 {
    let ioas = s.ioas_alloc().unwrap();
    for k in 0..n {
        let args =
            MapArgs { ioas, mem, offset: 0, length: 0x1000, iova: Some(0x1000_0000 + k * 0x2000), perm: Perm::RW };
        s.map(args).unwrap();
    }
    ioas
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Times `runs` runs of `cat FILE`, checking each read `lines` lines.
fn cats(file: &Path, runs: usize, lines: usize) -> Vec<Duration> {
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = Command::new("cat").arg(file).output().unwrap();
        t.push(t0.elapsed());
        assert!(out.status.success());
        assert_eq!(out.stdout.split(|&b| b == b'\n').count() - 1, lines);
    }
    t.sort();
    t
}

fn cat_under_churn(n: u64, runs: usize) {
    let mut st = Setup::new("churn");
    let (mut s, mem) = session(&st.sock);
    let ioas = fill(&mut s, mem, n);
    st.mount();
    let file = st.mnt.join(format!("ioas/{}.{ioas}/mappings", s.session_id()));
    let quiet = cats(&file, runs, n as usize);

    // Another session maps and unmaps 4 KiB in a loop.
    let stop = Arc::new(AtomicBool::new(false));
    let pairs = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, pairs, sock) = (stop.clone(), pairs.clone(), st.sock.clone());
        std::thread::spawn(move || {
            let (mut c, mem) = session(&sock);
            let ioas = c.ioas_alloc().unwrap();
            while !stop.load(Ordering::Relaxed) {
                let args = MapArgs { ioas, mem, offset: 0, length: 0x1000, iova: Some(0x1000), perm: Perm::RW };
                c.map(args).unwrap();
                c.unmap(ioas, 0x1000, 0x1000).unwrap();
                pairs.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let p0 = pairs.load(Ordering::Relaxed);
    let busy = cats(&file, runs, n as usize);
    let rate = (pairs.load(Ordering::Relaxed) - p0) as f64 / t0.elapsed().as_secs_f64();
    // And a pass over the whole tree meanwhile.
    let t = Instant::now();
    let (mut files, mut bytes) = (0, 0);
    read_all(&st.mnt, &mut files, &mut bytes);
    let pass = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let t = Instant::now();
    let (mut still_files, mut still_bytes) = (0, 0);
    read_all(&st.mnt, &mut still_files, &mut still_bytes);
    let still = t.elapsed();
    println!(
        "cat of a {n}-line mappings, {runs} runs: no churn p50 {:.1} ms max {:.1} ms; \
         under churn ({rate:.0} map+unmap pairs/s) p50 {:.1} ms p90 {:.1} ms max {:.1} ms   [goal: p50 <= 50 ms under churn]",
        ms(percentile(&quiet, 0.5)),
        ms(percentile(&quiet, 1.0)),
        ms(percentile(&busy, 0.5)),
        ms(percentile(&busy, 0.9)),
        ms(percentile(&busy, 1.0)),
    );
    println!(
        "the whole tree of that core ({files} files, {bytes} bytes) read in {:.1} ms under churn, \
         {:.1} ms ({still_files} files) without",
        ms(pass),
        ms(still)
    );
}

fn tree(n_ioas: u32, per: u64, runs: usize) {
    let mut st = Setup::new("tree");
    let (mut s, mem) = session(&st.sock);
    let t0 = Instant::now();
    for _ in 0..n_ioas {
        fill(&mut s, mem, per);
    }
    let setup = t0.elapsed();
    st.mount();
    let mappings = u64::from(n_ioas) * per;
    println!("tree: {n_ioas} IOASes, {mappings} mappings (made in {:.2} s over the socket)", setup.as_secs_f64());
    for run in 1..=runs {
        let t = Instant::now();
        let (mut files, mut bytes) = (0, 0);
        read_all(&st.mnt, &mut files, &mut bytes);
        let read = t.elapsed();
        let t = Instant::now();
        let out = Command::new("ls").arg("-R").arg(&st.mnt).output().unwrap();
        let ls = t.elapsed();
        assert!(out.status.success());
        println!(
            "run {run}: read every file: {files} files, {bytes} bytes in {:.3} s ({:.0} files/s) [goal <= 1 s]; \
             ls -R: {} lines in {:.3} s [goal <= 0.3 s]",
            read.as_secs_f64(),
            files as f64 / read.as_secs_f64(),
            out.stdout.split(|&b| b == b'\n').count(),
            ls.as_secs_f64()
        );
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if full {
        cat_under_churn(10_000, 100);
        tree(1000, 100, 3);
    } else {
        cat_under_churn(500, 5);
        tree(20, 10, 1);
    }
}
