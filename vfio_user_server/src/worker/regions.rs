//! Region accesses and the function state: config space, the MSI-X table
//! and PBA, BAR decode gated by the command register and D0, REGION_READ,
//! REGION_WRITE and REGION_WRITE_MULTI; bus mastering, INTx, MSI masks and
//! the power state handed to DMA and interrupts; resets.

use zerocopy::IntoBytes;

use super::{mig, need, ok, Res, Worker, MAX_XFER};
use crate::pci::ConfigEvent;
use crate::proto::{self, region};

impl Worker {
    fn region_size(&self, index: u32) -> Option<u64> {
        if index == region::CONFIG {
            return Some(self.config.size() as u64);
        }
        self.regions.get(index as usize)?.as_ref().map(|r| r.size)
    }

    fn check_range(&self, index: u32, offset: u64, len: usize) -> Result<(), i32> {
        let size = self.region_size(index).ok_or(libc::EINVAL)?;
        let end = offset.checked_add(len as u64).ok_or(libc::EINVAL)?;
        if end > size || len == 0 {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    /// Whether an access of `len` bytes at `offset` of region `index` (a
    /// write of `data`, or a read) can be done on the reader thread:
    /// nothing it does waits for another thread. Accesses that fail go to
    /// the device thread, which answers them with their errno.
    pub(super) fn inline_ok(&self, index: u32, offset: u64, len: usize, data: Option<&[u8]>) -> bool {
        if self.check_range(index, offset, len).is_err() {
            return false;
        }
        if index == region::CONFIG {
            // A config write may reset the function or stop its DMA.
            return data.is_none();
        }
        if !self.decodes(index) || self.msix.and_then(|m| m.locate(index, offset, len)).is_some() {
            return true;
        }
        let allowed =
            self.regions[index as usize].as_ref().is_some_and(|r| if data.is_some() { r.write } else { r.read });
        allowed && self.device.answers_inline(index, offset, len, data)
    }

    /// Reads a region: config space, the MSI-X table or PBA, or the device.
    pub fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.check_range(index, offset, buf.len())?;
        if index == region::CONFIG {
            let (intx, msi) = (self.irqs.intx_level(), self.irqs.pending_bits(crate::proto::irq_index::MSI));
            return self.config.read_with(offset, buf, intx, msi).map_err(|_| libc::EINVAL);
        }
        if !self.decodes(index) {
            // No decode: the access ends in a master abort, which reads all
            // ones (PCI Local Bus 3.0, 6.2.1).
            buf.fill(0xff);
            return Ok(());
        }
        if let Some((pba, off)) = self.msix.and_then(|m| m.locate(index, offset, buf.len())) {
            return if self.irqs.msix_read(pba, off, buf) { Ok(()) } else { Err(libc::EINVAL) };
        }
        if !self.regions[index as usize].as_ref().is_some_and(|r| r.read) {
            return Err(libc::EINVAL);
        }
        self.device.region_read(index, offset, buf)
    }

    /// Writes a region.
    pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        self.check_range(index, offset, data.len())?;
        if index == region::CONFIG {
            let events = self.config.write(offset, data).map_err(|_| libc::EINVAL)?;
            for ev in events {
                match ev {
                    ConfigEvent::FunctionReset => self.reset(),
                    // D3hot to D0 with No_Soft_Reset clear (PMCSR bit 3) is
                    // a reset of the function's state, config space
                    // included (PCI PM 1.2, 5.4.1).
                    ConfigEvent::PowerState { from: 3, to: 0 } => {
                        self.reset();
                        self.device.config_event(ev);
                    }
                    ConfigEvent::MsiMask(bits) => {
                        self.apply_msi_mask(bits);
                        self.device.config_event(ev);
                    }
                    _ => {
                        let master = self.apply_function_state();
                        self.device.config_event(ev);
                        if let Some(on) = master {
                            self.device.config_event(ConfigEvent::BusMaster(on));
                        }
                    }
                }
            }
            return Ok(());
        }
        if !self.decodes(index) {
            // No decode: the write is dropped (a master abort).
            return Ok(());
        }
        if let Some((pba, off)) = self.msix.and_then(|m| m.locate(index, offset, data.len())) {
            return if self.irqs.msix_write(pba, off, data) { Ok(()) } else { Err(libc::EINVAL) };
        }
        if !self.regions[index as usize].as_ref().is_some_and(|r| r.write) {
            return Err(libc::EINVAL);
        }
        self.device.region_write(index, offset, data)
    }

    pub(super) fn cmd_region_read(&mut self, p: &[u8]) -> Res {
        let q: proto::RegionAccess = need(p)?;
        let n = q.count as usize;
        if n > MAX_XFER {
            return Err(libc::E2BIG);
        }
        let mut out = vec![0u8; 16 + n];
        out[..16].copy_from_slice(q.as_bytes());
        self.region_read(q.region, q.offset, &mut out[16..])?;
        Ok((out, Vec::new()))
    }

    pub(super) fn cmd_region_write(&mut self, p: &[u8]) -> Res {
        let q: proto::RegionAccess = need(p)?;
        let n = q.count as usize;
        if n > MAX_XFER {
            return Err(libc::E2BIG);
        }
        let data = p.get(16..16 + n).ok_or(libc::EINVAL)?;
        if p.len() != 16 + n {
            return Err(libc::EINVAL);
        }
        self.region_write(q.region, q.offset, data)?;
        ok(q.as_bytes())
    }

    pub(super) fn write_multi(&mut self, p: &[u8]) -> Res {
        let cnt = u64::from_ne_bytes(p.get(..8).ok_or(libc::EINVAL)?.try_into().map_err(|_| libc::EINVAL)?);
        if cnt == 0 || cnt > proto::MAX_WRITE_MULTI || p.len() as u64 != 8 + 24 * cnt {
            return Err(libc::EINVAL);
        }
        // Validate every entry before applying any.
        let mut wrs = Vec::with_capacity(cnt as usize);
        for k in 0..cnt as usize {
            let e: proto::WriteMultiEntry = need(&p[8 + 24 * k..])?;
            if e.count == 0 || e.count > 8 {
                return Err(libc::EINVAL);
            }
            self.check_range(e.region, e.offset, e.count as usize)?;
            wrs.push(e);
        }
        for e in &wrs {
            self.region_write(e.region, e.offset, &e.data[..e.count as usize])?;
        }
        ok(&cnt.to_ne_bytes())
    }

    /// Whether BAR `index` decodes accesses: Memory (or I/O) Space Enable
    /// is set and the function is in D0. Config space, the ROM (read by a
    /// VMM to copy it, as VFIO does) and the other regions always decode.
    fn decodes(&self, index: u32) -> bool {
        if index >= 6 {
            return true;
        }
        let cmd = self.config.command();
        let bit = match self.config.bar_kind(index as usize) {
            Some(crate::pci::BarKind::Io) => crate::pci::command::IO,
            _ => crate::pci::command::MEMORY,
        };
        cmd & bit != 0 && self.config.power_state() == 0
    }

    /// Hands the command register and the power state to the parts that
    /// obey them: bus mastering gates device DMA, Interrupt Disable gates
    /// INTx, D3hot gates every interrupt.
    /// Returns the new bus-master state if it changed.
    pub(super) fn apply_function_state(&self) -> Option<bool> {
        let cmd = self.config.command();
        let d0 = self.config.power_state() == 0;
        let master = d0 && cmd & crate::pci::command::BUS_MASTER != 0;
        let was = self.dma.bus_master();
        self.dma.set_bus_master(master);
        self.irqs.set_intx_disabled(cmd & crate::pci::command::INTX_DISABLE != 0);
        self.irqs.set_quiesced(!d0);
        (was != master).then_some(master)
    }

    /// The MSI capability's Mask Bits gate MSI vectors as SET_IRQS masks
    /// do: a masked vector's interrupt waits, pending, until unmasked.
    pub(super) fn apply_msi_mask(&self, bits: u32) {
        let n = self.irqs.layout().msi.min(32);
        for v in 0..n {
            self.irqs.set_mask(crate::proto::irq_index::MSI, v, bits & (1 << v) != 0);
        }
    }

    pub(super) fn reset(&mut self) {
        // DMA stops first: nothing the device still does can reach memory.
        self.dma.set_bus_master(false);
        self.device.reset();
        self.config.reset();
        self.irqs.reset();
        // Bus mastering is off (it was turned off above): no event.
        self.apply_function_state();
        // Reset returns the device to RUNNING (ERROR included) and ends any
        // migration data transfer.
        if self.mig_state != mig::RUNNING {
            self.mig_state = mig::RUNNING;
            self.mig_out.clear();
            self.mig_pos = 0;
            self.mig_in.clear();
            self.device.set_running(true);
        }
    }
}
