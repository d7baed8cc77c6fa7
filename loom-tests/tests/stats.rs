//! loom model of counter snapshots read without locks against concurrent updates.
#![cfg(loom)]

mod common;

use common::{Live, all_free, builder, give, model, quiescent, take};
use loom::sync::Arc;
use loom::thread;
use pagepool::Stats;

/// No gauge of a snapshot may wrap below zero or exceed what the capacity holds.
fn bounded(s: &Stats) {
    for o in &s.orders {
        let blocks = (s.capacity / o.block_size) as u64;
        for (what, value) in [
            ("free", o.free),
            ("hinted", o.hinted),
            ("zero", o.zero),
            ("allocated", o.allocated),
            ("in flight", o.in_flight),
        ] {
            assert!(
                value <= blocks,
                "order {} {what} = {value} > {blocks}:\n{s}",
                o.order
            );
        }
        // Each order of a snapshot is self-consistent, even mid-update.
        assert_eq!(
            o.unhinted + o.hinted + o.zero,
            o.free,
            "order {}:\n{s}",
            o.order
        );
        assert!(o.cached <= o.unhinted, "order {}:\n{s}", o.order);
        assert_eq!(
            o.freed_total - o.bound_total,
            o.free,
            "order {}:\n{s}",
            o.order
        );
    }
    let cap = s.capacity as u64;
    for total in [
        s.allocated_bytes,
        s.free_bytes,
        s.in_flight_bytes,
        s.hinted_bytes,
        s.zero_bytes,
        s.cached_bytes,
    ] {
        assert!(total <= cap, "a total above capacity:\n{s}");
    }
}

/// One thread splits and merges (alloc and free of order 0, then order 1) while another
/// takes snapshots; at quiescence the snapshot equals the frame table.
///
/// loom's reduction tracks only the last access to an atomic, so a load that a later
/// store overwrites is not always revisited: the reader yields between snapshots, and a
/// second model swaps which thread runs first.
#[test]
fn snapshots_against_concurrent_split_and_merge() {
    model(|| {
        let pool = Arc::new(
            builder(1, 1)
                .keep_chunks(4)
                .hint_min_order(0)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let reader = {
            let pool = pool.clone();
            thread::spawn(move || {
                for _ in 0..3 {
                    bounded(&pool.stats());
                    thread::yield_now();
                }
            })
        };
        let a = take(&pool, &live, 0, 0).unwrap();
        give(&pool, &live, a);
        let b = take(&pool, &live, 1, 1).unwrap();
        give(&pool, &live, b);
        reader.join().unwrap();
        quiescent(&pool, &live);
        all_free(&pool, &live);
    });
}

/// As above with the writer spawned and the reader on the main thread.
#[test]
fn snapshots_while_a_spawned_thread_splits_and_merges() {
    model(|| {
        let pool = Arc::new(
            builder(1, 1)
                .keep_chunks(4)
                .cache_blocks(2)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let writer = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || {
                let a = take(&pool, &live, 0, 0).unwrap();
                let b = take(&pool, &live, 0, 0).unwrap();
                give(&pool, &live, a);
                give(&pool, &live, b);
            })
        };
        for _ in 0..3 {
            bounded(&pool.stats());
            thread::yield_now();
        }
        writer.join().unwrap();
        quiescent(&pool, &live);
        all_free(&pool, &live);
    });
}

/// Snapshots while the hinter isolates and returns a block (in flight in between).
#[test]
fn snapshots_against_the_hinter() {
    model(|| {
        let pool = Arc::new(
            builder(1, 1)
                .keep_chunks(4)
                .hint_min_order(0)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 0).unwrap();
        let t = {
            let pool = pool.clone();
            thread::spawn(move || {
                pool.hint_now();
            })
        };
        for _ in 0..2 {
            let s = pool.stats();
            bounded(&s);
            thread::yield_now();
        }
        t.join().unwrap();
        quiescent(&pool, &live);
        give(&pool, &live, a);
        all_free(&pool, &live);
    });
}
