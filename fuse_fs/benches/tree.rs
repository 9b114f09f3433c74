//! Load harness: a core holding 1,000 IOASes and 100,000 mappings, mounted;
//! the time to read every file of the tree, and of `ls -R`.
//!
//! `cargo bench -p fuse_fs --bench tree` (needs root and /dev/fuse).

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

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

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let (n_ioas, per) = if quick { (20u32, 10u64) } else { (1000u32, 100u64) };
    let dir = std::env::temp_dir().join(format!("ioasid-fs-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let sock = dir.join("core.sock");
    let core = iommu_core::server::spawn(&sock, Limits::default()).unwrap();
    let mut s = iommu_core::client::Client::session(&sock).unwrap();
    let ram = iommu_core::memfd::create("ram", 1 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    let t0 = Instant::now();
    for _ in 0..n_ioas {
        let a = s.ioas_alloc().unwrap();
        for k in 0..per {
            let args = MapArgs {
                ioas: a,
                mem,
                offset: 0,
                length: 0x1000,
                iova: Some(0x1000_0000 + k * 0x2000),
                perm: Perm::RW,
            };
            s.map(args).unwrap();
        }
    }
    let setup = t0.elapsed();
    let fs = fuse_fs::fs::mount(&sock, &mnt).expect("mount (needs root and /dev/fuse)");
    let mappings = u64::from(n_ioas) * per;
    println!("tree: {n_ioas} IOASes, {mappings} mappings (made in {:.2} s over the socket)", setup.as_secs_f64());
    for run in 1..=3 {
        let t = Instant::now();
        let (mut files, mut bytes) = (0, 0);
        read_all(&mnt, &mut files, &mut bytes);
        let cat = t.elapsed();
        let t = Instant::now();
        let out = Command::new("ls").arg("-R").arg(&mnt).output().unwrap();
        let ls = t.elapsed();
        assert!(out.status.success());
        println!(
            "run {run}: read every file: {files} files, {bytes} bytes in {:.2} s ({:.0} files/s); ls -R: {} lines in {:.2} s",
            cat.as_secs_f64(),
            files as f64 / cat.as_secs_f64(),
            out.stdout.split(|&b| b == b'\n').count(),
            ls.as_secs_f64()
        );
    }
    let t = Instant::now();
    let m = std::fs::read_to_string(mnt.join(format!("ioas/{}.2/mappings", s.session_id()))).unwrap();
    println!("one IOAS's mappings ({} lines) in {:.1} ms", m.lines().count(), t.elapsed().as_secs_f64() * 1e3);
    fs.umount_and_join().unwrap();
    drop(s);
    core.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
