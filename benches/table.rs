//! Every performance figure of the stack in one table, each beside the
//! reference it is judged against, measured in the same run: a raw
//! Unix-socket echo server of this harness for round trips, `memcpy` of the
//! same bytes for copies. Run by `scripts/bench.sh` (release binaries of
//! the workspace must be built first; the script does it).
//!
//! Every figure is taken three times; the table gives the minimum and the
//! median, and the ratios of minimum to minimum and median to median.
//! Round trips are measured with the client, the servers and the echo
//! server pinned to CPU 0 (cross-CPU wake-ups on a small machine cost more
//! than the work measured); the rest runs unpinned.
//!
//! Without `--bench` (as `cargo test --benches` runs it) every count is
//! cut down so the harness only proves that it runs.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasid_stack::engine::{Doorbell, Engine, GuestRam, Queue, TwoSpaces};
use iommu_core::client::Client as CoreClient;
use iommu_core::pagetable::Perm;
use iommu_core::types::{MapArgs, MapEntry};

/// Mappings per `MapBatch` (the most a request may hold).
const BATCH: usize = 4096;
use vfio_user_server::client::Client as VfuClient;
use vfio_user_server::devices::dma_engine::{flag, op, regs as eregs, status, Descriptor};
use vfio_user_server::devices::testdev::regs as tregs;
use vfio_user_server::proto;

/// The environment variable that turns this binary into the echo server.
const ECHO_ENV: &str = "IOASID_BENCH_ECHO";

/// Minimum and median of three (or more) samples.
#[derive(Clone, Copy, Debug)]
struct Fig {
    min: f64,
    med: f64,
}

fn fig(mut v: Vec<f64>) -> Fig {
    v.sort_by(f64::total_cmp);
    Fig { min: v[0], med: v[v.len() / 2] }
}

#[derive(Clone, Copy)]
enum Unit {
    Secs,
    Bytes,
    Percent,
}

#[derive(Clone, Copy)]
enum Goal {
    /// figure ÷ reference at most this (median).
    Ratio(f64),
    /// figure at most this (median), in the row's unit.
    Max(f64),
    /// A reference row.
    None,
}

struct Row {
    name: String,
    unit: Unit,
    val: Fig,
    reference: Option<(&'static str, Fig)>,
    goal: Goal,
    goal_text: String,
}

fn show(v: f64, u: Unit) -> String {
    match u {
        Unit::Secs if v < 1e-6 => format!("{:.1} ns", v * 1e9),
        Unit::Secs if v < 1e-3 => format!("{:.2} µs", v * 1e6),
        Unit::Secs if v < 1.0 => format!("{:.1} ms", v * 1e3),
        Unit::Secs => format!("{v:.2} s"),
        Unit::Bytes => format!("{v:.0} B"),
        Unit::Percent => format!("{v:.2} %"),
    }
}

fn print_table(rows: &[Row]) {
    println!("| figure | min | median | reference (same run): min / median | ratio: min / median | goal | met |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let (refs, ratio) = match &r.reference {
            Some((name, f)) => (
                format!("{name}: {} / {}", show(f.min, Unit::Secs), show(f.med, Unit::Secs)),
                format!("{:.2} / {:.2}", r.val.min / f.min, r.val.med / f.med),
            ),
            None => ("—".into(), "—".into()),
        };
        let met = match (r.goal, &r.reference) {
            (Goal::Ratio(x), Some((_, f))) => Some(r.val.med / f.med <= x),
            (Goal::Max(x), _) => Some(r.val.med <= x),
            _ => None,
        };
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} | {refs} | {ratio} | {} | {met} |",
            r.name,
            show(r.val.min, r.unit),
            show(r.val.med, r.unit),
            r.goal_text
        );
    }
}

/// Pins the calling thread (and what it spawns from now on) to `cpus`.
fn pin(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside
    // it; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins every thread of process `pid` to `cpus`.
fn pin_process(pid: u32, cpus: &[usize]) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|v| v.parse::<i32>().ok()) else { continue };
        // SAFETY: as in `pin`, for another thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// The CPUs this process could run on when it started (before any `pin`).
static START_CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

fn all_cpus() -> Vec<usize> {
    START_CPUS
        .get_or_init(|| {
            // SAFETY: a zeroed cpu_set_t is a valid empty set that
            // sched_getaffinity fills; CPU_ISSET only reads it.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                    return vec![0];
                }
                (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
            }
        })
        .clone()
}

/// A child process, stopped with SIGTERM when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

fn bin_dir() -> PathBuf {
    // target/<profile>/deps/table-HASH -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn spawn(cmd: &mut Command, ready: &Path, log: &Path) -> Proc {
    let err = std::fs::File::create(log).unwrap();
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().unwrap();
    let p = Proc(child);
    let t0 = Instant::now();
    while !ready.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{} did not start; see {}", ready.display(), log.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    p
}

fn core(dir: &Path, name: &str) -> (Proc, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let mut c = Command::new(bin_dir().join("iommu-core"));
    c.arg("--socket").arg(&sock).arg("--max-mappings-per-ioas").arg("4194304");
    (spawn(&mut c, &sock, &dir.join(format!("{name}.log"))), sock)
}

fn device(dir: &Path, dev: &str, core: &Path) -> (Proc, PathBuf) {
    let sock = dir.join(format!("{dev}.sock"));
    let mut c = Command::new(bin_dir().join("vfio-user-server"));
    c.arg(dev).arg("--socket-path").arg(&sock).arg("--core").arg(core);
    (spawn(&mut c, &sock, &dir.join(format!("{dev}.log"))), sock)
}

/// The echo server: one `read` and one `write` of what was read, per
/// message, on each connection in turn.
fn echo_main(path: &str) {
    let l = UnixListener::bind(path).unwrap();
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    }
}

fn echo_rt(s: &mut UnixStream, n: u64) -> f64 {
    // The sizes of a 4-byte REGION_READ (32 bytes) and its reply.
    let req = [1u8; 32];
    let mut r = [0u8; 32];
    let t0 = Instant::now();
    for _ in 0..n {
        s.write_all(&req).unwrap();
        s.read_exact(&mut r).unwrap();
    }
    t0.elapsed().as_secs_f64() / n as f64
}

fn per_op(n: u64, mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        f();
    }
    t0.elapsed().as_secs_f64() / n as f64
}

/// Every 4-byte register offset of BAR 0 of the dma-engine.
fn engine_registers() -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = [
        ("ID", eregs::ID),
        ("VERSION", eregs::VERSION),
        ("NUM_QUEUES", eregs::NUM_QUEUES),
        ("MAX_XFER", eregs::MAX_XFER),
        ("CTRL", eregs::CTRL),
        ("STATUS", eregs::STATUS),
        ("INTX_STATUS", eregs::INTX_STATUS),
    ]
    .iter()
    .map(|(n, o)| (n.to_string(), *o))
    .collect();
    let q = [
        ("RING_BASE", eregs::Q_RING_BASE),
        ("RING_BASE+4", eregs::Q_RING_BASE + 4),
        ("RING_SIZE", eregs::Q_RING_SIZE),
        ("RING_PASID", eregs::Q_RING_PASID),
        ("CTRL", eregs::Q_CTRL),
        ("HEAD", eregs::Q_HEAD),
        ("TAIL", eregs::Q_TAIL),
        ("STATUS", eregs::Q_STATUS),
        ("COMPLETED", eregs::Q_COMPLETED),
        ("COMPLETED+4", eregs::Q_COMPLETED + 4),
        ("ERRORS", eregs::Q_ERRORS),
    ];
    for i in 0..4u64 {
        for (n, o) in q {
            v.push((format!("Q{i}_{n}"), eregs::QUEUE + i * eregs::QUEUE_STRIDE + o));
        }
    }
    v
}

/// Every 4-byte register offset of BAR 0 of the test device.
fn testdev_registers() -> Vec<(String, u64)> {
    [
        ("ID", tregs::ID),
        ("SCRATCH", tregs::SCRATCH),
        ("SCRATCH+4", tregs::SCRATCH + 4),
        ("DMA_SRC", tregs::DMA_SRC),
        ("DMA_SRC+4", tregs::DMA_SRC + 4),
        ("DMA_DST", tregs::DMA_DST),
        ("DMA_DST+4", tregs::DMA_DST + 4),
        ("DMA_LEN", tregs::DMA_LEN),
        ("DMA_PASID", tregs::DMA_PASID),
        ("DMA_CMD", tregs::DMA_CMD),
        ("DMA_STATUS", tregs::DMA_STATUS),
        ("DMA_DONE", tregs::DMA_DONE),
        ("DMA_ERRORS", tregs::DMA_ERRORS),
        ("IRQ", tregs::IRQ),
        ("INTX", tregs::INTX),
        ("DOORBELL", tregs::DOORBELL),
    ]
    .iter()
    .map(|(n, o)| (n.to_string(), *o))
    .collect()
}

/// A section of the table.
type Section = fn(&Path, bool, &mut Vec<Row>);

/// Per register: (name, read samples, write samples).
type RegSamples = Vec<(String, Vec<f64>, Vec<f64>)>;

/// One device's registers, the client that reaches them and their samples.
struct RegBench<'a> {
    client: &'a mut VfuClient,
    regs: &'a [(String, u64)],
    out: &'a mut RegSamples,
}

/// One sample of every register of every device and of the echo, taken
/// interleaved: `reps` passes, each an echo block and then a block of `m`
/// reads and `m` writes of each register in turn, so that whatever slows
/// the machine for a while weighs on the echo and on every register alike.
/// Returns the echo's mean round trip; each register gets its mean read
/// and write round trip pushed to its samples.
fn registers(echo: &mut UnixStream, devs: &mut [RegBench<'_>], reps: u64, m: u64) -> f64 {
    let mut values = Vec::new();
    for d in devs.iter_mut() {
        if d.out.is_empty() {
            d.out.extend(d.regs.iter().map(|(name, _)| (name.clone(), Vec::new(), Vec::new())));
        }
        // Writing back the value read leaves the device as it was (a write
        // to a read-only register is dropped; W1C registers read 0 here).
        values.push(d.regs.iter().map(|(_, off)| d.client.region_read(0, *off, 4).unwrap()).collect::<Vec<_>>());
    }
    let mut sums: Vec<Vec<(f64, f64)>> = devs.iter().map(|d| vec![(0.0, 0.0); d.regs.len()]).collect();
    let mut echo_sum = 0.0;
    for _ in 0..reps {
        echo_sum += echo_rt(echo, 4 * m);
        for ((d, vals), sum) in devs.iter_mut().zip(&values).zip(sums.iter_mut()) {
            for (((_, off), v), s) in d.regs.iter().zip(vals).zip(sum.iter_mut()) {
                let mut b = [0u8; 4];
                s.0 += per_op(m, || d.client.region_read_into(0, *off, &mut b).unwrap());
                s.1 += per_op(m, || d.client.region_write(0, *off, v).unwrap());
            }
        }
    }
    for (d, sum) in devs.iter_mut().zip(sums) {
        for (o, (r, w)) in d.out.iter_mut().zip(sum) {
            o.1.push(r / reps as f64);
            o.2.push(w / reps as f64);
        }
    }
    echo_sum / reps as f64
}

fn worst(rows: &mut Vec<Row>, dev: &str, samples: &RegSamples, echo: Fig, goal: f64) {
    for (which, pick) in [("REGION_READ", 1usize), ("REGION_WRITE", 2)] {
        let figs: Vec<(String, Fig)> =
            samples.iter().map(|(n, r, w)| (n.clone(), fig(if pick == 1 { r.clone() } else { w.clone() }))).collect();
        let (name, f) = figs.iter().max_by(|a, b| a.1.med.total_cmp(&b.1.med)).unwrap();
        let mut meds: Vec<f64> = figs.iter().map(|(_, f)| f.med).collect();
        meds.sort_by(f64::total_cmp);
        rows.push(Row {
            name: format!(
                "{which} 4 B, {dev}: slowest of {} registers ({name}; median register {})",
                figs.len(),
                show(meds[meds.len() / 2], Unit::Secs)
            ),
            unit: Unit::Secs,
            val: *f,
            reference: Some(("echo", echo)),
            goal: Goal::Ratio(goal),
            goal_text: format!("≤ {goal} × echo"),
        });
    }
}

/// Round trips, all pinned to CPU 0: echo, registers of both devices
/// (interleaved with echo blocks, see [`registers`]),
/// DMA_MAP+DMA_UNMAP of 2 MiB, the core's map+unmap of 4 KiB.
fn round_trips(dir: &Path, quick: bool, rows: &mut Vec<Row>) {
    pin(&[0]);
    let echo_path = dir.join("echo.sock");
    let mut ec = Command::new(std::env::current_exe().unwrap());
    ec.env(ECHO_ENV, &echo_path);
    let _echo = spawn(&mut ec, &echo_path, &dir.join("echo.log"));
    let (_core, core_sock) = core(dir, "core-rt");
    let (_eng, eng_sock) = device(dir, "dma-engine", &core_sock);
    let (_tdev, tdev_sock) = device(dir, "test-device", &core_sock);
    let mut echo = UnixStream::connect(&echo_path).unwrap();
    let mut eng = VfuClient::connect(&eng_sock).unwrap();
    eng.enable_function().unwrap();
    let mut tdev = VfuClient::connect(&tdev_sock).unwrap();
    tdev.enable_function().unwrap();
    let mut s = CoreClient::session(&core_sock).unwrap();
    let ram = iommu_core::memfd::create("rt", 2 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    let ioas = s.ioas_alloc().unwrap();
    let dmem = iommu_core::memfd::create("dma-map", 2 << 20).unwrap();
    let rw = proto::DMA_MAP_READ | proto::DMA_MAP_WRITE;

    let k = if quick { 100 } else { 1 };
    let (n_echo, reps, n_map, n_core) = (20_000 / k, 20 / k.min(10), 2_000 / k, 5_000 / k);
    let (ereg, treg) = (engine_registers(), testdev_registers());
    let (mut e_echo, mut e_map, mut e_core) = (Vec::new(), Vec::new(), Vec::new());
    let (mut eng_s, mut tdev_s) = (RegSamples::new(), RegSamples::new());
    // Warm everything once.
    echo_rt(&mut echo, n_echo / 4);
    for _round in 0..3 {
        let mut devs = [
            RegBench { client: &mut eng, regs: &ereg, out: &mut eng_s },
            RegBench { client: &mut tdev, regs: &treg, out: &mut tdev_s },
        ];
        e_echo.push(registers(&mut echo, &mut devs, reps, 100));
        e_map.push(per_op(n_map, || {
            eng.dma_map(rw, 0, 0x20_0000, 2 << 20, Some(dmem.as_fd())).unwrap();
            eng.dma_unmap(0x20_0000, 2 << 20, 0).unwrap();
        }));
        e_core.push(per_op(n_core, || {
            let args = MapArgs { ioas, mem, offset: 0, length: 4096, iova: Some(0x1000), perm: Perm::RW };
            s.map(args).unwrap();
            s.unmap(ioas, 0x1000, 4096).unwrap();
        }));
        e_echo.push(echo_rt(&mut echo, n_echo));
    }
    let echo_f = fig(e_echo);
    rows.push(Row {
        name: "raw Unix-socket echo round trip, 32 B (the reference)".into(),
        unit: Unit::Secs,
        val: echo_f,
        reference: None,
        goal: Goal::None,
        goal_text: String::new(),
    });
    worst(rows, "dma-engine", &eng_s, echo_f, 1.15);
    worst(rows, "test-device", &tdev_s, echo_f, 1.15);
    rows.push(Row {
        name: "DMA_MAP + DMA_UNMAP of a 2 MiB memfd, per pair (dma-engine, compat IOAS)".into(),
        unit: Unit::Secs,
        val: fig(e_map),
        reference: Some(("echo", echo_f)),
        goal: Goal::Ratio(3.0),
        goal_text: "≤ 3 × echo".into(),
    });
    rows.push(Row {
        name: "core map + unmap of 4 KiB over the socket, per pair".into(),
        unit: Unit::Secs,
        val: fig(e_core),
        reference: Some(("echo", echo_f)),
        goal: Goal::Ratio(2.2),
        goal_text: "≤ 2.2 × echo".into(),
    });
    pin(&all_cpus());
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 10^6 mappings of 4 KiB over the socket, and the core's memory per
/// mapping (its anonymous memory, page tables aside: those live in the
/// shared table pool).
fn many_mappings(dir: &Path, quick: bool, rows: &mut Vec<Row>) {
    let n: u64 = if quick { 10_000 } else { 1_000_000 };
    let (mut times, mut bytes) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let (core_p, sock) = core(dir, &format!("core-many{round}"));
        let mut s = CoreClient::session(&sock).unwrap();
        let ram = iommu_core::memfd::create("many", 4096).unwrap();
        let mem = s.register_memory(ram.as_fd()).unwrap().id;
        let ioas = s.ioas_alloc().unwrap();
        let before = status_kib(core_p.pid(), "RssAnon:");
        let t0 = Instant::now();
        let mut i = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        while i < n {
            batch.clear();
            while batch.len() < BATCH && i < n {
                let iova = Some(0x1_0000_0000 + i * 0x2000);
                batch.push(MapEntry { mem, offset: 0, length: 4096, iova, perm: Perm::RW });
                i += 1;
            }
            s.map_batch(ioas, &batch).unwrap();
        }
        times.push(t0.elapsed().as_secs_f64() * (1_000_000.0 / n as f64));
        let after = status_kib(core_p.pid(), "RssAnon:");
        bytes.push(after.saturating_sub(before) as f64 * 1024.0 / n as f64);
    }
    rows.push(Row {
        name: "10^6 mappings of 4 KiB made over the socket (MapBatch, 4,096 a request)".into(),
        unit: Unit::Secs,
        val: fig(times),
        reference: None,
        goal: Goal::Max(1.0),
        goal_text: "≤ 1 s".into(),
    });
    rows.push(Row {
        name: "core memory per mapping (anonymous RSS growth ÷ mappings; tables are in the shared pool)".into(),
        unit: Unit::Bytes,
        val: fig(bytes),
        reference: None,
        goal: Goal::Max(64.0),
        goal_text: "≤ 64 B".into(),
    });
}

/// The translation unit in this process: IOTLB hit, cold walk, and a DMA
/// copy through translation against memcpy of the same bytes.
fn translation(dir: &Path, quick: bool, rows: &mut Vec<Row>) {
    use iommu_core::device::Channel;
    use iommu_core::tu::{self, TranslationUnit};
    use iommu_core::types::{BindArgs, DeviceCaps};
    use std::os::unix::fs::FileExt;

    let path = dir.join("core-tu.sock");
    let limits = iommu_core::types::Limits { table_pool_bytes: 64 << 20, ..Default::default() };
    let srv = iommu_core::server::spawn(&path, limits).unwrap();
    let mut s = CoreClient::session(&path).unwrap();
    let size = 8u64 << 20;
    let file = iommu_core::memfd::create("tu", size).unwrap();
    file.write_all_at(&[1], size - 1).unwrap();
    let mem = s.register_memory(&file).unwrap().id;
    let ioas = s.ioas_alloc().unwrap();
    s.map(MapArgs { ioas, mem, offset: 0, length: size, iova: Some(0x100_0000), perm: Perm::RW }).unwrap();
    // 1 MiB in 4 KiB leaves (the object's offset is not 2 MiB aligned):
    // a walk there reads all four levels.
    s.map(MapArgs { ioas, mem, offset: 0x1000, length: 1 << 20, iova: Some(0x800_0000), perm: Perm::RW }).unwrap();
    let mut dev = |cfg: tu::Config| {
        let (_, fd) = s.open_device_channel().unwrap();
        let tu = TranslationUnit::new(Arc::new(Channel::new(fd).unwrap()), cfg).unwrap();
        let caps = DeviceCaps { pasid_width: 20, pri: false, dirty_tracking: false };
        let d = tu.bind(BindArgs { name: "bench".into(), pci_address: "0000:00:04.0".into(), caps }).unwrap().dev_id;
        tu.channel().attach(d, None, ioas).unwrap();
        (tu, d)
    };
    let (hot, d) = dev(tu::Config::default());
    let (cold, dc) = dev(tu::Config { iotlb_entries: 1, ..tu::Config::default() });
    let k = if quick { 100 } else { 1 };
    let n = 2_000_000 / k;
    // DMA-issuing queues hold a handle each (tu::Handle): the goal rows
    // go through one; the thread-local way (callers with no handle) is
    // shown beside them.
    let (mut hh, mut hc) = (hot.handle(), cold.handle());
    let (mut hit, mut hit_tl, mut walk) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        hit.push(per_op(n, || {
            hh.check(d, 0, std::hint::black_box(0x100_0040), 64, Perm::R).unwrap();
        }));
        hit_tl.push(per_op(n, || {
            hot.check(d, 0, std::hint::black_box(0x100_0040), 64, Perm::R).unwrap();
        }));
        let mut flip = 0u64;
        walk.push(per_op(n / 4, || {
            flip ^= 0x2_0000;
            hc.check(dc, 0, std::hint::black_box(0x800_0040 + flip), 64, Perm::R).unwrap();
        }));
    }
    rows.push(Row {
        name: "IOTLB hit (a 64 B access checked, nothing copied; a queue's handle)".into(),
        unit: Unit::Secs,
        val: fig(hit),
        reference: None,
        goal: Goal::Max(10e-9),
        goal_text: "≤ 10 ns".into(),
    });
    rows.push(Row {
        name: "IOTLB hit, the same through the thread's own IOTLB (no handle)".into(),
        unit: Unit::Secs,
        val: fig(hit_tl),
        reference: None,
        goal: Goal::None,
        goal_text: "—".into(),
    });
    rows.push(Row {
        name: "cold 4-level walk (an IOTLB of one entry, two 4 KiB leaves in turn; a handle)".into(),
        unit: Unit::Secs,
        val: fig(walk),
        reference: None,
        goal: Goal::Max(100e-9),
        goal_text: "≤ 100 ns".into(),
    });
    for (len, name, goal) in [(4096usize, "4 KiB", 0.75), (64 << 10, "64 KiB", 0.95), (1 << 20, "1 MiB", 0.95)] {
        // Page-aligned, like the mapped object the unit copies within:
        // memcpy's speed depends on the alignment.
        let mut src = memmap2::MmapMut::map_anon(len).unwrap();
        src.fill(0x5a);
        let mut dst = memmap2::MmapMut::map_anon(len).unwrap();
        dst.fill(0);
        let reps = ((256u64 << 20) / len as u64 / k).max(4);
        let (mut t_tu, mut t_mc) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            t_mc.push(per_op(reps, || {
                std::hint::black_box(&mut dst[..]).copy_from_slice(std::hint::black_box(&src[..]));
            }));
            let (from, to) =
                (tu::At { dev: d, pasid: 0, iova: 0x100_0000 }, tu::At { dev: d, pasid: 0, iova: 0x140_0000 });
            t_tu.push(per_op(reps, || hh.copy(from, to, std::hint::black_box(len)).unwrap()));
        }
        let bound = 1.0 / goal;
        rows.push(Row {
            name: format!("DMA copy of {name} through translation, object to object (time; a handle)"),
            unit: Unit::Secs,
            val: fig(t_tu),
            reference: Some(("memcpy", fig(t_mc))),
            goal: Goal::Ratio(bound),
            goal_text: format!("≥ {goal} of memcpy (≤ {bound:.3} ×)"),
        });
    }
    drop((hh, hc, hot, cold));
    drop(s);
    srv.stop().unwrap();
}

const KIOVA: u64 = 0x1000_0000;
const DIOVA: u64 = 0x4000_0000;
const RING: u32 = 1024;

fn run_copies(eng: &mut Engine, kram: &GuestRam, q: &mut Queue, size: u32, n: u64, span: u64) -> f64 {
    let per_batch = (span / u64::from(size)).max(1);
    let t0 = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    let (mut i, mut done) = (0u64, 0u64);
    while done < n {
        while i < n && pending.len() < (RING as usize - 1) {
            let off = (i % per_batch) * u64::from(size);
            let d = Descriptor {
                opcode: op::COPY,
                flags: flag::PASID,
                pasid: 5,
                len: size,
                src: DIOVA + off,
                dst: DIOVA + span + off,
                ..Default::default()
            };
            pending.push_back(eng.push(kram, q, d).unwrap());
            i += 1;
        }
        eng.ring(q, Doorbell::Mmap).unwrap();
        // Reap what is done (at least one), then refill.
        while let Some(&slot) = pending.front() {
            let c = eng.wait(kram, q, slot, Duration::from_secs(60)).unwrap();
            assert_eq!(c.status, status::SUCCESS);
            pending.pop_front();
            done += 1;
            if pending.len() < (RING as usize) / 2 {
                break;
            }
        }
    }
    t0.elapsed().as_secs_f64() / n as f64
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 12th and stime the 13th of them.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// The dma-engine end to end (a separate server process; descriptors
/// submitted through the mmap-ed doorbell, completions polled in guest
/// RAM), and what its idle queues cost.
fn engine(dir: &Path, quick: bool, rows: &mut Vec<Row>) {
    let (_core, core_sock) = core(dir, "core-eng");
    let (eng_p, eng_sock) = device(dir, "dma-engine", &core_sock);
    let gsize = 64u64 << 20;
    let rig = TwoSpaces::new(&core_sock, &eng_sock, gsize, KIOVA, DIOVA, 5).unwrap();
    let (kram, mut eng) = (rig.kram, rig.engine);
    // Ring at the start of kram, completion records from 256 KiB.
    let mut q = eng.setup_queue(0, RING, KIOVA, 0, KIOVA + 0x4_0000, 0x4_0000, None, false).unwrap();
    let kq = if quick { 200 } else { 1 };
    for (size, total, goal, label) in [
        (64u32, 1_000_000u64, None, "64 B"),
        (4096, 200_000, Some(3.0), "4 KiB"),
        (64 << 10, 20_000, Some(1.25), "64 KiB"),
        (1 << 20, 1_500, Some(1.1), "1 MiB"),
    ] {
        let n = (total / kq).max(8);
        let span = (gsize / 2).min(u64::from(size) * 256);
        run_copies(&mut eng, &kram, &mut q, size, n.min(2_000), span);
        let (mut te, mut tm) = (Vec::new(), Vec::new());
        // Page-aligned, like guest RAM (memcpy's speed depends on it).
        let mut src = memmap2::MmapMut::map_anon(span as usize).unwrap();
        src.fill(1);
        let mut dst = memmap2::MmapMut::map_anon(span as usize).unwrap();
        dst.fill(0);
        let per_batch = (span / u64::from(size)).max(1);
        for _ in 0..3 {
            te.push(run_copies(&mut eng, &kram, &mut q, size, n, span));
            let mut i = 0u64;
            tm.push(per_op(n, || {
                let off = ((i % per_batch) * u64::from(size)) as usize;
                i += 1;
                std::hint::black_box(&mut dst)[off..off + size as usize]
                    .copy_from_slice(&src[off..off + size as usize]);
            }));
        }
        match goal {
            None => rows.push(Row {
                name: format!("dma-engine, {label} copies on one queue: time per descriptor"),
                unit: Unit::Secs,
                val: fig(te),
                reference: None,
                goal: Goal::Max(1e-6),
                goal_text: "≥ 1 M/s (≤ 1 µs each)".into(),
            }),
            Some(x) => rows.push(Row {
                name: format!("dma-engine, {label} copies end to end (time per descriptor)"),
                unit: Unit::Secs,
                val: fig(te),
                reference: Some(("memcpy", fig(tm))),
                goal: Goal::Ratio(x),
                goal_text: format!("≤ {x} × memcpy"),
            }),
        }
    }
    // Idle: every queue enabled, nothing submitted.
    for i in 1..4 {
        let off = 0x8_0000 + i as u64 * 0x1_0000;
        eng.setup_queue(i, 64, KIOVA + off, off, KIOVA + off + 0x4000, off + 0x4000, None, false).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let secs = if quick { 0.3 } else { 3.0 };
    let mut idle = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let c0 = cpu_ticks(eng_p.pid());
        std::thread::sleep(Duration::from_secs_f64(secs));
        let used = (cpu_ticks(eng_p.pid()) - c0) as f64 / hz;
        idle.push(100.0 * used / t0.elapsed().as_secs_f64() / 4.0);
    }
    rows.push(Row {
        name: "dma-engine idle: CPU per enabled queue (4 queues, server process total ÷ 4)".into(),
        unit: Unit::Percent,
        val: fig(idle),
        reference: None,
        goal: Goal::Max(1.0),
        goal_text: "≤ 1 % each".into(),
    });
    drop(eng);
}

fn read_tree(p: &Path, files: &mut u64) {
    let Ok(rd) = std::fs::read_dir(p) else { return };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            read_tree(&e.path(), files);
        } else if ft.is_file() && std::fs::read(e.path()).is_ok() {
            *files += 1;
        }
    }
}

/// Times `cats` reads of an IOAS's `mappings` while a session of its own
/// maps and unmaps 1 MiB in a loop: in an IOAS of its own (`same` false:
/// `hot_file` is read), or in the IOAS read (`same`: the churning session
/// first maps `big` mappings of 4 KiB there). Returns the times, the lines
/// of the last read and the churn's pairs per second while reading.
fn cat_under_churn(
    sock: &Path,
    mnt: &Path,
    hot_file: &Path,
    big: u64,
    same: bool,
    cats: usize,
) -> (Vec<f64>, usize, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let pairs = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let churn = {
        let (stop, sock, pairs) = (stop.clone(), sock.to_path_buf(), pairs.clone());
        std::thread::spawn(move || {
            let mut c = CoreClient::session(&sock).unwrap();
            let r = iommu_core::memfd::create("churn", 1 << 20).unwrap();
            let m = c.register_memory(r.as_fd()).unwrap().id;
            let a = c.ioas_alloc().unwrap();
            if same {
                let all: Vec<MapEntry> = (0..big)
                    .map(|k| MapEntry {
                        mem: m,
                        offset: 0,
                        length: 0x1000,
                        iova: Some(0x1000_0000 + k * 0x2000),
                        perm: Perm::R,
                    })
                    .collect();
                for chunk in all.chunks(BATCH) {
                    c.map_batch(a, chunk).unwrap();
                }
            }
            tx.send((c.session_id(), a)).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let args =
                    MapArgs { ioas: a, mem: m, offset: 0, length: 1 << 20, iova: Some(0x4000_0000), perm: Perm::RW };
                c.map(args).unwrap();
                c.unmap(a, 0x4000_0000, 1 << 20).unwrap();
                n += 1;
                pairs.store(n, Ordering::Relaxed);
            }
        })
    };
    let (csid, ca) = rx.recv().unwrap();
    let file = if same { mnt.join(format!("ioas/{csid}.{ca}/mappings")) } else { hot_file.to_path_buf() };
    // Measure only once the churn runs.
    while pairs.load(Ordering::Relaxed) < 100 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut times = Vec::new();
    let mut lines = 0;
    let (p0, t_cats) = (pairs.load(Ordering::Relaxed), Instant::now());
    for _ in 0..cats {
        let t0 = Instant::now();
        let text = std::fs::read_to_string(&file).unwrap();
        times.push(t0.elapsed().as_secs_f64());
        lines = text.lines().count();
    }
    let rate = (pairs.load(Ordering::Relaxed) - p0) as f64 / t_cats.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    (times, lines, rate)
}

/// The file system on a real core and a real `ioasid-fs`: one IOAS of
/// 10,000 mappings read while a session maps and unmaps in a loop (in
/// another IOAS, and in that one);
/// a tree of 1,000 IOASes and 100,000 mappings read whole, and `ls -R`.
fn file_system(dir: &Path, quick: bool, rows: &mut Vec<Row>) {
    let (_core, sock) = core(dir, "core-fs");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fc = Command::new(bin_dir().join("ioasid-fs"));
    fc.arg("--core").arg(&sock).arg(&mnt);
    let fs = spawn(&mut fc, &mnt.join("sessions"), &dir.join("fs.log"));
    let mut s = CoreClient::session(&sock).unwrap();
    let ram = iommu_core::memfd::create("fs", 1 << 20).unwrap();
    let mem = s.register_memory(ram.as_fd()).unwrap().id;
    let (n_ioas, per, big) = if quick { (20u32, 10u64, 1_000u64) } else { (1_000, 100, 10_000) };
    // `count` mappings of 4 KiB, one every 8 KiB, in batches.
    let map = |s: &mut CoreClient, ioas: u32, count: u64| {
        let all: Vec<MapEntry> = (0..count)
            .map(|k| MapEntry { mem, offset: 0, length: 0x1000, iova: Some(0x1000_0000 + k * 0x2000), perm: Perm::R })
            .collect();
        for chunk in all.chunks(BATCH) {
            s.map_batch(ioas, chunk).unwrap();
        }
    };
    let hot = s.ioas_alloc().unwrap();
    map(&mut s, hot, big);
    let hot_file = mnt.join(format!("ioas/{}.{hot}/mappings", s.session_id()));
    let cats = if quick { 5 } else { 45 };
    for same in [false, true] {
        let (times, lines, rate) = cat_under_churn(&sock, &mnt, &hot_file, big, same, cats);
        let whose = if same { "the same IOAS" } else { "another session's IOAS" };
        rows.push(Row {
            name: format!("ioasid-fs: cat of one IOAS's mappings ({lines} lines) while {whose} maps and unmaps 1 MiB ({rate:.0} pairs/s)"),
            unit: Unit::Secs,
            val: fig(times),
            reference: None,
            goal: Goal::Max(0.05),
            goal_text: "≤ 50 ms p50".into(),
        });
    }
    s.destroy(hot).unwrap();
    for _ in 0..n_ioas {
        let a = s.ioas_alloc().unwrap();
        map(&mut s, a, per);
    }
    // Unpinned, as a user runs it; then the reader and every thread of
    // ioasid-fs on CPU 0, which shows what the cross-CPU wake-ups of each
    // FUSE request cost on this machine.
    for pinned in [false, true] {
        if pinned {
            pin(&[0]);
            pin_process(fs.pid(), &[0]);
        }
        let (mut tree, mut ls) = (Vec::new(), Vec::new());
        let mut files = 0;
        for _ in 0..3 {
            let t0 = Instant::now();
            files = 0;
            read_tree(&mnt, &mut files);
            tree.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            let out = Command::new("ls").arg("-R").arg(&mnt).stdout(Stdio::null()).status().unwrap();
            ls.push(t0.elapsed().as_secs_f64());
            assert!(out.success());
        }
        let how = if pinned { "reader and ioasid-fs pinned to one CPU" } else { "unpinned" };
        rows.push(Row {
            name: format!(
                "ioasid-fs: read every file of a tree of {n_ioas} IOASes, {} mappings ({files} files), {how}",
                u64::from(n_ioas) * per
            ),
            unit: Unit::Secs,
            val: fig(tree),
            reference: None,
            goal: Goal::Max(1.0),
            goal_text: "≤ 1 s".into(),
        });
        rows.push(Row {
            name: format!("ioasid-fs: ls -R of that tree, {how}"),
            unit: Unit::Secs,
            val: fig(ls),
            reference: None,
            goal: Goal::Max(0.3),
            goal_text: "≤ 0.3 s".into(),
        });
    }
    pin(&all_cpus());
    pin_process(fs.pid(), &all_cpus());
}

fn main() {
    if let Some(p) = std::env::var_os(ECHO_ENV) {
        echo_main(&p.to_string_lossy());
        return;
    }
    let quick = !std::env::args().any(|a| a == "--bench");
    let only: Vec<String> =
        std::env::var("IOASID_BENCH_ONLY").map(|v| v.split(',').map(str::to_string).collect()).unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let dir = std::env::temp_dir().join(format!("ioasid-bench-table-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Taken before any section pins this thread.
    all_cpus();
    let mut rows = Vec::new();
    let sections: [(&str, Section); 5] =
        [("rt", round_trips), ("many", many_mappings), ("tu", translation), ("engine", engine), ("fs", file_system)];
    for (name, f) in sections {
        if want(name) {
            let t0 = Instant::now();
            f(&dir, quick, &mut rows);
            eprintln!("bench: section {name} took {:.1} s", t0.elapsed().as_secs_f64());
        }
    }
    print_table(&rows);
    let _ = std::fs::remove_dir_all(&dir);
}
