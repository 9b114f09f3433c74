//! Fail-nth sweep, after the kernel's `iommufd_fail_nth.c`.
//!
//! For each composite operation a fixture is built, its whole observable
//! state captured, and then for n = 1, 2, 3, ... the n-th internal step of
//! the operation is made to fail with an injected `ENOMEM`. The core
//! promises that a failed operation leaves the state as it was, so after an
//! injected failure the state must equal the capture exactly: the snapshot
//! (mappings, objects, memory-object references, IOAS counters, tables per
//! IOAS, pPASIDs, pool usage), the object count, the pPASIDs in use, and
//! every leaf the reference walker finds. The same operation must then
//! succeed with the injector disarmed, and closing the sessions must return
//! every table and pPASID. The sweep ends when the armed failure is never
//! reached, i.e. n is past the last step of the operation.
//!
//! Each fixture is rebuilt for every n, so the retry can also be compared
//! with an uninjected run on a fresh fixture: the same result (object id,
//! IOVA) and the same final state. That stricter comparison catches state
//! the snapshot does not show (object-id counters, the automatic-IOVA hint,
//! the system address space). Only where new tables land in the pool may
//! differ there (`Leaf::table`): a failed operation puts its tables back on
//! the free list, so the retry may get other pages.
//!
//! IoasStats need no special treatment: `maps`, `unmaps` and `mapped_bytes`
//! only move when an operation succeeds, and `copy` subtracts what its
//! rollback added, so the whole snapshot, counters included, must be equal.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::OwnedFd;

use iommu_core::model::{Core, Effects, Result as CoreResult};
use iommu_core::pagetable::{self, Leaf, WalkError, PAGE_SIZE};
use iommu_core::types::*;
use iommu_core::Errno;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn new_core() -> (Core, u64) {
    let mut core = Core::new(Limits { table_pool_bytes: 64 << 20, ..Default::default() }).expect("core");
    let sid = core.open_session(1, 0).expect("session");
    (core, sid)
}

fn memfd(size: u64) -> OwnedFd {
    OwnedFd::from(iommu_core::memfd::create("fail-nth", size).expect("memfd"))
}

fn register(core: &mut Core, sid: u64, size: u64) -> MemInfo {
    core.register_memory(sid, memfd(size)).expect("register_memory")
}

/// Arguments of a fixed-IOVA map.
fn fixed(ioas: u32, mem: u32, offset: u64, length: u64, iova: u64, perm: Perm) -> MapArgs {
    MapArgs { ioas, mem, offset, length, iova: Some(iova), perm }
}

/// Runs a model call with no device server: the tables it unlinked are
/// freed as soon as it returns.
fn settled<T>(core: &mut Core, call: impl FnOnce(&mut Core, &mut Effects) -> T) -> T {
    let mut fx = Effects::default();
    let res = call(core, &mut fx);
    core.release_tables(fx.garbage);
    res
}

fn map_fixed(core: &mut Core, sid: u64, args: MapArgs) {
    assert_eq!(settled(core, |c, fx| c.map(sid, args, fx)), Ok(args.iova.expect("a fixed IOVA")));
}

/// Everything observable about a core, compared before and after a failure.
#[derive(Debug, PartialEq)]
struct State {
    snapshot: Snapshot,
    tables_in_use: u32,
    ppasids_in_use: u32,
    objects: Vec<Option<usize>>,
    /// `(ioas, iova, walk)` for every page of every mapping, the page after
    /// each mapping, and every page of the probe ranges.
    leaves: Vec<(u32, u64, Result<Leaf, WalkError>)>,
}

/// A range whose pages are walked in every capture, typically where the
/// operation under test maps.
#[derive(Debug, Clone, Copy)]
struct Probe {
    session: u64,
    ioas: u32,
    iova: u64,
    length: u64,
}

fn capture(core: &mut Core, probes: &[Probe]) -> State {
    let snapshot = core.snapshot(None);
    let mut ranges: Vec<(u64, u32, u64, u64)> = Vec::new();
    for s in &snapshot.sessions {
        for i in s.ioas.iter().filter(|i| i.kind == IoasKind::Paging) {
            for m in &i.mappings {
                ranges.push((s.id, i.id, m.iova, m.length + PAGE_SIZE));
            }
        }
    }
    ranges.extend(probes.iter().map(|p| (p.session, p.ioas, p.iova, p.length)));
    let mut leaves = Vec::new();
    for (sid, ioas, iova, length) in ranges {
        let Ok(root) = core.ioas_root(sid, ioas) else { continue };
        for k in 0..length / PAGE_SIZE {
            let p = iova + k * PAGE_SIZE;
            leaves.push((ioas, p, pagetable::walk(core.pool(sid).expect("the session's pool"), root, p)));
        }
    }
    let objects = snapshot.sessions.iter().map(|s| core.object_count(s.id)).collect();
    State { tables_in_use: core.tables_in_use(), ppasids_in_use: core.ppasids_in_use(), objects, leaves, snapshot }
}

/// A fixture: the core, the session the operation runs in, and whatever
/// the operation needs (ids).
struct Fixture<F> {
    core: Core,
    sid: u64,
    data: F,
}

/// What a sweep found.
#[derive(Debug)]
struct Sweep {
    /// Internal steps of the operation (failure points).
    steps: u64,
    /// Values of n whose disarmed retry returned a different result or
    /// reached a different state than an uninjected run.
    diverging: Vec<(u64, String)>,
}

/// Sweeps the failure over every step of `op`.
fn sweep<F, T: PartialEq + std::fmt::Debug>(
    name: &str,
    setup: impl Fn() -> Fixture<F>,
    probes: impl Fn(&Fixture<F>) -> Vec<Probe>,
    op: impl Fn(&mut Core, u64, &F) -> CoreResult<T>,
) -> Sweep {
    // Reference run: no failure, counting the steps.
    let mut fx = setup();
    let probes = probes(&fx);
    let before = capture(&mut fx.core, &probes);
    let inj = fx.core.fail_injector();
    inj.arm(u64::MAX);
    let want = op(&mut fx.core, fx.sid, &fx.data).unwrap_or_else(|e| panic!("{name}: uninjected run failed: {e}"));
    let counted = inj.steps();
    assert!(inj.disarm(), "{name}: the uninjected run cannot have hit the failure");
    let after = capture(&mut fx.core, &probes);
    assert_ne!(before, after, "{name}: the operation must change the state");

    let mut diverging = Vec::new();
    let mut n = 1;
    loop {
        let mut fx = setup();
        let start = capture(&mut fx.core, &probes);
        assert_eq!(start, before, "{name}: the fixture is not deterministic");
        let inj = fx.core.fail_injector();
        inj.arm(n);
        let res = op(&mut fx.core, fx.sid, &fx.data);
        if inj.disarm() {
            // n is past the last step: the operation ran to completion.
            assert_eq!(res.as_ref().ok(), Some(&want), "{name}: n={n} was not reached, the result must be normal");
            break;
        }
        let e = match res {
            Ok(v) => panic!("{name}: step {n} was failed but the operation returned Ok({v:?})"),
            Err(e) => e,
        };
        assert_eq!(e.errno, Errno::ENOMEM, "{name}: step {n}: {e}");
        assert!(e.message.contains("injected"), "{name}: step {n}: not the injected failure: {e}");
        let now = capture(&mut fx.core, &probes);
        assert_state_eq(&now, &before, &format!("{name}: after failing step {n}"));
        let retry = op(&mut fx.core, fx.sid, &fx.data)
            .unwrap_or_else(|e| panic!("{name}: step {n}: the disarmed retry failed: {e}"));
        let retried = capture(&mut fx.core, &probes);
        if retry != want {
            diverging.push((n, format!("retry returned {retry:?}, an uninjected run {want:?}")));
        } else if !same_but_table_placement(&retried, &after) {
            diverging.push((n, "the state after the retry differs from an uninjected run".into()));
        }
        assert_teardown_frees_everything(fx.core, name);
        n += 1;
    }
    let steps = n - 1;
    assert_eq!(steps, counted, "{name}: steps seen by the sweep and by the counter");
    assert!(steps >= 1, "{name}: the sweep injected no failure");
    println!("{name}: {steps} failure points, {} diverging retries", diverging.len());
    Sweep { steps, diverging }
}

/// Equality up to where tables were placed in the pool. A failed operation
/// returns the tables it allocated to the pool's free list, so a retry may
/// get other pages for its new tables than an uninjected run: `Leaf::table`
/// differs while every translation is the same. That is allocator freedom,
/// not state. Everything else, roots of existing IOASes included, must match.
fn same_but_table_placement(a: &State, b: &State) -> bool {
    type Placed = (u32, u64, Result<(u64, Perm, u64, usize), WalkError>);
    let strip = |s: &State| -> Vec<Placed> {
        s.leaves.iter().map(|(i, p, w)| (*i, *p, w.map(|l| (l.address, l.perm, l.page_size, l.index)))).collect()
    };
    a.snapshot == b.snapshot
        && a.tables_in_use == b.tables_in_use
        && a.ppasids_in_use == b.ppasids_in_use
        && a.objects == b.objects
        && strip(a) == strip(b)
}

fn assert_state_eq(now: &State, want: &State, what: &str) {
    // Field by field first, for a readable message.
    assert_eq!(now.tables_in_use, want.tables_in_use, "{what}: tables in use");
    assert_eq!(now.ppasids_in_use, want.ppasids_in_use, "{what}: pPASIDs in use");
    assert_eq!(now.objects, want.objects, "{what}: object counts");
    assert_eq!(now.snapshot.sessions, want.snapshot.sessions, "{what}: sessions");
    assert_eq!(now.leaves, want.leaves, "{what}: page-table leaves");
    assert_eq!(now, want, "{what}");
}

fn assert_teardown_frees_everything(mut core: Core, name: &str) {
    let sessions: Vec<u64> = core.snapshot(None).sessions.iter().map(|s| s.id).collect();
    for s in sessions {
        settled(&mut core, |c, fx| c.close_session(s, fx));
    }
    assert_eq!(core.session_count(), 0);
    assert_eq!(core.tables_in_use(), 0, "{name}: tables leaked");
    assert_eq!(core.ppasids_in_use(), 0, "{name}: pPASIDs leaked");
}

fn assert_no_divergence(name: &str, s: &Sweep) {
    assert!(s.diverging.is_empty(), "{name}: retries diverged from an uninjected run: {:?}", s.diverging);
}

// ---------------------------------------------------------------------------
// Fixtures and operations.

/// A session with one memory object and one IOAS with a mapping.
fn basic() -> Fixture<(u32, u32)> {
    let (mut core, sid) = new_core();
    let mem = register(&mut core, sid, 4 * MIB).id;
    let ioas = core.ioas_alloc(sid).expect("ioas_alloc");
    map_fixed(&mut core, sid, fixed(ioas, mem, 0, 64 << 10, 0x10_0000, Perm::RW));
    Fixture { core, sid, data: (mem, ioas) }
}

fn sweep_register_memory() -> Sweep {
    sweep("register_memory", basic, |_| vec![], |core, sid, _| core.register_memory(sid, memfd(2 * MIB)))
}

fn sweep_register_client_memory() -> Sweep {
    sweep(
        "register_client_memory",
        basic,
        |_| vec![],
        |core, sid, _| core.register_client_memory(sid, 2 * MIB, true, 0x10_0000),
    )
}

fn sweep_ioas_alloc() -> Sweep {
    sweep("ioas_alloc", basic, |_| vec![], |core, sid, _| core.ioas_alloc(sid))
}

struct MapFixture {
    ioas: u32,
    big: u32,
}

/// An IOAS whose tables a new mapping partly shares: a 64 KiB mapping at
/// 1 GiB - 8 MiB, which leaves the automatic-IOVA hint right after it.
fn map_fixture() -> Fixture<MapFixture> {
    let (mut core, sid) = new_core();
    let small = register(&mut core, sid, 64 << 10).id;
    let big = register(&mut core, sid, 16 * MIB + PAGE_SIZE).id;
    let ioas = core.ioas_alloc(sid).expect("ioas_alloc");
    // L3 and the L2 of the first GiB exist; the next automatic IOVA search
    // starts at 1 GiB - 8 MiB + 64 KiB.
    map_fixed(&mut core, sid, fixed(ioas, small, 0, 64 << 10, GIB - 8 * MIB, Perm::RW));
    Fixture { core, sid, data: MapFixture { ioas, big } }
}

/// 2 MiB across the 1 GiB boundary with 4 KiB leaves: a new L1 below, a new
/// L2 and L1 above, under the shared L3.
const FIXED_IOVA: u64 = GIB - MIB;

fn sweep_map_fixed() -> Sweep {
    sweep(
        "map fixed",
        map_fixture,
        |fx| {
            vec![Probe {
                session: fx.sid,
                ioas: fx.data.ioas,
                iova: FIXED_IOVA - PAGE_SIZE,
                length: 2 * MIB + 2 * PAGE_SIZE,
            }]
        },
        |core, sid, d| {
            let args = MapArgs {
                ioas: d.ioas,
                mem: d.big,
                offset: PAGE_SIZE,
                length: 2 * MIB,
                iova: Some(FIXED_IOVA),
                perm: Perm::RW,
            };
            settled(core, |c, fx| c.map(sid, args, fx))
        },
    )
}

/// 16 MiB at an offset that forces 4 KiB leaves; the automatic IOVA starts
/// right after the fixture's mapping, so the range crosses 1 GiB: 9 new
/// tables (3 L1 below, an L2 and 5 L1 above) next to a shared L1.
fn sweep_map_auto_large() -> Sweep {
    sweep(
        "map auto (16 MiB, 4 KiB leaves)",
        map_fixture,
        |fx| vec![Probe { session: fx.sid, ioas: fx.data.ioas, iova: GIB - 8 * MIB, length: 32 * MIB }],
        |core, sid, d| {
            let args =
                MapArgs { ioas: d.ioas, mem: d.big, offset: PAGE_SIZE, length: 16 * MIB, iova: None, perm: Perm::R };
            settled(core, |c, fx| c.map(sid, args, fx))
        },
    )
}

/// Three entries in one batched map: 2 MiB across the 1 GiB boundary with
/// 4 KiB leaves (as `map fixed`), 64 KiB at the automatic IOVA after the
/// fixture's mapping, and 2 MiB as one leaf at 3 GiB (a new L2): a failure
/// at any step must leave none of the three mapped.
fn sweep_map_batch() -> Sweep {
    sweep(
        "map batch (3 entries)",
        map_fixture,
        |fx| {
            vec![
                Probe { session: fx.sid, ioas: fx.data.ioas, iova: GIB - 8 * MIB, length: 10 * MIB },
                Probe { session: fx.sid, ioas: fx.data.ioas, iova: 3 * GIB, length: 2 * MIB },
            ]
        },
        |core, sid, d| {
            let entries = [
                MapEntry { mem: d.big, offset: PAGE_SIZE, length: 2 * MIB, iova: Some(FIXED_IOVA), perm: Perm::RW },
                MapEntry { mem: d.big, offset: 0, length: 64 << 10, iova: None, perm: Perm::R },
                MapEntry { mem: d.big, offset: 2 * MIB, length: 2 * MIB, iova: Some(3 * GIB), perm: Perm::RW },
            ];
            settled(core, |c, fx| c.map_batch(sid, d.ioas, &entries, fx))
        },
    )
}

struct CopyFixture {
    src: u32,
    dst: u32,
}

/// Source: three contiguous areas, `[2 MiB, 4 MiB)` of A (one 2 MiB leaf),
/// 64 KiB of B, 1 MiB of A read-only. Destination: a mapping at 1 GiB - 2 MiB
/// that leaves the automatic IOVA hint at 1 GiB - 2 MiB + 16 KiB.
fn copy_fixture() -> Fixture<CopyFixture> {
    let (mut core, sid) = new_core();
    let a = register(&mut core, sid, 8 * MIB).id;
    let b = register(&mut core, sid, 64 << 10).id;
    let src = core.ioas_alloc(sid).expect("ioas_alloc");
    let dst = core.ioas_alloc(sid).expect("ioas_alloc");
    map_fixed(&mut core, sid, fixed(src, a, 0, 2 * MIB, 2 * MIB, Perm::RW));
    map_fixed(&mut core, sid, fixed(src, b, 0, 64 << 10, 4 * MIB, Perm::RW));
    map_fixed(&mut core, sid, fixed(src, a, 2 * MIB, MIB, 4 * MIB + (64 << 10), Perm::R));
    map_fixed(&mut core, sid, fixed(dst, b, 0, 16 << 10, GIB - 2 * MIB, Perm::RW));
    Fixture { core, sid, data: CopyFixture { src, dst } }
}

/// `[3 MiB, 4.5 MiB)` of the source: three pieces. The destination is
/// chosen 1 MiB aligned from the hint: 1 GiB - 1 MiB, so the first piece
/// shares the fixture's L1 and the next ones need a new L2 and L1.
fn sweep_copy() -> Sweep {
    sweep(
        "copy (3 areas)",
        copy_fixture,
        |fx| vec![Probe { session: fx.sid, ioas: fx.data.dst, iova: GIB - 2 * MIB, length: 4 * MIB }],
        |core, sid, d| {
            let args = CopyArgs {
                dst: d.dst,
                src: d.src,
                src_iova: 3 * MIB,
                length: MIB + MIB / 2,
                dst_iova: None,
                perm: Perm::R,
            };
            settled(core, |c, fx| c.copy(sid, args, fx))
        },
    )
}

fn sweep_nested_alloc() -> Sweep {
    sweep("nested_alloc", basic, |_| vec![], |core, sid, &(_, ioas)| core.nested_alloc(sid, ioas, 0x1000))
}

/// Two sessions already holding pPASIDs.
fn ppasid_fixture() -> Fixture<()> {
    let (mut core, other) = new_core();
    core.ppasid_alloc(other).expect("ppasid_alloc");
    let sid = core.open_session(2, 0).expect("session");
    core.ppasid_alloc(sid).expect("ppasid_alloc");
    core.ppasid_alloc(other).expect("ppasid_alloc");
    Fixture { core, sid, data: () }
}

fn sweep_ppasid_alloc() -> Sweep {
    sweep("ppasid_alloc", ppasid_fixture, |_| vec![], |core, sid, _| core.ppasid_alloc(sid))
}

#[test]
fn register_memory_rolls_back() {
    let s = sweep_register_memory();
    assert_eq!(s.steps, 2);
}

#[test]
fn register_client_memory_rolls_back() {
    let s = sweep_register_client_memory();
    assert_eq!(s.steps, 2);
}

#[test]
fn ioas_alloc_rolls_back() {
    let s = sweep_ioas_alloc();
    assert_eq!(s.steps, 2);
}

#[test]
fn map_fixed_rolls_back() {
    let s = sweep_map_fixed();
    // The area step, then L1, L2, L1.
    assert_eq!(s.steps, 4);
    assert_no_divergence("map fixed", &s);
}

#[test]
fn map_auto_large_rolls_back() {
    let s = sweep_map_auto_large();
    // The area step and 9 tables.
    assert_eq!(s.steps, 10);
    assert_no_divergence("map auto", &s);
}

#[test]
fn map_batch_rolls_back() {
    let s = sweep_map_batch();
    // Per entry the area step and its new tables: L1, L2, L1 for the
    // first, none for the second (its L1 exists), an L2 for the third.
    assert_eq!(s.steps, 7);
    assert_no_divergence("map batch", &s);
}

#[test]
fn copy_rolls_back() {
    let s = sweep_copy();
    // One step per piece, a new L2 and a new L1.
    assert_eq!(s.steps, 5);
}

#[test]
fn nested_alloc_rolls_back() {
    let s = sweep_nested_alloc();
    assert_eq!(s.steps, 1);
    assert_no_divergence("nested_alloc", &s);
}

#[test]
fn ppasid_alloc_rolls_back() {
    let s = sweep_ppasid_alloc();
    assert_eq!(s.steps, 1);
    assert_no_divergence("ppasid_alloc", &s);
}

// ---------------------------------------------------------------------------
// A scripted sequence: the failure hits one operation of it; the ones before
// it stay done, the failed one must leave no trace.

#[derive(Debug, Default, Clone)]
struct Script {
    a: u32,
    b: u32,
    i1: u32,
    i2: u32,
    pasids: Vec<u32>,
    nested: u32,
}

const SCRIPT_LEN: usize = 14;

fn script_op(core: &mut Core, sid: u64, st: &mut Script, i: usize) -> CoreResult<()> {
    let map = |ioas, mem, offset, length, iova, perm| MapArgs { ioas, mem, offset, length, iova, perm };
    match i {
        0 => st.a = core.register_memory(sid, memfd(8 * MIB))?.id,
        1 => st.b = core.register_memory(sid, memfd(64 << 10))?.id,
        2 => st.i1 = core.ioas_alloc(sid)?,
        3 => st.i2 = core.ioas_alloc(sid)?,
        // Two 2 MiB leaves, then 64 KiB right after them.
        4 => {
            settled(core, |c, fx| c.map(sid, map(st.i1, st.a, 0, 4 * MIB, Some(2 * MIB), Perm::RW), fx))?;
        }
        5 => {
            settled(core, |c, fx| c.map(sid, map(st.i1, st.b, 0, 64 << 10, Some(6 * MIB), Perm::RW), fx))?;
        }
        // Automatic, 4 KiB leaves, right after the previous one.
        6 => {
            settled(core, |c, fx| c.map(sid, map(st.i1, st.a, PAGE_SIZE, 2 * MIB, None, Perm::R), fx))?;
        }
        // The second half of the first area, the 64 KiB one and 8 KiB of the
        // third: three pieces into the empty IOAS.
        7 => {
            let length = 2 * MIB + (64 << 10) + 2 * PAGE_SIZE;
            let args = CopyArgs { dst: st.i2, src: st.i1, src_iova: 4 * MIB, length, dst_iova: None, perm: Perm::R };
            settled(core, |c, fx| c.copy(sid, args, fx))?;
        }
        8 | 13 => st.pasids.push(core.ppasid_alloc(sid)?),
        9 => st.nested = core.nested_alloc(sid, st.i2, 0x1000)?,
        10 => {
            settled(core, |c, fx| c.unmap(sid, st.i1, 2 * MIB, 4 * MIB, fx))?;
        }
        11 => {
            settled(core, |c, fx| c.map(sid, map(st.i1, st.a, 2 * MIB, 2 * MIB, Some(2 * MIB), Perm::W), fx))?;
        }
        12 => {
            settled(core, |c, fx| c.unmap(sid, st.i2, 0, u64::MAX, fx))?;
        }
        _ => unreachable!("the script has {SCRIPT_LEN} operations"),
    }
    Ok(())
}

fn script_probes(sid: u64, st: &Script) -> Vec<Probe> {
    let mut v = Vec::new();
    for ioas in [st.i1, st.i2] {
        if ioas != 0 {
            v.push(Probe { session: sid, ioas, iova: 0, length: 16 * MIB });
        }
    }
    v
}

struct ScriptSweep {
    steps: u64,
    /// Failure points per script operation.
    per_op: [u64; SCRIPT_LEN],
    diverging: Vec<(u64, String)>,
}

fn sweep_script() -> ScriptSweep {
    // Reference run: the state after every prefix of the script.
    let (mut core, sid) = new_core();
    let mut st = Script::default();
    let mut prefix = vec![capture(&mut core, &script_probes(sid, &st))];
    let mut scripts = vec![st.clone()];
    let inj = core.fail_injector();
    let mut per_op = [0u64; SCRIPT_LEN];
    for (i, steps) in per_op.iter_mut().enumerate() {
        inj.arm(u64::MAX);
        script_op(&mut core, sid, &mut st, i).unwrap_or_else(|e| panic!("script op {i}: {e}"));
        *steps = inj.steps();
        assert!(inj.disarm());
        prefix.push(capture(&mut core, &script_probes(sid, &st)));
        scripts.push(st.clone());
    }
    let total: u64 = per_op.iter().sum();

    let mut diverging = Vec::new();
    let mut n = 1;
    loop {
        let (mut core, sid) = new_core();
        let mut st = Script::default();
        let inj = core.fail_injector();
        inj.arm(n);
        let mut failed = None;
        for i in 0..SCRIPT_LEN {
            if let Err(e) = script_op(&mut core, sid, &mut st, i) {
                failed = Some((i, e));
                break;
            }
        }
        if inj.disarm() {
            assert!(failed.is_none(), "script: n={n} was not reached but {failed:?}");
            assert_state_eq(&capture(&mut core, &script_probes(sid, &st)), &prefix[SCRIPT_LEN], "script: complete run");
            break;
        }
        let (k, e) = failed.unwrap_or_else(|| panic!("script: step {n} was failed but every operation succeeded"));
        assert_eq!(e.errno, Errno::ENOMEM, "script: step {n} (op {k}): {e}");
        assert!(e.message.contains("injected"), "script: step {n} (op {k}): {e}");
        // Capture with the probes of the reference prefix, so that IOASes
        // created by the failed operation would be walked if they existed.
        let now = capture(&mut core, &script_probes(sid, &scripts[k]));
        assert_state_eq(&now, &prefix[k], &format!("script: after failing step {n} in op {k}"));
        let mut diverged = false;
        for i in k..SCRIPT_LEN {
            script_op(&mut core, sid, &mut st, i)
                .unwrap_or_else(|e| panic!("script: step {n}: disarmed op {i} failed: {e}"));
            let now = capture(&mut core, &script_probes(sid, &scripts[i + 1]));
            if !diverged && !same_but_table_placement(&now, &prefix[i + 1]) {
                diverging.push((
                    n,
                    format!("op {k} failed; after retrying, op {i} left another state than an uninjected run"),
                ));
                diverged = true;
            }
        }
        assert_teardown_frees_everything(core, "script");
        n += 1;
    }
    let steps = n - 1;
    assert_eq!(steps, total, "script: steps seen by the sweep and by the counter");
    println!("script ({SCRIPT_LEN} ops): {steps} failure points, per op {per_op:?}, {} diverging", diverging.len());
    ScriptSweep { steps, per_op, diverging }
}

#[test]
fn scripted_sequence_rolls_back_each_operation() {
    let s = sweep_script();
    assert!(s.steps >= SCRIPT_LEN as u64);
    // Unmaps (ops 10 and 12) allocate nothing; every other op can fail.
    for (i, &n) in s.per_op.iter().enumerate() {
        assert_eq!(n == 0, i == 10 || i == 12, "op {i} has {n} failure points: {:?}", s.per_op);
    }
}

// ---------------------------------------------------------------------------
// Retries compared with uninjected runs. These check state the snapshot does
// not show.

#[test]
fn failed_allocations_do_not_consume_object_ids() {
    // Minimal: the first IOAS of a session is 1; failing its root table
    // (step 2) must not make the retry return 2.
    let (mut core, sid) = new_core();
    core.fail_injector().arm(2);
    assert_eq!(core.ioas_alloc(sid).map_err(|e| e.errno), Err(Errno::ENOMEM));
    assert!(!core.fail_injector().disarm());
    assert_eq!(core.ioas_alloc(sid), Ok(1));

    assert_no_divergence("register_memory", &sweep_register_memory());
    assert_no_divergence("ioas_alloc", &sweep_ioas_alloc());
}

#[test]
fn failed_copy_does_not_move_the_automatic_iova() {
    // Minimal: two contiguous source areas copied into an empty IOAS land at
    // 4 MiB (2 MiB + 64 KiB, aligned to 4 MiB). Failing step 4 (the second
    // piece; steps 1-3 are the first piece and its L3 and L2 tables) leaves
    // the hint at 6 MiB, so the retry lands at 8 MiB.
    let (mut core, sid) = new_core();
    let a = register(&mut core, sid, 2 * MIB).id;
    let b = register(&mut core, sid, 64 << 10).id;
    let src = core.ioas_alloc(sid).expect("ioas_alloc");
    let dst = core.ioas_alloc(sid).expect("ioas_alloc");
    map_fixed(&mut core, sid, fixed(src, a, 0, 2 * MIB, 2 * MIB, Perm::RW));
    map_fixed(&mut core, sid, fixed(src, b, 0, 64 << 10, 4 * MIB, Perm::RW));
    let args = CopyArgs { dst, src, src_iova: 2 * MIB, length: 2 * MIB + (64 << 10), dst_iova: None, perm: Perm::R };
    core.fail_injector().arm(4);
    assert_eq!(settled(&mut core, |c, fx| c.copy(sid, args, fx)).map_err(|e| e.errno), Err(Errno::ENOMEM));
    assert!(!core.fail_injector().disarm());
    assert_eq!(settled(&mut core, |c, fx| c.copy(sid, args, fx)), Ok(4 * MIB));

    assert_no_divergence("copy", &sweep_copy());
}

#[test]
fn failed_script_operation_leaves_no_hidden_state() {
    let s = sweep_script();
    assert!(s.diverging.is_empty(), "{:?}", s.diverging);
}

/// Every step count in one place, for the report.
#[test]
fn steps_per_operation() {
    let counts = [
        ("register_memory", sweep_register_memory().steps),
        ("ioas_alloc", sweep_ioas_alloc().steps),
        ("map fixed", sweep_map_fixed().steps),
        ("map auto large", sweep_map_auto_large().steps),
        ("copy", sweep_copy().steps),
        ("map batch", sweep_map_batch().steps),
        ("nested_alloc", sweep_nested_alloc().steps),
        ("ppasid_alloc", sweep_ppasid_alloc().steps),
        ("script", sweep_script().steps),
    ];
    for (name, n) in counts {
        println!("{name:>16}: {n} steps");
        assert!(n >= 1, "{name}: no failure point");
    }
}
