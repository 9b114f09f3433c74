//! The mount point, made ready before mounting.
//!
//! An `ioasid-fs` killed with SIGKILL leaves its FUSE mount behind with no
//! server: every access to it fails with `ENOTCONN`, mounting on it too.
//! [`prepare`] finds such a dead FUSE mount on the mount point and detaches
//! it (a lazy unmount), so that the new mount can take its place. Anything
//! else mounted there is left alone and refused with a sentence: a FUSE
//! file system that answers (another `ioasid-fs`, say), one that does not
//! answer in time (its server stopped, not dead), and every other kind of
//! file system.
//!
//! Nothing here waits on a FUSE server from the calling thread: mounts are
//! found in `/proc/self/mountinfo`, and the path operations that may reach
//! a file system (resolving the path, asking a FUSE mount whether it
//! answers) run on a thread of their own that is given a deadline. A thread
//! stuck on a stopped server is left behind; it ends when the server runs
//! again, or with the process.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long resolving the mount point, or a FUSE mount asked whether it
/// answers, may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for another `ioasid-fs` setting up a mount in the same
/// directory.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Most dead FUSE mounts detached from one mount point (they can be
/// stacked).
const MAX_DETACHED: usize = 8;
/// Most symlinks followed when resolving the mount point.
const MAX_SYMLINKS: usize = 40;

/// Why the mount point cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path could not be resolved.
    #[error("cannot resolve the mount point {0}: {1}")]
    Resolve(PathBuf, std::io::Error),
    /// Resolving the path did not finish in time.
    #[error("resolving the mount point {0} did not finish within {1:?} (a file system on the path does not answer)")]
    ResolveTimeout(PathBuf, Duration),
    /// The mount table could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
    /// The directory holding the mount point could not be locked.
    #[error("cannot lock {0} while setting the mount up: {1}")]
    Lock(PathBuf, std::io::Error),
    /// Another `ioasid-fs` kept the directory locked too long.
    #[error("another ioasid-fs kept {0} locked for {1:?} while setting up a mount there")]
    LockTimeout(PathBuf, Duration),
    /// A live `ioasid-fs` serves the mount point.
    #[error("another ioasid-fs is mounted on {0} and answers; stop it first, or choose another mount point")]
    LiveIoasidFs(PathBuf),
    /// Another live FUSE file system is mounted there.
    #[error("a FUSE file system ({fstype}, source {origin}) is mounted on {path} and answers; not touching it")]
    LiveFuse {
        /// The mount point.
        path: PathBuf,
        /// Its file system type.
        fstype: String,
        /// Its source (the device or name it was mounted from).
        origin: String,
    },
    /// A FUSE file system is mounted there and did not answer in time.
    #[error(
        "the FUSE file system ({fstype}, source {origin}) mounted on {path} did not answer within {timeout:?} \
         (its server may be stopped); not touching it"
    )]
    Stalled {
        /// The mount point.
        path: PathBuf,
        /// Its file system type.
        fstype: String,
        /// Its source (the device or name it was mounted from).
        origin: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// Asking the FUSE file system mounted there failed other than with
    /// `ENOTCONN`.
    #[error("the FUSE file system ({fstype}) mounted on {path} gives {error}; not touching it")]
    Probe {
        /// The mount point.
        path: PathBuf,
        /// Its file system type.
        fstype: String,
        /// What a stat of the mount point gave.
        error: std::io::Error,
    },
    /// A file system other than FUSE is mounted there.
    #[error(
        "a {fstype} file system (source {origin}) is mounted on {path}; ioasid-fs does not mount over it: \
         choose a directory that is not a mount point"
    )]
    NotFuse {
        /// The mount point.
        path: PathBuf,
        /// Its file system type.
        fstype: String,
        /// Its source (the device or name it was mounted from).
        origin: String,
    },
    /// A dead FUSE mount could not be detached.
    #[error("cannot detach the dead FUSE mount on {0}: {1}")]
    Detach(PathBuf, String),
    /// Dead FUSE mounts kept coming, or the mounts kept changing.
    #[error("more than {MAX_DETACHED} dead FUSE mounts on {0}, or its mounts keep changing; giving up")]
    TooManyDead(PathBuf),
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (unique while it is mounted).
    pub id: u64,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The file system type (`fuse`, `fuse.sshfs`, `tmpfs`, ...).
    pub fstype: String,
    /// The mount source (for `ioasid-fs`: `ioasid`).
    pub source: String,
}

impl MountEntry {
    /// Whether it is a FUSE mount.
    pub fn is_fuse(&self) -> bool {
        let t = self.fstype.as_str();
        t == "fuse" || t == "fuseblk" || t.starts_with("fuse.") || t.starts_with("fuseblk.")
    }

    /// Whether it is a FUSE mount made by `ioasid-fs`.
    pub fn is_ioasid_fs(&self) -> bool {
        self.is_fuse() && (self.source == "ioasid" || self.fstype == "fuse.ioasid")
    }
}

/// Undoes the octal escapes (`\040` for a space, ...) of a mountinfo field.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Parses the text of `/proc/self/mountinfo`; lines that do not have the
/// documented shape are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut v = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        // id parent major:minor root mount_point options [optional...] - fstype source super_options
        let Some(sep) = fields.iter().skip(6).position(|f| *f == "-").map(|p| p + 6) else { continue };
        let (Some(id), Some(mp), Some(fstype), Some(source)) =
            (fields.first(), fields.get(4), fields.get(sep + 1), fields.get(sep + 2))
        else {
            continue;
        };
        let Ok(id) = id.parse() else { continue };
        v.push(MountEntry {
            id,
            mount_point: unescape(mp),
            fstype: fstype.to_string(),
            source: unescape(source).to_string_lossy().into_owned(),
        });
    }
    v
}

/// The mount seen at `path` (the last one mounted there), if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>, Error> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(Error::MountInfo)?;
    Ok(parse_mountinfo(&text).into_iter().rev().find(|m| m.mount_point == path))
}

/// Runs `f` on a thread of its own; `None` if it did not finish within
/// `timeout` (the thread is then left to finish by itself).
fn with_deadline<T: Send + 'static>(timeout: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new().name("mountpoint-probe".into()).spawn(move || {
        let _ = tx.send(f());
    });
    match spawned {
        Ok(_) => rx.recv_timeout(timeout).ok(),
        Err(e) => {
            tracing::warn!("cannot start a thread to probe the mount point: {e}");
            None
        }
    }
}

/// The absolute path `p` names, with every symlink resolved, without
/// looking into the file system mounted on the last component (only its
/// parent directory is resolved, and the last component read as a
/// symlink, which does not reach the file system mounted on it).
fn resolve_blocking(p: &Path) -> std::io::Result<PathBuf> {
    let mut p = std::path::absolute(p)?;
    for _ in 0..MAX_SYMLINKS {
        let (Some(parent), Some(Component::Normal(name))) = (p.parent(), p.components().next_back()) else {
            // `/` or a path ending in `..`: nothing is mounted over by name.
            return p.canonicalize();
        };
        let parent = parent.canonicalize()?;
        let full = parent.join(name);
        match std::fs::read_link(&full) {
            Ok(target) => p = parent.join(target),
            // Not a symlink (EINVAL), or absent (mounting will say so).
            Err(_) => return Ok(full),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

/// [`resolve_blocking`] on a thread of its own, within [`PROBE_TIMEOUT`].
pub fn resolve(p: &Path) -> Result<PathBuf, Error> {
    let owned = p.to_path_buf();
    match with_deadline(PROBE_TIMEOUT, move || resolve_blocking(&owned)) {
        Some(Ok(r)) => Ok(r),
        Some(Err(e)) => Err(Error::Resolve(p.to_path_buf(), e)),
        None => Err(Error::ResolveTimeout(p.to_path_buf(), PROBE_TIMEOUT)),
    }
}

/// What a FUSE mount said when asked.
enum Probe {
    /// It answered.
    Answers,
    /// `ENOTCONN` (or `ECONNABORTED`): its connection is gone for good.
    Dead,
    /// No answer in time.
    Stalled,
    /// Another error.
    Failed(std::io::Error),
}

/// Stats `path` on a thread of its own, within [`PROBE_TIMEOUT`].
fn probe(path: &Path) -> Probe {
    let owned = path.to_path_buf();
    match with_deadline(PROBE_TIMEOUT, move || std::fs::metadata(&owned)) {
        None => Probe::Stalled,
        Some(Ok(_)) => Probe::Answers,
        Some(Err(e)) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => Probe::Dead,
        Some(Err(e)) => Probe::Failed(e),
    }
}

/// Detaches the mount on `path` (a lazy unmount): `umount2(MNT_DETACH)`,
/// else `fusermount3 -uz` or `fusermount -uz` where they are installed.
fn detach(path: &Path) -> Result<(), Error> {
    use nix::mount::{umount2, MntFlags};
    let e = match umount2(path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let mut why = format!("umount2: {e}");
    for helper in ["fusermount3", "fusermount"] {
        let out = Command::new(helper)
            .args(["-u", "-z", "--"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match out {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => why.push_str(&format!("; {helper}: {} {}", o.status, String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => why.push_str(&format!("; {helper}: {e}")),
        }
    }
    Err(Error::Detach(path.to_path_buf(), why))
}

/// An exclusive lock on the directory holding the mount point, held while
/// a mount is set up there, so that two `ioasid-fs` starting at once do not
/// both take the same dead mount for theirs to replace.
pub struct DirLock {
    _held: Option<nix::fcntl::Flock<File>>,
}

impl DirLock {
    fn take(dir: &Path) -> Result<DirLock, Error> {
        use nix::fcntl::{Flock, FlockArg};
        let mut file = match File::open(dir) {
            Ok(f) => f,
            Err(e) => {
                // A directory we may search but not read: go on without.
                tracing::warn!("cannot open {} to lock it while setting the mount up ({e}); going on", dir.display());
                return Ok(DirLock { _held: None });
            }
        };
        let t0 = Instant::now();
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(DirLock { _held: Some(l) }),
                Err((f, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(Error::Lock(dir.to_path_buf(), e.into())),
            }
            if t0.elapsed() >= LOCK_TIMEOUT {
                return Err(Error::LockTimeout(dir.to_path_buf(), LOCK_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A mount point ready to be mounted on.
pub struct Prepared {
    /// The mount point, absolute and without symlinks.
    pub path: PathBuf,
    /// Dead FUSE mounts detached from it.
    pub detached: usize,
    /// Held until the mount is made.
    pub lock: DirLock,
}

/// Makes `mountpoint` ready: detaches the dead FUSE mounts on it, refuses
/// (and leaves alone) whatever else is mounted there. See the module
/// documentation.
pub fn prepare(mountpoint: &Path) -> Result<Prepared, Error> {
    let path = resolve(mountpoint)?;
    let lock = match path.parent() {
        Some(dir) => DirLock::take(dir)?,
        None => DirLock { _held: None },
    };
    let mut detached = 0;
    for _ in 0..=MAX_DETACHED {
        let Some(m) = mount_at(&path)? else { return Ok(Prepared { path, detached, lock }) };
        if !m.is_fuse() {
            return Err(Error::NotFuse { path, fstype: m.fstype, origin: m.source });
        }
        match probe(&path) {
            Probe::Dead => {}
            Probe::Answers if m.is_ioasid_fs() => return Err(Error::LiveIoasidFs(path)),
            Probe::Answers => return Err(Error::LiveFuse { path, fstype: m.fstype, origin: m.source }),
            Probe::Stalled => {
                return Err(Error::Stalled { path, fstype: m.fstype, origin: m.source, timeout: PROBE_TIMEOUT })
            }
            Probe::Failed(error) => return Err(Error::Probe { path, fstype: m.fstype, error }),
        }
        // The mount judged dead must still be the one on top.
        if mount_at(&path)?.map(|n| n.id) != Some(m.id) {
            continue;
        }
        detach(&path)?;
        detached += 1;
        tracing::warn!(
            "detached a dead FUSE mount ({}, source {}) from {}: its server is gone (ENOTCONN)",
            m.fstype,
            m.source,
            path.display()
        );
    }
    Err(Error::TooManyDead(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
45 27 0:40 / /tmp/a\\040b/mnt ro,nosuid,nodev,relatime - fuse ioasid ro,user_id=0,group_id=0
46 27 0:41 / /tmp/x rw - fuse.sshfs host:/srv rw,user_id=0
47 27 0:42 / /tmp/y rw master:3 shared:4 - tmpfs tmpfs rw
garbage line
48 27 0:43 / /tmp/z rw no separator here
x 27 0:43 / /tmp/z rw - tmpfs tmpfs rw
";
        let v = parse_mountinfo(text);
        assert_eq!(v.len(), 4, "{v:?}");
        assert_eq!(v[1].id, 45);
        assert_eq!(v[1].mount_point, PathBuf::from("/tmp/a b/mnt"));
        assert_eq!((v[1].fstype.as_str(), v[1].source.as_str()), ("fuse", "ioasid"));
        assert!(v[1].is_fuse() && v[1].is_ioasid_fs());
        assert!(v[2].is_fuse() && !v[2].is_ioasid_fs());
        assert_eq!(v[3].mount_point, PathBuf::from("/tmp/y"));
        assert!(!v[3].is_fuse());
        assert!(!v[0].is_fuse());
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape("/a\\011b\\012c\\134d"), PathBuf::from("/a\tb\nc\\d"));
        // Not an escape: left as it is.
        assert_eq!(unescape("/a\\9b\\"), PathBuf::from("/a\\9b\\"));
        assert_eq!(unescape("/a\\77"), PathBuf::from("/a\\77"));
        assert_eq!(unescape("/a\\777"), PathBuf::from("/a\\777"));
    }

    #[test]
    fn resolving_follows_symlinks_but_not_into_the_last_component() {
        let dir = std::env::temp_dir().join(format!("ioasid-fs-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real/mnt")).unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        std::os::unix::fs::symlink("real/mnt", dir.join("mnt-link")).unwrap();
        let real = dir.join("real/mnt").canonicalize().unwrap();
        assert_eq!(resolve(&dir.join("link/mnt")).unwrap(), real);
        assert_eq!(resolve(&dir.join("mnt-link")).unwrap(), real);
        assert_eq!(resolve(&dir.join("real/./mnt")).unwrap(), real);
        assert_eq!(resolve(&dir.join("real/mnt/..")).unwrap(), dir.join("real").canonicalize().unwrap());
        // Absent: named as it would be made.
        assert_eq!(resolve(&dir.join("link/none")).unwrap(), real.parent().unwrap().join("none"));
        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        assert!(
            matches!(resolve(&dir.join("loop")), Err(Error::Resolve(_, e)) if e.raw_os_error() == Some(libc::ELOOP))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
