//! Soak under faults: a real `iommu-core`, several tenants (each a
//! `vfio-user-server dma-engine` process plus a VMM process copying through
//! it with vPASID DMA) and plain session processes that map and unmap, while
//! a random participant is killed with SIGKILL at random moments and
//! restarted. A witness tenant is never killed and checks every copy.
//!
//! At the end, with every participant gone: the core still serves; its
//! sessions, pPASIDs, page tables, open fds and memory mappings are back to
//! what they were before; the witness lost no copy and no byte outside its
//! copy destination changed, in its own IOAS or in one no device reaches.
//!
//! `IOASID_SOAK_SECS` sets the duration (default 15), `IOASID_SOAK_SEED`
//! the random seed (printed).

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ioasid_stack::engine::{Doorbell, Engine, GuestRam, Queue};
use iommu_core::pagetable::Perm;
use iommu_core::types::MapArgs;
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{flag, op, status, Descriptor};

const KIOVA: u64 = 0x1000_0000;
const DIOVA: u64 = 0x2000_0000;
const DSIZE: u64 = 1 << 20;
const CHUNK: u32 = 64 << 10;
const DST: u64 = 256 << 10;
const GUARD: u64 = 512 << 10;

/// A tenant's VM: a session with IOAS K (ring, RID) and IOAS A (data,
/// vPASID 5), bound to a dma-engine server through the ioasid extension.
struct Tenant {
    _sess: iommu_core::client::Client,
    eng: Engine,
    kram: GuestRam,
    a: GuestRam,
    q: Queue,
}

fn tenant(core: &Path, sock: &Path) -> anyhow::Result<Tenant> {
    let mut sess = iommu_core::client::Client::session(core)?;
    let kram = GuestRam::new("soak-k", 1 << 20)?;
    let a = GuestRam::new("soak-a", DSIZE)?;
    let mk = sess.register_memory(kram.file.as_fd())?.id;
    let ma = sess.register_memory(a.file.as_fd())?.id;
    let (ik, ia) = (sess.ioas_alloc()?, sess.ioas_alloc()?);
    let map = |s: &mut iommu_core::client::Client, ioas, mem, len, iova| {
        s.map(MapArgs { ioas, mem, offset: 0, length: len, iova: Some(iova), perm: Perm::RW })
    };
    map(&mut sess, ik, mk, 1 << 20, KIOVA)?;
    map(&mut sess, ia, ma, DSIZE, DIOVA)?;
    let (_, chan) = sess.open_device_channel()?;
    let mut c = Client::connect(sock)?;
    c.ioasid_bind(chan.as_fd())?;
    c.ioasid_attach(None, ik, false)?;
    c.ioasid_attach(Some(5), ia, false)?;
    let mut eng = Engine::new(c)?;
    let q = eng.setup_queue(0, 64, KIOVA, 0, KIOVA + 0x10000, 0x10000, None, false)?;
    a.write(GUARD, &vec![0x5a; (DSIZE - GUARD) as usize])?;
    Ok(Tenant { _sess: sess, eng, kram, a, q })
}

/// One verified copy of fresh bytes from A+0 to A+DST through vPASID 5.
fn copy_once(t: &mut Tenant, round: u64) -> anyhow::Result<()> {
    let data: Vec<u8> = (0..CHUNK as u64).map(|i| (i.wrapping_mul(7) ^ round) as u8).collect();
    t.a.write(0, &data)?;
    let d = Descriptor {
        opcode: op::COPY,
        flags: flag::PASID,
        pasid: 5,
        len: CHUNK,
        src: DIOVA,
        dst: DIOVA + DST,
        ..Default::default()
    };
    let c = t.eng.run(&t.kram, &mut t.q, d, Doorbell::Register)?;
    anyhow::ensure!(c.status == status::SUCCESS, "copy status {}", c.status);
    anyhow::ensure!(t.a.read(DST, CHUNK as usize)? == data, "copied bytes differ");
    Ok(())
}

/// Body of a VMM process: copies through its server for ever, starting
/// over whenever the server or the core connection goes away.
#[test]
#[ignore = "helper process for a_random_participant_killed_at_random_leaks_nothing; not a test by itself"]
fn soak_vmm() {
    let (Ok(core), Ok(sock)) = (std::env::var("SOAK_CORE"), std::env::var("SOAK_SOCK")) else { return };
    println!("READY");
    let _ = std::io::stdout().flush();
    let mut round = 0u64;
    loop {
        if let Ok(mut t) = tenant(Path::new(&core), Path::new(&sock)) {
            while copy_once(&mut t, round).is_ok() {
                round += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Body of a plain session process: maps, copies, nests, allocates
/// pPASIDs and unmaps in a loop.
#[test]
#[ignore = "helper process for a_random_participant_killed_at_random_leaks_nothing; not a test by itself"]
fn soak_session() {
    let Ok(core) = std::env::var("SOAK_CORE") else { return };
    println!("READY");
    let _ = std::io::stdout().flush();
    let run = || -> anyhow::Result<()> {
        let mut s = iommu_core::client::Client::session(&core)?;
        let mem = GuestRam::new("soak-s", 4 << 20)?;
        let m = s.register_memory(mem.file.as_fd())?.id;
        let (a, b) = (s.ioas_alloc()?, s.ioas_alloc()?);
        for i in 0u64.. {
            let iova = s.map(MapArgs { ioas: a, mem: m, offset: 0, length: 4 << 20, iova: None, perm: Perm::RW })?;
            s.copy(iommu_core::types::CopyArgs {
                dst: b,
                src: a,
                src_iova: iova,
                length: 4 << 20,
                dst_iova: Some((i % 64) << 30),
                perm: Perm::R,
            })?;
            let n = s.nested_alloc(a, iova)?;
            let p = s.ppasid_alloc()?;
            s.ppasid_free(p)?;
            s.destroy(n)?;
            s.unmap(b, 0, u64::MAX)?;
            s.unmap(a, 0, u64::MAX)?;
        }
        Ok(())
    };
    loop {
        let _ = run();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A helper process of this test binary, killed with SIGKILL when dropped.
fn helper(name: &str, core: &Path, sock: Option<&Path>) -> Proc {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--ignored", "--exact", name, "--nocapture", "--test-threads=1"]).env("SOAK_CORE", core);
    if let Some(s) = sock {
        c.env("SOAK_SOCK", s);
    }
    Proc(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

fn server(core: &Path, sock: &Path) -> Proc {
    let _ = std::fs::remove_file(sock);
    let p = Command::new(bin("vfio-user-server"))
        .arg("dma-engine")
        .arg("--socket-path")
        .arg(sock)
        .arg("--core")
        .arg(core)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(sock);
    Proc(p)
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn map_count(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).map(|m| m.lines().count()).unwrap_or(0)
}

/// What must come back to its starting value.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Held {
    sessions: usize,
    ppasids: usize,
    tables: u32,
    fds: usize,
    maps: usize,
}

fn held(obs: &mut iommu_core::client::Client, pid: i32) -> Held {
    let s = obs.status().expect("the core answers observers");
    Held {
        sessions: s.sessions.len(),
        ppasids: s.ppasids.len(),
        tables: s.pool.tables_in_use,
        fds: fd_count(pid),
        maps: map_count(pid),
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn a_random_participant_killed_at_random_leaks_nothing() {
    let secs: u64 = std::env::var("IOASID_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let seed: u64 = std::env::var("IOASID_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("soak: {secs} s, seed {seed}");
    let mut rng = Rng(seed);
    let st = Stack::new("soak");
    let core_pid = st.core.as_ref().unwrap().pid();
    let core: PathBuf = st.core_sock.clone();
    let mut obs = st.observer();
    let before = held(&mut obs, core_pid);

    // The witness: never killed, checks every copy and its guard bytes.
    let wsock = st.dir.join("witness.sock");
    let wserver = server(&core, &wsock);
    let mut witness = tenant(&core, &wsock).expect("the witness starts");
    let canary = GuestRam::new("canary", 1 << 20).unwrap();
    canary.write(0, &vec![0xc3; 1 << 20]).unwrap();
    let mut csess = st.session();
    let cm = csess.register_memory(canary.file.as_fd()).unwrap().id;
    let cio = csess.ioas_alloc().unwrap();
    csess.map(MapArgs { ioas: cio, mem: cm, offset: 0, length: 1 << 20, iova: Some(DIOVA), perm: Perm::RW }).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let copies = Arc::new(AtomicU64::new(0));
    let wthread = {
        let (stop, copies) = (stop.clone(), copies.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = copy_once(&mut witness, round) {
                    return Err(format!("the witness failed at copy {round}: {e:#}"));
                }
                round += 1;
                copies.store(round, Ordering::Relaxed);
            }
            Ok(witness)
        })
    };

    // Tenants and plain sessions.
    let socks: Vec<PathBuf> = (0..2).map(|i| st.dir.join(format!("t{i}.sock"))).collect();
    let mut servers: Vec<Proc> = socks.iter().map(|s| server(&core, s)).collect();
    let mut vmms: Vec<Proc> = socks.iter().map(|s| helper("soak_vmm", &core, Some(s))).collect();
    let mut sessions: Vec<Proc> = (0..2).map(|_| helper("soak_session", &core, None)).collect();

    let mut kills = [0u32; 3];
    let mut busiest = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(100 + rng.next() % 600));
        let i = (rng.next() % 2) as usize;
        // SIGKILL first, then a fresh process in its place.
        let kill = |p: &mut Proc| {
            let _ = p.0.kill();
            let _ = p.0.wait();
        };
        match rng.next() % 3 {
            0 => {
                kill(&mut servers[i]);
                servers[i] = server(&core, &socks[i]);
                kills[0] += 1;
            }
            1 => {
                kill(&mut vmms[i]);
                vmms[i] = helper("soak_vmm", &core, Some(&socks[i]));
                kills[1] += 1;
            }
            _ => {
                kill(&mut sessions[i]);
                sessions[i] = helper("soak_session", &core, None);
                kills[2] += 1;
            }
        }
        assert!(!wthread.is_finished(), "the witness stopped while others were killed");
        busiest = busiest.max(obs.status().expect("the core answers during the soak").sessions.len());
    }
    // The witness, the canary and at least two others were in at once.
    assert!(busiest >= 4, "at most {busiest} sessions were open: the participants did not run");
    // Everyone but the witness goes, with SIGKILL.
    drop(vmms);
    drop(sessions);
    drop(servers);
    stop.store(true, Ordering::Relaxed);
    let witness = wthread.join().expect("the witness thread").unwrap_or_else(|e| panic!("{e}"));
    let n = copies.load(Ordering::Relaxed);
    eprintln!(
        "soak: {:?}, killed {} servers, {} VMMs, {} sessions; up to {busiest} sessions at once; the witness made {n} verified copies",
        start.elapsed(),
        kills[0],
        kills[1],
        kills[2]
    );
    assert!(n > 0, "the witness made no copy");
    assert!(kills.iter().sum::<u32>() >= 3, "too few kills to mean anything");
    // No byte outside the copy destination changed.
    assert!(witness.a.read(GUARD, (DSIZE - GUARD) as usize).unwrap().iter().all(|&b| b == 0x5a), "guard bytes");
    assert!(canary.read(0, 1 << 20).unwrap().iter().all(|&b| b == 0xc3), "the canary IOAS was written");
    drop(witness);
    drop(wserver);
    drop(csess);

    // Everything is back where it started.
    let t0 = Instant::now();
    loop {
        let now = held(&mut obs, core_pid);
        if now == before {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "leaked: now {now:?}, before {before:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the core still serves.
    let mut s = st.session();
    let mem = GuestRam::new("after", 1 << 20).unwrap();
    let m = s.register_memory(mem.file.as_fd()).unwrap().id;
    let io = s.ioas_alloc().unwrap();
    let iova = s.map(MapArgs { ioas: io, mem: m, offset: 0, length: 1 << 20, iova: None, perm: Perm::RW }).unwrap();
    assert_eq!(s.translate(io, iova).unwrap().mem, m);
}
