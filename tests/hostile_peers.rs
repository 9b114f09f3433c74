//! Hostile peers of the real `iommu-core` binary over its real socket:
//! files that block, and peers that cost the core memory or time.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A file of a stopped FUSE mount is refused for the one request that
/// carried it (EINVAL, naming the file system), and the same session goes
/// on: the core neither closes the connection nor asks the file system
/// anything.
#[test]
fn a_file_that_can_block_fails_its_request_and_the_session_goes_on() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let st = Stack::new("hostile-fuse");
    let (fs, mnt) = mount_ioasid_fs(&st);
    let file = std::fs::File::open(mnt.join("stats")).unwrap();
    kill(Pid::from_raw(fs.pid()), Signal::SIGSTOP).unwrap();
    let mut s = st.session();
    let (tx, rx) = std::sync::mpsc::channel();
    let fd = file.try_clone().unwrap();
    std::thread::spawn(move || {
        let refused = s.register_memory(fd.as_fd()).map(|m| m.id).map_err(|e| (e.errno(), e.to_string()));
        let ram = iommu_core::memfd::create("ram", 1 << 20).unwrap();
        let after = s.register_memory(&ram).map(|m| m.id).map_err(|e| e.to_string());
        let ioas = s.ioas_alloc().map_err(|e| e.to_string());
        let _ = tx.send((refused, after, ioas, fd));
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    kill(Pid::from_raw(fs.pid()), Signal::SIGCONT).unwrap();
    let (refused, after, ioas, fd) = got.expect("the core stalled on a file of a stopped FUSE server");
    drop(fd);
    let (errno, msg) = refused.expect_err("a file of a FUSE mount became a memory object");
    assert_eq!(errno, Some(iommu_core::Errno::EINVAL), "{msg}");
    assert!(msg.contains("fuse"), "the error does not say what the file is: {msg}");
    after.expect("the session was cut off after a refused file");
    ioas.expect("the session was cut off after a refused file");
    // SIGTERM unmounts (a SIGKILL would leave the mount behind).
    drop(file);
    assert!(fs.terminate(), "ioasid-fs did not stop cleanly after SIGCONT");
    assert!(!mounted(&mnt), "ioasid-fs left its mount behind");
}

fn core_with(name: &str, args: &[&str]) -> (Stack, Proc) {
    // The stack's own core is replaced by one with the limits under test.
    let mut st = Stack::new(name);
    drop(st.core.take());
    let _ = std::fs::remove_file(&st.core_sock);
    let core = Command::new(bin("iommu-core"))
        .arg("--socket")
        .arg(&st.core_sock)
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&st.core_sock);
    let core = Proc(core);
    (st, core)
}

fn hello(role: iommu_core::wire::Role) -> Vec<u8> {
    use iommu_core::wire;
    wire::encode(1, &wire::Request::Hello { magic: wire::MAGIC, major: wire::VERSION_MAJOR, minor: 0, role }, 0)
        .unwrap()
}

/// Waits until the core closes `s` (read gives end of stream or an error).
fn closed_by_core(s: &mut std::os::unix::net::UnixStream, within: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
        if t0.elapsed() > within {
            return false;
        }
    }
}

/// A peer that starts a message and never finishes it is dropped after
/// `--peer-stall-ms`; a peer that merely idles between messages is not.
#[test]
fn a_peer_that_leaves_a_message_unfinished_is_dropped() {
    use std::io::Write;
    let (st, _core) = core_with("hostile-slow", &["--peer-stall-ms", "300"]);
    let mut idle = st.session();
    let mut slow = std::os::unix::net::UnixStream::connect(&st.core_sock).unwrap();
    slow.write_all(&hello(iommu_core::wire::Role::Session)).unwrap();
    // A frame header announcing 512 KiB, then a few bytes of it.
    let mut partial = (512u32 << 10).to_le_bytes().to_vec();
    partial.extend_from_slice(&0u32.to_le_bytes());
    partial.extend_from_slice(&[0u8; 1000]);
    slow.write_all(&partial).unwrap();
    assert!(closed_by_core(&mut slow, Duration::from_secs(20)), "the slow peer was kept");
    // Idle for longer than the stall time, between messages: still served.
    std::thread::sleep(Duration::from_millis(600));
    idle.ioas_alloc().expect("an idle session was dropped");
}

/// Replies the peers do not read are bounded in all: past
/// `--max-peer-buffer-bytes` a large reply is EAGAIN, and once the peers
/// that never read have been dropped (`--peer-stall-ms`), it is served.
#[test]
fn unread_replies_are_bounded_and_their_readers_dropped() {
    use iommu_core::types::{MapArgs, Perm};
    use iommu_core::wire::{self, Request, Role};
    use std::io::Write;
    let (st, _core) =
        core_with("hostile-unread", &["--peer-stall-ms", "6000", "--max-peer-buffer-bytes", &(1u64 << 20).to_string()]);
    let mut s = st.session();
    let ram = iommu_core::memfd::create("ram", 1 << 20).unwrap();
    let m = s.register_memory(&ram).unwrap();
    let ioas = s.ioas_alloc().unwrap();
    for i in 0..20_000u64 {
        let iova = Some(0x1000_0000 + i * 0x2000);
        s.map(MapArgs { ioas, mem: m.id, offset: (i % 256) * 4096, length: 4096, iova, perm: Perm::R }).unwrap();
    }
    let mut reader = st.observer();
    let one = wire::encode(0, &reader.status().unwrap(), 0).unwrap().len();
    assert!(one > 200 << 10, "a status of {one} bytes is too small for this test");
    // Observers that ask and never read.
    let mut hoarders = Vec::new();
    let mut refused = false;
    // In batches of ten: well within the stall time even on a loaded
    // machine, so the first ones still hold their replies.
    for _ in 0..10 {
        for _ in 0..10 {
            let mut h = std::os::unix::net::UnixStream::connect(&st.core_sock).unwrap();
            h.write_all(&hello(Role::Observer)).unwrap();
            h.write_all(&wire::encode(2, &Request::Status, 0).unwrap()).unwrap();
            hoarders.push(h);
        }
        if let Err(e) = reader.status() {
            assert_eq!(e.errno(), Some(iommu_core::Errno::EAGAIN), "{e}");
            refused = true;
            break;
        }
    }
    assert!(refused, "100 unread replies of {one} bytes passed a 1 MiB bound");
    // The hoarders whose replies the core holds are dropped once those
    // stall (seen without reading: the core hung up); then it is served.
    let hung_up = |h: &std::os::unix::net::UnixStream| {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut p = [PollFd::new(h.as_fd(), PollFlags::from_bits_retain(libc::POLLRDHUP))];
        poll(&mut p, PollTimeout::ZERO).is_ok_and(|n| n > 0)
    };
    let t0 = Instant::now();
    while !hoarders.iter().any(hung_up) {
        assert!(t0.elapsed() < Duration::from_secs(90), "no peer that never reads was dropped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    while reader.status().is_err() {
        assert!(t0.elapsed() < Duration::from_secs(90), "status stayed refused");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.ioas_alloc().expect("the session was hurt");
}

/// A map of 4 GiB in 4 KiB leaves (1 Mi leaves, a long time on one loop)
/// runs in slices between other sessions' requests: another session's map
/// and unmap round trips all complete while it is still in progress.
#[test]
fn a_long_map_does_not_hold_up_other_sessions() {
    use iommu_core::types::{MapArgs, Perm};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let st = Stack::new("hostile-long-map");
    let mut obs = st.observer();
    let baseline = obs.status().unwrap().pool.tables_in_use;
    let done = Arc::new(AtomicBool::new(false));
    let flood = {
        let (mut s, done) = (st.session(), done.clone());
        std::thread::spawn(move || {
            let big = iommu_core::memfd::create("big", (4 << 30) + 4096).unwrap();
            let m = s.register_memory(&big).unwrap();
            let ioas = s.ioas_alloc().unwrap();
            // Offset 4 KiB: no leaf larger than 4 KiB fits.
            let args = MapArgs { ioas, mem: m.id, offset: 4096, length: 4 << 30, iova: Some(1 << 32), perm: Perm::RW };
            let r = s.map(args);
            done.store(true, Ordering::SeqCst);
            r.map(|_| s.unmap(ioas, 0, u64::MAX))
        })
    };
    // The map has started once its tables grow.
    let t0 = Instant::now();
    while obs.status().unwrap().pool.tables_in_use <= baseline + 1 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the long map never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!done.load(Ordering::SeqCst), "the long map was over before anyone else was served");
    let mut other = st.session();
    let ram = iommu_core::memfd::create("ram", 1 << 20).unwrap();
    let m = other.register_memory(&ram).unwrap();
    let ioas = other.ioas_alloc().unwrap();
    for _ in 0..5 {
        let args = MapArgs { ioas, mem: m.id, offset: 0, length: 1 << 20, iova: None, perm: Perm::RW };
        let iova = other.map(args).unwrap();
        other.unmap(ioas, iova, 1 << 20).unwrap();
    }
    assert!(!done.load(Ordering::SeqCst), "another session waited for the whole long map");
    let r = flood.join().unwrap();
    assert_eq!(r.unwrap().unwrap(), 4 << 30);
}
