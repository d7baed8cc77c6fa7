//! [`PoolAlloc`]: the pool as a process's global allocator.
//!
//! # Routing
//! - Requests smaller than [`DEFAULT_MIN_POOL_SIZE`] (2 KiB, half a page) go to the
//!   fallback allocator (`System` by default). The pool's smallest block is 4 KiB; below
//!   half a page more than half of every block would be waste, and `malloc`'s size classes
//!   serve small objects better than any page allocator. Change it with
//!   [`PoolAlloc::min_pool_size`].
//! - Requests the pool cannot serve go to the fallback too: size or alignment above the
//!   largest block, or the pool exhausted, or the pool failed to initialise.
//! - `dealloc` and `realloc` decide by address: a pointer inside the pool's region is the
//!   pool's, anything else is the fallback's. Nothing is ever freed to the wrong allocator,
//!   whatever the layout says (a block shrunk in place below the threshold stays a pool
//!   block).
//!
//! # Initialisation
//! The pool is created on the first request that should go to it. A state word
//! (uninitialised, initialising with the builder's process id, ready/failed) lets exactly
//! one thread build it; others spin with `Backoff` until it is ready. The pool then joins
//! the process's registry of pools, which installs the fork handlers. With [`Backing::Mmap`](crate::Backing::Mmap)
//! (the default) region, frame table and shard array are mapped with `mmap` directly, and
//! the shard count is read with `sched_getaffinity` instead of
//! `std::thread::available_parallelism` (which reads cgroup files into heap buffers), so
//! initialisation allocates nothing through the global allocator. Anything that still
//! allocates while the pool is being built on this thread (a heap-backed configuration,
//! say) is served by the fallback through the re-entrancy guard.
//!
//! # Re-entrancy
//! A `thread_local!` `Cell<bool>` with a `const` initialiser and no destructor marks a
//! thread that is inside the pool: building it, or in any pool operation that takes a lock
//! (`alloc`, `dealloc` and `realloc` alike), or holding every pool lock in a fork handler.
//! Such a thread must not take a pool lock again (it could wait for itself: a panic
//! message allocated under a shard lock, a free from another library's fork handler).
//! Its allocations go straight to the fallback; its frees of pool blocks are deferred: the
//! block goes on a lock-free list (its first word links it) that the next pool operation
//! on any thread frees. Such a thread-local needs no registration and is usable even while
//! other thread-locals are being destroyed. Nothing on the adapter's paths spawns threads,
//! boxes closures or touches lazily allocated thread-locals.

mod control;
mod counters;
mod init;
mod pressure;
mod reentry;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::fmt;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::config::PoolBuilder;
use crate::error::{AllocError, BuildError};
use crate::frame_table::FreeClass;
use crate::os::mapping::MetaArray;
use crate::pool::PoolCore;
use crate::pool::registry::{in_fork_handler, registry};
use crate::{FRAME_SIZE, order_for};

pub use counters::PoolAllocStats;
use counters::{Counters, bump};
use init::{FAILED, READY, UNINIT, phase};
use reentry::Reentry;

/// Requests of at least this many bytes go to the pool: half a page. See the module docs.
pub const DEFAULT_MIN_POOL_SIZE: usize = FRAME_SIZE / 2;

/// The largest block of [`PoolAlloc::new`]: order 13, 32 MiB.
///
/// glibc's `malloc` serves requests above its mmap threshold with a private `mmap` and
/// unmaps them on free, so their memory goes back at once; the threshold adapts upwards to
/// at most 32 MiB, and below it freed memory stays in `malloc`'s heap. The pool covers
/// exactly that range and hands back what it holds through hinting. Larger requests go to
/// the fallback.
pub const GLOBAL_MAX_ORDER: u8 = 13;

/// A [`GlobalAlloc`] that serves requests of half a page and more from a page pool (the
/// allocator inside [`PagePool`](crate::PagePool), held inline in the adapter) and
/// everything else from a fallback allocator `F` ([`System`] by default). With the
/// `allocator-api2` feature it is also an `allocator_api2::alloc::Allocator`.
///
/// ```
/// use pagepool::PoolAlloc;
///
/// #[global_allocator]
/// static GLOBAL: PoolAlloc = PoolAlloc::new();
///
/// fn main() {
///     // Optional: give free memory back to the OS in the background.
///     GLOBAL.start_hinter().expect("spawn the hinter thread");
///     let big = vec![7u8; 8 << 20]; // from the pool
///     let small = String::from("hi"); // from the system allocator
///     assert!(GLOBAL.contains(big.as_ptr()) && !GLOBAL.contains(small.as_ptr()));
/// }
/// ```
///
/// # Configuration
/// [`new`](Self::new) uses [`PoolBuilder::new`] with `max_order(`[`GLOBAL_MAX_ORDER`]`)`:
/// 32 MiB blocks (larger requests go to the fallback), a capacity equal to physical memory
/// (reserved with `MAP_NORESERVE`, so it costs nothing until touched), one shard per CPU in
/// the thread's affinity mask. [`with_config`](Self::with_config) takes any builder; every
/// builder setter is a `const fn`:
///
/// ```
/// use pagepool::{PoolAlloc, PoolBuilder};
/// static A: PoolAlloc = PoolAlloc::with_config(PoolBuilder::new().capacity(1 << 30).max_order(12))
///     .min_pool_size(8192);
/// ```
///
/// `hint_thread` in the builder is ignored: a global allocator must never spawn a thread
/// inside `alloc`. Start the hinter from `main` with [`start_hinter`](Self::start_hinter),
/// or call [`hint_now`](Self::hint_now) when convenient.
///
/// # Realloc and zeroing
/// `realloc` grows a pool block in place when the buddies it needs are free, shrinks in
/// place by splitting, and moves only when it must: to another block, into the pool when a
/// fallback allocation grows past the threshold, or out of it when it outgrows the largest
/// block. `alloc_zeroed` prefers known-zero blocks (never touched, or given back with
/// `MADV_DONTNEED`) and then skips the `memset`.
///
/// # fork
/// `fork` is safe without any call: when the pool is built it joins the process's registry
/// of pools, whose `pthread_atfork` handlers take every pool lock before `fork` and
/// release them in parent and child, like glibc's `malloc` does with its arenas. The child
/// has only the forking thread: blocks the parent's hinter had isolated go back to the
/// lists there, and no hinter thread runs until [`start_hinter`](Self::start_hinter) is
/// called in the child ([`hinter_running`](Self::hinter_running) says `false` until then).
pub struct PoolAlloc<F: GlobalAlloc = System> {
    config: PoolBuilder,
    min_size: usize,
    fallback: F,
    /// The phase (low byte) and, while initialising, the builder's process id.
    state: AtomicU64,
    enabled: AtomicBool,
    /// The built pool (null before): in `home`, a mapping of its own.
    core: AtomicPtr<PoolCore>,
    home: UnsafeCell<MaybeUninit<MetaArray<PoolCore>>>,
    error: UnsafeCell<MaybeUninit<BuildError>>,
    /// Pool blocks freed by a thread that could not take a pool lock, linked through their
    /// first word; the next pool operation frees them.
    deferred: AtomicPtr<u8>,
    counters: CachePadded<Counters>,
}

// SAFETY: `home` and `error` are written once, by the thread that wins the UNINIT ->
// INITIALISING transition, before a release store of `core` or of FAILED; every read
// follows an acquire load of those. PoolCore is Sync (PagePool shares it between threads),
// the other fields are atomics, and the fallback is shared only if it is Sync.
unsafe impl<F: GlobalAlloc + Sync> Sync for PoolAlloc<F> {}
// SAFETY: as above; moving the adapter moves the fallback, hence `F: Send`.
unsafe impl<F: GlobalAlloc + Send> Send for PoolAlloc<F> {}

impl PoolAlloc<System> {
    /// An adapter with the default configuration and [`System`] as fallback. See the type
    /// docs for the defaults.
    pub const fn new() -> Self {
        Self::with_config(PoolBuilder::new().max_order(GLOBAL_MAX_ORDER))
    }

    /// An adapter with `config` and [`System`] as fallback.
    pub const fn with_config(config: PoolBuilder) -> Self {
        Self::with_fallback(config, System)
    }
}

impl Default for PoolAlloc<System> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: GlobalAlloc> PoolAlloc<F> {
    /// An adapter with `config` and `fallback` for the requests the pool does not serve.
    pub const fn with_fallback(config: PoolBuilder, fallback: F) -> Self {
        Self {
            config: config.hint_thread(false),
            min_size: DEFAULT_MIN_POOL_SIZE,
            fallback,
            state: AtomicU64::new(UNINIT),
            enabled: AtomicBool::new(true),
            core: AtomicPtr::new(ptr::null_mut()),
            home: UnsafeCell::new(MaybeUninit::uninit()),
            error: UnsafeCell::new(MaybeUninit::uninit()),
            deferred: AtomicPtr::new(ptr::null_mut()),
            counters: CachePadded::new(Counters::new()),
        }
    }

    /// Requests of at least `bytes` go to the pool (default [`DEFAULT_MIN_POOL_SIZE`],
    /// 2 KiB); smaller ones go to the fallback. Values below 1 are treated as 1.
    pub const fn min_pool_size(mut self, bytes: usize) -> Self {
        self.min_size = if bytes == 0 { 1 } else { bytes };
        self
    }

    /// The fallback allocator.
    pub fn fallback(&self) -> &F {
        &self.fallback
    }

    /// The configuration the pool is (or will be) built with.
    pub fn config(&self) -> &PoolBuilder {
        &self.config
    }
}

impl<F: GlobalAlloc> PoolAlloc<F> {
    // --- routing -----------------------------------------------------------------------

    /// Whether `ptr` lies in the pool's region (so the pool, not the fallback, owns it).
    #[inline]
    pub fn contains(&self, ptr: *const u8) -> bool {
        self.ready_core().is_some_and(|core| core.contains(ptr))
    }

    /// Sends new requests to the pool (`true`, the default) or to the fallback only
    /// (`false`). Blocks already in the pool stay there and are freed to it. Meant for A/B
    /// measurements in one binary and for switching the pool off without a rebuild.
    pub fn set_pool_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// The order the pool would serve `(size, align)` with, if it should.
    #[inline]
    fn pool_order(&self, size: usize, align: usize) -> Option<u8> {
        if size < self.min_size || !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        match order_for(size, align) {
            Some(order) if order <= self.config.max_order => Some(order),
            _ => {
                bump(&self.counters.too_large);
                None
            }
        }
    }

    /// Allocates from the pool; `None` sends the request to the fallback.
    #[inline]
    fn alloc_pool(&self, order: u8, size: usize, zero: bool) -> Option<*mut u8> {
        let Some(_guard) = self.enter() else {
            bump(&self.counters.nested);
            return None;
        };
        let core = self.core_or_init()?;
        self.free_deferred(core);
        match core.alloc_frame(order, zero, None) {
            Ok((idx, class)) => {
                let ptr = core.frame_ptr(idx).as_ptr();
                if zero {
                    if class == FreeClass::Zero {
                        bump(&self.counters.zeroed_free);
                    } else {
                        // SAFETY: the block was just handed to us and holds at least
                        // `size` bytes (its order was computed from `size`).
                        unsafe { ptr::write_bytes(ptr, 0, size) };
                    }
                }
                bump(&self.counters.pool_allocs);
                Some(ptr)
            }
            Err(AllocError::Exhausted { .. }) => {
                bump(&self.counters.exhausted);
                None
            }
            Err(_) => None,
        }
    }

    /// Marks this thread as inside the pool, unless it already is (or holds every pool
    /// lock in a fork handler): then it must not take a pool lock.
    #[inline]
    fn enter(&self) -> Option<Reentry> {
        let guard = Reentry::enter()?;
        if in_fork_handler() {
            return None;
        }
        Some(guard)
    }

    /// Frees a pool block by address; deferred when this thread may not take a pool lock.
    #[inline]
    fn free_pool(&self, core: &PoolCore, ptr: *mut u8) {
        let Some(_guard) = self.enter() else {
            self.defer_free(ptr);
            return;
        };
        self.free_deferred(core);
        self.free_now(core, ptr);
    }

    /// Frees a pool block; the caller is inside the pool.
    fn free_now(&self, core: &PoolCore, ptr: *mut u8) {
        let freed = core
            .frame_of(ptr)
            .and_then(|idx| core.free_frame(idx, None));
        match freed {
            Ok(_) => bump(&self.counters.pool_frees),
            Err(_) => fatal(b"pagepool: dealloc of a pointer that is not an allocated pool block (double free?)\n"),
        }
    }

    /// Puts a pool block on the deferred list. Lock-free: a push links the block through
    /// its first word (a pool block is at least 4 KiB and no longer anyone's).
    #[cold]
    fn defer_free(&self, ptr: *mut u8) {
        let mut head = self.deferred.load(Ordering::Relaxed);
        loop {
            // SAFETY: the block is being freed, so its bytes are ours to write, and a pool
            // block is aligned for a pointer.
            unsafe { ptr.cast::<*mut u8>().write(head) };
            match self.deferred.compare_exchange_weak(
                head,
                ptr,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => head = now,
            }
        }
        bump(&self.counters.deferred_frees);
    }

    /// Frees the deferred blocks, if any; the caller is inside the pool.
    #[inline]
    fn free_deferred(&self, core: &PoolCore) {
        if self.deferred.load(Ordering::Relaxed).is_null() {
            return;
        }
        let mut at = self.deferred.swap(ptr::null_mut(), Ordering::Acquire);
        while !at.is_null() {
            // SAFETY: written by `defer_free` before the release that our acquire saw.
            let next = unsafe { at.cast::<*mut u8>().read() };
            self.free_now(core, at);
            at = next;
        }
    }

    /// `realloc` of a pool block.
    ///
    /// # Safety
    /// `ptr` is a live pool block allocated with `layout`; `new_size` is non-zero and,
    /// rounded up to `layout.align()`, does not overflow `isize`.
    unsafe fn realloc_pool(
        &self,
        core: &PoolCore,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        let align = layout.align();
        // The order a block has always follows from its current layout: `alloc` and every
        // in-place resize below use `order_for(size, align)`.
        let old_order =
            order_for(layout.size(), align).expect("a pool block's layout has an order");
        let idx = match core.frame_of(ptr) {
            Ok(idx) => idx,
            Err(_) => fatal(b"pagepool: realloc of a pointer that is not a pool block\n"),
        };
        let new_order = order_for(new_size, align).filter(|&o| o <= core.max_order());
        {
            let Some(_inside) = self.enter() else {
                // Inside the pool already: no lock may be taken, so no resize in place
                // either; the old block's free is deferred.
                // SAFETY: as below.
                return unsafe { self.move_to_fallback(ptr, layout, new_size) };
            };
            match new_order {
                Some(order) if order == old_order => return ptr,
                Some(order) if order < old_order => {
                    core.shrink_frame(idx, old_order, order);
                    bump(&self.counters.shrunk_in_place);
                    return ptr;
                }
                Some(order) if core.grow_frame(idx, old_order, order) => {
                    bump(&self.counters.grown_in_place);
                    return ptr;
                }
                _ => {}
            }
        } // `alloc_pool` and `free_pool` enter the pool themselves
        if let Some(new_order) = new_order
            && self.enabled.load(Ordering::Relaxed)
            && let Some(new) = self.alloc_pool(new_order, new_size, false)
        {
            // SAFETY: both blocks are live, distinct, and hold at least `layout.size()`
            // bytes.
            unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size()) };
            self.free_pool(core, ptr);
            bump(&self.counters.moved_within_pool);
            return new;
        }
        // Too large for the pool, the pool exhausted or switched off: move to the fallback.
        // SAFETY: the caller's guarantees.
        unsafe { self.move_to_fallback(ptr, layout, new_size) }
    }

    /// Moves the pool block `ptr` to a fallback allocation of `new_size`.
    ///
    /// # Safety
    /// As for [`realloc_pool`](Self::realloc_pool).
    unsafe fn move_to_fallback(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with this alignment is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size.
        let new = unsafe { self.fallback.alloc(new_layout) };
        if new.is_null() {
            return new; // the old block stays valid, as `realloc` requires
        }
        // SAFETY: both allocations are live and distinct; copy what both hold.
        unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        if let Some(core) = self.ready_core() {
            self.free_pool(core, ptr);
        }
        bump(&self.counters.moved_to_fallback);
        new
    }
}

impl<F: GlobalAlloc> fmt::Debug for PoolAlloc<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolAlloc")
            .field("config", &self.config)
            .field("min_pool_size", &self.min_size)
            .field("built", &self.built().map(|r| r.map(|_| ())))
            .finish_non_exhaustive()
    }
}

impl<F: GlobalAlloc> Drop for PoolAlloc<F> {
    fn drop(&mut self) {
        // A `static` is never dropped; this is for adapters with shorter lives.
        match phase(*self.state.get_mut()) {
            READY => {
                if let Some(core) = self.ready_core() {
                    registry().leave(core);
                }
                // SAFETY: READY means `home` was initialised; `&mut self` means nobody
                // uses it, and the core left the registry.
                unsafe { self.home.get_mut().assume_init_drop() }
            }
            // SAFETY: FAILED means `error` was initialised.
            FAILED => unsafe { self.error.get_mut().assume_init_drop() },
            _ => {}
        }
    }
}

// SAFETY: every path returns memory of the requested layout from either the pool (a block
// of `order_for(size, align)`, aligned to its size) or the fallback, and frees or resizes
// by address, so each pointer goes back to the allocator that produced it. Nothing here
// unwinds: the pool's paths do not panic on valid input, and invalid frees abort.
unsafe impl<F: GlobalAlloc> GlobalAlloc for PoolAlloc<F> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(order) = self.pool_order(layout.size(), layout.align())
            && let Some(ptr) = self.alloc_pool(order, layout.size(), false)
        {
            return ptr;
        }
        // SAFETY: forwarded with the caller's guarantees (non-zero size).
        unsafe { self.fallback.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(order) = self.pool_order(layout.size(), layout.align())
            && let Some(ptr) = self.alloc_pool(order, layout.size(), true)
        {
            return ptr;
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.fallback.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(core) = self.ready_core()
            && core.contains(ptr)
        {
            return self.free_pool(core, ptr);
        }
        // SAFETY: not in the pool's region, so the fallback allocated it with `layout`.
        unsafe { self.fallback.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if let Some(core) = self.ready_core()
            && core.contains(ptr)
        {
            // SAFETY: a pool block, with the caller's guarantees on `layout`/`new_size`.
            return unsafe { self.realloc_pool(core, ptr, layout, new_size) };
        }
        if new_size > layout.size()
            && let Some(order) = self.pool_order(new_size, layout.align())
            && let Some(new) = self.alloc_pool(order, new_size, false)
        {
            // Growing past the threshold: move into the pool.
            // SAFETY: both allocations are live and distinct; the old one holds
            // `layout.size()` bytes, fewer than the new one.
            unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size()) };
            // SAFETY: the fallback allocated `ptr` with `layout`.
            unsafe { self.fallback.dealloc(ptr, layout) };
            bump(&self.counters.moved_to_pool);
            return new;
        }
        // SAFETY: a fallback allocation, forwarded with the caller's guarantees.
        unsafe { self.fallback.realloc(ptr, layout, new_size) }
    }
}

// --- helpers -------------------------------------------------------------------------------

/// Writes `msg` to stderr and aborts, without allocating or unwinding (a global allocator
/// must not unwind).
#[cold]
fn fatal(msg: &[u8]) -> ! {
    // SAFETY: writes `msg.len()` bytes from a valid buffer to fd 2.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    std::process::abort()
}
