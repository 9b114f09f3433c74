//! A driver for the `nvme` device, as a guest's NVMe driver drives it,
//! seen from the VMM over vfio-user: the admin and I/O queues and the data
//! buffers in guest RAM (a memfd the client maps with DMA_MAP), registers
//! through REGION_READ/WRITE, doorbells through REGION_WRITE or the
//! mmap-ed doorbell page, completions found by their phase tag.
//!
//! Guest RAM is touched only through [`GuestRam`] (volatile copies, atomic
//! loads): the device writes it at any time.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use iommu_core::shm::Words;
use vfio_user_server::client::Client;
use vfio_user_server::devices::nvme::abi::{cc, csts, reg, Command, Completion, CQE_SIZE, SQE_SIZE};

use crate::engine::GuestRam;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vfio-user connection failed or refused.
    #[error(transparent)]
    Client(#[from] vfio_user_server::client::Error),
    /// Guest RAM I/O failed.
    #[error("guest RAM: {0}")]
    Ram(#[from] crate::engine::Error),
    /// Mapping the doorbell page failed.
    #[error("doorbell page: {0}")]
    Map(#[from] std::io::Error),
    /// CSTS did not reach the state waited for.
    #[error("CSTS {csts:#x} did not reach {what} within {after:?}")]
    Csts {
        /// The last value read.
        csts: u32,
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// No completion arrived.
    #[error("no completion on CQ {0} within {1:?}")]
    Timeout(u16, Duration),
    /// A submission queue is full.
    #[error("SQ {0} is full")]
    Full(u16),
}

/// Result of a driver call.
pub type Result<T> = std::result::Result<T, Error>;

/// How a doorbell is rung.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bell {
    /// A REGION_WRITE of BAR 0, waiting for the reply.
    Register,
    /// A store into the mmap-ed doorbell page (no message).
    Mmap,
    /// The shadow doorbell in guest RAM (Doorbell Buffer Config), and the
    /// register only when the EventIdx asks for it, as Linux's driver does.
    Shadow,
}

/// One queue pair as the driver sees it: an SQ of `size` entries at
/// `sq_off` of guest RAM and a CQ of `size` entries at `cq_off`, both at
/// IOVA `iova_base + off`.
#[derive(Debug, Clone)]
pub struct QueuePair {
    /// Queue id (0 is the admin pair).
    pub qid: u16,
    /// Entries of each queue.
    pub size: u32,
    /// SQ offset in guest RAM.
    pub sq_off: u64,
    /// CQ offset in guest RAM.
    pub cq_off: u64,
    tail: u32,
    /// The tail and head last written to a doorbell (shadow or register).
    rung_tail: u32,
    rung_head: u32,
    /// SQ head as the last completion reported it.
    sq_head: u32,
    head: u32,
    phase: bool,
    next_cid: u16,
}

impl QueuePair {
    /// The SQ tail the driver has reached.
    pub fn tail(&self) -> u32 {
        self.tail
    }

    /// A pair with nothing submitted yet.
    pub fn new(qid: u16, size: u32, sq_off: u64, cq_off: u64) -> QueuePair {
        QueuePair {
            qid,
            size,
            sq_off,
            cq_off,
            tail: 0,
            rung_tail: 0,
            rung_head: 0,
            sq_head: 0,
            head: 0,
            phase: true,
            next_cid: 0,
        }
    }
}

/// An `nvme` device driven over vfio-user.
pub struct Nvme {
    /// The connection.
    pub client: Client,
    /// Guest RAM.
    pub ram: GuestRam,
    /// IOVA of guest RAM offset 0.
    pub iova: u64,
    bells: Option<Words>,
    /// The admin queue pair, once enabled.
    pub admin: Option<QueuePair>,
    /// Offsets in guest RAM of the shadow doorbell and EventIdx buffers,
    /// once the driver configured them.
    pub dbbuf: Option<(u64, u64)>,
    /// Doorbell register writes made (REGION_WRITE or mapped page).
    pub register_rings: u64,
    /// Read CSTS while waiting for a completion: the client serves the
    /// device's DMA to client memory (memory without an fd) only while it
    /// talks to the server.
    pub pump: bool,
}

impl Nvme {
    /// Enables the PCI function (memory decode and bus mastering), maps
    /// the doorbell page if BAR 0 offers it, and keeps `ram`, DMA-mapped
    /// by the caller at `iova`.
    pub fn new(mut client: Client, ram: GuestRam, iova: u64) -> Result<Nvme> {
        client.enable_function()?;
        let r = client.region_info(0)?;
        let bells = match (r.fd, r.areas.iter().find(|a| a.offset == reg::DOORBELL)) {
            (Some(fd), Some(a)) => {
                let f = File::from(fd);
                Some(Words::map_at(&f, r.info.offset + a.offset, a.size)?)
            }
            _ => None,
        };
        Ok(Nvme { client, ram, iova, bells, admin: None, dbbuf: None, register_rings: 0, pump: false })
    }

    /// Goes on with `client` (a device that took over this one's state, as
    /// after a migration): enables its PCI function and maps its doorbell
    /// page. Queues and guest RAM stay as they are.
    pub fn reconnect(&mut self, mut client: Client) -> Result<()> {
        client.enable_function()?;
        let r = client.region_info(0)?;
        self.bells = match (r.fd, r.areas.iter().find(|a| a.offset == reg::DOORBELL)) {
            (Some(fd), Some(a)) => {
                let f = File::from(fd);
                Some(Words::map_at(&f, r.info.offset + a.offset, a.size)?)
            }
            _ => None,
        };
        self.client = client;
        Ok(())
    }

    /// Whether the doorbell page is mapped.
    pub fn has_mmap_bells(&self) -> bool {
        self.bells.is_some()
    }

    /// A 32-bit register.
    pub fn read32(&mut self, off: u64) -> Result<u32> {
        let b = self.client.region_read(0, off, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 64-bit register.
    pub fn read64(&mut self, off: u64) -> Result<u64> {
        let b = self.client.region_read(0, off, 8)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(&b);
        Ok(u64::from_le_bytes(w))
    }

    /// Writes a 32-bit register.
    pub fn write32(&mut self, off: u64, v: u32) -> Result<()> {
        Ok(self.client.region_write(0, off, &v.to_le_bytes())?)
    }

    /// Writes a 64-bit register.
    pub fn write64(&mut self, off: u64, v: u64) -> Result<()> {
        Ok(self.client.region_write(0, off, &v.to_le_bytes())?)
    }

    /// Waits until `CSTS & mask == want`.
    pub fn wait_csts(&mut self, mask: u32, want: u32, what: &'static str) -> Result<u32> {
        let t0 = Instant::now();
        loop {
            let v = self.read32(reg::CSTS)?;
            if v & mask == want {
                return Ok(v);
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(Error::Csts { csts: v, what, after: t0.elapsed() });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The CC value a driver writes to enable: NVM command set, 4 KiB
    /// pages, round robin, 64-byte SQ and 16-byte CQ entries, enabled.
    pub fn cc_enable() -> u32 {
        cc::EN | (6 << cc::IOSQES_SHIFT) | (4 << cc::IOCQES_SHIFT)
    }

    /// Enables the controller as a driver does after a reset: CC.EN 0 and
    /// RDY 0 first, then AQA, ASQ, ACQ, CC, and RDY 1. The admin pair of
    /// `size` entries lives at `sq_off` and `cq_off`.
    pub fn enable(&mut self, size: u32, sq_off: u64, cq_off: u64) -> Result<()> {
        self.write32(reg::CC, 0)?;
        self.wait_csts(csts::RDY, 0, "RDY 0")?;
        self.ram.write(cq_off, &vec![0u8; size as usize * CQE_SIZE as usize])?;
        self.write32(reg::AQA, (size - 1) | ((size - 1) << 16))?;
        self.write64(reg::ASQ, self.iova + sq_off)?;
        self.write64(reg::ACQ, self.iova + cq_off)?;
        self.write32(reg::CC, Nvme::cc_enable())?;
        self.wait_csts(csts::RDY | csts::CFS, csts::RDY, "RDY 1")?;
        self.admin = Some(QueuePair::new(0, size, sq_off, cq_off));
        Ok(())
    }

    /// Offset of the doorbell of queue `qid` (CQ head if `cq`).
    pub fn bell_offset(qid: u16, cq: bool) -> u64 {
        reg::DOORBELL + u64::from(qid) * 8 + if cq { 4 } else { 0 }
    }

    /// Writes doorbell `off` with `v` (the register, by REGION_WRITE or
    /// through the mapped page; [`Bell::Shadow`] is taken as
    /// [`Bell::Register`] here).
    pub fn ring_at(&mut self, off: u64, v: u32, how: Bell) -> Result<()> {
        self.register_rings += 1;
        match (how, &self.bells) {
            (Bell::Mmap, Some(m)) => {
                if let Some(w) = m.u32(off - reg::DOORBELL) {
                    w.store(v, Ordering::Release);
                }
                Ok(())
            }
            _ => self.write32(off, v),
        }
    }

    /// Moves the doorbell of queue `qid` (its CQ head if `cq`) from `old`
    /// to `new`: with [`Bell::Shadow`] and a configured buffer (I/O queues
    /// only), the shadow doorbell is written and the register only if the
    /// EventIdx lies in `[old, new)`.
    fn doorbell(&mut self, qid: u16, cq: bool, old: u32, new: u32, how: Bell) -> Result<()> {
        let off = Nvme::bell_offset(qid, cq);
        let Some((db, ei)) = self.dbbuf.filter(|_| how == Bell::Shadow && qid != 0) else {
            return self.ring_at(off, new, how);
        };
        let at = off - reg::DOORBELL;
        self.ram.write(db + at, &new.to_le_bytes())?;
        // The shadow store before the EventIdx load (the device does the
        // opposite: EventIdx store, then shadow load).
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut b = [0u8; 4];
        self.ram.read_into(ei + at, &mut b)?;
        if need_event(u32::from_le_bytes(b), new, old) {
            self.ring_at(off, new, Bell::Register)?;
        }
        Ok(())
    }

    /// Writes `cmd` (its CID chosen here) into the next slot of `q`'s SQ
    /// without ringing; returns the CID.
    pub fn push(&mut self, q: &mut QueuePair, mut cmd: Command) -> Result<u16> {
        if (q.tail + 1) % q.size == q.sq_head {
            return Err(Error::Full(q.qid));
        }
        cmd.cid = q.next_cid;
        q.next_cid = q.next_cid.wrapping_add(1);
        self.ram.write(q.sq_off + u64::from(q.tail) * SQE_SIZE, &cmd.to_bytes())?;
        q.tail = (q.tail + 1) % q.size;
        Ok(cmd.cid)
    }

    /// Rings `q`'s SQ tail doorbell.
    pub fn ring(&mut self, q: &mut QueuePair, how: Bell) -> Result<()> {
        self.doorbell(q.qid, false, q.rung_tail, q.tail, how)?;
        q.rung_tail = q.tail;
        Ok(())
    }

    /// Waits for the next completion of `q`'s CQ, consumes it and rings
    /// the CQ head doorbell.
    pub fn reap(&mut self, q: &mut QueuePair, timeout: Duration, how: Bell) -> Result<Completion> {
        let c = self.wait_entry(q, timeout)?;
        if u32::from(c.sq_head) < q.size {
            q.sq_head = u32::from(c.sq_head);
        }
        q.head = (q.head + 1) % q.size;
        if q.head == 0 {
            q.phase = !q.phase;
        }
        self.doorbell(q.qid, true, q.rung_head, q.head, how)?;
        q.rung_head = q.head;
        Ok(c)
    }

    /// The next completion of `q`'s CQ once its phase tag flips, left in
    /// place.
    pub fn wait_entry(&mut self, q: &QueuePair, timeout: Duration) -> Result<Completion> {
        let off = q.cq_off + u64::from(q.head) * CQE_SIZE;
        let t0 = Instant::now();
        loop {
            // The status half (phase tag in bit 48) is written last.
            let hi = self.ram.load_u64(off + 8)?;
            if (hi >> 48) & 1 == u64::from(q.phase) {
                let mut b = [0u8; 16];
                self.ram.read_into(off, &mut b)?;
                return Ok(Completion::parse(&b));
            }
            if t0.elapsed() > timeout {
                return Err(Error::Timeout(q.qid, timeout));
            }
            if self.pump {
                self.read32(reg::CSTS)?;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Whether `q`'s CQ holds a new entry now.
    pub fn has_entry(&mut self, q: &QueuePair) -> Result<bool> {
        let off = q.cq_off + u64::from(q.head) * CQE_SIZE;
        Ok((self.ram.load_u64(off + 8)? >> 48) & 1 == u64::from(q.phase))
    }

    /// Submits `cmd` on `q`, rings, and waits for its completion.
    pub fn run(&mut self, q: &mut QueuePair, cmd: Command, how: Bell) -> Result<Completion> {
        self.push(q, cmd)?;
        self.ring(q, how)?;
        self.reap(q, Duration::from_secs(10), how)
    }

    /// Runs admin command `cmd`.
    pub fn admin(&mut self, cmd: Command) -> Result<Completion> {
        let mut q = self.admin.take().ok_or(Error::Timeout(0, Duration::ZERO))?;
        let r = self.run(&mut q, cmd, Bell::Register);
        self.admin = Some(q);
        r
    }
}

/// Whether a doorbell moved from `old` to `new` passes the EventIdx `ei`
/// (16-bit arithmetic, as the queue indexes are).
pub fn need_event(ei: u32, new: u32, old: u32) -> bool {
    (new.wrapping_sub(ei).wrapping_sub(1) as u16) < (new.wrapping_sub(old) as u16)
}
