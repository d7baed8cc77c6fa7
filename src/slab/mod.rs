//! Layer 5: small objects. Size classes carved from pool blocks (*slabs*), per-CPU caches
//! in front of them, and lock-free frees from other CPUs: the part of a `malloc` that the
//! page pool lacks, so that every byte a program allocates through
//! [`PoolAlloc`](crate::PoolAlloc) lives in the pool.
//!
//! # The layers of a small allocation
//!
//! ```text
//!  alloc(class)                                     free(ptr)
//!    |                                                |  slab map: owner CPU and class,
//!    v                                                v  from the address alone
//!  per-CPU cache of the CPU it runs on   <----   push_if_on(owner)  (rseq: no lock, no
//!  (percpu::PerCpuStacks, rseq: no lock,            |                atomic RMW)
//!   no atomic read-modify-write)                    | other CPU, or cache full
//!    | empty                                        v
//!    v                                       owner's remote queue: a ring, one CAS (any CPU)
//!  CPU heap (its lock): collect the remote          | or, on the owner CPU, a spill of
//!  queue, then the fullest partial slab,            | half the cache under the heap lock
//!  then a spare, then a new slab                    v
//!    | new slab                              slab free lists (heap lock); an emptied slab
//!    v                                       goes back to the pool
//!  PoolCore::alloc_frame (16-128 KiB blocks)
//! ```
//!
//! - **Classes** ([`classes`]): 16 to 128 bytes in steps of 8, then 8 classes per doubling
//!   up to [`SMALL_LIMIT`] (32 KiB), so at most 1/8 of an object above 128 bytes is waste.
//! - **Slabs**: one pool block (16 KiB and up, aligned to its size) per slab, one class per
//!   slab, one owner CPU per slab. Objects are carved lazily with a bump pointer: making a
//!   slab touches none of its memory. Free objects are linked through their first word.
//! - **Metadata out of band** ([`map`]): a 4-byte entry per 16 KiB granule of the region
//!   (owner, class, offset to the slab's start) and a 64-byte descriptor per slab, in
//!   `mmap`ed arrays beside the pool's frame table. No object has a header.
//! - **Per-CPU caches**: a bounded stack of free objects per CPU and class (at most 8 KiB
//!   or 64 objects per class), the percpu layer's rseq stacks. A CPU's cache holds only
//!   objects of slabs that CPU owns, and a CPU hands out only those: two CPUs never share
//!   an object's cache line through the allocator. Allocation pops; a free on the owner
//!   CPU pushes with `push_if_on(owner)`, whose owner check is inside the restartable
//!   sequence, so a migration between the check and the push aborts the push.
//! - **Remote frees** ([`remote`]): a free on another CPU puts the object's address in the
//!   owner heap's lock-free ring with one compare-and-swap (on a stack linked through the
//!   objects when the ring is full); the owner collects the whole queue on its next slow
//!   path (and the idle release does so for idle CPUs).
//! - **Heaps** ([`heap`]): one per CPU, under a lock that only slow paths take (refills of
//!   an empty cache and spills of a full one, in batches of half a cache): rarely
//!   contended, since threads take the heap of the CPU they run on.
//! - **Idle memory** ([`release`]): the layer is the pool's [`Client`]: the hinter thread
//!   drains the caches of CPUs idle for the hint delay, collects remote queues and frees
//!   empty slabs, so their blocks coalesce in the pool and go back to the OS.
//!
//! # Double frees and foreign pointers
//! A free checks, without touching any shared line, that the pointer is the start of an
//! object of a live slab (a multiplication, no division: [`classes::ClassInfo::divides`])
//! and that the object is not free already: a free object carries a *mark* in its second
//! word (a per-allocator random key XORed with its address; every class is at least 16
//! bytes), written by the free and cleared by the allocation. Either failure aborts with a
//! message (a global allocator must not unwind). Like glibc's tcache key, this catches a
//! second free of an object that is still free; it cannot catch one of an object that was
//! handed out again in between.
//!
//! # Invariants
//! - Every object of a live slab is exactly one of: never carved (index `>= bump`), on
//!   the slab's free list, or *out* (with a user, in its owner CPU's cache, or in its
//!   owner heap's remote queue); `used` counts the last kind.
//! - A slab's descriptor and map entries are written only under its owner heap's lock,
//!   entries before any object is out and cleared before the block returns to the pool.
//! - A CPU's cache holds only objects of slabs owned by that CPU's heap.
//!
//! Lock order: a heap (heaps in index order when more than one is held: only the fork
//! handlers and the audit do), then the pool's locks. Nothing under a heap lock allocates
//! through the global allocator, and no pool lock is held when a heap lock is taken.
//!
//! Layer 5. May call: `pool`, `percpu` and everything below them.

mod audit;
pub(crate) mod classes;
mod heap;
pub(crate) mod map;
pub(crate) mod reentry;
mod release;
pub(crate) mod remote;
mod slow;
mod stats;

#[cfg(all(test, loom))]
mod loom_models;

use std::io;
use std::ptr::NonNull;

use classes::{GRANULE_SHIFT, INFO, MIN_SIZE};
#[cfg_attr(loom, allow(unused_imports))]
pub(crate) use classes::{class_for, natural_class_for};
pub(crate) use heap::FRESH;
use heap::Heap;
pub(crate) use map::Entry;
use map::SlabMap;

use crate::frame_table::FrameIdx;
use crate::os::mapping::{Backing, MetaArray};
use crate::percpu::{CpuCacheImpl, PerCpuStacks};
use crate::pool::PoolCore;
use crate::pool::client::Client;
use crate::sync::AtomicBool;

/// Where a pointer given to `free` belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// Outside the pool's region.
    Outside,
    /// In the region, where no slab lives: a page block.
    Page,
    /// In a live slab.
    Object(Entry),
}

// === impl SlabAlloc ===

/// The small-object layer of one pool; see the module docs.
pub(crate) struct SlabAlloc {
    /// The pool the slabs come from; outlives `self` (see `new`).
    core: NonNull<PoolCore>,
    /// The region: its first byte (provenance for every object pointer), address and
    /// length.
    base: NonNull<u8>,
    base_addr: usize,
    len: usize,
    /// Random, odd: a free object's mark is `key ^ address`.
    key: u64,
    caches: PerCpuStacks,
    map: SlabMap,
    heaps: MetaArray<Heap>,
    /// The last idle release found nothing to come back for: the next slow path asks the
    /// hinter for a pass (see `release`).
    hinter_idle: AtomicBool,
    #[cfg(not(any(loom, miri)))]
    fork_holds: release::ForkHolds,
}

// SAFETY: `core` and `base` point to the pool, which is shared between threads (PoolCore is
// Sync) and outlives the layer; the other fields are Sync themselves (atomics, locks, and
// descriptors written only under their heap's lock).
unsafe impl Sync for SlabAlloc {}
// SAFETY: as above; nothing is tied to the creating thread.
unsafe impl Send for SlabAlloc {}

impl SlabAlloc {
    /// The small-object layer over `core`. Allocates nothing through the global allocator
    /// with [`Backing::Mmap`]: caches, map and heaps are `mmap`ed, and untouched until
    /// used (a CPU that never allocates costs no resident memory).
    ///
    /// # Safety
    /// `core` must outlive the returned value and stay at its address.
    pub(crate) unsafe fn new(core: &PoolCore, backing: Backing) -> io::Result<Self> {
        let capacities: [u32; classes::CLASSES] = std::array::from_fn(|c| INFO[c].cache);
        let caches = PerCpuStacks::new(&capacities, CpuCacheImpl::Rseq, backing)?;
        let len = core.resolved.capacity;
        let map = SlabMap::new(len >> GRANULE_SHIFT, backing)?;
        let heaps = MetaArray::new(caches.cpus(), backing, false, |_| Heap::new())?;
        let base = core.frame_ptr(FrameIdx(0));
        Ok(Self {
            core: NonNull::from(core),
            base,
            base_addr: base.as_ptr().addr(),
            len,
            key: random_key(),
            #[cfg(not(any(loom, miri)))]
            fork_holds: release::ForkHolds::new(heaps.len(), backing)?,
            caches,
            map,
            heaps,
            hinter_idle: AtomicBool::new(true),
        })
    }

    /// The pool.
    #[inline]
    pub(crate) fn core(&self) -> &PoolCore {
        // SAFETY: `new`'s contract: the core outlives `self`.
        unsafe { self.core.as_ref() }
    }

    /// Which per-CPU cache implementation serves the fast paths.
    pub(crate) fn cache_implementation(&self) -> CpuCacheImpl {
        self.caches.implementation()
    }

    // --- addresses ---------------------------------------------------------------------

    /// The offset of `addr` in the region (huge when below it).
    #[inline(always)]
    fn offset(&self, addr: usize) -> usize {
        addr.wrapping_sub(self.base_addr)
    }

    /// A pointer to `addr`, which lies in the region, with the region's provenance.
    #[inline(always)]
    fn ptr(&self, addr: usize) -> *mut u8 {
        self.base.as_ptr().with_addr(addr)
    }

    /// The address of granule `granule`.
    #[inline]
    fn granule_addr(&self, granule: usize) -> usize {
        self.base_addr + (granule << GRANULE_SHIFT)
    }

    /// Where `ptr` belongs: a slab, a page block, or outside the region.
    #[inline(always)]
    pub(crate) fn find(&self, ptr: *const u8) -> Found {
        let offset = self.offset(ptr.addr());
        if offset >= self.len {
            return Found::Outside;
        }
        let entry = self.map.entry(offset);
        if entry.is_slab() {
            Found::Object(entry)
        } else {
            Found::Page
        }
    }

    /// Bytes of an object of the slab `entry` describes.
    #[inline]
    pub(crate) fn object_size(entry: Entry) -> usize {
        INFO[entry.class()].size as usize
    }

    // --- fast paths --------------------------------------------------------------------

    /// An object of `class` from this CPU's cache, or `None` when it is empty (or, rarely,
    /// the CPU is being drained): then [`alloc_slow`](Self::alloc_slow).
    #[inline(always)]
    pub(crate) fn alloc(&self, class: usize) -> Option<NonNull<u8>> {
        let item = self.caches.pop(class)?;
        Some(self.hand_out(item, None))
    }

    /// [`alloc`](Self::alloc) where the cache's fast path applies, with no call on the way
    /// (`None` also where it does not: then `alloc`).
    #[inline(always)]
    pub(crate) fn alloc_fast(&self, class: usize) -> Option<NonNull<u8>> {
        let item = self.caches.fast()?.pop(class)?;
        Some(self.hand_out(item, None))
    }

    /// Like [`alloc`](Self::alloc), with the first `size` bytes zeroed (no `memset` for a
    /// never-used object of a known-zero slab).
    #[inline(always)]
    pub(crate) fn alloc_zeroed(&self, class: usize, size: usize) -> Option<NonNull<u8>> {
        let item = self.caches.pop(class)?;
        Some(self.hand_out(item, Some(size)))
    }

    /// Turns a cached item into the object handed to a user: clears the free mark, or
    /// zeroes `zero` bytes (at least the mark) unless the object is known zero.
    #[inline(always)]
    fn hand_out(&self, item: u64, zero: Option<usize>) -> NonNull<u8> {
        let ptr = self.ptr((item & !FRESH) as usize);
        if item & FRESH == 0 {
            match zero {
                // SAFETY: the object is ours now and holds at least max(size, 16) bytes
                // (the class holds `size`, and every class at least 16).
                Some(size) => unsafe { ptr.write_bytes(0, size.max(MIN_SIZE)) },
                // SAFETY: as above; the mark is the second word.
                None => unsafe { mark_word(ptr).write(0) },
            }
        }
        // SAFETY: an address in the region, hence not null.
        unsafe { NonNull::new_unchecked(ptr) }
    }

    /// Frees the object at `ptr`, which [`find`](Self::find) placed in the slab `entry`
    /// describes. Aborts if `ptr` is not the start of an object, or the object is free.
    ///
    /// # Safety
    /// `ptr` was handed out by this layer and not freed since, or is bad input that the
    /// checks described in the module docs may catch (a pointer into a live slab that
    /// passes them corrupts the heap, as with any allocator).
    #[inline(always)]
    pub(crate) unsafe fn free(&self, ptr: *mut u8, entry: Entry) {
        let class = entry.class();
        let info = &INFO[class];
        let addr = ptr.addr();
        // The offset in the slab: in the granule, plus the granules before it.
        let in_slab =
            (self.offset(addr) & ((1 << GRANULE_SHIFT) - 1)) + (entry.back() << GRANULE_SHIFT);
        if in_slab >= info.span as usize || !info.divides(in_slab) {
            not_an_object();
        }
        let mark = self.key ^ addr as u64;
        let word = mark_word(ptr);
        // SAFETY: `ptr` starts an object of at least 16 bytes (checked above): ours to
        // read, and to write now that it is being freed.
        unsafe {
            if word.read() == mark {
                double_free();
            }
            word.write(mark);
        }
        let owner = entry.owner();
        let pushed = self
            .caches
            .fast()
            .is_some_and(|fast| fast.push_if_on(class, addr as u64, owner as u32));
        if !pushed {
            self.free_uncached(addr, class, owner);
        }
    }
}

impl Drop for SlabAlloc {
    fn drop(&mut self) {
        // Everything cached or queued goes back to the slabs, and every empty slab to the
        // pool, so a pool dropped with no live objects holds no block of ours.
        let _inside = reentry::Reentry::enter();
        self.release(None);
    }
}

/// The second word of an object: its free mark.
#[inline(always)]
fn mark_word(ptr: *mut u8) -> *mut u64 {
    ptr.wrapping_add(8).cast::<u64>()
}

/// A random odd key for the free marks (never 0, so a zeroed object never looks free).
fn random_key() -> u64 {
    let mut key: u64 = 0;
    #[cfg(not(any(loom, miri)))]
    // SAFETY: getrandom writes at most 8 bytes into `key`; failure leaves it 0.
    unsafe {
        libc::getrandom((&raw mut key).cast(), 8, libc::GRND_NONBLOCK);
    }
    // Without entropy, something that differs between runs and processes.
    key ^= (&raw const key).addr() as u64;
    key ^= (crate::sync::now_ms() as u64).rotate_left(32);
    key.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// Writes `msg` to stderr and aborts, without allocating or unwinding (a global allocator
/// must not unwind).
#[cold]
pub(crate) fn fatal(msg: &[u8]) -> ! {
    #[cfg(not(any(loom, miri)))]
    // SAFETY: writes `msg.len()` bytes from a valid buffer to fd 2.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
    #[cfg(any(loom, miri))]
    eprintln!("{}", String::from_utf8_lossy(msg));
    std::process::abort()
}

#[cold]
#[inline(never)]
fn double_free() -> ! {
    fatal(b"pagepool: double free of a small object (it is free already)\n")
}

#[cold]
#[inline(never)]
fn not_an_object() -> ! {
    fatal(b"pagepool: free of a pointer that is not the start of a small object\n")
}

impl Client for SlabAlloc {
    fn release_idle(&self, idle_ms: Option<u32>) -> Option<u32> {
        match reentry::Reentry::enter() {
            Some(_inside) => self.release(idle_ms),
            // Cannot happen on the hinter thread; come back soon if it does.
            None => Some(100),
        }
    }

    fn hold_for_fork(&self) {
        self.hold_heaps_for_fork();
    }

    fn release_fork_hold(&self) {
        self.release_heaps_after_fork();
    }

    fn recover_after_fork(&self) {
        // SAFETY: called by the child's fork handler, before the child runs other threads.
        unsafe { self.caches.reopen_after_fork() };
        for heap in self.heaps.iter() {
            // SAFETY: as above.
            unsafe { heap.remote.repair_after_fork() };
        }
    }
}
