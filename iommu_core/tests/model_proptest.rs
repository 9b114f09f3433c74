//! Property test of the object model against a page-by-page reference.
//!
//! Random sequences of map (fixed and automatic IOVA), unmap (exact,
//! superset, partial, unmap-all) and copy run on two IOASes of one session,
//! driven directly on [`Core`]. A reference model predicts every result
//! (value or errno) and the exact content of the I/O page tables: after
//! every step each 4 KiB page touched so far is walked with the reference
//! walker and translated through the core, the mappings, counters and
//! memory-object references are compared with the snapshot, and the number
//! of tables in the pool must equal the number the reference mappings need
//! (so a leaked or missing table is caught at the step that causes it).

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;

use iommu_core::model::{Core, Effects};
use iommu_core::pagetable::{self, MAX_IOVA};
use iommu_core::types::*;
use iommu_core::Errno;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// Fixed IOVAs fall in `[0, WINDOW)` so that they collide often.
const WINDOW_PAGES: u64 = 4096;
/// Sizes of the memory objects each case registers: 4 KiB-aligned in the
/// system address space, and two 2 MiB-aligned ones (large leaves).
const MEM_SIZES: [u64; 3] = [64 << 10, (4 << 20) + 2 * PAGE, 8 << 20];

type TestResult = Result<(), TestCaseError>;

// ---------------------------------------------------------------------------
// Operations, with selectors resolved against the reference state at run time
// (so that shrinking keeps them meaningful).

#[derive(Debug, Clone, Copy)]
enum IovaSel {
    /// Let the core choose.
    Auto,
    /// A fixed IOVA.
    Fixed(u64),
    /// Right after the n-th area of the target IOAS (contiguous areas).
    After(usize),
    /// Ending right where the n-th area of the target IOAS begins.
    Before(usize),
    /// The last page of the 48-bit aperture.
    ApertureEnd,
    /// The last 4 KiB-aligned u64 value (range arithmetic overflows).
    TopOfU64,
}

#[derive(Debug, Clone, Copy)]
enum UnmapKind {
    Exact(usize),
    Superset { area: usize, before: u64, after: u64 },
    Partial { area: usize, cut: u64, front: bool },
    Range { iova: u64, pages: u64 },
    All,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Map {
        ioas: usize,
        mem: usize,
        offset: u64,
        pages: u64,
        iova: IovaSel,
        perm: Perm,
    },
    Unmap {
        ioas: usize,
        kind: UnmapKind,
    },
    Copy {
        src: usize,
        dst: usize,
        area: usize,
        skip: u64,
        /// Length in pages, capped to the rest of the source area (ignored
        /// with `span`: up to the end of the run of contiguous areas).
        pages: u64,
        span: bool,
        iova: IovaSel,
        /// `None`: the rights of the source area.
        perm: Option<Perm>,
    },
}

fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![Just(Perm::R), Just(Perm::W), Just(Perm::RW)]
}

fn pages() -> impl Strategy<Value = u64> {
    prop_oneof![
        5 => 1u64..=8,
        1 => 9u64..=64,
        2 => Just(512u64),
        1 => Just(513u64),
        1 => Just(1024u64),
    ]
}

fn iova_sel() -> impl Strategy<Value = IovaSel> {
    prop_oneof![
        4 => Just(IovaSel::Auto),
        3 => (0..WINDOW_PAGES).prop_map(|p| IovaSel::Fixed(p * PAGE)),
        2 => (0u64..8).prop_map(|k| IovaSel::Fixed(k * MIB2)),
        5 => any::<usize>().prop_map(IovaSel::After),
        1 => any::<usize>().prop_map(IovaSel::Before),
        1 => Just(IovaSel::ApertureEnd),
        1 => Just(IovaSel::TopOfU64),
    ]
}

fn unmap_kind() -> impl Strategy<Value = UnmapKind> {
    prop_oneof![
        3 => any::<usize>().prop_map(UnmapKind::Exact),
        2 => (any::<usize>(), 0u64..3, 0u64..600)
            .prop_map(|(area, before, after)| UnmapKind::Superset { area, before, after }),
        2 => (any::<usize>(), 1u64..600, any::<bool>())
            .prop_map(|(area, cut, front)| UnmapKind::Partial { area, cut, front }),
        1 => (0..WINDOW_PAGES, 0u64..1100).prop_map(|(p, pages)| UnmapKind::Range { iova: p * PAGE, pages }),
        1 => Just(UnmapKind::All),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![Just(0u64), Just(PAGE), Just(MIB2), Just(2 * MIB2), (0u64..2048).prop_map(|p| p * PAGE)];
    let mem = prop_oneof![1 => Just(0usize), 2 => Just(1usize), 2 => Just(2usize)];
    prop_oneof![
        5 => (0usize..2, mem, offset, pages(), iova_sel(), perm())
            .prop_map(|(ioas, mem, offset, pages, iova, perm)| Op::Map { ioas, mem, offset, pages, iova, perm }),
        3 => (0usize..2, unmap_kind()).prop_map(|(ioas, kind)| Op::Unmap { ioas, kind }),
        3 => (
            (0usize..2, 0usize..2, any::<usize>(), 0u64..1100),
            (pages(), any::<bool>(), iova_sel(), prop::option::weighted(0.3, perm())),
        )
            .prop_map(|((src, dst, area, skip), (pages, span, iova, perm))| Op::Copy {
                src,
                dst,
                area,
                skip,
                pages,
                span,
                iova,
                perm
            }),
    ]
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefPage {
    mem: usize,
    offset: u64,
    perm: Perm,
    /// Size of the leaf the core must use for this page.
    leaf: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefArea {
    len: u64,
    mem: usize,
    offset: u64,
    perm: Perm,
}

#[derive(Debug, Default)]
struct RefIoas {
    id: u32,
    /// Page IOVA -> what it maps.
    pages: BTreeMap<u64, RefPage>,
    /// Area start -> area.
    areas: BTreeMap<u64, RefArea>,
    /// Where the next automatic IOVA search starts (end of the last area
    /// inserted).
    hint: u64,
    maps: u64,
    unmaps: u64,
    mapped_bytes: u64,
    /// Every page whose translation is checked after each step.
    touched: BTreeSet<u64>,
}

#[derive(Debug)]
struct RefMem {
    id: u32,
    size: u64,
    sys: u64,
}

struct Model {
    sid: u64,
    mems: Vec<RefMem>,
    ioas: [RefIoas; 2],
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_next_multiple_of(align)
}

/// Largest leaf the core must use for page `p` of an area starting at
/// `start`, `len` bytes long, whose first byte is system address `sys`.
fn leaf_size(p: u64, start: u64, len: u64, sys: u64) -> u64 {
    for size in [GIB, MIB2] {
        let slot = p & !(size - 1);
        if slot >= start && slot + size <= start + len && (sys + (slot - start)).is_multiple_of(size) {
            return size;
        }
    }
    PAGE
}

impl RefIoas {
    fn overlaps(&self, start: u64, last: u64) -> bool {
        self.areas.iter().any(|(&s, a)| s <= last && start < s + a.len)
    }

    /// Smallest multiple of `align` at or above `max(4 KiB, from)` where
    /// `len` bytes fit without touching an area and below the aperture end.
    fn first_fit(&self, len: u64, align: u64, from: u64) -> Option<u64> {
        let mut c = align_up(from.max(PAGE), align)?;
        loop {
            let last = c.checked_add(len - 1)?;
            if last > MAX_IOVA {
                return None;
            }
            match self.areas.iter().find(|(&s, a)| s <= last && c < s + a.len) {
                None => return Some(c),
                Some((&s, a)) => c = align_up(s + a.len, align)?,
            }
        }
    }

    fn auto_iova(&self, len: u64, sys: u64) -> Option<u64> {
        let align = len.next_power_of_two().min(1 << sys.trailing_zeros()).clamp(PAGE, GIB);
        self.first_fit(len, align, self.hint).or_else(|| self.first_fit(len, align, 0))
    }

    fn area_at(&self, idx: usize) -> Option<(u64, RefArea)> {
        if self.areas.is_empty() {
            return None;
        }
        self.areas.iter().nth(idx % self.areas.len()).map(|(&s, a)| (s, *a))
    }

    fn touch_range(&mut self, start: u64, len: u64) {
        let mut p = start.saturating_sub(PAGE);
        let end = start.saturating_add(len);
        while p <= end {
            self.touched.insert(p);
            match p.checked_add(PAGE) {
                Some(n) => p = n,
                None => break,
            }
        }
    }

    fn insert(&mut self, start: u64, area: RefArea, sys: u64) {
        for k in 0..area.len / PAGE {
            let p = start + k * PAGE;
            let page = RefPage {
                mem: area.mem,
                offset: area.offset + k * PAGE,
                perm: area.perm,
                leaf: leaf_size(p, start, area.len, sys),
            };
            assert!(self.pages.insert(p, page).is_none(), "reference inserted page {p:#x} twice");
        }
        self.touch_range(start, area.len);
        self.areas.insert(start, area);
        self.hint = start + area.len;
        self.maps += 1;
        self.mapped_bytes += area.len;
    }

    fn remove(&mut self, start: u64) -> u64 {
        let a = self.areas.remove(&start).expect("reference area");
        for k in 0..a.len / PAGE {
            self.pages.remove(&(start + k * PAGE));
        }
        self.unmaps += 1;
        self.mapped_bytes -= a.len;
        a.len
    }

    /// Predicts an unmap as the model defines it: only whole areas, ENOENT
    /// for a partly covered area or an empty range.
    fn predict_unmap(&self, iova: u64, len: u64) -> Result<Vec<u64>, Errno> {
        if iova == 0 && len == u64::MAX {
            return Ok(self.areas.keys().copied().collect());
        }
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let last = iova.checked_add(len - 1).ok_or(Errno::EOVERFLOW)?;
        if let Some((&s, a)) = self.areas.range(..iova).next_back() {
            if s + a.len > iova {
                return Err(Errno::ENOENT);
            }
        }
        let mut starts = Vec::new();
        for (&s, a) in self.areas.range(iova..=last) {
            if s + a.len - 1 > last {
                return Err(Errno::ENOENT);
            }
            starts.push(s);
        }
        if starts.is_empty() {
            return Err(Errno::ENOENT);
        }
        Ok(starts)
    }
}

impl Model {
    fn sys_of(&self, mem: usize, offset: u64) -> u64 {
        self.mems[mem].sys + offset
    }

    fn resolve_iova(&self, ioas: usize, sel: IovaSel, len: u64) -> Option<u64> {
        let r = &self.ioas[ioas];
        Some(match sel {
            IovaSel::Auto => return None,
            IovaSel::Fixed(v) => v,
            IovaSel::After(i) => r.area_at(i).map_or(0, |(s, a)| s + a.len),
            IovaSel::Before(i) => r.area_at(i).map_or(0, |(s, _)| s.saturating_sub(len)),
            IovaSel::ApertureEnd => MAX_IOVA + 1 - PAGE,
            IovaSel::TopOfU64 => u64::MAX - (PAGE - 1),
        })
    }

    /// Checks a fixed destination as the model does: EOVERFLOW, then EINVAL
    /// past the aperture, then EEXIST on overlap.
    fn check_fixed(&self, ioas: usize, iova: u64, len: u64) -> Result<(), Errno> {
        let last = iova.checked_add(len - 1).ok_or(Errno::EOVERFLOW)?;
        if last > MAX_IOVA {
            return Err(Errno::EINVAL);
        }
        if self.ioas[ioas].overlaps(iova, last) {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Checks.

#[derive(Default)]
struct Coverage {
    large_leaves: Cell<u64>,
    small_leaves: Cell<u64>,
    maps_ok: Cell<u64>,
    auto_maps_ok: Cell<u64>,
    eexist: Cell<u64>,
    partial_enoent: Cell<u64>,
    unmaps_ok: Cell<u64>,
    copies_ok: Cell<u64>,
    multi_piece_copies: Cell<u64>,
    copy_eperm: Cell<u64>,
    ops: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

fn check_state(core: &mut Core, m: &Model, cov: &Coverage) -> TestResult {
    let sid = m.sid;
    let mut expected_tables = 0u32;
    for r in &m.ioas {
        let root = core.ioas_root(sid, r.id).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut l3 = BTreeSet::new();
        let mut l2 = BTreeSet::new();
        let mut l1 = BTreeSet::new();
        for (&p, e) in &r.pages {
            l3.insert(p >> 39);
            l2.insert(p >> 30);
            if e.leaf == PAGE {
                l1.insert(p >> 21);
            }
        }
        let tables = 1 + (l3.len() + l2.len() + l1.len()) as u32;
        expected_tables += tables;
        for &p in &r.touched {
            let walked = pagetable::walk(core.pool(sid).expect("the session's pool"), root, p);
            let translated = core.translate(sid, r.id, p);
            match r.pages.get(&p) {
                None => {
                    prop_assert!(
                        walked.is_err(),
                        "IOAS {} page {p:#x}: unmapped in the reference, walk {walked:?}",
                        r.id
                    );
                    let e = translated.err().map(|e| e.errno);
                    prop_assert_eq!(e, Some(Errno::ENOENT), "IOAS {} page {:#x}: translate", r.id, p);
                }
                Some(e) => {
                    let want = m.sys_of(e.mem, e.offset);
                    let leaf =
                        walked.map_err(|w| TestCaseError::fail(format!("IOAS {} page {p:#x}: walk {w}", r.id)))?;
                    prop_assert_eq!(
                        (leaf.address, leaf.perm, leaf.page_size),
                        (want, e.perm, e.leaf),
                        "IOAS {} page {:#x}: walk",
                        r.id,
                        p
                    );
                    if leaf.page_size == PAGE {
                        bump(&cov.small_leaves);
                    } else {
                        bump(&cov.large_leaves);
                    }
                    let t = translated.map_err(|t| TestCaseError::fail(format!("IOAS {} page {p:#x}: {t}", r.id)))?;
                    let want_t = Translation {
                        system_address: want,
                        mem: m.mems[e.mem].id,
                        offset: e.offset,
                        perm: e.perm,
                        page_size: e.leaf,
                    };
                    prop_assert_eq!(t, want_t, "IOAS {} page {:#x}: translate", r.id, p);
                }
            }
        }
    }
    prop_assert_eq!(core.tables_in_use(), expected_tables, "tables in the pool");

    let snap = core.snapshot(Some(sid));
    prop_assert_eq!(snap.sessions.len(), 1);
    let s = &snap.sessions[0];
    prop_assert_eq!(s.objects, 5);
    for (i, mem) in m.mems.iter().enumerate() {
        let refs = m.ioas.iter().flat_map(|r| r.areas.values()).filter(|a| a.mem == i).count() as u32;
        let info = s.memory.iter().find(|x| x.id == mem.id).ok_or_else(|| TestCaseError::fail("memory missing"))?;
        prop_assert_eq!(
            (info.size, info.system_address, info.mappings),
            (mem.size, mem.sys, refs),
            "memory {}",
            mem.id
        );
    }
    for r in &m.ioas {
        let info = s.ioas.iter().find(|x| x.id == r.id).ok_or_else(|| TestCaseError::fail("IOAS missing"))?;
        let want: Vec<MappingInfo> = r
            .areas
            .iter()
            .map(|(&iova, a)| MappingInfo {
                iova,
                length: a.len,
                mem: m.mems[a.mem].id,
                offset: a.offset,
                perm: a.perm,
            })
            .collect();
        prop_assert_eq!(&info.mappings, &want, "mappings of IOAS {}", r.id);
        prop_assert_eq!(
            info.stats,
            IoasStats { maps: r.maps, unmaps: r.unmaps, mapped_bytes: r.mapped_bytes, invalidations: 0 },
            "stats of IOAS {}",
            r.id
        );
    }
    Ok(())
}

fn errno_of<T>(r: &iommu_core::model::Result<T>) -> Result<&T, Errno> {
    r.as_ref().map_err(|e| e.errno)
}

/// Runs a model call with no device server: the tables it unlinked are
/// freed as soon as it returns.
fn settled<T>(core: &mut Core, call: impl FnOnce(&mut Core, &mut Effects) -> T) -> T {
    let mut fx = Effects::default();
    let res = call(core, &mut fx);
    core.release_tables(fx.garbage);
    res
}

// ---------------------------------------------------------------------------
// Running one operation on the core and the reference.

fn run_map(
    core: &mut Core,
    m: &mut Model,
    cov: &Coverage,
    (ioas, mem, offset, pages, sel, perm): (usize, usize, u64, u64, IovaSel, Perm),
) -> TestResult {
    let len = pages * PAGE;
    let fixed = m.resolve_iova(ioas, sel, len);
    let predicted: Result<u64, Errno> = if offset + len > m.mems[mem].size {
        Err(Errno::EINVAL)
    } else {
        match fixed {
            Some(iova) => m.check_fixed(ioas, iova, len).map(|()| iova),
            None => m.ioas[ioas].auto_iova(len, m.sys_of(mem, offset)).ok_or(Errno::ENOSPC),
        }
    };
    let args = MapArgs { ioas: m.ioas[ioas].id, mem: m.mems[mem].id, offset, length: len, iova: fixed, perm };
    let got = settled(core, |c, fx| c.map(m.sid, args, fx));
    prop_assert_eq!(errno_of(&got).copied(), predicted, "map {:?}: {:?}", args, got);
    if let Some(iova) = fixed {
        // Failed fixed maps: check their edges too.
        m.ioas[ioas].touched.insert(iova);
        if let Some(end) = iova.checked_add(len) {
            m.ioas[ioas].touched.insert(end);
            m.ioas[ioas].touched.insert(end - PAGE);
        }
    }
    match predicted {
        Ok(iova) => {
            bump(&cov.maps_ok);
            if fixed.is_none() {
                bump(&cov.auto_maps_ok);
            }
            let sys = m.sys_of(mem, offset);
            m.ioas[ioas].insert(iova, RefArea { len, mem, offset, perm }, sys);
        }
        Err(Errno::EEXIST) => bump(&cov.eexist),
        Err(_) => {}
    }
    Ok(())
}

fn run_unmap(core: &mut Core, m: &mut Model, cov: &Coverage, ioas: usize, kind: UnmapKind) -> TestResult {
    let r = &m.ioas[ioas];
    let (iova, len) = match kind {
        UnmapKind::All => (0, u64::MAX),
        UnmapKind::Exact(i) => r.area_at(i).map_or((PAGE, PAGE), |(s, a)| (s, a.len)),
        UnmapKind::Superset { area, before, after } => r.area_at(area).map_or((0, PAGE), |(s, a)| {
            let start = s.saturating_sub(before * PAGE);
            (start, s - start + a.len + after * PAGE)
        }),
        UnmapKind::Partial { area, cut, front } => match r.area_at(area) {
            None => (0, 2 * PAGE),
            // A single page: cover only half of it (unmap does not require
            // alignment).
            Some((s, a)) if a.len == PAGE => (s, PAGE / 2),
            Some((s, a)) => {
                let cut = (cut % (a.len / PAGE - 1) + 1) * PAGE;
                if front {
                    (s + cut, a.len - cut)
                } else {
                    (s, a.len - cut)
                }
            }
        },
        UnmapKind::Range { iova, pages } => (iova, pages * PAGE),
    };
    let predicted = r.predict_unmap(iova, len);
    if matches!(kind, UnmapKind::Partial { .. }) && !r.areas.is_empty() {
        prop_assert_eq!(predicted.as_ref().err(), Some(&Errno::ENOENT), "reference: partial unmap must fail");
        bump(&cov.partial_enoent);
    }
    let got = settled(core, |c, fx| c.unmap(m.sid, r.id, iova, len, fx));
    match predicted {
        Ok(starts) => {
            let total: u64 = starts.iter().map(|s| m.ioas[ioas].remove(*s)).sum();
            prop_assert_eq!(errno_of(&got).copied(), Ok(total), "unmap [{:#x}, +{:#x})", iova, len);
            bump(&cov.unmaps_ok);
        }
        Err(e) => prop_assert_eq!(errno_of(&got).copied(), Err(e), "unmap [{:#x}, +{:#x})", iova, len),
    }
    Ok(())
}

struct CopyOp {
    src: usize,
    dst: usize,
    area: usize,
    skip: u64,
    pages: u64,
    span: bool,
    sel: IovaSel,
    perm: Option<Perm>,
}

fn run_copy(core: &mut Core, m: &mut Model, cov: &Coverage, mut c: CopyOp) -> TestResult {
    // Copy from the other IOAS if this one is empty (both empty: ENOENT).
    if m.ioas[c.src].areas.is_empty() {
        c.src = 1 - c.src;
    }
    let s = &m.ioas[c.src];
    // With `span`, prefer an area that starts a run of contiguous areas.
    let runs: Vec<(u64, RefArea)> =
        s.areas.iter().filter(|(&st, a)| s.areas.contains_key(&(st + a.len))).map(|(&st, a)| (st, *a)).collect();
    let chosen = if c.span && !runs.is_empty() { Some(runs[c.area % runs.len()]) } else { s.area_at(c.area) };
    let (src_iova, len, perm) = match chosen {
        None => (c.skip * PAGE, c.pages * PAGE, c.perm.unwrap_or(Perm::RW)),
        Some((start, a)) => {
            let iova = start + (c.skip % (a.len / PAGE)) * PAGE;
            // Within the area; or with `span`, to the end of the run of
            // contiguous areas it starts, sometimes one page into the hole
            // after the run.
            let len = if c.span {
                let mut end = start + a.len;
                while let Some(next) = s.areas.get(&end) {
                    end += next.len;
                }
                end - iova + if c.pages % 4 == 3 { PAGE } else { 0 }
            } else {
                (c.pages * PAGE).min(start + a.len - iova)
            };
            (iova, len, c.perm.unwrap_or(a.perm))
        }
    };
    let c = CopyOp { perm: Some(perm), ..c };
    let last = src_iova + len - 1;
    // Collect the pieces the way the model defines them: contiguous areas,
    // ENOENT at the first hole, EPERM at the first area lacking a right.
    let mut pieces: Vec<(u64, RefArea)> = Vec::new();
    let mut pred: Result<(), Errno> = Ok(());
    let perm = c.perm.unwrap_or(Perm::RW);
    let mut cur = src_iova;
    while cur <= last {
        let Some((&st, a)) = s.areas.range(..=cur).next_back().filter(|(&st, a)| st + a.len > cur) else {
            pred = Err(Errno::ENOENT);
            break;
        };
        if !a.perm.allows(perm) {
            pred = Err(Errno::EPERM);
            break;
        }
        let piece_last = (st + a.len - 1).min(last);
        pieces.push((
            cur - src_iova,
            RefArea { len: piece_last - cur + 1, mem: a.mem, offset: a.offset + (cur - st), perm },
        ));
        cur = piece_last + 1;
    }
    let fixed = m.resolve_iova(c.dst, c.sel, len);
    let predicted: Result<u64, Errno> = pred.and_then(|()| match fixed {
        Some(iova) => m.check_fixed(c.dst, iova, len).map(|()| iova),
        None => {
            let first = pieces[0].1;
            m.ioas[c.dst].auto_iova(len, m.sys_of(first.mem, first.offset)).ok_or(Errno::ENOSPC)
        }
    });
    let args = CopyArgs { dst: m.ioas[c.dst].id, src: m.ioas[c.src].id, src_iova, length: len, dst_iova: fixed, perm };
    let got = settled(core, |c, fx| c.copy(m.sid, args, fx));
    prop_assert_eq!(errno_of(&got).copied(), predicted, "copy {:?}: {:?}", args, got);
    if let Some(iova) = fixed {
        m.ioas[c.dst].touched.insert(iova);
    }
    match predicted {
        Ok(dst_iova) => {
            bump(&cov.copies_ok);
            if pieces.len() > 1 {
                bump(&cov.multi_piece_copies);
            }
            for (rel, a) in pieces {
                let sys = m.sys_of(a.mem, a.offset);
                m.ioas[c.dst].insert(dst_iova + rel, a, sys);
            }
        }
        Err(Errno::EEXIST) => bump(&cov.eexist),
        Err(Errno::EPERM) => bump(&cov.copy_eperm),
        Err(_) => {}
    }
    Ok(())
}

fn run_case(ops: &[Op], cov: &Coverage) -> TestResult {
    let mut core = Core::new(Limits { table_pool_bytes: 64 << 20, ..Default::default() })
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let sid = core.open_session(1, 0).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut mems = Vec::new();
    for (i, &size) in MEM_SIZES.iter().enumerate() {
        let f = iommu_core::memfd::create(&format!("proptest-mem{i}"), size).expect("memfd");
        let info = core.register_memory(sid, OwnedFd::from(f)).expect("register_memory");
        prop_assert_eq!(info.size, size);
        mems.push(RefMem { id: info.id, size, sys: info.system_address });
    }
    let a = core.ioas_alloc(sid).expect("ioas_alloc");
    let b = core.ioas_alloc(sid).expect("ioas_alloc");
    let mut m =
        Model { sid, mems, ioas: [RefIoas { id: a, ..RefIoas::default() }, RefIoas { id: b, ..RefIoas::default() }] };
    prop_assert_eq!(core.tables_in_use(), 2);
    for op in ops {
        bump(&cov.ops);
        match *op {
            Op::Map { ioas, mem, offset, pages, iova, perm } => {
                run_map(&mut core, &mut m, cov, (ioas, mem, offset, pages, iova, perm))?
            }
            Op::Unmap { ioas, kind } => run_unmap(&mut core, &mut m, cov, ioas, kind)?,
            Op::Copy { src, dst, area, skip, pages, span, iova, perm } => {
                run_copy(&mut core, &mut m, cov, CopyOp { src, dst, area, skip, pages, span, sel: iova, perm })?
            }
        }
        check_state(&mut core, &m, cov)?;
    }
    // Tear down: unmap everything and check that no table leaked.
    for i in 0..2 {
        let want = m.ioas[i].mapped_bytes;
        let got = settled(&mut core, |c, fx| c.unmap(sid, m.ioas[i].id, 0, u64::MAX, fx));
        prop_assert_eq!(errno_of(&got).copied(), Ok(want), "unmap all of IOAS {}", m.ioas[i].id);
        let starts: Vec<u64> = m.ioas[i].areas.keys().copied().collect();
        for s in starts {
            m.ioas[i].remove(s);
        }
    }
    check_state(&mut core, &m, cov)?;
    prop_assert_eq!(core.tables_in_use(), 2, "only the two roots may remain");
    Ok(())
}

#[test]
fn map_unmap_copy_agree_with_the_reference() {
    let config = Config { cases: 256, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let cov = Coverage::default();
    let res = runner.run(&prop::collection::vec(op(), 1..=40), |ops| run_case(&ops, &cov));
    if let Err(e) = res {
        panic!("{e}");
    }
    println!(
        "ops {} | maps ok {} (auto {}) | EEXIST {} | partial-unmap ENOENT {} | unmaps ok {} | \
         copies ok {} (several areas {}) | copy EPERM {} | page checks: 4K leaves {}, large leaves {}",
        cov.ops.get(),
        cov.maps_ok.get(),
        cov.auto_maps_ok.get(),
        cov.eexist.get(),
        cov.partial_enoent.get(),
        cov.unmaps_ok.get(),
        cov.copies_ok.get(),
        cov.multi_piece_copies.get(),
        cov.copy_eperm.get(),
        cov.small_leaves.get(),
        cov.large_leaves.get(),
    );
    // The generator must actually reach the interesting cases.
    assert!(cov.large_leaves.get() > 0, "no 2 MiB leaf was ever checked");
    assert!(cov.small_leaves.get() > 0);
    assert!(cov.eexist.get() > 0, "no overlapping map was tried");
    assert!(cov.partial_enoent.get() > 0, "no partial unmap was tried");
    assert!(cov.multi_piece_copies.get() > 0, "no copy spanned several areas");
    assert!(cov.auto_maps_ok.get() > 0);
    assert!(cov.unmaps_ok.get() > 0);
    assert!(cov.copy_eperm.get() > 0);
}
