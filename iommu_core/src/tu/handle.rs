//! A translation handle: the way into a unit's DMA for one queue (or
//! any one issuer of DMA) that owns it.
//!
//! A [`Handle`] holds what a thread otherwise finds in its thread-local
//! list of units (see [`super::epoch`]): its own IOTLB, its own in-flight
//! slot in the unit's list, and the unit itself. An access through it
//! goes straight to them, with no thread-local lookup: load the unit's
//! generation (after marking the slot in flight), compare, find the leaf,
//! check the rights, copy, unmark. It takes `&mut self`: one access at a
//! time, never nested, by whoever holds it.
//!
//! The guarantee is the thread-local path's: an invalidation bumps the
//! generation, then waits for every slot it finds odd (a handle's among
//! them) to move, so once it is answered no DMA through a handle is still
//! running that started before, and none uses a translation the handle
//! cached before.

use std::sync::Arc;

use super::access::{At, CopyError};
use super::epoch::ThreadUnit;
use super::{Result, TranslationUnit};
use crate::types::Perm;

/// A DMA issuer's own way into a [`TranslationUnit`] (see the module's
/// text): made with [`TranslationUnit::handle`], used by one queue or
/// thread at a time. It may move to another thread between accesses.
pub struct Handle {
    tu: Arc<TranslationUnit>,
    own: ThreadUnit,
}

// SAFETY: what keeps `Handle` from being `Send` automatically is the
// `MemRef`s its IOTLB holds (raw pointers to memory objects of the unit)
// and the `Cell`s of its state. The state is the handle's alone (its
// slot is written only through it), and `&mut self` on every access means
// no access is in flight while the handle moves: moving it hands the
// whole state to the new thread with the ordering of the move itself
// (spawn, channel, lock). A `MemRef` points at a `MemObject` (shared
// memory mapped by the unit, `Send + Sync`) and is read only inside a
// DMA, under the generation it was cached in: the next access on any
// thread loads the generation after marking the slot in flight, and
// drops every entry if it moved. The unit outlives the handle (it holds
// an `Arc`). `Handle` is not `Sync`: its `Cell`s are not shared.
unsafe impl Send for Handle {}

impl TranslationUnit {
    /// A new [`Handle`] to this unit, for one queue or thread that issues
    /// DMA (its IOTLB starts empty). Keep it for as long as the queue
    /// runs: making one takes the unit's slot list lock.
    pub fn handle(self: &Arc<Self>) -> Handle {
        Handle { tu: self.clone(), own: self.guard.new_user() }
    }
}

impl Handle {
    /// The unit.
    pub fn unit(&self) -> &Arc<TranslationUnit> {
        &self.tu
    }

    /// DMA read, as [`TranslationUnit::read`].
    #[inline]
    pub fn read(&mut self, dev: u32, pasid: u32, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.tu.read_by(Some(&self.own), dev, pasid, iova, buf)
    }

    /// DMA write, as [`TranslationUnit::write`] (a write that would fault
    /// writes nothing).
    #[inline]
    pub fn write(&mut self, dev: u32, pasid: u32, iova: u64, data: &[u8]) -> Result<()> {
        self.tu.write_by(Some(&self.own), dev, pasid, iova, data)
    }

    /// DMA copy, as [`TranslationUnit::copy`].
    #[inline]
    pub fn copy(&mut self, src: At, dst: At, len: usize) -> std::result::Result<(), CopyError> {
        self.tu.copy_by(Some(&self.own), src, dst, len)
    }

    /// A check, as [`TranslationUnit::check`].
    #[inline]
    pub fn check(&mut self, dev: u32, pasid: u32, iova: u64, len: usize, access: Perm) -> Result<()> {
        self.tu.check_by(Some(&self.own), dev, pasid, iova, len, access)
    }

    /// A translation, as [`TranslationUnit::translate`].
    pub fn translate(
        &mut self,
        dev: u32,
        pasid: u32,
        iova: u64,
        len: usize,
        access: Perm,
    ) -> Result<Vec<(u64, usize)>> {
        self.tu.translate_by(Some(&self.own), dev, pasid, iova, len, access)
    }
}
