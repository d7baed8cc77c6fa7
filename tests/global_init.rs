//! Building a `Backing::Mmap` pool allocates nothing through the global allocator. The
//! global allocator here is a counting wrapper around `System`; the pools under test are
//! separate `PoolAlloc` statics, built on the test's own thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use pagepool::{Backing, PoolAlloc, PoolBuilder};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to System; counting touches only a const thread-local without Drop.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

static DEFAULT: PoolAlloc = PoolAlloc::new();
static HEAP: PoolAlloc =
    PoolAlloc::with_config(PoolBuilder::new().backing(Backing::Heap).capacity(8 << 20));

#[test]
fn mmap_pool_builds_without_global_allocations() {
    // The counter sees this thread's allocations.
    let before = allocs();
    let b = Box::new([1u8; 100]);
    assert_eq!(allocs(), before + 1);
    drop(b);

    // Default configuration: shard count from the affinity mask, capacity from sysconf,
    // region, frame table and shards from mmap.
    let before = allocs();
    // SAFETY: non-zero size; freed below with the same layout.
    let p = unsafe { DEFAULT.alloc(Layout::from_size_align(1 << 20, 4096).unwrap()) };
    let after = allocs();
    assert!(DEFAULT.contains(p), "served by the freshly built pool");
    assert_eq!(
        after, before,
        "building the pool allocated through the global allocator"
    );
    // SAFETY: allocated above with this layout.
    unsafe { DEFAULT.dealloc(p, Layout::from_size_align(1 << 20, 4096).unwrap()) };
    assert_eq!(allocs(), before, "dealloc allocated");
    assert_eq!(DEFAULT.stats().nested, 0);

    // The check can fail: a heap-backed pool takes its region from the global allocator.
    let before = allocs();
    HEAP.init().unwrap();
    assert!(
        allocs() > before,
        "a heap-backed pool should be seen allocating"
    );
}

static BROKEN: PoolAlloc = PoolAlloc::with_config(PoolBuilder::new().capacity(0));
static SWITCHED: PoolAlloc =
    PoolAlloc::with_config(PoolBuilder::new().capacity(64 << 20).max_order(10));

#[test]
fn a_pool_that_cannot_be_built_leaves_everything_to_the_fallback() {
    let layout = Layout::from_size_align(1 << 20, 8).unwrap();
    // SAFETY: non-zero size; freed below with the same layout.
    let p = unsafe { BROKEN.alloc(layout) };
    assert!(!p.is_null());
    assert!(!BROKEN.contains(p));
    // SAFETY: allocated above with `layout`.
    unsafe { BROKEN.dealloc(p, layout) };
    assert!(matches!(
        BROKEN.init(),
        Err(pagepool::BuildError::ZeroCapacity)
    ));
    assert!(!BROKEN.stats().pool_ready);
    assert!(BROKEN.pool_stats().is_none());
}

#[test]
fn switching_the_pool_off_routes_new_requests_to_the_fallback() {
    let layout = Layout::from_size_align(64 << 10, 8).unwrap();
    // SAFETY (whole test): every pointer is freed with the layout it was allocated with.
    unsafe {
        let a = SWITCHED.alloc(layout);
        assert!(SWITCHED.contains(a));
        SWITCHED.set_pool_enabled(false);
        let b = SWITCHED.alloc(layout);
        assert!(!SWITCHED.contains(b));
        // Growing a fallback block does not move it into a disabled pool ...
        let b = SWITCHED.realloc(b, layout, 256 << 10);
        assert!(!SWITCHED.contains(b));
        // ... a pool block that must move to grow does not take a new pool block ...
        let held = SWITCHED.alloc(layout); // still the pool's? no: the pool is off
        assert!(!SWITCHED.contains(held));
        let c = SWITCHED.realloc(a, layout, 8 << 20);
        assert!(
            !SWITCHED.contains(c),
            "realloc took a pool block while switched off"
        );
        let big = Layout::from_size_align(8 << 20, 8).unwrap();
        // ... and a pool block is still freed to the pool.
        SWITCHED.dealloc(c, big);
        SWITCHED.dealloc(held, layout);
        SWITCHED.dealloc(b, Layout::from_size_align(256 << 10, 8).unwrap());
        SWITCHED.set_pool_enabled(true);
    }
    assert_eq!(SWITCHED.pool_stats().unwrap().allocated_bytes, 0);
    assert_eq!(SWITCHED.stats().pool_allocs, 1);
}
