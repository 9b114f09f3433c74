//! The `nvme` device driven over real sockets the way a guest's NVMe
//! driver drives it: the controller enabled, identified and given I/O
//! queues; data moved through PRPs and PRP lists into the backing file and
//! back; Flush, Write Zeroes and deallocation; every bad field answered
//! with the status the specification names; controller reset and
//! shutdown.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use ioasid_stack::engine::GuestRam;
use ioasid_stack::nvme::{Bell, Nvme, QueuePair};
use vfio_user_server::client::Client;
use vfio_user_server::devices::nvme::abi::{self, admin as aop, cc, csts, io as iop, reg, sc, Command, Status};
use vfio_user_server::proto::{self, irq_index, region, DMA_MAP_READ, DMA_MAP_WRITE};

const IOVA: u64 = 0x1000_0000;
const RAM: u64 = 16 << 20;
/// Guest RAM layout: the admin pair, two I/O pairs, an Identify buffer,
/// PRP list pages, data pages.
const ASQ: u64 = 0x0000;
const ACQ: u64 = 0x1000;
const SQ: [u64; 3] = [0, 0x2000, 0x4000];
const CQ: [u64; 3] = [0, 0x3000, 0x5000];
const IDBUF: u64 = 0x1_0000;
const LISTS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const BACK: u64 = 0x20_0000;
/// Namespace: 8 MiB.
const DISK: u64 = 8 << 20;
const BLOCKS: u64 = DISK / 512;
const PAGE: u64 = 4096;

struct Dev {
    d: Nvme,
    backing: PathBuf,
}

/// An `nvme` server on a fresh 8 MiB backing file, its function enabled
/// and guest RAM mapped at `IOVA`.
fn dev(st: &mut Stack, name: &str, extra: &[&str]) -> Dev {
    let backing = st.dir.join(format!("{name}.img"));
    std::fs::File::create(&backing).unwrap().set_len(DISK).unwrap();
    let mut args = vec!["--backing", backing.to_str().unwrap()];
    args.extend_from_slice(extra);
    let sock = st.server_with("nvme", name, &args);
    let ram = GuestRam::new(name, RAM).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    c.dma_map(DMA_MAP_READ | DMA_MAP_WRITE, 0, IOVA, RAM, Some(ram.file.as_fd())).unwrap();
    Dev { d: Nvme::new(c, ram, IOVA).unwrap(), backing }
}

fn cmd(opcode: u8, nsid: u32) -> Command {
    Command { opcode, nsid, ..Command::default() }
}

fn identify(cns: u32, nsid: u32) -> Command {
    let mut c = cmd(aop::IDENTIFY, nsid);
    c.prp1 = IOVA + IDBUF;
    c.cdw[0] = cns;
    c
}

fn create_cq(qid: u16, size: u32, off: u64, iv: u16) -> Command {
    let mut c = cmd(aop::CREATE_CQ, 0);
    c.prp1 = IOVA + off;
    c.cdw[0] = u32::from(qid) | ((size - 1) << 16);
    // Physically contiguous, interrupts enabled.
    c.cdw[1] = 1 | 2 | (u32::from(iv) << 16);
    c
}

fn create_sq(qid: u16, size: u32, off: u64, cqid: u16) -> Command {
    let mut c = cmd(aop::CREATE_SQ, 0);
    c.prp1 = IOVA + off;
    c.cdw[0] = u32::from(qid) | ((size - 1) << 16);
    c.cdw[1] = 1 | (u32::from(cqid) << 16);
    c
}

fn rw(opcode: u8, slba: u64, nlb: u32, prp1: u64, prp2: u64) -> Command {
    let mut c = cmd(opcode, 1);
    c.prp1 = prp1;
    c.prp2 = prp2;
    c.cdw[0] = slba as u32;
    c.cdw[1] = (slba >> 32) as u32;
    c.cdw[2] = nlb - 1;
    c
}

fn ok(c: &abi::Completion) {
    assert_eq!(c.status, sc::SUCCESS, "command {} failed: {:?}", c.cid, c);
}

fn status_of(d: &mut Nvme, q: &mut QueuePair, c: Command) -> Status {
    d.run(q, c, Bell::Register).unwrap().status
}

/// The data pointer of a transfer of `len` bytes starting `first` bytes
/// into the first of `pages` (guest RAM offsets of page-aligned pages, in
/// transfer order): PRP1, PRP2 and the list written at `list_off` (a
/// list that reaches its page's end chains to the next page).
fn prps(d: &Nvme, pages: &[u64], first: u64, len: u64, list_off: u64) -> (u64, u64) {
    let prp1 = IOVA + pages[0] + first;
    let rest = len.saturating_sub(PAGE - first).div_ceil(PAGE) as usize;
    assert!(rest < pages.len());
    match rest {
        0 => (prp1, 0),
        1 => (prp1, IOVA + pages[1]),
        _ => {
            let mut at = list_off;
            for (k, p) in pages[1..=rest].iter().enumerate() {
                // The last slot of a list page points to the next one,
                // unless it holds the very last entry.
                if at % PAGE == PAGE - 8 && k + 1 < rest {
                    let next = (at + 8).next_multiple_of(PAGE) + PAGE;
                    d.ram.write(at, &(IOVA + next).to_le_bytes()).unwrap();
                    at = next;
                }
                d.ram.write(at, &(IOVA + p).to_le_bytes()).unwrap();
                at += 8;
            }
            (prp1, IOVA + list_off)
        }
    }
}

/// The bytes of a transfer gathered from guest RAM in PRP order.
fn gather(d: &Nvme, pages: &[u64], first: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut off = first;
    for p in pages {
        if out.len() as u64 == len {
            break;
        }
        let n = (PAGE - off).min(len - out.len() as u64);
        out.extend(d.ram.read(p + off, n as usize).unwrap());
        off = 0;
    }
    out
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len).map(|i| (i as u32 ^ seed).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect()
}

fn file_bytes(path: &PathBuf, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, off).unwrap();
    b
}

/// Enables the controller, sets the number of queues and creates I/O
/// pairs 1 and 2 (64 entries, MSI-X vectors 1 and 2).
fn bring_up(d: &mut Nvme) -> (QueuePair, QueuePair) {
    d.enable(64, ASQ, ACQ).unwrap();
    let c = d.admin(set_queues(2)).unwrap();
    ok(&c);
    let mut pairs = Vec::new();
    for q in 1..=2u16 {
        let i = usize::from(q);
        // A new CQ starts with every phase tag clear, as a driver zeroes it.
        d.ram.write(CQ[i], &[0u8; 64 * 16]).unwrap();
        ok(&d.admin(create_cq(q, 64, CQ[i], q)).unwrap());
        ok(&d.admin(create_sq(q, 64, SQ[i], q)).unwrap());
        pairs.push(QueuePair::new(q, 64, SQ[i], CQ[i]));
    }
    let b = pairs.pop().unwrap();
    let a = pairs.pop().unwrap();
    (a, b)
}

fn set_queues(n: u32) -> Command {
    let mut c = cmd(aop::SET_FEATURES, 0);
    c.cdw[0] = u32::from(abi::feat::NUM_QUEUES);
    c.cdw[1] = (n - 1) | ((n - 1) << 16);
    c
}

#[test]
fn a_driver_enables_identifies_and_moves_data_through_prp_lists() {
    let mut st = Stack::new("nvme-io");
    let Dev { mut d, backing } = dev(&mut st, "io", &[]);
    // The PCI function: NVM Express class, BAR 0 with the doorbell page
    // offered for mmap.
    let class = d.client.region_read(region::CONFIG, 8, 4).unwrap();
    assert_eq!(&class[1..4], &[0x02, 0x08, 0x01], "class code 01:08:02");
    assert!(d.has_mmap_bells());

    let cap = d.read64(reg::CAP).unwrap();
    assert_eq!(cap & 0xffff, u64::from(abi::MAX_QUEUE_ENTRIES - 1), "CAP.MQES");
    assert_eq!(cap >> 16 & 1, 1, "CAP.CQR");
    assert_eq!(cap >> 37 & 1, 1, "CAP.CSS: NVM command set");
    assert_eq!(d.read32(reg::VS).unwrap(), 0x0001_0400);
    assert_eq!(d.read32(reg::CSTS).unwrap() & csts::RDY, 0);

    // MSI-X: vector 0 for the admin CQ, 1 and 2 for the I/O CQs.
    let fds: Vec<_> = (0..3).map(|_| vfio_user_server::irq::eventfd().unwrap()).collect();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    d.client.set_irqs(irq_index::MSIX, trig, 0, 3, &[], &borrowed).unwrap();

    d.enable(64, ASQ, ACQ).unwrap();
    // Identify controller.
    ok(&d.admin(identify(1, 0)).unwrap());
    let id = d.ram.read(IDBUF, 4096).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x1b36, "PCI vendor id");
    assert!(id[24..64].starts_with(b"ioasid-stack NVMe"), "model number");
    assert_eq!(u32::from_le_bytes([id[516], id[517], id[518], id[519]]), 1, "NN");
    assert_eq!((id[512], id[513]), (0x66, 0x44), "SQES and CQES");
    assert_eq!(id[77], abi::MDTS);
    assert!(vfio_user_server::irq::wait_eventfd(&fds[0], Duration::from_secs(5)) >= 1, "no admin interrupt");
    // Identify namespace: 8 MiB of 512-byte blocks, one LBA format.
    ok(&d.admin(identify(0, 1)).unwrap());
    let ns = d.ram.read(IDBUF, 4096).unwrap();
    let nsze = u64::from_le_bytes(ns[0..8].try_into().unwrap());
    assert_eq!(nsze, BLOCKS);
    assert_eq!(ns[25], 0, "NLBAF");
    assert_eq!((u32::from_le_bytes(ns[128..132].try_into().unwrap()) >> 16) & 0xff, 9, "LBADS");
    // Active namespace list: namespace 1 only.
    ok(&d.admin(identify(2, 0)).unwrap());
    let list = d.ram.read(IDBUF, 8).unwrap();
    assert_eq!(list, [1, 0, 0, 0, 0, 0, 0, 0]);
    // Namespace identification descriptors: EUI-64 first.
    ok(&d.admin(identify(3, 1)).unwrap());
    let desc = d.ram.read(IDBUF, 4).unwrap();
    assert_eq!((desc[0], desc[1]), (1, 8));
    // Command set independent namespace data: ready.
    ok(&d.admin(identify(8, 1)).unwrap());
    assert_eq!(d.ram.read(IDBUF + 14, 1).unwrap()[0] & 1, 1, "NSTAT: ready");
    assert_eq!(d.admin(identify(8, 3)).unwrap().status, sc::INVALID_NAMESPACE);
    // Unknown CNS and namespaces.
    assert_eq!(d.admin(identify(0x55, 0)).unwrap().status, sc::INVALID_FIELD);
    assert_eq!(d.admin(identify(0, 2)).unwrap().status, sc::INVALID_NAMESPACE);

    // Number of queues, then two I/O queue pairs.
    let c = d.admin(set_queues(2)).unwrap();
    ok(&c);
    assert!(c.dw0 & 0xffff >= 1 && c.dw0 >> 16 >= 1, "fewer than 2 queue pairs allocated: {:#x}", c.dw0);
    for q in 1..=2u16 {
        let i = usize::from(q);
        ok(&d.admin(create_cq(q, 64, CQ[i], q)).unwrap());
        ok(&d.admin(create_sq(q, 64, SQ[i], q)).unwrap());
    }
    let mut q1 = QueuePair::new(1, 64, SQ[1], CQ[1]);
    let mut q2 = QueuePair::new(2, 64, SQ[2], CQ[2]);

    // 68 KiB written from 18 scattered pages, starting 0x200 into the
    // first: PRP1 plus a list of 17 entries.
    let len = 68 * 1024u64;
    let pages: Vec<u64> = (0..18u64).map(|k| DATA + ((k * 7) % 18) * PAGE).collect();
    let first = 0x200;
    let data = pattern((18 * PAGE) as usize, 1);
    for (k, p) in pages.iter().enumerate() {
        d.ram.write(*p, &data[k * PAGE as usize..(k + 1) * PAGE as usize]).unwrap();
    }
    let want = gather(&d, &pages, first, len);
    let (p1, p2) = prps(&d, &pages, first, len, LISTS);
    let slba = 100;
    ok(&d.run(&mut q1, rw(iop::WRITE, slba, (len / 512) as u32, p1, p2), Bell::Register).unwrap());
    assert!(vfio_user_server::irq::wait_eventfd(&fds[1], Duration::from_secs(5)) >= 1, "no interrupt on vector 1");
    assert!(file_bytes(&backing, slba * 512, len as usize) == want, "the backing file does not hold the write");

    // Read back on the other pair into other scattered pages, with a PRP
    // list that starts 16 bytes before its page ends (one entry, then a
    // pointer to the next list page), rung through the mapped doorbells.
    let back: Vec<u64> = (0..18u64).map(|k| BACK + ((k * 5) % 18) * PAGE).collect();
    let (p1, p2) = prps(&d, &back, first, len, LISTS + 0x2000 - 16);
    ok(&d.run(&mut q2, rw(iop::READ, slba, (len / 512) as u32, p1, p2), Bell::Mmap).unwrap());
    assert!(gather(&d, &back, first, len) == want, "the data read back differs");
    assert!(vfio_user_server::irq::wait_eventfd(&fds[2], Duration::from_secs(5)) >= 1, "no interrupt on vector 2");

    // Two pages: PRP2 is the second page itself.
    let two = pattern(8192, 2);
    d.ram.write(DATA, &two).unwrap();
    ok(&d.run(&mut q1, rw(iop::WRITE, 0, 16, IOVA + DATA, IOVA + DATA + 0x5000), Bell::Register).unwrap());
    let mut expect = two[..4096].to_vec();
    expect.extend(d.ram.read(DATA + 0x5000, 4096).unwrap());
    assert!(file_bytes(&backing, 0, 8192) == expect);

    // Flush.
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 0xffff_ffff), Bell::Register).unwrap());

    // Write Zeroes over 8 blocks in the middle of the written range.
    let mut wz = rw(iop::WRITE_ZEROES, slba + 8, 8, 0, 0);
    wz.prp1 = 0;
    ok(&d.run(&mut q2, wz, Bell::Register).unwrap());
    let f = file_bytes(&backing, slba * 512, len as usize);
    assert!(f[4096..8192].iter().all(|b| *b == 0), "Write Zeroes left data");
    assert!(f[..4096] == want[..4096] && f[8192..] == want[8192..], "Write Zeroes touched other blocks");

    // Dataset Management, deallocate: two ranges; they read as zeroes.
    let ranges = [(slba + 40, 16u32), (slba + 120, 8u32)];
    let mut b = Vec::new();
    for (s, n) in ranges {
        b.extend(0u32.to_le_bytes());
        b.extend(n.to_le_bytes());
        b.extend(s.to_le_bytes());
    }
    d.ram.write(DATA, &b).unwrap();
    let mut dsm = cmd(iop::DSM, 1);
    dsm.prp1 = IOVA + DATA;
    dsm.cdw[0] = 1;
    dsm.cdw[1] = 1 << 2;
    ok(&d.run(&mut q1, dsm, Bell::Register).unwrap());
    for (s, n) in ranges {
        let z = file_bytes(&backing, s * 512, n as usize * 512);
        assert!(z.iter().all(|b| *b == 0), "deallocated blocks at {s} are not zero");
    }
    let f = file_bytes(&backing, (slba + 56) * 512, 512);
    assert!(f == want[56 * 512..57 * 512], "deallocation touched a block after its range");
    // And the read path sees them as zeroes too.
    d.ram.write(BACK, &[0xaa; 4096]).unwrap();
    ok(&d.run(&mut q2, rw(iop::READ, slba + 40, 8, IOVA + BACK, 0), Bell::Register).unwrap());
    assert!(d.ram.read(BACK, 4096).unwrap().iter().all(|b| *b == 0));

    // SMART log: data units written counted.
    let mut glp = cmd(aop::GET_LOG_PAGE, 0xffff_ffff);
    glp.prp1 = IOVA + IDBUF;
    glp.cdw[0] = u32::from(abi::log::SMART) | ((512 / 4 - 1) << 16);
    ok(&d.admin(glp).unwrap());
    let smart = d.ram.read(IDBUF, 512).unwrap();
    assert!(u64::from_le_bytes(smart[48..56].try_into().unwrap()) >= 1, "data units written");
    assert!(u64::from_le_bytes(smart[80..88].try_into().unwrap()) >= 2, "host write commands");
}

#[test]
fn every_bad_field_gets_the_status_the_specification_names() {
    let mut st = Stack::new("nvme-bad");
    let Dev { mut d, .. } = dev(&mut st, "bad", &[]);
    let (mut q1, _q2) = bring_up(&mut d);
    let mut admin = d.admin.take().unwrap();

    // Queue creation: ids, sizes, alignment, vectors, contiguity, the CQ.
    assert_eq!(status_of(&mut d, &mut admin, create_cq(0, 64, 0x6000, 0)), sc::INVALID_QID);
    assert_eq!(status_of(&mut d, &mut admin, create_cq(1, 64, 0x6000, 0)), sc::INVALID_QID, "CQ 1 exists");
    assert_eq!(status_of(&mut d, &mut admin, create_cq(abi::MAX_IO_QUEUES + 1, 64, 0x6000, 0)), sc::INVALID_QID);
    assert_eq!(status_of(&mut d, &mut admin, create_cq(3, 1, 0x6000, 0)), sc::INVALID_QSIZE, "one entry");
    assert_eq!(status_of(&mut d, &mut admin, create_cq(3, 0x1_0000, 0x6000, 0)), sc::INVALID_QSIZE);
    assert_eq!(status_of(&mut d, &mut admin, create_cq(3, abi::MAX_QUEUE_ENTRIES + 1, 0x6000, 0)), sc::INVALID_QSIZE);
    assert_eq!(status_of(&mut d, &mut admin, create_cq(3, 64, 0x6100, 0)), sc::PRP_OFFSET_INVALID);
    assert_eq!(status_of(&mut d, &mut admin, create_cq(3, 64, 0x6000, abi::VECTORS)), sc::INVALID_VECTOR);
    let mut scattered = create_cq(3, 64, 0x6000, 0);
    scattered.cdw[1] &= !1;
    assert_eq!(status_of(&mut d, &mut admin, scattered), sc::INVALID_FIELD);
    assert_eq!(status_of(&mut d, &mut admin, create_sq(3, 64, 0x7000, 3)), sc::CQ_INVALID, "no CQ 3");
    assert_eq!(status_of(&mut d, &mut admin, create_sq(3, 64, 0x7000, 0)), sc::CQ_INVALID, "the admin CQ");
    assert_eq!(status_of(&mut d, &mut admin, create_sq(1, 64, 0x7000, 1)), sc::INVALID_QID, "SQ 1 exists");
    assert_eq!(status_of(&mut d, &mut admin, create_sq(3, 0x1_0000, 0x7000, 1)), sc::INVALID_QSIZE);
    // Deletion: the admin queues, queues that do not exist, a CQ in use.
    let del = |op: u8, q: u32| {
        let mut c = cmd(op, 0);
        c.cdw[0] = q;
        c
    };
    assert_eq!(status_of(&mut d, &mut admin, del(aop::DELETE_SQ, 0)), sc::INVALID_QID);
    assert_eq!(status_of(&mut d, &mut admin, del(aop::DELETE_SQ, 7)), sc::INVALID_QID);
    assert_eq!(status_of(&mut d, &mut admin, del(aop::DELETE_CQ, 0)), sc::INVALID_QID);
    assert_eq!(status_of(&mut d, &mut admin, del(aop::DELETE_CQ, 2)), sc::INVALID_QUEUE_DELETION);
    // Opcodes, features, log pages.
    assert_eq!(status_of(&mut d, &mut admin, cmd(0x7f, 0)), sc::INVALID_OPCODE);
    let mut gf = cmd(aop::GET_FEATURES, 0);
    gf.cdw[0] = 0x7e;
    assert_eq!(status_of(&mut d, &mut admin, gf), sc::INVALID_FIELD);
    let mut glp = cmd(aop::GET_LOG_PAGE, 0);
    glp.prp1 = IOVA + IDBUF;
    glp.cdw[0] = 0x70 | (127 << 16);
    assert_eq!(status_of(&mut d, &mut admin, glp), sc::INVALID_LOG_PAGE);
    // Deleting SQ 2 and then CQ 2 works; SQ 2's doorbell then does nothing.
    assert_eq!(status_of(&mut d, &mut admin, del(aop::DELETE_SQ, 2)), sc::SUCCESS);
    assert_eq!(status_of(&mut d, &mut admin, del(aop::DELETE_CQ, 2)), sc::SUCCESS);

    // I/O: opcodes, namespaces, ranges, transfer size, PRP offsets, SGLs.
    let io = |d: &mut Nvme, q: &mut QueuePair, c: Command| status_of(d, q, c);
    assert_eq!(io(&mut d, &mut q1, cmd(0x7f, 1)), sc::INVALID_OPCODE);
    let mut wrong_ns = rw(iop::READ, 0, 1, IOVA + DATA, 0);
    wrong_ns.nsid = 2;
    assert_eq!(io(&mut d, &mut q1, wrong_ns), sc::INVALID_NAMESPACE);
    wrong_ns.nsid = 0;
    assert_eq!(io(&mut d, &mut q1, wrong_ns), sc::INVALID_NAMESPACE);
    assert_eq!(io(&mut d, &mut q1, rw(iop::READ, BLOCKS, 1, IOVA + DATA, 0)), sc::LBA_RANGE);
    assert_eq!(io(&mut d, &mut q1, rw(iop::WRITE, BLOCKS - 1, 2, IOVA + DATA, 0)), sc::LBA_RANGE);
    assert_eq!(io(&mut d, &mut q1, rw(iop::READ, u64::MAX, 1, IOVA + DATA, 0)), sc::LBA_RANGE);
    assert_eq!(io(&mut d, &mut q1, rw(iop::WRITE_ZEROES, BLOCKS - 4, 8, 0, 0)), sc::LBA_RANGE);
    assert_eq!(io(&mut d, &mut q1, rw(iop::READ, 0, 2048, IOVA + DATA, IOVA + LISTS)), sc::INVALID_FIELD, "past MDTS");
    assert_eq!(io(&mut d, &mut q1, rw(iop::READ, 0, 1, IOVA + DATA + 2, 0)), sc::PRP_OFFSET_INVALID);
    assert_eq!(io(&mut d, &mut q1, rw(iop::READ, 0, 16, IOVA + DATA, IOVA + DATA + 0x1800)), sc::PRP_OFFSET_INVALID);
    d.ram.write(LISTS, &(IOVA + DATA + 0x10).to_le_bytes()).unwrap();
    assert_eq!(io(&mut d, &mut q1, rw(iop::READ, 0, 24, IOVA + DATA, IOVA + LISTS)), sc::PRP_OFFSET_INVALID);
    let mut sgl = rw(iop::READ, 0, 1, IOVA + DATA, 0);
    sgl.psdt = 1;
    assert_eq!(io(&mut d, &mut q1, sgl), sc::INVALID_FIELD);
    // A buffer outside every mapping: a data transfer error, nothing else.
    assert_eq!(io(&mut d, &mut q1, rw(iop::READ, 0, 1, 0x7000_0000, 0)), sc::DATA_TRANSFER);
    let mut dsm = cmd(iop::DSM, 1);
    dsm.prp1 = IOVA + DATA;
    dsm.cdw[1] = 1 << 2;
    d.ram.write(DATA, &[0, 0, 0, 0, 8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).unwrap();
    assert_eq!(io(&mut d, &mut q1, dsm), sc::LBA_RANGE);
    // The queue still works.
    assert_eq!(io(&mut d, &mut q1, rw(iop::READ, 0, 1, IOVA + DATA, 0)), sc::SUCCESS);
    // The Error Information log recorded the failures.
    let mut glp = cmd(aop::GET_LOG_PAGE, 0);
    glp.prp1 = IOVA + IDBUF;
    glp.cdw[0] = u32::from(abi::log::ERROR) | ((64 / 4 - 1) << 16);
    assert_eq!(status_of(&mut d, &mut admin, glp), sc::SUCCESS);
    let e = d.ram.read(IDBUF, 64).unwrap();
    assert!(u64::from_le_bytes(e[0..8].try_into().unwrap()) >= 20, "error count");
    assert_eq!(u16::from_le_bytes([e[8], e[9]]), 1, "the newest error came from SQ 1");
}

#[test]
fn read_only_namespace_refuses_writes() {
    let mut st = Stack::new("nvme-ro");
    let Dev { mut d, .. } = dev(&mut st, "ro", &["--read-only"]);
    let (mut q1, _) = bring_up(&mut d);
    assert_eq!(status_of(&mut d, &mut q1, rw(iop::WRITE, 0, 1, IOVA + DATA, 0)), sc::WRITE_PROTECTED);
    assert_eq!(status_of(&mut d, &mut q1, rw(iop::WRITE_ZEROES, 0, 1, 0, 0)), sc::WRITE_PROTECTED);
    assert_eq!(status_of(&mut d, &mut q1, rw(iop::READ, 0, 1, IOVA + DATA, 0)), sc::SUCCESS);
    ok(&d.admin(identify(0, 1)).unwrap());
    assert_eq!(d.ram.read(IDBUF + 99, 1).unwrap()[0] & 1, 1, "NSATTR write protected");
}

#[test]
fn reset_deletes_every_queue_and_a_new_enable_starts_afresh() {
    let mut st = Stack::new("nvme-reset");
    let Dev { mut d, backing } = dev(&mut st, "reset", &[]);
    let (mut q1, _) = bring_up(&mut d);
    d.ram.write(DATA, &pattern(4096, 3)).unwrap();
    ok(&d.run(&mut q1, rw(iop::WRITE, 8, 8, IOVA + DATA, 0), Bell::Register).unwrap());

    // CC.EN 1 -> 0: RDY clears; AQA, ASQ and ACQ stay.
    d.write32(reg::CC, Nvme::cc_enable() & !cc::EN).unwrap();
    d.wait_csts(csts::RDY, 0, "RDY 0").unwrap();
    assert_eq!(d.read32(reg::AQA).unwrap(), 63 | (63 << 16));
    // A command left in SQ 1 before the reset never runs: the queue is gone.
    d.ram.write(DATA, &pattern(4096, 4)).unwrap();
    d.push(&mut q1, rw(iop::WRITE, 8, 8, IOVA + DATA, 0)).unwrap();
    d.ring(&mut q1, Bell::Register).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!d.has_entry(&q1).unwrap(), "a queue deleted by the reset completed a command");
    assert!(file_bytes(&backing, 8 * 512, 4096) == pattern(4096, 3));

    // Enable again: queues are created afresh (SQ 1 may be created again).
    let (mut q1, _) = bring_up(&mut d);
    ok(&d.admin(identify(1, 0)).unwrap());
    d.ram.write(DATA, &pattern(4096, 5)).unwrap();
    ok(&d.run(&mut q1, rw(iop::WRITE, 8, 8, IOVA + DATA, 0), Bell::Register).unwrap());
    assert!(file_bytes(&backing, 8 * 512, 4096) == pattern(4096, 5));

    // Shutdown: SHST goes to complete, RDY stays.
    d.write32(reg::CC, Nvme::cc_enable() | (1 << cc::SHN_SHIFT)).unwrap();
    let v = d.wait_csts(3 << csts::SHST_SHIFT, csts::SHST_COMPLETE, "SHST complete").unwrap();
    assert_eq!(v & csts::RDY, csts::RDY);
    // A reset after the shutdown, and the controller is usable again.
    let (mut q1, _) = bring_up(&mut d);
    assert_eq!(d.read32(reg::CSTS).unwrap() & (3 << csts::SHST_SHIFT), 0);
    ok(&d.run(&mut q1, rw(iop::READ, 8, 8, IOVA + BACK, 0), Bell::Register).unwrap());
    assert!(d.ram.read(BACK, 4096).unwrap() == pattern(4096, 5));

    // A bad admin queue configuration: CFS, not RDY.
    d.write32(reg::CC, 0).unwrap();
    d.wait_csts(csts::RDY, 0, "RDY 0").unwrap();
    d.write32(reg::AQA, 0).unwrap();
    d.write32(reg::CC, Nvme::cc_enable()).unwrap();
    let v = d.read32(reg::CSTS).unwrap();
    assert_eq!(v & (csts::RDY | csts::CFS), csts::CFS, "an admin queue of one entry was accepted");
    // A function level reset (DEVICE_RESET) clears everything.
    d.client.reset().unwrap();
    d.client.enable_function().unwrap();
    assert_eq!(d.read32(reg::CSTS).unwrap(), 0);
    assert_eq!(d.read32(reg::AQA).unwrap(), 0);
    let (mut q1, _) = bring_up(&mut d);
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
}

#[test]
fn without_msix_completions_interrupt_through_intx_until_consumed() {
    let mut st = Stack::new("nvme-intx");
    let Dev { mut d, .. } = dev(&mut st, "intx", &["--no-msix"]);
    let intx = vfio_user_server::irq::eventfd().unwrap();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    d.client.set_irqs(irq_index::INTX, trig, 0, 1, &[], &[intx.as_fd()]).unwrap();
    d.enable(64, ASQ, ACQ).unwrap();
    let mut admin = d.admin.take().unwrap();
    d.push(&mut admin, identify(1, 0)).unwrap();
    d.ring(&mut admin, Bell::Register).unwrap();
    d.wait_entry(&admin, Duration::from_secs(5)).unwrap();
    assert_eq!(vfio_user_server::irq::wait_eventfd(&intx, Duration::from_secs(5)), 1);
    let status_bit = |c: &mut Client| {
        let b = c.region_read(region::CONFIG, 6, 2).unwrap();
        u16::from_le_bytes([b[0], b[1]]) & (1 << 3) != 0
    };
    assert!(status_bit(&mut d.client), "INTx is not asserted with an entry unconsumed");
    // Consuming the entry (the CQ head doorbell) lowers the line.
    d.reap(&mut admin, Duration::from_secs(5), Bell::Register).unwrap();
    assert!(!status_bit(&mut d.client), "INTx stays asserted after the CQ was consumed");
    // INTMS masks it: a completion with the mask set leaves the line low.
    d.write32(reg::INTMS, 1).unwrap();
    d.push(&mut admin, identify(1, 0)).unwrap();
    d.ring(&mut admin, Bell::Register).unwrap();
    d.wait_entry(&admin, Duration::from_secs(5)).unwrap();
    assert!(!status_bit(&mut d.client), "INTx asserted while INTMS masks it");
    // INTMC unmasks: the entry still unconsumed raises it.
    d.write32(reg::INTMC, 1).unwrap();
    assert!(status_bit(&mut d.client), "INTMC did not raise INTx for an unconsumed entry");
    d.reap(&mut admin, Duration::from_secs(5), Bell::Register).unwrap();
    assert!(!status_bit(&mut d.client));
}

#[test]
fn asynchronous_events_features_abort_and_a_full_completion_queue() {
    let mut st = Stack::new("nvme-aer");
    let Dev { mut d, .. } = dev(&mut st, "aer", &[]);
    let (mut q1, _) = bring_up(&mut d);
    let mut admin = d.admin.take().unwrap();

    // Features read back what was set; Number of Queues is what was
    // allocated; unknown or saveable ones are refused.
    let feature = |fid: u8, v: u32, set: bool| {
        let mut c = cmd(if set { aop::SET_FEATURES } else { aop::GET_FEATURES }, 0);
        c.cdw[0] = u32::from(fid);
        c.cdw[1] = v;
        c
    };
    ok(&d.run(&mut admin, feature(abi::feat::VOLATILE_WC, 0, true), Bell::Register).unwrap());
    assert_eq!(d.run(&mut admin, feature(abi::feat::VOLATILE_WC, 0, false), Bell::Register).unwrap().dw0, 0);
    ok(&d.run(&mut admin, feature(abi::feat::VOLATILE_WC, 1, true), Bell::Register).unwrap());
    assert_eq!(d.run(&mut admin, feature(abi::feat::VOLATILE_WC, 0, false), Bell::Register).unwrap().dw0, 1);
    ok(&d.run(&mut admin, feature(abi::feat::IRQ_COALESCE, 0x0a05, true), Bell::Register).unwrap());
    assert_eq!(d.run(&mut admin, feature(abi::feat::IRQ_COALESCE, 0, false), Bell::Register).unwrap().dw0, 0x0a05);
    let nq = d.run(&mut admin, feature(abi::feat::NUM_QUEUES, 0, false), Bell::Register).unwrap();
    assert_eq!(nq.dw0, u32::from(abi::MAX_IO_QUEUES - 1) * 0x1_0001);
    let mut saved = feature(abi::feat::ARBITRATION, 0, true);
    saved.cdw[0] |= 1 << 31;
    assert_eq!(status_of(&mut d, &mut admin, saved), sc::FEATURE_NOT_SAVEABLE);
    assert_eq!(status_of(&mut d, &mut admin, feature(abi::feat::NUM_QUEUES, 0xffff, true)), sc::INVALID_FIELD);
    // Abort: nothing is aborted once fetched (dword 0 bit 0 set).
    let mut abort = cmd(aop::ABORT, 0);
    abort.cdw[0] = 1 | (5 << 16);
    let c = d.run(&mut admin, abort, Bell::Register).unwrap();
    assert_eq!((c.status, c.dw0 & 1), (sc::SUCCESS, 1));

    // An Asynchronous Event Request stays outstanding until an event: an
    // SQ doorbell written past its queue (Invalid Doorbell Write Value).
    let aer_cid = d.push(&mut admin, cmd(aop::ASYNC_EVENT, 0)).unwrap();
    d.ring(&mut admin, Bell::Register).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!d.has_entry(&admin).unwrap(), "an Asynchronous Event Request completed without an event");
    d.write32(Nvme::bell_offset(1, false), 64).unwrap();
    let c = d.reap(&mut admin, Duration::from_secs(5), Bell::Register).unwrap();
    assert_eq!((c.cid, c.status), (aer_cid, sc::SUCCESS));
    assert_eq!(c.dw0 & 7, u32::from(abi::aer::TYPE_ERROR));
    assert_eq!((c.dw0 >> 8) & 0xff, u32::from(abi::aer::INFO_INVALID_DOORBELL_VALUE));
    assert_eq!((c.dw0 >> 16) & 0xff, u32::from(abi::log::ERROR));
    // The queue goes on once its doorbell is sane again.
    d.write32(Nvme::bell_offset(1, false), 0).unwrap();
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
    // More than AERL + 1 outstanding requests: the limit status.
    for _ in 0..=abi::AERL {
        d.push(&mut admin, cmd(aop::ASYNC_EVENT, 0)).unwrap();
    }
    d.ring(&mut admin, Bell::Register).unwrap();
    assert_eq!(status_of(&mut d, &mut admin, cmd(aop::ASYNC_EVENT, 0)), sc::AER_LIMIT);

    // A completion queue of two entries holds one completion: the second
    // command's completion waits until the host consumes the first.
    d.ram.write(0x6000, &[0u8; 32]).unwrap();
    ok(&d.run(&mut admin, create_cq(3, 2, 0x6000, 0), Bell::Register).unwrap());
    ok(&d.run(&mut admin, create_sq(3, 8, 0x7000, 3), Bell::Register).unwrap());
    let mut q3 = QueuePair::new(3, 2, 0x7000, 0x6000);
    // The driver's SQ is 8 entries; its CQ 2.
    let mut q3s = QueuePair::new(3, 8, 0x7000, 0x6000);
    for _ in 0..3 {
        d.push(&mut q3s, cmd(iop::FLUSH, 1)).unwrap();
    }
    d.ring(&mut q3s, Bell::Mmap).unwrap();
    let first = d.wait_entry(&q3, Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let again = d.wait_entry(&q3, Duration::from_secs(5)).unwrap();
    assert_eq!(first, again);
    for k in 0..3u16 {
        let c = d.reap(&mut q3, Duration::from_secs(5), Bell::Mmap).unwrap();
        assert_eq!((c.cid, c.status, c.sq_id), (k, sc::SUCCESS, 3));
    }
    assert!(!d.has_entry(&q3).unwrap());
}

#[test]
fn shadow_doorbells_carry_submissions_without_register_writes() {
    const SHADOW: u64 = 0x8000;
    const EVENTIDX: u64 = 0x9000;
    let mut st = Stack::new("nvme-dbbuf");
    let Dev { mut d, backing } = dev(&mut st, "dbbuf", &[]);
    // MSI-X, as Linux uses it: completion queue heads need no register
    // write (with INTx they do, to lower the line).
    let fds: Vec<_> = (0..3).map(|_| vfio_user_server::irq::eventfd().unwrap()).collect();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    d.client.set_irqs(irq_index::MSIX, trig, 0, 3, &[], &borrowed).unwrap();
    d.enable(64, ASQ, ACQ).unwrap();
    ok(&d.admin(identify(1, 0)).unwrap());
    let id = d.ram.read(IDBUF + 256, 2).unwrap();
    assert_ne!(u16::from_le_bytes([id[0], id[1]]) & (1 << 8), 0, "OACS: Doorbell Buffer Config");
    ok(&d.admin(set_queues(2)).unwrap());
    // Buffers not page aligned: Invalid Field in Command.
    let dbbuf = |db: u64, ei: u64| {
        let mut c = cmd(aop::DBBUF_CONFIG, 0);
        c.prp1 = IOVA + db;
        c.prp2 = IOVA + ei;
        c
    };
    assert_eq!(d.admin(dbbuf(SHADOW + 8, EVENTIDX)).unwrap().status, sc::INVALID_FIELD);
    assert_eq!(d.admin(dbbuf(SHADOW, EVENTIDX + 0x800)).unwrap().status, sc::INVALID_FIELD);
    d.ram.write(SHADOW, &[0u8; 4096]).unwrap();
    d.ram.write(EVENTIDX, &[0u8; 4096]).unwrap();
    ok(&d.admin(dbbuf(SHADOW, EVENTIDX)).unwrap());
    d.dbbuf = Some((SHADOW, EVENTIDX));
    let mut pairs = Vec::new();
    for q in 1..=2u16 {
        let i = usize::from(q);
        d.ram.write(CQ[i], &[0u8; 64 * 16]).unwrap();
        ok(&d.admin(create_cq(q, 64, CQ[i], q)).unwrap());
        ok(&d.admin(create_sq(q, 64, SQ[i], q)).unwrap());
        pairs.push(QueuePair::new(q, 64, SQ[i], CQ[i]));
    }
    let mut q2 = pairs.pop().unwrap();
    let mut q1 = pairs.pop().unwrap();

    // 100 writes and reads (the queues wrap) rung as Linux rings them.
    for k in 0..100u64 {
        let data = pattern(4096, k as u32);
        d.ram.write(DATA, &data).unwrap();
        ok(&d.run(&mut q1, rw(iop::WRITE, k * 8, 8, IOVA + DATA, 0), Bell::Shadow).unwrap());
        ok(&d.run(&mut q2, rw(iop::READ, k * 8, 8, IOVA + BACK, 0), Bell::Shadow).unwrap());
        assert!(d.ram.read(BACK, 4096).unwrap() == data, "round {k}");
    }
    assert!(file_bytes(&backing, 99 * 4096, 4096) == pattern(4096, 99));

    // Once the queue's thread is idle it sets SQ 1's EventIdx to the tail
    // it consumed: the next submission rings the register, once.
    let ei_of = |d: &Nvme, q: u16| {
        let b = d.ram.read(EVENTIDX + u64::from(q) * 8, 4).unwrap();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    let t0 = std::time::Instant::now();
    while ei_of(&d, 1) != 100 % 64 {
        assert!(t0.elapsed() < Duration::from_secs(10), "SQ 1's EventIdx stays {}", ei_of(&d, 1));
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = d.register_rings;
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 1), Bell::Shadow).unwrap());
    assert_eq!(d.register_rings - before, 1, "one register write for the SQ, none for the CQ head");

    // A submission written only to the shadow doorbell runs too (the
    // thread reads the shadow doorbell whenever it polls).
    d.ram.write(DATA, &pattern(4096, 500)).unwrap();
    d.push(&mut q1, rw(iop::WRITE, 0, 8, IOVA + DATA, 0)).unwrap();
    let tail = (100 + 2) % 64;
    d.ram.write(SHADOW + 8, &(tail as u32).to_le_bytes()).unwrap();
    let c = d.wait_entry(&q1, Duration::from_secs(10)).unwrap();
    ok(&c);
    assert!(file_bytes(&backing, 0, 4096) == pattern(4096, 500));

    // A reset forgets the buffers: queues created afterwards use their
    // registers.
    d.write32(reg::CC, 0).unwrap();
    d.wait_csts(csts::RDY, 0, "RDY 0").unwrap();
    d.dbbuf = None;
    let (mut q1, _) = bring_up(&mut d);
    d.ram.write(SHADOW + 8, &[0xff; 4]).unwrap();
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
}

#[test]
fn data_in_client_memory_moves_and_a_reset_never_waits_for_the_client() {
    use vfio_user_server::client::DmaMode;
    // Guest RAM without an fd (QEMU's default RAM): the data buffers and
    // a PRP list are reached through the client; the queues stay in the
    // memfd.
    const CMEM: u64 = 0x4000_0000;
    const CLEN: usize = 1 << 20;
    let mut st = Stack::new("nvme-cmem");
    let Dev { mut d, backing } = dev(&mut st, "cmem", &[]);
    d.client.add_message_memory(CMEM, vec![0; CLEN]);
    d.client.dma_map(DMA_MAP_READ | DMA_MAP_WRITE, 0, CMEM, CLEN as u64, None).unwrap();
    d.pump = true;
    let (mut q1, mut q2) = bring_up(&mut d);

    // 40 KiB from ten pages of client memory, the list there too.
    let len = 40 * 1024usize;
    let data = pattern(len, 77);
    let pages: Vec<u64> = (0..10u64).map(|k| CMEM + 0x1_0000 + ((k * 3) % 10) * PAGE).collect();
    {
        let m = d.client.message_memory_mut(CMEM).unwrap();
        for (k, p) in pages.iter().enumerate() {
            let o = (p - CMEM) as usize;
            m[o..o + PAGE as usize].copy_from_slice(&data[k * PAGE as usize..(k + 1) * PAGE as usize]);
        }
        for (k, p) in pages[1..].iter().enumerate() {
            m[k * 8..k * 8 + 8].copy_from_slice(&p.to_le_bytes());
        }
    }
    let mut w = rw(iop::WRITE, 64, (len / 512) as u32, pages[0], CMEM);
    ok(&d.run(&mut q1, w, Bell::Register).unwrap());
    assert!(file_bytes(&backing, 64 * 512, len) == data, "the file does not hold the client's data");
    // Read it back into one contiguous run of client memory.
    let back = CMEM + 0x8_0000;
    {
        let m = d.client.message_memory_mut(CMEM).unwrap();
        for k in 0..9u64 {
            m[(0x1000 + k * 8) as usize..(0x1008 + k * 8) as usize]
                .copy_from_slice(&(back + (k + 1) * PAGE).to_le_bytes());
        }
    }
    ok(&d.run(&mut q2, rw(iop::READ, 64, (len / 512) as u32, back, CMEM + 0x1000), Bell::Register).unwrap());
    let m = d.client.message_memory(CMEM).unwrap();
    let o = (back - CMEM) as usize;
    assert!(m[o..o + len] == data[..], "the data read back into client memory differs");

    // The client stops answering: a write waits for its data. A controller
    // reset is answered anyway, and the write never lands.
    d.client.set_dma_mode(DmaMode::Defer);
    w.cdw[0] = 512;
    d.push(&mut q1, w).unwrap();
    d.ring(&mut q1, Bell::Register).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    d.write32(reg::CC, Nvme::cc_enable() & !cc::EN).unwrap();
    d.wait_csts(csts::RDY, 0, "RDY 0").unwrap();
    d.client.set_dma_mode(DmaMode::Answer);
    let (mut q1, _) = bring_up(&mut d);
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
    assert!(file_bytes(&backing, 512 * 512, len).iter().all(|b| *b == 0), "a write cancelled by the reset landed");
}

#[test]
fn bus_mastering_off_holds_commands_and_an_unmapped_buffer_is_a_data_transfer_error() {
    use vfio_user_server::pci::command;
    let mut st = Stack::new("nvme-bme");
    let Dev { mut d, backing } = dev(&mut st, "bme", &[]);
    let (mut q1, _) = bring_up(&mut d);
    // Bus mastering off: a submitted write neither moves nor completes.
    d.client.set_command(0, command::BUS_MASTER).unwrap();
    d.ram.write(DATA, &pattern(4096, 9)).unwrap();
    d.push(&mut q1, rw(iop::WRITE, 16, 8, IOVA + DATA, 0)).unwrap();
    d.ring(&mut q1, Bell::Register).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!d.has_entry(&q1).unwrap(), "a command completed with bus mastering off");
    assert!(file_bytes(&backing, 16 * 512, 4096).iter().all(|b| *b == 0), "data moved with bus mastering off");
    // On again: it runs.
    d.client.set_command(command::BUS_MASTER, 0).unwrap();
    ok(&d.reap(&mut q1, Duration::from_secs(10), Bell::Register).unwrap());
    assert!(file_bytes(&backing, 16 * 512, 4096) == pattern(4096, 9));

    // A second memfd mapped, used, then unmapped: the next command that
    // names it ends with Data Transfer Error, and the controller goes on.
    let extra = GuestRam::new("extra", 1 << 20).unwrap();
    let at = 0x3000_0000u64;
    d.client.dma_map(DMA_MAP_READ | DMA_MAP_WRITE, 0, at, 1 << 20, Some(extra.file.as_fd())).unwrap();
    extra.write(0, &pattern(4096, 10)).unwrap();
    ok(&d.run(&mut q1, rw(iop::WRITE, 24, 8, at, 0), Bell::Register).unwrap());
    d.client.dma_unmap(at, 1 << 20, 0).unwrap();
    assert_eq!(status_of(&mut d, &mut q1, rw(iop::WRITE, 32, 8, at, 0)), sc::DATA_TRANSFER);
    assert_eq!(status_of(&mut d, &mut q1, rw(iop::READ, 24, 8, at, 0)), sc::DATA_TRANSFER);
    assert!(file_bytes(&backing, 32 * 512, 4096).iter().all(|b| *b == 0));
    ok(&d.run(&mut q1, rw(iop::READ, 24, 8, IOVA + BACK, 0), Bell::Register).unwrap());
    assert!(d.ram.read(BACK, 4096).unwrap() == pattern(4096, 10));
    assert_eq!(d.read32(reg::CSTS).unwrap() & csts::CFS, 0);
}

#[test]
fn without_msix_each_completion_queue_interrupts_through_its_msi_vector_and_intms_holds_it() {
    let mut st = Stack::new("nvme-msi");
    let Dev { mut d, .. } = dev(&mut st, "msi", &["--no-msix"]);
    let fds: Vec<_> = (0..4).map(|_| vfio_user_server::irq::eventfd().unwrap()).collect();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    d.client.set_irqs(irq_index::MSI, trig, 0, 4, &[], &borrowed).unwrap();
    let (mut q1, mut q2) = bring_up(&mut d);
    let count = |f: &std::fs::File, ms: u64| vfio_user_server::irq::wait_eventfd(f, Duration::from_millis(ms));
    // Drain what bring-up raised on vector 0.
    count(&fds[0], 100);
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
    assert_eq!(count(&fds[1], 5000), 1, "CQ 1 did not interrupt on MSI vector 1");
    ok(&d.run(&mut q2, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
    assert_eq!(count(&fds[2], 5000), 1, "CQ 2 did not interrupt on MSI vector 2");
    // INTMS bit 2 holds vector 2; INTMC releases it.
    d.write32(reg::INTMS, 1 << 2).unwrap();
    assert_eq!(d.read32(reg::INTMS).unwrap(), 1 << 2);
    ok(&d.run(&mut q2, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
    assert_eq!(count(&fds[2], 100), 0, "a masked vector fired");
    d.write32(reg::INTMC, 1 << 2).unwrap();
    assert_eq!(count(&fds[2], 5000), 1, "the held interrupt was lost");
    assert_eq!(d.read32(reg::INTMC).unwrap(), 0);
}

#[test]
fn an_enabled_controller_migrates_with_its_queues_and_outstanding_requests() {
    use vfio_user_server::worker::mig;
    let mut st = Stack::new("nvme-mig");
    let Dev { mut d, backing } = dev(&mut st, "src", &[]);
    let (mut q1, mut q2) = bring_up(&mut d);
    let mut admin = d.admin.take().unwrap();
    let aer = d.push(&mut admin, cmd(aop::ASYNC_EVENT, 0)).unwrap();
    d.ring(&mut admin, Bell::Register).unwrap();
    d.ram.write(DATA, &pattern(4096, 20)).unwrap();
    ok(&d.run(&mut q1, rw(iop::WRITE, 0, 8, IOVA + DATA, 0), Bell::Register).unwrap());
    // Three writes queued, not rung, when the source stops.
    for k in 0..3u64 {
        d.ram.write(DATA + (k + 1) * PAGE, &pattern(4096, 21 + k as u32)).unwrap();
        d.push(&mut q1, rw(iop::WRITE, 8 * (k + 1), 8, IOVA + DATA + (k + 1) * PAGE, 0)).unwrap();
    }
    assert_eq!(d.client.set_mig_state(mig::STOP_COPY).unwrap(), mig::STOP_COPY);
    let mut blob = Vec::new();
    loop {
        let c = d.client.mig_data_read(1 << 16).unwrap();
        let end = c.len() < 1 << 16;
        blob.extend(c);
        if end {
            break;
        }
    }
    // The destination: the same backing file and guest RAM.
    let sock = st.server_with("nvme", "dst", &["--backing", backing.to_str().unwrap()]);
    let mut dst = Client::connect(&sock).unwrap();
    dst.dma_map(DMA_MAP_READ | DMA_MAP_WRITE, 0, IOVA, RAM, Some(d.ram.file.as_fd())).unwrap();
    assert_eq!(dst.set_mig_state(mig::RESUMING).unwrap(), mig::RESUMING);
    dst.mig_data_write(&blob).unwrap();
    assert_eq!(dst.set_mig_state(mig::RUNNING).unwrap(), mig::RUNNING);
    st.servers.remove(0);
    d.reconnect(dst).unwrap();
    assert_eq!(d.read32(reg::CSTS).unwrap() & csts::RDY, csts::RDY);
    // The queued writes run once rung; the queues go on where they were.
    d.ring(&mut q1, Bell::Register).unwrap();
    for _ in 0..3 {
        ok(&d.reap(&mut q1, Duration::from_secs(10), Bell::Register).unwrap());
    }
    for k in 0..4u64 {
        assert!(file_bytes(&backing, k * 4096, 4096) == pattern(4096, 20 + k as u32), "block run {k}");
    }
    ok(&d.run(&mut q2, rw(iop::READ, 8, 8, IOVA + BACK, 0), Bell::Register).unwrap());
    assert!(d.ram.read(BACK, 4096).unwrap() == pattern(4096, 21));
    // The Asynchronous Event Request outstanding on the source completes
    // on the destination.
    d.write32(Nvme::bell_offset(2, false), 999).unwrap();
    let c = d.reap(&mut admin, Duration::from_secs(10), Bell::Register).unwrap();
    assert_eq!((c.cid, c.status), (aer, sc::SUCCESS));
    d.write32(Nvme::bell_offset(2, false), q2.tail()).unwrap();
    ok(&d.run(&mut admin, identify(1, 0), Bell::Register).unwrap());

    // A state a client made up is refused.
    let sock = st.server_with("nvme", "bad", &["--backing", backing.to_str().unwrap()]);
    let mut bad = Client::connect(&sock).unwrap();
    assert_eq!(bad.set_mig_state(mig::RESUMING).unwrap(), mig::RESUMING);
    let mut broken = blob.clone();
    let n = broken.len();
    broken[n / 2] ^= 0xff;
    broken.truncate(n - 3);
    assert!(bad.mig_data_write(&broken).is_err() || bad.set_mig_state(mig::RUNNING).is_err());
}

/// Offset of the capability `id` in the standard list.
fn cap(c: &mut Client, id: u8) -> Option<u64> {
    let mut at = u64::from(c.region_read(region::CONFIG, 0x34, 1).unwrap()[0]);
    for _ in 0..48 {
        if at == 0 {
            return None;
        }
        let h = c.region_read(region::CONFIG, at, 2).unwrap();
        if h[0] == id {
            return Some(at);
        }
        at = u64::from(h[1]);
    }
    None
}

#[test]
fn a_function_level_reset_while_io_is_queued_leaves_a_fresh_controller() {
    use vfio_user_server::pci::cap_id;
    let mut st = Stack::new("nvme-flr");
    let Dev { mut d, backing } = dev(&mut st, "flr", &[]);
    let (mut q1, _) = bring_up(&mut d);
    // Sixteen writes submitted at once, then an FLR from config space.
    for k in 0..16u64 {
        d.ram.write(DATA + k * PAGE, &pattern(4096, 40 + k as u32)).unwrap();
        d.push(&mut q1, rw(iop::WRITE, k * 8, 8, IOVA + DATA + k * PAGE, 0)).unwrap();
    }
    d.ring(&mut q1, Bell::Register).unwrap();
    let pcie = cap(&mut d.client, cap_id::PCIE).expect("a PCI Express capability");
    d.client.region_write(region::CONFIG, pcie + 8, &0x8000u16.to_le_bytes()).unwrap();
    d.client.enable_function().unwrap();
    // Everything is back at power-on values, and no completion comes
    // after the reset was answered.
    assert_eq!(d.read32(reg::CSTS).unwrap(), 0);
    assert_eq!(d.read32(reg::CC).unwrap(), 0);
    assert_eq!(d.read32(reg::AQA).unwrap(), 0);
    assert_eq!(d.read64(reg::ASQ).unwrap(), 0);
    let entries = d.ram.read(CQ[1], 64 * 16).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.ram.read(CQ[1], 64 * 16).unwrap() == entries, "a completion was posted after the FLR");
    // Each write either landed whole or not at all.
    for k in 0..16u64 {
        let f = file_bytes(&backing, k * 4096, 4096);
        assert!(f == pattern(4096, 40 + k as u32) || f.iter().all(|b| *b == 0), "block run {k} half written");
    }
    let (mut q1, _) = bring_up(&mut d);
    ok(&d.run(&mut q1, cmd(iop::FLUSH, 1), Bell::Register).unwrap());
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: i32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().starts_with(prefix))
        .count()
}

#[test]
fn queue_threads_exist_only_while_their_queues_do() {
    let mut st = Stack::new("nvme-idle");
    let Dev { mut d, .. } = dev(&mut st, "idle", &[]);
    let pid = st.servers[0].pid();
    assert_eq!(threads_named(pid, "nvme-sq"), 0, "a disabled controller has no queue threads");
    let (_q1, _q2) = bring_up(&mut d);
    assert_eq!(threads_named(pid, "nvme-sq"), 3, "the admin queue and two I/O queues");
    let mut admin = d.admin.take().unwrap();
    let mut del = cmd(aop::DELETE_SQ, 0);
    del.cdw[0] = 2;
    assert_eq!(status_of(&mut d, &mut admin, del), sc::SUCCESS);
    assert_eq!(threads_named(pid, "nvme-sq"), 2, "a deleted SQ's thread ended");
    d.write32(reg::CC, 0).unwrap();
    d.wait_csts(csts::RDY, 0, "RDY 0").unwrap();
    assert_eq!(threads_named(pid, "nvme-sq"), 0, "a reset controller keeps queue threads");
}

#[test]
fn with_trapped_doorbells_the_page_is_not_offered_and_io_goes_on() {
    let mut st = Stack::new("nvme-trap");
    let Dev { mut d, backing } = dev(&mut st, "trap", &["--trap-doorbells"]);
    assert!(!d.has_mmap_bells(), "--trap-doorbells still offers the doorbell page");
    let r = d.client.region_info(0).unwrap();
    assert!(r.fd.is_none() && r.areas.is_empty());
    let (mut q1, mut q2) = bring_up(&mut d);
    for k in 0..20u64 {
        d.ram.write(DATA, &pattern(4096, 300 + k as u32)).unwrap();
        ok(&d.run(&mut q1, rw(iop::WRITE, k * 8, 8, IOVA + DATA, 0), Bell::Register).unwrap());
        ok(&d.run(&mut q2, rw(iop::READ, k * 8, 8, IOVA + BACK, 0), Bell::Register).unwrap());
        assert!(d.ram.read(BACK, 4096).unwrap() == pattern(4096, 300 + k as u32));
    }
    assert!(file_bytes(&backing, 19 * 4096, 4096) == pattern(4096, 319));
}

/// A client that left keeps its mapping of the doorbell page; what it
/// writes there afterwards must not reach the next client's controller
/// (which gets a new, zeroed doorbell page): here an admin SQ tail of 5
/// written after the departure would make the next controller run five
/// commands its driver never wrote.
#[test]
fn a_departed_client_writing_its_old_doorbell_page_does_not_reach_the_next_client() {
    use iommu_core::shm::Words;
    let mut st = Stack::new("nvme-bells");
    let Dev { mut d, .. } = dev(&mut st, "bells", &[]);
    let _ = bring_up(&mut d);
    let r = d.client.region_info(0).unwrap();
    let a = r.areas.iter().find(|a| a.offset == reg::DOORBELL).copied().expect("the doorbell page is offered");
    let old = Words::map_at(&std::fs::File::from(r.fd.unwrap()), r.info.offset + a.offset, a.size).unwrap();
    // It rings without pause through its mapping while it leaves and
    // after, as a departed client may.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ringer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                old.u32(0).unwrap().store(5, std::sync::atomic::Ordering::Release);
                std::hint::spin_loop();
            }
        })
    };
    drop(d);
    let sock = st.dir.join("bells.sock");
    // The server takes the next client once it has seen this one leave.
    let t0 = std::time::Instant::now();
    let mut c = loop {
        match Client::connect(&sock) {
            Ok(c) => break c,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(20), "no client accepted: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let ram = GuestRam::new("bells-2", RAM).unwrap();
    c.dma_map(DMA_MAP_READ | DMA_MAP_WRITE, 0, IOVA, RAM, Some(ram.file.as_fd())).unwrap();
    // Run, the five entries (zeroes: Delete I/O SQ 0) would complete with
    // errors in the admin CQ.
    let mut d = Nvme::new(c, ram, IOVA).unwrap();
    d.enable(64, ASQ, ACQ).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let admin = d.admin.clone().unwrap();
    let ran = d.has_entry(&admin).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ringer.join().unwrap();
    assert!(!ran, "the controller ran commands the departed client rang");
    ok(&d.admin(identify(1, 0)).unwrap());
}
