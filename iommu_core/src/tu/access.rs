//! An access: each leaf translated (with faults, page requests and
//! memory fetches), then copied run by run; writes are checked whole
//! first, under the same DMA guard.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::epoch::{InDma, ThreadUnit};
use super::iotlb::{Iotlb, Looked, Miss};
use super::memory::{Backing, MemObject, BOUNCE};
use super::{DeviceState, Error, Result, TranslationUnit};
use crate::pagetable::PAGE_SIZE;
use crate::sync;
use crate::types::*;

/// The copy of one run of an access: `(object, offset in it, offset in
/// the access, bytes)`.
pub(super) type CopyOp<'a> = &'a mut dyn FnMut(&MemObject, u64, usize, usize) -> Result<()>;

/// The same, borrowed for one pass.
type RunOp<'f> = dyn FnMut(&MemObject, u64, usize, usize) -> Result<()> + 'f;

/// What one access asks: `len` bytes at `iova` of `(dev, pasid)` with
/// the rights `want`.
#[derive(Clone, Copy)]
pub(super) struct Access {
    dev: u32,
    pasid: u32,
    iova: u64,
    len: usize,
    want: Perm,
}

/// How one pass over an access ended: done, stopped at a memory object
/// the unit has not mapped yet, at a fault `(IOVA, reason, page requests
/// allowed)`, or at a device not bound through the unit.
pub(super) enum Outcome {
    Done,
    NeedMemory(u64),
    Fault(u64, FaultReason, bool),
    NoDevice,
}

impl Outcome {
    fn of_miss(m: Miss, at: u64) -> Outcome {
        match m {
            Miss::Fault(r, iopf) => Outcome::Fault(at, r, iopf),
            Miss::NeedMemory(sys) => Outcome::NeedMemory(sys),
            Miss::NoDevice => Outcome::NoDevice,
        }
    }
}

/// One side of a [`TranslationUnit::copy`]: `(device, pPASID, IOVA)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    /// Device.
    pub dev: u32,
    /// pPASID (0: the RID).
    pub pasid: u32,
    /// IOVA.
    pub iova: u64,
}

/// Which side of a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source (read).
    Source,
    /// The destination (written).
    Destination,
}

/// A copy that failed: on which side, and why.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} of the copy: {error}")]
pub struct CopyError {
    /// The side that failed.
    pub side: Side,
    /// Why.
    pub error: Error,
}

/// Retries an access allows itself: page requests answered SUCCESS, and
/// memory objects fetched.
#[derive(Default)]
struct Retries {
    page_requests: u32,
    fetches: u32,
}

impl TranslationUnit {
    /// One pass over an access: translates every leaf of it and, given
    /// `op`, copies each run. Without `op` it only checks that every byte
    /// translates with the rights asked (the checking pass of a write, or
    /// [`TranslationUnit::check`]). With `looked`, the translations are
    /// recorded (a checking pass) or replayed (the copying pass after it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn try_access(
        &self,
        t: &ThreadUnit,
        d: &InDma<'_>,
        a: &Access,
        st: &mut Option<DeviceState>,
        mut op: Option<&mut RunOp<'_>>,
        mut looked: Option<&mut Looked>,
    ) -> Result<Outcome> {
        let Access { dev, pasid, iova, len, want } = *a;
        let mut done = 0usize;
        while done < len {
            let Some(cur) = iova.checked_add(done as u64) else {
                return Ok(Outcome::Fault(iova, FaultReason::NotPresent, false));
            };
            let page = cur & !(PAGE_SIZE - 1);
            let e = match self.entry(t, dev, st, pasid, page, &mut looked) {
                Ok(e) => e,
                Err(m) => return Ok(Outcome::of_miss(m, cur)),
            };
            if !e.perm.allows(want) {
                return Ok(Outcome::Fault(cur, FaultReason::Permission, false));
            }
            // One translation covers the rest of its leaf.
            let mut n = usize::try_from(e.iova_base + e.size - cur).unwrap_or(usize::MAX).min(len - done);
            let sys = e.sys_base + (cur - e.iova_base);
            let m = e.mem.get(d);
            if sys < m.base || sys + n as u64 > m.base + m.size {
                // A leaf that runs past its memory object.
                return Ok(Outcome::Fault(cur, FaultReason::Malformed, false));
            }
            let Some(op) = op.as_deref_mut() else {
                done += n;
                continue;
            };
            // In client memory, leaves that go on in the same object where
            // this one ends join it: one message for the run instead of one
            // per leaf. Whatever stops the run is met again as the next
            // leaf.
            let client = matches!(m.backing, Backing::Client { .. });
            let mut more_dirty = Vec::new();
            while client && done + n < len {
                let next = cur + n as u64;
                let Ok(f) = self.entry(t, dev, st, pasid, next & !(PAGE_SIZE - 1), &mut looked) else { break };
                let k = usize::try_from(f.iova_base + f.size - next).unwrap_or(usize::MAX).min(len - done - n);
                let at = f.sys_base + (next - f.iova_base);
                if !f.perm.allows(want) || at != sys + n as u64 || at + k as u64 > m.base + m.size {
                    break;
                }
                n += k;
                more_dirty.extend(f.dirty);
            }
            // A write to client memory may land in part (or later, after a
            // fence gave up waiting for it): its pages are dirty first.
            if want.write && client {
                for &(t, i) in e.dirty.iter().chain(&more_dirty) {
                    self.mark_dirty(t, i);
                }
            }
            match op(m, sys - m.base, done, n) {
                Err(Error::Unreachable) => return Ok(Outcome::Fault(cur, FaultReason::NotPresent, false)),
                r => r?,
            }
            if want.write && !client {
                for (t, i) in e.dirty.into_iter().chain(more_dirty) {
                    self.mark_dirty(t, i);
                }
            }
            done += n;
        }
        Ok(Outcome::Done)
    }

    pub(super) fn report(&self, rec: FaultRecord) {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let allowed = {
            let mut r = sync::lock(&self.rate);
            // A window starts with its first report.
            if r.1 == 0 || r.0.elapsed() >= Duration::from_secs(1) {
                *r = (Instant::now(), 0);
            }
            r.1 += 1;
            r.1 <= self.config.fault_reports_per_sec
        };
        if !allowed {
            self.stats.faults_suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(e) = self.channel.report_fault(rec) {
            tracing::warn!(error = %e, "cannot report a fault to the core");
        }
    }

    /// An access by `own` (a [`super::Handle`]'s state), or by this
    /// thread's state for the unit if `None`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn access(
        &self,
        own: Option<&ThreadUnit>,
        dev: u32,
        pasid: u32,
        iova: u64,
        len: usize,
        want: Perm,
        mut op: Option<CopyOp<'_>>,
    ) -> Result<()> {
        if let Some(t) = own {
            if self.fast_access(t, dev, pasid, iova, len, want, op.as_deref_mut()) {
                return Ok(());
            }
            return self.access_on(t, dev, pasid, iova, len, want, op);
        }
        let done = self.guard.with_thread(|t| self.fast_access(t, dev, pasid, iova, len, want, op.as_deref_mut()));
        if done {
            return Ok(());
        }
        self.guard.with_thread(|t| self.access_on(t, dev, pasid, iova, len, want, op))
    }

    /// The common case of an access: all of it within one cached leaf of a
    /// mapped object, allowed. False if it is not (or the copy failed: the
    /// general way meets that again and reports it).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn fast_access(
        &self,
        t: &ThreadUnit,
        dev: u32,
        pasid: u32,
        iova: u64,
        len: usize,
        want: Perm,
        op: Option<&mut RunOp<'_>>,
    ) -> bool {
        let d = t.enter(&self.guard);
        let Some(e) = t.get(dev, pasid, iova & !(PAGE_SIZE - 1)) else { return false };
        let off = iova - e.iova_base;
        let sys = e.sys_base + off;
        let m = e.mem.get(&d);
        let fits = off.checked_add(len as u64).is_some_and(|end| end <= e.size)
            && sys >= m.base
            && sys.checked_add(len as u64).is_some_and(|end| end <= m.base + m.size);
        if !fits || !e.perm.allows(want) || !matches!(m.backing, Backing::Mapped(_)) {
            return false;
        }
        let Some(op) = op else { return true };
        if op(m, sys - m.base, 0, len).is_err() {
            return false;
        }
        if want.write {
            if let Some((tb, i)) = e.dirty {
                self.mark_dirty(tb, i);
            }
        }
        true
    }

    /// An access the general way: translated leaf by leaf (walks, faults,
    /// page requests, memory fetches), a write checked whole first.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn access_on(
        &self,
        t: &ThreadUnit,
        dev: u32,
        pasid: u32,
        iova: u64,
        len: usize,
        want: Perm,
        mut op: Option<CopyOp<'_>>,
    ) -> Result<()> {
        let mut st = None;
        let mut retries = Retries::default();
        let a = Access { dev, pasid, iova, len, want };
        let two_pass = op.is_some() && want.write;
        loop {
            let outcome = {
                let d = t.enter(&self.guard);
                // A write within one cached leaf needs no record: its one
                // translation serves the check and the copy.
                if !two_pass || t.covers(dev, pasid, iova, len) {
                    self.try_access(t, &d, &a, &mut st, op.as_deref_mut(), None)?
                } else {
                    // Both passes of a write run in one DMA: no
                    // invalidation completes between the check and the copy.
                    let mut looked = Looked::new(t.lend());
                    let r = match self.try_access(t, &d, &a, &mut st, None, Some(&mut looked)) {
                        Ok(Outcome::Done) => {
                            looked.rewind();
                            self.try_access(t, &d, &a, &mut st, op.as_deref_mut(), Some(&mut looked))
                        }
                        o => o,
                    };
                    t.give_back(looked.into_inner());
                    r?
                }
            };
            if self.settle(&a, &mut st, outcome, &mut retries)? {
                return Ok(());
            }
        }
    }

    /// What follows a pass that ended with `outcome`: `Ok(true)` done,
    /// `Ok(false)` try again (a memory object was fetched, a page request
    /// answered SUCCESS), or the access's error (the fault reported).
    fn settle(&self, a: &Access, st: &mut Option<DeviceState>, outcome: Outcome, r: &mut Retries) -> Result<bool> {
        let Access { dev, pasid, want, .. } = *a;
        match outcome {
            Outcome::Done => Ok(true),
            Outcome::NoDevice => Err(Error::NoDevice(dev)),
            Outcome::NeedMemory(sys) if r.fetches < 64 => {
                r.fetches += 1;
                if self.map_memory(sys).is_err() {
                    self.fail(dev, pasid, sys, want, FaultReason::NotPresent)?;
                }
                Ok(false)
            }
            Outcome::NeedMemory(sys) => self.fail(dev, pasid, sys, want, FaultReason::NotPresent).map(|()| false),
            Outcome::Fault(at, reason, iopf) => {
                if st.is_none() {
                    *st = sync::read(&self.devices).get(&dev).copied();
                }
                let pri = st.is_some_and(|s| s.caps.pri);
                if iopf && pri && r.page_requests < 8 && reason != FaultReason::Malformed {
                    r.page_requests += 1;
                    self.stats.page_requests.fetch_add(1, Ordering::Relaxed);
                    let rec = FaultRecord {
                        dev_id: dev,
                        pasid,
                        iova: at & !(PAGE_SIZE - 1),
                        access: want,
                        reason,
                        group: r.page_requests,
                        last: true,
                        cookie: 0,
                    };
                    return match self.channel.page_request(rec, self.config.page_request_timeout) {
                        Ok(page_response::SUCCESS) => Ok(false),
                        Ok(_) | Err(_) => {
                            self.stats.faults.fetch_add(1, Ordering::Relaxed);
                            Err(Error::Fault { dev, pasid, iova: at, reason })
                        }
                    };
                }
                self.fail(dev, pasid, at, want, reason).map(|()| false)
            }
        }
    }

    pub(super) fn fail(&self, dev: u32, pasid: u32, iova: u64, access: Perm, reason: FaultReason) -> Result<()> {
        self.report(FaultRecord { dev_id: dev, pasid, iova, access, reason, group: 0, last: true, cookie: 0 });
        Err(Error::Fault { dev, pasid, iova, reason })
    }

    /// DMA read: fills `buf` from `iova` of `(dev, pasid)` (pasid 0 = RID).
    /// A read that faults part-way may have filled part of `buf`.
    pub fn read(&self, dev: u32, pasid: u32, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.read_by(None, dev, pasid, iova, buf)
    }

    #[inline(always)]
    pub(super) fn read_by(
        &self,
        own: Option<&ThreadUnit>,
        dev: u32,
        pasid: u32,
        iova: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let len = buf.len();
        self.access(
            own,
            dev,
            pasid,
            iova,
            len,
            Perm::R,
            Some(&mut |m, off, at, n| self.mem_read(m, off, &mut buf[at..at + n])),
        )
    }

    /// DMA write: copies `data` to `iova` of `(dev, pasid)`. The whole
    /// range is translated (faults, page requests and memory fetches happen
    /// then) before its first byte is written, and copied with exactly
    /// those translations, with no invalidation completing in between: a
    /// write that would fault writes nothing. Only the memory itself can
    /// stop a copy part-way (a file that shrank, a client that does not
    /// serve its memory).
    pub fn write(&self, dev: u32, pasid: u32, iova: u64, data: &[u8]) -> Result<()> {
        self.write_by(None, dev, pasid, iova, data)
    }

    #[inline(always)]
    pub(super) fn write_by(
        &self,
        own: Option<&ThreadUnit>,
        dev: u32,
        pasid: u32,
        iova: u64,
        data: &[u8],
    ) -> Result<()> {
        self.access(
            own,
            dev,
            pasid,
            iova,
            data.len(),
            Perm::W,
            Some(&mut |m, off, at, n| self.mem_write(m, off, &data[at..at + n])),
        )
    }

    /// DMA copy: `len` bytes from `src` to `dst`, straight from one
    /// memory object to the other wherever both are mapped (through a
    /// buffer only where one side is client memory). The two sides may be
    /// different devices or PASIDs of this unit. Every byte of both ranges
    /// is translated first (the source for reading, the destination for
    /// writing; faults, page requests and memory fetches happen then), and
    /// the copy uses exactly those translations with no invalidation
    /// completing in between: a copy that would fault on either side
    /// writes nothing. Only the memory itself can stop it part-way (a file
    /// that shrank, reported on the source side, or a client that does
    /// not serve its memory). Overlapping ranges of one address space copy
    /// as `memmove` does.
    pub fn copy(&self, src: At, dst: At, len: usize) -> std::result::Result<(), CopyError> {
        self.copy_by(None, src, dst, len)
    }

    #[inline(always)]
    pub(super) fn copy_by(
        &self,
        own: Option<&ThreadUnit>,
        src: At,
        dst: At,
        len: usize,
    ) -> std::result::Result<(), CopyError> {
        if let Some(t) = own {
            if self.fast_copy(t, src, dst, len) {
                return Ok(());
            }
            return self.copy_on(t, src, dst, len);
        }
        if self.guard.with_thread(|t| self.fast_copy(t, src, dst, len)) {
            return Ok(());
        }
        self.guard.with_thread(|t| self.copy_on(t, src, dst, len))
    }

    /// The common case of a copy: each side within one cached leaf of a
    /// mapped object, allowed. False if not (or the copy failed: the
    /// general way meets that again and reports it).
    #[inline(always)]
    fn fast_copy(&self, t: &ThreadUnit, src: At, dst: At, len: usize) -> bool {
        let d = t.enter(&self.guard);
        let leaf = |x: At, want: Perm| {
            let e = t.get(x.dev, x.pasid, x.iova & !(PAGE_SIZE - 1))?;
            let off = x.iova - e.iova_base;
            let sys = e.sys_base + off;
            let m = e.mem.get(&d);
            let fits = off.checked_add(len as u64).is_some_and(|end| end <= e.size)
                && sys >= m.base
                && sys.checked_add(len as u64).is_some_and(|end| end <= m.base + m.size);
            match &m.backing {
                Backing::Mapped(b) if fits && e.perm.allows(want) => Some((b, sys - m.base, e.dirty)),
                _ => None,
            }
        };
        let (Some((sb, so, _)), Some((db, doff, dirty))) = (leaf(src, Perm::R), leaf(dst, Perm::W)) else {
            return false;
        };
        if db.copy_from(doff, sb, so, len).is_err() {
            return false;
        }
        if let Some((tb, i)) = dirty {
            self.mark_dirty(tb, i);
        }
        true
    }

    /// A copy the general way (see [`TranslationUnit::copy`]).
    #[inline(never)]
    fn copy_on(&self, t: &ThreadUnit, src: At, dst: At, len: usize) -> std::result::Result<(), CopyError> {
        let sa = Access { dev: src.dev, pasid: src.pasid, iova: src.iova, len, want: Perm::R };
        let da = Access { dev: dst.dev, pasid: dst.pasid, iova: dst.iova, len, want: Perm::W };
        let backward =
            src.dev == dst.dev && src.pasid == dst.pasid && dst.iova > src.iova && dst.iova - src.iova < len as u64;
        let (mut sst, mut dst_st) = (None, None);
        let (mut sr, mut dr) = (Retries::default(), Retries::default());
        let side = |side: Side| move |error: Error| CopyError { side, error };
        loop {
            let (which, outcome) = {
                let d = t.enter(&self.guard);
                if t.covers(src.dev, src.pasid, src.iova, len) && t.covers(dst.dev, dst.pasid, dst.iova, len) {
                    // Each side within one cached leaf: its one translation
                    // serves the check and the copy.
                    self.copy_runs(t, &d, (&sa, &mut sst, None), (&da, &mut dst_st, None), backward)?
                } else {
                    let mut ls = Looked::new(t.lend());
                    let mut ld = Looked::new(t.lend());
                    let r = (|| {
                        let o =
                            self.try_access(t, &d, &sa, &mut sst, None, Some(&mut ls)).map_err(side(Side::Source))?;
                        if !matches!(o, Outcome::Done) {
                            return Ok((Side::Source, o));
                        }
                        let o = self
                            .try_access(t, &d, &da, &mut dst_st, None, Some(&mut ld))
                            .map_err(side(Side::Destination))?;
                        if !matches!(o, Outcome::Done) {
                            return Ok((Side::Destination, o));
                        }
                        ls.rewind();
                        ld.rewind();
                        if ls.touches_client(&d) || ld.touches_client(&d) {
                            return self.copy_bounced(
                                t,
                                &d,
                                (&sa, &mut sst, &mut ls),
                                (&da, &mut dst_st, &mut ld),
                                backward,
                            );
                        }
                        self.copy_runs(
                            t,
                            &d,
                            (&sa, &mut sst, Some(&mut ls)),
                            (&da, &mut dst_st, Some(&mut ld)),
                            backward,
                        )
                    })();
                    t.give_back(ls.into_inner());
                    t.give_back(ld.into_inner());
                    r?
                }
            };
            let done = match which {
                Side::Source => self.settle(&sa, &mut sst, outcome, &mut sr).map_err(side(Side::Source))?,
                Side::Destination => {
                    self.settle(&da, &mut dst_st, outcome, &mut dr).map_err(side(Side::Destination))?
                }
            };
            if done {
                return Ok(());
            }
        }
    }

    /// The copying pass of a copy with client memory on a side: through a
    /// buffer, [`BOUNCE`] bytes at a time (from the end if `backward`),
    /// each side's part copied as a read or a write copies it (a run of
    /// client-memory leaves in one message), with the checking passes'
    /// translations.
    #[allow(clippy::type_complexity)]
    fn copy_bounced(
        &self,
        t: &ThreadUnit,
        d: &InDma<'_>,
        (sa, sst, ls): (&Access, &mut Option<DeviceState>, &mut Looked),
        (da, dst_st, ld): (&Access, &mut Option<DeviceState>, &mut Looked),
        backward: bool,
    ) -> std::result::Result<(Side, Outcome), CopyError> {
        let len = sa.len;
        let mut buf = vec![0u8; len.min(BOUNCE)];
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(BOUNCE);
            let at = if backward { len - done - n } else { done };
            let sc = Access { iova: sa.iova + at as u64, len: n, ..*sa };
            let dc = Access { iova: da.iova + at as u64, len: n, ..*da };
            let b = &mut buf[..n];
            let mut read = |m: &MemObject, off: u64, pos: usize, k: usize| self.mem_read(m, off, &mut b[pos..pos + k]);
            let o = self
                .try_access(t, d, &sc, sst, Some(&mut read), Some(&mut *ls))
                .map_err(|error| CopyError { side: Side::Source, error })?;
            if !matches!(o, Outcome::Done) {
                return Ok((Side::Source, o));
            }
            let b = &buf[..n];
            let mut write = |m: &MemObject, off: u64, pos: usize, k: usize| self.mem_write(m, off, &b[pos..pos + k]);
            let o = self
                .try_access(t, d, &dc, dst_st, Some(&mut write), Some(&mut *ld))
                .map_err(|error| CopyError { side: Side::Destination, error })?;
            if !matches!(o, Outcome::Done) {
                return Ok((Side::Destination, o));
            }
            done += n;
        }
        Ok((Side::Source, Outcome::Done))
    }

    /// The copying pass of [`TranslationUnit::copy`]: runs as long as both
    /// sides' leaves go on, forward or (`backward`) from the end.
    #[allow(clippy::type_complexity)]
    fn copy_runs(
        &self,
        t: &ThreadUnit,
        d: &InDma<'_>,
        (sa, sst, mut ls): (&Access, &mut Option<DeviceState>, Option<&mut Looked>),
        (da, dst_st, mut ld): (&Access, &mut Option<DeviceState>, Option<&mut Looked>),
        backward: bool,
    ) -> std::result::Result<(Side, Outcome), CopyError> {
        let len = sa.len;
        let mut done = 0usize;
        // Where the bytes of a leaf go on from `cur` (forward: the bytes
        // from `cur` to its end; backward: the bytes before `cur`, to its
        // start).
        let avail = |e: &Iotlb, cur: u64| {
            let a = if backward { cur - e.iova_base } else { e.iova_base + e.size - cur };
            usize::try_from(a).unwrap_or(usize::MAX)
        };
        while done < len {
            // Forward, the next byte; backward, one past the last byte left.
            let pos = if backward { len - done } else { done } as u64;
            let (s_cur, d_cur) = (sa.iova + pos, da.iova + pos);
            let probe = |c: u64| (if backward { c - 1 } else { c }) & !(PAGE_SIZE - 1);
            let es = match self.entry(t, sa.dev, sst, sa.pasid, probe(s_cur), &mut ls) {
                Ok(e) => e,
                Err(m) => return Ok((Side::Source, Outcome::of_miss(m, s_cur))),
            };
            let ed = match self.entry(t, da.dev, dst_st, da.pasid, probe(d_cur), &mut ld) {
                Ok(e) => e,
                Err(m) => return Ok((Side::Destination, Outcome::of_miss(m, d_cur))),
            };
            // Checked already unless each side is one cached leaf: then
            // the first byte is where the checking pass would fault.
            if !es.perm.allows(Perm::R) {
                let at = if backward { sa.iova } else { s_cur };
                return Ok((Side::Source, Outcome::Fault(at, FaultReason::Permission, false)));
            }
            if !ed.perm.allows(Perm::W) {
                let at = if backward { da.iova } else { d_cur };
                return Ok((Side::Destination, Outcome::Fault(at, FaultReason::Permission, false)));
            }
            let n = avail(&es, s_cur).min(avail(&ed, d_cur)).min(len - done);
            let (s_at, d_at) = if backward { (s_cur - n as u64, d_cur - n as u64) } else { (s_cur, d_cur) };
            let (ssys, dsys) = (es.sys_base + (s_at - es.iova_base), ed.sys_base + (d_at - ed.iova_base));
            let (ms, md) = (es.mem.get(d), ed.mem.get(d));
            if ssys < ms.base || ssys + n as u64 > ms.base + ms.size {
                return Ok((Side::Source, Outcome::Fault(s_at, FaultReason::Malformed, false)));
            }
            if dsys < md.base || dsys + n as u64 > md.base + md.size {
                return Ok((Side::Destination, Outcome::Fault(d_at, FaultReason::Malformed, false)));
            }
            let client = matches!(md.backing, Backing::Client { .. });
            if client {
                // As for a write: client memory may be written in part.
                if let Some((tb, i)) = ed.dirty {
                    self.mark_dirty(tb, i);
                }
            }
            match self.mem_copy(md, dsys - md.base, ms, ssys - ms.base, n, backward) {
                Ok(()) => {}
                Err((Side::Source, Error::Unreachable)) => {
                    return Ok((Side::Source, Outcome::Fault(s_at, FaultReason::NotPresent, false)));
                }
                Err((Side::Destination, Error::Unreachable)) => {
                    return Ok((Side::Destination, Outcome::Fault(d_at, FaultReason::NotPresent, false)));
                }
                Err((side, error)) => return Err(CopyError { side, error }),
            }
            if !client {
                if let Some((tb, i)) = ed.dirty {
                    self.mark_dirty(tb, i);
                }
            }
            done += n;
        }
        Ok((Side::Source, Outcome::Done))
    }

    /// Checks that `[iova, iova+len)` of `(dev, pasid)` translates for
    /// `access`, touching no byte (faults and page requests happen as for
    /// an access).
    pub fn check(&self, dev: u32, pasid: u32, iova: u64, len: usize, access: Perm) -> Result<()> {
        self.access(None, dev, pasid, iova, len, access, None)
    }

    #[inline(always)]
    pub(super) fn check_by(
        &self,
        own: Option<&ThreadUnit>,
        dev: u32,
        pasid: u32,
        iova: u64,
        len: usize,
        access: Perm,
    ) -> Result<()> {
        self.access(own, dev, pasid, iova, len, access, None)
    }

    /// Translates `[iova, iova+len)` for `access` into system-address
    /// segments `(system address, length)`, merging contiguous pages.
    pub fn translate(&self, dev: u32, pasid: u32, iova: u64, len: usize, access: Perm) -> Result<Vec<(u64, usize)>> {
        self.translate_by(None, dev, pasid, iova, len, access)
    }

    pub(super) fn translate_by(
        &self,
        own: Option<&ThreadUnit>,
        dev: u32,
        pasid: u32,
        iova: u64,
        len: usize,
        access: Perm,
    ) -> Result<Vec<(u64, usize)>> {
        let mut segs: Vec<(u64, usize)> = Vec::new();
        let mut op = |m: &MemObject, off: u64, at: usize, n: usize| {
            if at == 0 {
                // A retried access starts over.
                segs.clear();
            }
            let sys = m.base + off;
            match segs.last_mut() {
                Some((s, l)) if *s + *l as u64 == sys => *l += n,
                _ => segs.push((sys, n)),
            }
            Ok(())
        };
        self.access(own, dev, pasid, iova, len, access, Some(&mut op))?;
        Ok(segs)
    }
}
