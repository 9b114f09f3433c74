#![deny(clippy::cast_possible_truncation)]
//! [`Writer`]: whole messages written to the connection from any thread.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use iommu_core::sync;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use super::Error;

/// Most parts a message is sent from without copying them together.
const MAX_PARTS: usize = 8;

/// Writes whole messages to the socket from any thread.
pub struct Writer {
    sock: OwnedFd,
    lock: Mutex<()>,
    broken: AtomicBool,
    timeout: Duration,
}

impl Writer {
    /// A writer over a duplicate of the connection (sends never block,
    /// whatever the socket's mode: they wait in `poll` with a deadline).
    pub fn new(sock: OwnedFd) -> Writer {
        Writer { sock, lock: Mutex::new(()), broken: AtomicBool::new(false), timeout: Duration::from_secs(10) }
    }

    /// Sends one message made of `parts`, with `fds` attached to it: one
    /// `sendmsg` of the parts as they are (no copy) unless the socket
    /// takes only part of it.
    pub fn send(&self, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe)));
        }
        if parts.len() > MAX_PARTS {
            return self.send(&[&parts.concat()], fds);
        }
        let mut small = [0 as RawFd; super::MAX_MSG_FDS];
        let many: Vec<RawFd>;
        let raw: &[RawFd] = if fds.len() <= small.len() {
            for (r, f) in small.iter_mut().zip(fds) {
                *r = f.as_raw_fd();
            }
            &small[..fds.len()]
        } else {
            many = fds.iter().map(|f| f.as_raw_fd()).collect();
            &many
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let _g = sync::lock(&self.lock);
        let mut off = 0;
        let mut first = true;
        // One deadline for the whole message, set at the first wait: a
        // client reading a byte now and then cannot hold the sender forever.
        let mut deadline = None;
        while off < total {
            let mut iov = [std::io::IoSlice::new(&[]); MAX_PARTS];
            let mut n_iov = 0;
            let mut skip = off;
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                iov[n_iov] = std::io::IoSlice::new(&p[skip..]);
                skip = 0;
                n_iov += 1;
            }
            let cmsgs = [ControlMessage::ScmRights(raw)];
            let cm: &[ControlMessage] = if first && !raw.is_empty() { &cmsgs } else { &[] };
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov[..n_iov],
                cm,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(n) => {
                    off += n;
                    first = false;
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    let deadline = *deadline.get_or_insert_with(|| std::time::Instant::now() + self.timeout);
                    let mut p = [nix::poll::PollFd::new(self.sock.as_fd(), nix::poll::PollFlags::POLLOUT)];
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                    match nix::poll::poll(&mut p, nix::poll::PollTimeout::from(ms)) {
                        Ok(0) => {
                            self.kill();
                            return Err(Error::Stalled(self.timeout));
                        }
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            self.kill();
                            return Err(Error::Io(e.into()));
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    self.kill();
                    return Err(Error::Io(e.into()));
                }
            }
        }
        Ok(())
    }

    /// Marks the connection dead and shuts the socket down, so the event
    /// loop sees the end of the stream.
    pub fn kill(&self) {
        self.broken.store(true, Ordering::Release);
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}
