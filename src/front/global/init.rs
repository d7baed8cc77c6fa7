//! Lazy, allocation-free initialisation: exactly one thread builds the pool, the others
//! wait; a failure or a panic is remembered, and a child forked mid-build starts over.

use std::alloc::GlobalAlloc;
use std::sync::atomic::{AtomicU8, Ordering};

use crossbeam_utils::Backoff;

use super::reentry::Reentry;
use super::{PoolAlloc, current_pid};
use crate::error::BuildError;
use crate::os::machine::cpu_count;
use crate::pool::PoolCore;

pub(super) const UNINIT: u8 = 0;
pub(super) const INITIALISING: u8 = 1;
pub(super) const READY: u8 = 2;
pub(super) const FAILED: u8 = 3;
/// Building the pool panicked: like FAILED, without a stored error.
pub(super) const PANICKED: u8 = 4;

/// What [`PoolAlloc::init`] reports after building the pool panicked.
static INIT_PANICKED: BuildError = BuildError::InvalidSetting("building the pool panicked");

/// Marks the pool as failed if building it unwinds, so no thread spins on it forever.
struct InitUnwind<'a>(&'a AtomicU8);

impl Drop for InitUnwind<'_> {
    fn drop(&mut self) {
        self.0.store(PANICKED, Ordering::Release);
    }
}

impl<F: GlobalAlloc> PoolAlloc<F> {
    // --- the pool's life cycle ---------------------------------------------------------

    /// The pool, if built.
    #[inline]
    pub(super) fn ready_core(&self) -> Option<&PoolCore> {
        if self.state.load(Ordering::Acquire) == READY {
            // SAFETY: READY is stored (release) only after `core` was written, and the
            // core is never written again while `self` lives.
            Some(unsafe { (*self.core.get()).assume_init_ref() })
        } else {
            None
        }
    }

    /// The pool, building it if needed. The caller must be inside a [`Reentry`] guard, so
    /// whatever building allocates goes to the fallback.
    #[inline]
    pub(super) fn core_or_init(&self) -> Option<&PoolCore> {
        match self.ready_core() {
            Some(core) => Some(core),
            None => self.init_slow(),
        }
    }

    #[cold]
    pub(super) fn init_slow(&self) -> Option<&PoolCore> {
        let backoff = Backoff::new();
        let mut spins = 0u32;
        loop {
            match self.state.compare_exchange(
                UNINIT,
                INITIALISING,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return self.initialise(),
                Err(READY) => return self.ready_core(),
                Err(FAILED | PANICKED) => return None,
                Err(_) => {
                    // Another thread builds the pool; building maps memory and takes
                    // microseconds, so spin, then yield.
                    if backoff.is_completed() {
                        std::thread::yield_now();
                        spins += 1;
                        if spins.is_multiple_of(64) {
                            self.recover_forked_init();
                        }
                    } else {
                        backoff.snooze();
                    }
                }
            }
        }
    }

    /// A child forked while the parent was building the pool: nobody will finish it here.
    /// Start over (what the parent had mapped stays mapped and unused in the child).
    #[cold]
    pub(super) fn recover_forked_init(&self) {
        let builder = self.init_pid.load(Ordering::Acquire);
        if builder != 0 && builder != current_pid() {
            let _ = self.state.compare_exchange(
                INITIALISING,
                UNINIT,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    #[cold]
    pub(super) fn initialise(&self) -> Option<&PoolCore> {
        self.init_pid.store(current_pid(), Ordering::Release);
        let mut config = self.config.hint_thread(false);
        if config.shards.is_none() {
            config = config.shards(cpu_count());
        }
        let unwind = InitUnwind(&self.state);
        let built = PoolCore::new(&config);
        std::mem::forget(unwind);
        match built {
            Ok(core) => {
                // SAFETY: we won UNINIT -> INITIALISING, so no other thread reads or
                // writes `core` until the release store below.
                unsafe { (*self.core.get()).write(core) };
                self.state.store(READY, Ordering::Release);
                self.ready_core()
            }
            Err(err) => {
                // SAFETY: as above, for `error`, published by the FAILED store.
                unsafe { (*self.error.get()).write(err) };
                self.state.store(FAILED, Ordering::Release);
                None
            }
        }
    }

    /// Builds the pool now, if it is not built yet, instead of on the first pool-sized
    /// request, and reports why it could not be built. After a failure every request goes
    /// to the fallback (building is not retried): call this early in `main` to find out.
    ///
    /// # Errors
    /// The [`BuildError`] of the first attempt (for example `Map` when `mmap` is refused
    /// under a tight `ulimit -v`).
    pub fn init(&self) -> Result<(), &BuildError> {
        let built = match Reentry::enter() {
            Some(_guard) => self.core_or_init().is_some(),
            // Called from inside the pool on this thread (another atfork handler, say):
            // building here could wait for ourselves, so only report.
            None => self.ready_core().is_some(),
        };
        if built {
            return Ok(());
        }
        match self.state.load(Ordering::Acquire) {
            // SAFETY: FAILED is stored (release) only after `error` was written.
            FAILED => Err(unsafe { (*self.error.get()).assume_init_ref() }),
            PANICKED => Err(&INIT_PANICKED),
            // Re-entered from inside the pool on this thread: it is still being built.
            _ => Ok(()),
        }
    }

    /// The built pool, or why building it failed, or `None` if it is not built yet.
    pub(super) fn built(&self) -> Option<Result<&PoolCore, &BuildError>> {
        match self.state.load(Ordering::Acquire) {
            // SAFETY: as in `ready_core`.
            READY => Some(Ok(unsafe { (*self.core.get()).assume_init_ref() })),
            // SAFETY: as in `init`.
            FAILED => Some(Err(unsafe { (*self.error.get()).assume_init_ref() })),
            PANICKED => Some(Err(&INIT_PANICKED)),
            _ => None,
        }
    }
}
