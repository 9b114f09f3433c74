//! The ioasid extension commands: bind, unbind, attach, detach, list PASIDs,
//! for the vfio-user client ([`Owner::Client`]) or the orchestrator on the
//! control socket ([`Owner::Control`]); only the binding's owner changes
//! it, and either may list it.

use std::os::fd::OwnedFd;

use zerocopy::IntoBytes;

use super::{need, ok, Res, Worker};
use crate::conn::Msg;
use crate::dma::Owner;
use crate::proto::{self, cmd, HEADER_SIZE};

impl Worker {
    /// A command from the control socket: only the extension's commands,
    /// without VERSION. Returns the whole reply message, `None` for a
    /// command sent with `NO_REPLY`.
    pub(super) fn control_command(&mut self, m: Msg) -> Option<Vec<u8>> {
        use std::sync::atomic::Ordering::Relaxed;
        let hdr = m.hdr;
        let res = match m.fail {
            Some(e) => Err(e),
            None if hdr.is_reply() || hdr.flags & proto::flags::TYPE_MASK != proto::flags::COMMAND => Err(libc::EINVAL),
            None if !(cmd::EXT_BASE..cmd::EXT_BASE + 0x100).contains(&hdr.command) => Err(libc::ENOSYS),
            None if hdr.command != cmd::EXT_BIND && !m.fds.is_empty() => Err(libc::EINVAL),
            None => self.ext(Owner::Control, hdr.command, &m.payload, m.fds),
        };
        if res.is_err() {
            self.stats.errors.fetch_add(1, Relaxed);
        }
        if hdr.no_reply() {
            return None;
        }
        Some(match res {
            Ok((payload, _)) => {
                let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
                out.extend_from_slice(hdr.reply(payload.len()).as_bytes());
                out.extend_from_slice(&payload);
                out
            }
            Err(errno) => hdr.error_reply(errno).as_bytes().to_vec(),
        })
    }

    /// The control connection ended: the binding it made goes (the core
    /// frees the device, its attachments and pPASIDs), and the RID's DMA
    /// is back on the compat IOAS.
    pub(super) fn control_gone(&mut self) {
        if self.dma.binding_owner() == Some(Owner::Control) {
            match self.dma.unbind(Owner::Control) {
                Ok(()) => tracing::info!("the orchestrator's control connection closed: its binding is dropped"),
                Err(e) => tracing::info!("the orchestrator's binding could not be dropped: {e}"),
            }
        }
    }

    pub(super) fn ext(&mut self, by: Owner, c: u16, p: &[u8], mut fds: Vec<OwnedFd>) -> Res {
        let log = |what: &str, e: &crate::dma::Error| {
            tracing::info!("{what} refused: {e}");
            e.errno()
        };
        match c {
            cmd::EXT_BIND => {
                let q: proto::ExtBind = need(p)?;
                if (q.argsz as usize) < size_of::<proto::ExtBind>() || fds.len() != 1 {
                    return Err(libc::EINVAL);
                }
                let fd = fds.pop().ok_or(libc::EINVAL)?;
                let (dev, session) = self.dma.bind(fd, by).map_err(|e| log("IOASID_BIND", &e))?;
                let out = proto::ExtBind { argsz: 24, flags: 0, dev_id: dev, pasid_width: 0, session };
                let mut out = out;
                out.pasid_width = u32::from(self.pasid_width());
                ok(out.as_bytes())
            }
            cmd::EXT_UNBIND => {
                self.dma.unbind(by).map_err(|e| log("IOASID_UNBIND", &e))?;
                ok(&[])
            }
            cmd::EXT_ATTACH | cmd::EXT_DETACH => {
                let mut q: proto::ExtAttach = need(p)?;
                if (q.argsz as usize) < size_of::<proto::ExtAttach>()
                    || q.flags & !(proto::EXT_FLAG_PASID | proto::EXT_FLAG_REPLACE) != 0
                {
                    return Err(libc::EINVAL);
                }
                let vpasid = (q.flags & proto::EXT_FLAG_PASID != 0).then_some(q.vpasid);
                if c == cmd::EXT_ATTACH {
                    let replace = q.flags & proto::EXT_FLAG_REPLACE != 0;
                    q.ppasid = self.dma.attach(by, vpasid, q.pt_id, replace).map_err(|e| log("IOASID_ATTACH", &e))?;
                } else {
                    if q.flags & proto::EXT_FLAG_REPLACE != 0 {
                        return Err(libc::EINVAL);
                    }
                    self.dma.detach(by, vpasid).map_err(|e| log("IOASID_DETACH", &e))?;
                    q.ppasid = 0;
                }
                q.argsz = 24;
                ok(q.as_bytes())
            }
            cmd::EXT_LIST_PASIDS => {
                let q: proto::ExtList = need(p)?;
                if (q.argsz as usize) < size_of::<proto::ExtList>() {
                    return Err(libc::EINVAL);
                }
                if self.dma.binding().is_none() {
                    return Err(libc::ENODEV);
                }
                let (rid, map) = self.dma.pasid_map();
                let full = 16 + 16 * map.len();
                let head = proto::ExtList {
                    argsz: full as u32,
                    flags: 0,
                    count: map.len() as u32,
                    rid_pt_id: rid.unwrap_or(0),
                };
                let mut out = head.as_bytes().to_vec();
                if (q.argsz as usize) >= full {
                    for (v, pp, t) in map {
                        let e = proto::ExtPasidEntry { vpasid: v, ppasid: pp, pt_id: t, reserved: 0 };
                        out.extend_from_slice(e.as_bytes());
                    }
                }
                Ok((out, Vec::new()))
            }
            _ => Err(libc::ENOSYS),
        }
    }

    fn pasid_width(&self) -> u8 {
        self.config.caps().pasid.map_or(0, |o| (self.config.get16(o + 4) >> 8) as u8 & 0x1f)
    }
}
