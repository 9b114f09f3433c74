//! The live state of the ioasid stack as a file system: every session,
//! IOAS, mapping, memory object, device, attachment, pPASID, vPASID map
//! and fault of a running core, for `ls` and `cat`.
//!
//! [`model`] builds the tree from an observer snapshot of the core and the
//! driver state of each device (asked of its server through the core).
//! [`fs`] is the thin FUSE adapter over it, connected to the core again
//! when the core comes back after going away. [`mountpoint`] makes the
//! mount point ready: it detaches a dead FUSE mount left there by a killed
//! `ioasid-fs`, and refuses to touch anything else mounted there.
#![deny(missing_docs)]

pub mod fs;
pub mod model;
pub mod mountpoint;
