//! The queues: their register state, what the device and its queue
//! threads share (the gate, the void generations, the commit lock, the
//! doorbell page), and each queue's thread, which fetches descriptors,
//! runs them with [`execute`], keeps the progress of a stopped one and
//! commits a finished one (record, HEAD, interrupt) all or nothing with
//! respect to a reset.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use iommu_core::shm::Words;
use iommu_core::sync;
use iommu_core::types::FaultReason;
use serde::{Deserialize, Serialize};

use crate::device::DeviceContext;
use crate::dma::{self, DeviceDma, DmaSpace, Route};

use super::abi::{flag, regs, status, Completion, Descriptor, DESC_SIZE, QUEUES};
use super::execute::{execute, Outcome, Progress, Step};

/// A queue's registers and the descriptor it stopped part-way.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct QueueRegs {
    pub(super) ring_base: u64,
    pub(super) ring_size: u32,
    pub(super) ring_pasid: u32,
    pub(super) ctrl: u32,
    pub(super) head: u32,
    pub(super) tail: u32,
    pub(super) halted: bool,
    /// A completion record could not be written (Q_STATUS bit 2).
    pub(super) cmpl_fault: bool,
    pub(super) completed: u64,
    pub(super) errors: u32,
    /// The descriptor at HEAD, fetched and stopped part-way.
    pub(super) inflight: Option<(Descriptor, Progress)>,
}

/// The device's registers (saved and loaded for migration).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct Regs {
    pub(super) enabled: bool,
    pub(super) intx_status: u32,
    pub(super) queues: [QueueRegs; QUEUES],
}

/// How a queue's thread is woken: a count of kicks, and a condition
/// variable signalled only while the thread is parked on it (a kick while
/// it runs or polls costs no system call).
#[derive(Default)]
struct Kick {
    count: Mutex<u64>,
    cv: Condvar,
    /// Set, under `count`, while the thread waits on `cv`.
    parked: AtomicBool,
}

impl Kick {
    fn kick(&self) {
        let mut c = sync::lock(&self.count);
        *c = c.wrapping_add(1);
        let parked = self.parked.load(Ordering::Relaxed);
        drop(c);
        if parked {
            self.cv.notify_one();
        }
    }
}

/// What the device and its queue threads share.
pub(super) struct Shared {
    pub(super) regs: Mutex<Regs>,
    /// Read-held by a queue thread while it works on a descriptor; taking
    /// it for writing waits until every queue is between steps.
    pub(super) gate: RwLock<bool>,
    /// Set while a migration stop is asked for: descriptors stop at their
    /// next step and keep their progress.
    pub(super) held: AtomicBool,
    /// Set while work is being voided (see [`Shared::void`]).
    voiding: AtomicBool,
    /// Per queue: what wakes its thread.
    kicks: [Kick; QUEUES],
    /// The doorbell page (swapped for a fresh one when a client leaves).
    pub(super) doorbells: RwLock<Words>,
    pub(super) stop: AtomicBool,
    /// Per queue: bumped when the queue's work becomes void (reset, queue
    /// or device disable, departed client). A step of older work stops.
    voids: [AtomicU64; QUEUES],
    /// Held while a queue commits a finished descriptor (record, HEAD,
    /// interrupt) and while work is voided: a descriptor either completed
    /// before a reset was accepted or never does.
    commit: Mutex<()>,
    /// The device's DMA, once started: waiting for a step first fences the
    /// client, so that no step waits for client memory meanwhile.
    pub(super) dma: std::sync::OnceLock<Arc<dma::Dma>>,
}

impl Shared {
    /// Registers at reset, the gate open, doorbells in `doorbells`.
    pub(super) fn new(doorbells: Words) -> Shared {
        Shared {
            regs: Mutex::new(Regs::default()),
            gate: RwLock::new(true),
            held: AtomicBool::new(false),
            voiding: AtomicBool::new(false),
            kicks: Default::default(),
            doorbells: RwLock::new(doorbells),
            stop: Default::default(),
            voids: Default::default(),
            commit: Mutex::new(()),
            dma: std::sync::OnceLock::new(),
        }
    }

    /// Queue `q`'s doorbell. The page is a memfd sealed against shrinking
    /// that the client may write at any time through its own mapping.
    pub(super) fn doorbell(&self, q: usize) -> u32 {
        let m = sync::read(&self.doorbells);
        m.u32(q as u64 * 8).map_or(0, |w| w.load(Ordering::Acquire))
    }

    pub(super) fn set_doorbell(&self, q: usize, v: u32) {
        let m = sync::read(&self.doorbells);
        if let Some(w) = m.u32(q as u64 * 8) {
            w.store(v, Ordering::Release);
        }
    }

    /// Wakes every queue's thread (a change that concerns them all).
    pub(super) fn wake(&self) {
        for k in &self.kicks {
            k.kick();
        }
    }

    /// Wakes queue `q`'s thread.
    pub(super) fn wake_queue(&self, q: usize) {
        if let Some(k) = self.kicks.get(q) {
            k.kick();
        }
    }

    /// Voids the work of the queues in `which` (accepted at once: no
    /// descriptor of theirs completes after this) and waits until every
    /// queue thread is between steps. The returned guard keeps the engines
    /// out while the caller changes registers.
    pub(super) fn void(&self, which: impl Iterator<Item = usize>) -> std::sync::RwLockWriteGuard<'_, bool> {
        // A step or a record waiting for client memory gives up at once.
        let _fence = self.fence_client();
        // Until the caller holds the gate, a queue thread that stopped for
        // this must not start over (it would see the new generation and run
        // its voided descriptor again): `voiding` keeps it out.
        self.voiding.store(true, Ordering::SeqCst);
        {
            let _c = sync::lock(&self.commit);
            for q in which {
                self.voids[q].fetch_add(1, Ordering::AcqRel);
            }
        }
        self.wake();
        let g = sync::write(&self.gate);
        // The caller changes the registers before the engines can read
        // them again (they need the gate).
        self.voiding.store(false, Ordering::SeqCst);
        g
    }

    /// Waits until every queue thread is between steps (after a gate such
    /// as bus mastering closed, so that no DMA step is still running).
    pub(super) fn quiesce(&self) {
        let _fence = self.fence_client();
        self.wake();
        drop(sync::write(&self.gate));
    }

    /// Fences the client's DMA while the caller waits for queue threads:
    /// the caller answers a client's command, and the client serves our
    /// DMA only after that answer (see `dma::Dma::fence_client`). A step
    /// given up this way stops with its progress and goes on later.
    pub(super) fn fence_client(&self) -> Option<dma::ClientFence> {
        self.dma.get().map(|d| d.fence_client())
    }
}

/// A doorbell page: a memfd sealed against shrinking and growing (a client
/// that maps it cannot truncate it under our mapping), mapped; with the
/// contents of `from` if given.
pub(super) fn doorbell_page(from: Option<&File>) -> std::io::Result<(File, Words)> {
    let f = iommu_core::memfd::create_sealed("dma-engine-doorbells", 4096).map_err(std::io::Error::other)?;
    if let Some(old) = from {
        let mut b = [0u8; 4096];
        old.read_exact_at(&mut b, 0)?;
        f.write_all_at(&b, 0)?;
    }
    let m = Words::map(&f, 4096)?;
    Ok((f, m))
}

/// Empty polls spent yielding the CPU after work, before the thread
/// sleeps between polls (a driver that submits again within them is
/// served without a wake-up).
const SPIN_ROUNDS: u32 = 64;
/// The shortest and the longest sleep between polls of an idle but
/// runnable queue; the sleep doubles every [`BACKOFF_STEP`] empty polls.
const POLL_MIN: Duration = Duration::from_micros(50);
const POLL_MAX: Duration = Duration::from_millis(4);
const BACKOFF_STEP: u32 = 8;

/// A queue's thread: runs what is submitted while the queue can run, and
/// polls or sleeps in between, until the device stops.
///
/// Doorbells written through an mmap are not trapped, so a queue that can
/// run polls its doorbell: after work it yields the CPU between polls for
/// a while ([`SPIN_ROUNDS`]), then sleeps between polls, longer and
/// longer up to [`POLL_MAX`] (an idle queue costs a wake-up every few
/// milliseconds). A queue that cannot run (device or queue disabled,
/// halted, bus mastering off) sleeps until kicked: the register writes
/// that concern it, command register or power state changes, resets,
/// state loads and stop kick it.
pub(super) fn queue_loop(shared: Arc<Shared>, ctx: DeviceContext, q: usize) {
    let kick = &shared.kicks[q];
    let mut idle_rounds = 0u32;
    // The queue's own view of the DMA (translation handles of its own),
    // kept while the queue works or polls busily and dropped when it
    // sleeps. While kept it holds no unit that a binding change or a core
    // restart replaced past the next poll (see `dma::QueueDma`).
    let mut view: Option<dma::QueueDma<'_>> = None;
    while !shared.stop.load(Ordering::Acquire) {
        // After client DMA was given up for a fence: try again once it
        // is down (holding nothing that the fencing thread waits for).
        ctx.dma.wait_client(Duration::from_secs(1));
        if let Some(v) = &view {
            v.let_go_stale();
        }
        let seen = *sync::lock(&kick.count);
        let did = drain(&shared, &ctx, view.get_or_insert_with(|| ctx.dma.queue()), q);
        if did {
            idle_rounds = 0;
            continue;
        }
        let runnable = ctx.dma.bus_master() && *sync::read(&shared.gate) && {
            let r = sync::lock(&shared.regs);
            let qr = &r.queues[q];
            r.enabled && qr.ctrl & regs::Q_CTRL_ENABLE != 0 && !qr.halted
        };
        idle_rounds = idle_rounds.saturating_add(1);
        if runnable && idle_rounds <= SPIN_ROUNDS {
            std::thread::yield_now();
            continue;
        }
        // About to sleep: the view goes first (its handles are made again
        // at the next DMA), before the kick lock is taken, as dropping a
        // handle may drop the last reference to a replaced unit (which
        // joins its channel's reader thread): kicks do not wait for that.
        view = None;
        let k = sync::lock(&kick.count);
        // `stop` is read under the kick lock: a stop set after the loop's
        // test but before `seen` was read has its kick counted in `seen`,
        // and would otherwise leave this thread waiting for good.
        if *k == seen && !shared.stop.load(Ordering::Acquire) {
            kick.parked.store(true, Ordering::Relaxed);
            let k = if runnable {
                let doublings = ((idle_rounds - SPIN_ROUNDS) / BACKOFF_STEP).min(16);
                let wait = POLL_MIN.saturating_mul(1 << doublings).min(POLL_MAX);
                crate::devices::wait_timeout(&kick.cv, &kick.count, k, wait)
            } else {
                idle_rounds = 0;
                crate::devices::wait(&kick.cv, &kick.count, k)
            };
            kick.parked.store(false, Ordering::Relaxed);
            drop(k);
        }
    }
}

/// Most descriptors fetched with one read of the ring.
const FETCH: usize = 16;

/// Descriptors fetched ahead of HEAD (submitted ones, which the driver
/// may no longer change), for one pass over the queue: they are dropped
/// with it, and unused once the queue's work is voided.
struct Fetched {
    raw: [u8; FETCH * DESC_SIZE as usize],
    /// Ring index of the first, how many, and the void generation they
    /// were fetched in.
    first: u32,
    len: usize,
    gen: u64,
}

impl Default for Fetched {
    fn default() -> Fetched {
        Fetched { raw: [0; FETCH * DESC_SIZE as usize], first: 0, len: 0, gen: u64::MAX }
    }
}

impl Fetched {
    fn fill(&mut self, first: u32, len: usize, gen: u64) {
        (self.first, self.len, self.gen) = (first, len, gen);
    }

    /// The descriptor at ring index `head`, if fetched in generation `gen`.
    fn get(&self, head: u32, gen: u64) -> Option<Descriptor> {
        let i = head.wrapping_sub(self.first) as usize;
        if self.gen != gen || i >= self.len {
            return None;
        }
        let at = i * DESC_SIZE as usize;
        let raw: &[u8; 64] = self.raw[at..at + 64].try_into().ok()?;
        Some(Descriptor::parse(raw))
    }
}

/// Runs the queue's pending descriptors; true if any ran.
fn drain(shared: &Shared, ctx: &DeviceContext, qd: &dma::QueueDma<'_>, q: usize) -> bool {
    let mut did = false;
    let mut fetched = Fetched::default();
    loop {
        let gate = sync::read(&shared.gate);
        if !*gate || shared.stop.load(Ordering::Acquire) || !ctx.dma.bus_master() {
            return did;
        }
        let gen = shared.voids[q].load(Ordering::SeqCst);
        if shared.voiding.load(Ordering::SeqCst) {
            return did;
        }
        let tail = shared.doorbell(q);
        let (qr, enabled) = {
            let mut r = sync::lock(&shared.regs);
            r.queues[q].tail = tail;
            (r.queues[q], r.enabled)
        };
        let on = enabled && qr.ctrl & regs::Q_CTRL_ENABLE != 0 && !qr.halted;
        if !on || qr.head == tail || qr.ring_size == 0 {
            return did;
        }
        if tail.wrapping_sub(qr.head) > qr.ring_size {
            // More submitted than the ring holds: a broken driver.
            sync::lock(&shared.regs).queues[q].halted = true;
            return did;
        }
        did = true;
        let ring_route =
            if qr.ring_pasid & regs::PASID_VALID != 0 { Route::Vpasid(qr.ring_pasid & 0xf_ffff) } else { Route::Rid };
        let (d, from) = match qr.inflight {
            Some((d, p)) => (d, Some(p)),
            None => match fetched.get(qr.head, gen) {
                Some(d) => (d, None),
                None => {
                    // Fetch what is submitted, up to FETCH descriptors and
                    // the end of the ring, in one read.
                    let slot = qr.head % qr.ring_size;
                    let n = tail.wrapping_sub(qr.head).min(FETCH as u32).min(qr.ring_size - slot) as usize;
                    let at = qr.ring_base.wrapping_add(u64::from(slot) * DESC_SIZE);
                    let ring = qd.space(ring_route);
                    match ring.read(at, &mut fetched.raw[..n * DESC_SIZE as usize]) {
                        Ok(()) => {
                            fetched.fill(qr.head, n, gen);
                            match fetched.get(qr.head, gen) {
                                Some(d) => (d, None),
                                None => return did,
                            }
                        }
                        // Bus mastering went off, the client's DMA was
                        // fenced, or the client is slow: fetch it again.
                        Err(e) if e.stops_step() || e.client_timed_out() => return did,
                        Err(e) => {
                            tracing::debug!("dma-engine queue {q}: cannot fetch descriptor at {at:#x}: {e}");
                            if let dma::Error::NoPasid(_) = e {
                                ring.report_fault(at, false, FaultReason::NotPresent);
                            }
                            let mut r = sync::lock(&shared.regs);
                            if shared.voids[q].load(Ordering::Acquire) == gen {
                                r.queues[q].halted = true;
                            }
                            return did;
                        }
                    }
                }
            },
        };
        let step = || {
            if shared.voids[q].load(Ordering::Acquire) != gen || shared.stop.load(Ordering::Acquire) {
                Step::Void
            } else if shared.held.load(Ordering::Acquire) || !ctx.dma.bus_master() {
                Step::Stop
            } else {
                Step::Go
            }
        };
        let c = match from.and_then(|p| p.result) {
            Some(c) => c,
            None => match execute(qd, &d, from, &step) {
                Outcome::Done(c) => c,
                Outcome::Stopped(p) => {
                    keep(shared, q, gen, d, p);
                    return did;
                }
                Outcome::Void => return did,
            },
        };
        if !commit(shared, ctx, qd, q, gen, ring_route, &d, c) {
            return did;
        }
        drop(gate);
    }
}

/// Keeps a stopped descriptor's progress (unless its work was voided
/// meanwhile).
fn keep(shared: &Shared, q: usize, gen: u64, d: Descriptor, p: Progress) {
    let mut r = sync::lock(&shared.regs);
    if shared.voids[q].load(Ordering::Acquire) == gen {
        r.queues[q].inflight = Some((d, p));
    }
}

/// Completes a finished descriptor: its record, HEAD, the counters and
/// the interrupt, all or nothing with respect to a reset. Returns
/// false if the queue must stop (voided, halted, or the record waits
/// for bus mastering).
#[allow(clippy::too_many_arguments)]
fn commit(
    shared: &Shared,
    ctx: &DeviceContext,
    qd: &dma::QueueDma<'_>,
    q: usize,
    gen: u64,
    ring_route: Route,
    d: &Descriptor,
    c: Completion,
) -> bool {
    let _c = sync::lock(&shared.commit);
    if shared.voids[q].load(Ordering::Acquire) != gen {
        return false;
    }
    let mut record_fault = false;
    if let Some(rest) = d.completion.checked_add(1).filter(|_| d.completion != 0) {
        // The record goes through the queue's address space (resolved
        // now: the descriptor may have run long); the status byte lands
        // last.
        let ring = qd.space(ring_route);
        let b = c.to_bytes();
        let wrote = ring
            .write(rest, &b[1..])
            .map_err(|e| (e, false))
            .and_then(|_| ring.write(d.completion, &b[..1]).map_err(|e| (e, true)));
        match wrote {
            Ok(()) => {}
            // The status byte went to the client before a fence gave up
            // waiting for its answer: the client may still write it, so
            // the descriptor completes now (before the fencing reset or
            // disable is accepted), as if the answer had come.
            Err((e, true)) if e.maybe_applied() => {}
            Err((e, _)) if e.stops_step() || e.client_timed_out() => {
                // Written when bus mastering is back, the fence is
                // down, or the client answers; HEAD waits. (A record
                // that cannot be written for a fault halts the queue
                // below; a client that is slow to answer does not.)
                let p = Progress { result: Some(c), ..Progress::default() };
                sync::lock(&shared.regs).queues[q].inflight = Some((*d, p));
                return false;
            }
            Err((e, _)) => {
                tracing::debug!("dma-engine queue {q}: completion record at {:#x}: {e}", d.completion);
                if let dma::Error::NoPasid(_) = e {
                    ring.report_fault(d.completion, true, FaultReason::NotPresent);
                }
                record_fault = true;
            }
        }
    }
    let irq = d.flags & flag::INTERRUPT != 0;
    let mut r = sync::lock(&shared.regs);
    let qq = &mut r.queues[q];
    qq.inflight = None;
    qq.head = qq.head.wrapping_add(1);
    qq.completed = qq.completed.wrapping_add(1);
    if c.status != status::SUCCESS || record_fault {
        qq.errors = qq.errors.wrapping_add(1);
    }
    if record_fault {
        // The driver cannot learn how this descriptor ended: the queue
        // halts, as for a ring fault, and says why.
        qq.halted = true;
        qq.cmpl_fault = true;
    }
    if irq && qq.ctrl & regs::Q_CTRL_IRQ != 0 {
        if ctx.irqs.uses_intx() {
            r.intx_status |= 1 << q;
        }
        // Raised under the register lock, so a concurrent INTX_STATUS
        // clear cannot be overtaken.
        ctx.irqs.notify(q as u32);
    }
    !record_fault
}
