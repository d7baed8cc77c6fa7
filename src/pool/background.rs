//! The pool's own background threads (the hinter, the memory pressure watcher), and how
//! the global allocator tells them apart.
//!
//! Under [`PoolAlloc`](crate::PoolAlloc) every allocation such a thread makes (a hint
//! pass's batch, say) would come from the per-CPU cache of the CPU it runs on, and every
//! operation on a per-CPU cache marks that CPU as in use. The hinter drains the caches of
//! CPUs that stayed unused for the hint delay: its own allocations kept the CPU it woke up
//! on from ever looking unused, so the objects cached there were never drained and pinned
//! their slabs (16 threads allocating small objects on 2 CPUs left 67 slabs, 1 MiB, with
//! 10 live objects after the program rested). So the global allocator serves these threads
//! from its fallback allocator, and they never touch a per-CPU cache through it.

#[cfg(not(loom))]
use std::cell::Cell;

#[cfg(not(loom))]
thread_local! {
    /// Set once, first thing, on a background thread. `const`-initialised without `Drop`:
    /// reading it never allocates.
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Spawns one of the pool's background threads, named `name`, marked as such (under loom,
/// which has no global allocator to serve them, unmarked).
pub(crate) fn spawn(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<crate::sync::JoinHandle> {
    crate::sync::spawn_named(name, move || {
        #[cfg(not(loom))]
        BACKGROUND.with(|b| b.set(true));
        f()
    })
}

/// Whether the calling thread is one of the pool's background threads.
#[cfg(not(loom))]
#[inline(always)]
pub(crate) fn on_background_thread() -> bool {
    BACKGROUND.with(Cell::get)
}
