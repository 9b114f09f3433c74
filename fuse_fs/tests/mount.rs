//! A real mount (CI runs as root with /dev/fuse): the tree follows a
//! session that allocates, maps, attaches vPASIDs through a device server,
//! unmaps and exits; symlinks resolve; writes are refused; a core that
//! goes away gives errors, not hangs, and the next core on the socket is
//! shown; unmounting leaves nothing behind.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use iommu_core::pagetable::Perm;
use iommu_core::types::{Limits, MapArgs, MapEntry};
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::DmaEngine;
use vfio_user_server::server::{self, Options};

/// A fresh directory named for `name`, a core on `core.sock` in it and
/// ioasid-fs mounted on its `mnt`.
fn core_and_mount(name: &str) -> (PathBuf, PathBuf, PathBuf, iommu_core::server::Running, fuse_fs::fs::Mount) {
    let dir = std::env::temp_dir().join(format!("ioasid-fs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let sock = dir.join("core.sock");
    let core = iommu_core::server::spawn(&sock, Limits::default()).unwrap();
    let fs = fuse_fs::fs::mount(&sock, &mnt).expect("mount (needs root and /dev/fuse)");
    (dir, mnt, sock, core, fs)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.split(' ').nth(1) == p.to_str())
}

fn eventually(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_tree_follows_the_state_live() {
    let dir = std::env::temp_dir().join(format!("ioasid-fs-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mnt: PathBuf = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let core_sock = dir.join("core.sock");
    let core = iommu_core::server::spawn(&core_sock, Limits::default()).unwrap();
    let dev_sock = dir.join("dev.sock");
    let srv = server::spawn(Box::new(DmaEngine::new().unwrap()), Options::new(&dev_sock, &core_sock)).unwrap();
    let fs = fuse_fs::fs::mount(&core_sock, &mnt).expect("mount (needs root and /dev/fuse)");
    assert!(mounted(&mnt));

    // The compat session of the server is there from the start.
    let sessions = || std::fs::read_dir(mnt.join("sessions")).unwrap().count();
    assert_eq!(sessions(), 1);
    // A session appears with what it makes.
    let mut s = iommu_core::client::Client::session(&core_sock).unwrap();
    let sid = s.session_id();
    let ram = iommu_core::memfd::create("ram", 4 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    let a = s.ioas_alloc().unwrap();
    let b = s.ioas_alloc().unwrap();
    s.map(MapArgs { ioas: a, mem, offset: 0, length: 2 << 20, iova: Some(0x4000_0000), perm: Perm::RW }).unwrap();
    s.map(MapArgs { ioas: b, mem, offset: 2 << 20, length: 0x1000, iova: Some(0x1000), perm: Perm::R }).unwrap();
    let ia = mnt.join(format!("ioas/{sid}.{a}"));
    assert_eq!(read(&ia.join("kind")), "paging\n");
    assert_eq!(
        read(&ia.join("mappings")),
        format!("0x40000000-0x401fffff 0x200000 memory {sid}.{mem} offset 0x0 rw\n")
    );
    assert_eq!(read(&mnt.join(format!("memory/{sid}.{mem}/mappings"))), "2\n");
    // The page table of A: 2 MiB of RAM at an aligned IOVA is one 2 MiB leaf.
    let pt = read(&ia.join("page_table"));
    let leaves: Vec<&str> = pt.lines().filter(|l| l.starts_with("L2 ")).collect();
    assert_eq!(leaves.len(), 1, "{pt}");
    assert!(leaves[0].contains("0x40000000-0x401fffff -> ") && leaves[0].ends_with(" rw 2M"), "{pt}");
    assert_eq!(std::fs::metadata(ia.join("page_table")).unwrap().len() as usize, pt.len());
    assert_eq!(read(&mnt.join(format!("sessions/{sid}/pid"))), format!("{}\n", std::process::id()));
    // A device bound through the extension, with two vPASIDs.
    let (_, chan) = s.open_device_channel().unwrap();
    let mut c = Client::connect(&dev_sock).unwrap();
    let dev = c.ioasid_bind(chan.as_fd()).unwrap().dev_id;
    c.ioasid_attach(None, a, false).unwrap();
    let p5 = c.ioasid_attach(Some(5), a, false).unwrap();
    let p9 = c.ioasid_attach(Some(9), b, false).unwrap();
    let d = mnt.join(format!("devices/{sid}.{dev}"));
    assert_eq!(read(&d.join("name")), "dma-engine\n");
    assert_eq!(read(&d.join("pci_address")), "0000:00:04.0\n");
    assert_eq!(read(&d.join("vpasid_map")), format!("0x5 {p5:#x} {sid}.{a}\n0x9 {p9:#x} {sid}.{b}\n"));
    assert_eq!(read(&d.join(format!("pasid/{p9:#x}/vpasid"))), "0x9\n");
    assert!(read(&d.join("iotlb")).starts_with("hits "), "IOTLB counters of the server");
    assert!(read(&d.join("dma_faults")).starts_with("faults "));
    // Symlinks resolve, both ways.
    let canon = |p: PathBuf| std::fs::canonicalize(p).unwrap();
    assert_eq!(canon(d.join("ioas")), canon(ia.clone()));
    assert_eq!(canon(d.join(format!("pasid/{p9:#x}/ioas"))), canon(mnt.join(format!("ioas/{sid}.{b}"))));
    assert_eq!(canon(ia.join(format!("devices/{dev}"))), canon(d.clone()));
    assert_eq!(canon(mnt.join(format!("pasids/{p5:#x}"))), canon(d.join(format!("pasid/{p5:#x}"))));
    // ls and cat as people use them.
    let ls = Command::new("ls").arg(&d).output().unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("vpasid_map"));
    let cat = Command::new("cat").arg(d.join("vpasid_map")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), format!("0x5 {p5:#x} {sid}.{a}\n0x9 {p9:#x} {sid}.{b}\n"));
    let grep = Command::new("grep").args(["-c", "."]).arg(mnt.join("limits")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&grep.stdout), "12\n");
    // The size stat reports is the size cat reads.
    let len = std::fs::metadata(mnt.join("limits")).unwrap().len();
    assert_eq!(len as usize, read(&mnt.join("limits")).len());
    // Read-only.
    assert_eq!(std::fs::write(mnt.join("stats"), "x").unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert_eq!(std::fs::create_dir(mnt.join("x")).unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert_eq!(std::fs::remove_file(mnt.join("stats")).unwrap_err().raw_os_error(), Some(libc::EROFS));
    // A detach and an unmap show at once.
    c.ioasid_detach(Some(9)).unwrap();
    assert_eq!(read(&d.join("vpasid_map")), format!("0x5 {p5:#x} {sid}.{a}\n"));
    assert!(!d.join(format!("pasid/{p9:#x}")).exists());
    s.unmap(b, 0x1000, 0x1000).unwrap();
    assert_eq!(read(&mnt.join(format!("ioas/{sid}.{b}/mappings"))), "");
    // The session exits: its objects disappear from the tree.
    drop(c);
    drop(s);
    eventually("the session's objects stay", || !ia.exists() && !d.exists() && sessions() == 1);
    // The core goes away: reads fail with ENOTCONN, nothing hangs; the
    // root says why.
    srv.stop().unwrap();
    core.stop().unwrap();
    let m = mnt.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send((std::fs::read_to_string(m.join("stats")), std::fs::read_dir(&m).map(|d| d.count())));
    });
    let (stats, root) = rx.recv_timeout(Duration::from_secs(30)).expect("a read hung after the core went away");
    assert_eq!(stats.unwrap_err().raw_os_error(), Some(libc::ENOTCONN));
    assert_eq!(root.unwrap(), 1);
    assert!(read(&mnt.join("core_unavailable")).contains(&core_sock.display().to_string()));
    assert!(!fs.connected());
    // The next core on the socket is shown.
    let core = iommu_core::server::spawn(&core_sock, Limits::default()).unwrap();
    let s = iommu_core::client::Client::session(&core_sock).unwrap();
    let ses = mnt.join(format!("sessions/{}", s.session_id()));
    eventually("the new core's session is not shown", || ses.is_dir());
    assert!(fs.connected());
    assert_eq!(sessions(), 1);
    drop(s);
    core.stop().unwrap();
    fs.umount_and_join().unwrap();
    assert!(!mounted(&mnt));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Body of the session process of `a_killed_process_disappears_from_the_tree`.
#[test]
#[ignore = "helper process; not a test by itself"]
fn session_process() {
    use std::io::Write;
    let Ok(path) = std::env::var("IOASID_FS_TEST_SOCKET") else { return };
    let mut s = iommu_core::client::Client::session(&path).unwrap();
    let ram = iommu_core::memfd::create("child", 1 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    let a = s.ioas_alloc().unwrap();
    s.map(MapArgs { ioas: a, mem, offset: 0, length: 1 << 20, iova: Some(0x10_0000), perm: Perm::RW }).unwrap();
    println!("READY {}", s.session_id());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_process_disappears_and_tools_read_files_whole() {
    use std::io::{BufRead, BufReader};
    let (dir, mnt, sock, core, fs) = core_and_mount("kill");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "session_process", "--nocapture", "--test-threads=1"])
        .env("IOASID_FS_TEST_SOCKET", &sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut sid = None;
    while out.read_line(&mut line).unwrap() > 0 {
        if let Some((_, rest)) = line.trim().split_once("READY ") {
            sid = Some(rest.trim().parse::<u64>().unwrap());
            break;
        }
        line.clear();
    }
    let sid = sid.expect("the child reported READY");
    let ses = mnt.join(format!("sessions/{sid}"));
    assert_eq!(read(&ses.join("pid")), format!("{}\n", child.id()));
    let maps = mnt.join(format!("ioas/{sid}.2/mappings"));
    assert_eq!(read(&maps), format!("0x100000-0x1fffff 0x100000 memory {sid}.1 offset 0x0 rw\n"));
    // head, tail, less and wc read what cat reads.
    let whole = read(&mnt.join("limits"));
    let run = |cmd: &str, args: &[&str]| {
        let o = Command::new(cmd).args(args).arg(mnt.join("limits")).output().unwrap();
        assert!(o.status.success(), "{cmd}");
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(run("head", &["-n", "1"]), whole.lines().next().unwrap().to_string() + "\n");
    assert_eq!(run("tail", &["-n", "1"]), whole.lines().last().unwrap().to_string() + "\n");
    assert_eq!(run("tail", &["-c", "10"]), whole[whole.len() - 10..]);
    assert_eq!(run("wc", &["-c"]).split_whitespace().next().unwrap(), whole.len().to_string());
    assert_eq!(run("less", &["-F"]), whole);
    // chmod is refused too.
    use std::os::unix::fs::PermissionsExt;
    let e = std::fs::set_permissions(mnt.join("limits"), std::fs::Permissions::from_mode(0o666)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    // kill -9: the session and everything it owned leave the tree.
    child.kill().unwrap();
    child.wait().unwrap();
    eventually("a killed session stays in the tree", || !ses.exists() && !maps.exists());
    assert!(std::fs::read_dir(mnt.join("memory")).unwrap().next().is_none());
    fs.umount_and_join().unwrap();
    core.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every file under `p`, depth first (symlinks not followed).
fn files(p: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

/// What is kept between operations is never older than the last change:
/// a change shows at once to lookups, stat, listings and reads, however
/// recently the name was seen; an IOAS listed in several pieces reads
/// whole and in order; and while nothing changes, looking, listing and
/// reading ask the core nothing but what changes by itself (`stats`).
#[test]
fn changes_show_at_once_and_a_still_state_is_not_asked_again() {
    let (dir, mnt, sock, core, fs) = core_and_mount("still");
    let mut s = iommu_core::client::Client::session(&sock).unwrap();
    let sid = s.session_id();
    let ram = iommu_core::memfd::create("ram", 1 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    let a = s.ioas_alloc().unwrap();
    // More mappings than one piece holds.
    let n = u64::from(fuse_fs::fs::MAPPINGS_PIECE) + 300;
    let iova = |k: u64| 0x1000_0000 + k * 0x2000;
    let entries: Vec<MapEntry> =
        (0..n).map(|k| MapEntry { mem, offset: 0, length: 0x1000, iova: Some(iova(k)), perm: Perm::RW }).collect();
    for chunk in entries.chunks(4096) {
        s.map_batch(a, chunk).unwrap();
    }
    let line = |k: u64| format!("{:#x}-{:#x} 0x1000 memory {sid}.{mem} offset 0x0 rw\n", iova(k), iova(k) + 0xfff);
    let want: String = (0..n).map(line).collect();
    let maps = mnt.join(format!("ioas/{sid}.{a}/mappings"));
    assert_eq!(read(&maps), want);
    assert_eq!(std::fs::metadata(&maps).unwrap().len() as usize, want.len());

    // Still: everything seen once, then seen again without asking the
    // core (but for `stats`, and the keeper's ping once a second).
    let mut all = Vec::new();
    files(&mnt, &mut all);
    let mut o = iommu_core::client::Client::observer(&sock).unwrap();
    for f in &all {
        std::fs::read(f).unwrap();
    }
    let before = o.counters().unwrap().stats.requests;
    let t0 = Instant::now();
    for f in &all {
        if !f.ends_with("stats") || f.parent() != Some(mnt.as_path()) {
            std::fs::metadata(f).unwrap();
            std::fs::read(f).unwrap();
        }
    }
    assert!(Command::new("ls").arg("-lR").arg(&mnt).output().unwrap().status.success());
    let asked = o.counters().unwrap().stats.requests - before;
    let pings = t0.elapsed().as_secs() + 1;
    // The first `counters` counts itself once answered, and `ls -l`
    // stats `stats`, which asks.
    assert!(asked <= 2 + pings, "{asked} requests while nothing changed ({} files)", all.len());

    // A change shows at once: to a read, a stat of the size, a listing.
    s.unmap(a, iova(0), 0x1000).unwrap();
    let want: String = (1..n).map(line).collect();
    assert_eq!(std::fs::metadata(&maps).unwrap().len() as usize, want.len());
    assert_eq!(read(&maps), want);
    // Another IOAS's change: shown, and this one's text unchanged.
    let b = s.ioas_alloc().unwrap();
    let ib = mnt.join(format!("ioas/{sid}.{b}"));
    assert!(ib.join("mappings").exists(), "a new IOAS is not shown at once");
    s.map(MapArgs { ioas: b, mem, offset: 0, length: 0x1000, iova: Some(0x1000), perm: Perm::R }).unwrap();
    assert_eq!(read(&ib.join("mappings")), format!("0x1000-0x1fff 0x1000 memory {sid}.{mem} offset 0x0 r\n"));
    assert_eq!(read(&maps), want);
    // Names seen a moment ago that went away: gone at once, for stat,
    // open, listing and readlink alike.
    s.unmap(b, 0, u64::MAX).unwrap();
    s.destroy(b).unwrap();
    assert!(!ib.exists(), "a destroyed IOAS is still shown");
    assert_eq!(std::fs::read(ib.join("mappings")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    assert_eq!(std::fs::read_dir(&ib).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    let link = mnt.join(format!("sessions/{sid}/ioas/{b}"));
    assert_eq!(std::fs::read_link(&link).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    let names: Vec<String> =
        std::fs::read_dir(mnt.join("ioas")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, [format!("{sid}.{a}")]);
    drop(o);
    drop(s);
    fs.umount_and_join().unwrap();
    core.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
