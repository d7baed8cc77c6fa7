//! The re-entrancy guard: a `const` thread-local flag marking a thread that is inside the
//! pool, whose requests must go to the fallback.

use std::cell::Cell;

thread_local! {
    /// Set while this thread is inside the pool; see the module docs. `const`-initialised
    /// and without `Drop`, so reading it never allocates or registers a destructor.
    pub(super) static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the thread as inside the pool until dropped; `None` if it already was.
pub(super) struct Reentry;

impl Reentry {
    #[inline]
    pub(super) fn enter() -> Option<Self> {
        IN_POOL.with(|inside| {
            if inside.replace(true) {
                None
            } else {
                Some(Reentry)
            }
        })
    }
}

impl Drop for Reentry {
    #[inline]
    fn drop(&mut self) {
        IN_POOL.with(|inside| inside.set(false));
    }
}
