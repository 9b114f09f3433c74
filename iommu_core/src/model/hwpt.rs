//! Nested IOASes (a stage-1 table of the user's on a paging IOAS) and their
//! invalidations, and the settings of a paging IOAS that the PASID entries
//! of its users carry: dirty tracking and page faults.

use std::collections::BTreeSet;

use super::{check_aligned, err, range_last, Core, Effects, Error, Object, Result};
use crate::errno::Errno;
use crate::pagetable::{MAX_IOVA, PAGE_SIZE};
use crate::types::*;

#[derive(Debug)]
pub(super) struct Nested {
    pub(super) parent: u32,
    pub(super) s1_root: u64,
    pub(super) invalidations: u64,
    pub(super) attached: BTreeSet<(u32, u32)>,
}

impl Core {
    /// Allocates a nested IOAS on `parent` whose stage-1 root is the parent
    /// IOVA `s1_root`.
    pub fn nested_alloc(&mut self, sid: u64, parent: u32, s1_root: u64) -> Result<u32> {
        match self.object(sid, parent)? {
            Object::Ioas(_) => {}
            Object::Nested(_) => return err(Errno::EINVAL, "cannot nest on a nested IOAS"),
            o => return err(Errno::ENOENT, format!("object {parent} is a {}, not an IOAS", o.kind())),
        }
        check_aligned("stage-1 root", s1_root)?;
        if s1_root > MAX_IOVA {
            return err(Errno::EINVAL, format!("stage-1 root {s1_root:#x} is beyond the 48-bit IOVA space"));
        }
        let id = self.new_id(sid)?;
        self.ioas(sid, parent)?.children += 1;
        self.insert_object(
            sid,
            id,
            Object::Nested(Nested { parent, s1_root, invalidations: 0, attached: BTreeSet::new() }),
        )?;
        Ok(id)
    }

    /// Asks for stage-1 caches of a nested IOAS to be invalidated: its
    /// devices are told in `fx`.
    pub fn invalidate(&mut self, sid: u64, nested: u32, scope: InvalidateScope, fx: &mut Effects) -> Result<()> {
        let n = match self.object(sid, nested)? {
            Object::Nested(n) => n,
            Object::Ioas(_) => return err(Errno::EINVAL, format!("object {nested} is a paging IOAS, not nested")),
            o => return err(Errno::ENOENT, format!("object {nested} is a {}, not a nested IOAS", o.kind())),
        };
        if let InvalidateScope::Range { iova, length } = scope {
            check_aligned("IOVA", iova)?;
            check_aligned("length", length)?;
            let last = range_last(iova, length)?;
            if last > MAX_IOVA {
                return err(Errno::EINVAL, "range is beyond the 48-bit IOVA space");
            }
        }
        n.invalidations += 1;
        let range = match scope {
            InvalidateScope::All => None,
            InvalidateScope::Range { iova, length } => Some(IovaRange { start: iova, last: iova + length - 1 }),
        };
        let targets: Vec<(u32, u32)> = n.attached.iter().copied().collect();
        self.queue_invalidations(sid, targets, range, fx);
        Ok(())
    }

    /// Turns dirty tracking of an IOAS on or off; turning it on clears the
    /// dirty state. The devices whose PASID entries change are told in `fx`.
    pub fn set_dirty_tracking(&mut self, sid: u64, ioas: u32, enable: bool, fx: &mut Effects) -> Result<()> {
        let users = self.users_of(sid, ioas)?;
        if enable {
            for (dev, _) in &users {
                if let Ok(Object::Device(d)) = self.object(sid, *dev) {
                    if !d.caps.dirty_tracking {
                        return err(
                            Errno::EOPNOTSUPP,
                            format!("device {dev} is attached and cannot track dirty pages"),
                        );
                    }
                }
            }
        }
        let i = self.ioas(sid, ioas)?;
        let root = i.root;
        let was = i.dirty;
        i.dirty = enable;
        if enable && !was {
            if let Some(s) = self.sessions.get(&sid) {
                s.pool.clear_dirty(&s.dirty, root);
            }
        }
        if was != enable {
            self.rewrite_entries(sid, &users, fx)?;
        }
        Ok(())
    }

    /// Turns page-fault handling (page requests from PRI-capable devices
    /// reach the session's fault queue and wait for an answer) on or off.
    /// The devices whose PASID entries change are told in `fx`.
    pub fn set_page_faults(&mut self, sid: u64, ioas: u32, enable: bool, fx: &mut Effects) -> Result<()> {
        let users = self.users_of(sid, ioas)?;
        let i = self.ioas(sid, ioas)?;
        if i.iopf != enable {
            i.iopf = enable;
            self.rewrite_entries(sid, &users, fx)?;
        }
        Ok(())
    }

    /// Every (device, pPASID) whose translation goes through the paging IOAS
    /// `ioas`, directly or through a nested IOAS on it.
    fn users_of(&mut self, sid: u64, ioas: u32) -> Result<Vec<(u32, u32)>> {
        self.ioas(sid, ioas)?;
        let s = self.session(sid)?;
        let mut users = Vec::new();
        for (&id, o) in &s.objects {
            match o {
                Object::Ioas(i) if id == ioas => users.extend(i.attached.iter().copied()),
                Object::Nested(n) if n.parent == ioas => users.extend(n.attached.iter().copied()),
                _ => {}
            }
        }
        Ok(users)
    }

    /// Reads (and unless `no_clear`, clears) the dirty bitmap of a range.
    pub fn dirty_bitmap(&mut self, sid: u64, a: DirtyBitmapArgs) -> Result<Vec<u64>> {
        let DirtyBitmapArgs { ioas, iova, length, page_size, no_clear } = a;
        let max_bytes = u64::from(self.limits.max_message_bytes) / 2;
        let i = self.ioas(sid, ioas)?;
        if !i.dirty {
            return err(Errno::EINVAL, format!("dirty tracking is off on IOAS {ioas}"));
        }
        if page_size == 0 || !page_size.is_power_of_two() {
            return err(Errno::EINVAL, format!("page size {page_size:#x} is not a power of two"));
        }
        let last = range_last(iova, length)?;
        let align = page_size.max(PAGE_SIZE);
        if !iova.is_multiple_of(align) || !length.is_multiple_of(align) {
            return err(Errno::EINVAL, format!("[{iova:#x}, +{length:#x}) is not aligned to {align:#x}"));
        }
        if last > MAX_IOVA {
            return err(Errno::EINVAL, "range is beyond the 48-bit IOVA space");
        }
        if (length / page_size).div_ceil(8) > max_bytes {
            return err(Errno::E2BIG, format!("the bitmap would exceed {max_bytes} bytes"));
        }
        let root = i.root;
        let s = self
            .sessions
            .get(&sid)
            .ok_or_else(|| Error { errno: Errno::ENOENT, message: format!("no session {sid}") })?;
        Ok(s.pool.read_dirty(&s.dirty, root, iova, length, page_size, no_clear))
    }
}
