//! loom models of `LocalCache`: its owner writes frame entries without a lock while other
//! threads free buddies (reading those entries under the shard lock) and allocate.
#![cfg(loom)]

mod common;

use common::{Live, all_free, builder, give, give_on_thread, model, quiescent, take};
use loom::sync::Arc;
use loom::thread;
use std::time::Duration;

/// The cache holds frame 0, free; frame 1 (its buddy) is allocated. Another thread frees
/// frame 1 and allocates and frees a block, while the owner takes frame 0 out of its cache
/// and puts it back. The free must not merge with the cached frame, the other thread's
/// allocation must not get it, and once the cache is dropped the chunk is whole again.
#[test]
fn cached_block_is_neither_merged_nor_handed_out_twice() {
    model(|| {
        let pool = Arc::new(builder(1, 1).keep_chunks(4).build().unwrap());
        let live = Arc::new(Live::default());
        let (mut x, y) = {
            let a = take(&pool, &live, 0, 0).unwrap();
            let b = take(&pool, &live, 0, 0).unwrap();
            if a.as_ptr() < b.as_ptr() {
                (a, b)
            } else {
                (b, a)
            }
        };
        // Move frame 0 into a cache: a block allocated elsewhere may be freed into one.
        let mut cache = pool.local_cache_with(2);
        live.remove(&x);
        cache.free(x);
        let other = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || {
                give(&pool, &live, y);
                if let Some(block) = take(&pool, &live, 0, 0) {
                    give(&pool, &live, block);
                }
            })
        };
        x = cache.alloc(0).expect("the cache holds frame 0");
        live.add(&x);
        live.remove(&x);
        cache.free(x);
        other.join().unwrap();
        drop(cache);
        quiescent(&pool, &live);
        all_free(&pool, &live);
    });
}

/// Two threads, each with its own cache, swap blocks: each frees the other's block into
/// its own cache and drops the cache. Every block goes back exactly once.
#[test]
fn blocks_freed_into_another_threads_cache() {
    model(|| {
        let pool = Arc::new(builder(1, 1).keep_chunks(4).build().unwrap());
        let live = Arc::new(Live::default());
        let mut mine = pool.local_cache_with(2);
        let a = mine.alloc(0).unwrap();
        live.add(&a);
        let b = take(&pool, &live, 0, 0).unwrap();
        let other = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || {
                let mut theirs = pool.local_cache_with(2);
                live.remove(&a);
                theirs.free(a);
            })
        };
        live.remove(&b);
        mine.free(b);
        drop(mine);
        other.join().unwrap();
        quiescent(&pool, &live);
        all_free(&pool, &live);
    });
}

/// A waiter captures a merged block and frees it at once into its cache, which writes the
/// block's frame entry without a lock, while the thread whose free formed the block may
/// still hold the shard lock. The hand-off must mark the block allocated before the waiter
/// can see it: a mark written after the cache's own entry would overwrite it (the cache's
/// debug assertion, on in loom runs, sees the stale entry first).
#[test]
fn captured_block_goes_straight_into_a_cache() {
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
        let mut cache = pool.local_cache_with(2);
        let block = pool
            .alloc_wait(1, Duration::from_secs(3600))
            .expect("the frees are certain");
        live.add(&block);
        live.remove(&block);
        cache.free(block);
        t.join().unwrap();
        drop(cache);
        quiescent(&pool, &live);
        all_free(&pool, &live);
    });
}
