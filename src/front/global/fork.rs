//! `pthread_atfork` handlers that hold the pool's locks across `fork`.

use std::cell::UnsafeCell;
use std::ptr;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};

use super::reentry::IN_POOL;
use crate::pool::PoolCore;
use crate::shard::{Env, Locked};

/// The locks of one pool, held across `fork`.
struct ForkLocks {
    core: &'static PoolCore,
    env: &'static Env<'static>,
    /// One slot per shard and one for the shared pool; filled by `fork_prepare`, emptied
    /// (unlocking) by `fork_parent` / `fork_child`.
    held: UnsafeCell<Box<[Option<Locked<'static>>]>>,
    /// The hinter's wake-up lock, taken after the shard locks (the order frees use).
    hint_wake: UnsafeCell<Option<crate::sync::MutexGuard<'static, bool>>>,
}

// SAFETY: `held` is touched only by the atfork handlers, which run on the forking thread
// with every one of the pool's shard locks held (glibc also serialises them under its
// atfork lock); the rest is shared read-only.
unsafe impl Sync for ForkLocks {}

const FORK_SLOTS: usize = 8;
static FORK_LOCKS: [AtomicPtr<ForkLocks>; FORK_SLOTS] =
    [const { AtomicPtr::new(ptr::null_mut()) }; FORK_SLOTS];
static ATFORK: Once = Once::new();
static ATFORK_RESULT: AtomicU32 = AtomicU32::new(0);
/// Set on the forking thread between prepare and parent/child: what `IN_POOL` was before.
static FORK_WAS_INSIDE: AtomicBool = AtomicBool::new(false);

pub(super) fn install_fork_locks(core: &'static PoolCore) -> std::io::Result<()> {
    // Called from user code (`main`), not from inside an allocation: allocating is fine.
    let slots = core.all_shards().count();
    let env: &'static Env<'static> = Box::leak(Box::new(core.env()));
    let locks = Box::leak(Box::new(ForkLocks {
        core,
        env,
        held: UnsafeCell::new((0..slots).map(|_| None).collect()),
        hint_wake: UnsafeCell::new(None),
    }));
    let mut placed = false;
    for slot in &FORK_LOCKS {
        if slot
            .compare_exchange(ptr::null_mut(), locks, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            placed = true;
            break;
        }
    }
    if !placed {
        return Err(std::io::Error::other(
            "pagepool: fork handlers are limited to 8 pools",
        ));
    }
    ATFORK.call_once(|| {
        // SAFETY: the handlers are `extern "C" fn()` that live for the whole program.
        let rc = unsafe {
            libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child))
        };
        ATFORK_RESULT.store(rc as u32, Ordering::Release);
    });
    match ATFORK_RESULT.load(Ordering::Acquire) {
        0 => Ok(()),
        rc => Err(std::io::Error::from_raw_os_error(rc as i32)),
    }
}

/// Before `fork`: takes every registered pool's shard locks in the pool's lock order (per-CPU
/// shards by index, then the shared pool), so no other thread is inside a shard when the
/// address space is copied.
extern "C" fn fork_prepare() {
    FORK_WAS_INSIDE.store(
        IN_POOL.with(|inside| inside.replace(true)),
        Ordering::Relaxed,
    );
    for slot in &FORK_LOCKS {
        let locks = slot.load(Ordering::Acquire);
        if locks.is_null() {
            continue;
        }
        // SAFETY: registered entries are leaked, so they live forever.
        let locks = unsafe { &*locks };
        // SAFETY: only the forking thread touches `held`; see `ForkLocks`.
        let held = unsafe { &mut *locks.held.get() };
        for (slot, shard) in held.iter_mut().zip(locks.core.all_shards()) {
            *slot = Some(shard.lock(locks.env));
        }
        // SAFETY: as for `held`.
        unsafe { *locks.hint_wake.get() = Some(locks.core.signal.lock_for_fork()) };
    }
}

/// After `fork`, in the parent and in the child: releases what `fork_prepare` took, in
/// reverse order.
pub(super) fn fork_release() {
    for slot in FORK_LOCKS.iter().rev() {
        let locks = slot.load(Ordering::Acquire);
        if locks.is_null() {
            continue;
        }
        // SAFETY: as in `fork_prepare`.
        drop(unsafe { (*(*locks).hint_wake.get()).take() });
        // SAFETY: as in `fork_prepare`.
        let held = unsafe { &mut *(*locks).held.get() };
        for slot in held.iter_mut().rev() {
            drop(slot.take());
        }
    }
    let was = FORK_WAS_INSIDE.load(Ordering::Relaxed);
    IN_POOL.with(|inside| inside.set(was));
}

extern "C" fn fork_parent() {
    fork_release();
}

extern "C" fn fork_child() {
    // The child's only thread is this one, so the futex-based locks it holds can simply be
    // released; no other thread of the child can be waiting on them.
    fork_release();
}
