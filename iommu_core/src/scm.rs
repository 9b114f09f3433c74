//! Receiving data and fds (SCM_RIGHTS) from a Unix socket without losing
//! an fd.
//!
//! Before `recvmsg` returns, the kernel installs in the receiver's fd table
//! every fd of the message that fits the control buffer; when some do not
//! fit it closes those and sets `MSG_CTRUNC`. The fds it did install belong
//! to the receiver whatever the flags say, so [`recv`] walks the control
//! buffer itself (`CMSG_FIRSTHDR`/`CMSG_NXTHDR`) and takes ownership of
//! every one of them, truncated or not, and reports the truncation. (A
//! parser that gives up on a truncated buffer leaves the installed fds open
//! for the life of the process: a peer sending more fds than the buffer
//! holds would fill the fd table.)
//!
//! Every fd-receiving path of the project goes through [`recv`].

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The kernel's limit of fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// Words of the largest control buffer: CMSG_SPACE of [`SCM_MAX_FD`] ints
/// (1,012 bytes of data and a 16-byte header, rounded up).
const CONTROL_WORDS: usize = (SCM_MAX_FD * size_of::<libc::c_int>() + 16).div_ceil(size_of::<u64>()) + 1;

/// What one `recvmsg` brought.
#[derive(Debug)]
pub struct Received {
    /// Data bytes received; 0 at the end of the stream.
    pub bytes: usize,
    /// Every fd the kernel installed for this call (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The control data was cut (`MSG_CTRUNC`): the peer sent more fds than
    /// the buffer holds. The kernel closed those that did not fit; those in
    /// `fds` are open and owned.
    pub truncated: bool,
}

/// Receives into `buf` with room for `max_fds` fds (at least 1, at most
/// [`SCM_MAX_FD`]) and takes ownership of every fd the kernel installed.
/// The fds are close-on-exec. Errors are the socket's (`WouldBlock` on a
/// non-blocking socket with nothing to read, `Interrupted`, ...); no fd is
/// installed when `recvmsg` fails.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> std::io::Result<Received> {
    let room = max_fds.clamp(1, SCM_MAX_FD) * size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE is arithmetic on its argument (at most 1012).
    let space = unsafe { libc::CMSG_SPACE(room as libc::c_uint) } as usize;
    debug_assert!(space <= CONTROL_WORDS * size_of::<u64>());
    // u64 words: the control buffer must be aligned for `cmsghdr`. On the
    // stack (at most 1,032 bytes: CMSG_SPACE of SCM_MAX_FD ints), so a
    // receive allocates nothing.
    let mut words = [0u64; CONTROL_WORDS];
    let control = &mut words[..space.div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(control) as _;
    // SAFETY: `msg` points at `iov` (which covers `buf`) and at `control`,
    // all alive and exclusively borrowed for the call; the kernel writes
    // within the lengths given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fds = take_fds(&msg);
    Ok(Received { bytes: n as usize, fds, truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

/// Owns every fd of every `SCM_RIGHTS` message in the control buffer
/// `msg` describes, as the kernel left it after `recvmsg` (its
/// `msg_controllen` is the length the kernel wrote).
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // `msg_controllen` is a `size_t` with glibc, a `socklen_t` with musl.
    #[allow(clippy::unnecessary_cast)]
    let end = msg.msg_control as usize + msg.msg_controllen as usize;
    // SAFETY: CMSG_LEN is arithmetic.
    let header = unsafe { libc::CMSG_LEN(0) } as usize;
    // SAFETY: `msg` describes a control buffer filled by `recvmsg`;
    // CMSG_FIRSTHDR returns its start, or null if it cannot hold a header.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR and CMSG_NXTHDR only return headers that
        // lie whole within the control buffer, which is aligned for them.
        let h = unsafe { std::ptr::read(c) };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: `c` is a header within the buffer; its data follows it.
            let data = unsafe { libc::CMSG_DATA(c) };
            // Never past the bytes the kernel wrote, whatever cmsg_len says.
            let len = (h.cmsg_len as usize).saturating_sub(header).min(end.saturating_sub(data as usize));
            for i in 0..len / size_of::<libc::c_int>() {
                // SAFETY: entry `i` lies within the data of this message
                // (bounded by `len` above); it may be unaligned.
                let fd = unsafe { std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i)) };
                if fd >= 0 {
                    // SAFETY: the kernel installed `fd` in our table for
                    // this call; nothing else knows of it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: `c` is a valid header of the buffer `msg` describes;
        // CMSG_NXTHDR returns the next one or null at the end.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    /// Open fds of this process that refer to the memfd called `name`
    /// (other tests of the process open and close fds at the same time,
    /// so only fds of this file are counted).
    fn open_copies(name: &str) -> usize {
        let want = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy() == want)
            .count()
    }

    fn send(sock: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>, copies: usize) {
        let raw = vec![fd.as_raw_fd(); copies];
        let iov = [std::io::IoSlice::new(bytes)];
        let cm = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
        let n = nix::sys::socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &cm, nix::sys::socket::MsgFlags::empty(), None)
            .unwrap();
        assert_eq!(n, bytes.len());
    }

    #[test]
    fn fds_beyond_the_buffer_are_reported_and_none_is_left_open() {
        let name = format!("scm-trunc-{}", std::process::id());
        let m = crate::memfd::create(&name, 4096).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(open_copies(&name), 1);
        for _ in 0..20 {
            send(&a, b"x", m.as_fd(), 64);
            let mut buf = [0u8; 8];
            let r = recv(b.as_fd(), &mut buf, 8).unwrap();
            assert_eq!((r.bytes, buf[0]), (1, b'x'));
            assert!(r.truncated, "64 fds cannot fit a buffer for 8");
            assert_eq!(r.fds.len(), 8, "the fds the kernel installed are all returned");
            drop(r);
        }
        assert_eq!(open_copies(&name), 1, "fds of truncated messages stayed open");
    }

    #[test]
    fn fds_that_fit_arrive_with_the_data_and_close_on_exec() {
        let name = format!("scm-fit-{}", std::process::id());
        let m = crate::memfd::create(&name, 4096).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, b"hello", m.as_fd(), 3);
        let mut buf = [0u8; 16];
        let r = recv(b.as_fd(), &mut buf, 16).unwrap();
        assert_eq!((r.bytes, &buf[..5], r.truncated, r.fds.len()), (5, &b"hello"[..], false, 3));
        assert_eq!(open_copies(&name), 4);
        for fd in &r.fds {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        drop(r);
        assert_eq!(open_copies(&name), 1);
        // Plain data, then the end of the stream, then nothing to read.
        std::io::Write::write_all(&mut &a, b"ab").unwrap();
        let r = recv(b.as_fd(), &mut buf, 1).unwrap();
        assert_eq!((r.bytes, r.fds.len(), r.truncated), (2, 0, false));
        b.set_nonblocking(true).unwrap();
        let e = recv(b.as_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(recv(b.as_fd(), &mut buf, 1).unwrap().bytes, 0);
    }
}
