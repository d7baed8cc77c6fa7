//! Every misuse of the API, and what the user gets: a typed error (and the pool unchanged)
//! or a documented panic (and the pool unchanged).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::time::Duration;

use pagepool::{
    AllocError, BuildError, FreeError, MAX_SHARDS, MAX_SUPPORTED_ORDER, PagePool, PoolBuilder,
    Stats, block_size, order_for,
};

mod common;

use common::assert_balanced;

const MIB: usize = 1 << 20;

fn builder() -> PoolBuilder {
    PagePool::builder()
        .capacity(16 * MIB)
        .max_order(10)
        .shards(2)
        .hint_thread(false)
}

/// A pool with some allocated blocks, some cached frees and some merged free memory, so
/// that a misuse has something to corrupt.
fn busy_pool() -> (PagePool, Vec<pagepool::Block>) {
    let pool = builder().build().unwrap();
    let mut live = Vec::new();
    for i in 0..40usize {
        live.push(pool.alloc_on(i, (i % 5) as u8).unwrap());
    }
    // Free every third one: some stay cached, some merge.
    let mut keep = Vec::new();
    for (i, block) in live.into_iter().enumerate() {
        if i % 3 == 0 {
            pool.free(block)
        } else {
            keep.push(block)
        }
    }
    pool.check_consistency().unwrap();
    (pool, keep)
}

/// Runs `misuse` and checks the pool is exactly as before, counters and audit.
fn unchanged<R>(pool: &PagePool, misuse: impl FnOnce() -> R) -> R {
    let before = pool.stats();
    let result = misuse();
    let after = pool.stats();
    assert_eq!(
        before, after,
        "the pool changed:\nbefore\n{before}\nafter\n{after}"
    );
    assert_balanced(pool);
    result
}

fn release(pool: PagePool, live: Vec<pagepool::Block>) {
    for block in live {
        pool.free(block);
    }
    pool.drain_caches();
    let s = pool.stats();
    assert_eq!(s.free_bytes, s.capacity as u64);
    pool.check_consistency().unwrap();
}

// --- build ----------------------------------------------------------------------------------

#[test]
fn build_rejects_zero_capacity() {
    let err = PagePool::builder()
        .capacity(0)
        .hint_thread(false)
        .build()
        .unwrap_err();
    assert!(matches!(err, BuildError::ZeroCapacity), "{err:?}");
    assert!(!err.to_string().is_empty());
}

#[test]
fn build_rejects_capacity_below_one_max_block() {
    let err = PagePool::builder()
        .capacity(4 * MIB - 4096)
        .max_order(10)
        .hint_thread(false)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, BuildError::CapacityTooSmall { capacity, min } if capacity == 4 * MIB - 4096 && min == 4 * MIB),
        "{err:?}"
    );
    // One byte is too small even at order 0.
    let err = PagePool::builder()
        .capacity(1)
        .max_order(0)
        .hint_thread(false)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::CapacityTooSmall {
                capacity: 1,
                min: 4096
            }
        ),
        "{err:?}"
    );
    // Exactly one block is fine, and a ragged capacity is rounded down to whole chunks.
    let pool = PagePool::builder()
        .capacity(4 * MIB + 4095)
        .max_order(10)
        .hint_thread(false)
        .build()
        .unwrap();
    assert_eq!(pool.capacity(), 4 * MIB);
}

#[test]
fn build_rejects_impossible_capacity() {
    let err = PagePool::builder()
        .capacity(usize::MAX)
        .hint_thread(false)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::CapacityTooLarge {
                capacity: usize::MAX
            }
        ),
        "{err:?}"
    );
    // 2^32 frames is one too many for the frame table's u32 indices.
    let err = PagePool::builder()
        .capacity(16 << 40)
        .hint_thread(false)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, BuildError::CapacityTooLarge { .. }),
        "{err:?}"
    );
}

#[test]
fn build_rejects_max_order_above_the_limit() {
    for order in [MAX_SUPPORTED_ORDER + 1, 32, u8::MAX] {
        let err = PagePool::builder()
            .capacity(16 * MIB)
            .max_order(order)
            .hint_thread(false)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, BuildError::MaxOrderTooLarge { max_order, limit } if max_order == order && limit == MAX_SUPPORTED_ORDER),
            "{err:?}"
        );
    }
}

#[test]
fn build_rejects_zero_and_too_many_shards() {
    let err = builder().shards(0).build().unwrap_err();
    assert!(matches!(err, BuildError::ZeroShards), "{err:?}");
    for shards in [MAX_SHARDS + 1, usize::MAX] {
        let err = builder().shards(shards).build().unwrap_err();
        assert!(
            matches!(err, BuildError::TooManyShards { shards: s } if s == shards),
            "{err:?}"
        );
    }
    assert_eq!(
        builder().shards(MAX_SHARDS).build().unwrap().shard_count(),
        MAX_SHARDS
    );
}

/// The setting a build error names, for settings out of range.
fn rejected(builder: PoolBuilder) -> &'static str {
    match builder.build().unwrap_err() {
        BuildError::InvalidSetting { setting, .. } => setting,
        other => panic!("expected InvalidSetting, got {other:?}"),
    }
}

#[test]
fn build_rejects_out_of_range_hint_settings() {
    assert_eq!(
        rejected(builder().hint_batch_blocks(0)),
        "hint_batch_blocks"
    );
    assert_eq!(
        rejected(builder().hint_batch_blocks(1025)),
        "hint_batch_blocks"
    );
    assert_eq!(
        rejected(builder().hint_batch_blocks(usize::MAX)),
        "hint_batch_blocks"
    );
    assert_eq!(rejected(builder().hint_high_water(0)), "hint_high_water");
    // A zero budget would never hint; any other budget hints at least a block per pass.
    assert_eq!(rejected(builder().hint_pass_bytes(0)), "hint_pass_bytes");
    builder().hint_pass_bytes(1).build().unwrap();
    builder().hint_pass_bytes(4096).build().unwrap();
    // Durations beyond what the 32-bit millisecond stamps can compare.
    assert_eq!(rejected(builder().hint_delay(Duration::MAX)), "hint_delay");
    assert_eq!(
        rejected(builder().hint_interval(Duration::MAX)),
        "hint_interval"
    );
    let limit = pagepool::MAX_HINT_DURATION;
    builder()
        .hint_delay(limit)
        .hint_interval(limit)
        .build()
        .unwrap();
    assert_eq!(
        rejected(builder().hint_delay(limit + Duration::from_millis(1))),
        "hint_delay"
    );
    // A capture order above the largest block would silently turn capture off.
    assert_eq!(
        rejected(builder().capture_min_order(200)),
        "capture_min_order"
    );
    assert_eq!(
        rejected(builder().capture_min_order(11)),
        "capture_min_order"
    );
    builder().capture_min_order(10).build().unwrap();
    // The default capture order follows a small max_order down; hint_min_order is clamped.
    let pool = builder()
        .max_order(2)
        .capacity(block_size(2))
        .hint_min_order(200)
        .build()
        .unwrap();
    let block = pool.alloc(2).unwrap();
    // Order 2 waits (capture's order is min(3, max_order)) and times out.
    assert_eq!(
        pool.alloc_wait(2, Duration::ZERO).unwrap_err(),
        AllocError::Timeout { order: 2 }
    );
    pool.free(block);
    let err = builder().hint_delay(Duration::MAX).build().unwrap_err();
    assert!(err.to_string().contains("hint_delay"), "{err}");
}

// --- allocation -----------------------------------------------------------------------------

#[test]
fn alloc_above_max_order_is_an_error() {
    let (pool, live) = busy_pool();
    for order in [11, MAX_SUPPORTED_ORDER, MAX_SUPPORTED_ORDER + 1, u8::MAX] {
        let err = unchanged(&pool, || pool.alloc(order)).unwrap_err();
        assert_eq!(
            err,
            AllocError::OrderTooLarge {
                order,
                max_order: 10
            }
        );
        let err = unchanged(&pool, || pool.alloc_zeroed(order)).unwrap_err();
        assert_eq!(
            err,
            AllocError::OrderTooLarge {
                order,
                max_order: 10
            }
        );
        let err = unchanged(&pool, || pool.alloc_on(1, order)).unwrap_err();
        assert_eq!(
            err,
            AllocError::OrderTooLarge {
                order,
                max_order: 10
            }
        );
        let err = unchanged(&pool, || pool.alloc_wait(order, Duration::ZERO)).unwrap_err();
        assert_eq!(
            err,
            AllocError::OrderTooLarge {
                order,
                max_order: 10
            }
        );
        let err = unchanged(&pool, || {
            pool.alloc_with_reclaim(order, || panic!("not called"))
        })
        .unwrap_err();
        assert_eq!(
            err,
            AllocError::OrderTooLarge {
                order,
                max_order: 10
            }
        );
    }
    release(pool, live);
}

#[test]
fn alloc_on_any_shard_index_wraps() {
    let pool = builder().build().unwrap();
    let block = pool.alloc_on(usize::MAX, 0).unwrap();
    pool.free(block);
}

#[test]
fn alloc_bytes_of_impossible_sizes() {
    let (pool, live) = busy_pool();
    let err = unchanged(&pool, || pool.alloc_bytes(0)).unwrap_err();
    assert_eq!(err, AllocError::UnsupportedLayout { size: 0, align: 1 });
    for size in [
        usize::MAX,
        usize::MAX / 2,
        block_size(MAX_SUPPORTED_ORDER) + 1,
    ] {
        let err = unchanged(&pool, || pool.alloc_bytes(size)).unwrap_err();
        assert_eq!(err, AllocError::UnsupportedLayout { size, align: 1 });
    }
    // Above this pool's largest block but within the supported orders: OrderTooLarge.
    let err = unchanged(&pool, || pool.alloc_bytes(block_size(10) + 1)).unwrap_err();
    assert_eq!(
        err,
        AllocError::OrderTooLarge {
            order: 11,
            max_order: 10
        }
    );
    // The largest size that fits works.
    let block = pool.alloc_bytes(block_size(10)).unwrap();
    assert_eq!(block.order(), 10);
    pool.free(block);
    assert_eq!(order_for(1, 3), None, "alignment must be a power of two");
    assert_eq!(order_for(1, 0), None);
    release(pool, live);
}

#[test]
fn exhaustion_is_an_error_not_a_panic() {
    let (pool, mut live) = busy_pool();
    // Take everything, largest first.
    for order in (0..=10u8).rev() {
        while let Ok(block) = pool.alloc(order) {
            live.push(block);
        }
    }
    assert_eq!(pool.stats().free_bytes, 0);
    pool.drain_caches();
    for order in 0..=10 {
        assert_eq!(
            unchanged(&pool, || pool.alloc(order)).unwrap_err(),
            AllocError::Exhausted { order }
        );
        assert_eq!(
            unchanged(&pool, || pool.alloc_zeroed(order)).unwrap_err(),
            AllocError::Exhausted { order }
        );
        assert_eq!(
            unchanged(&pool, || pool.alloc_on(1, order)).unwrap_err(),
            AllocError::Exhausted { order }
        );
    }
    // Small orders never wait; large ones time out without leaking or changing anything
    // but the capture counters.
    assert_eq!(
        pool.alloc_wait(2, Duration::from_millis(1)).unwrap_err(),
        AllocError::Exhausted { order: 2 }
    );
    let before = pool.stats();
    assert_eq!(
        pool.alloc_wait(5, Duration::from_millis(5)).unwrap_err(),
        AllocError::Timeout { order: 5 }
    );
    let after = pool.stats();
    assert_eq!(after.capture.timeouts, before.capture.timeouts + 1);
    assert_eq!(after.capture.waiting, 0);
    assert_eq!(
        Stats {
            capture: before.capture,
            ..after.clone()
        },
        before
    );
    assert_balanced(&pool);
    // A reclaim callback that frees nothing gives up.
    let mut calls = 0;
    let err = pool
        .alloc_with_reclaim(6, || {
            calls += 1;
            false
        })
        .unwrap_err();
    assert_eq!(
        err,
        AllocError::ReclaimFailed {
            order: 6,
            rounds: 0
        }
    );
    assert_eq!(calls, 1);
    assert_eq!(pool.stats().capture.waiting, 0);
    assert_balanced(&pool);
    release(pool, live);
}

// --- free -----------------------------------------------------------------------------------

#[test]
fn raw_free_outside_the_region() {
    let (pool, live) = busy_pool();
    let other = builder().build().unwrap();
    let foreign = other.alloc(0).unwrap();
    let mut on_stack = [0u8; 16];
    // Chunk 0 is handed out first, so the lowest live block's chunk starts the region.
    let base = live.iter().map(|b| b.as_ptr() as usize).min().unwrap() & !(4 * MIB - 1);
    assert!(pool.contains(base as *const u8) && !pool.contains((base - 1) as *const u8));
    let candidates = [
        NonNull::new(on_stack.as_mut_ptr()).unwrap(),
        foreign.as_non_null(),
        NonNull::new(usize::MAX as *mut u8).unwrap(),
        NonNull::<u64>::dangling().cast(),
    ];
    for ptr in candidates {
        assert!(!pool.contains(ptr.as_ptr()));
        // SAFETY: the pool must reject a pointer outside its region before touching it.
        let err = unchanged(&pool, || unsafe { pool.free_raw(ptr) }).unwrap_err();
        assert_eq!(err, FreeError::OutsideRegion);
        // SAFETY: as above.
        let err = unchanged(&pool, || unsafe { pool.free_raw_order(ptr, 0) }).unwrap_err();
        assert_eq!(err, FreeError::OutsideRegion);
        // SAFETY: as above.
        let err = unchanged(&pool, || unsafe { pool.block_from_raw(ptr) }).unwrap_err();
        assert_eq!(err, FreeError::OutsideRegion);
        assert_eq!(pool.order_of(ptr.as_ptr()), Err(FreeError::OutsideRegion));
    }
    // Just before the start and just past the end of the region.
    for addr in [
        base - 4096,
        base - 1,
        base + pool.capacity(),
        base + pool.capacity() + 4096,
    ] {
        let ptr = NonNull::new(addr as *mut u8).unwrap();
        // SAFETY: outside the region: rejected before anything is touched.
        let err = unchanged(&pool, || unsafe { pool.free_raw(ptr) }).unwrap_err();
        assert_eq!(err, FreeError::OutsideRegion, "{addr:#x}");
    }
    other.free(foreign);
    release(pool, live);
}

#[test]
fn raw_free_not_at_a_block_start() {
    let (pool, live) = busy_pool();
    for block in &live {
        let start = block.as_ptr() as usize;
        let mut addrs = vec![start + 1, start + 4095, start + block.len() / 2 + 8];
        if block.order() > 0 {
            // Interior pointers, frame aligned.
            addrs.extend([
                start + 4096,
                start + block.len() - 4096,
                start + block.len() / 2,
            ]);
        }
        for addr in addrs {
            let ptr = NonNull::new(addr as *mut u8).unwrap();
            // SAFETY: not a block start: the pool must refuse it.
            let err = unchanged(&pool, || unsafe { pool.free_raw(ptr) }).unwrap_err();
            assert_eq!(
                err,
                FreeError::NotBlockStart,
                "{addr:#x} in block {start:#x} order {}",
                block.order()
            );
            // SAFETY: as above.
            let err = unchanged(&pool, || unsafe { pool.free_raw_order(ptr, block.order()) })
                .unwrap_err();
            assert_eq!(err, FreeError::NotBlockStart);
            assert_eq!(pool.order_of(ptr.as_ptr()), Err(FreeError::NotBlockStart));
        }
    }
    release(pool, live);
}

#[test]
fn raw_double_free() {
    let (pool, mut live) = busy_pool();
    // A block freed through the cache, one merged into a larger free block, one whose
    // chunk went back to the shared pool, and a fresh chunk never handed out.
    let cached = pool.alloc_on(0, 0).unwrap().into_raw();
    // SAFETY: a live block, freed once.
    assert_eq!(unsafe { pool.free_raw(cached) }, Ok(0));
    // SAFETY: freed already: the pool must refuse it.
    let err = unchanged(&pool, || unsafe { pool.free_raw(cached) }).unwrap_err();
    assert_eq!(err, FreeError::AlreadyFree);
    // SAFETY: as above.
    let err = unchanged(&pool, || unsafe { pool.free_raw_order(cached, 0) }).unwrap_err();
    assert_eq!(err, FreeError::AlreadyFree);

    let big = pool.alloc_on(1, 6).unwrap().into_raw();
    // SAFETY: a live block, freed once.
    assert_eq!(unsafe { pool.free_raw(big) }, Ok(6));
    pool.drain_caches();
    // SAFETY: freed already.
    let err = unchanged(&pool, || unsafe { pool.free_raw(big) }).unwrap_err();
    assert!(
        matches!(err, FreeError::AlreadyFree | FreeError::NotBlockStart),
        "{err:?}"
    );

    let chunk = pool.alloc(10).unwrap().into_raw();
    // SAFETY: a live block, freed once.
    assert_eq!(unsafe { pool.free_raw(chunk) }, Ok(10));
    // SAFETY: freed already.
    let err = unchanged(&pool, || unsafe { pool.free_raw(chunk) }).unwrap_err();
    assert_eq!(err, FreeError::AlreadyFree);

    // Every block freed twice in a row, whatever its order.
    for i in 0..live.len() / 2 {
        let block = live.swap_remove(i);
        let order = block.order();
        let ptr = block.into_raw();
        // SAFETY: a live block, freed once.
        assert_eq!(unsafe { pool.free_raw(ptr) }, Ok(order));
        // SAFETY: freed already.
        let err = unchanged(&pool, || unsafe { pool.free_raw(ptr) }).unwrap_err();
        assert!(
            matches!(err, FreeError::AlreadyFree | FreeError::NotBlockStart),
            "{err:?}"
        );
    }
    release(pool, live);
}

#[test]
fn raw_free_of_a_never_used_chunk() {
    let pool = builder().build().unwrap();
    let block = pool.alloc(0).unwrap();
    // The chunk after the first one was never handed out.
    let fresh = block.as_ptr() as usize + block_size(10);
    let ptr = NonNull::new(fresh as *mut u8).unwrap();
    // SAFETY: never allocated: the pool must refuse it.
    let err = unchanged(&pool, || unsafe { pool.free_raw(ptr) }).unwrap_err();
    assert!(
        matches!(err, FreeError::AlreadyFree | FreeError::NotBlockStart),
        "{err:?}"
    );
    pool.free(block);
}

#[test]
fn raw_free_with_the_wrong_order() {
    let (pool, live) = busy_pool();
    for block in &live {
        let actual = block.order();
        for given in [0u8, 1, 3, 10, 11, u8::MAX] {
            if given == actual {
                continue;
            }
            // SAFETY: the wrong order must be refused before anything is freed.
            let err = unchanged(&pool, || unsafe {
                pool.free_raw_order(block.as_non_null(), given)
            })
            .unwrap_err();
            assert_eq!(err, FreeError::WrongOrder { given, actual });
        }
    }
    release(pool, live);
}

#[test]
#[should_panic(expected = "Block from pool")]
fn free_of_a_block_from_another_pool_panics() {
    let a = builder().build().unwrap();
    let b = builder().build().unwrap();
    let block = a.alloc(0).unwrap();
    b.free(block);
}

#[test]
fn a_foreign_block_panic_changes_neither_pool() {
    let (a, a_live) = busy_pool();
    let (b, b_live) = busy_pool();
    let foreign = a.alloc(2).unwrap();
    let foreign_ptr = foreign.as_ptr();
    let (a_before, b_before) = (a.stats(), b.stats());
    let result = catch_unwind(AssertUnwindSafe(|| b.free(foreign)));
    assert!(result.is_err(), "freeing a foreign Block must panic");
    assert_eq!(a.stats(), a_before);
    assert_eq!(b.stats(), b_before);
    a.check_consistency().unwrap();
    b.check_consistency().unwrap();

    let mut foreign = a.alloc(3).unwrap();
    let before = b.stats();
    assert!(catch_unwind(AssertUnwindSafe(|| b.try_grow(&mut foreign, 4))).is_err());
    assert!(catch_unwind(AssertUnwindSafe(|| b.shrink(&mut foreign, 1))).is_err());
    assert_eq!(b.stats(), before);
    b.check_consistency().unwrap();
    // The block is still fine in its own pool; the one that panicked leaked (it was moved
    // into the panicking call), so free it through its pointer.
    a.free(foreign);
    // SAFETY: the block behind `foreign_ptr` was never freed.
    assert_eq!(
        unsafe { a.free_raw(NonNull::new(foreign_ptr).unwrap()) },
        Ok(2)
    );
    release(a, a_live);
    release(b, b_live);
}

#[test]
fn shrink_to_a_larger_order_panics_and_changes_nothing() {
    let pool = builder().build().unwrap();
    let mut block = pool.alloc(2).unwrap();
    let before = pool.stats();
    assert!(catch_unwind(AssertUnwindSafe(|| pool.shrink(&mut block, 3))).is_err());
    assert_eq!(block.order(), 2);
    assert_eq!(pool.stats(), before);
    pool.check_consistency().unwrap();
    // Growing beyond the maximum order fails quietly.
    assert!(!unchanged(&pool, || pool.try_grow(&mut block, 11)));
    assert!(!unchanged(&pool, || pool.try_grow(&mut block, u8::MAX)));
    pool.free(block);
}
