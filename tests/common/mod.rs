//! Real processes for end-to-end tests: the `iommu-core` and
//! `vfio-user-server` binaries, started on sockets in a fresh directory
//! and killed when the test ends.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory cargo puts this test's profile binaries in.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent().and_then(|p| p.parent()).unwrap().to_path_buf()
}

/// Path of a workspace binary, built first if this test run lacks it.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let path = bin_dir().join(name);
    BUILT.call_once(|| {
        // Always: cargo makes it a no-op when they are current, and a stale
        // binary would test old code.
        {
            let release = bin_dir().ends_with("release");
            let mut c = Command::new(env!("CARGO"));
            c.args(["build", "--locked", "--bins", "-p", "iommu_core", "-p", "vfio_user_server", "-p", "fuse_fs"]);
            if release {
                c.arg("--release");
            }
            assert!(c.status().unwrap().success(), "cannot build the binaries");
        }
    });
    path
}

pub fn wait_for(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// SIGTERM and wait; true if it exited with status 0.
    pub fn terminate(mut self) -> bool {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGTERM);
        self.0.wait().map(|s| s.success()).unwrap_or(false)
    }
}

pub struct Stack {
    pub dir: PathBuf,
    pub core_sock: PathBuf,
    pub core: Option<Proc>,
    pub servers: Vec<Proc>,
}

impl Stack {
    /// A core in a new directory.
    pub fn new(name: &str) -> Stack {
        let dir = std::env::temp_dir().join(format!("ioasid-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let core_sock = dir.join("core.sock");
        let core =
            Command::new(bin("iommu-core")).arg("--socket").arg(&core_sock).stderr(Stdio::null()).spawn().unwrap();
        wait_for(&core_sock);
        Stack { dir, core_sock, core: Some(Proc(core)), servers: Vec::new() }
    }

    /// Starts a `vfio-user-server DEVICE` process; returns its socket.
    pub fn server(&mut self, device: &str, name: &str) -> PathBuf {
        self.server_with(device, name, &[])
    }

    /// Starts a `vfio-user-server DEVICE ARGS...` process; returns its socket.
    pub fn server_with(&mut self, device: &str, name: &str, args: &[&str]) -> PathBuf {
        let sock = self.dir.join(format!("{name}.sock"));
        let p = Command::new(bin("vfio-user-server"))
            .arg(device)
            .args(args)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--core")
            .arg(&self.core_sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&sock);
        self.servers.push(Proc(p));
        sock
    }

    pub fn session(&self) -> iommu_core::client::Client {
        iommu_core::client::Client::session(&self.core_sock).unwrap()
    }

    pub fn observer(&self) -> iommu_core::client::Client {
        iommu_core::client::Client::observer(&self.core_sock).unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.servers.clear();
        self.core.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether something is mounted on `p`.
pub fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.split(' ').nth(1) == p.to_str())
}

/// Starts `ioasid-fs` on the stack's core at `<dir>/mnt` and waits until
/// it is mounted; returns the process and the mount point.
pub fn mount_ioasid_fs(st: &Stack) -> (Proc, PathBuf) {
    let mnt = st.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = Command::new(bin("ioasid-fs")).arg("--core").arg(&st.core_sock).arg(&mnt).stderr(Stdio::null()).spawn();
    let fs = Proc(fs.unwrap());
    let t0 = Instant::now();
    while !mounted(&mnt) {
        assert!(t0.elapsed() < Duration::from_secs(30), "ioasid-fs did not mount");
        std::thread::sleep(Duration::from_millis(20));
    }
    (fs, mnt)
}
