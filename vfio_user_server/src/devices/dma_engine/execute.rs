//! Executing one descriptor: the operations in steps of at most [`STEP`]
//! bytes, each step asking whether to go on, stop with the progress kept
//! (bus mastering off, a migration stop) or give the work up (a reset, a
//! disable). Free of the device's state, so tests and fuzz targets run it
//! against memory of their own through [`DeviceDma`].

use std::cell::RefCell;

use iommu_core::types::FaultReason;
use serde::{Deserialize, Serialize};

use crate::dma::{self, DeviceDma, DmaSpace, Side};

use super::abi::{op, status, Completion, Descriptor, MAX_XFER};

/// How far a descriptor got before it was stopped (bus mastering cleared,
/// D3hot, or a migration stop): it goes on from here when the queue can
/// run again.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// Bytes finished (for a backward COPY, counted from the end).
    pub done: u32,
    /// CRC32C so far.
    pub crc: u32,
    /// The descriptor finished with this record, which could not be
    /// written yet.
    pub result: Option<Completion>,
}

/// What the next step of a descriptor may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Go on.
    Go,
    /// Stop here and keep the progress (the descriptor resumes later).
    Stop,
    /// The work is void (a reset, a queue disable, a departed client):
    /// stop here and forget it.
    Void,
}

/// How [`execute`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The descriptor finished; its record.
    Done(Completion),
    /// It was stopped; it resumes from this.
    Stopped(Progress),
    /// It was voided.
    Void,
}

/// Bytes of one DMA step: a reset, a bus-master disable or a stop waits
/// for at most one step of each queue.
pub const STEP: usize = 64 * 1024;

/// Executes one descriptor with the DMA of `dma`, from the start or from
/// `from`: every field is the guest's and is checked here. The
/// descriptor's route is resolved at each step (of at most [`STEP`]
/// bytes), and both buffers are reached through that space. Before each step (of at most [`STEP`] bytes) `step`
/// says whether to go on. A step refused because bus mastering is off
/// stops the descriptor as [`Step::Stop`] would.
pub fn execute<D: DeviceDma + ?Sized>(
    dma: &D,
    d: &Descriptor,
    from: Option<Progress>,
    step: &dyn Fn() -> Step,
) -> Outcome {
    let mut c = Completion::default();
    let route = match d.route() {
        Ok(r) => r,
        Err(s) => {
            c.status = s;
            return Outcome::Done(c);
        }
    };
    if d.len > MAX_XFER || (d.len == 0 && d.opcode != op::NOP) {
        c.status = status::INVALID;
        return Outcome::Done(c);
    }
    let start = from.unwrap_or(Progress { crc: d.pattern as u32, ..Progress::default() });
    let stopped = |done: usize, crc: u32| Outcome::Stopped(Progress { done: done as u32, crc, result: None });
    // Before each step: go on through the route as it resolves now (a
    // vPASID detached or attached meanwhile is seen), stop, or give up.
    let gate = |done: usize, crc: u32| match step() {
        Step::Go => Ok(dma.space(route)),
        Step::Stop => Err(stopped(done, crc)),
        Step::Void => Err(Outcome::Void),
    };
    macro_rules! next_step {
        ($done:expr, $crc:expr) => {
            match gate($done, $crc) {
                Ok(mem) => mem,
                Err(o) => return o,
            }
        };
    }
    // `second`: the fault is on the destination buffer (written by COPY and
    // FILL, read by COMPARE).
    let fail = |c: &mut Completion, e: dma::Error, at: u64, second: bool, write: bool| {
        c.fault_addr = at;
        c.status = match e {
            dma::Error::NoPasid(_) => {
                dma.space(route).report_fault(at, write, FaultReason::NotPresent);
                status::NO_PASID
            }
            dma::Error::Fault { iova, .. } => {
                c.fault_addr = iova;
                if second {
                    status::FAULT_DST
                } else {
                    status::FAULT_SRC
                }
            }
            _ if second => status::FAULT_DST,
            _ => status::FAULT_SRC,
        };
    };
    let off = |e: &dma::Error| e.stops_step();
    let len = d.len as usize;
    let mut done = (start.done as usize).min(len);
    // One DMA of a step: bus mastering off stops the descriptor here (it
    // resumes from `done`); any other failure ends it with its status.
    macro_rules! step_dma {
        ($dma:expr, $at:expr, $second:expr, $write:expr, $crc:expr) => {
            match $dma {
                Ok(()) => {}
                Err(e) if off(&e) => return stopped(done, $crc),
                Err(e) => {
                    fail(&mut c, e, $at, $second, $write);
                    break;
                }
            }
        };
    }
    // A destination is checked whole before the first byte is written (on
    // a resume, what is left of it: a backward COPY works from the end).
    if matches!(d.opcode, op::COPY | op::FILL) && done < len {
        let mem = next_step!(done, start.crc);
        let backward = d.opcode == op::COPY && d.dst > d.src && d.dst - d.src < len as u64;
        let rest = if backward { d.dst } else { d.dst.wrapping_add(done as u64) };
        match mem.check_write(rest, len - done) {
            Err(e) if off(&e) => return stopped(done, start.crc),
            Err(e) => {
                fail(&mut c, e, rest, true, true);
                c.bytes_done = done as u32;
                return Outcome::Done(c);
            }
            Ok(()) => {}
        }
    }
    match d.opcode {
        op::NOP => c.status = status::SUCCESS,
        op::COPY => {
            // Overlapping buffers (in the same address space) copy as
            // memmove does: backwards when the destination starts inside
            // the source, so every source byte is read before it is
            // overwritten (the copy of each step goes the same way).
            let backward = d.dst > d.src && d.dst - d.src < len as u64;
            while done < len {
                let n = (len - done).min(STEP);
                let at = if backward { len - done - n } else { done } as u64;
                let (s, t) = (d.src.wrapping_add(at), d.dst.wrapping_add(at));
                let mem = next_step!(done, 0);
                // Straight from one buffer to the other.
                match mem.copy_to(s, &mem, t, n) {
                    Ok(()) => {}
                    Err(e) if off(&e.error) => return stopped(done, 0),
                    Err(dma::CopyError { side: Side::Source, error }) => {
                        fail(&mut c, error, s, false, false);
                        break;
                    }
                    Err(dma::CopyError { side: Side::Destination, error }) => {
                        fail(&mut c, error, t, true, true);
                        break;
                    }
                }
                done += n;
            }
            c.bytes_done = done as u32;
            if done == len {
                c.status = status::SUCCESS;
            }
        }
        op::FILL => {
            while done < len {
                let n = (len - done).min(STEP);
                let t = d.dst.wrapping_add(done as u64);
                // Steps start at multiples of 8, so the pattern lines up.
                let mem = next_step!(done, 0);
                let r = with_pattern(d.pattern, n, |p| mem.write(t, p));
                step_dma!(r, t, true, true, 0);
                done += n;
            }
            c.bytes_done = done as u32;
            if done == len {
                c.status = status::SUCCESS;
            }
        }
        op::COMPARE => {
            c.status = status::SUCCESS;
            while done < len {
                let n = (len - done).min(STEP);
                let (s, t) = (d.src.wrapping_add(done as u64), d.dst.wrapping_add(done as u64));
                let mem = next_step!(done, 0);
                let r = with_scratch(2 * n, |buf| {
                    let (a, b) = buf.split_at_mut(n);
                    mem.read(s, a).map_err(|e| (e, s, false))?;
                    mem.read(t, b).map_err(|e| (e, t, true))?;
                    Ok(a.iter().zip(b.iter()).position(|(x, y)| x != y))
                });
                match r {
                    Ok(None) => done += n,
                    Ok(Some(i)) => {
                        c.status = status::MISMATCH;
                        c.result = (done + i) as u64;
                        done += i;
                        break;
                    }
                    Err((e, _, _)) if off(&e) => return stopped(done, 0),
                    Err((e, at, second)) => {
                        fail(&mut c, e, at, second, false);
                        break;
                    }
                }
            }
            c.bytes_done = done as u32;
        }
        op::CRC32C => {
            let mut crc = start.crc;
            while done < len {
                let n = (len - done).min(STEP);
                let s = d.src.wrapping_add(done as u64);
                let mem = next_step!(done, crc);
                let r = with_scratch(n, |buf| {
                    mem.read(s, buf)?;
                    Ok(crc32c::crc32c_append(crc, buf))
                });
                match r {
                    Ok(v) => crc = v,
                    Err(e) if off(&e) => return stopped(done, crc),
                    Err(e) => {
                        fail(&mut c, e, s, false, false);
                        break;
                    }
                }
                done += n;
            }
            c.bytes_done = done as u32;
            if done == len {
                c.status = status::SUCCESS;
                c.result = u64::from(crc);
            }
        }
        _ => c.status = status::INVALID,
    }
    Outcome::Done(c)
}

thread_local! {
    /// A queue thread's buffer for the bytes COMPARE and CRC32C read
    /// (at most two steps), kept from one descriptor to the next.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// A queue thread's FILL source: one step of a pattern, and which.
    static PATTERN: RefCell<(u64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
}

/// Runs `f` over `n` bytes of this thread's scratch buffer (grown once to
/// the largest asked, at most two steps).
fn with_scratch<T>(n: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    // Taken out while in use: a nested use (none today) gets a buffer of
    // its own instead of a borrow error.
    let mut v = SCRATCH.take();
    if v.len() < n {
        v.resize(n, 0);
    }
    let r = f(&mut v[..n]);
    SCRATCH.set(v);
    r
}

/// Runs `f` over `n` bytes (at most a step) of `pattern` repeated from its
/// first byte, made once per pattern on each thread.
fn with_pattern<T>(pattern: u64, n: usize, f: impl FnOnce(&[u8]) -> T) -> T {
    let (mut have, mut v) = PATTERN.take();
    if have != pattern || v.len() < n {
        let p = pattern.to_le_bytes();
        v.clear();
        v.extend((0..STEP.max(n)).map(|i| p[i % 8]));
        have = pattern;
    }
    let r = f(&v[..n]);
    PATTERN.set((have, v));
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_matches_the_known_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }
}
