//! The ioasid extension end to end: a session hands the server a device
//! channel, the client attaches vPASIDs to the session's IOASes, the
//! device's tagged DMA lands in the right address space, the core sees
//! only pPASIDs and the server's list shows the vPASID map.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use common::*;
use iommu_core::pagetable::Perm;
use iommu_core::types::{MapArgs, VpasidEntry};
use vfio_user_server::client::Client;
use vfio_user_server::devices::testdev::regs;
use vfio_user_server::dma::PasidPolicy;
use vfio_user_server::proto::{self, ExtPasidEntry};

const IOVA: u64 = 0x1000_0000;

fn errno(r: Result<impl std::fmt::Debug, vfio_user_server::client::Error>) -> i32 {
    r.expect_err("the command should fail").errno().expect("an errno from the server")
}

struct Spaces {
    sess: iommu_core::client::Client,
    a: std::fs::File,
    b: std::fs::File,
    ioas_a: u32,
    ioas_b: u32,
}

/// Two IOASes mapping the same IOVA onto two different memfds.
fn spaces(s: &Stack) -> Spaces {
    let mut sess = s.session();
    let a = memfd("a", 1 << 20);
    let b = memfd("b", 1 << 20);
    let ma = sess.register_memory(a.as_fd()).unwrap().id;
    let mb = sess.register_memory(b.as_fd()).unwrap().id;
    let ioas_a = sess.ioas_alloc().unwrap();
    let ioas_b = sess.ioas_alloc().unwrap();
    for (ioas, mem) in [(ioas_a, ma), (ioas_b, mb)] {
        let args = MapArgs { ioas, mem, offset: 0, length: 1 << 20, iova: Some(IOVA), perm: Perm::RW };
        sess.map(args).unwrap();
    }
    a.write_all_at(b"from A", 0).unwrap();
    b.write_all_at(b"from B", 0).unwrap();
    Spaces { sess, a, b, ioas_a, ioas_b }
}

fn at(f: &std::fs::File, off: u64) -> [u8; 6] {
    let mut b = [0u8; 6];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

#[test]
fn two_vpasids_in_two_address_spaces() {
    let s = Stack::new("ext-two");
    let mut sp = spaces(&s);
    let (_, chan) = sp.sess.open_device_channel().unwrap();
    let mut c = s.client();
    let bound = c.ioasid_bind(chan.as_fd()).unwrap();
    assert_eq!(bound.session, sp.sess.session_id());
    assert_eq!(bound.pasid_width, 20);
    assert_eq!(errno(c.ioasid_bind(chan.as_fd())), libc::EBUSY);

    let p5 = c.ioasid_attach(Some(5), sp.ioas_a, false).unwrap();
    let p9 = c.ioasid_attach(Some(9), sp.ioas_b, false).unwrap();
    assert_eq!(c.ioasid_attach(None, sp.ioas_a, false).unwrap(), 0);
    assert_ne!(p5, p9);
    assert!(p5 != 0 && p9 != 0);

    // Each vPASID's DMA lands in its own address space only.
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x1000, 6, Some(5)), regs::STATUS_DONE);
    assert_eq!((&at(&sp.a, 0x1000), at(&sp.b, 0x1000)), (b"from A", [0; 6]));
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x2000, 6, Some(9)), regs::STATUS_DONE);
    assert_eq!((&at(&sp.b, 0x2000), at(&sp.a, 0x2000)), (b"from B", [0; 6]));
    // RID DMA goes to the RID's IOAS.
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x3000, 6, None), regs::STATUS_DONE);
    assert_eq!((&at(&sp.a, 0x3000), at(&sp.b, 0x3000)), (b"from A", [0; 6]));
    // A vPASID with no map: an error completion, nothing written anywhere.
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x4000, 6, Some(7)), regs::STATUS_ERROR);
    assert_eq!((at(&sp.a, 0x4000), at(&sp.b, 0x4000)), ([0; 6], [0; 6]));

    // The server's view: the vPASID map.
    let (rid, map) = c.ioasid_list().unwrap();
    assert_eq!(rid, sp.ioas_a);
    assert_eq!(
        map,
        vec![
            ExtPasidEntry { vpasid: 5, ppasid: p5, pt_id: sp.ioas_a, reserved: 0 },
            ExtPasidEntry { vpasid: 9, ppasid: p9, pt_id: sp.ioas_b, reserved: 0 },
        ]
    );
    // The core's view: the device with pPASIDs only.
    let snap = s.observer().status().unwrap();
    let sess = snap.sessions.iter().find(|x| x.id == sp.sess.session_id()).unwrap();
    let dev = sess.devices.iter().find(|d| d.id == bound.dev_id).unwrap();
    let pasids: BTreeSet<u32> = dev.attachments.iter().map(|a| a.pasid).collect();
    assert_eq!(pasids, BTreeSet::from([0, p5, p9]));
    let routed: BTreeSet<(u32, u32)> = dev.attachments.iter().map(|a| (a.pasid, a.pt_id)).collect();
    assert_eq!(routed, BTreeSet::from([(0, sp.ioas_a), (p5, sp.ioas_a), (p9, sp.ioas_b)]));
    assert_eq!(dev.ppasids.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from([p5, p9]));
    assert_eq!(dev.pci_address, "0000:00:04.0");
    // Observers read the vPASID map live from the server, through the core.
    let mut obs = s.observer();
    let st = obs.driver_state(sp.sess.session_id(), bound.dev_id).unwrap();
    let want = |v: &[(u32, u32, u32)]| -> Vec<VpasidEntry> {
        v.iter().map(|&(vpasid, ppasid, pt_id)| VpasidEntry { vpasid, ppasid, pt_id }).collect()
    };
    assert_eq!(st.vpasids, want(&[(5, p5, sp.ioas_a), (9, p9, sp.ioas_b)]));
    assert!(st.server.contains("vfio-user-server") && st.server.contains("dev.sock"), "{}", st.server);
    assert_eq!(st.lines[0], format!("rid_ioas {}", sp.ioas_a));
    // The translation unit's counters come along: the copies above missed
    // the IOTLB at least once.
    let misses = st.lines.iter().find_map(|l| l.strip_prefix("iotlb_misses ")).unwrap();
    assert!(misses.parse::<u64>().unwrap() > 0, "{:?}", st.lines);
    // Another session cannot ask about this session's device.
    let mut other = s.session();
    let e = other.driver_state(sp.sess.session_id(), bound.dev_id).unwrap_err();
    assert_eq!(e.errno().map(|e| e.code()), Some(libc::ENOENT));
    assert_eq!(obs.driver_state(sp.sess.session_id(), 999).unwrap_err().errno().map(|e| e.code()), Some(2));

    // Attach twice is EBUSY; replace moves vPASID 5 to B with the same pPASID.
    assert_eq!(errno(c.ioasid_attach(Some(5), sp.ioas_b, false)), libc::EBUSY);
    assert_eq!(errno(c.ioasid_attach(Some(6), sp.ioas_b, true)), libc::EINVAL);
    assert_eq!(c.ioasid_attach(Some(5), sp.ioas_b, true).unwrap(), p5);
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x5000, 6, Some(5)), regs::STATUS_DONE);
    assert_eq!((&at(&sp.b, 0x5000), at(&sp.a, 0x5000)), (b"from B", [0; 6]));
    // Out-of-range vPASIDs, an unknown IOAS.
    assert_eq!(errno(c.ioasid_attach(Some(0), sp.ioas_a, false)), libc::EINVAL);
    assert_eq!(errno(c.ioasid_attach(Some(1 << 20), sp.ioas_a, false)), libc::EINVAL);
    assert_eq!(errno(c.ioasid_attach(Some(11), 999, false)), libc::ENOENT);
    // Detach is a no-op when not attached; a detached vPASID stops DMA and
    // its pPASID goes back to the core.
    c.ioasid_detach(Some(9)).unwrap();
    c.ioasid_detach(Some(9)).unwrap();
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x6000, 6, Some(9)), regs::STATUS_ERROR);
    let snap = s.observer().status().unwrap();
    let sess = snap.sessions.iter().find(|x| x.id == sp.sess.session_id()).unwrap();
    assert!(!sess.devices[0].ppasids.contains(&p9));
    let st = obs.driver_state(sp.sess.session_id(), bound.dev_id).unwrap();
    assert_eq!(st.vpasids, want(&[(5, p5, sp.ioas_b)]), "the map is read live");
    // The IOAS is busy while attached, as in iommufd.
    assert_eq!(sp.sess.destroy(sp.ioas_b).unwrap_err().errno().map(|e| e.code()), Some(libc::EBUSY));

    // Unbind: the device leaves the session; RID DMA is back on the compat IOAS.
    c.ioasid_unbind().unwrap();
    assert_eq!(errno(c.ioasid_list()), libc::ENODEV);
    assert_eq!(errno(c.ioasid_unbind()), libc::ENODEV);
    let snap = s.observer().status().unwrap();
    let sess = snap.sessions.iter().find(|x| x.id == sp.sess.session_id()).unwrap();
    assert!(sess.devices.is_empty());
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x7000, 6, None), regs::STATUS_ERROR);
    sp.sess.destroy(sp.ioas_b).unwrap();
}

#[test]
fn per_rid_policy_and_session_exit() {
    let s = Stack::with_policy("ext-rid", PasidPolicy::PerRid);
    let mut sp = spaces(&s);
    let (_, chan) = sp.sess.open_device_channel().unwrap();
    let mut c = s.client();
    c.ioasid_bind(chan.as_fd()).unwrap();
    assert_eq!(c.ioasid_attach(Some(0x42), sp.ioas_b, false).unwrap(), 0x42);
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x1000, 6, Some(0x42)), regs::STATUS_DONE);
    assert_eq!(&at(&sp.b, 0x1000), b"from B");
    // The session goes away: the core tears the device down; the server
    // keeps serving and its tagged DMA fails instead of reaching freed memory.
    drop(sp.sess);
    let t0 = std::time::Instant::now();
    loop {
        let st = copy(&mut c, IOVA, IOVA + 0x2000, 6, Some(0x42));
        if st == regs::STATUS_ERROR {
            break;
        }
        assert!(t0.elapsed().as_secs() < 20, "DMA still reaches a closed session's IOAS: status {st}");
    }
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
    // The server can be bound again to a new session.
    c.ioasid_unbind().unwrap();
    let mut sess2 = s.session();
    let (_, chan2) = sess2.open_device_channel().unwrap();
    c.ioasid_bind(chan2.as_fd()).unwrap();
}

#[test]
fn extension_needs_negotiation_and_ends_with_the_client() {
    let s = Stack::new("ext-neg");
    let mut c = Client::connect_with(&s.sock, 0, &serde_json::json!({"capabilities": {"max_msg_fds": 16}})).unwrap();
    let mut sess = s.session();
    let (_, chan) = sess.open_device_channel().unwrap();
    assert_eq!(errno(c.ioasid_bind(chan.as_fd())), libc::EOPNOTSUPP);
    drop(c);
    // An fd that is not a channel of this core is refused at once.
    let mut c = s.client();
    let (fake, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_eq!(errno(c.ioasid_bind(fake.as_fd())), libc::EINVAL);
    let m = memfd("x", 4096);
    assert_eq!(errno(c.ioasid_bind(m.as_fd())), libc::EINVAL);
    drop(c);
    // Bound by one client; when it disconnects the binding (its fd) goes.
    let mut c = s.client();
    let bound = c.ioasid_bind(chan.as_fd()).unwrap();
    let ioas = sess.ioas_alloc().unwrap();
    c.ioasid_attach(None, ioas, false).unwrap();
    let wrong = proto::ExtAttach { argsz: 24, flags: 0x10, vpasid: 0, pt_id: ioas, ppasid: 0, reserved: 0 };
    use zerocopy::IntoBytes;
    assert_eq!(errno(c.call(proto::cmd::EXT_ATTACH, wrong.as_bytes(), &[])), libc::EINVAL);
    assert_eq!(errno(c.call(proto::cmd::EXT_BIND, &[0; 24], &[])), libc::EINVAL);
    drop(c);
    let t0 = std::time::Instant::now();
    loop {
        let snap = s.observer().status().unwrap();
        let sess_info = snap.sessions.iter().find(|x| x.id == sess.session_id()).unwrap();
        if sess_info.devices.iter().all(|d| d.id != bound.dev_id) {
            break;
        }
        assert!(t0.elapsed().as_secs() < 5, "the departed client's binding stays");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    sess.destroy(ioas).unwrap();
}

#[test]
fn a_vpasid_attached_to_a_nested_ioas_walks_the_guest_stage1_table() {
    use iommu_core::pagetable::{PTE_LEAF, PTE_PRESENT, PTE_READ, PTE_WRITE};
    let s = Stack::new("ext-nested");
    let mut sp = spaces(&s);
    // A stage-1 table the guest keeps in A's memory (addresses are parent
    // IOVAs): root at IOVA+0x10000, mapping stage-1 IOVA 0x4000_0000 to
    // parent IOVA IOVA (A's first page), read-write.
    let put = |off: u64, v: u64| sp.a.write_all_at(&v.to_le_bytes(), off).unwrap();
    put(0x10000, (IOVA + 0x11000) | PTE_PRESENT);
    put(0x11000 + 8, (IOVA + 0x12000) | PTE_PRESENT);
    put(0x12000, (IOVA + 0x13000) | PTE_PRESENT);
    put(0x13000, IOVA | PTE_PRESENT | PTE_READ | PTE_WRITE | PTE_LEAF);
    let nested = sp.sess.nested_alloc(sp.ioas_a, IOVA + 0x10000).unwrap();
    let (_, chan) = sp.sess.open_device_channel().unwrap();
    let mut c = s.client();
    c.ioasid_bind(chan.as_fd()).unwrap();
    let p = c.ioasid_attach(Some(3), nested, false).unwrap();
    assert_eq!(copy(&mut c, 0x4000_0000, 0x4000_0800, 6, Some(3)), regs::STATUS_DONE);
    assert_eq!(&at(&sp.a, 0x800), b"from A");
    // Outside the stage-1 table: a fault, nothing written.
    assert_eq!(copy(&mut c, 0x4000_0000, 0x4000_1000, 6, Some(3)), regs::STATUS_ERROR);
    let (_, map) = c.ioasid_list().unwrap();
    assert_eq!(map, vec![ExtPasidEntry { vpasid: 3, ppasid: p, pt_id: nested, reserved: 0 }]);
    // The parent is busy while a child exists.
    assert_eq!(sp.sess.destroy(sp.ioas_a).unwrap_err().errno().map(|e| e.code()), Some(libc::EBUSY));
}
