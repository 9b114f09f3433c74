//! PASID tables: the entry format, the lookup device servers link, and the
//! core's writes.

use std::sync::atomic::Ordering;

use super::{Error, TableMemory, TablePool, ENTRIES, PTE_ADDR_MASK, PTE_PRESENT, PTE_RESERVED_MASK};

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
    /// allocating directory pages as needed (pushed on `pages`; on failure
    /// the pages this call linked are unlinked and pushed there too, for
    /// the caller to free once no walker can hold them). Word 1 is
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
                        // Unlink what this call linked; a walker may have
                        // reached the (empty) pages meanwhile, so they go to
                        // `pages` for the caller to free after the
                        // invalidation.
                        for (parent, i, t) in linked.into_iter().rev() {
                            self.store(parent, i, 0);
                            pages.push(t);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagetable::pool::tests::pool;

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
    fn a_failed_pasid_set_unlinks_and_hands_back_its_pages() {
        // The root and one more table: the second directory level fails.
        let mut p = pool(3);
        let root = p.alloc_table().unwrap();
        let mut pages = Vec::new();
        let e = PasidEntry { flags: 0, s2_root: 0x5000, s1_root: 0 };
        assert!(p.pasid_set(root, 0x2_0000, e, &mut pages).is_err());
        assert_eq!(pages.len(), 1, "the page it linked is handed back, not freed behind a walker");
        assert_eq!(p.tables_in_use(), 2);
        assert_eq!(p.entry(root, 1).map(|w| w.load(Ordering::Relaxed)), Some(0), "and unlinked");
        assert_eq!(pasid_lookup(&p, root, 0x2_0000), None);
        p.free_table(pages[0]);
        assert_eq!(p.tables_in_use(), 1);
    }
}
