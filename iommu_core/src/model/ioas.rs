//! Paging IOASes: their areas, IOVA ranges, allowed and reserved ranges;
//! map, unmap and copy (all or nothing), long ones run as [`Job`]s slice by
//! slice; translation and the page-table dump.

use std::collections::{BTreeMap, BTreeSet};

use super::{check_aligned, err, range_last, Core, Effects, Error, Object, Result};
use crate::errno::Errno;
use crate::pagetable::{self, MAX_IOVA, PAGE_SIZE};
use crate::types::*;

/// A mapping of an IOAS (keyed by its first IOVA): 20 bytes, so that an
/// IOAS of a million 4 KiB mappings costs the core under 64 bytes each,
/// its B-tree's nodes included. The memory object offset is 4 KiB
/// aligned; its low bits hold the permission.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
pub(super) struct Area {
    pub(super) last: u64,
    pub(super) mem: u32,
    offset_perm: u64,
}

const _: () = assert!(size_of::<Area>() == 20);

impl Area {
    pub(super) fn new(last: u64, mem: u32, offset: u64, perm: Perm) -> Area {
        debug_assert!(offset.is_multiple_of(PAGE_SIZE));
        let bits = u64::from(perm.read) | u64::from(perm.write) << 1;
        Area { last, mem, offset_perm: offset | bits }
    }

    /// Offset in the memory object.
    pub(super) fn offset(&self) -> u64 {
        self.offset_perm & !(PAGE_SIZE - 1)
    }

    /// Rights.
    pub(super) fn perm(&self) -> Perm {
        let bits = self.offset_perm;
        Perm { read: bits & 1 != 0, write: bits & 2 != 0 }
    }
}

#[derive(Debug)]
pub(super) struct Ioas {
    pub(super) root: u64,
    pub(super) areas: BTreeMap<u64, Area>,
    pub(super) allowed: Vec<IovaRange>,
    pub(super) reserved: Vec<IovaRange>,
    pub(super) dirty: bool,
    pub(super) iopf: bool,
    pub(super) children: u32,
    pub(super) hint: u64,
    pub(super) stats: IoasStats,
    /// (device, pPASID) attached here.
    pub(super) attached: BTreeSet<(u32, u32)>,
}

/// Leaves one slice of a long map or unmap writes or clears at most, so
/// that no session's request holds the event loop for long (about half a
/// millisecond in a release build).
pub const SLICE_LEAVES: u64 = 16_384;

/// Most entries of a batched map or unmap.
pub const BATCH_ENTRIES: usize = 4096;

/// Most leaves one batched map writes in all (a few milliseconds of the
/// event loop in a release build): a map larger than that goes alone and
/// runs as a [`Job`].
pub const BATCH_LEAVES: u64 = 4 * SLICE_LEAVES;

/// How an operation that may be long began.
#[derive(Debug)]
pub enum Started {
    /// Done already: the IOVA of a map, the bytes of an unmap.
    Done(u64),
    /// To be run slice by slice with [`Core::job_step`].
    Job(Job),
}

/// A map or unmap run in slices. While it runs, its session sends nothing
/// else (the event loop does not read it); if the session goes away the
/// next step ends the job with ENOENT.
#[derive(Debug)]
pub struct Job {
    sid: u64,
    ioas: u32,
    kind: JobKind,
}

impl Started {
    /// The value of an operation done at once (0 for a job).
    pub fn done(&self) -> u64 {
        match self {
            Started::Done(v) => *v,
            Started::Job(_) => 0,
        }
    }
}

impl Job {
    /// The session the job works for.
    pub fn session(&self) -> u64 {
        self.sid
    }
}

#[derive(Debug)]
enum JobKind {
    Map {
        iova: u64,
        area: Area,
        /// Bytes from `iova` whose tables are written.
        done: u64,
        leaf: u64,
    },
    Unmap {
        /// (next IOVA to clear, last IOVA, leaf size) of each area taken out.
        pieces: Vec<(u64, u64, u64)>,
        next: usize,
        garbage: Vec<u64>,
        total: u64,
        mems: Vec<u32>,
        range: Option<IovaRange>,
    },
}

/// The largest leaf a mapping of `iova` onto system address `sys` can use
/// (their offsets within the leaf must agree).
fn leaf_size(iova: u64, sys: u64) -> u64 {
    let delta = iova.wrapping_sub(sys);
    pagetable::LEAF_SIZES.iter().rev().copied().find(|l| delta.is_multiple_of(*l)).unwrap_or(PAGE_SIZE)
}

/// Where a slice starting at `cur` ends (exclusive): after at most
/// [`SLICE_LEAVES`] leaves of `leaf`, on a `leaf` boundary so that the
/// slices pick the same leaves one map of the whole range would, and never
/// past `last`.
fn slice_end(cur: u64, last: u64, leaf: u64) -> u64 {
    let boundary = (cur / leaf).saturating_add(SLICE_LEAVES).saturating_mul(leaf);
    boundary.min(last.saturating_add(1))
}

fn intersects(a: IovaRange, start: u64, last: u64) -> bool {
    a.start <= last && start <= a.last
}

impl Ioas {
    /// True if `[start, last]` hits a reserved region or lies past the aperture.
    fn hits_reserved(&self, start: u64, last: u64) -> bool {
        last > MAX_IOVA || self.reserved.iter().any(|r| intersects(*r, start, last))
    }

    /// The area with the greatest start <= `last` that reaches `start`.
    fn overlapping(&self, start: u64, last: u64) -> Option<(u64, Area)> {
        let (&s, &a) = self.areas.range(..=last).next_back()?;
        (a.last >= start).then_some((s, a))
    }

    pub(super) fn iova_ranges(&self) -> Vec<IovaRange> {
        let mut res: Vec<IovaRange> = self.reserved.clone();
        res.sort();
        let mut out = Vec::new();
        let mut cur = 0u64;
        let mut open = true;
        for r in res {
            if r.start > MAX_IOVA {
                break;
            }
            if open && r.start > cur {
                out.push(IovaRange { start: cur, last: r.start - 1 });
            }
            if r.last >= MAX_IOVA {
                open = false;
                break;
            }
            cur = cur.max(r.last + 1);
        }
        if open && cur <= MAX_IOVA {
            out.push(IovaRange { start: cur, last: MAX_IOVA });
        }
        out
    }

    /// First-fit search for `length` bytes aligned to `align`, starting at
    /// `from`; never returns IOVA 0.
    fn find_hole(&self, length: u64, align: u64, from: u64) -> Option<u64> {
        let whole = [IovaRange { start: PAGE_SIZE, last: MAX_IOVA }];
        let ranges: &[IovaRange] = if self.allowed.is_empty() { &whole } else { &self.allowed };
        for r in ranges {
            let lo = r.start.max(PAGE_SIZE).max(from);
            let mut cand = lo.checked_next_multiple_of(align)?;
            while let Some(last) = cand.checked_add(length - 1) {
                if last > r.last || last > MAX_IOVA {
                    break;
                }
                if let Some(res) = self.reserved.iter().find(|x| intersects(**x, cand, last)) {
                    cand = match res.last.checked_add(1).and_then(|v| v.checked_next_multiple_of(align)) {
                        Some(c) => c,
                        None => break,
                    };
                    continue;
                }
                if let Some((_, a)) = self.overlapping(cand, last) {
                    cand = match a.last.checked_add(1).and_then(|v| v.checked_next_multiple_of(align)) {
                        Some(c) => c,
                        None => break,
                    };
                    continue;
                }
                return Some(cand);
            }
        }
        None
    }

    fn auto_iova(&self, length: u64, sys_addr: u64) -> Option<u64> {
        let mut align = length.checked_next_power_of_two().unwrap_or(1 << 63);
        if sys_addr != 0 {
            align = align.min(1 << sys_addr.trailing_zeros());
        }
        let align = align.clamp(PAGE_SIZE, 1 << 30);
        self.find_hole(length, align, self.hint).or_else(|| self.find_hole(length, align, 0))
    }
}

impl Core {
    /// Allocates an empty paging IOAS.
    pub fn ioas_alloc(&mut self, sid: u64) -> Result<u32> {
        let id = self.new_id(sid)?;
        let root = self.pool_mut(sid)?.alloc_table()?;
        self.insert_object(
            sid,
            id,
            Object::Ioas(Ioas {
                root,
                areas: BTreeMap::new(),
                allowed: Vec::new(),
                reserved: Vec::new(),
                dirty: false,
                iopf: false,
                children: 0,
                hint: 0,
                stats: IoasStats::default(),
                attached: BTreeSet::new(),
            }),
        )?;
        Ok(id)
    }

    /// Checks a fixed destination `[iova, last]` in `ioas`.
    fn check_fixed(ioas: &Ioas, iova: u64, last: u64) -> Result<()> {
        check_aligned("IOVA", iova)?;
        if ioas.hits_reserved(iova, last) {
            return err(Errno::EINVAL, format!("[{iova:#x}, {last:#x}] touches a reserved range"));
        }
        if let Some((s, a)) = ioas.overlapping(iova, last) {
            return err(
                Errno::EEXIST,
                format!("[{iova:#x}, {last:#x}] overlaps the mapping at [{s:#x}, {:#x}]", { a.last }),
            );
        }
        Ok(())
    }

    /// Maps part of a memory object into an IOAS; returns the IOVA. A map
    /// of many leaves is done here in one go: the event loop uses
    /// [`map_begin`](Self::map_begin) and [`job_step`](Self::job_step).
    /// Only a failed map of many leaves leaves effects (its rollback).
    pub fn map(&mut self, sid: u64, a: MapArgs, fx: &mut Effects) -> Result<u64> {
        match self.map_begin(sid, a, fx)? {
            Started::Done(iova) => Ok(iova),
            Started::Job(job) => self.finish(job, fx),
        }
    }

    /// Runs a job to its end.
    fn finish(&mut self, mut job: Job, fx: &mut Effects) -> Result<u64> {
        loop {
            if let Some(r) = self.job_step(&mut job, fx) {
                return r;
            }
        }
    }

    /// Starts a map: done at once when it writes at most [`SLICE_LEAVES`]
    /// leaves, else a [`Job`] to run slice by slice with
    /// [`job_step`](Self::job_step), all or nothing like a map done at once.
    /// A map done at once that fails part-way leaves the tables it had
    /// linked in `fx`.
    pub fn map_begin(&mut self, sid: u64, a: MapArgs, fx: &mut Effects) -> Result<Started> {
        let (iova, area, leaf) = self.prepare_map(sid, a)?;
        if a.length / leaf <= SLICE_LEAVES {
            self.insert_area(sid, a.ioas, iova, area, fx)?;
            return Ok(Started::Done(iova));
        }
        self.step()?;
        Ok(Started::Job(Job { sid, ioas: a.ioas, kind: JobKind::Map { iova, area, done: 0, leaf } }))
    }

    /// Checks a map and chooses its IOVA: the IOVA, the area to insert and
    /// the leaf size its tables use. Changes nothing.
    fn prepare_map(&mut self, sid: u64, a: MapArgs) -> Result<(u64, Area, u64)> {
        if a.perm.is_empty() {
            return err(Errno::EINVAL, "a mapping needs read or write permission");
        }
        range_last(a.offset, a.length)?;
        check_aligned("length", a.length)?;
        check_aligned("offset", a.offset)?;
        let (size, base) = self.mem_info(sid, a.mem)?;
        if a.perm.write && matches!(self.object(sid, a.mem)?, Object::Memory(m) if !m.writable) {
            return err(
                Errno::EACCES,
                format!(
                    "memory object {} cannot be written (its fd is read-only or it is sealed against writes): \
                     map it without write permission",
                    a.mem
                ),
            );
        }
        if a.offset.checked_add(a.length).is_none_or(|end| end > size) {
            return err(
                Errno::EINVAL,
                format!("[{:#x}, +{:#x}) is beyond the memory object's {size:#x} bytes", a.offset, a.length),
            );
        }
        let cap = self.limits.max_mappings_per_ioas;
        let ioas = self.ioas(sid, a.ioas)?;
        let iova = match a.iova {
            Some(iova) => {
                let last = range_last(iova, a.length)?;
                Self::check_fixed(ioas, iova, last)?;
                iova
            }
            None => ioas.auto_iova(a.length, base + a.offset).ok_or_else(|| Error {
                errno: Errno::ENOSPC,
                message: format!("no free IOVA hole of {:#x} bytes", a.length),
            })?,
        };
        if ioas.areas.len() as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the IOAS holds {cap} mappings, the configured limit"));
        }
        let area = Area::new(iova + a.length - 1, a.mem, a.offset, a.perm);
        Ok((iova, area, leaf_size(iova, base + a.offset)))
    }

    /// Maps every entry of a batch into `ioas`, in order, all or nothing;
    /// returns their IOVAs. An automatic IOVA is chosen after the entries
    /// before it are mapped. At most [`BATCH_ENTRIES`] entries writing at
    /// most [`BATCH_LEAVES`] leaves in all (a larger map goes alone, as a
    /// job). On failure nothing of the batch stays mapped, the error names
    /// the entry, and what the attempt linked or mapped is retired through
    /// `fx` (devices may have walked it).
    pub fn map_batch(&mut self, sid: u64, ioas: u32, entries: &[MapEntry], fx: &mut Effects) -> Result<Vec<u64>> {
        if entries.len() > BATCH_ENTRIES {
            return err(Errno::E2BIG, format!("{} entries in a batch, at most {BATCH_ENTRIES}", entries.len()));
        }
        let hint = self.ioas(sid, ioas)?.hint;
        let mut done = Vec::with_capacity(entries.len());
        let mut leaves = 0u64;
        for (i, e) in entries.iter().enumerate() {
            let a = MapArgs { ioas, mem: e.mem, offset: e.offset, length: e.length, iova: e.iova, perm: e.perm };
            let res = self.prepare_map(sid, a).and_then(|(iova, area, leaf)| {
                leaves = leaves.saturating_add(a.length / leaf);
                if leaves > BATCH_LEAVES {
                    return err(
                        Errno::E2BIG,
                        format!("the batch writes more than {BATCH_LEAVES} leaves: map the larger ranges alone"),
                    );
                }
                self.insert_area(sid, ioas, iova, area, fx).map(|()| iova)
            });
            match res {
                Ok(iova) => done.push(iova),
                Err(e) => {
                    // Undo the entries mapped before, as an unmap would
                    // (their invalidations and tables go through `fx`),
                    // and the counters and hint they moved.
                    if !done.is_empty() {
                        self.remove_areas(sid, ioas, &done, fx)?;
                    }
                    let io = self.ioas(sid, ioas)?;
                    io.stats.maps -= done.len() as u64;
                    io.stats.unmaps -= done.len() as u64;
                    io.hint = hint;
                    return Err(Error { errno: e.errno, message: format!("entry {i}: {}", e.message) });
                }
            }
        }
        Ok(done)
    }

    /// Unmaps every range of a batch from `ioas`, all or nothing: each
    /// range must cover whole mappings, as [`unmap`](Self::unmap) demands,
    /// and no two ranges the same mapping; nothing is unmapped unless every
    /// range is. At most [`BATCH_ENTRIES`] ranges. Done at once or, when it
    /// clears many leaves, as a job; returns the bytes unmapped.
    pub fn unmap_batch_begin(
        &mut self,
        sid: u64,
        ioas: u32,
        ranges: &[UnmapEntry],
        fx: &mut Effects,
    ) -> Result<Started> {
        if ranges.len() > BATCH_ENTRIES {
            return err(Errno::E2BIG, format!("{} ranges in a batch, at most {BATCH_ENTRIES}", ranges.len()));
        }
        let mut starts = Vec::new();
        for (i, r) in ranges.iter().enumerate() {
            let s = self
                .unmap_starts(sid, ioas, r.iova, r.length)
                .map_err(|e| Error { errno: e.errno, message: format!("range {i}: {}", e.message) })?;
            starts.extend(s);
        }
        starts.sort_unstable();
        if let Some(w) = starts.windows(2).find(|w| w[0] == w[1]) {
            return err(Errno::EINVAL, format!("two ranges of the batch cover the mapping at {:#x}", w[0]));
        }
        self.remove_areas_begin(sid, ioas, &starts, fx)
    }

    /// [`unmap_batch_begin`](Self::unmap_batch_begin) run to its end.
    pub fn unmap_batch(&mut self, sid: u64, ioas: u32, ranges: &[UnmapEntry], fx: &mut Effects) -> Result<u64> {
        match self.unmap_batch_begin(sid, ioas, ranges, fx)? {
            Started::Done(total) => Ok(total),
            Started::Job(job) => self.finish(job, fx),
        }
    }

    /// Does one slice of a job (at most [`SLICE_LEAVES`] leaves written or
    /// cleared). `None`: more is left. `Some`: the job is over, with the
    /// IOVA of a map or the bytes of an unmap, and its effects (the
    /// invalidations and unlinked tables of an unmap, or of a map rolled
    /// back) are in `fx`, which the caller carries across the slices.
    pub fn job_step(&mut self, job: &mut Job, fx: &mut Effects) -> Option<Result<u64>> {
        let (sid, ioas) = (job.sid, job.ioas);
        match &mut job.kind {
            JobKind::Map { iova, area, done, leaf } => {
                let (iova, area, leaf) = (*iova, *area, *leaf);
                let len = area.last - iova + 1;
                let cur = iova + *done;
                let stop = slice_end(cur, area.last, leaf);
                let mut garbage = Vec::new();
                let mut wrote = false;
                let res = self.mem_info(sid, area.mem).and_then(|(_, base)| {
                    let root = self.ioas(sid, ioas)?.root;
                    let s = self.session(sid)?;
                    let a = base + area.offset() + (cur - iova);
                    wrote = true;
                    s.pool.map_range(root, cur, a, stop - cur, area.perm(), Some(&s.dirty), &mut garbage)?;
                    Ok(root)
                });
                match res {
                    Ok(_) if stop - iova < len => {
                        *done = stop - iova;
                        None
                    }
                    Ok(_) => Some(self.map_finished(sid, ioas, iova, area).map(|()| iova)),
                    Err(e) => {
                        // Roll back what earlier slices mapped (this one's
                        // tables are in `garbage` already); devices may have
                        // walked it, so the tables go after the invalidation.
                        // A slice that failed before writing anything, with
                        // none before it, has nothing to retire.
                        if *done > 0 {
                            if let (Ok(root), Ok(pool)) = (self.ioas(sid, ioas).map(|i| i.root), self.pool_mut(sid)) {
                                pool.unmap_range(root, iova, *done, &mut garbage);
                            }
                        }
                        if *done > 0 || wrote {
                            let range = IovaRange { start: iova, last: stop - 1 };
                            self.retire(sid, ioas, Some(range), garbage, fx);
                        }
                        Some(Err(e))
                    }
                }
            }
            JobKind::Unmap { pieces, next, garbage, total, mems, range } => {
                let Ok(root) = self.ioas(sid, ioas).map(|i| i.root) else {
                    // Gone with its session: no device is left to walk what
                    // earlier slices unlinked.
                    fx.garbage.extend(garbage.drain(..).map(|t| (sid, t)));
                    return Some(err(Errno::ENOENT, format!("IOAS {ioas} went away during the unmap")));
                };
                let mut leaves = 0;
                while leaves < SLICE_LEAVES {
                    let Some(&(cur, last, leaf)) = pieces.get(*next) else { break };
                    let stop = slice_end(cur, last, leaf).min(cur + (SLICE_LEAVES - leaves) * leaf);
                    let Ok(pool) = self.pool_mut(sid) else { return Some(err(Errno::ENOENT, "the session went away")) };
                    pool.unmap_range(root, cur, stop - cur, garbage);
                    leaves += (stop - cur).div_ceil(leaf);
                    if stop > last {
                        *next += 1;
                    } else if let Some(p) = pieces.get_mut(*next) {
                        p.0 = stop;
                    }
                }
                if *next < pieces.len() {
                    return None;
                }
                for m in std::mem::take(mems) {
                    self.mem_unref(sid, m);
                }
                let garbage = std::mem::take(garbage);
                self.retire(sid, ioas, *range, garbage, fx);
                Some(Ok(*total))
            }
        }
    }

    /// Records a map whose tables are written: the area, its memory
    /// object's reference and the IOAS's counters.
    fn map_finished(&mut self, sid: u64, ioas_id: u32, iova: u64, area: Area) -> Result<()> {
        if let Ok(Object::Memory(m)) = self.object(sid, area.mem) {
            m.refs += 1;
        }
        let ioas = self.ioas(sid, ioas_id)?;
        ioas.areas.insert(iova, area);
        ioas.hint = area.last.saturating_add(1);
        ioas.stats.maps += 1;
        ioas.stats.mapped_bytes += area.last - iova + 1;
        Ok(())
    }

    /// Writes one area into the tables and the IOAS; all or nothing (the
    /// tables of a failed attempt are retired through `fx`).
    fn insert_area(&mut self, sid: u64, ioas_id: u32, iova: u64, area: Area, fx: &mut Effects) -> Result<()> {
        self.step()?;
        let (_, base) = self.mem_info(sid, area.mem)?;
        let root = self.ioas(sid, ioas_id)?.root;
        let len = area.last - iova + 1;
        let s = self.session(sid)?;
        let mut garbage = Vec::new();
        if let Err(e) =
            s.pool.map_range(root, iova, base + area.offset(), len, area.perm(), Some(&s.dirty), &mut garbage)
        {
            self.retire(sid, ioas_id, Some(IovaRange { start: iova, last: area.last }), garbage, fx);
            return Err(e.into());
        }
        self.map_finished(sid, ioas_id, iova, area)
    }

    fn remove_areas(&mut self, sid: u64, ioas_id: u32, starts: &[u64], fx: &mut Effects) -> Result<u64> {
        match self.remove_areas_begin(sid, ioas_id, starts, fx)? {
            Started::Done(total) => Ok(total),
            Started::Job(job) => self.finish(job, fx),
        }
    }

    /// Takes the areas at `starts` out of the IOAS and clears their leaves:
    /// at once when that is at most [`SLICE_LEAVES`] leaves (its effects in
    /// `fx`), else as a job.
    fn remove_areas_begin(&mut self, sid: u64, ioas_id: u32, starts: &[u64], fx: &mut Effects) -> Result<Started> {
        let mut total = 0;
        let mut leaves = 0;
        let mut pieces = Vec::new();
        let mut mems = Vec::new();
        let mut removed = Vec::new();
        let ioas = self.ioas(sid, ioas_id)?;
        for s in starts {
            if let Some(a) = ioas.areas.remove(s) {
                removed.push((*s, a));
            }
        }
        let range = match (starts.iter().min(), removed.iter().map(|(_, a)| a.last).max()) {
            (Some(&start), Some(last)) => Some(IovaRange { start, last }),
            _ => None,
        };
        for (s, a) in removed {
            let len = a.last - s + 1;
            let sys = self.mem_info(sid, a.mem).map_or(0, |(_, base)| base + a.offset());
            let leaf = leaf_size(s, sys);
            leaves += len / leaf;
            pieces.push((s, a.last, leaf));
            total += len;
            mems.push(a.mem);
        }
        let ioas = self.ioas(sid, ioas_id)?;
        ioas.stats.unmaps += mems.len() as u64;
        ioas.stats.mapped_bytes -= total;
        let job = Job {
            sid,
            ioas: ioas_id,
            kind: JobKind::Unmap { pieces, next: 0, garbage: Vec::new(), total, mems, range },
        };
        if leaves > SLICE_LEAVES {
            return Ok(Started::Job(job));
        }
        self.finish(job, fx).map(Started::Done)
    }

    /// Starts an unmap (see [`unmap`](Self::unmap)): done at once, its
    /// effects in `fx`, or a job to run with [`job_step`](Self::job_step)
    /// when it clears many leaves.
    pub fn unmap_begin(&mut self, sid: u64, ioas_id: u32, iova: u64, length: u64, fx: &mut Effects) -> Result<Started> {
        let starts = self.unmap_starts(sid, ioas_id, iova, length)?;
        self.remove_areas_begin(sid, ioas_id, &starts, fx)
    }

    /// Unmaps whole mappings inside `[iova, iova+length)`; `(0, u64::MAX)`
    /// unmaps everything. Returns the bytes unmapped; the invalidations and
    /// the unlinked tables are in `fx`.
    pub fn unmap(&mut self, sid: u64, ioas_id: u32, iova: u64, length: u64, fx: &mut Effects) -> Result<u64> {
        let starts = self.unmap_starts(sid, ioas_id, iova, length)?;
        self.remove_areas(sid, ioas_id, &starts, fx)
    }

    /// The starts of the mappings an unmap of `[iova, iova+length)` takes.
    fn unmap_starts(&mut self, sid: u64, ioas_id: u32, iova: u64, length: u64) -> Result<Vec<u64>> {
        let ioas = self.ioas(sid, ioas_id)?;
        let starts: Vec<u64> = if iova == 0 && length == u64::MAX {
            ioas.areas.keys().copied().collect()
        } else {
            let last = range_last(iova, length)?;
            let mut v = Vec::new();
            if let Some((&s, a)) = ioas.areas.range(..iova).next_back() {
                if a.last >= iova {
                    return err(
                        Errno::ENOENT,
                        format!("the mapping at [{s:#x}, {:#x}] is only partly covered", { a.last }),
                    );
                }
            }
            for (&s, a) in ioas.areas.range(iova..=last) {
                if a.last > last {
                    return err(
                        Errno::ENOENT,
                        format!("the mapping at [{s:#x}, {:#x}] is only partly covered", { a.last }),
                    );
                }
                v.push(s);
            }
            if v.is_empty() {
                return err(Errno::ENOENT, format!("nothing is mapped in [{iova:#x}, {last:#x}]"));
            }
            v
        };
        Ok(starts)
    }

    /// Maps into `dst` the memory that `[src_iova, +length)` of `src` maps;
    /// returns the destination IOVA. Only a failed copy leaves effects (its
    /// rollback).
    pub fn copy(&mut self, sid: u64, a: CopyArgs, fx: &mut Effects) -> Result<u64> {
        if a.perm.is_empty() {
            return err(Errno::EINVAL, "a mapping needs read or write permission");
        }
        let src_last = range_last(a.src_iova, a.length)?;
        check_aligned("source IOVA", a.src_iova)?;
        check_aligned("length", a.length)?;
        // Collect the source pieces: contiguous areas covering the range.
        let src = self.ioas(sid, a.src)?;
        let mut pieces: Vec<(u64, Area)> = Vec::new();
        let mut cur = a.src_iova;
        while cur <= src_last {
            let Some((s, area)) = src.overlapping(cur, cur) else {
                return err(Errno::ENOENT, format!("source IOVA {cur:#x} is not mapped"));
            };
            if !area.perm().allows(a.perm) {
                return err(Errno::EPERM, format!("the source mapping at {s:#x} is {}, not {}", area.perm(), a.perm));
            }
            let piece_last = area.last.min(src_last);
            pieces.push((cur - a.src_iova, Area::new(piece_last - cur, area.mem, area.offset() + (cur - s), a.perm)));
            if piece_last == u64::MAX {
                break;
            }
            cur = piece_last + 1;
        }
        let first_sys = {
            let (_, base) = self.mem_info(sid, pieces[0].1.mem)?;
            base + pieces[0].1.offset()
        };
        let cap = self.limits.max_mappings_per_ioas;
        let dst = self.ioas(sid, a.dst)?;
        let dst_iova = match a.dst_iova {
            Some(iova) => {
                let last = range_last(iova, a.length)?;
                Self::check_fixed(dst, iova, last)?;
                iova
            }
            None => dst.auto_iova(a.length, first_sys).ok_or_else(|| Error {
                errno: Errno::ENOSPC,
                message: format!("no free IOVA hole of {:#x} bytes", a.length),
            })?,
        };
        if dst.areas.len() as u64 + pieces.len() as u64 > u64::from(cap) {
            return err(Errno::ENOSPC, format!("the IOAS would hold more than {cap} mappings, the configured limit"));
        }
        let hint = dst.hint;
        let mut done: Vec<u64> = Vec::new();
        for (rel, mut area) in pieces {
            let iova = dst_iova + rel;
            area.last += iova;
            if let Err(e) = self.insert_area(sid, a.dst, iova, area, fx) {
                self.remove_areas(sid, a.dst, &done, fx)?;
                let d = self.ioas(sid, a.dst)?;
                d.stats.maps -= done.len() as u64;
                d.stats.unmaps -= done.len() as u64;
                d.hint = hint;
                return Err(e);
            }
            done.push(iova);
        }
        Ok(dst_iova)
    }

    /// Usable IOVA ranges of an IOAS.
    pub fn iova_ranges(&mut self, sid: u64, ioas: u32) -> Result<IovaRanges> {
        let i = self.ioas(sid, ioas)?;
        Ok(IovaRanges { alignment: PAGE_SIZE, ranges: i.iova_ranges() })
    }

    fn check_range_list(ranges: &[IovaRange], cap: u32) -> Result<()> {
        if ranges.len() as u64 > u64::from(cap) {
            return err(Errno::E2BIG, format!("{} ranges given, at most {cap} allowed", ranges.len()));
        }
        for r in ranges {
            if r.start >= r.last {
                return err(Errno::EINVAL, format!("range [{:#x}, {:#x}] is empty or reversed", r.start, r.last));
            }
        }
        Ok(())
    }

    /// Replaces the allowed ranges for automatic IOVA (empty = all).
    pub fn allow_iovas(&mut self, sid: u64, ioas: u32, ranges: Vec<IovaRange>) -> Result<()> {
        let cap = self.limits.max_ranges_per_ioas;
        Self::check_range_list(&ranges, cap)?;
        let mut sorted = ranges;
        sorted.sort();
        for w in sorted.windows(2) {
            if w[1].start <= w[0].last {
                return err(Errno::EINVAL, "allowed ranges overlap each other");
            }
        }
        let i = self.ioas(sid, ioas)?;
        for r in &sorted {
            if i.reserved.iter().any(|x| intersects(*x, r.start, r.last)) {
                return err(Errno::EADDRINUSE, format!("[{:#x}, {:#x}] hits a reserved range", r.start, r.last));
            }
        }
        i.allowed = sorted;
        Ok(())
    }

    /// Reserves `[start, last]` of an IOAS, as a platform's reserved region
    /// (an MSI window, say) does.
    pub fn add_reserved(&mut self, sid: u64, ioas: u32, start: u64, last: u64) -> Result<()> {
        let cap = self.limits.max_ranges_per_ioas;
        Self::check_range_list(&[IovaRange { start, last }], cap)?;
        let i = self.ioas(sid, ioas)?;
        if i.reserved.len() as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the IOAS holds {cap} reserved ranges, the configured limit"));
        }
        if i.allowed.iter().any(|x| intersects(*x, start, last)) {
            return err(Errno::EADDRINUSE, format!("[{start:#x}, {last:#x}] hits an allowed range"));
        }
        if let Some((s, a)) = i.overlapping(start, last) {
            return err(
                Errno::EADDRINUSE,
                format!("[{start:#x}, {last:#x}] hits the mapping at [{s:#x}, {:#x}]", { a.last }),
            );
        }
        i.reserved.push(IovaRange { start, last });
        Ok(())
    }

    /// The page-table entries of a paging IOAS, one line each (see
    /// [`TablePool::dump`](pagetable::TablePool::dump)), at most `max`
    /// lines. Nested IOASes have none: their stage-1 table belongs to the
    /// user.
    pub fn page_table(&mut self, sid: u64, ioas: u32, max: usize) -> Result<Vec<String>> {
        let root = self.ioas(sid, ioas)?.root;
        Ok(self.session(sid)?.pool.dump(root, max))
    }

    /// Translates one IOVA of a paging IOAS by walking its tables.
    pub fn translate(&mut self, sid: u64, ioas: u32, iova: u64) -> Result<Translation> {
        let root = self.ioas(sid, ioas)?.root;
        let leaf = pagetable::walk(&self.session(sid)?.pool, root, iova)
            .map_err(|e| Error { errno: Errno::ENOENT, message: format!("IOVA {iova:#x}: {e}") })?;
        let (&base, &(owner, mem)) = self
            .sys_owner
            .range(..=leaf.address)
            .next_back()
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: "translation names no memory object".into() })?;
        debug_assert_eq!(owner, sid);
        Ok(Translation {
            system_address: leaf.address,
            mem,
            offset: leaf.address - base,
            perm: leaf.perm,
            page_size: leaf.page_size,
        })
    }

    /// Pool offset of an IOAS's root table.
    pub fn ioas_root(&mut self, sid: u64, ioas: u32) -> Result<u64> {
        Ok(self.ioas(sid, ioas)?.root)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;
    use crate::memfd;
    use crate::model::tests::core_with;

    #[test]
    fn a_map_done_in_slices_is_the_map_done_at_once() {
        let (mut c, sid) = core_with(Limits::default());
        let m = c.register_memory(sid, OwnedFd::from(memfd::create("m", 1 << 30).unwrap())).unwrap();
        let ioas = c.ioas_alloc(sid).unwrap();
        // Offset 4 KiB against a 2 MiB aligned IOVA: 4 KiB leaves only.
        let len = (SLICE_LEAVES * 3 + 5) * PAGE_SIZE;
        let args = MapArgs { ioas, mem: m.id, offset: PAGE_SIZE, length: len, iova: Some(1 << 30), perm: Perm::RW };
        let Started::Job(mut job) = c.map_begin(sid, args, &mut Effects::default()).unwrap() else {
            panic!("a long map must be a job")
        };
        let mut fx = Effects::default();
        let mut slices = 1;
        let iova = loop {
            if let Some(r) = c.job_step(&mut job, &mut fx) {
                break r.unwrap();
            }
            slices += 1;
        };
        assert_eq!((iova, slices), (1 << 30, 4));
        for k in [0, 1, SLICE_LEAVES - 1, SLICE_LEAVES, 2 * SLICE_LEAVES + 7, 3 * SLICE_LEAVES + 4] {
            let t = c.translate(sid, ioas, (1 << 30) + k * PAGE_SIZE + 5).unwrap();
            assert_eq!((t.offset, t.page_size), ((k + 1) * PAGE_SIZE + 5, PAGE_SIZE), "leaf {k}");
        }
        assert!(c.translate(sid, ioas, (1 << 30) + len).is_err());
        let tables = c.tables_in_use();
        // The same map done at once in another IOAS takes as many tables.
        let other = c.ioas_alloc(sid).unwrap();
        let root = c.ioas(sid, other).unwrap().root;
        let sys = m.system_address + PAGE_SIZE;
        c.session(sid).unwrap().pool.map_range(root, 1 << 30, sys, len, Perm::RW, None, &mut Vec::new()).unwrap();
        assert_eq!(c.tables_in_use() - tables - 1, tables - 1, "same tables either way");
        // An unmap of it is a job too, and leaves nothing behind.
        let Started::Job(job) = c.unmap_begin(sid, ioas, 0, u64::MAX, &mut fx).unwrap() else { panic!("a long unmap") };
        assert_eq!(c.finish(job, &mut fx).unwrap(), len);
        c.release_tables(fx.garbage);
        assert_eq!(c.snapshot(Some(sid)).sessions[0].ioas[0].tables, 1, "only the root is left");
    }

    #[test]
    fn a_map_in_slices_that_runs_out_of_tables_leaves_nothing() {
        // Enough tables for the first slices only.
        let (mut c, sid) = core_with(Limits { max_tables_per_session: 40, ..Limits::default() });
        let m = c.register_memory(sid, OwnedFd::from(memfd::create("m", 1 << 30).unwrap())).unwrap();
        let ioas = c.ioas_alloc(sid).unwrap();
        let before = c.tables_in_use();
        let len = SLICE_LEAVES * 4 * PAGE_SIZE;
        let args = MapArgs { ioas, mem: m.id, offset: PAGE_SIZE, length: len, iova: Some(1 << 30), perm: Perm::RW };
        let Started::Job(job) = c.map_begin(sid, args, &mut Effects::default()).unwrap() else {
            panic!("a long map must be a job")
        };
        let mut fx = Effects::default();
        assert_eq!(c.finish(job, &mut fx).unwrap_err().errno, Errno::ENOSPC);
        c.release_tables(std::mem::take(&mut fx.garbage));
        assert_eq!(c.tables_in_use(), before, "the slices mapped before the failure were undone");
        assert!(c.translate(sid, ioas, 1 << 30).is_err());
        assert_eq!(c.snapshot(Some(sid)).sessions[0].ioas[0].mappings.len(), 0);
        c.destroy(sid, m.id, &mut fx).unwrap();
    }

    #[test]
    fn a_map_that_fails_part_way_hands_its_tables_to_the_effects() {
        // The root and two more tables: a 4 KiB leaf needs three more.
        let (mut c, sid) = core_with(Limits { max_tables_per_session: 3, ..Limits::default() });
        let m = c.register_memory(sid, OwnedFd::from(memfd::create("m", 1 << 21).unwrap())).unwrap();
        let ioas = c.ioas_alloc(sid).unwrap();
        let before = c.tables_in_use();
        let args = MapArgs { ioas, mem: m.id, offset: 0, length: PAGE_SIZE, iova: Some(PAGE_SIZE), perm: Perm::RW };
        let mut fx = Effects::default();
        assert_eq!(c.map(sid, args, &mut fx).unwrap_err().errno, Errno::ENOSPC);
        // A walker may have reached what the attempt linked: the tables are
        // freed by whoever settles the effects, after the invalidation.
        assert_eq!(fx.garbage.len(), 2, "the two tables the attempt linked");
        assert_eq!(c.tables_in_use(), before + 2);
        assert!(c.translate(sid, ioas, PAGE_SIZE).is_err(), "nothing of the failed map is mapped");
        c.release_tables(std::mem::take(&mut fx.garbage));
        assert_eq!(c.tables_in_use(), before);
    }
}
