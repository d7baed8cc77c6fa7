//! Small, single-threaded tests of the unsafe core (region, frame table, buddy lists,
//! small-block cache, hinting bookkeeping) on a heap-backed region, sized so that Miri runs
//! them in reasonable time:
//!
//! ```text
//! cargo +nightly miri test --test miri_core
//! ```
//!
//! They also run under plain `cargo test`. One test uses two threads, so Miri's data-race
//! detector also sees a cross-thread free.

use std::ptr::NonNull;

use pagepool::{Backing, Block, FreeError, HintMode, PagePool, PoolBuilder, block_size};

mod common;

use common::{assert_balanced, assert_whole_chunks};

/// Chunks of order 3 (32 KiB): four of them make a 128 KiB region.
const MAX: u8 = 3;

fn builder(chunks: usize) -> PoolBuilder {
    PagePool::builder()
        .capacity(chunks * block_size(MAX))
        .max_order(MAX)
        .shards(2)
        .backing(Backing::Heap)
        .hint_thread(false)
        .hint_min_order(1)
}

/// Writes every byte of the block (Miri checks each write is in bounds and allowed).
fn stamp(block: &mut Block, tag: u8) {
    for (i, byte) in block.as_mut_slice().iter_mut().enumerate() {
        *byte = tag ^ (i as u8);
    }
}

fn verify(block: &Block, tag: u8) {
    for (i, &byte) in block.as_slice().iter().enumerate() {
        assert_eq!(
            byte,
            tag ^ (i as u8),
            "byte {i} of block {:p}",
            block.as_ptr()
        );
    }
}

#[test]
fn split_merge_every_order() {
    let pool = builder(2).cache_blocks(0).build().unwrap();
    for order in 0..=MAX {
        let mut block = pool.alloc(order).unwrap();
        stamp(&mut block, order);
        verify(&block, order);
        assert_balanced(&pool);
        pool.free(block);
    }
    assert_whole_chunks(&pool);
}

#[test]
fn fill_the_pool_then_free_in_an_odd_order() {
    let pool = builder(2).cache_blocks(2).build().unwrap();
    let mut blocks = Vec::new();
    let mut order = 0u8;
    loop {
        match pool.alloc_on(blocks.len(), order % 3) {
            Ok(mut block) => {
                stamp(&mut block, blocks.len() as u8);
                blocks.push(block);
            }
            Err(_) if !order.is_multiple_of(3) => {}
            Err(_) => break,
        }
        order = order.wrapping_add(1);
    }
    assert_balanced(&pool);
    assert_eq!(pool.stats().free_bytes, 0);
    let n = blocks.len();
    let mut tagged: Vec<_> = blocks.into_iter().enumerate().collect();
    tagged.sort_by_key(|&(i, _)| (i * 5) % n);
    for (i, block) in tagged {
        verify(&block, i as u8);
        pool.free(block);
    }
    assert_whole_chunks(&pool);
}

#[test]
fn raw_frees_and_bad_pointers() {
    let pool = builder(1).build().unwrap();
    let block = pool.alloc(1).unwrap();
    let ptr = block.into_raw();
    // Pointers derived from the block keep its provenance.
    let interior = NonNull::new(ptr.as_ptr().wrapping_add(4096)).unwrap();
    let unaligned = NonNull::new(ptr.as_ptr().wrapping_add(1)).unwrap();
    let mut outside = 0u8;
    let before = pool.stats();
    // SAFETY (all of these): the pool refuses these pointers without touching memory.
    unsafe {
        assert_eq!(pool.free_raw(interior), Err(FreeError::NotBlockStart));
        assert_eq!(pool.free_raw(unaligned), Err(FreeError::NotBlockStart));
        assert_eq!(
            pool.free_raw(NonNull::from(&mut outside)),
            Err(FreeError::OutsideRegion)
        );
        assert_eq!(
            pool.free_raw_order(ptr, 0),
            Err(FreeError::WrongOrder {
                given: 0,
                actual: 1
            })
        );
    }
    assert_eq!(pool.stats(), before);
    // SAFETY: a live block, freed once.
    assert_eq!(unsafe { pool.free_raw(ptr) }, Ok(1));
    // SAFETY: already freed: refused.
    assert_eq!(unsafe { pool.free_raw(ptr) }, Err(FreeError::AlreadyFree));
    assert_whole_chunks(&pool);
}

#[test]
fn grow_shrink_and_zeroed() {
    let pool = builder(1).cache_blocks(0).build().unwrap();
    let mut block = pool.alloc(0).unwrap();
    stamp(&mut block, 9);
    assert!(pool.try_grow(&mut block, 2));
    assert_eq!(
        block.as_slice()[..4096]
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b != 9 ^ i as u8)
            .count(),
        0
    );
    pool.shrink(&mut block, 1);
    assert_balanced(&pool);
    pool.free(block);
    let mut dirty = pool.alloc(2).unwrap();
    stamp(&mut dirty, 1);
    pool.free(dirty);
    let zeroed = pool.alloc_zeroed(2).unwrap();
    assert!(zeroed.as_slice().iter().all(|&b| b == 0));
    pool.free(zeroed);
    assert_whole_chunks(&pool);
}

#[test]
fn hinting_bookkeeping_both_modes() {
    for mode in [HintMode::Free, HintMode::DontNeed] {
        let pool = builder(2)
            .cache_blocks(4)
            .keep_chunks(4)
            .hint_mode(mode)
            .build()
            .unwrap();
        let mut a = pool.alloc(1).unwrap();
        stamp(&mut a, 3);
        // A written block of the hint order, freed: resident, so hinting has work. Its
        // order may be one the per-CPU caches hold (they keep it warm, see `hint_now`).
        let mut b = pool.alloc(1).unwrap();
        stamp(&mut b, 5);
        pool.free(b);
        pool.drain_caches();
        let report = pool.hint_now();
        assert!(report.blocks >= 1, "{report:?}");
        assert_balanced(&pool);
        verify(&a, 3);
        pool.free(a);
        assert_whole_chunks(&pool);
        if mode == HintMode::DontNeed {
            // Hinted with DONTNEED (emulated by zeroing on the heap): known zero.
            let z = pool.alloc_zeroed(MAX).unwrap();
            assert!(z.as_slice().iter().all(|&b| b == 0));
            pool.free(z);
        }
    }
}

#[test]
fn deterministic_random_sequence() {
    let pool = builder(3).cache_blocks(3).keep_chunks(1).build().unwrap();
    let mut live: Vec<(Block, u8)> = Vec::new();
    let mut x = 0x2545_F491u64;
    let steps = if cfg!(miri) { 120 } else { 2000 };
    for step in 0..steps {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 10 {
            0..=4 => {
                if let Ok(mut block) =
                    pool.alloc_on((x >> 8) as usize, ((x >> 16) % (MAX as u64 + 1)) as u8)
                {
                    let tag = step as u8;
                    block.as_mut_slice()[0] = tag;
                    let len = block.len();
                    block.as_mut_slice()[len - 1] = !tag;
                    live.push((block, tag));
                }
            }
            5..=8 if !live.is_empty() => {
                let (block, tag) = live.swap_remove((x >> 20) as usize % live.len());
                assert_eq!(
                    (block.as_slice()[0], block.as_slice()[block.len() - 1]),
                    (tag, !tag)
                );
                pool.free(block);
            }
            _ => {
                pool.hint_now();
            }
        }
        if step % 16 == 0 {
            assert_balanced(&pool);
        }
    }
    for (block, _) in live {
        pool.free(block);
    }
    assert_whole_chunks(&pool);
}

#[test]
fn free_from_another_thread() {
    let pool = builder(2).build().unwrap();
    let mut a = pool.alloc_on(0, 1).unwrap();
    let mut b = pool.alloc_on(1, 1).unwrap();
    stamp(&mut a, 1);
    stamp(&mut b, 2);
    std::thread::scope(|s| {
        s.spawn(|| {
            verify(&a, 1);
            pool.free(a);
        });
        s.spawn(|| {
            let c = pool.alloc_on(0, 0).unwrap();
            pool.free(c);
        });
        verify(&b, 2);
        pool.free(b);
    });
    assert_whole_chunks(&pool);
}

/// A `LocalCache` hands out, zeroes and takes back blocks, one of them freed into another
/// thread's cache, and returns everything when dropped.
#[test]
fn local_caches_round_trip() {
    let pool = builder(2).build().unwrap();
    let mut cache = pool.local_cache_with(4);
    let mut blocks: Vec<Block> = (0..6).map(|_| cache.alloc(0).unwrap()).collect();
    for block in &mut blocks {
        block.as_mut_slice().fill(7);
    }
    let zeroed = cache.alloc_zeroed(1).unwrap();
    assert!(zeroed.as_slice().iter().all(|&b| b == 0));
    let theirs_to_free = blocks.split_off(3);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut theirs = pool.local_cache_with(4);
            for block in theirs_to_free {
                assert!(block.as_slice().iter().all(|&b| b == 7));
                theirs.free(block);
            }
        });
    });
    for block in blocks {
        cache.free(block);
    }
    cache.free(zeroed);
    drop(cache);
    assert_balanced(&pool);
    assert_whole_chunks(&pool);
}

/// Guards free on drop, an owned block keeps its pool alive, and a pending `alloc_async`
/// completed by a free and then dropped gives its block back: the unsafe parts of the
/// ownership types (`ManuallyDrop` takes, the shared cache's pool reference) under Miri.
#[test]
fn guards_owned_blocks_and_a_cancelled_async_wait() {
    use std::future::Future;
    use std::task::{Context, Waker};

    let pool = std::sync::Arc::new(builder(1).capture_min_order(1).build().unwrap());
    {
        let mut guard = pool.alloc_guarded(0).unwrap();
        guard[0] = 1;
        let owned = pool.alloc_owned(0).unwrap();
        assert_eq!(owned.len(), 4096);
        let block = guard.into_block();
        pool.free(block);
    }
    let mut cache = pool.local_cache_shared_with(2);
    let b = cache.alloc(0).unwrap();
    cache.free(b);
    drop(cache);
    assert_balanced(&pool);

    // Exhaust, wait for order 1, free a pair of buddies: the request is filled.
    let mut held: Vec<Block> = std::iter::from_fn(|| pool.alloc(0).ok()).collect();
    let mut fut = Box::pin(pool.alloc_async(1));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    held.sort_by_key(|b| b.as_ptr() as usize);
    let (a, b) = (held.remove(0), held.remove(0));
    pool.free(a);
    pool.free(b);
    assert_eq!(
        pool.stats().capture.captures,
        1,
        "the pair went to the request"
    );
    drop(fut); // cancelled after the hand-off: the block goes back
    for block in held {
        pool.free(block);
    }
    assert_balanced(&pool);
    assert_eq!(pool.stats().allocated_bytes, 0);
}
