//! `ioasidctl` as people use it: a core in a thread, the real CLI binary.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use iommu_core::types::Limits;

fn core(name: &str) -> (iommu_core::server::Running, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("ioasid-ctl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("core.sock");
    (iommu_core::server::spawn(&path, Limits::default()).unwrap(), path)
}

fn run_script(path: &std::path::Path, script: &str, extra: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ioasidctl"))
        .arg("--socket")
        .arg(path)
        .arg("run")
        .arg("-")
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn a_script_drives_a_session_and_prints_each_result() {
    let (_srv, path) = core("script");
    let script = "\
# a guest with two address spaces
mem ram 64M
ioas a
ioas b
map a ram 0 2M iova=0x200000
expect EEXIST map a ram 0 4K iova=0x200000
copy b a 0x200000 2M perm=r
translate b 0x201234
nested n a 0x200000
expect EBUSY destroy a
invalidate n 0x1000 4K
pasid p
dirty a on
reserve a 0xfee00000 0xfeefffff
ranges a
unmap a 0x200000 2M
";
    let (ok, out, err) = run_script(&path, script, &[]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("session "), "{out}");
    assert!(out.contains("line 2: mem ram 64M: memory object 1 (0x4000000 bytes, seals shrink"), "{out}");
    assert!(out.contains("line 5: map a ram 0 2M iova=0x200000: mapped at IOVA 0x200000"), "{out}");
    assert!(out.contains("line 6: map a ram 0 4K iova=0x200000: failed as expected: EEXIST"), "{out}");
    assert!(
        out.contains(
            "line 8: translate b 0x201234: system address 0x40001234 (memory object 1 offset 0x1234), r, 2 MiB page"
        ),
        "{out}"
    );
    assert!(out.contains("line 12: pasid p: pPASID 0x1"), "{out}");
    assert!(
        out.contains("line 15: ranges a: alignment 0x1000, ranges 0x0-0xfedfffff 0xfef00000-0xffffffffffff"),
        "{out}"
    );
    assert!(out.contains("line 16: unmap a 0x200000 2M: unmapped 0x200000 bytes"), "{out}");
}

#[test]
fn map_many_sends_batches_all_or_nothing() {
    let (_srv, path) = core("many");
    // 10,000 mappings: three batched requests.
    let script = "mem ram 64M\nioas a\nmap-many a ram 0 4K 10000 iova=0x100000\ntranslate a 0x280f123\n\
                  map-many a ram 0 4K 3 stride=8K mem-stride=0 perm=r\n\
                  status\nunmap-many a 0x100000 4K 10000\nstatus\n";
    let (ok, out, err) = run_script(&path, script, &[]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains(
            "line 3: map-many a ram 0 4K 10000 iova=0x100000: mapped 10000 ranges, IOVA 0x100000 to 0x280f000"
        ),
        "{out}"
    );
    assert!(out.contains("(memory object 1 offset 0x270f123)"), "{out}");
    assert!(out.contains("unmapped 0x2710000 bytes"), "{out}");
    assert!(out.contains("10003 mappings"), "{out}");
    assert!(out.contains("paging, 3 mappings"), "{out}");
    // A refused batch after accepted ones leaves nothing mapped: the
    // 4097th range overlaps.
    let script = "mem ram 64M\nioas a\nmap a ram 0 4K iova=0x2000000\n\
                  expect EEXIST map-many a ram 0 4K 5000 iova=0x1000000\nstatus\n";
    let (ok, out, err) = run_script(&path, script, &[]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("failed as expected: EEXIST: entry 0:"), "{out}");
    assert!(out.contains("paging, 1 mappings"), "{out}");
}

#[test]
fn a_failing_line_is_named_with_its_errno_and_stops_the_script() {
    let (_srv, path) = core("fail");
    let (ok, out, err) = run_script(&path, "ioas a\n\nunmap a 0x1000 4K\nioas b\n", &[]);
    assert!(!ok);
    assert!(err.contains("line 3: unmap a 0x1000 4K: ENOENT: nothing is mapped"), "{err}");
    assert!(!out.contains("line 4"), "stopped at the failure: {out}");
    // --keep-going runs the rest and still fails overall.
    let (ok, out, err) =
        run_script(&path, "ioas a\nunmap a 0x1000 4K\nexpect ENOENT ioas b\nioas c\n", &["--keep-going"]);
    assert!(!ok);
    assert!(out.contains("line 4: ioas c: IOAS"), "{out}");
    assert!(err.contains("line 3: ioas b: expected ENOENT, got success"), "{err}");
    assert!(err.contains("2 command(s) failed"), "{err}");
    // Syntax errors name the line too.
    let (ok, _, err) = run_script(&path, "ioas a\nmap a\n", &[]);
    assert!(!ok);
    assert!(err.contains("line 2: map a: usage: map IOAS MEM OFFSET LENGTH"), "{err}");
}

#[test]
fn status_prints_a_table_and_json() {
    let (_srv, path) = core("status");
    let mut s = iommu_core::client::Client::session(&path).unwrap();
    let mem = iommu_core::memfd::create("m", 1 << 21).unwrap();
    let m = s.register_memory(&mem).unwrap();
    let ioas = s.ioas_alloc().unwrap();
    let args = iommu_core::types::MapArgs {
        ioas,
        mem: m.id,
        offset: 0,
        length: 1 << 21,
        iova: Some(0x4000_0000),
        perm: iommu_core::types::Perm::RW,
    };
    s.map(args).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ioasidctl")).arg("--socket").arg(&path).arg("status").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("session {}", s.session_id())), "{text}");
    assert!(text.contains("IOAS 2: paging, 1 mappings (2 MiB)"), "{text}");
    assert!(text.contains("0x40000000-0x401fffff"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_ioasidctl"))
        .arg("--socket")
        .arg(&path)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sessions"][0]["ioas"][0]["mappings"][0]["iova"], 0x4000_0000u64);
    assert_eq!(v["sessions"][0]["memory"][0]["seals"], "shrink");
}

#[test]
fn no_core_is_one_clear_sentence() {
    let out = Command::new(env!("CARGO_BIN_EXE_ioasidctl"))
        .args(["--socket", "/nonexistent/ioasid.sock", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("ioasidctl: cannot reach the core at /nonexistent/ioasid.sock; start one with"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Runs a script with stdout and stderr on one pipe, as a terminal shows them.
fn run_merged(path: &std::path::Path, script: &str, extra: &[&str]) -> (bool, String) {
    use std::io::Read;
    let (mut r, w) = std::io::pipe().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ioasidctl"))
        .arg("--socket")
        .arg(path)
        .arg("run")
        .arg("-")
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(w.try_clone().unwrap())
        .stderr(w)
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let mut text = String::new();
    r.read_to_string(&mut text).unwrap();
    (child.wait().unwrap().success(), text)
}

#[test]
fn names_outlive_destroy_and_ppasid_names_are_not_object_ids() {
    let (_srv, path) = core("names");
    let script = "\
mem ram 2M
ioas a
destroy a
expect ENOENT destroy a
expect ENOENT map a ram 0 4K
pasid p
pasid-free p
expect ENOENT pasid-free p
";
    let (ok, out, err) = run_script(&path, script, &[]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("line 4: destroy a: failed as expected: ENOENT"), "{out}");
    assert!(out.contains("line 8: pasid-free p: failed as expected: ENOENT"), "{out}");
    // A pPASID's name never stands for an object (it once destroyed
    // memory object 1), nor an object's name for a pPASID.
    let (ok, out, err) = run_script(&path, "mem ram 2M\npasid p\ndestroy p\n", &[]);
    assert!(!ok);
    assert!(err.contains("line 3: destroy p: \"p\" names a pPASID, not an object"), "{err}");
    assert!(!out.contains("destroyed"), "{out}");
    let (ok, _, err) = run_script(&path, "mem ram 2M\npasid-free ram\n", &[]);
    assert!(!ok);
    assert!(err.contains("\"ram\" names an object, not a pPASID"), "{err}");
    // Reusing a name for a pPASID moves it to that kind.
    let (ok, out, err) = run_script(&path, "ioas x\npasid x\npasid-free x\n", &[]);
    assert!(ok, "{out}\n{err}");
}

#[test]
fn expect_takes_a_set_of_errnos_and_errors_come_in_order() {
    let (_srv, path) = core("expect-set");
    let script = "\
mem ram 2M
ioas a
expect EOVERFLOW|EINVAL map a ram 0 0
expect EEXIST|ENOENT unmap a 0x1000 4K
";
    let (ok, out, err) = run_script(&path, script, &[]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("line 3: map a ram 0 0: failed as expected: EINVAL"), "{out}");
    assert!(out.contains("line 4: unmap a 0x1000 4K: failed as expected: ENOENT"), "{out}");
    let (ok, _, err) = run_script(&path, "ioas a\nexpect EEXIST|EBUSY unmap a 0x1000 4K\n", &[]);
    assert!(!ok);
    assert!(err.contains("line 2: unmap a 0x1000 4K: expected EEXIST|EBUSY, got ENOENT"), "{err}");
    // Results and errors on one stream, in the script's order.
    let (ok, text) = run_merged(&path, "ioas a\nunmap a 0x1000 4K\nioas b\nunmap b 0 4K\nioas c\n", &["--keep-going"]);
    assert!(!ok);
    let lines: Vec<usize> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ioasidctl: ").unwrap_or(l).strip_prefix("line "))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(lines, vec![1, 2, 3, 4, 5], "{text}");
}

#[test]
fn file_registers_an_existing_file_by_path() {
    use std::os::unix::fs::FileExt;
    let (_srv, path) = core("file");
    let dir = path.parent().unwrap();
    let img = dir.join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(1 << 21).unwrap();
    f.write_all_at(b"image", 0x3000).unwrap();
    let script = format!(
        "file img {p}\nioas a\nmap a img 0 2M iova=0x400000\ntranslate a 0x403000\nfile ro {p} ro\nmap a ro 0 4K iova=0x800000 perm=r\nexpect ENOENT file x {d}/missing\n",
        p = img.display(),
        d = dir.display()
    );
    let (ok, out, err) = run_script(&path, &script, &[]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains(&format!("line 1: file img {}: memory object 1 (0x200000 bytes of", img.display())), "{out}");
    assert!(out.contains("read-write"), "{out}");
    assert!(out.contains("line 4: translate a 0x403000: system address"), "{out}");
    assert!(out.contains("(memory object 1 offset 0x3000), rw"), "{out}");
    assert!(out.contains("line 6: map a ro 0 4K iova=0x800000 perm=r: mapped at IOVA 0x800000"), "{out}");
    assert!(out.contains("line 7: file x") && out.contains("failed as expected: cannot open"), "{out}");
}

#[test]
fn page_faults_responses_page_tables_and_channels() {
    let (_srv, path) = core("session-cmds");
    let script = "\
mem ram 2M
ioas a
map a ram 0 2M iova=0x200000
page-faults a on
expect EINVAL respond 12345 success
expect EINVAL respond 1 7
faults
page-table a
page-faults a off
channel c
channel-close c
channel c
";
    let (ok, out, err) = run_script(&path, script, &[]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("line 4: page-faults a on: page faults on"), "{out}");
    assert!(out.contains("line 5: respond 12345 success: failed as expected: EINVAL"), "{out}");
    assert!(out.contains("line 7: faults: 0 fault records\n"), "{out}");
    assert!(out.contains("line 8: page-table a: "), "{out}");
    let dump: Vec<&str> =
        out.lines().skip_while(|l| !l.starts_with("line 8:")).skip(1).take_while(|l| !l.starts_with("line ")).collect();
    assert!(!dump.is_empty() && dump.iter().any(|l| l.contains("0x200000")), "{out}");
    assert!(out.contains("line 10: channel c: device channel"), "{out}");
    assert!(out.contains("line 11: channel-close c: closed device channel"), "{out}");
    assert!(out.contains("line 12: channel c: device channel"), "{out}");
    let (ok, _, err) = run_script(&path, "channel-close nothing\n", &[]);
    assert!(!ok);
    assert!(err.contains("no channel called \"nothing\""), "{err}");
}

#[test]
fn standard_input_runs_each_line_as_it_arrives() {
    use std::io::{BufRead, BufReader};
    let (_srv, path) = core("stream");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ioasidctl"))
        .arg("--socket")
        .arg(&path)
        .args(["run", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("session "), "{line}");
    // Each answer comes before the next command is sent.
    for (n, cmd, want) in
        [(1, "ioas a", "IOAS"), (2, "# a comment", ""), (3, "ioas b", "IOAS"), (4, "destroy a", "destroyed")]
    {
        writeln!(stdin, "{cmd}").unwrap();
        if want.is_empty() {
            continue;
        }
        line.clear();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with(&format!("line {n}: {cmd}: {want}")), "{line}");
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn run_hold_holds_until_sigterm_and_says_when_the_core_goes() {
    use std::io::{BufRead, BufReader};
    let (srv, path) = core("hold");
    let dir = path.parent().unwrap().to_path_buf();
    let script = dir.join("hold.script");
    std::fs::write(&script, "mem ram 2M\nioas a\nmap a ram 0 2M iova=0x200000\npasid p\n").unwrap();
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ioasidctl"))
            .arg("--socket")
            .arg(&path)
            .arg("run")
            .arg(&script)
            .arg("--hold")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut text = String::new();
        while !text.contains("pPASIDs:") {
            assert!(out.read_line(&mut text).unwrap() > 0, "{text}");
        }
        (child, out, text)
    };
    let (child, mut out, text) = start();
    assert!(text.contains("holding session"), "{text}");
    assert!(text.contains("objects: ram=1 a=2"), "{text}");
    assert!(text.contains("pPASIDs: p=0x1"), "{text}");
    // The session is still there while held.
    let mut obs = iommu_core::client::Client::observer(&path).unwrap();
    let snap = obs.status().unwrap();
    assert!(snap.sessions.iter().any(|s| s.ioas.len() == 1 && s.ppasids == vec![1]), "held: {snap:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out2 = child.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(out2.status.success());
    assert!(rest.contains("releasing session"), "{rest}");
    // A core that goes away ends the hold with an error.
    let (child, _out, _) = start();
    srv.stop().unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(!done.status.success());
    let err = String::from_utf8(done.stderr).unwrap();
    assert!(err.contains("nothing is held any more"), "{err}");
}

/// The orchestrator hands a device channel only to a control socket served
/// by its own user or root: a socket another user bound first at the path
/// is refused before anything is sent (run as root: the listener is made
/// by a process of user 65534).
#[test]
fn a_control_socket_of_another_user_is_not_trusted() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to start a listener as another user");
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = std::env::temp_dir().join(format!("ctl-untrusted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let path = dir.join("ctl.sock");
    let listen = format!(
        "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.bind({:?})\ns.listen(1)\nprint('up',flush=True)\ntime.sleep(30)",
        path.to_str().unwrap()
    );
    let mut child =
        Command::new("python3").arg("-c").arg(listen).uid(65534).gid(65534).stdout(Stdio::piped()).spawn().unwrap();
    let mut up = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut up).unwrap();
    assert_eq!(up.trim(), "up");
    let r = iommu_core::ctl::Control::connect(&path);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    match r {
        Err(iommu_core::ctl::Error::Untrusted { uid }) => assert_eq!(uid, 65534),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a control socket of user 65534 was trusted"),
    }
}
