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
//! DMA_MAP without an fd registers **client memory** in the compat
//! session (a memory object with no fd) and maps it in the compat IOAS like
//! any other: translation, permissions, faults, dirty tracking and the
//! observers' view are the core's; only the final copy goes to the client
//! as DMA_READ/DMA_WRITE messages (compat RID DMA only).
//!
//! **Client fences.** A client may serve DMA_READ/DMA_WRITE only once the
//! device thread has answered its current command (QEMU does). Whatever
//! the device thread waits for must therefore not wait for the client:
//! [`Dma::fence_client`] gives up the accesses waiting for it (they fail
//! with `ECANCELED`, which devices treat as a stop, resuming later) while
//! queues are voided or quiesced, and [`Dma::unmap`] and dirty-tracking
//! changes fence while the core's invalidation waits for DMA in flight.
//!
//! **Core restart.** The compat path is one [`Compat`] (session, IOAS,
//! device channel) at a time. A watcher thread polls its session socket
//! and channel for hang-up; when the core goes away it drops the
//! [`Compat`] (after the DMA running through it has ended), and from then
//! on DMA_MAP with an fd fails with `ENODEV`, device DMA through the compat
//! IOAS fails with [`Error::CoreGone`], and DMA_UNMAP only edits the
//! server's table. The watcher connects again (50 ms, doubling to 1 s),
//! rebuilds the compat IOAS from the table with the files the client gave
//! (the server keeps them open), binds and attaches the device, and puts
//! the new [`Compat`] in place. An extension binding whose channel died
//! with the core is dropped with its vPASID map.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use iommu_core::client::Client;
use iommu_core::device::{self, Channel, DriverStateProvider};
use iommu_core::memfd;
use iommu_core::sync;
use iommu_core::tu::{self, TranslationUnit};
use iommu_core::types::{BindArgs, DeviceCaps, DriverState, FaultReason, FaultRecord, MapArgs, Perm, VpasidEntry};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::proto;

/// Errors of DMA and of DMA mapping, each with the errno a client sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// DMA_MAP flags other than READ and WRITE.
    #[error("unknown DMA_MAP flags {0:#x}")]
    UnknownFlags(u32),
    /// DMA_MAP with neither READ nor WRITE.
    #[error("DMA_MAP grants neither read nor write")]
    NoAccess,
    /// DMA_MAP of size 0.
    #[error("DMA_MAP of size 0")]
    EmptyRegion,
    /// The region's last byte is past 2^64.
    #[error("DMA region {0:#x}+{1:#x} overflows")]
    Overflow(u64, u64),
    /// The region (or its file offset) is not 4 KiB aligned.
    #[error("DMA region {0:#x}+{1:#x} (file offset {2:#x}) is not 4 KiB aligned")]
    Unaligned(u64, u64, u64),
    /// The region reaches past the 48-bit IOVA space.
    #[error("DMA region {0:#x}+{1:#x} is beyond 48-bit IOVAs")]
    BeyondIova(u64, u64),
    /// The DMA_MAP's fd cannot be asked its size.
    #[error("cannot stat the DMA fd: {0}")]
    Stat(std::io::Error),
    /// The region reaches past the end of its file.
    #[error("DMA region {address:#x}+{size:#x} at file offset {offset:#x} exceeds the file's {file_len} bytes")]
    PastFileEnd {
        /// IOVA.
        address: u64,
        /// Size.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// The file's size.
        file_len: u64,
    },
    /// IOASID_BIND with an fd that is not a channel of this server's core.
    #[error("the fd is not a device channel of this server's core")]
    NotOurChannel,
    /// IOASID_BIND with a socket of the core that does not work as a
    /// channel.
    #[error("the fd is not a working device channel: {0}")]
    BadChannel(device::Error),
    /// A vPASID attach on a device without PASID.
    #[error("the device has no PASID capability")]
    NoPasidCapability,
    /// A vPASID of 0 or past the device's width.
    #[error("vPASID {0:#x} is outside 1..2^{1}")]
    VpasidRange(u32, u8),
    /// Attach of a vPASID that is attached already.
    #[error("vPASID {0:#x} is already attached")]
    VpasidAttached(u32),
    /// Replace of a vPASID that is not attached.
    #[error("vPASID {0:#x} is not attached; nothing to replace")]
    VpasidNotAttached(u32),
    /// A DMA logging report that cannot be made.
    #[error("DMA logging report of {iova:#x}+{length:#x}: {why}")]
    BadReport {
        /// First IOVA.
        iova: u64,
        /// Length.
        length: u64,
        /// What is wrong.
        why: &'static str,
    },
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
    /// The server has no core: the one it used went away (or its
    /// connection broke) and no new one has been reached yet.
    #[error("no iommu-core: {0}")]
    CoreGone(String),
    /// Client memory reached by messages failed.
    #[error("client DMA {0}")]
    Client(String, i32),
    /// The fd of a DMA_MAP cannot be the memory asked for.
    #[error("{0}")]
    Refused(memfd::Refused),
    /// A request would need more work or memory than allowed.
    #[error("{0}")]
    TooBig(String),
    /// The function may not master the bus: the command register's Bus
    /// Master Enable is clear, or the function is not in D0.
    #[error("bus mastering is disabled (command register bit 2 clear, or the function is not in D0)")]
    BusMasterOff,
}

impl Error {
    /// True if a DMA step must stop here and go on later, not fail: bus
    /// mastering is off, or the access to client memory was given up for
    /// a fence ([`Dma::fence_client`]).
    pub fn stops_step(&self) -> bool {
        matches!(self, Error::BusMasterOff) || self.cancelled()
    }

    /// True if an access to client memory was given up for a fence
    /// (`ECANCELED` before it was sent, `EINPROGRESS` after).
    pub fn cancelled(&self) -> bool {
        matches!(self, Error::Client(_, e) if *e == libc::ECANCELED || *e == libc::EINPROGRESS)
    }

    /// True if a write given up for a fence had already been sent: the
    /// client may still carry it out.
    pub fn maybe_applied(&self) -> bool {
        matches!(self, Error::Client(_, e) if *e == libc::EINPROGRESS)
    }

    /// True if the client holding the memory did not answer in time.
    pub fn client_timed_out(&self) -> bool {
        matches!(self, Error::Client(_, e) if *e == libc::ETIMEDOUT)
    }

    /// errno for the wire.
    pub fn errno(&self) -> i32 {
        match self {
            Error::UnknownFlags(_)
            | Error::NoAccess
            | Error::EmptyRegion
            | Error::Overflow(..)
            | Error::Unaligned(..)
            | Error::BeyondIova(..)
            | Error::Stat(_)
            | Error::PastFileEnd { .. }
            | Error::NotOurChannel
            | Error::BadChannel(_)
            | Error::NoPasidCapability
            | Error::VpasidRange(..)
            | Error::VpasidNotAttached(_)
            | Error::BadReport { .. } => libc::EINVAL,
            Error::VpasidAttached(_) => libc::EBUSY,
            Error::Exists(..) => libc::EEXIST,
            Error::NotFound(..) => libc::ENOENT,
            Error::Limit(_) => libc::ENOSPC,
            Error::NoPasid(_) => libc::ENOENT,
            Error::NotBound => libc::ENODEV,
            Error::AlreadyBound(_) => libc::EBUSY,
            Error::Fault(_) => libc::EFAULT,
            Error::Core(_, e) | Error::Client(_, e) => *e,
            Error::CoreGone(_) => libc::ENODEV,
            Error::Refused(r) => r.errno(),
            Error::TooBig(_) => libc::E2BIG,
            Error::BusMasterOff => libc::EIO,
        }
    }
}

/// A failed call of the compat session: a refusal keeps the core's errno;
/// anything else means the connection to the core is broken.
fn session_err(e: iommu_core::client::Error) -> Error {
    use iommu_core::client::Error as C;
    match e {
        C::Core(r) => {
            let code = r.errno.map_or(libc::EIO, |x| x.code());
            Error::Core(r.to_string(), code)
        }
        other => Error::CoreGone(other.to_string()),
    }
}

fn chan_err(e: device::Error) -> Error {
    let code = e.errno().map_or(libc::EIO, |x| x.code());
    Error::Core(e.to_string(), code)
}

fn tu_err(e: tu::Error) -> Error {
    match e {
        tu::Error::Channel(c) => chan_err(c),
        tu::Error::Client { address, errno, message } => Error::Client(format!("at {address:#x}: {message}"), errno),
        other => Error::Fault(other),
    }
}

/// True if a channel call failed because the channel itself is gone.
fn channel_broken(e: &device::Error) -> bool {
    matches!(e, device::Error::Io(_) | device::Error::Closed | device::Error::Wire(_) | device::Error::Unexpected(_))
}

/// Where a device's DMA is tagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Untagged (requester ID).
    Rid,
    /// Tagged with a guest PASID.
    Vpasid(u32),
}

/// The connected client as the way to client memory: DMA_READ /
/// DMA_WRITE sent to it, matched to replies (implemented by the
/// connection's `Port`).
pub trait ClientDma: tu::ClientMemory {
    /// Gives up every access waiting for the client (`ECANCELED`) and fails
    /// new ones at once, until as many [`ClientDma::unfence`] calls.
    fn fence(&self);
    /// Takes down one fence.
    fn unfence(&self);
    /// Waits until no fence is up, `max` at most.
    fn wait_unfenced(&self, max: Duration);
}

/// Where the connected client is found: shared by [`Dma`] and the
/// translation units, which reach client memory through it.
#[derive(Clone, Default)]
struct ClientSlot(Arc<RwLock<Option<Arc<dyn ClientDma>>>>);

impl ClientSlot {
    fn get(&self) -> Option<Arc<dyn ClientDma>> {
        sync::read(&self.0).clone()
    }
}

fn no_client() -> tu::ClientFailure {
    tu::ClientFailure { errno: libc::ENOTCONN, message: "no client is connected".into() }
}

impl tu::ClientMemory for ClientSlot {
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), tu::ClientFailure> {
        self.get().ok_or_else(no_client)?.read(address, buf)
    }
    fn write(&self, address: u64, data: &[u8]) -> Result<(), tu::ClientFailure> {
        self.get().ok_or_else(no_client)?.write(address, data)
    }
}

/// A fence on the client's DMA ([`Dma::fence_client`]); taken down when
/// dropped.
pub struct ClientFence(Option<Arc<dyn ClientDma>>);

impl Drop for ClientFence {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.unfence();
        }
    }
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
        let v = sync::lock(&self.view);
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

/// A file of a DMA_MAP: `(st_dev, st_ino)`.
type FileKey = (u64, u64);

/// One connection of the compat path to a core: the server's session, its
/// compat IOAS, and the device bound through a channel of that session
/// with its RID attached to the IOAS. A new one is made for each core the
/// server reaches.
pub struct Compat {
    session: Mutex<Client>,
    ioas: u32,
    tu: Arc<TranslationUnit>,
    dev: u32,
    core_pid: Option<i32>,
    session_id: u64,
    /// Which connection this is (1 for the first; one more per reconnect).
    generation: u64,
    /// Memory objects of this session, per file.
    mems: Mutex<HashMap<FileKey, u32>>,
    /// Duplicates of the session socket and of the channel, watched for
    /// hang-up.
    watch: [Arc<OwnedFd>; 2],
    /// Set when a call found the connection broken.
    broken: AtomicBool,
}

impl Compat {
    /// Opens a session on the core at `core`, allocates the compat IOAS,
    /// binds the device through a channel of that session and attaches its
    /// RID to the compat IOAS. With `timeout`, session calls give up after
    /// it (a core that accepts and never answers cannot hold the caller)
    /// until [`Compat::settle`].
    fn open(
        core: &Path,
        bind: BindArgs,
        generation: u64,
        timeout: Option<Duration>,
        view: &Arc<Mutex<View>>,
        client: &ClientSlot,
    ) -> Result<Arc<Compat>, Error> {
        let mut session = match timeout {
            Some(t) => Client::session_with_timeout(core, t),
            None => Client::session(core),
        }
        .map_err(session_err)?;
        let dup = |fd: std::os::fd::BorrowedFd<'_>, what: &str| {
            fd.try_clone_to_owned().map(Arc::new).map_err(|e| {
                Error::Core(
                    format!("cannot duplicate the {what} to watch it: {e}"),
                    e.raw_os_error().unwrap_or(libc::EIO),
                )
            })
        };
        let watch_session = dup(session.as_fd(), "core session socket")?;
        let ioas = session.ioas_alloc().map_err(session_err)?;
        let (_, fd) = session.open_device_channel().map_err(session_err)?;
        let watch_channel = dup(fd.as_fd(), "device channel")?;
        let channel = Arc::new(Channel::new(fd).map_err(chan_err)?);
        let provider = ViewProvider::new(view.clone(), true);
        channel.set_driver_state_provider(provider.clone());
        let tu = TranslationUnit::new(channel, tu::Config::default()).map_err(tu_err)?;
        let _ = provider.tu.set(Arc::downgrade(&tu));
        tu.set_client_memory(Some(Arc::new(client.clone())));
        let dev = tu.bind(bind).map_err(tu_err)?.dev_id;
        tu.channel().attach(dev, None, ioas).map_err(chan_err)?;
        Ok(Arc::new(Compat {
            core_pid: session.core_pid(),
            session_id: session.session_id(),
            session: Mutex::new(session),
            ioas,
            tu,
            dev,
            generation,
            mems: Mutex::new(HashMap::new()),
            watch: [watch_session, watch_channel],
            broken: AtomicBool::new(false),
        }))
    }

    /// Session calls wait as long as the core takes again.
    fn settle(&self) -> Result<(), Error> {
        sync::lock(&self.session).set_timeout(None).map_err(session_err)
    }

    /// The compat IOAS id.
    pub fn ioas(&self) -> u32 {
        self.ioas
    }

    /// The server's session id.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Device id in the server's session.
    pub fn dev(&self) -> u32 {
        self.dev
    }

    /// Which connection to a core this is: 1 for the first, one more for
    /// each reconnect.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Runs `f` with the server's session.
    pub fn with_session<T>(&self, f: impl FnOnce(&mut Client) -> T) -> T {
        f(&mut sync::lock(&self.session))
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
    /// A duplicate of the channel, watched for hang-up; `None` once it hung
    /// up while the core stayed (the session ended).
    watch: Option<Arc<OwnedFd>>,
    /// The pid of the core that made the channel.
    core_pid: Option<i32>,
}

enum MapKind {
    /// Mapped in the compat IOAS of connection `generation` (if that
    /// connection is the current one, the core holds the mapping).
    Fd { key: FileKey, generation: u64 },
    /// Client memory (no fd): memory object `mem` of the compat session
    /// of connection `generation`, mapped there.
    Client { mem: u32, generation: u64 },
}

struct ClientMap {
    size: u64,
    flags: u32,
    offset: u64,
    kind: MapKind,
}

/// A file a DMA_MAP gave, kept open to map it again in a new core.
struct HeldFile {
    file: File,
    refs: u32,
}

/// The client's DMA table.
#[derive(Default)]
struct Table {
    regions: BTreeMap<u64, ClientMap>,
    files: HashMap<FileKey, HeldFile>,
}

/// The core's dirty tracking granule.
pub const DIRTY_GRANULE: u64 = 4096;
/// Bits of one bitmap asked of the core at a time (256 KiB).
const CORE_BITMAP_BITS: u64 = 1 << 21;
/// Most blocks one DMA logging report reads from the core (8 MiB of
/// bitmaps).
pub const MAX_REPORT_BLOCKS: u64 = 1 << 26;

/// Client memory objects start on this boundary (see
/// `Dma::map_client_memory`).
const CLIENT_OBJECT_ALIGN: u64 = 2 << 20;

/// Highest IOVA the core maps (48 bits).
const MAX_IOVA: u64 = (1 << 48) - 1;

/// Limits of the DMA table.
pub const MAX_DMA_MAPS: usize = 65535;
/// Most distinct files the DMA table keeps open (fewer if half the
/// process's open-file limit is lower).
pub const MAX_DMA_FILES: usize = 4096;

/// First wait before connecting again to a core that went away.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between two attempts (the wait doubles up to it).
pub const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How long each call to a new core may take while the compat IOAS is
/// rebuilt.
const REBUILD_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// When one of the core's sockets hangs up, how long to wait for the
/// other to tell whether the whole core went away.
const HANGUP_GRACE: Duration = Duration::from_millis(200);

/// The DMA state of one device.
pub struct Dma {
    core: PathBuf,
    compat: RwLock<Option<Arc<Compat>>>,
    generations: AtomicU64,
    bound: RwLock<Option<Bound>>,
    table: Mutex<Table>,
    client: ClientSlot,
    caps: DeviceCaps,
    bind_args: BindArgs,
    policy: PasidPolicy,
    view: Arc<Mutex<View>>,
    /// Client regions without an fd.
    client_regions: AtomicUsize,
    /// DMA logging is on (the compat IOAS tracks dirty pages).
    logging: AtomicBool,
    /// Ranges `(first, last)` whose dirty state was lost with a core and
    /// that the next DMA logging report covering them shows dirty.
    unreported: Mutex<Vec<(u64, u64)>>,
    max_files: usize,
    /// Wakes the watcher thread (a binding came or went, a call found the
    /// core gone, the server stops).
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    reconnects: AtomicU64,
    /// Bus Master Enable and D0: device DMA is refused while clear.
    bus_master: AtomicBool,
}

impl Drop for Dma {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }
}

fn file_limit() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    usize::try_from(soft / 2).unwrap_or(MAX_DMA_FILES).clamp(16, MAX_DMA_FILES)
}

impl Dma {
    /// Connects to the core and sets up the compat path, and starts the
    /// thread that follows the core (reconnecting after it went away).
    pub fn new(core: &Path, bind: BindArgs, policy: PasidPolicy) -> Result<Arc<Dma>, Error> {
        let caps = bind.caps;
        let view = Arc::new(Mutex::new(View {
            server: format!("vfio-user-server pid {} device {}", std::process::id(), bind.name),
            ..View::default()
        }));
        let client = ClientSlot::default();
        let compat = Compat::open(core, bind.clone(), 1, None, &view, &client)?;
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::Core(format!("cannot make an eventfd: {e}"), e as i32))?;
        let dma = Arc::new(Dma {
            core: core.to_path_buf(),
            compat: RwLock::new(Some(compat)),
            generations: AtomicU64::new(1),
            bound: RwLock::new(None),
            table: Mutex::new(Table::default()),
            client,
            caps,
            bind_args: bind,
            policy,
            view,
            client_regions: AtomicUsize::new(0),
            logging: AtomicBool::new(false),
            unreported: Mutex::new(Vec::new()),
            max_files: file_limit(),
            wake: Arc::new(wake),
            stop: Arc::new(AtomicBool::new(false)),
            reconnects: AtomicU64::new(0),
            bus_master: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&dma);
        let (wake, stop) = (dma.wake.clone(), dma.stop.clone());
        std::thread::Builder::new()
            .name("ioasid-core-watch".into())
            .spawn(move || watch(&weak, &wake, &stop))
            .map_err(|e| Error::Core(format!("cannot start the core watcher: {e}"), libc::EAGAIN))?;
        Ok(dma)
    }

    /// Sets the server line observers see (e.g. with the socket path).
    pub fn set_description(&self, s: String) {
        sync::lock(&self.view).server = s;
    }

    fn publish(&self, b: Option<&Bound>) {
        let mut v = sync::lock(&self.view);
        v.rid = b.and_then(|b| b.rid);
        v.vpasids = b
            .map(|b| b.pasids.iter().map(|(&vpasid, &(ppasid, pt_id))| VpasidEntry { vpasid, ppasid, pt_id }).collect())
            .unwrap_or_default();
    }

    /// The compat path of the core the server is connected to now; `None`
    /// while it has none (the core went away and no new one answered yet).
    pub fn compat(&self) -> Option<Arc<Compat>> {
        sync::read(&self.compat).clone()
    }

    /// True while the server is connected to a core.
    pub fn core_connected(&self) -> bool {
        sync::read(&self.compat).is_some()
    }

    /// How many times the server reconnected to a core.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    fn kick(&self) {
        let _ = self.wake.write(1);
    }

    fn core_gone(&self) -> Error {
        Error::CoreGone(format!(
            "the core at {} went away and the server has not reached a new one yet",
            self.core.display()
        ))
    }

    /// A call of the compat session; a broken connection marks it so the
    /// watcher replaces it.
    fn call<T>(&self, c: &Compat, f: impl FnOnce(&mut Client) -> iommu_core::client::Result<T>) -> Result<T, Error> {
        let r = c.with_session(f).map_err(session_err);
        if matches!(r, Err(Error::CoreGone(_))) && !c.broken.swap(true, Ordering::AcqRel) {
            self.kick();
        }
        r
    }

    /// Drops `c` if it is still the current compat path, once every DMA
    /// through it has ended. True if it was.
    fn lose(&self, c: &Arc<Compat>, why: &str) -> bool {
        // DMA through `c` that waits for the client would hold the compat
        // lock (and the device thread behind it) until it timed out.
        let _fence = self.fence_client();
        let old = {
            let mut g = sync::write(&self.compat);
            match g.as_ref() {
                Some(cur) if Arc::ptr_eq(cur, c) => g.take(),
                _ => None,
            }
        };
        let Some(old) = old else { return false };
        tracing::warn!(
            "lost the core at {} (compat session {}, {why}): DMA_MAP with an fd fails with ENODEV and device DMA \
             through the compat IOAS fails until a core answers there again; reconnecting",
            self.core.display(),
            old.session_id
        );
        drop(old);
        true
    }

    /// Sets (or clears) the connected client, the way to client memory.
    pub fn set_client(&self, c: Option<Arc<dyn ClientDma>>) {
        *sync::write(&self.client.0) = c;
    }

    /// Fences the client's DMA (see the module docs) until the returned
    /// guard is dropped: device DMA waiting for the client fails at once
    /// with `ECANCELED`, and so does new DMA to client memory.
    pub fn fence_client(&self) -> ClientFence {
        let c = self.client.get();
        if let Some(c) = &c {
            c.fence();
        }
        ClientFence(c)
    }

    /// A fence if the client holds memory of the compat IOAS (the core's
    /// invalidations wait for DMA in flight, which may wait for it).
    fn fence_if_client_memory(&self) -> Option<ClientFence> {
        (self.client_regions.load(Ordering::Acquire) > 0).then(|| self.fence_client())
    }

    /// Waits (at most `max`) until no fence is up on the client's DMA: a
    /// device whose DMA was given up with `ECANCELED` calls this, holding
    /// no lock, before it tries again.
    pub fn wait_client(&self, max: Duration) {
        if let Some(c) = self.client.get() {
            c.wait_unfenced(max);
        }
    }

    /// Handles DMA_MAP. `fd` is the passed file, if any.
    pub fn map(&self, m: &proto::DmaMap, fd: Option<OwnedFd>) -> Result<(), Error> {
        if m.flags & !(proto::DMA_MAP_READ | proto::DMA_MAP_WRITE) != 0 {
            return Err(Error::UnknownFlags(m.flags));
        }
        if m.flags == 0 {
            return Err(Error::NoAccess);
        }
        if m.size == 0 {
            return Err(Error::EmptyRegion);
        }
        let last = m.address.checked_add(m.size - 1).ok_or(Error::Overflow(m.address, m.size))?;
        let mut t = sync::lock(&self.table);
        if t.regions.len() >= MAX_DMA_MAPS {
            return Err(Error::Limit(format!("at most {MAX_DMA_MAPS} DMA regions")));
        }
        if let Some((&a, r)) = t.regions.range(..=last).next_back() {
            if a + (r.size - 1) >= m.address {
                return Err(Error::Exists(m.address, m.size));
            }
        }
        const PAGE: u64 = 4096;
        let Some(fd) = fd else {
            if !m.address.is_multiple_of(PAGE) || !m.size.is_multiple_of(PAGE) {
                return Err(Error::Unaligned(m.address, m.size, m.offset));
            }
            if last > MAX_IOVA {
                return Err(Error::BeyondIova(m.address, m.size));
            }
            let Some(c) = self.compat() else { return Err(self.core_gone()) };
            let mem = self.map_client_memory(&c, m.address, m.size, m.flags)?;
            let kind = MapKind::Client { mem, generation: c.generation };
            t.regions.insert(m.address, ClientMap { size: m.size, flags: m.flags, offset: m.offset, kind });
            self.client_regions.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        };
        if !m.address.is_multiple_of(PAGE) || !m.size.is_multiple_of(PAGE) || !m.offset.is_multiple_of(PAGE) {
            return Err(Error::Unaligned(m.address, m.size, m.offset));
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
        let md = file.metadata().map_err(Error::Stat)?;
        if m.offset.checked_add(m.size).is_none_or(|end| end > md.len()) {
            return Err(Error::PastFileEnd { address: m.address, size: m.size, offset: m.offset, file_len: md.len() });
        }
        let key = (md.dev(), md.ino());
        let Some(c) = self.compat() else { return Err(self.core_gone()) };
        let held = t.files.contains_key(&key);
        if !held && t.files.len() >= self.max_files {
            return Err(Error::Limit(format!("at most {} distinct files in the DMA table", self.max_files)));
        }
        let known = sync::lock(&c.mems).get(&key).copied();
        let (mem, fresh) = match known {
            Some(id) => (id, false),
            None => {
                let f = t.files.get(&key).map_or(&file, |h| &h.file);
                let info = self.call(&c, |s| s.register_memory(f.as_fd()))?;
                sync::lock(&c.mems).insert(key, info.id);
                (info.id, true)
            }
        };
        let perm = Perm { read: m.flags & proto::DMA_MAP_READ != 0, write: m.flags & proto::DMA_MAP_WRITE != 0 };
        let args = MapArgs { ioas: c.ioas, mem, offset: m.offset, length: m.size, iova: Some(m.address), perm };
        if let Err(e) = self.call(&c, |s| s.map(args)) {
            if fresh {
                sync::lock(&c.mems).remove(&key);
                if !matches!(e, Error::CoreGone(_)) {
                    // Destroying an object has the core invalidate.
                    let _fence = self.fence_if_client_memory();
                    if let Err(d) = self.call(&c, |s| s.destroy(mem)) {
                        tracing::warn!("could not free memory object {mem} of the compat session: {d}");
                    }
                }
            }
            return Err(e);
        }
        match t.files.get_mut(&key) {
            Some(h) => h.refs += 1,
            None => {
                t.files.insert(key, HeldFile { file, refs: 1 });
            }
        }
        let kind = MapKind::Fd { key, generation: c.generation };
        t.regions.insert(m.address, ClientMap { size: m.size, flags: m.flags, offset: m.offset, kind });
        Ok(())
    }

    /// Registers `size` bytes of client memory at the client's `address` in
    /// the compat session of `c` and maps them at IOVA `address` with the
    /// rights of `flags`; returns the memory object.
    fn map_client_memory(&self, c: &Arc<Compat>, address: u64, size: u64, flags: u32) -> Result<u32, Error> {
        let perm = Perm { read: flags & proto::DMA_MAP_READ != 0, write: flags & proto::DMA_MAP_WRITE != 0 };
        // The object starts at the 2 MiB boundary at or below the region,
        // so that IOVA and system address agree modulo 2 MiB and the core
        // maps the region with 2 MiB leaves where it can (one translation,
        // and one message, per 64 KiB step instead of sixteen). The bytes
        // before the region are never mapped.
        let lead = address % CLIENT_OBJECT_ALIGN;
        let total = size.checked_add(lead).ok_or(Error::Overflow(address, size))?;
        let mem = self.call(c, |s| s.register_client_memory(total, perm.write, address - lead))?.id;
        let args = MapArgs { ioas: c.ioas, mem, offset: lead, length: size, iova: Some(address), perm };
        if let Err(e) = self.call(c, |s| s.map(args)) {
            if !matches!(e, Error::CoreGone(_)) {
                // Destroying an object has the core invalidate.
                let _fence = self.fence_client();
                if let Err(d) = self.call(c, |s| s.destroy(mem)) {
                    tracing::warn!("could not free client memory object {mem} of the compat session: {d}");
                }
            }
            return Err(e);
        }
        Ok(mem)
    }

    /// One region less of file `key`: the last one closes the file and
    /// frees its memory object in `c`.
    fn file_put(&self, t: &mut Table, key: FileKey, c: Option<&Arc<Compat>>) {
        let Some(h) = t.files.get_mut(&key) else { return };
        h.refs = h.refs.saturating_sub(1);
        if h.refs > 0 {
            return;
        }
        // A file that passed check_memory_fd: closing it cannot block.
        t.files.remove(&key);
        let Some(c) = c else { return };
        let Some(id) = sync::lock(&c.mems).remove(&key) else { return };
        if let Err(e) = self.call(c, |s| s.destroy(id)) {
            tracing::warn!("could not free memory object {id} of the compat session: {e}");
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
        // The core answers the unmap once DMA in flight has ended; DMA
        // waiting for the client cannot end while the client waits for
        // this reply.
        let _fence = self.fence_if_client_memory();
        let mut t = sync::lock(&self.table);
        let victims = pick(&t.regions)?;
        // No new compat path appears while the table is locked (the watcher
        // installs one under it).
        let mut link = self.compat();
        let mut first_err = None;
        for a in victims {
            let Some(r) = t.regions.get(&a) else { continue };
            let rsize = r.size;
            let (file, generation) = match r.kind {
                MapKind::Fd { key, generation } => (Some(key), generation),
                MapKind::Client { generation, .. } => (None, generation),
            };
            // In the core only if mapped through the current connection;
            // otherwise it went with the core that held it.
            if let Some(c) = link.clone().filter(|c| c.generation == generation) {
                // The core completes the unmap only after the translation
                // unit has dropped its IOTLB entries and in-flight DMA ended.
                match self.call(&c, |s| s.unmap(c.ioas, a, rsize)) {
                    Ok(_) => {}
                    Err(Error::CoreGone(why)) => {
                        // The mapping went with the core; once no DMA runs
                        // through the old connection the region can go.
                        self.lose(&c, &why);
                        link = None;
                    }
                    Err(e) => {
                        tracing::warn!("unmap of {a:#x}+{rsize:#x} in the compat IOAS failed: {e}");
                        first_err.get_or_insert(e);
                        continue;
                    }
                }
            }
            match t.regions.remove(&a).map(|r| r.kind) {
                Some(MapKind::Client { mem, generation }) => {
                    self.client_regions.fetch_sub(1, Ordering::AcqRel);
                    if let Some(c) = link.as_ref().filter(|c| c.generation == generation) {
                        if let Err(e) = self.call(c, |s| s.destroy(mem)) {
                            tracing::warn!("could not free client memory object {mem} of the compat session: {e}");
                        }
                    }
                }
                _ => {
                    if let Some(key) = file {
                        self.file_put(&mut t, key, link.as_ref());
                    }
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
        sync::lock(&self.table).regions.len()
    }

    /// Number of files the DMA table keeps open.
    pub fn file_count(&self) -> usize {
        sync::lock(&self.table).files.len()
    }

    /// Runs `f` with the translation unit, device id and pPASID DMA of
    /// `route` uses now. Through the compat path, `f` runs under the read
    /// side of the compat lock: once the watcher has dropped a compat path,
    /// no DMA runs through it any more.
    fn translated<T>(
        &self,
        route: Route,
        f: impl FnOnce(&TranslationUnit, u32, u32) -> tu::Result<T>,
    ) -> Result<T, Error> {
        let via_binding = {
            let g = sync::read(&self.bound);
            match (g.as_ref(), route) {
                (Some(b), Route::Rid) => Some((b.tu.clone(), b.dev, 0)),
                (Some(b), Route::Vpasid(v)) => match b.pasids.get(&v) {
                    Some(&(p, _)) => Some((b.tu.clone(), b.dev, p)),
                    None => return Err(Error::NoPasid(v)),
                },
                (None, Route::Vpasid(v)) => return Err(Error::NoPasid(v)),
                (None, Route::Rid) => None,
            }
        };
        if let Some((tu, dev, pasid)) = via_binding {
            return f(&tu, dev, pasid).map_err(tu_err);
        }
        let g = sync::read(&self.compat);
        let Some(c) = g.as_ref() else { return Err(self.core_gone()) };
        match f(&c.tu, c.dev, 0) {
            Ok(v) => Ok(v),
            Err(tu::Error::Channel(e)) if channel_broken(&e) => {
                if !c.broken.swap(true, Ordering::AcqRel) {
                    self.kick();
                }
                Err(Error::CoreGone(e.to_string()))
            }
            Err(e) => Err(tu_err(e)),
        }
    }

    fn bound_now(&self) -> bool {
        sync::read(&self.bound).is_some()
    }

    /// Whether the function may start DMA: the command register's Bus
    /// Master Enable is set and the function is in D0 (the framework sets
    /// this from config space; a function starts with it clear, as after
    /// a PCI reset).
    pub fn bus_master(&self) -> bool {
        self.bus_master.load(Ordering::Acquire)
    }

    /// Sets what [`Dma::bus_master`] says. While clear, every device DMA
    /// ([`Dma::read`], [`Dma::write`], [`Dma::check_write`]) fails with
    /// [`Error::BusMasterOff`] before touching memory.
    pub fn set_bus_master(&self, on: bool) {
        self.bus_master.store(on, Ordering::Release);
    }

    fn master(&self) -> Result<(), Error> {
        if self.bus_master() {
            Ok(())
        } else {
            Err(Error::BusMasterOff)
        }
    }

    /// Device DMA read.
    pub fn read(&self, route: Route, iova: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.master()?;
        self.translated(route, |tu, dev, pasid| tu.read(dev, pasid, iova, buf))
    }

    /// Device DMA write.
    pub fn write(&self, route: Route, iova: u64, data: &[u8]) -> Result<(), Error> {
        self.master()?;
        self.translated(route, |tu, dev, pasid| {
            // The whole range is checked first, so a write that would fault
            // part-way writes nothing (the faulting page is reported).
            if data.len() > 1 {
                tu.translate(dev, pasid, iova, data.len(), Perm::W)?;
            }
            tu.write(dev, pasid, iova, data)
        })
    }

    /// Checks that `[iova, iova+len)` can be written through `route`,
    /// without writing (faults and page requests happen here).
    pub fn check_write(&self, route: Route, iova: u64, len: usize) -> Result<(), Error> {
        self.master()?;
        self.translated(route, |tu, dev, pasid| tu.translate(dev, pasid, iova, len, Perm::W).map(|_| ()))
    }

    /// Reports an unrecoverable fault of `route` to the core (a vPASID
    /// with no pPASID is reported on the RID: the core never learns
    /// vPASIDs). Without a core there is nobody to tell.
    pub fn report_fault(&self, route: Route, iova: u64, write: bool, reason: FaultReason) {
        let target = match route {
            Route::Vpasid(v) if !sync::read(&self.bound).as_ref().is_some_and(|b| b.pasids.contains_key(&v)) => {
                Route::Rid
            }
            r => r,
        };
        let access = if write { Perm::W } else { Perm::R };
        let sent = self.translated(target, |tu, dev, pasid| {
            let rec = FaultRecord { dev_id: dev, pasid, iova, access, reason, group: 0, last: true, cookie: 0 };
            tu.channel().report_fault(rec).map_err(tu::Error::Channel)
        });
        if let Err(e) = sent {
            tracing::debug!("fault report not delivered: {e}");
        }
    }

    /// Extension: binds the device through a session's device channel.
    pub fn bind(&self, fd: OwnedFd) -> Result<(u32, u64), Error> {
        if let Some(b) = sync::read(&self.bound).as_ref() {
            return Err(Error::AlreadyBound(b.session));
        }
        // The fd comes from a client: it must be a socket made by our core
        // (a silent or foreign peer would stall every channel call).
        let Some(c) = self.compat() else { return Err(self.core_gone()) };
        let core_pid = c.core_pid;
        drop(c);
        let peer = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials).ok().map(|c| c.pid());
        let stream = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
            .is_ok_and(|t| t == nix::sys::socket::SockType::Stream);
        if !stream || peer.is_none() || peer != core_pid {
            return Err(Error::NotOurChannel);
        }
        let watch = fd.try_clone().map_err(|e| {
            Error::Core(
                format!("cannot duplicate the device channel to watch it: {e}"),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })?;
        let channel = Arc::new(Channel::new(fd).map_err(Error::BadChannel)?);
        let provider = ViewProvider::new(self.view.clone(), false);
        channel.set_driver_state_provider(provider.clone());
        let session = channel.session();
        let tu = TranslationUnit::new(channel, tu::Config::default()).map_err(tu_err)?;
        let _ = provider.tu.set(Arc::downgrade(&tu));
        let dev = tu.bind(self.bind_args.clone()).map_err(tu_err)?.dev_id;
        let mut g = sync::write(&self.bound);
        *g = Some(Bound {
            tu,
            dev,
            session,
            rid: None,
            pasids: BTreeMap::new(),
            watch: Some(Arc::new(watch)),
            core_pid,
        });
        self.publish(g.as_ref());
        drop(g);
        // The watcher follows the new channel.
        self.kick();
        Ok((dev, session))
    }

    /// Extension: drops the binding (the core frees the device, its
    /// attachments and pPASIDs when the channel closes).
    pub fn unbind(&self) -> Result<(), Error> {
        let b = sync::write(&self.bound).take().ok_or(Error::NotBound)?;
        self.publish(None);
        self.kick();
        if let Err(e) = b.tu.unbind(b.dev) {
            tracing::debug!("unbind of device {} in session {}: {e}", b.dev, b.session);
        }
        Ok(())
    }

    /// The watcher saw the binding's channel hang up: with the core gone
    /// (`core_gone`), the binding goes; otherwise its session ended (or it
    /// cannot be told yet) and the binding stays, failing DMA, until
    /// IOASID_UNBIND, the client leaves, or a reconnect finds another core.
    fn binding_hung_up(&self, watch: &Arc<OwnedFd>, core_gone: bool) {
        let mut g = sync::write(&self.bound);
        let same = g.as_ref().and_then(|b| b.watch.as_ref()).is_some_and(|w| Arc::ptr_eq(w, watch));
        if !same {
            return;
        }
        if !core_gone {
            if let Some(b) = g.as_mut() {
                b.watch = None;
                tracing::info!(
                    "the device channel of session {} closed: the binding stays (its DMA fails) until IOASID_UNBIND, \
                     the client leaves, or the server finds that its core went away",
                    b.session
                );
            }
            return;
        }
        let Some(b) = g.take() else { return };
        self.publish(None);
        drop(g);
        self.log_binding_dropped(&b);
    }

    /// Extension: attaches (or replaces) the RID or a vPASID to `pt_id`.
    /// Returns the pPASID (0 for the RID).
    pub fn attach(&self, vpasid: Option<u32>, pt_id: u32, replace: bool) -> Result<u32, Error> {
        let r = self.attach_inner(vpasid, pt_id, replace);
        self.republish();
        r
    }

    fn republish(&self) {
        let g = sync::read(&self.bound);
        self.publish(g.as_ref());
    }

    fn attach_inner(&self, vpasid: Option<u32>, pt_id: u32, replace: bool) -> Result<u32, Error> {
        let mut g = sync::write(&self.bound);
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
            return Err(Error::NoPasidCapability);
        }
        if v == 0 || u64::from(v) >= 1u64 << width {
            return Err(Error::VpasidRange(v, width));
        }
        match (b.pasids.get(&v).copied(), replace) {
            (Some(_), false) => Err(Error::VpasidAttached(v)),
            (None, true) => Err(Error::VpasidNotAttached(v)),
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
        let mut g = sync::write(&self.bound);
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
        match sync::read(&self.bound).as_ref() {
            Some(b) => (b.rid, b.pasids.iter().map(|(&v, &(p, t))| (v, p, t)).collect()),
            None => (None, Vec::new()),
        }
    }

    /// `(session, dev_id)` of the extension binding.
    pub fn binding(&self) -> Option<(u64, u32)> {
        sync::read(&self.bound).as_ref().map(|b| (b.session, b.dev))
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

    /// Connects to the core again and rebuilds the compat path: the
    /// client's fd regions are mapped again at their IOVAs with their
    /// rights (a region the new core refuses stays in the table, unmapped,
    /// and is logged), DMA logging is turned on again if it was on. Returns
    /// the new path and how many regions were restored and refused.
    fn reconnect(&self) -> Result<(Arc<Compat>, usize, usize), Error> {
        // Only this thread reconnects; the number is taken when it works.
        let generation = self.generations.load(Ordering::Acquire) + 1;
        let c = Compat::open(
            &self.core,
            self.bind_args.clone(),
            generation,
            Some(REBUILD_CALL_TIMEOUT),
            &self.view,
            &self.client,
        )?;
        let mut t = sync::lock(&self.table);
        let Table { regions, files } = &mut *t;
        let (mut restored, mut refused) = (0, 0);
        let mut ranges = Vec::new();
        for (&iova, r) in regions.iter_mut() {
            ranges.push((iova, iova + (r.size - 1)));
            if let MapKind::Client { mem, generation: g } = &mut r.kind {
                *g = 0;
                match self.map_client_memory(&c, iova, r.size, r.flags) {
                    Ok(id) => {
                        *mem = id;
                        *g = generation;
                        restored += 1;
                    }
                    Err(e @ Error::CoreGone(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(
                            "the new core refuses client memory of DMA region {iova:#x}+{:#x}: {e}; it stays in the \
                             table, unmapped (device DMA to it faults)",
                            r.size
                        );
                        refused += 1;
                    }
                }
                continue;
            }
            let MapKind::Fd { key, generation: g } = &mut r.kind else { continue };
            // Not in the new core until mapped there (an earlier attempt
            // may have marked it with this number).
            *g = 0;
            let Some(h) = files.get(key) else { continue };
            let known = sync::lock(&c.mems).get(key).copied();
            let mem = match known {
                Some(id) => id,
                None => match c.with_session(|s| s.register_memory(h.file.as_fd())).map_err(session_err) {
                    Ok(info) => {
                        sync::lock(&c.mems).insert(*key, info.id);
                        info.id
                    }
                    Err(e @ Error::CoreGone(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!("the new core refuses the file of DMA region {iova:#x}+{:#x}: {e}", r.size);
                        refused += 1;
                        continue;
                    }
                },
            };
            let perm = Perm { read: r.flags & proto::DMA_MAP_READ != 0, write: r.flags & proto::DMA_MAP_WRITE != 0 };
            let args = MapArgs { ioas: c.ioas, mem, offset: r.offset, length: r.size, iova: Some(iova), perm };
            match c.with_session(|s| s.map(args)).map_err(session_err) {
                Ok(_) => {
                    *g = generation;
                    restored += 1;
                }
                Err(e @ Error::CoreGone(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(
                        "the new core refuses DMA region {iova:#x}+{:#x}: {e}; it stays in the table, unmapped \
                         (device DMA to it faults)",
                        r.size
                    );
                    refused += 1;
                }
            }
        }
        if self.logging.load(Ordering::Acquire) {
            match c.with_session(|s| s.set_dirty_tracking(c.ioas, true)).map_err(session_err) {
                Ok(()) => {}
                Err(e @ Error::CoreGone(_)) => return Err(e),
                Err(e) => tracing::warn!("the new core refuses dirty tracking of the compat IOAS: {e}"),
            }
            // What the old core tracked and nobody asked for is lost: the
            // next report shows all of it dirty.
            *sync::lock(&self.unreported) = ranges;
        }
        c.settle()?;
        *sync::write(&self.compat) = Some(c.clone());
        self.generations.store(generation, Ordering::Release);
        drop(t);
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        Ok((c, restored, refused))
    }

    /// After a reconnect: a binding whose channel came from another core
    /// than the one now answering went away with that core.
    fn check_binding_core(&self, core_pid: Option<i32>) {
        let stale = sync::read(&self.bound).as_ref().is_some_and(|b| b.core_pid != core_pid);
        if !stale {
            return;
        }
        let Some(b) = sync::write(&self.bound).take() else { return };
        self.publish(None);
        self.log_binding_dropped(&b);
    }

    fn log_binding_dropped(&self, b: &Bound) {
        tracing::warn!(
            "session {} that bound the device through the ioasid extension went away with its core: the binding \
             and its vPASID map ({} vPASIDs{}) are dropped; the VMM binds again with a session of the new core",
            b.session,
            b.pasids.len(),
            if b.rid.is_some() { ", and the RID's attachment" } else { "" }
        );
    }

    /// The binding's channel duplicate, if it is watched.
    fn bound_watch(&self) -> Option<Arc<OwnedFd>> {
        sync::read(&self.bound).as_ref().and_then(|b| b.watch.clone())
    }

    /// Dirty tracking of the compat IOAS. Turning it off without a core
    /// succeeds (nothing tracks).
    pub fn set_dirty_tracking(&self, on: bool) -> Result<(), Error> {
        // The core's invalidation waits for DMA in flight.
        let _fence = self.fence_if_client_memory();
        let Some(c) = self.compat() else {
            if on {
                return Err(self.core_gone());
            }
            self.logging.store(false, Ordering::Release);
            sync::lock(&self.unreported).clear();
            return Ok(());
        };
        self.call(&c, |s| s.set_dirty_tracking(c.ioas, on))?;
        self.logging.store(on, Ordering::Release);
        sync::lock(&self.unreported).clear();
        Ok(())
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
        let bad = |why: &'static str| Error::BadReport { iova, length, why };
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
        let Some(c) = self.compat() else { return Err(self.core_gone()) };
        let mut out = vec![0u64; usize::try_from(bits.div_ceil(64)).map_err(|_| bad("the bitmap is too large"))?];
        // Pieces of the core's bitmap, on boundaries of the piece size so
        // that a large leaf is never split between two reads.
        let piece = q.checked_mul(CORE_BITMAP_BITS);
        for (start, stop, no_clear) in spans {
            let mut cur = start;
            while cur < stop {
                let next = piece.and_then(|p| (cur / p + 1).checked_mul(p)).map_or(stop, |b| b.min(stop));
                let words = self.call(&c, |s| s.dirty_bitmap(c.ioas, cur, next - cur, q, no_clear))?;
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
        self.merge_unreported(&mut out, iova, end - 1, page_size);
        Ok(out)
    }

    /// Sets the bits of pages of the report `[iova, last]` that overlap
    /// ranges whose dirty state was lost with a core, and forgets those
    /// parts of the ranges (they have now been reported dirty).
    fn merge_unreported(&self, out: &mut [u64], iova: u64, last: u64, page_size: u64) {
        let mut u = sync::lock(&self.unreported);
        if u.is_empty() {
            return;
        }
        let mut rest = Vec::with_capacity(u.len());
        for &(s, l) in u.iter() {
            if l < iova || s > last {
                rest.push((s, l));
                continue;
            }
            let (lo, hi) = (s.max(iova), l.min(last));
            set_bits(out, (lo - iova) / page_size, (hi - iova) / page_size);
            if s < iova {
                rest.push((s, iova - 1));
            }
            if l > last {
                rest.push((last + 1, l));
            }
        }
        *u = rest;
    }
}

/// What woke the watcher.
#[derive(Default)]
struct Woken {
    /// The compat session or channel hung up.
    compat: bool,
    /// The binding's channel hung up.
    bound: bool,
}

/// Asked of a watched socket: nothing (a hang-up and an error are always
/// reported; its data is not the watcher's).
const HANGUP: PollFlags = PollFlags::empty();

/// The peer closed its end (a Unix stream socket whose peer closed shows
/// `POLLHUP`), or the socket failed.
fn hung_up(p: &PollFd<'_>) -> bool {
    p.revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL))
}

/// Waits (at most `timeout`) for the wake eventfd, or for a hang-up of the
/// compat path's sockets or of the binding's channel.
fn wait(wake: &EventFd, compat: Option<&Compat>, bound: Option<&OwnedFd>, timeout: PollTimeout) -> Woken {
    let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
    if let Some(c) = compat {
        fds.extend(c.watch.iter().map(|w| PollFd::new(w.as_fd(), HANGUP)));
    }
    let at_bound = fds.len();
    if let Some(b) = bound {
        fds.push(PollFd::new(b.as_fd(), HANGUP));
    }
    match nix::poll::poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Woken::default(),
        Err(e) => {
            tracing::warn!("the core watcher cannot poll: {e}");
            std::thread::sleep(RECONNECT_FIRST);
            return Woken::default();
        }
    }
    if fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
        let _ = wake.read();
    }
    Woken {
        compat: fds.get(1..at_bound).is_some_and(|s| s.iter().any(hung_up)),
        bound: bound.is_some() && fds.get(at_bound).is_some_and(hung_up),
    }
}

/// True if one of `fds` hangs up within `grace`.
fn hangs_up_within(fds: &[&OwnedFd], grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p: Vec<PollFd<'_>> = fds.iter().map(|f| PollFd::new(f.as_fd(), HANGUP)).collect();
        let t = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut p, t) {
            Ok(_) if p.iter().any(hung_up) => return true,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// The watcher thread: follows the core the compat path is connected to,
/// drops the path when the core goes away, reconnects with backoff and
/// drops an extension binding that went with its core. Holds the device's
/// [`Dma`] only between waits, and ends when it is gone.
fn watch(dma: &Weak<Dma>, wake: &EventFd, stop: &AtomicBool) {
    let mut backoff = RECONNECT_FIRST;
    let mut lost_at: Option<Instant> = None;
    let mut last_failure = String::new();
    while !stop.load(Ordering::Acquire) {
        let Some(d) = dma.upgrade() else { return };
        match d.compat() {
            Some(c) if !c.broken.load(Ordering::Acquire) => {
                let bound = d.bound_watch();
                drop(d);
                let w = wait(wake, Some(&c), bound.as_deref(), PollTimeout::NONE);
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let Some(d) = dma.upgrade() else { return };
                // When the core dies every socket of it hangs up at once;
                // one alone means only that connection ended.
                let mut compat_gone = w.compat;
                let mut bound_gone = w.bound;
                if compat_gone && !bound_gone {
                    bound_gone = bound.as_deref().is_some_and(|b| hangs_up_within(&[b], HANGUP_GRACE));
                } else if bound_gone && !compat_gone {
                    let [s, ch] = &c.watch;
                    compat_gone = hangs_up_within(&[s, ch], HANGUP_GRACE);
                }
                if compat_gone && d.lose(&c, "the core closed the connection") {
                    lost_at = Some(Instant::now());
                    backoff = RECONNECT_FIRST;
                }
                if let Some(b) = bound.as_ref().filter(|_| bound_gone) {
                    d.binding_hung_up(b, compat_gone);
                }
            }
            Some(c) => {
                if d.lose(&c, "a call found the connection broken") {
                    lost_at = Some(Instant::now());
                    backoff = RECONNECT_FIRST;
                }
            }
            None => {
                let since = *lost_at.get_or_insert_with(Instant::now);
                match d.reconnect() {
                    Ok((c, restored, refused)) => {
                        tracing::info!(
                            "reconnected to the core at {} after {} ms without one: compat session {}, IOAS {}, {} \
                             DMA regions mapped again{}; the device is bound and its RID attached",
                            d.core.display(),
                            since.elapsed().as_millis(),
                            c.session_id,
                            c.ioas,
                            restored,
                            if refused > 0 { format!(", {refused} refused by the new core") } else { String::new() }
                        );
                        d.check_binding_core(c.core_pid);
                        lost_at = None;
                        backoff = RECONNECT_FIRST;
                        last_failure.clear();
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if msg != last_failure {
                            tracing::info!(
                                "no core answers at {} yet ({msg}); trying again, every {} ms at most",
                                d.core.display(),
                                RECONNECT_MAX.as_millis()
                            );
                            last_failure = msg;
                        }
                        let bound = d.bound_watch();
                        drop(d);
                        let t = PollTimeout::try_from(backoff).unwrap_or(PollTimeout::MAX);
                        let w = wait(wake, None, bound.as_deref(), t);
                        if let (true, Some(b), Some(d)) = (w.bound, bound.as_ref(), dma.upgrade()) {
                            // Without a core of our own it cannot be told
                            // whether its core lives: the reconnect decides.
                            d.binding_hung_up(b, false);
                        }
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
            }
        }
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
