//! Shared setup: a core and a test-device server in this process, on
//! sockets in a fresh directory.
#![allow(dead_code)]

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vfio_user_server::client::Client;
use vfio_user_server::devices::testdev::{regs, TestDevice};
use vfio_user_server::dma::PasidPolicy;
use vfio_user_server::server::{self, Options};

/// A fresh directory for test `name` with a core in this process on
/// `core.sock` in it: (directory, core socket, the running core).
pub fn dir_with_core(name: &str) -> (PathBuf, PathBuf, iommu_core::server::Running) {
    let dir = std::env::temp_dir().join(format!("vus-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let core_path = dir.join("core.sock");
    let core = iommu_core::server::spawn(&core_path, iommu_core::types::Limits::default()).unwrap();
    (dir, core_path, core)
}

/// The next client of the server at `sock`, once it has seen the previous
/// one leave (it serves one at a time and turns others away until then),
/// with the function enabled as a guest's PCI core and driver do: BARs
/// decode and the device may DMA (tests of the reset state clear it).
pub fn next_client(sock: &std::path::Path) -> Client {
    let t0 = Instant::now();
    loop {
        match Client::connect(sock) {
            Ok(mut c) => {
                c.enable_function().unwrap();
                return c;
            }
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(20), "no client accepted: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct Stack {
    pub dir: PathBuf,
    pub core: Option<iommu_core::server::Running>,
    pub server: Option<server::Running>,
    pub core_path: PathBuf,
    pub sock: PathBuf,
}

impl Stack {
    pub fn new(name: &str) -> Stack {
        Self::with_policy(name, PasidPolicy::Global)
    }

    pub fn with_policy(name: &str, policy: PasidPolicy) -> Stack {
        let (dir, core_path, core) = dir_with_core(name);
        let sock = dir.join("dev.sock");
        let server = start_server(&core_path, &sock, policy);
        Stack { dir, core: Some(core), server: Some(server), core_path, sock }
    }

    /// A client, once the server has seen the previous one leave (it
    /// serves one at a time and turns others away until then).
    pub fn client(&self) -> Client {
        next_client(&self.sock)
    }

    pub fn server(&self) -> &server::Running {
        self.server.as_ref().unwrap()
    }

    pub fn observer(&self) -> iommu_core::client::Client {
        iommu_core::client::Client::observer(&self.core_path).unwrap()
    }

    pub fn session(&self) -> iommu_core::client::Client {
        iommu_core::client::Client::session(&self.core_path).unwrap()
    }
}

pub fn start_server(core: &std::path::Path, sock: &std::path::Path, policy: PasidPolicy) -> server::Running {
    let dev = Box::new(TestDevice::new().unwrap());
    let opts = Options { pasid_policy: policy, ..Options::new(sock, core) };
    server::spawn(dev, opts).unwrap()
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
        if let Some(c) = self.core.take() {
            let _ = c.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn memfd(name: &str, size: u64) -> std::fs::File {
    iommu_core::memfd::create(name, size).unwrap()
}

pub fn rd32(c: &mut Client, region: u32, off: u64) -> u32 {
    let b = c.region_read(region, off, 4).unwrap();
    u32::from_le_bytes(b.try_into().unwrap())
}

pub fn wr32(c: &mut Client, region: u32, off: u64, v: u32) {
    c.region_write(region, off, &v.to_le_bytes()).unwrap();
}

pub fn wr64(c: &mut Client, region: u32, off: u64, v: u64) {
    c.region_write(region, off, &v.to_le_bytes()).unwrap();
}

/// Programs a copy on the test device and waits for it to finish; returns
/// the final status. Polling serves DMA_READ/WRITE requests meanwhile.
pub fn copy(c: &mut Client, src: u64, dst: u64, len: u32, vpasid: Option<u32>) -> u32 {
    let done0 = rd32(c, 0, regs::DMA_DONE) + rd32(c, 0, regs::DMA_ERRORS);
    wr64(c, 0, regs::DMA_SRC, src);
    wr64(c, 0, regs::DMA_DST, dst);
    wr32(c, 0, regs::DMA_LEN, len);
    wr32(c, 0, regs::DMA_PASID, vpasid.map_or(0, |v| v | regs::PASID_VALID));
    wr32(c, 0, regs::DMA_CMD, 1);
    let t0 = Instant::now();
    loop {
        let done = rd32(c, 0, regs::DMA_DONE) + rd32(c, 0, regs::DMA_ERRORS);
        if done != done0 {
            return rd32(c, 0, regs::DMA_STATUS);
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "copy did not finish");
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn eventfd() -> std::fs::File {
    vfio_user_server::irq::eventfd().unwrap()
}

/// Reads an eventfd's counter, waiting up to 5 s for it to become non-zero.
pub fn wait_count(f: &std::fs::File) -> u64 {
    vfio_user_server::irq::wait_eventfd(f, Duration::from_secs(5))
}

/// Reads an eventfd's counter now (0 if nothing pending).
pub fn count_now(f: &std::fs::File) -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match (&*f).read(&mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

pub fn _fd_ok(f: &std::fs::File) -> bool {
    f.as_fd().try_clone_to_owned().is_ok()
}
