//! An access: each leaf translated (with faults, page requests and
//! memory fetches), then copied run by run; writes are checked whole
//! first, under the same DMA guard.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::iotlb::Looked;
use super::memory::{find_mem, Backing, MemObject};
use super::{DeviceState, Error, Result, TranslationUnit};
use crate::pagetable::PAGE_SIZE;
use crate::sync;
use crate::types::*;

/// The copy of one run of an access: `(object, offset in it, offset in
/// the access, bytes)`.
pub(super) type CopyOp<'a> = &'a mut dyn FnMut(&MemObject, u64, usize, usize) -> Result<()>;

/// What one access asks: `len` bytes at `iova` of `(dev, pasid)` with
/// the rights `want`.
#[derive(Clone, Copy)]
pub(super) struct Access {
    dev: u32,
    st: DeviceState,
    pasid: u32,
    iova: u64,
    len: usize,
    want: Perm,
}

/// How one pass over an access ended: done, stopped at a memory object
/// the unit has not mapped yet, or at a fault `(IOVA, reason, page
/// requests allowed)`.
pub(super) enum Outcome {
    Done,
    NeedMemory(u64),
    Fault(u64, FaultReason, bool),
}

impl TranslationUnit {
    /// One pass over an access: translates every leaf of it and, given
    /// `op`, copies each run. Without `op` it only checks that every byte
    /// translates with the rights asked (the checking pass of a write, or
    /// [`TranslationUnit::check`]).
    pub(super) fn try_access(&self, a: &Access, mut op: Option<CopyOp<'_>>, looked: &mut Looked) -> Result<Outcome> {
        let Access { dev, st, pasid, iova, len, want } = *a;
        let st = &st;
        let mut done = 0usize;
        let mut mem: Option<Arc<MemObject>> = None;
        while done < len {
            let Some(cur) = iova.checked_add(done as u64) else {
                return Ok(Outcome::Fault(iova, FaultReason::NotPresent, false));
            };
            let page = cur & !(PAGE_SIZE - 1);
            let e = match self.entry(dev, st, pasid, page, looked) {
                Ok(e) => e,
                Err((_, _, Some(sys))) => return Ok(Outcome::NeedMemory(sys)),
                Err((r, iopf, None)) => return Ok(Outcome::Fault(cur, r, iopf)),
            };
            if !e.perm.allows(want) {
                return Ok(Outcome::Fault(cur, FaultReason::Permission, false));
            }
            // One translation covers the rest of its leaf.
            let mut n = usize::try_from(e.iova_base + e.size - cur).unwrap_or(usize::MAX).min(len - done);
            let sys = e.sys_base + (cur - e.iova_base);
            let m = match mem.take().filter(|m| sys >= m.base && sys + n as u64 <= m.base + m.size) {
                Some(m) => m,
                None => {
                    let mems = sync::read(&self.mems);
                    match find_mem(&mems, sys) {
                        Some(m) if sys + n as u64 <= m.base + m.size => m.clone(),
                        Some(_) => return Ok(Outcome::Fault(cur, FaultReason::Malformed, false)),
                        None => return Ok(Outcome::NeedMemory(sys)),
                    }
                }
            };
            let Some(op) = op.as_deref_mut() else {
                mem = Some(m);
                done += n;
                continue;
            };
            // In client memory, leaves that go on in the same object where
            // this one ends join it: one message for the run instead of one
            // per leaf. Whatever stops the run is met again as the next
            // leaf.
            let mut more_dirty = Vec::new();
            while matches!(m.backing, Backing::Client { .. }) && done + n < len {
                let next = cur + n as u64;
                let Ok(f) = self.entry(dev, st, pasid, next & !(PAGE_SIZE - 1), looked) else { break };
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
            let client = matches!(m.backing, Backing::Client { .. });
            if want.write && client {
                for &(t, i) in e.dirty.iter().chain(&more_dirty) {
                    self.mark_dirty(t, i);
                }
            }
            match op(&m, sys - m.base, done, n) {
                Err(Error::Unreachable) => return Ok(Outcome::Fault(cur, FaultReason::NotPresent, false)),
                r => r?,
            }
            if want.write && !client {
                for (t, i) in e.dirty.into_iter().chain(more_dirty) {
                    self.mark_dirty(t, i);
                }
            }
            mem = Some(m);
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

    pub(super) fn access(
        &self,
        dev: u32,
        pasid: u32,
        iova: u64,
        len: usize,
        want: Perm,
        mut op: Option<CopyOp<'_>>,
    ) -> Result<()> {
        let st = sync::read(&self.devices).get(&dev).copied().ok_or(Error::NoDevice(dev))?;
        let mut page_requests = 0;
        let mut fetches = 0;
        loop {
            let a = Access { dev, st, pasid, iova, len, want };
            let mut looked = Looked::default();
            let outcome = {
                // Both passes of a write run under one guard: no
                // invalidation completes between the check and the copy.
                let _dma = sync::read(&self.dma);
                let checked =
                    if op.is_none() || want.write { self.try_access(&a, None, &mut looked)? } else { Outcome::Done };
                match (checked, op.as_deref_mut()) {
                    (Outcome::Done, Some(op)) => {
                        looked.rewind();
                        self.try_access(&a, Some(op), &mut looked)?
                    }
                    (o, _) => o,
                }
            };
            match outcome {
                Outcome::Done => return Ok(()),
                Outcome::NeedMemory(sys) if fetches < 64 => {
                    fetches += 1;
                    if self.map_memory(sys).is_err() {
                        return self.fail(dev, pasid, sys, want, FaultReason::NotPresent);
                    }
                }
                Outcome::NeedMemory(sys) => return self.fail(dev, pasid, sys, want, FaultReason::NotPresent),
                Outcome::Fault(at, reason, iopf) => {
                    if iopf && st.caps.pri && page_requests < 8 && reason != FaultReason::Malformed {
                        page_requests += 1;
                        self.stats.page_requests.fetch_add(1, Ordering::Relaxed);
                        let rec = FaultRecord {
                            dev_id: dev,
                            pasid,
                            iova: at & !(PAGE_SIZE - 1),
                            access: want,
                            reason,
                            group: page_requests,
                            last: true,
                            cookie: 0,
                        };
                        match self.channel.page_request(rec, self.config.page_request_timeout) {
                            Ok(page_response::SUCCESS) => continue,
                            Ok(_) | Err(_) => {
                                self.stats.faults.fetch_add(1, Ordering::Relaxed);
                                return Err(Error::Fault { dev, pasid, iova: at, reason });
                            }
                        }
                    }
                    return self.fail(dev, pasid, at, want, reason);
                }
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
        let len = buf.len();
        self.access(
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
        self.access(
            dev,
            pasid,
            iova,
            data.len(),
            Perm::W,
            Some(&mut |m, off, at, n| self.mem_write(m, off, &data[at..at + n])),
        )
    }

    /// Checks that `[iova, iova+len)` of `(dev, pasid)` translates for
    /// `access`, touching no byte (faults and page requests happen as for
    /// an access).
    pub fn check(&self, dev: u32, pasid: u32, iova: u64, len: usize, access: Perm) -> Result<()> {
        self.access(dev, pasid, iova, len, access, None)
    }

    /// Translates `[iova, iova+len)` for `access` into system-address
    /// segments `(system address, length)`, merging contiguous pages.
    pub fn translate(&self, dev: u32, pasid: u32, iova: u64, len: usize, access: Perm) -> Result<Vec<(u64, usize)>> {
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
        self.access(dev, pasid, iova, len, access, Some(&mut op))?;
        Ok(segs)
    }
}
