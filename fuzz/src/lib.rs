//! Helpers shared by the fuzz targets: a cursor over the fuzzer's bytes and
//! the long-lived processes (a core, device servers) some targets talk to.

#![allow(clippy::missing_panics_doc)]

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use iommu_core::types::Limits;

/// Reads values off the fuzzer's input; runs dry into zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte (0 when dry).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// The limits the fuzzed core runs with: small, so the fuzzer reaches
/// them.
pub fn small_limits() -> Limits {
    Limits {
        max_sessions: 64,
        max_objects_per_session: 32,
        max_mappings_per_ioas: 256,
        max_ranges_per_ioas: 16,
        max_ppasids_per_session: 16,
        max_message_bytes: 1 << 16,
        max_fds_per_message: 4,
        fault_queue_depth: 64,
        table_pool_bytes: 8 << 20,
        max_devices_per_session: 8,
        max_channels_per_session: 4,
        invalidate_timeout_ms: 500,
        ..Limits::default()
    }
}

struct Shared {
    _dir: tempfile::TempDir,
    core: PathBuf,
    _running: iommu_core::server::Running,
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let core = dir.path().join("core.sock");
        let running = iommu_core::server::spawn(&core, small_limits()).expect("start the core");
        Shared { _dir: dir, core, _running: running }
    })
}

/// The socket of a core started once per fuzzing process.
pub fn core_socket() -> &'static Path {
    &shared().core
}

/// The devices the vfio-user target talks to.
pub const DEVICES: [&str; 3] = ["dma-engine", "test-device", "nvme"];

struct Servers {
    _dir: tempfile::TempDir,
    sockets: Vec<PathBuf>,
    controls: Vec<PathBuf>,
    _running: Vec<vfio_user_server::server::Running>,
}

fn servers() -> &'static Servers {
    static S: OnceLock<Servers> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut sockets = Vec::new();
        let mut controls = Vec::new();
        let mut running = Vec::new();
        for name in DEVICES {
            let sock = dir.path().join(format!("{name}.sock"));
            let control = dir.path().join(format!("{name}.ctl"));
            let device = if name == "nvme" {
                // A 1 MiB namespace in the directory.
                let backing = dir.path().join("nvme.img");
                std::fs::File::create(&backing).and_then(|f| f.set_len(1 << 20)).expect("the nvme backing file");
                let opts = vfio_user_server::devices::Options {
                    backing: Some(backing),
                    ..vfio_user_server::devices::Options::default()
                };
                vfio_user_server::devices::make_with(name, opts)
            } else {
                vfio_user_server::devices::make(name)
            };
            let device = device.expect("a known device").expect("make the device");
            let opts = vfio_user_server::server::Options {
                control: Some(control.clone()),
                ..vfio_user_server::server::Options::new(&sock, core_socket())
            };
            running.push(vfio_user_server::server::spawn(device, opts).expect("start the server"));
            sockets.push(sock);
            controls.push(control);
        }
        Servers { _dir: dir, sockets, controls, _running: running }
    })
}

/// Sockets of one vfio-user server per entry of [`DEVICES`], started once
/// per fuzzing process against [`core_socket`].
pub fn device_sockets() -> &'static [PathBuf] {
    &servers().sockets
}

/// The control sockets of the same servers (an orchestrator's, speaking
/// the ioasid extension only).
pub fn control_sockets() -> &'static [PathBuf] {
    &servers().controls
}

/// Sends all of `bytes` on `sock`, `fds` with the first byte; false if the
/// peer hung up.
pub fn send_all(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    let mut off = 0;
    while off < bytes.len() {
        let f = if off == 0 { fds } else { &[] };
        match iommu_core::wire::send_with_fds(sock.as_fd(), &bytes[off..], f) {
            Ok(n) => off += n,
            Err(_) => return false,
        }
    }
    true
}
