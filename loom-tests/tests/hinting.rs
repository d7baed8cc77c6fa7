//! loom model of the hinter's isolate / advise / return protocol against frees and
//! allocations of the same shard.
#![cfg(loom)]

mod common;

use common::{Live, all_free, builder, give, give_on_thread, model, quiescent, take};
use loom::sync::Arc;
use loom::thread;

/// The hinter isolates the free upper half of a chunk while the lower half's two buddies
/// are freed (merging up to it) and a third thread allocates. An isolated block must not
/// be merged or handed out; when it returns it merges with whatever is free.
#[test]
fn hinter_isolates_while_a_buddy_is_freed_and_an_allocation_runs() {
    model(|| {
        let pool = Arc::new(
            builder(1, 2)
                .keep_chunks(4)
                .hint_min_order(0)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        // Frames 0 and 1 allocated (order 0 each); frames 2-3 free as one order-1 block.
        let a = take(&pool, &live, 0, 0).unwrap();
        let b = take(&pool, &live, 0, 0).unwrap();
        let hinter = {
            let pool = pool.clone();
            thread::spawn(move || pool.hint_now())
        };
        let freer = give_on_thread(&pool, &live, vec![a, b]);
        let c = take(&pool, &live, 0, 1);
        let report = hinter.join().unwrap();
        freer.join().unwrap();
        assert_eq!(report.failures, 0);
        quiescent(&pool, &live);
        if let Some(c) = c {
            give(&pool, &live, c);
        }
        all_free(&pool, &live);
    });
}

/// `hint_now` racing a free that completes a whole chunk: the chunk is hinted whole or
/// not at all, and the counters stay exact.
#[test]
fn hinter_races_a_merging_free() {
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
        let hinter = {
            let pool = pool.clone();
            thread::spawn(move || pool.hint_now())
        };
        give(&pool, &live, a);
        let report = hinter.join().unwrap();
        quiescent(&pool, &live);
        let s = pool.stats();
        assert!(report.blocks <= 1, "{report:?}");
        assert_eq!(s.orders[1].free, 1, "{s}");
        all_free(&pool, &live);
    });
}

/// A chunk in the shared pool is isolated by the hinter while a capture request for a
/// smaller block registers; when the chunk comes back it may be handed over in part, and
/// the rest (and, once freed, the captured part) must stay allocatable and coalesce.
/// `blocking`: the waiter sleeps until served (the returning chunk is certain to serve it);
/// otherwise it gives up at once (zero timeout) unless served in between.
fn shared_chunk_returns_to_a_waiter(blocking: bool) {
    model(move || {
        let pool = Arc::new(
            builder(2, 1)
                .keep_chunks(0)
                .hint_min_order(0)
                .capture_min_order(0)
                .cache_blocks(1)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 1).unwrap();
        let b = take(&pool, &live, 0, 1).unwrap();
        give(&pool, &live, a); // keep_chunks(0): to the shared pool
        let waiter = {
            let pool = pool.clone();
            let timeout = if blocking {
                std::time::Duration::from_secs(3600)
            } else {
                std::time::Duration::ZERO
            };
            thread::spawn(move || pool.alloc_wait(0, timeout).ok())
        };
        pool.hint_now();
        let got = waiter.join().unwrap();
        assert!(
            got.is_some() || !blocking,
            "a blocking waiter returned empty-handed"
        );
        if let Some(block) = &got {
            live.add(block);
        }
        quiescent(&pool, &live);
        // The other half of the chunk (if one was taken) is free memory.
        let other = take(&pool, &live, 1, 0).expect("free memory left");
        give(&pool, &live, other);
        if let Some(block) = got {
            give(&pool, &live, block);
        }
        give(&pool, &live, b);
        all_free(&pool, &live);
        let chunks: Vec<_> = (0..2)
            .map(|i| take(&pool, &live, i, 1).expect("both chunks whole"))
            .collect();
        for chunk in chunks {
            give(&pool, &live, chunk);
        }
    });
}

/// Found by a regression test in tests/core.rs; these models cover the interleavings.
#[test]
fn hinter_returns_a_shared_chunk_to_a_blocked_waiter() {
    shared_chunk_returns_to_a_waiter(true);
}

#[test]
fn hinter_returns_a_shared_chunk_to_a_waiter_with_zero_timeout() {
    shared_chunk_returns_to_a_waiter(false);
}

/// `release_idle` making whole free chunks vacant (their frame entries blanked, see
/// `shard::vacant`) while one thread frees the last block of a chunk and another takes a
/// whole chunk: no chunk is lost or handed out twice, a vacant chunk is taken back, and
/// the counters stay exact.
#[test]
fn release_idle_vacates_chunks_while_others_allocate_and_free() {
    model(|| {
        let pool = Arc::new(
            builder(3, 1)
                .keep_chunks(0)
                .hint_min_order(0)
                .build()
                .unwrap(),
        );
        let live = Arc::new(Live::default());
        // Chunk 0 held whole; chunk 1 held as two halves, one of which is freed now, so the
        // other's free completes it; chunk 2 free.
        let a = take(&pool, &live, 0, 1).unwrap();
        let b = take(&pool, &live, 0, 0).unwrap();
        let c = take(&pool, &live, 0, 0).unwrap();
        give(&pool, &live, b);
        let releaser = {
            let pool = pool.clone();
            thread::spawn(move || pool.release_idle())
        };
        let freer = give_on_thread(&pool, &live, vec![c]);
        let d = take(&pool, &live, 1, 1);
        let report = releaser.join().unwrap();
        freer.join().unwrap();
        assert_eq!(report.failures, 0);
        quiescent(&pool, &live);
        let d = d.expect("two chunks were free or freed: one is taken");
        // Every chunk not held comes back, vacant or not.
        let e = take(&pool, &live, 1, 1).expect("a vacant or listed chunk is taken back");
        assert!(
            take(&pool, &live, 0, 0).is_none(),
            "three chunks, three held"
        );
        quiescent(&pool, &live);
        for block in [a, d, e] {
            give(&pool, &live, block);
        }
        pool.release_idle();
        all_free(&pool, &live);
    });
}
