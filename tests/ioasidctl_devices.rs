//! `ioasidctl` as an orchestrator: real `iommu-core` and
//! `vfio-user-server test-device --control-socket` processes, the
//! `ioasidctl` binary binding the device and attaching vPASIDs (holding
//! them with `run --hold`), and this test as the VMM driving the device's
//! DMA tagged with those vPASIDs.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, wait_for, Proc, Stack};
use vfio_user_server::client::Client;
use vfio_user_server::devices::testdev::regs;
use vfio_user_server::proto;

const A: u64 = 0x1_0000_0000;
const B: u64 = 0x2_0000_0000;

fn rd32(c: &mut Client, off: u64) -> u32 {
    let b = c.region_read(0, off, 4).unwrap();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn wr(c: &mut Client, off: u64, v: &[u8]) {
    c.region_write(0, off, v).unwrap();
}

/// One test-device copy; its status.
fn copy(c: &mut Client, src: u64, dst: u64, len: u32, vpasid: Option<u32>) -> u32 {
    let done0 = rd32(c, regs::DMA_DONE) + rd32(c, regs::DMA_ERRORS);
    wr(c, regs::DMA_SRC, &src.to_le_bytes());
    wr(c, regs::DMA_DST, &dst.to_le_bytes());
    wr(c, regs::DMA_LEN, &len.to_le_bytes());
    wr(c, regs::DMA_PASID, &vpasid.map_or(0, |v| v | regs::PASID_VALID).to_le_bytes());
    wr(c, regs::DMA_CMD, &1u32.to_le_bytes());
    let t0 = Instant::now();
    loop {
        if rd32(c, regs::DMA_DONE) + rd32(c, regs::DMA_ERRORS) != done0 {
            return rd32(c, regs::DMA_STATUS);
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "copy did not finish");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn at(f: &std::fs::File, off: u64) -> [u8; 5] {
    let mut b = [0u8; 5];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn ioasidctl(core: &Path) -> Command {
    let mut c = Command::new(bin("ioasidctl"));
    c.arg("--socket").arg(core);
    c
}

/// Runs a script to its end: (success, stdout, stderr).
fn run_script(core: &Path, dir: &Path, name: &str, script: &str) -> (bool, String, String) {
    let file = dir.join(name);
    std::fs::write(&file, script).unwrap();
    let out = ioasidctl(core).arg("run").arg(&file).output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// What `ioasidctl status` prints.
fn core_status(core: &Path) -> String {
    let out = ioasidctl(core).arg("status").output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what} did not happen");
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Rig {
    s: Stack,
    ctl: PathBuf,
    ram_path: PathBuf,
    ram: std::fs::File,
    c: Client,
}

/// A core, a test-device server with a control socket, and guest RAM in
/// a file the VMM maps for the device's RID (its compat IOAS) and the
/// orchestrator registers by path.
fn rig(name: &str) -> Rig {
    let mut s = Stack::new(name);
    let ctl = s.dir.join("ctl.sock");
    let ctl_arg = ctl.to_str().unwrap().to_string();
    let sock = s.server_with("test-device", "dev", &["--control-socket", &ctl_arg]);
    wait_for(&ctl);
    let ram_path = s.dir.join("guest-ram");
    let ram = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&ram_path).unwrap();
    ram.set_len(2 << 20).unwrap();
    ram.write_all_at(b"hello", 0).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    c.enable_function().unwrap();
    c.dma_map(proto::DMA_MAP_READ | proto::DMA_MAP_WRITE, 0, 0, 2 << 20, Some(ram.as_fd())).unwrap();
    Rig { s, ctl, ram_path, ram, c }
}

#[test]
fn run_hold_binds_a_device_and_keeps_its_vpasids_until_sigterm() {
    let mut r = rig("ctl-hold");
    let script = format!(
        "\
file ram {ram}
ioas a
ioas b
map a ram 0 2M iova={A:#x}
map b ram 0 2M iova={B:#x} perm=r
bind dev {ctl}
attach dev 5 a
attach dev 9 a
expect EBUSY attach dev 5 b
replace dev 9 b
expect EINVAL attach dev 0 a
attach dev rid a
detach dev rid
vpasids dev
",
        ram = r.ram_path.display(),
        ctl = r.ctl.display()
    );
    let file = r.s.dir.join("hold.script");
    std::fs::write(&file, script).unwrap();
    let child = ioasidctl(&r.s.core_sock)
        .arg("run")
        .arg(&file)
        .arg("--hold")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut holder = Proc(child);
    let mut out = BufReader::new(holder.0.stdout.take().unwrap());
    let mut text = String::new();
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "ioasidctl ended early:\n{text}");
        text.push_str(&line);
        if line.starts_with("device dev ") {
            break;
        }
    }
    assert!(text.contains("line 6: bind dev"), "{text}");
    assert!(text.contains("line 9: attach dev 5 b: failed as expected: IOASID_ATTACH refused: EBUSY"), "{text}");
    assert!(text.contains("line 11: attach dev 0 a: failed as expected: IOASID_ATTACH refused: EINVAL"), "{text}");
    assert!(text.contains("line 12: attach dev rid a: RID -> IOAS 2"), "{text}");
    assert!(text.contains("line 13: detach dev rid: RID detached"), "{text}");
    assert!(text.contains("holding session"), "{text}");
    assert!(text.contains("objects: ram=1 a=2 b=3"), "{text}");
    assert!(text.contains("vPASID 0x5 -> pPASID"), "{text}");
    assert!(text.contains("-> IOAS 3"), "{text}");

    // The VMM's DMA through the orchestrator's vPASIDs: 5 writes guest RAM
    // through A, 9 reads through B and cannot write, 7 goes nowhere, the
    // RID stays on the VMM's compat IOAS.
    assert_eq!(copy(&mut r.c, A, A + 0x1000, 5, Some(5)), regs::STATUS_DONE);
    assert_eq!(&at(&r.ram, 0x1000), b"hello");
    assert_eq!(copy(&mut r.c, B, A + 0x2000, 5, Some(9)), regs::STATUS_ERROR, "9 cannot reach A's IOVAs");
    assert_eq!(copy(&mut r.c, B, B + 0x2000, 5, Some(9)), regs::STATUS_ERROR, "B is read-only");
    assert_eq!(at(&r.ram, 0x2000), [0; 5]);
    assert_eq!(copy(&mut r.c, A, A + 0x3000, 5, Some(7)), regs::STATUS_ERROR);
    assert_eq!(at(&r.ram, 0x3000), [0; 5]);
    assert_eq!(copy(&mut r.c, 0, 0x4000, 5, None), regs::STATUS_DONE);
    assert_eq!(&at(&r.ram, 0x4000), b"hello");
    // The core's view: the device and its pPASIDs; the server's map
    // through the core's driver-state relay.
    let st = core_status(&r.s.core_sock);
    assert!(st.contains("test-device") && st.contains("vPASID 0x9 -> pPASID"), "{st}");
    // A second orchestrator is turned away while this one holds the device.
    let (ok, _, err) = run_script(
        &r.s.core_sock,
        &r.s.dir,
        "second.script",
        &format!("ioas x\nbind other {}\nvpasids other\n", r.ctl.display()),
    );
    assert!(!ok);
    assert!(err.contains("line 2: bind other") && err.contains("control socket"), "{err}");

    // SIGTERM: the holder releases everything; RID DMA keeps working.
    let pid = nix::unistd::Pid::from_raw(holder.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = holder.0.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(status.success(), "{rest}");
    assert!(rest.contains("releasing session"), "{rest}");
    wait_until("the vPASID map to go", || copy(&mut r.c, A, A + 0x5000, 5, Some(5)) == regs::STATUS_ERROR);
    r.ram.write_all_at(&[0; 5], 0x5000).unwrap();
    assert_eq!(copy(&mut r.c, A, A + 0x5000, 5, Some(5)), regs::STATUS_ERROR);
    assert_eq!(at(&r.ram, 0x5000), [0; 5]);
    assert_eq!(copy(&mut r.c, 0, 0x6000, 5, None), regs::STATUS_DONE);
    assert_eq!(&at(&r.ram, 0x6000), b"hello");
    assert!(!core_status(&r.s.core_sock).contains("vPASID 0x9"));
}

#[test]
fn a_script_without_hold_releases_its_binding_at_the_end() {
    let mut r = rig("ctl-nohold");
    let script = format!(
        "file ram {}\nioas a\nmap a ram 0 2M iova={A:#x}\nbind dev {}\nattach dev 5 a\nvpasids dev\nunbind dev\nbind dev {}\nattach dev 6 a\n",
        r.ram_path.display(),
        r.ctl.display(),
        r.ctl.display()
    );
    let (ok, out, err) = run_script(&r.s.core_sock, &r.s.dir, "nohold.script", &script);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("line 6: vpasids dev: RID on the device server's compat IOAS; vPASID 0x5 -> pPASID"), "{out}");
    assert!(out.contains("line 7: unbind dev: unbound"), "{out}");
    assert!(out.contains("line 9: attach dev 6 a: vPASID 0x6 -> pPASID"), "{out}");
    // The script ended: so did its binding.
    wait_until("the binding to go", || copy(&mut r.c, A, A + 0x1000, 5, Some(6)) == regs::STATUS_ERROR);
    r.ram.write_all_at(&[0; 5], 0x1000).unwrap();
    assert_eq!(copy(&mut r.c, A, A + 0x1000, 5, Some(6)), regs::STATUS_ERROR);
    assert_eq!(at(&r.ram, 0x1000), [0; 5]);
    // Commands on a device never bound are script errors.
    let (ok, _, err) = run_script(&r.s.core_sock, &r.s.dir, "bad.script", "vpasids nothing\n");
    assert!(!ok);
    assert!(err.contains("line 1: vpasids nothing: no device called \"nothing\" was bound"), "{err}");
}

/// An `ioasidctl run - --hold` fed through a pipe: each command's answer
/// line.
struct Live {
    p: Proc,
    stdin: Option<std::process::ChildStdin>,
    out: BufReader<std::process::ChildStdout>,
    n: usize,
}

impl Live {
    fn start(core: &Path) -> Live {
        let mut child = ioasidctl(core)
            .args(["run", "-", "--hold"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert!(first.starts_with("session "), "{first}");
        Live { p: Proc(child), stdin, out, n: 0 }
    }

    /// Sends one command and returns its result line.
    fn cmd(&mut self, c: &str) -> String {
        use std::io::Write;
        self.n += 1;
        writeln!(self.stdin.as_mut().unwrap(), "{c}").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        // The echo leaves an `expect ERRNO` prefix out.
        let echo = c.strip_prefix("expect ").and_then(|r| r.split_once(' ')).map_or(c, |(_, rest)| rest);
        let prefix = format!("line {}: {echo}: ", self.n);
        assert!(line.starts_with(&prefix), "{line:?} does not answer {prefix:?}");
        line[prefix.len()..].trim_end().to_string()
    }
}

#[test]
fn an_orchestrator_detaches_and_reattaches_while_the_device_runs() {
    let mut r = rig("ctl-live");
    let mut o = Live::start(&r.s.core_sock);
    o.cmd(&format!("file ram {}", r.ram_path.display()));
    o.cmd("ioas a");
    o.cmd(&format!("map a ram 0 2M iova={A:#x}"));
    let chan = o.cmd("channel c");
    assert!(chan.starts_with("device channel "), "{chan}");
    let bound = o.cmd(&format!("bind dev {} channel=c", r.ctl.display()));
    assert!(bound.starts_with("device "), "{bound}");
    let p5 = o.cmd("attach dev 5 a");
    assert!(p5.starts_with("vPASID 0x5 -> pPASID"), "{p5}");
    assert_eq!(copy(&mut r.c, A, A + 0x1000, 5, Some(5)), regs::STATUS_DONE);
    assert_eq!(&at(&r.ram, 0x1000), b"hello");

    // A DMA fault through vPASID 5 reaches the orchestrator's session as a
    // record with the pPASID (never the vPASID).
    assert_eq!(copy(&mut r.c, A, A + (4 << 20), 5, Some(5)), regs::STATUS_ERROR);
    let faults = o.cmd("faults");
    let ppasid = p5.split("pPASID ").nth(1).unwrap().split(' ').next().unwrap().to_string();
    assert!(faults.starts_with("1 fault records: dev "), "{faults}");
    assert!(faults.contains(&format!("pPASID {ppasid} IOVA {:#x}", A + (4 << 20))), "{faults}");

    // Detach while the device runs: the next DMA on 5 fails and writes
    // nothing; attach again and it works.
    assert_eq!(o.cmd("detach dev 5"), "vPASID 0x5 detached");
    assert_eq!(copy(&mut r.c, A, A + 0x2000, 5, Some(5)), regs::STATUS_ERROR);
    assert_eq!(at(&r.ram, 0x2000), [0; 5]);
    assert!(o.cmd("attach dev 5 a").starts_with("vPASID 0x5 -> pPASID"));
    assert_eq!(copy(&mut r.c, A, A + 0x3000, 5, Some(5)), regs::STATUS_DONE);
    assert_eq!(&at(&r.ram, 0x3000), b"hello");
    // A refused command is reported and the pipe goes on (one failure
    // would stop a script without --keep-going: here it is the last).
    assert!(o.cmd("expect EBUSY attach dev 5 a").starts_with("failed as expected"));

    // End of input: the holder holds; SIGTERM releases.
    drop(o.stdin.take());
    let mut line = String::new();
    o.out.read_line(&mut line).unwrap();
    assert!(line.starts_with("holding session"), "{line}");
    assert_eq!(copy(&mut r.c, A, A + 0x4000, 5, Some(5)), regs::STATUS_DONE);
    assert!(o.p.terminate(), "SIGTERM ends the hold with status 0");
    wait_until("the binding to go", || copy(&mut r.c, A, A + 0x5000, 5, Some(5)) == regs::STATUS_ERROR);
}
