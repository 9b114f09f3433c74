//! Memfd helpers: creation, sealing and size queries; telling which fds
//! can be memory (and written) without asking a file system anything that
//! could block; closing fds off the caller's thread.

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

/// Renders seals as a comma-separated list (`shrink,grow`), or `none`.
pub fn seal_names(s: Option<SealFlag>) -> String {
    let Some(s) = s else { return "unsupported".into() };
    let names: Vec<&str> = [
        (SealFlag::F_SEAL_SEAL, "seal"),
        (SealFlag::F_SEAL_SHRINK, "shrink"),
        (SealFlag::F_SEAL_GROW, "grow"),
        (SealFlag::F_SEAL_WRITE, "write"),
        (SealFlag::F_SEAL_FUTURE_WRITE, "future_write"),
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

/// File systems of devices and kernel interfaces: their files are not
/// memory (`/dev/zero`, `/proc/...`, `/sys/...`), though asking them about
/// a file never waits for another process.
const SPECIAL_FS: &[&str] = &[
    "devtmpfs",
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "configfs",
    "pstore",
    "bpf",
    "efivarfs",
    "devpts",
    "mqueue",
    "binfmt_misc",
    "nsfs",
    "pidfs",
    "fusectl",
    "selinuxfs",
];

/// Why an fd cannot serve as memory (for DMA or a memory object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Opened with `O_PATH`: it gives no access to the file's contents.
    OPath,
    /// Opened write-only: memory must at least be readable to be mapped.
    WriteOnly,
    /// A file of a device or kernel interface file system (`devtmpfs`,
    /// `proc`, `sysfs`, ...), named.
    Special(String),
    /// A file of a FUSE, network or unknown file system (named when
    /// `mountinfo` tells it): any access, `stat` and `close` included, may
    /// wait for as long as another process likes.
    MayBlock(Option<String>),
    /// Not a regular file: what it is instead (`"a socket"`, `"a
    /// character device"`, `"anon_inode:[eventfd]"`, ...).
    NotRegular(String),
    /// Opened read-only, while write access is wanted.
    ReadOnly,
    /// Sealed against writing (`F_SEAL_WRITE` or `F_SEAL_FUTURE_WRITE`),
    /// while write access is wanted.
    WriteSealed,
    /// A system call on the fd failed.
    Unusable(&'static str, nix::Error),
}

impl Refused {
    /// The errno a peer is told: `EACCES` when the access mode or seals
    /// forbid what is asked, `EINVAL` when the fd is not memory at all.
    pub fn errno(&self) -> i32 {
        match self {
            Refused::WriteOnly | Refused::ReadOnly | Refused::WriteSealed => libc::EACCES,
            _ => libc::EINVAL,
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::OPath => write!(f, "the fd was opened with O_PATH and gives no access to the file's contents"),
            Refused::WriteOnly => write!(f, "the fd was opened write-only; memory must be readable to be mapped"),
            Refused::Special(fs) => {
                write!(f, "the file is on {fs}, a file system of devices or kernel interfaces, not memory")
            }
            Refused::MayBlock(Some(fs)) => write!(
                f,
                "the file is on {fs}, a FUSE, network or unknown file system whose every access (stat and close \
                 included) can wait on another process"
            ),
            Refused::MayBlock(None) => write!(
                f,
                "the file system of the file cannot be told from procfs, so any access to it might wait on another \
                 process"
            ),
            Refused::NotRegular(what) => write!(f, "the fd is {what}, not a regular file"),
            Refused::ReadOnly => write!(f, "write access was asked for, but the fd was opened read-only"),
            Refused::WriteSealed => {
                write!(f, "write access was asked for, but the memory is sealed against writing")
            }
            Refused::Unusable(what, e) => write!(f, "{what} on the fd failed: {e}"),
        }
    }
}

/// The `open` flags of `fd` (`F_GETFL` never reaches the file system).
fn open_flags(fd: BorrowedFd<'_>) -> Result<nix::fcntl::OFlag, Refused> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)
        .map(nix::fcntl::OFlag::from_bits_retain)
        .map_err(|e| Refused::Unusable("F_GETFL", e))
}

/// What `/proc/self/fd` says `fd` is when it is not a file of a mounted
/// file system: a socket, a pipe or an anonymous inode.
fn pseudo_file(fd: BorrowedFd<'_>) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let l = link.to_string_lossy();
    if l.starts_with("socket:") {
        Some("a socket".into())
    } else if l.starts_with("pipe:") {
        Some("a pipe".into())
    } else if l.starts_with("anon_inode:") {
        Some(format!("an anonymous inode ({l})"))
    } else {
        None
    }
}

/// Checks that `fd` can be memory: a regular file, readable, not `O_PATH`,
/// of a memory or local file system. Nothing here asks the file's own file
/// system anything before its type is known to be one that answers at once
/// (procfs tells the type), so a file of a stalled FUSE server is refused
/// without waiting. The caller should still close a refused fd with
/// [`close_elsewhere`]: closing a file of such a file system can block.
pub fn check_memory_fd(fd: BorrowedFd<'_>) -> Result<(), Refused> {
    let flags = open_flags(fd)?;
    if flags.contains(nix::fcntl::OFlag::O_PATH) {
        return Err(Refused::OPath);
    }
    if flags & nix::fcntl::OFlag::O_ACCMODE == nix::fcntl::OFlag::O_WRONLY {
        return Err(Refused::WriteOnly);
    }
    // Memfd, tmpfs and hugetlbfs files answer F_GET_SEALS: regular files
    // of memory.
    if seals(fd).is_some() {
        return Ok(());
    }
    if let Some(what) = pseudo_file(fd) {
        return Err(Refused::NotRegular(what));
    }
    let fs = fs_type(fd);
    match fs.as_deref() {
        Some(t) if SPECIAL_FS.contains(&t) => return Err(Refused::Special(t.to_string())),
        Some(t) if LOCAL_FS.contains(&t) => {}
        _ => return Err(Refused::MayBlock(fs)),
    }
    // A local file system: fstat answers at once.
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| Refused::Unusable("fstat", e))?;
    let what = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => return Ok(()),
        libc::S_IFDIR => "a directory",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFLNK => "a symbolic link",
        _ => "of an unknown file type",
    };
    Err(Refused::NotRegular(what.into()))
}

/// Checks that memory behind `fd` may be written through it: opened
/// read-write and not sealed against writing (`F_SEAL_WRITE`, or
/// `F_SEAL_FUTURE_WRITE`, which forbids new writable mappings). The kernel
/// refuses a writable mapping or pin of such memory, so a device could
/// never write it. Only `fcntl` is used: nothing reaches the file system.
pub fn check_writable(fd: BorrowedFd<'_>) -> Result<(), Refused> {
    let flags = open_flags(fd)?;
    if flags.contains(nix::fcntl::OFlag::O_PATH) {
        return Err(Refused::OPath);
    }
    if flags & nix::fcntl::OFlag::O_ACCMODE != nix::fcntl::OFlag::O_RDWR {
        return Err(if flags & nix::fcntl::OFlag::O_ACCMODE == nix::fcntl::OFlag::O_WRONLY {
            Refused::WriteOnly
        } else {
            Refused::ReadOnly
        });
    }
    let write_seals = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;
    if seals(fd).is_some_and(|s| s.bits() & write_seals != 0) {
        return Err(Refused::WriteSealed);
    }
    Ok(())
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

    #[test]
    fn memory_is_told_from_devices_kernel_files_pseudo_files_and_o_path() {
        use std::os::unix::fs::OpenOptionsExt;
        let m = create("t", 4096).unwrap();
        assert_eq!(check_memory_fd(m.as_fd()), Ok(()));
        let zero = File::open("/dev/zero").unwrap();
        match check_memory_fd(zero.as_fd()) {
            // devtmpfs, or a /dev on tmpfs (containers): a device either way.
            Err(Refused::Special(fs)) => assert_eq!(fs, "devtmpfs"),
            Err(Refused::NotRegular(what)) => assert_eq!(what, "a character device"),
            other => panic!("/dev/zero: {other:?}"),
        }
        let status = File::open("/proc/self/status").unwrap();
        assert_eq!(check_memory_fd(status.as_fd()), Err(Refused::Special("proc".into())));
        let path = std::env::temp_dir().join(format!("ioasid-check-{}", std::process::id()));
        let plain = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        plain.set_len(4096).unwrap();
        let opath = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(&path).unwrap();
        assert_eq!(check_memory_fd(opath.as_fd()), Err(Refused::OPath));
        let wronly = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let e = check_memory_fd(wronly.as_fd()).unwrap_err();
        assert_eq!((e.clone(), e.errno()), (Refused::WriteOnly, libc::EACCES));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(check_memory_fd(a.as_fd()), Err(Refused::NotRegular("a socket".into())));
        let efd = nix::sys::eventfd::EventFd::new().unwrap();
        match check_memory_fd(efd.as_fd()) {
            Err(e @ Refused::NotRegular(_)) => {
                assert!(e.to_string().contains("anon_inode:[eventfd]"), "{e}");
                assert_eq!(e.errno(), libc::EINVAL);
            }
            other => panic!("an eventfd: {other:?}"),
        }
        let dir = File::open(std::env::temp_dir()).unwrap();
        let t = fs_type(dir.as_fd()).unwrap();
        if LOCAL_FS.contains(&t.as_str()) {
            assert_eq!(check_memory_fd(dir.as_fd()), Err(Refused::NotRegular("a directory".into())));
            assert_eq!(check_memory_fd(plain.as_fd()), Ok(()));
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn write_access_follows_the_open_mode_and_the_seals() {
        let m = create("w", 4096).unwrap();
        assert_eq!(check_writable(m.as_fd()), Ok(()));
        // A read-only open of the same memfd.
        let ro = File::open(format!("/proc/self/fd/{}", m.as_raw_fd())).unwrap();
        assert_eq!(check_memory_fd(ro.as_fd()), Ok(()));
        let e = check_writable(ro.as_fd()).unwrap_err();
        assert_eq!((e.clone(), e.errno()), (Refused::ReadOnly, libc::EACCES));
        for seal in [SealFlag::F_SEAL_WRITE, SealFlag::F_SEAL_FUTURE_WRITE] {
            let s = create("s", 4096).unwrap();
            fcntl(s.as_raw_fd(), FcntlArg::F_ADD_SEALS(seal)).unwrap();
            assert_eq!(check_memory_fd(s.as_fd()), Ok(()));
            assert_eq!(check_writable(s.as_fd()), Err(Refused::WriteSealed), "{seal:?}");
        }
    }
}
