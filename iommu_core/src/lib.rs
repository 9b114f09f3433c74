//! `iommu_core`: the IOASID daemon's library.
//!
//! It owns I/O address spaces (IOASes) over shared memory the way Linux
//! iommufd owns them behind `/dev/iommu`: memory objects registered from
//! fds, IOASes with iommufd's map/unmap/copy rules, nested IOASes, a global
//! pPASID space, fault queues and dirty tracking. Page tables live in a
//! shared table pool in a documented radix format so that device servers can
//! walk them without asking the core.
//!
//! Code map: [`model`] is the object model, [`pagetable`] the table format,
//! pool and reference walker, [`sysaddr`] the system address space,
//! [`wire`] the protocol, [`server`] the mio event loop, [`client`] the
//! blocking client, [`ctl`] the client of a device server's control
//! socket, [`device`] the device end of a channel, [`tu`] the
//! translation unit device servers link, [`shm`] every access to shared
//! memory, [`scm`] the one fd receiver, [`memfd`] memory files and their
//! seals, [`types`] the data shared by all of these, [`errno`] the errno
//! vocabulary, [`sync`] lock helpers, [`failpoint`] fail-nth injection,
//! [`script`] the `ioasidctl` command language.

#![deny(missing_docs)]

/// Takes the value out of a reply of the expected variant, or fails with the
/// caller's `Error::Unexpected` (the client and the device channel share it).
macro_rules! expect {
    ($reply:expr, $pat:pat => $val:expr) => {
        match $reply {
            $pat => Ok($val),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    };
}

pub mod client;
pub mod ctl;
pub mod device;
pub mod errno;
pub mod failpoint;
pub mod memfd;
pub mod model;
pub mod pagetable;
pub mod scm;
pub mod script;
pub mod server;
pub mod shm;
pub mod sync;
pub mod sysaddr;
pub mod tu;
pub mod types;
pub mod wire;

pub use errno::Errno;
