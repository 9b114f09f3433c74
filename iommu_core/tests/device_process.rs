//! A device server in another process: DMA in a tight loop while the
//! session unmaps and reuses memory; kill -9 of a device server; a device
//! server that stops answering is fenced.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommu_core::client::Client;
use iommu_core::device::Channel;
use iommu_core::server::Running;
use iommu_core::tu::{self, TranslationUnit};
use iommu_core::types::*;

const IOVA: u64 = 0x10_0000;

/// Body of the device process (run through the test binary itself): binds
/// a device on the channel at fd 3, attaches its RID to the IOAS in
/// `IOASID_DEV_IOAS`, and writes 0xAA pages to `IOVA` until stdin closes.
#[test]
#[ignore = "device process of the tests in this file; not a test by itself"]
fn device_process_main() {
    let Ok(ioas) = std::env::var("IOASID_DEV_IOAS") else { return };
    let ioas: u32 = ioas.parse().unwrap();
    // SAFETY: the parent placed the channel socket at fd 3 for this process.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let ch = Arc::new(Channel::new(fd).unwrap());
    let tu = TranslationUnit::new(ch, tu::Config::default()).unwrap();
    let caps = DeviceCaps { pasid_width: 20, pri: false, dirty_tracking: false };
    let d = tu.bind(BindArgs { name: "dma-loop".into(), pci_address: "0000:00:08.0".into(), caps }).unwrap();
    tu.channel().attach(d.dev_id, None, ioas).unwrap();
    let p = tu.channel().pasid_alloc(d.dev_id).unwrap();
    tu.channel().attach(d.dev_id, Some(p), ioas).unwrap();
    println!("READY {}", d.dev_id);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        s2.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let page = [0xAAu8; 4096];
    let (mut ok, mut n) = (0u64, 0u64);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        if tu.write(d.dev_id, 0, IOVA, &page).is_ok() {
            ok += 1;
        }
    }
    println!("DONE {ok} {n}");
}

struct Rig {
    _srv: Running,
    path: std::path::PathBuf,
    s: Client,
    mem: File,
    mem_id: u32,
    ioas: u32,
}

fn rig(name: &str, limits: Limits) -> Rig {
    let dir = std::env::temp_dir().join(format!("ioasid-devproc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("core.sock");
    let srv = iommu_core::server::spawn(&path, Limits { table_pool_bytes: 64 << 20, ..limits }).unwrap();
    let mut s = Client::session(&path).unwrap();
    let mem = iommu_core::memfd::create("ram", 1 << 20).unwrap();
    let mem_id = s.register_memory(&mem).unwrap().id;
    let ioas = s.ioas_alloc().unwrap();
    Rig { _srv: srv, path, s, mem, mem_id, ioas }
}

/// Starts a device process on a new channel of the rig's session; returns
/// it with its device id once bound and attached.
fn device_process(r: &mut Rig) -> (Child, u32) {
    let (_, fd) = r.s.open_device_channel().unwrap();
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--ignored", "--exact", "device_process_main", "--nocapture", "--test-threads=1"])
        .env("IOASID_DEV_IOAS", r.ioas.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it runs in the forked child only
    // and places the channel at fd 3 without CLOEXEC.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(fd);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut dev = None;
    while out.read_line(&mut line).unwrap() > 0 {
        if let Some((_, rest)) = line.trim().split_once("READY ") {
            dev = Some(rest.trim().parse().unwrap());
            break;
        }
        line.clear();
    }
    child.stdout = Some(out.into_inner());
    (child, dev.expect("device process reported READY"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn no_dma_write_lands_after_unmap_returns_over_thousands_of_iterations() {
    let mut r = rig("sentinel", Limits::default());
    let (mut child, _dev) = device_process(&mut r);
    let sentinel = [0x55u8; 4096];
    let mut buf = [0u8; 4096];
    let iterations = 2000u64;
    let t0 = Instant::now();
    for i in 0..iterations {
        let off = (i % 16) * 4096;
        r.mem.write_all_at(&[0u8; 4096], off).unwrap();
        r.s.map(MapArgs { ioas: r.ioas, mem: r.mem_id, offset: off, length: 4096, iova: Some(IOVA), perm: Perm::RW })
            .unwrap();
        // The device is writing: wait until its DMA lands in this page.
        wait_for("the device's DMA", || {
            r.mem.read_exact_at(&mut buf, off).unwrap();
            buf[4095] == 0xAA
        });
        assert_eq!(r.s.unmap(r.ioas, IOVA, 4096).unwrap(), 4096);
        // Reuse the memory: nothing may write it any more.
        r.mem.write_all_at(&sentinel, off).unwrap();
        std::hint::spin_loop();
        r.mem.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(buf, sentinel, "a DMA write landed after unmap returned (iteration {i})");
    }
    let elapsed = t0.elapsed();
    std::thread::sleep(Duration::from_millis(20));
    for i in 0..16 {
        r.mem.read_exact_at(&mut buf, i * 4096).unwrap();
        assert_eq!(buf, sentinel, "page {i} changed after its unmap");
    }
    drop(child.stdin.take());
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(child.wait().unwrap().success());
    let done: Vec<u64> =
        out.split_once("DONE ").unwrap().1.split_whitespace().take(2).map(|x| x.parse().unwrap()).collect();
    assert!(done[0] >= iterations && done[0] < done[1], "the device wrote and faulted: {out}");
    eprintln!(
        "{iterations} map/DMA/unmap/reuse iterations in {elapsed:?}; device: {} writes ok of {}",
        done[0], done[1]
    );
}

#[test]
fn kill_9_of_a_device_server_frees_its_state_and_other_devices_keep_working() {
    let mut r = rig("kill", Limits::default());
    r.s.map(MapArgs { ioas: r.ioas, mem: r.mem_id, offset: 0, length: 1 << 20, iova: Some(IOVA), perm: Perm::RW })
        .unwrap();
    let (_, fd) = r.s.open_device_channel().unwrap();
    let tu = TranslationUnit::new(Arc::new(Channel::new(fd).unwrap()), tu::Config::default()).unwrap();
    let caps = DeviceCaps { pasid_width: 20, pri: false, dirty_tracking: false };
    let other = tu.bind(BindArgs { name: "survivor".into(), pci_address: "0000:00:09.0".into(), caps }).unwrap().dev_id;
    tu.channel().attach(other, None, r.ioas).unwrap();

    let (mut child, dev) = device_process(&mut r);
    let mut obs = Client::observer(&r.path).unwrap();
    let st = obs.status().unwrap();
    assert_eq!(st.sessions[0].devices.len(), 2);
    assert_eq!(st.ppasids.len(), 1);
    // Mid-DMA: the device is writing into the mapping.
    let mut b = [0u8; 1];
    wait_for("the device's DMA", || {
        r.mem.read_exact_at(&mut b, 4095).unwrap();
        b[0] == 0xAA
    });
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("the killed device to be unbound", || {
        let st = obs.status().unwrap();
        st.sessions[0].devices.iter().all(|d| d.id != dev)
    });
    let st = obs.status().unwrap();
    assert!(st.ppasids.is_empty(), "its pPASID was freed");
    assert_eq!(st.sessions[0].ioas[0].attached, vec![(other, 0)]);
    // Unmap does not wait on the dead server, and the survivor works.
    let t0 = Instant::now();
    r.s.unmap(r.ioas, IOVA, 1 << 20).unwrap();
    assert!(t0.elapsed() < Duration::from_millis(1500), "unmap waited {:?}", t0.elapsed());
    r.s.map(MapArgs { ioas: r.ioas, mem: r.mem_id, offset: 0, length: 4096, iova: Some(IOVA), perm: Perm::RW })
        .unwrap();
    tu.write(other, 0, IOVA + 8, b"alive").unwrap();
    let mut x = [0u8; 5];
    r.mem.read_exact_at(&mut x, 8).unwrap();
    assert_eq!(&x, b"alive");
}

#[test]
fn a_stopped_device_server_is_fenced_after_the_timeout() {
    let mut r = rig("stopped", Limits { invalidate_timeout_ms: 300, ..Limits::default() });
    r.s.map(MapArgs { ioas: r.ioas, mem: r.mem_id, offset: 0, length: 4096, iova: Some(IOVA), perm: Perm::RW })
        .unwrap();
    let (mut child, dev) = device_process(&mut r);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Signals are delivered asynchronously: wait until it is really stopped.
    wait_for("the device process to stop", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
    });
    let t0 = Instant::now();
    assert_eq!(r.s.unmap(r.ioas, IOVA, 4096).unwrap(), 4096);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(250), "unmap completed after the timeout, not before ({waited:?})");
    let st = r.s.status().unwrap();
    let d = st.sessions[0].devices.iter().find(|d| d.id == dev).unwrap();
    assert!(d.fenced);
    assert!(st.faults.iter().any(|f| f.record.dev_id == dev && f.record.reason == FaultReason::Fenced));
    // The next unmap does not wait for the fenced server.
    r.s.map(MapArgs { ioas: r.ioas, mem: r.mem_id, offset: 0, length: 4096, iova: Some(IOVA), perm: Perm::RW })
        .unwrap();
    let t0 = Instant::now();
    r.s.unmap(r.ioas, IOVA, 4096).unwrap();
    assert!(t0.elapsed() < Duration::from_millis(250));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
}
