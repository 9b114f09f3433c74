//! The emulated devices, one module each, and the table the binary uses
//! to pick one by name.

pub mod testdev;

use crate::device::Device;

/// Devices the binary can serve: `(name, one-line description)`.
pub const DEVICES: &[(&str, &str)] =
    &[("test-device", "registers, sparse-mmap RAM BAR, MSI-X, INTx, ioeventfd doorbell and a DMA copy engine")];

/// Makes the device called `name`.
pub fn make(name: &str) -> Option<std::io::Result<Box<dyn Device>>> {
    match name {
        "test-device" => Some(testdev::TestDevice::new().map(|d| Box::new(d) as Box<dyn Device>)),
        _ => None,
    }
}
