//! The fixed error vocabulary of the core, as errno values.
//!
//! Every failure the core reports on the wire carries one of these, so a test
//! can assert the exact failure the way the kernel's iommufd selftests do.

use serde::{Deserialize, Serialize};

/// An errno from the core's fixed vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Errno {
    /// Operation not permitted (wrong role, permission mismatch).
    EPERM,
    /// No such object, or nothing mapped where asked.
    ENOENT,
    /// Bad file descriptor passed with a request.
    EBADF,
    /// Out of memory (table pool or an injected allocation failure).
    ENOMEM,
    /// Object is referenced or busy.
    EBUSY,
    /// Already exists (overlapping fixed IOVA, attached PASID).
    EEXIST,
    /// Invalid argument.
    EINVAL,
    /// A configured limit was hit.
    ENOSPC,
    /// Argument list or message too large.
    E2BIG,
    /// Protocol error: a frame or message that could not be decoded.
    EPROTO,
    /// A reply would not fit the caller's buffer.
    EMSGSIZE,
    /// Operation not supported.
    EOPNOTSUPP,
    /// Address range in use by a reserved region or a mapping.
    EADDRINUSE,
    /// Value too large (range arithmetic overflowed).
    EOVERFLOW,
    /// A device server did not answer in time.
    ETIMEDOUT,
    /// Permission denied: write access to memory that cannot be written.
    EACCES,
    /// Try again later: the core's shared buffers are full.
    EAGAIN,
}

impl Errno {
    /// The Linux errno number.
    pub fn code(self) -> i32 {
        match self {
            Errno::EPERM => libc::EPERM,
            Errno::ENOENT => libc::ENOENT,
            Errno::EBADF => libc::EBADF,
            Errno::ENOMEM => libc::ENOMEM,
            Errno::EBUSY => libc::EBUSY,
            Errno::EEXIST => libc::EEXIST,
            Errno::EINVAL => libc::EINVAL,
            Errno::ENOSPC => libc::ENOSPC,
            Errno::E2BIG => libc::E2BIG,
            Errno::EPROTO => libc::EPROTO,
            Errno::EMSGSIZE => libc::EMSGSIZE,
            Errno::EOPNOTSUPP => libc::EOPNOTSUPP,
            Errno::EADDRINUSE => libc::EADDRINUSE,
            Errno::EOVERFLOW => libc::EOVERFLOW,
            Errno::ETIMEDOUT => libc::ETIMEDOUT,
            Errno::EACCES => libc::EACCES,
            Errno::EAGAIN => libc::EAGAIN,
        }
    }

    /// The symbolic name, e.g. `"EINVAL"`.
    pub fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::ENOENT => "ENOENT",
            Errno::EBADF => "EBADF",
            Errno::ENOMEM => "ENOMEM",
            Errno::EBUSY => "EBUSY",
            Errno::EEXIST => "EEXIST",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::E2BIG => "E2BIG",
            Errno::EPROTO => "EPROTO",
            Errno::EMSGSIZE => "EMSGSIZE",
            Errno::EOPNOTSUPP => "EOPNOTSUPP",
            Errno::EADDRINUSE => "EADDRINUSE",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::ETIMEDOUT => "ETIMEDOUT",
            Errno::EACCES => "EACCES",
            Errno::EAGAIN => "EAGAIN",
        }
    }

    /// Every member of the vocabulary.
    pub const ALL: [Errno; 17] = [
        Errno::EPERM,
        Errno::ENOENT,
        Errno::EBADF,
        Errno::ENOMEM,
        Errno::EBUSY,
        Errno::EEXIST,
        Errno::EINVAL,
        Errno::ENOSPC,
        Errno::E2BIG,
        Errno::EPROTO,
        Errno::EMSGSIZE,
        Errno::EOPNOTSUPP,
        Errno::EADDRINUSE,
        Errno::EOVERFLOW,
        Errno::ETIMEDOUT,
        Errno::EACCES,
        Errno::EAGAIN,
    ];

    /// The member whose Linux errno number is `code`.
    pub fn from_code(code: i32) -> Option<Errno> {
        Errno::ALL.into_iter().find(|e| e.code() == code)
    }

    /// Parses a symbolic name such as `"EBUSY"`.
    pub fn from_name(name: &str) -> Option<Errno> {
        Errno::ALL.into_iter().find(|e| e.name() == name)
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_codes_are_distinct() {
        let mut codes = std::collections::HashSet::new();
        for e in Errno::ALL {
            assert_eq!(Errno::from_name(e.name()), Some(e));
            assert!(codes.insert(e.code()), "duplicate code for {e}");
        }
        assert_eq!(Errno::EBUSY.code(), 16);
        assert_eq!(Errno::from_name("EFOO"), None);
    }
}
