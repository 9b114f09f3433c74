//! The FUSE adapter: a thin layer over [`crate::model`]. Every open takes
//! the tree of the present state and serves the file from that snapshot
//! (direct I/O, so the size a reader gets is the snapshot's); every
//! opendir lists the present state. "Present" is cheap: the core keeps a
//! state generation, and the tree is rebuilt only when it has moved.
//! Attributes and entries have a zero TTL.
//! Everything that would change something is refused with EROFS.
//!
//! The connection to the core outlives a core: when the core goes away the
//! mount stays, its root holds only [`UNAVAILABLE`] (every other path fails
//! with `ENOTCONN` at once), and a keeper thread connects again, with
//! backoff, until a core answers on the socket; the tree is then the new
//! core's.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};
use iommu_core::client::Client;
use iommu_core::sync;

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
    /// Unmounting failed.
    #[error("cannot unmount {0}: {1}")]
    Unmount(PathBuf, std::io::Error),
    /// The thread that reconnects to the core could not be started.
    #[error("cannot start the thread that keeps the core connected: {0}")]
    Thread(std::io::Error),
}

/// The one file the root holds while the core is unreachable: a sentence
/// saying which socket and why.
pub const UNAVAILABLE: &str = "core_unavailable";
/// First wait before connecting again to a core that went away; doubled
/// after each failed attempt, up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts to connect again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the keeper thread asks a connected core whether it answers.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

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

/// The connection to the core, as the file system and the keeper thread
/// share it.
struct Link {
    client: Option<Client>,
    /// Counts connections: a tree built over one is never served over
    /// another (a new core's state generations start over).
    epoch: u64,
    /// Why the core is unreachable, while it is.
    why: String,
}

struct Shared {
    core: PathBuf,
    link: Mutex<Link>,
    /// The last tree, the connection and the core's state generation it
    /// was built at. Locked after `link`, never before.
    cached: Mutex<Option<(u64, u64, Arc<Node>)>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Link> {
        sync::lock(&self.link)
    }

    fn connected(&self) -> bool {
        self.lock().client.is_some()
    }

    /// Drops a connection that failed.
    fn lose(&self, link: &mut Link, e: &iommu_core::client::Error) {
        if link.client.take().is_some() {
            tracing::warn!(
                "the core at {} went away ({e}); the mount shows only {UNAVAILABLE} until a core answers there again",
                self.core.display()
            );
        }
        link.why = e.to_string();
    }

    /// Takes a new connection into use.
    fn install(&self, link: &mut Link, c: Client) {
        link.client = Some(c);
        link.epoch += 1;
        link.why.clear();
        *sync::lock(&self.cached) = None;
        tracing::info!("connected to the core at {}; the mount shows its state", self.core.display());
    }

    /// Runs `f` on the connection. A failure of the connection itself
    /// (not a refusal by the core) drops it and connects once more at once
    /// (the core may have been restarted on the socket), then runs `f`
    /// again; without a connection, `ENOTCONN`.
    fn call<T>(
        &self,
        link: &mut Link,
        f: impl Fn(&mut Client) -> Result<T, iommu_core::client::Error>,
    ) -> Result<T, Errno> {
        let mut retried = false;
        loop {
            let c = link.client.as_mut().ok_or(Errno::ENOTCONN)?;
            let e = match f(c) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !broken(&e) {
                return Err(match e.errno() {
                    Some(iommu_core::Errno::ENOENT) => Errno::ENOENT,
                    Some(iommu_core::Errno::ETIMEDOUT) => Errno::ETIMEDOUT,
                    _ => Errno::EIO,
                });
            }
            self.lose(link, &e);
            if retried {
                return Err(Errno::ENOTCONN);
            }
            retried = true;
            match Client::observer(&self.core) {
                Ok(c) => self.install(link, c),
                Err(e) => {
                    link.why = e.to_string();
                    return Err(Errno::ENOTCONN);
                }
            }
        }
    }
}

/// `m` if it is free now, else None. A poisoned `m` is fatal:
/// [`sync::lock`] of it aborts the process.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::WouldBlock) => None,
        Err(TryLockError::Poisoned(p)) => {
            drop(p);
            Some(sync::lock(m))
        }
    }
}

/// Whether an error of a call means the connection is unusable: anything
/// but an answer of the core refusing the request (an I/O error, the core
/// hanging up, a frame that cannot be decoded or does not match).
fn broken(e: &iommu_core::client::Error) -> bool {
    !matches!(e, iommu_core::client::Error::Core(_))
}

/// The keeper thread: connects again, with backoff, while the core is
/// unreachable; pings it while connected, so that a core that went away is
/// noticed without waiting for a reader.
fn keep(shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut backoff = MIN_BACKOFF;
    while !stop.load(Ordering::Relaxed) {
        if shared.connected() {
            backoff = MIN_BACKOFF;
            std::thread::park_timeout(PING_INTERVAL);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // A request under way says as much as a ping.
            if let Some(mut link) = try_lock(&shared.link) {
                if let Some(c) = link.client.as_mut() {
                    match c.generation() {
                        Err(e) if broken(&e) => shared.lose(&mut link, &e),
                        _ => {}
                    }
                }
            }
            continue;
        }
        std::thread::park_timeout(backoff);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // Connecting (a hello) happens without the lock: readers are
        // answered meanwhile.
        match Client::observer(&shared.core) {
            Ok(c) => {
                let mut link = shared.lock();
                if link.client.is_none() {
                    shared.install(&mut link, c);
                }
            }
            Err(e) => {
                tracing::debug!("the core at {} is still unreachable: {e}", shared.core.display());
                if let Some(mut link) = try_lock(&shared.link) {
                    link.why = e.to_string();
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The tree as the file system shows it now.
struct View {
    tree: Arc<Node>,
    /// The core is unreachable: `tree` is the root with [`UNAVAILABLE`].
    offline: bool,
}

impl View {
    fn get(&self, path: &str) -> Result<&Node, Errno> {
        self.tree.get(path).ok_or(if self.offline { Errno::ENOTCONN } else { Errno::ENOENT })
    }
}

/// The file system.
pub struct Fs {
    shared: Arc<Shared>,
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
        let link = Link { client: Some(c), epoch: 1, why: String::new() };
        Ok(Fs {
            shared: Arc::new(Shared { core: core.to_path_buf(), link: Mutex::new(link), cached: Mutex::new(None) }),
            inodes: Mutex::new(Inodes::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mounted: SystemTime::now(),
        })
    }

    fn with_client<T>(&self, f: impl Fn(&mut Client) -> Result<T, iommu_core::client::Error>) -> Result<T, Errno> {
        let mut link = self.shared.lock();
        self.shared.call(&mut link, f)
    }

    /// The tree of the present state: the last one if the core's state
    /// generation has not moved since (one small request), else a new one.
    pub fn current(&self) -> Result<Arc<Node>, Errno> {
        self.tree(false)
    }

    /// The tree of the present state; with `fresh`, built anew even if the
    /// state generation has not moved. The core is asked for it (and each
    /// device server for its driver state, through the core) under one
    /// hold of the connection.
    fn tree(&self, fresh: bool) -> Result<Arc<Node>, Errno> {
        let mut link = self.shared.lock();
        let gen = self.shared.call(&mut link, |c| c.generation())?;
        let epoch = link.epoch;
        if !fresh {
            if let Some((e, g, t)) = sync::lock(&self.shared.cached).as_ref() {
                if (*e, *g) == (epoch, gen) {
                    return Ok(t.clone());
                }
            }
        }
        let snap = self.shared.call(&mut link, |c| c.status())?;
        let c = link.client.as_mut().ok_or(Errno::ENOTCONN)?;
        let mut drivers: BTreeMap<(u64, u32), model::Driver> = BTreeMap::new();
        for s in &snap.sessions {
            for d in &s.devices {
                drivers.insert((s.id, d.id), c.driver_state(s.id, d.id).map_err(|e| e.to_string()));
            }
        }
        let t = Arc::new(model::build(&snap, &drivers));
        // `gen` is of the connection it was asked on.
        if link.epoch == epoch {
            *sync::lock(&self.shared.cached) = Some((epoch, gen, t.clone()));
        }
        Ok(t)
    }

    /// The root while the core is unreachable: [`UNAVAILABLE`] alone.
    fn offline_tree(&self) -> Arc<Node> {
        let why = self.shared.lock().why.clone();
        let text = format!(
            "the core at {} is unreachable ({}); reconnecting\n",
            self.shared.core.display(),
            if why.is_empty() { "the connection failed" } else { why.as_str() }
        );
        Arc::new(Node::Dir(BTreeMap::from([(UNAVAILABLE.to_string(), Node::File(text))])))
    }

    /// What the file system shows now: the present tree, or the offline
    /// root if the core cannot be reached.
    fn view(&self) -> Result<View, Errno> {
        match self.tree(false) {
            Ok(tree) => Ok(View { tree, offline: false }),
            Err(e) if e == Errno::ENOTCONN => Ok(View { tree: self.offline_tree(), offline: true }),
            Err(e) => Err(e),
        }
    }

    /// Attributes of the node at `path` now. A file's size is that of
    /// what an open would serve now.
    fn attr_at(&self, ino: u64, path: &str) -> Result<FileAttr, Errno> {
        let v = self.view()?;
        let n = v.get(path)?;
        let mut a = self.attr(ino, n);
        if let Node::File(_) = n {
            a.size = self.contents(path, n)?.len() as u64;
        }
        Ok(a)
    }

    /// Whether the file system is connected to a core.
    pub fn connected(&self) -> bool {
        self.shared.connected()
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
            if let Some(Node::File(t)) = self.tree(true)?.get("stats") {
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
        sync::lock(&self.inodes).by_ino.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn ino_of(&self, path: &str) -> u64 {
        sync::lock(&self.inodes).ino(path)
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

    fn new_fh(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        sync::lock(&self.handles).insert(fh, h);
        fh
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
            let h = sync::lock(&self.handles);
            if let Some(Handle::File(b)) = h.get(&fh.0) {
                let mut a = self.attr(ino.0, &Node::File(String::new()));
                a.size = b.len() as u64;
                return reply.attr(&TTL, &a);
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
            match self.view()?.get(&p)? {
                Node::Link(t) => Ok(t.clone()),
                _ => Err(Errno::EINVAL),
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
            let v = self.view()?;
            match v.get(&p)? {
                n @ Node::File(_) => Ok(self.new_fh(Handle::File(self.contents(&p, n)?))),
                Node::Dir(_) => Err(Errno::EISDIR),
                Node::Link(_) => Err(Errno::ELOOP),
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
        let h = sync::lock(&self.handles);
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
        sync::lock(&self.handles).remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let res = (|| {
            let p = self.path_of(ino)?;
            // The listing is a snapshot taken now.
            let v = self.view()?;
            let Node::Dir(m) = v.get(&p)? else { return Err(Errno::ENOTDIR) };
            let parent = match p.rsplit_once('/') {
                Some((a, _)) => self.ino_of(a),
                None => 1,
            };
            let mut v = vec![(ino.0, FileType::Directory, ".".to_string()), (parent, FileType::Directory, "..".into())];
            for (name, n) in m {
                v.push((self.ino_of(&join(&p, name)), kind(n), name.clone()));
            }
            Ok(self.new_fh(Handle::Dir(v)))
        })();
        match res {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let h = sync::lock(&self.handles);
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
        sync::lock(&self.handles).remove(&fh.0);
        reply.ok();
    }
}

/// A mounted file system and the thread that keeps it connected to the
/// core. Dropping it unmounts.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    keeper: Option<std::thread::JoinHandle<()>>,
    mountpoint: PathBuf,
}

impl Mount {
    /// Whether it is connected to a core now.
    pub fn connected(&self) -> bool {
        self.shared.connected()
    }

    /// Whether the FUSE session ended (the mount was removed from outside).
    pub fn finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the FUSE session to end.
    pub fn umount_and_join(mut self) -> Result<(), Error> {
        self.stop_keeper();
        match self.session.take() {
            Some(s) => s.umount_and_join().map_err(|e| Error::Unmount(self.mountpoint.clone(), e)),
            None => Ok(()),
        }
    }

    /// Tells the keeper thread to end. It is not waited for: it may be in
    /// the middle of a hello to a core that does not answer; it ends at its
    /// next step.
    fn stop_keeper(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(k) = self.keeper.take() {
            k.thread().unpark();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop_keeper();
    }
}

/// Mounts a file system showing the core at `core` on `mountpoint`,
/// read-only, and starts the thread that connects again when the core
/// goes away; it is unmounted when the returned [`Mount`] is dropped.
pub fn mount(core: &Path, mountpoint: &Path) -> Result<Mount, Error> {
    let fs = Fs::new(core)?;
    let shared = fs.shared.clone();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("ioasid".into()),
        fuser::MountOption::Subtype("ioasid".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    let session = fuser::spawn_mount(fs, mountpoint, &cfg).map_err(|e| Error::Mount(mountpoint.to_path_buf(), e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut m = Mount {
        session: Some(session),
        shared: shared.clone(),
        stop: stop.clone(),
        keeper: None,
        mountpoint: mountpoint.to_path_buf(),
    };
    let keeper = std::thread::Builder::new()
        .name("core-keeper".into())
        .spawn(move || keep(shared, stop))
        .map_err(Error::Thread)?;
    m.keeper = Some(keeper);
    Ok(m)
}
