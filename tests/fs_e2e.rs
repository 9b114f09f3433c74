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
