//! `LocalCache`: a caller-owned cache in front of the shards. Accounting, bad input,
//! capture, and blocks crossing between caches and threads.

use std::sync::Mutex;
use std::time::Duration;

use pagepool::{AllocError, Block, FreeError};
use rayon::prelude::*;

mod common;

use common::{assert_all_free, quiet};

#[test]
fn blocks_cycle_through_the_cache_and_go_back_on_drop() {
    let pool = quiet(4, 1).build().unwrap();
    let mut cache = pool.local_cache_with(8);
    let a = cache.alloc(0).unwrap();
    // The refill took half the limit: one handed out, three kept.
    assert_eq!(cache.held_bytes(), 3 * 4096);
    let s = pool.stats();
    assert_eq!(s.local_cache_bytes, 3 * 4096, "{s}");
    assert_eq!(
        s.allocated_bytes,
        4 * 4096,
        "cached blocks count as allocated:\n{s}"
    );
    let addr = a.as_ptr();
    cache.free(a);
    assert_eq!(cache.held_bytes(), 4 * 4096);
    let b = cache.alloc(0).unwrap();
    assert_eq!(b.as_ptr(), addr, "the hottest block comes back first");
    pool.check_consistency().unwrap();
    cache.free(b);
    drop(cache);
    assert_all_free(&pool);
}

#[test]
fn a_full_order_spills_half_to_the_pool() {
    let pool = quiet(4, 1).build().unwrap();
    let mut cache = pool.local_cache_with(8);
    let blocks: Vec<Block> = (0..40).map(|_| pool.alloc(1).unwrap()).collect();
    for block in blocks {
        cache.free(block);
        assert!(cache.held_bytes() <= 8 * 8192, "{cache:?}");
    }
    assert_eq!(pool.stats().local_cache_bytes, cache.held_bytes() as u64);
    pool.check_consistency().unwrap();
    cache.flush();
    assert_eq!(cache.held_bytes(), 0);
    assert_all_free(&pool);
}

#[test]
fn limits_halve_above_order_3_and_zero_caches_nothing() {
    let pool = quiet(8, 1).build().unwrap();
    let mut cache = pool.local_cache_with(16);
    let blocks: Vec<Block> = (0..4).map(|_| pool.alloc(9).unwrap()).collect();
    for block in blocks {
        cache.free(block);
    }
    // Order 9: 16 >> 6 = 0, so the limit is one block; a second free spills the first.
    assert_eq!(cache.held_bytes(), 2 << 20);
    drop(cache);
    let mut none = pool.local_cache_with(0);
    let block = none.alloc(0).unwrap();
    assert_eq!(none.held_bytes(), 0);
    none.free(block);
    assert_eq!(pool.stats().allocated_bytes, 0);
    drop(none);
    assert_all_free(&pool);
}

#[test]
fn a_raw_free_of_a_cached_block_is_a_double_free() {
    let pool = quiet(1, 1).build().unwrap();
    let mut cache = pool.local_cache();
    let block = cache.alloc(0).unwrap();
    let ptr = block.as_non_null();
    cache.free(block);
    // SAFETY: deliberately a double free: the pool must refuse it.
    let err = unsafe { pool.free_raw(ptr) }.unwrap_err();
    assert_eq!(err, FreeError::AlreadyFree);
    assert_eq!(pool.order_of(ptr.as_ptr()), Err(FreeError::AlreadyFree));
    pool.check_consistency().unwrap();
    drop(cache);
    assert_all_free(&pool);
}

#[test]
fn bad_orders_and_exhaustion_are_errors() {
    let pool = quiet(1, 1).build().unwrap();
    let mut cache = pool.local_cache();
    assert_eq!(
        cache.alloc(11).unwrap_err(),
        AllocError::OrderTooLarge {
            order: 11,
            max_order: 10
        }
    );
    let whole = cache.alloc(10).unwrap();
    assert_eq!(
        cache.alloc(0).unwrap_err(),
        AllocError::Exhausted { order: 0 }
    );
    cache.free(whole);
    pool.check_consistency().unwrap();
    drop(cache);
    assert_all_free(&pool);
}

#[test]
#[should_panic(expected = "freed to pool")]
fn a_block_of_another_pool_panics() {
    let pool = quiet(1, 1).build().unwrap();
    let other = quiet(1, 1).build().unwrap();
    let mut cache = pool.local_cache();
    cache.free(other.alloc(0).unwrap());
}

#[test]
fn zeroed_blocks_are_zero_even_from_the_cache() {
    let pool = quiet(1, 1).build().unwrap();
    let mut cache = pool.local_cache();
    let mut block = cache.alloc(2).unwrap();
    block.as_mut_slice().fill(0xa5);
    cache.free(block);
    let block = cache.alloc_zeroed(2).unwrap();
    assert!(block.as_slice().iter().all(|&b| b == 0));
    cache.free(block);
    drop(cache);
    assert_all_free(&pool);
}

#[test]
fn while_a_capture_request_waits_frees_go_to_the_pool() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let mut cache = pool.local_cache();
    let mut blocks: Vec<Block> = std::iter::from_fn(|| cache.alloc(0).ok()).collect();
    assert_eq!(blocks.len(), 1024);
    blocks.sort_by_key(|b| b.as_ptr() as usize);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| pool.alloc_wait(3, Duration::from_secs(30)));
        while pool.stats().capture.waiting == 0 {
            std::thread::yield_now();
        }
        // Eight aligned frames: with the cache bypassed they merge into an order-3 block.
        for block in blocks.drain(..8) {
            cache.free(block);
        }
        let got = waiter
            .join()
            .unwrap()
            .expect("the frees merge for the waiter");
        pool.free(got);
    });
    for block in blocks {
        cache.free(block);
    }
    drop(cache);
    assert_all_free(&pool);
}

/// Rayon workers, each with its own cache, allocate, write an owner pattern, and pass
/// blocks to each other through a shared pile; every block is checked before it is freed,
/// sometimes into another worker's cache, sometimes to the pool directly.
#[test]
fn blocks_cross_between_caches_and_threads() {
    let pool = quiet(16, 4).build().unwrap();
    let pile: Mutex<Vec<(Block, u64)>> = Mutex::new(Vec::new());
    (0..8u64).into_par_iter().for_each_init(
        || pool.local_cache_with(8),
        |cache, worker| {
            for i in 0..4000u64 {
                let tag = worker << 32 | i;
                let order = [0, 0, 0, 1, 2, 3, 4, 9][(tag % 8) as usize];
                if let Ok(mut block) = cache.alloc(order) {
                    block.as_mut_slice()[..8].copy_from_slice(&tag.to_le_bytes());
                    let last = block.len() - 8;
                    block.as_mut_slice()[last..].copy_from_slice(&tag.to_le_bytes());
                    pile.lock().unwrap().push((block, tag));
                }
                let taken = {
                    let mut pile = pile.lock().unwrap();
                    if pile.len() > 64 {
                        let at = (tag as usize * 7919) % pile.len();
                        Some(pile.swap_remove(at))
                    } else {
                        None
                    }
                };
                if let Some((block, tag)) = taken {
                    let bytes = block.as_slice();
                    assert_eq!(bytes[..8], tag.to_le_bytes(), "block handed out twice");
                    assert_eq!(bytes[bytes.len() - 8..], tag.to_le_bytes());
                    if i % 3 == 0 {
                        pool.free(block);
                    } else {
                        cache.free(block);
                    }
                }
            }
        },
    );
    let s = pool.stats();
    assert_eq!(
        s.free_bytes + s.allocated_bytes + s.in_flight_bytes,
        s.capacity as u64,
        "{s}"
    );
    for (block, tag) in pile.into_inner().unwrap() {
        assert_eq!(block.as_slice()[..8], tag.to_le_bytes());
        pool.free(block);
    }
    // `for_each_init` dropped every worker's cache before returning.
    assert_all_free(&pool);
}

/// `stats().local_cache_bytes` equals what the caches hold after every kind of step: blocks
/// from the pool freed into a cache, blocks from a cache freed to the pool, refills, spills,
/// flushes, and a second cache dropped.
#[test]
fn stats_count_exactly_what_the_caches_hold() {
    let pool = quiet(4, 2).build().unwrap();
    let mut a = pool.local_cache_with(4);
    let mut b = pool.local_cache_with(2);
    let check = |a: &pagepool::LocalCache<'_>, b: &pagepool::LocalCache<'_>, step: &str| {
        let s = pool.stats();
        assert_eq!(
            s.local_cache_bytes as usize,
            a.held_bytes() + b.held_bytes(),
            "after {step}:\n{s}"
        );
        assert_eq!(s.free_bytes + s.allocated_bytes, s.capacity as u64, "{s}");
    };
    let mut live = Vec::new();
    for i in 0..60u32 {
        let order = (i % 5) as u8;
        let block = match i % 3 {
            0 => pool.alloc(order).unwrap(),
            1 => a.alloc(order).unwrap(),
            _ => b.alloc(order).unwrap(),
        };
        check(&a, &b, "an alloc");
        live.push(block);
        if i % 4 == 3 {
            let block = live.swap_remove((i as usize * 7) % live.len());
            match i % 3 {
                0 => a.free(block),
                1 => b.free(block),
                _ => pool.free(block),
            }
            check(&a, &b, "a free");
        }
    }
    a.flush();
    check(&a, &b, "a flush");
    for block in live.drain(..) {
        b.free(block);
        check(&a, &b, "a free into b");
    }
    drop(b);
    let s = pool.stats();
    assert_eq!(s.local_cache_bytes as usize, a.held_bytes(), "{s}");
    drop(a);
    assert_all_free(&pool);
}
