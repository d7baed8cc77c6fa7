//! The re-entrancy guard: a `const` thread-local flag marking a thread that is inside the
//! allocator (holding, or about to take, one of its locks), so that an allocation it makes
//! meanwhile never waits for a lock its own thread holds.
//!
//! The global allocator's slow paths, the idle release of the hinter thread and the
//! consistency check set it; a thread that finds it set takes only lock-free paths (the
//! per-CPU caches, remote frees) or goes to the fallback allocator. A fork handler holding
//! every lock of the process's pools counts as inside too ([`enter`]).

use std::cell::Cell;

#[cfg(not(loom))]
thread_local! {
    /// Set while this thread is inside the allocator. `const`-initialised and without
    /// `Drop`, so reading it never allocates or registers a destructor, and it is usable
    /// while other thread-locals are being destroyed.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

#[cfg(loom)]
loom::thread_local! {
    // loom runs its threads on one OS thread: each needs a flag of its own.
    static INSIDE: Cell<bool> = Cell::new(false);
}

/// Marks the thread as inside the allocator until dropped.
pub(crate) struct Reentry(());

impl Reentry {
    /// Marks the thread as inside; `None` if it already was.
    #[inline]
    pub(crate) fn enter() -> Option<Self> {
        INSIDE.with(|inside| {
            if inside.replace(true) {
                None
            } else {
                Some(Reentry(()))
            }
        })
    }
}

impl Drop for Reentry {
    #[inline]
    fn drop(&mut self) {
        INSIDE.with(|inside| inside.set(false));
    }
}

/// Marks the thread as inside, unless it already is or it runs a fork handler that holds
/// every pool lock: then it must not take an allocator lock, and `None` says so.
#[inline]
pub(crate) fn enter() -> Option<Reentry> {
    let guard = Reentry::enter()?;
    if crate::pool::registry::in_fork_handler() {
        return None;
    }
    Some(guard)
}
