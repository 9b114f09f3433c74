//! The file system with real processes: `iommu-core`, `vfio-user-server
//! dma-engine` and `ioasid-fs`; the core killed with SIGKILL while mounted.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn mounted(p: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.split(' ').nth(1) == p.to_str())
}

#[test]
fn a_killed_core_gives_errors_then_the_mount_goes() {
    let mut st = Stack::new("fs");
    st.server("dma-engine", "eng");
    let mnt = st.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = Command::new(bin("ioasid-fs"))
        .arg("--core")
        .arg(&st.core_sock)
        .arg(&mnt)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut fs = Proc(fs);
    let t0 = Instant::now();
    while !mounted(&mnt) {
        assert!(t0.elapsed() < Duration::from_secs(10), "not mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server's compat session and its device are there.
    let devs: Vec<String> = std::fs::read_dir(mnt.join("devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(devs.len(), 1);
    let d = mnt.join("devices").join(&devs[0]);
    assert_eq!(std::fs::read_to_string(d.join("name")).unwrap(), "dma-engine\n");
    assert!(std::fs::read_to_string(d.join("server")).unwrap().contains("eng.sock"));
    // SIGKILL the core: reads fail at once, then ioasid-fs unmounts and exits.
    let core = st.core.take().unwrap();
    drop(core);
    let t0 = Instant::now();
    assert!(std::fs::read_to_string(mnt.join("stats")).is_err());
    assert!(t0.elapsed() < Duration::from_secs(2), "a read hung");
    let t0 = Instant::now();
    while mounted(&mnt) {
        assert!(t0.elapsed() < Duration::from_secs(10), "still mounted after the core died");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = fs.0.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

/// A session hands the core a file of a FUSE mount whose server is
/// stopped (SIGSTOP): the core must not ask that file system anything on
/// its event loop (stat, statfs and even close wait for the FUSE server).
/// It refuses the fd with EINVAL, closes it on another thread, and keeps
/// serving other sessions meanwhile.
#[test]
fn a_file_of_a_stalled_fuse_mount_is_refused_without_stalling_the_core() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let st = Stack::new("fs-stall");
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

    let mut hostile = st.session();
    let (tx, rx) = std::sync::mpsc::channel();
    let core = st.core_sock.clone();
    let fd = file.try_clone().unwrap();
    std::thread::spawn(move || {
        let refused = hostile.register_memory(&fd).map(|m| m.id);
        let mut other = iommu_core::client::Client::session(&core).unwrap();
        let mut served = other.ioas_alloc().is_ok();
        // More such files than the core lets wait for closing: new peers
        // are turned away meanwhile, and the session already in is served.
        use std::os::fd::AsFd;
        let fds: Vec<std::os::fd::BorrowedFd> = (0..16).map(|_| fd.as_fd()).collect();
        let mut turned_away = None;
        for _ in 0..2 * iommu_core::server::MAX_PENDING_CLOSES / 16 {
            match iommu_core::client::Client::session(&core) {
                Ok(mut c) => {
                    let _ = c.call(&iommu_core::wire::Request::RegisterMemory, &fds);
                }
                Err(e) => {
                    turned_away = Some(e.to_string());
                    break;
                }
            }
        }
        served &= turned_away.is_some_and(|e| e.contains("stalled file system"));
        served &= other.ioas_alloc().is_ok();
        // Our copy goes back to be closed once the server runs again
        // (closing it now would wait for the stopped server).
        let _ = tx.send((refused.map_err(|e| e.errno()), served, fd));
    });
    let got = rx.recv_timeout(Duration::from_secs(10));
    kill(Pid::from_raw(fs.pid()), Signal::SIGCONT).unwrap();
    let (refused, served, fd) = got.expect("the core stalled on a file of a stopped FUSE server");
    drop(fd);
    assert!(
        matches!(refused, Err(Some(iommu_core::Errno::EINVAL))) || matches!(refused, Err(None)),
        "the fd was not refused: {refused:?}"
    );
    assert!(served, "another session was not served, or new peers were not turned away");
    // Once the file system answers, the files are closed and peers welcome.
    let t0 = Instant::now();
    while iommu_core::client::Client::session(&st.core_sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the core kept turning peers away");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(file);
    assert!(fs.terminate(), "ioasid-fs exits cleanly");
}
