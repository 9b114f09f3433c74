//! I/O page tables in the shared table pool, and the reference walker.
//!
//! The format is documented in `docs/page-table-format.md`. In short: 4 KiB
//! tables of 512 little-endian u64 entries, 4 levels over a 48-bit IOVA,
//! leaves at level 1 (4 KiB), level 2 (2 MiB) and level 3 (1 GiB). Entry bits:
//!
//! | bits  | meaning                                                      |
//! |-------|--------------------------------------------------------------|
//! | 0     | present                                                      |
//! | 1     | read allowed (leaves)                                        |
//! | 2     | write allowed (leaves)                                       |
//! | 7     | leaf (set on every leaf, at any level)                       |
//! | 12-51 | address: a system address (leaf) or a pool offset (table)    |
//! | other | reserved, zero; a walker treats a set reserved bit as a fault|
//!
//! Tables live in a memfd (the *table pool*) that device servers map
//! read-only. A companion *dirty pool* holds one bit per table entry; device
//! servers set it when they write through a leaf of an IOAS with dirty
//! tracking on, and the core reads and clears it.
//!
//! Shared memory is touched only through `AtomicU64`: the core publishes
//! entries with release stores and the walker reads them with acquire loads.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::failpoint::FailNth;
use crate::memfd;

/// Size of a page and of one table.
pub const PAGE_SIZE: u64 = 4096;
/// Entries per table.
pub const ENTRIES: usize = 512;
/// Number of levels; level 4 is the root, level 1 holds 4 KiB leaves.
pub const LEVELS: u32 = 4;
/// Width of the IOVA the tables translate.
pub const IOVA_BITS: u32 = 48;
/// Highest IOVA the tables can translate.
pub const MAX_IOVA: u64 = (1 << IOVA_BITS) - 1;
/// Entry bit: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Entry bit: read allowed.
pub const PTE_READ: u64 = 1 << 1;
/// Entry bit: write allowed.
pub const PTE_WRITE: u64 = 1 << 2;
/// Entry bit: this entry is a leaf.
pub const PTE_LEAF: u64 = 1 << 7;
/// Address field (bits 12..=51).
pub const PTE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// Bits that must be zero.
pub const PTE_RESERVED_MASK: u64 = !(PTE_ADDR_MASK | PTE_PRESENT | PTE_READ | PTE_WRITE | PTE_LEAF);
/// Largest system address an entry can hold.
pub const MAX_ADDRESS: u64 = PTE_ADDR_MASK | (PAGE_SIZE - 1);
/// Leaf sizes, smallest first.
pub const LEAF_SIZES: [u64; 3] = [1 << 12, 1 << 21, 1 << 30];
/// Bytes of dirty bitmap per table (one bit per entry).
pub const DIRTY_BYTES_PER_TABLE: u64 = (ENTRIES / 8) as u64;

/// Errors of the page-table code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The table pool has no free table left.
    #[error("the table pool is full ({0} tables in use)")]
    PoolFull(u32),
    /// An injected allocation failure (fail-nth sweep).
    #[error("injected allocation failure")]
    Injected,
    /// Creating or mapping the pool failed.
    #[error("cannot create the table pool: {0}")]
    Create(String),
    /// The range overlaps an entry that is already present.
    #[error("IOVA {0:#x} is already mapped in the page table")]
    Overlap(u64),
    /// The owner charged for new tables holds its quota.
    #[error("the session holds {0} page tables, the configured limit")]
    Quota(u32),
}

/// Access permission of a mapping or a DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Perm {
    /// Device may read.
    pub read: bool,
    /// Device may write.
    pub write: bool,
}

impl Perm {
    /// Read only.
    pub const R: Perm = Perm { read: true, write: false };
    /// Write only.
    pub const W: Perm = Perm { read: false, write: true };
    /// Read and write.
    pub const RW: Perm = Perm { read: true, write: true };

    /// True if every right in `other` is also in `self`.
    pub fn allows(self, other: Perm) -> bool {
        (self.read || !other.read) && (self.write || !other.write)
    }

    /// True if neither right is set.
    pub fn is_empty(self) -> bool {
        !self.read && !self.write
    }

    fn bits(self) -> u64 {
        (if self.read { PTE_READ } else { 0 }) | (if self.write { PTE_WRITE } else { 0 })
    }

    fn from_bits(e: u64) -> Perm {
        Perm { read: e & PTE_READ != 0, write: e & PTE_WRITE != 0 }
    }
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.read, self.write) {
            (true, true) => "rw",
            (true, false) => "r",
            (false, true) => "w",
            (false, false) => "-",
        })
    }
}

/// Shift of the IOVA bits indexing a table at `level`.
pub const fn level_shift(level: u32) -> u32 {
    12 + 9 * (level - 1)
}

/// Read access to tables, as a walker sees them.
pub trait TableMemory {
    /// Loads entry `index` of the table at pool offset `table` with acquire
    /// ordering, or `None` if the table lies outside the pool.
    fn load(&self, table: u64, index: usize) -> Option<u64>;
}

/// Where a walk ended successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Translated address of the IOVA asked for.
    pub address: u64,
    /// Rights of the leaf.
    pub perm: Perm,
    /// Size of the leaf (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Pool offset of the table holding the leaf.
    pub table: u64,
    /// Index of the leaf in that table.
    pub index: usize,
}

/// Why a walk failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The IOVA is beyond the 48-bit space.
    #[error("IOVA {0:#x} is beyond the 48-bit space")]
    OutOfRange(u64),
    /// No present entry at this level.
    #[error("not present at level {0}")]
    NotPresent(u32),
    /// An entry with reserved bits or a leaf where none may be.
    #[error("malformed entry {1:#x} at level {0}")]
    Malformed(u32, u64),
    /// A table address outside the pool.
    #[error("table address {1:#x} outside the pool at level {0}")]
    BadTable(u32, u64),
}

/// Walks the tables rooted at `root` for `iova`.
///
/// Every entry is validated: reserved bits, leaves only at levels 1-3, large
/// leaves aligned, tables inside the pool. A walk reads at most 4 entries.
pub fn walk(mem: &impl TableMemory, root: u64, iova: u64) -> Result<Leaf, WalkError> {
    if iova > MAX_IOVA {
        return Err(WalkError::OutOfRange(iova));
    }
    let mut table = root;
    for level in (1..=LEVELS).rev() {
        let shift = level_shift(level);
        let index = ((iova >> shift) & (ENTRIES as u64 - 1)) as usize;
        let e = mem.load(table, index).ok_or(WalkError::BadTable(level, table))?;
        if e & PTE_PRESENT == 0 {
            return Err(WalkError::NotPresent(level));
        }
        if e & PTE_RESERVED_MASK != 0 {
            return Err(WalkError::Malformed(level, e));
        }
        let addr = e & PTE_ADDR_MASK;
        let is_leaf = e & PTE_LEAF != 0;
        if is_leaf {
            let size = 1u64 << shift;
            if level == LEVELS || addr & (size - 1) != 0 {
                return Err(WalkError::Malformed(level, e));
            }
            return Ok(Leaf {
                address: addr + (iova & (size - 1)),
                perm: Perm::from_bits(e),
                page_size: size,
                table,
                index,
            });
        }
        if level == 1 {
            return Err(WalkError::Malformed(level, e));
        }
        table = addr;
    }
    // The loop returns at level 1 at the latest.
    Err(WalkError::Malformed(1, 0))
}

/// Stage-1 tables as a nested walk sees them. Stage-1 tables belong to
/// the user and live in its memory at parent (stage-2) IOVAs, so every load
/// is first translated through the stage-2 tables; `read` then loads the
/// 8-byte word at the system address it is given (or `None`).
///
/// Nothing in stage 1 is trusted: an entry may point anywhere, at an
/// unaligned or unmapped address or outside the user's memory, and each
/// such case ends the walk with an error.
pub struct Stage1<'a, S, F> {
    /// The stage-2 tables (the core's pool).
    pub s2: &'a S,
    /// Root of the stage-2 tables.
    pub s2_root: u64,
    /// Loads a word of user memory at a system address.
    pub read: F,
}

impl<S: TableMemory, F: Fn(u64) -> Option<u64>> TableMemory for Stage1<'_, S, F> {
    fn load(&self, table: u64, index: usize) -> Option<u64> {
        if index >= ENTRIES {
            return None;
        }
        let addr = table.checked_add(index as u64 * 8)?;
        if !addr.is_multiple_of(8) {
            return None;
        }
        let leaf = walk(self.s2, self.s2_root, addr).ok()?;
        if !leaf.perm.read {
            return None;
        }
        (self.read)(leaf.address)
    }
}

/// Where a nested (two-stage) walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NestedLeaf {
    /// System address of the IOVA asked for.
    pub address: u64,
    /// Rights: those of the stage-1 leaf and the stage-2 leaf together.
    pub perm: Perm,
    /// The stage-2 leaf of the final address (for dirty tracking).
    pub s2: Leaf,
}

/// Why a nested walk failed, and in which stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NestedError {
    /// The user's stage-1 tables (or a stage-1 table address that stage 2
    /// does not map readable).
    #[error("stage 1: {0}")]
    Stage1(WalkError),
    /// The stage-2 translation of the stage-1 result.
    #[error("stage 2: {0}")]
    Stage2(WalkError),
}

/// Walks `iova` through the user's stage-1 tables rooted at the parent
/// IOVA `s1_root`, then the resulting parent IOVA through stage 2.
pub fn walk_nested<S: TableMemory, F: Fn(u64) -> Option<u64>>(
    s1: &Stage1<'_, S, F>,
    s1_root: u64,
    iova: u64,
) -> Result<NestedLeaf, NestedError> {
    let l1 = walk(s1, s1_root, iova).map_err(NestedError::Stage1)?;
    let l2 = walk(s1.s2, s1.s2_root, l1.address).map_err(NestedError::Stage2)?;
    let perm = Perm { read: l1.perm.read && l2.perm.read, write: l1.perm.write && l2.perm.write };
    Ok(NestedLeaf { address: l2.address, perm, s2: l2 })
}

/// An atomic view of a mapped region of u64 words.
#[derive(Debug)]
struct Words {
    map: memmap2::MmapRaw,
}

impl Words {
    fn map(file: &File, len: u64) -> Result<Words, Error> {
        let len = usize::try_from(len).map_err(|_| Error::Create("size too large".into()))?;
        let map = memmap2::MmapOptions::new().len(len).map_raw(file).map_err(|e| Error::Create(e.to_string()))?;
        Ok(Words { map })
    }

    fn word(&self, byte_offset: u64) -> Option<&AtomicU64> {
        let off = usize::try_from(byte_offset).ok()?;
        if off % 8 != 0 || off.checked_add(8)? > self.map.len() {
            return None;
        }
        // SAFETY: the offset is 8-byte aligned and inside the mapping (checked
        // above); the mapping is page aligned, lives as long as `self`, and
        // every access to it anywhere goes through atomics.
        Some(unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast::<u64>()) })
    }
}

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
        let words = Words::map(&file, size)?;
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
        Some((self.words.word((bit / 64) * 8)?, 1u64 << (bit % 64)))
    }

    /// Marks the leaf at `(table, index)` dirty, as a device writing through
    /// it does.
    pub fn mark(&self, table: u64, index: usize) {
        if let Some((w, mask)) = self.word(table, index) {
            w.fetch_or(mask, Ordering::Relaxed);
        }
    }

    fn clear(&self, table: u64, index: usize) {
        if let Some((w, mask)) = self.word(table, index) {
            w.fetch_and(!mask, Ordering::Relaxed);
        }
    }
}

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
        let tables = Words::map(&file, size)?;
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

    fn entry(&self, table: u64, index: usize) -> Option<&AtomicU64> {
        if table == 0 || !table.is_multiple_of(PAGE_SIZE) || index >= ENTRIES {
            return None;
        }
        self.tables.word(table.checked_add(index as u64 * 8)?)
    }

    fn store(&self, table: u64, index: usize, value: u64) {
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
    /// is left unmapped and no table leaks.
    ///
    /// Every new leaf starts clean in `dirty` (the owning session's pool).
    pub fn map_range(
        &mut self,
        root: u64,
        iova: u64,
        addr: u64,
        len: u64,
        perm: Perm,
        dirty: Option<&DirtyPool>,
    ) -> Result<(), Error> {
        debug_assert!(
            iova.is_multiple_of(PAGE_SIZE) && addr.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE)
        );
        let res = self.map_level(root, LEVELS, iova, addr, len, perm, dirty);
        if res.is_err() {
            let mut garbage = Vec::new();
            self.unmap_range(root, iova, len, &mut garbage);
            for t in garbage {
                self.free_table(t);
            }
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn map_level(
        &mut self,
        table: u64,
        level: u32,
        iova: u64,
        addr: u64,
        len: u64,
        perm: Perm,
        dirty: Option<&DirtyPool>,
    ) -> Result<(), Error> {
        let shift = level_shift(level);
        let size = 1u64 << shift;
        let end = iova + len;
        let mut cur = iova;
        while cur < end {
            let index = ((cur >> shift) & (ENTRIES as u64 - 1)) as usize;
            let slot_base = cur & !(size - 1);
            let chunk_end = end.min(slot_base + size);
            let a = addr + (cur - iova);
            let e = self.entry(table, index).map_or(0, |w| w.load(Ordering::Relaxed));
            let whole = cur == slot_base && chunk_end - cur == size && a & (size - 1) == 0;
            if e & PTE_PRESENT == 0 && whole && level <= 3 {
                if let Some(d) = dirty {
                    d.clear(table, index);
                }
                self.store(table, index, a | perm.bits() | PTE_LEAF | PTE_PRESENT);
                self.add_used(table, 1);
            } else if e & PTE_PRESENT != 0 && (e & PTE_LEAF != 0 || level == 1) {
                return Err(Error::Overlap(cur));
            } else {
                let child = if e & PTE_PRESENT != 0 {
                    e & PTE_ADDR_MASK
                } else {
                    let t = self.alloc_table()?;
                    self.store(table, index, t | PTE_PRESENT);
                    self.add_used(table, 1);
                    t
                };
                self.map_level(child, level - 1, cur, a, chunk_end - cur, perm, dirty)?;
            }
            cur = chunk_end;
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
        let shift = level_shift(level);
        let size = 1u64 << shift;
        let mut cur = iova;
        while cur < end {
            let index = ((cur >> shift) & (ENTRIES as u64 - 1)) as usize;
            let slot_base = cur & !(size - 1);
            let chunk_end = end.min(slot_base + size);
            let e = self.entry(table, index).map_or(0, |w| w.load(Ordering::Relaxed));
            if e & PTE_PRESENT != 0 {
                if e & PTE_LEAF != 0 || level == 1 {
                    self.store(table, index, 0);
                    self.add_used(table, -1);
                } else {
                    let child = e & PTE_ADDR_MASK;
                    self.unmap_level(child, level - 1, cur, chunk_end, garbage);
                    if self.used_of(child) == 0 {
                        self.store(table, index, 0);
                        self.add_used(table, -1);
                        garbage.push(child);
                    }
                }
            }
            cur = chunk_end;
        }
    }

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
        let shift = level_shift(level);
        let size = 1u64 << shift;
        let mut cur = iova;
        while cur < end {
            let index = ((cur >> shift) & (ENTRIES as u64 - 1)) as usize;
            let slot_base = cur & !(size - 1);
            let chunk_end = end.min(slot_base + size);
            let e = self.entry(table, index).map_or(0, |w| w.load(Ordering::Relaxed));
            if e & PTE_PRESENT != 0 {
                if e & PTE_LEAF != 0 || level == 1 {
                    f(slot_base, slot_base + size, table, index);
                } else {
                    self.dirty_level(e & PTE_ADDR_MASK, level - 1, cur, chunk_end, f);
                }
            }
            cur = chunk_end;
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

/// PASID entry word 0: the entry is valid.
pub const PASID_VALID: u64 = 1 << 0;
/// PASID entry word 0: nested; word 1 holds the stage-1 root (a parent IOVA).
pub const PASID_NESTED: u64 = 1 << 1;
/// PASID entry word 0: writes must mark the stage-2 leaf dirty.
pub const PASID_DIRTY: u64 = 1 << 2;
/// PASID entry word 0: a fault may be sent as a page request (PRI).
pub const PASID_IOPF: u64 = 1 << 3;
/// PASID entries per leaf page of a PASID table (16 bytes each).
pub const PASIDS_PER_PAGE: u32 = 256;

/// A PASID table entry as read by a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidEntry {
    /// Flags (`PASID_*`).
    pub flags: u64,
    /// Pool offset of the stage-2 root table.
    pub s2_root: u64,
    /// Stage-1 root (a parent IOVA) when nested.
    pub s1_root: u64,
}

/// Looks up `pasid` in the PASID table whose directory root is at `root`.
///
/// Layout: a root page indexed by PASID bits 19..17 (8 entries used), a
/// directory page indexed by bits 16..8, and a leaf page of 256 entries of
/// two u64 words indexed by bits 7..0. Directory entries are `P | pool
/// offset`, as table entries are.
pub fn pasid_lookup(mem: &impl TableMemory, root: u64, pasid: u32) -> Option<PasidEntry> {
    if pasid >= 1 << 20 {
        return None;
    }
    let d = mem.load(root, (pasid >> 17) as usize)?;
    if d & PTE_PRESENT == 0 || d & PTE_RESERVED_MASK != 0 {
        return None;
    }
    let l = mem.load(d & PTE_ADDR_MASK, ((pasid >> 8) & 511) as usize)?;
    if l & PTE_PRESENT == 0 || l & PTE_RESERVED_MASK != 0 {
        return None;
    }
    let i = ((pasid & 255) * 2) as usize;
    let leaf = l & PTE_ADDR_MASK;
    let w0 = mem.load(leaf, i)?;
    if w0 & PASID_VALID == 0 {
        return None;
    }
    let w1 = mem.load(leaf, i + 1)?;
    Some(PasidEntry { flags: w0 & 0xfff, s2_root: w0 & PTE_ADDR_MASK, s1_root: w1 & PTE_ADDR_MASK })
}

impl TablePool {
    /// Writes the PASID entry of `pasid` under the PASID root `root`,
    /// allocating directory pages as needed (pushed on `pages`). Word 1 is
    /// published before word 0, so a reader never sees a valid entry with a
    /// stale stage-1 root.
    pub fn pasid_set(&mut self, root: u64, pasid: u32, e: PasidEntry, pages: &mut Vec<u64>) -> Result<(), Error> {
        let mut table = root;
        let mut linked: Vec<(u64, usize, u64)> = Vec::new();
        for index in [(pasid >> 17) as usize, ((pasid >> 8) & 511) as usize] {
            let d = self.entry(table, index).map_or(0, |w| w.load(Ordering::Relaxed));
            table = if d & PTE_PRESENT != 0 {
                d & PTE_ADDR_MASK
            } else {
                match self.alloc_table() {
                    Ok(t) => {
                        self.store(table, index, t | PTE_PRESENT);
                        linked.push((table, index, t));
                        t
                    }
                    Err(err) => {
                        // Unlink what this call linked before freeing it; the
                        // new pages only ever held empty entries.
                        for (parent, i, t) in linked.into_iter().rev() {
                            self.store(parent, i, 0);
                            self.free_table(t);
                        }
                        return Err(err);
                    }
                }
            };
        }
        pages.extend(linked.into_iter().map(|(_, _, t)| t));
        let i = ((pasid & 255) * 2) as usize;
        self.store(table, i, 0);
        self.store(table, i + 1, e.s1_root);
        self.store(table, i, e.s2_root | (e.flags & 0xfff) | PASID_VALID);
        Ok(())
    }

    /// Clears the PASID entry of `pasid` (the directory pages stay until
    /// the device is unbound).
    pub fn pasid_clear(&mut self, root: u64, pasid: u32) {
        let mut table = root;
        for index in [(pasid >> 17) as usize, ((pasid >> 8) & 511) as usize] {
            let d = self.entry(table, index).map_or(0, |w| w.load(Ordering::Relaxed));
            if d & PTE_PRESENT == 0 {
                return;
            }
            table = d & PTE_ADDR_MASK;
        }
        let i = ((pasid & 255) * 2) as usize;
        self.store(table, i, 0);
        self.store(table, i + 1, 0);
    }

    /// Clears every entry of a PASID table and returns all its pages (root
    /// included) for the caller to free.
    pub fn pasid_table_pages(&mut self, root: u64) -> Vec<u64> {
        let mut pages = vec![root];
        for i in 0..8 {
            let d = self.entry(root, i).map_or(0, |w| w.load(Ordering::Relaxed));
            if d & PTE_PRESENT == 0 {
                continue;
            }
            let mid = d & PTE_ADDR_MASK;
            for j in 0..ENTRIES {
                let l = self.entry(mid, j).map_or(0, |w| w.load(Ordering::Relaxed));
                if l & PTE_PRESENT != 0 {
                    let leaf = l & PTE_ADDR_MASK;
                    for k in 0..ENTRIES {
                        self.store(leaf, k, 0);
                    }
                    pages.push(leaf);
                }
                self.store(mid, j, 0);
            }
            pages.push(mid);
            self.store(root, i, 0);
        }
        pages
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
mod tests {
    use super::*;

    fn pool(tables: u32) -> TablePool {
        TablePool::new(tables - 1, TableBudget::new(u32::MAX), Arc::new(FailNth::default())).unwrap()
    }

    #[test]
    fn maps_with_largest_leaves_and_walks_back() {
        let mut p = pool(64);
        let root = p.alloc_table().unwrap();
        let gib = 1u64 << 30;
        // 1 GiB + 2 MiB + 4 KiB, all aligned: one leaf of each size.
        let len = gib + (2 << 20) + 4096;
        p.map_range(root, gib, 4 * gib, len, Perm::RW, None).unwrap();
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
        p.map_range(root, 2 << 20, (2 << 20) + 4096, 2 << 20, Perm::R, None).unwrap();
        let l = walk(&p, root, (2 << 20) + 4096 * 3).unwrap();
        assert_eq!((l.page_size, l.perm), (4096, Perm::R));
        assert_eq!(l.address, (2 << 20) + 4096 * 4);
    }

    #[test]
    fn pool_exhaustion_rolls_back() {
        let mut p = pool(4);
        let root = p.alloc_table().unwrap();
        // Needs L3, L2, L1 tables = 3 more, but only 2 remain.
        assert_eq!(p.map_range(root, 0x1000, 0x1000, 0x1000, Perm::RW, None), Err(Error::Quota(3)));
        assert_eq!(p.tables_in_use(), 1);
        assert_eq!(walk(&p, root, 0x1000), Err(WalkError::NotPresent(4)));
    }

    #[test]
    fn walker_rejects_hostile_entries() {
        struct Fake(Vec<u64>);
        impl TableMemory for Fake {
            fn load(&self, table: u64, index: usize) -> Option<u64> {
                if table == 0x1000 {
                    self.0.get(index).copied()
                } else {
                    None
                }
            }
        }
        let mut t = vec![0u64; ENTRIES];
        t[0] = 0x1000 | PTE_PRESENT | (1 << 60);
        assert!(matches!(walk(&Fake(t.clone()), 0x1000, 0), Err(WalkError::Malformed(4, _))));
        t[0] = 0x1000 | PTE_PRESENT | PTE_LEAF;
        assert!(matches!(walk(&Fake(t.clone()), 0x1000, 0), Err(WalkError::Malformed(4, _))));
        t[0] = 0x5000 | PTE_PRESENT;
        assert_eq!(walk(&Fake(t.clone()), 0x1000, 0), Err(WalkError::BadTable(3, 0x5000)));
        // A table that points at itself is cut off after 4 levels.
        t[0] = 0x1000 | PTE_PRESENT;
        assert!(matches!(walk(&Fake(t), 0x1000, 0), Err(WalkError::Malformed(1, _))));
        assert_eq!(walk(&Fake(vec![]), 0x1000, 1 << 48), Err(WalkError::OutOfRange(1 << 48)));
    }

    #[test]
    fn pasid_tables_set_look_up_and_clear() {
        let mut p = pool(64);
        let root = p.alloc_table().unwrap();
        let mut pages = Vec::new();
        let e = PasidEntry { flags: PASID_NESTED | PASID_DIRTY, s2_root: 0x5000, s1_root: 0x20_0000 };
        p.pasid_set(root, 0xf_ffff, e, &mut pages).unwrap();
        p.pasid_set(root, 0, PasidEntry { flags: 0, s2_root: 0x6000, s1_root: 0 }, &mut pages).unwrap();
        assert_eq!(pages.len(), 4);
        let got = pasid_lookup(&p, root, 0xf_ffff).unwrap();
        assert_eq!(got, PasidEntry { flags: PASID_NESTED | PASID_DIRTY | PASID_VALID, ..e });
        assert_eq!(pasid_lookup(&p, root, 0).unwrap().s2_root, 0x6000);
        assert_eq!(pasid_lookup(&p, root, 1), None);
        assert_eq!(pasid_lookup(&p, root, 1 << 20), None);
        p.pasid_clear(root, 0xf_ffff);
        assert_eq!(pasid_lookup(&p, root, 0xf_ffff), None);
        let all = p.pasid_table_pages(root);
        assert_eq!(all.len(), 5);
        assert_eq!(pasid_lookup(&p, root, 0), None);
    }

    #[test]
    fn dirty_bits_report_and_clear() {
        let mut p = pool(64);
        let root = p.alloc_table().unwrap();
        let d = DirtyPool::new(p.pages()).unwrap();
        p.map_range(root, 0x10_0000, 0x4000_0000, 0x4000, Perm::RW, Some(&d)).unwrap();
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
        p.map_range(root, 0x10_0000, 0x4000_0000, 0x4000, Perm::RW, Some(&d)).unwrap();
        assert_eq!(p.read_dirty(&d, root, 0x10_0000, 0x4000, 4096, true), vec![0]);
    }
}
