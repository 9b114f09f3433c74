//! The ioasid extension commands: bind, unbind, attach, detach, list PASIDs.

use std::os::fd::OwnedFd;

use zerocopy::IntoBytes;

use super::{need, ok, Res, Worker};
use crate::proto::{self, cmd};

impl Worker {
    pub(super) fn ext(&mut self, c: u16, p: &[u8], mut fds: Vec<OwnedFd>) -> Res {
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
                let (dev, session) = self.dma.bind(fd).map_err(|e| log("IOASID_BIND", &e))?;
                let out = proto::ExtBind { argsz: 24, flags: 0, dev_id: dev, pasid_width: 0, session };
                let mut out = out;
                out.pasid_width = u32::from(self.pasid_width());
                ok(out.as_bytes())
            }
            cmd::EXT_UNBIND => {
                self.dma.unbind().map_err(|e| log("IOASID_UNBIND", &e))?;
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
                    q.ppasid = self.dma.attach(vpasid, q.pt_id, replace).map_err(|e| log("IOASID_ATTACH", &e))?;
                } else {
                    if q.flags & proto::EXT_FLAG_REPLACE != 0 {
                        return Err(libc::EINVAL);
                    }
                    self.dma.detach(vpasid).map_err(|e| log("IOASID_DETACH", &e))?;
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
