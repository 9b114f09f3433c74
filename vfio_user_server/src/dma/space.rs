//! The DMA interface of devices: a device resolves a [`Route`] once into a
//! [`DmaSpace`] (the translation context: binding or compat path, device,
//! pPASID) and reads and writes through it, as vm-memory's `Bytes` reads
//! and writes guest memory. [`Dma`] is the server's [`DeviceDma`]; tests
//! and fuzz targets give devices memory of their own through the same two
//! traits.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use iommu_core::sync;
use iommu_core::tu::{self, TranslationUnit};
use iommu_core::types::{FaultReason, FaultRecord, Perm};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{channel_broken, tu_err, Dma, Error, Route};

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
