//! Locks whose poisoning is fatal.
//!
//! A lock is poisoned when a thread panicked while holding it: what it
//! guards may be half-changed. The state these locks guard (IOTLBs, DMA
//! guards, memory maps, device registers) is what keeps DMA inside its
//! address space, so going on with it, or skipping the work and reporting
//! it done, is never safe. These helpers log and abort the process instead.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cold]
fn poisoned(what: &str) -> ! {
    tracing::error!("a thread panicked while holding a {what}; its state cannot be trusted, aborting");
    eprintln!("fatal: a thread panicked while holding a {what}; aborting");
    std::process::abort()
}

/// Locks `m`; aborts the process if it is poisoned.
#[track_caller]
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|_| poisoned("mutex"))
}

/// Takes `l` for reading; aborts the process if it is poisoned.
#[track_caller]
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|_| poisoned("read-write lock"))
}

/// Takes `l` for writing; aborts the process if it is poisoned.
#[track_caller]
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|_| poisoned("read-write lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_locks_are_taken() {
        let m = Mutex::new(1);
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
        let l = RwLock::new(3);
        *write(&l) += 1;
        assert_eq!(*read(&l), 4);
    }
}
