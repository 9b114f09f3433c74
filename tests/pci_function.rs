//! The dma-engine as a PCI function, driven over real sockets the way a
//! guest's PCI core and driver drive it: bus mastering gates DMA, memory
//! space enable gates BAR decode, INTx shows in the Status register and
//! obeys Interrupt Disable, D3hot stops the function and D3hot to D0
//! resets it, no descriptor completes after a reset is accepted, a
//! completion record that cannot be written is an error, and a device
//! without MSI-X interrupts through MSI.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::*;
use ioasid_stack::engine::{read32, write32, Doorbell, Engine, GuestRam, Queue};
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{flag, op, regs, status, Completion, Descriptor, COMPLETION_SIZE};
use vfio_user_server::pci::{cap_id, command};
use vfio_user_server::proto::{self, irq_index, region, DMA_MAP_READ, DMA_MAP_WRITE};

const IOVA: u64 = 0x1000_0000;
const RAM: u64 = 256 << 20;
const RING: u64 = 0;
const COMP: u64 = 0x1_0000;
const SRC: u64 = 0x100_0000;
const DST: u64 = 0x200_0000;
const MIB16: u32 = 16 << 20;

fn cfg16(c: &mut Client, off: u64) -> u16 {
    let b = c.region_read(region::CONFIG, off, 2).unwrap();
    u16::from_le_bytes([b[0], b[1]])
}

fn set_cfg16(c: &mut Client, off: u64, v: u16) {
    c.region_write(region::CONFIG, off, &v.to_le_bytes()).unwrap();
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

struct Dev {
    eng: Engine,
    ram: GuestRam,
    q: Queue,
}

/// A dma-engine with 256 MiB of RAM mapped at IOVA, enabled as a driver
/// does (function, device, queue 0 with a 64-entry ring).
fn dev(st: &mut Stack, name: &str, args: &[&str], irq: bool) -> Dev {
    let sock = st.server_with("dma-engine", name, args);
    let ram = GuestRam::new(name, RAM).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    c.dma_map(DMA_MAP_READ | DMA_MAP_WRITE, 0, IOVA, RAM, Some(ram.file.as_fd())).unwrap();
    let mut eng = Engine::new(c).unwrap();
    let q = eng.setup_queue(0, 64, IOVA + RING, RING, IOVA + COMP, COMP, None, irq).unwrap();
    Dev { eng, ram, q }
}

fn nop(irq: bool) -> Descriptor {
    Descriptor { opcode: op::NOP, flags: if irq { flag::INTERRUPT } else { 0 }, ..Descriptor::default() }
}

fn copy(src: u64, dst: u64, len: u32) -> Descriptor {
    Descriptor { opcode: op::COPY, len, src: IOVA + src, dst: IOVA + dst, ..Descriptor::default() }
}

fn record(d: &Dev, slot: u32) -> Completion {
    Completion::parse(&d.ram.read(COMP + u64::from(slot) * COMPLETION_SIZE as u64, COMPLETION_SIZE).unwrap()).unwrap()
}

/// Fills the source with a pattern that differs at every offset.
fn fill_src(d: &Dev, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    d.ram.write(SRC, &data).unwrap();
    data
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn eventfd() -> std::fs::File {
    vfio_user_server::irq::eventfd().unwrap()
}

fn count_within(f: &std::fs::File, d: Duration) -> u64 {
    vfio_user_server::irq::wait_eventfd(f, d)
}

#[test]
fn bus_master_enable_gates_dma_and_a_stopped_copy_resumes_where_it_stopped() {
    let mut st = Stack::new("bme");
    let mut d = dev(&mut st, "bme", &[], false);
    // Bus mastering off: a queued NOP writes no record and HEAD stays.
    d.eng.client.set_command(0, command::BUS_MASTER).unwrap();
    let slot = d.eng.push(&d.ram, &mut d.q, nop(false)).unwrap();
    d.eng.ring(&d.q, Doorbell::Register).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(record(&d, slot).status, status::NONE, "DMA with bus mastering off");
    assert_eq!(d.eng.queue_reg(0, regs::Q_HEAD).unwrap(), 0);
    assert_eq!(d.eng.queue_reg(0, regs::Q_STATUS).unwrap(), 1, "waiting is not an error");
    // On: it runs.
    d.eng.client.set_command(command::BUS_MASTER, 0).unwrap();
    assert_eq!(d.eng.wait(&d.ram, &mut d.q, slot, Duration::from_secs(10)).unwrap().status, status::SUCCESS);

    // Off while 16 MiB copies run: nothing moves after the reply, and each
    // copy finishes correctly once bus mastering is back.
    let data = fill_src(&d, MIB16 as usize);
    for round in 0..3u64 {
        let dst = DST + round * u64::from(MIB16);
        let slot = d.eng.push(&d.ram, &mut d.q, copy(SRC, dst, MIB16)).unwrap();
        d.eng.ring(&d.q, Doorbell::Register).unwrap();
        std::thread::sleep(Duration::from_micros(300 * round));
        d.eng.client.set_command(0, command::BUS_MASTER).unwrap();
        let rec = record(&d, slot);
        let snap = d.ram.read(dst, MIB16 as usize).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(record(&d, slot), rec, "a record written after bus mastering went off");
        assert!(d.ram.read(dst, MIB16 as usize).unwrap() == snap, "data written after bus mastering went off");
        d.eng.client.set_command(command::BUS_MASTER, 0).unwrap();
        let c = d.eng.wait(&d.ram, &mut d.q, slot, Duration::from_secs(20)).unwrap();
        assert_eq!((c.status, c.bytes_done), (status::SUCCESS, MIB16));
        assert!(d.ram.read(dst, MIB16 as usize).unwrap() == data, "round {round}: the resumed copy differs");
    }
    assert_eq!(d.eng.queue_reg(0, regs::Q_ERRORS).unwrap(), 0);
}

#[test]
fn memory_space_enable_gates_every_bar_access_and_the_doorbell() {
    let mut st = Stack::new("mse");
    let mut d = dev(&mut st, "mse", &[], false);
    d.eng.client.set_command(0, command::MEMORY).unwrap();
    // No decode: reads are all ones, writes are dropped; config space works.
    assert_eq!(read32(&mut d.eng.client, regs::ID).unwrap(), u32::MAX);
    assert_eq!(d.eng.client.region_read(2, 0, 4).unwrap(), vec![0xff; 4]);
    write32(&mut d.eng.client, regs::CTRL, 0).unwrap();
    let slot = d.eng.push(&d.ram, &mut d.q, nop(false)).unwrap();
    d.eng.ring(&d.q, Doorbell::Register).unwrap();
    d.eng.ring(&d.q, Doorbell::Posted).unwrap();
    assert_eq!(cfg16(&mut d.eng.client, 0), 0x1b36);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(record(&d, slot).status, status::NONE, "a doorbell written while the BAR did not decode ran");
    d.eng.client.set_command(command::MEMORY, 0).unwrap();
    assert_eq!(read32(&mut d.eng.client, regs::CTRL).unwrap(), 1, "a write without decode reached the device");
    assert_eq!(d.eng.queue_reg(0, regs::Q_TAIL).unwrap(), 0);
    d.eng.ring(&d.q, Doorbell::Register).unwrap();
    assert_eq!(d.eng.wait(&d.ram, &mut d.q, slot, Duration::from_secs(10)).unwrap().status, status::SUCCESS);
}

#[test]
fn intx_shows_in_the_status_register_and_interrupt_disable_holds_it() {
    let mut st = Stack::new("intx");
    let mut d = dev(&mut st, "intx", &[], true);
    let intx = eventfd();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    d.eng.client.set_irqs(irq_index::INTX, trig, 0, 1, &[], &[intx.as_fd()]).unwrap();
    let status_bit = |c: &mut Client| cfg16(c, 6) & (1 << 3) != 0;
    assert!(!status_bit(&mut d.eng.client));
    assert_eq!(d.eng.run(&d.ram, &mut d.q, nop(true), Doorbell::Register).unwrap().status, status::SUCCESS);
    assert_eq!(count_within(&intx, Duration::from_secs(5)), 1);
    assert!(status_bit(&mut d.eng.client), "Interrupt Status is clear while INTx is asserted");
    // The driver acknowledges: the line drops, and so does the bit.
    write32(&mut d.eng.client, regs::INTX_STATUS, 1).unwrap();
    assert!(!status_bit(&mut d.eng.client));
    // Unmask (the client's EOI), then Interrupt Disable: the next
    // completion raises the line (Status shows it) but signals nothing.
    let unmask = proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_UNMASK;
    d.eng.client.set_irqs(irq_index::INTX, unmask, 0, 1, &[], &[]).unwrap();
    d.eng.client.set_command(command::INTX_DISABLE, 0).unwrap();
    assert_eq!(d.eng.run(&d.ram, &mut d.q, nop(true), Doorbell::Register).unwrap().status, status::SUCCESS);
    assert_eq!(count_within(&intx, Duration::from_millis(200)), 0, "INTx signalled with Interrupt Disable set");
    assert!(status_bit(&mut d.eng.client), "Interrupt Status must show the line whatever Interrupt Disable says");
    // Clearing Interrupt Disable delivers what was held.
    d.eng.client.set_command(0, command::INTX_DISABLE).unwrap();
    assert_eq!(count_within(&intx, Duration::from_secs(5)), 1, "the held interrupt was lost");
    write32(&mut d.eng.client, regs::INTX_STATUS, 1).unwrap();
    assert!(!status_bit(&mut d.eng.client));
    // A line lowered while disabled is not signalled afterwards.
    d.eng.client.set_irqs(irq_index::INTX, unmask, 0, 1, &[], &[]).unwrap();
    d.eng.client.set_command(command::INTX_DISABLE, 0).unwrap();
    assert_eq!(d.eng.run(&d.ram, &mut d.q, nop(true), Doorbell::Register).unwrap().status, status::SUCCESS);
    write32(&mut d.eng.client, regs::INTX_STATUS, 1).unwrap();
    d.eng.client.set_command(0, command::INTX_DISABLE).unwrap();
    assert_eq!(count_within(&intx, Duration::from_millis(200)), 0, "a lowered line fired");
}

#[test]
fn d3hot_stops_the_function_and_d0_resets_it() {
    let mut st = Stack::new("pm");
    let mut d = dev(&mut st, "pm", &[], false);
    let pm = cap(&mut d.eng.client, cap_id::PM).expect("a PM capability");
    // PMC: D1 and D2 unsupported; PMCSR: No_Soft_Reset clear.
    assert_eq!(cfg16(&mut d.eng.client, pm + 2) & (3 << 9), 0);
    assert_eq!(cfg16(&mut d.eng.client, pm + 4) & (1 << 3), 0);
    // An unsupported state is ignored.
    set_cfg16(&mut d.eng.client, pm + 4, 1);
    assert_eq!(cfg16(&mut d.eng.client, pm + 4) & 3, 0);
    assert_eq!(d.eng.run(&d.ram, &mut d.q, nop(false), Doorbell::Register).unwrap().status, status::SUCCESS);
    // D3hot: no decode, no DMA (a doorbell through the mapping waits).
    set_cfg16(&mut d.eng.client, pm + 4, 3);
    assert_eq!(cfg16(&mut d.eng.client, pm + 4) & 3, 3);
    assert_eq!(read32(&mut d.eng.client, regs::ID).unwrap(), u32::MAX);
    let slot = d.eng.push(&d.ram, &mut d.q, nop(false)).unwrap();
    d.eng.ring(&d.q, Doorbell::Mmap).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(record(&d, slot).status, status::NONE, "DMA in D3hot");
    // D0 again: No_Soft_Reset is 0, so the function was reset.
    set_cfg16(&mut d.eng.client, pm + 4, 0);
    assert_eq!(cfg16(&mut d.eng.client, 4) & 0x7, 0, "the command register survived the PM reset");
    d.eng.client.enable_function().unwrap();
    assert_eq!(read32(&mut d.eng.client, regs::CTRL).unwrap(), 0, "CTRL survived the PM reset");
    assert_eq!(d.eng.queue_reg(0, regs::Q_CTRL).unwrap(), 0);
    assert_eq!(d.eng.queue_reg(0, regs::Q_RING_BASE).unwrap(), 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(record(&d, slot).status, status::NONE, "the queued NOP ran after the reset");
}

/// How a test resets the engine.
#[derive(Debug, Clone, Copy)]
enum ResetKind {
    Flr,
    DeviceReset,
    PmReset,
    CtrlDisable,
    QueueDisable,
}

fn reset(d: &mut Dev, how: ResetKind) {
    let c = &mut d.eng.client;
    match how {
        ResetKind::Flr => {
            let pcie = cap(c, cap_id::PCIE).expect("a PCIe capability");
            let ctl = cfg16(c, pcie + 8);
            set_cfg16(c, pcie + 8, ctl | 0x8000);
        }
        ResetKind::DeviceReset => c.reset().unwrap(),
        ResetKind::PmReset => {
            let pm = cap(c, cap_id::PM).expect("a PM capability");
            set_cfg16(c, pm + 4, 3);
            set_cfg16(c, pm + 4, 0);
        }
        ResetKind::CtrlDisable => write32(c, regs::CTRL, 0).unwrap(),
        ResetKind::QueueDisable => write32(c, regs::QUEUE + regs::Q_CTRL, 0).unwrap(),
    }
}

/// Eight 16 MiB copies are queued and a reset follows the doorbell: after
/// the reset's reply no record and no destination byte changes, and a
/// queue that keeps its counters counts exactly the records written.
#[test]
fn no_descriptor_completes_and_no_byte_moves_after_a_reset() {
    let mut st = Stack::new("races");
    let mut d = dev(&mut st, "races", &[], false);
    fill_src(&d, MIB16 as usize);
    let mut lat = Vec::new();
    for (i, how) in
        [ResetKind::Flr, ResetKind::DeviceReset, ResetKind::PmReset, ResetKind::CtrlDisable, ResetKind::QueueDisable]
            .into_iter()
            .cycle()
            .take(15)
            .enumerate()
    {
        if i > 0 {
            // Set up again, as a driver does after a reset.
            d.eng.client.enable_function().unwrap();
            write32(&mut d.eng.client, regs::CTRL, 1).unwrap();
            d.q = d.eng.setup_queue(0, 64, IOVA + RING, RING, IOVA + COMP, COMP, None, false).unwrap();
        }
        let done0 = d.eng.queue_reg(0, regs::Q_COMPLETED).unwrap();
        let head0 = d.eng.queue_reg(0, regs::Q_HEAD).unwrap();
        let mut slots = Vec::new();
        for k in 0..8u64 {
            d.ram.write(DST + k * u64::from(MIB16), &[0u8; 4096]).unwrap();
            slots.push(d.eng.push(&d.ram, &mut d.q, copy(SRC, DST + k * u64::from(MIB16), MIB16)).unwrap());
        }
        d.eng.ring(&d.q, Doorbell::Register).unwrap();
        std::thread::sleep(Duration::from_micros(500 * (i as u64 % 5)));
        let t0 = Instant::now();
        reset(&mut d, how);
        lat.push(t0.elapsed());
        let recs: Vec<Completion> = slots.iter().map(|&s| record(&d, s)).collect();
        let heads: Vec<Vec<u8>> =
            (0..8u64).map(|k| d.ram.read(DST + k * u64::from(MIB16), MIB16 as usize).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(150));
        for k in 0..8u32 {
            let rec = record(&d, slots[k as usize]);
            assert_eq!(rec, recs[k as usize], "{how:?}: record {k} written after the reset's reply");
            let now = d.ram.read(DST + u64::from(k) * u64::from(MIB16), MIB16 as usize).unwrap();
            assert!(now == heads[k as usize], "{how:?}: copy {k} wrote after the reset's reply");
        }
        let written = recs.iter().filter(|r| r.status != status::NONE).count() as u32;
        assert!(recs.iter().all(|r| r.status == status::NONE || r.status == status::SUCCESS));
        match how {
            ResetKind::CtrlDisable | ResetKind::QueueDisable => {
                d.eng.client.enable_function().unwrap();
                let done = d.eng.queue_reg(0, regs::Q_COMPLETED).unwrap() - done0;
                assert_eq!(done, written, "{how:?}: COMPLETED and the records disagree");
                let head = d.eng.queue_reg(0, regs::Q_HEAD).unwrap().wrapping_sub(head0);
                if matches!(how, ResetKind::CtrlDisable) {
                    // Dropped: HEAD is at the doorbell, past all eight.
                    assert_eq!(head, 8, "{how:?}: HEAD");
                }
            }
            _ => {
                d.eng.client.enable_function().unwrap();
                assert_eq!(d.eng.queue_reg(0, regs::Q_COMPLETED).unwrap(), 0);
            }
        }
        // Clear the records for the next round.
        d.ram.write(COMP, &[0u8; 64 * COMPLETION_SIZE]).unwrap();
        if matches!(how, ResetKind::CtrlDisable) {
            // CTRL off dropped what was submitted: on again, nothing of it
            // runs.
            write32(&mut d.eng.client, regs::CTRL, 1).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            assert!(slots.iter().all(|&s| record(&d, s).status == status::NONE), "a dropped descriptor ran");
            write32(&mut d.eng.client, regs::QUEUE + regs::Q_CTRL, 0).unwrap();
        }
    }
    lat.sort();
    eprintln!(
        "reset round trips with 16 MiB copies in flight: min {:?}, median {:?}, max {:?}",
        lat[0],
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
}

/// An overlapping COPY stopped by CTRL or Q_CTRL disable at any point
/// never reports SUCCESS over wrong data and never runs again: a
/// descriptor voided part-way is dropped, not started over on a source it
/// already overwrote.
#[test]
fn a_voided_overlapping_copy_never_completes_over_its_own_writes() {
    let mut st = Stack::new("void-overlap");
    let mut d = dev(&mut st, "void-overlap", &[], false);
    let len = MIB16 as usize;
    let data: Vec<u8> = (0..len + 4099).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    for round in 0..12u64 {
        d.ram.write(SRC, &data).unwrap();
        let slot = d.eng.push(&d.ram, &mut d.q, copy(SRC, SRC + 4099, MIB16)).unwrap();
        d.eng.ring(&d.q, Doorbell::Register).unwrap();
        std::thread::sleep(Duration::from_micros(150 * round));
        let ctrl = round % 2 == 0;
        if ctrl {
            write32(&mut d.eng.client, regs::CTRL, 0).unwrap();
        } else {
            write32(&mut d.eng.client, regs::QUEUE + regs::Q_CTRL, 0).unwrap();
        }
        let rec = record(&d, slot);
        if rec.status == status::SUCCESS {
            assert!(d.ram.read(SRC + 4099, len).unwrap() == data[..len], "round {round}: SUCCESS over wrong data");
        } else {
            assert_eq!(rec.status, status::NONE);
        }
        // Enabled again, nothing from before runs.
        if ctrl {
            write32(&mut d.eng.client, regs::CTRL, 1).unwrap();
        }
        d.q = d.eng.setup_queue(0, 64, IOVA + RING, RING, IOVA + COMP, COMP, None, false).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(record(&d, slot), rec, "round {round}: the voided copy ran again");
    }
}

#[test]
fn a_completion_record_that_faults_is_an_error_and_halts_the_queue() {
    let mut st = Stack::new("cfault");
    let mut d = dev(&mut st, "cfault", &[], false);
    let slot = d.eng.push(&d.ram, &mut d.q, nop(false)).unwrap();
    // Point its record outside every mapping.
    let bad = Descriptor { completion: IOVA + RAM + 0x1000, ..nop(false) };
    d.ram.write(RING + u64::from(slot) * 64, &bad.to_bytes()).unwrap();
    let next = d.eng.push(&d.ram, &mut d.q, nop(false)).unwrap();
    d.eng.ring(&d.q, Doorbell::Register).unwrap();
    wait_until("the queue halts", || d.eng.queue_reg(0, regs::Q_STATUS).unwrap() & 2 != 0);
    assert_eq!(d.eng.queue_reg(0, regs::Q_STATUS).unwrap(), 0b111, "enabled, halted, completion fault");
    assert_eq!(d.eng.queue_reg(0, regs::Q_ERRORS).unwrap(), 1);
    assert_eq!(d.eng.queue_reg(0, regs::Q_COMPLETED).unwrap(), 1);
    assert_eq!(d.eng.queue_reg(0, regs::Q_HEAD).unwrap(), 1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(record(&d, next).status, status::NONE, "the queue went on after a lost record");
    // Re-enabling restarts it empty and clears the cause.
    write32(&mut d.eng.client, regs::QUEUE + regs::Q_CTRL, 0).unwrap();
    write32(&mut d.eng.client, regs::QUEUE + regs::Q_CTRL, regs::Q_CTRL_ENABLE).unwrap();
    assert_eq!(d.eng.queue_reg(0, regs::Q_STATUS).unwrap(), 1);
}

#[test]
fn an_overlapping_copy_moves_like_memmove() {
    let mut st = Stack::new("overlap");
    let mut d = dev(&mut st, "overlap", &[], false);
    let len = 300 * 1024;
    let data = fill_src(&d, len + 8192);
    for (from, to) in [(SRC, SRC + 4099), (SRC + 4099, SRC)] {
        d.ram.write(SRC, &data).unwrap();
        let c = d.eng.run(&d.ram, &mut d.q, copy(from, to, len as u32), Doorbell::Register).unwrap();
        assert_eq!(c.status, status::SUCCESS);
        let want = &data[(from - SRC) as usize..(from - SRC) as usize + len];
        assert!(d.ram.read(to, len).unwrap() == want, "copy {from:#x} -> {to:#x} is not a memmove");
    }
}

#[test]
fn without_msix_every_queue_interrupts_through_its_msi_vector() {
    let mut st = Stack::new("msi");
    // The default device has MSI beside MSI-X.
    let mut both = dev(&mut st, "both", &[], false);
    assert!(cap(&mut both.eng.client, cap_id::MSI).is_some());
    assert!(cap(&mut both.eng.client, cap_id::MSIX).is_some());
    drop(both);
    let Dev { mut eng, ram, q } = dev(&mut st, "msi", &["--no-msix"], true);
    let c = &mut eng.client;
    assert!(cap(c, cap_id::MSIX).is_none(), "an MSI-X capability with --no-msix");
    let msi = cap(c, cap_id::MSI).expect("an MSI capability");
    // Multiple Message Capable: 4 vectors; 64-bit; per-vector masking.
    let ctl = cfg16(c, msi + 2);
    assert_eq!((ctl >> 1) & 7, 2);
    assert_ne!(ctl & (1 << 7), 0);
    assert_ne!(ctl & (1 << 8), 0);
    assert_eq!(c.irq_info(irq_index::MSIX).unwrap().count, 0);
    assert_eq!(c.irq_info(irq_index::MSI).unwrap().count, 4);
    assert_eq!(c.region_info(4).unwrap().info.size, 0, "BAR 4 held only MSI-X");
    let fds: Vec<std::fs::File> = (0..4).map(|_| eventfd()).collect();
    let trig = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    c.set_irqs(irq_index::MSI, trig, 0, 4, &[], &b).unwrap();
    let mut queues = vec![q];
    for q in 1..4u64 {
        let ring = RING + q * 0x1000;
        let comp = COMP + q * 0x1000;
        queues.push(eng.setup_queue(q as usize, 16, IOVA + ring, ring, IOVA + comp, comp, None, true).unwrap());
    }
    for (i, q) in queues.iter_mut().enumerate() {
        assert_eq!(eng.run(&ram, q, nop(true), Doorbell::Register).unwrap().status, status::SUCCESS);
        for (v, f) in fds.iter().enumerate() {
            let want = u64::from(v == i);
            let got = count_within(f, Duration::from_millis(if v == i { 5000 } else { 20 }));
            assert_eq!(got, want, "queue {i}: vector {v} fired {got} times");
        }
    }
    // INTX_STATUS is not used while MSI is wired.
    assert_eq!(read32(&mut eng.client, regs::INTX_STATUS).unwrap(), 0);
    // Per-vector masking through the capability: a masked vector's
    // interrupt waits in the Pending Bits and fires on unmask.
    eng.client.region_write(region::CONFIG, msi + 16, &1u32.to_le_bytes()).unwrap();
    assert_eq!(eng.run(&ram, &mut queues[0], nop(true), Doorbell::Register).unwrap().status, status::SUCCESS);
    assert_eq!(count_within(&fds[0], Duration::from_millis(200)), 0, "a masked MSI vector fired");
    assert_eq!(eng.client.region_read(region::CONFIG, msi + 20, 4).unwrap(), 1u32.to_le_bytes());
    eng.client.region_write(region::CONFIG, msi + 16, &0u32.to_le_bytes()).unwrap();
    assert_eq!(count_within(&fds[0], Duration::from_secs(5)), 1, "the pending MSI vector was lost");
    assert_eq!(eng.client.region_read(region::CONFIG, msi + 20, 4).unwrap(), 0u32.to_le_bytes());
    // Two vectors enabled: queue q uses vector q mod 2.
    let off = proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER;
    eng.client.set_irqs(irq_index::MSI, off, 0, 0, &[], &[]).unwrap();
    eng.client.set_irqs(irq_index::MSI, trig, 0, 2, &[], &b[..2]).unwrap();
    assert_eq!(eng.run(&ram, &mut queues[3], nop(true), Doorbell::Register).unwrap().status, status::SUCCESS);
    assert_eq!(count_within(&fds[1], Duration::from_secs(5)), 1);
    assert_eq!(count_within(&fds[0], Duration::from_millis(20)), 0);
}
