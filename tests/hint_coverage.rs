//! Every cold block comes back: whatever the largest block, the pass budget, the shard
//! count, the hint mode or the caches, free memory at or above the hint order that stays
//! free for the hint delay is given back by the hinter thread, and the thread keeps going
//! until nothing is left.
//!
//! Each test waits for a condition with a generous deadline (the machine may be busy);
//! none measures speed.

use std::time::Duration;

use pagepool::{HintMode, PagePool, PoolBuilder, Stats, block_size};
use proptest::prelude::*;

mod common;

use common::{assert_balanced, eventually};

/// Free bytes at or above `min_order` that are resident: unhinted (cached ones included),
/// and those a hinting pass holds while it advises them (resident until its `madvise`
/// returns and it puts them back, hinted).
fn resident_free_at_or_above(s: &Stats, min_order: u8) -> u64 {
    s.orders
        .iter()
        .filter(|o| o.order >= min_order)
        .map(|o| o.unhinted * o.block_size as u64)
        .sum::<u64>()
        + s.in_flight_bytes
}

/// A pool whose hinter reacts fast: short delay and interval.
fn fast(builder: PoolBuilder) -> PoolBuilder {
    builder
        .hint_thread(true)
        .hint_delay(Duration::from_millis(20))
        .hint_interval(Duration::from_millis(5))
}

#[test]
fn a_block_larger_than_the_pass_budget_is_still_hinted() {
    // 128 MiB chunks against the default 64 MiB budget: one whole chunk and one 2 MiB block.
    let pool = fast(
        PagePool::builder()
            .capacity(2 * block_size(15))
            .max_order(15),
    )
    .shards(1)
    .build()
    .unwrap();
    let mut chunk = pool.alloc(15).unwrap();
    let mut small = pool.alloc(9).unwrap();
    chunk.as_mut_slice()[0] = 1;
    small.as_mut_slice()[0] = 1;
    pool.free(chunk);
    pool.free(small);
    eventually(
        &pool,
        Duration::from_secs(10),
        "all free memory hinted",
        |s| resident_free_at_or_above(s, 9) == 0,
    );
    assert!(pool.stats().hinted_bytes >= block_size(15) as u64);
    assert_balanced(&pool);
}

#[test]
fn a_pass_that_cannot_fit_the_next_block_comes_back() {
    // Defaults but one shard: 128 MiB of order-9 blocks, all but one freed.
    let pool = fast(PagePool::builder().capacity(128 << 20))
        .shards(1)
        .hint_thread(false)
        .build()
        .unwrap();
    let mut blocks: Vec<_> = std::iter::from_fn(|| pool.alloc(9).ok()).collect();
    assert_eq!(blocks.len(), 64);
    for block in &mut blocks {
        block.as_mut_slice()[0] = 1;
    }
    let kept = blocks.pop().unwrap();
    for block in blocks {
        pool.free(block);
    }
    pool.drain_caches();
    pool.start_hinter().unwrap();
    eventually(
        &pool,
        Duration::from_secs(10),
        "all free memory hinted",
        |s| resident_free_at_or_above(s, 9) == 0,
    );
    assert_eq!(pool.stats().hinted_bytes, (126 << 20) as u64);
    pool.free(kept);
    assert_balanced(&pool);
}

#[test]
fn budgets_from_one_byte_up_make_progress() {
    for budget in [1, 4096, (2 << 20) - 1, 2 << 20, 5 << 20] {
        let pool = fast(PagePool::builder().capacity(64 << 20).shards(1))
            .hint_pass_bytes(budget)
            .build()
            .unwrap();
        let blocks: Vec<_> = (0..8).map(|_| pool.alloc(10).unwrap()).collect();
        for mut block in blocks {
            block.as_mut_slice()[0] = 7;
            pool.free(block);
        }
        eventually(&pool, Duration::from_secs(10), "hinted", |s| {
            resident_free_at_or_above(s, 9) == 0
        });
    }
}

#[test]
fn a_cached_block_is_hinted_once_cold() {
    // One 2 MiB block allocated, written and freed lands in the shard's cache.
    let pool = fast(PagePool::builder().capacity(64 << 20).shards(1))
        .build()
        .unwrap();
    let mut block = pool.alloc(9).unwrap();
    block.as_mut_slice().fill(1);
    pool.free(block);
    let s = pool.stats();
    assert_eq!(
        s.cached_bytes + s.cpu_cache_bytes,
        2 << 20,
        "the free went to a cache:\n{s}"
    );
    eventually(
        &pool,
        Duration::from_secs(10),
        "the cached block hinted",
        |s| s.cached_bytes == 0 && s.cpu_cache_bytes == 0 && resident_free_at_or_above(s, 9) == 0,
    );
    assert_balanced(&pool);
}

#[test]
fn small_cached_blocks_merge_and_are_hinted() {
    // 4 KiB blocks freed into the cache: cold, they merge into a whole 2 MiB block.
    let pool = fast(PagePool::builder().capacity(8 << 20).max_order(9).shards(1))
        .cache_blocks(32)
        .build()
        .unwrap();
    let blocks: Vec<_> = (0..512).map(|_| pool.alloc(0).unwrap()).collect();
    for mut block in blocks {
        block.as_mut_slice()[0] = 1;
        pool.free(block);
    }
    eventually(&pool, Duration::from_secs(10), "merged and hinted", |s| {
        s.cached_bytes == 0 && s.cpu_cache_bytes == 0 && resident_free_at_or_above(s, 9) == 0
    });
}

#[test]
fn the_longest_durations_work_and_the_thread_stays_alive() {
    // The longest accepted interval: the first pass runs, the thread then sleeps for it.
    let pool = PagePool::builder()
        .capacity(16 << 20)
        .shards(1)
        .hint_thread(false)
        .hint_delay(Duration::ZERO)
        .hint_interval(pagepool::MAX_HINT_DURATION)
        .build()
        .unwrap();
    let mut block = pool.alloc(10).unwrap();
    block.as_mut_slice()[0] = 1;
    pool.free(block);
    pool.start_hinter().unwrap();
    eventually(&pool, Duration::from_secs(10), "hinted", |s| {
        resident_free_at_or_above(s, 9) == 0
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(pool.hinter_running(), "the thread died");
    assert!(pool.stats().hint.thread_running);
    pool.shutdown();
    assert!(!pool.hinter_running());
    assert!(!pool.stats().hint.thread_running);
    // The longest delay: nothing is cold yet, and nothing breaks.
    let pool = PagePool::builder()
        .capacity(16 << 20)
        .hint_delay(pagepool::MAX_HINT_DURATION)
        .build()
        .unwrap();
    let block = pool.alloc(10).unwrap();
    pool.free(block);
    std::thread::sleep(Duration::from_millis(50));
    assert!(pool.hinter_running());
    assert_eq!(pool.stats().hinted_bytes, 0);
}

/// One random configuration of the property below.
#[derive(Debug, Clone)]
struct Config {
    max_order: u8,
    shards: usize,
    pass_bytes: usize,
    mode: HintMode,
    cache_blocks: u32,
    /// Orders of the burst's blocks, relative to the hint order (may be negative).
    burst: Vec<i8>,
}

fn config() -> impl Strategy<Value = Config> {
    (
        9u8..=20,
        1usize..=8,
        prop_oneof![
            Just(1usize),
            Just(4096),
            Just(2 << 20),
            Just(64 << 20),
            Just(usize::MAX)
        ],
        prop_oneof![Just(HintMode::Free), Just(HintMode::DontNeed)],
        prop_oneof![Just(0u32), Just(32)],
        prop::collection::vec(-9i8..=2, 1..40),
    )
        .prop_map(
            |(max_order, shards, pass_bytes, mode, cache_blocks, burst)| Config {
                max_order,
                shards,
                pass_bytes,
                mode,
                cache_blocks,
                burst,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// After a burst, its frees, and an idle period, no free memory at or above the hint
    /// order stays resident, in every configuration the builder accepts.
    #[test]
    fn every_cold_block_comes_back(config in config()) {
        let chunk = block_size(config.max_order);
        let pool = PagePool::builder()
            .capacity(2 * chunk)
            .max_order(config.max_order)
            .shards(config.shards)
            .hint_pass_bytes(config.pass_bytes)
            .hint_mode(config.mode)
            .cache_blocks(config.cache_blocks)
            .hint_delay(Duration::from_millis(10))
            .hint_interval(Duration::from_millis(2))
            .build()
            .unwrap();
        let hint_order = 9.min(config.max_order) as i8;
        let mut live = Vec::new();
        for (i, &delta) in config.burst.iter().enumerate() {
            let order = (hint_order + delta).clamp(0, config.max_order as i8) as u8;
            // At most 64 MiB in total: the burst, not the capacity, is what gets touched.
            if block_size(order) > 16 << 20 {
                continue;
            }
            if let Ok(mut block) = pool.alloc_on(i, order) {
                block.as_mut_slice()[0] = i as u8;
                live.push(block);
            }
        }
        // Free in an order that interleaves shards and sizes.
        live.reverse();
        let third = live.len() / 3;
        live.rotate_left(third);
        for block in live {
            pool.free(block);
        }
        eventually(&pool, Duration::from_secs(20), "every cold block hinted", |s| {
            resident_free_at_or_above(s, hint_order as u8) == 0
                && s.cached_bytes == 0
                && s.cpu_cache_bytes == 0
        });
        assert_balanced(&pool);
    }
}
