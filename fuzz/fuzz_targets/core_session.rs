//! The core's request handling with its state in the loop: a real core
//! (small limits) serves a session, or an observer, whose frames come from
//! the fuzzer: postcard payloads with honest or lying headers, memfds and
//! other fds attached. Each input is one connection. Checked after each:
//! the core answers a final request (or closed the connection) within
//! 10 s, and once the connection is gone every session, pPASID and table it
//! held is freed, while a victim session's mapping is untouched.
#![no_main]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ioasid_fuzz::{core_socket, send_all, Input};
use iommu_core::client::Client;
use iommu_core::types::{MapArgs, Perm};
use iommu_core::wire::{self, FrameReader, FromCore, Request, Role};
use libfuzzer_sys::fuzz_target;

const DEADLINE: Duration = Duration::from_secs(10);
const LAST: u64 = u64::MAX;

struct Victim {
    session: Client,
    observer: Client,
    ioas: u32,
    iova: u64,
    mem: u32,
    baseline: (usize, u32, usize),
}

fn victim() -> &'static Mutex<Victim> {
    static V: OnceLock<Mutex<Victim>> = OnceLock::new();
    V.get_or_init(|| {
        let mut session = Client::session(core_socket()).expect("a session");
        let file = iommu_core::memfd::create("victim", 1 << 16).expect("a memfd");
        let m = session.register_memory(&file).expect("register");
        let ioas = session.ioas_alloc().expect("an IOAS");
        let args = MapArgs { ioas, mem: m.id, offset: 0, length: 1 << 16, iova: Some(0x10_0000), perm: Perm::RW };
        let iova = session.map(args).expect("map");
        let mut observer = Client::observer(core_socket()).expect("an observer");
        let baseline = counts(&mut observer);
        Mutex::new(Victim { session, observer, ioas, iova, mem: m.id, baseline })
    })
}

fn counts(o: &mut Client) -> (usize, u32, usize) {
    let s = o.status().expect("status");
    (s.sessions.len(), s.pool.tables_in_use, s.ppasids.len())
}

fn frame(seq: u64, req: &Request) -> Vec<u8> {
    wire::encode(seq, req, 0).expect("encode")
}

fn send(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    send_all(sock, bytes, fds)
}

/// Reads replies until the one to `LAST` or the end of the stream.
fn drain(sock: &UnixStream, want_last: bool) {
    let start = Instant::now();
    let mut reader = FrameReader::new(1 << 30, 253);
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        assert!(start.elapsed() < DEADLINE, "the core did not answer within {DEADLINE:?}");
        let (n, fds) = match wire::recv_with_fds(sock.as_fd(), &mut chunk, 16) {
            Ok(r) => r,
            Err(wire::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the core did not answer within {DEADLINE:?}")
            }
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        reader.push(&chunk[..n], fds);
        while let Ok(Some(f)) = reader.next_frame() {
            drop::<Vec<OwnedFd>>(f.fds);
            let env = wire::decode::<FromCore>(&f.payload).expect("the core's messages decode");
            // Notices go to device channels only.
            assert!(matches!(env.body, FromCore::Reply(_)), "a notice on a session: {:?}", env.body);
            if env.seq == LAST && want_last {
                return;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let v = victim();
    let mut input = Input::new(data);
    let sock = UnixStream::connect(core_socket()).expect("the core listens");
    sock.set_read_timeout(Some(DEADLINE)).expect("a timeout");
    let memfd = iommu_core::memfd::create("fuzz", 1 << 16).expect("a memfd");
    let (other, _peer) = UnixStream::pair().expect("a socket pair");

    let mode = input.u8();
    let role = if mode & 1 == 0 { Role::Session } else { Role::Observer };
    let hello = Request::Hello { magic: wire::MAGIC, major: wire::VERSION_MAJOR, minor: 0, role };
    let mut ok = send(&sock, &frame(0, &hello), &[]);
    let mut desync = false;
    let mut n = 0;
    while ok && !input.is_empty() && n < 64 {
        n += 1;
        let fl = input.u8();
        let len = match input.u8() {
            255 => usize::from(input.u16()),
            k => usize::from(k),
        };
        let payload = input.bytes(len);
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        if fl & 0x01 != 0 {
            fds.push(memfd.as_fd());
        }
        if fl & 0x02 != 0 {
            fds.push(other.as_fd());
        }
        let mut bytes = Vec::with_capacity(wire::HEADER_LEN + payload.len());
        if fl & 0x04 != 0 {
            // A header of the fuzzer's: the stream cannot be trusted after it.
            bytes.extend_from_slice(input.bytes(8));
            desync = true;
        } else {
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&(fds.len() as u16).to_le_bytes());
            bytes.extend_from_slice(&[0, 0]);
        }
        bytes.extend_from_slice(payload);
        ok = send(&sock, &bytes, &fds);
        if desync {
            break;
        }
    }
    if ok && !desync {
        ok = send(&sock, &frame(LAST, &Request::Generation), &[]);
    }
    if !ok || desync {
        let _ = sock.shutdown(std::net::Shutdown::Write);
    }
    drain(&sock, ok && !desync);
    drop(sock);

    // Everything the connection held is freed; the victim is untouched.
    let mut v = v.lock().expect("the victim");
    let start = Instant::now();
    loop {
        let now = counts(&mut v.observer);
        if now == v.baseline {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "leaked: {now:?} against {:?}", v.baseline);
        std::thread::sleep(Duration::from_millis(1));
    }
    let (ioas, iova, mem) = (v.ioas, v.iova, v.mem);
    let t = v.session.translate(ioas, iova + 0x1234).expect("the victim's mapping");
    assert_eq!((t.mem, t.offset), (mem, 0x1234));
});
