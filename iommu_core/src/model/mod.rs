//! The core's object model: sessions, memory objects, IOASes, nested IOASes,
//! pPASIDs, fault queues and dirty state, with iommufd's rules.
//!
//! Everything here is single-threaded and synchronous: the event loop calls
//! one method per request. Every method either completes or leaves the state
//! as it was (composite operations roll back), which the fail-nth sweep
//! checks by failing each internal step in turn.
//!
//! The operations are split by what they work on, one job per file:
//! `memory` (memory objects), `ioas` (paging IOASes: maps, unmaps, copies
//! and the jobs that run long ones in slices, IOVA ranges, translation),
//! `hwpt` (nested IOASes, dirty tracking, page faults), `device` (channels,
//! devices, attachments, pPASIDs, fencing), `fault` (fault queues, the
//! fault log, page requests) and `snapshot` (what observers see). This
//! file holds the core, its sessions and objects, and the [`Effects`]
//! operations leave for the event loop.
//!
//! The control path is explicit: a call that can change what a device
//! may walk takes the [`Effects`] of the request it serves as its last
//! parameter, `fx`, and adds to it the invalidations to send, the memory
//! to forget and the table pages it unlinked. The model never frees an
//! unlinked table page itself; whoever settles the effects frees them with
//! [`Core::release_tables`] once no device can hold them.

mod device;
mod fault;
mod hwpt;
mod ioas;
mod memory;
mod snapshot;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::errno::Errno;
use crate::failpoint::FailNth;
use crate::pagetable::{self, DirtyPool, TableBudget, TablePool, PAGE_SIZE};
use crate::sysaddr::SysAddrSpace;
use crate::types::*;

use device::{Device, PasidSpace};
use hwpt::Nested;
use ioas::Ioas;
use memory::MemObj;

pub use ioas::{Job, Started, BATCH_ENTRIES, BATCH_LEAVES, SLICE_LEAVES};
pub use memory::MemoryAt;

/// A refused or failed operation: an errno and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{errno}: {message}")]
pub struct Error {
    /// The errno.
    pub errno: Errno,
    /// What went wrong, for people.
    pub message: String,
}

/// Result of a model operation.
pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(errno: Errno, message: impl Into<String>) -> Result<T> {
    Err(Error { errno, message: message.into() })
}

impl From<pagetable::Error> for Error {
    fn from(e: pagetable::Error) -> Error {
        let errno = match e {
            pagetable::Error::Overlap(_) => Errno::EEXIST,
            pagetable::Error::Quota(_) => Errno::ENOSPC,
            _ => Errno::ENOMEM,
        };
        Error { errno, message: e.to_string() }
    }
}

/// Work left by the model operations of one request: invalidations to send
/// to device channels, memory objects they must forget, and table pages to
/// free once every channel told has answered (or been fenced).
///
/// Made by the caller: the event loop makes one for each request it serves
/// (a long job carries its own across its slices, a closing connection one
/// for its teardown) and passes it as `fx`, the last parameter, to every
/// model call that can cause effects. Calls only add to it, so what a call
/// did before failing part-way (the slices of a map it rolls back, the
/// detaches of an unbind) is still settled.
///
/// Settled by the event loop, once, when the request is answered: it sends
/// each channel its invalidations and forgets, and when all have answered
/// (at once if none must) it frees `garbage` with [`Core::release_tables`]
/// and queues the reply (`server::invalidate`). The model never frees an
/// unlinked table page itself. Code that drives the model with no device
/// server (tests, benches) frees the garbage itself.
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "effects must be settled: invalidations sent, then the garbage freed with Core::release_tables"]
pub struct Effects {
    /// Channel -> what its devices must drop.
    pub invalidations: BTreeMap<u64, Vec<InvalidateTarget>>,
    /// Table pages (session, pool offset) unlinked from every table: no
    /// walker reaches them once the invalidations are done.
    pub garbage: Vec<(u64, u64)>,
    /// Channel -> system bases of destroyed memory objects to unmap.
    pub forget: BTreeMap<u64, Vec<u64>>,
}

impl Effects {
    /// True if nothing is to be done.
    pub fn is_empty(&self) -> bool {
        self.invalidations.is_empty() && self.garbage.is_empty() && self.forget.is_empty()
    }
}

#[derive(Debug)]
enum Object {
    Memory(MemObj),
    Ioas(Ioas),
    Nested(Nested),
    Device(Device),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Memory(_) => "memory object",
            Object::Ioas(_) => "IOAS",
            Object::Nested(_) => "nested IOAS",
            Object::Device(_) => "device",
        }
    }
}

#[derive(Debug)]
struct Session {
    pid: i32,
    uid: u32,
    next_id: u32,
    objects: BTreeMap<u32, Object>,
    ppasids: Vec<u32>,
    faults: VecDeque<FaultRecord>,
    faults_lost: u64,
    pending: HashMap<u64, FaultRecord>,
    /// The session's own page tables (IOASes and its devices' PASID
    /// tables); its device channels get this pool and no other.
    pool: TablePool,
    dirty: DirtyPool,
    /// Being torn down: its pool goes whole, so IOASes are cut off at their
    /// root instead of leaf by leaf.
    closing: bool,
}

/// The state of the core.
#[derive(Debug)]
pub struct Core {
    limits: Limits,
    /// Tables of every session's pool, against `table_pool_bytes`.
    budget: Arc<TableBudget>,
    sys: SysAddrSpace,
    /// System base -> (session, memory object id), to name a translation.
    sys_owner: BTreeMap<u64, (u64, u32)>,
    sessions: BTreeMap<u64, Session>,
    next_session: u64,
    pasids: PasidSpace,
    pasid_owner: BTreeMap<u32, u64>,
    next_cookie: u64,
    fault_log: VecDeque<FaultLogEntry>,
    fault_seq: u64,
    stats: CoreStats,
    fail: Arc<FailNth>,
    /// Open device channels -> owning session.
    channels: BTreeMap<u64, u64>,
    next_channel: u64,
}

fn range_last(start: u64, length: u64) -> Result<u64> {
    if length == 0 {
        return err(Errno::EINVAL, "length is zero");
    }
    start
        .checked_add(length - 1)
        .ok_or_else(|| Error { errno: Errno::EOVERFLOW, message: format!("{start:#x} + {length:#x} overflows") })
}

fn check_aligned(what: &str, v: u64) -> Result<()> {
    if !v.is_multiple_of(PAGE_SIZE) {
        return err(Errno::EINVAL, format!("{what} {v:#x} is not 4 KiB aligned"));
    }
    Ok(())
}

impl Core {
    /// Creates a core with `limits`.
    pub fn new(limits: Limits) -> Result<Core> {
        let fail = Arc::new(FailNth::default());
        // Page 0 of a pool is never a table: the budget counts the rest.
        let pages = u32::try_from((limits.table_pool_bytes / PAGE_SIZE).max(2)).unwrap_or(u32::MAX);
        let budget = TableBudget::new(pages - 1);
        Ok(Core {
            limits,
            budget,
            sys: SysAddrSpace::default(),
            sys_owner: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_session: 1,
            pasids: PasidSpace::new(),
            pasid_owner: BTreeMap::new(),
            next_cookie: 1,
            fault_log: VecDeque::new(),
            fault_seq: 0,
            stats: CoreStats::default(),
            fail,
            channels: BTreeMap::new(),
            next_channel: 1,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The fault injector of this core (fail-nth sweeps).
    pub fn fail_injector(&self) -> Arc<FailNth> {
        self.fail.clone()
    }

    /// A session's table pool (the reference walker reads it).
    pub fn pool(&self, sid: u64) -> Option<&TablePool> {
        self.sessions.get(&sid).map(|s| &s.pool)
    }

    /// Tables in use in every session's pool.
    pub fn tables_in_use(&self) -> u32 {
        self.budget.used()
    }

    fn pool_mut(&mut self, sid: u64) -> Result<&mut TablePool> {
        Ok(&mut self.session(sid)?.pool)
    }

    /// Counts a served request (and whether it failed).
    pub fn count_request(&mut self, failed: bool) {
        self.stats.requests += 1;
        if failed {
            self.stats.errors += 1;
        }
    }

    fn step(&self) -> Result<()> {
        if self.fail.step() {
            return err(Errno::ENOMEM, "injected allocation failure");
        }
        Ok(())
    }

    fn session(&mut self, sid: u64) -> Result<&mut Session> {
        self.sessions.get_mut(&sid).ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no session {sid}") })
    }

    fn object(&mut self, sid: u64, id: u32) -> Result<&mut Object> {
        let s = self.session(sid)?;
        s.objects.get_mut(&id).ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no object {id}") })
    }

    fn ioas(&mut self, sid: u64, id: u32) -> Result<&mut Ioas> {
        match self.object(sid, id)? {
            Object::Ioas(i) => Ok(i),
            o => err(Errno::ENOENT, format!("object {id} is a {}, not an IOAS", o.kind())),
        }
    }

    fn new_id(&mut self, sid: u64) -> Result<u32> {
        let cap = self.limits.max_objects_per_session;
        self.step()?;
        let s = self.session(sid)?;
        if s.objects.len() as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the session holds {cap} objects, the configured limit"));
        }
        if s.next_id == u32::MAX {
            return err(Errno::ENOSPC, "object ids are exhausted");
        }
        // The id is taken only when the object is inserted, so a failed
        // allocation does not use one up.
        Ok(s.next_id)
    }

    /// Inserts a new object under the id [`new_id`](Self::new_id) gave.
    fn insert_object(&mut self, sid: u64, id: u32, obj: Object) -> Result<()> {
        let s = self.session(sid)?;
        debug_assert_eq!(s.next_id, id);
        s.next_id = id + 1;
        s.objects.insert(id, obj);
        Ok(())
    }

    /// Opens a session for a peer.
    pub fn open_session(&mut self, pid: i32, uid: u32) -> Result<u64> {
        if self.sessions.len() as u64 >= u64::from(self.limits.max_sessions) {
            return err(Errno::ENOSPC, format!("{} sessions are open, the configured limit", self.limits.max_sessions));
        }
        let tables = self.limits.max_tables_per_session.min(self.budget.cap());
        let pool = TablePool::new(tables, self.budget.clone(), self.fail.clone()).map_err(|e| Error {
            errno: Errno::ENOMEM,
            message: format!("cannot make the session's table pool: {e}"),
        })?;
        let dirty = DirtyPool::new(pool.pages()).map_err(|e| Error {
            errno: Errno::ENOMEM,
            message: format!("cannot make the session's dirty pool: {e}"),
        })?;
        let sid = self.next_session;
        self.next_session += 1;
        self.stats.sessions_opened += 1;
        self.sessions.insert(
            sid,
            Session {
                pid,
                uid,
                next_id: 1,
                objects: BTreeMap::new(),
                ppasids: Vec::new(),
                faults: VecDeque::new(),
                faults_lost: 0,
                pending: HashMap::new(),
                pool,
                dirty,
                closing: false,
            },
        );
        Ok(sid)
    }

    /// Closes a session, destroying everything it owns, leaf first.
    pub fn close_session(&mut self, sid: u64, fx: &mut Effects) {
        for chan in self.channels_of(sid) {
            self.close_channel(chan, fx);
        }
        let Some(s) = self.sessions.get_mut(&sid) else { return };
        s.closing = true;
        let nested: Vec<u32> =
            s.objects.iter().filter(|(_, o)| matches!(o, Object::Nested(_))).map(|(id, _)| *id).collect();
        let ioas: Vec<u32> =
            s.objects.iter().filter(|(_, o)| matches!(o, Object::Ioas(_))).map(|(id, _)| *id).collect();
        let mem: Vec<u32> =
            s.objects.iter().filter(|(_, o)| matches!(o, Object::Memory(_))).map(|(id, _)| *id).collect();
        for id in nested.into_iter().chain(ioas).chain(mem) {
            if let Err(e) = self.destroy(sid, id, fx) {
                tracing::error!(session = sid, id, error = %e, "teardown could not destroy an object");
            }
        }
        if let Some(s) = self.sessions.remove(&sid) {
            for p in s.ppasids {
                self.pasids.free(p);
                self.pasid_owner.remove(&p);
            }
        }
    }

    /// Objects a session owns.
    pub fn object_count(&self, sid: u64) -> Option<usize> {
        self.sessions.get(&sid).map(|s| s.objects.len())
    }

    /// Destroys an object; EBUSY while it is referenced. The channels of
    /// the session forget a memory object; an IOAS's tables go to
    /// `fx.garbage`.
    pub fn destroy(&mut self, sid: u64, id: u32, fx: &mut Effects) -> Result<()> {
        if id == 0 {
            return err(Errno::ENOENT, "object id 0 never exists");
        }
        match self.object(sid, id)? {
            Object::Memory(m) if m.refs > 0 => {
                return err(Errno::EBUSY, format!("memory object {id} is used by {} mappings", m.refs))
            }
            Object::Ioas(i) if i.children > 0 => {
                return err(Errno::EBUSY, format!("IOAS {id} is the parent of {} nested IOASes", i.children))
            }
            Object::Ioas(Ioas { attached, .. }) | Object::Nested(Nested { attached, .. }) if !attached.is_empty() => {
                return err(Errno::EBUSY, format!("object {id} has {} device attachments", attached.len()))
            }
            Object::Device(_) => {
                return err(Errno::EBUSY, format!("device {id} is bound by its device server; it goes when unbound"))
            }
            _ => {}
        }
        let Some(obj) = self.session(sid)?.objects.remove(&id) else {
            return err(Errno::ENOENT, format!("no object {id}"));
        };
        match obj {
            Object::Memory(m) => {
                self.sys.free(m.sys_base, m.sys_len);
                self.sys_owner.remove(&m.sys_base);
                // Device servers may have it mapped; its address will be reused.
                for chan in self.channels_of(sid) {
                    fx.forget.entry(chan).or_default().push(m.sys_base);
                }
            }
            Object::Ioas(mut i) if self.session(sid)?.closing => {
                // The pool goes with the session: a zeroed root is enough
                // for no walk to reach anything, however much is mapped.
                for a in std::mem::take(&mut i.areas).values() {
                    self.mem_unref(sid, a.mem);
                }
                self.pool_mut(sid)?.zero_table(i.root);
            }
            Object::Ioas(mut i) => {
                let areas = std::mem::take(&mut i.areas);
                let mut garbage = Vec::new();
                for (iova, a) in &areas {
                    self.pool_mut(sid)?.unmap_range(i.root, *iova, a.last - iova + 1, &mut garbage);
                    self.mem_unref(sid, a.mem);
                }
                garbage.push(i.root);
                // Nothing is attached (checked above): nothing to wait for.
                fx.garbage.extend(garbage.into_iter().map(|t| (sid, t)));
            }
            Object::Nested(n) => {
                if let Ok(p) = self.ioas(sid, n.parent) {
                    p.children -= 1;
                }
            }
            Object::Device(_) => {}
        }
        Ok(())
    }

    /// Records in `fx` that translations of `targets` changed: their
    /// channels must be told before the operation completes.
    fn queue_invalidations(&mut self, sid: u64, targets: Vec<(u32, u32)>, range: Option<IovaRange>, fx: &mut Effects) {
        for (dev, pasid) in targets {
            let chan = match self.object(sid, dev) {
                Ok(Object::Device(d)) if !d.fenced => d.channel,
                _ => continue,
            };
            fx.invalidations.entry(chan).or_default().push(InvalidateTarget { dev_id: dev, pasid, range });
        }
    }

    /// Hands table pages unlinked from `ioas` to `fx.garbage`, and tells
    /// the devices attached to it (or to a nested IOAS on it) to drop what
    /// they may hold of `range`: the pages are freed once they have.
    fn retire(&mut self, sid: u64, ioas: u32, range: Option<IovaRange>, garbage: Vec<u64>, fx: &mut Effects) {
        let mut direct = Vec::new();
        let mut nested = Vec::new();
        if let Some(s) = self.sessions.get(&sid) {
            for (&id, o) in &s.objects {
                match o {
                    Object::Ioas(i) if id == ioas => direct.extend(i.attached.iter().copied()),
                    Object::Nested(n) if n.parent == ioas => nested.extend(n.attached.iter().copied()),
                    _ => {}
                }
            }
        }
        self.queue_invalidations(sid, direct, range, fx);
        // A stage-2 change can hit any stage-1 IOVA of a nested IOAS.
        self.queue_invalidations(sid, nested, None, fx);
        fx.garbage.extend(garbage.into_iter().map(|t| (sid, t)));
    }

    /// Returns table pages to their sessions' pools (a closed session's
    /// pool went with it): the only way an unlinked page is freed. Call it
    /// with an [`Effects`]'s garbage once no walker can reach the pages.
    pub fn release_tables(&mut self, garbage: Vec<(u64, u64)>) {
        for (sid, t) in garbage {
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.pool.free_table(t);
            }
        }
    }

    /// Sessions open now.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;
    use crate::memfd;

    pub(super) fn core_with(limits: Limits) -> (Core, u64) {
        let mut c = Core::new(Limits { table_pool_bytes: 1 << 20, ..limits }).unwrap();
        let sid = c.open_session(1, 0).unwrap();
        (c, sid)
    }

    #[test]
    fn closing_a_session_frees_everything_leaf_first() {
        let (mut c, sid) = core_with(Limits::default());
        let m = c.register_memory(sid, OwnedFd::from(memfd::create("m", 2 << 20).unwrap())).unwrap();
        let a = c.ioas_alloc(sid).unwrap();
        let b = c.ioas_alloc(sid).unwrap();
        let mut fx = Effects::default();
        let args = MapArgs { ioas: a, mem: m.id, offset: 0, length: 2 << 20, iova: None, perm: Perm::RW };
        c.map(sid, args, &mut fx).unwrap();
        let args = CopyArgs { dst: b, src: a, src_iova: 2 << 20, length: 4096, dst_iova: None, perm: Perm::R };
        c.copy(sid, args, &mut fx).unwrap();
        c.nested_alloc(sid, a, 0).unwrap();
        c.ppasid_alloc(sid).unwrap();
        assert!(c.tables_in_use() > 2);
        c.close_session(sid, &mut fx);
        c.release_tables(fx.garbage);
        assert_eq!(c.tables_in_use(), 0);
        assert_eq!(c.ppasids_in_use(), 0);
        assert_eq!(c.session_count(), 0);
        assert_eq!(c.sys.fragments(), 1, "system address space fully returned");
    }
}
