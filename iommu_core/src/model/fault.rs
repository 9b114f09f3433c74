//! Faults: each session's fault queue, the global fault log, and page
//! requests waiting for the session's answer.

use super::{err, Core, Error, Result};
use crate::errno::Errno;
use crate::types::*;

/// Size of the global fault log.
const FAULT_LOG: usize = 256;

impl Core {
    /// Records a fault for a session (issued by the device side). A
    /// recoverable page request gets a cookie to answer with. Returns the
    /// cookie (0 if not recoverable).
    pub fn report_fault(&mut self, sid: u64, mut rec: FaultRecord, recoverable: bool) -> Result<u64> {
        let depth = self.limits.fault_queue_depth as usize;
        let cookie = if recoverable {
            self.next_cookie += 1;
            self.next_cookie - 1
        } else {
            0
        };
        rec.cookie = cookie;
        self.fault_seq += 1;
        self.stats.faults += 1;
        if self.fault_log.len() == FAULT_LOG {
            self.fault_log.pop_front();
        }
        self.fault_log.push_back(FaultLogEntry { seq: self.fault_seq, session: sid, record: rec.clone() });
        let s = self.session(sid)?;
        if s.faults.len() >= depth {
            s.faults_lost += 1;
            return err(Errno::ENOSPC, "the session's fault queue is full");
        }
        if recoverable {
            if s.pending.len() >= depth {
                s.faults_lost += 1;
                return err(Errno::ENOSPC, "the session has too many page requests waiting for an answer");
            }
            s.pending.insert(cookie, rec.clone());
        }
        s.faults.push_back(rec);
        Ok(cookie)
    }

    /// Takes up to `max` fault records from the session's queue.
    pub fn read_faults(&mut self, sid: u64, max: u32) -> Result<Vec<FaultRecord>> {
        let s = self.session(sid)?;
        let n = (max as usize).min(s.faults.len());
        Ok(s.faults.drain(..n).collect())
    }

    /// Answers a page request; returns the request answered.
    pub fn respond_fault(&mut self, sid: u64, cookie: u64, code: u32) -> Result<FaultRecord> {
        if code != page_response::SUCCESS && code != page_response::INVALID {
            return err(Errno::EINVAL, format!("response code {code} is neither SUCCESS (0) nor INVALID (1)"));
        }
        let s = self.session(sid)?;
        s.pending
            .remove(&cookie)
            .ok_or_else(|| Error { errno: Errno::EINVAL, message: format!("no page request with cookie {cookie}") })
    }

    /// A fault reported by a device; returns the cookie for a page request.
    pub fn device_fault(&mut self, chan: u64, rec: FaultRecord, page_request: bool) -> Result<u64> {
        let (sid, d) = self.device(chan, rec.dev_id)?;
        let recoverable = page_request && d.caps.pri;
        if page_request && !recoverable {
            return err(Errno::EINVAL, format!("device {} did not declare PRI", rec.dev_id));
        }
        self.report_fault(sid, rec, recoverable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::core_with;

    fn rec(iova: u64) -> FaultRecord {
        FaultRecord {
            dev_id: 3,
            pasid: 5,
            iova,
            access: Perm::W,
            reason: FaultReason::NotPresent,
            group: 1,
            last: true,
            cookie: 0,
        }
    }

    #[test]
    fn fault_queue_records_answers_and_drops_when_full() {
        let (mut c, sid) = core_with(Limits { fault_queue_depth: 2, ..Limits::default() });
        let cookie = c.report_fault(sid, rec(0x1000), true).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(c.report_fault(sid, rec(0x2000), false).unwrap(), 0);
        let e = c.report_fault(sid, rec(0x3000), false).unwrap_err();
        assert_eq!(e.errno, Errno::ENOSPC);
        let snap = c.snapshot(Some(sid));
        assert_eq!((snap.sessions[0].faults_queued, snap.sessions[0].faults_lost), (2, 1));
        assert_eq!(snap.faults.len(), 3, "the global log keeps every fault");
        assert_eq!(snap.faults[2].record.iova, 0x3000);

        let got = c.read_faults(sid, 1).unwrap();
        assert_eq!((got.len(), got[0].iova, got[0].cookie), (1, 0x1000, cookie));
        assert_eq!(c.read_faults(sid, 10).unwrap().len(), 1);
        assert!(c.read_faults(sid, 10).unwrap().is_empty());

        assert_eq!(c.respond_fault(sid, cookie, 7).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(c.respond_fault(sid, cookie, page_response::SUCCESS).unwrap().iova, 0x1000);
        assert_eq!(c.respond_fault(sid, cookie, page_response::SUCCESS).unwrap_err().errno, Errno::EINVAL);
        // Another session cannot answer it.
        let other = c.open_session(2, 0).unwrap();
        let cookie = c.report_fault(sid, rec(0x4000), true).unwrap();
        assert_eq!(c.respond_fault(other, cookie, page_response::INVALID).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(c.respond_fault(sid, cookie, page_response::INVALID).unwrap().iova, 0x4000);
    }
}
