//! Ownership that fits Rust: blocks freed on drop (borrowing or sharing the pool), and a
//! per-thread cache in a `thread_local!` of a pool that is not `'static`.

mod common;

use std::cell::RefCell;
use std::sync::Arc;

use common::{assert_all_free, cached, quiet};
use pagepool::{BlockGuard, LocalCache, OwnedBlock, PagePool};

#[test]
fn a_guard_frees_on_drop_and_on_unwind() {
    let pool = quiet(1, 1).build().unwrap();
    {
        let mut page = pool.alloc_guarded(2).unwrap();
        assert_eq!(page.len(), 16 << 10);
        page.fill(7);
        assert!(page.iter().all(|&b| b == 7));
        assert_eq!(pool.stats().allocated_bytes, 16 << 10);
    }
    assert_all_free(&pool);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _page = pool.alloc_guarded(0).unwrap();
        panic!("a panicking user of the block");
    }));
    assert!(unwound.is_err());
    assert_all_free(&pool);
}

#[test]
fn into_block_keeps_it_allocated() {
    let pool = quiet(1, 1).build().unwrap();
    let guard = pool.alloc_guarded(0).unwrap();
    assert!(std::ptr::eq(guard.pool(), &pool));
    let block = guard.into_block();
    assert_eq!(pool.stats().allocated_bytes, 4096);
    let again = BlockGuard::new(block, &pool);
    drop(again);
    assert_all_free(&pool);
}

#[test]
fn a_guard_of_another_pools_block_panics_when_dropped_and_changes_nothing() {
    let a = quiet(1, 1).build().unwrap();
    let b = quiet(1, 1).build().unwrap();
    let block = a.alloc(0).unwrap();
    let ptr = block.as_ptr();
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(BlockGuard::new(block, &b));
    }));
    assert!(
        dropped.is_err(),
        "a foreign block is refused, as by PagePool::free"
    );
    assert_all_free(&b);
    assert_eq!(a.stats().allocated_bytes, 4096);
    // SAFETY: the block of `a` the refused guard leaked, freed once.
    unsafe { a.free_raw(std::ptr::NonNull::new(ptr).unwrap()) }.unwrap();
    assert_all_free(&a);
}

/// An owned block moves to other threads and keeps the pool alive after the last other
/// handle is gone: the pool is dropped (and unmapped) with the last block.
#[test]
fn owned_blocks_keep_the_pool_alive() {
    let pool = Arc::new(quiet(2, 1).build().unwrap());
    let blocks: Vec<OwnedBlock> = (0..8).map(|_| pool.alloc_owned(0).unwrap()).collect();
    let weak = Arc::downgrade(&pool);
    drop(pool);
    let handles: Vec<_> = blocks
        .into_iter()
        .enumerate()
        .map(|(i, mut block)| {
            std::thread::spawn(move || {
                block.fill(i as u8);
                assert!(block.iter().all(|&b| b == i as u8));
                assert_eq!(block.block().order(), 0);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        weak.upgrade().is_none(),
        "the last block took the pool with it"
    );
}

#[test]
fn owned_into_parts_hands_back_block_and_pool() {
    let pool = Arc::new(quiet(1, 1).build().unwrap());
    let owned = pool.alloc_owned(3).unwrap();
    assert!(Arc::ptr_eq(owned.pool(), &pool));
    let (block, back) = owned.into_parts();
    assert_eq!(pool.stats().allocated_bytes, 32 << 10);
    back.free(block);
    assert_all_free(&pool);
}

thread_local! {
    static CACHE: RefCell<Option<LocalCache<'static>>> = const { RefCell::new(None) };
}

/// A cache per thread in a `thread_local!`, of a pool made at run time: the blocks each
/// thread cached go back when the thread exits, and the pool may be dropped by its maker
/// before the threads finish.
#[test]
fn a_thread_local_cache_of_a_runtime_pool() {
    for builder in [quiet(4, 2), cached(4, 2)] {
        let pool = Arc::new(builder.build().unwrap());
        let weak = Arc::downgrade(&pool);
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let pool = pool.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    CACHE.set(Some(pool.local_cache_shared_with(8)));
                    let stats = pool.clone();
                    drop(pool);
                    let mut live = Vec::new();
                    for i in 0..2000 {
                        CACHE.with_borrow_mut(|cache| {
                            let cache = cache.as_mut().unwrap();
                            if i % 3 == 2 {
                                if let Some(block) = live.pop() {
                                    cache.free(block);
                                }
                            } else {
                                let mut block = cache.alloc((i % 2) as u8).unwrap();
                                block.as_mut_slice()[0] = t;
                                live.push(block);
                            }
                        });
                    }
                    CACHE.with_borrow_mut(|cache| {
                        let cache = cache.as_mut().unwrap();
                        for block in live.drain(..) {
                            assert_eq!(block.as_slice()[0], t, "contents survive");
                            cache.free(block);
                        }
                        assert!(cache.held_bytes() > 0, "the cache keeps blocks");
                    });
                    barrier.wait();
                    assert!(stats.stats().local_cache_bytes > 0);
                    // The thread exits with its cache full: the destructor returns it.
                })
            })
            .collect();
        drop(pool);
        for w in workers {
            w.join().unwrap();
        }
        assert!(
            weak.upgrade().is_none(),
            "the last cache took the pool with it"
        );
    }
    // The same, keeping the pool to look at it afterwards.
    let pool = Arc::new(quiet(2, 1).build().unwrap());
    let p = pool.clone();
    std::thread::spawn(move || {
        CACHE.set(Some(p.local_cache_shared()));
        CACHE.with_borrow_mut(|c| {
            let c = c.as_mut().unwrap();
            let b = c.alloc(0).unwrap();
            c.free(b);
        });
    })
    .join()
    .unwrap();
    assert_eq!(pool.stats().local_cache_bytes, 0);
    assert_all_free(&pool);
}

/// A cache of a borrowed pool still works as before; it cannot outlive the pool (a
/// compile-time property of the borrow).
#[test]
fn the_borrowing_cache_is_unchanged() {
    let pool: PagePool = quiet(1, 1).build().unwrap();
    let mut cache = pool.local_cache();
    let b = cache.alloc(0).unwrap();
    cache.free(b);
    drop(cache);
    assert_all_free(&pool);
}
