//! The DMA-engine demo: plays the VMM against a core and a `dma-engine`
//! server. Two guest address spaces (IOASes A and B) hold the same IOVAs
//! over different memory; the device is bound to the demo's session through
//! the ioasid extension, vPASID 5 goes to A and vPASID 9 to B, the rings
//! live in a third IOAS on the RID. A batch of copies runs on two queues
//! and every byte is checked.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use iommu_core::client::Client as Session;
use iommu_core::script::{human, render_status_with};
use iommu_core::types::{MapArgs, Perm};
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{flag, op, status, Descriptor};

use crate::engine::{Doorbell, Engine, GuestRam};

/// The demo's live state: the session and the device connection stay open
/// (so the state can be looked at) until this is dropped.
pub struct EngineDemo {
    /// What it measured.
    pub summary: EngineDemoSummary,
    /// The VMM's core session.
    pub session: Session,
    /// The device connection.
    pub engine: Engine,
    /// Guest RAM: kernel, A, B.
    pub ram: Vec<GuestRam>,
}

/// What the engine demo measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineDemoSummary {
    /// pPASIDs the server chose for vPASIDs 5 and 9.
    pub ppasids: (u32, u32),
    /// Copies completed.
    pub copies: u32,
    /// Bytes copied.
    pub bytes: u64,
    /// Throughput in bytes per second.
    pub bytes_per_sec: f64,
    /// Descriptors per second.
    pub descriptors_per_sec: f64,
    /// Status of a copy with a vPASID nobody attached.
    pub unattached_status: u8,
}

const KIOVA: u64 = 0x1000_0000;
const DIOVA: u64 = 0x4000_0000;
const RING: u32 = 256;

/// Runs the demo: `copies` copies of `size` bytes per vPASID.
pub fn run_engine_demo(
    core: &Path,
    dev: &Path,
    copies: u32,
    size: u32,
    out: &mut dyn Write,
) -> anyhow::Result<EngineDemo> {
    let mut s = Session::session(core).with_context(|| format!("cannot open a session on {}", core.display()))?;
    writeln!(out, "VMM: session {} on {}", s.session_id(), core.display())?;
    let span = u64::from(copies) * u64::from(size);
    let gsize = (2 * span).next_multiple_of(2 << 20);
    let kram = GuestRam::new("kernel-ram", 1 << 20)?;
    let a = GuestRam::new("guest-a", gsize)?;
    let b = GuestRam::new("guest-b", gsize)?;
    let (mk, ma, mb) = (
        s.register_memory(kram.file.as_fd())?.id,
        s.register_memory(a.file.as_fd())?.id,
        s.register_memory(b.file.as_fd())?.id,
    );
    let (k, ia, ib) = (s.ioas_alloc()?, s.ioas_alloc()?, s.ioas_alloc()?);
    let map = |s: &mut Session, ioas, mem, len, iova| {
        s.map(MapArgs { ioas, mem, offset: 0, length: len, iova: Some(iova), perm: Perm::RW })
    };
    map(&mut s, k, mk, 1 << 20, KIOVA)?;
    map(&mut s, ia, ma, gsize, DIOVA)?;
    map(&mut s, ib, mb, gsize, DIOVA)?;
    writeln!(
        out,
        "VMM: IOAS {k} (rings, RID), IOAS {ia} (guest A) and IOAS {ib} (guest B); A and B both map {} at IOVA {DIOVA:#x}",
        human(gsize)
    )?;

    let (_, chan) = s.open_device_channel()?;
    let mut c =
        Client::connect(dev).with_context(|| format!("cannot connect to the dma-engine at {}", dev.display()))?;
    let bound = c.ioasid_bind(chan.as_fd())?;
    c.ioasid_attach(None, k, false)?;
    let p5 = c.ioasid_attach(Some(5), ia, false)?;
    let p9 = c.ioasid_attach(Some(9), ib, false)?;
    writeln!(
        out,
        "VMM: dma-engine bound as device {} of session {}; vPASID 5 -> pPASID {p5:#x} (IOAS {ia}), vPASID 9 -> pPASID {p9:#x} (IOAS {ib})",
        bound.dev_id, bound.session
    )?;

    // Sources: a different pattern in each space.
    let pattern = |space: u8, i: u32| -> Vec<u8> { (0..size).map(|j| (j as u8) ^ (i as u8) ^ space).collect() };
    for i in 0..copies {
        a.write(u64::from(i) * u64::from(size), &pattern(0xa0, i))?;
        b.write(u64::from(i) * u64::from(size), &pattern(0xb0, i))?;
    }
    let mut eng = Engine::new(c)?;
    let mut q0 = eng.setup_queue(0, RING, KIOVA, 0, KIOVA + 0x8_0000, 0x8_0000, None, false)?;
    let mut q1 = eng.setup_queue(1, RING, KIOVA + 0x4_0000, 0x4_0000, KIOVA + 0x9_0000, 0x9_0000, None, false)?;
    let desc = |vpasid: u32, i: u32| Descriptor {
        opcode: op::COPY,
        flags: flag::PASID,
        pasid: vpasid,
        len: size,
        src: DIOVA + u64::from(i) * u64::from(size),
        dst: DIOVA + span + u64::from(i) * u64::from(size),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut i = 0;
    let mut pending: Vec<(u32, u32)> = Vec::new();
    while i < copies || !pending.is_empty() {
        // Keep both rings busy, then wait for the oldest.
        while i < copies && pending.len() < (RING as usize / 2) {
            let s0 = eng.push(&kram, &mut q0, desc(5, i))?;
            let s1 = eng.push(&kram, &mut q1, desc(9, i))?;
            pending.push((s0, s1));
            i += 1;
        }
        eng.ring(&q0, Doorbell::Mmap)?;
        eng.ring(&q1, Doorbell::Mmap)?;
        let (s0, s1) = pending.remove(0);
        let c0 = eng.wait(&kram, &mut q0, s0, Duration::from_secs(30))?;
        let c1 = eng.wait(&kram, &mut q1, s1, Duration::from_secs(30))?;
        ensure!(c0.status == status::SUCCESS && c1.status == status::SUCCESS, "a copy failed: {c0:?} {c1:?}");
    }
    let dt = t0.elapsed().as_secs_f64();
    let bytes = 2 * span;
    for i in 0..copies {
        let at = span + u64::from(i) * u64::from(size);
        ensure!(a.read(at, size as usize)? == pattern(0xa0, i), "copy {i} in A is wrong");
        ensure!(b.read(at, size as usize)? == pattern(0xb0, i), "copy {i} in B is wrong");
    }
    let summary_rate = bytes as f64 / dt;
    writeln!(
        out,
        "device: {} copies of {} on 2 queues (vPASID 5 and 9) in {:.1} ms: {}/s, {:.0} descriptors/s; every byte checked, none crossed address spaces",
        2 * copies,
        human(u64::from(size)),
        dt * 1e3,
        human(summary_rate as u64),
        f64::from(2 * copies) / dt
    )?;
    // A vPASID nobody attached: an error completion and a fault in the core.
    let bad = Descriptor { pasid: 7, ..desc(7, 0) };
    let cb = eng.run(&kram, &mut q0, bad, Doorbell::Register)?;
    let faults = s.read_faults(16)?;
    writeln!(
        out,
        "device: a copy tagged with unattached vPASID 7 completed with status {} (NO_PASID = {}); the session read {} fault record(s)",
        cb.status,
        status::NO_PASID,
        faults.len()
    )?;

    let mut obs = Session::observer(core)?;
    let snap = obs.status()?;
    let mut drivers = std::collections::BTreeMap::new();
    for ses in &snap.sessions {
        for d in &ses.devices {
            if let Ok(st) = obs.driver_state(ses.id, d.id) {
                drivers.insert((ses.id, d.id), st);
            }
        }
    }
    writeln!(out, "\nwhat the core holds now (ioasidctl status):")?;
    write!(out, "{}", render_status_with(&snap, &drivers))?;
    let summary = EngineDemoSummary {
        ppasids: (p5, p9),
        copies: 2 * copies,
        bytes,
        bytes_per_sec: summary_rate,
        descriptors_per_sec: f64::from(2 * copies) / dt,
        unattached_status: cb.status,
    };
    Ok(EngineDemo { summary, session: s, engine: eng, ram: vec![kram, a, b] })
}
