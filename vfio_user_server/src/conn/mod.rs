#![deny(clippy::cast_possible_truncation)]
//! One client connection: splitting the byte stream into messages with
//! their fds, writing messages, and server-to-client DMA_READ/DMA_WRITE
//! requests matched to their replies.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use iommu_core::memfd;

use crate::proto::{self, cmd, Header, HEADER_SIZE};

mod port;
mod writer;

pub use port::{Port, DMA_READ_CHUNK, DMA_REPLY_TIMEOUT};
pub use writer::Writer;

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
    /// More fds were sent than can be received, an fd was refused on
    /// arrival (see [`MsgReader`]), or the payload was too large and was
    /// skipped: the command must fail with this errno.
    pub fail: Option<i32>,
}

/// Why closing `fd` might block the thread that closes it, if it might:
/// a file of a FUSE, network or unknown file system (closing one sends a
/// flush its server may never answer; procfs tells the file system without
/// asking it), or a socket of another family than `AF_UNIX` (`SO_LINGER`
/// makes `close` wait for the peer). Files of devices and kernel interfaces
/// are reported too: they are never what a client should send.
pub fn close_may_block(fd: BorrowedFd<'_>) -> Option<String> {
    if memfd::on_blocking_fs(fd) {
        return Some(match memfd::check_memory_fd(fd) {
            Err(why) => why.to_string(),
            Ok(()) => "the file is on a file system whose operations may wait on another process".into(),
        });
    }
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    match getsockname::<SockaddrStorage>(fd.as_raw_fd()).map(|a| a.family()) {
        Ok(Some(AddressFamily::Unix)) | Err(_) => None,
        Ok(_) => Some("the fd is a network socket, whose close may linger waiting for its peer".into()),
    }
}

/// Splits a stream into messages. It never reads past the end of the
/// current message, so the fds that arrive belong to it: a sender attaches
/// a message's fds to its first byte, and the kernel may merge bytes of
/// several messages into one read.
///
/// Every fd that arrives is looked at before anything else happens to it:
/// one whose close could block (see [`close_may_block`]) is closed on
/// another thread at once and fails its message with EINVAL, so neither
/// the event loop nor the device thread ever holds such a file.
pub struct MsgReader {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    truncated: bool,
    /// Why fds of the current message were refused on arrival.
    refused: Vec<String>,
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
        MsgReader {
            buf: Vec::new(),
            fds: Vec::new(),
            truncated: false,
            refused: Vec::new(),
            max_payload,
            skipping: None,
        }
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
        // Every fd the kernel installs is owned here, even when more were
        // sent than the buffer holds (the kernel closed those).
        let got = match iommu_core::scm::recv(sock, &mut chunk, MAX_MSG_FDS) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(Fill::Data),
            Err(e) => return Err(Error::Io(e)),
        };
        self.truncated |= got.truncated;
        for fd in got.fds {
            if let Some(why) = close_may_block(fd.as_fd()) {
                self.refused.push(why);
                memfd::close_elsewhere(fd);
            } else if self.fds.len() >= MAX_MSG_FDS {
                // Closed at once: a message cannot hoard descriptors.
                self.truncated = true;
            } else {
                self.fds.push(fd);
            }
        }
        let n = got.bytes;
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
            self.refused.clear();
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
        let refused = std::mem::take(&mut self.refused);
        let what = format!("message {} ({})", hdr.msg_id, cmd::name(hdr.command));
        if trunc {
            tracing::warn!(
                "{what} came with more than {MAX_MSG_FDS} fds (max_msg_fds); all were closed and it fails with EINVAL"
            );
        }
        for why in &refused {
            tracing::warn!(
                "{what}: an fd was refused and closed on another thread: {why}; the command fails with EINVAL"
            );
        }
        let fail = (trunc || !refused.is_empty()).then_some(libc::EINVAL);
        Ok(Some(Msg { hdr, payload, fds, fail }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use zerocopy::IntoBytes;

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

    /// Open fds of this process that refer to the memfd called `name`.
    fn open_copies(name: &str) -> usize {
        let want = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy() == want)
            .count()
    }

    #[test]
    fn too_many_fds_fail_the_message_and_none_stays_open() {
        let name = format!("conn-flood-{}", std::process::id());
        let m = iommu_core::memfd::create(&name, 4096).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        let fds = vec![m.as_fd(); 64];
        w.send(&[&msg(1, 2, &[0; 32])], &fds).unwrap();
        w.send(&[&msg(2, 2, &[0; 32])], &fds[..MAX_MSG_FDS]).unwrap();
        let mut r = MsgReader::new(1024);
        let mut got = vec![];
        while got.len() < 2 {
            assert_eq!(r.fill(b.as_fd()).unwrap(), Fill::Data);
            while let Some(m) = r.next_msg().unwrap() {
                got.push(m);
            }
        }
        assert_eq!((got[0].hdr.msg_id, got[0].fail), (1, Some(libc::EINVAL)));
        assert_eq!((got[1].hdr.msg_id, got[1].fail, got[1].fds.len()), (2, None, MAX_MSG_FDS));
        drop(got);
        assert_eq!(open_copies(&name), 1, "fds of the refused message stayed open");
    }

    #[test]
    fn fds_whose_close_may_block_are_refused_on_arrival() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let efd = crate::irq::eventfd().unwrap();
        w.send(&[&msg(1, 2, &[0; 32])], &[zero.as_fd()]).unwrap();
        w.send(&[&msg(2, 8, &[0; 20])], &[tcp.as_fd()]).unwrap();
        w.send(&[&msg(3, 8, &[0; 20])], &[efd.as_fd()]).unwrap();
        let mut r = MsgReader::new(1024);
        let mut got = vec![];
        while got.len() < 3 {
            assert_eq!(r.fill(b.as_fd()).unwrap(), Fill::Data);
            while let Some(m) = r.next_msg().unwrap() {
                got.push(m);
            }
        }
        let seen: Vec<(u16, Option<i32>, usize)> = got.iter().map(|m| (m.hdr.msg_id, m.fail, m.fds.len())).collect();
        assert_eq!(seen, vec![(1, Some(libc::EINVAL), 0), (2, Some(libc::EINVAL), 0), (3, None, 1)]);
        assert!(close_may_block(zero.as_fd()).is_some_and(|w| w.contains("devices or kernel interfaces")));
        assert!(close_may_block(tcp.as_fd()).is_some_and(|w| w.contains("network socket")));
        assert_eq!(close_may_block(efd.as_fd()), None);
    }
}
