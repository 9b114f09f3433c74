//! The emulated devices, one module each, and the table the binary uses
//! to pick one by name.

pub mod dma_engine;
pub mod nvme;
pub mod testdev;

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use iommu_core::sync;

use crate::device::Device;

/// Devices the binary can serve: `(name, one-line description)`.
pub const DEVICES: &[(&str, &str)] = &[
    (
        "dma-engine",
        "PASID-capable DMA engine: 4 work queues, copy/fill/compare/CRC-32C, vPASID descriptors, MSI-X, MSI",
    ),
    (
        "nvme",
        "NVMe controller (NVM command set, one namespace on --backing FILE), MSI-X, MSI, INTx, mmap-able doorbells",
    ),
    ("test-device", "registers, sparse-mmap RAM BAR, MSI-X, MSI, INTx, ioeventfd doorbell and a DMA copy engine"),
];

/// What every device can be asked for when it is made.
#[derive(Debug, Clone)]
pub struct Options {
    /// Offer an MSI-X capability (its table and PBA in a BAR of their
    /// own). Without it a device has MSI and INTx only.
    pub msix: bool,
    /// Storage of a device that has some (`nvme`): a file or block device.
    pub backing: Option<std::path::PathBuf>,
    /// Size of that storage in bytes, if not the file's.
    pub size: Option<u64>,
    /// Refuse writes to that storage.
    pub read_only: bool,
    /// Offer no mmap of doorbells (`nvme`): every doorbell write traps.
    pub trap_doorbells: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { msix: true, backing: None, size: None, read_only: false, trap_doorbells: false }
    }
}

/// Makes the device called `name` with the defaults.
pub fn make(name: &str) -> Option<std::io::Result<Box<dyn Device>>> {
    make_with(name, Options::default())
}

/// Makes the device called `name` with `opts`.
pub fn make_with(name: &str, opts: Options) -> Option<std::io::Result<Box<dyn Device>>> {
    match name {
        "dma-engine" => Some(dma_engine::DmaEngine::with_options(opts).map(|d| Box::new(d) as Box<dyn Device>)),
        "nvme" => Some(match &opts.backing {
            Some(b) => {
                let cfg = nvme::Config {
                    backing: b.clone(),
                    size: opts.size,
                    read_only: opts.read_only,
                    msix: opts.msix,
                    trap_doorbells: opts.trap_doorbells,
                };
                nvme::Nvme::new(&cfg).map(|d| Box::new(d) as Box<dyn Device>)
            }
            None => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "nvme needs --backing FILE")),
        }),
        "test-device" => Some(testdev::TestDevice::with_msix(opts.msix).map(|d| Box::new(d) as Box<dyn Device>)),
        _ => None,
    }
}

/// [`Condvar::wait`] on `guard`, a guard of `m`. Waking takes `m` again; if
/// it was poisoned meanwhile, [`sync::lock`] of it aborts the process, as
/// every other acquisition of these locks does.
fn wait<'a, T>(cv: &Condvar, m: &'a Mutex<T>, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|poisoned| {
        drop(poisoned);
        sync::lock(m)
    })
}

/// [`Condvar::wait_timeout`] on `guard`, a guard of `m`, for at most `d`;
/// poisoning is fatal as in [`wait`].
fn wait_timeout<'a, T>(cv: &Condvar, m: &'a Mutex<T>, guard: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    match cv.wait_timeout(guard, d) {
        Ok((g, _)) => g,
        Err(poisoned) => {
            drop(poisoned);
            sync::lock(m)
        }
    }
}
