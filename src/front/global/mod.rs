//! [`PoolAlloc`]: the pool as a process's global allocator.
//!
//! # Routing
//! By size and alignment at allocation; by address (and, for direct mappings, the layout
//! `GlobalAlloc` hands back) at `dealloc` and `realloc`:
//!
//! | request (size or alignment) | served by | freed by |
//! |---|---|---|
//! | up to [`SLAB_OBJECT_LIMIT`] (8 KiB), with an alignment a size class has | a slab object: per-CPU cache, CPU heap, slab (the small-object layer) | its address: in a slab |
//! | up to the direct-mapping threshold | a pool block of `order_for(size, align)` | its address: in the region, no slab there |
//! | above the threshold (from [`DIRECT_MAP_MIN`], 1 MiB, rising to the largest block) | its own `mmap`, resized with `mremap` | its layout: above 1 MiB, outside the region |
//! | from inside the pool (re-entrant), from the pool's own threads (`pool::background`), pool exhausted, switched off or not built | the fallback (`System`) | outside the region, layout at most 1 MiB |
//!
//! A direct mapping is never confused with a fallback allocation: every request needing
//! more than the direct-mapping floor ([`DIRECT_MAP_MIN`], or the largest block if that is
//! smaller) that the pool does not serve gets a mapping, whatever the state (re-entrant,
//! switched off, pool exhausted or not built); a fallback allocation that `realloc` grows
//! past the floor moves into a mapping, and a mapping shrunk to the floor or below moves
//! out. So outside the region, a layout above the floor means a mapping and any other
//! means the fallback. The threshold between the floor and the largest block only decides
//! where new requests go: a page block is found by its address whatever its size.
//!
//! # Initialisation
//! The pool is created on the first request that should go to it. A state word
//! (uninitialised, initialising with the builder's process id, ready/failed) lets exactly
//! one thread build it; others spin with `Backoff` until it is ready. The pool then joins
//! the process's registry of pools, which installs the fork handlers, and the small-object
//! layer attaches to it as its client (so the hinter drains its idle caches and the fork
//! handlers hold its locks). With [`Backing::Mmap`](crate::Backing::Mmap) (the default)
//! region, frame table, shard array, slab map, CPU heaps and per-CPU caches are mapped with
//! `mmap` directly, and the shard count is read with `sched_getaffinity` instead of
//! `std::thread::available_parallelism` (which reads cgroup files into heap buffers), so
//! initialisation allocates nothing through the global allocator. Anything that still
//! allocates while the pool is being built on this thread (a heap-backed configuration,
//! say) is served by the fallback through the re-entrancy guard.
//!
//! # Re-entrancy
//! A `thread_local!` `Cell<bool>` with a `const` initialiser and no destructor marks a
//! thread that is inside the pool: building it, or in any operation that takes a lock
//! (the slow paths of small objects, every page-block operation), or holding every pool
//! lock in a fork handler. Such a thread must not take a pool lock again (it could wait for
//! itself: a panic message allocated under a shard lock, a free from another library's
//! fork handler). It still uses the lock-free paths: per-CPU caches for small objects,
//! remote frees, direct mappings. Its other allocations go to the fallback; its frees of
//! page blocks are deferred: the block goes on a lock-free list (its first word links it)
//! that the next pool operation on any thread frees. Nothing on the adapter's paths spawns
//! threads, boxes closures or touches lazily allocated thread-locals.

mod control;
mod counters;
mod huge;
mod init;
mod pressure;
mod realloc;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::fmt;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::config::PoolBuilder;
use crate::error::{AllocError, BuildError};
use crate::frame_table::FreeClass;
use crate::os::mapping::MetaArray;
use crate::pool::PoolCore;
use crate::pool::background::on_background_thread;
use crate::slab::reentry;
use crate::slab::{Found, SlabAlloc, class_for, natural_class_for};
use crate::{FRAME_SIZE, MAX_SUPPORTED_ORDER, block_size, order_for};

pub use counters::PoolAllocStats;
use counters::{Counters, PageCounts, add, bump};
use init::{FAILED, READY, UNINIT, phase};

/// The default of [`PoolAlloc::min_pool_size`]: 1, every request goes to the pool (small
/// ones to its slabs).
pub const DEFAULT_MIN_POOL_SIZE: usize = 1;

/// Requests needing more than this (1 MiB) may be mapped directly; requests above the
/// pool's largest block always are. Between the two, a direct-mapping threshold decides:
/// it starts here and, like glibc's dynamic mmap threshold, rises to the size of each
/// mapping freed (up to the largest block), so a program that keeps allocating and freeing
/// buffers of some size gets them from the pool after the first, while one that grows a
/// few large vectors gets `mremap` (no copies, no freed copies left behind). Smaller
/// requests never are.
pub const DIRECT_MAP_MIN: usize = 1 << 20;

/// The smallest free block the hinter of [`PoolAlloc::new`] gives back to the OS while
/// the program runs: order 4, 64 KiB (a `PagePool` stops at 2 MiB, so transparent huge
/// pages are never split; the global allocator's region does not ask for them). Once no
/// CPU has allocated or freed a block for the hint delay, it goes down to
/// [`GLOBAL_IDLE_HINT_MIN_ORDER`].
///
/// Emptied slabs go back to the pool as blocks of 16 KiB and up, and after a program has
/// freed most of what it allocated, the survivors are scattered: hardly any 2 MiB of the
/// heap is free in one piece.
pub const GLOBAL_HINT_MIN_ORDER: u8 = 4;

/// The smallest free block the hinter of [`PoolAlloc::new`] gives back once the program
/// rests ([`PoolBuilder::idle_hint_min_order`]): order 2, 16 KiB, the smallest slab.
///
/// Measured with `examples/slab_fragmentation.rs` (1 GB of small objects, 90 % freed,
/// churn, 3 s idle, 97 MiB still live): `Rss - LazyFree` 174-211 MiB with 16 KiB blocks
/// hinted at rest, 173-190 MiB hinting them all the time, 495 MiB with 64 KiB the
/// smallest. Hinting 16 KiB blocks all the time cost a random mix of 4 KiB-2 MiB blocks
/// on two threads 60 % of its throughput (refaults, and a TLB shootdown per `madvise`).
pub const GLOBAL_IDLE_HINT_MIN_ORDER: u8 = 2;

/// The largest request [`PoolAlloc`] serves as a small object from a size-class slab;
/// larger ones are page blocks of the pool (through the same per-CPU caches, rounded up
/// to a power of two whose untouched tail pages cost no memory).
///
/// A slab holds at least 4 objects of one class and belongs to one CPU, so a program that
/// uses a class on a CPU keeps a partly used slab there: for the classes above 8 KiB that
/// is 40-128 KiB per class and CPU however little of it is live. Measured on the
/// application suite (`benches/apps`, 3 rounds, A/B against 32 KiB, the limit before):
/// peak RSS of the producer/consumer workload 18.1-18.5 -> 16.3 MiB, larson 106.3-109.4 ->
/// 101.6-101.9 MiB, regex and growth 0.5-1 % lower, json, parser and collections equal;
/// no workload slower beyond the noise (4 and 16 KiB came within 1-2 MiB of 8 KiB on
/// both workloads, neither lower on both).
pub const SLAB_OBJECT_LIMIT: usize = 8 << 10;

/// The largest block of [`PoolAlloc::new`]: order 13, 32 MiB.
///
/// Requests above it get a mapping of their own (resized with `mremap`, unmapped on free),
/// as glibc does above its mmap threshold, which adapts upwards to at most 32 MiB: their
/// memory goes back to the OS the moment they are freed. Below it the pool keeps freed
/// memory for reuse and hands it back through hinting.
pub const GLOBAL_MAX_ORDER: u8 = 13;

/// A [`GlobalAlloc`] whose every request is served by a page pool (held inline in the
/// adapter) or by mappings of its own: small objects from size-class slabs with per-CPU
/// caches, page-sized requests from the pool's buddy allocators, requests above the pool's
/// largest block from `mmap`. A fallback allocator `F` ([`System`] by default) serves only
/// what the pool must not or cannot: requests made from inside the pool (re-entrant) or by
/// the pool's own threads (the hinter, the pressure watcher: their allocations must not
/// keep a CPU's cache from looking idle), requests when the pool is exhausted (after its
/// caches were given back) or switched off, and everything when the pool could not be
/// built. With the `allocator-api2` feature it is also an
/// `allocator_api2::alloc::Allocator`.
///
/// ```
/// use pagepool::PoolAlloc;
///
/// #[global_allocator]
/// static GLOBAL: PoolAlloc = PoolAlloc::new();
///
/// fn main() {
///     // Optional: give idle memory back to the OS in the background.
///     GLOBAL.start_hinter().expect("spawn the hinter thread");
///     let small = String::from("hi"); // a slab object
///     let big = vec![7u8; 512 << 10]; // a pool block
///     let huge = vec![0u8; 64 << 20]; // a mapping of its own
///     assert!(GLOBAL.contains(small.as_ptr()) && GLOBAL.contains(big.as_ptr()));
///     assert!(!GLOBAL.contains(huge.as_ptr()));
/// }
/// ```
///
/// # Small objects
/// Up to [`SLAB_OBJECT_LIMIT`] (8 KiB), a request takes the smallest size class that
/// holds it (16 to 128 bytes in steps of 8, then 8 classes per doubling: at most 12.5 %
/// waste above 128 bytes) and whose natural alignment (the largest power of two dividing
/// the class size) covers the request's; a stricter alignment takes a larger class or a
/// page block. Objects come from slabs, pool blocks of 16 to 128 KiB holding one class
/// and at least 4 objects, with their metadata out of
/// band (no header in front of an object). The fast paths run on the calling CPU's cache
/// with restartable sequences, as tcmalloc's do: an allocation pops, a free on the CPU that
/// owns the object's slab pushes, with no lock and no atomic read-modify-write. A free on
/// another CPU sends the object to the owner with one compare-and-swap (mimalloc's and
/// snmalloc's remote frees), and the owner collects it later. Refills and spills move
/// half a cache at a time under a per-CPU heap lock, taking from the fullest slabs first so
/// sparse slabs empty out; an emptied slab goes back to the pool. A double free of an
/// object that is still free, or a free of a pointer into the middle of an object, aborts
/// with a message.
///
/// # Configuration
/// [`new`](Self::new) uses [`PoolBuilder::new`] with `max_order(`[`GLOBAL_MAX_ORDER`]`)`:
/// 32 MiB blocks (larger requests are mapped directly), a capacity equal to physical
/// memory (reserved with `MAP_NORESERVE`, so it costs nothing until touched), and, unless
/// the builder says otherwise, one shard per four CPUs in the thread's affinity mask (the
/// CPU heaps in front of the shards take the small requests; fewer shards keep less freed
/// memory apart). [`with_config`](Self::with_config) takes any builder; every builder
/// setter is a `const fn`:
///
/// ```
/// use pagepool::{PoolAlloc, PoolBuilder};
/// static A: PoolAlloc = PoolAlloc::with_config(PoolBuilder::new().capacity(1 << 30).max_order(12));
/// ```
///
/// `hint_thread` in the builder is ignored: a global allocator must never spawn a thread
/// inside `alloc`. Start the hinter from `main` with [`start_hinter`](Self::start_hinter),
/// or call [`hint_now`](Self::hint_now) and [`drain_caches`](Self::drain_caches) when
/// convenient. With the hinter running, the object caches of CPUs idle for the hint delay
/// (1 s by default) are drained, empty slabs go back to the pool, and cold free blocks of
/// 2 MiB and more go back to the OS.
///
/// # Realloc and zeroing
/// `realloc` keeps a small object in place while the new size stays in its class (or
/// shrinks by less than half), grows a page block in place when the buddies it needs are
/// free, shrinks it in place by splitting, and resizes a direct mapping with `mremap`
/// (never a copy). Otherwise it moves the allocation to where a fresh one of the new size
/// would live, copying the smaller size. `alloc_zeroed` skips the `memset` for memory
/// known to be zero: never-used objects of a fresh slab, known-zero blocks (2 MiB and up),
/// and direct mappings.
///
/// # fork
/// `fork` is safe without any call: when the pool is built it joins the process's registry
/// of pools, whose `pthread_atfork` handlers take every lock (CPU heaps first, then the
/// pool's) before `fork` and release them in parent and child, like glibc's `malloc` does
/// with its arenas. The child has only the forking thread: blocks the parent's hinter had
/// isolated go back to the lists there, per-CPU caches that a parent thread was using are
/// reopened, and no hinter thread runs until [`start_hinter`](Self::start_hinter) is called
/// in the child ([`hinter_running`](Self::hinter_running) says `false` until then).
#[repr(C)] // the fields the fast paths read first, on one cache line
pub struct PoolAlloc<F: GlobalAlloc = System> {
    // The fields the fast paths read, together.
    /// The small-object layer (null before the pool is built): in `slab_home`.
    slab: AtomicPtr<SlabAlloc>,
    enabled: AtomicBool,
    /// Requests of at most this many bytes can be slab objects.
    small_limit: usize,
    min_size: usize,
    /// Requests needing more than this many bytes (size or alignment) that the pool does
    /// not serve are mapped directly, never given to the fallback: the direct-mapping
    /// floor (see [`DIRECT_MAP_MIN`]).
    map_floor: usize,
    /// Requests needing more than this many bytes are mapped directly: the direct-mapping
    /// threshold, from `map_floor` up to the largest block (raised as mappings are freed).
    map_above: AtomicUsize,
    /// The largest block.
    block_max: usize,
    config: PoolBuilder,
    fallback: F,
    /// The phase (low byte) and, while initialising, the builder's process id.
    state: AtomicU64,
    /// The built pool (null before): in `home`, a mapping of its own.
    core: AtomicPtr<PoolCore>,
    home: UnsafeCell<MaybeUninit<MetaArray<PoolCore>>>,
    slab_home: UnsafeCell<MaybeUninit<MetaArray<SlabAlloc>>>,
    error: UnsafeCell<MaybeUninit<BuildError>>,
    /// Pool blocks freed by a thread that could not take a pool lock, linked through their
    /// first word; the next pool operation frees them.
    deferred: AtomicPtr<u8>,
    counters: CachePadded<Counters>,
    pages: PageCounts,
}

// SAFETY: `home`, `slab_home` and `error` are written once, by the thread that wins the
// UNINIT -> INITIALISING transition, before a release store of `core`/`slab` or of FAILED;
// every read follows an acquire load of those. PoolCore and SlabAlloc are Sync, the other
// fields are atomics or plain data, and the fallback is shared only if it is Sync.
unsafe impl<F: GlobalAlloc + Sync> Sync for PoolAlloc<F> {}
// SAFETY: as above; moving the adapter moves the fallback, hence `F: Send`.
unsafe impl<F: GlobalAlloc + Send> Send for PoolAlloc<F> {}

impl PoolAlloc<System> {
    /// An adapter with the default configuration and [`System`] as fallback. See the type
    /// docs for the defaults.
    pub const fn new() -> Self {
        Self::with_config(
            PoolBuilder::new()
                .max_order(GLOBAL_MAX_ORDER)
                .hint_min_order(GLOBAL_HINT_MIN_ORDER)
                .idle_hint_min_order(GLOBAL_IDLE_HINT_MIN_ORDER),
        )
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
        let max = if config.max_order > MAX_SUPPORTED_ORDER {
            MAX_SUPPORTED_ORDER
        } else {
            config.max_order
        };
        Self {
            slab: AtomicPtr::new(ptr::null_mut()),
            enabled: AtomicBool::new(true),
            small_limit: {
                let classes = crate::slab::classes::small_limit(max);
                if classes < SLAB_OBJECT_LIMIT {
                    classes
                } else {
                    SLAB_OBJECT_LIMIT
                }
            },
            min_size: DEFAULT_MIN_POOL_SIZE,
            map_floor: if DIRECT_MAP_MIN < block_size(max) {
                DIRECT_MAP_MIN
            } else {
                block_size(max)
            },
            map_above: AtomicUsize::new(if DIRECT_MAP_MIN < block_size(max) {
                DIRECT_MAP_MIN
            } else {
                block_size(max)
            }),
            block_max: block_size(max),
            config: config.hint_thread(false),
            fallback,
            state: AtomicU64::new(UNINIT),
            core: AtomicPtr::new(ptr::null_mut()),
            home: UnsafeCell::new(MaybeUninit::uninit()),
            slab_home: UnsafeCell::new(MaybeUninit::uninit()),
            error: UnsafeCell::new(MaybeUninit::uninit()),
            deferred: AtomicPtr::new(ptr::null_mut()),
            counters: CachePadded::new(Counters::new()),
            pages: PageCounts::new(),
        }
    }

    /// Requests smaller than `bytes` go to the fallback instead of the pool (default
    /// [`DEFAULT_MIN_POOL_SIZE`], 1: none do). Meant for measurements and for programs that
    /// want their small objects in `malloc`; values below 1 are treated as 1. Requests
    /// above the largest block are mapped directly whatever this says.
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

/// Where a layout goes (see the module docs' routing table).
enum Route {
    /// A slab object of this class.
    Small(usize),
    /// A pool block of this order.
    Page(u8),
    /// A mapping of its own.
    Huge,
}

impl<F: GlobalAlloc> PoolAlloc<F> {
    // --- routing -----------------------------------------------------------------------

    /// Whether `ptr` lies in the pool's region (so the pool, not the fallback or a direct
    /// mapping, owns it).
    #[inline]
    pub fn contains(&self, ptr: *const u8) -> bool {
        self.ready_core().is_some_and(|core| core.contains(ptr))
    }

    /// Sends new requests to the pool (`true`, the default) or to the fallback only
    /// (`false`), apart from requests above the largest block, which are always mapped
    /// directly. Allocations already in the pool stay there and are freed to it. Meant for
    /// A/B measurements in one binary and for switching the pool off without a rebuild.
    pub fn set_pool_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Where a fresh allocation of `(size, align)` lives.
    #[inline(always)]
    fn route(&self, size: usize, align: usize) -> Route {
        if size <= self.small_limit
            && let Some(class) = class_for(size, align)
        {
            return Route::Small(class);
        }
        if size.max(align) > self.map_above.load(Ordering::Relaxed) {
            return Route::Huge;
        }
        match order_for(size, align) {
            Some(order) => Route::Page(order),
            None => Route::Huge,
        }
    }

    /// Whether an allocation of `layout` outside the region is a direct mapping (else it
    /// is the fallback's): it needs more than the direct-mapping floor.
    #[inline(always)]
    fn is_mapping(&self, layout: Layout) -> bool {
        layout.size().max(layout.align()) > self.map_floor
    }

    /// A mapping made for `layout` is going away: like glibc's dynamic mmap threshold,
    /// later requests up to its size go to the pool, which keeps freed memory for reuse
    /// (and hints it back when it stays cold) instead of paying `mmap`, `munmap` and fresh
    /// page faults every time.
    #[inline]
    fn unmapped(&self, layout: Layout) {
        let need = layout.size().max(layout.align());
        if need <= self.block_max && need > self.map_above.load(Ordering::Relaxed) {
            self.map_above.fetch_max(need, Ordering::Relaxed);
        }
        bump(&self.counters.huge_unmapped);
        add(
            &self.counters.huge_bytes,
            (layout.size() as u64).wrapping_neg(),
        );
    }

    /// Whether a request of `size` bytes may go to the pool.
    #[inline(always)]
    fn pool_wanted(&self, size: usize) -> bool {
        size >= self.min_size && self.enabled.load(Ordering::Relaxed)
    }

    /// The small-object layer, if built.
    #[inline(always)]
    fn ready_slab(&self) -> Option<&SlabAlloc> {
        let slab = self.slab.load(Ordering::Acquire);
        // SAFETY: a non-null pointer was stored (release) after the layer was built in its
        // mapping, which lives as long as `self`.
        unsafe { slab.as_ref() }
    }

    /// Allocates `layout` wherever it belongs; zeroes it if asked. Null only when every
    /// place refused.
    #[inline(always)]
    fn allocate(&self, layout: Layout, zero: bool) -> *mut u8 {
        if !zero && let Some(ptr) = self.alloc_small_fast(layout) {
            return ptr.as_ptr();
        }
        self.allocate_general(layout, zero)
    }

    /// The common case of [`allocate`](Self::allocate): a small object from this CPU's
    /// cache by rseq. Makes no call, so `alloc` runs it without a stack frame; `None`
    /// whenever anything else is needed.
    #[inline(always)]
    fn alloc_small_fast(&self, layout: Layout) -> Option<ptr::NonNull<u8>> {
        let size = layout.size();
        if size > self.small_limit || !self.pool_wanted(size) || on_background_thread() {
            return None;
        }
        let class = natural_class_for(size, layout.align())?;
        self.ready_slab()?.alloc_fast(class)
    }

    /// [`allocate`](Self::allocate) past its fast path.
    #[inline(never)]
    fn allocate_general(&self, layout: Layout, zero: bool) -> *mut u8 {
        if on_background_thread() {
            // See `pool::background`: the pool's own threads never take a per-CPU cache.
            return self.alloc_outside_pool(layout, zero);
        }
        let size = layout.size();
        match self.route(size, layout.align()) {
            Route::Small(class) => {
                if self.pool_wanted(size)
                    && let Some(slab) = self.ready_slab()
                {
                    let got = if zero {
                        slab.alloc_zeroed(class, size)
                    } else {
                        slab.alloc(class)
                    };
                    if let Some(ptr) = got {
                        return ptr.as_ptr();
                    }
                }
                self.alloc_small_slow(class, layout, zero)
            }
            Route::Page(order) => self.alloc_page(order, layout, zero),
            Route::Huge => self.alloc_huge(layout, zero),
        }
    }

    /// An allocation the pool does not serve: a mapping above the direct-mapping floor (a
    /// fallback pointer is never that large, see the module docs), the fallback otherwise.
    #[cold]
    fn alloc_outside_pool(&self, layout: Layout, zero: bool) -> *mut u8 {
        if self.is_mapping(layout) {
            return self.alloc_huge(layout, zero);
        }
        self.fallback_alloc(layout, zero)
    }

    /// A small object when this CPU's cache is empty (or the pool is not built yet).
    #[cold]
    fn alloc_small_slow(&self, class: usize, layout: Layout, zero: bool) -> *mut u8 {
        if self.pool_wanted(layout.size()) {
            if let Some(_inside) = reentry::enter() {
                if let Some(core) = self.core_or_init() {
                    self.free_deferred(core);
                    // Published before the core (see `init`).
                    if let Some(slab) = self.ready_slab() {
                        match slab.alloc_slow(class, zero.then_some(layout.size())) {
                            Some(ptr) => return ptr.as_ptr(),
                            None => bump(&self.counters.exhausted),
                        }
                    }
                }
            } else {
                bump(&self.counters.nested);
            }
        }
        self.fallback_alloc(layout, zero)
    }

    /// A page block of `order`, or the fallback.
    #[inline]
    fn alloc_page(&self, order: u8, layout: Layout, zero: bool) -> *mut u8 {
        if self.pool_wanted(layout.size())
            && let Some(ptr) = self.alloc_pool(order, layout.size(), zero)
        {
            return ptr;
        }
        self.alloc_outside_pool(layout, zero)
    }

    /// A direct mapping.
    #[cold]
    fn alloc_huge(&self, layout: Layout, zero: bool) -> *mut u8 {
        let ptr = huge::map(layout.size(), layout.align());
        if !ptr.is_null() {
            bump(&self.counters.too_large);
            add(&self.counters.huge_bytes, layout.size() as u64);
            if zero {
                bump(&self.counters.zeroed_free);
            }
        }
        ptr
    }

    /// The fallback's allocation.
    #[inline]
    fn fallback_alloc(&self, layout: Layout, zero: bool) -> *mut u8 {
        // SAFETY: `layout` has a non-zero size (GlobalAlloc's contract, passed on).
        unsafe {
            if zero {
                self.fallback.alloc_zeroed(layout)
            } else {
                self.fallback.alloc(layout)
            }
        }
    }

    /// Allocates a page block; `None` sends the request to the fallback.
    #[inline]
    fn alloc_pool(&self, order: u8, size: usize, zero: bool) -> Option<*mut u8> {
        let Some(_guard) = reentry::enter() else {
            bump(&self.counters.nested);
            return None;
        };
        let core = self.core_or_init()?;
        self.free_deferred(core);
        // Known-zero memory saves the memset but is fresh: every page faults in, and taking
        // it for every zeroed request would grow the footprint. Only blocks of 2 MiB and
        // more ask for it (as the pool does with its default hint order; this adapter
        // hints smaller blocks too, see `new`); smaller ones skip the memset when they
        // happen to get a known-zero block.
        match core.alloc_frame(order, zero && order >= PREFER_ZERO_ORDER, None) {
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
                self.pages.allocated();
                Some(ptr)
            }
            Err(AllocError::Exhausted { .. }) => {
                // What the small-object layer holds unused goes back first.
                if let Some(slab) = self.ready_slab() {
                    slab.release(None);
                    if let Ok((idx, _)) = core.alloc_frame(order, false, None) {
                        let ptr = core.frame_ptr(idx).as_ptr();
                        if zero {
                            // SAFETY: as above.
                            unsafe { ptr::write_bytes(ptr, 0, size) };
                        }
                        self.pages.allocated();
                        return Some(ptr);
                    }
                }
                bump(&self.counters.exhausted);
                None
            }
            Err(_) => None,
        }
    }

    /// Frees what `dealloc` found outside the region: a mapping of ours or the fallback's.
    /// Out of line, as [`free_page`](Self::free_page).
    ///
    /// # Safety
    /// `ptr` and `layout` are a `dealloc` call's, for a pointer outside the region.
    #[inline(never)]
    unsafe fn dealloc_outside_pool(&self, ptr: *mut u8, layout: Layout) {
        if self.is_mapping(layout) {
            // SAFETY: outside the region, above the floor: always a mapping of ours.
            unsafe { huge::unmap(ptr, layout.size(), layout.align()) };
            self.unmapped(layout);
            return;
        }
        // SAFETY: neither the region nor a mapping: the fallback allocated it with
        // `layout`.
        unsafe { self.fallback.dealloc(ptr, layout) }
    }

    /// [`free_pool`](Self::free_pool) out of line: the small-object path it shares
    /// `dealloc` with then needs no stack frame.
    #[inline(never)]
    fn free_page(&self, core: &PoolCore, ptr: *mut u8) {
        self.free_pool(core, ptr);
    }

    /// Frees a page block by address; deferred when this thread may not take a pool lock.
    #[inline]
    fn free_pool(&self, core: &PoolCore, ptr: *mut u8) {
        let Some(_guard) = reentry::enter() else {
            self.defer_free(ptr);
            return;
        };
        self.free_deferred(core);
        self.free_now(core, ptr);
    }

    /// Frees a page block; the caller is inside the pool.
    fn free_now(&self, core: &PoolCore, ptr: *mut u8) {
        let freed = core
            .frame_of(ptr)
            .and_then(|idx| core.free_frame(idx, None));
        match freed {
            Ok(_) => self.pages.freed(),
            Err(_) => fatal(
                b"pagepool: dealloc of a pointer that is not an allocated pool block (double free?)\n",
            ),
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
}

impl<F: GlobalAlloc> fmt::Debug for PoolAlloc<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolAlloc")
            .field("config", &self.config)
            .field("min_pool_size", &self.min_size)
            .field("small_limit", &self.small_limit)
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
                    registry_leave(core);
                }
                // SAFETY: READY means both homes were initialised; `&mut self` means nobody
                // uses them, and the core left the registry, so neither the hinter nor the
                // fork handlers reach the layer. The layer goes first: it gives its blocks
                // back to the core.
                unsafe {
                    self.slab_home.get_mut().assume_init_drop();
                    self.home.get_mut().assume_init_drop();
                }
            }
            // SAFETY: FAILED means `error` was initialised.
            FAILED => unsafe { self.error.get_mut().assume_init_drop() },
            _ => {}
        }
    }
}

fn registry_leave(core: &PoolCore) {
    crate::pool::registry::registry().leave(core);
}

// SAFETY: every path returns memory of the requested layout from a slab (a class at least
// the size whose objects are aligned to the request), the pool (a block of
// `order_for(size, align)`, aligned to its size), a mapping (aligned by construction) or
// the fallback, and frees or resizes by address and layout as the module docs describe,
// so each pointer goes back to whoever produced it. Nothing here unwinds: the paths do not
// panic on valid input, and invalid frees abort.
unsafe impl<F: GlobalAlloc> GlobalAlloc for PoolAlloc<F> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocate(layout, false)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.allocate(layout, true)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(slab) = self.ready_slab() {
            match slab.find(ptr) {
                // SAFETY: a pointer the caller got from us, in a slab.
                Found::Object(entry) => return unsafe { slab.free(ptr, entry) },
                Found::Page => return self.free_page(slab.core(), ptr),
                Found::Outside => {}
            }
        }
        // SAFETY: forwarded: outside the region, so not ours but a mapping's or the
        // fallback's.
        unsafe { self.dealloc_outside_pool(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if let Some(slab) = self.ready_slab() {
            match slab.find(ptr) {
                Found::Object(entry) => {
                    // SAFETY: a live slab object of ours, with the caller's guarantees.
                    return unsafe { self.realloc_object(slab, ptr, entry, layout, new_size) };
                }
                Found::Page => {
                    // SAFETY: a live page block of ours, with the caller's guarantees.
                    return unsafe { self.realloc_pool(slab.core(), ptr, layout, new_size) };
                }
                Found::Outside => {}
            }
        }
        if self.is_mapping(layout) {
            // SAFETY: a mapping (see `dealloc`), with the caller's guarantees.
            return unsafe { self.realloc_huge(ptr, layout, new_size) };
        }
        // SAFETY: a fallback allocation, with the caller's guarantees.
        unsafe { self.realloc_fallback(ptr, layout, new_size) }
    }
}

// --- helpers -------------------------------------------------------------------------------

/// A page block shrunk in place to `size` bytes keeps the pages of its block past them,
/// which the program wrote while it was larger: give them back to the OS at once
/// (`MADV_DONTNEED`; they read as zeros if the block grows again), when there are at least
/// [`TAIL_RELEASE_MIN`] bytes of them. Shrinking is rare, so the system call is cheap next
/// to the memory it returns (`Vec::shrink_to_fit` leaves up to half a block otherwise).
fn release_tail(ptr: *mut u8, size: usize, block: usize) {
    let start = size.next_multiple_of(FRAME_SIZE);
    if block.saturating_sub(start) < TAIL_RELEASE_MIN {
        return;
    }
    #[cfg(not(miri))]
    // SAFETY: `[ptr + start, ptr + block)` lies inside the caller's allocated block, past
    // the bytes it keeps; the pages read as zeros afterwards, which nobody relies on.
    unsafe {
        libc::madvise(ptr.add(start).cast(), block - start, libc::MADV_DONTNEED);
    }
    #[cfg(miri)]
    let _ = ptr;
}

/// Zeroed page blocks of this order (2 MiB) and up prefer known-zero memory.
const PREFER_ZERO_ORDER: u8 = 9;

/// The smallest tail [`release_tail`] gives back: 16 KiB.
const TAIL_RELEASE_MIN: usize = 16 << 10;

/// Writes `msg` to stderr and aborts, without allocating or unwinding (a global allocator
/// must not unwind).
#[cold]
fn fatal(msg: &[u8]) -> ! {
    crate::slab::fatal(msg)
}

const _: () = assert!(FRAME_SIZE == 4096);
