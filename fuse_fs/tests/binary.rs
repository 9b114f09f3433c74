//! The `ioasid-fs` binary: mounts in the foreground and unmounts on
//! SIGTERM; stays mounted while the core is away and shows the next core on
//! the socket; leaves alone (and refuses) a mount point where a FUSE server
//! answers, one where it is stopped, and one where another file system is
//! mounted.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_ioasid-fs");
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

/// Runs `f` on a thread of its own and fails the test if it does not
/// finish by the deadline (a read of the mount must never hang).
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

fn exit_status(c: &mut Child, what: &str) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < DEADLINE, "{what}: still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A test directory; on drop, lazily unmounts whatever is still mounted on
/// its `mnt` (even a stopped or dead FUSE mount), kills the processes
/// started in it, and removes it.
struct Dir {
    path: PathBuf,
    mnt: PathBuf,
    children: Vec<Child>,
}

impl Dir {
    fn new(name: &str) -> Dir {
        let path = std::env::temp_dir().join(format!("ioasid-fs-bin-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.join("mnt")).unwrap();
        let path = path.canonicalize().unwrap();
        Dir { mnt: path.join("mnt"), path, children: Vec::new() }
    }

    /// Starts `ioasid-fs --core SOCK MNT`, its log in `log`.
    fn start(&self, sock: &Path, log: &str) -> Child {
        let log = std::fs::File::create(self.path.join(log)).unwrap();
        Command::new(BIN).arg("--core").arg(sock).arg(&self.mnt).stderr(log).stdout(Stdio::null()).spawn().unwrap()
    }

    fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.path.join(log)).unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let m = CString::new(self.mnt.as_os_str().as_bytes()).unwrap();
        for _ in 0..8 {
            if mount_ids(&self.mnt).is_empty() {
                break;
            }
            // SAFETY: `m` is a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(m.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn sigterm(c: &Child) {
    kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
}

#[test]
fn unmounts_on_sigterm_and_shows_the_next_core_after_the_core_goes_away() {
    let mut d = Dir::new("core");
    let mnt = d.mnt.clone();
    let sock = d.path.join("core.sock");
    let core = iommu_core::server::spawn(&sock, iommu_core::types::Limits::default()).unwrap();
    d.children.push(d.start(&sock, "fs1.log"));
    eventually("not mounted", || mount_ids(&mnt).len() == 1);
    assert_eq!(std::fs::read_to_string(mnt.join("sessions/../stats")).unwrap().lines().next(), Some("sessions 0"));
    sigterm(&d.children[0]);
    assert!(exit_status(&mut d.children[0], "ioasid-fs after SIGTERM").success());
    assert!(mount_ids(&mnt).is_empty(), "SIGTERM left the mount behind");

    // Again, and then the core stops: the mount stays, with one file
    // saying why, and every other path fails at once with ENOTCONN.
    d.children[0] = d.start(&sock, "fs2.log");
    eventually("not mounted", || mount_ids(&mnt).len() == 1);
    let id = mount_ids(&mnt);
    let s = iommu_core::client::Client::session(&sock).unwrap();
    let old = mnt.join(format!("sessions/{}", s.session_id()));
    assert!(old.is_dir());
    core.stop().unwrap();
    let m = mnt.clone();
    eventually("the root does not say the core is unavailable", || names(&m) == ["core_unavailable"]);
    let why = std::fs::read_to_string(mnt.join("core_unavailable")).unwrap();
    assert!(why.starts_with(&format!("the core at {} is unreachable (", sock.display())), "{why}");
    let m = mnt.clone();
    let errs = within("a read while the core is away", move || {
        [m.join("stats"), m.join("sessions"), m.join("sessions/1/pid")].map(|p| std::fs::read(p).unwrap_err())
    });
    for e in errs {
        assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    }
    assert!(d.children[0].try_wait().unwrap().is_none(), "ioasid-fs exited when the core went away");
    assert_eq!(mount_ids(&mnt), id);

    // A new core on the same socket: its state, in the same mount.
    drop(s);
    let core = iommu_core::server::spawn(&sock, iommu_core::types::Limits::default()).unwrap();
    let s = iommu_core::client::Client::session(&sock).unwrap();
    let new = mnt.join(format!("sessions/{}", s.session_id()));
    eventually("the new core's session is not shown", || new.is_dir());
    assert!(!mnt.join("core_unavailable").exists());
    assert_eq!(std::fs::read_to_string(mnt.join("stats")).unwrap().lines().next(), Some("sessions 1"));
    assert_eq!(mount_ids(&mnt), id, "the mount was replaced");
    assert!(d.log("fs2.log").contains("went away"), "{}", d.log("fs2.log"));
    sigterm(&d.children[0]);
    assert!(exit_status(&mut d.children[0], "ioasid-fs after SIGTERM").success());
    assert!(mount_ids(&mnt).is_empty());

    // Without a core at the start: one sentence, nothing mounted.
    drop(s);
    core.stop().unwrap();
    let out = Command::new(BIN).arg("--core").arg(&sock).arg(&mnt).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the core at"), "{err}");
    assert!(mount_ids(&mnt).is_empty());
}

#[test]
fn a_live_a_stopped_and_a_foreign_mount_are_refused_and_left_alone() {
    let mut d = Dir::new("refuse");
    let mnt = d.mnt.clone();
    let sock = d.path.join("core.sock");
    let _core = iommu_core::server::spawn(&sock, iommu_core::types::Limits::default()).unwrap();
    d.children.push(d.start(&sock, "fs1.log"));
    eventually("not mounted", || mount_ids(&mnt).len() == 1);
    let id = mount_ids(&mnt);
    let stats = std::fs::read_to_string(mnt.join("limits")).unwrap();

    // Another ioasid-fs on the live mount: refused, the first undisturbed.
    let mut second = d.start(&sock, "fs2.log");
    assert_eq!(exit_status(&mut second, "a second ioasid-fs").code(), Some(1));
    assert!(d.log("fs2.log").contains("another ioasid-fs is mounted on"), "{}", d.log("fs2.log"));
    assert_eq!(mount_ids(&mnt), id);
    assert_eq!(std::fs::read_to_string(mnt.join("limits")).unwrap(), stats);

    // The first stopped (SIGSTOP): not dead, so refused too, without
    // waiting on it. Nothing here touches the stopped mount.
    let pid = Pid::from_raw(d.children[0].id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let mut third = d.start(&sock, "fs3.log");
    let st = exit_status(&mut third, "an ioasid-fs on a stopped mount");
    kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(st.code(), Some(1));
    assert!(d.log("fs3.log").contains("did not answer within"), "{}", d.log("fs3.log"));
    assert_eq!(mount_ids(&mnt), id);
    let m = mnt.clone();
    let again = within("a read after SIGCONT", move || std::fs::read_to_string(m.join("limits")).unwrap());
    assert_eq!(again, stats);
    sigterm(&d.children[0]);
    assert!(exit_status(&mut d.children[0], "ioasid-fs after SIGTERM").success());
    assert!(mount_ids(&mnt).is_empty());

    // Another file system mounted there: refused, left mounted.
    let m = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: every argument is a NUL-terminated string that outlives the call.
    let r = unsafe { libc::mount(c"ioasid-test".as_ptr(), m.as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
    assert_eq!(r, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    let tmpfs = mount_ids(&mnt);
    assert_eq!(tmpfs.len(), 1);
    let mut fourth = d.start(&sock, "fs4.log");
    assert_eq!(exit_status(&mut fourth, "ioasid-fs on a tmpfs mount").code(), Some(1));
    assert!(
        d.log("fs4.log").contains("a tmpfs file system (source ioasid-test) is mounted on"),
        "{}",
        d.log("fs4.log")
    );
    assert_eq!(mount_ids(&mnt), tmpfs);
}
