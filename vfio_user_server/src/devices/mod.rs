//! The emulated devices, one module each, and the table the binary uses
//! to pick one by name.

pub mod dma_engine;
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
    ("test-device", "registers, sparse-mmap RAM BAR, MSI-X, MSI, INTx, ioeventfd doorbell and a DMA copy engine"),
];

/// What every device can be asked for when it is made.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Offer an MSI-X capability (its table and PBA in a BAR of their
    /// own). Without it a device has MSI and INTx only.
    pub msix: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { msix: true }
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
