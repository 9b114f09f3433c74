//! Physical Region Page walking: the data pointer of a command (PRP entry
//! 1, PRP entry 2, and PRP lists chained page to page) turned into the
//! guest address ranges of its transfer. Every field is the guest's:
//! offsets, list pointers and lengths are checked, and a list that cannot
//! be read ends the command with a status instead of a guess.

use crate::dma::DmaSpace;

use super::abi::{sc, Status};

/// Why a command stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// It ends with this status.
    Status(Status),
    /// Its DMA was stopped (bus mastering off, or the client's DMA fenced
    /// by a reset or an unmap in progress): run it again later.
    Stop,
}

impl From<Status> for Fail {
    fn from(s: Status) -> Fail {
        Fail::Status(s)
    }
}

/// The status (or stop) for a failed DMA access.
pub fn dma_fail(e: &crate::dma::Error) -> Fail {
    if e.stops_step() {
        Fail::Stop
    } else {
        Fail::Status(sc::DATA_TRANSFER)
    }
}

/// Entries of a list read at a time.
const CHUNK: usize = 512;

/// Appends to `out` the guest ranges `(iova, len)` of a transfer of `len`
/// bytes described by `prp1` and `prp2` with memory pages of `page` bytes
/// (a power of two, at least 4 KiB), merging ranges that touch. List pages
/// are read through `space`. `out` is cleared first; it keeps its capacity
/// from command to command.
pub fn walk<S: DmaSpace>(
    space: &S,
    prp1: u64,
    prp2: u64,
    len: usize,
    page: u64,
    out: &mut Vec<(u64, usize)>,
) -> Result<(), Fail> {
    out.clear();
    if len == 0 {
        return Ok(());
    }
    let mask = page - 1;
    // The first entry may start anywhere dword-aligned in its page.
    if prp1 & 3 != 0 {
        return Err(sc::PRP_OFFSET_INVALID.into());
    }
    let first = ((page - (prp1 & mask)) as usize).min(len);
    push(out, prp1, first)?;
    let mut left = len - first;
    if left == 0 {
        return Ok(());
    }
    if left as u64 <= page {
        // PRP entry 2 is the second (and last) page.
        if prp2 & mask != 0 {
            return Err(sc::PRP_OFFSET_INVALID.into());
        }
        return push(out, prp2, left);
    }
    // PRP entry 2 points to a list, which may start inside its page.
    let mut list = prp2;
    if list & 7 != 0 {
        return Err(sc::PRP_OFFSET_INVALID.into());
    }
    let mut raw = [0u8; CHUNK * 8];
    // Every list page but a chain of pointers alone moves the transfer
    // on; bound the pages visited so such a chain cannot spin.
    let mut pages = len / page as usize + 2;
    while left > 0 {
        pages = pages.checked_sub(1).ok_or(Fail::Status(sc::PRP_OFFSET_INVALID))?;
        let in_page = ((page - (list & mask)) / 8) as usize;
        let needed = left.div_ceil(page as usize);
        // If more entries are needed than the rest of this list page
        // holds, its last entry points to the next list page.
        let chained = needed > in_page;
        let data_entries = if chained { in_page - 1 } else { needed };
        let mut done = 0;
        while done < data_entries {
            let n = (data_entries - done).min(CHUNK);
            let at = list.wrapping_add(done as u64 * 8);
            space.read(at, &mut raw[..n * 8]).map_err(|e| dma_fail(&e))?;
            for e in raw[..n * 8].chunks_exact(8) {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                let entry = u64::from_le_bytes(w);
                if entry & mask != 0 {
                    return Err(sc::PRP_OFFSET_INVALID.into());
                }
                let l = left.min(page as usize);
                push(out, entry, l)?;
                left -= l;
            }
            done += n;
        }
        if chained {
            let mut w = [0u8; 8];
            let at = list.wrapping_add(data_entries as u64 * 8);
            space.read(at, &mut w).map_err(|e| dma_fail(&e))?;
            let next = u64::from_le_bytes(w);
            if next & 7 != 0 || next == list {
                return Err(sc::PRP_OFFSET_INVALID.into());
            }
            list = next;
        }
    }
    Ok(())
}

/// Appends `(iova, len)`, merged with the last range if it continues it.
/// A range may end at the top of the address space, never wrap past it.
fn push(out: &mut Vec<(u64, usize)>, iova: u64, len: usize) -> Result<(), Fail> {
    if iova.checked_add((len as u64).saturating_sub(1)).is_none() {
        return Err(sc::DATA_TRANSFER.into());
    }
    if let Some(last) = out.last_mut() {
        if last.0.checked_add(last.1 as u64) == Some(iova) {
            last.1 += len;
            return Ok(());
        }
    }
    out.push((iova, len));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::Error;
    use iommu_core::types::FaultReason;
    use std::cell::RefCell;

    /// Memory of 64 KiB at IOVA 0x10000.
    struct Mem(RefCell<Vec<u8>>);

    impl DmaSpace for Mem {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Error> {
            let m = self.0.borrow();
            let off = iova.checked_sub(0x10000).map(|o| o as usize);
            match off.and_then(|o| m.get(o..o + buf.len())) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    Ok(())
                }
                None => Err(Error::Fault { iova, reason: FaultReason::NotPresent }),
            }
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), Error> {
            Ok(())
        }
        fn check_write(&self, _: u64, _: usize) -> Result<(), Error> {
            Ok(())
        }
        fn report_fault(&self, _: u64, _: bool, _: FaultReason) {}
    }

    fn mem_with(entries: &[(u64, u64)]) -> Mem {
        let m = Mem(RefCell::new(vec![0; 0x10000]));
        for &(at, v) in entries {
            let o = (at - 0x10000) as usize;
            m.0.borrow_mut()[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        m
    }

    #[test]
    fn one_and_two_pages() {
        let m = mem_with(&[]);
        let mut out = Vec::new();
        walk(&m, 0x5000_0200, 0, 0x200, 4096, &mut out).unwrap();
        assert_eq!(out, vec![(0x5000_0200, 0x200)]);
        walk(&m, 0x5000_0800, 0x9000_0000, 4096, 4096, &mut out).unwrap();
        assert_eq!(out, vec![(0x5000_0800, 0x800), (0x9000_0000, 0x800)]);
        assert_eq!(walk(&m, 0x5000_0800, 0x9000_0010, 4096, 4096, &mut out), Err(sc::PRP_OFFSET_INVALID.into()));
        assert_eq!(walk(&m, 0x5000_0802, 0, 16, 4096, &mut out), Err(sc::PRP_OFFSET_INVALID.into()));
    }

    #[test]
    fn lists_chain_and_merge() {
        // A list starting 16 bytes before its page end: one data entry,
        // then a pointer to the next list page.
        let m = mem_with(&[(0x10ff0, 0x7000_0000), (0x10ff8, 0x12000), (0x12000, 0x7000_1000), (0x12008, 0x8000_0000)]);
        let mut out = Vec::new();
        walk(&m, 0x6000_0000, 0x10ff0, 4 * 4096, 4096, &mut out).unwrap();
        assert_eq!(out, vec![(0x6000_0000, 4096), (0x7000_0000, 8192), (0x8000_0000, 4096)]);
        // A list that cannot be read.
        assert_eq!(walk(&m, 0x6000_0000, 0x90_0000, 3 * 4096, 4096, &mut out), Err(sc::DATA_TRANSFER.into()));
        // An unaligned list pointer and a data entry with an offset.
        assert_eq!(walk(&m, 0x6000_0000, 0x10ff4, 3 * 4096, 4096, &mut out), Err(sc::PRP_OFFSET_INVALID.into()));
        let m = mem_with(&[(0x11000, 0x7000_0010), (0x11008, 0x7000_1000)]);
        assert_eq!(walk(&m, 0x6000_0000, 0x11000, 3 * 4096, 4096, &mut out), Err(sc::PRP_OFFSET_INVALID.into()));
        // A list that points to itself.
        let m = mem_with(&[(0x11ff8, 0x11ff8)]);
        assert_eq!(walk(&m, 0x6000_0000, 0x11ff8, 3 * 4096, 4096, &mut out), Err(sc::PRP_OFFSET_INVALID.into()));
    }

    #[test]
    fn hostile_pointers_end_in_a_status() {
        let m = mem_with(&[]);
        let mut out = vec![(1, 1)];
        // Nothing to move: nothing read, nothing listed.
        walk(&m, 0xdead_beef, 0xdead_beef, 0, 4096, &mut out).unwrap();
        assert!(out.is_empty());
        // Ranges may end at the top of the address space; the next one
        // at 0 is not merged with it (no range wraps).
        assert_eq!(walk(&m, u64::MAX - 0xfff, 0, 0x1000, 4096, &mut out), Ok(()));
        assert_eq!(walk(&m, u64::MAX - 0x7, 0, 0x10, 4096, &mut out), Ok(()));
        assert_eq!(out, vec![(u64::MAX - 7, 8), (0, 8)]);
        assert_eq!(walk(&m, 0x1000, !0xfff, 0x2000, 4096, &mut out), Ok(()));
        assert_eq!(out, vec![(0x1000, 0x1000), (!0xfff, 0x1000)]);
        assert_eq!(push(&mut out, u64::MAX, 2), Err(sc::DATA_TRANSFER.into()));
        // Two list pages pointing at each other: the walk ends once the
        // transfer is described, whatever the cycle.
        let mut entries = Vec::new();
        for k in 0..511u64 {
            entries.push((0x11000 + k * 8, 0x4000_0000 + k * 0x1000));
            entries.push((0x12000 + k * 8, 0x5000_0000 + k * 0x1000));
        }
        entries.push((0x11000 + 511 * 8, 0x12000));
        entries.push((0x12000 + 511 * 8, 0x11000));
        let m = mem_with(&entries);
        let len = 2048 * 4096;
        walk(&m, 0x3000_0000, 0x11000, len, 4096, &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.1).sum::<usize>(), len);
        // A chain of pointers alone (each list page's only entry is the
        // pointer to the next, two pages apart) ends with an error, not a
        // spin.
        let m = mem_with(&[(0x11ff8, 0x12ff8), (0x12ff8, 0x11ff8)]);
        assert_eq!(walk(&m, 0x3000_0000, 0x11ff8, 3 * 4096, 4096, &mut out), Err(sc::PRP_OFFSET_INVALID.into()));
    }

    #[test]
    fn larger_memory_pages_move_the_offsets_with_them() {
        let page = 0x1_0000;
        let m = mem_with(&[(0x10000, 0x7001_0000), (0x10008, 0x7002_0000)]);
        let mut out = Vec::new();
        walk(&m, 0x6000_f000, 0, 0x1000, page, &mut out).unwrap();
        assert_eq!(out, vec![(0x6000_f000, 0x1000)]);
        walk(&m, 0x6000_f000, 0x7000_0000, 0x2000, page, &mut out).unwrap();
        assert_eq!(out, vec![(0x6000_f000, 0x1000), (0x7000_0000, 0x1000)]);
        // 4 KiB-aligned is not 64 KiB-aligned.
        assert_eq!(walk(&m, 0x6000_f000, 0x7000_1000, 0x2000, page, &mut out), Err(sc::PRP_OFFSET_INVALID.into()));
        walk(&m, 0x6000_0000, 0x10000, 3 * page as usize, page, &mut out).unwrap();
        assert_eq!(out, vec![(0x6000_0000, page as usize), (0x7001_0000, 2 * page as usize)]);
    }

    /// A xorshift generator: the same hostile inputs on every run.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn random_lists_never_panic_and_always_describe_the_whole_transfer() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut out = Vec::new();
        for _ in 0..20_000 {
            // Memory full of entries that are mostly page-aligned, some
            // pointing back into the list memory itself.
            let mut entries = Vec::new();
            for _ in 0..64 {
                let r = next(&mut x);
                let v = match r % 5 {
                    0 => 0x10000 + (r >> 8) % 0x10000,
                    1 => r,
                    _ => (r >> 12) << 12,
                };
                entries.push((0x10000 + ((next(&mut x) % 0x2000) & !7), v));
            }
            let m = mem_with(&entries);
            let page = 4096u64 << (next(&mut x) % 2 * 4);
            let r = next(&mut x);
            let prp1 = if r.is_multiple_of(3) { r } else { r & !3 };
            let r = next(&mut x);
            let prp2 = if r.is_multiple_of(2) { 0x10000 + (r >> 4) % 0x10000 } else { r };
            let len = (next(&mut x) % (1 << 20)) as usize;
            if let Ok(()) = walk(&m, prp1, prp2, len, page, &mut out) {
                assert_eq!(out.iter().map(|r| r.1).sum::<usize>(), len);
                if len > 0 {
                    assert_eq!(out[0].0, prp1);
                }
                for &(iova, n) in &out {
                    assert!(n > 0 && iova.checked_add(n as u64 - 1).is_some());
                }
            }
        }
    }
}
