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

use crate::shm::Words;
use std::fs::File;

mod dirty;
mod pasid;
mod pool;
mod walk;

pub use dirty::DirtyPool;
pub use pasid::{pasid_lookup, PasidEntry, PASIDS_PER_PAGE, PASID_DIRTY, PASID_IOPF, PASID_NESTED, PASID_VALID};
pub use pool::{TableBudget, TablePool};
pub use walk::{walk, walk_nested, Leaf, NestedError, NestedLeaf, Stage1, TableMemory, WalkError};

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

/// The part of a range that one entry of a table translates.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Index of the entry in its table.
    index: usize,
    /// First IOVA the entry translates.
    base: u64,
    /// Bytes the entry translates (a leaf there maps this much).
    size: u64,
    /// First IOVA of the range in the entry.
    start: u64,
    /// End (exclusive) of the range in the entry.
    end: u64,
}

impl Slot {
    /// True if the range covers everything the entry translates.
    fn whole(&self) -> bool {
        self.start == self.base && self.end - self.start == self.size
    }
}

/// The entries of a table at `level` that `[start, end)` reaches, in
/// order; the range lies within what the table translates. The core's
/// walks over a range (map, unmap, dirty bits) go table by table with it.
fn slots(level: u32, start: u64, end: u64) -> impl Iterator<Item = Slot> {
    let shift = level_shift(level);
    let size = 1u64 << shift;
    let mut cur = start;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let base = cur & !(size - 1);
        let index = ((cur >> shift) & (ENTRIES as u64 - 1)) as usize;
        let slot = Slot { index, base, size, start: cur, end: end.min(base + size) };
        cur = slot.end;
        Some(slot)
    })
}

/// Maps `len` bytes of `file` as atomic words.
fn map_words(file: &File, len: u64) -> Result<Words, Error> {
    Words::map(file, len).map_err(|e| Error::Create(e.to_string()))
}
