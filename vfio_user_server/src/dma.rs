//! DMA: the client's DMA_MAP table, its compat IOAS in the core, the
//! binding made through the ioasid extension with its vPASID map, and the
//! path a device's DMA takes.
//!
//! Every DMA goes through an IOAS of the core:
//! - **compat**: the server has its own session and a compat IOAS; each
//!   DMA_MAP with an fd becomes a memory object plus a fixed-IOVA map there,
//!   and the device's RID is attached to it (iommufd's VFIO-compat idea).
//! - **bound**: a session handed the server a device channel (extension
//!   command); the device is bound in that session, the session's IOASes
//!   are attached per RID or vPASID, and the server keeps
//!   `vPASID -> pPASID`. The core only ever sees pPASIDs.
//!
//! DMA_MAP without an fd registers client memory that the device reaches
//! with DMA_READ/DMA_WRITE messages (compat RID DMA only).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, RwLock};

use iommu_core::client::Client;
use iommu_core::device::{Channel, DriverStateProvider};
use iommu_core::memfd;
use iommu_core::tu::{self, TranslationUnit};
use iommu_core::types::{BindArgs, DeviceCaps, DriverState, FaultReason, FaultRecord, MapArgs, Perm, VpasidEntry};

use crate::proto;

/// Errors of DMA and of DMA mapping, each with the errno a client sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
    /// Overlaps an existing map.
    #[error("DMA region {0:#x}+{1:#x} overlaps an existing one")]
    Exists(u64, u64),
    /// No such map.
    #[error("no DMA region is mapped exactly at {0:#x}+{1:#x}")]
    NotFound(u64, u64),
    /// A limit was reached.
    #[error("{0}")]
    Limit(String),
    /// The vPASID has no pPASID.
    #[error("vPASID {0:#x} is not attached")]
    NoPasid(u32),
    /// The device is not bound through the extension.
    #[error("the device is not bound to a session")]
    NotBound,
    /// Already bound.
    #[error("the device is already bound to session {0}")]
    AlreadyBound(u64),
    /// The access faulted in the IOAS.
    #[error(transparent)]
    Fault(#[from] tu::Error),
    /// The core refused or failed.
    #[error("{0}")]
    Core(String, i32),
    /// Client memory reached by messages failed.
    #[error("client DMA {0}")]
    Client(String, i32),
    /// The fd of a DMA_MAP cannot be the memory asked for.
    #[error("{0}")]
    Refused(memfd::Refused),
    /// A request would need more work or memory than allowed.
    #[error("{0}")]
    TooBig(String),
}

impl Error {
    /// errno for the wire.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Invalid(_) => libc::EINVAL,
            Error::Exists(..) => libc::EEXIST,
            Error::NotFound(..) => libc::ENOENT,
            Error::Limit(_) => libc::ENOSPC,
            Error::NoPasid(_) => libc::ENOENT,
            Error::NotBound => libc::ENODEV,
            Error::AlreadyBound(_) => libc::EBUSY,
            Error::Fault(_) => libc::EFAULT,
            Error::Core(_, e) | Error::Client(_, e) => *e,
            Error::Refused(r) => r.errno(),
            Error::TooBig(_) => libc::E2BIG,
        }
    }
}

fn core_err(e: iommu_core::client::Error) -> Error {
    let code = e.errno().map_or(libc::EIO, |x| x.code());
    Error::Core(e.to_string(), code)
}

fn chan_err(e: iommu_core::device::Error) -> Error {
    let code = e.errno().map_or(libc::EIO, |x| x.code());
    Error::Core(e.to_string(), code)
}

fn tu_err(e: tu::Error) -> Error {
    match e {
        tu::Error::Channel(c) => chan_err(c),
        other => Error::Fault(other),
    }
}

/// Where a device's DMA is tagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Untagged (requester ID).
    Rid,
    /// Tagged with a guest PASID.
    Vpasid(u32),
}

/// Sends DMA_READ / DMA_WRITE to the connected client and waits for the
/// reply (implemented by the connection).
pub trait ClientDma: Send + Sync {
    /// Reads client memory at `address`.
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), Error>;
    /// Writes client memory at `address`.
    fn write(&self, address: u64, data: &[u8]) -> Result<(), Error>;
}

/// How pPASIDs are chosen for vPASIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PasidPolicy {
    /// From the core's global pPASID allocator (shared work queues).
    #[default]
    Global,
    /// The device's own PASID space: pPASID = vPASID.
    PerRid,
}

/// What observers see of the driver state: kept apart from the binding so
/// a query (answered on the channel's reader thread) never waits for a
/// lock held across a channel call.
#[derive(Default)]
struct View {
    server: String,
    rid: Option<u32>,
    vpasids: Vec<VpasidEntry>,
}

/// Answers for one channel: the compat one (the server's own session) or
/// the one a session bound the device through.
struct ViewProvider {
    view: Arc<Mutex<View>>,
    compat: bool,
    /// The channel's translation unit, for its counters.
    tu: std::sync::OnceLock<std::sync::Weak<TranslationUnit>>,
}

impl ViewProvider {
    fn new(view: Arc<Mutex<View>>, compat: bool) -> Arc<ViewProvider> {
        Arc::new(ViewProvider { view, compat, tu: std::sync::OnceLock::new() })
    }

    fn counters(&self) -> Vec<String> {
        let Some(tu) = self.tu.get().and_then(|w| w.upgrade()) else { return Vec::new() };
        let s = tu.stats();
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        vec![
            format!("iotlb_hits {}", g(&s.hits)),
            format!("iotlb_misses {}", g(&s.misses)),
            format!("iotlb_invalidations {}", g(&s.invalidations)),
            format!("fault_faults {}", g(&s.faults)),
            format!("fault_suppressed {}", g(&s.faults_suppressed)),
            format!("fault_page_requests {}", g(&s.page_requests)),
        ]
    }
}

impl DriverStateProvider for ViewProvider {
    fn driver_state(&self, _dev: u32) -> DriverState {
        let counters = self.counters();
        let Ok(v) = self.view.lock() else { return DriverState::default() };
        if self.compat {
            let mut lines = vec!["compat binding: DMA_MAP/DMA_UNMAP of the vfio-user client".to_string()];
            lines.extend(counters);
            return DriverState { server: v.server.clone(), vpasids: Vec::new(), lines };
        }
        let mut lines = Vec::new();
        if let Some(r) = v.rid {
            lines.push(format!("rid_ioas {r}"));
        }
        lines.extend(counters);
        DriverState { server: v.server.clone(), vpasids: v.vpasids.clone(), lines }
    }
}

/// The server's own session and compat IOAS.
pub struct Compat {
    session: Mutex<Client>,
    ioas: u32,
    tu: Arc<TranslationUnit>,
    dev: u32,
}

impl Compat {
    /// Opens a session on the core at `core`, allocates the compat IOAS,
    /// binds the device through a channel of that session and attaches its
    /// RID to the compat IOAS.
    pub fn open(core: &std::path::Path, bind: BindArgs) -> Result<Compat, Error> {
        let mut session = Client::session(core).map_err(core_err)?;
        let ioas = session.ioas_alloc().map_err(core_err)?;
        let (_, fd) = session.open_device_channel().map_err(core_err)?;
        let channel = Arc::new(Channel::new(fd).map_err(chan_err)?);
        let tu = TranslationUnit::new(channel, tu::Config::default()).map_err(tu_err)?;
        let dev = tu.bind(bind).map_err(tu_err)?.dev_id;
        tu.channel().attach(dev, None, ioas).map_err(chan_err)?;
        Ok(Compat { session: Mutex::new(session), ioas, tu, dev })
    }

    /// The compat IOAS id.
    pub fn ioas(&self) -> u32 {
        self.ioas
    }

    /// The server's session id.
    pub fn session_id(&self) -> u64 {
        self.session.lock().map(|s| s.session_id()).unwrap_or(0)
    }

    /// Device id in the server's session.
    pub fn dev(&self) -> u32 {
        self.dev
    }

    /// Runs `f` with the server's session.
    pub fn with_session<T>(&self, f: impl FnOnce(&mut Client) -> T) -> Result<T, Error> {
        let mut s = self.session.lock().map_err(|_| Error::Invalid("session lock poisoned".into()))?;
        Ok(f(&mut s))
    }
}

/// A binding made through the extension.
pub struct Bound {
    tu: Arc<TranslationUnit>,
    dev: u32,
    session: u64,
    rid: Option<u32>,
    /// vPASID -> (pPASID, pt_id).
    pasids: BTreeMap<u32, (u32, u32)>,
}

enum MapKind {
    Fd { key: (u64, u64) },
    Msg,
}

struct ClientMap {
    size: u64,
    flags: u32,
    kind: MapKind,
}

struct MemRef {
    id: u32,
    refs: u32,
}

/// The core's dirty tracking granule.
pub const DIRTY_GRANULE: u64 = 4096;
/// Bits of one bitmap asked of the core at a time (256 KiB).
const CORE_BITMAP_BITS: u64 = 1 << 21;
/// Most blocks one DMA logging report reads from the core (8 MiB of
/// bitmaps).
pub const MAX_REPORT_BLOCKS: u64 = 1 << 26;

/// Limits of the DMA table.
pub const MAX_DMA_MAPS: usize = 65535;

/// The DMA state of one device.
pub struct Dma {
    compat: Compat,
    bound: RwLock<Option<Bound>>,
    maps: Mutex<BTreeMap<u64, ClientMap>>,
    mems: Mutex<HashMap<(u64, u64), MemRef>>,
    client: RwLock<Option<Arc<dyn ClientDma>>>,
    caps: DeviceCaps,
    bind_args: BindArgs,
    policy: PasidPolicy,
    view: Arc<Mutex<View>>,
    /// Held (read) by device DMA through client messages, for the whole
    /// access; an unmap of such a region takes it (write).
    msg_dma: RwLock<()>,
    /// Client regions without an fd.
    msg_regions: std::sync::atomic::AtomicUsize,
}

impl Dma {
    /// Connects to the core and sets up the compat path.
    pub fn new(core: &std::path::Path, bind: BindArgs, policy: PasidPolicy) -> Result<Arc<Dma>, Error> {
        let caps = bind.caps;
        let compat = Compat::open(core, bind.clone())?;
        let view = Arc::new(Mutex::new(View {
            server: format!("vfio-user-server pid {} device {}", std::process::id(), bind.name),
            ..View::default()
        }));
        let provider = ViewProvider::new(view.clone(), true);
        let _ = provider.tu.set(Arc::downgrade(&compat.tu));
        compat.tu.channel().set_driver_state_provider(provider);
        Ok(Arc::new(Dma {
            compat,
            bound: RwLock::new(None),
            maps: Mutex::new(BTreeMap::new()),
            mems: Mutex::new(HashMap::new()),
            client: RwLock::new(None),
            caps,
            bind_args: bind,
            policy,
            view,
            msg_dma: RwLock::new(()),
            msg_regions: Default::default(),
        }))
    }

    /// Sets the server line observers see (e.g. with the socket path).
    pub fn set_description(&self, s: String) {
        if let Ok(mut v) = self.view.lock() {
            v.server = s;
        }
    }

    fn publish(&self, b: Option<&Bound>) {
        if let Ok(mut v) = self.view.lock() {
            v.rid = b.and_then(|b| b.rid);
            v.vpasids = b
                .map(|b| {
                    b.pasids.iter().map(|(&vpasid, &(ppasid, pt_id))| VpasidEntry { vpasid, ppasid, pt_id }).collect()
                })
                .unwrap_or_default();
        }
    }

    /// The compat path.
    pub fn compat(&self) -> &Compat {
        &self.compat
    }

    /// Sets (or clears) the connected client for message-based DMA.
    pub fn set_client(&self, c: Option<Arc<dyn ClientDma>>) {
        if let Ok(mut g) = self.client.write() {
            *g = c;
        }
    }

    /// Handles DMA_MAP. `fd` is the passed file, if any.
    pub fn map(&self, m: &proto::DmaMap, fd: Option<OwnedFd>) -> Result<(), Error> {
        if m.flags & !(proto::DMA_MAP_READ | proto::DMA_MAP_WRITE) != 0 {
            return Err(Error::Invalid(format!("unknown DMA_MAP flags {:#x}", m.flags)));
        }
        if m.flags == 0 {
            return Err(Error::Invalid("DMA_MAP grants neither read nor write".into()));
        }
        if m.size == 0 {
            return Err(Error::Invalid("DMA_MAP of size 0".into()));
        }
        let last = m
            .address
            .checked_add(m.size - 1)
            .ok_or_else(|| Error::Invalid(format!("DMA region {:#x}+{:#x} overflows", m.address, m.size)))?;
        let mut maps = self.maps.lock().map_err(|_| Error::Invalid("map table poisoned".into()))?;
        if maps.len() >= MAX_DMA_MAPS {
            return Err(Error::Limit(format!("at most {MAX_DMA_MAPS} DMA regions")));
        }
        if let Some((&a, r)) = maps.range(..=last).next_back() {
            if a + (r.size - 1) >= m.address {
                return Err(Error::Exists(m.address, m.size));
            }
        }
        let Some(fd) = fd else {
            maps.insert(m.address, ClientMap { size: m.size, flags: m.flags, kind: MapKind::Msg });
            self.msg_regions.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            return Ok(());
        };
        const PAGE: u64 = 4096;
        if !m.address.is_multiple_of(PAGE) || !m.size.is_multiple_of(PAGE) || !m.offset.is_multiple_of(PAGE) {
            return Err(Error::Invalid("a DMA region with an fd must be 4 KiB aligned".into()));
        }
        // Before anything asks the file's file system (stat included): a
        // file of a stalled FUSE server would stall the device thread.
        let checked = memfd::check_memory_fd(fd.as_fd()).and_then(|()| {
            if m.flags & proto::DMA_MAP_WRITE != 0 {
                // The kernel refuses a writable pin of read-only memory: a
                // device write could never land.
                memfd::check_writable(fd.as_fd())
            } else {
                Ok(())
            }
        });
        if let Err(why) = checked {
            memfd::close_elsewhere(fd);
            return Err(Error::Refused(why));
        }
        let file = File::from(fd);
        let md = file.metadata().map_err(|e| Error::Invalid(format!("cannot stat the DMA fd: {e}")))?;
        if m.offset.checked_add(m.size).is_none_or(|end| end > md.len()) {
            return Err(Error::Invalid(format!(
                "DMA region {:#x}+{:#x} at file offset {:#x} exceeds the file's {} bytes",
                m.address,
                m.size,
                m.offset,
                md.len()
            )));
        }
        let key = (md.dev(), md.ino());
        let mem = self.mem_get(key, &file)?;
        let perm = Perm { read: m.flags & proto::DMA_MAP_READ != 0, write: m.flags & proto::DMA_MAP_WRITE != 0 };
        let args =
            MapArgs { ioas: self.compat.ioas, mem, offset: m.offset, length: m.size, iova: Some(m.address), perm };
        if let Err(e) = self.compat.with_session(|s| s.map(args))?.map_err(core_err) {
            self.mem_put(key);
            return Err(e);
        }
        maps.insert(m.address, ClientMap { size: m.size, flags: m.flags, kind: MapKind::Fd { key } });
        Ok(())
    }

    fn mem_get(&self, key: (u64, u64), file: &File) -> Result<u32, Error> {
        let mut mems = self.mems.lock().map_err(|_| Error::Invalid("memory table poisoned".into()))?;
        if let Some(r) = mems.get_mut(&key) {
            r.refs += 1;
            return Ok(r.id);
        }
        let info = self.compat.with_session(|s| s.register_memory(file.as_fd()))?.map_err(core_err)?;
        mems.insert(key, MemRef { id: info.id, refs: 1 });
        Ok(info.id)
    }

    fn mem_put(&self, key: (u64, u64)) {
        let Ok(mut mems) = self.mems.lock() else { return };
        let Some(r) = mems.get_mut(&key) else { return };
        r.refs -= 1;
        if r.refs == 0 {
            let id = r.id;
            mems.remove(&key);
            if let Ok(Err(e)) = self.compat.with_session(|s| s.destroy(id)) {
                tracing::warn!("could not free memory object {id} of the compat session: {e}");
            }
        }
    }

    /// Handles DMA_UNMAP: an exact match, or everything with `all`.
    pub fn unmap(&self, address: u64, size: u64, all: bool) -> Result<(), Error> {
        let pick = |maps: &BTreeMap<u64, ClientMap>| -> Result<Vec<u64>, Error> {
            if all {
                return Ok(maps.keys().copied().collect());
            }
            match maps.get(&address) {
                Some(r) if r.size == size => Ok(vec![address]),
                _ => Err(Error::NotFound(address, size)),
            }
        };
        let has_msg = {
            let maps = self.maps.lock().map_err(|_| Error::Invalid("map table poisoned".into()))?;
            pick(&maps)?.iter().any(|a| maps.get(a).is_some_and(|r| matches!(r.kind, MapKind::Msg)))
        };
        // Device DMA through client messages holds the read side for the
        // whole access (and takes the map lock inside): wait for it first.
        let _quiet = if has_msg { Some(self.msg_dma.write()) } else { None };
        let mut maps = self.maps.lock().map_err(|_| Error::Invalid("map table poisoned".into()))?;
        let victims = pick(&maps)?;
        let mut first_err = None;
        for a in victims {
            let Some(r) = maps.get(&a) else { continue };
            let (rsize, kind) = (
                r.size,
                match r.kind {
                    MapKind::Fd { key } => Some(key),
                    MapKind::Msg => None,
                },
            );
            let Some(key) = kind else {
                maps.remove(&a);
                self.msg_regions.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                continue;
            };
            // The core completes the unmap only after the translation unit
            // has dropped its IOTLB entries and in-flight DMA ended.
            match self.compat.with_session(|s| s.unmap(self.compat.ioas, a, rsize))?.map_err(core_err) {
                Ok(_) => {
                    maps.remove(&a);
                    self.mem_put(key);
                }
                Err(e) => {
                    tracing::warn!("unmap of {a:#x}+{rsize:#x} in the compat IOAS failed: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Number of client DMA regions.
    pub fn map_count(&self) -> usize {
        self.maps.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn msg_region(&self, iova: u64, len: usize, write: bool) -> Option<bool> {
        let maps = self.maps.lock().ok()?;
        let (&a, r) = maps.range(..=iova).next_back()?;
        if !matches!(r.kind, MapKind::Msg) {
            return None;
        }
        let end = iova.checked_add(len as u64)?;
        let ok = iova - a < r.size
            && end - a <= r.size
            && r.flags & if write { proto::DMA_MAP_WRITE } else { proto::DMA_MAP_READ } != 0;
        Some(ok)
    }

    fn resolve(&self, route: Route) -> Result<(Arc<TranslationUnit>, u32, u32), Error> {
        let b = self.bound.read().map_err(|_| Error::NotBound)?;
        match (&*b, route) {
            (Some(b), Route::Rid) => Ok((b.tu.clone(), b.dev, 0)),
            (Some(b), Route::Vpasid(v)) => match b.pasids.get(&v) {
                Some(&(p, _)) => Ok((b.tu.clone(), b.dev, p)),
                None => Err(Error::NoPasid(v)),
            },
            (None, Route::Rid) => Ok((self.compat.tu.clone(), self.compat.dev, 0)),
            (None, Route::Vpasid(v)) => Err(Error::NoPasid(v)),
        }
    }

    fn bound_now(&self) -> bool {
        self.bound.read().map(|b| b.is_some()).unwrap_or(false)
    }

    fn client_path(
        &self,
        route: Route,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Result<Option<Arc<dyn ClientDma>>, Error> {
        // Most clients give fds for all their memory: skip the lookup.
        if route != Route::Rid || self.msg_regions.load(std::sync::atomic::Ordering::Acquire) == 0 || self.bound_now() {
            return Ok(None);
        }
        match self.msg_region(iova, len, write) {
            None => Ok(None),
            Some(false) => {
                Err(Error::Client(format!("{iova:#x}+{len:#x} is outside a permitted region"), libc::EFAULT))
            }
            Some(true) => {
                let c = self.client.read().ok().and_then(|c| c.clone());
                c.map(Some).ok_or_else(|| Error::Client("without a connected client".into(), libc::ENOTCONN))
            }
        }
    }

    /// Device DMA read.
    pub fn read(&self, route: Route, iova: u64, buf: &mut [u8]) -> Result<(), Error> {
        let guard = self.msg_dma.read();
        if let Some(c) = self.client_path(route, iova, buf.len(), false)? {
            return c.read(iova, buf);
        }
        drop(guard);
        let (tu, dev, pasid) = self.resolve(route)?;
        tu.read(dev, pasid, iova, buf).map_err(tu_err)
    }

    /// Device DMA write.
    pub fn write(&self, route: Route, iova: u64, data: &[u8]) -> Result<(), Error> {
        let guard = self.msg_dma.read();
        if let Some(c) = self.client_path(route, iova, data.len(), true)? {
            return c.write(iova, data);
        }
        drop(guard);
        let (tu, dev, pasid) = self.resolve(route)?;
        // The whole range is checked first, so a write that would fault
        // part-way writes nothing (the faulting page is reported).
        if data.len() > 1 {
            tu.translate(dev, pasid, iova, data.len(), Perm::W).map_err(tu_err)?;
        }
        tu.write(dev, pasid, iova, data).map_err(tu_err)
    }

    /// Checks that `[iova, iova+len)` can be written through `route`,
    /// without writing (faults and page requests happen here).
    pub fn check_write(&self, route: Route, iova: u64, len: usize) -> Result<(), Error> {
        let _guard = self.msg_dma.read();
        if self.client_path(route, iova, len, true)?.is_some() {
            return Ok(());
        }
        let (tu, dev, pasid) = self.resolve(route)?;
        tu.translate(dev, pasid, iova, len, Perm::W).map(|_| ()).map_err(tu_err)
    }

    /// Reports an unrecoverable fault of `route` to the core (a vPASID
    /// with no pPASID is reported on the RID: the core never learns
    /// vPASIDs).
    pub fn report_fault(&self, route: Route, iova: u64, write: bool, reason: FaultReason) {
        let target = match route {
            Route::Vpasid(_) if self.resolve(route).is_err() => Route::Rid,
            r => r,
        };
        let Ok((tu, dev, pasid)) = self.resolve(target) else { return };
        let access = if write { Perm::W } else { Perm::R };
        let rec = FaultRecord { dev_id: dev, pasid, iova, access, reason, group: 0, last: true, cookie: 0 };
        if let Err(e) = tu.channel().report_fault(rec) {
            tracing::debug!("fault report not delivered: {e}");
        }
    }

    /// The translation unit and device id DMA of `route` uses now.
    pub fn translation_unit(&self, route: Route) -> Result<(Arc<TranslationUnit>, u32, u32), Error> {
        self.resolve(route)
    }

    /// Extension: binds the device through a session's device channel.
    pub fn bind(&self, fd: OwnedFd) -> Result<(u32, u64), Error> {
        if let Some(b) = self.bound.read().map_err(|_| Error::NotBound)?.as_ref() {
            return Err(Error::AlreadyBound(b.session));
        }
        // The fd comes from a client: it must be a socket made by our core
        // (a silent or foreign peer would stall every channel call).
        let core_pid = self.compat.with_session(|s| s.core_pid())?;
        let peer = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials).ok().map(|c| c.pid());
        let stream = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
            .is_ok_and(|t| t == nix::sys::socket::SockType::Stream);
        if !stream || peer.is_none() || peer != core_pid {
            return Err(Error::Invalid("the fd is not a device channel of this server's core".into()));
        }
        let channel = Arc::new(
            Channel::new(fd).map_err(|e| Error::Invalid(format!("the fd is not a working device channel: {e}")))?,
        );
        let provider = ViewProvider::new(self.view.clone(), false);
        channel.set_driver_state_provider(provider.clone());
        let session = channel.session();
        let tu = TranslationUnit::new(channel, tu::Config::default()).map_err(tu_err)?;
        let _ = provider.tu.set(Arc::downgrade(&tu));
        let dev = tu.bind(self.bind_args.clone()).map_err(tu_err)?.dev_id;
        let mut g = self.bound.write().map_err(|_| Error::NotBound)?;
        *g = Some(Bound { tu, dev, session, rid: None, pasids: BTreeMap::new() });
        self.publish(g.as_ref());
        Ok((dev, session))
    }

    /// Extension: drops the binding (the core frees the device, its
    /// attachments and pPASIDs when the channel closes).
    pub fn unbind(&self) -> Result<(), Error> {
        let b = self.bound.write().map_err(|_| Error::NotBound)?.take().ok_or(Error::NotBound)?;
        self.publish(None);
        if let Err(e) = b.tu.unbind(b.dev) {
            tracing::debug!("unbind of device {} in session {}: {e}", b.dev, b.session);
        }
        Ok(())
    }

    /// Extension: attaches (or replaces) the RID or a vPASID to `pt_id`.
    /// Returns the pPASID (0 for the RID).
    pub fn attach(&self, vpasid: Option<u32>, pt_id: u32, replace: bool) -> Result<u32, Error> {
        let r = self.attach_inner(vpasid, pt_id, replace);
        self.republish();
        r
    }

    fn republish(&self) {
        if let Ok(g) = self.bound.read() {
            self.publish(g.as_ref());
        }
    }

    fn attach_inner(&self, vpasid: Option<u32>, pt_id: u32, replace: bool) -> Result<u32, Error> {
        let mut g = self.bound.write().map_err(|_| Error::NotBound)?;
        let b = g.as_mut().ok_or(Error::NotBound)?;
        let ch = b.tu.channel().clone();
        let Some(v) = vpasid else {
            if replace {
                ch.replace(b.dev, None, pt_id).map_err(chan_err)?;
            } else {
                ch.attach(b.dev, None, pt_id).map_err(chan_err)?;
            }
            b.rid = Some(pt_id);
            return Ok(0);
        };
        let width = self.caps.pasid_width;
        if width == 0 {
            return Err(Error::Invalid("the device has no PASID capability".into()));
        }
        if v == 0 || u64::from(v) >= 1u64 << width {
            return Err(Error::Invalid(format!("vPASID {v:#x} is outside 1..2^{width}")));
        }
        match (b.pasids.get(&v).copied(), replace) {
            (Some(_), false) => Err(Error::Core(format!("vPASID {v:#x} is already attached"), libc::EBUSY)),
            (None, true) => Err(Error::Invalid(format!("vPASID {v:#x} is not attached; nothing to replace"))),
            (Some((p, _)), true) => {
                ch.replace(b.dev, Some(p), pt_id).map_err(chan_err)?;
                b.pasids.insert(v, (p, pt_id));
                Ok(p)
            }
            (None, false) => {
                let p = match self.policy {
                    PasidPolicy::Global => ch.pasid_alloc(b.dev).map_err(chan_err)?,
                    PasidPolicy::PerRid => v,
                };
                if let Err(e) = ch.attach(b.dev, Some(p), pt_id) {
                    if self.policy == PasidPolicy::Global {
                        let _ = ch.pasid_free(b.dev, p);
                    }
                    return Err(chan_err(e));
                }
                b.pasids.insert(v, (p, pt_id));
                Ok(p)
            }
        }
    }

    /// Extension: detaches the RID or a vPASID (a no-op if not attached).
    pub fn detach(&self, vpasid: Option<u32>) -> Result<(), Error> {
        let r = self.detach_inner(vpasid);
        self.republish();
        r
    }

    fn detach_inner(&self, vpasid: Option<u32>) -> Result<(), Error> {
        let mut g = self.bound.write().map_err(|_| Error::NotBound)?;
        let b = g.as_mut().ok_or(Error::NotBound)?;
        let ch = b.tu.channel().clone();
        match vpasid {
            None => {
                ch.detach(b.dev, None).map_err(chan_err)?;
                b.rid = None;
            }
            Some(v) => {
                if let Some((p, _)) = b.pasids.get(&v).copied() {
                    ch.detach(b.dev, Some(p)).map_err(chan_err)?;
                    if self.policy == PasidPolicy::Global {
                        ch.pasid_free(b.dev, p).map_err(chan_err)?;
                    }
                    b.pasids.remove(&v);
                }
            }
        }
        Ok(())
    }

    /// The vPASID map: `(vpasid, ppasid, pt_id)`, plus the RID's IOAS.
    pub fn pasid_map(&self) -> (Option<u32>, Vec<(u32, u32, u32)>) {
        match self.bound.read().ok().as_deref() {
            Some(Some(b)) => (b.rid, b.pasids.iter().map(|(&v, &(p, t))| (v, p, t)).collect()),
            _ => (None, Vec::new()),
        }
    }

    /// `(session, dev_id)` of the extension binding.
    pub fn binding(&self) -> Option<(u64, u32)> {
        self.bound.read().ok()?.as_ref().map(|b| (b.session, b.dev))
    }

    /// Client disconnect: every DMA region goes, the extension binding
    /// (an fd of that client) is dropped.
    pub fn disconnect(&self) {
        if let Err(e) = self.unmap(0, 0, true) {
            tracing::warn!("unmapping the departed client's DMA failed: {e}");
        }
        if self.bound_now() {
            let _ = self.unbind();
        }
        self.set_client(None);
    }

    /// Dirty tracking of the compat IOAS.
    pub fn set_dirty_tracking(&self, on: bool) -> Result<(), Error> {
        self.compat.with_session(|s| s.set_dirty_tracking(self.compat.ioas, on))?.map_err(core_err)
    }

    /// A DMA logging report of the compat IOAS: one bit per `page_size`
    /// (any power of two) of `[iova, iova + length)`, bit `k` standing for
    /// `[iova + k * page_size, iova + (k + 1) * page_size)`. The core tracks
    /// writes in blocks of [`DIRTY_GRANULE`] (or larger leaves); a bit is
    /// set when any block overlapping its page was written since it was
    /// last reported, so a dirty block sets every smaller page it covers
    /// and a larger page is dirty if any block in it is. Blocks wholly
    /// inside the range are cleared by the report; blocks that stick out of
    /// it (an unaligned `iova` or end) are reported but stay dirty, since
    /// their part outside the range has not been reported yet.
    pub fn dirty_report(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>, Error> {
        let bad = |why: &str| Error::Invalid(format!("DMA logging report of {iova:#x}+{length:#x}: {why}"));
        if length == 0 || !page_size.is_power_of_two() {
            return Err(bad("the length is 0 or the page size is not a power of two"));
        }
        let end = iova.checked_add(length).ok_or_else(|| bad("the range overflows"))?;
        let bits = length.div_ceil(page_size);
        // Blocks asked of the core: as large as the page size allows while
        // starting at a block boundary, never below the granule.
        let iova_align = if iova == 0 { 1 << 63 } else { 1u64 << iova.trailing_zeros() };
        let q = page_size.min(iova_align).max(DIRTY_GRANULE);
        let qs = iova & !(q - 1);
        let qe = end.checked_next_multiple_of(q).ok_or_else(|| bad("the range overflows"))?;
        let blocks = (qe - qs) / q;
        if blocks > MAX_REPORT_BLOCKS {
            return Err(Error::TooBig(format!(
                "DMA logging report of {iova:#x}+{length:#x} at page size {page_size:#x} would read {blocks} blocks \
                 of {q:#x} bytes, more than {MAX_REPORT_BLOCKS}; align iova to the page size"
            )));
        }
        // Spans read without clearing (partial blocks at the ends), then
        // the whole blocks in between, read and cleared.
        let head = qs < iova;
        let tail = qe > end && !(head && qe - q == qs);
        let inner = (if head { qs + q } else { qs }, if qe > end { qe - q } else { qe });
        let mut spans = Vec::new();
        if head {
            spans.push((qs, qs + q, true));
        }
        if inner.0 < inner.1 {
            spans.push((inner.0, inner.1, false));
        }
        if tail {
            spans.push((qe - q, qe, true));
        }
        let mut out = vec![0u64; usize::try_from(bits.div_ceil(64)).map_err(|_| bad("the bitmap is too large"))?];
        // Pieces of the core's bitmap, on boundaries of the piece size so
        // that a large leaf is never split between two reads.
        let piece = q.checked_mul(CORE_BITMAP_BITS);
        for (start, stop, no_clear) in spans {
            let mut cur = start;
            while cur < stop {
                let next = piece.and_then(|p| (cur / p + 1).checked_mul(p)).map_or(stop, |b| b.min(stop));
                let words = self
                    .compat
                    .with_session(|s| s.dirty_bitmap(self.compat.ioas, cur, next - cur, q, no_clear))?
                    .map_err(core_err)?;
                for (w, &word) in words.iter().enumerate() {
                    let mut v = word;
                    while v != 0 {
                        let j = w as u64 * 64 + u64::from(v.trailing_zeros());
                        v &= v - 1;
                        let lo = (cur + j * q).max(iova);
                        let hi = (cur + j * q).saturating_add(q).min(end);
                        if lo < hi {
                            set_bits(&mut out, (lo - iova) / page_size, (hi - 1 - iova) / page_size);
                        }
                    }
                }
                cur = next;
            }
        }
        Ok(out)
    }

    /// Dirty bitmap of the compat IOAS (read and cleared).
    pub fn dirty_bitmap(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>, Error> {
        self.compat
            .with_session(|s| s.dirty_bitmap(self.compat.ioas, iova, length, page_size, false))?
            .map_err(core_err)
    }
}

/// Sets bits `first..=last` of `bitmap` (which holds them).
fn set_bits(bitmap: &mut [u64], first: u64, last: u64) {
    let mut k = first;
    while k <= last {
        let (w, b) = ((k / 64) as usize, k % 64);
        let n = (last - k + 1).min(64 - b);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << b };
        if let Some(word) = bitmap.get_mut(w) {
            *word |= mask;
        }
        k += n;
    }
}

#[cfg(test)]
mod tests {
    use super::set_bits;

    #[test]
    fn bit_ranges_cross_words_and_stop_at_their_last_bit() {
        let mut b = vec![0u64; 3];
        set_bits(&mut b, 60, 130);
        assert_eq!(b, vec![0xf << 60, u64::MAX, 0b111]);
        let mut b = vec![0u64; 2];
        set_bits(&mut b, 64, 127);
        set_bits(&mut b, 3, 3);
        assert_eq!(b, vec![1 << 3, u64::MAX]);
        // Past the bitmap: nothing is written out of bounds.
        let mut b = vec![0u64; 1];
        set_bits(&mut b, 62, 200);
        assert_eq!(b, vec![0b11 << 62]);
    }
}
