//! The slow paths: a refill of an empty cache, a spill of a full one, and frees that go
//! to another CPU's heap.

use std::ptr::NonNull;

use super::SlabAlloc;
use super::classes::{INFO, MAX_BATCH};
use super::heap::{FRESH, ObjectLinks};
use super::reentry;
use crate::sync::{Ordering, current_cpu};

impl SlabAlloc {
    /// The calling thread's CPU heap.
    #[inline]
    fn home(&self) -> usize {
        let n = self.heaps.len();
        let cpu = current_cpu();
        if cpu < n { cpu } else { cpu % n }
    }

    /// Refills this CPU's cache of `class` and returns one object (zeroed over `zero`
    /// bytes if asked), or `None` when the pool is exhausted even after every cache and
    /// spare was given back.
    ///
    /// The caller must be inside the allocator ([`reentry::enter`]): this takes the heap
    /// lock and may take pool locks.
    #[cold]
    pub(crate) fn alloc_slow(&self, class: usize, zero: Option<usize>) -> Option<NonNull<u8>> {
        let mut items = [0u64; MAX_BATCH];
        let want = INFO[class].batch as usize;
        let cpu = self.home();
        let mut heap = self.lock(cpu);
        let mut got = heap.fill(class, &mut items[..want]);
        if got == 0 {
            // The pool is exhausted: give back what every cache and heap holds unused,
            // then try once more.
            drop(heap);
            self.release(None);
            heap = self.lock(cpu);
            got = heap.fill(class, &mut items[..want]);
            if got == 0 {
                return None;
            }
        }
        // The first for the caller; the rest into this CPU's cache, the next one to hand
        // out on top. Only while we still run on `cpu`: its cache holds only its own.
        for (i, &item) in items[1..got].iter().enumerate().rev() {
            if self
                .caches
                .push_if_on(class, item, heap.cpu() as u32)
                .is_err()
            {
                heap.put_back_items(&items[1..=i + 1]);
                break;
            }
        }
        drop(heap);
        self.wake_hinter();
        Some(self.hand_out(items[0], zero))
    }

    /// A free the cache's fast path did not take: in the portable mode it never applies,
    /// so the portable push comes first; then [`free_slow`](Self::free_slow).
    #[cold]
    #[inline(never)]
    pub(crate) fn free_uncached(&self, addr: usize, class: usize, owner: usize) {
        if self.caches.fast().is_none()
            && self
                .caches
                .push_if_on(class, addr as u64, owner as u32)
                .is_ok()
        {
            return;
        }
        self.free_slow(addr, class, owner);
    }

    /// A free whose push on the owner's cache failed: the thread is not on the owner's
    /// CPU, the cache is full, or a drain has stopped the CPU.
    #[cold]
    pub(crate) fn free_slow(&self, addr: usize, class: usize, owner: usize) {
        if self.home() != owner {
            return self.free_remote(addr, owner);
        }
        // On the owner's CPU: spill half the cache to the slabs, then keep this object.
        let Some(_inside) = reentry::enter() else {
            // Inside the allocator already (or in a fork handler): no lock may be taken.
            return self.free_remote(addr, owner);
        };
        let mut items = [0u64; MAX_BATCH];
        let want = INFO[class].batch as usize;
        let taken = self.caches.pop_batch(class, &mut items[..want]);
        let Some(cpu) = taken.cpu else {
            // The CPU is stopped by a drain (or this thread cannot run the fast path).
            return self.free_remote(addr, owner);
        };
        let mut heap = self.lock(cpu as usize);
        heap.put_back_items(&items[..taken.len]);
        heap.note_spill();
        if cpu as usize == owner {
            if self
                .caches
                .push_if_on(class, addr as u64, owner as u32)
                .is_err()
            {
                heap.put_back(addr);
            }
            drop(heap);
        } else {
            // Migrated between the failed push and the spill.
            drop(heap);
            self.free_remote(addr, owner);
        }
        self.wake_hinter();
    }

    /// Sends the object at `addr` to its owner heap's remote queue.
    #[inline]
    pub(super) fn free_remote(&self, addr: usize, owner: usize) {
        // SAFETY: the object is being freed: free, ours to write, on no list.
        unsafe { self.heaps[owner].remote.push(&ObjectLinks(self), addr) };
    }

    /// After a slow path: if the last idle release found nothing to come back for, ask the
    /// hinter for a pass, so what the caches hold now is released when it turns idle.
    #[inline]
    fn wake_hinter(&self) {
        if self.hinter_idle.load(Ordering::Relaxed)
            && self.hinter_idle.swap(false, Ordering::Relaxed)
        {
            let core = self.core();
            if core.signal.listening() {
                core.signal.request();
            }
        }
    }
}

const _: () = assert!(FRESH == 1);
