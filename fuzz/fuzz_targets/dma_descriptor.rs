//! The dma-engine's descriptors: 64 guest bytes parsed and executed against
//! a model of the device's DMA (two address spaces, per-page rights, an
//! attached and an unattached vPASID). Checked: the completion status, no
//! byte written outside the destination or through another address space,
//! nothing written when the destination is not wholly writable, and the
//! results of COPY (memmove semantics for overlapping buffers), FILL,
//! COMPARE and CRC-32C against plain computations, also when the
//! descriptor is stopped part-way (as bus mastering going off does) and
//! resumed from its progress, possibly several times.
#![no_main]

use std::cell::{Cell, RefCell};

use ioasid_fuzz::Input;
use iommu_core::types::FaultReason;
use libfuzzer_sys::fuzz_target;
use vfio_user_server::devices::dma_engine::{execute, flag, op, status, Descriptor, Outcome, Step, MAX_XFER};
use vfio_user_server::dma::{self, DeviceDma, DmaSpace, Route};

const PAGE: u64 = 4096;
const ATTACHED: u32 = 7;

struct Space {
    base: u64,
    mem: RefCell<Vec<u8>>,
    /// Rights per page: bit 0 read, bit 1 write.
    rights: Vec<u8>,
}

impl Space {
    /// The first address of `[iova, iova+len)` that lacks `right`.
    fn check(&self, iova: u64, len: usize, right: u8) -> Result<(), u64> {
        let end = iova.checked_add(len as u64).ok_or(iova)?;
        let mut at = iova;
        while at < end {
            let page = at.checked_sub(self.base).map(|o| o / PAGE);
            match page.and_then(|p| self.rights.get(p as usize)) {
                Some(r) if r & right != 0 => {}
                _ => return Err(at),
            }
            at = (at & !(PAGE - 1)) + PAGE;
        }
        Ok(())
    }
}

struct Model {
    rid: Space,
    pasid: Space,
    writes: RefCell<Vec<(Route, u64, usize)>>,
    faults: Cell<u32>,
}

fn fault(iova: u64) -> dma::Error {
    dma::Error::Fault { iova, reason: FaultReason::NotPresent }
}

impl Model {
    fn area(&self, route: Route) -> Result<&Space, dma::Error> {
        match route {
            Route::Rid => Ok(&self.rid),
            Route::Vpasid(ATTACHED) => Ok(&self.pasid),
            Route::Vpasid(p) => Err(dma::Error::NoPasid(p)),
        }
    }
}

/// One route of the model, as the engine resolves it.
struct Routed<'a> {
    model: &'a Model,
    route: Route,
}

impl DeviceDma for Model {
    type Space<'a> = Routed<'a>;

    fn space(&self, route: Route) -> Routed<'_> {
        Routed { model: self, route }
    }
}

impl DmaSpace for Routed<'_> {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), dma::Error> {
        let s = self.model.area(self.route)?;
        s.check(iova, buf.len(), 1).map_err(fault)?;
        let o = (iova - s.base) as usize;
        buf.copy_from_slice(&s.mem.borrow()[o..o + buf.len()]);
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), dma::Error> {
        let s = self.model.area(self.route)?;
        s.check(iova, data.len(), 2).map_err(fault)?;
        let o = (iova - s.base) as usize;
        s.mem.borrow_mut()[o..o + data.len()].copy_from_slice(data);
        self.model.writes.borrow_mut().push((self.route, iova, data.len()));
        Ok(())
    }

    fn check_write(&self, iova: u64, len: usize) -> Result<(), dma::Error> {
        self.model.area(self.route)?.check(iova, len, 2).map_err(fault)
    }

    fn report_fault(&self, _iova: u64, _write: bool, _reason: FaultReason) {
        self.model.faults.set(self.model.faults.get() + 1);
    }
}

fn crc32c(seed: u32, data: &[u8]) -> u32 {
    let mut c = !seed;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
        }
    }
    !c
}

fn space(input: &mut Input<'_>, base: u64) -> Space {
    let pages = usize::from(input.u8() % 16) + 1;
    let rights = (0..pages).map(|_| input.u8() & 3).collect();
    let mut mem = vec![0u8; pages * PAGE as usize];
    for (i, b) in mem.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ (base >> 12) as u8;
    }
    Space { base, mem: RefCell::new(mem), rights }
}

/// An address near the spaces, or anything.
fn address(input: &mut Input<'_>) -> u64 {
    match input.u8() {
        0 => input.u64(),
        k => u64::from(k & 0x3f) * 0x1000 + u64::from(input.u16() & 0x1fff),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let rid_base = u64::from(input.u8() & 7) * 0x1000;
    let model = Model {
        rid: space(&mut input, rid_base),
        pasid: space(&mut input, rid_base),
        writes: RefCell::new(Vec::new()),
        faults: Cell::new(0),
    };
    let cancel_after = input.u8();
    let mut raw = [0u8; 64];
    if input.u8() & 1 == 0 {
        raw.copy_from_slice(&{
            let mut b = [0u8; 64];
            let src = input.bytes(64);
            b[..src.len()].copy_from_slice(src);
            b
        });
    } else {
        let d = Descriptor {
            opcode: input.u8() % 6,
            flags: input.u8() & 3,
            pasid: if input.u8() & 1 == 0 { ATTACHED } else { input.u32() },
            len: match input.u8() {
                0 => input.u32(),
                k => u32::from(k) * 64 + u32::from(input.u8()),
            },
            src: address(&mut input),
            dst: address(&mut input),
            completion: 0,
            pattern: input.u64(),
        };
        raw = d.to_bytes();
    }
    let d = Descriptor::parse(&raw);
    assert_eq!(Descriptor::parse(&d.to_bytes()), d, "parse and to_bytes disagree");
    let route = if d.flags & flag::PASID != 0 { Route::Vpasid(d.pasid) } else { Route::Rid };
    let src_before = model.area(route).ok().map(|s| s.mem.borrow().clone());

    // Steps are stopped (and resumed) every `stop_every + 2` steps (a
    // resumed COPY or FILL spends one on its destination check before it
    // moves), and the work is voided after `cancel_after` steps in all
    // (0: never).
    let stop_every = u32::from(input.u8() % 4);
    let steps = Cell::new(0u32);
    let step = || {
        steps.set(steps.get() + 1);
        if cancel_after != 0 && steps.get() > u32::from(cancel_after) {
            Step::Void
        } else if stop_every != 0 && steps.get().is_multiple_of(stop_every + 2) {
            Step::Stop
        } else {
            Step::Go
        }
    };
    let mut from = None;
    let mut stops = 0u32;
    let c = loop {
        match execute(&model, &d, from, &step) {
            Outcome::Done(c) => break c,
            Outcome::Void => {
                assert!(cancel_after != 0, "voided without being asked");
                return;
            }
            Outcome::Stopped(p) => {
                assert!(stop_every != 0, "stopped without being asked");
                assert!(p.done <= d.len && p.result.is_none(), "progress {p:?} of {d:?}");
                stops += 1;
                assert!(stops <= 2 * (MAX_XFER / 4096 + 4), "no progress across stops");
                from = Some(p);
            }
        }
    };
    assert!(c.status >= status::SUCCESS && c.status <= status::NO_PASID, "status {}", c.status);
    assert!(c.bytes_done <= d.len, "{} bytes done of {}", c.bytes_done, d.len);
    let writes = model.writes.borrow();
    let pasid_ok = d.flags & flag::PASID == 0 || (d.pasid != 0 && d.pasid < 1 << 20);
    let len_ok = d.len <= MAX_XFER && (d.len != 0 || d.opcode == op::NOP);
    if !pasid_ok || !len_ok || d.opcode > op::CRC32C {
        assert_eq!(c.status, status::INVALID, "descriptor {d:?}");
        assert!(writes.is_empty());
        return;
    }
    // Every write went through the descriptor's route, inside the
    // destination.
    for &(r, at, n) in writes.iter() {
        assert_eq!(r, route, "a write through another address space");
        assert!(matches!(d.opcode, op::COPY | op::FILL), "{d:?} wrote");
        assert!(at >= d.dst && at + n as u64 <= d.dst + u64::from(d.len), "write {at:#x}+{n:#x} outside {d:?}");
    }
    if d.opcode == op::NOP {
        // A NOP touches no memory, whatever its route.
        assert_eq!(c.status, status::SUCCESS);
        assert!(writes.is_empty());
        return;
    }
    let Ok(space) = model.area(route) else {
        assert_eq!(c.status, status::NO_PASID);
        assert!(model.faults.get() > 0, "the missing vPASID was not reported");
        return;
    };
    let len = d.len as usize;
    let before = src_before.expect("the route has a space");
    let slice = |mem: &[u8], at: u64| -> Vec<u8> {
        let o = (at - space.base) as usize;
        mem[o..o + len].to_vec()
    };
    let dst_writable = space.check(d.dst, len, 2).is_ok();
    if matches!(d.opcode, op::COPY | op::FILL) && !dst_writable {
        assert_eq!(c.status, status::FAULT_DST, "{d:?}");
        assert!(writes.is_empty(), "a write although the destination is not writable");
        return;
    }
    let src_readable = space.check(d.src, len, 1).is_ok();
    let after = space.mem.borrow();
    match d.opcode {
        op::NOP => assert_eq!(c.status, status::SUCCESS),
        op::COPY => {
            if src_readable {
                assert_eq!(c.status, status::SUCCESS, "{d:?}");
                // Overlapping buffers too: memmove semantics.
                let src = slice(&before, d.src);
                assert_eq!(slice(&after, d.dst), src, "copied bytes differ");
            } else {
                assert_eq!(c.status, status::FAULT_SRC, "{d:?}");
            }
        }
        op::FILL => {
            assert_eq!(c.status, status::SUCCESS);
            let pat = d.pattern.to_le_bytes();
            let want: Vec<u8> = (0..len).map(|i| pat[i % 8]).collect();
            assert_eq!(slice(&after, d.dst), want, "fill");
        }
        op::COMPARE => {
            let dst_readable = space.check(d.dst, len, 1).is_ok();
            if src_readable && dst_readable {
                let (a, b) = (slice(&before, d.src), slice(&before, d.dst));
                match a.iter().zip(&b).position(|(x, y)| x != y) {
                    Some(i) => {
                        assert_eq!(c.status, status::MISMATCH);
                        assert_eq!(c.result, i as u64);
                    }
                    None => assert_eq!(c.status, status::SUCCESS),
                }
            } else {
                assert!(c.status == status::FAULT_SRC || c.status == status::FAULT_DST || c.status == status::MISMATCH);
            }
        }
        op::CRC32C => {
            if src_readable {
                assert_eq!(c.status, status::SUCCESS);
                assert_eq!(c.result, u64::from(crc32c(d.pattern as u32, &slice(&before, d.src))), "crc");
            } else {
                assert_eq!(c.status, status::FAULT_SRC);
            }
        }
        _ => unreachable!(),
    }
    if c.status == status::FAULT_SRC || c.status == status::FAULT_DST {
        assert!(c.fault_addr >= d.src.min(d.dst), "fault address {:#x} below the buffers", c.fault_addr);
    }
});
