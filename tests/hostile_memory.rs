//! A vfio-user client's hostile memory against the real binaries
//! (`iommu-core`, `vfio-user-server dma-engine`): files that change size
//! under a DMA_MAP never cost the server a SIGBUS, and DMA past a file's
//! end is a fault that never grows the file.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use ioasid_stack::engine::{Doorbell, Engine, GuestRam, Queue};
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{op, status, Descriptor};
use vfio_user_server::proto::{DMA_MAP_READ, DMA_MAP_WRITE};

const RW: u32 = DMA_MAP_READ | DMA_MAP_WRITE;
const KIOVA: u64 = 0x1000_0000;
const XIOVA: u64 = 0x4000_0000;

/// An engine on the compat IOAS: its ring and completions in `kram`.
fn engine(st: &mut Stack, name: &str) -> (Engine, GuestRam, Queue) {
    let sock = st.server("dma-engine", name);
    let kram = GuestRam::new("kram", 1 << 20).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    c.dma_map(RW, 0, KIOVA, 1 << 20, Some(kram.file.as_fd())).unwrap();
    let mut eng = Engine::new(c).unwrap();
    let q = eng.setup_queue(0, 64, KIOVA, 0, KIOVA + 0x10000, 0x10000, None, false).unwrap();
    (eng, kram, q)
}

fn fill(dst: u64, len: u32) -> Descriptor {
    Descriptor { opcode: op::FILL, len, dst, pattern: 0x5a5a_5a5a_5a5a_5a5a, ..Default::default() }
}

fn alive(st: &mut Stack) -> bool {
    st.servers.iter_mut().all(|p| p.0.try_wait().is_ok_and(|s| s.is_none()))
}

/// A client flips a memfd between 2 MiB and 4 KiB while it DMA_MAPs it,
/// then has the device fill the last page it mapped: the core seals before
/// it takes the size, so the map is refused or the page is really there,
/// and the server never dies of SIGBUS.
#[test]
fn a_memfd_resized_during_dma_map_never_kills_the_server() {
    let mut st = Stack::new("hostile-resize");
    let (mut eng, kram, mut q) = engine(&mut st, "eng");
    let mut mapped = 0;
    for round in 0..100 {
        let f = Arc::new(iommu_core::memfd::create("flip", 2 << 20).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || {
                let sealed = |f: &std::fs::File| {
                    iommu_core::memfd::seals(f.as_fd()).is_some_and(|s| s.contains(nix::fcntl::SealFlag::F_SEAL_SHRINK))
                };
                while !stop.load(Ordering::Relaxed) {
                    let _ = f.set_len(4096);
                    if sealed(&f) {
                        break;
                    }
                    let _ = f.set_len(2 << 20);
                }
            })
        };
        let r = eng.client.dma_map(RW, 0, XIOVA, 2 << 20, Some(f.as_fd()));
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        if r.is_err() {
            continue;
        }
        mapped += 1;
        let c = eng.run(&kram, &mut q, fill(XIOVA + (2 << 20) - 4096, 4096), Doorbell::Register);
        assert!(alive(&mut st), "the server died in round {round}");
        assert_eq!(c.unwrap().status, status::SUCCESS, "round {round}");
        eng.client.dma_unmap(XIOVA, 2 << 20, 0).unwrap();
    }
    assert!(mapped > 0, "no DMA_MAP succeeded");
    assert!(alive(&mut st));
}

/// A regular file shrunk under its DMA_MAP: a fill past the new end
/// completes with a destination fault, the core's fault log records it,
/// the file keeps its size, and the device goes on working.
#[test]
fn dma_past_the_end_of_a_shrunk_file_is_a_fault_and_never_grows_it() {
    let mut st = Stack::new("hostile-shrink");
    let (mut eng, kram, mut q) = engine(&mut st, "eng");
    let path = st.dir.join("shrinking");
    let f = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    f.set_len(0x10000).unwrap();
    eng.client.dma_map(RW, 0, XIOVA, 0x10000, Some(f.as_fd())).unwrap();
    let c = eng.run(&kram, &mut q, fill(XIOVA + 0x8000, 64), Doorbell::Register).unwrap();
    assert_eq!(c.status, status::SUCCESS);
    f.set_len(0x1000).unwrap();
    let c = eng.run(&kram, &mut q, fill(XIOVA + 0x8000, 64), Doorbell::Register).unwrap();
    assert_eq!(c.status, status::FAULT_DST, "a write past the end of the file");
    let c = eng.run(&kram, &mut q, fill(XIOVA, 64), Doorbell::Register).unwrap();
    assert_eq!(c.status, status::SUCCESS, "the device goes on");
    assert_eq!(f.metadata().unwrap().len(), 0x1000, "a DMA write grew the file");
    let faults = st.observer().status().unwrap().faults;
    assert!(
        faults.iter().any(|x| x.record.iova == XIOVA + 0x8000 && x.record.access.write),
        "no fault record for the write: {faults:?}"
    );
    assert!(alive(&mut st));
}
