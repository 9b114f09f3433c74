//! The flat system address space that memory objects are placed in.
//!
//! Every memory object gets a base here, aligned so that large leaves can map
//! it (1 GiB for objects of 1 GiB or more, 2 MiB for objects of 2 MiB or
//! more, 4 KiB otherwise). Leaves of the page tables hold system addresses;
//! a device server turns one back into `(memory object, offset)`.

use std::collections::BTreeMap;

use crate::pagetable::{MAX_ADDRESS, PAGE_SIZE};

/// Lowest system address handed out (0 stays "no address").
pub const BASE: u64 = 1 << 30;

/// First-fit allocator of aligned ranges of system addresses.
#[derive(Debug)]
pub struct SysAddrSpace {
    /// Free ranges: start -> length.
    free: BTreeMap<u64, u64>,
}

impl Default for SysAddrSpace {
    fn default() -> Self {
        let mut free = BTreeMap::new();
        free.insert(BASE, MAX_ADDRESS + 1 - BASE);
        SysAddrSpace { free }
    }
}

/// The alignment an object of `size` bytes gets.
pub fn alignment_for(size: u64) -> u64 {
    if size >= 1 << 30 {
        1 << 30
    } else if size >= 2 << 20 {
        2 << 20
    } else {
        PAGE_SIZE
    }
}

impl SysAddrSpace {
    /// Reserves a range for an object of `size` bytes; returns its base and
    /// the reserved length, or `None` when the space is exhausted.
    pub fn alloc(&mut self, size: u64) -> Option<(u64, u64)> {
        let align = alignment_for(size);
        let len = size.checked_next_multiple_of(align)?;
        let (start, flen, base) = self.free.iter().find_map(|(&s, &l)| {
            let base = s.checked_next_multiple_of(align)?;
            let pad = base - s;
            (l >= pad && l - pad >= len).then_some((s, l, base))
        })?;
        self.free.remove(&start);
        if base > start {
            self.free.insert(start, base - start);
        }
        let end = base + len;
        if start + flen > end {
            self.free.insert(end, start + flen - end);
        }
        Some((base, len))
    }

    /// Returns a range to the space, merging with free neighbours.
    pub fn free(&mut self, base: u64, len: u64) {
        let mut start = base;
        let mut end = base + len;
        if let Some(next_len) = self.free.remove(&end) {
            end += next_len;
        }
        if let Some((&ps, &pl)) = self.free.range(..base).next_back() {
            if ps + pl == base {
                self.free.remove(&ps);
                start = ps;
            }
        }
        self.free.insert(start, end - start);
    }

    /// Number of free fragments (for leak checks).
    pub fn fragments(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_allocation_and_merge_back() {
        let mut s = SysAddrSpace::default();
        let (a, al) = s.alloc(4096).unwrap();
        let (b, bl) = s.alloc(3 << 20).unwrap();
        let (c, cl) = s.alloc(1 << 30).unwrap();
        assert_eq!(a, BASE);
        assert_eq!((b % (2 << 20), bl), (0, 4 << 20));
        assert_eq!((c % (1 << 30), cl), (0, 1 << 30));
        s.free(b, bl);
        s.free(a, al);
        s.free(c, cl);
        assert_eq!(s.fragments(), 1);
        assert!(s.alloc(u64::MAX).is_none());
    }
}
