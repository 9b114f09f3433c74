//! An idle device costs nothing: the dma-engine's queue threads sleep
//! until something can run, with no client and with a client whose queues
//! are disabled, and poll only while a queue is enabled.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use ioasid_stack::engine::{Engine, GuestRam};
use vfio_user_server::client::Client;
use vfio_user_server::proto::{DMA_MAP_READ, DMA_MAP_WRITE};

/// Voluntary context switches of the server's queue threads so far.
fn queue_thread_switches(pid: i32) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("dma-engine-q") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Voluntary context switches of each queue thread so far, by queue.
fn switches_by_queue(pid: i32) -> [u64; 4] {
    let mut out = [0; 4];
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let Some(q) = comm.trim_end().strip_prefix("dma-engine-q").and_then(|q| q.parse::<usize>().ok()) else {
            continue;
        };
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        out[q] = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    out
}

/// Switches of the queue threads during `d`.
fn switches_during(pid: i32, d: Duration) -> u64 {
    let before = queue_thread_switches(pid);
    std::thread::sleep(d);
    queue_thread_switches(pid) - before
}

#[test]
fn queue_threads_sleep_while_no_queue_can_run() {
    let mut st = Stack::new("idle");
    let sock = st.server("dma-engine", "eng");
    let pid = st.servers[0].pid();
    let idle = Duration::from_millis(500);
    // Polling every 2 ms would be about 250 wake-ups per thread here.
    let none = switches_during(pid, idle);
    assert!(none <= 8, "{none} wake-ups of the queue threads with no client");

    let ram = GuestRam::new("ram", 1 << 20).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    c.dma_map(DMA_MAP_READ | DMA_MAP_WRITE, 0, 0x1000_0000, 1 << 20, Some(ram.file.as_fd())).unwrap();
    let mut eng = Engine::new(c).unwrap();
    let disabled = switches_during(pid, idle);
    assert!(disabled <= 8, "{disabled} wake-ups with every queue disabled");

    // An enabled queue is polled (its doorbell may be written through a
    // mapping), so its thread does wake up.
    let _q = eng.setup_queue(0, 64, 0x1000_0000, 0, 0x1001_0000, 0x10000, None, false).unwrap();
    let enabled = switches_during(pid, idle);
    assert!(enabled > 8, "an enabled queue was not polled ({enabled} wake-ups)");
}

/// A register write wakes only the queue thread it concerns: a queue's
/// doorbell register its own thread, a register of no queue none.
#[test]
fn a_register_write_wakes_only_the_queue_it_concerns() {
    use vfio_user_server::devices::dma_engine::regs;
    let mut st = Stack::new("wake");
    let sock = st.server("dma-engine", "eng");
    let pid = st.servers[0].pid();
    let mut c = Client::connect(&sock).unwrap();
    c.enable_function().unwrap();
    c.region_write(0, regs::CTRL, &1u32.to_le_bytes()).unwrap();
    // Queue 2's doorbell register, its queue disabled (its thread sleeps
    // until kicked): every write submits something new.
    let tail2 = regs::QUEUE + 2 * regs::QUEUE_STRIDE + regs::Q_TAIL;
    let before = switches_by_queue(pid);
    for i in 1..=100u32 {
        c.region_write(0, tail2, &i.to_le_bytes()).unwrap();
        c.region_write(0, regs::INTX_STATUS, &0u32.to_le_bytes()).unwrap();
        c.region_write(0, regs::QUEUE + regs::Q_RING_BASE, &i.to_le_bytes()).unwrap();
    }
    let after = switches_by_queue(pid);
    let woke: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(woke[2] >= 10, "queue 2's doorbell did not wake its thread: {woke:?}");
    for q in [0, 1, 3] {
        assert!(woke[q] <= 2, "queue {q}'s thread woke for other registers: {woke:?}");
    }
}

/// What a guest's PCI core reads first: a class that claims no legacy
/// programming interface, and a PCI Express capability with role-based
/// error reporting (without it Linux disables ASPM as for a pre-1.1
/// device).
#[test]
fn the_pci_function_claims_no_legacy_interface_and_reports_errors_by_role() {
    let mut st = Stack::new("pci-ids");
    let sock = st.server("dma-engine", "eng");
    let mut c = Client::connect(&sock).unwrap();
    let cfg = vfio_user_server::proto::region::CONFIG;
    let class = c.region_read(cfg, 0x09, 3).unwrap();
    assert_eq!(class, vec![0x00, 0x80, 0x08], "prog-if, subclass, class");
    // Walk the capability list to the PCI Express capability.
    let mut at = c.region_read(cfg, 0x34, 1).unwrap()[0] as u64;
    let mut pcie = None;
    for _ in 0..48 {
        if at == 0 {
            break;
        }
        let hdr = c.region_read(cfg, at, 2).unwrap();
        if hdr[0] == 0x10 {
            pcie = Some(at);
            break;
        }
        at = u64::from(hdr[1]);
    }
    let pcie = pcie.expect("a PCI Express capability");
    let devcap = u32::from_le_bytes(c.region_read(cfg, pcie + 4, 4).unwrap().try_into().unwrap());
    assert_ne!(devcap & (1 << 15), 0, "role-based error reporting");
    assert_ne!(devcap & (1 << 28), 0, "function-level reset");
}
