//! DMA: the client's DMA_MAP table, its compat IOAS in the core, the
//! binding made through the ioasid extension with its vPASID map, and the
//! path a device's DMA takes: a device resolves a [`Route`] once into a
//! [`DmaSpace`] ([`DeviceDma::space`]) and reads and writes through it.
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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use iommu_core::device;
use iommu_core::memfd;

use iommu_core::tu;
use iommu_core::types::{BindArgs, DeviceCaps, FaultReason};
use nix::sys::eventfd::{EfdFlags, EventFd};

mod binding;
mod client;
mod compat;
mod logging;
mod space;
mod table;
mod watch;

pub use binding::{Bound, Owner, PasidPolicy};
pub use client::{ClientDma, ClientFence};
pub use compat::Compat;
pub use logging::{DIRTY_GRANULE, MAX_REPORT_BLOCKS};
pub use space::{CopyError, DeviceDma, DmaSpace, QueueDma, RouteDma, Side};
pub use table::{IDLE_FILES, MAX_DMA_FILES, MAX_DMA_MAPS};
pub use watch::{RECONNECT_FIRST, RECONNECT_MAX};

use binding::View;
use client::ClientSlot;
use table::{file_limit, Table};
use watch::watch;

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
    /// The binding was made by the other owner (the orchestrator's control
    /// socket, or the vfio-user client): only its owner changes it.
    #[error("the binding belongs to {0}")]
    NotOwner(Owner),
    /// The access faulted in the IOAS (the fault was reported to the
    /// core, or a page request for it failed).
    #[error("DMA fault at IOVA {iova:#x}: {reason:?}")]
    Fault {
        /// The first IOVA that did not translate.
        iova: u64,
        /// Why.
        reason: FaultReason,
    },
    /// The translation unit could not do the access for another cause:
    /// the device is not bound through it, or memory cannot be mapped.
    #[error(transparent)]
    Translation(tu::Error),
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
            Error::NotOwner(_) => libc::EPERM,
            Error::Fault { .. } | Error::Translation(_) => libc::EFAULT,
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
        tu::Error::Fault { iova, reason, .. } => Error::Fault { iova, reason },
        other => Error::Translation(other),
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

/// The DMA state of one device.
pub struct Dma {
    core: PathBuf,
    compat: RwLock<Option<Arc<Compat>>>,
    generations: AtomicU64,
    /// Moves whenever a route may come to lead to another unit (or to
    /// none): a binding made or dropped, a compat path lost or rebuilt.
    /// A [`QueueDma`] lets its handle go when it sees it move.
    units: AtomicU64,
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
            units: AtomicU64::new(0),
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

    /// Whether the function may start DMA: the command register's Bus
    /// Master Enable is set and the function is in D0 (the framework sets
    /// this from config space; a function starts with it clear, as after
    /// a PCI reset).
    pub fn bus_master(&self) -> bool {
        self.bus_master.load(Ordering::Acquire)
    }

    /// Sets what [`Dma::bus_master`] says. While clear, every device DMA
    /// (through a [`DmaSpace`]) fails with [`Error::BusMasterOff`] before
    /// touching memory.
    pub fn set_bus_master(&self, on: bool) {
        self.bus_master.store(on, Ordering::Release);
    }

    /// Client disconnect: every DMA region goes, the extension binding
    /// the client made (an fd of that client) is dropped; a binding made
    /// through the control socket stays.
    pub fn disconnect(&self) {
        if let Err(e) = self.unmap(0, 0, true) {
            tracing::warn!("unmapping the departed client's DMA failed: {e}");
        }
        if self.binding_owner() == Some(Owner::Client) {
            let _ = self.unbind(Owner::Client);
        }
        self.set_client(None);
    }
}
