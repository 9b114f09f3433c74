//! Conformance suite modelled on the kernel's iommufd selftests
//! (`tools/testing/selftests/iommu/iommufd.c`): for every operation, the
//! success paths with their values and every edge case with its exact errno,
//! driven over the real Unix socket against an in-process server.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use iommu_core::client::Client;
use iommu_core::memfd;
use iommu_core::pagetable::MAX_IOVA;
use iommu_core::sysaddr;
use iommu_core::types::*;
use iommu_core::wire::{self, Request, Role};
use iommu_core::Errno;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// A 4 KiB aligned IOVA whose `+ 0x2000` overflows a u64.
const TOP_PAGE: u64 = 0xFFFF_FFFF_FFFF_F000;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

mod common;
use common::{errno, Env};

macro_rules! assert_errno {
    ($call:expr, $errno:ident) => {
        assert_eq!(errno($call), Errno::$errno, "{}", stringify!($call))
    };
}

fn memfd_of(size: u64) -> File {
    memfd::create("conformance", size).expect("memfd")
}

fn memory(c: &mut Client, size: u64) -> MemInfo {
    c.register_memory(memfd_of(size)).expect("register memory")
}

fn margs(ioas: u32, mem: u32, offset: u64, length: u64, iova: Option<u64>) -> MapArgs {
    MapArgs { ioas, mem, offset, length, iova, perm: Perm::RW }
}

fn cargs(dst: u32, src: u32, src_iova: u64, length: u64, dst_iova: Option<u64>) -> CopyArgs {
    CopyArgs { dst, src, src_iova, length, dst_iova, perm: Perm::RW }
}

#[track_caller]
fn map_at(c: &mut Client, ioas: u32, mem: u32, offset: u64, length: u64, iova: u64) {
    assert_eq!(c.map(margs(ioas, mem, offset, length, Some(iova))).expect("fixed map"), iova);
}

/// The caller's own session as its status shows it.
fn me(c: &mut Client) -> SessionInfo {
    let st = c.status().expect("status");
    assert_eq!(st.sessions.len(), 1, "a session sees only itself");
    st.sessions.into_iter().next().unwrap()
}

fn ioas_info(c: &mut Client, id: u32) -> IoasInfo {
    me(c).ioas.into_iter().find(|i| i.id == id).unwrap_or_else(|| panic!("IOAS {id} not in status"))
}

fn mem_info(c: &mut Client, id: u32) -> MemInfo {
    me(c).memory.into_iter().find(|m| m.id == id).unwrap_or_else(|| panic!("memory {id} not in status"))
}

fn mappings(c: &mut Client, ioas: u32) -> Vec<MappingInfo> {
    ioas_info(c, ioas).mappings
}

fn range(start: u64, last: u64) -> IovaRange {
    IovaRange { start, last }
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// A session with one memory object of `size` bytes and one empty IOAS.
fn fixture(name: &str, size: u64) -> (Env, Client, MemInfo, u32) {
    let env = Env::new(name);
    let mut s = env.session();
    let m = memory(&mut s, size);
    let ioas = s.ioas_alloc().unwrap();
    (env, s, m, ioas)
}

// ---------------------------------------------------------------------------
// Connections, sessions and observers
// ---------------------------------------------------------------------------

#[test]
fn hello_gives_distinct_session_ids_and_limits() {
    let limits = Limits { max_objects_per_session: 77, max_ppasids_per_session: 5, ..Limits::default() };
    let env = Env::with("hello", limits);
    let a = env.session();
    let b = env.session();
    let o = env.observer();
    assert!(a.session_id() >= 1);
    assert_ne!(a.session_id(), b.session_id());
    assert_eq!(o.session_id(), 0, "observers have no session");
    assert_eq!(*a.limits(), limits);
    assert_eq!(*o.limits(), limits);
}

#[test]
fn second_hello_is_eproto() {
    let env = Env::new("second_hello");
    let mut s = env.session();
    let hello = Request::Hello {
        magic: wire::MAGIC,
        major: wire::VERSION_MAJOR,
        minor: wire::VERSION_MINOR,
        role: Role::Session,
    };
    assert_errno!(s.call(&hello, &[]), EPROTO);
    // The connection stays usable.
    assert_eq!(s.ioas_alloc().unwrap(), 1);
}

#[test]
fn request_with_unexpected_fd_is_ebadf() {
    let env = Env::new("unexpected_fd");
    let mut s = env.session();
    let f = memfd_of(PAGE);
    assert_errno!(s.call(&Request::IoasAlloc, &[f.as_fd()]), EBADF);
    assert_eq!(me(&mut s).objects, 0, "the refused request created nothing");
}

#[test]
fn register_memory_without_fd_is_ebadf() {
    let env = Env::new("register_no_fd");
    let mut s = env.session();
    assert_errno!(s.call(&Request::RegisterMemory, &[]), EBADF);
    assert!(me(&mut s).memory.is_empty());
}

#[test]
fn observer_mutation_is_eperm() {
    let env = Env::new("observer_eperm");
    let mut s = env.session();
    let m = memory(&mut s, MIB);
    let ioas = s.ioas_alloc().unwrap();
    let mut o = env.observer();
    assert_errno!(o.ioas_alloc(), EPERM);
    assert_errno!(o.register_memory(memfd_of(PAGE)), EPERM);
    assert_errno!(o.nested_alloc(ioas, 0), EPERM);
    assert_errno!(o.destroy(ioas), EPERM);
    assert_errno!(o.map(margs(ioas, m.id, 0, PAGE, None)), EPERM);
    assert_errno!(o.unmap(ioas, 0, u64::MAX), EPERM);
    assert_errno!(o.copy(cargs(ioas, ioas, 0, PAGE, None)), EPERM);
    assert_errno!(o.allow_iovas(ioas, vec![]), EPERM);
    assert_errno!(o.add_reserved(ioas, 0, 0xfff), EPERM);
    assert_errno!(o.invalidate(ioas, InvalidateScope::All), EPERM);
    assert_errno!(o.ppasid_alloc(), EPERM);
    assert_errno!(o.ppasid_free(1), EPERM);
    assert_errno!(o.set_dirty_tracking(ioas, true), EPERM);
    assert_errno!(o.dirty_bitmap(ioas, 0, PAGE, PAGE, false), EPERM);
    assert_errno!(o.read_faults(1), EPERM);
    assert_errno!(o.respond_fault(1, 0), EPERM);
    assert_errno!(o.translate(ioas, 0), EPERM);
    assert_errno!(o.iova_ranges(ioas), EPERM);
    // Nothing changed; the observer may still read.
    let st = o.status().unwrap();
    assert_eq!(st.sessions.len(), 1);
    assert_eq!(st.sessions[0].objects, 2);
    assert!(st.ppasids.is_empty());
}

#[test]
fn observer_sees_all_sessions_session_sees_itself() {
    let env = Env::new("visibility");
    let mut a = env.session();
    let mut b = env.session();
    a.ioas_alloc().unwrap();
    a.ioas_alloc().unwrap();
    let pa = a.ppasid_alloc().unwrap();
    let sa = me(&mut a);
    assert_eq!((sa.id, sa.objects, sa.ioas.len(), sa.ppasids.clone()), (a.session_id(), 2, 2, vec![pa]));
    let st = b.status().unwrap();
    assert_eq!(st.sessions.len(), 1);
    assert_eq!((st.sessions[0].id, st.sessions[0].objects), (b.session_id(), 0));
    assert!(st.ppasids.is_empty(), "another session's pPASIDs are not shown");
    let all = env.observer().status().unwrap();
    let ids: Vec<u64> = all.sessions.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![a.session_id(), b.session_id()]);
    assert_eq!(all.ppasids, vec![(pa, a.session_id())]);
}

#[test]
fn observer_status_reports_peer_credentials() {
    let env = Env::new("credentials");
    let s = env.session();
    let st = env.observer().status().unwrap();
    assert_eq!(st.sessions.len(), 1);
    assert_eq!(st.sessions[0].id, s.session_id());
    assert_eq!(st.sessions[0].pid, std::process::id() as i32);
    assert_eq!(st.sessions[0].uid, nix::unistd::geteuid().as_raw());
    assert_eq!(st.stats.sessions_opened, 1);
}

#[test]
fn core_stats_count_requests_and_errors() {
    let env = Env::new("stats");
    let mut s = env.session();
    let mut o = env.observer();
    let before = o.status().unwrap().stats;
    assert_errno!(s.destroy(0), ENOENT);
    let after = o.status().unwrap().stats;
    // The first status and the failed destroy.
    assert_eq!(after.requests - before.requests, 2);
    assert_eq!(after.errors - before.errors, 1);
    assert_eq!(after.faults, 0);
}

#[test]
fn sessions_cap_is_enospc() {
    let env = Env::with("sessions_cap", Limits { max_sessions: 1, ..Limits::default() });
    let first = env.session();
    assert_errno!(Client::session(&env.path).map(|c| c.session_id()), ENOSPC);
    // Observers do not hold sessions.
    let mut o = env.observer();
    assert_eq!(o.status().unwrap().sessions.len(), 1);
    drop(first);
    assert!(wait_until(|| Client::session(&env.path).is_ok()), "the slot comes back once the session closes");
}

#[test]
fn close_session_frees_objects() {
    let env = Env::new("close_frees");
    let mut o = env.observer();
    let base = o.status().unwrap();
    assert_eq!(base.pool.tables_in_use, 0);
    let sid;
    {
        let mut s = env.session();
        sid = s.session_id();
        let m = memory(&mut s, 2 * MIB);
        let ioas = s.ioas_alloc().unwrap();
        map_at(&mut s, ioas, m.id, 0, PAGE, 0x1000);
        s.nested_alloc(ioas, 0x1000).unwrap();
        assert_eq!(s.ppasid_alloc().unwrap(), 1);
        s.set_dirty_tracking(ioas, true).unwrap();
        let st = o.status().unwrap();
        assert_eq!(st.sessions.len(), 1);
        assert_eq!(st.sessions[0].objects, 3);
        assert_eq!(st.ppasids, vec![(1, sid)]);
        assert_eq!(st.pool.tables_in_use, 4);
    }
    assert!(wait_until(|| o.status().unwrap().sessions.is_empty()), "session {sid} never went away");
    let st = o.status().unwrap();
    assert!(st.ppasids.is_empty());
    assert_eq!(st.pool.tables_in_use, 0, "every table returned to the pool");
    // The pPASID and the system address space are free again.
    let mut s = env.session();
    assert_eq!(s.ppasid_alloc().unwrap(), 1);
    assert_eq!(memory(&mut s, 2 * MIB).system_address, sysaddr::BASE);
}

#[test]
fn other_session_ids_are_enoent() {
    let env = Env::new("other_session");
    let mut a = env.session();
    let m = memory(&mut a, MIB);
    let ioas = a.ioas_alloc().unwrap();
    map_at(&mut a, ioas, m.id, 0, PAGE, 0x1000);
    let mut b = env.session();
    assert_errno!(b.destroy(ioas), ENOENT);
    assert_errno!(b.destroy(m.id), ENOENT);
    assert_errno!(b.map(margs(ioas, m.id, 0, PAGE, None)), ENOENT);
    assert_errno!(b.unmap(ioas, 0x1000, PAGE), ENOENT);
    assert_errno!(b.unmap(ioas, 0, u64::MAX), ENOENT);
    assert_errno!(b.translate(ioas, 0x1000), ENOENT);
    assert_errno!(b.iova_ranges(ioas), ENOENT);
    assert_errno!(b.nested_alloc(ioas, 0), ENOENT);
    assert_errno!(b.add_reserved(ioas, 0x10000, 0x1ffff), ENOENT);
    assert_errno!(b.set_dirty_tracking(ioas, true), ENOENT);
    // Session A is untouched.
    assert_eq!(a.translate(ioas, 0x1000).unwrap().mem, m.id);
    assert_eq!(me(&mut a).objects, 2);
}

// ---------------------------------------------------------------------------
// Object ids and destroy
// ---------------------------------------------------------------------------

#[test]
fn object_ids_start_at_1_and_increase() {
    let env = Env::new("ids");
    let mut s = env.session();
    let m = memory(&mut s, PAGE);
    let a = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(a, 0).unwrap();
    assert_eq!((m.id, a, n), (1, 2, 3));
    assert_eq!(me(&mut s).objects, 3);
}

#[test]
fn destroy_id_zero_is_enoent() {
    let env = Env::new("destroy_zero");
    let mut s = env.session();
    s.ioas_alloc().unwrap();
    assert_errno!(s.destroy(0), ENOENT);
    assert_eq!(me(&mut s).objects, 1);
}

#[test]
fn destroy_unknown_id_is_enoent() {
    let env = Env::new("destroy_unknown");
    let mut s = env.session();
    assert_errno!(s.destroy(1), ENOENT);
    assert_errno!(s.destroy(u32::MAX), ENOENT);
}

#[test]
fn destroy_twice_is_enoent() {
    let env = Env::new("destroy_twice");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.destroy(ioas).unwrap();
    assert_errno!(s.destroy(ioas), ENOENT);
    assert_eq!(me(&mut s).objects, 0);
}

#[test]
fn destroy_mem_while_mapped_is_ebusy() {
    let (_env, mut s, m, ioas) = fixture("destroy_mem_busy", MIB);
    map_at(&mut s, ioas, m.id, 0, 0x4000, 0x10000);
    assert_eq!(mem_info(&mut s, m.id).mappings, 1);
    assert_errno!(s.destroy(m.id), EBUSY);
    assert_eq!(s.unmap(ioas, 0x10000, 0x4000).unwrap(), 0x4000);
    assert_eq!(mem_info(&mut s, m.id).mappings, 0);
    s.destroy(m.id).unwrap();
    assert!(me(&mut s).memory.is_empty());
}

#[test]
fn destroy_ioas_with_nested_child_is_ebusy() {
    let env = Env::new("destroy_parent_busy");
    let mut s = env.session();
    let parent = s.ioas_alloc().unwrap();
    let n1 = s.nested_alloc(parent, 0).unwrap();
    let n2 = s.nested_alloc(parent, 0x2000).unwrap();
    assert_eq!(ioas_info(&mut s, parent).children, 2);
    assert_errno!(s.destroy(parent), EBUSY);
    s.destroy(n1).unwrap();
    assert_errno!(s.destroy(parent), EBUSY);
    s.destroy(n2).unwrap();
    assert_eq!(ioas_info(&mut s, parent).children, 0);
    s.destroy(parent).unwrap();
    assert_eq!(me(&mut s).objects, 0);
}

#[test]
fn destroy_ioas_with_mappings_releases_memory_and_tables() {
    let (env, mut s, m, ioas) = fixture("destroy_ioas_mapped", MIB);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x1000);
    map_at(&mut s, ioas, m.id, 0, 2 * PAGE, 1 << 40);
    assert_eq!(mem_info(&mut s, m.id).mappings, 2);
    s.destroy(ioas).unwrap();
    assert_eq!(mem_info(&mut s, m.id).mappings, 0);
    assert_eq!(env.observer().status().unwrap().pool.tables_in_use, 0);
    s.destroy(m.id).unwrap();
}

#[test]
fn destroy_mem_returns_system_space() {
    let env = Env::new("destroy_mem_space");
    let mut s = env.session();
    let a = memory(&mut s, 2 * MIB);
    assert_eq!(a.system_address, sysaddr::BASE);
    s.destroy(a.id).unwrap();
    let b = memory(&mut s, 2 * MIB);
    assert_eq!(b.system_address, sysaddr::BASE, "the space of a destroyed object is reused");
    assert_ne!(a.id, b.id);
}

#[test]
fn objects_per_session_cap_is_enospc() {
    let env = Env::with("objects_cap", Limits { max_objects_per_session: 3, ..Limits::default() });
    let mut s = env.session();
    memory(&mut s, PAGE);
    let ioas = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(ioas, 0).unwrap();
    assert_errno!(s.ioas_alloc(), ENOSPC);
    assert_errno!(s.register_memory(memfd_of(PAGE)), ENOSPC);
    assert_errno!(s.nested_alloc(ioas, 0), ENOSPC);
    assert_eq!(me(&mut s).objects, 3);
    s.destroy(n).unwrap();
    s.ioas_alloc().unwrap();
    // The cap is per session.
    let mut other = env.session();
    other.ioas_alloc().unwrap();
}

// ---------------------------------------------------------------------------
// Memory objects
// ---------------------------------------------------------------------------

#[test]
fn register_memory_reports_size_seal_and_address() {
    let env = Env::new("register_ok");
    let mut s = env.session();
    let m = memory(&mut s, 0x10000);
    assert_eq!(m.id, 1);
    assert_eq!(m.size, 0x10000);
    assert!(m.sealed);
    assert!(m.seals.split(',').any(|x| x == "shrink"), "seals: {}", m.seals);
    assert_eq!(m.system_address, sysaddr::BASE);
    assert_eq!(m.mappings, 0);
    assert_eq!(mem_info(&mut s, m.id), m);
}

#[test]
fn register_memory_seals_against_shrink() {
    let env = Env::new("register_seals");
    let mut s = env.session();
    let f = memfd_of(0x4000);
    s.register_memory(&f).unwrap();
    assert!(f.set_len(0x1000).is_err(), "a registered memfd cannot shrink");
    assert_eq!(f.metadata().unwrap().len(), 0x4000);
}

#[test]
fn register_memory_plain_file_is_unsealed() {
    let env = Env::new("register_plain");
    let mut s = env.session();
    let p = env.dir.join("plain");
    let f = File::options().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    f.set_len(0x2000).unwrap();
    let m = s.register_memory(&f).unwrap();
    assert_eq!((m.size, m.sealed), (0x2000, false));
}

#[test]
fn register_memory_socket_fd_is_einval() {
    let env = Env::new("register_socket");
    let mut s = env.session();
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_errno!(s.register_memory(&a), EINVAL);
    assert!(me(&mut s).memory.is_empty());
}

#[test]
fn register_memory_pipe_is_einval() {
    let env = Env::new("register_pipe");
    let mut s = env.session();
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert_errno!(s.register_memory(&r), EINVAL);
}

#[test]
fn register_memory_directory_is_einval() {
    let env = Env::new("register_dir");
    let mut s = env.session();
    let d = File::open(&env.dir).unwrap();
    assert_errno!(s.register_memory(&d), EINVAL);
}

#[test]
fn register_memory_empty_file_is_einval() {
    let env = Env::new("register_empty");
    let mut s = env.session();
    assert_errno!(s.register_memory(memfd_of(0)), EINVAL);
    assert_eq!(me(&mut s).objects, 0);
}

#[test]
fn register_memory_unaligned_size_is_einval() {
    let env = Env::new("register_unaligned");
    let mut s = env.session();
    assert_errno!(s.register_memory(memfd_of(PAGE + 1)), EINVAL);
    assert_errno!(s.register_memory(memfd_of(100)), EINVAL);
}

#[test]
fn register_memory_too_large_is_e2big() {
    let env = Env::new("register_huge");
    let mut s = env.session();
    assert_errno!(s.register_memory(memfd_of(1 << 52)), E2BIG);
}

#[test]
fn register_memory_system_space_full_is_enospc() {
    // Without the per-session quota, which alone stops this at 4 TiB.
    let env = Env::with("register_space_full", Limits { max_memory_bytes_per_session: u64::MAX, ..Limits::default() });
    let mut s = env.session();
    // The largest object allowed: half the 52-bit system address space.
    let big = (1u64 << 51) - PAGE;
    let a = s.register_memory(memfd_of(big)).unwrap();
    assert_eq!(a.system_address % GIB, 0);
    assert_errno!(s.register_memory(memfd_of(big)), ENOSPC);
    assert_eq!(me(&mut s).objects, 1);
    s.destroy(a.id).unwrap();
    s.register_memory(memfd_of(big)).unwrap();
}

#[test]
fn register_memory_large_objects_are_aligned_for_large_leaves() {
    let env = Env::new("register_alignment");
    let mut s = env.session();
    let small = memory(&mut s, PAGE);
    let mid = memory(&mut s, 2 * MIB);
    let big = memory(&mut s, GIB);
    assert_eq!(small.system_address % PAGE, 0);
    assert_eq!(mid.system_address % (2 * MIB), 0);
    assert_eq!(big.system_address % GIB, 0);
    // No two objects overlap.
    let mut spans = [(small.system_address, PAGE), (mid.system_address, 2 * MIB), (big.system_address, GIB)];
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "{spans:x?}");
    }
}

// ---------------------------------------------------------------------------
// IOAS allocation and IOVA ranges
// ---------------------------------------------------------------------------

#[test]
fn ioas_alloc_starts_empty() {
    let env = Env::new("ioas_empty");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    let i = ioas_info(&mut s, ioas);
    assert_eq!(i.kind, IoasKind::Paging);
    assert!(i.mappings.is_empty() && i.allowed.is_empty() && i.reserved.is_empty());
    assert_eq!(i.iova_ranges, vec![range(0, MAX_IOVA)]);
    assert!(!i.dirty_tracking);
    assert_ne!(i.root, 0);
    assert_eq!((i.tables, i.children), (1, 0));
    assert_eq!(i.stats, IoasStats::default());
}

#[test]
fn ioas_alloc_pool_exhausted_is_enomem() {
    // Three pages: page 0 is never used, so two tables.
    let env = Env::with("ioas_pool_full", Limits { table_pool_bytes: 3 * PAGE, ..Limits::default() });
    let mut s = env.session();
    s.ioas_alloc().unwrap();
    s.ioas_alloc().unwrap();
    assert_errno!(s.ioas_alloc(), ENOMEM);
    let st = s.status().unwrap();
    assert_eq!(st.sessions[0].objects, 2);
    assert_eq!((st.pool.tables_in_use, st.pool.capacity), (2, 2));
}

#[test]
fn iova_ranges_empty_ioas_is_full_aperture() {
    let env = Env::new("ranges_full");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    let r = s.iova_ranges(ioas).unwrap();
    assert_eq!(r, IovaRanges { alignment: PAGE, ranges: vec![range(0, (1 << 48) - 1)] });
}

#[test]
fn iova_ranges_exclude_reserved() {
    let env = Env::new("ranges_reserved");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.add_reserved(ioas, 0x100000, 0x1fffff).unwrap();
    s.add_reserved(ioas, 0x10000, 0x1ffff).unwrap();
    let want = vec![range(0, 0xffff), range(0x20000, 0xfffff), range(0x200000, MAX_IOVA)];
    assert_eq!(s.iova_ranges(ioas).unwrap().ranges, want);
    let i = ioas_info(&mut s, ioas);
    assert_eq!(i.iova_ranges, want);
    assert_eq!(i.reserved, vec![range(0x100000, 0x1fffff), range(0x10000, 0x1ffff)]);
}

#[test]
fn iova_ranges_merge_overlapping_and_adjacent_reserved() {
    let env = Env::new("ranges_merge");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.add_reserved(ioas, 0x1000, 0x4fff).unwrap();
    s.add_reserved(ioas, 0x3000, 0x8fff).unwrap();
    s.add_reserved(ioas, 0x9000, 0x9fff).unwrap();
    s.add_reserved(ioas, 0x2000, 0x2fff).unwrap();
    assert_eq!(s.iova_ranges(ioas).unwrap().ranges, vec![range(0, 0xfff), range(0xa000, MAX_IOVA)]);
}

#[test]
fn iova_ranges_reserved_at_both_ends() {
    let env = Env::new("ranges_ends");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.add_reserved(ioas, 0, 0xfff).unwrap();
    s.add_reserved(ioas, MAX_IOVA - 0xfff, MAX_IOVA).unwrap();
    assert_eq!(s.iova_ranges(ioas).unwrap().ranges, vec![range(0x1000, MAX_IOVA - 0x1000)]);
    // Reserving everything leaves nothing usable.
    s.add_reserved(ioas, 0, MAX_IOVA).unwrap();
    assert_eq!(s.iova_ranges(ioas).unwrap().ranges, vec![]);
}

#[test]
fn iova_ranges_stay_inside_aperture_with_reserved_beyond_it() {
    let env = Env::new("ranges_beyond");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.add_reserved(ioas, 1 << 50, (1 << 50) + 0xfff).unwrap();
    assert_eq!(s.iova_ranges(ioas).unwrap().ranges, vec![range(0, MAX_IOVA)]);
}

#[test]
fn range_ops_wrong_type_is_enoent() {
    let env = Env::new("ranges_wrong_type");
    let mut s = env.session();
    let m = memory(&mut s, PAGE);
    let ioas = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(ioas, 0).unwrap();
    for id in [0, m.id, n, 99] {
        assert_errno!(s.iova_ranges(id), ENOENT);
        assert_errno!(s.allow_iovas(id, vec![range(0x1000, 0x1fff)]), ENOENT);
        assert_errno!(s.add_reserved(id, 0x1000, 0x1fff), ENOENT);
    }
}

// ---------------------------------------------------------------------------
// Allowed and reserved ranges
// ---------------------------------------------------------------------------

#[test]
fn allow_iovas_replaces_and_empty_clears() {
    let env = Env::new("allow_replace");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.allow_iovas(ioas, vec![range(0x30000, 0x3ffff), range(0x10000, 0x1ffff)]).unwrap();
    assert_eq!(ioas_info(&mut s, ioas).allowed, vec![range(0x10000, 0x1ffff), range(0x30000, 0x3ffff)]);
    // Allowed ranges steer automatic IOVA only; the usable ranges stay whole.
    assert_eq!(s.iova_ranges(ioas).unwrap().ranges, vec![range(0, MAX_IOVA)]);
    s.allow_iovas(ioas, vec![range(0x50000, 0x5ffff)]).unwrap();
    assert_eq!(ioas_info(&mut s, ioas).allowed, vec![range(0x50000, 0x5ffff)]);
    s.allow_iovas(ioas, vec![]).unwrap();
    assert!(ioas_info(&mut s, ioas).allowed.is_empty());
}

#[test]
fn allow_iovas_over_reserved_is_eaddrinuse() {
    let env = Env::new("allow_over_reserved");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.add_reserved(ioas, 0x10000, 0x1ffff).unwrap();
    s.allow_iovas(ioas, vec![range(0x40000, 0x4ffff)]).unwrap();
    assert_errno!(s.allow_iovas(ioas, vec![range(0x1000, 0x10000)]), EADDRINUSE);
    assert_errno!(s.allow_iovas(ioas, vec![range(0x30000, 0x3ffff), range(0x1f000, 0x1ffff)]), EADDRINUSE);
    // A refused list leaves the old one in place.
    assert_eq!(ioas_info(&mut s, ioas).allowed, vec![range(0x40000, 0x4ffff)]);
    s.allow_iovas(ioas, vec![range(0x20000, 0x2ffff), range(0, 0xffff)]).unwrap();
}

#[test]
fn allow_iovas_empty_or_reversed_range_is_einval() {
    let env = Env::new("allow_reversed");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    assert_errno!(s.allow_iovas(ioas, vec![range(0x2000, 0x2000)]), EINVAL);
    assert_errno!(s.allow_iovas(ioas, vec![range(0x3000, 0x2fff)]), EINVAL);
    assert_errno!(s.allow_iovas(ioas, vec![range(0x1000, 0x1fff), range(u64::MAX, 0)]), EINVAL);
    assert!(ioas_info(&mut s, ioas).allowed.is_empty());
}

#[test]
fn allow_iovas_overlapping_is_einval() {
    let env = Env::new("allow_overlap");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    assert_errno!(s.allow_iovas(ioas, vec![range(0x1000, 0x2fff), range(0x2000, 0x3fff)]), EINVAL);
    assert_errno!(s.allow_iovas(ioas, vec![range(0x8000, 0x8fff), range(0x1000, 0x9fff)]), EINVAL);
    // Touching is not overlapping.
    s.allow_iovas(ioas, vec![range(0x1000, 0x1fff), range(0x2000, 0x2fff)]).unwrap();
}

#[test]
fn allow_iovas_too_many_ranges_is_e2big() {
    let env = Env::with("allow_too_many", Limits { max_ranges_per_ioas: 2, ..Limits::default() });
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    let three = vec![range(0x1000, 0x1fff), range(0x3000, 0x3fff), range(0x5000, 0x5fff)];
    assert_errno!(s.allow_iovas(ioas, three), E2BIG);
    s.allow_iovas(ioas, vec![range(0x1000, 0x1fff), range(0x3000, 0x3fff)]).unwrap();
}

#[test]
fn reserved_ranges_cap_is_enospc() {
    let env = Env::with("reserved_cap", Limits { max_ranges_per_ioas: 2, ..Limits::default() });
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.add_reserved(ioas, 0x1000, 0x1fff).unwrap();
    s.add_reserved(ioas, 0x3000, 0x3fff).unwrap();
    assert_errno!(s.add_reserved(ioas, 0x5000, 0x5fff), ENOSPC);
    assert_eq!(ioas_info(&mut s, ioas).reserved.len(), 2);
    // The cap is per IOAS.
    let other = s.ioas_alloc().unwrap();
    s.add_reserved(other, 0x5000, 0x5fff).unwrap();
}

#[test]
fn reserve_reversed_range_is_einval() {
    let env = Env::new("reserve_reversed");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    assert_errno!(s.add_reserved(ioas, 0x2000, 0x1fff), EINVAL);
    assert!(ioas_info(&mut s, ioas).reserved.is_empty());
}

#[test]
fn reserve_over_mapping_is_eaddrinuse() {
    let (_env, mut s, m, ioas) = fixture("reserve_over_map", MIB);
    map_at(&mut s, ioas, m.id, 0, 0x4000, 0x10000);
    assert_errno!(s.add_reserved(ioas, 0x13000, 0x13fff), EADDRINUSE);
    assert_errno!(s.add_reserved(ioas, 0, 0x10000), EADDRINUSE);
    assert_errno!(s.add_reserved(ioas, 0x13fff, 0x20000), EADDRINUSE);
    assert_errno!(s.add_reserved(ioas, 0, MAX_IOVA), EADDRINUSE);
    assert!(ioas_info(&mut s, ioas).reserved.is_empty());
    s.add_reserved(ioas, 0x14000, 0x1ffff).unwrap();
    s.add_reserved(ioas, 0, 0xffff).unwrap();
    assert_eq!(ioas_info(&mut s, ioas).reserved, vec![range(0x14000, 0x1ffff), range(0, 0xffff)]);
}

#[test]
fn reserve_over_allowed_is_eaddrinuse() {
    let env = Env::new("reserve_over_allowed");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    s.allow_iovas(ioas, vec![range(0x10000, 0x1ffff)]).unwrap();
    assert_errno!(s.add_reserved(ioas, 0x1f000, 0x2ffff), EADDRINUSE);
    assert_errno!(s.add_reserved(ioas, 0, 0x10000), EADDRINUSE);
    s.add_reserved(ioas, 0x20000, 0x2ffff).unwrap();
    assert_eq!(ioas_info(&mut s, ioas).reserved, vec![range(0x20000, 0x2ffff)]);
}

// ---------------------------------------------------------------------------
// Map
// ---------------------------------------------------------------------------

#[test]
fn map_fixed_returns_iova_and_status_records_area() {
    let (_env, mut s, m, ioas) = fixture("map_fixed", MIB);
    let a = MapArgs { ioas, mem: m.id, offset: 0x1000, length: 0x2000, iova: Some(0x100000), perm: Perm::R };
    assert_eq!(s.map(a).unwrap(), 0x100000);
    let i = ioas_info(&mut s, ioas);
    assert_eq!(
        i.mappings,
        vec![MappingInfo { iova: 0x100000, length: 0x2000, mem: m.id, offset: 0x1000, perm: Perm::R }]
    );
    assert_eq!(i.stats, IoasStats { maps: 1, unmaps: 0, mapped_bytes: 0x2000, invalidations: 0 });
    assert_eq!(mem_info(&mut s, m.id).mappings, 1);
}

#[test]
fn map_zero_length_is_einval() {
    let (_env, mut s, m, ioas) = fixture("map_zero_len", MIB);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0, None)), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0, Some(0x1000))), EINVAL);
    assert!(mappings(&mut s, ioas).is_empty());
}

#[test]
fn map_empty_perm_is_einval() {
    let (_env, mut s, m, ioas) = fixture("map_no_perm", MIB);
    let a = MapArgs { perm: Perm::default(), ..margs(ioas, m.id, 0, PAGE, Some(0x1000)) };
    assert_errno!(s.map(a), EINVAL);
    assert!(mappings(&mut s, ioas).is_empty());
}

#[test]
fn map_unaligned_length_is_einval() {
    let (_env, mut s, m, ioas) = fixture("map_unaligned_len", MIB);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0x1800, None)), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0, 1, Some(0x1000))), EINVAL);
}

#[test]
fn map_unaligned_offset_is_einval() {
    let (_env, mut s, m, ioas) = fixture("map_unaligned_off", MIB);
    assert_errno!(s.map(margs(ioas, m.id, 0x800, PAGE, None)), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 1, PAGE, Some(0x1000))), EINVAL);
}

#[test]
fn map_unaligned_fixed_iova_is_einval() {
    let (_env, mut s, m, ioas) = fixture("map_unaligned_iova", MIB);
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, Some(0x1800))), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, Some(1))), EINVAL);
    assert!(mappings(&mut s, ioas).is_empty());
}

#[test]
fn map_offset_overflow_is_eoverflow() {
    let (_env, mut s, m, ioas) = fixture("map_off_overflow", MIB);
    assert_errno!(s.map(margs(ioas, m.id, TOP_PAGE, 0x2000, None)), EOVERFLOW);
}

#[test]
fn map_fixed_iova_overflow_is_eoverflow() {
    let (_env, mut s, m, ioas) = fixture("map_iova_overflow", MIB);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0x2000, Some(TOP_PAGE))), EOVERFLOW);
}

#[test]
fn map_beyond_memory_object_is_einval() {
    let (_env, mut s, m, ioas) = fixture("map_beyond_mem", 0x10000);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0x11000, None)), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0x10000, PAGE, None)), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0xf000, 0x2000, Some(0x1000))), EINVAL);
    assert!(mappings(&mut s, ioas).is_empty());
    // The last page and the whole object are fine.
    map_at(&mut s, ioas, m.id, 0xf000, PAGE, 0x1000);
    map_at(&mut s, ioas, m.id, 0, 0x10000, 0x10000);
}

#[test]
fn map_fixed_overlap_is_eexist() {
    let (_env, mut s, m, ioas) = fixture("map_overlap", MIB);
    map_at(&mut s, ioas, m.id, 0, 0x4000, 0x10000);
    for (iova, len) in [(0x10000, 0x4000), (0xf000, 0x2000), (0x13000, 0x2000), (0x11000, PAGE), (0x8000, 0x10000)] {
        assert_errno!(s.map(margs(ioas, m.id, 0, len, Some(iova))), EEXIST);
    }
    assert_eq!(mappings(&mut s, ioas).len(), 1);
}

#[test]
fn map_adjacent_fixed_succeeds() {
    let (_env, mut s, m, ioas) = fixture("map_adjacent", MIB);
    map_at(&mut s, ioas, m.id, 0, 0x4000, 0x10000);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0xf000);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x14000);
    let iovas: Vec<(u64, u64)> = mappings(&mut s, ioas).iter().map(|a| (a.iova, a.length)).collect();
    assert_eq!(iovas, vec![(0xf000, PAGE), (0x10000, 0x4000), (0x14000, PAGE)]);
}

#[test]
fn map_into_reserved_is_einval() {
    let (_env, mut s, m, ioas) = fixture("map_reserved", MIB);
    s.add_reserved(ioas, 0x10000, 0x1ffff).unwrap();
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, Some(0x10000))), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0x2000, Some(0x1f000))), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0x2000, Some(0xf000))), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0x20000, Some(0x8000))), EINVAL);
    assert!(mappings(&mut s, ioas).is_empty());
    map_at(&mut s, ioas, m.id, 0, PAGE, 0xf000);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x20000);
}

#[test]
fn map_past_48bit_aperture_is_einval() {
    let (_env, mut s, m, ioas) = fixture("map_aperture", MIB);
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, Some(1 << 48))), EINVAL);
    assert_errno!(s.map(margs(ioas, m.id, 0, 0x2000, Some((1 << 48) - PAGE))), EINVAL);
    // The very last page is usable.
    map_at(&mut s, ioas, m.id, 0, PAGE, (1 << 48) - PAGE);
    assert_eq!(s.translate(ioas, MAX_IOVA).unwrap().offset, PAGE - 1);
}

#[test]
fn map_fixed_iova_zero_is_allowed() {
    let (_env, mut s, m, ioas) = fixture("map_iova_zero", MIB);
    map_at(&mut s, ioas, m.id, 0x3000, PAGE, 0);
    let t = s.translate(ioas, 0x10).unwrap();
    assert_eq!((t.offset, t.system_address), (0x3010, m.system_address + 0x3010));
}

#[test]
fn map_fixed_outside_allowed_succeeds() {
    let (_env, mut s, m, ioas) = fixture("map_outside_allowed", MIB);
    s.allow_iovas(ioas, vec![range(0x1000_0000, 0x1fff_ffff)]).unwrap();
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x10000);
    assert_eq!(mappings(&mut s, ioas)[0].iova, 0x10000);
}

#[test]
fn map_wrong_object_type_is_enoent() {
    let (_env, mut s, m, ioas) = fixture("map_wrong_type", MIB);
    let n = s.nested_alloc(ioas, 0).unwrap();
    assert_errno!(s.map(margs(ioas, ioas, 0, PAGE, None)), ENOENT);
    assert_errno!(s.map(margs(ioas, n, 0, PAGE, None)), ENOENT);
    assert_errno!(s.map(margs(ioas, 99, 0, PAGE, None)), ENOENT);
    assert_errno!(s.map(margs(m.id, m.id, 0, PAGE, None)), ENOENT);
    assert_errno!(s.map(margs(n, m.id, 0, PAGE, None)), ENOENT);
    assert_errno!(s.map(margs(99, m.id, 0, PAGE, None)), ENOENT);
    assert_errno!(s.map(margs(0, m.id, 0, PAGE, None)), ENOENT);
    assert_eq!(mem_info(&mut s, m.id).mappings, 0);
}

#[test]
fn map_same_memory_twice_counts_refs() {
    let (_env, mut s, m, ioas) = fixture("map_refs", MIB);
    let other = s.ioas_alloc().unwrap();
    map_at(&mut s, ioas, m.id, 0, 0x2000, 0x10000);
    map_at(&mut s, other, m.id, 0x1000, 0x2000, 0x10000);
    assert_eq!(mem_info(&mut s, m.id).mappings, 2);
    s.unmap(ioas, 0, u64::MAX).unwrap();
    assert_eq!(mem_info(&mut s, m.id).mappings, 1);
    assert_errno!(s.destroy(m.id), EBUSY);
    s.unmap(other, 0x10000, 0x2000).unwrap();
    s.destroy(m.id).unwrap();
}

#[test]
fn map_write_only_perm_is_kept() {
    let (_env, mut s, m, ioas) = fixture("map_write_only", MIB);
    let a = MapArgs { perm: Perm::W, ..margs(ioas, m.id, 0, PAGE, Some(0x1000)) };
    s.map(a).unwrap();
    assert_eq!(s.translate(ioas, 0x1000).unwrap().perm, Perm::W);
    assert_eq!(mappings(&mut s, ioas)[0].perm, Perm::W);
}

#[test]
fn mappings_per_ioas_cap_is_enospc() {
    let env = Env::with("mappings_cap", Limits { max_mappings_per_ioas: 2, ..Limits::default() });
    let mut s = env.session();
    let m = memory(&mut s, MIB);
    let ioas = s.ioas_alloc().unwrap();
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x1000);
    s.map(margs(ioas, m.id, 0, PAGE, None)).unwrap();
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, None)), ENOSPC);
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, Some(0x100000))), ENOSPC);
    assert_eq!(mappings(&mut s, ioas).len(), 2);
    // The cap is per IOAS, and an unmap makes room.
    let other = s.ioas_alloc().unwrap();
    map_at(&mut s, other, m.id, 0, PAGE, 0x1000);
    s.unmap(ioas, 0x1000, PAGE).unwrap();
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x100000);
}

#[test]
fn map_table_pool_exhausted_is_enomem_and_rolls_back() {
    // Five pages: page 0 unused, so four tables = root + L3 + L2 + L1.
    let env = Env::with("map_pool_full", Limits { table_pool_bytes: 5 * PAGE, ..Limits::default() });
    let mut s = env.session();
    let m = memory(&mut s, MIB);
    let ioas = s.ioas_alloc().unwrap();
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x1000);
    // Another root slot needs three new tables.
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, Some(1 << 40))), ENOMEM);
    let st = s.status().unwrap();
    assert_eq!(st.pool.tables_in_use, 4);
    assert_eq!(st.sessions[0].ioas[0].mappings.len(), 1);
    assert_eq!(st.sessions[0].ioas[0].stats.mapped_bytes, PAGE);
    assert_eq!(mem_info(&mut s, m.id).mappings, 1);
    assert_errno!(s.translate(ioas, 1 << 40), ENOENT);
    // A page that fits in the existing tables still maps.
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x2000);
}

// ---------------------------------------------------------------------------
// Automatic IOVA
// ---------------------------------------------------------------------------

#[test]
fn auto_iova_never_zero_and_aligned() {
    let (_env, mut s, m, ioas) = fixture("auto_aligned", 4 * MIB);
    assert_eq!(m.system_address % (4 * MIB), 0);
    let mut taken: Vec<(u64, u64)> = Vec::new();
    for len in [PAGE, 0x3000, 0x10000, 2 * MIB, 4 * MIB, PAGE] {
        let iova = s.map(margs(ioas, m.id, 0, len, None)).unwrap();
        assert_ne!(iova, 0);
        assert_eq!(iova % len.next_power_of_two(), 0, "len {len:#x} got {iova:#x}");
        for (a, l) in &taken {
            assert!(iova + len <= *a || a + l <= iova, "{iova:#x}+{len:#x} overlaps {a:#x}+{l:#x}");
        }
        taken.push((iova, len));
    }
    assert_eq!(taken[0].0, PAGE, "the first 4 KiB goes at the lowest non-zero IOVA");
}

#[test]
fn auto_iova_alignment_limited_by_memory_offset() {
    let (_env, mut s, m, ioas) = fixture("auto_offset", 4 * MIB);
    // The system address is only 64 KiB aligned, so a 1 MiB map is too.
    let iova = s.map(margs(ioas, m.id, 0x10000, MIB, None)).unwrap();
    assert_eq!(iova, 0x10000);
    let t = s.translate(ioas, iova).unwrap();
    assert_eq!((t.offset, t.system_address), (0x10000, m.system_address + 0x10000));
}

#[test]
fn auto_iova_skips_existing_mappings() {
    let (_env, mut s, m, ioas) = fixture("auto_skips_maps", MIB);
    map_at(&mut s, ioas, m.id, 0, 0x3000, 0x1000);
    let iova = s.map(margs(ioas, m.id, 0, PAGE, None)).unwrap();
    assert_eq!(iova, 0x4000);
}

#[test]
fn auto_iova_skips_reserved() {
    let (_env, mut s, m, ioas) = fixture("auto_skips_reserved", MIB);
    s.add_reserved(ioas, 0, 0xffff_ffff).unwrap();
    let iova = s.map(margs(ioas, m.id, 0, PAGE, None)).unwrap();
    assert_eq!(iova, 0x1_0000_0000);
}

#[test]
fn auto_iova_stays_in_allowed() {
    let (_env, mut s, m, ioas) = fixture("auto_allowed", MIB);
    let (lo, hi) = (0x4000_0000, 0x4000_ffff);
    s.allow_iovas(ioas, vec![range(lo, hi)]).unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        let iova = s.map(margs(ioas, m.id, 0, 0x4000, None)).unwrap();
        assert!(iova >= lo && iova + 0x4000 - 1 <= hi, "{iova:#x} outside the allowed range");
        got.push(iova);
    }
    got.sort();
    assert_eq!(got, vec![lo, lo + 0x4000, lo + 0x8000, lo + 0xc000]);
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, None)), ENOSPC);
}

#[test]
fn auto_iova_no_hole_is_enospc() {
    let (_env, mut s, m, ioas) = fixture("auto_no_hole", MIB);
    s.allow_iovas(ioas, vec![range(0x10000, 0x11fff)]).unwrap();
    assert_errno!(s.map(margs(ioas, m.id, 0, 0x4000, None)), ENOSPC);
    s.allow_iovas(ioas, vec![]).unwrap();
    s.add_reserved(ioas, 0, MAX_IOVA).unwrap();
    assert_errno!(s.map(margs(ioas, m.id, 0, PAGE, None)), ENOSPC);
    assert!(mappings(&mut s, ioas).is_empty());
}

#[test]
fn auto_iova_reuses_space_freed_by_unmap() {
    let (_env, mut s, m, ioas) = fixture("auto_reuse", MIB);
    s.allow_iovas(ioas, vec![range(0x10000, 0x11fff)]).unwrap();
    assert_eq!(s.map(margs(ioas, m.id, 0, PAGE, None)).unwrap(), 0x10000);
    assert_eq!(s.map(margs(ioas, m.id, 0, PAGE, None)).unwrap(), 0x11000);
    s.unmap(ioas, 0x10000, PAGE).unwrap();
    assert_eq!(s.map(margs(ioas, m.id, 0, PAGE, None)).unwrap(), 0x10000);
}

#[test]
fn auto_iova_2m_map_gets_2m_leaf() {
    let (_env, mut s, m, ioas) = fixture("auto_2m", 4 * MIB);
    let iova = s.map(margs(ioas, m.id, 2 * MIB, 2 * MIB, None)).unwrap();
    assert_ne!(iova, 0);
    assert_eq!(iova % (2 * MIB), 0);
    let t = s.translate(ioas, iova + 0x1234).unwrap();
    assert_eq!((t.page_size, t.offset), (2 * MIB, 2 * MIB + 0x1234));
}

#[test]
fn auto_iova_1g_map_gets_1g_leaf() {
    let (_env, mut s, m, ioas) = fixture("auto_1g", GIB);
    let iova = s.map(margs(ioas, m.id, 0, GIB, None)).unwrap();
    assert_eq!(iova, GIB, "the lowest non-zero 1 GiB aligned IOVA");
    let t = s.translate(ioas, iova + 0x1234_5678).unwrap();
    assert_eq!((t.page_size, t.offset), (GIB, 0x1234_5678));
}

// ---------------------------------------------------------------------------
// Unmap
// ---------------------------------------------------------------------------

#[test]
fn unmap_returns_bytes() {
    let (_env, mut s, m, ioas) = fixture("unmap_bytes", MIB);
    map_at(&mut s, ioas, m.id, 0, 0x3000, 0x10000);
    assert_eq!(s.unmap(ioas, 0x10000, 0x3000).unwrap(), 0x3000);
    let i = ioas_info(&mut s, ioas);
    assert!(i.mappings.is_empty());
    assert_eq!(i.stats, IoasStats { maps: 1, unmaps: 1, mapped_bytes: 0, invalidations: 0 });
    assert_errno!(s.translate(ioas, 0x10000), ENOENT);
    assert_eq!(mem_info(&mut s, m.id).mappings, 0);
}

#[test]
fn unmap_partial_is_enoent() {
    let (_env, mut s, m, ioas) = fixture("unmap_partial", MIB);
    map_at(&mut s, ioas, m.id, 0, 0x4000, 0x10000);
    for (iova, len) in [(0x10000, PAGE), (0x11000, PAGE), (0x13000, PAGE), (0xf000, 0x2000), (0x13000, 0x10000)] {
        assert_errno!(s.unmap(ioas, iova, len), ENOENT);
    }
    assert_eq!(mappings(&mut s, ioas).len(), 1);
    assert_eq!(s.translate(ioas, 0x13fff).unwrap().offset, 0x3fff);
}

#[test]
fn unmap_partial_cover_of_several_is_atomic() {
    let (_env, mut s, m, ioas) = fixture("unmap_atomic", MIB);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x10000);
    map_at(&mut s, ioas, m.id, 0, 0x4000, 0x20000);
    // Covers the first area and only half of the second.
    assert_errno!(s.unmap(ioas, 0x10000, 0x12000), ENOENT);
    assert_eq!(mappings(&mut s, ioas).len(), 2, "nothing was unmapped");
    assert!(s.translate(ioas, 0x10000).is_ok());
}

#[test]
fn unmap_superset_of_several_areas() {
    let (_env, mut s, m, ioas) = fixture("unmap_superset", MIB);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x10000);
    map_at(&mut s, ioas, m.id, 0, 0x2000, 0x20000);
    map_at(&mut s, ioas, m.id, 0, 0x4000, 0x40000);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x200000);
    assert_eq!(s.unmap(ioas, 0x8000, 0x100000).unwrap(), 0x7000);
    let left: Vec<u64> = mappings(&mut s, ioas).iter().map(|a| a.iova).collect();
    assert_eq!(left, vec![0x200000]);
    assert_eq!(ioas_info(&mut s, ioas).stats.unmaps, 3);
}

fn entry(mem: u32, offset: u64, length: u64, iova: Option<u64>) -> MapEntry {
    MapEntry { mem, offset, length, iova, perm: Perm::RW }
}

#[test]
fn map_batch_maps_every_entry_in_order() {
    let (_env, mut s, m, ioas) = fixture("map_batch", MIB);
    let entries: Vec<MapEntry> = (0..100).map(|i| entry(m.id, i * PAGE, PAGE, Some(0x100000 + i * PAGE))).collect();
    let iovas = s.map_batch(ioas, &entries).unwrap();
    assert_eq!(iovas, (0..100).map(|i| 0x100000 + i * PAGE).collect::<Vec<_>>());
    // Automatic IOVAs are chosen after the entries before them.
    let auto = s.map_batch(ioas, &[entry(m.id, 0, PAGE, None), entry(m.id, PAGE, PAGE, None)]).unwrap();
    assert_ne!(auto[0], auto[1]);
    for (i, iova) in iovas.iter().enumerate() {
        assert_eq!(s.translate(ioas, iova + 5).unwrap().offset, i as u64 * PAGE + 5);
    }
    let st = ioas_info(&mut s, ioas).stats;
    assert_eq!((st.maps, st.mapped_bytes), (102, 102 * PAGE));
    assert_eq!(mem_info(&mut s, m.id).mappings, 102);
    let ranges: Vec<UnmapEntry> = iovas.iter().map(|&iova| UnmapEntry { iova, length: PAGE }).collect();
    assert_eq!(s.unmap_batch(ioas, &ranges).unwrap(), 100 * PAGE);
    assert_eq!(mappings(&mut s, ioas).len(), 2);
    assert_eq!(ioas_info(&mut s, ioas).stats.unmaps, 100);
}

#[test]
fn map_batch_is_all_or_nothing() {
    let (_env, mut s, m, ioas) = fixture("map_batch_atomic", MIB);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x200000);
    let before = ioas_info(&mut s, ioas);
    // The third entry overlaps the existing mapping: nothing is mapped.
    let entries = [
        entry(m.id, 0, 0x10000, Some(0x100000)),
        entry(m.id, 0, PAGE, None),
        entry(m.id, 0, PAGE, Some(0x200000)),
        entry(m.id, 0, PAGE, Some(0x300000)),
    ];
    let e = s.map_batch(ioas, &entries).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EEXIST));
    assert!(e.to_string().contains("entry 2"), "{e}");
    assert_eq!(mappings(&mut s, ioas).iter().map(|a| a.iova).collect::<Vec<_>>(), vec![0x200000]);
    let after = ioas_info(&mut s, ioas);
    assert_eq!((after.stats, after.tables), (before.stats, before.tables));
    assert_eq!(mem_info(&mut s, m.id).mappings, 1);
    assert!(s.translate(ioas, 0x100000).is_err());
    // An automatic IOVA goes where it would have gone before the failure.
    let iova = s.map(margs(ioas, m.id, 0, PAGE, None)).unwrap();
    assert_eq!(iova, 0x201000);
    // A bad entry of any kind names itself.
    assert_errno!(s.map_batch(ioas, &[entry(m.id, 0, PAGE, Some(0x400000)), entry(m.id, 0, 0, None)]), EINVAL);
    assert_errno!(s.map_batch(ioas, &[entry(m.id, 0, PAGE, Some(0x400000)), entry(999, 0, PAGE, None)]), ENOENT);
    assert_eq!(mappings(&mut s, ioas).len(), 2);
}

#[test]
fn batches_have_a_hard_cap() {
    let (_env, mut s, m, ioas) = fixture("batch_cap", 64 * MIB);
    let n = iommu_core::model::BATCH_ENTRIES as u64;
    let over: Vec<MapEntry> = (0..=n).map(|i| entry(m.id, 0, PAGE, Some((i + 1) * PAGE))).collect();
    assert_errno!(s.map_batch(ioas, &over), E2BIG);
    assert!(mappings(&mut s, ioas).is_empty());
    // The cap itself is fine.
    s.map_batch(ioas, &over[..n as usize]).unwrap();
    let ranges: Vec<UnmapEntry> = (0..=n).map(|i| UnmapEntry { iova: (i + 1) * PAGE, length: PAGE }).collect();
    assert_errno!(s.unmap_batch(ioas, &ranges), E2BIG);
    // More leaves than a batch may write: 300 MiB in 4 KiB leaves.
    let io2 = s.ioas_alloc().unwrap();
    let big: Vec<MapEntry> = (1..=5).map(|i| entry(m.id, PAGE, 60 * MIB, Some(i << 30))).collect();
    assert_errno!(s.map_batch(io2, &big), E2BIG);
    assert!(mappings(&mut s, io2).is_empty());
}

#[test]
fn unmap_batch_is_all_or_nothing() {
    let (_env, mut s, m, ioas) = fixture("unmap_batch_atomic", MIB);
    for i in 0..4 {
        map_at(&mut s, ioas, m.id, 0, 0x2000, 0x100000 * (i + 1));
    }
    let r = |iova, length| UnmapEntry { iova, length };
    // The third range covers half a mapping: nothing is unmapped.
    assert_errno!(s.unmap_batch(ioas, &[r(0x100000, 0x2000), r(0x200000, 0x2000), r(0x300000, PAGE)]), ENOENT);
    // Two ranges naming the same mapping.
    assert_errno!(s.unmap_batch(ioas, &[r(0x100000, 0x2000), r(0xff000, 0x10000)]), EINVAL);
    assert_eq!(mappings(&mut s, ioas).len(), 4);
    assert_eq!(s.unmap_batch(ioas, &[r(0x400000, 0x2000), r(0x100000, 0x2000)]).unwrap(), 0x4000);
    let left: Vec<u64> = mappings(&mut s, ioas).iter().map(|a| a.iova).collect();
    assert_eq!(left, vec![0x200000, 0x300000]);
}

#[test]
fn unmap_nothing_mapped_is_enoent() {
    let (_env, mut s, m, ioas) = fixture("unmap_nothing", MIB);
    assert_errno!(s.unmap(ioas, 0x10000, PAGE), ENOENT);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x10000);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x20000);
    // A gap between two areas.
    assert_errno!(s.unmap(ioas, 0x11000, 0xf000), ENOENT);
    assert_eq!(mappings(&mut s, ioas).len(), 2);
}

#[test]
fn unmap_zero_length_is_einval() {
    let (_env, mut s, m, ioas) = fixture("unmap_zero", MIB);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x10000);
    assert_errno!(s.unmap(ioas, 0x10000, 0), EINVAL);
    assert_errno!(s.unmap(ioas, 0, 0), EINVAL);
    assert_eq!(mappings(&mut s, ioas).len(), 1);
}

#[test]
fn unmap_overflow_is_eoverflow() {
    let (_env, mut s, _m, ioas) = fixture("unmap_overflow", MIB);
    assert_errno!(s.unmap(ioas, PAGE, u64::MAX), EOVERFLOW);
    assert_errno!(s.unmap(ioas, TOP_PAGE, 0x2000), EOVERFLOW);
}

#[test]
fn unmap_all_on_empty_succeeds_with_zero() {
    let (_env, mut s, _m, ioas) = fixture("unmap_all_empty", MIB);
    assert_eq!(s.unmap(ioas, 0, u64::MAX).unwrap(), 0);
    assert_eq!(ioas_info(&mut s, ioas).stats.unmaps, 0);
}

#[test]
fn unmap_all_returns_total_bytes() {
    let (_env, mut s, m, ioas) = fixture("unmap_all", 4 * MIB);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0);
    map_at(&mut s, ioas, m.id, 0, 2 * MIB, 0x200000);
    map_at(&mut s, ioas, m.id, 0, 0x3000, (1 << 48) - 0x3000);
    assert_eq!(s.unmap(ioas, 0, u64::MAX).unwrap(), PAGE + 2 * MIB + 0x3000);
    let i = ioas_info(&mut s, ioas);
    assert!(i.mappings.is_empty());
    assert_eq!((i.stats.unmaps, i.stats.mapped_bytes, i.tables), (3, 0, 1));
}

#[test]
fn unmap_frees_page_tables() {
    let (env, mut s, m, ioas) = fixture("unmap_tables", MIB);
    let mut o = env.observer();
    assert_eq!(o.status().unwrap().pool.tables_in_use, 1);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x1000);
    assert_eq!(ioas_info(&mut s, ioas).tables, 4);
    assert_eq!(o.status().unwrap().pool.tables_in_use, 4);
    s.unmap(ioas, 0x1000, PAGE).unwrap();
    assert_eq!(ioas_info(&mut s, ioas).tables, 1);
    assert_eq!(o.status().unwrap().pool.tables_in_use, 1);
}

#[test]
fn unmap_wrong_type_is_enoent() {
    let (_env, mut s, m, ioas) = fixture("unmap_wrong_type", MIB);
    let n = s.nested_alloc(ioas, 0).unwrap();
    assert_errno!(s.unmap(m.id, 0, u64::MAX), ENOENT);
    assert_errno!(s.unmap(n, 0, u64::MAX), ENOENT);
    assert_errno!(s.unmap(0, 0, u64::MAX), ENOENT);
}

// ---------------------------------------------------------------------------
// Copy
// ---------------------------------------------------------------------------

#[test]
fn copy_whole_area_to_fixed_iova() {
    let (_env, mut s, m, src) = fixture("copy_whole", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0x4000, 0x4000, 0x10000);
    assert_eq!(s.copy(cargs(dst, src, 0x10000, 0x4000, Some(0x80000))).unwrap(), 0x80000);
    let want = MappingInfo { iova: 0x80000, length: 0x4000, mem: m.id, offset: 0x4000, perm: Perm::RW };
    assert_eq!(mappings(&mut s, dst), vec![want]);
    assert_eq!(s.translate(dst, 0x81234).unwrap(), s.translate(src, 0x11234).unwrap());
    assert_eq!(mem_info(&mut s, m.id).mappings, 2);
    assert_eq!(ioas_info(&mut s, dst).stats.mapped_bytes, 0x4000);
}

#[test]
fn copy_partial_area_works() {
    // copy_sweep: every sub-range of an 8-page area.
    let (_env, mut s, m, src) = fixture("copy_sweep", MIB);
    let dst = s.ioas_alloc().unwrap();
    let (base, off, pages) = (0x100000u64, 0x4000u64, 8u64);
    map_at(&mut s, src, m.id, off, pages * PAGE, base);
    let to = 0x500000;
    for start in 0..pages {
        for n in 1..=pages - start {
            let iova = s.copy(cargs(dst, src, base + start * PAGE, n * PAGE, Some(to))).unwrap();
            assert_eq!(iova, to);
            for k in 0..n {
                let t = s.translate(dst, to + k * PAGE).unwrap();
                assert_eq!(t.offset, off + (start + k) * PAGE, "start {start} n {n} k {k}");
            }
            assert_errno!(s.translate(dst, to + n * PAGE), ENOENT);
            assert_eq!(s.unmap(dst, to, n * PAGE).unwrap(), n * PAGE);
        }
    }
    assert_eq!(mappings(&mut s, src).len(), 1, "the source is untouched");
    assert_eq!(mem_info(&mut s, m.id).mappings, 1);
}

#[test]
fn copy_spanning_adjacent_areas_makes_two_mappings() {
    let (_env, mut s, m, src) = fixture("copy_span", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 0x2000, 0x10000);
    map_at(&mut s, src, m.id, 0x8000, 0x2000, 0x12000);
    assert_eq!(s.copy(cargs(dst, src, 0x11000, 0x2000, Some(0x40000))).unwrap(), 0x40000);
    let want = vec![
        MappingInfo { iova: 0x40000, length: PAGE, mem: m.id, offset: 0x1000, perm: Perm::RW },
        MappingInfo { iova: 0x41000, length: PAGE, mem: m.id, offset: 0x8000, perm: Perm::RW },
    ];
    assert_eq!(mappings(&mut s, dst), want);
    assert_eq!(mem_info(&mut s, m.id).mappings, 4);
}

#[test]
fn copy_unmapped_src_is_enoent() {
    let (_env, mut s, m, src) = fixture("copy_unmapped", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, PAGE, 0x10000);
    map_at(&mut s, src, m.id, 0, PAGE, 0x12000);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0x3000, Some(0x40000))), ENOENT);
    assert_errno!(s.copy(cargs(dst, src, 0x50000, PAGE, None)), ENOENT);
    assert_errno!(s.copy(cargs(dst, src, 0x12000, 0x2000, None)), ENOENT);
    assert!(mappings(&mut s, dst).is_empty());
    assert_eq!(mem_info(&mut s, m.id).mappings, 2);
}

#[test]
fn copy_write_from_readonly_is_eperm() {
    let (_env, mut s, m, src) = fixture("copy_eperm", MIB);
    let dst = s.ioas_alloc().unwrap();
    s.map(MapArgs { perm: Perm::R, ..margs(src, m.id, 0, 0x2000, Some(0x10000)) }).unwrap();
    let w = CopyArgs { perm: Perm::W, ..cargs(dst, src, 0x10000, 0x2000, None) };
    assert_errno!(s.copy(w), EPERM);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0x2000, None)), EPERM);
    assert!(mappings(&mut s, dst).is_empty());
    let r = CopyArgs { perm: Perm::R, ..cargs(dst, src, 0x10000, 0x2000, Some(0x30000)) };
    assert_eq!(s.copy(r).unwrap(), 0x30000);
    assert_eq!(s.translate(dst, 0x31000).unwrap().perm, Perm::R);
}

#[test]
fn copy_read_only_subset_of_rw() {
    let (_env, mut s, m, src) = fixture("copy_subset", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 0x2000, 0x10000);
    let r = CopyArgs { perm: Perm::R, ..cargs(dst, src, 0x10000, 0x2000, Some(0x10000)) };
    s.copy(r).unwrap();
    assert_eq!(mappings(&mut s, dst)[0].perm, Perm::R);
    assert_eq!(s.translate(dst, 0x10000).unwrap().perm, Perm::R);
    assert_eq!(s.translate(src, 0x10000).unwrap().perm, Perm::RW);
}

#[test]
fn copy_empty_perm_is_einval() {
    let (_env, mut s, m, src) = fixture("copy_no_perm", MIB);
    map_at(&mut s, src, m.id, 0, PAGE, 0x10000);
    let a = CopyArgs { perm: Perm::default(), ..cargs(src, src, 0x10000, PAGE, None) };
    assert_errno!(s.copy(a), EINVAL);
}

#[test]
fn copy_zero_length_is_einval() {
    let (_env, mut s, m, src) = fixture("copy_zero", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, PAGE, 0x10000);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0, None)), EINVAL);
    assert!(mappings(&mut s, dst).is_empty());
}

#[test]
fn copy_unaligned_is_einval() {
    let (_env, mut s, m, src) = fixture("copy_unaligned", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 0x4000, 0x10000);
    assert_errno!(s.copy(cargs(dst, src, 0x10800, PAGE, None)), EINVAL);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0x800, None)), EINVAL);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, PAGE, Some(0x40800))), EINVAL);
    assert!(mappings(&mut s, dst).is_empty());
}

#[test]
fn copy_overflow_is_eoverflow() {
    let (_env, mut s, m, src) = fixture("copy_overflow", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 0x2000, 0x10000);
    assert_errno!(s.copy(cargs(dst, src, TOP_PAGE, 0x2000, None)), EOVERFLOW);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0x2000, Some(TOP_PAGE))), EOVERFLOW);
}

#[test]
fn copy_into_overlap_is_eexist() {
    let (_env, mut s, m, src) = fixture("copy_overlap", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 0x2000, 0x10000);
    map_at(&mut s, dst, m.id, 0, PAGE, 0x40000);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0x2000, Some(0x3f000))), EEXIST);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0x2000, Some(0x40000))), EEXIST);
    // Into the source itself, over the source.
    assert_errno!(s.copy(cargs(src, src, 0x10000, 0x2000, Some(0x11000))), EEXIST);
    assert_eq!(mappings(&mut s, dst).len(), 1);
    assert_eq!(mappings(&mut s, src).len(), 1);
}

#[test]
fn copy_within_same_ioas_works() {
    let (_env, mut s, m, ioas) = fixture("copy_same", MIB);
    map_at(&mut s, ioas, m.id, 0x3000, 0x2000, 0x10000);
    assert_eq!(s.copy(cargs(ioas, ioas, 0x10000, 0x2000, Some(0x90000))).unwrap(), 0x90000);
    assert_eq!(s.translate(ioas, 0x91000).unwrap().offset, 0x4000);
    assert_eq!(mappings(&mut s, ioas).len(), 2);
}

#[test]
fn copy_into_reserved_is_einval() {
    let (_env, mut s, m, src) = fixture("copy_reserved", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 0x2000, 0x10000);
    s.add_reserved(dst, 0x40000, 0x4ffff).unwrap();
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0x2000, Some(0x3f000))), EINVAL);
    assert!(mappings(&mut s, dst).is_empty());
}

#[test]
fn copy_auto_dst_is_nonzero_and_aligned() {
    let (_env, mut s, m, src) = fixture("copy_auto", 4 * MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 2 * MIB, 0x4000_0000);
    let iova = s.copy(cargs(dst, src, 0x4000_0000, 2 * MIB, None)).unwrap();
    assert_ne!(iova, 0);
    assert_eq!(iova % (2 * MIB), 0);
    assert_eq!(s.translate(dst, iova).unwrap().page_size, 2 * MIB);
}

#[test]
fn copy_auto_dst_stays_in_allowed() {
    let (_env, mut s, m, src) = fixture("copy_auto_allowed", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 0x2000, 0x10000);
    s.allow_iovas(dst, vec![range(0x7000_0000, 0x7000_1fff)]).unwrap();
    assert_eq!(s.copy(cargs(dst, src, 0x10000, 0x2000, None)).unwrap(), 0x7000_0000);
    assert_errno!(s.copy(cargs(dst, src, 0x10000, PAGE, None)), ENOSPC);
}

#[test]
fn copy_wrong_object_type_is_enoent() {
    let (_env, mut s, m, src) = fixture("copy_wrong_type", MIB);
    let n = s.nested_alloc(src, 0).unwrap();
    map_at(&mut s, src, m.id, 0, PAGE, 0x10000);
    assert_errno!(s.copy(cargs(src, m.id, 0x10000, PAGE, None)), ENOENT);
    assert_errno!(s.copy(cargs(m.id, src, 0x10000, PAGE, None)), ENOENT);
    assert_errno!(s.copy(cargs(n, src, 0x10000, PAGE, None)), ENOENT);
    assert_errno!(s.copy(cargs(99, src, 0x10000, PAGE, None)), ENOENT);
    assert_eq!(mem_info(&mut s, m.id).mappings, 1);
}

#[test]
fn copy_respects_mapping_cap() {
    let env = Env::with("copy_cap", Limits { max_mappings_per_ioas: 2, ..Limits::default() });
    let mut s = env.session();
    let m = memory(&mut s, MIB);
    let src = s.ioas_alloc().unwrap();
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, PAGE, 0x10000);
    map_at(&mut s, src, m.id, 0x1000, PAGE, 0x11000);
    map_at(&mut s, dst, m.id, 0, PAGE, 0x1000);
    // Two source areas would make three in dst.
    assert_errno!(s.copy(cargs(dst, src, 0x10000, 0x2000, Some(0x40000))), ENOSPC);
    assert_eq!(mappings(&mut s, dst).len(), 1);
    s.copy(cargs(dst, src, 0x11000, PAGE, Some(0x40000))).unwrap();
    assert_eq!(mappings(&mut s, dst).len(), 2);
}

#[test]
fn copy_keeps_memory_busy_until_all_unmapped() {
    let (_env, mut s, m, src) = fixture("copy_busy", MIB);
    let dst = s.ioas_alloc().unwrap();
    map_at(&mut s, src, m.id, 0, 0x2000, 0x10000);
    s.copy(cargs(dst, src, 0x10000, 0x2000, Some(0x10000))).unwrap();
    assert_eq!(s.unmap(src, 0, u64::MAX).unwrap(), 0x2000);
    assert_errno!(s.destroy(m.id), EBUSY);
    // The copy is independent of the source mapping.
    assert_eq!(s.translate(dst, 0x11000).unwrap().offset, 0x1000);
    assert_eq!(s.unmap(dst, 0, u64::MAX).unwrap(), 0x2000);
    s.destroy(m.id).unwrap();
}

// ---------------------------------------------------------------------------
// Nested IOASes and invalidation
// ---------------------------------------------------------------------------

#[test]
fn nested_alloc_reports_parent_and_root() {
    let env = Env::new("nested_ok");
    let mut s = env.session();
    let parent = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(parent, 0x10_0000).unwrap();
    let i = ioas_info(&mut s, n);
    assert_eq!(i.kind, IoasKind::Nested { parent, s1_root: 0x10_0000 });
    assert!(i.mappings.is_empty());
    assert_eq!(i.stats.invalidations, 0);
    assert_eq!(ioas_info(&mut s, parent).children, 1);
    // The stage-1 root may be anywhere in the 48-bit space.
    s.nested_alloc(parent, MAX_IOVA + 1 - PAGE).unwrap();
    assert_eq!(ioas_info(&mut s, parent).children, 2);
}

#[test]
fn nested_on_nested_is_einval() {
    let env = Env::new("nested_on_nested");
    let mut s = env.session();
    let parent = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(parent, 0).unwrap();
    assert_errno!(s.nested_alloc(n, 0), EINVAL);
    assert_eq!(me(&mut s).objects, 2);
}

#[test]
fn nested_on_memory_or_unknown_is_enoent() {
    let env = Env::new("nested_on_mem");
    let mut s = env.session();
    let m = memory(&mut s, PAGE);
    assert_errno!(s.nested_alloc(m.id, 0), ENOENT);
    assert_errno!(s.nested_alloc(42, 0), ENOENT);
    assert_errno!(s.nested_alloc(0, 0), ENOENT);
}

#[test]
fn nested_root_unaligned_is_einval() {
    let env = Env::new("nested_unaligned");
    let mut s = env.session();
    let parent = s.ioas_alloc().unwrap();
    assert_errno!(s.nested_alloc(parent, 0x1800), EINVAL);
    assert_errno!(s.nested_alloc(parent, 1), EINVAL);
    assert_eq!(ioas_info(&mut s, parent).children, 0);
}

#[test]
fn nested_root_beyond_aperture_is_einval() {
    let env = Env::new("nested_beyond");
    let mut s = env.session();
    let parent = s.ioas_alloc().unwrap();
    assert_errno!(s.nested_alloc(parent, 1 << 48), EINVAL);
    assert_errno!(s.nested_alloc(parent, TOP_PAGE), EINVAL);
    assert_eq!(ioas_info(&mut s, parent).children, 0);
}

#[test]
fn destroy_nested_releases_parent() {
    let env = Env::new("nested_destroy");
    let mut s = env.session();
    let parent = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(parent, 0).unwrap();
    s.destroy(n).unwrap();
    assert_eq!(ioas_info(&mut s, parent).children, 0);
    assert_errno!(s.invalidate(n, InvalidateScope::All), ENOENT);
    s.destroy(parent).unwrap();
}

#[test]
fn map_into_nested_is_enoent() {
    let (_env, mut s, m, parent) = fixture("nested_map", MIB);
    let n = s.nested_alloc(parent, 0).unwrap();
    assert_errno!(s.map(margs(n, m.id, 0, PAGE, Some(0x1000))), ENOENT);
    assert_errno!(s.translate(n, 0x1000), ENOENT);
    assert_eq!(mem_info(&mut s, m.id).mappings, 0);
}

#[test]
fn invalidate_counts_in_status() {
    let env = Env::new("invalidate_ok");
    let mut s = env.session();
    let parent = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(parent, 0).unwrap();
    s.invalidate(n, InvalidateScope::All).unwrap();
    s.invalidate(n, InvalidateScope::Range { iova: 0x1000, length: 0x2000 }).unwrap();
    s.invalidate(n, InvalidateScope::Range { iova: MAX_IOVA + 1 - PAGE, length: PAGE }).unwrap();
    assert_eq!(ioas_info(&mut s, n).stats.invalidations, 3);
    assert_eq!(ioas_info(&mut s, parent).stats.invalidations, 0);
}

#[test]
fn invalidate_paging_ioas_is_einval() {
    let env = Env::new("invalidate_paging");
    let mut s = env.session();
    let ioas = s.ioas_alloc().unwrap();
    assert_errno!(s.invalidate(ioas, InvalidateScope::All), EINVAL);
    assert_errno!(s.invalidate(ioas, InvalidateScope::Range { iova: 0, length: PAGE }), EINVAL);
}

#[test]
fn invalidate_memory_or_unknown_is_enoent() {
    let env = Env::new("invalidate_wrong");
    let mut s = env.session();
    let m = memory(&mut s, PAGE);
    assert_errno!(s.invalidate(m.id, InvalidateScope::All), ENOENT);
    assert_errno!(s.invalidate(7, InvalidateScope::All), ENOENT);
    assert_errno!(s.invalidate(0, InvalidateScope::All), ENOENT);
}

#[test]
fn invalidate_range_zero_len_is_einval() {
    let env = Env::new("invalidate_zero");
    let mut s = env.session();
    let p = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(p, 0).unwrap();
    assert_errno!(s.invalidate(n, InvalidateScope::Range { iova: 0x1000, length: 0 }), EINVAL);
    assert_eq!(ioas_info(&mut s, n).stats.invalidations, 0);
}

#[test]
fn invalidate_range_unaligned_iova_is_einval() {
    let env = Env::new("invalidate_unaligned");
    let mut s = env.session();
    let p = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(p, 0).unwrap();
    assert_errno!(s.invalidate(n, InvalidateScope::Range { iova: 0x1800, length: PAGE }), EINVAL);
    assert_eq!(ioas_info(&mut s, n).stats.invalidations, 0);
}

#[test]
fn invalidate_range_unaligned_length_is_einval() {
    let env = Env::new("invalidate_unaligned_len");
    let mut s = env.session();
    let p = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(p, 0).unwrap();
    assert_errno!(s.invalidate(n, InvalidateScope::Range { iova: 0x1000, length: 0x1234 }), EINVAL);
    assert_eq!(ioas_info(&mut s, n).stats.invalidations, 0);
}

#[test]
fn invalidate_range_overflow_is_eoverflow() {
    let env = Env::new("invalidate_overflow");
    let mut s = env.session();
    let p = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(p, 0).unwrap();
    assert_errno!(s.invalidate(n, InvalidateScope::Range { iova: TOP_PAGE, length: 0x2000 }), EOVERFLOW);
}

#[test]
fn invalidate_range_beyond_aperture_is_einval() {
    let env = Env::new("invalidate_beyond");
    let mut s = env.session();
    let p = s.ioas_alloc().unwrap();
    let n = s.nested_alloc(p, 0).unwrap();
    assert_errno!(s.invalidate(n, InvalidateScope::Range { iova: 1 << 48, length: PAGE }), EINVAL);
    assert_errno!(s.invalidate(n, InvalidateScope::Range { iova: MAX_IOVA + 1 - PAGE, length: 0x2000 }), EINVAL);
    assert_eq!(ioas_info(&mut s, n).stats.invalidations, 0);
}

// ---------------------------------------------------------------------------
// pPASIDs
// ---------------------------------------------------------------------------

#[test]
fn ppasid_alloc_starts_at_1() {
    let env = Env::new("pasid_first");
    let mut s = env.session();
    let got: Vec<u32> = (0..3).map(|_| s.ppasid_alloc().unwrap()).collect();
    assert_eq!(got, vec![1, 2, 3]);
    assert_eq!(me(&mut s).ppasids, vec![1, 2, 3]);
}

#[test]
fn ppasid_space_is_global() {
    let env = Env::new("pasid_global");
    let mut a = env.session();
    let mut b = env.session();
    assert_eq!(a.ppasid_alloc().unwrap(), 1);
    assert_eq!(b.ppasid_alloc().unwrap(), 2);
    assert_eq!(a.ppasid_alloc().unwrap(), 3);
    let st = env.observer().status().unwrap();
    assert_eq!(st.ppasids, vec![(1, a.session_id()), (2, b.session_id()), (3, a.session_id())]);
}

#[test]
fn ppasid_free_then_alloc_reuses_lowest() {
    let env = Env::new("pasid_reuse");
    let mut s = env.session();
    for want in 1..=3 {
        assert_eq!(s.ppasid_alloc().unwrap(), want);
    }
    s.ppasid_free(2).unwrap();
    let mut held = me(&mut s).ppasids;
    held.sort();
    assert_eq!(held, vec![1, 3]);
    assert_eq!(s.ppasid_alloc().unwrap(), 2);
}

#[test]
fn ppasid_free_not_owned_is_enoent() {
    let env = Env::new("pasid_not_owned");
    let mut a = env.session();
    let mut b = env.session();
    let p = a.ppasid_alloc().unwrap();
    assert_errno!(b.ppasid_free(p), ENOENT);
    assert_errno!(b.ppasid_free(5), ENOENT);
    assert_errno!(a.ppasid_free(5), ENOENT);
    assert_eq!(me(&mut a).ppasids, vec![p]);
}

#[test]
fn ppasid_free_twice_is_enoent() {
    let env = Env::new("pasid_twice");
    let mut s = env.session();
    let p = s.ppasid_alloc().unwrap();
    s.ppasid_free(p).unwrap();
    assert_errno!(s.ppasid_free(p), ENOENT);
    assert!(me(&mut s).ppasids.is_empty());
}

#[test]
fn ppasid_free_zero_is_einval() {
    let env = Env::new("pasid_zero");
    let mut s = env.session();
    s.ppasid_alloc().unwrap();
    assert_errno!(s.ppasid_free(0), EINVAL);
    assert_eq!(me(&mut s).ppasids, vec![1]);
}

#[test]
fn ppasid_free_out_of_range_is_einval() {
    let env = Env::new("pasid_range");
    let mut s = env.session();
    assert_errno!(s.ppasid_free(PASID_LIMIT), EINVAL);
    assert_errno!(s.ppasid_free(u32::MAX), EINVAL);
    // The largest pPASID is in range (just not held).
    assert_errno!(s.ppasid_free(PASID_LIMIT - 1), ENOENT);
}

#[test]
fn ppasids_per_session_cap_is_enospc() {
    let env = Env::with("pasid_cap", Limits { max_ppasids_per_session: 3, ..Limits::default() });
    let mut s = env.session();
    for _ in 0..3 {
        s.ppasid_alloc().unwrap();
    }
    assert_errno!(s.ppasid_alloc(), ENOSPC);
    assert_eq!(me(&mut s).ppasids.len(), 3);
    // Per session: another session still gets one; a free makes room.
    let mut other = env.session();
    assert_eq!(other.ppasid_alloc().unwrap(), 4);
    s.ppasid_free(2).unwrap();
    assert_eq!(s.ppasid_alloc().unwrap(), 2);
}

// ---------------------------------------------------------------------------
// Dirty tracking
// ---------------------------------------------------------------------------

#[test]
fn dirty_bitmap_without_tracking_is_einval() {
    let (_env, mut s, m, ioas) = fixture("dirty_off", MIB);
    map_at(&mut s, ioas, m.id, 0, MIB, 0x100000);
    assert_errno!(s.dirty_bitmap(ioas, 0x100000, MIB, PAGE, false), EINVAL);
    s.set_dirty_tracking(ioas, true).unwrap();
    s.set_dirty_tracking(ioas, false).unwrap();
    assert!(!ioas_info(&mut s, ioas).dirty_tracking);
    assert_errno!(s.dirty_bitmap(ioas, 0x100000, MIB, PAGE, false), EINVAL);
}

#[test]
fn dirty_bitmap_clean_shape() {
    let (_env, mut s, m, ioas) = fixture("dirty_shape", 4 * MIB);
    map_at(&mut s, ioas, m.id, 0, 4 * MIB, 0x400000);
    s.set_dirty_tracking(ioas, true).unwrap();
    // Enabling twice is fine.
    s.set_dirty_tracking(ioas, true).unwrap();
    assert!(ioas_info(&mut s, ioas).dirty_tracking);
    // 256 pages: four words, all clean.
    assert_eq!(s.dirty_bitmap(ioas, 0x400000, MIB, PAGE, false).unwrap(), vec![0; 4]);
    // 65 pages need two words.
    assert_eq!(s.dirty_bitmap(ioas, 0x400000, 65 * PAGE, PAGE, true).unwrap(), vec![0; 2]);
    // Two 2 MiB pages fit one word.
    assert_eq!(s.dirty_bitmap(ioas, 0x400000, 4 * MIB, 2 * MIB, false).unwrap(), vec![0]);
    // An unmapped range reads clean too.
    assert_eq!(s.dirty_bitmap(ioas, 1 << 40, 64 * PAGE, PAGE, false).unwrap(), vec![0]);
}

#[test]
fn dirty_bitmap_non_pow2_page_is_einval() {
    let (_env, mut s, _m, ioas) = fixture("dirty_pow2", MIB);
    s.set_dirty_tracking(ioas, true).unwrap();
    assert_errno!(s.dirty_bitmap(ioas, 0, 0x30000, 3 * PAGE, false), EINVAL);
    assert_errno!(s.dirty_bitmap(ioas, 0, 0x30000, 0, false), EINVAL);
    assert_errno!(s.dirty_bitmap(ioas, 0, 0x30000, PAGE + 1, false), EINVAL);
}

#[test]
fn dirty_bitmap_unaligned_is_einval() {
    let (_env, mut s, _m, ioas) = fixture("dirty_unaligned", MIB);
    s.set_dirty_tracking(ioas, true).unwrap();
    assert_errno!(s.dirty_bitmap(ioas, 0x800, PAGE, PAGE, false), EINVAL);
    assert_errno!(s.dirty_bitmap(ioas, 0, 0x1800, PAGE, false), EINVAL);
    // Aligned to 4 KiB but not to the 2 MiB page size.
    assert_errno!(s.dirty_bitmap(ioas, 0x1000, 2 * MIB, 2 * MIB, false), EINVAL);
    assert_errno!(s.dirty_bitmap(ioas, 0, 3 * MIB, 2 * MIB, false), EINVAL);
}

#[test]
fn dirty_bitmap_zero_length_is_einval() {
    let (_env, mut s, _m, ioas) = fixture("dirty_zero", MIB);
    s.set_dirty_tracking(ioas, true).unwrap();
    assert_errno!(s.dirty_bitmap(ioas, 0x1000, 0, PAGE, false), EINVAL);
}

#[test]
fn dirty_bitmap_overflow_is_eoverflow() {
    let (_env, mut s, _m, ioas) = fixture("dirty_overflow", MIB);
    s.set_dirty_tracking(ioas, true).unwrap();
    assert_errno!(s.dirty_bitmap(ioas, TOP_PAGE, 0x2000, PAGE, false), EOVERFLOW);
}

#[test]
fn dirty_bitmap_beyond_aperture_is_einval() {
    let (_env, mut s, _m, ioas) = fixture("dirty_beyond", MIB);
    s.set_dirty_tracking(ioas, true).unwrap();
    assert_errno!(s.dirty_bitmap(ioas, 1 << 48, PAGE, PAGE, false), EINVAL);
    assert_errno!(s.dirty_bitmap(ioas, (1 << 48) - PAGE, 0x2000, PAGE, false), EINVAL);
}

#[test]
fn dirty_bitmap_too_large_is_e2big() {
    let (_env, mut s, _m, ioas) = fixture("dirty_e2big", MIB);
    s.set_dirty_tracking(ioas, true).unwrap();
    assert_errno!(s.dirty_bitmap(ioas, 0, 1 << 40, PAGE, false), E2BIG);
    // The same span at 1 GiB granularity is tiny.
    assert_eq!(s.dirty_bitmap(ioas, 0, 1 << 40, GIB, false).unwrap(), vec![0; 16]);
}

#[test]
fn dirty_ops_wrong_type_is_enoent() {
    let (_env, mut s, m, ioas) = fixture("dirty_wrong_type", MIB);
    let n = s.nested_alloc(ioas, 0).unwrap();
    assert_errno!(s.set_dirty_tracking(m.id, true), ENOENT);
    assert_errno!(s.set_dirty_tracking(n, true), ENOENT);
    assert_errno!(s.set_dirty_tracking(99, true), ENOENT);
    assert_errno!(s.dirty_bitmap(n, 0, PAGE, PAGE, false), ENOENT);
    assert_errno!(s.dirty_bitmap(m.id, 0, PAGE, PAGE, false), ENOENT);
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

#[test]
fn read_faults_on_empty_queue_returns_nothing() {
    let env = Env::new("faults_empty");
    let mut s = env.session();
    assert_eq!(s.read_faults(16).unwrap(), vec![]);
    assert_eq!(s.read_faults(0).unwrap(), vec![]);
    let info = me(&mut s);
    assert_eq!((info.faults_queued, info.faults_lost), (0, 0));
}

#[test]
fn respond_fault_bad_code_is_einval() {
    let env = Env::new("respond_code");
    let mut s = env.session();
    assert_errno!(s.respond_fault(1, 2), EINVAL);
    assert_errno!(s.respond_fault(1, u32::MAX), EINVAL);
}

#[test]
fn respond_fault_unknown_cookie_is_einval() {
    let env = Env::new("respond_cookie");
    let mut s = env.session();
    assert_errno!(s.respond_fault(1, page_response::SUCCESS), EINVAL);
    assert_errno!(s.respond_fault(0, page_response::INVALID), EINVAL);
    assert_errno!(s.respond_fault(u64::MAX, page_response::SUCCESS), EINVAL);
}

// ---------------------------------------------------------------------------
// Translation and leaf sizes
// ---------------------------------------------------------------------------

#[test]
fn translate_4k_leaf() {
    let (_env, mut s, m, ioas) = fixture("translate_4k", 0x10000);
    map_at(&mut s, ioas, m.id, 0x2000, 0x4000, 0x100000);
    let t = s.translate(ioas, 0x101234).unwrap();
    let want = Translation {
        system_address: m.system_address + 0x3234,
        mem: m.id,
        offset: 0x3234,
        perm: Perm::RW,
        page_size: PAGE,
    };
    assert_eq!(t, want);
}

#[test]
fn translate_2m_leaf() {
    let (_env, mut s, m, ioas) = fixture("translate_2m", 4 * MIB);
    map_at(&mut s, ioas, m.id, 2 * MIB, 2 * MIB, 0x400000);
    let t = s.translate(ioas, 0x412345).unwrap();
    assert_eq!(t.page_size, 2 * MIB);
    assert_eq!((t.offset, t.system_address, t.mem), (2 * MIB + 0x12345, m.system_address + 2 * MIB + 0x12345, m.id));
    // root + L3 + L2, no L1.
    assert_eq!(ioas_info(&mut s, ioas).tables, 3);
}

#[test]
fn translate_1g_leaf() {
    let (_env, mut s, m, ioas) = fixture("translate_1g", GIB);
    assert_eq!(m.system_address % GIB, 0);
    map_at(&mut s, ioas, m.id, 0, GIB, 3 * GIB);
    let t = s.translate(ioas, 3 * GIB + 0x1234_5678).unwrap();
    assert_eq!((t.page_size, t.offset), (GIB, 0x1234_5678));
    assert_eq!(t.system_address, m.system_address + 0x1234_5678);
    // root + L3 only.
    assert_eq!(ioas_info(&mut s, ioas).tables, 2);
}

#[test]
fn translate_mixed_leaf_sizes() {
    let (_env, mut s, m, ioas) = fixture("translate_mixed", GIB + 2 * MIB + PAGE);
    map_at(&mut s, ioas, m.id, 0, GIB + 2 * MIB + PAGE, GIB);
    let sizes: Vec<(u64, u64)> = [GIB + 5, 2 * GIB + 0x1234, 2 * GIB + 2 * MIB + 7]
        .into_iter()
        .map(|iova| {
            let t = s.translate(ioas, iova).unwrap();
            (t.page_size, t.offset)
        })
        .collect();
    assert_eq!(sizes, vec![(GIB, 5), (2 * MIB, GIB + 0x1234), (PAGE, GIB + 2 * MIB + 7)]);
    assert_errno!(s.translate(ioas, 2 * GIB + 2 * MIB + PAGE), ENOENT);
    assert_eq!(ioas_info(&mut s, ioas).tables, 4);
}

#[test]
fn translate_misaligned_offset_uses_4k_leaves() {
    let (_env, mut s, m, ioas) = fixture("translate_misaligned", 4 * MIB);
    // The IOVA is 2 MiB aligned but the memory offset is not.
    map_at(&mut s, ioas, m.id, PAGE, 2 * MIB, 2 * MIB);
    let t = s.translate(ioas, 2 * MIB + 0x3000).unwrap();
    assert_eq!((t.page_size, t.offset), (PAGE, 0x4000));
}

#[test]
fn translate_unmapped_is_enoent() {
    let (_env, mut s, m, ioas) = fixture("translate_unmapped", MIB);
    assert_errno!(s.translate(ioas, 0x1000), ENOENT);
    map_at(&mut s, ioas, m.id, 0, PAGE, 0x10000);
    assert_errno!(s.translate(ioas, 0xffff), ENOENT);
    assert_errno!(s.translate(ioas, 0x11000), ENOENT);
    assert_eq!(s.translate(ioas, 0x10fff).unwrap().offset, 0xfff);
}

#[test]
fn translate_beyond_aperture_is_enoent() {
    let (_env, mut s, _m, ioas) = fixture("translate_beyond", MIB);
    assert_errno!(s.translate(ioas, 1 << 48), ENOENT);
    assert_errno!(s.translate(ioas, u64::MAX), ENOENT);
}

#[test]
fn translate_wrong_type_is_enoent() {
    let (_env, mut s, m, _ioas) = fixture("translate_wrong", MIB);
    assert_errno!(s.translate(m.id, 0), ENOENT);
    assert_errno!(s.translate(0, 0), ENOENT);
}

/// A Status reply lists at most `MAPPINGS_PAGE` mappings and says how many
/// each IOAS holds; `Mappings` pages through the rest, and the client's
/// `status` assembles them all, in order. A session pages only its own.
#[test]
fn status_lists_a_page_of_mappings_and_the_rest_are_paged() {
    use iommu_core::wire::Reply;
    let env = Env::new("status_pages");
    let mut s = env.session();
    let m = memory(&mut s, MIB);
    let ioas = s.ioas_alloc().unwrap();
    let n = u64::from(wire::MAPPINGS_PAGE) + 1000;
    let iova = |i: u64| 0x1000 + i * 2 * PAGE;
    // Pipelined in batches, replies read after each.
    for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
        let mut batch = Vec::new();
        for &i in chunk {
            let req = Request::Map(margs(ioas, m.id, 0, PAGE, Some(iova(i))));
            batch.extend(wire::encode(i + 1, &req, 0).unwrap());
        }
        s.send_raw(&batch).unwrap();
        for _ in chunk {
            let (env, _) = s.read_reply().unwrap();
            assert!(matches!(env.body, Reply::Iova(_)), "{:?}", env.body);
        }
    }
    let raw = match s.call(&Request::Status, &[]).unwrap() {
        Reply::Status(st) => st,
        other => panic!("{other:?}"),
    };
    let i = &raw.sessions[0].ioas[0];
    assert_eq!((i.mappings.len() as u64, i.mappings_total), (u64::from(wire::MAPPINGS_PAGE), n));
    for mut c in [env.observer(), s] {
        let st = c.status().unwrap();
        let got: Vec<u64> = st.sessions[0].ioas[0].mappings.iter().map(|x| x.iova).collect();
        assert_eq!(got, (0..n).map(iova).collect::<Vec<_>>());
    }
    let mut other = env.session();
    assert_errno!(other.mappings(raw.sessions[0].id, ioas, 0, 10), ENOENT);
}

// ---------------------------------------------------------------------------
// Client memory (no fd)
// ---------------------------------------------------------------------------

/// Client memory: registered without an fd, mapped like any object, shown
/// with its client address, refused writable mappings when registered
/// read-only, EBUSY while mapped; a channel of the session gets it as
/// `ClientMemory` (no fd), another session's channel does not see it.
#[test]
fn client_memory_is_an_object_without_an_fd() {
    let env = Env::new("client-memory");
    let mut c = env.session();
    assert_errno!(c.register_client_memory(0, true, 0), EINVAL);
    assert_errno!(c.register_client_memory(PAGE + 1, true, 0), EINVAL);
    assert_errno!(c.register_client_memory(1 << 62, true, 0), E2BIG);
    let m = c.register_client_memory(4 * MIB, true, 0xc000_0000).unwrap();
    assert_eq!((m.size, m.client_address, m.seals.as_str()), (4 * MIB, Some(0xc000_0000), "none"));
    let ro = c.register_client_memory(2 * MIB, false, 0xd000_0000).unwrap();
    let ioas = c.ioas_alloc().unwrap();
    map_at(&mut c, ioas, m.id, 0, 4 * MIB, 0x4000_0000);
    assert_errno!(c.map(margs(ioas, ro.id, 0, 2 * MIB, Some(0x8000_0000))), EACCES);
    let r = MapArgs { perm: Perm::R, ..margs(ioas, ro.id, 0, 2 * MIB, Some(0x8000_0000)) };
    assert_eq!(c.map(r).unwrap(), 0x8000_0000);
    let t = c.translate(ioas, 0x4000_1234).unwrap();
    assert_eq!(t.system_address, m.system_address + 0x1234);
    assert_eq!(mem_info(&mut c, m.id).client_address, Some(0xc000_0000));
    assert_errno!(c.destroy(m.id), EBUSY);

    let (_, fd) = c.open_device_channel().unwrap();
    let chan = iommu_core::device::Channel::new(fd).unwrap();
    match chan.memory(m.system_address + 0x5000).unwrap() {
        iommu_core::device::Memory::Client { base, size, address } => {
            assert_eq!((base, size, address), (m.system_address, 4 * MIB, 0xc000_0000))
        }
        other => panic!("client memory came as {other:?}"),
    }
    let mut other = env.session();
    let (_, ofd) = other.open_device_channel().unwrap();
    let ochan = iommu_core::device::Channel::new(ofd).unwrap();
    let e = ochan.memory(m.system_address).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::ENOENT), "{e}");

    c.unmap(ioas, 0x4000_0000, 4 * MIB).unwrap();
    c.destroy(m.id).unwrap();
    assert!(me(&mut c).memory.iter().all(|x| x.id != m.id));
}

/// Client memory counts against the session's memory limit.
#[test]
fn client_memory_counts_against_the_memory_limit() {
    let env = Env::with("client-memory-limit", Limits { max_memory_bytes_per_session: 8 * MIB, ..Limits::default() });
    let mut c = env.session();
    c.register_client_memory(6 * MIB, true, 0).unwrap();
    assert_errno!(c.register_client_memory(4 * MIB, true, 0), ENOSPC);
    memory(&mut c, 2 * MIB);
    assert_errno!(c.register_client_memory(PAGE, true, 0), ENOSPC);
}
