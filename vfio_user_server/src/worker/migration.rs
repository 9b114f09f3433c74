//! The migration state machine, its data (MIG_DATA_READ and
//! MIG_DATA_WRITE) and the device's saved state.

use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use super::{need, ok, Res, Worker, MAX_MIG_DATA, MAX_XFER};
use crate::pci::ConfigEvent;
use crate::proto;

/// Migration states.
pub mod mig {
    /// Failed; needs a reset.
    pub const ERROR: u32 = 0;
    /// Stopped.
    pub const STOP: u32 = 1;
    /// Running.
    pub const RUNNING: u32 = 2;
    /// Stopped, state being read out.
    pub const STOP_COPY: u32 = 3;
    /// Stopped, state being loaded.
    pub const RESUMING: u32 = 4;
    /// Running, state being read out.
    pub const PRE_COPY: u32 = 6;
}

const MIG_MAGIC: u32 = 0x696f_6d67;

#[derive(Serialize, Deserialize)]
struct MigBlob {
    magic: u32,
    device: String,
    config: Vec<u8>,
    msix_table: Vec<u8>,
    state: Vec<u8>,
}

impl Worker {
    fn migration_arc(&mut self, from: u32, to: u32) -> Result<(), i32> {
        use mig::*;
        match (from, to) {
            (RUNNING, STOP) | (PRE_COPY, STOP_COPY) => {
                self.device.set_running(false);
                if to == STOP_COPY {
                    self.build_mig_data()?;
                }
            }
            (STOP, RUNNING) => self.device.set_running(true),
            (STOP, STOP_COPY) => self.build_mig_data()?,
            (STOP_COPY, STOP) => {
                self.mig_out.clear();
                self.mig_pos = 0;
            }
            (STOP, RESUMING) => self.mig_in.clear(),
            (RESUMING, STOP) => {
                let data = std::mem::take(&mut self.mig_in);
                self.load_mig_data(&data)?;
            }
            (RUNNING, PRE_COPY) => {
                // No precopy data: everything moves in STOP_COPY.
                self.mig_out.clear();
                self.mig_pos = 0;
            }
            (PRE_COPY, RUNNING) => {
                self.mig_out.clear();
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    pub(super) fn migrate_to(&mut self, target: u32) -> Result<(), i32> {
        use mig::*;
        let valid = [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY];
        if !valid.contains(&target) || self.mig_state == ERROR {
            return Err(libc::EINVAL);
        }
        if self.mig_state == STOP_COPY && target == PRE_COPY {
            return Err(libc::EINVAL);
        }
        let path = mig_path(self.mig_state, target).ok_or(libc::EINVAL)?;
        for w in path.windows(2) {
            if let Err(e) = self.migration_arc(w[0], w[1]) {
                self.mig_state = if w[0] == RESUMING { ERROR } else { w[0] };
                return Err(e);
            }
            self.mig_state = w[1];
        }
        Ok(())
    }

    fn build_mig_data(&mut self) -> Result<(), i32> {
        let state = self.device.save()?;
        let blob = MigBlob {
            magic: MIG_MAGIC,
            device: self.name.to_string(),
            config: self.config.bytes().to_vec(),
            msix_table: self.irqs.msix_table(),
            state,
        };
        self.mig_out = postcard::to_allocvec(&blob).map_err(|_| libc::ENOMEM)?;
        self.mig_pos = 0;
        Ok(())
    }

    fn load_mig_data(&mut self, data: &[u8]) -> Result<(), i32> {
        let blob: MigBlob = postcard::from_bytes(data).map_err(|_| libc::EINVAL)?;
        if blob.magic != MIG_MAGIC || blob.device != self.name {
            tracing::warn!("migration data is not for a {} device", self.name);
            return Err(libc::EINVAL);
        }
        let mut cfg = self.config.clone();
        if !cfg.restore(&blob.config) || self.irqs.msix_table().len() != blob.msix_table.len() {
            tracing::warn!("migration data has a config space or MSI-X table of another shape");
            return Err(libc::EINVAL);
        }
        if matches!(cfg.power_state(), 1 | 2) {
            tracing::warn!("migration data puts the function in D1 or D2, which it does not support");
            return Err(libc::EINVAL);
        }
        self.device.load(&blob.state)?;
        self.config = cfg;
        if let Some(on) = self.apply_function_state() {
            self.device.config_event(ConfigEvent::BusMaster(on));
        }
        self.apply_msi_mask(self.config.msi_mask());
        self.irqs.set_msix_table(&blob.msix_table);
        Ok(())
    }

    pub(super) fn mig_read(&mut self, p: &[u8]) -> Res {
        let q: proto::MigData = need(p)?;
        if !matches!(self.mig_state, mig::PRE_COPY | mig::STOP_COPY) {
            return Err(libc::EINVAL);
        }
        let want = (q.size as usize).min(MAX_XFER).min((q.argsz as usize).saturating_sub(8));
        if (q.argsz as usize) < 8 {
            return Err(libc::EINVAL);
        }
        let left = &self.mig_out[self.mig_pos.min(self.mig_out.len())..];
        let n = want.min(left.len());
        let mut out = proto::MigData { argsz: (8 + n) as u32, size: n as u32 }.as_bytes().to_vec();
        out.extend_from_slice(&left[..n]);
        self.mig_pos += n;
        Ok((out, Vec::new()))
    }

    pub(super) fn mig_write(&mut self, p: &[u8]) -> Res {
        let q: proto::MigData = need(p)?;
        if self.mig_state != mig::RESUMING {
            return Err(libc::EINVAL);
        }
        let n = q.size as usize;
        if n > MAX_XFER || p.len() != 8 + n {
            return Err(libc::EINVAL);
        }
        if self.mig_in.len() + n > MAX_MIG_DATA {
            return Err(libc::EFBIG);
        }
        self.mig_in.extend_from_slice(&p[8..]);
        ok(&[])
    }
}

/// The path from `from` to `to` through the migration FSM: shortest,
/// with saving states (PRE_COPY, STOP_COPY) only at the ends.
pub fn mig_path(from: u32, to: u32) -> Option<Vec<u32>> {
    use mig::*;
    const ARCS: &[(u32, u32)] = &[
        (RUNNING, STOP),
        (STOP, RUNNING),
        (STOP, STOP_COPY),
        (STOP_COPY, STOP),
        (STOP, RESUMING),
        (RESUMING, STOP),
        (RUNNING, PRE_COPY),
        (PRE_COPY, RUNNING),
        (PRE_COPY, STOP_COPY),
    ];
    let saving = |s: u32| s == PRE_COPY || s == STOP_COPY;
    let mut prev: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut queue = std::collections::VecDeque::from([from]);
    let mut seen = std::collections::HashSet::from([from]);
    while let Some(s) = queue.pop_front() {
        if s == to {
            let mut path = vec![to];
            let mut c = to;
            while c != from {
                c = prev[&c];
                path.push(c);
            }
            path.reverse();
            return Some(path);
        }
        if s != from && saving(s) {
            continue;
        }
        for &(a, b) in ARCS {
            if a == s && seen.insert(b) {
                prev.insert(b, s);
                queue.push_back(b);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::mig::*;
    use super::*;

    #[test]
    fn migration_paths_follow_the_rules() {
        assert_eq!(mig_path(RUNNING, STOP_COPY), Some(vec![RUNNING, STOP, STOP_COPY]));
        assert_eq!(mig_path(STOP_COPY, RUNNING), Some(vec![STOP_COPY, STOP, RUNNING]));
        assert_eq!(mig_path(PRE_COPY, STOP), Some(vec![PRE_COPY, RUNNING, STOP]));
        assert_eq!(mig_path(RESUMING, RUNNING), Some(vec![RESUMING, STOP, RUNNING]));
        assert_eq!(mig_path(RUNNING, RESUMING), Some(vec![RUNNING, STOP, RESUMING]));
        assert_eq!(mig_path(STOP, PRE_COPY), Some(vec![STOP, RUNNING, PRE_COPY]));
        assert_eq!(mig_path(RUNNING, RUNNING), Some(vec![RUNNING]));
        assert_eq!(mig_path(PRE_COPY, RESUMING), Some(vec![PRE_COPY, RUNNING, STOP, RESUMING]));
    }
}
