//! Shared harness of the in-process socket suites: one core per test on
//! its own socket, and the errno of a call that must fail.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use iommu_core::client::{self, Client};
use iommu_core::server::{self, Running};
use iommu_core::types::{Limits, MapArgs, Perm};
use iommu_core::Errno;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One in-process core on its own socket in its own directory.
pub struct Env {
    srv: Option<Running>,
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl Env {
    pub fn new(name: &str) -> Env {
        Env::with(name, Limits::default())
    }

    pub fn with(name: &str, limits: Limits) -> Env {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ioasid-conf-{}-{}-{}", std::process::id(), name, n));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("core.sock");
        let srv = server::spawn(&path, limits).expect("spawn the core");
        Env { srv: Some(srv), dir, path }
    }

    pub fn session(&self) -> Client {
        Client::session(&self.path).expect("open a session")
    }

    pub fn observer(&self) -> Client {
        Client::observer(&self.path).expect("connect an observer")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.srv.take() {
            let _ = s.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The errno of a call that must fail.
#[track_caller]
pub fn errno<T: std::fmt::Debug>(r: client::Result<T>) -> Errno {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.errno().unwrap_or_else(|| panic!("expected an errno, got {e}")),
    }
}

/// A memfd of `size` bytes registered with session `s`: the file and the
/// memory object's id.
pub fn memory(s: &mut Client, size: u64) -> (std::fs::File, u32) {
    let f = iommu_core::memfd::create("ram", size).unwrap();
    let m = s.register_memory(&f).unwrap();
    (f, m.id)
}

/// Maps `length` bytes of `mem` from `offset` at the fixed `iova` of `ioas`.
pub fn map_at(s: &mut Client, ioas: u32, mem: u32, offset: u64, length: u64, iova: u64, perm: Perm) {
    s.map(MapArgs { ioas, mem, offset, length, iova: Some(iova), perm }).unwrap();
}
