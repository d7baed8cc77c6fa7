//! loom models of the buddy protocols: concurrent frees coalescing across threads, a remote
//! free racing an allocation on the owning shard, and chunks moving between a shard and the
//! shared pool while another thread allocates.
#![cfg(loom)]

mod common;

use common::{Live, all_free, builder, give, model, quiescent, take};
use loom::sync::Arc;
use loom::thread;
use pagepool::block_size;

/// Two buddies of one chunk, freed at the same time from two threads: whichever free runs
/// second must find the other half free and merge into the whole chunk.
#[test]
fn concurrent_buddy_frees_coalesce() {
    model(|| {
        let pool = Arc::new(builder(2, 2).keep_chunks(4).build().unwrap());
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 1).unwrap();
        let b = take(&pool, &live, 0, 1).unwrap();
        assert_eq!(
            b.as_ptr() as usize,
            a.as_ptr() as usize + block_size(1),
            "buddies"
        );
        let t = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || give(&pool, &live, a))
        };
        give(&pool, &live, b);
        t.join().unwrap();
        quiescent(&pool, &live);
        let s = pool.stats();
        assert_eq!(s.orders[2].free, 2, "the buddies did not merge:\n{s}");
        assert_eq!(
            s.free_bytes_per_shard[0],
            block_size(2) as u64,
            "the chunk stays with its owner"
        );
        all_free(&pool, &live);
    });
}

/// A block of shard 0 freed from another thread while the owning shard allocates (from
/// its own thread and from a third one that also uses shard 1): the free goes to the
/// owner, and no allocation gets a block that is still live.
#[test]
fn remote_free_races_allocation_on_the_owner() {
    model(|| {
        let pool = Arc::new(builder(1, 2).keep_chunks(4).build().unwrap());
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 0).unwrap();
        let b = take(&pool, &live, 0, 1).unwrap();
        // Free now: one order-0 block (a's buddy). The free of `a` makes it order 1.
        let freer = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || give(&pool, &live, a))
        };
        let other = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || {
                if let Some(x) = take(&pool, &live, 1, 0) {
                    give(&pool, &live, x);
                }
            })
        };
        let c = take(&pool, &live, 0, 1);
        let d = take(&pool, &live, 0, 0);
        freer.join().unwrap();
        other.join().unwrap();
        quiescent(&pool, &live);
        for block in [c, d].into_iter().flatten() {
            give(&pool, &live, block);
        }
        give(&pool, &live, b);
        all_free(&pool, &live);
    });
}

/// With `keep_chunks(0)` a whole free chunk goes back to the shared pool at once; another
/// thread allocates through the shared pool and from the other shard meanwhile.
#[test]
fn chunk_moves_to_the_shared_pool_while_another_shard_allocates() {
    model(|| {
        let pool = Arc::new(builder(2, 2).keep_chunks(0).build().unwrap());
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 2).unwrap();
        let t = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || give(&pool, &live, a))
        };
        // Shard 1 takes the fresh chunk, then asks for one more: it gets the freed chunk
        // (through the shared pool), or fails only if the free has not happened yet.
        let b = take(&pool, &live, 1, 2).expect("a fresh chunk is left");
        let c = take(&pool, &live, 1, 2);
        t.join().unwrap();
        quiescent(&pool, &live);
        // If it failed, the free has happened now: the chunk must be reachable from shard 1.
        let c =
            c.unwrap_or_else(|| take(&pool, &live, 1, 2).expect("the freed chunk is free memory"));
        give(&pool, &live, c);
        give(&pool, &live, b);
        let s = pool.stats();
        assert_eq!(
            s.free_bytes_per_shard,
            vec![0, 0, s.capacity as u64],
            "keep_chunks(0) keeps nothing:\n{s}"
        );
        all_free(&pool, &live);
    });
}

/// A chunk is given back (its last block freed) while another thread splits a chunk from
/// the shared pool for a small block and a third looks the freed block up by pointer,
/// following the chunk from owner to owner.
#[test]
fn owner_lookup_follows_a_moving_chunk() {
    model(|| {
        let pool = Arc::new(builder(1, 1).keep_chunks(0).build().unwrap());
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 1).unwrap();
        let addr = a.as_ptr() as usize;
        let t = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || give(&pool, &live, a))
        };
        let u = {
            let pool = pool.clone();
            thread::spawn(move || pool.order_of(addr as *const u8))
        };
        let b = take(&pool, &live, 1, 0);
        t.join().unwrap();
        let seen = u.join().unwrap();
        assert!(
            matches!(seen, Ok(1) | Ok(0) | Err(pagepool::FreeError::AlreadyFree)),
            "order_of saw {seen:?}"
        );
        quiescent(&pool, &live);
        if let Some(b) = b {
            give(&pool, &live, b);
        }
        all_free(&pool, &live);
    });
}
