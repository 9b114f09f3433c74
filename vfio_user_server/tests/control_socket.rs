//! The control socket: an orchestrator binds the device to its session
//! and attaches vPASIDs while a vfio-user client drives the device; the
//! binding outlives the client's connections, the client cannot change
//! it, RID DMA stays on the client's compat IOAS until the orchestrator
//! attaches the RID, and the binding ends with the control connection.
//! Every test goes over real sockets.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use iommu_core::ctl::{self, Control};
use iommu_core::pagetable::Perm;
use iommu_core::types::MapArgs;
use vfio_user_server::devices::testdev::{regs, TestDevice};
use vfio_user_server::dma::{DeviceDma, DmaSpace, Owner, PasidPolicy, Route};
use vfio_user_server::proto::{self, cmd};
use vfio_user_server::server::{self, Options};

const IOVA: u64 = 0x1000_0000;
const RW: u32 = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;

/// A core and a test-device server with a control socket.
fn stack(name: &str) -> (Stack, PathBuf) {
    let (dir, core_path, core) = dir_with_core(name);
    let sock = dir.join("dev.sock");
    let control = dir.join("ctl.sock");
    let opts = Options {
        pasid_policy: PasidPolicy::Global,
        control: Some(control.clone()),
        ..Options::new(&sock, &core_path)
    };
    let server = server::spawn(Box::new(TestDevice::new().unwrap()), opts).unwrap();
    (Stack { dir, core: Some(core), server: Some(server), core_path, sock }, control)
}

struct Spaces {
    sess: iommu_core::client::Client,
    a: std::fs::File,
    b: std::fs::File,
    ioas_a: u32,
    ioas_b: u32,
}

/// The orchestrator's session: two IOASes mapping the same IOVA onto two
/// different memfds.
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

/// The client's guest RAM in the compat IOAS, at the same IOVA as the
/// orchestrator's spaces, starting with "guest!".
fn guest_ram(c: &mut vfio_user_server::client::Client) -> std::fs::File {
    let ram = memfd("ram", 1 << 20);
    ram.write_all_at(b"guest!", 0).unwrap();
    c.dma_map(RW, 0, IOVA, 1 << 20, Some(ram.as_fd())).unwrap();
    ram
}

fn client_errno<T: std::fmt::Debug>(r: Result<T, vfio_user_server::client::Error>) -> i32 {
    r.expect_err("the command should fail").errno().expect("an errno from the server")
}

fn ctl_errno<T: std::fmt::Debug>(r: Result<T, ctl::Error>) -> i32 {
    r.expect_err("the command should fail").errno().expect("an errno from the server")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what} did not happen");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn orchestrator_owns_the_binding_while_clients_come_and_go() {
    let (s, control) = stack("ctl-owner");
    let mut sp = spaces(&s);
    let mut c = s.client();
    let ram = guest_ram(&mut c);

    let mut o = Control::connect(&control).unwrap();
    // Nothing bound yet: the extension's errnos.
    assert_eq!(ctl_errno(o.list()), libc::ENODEV);
    assert_eq!(ctl_errno(o.attach(Some(5), sp.ioas_a, false)), libc::ENODEV);
    let (_, chan) = sp.sess.open_device_channel().unwrap();
    let bound = o.bind(chan.as_fd()).unwrap();
    assert_eq!(bound.session, sp.sess.session_id());
    assert_eq!(bound.pasid_width, 20);
    drop(chan);
    assert_eq!(s.server().dma().binding_owner(), Some(Owner::Control));
    let p5 = o.attach(Some(5), sp.ioas_a, false).unwrap();
    let p9 = o.attach(Some(9), sp.ioas_b, false).unwrap();
    assert!(p5 != 0 && p9 != 0 && p5 != p9);

    // The client's DMA tagged with the orchestrator's vPASIDs lands in the
    // orchestrator's spaces; RID DMA stays on the client's compat IOAS.
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x1000, 6, Some(5)), regs::STATUS_DONE);
    assert_eq!((&at(&sp.a, 0x1000), at(&sp.b, 0x1000)), (b"from A", [0; 6]));
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x2000, 6, Some(9)), regs::STATUS_DONE);
    assert_eq!((&at(&sp.b, 0x2000), at(&sp.a, 0x2000)), (b"from B", [0; 6]));
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x3000, 6, None), regs::STATUS_DONE);
    assert_eq!((&at(&ram, 0x3000), at(&sp.a, 0x3000)), (b"guest!", [0; 6]));
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x4000, 6, Some(7)), regs::STATUS_ERROR);
    // A queue alternating RID and vPASID DMA keeps a handle to each unit
    // (the compat path's and the binding's).
    {
        let dma = s.server().dma().clone();
        let q = dma.queue();
        let mut b = [0u8; 6];
        for _ in 0..3 {
            q.space(Route::Rid).read(IOVA, &mut b).unwrap();
            assert_eq!(&b, b"guest!");
            q.space(Route::Vpasid(5)).read(IOVA, &mut b).unwrap();
            assert_eq!(&b, b"from A");
        }
        assert_eq!(q.handles(), 2);
    }
    let map = o.list().unwrap();
    assert_eq!(map.rid, None);
    assert_eq!(
        map.entries,
        vec![
            ctl::PasidEntry { vpasid: 5, ppasid: p5, pt_id: sp.ioas_a },
            ctl::PasidEntry { vpasid: 9, ppasid: p9, pt_id: sp.ioas_b },
        ]
    );

    // A vPASID can go to a nested IOAS too.
    let nested = sp.sess.nested_alloc(sp.ioas_a, IOVA + 0x10_0000).unwrap();
    let p11 = o.attach(Some(11), nested, false).unwrap();
    assert!(o.list().unwrap().entries.contains(&ctl::PasidEntry { vpasid: 11, ppasid: p11, pt_id: nested }));
    o.detach(Some(11)).unwrap();
    assert_eq!(o.list().unwrap().entries.len(), 2);

    // The client's own extension commands cannot change the binding; it
    // may read the map.
    let (_, chan2) = sp.sess.open_device_channel().unwrap();
    assert_eq!(client_errno(c.ioasid_bind(chan2.as_fd())), libc::EBUSY);
    assert_eq!(client_errno(c.ioasid_attach(Some(6), sp.ioas_a, false)), libc::EPERM);
    assert_eq!(client_errno(c.ioasid_attach(Some(5), sp.ioas_b, true)), libc::EPERM);
    assert_eq!(client_errno(c.ioasid_attach(None, sp.ioas_a, false)), libc::EPERM);
    assert_eq!(client_errno(c.ioasid_detach(Some(5))), libc::EPERM);
    assert_eq!(client_errno(c.ioasid_unbind()), libc::EPERM);
    let (rid, list) = c.ioasid_list().unwrap();
    assert_eq!((rid, list.len()), (0, 2));
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x5000, 6, Some(5)), regs::STATUS_DONE);
    assert_eq!(at(&sp.a, 0x5000), *b"from A");

    // The client leaves and comes back: the binding stays.
    drop(c);
    let mut c = s.client();
    let _ram2 = guest_ram(&mut c);
    assert_eq!(s.server().dma().binding(), Some((sp.sess.session_id(), bound.dev_id)));
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x6000, 6, Some(9)), regs::STATUS_DONE);
    assert_eq!(at(&sp.b, 0x6000), *b"from B");
    assert_eq!(o.list().unwrap().entries.len(), 2);

    // The orchestrator attaches the RID: RID DMA goes to its IOAS; after a
    // detach, back to the client's compat IOAS.
    assert_eq!(o.attach(None, sp.ioas_b, false).unwrap(), 0);
    assert_eq!(o.list().unwrap().rid, Some(sp.ioas_b));
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x7000, 6, None), regs::STATUS_DONE);
    assert_eq!(at(&sp.b, 0x7000), *b"from B");
    o.detach(None).unwrap();
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x8000, 6, None), regs::STATUS_DONE);
    assert_eq!(at(&sp.b, 0x8000), [0; 6]);
    // Replace and detach of a vPASID; the detached vPASID's DMA fails.
    assert_eq!(o.attach(Some(5), sp.ioas_b, true).unwrap(), p5);
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x9000, 6, Some(5)), regs::STATUS_DONE);
    assert_eq!(at(&sp.b, 0x9000), *b"from B");
    o.detach(Some(5)).unwrap();
    assert_eq!(copy(&mut c, IOVA, IOVA + 0xa000, 6, Some(5)), regs::STATUS_ERROR);
    assert_eq!(at(&sp.b, 0xa000), [0; 6]);

    // The control connection ends: the binding goes (the core frees the
    // device), vPASID DMA fails, RID DMA keeps working on the compat IOAS.
    drop(o);
    wait_until("the binding to go", || s.server().dma().binding().is_none());
    assert_eq!(copy(&mut c, IOVA, IOVA + 0xb000, 6, Some(9)), regs::STATUS_ERROR);
    assert_eq!(at(&sp.b, 0xb000), [0; 6]);
    assert_eq!(copy(&mut c, IOVA, IOVA + 0xc000, 6, None), regs::STATUS_DONE);
    let snap = s.observer().status().unwrap();
    let sess = snap.sessions.iter().find(|x| x.id == sp.sess.session_id()).unwrap();
    assert!(sess.devices.iter().all(|d| d.id != bound.dev_id), "the core freed the device");
    // The client may bind now.
    let bound2 = c.ioasid_bind(chan2.as_fd()).unwrap();
    assert_eq!(s.server().dma().binding_owner(), Some(Owner::Client));
    assert_eq!(bound2.session, sp.sess.session_id());
}

#[test]
fn binding_without_a_vfio_user_client_and_a_second_orchestrator_refused() {
    let (s, control) = stack("ctl-alone");
    let mut sp = spaces(&s);
    // No vfio-user client yet.
    let mut o = Control::connect(&control).unwrap();
    let (_, chan) = sp.sess.open_device_channel().unwrap();
    o.bind(chan.as_fd()).unwrap();
    let p5 = o.attach(Some(5), sp.ioas_a, false).unwrap();
    // A second orchestrator is closed at once; the first keeps its socket.
    let mut o2 = Control::connect(&control).unwrap();
    assert!(matches!(o2.list(), Err(ctl::Error::Io(_))), "the second orchestrator is refused");
    assert_eq!(o.list().unwrap().entries, vec![ctl::PasidEntry { vpasid: 5, ppasid: p5, pt_id: sp.ioas_a }]);
    // Binding again is EBUSY, whoever asks.
    assert_eq!(ctl_errno(o.bind(chan.as_fd())), libc::EBUSY);
    // A client arriving later drives DMA through the binding.
    let mut c = s.client();
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x1000, 6, Some(5)), regs::STATUS_DONE);
    assert_eq!(at(&sp.a, 0x1000), *b"from A");
    // Once the first orchestrator has gone, another one is served (and
    // finds nothing bound: the binding went with the first).
    drop(o);
    wait_until("a new orchestrator to be served", || {
        Control::connect(&control).is_ok_and(|mut o3| o3.list().err().and_then(|e| e.errno()) == Some(libc::ENODEV))
    });
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x2000, 6, Some(5)), regs::STATUS_ERROR);
    // The orchestrator unbinds explicitly: the map goes at once.
    let mut o4 = Control::connect(&control).unwrap();
    let (_, chan3) = sp.sess.open_device_channel().unwrap();
    o4.bind(chan3.as_fd()).unwrap();
    o4.attach(Some(9), sp.ioas_b, false).unwrap();
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x3000, 6, Some(9)), regs::STATUS_DONE);
    o4.unbind().unwrap();
    assert_eq!(ctl_errno(o4.unbind()), libc::ENODEV);
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x4000, 6, Some(9)), regs::STATUS_ERROR);
    assert_eq!(at(&sp.b, 0x4000), [0; 6]);
}

#[test]
fn the_orchestrator_cannot_change_a_clients_binding() {
    let (s, control) = stack("ctl-client-owns");
    let mut sp = spaces(&s);
    let mut c = s.client();
    let (_, chan) = sp.sess.open_device_channel().unwrap();
    c.ioasid_bind(chan.as_fd()).unwrap();
    c.ioasid_attach(Some(5), sp.ioas_a, false).unwrap();
    let mut o = Control::connect(&control).unwrap();
    assert_eq!(ctl_errno(o.bind(chan.as_fd())), libc::EBUSY);
    assert_eq!(ctl_errno(o.attach(Some(6), sp.ioas_a, false)), libc::EPERM);
    assert_eq!(ctl_errno(o.detach(Some(5))), libc::EPERM);
    assert_eq!(ctl_errno(o.unbind()), libc::EPERM);
    assert_eq!(o.list().unwrap().entries.len(), 1);
    // The orchestrator leaving does not touch the client's binding (the
    // next orchestrator's command runs after the departure was handled).
    drop(o);
    wait_until("a new orchestrator to be served", || {
        Control::connect(&control).is_ok_and(|mut o2| o2.list().is_ok_and(|m| m.entries.len() == 1))
    });
    assert_eq!(s.server().dma().binding_owner(), Some(Owner::Client));
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x1000, 6, Some(5)), regs::STATUS_DONE);
    assert_eq!(at(&sp.a, 0x1000), *b"from A");
    // The client leaving drops its own binding, as before.
    drop(c);
    wait_until("the client's binding to go", || s.server().dma().binding().is_none());
}

/// Sends raw bytes with fds on a control connection.
fn send_raw(sock: &UnixStream, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
    let n = iommu_core::wire::send_with_fds(sock.as_fd(), bytes, fds).unwrap();
    assert_eq!(n, bytes.len());
}

fn header(id: u16, command: u16, payload: usize, flags: u32) -> Vec<u8> {
    let h = proto::Header { msg_id: id, command, msg_size: u32::try_from(16 + payload).unwrap(), flags, error: 0 };
    zerocopy::IntoBytes::as_bytes(&h).to_vec()
}

/// Reads one reply: (msg_id, command, flags, errno, payload).
fn read_reply(sock: &mut UnixStream) -> (u16, u16, u32, u32, Vec<u8>) {
    let mut h = [0u8; 16];
    sock.read_exact(&mut h).unwrap();
    let hdr: proto::Header = proto::read(&h).unwrap();
    let mut p = vec![0u8; hdr.msg_size as usize - 16];
    sock.read_exact(&mut p).unwrap();
    (hdr.msg_id, hdr.command, hdr.flags, hdr.error, p)
}

fn errno_of(sock: &mut UnixStream, id: u16) -> u32 {
    let (rid, _, flags, errno, _) = read_reply(sock);
    assert_eq!(rid, id);
    assert_ne!(flags & proto::flags::ERROR, 0, "an error reply");
    errno
}

#[test]
fn hostile_input_on_the_control_socket_gets_errnos() {
    let (s, control) = stack("ctl-hostile");
    let mut sp = spaces(&s);
    let mut sock = UnixStream::connect(&control).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let e = |x: i32| u32::try_from(x).unwrap();

    // Unknown commands, VERSION and the vfio-user commands: ENOSYS.
    for (id, command) in [(1u16, 0x1234u16), (2, cmd::VERSION), (3, cmd::DMA_MAP), (4, cmd::EXT_BASE + 0x10)] {
        sock.write_all(&header(id, command, 0, 0)).unwrap();
        assert_eq!(errno_of(&mut sock, id), e(libc::ENOSYS));
    }
    // Short payloads: EINVAL.
    for (id, command) in [(5u16, cmd::EXT_ATTACH), (6, cmd::EXT_DETACH), (7, cmd::EXT_LIST_PASIDS)] {
        let mut m = header(id, command, 4, 0);
        m.extend_from_slice(&24u32.to_ne_bytes());
        sock.write_all(&m).unwrap();
        assert_eq!(errno_of(&mut sock, id), e(libc::EINVAL));
    }
    // A bind with no fd, two fds, a memfd, a pipe, a socket that is not
    // the core's: EINVAL; fds on other commands: EINVAL.
    let bind = |id: u16| {
        let mut m = header(id, cmd::EXT_BIND, 24, 0);
        m.extend_from_slice(&[24, 0, 0, 0]);
        m.resize(16 + 24, 0);
        m
    };
    let mem = memfd("x", 4096);
    let (pr, pw) = nix::unistd::pipe().unwrap();
    let (sa, _sb) = UnixStream::pair().unwrap();
    let (_, chan) = sp.sess.open_device_channel().unwrap();
    sock.write_all(&bind(8)).unwrap();
    assert_eq!(errno_of(&mut sock, 8), e(libc::EINVAL));
    send_raw(&sock, &bind(9), &[chan.as_fd(), mem.as_fd()]);
    assert_eq!(errno_of(&mut sock, 9), e(libc::EINVAL));
    send_raw(&sock, &bind(10), &[mem.as_fd()]);
    assert_eq!(errno_of(&mut sock, 10), e(libc::EINVAL));
    send_raw(&sock, &bind(11), &[pr.as_fd()]);
    assert_eq!(errno_of(&mut sock, 11), e(libc::EINVAL));
    send_raw(&sock, &bind(12), &[sa.as_fd()]);
    assert_eq!(errno_of(&mut sock, 12), e(libc::EINVAL));
    let mut m = header(13, cmd::EXT_LIST_PASIDS, 16, 0);
    m.extend_from_slice(&[16, 0, 0, 0]);
    m.resize(16 + 16, 0);
    send_raw(&sock, &m, &[pw.as_fd()]);
    assert_eq!(errno_of(&mut sock, 13), e(libc::EINVAL));
    // More fds than a message may carry: EINVAL, none kept.
    let many: Vec<std::fs::File> = (0..20).map(|_| memfd("m", 4096)).collect();
    let many_fds: Vec<_> = many.iter().map(|f| f.as_fd()).collect();
    send_raw(&sock, &bind(14), &many_fds);
    assert_eq!(errno_of(&mut sock, 14), e(libc::EINVAL));
    // A message larger than the control socket takes: E2BIG, skipped.
    let mut big = header(15, cmd::EXT_ATTACH, 8192, 0);
    big.resize(16 + 8192, 0);
    sock.write_all(&big).unwrap();
    assert_eq!(errno_of(&mut sock, 15), e(libc::E2BIG));
    // Unknown attach flags; not bound.
    let mut m = header(16, cmd::EXT_ATTACH, 24, 0);
    for w in [24u32, 0x80, 5, sp.ioas_a, 0, 0] {
        m.extend_from_slice(&w.to_ne_bytes());
    }
    sock.write_all(&m).unwrap();
    assert_eq!(errno_of(&mut sock, 16), e(libc::EINVAL));
    let mut m = header(17, cmd::EXT_UNBIND, 0, 0);
    sock.write_all(&m).unwrap();
    assert_eq!(errno_of(&mut sock, 17), e(libc::ENODEV));
    // A reply-typed message is dropped; a NO_REPLY command gets no reply.
    m = header(18, cmd::EXT_UNBIND, 0, proto::flags::REPLY);
    sock.write_all(&m).unwrap();
    m = header(19, cmd::EXT_UNBIND, 0, proto::flags::NO_REPLY);
    sock.write_all(&m).unwrap();
    // The connection still works: a real bind.
    send_raw(&sock, &bind(20), &[chan.as_fd()]);
    let (id, command, flags, _, p) = read_reply(&mut sock);
    assert_eq!((id, command, flags & proto::flags::ERROR), (20, cmd::EXT_BIND, 0));
    assert_eq!(p.len(), 24);
    assert_eq!(s.server().dma().binding_owner(), Some(Owner::Control));
    // A header that cannot be followed closes the connection (and with it
    // the binding); the server keeps serving.
    let mut m = header(21, cmd::EXT_UNBIND, 0, 0);
    m[4..8].copy_from_slice(&8u32.to_ne_bytes());
    sock.write_all(&m).unwrap();
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no reply to a broken header");
    wait_until("the binding to go", || s.server().dma().binding().is_none());
    // Half a message, then a hang-up: nothing breaks.
    let mut half = UnixStream::connect(&control).unwrap();
    half.write_all(&header(1, cmd::EXT_ATTACH, 24, 0)[..10]).unwrap();
    drop(half);
    wait_until("a new orchestrator to be served", || {
        Control::connect(&control).is_ok_and(|mut o| o.list().err().and_then(|e| e.errno()) == Some(libc::ENODEV))
    });
    let mut c = s.client();
    let ram = guest_ram(&mut c);
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x1000, 6, None), regs::STATUS_DONE);
    assert_eq!(at(&ram, 0x1000), *b"guest!");
}

#[test]
fn the_core_client_agrees_with_the_servers_layouts() {
    assert_eq!(ctl::HEADER_SIZE, proto::HEADER_SIZE);
    assert_eq!(
        [ctl::cmd::BIND, ctl::cmd::UNBIND, ctl::cmd::ATTACH, ctl::cmd::DETACH, ctl::cmd::LIST_PASIDS],
        [cmd::EXT_BIND, cmd::EXT_UNBIND, cmd::EXT_ATTACH, cmd::EXT_DETACH, cmd::EXT_LIST_PASIDS]
    );
    assert_eq!((ctl::FLAG_PASID, ctl::FLAG_REPLACE), (proto::EXT_FLAG_PASID, proto::EXT_FLAG_REPLACE));
    assert_eq!(size_of::<proto::ExtBind>(), 24);
    assert_eq!(size_of::<proto::ExtAttach>(), 24);
    assert_eq!(size_of::<proto::ExtList>(), 16);
}

#[test]
fn the_control_socket_admits_the_same_users_and_goes_with_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let (mut s, control) = stack("ctl-perm");
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    s.server.take().unwrap().stop().unwrap();
    assert!(!control.exists(), "the control socket is removed at stop");
    // A control socket that cannot be bound fails the setup and leaves no
    // vfio-user socket behind.
    let opts = Options { control: Some(s.dir.join("missing").join("ctl.sock")), ..Options::new(&s.sock, &s.core_path) };
    assert!(server::spawn(Box::new(TestDevice::new().unwrap()), opts).is_err());
    assert!(!s.sock.exists());
}

#[test]
fn the_orchestrators_session_ending_leaves_rid_dma_on_the_compat_ioas() {
    let (s, control) = stack("ctl-session-ends");
    let mut sp = spaces(&s);
    let mut c = s.client();
    let ram = guest_ram(&mut c);
    let mut o = Control::connect(&control).unwrap();
    let (_, chan) = sp.sess.open_device_channel().unwrap();
    o.bind(chan.as_fd()).unwrap();
    drop(chan);
    o.attach(Some(5), sp.ioas_a, false).unwrap();
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x1000, 6, Some(5)), regs::STATUS_DONE);
    // The session ends (the core frees the device) while the control
    // connection stays: vPASID DMA fails, RID DMA stays on the compat IOAS,
    // the binding stays until the orchestrator unbinds.
    let Spaces { sess, a, .. } = sp;
    drop(sess);
    wait_until("vPASID DMA to fail", || copy(&mut c, IOVA, IOVA + 0x2000, 6, Some(5)) == regs::STATUS_ERROR);
    a.write_all_at(&[0; 6], 0x2000).unwrap();
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x2000, 6, Some(5)), regs::STATUS_ERROR);
    assert_eq!(at(&a, 0x2000), [0; 6]);
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x3000, 6, None), regs::STATUS_DONE);
    assert_eq!(at(&ram, 0x3000), *b"guest!");
    assert_eq!(s.server().dma().binding_owner(), Some(Owner::Control));
    o.unbind().unwrap();
    assert_eq!(s.server().dma().binding(), None);
    assert_eq!(copy(&mut c, IOVA, IOVA + 0x4000, 6, None), regs::STATUS_DONE);
}
