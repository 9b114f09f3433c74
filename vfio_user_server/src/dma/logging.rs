//! DMA logging: dirty tracking of the compat IOAS and its reports,
//! with the ranges whose dirty state was lost with a core.

use std::sync::atomic::Ordering;

use iommu_core::sync;

use super::{Dma, Error};

/// The core's dirty tracking granule.
pub const DIRTY_GRANULE: u64 = 4096;
/// Bits of one bitmap asked of the core at a time (256 KiB).
const CORE_BITMAP_BITS: u64 = 1 << 21;
/// Most blocks one DMA logging report reads from the core (8 MiB of
/// bitmaps).
pub const MAX_REPORT_BLOCKS: u64 = 1 << 26;

impl Dma {
    /// Dirty tracking of the compat IOAS. Turning it off without a core
    /// succeeds (nothing tracks).
    pub fn set_dirty_tracking(&self, on: bool) -> Result<(), Error> {
        // The core's invalidation waits for DMA in flight.
        let _fence = self.fence_if_client_memory();
        let Some(c) = self.compat() else {
            if on {
                return Err(self.core_gone());
            }
            self.logging.store(false, Ordering::Release);
            sync::lock(&self.unreported).clear();
            return Ok(());
        };
        self.call(&c, |s| s.set_dirty_tracking(c.ioas, on))?;
        self.logging.store(on, Ordering::Release);
        sync::lock(&self.unreported).clear();
        Ok(())
    }

    /// A DMA logging report of the compat IOAS: one bit per `page_size`
    /// (any power of two) of `[iova, iova + length)`, bit `k` standing for
    /// `[iova + k * page_size, iova + (k + 1) * page_size)`. The core tracks
    /// writes in blocks of [`DIRTY_GRANULE`] (or larger leaves); a bit is
    /// set when any block overlapping its page was written since it was
    /// last reported, so a dirty block sets every smaller page it covers
    /// and a larger page is dirty if any block in it is. Blocks wholly
    /// inside the range are cleared by the report; blocks that stick out of
    /// it (an unaligned `iova` or end) are reported but stay dirty, since
    /// their part outside the range has not been reported yet.
    pub fn dirty_report(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>, Error> {
        let bad = |why: &'static str| Error::BadReport { iova, length, why };
        if length == 0 || !page_size.is_power_of_two() {
            return Err(bad("the length is 0 or the page size is not a power of two"));
        }
        let end = iova.checked_add(length).ok_or_else(|| bad("the range overflows"))?;
        let bits = length.div_ceil(page_size);
        // Blocks asked of the core: as large as the page size allows while
        // starting at a block boundary, never below the granule.
        let iova_align = if iova == 0 { 1 << 63 } else { 1u64 << iova.trailing_zeros() };
        let q = page_size.min(iova_align).max(DIRTY_GRANULE);
        let qs = iova & !(q - 1);
        let qe = end.checked_next_multiple_of(q).ok_or_else(|| bad("the range overflows"))?;
        let blocks = (qe - qs) / q;
        if blocks > MAX_REPORT_BLOCKS {
            return Err(Error::TooBig(format!(
                "DMA logging report of {iova:#x}+{length:#x} at page size {page_size:#x} would read {blocks} blocks \
                 of {q:#x} bytes, more than {MAX_REPORT_BLOCKS}; align iova to the page size"
            )));
        }
        // Spans read without clearing (partial blocks at the ends), then
        // the whole blocks in between, read and cleared.
        let head = qs < iova;
        let tail = qe > end && !(head && qe - q == qs);
        let inner = (if head { qs + q } else { qs }, if qe > end { qe - q } else { qe });
        let mut spans = Vec::new();
        if head {
            spans.push((qs, qs + q, true));
        }
        if inner.0 < inner.1 {
            spans.push((inner.0, inner.1, false));
        }
        if tail {
            spans.push((qe - q, qe, true));
        }
        let Some(c) = self.compat() else { return Err(self.core_gone()) };
        let mut out = vec![0u64; usize::try_from(bits.div_ceil(64)).map_err(|_| bad("the bitmap is too large"))?];
        // Pieces of the core's bitmap, on boundaries of the piece size so
        // that a large leaf is never split between two reads.
        let piece = q.checked_mul(CORE_BITMAP_BITS);
        for (start, stop, no_clear) in spans {
            let mut cur = start;
            while cur < stop {
                let next = piece.and_then(|p| (cur / p + 1).checked_mul(p)).map_or(stop, |b| b.min(stop));
                let words = self.call(&c, |s| s.dirty_bitmap(c.ioas, cur, next - cur, q, no_clear))?;
                for (w, &word) in words.iter().enumerate() {
                    let mut v = word;
                    while v != 0 {
                        let j = w as u64 * 64 + u64::from(v.trailing_zeros());
                        v &= v - 1;
                        let lo = (cur + j * q).max(iova);
                        let hi = (cur + j * q).saturating_add(q).min(end);
                        if lo < hi {
                            set_bits(&mut out, (lo - iova) / page_size, (hi - 1 - iova) / page_size);
                        }
                    }
                }
                cur = next;
            }
        }
        self.merge_unreported(&mut out, iova, end - 1, page_size);
        Ok(out)
    }

    /// Sets the bits of pages of the report `[iova, last]` that overlap
    /// ranges whose dirty state was lost with a core, and forgets those
    /// parts of the ranges (they have now been reported dirty).
    fn merge_unreported(&self, out: &mut [u64], iova: u64, last: u64, page_size: u64) {
        let mut u = sync::lock(&self.unreported);
        if u.is_empty() {
            return;
        }
        let mut rest = Vec::with_capacity(u.len());
        for &(s, l) in u.iter() {
            if l < iova || s > last {
                rest.push((s, l));
                continue;
            }
            let (lo, hi) = (s.max(iova), l.min(last));
            set_bits(out, (lo - iova) / page_size, (hi - iova) / page_size);
            if s < iova {
                rest.push((s, iova - 1));
            }
            if l > last {
                rest.push((last + 1, l));
            }
        }
        *u = rest;
    }
}

/// Sets bits `first..=last` of `bitmap` (which holds them).
fn set_bits(bitmap: &mut [u64], first: u64, last: u64) {
    let mut k = first;
    while k <= last {
        let (w, b) = ((k / 64) as usize, k % 64);
        let n = (last - k + 1).min(64 - b);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << b };
        if let Some(word) = bitmap.get_mut(w) {
            *word |= mask;
        }
        k += n;
    }
}

#[cfg(test)]
mod tests {
    use super::set_bits;

    #[test]
    fn bit_ranges_cross_words_and_stop_at_their_last_bit() {
        let mut b = vec![0u64; 3];
        set_bits(&mut b, 60, 130);
        assert_eq!(b, vec![0xf << 60, u64::MAX, 0b111]);
        let mut b = vec![0u64; 2];
        set_bits(&mut b, 64, 127);
        set_bits(&mut b, 3, 3);
        assert_eq!(b, vec![1 << 3, u64::MAX]);
        // Past the bitmap: nothing is written out of bounds.
        let mut b = vec![0u64; 1];
        set_bits(&mut b, 62, 200);
        assert_eq!(b, vec![0b11 << 62]);
    }
}
