//! The memory objects a unit reaches: mapped files, or client memory
//! reached through the unit's [`ClientMemory`], found by system address
//! and mapped on first use.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use super::epoch::InDma;
use super::Side;
use super::{ClientFailure, ClientMemory, Error, Result, TranslationUnit};
use crate::device;
use crate::shm;
use crate::sync;

/// Bytes a copy from or to client memory moves at a time.
pub(super) const BOUNCE: usize = 64 * 1024;

/// A memory object as a device sees it.
pub(super) struct MemObject {
    pub(super) base: u64,
    pub(super) size: u64,
    pub(super) backing: Backing,
}

/// How a device reaches a memory object's bytes.
pub(super) enum Backing {
    /// Through a shared mapping of its file: with plain volatile copies if
    /// the file is sealed against shrinking (and not on hugetlbfs, whose
    /// pages can run out), else through the kernel, so that a page past
    /// the end is an error, never SIGBUS, and a write never grows the file
    /// (see [`shm::Bytes`]).
    Mapped(shm::Bytes),
    /// Client memory: through the unit's [`ClientMemory`], at `address`
    /// plus the offset.
    Client { address: u64 },
}

impl MemObject {
    /// One table entry of a stage-1 table; client memory holds none (the
    /// walk faults).
    pub(super) fn load_u64(&self, off: u64) -> Option<u64> {
        if off.checked_add(8)? > self.size {
            return None;
        }
        match &self.backing {
            Backing::Mapped(b) => b.load_u64(off),
            Backing::Client { .. } => None,
        }
    }
}

/// A memory object as an IOTLB entry holds it: no reference count
/// touched per access. It is read only inside a DMA ([`InDma`]), and only
/// when taken from the unit's map in that DMA or in an earlier one under
/// the same invalidation generation: a memory object leaves the map before
/// the generation moves and is dropped only after every DMA that may hold
/// it has ended (see `TranslationUnit::invalidate`).
#[derive(Clone, Copy, Debug)]
pub(super) struct MemRef(*const MemObject);

impl MemRef {
    pub(super) fn new(m: &Arc<MemObject>) -> MemRef {
        MemRef(Arc::as_ptr(m))
    }

    /// A reference to no object (tests of what holds one, never read).
    #[cfg(test)]
    pub(super) fn none() -> MemRef {
        MemRef(std::ptr::null())
    }

    /// The object, for as long as the DMA `_in` lasts.
    pub(super) fn get<'a>(&self, _in: &'a InDma<'_>) -> &'a MemObject {
        // SAFETY: the unit's map held an `Arc` of this object when the
        // reference was taken, within the current invalidation generation
        // (the thread's IOTLB is emptied when the generation moves, and
        // the translations an access records live only as long as it).
        // Removing the object from the map and dropping it are separated
        // by a generation bump and a wait for every DMA in flight, this
        // one included, so the object outlives `_in`.
        unsafe { &*self.0 }
    }
}

pub(super) fn find_mem(mems: &BTreeMap<u64, Arc<MemObject>>, sys: u64) -> Option<&Arc<MemObject>> {
    let (_, m) = mems.range(..=sys).next_back()?;
    (sys < m.base + m.size).then_some(m)
}

/// Whether `file` is on hugetlbfs, whose pages are taken from a fixed pool
/// when first touched: a direct access to one the pool cannot supply
/// raises SIGBUS.
pub(super) fn on_hugetlbfs(file: &File) -> bool {
    // Memory objects never live on file systems that block (the core
    // refuses them), so fstatfs answers at once.
    nix::sys::statfs::fstatfs(file).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC)
}

impl TranslationUnit {
    /// Runs a copy of client memory at `address` through the client.
    pub(super) fn client_copy(
        &self,
        address: u64,
        f: impl FnOnce(&dyn ClientMemory) -> std::result::Result<(), ClientFailure>,
    ) -> Result<()> {
        let c = sync::read(&self.client).clone();
        let r = match c {
            Some(c) => f(&*c),
            None => Err(ClientFailure {
                errno: libc::ENOTCONN,
                message: "the device server has no client holding this memory".into(),
            }),
        };
        r.map_err(|e| Error::Client { address, errno: e.errno, message: e.message })
    }

    /// Reads `buf` from `off` of a memory object.
    pub(super) fn mem_read(&self, m: &MemObject, off: u64, buf: &mut [u8]) -> Result<()> {
        match m.backing {
            Backing::Mapped(ref b) => b.read(off, buf).map_err(|_| Error::Unreachable),
            Backing::Client { address } => {
                let at = address.wrapping_add(off);
                self.client_copy(at, |c| c.read(at, buf))
            }
        }
    }

    /// Writes `data` at `off` of a memory object.
    pub(super) fn mem_write(&self, m: &MemObject, off: u64, data: &[u8]) -> Result<()> {
        match m.backing {
            Backing::Mapped(ref b) => b.write(off, data).map_err(|_| Error::Unreachable),
            Backing::Client { address } => {
                let at = address.wrapping_add(off);
                self.client_copy(at, |c| c.write(at, data))
            }
        }
    }

    /// Copies `n` bytes from `src_off` of `src` to `off` of `dst`: straight
    /// between the mappings when both are mapped, else through a buffer
    /// (client memory), at most [`BOUNCE`] bytes at a time, from the end
    /// if `backward` (an overlapping pair, destination after source).
    pub(super) fn mem_copy(
        &self,
        dst: &MemObject,
        off: u64,
        src: &MemObject,
        src_off: u64,
        n: usize,
        backward: bool,
    ) -> std::result::Result<(), (Side, Error)> {
        if let (Backing::Mapped(d), Backing::Mapped(s)) = (&dst.backing, &src.backing) {
            // A page either side cannot reach: said of the source.
            return d.copy_from(off, s, src_off, n).map_err(|_| (Side::Source, Error::Unreachable));
        }
        let mut buf = vec![0u8; n.min(BOUNCE)];
        let mut done = 0;
        while done < n {
            let k = (n - done).min(BOUNCE);
            let at = if backward { n - done - k } else { done } as u64;
            self.mem_read(src, src_off + at, &mut buf[..k]).map_err(|e| (Side::Source, e))?;
            self.mem_write(dst, off + at, &buf[..k]).map_err(|e| (Side::Destination, e))?;
            done += k;
        }
        Ok(())
    }

    pub(super) fn map_memory(&self, sys: u64) -> Result<()> {
        let (base, size, backing) = match self.channel.memory(sys)? {
            device::Memory::File { fd, base, size, sealed } => {
                let file = File::from(fd);
                // A file the session may only read maps read-only: writes
                // to it fault (the core refuses writable mappings of it).
                let direct = sealed && !on_hugetlbfs(&file);
                (base, size, Backing::Mapped(shm::Bytes::map(&file, size, direct).map_err(Error::Map)?))
            }
            device::Memory::Client { base, size, address } => (base, size, Backing::Client { address }),
        };
        // Another thread may have mapped it meanwhile: an object in the map
        // is never replaced (IOTLB entries may point at it).
        sync::write(&self.mems).entry(base).or_insert_with(|| Arc::new(MemObject { base, size, backing }));
        Ok(())
    }
}
