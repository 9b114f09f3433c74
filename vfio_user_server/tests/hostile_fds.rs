//! Hostile fds sent to the `vfio-user-server` binary (a real process, with
//! a core in this process): more fds than a message may carry, and a file
//! of a FUSE mount whose server is stopped.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vfio_user_server::client::Client;
use vfio_user_server::conn::MAX_MSG_FDS;
use vfio_user_server::devices::testdev::regs;
use vfio_user_server::proto::{self, cmd, irq_index};
use zerocopy::IntoBytes;

const BIN: &str = env!("CARGO_BIN_EXE_vfio-user-server");
const RW: u32 = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;

fn errno(r: Result<impl std::fmt::Debug, vfio_user_server::client::Error>) -> i32 {
    r.expect_err("the command should fail").errno().expect("an errno from the server")
}

/// A core in this process and a test-device server process logging to a
/// file.
struct Env {
    dir: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    server: Option<Child>,
    core: Option<iommu_core::server::Running>,
}

impl Env {
    fn new(name: &str) -> Env {
        let (dir, core_path, core) = dir_with_core(name);
        let sock = dir.join("dev.sock");
        let log = dir.join("server.log");
        let server = Command::new(BIN)
            .args(["test-device", "--socket-path"])
            .arg(&sock)
            .arg("--core")
            .arg(&core_path)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "the server never made its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Env { dir, sock, log, server: Some(server), core: Some(core) }
    }

    fn pid(&self) -> u32 {
        self.server.as_ref().map_or(0, |c| c.id())
    }

    /// Open fds of the server process.
    fn server_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = self.core.take() {
            let _ = c.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client sends many messages each carrying 64 fds, four times what
/// `max_msg_fds` allows and more than the server's control buffer holds:
/// each fails with EINVAL, the server's fd count never grows with the
/// flood, and after the client leaves it holds what it held before; the
/// next client's DMA_MAP works.
#[test]
fn fds_beyond_max_msg_fds_are_all_closed() {
    let env = Env::new("fd-flood");
    let baseline = {
        let mut c = Client::connect(&env.sock).unwrap();
        c.device_info().unwrap();
        env.server_fds()
    };
    let mem = memfd("flood", 0x10000);
    let efd = eventfd();
    let mut h = next_client(&env.sock);
    let map = proto::DmaMap { argsz: 32, flags: RW, offset: 0, address: 0x10_0000, size: 0x1000 };
    let irqs = proto::IrqSet {
        argsz: 20,
        flags: proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
        index: irq_index::MSIX,
        start: 0,
        count: 64,
    };
    let info = proto::DeviceInfo { argsz: 16, ..Default::default() };
    for i in 0..300 {
        let (command, payload, fd): (u16, &[u8], BorrowedFd) = match i % 3 {
            0 => (cmd::DMA_MAP, map.as_bytes(), mem.as_fd()),
            1 => (cmd::DEVICE_SET_IRQS, irqs.as_bytes(), efd.as_fd()),
            _ => (cmd::DEVICE_GET_INFO, info.as_bytes(), mem.as_fd()),
        };
        let fds = vec![fd; 64];
        assert_eq!(errno(h.call(command, payload, &fds)), libc::EINVAL, "message {i}");
        // The message being answered may still hold its fds; nothing more.
        let open = env.server_fds();
        assert!(
            open <= baseline + 2 * MAX_MSG_FDS,
            "after {} messages of 64 fds the server has {open} fds open, {baseline} before",
            i + 1
        );
    }
    // The same client is still served.
    h.device_info().unwrap();
    drop(h);
    let mut c = next_client(&env.sock);
    c.device_info().unwrap();
    let t0 = Instant::now();
    while env.server_fds() > baseline {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the server keeps {} fds open after the flood, {baseline} before",
            env.server_fds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let good = memfd("good", 0x10000);
    good.write_all_at(b"after the flood", 0).unwrap();
    c.dma_map(RW, 0, 0x10_0000, 0x10000, Some(good.as_fd())).unwrap();
    assert_eq!(copy(&mut c, 0x10_0000, 0x10_8000, 15, None), regs::STATUS_DONE);
    let mut got = [0u8; 15];
    good.read_exact_at(&mut got, 0x8000).unwrap();
    assert_eq!(&got, b"after the flood");
    assert!(env.log().contains("came with more than 16 fds"), "{}", env.log());
}

const FUSE_MOUNT_ENV: &str = "VUS_TEST_FUSE_MOUNT";

/// A FUSE file system with one 64 KiB file, `mem`, whose attributes are
/// never cached (every stat reaches this server).
struct OneFile;

const MEM_SIZE: u64 = 0x10000;

fn attr(ino: u64) -> fuser::FileAttr {
    let dir = ino == 1;
    fuser::FileAttr {
        ino: fuser::INodeNo(ino),
        size: if dir { 0 } else { MEM_SIZE },
        blocks: if dir { 0 } else { MEM_SIZE / 512 },
        atime: std::time::UNIX_EPOCH,
        mtime: std::time::UNIX_EPOCH,
        ctime: std::time::UNIX_EPOCH,
        crtime: std::time::UNIX_EPOCH,
        kind: if dir { fuser::FileType::Directory } else { fuser::FileType::RegularFile },
        perm: if dir { 0o755 } else { 0o666 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl fuser::Filesystem for OneFile {
    fn lookup(&self, _req: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, reply: fuser::ReplyEntry) {
        if parent.0 == 1 && name == "mem" {
            reply.entry(&Duration::ZERO, &attr(2), fuser::Generation(0));
        } else {
            reply.error(fuser::Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        match ino.0 {
            1 | 2 => reply.attr(&Duration::ZERO, &attr(ino.0)),
            _ => reply.error(fuser::Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        let n = MEM_SIZE.saturating_sub(offset).min(u64::from(size));
        reply.data(&vec![0u8; n as usize]);
    }

    fn flush(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        // Answered, so the kernel keeps asking on every close.
        reply.ok();
    }
}

/// Body of the FUSE server process of
/// [`a_file_of_a_stalled_fuse_mount_is_refused_without_stalling_the_server`]:
/// mounts [`OneFile`] on `$VUS_TEST_FUSE_MOUNT` and serves until killed.
#[test]
#[ignore = "helper process of a_file_of_a_stalled_fuse_mount_is_refused_without_stalling_the_server"]
fn fuse_server_process() {
    let Ok(mnt) = std::env::var(FUSE_MOUNT_ENV) else { return };
    let mut cfg = fuser::Config::default();
    cfg.mount_options =
        vec![fuser::MountOption::FSName("vus-stall".into()), fuser::MountOption::Subtype("stall".into())];
    fuser::mount(OneFile, &mnt, &cfg).unwrap();
}

fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts").unwrap_or_default().lines().any(|l| l.split(' ').nth(1) == p.to_str())
}

/// The FUSE server process; stopped, killed and unmounted on drop.
struct FuseServer {
    child: Child,
    mnt: PathBuf,
}

impl FuseServer {
    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
}

impl Drop for FuseServer {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(p) = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 reads a NUL-terminated path that lives for the call.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A DMA_MAP whose fd is a file of a FUSE mount whose server is stopped
/// (SIGSTOP): the server asks that file system nothing (a stat would wait
/// for the stopped server), answers EINVAL with a sentence in its log, and
/// serves the same client (DEVICE_GET_INFO, a DMA_MAP of a memfd, DMA) and
/// the next one while the FUSE server is still stopped.
#[test]
fn a_file_of_a_stalled_fuse_mount_is_refused_without_stalling_the_server() {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("this test mounts a FUSE file system: it needs root and /dev/fuse; not run");
        return;
    }
    let env = Env::new("fuse-stall");
    let mnt = env.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "fuse_server_process", "--nocapture", "--test-threads=1"])
        .env(FUSE_MOUNT_ENV, &mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fuse = FuseServer { child, mnt: mnt.clone() };
    let t0 = Instant::now();
    while !mounted(&mnt) {
        assert!(t0.elapsed() < Duration::from_secs(20), "the FUSE file system was not mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open(mnt.join("mem")).unwrap();
    assert_eq!(file.metadata().unwrap().len(), MEM_SIZE, "the FUSE server answers");
    fuse.signal(nix::sys::signal::Signal::SIGSTOP);

    let (tx, rx) = std::sync::mpsc::channel();
    let sock = env.sock.clone();
    std::thread::spawn(move || {
        let run = || -> Result<(i32, u32, u32), String> {
            let mut c = Client::connect(&sock).map_err(|e| e.to_string())?;
            c.enable_function().map_err(|e| e.to_string())?;
            let refused =
                c.dma_map(RW, 0, 0x10_0000, MEM_SIZE, Some(file.as_fd())).err().and_then(|e| e.errno()).unwrap_or(0);
            c.device_info().map_err(|e| e.to_string())?;
            let mem = memfd("good", 0x10000);
            mem.write_all_at(b"still served", 0).map_err(|e| e.to_string())?;
            c.dma_map(RW, 0, 0x10_0000, 0x10000, Some(mem.as_fd())).map_err(|e| e.to_string())?;
            let same = copy(&mut c, 0x10_0000, 0x10_8000, 12, None);
            drop(c);
            // The next client, the FUSE server still stopped.
            let mut next = next_client(&sock);
            next.device_info().map_err(|e| e.to_string())?;
            next.dma_map(RW, 0, 0x20_0000, 0x10000, Some(mem.as_fd())).map_err(|e| e.to_string())?;
            let other = copy(&mut next, 0x20_0000, 0x20_4000, 12, None);
            let mut b = [0u8; 12];
            mem.read_exact_at(&mut b, 0x4000).map_err(|e| e.to_string())?;
            if &b != b"still served" {
                return Err("the next client's copy did not land".into());
            }
            Ok((refused, same, other))
        };
        let r = run();
        // The FUSE file goes back to be closed once its server runs again
        // (closing it now would wait for the stopped server).
        let _ = tx.send((r, file));
    });
    let got = rx.recv_timeout(Duration::from_secs(30));
    fuse.signal(nix::sys::signal::Signal::SIGCONT);
    let (result, file) = got.expect("the vfio-user server stalled on a file of a stopped FUSE server");
    drop(file);
    let (refused, same, other) = result.unwrap();
    assert_eq!(refused, libc::EINVAL, "a DMA_MAP of a FUSE file");
    assert_eq!((same, other), (regs::STATUS_DONE, regs::STATUS_DONE));
    let log = env.log();
    assert!(log.contains("FUSE, network or unknown file system"), "no sentence in the log:\n{log}");
    drop(fuse);
}
