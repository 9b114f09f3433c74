//! The device framework: what an emulated PCI function declares (config
//! space, regions, interrupts, capabilities for the core) and the
//! [`Device`] trait the protocol worker drives. Config space, the MSI-X
//! table and PBA, interrupts, DMA routing and migration framing are done
//! by the framework; a device implements its registers and state.

use std::fs::File;
use std::sync::Arc;

use iommu_core::types::DeviceCaps;

use crate::dma::Dma;
use crate::irq::{IrqLayout, Irqs};
use crate::pci::{ConfigEvent, PciConfig};
use crate::proto::SparseArea;

/// An errno for the client.
pub type Errno = i32;

/// How part of a region is shared with the client for mmap.
#[derive(Debug, Clone)]
pub struct MmapDesc {
    /// The file backing the region.
    pub file: Arc<File>,
    /// Offset of the region in the file.
    pub file_offset: u64,
    /// Areas that may be mapped (relative to the region); empty means the
    /// whole region.
    pub areas: Vec<SparseArea>,
}

/// One region (BAR or ROM) of the device.
#[derive(Debug, Clone)]
pub struct RegionDesc {
    /// Region index (0-5 BARs, 6 ROM).
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// mmap-able parts.
    pub mmap: Option<MmapDesc>,
}

/// Where the MSI-X table and PBA live.
#[derive(Debug, Clone, Copy)]
pub struct MsixDesc {
    /// BAR of the table.
    pub table_bar: u32,
    /// Offset of the table in it.
    pub table_offset: u64,
    /// BAR of the PBA.
    pub pba_bar: u32,
    /// Offset of the PBA in it.
    pub pba_offset: u64,
    /// Vectors.
    pub vectors: u32,
}

impl MsixDesc {
    /// Whether `[offset, offset+len)` of region `index` is table or PBA,
    /// and the offset within it.
    pub fn locate(&self, index: u32, offset: u64, len: usize) -> Option<(bool, u64)> {
        let table_len = u64::from(self.vectors) * 16;
        let pba_len = u64::from(self.vectors).div_ceil(64) * 8;
        let end = offset.checked_add(len as u64)?;
        if index == self.table_bar && offset >= self.table_offset && end <= self.table_offset + table_len {
            return Some((false, offset - self.table_offset));
        }
        if index == self.pba_bar && offset >= self.pba_offset && end <= self.pba_offset + pba_len {
            return Some((true, offset - self.pba_offset));
        }
        None
    }
}

/// An ioeventfd a device offers for a register (GET_REGION_IO_FDS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoFdDesc {
    /// Region.
    pub region: u32,
    /// Offset of the register.
    pub offset: u64,
    /// Access size.
    pub size: u64,
    /// Value written, if the eventfd should match only it.
    pub datamatch: Option<u64>,
}

/// What a device declares about itself.
pub struct DeviceDesc {
    /// Short name, e.g. `test-device`.
    pub name: &'static str,
    /// Config space with BARs and capabilities declared.
    pub config: PciConfig,
    /// BARs and ROM.
    pub regions: Vec<RegionDesc>,
    /// Interrupt vectors.
    pub irqs: IrqLayout,
    /// MSI-X table and PBA location.
    pub msix: Option<MsixDesc>,
    /// What the core is told at bind.
    pub caps: DeviceCaps,
    /// Registers a client may turn into ioeventfds.
    pub io_fds: Vec<IoFdDesc>,
}

/// What a running device is given: its DMA path and its interrupts.
#[derive(Clone)]
pub struct DeviceContext {
    /// DMA through the core's IOASes.
    pub dma: Arc<Dma>,
    /// Interrupts.
    pub irqs: Arc<Irqs>,
}

/// An emulated PCI function. Config space, MSI-X table/PBA and the config
/// region are handled by the framework; the device sees only its own BAR
/// and ROM accesses.
pub trait Device: Send {
    /// Declares the device. Called once, before anything else.
    fn describe(&self) -> DeviceDesc;

    /// Hands the device its DMA path and interrupts.
    fn start(&mut self, ctx: DeviceContext);

    /// Reads `buf.len()` bytes at `offset` of region `index`.
    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno>;

    /// Writes `data` at `offset` of region `index`.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;

    /// Whether an access of `len` bytes at `offset` of region `index` (a
    /// write of `data`, or a read if `data` is `None`) may be done on the
    /// thread reading the client's socket instead of the device thread: true only if it
    /// never waits for another thread (for a queue to stop, for the
    /// client, for the core). That thread asks only while the device
    /// thread is idle, and holds the device meanwhile. By default every
    /// access goes to the device thread.
    fn answers_inline(&self, _index: u32, _offset: u64, _len: usize, _data: Option<&[u8]>) -> bool {
        false
    }

    /// A config space write changed something the device may act on.
    fn config_event(&mut self, _ev: ConfigEvent) {}

    /// Device (or function-level) reset: back to power-on state. Work in
    /// flight is finished or dropped before this returns.
    fn reset(&mut self) {}

    /// The client went away: drop work queued on its behalf (its DMA
    /// addresses mean nothing to the next client) and stop sharing memory
    /// with it (a region's mmap fd may be replaced; the worker asks
    /// [`Device::describe`] again). Device state otherwise stays.
    fn client_gone(&mut self) {}

    /// Migration: stop (`false`) or resume (`true`) all device activity.
    /// When this returns `false`, no DMA or interrupt may happen.
    fn set_running(&mut self, _running: bool) {}

    /// Migration: the device's state as bytes (called while stopped).
    fn save(&mut self) -> Result<Vec<u8>, Errno> {
        Ok(Vec::new())
    }

    /// Migration: restores state saved by [`Device::save`] (called while
    /// stopped). Must validate everything: the bytes come from a client.
    fn load(&mut self, data: &[u8]) -> Result<(), Errno> {
        if data.is_empty() {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    }

    /// Lines describing the device's state, for logs and observers.
    fn status(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Copies bytes `off..off+buf.len()` of the little-endian 64-bit register
/// value `v` into `buf` (bytes past the register read as 0).
pub fn reg_read(v: u64, off: u64, buf: &mut [u8]) {
    let b = v.to_le_bytes();
    for (i, x) in buf.iter_mut().enumerate() {
        *x = usize::try_from(off).ok().and_then(|o| b.get(o + i)).copied().unwrap_or(0);
    }
}

/// The 64-bit register value `old` with `data` written at byte `off`
/// (bytes past the register are ignored).
pub fn reg_merge(old: u64, off: u64, data: &[u8]) -> u64 {
    let mut b = old.to_le_bytes();
    for (i, x) in data.iter().enumerate() {
        if let Some(d) = usize::try_from(off).ok().and_then(|o| b.get_mut(o + i)) {
            *d = *x;
        }
    }
    u64::from_le_bytes(b)
}
