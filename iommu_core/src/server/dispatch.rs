//! Request dispatch: each request checked against its connection's role
//! and served by the model, driver-state queries relayed to device
//! channels, and the device channels the core makes.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::Token;

use super::conn::{is_refused_stand_in, queue, queue_notice, STASH_LIMIT};
use super::Server;
use crate::errno::Errno;
use crate::model;
use crate::wire::{self, Envelope, Notice, Reply, Request, Role};

/// A driver-state query relayed to a device channel.
pub(super) struct DriverWaiter {
    pub(super) asker: Token,
    seq: u64,
    pub(super) chan: u64,
    pub(super) deadline: Instant,
}

/// Driver-state queries one peer may have waiting at once.
pub const DRIVER_QUERIES_PER_ASKER: usize = 4;
/// Driver-state queries waiting on one device channel at once.
pub const DRIVER_QUERIES_PER_CHANNEL: usize = 16;

/// Most lines of a page-table dump (about 80 bytes each).
const PAGE_TABLE_LINES: usize = 8192;

/// How long a device server has to answer a driver-state query.
const DRIVER_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

impl Server {
    pub(super) fn handle_decoded(
        &mut self,
        token: Token,
        env: Result<Envelope<Request>, wire::Error>,
        fds: Vec<OwnedFd>,
    ) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        match env {
            Ok(env) => self.handle(token, env, fds),
            Err(e) => {
                tracing::warn!(pid = conn.pid, error = %e, "undecodable request; closing the connection");
                queue(conn, 0, &Reply::error(Errno::EPROTO, e.to_string()), Vec::new());
                conn.closing = true;
            }
        }
    }

    pub(super) fn handle(&mut self, token: Token, env: Envelope<Request>, fds: Vec<OwnedFd>) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        if conn.blocked && !matches!(env.body, Request::InvalidateDone { .. }) {
            if conn.stash.len() >= STASH_LIMIT {
                queue(conn, 0, &Reply::error(Errno::E2BIG, "too many requests queued behind a held one"), Vec::new());
                conn.closing = true;
            } else {
                conn.stash.push_back((env, fds));
            }
            return;
        }
        let seq = env.seq;
        if !env.body.read_only() || matches!(env.body, Request::Hello { .. }) {
            self.generation += 1;
        }
        // The request's effects: settled with its reply.
        let mut fx = model::Effects::default();
        let answer = self.dispatch(token, seq, env.body, fds, &mut fx);
        let Some((reply, out_fds)) = answer else {
            // Answered later (or a job that took its effects along): what
            // it caused now is settled now, with no reply.
            if !fx.is_empty() {
                self.apply_effects(None, seq, Reply::Ok, Vec::new(), fx);
            }
            return;
        };
        self.core.count_request(matches!(reply, Reply::Error { .. }));
        self.apply_effects(Some(token), seq, reply, out_fds, fx);
    }

    /// Serves one request; what it causes goes into `fx`. `None`: no reply
    /// now (an invalidation answer, a page request answered later, or a
    /// job started, which takes `fx` along).
    fn dispatch(
        &mut self,
        token: Token,
        seq: u64,
        req: Request,
        fds: Vec<OwnedFd>,
        fx: &mut model::Effects,
    ) -> Option<(Reply, Vec<OwnedFd>)> {
        let conn = self.conns.get_mut(&token)?;
        let plain = |r: Reply| Some((r, Vec::new()));
        let stand_ins = fds.iter().filter(|f| is_refused_stand_in(f.as_fd())).count();
        if stand_ins > 0 {
            let mut why = String::new();
            for _ in 0..stand_ins {
                why = conn.refused.pop_front().unwrap_or_default();
            }
            return plain(Reply::error(Errno::EINVAL, why));
        }
        if fds.len() != req.fds_expected() {
            return plain(Reply::error(
                Errno::EBADF,
                format!("this request takes {} fds, {} were attached", req.fds_expected(), fds.len()),
            ));
        }
        let Some(role) = conn.role else {
            let Request::Hello { magic, major, minor, role } = req else {
                conn.closing = true;
                return plain(Reply::error(Errno::EPROTO, "the first message must be a hello"));
            };
            if magic != wire::MAGIC {
                conn.closing = true;
                return plain(Reply::error(Errno::EPROTO, "bad magic in hello"));
            }
            if major != wire::VERSION_MAJOR {
                conn.closing = true;
                return plain(Reply::error(
                    Errno::EOPNOTSUPP,
                    format!("protocol {major}.{minor} is not supported; this core speaks {}.x", wire::VERSION_MAJOR),
                ));
            }
            let (pid, uid, is_channel) = (conn.pid, conn.uid, conn.channel != 0);
            let session = match (role, is_channel) {
                (Role::DeviceChannel, true) => conn.session,
                (_, true) => {
                    conn.closing = true;
                    return plain(Reply::error(
                        Errno::EPERM,
                        "a device channel can only say hello as a device channel",
                    ));
                }
                (Role::Session, false) => match self.core.open_session(pid, uid) {
                    Ok(s) => s,
                    Err(e) => {
                        if let Some(c) = self.conns.get_mut(&token) {
                            c.closing = true;
                        }
                        return plain(Reply::error(e.errno, e.message));
                    }
                },
                (Role::Observer, false) => 0,
                (Role::DeviceChannel, false) => {
                    conn.closing = true;
                    return plain(Reply::error(
                        Errno::EPERM,
                        "device channels are made by the core and handed to a session; they cannot be opened on the socket",
                    ));
                }
            };
            let conn = self.conns.get_mut(&token)?;
            conn.role = Some(role);
            conn.session = session;
            tracing::info!(pid, uid, session, ?role, "hello");
            return plain(Reply::Hello {
                major: wire::VERSION_MAJOR,
                minor: wire::VERSION_MINOR,
                session,
                limits: *self.core.limits(),
            });
        };
        if matches!(req, Request::Hello { .. }) {
            return plain(Reply::error(Errno::EPROTO, "hello was already sent on this connection"));
        }
        if role == Role::Observer && !req.read_only() {
            return plain(Reply::error(Errno::EPERM, "observers are read-only"));
        }
        if role == Role::Session && req.channel_only() {
            return plain(Reply::error(Errno::EPERM, "this request is for device channels"));
        }
        if role == Role::DeviceChannel && !req.channel_only() && !req.read_only() {
            return plain(Reply::error(Errno::EPERM, "this request is for sessions"));
        }
        let sid = conn.session;
        let chan = conn.channel;
        let only = (role != Role::Observer).then_some(sid);
        let mut fds = fds.into_iter();
        let core = &mut self.core;
        let res: model::Result<Reply> = match req {
            Request::Hello { .. } => Ok(Reply::Ok),
            Request::RegisterMemory => match fds.next() {
                Some(fd) => core.register_memory(sid, fd).map(Reply::Memory),
                None => Ok(Reply::error(Errno::EBADF, "no fd attached")),
            },
            Request::RegisterClientMemory { size, writable, address } => {
                core.register_client_memory(sid, size, writable, address).map(Reply::Memory)
            }
            Request::IoasAlloc => core.ioas_alloc(sid).map(Reply::Id),
            Request::NestedAlloc { parent, s1_root } => core.nested_alloc(sid, parent, s1_root).map(Reply::Id),
            Request::Destroy { id } => core.destroy(sid, id, fx).map(|_| Reply::Ok),
            Request::Map(a) => match core.map_begin(sid, a, fx) {
                Ok(model::Started::Job(job)) => return self.start_job(token, seq, job, Reply::Iova, fx),
                r => r.map(|s| Reply::Iova(s.done())),
            },
            Request::Unmap { ioas, iova, length } => match core.unmap_begin(sid, ioas, iova, length, fx) {
                Ok(model::Started::Job(job)) => return self.start_job(token, seq, job, Reply::Bytes, fx),
                r => r.map(|s| Reply::Bytes(s.done())),
            },
            Request::MapBatch { ioas, entries } => core.map_batch(sid, ioas, &entries, fx).map(Reply::Iovas),
            Request::UnmapBatch { ioas, ranges } => match core.unmap_batch_begin(sid, ioas, &ranges, fx) {
                Ok(model::Started::Job(job)) => return self.start_job(token, seq, job, Reply::Bytes, fx),
                r => r.map(|s| Reply::Bytes(s.done())),
            },
            Request::Copy(a) => core.copy(sid, a, fx).map(Reply::Iova),
            Request::IovaRanges { ioas } => core.iova_ranges(sid, ioas).map(Reply::Ranges),
            Request::AllowIovas { ioas, ranges } => core.allow_iovas(sid, ioas, ranges).map(|_| Reply::Ok),
            Request::AddReserved { ioas, start, last } => core.add_reserved(sid, ioas, start, last).map(|_| Reply::Ok),
            Request::InvalidateStage1 { nested, scope } => core.invalidate(sid, nested, scope, fx).map(|_| Reply::Ok),
            Request::PpasidAlloc => core.ppasid_alloc(sid).map(Reply::Pasid),
            Request::PpasidFree { pasid } => core.ppasid_free(sid, pasid).map(|_| Reply::Ok),
            Request::SetDirtyTracking { ioas, enable } => {
                core.set_dirty_tracking(sid, ioas, enable, fx).map(|_| Reply::Ok)
            }
            Request::SetPageFaults { ioas, enable } => core.set_page_faults(sid, ioas, enable, fx).map(|_| Reply::Ok),
            Request::DirtyBitmap(a) => core.dirty_bitmap(sid, a).map(Reply::Bitmap),
            Request::ReadFaults { max } => core.read_faults(sid, max).map(Reply::Faults),
            Request::RespondFault { cookie, code } => {
                let r = core.respond_fault(sid, cookie, code);
                if r.is_ok() {
                    if let Some((t, s)) = self.page_waiters.remove(&cookie) {
                        if let Some(c) = self.conns.get_mut(&t) {
                            queue(c, s, &Reply::PageResponse { code }, Vec::new());
                            self.backlog.push_back(t);
                        }
                    }
                }
                r.map(Reply::Fault)
            }
            Request::Translate { ioas, iova } => core.translate(sid, ioas, iova).map(Reply::Translation),
            Request::Status => {
                // A reply lists at most MAPPINGS_PAGE mappings in all; the
                // rest are paged with Mappings.
                Ok(Reply::Status(Box::new(core.snapshot_limited(only, wire::MAPPINGS_PAGE as usize))))
            }
            Request::Mappings { session, ioas, from, max } => core
                .mappings_page(only, session, ioas, from, max.min(wire::MAPPINGS_PAGE) as usize)
                .map(Reply::Mappings),
            Request::OpenDeviceChannel => return Some(self.open_channel(sid, fx)),
            Request::BindDevice(a) => core.bind_device(chan, a).map(Reply::Device),
            Request::UnbindDevice { dev } => core.unbind_device(chan, dev, fx).map(|_| Reply::Ok),
            Request::Attach { dev, pasid, pt_id, replace } => {
                core.attach(chan, dev, pasid, pt_id, replace, fx).map(|_| Reply::Ok)
            }
            Request::Detach { dev, pasid } => core.detach(chan, dev, pasid, fx).map(|_| Reply::Ok),
            Request::DevicePasidAlloc { dev } => core.device_ppasid_alloc(chan, dev).map(Reply::Pasid),
            Request::DevicePasidFree { dev, pasid } => core.device_ppasid_free(chan, dev, pasid).map(|_| Reply::Ok),
            Request::GetPools => {
                let (Some(pool), Some(dirty)) =
                    (core.channel_session(chan).and_then(|s| core.pool(s)), core.channel_dirty_pool(chan))
                else {
                    return plain(Reply::error(Errno::ENOENT, "the channel's session is gone"));
                };
                // The session's own pools: the table pool read-only (the
                // kernel refuses any writable route to it, see
                // `TablePool`), the dirty pool read-write.
                let fds = [reopen_read_only(pool.fd()), dirty.fd().try_clone_to_owned()];
                return Some(match fds {
                    [Ok(a), Ok(b)] => {
                        (Reply::Pools { table_bytes: pool.size(), dirty_bytes: dirty.size() }, vec![a, b])
                    }
                    _ => (Reply::error(Errno::ENOMEM, "cannot duplicate the pool fds"), Vec::new()),
                });
            }
            Request::GetMemory { system_address } => {
                return Some(match core.memory_at(chan, system_address) {
                    Ok(model::MemoryAt::File { base, size, sealed, file }) => match file.try_clone() {
                        Ok(f) => (Reply::MemoryFd { base, size, sealed }, vec![OwnedFd::from(f)]),
                        Err(e) => (Reply::error(Errno::ENOMEM, format!("cannot duplicate the fd: {e}")), Vec::new()),
                    },
                    Ok(model::MemoryAt::Client { base, size, address }) => {
                        (Reply::ClientMemory { base, size, address }, Vec::new())
                    }
                    Err(e) => (Reply::error(e.errno, e.message), Vec::new()),
                })
            }
            Request::ReportFault(rec) => core.device_fault(chan, rec, false).map(|_| Reply::Ok),
            Request::PageRequest(rec) => match core.device_fault(chan, rec, true) {
                Ok(cookie) => {
                    self.page_waiters.insert(cookie, (token, seq));
                    return None;
                }
                Err(e) => Err(e),
            },
            Request::Generation => Ok(Reply::Generation(self.generation.get())),
            Request::PageTable { session, ioas } => {
                if role != Role::Observer && session != sid {
                    return plain(Reply::error(Errno::ENOENT, format!("no IOAS {ioas} in this session")));
                }
                core.page_table(session, ioas, PAGE_TABLE_LINES).map(Reply::Lines)
            }
            Request::DriverState { session, dev } => {
                if role != Role::Observer && session != sid {
                    return plain(Reply::error(Errno::ENOENT, format!("no device {dev} in this session")));
                }
                let qchan = match core.device_channel(session, dev) {
                    Ok(c) => c,
                    Err(e) => return plain(Reply::error(e.errno, e.message)),
                };
                let Some(t) = self.chan_tokens.get(&qchan).copied() else {
                    return plain(Reply::error(Errno::ENOENT, "the device's channel is closed"));
                };
                // Queries wait on a device server: a peer may have only a
                // few out, and a channel only a few to answer.
                let by_asker = self.driver_waiters.values().filter(|w| w.asker == token).count();
                let by_chan = self.driver_waiters.values().filter(|w| w.chan == qchan).count();
                if by_asker >= DRIVER_QUERIES_PER_ASKER || by_chan >= DRIVER_QUERIES_PER_CHANNEL {
                    return plain(Reply::error(
                        Errno::EBUSY,
                        "too many driver-state queries are waiting; ask again when they are answered",
                    ));
                }
                let id = self.next_query;
                self.next_query += 1;
                if let Some(c) = self.conns.get_mut(&t) {
                    queue_notice(c, &Notice::DriverQuery { id, dev });
                    self.backlog.push_back(t);
                }
                let deadline = Instant::now() + DRIVER_QUERY_TIMEOUT;
                self.driver_waiters.insert(id, DriverWaiter { asker: token, seq, chan: qchan, deadline });
                return None;
            }
            Request::DriverStateDone { id, state } => {
                // Only the channel the query went to can answer it.
                if self.driver_waiters.get(&id).is_some_and(|w| w.chan == chan) {
                    let reply = if state.within_limits() {
                        Reply::DriverState(state)
                    } else {
                        Reply::error(Errno::E2BIG, "the device server's answer exceeds the limits")
                    };
                    self.answer_query(id, reply);
                }
                return None;
            }
            Request::InvalidateDone { id } => {
                // Only the channel the invalidation went to can answer it.
                let op = self.inval_owner.get(&id).copied();
                let mine = op.and_then(|op| self.held.get(&op)).is_some_and(|o| o.waiting.get(&chan) == Some(&id));
                if let (Some(op), true) = (op, mine) {
                    self.inval_owner.remove(&id);
                    let done = self.held.get_mut(&op).map(|o| {
                        o.waiting.remove(&chan);
                        o.waiting.is_empty()
                    });
                    if done == Some(true) {
                        self.complete_held(op);
                    }
                }
                return None;
            }
            r @ (Request::GenerationPage | Request::Overview | Request::Counters | Request::MappingsPiece { .. }) => {
                return Some(self.observe(only, r));
            }
        };
        plain(res.unwrap_or_else(|e| Reply::error(e.errno, e.message)))
    }

    /// The requests that let an observer follow the state cheaply: the
    /// generation page, a snapshot without mappings, the counters, and
    /// mappings in bounded pieces. `only`: the session a non-observer may
    /// see.
    fn observe(&self, only: Option<u64>, req: Request) -> (Reply, Vec<OwnedFd>) {
        let res = match req {
            Request::GenerationPage => {
                return match self.generation.page_fd() {
                    Some(Ok(fd)) => (Reply::GenerationPage { bytes: wire::GENERATION_PAGE_BYTES }, vec![fd]),
                    Some(Err(e)) => {
                        (Reply::error(Errno::ENOMEM, format!("cannot open the generation page: {e}")), vec![])
                    }
                    None => (Reply::error(Errno::EOPNOTSUPP, "this core has no generation page"), vec![]),
                };
            }
            Request::Overview => Ok(Reply::Status(Box::new(self.core.snapshot_limited(only, 0)))),
            Request::Counters => Ok(Reply::Counters(self.core.counters(only))),
            Request::MappingsPiece { session, ioas, from, max } => self
                .core
                .mappings_piece(only, session, ioas, from, max.min(wire::MAPPINGS_PAGE) as usize)
                .map(Reply::MappingsPiece),
            _ => Ok(Reply::error(Errno::EINVAL, "not an observer request")),
        };
        (res.unwrap_or_else(|e| Reply::error(e.errno, e.message)), Vec::new())
    }

    /// Makes a device channel for session `sid`: a socketpair whose one end
    /// the loop serves and whose other end goes back in the reply. One that
    /// cannot be made is closed again, with `fx`.
    fn open_channel(&mut self, sid: u64, fx: &mut model::Effects) -> (Reply, Vec<OwnedFd>) {
        let fail = |e: String| (Reply::error(Errno::ENOMEM, e), Vec::new());
        let chan = match self.core.open_channel(sid) {
            Ok(c) => c,
            Err(e) => return (Reply::error(e.errno, e.message), Vec::new()),
        };
        let pair = std::os::unix::net::UnixStream::pair().and_then(|(a, b)| a.set_nonblocking(true).map(|_| (a, b)));
        let (ours, theirs) = match pair {
            Ok(p) => p,
            Err(e) => {
                self.core.close_channel(chan, fx);
                return fail(format!("cannot make a socketpair: {e}"));
            }
        };
        let (pid, uid) =
            self.conns.values().find(|c| c.session == sid && c.channel == 0).map_or((0, 0), |c| (c.pid, c.uid));
        let Some(token) = self.register(UnixStream::from_std(ours), pid, uid) else {
            self.core.close_channel(chan, fx);
            return fail("cannot register the channel".into());
        };
        if let Some(c) = self.conns.get_mut(&token) {
            c.channel = chan;
            c.session = sid;
        }
        self.chan_tokens.insert(chan, token);
        tracing::info!(session = sid, channel = chan, "device channel made");
        (Reply::Channel { channel: chan }, vec![OwnedFd::from(theirs)])
    }

    pub(super) fn answer_query(&mut self, id: u64, reply: Reply) {
        if let Some(w) = self.driver_waiters.remove(&id) {
            if let Some(c) = self.conns.get_mut(&w.asker) {
                queue(c, w.seq, &reply, Vec::new());
                self.backlog.push_back(w.asker);
            }
        }
    }
}

/// Opens the file behind `fd` again, read-only, through `/proc/self/fd`:
/// a new open file description whose holder cannot map it writable.
pub(super) fn reopen_read_only(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(OwnedFd::from(f))
}
