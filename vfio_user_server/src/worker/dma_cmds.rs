//! DMA_MAP and DMA_UNMAP: the client's DMA table.

use std::os::fd::OwnedFd;

use zerocopy::IntoBytes;

use super::{need, ok, Res, Worker};
use crate::proto;

impl Worker {
    pub(super) fn dma_map(&mut self, p: &[u8], mut fds: Vec<OwnedFd>) -> Res {
        let m: proto::DmaMap = need(p)?;
        if (m.argsz as usize) < size_of::<proto::DmaMap>() || fds.len() > 1 {
            return Err(libc::EINVAL);
        }
        self.dma.map(&m, fds.pop()).map_err(|e| {
            tracing::info!("DMA_MAP {:#x}+{:#x} refused: {e}", m.address, m.size);
            e.errno()
        })?;
        ok(&[])
    }

    pub(super) fn dma_unmap(&mut self, p: &[u8]) -> Res {
        let mut u: proto::DmaUnmap = need(p)?;
        if (u.argsz as usize) < size_of::<proto::DmaUnmap>() {
            return Err(libc::EINVAL);
        }
        let all = match u.flags {
            0 => false,
            proto::DMA_UNMAP_ALL if u.address == 0 && u.size == 0 => true,
            proto::DMA_UNMAP_GET_DIRTY_BITMAP => return Err(libc::ENOTSUP),
            _ => return Err(libc::EINVAL),
        };
        self.dma.unmap(u.address, u.size, all).map_err(|e| {
            tracing::info!("DMA_UNMAP {:#x}+{:#x} refused: {e}", u.address, u.size);
            e.errno()
        })?;
        u.argsz = size_of::<proto::DmaUnmap>() as u32;
        ok(u.as_bytes())
    }
}
