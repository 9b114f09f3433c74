//! The state generation, and the page observers read it from without
//! asking.
//!
//! The generation is bumped (`+= 1`) by everything that may change what a
//! snapshot shows. Each bump is also stored, with a release store, in word
//! 0 of a small sealed memfd (the generation page) before the request that
//! caused it is answered; `Request::GenerationPage` hands an observer a
//! read-only open of it. An observer that keeps a cache keyed by the
//! generation then learns whether the state moved with one load instead
//! of a round trip, and never misses a change whose reply has already been
//! sent.

use std::fs::File;
use std::ops::AddAssign;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};

use crate::memfd;
use crate::shm::Words;
use crate::wire::GENERATION_PAGE_BYTES;

/// The state generation and its page.
pub(super) struct Generation {
    value: u64,
    /// None if the page could not be made (the generation is then only
    /// answered by `Request::Generation`).
    page: Option<(File, Words)>,
}

impl Generation {
    /// Generation 1, published in a new page.
    pub(super) fn new() -> Generation {
        let page = match make_page() {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("cannot make the generation page ({e}); observers will ask for the generation");
                None
            }
        };
        let mut g = Generation { value: 0, page };
        g += 1;
        g
    }

    /// The generation now.
    pub(super) fn get(&self) -> u64 {
        self.value
    }

    /// A read-only open of the page for a peer: `None` if there is no
    /// page. The page is sealed against writes, so no open of it can
    /// write.
    pub(super) fn page_fd(&self) -> Option<std::io::Result<OwnedFd>> {
        self.page.as_ref().map(|(f, _)| super::dispatch::reopen_read_only(f.as_fd()))
    }
}

impl AddAssign<u64> for Generation {
    fn add_assign(&mut self, n: u64) {
        self.value = self.value.wrapping_add(n);
        if let Some((_, w)) = &self.page {
            if let Some(word) = w.u64(0) {
                word.store(self.value, Ordering::Release);
            }
        }
    }
}

/// A zeroed page mapped read-write here, then sealed so that nothing else
/// can write it (`F_SEAL_FUTURE_WRITE`) or resize it.
fn make_page() -> Result<(File, Words), String> {
    let f = memfd::create("ioasid-generation", GENERATION_PAGE_BYTES).map_err(|e| e.to_string())?;
    let w = Words::map(&f, GENERATION_PAGE_BYTES).map_err(|e| format!("mmap: {e}"))?;
    let seals = SealFlag::F_SEAL_FUTURE_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| format!("seal: {e}"))?;
    Ok((f, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_shows_every_bump_and_cannot_be_written_through_its_fd() {
        let mut g = Generation::new();
        let fd = g.page_fd().expect("a page").expect("an fd");
        let f = File::from(fd);
        let r = crate::shm::ReadOnlyWords::map(&f, GENERATION_PAGE_BYTES).unwrap();
        assert_eq!(r.load(0), Some(1));
        g += 1;
        assert_eq!((g.get(), r.load(0)), (2, Some(2)));
        // Neither a writable mapping nor a write through a new open.
        assert!(crate::shm::map(&f, GENERATION_PAGE_BYTES, false).is_err());
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
        if let Ok(mut w) = std::fs::OpenOptions::new().write(true).open(path) {
            assert!(std::io::Write::write(&mut w, &[1]).is_err());
        }
        assert_eq!(r.load(0), Some(2));
    }
}
