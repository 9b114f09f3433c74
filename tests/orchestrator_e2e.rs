//! Issue 20's deployment without QEMU: real `iommu-core` and
//! `vfio-user-server dma-engine --control-socket` processes; this test is
//! the VMM (guest RAM in a memfd it DMA_MAPs at GPA 0, so the ring and RID
//! DMA use the compat IOAS) and the guest driver; `ioasidctl run - --hold`
//! is the orchestrator: it registers the same RAM by path, builds IOAS A
//! (all of it at 4 GiB, read-write) and B (at 8 GiB, read-only), binds the
//! engine through its control socket and attaches vPASID 5 to A and 9 to B.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};

use common::{bin, wait_for, Proc, Stack};
use ioasid_stack::engine::{Doorbell, Engine, GuestRam, Queue};
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{flag, op, status, Descriptor};
use vfio_user_server::proto;

const RAM: u64 = 16 << 20;
const GIB: u64 = 1 << 30;
/// Where the ring and completions live in guest RAM (GPA = offset).
const RING: u64 = 0x10_0000;
const COMP: u64 = 0x11_0000;

fn desc(opcode: u8, pasid: Option<u32>, src: u64, dst: u64, len: u32) -> Descriptor {
    Descriptor {
        opcode,
        flags: if pasid.is_some() { flag::PASID } else { 0 },
        pasid: pasid.unwrap_or(0),
        len,
        src,
        dst,
        ..Default::default()
    }
}

/// The orchestrator on a pipe.
struct Orchestrator {
    p: Proc,
    stdin: Option<std::process::ChildStdin>,
    out: BufReader<std::process::ChildStdout>,
    n: usize,
}

impl Orchestrator {
    fn cmd(&mut self, c: &str) -> String {
        self.n += 1;
        writeln!(self.stdin.as_mut().unwrap(), "{c}").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let prefix = format!("line {}: {c}: ", self.n);
        assert!(line.starts_with(&prefix), "{line:?} does not answer {prefix:?}");
        line[prefix.len()..].trim_end().to_string()
    }
}

fn run(eng: &mut Engine, ram: &GuestRam, q: &mut Queue, d: Descriptor) -> u8 {
    eng.run(ram, q, d, Doorbell::Mmap).unwrap().status
}

#[test]
fn an_orchestrator_routes_the_engines_vpasids_while_the_vmm_drives_it() {
    let mut st = Stack::new("orch");
    let ctl = st.dir.join("engine.ctl");
    let sock = st.server_with("dma-engine", "engine", &["--control-socket", ctl.to_str().unwrap()]);
    wait_for(&ctl);
    // The VMM: guest RAM at GPA 0 in the compat IOAS.
    let ram = GuestRam::new("guest-ram", RAM).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    c.dma_map(proto::DMA_MAP_READ | proto::DMA_MAP_WRITE, 0, 0, RAM, Some(ram.file.as_fd())).unwrap();
    let mut eng = Engine::new(c).unwrap();
    let mut q = eng.setup_queue(0, 64, RING, RING, COMP, COMP, None, false).unwrap();

    // The orchestrator, holding its session.
    let mut child = Command::new(bin("ioasidctl"))
        .arg("--socket")
        .arg(&st.core_sock)
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
    let mut o = Orchestrator { p: Proc(child), stdin, out, n: 0 };
    let path = format!("/proc/{}/fd/{}", std::process::id(), ram.file.as_raw_fd());
    o.cmd(&format!("file ram {path}"));
    o.cmd("ioas a");
    o.cmd("ioas b");
    o.cmd(&format!("map a ram 0 {RAM} iova={:#x}", 4 * GIB));
    o.cmd(&format!("map b ram 0 {RAM} iova={:#x} perm=r", 8 * GIB));
    o.cmd(&format!("bind dma {}", ctl.display()));
    assert!(o.cmd("attach dma 5 a").starts_with("vPASID 0x5 -> pPASID"));
    assert!(o.cmd("attach dma 9 b").starts_with("vPASID 0x9 -> pPASID"));

    // The guest: copies through 5 land; reads through 9 work, writes
    // through 9 fault and change nothing; 7 has no pPASID; RID descriptors
    // use the compat IOAS.
    ram.write(0x20_0000, b"guest data").unwrap();
    let s = run(&mut eng, &ram, &mut q, desc(op::COPY, Some(5), 4 * GIB + 0x20_0000, 4 * GIB + 0x30_0000, 10));
    assert_eq!(s, status::SUCCESS);
    assert_eq!(ram.read(0x30_0000, 10).unwrap(), b"guest data");
    let s = run(&mut eng, &ram, &mut q, desc(op::COPY, Some(9), 8 * GIB + 0x20_0000, 4 * GIB + 0x40_0000, 10));
    assert_eq!(s, status::FAULT_DST, "9's space has no 4 GiB window");
    let s = run(&mut eng, &ram, &mut q, desc(op::COPY, Some(9), 8 * GIB + 0x20_0000, 8 * GIB + 0x40_0000, 10));
    assert_eq!(s, status::FAULT_DST, "B is read-only");
    assert_eq!(ram.read(0x40_0000, 10).unwrap(), [0; 10]);
    let crc = desc(op::CRC32C, Some(9), 8 * GIB + 0x20_0000, 0, 10);
    assert_eq!(run(&mut eng, &ram, &mut q, crc), status::SUCCESS, "reads through 9 work");
    let s = run(&mut eng, &ram, &mut q, desc(op::COPY, Some(7), 4 * GIB + 0x20_0000, 4 * GIB + 0x50_0000, 10));
    assert_eq!(s, status::NO_PASID);
    assert_eq!(run(&mut eng, &ram, &mut q, desc(op::COPY, None, 0x20_0000, 0x60_0000, 10)), status::SUCCESS);
    assert_eq!(ram.read(0x60_0000, 10).unwrap(), b"guest data");

    // The core's view: pPASIDs only; the server's view: the vPASID map.
    let status_out = Command::new(bin("ioasidctl")).arg("--socket").arg(&st.core_sock).arg("status").output().unwrap();
    let text = String::from_utf8(status_out.stdout).unwrap();
    assert!(text.contains("dma-engine") && text.contains("vPASID 0x5 -> pPASID"), "{text}");

    // Detach 5 while the guest runs: no write lands after the detach
    // returned; attach again restores it.
    assert_eq!(o.cmd("detach dma 5"), "vPASID 0x5 detached");
    let s = run(&mut eng, &ram, &mut q, desc(op::COPY, Some(5), 4 * GIB + 0x20_0000, 4 * GIB + 0x70_0000, 10));
    assert_eq!(s, status::NO_PASID);
    assert_eq!(ram.read(0x70_0000, 10).unwrap(), [0; 10]);
    assert!(o.cmd("attach dma 5 a").starts_with("vPASID 0x5 -> pPASID"));
    let s = run(&mut eng, &ram, &mut q, desc(op::COPY, Some(5), 4 * GIB + 0x20_0000, 4 * GIB + 0x70_0000, 10));
    assert_eq!(s, status::SUCCESS);

    // The orchestrator exits: the PASID attachments go, RID DMA goes on.
    drop(o.stdin.take());
    let mut line = String::new();
    o.out.read_line(&mut line).unwrap();
    assert!(line.starts_with("holding session"), "{line}");
    assert!(o.p.terminate());
    let t0 = std::time::Instant::now();
    loop {
        let s = run(&mut eng, &ram, &mut q, desc(op::COPY, Some(5), 4 * GIB + 0x20_0000, 4 * GIB + 0x80_0000, 10));
        if s == status::NO_PASID {
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "the binding stayed");
    }
    assert_eq!(run(&mut eng, &ram, &mut q, desc(op::COPY, None, 0x20_0000, 0x90_0000, 10)), status::SUCCESS);
    assert_eq!(ram.read(0x90_0000, 10).unwrap(), b"guest data");
}
