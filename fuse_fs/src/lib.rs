//! The live state of the ioasid stack as a file system: every session,
//! IOAS, mapping, memory object, device, attachment, pPASID, vPASID map
//! and fault of a running core, for `ls` and `cat`.
//!
//! [`model`] builds the tree from an observer snapshot of the core and the
//! driver state of each device (asked of its server through the core).
//! [`fs`] is the thin FUSE adapter over it.
#![deny(missing_docs)]

pub mod fs;
pub mod model;
