//! The `vfio-user-server` binary: help, the sentence when no core runs,
//! serving on --socket-path and on an inherited --fd, SIGTERM.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vfio_user_server::client::Client;
use vfio_user_server::devices::testdev::regs;

const BIN: &str = env!("CARGO_BIN_EXE_vfio-user-server");

#[test]
fn help_lists_devices_and_flags() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "test-device",
        "nvme",
        "--socket-path",
        "--fd",
        "--core",
        "--pasid-alloc",
        "--backing",
        "--size",
        "--read-only",
        "--trap-doorbells",
    ] {
        assert!(text.contains(want), "--help lacks {want}:\n{text}");
    }
    let out = Command::new(BIN).args(["no-such-device", "--socket-path", "/tmp/x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device called"));
    // The nvme device needs its storage, and storage it can use.
    let out = Command::new(BIN).args(["nvme", "--socket-path", "/tmp/x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nvme needs --backing FILE"));
    let tiny = std::env::temp_dir().join(format!("vus-bin-tiny-{}", std::process::id()));
    std::fs::write(&tiny, [0u8; 100]).unwrap();
    let out = Command::new(BIN).arg("nvme").arg("--backing").arg(&tiny).args(["--socket-path", "/tmp/x"]).output();
    let out = out.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("smaller than one 512-byte block"));
    let _ = std::fs::remove_file(&tiny);
}

#[test]
fn without_a_core_it_says_how_to_start_one() {
    let dir = std::env::temp_dir().join(format!("vus-bin-nocore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(BIN)
        .args(["test-device", "--socket-path"])
        .arg(dir.join("d.sock"))
        .arg("--core")
        .arg(dir.join("absent.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no iommu-core answers at") && err.contains("iommu-core --socket"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    assert!(!dir.join("d.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

fn wait_for(path: &std::path::Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serves_on_a_socket_and_exits_on_sigterm() {
    let s = Stack::new("bin-sock");
    let sock = s.dir.join("bin.sock");
    let mut child = Command::new(BIN)
        .args(["test-device", "--socket-path"])
        .arg(&sock)
        .arg("--core")
        .arg(&s.core_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&sock);
    let mut c = Client::connect(&sock).unwrap();
    c.enable_function().unwrap();
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
    drop(c);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    assert!(!sock.exists(), "the socket is removed on SIGTERM");
}

#[test]
fn serves_one_client_on_an_inherited_fd() {
    let s = Stack::new("bin-fd");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let raw = theirs.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(["test-device", "--fd", "3", "--core"]).arg(&s.core_path).stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (dup2) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    let mut c = Client::from_stream(ours);
    let mut p = zerocopy::IntoBytes::as_bytes(&vfio_user_server::proto::Version { major: 0, minor: 0 }).to_vec();
    p.extend_from_slice(b"{}\0");
    c.call(vfio_user_server::proto::cmd::VERSION, &p, &[]).unwrap();
    c.enable_function().unwrap();
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
    drop(c);
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st:?}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the server did not exit after its only client left");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Body of a process run as another user: connects to
/// `IOASID_TEST_FOREIGN_SOCKET`, sends VERSION and prints `CONNECT
/// <errno>`, `REPLY <flags>` or `CLOSED`.
#[test]
#[ignore = "helper process for other_users_are_refused_unless_allowed; not a test by itself"]
fn foreign_user_process() {
    use std::io::{Read, Write};
    let Ok(path) = std::env::var("IOASID_TEST_FOREIGN_SOCKET") else { return };
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("CONNECT {}", e.raw_os_error().unwrap_or(0));
            return;
        }
    };
    let mut p = zerocopy::IntoBytes::as_bytes(&vfio_user_server::proto::Version { major: 0, minor: 1 }).to_vec();
    p.extend_from_slice(b"{}\0");
    let h = vfio_user_server::proto::Header::command(1, vfio_user_server::proto::cmd::VERSION, p.len());
    let _ = s.write_all(zerocopy::IntoBytes::as_bytes(&h));
    let _ = s.write_all(&p);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hdr = [0u8; 16];
    match s.read_exact(&mut hdr) {
        Ok(()) => println!("REPLY {}", u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]])),
        Err(_) => println!("CLOSED"),
    }
}

/// Runs [`foreign_user_process`] as `nobody` (from a copy of this binary
/// that `nobody` may execute).
fn as_nobody(socket: &std::path::Path, scratch: &std::path::Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let exe = scratch.join("test-binary");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Another test thread that forks while the copy is open for writing
    // holds a writable fd of it until its child execs: exec then fails with
    // ETXTBSY for that moment. Try again.
    let run = || {
        Command::new(&exe)
            .args(["--ignored", "--exact", "foreign_user_process", "--nocapture", "--test-threads=1"])
            .env("IOASID_TEST_FOREIGN_SOCKET", socket)
            .uid(65534)
            .gid(65534)
            .output()
    };
    let mut tries = 0;
    let out = loop {
        match run() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.expect("run the helper as nobody"),
        }
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ["CONNECT", "REPLY", "CLOSED"]
        .iter()
        .find_map(|k| text.find(k).map(|i| text[i..].lines().next().unwrap_or("").to_string()))
        .unwrap_or_else(|| panic!("the helper printed no result: {text}"))
}

#[test]
fn other_users_are_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("other_users_are_refused_unless_allowed needs root to run a process as another user; not run");
        return;
    }
    let s = Stack::new("bin-foreign");
    std::fs::set_permissions(&s.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let start = |sock: &std::path::Path, extra: &[&str]| {
        let child = Command::new(BIN)
            .args(["test-device", "--socket-path"])
            .arg(sock)
            .arg("--core")
            .arg(&s.core_path)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(sock);
        child
    };
    let private = s.dir.join("private.sock");
    let mut a = start(&private, &[]);
    assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(as_nobody(&private, &s.dir), format!("CONNECT {}", libc::EACCES));
    // Opened up by hand: the server checks the peer and hangs up.
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(as_nobody(&private, &s.dir), "CLOSED");
    // The owner is still served, as the next client.
    let mut c = Client::connect(&private).unwrap();
    c.enable_function().unwrap();
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::ID_VALUE);
    drop(c);

    // --allow-uid lets that user in.
    let open = s.dir.join("open.sock");
    let mut b = start(&open, &["--allow-uid", "65534"]);
    assert_eq!(as_nobody(&open, &s.dir), "REPLY 1", "a VERSION reply without the error flag");
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
