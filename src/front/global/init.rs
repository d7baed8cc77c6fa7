//! Lazy, allocation-free initialisation: exactly one thread builds the pool, the others
//! wait; a failure or a panic is remembered, and a child forked mid-build starts over.
//!
//! The state word holds the phase in its low byte and, while building, the id of the
//! process that builds in the bits above, written by the same compare-and-swap that claims
//! the build: a child forked at any instant of the build sees whose build it was.
//!
//! The pool core lives in a mapping of its own, not inside the adapter: the process's
//! registry of pools (fork handlers, hinter thread) knows it by address, and an adapter
//! that is not a `static` may be moved.

use std::alloc::GlobalAlloc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::Backoff;

use super::PoolAlloc;
use crate::config::Backing;
use crate::error::BuildError;
use crate::os::machine::cpu_count;
use crate::os::mapping::MetaArray;
use crate::pool::PoolCore;
use crate::pool::client::Client;
use crate::pool::registry::registry;
use crate::slab::SlabAlloc;
use crate::slab::reentry::Reentry;
use crate::sync::process_id;

pub(super) const UNINIT: u64 = 0;
pub(super) const INITIALISING: u64 = 1;
pub(super) const READY: u64 = 2;
pub(super) const FAILED: u64 = 3;
/// Building the pool panicked: like FAILED, without a stored error.
pub(super) const PANICKED: u64 = 4;

/// The phase of a state word.
#[inline]
pub(super) fn phase(state: u64) -> u64 {
    state & 0xff
}

/// CPUs per shard of the pool under a `PoolAlloc`, unless the builder sets `shards`.
///
/// Small objects take the per-CPU caches and CPU heaps, so the shards see only page
/// blocks and slabs: far fewer requests than a `PagePool` whose every block is a shard
/// operation. Each shard keeps the memory its CPUs touched for itself, so a shard per CPU
/// multiplies the resident free memory by the CPU count: measured on the producer/consumer
/// benchmark (2 CPUs), one shard for both held 21 MiB at its peak against 26 MiB with
/// two, at the same speed.
const CPUS_PER_SHARD: usize = 4;

/// What [`PoolAlloc::init`] reports after building the pool panicked.
static INIT_PANICKED: BuildError = BuildError::Panicked;

/// Marks the pool as failed if building it unwinds, so no thread spins on it forever.
struct InitUnwind<'a>(&'a AtomicU64);

impl Drop for InitUnwind<'_> {
    fn drop(&mut self) {
        self.0.store(PANICKED, Ordering::Release);
    }
}

impl<F: GlobalAlloc> PoolAlloc<F> {
    /// The pool, if built: one load.
    #[inline]
    pub(super) fn ready_core(&self) -> Option<&PoolCore> {
        let core = self.core.load(Ordering::Acquire);
        // SAFETY: a non-null pointer was stored (release) after the core was built in its
        // mapping, which lives as long as `self`.
        unsafe { core.as_ref() }
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
    fn init_slow(&self) -> Option<&PoolCore> {
        let backoff = Backoff::new();
        let mut spins = 0u32;
        let claim = INITIALISING | (process_id() as u64) << 8;
        loop {
            match self
                .state
                .compare_exchange(UNINIT, claim, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => return self.initialise(),
                Err(state) => match phase(state) {
                    READY => return self.ready_core(),
                    FAILED | PANICKED => return None,
                    _ => {
                        // Another thread builds the pool; building maps memory and takes
                        // microseconds, so spin, then yield.
                        if backoff.is_completed() {
                            std::thread::yield_now();
                            spins += 1;
                            if spins.is_multiple_of(64) {
                                self.recover_forked_init(state);
                            }
                        } else {
                            backoff.snooze();
                        }
                    }
                },
            }
        }
    }

    /// A child forked while the parent was building the pool: nobody will finish it here.
    /// Start over (what the parent had mapped stays mapped and unused in the child).
    #[cold]
    fn recover_forked_init(&self, state: u64) {
        if (state >> 8) as u32 != process_id() {
            let _ = self
                .state
                .compare_exchange(state, UNINIT, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    #[cold]
    fn initialise(&self) -> Option<&PoolCore> {
        let mut config = self.config.hint_thread(false);
        if config.shards.is_none() {
            config = config.shards(cpu_count().div_ceil(CPUS_PER_SHARD));
        }
        let unwind = InitUnwind(&self.state);
        let built = PoolCore::new(&config).and_then(|core| {
            let mut core = Some(core);
            MetaArray::new(1, Backing::Mmap, false, |_| {
                core.take().expect("one element")
            })
            .map_err(BuildError::Map)
        });
        // The small-object layer, in a mapping of its own beside the core's.
        let built = built.and_then(|home| {
            let core: *const PoolCore = &home[0];
            let mut slab = None;
            // SAFETY: the core lives in `home`, a mapping that is kept (in `self.home`)
            // until `Drop`, which drops the layer first.
            let made = unsafe { SlabAlloc::new(&*core, config.backing) }
                .and_then(|made| {
                    slab = Some(made);
                    MetaArray::new(1, Backing::Mmap, false, |_| {
                        slab.take().expect("one element")
                    })
                })
                .map_err(BuildError::Map)?;
            Ok((home, made))
        });
        std::mem::forget(unwind);
        match built {
            Ok((home, slab_home)) => {
                // SAFETY: we won UNINIT -> INITIALISING, so no other thread reads or writes
                // the homes until the release stores below.
                let home = unsafe { (*self.home.get()).write(home) };
                // SAFETY: as above.
                let slab_home = unsafe { (*self.slab_home.get()).write(slab_home) };
                let core: &PoolCore = &home[0];
                let slab: &SlabAlloc = &slab_home[0];
                // SAFETY (the 'static): the layer lives in its mapping until `Drop`, which
                // takes the core out of the registry (so neither the hinter nor the fork
                // handlers call the client any more) before dropping it.
                let client: &'static dyn Client =
                    unsafe { std::mem::transmute::<&dyn Client, &'static dyn Client>(slab) };
                let _attached = core.attach(client);
                // SAFETY: the mapping keeps the core at this address until `Drop`, which
                // leaves the registry first.
                unsafe { registry().join(core) };
                // The layer first: whoever sees the core also sees the layer.
                self.slab
                    .store(slab as *const SlabAlloc as *mut _, Ordering::Release);
                self.core
                    .store(core as *const PoolCore as *mut _, Ordering::Release);
                self.state.store(READY, Ordering::Release);
                Some(core)
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
            // Called from inside the pool on this thread (a fork handler, say): building
            // here could wait for ourselves, so only report.
            None => self.ready_core().is_some(),
        };
        if built {
            return Ok(());
        }
        match self.built() {
            Some(Err(err)) => Err(err),
            // Re-entered from inside the pool on this thread: it is still being built.
            _ => Ok(()),
        }
    }

    /// The built pool, or why building it failed, or `None` if it is not built yet.
    pub(super) fn built(&self) -> Option<Result<&PoolCore, &BuildError>> {
        match phase(self.state.load(Ordering::Acquire)) {
            READY => self.ready_core().map(Ok),
            // SAFETY: FAILED is stored (release) only after `error` was written.
            FAILED => Some(Err(unsafe { (*self.error.get()).assume_init_ref() })),
            PANICKED => Some(Err(&INIT_PANICKED)),
            _ => None,
        }
    }
}
