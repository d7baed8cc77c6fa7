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
//! The pool is created on the first request that should go to it. A three-state atomic
//! (uninitialised, initialising, ready/failed) lets exactly one thread build it; others
//! spin with [`Backoff`] until it is ready. With [`Backing::Mmap`](crate::Backing::Mmap)
//! (the default) region, frame table and shard array are mapped with `mmap` directly, and
//! the shard count is read with `sched_getaffinity` instead of
//! `std::thread::available_parallelism` (which reads cgroup files into heap buffers), so
//! initialisation allocates nothing through the global allocator. Anything that still
//! allocates while the pool is being built on this thread (a heap-backed configuration,
//! say) is served by the fallback through the re-entrancy guard.
//!
//! # Re-entrancy
//! A `thread_local!` `Cell<bool>` with a `const` initialiser and no destructor marks a
//! thread that is inside the pool (building it, or holding its locks across `fork`).
//! Requests made by such a thread go straight to the fallback. Such a thread-local needs
//! no registration and is usable even while other thread-locals are being destroyed.
//! Nothing on the adapter's `alloc`/`dealloc`/`realloc` paths spawns threads, boxes
//! closures or touches lazily allocated thread-locals.

mod control;
mod counters;
mod fork;
mod init;
mod reentry;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::fmt;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use crossbeam_utils::CachePadded;

use crate::config::PoolBuilder;
use crate::error::{AllocError, BuildError};
use crate::frame_table::FreeClass;
use crate::pool::PoolCore;
use crate::{FRAME_SIZE, order_for};

pub use counters::PoolAllocStats;
use counters::{Counters, bump};
use init::{FAILED, READY, UNINIT};
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
/// After `fork` the child has only the thread that forked: the hinter thread does not exist
/// there. Allocation keeps working in the child; [`start_hinter`](Self::start_hinter)
/// notices the changed process id and starts a new hinter (and
/// [`hinter_running`](Self::hinter_running) reports `false` until then). Blocks the parent's
/// hinter had isolated for a system call at the moment of the fork stay isolated (unused)
/// in the child: at most one batch (`hint_batch_blocks`, 32 by default).
///
/// Locks: if another thread held a shard lock at the moment of the fork, the child would
/// inherit it locked forever. [`install_fork_handlers`](Self::install_fork_handlers)
/// (done by `start_hinter`) registers `pthread_atfork` handlers that take every shard lock
/// before the fork and release them in parent and child afterwards, like glibc's `malloc`
/// does with its arenas. Without them, fork only from a process where no other thread
/// allocates, or exec right away. A thread that forks while inside `start_hinter` or
/// `stop_hinter` on another thread can leave the child unable to restart the hinter.
pub struct PoolAlloc<F: GlobalAlloc = System> {
    config: PoolBuilder,
    min_size: usize,
    fallback: F,
    state: AtomicU8,
    enabled: AtomicBool,
    /// The process that started building the pool (fork detection while initialising).
    init_pid: AtomicU32,
    core: UnsafeCell<MaybeUninit<PoolCore>>,
    error: UnsafeCell<MaybeUninit<BuildError>>,
    hinter: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The process the hinter thread runs in; 0 when none was started.
    hinter_pid: AtomicU32,
    fork_handlers: AtomicBool,
    counters: CachePadded<Counters>,
}

// SAFETY: `core` and `error` are written once, by the thread that wins the UNINIT ->
// INITIALISING transition, before a release store of READY or FAILED; every read follows
// an acquire load of that state. PoolCore is Sync (it is shared through Arc by PagePool),
// the other fields are atomics or a Mutex, and the fallback is shared only if it is Sync.
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
            state: AtomicU8::new(UNINIT),
            enabled: AtomicBool::new(true),
            init_pid: AtomicU32::new(0),
            core: UnsafeCell::new(MaybeUninit::uninit()),
            error: UnsafeCell::new(MaybeUninit::uninit()),
            hinter: Mutex::new(None),
            hinter_pid: AtomicU32::new(0),
            fork_handlers: AtomicBool::new(false),
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
        let Some(_guard) = Reentry::enter() else {
            bump(&self.counters.nested);
            return None;
        };
        let core = self.core_or_init()?;
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

    /// Frees a pool block by address.
    #[inline]
    fn free_pool(&self, core: &PoolCore, ptr: *mut u8) {
        let freed = core
            .frame_of(ptr)
            .and_then(|idx| core.free_frame(idx, None));
        match freed {
            Ok(_) => bump(&self.counters.pool_frees),
            Err(_) => fatal(b"pagepool: dealloc of a pointer that is not an allocated pool block (double free?)\n"),
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
        if let Some(new_order) = new_order {
            if new_order == old_order {
                return ptr;
            }
            if new_order < old_order {
                core.shrink_frame(idx, old_order, new_order);
                bump(&self.counters.shrunk_in_place);
                return ptr;
            }
            if core.grow_frame(idx, old_order, new_order) {
                bump(&self.counters.grown_in_place);
                return ptr;
            }
            if let Some(new) = self.alloc_pool(new_order, new_size, false) {
                // SAFETY: both blocks are live, distinct, and hold at least
                // `layout.size()` bytes.
                unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size()) };
                self.free_pool(core, ptr);
                bump(&self.counters.moved_within_pool);
                return new;
            }
        }
        // Too large for the pool, or the pool is exhausted: move to the fallback.
        // SAFETY: the caller guarantees `new_size` with `align` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
        // SAFETY: `new_layout` has a non-zero size.
        let new = unsafe { self.fallback.alloc(new_layout) };
        if new.is_null() {
            return new; // the old block stays valid, as `realloc` requires
        }
        // SAFETY: both allocations are live and distinct; copy what both hold.
        unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        self.free_pool(core, ptr);
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
        // A `static` is never dropped; this is for adapters with shorter lives, which can
        // have no hinter thread (`start_hinter` needs `&'static self`).
        match *self.state.get_mut() {
            // SAFETY: READY means `core` was initialised; `&mut self` means nobody uses it.
            READY => unsafe { self.core.get_mut().assume_init_drop() },
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

/// The calling process's id (a system call: not for hot paths).
fn current_pid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}
