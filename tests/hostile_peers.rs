//! Hostile peers of the real `iommu-core` binary over its real socket:
//! files that block, and peers that cost the core memory or time.

mod common;

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn mounted(p: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.split(' ').nth(1) == p.to_str())
}

/// A file of a stopped FUSE mount is refused for the one request that
/// carried it (EINVAL, naming the file system), and the same session goes
/// on: the core neither closes the connection nor asks the file system
/// anything.
#[test]
fn a_file_that_can_block_fails_its_request_and_the_session_goes_on() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let st = Stack::new("hostile-fuse");
    let mnt = st.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = Command::new(bin("ioasid-fs")).arg("--core").arg(&st.core_sock).arg(&mnt).stderr(Stdio::null()).spawn();
    let fs = Proc(fs.unwrap());
    let t0 = Instant::now();
    while !mounted(&mnt) {
        assert!(t0.elapsed() < Duration::from_secs(10), "not mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    drop(fs);
}
