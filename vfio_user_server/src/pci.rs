//! PCI configuration space emulation: the type 0 header, BAR sizing,
//! the capability list (power management, MSI, MSI-X, PCI Express) and the
//! extended capabilities of a PASID device (PASID, ATS, PRI).
//!
//! Every byte has a write mask and a write-1-to-clear mask, so read-only
//! bits stay put, sizing a BAR (writing all ones and reading back) returns
//! its size mask, and status bits clear when written with 1. A write
//! reports what it changed that the device must act on ([`ConfigEvent`]).

/// Errors of config space access.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Access outside the config space.
    #[error("config access at {offset:#x}+{len} is outside the {size}-byte config space")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Config space size.
        size: usize,
    },
}

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
    /// Class code (base, sub, programming interface), 24 bits.
    pub class: u32,
    /// Revision.
    pub revision: u8,
}

/// Kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (takes two BAR slots).
    Mem64,
    /// I/O ports.
    Io,
}

/// What a config write changed that the device must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigEvent {
    /// The command register changed.
    Command(u16),
    /// PCIe function-level reset was initiated.
    FunctionReset,
    /// The MSI-X enable or function-mask bit changed.
    MsixControl {
        /// MSI-X enabled.
        enabled: bool,
        /// All vectors masked.
        masked: bool,
    },
    /// The PASID control register changed.
    PasidControl(u16),
    /// The PRI control register changed.
    PriControl(u16),
    /// The function may (`true`) or may no longer (`false`) master the bus:
    /// Bus Master Enable together with D0 changed. Never reported by
    /// [`PciConfig::write`]: the framework reports it after applying a
    /// command register or power state change (and after a reset), so a
    /// device can wait for its DMA in flight when it goes off.
    BusMaster(bool),
    /// The MSI capability's Mask Bits changed (bit v masks vector v).
    MsiMask(u32),
    /// The power state (PMCSR bits 1:0) changed: 0 is D0, 3 is D3hot.
    /// Writes of the unsupported D1 and D2 are discarded, as the PM spec
    /// requires, and report nothing.
    PowerState {
        /// State before the write.
        from: u8,
        /// State after it.
        to: u8,
    },
}

/// Capability ids.
pub mod cap_id {
    /// Power management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// PCI Express.
    pub const PCIE: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
    /// Extended: ATS.
    pub const ATS: u16 = 0x0f;
    /// Extended: PRI.
    pub const PRI: u16 = 0x13;
    /// Extended: PASID.
    pub const PASID: u16 = 0x1b;
}

/// Standard header offsets.
pub mod reg {
    /// Vendor id.
    pub const VENDOR_ID: usize = 0x00;
    /// Device id.
    pub const DEVICE_ID: usize = 0x02;
    /// Command.
    pub const COMMAND: usize = 0x04;
    /// Status.
    pub const STATUS: usize = 0x06;
    /// Revision.
    pub const REVISION: usize = 0x08;
    /// Class code (3 bytes from 0x09).
    pub const CLASS: usize = 0x09;
    /// Header type.
    pub const HEADER_TYPE: usize = 0x0e;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor id.
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem id.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Expansion ROM BAR.
    pub const ROM: usize = 0x30;
    /// Capability pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin.
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// First extended capability.
    pub const EXT_CAP: usize = 0x100;
}

/// Command register bits.
pub mod command {
    /// I/O space enable.
    pub const IO: u16 = 1 << 0;
    /// Memory space enable.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master enable.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

const STATUS_CAP_LIST: u16 = 1 << 4;
const STATUS_INTERRUPT: u16 = 1 << 3;

/// Where a capability was placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapOffsets {
    /// Power management.
    pub pm: Option<usize>,
    /// MSI.
    pub msi: Option<usize>,
    /// MSI-X.
    pub msix: Option<usize>,
    /// PCI Express.
    pub pcie: Option<usize>,
    /// PASID.
    pub pasid: Option<usize>,
    /// ATS.
    pub ats: Option<usize>,
    /// PRI.
    pub pri: Option<usize>,
}

/// An emulated configuration space.
#[derive(Debug, Clone)]
pub struct PciConfig {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    bars: [(Option<BarKind>, u64); 6],
    rom_size: u64,
    /// Offset of the last capability's next pointer.
    last_cap_next: usize,
    next_cap: usize,
    last_ext: Option<usize>,
    next_ext: usize,
    caps: CapOffsets,
}

impl PciConfig {
    /// A type 0 header; `pcie` selects a 4 KiB PCI Express config space,
    /// otherwise 256 bytes.
    pub fn new(ids: PciIds, pcie: bool) -> PciConfig {
        let size = if pcie { 4096 } else { 256 };
        let mut c = PciConfig {
            bytes: vec![0; size],
            wmask: vec![0; size],
            w1c: vec![0; size],
            bars: [(None, 0); 6],
            rom_size: 0,
            last_cap_next: reg::CAP_PTR,
            next_cap: 0x40,
            last_ext: None,
            next_ext: reg::EXT_CAP,
            caps: CapOffsets::default(),
        };
        c.set16(reg::VENDOR_ID, ids.vendor);
        c.set16(reg::DEVICE_ID, ids.device);
        c.set8(reg::REVISION, ids.revision);
        c.set8(reg::CLASS, ids.class as u8);
        c.set8(reg::CLASS + 1, (ids.class >> 8) as u8);
        c.set8(reg::CLASS + 2, (ids.class >> 16) as u8);
        c.set16(reg::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set16(reg::SUBSYSTEM_ID, ids.subsystem);
        c.mask16(reg::COMMAND, 0x0547);
        c.w1c16(reg::STATUS, 0xf900);
        // Cache line size and latency timer are plain storage.
        c.mask8(0x0c, 0xff);
        c.mask8(0x0d, 0xff);
        c.mask8(reg::INTERRUPT_LINE, 0xff);
        if pcie {
            // A PCIe config space ends its extended list with an empty header.
            c.set32(reg::EXT_CAP, 0);
        }
        c
    }

    /// Size of the config space.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// Where the capabilities are.
    pub fn caps(&self) -> CapOffsets {
        self.caps
    }

    /// Declares BAR `index` (a 64-bit BAR also takes `index + 1`). `size`
    /// must be a power of two (at least 16 for memory, 4 for I/O).
    pub fn set_bar(&mut self, index: usize, kind: BarKind, size: u64, prefetchable: bool) {
        assert!(index < 6 && size.is_power_of_two(), "BAR {index} of size {size:#x} is not valid");
        let off = reg::BAR0 + 4 * index;
        self.bars[index] = (Some(kind), size);
        match kind {
            BarKind::Io => {
                self.set32(off, 1);
                self.mask32(off, !(size as u32 - 1) & !0x3);
            }
            BarKind::Mem32 => {
                self.set32(off, if prefetchable { 0x8 } else { 0 });
                self.mask32(off, !(size as u32).wrapping_sub(1) & !0xf);
            }
            BarKind::Mem64 => {
                assert!(index < 5, "a 64-bit BAR cannot start in slot 5");
                let m = !(size - 1);
                self.set32(off, 0x4 | if prefetchable { 0x8 } else { 0 });
                self.mask32(off, m as u32 & !0xf);
                self.mask32(off + 4, (m >> 32) as u32);
            }
        }
    }

    /// The declared kind and size of BAR `index`.
    pub fn bar(&self, index: usize) -> Option<(BarKind, u64)> {
        self.bars.get(index).and_then(|&(k, s)| k.map(|k| (k, s)))
    }

    /// Declares an expansion ROM of `size` bytes (a power of two >= 2 KiB).
    pub fn set_rom(&mut self, size: u64) {
        assert!(size.is_power_of_two() && size >= 2048);
        self.rom_size = size;
        self.mask32(reg::ROM, (!(size as u32 - 1) & 0xffff_f800) | 1);
    }

    /// Size of the expansion ROM (0 = none).
    pub fn rom_size(&self) -> u64 {
        self.rom_size
    }

    /// Sets the interrupt pin (1 = INTA#).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set8(reg::INTERRUPT_PIN, pin);
    }

    fn add_cap(&mut self, id: u8, len: usize) -> usize {
        let off = self.next_cap;
        assert!(off + len <= 256, "capabilities do not fit in the 256-byte header");
        self.set8(off, id);
        self.set8(off + 1, 0);
        let last = self.last_cap_next;
        self.set8(last, off as u8);
        self.last_cap_next = off + 1;
        self.next_cap = (off + len + 3) & !3;
        let s = self.get16(reg::STATUS) | STATUS_CAP_LIST;
        self.set16(reg::STATUS, s);
        off
    }

    fn add_ext_cap(&mut self, id: u16, version: u8, len: usize) -> usize {
        assert!(self.bytes.len() == 4096, "extended capabilities need a PCIe config space");
        let off = self.next_ext;
        assert!(off + len <= 4096);
        self.set32(off, u32::from(id) | (u32::from(version) << 16));
        if let Some(prev) = self.last_ext {
            let h = self.get32(prev) & 0x000f_ffff;
            self.set32(prev, h | ((off as u32) << 20));
        }
        self.last_ext = Some(off);
        self.next_ext = (off + len + 3) & !3;
        off
    }

    /// Adds a power management capability (D0/D3hot).
    pub fn add_pm(&mut self) -> usize {
        let off = self.add_cap(cap_id::PM, 8);
        self.set16(off + 2, 0x0003);
        // PMCSR: power state is writable; no PME support (PMC bits 15:11
        // are 0), so PME_En is read-only 0 and PME status never sets.
        self.mask16(off + 4, 0x0003);
        self.w1c16(off + 4, 0x8000);
        self.caps.pm = Some(off);
        off
    }

    /// Adds a 64-bit MSI capability with per-vector masking.
    pub fn add_msi(&mut self, vectors: u16) -> usize {
        assert!(vectors.is_power_of_two() && vectors <= 32);
        let off = self.add_cap(cap_id::MSI, 24);
        let mmc = vectors.trailing_zeros() as u16;
        self.set16(off + 2, (mmc << 1) | (1 << 7) | (1 << 8));
        self.mask16(off + 2, 0x0071);
        self.mask32(off + 4, 0xffff_fffc);
        self.mask32(off + 8, 0xffff_ffff);
        self.mask16(off + 12, 0xffff);
        self.mask32(off + 16, if vectors == 32 { u32::MAX } else { (1u32 << vectors) - 1 });
        self.caps.msi = Some(off);
        off
    }

    /// Adds an MSI-X capability whose table and PBA live in BARs.
    pub fn add_msix(&mut self, vectors: u16, table_bar: u8, table_offset: u32, pba_bar: u8, pba_offset: u32) -> usize {
        assert!((1..=2048).contains(&vectors) && table_bar < 6 && pba_bar < 6);
        assert!(table_offset.is_multiple_of(8) && pba_offset.is_multiple_of(8));
        let off = self.add_cap(cap_id::MSIX, 12);
        self.set16(off + 2, vectors - 1);
        self.mask16(off + 2, 0xc000);
        self.set32(off + 4, table_offset | u32::from(table_bar));
        self.set32(off + 8, pba_offset | u32::from(pba_bar));
        self.caps.msix = Some(off);
        off
    }

    /// Adds a PCI Express capability (version 2, endpoint, FLR capable).
    pub fn add_pcie(&mut self) -> usize {
        let off = self.add_cap(cap_id::PCIE, 60);
        self.set16(off + 2, 0x0002);
        // Device capabilities: FLR capable, role-based error reporting
        // (required since PCIe 1.1; Linux turns ASPM off without it),
        // 128-byte payload, no phantom functions or extended tags.
        self.set32(off + 4, (1 << 28) | (1 << 15));
        // Device control: everything but the FLR bit is storage.
        self.mask16(off + 8, 0x7fff);
        self.set16(off + 8, 0x2810);
        // Device status: error bits clear on 1.
        self.w1c16(off + 10, 0x000f);
        // Link capabilities: x1, 2.5 GT/s; link status likewise.
        self.set32(off + 12, 0x0000_0011);
        self.mask16(off + 16, 0x01c3);
        self.set16(off + 18, 0x0011);
        // Device capabilities 2: nothing optional (no completion timeout
        // ranges or disable, no ARI, LTR, OBFF or 10-bit tags), so device
        // control 2 has nothing to program and is read-only 0.
        self.set32(off + 36, 0);
        // Link capabilities 2: supported speeds vector, 2.5 GT/s only (what
        // Linux reads before the link capabilities when it is non-zero);
        // link control 2: target link speed 2.5 GT/s.
        self.set32(off + 44, 1 << 1);
        self.set16(off + 48, 0x0001);
        self.caps.pcie = Some(off);
        off
    }

    /// Adds a PASID extended capability supporting `width` bits.
    pub fn add_pasid(&mut self, width: u8) -> usize {
        assert!((1..=20).contains(&width));
        let off = self.add_ext_cap(cap_id::PASID, 1, 8);
        // Execute and privileged mode supported, max PASID width.
        self.set16(off + 4, (u16::from(width) << 8) | 0x6);
        self.mask16(off + 6, 0x0007);
        self.caps.pasid = Some(off);
        off
    }

    /// Adds an ATS extended capability.
    pub fn add_ats(&mut self) -> usize {
        let off = self.add_ext_cap(cap_id::ATS, 1, 8);
        // Page-aligned requests; queue depth 0 means 32.
        self.set16(off + 4, 1 << 5);
        self.mask16(off + 6, 0x801f);
        self.caps.ats = Some(off);
        off
    }

    /// Adds a PRI extended capability with `outstanding` request capacity.
    pub fn add_pri(&mut self, outstanding: u32) -> usize {
        let off = self.add_ext_cap(cap_id::PRI, 1, 16);
        // Control: enable is storage; reset (bit 1) reads as 0.
        self.mask16(off + 4, 0x0001);
        // Status: response failure and unexpected index clear on 1;
        // stopped (bit 8) reads 1 while disabled; PASID required (bit 15).
        self.w1c16(off + 6, 0x0003);
        self.set16(off + 6, (1 << 8) | (1 << 15));
        self.set32(off + 8, outstanding);
        self.mask32(off + 12, 0xffff_ffff);
        self.caps.pri = Some(off);
        off
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    /// Writes `data` at `offset` through the masks; returns what changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Vec<ConfigEvent>, Error> {
        let r = self.range(offset, data.len())?;
        let before = self.watched();
        let mut flr = false;
        for (i, &v) in r.clone().zip(data) {
            let old = self.bytes[i];
            let mut new = (old & !self.wmask[i]) | (v & self.wmask[i]);
            new &= !(v & self.w1c[i]);
            self.bytes[i] = new;
            if let Some(p) = self.caps.pcie {
                // Device control bit 15: initiate FLR; always reads 0.
                if i == p + 9 && v & 0x80 != 0 {
                    flr = true;
                }
            }
        }
        let mut ev = Vec::new();
        if let Some(pm) = self.caps.pm {
            let (old, new) = (before.4 & 3, self.get16(pm + 4) & 3);
            if new == 1 || new == 2 {
                // D1 and D2 are not supported (PMC bits 9 and 10 are 0):
                // the write completes but the state does not change.
                let v = (self.get16(pm + 4) & !3) | old;
                self.set16(pm + 4, v);
            } else if new != old {
                ev.push(ConfigEvent::PowerState { from: old as u8, to: new as u8 });
            }
        }
        let after = self.watched();
        if before.0 != after.0 {
            ev.push(ConfigEvent::Command(after.0));
        }
        if before.1 != after.1 {
            ev.push(ConfigEvent::MsixControl { enabled: after.1 & 0x8000 != 0, masked: after.1 & 0x4000 != 0 });
        }
        if before.2 != after.2 {
            ev.push(ConfigEvent::PasidControl(after.2));
        }
        if before.3 != after.3 {
            // PRI "stopped" follows the enable bit.
            if let Some(p) = self.caps.pri {
                let st = self.get16(p + 6);
                let st = if after.3 & 1 != 0 { st & !(1 << 8) } else { st | (1 << 8) };
                self.set16(p + 6, st);
            }
            ev.push(ConfigEvent::PriControl(after.3));
        }
        if before.5 != after.5 {
            ev.push(ConfigEvent::MsiMask(after.5));
        }
        if flr {
            ev.push(ConfigEvent::FunctionReset);
        }
        Ok(ev)
    }

    fn watched(&self) -> (u16, u16, u16, u16, u16, u32) {
        let g = |o: Option<usize>| o.map_or(0, |o| self.get16(o));
        (
            self.get16(reg::COMMAND),
            g(self.caps.msix.map(|o| o + 2)),
            g(self.caps.pasid.map(|o| o + 6)),
            g(self.caps.pri.map(|o| o + 4)),
            g(self.caps.pm.map(|o| o + 4)),
            self.caps.msi.map_or(0, |o| self.get32(o + 16)),
        )
    }

    /// The MSI capability's Mask Bits (0 without one).
    pub fn msi_mask(&self) -> u32 {
        self.caps.msi.map_or(0, |o| self.get32(o + 16))
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, Error> {
        let err = Error::OutOfRange { offset, len, size: self.bytes.len() };
        let start = usize::try_from(offset).map_err(|_| err.clone())?;
        let end = start.checked_add(len).ok_or(err.clone())?;
        if end > self.bytes.len() {
            return Err(err);
        }
        Ok(start..end)
    }

    /// Reads `buf.len()` bytes at `offset` with the Status register's
    /// Interrupt Status bit (bit 3) showing `intx`, the function's INTx
    /// level, and the MSI capability's Pending Bits showing `msi_pending`
    /// (bit v: vector v is pending behind its mask). Both are kept by the
    /// interrupt state rather than in these bytes, so they are never saved
    /// or restored as configuration.
    pub fn read_with(&self, offset: u64, buf: &mut [u8], intx: bool, msi_pending: u32) -> Result<(), Error> {
        self.read(offset, buf)?;
        if let Some(p) = self.caps.msi {
            for (i, b) in msi_pending.to_le_bytes().iter().enumerate() {
                if let Some(x) = ((p + 20 + i) as u64).checked_sub(offset).and_then(|k| buf.get_mut(k as usize)) {
                    *x = *b;
                }
            }
        }
        // Byte 6 holds bits 7:0 of Status.
        if let Some(b) = (reg::STATUS as u64).checked_sub(offset).and_then(|i| buf.get_mut(i as usize)) {
            let bit = STATUS_INTERRUPT as u8;
            *b = if intx { *b | bit } else { *b & !bit };
        }
        Ok(())
    }

    /// The power state (PMCSR bits 1:0; 0 = D0, 3 = D3hot); D0 for a
    /// function without the PM capability.
    pub fn power_state(&self) -> u8 {
        self.caps.pm.map_or(0, |o| (self.get16(o + 4) & 3) as u8)
    }

    /// The kind of BAR `index` (`None` for an unimplemented BAR or the
    /// upper half of a 64-bit one).
    pub fn bar_kind(&self, index: usize) -> Option<BarKind> {
        self.bars.get(index).and_then(|b| b.0)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get16(reg::COMMAND)
    }

    /// Puts every writable register back to its reset value (after a
    /// device or function-level reset): BARs keep their type bits only.
    pub fn reset(&mut self) {
        for i in 0..self.bytes.len() {
            // Writable bits reset to 0, except the PCIe device control
            // defaults, restored below.
            self.bytes[i] &= !self.wmask[i];
            self.bytes[i] &= !self.w1c[i];
        }
        if let Some(p) = self.caps.pcie {
            self.set16(p + 8, 0x2810);
        }
        if let Some(p) = self.caps.pri {
            let st = self.get16(p + 6) | (1 << 8);
            self.set16(p + 6, st);
        }
    }

    /// Raw bytes (for migration).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Restores raw bytes saved by [`PciConfig::bytes`]; the size must
    /// match and read-only bits must be unchanged.
    pub fn restore(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() != self.bytes.len() {
            return false;
        }
        let ro_same = self.bytes.iter().zip(bytes).zip(&self.wmask).zip(&self.w1c).all(|(((a, b), m), c)| {
            let keep = !(m | c);
            a & keep == b & keep
        });
        if ro_same {
            self.bytes.copy_from_slice(bytes);
        }
        ro_same
    }

    /// Byte at `off`.
    pub fn get8(&self, off: usize) -> u8 {
        self.bytes[off]
    }
    /// Little-endian u16 at `off`.
    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    /// Little-endian u32 at `off`.
    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap_or([0; 4]))
    }
    fn set8(&mut self, off: usize, v: u8) {
        self.bytes[off] = v;
    }
    fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn mask8(&mut self, off: usize, m: u8) {
        self.wmask[off] = m;
    }
    fn mask16(&mut self, off: usize, m: u16) {
        self.wmask[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }
    fn mask32(&mut self, off: usize, m: u32) {
        self.wmask[off..off + 4].copy_from_slice(&m.to_le_bytes());
    }
    fn w1c16(&mut self, off: usize, m: u16) {
        self.w1c[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds { vendor: 0x1b36, device: 0x0042, subsystem_vendor: 0x1af4, subsystem: 1, class: 0x088000, revision: 2 }
    }

    fn rd32(c: &PciConfig, off: u64) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn wr32(c: &mut PciConfig, off: u64, v: u32) -> Vec<ConfigEvent> {
        c.write(off, &v.to_le_bytes()).unwrap()
    }

    #[test]
    fn bar_sizing_for_every_kind() {
        let mut c = PciConfig::new(ids(), true);
        c.set_bar(0, BarKind::Mem32, 0x1000, false);
        c.set_bar(2, BarKind::Mem64, 0x20_0000, true);
        c.set_bar(4, BarKind::Io, 0x100, false);
        c.set_rom(0x8000);
        for off in [0x10, 0x18, 0x1c, 0x20, 0x30] {
            wr32(&mut c, off, u32::MAX);
        }
        assert_eq!(rd32(&c, 0x10), 0xffff_f000);
        assert_eq!(rd32(&c, 0x18), 0xffe0_000c);
        assert_eq!(rd32(&c, 0x1c), 0xffff_ffff);
        assert_eq!(rd32(&c, 0x20), 0xffff_ff01);
        assert_eq!(rd32(&c, 0x30), 0xffff_8001);
        // Unimplemented BARs read 0 after sizing.
        wr32(&mut c, 0x14, u32::MAX);
        assert_eq!(rd32(&c, 0x14), 0);
        // Programming an address keeps the type bits.
        wr32(&mut c, 0x18, 0xfe00_0000);
        wr32(&mut c, 0x1c, 0x1);
        assert_eq!(rd32(&c, 0x18), 0xfe00_000c);
        assert_eq!(rd32(&c, 0x1c), 1);
        // 64-bit BAR larger than 4 GiB sizes in the upper half too.
        let mut d = PciConfig::new(ids(), false);
        d.set_bar(0, BarKind::Mem64, 1 << 33, false);
        wr32(&mut d, 0x10, u32::MAX);
        wr32(&mut d, 0x14, u32::MAX);
        assert_eq!(rd32(&d, 0x10), 0x4);
        assert_eq!(rd32(&d, 0x14), 0xffff_fffe);
    }

    #[test]
    fn read_only_and_w1c_bits() {
        let mut c = PciConfig::new(ids(), false);
        wr32(&mut c, 0, 0xdead_beef);
        assert_eq!(rd32(&c, 0), 0x0042_1b36);
        // Status: bit 15 set by "hardware" is cleared by writing 1.
        c.bytes[7] |= 0x80;
        let ev = c.write(6, &[0x00, 0x80]).unwrap();
        assert!(ev.is_empty());
        assert_eq!(c.get16(reg::STATUS) & 0x8000, 0);
        // Command register: only defined bits stick, and the change is reported.
        let ev = c.write(4, &[0xff, 0xff]).unwrap();
        assert_eq!(c.command(), 0x0547);
        assert_eq!(ev, vec![ConfigEvent::Command(0x0547)]);
        assert!(c.read(255, &mut [0; 2]).is_err());
        assert!(c.write(u64::MAX, &[0]).is_err());
    }

    #[test]
    fn capability_lists_link_up() {
        let mut c = PciConfig::new(ids(), true);
        c.add_pm();
        c.add_msi(4);
        c.add_msix(8, 2, 0, 2, 0x800);
        c.add_pcie();
        c.add_pasid(20);
        c.add_ats();
        c.add_pri(32);
        let mut seen = vec![];
        let mut p = c.get8(reg::CAP_PTR) as usize;
        while p != 0 {
            seen.push(c.get8(p));
            p = c.get8(p + 1) as usize;
        }
        assert_eq!(seen, vec![cap_id::PM, cap_id::MSI, cap_id::MSIX, cap_id::PCIE]);
        assert_ne!(c.get16(reg::STATUS) & STATUS_CAP_LIST, 0);
        let mut ext = vec![];
        let mut p = reg::EXT_CAP;
        loop {
            let h = c.get32(p);
            ext.push(h as u16);
            p = (h >> 20) as usize;
            if p == 0 {
                break;
            }
        }
        assert_eq!(ext, vec![cap_id::PASID, cap_id::ATS, cap_id::PRI]);
        let pasid = c.caps().pasid.unwrap();
        assert_eq!(c.get16(pasid + 4) >> 8, 20);
        // MSI-X: table size is read-only, enable is reported.
        let msix = c.caps().msix.unwrap();
        let ev = c.write((msix + 2) as u64, &0xffffu16.to_le_bytes()).unwrap();
        assert_eq!(c.get16(msix + 2), 0xc007);
        assert_eq!(ev, vec![ConfigEvent::MsixControl { enabled: true, masked: true }]);
        // FLR reads back as 0 and is reported.
        let pcie = c.caps().pcie.unwrap();
        let ev = c.write((pcie + 8) as u64, &0x8000u16.to_le_bytes()).unwrap();
        assert!(ev.contains(&ConfigEvent::FunctionReset));
        assert_eq!(c.get16(pcie + 8) & 0x8000, 0);
        // PRI: enabling clears "stopped".
        let pri = c.caps().pri.unwrap();
        let ev = c.write((pri + 4) as u64, &1u16.to_le_bytes()).unwrap();
        assert_eq!(ev, vec![ConfigEvent::PriControl(1)]);
        assert_eq!(c.get16(pri + 6) & (1 << 8), 0);
        c.reset();
        assert_eq!(c.get16(msix + 2), 7);
        assert_ne!(c.get16(pri + 6) & (1 << 8), 0);
    }

    #[test]
    fn power_states_and_interrupt_status() {
        let mut c = PciConfig::new(ids(), true);
        let pm = c.add_pm();
        c.add_pcie();
        // D1 and D2 are not supported: the write completes, nothing changes.
        assert!(c.write((pm + 4) as u64, &1u16.to_le_bytes()).unwrap().is_empty());
        assert_eq!(c.power_state(), 0);
        assert!(c.write((pm + 4) as u64, &2u16.to_le_bytes()).unwrap().is_empty());
        assert_eq!(c.power_state(), 0);
        let ev = c.write((pm + 4) as u64, &3u16.to_le_bytes()).unwrap();
        assert_eq!(ev, vec![ConfigEvent::PowerState { from: 0, to: 3 }]);
        // D3hot stays D3hot on a D1 write.
        assert!(c.write((pm + 4) as u64, &1u16.to_le_bytes()).unwrap().is_empty());
        assert_eq!(c.power_state(), 3);
        let ev = c.write((pm + 4) as u64, &0u16.to_le_bytes()).unwrap();
        assert_eq!(ev, vec![ConfigEvent::PowerState { from: 3, to: 0 }]);
        // Interrupt Status comes from the INTx level, in any read that
        // covers it, and is never stored.
        let mut b = [0u8; 4];
        c.read_with(4, &mut b, true, 0).unwrap();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]) & STATUS_INTERRUPT, STATUS_INTERRUPT);
        let mut one = [0u8; 1];
        c.read_with(6, &mut one, true, 0).unwrap();
        assert_eq!(one[0] & 0x08, 0x08);
        c.read_with(7, &mut one, true, 0).unwrap();
        assert_eq!(one[0] & 0x08, 0, "bit 11 is not Interrupt Status");
        c.read_with(6, &mut one, false, 0).unwrap();
        assert_eq!(one[0] & 0x08, 0);
        assert_eq!(c.get16(reg::STATUS) & STATUS_INTERRUPT, 0);
        // Device control 2 is read-only; link capabilities 2 says 2.5 GT/s.
        let pcie = c.caps().pcie.unwrap();
        c.write((pcie + 40) as u64, &0xffffu16.to_le_bytes()).unwrap();
        assert_eq!(c.get16(pcie + 40), 0);
        assert_eq!(c.get32(pcie + 44), 2);
    }

    #[test]
    fn restore_refuses_changed_read_only_bits() {
        let mut c = PciConfig::new(ids(), false);
        c.set_bar(0, BarKind::Mem32, 0x1000, false);
        wr32(&mut c, 0x10, 0xfeb0_0000);
        let saved = c.bytes().to_vec();
        let mut d = PciConfig::new(ids(), false);
        d.set_bar(0, BarKind::Mem32, 0x1000, false);
        assert!(d.restore(&saved));
        assert_eq!(rd32(&d, 0x10), 0xfeb0_0000);
        let mut bad = saved.clone();
        bad[0] ^= 1;
        assert!(!d.restore(&bad));
        assert!(!d.restore(&saved[..128]));
    }
}
