//! The translation unit: the IOMMU "hardware" a device server links.
//!
//! It maps the core's table pool read-only and the memory objects its
//! devices reach, and translates `(device, pPASID, IOVA)` by walking the
//! tables in shared memory, without asking the core. Results are cached in
//! an IOTLB keyed by 4 KiB page, each entry holding the translation of its
//! whole leaf; a "not present" answer is never cached.
//! Nested attachments are walked in two stages: the user's stage-1 table
//! (whose addresses are parent IOVAs) and the parent's stage-2 table.
//!
//! **The invalidation handshake.** Every DMA runs under a read guard; an
//! invalidation from the core takes the write guard, so it waits until
//! every DMA that started before it has finished, drops the IOTLB entries,
//! and only then is answered. The core frees table pages and completes an
//! unmap only after that answer, so no DMA touches memory after the unmap
//! has returned.
//!
//! A failed walk or permission check is a fault: reported to the core
//! (rate-limited), or, when the PASID entry allows page requests and the
//! device declared PRI, sent as a page request; on SUCCESS the access is
//! retried, on INVALID or timeout it fails.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::device::{self, Channel, InvalidationHandler};
use crate::pagetable::{
    pasid_lookup, walk, walk_nested, NestedError, Stage1, TableMemory, WalkError, DIRTY_BYTES_PER_TABLE, ENTRIES,
    PAGE_SIZE, PASID_DIRTY, PASID_IOPF, PASID_NESTED,
};
use crate::shm;
use crate::sync;
use crate::types::*;

/// Errors of DMA through the translation unit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The access faulted.
    #[error("DMA fault at IOVA {iova:#x} (device {dev}, PASID {pasid:#x}): {reason:?}")]
    Fault {
        /// Device.
        dev: u32,
        /// pPASID.
        pasid: u32,
        /// Faulting IOVA.
        iova: u64,
        /// Why.
        reason: FaultReason,
    },
    /// The device is not bound through this unit.
    #[error("device {0} is not bound through this translation unit")]
    NoDevice(u32),
    /// Talking to the core failed.
    #[error(transparent)]
    Channel(#[from] device::Error),
    /// Mapping shared memory failed.
    #[error("cannot map shared memory: {0}")]
    Map(std::io::Error),
    /// A page of a memory object that a copy could not reach (a file that
    /// shrank under its mapping); reported as a translation fault.
    #[error("a page of the memory object is gone")]
    Unreachable,
    /// The access translated, but the client holding the memory (client
    /// memory: see [`ClientMemory`]) did not complete it. Not a
    /// translation fault: nothing is reported to the core.
    #[error("client memory at {address:#x}: {message}")]
    Client {
        /// The client's address of the access.
        address: u64,
        /// errno for the wire (`ETIMEDOUT` for no answer in time,
        /// `ECANCELED` for an access given up by the device server, the
        /// client's own errno for a refusal).
        errno: i32,
        /// What happened.
        message: String,
    },
}

/// Why the client did not complete an access to client memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFailure {
    /// errno (see [`Error::Client`]).
    pub errno: i32,
    /// What happened, as a sentence for logs.
    pub message: String,
}

/// The way to memory that a device server reaches through its own client
/// rather than a file: client memory objects (registered with
/// [`crate::client::Client::register_client_memory`]) translate like any
/// other, and only the final copy comes here, at the client's address.
pub trait ClientMemory: Send + Sync {
    /// Fills `buf` from the client's memory at `address`.
    fn read(&self, address: u64, buf: &mut [u8]) -> std::result::Result<(), ClientFailure>;
    /// Writes `data` to the client's memory at `address`.
    fn write(&self, address: u64, data: &[u8]) -> std::result::Result<(), ClientFailure>;
}

/// Result of a DMA.
pub type Result<T> = std::result::Result<T, Error>;

/// Settings of a translation unit.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// IOTLB capacity in 4 KiB entries (emptied when full).
    pub iotlb_entries: usize,
    /// How long a DMA waits for the answer to a page request.
    pub page_request_timeout: Duration,
    /// Fault reports sent to the core per second, at most.
    pub fault_reports_per_sec: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { iotlb_entries: 1 << 16, page_request_timeout: Duration::from_secs(5), fault_reports_per_sec: 1000 }
    }
}

/// Counters of a translation unit.
#[derive(Debug, Default)]
pub struct Stats {
    /// IOTLB hits.
    pub hits: AtomicU64,
    /// IOTLB misses (walks).
    pub misses: AtomicU64,
    /// Faults.
    pub faults: AtomicU64,
    /// Fault reports dropped by the rate limit.
    pub faults_suppressed: AtomicU64,
    /// Page requests sent.
    pub page_requests: AtomicU64,
    /// Invalidations handled.
    pub invalidations: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct DeviceState {
    root: u64,
    caps: DeviceCaps,
}

#[derive(Debug, Clone, Copy)]
struct Iotlb {
    /// IOVA where the translated run starts (a leaf boundary).
    iova_base: u64,
    /// System address of `iova_base`.
    sys_base: u64,
    /// Bytes the run covers (the leaf size; 4 KiB for nested walks).
    size: u64,
    perm: Perm,
    /// Stage-2 leaf to mark dirty on write.
    dirty: Option<(u64, usize)>,
}

/// A memory object as a device sees it.
struct MemObject {
    base: u64,
    size: u64,
    backing: Backing,
}

/// How a device reaches a memory object's bytes.
enum Backing {
    /// Through a shared mapping of its file: with plain volatile copies if
    /// the file is sealed against shrinking (and not on hugetlbfs, whose
    /// pages can run out), else through the kernel, so that a page past
    /// the end is an error, never SIGBUS, and a write never grows the file
    /// (see [`shm::Bytes`]).
    Mapped(shm::Bytes),
    /// Client memory: through the unit's [`ClientMemory`], at `address`
    /// plus the offset.
    Client { address: u64 },
}

impl MemObject {
    /// One table entry of a stage-1 table; client memory holds none (the
    /// walk faults).
    fn load_u64(&self, off: u64) -> Option<u64> {
        if off.checked_add(8)? > self.size {
            return None;
        }
        match &self.backing {
            Backing::Mapped(b) => b.load_u64(off),
            Backing::Client { .. } => None,
        }
    }
}

/// The table pool, mapped read-only.
struct Pool {
    words: shm::ReadOnlyWords,
}

impl TableMemory for Pool {
    fn load(&self, table: u64, index: usize) -> Option<u64> {
        if table == 0 || !table.is_multiple_of(PAGE_SIZE) || index >= ENTRIES {
            return None;
        }
        self.words.load(table.checked_add(index as u64 * 8)?)
    }
}

fn find_mem(mems: &BTreeMap<u64, Arc<MemObject>>, sys: u64) -> Option<&Arc<MemObject>> {
    let (_, m) = mems.range(..=sys).next_back()?;
    (sys < m.base + m.size).then_some(m)
}

/// The copy of one run of an access: `(object, offset in it, offset in
/// the access, bytes)`.
type CopyOp<'a> = &'a mut dyn FnMut(&MemObject, u64, usize, usize) -> Result<()>;

#[derive(Clone, Copy)]
struct Access {
    dev: u32,
    st: DeviceState,
    pasid: u32,
    iova: u64,
    len: usize,
    want: Perm,
}

enum Outcome {
    Done,
    NeedMemory(u64),
    Fault(u64, FaultReason, bool),
}

/// How many translations the checking pass of an access keeps for its
/// copying pass (a 64 KiB access in 4 KiB leaves needs 16).
const LOOKED: usize = 16;

/// The translations an access's checking pass found, in IOVA order, so
/// that its copying pass does not look them up again (past [`LOOKED`] of
/// them it does, hitting the IOTLB).
#[derive(Default)]
struct Looked {
    entries: [Option<Iotlb>; LOOKED],
    len: usize,
    next: usize,
    replaying: bool,
}

impl Looked {
    fn record(&mut self, e: Iotlb) {
        if !self.replaying && self.len < LOOKED {
            self.entries[self.len] = Some(e);
            self.len += 1;
        }
    }

    /// Switches from recording to replaying.
    fn rewind(&mut self) {
        self.replaying = true;
        self.next = 0;
    }

    /// The next recorded translation, if it covers `page`.
    fn replay(&mut self, page: u64) -> Option<Iotlb> {
        if !self.replaying || self.next >= self.len {
            return None;
        }
        let e = self.entries[self.next].filter(|e| page >= e.iova_base && page - e.iova_base < e.size)?;
        self.next += 1;
        Some(e)
    }
}

/// The translation unit of a device server.
pub struct TranslationUnit {
    channel: Arc<Channel>,
    pool: Pool,
    dirty: shm::Words,
    mems: RwLock<BTreeMap<u64, Arc<MemObject>>>,
    /// The way to client memory objects, if this unit's device server has
    /// a client that holds memory.
    client: RwLock<Option<Arc<dyn ClientMemory>>>,
    iotlb: Mutex<HashMap<(u32, u32, u64), Iotlb>>,
    dma: RwLock<()>,
    devices: RwLock<HashMap<u32, DeviceState>>,
    config: Config,
    stats: Stats,
    rate: Mutex<(Instant, u64)>,
}

struct Handler(Weak<TranslationUnit>);

impl InvalidationHandler for Handler {
    fn invalidate(&self, targets: &[InvalidateTarget], forget: &[u64]) {
        if let Some(tu) = self.0.upgrade() {
            tu.invalidate(targets, forget);
        }
    }

    fn closed(&self) {
        if let Some(tu) = self.0.upgrade() {
            tu.forget_all();
        }
    }
}

/// Whether `file` is on hugetlbfs, whose pages are taken from a fixed pool
/// when first touched: a direct access to one the pool cannot supply
/// raises SIGBUS.
fn on_hugetlbfs(file: &File) -> bool {
    // Memory objects never live on file systems that block (the core
    // refuses them), so fstatfs answers at once.
    nix::sys::statfs::fstatfs(file).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC)
}

impl TranslationUnit {
    /// Fetches and maps the pools over `channel` and starts answering its
    /// invalidations.
    pub fn new(channel: Arc<Channel>, config: Config) -> Result<Arc<TranslationUnit>> {
        let (pool_fd, pool_len, dirty_fd, dirty_len) = channel.pools()?;
        let pool = Pool { words: shm::ReadOnlyWords::map(&File::from(pool_fd), pool_len).map_err(Error::Map)? };
        let dirty = shm::Words::map(&File::from(dirty_fd), dirty_len).map_err(Error::Map)?;
        let tu = Arc::new(TranslationUnit {
            channel: channel.clone(),
            pool,
            dirty,
            mems: RwLock::new(BTreeMap::new()),
            client: RwLock::new(None),
            iotlb: Mutex::new(HashMap::new()),
            dma: RwLock::new(()),
            devices: RwLock::new(HashMap::new()),
            config,
            stats: Stats::default(),
            rate: Mutex::new((Instant::now(), 0)),
        });
        channel.set_handler(Arc::new(Handler(Arc::downgrade(&tu))));
        Ok(tu)
    }

    /// The channel to the core.
    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// Sets the way to client memory objects (`None`: accesses to them
    /// fail with `ENOTCONN`).
    pub fn set_client_memory(&self, c: Option<Arc<dyn ClientMemory>>) {
        *sync::write(&self.client) = c;
    }

    /// Runs a copy of client memory at `address` through the client.
    fn client_copy(
        &self,
        address: u64,
        f: impl FnOnce(&dyn ClientMemory) -> std::result::Result<(), ClientFailure>,
    ) -> Result<()> {
        let c = sync::read(&self.client).clone();
        let r = match c {
            Some(c) => f(&*c),
            None => Err(ClientFailure {
                errno: libc::ENOTCONN,
                message: "the device server has no client holding this memory".into(),
            }),
        };
        r.map_err(|e| Error::Client { address, errno: e.errno, message: e.message })
    }

    /// Reads `buf` from `off` of a memory object.
    fn mem_read(&self, m: &MemObject, off: u64, buf: &mut [u8]) -> Result<()> {
        match m.backing {
            Backing::Mapped(ref b) => b.read(off, buf).map_err(|_| Error::Unreachable),
            Backing::Client { address } => {
                let at = address.wrapping_add(off);
                self.client_copy(at, |c| c.read(at, buf))
            }
        }
    }

    /// Writes `data` at `off` of a memory object.
    fn mem_write(&self, m: &MemObject, off: u64, data: &[u8]) -> Result<()> {
        match m.backing {
            Backing::Mapped(ref b) => b.write(off, data).map_err(|_| Error::Unreachable),
            Backing::Client { address } => {
                let at = address.wrapping_add(off);
                self.client_copy(at, |c| c.write(at, data))
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Binds a device through the channel and starts translating for it.
    pub fn bind(&self, args: BindArgs) -> Result<BoundDevice> {
        let caps = args.caps;
        let b = self.channel.bind(args)?;
        sync::write(&self.devices).insert(b.dev_id, DeviceState { root: b.pasid_root, caps });
        Ok(b)
    }

    /// Unbinds a device.
    pub fn unbind(&self, dev: u32) -> Result<()> {
        self.channel.unbind(dev)?;
        sync::write(&self.devices).remove(&dev);
        Ok(())
    }

    fn invalidate(&self, targets: &[InvalidateTarget], forget: &[u64]) {
        // Waits for every DMA in flight: they hold the read side.
        let _all = sync::write(&self.dma);
        sync::lock(&self.iotlb).retain(|&(dev, pasid, _), e| {
            !targets.iter().any(|x| {
                x.dev_id == dev
                    && x.pasid == pasid
                    && x.range.is_none_or(|r| e.iova_base <= r.last && e.iova_base + e.size > r.start)
            })
        });
        if !forget.is_empty() {
            let mut m = sync::write(&self.mems);
            for b in forget {
                m.remove(b);
            }
        }
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// The channel closed: no device of this unit translates any more
    /// (accesses fail with [`Error::NoDevice`]), and nothing cached or
    /// mapped through it stays, once DMA in flight has ended.
    fn forget_all(&self) {
        let _all = sync::write(&self.dma);
        sync::write(&self.devices).clear();
        sync::lock(&self.iotlb).clear();
        sync::write(&self.mems).clear();
    }

    fn mark_dirty(&self, table: u64, index: usize) {
        let bit = (table / PAGE_SIZE) * (ENTRIES as u64) + index as u64;
        if table / PAGE_SIZE * DIRTY_BYTES_PER_TABLE >= self.dirty.len() as u64 {
            return;
        }
        if let Some(w) = self.dirty.u64((bit / 64) * 8) {
            w.fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    /// Walks the tables for one 4 KiB page.
    fn walk_page(
        &self,
        st: &DeviceState,
        pasid: u32,
        iova: u64,
    ) -> std::result::Result<Iotlb, (FaultReason, bool, Option<u64>)> {
        let Some(e) = pasid_lookup(&self.pool, st.root, pasid) else { return Err((FaultReason::NoPasid, false, None)) };
        let iopf = e.flags & PASID_IOPF != 0;
        let reason = |w: WalkError| match w {
            WalkError::NotPresent(_) | WalkError::OutOfRange(_) => FaultReason::NotPresent,
            _ => FaultReason::Malformed,
        };
        let (leaf, perm) = if e.flags & PASID_NESTED != 0 {
            // Stage-1 tables live in memory objects at parent IOVAs; a walk
            // that meets an object this unit has not mapped yet says so.
            let need = Cell::new(None);
            let read = |sys: u64| {
                let mems = sync::read(&self.mems);
                match find_mem(&mems, sys) {
                    Some(m) => m.load_u64(sys - m.base),
                    None => {
                        need.set(Some(sys));
                        None
                    }
                }
            };
            let s1 = Stage1 { s2: &self.pool, s2_root: e.s2_root, read };
            match walk_nested(&s1, e.s1_root, iova) {
                Ok(l) => (l.s2, l.perm),
                Err(NestedError::Stage1(w)) => {
                    let r = if matches!(w, WalkError::BadTable(..)) { FaultReason::NotPresent } else { reason(w) };
                    return Err((r, iopf, need.get()));
                }
                Err(NestedError::Stage2(w)) => return Err((reason(w), iopf, None)),
            }
        } else {
            let leaf = walk(&self.pool, e.s2_root, iova).map_err(|w| (reason(w), iopf, None))?;
            (leaf, leaf.perm)
        };
        let dirty = (e.flags & PASID_DIRTY != 0).then_some((leaf.table, leaf.index));
        // A nested translation is only known to hold for its 4 KiB page.
        let size = if e.flags & PASID_NESTED != 0 { PAGE_SIZE } else { leaf.page_size };
        let iova_base = iova & !(size - 1);
        Ok(Iotlb { iova_base, sys_base: leaf.address - (iova - iova_base), size, perm, dirty })
    }

    fn lookup(
        &self,
        dev: u32,
        st: &DeviceState,
        pasid: u32,
        page: u64,
    ) -> std::result::Result<Iotlb, (FaultReason, bool, Option<u64>)> {
        let key = (dev, pasid, page >> 12);
        let cached = sync::lock(&self.iotlb).get(&key).copied();
        if let Some(e) = cached {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(e);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let e = self.walk_page(st, pasid, page)?;
        let mut t = sync::lock(&self.iotlb);
        if t.len() >= self.config.iotlb_entries {
            t.clear();
        }
        t.insert(key, e);
        Ok(e)
    }

    /// The translation of `page`: from the IOTLB or a walk, or, in the
    /// copying pass of an access, as its checking pass found it.
    fn entry(
        &self,
        dev: u32,
        st: &DeviceState,
        pasid: u32,
        page: u64,
        looked: &mut Looked,
    ) -> std::result::Result<Iotlb, (FaultReason, bool, Option<u64>)> {
        if let Some(e) = looked.replay(page) {
            return Ok(e);
        }
        let e = self.lookup(dev, st, pasid, page)?;
        looked.record(e);
        Ok(e)
    }

    /// One pass over an access: translates every leaf of it and, given
    /// `op`, copies each run. Without `op` it only checks that every byte
    /// translates with the rights asked (the checking pass of a write, or
    /// [`TranslationUnit::check`]).
    fn try_access(
        &self,
        a: &Access,
        mut op: Option<CopyOp<'_>>,
        looked: &mut Looked,
    ) -> Result<Outcome> {
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

    fn map_memory(&self, sys: u64) -> Result<()> {
        let (base, size, backing) = match self.channel.memory(sys)? {
            device::Memory::File { fd, base, size, sealed } => {
                let file = File::from(fd);
                // A file the session may only read maps read-only: writes
                // to it fault (the core refuses writable mappings of it).
                let direct = sealed && !on_hugetlbfs(&file);
                (base, size, Backing::Mapped(shm::Bytes::map(&file, size, direct).map_err(Error::Map)?))
            }
            device::Memory::Client { base, size, address } => (base, size, Backing::Client { address }),
        };
        sync::write(&self.mems).insert(base, Arc::new(MemObject { base, size, backing }));
        Ok(())
    }

    fn report(&self, rec: FaultRecord) {
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

    fn access(
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

    fn fail(&self, dev: u32, pasid: u32, iova: u64, access: Perm, reason: FaultReason) -> Result<()> {
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

    /// DMA write: copies `data` to `iova` of `(dev, pasid)`, all or
    /// nothing: the whole range is translated (faults, page requests and
    /// memory fetches happen then) before its first byte is written, and
    /// no invalidation completes in between.
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

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    use super::*;
    use crate::client::Client;
    use crate::sync::tests::{run_child, CHILD};

    const IOVA: u64 = 0x10_0000;
    const MARKER: &[u8; 8] = b"mapped!!";

    /// A device whose RID reaches one page of memory, and the session that
    /// mapped it there.
    pub(crate) struct Rig {
        pub(crate) tu: Arc<TranslationUnit>,
        s: Client,
        dev: u32,
        ioas: u32,
        _mem: File,
        _srv: crate::server::Running,
    }

    /// In the directory [`CHILD`] names: a core, a session, and a device
    /// whose RID reaches a page holding [`MARKER`] at [`IOVA`], read once
    /// by DMA so that its translation is in the IOTLB.
    pub(crate) fn rig() -> Rig {
        let sock = PathBuf::from(std::env::var(CHILD).unwrap()).join("core.sock");
        // The core waits for the invalidation's answer as long as the test
        // may take: it never gives up on it and completes the unmap.
        let limits = Limits { table_pool_bytes: 16 << 20, invalidate_timeout_ms: 600_000, ..Limits::default() };
        let srv = crate::server::spawn(&sock, limits).unwrap();
        let mut s = Client::session(&sock).unwrap();
        let (_, fd) = s.open_device_channel().unwrap();
        let tu = TranslationUnit::new(Arc::new(Channel::new(fd).unwrap()), Config::default()).unwrap();
        let caps = DeviceCaps { pasid_width: 0, pri: false, dirty_tracking: false };
        let dev = tu.bind(BindArgs { name: "poison".into(), pci_address: "0000:00:05.0".into(), caps }).unwrap().dev_id;
        let mem = crate::memfd::create("ram", 1 << 20).unwrap();
        mem.write_all_at(MARKER, 0).unwrap();
        let m = s.register_memory(&mem).unwrap().id;
        let ioas = s.ioas_alloc().unwrap();
        s.map(MapArgs { ioas, mem: m, offset: 0, length: PAGE_SIZE, iova: Some(IOVA), perm: Perm::RW }).unwrap();
        tu.channel().attach(dev, None, ioas).unwrap();
        let mut b = [0u8; 8];
        tu.read(dev, 0, IOVA, &mut b).unwrap();
        assert_eq!(&b, MARKER);
        assert_eq!(sync::lock(&tu.iotlb).len(), 1);
        Rig { tu, s, dev, ioas, _mem: mem, _srv: srv }
    }

    impl Rig {
        /// Unmaps the page and has the device read it again, saying on
        /// stdout how far it got.
        pub(crate) fn unmap_and_read(&mut self) {
            println!("POISONED");
            self.s.unmap(self.ioas, IOVA, PAGE_SIZE).unwrap();
            println!("UNMAP RETURNED");
            let mut b = [0u8; 8];
            match self.tu.read(self.dev, 0, IOVA, &mut b) {
                Ok(()) => println!("DMA AFTER THE UNMAP READ {:?}", String::from_utf8_lossy(&b)),
                Err(e) => println!("DMA AFTER THE UNMAP FAILED: {e}"),
            }
        }
    }

    /// Runs the helper test `name` (which poisons a lock and calls
    /// [`Rig::unmap_and_read`]) in a child process and asserts that the
    /// child aborted, with the log line of a poisoned mutex, before the
    /// unmap returned.
    pub(crate) fn assert_unmap_aborts(name: &str) {
        let short = name.rsplit("::").next().unwrap_or(name);
        let dir = std::env::temp_dir().join(format!("ioasid-poison-{}-{short}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = run_child(name, dir.to_str().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        c.assert_aborted("POISONED", "UNMAP RETURNED");
        assert!(c.stderr.contains("fatal: a thread panicked while holding a mutex"), "{}", c.stderr);
    }

    #[test]
    #[ignore = "child process of an_invalidation_meeting_a_poisoned_iotlb_aborts; not a test by itself"]
    fn poisoned_iotlb_child() {
        if std::env::var(CHILD).is_err() {
            return;
        }
        let mut r = rig();
        let tu = r.tu.clone();
        let poisoner = std::thread::spawn(move || {
            let _t = tu.iotlb.lock().unwrap();
            panic!("panicking while holding the IOTLB, on purpose");
        });
        assert!(poisoner.join().is_err());
        r.unmap_and_read();
    }

    /// An invalidation that cannot drop IOTLB entries (its lock is
    /// poisoned) ends the process; it is never answered as done.
    #[test]
    fn an_invalidation_meeting_a_poisoned_iotlb_aborts() {
        assert_unmap_aborts("tu::tests::poisoned_iotlb_child");
    }
}
