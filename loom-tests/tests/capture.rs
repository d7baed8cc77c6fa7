//! loom models of capture: publish, re-check, hand-off and timeout-withdraw racing frees.
#![cfg(loom)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use common::{
    Live, all_free, builder, give, give_on_thread, model, quiescent, take, wait_on_thread,
};
use loom::sync::Arc;
use loom::thread;
use pagepool::{AllocError, Block, PagePool};

/// An exhausted pool; a free of one order-1 block races `alloc_wait` with a zero timeout
/// (loom's timed wait never times out, so the waiter must not sleep): the waiter gets the
/// block (by its first try, its re-check, or a hand-off at the deadline) or times out and
/// the block is free. Never both, never neither.
#[test]
fn capture_with_zero_timeout_races_a_free() {
    model(|| {
        let pool = Arc::new(
            builder(1, 2)
                .keep_chunks(4)
                .capture_min_order(1)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 1).unwrap();
        let b = take(&pool, &live, 0, 1).unwrap();
        let t = give_on_thread(&pool, &live, vec![a]);
        let got = pool.alloc_wait(1, Duration::ZERO);
        t.join().unwrap();
        match got {
            Ok(block) => {
                live.add(&block);
                quiescent(&pool, &live);
                assert_eq!(pool.stats().free_bytes, 0);
                give(&pool, &live, block);
            }
            Err(AllocError::Timeout { order: 1 }) => {
                quiescent(&pool, &live);
                assert_eq!(
                    pool.stats().orders[1].free,
                    1,
                    "the freed block must be free, not leaked"
                );
            }
            Err(other) => panic!("unexpected {other}"),
        }
        give(&pool, &live, b);
        all_free(&pool, &live);
    });
}

/// A waiter for a whole chunk, with a zero timeout, while the two halves are freed by
/// another thread: the second free merges and may hand the chunk to the waiter.
#[test]
fn capture_of_a_merged_block_with_zero_timeout() {
    model(|| {
        let pool = Arc::new(
            builder(1, 1)
                .keep_chunks(4)
                .capture_min_order(1)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 0).unwrap();
        let b = take(&pool, &live, 0, 0).unwrap();
        let t = give_on_thread(&pool, &live, vec![a, b]);
        let got = pool.alloc_wait(1, Duration::ZERO);
        t.join().unwrap();
        match got {
            Ok(block) => {
                live.add(&block);
                quiescent(&pool, &live);
                give(&pool, &live, block);
            }
            Err(AllocError::Timeout { order: 1 }) => quiescent(&pool, &live),
            Err(other) => panic!("unexpected {other}"),
        }
        all_free(&pool, &live);
    });
}

/// The waiter really blocks (a long timeout, which loom never lets expire): a free that is
/// certain to happen must reach it, whether it runs before the first try, between that and
/// the publish, between the publish and the re-check, or while the waiter sleeps.
#[test]
fn blocked_waiter_is_woken_by_a_certain_free() {
    model(|| {
        let pool = Arc::new(
            builder(1, 1)
                .keep_chunks(4)
                .capture_min_order(1)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 0).unwrap();
        let b = take(&pool, &live, 0, 0).unwrap();
        let t = give_on_thread(&pool, &live, vec![a, b]);
        let block = pool
            .alloc_wait(1, Duration::from_secs(3600))
            .expect("the frees are certain");
        live.add(&block);
        t.join().unwrap();
        quiescent(&pool, &live);
        give(&pool, &live, block);
        all_free(&pool, &live);
    });
}

/// Two waiters of different orders and one free: the hand-off goes to one request only,
/// and the other times out without leaking.
#[test]
fn one_free_two_waiters() {
    model(|| {
        let pool = Arc::new(
            builder(1, 1)
                .keep_chunks(4)
                .capture_min_order(0)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 0).unwrap();
        let b = take(&pool, &live, 0, 0).unwrap();
        let w = {
            let pool = pool.clone();
            thread::spawn(move || pool.alloc_wait(0, Duration::ZERO).ok())
        };
        give(&pool, &live, a);
        let mine = pool.alloc_wait(0, Duration::ZERO).ok();
        let theirs = w.join().unwrap();
        let got: Vec<_> = [mine, theirs].into_iter().flatten().collect();
        assert_eq!(
            got.len(),
            1,
            "the one free block went to exactly one waiter"
        );
        for block in &got {
            live.add(block);
        }
        quiescent(&pool, &live);
        for block in got {
            give(&pool, &live, block);
        }
        give(&pool, &live, b);
        all_free(&pool, &live);
    });
}

/// Two waiters really block, each for a whole chunk, while two threads each free the two
/// halves of one chunk: both are certain to be served, each chunk to exactly one of them.
#[test]
fn two_blocked_waiters_two_merging_frees() {
    model(|| {
        let pool = Arc::new(
            builder(2, 1)
                .keep_chunks(4)
                .capture_min_order(1)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let halves: Vec<_> = (0..4).map(|_| take(&pool, &live, 0, 0).unwrap()).collect();
        let mut halves = halves.into_iter();
        let (a, b, c, d) = (
            halves.next().unwrap(),
            halves.next().unwrap(),
            halves.next().unwrap(),
            halves.next().unwrap(),
        );
        let freer = give_on_thread(&pool, &live, vec![a, b, c, d]);
        let waiter = wait_on_thread(&pool, 1, "two chunks are freed");
        let mine = pool
            .alloc_wait(1, Duration::from_secs(3600))
            .expect("two chunks are freed");
        live.add(&mine);
        let theirs = waiter.join().unwrap();
        live.add(&theirs);
        freer.join().unwrap();
        quiescent(&pool, &live);
        assert_eq!(pool.stats().free_bytes, 0);
        give(&pool, &live, mine);
        give(&pool, &live, theirs);
        all_free(&pool, &live);
    });
}

/// A one-chunk pool of order 2 cut into four frames, region 0 (frames 0-1) half free,
/// region 1 (frames 2-3) live: the waiter for order 1 can reserve region 0.
fn half_free_region() -> (Arc<PagePool>, Arc<Live>, Block, Vec<Block>) {
    let pool = Arc::new(
        builder(1, 2)
            .keep_chunks(4)
            .capture_min_order(1)
            .build()
            .unwrap(),
    );
    let live = Arc::new(Live::default());
    let mut frames: Vec<Block> = (0..4).map(|_| take(&pool, &live, 0, 0).unwrap()).collect();
    frames.sort_by_key(|b| b.as_ptr() as usize);
    let region1 = frames.split_off(2);
    let second = frames.pop().unwrap();
    give(&pool, &live, frames.pop().unwrap());
    (pool, live, second, region1)
}

/// A blocked waiter reserves the half-free region while another thread allocates and
/// frees a small block and a third frees the region's other half: whether the small
/// allocation ran before the reservation (and took a piece) or after (and found the pool
/// exhausted), the region completes and goes to the waiter exactly once.
#[test]
fn reserved_region_goes_to_its_waiter_despite_a_competing_allocation() {
    static RESERVED: AtomicUsize = AtomicUsize::new(0);
    model(|| {
        let (pool, live, second, region1) = half_free_region();
        let competitor = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || {
                if let Some(block) = take(&pool, &live, 0, 0) {
                    give(&pool, &live, block);
                }
            })
        };
        let freer = give_on_thread(&pool, &live, vec![second]);
        let block = pool
            .alloc_wait(1, Duration::from_secs(3600))
            .expect("the region is certain to complete");
        live.add(&block);
        competitor.join().unwrap();
        freer.join().unwrap();
        quiescent(&pool, &live);
        RESERVED.fetch_add(pool.stats().capture.reservations as usize, Relaxed);
        give(&pool, &live, block);
        for block in region1 {
            give(&pool, &live, block);
        }
        all_free(&pool, &live);
    });
    assert!(RESERVED.load(Relaxed) > 0, "no execution reserved a region");
}

/// A waiter with a zero timeout reserves and withdraws while the region's other half is
/// freed: it gets the region (captured, or found by its re-check) or times out, and then
/// no piece stays reserved (the audit checks every piece is on its class list).
#[test]
fn reservation_is_released_when_the_waiter_times_out() {
    static RESERVED: AtomicUsize = AtomicUsize::new(0);
    model(|| {
        let (pool, live, second, region1) = half_free_region();
        let freer = give_on_thread(&pool, &live, vec![second]);
        let got = pool.alloc_wait(1, Duration::ZERO);
        freer.join().unwrap();
        RESERVED.fetch_add(pool.stats().capture.reservations as usize, Relaxed);
        match got {
            Ok(block) => {
                live.add(&block);
                quiescent(&pool, &live);
                give(&pool, &live, block);
            }
            Err(AllocError::Timeout { order: 1 }) => {
                quiescent(&pool, &live);
                assert_eq!(
                    pool.stats().orders[1].free,
                    1,
                    "the region is free, not held"
                );
            }
            Err(other) => panic!("unexpected {other}"),
        }
        for block in region1 {
            give(&pool, &live, block);
        }
        all_free(&pool, &live);
    });
    assert!(RESERVED.load(Relaxed) > 0, "no execution reserved a region");
}

/// Two blocked waiters for order 1 and a chunk of four frames: frames 0 and 2 free, 1 and 3
/// live. Each waiter may reserve one of the two half-free regions (never the same one)
/// while another thread frees frames 1 and 3: both waiters are certain to be served, each
/// region goes to exactly one of them, and nothing stays reserved.
#[test]
fn two_waiters_reserve_two_regions() {
    static RESERVED: AtomicUsize = AtomicUsize::new(0);
    model(|| {
        let pool = Arc::new(
            builder(1, 2)
                .keep_chunks(4)
                .capture_min_order(1)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let mut frames: Vec<Block> = (0..4).map(|_| take(&pool, &live, 0, 0).unwrap()).collect();
        frames.sort_by_key(|b| b.as_ptr() as usize);
        let third = frames.pop().unwrap();
        let second = frames.pop().unwrap();
        let first = frames.pop().unwrap();
        give(&pool, &live, frames.pop().unwrap());
        give(&pool, &live, second);
        let freer = give_on_thread(&pool, &live, vec![first, third]);
        let waiter = wait_on_thread(&pool, 1, "two regions complete");
        let mine = pool
            .alloc_wait(1, Duration::from_secs(3600))
            .expect("two regions complete");
        live.add(&mine);
        let theirs = waiter.join().unwrap();
        live.add(&theirs);
        freer.join().unwrap();
        quiescent(&pool, &live);
        RESERVED.fetch_add(pool.stats().capture.reservations as usize, Relaxed);
        give(&pool, &live, mine);
        give(&pool, &live, theirs);
        all_free(&pool, &live);
    });
    assert!(RESERVED.load(Relaxed) > 0, "no execution reserved a region");
}
