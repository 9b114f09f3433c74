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

/// Splits a stream into messages, from one buffer that is kept and reused
/// (never zeroed again once grown): each `recvmsg` reads as much as has
/// arrived, so a readable event usually costs one system call whatever
/// the number of messages it carries.
///
/// Fds belong to the message that starts in the read that brought them.
/// A sender attaches a message's fds to its first byte, and the kernel
/// ends a read at the end of the part of the stream that carried fds (it
/// never joins what follows to it), so the last message that starts in
/// such a read is the one they were sent with; a read that starts no
/// message gives its fds to the message it continues.
///
/// Every fd that arrives is looked at before anything else happens to it:
/// one whose close could block (see [`close_may_block`]) is closed on
/// another thread at once and fails its message with EINVAL, so neither
/// the event loop nor the device thread ever holds such a file.
pub struct MsgReader {
    /// Received bytes live in `buf[start..end]`; `buf` is initialised once
    /// and grows only for a message larger than it.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream position of `buf[start]`.
    pos: u64,
    /// Fds received, each with the stream position of its message.
    fds: Vec<(u64, OwnedFd)>,
    /// Messages (by stream position) that came with more fds than accepted.
    truncated: Vec<u64>,
    /// Why fds of a message (by stream position) were refused on arrival.
    refused: Vec<(u64, String)>,
    max_payload: usize,
    /// Oversized message being skipped: its header and where it starts
    /// and ends in the stream.
    skipping: Option<(Header, u64, u64)>,
}

/// What a read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Some bytes arrived.
    Data,
    /// Some bytes arrived, fewer than the buffer had room for and with no
    /// fds: the socket was empty when the read returned, so an
    /// edge-triggered loop need not read again before the next event.
    Drained,
    /// Nothing more for now.
    WouldBlock,
    /// The peer closed.
    Eof,
}

/// A received message whose payload is still in the reader's buffer.
#[derive(Debug)]
pub struct MsgView<'a> {
    /// Header.
    pub hdr: Header,
    /// Everything after the header.
    pub payload: &'a [u8],
    /// Fds that came with it.
    pub fds: Vec<OwnedFd>,
    /// As [`Msg::fail`].
    pub fail: Option<i32>,
}

impl MsgView<'_> {
    /// The message with its payload copied out of the reader.
    pub fn to_msg(self) -> Msg {
        Msg { hdr: self.hdr, payload: self.payload.to_vec(), fds: self.fds, fail: self.fail }
    }
}

/// Bytes a read asks for at least (the buffer's first size).
const READ_CHUNK: usize = 64 * 1024;

impl MsgReader {
    /// A reader accepting payloads up to `max_payload` bytes; bigger ones
    /// are skipped and failed with E2BIG.
    pub fn new(max_payload: usize) -> MsgReader {
        MsgReader {
            buf: vec![0; READ_CHUNK.min(max_payload + HEADER_SIZE).max(HEADER_SIZE * 4)],
            start: 0,
            end: 0,
            pos: 0,
            fds: Vec::new(),
            truncated: Vec::new(),
            refused: Vec::new(),
            max_payload,
            skipping: None,
        }
    }

    /// Whether [`MsgReader::next_view`] has something to say without
    /// another read: a whole message, the end of a skipped one, or a
    /// header that cannot be followed or starts a message to skip.
    pub fn has_msg(&self) -> bool {
        if let Some((_, _, stop)) = self.skipping {
            return self.pos + (self.end - self.start) as u64 >= stop;
        }
        match proto::read::<Header>(&self.buf[self.start..self.end]) {
            None => false,
            // A size that cannot be followed, or one to skip, is news too.
            Some(h) => {
                let size = h.msg_size as usize;
                size < HEADER_SIZE || size - HEADER_SIZE > self.max_payload || self.end - self.start >= size
            }
        }
    }

    /// Stream position of the message after the one starting at `at`
    /// (whose header is in the buffer up to `end`), if it can be told.
    fn next_start(&self, at: u64, end: usize) -> Option<u64> {
        if let Some((_, s, e)) = self.skipping {
            if s == at {
                return Some(e);
            }
        }
        let i = self.start + usize::try_from(at.checked_sub(self.pos)?).ok()?;
        let h = proto::read::<Header>(self.buf.get(i..end)?)?;
        (h.msg_size as usize >= HEADER_SIZE).then(|| at + u64::from(h.msg_size))
    }

    /// Stream position of the last message that starts before `limit`
    /// (the buffer ending at `end`).
    fn owner(&self, limit: u64, end: usize) -> u64 {
        let mut at = self.skipping.map_or(self.pos, |(_, s, _)| s);
        while let Some(n) = self.next_start(at, end) {
            if n >= limit {
                break;
            }
            at = n;
        }
        at
    }

    /// Makes room for the next read: the current message whole if the
    /// buffer can hold it (up to the largest accepted), and at least a
    /// quarter of the buffer free.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let need = match (self.skipping, proto::read::<Header>(&self.buf[self.start..self.end])) {
            (None, Some(h)) if h.msg_size as usize <= self.max_payload + HEADER_SIZE => h.msg_size as usize,
            _ => 0,
        }
        .max(self.end - self.start + 1);
        if self.buf.len() - self.end < self.buf.len() / 4 || self.buf.len() - self.start < need {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
    }

    /// One non-blocking read from `sock` of as much as has arrived.
    pub fn fill(&mut self, sock: BorrowedFd<'_>) -> Result<Fill, Error> {
        self.make_room();
        let room = self.buf.len() - self.end;
        // Every fd the kernel installs is owned here, even when more were
        // sent than the buffer holds (the kernel closed those).
        let got = match iommu_core::scm::recv(sock, &mut self.buf[self.end..], MAX_MSG_FDS) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(Fill::Data),
            Err(e) => return Err(Error::Io(e)),
        };
        let n = got.bytes;
        let had_fds = !got.fds.is_empty() || got.truncated;
        if had_fds {
            let new_end = self.end + n;
            let limit = self.pos + (new_end - self.start) as u64;
            // Fds that came with no byte (a peer closing) belong to the
            // message being received.
            let owner = self.owner(limit.max(self.pos + 1), new_end);
            if got.truncated {
                self.truncated.push(owner);
            }
            for fd in got.fds {
                if let Some(why) = close_may_block(fd.as_fd()) {
                    self.refused.push((owner, why));
                    memfd::close_elsewhere(fd);
                } else if self.fds.iter().filter(|(o, _)| *o == owner).count() >= MAX_MSG_FDS {
                    // Closed at once: a message cannot hoard descriptors.
                    self.truncated.push(owner);
                } else {
                    self.fds.push((owner, fd));
                }
            }
        }
        if n == 0 {
            return Ok(Fill::Eof);
        }
        self.end += n;
        Ok(if n < room && !had_fds { Fill::Drained } else { Fill::Data })
    }

    /// Takes what arrived with the message at stream position `at`, and
    /// drops what belongs to messages before it (there are none unless a
    /// peer attached fds in the middle of a message it sent in pieces).
    fn take_fds(&mut self, at: u64) -> (Vec<OwnedFd>, bool, Vec<String>) {
        let mut fds = Vec::new();
        if !self.fds.is_empty() {
            let all = std::mem::take(&mut self.fds);
            for (o, fd) in all {
                if o == at {
                    fds.push(fd);
                } else if o > at {
                    self.fds.push((o, fd));
                }
            }
        }
        let trunc = !self.truncated.is_empty() && self.truncated.contains(&at);
        if !self.truncated.is_empty() {
            self.truncated.retain(|&o| o > at);
        }
        let mut refused = Vec::new();
        if !self.refused.is_empty() {
            for (o, why) in std::mem::take(&mut self.refused) {
                if o == at {
                    refused.push(why);
                } else if o > at {
                    self.refused.push((o, why));
                }
            }
        }
        (fds, trunc, refused)
    }

    /// The next complete message, if any, copied out of the buffer.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, Error> {
        Ok(self.next_view()?.map(MsgView::to_msg))
    }

    /// The next complete message, if any, its payload in the buffer.
    pub fn next_view(&mut self) -> Result<Option<MsgView<'_>>, Error> {
        if let Some((hdr, at, stop)) = self.skipping {
            let skip = usize::try_from(stop - self.pos).unwrap_or(usize::MAX).min(self.end - self.start);
            self.start += skip;
            self.pos += skip as u64;
            if self.pos < stop {
                return Ok(None);
            }
            self.skipping = None;
            // Its fds are closed here.
            drop(self.take_fds(at));
            return Ok(Some(MsgView { hdr, payload: &[], fds: Vec::new(), fail: Some(libc::E2BIG) }));
        }
        let Some(hdr) = proto::read::<Header>(&self.buf[self.start..self.end]) else { return Ok(None) };
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
            self.skipping = Some((hdr, self.pos, self.pos + size as u64));
            return self.next_view();
        }
        if self.end - self.start < size {
            return Ok(None);
        }
        let at = self.pos;
        let (fds, trunc, refused) = self.take_fds(at);
        let what = || format!("message {} ({})", hdr.msg_id, cmd::name(hdr.command));
        if trunc {
            tracing::warn!(
                "{} came with more than {MAX_MSG_FDS} fds (max_msg_fds); all were closed and it fails with EINVAL",
                what()
            );
        }
        for why in &refused {
            tracing::warn!(
                "{}: an fd was refused and closed on another thread: {why}; the command fails with EINVAL",
                what()
            );
        }
        let fail = (trunc || !refused.is_empty()).then_some(libc::EINVAL);
        let fds = if fail.is_some() { Vec::new() } else { fds };
        let p = self.start + HEADER_SIZE..self.start + size;
        self.start += size;
        self.pos += size as u64;
        Ok(Some(MsgView { hdr, payload: &self.buf[p], fds, fail }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use zerocopy::IntoBytes;

    /// Reads from `fd` until `n` messages are whole (or the end of the
    /// stream), waiting while nothing is there.
    fn read_msgs(r: &mut MsgReader, fd: BorrowedFd<'_>, n: usize) -> Vec<Msg> {
        let mut got = vec![];
        while got.len() < n {
            match r.fill(fd).unwrap() {
                Fill::Eof => break,
                Fill::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Fill::Data | Fill::Drained => {}
            }
            while let Some(m) = r.next_msg().unwrap() {
                got.push(m);
            }
        }
        got
    }

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
        let got = read_msgs(&mut r, b.as_fd(), 3);
        assert_eq!(got.iter().map(|m| (m.hdr.msg_id, m.fds.len())).collect::<Vec<_>>(), vec![(1, 0), (2, 1), (3, 0)]);
        assert_eq!(got[1].payload, vec![7; 32]);
    }

    #[test]
    fn one_read_takes_many_messages_and_the_buffer_grows_for_a_large_one() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let w = Writer::new(OwnedFd::from(a));
        for id in 0..50u8 {
            w.send(&[&msg(u16::from(id), 9, &[id; 16])], &[]).unwrap();
        }
        let big: Vec<u8> = (0..300_000u32).map(|i| i.to_le_bytes()[0]).collect();
        // More than a socket buffer holds: sent while the reader reads.
        let w = std::sync::Arc::new(w);
        let (w2, big2) = (w.clone(), big.clone());
        let sender = std::thread::spawn(move || {
            w2.send(&[&msg(50, 10, &big2)], &[]).unwrap();
            w2.send(&[&msg(51, 13, &[])], &[]).unwrap();
        });
        // Let the small ones arrive before the first read.
        std::thread::sleep(Duration::from_millis(20));
        let mut r = MsgReader::new(1 << 20);
        // The 50 small messages arrive whole in the first read.
        assert!(matches!(r.fill(b.as_fd()).unwrap(), Fill::Data | Fill::Drained));
        for id in 0..50u8 {
            let m = r.next_view().unwrap().unwrap();
            assert_eq!((m.hdr.msg_id, m.payload), (u16::from(id), &[id; 16][..]));
        }
        let got = read_msgs(&mut r, b.as_fd(), 2);
        assert_eq!((got[0].hdr.msg_id, got[0].payload.len()), (50, big.len()));
        assert!(got[0].payload == big);
        assert_eq!((got[1].hdr.msg_id, got[1].payload.len()), (51, 0));
        sender.join().unwrap();
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
                    assert!(matches!(r.fill(b.as_fd()).unwrap(), Fill::Data | Fill::Drained));
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
            assert!(matches!(r.fill(b.as_fd()).unwrap(), Fill::Data | Fill::Drained));
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
            assert!(matches!(r.fill(b.as_fd()).unwrap(), Fill::Data | Fill::Drained));
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
