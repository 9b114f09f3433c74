//! The DMA interface of devices: a device resolves a [`Route`] once into a
//! [`DmaSpace`] (the translation context: binding or compat path, device,
//! pPASID) and reads and writes through it, as vm-memory's `Bytes` reads
//! and writes guest memory. [`Dma`] is the server's [`DeviceDma`]; tests
//! and fuzz targets give devices memory of their own through the same two
//! traits.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use iommu_core::sync;
pub use iommu_core::tu::Side;
use iommu_core::tu::{self, At, TranslationUnit};
use iommu_core::types::{FaultReason, FaultRecord, Perm};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{channel_broken, tu_err, Dma, Error, Route};

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
}

impl Dma {
    fn resolve(&self, route: Route) -> Target {
        let g = sync::read(&self.bound);
        match (g.as_ref(), route) {
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
    fn through<T>(
        &self,
        target: &Target,
        f: impl FnOnce(&TranslationUnit, u32, u32) -> tu::Result<T>,
    ) -> Result<T, Error> {
        match target {
            Target::Bound(tu, dev, pasid) => f(tu, *dev, *pasid).map_err(tu_err),
            Target::Unrouted(v) => Err(Error::NoPasid(*v)),
            Target::Compat => {
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
        RouteDma { dma: self, target: self.resolve(route) }
    }
}

impl DmaSpace for RouteDma<'_> {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.dma.master()?;
        self.dma.through(&self.target, |tu, dev, pasid| tu.read(dev, pasid, iova, buf))
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), Error> {
        self.dma.master()?;
        self.dma.through(&self.target, |tu, dev, pasid| tu.write(dev, pasid, iova, data))
    }

    fn check_write(&self, iova: u64, len: usize) -> Result<(), Error> {
        self.dma.master()?;
        self.dma.through(&self.target, |tu, dev, pasid| tu.check(dev, pasid, iova, len, Perm::W))
    }

    fn copy_to(&self, src: u64, to: &Self, dst: u64, len: usize) -> Result<(), CopyError> {
        self.dma.master().map_err(CopyError::of(Side::Source))?;
        let same = std::ptr::eq(self, to);
        let at = |dev, pasid, iova| At { dev, pasid, iova };
        match (&self.target, &to.target) {
            (Target::Bound(a, ad, ap), Target::Bound(b, bd, bp)) if Arc::ptr_eq(a, b) => a
                .copy(at(*ad, *ap, src), at(*bd, *bp, dst), len)
                .map_err(|e| CopyError { side: e.side, error: tu_err(e.error) }),
            (Target::Compat, Target::Compat) => {
                let mut side = Side::Source;
                self.dma
                    .through(&self.target, |tu, dev, pasid| {
                        tu.copy(at(dev, pasid, src), at(dev, pasid, dst), len).map_err(|e| {
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
        let sent = self.dma.through(target, |tu, dev, pasid| {
            let rec = FaultRecord { dev_id: dev, pasid, iova, access, reason, group: 0, last: true, cookie: 0 };
            tu.channel().report_fault(rec).map_err(tu::Error::Channel)
        });
        if let Err(e) = sent {
            tracing::debug!("fault report not delivered: {e}");
        }
    }
}
