//! The binding made through the ioasid extension: a session's device
//! channel, the RID's and vPASIDs' attachments with the vPASID map, and
//! the driver state observers see.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use iommu_core::device::{Channel, DriverStateProvider};
use iommu_core::sync;
use iommu_core::tu::{self, TranslationUnit};
use iommu_core::types::{DriverState, VpasidEntry};

use super::{chan_err, tu_err, Dma, Error};

/// How pPASIDs are chosen for vPASIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PasidPolicy {
    /// From the core's global pPASID allocator (shared work queues).
    #[default]
    Global,
    /// The device's own PASID space: pPASID = vPASID.
    PerRid,
}

/// Who made the extension binding, and so who may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The vfio-user client (IOASID_BIND on the vfio-user socket): the
    /// binding ends when the client leaves, and while it lacks a RID
    /// attachment the RID's DMA goes nowhere.
    Client,
    /// The orchestrator on the control socket: the binding outlives
    /// vfio-user clients and ends with the control connection, and while
    /// the orchestrator has not attached the RID, RID DMA stays on the
    /// compat IOAS built from the client's DMA_MAPs.
    Control,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Owner::Client => "the vfio-user client",
            Owner::Control => "the orchestrator on the control socket",
        })
    }
}

/// What observers see of the driver state: kept apart from the binding so
/// a query (answered on the channel's reader thread) never waits for a
/// lock held across a channel call.
#[derive(Default)]
pub(super) struct View {
    pub(super) server: String,
    pub(super) rid: Option<u32>,
    pub(super) vpasids: Vec<VpasidEntry>,
}

/// Answers for one channel: the compat one (the server's own session) or
/// the one a session bound the device through.
pub(super) struct ViewProvider {
    view: Arc<Mutex<View>>,
    compat: bool,
    /// The channel's translation unit, for its counters.
    pub(super) tu: std::sync::OnceLock<std::sync::Weak<TranslationUnit>>,
}

impl ViewProvider {
    pub(super) fn new(view: Arc<Mutex<View>>, compat: bool) -> Arc<ViewProvider> {
        Arc::new(ViewProvider { view, compat, tu: std::sync::OnceLock::new() })
    }

    fn counters(&self) -> Vec<String> {
        let Some(tu) = self.tu.get().and_then(|w| w.upgrade()) else { return Vec::new() };
        let s = tu.stats();
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        vec![
            format!("iotlb_hits {}", tu.iotlb_hits()),
            format!("iotlb_misses {}", tu.iotlb_misses()),
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

/// A binding made through the extension.
pub struct Bound {
    pub(super) tu: Arc<TranslationUnit>,
    pub(super) dev: u32,
    session: u64,
    pub(super) rid: Option<u32>,
    pub(super) owner: Owner,
    /// vPASID -> (pPASID, pt_id).
    pub(super) pasids: BTreeMap<u32, (u32, u32)>,
    /// A duplicate of the channel, watched for hang-up; `None` once it hung
    /// up while the core stayed (the session ended).
    watch: Option<Arc<OwnedFd>>,
    /// The pid of the core that made the channel.
    core_pid: Option<i32>,
}

impl Dma {
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

    /// Who made the extension binding, if the device is bound.
    pub fn binding_owner(&self) -> Option<Owner> {
        sync::read(&self.bound).as_ref().map(|b| b.owner)
    }

    /// Fails unless the binding exists and `by` made it.
    fn owned_by(b: Option<&Bound>, by: Owner) -> Result<(), Error> {
        match b {
            None => Err(Error::NotBound),
            Some(b) if b.owner != by => Err(Error::NotOwner(b.owner)),
            Some(_) => Ok(()),
        }
    }

    /// Extension: binds the device through a session's device channel, on
    /// behalf of `owner`.
    pub fn bind(&self, fd: OwnedFd, owner: Owner) -> Result<(u32, u64), Error> {
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
            owner,
            pasids: BTreeMap::new(),
            watch: Some(Arc::new(watch)),
            core_pid,
        });
        self.units_changed();
        self.publish(g.as_ref());
        drop(g);
        // The watcher follows the new channel.
        self.kick();
        Ok((dev, session))
    }

    /// Extension: drops the binding `by` made (the core frees the device,
    /// its attachments and pPASIDs when the channel closes).
    pub fn unbind(&self, by: Owner) -> Result<(), Error> {
        let mut g = sync::write(&self.bound);
        Self::owned_by(g.as_ref(), by)?;
        let b = g.take().ok_or(Error::NotBound)?;
        drop(g);
        self.units_changed();
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
    pub(super) fn binding_hung_up(&self, watch: &Arc<OwnedFd>, core_gone: bool) {
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
        self.units_changed();
        self.publish(None);
        drop(g);
        self.log_binding_dropped(&b);
    }

    /// Extension: attaches (or replaces) the RID or a vPASID to `pt_id`,
    /// for the binding's owner `by`. Returns the pPASID (0 for the RID).
    pub fn attach(&self, by: Owner, vpasid: Option<u32>, pt_id: u32, replace: bool) -> Result<u32, Error> {
        let r = self.attach_inner(by, vpasid, pt_id, replace);
        self.republish();
        r
    }

    fn republish(&self) {
        let g = sync::read(&self.bound);
        self.publish(g.as_ref());
    }

    fn attach_inner(&self, by: Owner, vpasid: Option<u32>, pt_id: u32, replace: bool) -> Result<u32, Error> {
        let mut g = sync::write(&self.bound);
        Self::owned_by(g.as_ref(), by)?;
        let b = g.as_mut().ok_or(Error::NotBound)?;
        let ch = b.tu.channel().clone();
        let Some(v) = vpasid else {
            if replace {
                ch.replace(b.dev, None, pt_id).map_err(chan_err)?;
            } else {
                ch.attach(b.dev, None, pt_id).map_err(chan_err)?;
            }
            b.rid = Some(pt_id);
            // A control-socket binding's RID leaves the compat path.
            self.units_changed();
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

    /// Extension: detaches the RID or a vPASID (a no-op if not attached),
    /// for the binding's owner `by`.
    pub fn detach(&self, by: Owner, vpasid: Option<u32>) -> Result<(), Error> {
        let r = self.detach_inner(by, vpasid);
        self.republish();
        r
    }

    fn detach_inner(&self, by: Owner, vpasid: Option<u32>) -> Result<(), Error> {
        let mut g = sync::write(&self.bound);
        Self::owned_by(g.as_ref(), by)?;
        let b = g.as_mut().ok_or(Error::NotBound)?;
        let ch = b.tu.channel().clone();
        match vpasid {
            None => {
                ch.detach(b.dev, None).map_err(chan_err)?;
                b.rid = None;
                // A control-socket binding's RID goes back to the compat path.
                self.units_changed();
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

    /// After a reconnect: a binding whose channel came from another core
    /// than the one now answering went away with that core.
    pub(super) fn check_binding_core(&self, core_pid: Option<i32>) {
        let stale = sync::read(&self.bound).as_ref().is_some_and(|b| b.core_pid != core_pid);
        if !stale {
            return;
        }
        let Some(b) = sync::write(&self.bound).take() else { return };
        self.units_changed();
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
    pub(super) fn bound_watch(&self) -> Option<Arc<OwnedFd>> {
        sync::read(&self.bound).as_ref().and_then(|b| b.watch.clone())
    }
}
