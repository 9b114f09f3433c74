//! Translation: the table pool as the walker reads it, the walk of one
//! page (one or two stages), and the IOTLB that caches its leaf.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use super::memory::find_mem;
use super::{DeviceState, TranslationUnit};
use crate::pagetable::{
    pasid_lookup, walk, walk_nested, NestedError, Stage1, TableMemory, WalkError, ENTRIES, PAGE_SIZE, PASID_DIRTY,
    PASID_IOPF, PASID_NESTED,
};
use crate::shm;
use crate::sync;
use crate::types::*;

/// An IOTLB entry: the translation of one whole leaf.
#[derive(Debug, Clone, Copy)]
pub(super) struct Iotlb {
    /// IOVA where the translated run starts (a leaf boundary).
    pub(super) iova_base: u64,
    /// System address of `iova_base`.
    pub(super) sys_base: u64,
    /// Bytes the run covers (the leaf size; 4 KiB for nested walks).
    pub(super) size: u64,
    /// Rights of the leaf (both stages' for a nested walk).
    pub(super) perm: Perm,
    /// Stage-2 leaf to mark dirty on write.
    pub(super) dirty: Option<(u64, usize)>,
}

/// The table pool, mapped read-only.
pub(super) struct Pool {
    pub(super) words: shm::ReadOnlyWords,
}

impl TableMemory for Pool {
    fn load(&self, table: u64, index: usize) -> Option<u64> {
        if table == 0 || !table.is_multiple_of(PAGE_SIZE) || index >= ENTRIES {
            return None;
        }
        self.words.load(table.checked_add(index as u64 * 8)?)
    }
}

/// Translations an access keeps inline; more go to the heap (an access of
/// 64 KiB in 4 KiB leaves that does not start on a page needs 17).
const LOOKED_INLINE: usize = 32;

/// Every translation an access's checking pass found, in IOVA order, so
/// that its copying pass uses exactly those (and neither looks them up
/// again nor meets a walk that an unmap in progress has changed: the
/// invalidation waits for the access's DMA guard).
#[derive(Default)]
pub(super) struct Looked {
    inline: [Option<Iotlb>; LOOKED_INLINE],
    more: Vec<Iotlb>,
    len: usize,
    next: usize,
    replaying: bool,
}

impl Looked {
    pub(super) fn record(&mut self, e: Iotlb) {
        if self.replaying {
            return;
        }
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = Some(e),
            None => self.more.push(e),
        }
        self.len += 1;
    }

    /// Switches from recording to replaying.
    pub(super) fn rewind(&mut self) {
        self.replaying = true;
        self.next = 0;
    }

    fn get(&self, i: usize) -> Option<Iotlb> {
        match self.inline.get(i) {
            Some(e) => *e,
            None => self.more.get(i - LOOKED_INLINE).copied(),
        }
    }

    /// The recorded translation that covers `page`: looked for from the
    /// last one used on (the copying pass goes in IOVA order, but may
    /// look at a leaf twice, as the client-memory run does at its end).
    pub(super) fn replay(&mut self, page: u64) -> Option<Iotlb> {
        if !self.replaying {
            return None;
        }
        let covers = |e: &Iotlb| page >= e.iova_base && page - e.iova_base < e.size;
        let start = self.next.saturating_sub(1);
        let i = (start..self.len).chain(0..start).find(|&i| self.get(i).is_some_and(|e| covers(&e)))?;
        self.next = i + 1;
        self.get(i)
    }
}

impl TranslationUnit {
    /// Walks the tables for one 4 KiB page.
    pub(super) fn walk_page(
        &self,
        st: &DeviceState,
        pasid: u32,
        iova: u64,
    ) -> std::result::Result<Iotlb, (FaultReason, bool, Option<u64>)> {
        let Some(e) = pasid_lookup(&self.pool, st.root, pasid) else { return Err((FaultReason::NoPasid, false, None)) };
        let iopf = e.flags & PASID_IOPF != 0;
        let reason = |w: WalkError| match w {
            WalkError::NotPresent(_) | WalkError::OutOfRange(_) => FaultReason::NotPresent,
            _ => FaultReason::Malformed,
        };
        let (leaf, perm) = if e.flags & PASID_NESTED != 0 {
            // Stage-1 tables live in memory objects at parent IOVAs; a walk
            // that meets an object this unit has not mapped yet says so.
            let need = Cell::new(None);
            let read = |sys: u64| {
                let mems = sync::read(&self.mems);
                match find_mem(&mems, sys) {
                    Some(m) => m.load_u64(sys - m.base),
                    None => {
                        need.set(Some(sys));
                        None
                    }
                }
            };
            let s1 = Stage1 { s2: &self.pool, s2_root: e.s2_root, read };
            match walk_nested(&s1, e.s1_root, iova) {
                Ok(l) => (l.s2, l.perm),
                Err(NestedError::Stage1(w)) => {
                    let r = if matches!(w, WalkError::BadTable(..)) { FaultReason::NotPresent } else { reason(w) };
                    return Err((r, iopf, need.get()));
                }
                Err(NestedError::Stage2(w)) => return Err((reason(w), iopf, None)),
            }
        } else {
            let leaf = walk(&self.pool, e.s2_root, iova).map_err(|w| (reason(w), iopf, None))?;
            (leaf, leaf.perm)
        };
        let dirty = (e.flags & PASID_DIRTY != 0).then_some((leaf.table, leaf.index));
        // A nested translation is only known to hold for its 4 KiB page.
        let size = if e.flags & PASID_NESTED != 0 { PAGE_SIZE } else { leaf.page_size };
        let iova_base = iova & !(size - 1);
        Ok(Iotlb { iova_base, sys_base: leaf.address - (iova - iova_base), size, perm, dirty })
    }

    pub(super) fn lookup(
        &self,
        dev: u32,
        st: &DeviceState,
        pasid: u32,
        page: u64,
    ) -> std::result::Result<Iotlb, (FaultReason, bool, Option<u64>)> {
        let key = (dev, pasid, page >> 12);
        let cached = sync::lock(&self.iotlb).get(&key).copied();
        if let Some(e) = cached {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(e);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let e = self.walk_page(st, pasid, page)?;
        let mut t = sync::lock(&self.iotlb);
        if t.len() >= self.config.iotlb_entries {
            t.clear();
        }
        t.insert(key, e);
        Ok(e)
    }

    /// The translation of `page`: from the IOTLB or a walk, or, in the
    /// copying pass of an access, as its checking pass found it.
    pub(super) fn entry(
        &self,
        dev: u32,
        st: &DeviceState,
        pasid: u32,
        page: u64,
        looked: &mut Looked,
    ) -> std::result::Result<Iotlb, (FaultReason, bool, Option<u64>)> {
        if let Some(e) = looked.replay(page) {
            return Ok(e);
        }
        let e = self.lookup(dev, st, pasid, page)?;
        looked.record(e);
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(i: u64) -> Iotlb {
        Iotlb {
            iova_base: i * PAGE_SIZE,
            sys_base: (i + 100) * PAGE_SIZE,
            size: PAGE_SIZE,
            perm: Perm::RW,
            dirty: None,
        }
    }

    #[test]
    fn the_copying_pass_gets_every_translation_the_check_found() {
        let mut l = Looked::default();
        // More leaves than are kept inline.
        for i in 0..40 {
            l.record(leaf(i));
        }
        assert!(l.replay(0).is_none(), "nothing is replayed while recording");
        l.rewind();
        for i in 0..40 {
            assert_eq!(l.replay(i * PAGE_SIZE).map(|e| e.sys_base), Some((i + 100) * PAGE_SIZE));
            // A leaf looked at twice (the end of a client-memory run) is
            // found again.
            assert_eq!(l.replay(i * PAGE_SIZE).map(|e| e.sys_base), Some((i + 100) * PAGE_SIZE));
        }
        assert!(l.replay(40 * PAGE_SIZE).is_none(), "a page the check never saw is looked up");
        l.record(leaf(41));
        assert!(l.replay(41 * PAGE_SIZE).is_none(), "nothing is recorded while replaying");
    }
}
