//! VERSION: the protocol version and the capabilities a client and the
//! server agree on, the twin socket included.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use zerocopy::IntoBytes;

use super::{need, Res, Worker, MAX_BITMAP_BYTES, MAX_XFER, MINOR};
use crate::conn::MAX_MSG_FDS;
use crate::proto;

impl Worker {
    pub(super) fn version(&mut self, p: &[u8]) -> Res {
        if self.neg.done {
            return Err(libc::EINVAL);
        }
        let v: proto::Version = need(p)?;
        if v.major != 0 {
            return Err(libc::ENOTSUP);
        }
        let json = &p[4..];
        let mut client_caps = serde_json::Map::new();
        if !json.is_empty() {
            let end = json.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
            if end > 0 {
                let val: serde_json::Value = serde_json::from_slice(&json[..end]).map_err(|_| libc::EINVAL)?;
                let obj = val.as_object().ok_or(libc::EINVAL)?;
                if let Some(c) = obj.get("capabilities") {
                    client_caps = c.as_object().ok_or(libc::EINVAL)?.clone();
                }
            }
        }
        let num = |k: &str, default: u64| -> Result<u64, i32> {
            match client_caps.get(k) {
                None => Ok(default),
                Some(v) => v.as_u64().ok_or(libc::EINVAL),
            }
        };
        let client_xfer = num("max_data_xfer_size", 1 << 20)?;
        let client_fds = num("max_msg_fds", 1)?;
        if client_xfer == 0 {
            return Err(libc::EINVAL);
        }
        // Only keys the client proposed come back, each no larger than the
        // client's value: the reply then never outgrows the request (QEMU
        // receives it into a buffer the size of its own request).
        let mut caps = serde_json::Map::new();
        let mut cap_num = |k: &str, ours: u64| {
            if let Some(theirs) = client_caps.get(k).and_then(|v| v.as_u64()) {
                caps.insert(k.into(), ours.min(theirs).into());
            }
        };
        cap_num("max_msg_fds", MAX_MSG_FDS as u64);
        cap_num("max_data_xfer_size", MAX_XFER as u64);
        cap_num("max_dma_maps", crate::dma::MAX_DMA_MAPS as u64);
        if let Some(p) = client_caps.get("pgsizes").and_then(|v| v.as_u64()) {
            caps.insert("pgsizes".into(), (p & 4096).into());
        }
        if let Some(w) = client_caps.get("write_multiple").and_then(|v| v.as_bool()) {
            caps.insert("write_multiple".into(), w.into());
        }
        if let Some(m) = client_caps.get("migration").and_then(|v| v.as_object()) {
            let mut mo = serde_json::Map::new();
            if let Some(p) = m.get("pgsize").and_then(|v| v.as_u64()) {
                mo.insert("pgsize".into(), p.min(4096).into());
            }
            if let Some(b) = m.get("max_bitmap_size").and_then(|v| v.as_u64()) {
                mo.insert("max_bitmap_size".into(), b.min(MAX_BITMAP_BYTES).into());
            }
            caps.insert("migration".into(), mo.into());
        }
        if let Some(x) = client_caps.get("ioasid").and_then(|v| v.as_object()) {
            let v = x.get("version").and_then(|v| v.as_u64()).unwrap_or(1).clamp(1, 1);
            caps.insert("ioasid".into(), serde_json::json!({ "version": v }));
            self.neg.ioasid = true;
        }
        if let Some(port) = &self.port {
            // Tiny transfer sizes would turn one DMA into millions of messages.
            port.set_max_xfer(usize::try_from(client_xfer.clamp(4096, MAX_XFER as u64)).unwrap_or(MAX_XFER));
        }
        // Twin socket: our requests and their replies get a socket pair of
        // their own; the client's end goes with this reply.
        let mut fds = Vec::new();
        let twin = client_caps.get("twin_socket").and_then(|t| t.get("supported")).and_then(|v| v.as_bool());
        if twin == Some(true) {
            if let Some(port) = &self.port {
                let pair = std::os::unix::net::UnixStream::pair().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                port.use_twin(OwnedFd::from(pair.0)).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                fds.push(Arc::new(std::fs::File::from(OwnedFd::from(pair.1))));
                caps.insert("twin_socket".into(), serde_json::json!({ "supported": true, "fd_index": 0 }));
            }
        }
        tracing::info!(
            "client speaks vfio-user {}.{} (max_msg_fds {client_fds}, max_data_xfer_size {client_xfer}); replying 0.{}",
            v.major,
            v.minor,
            v.minor.min(MINOR)
        );
        self.neg.done = true;
        let body = serde_json::json!({ "capabilities": caps }).to_string();
        let mut out = proto::Version { major: 0, minor: v.minor.min(MINOR) }.as_bytes().to_vec();
        out.extend_from_slice(body.as_bytes());
        out.push(0);
        Ok((out, fds))
    }
}
