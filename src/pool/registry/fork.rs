//! `pthread_atfork` handlers for every pool of the process; see the registry's docs.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicU8, Ordering};

use super::{State, Thread, lock_state, registry};
use crate::sync::MutexGuard;

/// 0: not installed, 1: being installed, 2: installed.
static INSTALLED: AtomicU8 = AtomicU8::new(0);

/// Installs the handlers once per process. Never waits: a thread that finds another one
/// installing goes on (the handlers are there a moment later), so a global allocator
/// building its pool inside `malloc` cannot wait on a thread whose `pthread_atfork` call is
/// itself allocating.
pub(crate) fn install() {
    if INSTALLED.load(Ordering::Acquire) != 0
        || INSTALLED
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return;
    }
    // SAFETY: the handlers are `extern "C" fn()` that live for the whole program.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    // On failure (ENOMEM) the next pool to join tries again.
    INSTALLED.store(if rc == 0 { 2 } else { 0 }, Ordering::Release);
}

thread_local! {
    /// Set on the forking thread while the handlers hold every pool's locks: that thread
    /// must not take a pool lock (it would wait for itself). `const`, no destructor, so
    /// reading it never allocates.
    static IN_FORK: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread runs a fork handler that holds every pool's locks.
#[inline]
pub(crate) fn in_fork_handler() -> bool {
    IN_FORK.with(Cell::get)
}

/// The locks held between `prepare` and `parent`/`child`.
struct Held {
    state: Option<MutexGuard<'static, State>>,
    doorbell: Option<MutexGuard<'static, bool>>,
}

struct HeldCell(UnsafeCell<Held>);

// SAFETY: touched only by the forking thread, between its prepare handler and its parent or
// child handler (glibc runs them on that thread, under its own atfork lock).
unsafe impl Sync for HeldCell {}

static HELD: HeldCell = HeldCell(UnsafeCell::new(Held {
    state: None,
    doorbell: None,
}));

/// Before `fork`: the registry, every pool's shard and capture locks, then the doorbell.
extern "C" fn prepare() {
    IN_FORK.with(|inside| inside.set(true));
    let state = lock_state();
    for core in state.pools() {
        if let Some(client) = core.client() {
            client.hold_for_fork(); // a client's locks come before the pool's
        }
        // SAFETY: released by `parent` or `child` on this thread before the registry lock,
        // which keeps the pool alive and listed meanwhile.
        unsafe { core.hold_for_fork() };
    }
    let doorbell = registry().doorbell.lock();
    // SAFETY: see `HeldCell`.
    let held = unsafe { &mut *HELD.0.get() };
    held.state = Some(state);
    held.doorbell = Some(doorbell);
}

/// Releases what `prepare` took, in reverse order; returns the registry lock still held.
fn release() -> Option<MutexGuard<'static, State>> {
    // SAFETY: see `HeldCell`.
    let held = unsafe { &mut *HELD.0.get() };
    drop(held.doorbell.take());
    let state = held.state.take()?;
    for core in state.pools() {
        // SAFETY: held by `prepare` on this thread.
        unsafe { core.release_fork_hold() };
        if let Some(client) = core.client() {
            client.release_fork_hold();
        }
    }
    Some(state)
}

extern "C" fn parent() {
    drop(release());
    IN_FORK.with(|inside| inside.set(false));
}

/// In the child, the only thread is this one: what other threads held must be taken back.
extern "C" fn child() {
    if let Some(mut state) = release() {
        // The parent's hinter thread does not exist here; neither does its handle's thread.
        if let Thread::Running { handle, .. } = std::mem::replace(&mut state.thread, Thread::None) {
            std::mem::forget(handle);
        }
        state.busy = std::ptr::null();
        state.generation += 1;
        state.hinting = 0;
        // Nor does the parent's memory pressure watcher.
        crate::pool::pressure::forget_in_child(&mut state);
        for core in state.pools() {
            // SAFETY: under the registry lock.
            let entry = unsafe { core.entry.get() };
            entry.hinting = false;
            entry.due = None;
            entry.not_before = None;
            core.signal.stop_listening();
            core.recover_after_fork();
            if let Some(client) = core.client() {
                client.recover_after_fork();
            }
        }
    }
    IN_FORK.with(|inside| inside.set(false));
}
