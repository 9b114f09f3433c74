//! What observers see: a snapshot of every session (or of one) with its
//! objects, the pPASIDs, the table pool, the fault log and the counters, and
//! the mappings of an IOAS page by page.

use std::os::fd::AsFd;

use super::ioas::Area;
use super::memory::Backing;
use super::{err, Core, Error, Object, Result, Session};
use crate::errno::Errno;
use crate::memfd;
use crate::pagetable::PAGE_SIZE;
use crate::types::*;

fn mapping_info((&iova, a): (&u64, &Area)) -> MappingInfo {
    MappingInfo { iova, length: a.last - iova + 1, mem: a.mem, offset: a.offset(), perm: a.perm() }
}

impl Core {
    fn session_info(&self, sid: u64, s: &Session, inline: &mut usize) -> SessionInfo {
        let mut memory = Vec::new();
        let mut ioas = Vec::new();
        let mut devices = Vec::new();
        for (&id, o) in &s.objects {
            match o {
                Object::Memory(m) => memory.push(MemInfo {
                    id,
                    size: m.size,
                    sealed: m.sealed,
                    seals: match &m.backing {
                        Backing::File(f) => memfd::seal_names(memfd::seals(f.as_fd())),
                        Backing::Client { .. } => "none".into(),
                    },
                    system_address: m.sys_base,
                    mappings: m.refs,
                    client_address: match m.backing {
                        Backing::File(_) => None,
                        Backing::Client { address } => Some(address),
                    },
                }),
                Object::Ioas(i) => ioas.push(IoasInfo {
                    id,
                    kind: IoasKind::Paging,
                    mappings: {
                        let n = i.areas.len().min(*inline);
                        *inline -= n;
                        i.areas.iter().take(n).map(mapping_info).collect()
                    },
                    mappings_total: i.areas.len() as u64,
                    iova_ranges: i.iova_ranges(),
                    allowed: i.allowed.clone(),
                    reserved: i.reserved.clone(),
                    dirty_tracking: i.dirty,
                    root: i.root,
                    tables: s.pool.count_tables(i.root),
                    children: i.children,
                    attached: i.attached.iter().copied().collect(),
                    stats: i.stats,
                }),
                Object::Nested(n) => ioas.push(IoasInfo {
                    id,
                    kind: IoasKind::Nested { parent: n.parent, s1_root: n.s1_root },
                    mappings: Vec::new(),
                    mappings_total: 0,
                    iova_ranges: Vec::new(),
                    allowed: Vec::new(),
                    reserved: Vec::new(),
                    dirty_tracking: false,
                    root: 0,
                    tables: 0,
                    children: 0,
                    attached: n.attached.iter().copied().collect(),
                    stats: IoasStats { invalidations: n.invalidations, ..IoasStats::default() },
                }),
                Object::Device(d) => devices.push(DeviceInfo {
                    id,
                    name: d.name.clone(),
                    pci_address: d.pci_address.clone(),
                    caps: d.caps,
                    channel: d.channel,
                    attachments: d.attach.iter().map(|(&pasid, &pt_id)| AttachmentInfo { pasid, pt_id }).collect(),
                    ppasids: d.ppasids.clone(),
                    fenced: d.fenced,
                    pasid_root: d.root,
                }),
            }
        }
        SessionInfo {
            id: sid,
            pid: s.pid,
            uid: s.uid,
            objects: s.objects.len() as u32,
            memory,
            ioas,
            ppasids: s.ppasids.clone(),
            faults_queued: s.faults.len() as u32,
            faults_lost: s.faults_lost,
            devices,
        }
    }

    /// A snapshot of everything, or of one session only.
    pub fn snapshot(&self, only: Option<u64>) -> Snapshot {
        self.snapshot_limited(only, usize::MAX)
    }

    /// Up to `max` mappings of a paging IOAS of session `sid` (or of any
    /// session when `only` is `None`), starting at the first whose IOVA is
    /// `after` or above.
    pub fn mappings_page(
        &self,
        only: Option<u64>,
        sid: u64,
        ioas: u32,
        after: u64,
        max: usize,
    ) -> Result<Vec<MappingInfo>> {
        self.mappings_piece(only, sid, ioas, after, max).map(|p| p.mappings)
    }

    /// A piece of the mappings of a paging IOAS of session `sid` (or of
    /// any session when `only` is `None`): up to `max` from the first
    /// whose IOVA is `after` or above, with the IOAS's change count (its
    /// successful maps, copies and unmaps; a failed copy takes back what it
    /// counted) and how many it holds. The count grows with every change
    /// of the IOAS's mappings, so two pieces with the same count are of
    /// the same set; ids are never reused within a session, so a count
    /// names one IOAS's set for the core's lifetime.
    pub fn mappings_piece(
        &self,
        only: Option<u64>,
        sid: u64,
        ioas: u32,
        after: u64,
        max: usize,
    ) -> Result<MappingsPiece> {
        let s = self
            .sessions
            .get(&sid)
            .filter(|_| only.is_none_or(|o| o == sid))
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no session {sid}") })?;
        match s.objects.get(&ioas) {
            Some(Object::Ioas(i)) => Ok(MappingsPiece {
                changes: i.stats.maps.wrapping_add(i.stats.unmaps),
                total: i.areas.len() as u64,
                mappings: i.areas.range(after..).take(max).map(mapping_info).collect(),
            }),
            _ => err(Errno::ENOENT, format!("no paging IOAS {ioas} in session {sid}")),
        }
    }

    /// The counters a connection sees (a session: only its own sessions
    /// and pPASIDs counted).
    pub fn counters(&self, only: Option<u64>) -> Counters {
        Counters {
            sessions: self.sessions.keys().filter(|id| only.is_none_or(|o| o == **id)).count() as u64,
            ppasids: self.pasid_owner.values().filter(|s| only.is_none_or(|o| o == **s)).count() as u64,
            stats: self.stats,
        }
    }

    /// A snapshot that lists at most `inline` mappings in all, the first
    /// of each IOAS in session and IOAS order; `mappings_total` says how
    /// many each holds.
    pub fn snapshot_limited(&self, only: Option<u64>, mut inline: usize) -> Snapshot {
        let sessions = self
            .sessions
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o == **id))
            .map(|(id, s)| self.session_info(*id, s, &mut inline))
            .collect();
        Snapshot {
            sessions,
            ppasids: self
                .pasid_owner
                .iter()
                .filter(|(_, s)| only.is_none_or(|o| o == **s))
                .map(|(p, s)| (*p, *s))
                .collect(),
            pool: PoolInfo {
                bytes: (u64::from(self.budget.cap()) + 1) * PAGE_SIZE,
                tables_in_use: self.budget.used(),
                capacity: self.budget.cap(),
            },
            faults: self.fault_log.iter().filter(|f| only.is_none_or(|o| o == f.session)).cloned().collect(),
            stats: self.stats,
            limits: self.limits,
        }
    }
}
