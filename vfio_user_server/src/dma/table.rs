//! The client's DMA_MAP table: regions mapped and unmapped in the compat
//! IOAS, the files they came from (held open), and client memory objects.
//!
//! A file's registration in the core outlives its last region for a while:
//! a client that maps and unmaps the same file again and again (a guest's
//! bounce buffers, a VMM's hot-plugged RAM) pays one round trip to the core
//! per DMA_MAP, not two, and one per DMA_UNMAP, not two. Up to
//! [`IDLE_FILES`] files without a region stay registered (and open), the
//! oldest released first; all go with an unmap-all (the client's
//! disconnect). A cached registration is used again only for the same file
//! (device and inode) with the size and seals it had when registered (and,
//! for a writable map, made through a writable fd), and only after the new
//! fd passed every check a first DMA_MAP makes; otherwise it is released
//! and the file registered anew.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use iommu_core::memfd;
use iommu_core::sync;
use iommu_core::types::{MapArgs, Perm};
use nix::fcntl::SealFlag;

use super::{Compat, Dma, Error};
use crate::proto;

/// A file of a DMA_MAP: `(st_dev, st_ino)`.
pub(super) type FileKey = (u64, u64);

pub(super) enum MapKind {
    /// Mapped in the compat IOAS of connection `generation` (if that
    /// connection is the current one, the core holds the mapping).
    Fd { key: FileKey, generation: u64 },
    /// Client memory (no fd): memory object `mem` of the compat session
    /// of connection `generation`, mapped there.
    Client { mem: u32, generation: u64 },
}

pub(super) struct ClientMap {
    pub(super) size: u64,
    pub(super) flags: u32,
    pub(super) offset: u64,
    pub(super) kind: MapKind,
}

/// A file a DMA_MAP gave, kept open to map it again in a new core.
pub(super) struct HeldFile {
    pub(super) file: File,
    refs: u32,
    /// Its size and seals when it was first held (its registration's).
    size: u64,
    seals: Option<SealFlag>,
    /// Whether its fd may map the file writable.
    writable: bool,
}

/// The client's DMA table.
#[derive(Default)]
pub(super) struct Table {
    pub(super) regions: BTreeMap<u64, ClientMap>,
    pub(super) files: HashMap<FileKey, HeldFile>,
    /// Files no region uses any more, kept registered, oldest first.
    idle: VecDeque<FileKey>,
}

/// Most files the DMA table keeps registered without a region.
pub const IDLE_FILES: usize = 8;

/// Client memory objects start on this boundary (see
/// `Dma::map_client_memory`).
const CLIENT_OBJECT_ALIGN: u64 = 2 << 20;

/// Highest IOVA the core maps (48 bits).
const MAX_IOVA: u64 = (1 << 48) - 1;

/// Limits of the DMA table.
pub const MAX_DMA_MAPS: usize = 65535;
/// Most distinct files the DMA table keeps open (fewer if half the
/// process's open-file limit is lower).
pub const MAX_DMA_FILES: usize = 4096;

pub(super) fn file_limit() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    usize::try_from(soft / 2).unwrap_or(MAX_DMA_FILES).clamp(16, MAX_DMA_FILES)
}

impl Dma {
    /// Handles DMA_MAP. `fd` is the passed file, if any.
    pub fn map(&self, m: &proto::DmaMap, fd: Option<OwnedFd>) -> Result<(), Error> {
        if m.flags & !(proto::DMA_MAP_READ | proto::DMA_MAP_WRITE) != 0 {
            return Err(Error::UnknownFlags(m.flags));
        }
        if m.flags == 0 {
            return Err(Error::NoAccess);
        }
        if m.size == 0 {
            return Err(Error::EmptyRegion);
        }
        let last = m.address.checked_add(m.size - 1).ok_or(Error::Overflow(m.address, m.size))?;
        let mut t = sync::lock(&self.table);
        if t.regions.len() >= MAX_DMA_MAPS {
            return Err(Error::Limit(format!("at most {MAX_DMA_MAPS} DMA regions")));
        }
        if let Some((&a, r)) = t.regions.range(..=last).next_back() {
            if a + (r.size - 1) >= m.address {
                return Err(Error::Exists(m.address, m.size));
            }
        }
        const PAGE: u64 = 4096;
        let Some(fd) = fd else {
            if !m.address.is_multiple_of(PAGE) || !m.size.is_multiple_of(PAGE) {
                return Err(Error::Unaligned(m.address, m.size, m.offset));
            }
            if last > MAX_IOVA {
                return Err(Error::BeyondIova(m.address, m.size));
            }
            let Some(c) = self.compat() else { return Err(self.core_gone()) };
            let mem = self.map_client_memory(&c, m.address, m.size, m.flags)?;
            let kind = MapKind::Client { mem, generation: c.generation };
            t.regions.insert(m.address, ClientMap { size: m.size, flags: m.flags, offset: m.offset, kind });
            self.client_regions.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        };
        if !m.address.is_multiple_of(PAGE) || !m.size.is_multiple_of(PAGE) || !m.offset.is_multiple_of(PAGE) {
            return Err(Error::Unaligned(m.address, m.size, m.offset));
        }
        // Before anything asks the file's file system (stat included): a
        // file of a stalled FUSE server would stall the device thread.
        let checked = memfd::check_memory_fd(fd.as_fd()).and_then(|()| {
            if m.flags & proto::DMA_MAP_WRITE != 0 {
                // The kernel refuses a writable pin of read-only memory: a
                // device write could never land.
                memfd::check_writable(fd.as_fd())
            } else {
                Ok(())
            }
        });
        if let Err(why) = checked {
            memfd::close_elsewhere(fd);
            return Err(Error::Refused(why));
        }
        let file = File::from(fd);
        let md = file.metadata().map_err(Error::Stat)?;
        if m.offset.checked_add(m.size).is_none_or(|end| end > md.len()) {
            return Err(Error::PastFileEnd { address: m.address, size: m.size, offset: m.offset, file_len: md.len() });
        }
        let key = (md.dev(), md.ino());
        let Some(c) = self.compat() else { return Err(self.core_gone()) };
        let seals = memfd::seals(file.as_fd());
        // A cached registration of a file that changed since (grown, more
        // seals) is not used again.
        // Nor one made through a read-only fd for a writable map.
        let write = m.flags & proto::DMA_MAP_WRITE != 0;
        let stale = t
            .files
            .get(&key)
            .is_some_and(|h| h.refs == 0 && (h.size != md.len() || h.seals != seals || (write && !h.writable)));
        if stale {
            self.release_file(&mut t, key, Some(&c));
        }
        if !t.files.contains_key(&key) && t.files.len() >= self.max_files {
            // Room for the new file first from the registrations kept idle.
            if let Some(old) = t.idle.front().copied() {
                self.release_file(&mut t, old, Some(&c));
            }
        }
        let held = t.files.contains_key(&key);
        if !held && t.files.len() >= self.max_files {
            return Err(Error::Limit(format!("at most {} distinct files in the DMA table", self.max_files)));
        }
        let known = sync::lock(&c.mems).get(&key).copied();
        let (mem, fresh) = match known {
            Some(id) => (id, false),
            None => {
                let f = t.files.get(&key).map_or(&file, |h| &h.file);
                let info = self.call(&c, |s| s.register_memory(f.as_fd()))?;
                sync::lock(&c.mems).insert(key, info.id);
                (info.id, true)
            }
        };
        let perm = Perm { read: m.flags & proto::DMA_MAP_READ != 0, write: m.flags & proto::DMA_MAP_WRITE != 0 };
        let args = MapArgs { ioas: c.ioas, mem, offset: m.offset, length: m.size, iova: Some(m.address), perm };
        if let Err(e) = self.call(&c, |s| s.map(args)) {
            if fresh {
                sync::lock(&c.mems).remove(&key);
                if !matches!(e, Error::CoreGone(_)) {
                    // Destroying an object has the core invalidate.
                    let _fence = self.fence_if_client_memory();
                    if let Err(d) = self.call(&c, |s| s.destroy(mem)) {
                        tracing::warn!("could not free memory object {mem} of the compat session: {d}");
                    }
                }
            }
            return Err(e);
        }
        let t = &mut *t;
        match t.files.get_mut(&key) {
            Some(h) => {
                if h.refs == 0 {
                    t.idle.retain(|k| *k != key);
                }
                h.refs += 1;
            }
            None => {
                let writable = write || memfd::check_writable(file.as_fd()).is_ok();
                // Its seals now: the core seals a file against shrinking
                // when it registers it.
                let seals = memfd::seals(file.as_fd());
                t.files.insert(key, HeldFile { file, refs: 1, size: md.len(), seals, writable });
            }
        }
        let kind = MapKind::Fd { key, generation: c.generation };
        t.regions.insert(m.address, ClientMap { size: m.size, flags: m.flags, offset: m.offset, kind });
        Ok(())
    }

    /// Registers `size` bytes of client memory at the client's `address` in
    /// the compat session of `c` and maps them at IOVA `address` with the
    /// rights of `flags`; returns the memory object.
    pub(super) fn map_client_memory(&self, c: &Arc<Compat>, address: u64, size: u64, flags: u32) -> Result<u32, Error> {
        let perm = Perm { read: flags & proto::DMA_MAP_READ != 0, write: flags & proto::DMA_MAP_WRITE != 0 };
        // The object starts at the 2 MiB boundary at or below the region,
        // so that IOVA and system address agree modulo 2 MiB and the core
        // maps the region with 2 MiB leaves where it can (one translation,
        // and one message, per 64 KiB step instead of sixteen). The bytes
        // before the region are never mapped.
        let lead = address % CLIENT_OBJECT_ALIGN;
        let total = size.checked_add(lead).ok_or(Error::Overflow(address, size))?;
        let mem = self.call(c, |s| s.register_client_memory(total, perm.write, address - lead))?.id;
        let args = MapArgs { ioas: c.ioas, mem, offset: lead, length: size, iova: Some(address), perm };
        if let Err(e) = self.call(c, |s| s.map(args)) {
            if !matches!(e, Error::CoreGone(_)) {
                // Destroying an object has the core invalidate.
                let _fence = self.fence_client();
                if let Err(d) = self.call(c, |s| s.destroy(mem)) {
                    tracing::warn!("could not free client memory object {mem} of the compat session: {d}");
                }
            }
            return Err(e);
        }
        Ok(mem)
    }

    /// One region less of file `key`: after the last one the file stays
    /// registered as idle (see the module doc), the oldest idle file
    /// released past [`IDLE_FILES`].
    fn file_put(&self, t: &mut Table, key: FileKey, c: Option<&Arc<Compat>>) {
        let Some(h) = t.files.get_mut(&key) else { return };
        h.refs = h.refs.saturating_sub(1);
        if h.refs > 0 {
            return;
        }
        t.idle.push_back(key);
        while t.idle.len() > IDLE_FILES {
            let Some(old) = t.idle.front().copied() else { break };
            self.release_file(t, old, c);
        }
    }

    /// Closes file `key`, which no region uses, and frees its memory
    /// object in the core of `c`.
    fn release_file(&self, t: &mut Table, key: FileKey, c: Option<&Arc<Compat>>) {
        t.idle.retain(|k| *k != key);
        if t.files.get(&key).is_none_or(|h| h.refs > 0) {
            return;
        }
        // A file that passed check_memory_fd: closing it cannot block.
        t.files.remove(&key);
        let Some(c) = c else { return };
        let Some(id) = sync::lock(&c.mems).remove(&key) else { return };
        if let Err(e) = self.call(c, |s| s.destroy(id)) {
            tracing::warn!("could not free memory object {id} of the compat session: {e}");
        }
    }

    /// Handles DMA_UNMAP: an exact match, or everything with `all`.
    pub fn unmap(&self, address: u64, size: u64, all: bool) -> Result<(), Error> {
        let pick = |maps: &BTreeMap<u64, ClientMap>| -> Result<Vec<u64>, Error> {
            if all {
                return Ok(maps.keys().copied().collect());
            }
            match maps.get(&address) {
                Some(r) if r.size == size => Ok(vec![address]),
                _ => Err(Error::NotFound(address, size)),
            }
        };
        // The core answers the unmap once DMA in flight has ended; DMA
        // waiting for the client cannot end while the client waits for
        // this reply.
        let _fence = self.fence_if_client_memory();
        let mut t = sync::lock(&self.table);
        let victims = pick(&t.regions)?;
        // No new compat path appears while the table is locked (the watcher
        // installs one under it).
        let mut link = self.compat();
        let mut first_err = None;
        for a in victims {
            let Some(r) = t.regions.get(&a) else { continue };
            let rsize = r.size;
            let (file, generation) = match r.kind {
                MapKind::Fd { key, generation } => (Some(key), generation),
                MapKind::Client { generation, .. } => (None, generation),
            };
            // In the core only if mapped through the current connection;
            // otherwise it went with the core that held it.
            if let Some(c) = link.clone().filter(|c| c.generation == generation) {
                // The core completes the unmap only after the translation
                // unit has dropped its IOTLB entries and in-flight DMA ended.
                match self.call(&c, |s| s.unmap(c.ioas, a, rsize)) {
                    Ok(_) => {}
                    Err(Error::CoreGone(why)) => {
                        // The mapping went with the core; once no DMA runs
                        // through the old connection the region can go.
                        self.lose(&c, &why);
                        link = None;
                    }
                    Err(e) => {
                        tracing::warn!("unmap of {a:#x}+{rsize:#x} in the compat IOAS failed: {e}");
                        first_err.get_or_insert(e);
                        continue;
                    }
                }
            }
            match t.regions.remove(&a).map(|r| r.kind) {
                Some(MapKind::Client { mem, generation }) => {
                    self.client_regions.fetch_sub(1, Ordering::AcqRel);
                    if let Some(c) = link.as_ref().filter(|c| c.generation == generation) {
                        if let Err(e) = self.call(c, |s| s.destroy(mem)) {
                            tracing::warn!("could not free client memory object {mem} of the compat session: {e}");
                        }
                    }
                }
                _ => {
                    if let Some(key) = file {
                        self.file_put(&mut t, key, link.as_ref());
                    }
                }
            }
        }
        if all {
            // The client is done with its files (an unmap-all, its
            // disconnect): no registration is kept for it.
            while let Some(key) = t.idle.front().copied() {
                self.release_file(&mut t, key, link.as_ref());
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Number of client DMA regions.
    pub fn map_count(&self) -> usize {
        sync::lock(&self.table).regions.len()
    }

    /// Number of files the DMA table's regions come from (each kept open).
    pub fn file_count(&self) -> usize {
        let t = sync::lock(&self.table);
        t.files.len() - t.idle.len()
    }

    /// Number of files kept open and registered with no region (at most
    /// [`IDLE_FILES`]; none after an unmap-all).
    pub fn idle_file_count(&self) -> usize {
        sync::lock(&self.table).idle.len()
    }
}
