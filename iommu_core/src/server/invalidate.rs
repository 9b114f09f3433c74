//! The invalidation handshake: operations held until every device channel
//! that could hold a stale translation has answered, their completion, and
//! the fencing of channels that miss the deadline.
//!
//! Every request the loop serves settles its [`model::Effects`] here, once,
//! through [`apply_effects`](Server::apply_effects): the invalidations and
//! forgets are sent, and the operation completes, at once when no channel
//! must answer, else when the last one has answered or been fenced.
//! [`complete`](Server::complete) is the one place the loop frees table
//! pages: the operation's garbage, before its reply is queued.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use mio::Token;

use super::conn::{queue, queue_notice};
use super::Server;
use crate::errno::Errno;
use crate::model;
use crate::types::InvalidateTarget;
use crate::wire::{Notice, Reply};

/// An operation whose reply waits until every device channel that could
/// hold a stale translation has answered (or has been fenced).
pub(super) struct HeldOp {
    pub(super) conn: Option<Token>,
    seq: u64,
    reply: Reply,
    fds: Vec<OwnedFd>,
    /// Table pages freed when the operation completes.
    garbage: Vec<(u64, u64)>,
    /// Channel -> invalidation id it must answer.
    pub(super) waiting: HashMap<u64, u64>,
    pub(super) deadline: Instant,
    /// Its connection is blocked until it completes (it waited on channels).
    blocks: bool,
}

impl Server {
    /// A channel that will never answer: operations stop waiting for it.
    pub(super) fn channel_gone(&mut self, chan: u64) {
        let gone: Vec<u64> = self.driver_waiters.iter().filter(|(_, w)| w.chan == chan).map(|(id, _)| *id).collect();
        for id in gone {
            self.answer_query(id, Reply::error(Errno::ENOENT, "the device server went away"));
        }
        let ops: Vec<u64> =
            self.held.iter().filter(|(_, o)| o.waiting.contains_key(&chan)).map(|(id, _)| *id).collect();
        for id in ops {
            if let Some(op) = self.held.get_mut(&id) {
                if let Some(inval) = op.waiting.remove(&chan) {
                    self.inval_owner.remove(&inval);
                }
                if op.waiting.is_empty() {
                    self.complete_held(id);
                }
            }
        }
    }

    /// Fences channels that missed their deadline and completes their ops.
    pub(super) fn expire_held(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self.driver_waiters.iter().filter(|(_, w)| w.deadline <= now).map(|(id, _)| *id).collect();
        for id in late {
            self.answer_query(id, Reply::error(Errno::ETIMEDOUT, "the device server did not answer in time"));
        }
        let late: Vec<u64> = self.held.iter().filter(|(_, o)| o.deadline <= now).map(|(id, _)| *id).collect();
        for id in late {
            let chans: Vec<(u64, u64)> =
                self.held.get(&id).map(|o| o.waiting.iter().map(|(c, i)| (*c, *i)).collect()).unwrap_or_default();
            for (chan, inval) in chans {
                self.inval_owner.remove(&inval);
                self.core.fence_channel(chan);
                self.generation += 1;
            }
            if let Some(op) = self.held.get_mut(&id) {
                op.waiting.clear();
            }
            self.complete_held(id);
        }
    }

    /// Completes the held operation `id` (nothing waits on it any more).
    pub(super) fn complete_held(&mut self, id: u64) {
        if let Some(op) = self.held.remove(&id) {
            self.complete(op);
        }
    }

    /// Completes an operation no channel has to answer any more: frees its
    /// garbage, which no walker can reach now, then queues its reply. The
    /// only place the loop frees table pages.
    fn complete(&mut self, op: HeldOp) {
        self.core.release_tables(op.garbage);
        let Some(t) = op.conn else { return };
        if !op.blocks {
            self.queue_reply(t, op.seq, &op.reply, op.fds);
            return;
        }
        if let Some(conn) = self.conns.get_mut(&t) {
            queue(conn, op.seq, &op.reply, op.fds);
            conn.blocked = false;
            self.backlog.push_back(t);
        }
    }

    /// Settles the effects of a served request: sends each channel its
    /// invalidations and forgets, and completes the operation (frees the
    /// garbage, sends the reply) at once if no channel must answer, else
    /// holds it until every one has answered or been fenced.
    pub(super) fn apply_effects(
        &mut self,
        conn: Option<Token>,
        seq: u64,
        reply: Reply,
        fds: Vec<OwnedFd>,
        fx: model::Effects,
    ) {
        let mut waiting = HashMap::new();
        let mut per_chan: BTreeMap<u64, (Vec<InvalidateTarget>, Vec<u64>)> = BTreeMap::new();
        for (chan, t) in fx.invalidations {
            per_chan.entry(chan).or_default().0 = t;
        }
        for (chan, f) in fx.forget {
            per_chan.entry(chan).or_default().1 = f;
        }
        for (chan, (targets, forget)) in per_chan {
            let Some(t) = self.chan_tokens.get(&chan).copied() else { continue };
            let Some(c) = self.conns.get_mut(&t) else { continue };
            let id = self.next_inval;
            self.next_inval += 1;
            queue_notice(c, &Notice::Invalidate { id, targets, forget });
            self.backlog.push_back(t);
            waiting.insert(chan, id);
        }
        let timeout = Duration::from_millis(u64::from(self.core.limits().invalidate_timeout_ms));
        let blocks = !waiting.is_empty();
        let op =
            HeldOp { conn, seq, reply, fds, garbage: fx.garbage, waiting, deadline: Instant::now() + timeout, blocks };
        if !blocks {
            self.complete(op);
            return;
        }
        let id = self.next_op;
        self.next_op += 1;
        for inval in op.waiting.values() {
            self.inval_owner.insert(*inval, id);
        }
        if let Some(c) = conn.and_then(|t| self.conns.get_mut(&t)) {
            c.blocked = true;
        }
        self.held.insert(id, op);
    }
}
