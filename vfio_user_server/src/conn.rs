//! One client connection: splitting the byte stream into messages with
//! their fds, writing messages, and server-to-client DMA_READ/DMA_WRITE
//! requests matched to their replies.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam::channel::{bounded, Sender};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use zerocopy::IntoBytes;

use crate::dma::{self, ClientDma};
use crate::proto::{self, cmd, Header, HEADER_SIZE};

/// Errors of the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket failure.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// A header that cannot be followed (size below the header).
    #[error("message {msg_id} declares {size} bytes, less than its header; the stream cannot be followed")]
    BadSize {
        /// Message id.
        msg_id: u16,
        /// Declared size.
        size: u32,
    },
    /// The peer did not read for too long.
    #[error("the client stopped reading for {0:?}")]
    Stalled(Duration),
}

/// Most fds a client may send with one message (advertised as `max_msg_fds`).
pub const MAX_MSG_FDS: usize = 16;

/// A received message.
#[derive(Debug)]
pub struct Msg {
    /// Header.
    pub hdr: Header,
    /// Everything after the header.
    pub payload: Vec<u8>,
    /// Fds that came with it.
    pub fds: Vec<OwnedFd>,
    /// More fds were sent than can be received, or the payload was too
    /// large and was skipped: the command must fail with this errno.
    pub fail: Option<i32>,
}

/// Splits a stream into messages. It never reads past the end of the
/// current message, so the fds that arrive belong to it: a sender attaches
/// a message's fds to its first byte, and the kernel may merge bytes of
/// several messages into one read.
pub struct MsgReader {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    truncated: bool,
    max_payload: usize,
    /// Oversized message being skipped: (header, bytes still to drop).
    skipping: Option<(Header, u64)>,
}

/// What a read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Some bytes arrived.
    Data,
    /// Nothing more for now.
    WouldBlock,
    /// The peer closed.
    Eof,
}

impl MsgReader {
    /// A reader accepting payloads up to `max_payload` bytes; bigger ones
    /// are skipped and failed with E2BIG.
    pub fn new(max_payload: usize) -> MsgReader {
        MsgReader { buf: Vec::new(), fds: Vec::new(), truncated: false, max_payload, skipping: None }
    }

    fn want(&self) -> usize {
        if let Some((_, left)) = self.skipping {
            return usize::try_from(left).unwrap_or(usize::MAX).min(256 * 1024);
        }
        match proto::read::<Header>(&self.buf) {
            None => HEADER_SIZE - self.buf.len(),
            Some(h) => (h.msg_size as usize).saturating_sub(self.buf.len()).min(256 * 1024),
        }
    }

    /// One non-blocking read from `sock`, never past the current message.
    pub fn fill(&mut self, sock: BorrowedFd<'_>) -> Result<Fill, Error> {
        let want = self.want();
        if want == 0 {
            return Ok(Fill::Data);
        }
        let mut chunk = vec![0u8; want];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_MSG_FDS + 8]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return Ok(Fill::WouldBlock),
            Err(nix::errno::Errno::EINTR) => return Ok(Fill::Data),
            Err(e) => return Err(Error::Io(e.into())),
        };
        if let Ok(cm) = msg.cmsgs() {
            for c in cm {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel installed `fd` in our table for
                        // this message and nothing else owns it.
                        self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        self.truncated |= msg.flags.contains(MsgFlags::MSG_CTRUNC);
        if self.fds.len() > MAX_MSG_FDS {
            // Closed at once: a message cannot hoard descriptors.
            self.fds.truncate(MAX_MSG_FDS);
            self.truncated = true;
        }
        let n = msg.bytes;
        if n == 0 {
            return Ok(Fill::Eof);
        }
        match self.skipping.as_mut() {
            Some((_, left)) => *left -= n as u64,
            None => self.buf.extend_from_slice(&chunk[..n]),
        }
        Ok(Fill::Data)
    }

    /// The next complete message, if any.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, Error> {
        if let Some((hdr, left)) = self.skipping {
            if left > 0 {
                return Ok(None);
            }
            self.skipping = None;
            self.fds.clear();
            self.truncated = false;
            return Ok(Some(Msg { hdr, payload: Vec::new(), fds: Vec::new(), fail: Some(libc::E2BIG) }));
        }
        let Some(hdr) = proto::read::<Header>(&self.buf) else { return Ok(None) };
        let size = hdr.msg_size as usize;
        if size < HEADER_SIZE {
            return Err(Error::BadSize { msg_id: hdr.msg_id, size: hdr.msg_size });
        }
        if size - HEADER_SIZE > self.max_payload {
            tracing::warn!(
                "message {} ({}) declares {} bytes, more than the {} accepted; skipping it",
                hdr.msg_id,
                cmd::name(hdr.command),
                size,
                self.max_payload + HEADER_SIZE
            );
            self.skipping = Some((hdr, (size - self.buf.len()) as u64));
            self.buf.clear();
            return self.next_msg();
        }
        if self.buf.len() < size {
            return Ok(None);
        }
        let payload = self.buf[HEADER_SIZE..size].to_vec();
        self.buf.clear();
        let fds = std::mem::take(&mut self.fds);
        let trunc = std::mem::replace(&mut self.truncated, false);
        let fail = (trunc || fds.len() > MAX_MSG_FDS).then_some(libc::EINVAL);
        Ok(Some(Msg { hdr, payload, fds, fail }))
    }
}

/// Writes whole messages to the socket from any thread.
pub struct Writer {
    sock: OwnedFd,
    lock: Mutex<()>,
    broken: AtomicBool,
    timeout: Duration,
}

impl Writer {
    /// A writer over a (non-blocking) duplicate of the connection.
    pub fn new(sock: OwnedFd) -> Writer {
        Writer { sock, lock: Mutex::new(()), broken: AtomicBool::new(false), timeout: Duration::from_secs(10) }
    }

    /// Sends one message made of `parts`, with `fds` attached to it.
    pub fn send(&self, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe)));
        }
        let bytes: Vec<u8> = parts.concat();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let _g = self.lock.lock().map_err(|_| Error::Io(std::io::Error::other("writer poisoned")))?;
        let mut off = 0;
        let mut first = true;
        // One deadline for the whole message: a client reading a byte now
        // and then cannot hold the sender forever.
        let deadline = std::time::Instant::now() + self.timeout;
        while off < bytes.len() {
            let iov = [std::io::IoSlice::new(&bytes[off..])];
            let cmsgs = [ControlMessage::ScmRights(&raw)];
            let cm: &[ControlMessage] = if first && !raw.is_empty() { &cmsgs } else { &[] };
            match sendmsg::<()>(self.sock.as_raw_fd(), &iov, cm, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => {
                    off += n;
                    first = false;
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    let mut p = [nix::poll::PollFd::new(self.sock.as_fd(), nix::poll::PollFlags::POLLOUT)];
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                    match nix::poll::poll(&mut p, nix::poll::PollTimeout::from(ms)) {
                        Ok(0) => {
                            self.kill();
                            return Err(Error::Stalled(self.timeout));
                        }
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            self.kill();
                            return Err(Error::Io(e.into()));
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    self.kill();
                    return Err(Error::Io(e.into()));
                }
            }
        }
        Ok(())
    }

    /// Marks the connection dead and shuts the socket down, so the event
    /// loop sees the end of the stream.
    pub fn kill(&self) {
        self.broken.store(true, Ordering::Release);
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// Server-to-client requests of one connection.
pub struct Port {
    writer: Arc<Writer>,
    pending: Mutex<HashMap<u16, Sender<Msg>>>,
    next_id: AtomicU16,
    /// The client's `max_data_xfer_size`.
    max_xfer: std::sync::atomic::AtomicUsize,
    timeout: Duration,
    closed: AtomicBool,
}

impl Port {
    /// A port writing through `writer`.
    pub fn new(writer: Arc<Writer>) -> Arc<Port> {
        Arc::new(Port {
            writer,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU16::new(0x8000),
            max_xfer: std::sync::atomic::AtomicUsize::new(1 << 20),
            timeout: Duration::from_secs(5),
            closed: AtomicBool::new(false),
        })
    }

    /// Sets the client's `max_data_xfer_size`.
    pub fn set_max_xfer(&self, n: usize) {
        self.max_xfer.store(n.max(1), Ordering::Relaxed);
    }

    /// Hands a reply from the client to the request waiting for it.
    /// Returns false if nothing waits for that id.
    pub fn deliver(&self, m: Msg) -> bool {
        let tx = self.pending.lock().ok().and_then(|mut p| p.remove(&m.hdr.msg_id));
        match tx {
            Some(tx) => tx.send(m).is_ok(),
            None => false,
        }
    }

    /// Fails every waiting request and every later one (the client went
    /// away), and shuts the socket so that nothing more is sent on it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.writer.kill();
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
    }

    fn request(&self, command: u16, parts: &[&[u8]]) -> Result<Msg, dma::Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(dma::Error::Client("after the client left".into(), libc::ENOTCONN));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) | 0x8000;
        let (tx, rx) = bounded(1);
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let hdr = Header::command(id, command, len);
        let mut all: Vec<&[u8]> = vec![hdr.as_bytes()];
        all.extend_from_slice(parts);
        if let Err(e) = self.writer.send(&all, &[]) {
            self.pending.lock().ok().map(|mut p| p.remove(&id));
            return Err(dma::Error::Client(format!("request not sent: {e}"), libc::ENOTCONN));
        }
        let r = rx.recv_timeout(self.timeout);
        self.pending.lock().ok().map(|mut p| p.remove(&id));
        let m = r.map_err(|_| dma::Error::Client(format!("got no reply in {:?}", self.timeout), libc::ETIMEDOUT))?;
        if m.hdr.flags & proto::flags::ERROR != 0 {
            let e = if m.hdr.error == 0 { libc::EIO } else { m.hdr.error as i32 };
            return Err(dma::Error::Client(format!("refused by the client: errno {e}"), e));
        }
        Ok(m)
    }
}

impl ClientDma for Port {
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), dma::Error> {
        let step = self.max_xfer.load(Ordering::Relaxed);
        for (i, chunk) in buf.chunks_mut(step).enumerate() {
            let a = address + (i * step) as u64;
            let req = proto::DmaRw { address: a, count: chunk.len() as u64 };
            let m = self.request(cmd::DMA_READ, &[req.as_bytes()])?;
            let data = m.payload.get(16..16 + chunk.len()).ok_or_else(|| {
                dma::Error::Client(format!("DMA_READ reply of {} bytes is short", m.payload.len()), libc::EPROTO)
            })?;
            chunk.copy_from_slice(data);
        }
        Ok(())
    }

    fn write(&self, address: u64, data: &[u8]) -> Result<(), dma::Error> {
        let step = self.max_xfer.load(Ordering::Relaxed);
        for (i, chunk) in data.chunks(step).enumerate() {
            let a = address + (i * step) as u64;
            let req = proto::DmaRw { address: a, count: chunk.len() as u64 };
            self.request(cmd::DMA_WRITE, &[req.as_bytes(), chunk])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn msg(id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
        let h = Header::command(id, command, payload.len());
        [h.as_bytes(), payload].concat()
    }

    #[test]
    fn splits_messages_and_attaches_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        let f = crate::irq::eventfd().unwrap();
        w.send(&[&msg(1, 9, &[0; 16])], &[]).unwrap();
        w.send(&[&msg(2, 2, &[7; 32])], &[f.as_fd()]).unwrap();
        w.send(&[&msg(3, 13, &[])], &[]).unwrap();
        let mut r = MsgReader::new(1024);
        let mut got = vec![];
        while got.len() < 3 {
            match r.fill(b.as_fd()).unwrap() {
                Fill::Eof => break,
                Fill::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Fill::Data => {}
            }
            while let Some(m) = r.next_msg().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.iter().map(|m| (m.hdr.msg_id, m.fds.len())).collect::<Vec<_>>(), vec![(1, 0), (2, 1), (3, 0)]);
        assert_eq!(got[1].payload, vec![7; 32]);
    }

    #[test]
    fn oversized_messages_are_skipped_and_small_sizes_are_fatal() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        w.send(&[&msg(1, 10, &[1; 300])], &[]).unwrap();
        w.send(&[&msg(2, 13, &[])], &[]).unwrap();
        let mut bad = Header::command(3, 13, 0);
        bad.msg_size = 4;
        w.send(&[bad.as_bytes()], &[]).unwrap();
        let mut r = MsgReader::new(100);
        let mut got = vec![];
        let err = loop {
            match r.next_msg() {
                Ok(Some(m)) => got.push((m.hdr.msg_id, m.fail)),
                Ok(None) => {
                    assert_eq!(r.fill(b.as_fd()).unwrap(), Fill::Data);
                }
                Err(e) => break e,
            }
        };
        assert_eq!(got, vec![(1, Some(libc::E2BIG)), (2, None)]);
        assert!(matches!(err, Error::BadSize { msg_id: 3, size: 4 }));
    }
}
