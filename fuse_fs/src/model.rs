//! The tree the file system shows, built from one observer snapshot of the
//! core. Pure data: tested without mounting anything.
//!
//! Most files hold their text. The others are [`Live`]: their contents
//! are asked for when they are opened (the core's counters, an IOAS's
//! mappings and page table, what a device server says), and this module
//! only renders what was asked.
//!
//! Names: sessions by id; IOASes, memory objects and devices as
//! `<session>.<id>` (ids are per session); pPASIDs in hex (`0x1f`); ids in
//! decimal. One value per file where the value is single, one line per
//! item where it is a list. Symlinks join related objects both ways.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use iommu_core::types::{Counters, DriverState, IoasKind, MappingInfo, Snapshot};

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir(BTreeMap<String, Node>),
    /// A file and its contents.
    File(String),
    /// A file whose contents are asked for when it is opened.
    Live(Live),
    /// A symlink and its (relative) target.
    Link(String),
}

/// What a [`Node::Live`] file shows, and whom to ask for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Live {
    /// The top-level `stats`: the core's counters ([`stats_text`]).
    Stats,
    /// An IOAS's `mappings`, read in pieces ([`mapping_lines`]).
    /// `changes` is the IOAS's change count in the snapshot the tree was
    /// built from (the mappings are the same while it is).
    Mappings {
        /// Session.
        sid: u64,
        /// IOAS.
        ioas: u32,
        /// Change count.
        changes: u64,
    },
    /// A paging IOAS's `page_table` ([`page_table_text`]).
    PageTable {
        /// Session.
        sid: u64,
        /// IOAS.
        ioas: u32,
    },
    /// A device file made from its server's driver state
    /// ([`driver_text`]).
    Driver {
        /// Session.
        sid: u64,
        /// Device.
        dev: u32,
        /// Which file.
        file: DriverFile,
    },
}

/// The files made from a device server's driver state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriverFile {
    /// `server`.
    Server,
    /// `vpasid_map`.
    VpasidMap,
    /// `iotlb`.
    Iotlb,
    /// `dma_faults`.
    DmaFaults,
    /// `pasid/<ppasid>/vpasid`.
    Vpasid(u32),
}

impl Node {
    fn dir() -> Node {
        Node::Dir(BTreeMap::new())
    }

    /// Follows `path` (components without `/`) from this node, not
    /// following symlinks.
    pub fn get(&self, path: &str) -> Option<&Node> {
        let mut n = self;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            match n {
                Node::Dir(m) => n = m.get(c)?,
                _ => return None,
            }
        }
        Some(n)
    }

    /// Every path below this node (depth first, sorted), with its node.
    pub fn walk(&self) -> Vec<(String, &Node)> {
        let mut out = Vec::new();
        fn go<'a>(n: &'a Node, at: &str, out: &mut Vec<(String, &'a Node)>) {
            if let Node::Dir(m) = n {
                for (k, v) in m {
                    let p = if at.is_empty() { k.clone() } else { format!("{at}/{k}") };
                    out.push((p.clone(), v));
                    go(v, &p, out);
                }
            }
        }
        go(self, "", &mut out);
        out
    }

    fn put(&mut self, path: &str, node: Node) {
        let mut parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let Some(last) = parts.pop() else { return };
        let mut n = self;
        for c in parts {
            let Node::Dir(m) = n else { return };
            n = m.entry(c.to_string()).or_insert_with(Node::dir);
        }
        if let Node::Dir(m) = n {
            m.insert(last.to_string(), node);
        }
    }

    fn file(&mut self, path: &str, text: impl Into<String>) {
        self.put(path, Node::File(file_text(text.into())));
    }

    fn link(&mut self, path: &str, target: impl Into<String>) {
        self.put(path, Node::Link(target.into()));
    }

    fn live(&mut self, path: &str, live: Live) {
        self.put(path, Node::Live(live));
    }
}

/// File contents as the tree holds them: a non-empty text ends with a
/// newline.
pub fn file_text(mut t: String) -> String {
    if !t.is_empty() && !t.ends_with('\n') {
        t.push('\n');
    }
    t
}

/// What a device server said about a device, or why it said nothing.
pub type Driver = Result<DriverState, String>;

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// The text of a device file made from what its server said (`None`:
/// the server was not asked). A server that did not answer: `server`
/// says why, the others are empty (`vpasid`: `none`).
pub fn driver_text(sid: u64, drv: Option<&Driver>, file: DriverFile) -> String {
    let st = match drv {
        Some(Ok(st)) => st,
        Some(Err(e)) => {
            return file_text(match file {
                DriverFile::Server => format!("unavailable: {e}"),
                DriverFile::Vpasid(_) => "none".into(),
                _ => String::new(),
            })
        }
        None => {
            return file_text(match file {
                DriverFile::Server => "not asked".into(),
                DriverFile::Vpasid(_) => "none".into(),
                _ => String::new(),
            })
        }
    };
    let mut out = String::new();
    match file {
        DriverFile::Server => {
            out.push_str(&st.server);
            for l in &st.lines {
                if !l.starts_with("iotlb_") && !l.starts_with("fault_") {
                    out.push('\n');
                    out.push_str(l);
                }
            }
        }
        DriverFile::VpasidMap => {
            for e in &st.vpasids {
                let _ = writeln!(out, "{} {} {sid}.{}", hex(e.vpasid.into()), hex(e.ppasid.into()), e.pt_id);
            }
        }
        // Counters of the server's translation unit.
        DriverFile::Iotlb | DriverFile::DmaFaults => {
            let prefix = if file == DriverFile::Iotlb { "iotlb_" } else { "fault_" };
            for l in &st.lines {
                if let Some(c) = l.strip_prefix(prefix) {
                    let _ = writeln!(out, "{c}");
                }
            }
        }
        DriverFile::Vpasid(ppasid) => {
            out = st.vpasids.iter().find(|e| e.ppasid == ppasid).map_or("none".into(), |e| hex(e.vpasid.into()));
        }
    }
    file_text(out)
}

/// The top-level `stats` file.
pub fn stats_text(c: &Counters) -> String {
    format!(
        "sessions {}\nsessions_opened {}\nrequests {}\nerrors {}\nfaults {}\nppasids_in_use {}\n",
        c.sessions, c.stats.sessions_opened, c.stats.requests, c.stats.errors, c.stats.faults, c.ppasids
    )
}

/// A page-table dump as the `page_table` file shows it.
pub fn page_table_text(lines: &[String]) -> String {
    file_text(lines.join("\n"))
}

/// Appends the lines of `mappings` (of session `sid`) to `out`, as the
/// `mappings` file shows them.
pub fn mapping_lines(sid: u64, mappings: &[MappingInfo], out: &mut String) {
    for m in mappings {
        let last = m.iova.saturating_add(m.length.saturating_sub(1));
        let _ = writeln!(
            out,
            "{:#x}-{:#x} {:#x} memory {sid}.{} offset {:#x} {}",
            m.iova, last, m.length, m.mem, m.offset, m.perm
        );
    }
}

/// Builds the tree. An IOAS whose mappings the snapshot lists whole
/// (`mappings_total` of them) gets its `mappings` as text, any other a
/// [`Live::Mappings`] (an overview lists none).
pub fn build(s: &Snapshot) -> Node {
    let mut root = Node::dir();
    for d in ["sessions", "ioas", "devices", "memory", "pasids"] {
        root.put(d, Node::dir());
    }
    root.live("stats", Live::Stats);
    root.file(
        "pool",
        format!("bytes {}\ntables_in_use {}\ncapacity {}", s.pool.bytes, s.pool.tables_in_use, s.pool.capacity),
    );
    let l = &s.limits;
    root.file(
        "limits",
        format!(
            "max_sessions {}\nmax_objects_per_session {}\nmax_mappings_per_ioas {}\nmax_ranges_per_ioas {}\n\
             max_ppasids_per_session {}\nmax_message_bytes {}\nmax_fds_per_message {}\nfault_queue_depth {}\n\
             table_pool_bytes {}\nmax_devices_per_session {}\nmax_channels_per_session {}\ninvalidate_timeout_ms {}",
            l.max_sessions,
            l.max_objects_per_session,
            l.max_mappings_per_ioas,
            l.max_ranges_per_ioas,
            l.max_ppasids_per_session,
            l.max_message_bytes,
            l.max_fds_per_message,
            l.fault_queue_depth,
            l.table_pool_bytes,
            l.max_devices_per_session,
            l.max_channels_per_session,
            l.invalidate_timeout_ms
        ),
    );
    let mut faults = String::new();
    for f in &s.faults {
        let r = &f.record;
        let _ = writeln!(
            faults,
            "{} session {} device {} pasid {} iova {} {} {:?}",
            f.seq,
            f.session,
            r.dev_id,
            hex(r.pasid.into()),
            hex(r.iova),
            r.access,
            r.reason
        );
    }
    root.file("faults", faults);

    // pPASID -> (session, device) where a device holds it attached.
    let mut ppasid_dev: BTreeMap<u32, (u64, u32)> = BTreeMap::new();
    for ses in &s.sessions {
        let sid = ses.id;
        let sp = format!("sessions/{sid}");
        root.put(&sp, Node::dir());
        root.file(&format!("{sp}/pid"), ses.pid.to_string());
        root.file(&format!("{sp}/uid"), ses.uid.to_string());
        root.file(&format!("{sp}/objects"), ses.objects.to_string());
        root.file(&format!("{sp}/faults_queued"), ses.faults_queued.to_string());
        root.file(&format!("{sp}/faults_lost"), ses.faults_lost.to_string());
        let pp: Vec<String> = ses.ppasids.iter().map(|p| hex((*p).into())).collect();
        root.file(&format!("{sp}/ppasids"), pp.join("\n"));
        for d in ["ioas", "devices", "memory"] {
            root.put(&format!("{sp}/{d}"), Node::dir());
        }

        for m in &ses.memory {
            let mp = format!("memory/{sid}.{}", m.id);
            root.put(&mp, Node::dir());
            root.file(&format!("{mp}/size"), m.size.to_string());
            root.file(&format!("{mp}/seals"), m.seals.clone());
            root.file(&format!("{mp}/sealed"), u8::from(m.sealed).to_string());
            root.file(&format!("{mp}/system_address"), hex(m.system_address));
            root.file(&format!("{mp}/mappings"), m.mappings.to_string());
            match m.client_address {
                None => root.file(&format!("{mp}/backing"), "file".to_string()),
                Some(a) => {
                    root.file(&format!("{mp}/backing"), "client".to_string());
                    root.file(&format!("{mp}/client_address"), hex(a));
                }
            }
            root.link(&format!("{mp}/session"), format!("../../sessions/{sid}"));
            root.link(&format!("{sp}/memory/{}", m.id), format!("../../../memory/{sid}.{}", m.id));
        }

        for i in &ses.ioas {
            let ip = format!("ioas/{sid}.{}", i.id);
            root.put(&ip, Node::dir());
            root.put(&format!("{ip}/devices"), Node::dir());
            match i.kind {
                IoasKind::Paging => {
                    root.file(&format!("{ip}/kind"), "paging");
                    root.live(&format!("{ip}/page_table"), Live::PageTable { sid, ioas: i.id });
                }
                IoasKind::Nested { parent, s1_root } => {
                    root.file(&format!("{ip}/kind"), "nested");
                    root.link(&format!("{ip}/parent"), format!("../{sid}.{parent}"));
                    root.file(&format!("{ip}/s1_root"), hex(s1_root));
                }
            }
            let ranges: Vec<String> =
                i.iova_ranges.iter().map(|r| format!("{}-{}", hex(r.start), hex(r.last))).collect();
            root.file(&format!("{ip}/iova_ranges"), ranges.join("\n"));
            if i.mappings.len() as u64 == i.mappings_total {
                let mut maps = String::new();
                mapping_lines(sid, &i.mappings, &mut maps);
                root.file(&format!("{ip}/mappings"), maps);
            } else {
                let changes = i.stats.maps.wrapping_add(i.stats.unmaps);
                root.live(&format!("{ip}/mappings"), Live::Mappings { sid, ioas: i.id, changes });
            }
            root.file(&format!("{ip}/dirty_tracking"), u8::from(i.dirty_tracking).to_string());
            root.file(&format!("{ip}/root"), hex(i.root));
            root.file(
                &format!("{ip}/stats"),
                format!(
                    "maps {}\nunmaps {}\nmapped_bytes {}\ninvalidations {}\ntables {}\nchildren {}",
                    i.stats.maps, i.stats.unmaps, i.stats.mapped_bytes, i.stats.invalidations, i.tables, i.children
                ),
            );
            root.link(&format!("{ip}/session"), format!("../../sessions/{sid}"));
            root.link(&format!("{sp}/ioas/{}", i.id), format!("../../../ioas/{sid}.{}", i.id));
        }

        for d in &ses.devices {
            let dp = format!("devices/{sid}.{}", d.id);
            root.put(&dp, Node::dir());
            root.put(&format!("{dp}/pasid"), Node::dir());
            root.file(&format!("{dp}/name"), d.name.clone());
            root.file(&format!("{dp}/pci_address"), d.pci_address.clone());
            root.file(&format!("{dp}/channel"), d.channel.to_string());
            root.file(&format!("{dp}/pasid_width"), d.caps.pasid_width.to_string());
            let mut caps = Vec::new();
            if d.caps.pasid_width > 0 {
                caps.push("pasid");
            }
            if d.caps.pri {
                caps.push("pri");
            }
            if d.caps.dirty_tracking {
                caps.push("dirty_tracking");
            }
            root.file(&format!("{dp}/caps"), caps.join("\n"));
            root.file(&format!("{dp}/fenced"), u8::from(d.fenced).to_string());
            root.file(&format!("{dp}/pasid_table"), hex(d.pasid_root));
            let held: Vec<String> = d.ppasids.iter().map(|p| hex((*p).into())).collect();
            root.file(&format!("{dp}/ppasids"), held.join("\n"));
            root.link(&format!("{dp}/session"), format!("../../sessions/{sid}"));
            root.link(&format!("{sp}/devices/{}", d.id), format!("../../../devices/{sid}.{}", d.id));

            for a in &d.attachments {
                let target_ioas = format!("{sid}.{}", a.pt_id);
                if a.pasid == 0 {
                    root.link(&format!("{dp}/ioas"), format!("../../ioas/{target_ioas}"));
                    root.link(
                        &format!("ioas/{target_ioas}/devices/{}", d.id),
                        format!("../../../devices/{sid}.{}", d.id),
                    );
                } else {
                    let ph = hex(a.pasid.into());
                    let pp = format!("{dp}/pasid/{ph}");
                    root.put(&pp, Node::dir());
                    root.link(&format!("{pp}/ioas"), format!("../../../../ioas/{target_ioas}"));
                    let file = DriverFile::Vpasid(a.pasid);
                    root.live(&format!("{pp}/vpasid"), Live::Driver { sid, dev: d.id, file });
                    root.link(
                        &format!("ioas/{target_ioas}/devices/{}:{ph}", d.id),
                        format!("../../../devices/{sid}.{}/pasid/{ph}", d.id),
                    );
                    ppasid_dev.insert(a.pasid, (sid, d.id));
                }
            }
            for (name, file) in [
                ("server", DriverFile::Server),
                ("vpasid_map", DriverFile::VpasidMap),
                ("iotlb", DriverFile::Iotlb),
                ("dma_faults", DriverFile::DmaFaults),
            ] {
                root.live(&format!("{dp}/{name}"), Live::Driver { sid, dev: d.id, file });
            }
        }
    }
    for (p, owner) in &s.ppasids {
        let ph = hex((*p).into());
        match ppasid_dev.get(p) {
            Some((sid, dev)) => root.link(&format!("pasids/{ph}"), format!("../devices/{sid}.{dev}/pasid/{ph}")),
            None => root.link(&format!("pasids/{ph}"), format!("../sessions/{owner}")),
        }
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;
    use iommu_core::pagetable::Perm;
    use iommu_core::types::*;

    fn snapshot() -> Snapshot {
        let mapping = MappingInfo { iova: 0x1000_0000, length: 0x20_0000, mem: 1, offset: 0, perm: Perm::RW };
        let ioas = |id, kind, mappings: Vec<MappingInfo>| IoasInfo {
            id,
            kind,
            mappings_total: mappings.len() as u64,
            mappings,
            iova_ranges: vec![
                IovaRange { start: 0, last: 0xfedf_ffff },
                IovaRange { start: 0xfef0_0000, last: 0xffff_ffff_ffff },
            ],
            allowed: vec![],
            reserved: vec![],
            dirty_tracking: id == 2,
            root: 0x3000,
            tables: 3,
            children: 0,
            stats: IoasStats { maps: 1, unmaps: 0, mapped_bytes: 0x20_0000, invalidations: 0 },
            attached: vec![(4, 0)],
        };
        let dev = DeviceInfo {
            id: 4,
            name: "dma-engine".into(),
            pci_address: "0000:00:04.0".into(),
            caps: DeviceCaps { pasid_width: 20, pri: true, dirty_tracking: true },
            channel: 1,
            attachments: vec![AttachmentInfo { pasid: 0, pt_id: 2 }, AttachmentInfo { pasid: 0x1f, pt_id: 3 }],
            ppasids: vec![0x1f],
            fenced: false,
            pasid_root: 0x5000,
        };
        Snapshot {
            sessions: vec![SessionInfo {
                id: 7,
                pid: 42,
                uid: 0,
                objects: 4,
                memory: vec![
                    MemInfo {
                        id: 1,
                        size: 0x20_0000,
                        sealed: true,
                        seals: "shrink".into(),
                        system_address: 0x4000_0000,
                        mappings: 1,
                        client_address: None,
                    },
                    MemInfo {
                        id: 5,
                        size: 0x1000,
                        sealed: true,
                        seals: "none".into(),
                        system_address: 0x4020_0000,
                        mappings: 0,
                        client_address: Some(0xc_0000),
                    },
                ],
                ioas: vec![
                    ioas(2, IoasKind::Paging, vec![mapping]),
                    ioas(3, IoasKind::Nested { parent: 2, s1_root: 0x1000_1000 }, vec![]),
                ],
                ppasids: vec![0x20],
                faults_queued: 0,
                faults_lost: 0,
                devices: vec![dev],
            }],
            ppasids: vec![(0x1f, 7), (0x20, 7)],
            pool: PoolInfo { bytes: 1 << 30, tables_in_use: 9, capacity: 262_143 },
            faults: vec![FaultLogEntry {
                seq: 1,
                session: 7,
                record: FaultRecord {
                    dev_id: 4,
                    pasid: 0x1f,
                    iova: 0x5000,
                    access: Perm::W,
                    reason: FaultReason::NotPresent,
                    group: 0,
                    last: true,
                    cookie: 0,
                },
            }],
            stats: CoreStats { sessions_opened: 3, requests: 99, errors: 2, faults: 1 },
            limits: Limits::default(),
        }
    }

    /// A tree with what the file system would ask for its live files.
    struct Shown {
        tree: Node,
        snap: Snapshot,
        drivers: BTreeMap<(u64, u32), Driver>,
    }

    fn shown(snap: Snapshot, drivers: BTreeMap<(u64, u32), Driver>) -> Shown {
        Shown { tree: build(&snap), snap, drivers }
    }

    impl Shown {
        /// The contents of the file at `p`, live ones made as the file
        /// system makes them (a page table is the core's: empty here).
        fn file(&self, p: &str) -> String {
            match self.tree.get(p) {
                Some(Node::File(s)) => s.clone(),
                Some(Node::Live(Live::Stats)) => stats_text(&Counters {
                    sessions: self.snap.sessions.len() as u64,
                    ppasids: self.snap.ppasids.len() as u64,
                    stats: self.snap.stats,
                }),
                Some(Node::Live(Live::PageTable { .. })) => String::new(),
                Some(Node::Live(Live::Mappings { sid, ioas, changes })) => {
                    let s = self.snap.sessions.iter().find(|s| s.id == *sid).unwrap();
                    let i = s.ioas.iter().find(|i| i.id == *ioas).unwrap();
                    assert_eq!(*changes, i.stats.maps + i.stats.unmaps);
                    let mut out = String::new();
                    mapping_lines(*sid, &i.mappings, &mut out);
                    out
                }
                Some(Node::Live(Live::Driver { sid, dev, file })) => {
                    driver_text(*sid, self.drivers.get(&(*sid, *dev)), *file)
                }
                other => panic!("{p}: {other:?}"),
            }
        }
    }

    fn link<'a>(t: &'a Node, p: &str) -> &'a str {
        match t.get(p) {
            Some(Node::Link(s)) => s,
            other => panic!("{p}: {other:?}"),
        }
    }

    /// Resolves a relative symlink target against the link's directory.
    fn resolve(link_path: &str, target: &str) -> String {
        let mut parts: Vec<&str> = link_path.split('/').collect();
        parts.pop();
        for c in target.split('/') {
            match c {
                ".." => {
                    parts.pop();
                }
                "." | "" => {}
                c => parts.push(c),
            }
        }
        parts.join("/")
    }

    #[test]
    fn every_path_and_format() {
        let mut drivers = BTreeMap::new();
        drivers.insert(
            (7, 4),
            Ok(DriverState {
                server: "vfio-user-server pid 9".into(),
                vpasids: vec![VpasidEntry { vpasid: 5, ppasid: 0x1f, pt_id: 3 }],
                lines: vec![
                    "rid_ioas 2".into(),
                    "iotlb_hits 10".into(),
                    "iotlb_misses 2".into(),
                    "fault_faults 1".into(),
                ],
            }),
        );
        let t = shown(snapshot(), drivers);
        assert_eq!(t.file("sessions/7/pid"), "42\n");
        assert_eq!(t.file("sessions/7/ppasids"), "0x20\n");
        assert_eq!(t.file("memory/7.1/system_address"), "0x40000000\n");
        assert_eq!(t.file("memory/7.1/seals"), "shrink\n");
        assert_eq!(t.file("memory/7.1/backing"), "file\n");
        assert_eq!(t.file("memory/7.5/backing"), "client\n");
        assert_eq!(t.file("memory/7.5/client_address"), "0xc0000\n");
        assert_eq!(t.file("memory/7.5/seals"), "none\n");
        assert_eq!(t.file("ioas/7.2/kind"), "paging\n");
        assert_eq!(t.file("ioas/7.2/mappings"), "0x10000000-0x101fffff 0x200000 memory 7.1 offset 0x0 rw\n");
        assert_eq!(t.file("ioas/7.2/iova_ranges"), "0x0-0xfedfffff\n0xfef00000-0xffffffffffff\n");
        assert_eq!(t.file("ioas/7.2/dirty_tracking"), "1\n");
        assert!(t.file("ioas/7.2/stats").contains("mapped_bytes 2097152\n"));
        assert_eq!(t.file("ioas/7.3/kind"), "nested\n");
        assert_eq!(t.tree.get("ioas/7.2/page_table"), Some(&Node::Live(Live::PageTable { sid: 7, ioas: 2 })));
        assert!(t.tree.get("ioas/7.3/page_table").is_none(), "a nested IOAS's stage-1 table is the user's");
        assert_eq!(link(&t.tree, "ioas/7.3/parent"), "../7.2");
        assert_eq!(t.file("ioas/7.3/s1_root"), "0x10001000\n");
        assert_eq!(t.file("devices/7.4/pci_address"), "0000:00:04.0\n");
        assert_eq!(t.file("devices/7.4/caps"), "pasid\npri\ndirty_tracking\n");
        assert_eq!(t.file("devices/7.4/vpasid_map"), "0x5 0x1f 7.3\n");
        assert_eq!(t.file("devices/7.4/pasid/0x1f/vpasid"), "0x5\n");
        assert_eq!(t.file("devices/7.4/server"), "vfio-user-server pid 9\nrid_ioas 2\n");
        assert_eq!(t.file("devices/7.4/iotlb"), "hits 10\nmisses 2\n");
        assert_eq!(t.file("devices/7.4/dma_faults"), "faults 1\n");
        assert_eq!(t.file("faults"), "1 session 7 device 4 pasid 0x1f iova 0x5000 w NotPresent\n");
        assert!(t.file("stats").contains("ppasids_in_use 2\n"));
        assert!(t.file("limits").contains("max_sessions 1024\n"));
        // Symlinks resolve to directories that exist, both ways.
        for (p, n) in t.tree.walk() {
            if let Node::Link(target) = n {
                let r = resolve(&p, target);
                assert!(matches!(t.tree.get(&r), Some(Node::Dir(_))), "{p} -> {target} -> {r} is not a directory");
            }
        }
        assert_eq!(resolve("devices/7.4/ioas", link(&t.tree, "devices/7.4/ioas")), "ioas/7.2");
        assert_eq!(resolve("ioas/7.2/devices/4", link(&t.tree, "ioas/7.2/devices/4")), "devices/7.4");
        assert_eq!(
            resolve("ioas/7.3/devices/4:0x1f", link(&t.tree, "ioas/7.3/devices/4:0x1f")),
            "devices/7.4/pasid/0x1f"
        );
        assert_eq!(resolve("pasids/0x1f", link(&t.tree, "pasids/0x1f")), "devices/7.4/pasid/0x1f");
        assert_eq!(resolve("pasids/0x20", link(&t.tree, "pasids/0x20")), "sessions/7");
        assert_eq!(resolve("sessions/7/devices/4", link(&t.tree, "sessions/7/devices/4")), "devices/7.4");
    }

    #[test]
    fn the_tree_has_exactly_the_documented_paths() {
        let mut drivers = BTreeMap::new();
        let st = DriverState {
            server: "s".into(),
            vpasids: vec![VpasidEntry { vpasid: 5, ppasid: 0x1f, pt_id: 3 }],
            lines: vec!["iotlb_hits 1".into(), "fault_faults 0".into()],
        };
        drivers.insert((7, 4), Ok(st));
        let t = shown(snapshot(), drivers);
        let paths: Vec<String> = t.tree.walk().into_iter().map(|(p, _)| p).collect();
        let want = "devices devices/7.4 devices/7.4/caps devices/7.4/channel devices/7.4/dma_faults \
            devices/7.4/fenced devices/7.4/ioas devices/7.4/iotlb devices/7.4/name devices/7.4/pasid \
            devices/7.4/pasid/0x1f devices/7.4/pasid/0x1f/ioas devices/7.4/pasid/0x1f/vpasid \
            devices/7.4/pasid_table devices/7.4/pasid_width devices/7.4/pci_address devices/7.4/ppasids \
            devices/7.4/server devices/7.4/session devices/7.4/vpasid_map faults ioas ioas/7.2 \
            ioas/7.2/devices ioas/7.2/devices/4 ioas/7.2/dirty_tracking ioas/7.2/iova_ranges ioas/7.2/kind \
            ioas/7.2/mappings ioas/7.2/page_table ioas/7.2/root ioas/7.2/session ioas/7.2/stats ioas/7.3 \
            ioas/7.3/devices ioas/7.3/devices/4:0x1f ioas/7.3/dirty_tracking ioas/7.3/iova_ranges \
            ioas/7.3/kind ioas/7.3/mappings ioas/7.3/parent ioas/7.3/root ioas/7.3/s1_root ioas/7.3/session \
            ioas/7.3/stats limits memory memory/7.1 memory/7.1/backing memory/7.1/mappings memory/7.1/sealed \
            memory/7.1/seals memory/7.1/session memory/7.1/size memory/7.1/system_address memory/7.5 \
            memory/7.5/backing memory/7.5/client_address memory/7.5/mappings memory/7.5/sealed memory/7.5/seals \
            memory/7.5/session memory/7.5/size memory/7.5/system_address pasids pasids/0x1f pasids/0x20 pool \
            sessions sessions/7 sessions/7/devices sessions/7/devices/4 sessions/7/faults_lost \
            sessions/7/faults_queued sessions/7/ioas sessions/7/ioas/2 sessions/7/ioas/3 sessions/7/memory \
            sessions/7/memory/1 sessions/7/memory/5 sessions/7/objects sessions/7/pid sessions/7/ppasids sessions/7/uid stats";
        let want: Vec<String> = want.split_whitespace().map(String::from).collect();
        assert_eq!(paths, want);
    }

    #[test]
    fn a_server_that_did_not_answer_is_said_so() {
        let mut drivers = BTreeMap::new();
        drivers.insert((7, 4), Err("ETIMEDOUT: the device server did not answer in time".to_string()));
        let t = shown(snapshot(), drivers);
        assert!(t.file("devices/7.4/server").starts_with("unavailable: ETIMEDOUT"));
        assert_eq!(t.file("devices/7.4/vpasid_map"), "");
        assert_eq!(t.file("devices/7.4/pasid/0x1f/vpasid"), "none\n");
    }

    #[test]
    fn objects_that_vanish_leave_the_tree() {
        let mut s = snapshot();
        let t = build(&s);
        assert!(t.get("devices/7.4").is_some());
        s.sessions.clear();
        s.ppasids.clear();
        let t = build(&s);
        for d in ["sessions", "ioas", "devices", "memory", "pasids"] {
            assert_eq!(t.get(d), Some(&Node::Dir(BTreeMap::new())), "{d}");
        }
    }

    #[test]
    fn mappings_an_overview_does_not_list_are_live_and_driver_files_always_there() {
        let mut s = snapshot();
        let i = &mut s.sessions[0].ioas[0];
        i.mappings.clear();
        i.stats = IoasStats { maps: 5, unmaps: 4, ..i.stats };
        let t = shown(s.clone(), BTreeMap::new());
        assert_eq!(t.tree.get("ioas/7.2/mappings"), Some(&Node::Live(Live::Mappings { sid: 7, ioas: 2, changes: 9 })));
        // An IOAS with no mappings lists them whole: nothing to ask.
        assert_eq!(t.tree.get("ioas/7.3/mappings"), Some(&Node::File(String::new())));
        // A server not asked: every driver file is there, empty or saying so.
        assert_eq!(t.file("devices/7.4/server"), "not asked\n");
        assert_eq!(t.file("devices/7.4/iotlb"), "");
        assert_eq!(t.file("devices/7.4/dma_faults"), "");
        assert_eq!(t.file("devices/7.4/pasid/0x1f/vpasid"), "none\n");
        let mut out = String::new();
        let m = MappingInfo { iova: 0x1000, length: 0x1000, mem: 3, offset: 0x2000, perm: Perm::R };
        mapping_lines(7, &[m, m], &mut out);
        assert_eq!(out, "0x1000-0x1fff 0x1000 memory 7.3 offset 0x2000 r\n".repeat(2));
        let c = Counters {
            sessions: 2,
            ppasids: 1,
            stats: CoreStats { sessions_opened: 3, requests: 4, errors: 5, faults: 6 },
        };
        assert_eq!(stats_text(&c), "sessions 2\nsessions_opened 3\nrequests 4\nerrors 5\nfaults 6\nppasids_in_use 1\n");
    }
}
