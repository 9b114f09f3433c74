//! The stack's end-to-end pieces, shared by examples and tests: the
//! DMA-engine demo that the README's first command runs, the core demo,
//! a driver for the `dma-engine` device (`engine`) and one for the `nvme`
//! device (`nvme`).

#![deny(missing_docs)]

pub mod engine;
mod engine_demo;
pub mod nvme;

pub use engine_demo::{run_engine_demo, EngineDemo, EngineDemoSummary};

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context};
use iommu_core::client::Client;
use iommu_core::script::{human, render_status};
use iommu_core::types::{CopyArgs, InvalidateScope, MapArgs, Perm};
use iommu_core::Errno;

/// What the demo saw, for tests and for its last lines.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoSummary {
    /// IOVA the guest RAM was mapped at.
    pub ram_iova: u64,
    /// Page size the walk found for guest RAM.
    pub ram_page_size: u64,
    /// Errnos of the three refused operations, in order.
    pub refused: Vec<Errno>,
    /// pPASIDs allocated.
    pub ppasids: Vec<u32>,
    /// Map+unmap pairs per second over the socket.
    pub map_unmap_per_sec: f64,
    /// Sessions the observer saw after the demo session closed.
    pub sessions_after: usize,
    /// Tables in use after the demo session closed.
    pub tables_after: u32,
}

/// Runs the demo session against the core at `socket`, writing what it does
/// to `out`.
pub fn run_demo(socket: &Path, pairs: u32, out: &mut dyn Write) -> anyhow::Result<DemoSummary> {
    let mut s = Client::session(socket).with_context(|| format!("cannot open a session on {}", socket.display()))?;
    writeln!(out, "session {} opened on {}", s.session_id(), socket.display())?;

    let ram_size = 256u64 << 20;
    let ram = iommu_core::memfd::create("guest-ram", ram_size)?;
    let m = s.register_memory(&ram)?;
    writeln!(
        out,
        "registered guest RAM: memory object {} ({}), seals {}, system address {:#x}",
        m.id,
        human(m.size),
        m.seals,
        m.system_address
    )?;

    let guest = s.ioas_alloc()?;
    let ram_iova =
        s.map(MapArgs { ioas: guest, mem: m.id, offset: 0, length: ram_size, iova: None, perm: Perm::RW })?;
    let t = s.translate(guest, ram_iova + 0x12_3456)?;
    writeln!(
        out,
        "IOAS {guest}: guest RAM mapped at IOVA {ram_iova:#x}; IOVA {:#x} -> system address {:#x} through a {} leaf",
        ram_iova + 0x12_3456,
        t.system_address,
        human(t.page_size)
    )?;

    let dev = s.ioas_alloc()?;
    s.add_reserved(dev, 0xfee0_0000, 0xfeef_ffff)?;
    let dev_iova = s.copy(CopyArgs {
        dst: dev,
        src: guest,
        src_iova: ram_iova,
        length: 16 << 20,
        dst_iova: Some(0x1000_0000),
        perm: Perm::R,
    })?;
    let ranges = s.iova_ranges(dev)?;
    let rs: Vec<String> = ranges.ranges.iter().map(|r| format!("{:#x}-{:#x}", r.start, r.last)).collect();
    writeln!(
        out,
        "IOAS {dev}: first 16 MiB of guest RAM copied read-only to IOVA {dev_iova:#x}; MSI window reserved; usable ranges {}",
        rs.join(" ")
    )?;

    let mut refused = Vec::new();
    let e = s
        .map(MapArgs { ioas: guest, mem: m.id, offset: 0, length: 4096, iova: Some(ram_iova), perm: Perm::RW })
        .err()
        .and_then(|e| e.errno());
    writeln!(out, "refused as iommufd would: map over an existing mapping -> {e:?}")?;
    refused.extend(e);
    let e = s.unmap(guest, ram_iova, 4096).err().and_then(|e| e.errno());
    writeln!(out, "refused as iommufd would: unmap of part of a mapping -> {e:?}")?;
    refused.extend(e);
    let e = s.destroy(m.id).err().and_then(|e| e.errno());
    writeln!(out, "refused as iommufd would: destroy of mapped memory -> {e:?}")?;
    refused.extend(e);

    let nested = s.nested_alloc(guest, ram_iova)?;
    s.invalidate(nested, InvalidateScope::All)?;
    writeln!(out, "IOAS {nested}: nested on {guest} with its stage-1 root at guest IOVA {ram_iova:#x}; invalidated")?;

    let ppasids = vec![s.ppasid_alloc()?, s.ppasid_alloc()?];
    writeln!(out, "pPASIDs allocated from the global 20-bit space: {:#x} {:#x}", ppasids[0], ppasids[1])?;

    s.set_dirty_tracking(guest, true)?;
    let bm = s.dirty_bitmap(guest, ram_iova, 2 << 20, 4096, false)?;
    let dirty: u32 = bm.iter().map(|w| w.count_ones()).sum();
    writeln!(out, "dirty tracking on for IOAS {guest}: {dirty} dirty pages (no device has written yet)")?;

    let scratch = s.ioas_alloc()?;
    let t0 = Instant::now();
    for _ in 0..pairs {
        let args = MapArgs { ioas: scratch, mem: m.id, offset: 0, length: 4096, iova: None, perm: Perm::RW };
        let iova = s.map(args)?;
        s.unmap(scratch, iova, 4096)?;
    }
    let rate = f64::from(pairs) / t0.elapsed().as_secs_f64();
    writeln!(out, "{pairs} map+unmap pairs of 4 KiB over the socket: {rate:.0} pairs/s")?;

    let mut obs = Client::observer(socket)?;
    writeln!(out, "\nwhat an observer sees now:\n{}", render_status(&obs.status()?))?;
    drop(s);
    // The session's objects go when its connection does.
    let mut after = obs.status()?;
    for _ in 0..100 {
        if after.sessions.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        after = obs.status()?;
    }
    ensure!(after.sessions.is_empty(), "the demo session is still present after it closed");
    writeln!(
        out,
        "session closed: {} sessions, {} tables in use, {} pPASIDs left",
        after.sessions.len(),
        after.pool.tables_in_use,
        after.ppasids.len()
    )?;
    Ok(DemoSummary {
        ram_iova,
        ram_page_size: t.page_size,
        refused,
        ppasids,
        map_unmap_per_sec: rate,
        sessions_after: after.sessions.len(),
        tables_after: after.pool.tables_in_use,
    })
}
