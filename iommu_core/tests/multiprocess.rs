//! Multi-process tests: the real `iommu-core` binary, clients in other
//! processes, hostile peers on the real socket.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iommu_core::client::Client;
use iommu_core::types::*;
use iommu_core::wire::{self, Reply, Request, Role};
use iommu_core::Errno;

struct Daemon {
    child: Child,
    path: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("ioasid-mp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

impl Daemon {
    fn start(name: &str, extra: &[&str]) -> Daemon {
        let dir = temp_dir(name);
        let path = dir.0.join("core.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_iommu-core"))
            .arg("--socket")
            .arg(&path)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .expect("start iommu-core");
        let t = Instant::now();
        while UnixStream::connect(&path).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "iommu-core did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, path, _dir: dir }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn map_args(ioas: u32, mem: u32, length: u64) -> MapArgs {
    MapArgs { ioas, mem, offset: 0, length, iova: None, perm: Perm::RW }
}

/// Body of the client process (run through the test binary itself).
#[test]
#[ignore = "helper process for killed_client_frees_everything_it_owned; not a test by itself"]
fn client_process() {
    let Ok(path) = std::env::var("IOASID_TEST_CLIENT_SOCKET") else { return };
    let mut s = Client::session(&path).unwrap();
    let mem = iommu_core::memfd::create("child", 8 << 20).unwrap();
    let m = s.register_memory(&mem).unwrap();
    let a = s.ioas_alloc().unwrap();
    let b = s.ioas_alloc().unwrap();
    for i in 0..4 {
        s.map(MapArgs { offset: i << 20, ..map_args(a, m.id, 1 << 20) }).unwrap();
    }
    s.copy(CopyArgs { dst: b, src: a, src_iova: 0x10_0000, length: 4 << 20, dst_iova: None, perm: Perm::R }).ok();
    s.nested_alloc(a, 0x10_0000).unwrap();
    s.ppasid_alloc().unwrap();
    s.ppasid_alloc().unwrap();
    println!("READY {}", s.session_id());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn killed_client_frees_everything_it_owned() {
    let d = Daemon::start("kill", &[]);
    let mut obs = Client::observer(&d.path).unwrap();
    let before = obs.status().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "client_process", "--nocapture", "--test-threads=1"])
        .env("IOASID_TEST_CLIENT_SOCKET", &d.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut sid = None;
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        // libtest may print its own prefix on the same line.
        if let Some((_, rest)) = line.trim().split_once("READY ") {
            sid = Some(rest.trim().parse::<u64>().unwrap());
            break;
        }
        line.clear();
    }
    let sid = sid.expect("child client reported READY");
    let during = obs.status().unwrap();
    let ses = during.sessions.iter().find(|s| s.id == sid).expect("child session visible");
    assert_eq!(ses.objects, 4, "memory, two IOASes, one nested");
    assert_eq!(ses.ppasids.len(), 2);
    assert!(during.pool.tables_in_use > before.pool.tables_in_use);

    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    loop {
        let now = obs.status().unwrap();
        if now.sessions.iter().all(|s| s.id != sid) {
            assert_eq!(now.pool.tables_in_use, before.pool.tables_in_use, "page tables freed");
            assert!(now.ppasids.is_empty(), "pPASIDs freed");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "session of the killed client still present");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sessions_cannot_see_or_name_each_others_objects() {
    let d = Daemon::start("iso", &[]);
    let mut a = Client::session(&d.path).unwrap();
    let mut b = Client::session(&d.path).unwrap();
    let mem = iommu_core::memfd::create("a", 1 << 20).unwrap();
    let m = a.register_memory(&mem).unwrap();
    let ioas = a.ioas_alloc().unwrap();
    let iova = a.map(map_args(ioas, m.id, 1 << 20)).unwrap();
    let p = a.ppasid_alloc().unwrap();

    // B's own ids start at 1 as well, and B cannot reach A's objects by id.
    assert_eq!(b.destroy(ioas).unwrap_err().errno(), Some(Errno::ENOENT));
    assert_eq!(b.unmap(ioas, iova, 1 << 20).unwrap_err().errno(), Some(Errno::ENOENT));
    assert_eq!(b.translate(ioas, iova).unwrap_err().errno(), Some(Errno::ENOENT));
    assert_eq!(b.map(map_args(ioas, m.id, 4096)).unwrap_err().errno(), Some(Errno::ENOENT));
    assert_eq!(b.ppasid_free(p).unwrap_err().errno(), Some(Errno::ENOENT));
    let bi = b.ioas_alloc().unwrap();
    assert_eq!(b.map(map_args(bi, m.id, 4096)).unwrap_err().errno(), Some(Errno::ENOENT));

    // A session's status shows only itself; an observer sees both.
    let sb = b.status().unwrap();
    assert_eq!(sb.sessions.len(), 1);
    assert_eq!(sb.sessions[0].id, b.session_id());
    assert!(sb.ppasids.is_empty());
    let all = Client::observer(&d.path).unwrap().status().unwrap();
    assert_eq!(all.sessions.len(), 2);
    // A still has everything.
    assert_eq!(a.translate(ioas, iova).unwrap().mem, m.id);
}

#[test]
fn observers_are_read_only_and_device_channels_cannot_be_opened() {
    let d = Daemon::start("ro", &[]);
    let mut o = Client::observer(&d.path).unwrap();
    assert_eq!(o.ioas_alloc().unwrap_err().errno(), Some(Errno::EPERM));
    assert_eq!(o.ppasid_alloc().unwrap_err().errno(), Some(Errno::EPERM));
    assert!(o.status().is_ok());
    let e = Client::connect(&d.path, Role::DeviceChannel).err().unwrap();
    assert_eq!(e.errno(), Some(Errno::EPERM));
}

/// Reads whatever the daemon answers on a raw connection: an error reply
/// (its errno) or `None` for a closed connection.
fn raw_answer(mut s: UnixStream) -> Option<i32> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut r = wire::FrameReader::new(1 << 20, 0);
    r.push(&buf, Vec::new());
    match r.next_frame() {
        Ok(Some(f)) => match wire::decode::<wire::FromCore>(&f.payload).unwrap().body {
            wire::FromCore::Reply(Reply::Error { errno, .. }) => Some(errno),
            other => panic!("unexpected reply {other:?}"),
        },
        _ => None,
    }
}

fn hello_bytes() -> Vec<u8> {
    let hello = Request::Hello { magic: wire::MAGIC, major: wire::VERSION_MAJOR, minor: 0, role: Role::Session };
    wire::encode(1, &hello, 0).unwrap()
}

/// Requests and the end of the stream that arrive together, before the
/// core looks (it is stopped meanwhile), are all seen: the core answers
/// and closes, though no event follows the short read of the requests.
#[test]
fn requests_and_the_end_of_the_stream_seen_in_one_event_are_all_served() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let d = Daemon::start("eof-one-event", &[]);
    let pid = Pid::from_raw(d.child.id() as i32);
    let mut s = UnixStream::connect(&d.path).unwrap();
    // Accepted and watched (an observer asks the core, which answers only
    // once every earlier connection has been accepted).
    let mut o = Client::observer(&d.path).unwrap();
    o.generation().unwrap();
    kill(pid, Signal::SIGSTOP).unwrap();
    let mut bytes = hello_bytes();
    bytes.extend(wire::encode(2, &Request::Generation, 0).unwrap());
    s.write_all(&bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    kill(pid, Signal::SIGCONT).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let got = s.read_to_end(&mut buf);
    assert!(got.is_ok(), "the core did not close a connection whose peer ended its stream: {got:?}");
    let mut r = wire::FrameReader::new(1 << 20, 0);
    r.push(&buf, Vec::new());
    let mut seqs = Vec::new();
    while let Ok(Some(f)) = r.next_frame() {
        seqs.push(wire::decode::<wire::FromCore>(&f.payload).unwrap().seq);
    }
    assert_eq!(seqs, [1, 2], "both requests are answered before the close");
}

#[test]
fn hostile_frames_get_errors_and_the_core_keeps_serving() {
    let mut d = Daemon::start("hostile", &["--max-message-bytes", "65536"]);
    let mut good = Client::session(&d.path).unwrap();
    let mem = iommu_core::memfd::create("g", 1 << 20).unwrap();
    let m = good.register_memory(&mem).unwrap();
    let ioas = good.ioas_alloc().unwrap();

    let connect = || UnixStream::connect(&d.path).unwrap();
    // Garbage bytes: reserved header bytes non-zero.
    let mut s = connect();
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
    assert_eq!(raw_answer(s), Some(Errno::EPROTO.code()));
    // Oversized frame announced.
    let mut s = connect();
    s.write_all(&[0, 0, 0, 0x10, 0, 0, 0, 0]).unwrap();
    assert_eq!(raw_answer(s), Some(Errno::E2BIG.code()));
    // Fds announced that never came.
    let mut s = connect();
    s.write_all(&[1, 0, 0, 0, 3, 0, 0, 0, 0]).unwrap();
    assert_eq!(raw_answer(s), Some(Errno::EPROTO.code()));
    // Undecodable payload after a valid header.
    let mut s = connect();
    s.write_all(&[4, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).unwrap();
    assert_eq!(raw_answer(s), Some(Errno::EPROTO.code()));
    // A request before hello.
    let mut s = connect();
    s.write_all(&wire::encode(1, &Request::IoasAlloc, 0).unwrap()).unwrap();
    assert_eq!(raw_answer(s), Some(Errno::EPROTO.code()));
    // Wrong magic.
    let mut s = connect();
    let bad = Request::Hello { magic: *b"XXXX", major: 1, minor: 0, role: Role::Session };
    s.write_all(&wire::encode(1, &bad, 0).unwrap()).unwrap();
    assert_eq!(raw_answer(s), Some(Errno::EPROTO.code()));
    // Another major version.
    let mut s = connect();
    let bad = Request::Hello { magic: wire::MAGIC, major: 99, minor: 0, role: Role::Session };
    s.write_all(&wire::encode(1, &bad, 0).unwrap()).unwrap();
    assert_eq!(raw_answer(s), Some(Errno::EOPNOTSUPP.code()));
    // A truncated frame and then the peer goes away.
    let mut s = connect();
    let h = hello_bytes();
    s.write_all(&h[..h.len() - 2]).unwrap();
    drop(s);
    // A message larger than the limit, built honestly.
    let mut c = Client::session(&d.path).unwrap();
    let cid = c.ioas_alloc().unwrap();
    let ranges: Vec<IovaRange> = (0..10_000).map(|i| IovaRange { start: i << 20, last: (i << 20) + 4095 }).collect();
    let e = c.allow_iovas(cid, ranges).unwrap_err();
    assert!(
        matches!(e, iommu_core::client::Error::Core(iommu_core::wire::Refusal { errno: Some(Errno::E2BIG), .. })),
        "{e}"
    );
    // Too many fds in one message (limit 16).
    let mut c = Client::session(&d.path).unwrap();
    let files: Vec<std::fs::File> = (0..20).map(|_| iommu_core::memfd::create("x", 4096).unwrap()).collect();
    let fds: Vec<std::os::fd::BorrowedFd> = files.iter().map(std::os::fd::AsFd::as_fd).collect();
    let e = c.call(&Request::RegisterMemory, &fds).unwrap_err();
    assert!(matches!(e.errno(), Some(Errno::E2BIG)) || matches!(e, iommu_core::client::Error::Closed), "{e}");
    // Wrong fd count for the request.
    let mut c = Client::session(&d.path).unwrap();
    let e = c.call(&Request::RegisterMemory, &[]).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EBADF));
    let e = c.call(&Request::IoasAlloc, &[std::os::fd::AsFd::as_fd(&mem)]).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EBADF));
    // A socket fd as memory.
    let (x, _y) = UnixStream::pair().unwrap();
    assert_eq!(c.register_memory(&x).unwrap_err().errno(), Some(Errno::EINVAL));

    // Through all of it the good session kept its state and service.
    assert!(d.alive(), "the core survived");
    let iova = good.map(map_args(ioas, m.id, 1 << 20)).unwrap();
    assert_eq!(good.translate(ioas, iova).unwrap().mem, m.id);
    assert_eq!(good.unmap(ioas, 0, u64::MAX).unwrap(), 1 << 20);
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start("term", &[]);
    let mode = std::fs::metadata(&d.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    let _s = Client::session(&d.path).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(!Path::new(&d.path).exists(), "socket removed");
}

#[test]
fn a_second_core_on_a_live_socket_refuses_to_start() {
    let d = Daemon::start("twice", &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_iommu-core")).arg("--socket").arg(&d.path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another iommu-core is already listening"), "{err}");
    // The first one is untouched.
    assert!(Client::session(&d.path).is_ok());
}

/// Body of a process run as another user: connects to the socket in
/// `IOASID_TEST_FOREIGN_SOCKET`, says hello as a session and prints what
/// came back: `CONNECT <errno>`, `ERRNO <errno>`, `REPLY` or `CLOSED`.
#[test]
#[ignore = "helper process for only_the_owner_or_root_may_connect; not a test by itself"]
fn foreign_user_process() {
    let Ok(path) = std::env::var("IOASID_TEST_FOREIGN_SOCKET") else { return };
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("CONNECT {}", e.raw_os_error().unwrap_or(0));
            return;
        }
    };
    let _ = s.write_all(&hello_bytes());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    let mut r = wire::FrameReader::new(1 << 20, 0);
    r.push(&buf[..n], Vec::new());
    match r.next_frame() {
        Ok(Some(f)) => match wire::decode::<wire::FromCore>(&f.payload).map(|e| e.body) {
            Ok(wire::FromCore::Reply(Reply::Error { errno, .. })) => println!("ERRNO {errno}"),
            _ => println!("REPLY"),
        },
        _ => println!("CLOSED"),
    }
}

/// Runs [`foreign_user_process`] as user `nobody` against `socket` (from a
/// copy of this test binary that `nobody` may execute).
fn as_nobody(socket: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let dir = temp_dir("nobody-bin");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.0.join("test-binary");
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
            .stderr(Stdio::inherit())
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
    ["CONNECT", "ERRNO", "REPLY", "CLOSED"]
        .iter()
        .find_map(|k| text.find(k).map(|i| text[i..].lines().next().unwrap_or("").to_string()))
        .unwrap_or_else(|| panic!("the helper printed no result: {text}"))
}

#[test]
fn only_the_owner_or_root_may_connect() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("only_the_owner_or_root_may_connect needs root to run a process as another user; not run");
        return;
    }
    let d = Daemon::start("foreign", &[]);
    let mode = std::fs::metadata(&d.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is private to its owner");
    // The file system keeps the other user out.
    assert_eq!(as_nobody(&d.path), format!("CONNECT {}", libc::EACCES));
    // Opened up by hand, the socket still does not let them in: the core
    // checks the peer's credentials and answers EPERM.
    std::fs::set_permissions(d.path.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(as_nobody(&d.path), format!("ERRNO {}", Errno::EPERM.code()));
    // Nothing of theirs was created; the owner (root) is served.
    let mut obs = Client::observer(&d.path).unwrap();
    assert!(obs.status().unwrap().sessions.is_empty(), "no session was opened for the other user");
    let mut s = Client::session(&d.path).unwrap();
    assert!(s.ioas_alloc().is_ok());
}

/// The table pool a device channel gets holds its own session's tables
/// only, and the kernel refuses every route to writing it: a writable
/// mapping, a read-write re-open through `/proc`, `write`, `fallocate`,
/// `ftruncate`, `mprotect` of a read-only mapping and new seals. A private
/// writable mapping is allowed and reaches nobody.
#[test]
fn no_channel_can_write_any_page_table_or_read_another_sessions() {
    use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    let d = Daemon::start("pool-isolation", &["--max-tables-per-session", "256"]);
    // The victim: a read-only mapping.
    let mut victim = Client::session(&d.path).unwrap();
    let ram = iommu_core::memfd::create("victim", 1 << 20).unwrap();
    let m = victim.register_memory(&ram).unwrap();
    let ioas = victim.ioas_alloc().unwrap();
    victim.map(MapArgs { ioas, mem: m.id, offset: 0, length: 1 << 20, iova: Some(0x10_0000), perm: Perm::R }).unwrap();
    let (_, vfd) = victim.open_device_channel().unwrap();
    let victim_channel = iommu_core::device::Channel::new(vfd).unwrap();
    let (vpool, vsize, _, _) = victim_channel.pools().unwrap();
    let vpool = std::fs::File::from(vpool);
    let victim_root = victim.status().unwrap().sessions[0].ioas[0].root;
    let mut entry = [0u8; 8];
    vpool.read_exact_at(&mut entry, victim_root).unwrap();
    assert_ne!(u64::from_le_bytes(entry), 0, "the victim's own pool holds its root table");

    // The attacker: another session's device channel.
    let mut attacker = Client::session(&d.path).unwrap();
    let (_, afd) = attacker.open_device_channel().unwrap();
    let channel = iommu_core::device::Channel::new(afd).unwrap();
    let (pool, size, _, _) = channel.pools().unwrap();
    let pool = std::fs::File::from(pool);
    assert_eq!(size, 257 * 4096, "one session's pool: its quota of tables and page 0");
    assert_eq!(vsize, size);
    // Not one byte of the attacker's pool is a table: the victim's are elsewhere.
    let mut buf = vec![0u8; size as usize];
    pool.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "another session's page tables are visible");

    let seals = SealFlag::from_bits_truncate(fcntl(pool.as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap());
    let want = SealFlag::F_SEAL_FUTURE_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    assert!(seals.contains(want), "seals {seals:?}");
    let writable = |f: &std::fs::File| memmap2::MmapOptions::new().len(size as usize).map_raw(f).is_ok();
    assert!(!writable(&pool), "a writable mapping of the fd");
    assert!(pool.write_all_at(&[1], 4096).is_err(), "write on the fd");
    let ro = memmap2::MmapOptions::new().len(size as usize).map_raw_read_only(&pool).unwrap();
    // SAFETY: mprotect on a mapping this test owns; on success nothing is
    // written through it (the assertion fails first).
    let rc = unsafe { libc::mprotect(ro.as_mut_ptr().cast(), 4096, libc::PROT_READ | libc::PROT_WRITE) };
    assert_eq!(rc, -1, "mprotect made a read-only mapping of the pool writable");
    // Every route through a read-write re-open, of its own pool and of the
    // victim's that the victim's channel holds.
    for (what, f) in [("own", &pool), ("victim's", &vpool)] {
        let Ok(rw) =
            std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        else {
            continue; // refused outright is fine too
        };
        assert!(!writable(&rw), "{what}: writable mapping after a read-write re-open");
        assert!(rw.write_all_at(&[1], 4096).is_err(), "{what}: write after a re-open");
        assert!(rw.write_all_at(&[0], victim_root).is_err(), "{what}: write over the victim's root");
        assert!(rw.set_len(4096).is_err(), "{what}: shrinking the pool");
        assert!(rw.set_len(size * 2).is_err(), "{what}: growing the pool");
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        assert!(fallocate(rw.as_raw_fd(), punch, 0, size as i64).is_err(), "{what}: punching a hole");
        assert!(
            fcntl(rw.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).is_err(),
            "{what}: changing the seals"
        );
        // A private mapping is copy-on-write: writing it reaches no one.
        // SAFETY: a private copy-on-write mapping this test owns; writes
        // through it never reach the file, and nobody truncates it (sealed).
        let mut private = unsafe { memmap2::MmapOptions::new().len(size as usize).map_copy(&rw) }.unwrap();
        private[victim_root as usize] ^= 0xff;
    }
    vpool.read_exact_at(&mut entry, victim_root).unwrap();
    assert_ne!(u64::from_le_bytes(entry), 0, "the victim's root entry survived");
    let t = victim.translate(ioas, 0x10_0000).unwrap();
    assert_eq!(t.perm, Perm::R, "the victim's mapping is still read-only");
    assert_eq!(t.mem, m.id);
}
