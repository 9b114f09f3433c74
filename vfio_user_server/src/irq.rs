//! Interrupts: the IRQ indexes of a PCI function (INTx, MSI, MSI-X, ERR,
//! REQ), the eventfds a client assigns with SET_IRQS, mask and pending
//! state, and the MSI-X table and PBA storage.
//!
//! A device raises an interrupt with [`Irqs::trigger`] (or
//! [`Irqs::notify`], which picks MSI-X, then MSI, then INTx, whichever the
//! client wired). A masked vector becomes pending and fires on unmask.
//! INTx is automasked, as in VFIO: after firing it stays masked until the
//! client unmasks it (NONE|UNMASK, or a signal on the UNMASK eventfd, which
//! is how KVM's resample eventfd reports an EOI).
//!
//! The function's own gates hold delivery back without losing it: while
//! the command register's Interrupt Disable bit is set INTx is not
//! signalled, and while the function is in D3hot nothing is; what was
//! raised meanwhile stays pending and fires when the gate opens. The INTx
//! line level is kept here (the config space's Interrupt Status bit shows
//! it, whatever the gates say).
//!
//! MSI-X masking is done by the client (QEMU swaps eventfds), so the table
//! in the BAR is plain storage and never gates delivery; the PBA shows
//! vectors pending behind a SET_IRQS mask.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use iommu_core::sync;

use crate::proto::{self, irq_index};

/// Errors of interrupt configuration, each mapped to the errno a client sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Unknown index, bad flag combination, range or data size.
    #[error("invalid SET_IRQS request: {0}")]
    Invalid(&'static str),
    /// An fd that is not an eventfd.
    #[error("fd {0} is not an eventfd")]
    NotEventfd(i32),
    /// Creating the watcher failed.
    #[error("cannot start the eventfd watcher: {0}")]
    Watcher(String),
}

impl Error {
    /// errno for the wire.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Invalid(_) | Error::NotEventfd(_) => libc::EINVAL,
            Error::Watcher(_) => libc::ENOMEM,
        }
    }
}

/// Vectors per index of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqLayout {
    /// INTx pin present.
    pub intx: bool,
    /// MSI vectors (0 = none).
    pub msi: u32,
    /// MSI-X vectors (0 = none).
    pub msix: u32,
}

impl IrqLayout {
    /// Vectors of `index`.
    pub fn count(&self, index: u32) -> u32 {
        match index {
            irq_index::INTX => u32::from(self.intx),
            irq_index::MSI => self.msi,
            irq_index::MSIX => self.msix,
            irq_index::ERR | irq_index::REQ => 1,
            _ => 0,
        }
    }

    /// GET_IRQ_INFO flags of `index`.
    pub fn flags(&self, index: u32) -> u32 {
        use proto::*;
        match index {
            irq_index::INTX => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            irq_index::MSI => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
            irq_index::MSIX => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
            _ => IRQ_INFO_EVENTFD,
        }
    }
}

#[derive(Default)]
struct Vector {
    trigger: Option<File>,
    mask_fd: Option<Arc<File>>,
    unmask_fd: Option<Arc<File>>,
    masked: bool,
    pending: bool,
}

struct State {
    vectors: Vec<Vec<Vector>>,
    intx_level: bool,
    /// Command register bit 10: INTx is never signalled while set.
    intx_disabled: bool,
    /// The function is in D3hot: nothing is signalled.
    quiesced: bool,
    watcher: Option<Watcher>,
}

/// Interrupt state of one device, shared by the protocol worker and the
/// device's threads.
pub struct Irqs {
    layout: IrqLayout,
    state: Mutex<State>,
    msix_table: Mutex<Vec<u8>>,
    fired: AtomicU64,
    self_ref: Mutex<std::sync::Weak<Irqs>>,
}

/// Which eventfd-driven action a watched fd performs.
#[derive(Clone, Copy)]
enum Action {
    Mask,
    Unmask,
}

struct Watcher {
    control: Arc<File>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = (&*self.control).write_all(&1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checks that `fd` is an eventfd (a pipe or socket could block a write)
/// and makes it non-blocking, so that neither a signal nor a drain can
/// block whatever the client does with the counter.
pub fn check_eventfd(fd: &OwnedFd) -> Result<(), Error> {
    let raw = fd.as_raw_fd();
    match std::fs::read_link(format!("/proc/self/fd/{raw}")) {
        Ok(p) if p.to_string_lossy() == "anon_inode:[eventfd]" => {}
        _ => return Err(Error::NotEventfd(raw)),
    }
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = fcntl(raw, FcntlArg::F_GETFL).map_err(|_| Error::NotEventfd(raw))?;
    fcntl(raw, FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK))
        .map_err(|_| Error::NotEventfd(raw))?;
    Ok(())
}

fn signal(f: &File) {
    // An eventfd write of 1 only fails if the counter would overflow,
    // and then the interrupt is already pending for the reader.
    let _ = (&*f).write(&1u64.to_ne_bytes());
}

/// Waits up to `timeout` for a (non-blocking) eventfd to be signalled and
/// returns its counter, or 0 if nothing came (clients and tests).
pub fn wait_eventfd(f: &File, timeout: std::time::Duration) -> u64 {
    let mut p = [nix::poll::PollFd::new(f.as_fd(), nix::poll::PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    if !matches!(nix::poll::poll(&mut p, nix::poll::PollTimeout::from(ms)), Ok(n) if n > 0) {
        return 0;
    }
    let mut b = [0u8; 8];
    match (&*f).read(&mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

/// Makes a new eventfd (for tests and IO fds).
pub fn eventfd() -> std::io::Result<File> {
    let fd = nix::sys::eventfd::EventFd::from_flags(
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
    )
    .map_err(std::io::Error::from)?;
    Ok(File::from(OwnedFd::from(fd)))
}

impl Irqs {
    /// Interrupt state for `layout`, everything unassigned and unmasked.
    pub fn new(layout: IrqLayout) -> Arc<Irqs> {
        let vectors = (0..irq_index::NUM).map(|i| (0..layout.count(i)).map(|_| Vector::default()).collect()).collect();
        let irqs = Arc::new(Irqs {
            layout,
            state: Mutex::new(State {
                vectors,
                intx_level: false,
                intx_disabled: false,
                quiesced: false,
                watcher: None,
            }),
            msix_table: Mutex::new(Self::msix_reset_table(layout.msix)),
            fired: AtomicU64::new(0),
            self_ref: Mutex::new(std::sync::Weak::new()),
        });
        *sync::lock(&irqs.self_ref) = Arc::downgrade(&irqs);
        irqs
    }

    fn msix_reset_table(n: u32) -> Vec<u8> {
        let mut t = vec![0u8; n as usize * 16];
        for e in t.chunks_mut(16) {
            // Vector control: masked at reset.
            e[12] = 1;
        }
        t
    }

    /// The layout.
    pub fn layout(&self) -> IrqLayout {
        self.layout
    }

    /// Interrupts delivered to eventfds so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    /// Whether any eventfd is assigned for `index`.
    pub fn wired(&self, index: u32) -> bool {
        let s = sync::lock(&self.state);
        s.vectors.get(index as usize).is_some_and(|v| v.iter().any(|x| x.trigger.is_some()))
    }

    /// Raises vector `v` of `index` (an edge; for INTx see [`Irqs::set_intx`]).
    pub fn trigger(&self, index: u32, v: u32) {
        Self::fire(&mut sync::lock(&self.state), index, v, &self.fired);
    }

    fn fire(s: &mut State, index: u32, v: u32, fired: &AtomicU64) {
        let held = s.quiesced || (index == irq_index::INTX && s.intx_disabled);
        let Some(vec) = s.vectors.get_mut(index as usize).and_then(|x| x.get_mut(v as usize)) else {
            return;
        };
        if vec.masked || held {
            vec.pending = true;
            return;
        }
        vec.pending = false;
        if let Some(f) = &vec.trigger {
            signal(f);
            fired.fetch_add(1, Ordering::Relaxed);
        }
        if index == irq_index::INTX {
            // INTx is automasked until the client unmasks it.
            vec.masked = true;
            if let Some(m) = &vec.mask_fd {
                signal(m);
            }
        }
    }

    /// Drives the INTx line level. Raising it fires once; the line stays
    /// pending and fires again on unmask while still raised.
    pub fn set_intx(&self, level: bool) {
        let mut s = sync::lock(&self.state);
        let was = s.intx_level;
        s.intx_level = level;
        if level && !was {
            Self::fire(&mut s, irq_index::INTX, 0, &self.fired);
        } else if !level {
            if let Some(v) = s.vectors[irq_index::INTX as usize].get_mut(0) {
                v.pending = false;
            }
        }
    }

    /// Whether [`Irqs::notify`] signals INTx: the client wired neither
    /// MSI-X nor MSI, and the function has an INTx pin.
    pub fn uses_intx(&self) -> bool {
        self.layout.intx && !self.wired(irq_index::MSIX) && !self.wired(irq_index::MSI)
    }

    /// The INTx line level (what the Status register's Interrupt Status
    /// bit shows).
    pub fn intx_level(&self) -> bool {
        sync::lock(&self.state).intx_level
    }

    /// Command register bit 10 (Interrupt Disable): while set, INTx is not
    /// signalled; clearing it signals a line still raised (or an edge
    /// raised meanwhile) unless the vector is masked.
    pub fn set_intx_disabled(&self, disabled: bool) {
        let mut s = sync::lock(&self.state);
        let was = std::mem::replace(&mut s.intx_disabled, disabled);
        if was && !disabled {
            Self::release(&mut s, irq_index::INTX, &self.fired);
        }
    }

    /// D3hot (`true`): nothing is signalled until D0 (`false`), when what
    /// became pending meanwhile fires.
    pub fn set_quiesced(&self, quiesced: bool) {
        let mut s = sync::lock(&self.state);
        let was = std::mem::replace(&mut s.quiesced, quiesced);
        if was && !quiesced {
            for index in 0..irq_index::NUM {
                Self::release(&mut s, index, &self.fired);
            }
        }
    }

    /// Fires the unmasked vectors of `index` that are pending (and INTx if
    /// its line is up) after a gate opened.
    fn release(s: &mut State, index: u32, fired: &AtomicU64) {
        let n = s.vectors.get(index as usize).map_or(0, Vec::len);
        for v in 0..n {
            let x = &s.vectors[index as usize][v];
            let due = x.pending || (index == irq_index::INTX && s.intx_level);
            if due && !x.masked {
                Self::fire(s, index, v as u32, fired);
            }
        }
    }

    /// Signals vector `v` on whatever the client wired: MSI-X, MSI, else
    /// INTx (as an edge that the device lowers again when acknowledged).
    /// With fewer MSI vectors wired than the device has (a guest enabled
    /// fewer with Multiple Message Enable), vector `v` goes to wired vector
    /// `v mod n`.
    pub fn notify(&self, v: u32) {
        let msi_wired = {
            let s = sync::lock(&self.state);
            s.vectors[irq_index::MSI as usize].iter().take_while(|x| x.trigger.is_some()).count() as u32
        };
        if self.wired(irq_index::MSIX) {
            self.trigger(irq_index::MSIX, v.min(self.layout.msix.saturating_sub(1)));
        } else if msi_wired > 0 {
            self.trigger(irq_index::MSI, v % msi_wired);
        } else if self.wired(irq_index::MSI) {
            self.trigger(irq_index::MSI, v.min(self.layout.msi.saturating_sub(1)));
        } else if self.layout.intx {
            let mut s = sync::lock(&self.state);
            s.intx_level = true;
            Self::fire(&mut s, irq_index::INTX, 0, &self.fired);
        }
    }

    fn set_masked(s: &mut State, index: u32, v: u32, masked: bool, fired: &AtomicU64) {
        let level = s.intx_level;
        let Some(vec) = s.vectors.get_mut(index as usize).and_then(|x| x.get_mut(v as usize)) else {
            return;
        };
        let was = vec.masked;
        vec.masked = masked;
        if masked && !was {
            if let Some(m) = &vec.mask_fd {
                signal(m);
            }
        }
        if !masked {
            if let Some(m) = vec.unmask_fd.as_ref().filter(|_| was) {
                // Unmask notifications for INTx come from the client; do
                // not echo them back.
                if index != irq_index::INTX {
                    signal(m);
                }
            }
            let refire = vec.pending || (index == irq_index::INTX && level);
            if refire {
                Self::fire(s, index, v, fired);
            }
        }
    }

    /// Whether vector `v` of `index` is masked / pending.
    pub fn vector_state(&self, index: u32, v: u32) -> Option<(bool, bool)> {
        let s = sync::lock(&self.state);
        s.vectors.get(index as usize)?.get(v as usize).map(|x| (x.masked, x.pending))
    }

    /// Applies a SET_IRQS request. `data` is what follows the fixed part.
    pub fn set_irqs(&self, req: &proto::IrqSet, data: &[u8], fds: Vec<OwnedFd>) -> Result<(), Error> {
        use proto::*;
        let index = req.index;
        if index >= irq_index::NUM {
            return Err(Error::Invalid("unknown IRQ index"));
        }
        let n = self.layout.count(index);
        let dt = req.flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
        let act = req.flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
        if req.flags & !0x3f != 0 || dt.count_ones() != 1 || act.count_ones() != 1 {
            return Err(Error::Invalid("flags must name exactly one DATA and one ACTION"));
        }
        let end = req.start.checked_add(req.count).ok_or(Error::Invalid("start + count overflows"))?;
        let disable_all = dt == IRQ_SET_DATA_NONE && act == IRQ_SET_ACTION_TRIGGER && req.count == 0 && req.start == 0;
        if !disable_all && (end > n || (req.count == 0 && dt != IRQ_SET_DATA_EVENTFD)) {
            return Err(Error::Invalid("vector range outside the index"));
        }
        if dt != IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            return Err(Error::Invalid("file descriptors sent without DATA_EVENTFD"));
        }
        if act != IRQ_SET_ACTION_TRIGGER && self.layout.flags(index) & IRQ_INFO_MASKABLE == 0 {
            return Err(Error::Invalid("MASK or UNMASK on an index that is not MASKABLE"));
        }
        let bools: Option<&[u8]> = if dt == IRQ_SET_DATA_BOOL {
            if data.len() != req.count as usize {
                return Err(Error::Invalid("DATA_BOOL needs exactly one byte per vector of count"));
            }
            Some(data)
        } else {
            None
        };
        if dt == IRQ_SET_DATA_EVENTFD {
            if !fds.is_empty() && fds.len() != req.count as usize {
                return Err(Error::Invalid("number of eventfds differs from count"));
            }
            for f in &fds {
                check_eventfd(f)?;
            }
        }
        let mut s = sync::lock(&self.state);
        if disable_all {
            let mut old = Vec::new();
            for v in s.vectors[index as usize].iter_mut() {
                old.push(std::mem::take(v));
            }
            if index == irq_index::INTX {
                s.intx_level = false;
            }
            drop(s);
            drop(old);
            self.rewatch();
            return Ok(());
        }
        let selected = |i: u32| bools.is_none_or(|b| b[i as usize] != 0);
        match (dt, act) {
            (IRQ_SET_DATA_EVENTFD, _) => {
                let mut fds = fds.into_iter();
                for (i, v) in (req.start..end).enumerate() {
                    let f = fds.next().map(File::from);
                    let vec = &mut s.vectors[index as usize][v as usize];
                    match act {
                        IRQ_SET_ACTION_TRIGGER => {
                            vec.trigger = f;
                            // A pending interrupt goes to the new eventfd.
                            if vec.trigger.is_some() && vec.pending && !vec.masked {
                                Self::fire(&mut s, index, v, &self.fired);
                            }
                        }
                        IRQ_SET_ACTION_MASK => vec.mask_fd = f.map(Arc::new),
                        _ => vec.unmask_fd = f.map(Arc::new),
                    }
                    let _ = i;
                }
                drop(s);
                if act != IRQ_SET_ACTION_TRIGGER {
                    self.rewatch();
                }
            }
            (_, IRQ_SET_ACTION_TRIGGER) => {
                for v in (req.start..end).filter(|&v| selected(v - req.start)) {
                    Self::fire(&mut s, index, v, &self.fired);
                }
            }
            (_, a) => {
                for v in (req.start..end).filter(|&v| selected(v - req.start)) {
                    Self::set_masked(&mut s, index, v, a == IRQ_SET_ACTION_MASK, &self.fired);
                }
            }
        }
        Ok(())
    }

    /// Drops every eventfd and all mask state (client disconnect).
    pub fn clear(&self) {
        let watcher = {
            let mut s = sync::lock(&self.state);
            for v in s.vectors.iter_mut().flatten() {
                *v = Vector::default();
            }
            s.intx_level = false;
            s.watcher.take()
        };
        // Joining the watcher happens without the lock it may be waiting for.
        drop(watcher);
    }

    /// Device reset: mask state and pending bits go, eventfds stay (the
    /// client disables them itself), the MSI-X table returns to masked.
    pub fn reset(&self) {
        {
            let mut s = sync::lock(&self.state);
            for v in s.vectors.iter_mut().flatten() {
                v.masked = false;
                v.pending = false;
            }
            s.intx_level = false;
            // The command register and the power state are back at 0 / D0.
            s.intx_disabled = false;
            s.quiesced = false;
        }
        *sync::lock(&self.msix_table) = Self::msix_reset_table(self.layout.msix);
    }

    /// Reads the MSI-X table (`pba` false) or PBA (`pba` true).
    pub fn msix_read(&self, pba: bool, offset: u64, buf: &mut [u8]) -> bool {
        if pba {
            let mut bits = vec![0u8; (self.layout.msix as usize).div_ceil(64) * 8];
            let s = sync::lock(&self.state);
            for (i, v) in s.vectors[irq_index::MSIX as usize].iter().enumerate() {
                if v.pending {
                    bits[i / 8] |= 1 << (i % 8);
                }
            }
            drop(s);
            return copy_out(&bits, offset, buf);
        }
        copy_out(&sync::lock(&self.msix_table), offset, buf)
    }

    /// Writes the MSI-X table (the PBA is read-only).
    pub fn msix_write(&self, pba: bool, offset: u64, data: &[u8]) -> bool {
        if pba {
            return true;
        }
        let mut t = sync::lock(&self.msix_table);
        let Some(r) = usize::try_from(offset).ok().and_then(|o| Some(o..o.checked_add(data.len())?)) else {
            return false;
        };
        match t.get_mut(r) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// The MSI-X table bytes (for migration).
    pub fn msix_table(&self) -> Vec<u8> {
        sync::lock(&self.msix_table).clone()
    }

    /// Restores the MSI-X table bytes.
    pub fn set_msix_table(&self, bytes: &[u8]) -> bool {
        let mut t = sync::lock(&self.msix_table);
        if t.len() != bytes.len() {
            return false;
        }
        t.copy_from_slice(bytes);
        true
    }

    fn rewatch(&self) {
        let weak = sync::lock(&self.self_ref).clone();
        let old = sync::lock(&self.state).watcher.take();
        // The old watcher may be waiting for the state lock: join it without.
        drop(old);
        let mut s = sync::lock(&self.state);
        let mut fds: Vec<(Arc<File>, u32, u32, Action)> = Vec::new();
        for (i, vs) in s.vectors.iter().enumerate() {
            for (v, x) in vs.iter().enumerate() {
                if let Some(f) = &x.mask_fd {
                    fds.push((f.clone(), i as u32, v as u32, Action::Mask));
                }
                if let Some(f) = &x.unmask_fd {
                    fds.push((f.clone(), i as u32, v as u32, Action::Unmask));
                }
            }
        }
        if fds.is_empty() {
            return;
        }
        match spawn_watcher(weak, fds) {
            Ok(w) => s.watcher = Some(w),
            Err(e) => tracing::warn!("interrupt mask/unmask eventfds will not be watched: {e}"),
        }
    }
}

fn copy_out(src: &[u8], offset: u64, buf: &mut [u8]) -> bool {
    let Some(r) = usize::try_from(offset).ok().and_then(|o| Some(o..o.checked_add(buf.len())?)) else {
        return false;
    };
    match src.get(r) {
        Some(s) => {
            buf.copy_from_slice(s);
            true
        }
        None => false,
    }
}

fn spawn_watcher(irqs: std::sync::Weak<Irqs>, fds: Vec<(Arc<File>, u32, u32, Action)>) -> Result<Watcher, Error> {
    let control = Arc::new(eventfd().map_err(|e| Error::Watcher(e.to_string()))?);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c, st) = (control.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("irq-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 8];
            while !st.load(Ordering::Acquire) {
                let mut pfds: Vec<nix::poll::PollFd> =
                    fds.iter().map(|f| nix::poll::PollFd::new(f.0.as_fd(), nix::poll::PollFlags::POLLIN)).collect();
                pfds.push(nix::poll::PollFd::new(c.as_fd(), nix::poll::PollFlags::POLLIN));
                if nix::poll::poll(&mut pfds, nix::poll::PollTimeout::NONE).is_err() {
                    continue;
                }
                let ready: Vec<bool> = pfds.iter().map(|p| p.any().unwrap_or(false)).collect();
                drop(pfds);
                for (k, (f, index, v, a)) in fds.iter().enumerate() {
                    if !ready[k] {
                        continue;
                    }
                    // Drain the counter; an fd that cannot be read (not
                    // really an eventfd any more) is left alone.
                    if (&**f).read(&mut buf).is_err() {
                        continue;
                    }
                    let Some(strong) = irqs.upgrade() else { return };
                    Irqs::set_masked(
                        &mut sync::lock(&strong.state),
                        *index,
                        *v,
                        matches!(a, Action::Mask),
                        &strong.fired,
                    );
                }
                if ready[fds.len()] {
                    let _ = (&*c).read(&mut buf);
                }
            }
        })
        .map_err(|e| Error::Watcher(e.to_string()))?;
    Ok(Watcher { control, thread: Some(thread), stop })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    fn count(f: &File) -> u64 {
        let mut b = [0u8; 8];
        match (&*f).read(&mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    fn set(index: u32, flags: u32, start: u32, count: u32) -> IrqSet {
        IrqSet { argsz: 20, flags, index, start, count }
    }

    fn efd() -> (File, OwnedFd) {
        let f = eventfd().unwrap();
        let dup = f.try_clone().unwrap();
        (f, OwnedFd::from(dup))
    }

    #[test]
    fn eventfd_trigger_mask_and_pending() {
        let irqs = Irqs::new(IrqLayout { intx: true, msi: 1, msix: 4 });
        let (a, ao) = efd();
        let (b, bo) = efd();
        irqs.set_irqs(&set(2, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 1, 2), &[], vec![ao, bo]).unwrap();
        irqs.trigger(2, 1);
        irqs.trigger(2, 2);
        irqs.trigger(2, 2);
        assert_eq!((count(&a), count(&b)), (1, 2));
        // Mask vector 1 with BOOL data; a trigger becomes pending, shows in the PBA.
        irqs.set_irqs(&set(2, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK, 1, 2), &[1, 0], vec![]).unwrap();
        irqs.trigger(2, 1);
        assert_eq!(count(&a), 0);
        let mut pba = [0u8; 8];
        assert!(irqs.msix_read(true, 0, &mut pba));
        assert_eq!(pba[0], 0b10);
        irqs.set_irqs(&set(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 1, 1), &[], vec![]).unwrap();
        assert_eq!(count(&a), 1);
        // Client-injected trigger.
        irqs.set_irqs(&set(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 2, 1), &[], vec![]).unwrap();
        assert_eq!(count(&b), 1);
        // De-assign without fds, then disable the whole index.
        irqs.set_irqs(&set(2, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 1, 1), &[], vec![]).unwrap();
        irqs.trigger(2, 1);
        assert_eq!(count(&a), 0);
        irqs.set_irqs(&set(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0), &[], vec![]).unwrap();
        assert!(!irqs.wired(2));
    }

    #[test]
    fn intx_is_automasked_and_level_refires() {
        let irqs = Irqs::new(IrqLayout { intx: true, msi: 0, msix: 0 });
        let (a, ao) = efd();
        irqs.set_irqs(&set(0, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1), &[], vec![ao]).unwrap();
        irqs.set_intx(true);
        assert_eq!(count(&a), 1);
        assert_eq!(irqs.vector_state(0, 0), Some((true, false)));
        irqs.set_irqs(&set(0, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1), &[], vec![]).unwrap();
        assert_eq!(count(&a), 1, "still asserted: fires again on unmask");
        irqs.set_intx(false);
        irqs.set_irqs(&set(0, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1), &[], vec![]).unwrap();
        assert_eq!(count(&a), 0);
    }

    #[test]
    fn interrupt_disable_and_d3hot_hold_delivery_without_losing_it() {
        let irqs = Irqs::new(IrqLayout { intx: true, msi: 4, msix: 0 });
        let (a, ao) = efd();
        irqs.set_irqs(&set(0, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1), &[], vec![ao]).unwrap();
        irqs.set_intx_disabled(true);
        irqs.notify(0);
        assert_eq!(count(&a), 0, "INTx signalled with Interrupt Disable set");
        assert!(irqs.intx_level(), "the line is up whatever Interrupt Disable says");
        assert!(irqs.uses_intx());
        irqs.set_intx_disabled(false);
        assert_eq!(count(&a), 1, "the held INTx was lost");
        // Lowered while disabled: nothing fires on enable.
        irqs.set_intx(false);
        irqs.set_irqs(&set(0, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1), &[], vec![]).unwrap();
        irqs.set_intx_disabled(true);
        irqs.set_intx(true);
        irqs.set_intx(false);
        irqs.set_intx_disabled(false);
        assert_eq!(count(&a), 0);
        // MSI: two vectors wired of four; vector v goes to v mod 2, and D3hot
        // holds them until D0.
        let (m0, m0o) = efd();
        let (m1, m1o) = efd();
        irqs.set_irqs(&set(1, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 2), &[], vec![m0o, m1o]).unwrap();
        assert!(!irqs.uses_intx());
        irqs.notify(3);
        assert_eq!((count(&m0), count(&m1)), (0, 1));
        irqs.set_quiesced(true);
        irqs.notify(2);
        assert_eq!(count(&m0), 0, "an interrupt in D3hot");
        irqs.set_quiesced(false);
        assert_eq!(count(&m0), 1, "the interrupt held in D3hot was lost");
    }

    #[test]
    fn unmask_eventfd_is_watched() {
        let irqs = Irqs::new(IrqLayout { intx: true, msi: 0, msix: 0 });
        let (a, ao) = efd();
        let (r, ro) = efd();
        irqs.set_irqs(&set(0, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1), &[], vec![ao]).unwrap();
        irqs.set_irqs(&set(0, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, 0, 1), &[], vec![ro]).unwrap();
        irqs.set_intx(true);
        assert_eq!(count(&a), 1);
        // The "EOI": a signal on the resample eventfd unmasks; the line
        // is still up, so it fires again.
        signal(&r);
        let t0 = std::time::Instant::now();
        let mut got = 0;
        while got == 0 && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(2));
            got = count(&a);
        }
        assert_eq!(got, 1);
    }

    #[test]
    fn bad_requests_are_refused() {
        let irqs = Irqs::new(IrqLayout { intx: true, msi: 1, msix: 2 });
        let bad = |s: IrqSet, d: &[u8], f: Vec<OwnedFd>| irqs.set_irqs(&s, d, f).unwrap_err().errno();
        assert_eq!(bad(set(9, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 1), &[], vec![]), libc::EINVAL);
        assert_eq!(bad(set(2, IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 1), &[], vec![]), 22);
        assert_eq!(bad(set(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK, 0, 1), &[], vec![]), 22);
        assert_eq!(bad(set(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 1, 2), &[], vec![]), 22);
        assert_eq!(bad(set(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, u32::MAX, 2), &[], vec![]), 22);
        assert_eq!(bad(set(2, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 2), &[1], vec![]), 22);
        let (_a, ao) = efd();
        assert_eq!(bad(set(2, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 2), &[], vec![ao]), 22);
        // A pipe is not an eventfd.
        let (rd, _wr) = nix::unistd::pipe().unwrap();
        assert_eq!(bad(set(2, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1), &[], vec![rd]), 22);
    }
}
