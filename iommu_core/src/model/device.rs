//! Device channels and the devices bound through them: their PASID tables
//! and attachments (with iommufd's rules), the global pPASID space, and
//! fencing of a channel that stops answering.

use std::collections::{BTreeMap, BTreeSet};

use super::{err, Core, Effects, Error, Object, Result};
use crate::errno::Errno;
use crate::pagetable::{self, DirtyPool, PasidEntry};
use crate::types::*;

#[derive(Debug)]
pub(super) struct Device {
    pub(super) channel: u64,
    pub(super) name: String,
    pub(super) pci_address: String,
    pub(super) caps: DeviceCaps,
    pub(super) root: u64,
    /// PASID-table directory pages below the root.
    pub(super) pages: Vec<u64>,
    /// pPASID (0 = RID) -> IOAS or nested IOAS.
    pub(super) attach: BTreeMap<u32, u32>,
    pub(super) ppasids: Vec<u32>,
    pub(super) fenced: bool,
}

/// The global 20-bit pPASID space (0 is "no PASID").
#[derive(Debug)]
pub(super) struct PasidSpace {
    words: Vec<u64>,
    used: u32,
}

impl PasidSpace {
    pub(super) fn new() -> PasidSpace {
        let mut words = vec![0u64; (PASID_LIMIT / 64) as usize];
        words[0] = 1; // PASID 0 is the RID.
        PasidSpace { words, used: 0 }
    }

    fn alloc(&mut self) -> Option<u32> {
        let (w, word) = self.words.iter_mut().enumerate().find(|(_, w)| **w != u64::MAX)?;
        let bit = word.trailing_ones();
        *word |= 1 << bit;
        self.used += 1;
        Some(w as u32 * 64 + bit)
    }

    pub(super) fn free(&mut self, pasid: u32) {
        let (w, b) = ((pasid / 64) as usize, pasid % 64);
        if pasid != 0 && w < self.words.len() && self.words[w] & (1 << b) != 0 {
            self.words[w] &= !(1 << b);
            self.used -= 1;
        }
    }
}

impl Core {
    /// Allocates a pPASID from the global space for the session.
    pub fn ppasid_alloc(&mut self, sid: u64) -> Result<u32> {
        let cap = self.limits.max_ppasids_per_session;
        let s = self.session(sid)?;
        let held = s.ppasids.len()
            + s.objects.values().map(|o| if let Object::Device(d) = o { d.ppasids.len() } else { 0 }).sum::<usize>();
        if held as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the session holds {cap} pPASIDs, the configured limit"));
        }
        self.step()?;
        let p = self
            .pasids
            .alloc()
            .ok_or_else(|| Error { errno: Errno::ENOSPC, message: "the 20-bit pPASID space is exhausted".into() })?;
        self.pasid_owner.insert(p, sid);
        self.session(sid)?.ppasids.push(p);
        Ok(p)
    }

    /// Frees a pPASID the session holds.
    pub fn ppasid_free(&mut self, sid: u64, pasid: u32) -> Result<()> {
        if pasid == 0 || pasid >= PASID_LIMIT {
            return err(Errno::EINVAL, format!("{pasid:#x} is not a pPASID (1..{PASID_LIMIT:#x})"));
        }
        let s = self.session(sid)?;
        let Some(pos) = s.ppasids.iter().position(|p| *p == pasid) else {
            return err(Errno::ENOENT, format!("pPASID {pasid:#x} is not held by this session"));
        };
        s.ppasids.swap_remove(pos);
        self.pasids.free(pasid);
        self.pasid_owner.remove(&pasid);
        Ok(())
    }

    /// pPASIDs in use in the whole core.
    pub fn ppasids_in_use(&self) -> u32 {
        self.pasids.used
    }

    /// The PASID entry a device gets for an attachment to `pt_id`.
    fn entry_for(&mut self, sid: u64, caps: DeviceCaps, pt_id: u32) -> Result<PasidEntry> {
        let (parent, s1_root, nested) = match self.object(sid, pt_id)? {
            Object::Ioas(_) => (pt_id, 0, false),
            Object::Nested(n) => (n.parent, n.s1_root, true),
            o => return err(Errno::ENOENT, format!("object {pt_id} is a {}, not an IOAS", o.kind())),
        };
        let p = self.ioas(sid, parent)?;
        let mut flags = 0;
        if nested {
            flags |= pagetable::PASID_NESTED;
        }
        if p.dirty {
            flags |= pagetable::PASID_DIRTY;
        }
        if p.iopf && caps.pri {
            flags |= pagetable::PASID_IOPF;
        }
        Ok(PasidEntry { flags, s2_root: p.root, s1_root })
    }

    /// Rewrites the PASID entries of `users` after an IOAS setting changed;
    /// their channels are told in `fx`.
    pub(super) fn rewrite_entries(&mut self, sid: u64, users: &[(u32, u32)], fx: &mut Effects) -> Result<()> {
        for &(dev, pasid) in users {
            let (root, caps, pt) = match self.object(sid, dev)? {
                Object::Device(d) => (d.root, d.caps, d.attach.get(&pasid).copied()),
                _ => continue,
            };
            let Some(pt) = pt else { continue };
            let e = self.entry_for(sid, caps, pt)?;
            let mut pages = Vec::new();
            self.pool_mut(sid)?.pasid_set(root, pasid, e, &mut pages)?;
            debug_assert!(pages.is_empty(), "an attached PASID already has its directory pages");
        }
        self.queue_invalidations(sid, users.to_vec(), None, fx);
        Ok(())
    }

    /// Opens a device channel for a session; returns its id.
    pub fn open_channel(&mut self, sid: u64) -> Result<u64> {
        self.session(sid)?;
        let cap = self.limits.max_channels_per_session;
        if self.channels_of(sid).len() as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the session has {cap} device channels, the configured limit"));
        }
        self.step()?;
        let c = self.next_channel;
        self.next_channel += 1;
        self.channels.insert(c, sid);
        Ok(c)
    }

    /// The dirty pool of the session a channel speaks for.
    pub fn channel_dirty_pool(&self, chan: u64) -> Option<&DirtyPool> {
        self.sessions.get(self.channels.get(&chan)?).map(|s| &s.dirty)
    }

    /// The session a channel speaks for.
    pub fn channel_session(&self, chan: u64) -> Option<u64> {
        self.channels.get(&chan).copied()
    }

    /// Channels of a session.
    pub fn channels_of(&self, sid: u64) -> Vec<u64> {
        self.channels.iter().filter(|(_, s)| **s == sid).map(|(c, _)| *c).collect()
    }

    pub(super) fn chan_session(&self, chan: u64) -> Result<u64> {
        self.channels
            .get(&chan)
            .copied()
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: "the channel is closed".into() })
    }

    /// The channel device `dev` of session `sid` was bound through.
    pub fn device_channel(&self, sid: u64, dev: u32) -> Result<u64> {
        let s = self
            .sessions
            .get(&sid)
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no session {sid}") })?;
        match s.objects.get(&dev) {
            Some(Object::Device(d)) => Ok(d.channel),
            _ => err(Errno::ENOENT, format!("no device {dev} in session {sid}")),
        }
    }

    pub(super) fn device(&mut self, chan: u64, dev: u32) -> Result<(u64, &mut Device)> {
        let sid = self.chan_session(chan)?;
        match self.object(sid, dev)? {
            Object::Device(d) if d.channel == chan => Ok((sid, d)),
            _ => err(Errno::ENOENT, format!("no device {dev} on this channel")),
        }
    }

    /// Binds a device through a channel.
    pub fn bind_device(&mut self, chan: u64, a: BindArgs) -> Result<BoundDevice> {
        let sid = self.chan_session(chan)?;
        if a.caps.pasid_width > 20 {
            return err(Errno::EINVAL, format!("PASID width {} is over 20 bits", a.caps.pasid_width));
        }
        if a.name.len() > 64 || a.pci_address.len() > 32 {
            return err(Errno::EINVAL, "device name over 64 bytes or PCI address over 32 bytes");
        }
        let cap = self.limits.max_devices_per_session;
        let n = self.session(sid)?.objects.values().filter(|o| matches!(o, Object::Device(_))).count();
        if n as u64 >= u64::from(cap) {
            return err(Errno::ENOSPC, format!("the session has {cap} devices bound, the configured limit"));
        }
        let id = self.new_id(sid)?;
        let root = self.pool_mut(sid)?.alloc_table()?;
        let d = Device {
            channel: chan,
            name: a.name,
            pci_address: a.pci_address,
            caps: a.caps,
            root,
            pages: Vec::new(),
            attach: BTreeMap::new(),
            ppasids: Vec::new(),
            fenced: false,
        };
        if let Err(e) = self.insert_object(sid, id, Object::Device(d)) {
            self.pool_mut(sid)?.free_table(root);
            return Err(e);
        }
        Ok(BoundDevice { dev_id: id, pasid_root: root })
    }

    /// Attaches (or with `replace`, re-attaches) a device's RID (`pasid`
    /// None) or a pPASID to an IOAS or nested IOAS, with iommufd's rules.
    /// A replaced attachment is invalidated; PASID-table pages of a failed
    /// attach go to `fx.garbage`.
    pub fn attach(
        &mut self,
        chan: u64,
        dev: u32,
        pasid: Option<u32>,
        pt_id: u32,
        replace: bool,
        fx: &mut Effects,
    ) -> Result<()> {
        let (sid, d) = self.device(chan, dev)?;
        let (caps, root) = (d.caps, d.root);
        let key = match pasid {
            None => 0,
            Some(_) if caps.pasid_width == 0 => {
                return err(Errno::EINVAL, format!("device {dev} has no PASID support"))
            }
            Some(p) if p == 0 || u64::from(p) >= 1u64 << caps.pasid_width => {
                return err(
                    Errno::EINVAL,
                    format!("PASID {p:#x} is outside the device's {}-bit range", caps.pasid_width),
                )
            }
            Some(p) => p,
        };
        let old = d.attach.get(&key).copied();
        match (old, replace) {
            (Some(_), false) => {
                return err(Errno::EBUSY, format!("PASID {key:#x} of device {dev} is attached; use replace"))
            }
            (None, true) => return err(Errno::EINVAL, format!("PASID {key:#x} of device {dev} is not attached")),
            _ => {}
        }
        // Refuses (ENOENT) anything that is not an IOAS or nested IOAS.
        let e = self.entry_for(sid, caps, pt_id)?;
        if e.flags & pagetable::PASID_DIRTY != 0 && !caps.dirty_tracking {
            return err(Errno::EINVAL, format!("IOAS {pt_id} tracks dirty pages and device {dev} cannot"));
        }
        self.step()?;
        let mut pages = Vec::new();
        if let Err(e) = self.pool_mut(sid)?.pasid_set(root, key, e, &mut pages) {
            // Directory pages linked and unlinked again: the device's walks
            // in flight may hold them, so they wait for its answer.
            if !pages.is_empty() {
                self.queue_invalidations(sid, vec![(dev, key)], None, fx);
            }
            fx.garbage.extend(pages.into_iter().map(|t| (sid, t)));
            return Err(e.into());
        }
        if let Some(o) = old {
            self.attached_set(sid, o).map(|s| s.remove(&(dev, key)));
        }
        self.attached_set(sid, pt_id).map(|s| s.insert((dev, key)));
        let (_, d) = self.device(chan, dev)?;
        d.attach.insert(key, pt_id);
        d.pages.extend(pages);
        if old.is_some() {
            self.queue_invalidations(sid, vec![(dev, key)], None, fx);
        }
        Ok(())
    }

    fn attached_set(&mut self, sid: u64, pt: u32) -> Option<&mut BTreeSet<(u32, u32)>> {
        match self.object(sid, pt).ok()? {
            Object::Ioas(i) => Some(&mut i.attached),
            Object::Nested(n) => Some(&mut n.attached),
            _ => None,
        }
    }

    /// Detaches a RID or pPASID (the device is told in `fx`); detaching
    /// what is not attached is a no-op.
    pub fn detach(&mut self, chan: u64, dev: u32, pasid: Option<u32>, fx: &mut Effects) -> Result<()> {
        let (sid, d) = self.device(chan, dev)?;
        let key = pasid.unwrap_or(0);
        let root = d.root;
        let Some(pt) = d.attach.remove(&key) else { return Ok(()) };
        self.pool_mut(sid)?.pasid_clear(root, key);
        self.attached_set(sid, pt).map(|s| s.remove(&(dev, key)));
        self.queue_invalidations(sid, vec![(dev, key)], None, fx);
        Ok(())
    }

    /// Allocates a global pPASID for a device (freed when it is unbound).
    pub fn device_ppasid_alloc(&mut self, chan: u64, dev: u32) -> Result<u32> {
        let (sid, _) = self.device(chan, dev)?;
        let p = self.ppasid_alloc(sid)?;
        // The device owns it now, not the session.
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.ppasids.retain(|x| *x != p);
        }
        let (_, d) = self.device(chan, dev)?;
        d.ppasids.push(p);
        Ok(p)
    }

    /// Frees a global pPASID of a device.
    pub fn device_ppasid_free(&mut self, chan: u64, dev: u32, pasid: u32) -> Result<()> {
        let (_, d) = self.device(chan, dev)?;
        let Some(pos) = d.ppasids.iter().position(|p| *p == pasid) else {
            return err(Errno::ENOENT, format!("pPASID {pasid:#x} is not held by device {dev}"));
        };
        d.ppasids.swap_remove(pos);
        self.pasids.free(pasid);
        self.pasid_owner.remove(&pasid);
        Ok(())
    }

    /// Unbinds a device: detaches everything, frees its pPASIDs, and hands
    /// its PASID table to `fx.garbage` (freed after the invalidations).
    pub fn unbind_device(&mut self, chan: u64, dev: u32, fx: &mut Effects) -> Result<()> {
        let (sid, d) = self.device(chan, dev)?;
        let keys: Vec<u32> = d.attach.keys().copied().collect();
        for k in keys {
            self.detach(chan, dev, Some(k).filter(|k| *k != 0), fx)?;
        }
        let Some(Object::Device(d)) = self.session(sid)?.objects.remove(&dev) else {
            return err(Errno::ENOENT, format!("no device {dev}"));
        };
        for p in d.ppasids {
            self.pasids.free(p);
            self.pasid_owner.remove(&p);
        }
        let pages = self.pool_mut(sid)?.pasid_table_pages(d.root);
        fx.garbage.extend(pages.into_iter().map(|t| (sid, t)));
        Ok(())
    }

    /// A channel went away: unbind its devices. Its peer cannot answer
    /// invalidations any more, so nothing waits on it: what `fx` holds for
    /// it is dropped.
    pub fn close_channel(&mut self, chan: u64, fx: &mut Effects) {
        let Some(sid) = self.channels.get(&chan).copied() else { return };
        let devs: Vec<u32> = self
            .sessions
            .get(&sid)
            .map(|s| {
                s.objects
                    .iter()
                    .filter(|(_, o)| matches!(o, Object::Device(d) if d.channel == chan))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for d in devs {
            if let Err(e) = self.unbind_device(chan, d, fx) {
                tracing::error!(chan, dev = d, error = %e, "cannot unbind a device of a closed channel");
            }
        }
        fx.invalidations.remove(&chan);
        fx.forget.remove(&chan);
        self.channels.remove(&chan);
    }

    /// Fences a channel that did not answer an invalidation: every PASID
    /// entry of its devices is cleared and the event is logged.
    pub fn fence_channel(&mut self, chan: u64) {
        let Some(sid) = self.channels.get(&chan).copied() else { return };
        let mut cleared = Vec::new();
        if let Some(s) = self.sessions.get_mut(&sid) {
            for (&id, o) in s.objects.iter_mut() {
                if let Object::Device(d) = o {
                    if d.channel == chan && !d.fenced {
                        d.fenced = true;
                        cleared.push((id, d.root, d.attach.keys().copied().collect::<Vec<u32>>()));
                    }
                }
            }
        }
        for (dev, root, keys) in cleared {
            if let Some(s) = self.sessions.get_mut(&sid) {
                for k in keys {
                    s.pool.pasid_clear(root, k);
                }
            }
            tracing::warn!(chan, dev, "device server did not answer an invalidation in time; fenced");
            let rec = FaultRecord {
                dev_id: dev,
                pasid: 0,
                iova: 0,
                access: Perm::default(),
                reason: FaultReason::Fenced,
                group: 0,
                last: true,
                cookie: 0,
            };
            let _ = self.report_fault(sid, rec, false);
        }
    }
}
