//! Fault injection for the fail-nth sweep.
//!
//! Composite operations call [`FailNth::step`] before every internal
//! allocation or step that can fail. A test arms the injector with `n`; the
//! `n`-th step from then on fails with `ENOMEM`, exactly once, the way the
//! kernel's `fail-nth` makes the n-th allocation of a syscall fail. Disarmed,
//! a step is a single relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering};

/// A countdown that makes the n-th step fail.
#[derive(Debug, Default)]
pub struct FailNth {
    /// 0 = disarmed; otherwise the number of steps left before the failure.
    countdown: AtomicU64,
    /// Steps taken while armed (to know when a sweep has passed every step).
    steps: AtomicU64,
}

impl FailNth {
    /// Arms the injector so that the `n`-th step from now fails (`n >= 1`).
    pub fn arm(&self, n: u64) {
        self.steps.store(0, Ordering::Relaxed);
        self.countdown.store(n, Ordering::Relaxed);
    }

    /// Disarms the injector; returns true if the armed failure was never hit.
    pub fn disarm(&self) -> bool {
        self.countdown.swap(0, Ordering::Relaxed) != 0
    }

    /// Steps counted since the last [`arm`](Self::arm).
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// Records one step; returns `true` if this step must fail.
    pub fn step(&self) -> bool {
        let left = self.countdown.load(Ordering::Relaxed);
        if left == 0 {
            return false;
        }
        self.steps.fetch_add(1, Ordering::Relaxed);
        if left == 1 {
            self.countdown.store(0, Ordering::Relaxed);
            true
        } else {
            self.countdown.store(left - 1, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_exactly_the_nth_step_once() {
        let f = FailNth::default();
        assert!(!f.step());
        f.arm(3);
        assert!(!f.step());
        assert!(!f.step());
        assert!(f.step());
        assert!(!f.step());
        assert!(!f.disarm());
        f.arm(5);
        assert!(!f.step());
        assert!(f.disarm());
    }
}
