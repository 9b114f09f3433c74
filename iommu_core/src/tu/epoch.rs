//! The DMA guard and the per-thread IOTLBs.
//!
//! Each thread that does DMA through a unit has a [`ThreadUnit`] of its
//! own (thread-local): its IOTLB, the buffers an access reuses, and a
//! [`Slot`] the unit lists, whose sequence number is odd while the thread
//! is in a DMA. A [`super::Handle`] holds a `ThreadUnit` of its own too,
//! reached without the thread-local lookup. An access touches no lock,
//! shared map or shared counter when its translations are in its IOTLB:
//!
//! - entering: the slot's sequence is made odd, then the unit's
//!   invalidation generation is loaded; if it moved since the thread's
//!   IOTLB was filled, the IOTLB is emptied;
//! - leaving: the sequence is made even again (a release store).
//!
//! An invalidation bumps the generation, then waits, for every slot found
//! odd, until its sequence moves. The store that makes a slot odd and the
//! load of the generation after it must not be reordered, nor the bump
//! and the loads of the slots: then either the DMA's store comes first
//! and the invalidation sees the slot odd and waits for that DMA to end,
//! or the bump comes first and the DMA sees it and translates afresh. So
//! once an invalidation has waited, no DMA uses a translation cached
//! before it: the guarantee the `RwLock` guard gave, without a shared
//! cache line written per access.
//!
//! The ordering costs the invalidation, not the access: where the kernel
//! offers `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, the access
//! orders its store and load with a compiler fence only, and the
//! invalidation, between its bump and its loads, has the kernel run a full
//! memory barrier on every CPU that runs a thread of the process (an
//! access there is either wholly before that barrier or sees the bump).
//! Without it, the store is sequentially consistent (a locked instruction
//! per access) and so are the bump and the loads.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::iotlb::Iotlb;
use super::memory::MemRef;
use super::DeviceState;
use crate::sync;

/// Leaves a thread's IOTLB holds for one unit (fewer if the unit's
/// [`super::Config::iotlb_entries`] says so).
pub(super) const TLB_WAYS: usize = 32;

/// A thread's presence in a unit's DMA, on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
pub(super) struct Slot {
    /// Odd while the thread is in a DMA of the unit. Only its thread
    /// writes it.
    seq: AtomicU64,
    /// IOTLB hits of the thread (only its thread writes it: a load and a
    /// store, no read-modify-write).
    hits: AtomicU64,
    /// IOTLB misses (walks) of the thread, written the same way.
    misses: AtomicU64,
    /// The unit is gone: the thread may forget it.
    dead: AtomicBool,
}

/// A unit's side of the guard: its slots and its generation.
pub(super) struct Guard {
    /// Unique id of the unit, for the threads' lists.
    id: u64,
    gen: AtomicU64,
    slots: Mutex<Slots>,
    /// Entries a thread's IOTLB holds for this unit.
    ways: usize,
    /// Accesses order their entry with a compiler fence; invalidations
    /// with `membarrier` (see the module's text).
    asym: bool,
}

#[derive(Default)]
pub(super) struct Slots {
    live: Vec<Arc<Slot>>,
    /// Hits and misses of threads that ended.
    retired_hits: u64,
    retired_misses: u64,
}

impl Slots {
    /// Drops the slots of threads that ended (only this list holds them).
    fn prune(&mut self) {
        let (mut hits, mut misses) = (0, 0);
        self.live.retain(|s| {
            let gone = Arc::strong_count(s) == 1;
            if gone {
                hits += s.hits.load(Ordering::Relaxed);
                misses += s.misses.load(Ordering::Relaxed);
            }
            !gone
        });
        self.retired_hits += hits;
        self.retired_misses += misses;
    }
}

static NEXT_UNIT: AtomicU64 = AtomicU64::new(1);

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint) }
}

/// Whether this process may order accesses with
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (asked and registered once).
fn asymmetric() -> bool {
    static ASYM: OnceLock<bool> = OnceLock::new();
    *ASYM.get_or_init(|| {
        let cmds = membarrier(MEMBARRIER_CMD_QUERY);
        cmds >= 0
            && cmds & libc::c_long::from(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0
            && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
    })
}

/// One entry of a thread's IOTLB.
#[derive(Clone, Copy)]
struct Way {
    dev: u32,
    pasid: u32,
    e: Iotlb,
}

/// A thread's IOTLB for one unit: a few whole leaves, searched most
/// recently used first, replaced in turn.
struct Tlb {
    ways: [Option<Way>; TLB_WAYS],
    len: usize,
    next: usize,
    mru: usize,
}

impl Tlb {
    #[inline(always)]
    fn get(&mut self, dev: u32, pasid: u32, page: u64) -> Option<Iotlb> {
        fn hit(w: &Option<Way>, dev: u32, pasid: u32, page: u64) -> bool {
            w.as_ref().is_some_and(|w| w.dev == dev && w.pasid == pasid && page.wrapping_sub(w.e.iova_base) < w.e.size)
        }
        if let Some(w) = self.ways.get(self.mru).filter(|w| hit(w, dev, pasid, page)) {
            return w.map(|w| w.e);
        }
        let i = self.ways[..self.len].iter().position(|w| hit(w, dev, pasid, page))?;
        self.mru = i;
        self.ways[i].map(|w| w.e)
    }

    fn put(&mut self, cap: usize, dev: u32, pasid: u32, e: Iotlb) {
        let i = if self.len < cap {
            self.len += 1;
            self.len - 1
        } else {
            let i = self.next % cap.max(1);
            self.next = i + 1;
            i
        };
        if let Some(w) = self.ways.get_mut(i) {
            *w = Some(Way { dev, pasid, e });
            self.mru = i;
        }
    }

    fn clear(&mut self) {
        self.ways[..self.len].fill(None);
        self.len = 0;
        self.next = 0;
        self.mru = 0;
    }
}

/// What one thread keeps for one unit.
pub(super) struct ThreadUnit {
    unit: u64,
    slot: Arc<Slot>,
    /// Generation the IOTLB was filled under.
    gen: Cell<u64>,
    /// The slot's sequence as this thread last wrote it.
    seq: Cell<u64>,
    /// Nesting of DMA on this thread (only the outermost touches the slot).
    depth: Cell<u32>,
    hits: Cell<u64>,
    tlb: RefCell<Tlb>,
    /// Devices this thread translated for, and memory objects its walks
    /// reached `(base, size, object)`, under the same generation as the
    /// IOTLB (an unbind and a forgotten object move it).
    devices: RefCell<Vec<(u32, DeviceState)>>,
    objects: RefCell<Vec<(u64, u64, MemRef)>>,
    ways: usize,
    /// Buffers an access lends itself (the translations a write's checking
    /// pass found, for each side of a copy), kept for the next one.
    looked: RefCell<Vec<Vec<Iotlb>>>,
}

thread_local! {
    static UNITS: RefCell<Vec<Rc<ThreadUnit>>> = const { RefCell::new(Vec::new()) };
}

/// Units a thread keeps before it forgets those whose unit is gone.
const THREAD_UNITS: usize = 8;

impl Guard {
    pub(super) fn new(ways: usize) -> Guard {
        Guard {
            id: NEXT_UNIT.fetch_add(1, Ordering::Relaxed),
            gen: AtomicU64::new(0),
            slots: Mutex::new(Slots::default()),
            ways: ways.clamp(1, TLB_WAYS),
            asym: asymmetric(),
        }
    }

    /// Runs `f` with this thread's state for the unit (made on its first
    /// DMA).
    #[inline(always)]
    pub(super) fn with_thread<R>(&self, f: impl FnOnce(&ThreadUnit) -> R) -> R {
        let mut f = Some(f);
        let r = UNITS.try_with(|u| {
            // Borrowed for the whole access: a nested access (of another
            // unit, from a client's callback) borrows it again.
            let u = u.try_borrow().ok()?;
            let t = match u.first() {
                Some(t) if t.unit == self.id => t,
                _ => u.iter().find(|t| t.unit == self.id)?,
            };
            let f = f.take()?;
            Some(f(t))
        });
        if let Ok(Some(r)) = r {
            return r;
        }
        let t = self.register();
        match f.take() {
            Some(f) => f(&t),
            None => panic!("the access ran and returned nothing"),
        }
    }

    /// State of a new user of the unit (a thread, or a
    /// [`super::Handle`]), with a slot of its own in the unit's list.
    #[cold]
    pub(super) fn new_user(&self) -> ThreadUnit {
        let slot = Arc::new(Slot::default());
        {
            let mut s = sync::lock(&self.slots);
            s.prune();
            s.live.push(slot.clone());
        }
        ThreadUnit {
            unit: self.id,
            slot,
            // Never equal to a generation: the first DMA starts empty.
            gen: Cell::new(u64::MAX),
            seq: Cell::new(0),
            depth: Cell::new(0),
            hits: Cell::new(0),
            tlb: RefCell::new(Tlb { ways: [None; TLB_WAYS], len: 0, next: 0, mru: 0 }),
            devices: RefCell::new(Vec::new()),
            objects: RefCell::new(Vec::new()),
            ways: self.ways,
            looked: RefCell::new(Vec::new()),
        }
    }

    #[cold]
    fn register(&self) -> Rc<ThreadUnit> {
        let t = Rc::new(self.new_user());
        // A thread whose locals are being torn down, or in an access that
        // holds its list, keeps no list entry: its state lives for this
        // access only.
        let _ = UNITS.try_with(|u| {
            let Ok(mut u) = u.try_borrow_mut() else { return };
            if u.len() >= THREAD_UNITS {
                // Forget units that are gone (and are not in a DMA here).
                u.retain(|t| !t.slot.dead.load(Ordering::Relaxed) || t.depth.get() > 0);
            }
            u.insert(0, t.clone());
        });
        t
    }

    /// Invalidates every IOTLB of the unit and, if `wait`, waits until
    /// every DMA that may have used one of their entries has ended.
    pub(super) fn invalidate(&self, wait: bool) {
        self.gen.fetch_add(1, Ordering::SeqCst);
        if !wait {
            return;
        }
        if self.asym && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 {
            // Registered, so this does not fail; if it did, no wait could
            // be trusted.
            tracing::error!("membarrier failed after registration; aborting");
            std::process::abort();
        }
        let busy: Vec<(Arc<Slot>, u64)> = {
            let mut s = sync::lock(&self.slots);
            s.prune();
            s.live
                .iter()
                .filter_map(|slot| {
                    let q = slot.seq.load(Ordering::SeqCst);
                    (q % 2 == 1).then(|| (slot.clone(), q))
                })
                .collect()
        };
        for (slot, q) in busy {
            let mut spins = 0u32;
            while slot.seq.load(Ordering::Acquire) == q {
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else if spins < 128 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }

    /// IOTLB hits and misses of every thread, ended or not.
    pub(super) fn counts(&self) -> (u64, u64) {
        let s = sync::lock(&self.slots);
        let live = |f: fn(&Slot) -> &AtomicU64| s.live.iter().map(|x| f(x).load(Ordering::Relaxed)).sum::<u64>();
        (s.retired_hits + live(|x| &x.hits), s.retired_misses + live(|x| &x.misses))
    }

    /// The unit is dropped: threads may forget it.
    pub(super) fn retire(&self) {
        for s in &sync::lock(&self.slots).live {
            s.dead.store(true, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub(super) fn poison_for_test(&self) {
        let _s = self.slots.lock();
        panic!("panicking while holding the unit's slot list, on purpose");
    }
}

/// A DMA in progress on this thread: its translations stay valid (no
/// invalidation completes) until it is dropped.
pub(super) struct InDma<'a> {
    t: &'a ThreadUnit,
}

impl ThreadUnit {
    /// Enters a DMA of the unit whose guard is `g`.
    #[inline(always)]
    pub(super) fn enter<'a>(&'a self, g: &Guard) -> InDma<'a> {
        let d = self.depth.get();
        self.depth.set(d + 1);
        if d == 0 {
            let q = self.seq.get() + 1;
            self.seq.set(q);
            let now = if g.asym {
                self.slot.seq.store(q, Ordering::Relaxed);
                // The invalidation's membarrier orders this store before
                // the load on the CPU (see the module's text).
                compiler_fence(Ordering::SeqCst);
                g.gen.load(Ordering::Acquire)
            } else {
                self.slot.seq.store(q, Ordering::SeqCst);
                g.gen.load(Ordering::SeqCst)
            };
            if now != self.gen.get() {
                self.flush();
                self.gen.set(now);
            }
        }
        InDma { t: self }
    }

    #[cold]
    fn flush(&self) {
        self.tlb.borrow_mut().clear();
        self.devices.borrow_mut().clear();
        self.objects.borrow_mut().clear();
    }

    /// A walk: counted.
    pub(super) fn missed(&self) {
        // Only this thread writes its count.
        let m = &self.slot.misses;
        m.store(m.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// The state of `dev`, cached on this thread or from `lookup`.
    pub(super) fn device(&self, dev: u32, lookup: impl FnOnce() -> Option<DeviceState>) -> Option<DeviceState> {
        if let Some(&(_, s)) = self.devices.borrow().iter().find(|(d, _)| *d == dev) {
            return Some(s);
        }
        let s = lookup()?;
        let mut v = self.devices.borrow_mut();
        if v.len() >= 8 {
            v.remove(0);
        }
        v.push((dev, s));
        Some(s)
    }

    /// The memory object holding `sys`, cached on this thread or from
    /// `lookup`.
    pub(super) fn object(&self, sys: u64, lookup: impl FnOnce() -> Option<(u64, u64, MemRef)>) -> Option<MemRef> {
        if let Some(&(_, _, m)) = self.objects.borrow().iter().find(|(b, n, _)| sys >= *b && sys - *b < *n) {
            return Some(m);
        }
        let o = lookup()?;
        let mut v = self.objects.borrow_mut();
        if v.len() >= 8 {
            v.remove(0);
        }
        v.push(o);
        Some(o.2)
    }

    /// The cached leaf of `(dev, pasid)` covering `page`.
    #[inline(always)]
    pub(super) fn get(&self, dev: u32, pasid: u32, page: u64) -> Option<Iotlb> {
        let e = self.tlb.borrow_mut().get(dev, pasid, page)?;
        self.hits.set(self.hits.get() + 1);
        Some(e)
    }

    /// Whether this thread's IOTLB holds one leaf covering all of
    /// `[iova, iova+len)` of `(dev, pasid)` (not counted as a hit).
    #[inline]
    pub(super) fn covers(&self, dev: u32, pasid: u32, iova: u64, len: usize) -> bool {
        let page = iova & !(crate::pagetable::PAGE_SIZE - 1);
        self.tlb
            .borrow_mut()
            .get(dev, pasid, page)
            .is_some_and(|e| (iova - e.iova_base).checked_add(len as u64).is_some_and(|end| end <= e.size))
    }

    /// Caches a leaf.
    pub(super) fn put(&self, dev: u32, pasid: u32, e: Iotlb) {
        self.tlb.borrow_mut().put(self.ways, dev, pasid, e);
    }

    /// A buffer for translations, empty (given back with
    /// [`ThreadUnit::give_back`]).
    pub(super) fn lend(&self) -> Vec<Iotlb> {
        let mut v = self.looked.borrow_mut().pop().unwrap_or_default();
        v.clear();
        v
    }

    pub(super) fn give_back(&self, v: Vec<Iotlb>) {
        let mut l = self.looked.borrow_mut();
        if l.len() < 4 {
            l.push(v);
        }
    }

    /// Leaves cached for the unit (tests).
    #[cfg(test)]
    pub(super) fn cached(&self) -> usize {
        self.tlb.borrow().len
    }
}

impl Drop for InDma<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        let d = self.t.depth.get() - 1;
        self.t.depth.set(d);
        if d == 0 {
            let q = self.t.seq.get() + 1;
            self.t.seq.set(q);
            self.t.slot.seq.store(q, Ordering::Release);
            let h = self.t.hits.get();
            if h != 0 {
                // Only this thread writes its count.
                let s = &self.t.slot.hits;
                s.store(s.load(Ordering::Relaxed) + h, Ordering::Relaxed);
                self.t.hits.set(0);
            }
        }
    }
}
