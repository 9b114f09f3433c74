//! The `vfio-user-server` binary: help, the sentence when no core runs,
//! serving on --socket-path and on an inherited --fd, SIGTERM.

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
    for want in ["test-device", "--socket-path", "--fd", "--core", "--pasid-alloc"] {
        assert!(text.contains(want), "--help lacks {want}:\n{text}");
    }
    let out = Command::new(BIN).args(["no-such-device", "--socket-path", "/tmp/x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device called"));
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
