//! Dirty bits: each session's dirty pool, and reading and clearing the bits
//! of the leaves under a root.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    map_words, slots, Error, TablePool, Words, DIRTY_BYTES_PER_TABLE, ENTRIES, LEVELS, MAX_IOVA, PAGE_SIZE,
    PTE_ADDR_MASK, PTE_LEAF, PTE_PRESENT,
};
use crate::memfd;

/// One session's dirty bits: one bit per table entry of the pool, in a
/// sparse memfd that the session's device servers map read-write. Each
/// session has its own, so no device channel can touch another session's
/// dirty state.
#[derive(Debug)]
pub struct DirtyPool {
    file: File,
    words: Words,
    size: u64,
}

impl DirtyPool {
    /// A dirty pool for a table pool of `pages` tables.
    pub fn new(pages: u32) -> Result<DirtyPool, Error> {
        let size = (u64::from(pages) * DIRTY_BYTES_PER_TABLE).next_multiple_of(PAGE_SIZE);
        let file = memfd::create_sealed("ioasid-dirty", size).map_err(|e| Error::Create(e.to_string()))?;
        let words = map_words(&file, size)?;
        Ok(DirtyPool { file, words, size })
    }

    /// The memfd (device servers map it read-write).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn word(&self, table: u64, index: usize) -> Option<(&AtomicU64, u64)> {
        let bit = (table / PAGE_SIZE) * (ENTRIES as u64) + index as u64;
        Some((self.words.u64((bit / 64) * 8)?, 1u64 << (bit % 64)))
    }

    /// Marks the leaf at `(table, index)` dirty, as a device writing through
    /// it does.
    pub fn mark(&self, table: u64, index: usize) {
        if let Some((w, mask)) = self.word(table, index) {
            w.fetch_or(mask, Ordering::Relaxed);
        }
    }

    pub(super) fn clear(&self, table: u64, index: usize) {
        if let Some((w, mask)) = self.word(table, index) {
            w.fetch_and(!mask, Ordering::Relaxed);
        }
    }
}

impl TablePool {
    /// Reads the dirty state of `[iova, iova+len)` at `page_size`
    /// granularity into a bitmap (bit k = page `iova + k*page_size`), and
    /// clears the dirty bits of leaves wholly inside the range unless
    /// `no_clear`. Leaves that only partly overlap keep their bit, so a dirty
    /// page is never lost.
    pub fn read_dirty(
        &self,
        dirty: &DirtyPool,
        root: u64,
        iova: u64,
        len: u64,
        page_size: u64,
        no_clear: bool,
    ) -> Vec<u64> {
        let pages = len / page_size;
        let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
        let end = iova + len;
        self.dirty_level(root, LEVELS, iova, end, &mut |leaf_start, leaf_end, table, index| {
            let Some((w, mask)) = dirty.word(table, index) else { return };
            if w.load(Ordering::Relaxed) & mask == 0 {
                return;
            }
            let lo = leaf_start.max(iova);
            let hi = leaf_end.min(end);
            let first = (lo - iova) / page_size;
            let last = (hi - 1 - iova) / page_size;
            for k in first..=last {
                bitmap[(k / 64) as usize] |= 1 << (k % 64);
            }
            if !no_clear && leaf_start >= iova && leaf_end <= end {
                w.fetch_and(!mask, Ordering::Relaxed);
            }
        });
        bitmap
    }

    /// Clears the dirty bit of every leaf under `root`.
    pub fn clear_dirty(&self, dirty: &DirtyPool, root: u64) {
        self.dirty_level(root, LEVELS, 0, MAX_IOVA + 1, &mut |_, _, table, index| dirty.clear(table, index));
    }

    fn dirty_level(&self, table: u64, level: u32, iova: u64, end: u64, f: &mut dyn FnMut(u64, u64, u64, usize)) {
        for s in slots(level, iova, end) {
            let e = self.entry(table, s.index).map_or(0, |w| w.load(Ordering::Relaxed));
            if e & PTE_PRESENT == 0 {
                continue;
            }
            if e & PTE_LEAF != 0 || level == 1 {
                f(s.base, s.base + s.size, table, s.index);
            } else {
                self.dirty_level(e & PTE_ADDR_MASK, level - 1, s.start, s.end, f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagetable::pool::tests::pool;
    use crate::pagetable::{walk, Perm};

    #[test]
    fn dirty_bits_report_and_clear() {
        let mut p = pool(64);
        let root = p.alloc_table().unwrap();
        let d = DirtyPool::new(p.pages()).unwrap();
        p.map_range(root, 0x10_0000, 0x4000_0000, 0x4000, Perm::RW, Some(&d), &mut Vec::new()).unwrap();
        let l = walk(&p, root, 0x10_2000).unwrap();
        d.mark(l.table, l.index);
        let bm = p.read_dirty(&d, root, 0x10_0000, 0x4000, 4096, true);
        assert_eq!(bm, vec![0b0100]);
        let bm = p.read_dirty(&d, root, 0x10_0000, 0x4000, 4096, false);
        assert_eq!(bm, vec![0b0100]);
        assert_eq!(p.read_dirty(&d, root, 0x10_0000, 0x4000, 4096, false), vec![0]);
        // A leaf mapped again starts clean.
        d.mark(l.table, l.index);
        let mut g = Vec::new();
        p.unmap_range(root, 0x10_0000, 0x4000, &mut g);
        p.map_range(root, 0x10_0000, 0x4000_0000, 0x4000, Perm::RW, Some(&d), &mut Vec::new()).unwrap();
        assert_eq!(p.read_dirty(&d, root, 0x10_0000, 0x4000, 4096, true), vec![0]);
    }
}
