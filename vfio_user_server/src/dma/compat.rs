//! The compat path: the server's own session with the core, its compat
//! IOAS and the device channel, opened anew for each core reached.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iommu_core::client::Client;
use iommu_core::device::Channel;
use iommu_core::sync;
use iommu_core::tu::{self, TranslationUnit};
use iommu_core::types::BindArgs;

use super::binding::{View, ViewProvider};
use super::client::ClientSlot;
use super::table::FileKey;
use super::{chan_err, session_err, tu_err, Dma, Error};

/// One connection of the compat path to a core: the server's session, its
/// compat IOAS, and the device bound through a channel of that session
/// with its RID attached to the IOAS. A new one is made for each core the
/// server reaches.
pub struct Compat {
    session: Mutex<Client>,
    pub(super) ioas: u32,
    pub(super) tu: Arc<TranslationUnit>,
    pub(super) dev: u32,
    pub(super) core_pid: Option<i32>,
    pub(super) session_id: u64,
    /// Which connection this is (1 for the first; one more per reconnect).
    pub(super) generation: u64,
    /// Memory objects of this session, per file.
    pub(super) mems: Mutex<HashMap<FileKey, u32>>,
    /// Duplicates of the session socket and of the channel, watched for
    /// hang-up.
    pub(super) watch: [Arc<OwnedFd>; 2],
    /// Set when a call found the connection broken.
    pub(super) broken: AtomicBool,
}

impl Compat {
    /// Opens a session on the core at `core`, allocates the compat IOAS,
    /// binds the device through a channel of that session and attaches its
    /// RID to the compat IOAS. With `timeout`, session calls give up after
    /// it (a core that accepts and never answers cannot hold the caller)
    /// until [`Compat::settle`].
    pub(super) fn open(
        core: &Path,
        bind: BindArgs,
        generation: u64,
        timeout: Option<Duration>,
        view: &Arc<Mutex<View>>,
        client: &ClientSlot,
    ) -> Result<Arc<Compat>, Error> {
        let mut session = match timeout {
            Some(t) => Client::session_with_timeout(core, t),
            None => Client::session(core),
        }
        .map_err(session_err)?;
        let dup = |fd: std::os::fd::BorrowedFd<'_>, what: &str| {
            fd.try_clone_to_owned().map(Arc::new).map_err(|e| {
                Error::Core(
                    format!("cannot duplicate the {what} to watch it: {e}"),
                    e.raw_os_error().unwrap_or(libc::EIO),
                )
            })
        };
        let watch_session = dup(session.as_fd(), "core session socket")?;
        let ioas = session.ioas_alloc().map_err(session_err)?;
        let (_, fd) = session.open_device_channel().map_err(session_err)?;
        let watch_channel = dup(fd.as_fd(), "device channel")?;
        let channel = Arc::new(Channel::new(fd).map_err(chan_err)?);
        let provider = ViewProvider::new(view.clone(), true);
        channel.set_driver_state_provider(provider.clone());
        let tu = TranslationUnit::new(channel, tu::Config::default()).map_err(tu_err)?;
        let _ = provider.tu.set(Arc::downgrade(&tu));
        tu.set_client_memory(Some(Arc::new(client.clone())));
        let dev = tu.bind(bind).map_err(tu_err)?.dev_id;
        tu.channel().attach(dev, None, ioas).map_err(chan_err)?;
        Ok(Arc::new(Compat {
            core_pid: session.core_pid(),
            session_id: session.session_id(),
            session: Mutex::new(session),
            ioas,
            tu,
            dev,
            generation,
            mems: Mutex::new(HashMap::new()),
            watch: [watch_session, watch_channel],
            broken: AtomicBool::new(false),
        }))
    }

    /// Session calls wait as long as the core takes again.
    pub(super) fn settle(&self) -> Result<(), Error> {
        sync::lock(&self.session).set_timeout(None).map_err(session_err)
    }

    /// The compat IOAS id.
    pub fn ioas(&self) -> u32 {
        self.ioas
    }

    /// The server's session id.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Device id in the server's session.
    pub fn dev(&self) -> u32 {
        self.dev
    }

    /// Which connection to a core this is: 1 for the first, one more for
    /// each reconnect.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Runs `f` with the server's session.
    pub fn with_session<T>(&self, f: impl FnOnce(&mut Client) -> T) -> T {
        f(&mut sync::lock(&self.session))
    }
}

impl Dma {
    /// The compat path of the core the server is connected to now; `None`
    /// while it has none (the core went away and no new one answered yet).
    pub fn compat(&self) -> Option<Arc<Compat>> {
        sync::read(&self.compat).clone()
    }

    /// True while the server is connected to a core.
    pub fn core_connected(&self) -> bool {
        sync::read(&self.compat).is_some()
    }

    pub(super) fn core_gone(&self) -> Error {
        Error::CoreGone(format!(
            "the core at {} went away and the server has not reached a new one yet",
            self.core.display()
        ))
    }

    /// A call of the compat session; a broken connection marks it so the
    /// watcher replaces it.
    pub(super) fn call<T>(
        &self,
        c: &Compat,
        f: impl FnOnce(&mut Client) -> iommu_core::client::Result<T>,
    ) -> Result<T, Error> {
        let r = c.with_session(f).map_err(session_err);
        if matches!(r, Err(Error::CoreGone(_))) && !c.broken.swap(true, Ordering::AcqRel) {
            self.kick();
        }
        r
    }
}
