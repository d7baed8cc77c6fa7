//! `release_idle` gives whole free chunks back with their frame-table entries: the pool
//! forgets everything about them but a bit (see `shard::vacant`). These tests check that
//! such chunks come back whole and correct, in every configuration: every largest order,
//! shard count, allocation policy and per-CPU cache mode.

mod common;

use common::{MIB, assert_all_free, assert_balanced, assert_whole_chunks, stamp, verify};
use pagepool::{AllocPolicy, Block, CpuCacheMode, FreeError, PagePool, block_size};
use proptest::prelude::*;

/// Allocates blocks of orders drawn from `orders` until about `bytes` are out, stamping
/// each.
fn burst(pool: &PagePool, bytes: usize, orders: &[u8], seed: u64) -> Vec<(Block, u8)> {
    let mut live = Vec::new();
    let mut total = 0;
    let mut x = seed | 1;
    while total < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let order = orders[(x % orders.len() as u64) as usize];
        let Ok(mut block) = pool.alloc(order) else {
            break;
        };
        let tag = (x >> 32) as u8;
        stamp(&mut block, tag);
        total += block.len();
        live.push((block, tag));
    }
    live
}

/// Takes every block of the pool's largest order, checks they are distinct and usable,
/// and frees them.
fn take_everything(pool: &PagePool, zeroed: bool) {
    let max = pool.max_order();
    let chunks = pool.capacity() / block_size(max);
    let mut all = Vec::with_capacity(chunks);
    for i in 0..chunks {
        let block = if zeroed {
            pool.alloc_zeroed(max)
        } else {
            pool.alloc(max)
        };
        let mut block = block.unwrap_or_else(|e| panic!("chunk {i} of {chunks}: {e}"));
        if zeroed {
            assert!(
                block.as_slice().iter().all(|&b| b == 0),
                "alloc_zeroed gave a chunk that is not zero"
            );
        }
        stamp(&mut block, i as u8);
        all.push(block);
    }
    let mut starts: Vec<usize> = all.iter().map(|b| b.as_ptr() as usize).collect();
    starts.sort_unstable();
    starts.dedup();
    assert_eq!(starts.len(), chunks, "a chunk was handed out twice");
    assert!(pool.alloc(0).is_err(), "more than the capacity");
    for (i, block) in all.into_iter().enumerate() {
        verify(&block, i as u8);
        pool.free(block);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Burst, free, release: the released chunks come back (as plain and as zeroed
    /// allocations), nothing is handed out twice, the books balance, and pointers into a
    /// released chunk are refused.
    #[test]
    fn released_chunks_come_back_whole(
        max_order in 0u8..=12,
        chunks in 2usize..12,
        shards in 1usize..4,
        fifo in any::<bool>(),
        cache in prop_oneof![
            Just(CpuCacheMode::Off),
            Just(CpuCacheMode::Auto),
            Just(CpuCacheMode::Portable),
        ],
        keep in 0usize..3,
        seed in any::<u64>(),
    ) {
        let pool = PagePool::builder()
            .capacity(chunks * block_size(max_order))
            .max_order(max_order)
            .shards(shards)
            .policy(if fifo { AllocPolicy::Fifo } else { AllocPolicy::PreferUnhinted })
            .cpu_cache(cache)
            .hint_thread(false)
            .build()
            .unwrap();
        // The first chunk handed out is the region's first.
        let base = {
            let first = pool.alloc(max_order).unwrap();
            let at = first.as_ptr() as usize;
            pool.free(first);
            at
        };
        let orders: Vec<u8> = (0..=max_order.min(4)).chain([max_order]).collect();
        let mut live = burst(&pool, pool.capacity(), &orders, seed);
        // Keep a few blocks, so some chunks are not whole.
        let kept: Vec<(Block, u8)> = live.drain(..keep.min(live.len())).collect();
        for (block, tag) in live {
            verify(&block, tag);
            pool.free(block);
        }
        pool.release_idle();
        assert_balanced(&pool);
        for (block, tag) in &kept {
            verify(block, *tag);
        }
        // A pointer one block into each free chunk is an interior or stale pointer.
        for c in 0..chunks {
            let start = base + c * block_size(max_order);
            if kept.iter().any(|(b, _)| (b.as_ptr() as usize) >> (12 + max_order as usize)
                == start >> (12 + max_order as usize))
            {
                continue;
            }
            let ptr = std::ptr::NonNull::new(start as *mut u8).unwrap();
            // SAFETY: a pointer into the pool that no live block starts at: the pool
            // refuses it (that is what is tested) and nobody uses the memory.
            let err = unsafe { pool.free_raw(ptr) }.unwrap_err();
            prop_assert!(
                matches!(err, FreeError::NotBlockStart | FreeError::AlreadyFree),
                "{err:?}"
            );
        }
        assert_balanced(&pool);
        for (block, _) in kept {
            pool.free(block);
        }
        pool.release_idle();
        assert_whole_chunks(&pool);
        take_everything(&pool, false);
        pool.release_idle();
        take_everything(&pool, true);
        assert_whole_chunks(&pool);
    }
}

/// Under memory pressure's advice (`MADV_DONTNEED`) released chunks are known-zero:
/// `alloc_zeroed` takes them without a `memset` and they read as zeros.
#[test]
fn released_zero_chunks_are_zero() {
    let pool = PagePool::builder()
        .capacity(16 * MIB)
        .max_order(10)
        .hint_mode(pagepool::HintMode::DontNeed)
        .hint_thread(false)
        .build()
        .unwrap();
    let live = burst(&pool, 16 * MIB, &[0, 3, 10], 7);
    for (block, _) in live {
        pool.free(block);
    }
    pool.release_idle();
    let s = assert_all_free(&pool);
    assert_eq!(s.orders[10].zero, 4, "every chunk known-zero:\n{s}");
    take_everything(&pool, true);
    assert_whole_chunks(&pool);
}
