//! The connected client as the way to client memory, and the fences on
//! its DMA.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use iommu_core::sync;
use iommu_core::tu;

use super::Dma;

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
pub(super) struct ClientSlot(pub(super) Arc<RwLock<Option<Arc<dyn ClientDma>>>>);

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

impl Dma {
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
    pub(super) fn fence_if_client_memory(&self) -> Option<ClientFence> {
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
}
