//! DEVICE_FEATURE: the migration features (what is supported, the device
//! state) and DMA logging (start, stop, report).

use zerocopy::IntoBytes;

use super::{need, ok, Res, Worker, MAX_BITMAP_BYTES, MAX_LOGGING_RANGES};
use crate::proto;

impl Worker {
    pub(super) fn feature(&mut self, p: &[u8]) -> Res {
        let f: proto::Feature = need(p)?;
        let data = &p[8..];
        let index = f.flags & proto::FEATURE_MASK;
        let get = f.flags & proto::FEATURE_GET != 0;
        let set = f.flags & proto::FEATURE_SET != 0;
        let probe = f.flags & proto::FEATURE_PROBE != 0;
        let known = proto::FEATURE_MASK | proto::FEATURE_GET | proto::FEATURE_SET | proto::FEATURE_PROBE;
        if f.flags & !known != 0 || (get && set && !probe) || (!get && !set && !probe) || (f.argsz as usize) < 8 {
            return Err(libc::EINVAL);
        }
        let (can_get, can_set) = match index {
            proto::FEATURE_MIGRATION => (true, false),
            proto::FEATURE_MIG_DEVICE_STATE => (true, true),
            proto::FEATURE_DMA_LOGGING_START | proto::FEATURE_DMA_LOGGING_STOP => (false, true),
            proto::FEATURE_DMA_LOGGING_REPORT => (true, false),
            _ => return Err(libc::ENOTSUP),
        };
        if (get && !can_get) || (set && !can_set) {
            return Err(libc::ENOTSUP);
        }
        if probe {
            return ok(&p[..8]);
        }
        let echo = |extra: &[u8], argsz_needed: usize| -> Res {
            if (f.argsz as usize) < argsz_needed {
                return Err(libc::EINVAL);
            }
            let mut out = proto::Feature { argsz: argsz_needed as u32, flags: f.flags }.as_bytes().to_vec();
            out.extend_from_slice(extra);
            Ok((out, Vec::new()))
        };
        match index {
            proto::FEATURE_MIGRATION => {
                let flags = proto::MIGRATION_STOP_COPY | proto::MIGRATION_PRE_COPY;
                echo(&flags.to_ne_bytes(), 16)
            }
            proto::FEATURE_MIG_DEVICE_STATE if get => {
                let s = proto::MigState { device_state: self.mig_state, data_fd: u32::MAX };
                echo(s.as_bytes(), 16)
            }
            proto::FEATURE_MIG_DEVICE_STATE => {
                let s: proto::MigState = need(data)?;
                if (f.argsz as usize) < p.len() {
                    return Err(libc::EINVAL);
                }
                self.migrate_to(s.device_state)?;
                // The reply to a SET is the request as it came (`data_fd`
                // is unused in vfio-user).
                ok(p)
            }
            proto::FEATURE_DMA_LOGGING_START => {
                let mut c: proto::LoggingControl = need(data)?;
                if c.num_ranges > MAX_LOGGING_RANGES || data.len() < 16 + 16 * c.num_ranges as usize {
                    return Err(libc::EINVAL);
                }
                if !c.page_size.is_power_of_two() {
                    return Err(libc::EINVAL);
                }
                for k in 0..c.num_ranges as usize {
                    let r: proto::LoggingRange = need(&data[16 + 16 * k..])?;
                    if r.length == 0 || r.iova.checked_add(r.length - 1).is_none() {
                        return Err(libc::EINVAL);
                    }
                }
                let full = 8 + 16 + 16 * c.num_ranges as usize;
                let reply_len = if f.argsz as usize >= full { full } else { 24 };
                if (f.argsz as usize) < 24 {
                    return Err(libc::EINVAL);
                }
                if self.logging {
                    return Err(libc::EBUSY);
                }
                self.dma.set_dirty_tracking(true).map_err(|e| e.errno())?;
                self.logging = true;
                // The core tracks at 4 KiB; coarser reports are folded.
                c.page_size = c.page_size.max(4096);
                let mut extra = c.as_bytes().to_vec();
                extra.extend_from_slice(&data[16..16 + 16 * c.num_ranges as usize]);
                echo(&extra[..reply_len - 8], reply_len)
            }
            proto::FEATURE_DMA_LOGGING_STOP => {
                if self.logging {
                    self.dma.set_dirty_tracking(false).map_err(|e| e.errno())?;
                    self.logging = false;
                }
                let n = if f.argsz as usize >= p.len() { p.len() } else { 8 };
                echo(&data[..n - 8], n)
            }
            _ => {
                let r: proto::LoggingReport = need(data)?;
                if !self.logging {
                    return Err(libc::EINVAL);
                }
                // Any power of two: pages below the tracking granule are
                // set by the granule covering them, larger ones by any of
                // their granules.
                if r.length == 0 || !r.page_size.is_power_of_two() {
                    return Err(libc::EINVAL);
                }
                r.iova.checked_add(r.length - 1).ok_or(libc::EINVAL)?;
                let bits = r.length.div_ceil(r.page_size);
                let bytes = bits.div_ceil(64) * 8;
                if bytes > MAX_BITMAP_BYTES {
                    return Err(libc::E2BIG);
                }
                let needed = 8 + 24 + bytes as usize;
                if (f.argsz as usize) < needed {
                    return Err(libc::ENOSPC);
                }
                let bm = self.dma.dirty_report(r.iova, r.length, r.page_size).map_err(|e| {
                    tracing::info!("DMA logging report refused: {e}");
                    e.errno()
                })?;
                let mut extra = r.as_bytes().to_vec();
                let mut words = bm;
                words.resize(bytes as usize / 8, 0);
                for w in &words {
                    extra.extend_from_slice(&w.to_ne_bytes());
                }
                echo(&extra, needed)
            }
        }
    }
}
