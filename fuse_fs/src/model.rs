//! The tree the file system shows, built from one observer snapshot of the
//! core and the driver state (vPASID maps) of each device, as its server
//! answered. Pure data: tested without mounting anything.
//!
//! Names: sessions by id; IOASes, memory objects and devices as
//! `<session>.<id>` (ids are per session); pPASIDs in hex (`0x1f`); ids in
//! decimal. One value per file where the value is single, one line per
//! item where it is a list. Symlinks join related objects both ways.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use iommu_core::types::{DriverState, IoasKind, Snapshot};

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir(BTreeMap<String, Node>),
    /// A file and its contents.
    File(String),
    /// A symlink and its (relative) target.
    Link(String),
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

/// The files of a device directory that come from its server's driver
/// state: `server`, `vpasid_map`, and (when it answered) `iotlb` and
/// `dma_faults`. Made again at each open of one of them.
pub fn driver_files(sid: u64, drv: Option<&Driver>) -> Vec<(&'static str, String)> {
    match drv {
        Some(Ok(st)) => {
            let mut m = String::new();
            for e in &st.vpasids {
                let _ = writeln!(m, "{} {} {sid}.{}", hex(e.vpasid.into()), hex(e.ppasid.into()), e.pt_id);
            }
            let mut srv = st.server.clone();
            let (mut iotlb, mut faults) = (String::new(), String::new());
            for l in &st.lines {
                // Counters of the server's translation unit.
                if let Some(c) = l.strip_prefix("iotlb_") {
                    let _ = writeln!(iotlb, "{c}");
                } else if let Some(c) = l.strip_prefix("fault_") {
                    let _ = writeln!(faults, "{c}");
                } else {
                    srv.push('\n');
                    srv.push_str(l);
                }
            }
            vec![("server", srv), ("vpasid_map", m), ("iotlb", iotlb), ("dma_faults", faults)]
        }
        Some(Err(e)) => vec![("server", format!("unavailable: {e}")), ("vpasid_map", String::new())],
        None => vec![("server", "not asked".to_string()), ("vpasid_map", String::new())],
    }
}

/// Builds the tree.
pub fn build(s: &Snapshot, drivers: &BTreeMap<(u64, u32), Driver>) -> Node {
    let mut root = Node::dir();
    for d in ["sessions", "ioas", "devices", "memory", "pasids"] {
        root.put(d, Node::dir());
    }
    root.file(
        "stats",
        format!(
            "sessions {}\nsessions_opened {}\nrequests {}\nerrors {}\nfaults {}\nppasids_in_use {}",
            s.sessions.len(),
            s.stats.sessions_opened,
            s.stats.requests,
            s.stats.errors,
            s.stats.faults,
            s.ppasids.len()
        ),
    );
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
                    // Made when opened, by the core (see `fs`).
                    root.put(&format!("{ip}/page_table"), Node::File(String::new()));
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
            let mut maps = String::new();
            for m in &i.mappings {
                let last = m.iova.saturating_add(m.length.saturating_sub(1));
                let _ = writeln!(
                    maps,
                    "{}-{} {} memory {sid}.{} offset {} {}",
                    hex(m.iova),
                    hex(last),
                    hex(m.length),
                    m.mem,
                    hex(m.offset),
                    m.perm
                );
            }
            root.file(&format!("{ip}/mappings"), maps);
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

            let drv = drivers.get(&(sid, d.id));
            let vp_of = |ppasid: u32| -> Option<u32> {
                drv.and_then(|r| r.as_ref().ok())
                    .and_then(|st| st.vpasids.iter().find(|e| e.ppasid == ppasid).map(|e| e.vpasid))
            };
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
                    root.file(&format!("{pp}/vpasid"), vp_of(a.pasid).map_or("none".into(), |v| hex(v.into())));
                    root.link(
                        &format!("ioas/{target_ioas}/devices/{}:{ph}", d.id),
                        format!("../../../devices/{sid}.{}/pasid/{ph}", d.id),
                    );
                    ppasid_dev.insert(a.pasid, (sid, d.id));
                }
            }
            for (name, text) in driver_files(sid, drv) {
                root.file(&format!("{dp}/{name}"), text);
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

    fn file<'a>(t: &'a Node, p: &str) -> &'a str {
        match t.get(p) {
            Some(Node::File(s)) => s,
            other => panic!("{p}: {other:?}"),
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
        let t = build(&snapshot(), &drivers);
        assert_eq!(file(&t, "sessions/7/pid"), "42\n");
        assert_eq!(file(&t, "sessions/7/ppasids"), "0x20\n");
        assert_eq!(file(&t, "memory/7.1/system_address"), "0x40000000\n");
        assert_eq!(file(&t, "memory/7.1/seals"), "shrink\n");
        assert_eq!(file(&t, "memory/7.1/backing"), "file\n");
        assert_eq!(file(&t, "memory/7.5/backing"), "client\n");
        assert_eq!(file(&t, "memory/7.5/client_address"), "0xc0000\n");
        assert_eq!(file(&t, "memory/7.5/seals"), "none\n");
        assert_eq!(file(&t, "ioas/7.2/kind"), "paging\n");
        assert_eq!(file(&t, "ioas/7.2/mappings"), "0x10000000-0x101fffff 0x200000 memory 7.1 offset 0x0 rw\n");
        assert_eq!(file(&t, "ioas/7.2/iova_ranges"), "0x0-0xfedfffff\n0xfef00000-0xffffffffffff\n");
        assert_eq!(file(&t, "ioas/7.2/dirty_tracking"), "1\n");
        assert!(file(&t, "ioas/7.2/stats").contains("mapped_bytes 2097152\n"));
        assert_eq!(file(&t, "ioas/7.3/kind"), "nested\n");
        assert_eq!(file(&t, "ioas/7.2/page_table"), "");
        assert!(t.get("ioas/7.3/page_table").is_none(), "a nested IOAS's stage-1 table is the user's");
        assert_eq!(link(&t, "ioas/7.3/parent"), "../7.2");
        assert_eq!(file(&t, "ioas/7.3/s1_root"), "0x10001000\n");
        assert_eq!(file(&t, "devices/7.4/pci_address"), "0000:00:04.0\n");
        assert_eq!(file(&t, "devices/7.4/caps"), "pasid\npri\ndirty_tracking\n");
        assert_eq!(file(&t, "devices/7.4/vpasid_map"), "0x5 0x1f 7.3\n");
        assert_eq!(file(&t, "devices/7.4/pasid/0x1f/vpasid"), "0x5\n");
        assert_eq!(file(&t, "devices/7.4/server"), "vfio-user-server pid 9\nrid_ioas 2\n");
        assert_eq!(file(&t, "devices/7.4/iotlb"), "hits 10\nmisses 2\n");
        assert_eq!(file(&t, "devices/7.4/dma_faults"), "faults 1\n");
        assert_eq!(file(&t, "faults"), "1 session 7 device 4 pasid 0x1f iova 0x5000 w NotPresent\n");
        assert!(file(&t, "stats").contains("ppasids_in_use 2\n"));
        assert!(file(&t, "limits").contains("max_sessions 1024\n"));
        // Symlinks resolve to directories that exist, both ways.
        for (p, n) in t.walk() {
            if let Node::Link(target) = n {
                let r = resolve(&p, target);
                assert!(matches!(t.get(&r), Some(Node::Dir(_))), "{p} -> {target} -> {r} is not a directory");
            }
        }
        assert_eq!(resolve("devices/7.4/ioas", link(&t, "devices/7.4/ioas")), "ioas/7.2");
        assert_eq!(resolve("ioas/7.2/devices/4", link(&t, "ioas/7.2/devices/4")), "devices/7.4");
        assert_eq!(resolve("ioas/7.3/devices/4:0x1f", link(&t, "ioas/7.3/devices/4:0x1f")), "devices/7.4/pasid/0x1f");
        assert_eq!(resolve("pasids/0x1f", link(&t, "pasids/0x1f")), "devices/7.4/pasid/0x1f");
        assert_eq!(resolve("pasids/0x20", link(&t, "pasids/0x20")), "sessions/7");
        assert_eq!(resolve("sessions/7/devices/4", link(&t, "sessions/7/devices/4")), "devices/7.4");
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
        let t = build(&snapshot(), &drivers);
        let paths: Vec<String> = t.walk().into_iter().map(|(p, _)| p).collect();
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
        let t = build(&snapshot(), &drivers);
        assert!(file(&t, "devices/7.4/server").starts_with("unavailable: ETIMEDOUT"));
        assert_eq!(file(&t, "devices/7.4/vpasid_map"), "");
        assert_eq!(file(&t, "devices/7.4/pasid/0x1f/vpasid"), "none\n");
    }

    #[test]
    fn objects_that_vanish_leave_the_tree() {
        let mut s = snapshot();
        let t = build(&s, &BTreeMap::new());
        assert!(t.get("devices/7.4").is_some());
        s.sessions.clear();
        s.ppasids.clear();
        let t = build(&s, &BTreeMap::new());
        for d in ["sessions", "ioas", "devices", "memory", "pasids"] {
            assert_eq!(t.get(d), Some(&Node::Dir(BTreeMap::new())), "{d}");
        }
    }
}
