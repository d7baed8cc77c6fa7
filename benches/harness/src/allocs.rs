//! The allocators under test, behind one small trait so every workload is generic
//! (monomorphised per allocator: no dynamic dispatch in the timed loops).

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use pagepool::{AllocPolicy, HintMode, PagePool};

/// An allocator of naturally aligned blocks of `4 KiB << order` bytes.
pub trait PageAlloc: Sync {
    /// What the allocator needs back to free a block.
    type Handle: Send;
    /// Allocates a block of `order`, aligned to its size; `None` when out of memory.
    fn alloc(&self, order: u8) -> Option<Self::Handle>;
    /// First byte of the block.
    fn ptr(handle: &Self::Handle) -> *mut u8;
    /// Frees a block.
    ///
    /// # Safety
    /// `handle` must come from `alloc(order)` of this allocator and not be freed yet.
    unsafe fn free(&self, handle: Self::Handle, order: u8);

    /// What one thread allocates through: the allocator itself for most, a `LocalCache`
    /// for pagepool+cache. Workloads make one per thread.
    type Local<'a>: LocalAlloc<Handle = Self::Handle>
    where
        Self: 'a;
    /// A per-thread front end.
    fn local(&self) -> Self::Local<'_>;
}

/// A thread's way into an allocator (see [`PageAlloc::Local`]).
pub trait LocalAlloc {
    /// As [`PageAlloc::Handle`].
    type Handle;
    /// As [`PageAlloc::alloc`].
    fn alloc(&mut self, order: u8) -> Option<Self::Handle>;
    /// As [`PageAlloc::free`].
    ///
    /// # Safety
    /// As [`PageAlloc::free`].
    unsafe fn free(&mut self, handle: Self::Handle, order: u8);
}

impl<A: PageAlloc> LocalAlloc for &A {
    type Handle = A::Handle;
    #[inline(always)]
    fn alloc(&mut self, order: u8) -> Option<A::Handle> {
        A::alloc(self, order)
    }
    #[inline(always)]
    unsafe fn free(&mut self, handle: A::Handle, order: u8) {
        // SAFETY: forwarded contract.
        unsafe { A::free(self, handle, order) }
    }
}

/// The allocator itself as its own per-thread front end.
macro_rules! direct_local {
    () => {
        type Local<'a>
            = &'a Self
        where
            Self: 'a;
        #[inline(always)]
        fn local(&self) -> &Self {
            self
        }
    };
}

/// Bytes in a block of `order`.
pub fn size_of_order(order: u8) -> usize {
    4096usize << order
}

fn layout(order: u8) -> Layout {
    let size = size_of_order(order);
    Layout::from_size_align(size, size).expect("power-of-two layout")
}

/// Which allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// pagepool with the default configuration (hinter thread on).
    Pagepool,
    /// The same pool through a per-thread `LocalCache`.
    PagepoolCache,
    /// The same pool through raw pointers: `Block::into_raw` and `free_raw`.
    PagepoolRaw,
    /// A pool whose per-CPU caches use the portable implementation (a per-CPU lock).
    PagepoolPortable,
    /// `PoolAlloc` (its own instance, not the process's global allocator) through
    /// `GlobalAlloc::alloc` / `dealloc` with page-sized, page-aligned layouts.
    PoolAlloc,
    /// glibc `posix_memalign` / `free`.
    System,
    /// mimalloc, `mi_malloc_aligned` through its `GlobalAlloc`.
    Mimalloc,
    /// jemalloc (`tikv-jemallocator`), `mallocx` with alignment through its `GlobalAlloc`.
    Jemalloc,
    /// lgalloc, 2 MiB and larger.
    Lgalloc,
    /// `buddy_system_allocator::LockedHeap` over one mapping of the pool's size.
    Buddy,
    /// One `mmap` per block (over-mapped and trimmed to the block's alignment), `munmap`.
    Mmap,
}

/// Every allocator, in table order.
pub const ALL: [Kind; 11] = [
    Kind::Pagepool,
    Kind::PagepoolCache,
    Kind::PagepoolRaw,
    Kind::PagepoolPortable,
    Kind::PoolAlloc,
    Kind::System,
    Kind::Mimalloc,
    Kind::Jemalloc,
    Kind::Lgalloc,
    Kind::Buddy,
    Kind::Mmap,
];

impl Kind {
    /// Short name used in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pagepool => "pagepool",
            Kind::PagepoolCache => "pagepool+cache",
            Kind::PagepoolRaw => "pagepool raw",
            Kind::PagepoolPortable => "pagepool portable",
            Kind::PoolAlloc => "PoolAlloc",
            Kind::System => "system",
            Kind::Mimalloc => "mimalloc",
            Kind::Jemalloc => "jemalloc",
            Kind::Lgalloc => "lgalloc",
            Kind::Buddy => "buddy_sys",
            Kind::Mmap => "mmap",
        }
    }

    /// Parses a name from [`Kind::name`].
    pub fn parse(s: &str) -> Option<Kind> {
        ALL.iter().copied().find(|k| k.name() == s)
    }

    /// Whether this is one of pagepool's front ends (a column ratios are taken for).
    pub fn is_pagepool(self) -> bool {
        matches!(
            self,
            Kind::Pagepool
                | Kind::PagepoolCache
                | Kind::PagepoolRaw
                | Kind::PagepoolPortable
                | Kind::PoolAlloc
        )
    }

    /// Whether the allocator serves blocks of `order`.
    pub fn supports(self, order: u8) -> bool {
        self != Kind::Lgalloc || order >= 9
    }
}

/// Work generic over an allocator: the visitor that [`Allocs::visit`] calls.
pub trait Job {
    /// The result.
    type Out;
    /// Runs on one allocator.
    fn run<A: PageAlloc>(&mut self, alloc: &A, kind: Kind) -> Self::Out;
}

/// A block pointer that may cross threads (the benchmark owns the block it points to).
pub struct Raw(pub NonNull<u8>);

// SAFETY: a `Raw` is the unique owner of its block, like a `Box`.
unsafe impl Send for Raw {}

// --- pagepool ---------------------------------------------------------------------------

/// pagepool's owned-block API.
pub struct Pool(pub PagePool);

impl PageAlloc for Pool {
    direct_local!();
    type Handle = pagepool::Block;
    #[inline]
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        self.0.alloc(order).ok()
    }
    #[inline]
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.as_ptr()
    }
    #[inline]
    unsafe fn free(&self, handle: Self::Handle, _order: u8) {
        self.0.free(handle);
    }
}

/// pagepool through raw pointers, as a runtime or an FFI boundary uses it.
pub struct PoolRaw(pub PagePool);

impl PageAlloc for PoolRaw {
    direct_local!();
    type Handle = Raw;
    #[inline]
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        self.0.alloc(order).ok().map(|b| Raw(b.into_raw()))
    }
    #[inline]
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.0.as_ptr()
    }
    #[inline]
    unsafe fn free(&self, handle: Self::Handle, _order: u8) {
        // SAFETY: the caller passes a block of this pool, not freed since.
        let freed = unsafe { self.0.free_raw(handle.0) };
        debug_assert!(freed.is_ok());
    }
}

/// pagepool's `GlobalAlloc` adapter, its own instance (leaked: an adapter with a built
/// pool must not move).
pub struct PoolAllocPages(pub &'static pagepool::PoolAlloc);

impl PoolAllocPages {
    /// An adapter over `capacity` bytes with its hinter started, as its docs tell a
    /// program to do from `main` (without it, idle memory stays resident).
    fn new(capacity: usize) -> Self {
        let adapter: &'static pagepool::PoolAlloc =
            Box::leak(Box::new(pagepool::PoolAlloc::with_config(
                pagepool::PoolBuilder::new()
                    .capacity(capacity)
                    .max_order(pagepool::GLOBAL_MAX_ORDER),
            )));
        adapter.start_hinter().expect("PoolAlloc: start the hinter");
        Self(adapter)
    }
}

impl PageAlloc for PoolAllocPages {
    direct_local!();
    type Handle = Raw;
    #[inline]
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        let size = size_of_order(order);
        let layout = std::alloc::Layout::from_size_align(size, 4096).ok()?;
        // SAFETY: a non-zero layout.
        NonNull::new(unsafe { std::alloc::GlobalAlloc::alloc(self.0, layout) }).map(Raw)
    }
    #[inline]
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.0.as_ptr()
    }
    #[inline]
    unsafe fn free(&self, handle: Self::Handle, order: u8) {
        let layout =
            std::alloc::Layout::from_size_align(size_of_order(order), 4096).expect("valid layout");
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::GlobalAlloc::dealloc(self.0, handle.0.as_ptr(), layout) };
    }
}

/// pagepool through a `LocalCache` per thread: each workload thread holds one, as a
/// worker using the cache would. The pool is leaked so the caches can borrow it freely.
pub struct PoolCached(pub &'static PagePool);

impl PageAlloc for PoolCached {
    type Handle = pagepool::Block;
    /// Outside a thread's cache (not used by the workloads).
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        self.0.alloc(order).ok()
    }
    #[inline]
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.as_ptr()
    }
    unsafe fn free(&self, handle: Self::Handle, _order: u8) {
        self.0.free(handle);
    }
    type Local<'a> = pagepool::LocalCache<'static>;
    fn local(&self) -> pagepool::LocalCache<'static> {
        self.0.local_cache()
    }
}

impl LocalAlloc for pagepool::LocalCache<'static> {
    type Handle = pagepool::Block;
    #[inline]
    fn alloc(&mut self, order: u8) -> Option<pagepool::Block> {
        pagepool::LocalCache::alloc(self, order).ok()
    }
    #[inline]
    unsafe fn free(&mut self, handle: pagepool::Block, _order: u8) {
        pagepool::LocalCache::free(self, handle);
    }
}

/// Settings for the pagepool instances the harness builds.
#[derive(Debug, Clone, Copy)]
pub struct PoolOpts {
    /// Hinter thread on.
    pub hinter: bool,
    /// Hint mode.
    pub mode: HintMode,
    /// Allocation policy.
    pub policy: AllocPolicy,
    /// Capture on.
    pub capture: bool,
    /// Capture reserves a region per waiter.
    pub capture_reserve: bool,
}

impl Default for PoolOpts {
    fn default() -> Self {
        Self {
            hinter: true,
            mode: HintMode::Free,
            policy: AllocPolicy::PreferUnhinted,
            capture: true,
            capture_reserve: true,
        }
    }
}

/// `--pool-shards N`: the shard count of every pagepool the harness builds (0: the
/// crate's default, one per CPU), so a claim can be measured over configurations.
pub static POOL_SHARDS: AtomicUsize = AtomicUsize::new(0);
/// `--pool-max-order N`: the largest order of every pagepool the harness builds (0: the
/// crate's default).
pub static POOL_MAX_ORDER: AtomicU8 = AtomicU8::new(0);

/// Builds a pagepool of `capacity` bytes; everything else default unless `opts` says.
pub fn build_pool(capacity: usize, opts: PoolOpts) -> PagePool {
    pool_builder(capacity, opts)
        .build()
        .expect("pagepool builds")
}

/// The builder of [`build_pool`].
pub fn pool_builder(capacity: usize, opts: PoolOpts) -> pagepool::PoolBuilder {
    let mut builder = PagePool::builder()
        .capacity(capacity)
        .hint_thread(opts.hinter)
        .hint_mode(opts.mode)
        .policy(opts.policy)
        .capture(opts.capture)
        .capture_reserve(opts.capture_reserve);
    match POOL_SHARDS.load(Ordering::Relaxed) {
        0 => {}
        shards => builder = builder.shards(shards),
    }
    match POOL_MAX_ORDER.load(Ordering::Relaxed) {
        0 => {}
        order => builder = builder.max_order(order),
    }
    builder
}

// --- system -----------------------------------------------------------------------------

/// glibc `posix_memalign` and `free`.
pub struct System;

impl PageAlloc for System {
    direct_local!();
    type Handle = Raw;
    #[inline]
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        let size = size_of_order(order);
        let mut out: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: `out` is a valid place for the result; size is a power-of-two multiple of
        // the pointer size, as posix_memalign requires of the alignment.
        let rc = unsafe { libc::posix_memalign(&mut out, size, size) };
        if rc != 0 {
            None
        } else {
            NonNull::new(out.cast()).map(Raw)
        }
    }
    #[inline]
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.0.as_ptr()
    }
    #[inline]
    unsafe fn free(&self, handle: Self::Handle, _order: u8) {
        // SAFETY: the caller passes a pointer from posix_memalign, freed once.
        unsafe { libc::free(handle.0.as_ptr().cast()) }
    }
}

// --- mimalloc / jemalloc through GlobalAlloc with a Layout -------------------------------

/// A `GlobalAlloc` used with an aligned layout (not installed as the global allocator).
pub struct Global<G>(pub G);

impl<G: GlobalAlloc + Sync> PageAlloc for Global<G> {
    direct_local!();
    type Handle = Raw;
    #[inline]
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        // SAFETY: the layout has a non-zero size.
        NonNull::new(unsafe { self.0.alloc(layout(order)) }).map(Raw)
    }
    #[inline]
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.0.as_ptr()
    }
    #[inline]
    unsafe fn free(&self, handle: Self::Handle, order: u8) {
        // SAFETY: the caller passes a block of this allocator allocated with this layout.
        unsafe { self.0.dealloc(handle.0.as_ptr(), layout(order)) }
    }
}

// --- lgalloc ----------------------------------------------------------------------------

/// lgalloc (2 MiB and larger size classes, thread-local caches, background `MADV_FREE`).
pub struct Lg;

impl Lg {
    /// Enables lgalloc with its background worker (as Materialize runs it).
    pub fn new() -> Self {
        let mut cfg = lgalloc::LgAlloc::new();
        cfg.enable()
            .with_background_config(lgalloc::BackgroundWorkerConfig {
                interval: std::time::Duration::from_secs(1),
                clear_bytes: 64 << 20,
            });
        lgalloc::lgalloc_set_config(&cfg);
        Lg
    }
}

impl PageAlloc for Lg {
    direct_local!();
    type Handle = (Raw, lgalloc::Handle);
    #[inline]
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        let (ptr, _, handle) = lgalloc::allocate::<u8>(size_of_order(order)).ok()?;
        Some((Raw(ptr), handle))
    }
    #[inline]
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.0.0.as_ptr()
    }
    #[inline]
    unsafe fn free(&self, handle: Self::Handle, _order: u8) {
        lgalloc::deallocate(handle.1);
    }
}

// --- buddy_system_allocator ------------------------------------------------------------

/// `buddy_system_allocator::LockedHeap` (one spin lock) over its own `MAP_NORESERVE` mapping.
pub struct Buddy {
    heap: buddy_system_allocator::LockedHeap<33>,
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the raw base pointer is only used to unmap in Drop; the heap is a locked heap.
unsafe impl Sync for Buddy {}
// SAFETY: as above.
unsafe impl Send for Buddy {}

impl Buddy {
    /// A heap over `capacity` bytes of fresh anonymous memory, aligned to 4 MiB (pagepool's
    /// chunk size) so both allocators see the same block alignment.
    pub fn new(capacity: usize) -> Self {
        let align = 4 << 20;
        let (base, len, start) = map_aligned(capacity, align).expect("mmap for buddy heap");
        let heap = buddy_system_allocator::LockedHeap::<33>::new();
        // SAFETY: [start, start + capacity) is a fresh private mapping that only this heap uses
        // and that lives until Drop.
        unsafe { heap.lock().init(start as usize, capacity) };
        Self { heap, base, len }
    }
}

impl Drop for Buddy {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no block outlives the heap.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

impl PageAlloc for Buddy {
    direct_local!();
    type Handle = Raw;
    #[inline]
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        self.heap.lock().alloc(layout(order)).ok().map(Raw)
    }
    #[inline]
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.0.as_ptr()
    }
    #[inline]
    unsafe fn free(&self, handle: Self::Handle, order: u8) {
        // SAFETY: the caller passes a block of this heap allocated with this layout.
        unsafe { self.heap.lock().dealloc(handle.0, layout(order)) };
    }
}

/// Maps `len` bytes (plus `align` slack) with `MAP_NORESERVE`; returns (base, mapped length,
/// aligned start).
fn map_aligned(len: usize, align: usize) -> Option<(*mut libc::c_void, usize, *mut u8)> {
    let total = len + align;
    // SAFETY: an anonymous private mapping at a kernel-chosen address has no preconditions.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let start = (base as usize).next_multiple_of(align) as *mut u8;
    Some((base, total, start))
}

// --- mmap per block ---------------------------------------------------------------------

/// One `mmap` per block, `munmap` on free. Blocks above 4 KiB are over-mapped by their size
/// and trimmed so they are aligned like everyone else's (two extra `munmap` calls).
pub struct Mmap;

impl PageAlloc for Mmap {
    direct_local!();
    type Handle = Raw;
    fn alloc(&self, order: u8) -> Option<Self::Handle> {
        let size = size_of_order(order);
        let over = if order == 0 { 0 } else { size };
        // SAFETY: an anonymous private mapping at a kernel-chosen address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size + over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let b = base as usize;
        let start = b.next_multiple_of(size);
        if over != 0 {
            let head = start - b;
            let tail = over - head;
            // SAFETY: both ranges lie inside the mapping just made and outside the block kept.
            unsafe {
                if head != 0 {
                    libc::munmap(base, head);
                }
                if tail != 0 {
                    libc::munmap((start + size) as *mut libc::c_void, tail);
                }
            }
        }
        NonNull::new(start as *mut u8).map(Raw)
    }
    fn ptr(handle: &Self::Handle) -> *mut u8 {
        handle.0.as_ptr()
    }
    unsafe fn free(&self, handle: Self::Handle, order: u8) {
        // SAFETY: the caller passes a block this allocator mapped with exactly this size.
        unsafe { libc::munmap(handle.0.as_ptr().cast(), size_of_order(order)) };
    }
}

// --- the set ----------------------------------------------------------------------------

/// Every allocator instance, built once per workload so rounds can interleave.
pub struct Allocs {
    /// pagepool.
    pub pool: Pool,
    /// A pool used through raw pointers.
    pub pool_raw: PoolRaw,
    /// A pool with the portable per-CPU caches.
    pub pool_portable: Pool,
    /// `PoolAlloc`, used directly.
    pub pool_alloc: PoolAllocPages,
    /// A second pool of the same size, used through per-thread `LocalCache`s (built only
    /// when asked for: it is leaked).
    pub pool_cached: Option<PoolCached>,
    /// glibc.
    pub system: System,
    /// mimalloc.
    pub mimalloc: Global<mimalloc::MiMalloc>,
    /// jemalloc.
    pub jemalloc: Global<tikv_jemallocator::Jemalloc>,
    /// lgalloc (built only when asked for: it starts a background thread).
    pub lgalloc: Option<Lg>,
    /// buddy_system_allocator.
    pub buddy: Buddy,
    /// mmap.
    pub mmap: Mmap,
}

impl Allocs {
    /// Builds every allocator; pagepool and the buddy heap get `capacity` bytes each.
    pub fn new(capacity: usize, kinds: &[Kind], opts: PoolOpts) -> Self {
        Self {
            pool: Pool(build_pool(capacity, opts)),
            pool_raw: PoolRaw(build_pool(capacity, opts)),
            pool_portable: Pool(
                pool_builder(capacity, opts)
                    .cpu_cache(pagepool::CpuCacheMode::Portable)
                    .build()
                    .expect("pagepool builds"),
            ),
            pool_alloc: PoolAllocPages::new(capacity),
            pool_cached: kinds
                .contains(&Kind::PagepoolCache)
                .then(|| PoolCached(Box::leak(Box::new(build_pool(capacity, opts))))),
            system: System,
            mimalloc: Global(mimalloc::MiMalloc),
            jemalloc: Global(tikv_jemallocator::Jemalloc),
            lgalloc: kinds.contains(&Kind::Lgalloc).then(Lg::new),
            buddy: Buddy::new(capacity),
            mmap: Mmap,
        }
    }

    /// Runs `job` on the allocator `kind`.
    pub fn visit<J: Job>(&self, kind: Kind, job: &mut J) -> J::Out {
        match kind {
            Kind::Pagepool => job.run(&self.pool, kind),
            Kind::PagepoolRaw => job.run(&self.pool_raw, kind),
            Kind::PagepoolPortable => job.run(&self.pool_portable, kind),
            Kind::PoolAlloc => job.run(&self.pool_alloc, kind),
            Kind::PagepoolCache => job.run(
                self.pool_cached
                    .as_ref()
                    .expect("pagepool+cache was requested"),
                kind,
            ),
            Kind::System => job.run(&self.system, kind),
            Kind::Mimalloc => job.run(&self.mimalloc, kind),
            Kind::Jemalloc => job.run(&self.jemalloc, kind),
            Kind::Lgalloc => job.run(self.lgalloc.as_ref().expect("lgalloc was requested"), kind),
            Kind::Buddy => job.run(&self.buddy, kind),
            Kind::Mmap => job.run(&self.mmap, kind),
        }
    }
}

/// Writes one byte of the block (the target figures touched one byte per block).
#[inline(always)]
pub fn touch(ptr: *mut u8) {
    // SAFETY: callers pass the first byte of a live block they own.
    unsafe { ptr.write_volatile(1) };
}

/// Writes one byte in every 4 KiB page of a block (memory workloads: makes it resident).
#[inline]
pub fn touch_pages(ptr: *mut u8, order: u8) {
    for page in 0..(1usize << order) {
        // SAFETY: `ptr` starts a live block of `4 KiB << order` bytes that the caller owns.
        unsafe { ptr.add(page << 12).write_volatile(1) };
    }
}
