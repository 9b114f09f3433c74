//! The emulated devices, one module each, and the table the binary uses
//! to pick one by name.

pub mod dma_engine;
pub mod testdev;

use crate::device::Device;

/// Devices the binary can serve: `(name, one-line description)`.
pub const DEVICES: &[(&str, &str)] = &[
    ("dma-engine", "PASID-capable DMA engine: 4 work queues, copy/fill/compare/CRC-32C, vPASID descriptors, MSI-X"),
    ("test-device", "registers, sparse-mmap RAM BAR, MSI-X, INTx, ioeventfd doorbell and a DMA copy engine"),
];

/// Makes the device called `name`.
pub fn make(name: &str) -> Option<std::io::Result<Box<dyn Device>>> {
    match name {
        "dma-engine" => Some(dma_engine::DmaEngine::new().map(|d| Box::new(d) as Box<dyn Device>)),
        "test-device" => Some(testdev::TestDevice::new().map(|d| Box::new(d) as Box<dyn Device>)),
        _ => None,
    }
}
