//! `PoolAlloc::stats` counts page blocks exactly, whatever the number of threads: the
//! first threads of the process count in slots of their own, later ones in a shared one.

use std::alloc::{GlobalAlloc, Layout};

use pagepool::{PoolAlloc, PoolBuilder};

static POOL: PoolAlloc = PoolAlloc::with_config(PoolBuilder::new().capacity(512 << 20));

#[test]
fn page_block_counts_are_exact_across_more_threads_than_slots() {
    // 64 KiB: above the small-object sizes, below the direct-mapping floor.
    let layout = Layout::from_size_align(64 << 10, 4096).unwrap();
    const THREADS: usize = 150;
    const EACH: usize = 200;
    const KEPT: usize = 20;
    let before = POOL.stats();
    let kept: Vec<Vec<usize>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut kept = Vec::new();
                    for i in 0..EACH {
                        // SAFETY: a valid, non-zero layout.
                        let p = unsafe { POOL.alloc(layout) };
                        assert!(!p.is_null() && POOL.contains(p), "a pool block");
                        if i < KEPT {
                            kept.push(p as usize);
                        } else {
                            // SAFETY: allocated above with `layout`.
                            unsafe { POOL.dealloc(p, layout) };
                        }
                    }
                    kept
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    // The kept blocks are freed here, on another thread than their allocator's.
    for p in kept.into_iter().flatten() {
        // SAFETY: allocated by a worker with `layout`, not freed since.
        unsafe { POOL.dealloc(p as *mut u8, layout) };
    }
    let after = POOL.stats();
    let n = (THREADS * EACH) as u64;
    assert_eq!(after.pool_allocs - before.pool_allocs, n, "{after}");
    assert_eq!(after.pool_frees - before.pool_frees, n, "{after}");
}

/// An adapter of its own: the other test's threads move `POOL`'s counters meanwhile.
static ROUTING: PoolAlloc = PoolAlloc::with_config(PoolBuilder::new().capacity(64 << 20));

#[test]
fn requests_up_to_the_slab_limit_are_objects_and_larger_ones_page_blocks() {
    let limit = pagepool::SLAB_OBJECT_LIMIT;
    for (size, align, object) in [
        (limit, 8, true),
        (limit, limit, true),
        (limit + 1, 8, false),
        (limit * 2, 8, false),
        (limit - 100, 64, true),
    ] {
        let layout = Layout::from_size_align(size, align).unwrap();
        let before = ROUTING.stats();
        // SAFETY: a valid, non-zero layout.
        let p = unsafe { ROUTING.alloc(layout) };
        assert!(!p.is_null() && ROUTING.contains(p) && (p as usize).is_multiple_of(align));
        // SAFETY: `p` holds `size` bytes.
        unsafe { p.write_bytes(0x5a, size) };
        let during = ROUTING.stats();
        let objects = during.slab_live_objects - before.slab_live_objects;
        let blocks = during.pool_allocs - before.pool_allocs;
        assert_eq!(
            (objects, blocks),
            if object { (1, 0) } else { (0, 1) },
            "{size} B aligned to {align}: {during}"
        );
        // SAFETY: allocated above with `layout`.
        unsafe { ROUTING.dealloc(p, layout) };
    }
}
