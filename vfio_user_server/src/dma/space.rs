//! The DMA interface of devices: a device resolves a [`Route`] once into a
//! [`DmaSpace`] (the translation context: binding or compat path, device,
//! pPASID) and reads and writes through it, as vm-memory's `Bytes` reads
//! and writes guest memory. [`Dma`] is the server's [`DeviceDma`]; tests
//! and fuzz targets give devices memory of their own through the same two
//! traits.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use iommu_core::sync;
pub use iommu_core::tu::Side;
use iommu_core::tu::{self, At, TranslationUnit};
use iommu_core::types::{FaultReason, FaultRecord, Perm};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{channel_broken, tu_err, Dma, Error, Owner, Route};

/// A copy that failed: on which side (the source is read, the
/// destination written), and why.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} of the copy: {error}")]
pub struct CopyError {
    /// The side that failed.
    pub side: Side,
    /// Why.
    pub error: Error,
}

impl CopyError {
    fn of(side: Side) -> impl Fn(Error) -> CopyError {
        move |error| CopyError { side, error }
    }
}

/// Bytes [`bounce_copy`] moves at a time.
const BOUNCE: usize = 64 * 1024;

/// A copy through a buffer, for spaces with no direct copy between them:
/// the whole destination is checked writable first, then the bytes go
/// [`BOUNCE`] at a time (from the end when `same` says both are one space
/// and the destination starts inside the source, as `memmove` goes). A
/// copy of at most [`BOUNCE`] bytes reads its whole source before writing:
/// a fault anywhere writes nothing.
fn bounce_copy<A: DmaSpace, B: DmaSpace>(
    from: &A,
    src: u64,
    to: &B,
    dst: u64,
    len: usize,
    same: bool,
) -> Result<(), CopyError> {
    to.check_write(dst, len).map_err(CopyError::of(Side::Destination))?;
    let backward = same && dst > src && dst - src < len as u64;
    let mut buf = vec![0u8; len.min(BOUNCE)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(BOUNCE);
        let at = if backward { len - done - n } else { done } as u64;
        from.read(src.wrapping_add(at), &mut buf[..n]).map_err(CopyError::of(Side::Source))?;
        to.write(dst.wrapping_add(at), &buf[..n]).map_err(CopyError::of(Side::Destination))?;
        done += n;
    }
    Ok(())
}

/// DMA through one route. Every access is checked against the function's
/// bus mastering first (it fails with [`Error::BusMasterOff`] while that
/// is off) and then translated by the IOMMU: a fault fails it with
/// [`Error::Fault`], reported to the core.
pub trait DmaSpace {
    /// Fills `buf` from `iova`. A read that faults part-way may have filled
    /// part of `buf`.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Error>;

    /// Writes `data` at `iova`: a write that would fault anywhere writes
    /// no byte (only the memory itself, a file that shrank or a client
    /// that does not serve its memory, can stop a write part-way).
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), Error>;

    /// Checks that `[iova, iova+len)` can be written, writing nothing
    /// (faults and page requests happen here, as for a write).
    fn check_write(&self, iova: u64, len: usize) -> Result<(), Error>;

    /// Reports an unrecoverable fault of this route to the core (a route
    /// whose vPASID has no pPASID is reported on the RID: the core never
    /// learns vPASIDs).
    fn report_fault(&self, iova: u64, write: bool, reason: FaultReason);

    /// Copies `len` bytes from `src` of this space to `dst` of `to` (the
    /// same space or another), with the guarantees of a read and a write:
    /// both ranges are checked (the source readable, the destination
    /// writable) before the first byte is written, so a copy that would
    /// fault on either side writes nothing; faults are reported as for a
    /// read or a write; overlapping ranges of one space copy as `memmove`
    /// does. The server's spaces copy straight between the memory objects;
    /// this default goes through a buffer (see `bounce_copy`), reading a
    /// source of at most 64 KiB whole before writing.
    fn copy_to(&self, src: u64, to: &Self, dst: u64, len: usize) -> Result<(), CopyError>
    where
        Self: Sized,
    {
        bounce_copy(self, src, to, dst, len, std::ptr::eq(self, to))
    }

    /// Reads a `T` at `iova`.
    fn read_obj<T: FromBytes + IntoBytes>(&self, iova: u64) -> Result<T, Error>
    where
        Self: Sized,
    {
        let mut v = T::new_zeroed();
        self.read(iova, v.as_mut_bytes())?;
        Ok(v)
    }

    /// Writes `v` at `iova`, as [`DmaSpace::write`].
    fn write_obj<T: IntoBytes + Immutable>(&self, iova: u64, v: &T) -> Result<(), Error>
    where
        Self: Sized,
    {
        self.write(iova, v.as_bytes())
    }
}

/// A device's DMA: the spaces its routes lead to.
pub trait DeviceDma {
    /// The space of one route.
    type Space<'a>: DmaSpace
    where
        Self: 'a;

    /// Resolves `route` now. A vPASID with no pPASID resolves to a space
    /// whose accesses fail with [`Error::NoPasid`]; a binding or vPASID
    /// map changed later is seen by the next resolution.
    fn space(&self, route: Route) -> Self::Space<'_>;

    /// Copies `len` bytes from `src` (IOVA `src_iova` of route `src`) to
    /// IOVA `dst_iova` of route `dst`, as [`DmaSpace::copy_to`].
    fn copy(&self, src: Route, src_iova: u64, dst: Route, dst_iova: u64, len: usize) -> Result<(), CopyError> {
        let (from, to) = (self.space(src), self.space(dst));
        if src == dst {
            from.copy_to(src_iova, &from, dst_iova, len)
        } else {
            from.copy_to(src_iova, &to, dst_iova, len)
        }
    }
}

/// Where a resolved route translates.
enum Target {
    /// Through the extension binding's unit: `(unit, device, pPASID)`.
    Bound(Arc<TranslationUnit>, u32, u32),
    /// The RID through the compat path, whichever is in place at each
    /// access (the watcher replaces it when the core comes back).
    Compat,
    /// A vPASID with no pPASID.
    Unrouted(u32),
}

/// A route of a [`Dma`], resolved.
pub struct RouteDma<'a> {
    dma: &'a Dma,
    target: Target,
    /// The translation handles of the [`QueueDma`] it was resolved
    /// through, if any.
    handles: Option<&'a Handles>,
}

/// The handles a [`QueueDma`] keeps: one per unit its routes reached
/// lately, at most two. A device's routes lead to one unit at a time (the
/// binding's or the compat path's), except while a control-socket binding
/// leaves the RID on the compat path: then RID and vPASID routes lead to
/// two, and a queue whose ring is RID DMA and whose data moves through
/// vPASIDs uses both for every descriptor. A route leading to a third
/// unit replaces the handle used less recently.
type Handles = RefCell<HandleCache>;

/// See [`Handles`].
#[derive(Default)]
struct HandleCache {
    slots: [Option<tu::Handle>; 2],
    /// The slot used last.
    last: usize,
}

impl HandleCache {
    /// The handle to `unit`, made in the slot used less recently (or an
    /// empty one) if none is held.
    fn to(&mut self, unit: &Arc<TranslationUnit>) -> &mut tu::Handle {
        let held = self.slots.iter().position(|s| s.as_ref().is_some_and(|h| Arc::ptr_eq(h.unit(), unit)));
        let i = match held {
            Some(i) => i,
            None => {
                let i = self.slots.iter().position(Option::is_none).unwrap_or(1 - self.last);
                self.slots[i] = None;
                i
            }
        };
        self.last = i;
        self.slots[i].get_or_insert_with(|| unit.handle())
    }

    fn held(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

/// One queue's (or thread's) view of a [`Dma`]: the same routes and the
/// same checks, with DMA through translation handles of its own
/// ([`tu::Handle`]: its own IOTLB and in-flight slot, no thread-local
/// lookup on an IOTLB hit). Not shared between threads: each DMA-issuing
/// queue thread makes its own, and drops it when it goes idle.
///
/// It keeps a unit that a binding change or a core restart replaced
/// alive only until its next access or poll: once the units the routes
/// may lead to change (a binding made or dropped, the RID of a
/// control-socket binding attached or detached, a compat path lost or
/// rebuilt) the next [`QueueDma::space`] or [`QueueDma::let_go_stale`]
/// lets its handles go, even if no route leads to a unit any more. No DMA goes through a
/// replaced unit meanwhile: an access resolves its route first.
pub struct QueueDma<'a> {
    dma: &'a Dma,
    handles: Handles,
    /// The value of [`Dma`]'s unit counter the handles were last checked
    /// against.
    units: Cell<u64>,
}

impl Dma {
    /// A view of this DMA for one queue thread (see [`QueueDma`]).
    pub fn queue(&self) -> QueueDma<'_> {
        QueueDma {
            dma: self,
            handles: RefCell::new(HandleCache::default()),
            units: Cell::new(self.units.load(Ordering::Acquire)),
        }
    }

    /// The units a route may lead to changed: queues let their handles
    /// go (see [`QueueDma`]). Called by whoever changed them, after the
    /// change.
    pub(super) fn units_changed(&self) {
        self.units.fetch_add(1, Ordering::AcqRel);
    }
}

impl QueueDma<'_> {
    /// The DMA it is a view of.
    pub fn dma(&self) -> &Dma {
        self.dma
    }

    /// Lets the handle go if the units a route may lead to changed since
    /// it was last checked (a queue that polls without DMA calls this
    /// between polls). One atomic load when they did not.
    pub fn let_go_stale(&self) {
        let now = self.dma.units.load(Ordering::Acquire);
        if now == self.units.get() {
            return;
        }
        // In use (an access of this queue runs): checked again next time.
        if let Ok(mut h) = self.handles.try_borrow_mut() {
            *h = HandleCache::default();
            self.units.set(now);
        }
    }

    /// Whether it holds a handle (to some unit).
    pub fn has_handle(&self) -> bool {
        self.handles() > 0
    }

    /// How many handles it holds (one per unit, at most two).
    pub fn handles(&self) -> usize {
        self.handles.try_borrow().map_or(1, |h| h.held())
    }
}

impl DeviceDma for QueueDma<'_> {
    type Space<'a>
        = RouteDma<'a>
    where
        Self: 'a;

    fn space(&self, route: Route) -> RouteDma<'_> {
        self.let_go_stale();
        RouteDma { dma: self.dma, target: self.dma.resolve(route), handles: Some(&self.handles) }
    }
}

/// The way an access reaches its unit: the unit itself (the thread's own
/// IOTLB) or a queue's handle to it.
enum Via<'h> {
    Unit(&'h TranslationUnit),
    Handle(&'h mut tu::Handle),
}

impl Via<'_> {
    fn unit(&self) -> &TranslationUnit {
        match self {
            Via::Unit(u) => u,
            Via::Handle(h) => h.unit(),
        }
    }

    fn read(self, dev: u32, pasid: u32, iova: u64, buf: &mut [u8]) -> tu::Result<()> {
        match self {
            Via::Unit(u) => u.read(dev, pasid, iova, buf),
            Via::Handle(h) => h.read(dev, pasid, iova, buf),
        }
    }

    fn write(self, dev: u32, pasid: u32, iova: u64, data: &[u8]) -> tu::Result<()> {
        match self {
            Via::Unit(u) => u.write(dev, pasid, iova, data),
            Via::Handle(h) => h.write(dev, pasid, iova, data),
        }
    }

    fn check(self, dev: u32, pasid: u32, iova: u64, len: usize, access: Perm) -> tu::Result<()> {
        match self {
            Via::Unit(u) => u.check(dev, pasid, iova, len, access),
            Via::Handle(h) => h.check(dev, pasid, iova, len, access),
        }
    }

    fn copy(self, src: At, dst: At, len: usize) -> Result<(), tu::CopyError> {
        match self {
            Via::Unit(u) => u.copy(src, dst, len),
            Via::Handle(h) => h.copy(src, dst, len),
        }
    }
}

/// Runs `f` through `handles`' handle to `unit` (made if it holds none
/// to it), or through the unit itself without handles (or if they are in
/// use: an access made while another of the same queue runs).
fn via<R>(unit: &Arc<TranslationUnit>, handles: Option<&Handles>, f: impl FnOnce(Via<'_>) -> R) -> R {
    let Some(mut h) = handles.and_then(|h| h.try_borrow_mut().ok()) else {
        return f(Via::Unit(unit));
    };
    f(Via::Handle(h.to(unit)))
}

impl Dma {
    fn resolve(&self, route: Route) -> Target {
        let g = sync::read(&self.bound);
        match (g.as_ref(), route) {
            // The orchestrator's binding leaves the RID on the compat IOAS
            // until it attaches the RID itself.
            (Some(b), Route::Rid) if b.rid.is_none() && b.owner == Owner::Control => Target::Compat,
            (Some(b), Route::Rid) => Target::Bound(b.tu.clone(), b.dev, 0),
            (Some(b), Route::Vpasid(v)) => match b.pasids.get(&v) {
                Some(&(p, _)) => Target::Bound(b.tu.clone(), b.dev, p),
                None => Target::Unrouted(v),
            },
            (None, Route::Vpasid(v)) => Target::Unrouted(v),
            (None, Route::Rid) => Target::Compat,
        }
    }

    /// Runs `f` with the unit, device id and pPASID of `target`. Through
    /// the compat path `f` runs under the read side of the compat lock:
    /// once the watcher has dropped a compat path, no DMA runs through it.
    /// With `handles` (a [`QueueDma`]'s), through its handle to the unit.
    fn through<T>(
        &self,
        target: &Target,
        handles: Option<&Handles>,
        f: impl FnOnce(Via<'_>, u32, u32) -> tu::Result<T>,
    ) -> Result<T, Error> {
        match target {
            Target::Bound(tu, dev, pasid) => via(tu, handles, |v| f(v, *dev, *pasid)).map_err(tu_err),
            Target::Unrouted(v) => Err(Error::NoPasid(*v)),
            Target::Compat => {
                let g = sync::read(&self.compat);
                let Some(c) = g.as_ref() else { return Err(self.core_gone()) };
                match via(&c.tu, handles, |v| f(v, c.dev, 0)) {
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
        }
    }

    fn master(&self) -> Result<(), Error> {
        if self.bus_master() {
            Ok(())
        } else {
            Err(Error::BusMasterOff)
        }
    }
}

impl DeviceDma for Dma {
    type Space<'a> = RouteDma<'a>;

    fn space(&self, route: Route) -> RouteDma<'_> {
        RouteDma { dma: self, target: self.resolve(route), handles: None }
    }
}

impl DmaSpace for RouteDma<'_> {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.dma.master()?;
        self.dma.through(&self.target, self.handles, |v, dev, pasid| v.read(dev, pasid, iova, buf))
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), Error> {
        self.dma.master()?;
        self.dma.through(&self.target, self.handles, |v, dev, pasid| v.write(dev, pasid, iova, data))
    }

    fn check_write(&self, iova: u64, len: usize) -> Result<(), Error> {
        self.dma.master()?;
        self.dma.through(&self.target, self.handles, |v, dev, pasid| v.check(dev, pasid, iova, len, Perm::W))
    }

    fn copy_to(&self, src: u64, to: &Self, dst: u64, len: usize) -> Result<(), CopyError> {
        self.dma.master().map_err(CopyError::of(Side::Source))?;
        let same = std::ptr::eq(self, to);
        let at = |dev, pasid, iova| At { dev, pasid, iova };
        match (&self.target, &to.target) {
            (Target::Bound(a, ad, ap), Target::Bound(b, bd, bp)) if Arc::ptr_eq(a, b) => {
                via(a, self.handles, |v| v.copy(at(*ad, *ap, src), at(*bd, *bp, dst), len))
                    .map_err(|e| CopyError { side: e.side, error: tu_err(e.error) })
            }
            (Target::Compat, Target::Compat) => {
                let mut side = Side::Source;
                self.dma
                    .through(&self.target, self.handles, |v, dev, pasid| {
                        v.copy(at(dev, pasid, src), at(dev, pasid, dst), len).map_err(|e| {
                            side = e.side;
                            e.error
                        })
                    })
                    .map_err(|error| CopyError { side, error })
            }
            (Target::Unrouted(v), _) => Err(CopyError { side: Side::Source, error: Error::NoPasid(*v) }),
            (_, Target::Unrouted(v)) => Err(CopyError { side: Side::Destination, error: Error::NoPasid(*v) }),
            // Two units (a binding replaced between two resolutions, the
            // compat path and a binding): through a buffer.
            _ => bounce_copy(self, src, to, dst, len, same),
        }
    }

    fn report_fault(&self, iova: u64, write: bool, reason: FaultReason) {
        let rid;
        let target = match &self.target {
            Target::Unrouted(_) => {
                rid = self.dma.resolve(Route::Rid);
                &rid
            }
            t => t,
        };
        let access = if write { Perm::W } else { Perm::R };
        let sent = self.dma.through(target, None, |v, dev, pasid| {
            let rec = FaultRecord { dev_id: dev, pasid, iova, access, reason, group: 0, last: true, cookie: 0 };
            v.unit().channel().report_fault(rec).map_err(tu::Error::Channel)
        });
        if let Err(e) = sent {
            tracing::debug!("fault report not delivered: {e}");
        }
    }
}
