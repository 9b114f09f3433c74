//! The `ioasid-fs` binary: mounts in the foreground, unmounts on SIGTERM,
//! and unmounts and exits by itself when the core goes away.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ioasid-fs");

fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.split(' ').nth(1) == p.to_str())
}

fn wait(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mounts_unmounts_on_sigterm_and_when_the_core_goes_away() {
    let dir = std::env::temp_dir().join(format!("ioasid-fs-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let sock = dir.join("core.sock");
    let core = iommu_core::server::spawn(&sock, iommu_core::types::Limits::default()).unwrap();
    let start = || Command::new(BIN).arg("--core").arg(&sock).arg(&mnt).stderr(Stdio::null()).spawn().unwrap();
    let mut fs = start();
    wait("not mounted", || mounted(&mnt));
    assert_eq!(std::fs::read_to_string(mnt.join("sessions/../stats")).unwrap().lines().next(), Some("sessions 0"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(fs.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(fs.wait().unwrap().success());
    assert!(!mounted(&mnt), "SIGTERM left the mount behind");
    // Again, and then the core stops: the file system goes too.
    let mut fs = start();
    wait("not mounted", || mounted(&mnt));
    core.stop().unwrap();
    wait("still mounted after the core left", || !mounted(&mnt));
    assert!(fs.wait().unwrap().success());
    // Without a core: one sentence.
    let out = Command::new(BIN).arg("--core").arg(&sock).arg(&mnt).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the core at"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
