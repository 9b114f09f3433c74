//! Device DMA through client messages (DMA_MAP without an fd, as QEMU
//! sends for guest RAM that is not shared memory): the server reaches the
//! client's memory with DMA_READ/DMA_WRITE requests. The client here
//! behaves like QEMU's vfio-user client: it answers the server's requests
//! in batches (QEMU runs them in a main-loop bottom half and writes the
//! replies back to back), and it checks what QEMU cannot cope with: the
//! DMA_READ reply bytes it owes at once must stay far below a default Unix
//! socket send buffer, since QEMU writes each reply with one non-blocking
//! write and drops whatever did not fit.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::*;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vfio_user_server::client::Client;
use vfio_user_server::conn::DMA_READ_CHUNK;
use vfio_user_server::devices::dma_engine::{op, regs, status, Descriptor, COMPLETION_SIZE};
use vfio_user_server::proto::{self, cmd};
use zerocopy::IntoBytes;

const RW: u32 = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;
/// Client memory without an fd: rings, records, then the buffers.
const MEM: u64 = 0x4000_0000;
const MEM_SIZE: usize = 8 << 20;
const RING: u32 = 16;
const RECORDS: u64 = 0x8000;
/// Bytes each queue copies: several DMA steps.
const LEN: usize = 256 * 1024 + 13;
/// Generous bound for anything to happen on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn src(q: usize) -> u64 {
    0x10_0000 + q as u64 * 0x10_0000
}

fn dst(q: usize) -> u64 {
    src(q) + 0x8_0000
}

#[test]
fn dma_read_replies_owed_at_once_fit_a_socket_buffer_while_four_queues_copy() {
    let mut st = Stack::new("msg-dma-replies");
    let sock = st.server("dma-engine", "replies");
    let mut c = Client::connect(&sock).unwrap();
    c.dma_map(RW, 0, MEM, MEM_SIZE as u64, None).unwrap();
    c.enable_function().unwrap();
    let mut mem = vec![0u8; MEM_SIZE];
    for q in 0..4 {
        let s = src(q) as usize;
        for (i, b) in mem[s..s + LEN].iter_mut().enumerate() {
            *b = (i * 7 + q * 31 + 1) as u8;
        }
        let d = Descriptor {
            opcode: op::COPY,
            len: LEN as u32,
            src: MEM + src(q),
            dst: MEM + dst(q),
            completion: MEM + RECORDS + q as u64 * 0x100,
            ..Default::default()
        };
        let ring = q * 0x1000;
        mem[ring..ring + 64].copy_from_slice(&d.to_bytes());
    }
    let w32 = |c: &mut Client, off: u64, v: u32| c.region_write(0, off, &v.to_le_bytes()).unwrap();
    w32(&mut c, regs::CTRL, 1);
    for q in 0..4 {
        let b = regs::QUEUE + q as u64 * regs::QUEUE_STRIDE;
        c.region_write(0, b + regs::Q_RING_BASE, &(MEM + q as u64 * 0x1000).to_le_bytes()).unwrap();
        w32(&mut c, b + regs::Q_RING_SIZE, RING);
        w32(&mut c, b + regs::Q_CTRL, regs::Q_CTRL_ENABLE);
    }
    // Posted doorbells: nothing waits for a reply, so no request of the
    // device is answered before the loop below.
    for q in 0..4 {
        let b = regs::QUEUE + q as u64 * regs::QUEUE_STRIDE;
        c.region_write_posted(0, b + regs::Q_TAIL, &1u32.to_le_bytes()).unwrap();
    }
    let record = |mem: &[u8], q: usize| {
        let r = (RECORDS + q as u64 * 0x100) as usize;
        mem[r..r + COMPLETION_SIZE].to_vec()
    };
    let t0 = Instant::now();
    let mut most_owed = 0usize;
    let mut batch = Vec::new();
    while (0..4).any(|q| record(&mem, q)[0] == status::NONE) {
        assert!(
            t0.elapsed() < DEADLINE,
            "the copies never completed; records {:?}",
            (0..4).map(|q| record(&mem, q)[0]).collect::<Vec<_>>()
        );
        // Gather what the server asks until it has been quiet for 50 ms,
        // then answer it all at once.
        let readable = c.buffered() || {
            let mut p = [PollFd::new(c.socket().as_fd(), PollFlags::POLLIN)];
            poll(&mut p, PollTimeout::from(50u16)).unwrap() > 0
        };
        if readable {
            let m = c.recv().unwrap();
            assert!(!m.hdr.is_reply(), "a reply nobody asked for");
            batch.push(m);
            continue;
        }
        let owed: usize = batch
            .iter()
            .filter(|m| m.hdr.command == cmd::DMA_READ)
            .map(|m| {
                let r: proto::DmaRw = proto::read(&m.payload).unwrap();
                proto::HEADER_SIZE + 16 + r.count as usize
            })
            .sum();
        most_owed = most_owed.max(owed);
        for m in batch.drain(..) {
            let r: proto::DmaRw = proto::read(&m.payload).unwrap();
            let at = (r.address - MEM) as usize;
            let n = r.count as usize;
            let reply = match m.hdr.command {
                cmd::DMA_READ => [r.as_bytes(), &mem[at..at + n]].concat(),
                cmd::DMA_WRITE => {
                    mem[at..at + n].copy_from_slice(&m.payload[16..16 + n]);
                    r.as_bytes().to_vec()
                }
                other => panic!("unexpected request {}", cmd::name(other)),
            };
            c.send_raw(&[m.hdr.reply(reply.len()).as_bytes(), &reply].concat(), &[]).unwrap();
        }
    }
    for q in 0..4 {
        assert_eq!(record(&mem, q)[0], status::SUCCESS, "queue {q}");
        let (s, d) = (src(q) as usize, dst(q) as usize);
        assert!(mem[s..s + LEN] == mem[d..d + LEN], "queue {q} copied wrong bytes");
    }
    assert!(
        most_owed <= DMA_READ_CHUNK + 32,
        "the client owed {most_owed} bytes of DMA_READ replies at once (at most {} expected)",
        DMA_READ_CHUNK + 32
    );
}
