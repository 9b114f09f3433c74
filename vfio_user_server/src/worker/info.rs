//! What the client learns of the device and how it wires interrupts:
//! DEVICE_GET_INFO, DEVICE_GET_REGION_INFO (sparse mmap areas included),
//! DEVICE_GET_REGION_IO_FDS, DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use zerocopy::IntoBytes;

use super::{need, ok, Res, Worker};
use crate::device::IoFdDesc;
use crate::proto::{self, region};

impl Worker {
    pub(super) fn get_info(&mut self, p: &[u8]) -> Res {
        let i: proto::DeviceInfo = need(p)?;
        if (i.argsz as usize) < size_of::<proto::DeviceInfo>() {
            return Err(libc::EINVAL);
        }
        let out = proto::DeviceInfo {
            argsz: size_of::<proto::DeviceInfo>() as u32,
            flags: proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET,
            num_regions: region::NUM,
            num_irqs: proto::irq_index::NUM,
        };
        ok(out.as_bytes())
    }

    pub(super) fn region_info(&mut self, p: &[u8]) -> Res {
        let q: proto::RegionInfo = need(p)?;
        if (q.argsz as usize) < size_of::<proto::RegionInfo>() || q.index >= region::NUM {
            return Err(libc::EINVAL);
        }
        let mut info = proto::RegionInfo { argsz: 32, flags: 0, index: q.index, cap_offset: 0, size: 0, offset: 0 };
        // Each region has a distinct offset, like VFIO's index << 40.
        info.offset = u64::from(q.index) << 40;
        let mut caps = Vec::new();
        let mut fd = None;
        if q.index == region::CONFIG {
            info.size = self.config.size() as u64;
            info.flags = proto::REGION_READ | proto::REGION_WRITE;
        } else if let Some(r) = self.regions[q.index as usize].as_ref() {
            info.size = r.size;
            info.flags = if r.read { proto::REGION_READ } else { 0 } | if r.write { proto::REGION_WRITE } else { 0 };
            if let Some(m) = &r.mmap {
                info.flags |= proto::REGION_MMAP;
                info.offset = m.file_offset;
                fd = Some(m.file.clone());
                if !m.areas.is_empty() {
                    let h = proto::CapHeader { id: proto::REGION_CAP_SPARSE_MMAP, version: 1, next: 0 };
                    caps.extend_from_slice(h.as_bytes());
                    caps.extend_from_slice(&(m.areas.len() as u32).to_ne_bytes());
                    caps.extend_from_slice(&0u32.to_ne_bytes());
                    for a in &m.areas {
                        caps.extend_from_slice(a.as_bytes());
                    }
                }
            }
        }
        let full = 32 + caps.len();
        info.argsz = full as u32;
        if (q.argsz as usize) < full {
            // Only the fixed part: the client retries with a bigger argsz.
            return ok(info.as_bytes());
        }
        if !caps.is_empty() {
            // CAPS only with the chain present (QEMU checks cap_offset when
            // the flag is set).
            info.flags |= proto::REGION_CAPS;
            info.cap_offset = 32;
        }
        let mut out = info.as_bytes().to_vec();
        out.extend_from_slice(&caps);
        Ok((out, fd.into_iter().collect()))
    }

    pub(super) fn region_io_fds(&mut self, p: &[u8]) -> Res {
        let q: proto::IoFdsInfo = need(p)?;
        if (q.argsz as usize) < size_of::<proto::IoFdsInfo>() || q.index >= region::NUM || q.flags != 0 || q.count != 0
        {
            return Err(libc::EINVAL);
        }
        let mine: Vec<&(IoFdDesc, Arc<File>)> = self.io_fds.iter().filter(|(d, _)| d.region == q.index).collect();
        let full = 16 + 40 * mine.len();
        let mut head = proto::IoFdsInfo { argsz: full as u32, flags: 0, index: q.index, count: mine.len() as u32 };
        if (q.argsz as usize) < full {
            return ok(head.as_bytes());
        }
        let mut out = Vec::new();
        let mut fds = Vec::new();
        head.count = mine.len() as u32;
        out.extend_from_slice(head.as_bytes());
        for (i, (d, f)) in mine.iter().enumerate() {
            let e = proto::IoFdEntry {
                offset: d.offset,
                size: d.size,
                fd_index: i as u32,
                kind: proto::IO_FD_TYPE_IOEVENTFD,
                flags: if d.datamatch.is_some() { proto::IOEVENTFD_FLAG_DATAMATCH } else { 0 },
                padding: 0,
                datamatch: d.datamatch.unwrap_or(0),
            };
            out.extend_from_slice(e.as_bytes());
            fds.push(f.clone());
        }
        Ok((out, fds))
    }

    pub(super) fn irq_info(&mut self, p: &[u8]) -> Res {
        let q: proto::IrqInfo = need(p)?;
        if (q.argsz as usize) < size_of::<proto::IrqInfo>() || q.index >= proto::irq_index::NUM {
            return Err(libc::EINVAL);
        }
        let l = self.irqs.layout();
        let out = proto::IrqInfo { argsz: 16, flags: l.flags(q.index), index: q.index, count: l.count(q.index) };
        ok(out.as_bytes())
    }

    pub(super) fn set_irqs(&mut self, p: &[u8], fds: Vec<OwnedFd>) -> Res {
        let q: proto::IrqSet = need(p)?;
        if (q.argsz as usize) < size_of::<proto::IrqSet>() {
            return Err(libc::EINVAL);
        }
        self.irqs.set_irqs(&q, &p[20..], fds).map_err(|e| {
            tracing::info!("SET_IRQS refused: {e}");
            e.errno()
        })?;
        ok(&[])
    }
}
