//! The core dies (SIGKILL) under a running vfio-user client and a new one
//! starts on the same socket: real `iommu-core` and `vfio-user-server
//! dma-engine` processes. The device server keeps its client, fails DMA
//! cleanly during the outage (DMA_MAP with ENODEV, device DMA with the
//! device's error statuses), reconnects by itself, and rebuilds its compat
//! IOAS from the client's DMA table, so DMA works again on the same
//! connection without a new DMA_MAP.
//!
//! With `IOASID_TEST_LOG_DIR=DIR`, each server logs (at debug level) to
//! `DIR/NAME.log`.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ioasid_stack::engine::GuestRam;
use iommu_core::types::{Perm, Snapshot};
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{op, regs, status, Completion, Descriptor, COMPLETION_SIZE};
use vfio_user_server::proto;

const RW: u32 = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;
/// Ring entries of queue 0.
const RING: u32 = 16;
/// Generous bound for anything to happen on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// Starts `vfio-user-server DEVICE`; its log goes to `$IOASID_TEST_LOG_DIR/NAME.log` when that is set.
fn server(st: &mut Stack, device: &str, name: &str) -> std::path::PathBuf {
    let sock = st.dir.join(format!("{name}.sock"));
    let log = match std::env::var_os("IOASID_TEST_LOG_DIR") {
        Some(d) => Stdio::from(std::fs::File::create(std::path::Path::new(&d).join(format!("{name}.log"))).unwrap()),
        None => Stdio::null(),
    };
    let p = Command::new(bin("vfio-user-server"))
        .arg(device)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--core")
        .arg(&st.core_sock)
        .env("RUST_LOG", "debug")
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for(&sock);
    st.servers.push(Proc(p));
    sock
}

/// Kills the core with SIGKILL and reaps it.
fn kill_core(st: &mut Stack) {
    let core = st.core.take().expect("a running core");
    drop(core);
}

/// Starts a new core on the old socket path and waits until it answers
/// there (the dead core's socket file stays until the new one replaces
/// it); returns when it does.
fn start_core(st: &mut Stack) -> Instant {
    let p = Command::new(bin("iommu-core")).arg("--socket").arg(&st.core_sock).stderr(Stdio::null()).spawn().unwrap();
    let pid = p.id() as i32;
    st.core = Some(Proc(p));
    let t0 = Instant::now();
    loop {
        if let Ok(o) = iommu_core::client::Client::observer(&st.core_sock) {
            if o.core_pid() == Some(pid) {
                return Instant::now();
            }
        }
        assert!(t0.elapsed() < DEADLINE, "the new core never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `(iova, length, perm)` of every mapping of the one IOAS holding
/// mappings in `snap` (the server's compat IOAS), if exactly one does.
fn compat_mappings(snap: &Snapshot) -> Option<Vec<(u64, u64, Perm)>> {
    let mut found = snap
        .sessions
        .iter()
        .flat_map(|s| s.ioas.iter())
        .filter(|i| !i.mappings.is_empty())
        .map(|i| i.mappings.iter().map(|m| (m.iova, m.length, m.perm)).collect::<Vec<_>>());
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

fn errno<T: std::fmt::Debug>(r: Result<T, vfio_user_server::client::Error>) -> i32 {
    r.expect_err("the command should fail").errno().expect("an errno reply")
}

// ---------------------------------------------------------------------
// The rust-vmm client: every byte of memory is a memfd in the compat IOAS.

const RAM: u64 = 0x8000_0000;
const DATA: u64 = 0x9000_0000;
const LATE: u64 = 0xa000_0000;

/// Queue 0 of a dma-engine driven by the rust-vmm client, with its ring
/// at the start of `ram` (IOVA [`RAM`]) and completion records at 0xf000.
struct RustVmmEngine {
    c: vfio_user::Client,
    tail: u32,
}

/// How one submitted descriptor ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Its completion record came back with this status.
    Status(u8),
    /// The queue halted: the device could not fetch the descriptor.
    Halted,
    /// Neither within the deadline.
    Nothing,
}

impl RustVmmEngine {
    fn w32(&mut self, off: u64, v: u32) {
        self.c.region_write(0, off, &v.to_le_bytes()).unwrap();
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.c.region_read(0, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn setup(&mut self) {
        let q0 = regs::QUEUE;
        // Memory space and bus mastering on, as a guest's driver does.
        self.c.region_write(proto::region::CONFIG, 4, &6u16.to_le_bytes()).unwrap();
        self.w32(regs::CTRL, 1);
        self.c.region_write(0, q0 + regs::Q_RING_BASE, &RAM.to_le_bytes()).unwrap();
        self.w32(q0 + regs::Q_RING_SIZE, RING);
        self.w32(q0 + regs::Q_CTRL, regs::Q_CTRL_ENABLE);
        self.tail = self.r32(q0 + regs::Q_HEAD);
    }

    /// A halted queue restarts empty at the doorbell when enabled again.
    fn restart_queue(&mut self) {
        let q0 = regs::QUEUE;
        self.w32(q0 + regs::Q_CTRL, 0);
        self.w32(q0 + regs::Q_CTRL, regs::Q_CTRL_ENABLE);
    }

    fn halted(&mut self) -> bool {
        self.r32(regs::QUEUE + regs::Q_STATUS) & 2 != 0
    }

    /// Submits one COPY of `len` bytes and waits until it ends.
    fn copy(&mut self, ram: &GuestRam, src: u64, dst: u64, len: u32, wait: Duration) -> Ended {
        let slot = u64::from(self.tail % RING);
        let comp_off = 0xf000 + slot * COMPLETION_SIZE as u64;
        ram.write(comp_off, &[0u8; COMPLETION_SIZE]).unwrap();
        let d = Descriptor { opcode: op::COPY, len, src, dst, completion: RAM + comp_off, ..Default::default() };
        ram.write(slot * 64, &d.to_bytes()).unwrap();
        self.tail = self.tail.wrapping_add(1);
        let t = self.tail;
        self.w32(regs::QUEUE + regs::Q_TAIL, t);
        let t0 = Instant::now();
        loop {
            let s = ram.read(comp_off, 1).unwrap()[0];
            if s != status::NONE {
                return Ended::Status(s);
            }
            if self.halted() {
                return Ended::Halted;
            }
            if t0.elapsed() > wait {
                return Ended::Nothing;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The rust-vmm client maps guest memory, the device copies; the core is
/// killed: the device's ring fetch fails and its queue halts (its error
/// status) while the server keeps answering; a DMA_MAP during the outage
/// is refused; a new core starts on the same socket and, on the same
/// connection and without any new DMA_MAP, the device copies again and the
/// new core holds the same compat mappings.
#[test]
fn the_device_copies_again_on_the_same_connection_after_the_core_restarts() {
    let mut st = Stack::new("restart-rustvmm");
    let sock = server(&mut st, "dma-engine", "rustvmm");
    let ram = GuestRam::new("ram", 1 << 20).unwrap();
    let data = GuestRam::new("data", 1 << 20).unwrap();
    let late = GuestRam::new("late", 1 << 20).unwrap();
    let mut e = RustVmmEngine { c: vfio_user::Client::new(&sock).unwrap(), tail: 0 };
    e.c.dma_map(0, RAM, 1 << 20, ram.file.as_raw_fd()).unwrap();
    e.c.dma_map(0, DATA, 1 << 20, data.file.as_raw_fd()).unwrap();
    e.setup();
    data.write(0, b"before the restart").unwrap();
    assert_eq!(e.copy(&ram, DATA, DATA + 0x1000, 18, DEADLINE), Ended::Status(status::SUCCESS));
    assert_eq!(data.read(0x1000, 18).unwrap(), b"before the restart");
    let before = compat_mappings(&st.observer().status().unwrap()).expect("the compat IOAS");
    assert_eq!(before.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), vec![(RAM, 1 << 20), (DATA, 1 << 20)]);

    kill_core(&mut st);
    // Until the server notices, DMA may still complete through what it had
    // (and a descriptor caught in between may fail, or lose its completion
    // record); then the ring fetch fails and the queue halts.
    let t0 = Instant::now();
    loop {
        match e.copy(&ram, DATA, DATA + 0x2000, 18, Duration::from_secs(2)) {
            Ended::Halted => break,
            Ended::Nothing => e.restart_queue(),
            Ended::Status(_) => {}
        }
        assert!(t0.elapsed() < DEADLINE, "the device never stopped its DMA after the core died");
    }
    // The server answers (the device thread never waits for a core).
    assert!(e.c.get_irq_info(proto::irq_index::MSIX).is_ok());
    assert_eq!(e.r32(regs::ID), regs::ID_VALUE);
    e.restart_queue();
    assert_eq!(e.copy(&ram, DATA, DATA + 0x2000, 18, DEADLINE), Ended::Halted, "no DMA without a core");
    // The rust-vmm client does not report DMA_MAP errors: that this one was
    // refused shows in the new core below.
    e.c.dma_map(0, LATE, 1 << 20, late.file.as_raw_fd()).unwrap();

    let started = start_core(&mut st);
    data.write(0x100, b"after the restart").unwrap();
    let downtime = loop {
        e.restart_queue();
        match e.copy(&ram, DATA + 0x100, DATA + 0x3000, 17, Duration::from_secs(5)) {
            Ended::Status(status::SUCCESS) => break started.elapsed(),
            Ended::Halted | Ended::Nothing | Ended::Status(_) => {}
        }
        assert!(started.elapsed() < DEADLINE, "the device never copied again after the new core started");
        std::thread::sleep(Duration::from_millis(5));
    };
    println!("the device was without DMA for {} ms after the new core started", downtime.as_millis());
    assert_eq!(data.read(0x3000, 17).unwrap(), b"after the restart");
    // The new core holds the compat IOAS with the same mappings, and not the
    // one asked for during the outage.
    let after = compat_mappings(&st.observer().status().unwrap()).expect("the rebuilt compat IOAS");
    assert_eq!(after, before);
    // Mapped again, now that a core answers, it is there.
    e.c.dma_map(0, LATE, 1 << 20, late.file.as_raw_fd()).unwrap();
    let again = compat_mappings(&st.observer().status().unwrap()).unwrap();
    assert_eq!(
        again.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(),
        vec![(RAM, 1 << 20), (DATA, 1 << 20), (LATE, 1 << 20)]
    );
    late.write(0, b"late").unwrap();
    assert_eq!(e.copy(&ram, LATE, DATA + 0x4000, 4, DEADLINE), Ended::Status(status::SUCCESS));
    assert_eq!(data.read(0x4000, 4).unwrap(), b"late");
}

// ---------------------------------------------------------------------
// The project's client: exact errnos, and a ring in client memory (no fd,
// reached with DMA_READ/DMA_WRITE), which the core maps like any other.

const MSG: u64 = 0x1000_0000;
const A: u64 = 0x2000_0000;
const B: u64 = 0x3000_0000;
const C: u64 = 0x4000_0000;

/// Queue 0 with its ring at [`MSG`] and completion records at
/// `MSG + 0x8000`, both in the client's memory without an fd.
struct MsgEngine {
    c: Client,
    tail: u32,
}

/// How [`MsgEngine::run`] ended.
#[derive(Debug)]
enum Ran {
    Done(Completion),
    /// The queue halted (Q_STATUS bit 1) without a record.
    Halted,
}

impl MsgEngine {
    fn new(c: Client) -> MsgEngine {
        let mut e = MsgEngine { c, tail: 0 };
        e.c.add_message_memory(MSG, vec![0; 0x1_0000]);
        e.c.dma_map(RW, 0, MSG, 0x1_0000, None).unwrap();
        e.c.enable_function().unwrap();
        e.w32(regs::CTRL, 1);
        e.c.region_write(0, regs::QUEUE + regs::Q_RING_BASE, &MSG.to_le_bytes()).unwrap();
        e.w32(regs::QUEUE + regs::Q_RING_SIZE, RING);
        e.enable_queue();
        e
    }

    /// Enables queue 0 (again): its ring starts empty at the doorbell.
    fn enable_queue(&mut self) {
        self.w32(regs::QUEUE + regs::Q_CTRL, 0);
        self.w32(regs::QUEUE + regs::Q_CTRL, regs::Q_CTRL_ENABLE);
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.c.region_write(0, off, &v.to_le_bytes()).unwrap();
    }

    fn r32(&mut self, off: u64) -> u32 {
        u32::from_le_bytes(self.c.region_read(0, off, 4).unwrap().try_into().unwrap())
    }

    /// Runs one descriptor: its completion record, or the queue halting.
    fn run(&mut self, d: Descriptor) -> Ran {
        let slot = u64::from(self.tail % RING);
        let comp = 0x8000 + slot * COMPLETION_SIZE as u64;
        let mut mem = self.c.message_memory(MSG).unwrap().to_vec();
        mem[comp as usize..comp as usize + COMPLETION_SIZE].fill(0);
        let d = Descriptor { completion: MSG + comp, ..d };
        mem[slot as usize * 64..slot as usize * 64 + 64].copy_from_slice(&d.to_bytes());
        self.c.add_message_memory(MSG, mem);
        self.tail = self.tail.wrapping_add(1);
        let t = self.tail;
        self.w32(regs::QUEUE + regs::Q_TAIL, t);
        let t0 = Instant::now();
        loop {
            // Each call serves the device's DMA_READ/DMA_WRITE meanwhile.
            let halted = self.r32(regs::QUEUE + regs::Q_STATUS) & 2 != 0;
            let rec = &self.c.message_memory(MSG).unwrap()[comp as usize..comp as usize + COMPLETION_SIZE];
            if rec[0] != status::NONE {
                return Ran::Done(Completion::parse(rec).unwrap());
            }
            if halted {
                return Ran::Halted;
            }
            assert!(t0.elapsed() < DEADLINE, "the descriptor never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs one descriptor that must complete with a record.
    fn done(&mut self, d: Descriptor) -> Completion {
        match self.run(d) {
            Ran::Done(c) => c,
            Ran::Halted => panic!("the queue halted"),
        }
    }
}

fn copy(src: u64, dst: u64, len: u32) -> Descriptor {
    Descriptor { opcode: op::COPY, len, src, dst, ..Default::default() }
}

/// Client memory is mapped in the core like memory with an fd, so during
/// an outage it is out of reach too: the queue, whose ring and records are
/// there, halts. DMA_MAP with or without an fd fails with ENODEV, DMA_UNMAP
/// succeeds, DEVICE_GET_INFO answers. After the restart the new core holds
/// exactly the regions the table holds then, client memory included, and
/// the re-enabled queue copies again.
#[test]
fn during_an_outage_maps_fail_with_enodev_unmaps_succeed_and_client_memory_comes_back() {
    let mut st = Stack::new("restart-errnos");
    let sock = server(&mut st, "dma-engine", "errnos");
    let a = GuestRam::new("a", 1 << 20).unwrap();
    let b = GuestRam::new("b", 1 << 20).unwrap();
    let c_ram = GuestRam::new("c", 1 << 20).unwrap();
    let mut e = MsgEngine::new(Client::connect(&sock).unwrap());
    e.c.dma_map(RW, 0, A, 1 << 20, Some(a.file.as_fd())).unwrap();
    e.c.dma_map(proto::DMA_MAP_READ, 0, B, 1 << 20, Some(b.file.as_fd())).unwrap();
    a.write(0, b"from A").unwrap();
    assert_eq!(e.done(copy(A, A + 0x1000, 6)).status, status::SUCCESS);
    assert_eq!(a.read(0x1000, 6).unwrap(), b"from A");
    let before = compat_mappings(&st.observer().status().unwrap()).expect("the compat IOAS");
    assert_eq!(before, vec![(MSG, 0x1_0000, Perm::RW), (A, 1 << 20, Perm::RW), (B, 1 << 20, Perm::R)]);

    kill_core(&mut st);
    let t0 = Instant::now();
    loop {
        match e.run(copy(A, A + 0x2000, 6)) {
            Ran::Halted => break,
            Ran::Done(r) => assert_eq!(r.status, status::SUCCESS, "a record written without a core: {r:?}"),
        }
        assert!(t0.elapsed() < DEADLINE, "the device never stopped its DMA after the core died");
    }
    assert_eq!(errno(e.c.dma_map(RW, 0, C, 1 << 20, Some(c_ram.file.as_fd()))), libc::ENODEV);
    e.c.add_message_memory(0x5000_0000, vec![0; 4096]);
    assert_eq!(errno(e.c.dma_map(RW, 0, 0x5000_0000, 4096, None)), libc::ENODEV);
    assert_eq!(e.c.device_info().unwrap().num_regions, 9);
    // B leaves the table while no core holds it.
    e.c.dma_unmap(B, 1 << 20, 0).unwrap();
    assert_eq!(errno(e.c.dma_unmap(B, 1 << 20, 0)), libc::ENOENT);

    let started = start_core(&mut st);
    let downtime = loop {
        e.enable_queue();
        if let Ran::Done(r) = e.run(copy(A, A + 0x3000, 6)) {
            if r.status == status::SUCCESS {
                break started.elapsed();
            }
        }
        assert!(started.elapsed() < DEADLINE, "the device never copied again after the new core started");
        std::thread::sleep(Duration::from_millis(5));
    };
    println!("the device was without DMA for {} ms after the new core started", downtime.as_millis());
    assert_eq!(a.read(0x3000, 6).unwrap(), b"from A");
    let after = compat_mappings(&st.observer().status().unwrap()).expect("the rebuilt compat IOAS");
    assert_eq!(
        after,
        vec![(MSG, 0x1_0000, Perm::RW), (A, 1 << 20, Perm::RW)],
        "B was unmapped during the outage, C refused; client memory is back"
    );
    // B's IOVA is not reachable; C can be mapped now.
    let r = e.done(copy(B, A + 0x4000, 6));
    assert_eq!((r.status, r.fault_addr), (status::FAULT_SRC, B));
    e.c.dma_map(RW, 0, C, 1 << 20, Some(c_ram.file.as_fd())).unwrap();
    c_ram.write(0, b"from C").unwrap();
    assert_eq!(e.done(copy(C, A + 0x5000, 6)).status, status::SUCCESS);
    assert_eq!(a.read(0x5000, 6).unwrap(), b"from C");
}

/// A VMM session that bound the device through the extension dies with
/// the core: the server drops the binding and its vPASID map. A client
/// that leaves during the outage leaves nothing behind: the next one maps
/// the same IOVAs (no EEXIST) once a core is back.
#[test]
fn an_extension_binding_goes_with_its_core_and_a_departed_client_leaves_no_maps() {
    let mut st = Stack::new("restart-ext");
    let sock = server(&mut st, "dma-engine", "ext");
    let mut sess = st.session();
    let mem = GuestRam::new("vmm", 1 << 20).unwrap();
    let m = sess.register_memory(mem.file.as_fd()).unwrap().id;
    let ioas = sess.ioas_alloc().unwrap();
    sess.map(iommu_core::types::MapArgs { ioas, mem: m, offset: 0, length: 1 << 20, iova: Some(A), perm: Perm::RW })
        .unwrap();
    let (_, chan) = sess.open_device_channel().unwrap();
    let mut c = Client::connect(&sock).unwrap();
    let own = GuestRam::new("own", 1 << 20).unwrap();
    c.dma_map(RW, 0, B, 1 << 20, Some(own.file.as_fd())).unwrap();
    c.ioasid_bind(chan.as_fd()).unwrap();
    let ppasid = c.ioasid_attach(Some(5), ioas, false).unwrap();
    let (_, map) = c.ioasid_list().unwrap();
    assert_eq!(map.iter().map(|x| (x.vpasid, x.ppasid)).collect::<Vec<_>>(), vec![(5, ppasid)]);

    kill_core(&mut st);
    drop(sess);
    let t0 = Instant::now();
    loop {
        match c.ioasid_list() {
            Err(e) if e.errno() == Some(libc::ENODEV) => break,
            Ok(_) => {}
            Err(e) => panic!("IOASID_LIST_PASIDS during the outage: {e}"),
        }
        assert!(t0.elapsed() < DEADLINE, "the binding of the dead core's session stays");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(errno(c.ioasid_attach(Some(5), ioas, false)), libc::ENODEV);
    // Binding again needs a core.
    let (other, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_eq!(errno(c.ioasid_bind(other.as_fd())), libc::ENODEV);
    // The client leaves while no core answers: its regions leave the table.
    drop(c);

    start_core(&mut st);
    // One client at a time: the server may not have seen the last one go.
    let t0 = Instant::now();
    let mut c = loop {
        match Client::connect(&sock) {
            Ok(c) => break c,
            Err(e) => assert!(t0.elapsed() < DEADLINE, "no client accepted: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let own2 = GuestRam::new("own2", 1 << 20).unwrap();
    let t0 = Instant::now();
    loop {
        match c.dma_map(RW, 0, B, 1 << 20, Some(own2.file.as_fd())) {
            Ok(()) => break,
            Err(e) => assert_eq!(e.errno(), Some(libc::ENODEV), "mapping the departed client's IOVA again: {e}"),
        }
        assert!(t0.elapsed() < DEADLINE, "the server never reached the new core");
        std::thread::sleep(Duration::from_millis(5));
    }
    let after = compat_mappings(&st.observer().status().unwrap()).expect("the compat IOAS");
    assert_eq!(after, vec![(B, 1 << 20, Perm::RW)]);
    // A session of the new core binds the device again.
    let mut sess = st.session();
    let (_, chan) = sess.open_device_channel().unwrap();
    c.ioasid_bind(chan.as_fd()).unwrap();
    assert_eq!(c.ioasid_list().unwrap().1.len(), 0);
}
