//! Locks whose poisoning is fatal.
//!
//! A lock is poisoned when a thread panicked while holding it: what it
//! guards may be half-changed. The state these locks guard (IOTLBs, DMA
//! guards, memory maps, device registers) is what keeps DMA inside its
//! address space, so going on with it, or skipping the work and reporting
//! it done, is never safe. These helpers log and abort the process instead.

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

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

/// Waits on `cv` with `guard` for at most `d` (a notification, a spurious
/// wake-up or the time running out); aborts the process if the mutex is
/// poisoned meanwhile.
#[track_caller]
pub fn wait_timeout<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    match cv.wait_timeout(guard, d) {
        Ok((g, _)) => g,
        Err(_) => poisoned("mutex"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, ExitStatus, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Set in a child process made by [`run_child`]; its value says what
    /// the `#[ignore]`d helper test run there is to do.
    pub(crate) const CHILD: &str = "IOASID_POISON_CHILD";

    /// How a child process made by [`run_child`] ended.
    pub(crate) struct Child {
        pub(crate) status: ExitStatus,
        pub(crate) stdout: String,
        pub(crate) stderr: String,
    }

    impl Child {
        /// Asserts that the child was killed by SIGABRT after printing
        /// `reached` and before printing `not_reached`.
        pub(crate) fn assert_aborted(&self, reached: &str, not_reached: &str) {
            let all = format!("status {:?}\nstdout:\n{}\nstderr:\n{}", self.status, self.stdout, self.stderr);
            assert!(self.stdout.contains(reached), "the child did not get as far as {reached:?}: {all}");
            assert!(!self.stdout.contains(not_reached), "the child went on past a poisoned lock: {all}");
            assert_eq!(self.status.signal(), Some(libc::SIGABRT), "the child did not abort: {all}");
        }
    }

    /// Runs the `#[ignore]`d test `name` of this test binary alone in a
    /// child process with [`CHILD`] set to `arg`, and waits for it to end.
    pub(crate) fn run_child(name: &str, arg: &str) -> Child {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, arg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        // Generous: the child only has to set up and hit the lock.
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child {name} ({arg}) did not end in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Child { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
    }

    #[test]
    fn healthy_locks_are_taken() {
        let m = Mutex::new(1);
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
        let l = RwLock::new(3);
        *write(&l) += 1;
        assert_eq!(*read(&l), 4);
    }

    #[test]
    #[ignore = "child process of poisoned_locks_abort_the_process; not a test by itself"]
    fn poisoned_lock_child() {
        let Ok(which) = std::env::var(CHILD) else { return };
        let m = Arc::new(Mutex::new(0u32));
        let l = Arc::new(RwLock::new(0u32));
        let (m2, l2) = (m.clone(), l.clone());
        let poisoner = std::thread::spawn(move || {
            let _m = m2.lock().unwrap();
            let _l = l2.write().unwrap();
            panic!("panicking while holding the locks, on purpose");
        });
        assert!(poisoner.join().is_err());
        assert!(m.is_poisoned() && l.is_poisoned());
        println!("POISONED");
        let v = match which.as_str() {
            "lock" => *lock(&m),
            "read" => *read(&l),
            "write" => *write(&l),
            other => panic!("unknown child task {other}"),
        };
        println!("WENT ON PAST THE POISONED LOCK with {v}");
    }

    #[test]
    fn poisoned_locks_abort_the_process() {
        for (which, kind) in [("lock", "mutex"), ("read", "read-write lock"), ("write", "read-write lock")] {
            let c = run_child("sync::tests::poisoned_lock_child", which);
            c.assert_aborted("POISONED", "WENT ON");
            let line = format!("fatal: a thread panicked while holding a {kind}; aborting");
            assert!(c.stderr.contains(&line), "{which}: no {line:?} in {}", c.stderr);
        }
    }
}
