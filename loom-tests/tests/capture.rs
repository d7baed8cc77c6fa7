//! loom models of capture: publish, re-check, hand-off and timeout-withdraw racing frees.
#![cfg(loom)]

mod common;

use std::time::Duration;

use common::{Live, all_free, builder, give, model, quiescent, take};
use loom::sync::Arc;
use loom::thread;
use pagepool::AllocError;

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
        let t = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || give(&pool, &live, a))
        };
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
        let t = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || {
                give(&pool, &live, a);
                give(&pool, &live, b);
            })
        };
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
        let t = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || {
                give(&pool, &live, a);
                give(&pool, &live, b);
            })
        };
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
        let freer = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || {
                give(&pool, &live, a);
                give(&pool, &live, b);
                give(&pool, &live, c);
                give(&pool, &live, d);
            })
        };
        let waiter = {
            let pool = pool.clone();
            thread::spawn(move || {
                pool.alloc_wait(1, Duration::from_secs(3600))
                    .expect("two chunks are freed")
            })
        };
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
