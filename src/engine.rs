//! A driver for the `dma-engine` device, as a VMM (or a guest driver seen
//! from the VMM) uses it over vfio-user: guest RAM in memfds, descriptor
//! rings and completion records in that RAM, doorbells through the
//! mmap-ed BAR 2 or through REGION_WRITE, interrupts on eventfds.
//!
//! The driver maps guest RAM shared and touches it only with volatile
//! copies and atomic loads (`iommu_core::shm::Bytes`), never through a
//! Rust reference into memory the device writes: a descriptor costs the
//! driver no system call.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use iommu_core::shm::{Bytes, Words};
use vfio_user_server::client::Client;
use vfio_user_server::devices::dma_engine::{regs, status, Completion, Descriptor, COMPLETION_SIZE, DESC_SIZE};

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vfio-user connection failed or refused.
    #[error(transparent)]
    Client(#[from] vfio_user_server::client::Error),
    /// Guest RAM I/O failed.
    #[error("guest RAM: {0}")]
    Ram(#[from] std::io::Error),
    /// The device is not a dma-engine.
    #[error("the device is not a dma-engine (id {0:#x})")]
    NotEngine(u32),
    /// A completion did not arrive.
    #[error("no completion at ring slot {0} within {1:?}")]
    Timeout(u32, Duration),
    /// A queue is full.
    #[error("queue {0} is full")]
    Full(usize),
    /// The core refused (setting up a rig).
    #[error("the core: {0}")]
    Core(#[from] iommu_core::client::Error),
    /// The device refused the ring size.
    #[error("ring size {0} is not a power of two from 2 to 4096")]
    BadRing(u32),
}

/// Result of a driver call.
pub type Result<T> = std::result::Result<T, Error>;

/// Guest RAM: a memfd the VMM shares with DMA_MAP or a core session,
/// sealed against shrinking and mapped shared here.
pub struct GuestRam {
    /// The memfd.
    pub file: File,
    /// Its size.
    pub size: u64,
    bytes: Bytes,
}

impl GuestRam {
    /// A new zeroed memfd of `size` bytes.
    pub fn new(name: &str, size: u64) -> Result<GuestRam> {
        let file = iommu_core::memfd::create(name, size).map_err(std::io::Error::other)?;
        // Every page of the mapping stays there only if the file cannot
        // shrink; without the seal every copy goes through the kernel.
        let sealed = iommu_core::memfd::seal_shrink(file.as_fd());
        let bytes = Bytes::map(&file, size, sealed)?;
        Ok(GuestRam { file, size, bytes })
    }

    /// Reads `len` bytes at `off`.
    pub fn read(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.read_into(off, &mut b)?;
        Ok(b)
    }

    /// Reads `buf.len()` bytes at `off` into `buf`.
    pub fn read_into(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.bytes.read(off, buf).map_err(|_| outside(off, buf.len(), self.size))
    }

    /// Writes `data` at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.bytes.write(off, data).map_err(|_| outside(off, data.len(), self.size))
    }

    /// The 64-bit word at `off` (8-byte aligned), loaded with acquire: the
    /// reader's half of a device's ordered write.
    pub fn load_u64(&self, off: u64) -> Result<u64> {
        self.bytes.load_u64(off).ok_or_else(|| outside(off, 8, self.size))
    }
}

fn outside(off: u64, len: usize, size: u64) -> Error {
    Error::Ram(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{len} bytes at {off:#x} are not inside guest RAM of {size:#x} bytes (or not aligned)"),
    ))
}

/// How a doorbell is rung.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doorbell {
    /// A store into the mmap-ed BAR 2 (no message at all).
    Mmap,
    /// A posted REGION_WRITE to BAR 2.
    Posted,
    /// A REGION_WRITE to the queue's TAIL register, waiting for the reply.
    Register,
}

/// One work queue as the driver sees it. The ring and the completion
/// records live in `ram` at `ring_off` (IOVA `ring_iova`) and `comp_off`
/// (IOVA `comp_iova`), one 32-byte record per ring slot.
pub struct Queue {
    /// Queue index.
    pub index: usize,
    /// Ring entries.
    pub size: u32,
    /// Ring IOVA (in the queue's address space).
    pub ring_iova: u64,
    /// Ring offset in `ram`.
    pub ring_off: u64,
    /// Completion records' IOVA.
    pub comp_iova: u64,
    /// Completion records' offset in `ram`.
    pub comp_off: u64,
    tail: u32,
    done: u32,
}

/// A dma-engine driven over vfio-user.
pub struct Engine {
    /// The connection.
    pub client: Client,
    bar2: Option<Words>,
}

impl Engine {
    /// Enables the PCI function (memory decode and bus mastering, as a
    /// guest's driver does), checks the device id and enables the device;
    /// maps BAR 2 when offered.
    pub fn new(mut client: Client) -> Result<Engine> {
        client.enable_function()?;
        let id = read32(&mut client, regs::ID)?;
        if id != regs::ID_VALUE {
            return Err(Error::NotEngine(id));
        }
        let r = client.region_info(2)?;
        let bar2 = match r.fd {
            Some(fd) => {
                let f = File::from(fd);
                Some(Words::map_at(&f, r.info.offset, 4096)?)
            }
            None => None,
        };
        write32(&mut client, regs::CTRL, 1)?;
        Ok(Engine { client, bar2 })
    }

    /// Sets queue `q` up with its ring in `ram` and enables it.
    #[allow(clippy::too_many_arguments)]
    pub fn setup_queue(
        &mut self,
        q: usize,
        size: u32,
        ring_iova: u64,
        ring_off: u64,
        comp_iova: u64,
        comp_off: u64,
        ring_pasid: Option<u32>,
        irq: bool,
    ) -> Result<Queue> {
        let base = regs::QUEUE + q as u64 * regs::QUEUE_STRIDE;
        write32(&mut self.client, base + regs::Q_CTRL, 0)?;
        write64(&mut self.client, base + regs::Q_RING_BASE, ring_iova)?;
        write32(&mut self.client, base + regs::Q_RING_SIZE, size)?;
        if read32(&mut self.client, base + regs::Q_RING_SIZE)? != size {
            return Err(Error::BadRing(size));
        }
        write32(&mut self.client, base + regs::Q_RING_PASID, ring_pasid.map_or(0, |p| p | regs::PASID_VALID))?;
        let ctrl = regs::Q_CTRL_ENABLE | if irq { regs::Q_CTRL_IRQ } else { 0 };
        write32(&mut self.client, base + regs::Q_CTRL, ctrl)?;
        let head = read32(&mut self.client, base + regs::Q_HEAD)?;
        Ok(Queue { index: q, size, ring_iova, ring_off, comp_iova, comp_off, tail: head, done: head })
    }

    /// Writes `d` into the next ring slot (its completion record pointed
    /// at the slot's record, cleared) without ringing; returns the slot.
    pub fn push(&mut self, ram: &GuestRam, q: &mut Queue, mut d: Descriptor) -> Result<u32> {
        if q.tail.wrapping_sub(q.done) >= q.size {
            return Err(Error::Full(q.index));
        }
        let slot = q.tail % q.size;
        d.completion = q.comp_iova + u64::from(slot) * COMPLETION_SIZE as u64;
        ram.write(q.comp_off + u64::from(slot) * COMPLETION_SIZE as u64, &[0u8; COMPLETION_SIZE])?;
        ram.write(q.ring_off + u64::from(slot) * DESC_SIZE, &d.to_bytes())?;
        q.tail = q.tail.wrapping_add(1);
        Ok(slot)
    }

    /// Rings queue `q`'s doorbell with its tail.
    pub fn ring(&mut self, q: &Queue, how: Doorbell) -> Result<()> {
        match (how, &self.bar2) {
            (Doorbell::Mmap, Some(m)) => {
                // The device reads the slot atomically too.
                if let Some(w) = m.u32(q.index as u64 * 8) {
                    w.store(q.tail, Ordering::Release);
                }
                Ok(())
            }
            (Doorbell::Register, _) => {
                let base = regs::QUEUE + q.index as u64 * regs::QUEUE_STRIDE;
                write32(&mut self.client, base + regs::Q_TAIL, q.tail)
            }
            _ => Ok(self.client.region_write_posted(2, q.index as u64 * 8, &q.tail.to_le_bytes())?),
        }
    }

    /// Waits for the completion record of `slot`.
    pub fn wait(&mut self, ram: &GuestRam, q: &mut Queue, slot: u32, timeout: Duration) -> Result<Completion> {
        let off = q.comp_off + u64::from(slot) * COMPLETION_SIZE as u64;
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            // The status byte is the record's first: the device writes it
            // last, after the rest of the record.
            if ram.load_u64(off)? as u8 != status::NONE {
                let mut b = [0u8; COMPLETION_SIZE];
                ram.read_into(off, &mut b)?;
                q.done = q.done.wrapping_add(1);
                return Ok(Completion::parse(&b).unwrap_or_default());
            }
            if t0.elapsed() > timeout {
                return Err(Error::Timeout(slot, timeout));
            }
            spins += 1;
            if spins > 200 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Submits one descriptor, rings, and waits for its completion.
    pub fn run(&mut self, ram: &GuestRam, q: &mut Queue, d: Descriptor, how: Doorbell) -> Result<Completion> {
        let slot = self.push(ram, q, d)?;
        self.ring(q, how)?;
        self.wait(ram, q, slot, Duration::from_secs(10))
    }

    /// A queue register.
    pub fn queue_reg(&mut self, q: usize, reg: u64) -> Result<u32> {
        read32(&mut self.client, regs::QUEUE + q as u64 * regs::QUEUE_STRIDE + reg)
    }

    /// The fd of the connection (for passing around).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.client.socket().as_fd()
    }
}

/// Reads a 32-bit BAR 0 register.
pub fn read32(c: &mut Client, off: u64) -> Result<u32> {
    let b = c.region_read(0, off, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Writes a 32-bit BAR 0 register.
pub fn write32(c: &mut Client, off: u64, v: u32) -> Result<()> {
    Ok(c.region_write(0, off, &v.to_le_bytes())?)
}

/// Writes a 64-bit BAR 0 register.
pub fn write64(c: &mut Client, off: u64, v: u64) -> Result<()> {
    Ok(c.region_write(0, off, &v.to_le_bytes())?)
}

/// A dma-engine bound through the ioasid extension with two address
/// spaces of one core session, as benches and load tests use it: `kram`
/// (1 MiB, for rings and completion records) mapped at `kiova` in an IOAS
/// attached to the RID, and `ram` (`size` bytes, every page touched once)
/// mapped at `diova` in an IOAS attached to vPASID `vpasid`.
pub struct TwoSpaces {
    /// The session that owns both address spaces.
    pub session: iommu_core::client::Client,
    /// Ring memory, reached by the RID.
    pub kram: GuestRam,
    /// Data memory, reached by the vPASID.
    pub ram: GuestRam,
    /// The device, enabled.
    pub engine: Engine,
}

impl TwoSpaces {
    /// Sets it up on the core at `core` and the dma-engine server at `dev`.
    pub fn new(core: &Path, dev: &Path, size: u64, kiova: u64, diova: u64, vpasid: u32) -> Result<TwoSpaces> {
        use iommu_core::pagetable::Perm;
        use iommu_core::types::MapArgs;
        let mut s = iommu_core::client::Client::session(core)?;
        let kram = GuestRam::new("kram", 1 << 20)?;
        let ram = GuestRam::new("ram", size)?;
        let mk = s.register_memory(kram.file.as_fd())?.id;
        let mr = s.register_memory(ram.file.as_fd())?.id;
        let (k, a) = (s.ioas_alloc()?, s.ioas_alloc()?);
        s.map(MapArgs { ioas: k, mem: mk, offset: 0, length: 1 << 20, iova: Some(kiova), perm: Perm::RW })?;
        s.map(MapArgs { ioas: a, mem: mr, offset: 0, length: size, iova: Some(diova), perm: Perm::RW })?;
        // Every page there once, so no page fault is timed later.
        ram.write(0, &vec![1u8; usize::try_from(size).unwrap_or(0)])?;
        let (_, chan) = s.open_device_channel()?;
        let mut c = Client::connect(dev)?;
        c.ioasid_bind(chan.as_fd())?;
        c.ioasid_attach(None, k, false)?;
        c.ioasid_attach(Some(vpasid), a, false)?;
        let engine = Engine::new(c)?;
        Ok(TwoSpaces { session: s, kram, ram, engine })
    }
}
