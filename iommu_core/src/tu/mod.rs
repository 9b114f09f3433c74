//! The translation unit: the IOMMU "hardware" a device server links.
//!
//! It maps the core's table pool read-only and the memory objects its
//! devices reach, and translates `(device, pPASID, IOVA)` by walking the
//! tables in shared memory, without asking the core. Results are cached in
//! per-thread IOTLBs (see [`epoch`]), one entry per leaf (a 2 MiB leaf is
//! one entry), validated by the unit's invalidation generation; a "not
//! present" answer is never cached.
//! Nested attachments are walked in two stages: the user's stage-1 table
//! (whose addresses are parent IOVAs) and the parent's stage-2 table.
//!
//! **The invalidation handshake.** Every DMA marks itself in flight in its
//! thread's slot; an invalidation from the core moves the generation every
//! IOTLB entry is checked against, then waits until every DMA that was in
//! flight has finished, and only then is answered. The core frees table pages and completes an
//! unmap only after that answer, so no DMA touches memory after the unmap
//! has returned.
//!
//! A failed walk or permission check is a fault: reported to the core
//! (rate-limited), or, when the PASID entry allows page requests and the
//! device declared PRI, sent as a page request; on SUCCESS the access is
//! retried, on INVALID or timeout it fails.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::device::{self, Channel, InvalidationHandler};
use crate::pagetable::{DIRTY_BYTES_PER_TABLE, ENTRIES, PAGE_SIZE};
use crate::shm;
use crate::sync;
use crate::types::*;

mod access;
mod epoch;
mod handle;
mod iotlb;
mod memory;

pub use access::{At, CopyError, Side};
pub use handle::Handle;
use iotlb::Pool;
use memory::MemObject;

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
    /// Leaves each thread's IOTLB holds (at most 32; the oldest is
    /// replaced when full).
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

/// Counters of a translation unit (IOTLB hits and misses are counted per
/// thread: [`TranslationUnit::iotlb_hits`], [`TranslationUnit::iotlb_misses`]).
#[derive(Debug, Default)]
pub struct Stats {
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
/// The translation unit of a device server.
pub struct TranslationUnit {
    channel: Arc<Channel>,
    pool: Pool,
    dirty: shm::Words,
    mems: RwLock<BTreeMap<u64, Arc<MemObject>>>,
    /// The way to client memory objects, if this unit's device server has
    /// a client that holds memory.
    client: RwLock<Option<Arc<dyn ClientMemory>>>,
    /// The DMA guard and the threads' IOTLBs.
    guard: epoch::Guard,
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
            guard: epoch::Guard::new(config.iotlb_entries),
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

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// IOTLB hits of every thread.
    pub fn iotlb_hits(&self) -> u64 {
        self.guard.counts().0
    }

    /// IOTLB misses (walks) of every thread.
    pub fn iotlb_misses(&self) -> u64 {
        self.guard.counts().1
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
        // Its cached translations go (a DMA already in flight ends as it
        // would have).
        self.guard.invalidate(false);
        Ok(())
    }

    /// Answers an invalidation: once this returns, no DMA uses a
    /// translation cached before it, nor a memory object it forgets.
    ///
    /// Every thread's IOTLB is emptied (by the generation), whatever the
    /// targets: an invalidation is rare next to the accesses that refill
    /// them. Forgotten memory objects leave the map before the generation
    /// moves (no walk finds them after) and are dropped only after the
    /// wait (a DMA in flight may still copy through them).
    fn invalidate(&self, _targets: &[InvalidateTarget], forget: &[u64]) {
        let gone: Vec<Arc<MemObject>> = if forget.is_empty() {
            Vec::new()
        } else {
            let mut m = sync::write(&self.mems);
            forget.iter().filter_map(|b| m.remove(b)).collect()
        };
        self.guard.invalidate(true);
        drop(gone);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// The channel closed: no device of this unit translates any more
    /// (accesses fail with [`Error::NoDevice`]), and nothing cached or
    /// mapped through it stays, once DMA in flight has ended.
    fn forget_all(&self) {
        sync::write(&self.devices).clear();
        let gone = std::mem::take(&mut *sync::write(&self.mems));
        self.guard.invalidate(true);
        drop(gone);
    }

    pub(super) fn mark_dirty(&self, table: u64, index: usize) {
        let bit = (table / PAGE_SIZE) * (ENTRIES as u64) + index as u64;
        if table / PAGE_SIZE * DIRTY_BYTES_PER_TABLE >= self.dirty.len() as u64 {
            return;
        }
        if let Some(w) = self.dirty.u64((bit / 64) * 8) {
            w.fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }
}

impl Drop for TranslationUnit {
    fn drop(&mut self) {
        self.guard.retire();
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
        assert_eq!(tu.guard.with_thread(|t| t.cached()), 1);
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
    #[ignore = "child process of an_invalidation_meeting_a_poisoned_slot_list_aborts; not a test by itself"]
    fn poisoned_slots_child() {
        if std::env::var(CHILD).is_err() {
            return;
        }
        let mut r = rig();
        let tu = r.tu.clone();
        let poisoner = std::thread::spawn(move || tu.guard.poison_for_test());
        assert!(poisoner.join().is_err());
        r.unmap_and_read();
    }

    /// An invalidation that cannot see which DMA is in flight (the lock of
    /// the unit's slot list is poisoned) ends the process; it is never
    /// answered as done.
    #[test]
    fn an_invalidation_meeting_a_poisoned_slot_list_aborts() {
        assert_unmap_aborts("tu::tests::poisoned_slots_child");
    }
}
