//! The device thread: executes a client's commands in order against the
//! device, its config space, interrupts, DMA table and migration state,
//! and writes the replies. The connection's reader thread feeds it
//! through a crossbeam channel and delivers the client's replies to
//! server-to-client DMA requests, so a command never blocks on one.
//!
//! This module has the thread's state, its job loop, connecting and
//! disconnecting clients and the dispatch of commands; the commands live
//! in `version` (VERSION), `dma_cmds` (DMA_MAP, DMA_UNMAP), `info` (device,
//! region and IRQ information, SET_IRQS), `regions` (region accesses, the
//! function state, resets), `feature` (DEVICE_FEATURE: migration state and
//! DMA logging), `migration` (the migration state machine and its data)
//! and `ext` (the ioasid extension).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use iommu_core::sync;
use zerocopy::IntoBytes;

use crate::conn::{Msg, Port, Writer};
use crate::device::{Device, DeviceContext, IoFdDesc, MsixDesc, RegionDesc};
use crate::dma::Dma;
use crate::irq::Irqs;
use crate::pci::PciConfig;
use crate::proto::{self, cmd, region, Header, HEADER_SIZE};

mod dma_cmds;
mod ext;
mod feature;
mod info;
mod migration;
mod regions;
mod version;

pub use migration::{mig, mig_path};

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

/// What is queued for the device thread; the connection's reader stops
/// reading the client while it is over the limits, and the device thread
/// wakes it.
pub struct Backlog {
    /// Jobs of any kind sent to the device thread and not finished.
    queued: std::sync::atomic::AtomicUsize,
    bytes: std::sync::atomic::AtomicUsize,
    jobs: std::sync::atomic::AtomicUsize,
    paused: std::sync::atomic::AtomicBool,
    /// The thread reading the client, unparked when it may read again.
    reader: std::sync::Mutex<Option<std::thread::Thread>>,
}

impl Backlog {
    /// Most bytes of commands queued.
    pub const MAX_BYTES: usize = 64 << 20;
    /// Most commands queued.
    pub const MAX_JOBS: usize = 4096;

    /// An empty backlog.
    pub fn new() -> Arc<Backlog> {
        Arc::new(Backlog {
            queued: Default::default(),
            bytes: Default::default(),
            jobs: Default::default(),
            paused: Default::default(),
            reader: std::sync::Mutex::new(None),
        })
    }

    /// Names the thread that reads the client (woken when the backlog
    /// falls below half its limits after [`Backlog::over`] said yes).
    pub fn set_reader(&self, t: Option<std::thread::Thread>) {
        *sync::lock(&self.reader) = t;
    }

    /// A job (of any kind) is being sent to the device thread.
    pub fn job_sent(&self) {
        self.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The device thread finished a job.
    fn job_done(&self) {
        self.queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the device thread has nothing queued or running: a command
    /// answered now by another thread comes after every earlier one.
    pub fn idle(&self) -> bool {
        self.queued.load(std::sync::atomic::Ordering::SeqCst) == 0
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
            if let Some(t) = sync::lock(&self.reader).as_ref() {
                t.unpark();
            }
        }
    }

    /// Whether the reader must stop reading; marks it paused if so.
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
    /// A command from the orchestrator's control socket; the whole reply
    /// (none for `NO_REPLY`) goes back on the channel.
    Control(Msg, crossbeam_channel::Sender<Option<Vec<u8>>>),
    /// The orchestrator's control connection ended.
    ControlGone,
    /// Stop the thread.
    Stop,
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
    pub by_command: CommandCounts,
}

/// Counters by command number, without a lock: the protocol's commands
/// (below 32), the extension's (`EXT_BASE` and the 15 after it) and one
/// for any other number.
#[derive(Debug)]
pub struct CommandCounts([std::sync::atomic::AtomicU64; CommandCounts::SLOTS]);

impl Default for CommandCounts {
    fn default() -> CommandCounts {
        CommandCounts(std::array::from_fn(|_| Default::default()))
    }
}

impl CommandCounts {
    const SLOTS: usize = 49;

    fn slot(command: u16) -> usize {
        match command {
            c if c < 32 => usize::from(c),
            c if (cmd::EXT_BASE..cmd::EXT_BASE + 16).contains(&c) => 32 + usize::from(c - cmd::EXT_BASE),
            _ => Self::SLOTS - 1,
        }
    }

    fn command(slot: usize) -> Option<u16> {
        match slot {
            s if s < 32 => u16::try_from(s).ok(),
            s if s < Self::SLOTS - 1 => u16::try_from(s - 32).ok().map(|d| cmd::EXT_BASE + d),
            _ => None,
        }
    }

    /// Counts one command.
    pub fn add(&self, command: u16) {
        self.0[Self::slot(command)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts that are not zero, by command name, and clears them.
    pub fn take(&self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        for (i, c) in self.0.iter().enumerate() {
            let n = c.swap(0, std::sync::atomic::Ordering::Relaxed);
            if n > 0 {
                out.push((Self::command(i).map_or("other", cmd::name), n));
            }
        }
        out
    }
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

    /// Runs jobs until [`Job::Stop`] or the sender goes away. The worker
    /// is locked for each job only: between jobs the reader thread may take
    /// it to answer a register access itself (see [`Worker::try_inline`]).
    pub fn run(worker: Arc<std::sync::Mutex<Worker>>, rx: crossbeam_channel::Receiver<Job>, backlog: Arc<Backlog>) {
        while let Ok(job) = rx.recv() {
            let mut w = sync::lock(&worker);
            let stop = w.job(job, &backlog);
            drop(w);
            backlog.job_done();
            if stop {
                break;
            }
        }
        let mut w = sync::lock(&worker);
        w.disconnect();
        w.device.set_running(false);
    }

    /// Runs one job; true for [`Job::Stop`].
    fn job(&mut self, job: Job, backlog: &Backlog) -> bool {
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
            Job::Control(m, reply) => {
                self.stats.commands.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = reply.send(self.control_command(m));
            }
            Job::ControlGone => self.control_gone(),
            Job::Stop => return true,
        }
        false
    }

    /// Answers a small REGION_READ or REGION_WRITE on the calling thread
    /// (the reader thread's) if nothing about it can wait: config space reads,
    /// the MSI-X table and PBA, BARs that do not decode, and device
    /// registers whose device says so ([`Device::answers_inline`]). The
    /// caller guarantees that the device thread has no job queued or
    /// running, so the command keeps its place in the order. `out` is a
    /// buffer the reply is built in, kept by the caller. Returns false,
    /// having done nothing, if the command must go to the device thread.
    pub fn try_inline(&mut self, hdr: &Header, p: &[u8], out: &mut Vec<u8>) -> bool {
        if !self.neg.done || hdr.is_reply() || hdr.flags & proto::flags::TYPE_MASK != proto::flags::COMMAND {
            return false;
        }
        let write = match hdr.command {
            cmd::REGION_READ => false,
            cmd::REGION_WRITE => true,
            _ => return false,
        };
        let Some(q) = proto::read::<proto::RegionAccess>(p) else { return false };
        let n = q.count as usize;
        if n == 0 || n > 8 || (write && p.len() != 16 + n) {
            return false;
        }
        let data = if write { Some(&p[16..]) } else { None };
        if !self.inline_ok(q.region, q.offset, n, data) {
            return false;
        }
        let Some(w) = self.writer.clone() else { return false };
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.commands.fetch_add(1, Relaxed);
        self.stats.by_command.add(hdr.command);
        out.clear();
        let res = if let Some(d) = data {
            out.extend_from_slice(hdr.reply(16).as_bytes());
            out.extend_from_slice(q.as_bytes());
            self.region_write(q.region, q.offset, d)
        } else {
            out.extend_from_slice(hdr.reply(16 + n).as_bytes());
            out.extend_from_slice(q.as_bytes());
            out.resize(HEADER_SIZE + 16 + n, 0);
            self.region_read(q.region, q.offset, &mut out[HEADER_SIZE + 16..])
        };
        if hdr.no_reply() {
            return true;
        }
        let sent = match res {
            Ok(()) => w.send(&[out], &[]),
            Err(errno) => {
                self.stats.errors.fetch_add(1, Relaxed);
                w.send(&[hdr.error_reply(errno).as_bytes()], &[])
            }
        };
        if let Err(e) = sent {
            tracing::info!("reply to {} not sent: {e}", cmd::name(hdr.command));
        }
        true
    }

    fn disconnect(&mut self) {
        {
            let counts = self.stats.by_command.take();
            if !counts.is_empty() {
                let list: Vec<String> = counts.iter().map(|(c, n)| format!("{c} {n}")).collect();
                tracing::info!("the client sent: {}", list.join(", "));
            }
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
        self.stats.by_command.add(hdr.command);
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
                self.ext(crate::dma::Owner::Client, c, p, fds)
            }
            _ => Err(libc::ENOSYS),
        }
    }
}
