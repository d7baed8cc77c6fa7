//! loom models of the pool's per-CPU caches (the portable implementation, the one loom can
//! run: a per-CPU lock taken with one swap; under loom every thread runs on "CPU 0"). Frees
//! into the cache race allocations from it, drains of it, and raw double frees; at the
//! end every block is exactly once in the pool.
#![cfg(loom)]

mod common;

use common::{Live, all_free, builder, give, model, quiescent};
use loom::sync::Arc;
use loom::thread;
use pagepool::{CpuCacheMode, FreeError};

/// A pool with per-CPU caches in front of its shards.
fn cached_pool(chunks: usize, max_order: u8) -> pagepool::PagePool {
    builder(chunks, max_order)
        .cpu_cache(CpuCacheMode::Portable)
        .build()
        .unwrap()
}

/// One thread frees a block into the cache while another allocates (from the cache or,
/// when the lock is busy or the cache empty, from the shards) and a third drains the
/// caches into the shards. No block is handed out twice; everything comes back.
#[test]
fn free_alloc_and_drain_race_on_one_cpu() {
    model(|| {
        let pool = Arc::new(cached_pool(1, 1));
        let live = Arc::new(Live::default());
        let a = pool.alloc(0).unwrap();
        live.add(&a);
        let freer = {
            let (pool, live) = (pool.clone(), live.clone());
            thread::spawn(move || give(&pool, &live, a))
        };
        let drainer = {
            let pool = pool.clone();
            thread::spawn(move || pool.drain_caches())
        };
        if let Ok(b) = pool.alloc(0) {
            live.add(&b);
            give(&pool, &live, b);
        }
        freer.join().unwrap();
        drainer.join().unwrap();
        quiescent(&pool, &live);
        all_free(&pool, &live);
    });
}

/// A block freed into the cache and freed again (a raw double free, on the same thread:
/// two threads freeing one block at once break `free_raw`'s contract, like any stale
/// pointer), while another thread drains the caches into the shards: whether the block is
/// still cached, being drained or merged, the second free is refused and the block is in
/// the pool once.
#[test]
fn a_second_free_is_refused_while_a_drain_moves_the_block() {
    model(|| {
        let pool = Arc::new(cached_pool(1, 1));
        let ptr = pool.alloc(0).unwrap().into_raw();
        // SAFETY: a block of this pool, freed once.
        assert_eq!(unsafe { pool.free_raw(ptr) }, Ok(0));
        let drainer = {
            let pool = pool.clone();
            thread::spawn(move || pool.drain_caches())
        };
        // SAFETY: a deliberate double free, which the pool must refuse.
        let again = unsafe { pool.free_raw(ptr) };
        assert!(
            matches!(
                again,
                Err(FreeError::AlreadyFree | FreeError::NotBlockStart)
            ),
            "{again:?}"
        );
        drainer.join().unwrap();
        all_free(&pool, &Live::default());
    });
}
