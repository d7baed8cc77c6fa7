//! The only module that names `std::sync` or `loom`.
//!
//! Every other module imports atomics, locks and threads from here, so a build with
//! `RUSTFLAGS="--cfg loom"` swaps all of them for loom's model-checked versions at once
//! and the loom models in `loom-tests/` drive the real code.
//!
//! Two things loom cannot model are also routed through here: the clock (models see a
//! clock that never moves, which keeps executions deterministic) and the CPU number
//! (models pick shards explicitly).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize};

#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

pub(crate) use std::sync::atomic::Ordering;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::fence;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::fence;

/// Gives up the CPU in a spin loop; under loom, lets the model run another thread.
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;
#[cfg(not(loom))]
pub(crate) use std::thread::yield_now;

#[cfg(loom)]
use loom::sync as imp;
#[cfg(not(loom))]
use std::sync as imp;

/// A mutex that ignores poisoning.
///
/// Every critical section in the crate leaves the data it guards consistent before it
/// can panic (a panic can only come from a hook such as a failing advisor, and those run
/// with no lock held), so a panic elsewhere must not make the pool unusable.
pub(crate) struct Mutex<T>(imp::Mutex<T>);

/// The guard of [`Mutex`].
pub(crate) type MutexGuard<'a, T> = imp::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    #[cfg(not(loom))]
    pub(crate) const fn new(value: T) -> Self {
        Self(imp::Mutex::new(value))
    }

    #[cfg(loom)]
    pub(crate) fn new(value: T) -> Self {
        Self(imp::Mutex::new(value))
    }

    #[inline]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A condition variable that ignores poisoning, paired with [`Mutex`].
pub(crate) struct Condvar(imp::Condvar);

impl Condvar {
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Self(imp::Condvar::new())
    }

    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Self(imp::Condvar::new())
    }

    /// Waits until notified or `timeout` passes; may wake spuriously.
    ///
    /// loom's timed wait never times out, so models only call this where a notification
    /// is certain or pass a zero timeout to callers that then skip the wait.
    pub(crate) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: std::time::Duration,
    ) -> MutexGuard<'a, T> {
        match self.0.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Waits until notified; may wake spuriously.
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// Milliseconds since an arbitrary process-wide start, as a wrapping `u32`.
///
/// Only free blocks at or above the hint order read it, and it reads the coarse
/// monotonic clock (a few ns from the vDSO, a few ms of resolution: plenty for delays of
/// a second). Under loom it is always 0.
#[inline]
pub(crate) fn now_ms() -> u32 {
    #[cfg(any(loom, miri))]
    {
        0
    }
    #[cfg(not(any(loom, miri)))]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write to.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
    }
}

/// The CPU this thread runs on, as a hint (it may move at any time). 0 under loom and Miri.
#[inline]
pub(crate) fn current_cpu() -> usize {
    #[cfg(any(loom, miri))]
    {
        0
    }
    #[cfg(not(any(loom, miri)))]
    {
        // SAFETY: sched_getcpu has no preconditions; glibc answers from rseq or the vDSO.
        let cpu = unsafe { libc::sched_getcpu() };
        if cpu < 0 { 0 } else { cpu as usize }
    }
}

/// Declares a process-wide value and a function returning it: a plain `static` normally;
/// under loom, one per model execution (loom must see a fresh one each time).
macro_rules! process_wide {
    ($(#[$meta:meta])* $vis:vis fn $name:ident() -> $ty:ty = $init:expr;) => {
        $(#[$meta])*
        $vis fn $name() -> &'static $ty {
            #[cfg(not(loom))]
            {
                static VALUE: $ty = $init;
                &VALUE
            }
            #[cfg(loom)]
            {
                loom::lazy_static! {
                    static ref VALUE: $ty = $init;
                }
                &VALUE
            }
        }
    };
}
pub(crate) use process_wide;

/// Spawns a named thread (a loom thread under loom).
pub(crate) fn spawn_named(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle> {
    #[cfg(not(loom))]
    {
        std::thread::Builder::new().name(name.into()).spawn(f)
    }
    #[cfg(loom)]
    {
        let _ = name;
        Ok(loom::thread::spawn(f))
    }
}

/// The handle of a thread from [`spawn_named`].
#[cfg(not(loom))]
pub(crate) type JoinHandle = std::thread::JoinHandle<()>;
/// The handle of a thread from [`spawn_named`].
#[cfg(loom)]
pub(crate) type JoinHandle = loom::thread::JoinHandle<()>;

/// The calling process's id (a system call: not for hot paths). 1 under loom and Miri.
pub(crate) fn process_id() -> u32 {
    #[cfg(any(loom, miri))]
    {
        1
    }
    #[cfg(not(any(loom, miri)))]
    {
        // SAFETY: getpid has no preconditions.
        unsafe { libc::getpid() as u32 }
    }
}
