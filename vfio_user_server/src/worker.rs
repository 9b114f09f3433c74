//! The device thread: executes a client's commands in order against the
//! device, its config space, interrupts, DMA table and migration state,
//! and writes the replies. The event loop feeds it through a crossbeam
//! channel; server-to-client DMA requests are answered by the event loop,
//! so a command never blocks on one.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use iommu_core::sync;
use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use crate::conn::{Msg, Port, Writer, MAX_MSG_FDS};
use crate::device::{Device, DeviceContext, IoFdDesc, MsixDesc, RegionDesc};
use crate::dma::Dma;
use crate::irq::Irqs;
use crate::pci::{ConfigEvent, PciConfig};
use crate::proto::{self, cmd, region, Header};

/// Our protocol minor version (the major is 0).
pub const MINOR: u16 = 1;
/// Largest `count` of a read or write we accept (`max_data_xfer_size`).
pub const MAX_XFER: usize = 1 << 20;
/// Largest payload we accept in one message.
pub const MAX_PAYLOAD: usize = MAX_XFER + 4096;
/// Most migration data a destination accepts.
pub const MAX_MIG_DATA: usize = 64 << 20;
/// Most DMA logging ranges in one request.
pub const MAX_LOGGING_RANGES: u32 = 1024;
/// Largest DMA logging report bitmap.
pub const MAX_BITMAP_BYTES: u64 = 1 << 20;

/// What is queued for the device thread; the event loop stops reading the
/// client while it is over the limits, and the device thread wakes it.
pub struct Backlog {
    bytes: std::sync::atomic::AtomicUsize,
    jobs: std::sync::atomic::AtomicUsize,
    paused: std::sync::atomic::AtomicBool,
    waker: Arc<mio::Waker>,
}

impl Backlog {
    /// Most bytes of commands queued.
    pub const MAX_BYTES: usize = 64 << 20;
    /// Most commands queued.
    pub const MAX_JOBS: usize = 4096;

    /// A backlog that wakes the loop through `waker`.
    pub fn new(waker: Arc<mio::Waker>) -> Arc<Backlog> {
        Arc::new(Backlog { bytes: Default::default(), jobs: Default::default(), paused: Default::default(), waker })
    }

    /// A command of `n` payload bytes was queued.
    pub fn add(&self, n: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        self.bytes.fetch_add(n + 64, SeqCst);
        self.jobs.fetch_add(1, SeqCst);
    }

    /// A command of `n` payload bytes was done.
    pub fn done(&self, n: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        let b = self.bytes.fetch_sub(n + 64, SeqCst) - (n + 64);
        let j = self.jobs.fetch_sub(1, SeqCst) - 1;
        if b < Self::MAX_BYTES / 2 && j < Self::MAX_JOBS / 2 && self.paused.swap(false, SeqCst) {
            let _ = self.waker.wake();
        }
    }

    /// Whether the loop must stop reading; marks it paused if so.
    pub fn over(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let over = self.bytes.load(SeqCst) >= Self::MAX_BYTES || self.jobs.load(SeqCst) >= Self::MAX_JOBS;
        if over {
            self.paused.store(true, SeqCst);
            // The device thread may have drained everything meanwhile.
            if self.bytes.load(SeqCst) < Self::MAX_BYTES / 2 && self.jobs.load(SeqCst) < Self::MAX_JOBS / 2 {
                self.paused.store(false, SeqCst);
                return false;
            }
        }
        over
    }
}

/// Work for the device thread.
pub enum Job {
    /// A client connected, with the ioeventfds made for it.
    Connected(Arc<Writer>, Arc<Port>, Vec<Arc<File>>),
    /// A command from the client.
    Command(Msg),
    /// The client went away.
    Disconnected,
    /// An ioeventfd offered through GET_REGION_IO_FDS fired. The flag is
    /// set while this job is queued, so a ringing client queues at most one
    /// job per ioeventfd however busy the device thread is.
    IoFd(usize, Arc<std::sync::atomic::AtomicBool>),
    /// Stop the thread.
    Stop,
}

/// Migration states.
pub mod mig {
    /// Failed; needs a reset.
    pub const ERROR: u32 = 0;
    /// Stopped.
    pub const STOP: u32 = 1;
    /// Running.
    pub const RUNNING: u32 = 2;
    /// Stopped, state being read out.
    pub const STOP_COPY: u32 = 3;
    /// Stopped, state being loaded.
    pub const RESUMING: u32 = 4;
    /// Running, state being read out.
    pub const PRE_COPY: u32 = 6;
}

const MIG_MAGIC: u32 = 0x696f_6d67;

#[derive(Serialize, Deserialize)]
struct MigBlob {
    magic: u32,
    device: String,
    config: Vec<u8>,
    msix_table: Vec<u8>,
    state: Vec<u8>,
}

/// Per-connection negotiated values.
#[derive(Default)]
struct Negotiated {
    done: bool,
    ioasid: bool,
}

type Reply = (Vec<u8>, Vec<Arc<File>>);
type Res = Result<Reply, i32>;

fn ok(p: &[u8]) -> Res {
    Ok((p.to_vec(), Vec::new()))
}

fn need<T: zerocopy::FromBytes>(p: &[u8]) -> Result<T, i32> {
    proto::read::<T>(p).ok_or(libc::EINVAL)
}

/// The device thread's state.
pub struct Worker {
    device: Box<dyn Device>,
    name: &'static str,
    config: PciConfig,
    regions: Vec<Option<RegionDesc>>,
    msix: Option<MsixDesc>,
    irqs: Arc<Irqs>,
    dma: Arc<Dma>,
    io_descs: Vec<IoFdDesc>,
    io_fds: Vec<(IoFdDesc, Arc<File>)>,
    writer: Option<Arc<Writer>>,
    port: Option<Arc<Port>>,
    neg: Negotiated,
    mig_state: u32,
    mig_out: Vec<u8>,
    mig_pos: usize,
    mig_in: Vec<u8>,
    logging: bool,
    stats: Arc<Stats>,
}

/// Counters of the device thread.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands handled.
    pub commands: std::sync::atomic::AtomicU64,
    /// Commands that failed.
    pub errors: std::sync::atomic::AtomicU64,
    /// Clients served.
    pub connections: std::sync::atomic::AtomicU64,
    /// Commands of the current client, by command number.
    pub by_command: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Worker {
    /// Sets the device up: config space, interrupts, its DMA path.
    pub fn new(mut device: Box<dyn Device>, dma: Arc<Dma>) -> std::io::Result<Worker> {
        let d = device.describe();
        let irqs = Irqs::new(d.irqs);
        let mut regions: Vec<Option<RegionDesc>> = vec![None; region::NUM as usize];
        for r in d.regions {
            let i = r.index as usize;
            if i < regions.len() && r.index != region::CONFIG {
                regions[i] = Some(r);
            }
        }
        let io_descs = d.io_fds;
        device.start(DeviceContext { dma: dma.clone(), irqs: irqs.clone() });
        Ok(Worker {
            device,
            name: d.name,
            config: d.config,
            regions,
            msix: d.msix,
            irqs,
            dma,
            io_descs,
            io_fds: Vec::new(),
            writer: None,
            port: None,
            neg: Negotiated::default(),
            mig_state: mig::RUNNING,
            mig_out: Vec::new(),
            mig_pos: 0,
            mig_in: Vec::new(),
            logging: false,
            stats: Arc::new(Stats::default()),
        })
    }

    /// Registers the device offers as ioeventfds (the event loop makes
    /// fresh eventfds for each client and watches them).
    pub fn io_fd_descs(&self) -> Vec<IoFdDesc> {
        self.io_descs.clone()
    }

    /// Counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs jobs until [`Job::Stop`] or the sender goes away.
    pub fn run(mut self, rx: crossbeam_channel::Receiver<Job>, backlog: Arc<Backlog>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Connected(w, p, io) => {
                    self.stats.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.io_fds = self.io_descs.iter().copied().zip(io).collect();
                    self.writer = Some(w);
                    self.dma.set_client(Some(p.clone()));
                    self.port = Some(p);
                    self.neg = Negotiated::default();
                }
                Job::Command(m) => {
                    let n = m.payload.len();
                    self.command(m);
                    backlog.done(n);
                }
                Job::Disconnected => self.disconnect(),
                Job::IoFd(i, queued) => {
                    queued.store(false, std::sync::atomic::Ordering::Release);
                    self.io_fd(i);
                }
                Job::Stop => break,
            }
        }
        self.disconnect();
        self.device.set_running(false);
    }

    fn disconnect(&mut self) {
        {
            let mut b = sync::lock(&self.stats.by_command);
            if !b.is_empty() {
                let list: Vec<String> = b.iter().map(|(c, n)| format!("{} {n}", cmd::name(*c))).collect();
                tracing::info!("the client sent: {}", list.join(", "));
            }
            b.clear();
        }
        if let Some(p) = self.port.take() {
            p.close();
        }
        self.writer = None;
        self.io_fds.clear();
        // Queued device work addressed the departed client's memory.
        self.device.client_gone();
        self.dma.disconnect();
        self.irqs.clear();
        let d = self.device.describe();
        for r in d.regions {
            if let Some(slot) = self.regions.get_mut(r.index as usize) {
                if r.index != region::CONFIG {
                    *slot = Some(r);
                }
            }
        }
        if self.logging {
            let _ = self.dma.set_dirty_tracking(false);
            self.logging = false;
        }
        // The device keeps its state for the next client, migration state
        // and data included (a migration may be driven across connections):
        // a stopped device stays stopped, saved data can still be read,
        // data being loaded is kept. Its queued work addressed the departed
        // client's memory and was dropped above.
        self.neg = Negotiated::default();
    }

    fn io_fd(&mut self, i: usize) {
        let Some(io) = self.io_fds.get(i).map(|(d, _)| *d) else { return };
        let v = io.datamatch.unwrap_or(0).to_le_bytes();
        let n = (io.size as usize).clamp(1, 8);
        if let Err(e) = self.region_write(io.region, io.offset, &v[..n]) {
            tracing::debug!("ioeventfd write to region {} at {:#x} failed: errno {e}", io.region, io.offset);
        }
    }

    fn command(&mut self, m: Msg) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.commands.fetch_add(1, Relaxed);
        let hdr = m.hdr;
        *sync::lock(&self.stats.by_command).entry(hdr.command).or_default() += 1;
        let res = match m.fail {
            Some(e) => Err(e),
            None => self.dispatch(&hdr, &m.payload, m.fds),
        };
        let Some(w) = self.writer.clone() else { return };
        match res {
            Ok((payload, fds)) => {
                if hdr.no_reply() {
                    return;
                }
                let rh = hdr.reply(payload.len());
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                if let Err(e) = w.send(&[rh.as_bytes(), &payload], &borrowed) {
                    tracing::info!("reply to {} not sent: {e}", cmd::name(hdr.command));
                }
            }
            Err(errno) => {
                self.stats.errors.fetch_add(1, Relaxed);
                tracing::debug!("{} (message {}) failed with errno {errno}", cmd::name(hdr.command), hdr.msg_id);
                if hdr.no_reply() {
                    return;
                }
                let _ = w.send(&[hdr.error_reply(errno).as_bytes()], &[]);
                if hdr.command == cmd::VERSION && !self.neg.done {
                    // A client we cannot talk to: the spec says close.
                    w.kill();
                }
            }
        }
    }

    fn dispatch(&mut self, hdr: &Header, p: &[u8], fds: Vec<OwnedFd>) -> Res {
        if hdr.is_reply() || hdr.flags & proto::flags::TYPE_MASK != proto::flags::COMMAND {
            return Err(libc::EINVAL);
        }
        if hdr.command == cmd::VERSION {
            return self.version(p);
        }
        if !self.neg.done {
            tracing::info!("{} before VERSION refused", cmd::name(hdr.command));
            return Err(libc::EINVAL);
        }
        let takes_fds = matches!(hdr.command, cmd::DMA_MAP | cmd::DEVICE_SET_IRQS | cmd::EXT_BIND);
        if !takes_fds && !fds.is_empty() {
            return Err(libc::EINVAL);
        }
        match hdr.command {
            cmd::DMA_MAP => self.dma_map(p, fds),
            cmd::DMA_UNMAP => self.dma_unmap(p),
            cmd::DEVICE_GET_INFO => self.get_info(p),
            cmd::DEVICE_GET_REGION_INFO => self.region_info(p),
            cmd::DEVICE_GET_REGION_IO_FDS => self.region_io_fds(p),
            cmd::DEVICE_GET_IRQ_INFO => self.irq_info(p),
            cmd::DEVICE_SET_IRQS => self.set_irqs(p, fds),
            cmd::REGION_READ => self.cmd_region_read(p),
            cmd::REGION_WRITE => self.cmd_region_write(p),
            cmd::REGION_WRITE_MULTI => self.write_multi(p),
            cmd::DEVICE_RESET => {
                self.reset();
                ok(&[])
            }
            cmd::DEVICE_FEATURE => self.feature(p),
            cmd::MIG_DATA_READ => self.mig_read(p),
            cmd::MIG_DATA_WRITE => self.mig_write(p),
            c if (cmd::EXT_BASE..cmd::EXT_BASE + 0x100).contains(&c) => {
                if !self.neg.ioasid {
                    return Err(libc::EOPNOTSUPP);
                }
                self.ext(c, p, fds)
            }
            _ => Err(libc::ENOSYS),
        }
    }

    fn version(&mut self, p: &[u8]) -> Res {
        if self.neg.done {
            return Err(libc::EINVAL);
        }
        let v: proto::Version = need(p)?;
        if v.major != 0 {
            return Err(libc::ENOTSUP);
        }
        let json = &p[4..];
        let mut client_caps = serde_json::Map::new();
        if !json.is_empty() {
            let end = json.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
            if end > 0 {
                let val: serde_json::Value = serde_json::from_slice(&json[..end]).map_err(|_| libc::EINVAL)?;
                let obj = val.as_object().ok_or(libc::EINVAL)?;
                if let Some(c) = obj.get("capabilities") {
                    client_caps = c.as_object().ok_or(libc::EINVAL)?.clone();
                }
            }
        }
        let num = |k: &str, default: u64| -> Result<u64, i32> {
            match client_caps.get(k) {
                None => Ok(default),
                Some(v) => v.as_u64().ok_or(libc::EINVAL),
            }
        };
        let client_xfer = num("max_data_xfer_size", 1 << 20)?;
        let client_fds = num("max_msg_fds", 1)?;
        if client_xfer == 0 {
            return Err(libc::EINVAL);
        }
        // Only keys the client proposed come back, each no larger than the
        // client's value: the reply then never outgrows the request (QEMU
        // receives it into a buffer the size of its own request).
        let mut caps = serde_json::Map::new();
        let mut cap_num = |k: &str, ours: u64| {
            if let Some(theirs) = client_caps.get(k).and_then(|v| v.as_u64()) {
                caps.insert(k.into(), ours.min(theirs).into());
            }
        };
        cap_num("max_msg_fds", MAX_MSG_FDS as u64);
        cap_num("max_data_xfer_size", MAX_XFER as u64);
        cap_num("max_dma_maps", crate::dma::MAX_DMA_MAPS as u64);
        if let Some(p) = client_caps.get("pgsizes").and_then(|v| v.as_u64()) {
            caps.insert("pgsizes".into(), (p & 4096).into());
        }
        if let Some(w) = client_caps.get("write_multiple").and_then(|v| v.as_bool()) {
            caps.insert("write_multiple".into(), w.into());
        }
        if let Some(m) = client_caps.get("migration").and_then(|v| v.as_object()) {
            let mut mo = serde_json::Map::new();
            if let Some(p) = m.get("pgsize").and_then(|v| v.as_u64()) {
                mo.insert("pgsize".into(), p.min(4096).into());
            }
            if let Some(b) = m.get("max_bitmap_size").and_then(|v| v.as_u64()) {
                mo.insert("max_bitmap_size".into(), b.min(MAX_BITMAP_BYTES).into());
            }
            caps.insert("migration".into(), mo.into());
        }
        if let Some(x) = client_caps.get("ioasid").and_then(|v| v.as_object()) {
            let v = x.get("version").and_then(|v| v.as_u64()).unwrap_or(1).clamp(1, 1);
            caps.insert("ioasid".into(), serde_json::json!({ "version": v }));
            self.neg.ioasid = true;
        }
        if let Some(port) = &self.port {
            // Tiny transfer sizes would turn one DMA into millions of messages.
            port.set_max_xfer(usize::try_from(client_xfer.clamp(4096, MAX_XFER as u64)).unwrap_or(MAX_XFER));
        }
        // Twin socket: our requests and their replies get a socket pair of
        // their own; the client's end goes with this reply.
        let mut fds = Vec::new();
        let twin = client_caps.get("twin_socket").and_then(|t| t.get("supported")).and_then(|v| v.as_bool());
        if twin == Some(true) {
            if let Some(port) = &self.port {
                let pair = std::os::unix::net::UnixStream::pair().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                port.use_twin(OwnedFd::from(pair.0)).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                fds.push(Arc::new(std::fs::File::from(OwnedFd::from(pair.1))));
                caps.insert("twin_socket".into(), serde_json::json!({ "supported": true, "fd_index": 0 }));
            }
        }
        tracing::info!(
            "client speaks vfio-user {}.{} (max_msg_fds {client_fds}, max_data_xfer_size {client_xfer}); replying 0.{}",
            v.major,
            v.minor,
            v.minor.min(MINOR)
        );
        self.neg.done = true;
        let body = serde_json::json!({ "capabilities": caps }).to_string();
        let mut out = proto::Version { major: 0, minor: v.minor.min(MINOR) }.as_bytes().to_vec();
        out.extend_from_slice(body.as_bytes());
        out.push(0);
        Ok((out, fds))
    }

    fn dma_map(&mut self, p: &[u8], mut fds: Vec<OwnedFd>) -> Res {
        let m: proto::DmaMap = need(p)?;
        if (m.argsz as usize) < size_of::<proto::DmaMap>() || fds.len() > 1 {
            return Err(libc::EINVAL);
        }
        self.dma.map(&m, fds.pop()).map_err(|e| {
            tracing::info!("DMA_MAP {:#x}+{:#x} refused: {e}", m.address, m.size);
            e.errno()
        })?;
        ok(&[])
    }

    fn dma_unmap(&mut self, p: &[u8]) -> Res {
        let mut u: proto::DmaUnmap = need(p)?;
        if (u.argsz as usize) < size_of::<proto::DmaUnmap>() {
            return Err(libc::EINVAL);
        }
        let all = match u.flags {
            0 => false,
            proto::DMA_UNMAP_ALL if u.address == 0 && u.size == 0 => true,
            proto::DMA_UNMAP_GET_DIRTY_BITMAP => return Err(libc::ENOTSUP),
            _ => return Err(libc::EINVAL),
        };
        self.dma.unmap(u.address, u.size, all).map_err(|e| {
            tracing::info!("DMA_UNMAP {:#x}+{:#x} refused: {e}", u.address, u.size);
            e.errno()
        })?;
        u.argsz = size_of::<proto::DmaUnmap>() as u32;
        ok(u.as_bytes())
    }

    fn get_info(&mut self, p: &[u8]) -> Res {
        let i: proto::DeviceInfo = need(p)?;
        if (i.argsz as usize) < size_of::<proto::DeviceInfo>() {
            return Err(libc::EINVAL);
        }
        let out = proto::DeviceInfo {
            argsz: size_of::<proto::DeviceInfo>() as u32,
            flags: proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET,
            num_regions: region::NUM,
            num_irqs: proto::irq_index::NUM,
        };
        ok(out.as_bytes())
    }

    fn region_size(&self, index: u32) -> Option<u64> {
        if index == region::CONFIG {
            return Some(self.config.size() as u64);
        }
        self.regions.get(index as usize)?.as_ref().map(|r| r.size)
    }

    fn region_info(&mut self, p: &[u8]) -> Res {
        let q: proto::RegionInfo = need(p)?;
        if (q.argsz as usize) < size_of::<proto::RegionInfo>() || q.index >= region::NUM {
            return Err(libc::EINVAL);
        }
        let mut info = proto::RegionInfo { argsz: 32, flags: 0, index: q.index, cap_offset: 0, size: 0, offset: 0 };
        // Each region has a distinct offset, like VFIO's index << 40.
        info.offset = u64::from(q.index) << 40;
        let mut caps = Vec::new();
        let mut fd = None;
        if q.index == region::CONFIG {
            info.size = self.config.size() as u64;
            info.flags = proto::REGION_READ | proto::REGION_WRITE;
        } else if let Some(r) = self.regions[q.index as usize].as_ref() {
            info.size = r.size;
            info.flags = if r.read { proto::REGION_READ } else { 0 } | if r.write { proto::REGION_WRITE } else { 0 };
            if let Some(m) = &r.mmap {
                info.flags |= proto::REGION_MMAP;
                info.offset = m.file_offset;
                fd = Some(m.file.clone());
                if !m.areas.is_empty() {
                    let h = proto::CapHeader { id: proto::REGION_CAP_SPARSE_MMAP, version: 1, next: 0 };
                    caps.extend_from_slice(h.as_bytes());
                    caps.extend_from_slice(&(m.areas.len() as u32).to_ne_bytes());
                    caps.extend_from_slice(&0u32.to_ne_bytes());
                    for a in &m.areas {
                        caps.extend_from_slice(a.as_bytes());
                    }
                }
            }
        }
        let full = 32 + caps.len();
        info.argsz = full as u32;
        if (q.argsz as usize) < full {
            // Only the fixed part: the client retries with a bigger argsz.
            return ok(info.as_bytes());
        }
        if !caps.is_empty() {
            // CAPS only with the chain present (QEMU checks cap_offset when
            // the flag is set).
            info.flags |= proto::REGION_CAPS;
            info.cap_offset = 32;
        }
        let mut out = info.as_bytes().to_vec();
        out.extend_from_slice(&caps);
        Ok((out, fd.into_iter().collect()))
    }

    fn region_io_fds(&mut self, p: &[u8]) -> Res {
        let q: proto::IoFdsInfo = need(p)?;
        if (q.argsz as usize) < size_of::<proto::IoFdsInfo>() || q.index >= region::NUM || q.flags != 0 || q.count != 0
        {
            return Err(libc::EINVAL);
        }
        let mine: Vec<&(IoFdDesc, Arc<File>)> = self.io_fds.iter().filter(|(d, _)| d.region == q.index).collect();
        let full = 16 + 40 * mine.len();
        let mut head = proto::IoFdsInfo { argsz: full as u32, flags: 0, index: q.index, count: mine.len() as u32 };
        if (q.argsz as usize) < full {
            return ok(head.as_bytes());
        }
        let mut out = Vec::new();
        let mut fds = Vec::new();
        head.count = mine.len() as u32;
        out.extend_from_slice(head.as_bytes());
        for (i, (d, f)) in mine.iter().enumerate() {
            let e = proto::IoFdEntry {
                offset: d.offset,
                size: d.size,
                fd_index: i as u32,
                kind: proto::IO_FD_TYPE_IOEVENTFD,
                flags: if d.datamatch.is_some() { proto::IOEVENTFD_FLAG_DATAMATCH } else { 0 },
                padding: 0,
                datamatch: d.datamatch.unwrap_or(0),
            };
            out.extend_from_slice(e.as_bytes());
            fds.push(f.clone());
        }
        Ok((out, fds))
    }

    fn irq_info(&mut self, p: &[u8]) -> Res {
        let q: proto::IrqInfo = need(p)?;
        if (q.argsz as usize) < size_of::<proto::IrqInfo>() || q.index >= proto::irq_index::NUM {
            return Err(libc::EINVAL);
        }
        let l = self.irqs.layout();
        let out = proto::IrqInfo { argsz: 16, flags: l.flags(q.index), index: q.index, count: l.count(q.index) };
        ok(out.as_bytes())
    }

    fn set_irqs(&mut self, p: &[u8], fds: Vec<OwnedFd>) -> Res {
        let q: proto::IrqSet = need(p)?;
        if (q.argsz as usize) < size_of::<proto::IrqSet>() {
            return Err(libc::EINVAL);
        }
        self.irqs.set_irqs(&q, &p[20..], fds).map_err(|e| {
            tracing::info!("SET_IRQS refused: {e}");
            e.errno()
        })?;
        ok(&[])
    }

    fn check_range(&self, index: u32, offset: u64, len: usize) -> Result<(), i32> {
        let size = self.region_size(index).ok_or(libc::EINVAL)?;
        let end = offset.checked_add(len as u64).ok_or(libc::EINVAL)?;
        if end > size || len == 0 {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    /// Reads a region: config space, the MSI-X table or PBA, or the device.
    pub fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.check_range(index, offset, buf.len())?;
        if index == region::CONFIG {
            let (intx, msi) = (self.irqs.intx_level(), self.irqs.pending_bits(crate::proto::irq_index::MSI));
            return self.config.read_with(offset, buf, intx, msi).map_err(|_| libc::EINVAL);
        }
        if !self.decodes(index) {
            // No decode: the access ends in a master abort, which reads all
            // ones (PCI Local Bus 3.0, 6.2.1).
            buf.fill(0xff);
            return Ok(());
        }
        if let Some((pba, off)) = self.msix.and_then(|m| m.locate(index, offset, buf.len())) {
            return if self.irqs.msix_read(pba, off, buf) { Ok(()) } else { Err(libc::EINVAL) };
        }
        if !self.regions[index as usize].as_ref().is_some_and(|r| r.read) {
            return Err(libc::EINVAL);
        }
        self.device.region_read(index, offset, buf)
    }

    /// Writes a region.
    pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        self.check_range(index, offset, data.len())?;
        if index == region::CONFIG {
            let events = self.config.write(offset, data).map_err(|_| libc::EINVAL)?;
            for ev in events {
                match ev {
                    ConfigEvent::FunctionReset => self.reset(),
                    // D3hot to D0 with No_Soft_Reset clear (PMCSR bit 3) is
                    // a reset of the function's state, config space
                    // included (PCI PM 1.2, 5.4.1).
                    ConfigEvent::PowerState { from: 3, to: 0 } => {
                        self.reset();
                        self.device.config_event(ev);
                    }
                    ConfigEvent::MsiMask(bits) => {
                        self.apply_msi_mask(bits);
                        self.device.config_event(ev);
                    }
                    _ => {
                        let master = self.apply_function_state();
                        self.device.config_event(ev);
                        if let Some(on) = master {
                            self.device.config_event(ConfigEvent::BusMaster(on));
                        }
                    }
                }
            }
            return Ok(());
        }
        if !self.decodes(index) {
            // No decode: the write is dropped (a master abort).
            return Ok(());
        }
        if let Some((pba, off)) = self.msix.and_then(|m| m.locate(index, offset, data.len())) {
            return if self.irqs.msix_write(pba, off, data) { Ok(()) } else { Err(libc::EINVAL) };
        }
        if !self.regions[index as usize].as_ref().is_some_and(|r| r.write) {
            return Err(libc::EINVAL);
        }
        self.device.region_write(index, offset, data)
    }

    fn cmd_region_read(&mut self, p: &[u8]) -> Res {
        let q: proto::RegionAccess = need(p)?;
        let n = q.count as usize;
        if n > MAX_XFER {
            return Err(libc::E2BIG);
        }
        let mut out = vec![0u8; 16 + n];
        out[..16].copy_from_slice(q.as_bytes());
        self.region_read(q.region, q.offset, &mut out[16..])?;
        Ok((out, Vec::new()))
    }

    fn cmd_region_write(&mut self, p: &[u8]) -> Res {
        let q: proto::RegionAccess = need(p)?;
        let n = q.count as usize;
        if n > MAX_XFER {
            return Err(libc::E2BIG);
        }
        let data = p.get(16..16 + n).ok_or(libc::EINVAL)?;
        if p.len() != 16 + n {
            return Err(libc::EINVAL);
        }
        self.region_write(q.region, q.offset, data)?;
        ok(q.as_bytes())
    }

    fn write_multi(&mut self, p: &[u8]) -> Res {
        let cnt = u64::from_ne_bytes(p.get(..8).ok_or(libc::EINVAL)?.try_into().map_err(|_| libc::EINVAL)?);
        if cnt == 0 || cnt > proto::MAX_WRITE_MULTI || p.len() as u64 != 8 + 24 * cnt {
            return Err(libc::EINVAL);
        }
        // Validate every entry before applying any.
        let mut wrs = Vec::with_capacity(cnt as usize);
        for k in 0..cnt as usize {
            let e: proto::WriteMultiEntry = need(&p[8 + 24 * k..])?;
            if e.count == 0 || e.count > 8 {
                return Err(libc::EINVAL);
            }
            self.check_range(e.region, e.offset, e.count as usize)?;
            wrs.push(e);
        }
        for e in &wrs {
            self.region_write(e.region, e.offset, &e.data[..e.count as usize])?;
        }
        ok(&cnt.to_ne_bytes())
    }

    /// Whether BAR `index` decodes accesses: Memory (or I/O) Space Enable
    /// is set and the function is in D0. Config space, the ROM (read by a
    /// VMM to copy it, as VFIO does) and the other regions always decode.
    fn decodes(&self, index: u32) -> bool {
        if index >= 6 {
            return true;
        }
        let cmd = self.config.command();
        let bit = match self.config.bar_kind(index as usize) {
            Some(crate::pci::BarKind::Io) => crate::pci::command::IO,
            _ => crate::pci::command::MEMORY,
        };
        cmd & bit != 0 && self.config.power_state() == 0
    }

    /// Hands the command register and the power state to the parts that
    /// obey them: bus mastering gates device DMA, Interrupt Disable gates
    /// INTx, D3hot gates every interrupt.
    /// Returns the new bus-master state if it changed.
    fn apply_function_state(&self) -> Option<bool> {
        let cmd = self.config.command();
        let d0 = self.config.power_state() == 0;
        let master = d0 && cmd & crate::pci::command::BUS_MASTER != 0;
        let was = self.dma.bus_master();
        self.dma.set_bus_master(master);
        self.irqs.set_intx_disabled(cmd & crate::pci::command::INTX_DISABLE != 0);
        self.irqs.set_quiesced(!d0);
        (was != master).then_some(master)
    }

    /// The MSI capability's Mask Bits gate MSI vectors as SET_IRQS masks
    /// do: a masked vector's interrupt waits, pending, until unmasked.
    fn apply_msi_mask(&self, bits: u32) {
        let n = self.irqs.layout().msi.min(32);
        for v in 0..n {
            self.irqs.set_mask(crate::proto::irq_index::MSI, v, bits & (1 << v) != 0);
        }
    }

    fn reset(&mut self) {
        // DMA stops first: nothing the device still does can reach memory.
        self.dma.set_bus_master(false);
        self.device.reset();
        self.config.reset();
        self.irqs.reset();
        // Bus mastering is off (it was turned off above): no event.
        self.apply_function_state();
        // Reset returns the device to RUNNING (ERROR included) and ends any
        // migration data transfer.
        if self.mig_state != mig::RUNNING {
            self.mig_state = mig::RUNNING;
            self.mig_out.clear();
            self.mig_pos = 0;
            self.mig_in.clear();
            self.device.set_running(true);
        }
    }

    fn feature(&mut self, p: &[u8]) -> Res {
        let f: proto::Feature = need(p)?;
        let data = &p[8..];
        let index = f.flags & proto::FEATURE_MASK;
        let get = f.flags & proto::FEATURE_GET != 0;
        let set = f.flags & proto::FEATURE_SET != 0;
        let probe = f.flags & proto::FEATURE_PROBE != 0;
        let known = proto::FEATURE_MASK | proto::FEATURE_GET | proto::FEATURE_SET | proto::FEATURE_PROBE;
        if f.flags & !known != 0 || (get && set && !probe) || (!get && !set && !probe) || (f.argsz as usize) < 8 {
            return Err(libc::EINVAL);
        }
        let (can_get, can_set) = match index {
            proto::FEATURE_MIGRATION => (true, false),
            proto::FEATURE_MIG_DEVICE_STATE => (true, true),
            proto::FEATURE_DMA_LOGGING_START | proto::FEATURE_DMA_LOGGING_STOP => (false, true),
            proto::FEATURE_DMA_LOGGING_REPORT => (true, false),
            _ => return Err(libc::ENOTSUP),
        };
        if (get && !can_get) || (set && !can_set) {
            return Err(libc::ENOTSUP);
        }
        if probe {
            return ok(&p[..8]);
        }
        let echo = |extra: &[u8], argsz_needed: usize| -> Res {
            if (f.argsz as usize) < argsz_needed {
                return Err(libc::EINVAL);
            }
            let mut out = proto::Feature { argsz: argsz_needed as u32, flags: f.flags }.as_bytes().to_vec();
            out.extend_from_slice(extra);
            Ok((out, Vec::new()))
        };
        match index {
            proto::FEATURE_MIGRATION => {
                let flags = proto::MIGRATION_STOP_COPY | proto::MIGRATION_PRE_COPY;
                echo(&flags.to_ne_bytes(), 16)
            }
            proto::FEATURE_MIG_DEVICE_STATE if get => {
                let s = proto::MigState { device_state: self.mig_state, data_fd: u32::MAX };
                echo(s.as_bytes(), 16)
            }
            proto::FEATURE_MIG_DEVICE_STATE => {
                let s: proto::MigState = need(data)?;
                if (f.argsz as usize) < p.len() {
                    return Err(libc::EINVAL);
                }
                self.migrate_to(s.device_state)?;
                // The reply to a SET is the request as it came (`data_fd`
                // is unused in vfio-user).
                ok(p)
            }
            proto::FEATURE_DMA_LOGGING_START => {
                let mut c: proto::LoggingControl = need(data)?;
                if c.num_ranges > MAX_LOGGING_RANGES || data.len() < 16 + 16 * c.num_ranges as usize {
                    return Err(libc::EINVAL);
                }
                if !c.page_size.is_power_of_two() {
                    return Err(libc::EINVAL);
                }
                for k in 0..c.num_ranges as usize {
                    let r: proto::LoggingRange = need(&data[16 + 16 * k..])?;
                    if r.length == 0 || r.iova.checked_add(r.length - 1).is_none() {
                        return Err(libc::EINVAL);
                    }
                }
                let full = 8 + 16 + 16 * c.num_ranges as usize;
                let reply_len = if f.argsz as usize >= full { full } else { 24 };
                if (f.argsz as usize) < 24 {
                    return Err(libc::EINVAL);
                }
                if self.logging {
                    return Err(libc::EBUSY);
                }
                self.dma.set_dirty_tracking(true).map_err(|e| e.errno())?;
                self.logging = true;
                // The core tracks at 4 KiB; coarser reports are folded.
                c.page_size = c.page_size.max(4096);
                let mut extra = c.as_bytes().to_vec();
                extra.extend_from_slice(&data[16..16 + 16 * c.num_ranges as usize]);
                echo(&extra[..reply_len - 8], reply_len)
            }
            proto::FEATURE_DMA_LOGGING_STOP => {
                if self.logging {
                    self.dma.set_dirty_tracking(false).map_err(|e| e.errno())?;
                    self.logging = false;
                }
                let n = if f.argsz as usize >= p.len() { p.len() } else { 8 };
                echo(&data[..n - 8], n)
            }
            _ => {
                let r: proto::LoggingReport = need(data)?;
                if !self.logging {
                    return Err(libc::EINVAL);
                }
                // Any power of two: pages below the tracking granule are
                // set by the granule covering them, larger ones by any of
                // their granules.
                if r.length == 0 || !r.page_size.is_power_of_two() {
                    return Err(libc::EINVAL);
                }
                r.iova.checked_add(r.length - 1).ok_or(libc::EINVAL)?;
                let bits = r.length.div_ceil(r.page_size);
                let bytes = bits.div_ceil(64) * 8;
                if bytes > MAX_BITMAP_BYTES {
                    return Err(libc::E2BIG);
                }
                let needed = 8 + 24 + bytes as usize;
                if (f.argsz as usize) < needed {
                    return Err(libc::ENOSPC);
                }
                let bm = self.dma.dirty_report(r.iova, r.length, r.page_size).map_err(|e| {
                    tracing::info!("DMA logging report refused: {e}");
                    e.errno()
                })?;
                let mut extra = r.as_bytes().to_vec();
                let mut words = bm;
                words.resize(bytes as usize / 8, 0);
                for w in &words {
                    extra.extend_from_slice(&w.to_ne_bytes());
                }
                echo(&extra, needed)
            }
        }
    }

    fn migration_arc(&mut self, from: u32, to: u32) -> Result<(), i32> {
        use mig::*;
        match (from, to) {
            (RUNNING, STOP) | (PRE_COPY, STOP_COPY) => {
                self.device.set_running(false);
                if to == STOP_COPY {
                    self.build_mig_data()?;
                }
            }
            (STOP, RUNNING) => self.device.set_running(true),
            (STOP, STOP_COPY) => self.build_mig_data()?,
            (STOP_COPY, STOP) => {
                self.mig_out.clear();
                self.mig_pos = 0;
            }
            (STOP, RESUMING) => self.mig_in.clear(),
            (RESUMING, STOP) => {
                let data = std::mem::take(&mut self.mig_in);
                self.load_mig_data(&data)?;
            }
            (RUNNING, PRE_COPY) => {
                // No precopy data: everything moves in STOP_COPY.
                self.mig_out.clear();
                self.mig_pos = 0;
            }
            (PRE_COPY, RUNNING) => {
                self.mig_out.clear();
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn migrate_to(&mut self, target: u32) -> Result<(), i32> {
        use mig::*;
        let valid = [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY];
        if !valid.contains(&target) || self.mig_state == ERROR {
            return Err(libc::EINVAL);
        }
        if self.mig_state == STOP_COPY && target == PRE_COPY {
            return Err(libc::EINVAL);
        }
        let path = mig_path(self.mig_state, target).ok_or(libc::EINVAL)?;
        for w in path.windows(2) {
            if let Err(e) = self.migration_arc(w[0], w[1]) {
                self.mig_state = if w[0] == RESUMING { ERROR } else { w[0] };
                return Err(e);
            }
            self.mig_state = w[1];
        }
        Ok(())
    }

    fn build_mig_data(&mut self) -> Result<(), i32> {
        let state = self.device.save()?;
        let blob = MigBlob {
            magic: MIG_MAGIC,
            device: self.name.to_string(),
            config: self.config.bytes().to_vec(),
            msix_table: self.irqs.msix_table(),
            state,
        };
        self.mig_out = postcard::to_allocvec(&blob).map_err(|_| libc::ENOMEM)?;
        self.mig_pos = 0;
        Ok(())
    }

    fn load_mig_data(&mut self, data: &[u8]) -> Result<(), i32> {
        let blob: MigBlob = postcard::from_bytes(data).map_err(|_| libc::EINVAL)?;
        if blob.magic != MIG_MAGIC || blob.device != self.name {
            tracing::warn!("migration data is not for a {} device", self.name);
            return Err(libc::EINVAL);
        }
        let mut cfg = self.config.clone();
        if !cfg.restore(&blob.config) || self.irqs.msix_table().len() != blob.msix_table.len() {
            tracing::warn!("migration data has a config space or MSI-X table of another shape");
            return Err(libc::EINVAL);
        }
        if matches!(cfg.power_state(), 1 | 2) {
            tracing::warn!("migration data puts the function in D1 or D2, which it does not support");
            return Err(libc::EINVAL);
        }
        self.device.load(&blob.state)?;
        self.config = cfg;
        if let Some(on) = self.apply_function_state() {
            self.device.config_event(ConfigEvent::BusMaster(on));
        }
        self.apply_msi_mask(self.config.msi_mask());
        self.irqs.set_msix_table(&blob.msix_table);
        Ok(())
    }

    fn mig_read(&mut self, p: &[u8]) -> Res {
        let q: proto::MigData = need(p)?;
        if !matches!(self.mig_state, mig::PRE_COPY | mig::STOP_COPY) {
            return Err(libc::EINVAL);
        }
        let want = (q.size as usize).min(MAX_XFER).min((q.argsz as usize).saturating_sub(8));
        if (q.argsz as usize) < 8 {
            return Err(libc::EINVAL);
        }
        let left = &self.mig_out[self.mig_pos.min(self.mig_out.len())..];
        let n = want.min(left.len());
        let mut out = proto::MigData { argsz: (8 + n) as u32, size: n as u32 }.as_bytes().to_vec();
        out.extend_from_slice(&left[..n]);
        self.mig_pos += n;
        Ok((out, Vec::new()))
    }

    fn mig_write(&mut self, p: &[u8]) -> Res {
        let q: proto::MigData = need(p)?;
        if self.mig_state != mig::RESUMING {
            return Err(libc::EINVAL);
        }
        let n = q.size as usize;
        if n > MAX_XFER || p.len() != 8 + n {
            return Err(libc::EINVAL);
        }
        if self.mig_in.len() + n > MAX_MIG_DATA {
            return Err(libc::EFBIG);
        }
        self.mig_in.extend_from_slice(&p[8..]);
        ok(&[])
    }

    fn ext(&mut self, c: u16, p: &[u8], mut fds: Vec<OwnedFd>) -> Res {
        let log = |what: &str, e: &crate::dma::Error| {
            tracing::info!("{what} refused: {e}");
            e.errno()
        };
        match c {
            cmd::EXT_BIND => {
                let q: proto::ExtBind = need(p)?;
                if (q.argsz as usize) < size_of::<proto::ExtBind>() || fds.len() != 1 {
                    return Err(libc::EINVAL);
                }
                let fd = fds.pop().ok_or(libc::EINVAL)?;
                let (dev, session) = self.dma.bind(fd).map_err(|e| log("IOASID_BIND", &e))?;
                let out = proto::ExtBind { argsz: 24, flags: 0, dev_id: dev, pasid_width: 0, session };
                let mut out = out;
                out.pasid_width = u32::from(self.pasid_width());
                ok(out.as_bytes())
            }
            cmd::EXT_UNBIND => {
                self.dma.unbind().map_err(|e| log("IOASID_UNBIND", &e))?;
                ok(&[])
            }
            cmd::EXT_ATTACH | cmd::EXT_DETACH => {
                let mut q: proto::ExtAttach = need(p)?;
                if (q.argsz as usize) < size_of::<proto::ExtAttach>()
                    || q.flags & !(proto::EXT_FLAG_PASID | proto::EXT_FLAG_REPLACE) != 0
                {
                    return Err(libc::EINVAL);
                }
                let vpasid = (q.flags & proto::EXT_FLAG_PASID != 0).then_some(q.vpasid);
                if c == cmd::EXT_ATTACH {
                    let replace = q.flags & proto::EXT_FLAG_REPLACE != 0;
                    q.ppasid = self.dma.attach(vpasid, q.pt_id, replace).map_err(|e| log("IOASID_ATTACH", &e))?;
                } else {
                    if q.flags & proto::EXT_FLAG_REPLACE != 0 {
                        return Err(libc::EINVAL);
                    }
                    self.dma.detach(vpasid).map_err(|e| log("IOASID_DETACH", &e))?;
                    q.ppasid = 0;
                }
                q.argsz = 24;
                ok(q.as_bytes())
            }
            cmd::EXT_LIST_PASIDS => {
                let q: proto::ExtList = need(p)?;
                if (q.argsz as usize) < size_of::<proto::ExtList>() {
                    return Err(libc::EINVAL);
                }
                if self.dma.binding().is_none() {
                    return Err(libc::ENODEV);
                }
                let (rid, map) = self.dma.pasid_map();
                let full = 16 + 16 * map.len();
                let head = proto::ExtList {
                    argsz: full as u32,
                    flags: 0,
                    count: map.len() as u32,
                    rid_pt_id: rid.unwrap_or(0),
                };
                let mut out = head.as_bytes().to_vec();
                if (q.argsz as usize) >= full {
                    for (v, pp, t) in map {
                        let e = proto::ExtPasidEntry { vpasid: v, ppasid: pp, pt_id: t, reserved: 0 };
                        out.extend_from_slice(e.as_bytes());
                    }
                }
                Ok((out, Vec::new()))
            }
            _ => Err(libc::ENOSYS),
        }
    }

    fn pasid_width(&self) -> u8 {
        self.config.caps().pasid.map_or(0, |o| (self.config.get16(o + 4) >> 8) as u8 & 0x1f)
    }
}

/// The path from `from` to `to` through the migration FSM: shortest,
/// with saving states (PRE_COPY, STOP_COPY) only at the ends.
pub fn mig_path(from: u32, to: u32) -> Option<Vec<u32>> {
    use mig::*;
    const ARCS: &[(u32, u32)] = &[
        (RUNNING, STOP),
        (STOP, RUNNING),
        (STOP, STOP_COPY),
        (STOP_COPY, STOP),
        (STOP, RESUMING),
        (RESUMING, STOP),
        (RUNNING, PRE_COPY),
        (PRE_COPY, RUNNING),
        (PRE_COPY, STOP_COPY),
    ];
    let saving = |s: u32| s == PRE_COPY || s == STOP_COPY;
    let mut prev: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut queue = std::collections::VecDeque::from([from]);
    let mut seen = std::collections::HashSet::from([from]);
    while let Some(s) = queue.pop_front() {
        if s == to {
            let mut path = vec![to];
            let mut c = to;
            while c != from {
                c = prev[&c];
                path.push(c);
            }
            path.reverse();
            return Some(path);
        }
        if s != from && saving(s) {
            continue;
        }
        for &(a, b) in ARCS {
            if a == s && seen.insert(b) {
                prev.insert(b, s);
                queue.push_back(b);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::mig::*;
    use super::*;

    #[test]
    fn migration_paths_follow_the_rules() {
        assert_eq!(mig_path(RUNNING, STOP_COPY), Some(vec![RUNNING, STOP, STOP_COPY]));
        assert_eq!(mig_path(STOP_COPY, RUNNING), Some(vec![STOP_COPY, STOP, RUNNING]));
        assert_eq!(mig_path(PRE_COPY, STOP), Some(vec![PRE_COPY, RUNNING, STOP]));
        assert_eq!(mig_path(RESUMING, RUNNING), Some(vec![RESUMING, STOP, RUNNING]));
        assert_eq!(mig_path(RUNNING, RESUMING), Some(vec![RUNNING, STOP, RESUMING]));
        assert_eq!(mig_path(STOP, PRE_COPY), Some(vec![STOP, RUNNING, PRE_COPY]));
        assert_eq!(mig_path(RUNNING, RUNNING), Some(vec![RUNNING]));
        assert_eq!(mig_path(PRE_COPY, RESUMING), Some(vec![PRE_COPY, RUNNING, STOP, RESUMING]));
    }
}
