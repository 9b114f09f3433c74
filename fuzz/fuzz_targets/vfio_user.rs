//! The vfio-user server's message handling with its state in the loop: a
//! real server (dma-engine or test-device, bound to a real core) serves a
//! client whose messages come from the fuzzer, with memfds and eventfds
//! attached where the fuzzer asks. The harness answers the server's
//! DMA_READ/DMA_WRITE with fuzzer bytes, so descriptors the engine fetches
//! are hostile too. Each input is one connection; the server must answer
//! a final DEVICE_GET_INFO (or close) within 10 s, and serve the next one.
//! Some inputs go to the servers' control sockets instead (an
//! orchestrator's: no VERSION, the extension's commands, the same
//! checks).
#![no_main]

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ioasid_fuzz::{control_sockets, device_sockets, send_all, Input};
use iommu_core::wire;
use libfuzzer_sys::fuzz_target;
use vfio_user_server::proto::{cmd, flags, DmaRw, Header, HEADER_SIZE};
use zerocopy::{FromBytes, IntoBytes};

const COMMANDS: [u16; 23] = [
    cmd::VERSION,
    cmd::DMA_MAP,
    cmd::DMA_UNMAP,
    cmd::DEVICE_GET_INFO,
    cmd::DEVICE_GET_REGION_INFO,
    cmd::DEVICE_GET_REGION_IO_FDS,
    cmd::DEVICE_GET_IRQ_INFO,
    cmd::DEVICE_SET_IRQS,
    cmd::REGION_READ,
    cmd::REGION_WRITE,
    cmd::REGION_WRITE,
    // Server-to-client commands, sent the wrong way.
    cmd::DMA_READ,
    cmd::DMA_WRITE,
    cmd::DEVICE_RESET,
    cmd::REGION_WRITE_MULTI,
    cmd::DEVICE_FEATURE,
    cmd::MIG_DATA_READ,
    cmd::MIG_DATA_WRITE,
    cmd::EXT_BIND,
    cmd::EXT_UNBIND,
    cmd::EXT_ATTACH,
    cmd::EXT_DETACH,
    cmd::EXT_LIST_PASIDS,
];
const SENTINEL: u16 = 0xffff;
const DEADLINE: Duration = Duration::from_secs(10);

fn version() -> Vec<u8> {
    let json = br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
    let mut p = vec![0, 0, 1, 0];
    p.extend_from_slice(json);
    p.push(0);
    p
}

fn send(sock: &UnixStream, hdr: Header, payload: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    let mut bytes = hdr.as_bytes().to_vec();
    bytes.extend_from_slice(payload);
    send_all(sock, &bytes, fds)
}

/// Reads what the server sends until the sentinel's reply or the end of
/// the stream, answering its DMA requests.
fn drain(mut sock: &UnixStream, pattern: &[u8], want_sentinel: bool) {
    let start = Instant::now();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 17];
    loop {
        assert!(start.elapsed() < DEADLINE, "the server did not answer within {DEADLINE:?}");
        let (n, fds) = match wire::recv_with_fds(sock.as_fd(), &mut chunk, 16) {
            Ok(r) => r,
            Err(wire::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the server did not answer within {DEADLINE:?}")
            }
            Err(_) => return,
        };
        drop::<Vec<OwnedFd>>(fds);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= HEADER_SIZE {
            let hdr = Header::read_from_bytes(&buf[..HEADER_SIZE]).expect("16 bytes");
            let size = hdr.msg_size as usize;
            assert!(size >= HEADER_SIZE, "the server sent a message of {size} bytes");
            if buf.len() < size {
                break;
            }
            let payload = buf[HEADER_SIZE..size].to_vec();
            buf.drain(..size);
            if hdr.is_reply() {
                if hdr.msg_id == SENTINEL && hdr.command == cmd::DEVICE_GET_INFO && want_sentinel {
                    return;
                }
                continue;
            }
            // A DMA request of the server.
            let rw = DmaRw::read_from_prefix(&payload).ok().map(|(r, _)| r);
            let (reply, body): (Header, Vec<u8>) = match (hdr.command, rw) {
                (cmd::DMA_READ, Some(r)) if r.count <= 1 << 20 => {
                    let mut b = r.as_bytes().to_vec();
                    b.extend(
                        (0..r.count as usize).map(|i| pattern.get(i % pattern.len().max(1)).copied().unwrap_or(0)),
                    );
                    (hdr.reply(b.len()), b)
                }
                (cmd::DMA_WRITE, Some(r)) => (hdr.reply(16), r.as_bytes().to_vec()),
                _ => (hdr.error_reply(libc::EINVAL), Vec::new()),
            };
            let mut out = reply.as_bytes().to_vec();
            out.extend_from_slice(&body);
            if sock.write_all(&out).is_err() {
                return;
            }
        }
    }
}

/// Connects to `path`; for a control socket, until the server keeps the
/// connection (it answers the extension's list with a reply).
fn connect_served(path: &std::path::Path, control: bool) -> UnixStream {
    let start = Instant::now();
    loop {
        let sock = UnixStream::connect(path).expect("the server listens");
        sock.set_read_timeout(Some(DEADLINE)).expect("a timeout");
        if !control {
            return sock;
        }
        let list = [16u32, 0, 0, 0];
        if send(&sock, Header::command(SENTINEL - 1, cmd::EXT_LIST_PASIDS, 16), list.as_bytes(), &[]) {
            let mut h = [0u8; HEADER_SIZE];
            if std::io::Read::read_exact(&mut &sock, &mut h).is_ok() {
                let hdr = Header::read_from_bytes(&h).expect("16 bytes");
                let mut rest = vec![0u8; (hdr.msg_size as usize).saturating_sub(HEADER_SIZE)];
                if std::io::Read::read_exact(&mut &sock, &mut rest).is_ok() {
                    return sock;
                }
            }
        }
        assert!(start.elapsed() < DEADLINE, "the control socket did not take a new orchestrator within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let pick = input.u8();
    let control = pick & 0x80 != 0;
    let sockets = if control { control_sockets() } else { device_sockets() };
    let which = usize::from(pick & 0x7f) % sockets.len();
    // A control socket serves one orchestrator at a time: the previous
    // input's may not be reaped yet (it is once its hang-up is seen).
    let sock = connect_served(&sockets[which], control);
    let memfd = iommu_core::memfd::create("fuzz", 1 << 16).expect("a memfd");
    let eventfd =
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_NONBLOCK).expect("an eventfd");

    let mode = input.u8();
    let v = if mode & 1 == 0 {
        version()
    } else {
        let n = usize::from(input.u8());
        input.bytes(n).to_vec()
    };
    let mut ok = control || send(&sock, Header::command(0, cmd::VERSION, v.len()), &v, &[]);
    let mut desync = false;
    let mut id = 1u16;
    while ok && !input.is_empty() && id < 64 {
        let sel = input.u8();
        let command = if sel & 0x80 != 0 { input.u16() } else { COMMANDS[usize::from(sel) % COMMANDS.len()] };
        let fl = input.u8();
        let len = match input.u8() {
            255 => usize::from(input.u16()),
            n => usize::from(n),
        };
        let payload = input.bytes(len).to_vec();
        let mut hdr = Header::command(id, command, payload.len());
        id += 1;
        if fl & 0x01 != 0 {
            hdr.flags |= flags::NO_REPLY;
        }
        if fl & 0x10 != 0 {
            hdr.flags = u32::from(input.u8());
        }
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        if fl & 0x02 != 0 {
            fds.push(memfd.as_fd());
        }
        if fl & 0x04 != 0 {
            fds.push(eventfd.as_fd());
        }
        if fl & 0x08 != 0 {
            // A lying size: the stream cannot be trusted after it.
            hdr.msg_size = input.u32();
            desync = true;
        }
        ok = send(&sock, hdr, &payload, &fds);
        if desync {
            break;
        }
    }
    if ok && !desync {
        let info = [16u32, 0, 0, 0];
        ok = send(&sock, Header::command(SENTINEL, cmd::DEVICE_GET_INFO, 16), info.as_bytes(), &[]);
    }
    if !ok || desync {
        let _ = sock.shutdown(std::net::Shutdown::Write);
    }
    drain(&sock, data, ok && !desync);
});
