//! The file system with real processes: `iommu-core`, `vfio-user-server
//! dma-engine` and `ioasid-fs`: the core killed with SIGKILL while mounted
//! and a new one started on its socket; an `ioasid-fs` killed with SIGKILL
//! and a new one started on its mount point; a second one refused on a live
//! mount point.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Deadline for anything that should happen at once (a loaded machine
/// gets this much).
const DEADLINE: Duration = Duration::from_secs(30);

/// Ids of the mounts at `p`, in the order they were mounted.
fn mount_ids(p: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4).map(Path::new) == Some(p)).then(|| f[0].parse().unwrap())
        })
        .collect()
}

fn eventually(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < DEADLINE, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a thread of its own; fails the test if it does not finish
/// by the deadline (a read of the mount must never hang).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} hung"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} failed (see the panic above)"),
    }
}

/// Lazily unmounts whatever is still mounted on the path when dropped
/// (a dead or stopped FUSE mount too).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let m = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        for _ in 0..8 {
            if mount_ids(&self.0).is_empty() {
                break;
            }
            // SAFETY: `m` is a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(m.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The mount point of a stack, and a guard that unmounts it.
fn mount_point(st: &Stack) -> (PathBuf, Unmount) {
    let mnt = st.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    (mnt.clone(), Unmount(mnt))
}

/// Starts `ioasid-fs` on the stack's core and `mnt`, its log in `log`.
fn ioasid_fs(st: &Stack, mnt: &Path, log: &str) -> Proc {
    let log = std::fs::File::create(st.dir.join(log)).unwrap();
    let c = Command::new(bin("ioasid-fs")).arg("--core").arg(&st.core_sock).arg(mnt).stderr(log).spawn().unwrap();
    Proc(c)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_killed_core_gives_errors_then_the_next_core_is_shown() {
    let mut st = Stack::new("fs");
    st.server("dma-engine", "eng");
    let (mnt, _unmount) = mount_point(&st);
    let mut fs = ioasid_fs(&st, &mnt, "fs.log");
    eventually("not mounted", || mounted(&mnt));
    let id = mount_ids(&mnt);
    // The server's compat session and its device are there.
    let devs = names(&mnt.join("devices"));
    assert_eq!(devs.len(), 1);
    let d = mnt.join("devices").join(&devs[0]);
    assert_eq!(std::fs::read_to_string(d.join("name")).unwrap(), "dma-engine\n");
    assert!(std::fs::read_to_string(d.join("server")).unwrap().contains("eng.sock"));
    // SIGKILL the core: reads fail with ENOTCONN at once, the root says
    // why, ioasid-fs stays mounted.
    drop(st.core.take());
    let m = mnt.clone();
    let e = within("a read after the core died", move || std::fs::read_to_string(m.join("stats")).unwrap_err());
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let m = mnt.clone();
    assert_eq!(within("listing the root", move || names(&m)), ["core_unavailable"]);
    let m = mnt.clone();
    let e = within("a read after the core died", move || std::fs::read_dir(m.join("devices")).unwrap_err());
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    assert!(fs.0.try_wait().unwrap().is_none(), "ioasid-fs exited when the core died");
    assert_eq!(mount_ids(&mnt), id);
    // A new core on the same socket (the dead one's file is still there):
    // the same mount shows it.
    let core = Command::new(bin("iommu-core")).arg("--socket").arg(&st.core_sock).stderr(Stdio::null()).spawn();
    st.core = Some(Proc(core.unwrap()));
    let s = within("connecting to the new core", {
        let sock = st.core_sock.clone();
        move || {
            let t0 = Instant::now();
            loop {
                match iommu_core::client::Client::session(&sock) {
                    Ok(s) => return s,
                    Err(e) => assert!(t0.elapsed() < DEADLINE, "the new core does not answer: {e}"),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let ses = mnt.join(format!("sessions/{}", s.session_id()));
    eventually("the new core's session is not shown", || ses.is_dir());
    assert!(!mnt.join("core_unavailable").exists());
    assert_eq!(std::fs::read_to_string(ses.join("pid")).unwrap(), format!("{}\n", std::process::id()));
    assert_eq!(mount_ids(&mnt), id, "the mount was replaced");
    assert!(fs.0.try_wait().unwrap().is_none());
    let log = std::fs::read_to_string(st.dir.join("fs.log")).unwrap();
    assert!(log.contains("went away") && log.contains("connected to the core"), "{log}");
    assert!(fs.terminate(), "ioasid-fs exits cleanly");
    assert!(!mounted(&mnt));
}

#[test]
fn a_killed_ioasid_fs_is_replaced_and_a_live_one_is_left_alone() {
    let mut st = Stack::new("fs-replace");
    st.server("dma-engine", "eng");
    let (mnt, _unmount) = mount_point(&st);
    let mut first = ioasid_fs(&st, &mnt, "fs1.log");
    eventually("not mounted", || mounted(&mnt));
    let stale = mount_ids(&mnt);
    assert_eq!(names(&mnt.join("devices")).len(), 1);
    // SIGKILL: the mount stays behind, dead.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert_eq!(mount_ids(&mnt), stale);
    let m = mnt.clone();
    let e = within("a stat of the dead mount", move || std::fs::metadata(m).unwrap_err());
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    // The next one on the same mount point detaches it and serves.
    let second = ioasid_fs(&st, &mnt, "fs2.log");
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(st.dir.join("fs2.log")).unwrap();
        if log.contains("mounted the state of") {
            assert!(log.contains("detached a dead FUSE mount"), "{log}");
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "the dead mount was not replaced: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // One mount (mount ids are reused: the new one may have the old id).
    assert_eq!(mount_ids(&mnt).len(), 1);
    let live = mount_ids(&mnt);
    let devs = names(&mnt.join("devices"));
    assert_eq!(devs.len(), 1);
    let d = mnt.join("devices").join(&devs[0]);
    assert_eq!(std::fs::read_to_string(d.join("name")).unwrap(), "dma-engine\n");
    let s = st.session();
    assert!(mnt.join(format!("sessions/{}", s.session_id())).is_dir());
    // A third on the live mount point: refused with a sentence; the live
    // mount is the same and serves.
    let out = Command::new(bin("ioasid-fs")).arg("--core").arg(&st.core_sock).arg(&mnt).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another ioasid-fs is mounted on"), "{err}");
    assert_eq!(mount_ids(&mnt), live);
    assert_eq!(std::fs::read_to_string(d.join("name")).unwrap(), "dma-engine\n");
    drop(s);
    assert!(second.terminate(), "ioasid-fs exits cleanly");
    assert!(mount_ids(&mnt).is_empty());
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
    let (fs, mnt) = mount_ioasid_fs(&st);
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
    // The core closes refused files on a thread of its own: ioasid-fs can
    // unmount once the last of them is closed.
    let core_pid = st.core.as_ref().map(|c| c.pid()).unwrap();
    let holds_a_file = || {
        std::fs::read_dir(format!("/proc/{core_pid}/fd"))
            .map(|d| d.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.starts_with(&mnt))))
            .unwrap_or(false)
    };
    let t0 = Instant::now();
    while holds_a_file() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the core kept files of the mount open");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(fs.terminate(), "ioasid-fs exits cleanly");
}
