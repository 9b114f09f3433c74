//! Memfd helpers: creation, sealing and size queries.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// Errors of the memfd helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{what}: {errno}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        errno: nix::Error,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> Error {
    move |errno| Error::Sys { what, errno }
}

/// Creates a memfd of `size` bytes that allows sealing.
pub fn create(name: &str, size: u64) -> Result<File, Error> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    let fd: OwnedFd = memfd_create(&cname, MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
        .map_err(sys("memfd_create"))?;
    let file = File::from(fd);
    file.set_len(size).map_err(|e| Error::Sys {
        what: "ftruncate",
        errno: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    Ok(file)
}

/// Creates a memfd of `size` bytes sealed against shrinking and growing.
pub fn create_sealed(name: &str, size: u64) -> Result<File, Error> {
    let file = create(name, size)?;
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL),
    )
    .map_err(sys("F_ADD_SEALS"))?;
    Ok(file)
}

/// Seals present on `fd`, or `None` if the file does not support seals.
pub fn seals(fd: BorrowedFd<'_>) -> Option<SealFlag> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).ok().map(SealFlag::from_bits_truncate)
}

/// Adds `F_SEAL_SHRINK` if the file supports seals. Returns whether the
/// file is now protected against shrinking.
pub fn seal_shrink(fd: BorrowedFd<'_>) -> bool {
    if fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).is_ok() {
        return true;
    }
    seals(fd).is_some_and(|s| s.contains(SealFlag::F_SEAL_SHRINK))
}

/// Whether a shared mapping of `fd` may be written: the fd was opened
/// read-write and the file carries no write seal (`F_SEAL_WRITE`,
/// `F_SEAL_FUTURE_WRITE`).
pub fn writable(fd: BorrowedFd<'_>) -> bool {
    let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) else { return false };
    let rw = flags & libc::O_ACCMODE == libc::O_RDWR && flags & libc::O_PATH == 0;
    rw && !seals(fd).is_some_and(|s| s.intersects(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_FUTURE_WRITE))
}

/// Renders seals as a comma-separated list (`shrink,grow`), or `none`.
pub fn seal_names(s: Option<SealFlag>) -> String {
    let Some(s) = s else { return "unsupported".into() };
    let names: Vec<&str> = [
        (SealFlag::F_SEAL_SEAL, "seal"),
        (SealFlag::F_SEAL_SHRINK, "shrink"),
        (SealFlag::F_SEAL_GROW, "grow"),
        (SealFlag::F_SEAL_WRITE, "write"),
    ]
    .into_iter()
    .filter(|(f, _)| s.contains(*f))
    .map(|(_, n)| n)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

/// Local file systems whose operations never wait on another process. A
/// file anywhere else (FUSE, virtiofs, NFS, SMB, 9p, Ceph, or a type this
/// list does not know) may block `stat`, reads and even `close` for as
/// long as its server likes: DMA and the core's event loop must never
/// wait on it.
const LOCAL_FS: &[&str] = &[
    "tmpfs",
    "hugetlbfs",
    "ramfs",
    "ext2",
    "ext3",
    "ext4",
    "xfs",
    "btrfs",
    "f2fs",
    "overlay",
    "vfat",
    "exfat",
    "zfs",
    "bcachefs",
];

/// The type of the file system `fd` lives on, read from procfs
/// (`fdinfo`'s `mnt_id` and `mountinfo`) without asking the file system
/// itself anything: `fstat` or `fstatfs` on a FUSE file waits for its
/// server.
pub fn fs_type(fd: BorrowedFd<'_>) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let mnt = info.lines().find_map(|l| l.strip_prefix("mnt_id:")).map(str::trim)?.to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let mut fields = l.split(' ');
        if fields.next()? != mnt {
            return None;
        }
        // After the optional fields, " - " then the file system type.
        let (_, rest) = l.split_once(" - ")?;
        rest.split(' ').next().map(str::to_string)
    })
}

/// Whether operations on `fd` might block on another process: true unless
/// it is a memory object (memfd, tmpfs, hugetlbfs: answered by
/// `F_GET_SEALS` alone), a socket, pipe or anonymous inode, or a file of a
/// local file system.
pub fn on_blocking_fs(fd: BorrowedFd<'_>) -> bool {
    if seals(fd).is_some() {
        return false;
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    if link.is_ok_and(|l| {
        let l = l.to_string_lossy();
        l.starts_with("socket:") || l.starts_with("pipe:") || l.starts_with("anon_inode:")
    }) {
        return false;
    }
    !fs_type(fd).is_some_and(|t| LOCAL_FS.contains(&t.as_str()))
}

/// Fds waiting for the closer thread (one stuck close holds up the rest).
static CLOSES_PENDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Fds handed to [`close_elsewhere`] and not closed yet.
pub fn closes_pending() -> usize {
    CLOSES_PENDING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Closes fds on a thread of their own: closing a file of a FUSE or
/// network file system can wait for its server as long as it likes, and
/// must not stall the caller.
pub fn close_elsewhere(fd: OwnedFd) {
    static CLOSER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<OwnedFd>>> = std::sync::OnceLock::new();
    let tx = CLOSER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<OwnedFd>();
        let closer = move || {
            for fd in rx {
                drop(fd);
                CLOSES_PENDING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        std::thread::Builder::new().name("fd-closer".into()).spawn(closer).ok()?;
        Some(tx)
    });
    CLOSES_PENDING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match tx {
        Some(tx) => {
            if let Err(e) = tx.send(fd) {
                // The thread is gone: leak rather than block.
                std::mem::forget(e.0);
            }
        }
        None => std::mem::forget(fd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn files_that_cannot_block_are_told_without_asking_their_file_system() {
        let m = create("t", 4096).unwrap();
        assert!(!on_blocking_fs(m.as_fd()), "a memfd");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!on_blocking_fs(a.as_fd()), "a socket");
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(!on_blocking_fs(r.as_fd()), "a pipe");
        // A file of the file system temporary files live on: its type comes
        // from procfs, and it blocks only if that type is not a local one.
        let path = std::env::temp_dir().join(format!("ioasid-fstype-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let t = fs_type(f.as_fd()).expect("the type of a mounted file system");
        let local = LOCAL_FS.contains(&t.as_str());
        assert_eq!(on_blocking_fs(f.as_fd()), !local && seals(f.as_fd()).is_none(), "{t}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn sealing_a_memfd_and_a_plain_file() {
        let f = create("t", 8192).unwrap();
        assert!(seal_shrink(f.as_fd()));
        assert!(f.set_len(4096).is_err(), "shrink must be refused once sealed");
        assert_eq!(seal_names(seals(f.as_fd())), "shrink");
        let dir = std::env::temp_dir().join(format!("ioasid-memfd-{}", std::process::id()));
        let plain = File::create(&dir).unwrap();
        assert!(!seal_shrink(plain.as_fd()));
        std::fs::remove_file(dir).unwrap();
    }
}
