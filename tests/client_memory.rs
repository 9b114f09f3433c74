//! Client memory: guest RAM without an fd (QEMU's default RAM), which the
//! device server registers in the core as memory objects without an fd and
//! maps in its compat IOAS; the device's accesses translate there and only
//! the final copy goes to the client as DMA_READ/DMA_WRITE. The project's
//! client plays QEMU here: one that answers at once, slowly, never, or with
//! errors, and one that answers nothing until its own register access has
//! been answered (QEMU serves the server's requests on its main loop, which
//! waits while a vCPU waits for a register access).

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::*;
use ioasid_stack::engine::GuestRam;
use iommu_core::types::Perm;
use vfio_user_server::client::{Client, DmaMode};
use vfio_user_server::conn::DMA_REPLY_TIMEOUT;
use vfio_user_server::devices::dma_engine::{op, regs, status, Completion, Descriptor, COMPLETION_SIZE, MAX_XFER};
use vfio_user_server::proto;

const RW: u32 = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;
/// The ring (16 descriptors) and, from `RECORDS` on, completion records.
const RING_AT: u64 = 0x1000_0000;
const RING_BYTES: usize = 0x1_0000;
const RECORDS: u64 = 0x8000;
const RING: u32 = 16;
/// Source and destination buffers in client memory.
const S: u64 = 0x2000_0000;
const D: u64 = 0x4000_0000;
const BUF: usize = MAX_XFER as usize + 0x1_0000;
/// Generous bound for anything to happen on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(120);

/// Where the ring and its records live.
enum Ring {
    /// In client memory (DMA_READ/DMA_WRITE), like everything else.
    Client,
    /// In a memfd the client shares, so the queue itself does not depend
    /// on the client answering.
    File(GuestRam),
}

/// Queue 0 of a dma-engine, driven by the project's client.
struct Eng {
    c: Client,
    ring: Ring,
    tail: u32,
}

/// How a descriptor ended.
#[derive(Debug)]
enum Ran {
    Done(Completion),
    /// The queue halted without writing a record.
    Halted,
}

impl Eng {
    fn new(sock: &std::path::Path, ring_in_client: bool) -> Eng {
        let mut c = Client::connect(sock).unwrap();
        let ring = if ring_in_client {
            c.add_message_memory(RING_AT, vec![0; RING_BYTES]);
            c.dma_map(RW, 0, RING_AT, RING_BYTES as u64, None).unwrap();
            Ring::Client
        } else {
            let r = GuestRam::new("ring", RING_BYTES as u64).unwrap();
            c.dma_map(RW, 0, RING_AT, RING_BYTES as u64, Some(r.file.as_fd())).unwrap();
            Ring::File(r)
        };
        for at in [S, D] {
            c.add_message_memory(at, vec![0; BUF]);
            c.dma_map(RW, 0, at, BUF as u64, None).unwrap();
        }
        let mut e = Eng { c, ring, tail: 0 };
        e.c.enable_function().unwrap();
        e.w32(regs::CTRL, 1);
        e.c.region_write(0, regs::QUEUE + regs::Q_RING_BASE, &RING_AT.to_le_bytes()).unwrap();
        e.w32(regs::QUEUE + regs::Q_RING_SIZE, RING);
        e.enable_queue();
        e
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.c.region_write(0, off, &v.to_le_bytes()).unwrap();
    }

    fn r32(&mut self, off: u64) -> u32 {
        u32::from_le_bytes(self.c.region_read(0, off, 4).unwrap().try_into().unwrap())
    }

    /// Enables queue 0 (again): its ring starts empty at the doorbell.
    fn enable_queue(&mut self) {
        self.w32(regs::QUEUE + regs::Q_CTRL, 0);
        self.w32(regs::QUEUE + regs::Q_CTRL, regs::Q_CTRL_ENABLE);
    }

    fn ring_write(&mut self, off: u64, bytes: &[u8]) {
        let o = off as usize;
        match &self.ring {
            Ring::Client => self.c.message_memory_mut(RING_AT).unwrap()[o..o + bytes.len()].copy_from_slice(bytes),
            Ring::File(r) => r.write(off, bytes).unwrap(),
        }
    }

    fn ring_read(&self, off: u64, len: usize) -> Vec<u8> {
        let o = off as usize;
        match &self.ring {
            Ring::Client => self.c.message_memory(RING_AT).unwrap()[o..o + len].to_vec(),
            Ring::File(r) => r.read(off, len).unwrap(),
        }
    }

    /// Puts `d` on the ring with a fresh record and rings the doorbell;
    /// returns the record's offset in the ring memory.
    fn submit(&mut self, d: Descriptor) -> u64 {
        let comp = self.push(d);
        self.doorbell();
        comp
    }

    /// Puts `d` on the ring with a fresh record, without ringing; returns
    /// the record's offset in the ring memory.
    fn push(&mut self, d: Descriptor) -> u64 {
        let slot = u64::from(self.tail % RING);
        let comp = RECORDS + slot * COMPLETION_SIZE as u64;
        self.ring_write(comp, &[0; COMPLETION_SIZE]);
        let d = Descriptor { completion: RING_AT + comp, ..d };
        self.ring_write(slot * 64, &d.to_bytes());
        self.tail = self.tail.wrapping_add(1);
        comp
    }

    /// Rings the doorbell for what was pushed.
    fn doorbell(&mut self) {
        let t = self.tail;
        self.w32(regs::QUEUE + regs::Q_TAIL, t);
    }

    /// Waits for the record at `comp` (register reads let the client
    /// serve the device's requests meanwhile).
    fn wait(&mut self, comp: u64) -> Ran {
        let t0 = Instant::now();
        loop {
            let halted = self.r32(regs::QUEUE + regs::Q_STATUS) & 2 != 0;
            let rec = self.ring_read(comp, COMPLETION_SIZE);
            if rec[0] != status::NONE {
                return Ran::Done(Completion::parse(&rec).unwrap());
            }
            if halted {
                return Ran::Halted;
            }
            assert!(t0.elapsed() < DEADLINE, "the descriptor never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn run(&mut self, d: Descriptor) -> Completion {
        let comp = self.submit(d);
        match self.wait(comp) {
            Ran::Done(c) => c,
            Ran::Halted => panic!("the queue halted"),
        }
    }

    /// Fills `len` bytes of the source with a pattern of `seed`.
    fn fill_source(&mut self, len: usize, seed: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect();
        self.c.message_memory_mut(S).unwrap()[..len].copy_from_slice(&data);
        data
    }

    fn dest(&self, len: usize) -> &[u8] {
        &self.c.message_memory(D).unwrap()[..len]
    }

    /// Waits until the device has asked the client for memory (the client
    /// is deferring its answers).
    fn until_device_waits_for_the_client(&mut self) {
        let t0 = Instant::now();
        while self.c.deferred_dma() == 0 {
            self.r32(regs::STATUS);
            assert!(t0.elapsed() < DEADLINE, "the device never asked for client memory");
        }
    }
}

fn copy(src: u64, dst: u64, len: usize) -> Descriptor {
    Descriptor { opcode: op::COPY, len: len as u32, src, dst, ..Default::default() }
}

/// The server's compat IOAS as observers see it: (iova, length, perm).
fn compat_mappings(st: &Stack) -> Vec<(u64, u64, Perm)> {
    let snap = st.observer().status().unwrap();
    snap.sessions
        .iter()
        .flat_map(|s| s.ioas.iter())
        .flat_map(|i| i.mappings.iter().map(|m| (m.iova, m.length, m.perm)))
        .collect()
}

#[test]
fn client_memory_is_mapped_in_the_core_and_copies_of_4k_to_the_largest_transfer_complete() {
    let mut st = Stack::new("client-mem-sizes");
    let sock = st.server("dma-engine", "sizes");
    let mut e = Eng::new(&sock, true);
    // The core holds every region as a mapping of a memory object without
    // an fd, which records the client's address.
    assert_eq!(
        compat_mappings(&st),
        vec![(RING_AT, RING_BYTES as u64, Perm::RW), (S, BUF as u64, Perm::RW), (D, BUF as u64, Perm::RW)]
    );
    let snap = st.observer().status().unwrap();
    let mut clients: Vec<(u64, u64)> = snap
        .sessions
        .iter()
        .flat_map(|s| s.memory.iter())
        .filter_map(|m| m.client_address.map(|a| (a, m.size)))
        .collect();
    clients.sort();
    assert_eq!(clients, vec![(RING_AT, RING_BYTES as u64), (S, BUF as u64), (D, BUF as u64)]);
    assert!(snap.sessions.iter().flat_map(|s| s.memory.iter()).all(|m| m.seals == "none"));

    for (i, len) in [4096, 64 * 1024 + 13, 256 * 1024 + 13, 1 << 20, MAX_XFER as usize].into_iter().enumerate() {
        let want = e.fill_source(len, i as u8);
        e.c.message_memory_mut(D).unwrap()[..len + 1].fill(0xee);
        let r = e.run(copy(S, D, len));
        assert_eq!((r.status, r.bytes_done), (status::SUCCESS, len as u32), "copy of {len} bytes: {r:?}");
        assert!(e.dest(len) == &want[..], "copy of {len} bytes: the destination differs");
        assert_eq!(e.c.message_memory(D).unwrap()[len], 0xee, "copy of {len} bytes wrote past its end");
    }

    // Permissions are the core's: a read-only region faults a write, and
    // the fault is in the core's log at the IOVA.
    const RO: u64 = 0x6000_0000;
    e.c.add_message_memory(RO, vec![0; 4096]);
    e.c.dma_map(proto::DMA_MAP_READ, 0, RO, 4096, None).unwrap();
    let r = e.run(copy(S, RO, 64));
    assert_eq!((r.status, r.fault_addr), (status::FAULT_DST, RO), "{r:?}");
    assert!(e.c.message_memory(RO).unwrap().iter().all(|&b| b == 0), "a read-only region was written");
    let snap = st.observer().status().unwrap();
    assert!(snap.faults.iter().any(|f| f.record.iova == RO && f.record.access.write), "{:?}", snap.faults);
    // Unmapped, it is gone from the core, and its IOVA faults.
    e.c.dma_unmap(RO, 4096, 0).unwrap();
    assert!(!compat_mappings(&st).iter().any(|m| m.0 == RO));
    let r = e.run(copy(RO, D, 64));
    assert_eq!((r.status, r.fault_addr), (status::FAULT_SRC, RO), "{r:?}");
    // Not 4 KiB aligned: refused, as for memory with an fd.
    assert_eq!(e.c.dma_map(RW, 0, 0x7000_0000, 100, None).unwrap_err().errno(), Some(libc::EINVAL));
}

#[test]
fn a_slow_client_is_waited_for() {
    let mut st = Stack::new("client-mem-slow");
    let sock = st.server("dma-engine", "slow");
    let mut e = Eng::new(&sock, false);
    let len = 256 * 1024 + 13;
    let want = e.fill_source(len, 3);
    // Each of the copy's 5 reads and 5 writes waits 200 ms for the client.
    e.c.set_dma_mode(DmaMode::Delay(Duration::from_millis(200)));
    let r = e.run(copy(S, D, len));
    assert_eq!(r.status, status::SUCCESS, "{r:?}");
    assert!(e.dest(len) == &want[..]);
}

#[test]
fn a_client_that_never_answers_faults_the_descriptor_in_time_and_the_queue_keeps_working() {
    let mut st = Stack::new("client-mem-silent");
    let sock = st.server("dma-engine", "silent");
    let mut e = Eng::new(&sock, false);
    e.fill_source(4096, 5);
    e.c.set_dma_mode(DmaMode::Ignore);
    let t0 = Instant::now();
    let r = e.run(copy(S, D, 4096));
    let took = t0.elapsed();
    assert_eq!((r.status, r.fault_addr), (status::FAULT_SRC, S), "{r:?}");
    // The documented bound: one reply timeout (and not much more).
    assert!(took >= DMA_REPLY_TIMEOUT && took < DMA_REPLY_TIMEOUT * 3, "the descriptor faulted after {took:?}");
    assert_eq!(e.r32(regs::QUEUE + regs::Q_STATUS) & 6, 0, "the queue halted");
    // The client answers again: so does the queue, on the same ring.
    e.c.set_dma_mode(DmaMode::Answer);
    let want = e.fill_source(64 * 1024, 6);
    let r = e.run(copy(S, D, 64 * 1024));
    assert_eq!(r.status, status::SUCCESS, "{r:?}");
    assert!(e.dest(64 * 1024) == &want[..]);
}

#[test]
fn a_client_that_refuses_faults_the_descriptor_and_the_queue_keeps_working() {
    let mut st = Stack::new("client-mem-refuse");
    let sock = st.server("dma-engine", "refuse");
    let mut e = Eng::new(&sock, false);
    // Any errno, including those that mean something inside the server
    // (given up, timed out): each is a refusal like the others.
    for errno in [libc::EFAULT, libc::ECANCELED, libc::EINPROGRESS, libc::ETIMEDOUT] {
        e.c.set_dma_mode(DmaMode::Refuse(errno));
        let r = e.run(copy(S, D, 8192));
        assert_eq!((r.status, r.fault_addr), (status::FAULT_SRC, S), "errno {errno}: {r:?}");
    }
    e.c.set_dma_mode(DmaMode::Answer);
    let want = e.fill_source(8192, 9);
    let r = e.run(copy(S, D, 8192));
    assert_eq!(r.status, status::SUCCESS, "{r:?}");
    assert!(e.dest(8192) == &want[..]);
}

/// The client answers nothing while its own command waits for a reply, as
/// QEMU does. With a DMA timeout longer than the client's own read timeout
/// (30 s), a command whose reply waited for the device's DMA would fail the
/// client: queue disables, bus master disables, unmaps and resets are
/// answered at once instead, the DMA waiting for the client is given up,
/// and the device goes on (or not) as each of them says.
#[test]
fn commands_are_answered_while_the_device_waits_for_the_client() {
    let mut st = Stack::new("client-mem-cycle");
    let sock = st.server_with("dma-engine", "cycle", &["--dma-timeout-ms", "600000"]);
    let mut e = Eng::new(&sock, false);
    let len = 1 << 20;

    // A queue disable: the copy is dropped.
    e.fill_source(len, 1);
    e.c.set_dma_mode(DmaMode::Defer);
    let comp = e.submit(copy(S, D, len));
    e.until_device_waits_for_the_client();
    e.w32(regs::QUEUE + regs::Q_CTRL, 0);
    e.c.set_dma_mode(DmaMode::Answer);
    e.r32(regs::STATUS);
    assert_eq!(e.ring_read(comp, 1)[0], status::NONE, "a dropped descriptor completed");
    e.enable_queue();
    let want = e.fill_source(len, 2);
    assert_eq!(e.run(copy(S, D, len)).status, status::SUCCESS);
    assert!(e.dest(len) == &want[..]);

    // Bus mastering off and on again: the copy stops and resumes.
    let want = e.fill_source(len, 3);
    e.c.set_dma_mode(DmaMode::Defer);
    let comp = e.submit(copy(S, D, len));
    e.until_device_waits_for_the_client();
    e.c.set_command(0, vfio_user_server::pci::command::BUS_MASTER).unwrap();
    e.c.set_command(vfio_user_server::pci::command::BUS_MASTER, 0).unwrap();
    e.c.set_dma_mode(DmaMode::Answer);
    match e.wait(comp) {
        Ran::Done(r) => assert_eq!(r.status, status::SUCCESS, "{r:?}"),
        Ran::Halted => panic!("the queue halted"),
    }
    assert!(e.dest(len) == &want[..]);

    // An unmap of the destination: the copy faults there.
    e.c.set_dma_mode(DmaMode::Defer);
    let comp = e.submit(copy(S, D, len));
    e.until_device_waits_for_the_client();
    e.c.dma_unmap(D, BUF as u64, 0).unwrap();
    e.c.set_dma_mode(DmaMode::Answer);
    match e.wait(comp) {
        Ran::Done(r) => assert_eq!(r.status, status::FAULT_DST, "{r:?}"),
        Ran::Halted => panic!("the queue halted"),
    }
    assert!(!compat_mappings(&st).iter().any(|m| m.0 == D));
    e.c.dma_map(RW, 0, D, BUF as u64, None).unwrap();

    // A device reset: nothing completes, and the device works again once
    // the driver sets it up.
    e.c.set_dma_mode(DmaMode::Defer);
    let comp = e.submit(copy(S, D, len));
    e.until_device_waits_for_the_client();
    e.c.reset().unwrap();
    e.c.set_dma_mode(DmaMode::Answer);
    e.r32(regs::STATUS);
    assert_eq!(e.ring_read(comp, 1)[0], status::NONE, "a descriptor completed after the reset");
    let mut e2 = Eng { c: e.c, ring: e.ring, tail: 0 };
    e2.c.enable_function().unwrap();
    e2.w32(regs::CTRL, 1);
    e2.c.region_write(0, regs::QUEUE + regs::Q_RING_BASE, &RING_AT.to_le_bytes()).unwrap();
    e2.w32(regs::QUEUE + regs::Q_RING_SIZE, RING);
    e2.enable_queue();
    let want = e2.fill_source(len, 4);
    assert_eq!(e2.run(copy(S, D, len)).status, status::SUCCESS);
    assert!(e2.dest(len) == &want[..]);
}

/// A client that offers the twin socket gets one with the VERSION reply,
/// and the server's DMA_READ/DMA_WRITE requests come there, never on the
/// main socket; a client that does not offer it gets none.
#[test]
fn the_twin_socket_carries_the_servers_requests_when_the_client_offers_it() {
    let mut st = Stack::new("client-mem-twin");
    let sock = st.server("dma-engine", "twin");
    let mut caps = vfio_user_server::client::default_caps();
    caps["capabilities"]["twin_socket"] = serde_json::json!({ "supported": true });
    let c = Client::connect_with(&sock, 0, &caps).unwrap();
    assert!(c.has_twin());
    assert_eq!(c.server_version.2["capabilities"]["twin_socket"]["fd_index"], 0);
    drop(c);
    let e = Eng::new(&sock, true);
    assert!(!e.c.has_twin(), "a twin socket nobody asked for");
    drop(e);

    let c = Client::connect_with(&sock, 0, &caps).unwrap();
    let mut e = Eng { c, ring: Ring::Client, tail: 0 };
    e.c.add_message_memory(RING_AT, vec![0; RING_BYTES]);
    e.c.dma_map(RW, 0, RING_AT, RING_BYTES as u64, None).unwrap();
    for at in [S, D] {
        e.c.add_message_memory(at, vec![0; BUF]);
        e.c.dma_map(RW, 0, at, BUF as u64, None).unwrap();
    }
    e.c.enable_function().unwrap();
    e.w32(regs::CTRL, 1);
    e.c.region_write(0, regs::QUEUE + regs::Q_RING_BASE, &RING_AT.to_le_bytes()).unwrap();
    e.w32(regs::QUEUE + regs::Q_RING_SIZE, RING);
    e.enable_queue();
    let len = (1 << 20) + 13;
    let want = e.fill_source(len, 7);
    let r = e.run(copy(S, D, len));
    assert_eq!(r.status, status::SUCCESS, "{r:?}");
    assert!(e.dest(len) == &want[..]);
    assert!(e.c.twin_requests > 16);
    assert_eq!(e.c.twin_requests, e.c.dma_requests, "a request came on the main socket");
}

/// A region that does not start on a 2 MiB boundary (QEMU's RAM above
/// 1 MiB) is still reached with one DMA_READ or DMA_WRITE per 64 KiB step
/// of the device, not one per 4 KiB page it is mapped with.
#[test]
fn a_region_off_a_2m_boundary_is_reached_with_one_message_per_step() {
    let mut st = Stack::new("client-mem-runs");
    let sock = st.server("dma-engine", "runs");
    let mut e = Eng::new(&sock, false);
    const LOW: u64 = 0x5010_0000;
    const LOW_BYTES: usize = 4 << 20;
    e.c.add_message_memory(LOW, vec![0; LOW_BYTES]);
    e.c.dma_map(RW, 0, LOW, LOW_BYTES as u64, None).unwrap();
    let len = 1 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    e.c.message_memory_mut(LOW).unwrap()[..len].copy_from_slice(&data);
    let before = e.c.dma_requests;
    // The first MiB lies below the region's first 2 MiB boundary.
    let r = e.run(copy(LOW, D, len));
    assert_eq!(r.status, status::SUCCESS, "{r:?}");
    assert!(e.dest(len) == &data[..]);
    // 16 steps of 64 KiB: a read of the source and a write of the
    // destination each (the ring and its record are in a memfd).
    assert_eq!(e.c.dma_requests - before, 32);
    // Back the other way, at the region's far end (2 MiB leaves there).
    let r = e.run(copy(D, LOW + (LOW_BYTES - len) as u64, len));
    assert_eq!(r.status, status::SUCCESS, "{r:?}");
    assert!(e.c.message_memory(LOW).unwrap()[LOW_BYTES - len..] == data[..]);
}

/// DMA logging (migration's dirty tracking) covers client memory: the core
/// tracks the device's writes there as anywhere else, per leaf (the region
/// is mapped with 2 MiB leaves, so a write dirties its whole 2 MiB, as for
/// memory with an fd), and a report clears what it showed.
#[test]
fn dma_logging_reports_the_devices_writes_to_client_memory() {
    use zerocopy::IntoBytes;
    let mut st = Stack::new("client-mem-logging");
    let sock = st.server("dma-engine", "logging");
    let mut e = Eng::new(&sock, false);
    let ctl = proto::LoggingControl { page_size: 4096, num_ranges: 0, reserved: 0 };
    e.c.feature(proto::FEATURE_SET | proto::FEATURE_DMA_LOGGING_START, ctl.as_bytes(), 24).unwrap();
    let report = |c: &mut Client| -> Vec<u64> {
        let length = 4u64 << 20;
        let rep = proto::LoggingReport { iova: D, length, page_size: 4096 };
        let get = proto::FEATURE_GET | proto::FEATURE_DMA_LOGGING_REPORT;
        let d = c.feature(get, rep.as_bytes(), (8 + 24 + 8 * (length / 4096).div_ceil(64)) as u32).unwrap();
        let words: Vec<u64> = d[24..].chunks(8).map(|b| u64::from_ne_bytes(b.try_into().unwrap())).collect();
        (0..words.len() as u64 * 64).filter(|&k| words[(k / 64) as usize] & (1 << (k % 64)) != 0).collect()
    };
    assert_eq!(report(&mut e.c), Vec::<u64>::new());
    e.fill_source(3 * 4096, 1);
    // Pages 5 to 8 of the destination: its first 2 MiB leaf.
    let r = e.run(copy(S, D + 5 * 4096, 3 * 4096 + 4));
    assert_eq!(r.status, status::SUCCESS, "{r:?}");
    assert_eq!(report(&mut e.c), (0..512).collect::<Vec<u64>>());
    assert_eq!(report(&mut e.c), Vec::<u64>::new(), "a report clears what it showed");
    e.c.feature(proto::FEATURE_SET | proto::FEATURE_DMA_LOGGING_STOP, ctl.as_bytes(), 24).unwrap();
}

/// A ring in client memory whose client does not answer: the fetch is
/// tried again after each timeout, the queue does not halt, and it runs the
/// descriptor once the client answers.
#[test]
fn a_ring_in_client_memory_waits_for_a_silent_client() {
    let mut st = Stack::new("client-mem-ring-silent");
    let sock = st.server_with("dma-engine", "ring-silent", &["--dma-timeout-ms", "200"]);
    let mut e = Eng::new(&sock, true);
    let want = e.fill_source(4096, 11);
    e.c.set_dma_mode(DmaMode::Ignore);
    let comp = e.submit(copy(S, D, 4096));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        assert_eq!(e.r32(regs::QUEUE + regs::Q_STATUS) & 6, 0, "the queue halted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(e.ring_read(comp, 1)[0], status::NONE);
    e.c.set_dma_mode(DmaMode::Answer);
    match e.wait(comp) {
        Ran::Done(r) => assert_eq!(r.status, status::SUCCESS, "{r:?}"),
        Ran::Halted => panic!("the queue halted"),
    }
    assert!(e.dest(4096) == &want[..]);
}

/// A queue thread keeps its translation handle (its own IOTLB) while it
/// has work. Three descriptors are rung at once: the first copies from a
/// file region (the queue caches its translation), the second waits for
/// the client on a copy in client memory while the client unmaps the file
/// region (the server answers the unmap at once) and writes new bytes to
/// the file, and the third, run next by the same busy queue, copies from
/// the unmapped region: it faults on its source instead of reading the
/// file through the translation the queue cached.
#[test]
fn a_queue_that_cached_a_translation_faults_after_dma_unmap_instead_of_reading_the_old_memory() {
    let mut st = Stack::new("client-mem-unmap-cached");
    let sock = st.server_with("dma-engine", "unmap-cached", &["--dma-timeout-ms", "600000"]);
    let mut e = Eng::new(&sock, false);
    const FS: u64 = 0x6000_0000;
    const FD: u64 = 0x7000_0000;
    let src = GuestRam::new("unmap-src", 0x1_0000).unwrap();
    let dst = GuestRam::new("unmap-dst", 0x1_0000).unwrap();
    e.c.dma_map(RW, 0, FS, 0x1_0000, Some(src.file.as_fd())).unwrap();
    e.c.dma_map(RW, 0, FD, 0x1_0000, Some(dst.file.as_fd())).unwrap();
    src.write(0, b"before the unmap").unwrap();
    dst.write(0x1000, &[0xee; 16]).unwrap();
    let len = 256 * 1024;
    let want = e.fill_source(len, 5);

    e.c.set_dma_mode(DmaMode::Defer);
    let first = e.push(copy(FS, FD, 16));
    let held = e.push(copy(S, D, len));
    let after = e.push(copy(FS, FD + 0x1000, 16));
    e.doorbell();
    e.until_device_waits_for_the_client();
    match e.wait(first) {
        Ran::Done(r) => assert_eq!(r.status, status::SUCCESS, "{r:?}"),
        Ran::Halted => panic!("the queue halted"),
    }
    assert_eq!(dst.read(0, 16).unwrap(), b"before the unmap");
    e.c.dma_unmap(FS, 0x1_0000, 0).unwrap();
    // The file still holds bytes: a stale translation would copy them.
    src.write(0, b"read after unmap").unwrap();
    e.c.set_dma_mode(DmaMode::Answer);
    match e.wait(held) {
        Ran::Done(r) => assert_eq!(r.status, status::SUCCESS, "{r:?}"),
        Ran::Halted => panic!("the queue halted"),
    }
    assert!(e.dest(len) == &want[..]);
    match e.wait(after) {
        Ran::Done(r) => assert_eq!((r.status, r.fault_addr), (status::FAULT_SRC, FS), "{r:?}"),
        Ran::Halted => panic!("the queue halted"),
    }
    assert_eq!(dst.read(0x1000, 16).unwrap(), [0xee; 16], "the copy after the unmap wrote");
    // The queue goes on: mapped again, the file is read as it is now.
    e.c.dma_map(RW, 0, FS, 0x1_0000, Some(src.file.as_fd())).unwrap();
    let r = e.run(copy(FS, FD + 0x2000, 16));
    assert_eq!(r.status, status::SUCCESS, "{r:?}");
    assert_eq!(dst.read(0x2000, 16).unwrap(), b"read after unmap");
}
