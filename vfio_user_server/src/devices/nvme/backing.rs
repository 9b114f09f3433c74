//! The namespace's storage: a regular file or a block device, opened once.
//! Reads and writes are `pread`/`pwrite` at the block's offset; Flush is
//! `fdatasync`; Write Zeroes and deallocation punch or zero ranges with
//! `fallocate` (falling back to writing zeroes where the file system
//! cannot).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use super::abi::LBA_SIZE;

/// The backing store.
pub struct Backing {
    file: File,
    /// Bytes exposed (a whole number of blocks).
    size: u64,
    read_only: bool,
    /// The file's device and inode: the namespace's identifiers are made
    /// from them, so they stay the same across runs.
    id: (u64, u64),
}

static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

impl Backing {
    /// Opens `path`. The namespace is `size` bytes if given (a regular file
    /// shorter than that is extended; a block device must be at least that
    /// big), else the file's or device's size; either way rounded down to
    /// whole blocks, and at least one block.
    pub fn open(path: &Path, size: Option<u64>, read_only: bool) -> std::io::Result<Backing> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let block_dev = meta.file_type().is_block_device();
        let have = if block_dev { block_device_size(&file)? } else { meta.len() };
        let want = size.unwrap_or(have);
        if want > have {
            if block_dev || read_only {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} holds {have} bytes, fewer than --size {want}", path.display()),
                ));
            }
            file.set_len(want)?;
        }
        let size = want & !(LBA_SIZE - 1);
        if size == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is smaller than one {LBA_SIZE}-byte block; give --size", path.display()),
            ));
        }
        use std::os::unix::fs::MetadataExt;
        Ok(Backing { file, size, read_only, id: (meta.dev(), meta.ino()) })
    }

    /// Bytes exposed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks exposed.
    pub fn blocks(&self) -> u64 {
        self.size / LBA_SIZE
    }

    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Device and inode of the file.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Fills `buf` from `off` (bytes past the end of a file that shrank
    /// read as zeroes).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes `data` at `off`, all of it.
    pub fn write(&self, off: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, off)
    }

    /// Makes what was written durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Zeroes `len` bytes at `off`; `deallocate` lets the blocks go (a hole)
    /// where the file system can, else they are written as zeroes, 64 KiB
    /// at a time: `cancel` is asked before each piece, and a true answer
    /// ends the call with `ErrorKind::Interrupted` (a guest may ask for a
    /// whole namespace; a reset must not wait for it).
    pub fn zero(&self, off: u64, len: u64, deallocate: bool, cancel: &dyn Fn() -> bool) -> std::io::Result<()> {
        let mode = if deallocate {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on an fd we own, with plain integers; it
        // touches no memory of this process.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) };
        if r == 0 {
            return Ok(());
        }
        let mut at = off;
        let end = off + len;
        while at < end {
            if cancel() {
                return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
            }
            let n = (end - at).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// The size of the block device open as `f`.
fn block_device_size(f: &File) -> std::io::Result<u64> {
    // BLKGETSIZE64.
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the ioctl writes one u64 through the pointer, which points
    // to a live u64 of this frame.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: u64) -> (std::path::PathBuf, Backing) {
        let p = std::env::temp_dir().join(format!("nvme-backing-{}-{len}", std::process::id()));
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        let b = Backing::open(&p, None, false).unwrap();
        (p, b)
    }

    #[test]
    fn sizes_round_down_to_blocks_and_tiny_files_are_refused() {
        let (p, b) = file(4096 + 100);
        assert_eq!((b.size(), b.blocks()), (4096, 8));
        drop(b);
        // --size extends a shorter file.
        let b = Backing::open(&p, Some(1 << 20), false).unwrap();
        assert_eq!(b.blocks(), 2048);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        drop(b);
        assert!(Backing::open(&p, Some(2 << 20), true).is_err(), "a read-only file cannot be extended");
        assert!(Backing::open(&p, Some(100), false).is_err(), "less than one block");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn zeroes_and_holes_read_back_as_zeroes() {
        let (p, b) = file(1 << 20);
        b.write(0, &[0xab; 65536]).unwrap();
        b.zero(4096, 8192, false, &|| false).unwrap();
        b.zero(32768, 4096, true, &|| false).unwrap();
        let mut buf = vec![0u8; 65536];
        b.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|x| *x == 0xab));
        assert!(buf[4096..12288].iter().all(|x| *x == 0));
        assert!(buf[12288..32768].iter().all(|x| *x == 0xab));
        assert!(buf[32768..36864].iter().all(|x| *x == 0));
        assert!(buf[36864..].iter().all(|x| *x == 0xab));
        std::fs::remove_file(&p).unwrap();
    }
}
