//! Shared memory: the one module that touches mapped memory other
//! processes also map (table pools, dirty pools, memory objects, device
//! doorbell pages). Everything else in the stack is safe code over these
//! types.
//!
//! One style throughout: memory that other processes may write at any time
//! is never behind a Rust reference to plain data. Words are accessed as
//! atomics ([`Words`], [`ReadOnlyWords`] for a read-only mapping, which
//! cannot hold atomics, with volatile loads and an acquire fence), and
//! bytes are copied with volatile copies ([`Bytes`]), or through the kernel
//! where a page may be missing.

use std::fs::File;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use vm_memory::VolatileSlice;

/// Maps `len` bytes of `file` shared, read-write or read-only.
pub fn map(file: &File, len: u64, read_only: bool) -> std::io::Result<MmapRaw> {
    map_range(file, 0, len, read_only)
}

/// Maps `len` bytes of `file` from `offset` (page aligned) shared.
pub fn map_range(file: &File, offset: u64, len: u64, read_only: bool) -> std::io::Result<MmapRaw> {
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("size too large"))?;
    let o = MmapOptions::new().offset(offset).len(len).to_owned();
    if read_only {
        o.map_raw_read_only(file)
    } else {
        o.map_raw(file)
    }
}

/// A writable shared mapping seen as 64-bit and 32-bit words, each accessed
/// atomically.
#[derive(Debug)]
pub struct Words {
    map: MmapRaw,
}

impl Words {
    /// A view of `map` (which must be writable).
    pub fn new(map: MmapRaw) -> Words {
        Words { map }
    }

    /// Maps `len` bytes of `file` read-write.
    pub fn map(file: &File, len: u64) -> std::io::Result<Words> {
        map(file, len, false).map(Words::new)
    }

    /// Maps `len` bytes of `file` from `offset` (page aligned) read-write.
    pub fn map_at(file: &File, offset: u64, len: u64) -> std::io::Result<Words> {
        map_range(file, offset, len, false).map(Words::new)
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn at(&self, byte_offset: u64, size: usize) -> Option<*mut u8> {
        let off = usize::try_from(byte_offset).ok()?;
        if off % size != 0 || off.checked_add(size)? > self.map.len() {
            return None;
        }
        // SAFETY: `off` is inside the mapping (checked above).
        Some(unsafe { self.map.as_mut_ptr().add(off) })
    }

    /// The 64-bit word at `byte_offset` (8-byte aligned, inside).
    pub fn u64(&self, byte_offset: u64) -> Option<&AtomicU64> {
        let p = self.at(byte_offset, 8)?;
        // SAFETY: 8-byte aligned and inside the writable mapping (checked by
        // `at`; the mapping is page aligned), which lives as long as the
        // returned reference; every access to it anywhere is atomic.
        Some(unsafe { AtomicU64::from_ptr(p.cast::<u64>()) })
    }

    /// The 32-bit word at `byte_offset` (4-byte aligned, inside).
    pub fn u32(&self, byte_offset: u64) -> Option<&AtomicU32> {
        let p = self.at(byte_offset, 4)?;
        // SAFETY: as in `u64`, for a 4-byte aligned word.
        Some(unsafe { AtomicU32::from_ptr(p.cast::<u32>()) })
    }
}

/// A read-only shared mapping of 64-bit words another process publishes
/// with release stores: each load is volatile and followed by an acquire
/// fence (atomics cannot live in read-only memory).
#[derive(Debug)]
pub struct ReadOnlyWords {
    map: MmapRaw,
}

impl ReadOnlyWords {
    /// Maps `len` bytes of `file` read-only.
    pub fn map(file: &File, len: u64) -> std::io::Result<ReadOnlyWords> {
        map(file, len, true).map(|map| ReadOnlyWords { map })
    }

    /// The 64-bit word at `byte_offset` (8-byte aligned, inside).
    pub fn load(&self, byte_offset: u64) -> Option<u64> {
        let off = usize::try_from(byte_offset).ok()?;
        if off % 8 != 0 || off.checked_add(8)? > self.map.len() {
            return None;
        }
        // SAFETY: in bounds and 8-byte aligned (checked); the mapping lives
        // as long as `self`; a volatile load followed by an acquire fence is
        // the reader's half of the writer's release stores.
        let v = unsafe { std::ptr::read_volatile(self.map.as_ptr().add(off).cast::<u64>()) };
        fence(Ordering::Acquire);
        Some(v)
    }
}

/// The bytes of a memory object, mapped shared.
#[derive(Debug)]
pub struct Bytes {
    map: MmapRaw,
    /// Every page of the mapping is always there (the file is sealed
    /// against shrinking and is not on hugetlbfs): copies are plain
    /// volatile copies. Otherwise every copy goes through the kernel
    /// ([`kernel_copy`]), so a missing page is an error, never SIGBUS.
    direct: bool,
}

/// A copy that could not be made: the range is outside the mapping, or a
/// page of it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable;

impl Bytes {
    /// Maps `len` bytes of `file`, read-write if the file allows it, else
    /// read-only (writes then fail). `direct` as on [`Bytes`].
    pub fn map(file: &File, len: u64, direct: bool) -> std::io::Result<Bytes> {
        let map = match map(file, len, false) {
            Ok(m) => m,
            Err(_) => map(file, len, true)?,
        };
        Ok(Bytes { map, direct })
    }

    fn ptr(&self, off: u64, n: usize) -> Option<*mut u8> {
        let off = usize::try_from(off).ok()?;
        if off.checked_add(n)? > self.map.len() {
            return None;
        }
        // SAFETY: `off` is inside the mapping (checked above).
        Some(unsafe { self.map.as_mut_ptr().add(off) })
    }

    fn slice(&self, off: u64, n: usize) -> Option<VolatileSlice<'_>> {
        let p = self.ptr(off, n)?;
        // SAFETY: [off, off+n) lies inside the shared mapping (checked), the
        // mapping lives as long as `self`, every page of it is backed (the
        // file is sealed against shrinking: `direct`), and the slice is only
        // used for volatile copies.
        Some(unsafe { VolatileSlice::new(p, n) })
    }

    /// Copies `buf.len()` bytes at `off` into `buf`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), Unreachable> {
        if self.direct {
            self.slice(off, buf.len()).ok_or(Unreachable)?.copy_to(buf);
            return Ok(());
        }
        let p = self.ptr(off, buf.len()).ok_or(Unreachable)?;
        kernel_copy(buf.as_mut_ptr(), p, buf.len(), false).then_some(()).ok_or(Unreachable)
    }

    /// Copies `data` to `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<(), Unreachable> {
        if self.direct {
            self.slice(off, data.len()).ok_or(Unreachable)?.copy_from(data);
            return Ok(());
        }
        let p = self.ptr(off, data.len()).ok_or(Unreachable)?;
        // The kernel only reads `data` here.
        kernel_copy(data.as_ptr().cast_mut(), p, data.len(), true).then_some(()).ok_or(Unreachable)
    }

    /// Copies `n` bytes at `src_off` of `src` to `off` of `self`, straight
    /// from one mapping to the other. `src` may be `self`, and the two
    /// ranges may overlap: the copy is made as `memmove` makes it.
    pub fn copy_from(&self, off: u64, src: &Bytes, src_off: u64, n: usize) -> Result<(), Unreachable> {
        let d = self.ptr(off, n).ok_or(Unreachable)?;
        let s = src.ptr(src_off, n).ok_or(Unreachable)?;
        if self.direct && src.direct {
            // SAFETY: both ranges lie inside their shared mappings (checked
            // above), which live as long as `self` and `src`, with every
            // page backed (both files are sealed against shrinking:
            // `direct`). No Rust reference to either range is made; the
            // bytes are moved with a raw copy, which allows overlap.
            unsafe { std::ptr::copy(s, d, n) };
            return Ok(());
        }
        let (sa, da) = (s as usize, d as usize);
        if sa < da.wrapping_add(n) && da < sa.wrapping_add(n) {
            // The kernel's copy goes forward: an overlapping pair goes
            // through a buffer of our own (only in objects that can shrink).
            let mut buf = vec![0u8; n];
            src.read(src_off, &mut buf)?;
            return self.write(off, &buf);
        }
        kernel_copy_between(d, s, n).then_some(()).ok_or(Unreachable)
    }

    /// The 64-bit word at `off` (8-byte aligned), read with acquire.
    pub fn load_u64(&self, off: u64) -> Option<u64> {
        if !off.is_multiple_of(8) {
            return None;
        }
        let p = self.ptr(off, 8)?;
        if self.direct {
            // SAFETY: 8-byte aligned (the mapping is page aligned) and inside
            // the shared mapping (checked), every page backed (sealed);
            // shared memory is read only atomically.
            let w = unsafe { AtomicU64::from_ptr(p.cast::<u64>()) };
            return Some(w.load(Ordering::Acquire));
        }
        let mut b = [0u8; 8];
        kernel_copy(b.as_mut_ptr(), p, 8, false).then(|| u64::from_le_bytes(b))
    }
}

/// Copies `n` bytes between `local` and the mapping at `mapped` with
/// `process_vm_readv`/`process_vm_writev` on this very process: the kernel
/// answers a missing page with a short count where a direct access would
/// raise SIGBUS. True if every byte was copied.
fn kernel_copy(local: *mut u8, mapped: *mut u8, n: usize, to_mapping: bool) -> bool {
    use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
    let pid = nix::unistd::getpid();
    let remote = [RemoteIoVec { base: mapped as usize, len: n }];
    // SAFETY: `local` points to `n` bytes the caller owns for the call (a
    // buffer borrowed mutably or immutably as the direction needs).
    let done = unsafe {
        if to_mapping {
            let src = std::slice::from_raw_parts(local, n);
            process_vm_writev(pid, &[std::io::IoSlice::new(src)], &remote)
        } else {
            let dst = std::slice::from_raw_parts_mut(local, n);
            process_vm_readv(pid, &mut [std::io::IoSliceMut::new(dst)], &remote)
        }
    };
    done.is_ok_and(|d| d == n)
}

/// Copies `n` bytes from the mapping at `src` to the mapping at `dst`
/// with `process_vm_readv` on this very process (see [`kernel_copy`]): a
/// missing page on either side is a short count, not SIGBUS.
fn kernel_copy_between(dst: *mut u8, src: *const u8, n: usize) -> bool {
    let local = libc::iovec { iov_base: dst.cast(), iov_len: n };
    let remote = libc::iovec { iov_base: src.cast_mut().cast(), iov_len: n };
    // SAFETY: both iovecs describe ranges inside live mappings of ours
    // (checked by the caller); the kernel copies between them and answers
    // a page it cannot reach with a short count or EFAULT. No Rust
    // reference to either range is made.
    let done = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    usize::try_from(done).is_ok_and(|d| d == n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_refuse_unaligned_and_outside_offsets() {
        let f = crate::memfd::create("shm-words", 4096).unwrap();
        let w = Words::map(&f, 4096).unwrap();
        assert!(w.u64(8).is_some() && w.u64(4088).is_some());
        assert!(w.u64(4).is_none() && w.u64(4096).is_none() && w.u64(u64::MAX - 7).is_none());
        assert!(w.u32(4).is_some() && w.u32(2).is_none() && w.u32(4096).is_none());
        w.u64(16).unwrap().store(0x1122_3344_5566_7788, Ordering::Release);
        assert_eq!(w.u32(16).unwrap().load(Ordering::Acquire), 0x5566_7788);
        let r = ReadOnlyWords::map(&f, 4096).unwrap();
        assert_eq!(r.load(16), Some(0x1122_3344_5566_7788));
        assert_eq!(r.load(12), None);
        assert_eq!(r.load(4096), None);
    }

    #[test]
    fn bytes_copy_both_ways_and_refuse_outside_ranges() {
        use std::os::unix::fs::FileExt;
        let f = crate::memfd::create("shm-bytes", 8192).unwrap();
        for direct in [true, false] {
            let b = Bytes::map(&f, 8192, direct).unwrap();
            b.write(4090, b"0123456789").unwrap();
            let mut got = [0u8; 10];
            b.read(4090, &mut got).unwrap();
            assert_eq!(&got, b"0123456789");
            let mut on_file = [0u8; 10];
            f.read_exact_at(&mut on_file, 4090).unwrap();
            assert_eq!(&on_file, b"0123456789");
            assert_eq!(b.read(8190, &mut got), Err(Unreachable));
            assert_eq!(b.write(u64::MAX, b"x"), Err(Unreachable));
            assert_eq!(b.load_u64(4096), Some(u64::from_le_bytes(*b"6789\0\0\0\0")));
            assert_eq!(b.load_u64(4092), None);
            // Straight copies, overlapping ones as memmove makes them.
            b.write(0, b"abcdefgh").unwrap();
            b.copy_from(2, &b, 0, 6).unwrap();
            let mut m = [0u8; 8];
            b.read(0, &mut m).unwrap();
            assert_eq!(&m, b"ababcdef");
            b.copy_from(0, &b, 2, 6).unwrap();
            b.read(0, &mut m).unwrap();
            assert_eq!(&m, b"abcdefef");
            let other = Bytes::map(&crate::memfd::create("shm-bytes-2", 8192).unwrap(), 8192, direct).unwrap();
            other.copy_from(8000, &b, 4090, 10).unwrap();
            let mut got2 = [0u8; 10];
            other.read(8000, &mut got2).unwrap();
            assert_eq!(&got2, b"0123456789");
            assert_eq!(other.copy_from(8190, &b, 0, 10), Err(Unreachable));
            assert_eq!(other.copy_from(0, &b, 8190, 10), Err(Unreachable));
        }
    }
}
