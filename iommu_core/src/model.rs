//! The core's object model: sessions, memory objects, IOASes, nested IOASes,
//! pPASIDs, fault queues and dirty state, with iommufd's rules.
//!
//! Everything here is single-threaded and synchronous: the event loop calls
//! one method per request. Every method either completes or leaves the state
//! as it was (composite operations roll back), which the fail-nth sweep
//! checks by failing each internal step in turn.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use crate::errno::Errno;
use crate::failpoint::FailNth;
use crate::memfd;
use crate::pagetable::{self, DirtyPool, PasidEntry, TableBudget, TablePool, MAX_IOVA, PAGE_SIZE};
use crate::sysaddr::SysAddrSpace;
use crate::types::*;

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

/// A memory object as a device channel reaches it ([`Core::memory_at`]).
#[derive(Debug)]
pub enum MemoryAt<'a> {
    /// Backed by a file, which the channel gets a duplicate of.
    File {
        /// Base in the system address space.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// Sealed against shrinking.
        sealed: bool,
        /// The file.
        file: &'a File,
    },
    /// Client memory: no fd; the device server reaches it through its
    /// client at `address` onwards.
    Client {
        /// Base in the system address space.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// The client's address of byte 0.
        address: u64,
    },
}

/// Size of the global fault log.
const FAULT_LOG: usize = 256;

/// What holds a memory object's bytes.
#[derive(Debug)]
enum Backing {
    /// A file the session passed (memfd, tmpfs or hugetlbfs).
    File(File),
    /// The memory of the owning device server's client, reached by the
    /// device server alone (vfio-user DMA_READ/DMA_WRITE); `address` is
    /// the client's address of byte 0.
    Client { address: u64 },
}

#[derive(Debug)]
struct MemObj {
    backing: Backing,
    size: u64,
    sealed: bool,
    /// Opened read-write and not sealed against writes: only then may a
    /// mapping of it allow device writes.
    writable: bool,
    sys_base: u64,
    sys_len: u64,
    refs: u32,
}

#[derive(Debug, Clone, Copy)]
struct Area {
    last: u64,
    mem: u32,
    offset: u64,
    perm: Perm,
}

#[derive(Debug)]
struct Ioas {
    root: u64,
    areas: BTreeMap<u64, Area>,
    allowed: Vec<IovaRange>,
    reserved: Vec<IovaRange>,
    dirty: bool,
    iopf: bool,
    children: u32,
    hint: u64,
    stats: IoasStats,
    /// (device, pPASID) attached here.
    attached: BTreeSet<(u32, u32)>,
}

#[derive(Debug)]
struct Nested {
    parent: u32,
    s1_root: u64,
    invalidations: u64,
    attached: BTreeSet<(u32, u32)>,
}

#[derive(Debug)]
struct Device {
    channel: u64,
    name: String,
    pci_address: String,
    caps: DeviceCaps,
    root: u64,
    /// PASID-table directory pages below the root.
    pages: Vec<u64>,
    /// pPASID (0 = RID) -> IOAS or nested IOAS.
    attach: BTreeMap<u32, u32>,
    ppasids: Vec<u32>,
    fenced: bool,
}

/// Leaves one slice of a long map or unmap writes or clears at most, so
/// that no session's request holds the event loop for long (about half a
/// millisecond in a release build).
pub const SLICE_LEAVES: u64 = 16_384;

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

fn mapping_info((&iova, a): (&u64, &Area)) -> MappingInfo {
    MappingInfo { iova, length: a.last - iova + 1, mem: a.mem, offset: a.offset, perm: a.perm }
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

/// Work the event loop must do after a model operation: invalidations to
/// send to device channels, and table pages to free once every channel
/// has answered (or been fenced).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Channel -> what its devices must drop.
    pub invalidations: BTreeMap<u64, Vec<InvalidateTarget>>,
    /// Table pages (session, pool offset) no walker may reach once the
    /// invalidations are done.
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

/// The global 20-bit pPASID space (0 is "no PASID").
#[derive(Debug)]
struct PasidSpace {
    words: Vec<u64>,
    used: u32,
}

impl PasidSpace {
    fn new() -> PasidSpace {
        let mut words = vec![0u64; (PASID_LIMIT / 64) as usize];
        words[0] = 1; // PASID 0 is the RID.
        PasidSpace { words, used: 0 }
    }

    fn alloc(&mut self) -> Option<u32> {
        let (w, word) = self.words.iter_mut().enumerate().find(|(_, w)| **w != u64::MAX)?;
        let bit = word.trailing_ones();
        *word |= 1 << bit;
        self.used += 1;
        Some(w as u32 * 64 + bit)
    }

    fn free(&mut self, pasid: u32) {
        let (w, b) = ((pasid / 64) as usize, pasid % 64);
        if pasid != 0 && w < self.words.len() && self.words[w] & (1 << b) != 0 {
            self.words[w] &= !(1 << b);
            self.used -= 1;
        }
    }
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
    effects: Effects,
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

    fn iova_ranges(&self) -> Vec<IovaRange> {
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
            effects: Effects::default(),
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
    pub fn close_session(&mut self, sid: u64) {
        for chan in self.channels_of(sid) {
            self.close_channel(chan);
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
            if let Err(e) = self.destroy(sid, id) {
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

    /// Registers a memory object from `fd`.
    pub fn register_memory(&mut self, sid: u64, fd: OwnedFd) -> Result<MemInfo> {
        let file = File::from(fd);
        // Before anything asks the file's file system (stat included).
        if let Err(why) = memfd::check_memory_fd(file.as_fd()) {
            memfd::close_elsewhere(file.into());
            let errno = if why.errno() == libc::EACCES { Errno::EACCES } else { Errno::EINVAL };
            return err(errno, format!("not a memory object: {why}"));
        }
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => return err(Errno::EBADF, format!("cannot stat the file: {e}")),
        };
        let ft = meta.file_type();
        if !ft.is_file() || ft.is_socket() {
            return err(Errno::EINVAL, "a memory object must be a regular file (memfd, tmpfs or hugetlbfs)");
        }
        // Seal before the size is read: a client that shrinks the file
        // between the two must not get an object recorded larger than its
        // file. A refused registration keeps the seal (the kernel has no
        // way to remove one).
        let sealed = memfd::seal_shrink(file.as_fd());
        let size = match file.metadata() {
            Ok(m) => m.len(),
            Err(e) => return err(Errno::EBADF, format!("cannot stat the file: {e}")),
        };
        if size == 0 {
            return err(Errno::EINVAL, "the file is empty");
        }
        let seals = memfd::seal_names(memfd::seals(file.as_fd()));
        let writable = memfd::check_writable(file.as_fd()).is_ok();
        let (id, sys_base) = self.add_memory(sid, size, sealed, writable, Backing::File(file))?;
        if !sealed {
            tracing::warn!(session = sid, id, "memory object cannot be sealed; devices must access it without mmap");
        }
        Ok(MemInfo { id, size, sealed, seals, system_address: sys_base, mappings: 0, client_address: None })
    }

    /// Registers client memory: `size` bytes that the session's device
    /// servers reach through their own client, never by mapping them.
    /// `writable` says whether a mapping may allow device writes; `address`
    /// is the client's address of byte 0, kept for channels and observers.
    /// It counts against the session's memory limit like any object.
    pub fn register_client_memory(&mut self, sid: u64, size: u64, writable: bool, address: u64) -> Result<MemInfo> {
        if size == 0 {
            return err(Errno::EINVAL, "client memory of size 0");
        }
        let (id, sys_base) = self.add_memory(sid, size, true, writable, Backing::Client { address })?;
        Ok(MemInfo {
            id,
            size,
            sealed: true,
            seals: "none".into(),
            system_address: sys_base,
            mappings: 0,
            client_address: Some(address),
        })
    }

    /// Places a memory object of `size` bytes (not 0) in the system
    /// address space and gives it to the session: its id and base.
    fn add_memory(
        &mut self,
        sid: u64,
        size: u64,
        sealed: bool,
        writable: bool,
        backing: Backing,
    ) -> Result<(u32, u64)> {
        if !size.is_multiple_of(PAGE_SIZE) {
            return err(Errno::EINVAL, format!("size {size:#x} is not a multiple of 4 KiB"));
        }
        if size > pagetable::MAX_ADDRESS / 2 {
            return err(Errno::E2BIG, format!("size {size:#x} does not fit the system address space"));
        }
        self.charge_memory(sid, size)?;
        let id = self.new_id(sid)?;
        self.step()?;
        let (sys_base, sys_len) = self
            .sys
            .alloc(size)
            .ok_or_else(|| Error { errno: Errno::ENOSPC, message: "the system address space is full".into() })?;
        self.sys_owner.insert(sys_base, (sid, id));
        let obj = MemObj { backing, size, sealed, writable, sys_base, sys_len, refs: 0 };
        self.insert_object(sid, id, Object::Memory(obj))?;
        Ok((id, sys_base))
    }

    /// Fails if the session would hold more than its memory limit with
    /// `size` more bytes of memory objects.
    fn charge_memory(&mut self, sid: u64, size: u64) -> Result<()> {
        let held: u64 =
            self.session(sid)?.objects.values().map(|o| if let Object::Memory(m) = o { m.size } else { 0 }).sum();
        let cap = self.limits.max_memory_bytes_per_session;
        if held.saturating_add(size) > cap {
            return err(
                Errno::ENOSPC,
                format!("the session would hold more than {cap:#x} bytes of memory objects, the configured limit"),
            );
        }
        Ok(())
    }

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

    /// Allocates a nested IOAS on `parent` whose stage-1 root is the parent
    /// IOVA `s1_root`.
    pub fn nested_alloc(&mut self, sid: u64, parent: u32, s1_root: u64) -> Result<u32> {
        match self.object(sid, parent)? {
            Object::Ioas(_) => {}
            Object::Nested(_) => return err(Errno::EINVAL, "cannot nest on a nested IOAS"),
            o => return err(Errno::ENOENT, format!("object {parent} is a {}, not an IOAS", o.kind())),
        }
        check_aligned("stage-1 root", s1_root)?;
        if s1_root > MAX_IOVA {
            return err(Errno::EINVAL, format!("stage-1 root {s1_root:#x} is beyond the 48-bit IOVA space"));
        }
        let id = self.new_id(sid)?;
        self.ioas(sid, parent)?.children += 1;
        self.insert_object(
            sid,
            id,
            Object::Nested(Nested { parent, s1_root, invalidations: 0, attached: BTreeSet::new() }),
        )?;
        Ok(id)
    }

    /// Asks for stage-1 caches of a nested IOAS to be invalidated.
    pub fn invalidate(&mut self, sid: u64, nested: u32, scope: InvalidateScope) -> Result<()> {
        let n = match self.object(sid, nested)? {
            Object::Nested(n) => n,
            Object::Ioas(_) => return err(Errno::EINVAL, format!("object {nested} is a paging IOAS, not nested")),
            o => return err(Errno::ENOENT, format!("object {nested} is a {}, not a nested IOAS", o.kind())),
        };
        if let InvalidateScope::Range { iova, length } = scope {
            check_aligned("IOVA", iova)?;
            check_aligned("length", length)?;
            let last = range_last(iova, length)?;
            if last > MAX_IOVA {
                return err(Errno::EINVAL, "range is beyond the 48-bit IOVA space");
            }
        }
        n.invalidations += 1;
        let range = match scope {
            InvalidateScope::All => None,
            InvalidateScope::Range { iova, length } => Some(IovaRange { start: iova, last: iova + length - 1 }),
        };
        let targets: Vec<(u32, u32)> = n.attached.iter().copied().collect();
        self.queue_invalidations(sid, targets, range);
        Ok(())
    }

    /// Destroys an object; EBUSY while it is referenced.
    pub fn destroy(&mut self, sid: u64, id: u32) -> Result<()> {
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
                    self.effects.forget.entry(chan).or_default().push(m.sys_base);
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
                let garbage = garbage.into_iter().map(|t| (sid, t)).collect();
                // Nothing is attached (checked above), so no walker reaches them.
                self.release_tables(garbage);
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

    fn mem_unref(&mut self, sid: u64, mem: u32) {
        if let Ok(Object::Memory(m)) = self.object(sid, mem) {
            m.refs -= 1;
        }
    }

    fn mem_info(&mut self, sid: u64, mem: u32) -> Result<(u64, u64)> {
        match self.object(sid, mem)? {
            Object::Memory(m) => Ok((m.size, m.sys_base)),
            o => err(Errno::ENOENT, format!("object {mem} is a {}, not a memory object", o.kind())),
        }
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
                format!("[{iova:#x}, {last:#x}] overlaps the mapping at [{s:#x}, {:#x}]", a.last),
            );
        }
        Ok(())
    }

    /// Maps part of a memory object into an IOAS; returns the IOVA. A map
    /// of many leaves is done here in one go: the event loop uses
    /// [`map_begin`](Self::map_begin) and [`job_step`](Self::job_step).
    pub fn map(&mut self, sid: u64, a: MapArgs) -> Result<u64> {
        match self.map_begin(sid, a)? {
            Started::Done(iova) => Ok(iova),
            Started::Job(job) => self.finish(job),
        }
    }

    /// Runs a job to its end.
    fn finish(&mut self, mut job: Job) -> Result<u64> {
        loop {
            if let Some(r) = self.job_step(&mut job) {
                return r;
            }
        }
    }

    /// Starts a map: done at once when it writes at most [`SLICE_LEAVES`]
    /// leaves, else a [`Job`] to run slice by slice with
    /// [`job_step`](Self::job_step), all or nothing like a map done at once.
    pub fn map_begin(&mut self, sid: u64, a: MapArgs) -> Result<Started> {
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
        let area = Area { last: iova + a.length - 1, mem: a.mem, offset: a.offset, perm: a.perm };
        let leaf = leaf_size(iova, base + a.offset);
        if a.length / leaf <= SLICE_LEAVES {
            self.insert_area(sid, a.ioas, iova, area)?;
            return Ok(Started::Done(iova));
        }
        self.step()?;
        Ok(Started::Job(Job { sid, ioas: a.ioas, kind: JobKind::Map { iova, area, done: 0, leaf } }))
    }

    /// Does one slice of a job (at most [`SLICE_LEAVES`] leaves written or
    /// cleared). `None`: more is left. `Some`: the job is over, with the
    /// IOVA of a map or the bytes of an unmap, and its effects (the
    /// invalidations of an unmap, or of a map rolled back) are queued as
    /// any operation's.
    pub fn job_step(&mut self, job: &mut Job) -> Option<Result<u64>> {
        let (sid, ioas) = (job.sid, job.ioas);
        match &mut job.kind {
            JobKind::Map { iova, area, done, leaf } => {
                let (iova, area, leaf) = (*iova, *area, *leaf);
                let len = area.last - iova + 1;
                let cur = iova + *done;
                let stop = slice_end(cur, area.last, leaf);
                let res = self.mem_info(sid, area.mem).and_then(|(_, base)| {
                    let root = self.ioas(sid, ioas)?.root;
                    let s = self.session(sid)?;
                    let a = base + area.offset + (cur - iova);
                    s.pool.map_range(root, cur, a, stop - cur, area.perm, Some(&s.dirty))?;
                    Ok(root)
                });
                match res {
                    Ok(_) if stop - iova < len => {
                        *done = stop - iova;
                        None
                    }
                    Ok(_) => Some(self.map_finished(sid, ioas, iova, area).map(|()| iova)),
                    Err(e) => {
                        // Roll back what earlier slices mapped; devices may
                        // have walked it, so the tables go after the
                        // invalidation.
                        if *done > 0 {
                            let mut garbage = Vec::new();
                            if let (Ok(root), Ok(pool)) = (self.ioas(sid, ioas).map(|i| i.root), self.pool_mut(sid)) {
                                pool.unmap_range(root, iova, *done, &mut garbage);
                            }
                            let range = IovaRange { start: iova, last: iova + *done - 1 };
                            self.retire(sid, ioas, Some(range), garbage);
                        }
                        Some(Err(e))
                    }
                }
            }
            JobKind::Unmap { pieces, next, garbage, total, mems, range } => {
                let Ok(root) = self.ioas(sid, ioas).map(|i| i.root) else {
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
                self.retire(sid, ioas, *range, garbage);
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

    /// Writes one area into the tables and the IOAS; all or nothing.
    fn insert_area(&mut self, sid: u64, ioas_id: u32, iova: u64, area: Area) -> Result<()> {
        self.step()?;
        let (_, base) = self.mem_info(sid, area.mem)?;
        let root = self.ioas(sid, ioas_id)?.root;
        let len = area.last - iova + 1;
        let s = self.session(sid)?;
        s.pool.map_range(root, iova, base + area.offset, len, area.perm, Some(&s.dirty))?;
        self.map_finished(sid, ioas_id, iova, area)
    }

    fn remove_areas(&mut self, sid: u64, ioas_id: u32, starts: &[u64]) -> Result<u64> {
        match self.remove_areas_begin(sid, ioas_id, starts)? {
            Started::Done(total) => Ok(total),
            Started::Job(job) => self.finish(job),
        }
    }

    /// Takes the areas at `starts` out of the IOAS and clears their leaves:
    /// at once when that is at most [`SLICE_LEAVES`] leaves, else as a job.
    fn remove_areas_begin(&mut self, sid: u64, ioas_id: u32, starts: &[u64]) -> Result<Started> {
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
            let sys = self.mem_info(sid, a.mem).map_or(0, |(_, base)| base + a.offset);
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
        self.finish(job).map(Started::Done)
    }

    /// Starts an unmap (see [`unmap`](Self::unmap)): done at once, or a job
    /// to run with [`job_step`](Self::job_step) when it clears many leaves.
    pub fn unmap_begin(&mut self, sid: u64, ioas_id: u32, iova: u64, length: u64) -> Result<Started> {
        let starts = self.unmap_starts(sid, ioas_id, iova, length)?;
        self.remove_areas_begin(sid, ioas_id, &starts)
    }

    /// Unmaps whole mappings inside `[iova, iova+length)`; `(0, u64::MAX)`
    /// unmaps everything. Returns the bytes unmapped.
    pub fn unmap(&mut self, sid: u64, ioas_id: u32, iova: u64, length: u64) -> Result<u64> {
        let starts = self.unmap_starts(sid, ioas_id, iova, length)?;
        self.remove_areas(sid, ioas_id, &starts)
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
                        format!("the mapping at [{s:#x}, {:#x}] is only partly covered", a.last),
                    );
                }
            }
            for (&s, a) in ioas.areas.range(iova..=last) {
                if a.last > last {
                    return err(
                        Errno::ENOENT,
                        format!("the mapping at [{s:#x}, {:#x}] is only partly covered", a.last),
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
    /// returns the destination IOVA.
    pub fn copy(&mut self, sid: u64, a: CopyArgs) -> Result<u64> {
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
            if !area.perm.allows(a.perm) {
                return err(Errno::EPERM, format!("the source mapping at {s:#x} is {}, not {}", area.perm, a.perm));
            }
            let piece_last = area.last.min(src_last);
            pieces.push((
                cur - a.src_iova,
                Area { last: piece_last - cur, mem: area.mem, offset: area.offset + (cur - s), perm: a.perm },
            ));
            if piece_last == u64::MAX {
                break;
            }
            cur = piece_last + 1;
        }
        let first_sys = {
            let (_, base) = self.mem_info(sid, pieces[0].1.mem)?;
            base + pieces[0].1.offset
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
            if let Err(e) = self.insert_area(sid, a.dst, iova, area) {
                self.remove_areas(sid, a.dst, &done)?;
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
                format!("[{start:#x}, {last:#x}] hits the mapping at [{s:#x}, {:#x}]", a.last),
            );
        }
        i.reserved.push(IovaRange { start, last });
        Ok(())
    }

    /// Allocates a pPASID from the global space for the session.
    pub fn ppasid_alloc(&mut self, sid: u64) -> Result<u32> {
        let cap = self.limits.max_ppasids_per_session;
        let s = self.session(sid)?;
        let held = s.ppasids.len()
            + s.objects.values().map(|o| if let Object::Device(d) = o { d.ppasids.len() } else { 0 }).sum::<usize>();
        if held as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the session holds {cap} pPASIDs, the configured limit"));
        }
        self.step()?;
        let p = self
            .pasids
            .alloc()
            .ok_or_else(|| Error { errno: Errno::ENOSPC, message: "the 20-bit pPASID space is exhausted".into() })?;
        self.pasid_owner.insert(p, sid);
        self.session(sid)?.ppasids.push(p);
        Ok(p)
    }

    /// Frees a pPASID the session holds.
    pub fn ppasid_free(&mut self, sid: u64, pasid: u32) -> Result<()> {
        if pasid == 0 || pasid >= PASID_LIMIT {
            return err(Errno::EINVAL, format!("{pasid:#x} is not a pPASID (1..{PASID_LIMIT:#x})"));
        }
        let s = self.session(sid)?;
        let Some(pos) = s.ppasids.iter().position(|p| *p == pasid) else {
            return err(Errno::ENOENT, format!("pPASID {pasid:#x} is not held by this session"));
        };
        s.ppasids.swap_remove(pos);
        self.pasids.free(pasid);
        self.pasid_owner.remove(&pasid);
        Ok(())
    }

    /// pPASIDs in use in the whole core.
    pub fn ppasids_in_use(&self) -> u32 {
        self.pasids.used
    }

    /// Turns dirty tracking of an IOAS on or off; turning it on clears the
    /// dirty state.
    pub fn set_dirty_tracking(&mut self, sid: u64, ioas: u32, enable: bool) -> Result<()> {
        let users = self.users_of(sid, ioas)?;
        if enable {
            for (dev, _) in &users {
                if let Ok(Object::Device(d)) = self.object(sid, *dev) {
                    if !d.caps.dirty_tracking {
                        return err(
                            Errno::EOPNOTSUPP,
                            format!("device {dev} is attached and cannot track dirty pages"),
                        );
                    }
                }
            }
        }
        let i = self.ioas(sid, ioas)?;
        let root = i.root;
        let was = i.dirty;
        i.dirty = enable;
        if enable && !was {
            if let Some(s) = self.sessions.get(&sid) {
                s.pool.clear_dirty(&s.dirty, root);
            }
        }
        if was != enable {
            self.rewrite_entries(sid, &users)?;
        }
        Ok(())
    }

    /// Turns page-fault handling (page requests from PRI-capable devices
    /// reach the session's fault queue and wait for an answer) on or off.
    pub fn set_page_faults(&mut self, sid: u64, ioas: u32, enable: bool) -> Result<()> {
        let users = self.users_of(sid, ioas)?;
        let i = self.ioas(sid, ioas)?;
        if i.iopf != enable {
            i.iopf = enable;
            self.rewrite_entries(sid, &users)?;
        }
        Ok(())
    }

    /// Every (device, pPASID) whose translation goes through the paging IOAS
    /// `ioas`, directly or through a nested IOAS on it.
    fn users_of(&mut self, sid: u64, ioas: u32) -> Result<Vec<(u32, u32)>> {
        self.ioas(sid, ioas)?;
        let s = self.session(sid)?;
        let mut users = Vec::new();
        for (&id, o) in &s.objects {
            match o {
                Object::Ioas(i) if id == ioas => users.extend(i.attached.iter().copied()),
                Object::Nested(n) if n.parent == ioas => users.extend(n.attached.iter().copied()),
                _ => {}
            }
        }
        Ok(users)
    }

    /// The PASID entry a device gets for an attachment to `pt_id`.
    fn entry_for(&mut self, sid: u64, caps: DeviceCaps, pt_id: u32) -> Result<PasidEntry> {
        let (parent, s1_root, nested) = match self.object(sid, pt_id)? {
            Object::Ioas(_) => (pt_id, 0, false),
            Object::Nested(n) => (n.parent, n.s1_root, true),
            o => return err(Errno::ENOENT, format!("object {pt_id} is a {}, not an IOAS", o.kind())),
        };
        let p = self.ioas(sid, parent)?;
        let mut flags = 0;
        if nested {
            flags |= pagetable::PASID_NESTED;
        }
        if p.dirty {
            flags |= pagetable::PASID_DIRTY;
        }
        if p.iopf && caps.pri {
            flags |= pagetable::PASID_IOPF;
        }
        Ok(PasidEntry { flags, s2_root: p.root, s1_root })
    }

    /// Rewrites the PASID entries of `users` after an IOAS setting changed.
    fn rewrite_entries(&mut self, sid: u64, users: &[(u32, u32)]) -> Result<()> {
        for &(dev, pasid) in users {
            let (root, caps, pt) = match self.object(sid, dev)? {
                Object::Device(d) => (d.root, d.caps, d.attach.get(&pasid).copied()),
                _ => continue,
            };
            let Some(pt) = pt else { continue };
            let e = self.entry_for(sid, caps, pt)?;
            let mut pages = Vec::new();
            self.pool_mut(sid)?.pasid_set(root, pasid, e, &mut pages)?;
            debug_assert!(pages.is_empty(), "an attached PASID already has its directory pages");
        }
        let targets = users.to_vec();
        self.queue_invalidations(sid, targets, None);
        Ok(())
    }

    /// Reads (and unless `no_clear`, clears) the dirty bitmap of a range.
    pub fn dirty_bitmap(
        &mut self,
        sid: u64,
        ioas: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        no_clear: bool,
    ) -> Result<Vec<u64>> {
        let max_bytes = u64::from(self.limits.max_message_bytes) / 2;
        let i = self.ioas(sid, ioas)?;
        if !i.dirty {
            return err(Errno::EINVAL, format!("dirty tracking is off on IOAS {ioas}"));
        }
        if page_size == 0 || !page_size.is_power_of_two() {
            return err(Errno::EINVAL, format!("page size {page_size:#x} is not a power of two"));
        }
        let last = range_last(iova, length)?;
        let align = page_size.max(PAGE_SIZE);
        if !iova.is_multiple_of(align) || !length.is_multiple_of(align) {
            return err(Errno::EINVAL, format!("[{iova:#x}, +{length:#x}) is not aligned to {align:#x}"));
        }
        if last > MAX_IOVA {
            return err(Errno::EINVAL, "range is beyond the 48-bit IOVA space");
        }
        if (length / page_size).div_ceil(8) > max_bytes {
            return err(Errno::E2BIG, format!("the bitmap would exceed {max_bytes} bytes"));
        }
        let root = i.root;
        let s = self
            .sessions
            .get(&sid)
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no session {sid}") })?;
        Ok(s.pool.read_dirty(&s.dirty, root, iova, length, page_size, no_clear))
    }

    /// Records a fault for a session (issued by the device side). A
    /// recoverable page request gets a cookie to answer with. Returns the
    /// cookie (0 if not recoverable).
    pub fn report_fault(&mut self, sid: u64, mut rec: FaultRecord, recoverable: bool) -> Result<u64> {
        let depth = self.limits.fault_queue_depth as usize;
        let cookie = if recoverable {
            self.next_cookie += 1;
            self.next_cookie - 1
        } else {
            0
        };
        rec.cookie = cookie;
        self.fault_seq += 1;
        self.stats.faults += 1;
        if self.fault_log.len() == FAULT_LOG {
            self.fault_log.pop_front();
        }
        self.fault_log.push_back(FaultLogEntry { seq: self.fault_seq, session: sid, record: rec.clone() });
        let s = self.session(sid)?;
        if s.faults.len() >= depth {
            s.faults_lost += 1;
            return err(Errno::ENOSPC, "the session's fault queue is full");
        }
        if recoverable {
            if s.pending.len() >= depth {
                s.faults_lost += 1;
                return err(Errno::ENOSPC, "the session has too many page requests waiting for an answer");
            }
            s.pending.insert(cookie, rec.clone());
        }
        s.faults.push_back(rec);
        Ok(cookie)
    }

    /// Takes up to `max` fault records from the session's queue.
    pub fn read_faults(&mut self, sid: u64, max: u32) -> Result<Vec<FaultRecord>> {
        let s = self.session(sid)?;
        let n = (max as usize).min(s.faults.len());
        Ok(s.faults.drain(..n).collect())
    }

    /// Answers a page request; returns the request answered.
    pub fn respond_fault(&mut self, sid: u64, cookie: u64, code: u32) -> Result<FaultRecord> {
        if code != page_response::SUCCESS && code != page_response::INVALID {
            return err(Errno::EINVAL, format!("response code {code} is neither SUCCESS (0) nor INVALID (1)"));
        }
        let s = self.session(sid)?;
        s.pending
            .remove(&cookie)
            .ok_or_else(|| Error { errno: Errno::EINVAL, message: format!("no page request with cookie {cookie}") })
    }

    /// Records that translations of `targets` changed: their channels must
    /// be told before the operation completes.
    fn queue_invalidations(&mut self, sid: u64, targets: Vec<(u32, u32)>, range: Option<IovaRange>) {
        for (dev, pasid) in targets {
            let chan = match self.object(sid, dev) {
                Ok(Object::Device(d)) if !d.fenced => d.channel,
                _ => continue,
            };
            self.effects.invalidations.entry(chan).or_default().push(InvalidateTarget { dev_id: dev, pasid, range });
        }
    }

    /// Frees unlinked table pages now if no device can hold them, else
    /// defers them until the invalidations are answered.
    fn retire(&mut self, sid: u64, ioas: u32, range: Option<IovaRange>, garbage: Vec<u64>) {
        let garbage: Vec<(u64, u64)> = garbage.into_iter().map(|t| (sid, t)).collect();
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
        if direct.is_empty() && nested.is_empty() {
            self.release_tables(garbage);
            return;
        }
        self.queue_invalidations(sid, direct, range);
        // A stage-2 change can hit any stage-1 IOVA of a nested IOAS.
        self.queue_invalidations(sid, nested, None);
        self.effects.garbage.extend(garbage);
    }

    /// Takes the effects of the operations since the last call.
    pub fn take_effects(&mut self) -> Effects {
        let mut e = std::mem::take(&mut self.effects);
        if e.invalidations.is_empty() && e.forget.is_empty() && !e.garbage.is_empty() {
            // Every target was fenced or gone: nobody can hold the pages.
            self.release_tables(std::mem::take(&mut e.garbage));
        }
        e
    }

    /// Returns table pages to their sessions' pools once no walker can
    /// reach them (a closed session's pool went with it).
    pub fn release_tables(&mut self, garbage: Vec<(u64, u64)>) {
        for (sid, t) in garbage {
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.pool.free_table(t);
            }
        }
    }

    /// Opens a device channel for a session; returns its id.
    pub fn open_channel(&mut self, sid: u64) -> Result<u64> {
        self.session(sid)?;
        let cap = self.limits.max_channels_per_session;
        if self.channels_of(sid).len() as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the session has {cap} device channels, the configured limit"));
        }
        self.step()?;
        let c = self.next_channel;
        self.next_channel += 1;
        self.channels.insert(c, sid);
        Ok(c)
    }

    /// The dirty pool of the session a channel speaks for.
    pub fn channel_dirty_pool(&self, chan: u64) -> Option<&DirtyPool> {
        self.sessions.get(self.channels.get(&chan)?).map(|s| &s.dirty)
    }

    /// The session a channel speaks for.
    pub fn channel_session(&self, chan: u64) -> Option<u64> {
        self.channels.get(&chan).copied()
    }

    /// Channels of a session.
    pub fn channels_of(&self, sid: u64) -> Vec<u64> {
        self.channels.iter().filter(|(_, s)| **s == sid).map(|(c, _)| *c).collect()
    }

    fn chan_session(&self, chan: u64) -> Result<u64> {
        self.channels
            .get(&chan)
            .copied()
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: "the channel is closed".into() })
    }

    /// The channel device `dev` of session `sid` was bound through.
    pub fn device_channel(&self, sid: u64, dev: u32) -> Result<u64> {
        let s = self
            .sessions
            .get(&sid)
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no session {sid}") })?;
        match s.objects.get(&dev) {
            Some(Object::Device(d)) => Ok(d.channel),
            _ => err(Errno::ENOENT, format!("no device {dev} in session {sid}")),
        }
    }

    fn device(&mut self, chan: u64, dev: u32) -> Result<(u64, &mut Device)> {
        let sid = self.chan_session(chan)?;
        match self.object(sid, dev)? {
            Object::Device(d) if d.channel == chan => Ok((sid, d)),
            _ => err(Errno::ENOENT, format!("no device {dev} on this channel")),
        }
    }

    /// Binds a device through a channel.
    pub fn bind_device(&mut self, chan: u64, a: BindArgs) -> Result<BoundDevice> {
        let sid = self.chan_session(chan)?;
        if a.caps.pasid_width > 20 {
            return err(Errno::EINVAL, format!("PASID width {} is over 20 bits", a.caps.pasid_width));
        }
        if a.name.len() > 64 || a.pci_address.len() > 32 {
            return err(Errno::EINVAL, "device name over 64 bytes or PCI address over 32 bytes");
        }
        let cap = self.limits.max_devices_per_session;
        let n = self.session(sid)?.objects.values().filter(|o| matches!(o, Object::Device(_))).count();
        if n as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the session has {cap} devices bound, the configured limit"));
        }
        let id = self.new_id(sid)?;
        let root = self.pool_mut(sid)?.alloc_table()?;
        let d = Device {
            channel: chan,
            name: a.name,
            pci_address: a.pci_address,
            caps: a.caps,
            root,
            pages: Vec::new(),
            attach: BTreeMap::new(),
            ppasids: Vec::new(),
            fenced: false,
        };
        if let Err(e) = self.insert_object(sid, id, Object::Device(d)) {
            self.pool_mut(sid)?.free_table(root);
            return Err(e);
        }
        Ok(BoundDevice { dev_id: id, pasid_root: root })
    }

    /// Attaches (or with `replace`, re-attaches) a device's RID (`pasid`
    /// None) or a pPASID to an IOAS or nested IOAS, with iommufd's rules.
    pub fn attach(&mut self, chan: u64, dev: u32, pasid: Option<u32>, pt_id: u32, replace: bool) -> Result<()> {
        let (sid, d) = self.device(chan, dev)?;
        let (caps, root) = (d.caps, d.root);
        let key = match pasid {
            None => 0,
            Some(_) if caps.pasid_width == 0 => {
                return err(Errno::EINVAL, format!("device {dev} has no PASID support"))
            }
            Some(p) if p == 0 || u64::from(p) >= 1u64 << caps.pasid_width => {
                return err(
                    Errno::EINVAL,
                    format!("PASID {p:#x} is outside the device's {}-bit range", caps.pasid_width),
                )
            }
            Some(p) => p,
        };
        let old = d.attach.get(&key).copied();
        match (old, replace) {
            (Some(_), false) => {
                return err(Errno::EBUSY, format!("PASID {key:#x} of device {dev} is attached; use replace"))
            }
            (None, true) => return err(Errno::EINVAL, format!("PASID {key:#x} of device {dev} is not attached")),
            _ => {}
        }
        // Refuses (ENOENT) anything that is not an IOAS or nested IOAS.
        let e = self.entry_for(sid, caps, pt_id)?;
        if e.flags & pagetable::PASID_DIRTY != 0 && !caps.dirty_tracking {
            return err(Errno::EINVAL, format!("IOAS {pt_id} tracks dirty pages and device {dev} cannot"));
        }
        self.step()?;
        let mut pages = Vec::new();
        if let Err(e) = self.pool_mut(sid)?.pasid_set(root, key, e, &mut pages) {
            self.release_tables(pages.into_iter().map(|t| (sid, t)).collect());
            return Err(e.into());
        }
        if let Some(o) = old {
            self.attached_set(sid, o).map(|s| s.remove(&(dev, key)));
        }
        self.attached_set(sid, pt_id).map(|s| s.insert((dev, key)));
        let (_, d) = self.device(chan, dev)?;
        d.attach.insert(key, pt_id);
        d.pages.extend(pages);
        if old.is_some() {
            self.queue_invalidations(sid, vec![(dev, key)], None);
        }
        Ok(())
    }

    fn attached_set(&mut self, sid: u64, pt: u32) -> Option<&mut BTreeSet<(u32, u32)>> {
        match self.object(sid, pt).ok()? {
            Object::Ioas(i) => Some(&mut i.attached),
            Object::Nested(n) => Some(&mut n.attached),
            _ => None,
        }
    }

    /// Detaches a RID or pPASID; detaching what is not attached is a no-op.
    pub fn detach(&mut self, chan: u64, dev: u32, pasid: Option<u32>) -> Result<()> {
        let (sid, d) = self.device(chan, dev)?;
        let key = pasid.unwrap_or(0);
        let root = d.root;
        let Some(pt) = d.attach.remove(&key) else { return Ok(()) };
        self.pool_mut(sid)?.pasid_clear(root, key);
        self.attached_set(sid, pt).map(|s| s.remove(&(dev, key)));
        self.queue_invalidations(sid, vec![(dev, key)], None);
        Ok(())
    }

    /// Allocates a global pPASID for a device (freed when it is unbound).
    pub fn device_ppasid_alloc(&mut self, chan: u64, dev: u32) -> Result<u32> {
        let (sid, _) = self.device(chan, dev)?;
        let p = self.ppasid_alloc(sid)?;
        // The device owns it now, not the session.
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.ppasids.retain(|x| *x != p);
        }
        let (_, d) = self.device(chan, dev)?;
        d.ppasids.push(p);
        Ok(p)
    }

    /// Frees a global pPASID of a device.
    pub fn device_ppasid_free(&mut self, chan: u64, dev: u32, pasid: u32) -> Result<()> {
        let (_, d) = self.device(chan, dev)?;
        let Some(pos) = d.ppasids.iter().position(|p| *p == pasid) else {
            return err(Errno::ENOENT, format!("pPASID {pasid:#x} is not held by device {dev}"));
        };
        d.ppasids.swap_remove(pos);
        self.pasids.free(pasid);
        self.pasid_owner.remove(&pasid);
        Ok(())
    }

    /// Unbinds a device: detaches everything, frees its pPASIDs and its
    /// PASID table (after the invalidation).
    pub fn unbind_device(&mut self, chan: u64, dev: u32) -> Result<()> {
        let (sid, d) = self.device(chan, dev)?;
        let keys: Vec<u32> = d.attach.keys().copied().collect();
        for k in keys {
            self.detach(chan, dev, Some(k).filter(|k| *k != 0))?;
        }
        let Some(Object::Device(d)) = self.session(sid)?.objects.remove(&dev) else {
            return err(Errno::ENOENT, format!("no device {dev}"));
        };
        for p in d.ppasids {
            self.pasids.free(p);
            self.pasid_owner.remove(&p);
        }
        let pages: Vec<(u64, u64)> =
            self.pool_mut(sid)?.pasid_table_pages(d.root).into_iter().map(|t| (sid, t)).collect();
        if self.effects.invalidations.contains_key(&chan) {
            self.effects.garbage.extend(pages);
        } else {
            self.release_tables(pages);
        }
        Ok(())
    }

    /// A channel went away: unbind its devices. Its peer cannot answer
    /// invalidations any more, so nothing waits on it.
    pub fn close_channel(&mut self, chan: u64) {
        let Some(sid) = self.channels.get(&chan).copied() else { return };
        let devs: Vec<u32> = self
            .sessions
            .get(&sid)
            .map(|s| {
                s.objects
                    .iter()
                    .filter(|(_, o)| matches!(o, Object::Device(d) if d.channel == chan))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for d in devs {
            if let Err(e) = self.unbind_device(chan, d) {
                tracing::error!(chan, dev = d, error = %e, "cannot unbind a device of a closed channel");
            }
        }
        self.effects.invalidations.remove(&chan);
        self.effects.forget.remove(&chan);
        self.channels.remove(&chan);
    }

    /// Fences a channel that did not answer an invalidation: every PASID
    /// entry of its devices is cleared and the event is logged.
    pub fn fence_channel(&mut self, chan: u64) {
        let Some(sid) = self.channels.get(&chan).copied() else { return };
        let mut cleared = Vec::new();
        if let Some(s) = self.sessions.get_mut(&sid) {
            for (&id, o) in s.objects.iter_mut() {
                if let Object::Device(d) = o {
                    if d.channel == chan && !d.fenced {
                        d.fenced = true;
                        cleared.push((id, d.root, d.attach.keys().copied().collect::<Vec<u32>>()));
                    }
                }
            }
        }
        for (dev, root, keys) in cleared {
            if let Some(s) = self.sessions.get_mut(&sid) {
                for k in keys {
                    s.pool.pasid_clear(root, k);
                }
            }
            tracing::warn!(chan, dev, "device server did not answer an invalidation in time; fenced");
            let rec = FaultRecord {
                dev_id: dev,
                pasid: 0,
                iova: 0,
                access: Perm::default(),
                reason: FaultReason::Fenced,
                group: 0,
                last: true,
                cookie: 0,
            };
            let _ = self.report_fault(sid, rec, false);
        }
    }

    /// A fault reported by a device; returns the cookie for a page request.
    pub fn device_fault(&mut self, chan: u64, rec: FaultRecord, page_request: bool) -> Result<u64> {
        let (sid, d) = self.device(chan, rec.dev_id)?;
        let recoverable = page_request && d.caps.pri;
        if page_request && !recoverable {
            return err(Errno::EINVAL, format!("device {} did not declare PRI", rec.dev_id));
        }
        self.report_fault(sid, rec, recoverable)
    }

    /// A memory object of the channel's session that contains the system
    /// address.
    pub fn memory_at(&mut self, chan: u64, system_address: u64) -> Result<MemoryAt<'_>> {
        let sid = self.chan_session(chan)?;
        let (&base, &(owner, mem)) = self
            .sys_owner
            .range(..=system_address)
            .next_back()
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no memory at {system_address:#x}") })?;
        if owner != sid {
            return err(Errno::ENOENT, format!("no memory of this session at {system_address:#x}"));
        }
        match self.object(sid, mem)? {
            Object::Memory(m) if system_address < base + m.size => Ok(match &m.backing {
                Backing::File(file) => MemoryAt::File { base, size: m.size, sealed: m.sealed, file },
                Backing::Client { address } => MemoryAt::Client { base, size: m.size, address: *address },
            }),
            _ => err(Errno::ENOENT, format!("no memory of this session at {system_address:#x}")),
        }
    }

    /// The page-table entries of a paging IOAS, one line each (see
    /// [`TablePool::dump`]), at most `max` lines. Nested IOASes have none:
    /// their stage-1 table belongs to the user.
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

    fn session_info(&self, sid: u64, s: &Session, inline: &mut usize) -> SessionInfo {
        let mut memory = Vec::new();
        let mut ioas = Vec::new();
        let mut devices = Vec::new();
        for (&id, o) in &s.objects {
            match o {
                Object::Memory(m) => memory.push(MemInfo {
                    id,
                    size: m.size,
                    sealed: m.sealed,
                    seals: match &m.backing {
                        Backing::File(f) => memfd::seal_names(memfd::seals(f.as_fd())),
                        Backing::Client { .. } => "none".into(),
                    },
                    system_address: m.sys_base,
                    mappings: m.refs,
                    client_address: match m.backing {
                        Backing::File(_) => None,
                        Backing::Client { address } => Some(address),
                    },
                }),
                Object::Ioas(i) => ioas.push(IoasInfo {
                    id,
                    kind: IoasKind::Paging,
                    mappings: {
                        let n = i.areas.len().min(*inline);
                        *inline -= n;
                        i.areas.iter().take(n).map(mapping_info).collect()
                    },
                    mappings_total: i.areas.len() as u64,
                    iova_ranges: i.iova_ranges(),
                    allowed: i.allowed.clone(),
                    reserved: i.reserved.clone(),
                    dirty_tracking: i.dirty,
                    root: i.root,
                    tables: s.pool.count_tables(i.root),
                    children: i.children,
                    attached: i.attached.iter().copied().collect(),
                    stats: i.stats,
                }),
                Object::Nested(n) => ioas.push(IoasInfo {
                    id,
                    kind: IoasKind::Nested { parent: n.parent, s1_root: n.s1_root },
                    mappings: Vec::new(),
                    mappings_total: 0,
                    iova_ranges: Vec::new(),
                    allowed: Vec::new(),
                    reserved: Vec::new(),
                    dirty_tracking: false,
                    root: 0,
                    tables: 0,
                    children: 0,
                    attached: n.attached.iter().copied().collect(),
                    stats: IoasStats { invalidations: n.invalidations, ..IoasStats::default() },
                }),
                Object::Device(d) => devices.push(DeviceInfo {
                    id,
                    name: d.name.clone(),
                    pci_address: d.pci_address.clone(),
                    caps: d.caps,
                    channel: d.channel,
                    attachments: d.attach.iter().map(|(&pasid, &pt_id)| AttachmentInfo { pasid, pt_id }).collect(),
                    ppasids: d.ppasids.clone(),
                    fenced: d.fenced,
                    pasid_root: d.root,
                }),
            }
        }
        SessionInfo {
            id: sid,
            pid: s.pid,
            uid: s.uid,
            objects: s.objects.len() as u32,
            memory,
            ioas,
            ppasids: s.ppasids.clone(),
            faults_queued: s.faults.len() as u32,
            faults_lost: s.faults_lost,
            devices,
        }
    }

    /// A snapshot of everything, or of one session only.
    pub fn snapshot(&self, only: Option<u64>) -> Snapshot {
        self.snapshot_limited(only, usize::MAX)
    }

    /// Up to `max` mappings of a paging IOAS of session `sid` (or of any
    /// session when `only` is `None`), starting at the first whose IOVA is
    /// `after` or above.
    pub fn mappings_page(
        &self,
        only: Option<u64>,
        sid: u64,
        ioas: u32,
        after: u64,
        max: usize,
    ) -> Result<Vec<MappingInfo>> {
        let s = self
            .sessions
            .get(&sid)
            .filter(|_| only.is_none_or(|o| o == sid))
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no session {sid}") })?;
        match s.objects.get(&ioas) {
            Some(Object::Ioas(i)) => Ok(i.areas.range(after..).take(max).map(mapping_info).collect()),
            _ => err(Errno::ENOENT, format!("no paging IOAS {ioas} in session {sid}")),
        }
    }

    /// A snapshot that lists at most `inline` mappings in all, the first
    /// of each IOAS in session and IOAS order; `mappings_total` says how
    /// many each holds.
    pub fn snapshot_limited(&self, only: Option<u64>, mut inline: usize) -> Snapshot {
        let sessions = self
            .sessions
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o == **id))
            .map(|(id, s)| self.session_info(*id, s, &mut inline))
            .collect();
        Snapshot {
            sessions,
            ppasids: self
                .pasid_owner
                .iter()
                .filter(|(_, s)| only.is_none_or(|o| o == **s))
                .map(|(p, s)| (*p, *s))
                .collect(),
            pool: PoolInfo {
                bytes: (u64::from(self.budget.cap()) + 1) * PAGE_SIZE,
                tables_in_use: self.budget.used(),
                capacity: self.budget.cap(),
            },
            faults: self.fault_log.iter().filter(|f| only.is_none_or(|o| o == f.session)).cloned().collect(),
            stats: self.stats,
            limits: self.limits,
        }
    }

    /// Sessions open now.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core_with(limits: Limits) -> (Core, u64) {
        let mut c = Core::new(Limits { table_pool_bytes: 1 << 20, ..limits }).unwrap();
        let sid = c.open_session(1, 0).unwrap();
        (c, sid)
    }

    fn rec(iova: u64) -> FaultRecord {
        FaultRecord {
            dev_id: 3,
            pasid: 5,
            iova,
            access: Perm::W,
            reason: FaultReason::NotPresent,
            group: 1,
            last: true,
            cookie: 0,
        }
    }

    #[test]
    fn fault_queue_records_answers_and_drops_when_full() {
        let (mut c, sid) = core_with(Limits { fault_queue_depth: 2, ..Limits::default() });
        let cookie = c.report_fault(sid, rec(0x1000), true).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(c.report_fault(sid, rec(0x2000), false).unwrap(), 0);
        let e = c.report_fault(sid, rec(0x3000), false).unwrap_err();
        assert_eq!(e.errno, Errno::ENOSPC);
        let snap = c.snapshot(Some(sid));
        assert_eq!((snap.sessions[0].faults_queued, snap.sessions[0].faults_lost), (2, 1));
        assert_eq!(snap.faults.len(), 3, "the global log keeps every fault");
        assert_eq!(snap.faults[2].record.iova, 0x3000);

        let got = c.read_faults(sid, 1).unwrap();
        assert_eq!((got.len(), got[0].iova, got[0].cookie), (1, 0x1000, cookie));
        assert_eq!(c.read_faults(sid, 10).unwrap().len(), 1);
        assert!(c.read_faults(sid, 10).unwrap().is_empty());

        assert_eq!(c.respond_fault(sid, cookie, 7).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(c.respond_fault(sid, cookie, page_response::SUCCESS).unwrap().iova, 0x1000);
        assert_eq!(c.respond_fault(sid, cookie, page_response::SUCCESS).unwrap_err().errno, Errno::EINVAL);
        // Another session cannot answer it.
        let other = c.open_session(2, 0).unwrap();
        let cookie = c.report_fault(sid, rec(0x4000), true).unwrap();
        assert_eq!(c.respond_fault(other, cookie, page_response::INVALID).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(c.respond_fault(sid, cookie, page_response::INVALID).unwrap().iova, 0x4000);
    }

    #[test]
    fn an_unsealable_file_shrunk_under_a_mapping_hurts_nothing() {
        let (mut c, sid) = core_with(Limits::default());
        let path = std::env::temp_dir().join(format!("ioasid-shrink-{}", std::process::id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(0x4000).unwrap();
        let m = c.register_memory(sid, OwnedFd::from(f.try_clone().unwrap())).unwrap();
        assert!(!m.sealed);
        assert_eq!(m.seals, "unsupported");
        let ioas = c.ioas_alloc(sid).unwrap();
        let args = MapArgs { ioas, mem: m.id, offset: 0, length: 0x4000, iova: Some(0x10000), perm: Perm::RW };
        c.map(sid, args).unwrap();
        f.set_len(0).unwrap();
        // The core never touches the file's pages; it keeps translating and serving.
        assert_eq!(c.translate(sid, ioas, 0x13000).unwrap().offset, 0x3000);
        assert_eq!(c.unmap(sid, ioas, 0, u64::MAX).unwrap(), 0x4000);
        c.destroy(sid, m.id).unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_map_done_in_slices_is_the_map_done_at_once() {
        let (mut c, sid) = core_with(Limits::default());
        let m = c.register_memory(sid, OwnedFd::from(memfd::create("m", 1 << 30).unwrap())).unwrap();
        let ioas = c.ioas_alloc(sid).unwrap();
        // Offset 4 KiB against a 2 MiB aligned IOVA: 4 KiB leaves only.
        let len = (SLICE_LEAVES * 3 + 5) * PAGE_SIZE;
        let args = MapArgs { ioas, mem: m.id, offset: PAGE_SIZE, length: len, iova: Some(1 << 30), perm: Perm::RW };
        let Started::Job(mut job) = c.map_begin(sid, args).unwrap() else { panic!("a long map must be a job") };
        let mut slices = 1;
        let iova = loop {
            if let Some(r) = c.job_step(&mut job) {
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
        c.session(sid).unwrap().pool.map_range(root, 1 << 30, sys, len, Perm::RW, None).unwrap();
        assert_eq!(c.tables_in_use() - tables - 1, tables - 1, "same tables either way");
        // An unmap of it is a job too, and leaves nothing behind.
        let Started::Job(job) = c.unmap_begin(sid, ioas, 0, u64::MAX).unwrap() else { panic!("a long unmap") };
        assert_eq!(c.finish(job).unwrap(), len);
        let garbage = c.take_effects().garbage;
        c.release_tables(garbage);
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
        let Started::Job(job) = c.map_begin(sid, args).unwrap() else { panic!("a long map must be a job") };
        assert_eq!(c.finish(job).unwrap_err().errno, Errno::ENOSPC);
        let garbage = c.take_effects().garbage;
        c.release_tables(garbage);
        assert_eq!(c.tables_in_use(), before, "the slices mapped before the failure were undone");
        assert!(c.translate(sid, ioas, 1 << 30).is_err());
        assert_eq!(c.snapshot(Some(sid)).sessions[0].ioas[0].mappings.len(), 0);
        c.destroy(sid, m.id).unwrap();
    }

    #[test]
    fn closing_a_session_frees_everything_leaf_first() {
        let (mut c, sid) = core_with(Limits::default());
        let m = c.register_memory(sid, OwnedFd::from(memfd::create("m", 2 << 20).unwrap())).unwrap();
        let a = c.ioas_alloc(sid).unwrap();
        let b = c.ioas_alloc(sid).unwrap();
        c.map(sid, MapArgs { ioas: a, mem: m.id, offset: 0, length: 2 << 20, iova: None, perm: Perm::RW }).unwrap();
        c.copy(sid, CopyArgs { dst: b, src: a, src_iova: 2 << 20, length: 4096, dst_iova: None, perm: Perm::R })
            .unwrap();
        c.nested_alloc(sid, a, 0).unwrap();
        c.ppasid_alloc(sid).unwrap();
        assert!(c.tables_in_use() > 2);
        c.close_session(sid);
        assert_eq!(c.tables_in_use(), 0);
        assert_eq!(c.ppasids_in_use(), 0);
        assert_eq!(c.session_count(), 0);
        assert_eq!(c.sys.fragments(), 1, "system address space fully returned");
    }
}
