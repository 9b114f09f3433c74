//! The reference walker device servers link: one-stage walks over any
//! [`TableMemory`], and nested walks through the user's stage-1 tables.

use super::{level_shift, Perm, ENTRIES, LEVELS, MAX_IOVA, PTE_ADDR_MASK, PTE_LEAF, PTE_PRESENT, PTE_RESERVED_MASK};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
