//! The watcher thread: notices the core going away (hang-up of its
//! sockets), drops the compat path, connects again with backoff and
//! rebuilds the compat IOAS from the client's table.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use iommu_core::sync;
use iommu_core::types::{MapArgs, Perm};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;

use super::table::{MapKind, Table};
use super::{session_err, Compat, Dma, Error};
use crate::proto;

/// First wait before connecting again to a core that went away.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between two attempts (the wait doubles up to it).
pub const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How long each call to a new core may take while the compat IOAS is
/// rebuilt.
const REBUILD_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// When one of the core's sockets hangs up, how long to wait for the
/// other to tell whether the whole core went away.
const HANGUP_GRACE: Duration = Duration::from_millis(200);

impl Dma {
    /// How many times the server reconnected to a core.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    pub(super) fn kick(&self) {
        let _ = self.wake.write(1);
    }

    /// Drops `c` if it is still the current compat path, once every DMA
    /// through it has ended. True if it was.
    pub(super) fn lose(&self, c: &Arc<Compat>, why: &str) -> bool {
        // DMA through `c` that waits for the client would hold the compat
        // lock (and the device thread behind it) until it timed out.
        let _fence = self.fence_client();
        let old = {
            let mut g = sync::write(&self.compat);
            match g.as_ref() {
                Some(cur) if Arc::ptr_eq(cur, c) => g.take(),
                _ => None,
            }
        };
        if old.is_some() {
            self.units_changed();
        }
        let Some(old) = old else { return false };
        tracing::warn!(
            "lost the core at {} (compat session {}, {why}): DMA_MAP with an fd fails with ENODEV and device DMA \
             through the compat IOAS fails until a core answers there again; reconnecting",
            self.core.display(),
            old.session_id
        );
        drop(old);
        true
    }

    /// Connects to the core again and rebuilds the compat path: the
    /// client's fd regions are mapped again at their IOVAs with their
    /// rights (a region the new core refuses stays in the table, unmapped,
    /// and is logged), DMA logging is turned on again if it was on. Returns
    /// the new path and how many regions were restored and refused.
    fn reconnect(&self) -> Result<(Arc<Compat>, usize, usize), Error> {
        // Only this thread reconnects; the number is taken when it works.
        let generation = self.generations.load(Ordering::Acquire) + 1;
        let c = Compat::open(
            &self.core,
            self.bind_args.clone(),
            generation,
            Some(REBUILD_CALL_TIMEOUT),
            &self.view,
            &self.client,
        )?;
        let mut t = sync::lock(&self.table);
        let Table { regions, files, .. } = &mut *t;
        let (mut restored, mut refused) = (0, 0);
        let mut ranges = Vec::new();
        for (&iova, r) in regions.iter_mut() {
            ranges.push((iova, iova + (r.size - 1)));
            if let MapKind::Client { mem, generation: g } = &mut r.kind {
                *g = 0;
                match self.map_client_memory(&c, iova, r.size, r.flags) {
                    Ok(id) => {
                        *mem = id;
                        *g = generation;
                        restored += 1;
                    }
                    Err(e @ Error::CoreGone(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(
                            "the new core refuses client memory of DMA region {iova:#x}+{:#x}: {e}; it stays in the \
                             table, unmapped (device DMA to it faults)",
                            r.size
                        );
                        refused += 1;
                    }
                }
                continue;
            }
            let MapKind::Fd { key, generation: g } = &mut r.kind else { continue };
            // Not in the new core until mapped there (an earlier attempt
            // may have marked it with this number).
            *g = 0;
            let Some(h) = files.get(key) else { continue };
            let known = sync::lock(&c.mems).get(key).copied();
            let mem = match known {
                Some(id) => id,
                None => match c.with_session(|s| s.register_memory(h.file.as_fd())).map_err(session_err) {
                    Ok(info) => {
                        sync::lock(&c.mems).insert(*key, info.id);
                        info.id
                    }
                    Err(e @ Error::CoreGone(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!("the new core refuses the file of DMA region {iova:#x}+{:#x}: {e}", r.size);
                        refused += 1;
                        continue;
                    }
                },
            };
            let perm = Perm { read: r.flags & proto::DMA_MAP_READ != 0, write: r.flags & proto::DMA_MAP_WRITE != 0 };
            let args = MapArgs { ioas: c.ioas, mem, offset: r.offset, length: r.size, iova: Some(iova), perm };
            match c.with_session(|s| s.map(args)).map_err(session_err) {
                Ok(_) => {
                    *g = generation;
                    restored += 1;
                }
                Err(e @ Error::CoreGone(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(
                        "the new core refuses DMA region {iova:#x}+{:#x}: {e}; it stays in the table, unmapped \
                         (device DMA to it faults)",
                        r.size
                    );
                    refused += 1;
                }
            }
        }
        if self.logging.load(Ordering::Acquire) {
            match c.with_session(|s| s.set_dirty_tracking(c.ioas, true)).map_err(session_err) {
                Ok(()) => {}
                Err(e @ Error::CoreGone(_)) => return Err(e),
                Err(e) => tracing::warn!("the new core refuses dirty tracking of the compat IOAS: {e}"),
            }
            // What the old core tracked and nobody asked for is lost: the
            // next report shows all of it dirty.
            *sync::lock(&self.unreported) = ranges;
        }
        c.settle()?;
        *sync::write(&self.compat) = Some(c.clone());
        self.units_changed();
        self.generations.store(generation, Ordering::Release);
        drop(t);
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        Ok((c, restored, refused))
    }
}

/// What woke the watcher.
#[derive(Default)]
struct Woken {
    /// The compat session or channel hung up.
    compat: bool,
    /// The binding's channel hung up.
    bound: bool,
}

/// Asked of a watched socket: nothing (a hang-up and an error are always
/// reported; its data is not the watcher's).
const HANGUP: PollFlags = PollFlags::empty();

/// The peer closed its end (a Unix stream socket whose peer closed shows
/// `POLLHUP`), or the socket failed.
fn hung_up(p: &PollFd<'_>) -> bool {
    p.revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL))
}

/// Waits (at most `timeout`) for the wake eventfd, or for a hang-up of the
/// compat path's sockets or of the binding's channel.
fn wait(wake: &EventFd, compat: Option<&Compat>, bound: Option<&OwnedFd>, timeout: PollTimeout) -> Woken {
    let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
    if let Some(c) = compat {
        fds.extend(c.watch.iter().map(|w| PollFd::new(w.as_fd(), HANGUP)));
    }
    let at_bound = fds.len();
    if let Some(b) = bound {
        fds.push(PollFd::new(b.as_fd(), HANGUP));
    }
    match nix::poll::poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Woken::default(),
        Err(e) => {
            tracing::warn!("the core watcher cannot poll: {e}");
            std::thread::sleep(RECONNECT_FIRST);
            return Woken::default();
        }
    }
    if fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
        let _ = wake.read();
    }
    Woken {
        compat: fds.get(1..at_bound).is_some_and(|s| s.iter().any(hung_up)),
        bound: bound.is_some() && fds.get(at_bound).is_some_and(hung_up),
    }
}

/// True if one of `fds` hangs up within `grace`.
fn hangs_up_within(fds: &[&OwnedFd], grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p: Vec<PollFd<'_>> = fds.iter().map(|f| PollFd::new(f.as_fd(), HANGUP)).collect();
        let t = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut p, t) {
            Ok(_) if p.iter().any(hung_up) => return true,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// The watcher thread: follows the core the compat path is connected to,
/// drops the path when the core goes away, reconnects with backoff and
/// drops an extension binding that went with its core. Holds the device's
/// [`Dma`] only between waits, and ends when it is gone.
pub(super) fn watch(dma: &Weak<Dma>, wake: &EventFd, stop: &AtomicBool) {
    let mut backoff = RECONNECT_FIRST;
    let mut lost_at: Option<Instant> = None;
    let mut last_failure = String::new();
    while !stop.load(Ordering::Acquire) {
        let Some(d) = dma.upgrade() else { return };
        match d.compat() {
            Some(c) if !c.broken.load(Ordering::Acquire) => {
                let bound = d.bound_watch();
                drop(d);
                let w = wait(wake, Some(&c), bound.as_deref(), PollTimeout::NONE);
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let Some(d) = dma.upgrade() else { return };
                // When the core dies every socket of it hangs up at once;
                // one alone means only that connection ended.
                let mut compat_gone = w.compat;
                let mut bound_gone = w.bound;
                if compat_gone && !bound_gone {
                    bound_gone = bound.as_deref().is_some_and(|b| hangs_up_within(&[b], HANGUP_GRACE));
                } else if bound_gone && !compat_gone {
                    let [s, ch] = &c.watch;
                    compat_gone = hangs_up_within(&[s, ch], HANGUP_GRACE);
                }
                if compat_gone && d.lose(&c, "the core closed the connection") {
                    lost_at = Some(Instant::now());
                    backoff = RECONNECT_FIRST;
                }
                if let Some(b) = bound.as_ref().filter(|_| bound_gone) {
                    d.binding_hung_up(b, compat_gone);
                }
            }
            Some(c) => {
                if d.lose(&c, "a call found the connection broken") {
                    lost_at = Some(Instant::now());
                    backoff = RECONNECT_FIRST;
                }
            }
            None => {
                let since = *lost_at.get_or_insert_with(Instant::now);
                match d.reconnect() {
                    Ok((c, restored, refused)) => {
                        tracing::info!(
                            "reconnected to the core at {} after {} ms without one: compat session {}, IOAS {}, {} \
                             DMA regions mapped again{}; the device is bound and its RID attached",
                            d.core.display(),
                            since.elapsed().as_millis(),
                            c.session_id,
                            c.ioas,
                            restored,
                            if refused > 0 { format!(", {refused} refused by the new core") } else { String::new() }
                        );
                        d.check_binding_core(c.core_pid);
                        lost_at = None;
                        backoff = RECONNECT_FIRST;
                        last_failure.clear();
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if msg != last_failure {
                            tracing::info!(
                                "no core answers at {} yet ({msg}); trying again, every {} ms at most",
                                d.core.display(),
                                RECONNECT_MAX.as_millis()
                            );
                            last_failure = msg;
                        }
                        let bound = d.bound_watch();
                        drop(d);
                        let t = PollTimeout::try_from(backoff).unwrap_or(PollTimeout::MAX);
                        let w = wait(wake, None, bound.as_deref(), t);
                        if let (true, Some(b), Some(d)) = (w.bound, bound.as_ref(), dma.upgrade()) {
                            // Without a core of our own it cannot be told
                            // whether its core lives: the reconnect decides.
                            d.binding_hung_up(b, false);
                        }
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
            }
        }
    }
}
