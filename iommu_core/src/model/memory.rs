//! Memory objects: a file the session passed (memfd, tmpfs or hugetlbfs), or
//! client memory without an fd; each placed in the system address space and
//! charged to its session.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

use super::{err, Core, Error, Object, Result};
use crate::errno::Errno;
use crate::memfd;
use crate::pagetable::{self, PAGE_SIZE};
use crate::types::*;

/// A memory object as a device channel reaches it ([`Core::memory_at`]).
#[derive(Debug)]
pub enum MemoryAt<'a> {
    /// Backed by a file, which the channel gets a duplicate of.
    File {
        /// Base in the system address space.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// Sealed against shrinking.
        sealed: bool,
        /// The file.
        file: &'a File,
    },
    /// Client memory: no fd; the device server reaches it through its
    /// client at `address` onwards.
    Client {
        /// Base in the system address space.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// The client's address of byte 0.
        address: u64,
    },
}

/// What holds a memory object's bytes.
#[derive(Debug)]
pub(super) enum Backing {
    /// A file the session passed (memfd, tmpfs or hugetlbfs).
    File(File),
    /// The memory of the owning device server's client, reached by the
    /// device server alone (vfio-user DMA_READ/DMA_WRITE); `address` is
    /// the client's address of byte 0.
    Client { address: u64 },
}

#[derive(Debug)]
pub(super) struct MemObj {
    pub(super) backing: Backing,
    pub(super) size: u64,
    pub(super) sealed: bool,
    /// Opened read-write and not sealed against writes: only then may a
    /// mapping of it allow device writes.
    pub(super) writable: bool,
    pub(super) sys_base: u64,
    pub(super) sys_len: u64,
    pub(super) refs: u32,
}

impl Core {
    /// Registers a memory object from `fd`.
    pub fn register_memory(&mut self, sid: u64, fd: OwnedFd) -> Result<MemInfo> {
        let file = File::from(fd);
        // Before anything asks the file's file system (stat included).
        if let Err(why) = memfd::check_memory_fd(file.as_fd()) {
            memfd::close_elsewhere(file.into());
            let errno = if why.errno() == libc::EACCES { Errno::EACCES } else { Errno::EINVAL };
            return err(errno, format!("not a memory object: {why}"));
        }
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => return err(Errno::EBADF, format!("cannot stat the file: {e}")),
        };
        let ft = meta.file_type();
        if !ft.is_file() || ft.is_socket() {
            return err(Errno::EINVAL, "a memory object must be a regular file (memfd, tmpfs or hugetlbfs)");
        }
        // Seal before the size is read: a client that shrinks the file
        // between the two must not get an object recorded larger than its
        // file. A refused registration keeps the seal (the kernel has no
        // way to remove one).
        let sealed = memfd::seal_shrink(file.as_fd());
        let size = match file.metadata() {
            Ok(m) => m.len(),
            Err(e) => return err(Errno::EBADF, format!("cannot stat the file: {e}")),
        };
        if size == 0 {
            return err(Errno::EINVAL, "the file is empty");
        }
        let seals = memfd::seal_names(memfd::seals(file.as_fd()));
        let writable = memfd::check_writable(file.as_fd()).is_ok();
        let (id, sys_base) = self.add_memory(sid, size, sealed, writable, Backing::File(file))?;
        if !sealed {
            tracing::warn!(session = sid, id, "memory object cannot be sealed; devices must access it without mmap");
        }
        Ok(MemInfo { id, size, sealed, seals, system_address: sys_base, mappings: 0, client_address: None })
    }

    /// Registers client memory: `size` bytes that the session's device
    /// servers reach through their own client, never by mapping them.
    /// `writable` says whether a mapping may allow device writes; `address`
    /// is the client's address of byte 0, kept for channels and observers.
    /// It counts against the session's memory limit like any object.
    pub fn register_client_memory(&mut self, sid: u64, size: u64, writable: bool, address: u64) -> Result<MemInfo> {
        if size == 0 {
            return err(Errno::EINVAL, "client memory of size 0");
        }
        let (id, sys_base) = self.add_memory(sid, size, true, writable, Backing::Client { address })?;
        Ok(MemInfo {
            id,
            size,
            sealed: true,
            seals: "none".into(),
            system_address: sys_base,
            mappings: 0,
            client_address: Some(address),
        })
    }

    /// Places a memory object of `size` bytes (not 0) in the system
    /// address space and gives it to the session: its id and base.
    fn add_memory(
        &mut self,
        sid: u64,
        size: u64,
        sealed: bool,
        writable: bool,
        backing: Backing,
    ) -> Result<(u32, u64)> {
        if !size.is_multiple_of(PAGE_SIZE) {
            return err(Errno::EINVAL, format!("size {size:#x} is not a multiple of 4 KiB"));
        }
        if size > pagetable::MAX_ADDRESS / 2 {
            return err(Errno::E2BIG, format!("size {size:#x} does not fit the system address space"));
        }
        self.charge_memory(sid, size)?;
        let id = self.new_id(sid)?;
        self.step()?;
        let (sys_base, sys_len) = self
            .sys
            .alloc(size)
            .ok_or_else(|| Error { errno: Errno::ENOSPC, message: "the system address space is full".into() })?;
        self.sys_owner.insert(sys_base, (sid, id));
        let obj = MemObj { backing, size, sealed, writable, sys_base, sys_len, refs: 0 };
        self.insert_object(sid, id, Object::Memory(obj))?;
        Ok((id, sys_base))
    }

    /// Fails if the session would hold more than its memory limit with
    /// `size` more bytes of memory objects.
    fn charge_memory(&mut self, sid: u64, size: u64) -> Result<()> {
        let held: u64 =
            self.session(sid)?.objects.values().map(|o| if let Object::Memory(m) = o { m.size } else { 0 }).sum();
        let cap = self.limits.max_memory_bytes_per_session;
        if held.saturating_add(size) > cap {
            return err(
                Errno::ENOSPC,
                format!("the session would hold more than {cap:#x} bytes of memory objects, the configured limit"),
            );
        }
        Ok(())
    }

    pub(super) fn mem_unref(&mut self, sid: u64, mem: u32) {
        if let Ok(Object::Memory(m)) = self.object(sid, mem) {
            m.refs -= 1;
        }
    }

    pub(super) fn mem_info(&mut self, sid: u64, mem: u32) -> Result<(u64, u64)> {
        match self.object(sid, mem)? {
            Object::Memory(m) => Ok((m.size, m.sys_base)),
            o => err(Errno::ENOENT, format!("object {mem} is a {}, not a memory object", o.kind())),
        }
    }

    /// A memory object of the channel's session that contains the system
    /// address.
    pub fn memory_at(&mut self, chan: u64, system_address: u64) -> Result<MemoryAt<'_>> {
        let sid = self.chan_session(chan)?;
        let (&base, &(owner, mem)) = self
            .sys_owner
            .range(..=system_address)
            .next_back()
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no memory at {system_address:#x}") })?;
        if owner != sid {
            return err(Errno::ENOENT, format!("no memory of this session at {system_address:#x}"));
        }
        match self.object(sid, mem)? {
            Object::Memory(m) if system_address < base + m.size => Ok(match &m.backing {
                Backing::File(file) => MemoryAt::File { base, size: m.size, sealed: m.sealed, file },
                Backing::Client { address } => MemoryAt::Client { base, size: m.size, address: *address },
            }),
            _ => err(Errno::ENOENT, format!("no memory of this session at {system_address:#x}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::core_with;
    use crate::model::Effects;

    #[test]
    fn an_unsealable_file_shrunk_under_a_mapping_hurts_nothing() {
        let (mut c, sid) = core_with(Limits::default());
        let path = std::env::temp_dir().join(format!("ioasid-shrink-{}", std::process::id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(0x4000).unwrap();
        let m = c.register_memory(sid, OwnedFd::from(f.try_clone().unwrap())).unwrap();
        assert!(!m.sealed);
        assert_eq!(m.seals, "unsupported");
        let ioas = c.ioas_alloc(sid).unwrap();
        let args = MapArgs { ioas, mem: m.id, offset: 0, length: 0x4000, iova: Some(0x10000), perm: Perm::RW };
        let mut fx = Effects::default();
        c.map(sid, args, &mut fx).unwrap();
        f.set_len(0).unwrap();
        // The core never touches the file's pages; it keeps translating and serving.
        assert_eq!(c.translate(sid, ioas, 0x13000).unwrap().offset, 0x3000);
        assert_eq!(c.unmap(sid, ioas, 0, u64::MAX, &mut fx).unwrap(), 0x4000);
        c.destroy(sid, m.id, &mut fx).unwrap();
        c.release_tables(fx.garbage);
        std::fs::remove_file(path).unwrap();
    }
}
