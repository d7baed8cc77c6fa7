//! The pools of this process.
//!
//! Every pool joins one process-wide list when it is built and leaves it before it is
//! dropped. The list serves what one pool cannot do alone:
//!
//! - **One hinter thread** for the whole process ([`hinter`](super::hinter)), serving every
//!   pool that asked for hinting, as jemalloc's background threads serve every arena: a
//!   runtime that makes two thousand pools gets one thread, not two thousand.
//! - **One memory pressure watcher thread** ([`pressure`](super::pressure)), serving every
//!   pool that asked to hear of memory pressure, on the same terms.
//! - **Fork safety.** `pthread_atfork` handlers, installed once when the first pool joins,
//!   take every pool's locks before `fork` and release them in parent and child (glibc's
//!   `malloc` does the same with its arenas), so a child never inherits a lock held by a
//!   thread it does not have. In the child they also take back what such threads held:
//!   blocks the hinter had isolated, and requests of threads waiting for capture.
//!
//! # Protocol
//! The list and each pool's [`Entry`] are touched only under the registry lock. A pool
//! joins with a stable address (a `PagePool` boxes its core; a `PoolAlloc` maps it) and
//! [`leave`](Registry::leave)s before that address goes away; `leave` waits while the
//! hinter runs a pass on it, so the thread never touches a pool that left.
//!
//! Lock order: registry, then a pool's shards (index order, shared last), then its capture
//! queue, then the doorbell. Nothing that holds a shard lock takes the registry lock, and
//! nothing allocates while holding it.

use std::cell::UnsafeCell;
use std::ptr;
use std::time::Instant;

use super::PoolCore;
use crate::policy::hint::Doorbell;
use crate::sync::{Condvar, JoinHandle, Mutex, process_wide};

// === impl Registry ===

/// The process-wide list of pools; see the module docs.
pub(crate) struct Registry {
    pub(super) state: Mutex<State>,
    /// Signalled when a pass ends, a spawn finishes or the thread exits.
    pub(super) changed: Condvar,
    /// The hinter thread sleeps here; frees ring it through their pool's `HintSignal`.
    pub(crate) doorbell: Doorbell,
}

/// What the registry lock protects.
pub(super) struct State {
    /// The first pool of the list.
    pub(super) head: *const PoolCore,
    /// The pool a hinting pass runs on right now, if any.
    pub(super) busy: *const PoolCore,
    /// Pools that asked for hinting.
    pub(super) hinting: usize,
    /// The hinter thread.
    pub(super) thread: Thread,
    /// Bumped to tell the running thread to exit: a thread runs while the generation it
    /// was started with is current.
    pub(super) generation: u64,
    /// The memory pressure watcher (see [`pressure`](super::pressure)).
    #[cfg(not(any(loom, miri)))]
    pub(super) pressure: super::pressure::Watch,
}

/// The hinter thread's life.
pub(super) enum Thread {
    None,
    /// Being spawned, outside the lock (spawning allocates).
    Spawning,
    /// Told to exit and being joined, outside the lock: no new thread starts until the old
    /// one is gone, so there is never more than one.
    Stopping,
    Running {
        /// The process it runs in: after `fork` a child sees its parent's thread here.
        pid: u32,
        handle: JoinHandle,
    },
}

// SAFETY: the raw pointers name registered pools, which stay at their address until they
// leave, and leaving takes this lock; they are dereferenced only under it (or, for `busy`,
// by the thread that set it while the pool cannot leave).
unsafe impl Send for State {}

process_wide! {
    /// The registry of this process.
    pub(crate) fn registry() -> Registry = Registry::new();
}

impl Registry {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            state: Mutex::new(State::new()),
            changed: Condvar::new(),
            doorbell: Doorbell::new(),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self {
            state: Mutex::new(State::new()),
            changed: Condvar::new(),
            doorbell: Doorbell::new(),
        }
    }

    /// Adds `core` to the list (and installs the fork handlers, the first time).
    ///
    /// # Safety
    /// `core` must stay at its address, and not be dropped, until [`leave`](Self::leave)
    /// has returned for it.
    pub(crate) unsafe fn join(&self, core: &PoolCore) {
        #[cfg(not(any(loom, miri)))]
        fork::install();
        let mut state = self.state.lock();
        // SAFETY: under the registry lock.
        let entry = unsafe { core.entry.get() };
        debug_assert!(!entry.joined, "a pool joins once");
        entry.joined = true;
        entry.prev = ptr::null();
        entry.next = state.head;
        if !state.head.is_null() {
            // SAFETY: a listed pool is alive; its entry is ours under the lock.
            unsafe { (*state.head).entry.get().prev = core };
        }
        state.head = core;
    }

    /// Takes `core` off the list: stops hinting it and watching for memory pressure for it,
    /// and waits for a pass or a release on it to end.
    pub(crate) fn leave(&'static self, core: &PoolCore) {
        #[cfg(not(any(loom, miri)))]
        self.stop_watching(core);
        self.stop_hinting(core);
        let mut state = self.state.lock();
        // SAFETY: under the registry lock.
        let entry = unsafe { core.entry.get() };
        if !entry.joined {
            return;
        }
        while ptr::eq(state.busy, core) {
            state = self.changed.wait(state);
        }
        let (prev, next) = (entry.prev, entry.next);
        if prev.is_null() {
            state.head = next;
        } else {
            // SAFETY: listed pools are alive; their entries are ours under the lock.
            unsafe { (*prev).entry.get().next = next };
        }
        if !next.is_null() {
            // SAFETY: as above.
            unsafe { (*next).entry.get().prev = prev };
        }
        entry.joined = false;
    }
}

impl State {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            head: ptr::null(),
            busy: ptr::null(),
            hinting: 0,
            thread: Thread::None,
            generation: 0,
            #[cfg(not(any(loom, miri)))]
            pressure: super::pressure::Watch::new(),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self {
            head: ptr::null(),
            busy: ptr::null(),
            hinting: 0,
            thread: Thread::None,
            generation: 0,
        }
    }

    /// The listed pools.
    pub(super) fn pools(&self) -> impl Iterator<Item = &PoolCore> {
        let mut at = self.head;
        std::iter::from_fn(move || {
            // SAFETY: listed pools are alive while the lock (borrowed through `self`) is
            // held; their entries are read under it.
            let core = unsafe { at.as_ref()? };
            // SAFETY: as above: the entry is read under the registry lock.
            at = unsafe { core.entry.get() }.next;
            Some(core)
        })
    }
}

// === impl Entry ===

/// A pool's place in the registry and its hinting schedule, touched only under the
/// registry lock.
pub(crate) struct Entry(UnsafeCell<EntryData>);

/// See [`Entry`].
pub(super) struct EntryData {
    joined: bool,
    prev: *const PoolCore,
    next: *const PoolCore,
    /// Hinting was asked for and not stopped.
    pub(super) hinting: bool,
    /// When the next pass is due; `None`: when a free asks.
    pub(super) due: Option<Instant>,
    /// No pass before this: frees that ask right after a run of passes are served an
    /// interval later, so a busy allocator cannot keep the thread spinning.
    pub(super) not_before: Option<Instant>,
    /// Its memory pressure watch.
    #[cfg(not(any(loom, miri)))]
    pub(super) watch: super::pressure::EntryWatch,
}

// SAFETY: the data is only touched under the registry lock.
unsafe impl Sync for Entry {}
// SAFETY: as above.
unsafe impl Send for Entry {}

impl Entry {
    pub(crate) fn new() -> Self {
        Self(UnsafeCell::new(EntryData {
            joined: false,
            prev: ptr::null(),
            next: ptr::null(),
            hinting: false,
            due: None,
            not_before: None,
            #[cfg(not(any(loom, miri)))]
            watch: super::pressure::EntryWatch::default(),
        }))
    }

    /// The data.
    ///
    /// # Safety
    /// The caller holds the registry lock, and uses the reference only while it does.
    #[allow(clippy::mut_from_ref)] // the registry lock makes the access exclusive
    pub(super) unsafe fn get(&self) -> &mut EntryData {
        // SAFETY: exclusive under the registry lock, which the caller holds.
        unsafe { &mut *self.0.get() }
    }
}

/// The registry lock of this process, held for the caller (fork handlers).
#[cfg(not(any(loom, miri)))]
pub(super) fn lock_state() -> crate::sync::MutexGuard<'static, State> {
    registry().state.lock()
}

#[cfg(not(any(loom, miri)))]
pub(crate) mod fork;
#[cfg(not(any(loom, miri)))]
pub(crate) use fork::in_fork_handler;

/// Whether this thread runs a fork handler that holds every pool's locks (never, where
/// there are no fork handlers).
#[cfg(any(loom, miri))]
#[cfg_attr(loom, allow(dead_code))] // only the global allocator asks, which loom does not build
pub(crate) fn in_fork_handler() -> bool {
    false
}
