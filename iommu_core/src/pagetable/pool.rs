//! One session's table pool: its sealed memfd, table allocation against the
//! session's quota and the core's budget, and map/unmap of ranges.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{
    level_shift, map_words, slots, DirtyPool, Error, Perm, TableMemory, Words, ENTRIES, LEVELS, MAX_IOVA, PAGE_SIZE,
    PTE_ADDR_MASK, PTE_LEAF, PTE_PRESENT,
};
use crate::failpoint::FailNth;
use crate::memfd;

/// Tables allocated across every pool of a core, against one cap (the
/// core's `table_pool_bytes`): each session's pool draws from it.
#[derive(Debug)]
pub struct TableBudget {
    cap: u32,
    used: std::sync::atomic::AtomicU32,
}

impl TableBudget {
    /// A budget of `cap` tables.
    pub fn new(cap: u32) -> Arc<TableBudget> {
        Arc::new(TableBudget { cap, used: std::sync::atomic::AtomicU32::new(0) })
    }

    /// Tables allocated now, in every pool.
    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    /// The cap.
    pub fn cap(&self) -> u32 {
        self.cap
    }

    fn take(&self) -> bool {
        self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| (u < self.cap).then_some(u + 1)).is_ok()
    }

    fn give_back(&self, n: u32) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }
}

/// A map being written: `[iova, ..)` onto `[addr, ..)` with `perm`, every
/// new leaf clean in `dirty`.
struct MapRun<'a> {
    iova: u64,
    addr: u64,
    perm: Perm,
    dirty: Option<&'a DirtyPool>,
}

/// One session's table pool: a memfd of page tables that only the core can
/// write. The core maps it read-write once, then seals it
/// (`F_SEAL_FUTURE_WRITE`, shrink, grow, seal): from then on the kernel
/// refuses every new writable mapping, `write`, `fallocate` and size change
/// through any fd of the file, a re-open through `/proc` included, while
/// the core's own mapping stays writable. Device servers map it read-only,
/// and each session's device channels get only their session's pool.
#[derive(Debug)]
pub struct TablePool {
    file: File,
    tables: Words,
    pages: u32,
    next_fresh: u32,
    free: Vec<u32>,
    /// Present entries of each table handed out so far (grows with
    /// `next_fresh`, so an idle session costs no bookkeeping).
    used: Vec<u16>,
    in_use: u32,
    fail: Arc<FailNth>,
    budget: Arc<TableBudget>,
}

impl TablePool {
    /// Creates a pool with room for `tables` tables (page 0 is reserved on
    /// top), drawing from `budget`. The file is sparse: only tables in use
    /// take memory.
    pub fn new(tables: u32, budget: Arc<TableBudget>, fail: Arc<FailNth>) -> Result<TablePool, Error> {
        let pages = tables.max(1).checked_add(1).ok_or_else(|| Error::Create("pool too large".into()))?;
        let size = u64::from(pages) * PAGE_SIZE;
        let file = memfd::create("ioasid-table-pool", size).map_err(|e| Error::Create(e.to_string()))?;
        let tables = map_words(&file, size)?;
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        let seals =
            SealFlag::F_SEAL_FUTURE_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))
            .map_err(|e| Error::Create(format!("cannot seal the table pool: {e}")))?;
        Ok(TablePool {
            file,
            tables,
            pages,
            // Page 0 is never handed out: a zero address means "none".
            next_fresh: 1,
            free: Vec::new(),
            used: vec![0],
            in_use: 0,
            fail,
            budget,
        })
    }

    /// The pool memfd (device servers map it read-only).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Tables the pool has room for, page 0 included (sizes dirty pools).
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Size of the pool in bytes.
    pub fn size(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE
    }

    /// Tables currently allocated.
    pub fn tables_in_use(&self) -> u32 {
        self.in_use
    }

    /// Tables the pool can hold (page 0 is reserved).
    pub fn capacity(&self) -> u32 {
        self.pages - 1
    }

    pub(super) fn entry(&self, table: u64, index: usize) -> Option<&AtomicU64> {
        if table == 0 || !table.is_multiple_of(PAGE_SIZE) || index >= ENTRIES {
            return None;
        }
        self.tables.u64(table.checked_add(index as u64 * 8)?)
    }

    pub(super) fn store(&self, table: u64, index: usize, value: u64) {
        if let Some(w) = self.entry(table, index) {
            w.store(value, Ordering::Release);
        }
    }

    fn page_index(table: u64) -> usize {
        (table / PAGE_SIZE) as usize
    }

    fn used_of(&self, table: u64) -> u16 {
        self.used.get(Self::page_index(table)).copied().unwrap_or(0)
    }

    fn add_used(&mut self, table: u64, delta: i32) {
        if let Some(u) = self.used.get_mut(Self::page_index(table)) {
            *u = (i32::from(*u) + delta).clamp(0, ENTRIES as i32) as u16;
        }
    }

    /// Allocates a zeroed table and returns its pool offset.
    pub fn alloc_table(&mut self) -> Result<u64, Error> {
        if self.fail.step() {
            return Err(Error::Injected);
        }
        if self.free.is_empty() && self.next_fresh >= self.pages {
            // A pool is never larger than the budget: when both are full,
            // the budget is what ran out.
            if self.budget.used() >= self.budget.cap() {
                return Err(Error::PoolFull(self.budget.used()));
            }
            return Err(Error::Quota(self.capacity()));
        }
        if !self.budget.take() {
            return Err(Error::PoolFull(self.budget.used()));
        }
        let page = if let Some(p) = self.free.pop() {
            p
        } else {
            self.next_fresh += 1;
            self.used.push(0);
            self.next_fresh - 1
        };
        let table = u64::from(page) * PAGE_SIZE;
        for i in 0..ENTRIES {
            self.store(table, i, 0);
        }
        self.used[page as usize] = 0;
        self.in_use += 1;
        Ok(table)
    }

    /// Clears every entry of `table` (its children stay as they are, out
    /// of every walk's reach).
    pub fn zero_table(&mut self, table: u64) {
        for i in 0..ENTRIES {
            self.store(table, i, 0);
        }
        if let Some(u) = self.used.get_mut(Self::page_index(table)) {
            *u = 0;
        }
    }

    /// Returns a table to the pool. The caller guarantees no walker can
    /// still reach it (the invalidation handshake).
    pub fn free_table(&mut self, table: u64) {
        let page = Self::page_index(table);
        if page == 0 || page >= self.next_fresh as usize || !table.is_multiple_of(PAGE_SIZE) {
            return;
        }
        self.used[page] = 0;
        self.free.push(page as u32);
        self.in_use = self.in_use.saturating_sub(1);
        self.budget.give_back(1);
    }

    /// Maps `[iova, iova+len)` onto `[addr, addr+len)` with `perm`, using the
    /// largest leaves alignment allows. All or nothing: on failure the range
    /// is left unmapped, and the tables the attempt had linked are added to
    /// `garbage` (a walker may have reached them: they are freed once the
    /// invalidation of the range is done, like an unmap's).
    ///
    /// Every new leaf starts clean in `dirty` (the owning session's pool).
    #[allow(clippy::too_many_arguments)]
    pub fn map_range(
        &mut self,
        root: u64,
        iova: u64,
        addr: u64,
        len: u64,
        perm: Perm,
        dirty: Option<&DirtyPool>,
        garbage: &mut Vec<u64>,
    ) -> Result<(), Error> {
        debug_assert!(
            iova.is_multiple_of(PAGE_SIZE) && addr.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE)
        );
        let res = self.map_level(root, LEVELS, iova, iova + len, &MapRun { iova, addr, perm, dirty });
        if res.is_err() {
            self.unmap_range(root, iova, len, garbage);
        }
        res
    }

    /// Writes `[start, end)` of `run` into `table`, a table at `level`.
    fn map_level(&mut self, table: u64, level: u32, start: u64, end: u64, run: &MapRun<'_>) -> Result<(), Error> {
        for s in slots(level, start, end) {
            let a = run.addr + (s.start - run.iova);
            let e = self.entry(table, s.index).map_or(0, |w| w.load(Ordering::Relaxed));
            if e & PTE_PRESENT == 0 && s.whole() && a & (s.size - 1) == 0 && level <= 3 {
                if let Some(d) = run.dirty {
                    d.clear(table, s.index);
                }
                self.store(table, s.index, a | run.perm.bits() | PTE_LEAF | PTE_PRESENT);
                self.add_used(table, 1);
            } else if e & PTE_PRESENT != 0 && (e & PTE_LEAF != 0 || level == 1) {
                return Err(Error::Overlap(s.start));
            } else {
                let child = if e & PTE_PRESENT != 0 {
                    e & PTE_ADDR_MASK
                } else {
                    let t = self.alloc_table()?;
                    self.store(table, s.index, t | PTE_PRESENT);
                    self.add_used(table, 1);
                    t
                };
                self.map_level(child, level - 1, s.start, s.end, run)?;
            }
        }
        Ok(())
    }

    /// Clears every leaf in `[iova, iova+len)`; tables left empty are
    /// unlinked and pushed on `garbage` for the caller to free once no walker
    /// can reach them. The root is never unlinked.
    pub fn unmap_range(&mut self, root: u64, iova: u64, len: u64, garbage: &mut Vec<u64>) {
        if len == 0 {
            return;
        }
        self.unmap_level(root, LEVELS, iova, iova.saturating_add(len).min(MAX_IOVA + 1), garbage);
    }

    fn unmap_level(&mut self, table: u64, level: u32, iova: u64, end: u64, garbage: &mut Vec<u64>) {
        for s in slots(level, iova, end) {
            let e = self.entry(table, s.index).map_or(0, |w| w.load(Ordering::Relaxed));
            if e & PTE_PRESENT == 0 {
                continue;
            }
            if e & PTE_LEAF != 0 || level == 1 {
                self.store(table, s.index, 0);
                self.add_used(table, -1);
                continue;
            }
            let child = e & PTE_ADDR_MASK;
            self.unmap_level(child, level - 1, s.start, s.end, garbage);
            if self.used_of(child) == 0 {
                self.store(table, s.index, 0);
                self.add_used(table, -1);
                garbage.push(child);
            }
        }
    }

    /// The present entries under `root`, one line each, depth first, at
    /// most `max` lines (a last line says how many were left out):
    /// `L<level> <table>[<index>] <first>-<last> -> table <t>` for a table
    /// and `... -> <system address> <perm> <size>` for a leaf.
    pub fn dump(&self, root: u64, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut left = 0u64;
        self.dump_level(root, LEVELS, 0, &mut out, max, &mut left);
        if left > 0 {
            out.push(format!("... {left} more entries left out"));
        }
        out
    }

    fn dump_level(&self, table: u64, level: u32, base: u64, out: &mut Vec<String>, max: usize, left: &mut u64) {
        let shift = level_shift(level);
        let size = 1u64 << shift;
        for i in 0..ENTRIES {
            let e = self.entry(table, i).map_or(0, |w| w.load(Ordering::Relaxed));
            if e & PTE_PRESENT == 0 {
                continue;
            }
            let first = base + (i as u64) * size;
            let last = first + size - 1;
            let leaf = e & PTE_LEAF != 0 || level == 1;
            if out.len() >= max {
                *left += 1;
            } else if leaf {
                let perm = Perm::from_bits(e);
                let sz = match size {
                    s if s >= 1 << 30 => format!("{}G", s >> 30),
                    s if s >= 1 << 20 => format!("{}M", s >> 20),
                    s => format!("{}K", s >> 10),
                };
                out.push(format!(
                    "L{level} {table:#x}[{i}] {first:#x}-{last:#x} -> {:#x} {perm} {sz}",
                    e & PTE_ADDR_MASK
                ));
            } else {
                out.push(format!("L{level} {table:#x}[{i}] {first:#x}-{last:#x} -> table {:#x}", e & PTE_ADDR_MASK));
            }
            if !leaf {
                self.dump_level(e & PTE_ADDR_MASK, level - 1, first, out, max, left);
            }
        }
    }

    /// Counts the tables reachable from `root` (root included).
    pub fn count_tables(&self, root: u64) -> u32 {
        self.count_level(root, LEVELS)
    }

    fn count_level(&self, table: u64, level: u32) -> u32 {
        let mut n = 1;
        if level == 1 {
            return n;
        }
        for i in 0..ENTRIES {
            let e = self.entry(table, i).map_or(0, |w| w.load(Ordering::Relaxed));
            if e & PTE_PRESENT != 0 && e & PTE_LEAF == 0 {
                n += self.count_level(e & PTE_ADDR_MASK, level - 1);
            }
        }
        n
    }
}

impl Drop for TablePool {
    fn drop(&mut self) {
        // The file goes with the core's last reference; a device server
        // that still maps it reads tables nobody will change again.
        self.budget.give_back(self.in_use);
    }
}

impl TableMemory for TablePool {
    fn load(&self, table: u64, index: usize) -> Option<u64> {
        self.entry(table, index).map(|w| w.load(Ordering::Acquire))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::pagetable::{walk, WalkError};

    /// A pool of `tables` tables (page 0 included) with no budget or
    /// failure injection in the way; the other pagetable tests use it too.
    pub(in crate::pagetable) fn pool(tables: u32) -> TablePool {
        TablePool::new(tables - 1, TableBudget::new(u32::MAX), Arc::new(FailNth::default())).unwrap()
    }

    #[test]
    fn maps_with_largest_leaves_and_walks_back() {
        let mut p = pool(64);
        let root = p.alloc_table().unwrap();
        let gib = 1u64 << 30;
        // 1 GiB + 2 MiB + 4 KiB, all aligned: one leaf of each size.
        let len = gib + (2 << 20) + 4096;
        p.map_range(root, gib, 4 * gib, len, Perm::RW, None, &mut Vec::new()).unwrap();
        let l = walk(&p, root, gib + 5).unwrap();
        assert_eq!((l.address, l.page_size), (4 * gib + 5, gib));
        let l = walk(&p, root, 2 * gib + 0x1234).unwrap();
        assert_eq!((l.address, l.page_size), (5 * gib + 0x1234, 2 << 20));
        let l = walk(&p, root, 2 * gib + (2 << 20) + 7).unwrap();
        assert_eq!((l.address, l.page_size, l.perm), (5 * gib + (2 << 20) + 7, 4096, Perm::RW));
        assert_eq!(walk(&p, root, 2 * gib + (2 << 20) + 4096), Err(WalkError::NotPresent(1)));
        assert_eq!(walk(&p, root, 0), Err(WalkError::NotPresent(3)));
        // root + L3 + L2 + L1
        assert_eq!(p.count_tables(root), 4);
        let mut g = Vec::new();
        p.unmap_range(root, gib, len, &mut g);
        assert_eq!(g.len(), 3);
        for t in g {
            p.free_table(t);
        }
        assert_eq!(p.tables_in_use(), 1);
        assert!(walk(&p, root, gib).is_err());
    }

    #[test]
    fn misaligned_address_falls_back_to_small_leaves() {
        let mut p = pool(64);
        let root = p.alloc_table().unwrap();
        p.map_range(root, 2 << 20, (2 << 20) + 4096, 2 << 20, Perm::R, None, &mut Vec::new()).unwrap();
        let l = walk(&p, root, (2 << 20) + 4096 * 3).unwrap();
        assert_eq!((l.page_size, l.perm), (4096, Perm::R));
        assert_eq!(l.address, (2 << 20) + 4096 * 4);
    }

    #[test]
    fn pool_exhaustion_rolls_back() {
        let mut p = pool(4);
        let root = p.alloc_table().unwrap();
        // Needs L3, L2, L1 tables = 3 more, but only 2 remain.
        let mut garbage = Vec::new();
        assert_eq!(p.map_range(root, 0x1000, 0x1000, 0x1000, Perm::RW, None, &mut garbage), Err(Error::Quota(3)));
        // What the attempt linked is handed back, not freed behind a walker.
        assert_eq!(garbage.len(), 2);
        for t in garbage {
            p.free_table(t);
        }
        assert_eq!(p.tables_in_use(), 1);
        assert_eq!(walk(&p, root, 0x1000), Err(WalkError::NotPresent(4)));
    }
}
