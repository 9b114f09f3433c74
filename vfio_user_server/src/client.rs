//! A blocking vfio-user client: every command of the protocol plus the
//! ioasid extension. It plays the VMM in tests, examples and benchmarks.
//!
//! Client memory without an fd ("message memory") is kept in the client:
//! DMA_READ/DMA_WRITE requests the server sends while the client waits for
//! a reply are served from it, the way [`DmaMode`] says (tests play slow,
//! silent and refusing clients with it).

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use zerocopy::IntoBytes;

use crate::conn::{Fill, MsgReader, MsgView};
use crate::proto::{self, cmd, Header};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket failure.
    #[error("vfio-user socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("the server refused {command} with errno {errno}")]
    Refused {
        /// Command name.
        command: &'static str,
        /// errno.
        errno: i32,
    },
    /// The server said something that does not follow the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Error {
    /// The errno of a refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Result of a client call.
pub type Result<T> = std::result::Result<T, Error>;

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Header.
    pub hdr: Header,
    /// Payload.
    pub payload: Vec<u8>,
    /// Fds.
    pub fds: Vec<OwnedFd>,
}

/// Region info with its sparse areas and fd.
#[derive(Debug)]
pub struct Region {
    /// Fixed part.
    pub info: proto::RegionInfo,
    /// Sparse mmap areas.
    pub areas: Vec<proto::SparseArea>,
    /// fd for mmap.
    pub fd: Option<OwnedFd>,
}

/// How the client answers the server's DMA_READ/DMA_WRITE requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmaMode {
    /// At once, from message memory.
    #[default]
    Answer,
    /// After sleeping this long (the client's thread sleeps: so does
    /// everything it would do meanwhile).
    Delay(Duration),
    /// Not now: requests are kept and answered, in order, when the mode
    /// goes back to `Answer` or `Delay` and a reply is awaited (as QEMU
    /// answers only once its main loop runs again).
    Defer,
    /// Never: requests are dropped without a reply.
    Ignore,
    /// With an error reply carrying this errno.
    Refuse(i32),
}

/// A vfio-user client connection.
pub struct Client {
    sock: UnixStream,
    next_id: u16,
    /// The server's VERSION reply: (major, minor, JSON).
    pub server_version: (u16, u16, serde_json::Value),
    memory: BTreeMap<u64, Vec<u8>>,
    /// Server-to-client requests served.
    pub dma_requests: u64,
    /// Of those, the ones that came on the twin socket.
    pub twin_requests: u64,
    dma_mode: DmaMode,
    /// Requests held back by [`DmaMode::Defer`], with whether they came on
    /// the twin socket.
    deferred: Vec<(Message, bool)>,
    /// The twin socket, if the server gave one: its requests come there.
    twin: Option<UnixStream>,
    /// Messages of the socket, from one reused buffer.
    reader: MsgReader,
    /// Messages of the twin socket.
    twin_reader: MsgReader,
}

/// Largest message the client takes.
const MAX_MESSAGE: usize = 64 << 20;

/// The capabilities this client proposes.
pub fn default_caps() -> serde_json::Value {
    serde_json::json!({
        "capabilities": {
            "max_msg_fds": 16,
            "max_data_xfer_size": 1048576,
            "pgsizes": 4096,
            "max_dma_maps": 65535,
            "write_multiple": true,
            "migration": { "pgsize": 4096, "max_bitmap_size": 268435456u64 },
            "ioasid": { "version": 1 },
        }
    })
}

impl Client {
    /// Connects and negotiates with [`default_caps`] at version 0.0.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Self::connect_with(path, 0, &default_caps())
    }

    /// Connects and negotiates with the given minor version and JSON.
    pub fn connect_with(path: impl AsRef<Path>, minor: u16, caps: &serde_json::Value) -> Result<Client> {
        let sock = UnixStream::connect(path)?;
        let mut c = Self::from_stream(sock);
        let mut p = proto::Version { major: 0, minor }.as_bytes().to_vec();
        p.extend_from_slice(caps.to_string().as_bytes());
        p.push(0);
        let r = c.call(cmd::VERSION, &p, &[])?;
        let v: proto::Version = proto::read(&r.payload).ok_or_else(|| Error::Protocol("short VERSION".into()))?;
        let json = &r.payload[4..];
        let end = json.iter().position(|&b| b == 0).ok_or_else(|| Error::Protocol("JSON not NUL-terminated".into()))?;
        let val: serde_json::Value =
            serde_json::from_slice(&json[..end]).map_err(|e| Error::Protocol(format!("VERSION JSON: {e}")))?;
        let twin = val["capabilities"]["twin_socket"]["fd_index"].as_u64();
        let mut fds = r.fds;
        if let Some(i) = twin {
            let i = usize::try_from(i).ok().filter(|&i| i < fds.len());
            let fd = i.map(|i| fds.swap_remove(i)).ok_or_else(|| Error::Protocol("twin_socket fd missing".into()))?;
            c.twin = Some(UnixStream::from(fd));
        }
        c.server_version = (v.major, v.minor, val);
        Ok(c)
    }

    /// A client over a connected stream that has not negotiated yet.
    pub fn from_stream(sock: UnixStream) -> Client {
        let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
        Client {
            sock,
            next_id: 1,
            server_version: (0, 0, serde_json::Value::Null),
            memory: BTreeMap::new(),
            dma_requests: 0,
            twin_requests: 0,
            dma_mode: DmaMode::Answer,
            deferred: Vec::new(),
            twin: None,
            reader: MsgReader::new(MAX_MESSAGE),
            twin_reader: MsgReader::new(MAX_MESSAGE),
        }
    }

    /// The socket (for hostile tests).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Adds client memory without an fd at `address` (for DMA_READ/WRITE).
    pub fn add_message_memory(&mut self, address: u64, bytes: Vec<u8>) {
        self.memory.insert(address, bytes);
    }

    /// Client memory added with [`Client::add_message_memory`].
    pub fn message_memory(&self, address: u64) -> Option<&[u8]> {
        self.memory.get(&address).map(|v| v.as_slice())
    }

    /// Message memory added at exactly `address`, to change in place.
    pub fn message_memory_mut(&mut self, address: u64) -> Option<&mut [u8]> {
        self.memory.get_mut(&address).map(|v| v.as_mut_slice())
    }

    /// Sends raw bytes with fds.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_on(false, bytes, fds)
    }

    /// Whether the server gave a twin socket for its requests.
    pub fn has_twin(&self) -> bool {
        self.twin.is_some()
    }

    fn sock(&self, twin: bool) -> &UnixStream {
        match (&self.twin, twin) {
            (Some(t), true) => t,
            _ => &self.sock,
        }
    }

    fn send_on(&self, twin: bool, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_parts(twin, &[bytes], fds)
    }

    /// Sends a message made of `parts` (one `sendmsg` unless the socket
    /// takes only part of it).
    fn send_parts(&self, twin: bool, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let sock = self.sock(twin);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cm = [ControlMessage::ScmRights(&raw)];
        let cms: &[ControlMessage] = if raw.is_empty() { &[] } else { &cm };
        let iov: Vec<IoSlice<'_>>;
        let mut small = [IoSlice::new(&[]); 4];
        let slices: &[IoSlice<'_>] = if parts.len() <= small.len() {
            for (s, p) in small.iter_mut().zip(parts) {
                *s = IoSlice::new(p);
            }
            &small[..parts.len()]
        } else {
            iov = parts.iter().map(|p| IoSlice::new(p)).collect();
            &iov
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let sent = sendmsg::<()>(sock.as_raw_fd(), slices, cms, MsgFlags::MSG_NOSIGNAL, None)
            .map_err(|e| Error::Io(e.into()))?;
        if sent < total {
            // The socket took part of it: the rest goes in order, as bytes.
            let all = parts.concat();
            let mut off = sent;
            while off < all.len() {
                let iov = [IoSlice::new(&all[off..])];
                off += sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(|e| Error::Io(e.into()))?;
            }
        }
        Ok(())
    }

    /// Most fds the client takes with one message.
    pub const MAX_FDS: usize = crate::conn::MAX_MSG_FDS;

    /// Whether a whole message has been received and not yet taken (a
    /// caller that polls the socket must look here first).
    pub fn buffered(&self) -> bool {
        self.reader.has_msg()
    }

    /// Reads until a whole message of the socket (`twin` or the main
    /// one) is buffered.
    fn fill_until_msg(&mut self, twin: bool) -> Result<()> {
        loop {
            let (r, sock) = match (&self.twin, twin) {
                (Some(t), true) => (&mut self.twin_reader, t),
                _ => (&mut self.reader, &self.sock),
            };
            if r.has_msg() {
                return Ok(());
            }
            match r.fill(sock.as_fd()).map_err(conn_error)? {
                Fill::Data | Fill::Drained => {}
                Fill::WouldBlock => return Err(Error::Io(std::io::ErrorKind::TimedOut.into())),
                Fill::Eof => return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }

    /// The next message of the socket, its payload still in the buffer.
    fn next_view(&mut self, twin: bool) -> Result<MsgView<'_>> {
        self.fill_until_msg(twin)?;
        let r = if twin && self.twin.is_some() { &mut self.twin_reader } else { &mut self.reader };
        match r.next_view().map_err(conn_error)? {
            Some(v) if v.fail == Some(libc::E2BIG) => {
                Err(Error::Protocol(format!("message of more than {MAX_MESSAGE} bytes")))
            }
            Some(v) if v.fail.is_some() => Err(Error::Protocol(format!(
                "the server sent more than {} fds, or fds that are not memory, sockets or event fds, with a message",
                Self::MAX_FDS
            ))),
            Some(v) => Ok(v),
            // The header declared a message too large to take.
            None => Err(Error::Protocol(format!("a message of more than {MAX_MESSAGE} bytes"))),
        }
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<Message> {
        self.recv_on(false)
    }

    fn recv_on(&mut self, twin: bool) -> Result<Message> {
        let v = self.next_view(twin)?;
        Ok(Message { hdr: v.hdr, payload: v.payload.to_vec(), fds: v.fds })
    }

    /// Sends a command without waiting; returns its message id.
    pub fn send(&mut self, command: u16, payload: &[u8], fds: &[BorrowedFd<'_>], no_reply: bool) -> Result<u16> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1) & 0x7fff;
        let mut h = Header::command(id, command, payload.len());
        if no_reply {
            h.flags |= proto::flags::NO_REPLY;
        }
        self.send_parts(false, &[h.as_bytes(), payload], fds)?;
        Ok(id)
    }

    /// Sends a command made of `parts` without waiting; returns its id.
    fn send_cmd(&mut self, command: u16, parts: &[&[u8]], no_reply: bool) -> Result<u16> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1) & 0x7fff;
        let len = parts.iter().map(|p| p.len()).sum();
        let mut h = Header::command(id, command, len);
        if no_reply {
            h.flags |= proto::flags::NO_REPLY;
        }
        match parts {
            [a] => self.send_parts(false, &[h.as_bytes(), a], &[])?,
            [a, b] => self.send_parts(false, &[h.as_bytes(), a, b], &[])?,
            _ => self.send_parts(false, &[h.as_bytes(), &parts.concat()], &[])?,
        }
        Ok(id)
    }

    /// Sets how DMA requests are answered from now on.
    pub fn set_dma_mode(&mut self, mode: DmaMode) {
        self.dma_mode = mode;
    }

    /// DMA requests received and not answered yet ([`DmaMode::Defer`]).
    pub fn deferred_dma(&self) -> usize {
        self.deferred.len()
    }

    /// Waits for the reply to message `id`, serving DMA requests meanwhile.
    pub fn wait(&mut self, id: u16, command: u16) -> Result<Message> {
        self.wait_with(id, command, |hdr, payload, fds| Message { hdr, payload: payload.to_vec(), fds })
    }

    /// Waits for the reply to message `id`, serving DMA requests
    /// meanwhile, and hands it to `f` while its payload is still in the
    /// receive buffer.
    fn wait_with<R>(&mut self, id: u16, command: u16, f: impl FnOnce(Header, &[u8], Vec<OwnedFd>) -> R) -> Result<R> {
        if !matches!(self.dma_mode, DmaMode::Defer) && !self.deferred.is_empty() {
            for (m, twin) in std::mem::take(&mut self.deferred) {
                self.serve(m, twin)?;
            }
        }
        loop {
            if self.twin.is_some() && self.twin_first()? {
                let m = self.recv_on(true)?;
                if m.hdr.is_reply() {
                    return Err(Error::Protocol("a reply on the twin socket".into()));
                }
                self.twin_requests += 1;
                self.serve(m, true)?;
                continue;
            }
            let v = self.next_view(false)?;
            let hdr = v.hdr;
            if !hdr.is_reply() {
                let m = Message { hdr, payload: v.payload.to_vec(), fds: v.fds };
                self.serve(m, false)?;
                continue;
            }
            if hdr.msg_id != id {
                return Err(Error::Protocol(format!("reply to {} while waiting for {id}", hdr.msg_id)));
            }
            if hdr.command != command {
                return Err(Error::Protocol(format!("reply for command {} to command {command}", hdr.command)));
            }
            if hdr.flags & proto::flags::ERROR != 0 {
                if v.payload.is_empty() {
                    return Err(Error::Refused { command: cmd::name(command), errno: hdr.error as i32 });
                }
                return Err(Error::Protocol("an error reply with a payload".into()));
            }
            return Ok(f(hdr, v.payload, v.fds));
        }
    }

    /// Sends a command and waits for its reply.
    pub fn call(&mut self, command: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<Message> {
        let id = self.send(command, payload, fds, false)?;
        self.wait(id, command)
    }

    /// Waits until the main or the twin socket has a message; true if
    /// the twin socket has one.
    fn twin_first(&self) -> Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(t) = &self.twin else { return Ok(false) };
        // The main socket first: replies end the wait.
        if self.reader.has_msg() {
            return Ok(false);
        }
        if self.twin_reader.has_msg() {
            return Ok(true);
        }
        let mut p = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN), PollFd::new(t.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut p, PollTimeout::from(30_000u16)).map_err(|e| Error::Io(e.into()))?;
        if n == 0 {
            return Err(Error::Io(std::io::ErrorKind::TimedOut.into()));
        }
        // The main socket first: replies end the wait.
        let main = p[0].revents().is_some_and(|r| !r.is_empty());
        Ok(!main)
    }

    fn serve(&mut self, m: Message, twin: bool) -> Result<()> {
        match self.dma_mode {
            DmaMode::Answer => {}
            DmaMode::Delay(d) => std::thread::sleep(d),
            DmaMode::Defer => {
                self.deferred.push((m, twin));
                return Ok(());
            }
            DmaMode::Ignore => return Ok(()),
            DmaMode::Refuse(e) => {
                self.dma_requests += 1;
                return self.send_on(twin, m.hdr.error_reply(e).as_bytes(), &[]);
            }
        }
        self.dma_requests += 1;
        let rw: Option<proto::DmaRw> = proto::read(&m.payload);
        let res: std::result::Result<Vec<u8>, i32> = match (m.hdr.command, rw) {
            (cmd::DMA_READ, Some(r)) => self.mem_range(r.address, r.count).map(|(k, o, n)| {
                let mut out = r.as_bytes().to_vec();
                out.extend_from_slice(&self.memory[&k][o..o + n]);
                out
            }),
            (cmd::DMA_WRITE, Some(r)) => {
                let data = m.payload.get(16..).unwrap_or(&[]);
                match self.mem_range(r.address, r.count) {
                    Ok((k, o, n)) if data.len() == n => {
                        if let Some(v) = self.memory.get_mut(&k) {
                            v[o..o + n].copy_from_slice(data);
                        }
                        Ok(r.as_bytes().to_vec())
                    }
                    Ok(_) => Err(libc::EINVAL),
                    Err(e) => Err(e),
                }
            }
            (cmd::DMA_READ | cmd::DMA_WRITE, None) => Err(libc::EINVAL),
            _ => Err(libc::ENOSYS),
        };
        let bytes = match res {
            Ok(p) => [m.hdr.reply(p.len()).as_bytes(), &p].concat(),
            Err(e) => m.hdr.error_reply(e).as_bytes().to_vec(),
        };
        self.send_on(twin, &bytes, &[])
    }

    fn mem_range(&self, addr: u64, count: u64) -> std::result::Result<(u64, usize, usize), i32> {
        let (&k, v) = self.memory.range(..=addr).next_back().ok_or(libc::EFAULT)?;
        let o = usize::try_from(addr - k).map_err(|_| libc::EFAULT)?;
        let n = usize::try_from(count).map_err(|_| libc::EFAULT)?;
        if o.checked_add(n).is_none_or(|e| e > v.len()) {
            return Err(libc::EFAULT);
        }
        Ok((k, o, n))
    }

    /// DMA_MAP.
    pub fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        let m = proto::DmaMap { argsz: 32, flags, offset, address, size };
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.call(cmd::DMA_MAP, m.as_bytes(), &fds).map(|_| ())
    }

    /// DMA_UNMAP.
    pub fn dma_unmap(&mut self, address: u64, size: u64, flags: u32) -> Result<proto::DmaUnmap> {
        let u = proto::DmaUnmap { argsz: 24, flags, address, size };
        let r = self.call(cmd::DMA_UNMAP, u.as_bytes(), &[])?;
        proto::read(&r.payload).ok_or_else(|| Error::Protocol("short DMA_UNMAP reply".into()))
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> Result<proto::DeviceInfo> {
        let q = proto::DeviceInfo { argsz: 16, ..Default::default() };
        let r = self.call(cmd::DEVICE_GET_INFO, q.as_bytes(), &[])?;
        proto::read(&r.payload).ok_or_else(|| Error::Protocol("short DEVICE_GET_INFO reply".into()))
    }

    /// DEVICE_GET_REGION_INFO with a given `argsz` (the raw reply).
    pub fn region_info_raw(&mut self, index: u32, argsz: u32) -> Result<Message> {
        let q = proto::RegionInfo { argsz, index, ..Default::default() };
        self.call(cmd::DEVICE_GET_REGION_INFO, q.as_bytes(), &[])
    }

    /// DEVICE_GET_REGION_INFO, retried with the needed `argsz`, capability
    /// chain parsed.
    pub fn region_info(&mut self, index: u32) -> Result<Region> {
        let mut r = self.region_info_raw(index, 32)?;
        let mut info: proto::RegionInfo =
            proto::read(&r.payload).ok_or_else(|| Error::Protocol("short region info".into()))?;
        if info.argsz > 32 {
            r = self.region_info_raw(index, info.argsz)?;
            info = proto::read(&r.payload).ok_or_else(|| Error::Protocol("short region info".into()))?;
        }
        let mut areas = Vec::new();
        let mut next = info.cap_offset as usize;
        let mut hops = 0;
        while next != 0 && hops < 16 {
            hops += 1;
            let h: proto::CapHeader = r
                .payload
                .get(next..)
                .and_then(proto::read)
                .ok_or_else(|| Error::Protocol(format!("capability at {next} outside the reply")))?;
            if h.id == proto::REGION_CAP_SPARSE_MMAP {
                let n = r.payload.get(next + 8..next + 12).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                for k in 0..n as usize {
                    let a: proto::SparseArea = r
                        .payload
                        .get(next + 16 + 16 * k..)
                        .and_then(proto::read)
                        .ok_or_else(|| Error::Protocol("sparse area outside the reply".into()))?;
                    areas.push(a);
                }
            }
            next = h.next as usize;
        }
        Ok(Region { info, areas, fd: r.fds.into_iter().next() })
    }

    /// DEVICE_GET_REGION_IO_FDS: entries and fds.
    pub fn region_io_fds(&mut self, index: u32) -> Result<(Vec<proto::IoFdEntry>, Vec<OwnedFd>)> {
        let q = proto::IoFdsInfo { argsz: 16 + 40 * 16, flags: 0, index, count: 0 };
        let r = self.call(cmd::DEVICE_GET_REGION_IO_FDS, q.as_bytes(), &[])?;
        let h: proto::IoFdsInfo = proto::read(&r.payload).ok_or_else(|| Error::Protocol("short IO_FDS".into()))?;
        let mut v = Vec::new();
        for k in 0..h.count as usize {
            if let Some(e) = r.payload.get(16 + 40 * k..).and_then(proto::read::<proto::IoFdEntry>) {
                v.push(e);
            }
        }
        Ok((v, r.fds))
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&mut self, index: u32) -> Result<proto::IrqInfo> {
        let q = proto::IrqInfo { argsz: 16, flags: 0, index, count: 0 };
        let r = self.call(cmd::DEVICE_GET_IRQ_INFO, q.as_bytes(), &[])?;
        proto::read(&r.payload).ok_or_else(|| Error::Protocol("short IRQ info".into()))
    }

    /// DEVICE_SET_IRQS.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let q = proto::IrqSet { argsz: (20 + data.len()) as u32, flags, index, start, count };
        let p = [q.as_bytes(), data].concat();
        self.call(cmd::DEVICE_SET_IRQS, &p, fds).map(|_| ())
    }

    /// REGION_READ.
    pub fn region_read(&mut self, region: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.region_read_into(region, offset, &mut out)?;
        Ok(out)
    }

    /// REGION_READ of `buf.len()` bytes into `buf` (no allocation).
    pub fn region_read_into(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        let q = proto::RegionAccess { offset, region, count: len as u32 };
        let id = self.send_cmd(cmd::REGION_READ, &[q.as_bytes()], false)?;
        self.wait_with(id, cmd::REGION_READ, |_, p, _| match p.get(16..) {
            Some(d) if d.len() == len => {
                buf.copy_from_slice(d);
                Ok(())
            }
            _ => Err(Error::Protocol(format!("REGION_READ reply of {} bytes for {len}", p.len()))),
        })?
    }

    /// REGION_WRITE (waits for the reply).
    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        let q = proto::RegionAccess { offset, region, count: data.len() as u32 };
        let id = self.send_cmd(cmd::REGION_WRITE, &[q.as_bytes(), data], false)?;
        self.wait_with(id, cmd::REGION_WRITE, |_, _, _| ())
    }

    /// REGION_WRITE with NO_REPLY (posted).
    pub fn region_write_posted(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        let q = proto::RegionAccess { offset, region, count: data.len() as u32 };
        self.send_cmd(cmd::REGION_WRITE, &[q.as_bytes(), data], true).map(|_| ())
    }

    /// REGION_WRITE_MULTI: `(region, offset, data <= 8 bytes)` each.
    pub fn write_multi(&mut self, writes: &[(u32, u64, &[u8])], no_reply: bool) -> Result<Option<u64>> {
        let mut p = (writes.len() as u64).to_ne_bytes().to_vec();
        for (region, offset, data) in writes {
            let mut e =
                proto::WriteMultiEntry { offset: *offset, region: *region, count: data.len() as u32, data: [0; 8] };
            let n = data.len().min(8);
            e.data[..n].copy_from_slice(&data[..n]);
            p.extend_from_slice(e.as_bytes());
        }
        if no_reply {
            self.send(cmd::REGION_WRITE_MULTI, &p, &[], true)?;
            return Ok(None);
        }
        let r = self.call(cmd::REGION_WRITE_MULTI, &p, &[])?;
        Ok(r.payload.get(..8).map(|b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]))))
    }

    /// Sets the command register's I/O and Memory Space Enable and Bus
    /// Master Enable (what a guest's PCI core and driver do before using
    /// a device): BARs decode and the device may DMA.
    pub fn enable_function(&mut self) -> Result<()> {
        use crate::pci::command::{BUS_MASTER, IO, MEMORY};
        self.set_command(IO | MEMORY | BUS_MASTER, 0)
    }

    /// Sets the `set` bits and clears the `clear` bits of the command
    /// register (a read, then a write of config space).
    pub fn set_command(&mut self, set: u16, clear: u16) -> Result<()> {
        let b = self.region_read(proto::region::CONFIG, crate::pci::reg::COMMAND as u64, 2)?;
        let cmd = u16::from_le_bytes([b[0], b[1]]);
        let v = (cmd | set) & !clear;
        self.region_write(proto::region::CONFIG, crate::pci::reg::COMMAND as u64, &v.to_le_bytes())
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> Result<()> {
        self.call(cmd::DEVICE_RESET, &[], &[]).map(|_| ())
    }

    /// DEVICE_FEATURE: the reply's data part.
    pub fn feature(&mut self, flags: u32, data: &[u8], argsz: u32) -> Result<Vec<u8>> {
        let f = proto::Feature { argsz, flags };
        let r = self.call(cmd::DEVICE_FEATURE, &[f.as_bytes(), data].concat(), &[])?;
        Ok(r.payload.get(8..).unwrap_or(&[]).to_vec())
    }

    /// Migration: sets the device state; returns the state reported.
    pub fn set_mig_state(&mut self, state: u32) -> Result<u32> {
        let s = proto::MigState { device_state: state, data_fd: 0 };
        let d = self.feature(proto::FEATURE_SET | proto::FEATURE_MIG_DEVICE_STATE, s.as_bytes(), 16)?;
        proto::read::<proto::MigState>(&d).map(|s| s.device_state).ok_or_else(|| Error::Protocol("short state".into()))
    }

    /// Migration: the current device state.
    pub fn mig_state(&mut self) -> Result<u32> {
        let d = self.feature(proto::FEATURE_GET | proto::FEATURE_MIG_DEVICE_STATE, &[], 16)?;
        proto::read::<proto::MigState>(&d).map(|s| s.device_state).ok_or_else(|| Error::Protocol("short state".into()))
    }

    /// MIG_DATA_READ of up to `size` bytes.
    pub fn mig_data_read(&mut self, size: u32) -> Result<Vec<u8>> {
        let q = proto::MigData { argsz: 8 + size, size };
        let r = self.call(cmd::MIG_DATA_READ, q.as_bytes(), &[])?;
        let h: proto::MigData = proto::read(&r.payload).ok_or_else(|| Error::Protocol("short MIG_DATA".into()))?;
        r.payload.get(8..8 + h.size as usize).map(|d| d.to_vec()).ok_or_else(|| Error::Protocol("short data".into()))
    }

    /// MIG_DATA_WRITE.
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<()> {
        let q = proto::MigData { argsz: 8, size: data.len() as u32 };
        self.call(cmd::MIG_DATA_WRITE, &[q.as_bytes(), data].concat(), &[]).map(|_| ())
    }

    /// Extension: binds the device through a device channel fd.
    pub fn ioasid_bind(&mut self, channel: BorrowedFd<'_>) -> Result<proto::ExtBind> {
        let q = proto::ExtBind { argsz: 24, ..Default::default() };
        let r = self.call(cmd::EXT_BIND, q.as_bytes(), &[channel])?;
        proto::read(&r.payload).ok_or_else(|| Error::Protocol("short IOASID_BIND reply".into()))
    }

    /// Extension: drops the binding.
    pub fn ioasid_unbind(&mut self) -> Result<()> {
        self.call(cmd::EXT_UNBIND, &[], &[]).map(|_| ())
    }

    /// Extension: attaches the RID (`vpasid` None) or a vPASID to `pt_id`;
    /// returns the pPASID the server chose.
    pub fn ioasid_attach(&mut self, vpasid: Option<u32>, pt_id: u32, replace: bool) -> Result<u32> {
        let mut flags = if replace { proto::EXT_FLAG_REPLACE } else { 0 };
        if vpasid.is_some() {
            flags |= proto::EXT_FLAG_PASID;
        }
        let q = proto::ExtAttach { argsz: 24, flags, vpasid: vpasid.unwrap_or(0), pt_id, ppasid: 0, reserved: 0 };
        let r = self.call(cmd::EXT_ATTACH, q.as_bytes(), &[])?;
        proto::read::<proto::ExtAttach>(&r.payload).map(|a| a.ppasid).ok_or_else(|| Error::Protocol("short".into()))
    }

    /// Extension: detaches the RID or a vPASID.
    pub fn ioasid_detach(&mut self, vpasid: Option<u32>) -> Result<()> {
        let flags = if vpasid.is_some() { proto::EXT_FLAG_PASID } else { 0 };
        let q = proto::ExtAttach { argsz: 24, flags, vpasid: vpasid.unwrap_or(0), ..Default::default() };
        self.call(cmd::EXT_DETACH, q.as_bytes(), &[]).map(|_| ())
    }

    /// Extension: the RID's IOAS (0 = none) and the vPASID map.
    pub fn ioasid_list(&mut self) -> Result<(u32, Vec<proto::ExtPasidEntry>)> {
        let q = proto::ExtList { argsz: 16 + 16 * 4096, ..Default::default() };
        let r = self.call(cmd::EXT_LIST_PASIDS, q.as_bytes(), &[])?;
        let h: proto::ExtList = proto::read(&r.payload).ok_or_else(|| Error::Protocol("short list".into()))?;
        let v = (0..h.count as usize).filter_map(|k| r.payload.get(16 + 16 * k..).and_then(proto::read)).collect();
        Ok((h.rid_pt_id, v))
    }

    /// The socket as a borrowed fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// A framing error of the server's stream, as the client reports it.
fn conn_error(e: crate::conn::Error) -> Error {
    match e {
        crate::conn::Error::Io(e) => Error::Io(e),
        e => Error::Protocol(e.to_string()),
    }
}
