//! vfio-user servers for emulated PCI devices whose DMA always goes
//! through an I/O address space of the `iommu_core` daemon.
//!
//! - [`proto`]: the wire format of every command and of the ioasid extension.
//! - [`conn`], [`server`]: the mio event loop, message framing, one client
//!   at a time, server-to-client DMA requests.
//! - [`worker`]: the device thread executing commands in order.
//! - [`pci`], [`irq`]: config space and interrupt emulation.
//! - [`dma`]: the client's DMA table on a compat IOAS, the extension
//!   binding and its vPASID -> pPASID map, and following the core: after
//!   it went away, reconnecting and rebuilding the compat IOAS.
//! - [`device`], [`devices`]: the device trait and the devices.
//! - [`client`]: a blocking client of the protocol (tests, examples).
#![deny(missing_docs)]

pub mod client;
pub mod conn;
pub mod device;
pub mod devices;
pub mod dma;
pub mod irq;
pub mod pci;
pub mod proto;
pub mod server;
pub mod worker;
