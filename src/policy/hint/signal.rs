//! How frees ask for a hinting pass: per pool, three states in one atomic (Linux's
//! `page_reporting` state machine: idle, requested, active), so racing frees ring the
//! process's [`Doorbell`] at most once; the hinter thread sleeps on the doorbell.

use std::time::Duration;

use crate::sync::{AtomicBool, AtomicU8, Condvar, Mutex, Ordering};

/// No pass is requested.
const IDLE: u8 = 0;
/// A pass is requested and the thread has not started it.
const REQUESTED: u8 = 1;
/// The thread is running passes for this pool.
const ACTIVE: u8 = 2;

// === impl Doorbell ===

/// Where the hinter thread sleeps: a flag and a condition variable. One per process,
/// shared by every pool's [`HintSignal`].
pub(crate) struct Doorbell {
    rung: Mutex<bool>,
    wake: Condvar,
}

impl Doorbell {
    /// A doorbell nobody rang.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Self {
            rung: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// A doorbell nobody rang.
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Self {
            rung: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// Wakes the thread (or makes its next wait return at once).
    pub(crate) fn ring(&self) {
        *self.rung.lock() = true;
        self.wake.notify_all();
    }

    /// Sleeps until rung, or `timeout` passes (`None`: no timeout). Clears the bell.
    pub(crate) fn wait(&self, timeout: Option<Duration>) {
        let mut rung = self.rung.lock();
        if !*rung {
            rung = match timeout {
                Some(timeout) => self.wake.wait_timeout(rung, timeout),
                None => self.wake.wait(rung),
            };
        }
        *rung = false;
    }

    /// Takes the doorbell's lock, to hold across `fork` (so the child does not inherit it
    /// locked by a thread that does not exist there).
    #[cfg(not(loom))]
    pub(crate) fn lock(&self) -> crate::sync::MutexGuard<'_, bool> {
        self.rung.lock()
    }
}

// === impl HintSignal ===

/// One pool's wake-up state; see the module docs.
pub(crate) struct HintSignal {
    state: AtomicU8,
    /// A thread serves this pool and wants requests (frees skip counting otherwise).
    listening: AtomicBool,
    high_water: u64,
    doorbell: &'static Doorbell,
}

impl HintSignal {
    pub(crate) fn new(high_water: usize, doorbell: &'static Doorbell) -> Self {
        Self {
            state: AtomicU8::new(IDLE),
            listening: AtomicBool::new(false),
            high_water: high_water as u64,
            doorbell,
        }
    }

    /// Whether a thread serves this pool.
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

    /// Whether a pass is requested already (a request now would change nothing).
    #[inline]
    pub(crate) fn is_requested(&self) -> bool {
        self.state.load(Ordering::Relaxed) == REQUESTED
    }

    /// Requests a pass; rings the doorbell only on the transition from idle.
    #[inline]
    pub(crate) fn request(&self) {
        if self.state.load(Ordering::Relaxed) == REQUESTED {
            return;
        }
        self.request_slow();
    }

    #[cold]
    fn request_slow(&self) {
        if self.state.swap(REQUESTED, Ordering::AcqRel) == IDLE {
            self.doorbell.ring();
        }
    }

    /// Requests a pass that cannot wait for the one already scheduled (a resident budget
    /// was exceeded): rings the doorbell on the way out of idle *and* out of a run of
    /// passes, whose next pass may be an hour away. At most one ring per pass: the
    /// thread's next look takes the request.
    #[inline]
    pub(crate) fn request_urgent(&self) {
        if self.state.load(Ordering::Relaxed) == REQUESTED {
            return;
        }
        self.request_urgent_slow();
    }

    #[cold]
    fn request_urgent_slow(&self) {
        if self.state.swap(REQUESTED, Ordering::AcqRel) != REQUESTED {
            self.doorbell.ring();
        }
    }

    /// A thread serves this pool from now on; a first pass is requested, whatever state a
    /// stopped or forked-away thread left (it must not wait for a wake-up that an old
    /// "active" would swallow).
    pub(crate) fn start_listening(&self) {
        self.state.store(REQUESTED, Ordering::Release);
        self.listening.store(true, Ordering::Release);
        self.doorbell.ring();
    }

    /// No thread serves this pool any more.
    pub(crate) fn stop_listening(&self) {
        self.listening.store(false, Ordering::Release);
    }

    /// Whether a pass was requested; if so, the pool is now active (requests that arrive
    /// while its passes run leave it requested, so they are served afterwards).
    pub(crate) fn take_request(&self) -> bool {
        self.state.load(Ordering::Relaxed) == REQUESTED
            && self
                .state
                .compare_exchange(REQUESTED, ACTIVE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// After a run of passes with nothing left to do: back to idle, unless a request came
    /// in meanwhile.
    pub(crate) fn finish(&self) {
        let _ = self
            .state
            .compare_exchange(ACTIVE, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }
}
