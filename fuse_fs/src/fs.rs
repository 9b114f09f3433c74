//! The FUSE adapter: a thin layer over [`crate::model`]. Every open takes
//! the tree of the present state and serves the file from that snapshot
//! (direct I/O, so the size a reader gets is the snapshot's); every
//! opendir lists the present state. "Present" is cheap: the core keeps a
//! state generation, and the tree is rebuilt only when it has moved.
//! Attributes and entries have a zero TTL.
//! Everything that would change something is refused with EROFS.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};
use iommu_core::client::Client;

use crate::model::{self, Node};

/// Errors of setting the file system up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The core could not be reached.
    #[error("cannot reach the core at {0}: {1}")]
    Core(PathBuf, String),
    /// Mounting failed.
    #[error("cannot mount on {0}: {1}")]
    Mount(PathBuf, std::io::Error),
}

const TTL: Duration = Duration::ZERO;
/// Most inodes remembered before the table starts over.
const MAX_INODES: usize = 1 << 20;

struct Inodes {
    by_path: HashMap<String, u64>,
    by_ino: HashMap<u64, String>,
    next: u64,
}

impl Inodes {
    fn new() -> Inodes {
        let mut i = Inodes { by_path: HashMap::new(), by_ino: HashMap::new(), next: 2 };
        i.by_path.insert(String::new(), 1);
        i.by_ino.insert(1, String::new());
        i
    }

    fn ino(&mut self, path: &str) -> u64 {
        if let Some(&i) = self.by_path.get(path) {
            return i;
        }
        if self.by_path.len() >= MAX_INODES {
            // Old numbers become stale (ENOENT), never wrong.
            *self = Inodes { next: self.next, ..Inodes::new() };
        }
        let i = self.next;
        self.next += 1;
        self.by_path.insert(path.to_string(), i);
        self.by_ino.insert(i, path.to_string());
        i
    }
}

enum Handle {
    File(Vec<u8>),
    Dir(Vec<(u64, FileType, String)>),
}

/// The file system.
pub struct Fs {
    core: PathBuf,
    client: Mutex<Option<Client>>,
    /// The last tree and the core's state generation it was built at.
    cached: Mutex<Option<(u64, Arc<Node>)>>,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    mounted: SystemTime,
}

impl Fs {
    /// A file system showing the core at `core` (connects at once).
    pub fn new(core: &Path) -> Result<Fs, Error> {
        let c = Client::observer(core).map_err(|e| Error::Core(core.to_path_buf(), e.to_string()))?;
        Ok(Fs {
            core: core.to_path_buf(),
            client: Mutex::new(Some(c)),
            cached: Mutex::new(None),
            inodes: Mutex::new(Inodes::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mounted: SystemTime::now(),
        })
    }

    fn with_client<T>(&self, f: impl FnOnce(&mut Client) -> Result<T, iommu_core::client::Error>) -> Result<T, Errno> {
        let mut g = self.client.lock().map_err(|_| Errno::EIO)?;
        let c = g.as_mut().ok_or(Errno::ENOTCONN)?;
        match f(c) {
            Ok(v) => Ok(v),
            Err(e) if e.errno().is_some() => Err(match e.errno() {
                Some(iommu_core::Errno::ENOENT) => Errno::ENOENT,
                Some(iommu_core::Errno::ETIMEDOUT) => Errno::ETIMEDOUT,
                _ => Errno::EIO,
            }),
            Err(e) => {
                tracing::warn!("the core at {} does not answer: {e}", self.core.display());
                *g = None;
                Err(Errno::ENOTCONN)
            }
        }
    }

    /// The tree of the present state: the last one if the core's state
    /// generation has not moved since (one small request), else a new one.
    pub fn current(&self) -> Result<Arc<Node>, Errno> {
        let gen = self.with_client(|c| c.generation())?;
        if let Ok(c) = self.cached.lock() {
            if let Some((g, t)) = c.as_ref() {
                if *g == gen {
                    return Ok(t.clone());
                }
            }
        }
        self.fetch(gen)
    }

    /// Asks the core for a new tree (and each device server for its
    /// driver state, through the core), recorded as of generation `gen`.
    fn fetch(&self, gen: u64) -> Result<Arc<Node>, Errno> {
        let mut g = self.client.lock().map_err(|_| Errno::EIO)?;
        let c = g.as_mut().ok_or(Errno::ENOTCONN)?;
        let snap = match c.status() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("the core at {} does not answer: {e}", self.core.display());
                *g = None;
                return Err(Errno::ENOTCONN);
            }
        };
        let mut drivers: BTreeMap<(u64, u32), model::Driver> = BTreeMap::new();
        for s in &snap.sessions {
            for d in &s.devices {
                drivers.insert((s.id, d.id), c.driver_state(s.id, d.id).map_err(|e| e.to_string()));
            }
        }
        let t = Arc::new(model::build(&snap, &drivers));
        if let Ok(mut cache) = self.cached.lock() {
            *cache = Some((gen, t.clone()));
        }
        Ok(t)
    }

    /// Attributes of the node at `path` now. A file's size is that of
    /// what an open would serve now.
    fn attr_at(&self, ino: u64, path: &str) -> Result<FileAttr, Errno> {
        let t = self.current()?;
        let n = t.get(path).ok_or(Errno::ENOENT)?;
        let mut a = self.attr(ino, n);
        if let Node::File(_) = n {
            a.size = self.contents(path, n)?.len() as u64;
        }
        Ok(a)
    }

    /// Whether the core still answers.
    pub fn connected(&self) -> bool {
        self.client.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// The bytes of the file at `path` now. Most come from the tree of the
    /// present generation; what changes without the core's state moving is
    /// asked for at this moment: the page-table dump, the core's counters,
    /// and what a device server says (its vPASID map and counters).
    fn contents(&self, path: &str, node: &Node) -> Result<Vec<u8>, Errno> {
        let Node::File(text) = node else { return Err(Errno::EISDIR) };
        let obj = |p: &str| -> Result<(u64, u32), Errno> {
            let (sid, id) = p.split_once('.').ok_or(Errno::ENOENT)?;
            Ok((sid.parse().map_err(|_| Errno::ENOENT)?, id.parse().map_err(|_| Errno::ENOENT)?))
        };
        if let Some(o) = path.strip_prefix("ioas/").and_then(|p| p.strip_suffix("/page_table")) {
            let (sid, id) = obj(o)?;
            let lines = self.with_client(|c| c.page_table(sid, id))?;
            return Ok(model::file_text(lines.join("\n")).into_bytes());
        }
        if path == "stats" {
            let gen = self.with_client(|c| c.generation())?;
            if let Some(Node::File(t)) = self.fetch(gen)?.get("stats") {
                return Ok(t.clone().into_bytes());
            }
        }
        if let Some((o, name)) = path.strip_prefix("devices/").and_then(|p| p.split_once('/')) {
            if matches!(name, "server" | "vpasid_map" | "iotlb" | "dma_faults") {
                let (sid, dev) = obj(o)?;
                let st = self.with_client(|c| Ok(c.driver_state(sid, dev).map_err(|e| e.to_string())))?;
                let files = model::driver_files(sid, Some(&st));
                let text = files.into_iter().find(|(n, _)| *n == name).map(|(_, t)| t).unwrap_or_default();
                return Ok(model::file_text(text).into_bytes());
            }
        }
        Ok(text.clone().into_bytes())
    }

    fn path_of(&self, ino: INodeNo) -> Result<String, Errno> {
        self.inodes.lock().map_err(|_| Errno::EIO)?.by_ino.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn ino_of(&self, path: &str) -> u64 {
        self.inodes.lock().map(|mut i| i.ino(path)).unwrap_or(0)
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let (kind, size, perm, nlink) = match node {
            Node::Dir(m) => (FileType::Directory, 0, 0o555, 2 + m.len() as u32),
            Node::File(s) => (FileType::RegularFile, s.len() as u64, 0o444, 1),
            Node::Link(t) => (FileType::Symlink, t.len() as u64, 0o777, 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::now(),
            mtime: SystemTime::now(),
            ctime: self.mounted,
            crtime: self.mounted,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn new_fh(&self, h: Handle) -> Result<u64, Errno> {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().map_err(|_| Errno::EIO)?.insert(fh, h);
        Ok(fh)
    }
}

fn kind(n: &Node) -> FileType {
    match n {
        Node::Dir(_) => FileType::Directory,
        Node::File(_) => FileType::RegularFile,
        Node::Link(_) => FileType::Symlink,
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let res = (|| {
            let p = self.path_of(parent)?;
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            let path = join(&p, name);
            self.attr_at(self.ino_of(&path), &path)
        })();
        match res {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open file keeps the size of its snapshot.
        if let Some(fh) = fh {
            if let Ok(h) = self.handles.lock() {
                if let Some(Handle::File(b)) = h.get(&fh.0) {
                    let mut a = self.attr(ino.0, &Node::File(String::new()));
                    a.size = b.len() as u64;
                    return reply.attr(&TTL, &a);
                }
            }
        }
        let res = (|| {
            let p = self.path_of(ino)?;
            self.attr_at(ino.0, &p)
        })();
        match res {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let res = (|| {
            let p = self.path_of(ino)?;
            match self.current()?.get(&p) {
                Some(Node::Link(t)) => Ok(t.clone()),
                Some(_) => Err(Errno::EINVAL),
                None => Err(Errno::ENOENT),
            }
        })();
        match res {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & (libc::O_TRUNC | libc::O_CREAT) != 0 {
            return reply.error(Errno::EROFS);
        }
        let res = (|| {
            let p = self.path_of(ino)?;
            // Contents are made now, from the present state.
            let t = self.current()?;
            match t.get(&p) {
                Some(n @ Node::File(_)) => self.new_fh(Handle::File(self.contents(&p, n)?)),
                Some(Node::Dir(_)) => Err(Errno::EISDIR),
                Some(Node::Link(_)) => Err(Errno::ELOOP),
                None => Err(Errno::ENOENT),
            }
        })();
        match res {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Ok(h) = self.handles.lock() else { return reply.error(Errno::EIO) };
        match h.get(&fh.0) {
            Some(Handle::File(b)) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                let end = start.saturating_add(size as usize).min(b.len());
                reply.data(&b[start..end]);
            }
            _ => reply.error(Errno::EBADF),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Ok(mut h) = self.handles.lock() {
            h.remove(&fh.0);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let res = (|| {
            let p = self.path_of(ino)?;
            // The listing is a snapshot taken now.
            let t = self.current()?;
            let Some(Node::Dir(m)) = t.get(&p) else { return Err(Errno::ENOTDIR) };
            let parent = match p.rsplit_once('/') {
                Some((a, _)) => self.ino_of(a),
                None => 1,
            };
            let mut v = vec![(ino.0, FileType::Directory, ".".to_string()), (parent, FileType::Directory, "..".into())];
            for (name, n) in m {
                v.push((self.ino_of(&join(&p, name)), kind(n), name.clone()));
            }
            self.new_fh(Handle::Dir(v))
        })();
        match res {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Ok(h) = self.handles.lock() else { return reply.error(Errno::EIO) };
        let Some(Handle::Dir(v)) = h.get(&fh.0) else { return reply.error(Errno::EBADF) };
        for (i, (ino, k, name)) in v.iter().enumerate().skip(usize::try_from(offset).unwrap_or(usize::MAX)) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *k, name) {
                break;
            }
        }
        reply.ok();
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        match self.path_of(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        if let Ok(mut h) = self.handles.lock() {
            h.remove(&fh.0);
        }
        reply.ok();
    }
}

/// Mounts a file system showing the core at `core` on `mountpoint`,
/// read-only; it is unmounted when the returned session is dropped.
pub fn mount(core: &Path, mountpoint: &Path) -> Result<(fuser::BackgroundSession, Arc<CoreProbe>), Error> {
    let fs = Fs::new(core)?;
    let alive = Arc::new(CoreProbe(core.to_path_buf()));
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("ioasid".into()),
        fuser::MountOption::Subtype("ioasid".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    let s = fuser::spawn_mount(fs, mountpoint, &cfg).map_err(|e| Error::Mount(mountpoint.to_path_buf(), e))?;
    Ok((s, alive))
}

/// Tells whether the core behind a mount still answers.
pub struct CoreProbe(PathBuf);

impl CoreProbe {
    /// True if a hello to the core succeeds now.
    pub fn alive(&self) -> bool {
        Client::observer(&self.0).is_ok()
    }
}
