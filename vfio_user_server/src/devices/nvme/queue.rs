//! Submission and completion queues: a completion queue is shared by the
//! submission queues that post to it (its own lock, nothing global); each
//! submission queue has a thread that fetches commands at its head, runs
//! them and posts their completions with the phase tag, the SQ head and an
//! interrupt on the CQ's vector. Doorbells live in a page the client may
//! map: the thread polls its tail doorbell adaptively (as the dma-engine's
//! queues do) and is kicked by trapped doorbell writes. After Doorbell
//! Buffer Config an I/O queue reads its shadow doorbell in guest memory
//! instead, and sets its EventIdx before its thread sleeps.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use iommu_core::sync;

use crate::device::DeviceContext;
use crate::dma::{DeviceDma, DmaSpace, Route};

use super::abi::{aer, sc, Command, Completion, Status, CQE_SIZE, SQE_SIZE};
use super::prp::Fail;
use super::{admin, io, Ctrl};

/// How a queue thread is woken: a count of kicks and a condition variable
/// signalled only while the thread waits on it.
#[derive(Default)]
pub(super) struct Kick {
    count: Mutex<u64>,
    cv: Condvar,
    parked: AtomicBool,
}

impl Kick {
    pub(super) fn kick(&self) {
        let mut c = sync::lock(&self.count);
        *c = c.wrapping_add(1);
        let parked = self.parked.load(Ordering::Relaxed);
        drop(c);
        if parked {
            self.cv.notify_one();
        }
    }

    fn seen(&self) -> u64 {
        *sync::lock(&self.count)
    }

    /// Waits for a kick after `seen`, for at most `d` if given; returns at
    /// once if `stop` is set.
    fn wait(&self, seen: u64, d: Option<Duration>, stop: &AtomicBool) {
        let k = sync::lock(&self.count);
        if *k != seen || stop.load(Ordering::Acquire) {
            return;
        }
        self.parked.store(true, Ordering::Relaxed);
        let k = match d {
            Some(d) => crate::devices::wait_timeout(&self.cv, &self.count, k, d),
            None => crate::devices::wait(&self.cv, &self.count, k),
        };
        self.parked.store(false, Ordering::Relaxed);
        drop(k);
    }
}

/// A queue's shadow doorbell and EventIdx (Doorbell Buffer Config): the
/// guest addresses of its entries in the two buffers, once configured.
#[derive(Default)]
pub(super) struct Shadow {
    /// Shadow doorbell address with bit 0 set, or 0 while none.
    db: AtomicU64,
    /// EventIdx address.
    ei: AtomicU64,
}

impl Shadow {
    pub(super) fn set(&self, db: u64, ei: u64) {
        self.ei.store(ei, Ordering::Relaxed);
        self.db.store(db | 1, Ordering::Release);
    }

    /// `(shadow doorbell, EventIdx)` addresses, if configured.
    pub(super) fn get(&self) -> Option<(u64, u64)> {
        let db = self.db.load(Ordering::Acquire);
        (db & 1 != 0).then(|| (db & !1, self.ei.load(Ordering::Relaxed)))
    }
}

/// Reads the 32-bit value at `iova` (a shadow doorbell).
fn read_u32<S: DmaSpace>(space: &S, iova: u64) -> Result<u32, crate::dma::Error> {
    let mut b = [0u8; 4];
    space.read(iova, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// A completion queue.
pub(super) struct Cq {
    pub(super) id: u16,
    pub(super) base: u64,
    /// Entries.
    pub(super) size: u32,
    /// Interrupt vector and whether interrupts are enabled.
    pub(super) iv: u16,
    pub(super) ien: bool,
    pub(super) state: Mutex<CqState>,
    /// Its shadow head doorbell, once configured.
    pub(super) shadow: Shadow,
    /// The tail after the last entry posted (what INTx compares the head
    /// doorbell with).
    pub(super) posted: AtomicU32,
}

/// Where a completion queue's next entry goes.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct CqState {
    pub(super) tail: u32,
    pub(super) phase: bool,
    /// The last head doorbell value that was valid.
    pub(super) head: u32,
}

impl Cq {
    pub(super) fn new(id: u16, base: u64, size: u32, iv: u16, ien: bool) -> Cq {
        Cq {
            id,
            base,
            size,
            iv,
            ien,
            state: Mutex::new(CqState { tail: 0, phase: true, head: 0 }),
            shadow: Shadow::default(),
            posted: AtomicU32::new(0),
        }
    }

    /// Whether the queue holds entries the host has not consumed, by its
    /// head doorbell register (for INTx). Takes no lock: the event loop
    /// asks while a queue thread may be posting. A head past the queue
    /// counts as pending.
    pub(super) fn pending(&self, ctrl: &Ctrl) -> bool {
        let h = ctrl.doorbell(self.id, true);
        h >= self.size || h != self.posted.load(Ordering::Acquire)
    }

    /// Updates `s.head` from the doorbell register; a value past the
    /// queue raises an asynchronous event and is ignored.
    fn read_head(&self, ctrl: &Ctrl, s: &mut CqState) {
        let h = ctrl.doorbell(self.id, true);
        self.take_head(ctrl, s, h);
    }

    fn take_head(&self, ctrl: &Ctrl, s: &mut CqState, h: u32) {
        if h < self.size {
            s.head = h;
        } else {
            ctrl.bad_doorbell(self.id, true, h);
        }
    }

    /// Updates `s.head` from the shadow doorbell if one is configured
    /// (a queue thread's DMA), else from the register.
    fn refresh_head<S: DmaSpace>(&self, ctrl: &Ctrl, space: &S, s: &mut CqState) {
        match self.shadow.get() {
            Some((db, _)) => match read_u32(space, db) {
                Ok(h) => self.take_head(ctrl, s, h),
                Err(e) => tracing::debug!("nvme: shadow head of CQ {} at {db:#x}: {e}", self.id),
            },
            None => self.read_head(ctrl, s),
        }
    }
}

/// A submission queue's state (the thread's, readable for migration).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct SqState {
    pub(super) head: u32,
    /// A command fetched whose DMA was stopped, and its result if it ran
    /// but its completion could not be posted yet.
    pub(super) pending: Option<(Command, Option<(Status, u32)>)>,
}

/// A submission queue.
pub(super) struct Sq {
    pub(super) id: u16,
    pub(super) base: u64,
    pub(super) size: u32,
    pub(super) cq: Arc<Cq>,
    pub(super) state: Mutex<SqState>,
    pub(super) kick: Kick,
    pub(super) stop: AtomicBool,
    /// Its shadow tail doorbell and EventIdx, once configured.
    pub(super) shadow: Shadow,
}

impl Sq {
    pub(super) fn new(id: u16, base: u64, size: u32, cq: Arc<Cq>) -> Sq {
        Sq {
            id,
            base,
            size,
            cq,
            state: Mutex::new(SqState::default()),
            kick: Kick::default(),
            stop: AtomicBool::new(false),
            shadow: Shadow::default(),
        }
    }
}

/// Polls spent yielding after work before sleeping between polls.
const SPIN_ROUNDS: u32 = 64;
/// Shortest and longest sleep between polls of an idle queue.
const POLL_MIN: Duration = Duration::from_micros(50);
const POLL_MAX: Duration = Duration::from_millis(4);
const BACKOFF_STEP: u32 = 8;

/// What one queue thread reuses from command to command.
pub(super) struct Scratch {
    /// Data of one transfer (at most MDTS), or an Identify/log page.
    pub(super) buf: Vec<u8>,
    /// The guest ranges of the current transfer.
    pub(super) segs: Vec<(u64, usize)>,
}

/// A submission queue's thread: runs until the queue is stopped.
pub(super) fn sq_loop(ctrl: Arc<Ctrl>, ctx: DeviceContext, sq: Arc<Sq>) {
    let mut scratch = Scratch { buf: vec![0; super::abi::MAX_TRANSFER], segs: Vec::with_capacity(256) };
    let mut idle = 0u32;
    let mut stopped = false;
    while !sq.stop.load(Ordering::Acquire) {
        if stopped {
            // DMA given up for a fence: try again once it is down.
            ctx.dma.wait_client(Duration::from_secs(1));
        }
        let seen = sq.kick.seen();
        let (outcome, runnable) = {
            let gate = sync::read(&ctrl.gate);
            let runnable = *gate && ctx.dma.bus_master() && !ctrl.fatal.load(Ordering::Acquire);
            let outcome = if runnable { step(&ctrl, &ctx, &sq, &mut scratch) } else { Step::Idle };
            (outcome, runnable)
        };
        stopped = outcome == Step::Stopped;
        let did = outcome == Step::Moved;
        if sq.id == 0 {
            admin::deliver_events(&ctrl, &ctx, &sq);
        }
        if ctrl.intx_asserted() {
            ctrl.recheck_intx();
        }
        if did {
            idle = 0;
            continue;
        }
        idle = idle.saturating_add(1);
        if runnable && idle <= SPIN_ROUNDS {
            std::thread::yield_now();
            continue;
        }
        if runnable && arm_eventidx(&ctx, &sq) {
            // A submission came in while the EventIdx was set.
            idle = 0;
            continue;
        }
        let wait = runnable.then(|| {
            let doublings = (idle.saturating_sub(SPIN_ROUNDS) / BACKOFF_STEP).min(16);
            POLL_MIN.saturating_mul(1 << doublings).min(POLL_MAX)
        });
        // A queue that cannot run still wakes now and then: INTx and
        // events are looked at, and a lost kick costs at most this.
        sq.kick.wait(seen, Some(wait.unwrap_or(Duration::from_millis(100))), &sq.stop);
    }
}

/// Before a queue thread with a shadow doorbell sleeps: sets its EventIdx
/// to the tail it has consumed, so that the host's next submission rings
/// the doorbell register (and wakes the thread); while the thread polls,
/// the EventIdx stays behind and submissions cost the host no trap. True
/// if the shadow tail moved meanwhile (do not sleep).
fn arm_eventidx(ctx: &DeviceContext, sq: &Sq) -> bool {
    let Some((db, ei)) = sq.shadow.get() else { return false };
    let st = *sync::lock(&sq.state);
    if st.pending.is_some() {
        return false;
    }
    let space = ctx.dma.space(Route::Rid);
    if let Err(e) = space.write(ei, &st.head.to_le_bytes()) {
        tracing::debug!("nvme: EventIdx of SQ {} at {ei:#x}: {e}", sq.id);
        return false;
    }
    read_u32(&space, db).is_ok_and(|t| t != st.head)
}

/// What one [`step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A command ran or completed.
    Moved,
    /// Nothing to do (or a doorbell past the queue, reported).
    Idle,
    /// DMA was stopped (bus mastering off, a fence): the command waits.
    Stopped,
}

/// Runs one command of `sq` (or the one it stopped).
fn step(ctrl: &Arc<Ctrl>, ctx: &DeviceContext, sq: &Sq, scratch: &mut Scratch) -> Step {
    let mut st = *sync::lock(&sq.state);
    let (cmd, result) = match st.pending {
        Some(p) => p,
        None => {
            let tail = match sq.shadow.get() {
                Some((db, _)) => match read_u32(&ctx.dma.space(Route::Rid), db) {
                    Ok(t) => t,
                    Err(e) if e.stops_step() => return Step::Stopped,
                    Err(e) => {
                        tracing::debug!("nvme: shadow tail of SQ {} at {db:#x}: {e}", sq.id);
                        return Step::Idle;
                    }
                },
                None => ctrl.doorbell(sq.id, false),
            };
            if tail >= sq.size {
                ctrl.bad_doorbell(sq.id, false, tail);
                return Step::Idle;
            }
            if tail == st.head {
                return Step::Idle;
            }
            let mut raw = [0u8; SQE_SIZE as usize];
            let at = sq.base.wrapping_add(u64::from(st.head) * SQE_SIZE);
            match ctx.dma.space(Route::Rid).read(at, &mut raw) {
                Ok(()) => {}
                Err(e) if e.stops_step() || e.client_timed_out() => return Step::Stopped,
                Err(e) => {
                    // The queue itself cannot be read: nothing can be
                    // completed on it, the controller is broken.
                    tracing::warn!("nvme: SQ {} entry at {at:#x} cannot be read: {e}", sq.id);
                    ctrl.set_fatal();
                    return Step::Idle;
                }
            }
            st.head = (st.head + 1) % sq.size;
            (Command::parse(&raw), None)
        }
    };
    let result = match result {
        Some(r) => Some(r),
        None => {
            let r = if sq.id == 0 {
                admin::execute(ctrl, ctx, sq, &cmd, scratch)
            } else {
                io::execute(ctrl, ctx, &cmd, scratch)
            };
            match r {
                Ok(Some(r)) => Some(r),
                // Completed later (an Asynchronous Event Request).
                Ok(None) => None,
                Err(Fail::Stop) => {
                    st.pending = Some((cmd, None));
                    *sync::lock(&sq.state) = st;
                    return Step::Stopped;
                }
                Err(Fail::Status(s)) => Some((s, 0)),
            }
        }
    };
    st.pending = None;
    if let Some((status, dw0)) = result {
        if status != sc::SUCCESS {
            ctrl.log_error(sq.id, &cmd, status);
        }
        let c = Completion { dw0, sq_head: st.head as u16, sq_id: sq.id, cid: cmd.cid, status, phase: false };
        match post(ctrl, ctx, &sq.cq, c, &sq.stop) {
            Ok(()) => {}
            Err(Fail::Stop) => {
                st.pending = Some((cmd, Some((status, dw0))));
                *sync::lock(&sq.state) = st;
                return Step::Stopped;
            }
            Err(Fail::Status(_)) => {}
        }
    }
    *sync::lock(&sq.state) = st;
    Step::Moved
}

/// Posts `c` on `cq` (its phase tag set here) and signals its vector.
/// Waits while the queue is full, until the host consumes an entry or
/// `stop` is set.
pub(super) fn post(
    ctrl: &Ctrl,
    ctx: &DeviceContext,
    cq: &Cq,
    mut c: Completion,
    stop: &AtomicBool,
) -> Result<(), Fail> {
    let space = ctx.dma.space(Route::Rid);
    let mut s = sync::lock(&cq.state);
    // A host that never consumes costs a poll every millisecond at most.
    let mut nap = Duration::from_micros(20);
    loop {
        if (s.tail + 1) % cq.size != s.head {
            break;
        }
        cq.refresh_head(ctrl, &space, &mut s);
        if (s.tail + 1) % cq.size != s.head {
            break;
        }
        if stop.load(Ordering::Acquire) || ctrl.quiescing.load(Ordering::Acquire) || !ctx.dma.bus_master() {
            return Err(Fail::Stop);
        }
        drop(s);
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(1));
        s = sync::lock(&cq.state);
    }
    c.phase = s.phase;
    let b = c.to_bytes();
    let at = cq.base.wrapping_add(u64::from(s.tail) * CQE_SIZE);
    // The status field with the phase tag lands last: a host that sees
    // the new phase sees the whole entry.
    let wrote = match space.write(at, &b[..14]) {
        Ok(()) => space.write(at + 14, &b[14..]),
        // Part of the entry may have landed, its phase tag has not: it is
        // not posted (the host would stop at this slot); it is posted
        // again, whole, when the queue goes on.
        Err(e) if e.maybe_applied() => return Err(Fail::Stop),
        Err(e) => Err(e),
    };
    match wrote {
        Ok(()) => {}
        Err(e) if e.maybe_applied() => {}
        Err(e) if e.stops_step() || e.client_timed_out() => return Err(Fail::Stop),
        Err(e) => {
            tracing::warn!("nvme: CQ {} entry at {at:#x} cannot be written: {e}", cq.id);
            drop(s);
            ctrl.set_fatal();
            return Err(Fail::Status(sc::DATA_TRANSFER));
        }
    }
    let posted = s.tail;
    s.tail = (s.tail + 1) % cq.size;
    if s.tail == 0 {
        s.phase = !s.phase;
    }
    cq.posted.store(s.tail, Ordering::Release);
    drop(s);
    if let Some((_, ei)) = cq.shadow.get().filter(|_| cq.ien && ctrl.intx_wired()) {
        // INTx follows the register head: the host rings it once it has
        // consumed this entry.
        if let Err(e) = space.write(ei, &posted.to_le_bytes()) {
            tracing::debug!("nvme: EventIdx of CQ {} at {ei:#x}: {e}", cq.id);
        }
    }
    if cq.ien {
        ctrl.interrupt(cq.iv);
    }
    Ok(())
}

/// The event for a doorbell written with a value past its queue.
pub(super) fn doorbell_event() -> u32 {
    u32::from(aer::TYPE_ERROR)
        | (u32::from(aer::INFO_INVALID_DOORBELL_VALUE) << 8)
        | (u32::from(super::abi::log::ERROR) << 16)
}
