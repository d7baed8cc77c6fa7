//! The wake-up state machine of the hinter thread: three states in one atomic, so racing
//! frees send at most one wake-up, and a condition variable to sleep on.

use std::time::Duration;

use crate::sync::{AtomicBool, AtomicU8, Condvar, Mutex, Ordering};

/// No pass is requested.
pub(crate) const IDLE: u8 = 0;
/// A pass is requested and the thread has not started it.
pub(crate) const REQUESTED: u8 = 1;
/// The thread is running passes.
pub(crate) const ACTIVE: u8 = 2;

/// Wakes the hinter thread; see the module docs.
pub(crate) struct HintSignal {
    state: AtomicU8,
    /// A thread is running and wants requests.
    listening: AtomicBool,
    high_water: u64,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl HintSignal {
    pub(crate) fn new(high_water: usize) -> Self {
        Self {
            state: AtomicU8::new(IDLE),
            listening: AtomicBool::new(false),
            high_water: high_water as u64,
            stop: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// Whether a thread listens (frees skip counting otherwise).
    #[inline]
    pub(crate) fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// Called by a free that left `unhinted` unhinted blocks at or above the hint order.
    #[inline]
    pub(crate) fn note_unhinted(&self, unhinted: u64) {
        if unhinted >= self.high_water {
            self.request();
        }
    }

    /// Requests a pass; wakes the thread only on the transition from idle.
    pub(crate) fn request(&self) {
        if self.state.load(Ordering::Relaxed) == REQUESTED {
            return;
        }
        if self.state.swap(REQUESTED, Ordering::AcqRel) == IDLE {
            let _stop = self.stop.lock();
            self.wake.notify_all();
        }
    }

    /// Marks the thread as started (again, after `stop`), with a pass requested: a thread
    /// stopped mid-pass left the state active, and the new one must not wait for a wake-up
    /// that the old state would swallow.
    pub(crate) fn start_listening(&self) {
        *self.stop.lock() = false;
        self.state.store(REQUESTED, Ordering::Release);
        self.listening.store(true, Ordering::Release);
    }

    /// Takes the wake-up lock, for holding across `fork` (after the shard locks, which is
    /// the order frees take them in).
    #[cfg(not(loom))]
    pub(crate) fn lock_for_fork(&self) -> crate::sync::MutexGuard<'_, bool> {
        self.stop.lock()
    }

    /// Asks the thread to exit.
    pub(crate) fn stop(&self) {
        self.listening.store(false, Ordering::Release);
        *self.stop.lock() = true;
        self.wake.notify_all();
    }

    /// Sleeps until a pass is requested; false when asked to stop.
    pub(super) fn wait_for_request(&self) -> bool {
        let mut stop = self.stop.lock();
        loop {
            if *stop {
                return false;
            }
            if self.state.load(Ordering::Acquire) == REQUESTED {
                self.state.store(ACTIVE, Ordering::Release);
                return true;
            }
            stop = self.wake.wait(stop);
        }
    }

    /// Sleeps for `pause` unless asked to stop; false when asked to stop.
    pub(super) fn pause(&self, pause: Duration) -> bool {
        let deadline = std::time::Instant::now() + pause;
        let mut stop = self.stop.lock();
        loop {
            if *stop {
                return false;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return true;
            }
            stop = self.wake.wait_timeout(stop, left);
        }
    }

    /// After a run of passes: back to idle unless a request came in meanwhile.
    pub(super) fn finish(&self) {
        let _ = self
            .state
            .compare_exchange(ACTIVE, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }
}
