//! Translation: the table pool as the walker reads it, the walk of one
//! page (one or two stages), and the lookup through the thread's IOTLB
//! (see [`super::epoch`]) that caches its leaf.

use std::cell::Cell;

use super::epoch::{InDma, ThreadUnit};
use super::memory::{find_mem, Backing, MemRef};
use super::{DeviceState, TranslationUnit};
use crate::pagetable::{
    pasid_lookup, walk, walk_nested, NestedError, Stage1, TableMemory, WalkError, ENTRIES, PAGE_SIZE, PASID_DIRTY,
    PASID_IOPF, PASID_NESTED,
};
use crate::shm;
use crate::sync;
use crate::types::*;

/// A walk's result: a leaf, not yet tied to its memory object.
pub(super) struct Walked {
    iova_base: u64,
    sys_base: u64,
    size: u64,
    perm: Perm,
    dirty: Option<(u64, usize)>,
}

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
    /// The memory object `sys_base` lies in.
    pub(super) mem: MemRef,
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

/// Why a page has no translation now.
#[derive(Debug, Clone, Copy)]
pub(super) enum Miss {
    /// A fault: why, and whether the PASID entry allows page requests.
    Fault(FaultReason, bool),
    /// The walk reached a memory object this unit has not mapped yet.
    NeedMemory(u64),
    /// The device is not bound through this unit.
    NoDevice,
}

/// Every translation an access's checking pass found, in IOVA order, so
/// that its copying pass uses exactly those (and neither looks them up
/// again nor meets a walk that an unmap in progress has changed: the
/// invalidation waits for the access's DMA to end). The buffer is lent by
/// the thread's unit state and given back, so an access allocates nothing
/// once the thread has made one as long.
pub(super) struct Looked {
    v: Vec<Iotlb>,
    next: usize,
    replaying: bool,
}

impl Looked {
    pub(super) fn new(v: Vec<Iotlb>) -> Looked {
        Looked { v, next: 0, replaying: false }
    }

    pub(super) fn into_inner(self) -> Vec<Iotlb> {
        self.v
    }

    pub(super) fn record(&mut self, e: Iotlb) {
        if !self.replaying {
            self.v.push(e);
        }
    }

    /// Whether a recorded translation leads to client memory.
    pub(super) fn touches_client(&self, d: &InDma<'_>) -> bool {
        self.v.iter().any(|e| matches!(e.mem.get(d).backing, Backing::Client { .. }))
    }

    /// Switches from recording to replaying.
    pub(super) fn rewind(&mut self) {
        self.replaying = true;
        self.next = 0;
    }

    /// The recorded translation that covers `page`: looked for from the
    /// last one used on (the copying pass goes in IOVA order, or backward,
    /// and may look at a leaf twice, as the client-memory run does at its
    /// end).
    pub(super) fn replay(&mut self, page: u64) -> Option<Iotlb> {
        if !self.replaying {
            return None;
        }
        let covers = |e: &Iotlb| page >= e.iova_base && page - e.iova_base < e.size;
        let len = self.v.len();
        let start = self.next.saturating_sub(1).min(len);
        let i = (start..len).chain((0..start).rev()).find(|&i| self.v.get(i).is_some_and(covers))?;
        self.next = i + 1;
        self.v.get(i).copied()
    }
}

impl TranslationUnit {
    /// Walks the tables for one 4 KiB page.
    pub(super) fn walk_page(&self, st: &DeviceState, pasid: u32, iova: u64) -> std::result::Result<Walked, Miss> {
        let Some(e) = pasid_lookup(&self.pool, st.root, pasid) else {
            return Err(Miss::Fault(FaultReason::NoPasid, false));
        };
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
                    if let Some(sys) = need.get() {
                        return Err(Miss::NeedMemory(sys));
                    }
                    let r = if matches!(w, WalkError::BadTable(..)) { FaultReason::NotPresent } else { reason(w) };
                    return Err(Miss::Fault(r, iopf));
                }
                Err(NestedError::Stage2(w)) => return Err(Miss::Fault(reason(w), iopf)),
            }
        } else {
            let leaf = walk(&self.pool, e.s2_root, iova).map_err(|w| Miss::Fault(reason(w), iopf))?;
            (leaf, leaf.perm)
        };
        let dirty = (e.flags & PASID_DIRTY != 0).then_some((leaf.table, leaf.index));
        // A nested translation is only known to hold for its 4 KiB page.
        let size = if e.flags & PASID_NESTED != 0 { PAGE_SIZE } else { leaf.page_size };
        let iova_base = iova & !(size - 1);
        Ok(Walked { iova_base, sys_base: leaf.address - (iova - iova_base), size, perm, dirty })
    }

    /// The translation of `page` of `(dev, pasid)`: from this thread's
    /// IOTLB, or walked (and cached). `st` is the device's state, looked up
    /// on the first walk an access makes.
    #[inline]
    pub(super) fn lookup(
        &self,
        t: &ThreadUnit,
        dev: u32,
        st: &mut Option<DeviceState>,
        pasid: u32,
        page: u64,
    ) -> std::result::Result<Iotlb, Miss> {
        if let Some(e) = t.get(dev, pasid, page) {
            return Ok(e);
        }
        self.lookup_slow(t, dev, st, pasid, page)
    }

    #[inline(never)]
    fn lookup_slow(
        &self,
        t: &ThreadUnit,
        dev: u32,
        st: &mut Option<DeviceState>,
        pasid: u32,
        page: u64,
    ) -> std::result::Result<Iotlb, Miss> {
        t.missed();
        let s = match st {
            Some(s) => *s,
            None => {
                let s = t.device(dev, || sync::read(&self.devices).get(&dev).copied()).ok_or(Miss::NoDevice)?;
                *st = Some(s);
                s
            }
        };
        let w = self.walk_page(&s, pasid, page)?;
        let sys = w.sys_base + (page - w.iova_base);
        let mem = t
            .object(sys, || {
                let mems = sync::read(&self.mems);
                find_mem(&mems, sys).map(|m| (m.base, m.size, MemRef::new(m)))
            })
            .ok_or(Miss::NeedMemory(sys))?;
        let e = Iotlb { iova_base: w.iova_base, sys_base: w.sys_base, size: w.size, perm: w.perm, dirty: w.dirty, mem };
        t.put(dev, pasid, e);
        Ok(e)
    }

    /// The translation of `page`: from the IOTLB or a walk, or, in the
    /// copying pass of an access, as its checking pass found it.
    #[inline]
    pub(super) fn entry(
        &self,
        t: &ThreadUnit,
        dev: u32,
        st: &mut Option<DeviceState>,
        pasid: u32,
        page: u64,
        looked: &mut Option<&mut Looked>,
    ) -> std::result::Result<Iotlb, Miss> {
        if let Some(l) = looked.as_deref_mut() {
            if let Some(e) = l.replay(page) {
                return Ok(e);
            }
        }
        let e = self.lookup(t, dev, st, pasid, page)?;
        if let Some(l) = looked.as_deref_mut() {
            l.record(e);
        }
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
            mem: MemRef::none(),
        }
    }

    #[test]
    fn the_copying_pass_gets_every_translation_the_check_found() {
        let mut l = Looked::new(Vec::new());
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
        // A backward copying pass finds them too.
        for i in (0..40).rev() {
            assert_eq!(l.replay(i * PAGE_SIZE).map(|e| e.sys_base), Some((i + 100) * PAGE_SIZE));
        }
        assert!(l.replay(40 * PAGE_SIZE).is_none(), "a page the check never saw is looked up");
        l.record(leaf(41));
        assert!(l.replay(41 * PAGE_SIZE).is_none(), "nothing is recorded while replaying");
    }
}
