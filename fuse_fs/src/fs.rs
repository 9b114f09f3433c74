//! The FUSE adapter: a thin layer over [`crate::model`]. Every open makes
//! the file's contents from the present state and serves them from that
//! snapshot (direct I/O, so the size a reader gets is the snapshot's);
//! every opendir lists the present state.
//!
//! "Present" is cheap. The core publishes its state generation in a page
//! this file system maps read-only, so whether anything changed is one
//! load (and a zero-timeout poll of the connection, to notice a core that
//! went away). The tree (names, attributes, the small files) is kept for
//! one generation and built again, from a snapshot without mappings, only
//! when the generation moved; the texts of the large files are kept too:
//! an IOAS's `mappings` while its change count stays the same (read from
//! the core in bounded pieces, rendered as they arrive), a page-table dump
//! for one generation. Lookups, `stat` and listings therefore ask the
//! core nothing while the state stands still; attributes are never cached
//! by the kernel (zero attribute TTL), names are (an entry TTL), which is
//! exact because an inode number names one path and every operation on
//! it checks that path against the present tree.
//! Everything that would change something is refused with EROFS.
//!
//! The connection to the core outlives a core: when the core goes away the
//! mount stays, its root holds only [`UNAVAILABLE`] (every other path fails
//! with `ENOTCONN` at once), and a keeper thread connects again, with
//! backoff, until a core answers on the socket; the tree is then the new
//! core's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, Request,
};
use iommu_core::client::{Client, GenerationPage};
use iommu_core::sync;

use crate::model::{self, Live, Node};

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

/// How long the kernel may keep a name it looked up without asking again.
/// Exact whatever its length: an inode number stands for one path for
/// the life of the mount, and every operation on it (stat, open, listing,
/// readlink) checks that path against the present tree, so a name that
/// went away fails at once; names that did not exist are never cached.
const ENTRY_TTL: Duration = Duration::from_secs(1);
/// Attributes are never kept by the kernel: a `stat` always asks.
const ATTR_TTL: Duration = Duration::ZERO;
/// Mappings asked of the core per piece (about 14 bytes each on the
/// wire): the most a reply holds, so that an IOAS of up to that many
/// mappings is read in one request, which no other request can come
/// between (a listing of several pieces starts over when the IOAS changed
/// between two of them).
pub const MAPPINGS_PIECE: u32 = iommu_core::wire::MAPPINGS_PAGE;
/// Times a listing of an IOAS's mappings starts over because the IOAS
/// changed between two of its pieces, before the open fails with EAGAIN.
pub const PIECE_TRIES: usize = 8;
/// Most bytes of texts kept across opens (mappings and page tables).
const TEXT_CACHE_BYTES: usize = 64 << 20;

enum Handle {
    File(Arc<[u8]>),
    Dir(Vec<(u64, FileType, String)>),
}

/// The connection to the core, as the file system and the keeper thread
/// share it.
struct Link {
    client: Option<Client>,
    /// The core's generation page, when it gave one: the generation
    /// without a round trip.
    page: Option<GenerationPage>,
    /// Counts connections: a tree built over one is never served over
    /// another (a new core's state generations start over).
    epoch: u64,
    /// Why the core is unreachable, while it is.
    why: String,
}

/// The tree of one state generation of one connection.
struct TreeAt {
    epoch: u64,
    gen: u64,
    root: Arc<Node>,
}

/// Texts of live files kept across opens, each under the key that says
/// when it is still the present.
#[derive(Default)]
struct Texts {
    /// `mappings` by (epoch, session, IOAS, change count).
    mappings: HashMap<(u64, u64, u32, u64), Arc<[u8]>>,
    /// `page_table` by (epoch, generation, session, IOAS).
    tables: HashMap<(u64, u64, u64, u32), Arc<[u8]>>,
    bytes: usize,
}

impl Texts {
    /// Keeps only what a tree of (`epoch`, `gen`) can still show: its
    /// generation's page tables and the mappings whose change count it
    /// shows (a count only grows, so an older one never comes back).
    fn prune(&mut self, epoch: u64, gen: u64, live: &HashSet<(u64, u32, u64)>) {
        self.tables.retain(|k, _| (k.0, k.1) == (epoch, gen));
        self.mappings.retain(|k, _| k.0 == epoch && live.contains(&(k.1, k.2, k.3)));
        self.bytes = self.tables.values().chain(self.mappings.values()).map(|t| t.len()).sum();
    }

    /// Room for `len` more bytes: everything goes when there is not.
    fn make_room(&mut self, len: usize) -> bool {
        if self.bytes + len > TEXT_CACHE_BYTES {
            self.tables.clear();
            self.mappings.clear();
            self.bytes = 0;
        }
        if len > TEXT_CACHE_BYTES {
            return false;
        }
        self.bytes += len;
        true
    }
}

struct Shared {
    core: PathBuf,
    link: Mutex<Link>,
    /// The last tree. Locked after `link`, never before.
    cached: Mutex<Option<Arc<TreeAt>>>,
    /// Texts kept across opens. Locked after `link`, never before.
    texts: Mutex<Texts>,
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
        link.page = None;
        if link.client.take().is_some() {
            tracing::warn!(
                "the core at {} went away ({e}); the mount shows only {UNAVAILABLE} until a core answers there again",
                self.core.display()
            );
        }
        link.why = e.to_string();
    }

    /// Takes a new connection into use, with the core's generation page if
    /// it gives one.
    fn install(&self, link: &mut Link, mut c: Client) {
        link.page = c.generation_page().ok();
        link.client = Some(c);
        link.epoch += 1;
        link.why.clear();
        *sync::lock(&self.cached) = None;
        *sync::lock(&self.texts) = Texts::default();
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
                    Some(iommu_core::Errno::EAGAIN) => Errno::EAGAIN,
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

    /// The core's state generation now: read from its page while the
    /// connection stands (a zero-timeout poll says whether the core hung
    /// up), else asked (which notices a broken connection and connects
    /// again).
    fn generation(&self, link: &mut Link) -> Result<u64, Errno> {
        if let (Some(c), Some(p)) = (&link.client, &link.page) {
            if !hung_up(c) {
                return Ok(p.load());
            }
        }
        self.call(link, |c| c.generation())
    }

    /// Every IOAS's mappings, rendered, read in pieces of at most
    /// [`MAPPINGS_PIECE`] over one connection; the pieces of one listing
    /// all show the same change count (else it starts over, at most
    /// [`PIECE_TRIES`] times: EAGAIN). Returns the count and the text.
    fn fetch_mappings(&self, link: &mut Link, sid: u64, ioas: u32) -> Result<(u64, String), Errno> {
        'attempt: for _ in 0..PIECE_TRIES {
            let epoch = link.epoch;
            let mut out = String::new();
            let mut from = 0;
            let mut changes = None;
            loop {
                let p = self.call(link, |c| c.mappings_piece(sid, ioas, from, MAPPINGS_PIECE))?;
                if link.epoch != epoch || changes.is_some_and(|c| c != p.changes) {
                    continue 'attempt;
                }
                changes = Some(p.changes);
                if out.is_empty() {
                    // About 57 bytes a line.
                    out.reserve(usize::try_from(p.total).unwrap_or(0).saturating_mul(60).min(1 << 26));
                }
                model::mapping_lines(sid, &p.mappings, &mut out);
                match p.mappings.last() {
                    Some(m) if p.mappings.len() == MAPPINGS_PIECE as usize && m.iova < u64::MAX => from = m.iova + 1,
                    _ => return Ok((p.changes, out)),
                }
            }
        }
        Err(Errno::EAGAIN)
    }
}

/// Whether the core closed the connection (or it failed): a peek that
/// does not wait (end of file: closed; nothing to read: open).
fn hung_up(c: &Client) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    match recv(c.as_fd().as_raw_fd(), &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(0) => true,
        Ok(_) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// The (session, IOAS, change count) of every live `mappings` of a tree.
fn live_mappings(root: &Node) -> HashSet<(u64, u32, u64)> {
    let mut out = HashSet::new();
    if let Some(Node::Dir(m)) = root.get("ioas") {
        for d in m.values() {
            if let Some(Node::Live(Live::Mappings { sid, ioas, changes })) = d.get("mappings") {
                out.insert((*sid, *ioas, *changes));
            }
        }
    }
    out
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
    tree: Arc<TreeAt>,
    /// The core is unreachable: `tree` is the root with [`UNAVAILABLE`].
    offline: bool,
}

impl View {
    fn get(&self, path: &str) -> Result<&Node, Errno> {
        self.tree.root.get(path).ok_or(if self.offline { Errno::ENOTCONN } else { Errno::ENOENT })
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
        let shared = Arc::new(Shared {
            core: core.to_path_buf(),
            link: Mutex::new(Link { client: None, page: None, epoch: 0, why: String::new() }),
            cached: Mutex::new(None),
            texts: Mutex::new(Texts::default()),
        });
        shared.install(&mut shared.lock(), c);
        Ok(Fs {
            shared,
            inodes: Mutex::new(Inodes::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mounted: SystemTime::now(),
        })
    }

    /// The tree of the present state: the last one if the core's state
    /// generation has not moved since (read from the generation page: no
    /// round trip), else one built from a new snapshot without mappings.
    pub fn current(&self) -> Result<Arc<Node>, Errno> {
        self.tree().map(|t| t.root.clone())
    }

    fn tree(&self) -> Result<Arc<TreeAt>, Errno> {
        let mut link = self.shared.lock();
        let gen = self.shared.generation(&mut link)?;
        let epoch = link.epoch;
        if let Some(t) = sync::lock(&self.shared.cached).as_ref() {
            if (t.epoch, t.gen) == (epoch, gen) {
                return Ok(t.clone());
            }
        }
        let snap = self.shared.call(&mut link, |c| c.overview())?;
        let root = Arc::new(model::build(&snap));
        let t = Arc::new(TreeAt { epoch, gen, root });
        // `gen` is of the connection it was asked on.
        if link.epoch == epoch {
            sync::lock(&self.shared.texts).prune(epoch, gen, &live_mappings(&t.root));
            *sync::lock(&self.shared.cached) = Some(t.clone());
        }
        Ok(t)
    }

    /// The root while the core is unreachable: [`UNAVAILABLE`] alone.
    fn offline_tree(&self) -> Arc<TreeAt> {
        let why = self.shared.lock().why.clone();
        let text = format!(
            "the core at {} is unreachable ({}); reconnecting\n",
            self.shared.core.display(),
            if why.is_empty() { "the connection failed" } else { why.as_str() }
        );
        let root = Arc::new(Node::Dir(BTreeMap::from([(UNAVAILABLE.to_string(), Node::File(text))])));
        Arc::new(TreeAt { epoch: 0, gen: 0, root })
    }

    /// What the file system shows now: the present tree, or the offline
    /// root if the core cannot be reached.
    fn view(&self) -> Result<View, Errno> {
        match self.tree() {
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
        if let Node::Live(l) = n {
            a.size = self.live(&v.tree, l)?.len() as u64;
            a.blocks = a.size.div_ceil(512);
        }
        Ok(a)
    }

    /// Whether the file system is connected to a core.
    pub fn connected(&self) -> bool {
        self.shared.connected()
    }

    /// The bytes of the file `node` of tree `at` now.
    fn contents(&self, at: &TreeAt, node: &Node) -> Result<Arc<[u8]>, Errno> {
        match node {
            Node::File(t) => Ok(Arc::from(t.as_bytes())),
            Node::Live(l) => self.live(at, l),
            Node::Dir(_) => Err(Errno::EISDIR),
            Node::Link(_) => Err(Errno::ELOOP),
        }
    }

    /// The bytes of a live file of tree `at` now: kept texts where they
    /// are still the present, else asked of the core (or, through it, of
    /// a device server).
    fn live(&self, at: &TreeAt, l: &Live) -> Result<Arc<[u8]>, Errno> {
        let sh = &self.shared;
        let text = |s: String| Arc::from(s.into_bytes());
        match *l {
            Live::Stats => {
                let c = sh.call(&mut sh.lock(), |c| c.counters())?;
                Ok(text(model::stats_text(&c)))
            }
            Live::Driver { sid, dev, file } => {
                let st = sh.call(&mut sh.lock(), |c| Ok(c.driver_state(sid, dev).map_err(|e| e.to_string())))?;
                Ok(text(model::driver_text(sid, Some(&st), file)))
            }
            Live::PageTable { sid, ioas } => {
                let key = (at.epoch, at.gen, sid, ioas);
                if let Some(t) = sync::lock(&sh.texts).tables.get(&key) {
                    return Ok(t.clone());
                }
                let mut link = sh.lock();
                let lines = sh.call(&mut link, |c| c.page_table(sid, ioas))?;
                let t: Arc<[u8]> = text(model::page_table_text(&lines));
                let mut texts = sync::lock(&sh.texts);
                // Kept only while it is the present: same connection,
                // same generation.
                if (link.epoch, sh.generation(&mut link).ok()) == (at.epoch, Some(at.gen)) && texts.make_room(t.len()) {
                    texts.tables.insert(key, t.clone());
                }
                Ok(t)
            }
            Live::Mappings { sid, ioas, changes } => {
                if let Some(t) = sync::lock(&sh.texts).mappings.get(&(at.epoch, sid, ioas, changes)) {
                    return Ok(t.clone());
                }
                let mut link = sh.lock();
                let (changes, s) = sh.fetch_mappings(&mut link, sid, ioas)?;
                let t: Arc<[u8]> = text(s);
                let mut texts = sync::lock(&sh.texts);
                if link.epoch == at.epoch && texts.make_room(t.len()) {
                    texts.mappings.insert((at.epoch, sid, ioas, changes), t.clone());
                }
                Ok(t)
            }
        }
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
            Node::Live(_) => (FileType::RegularFile, 0, 0o444, 1),
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
        Node::File(_) | Node::Live(_) => FileType::RegularFile,
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
            Ok(a) => reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &a, Generation(0)),
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
                a.blocks = a.size.div_ceil(512);
                return reply.attr(&ATTR_TTL, &a);
            }
        }
        let res = (|| {
            let p = self.path_of(ino)?;
            self.attr_at(ino.0, &p)
        })();
        match res {
            Ok(a) => reply.attr(&ATTR_TTL, &a),
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
            let n = v.get(&p)?;
            Ok(self.new_fh(Handle::File(self.contents(&v.tree, n)?)))
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
        let b = match sync::lock(&self.handles).get(&fh.0) {
            Some(Handle::File(b)) => b.clone(),
            _ => return reply.error(Errno::EBADF),
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
        let end = start.saturating_add(size as usize).min(b.len());
        reply.data(&b[start..end]);
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
            let mut v = Vec::with_capacity(m.len() + 2);
            v.push((ino.0, FileType::Directory, ".".to_string()));
            v.push((parent, FileType::Directory, "..".into()));
            let mut inodes = sync::lock(&self.inodes);
            let mut path = p.clone();
            for (name, n) in m {
                path.truncate(p.len());
                if !p.is_empty() {
                    path.push('/');
                }
                path.push_str(name);
                v.push((inodes.ino(&path), kind(n), name.clone()));
            }
            drop(inodes);
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

    // Answered, though it has nothing to do: a close of a file of this
    // mount then waits for this file system, as for any FUSE file system
    // (the core's refusal of a stalled mount's files relies on it).
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    // `getxattr` and `listxattr` are left to their defaults (ENOSYS): the
    // kernel then stops asking (there are no extended attributes).

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
        // No `default_permissions`: the kernel lets only the mounting user
        // in (no `allow_other`) and the mount is read-only, so the mode
        // bits decide nothing; with it, the kernel would ask for the
        // attributes of every directory a path walk crosses (they are
        // never kept).
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
