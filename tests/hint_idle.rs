//! `idle_hint_min_order`: small free blocks are given back only once no CPU has used its
//! cache for the hint delay, never while the program keeps allocating.

mod common;

use std::time::{Duration, Instant};

use common::{MIB, assert_balanced, eventually};
use pagepool::{Block, CpuCacheMode, PagePool, PoolBuilder};

/// A pool whose hinter gives back blocks of 2 MiB and up once they are cold (300 ms),
/// and from `idle` up (16 KiB for order 2) once the pool rests.
///
/// One shard: the tests count hinted small blocks, and with two, an allocation on a shard
/// without resident blocks may split a chunk the hinter legitimately gave back (it is at
/// or above the hint order), whose hinted pieces would look like small blocks hinted.
fn pool(idle: Option<u8>, cache: CpuCacheMode) -> PagePool {
    let builder: PoolBuilder = PagePool::builder()
        .capacity(64 * MIB)
        .shards(1)
        .cpu_cache(cache)
        .hint_min_order(9)
        .hint_delay(Duration::from_millis(300))
        .hint_interval(Duration::from_millis(5));
    match idle {
        Some(order) => builder.idle_hint_min_order(order),
        None => builder,
    }
    .build()
    .unwrap()
}

/// Frees 8 MiB of scattered 16 KiB blocks (their neighbours stay allocated, so they cannot
/// merge up to the hint order) and returns the neighbours.
fn scattered_small_free(pool: &PagePool) -> Vec<Block> {
    let mut all: Vec<Block> = (0..1024).map(|_| pool.alloc(2).unwrap()).collect();
    for block in &mut all {
        block.as_mut_slice()[0] = 1;
    }
    let mut kept = Vec::new();
    for (i, block) in all.into_iter().enumerate() {
        if i % 2 == 0 {
            pool.free(block);
        } else {
            kept.push(block);
        }
    }
    kept
}

/// Bytes hinted in blocks of 16 KiB up to 1 MiB.
fn small_hinted(pool: &PagePool) -> u64 {
    pool.stats().orders[2..9]
        .iter()
        .map(|o| o.hinted * o.block_size as u64)
        .sum()
}

#[test]
fn small_blocks_are_hinted_once_the_pool_rests() {
    for cache in [CpuCacheMode::Auto, CpuCacheMode::Portable] {
        let pool = pool(Some(2), cache);
        let kept = scattered_small_free(&pool);
        // Busy for over three delays: an allocation and a free through the cache every few
        // hundred microseconds. Nothing small may be given back meanwhile.
        let busy_until = Instant::now() + Duration::from_millis(1000);
        while Instant::now() < busy_until {
            let b = pool.alloc(0).unwrap();
            pool.free(b);
            std::thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(
            small_hinted(&pool),
            0,
            "hinted while busy:\n{}",
            pool.stats()
        );
        // At rest: they go.
        eventually(
            &pool,
            Duration::from_secs(10),
            "small blocks hinted at rest",
            |s| s.orders[2..9].iter().map(|o| o.unhinted).sum::<u64>() == 0,
        );
        // The 8 MiB freed, less what the allocations of the busy loop took from it.
        assert!(small_hinted(&pool) >= 7 * MIB as u64, "{}", pool.stats());
        for block in kept {
            pool.free(block);
        }
        assert_balanced(&pool);
    }
}

/// Frees scattered small blocks, waits `ms`, checks none of them was hinted, and frees
/// the rest.
fn small_blocks_stay_for(pool: &PagePool, ms: u64) {
    let kept = scattered_small_free(pool);
    std::thread::sleep(Duration::from_millis(ms));
    assert_eq!(small_hinted(pool), 0, "{}", pool.stats());
    for block in kept {
        pool.free(block);
    }
}

#[test]
fn without_an_idle_order_small_blocks_stay() {
    let pool = pool(None, CpuCacheMode::Auto);
    small_blocks_stay_for(&pool, 1000);
    assert_balanced(&pool);
}

/// An idle order above the hint order is the hint order; without per-CPU caches (which
/// see the activity) the pool never counts as resting.
#[test]
fn the_idle_order_is_clamped_and_needs_the_caches() {
    small_blocks_stay_for(&pool(Some(12), CpuCacheMode::Auto), 800);
    let off = pool(Some(2), CpuCacheMode::Off);
    small_blocks_stay_for(&off, 800);
    assert_balanced(&off);
}
