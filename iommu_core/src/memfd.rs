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

/// File systems whose reads can block for as long as a peer likes (FUSE,
/// network file systems): DMA must never wait on them.
const BLOCKING_FS: &[i64] = &[
    0x6573_5546,            // FUSE
    0x6969,                 // NFS
    0x517b,                 // SMB
    0xff53_4d42_u32 as i64, // CIFS
    0xfe53_4d42_u32 as i64, // SMB2
    0x0102_1997,            // 9P
    0x00c3_6400,            // Ceph
    0x5346_414f,            // AFS
];

/// Whether `fd` lives on a file system whose I/O can block indefinitely.
pub fn on_blocking_fs(fd: BorrowedFd<'_>) -> bool {
    match nix::sys::statfs::fstatfs(fd) {
        // The field is a C long: i64 here, i32 on 32-bit targets.
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => BLOCKING_FS.contains(&(st.filesystem_type().0 as i64)),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

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
