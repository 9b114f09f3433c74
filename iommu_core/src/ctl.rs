//! The orchestrator's end of a device server's control socket
//! (`vfio-user-server --control-socket PATH`): a blocking client of the
//! ioasid extension's commands (bind a device to a session through a
//! device channel, attach, replace and detach its RID and vPASIDs, list
//! its vPASID map, unbind).
//!
//! The messages are vfio-user messages: a 16-byte header (`msg_id u16,
//! command u16, msg_size u32, flags u32, error u32`, host-endian) and the
//! extension's payloads, as `docs/vfio-user.md` lays them out. They are
//! written out here rather than taken from `vfio_user_server::proto`, so
//! that the core's crate (and `ioasidctl` in it) does not depend on the
//! device server's; `vfio_user_server`'s tests check the two agree.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

/// The extension's command numbers.
pub mod cmd {
    /// Bind the device through a device channel (one fd).
    pub const BIND: u16 = 0x4001;
    /// Drop the binding.
    pub const UNBIND: u16 = 0x4002;
    /// Attach (or replace) the RID or a vPASID.
    pub const ATTACH: u16 = 0x4003;
    /// Detach the RID or a vPASID.
    pub const DETACH: u16 = 0x4004;
    /// List the vPASID map.
    pub const LIST_PASIDS: u16 = 0x4005;
}

/// Attach/detach flag: the command is about a vPASID (else the RID).
pub const FLAG_PASID: u32 = 1;
/// Attach flag: replace an attachment.
pub const FLAG_REPLACE: u32 = 2;

/// Header flags.
const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
const TYPE_MASK: u32 = 0xf;

/// Largest reply payload accepted (a list of 65,536 vPASIDs is 1 MiB).
const MAX_REPLY: usize = (1 << 20) + 16;

/// How long a reply is awaited.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed (connect, send, receive, or no reply in time).
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused the command.
    #[error("{command} refused: {}", errno_name(*errno))]
    Refused {
        /// The command's name.
        command: &'static str,
        /// The errno of the error reply.
        errno: i32,
    },
    /// The server answered something that is not a reply to the command.
    #[error("control socket: {0}")]
    Protocol(String),
    /// The socket is served by a process of another user (not root): a
    /// device channel, which reaches the session's IOASes, is not handed
    /// to it.
    #[error(
        "the control socket is served by user {uid}, neither this user nor root: not trusted with a device channel"
    )]
    Untrusted {
        /// The serving process's user.
        uid: u32,
    },
}

impl Error {
    /// The server's errno, for a refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// The name of an errno the extension answers with (`E...`), or its number.
pub fn errno_name(errno: i32) -> String {
    if let Some(e) = crate::Errno::from_code(errno) {
        return e.name().to_string();
    }
    match errno {
        libc::ENODEV => "ENODEV".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::EIO => "EIO".into(),
        libc::EFAULT => "EFAULT".into(),
        n => format!("errno {n}"),
    }
}

/// The name of a command.
pub fn command_name(command: u16) -> &'static str {
    match command {
        cmd::BIND => "IOASID_BIND",
        cmd::UNBIND => "IOASID_UNBIND",
        cmd::ATTACH => "IOASID_ATTACH",
        cmd::DETACH => "IOASID_DETACH",
        cmd::LIST_PASIDS => "IOASID_LIST_PASIDS",
        _ => "command",
    }
}

/// What a bind reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The device's id in the session.
    pub dev_id: u32,
    /// The device's PASID width (0: no PASID capability).
    pub pasid_width: u32,
    /// The session the channel speaks for.
    pub session: u64,
}

/// One vPASID of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidEntry {
    /// The guest's PASID.
    pub vpasid: u32,
    /// The pPASID the server chose.
    pub ppasid: u32,
    /// The IOAS (or nested IOAS) it is attached to.
    pub pt_id: u32,
}

/// The binding's attachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasidMap {
    /// The RID's IOAS, if attached.
    pub rid: Option<u32>,
    /// The vPASIDs, by vPASID.
    pub entries: Vec<PasidEntry>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// A connection to a device server's control socket.
pub struct Control {
    sock: UnixStream,
    next_id: u16,
}

impl Control {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Control, Error> {
        let sock = UnixStream::connect(path)?;
        // Whoever bound the path first gets what is sent there: only a
        // server of this user or root is trusted.
        let uid = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(std::io::Error::from)?
            .uid();
        if uid != 0 && uid != nix::unistd::getuid().as_raw() {
            return Err(Error::Untrusted { uid });
        }
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Control { sock, next_id: 1 })
    }

    /// Binds the device through `channel`, a device channel of a session
    /// (`Client::open_device_channel`).
    pub fn bind(&mut self, channel: BorrowedFd<'_>) -> Result<Bound, Error> {
        let r = self.call(cmd::BIND, &words(&[24, 0, 0, 0, 0, 0]), &[channel])?;
        if r.len() < 24 {
            return Err(Error::Protocol(format!("IOASID_BIND reply of {} bytes", r.len())));
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&r[16..24]);
        let session = u64::from_ne_bytes(s);
        Ok(Bound { dev_id: u32_at(&r, 8), pasid_width: u32_at(&r, 12), session })
    }

    /// Drops the binding.
    pub fn unbind(&mut self) -> Result<(), Error> {
        self.call(cmd::UNBIND, &[], &[]).map(|_| ())
    }

    /// Attaches (or, with `replace`, moves) the RID (`vpasid` `None`) or a
    /// vPASID to IOAS `pt_id`; returns the pPASID (0 for the RID).
    pub fn attach(&mut self, vpasid: Option<u32>, pt_id: u32, replace: bool) -> Result<u32, Error> {
        let flags = if vpasid.is_some() { FLAG_PASID } else { 0 } | if replace { FLAG_REPLACE } else { 0 };
        let r = self.call(cmd::ATTACH, &words(&[24, flags, vpasid.unwrap_or(0), pt_id, 0, 0]), &[])?;
        if r.len() < 24 {
            return Err(Error::Protocol(format!("IOASID_ATTACH reply of {} bytes", r.len())));
        }
        Ok(u32_at(&r, 16))
    }

    /// Detaches the RID (`vpasid` `None`) or a vPASID.
    pub fn detach(&mut self, vpasid: Option<u32>) -> Result<(), Error> {
        let flags = if vpasid.is_some() { FLAG_PASID } else { 0 };
        self.call(cmd::DETACH, &words(&[24, flags, vpasid.unwrap_or(0), 0, 0, 0]), &[]).map(|_| ())
    }

    /// The binding's RID attachment and vPASID map.
    pub fn list(&mut self) -> Result<PasidMap, Error> {
        let mut argsz = 16u32;
        loop {
            let r = self.call(cmd::LIST_PASIDS, &words(&[argsz, 0, 0, 0]), &[])?;
            if r.len() < 16 {
                return Err(Error::Protocol(format!("IOASID_LIST_PASIDS reply of {} bytes", r.len())));
            }
            let (need, count, rid) = (u32_at(&r, 0), u32_at(&r, 8), u32_at(&r, 12));
            let full = 16 + 16 * count as usize;
            if r.len() >= full {
                let entries = (0..count as usize)
                    .map(|i| PasidEntry {
                        vpasid: u32_at(&r, 16 + 16 * i),
                        ppasid: u32_at(&r, 20 + 16 * i),
                        pt_id: u32_at(&r, 24 + 16 * i),
                    })
                    .collect();
                return Ok(PasidMap { rid: (rid != 0).then_some(rid), entries });
            }
            // The map grew between the calls, or this was the first: ask
            // again with room for all of it.
            if need <= argsz || need as usize > MAX_REPLY {
                return Err(Error::Protocol(format!("IOASID_LIST_PASIDS needs {need} bytes")));
            }
            argsz = need;
        }
    }

    /// Sends one command with `payload` and `fds` and returns the reply's
    /// payload, or the server's refusal.
    pub fn call(&mut self, command: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<Vec<u8>, Error> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1) & 0x7fff;
        let size = u32::try_from(HEADER_SIZE + payload.len())
            .map_err(|_| Error::Protocol(format!("a payload of {} bytes", payload.len())))?;
        let mut msg = Vec::with_capacity(HEADER_SIZE + payload.len());
        msg.extend_from_slice(&id.to_ne_bytes());
        msg.extend_from_slice(&command.to_ne_bytes());
        msg.extend_from_slice(&size.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        let sent = crate::wire::send_with_fds(self.sock.as_fd(), &msg, fds)?;
        self.sock.write_all(&msg[sent..])?;
        let mut h = [0u8; HEADER_SIZE];
        self.sock.read_exact(&mut h)?;
        let (rid, rcmd) = (u16::from_ne_bytes([h[0], h[1]]), u16::from_ne_bytes([h[2], h[3]]));
        let (rsize, rflags, rerr) = (u32_at(&h, 4) as usize, u32_at(&h, 8), u32_at(&h, 12));
        if rsize < HEADER_SIZE || rsize - HEADER_SIZE > MAX_REPLY {
            return Err(Error::Protocol(format!("a reply of {rsize} bytes")));
        }
        let mut body = vec![0u8; rsize - HEADER_SIZE];
        self.sock.read_exact(&mut body)?;
        if rid != id || rcmd != command || rflags & TYPE_MASK != FLAG_REPLY {
            return Err(Error::Protocol(format!(
                "expected the reply to message {id} ({}), got message {rid} command {rcmd:#x} flags {rflags:#x}",
                command_name(command)
            )));
        }
        if rflags & FLAG_ERROR != 0 {
            let errno = i32::try_from(rerr).unwrap_or(libc::EIO);
            return Err(Error::Refused { command: command_name(command), errno });
        }
        Ok(body)
    }
}
