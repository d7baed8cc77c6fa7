//! Capture: waiting requests take blocks as concurrent frees coalesce them.

use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pagepool::{AllocError, Block, PagePool, PoolBuilder};

mod common;

use common::{assert_all_free, quiet};

/// Allocates every block of `order` the pool has.
fn fill(pool: &PagePool, order: u8) -> Vec<Block> {
    let mut blocks = Vec::new();
    while let Ok(block) = pool.alloc(order) {
        blocks.push(block);
    }
    assert_eq!(
        pool.alloc(0).map(|b| pool.free(b)),
        Err(AllocError::Exhausted { order: 0 })
    );
    blocks
}

#[test]
fn a_free_on_another_thread_and_shard_hands_the_block_over() {
    let pool = quiet(2, 2).cache_blocks(0).build().unwrap();
    // Chunk 0 goes to shard 0, chunk 1 to shard 1, both cut into order-9 halves.
    let mut shard0: Vec<Block> = (0..2).map(|_| pool.alloc_on(0, 9).unwrap()).collect();
    let mut shard1: Vec<Block> = (0..2).map(|_| pool.alloc_on(1, 9).unwrap()).collect();
    assert!(pool.alloc(0).is_err());
    let target = shard1[0].as_ptr() as usize;
    let got = std::thread::scope(|s| {
        let waiter = s.spawn(|| pool.alloc_wait(9, Duration::from_secs(10)));
        while pool.stats().capture.waiting == 0 {
            std::thread::yield_now();
        }
        // Freed on another thread, into shard 1, while the waiter's thread may run anywhere.
        s.spawn(|| pool.free(shard1.remove(0))).join().unwrap();
        waiter.join().unwrap()
    })
    .expect("the waiter gets the freed block");
    assert_eq!(
        got.as_ptr() as usize,
        target,
        "the very block that was freed"
    );
    assert_eq!(pool.stats().capture.captures, 1);
    pool.free(got);
    for b in shard0.drain(..).chain(shard1.drain(..)) {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn a_larger_coalesced_block_is_split_and_the_rest_freed() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let mut blocks = fill(&pool, 3); // 128 blocks of 32 KiB
    let got = std::thread::scope(|s| {
        let waiter = s.spawn(|| pool.alloc_wait(5, Duration::from_secs(10)));
        while pool.stats().capture.waiting == 0 {
            std::thread::yield_now();
        }
        // Free the first 16 order-3 blocks: they coalesce up to order 7; the waiter takes
        // the lower order-5 part and orders 5 and 6 are freed.
        for b in blocks.drain(..16) {
            pool.free(b);
        }
        waiter.join().unwrap()
    })
    .expect("captured");
    assert_eq!(got.order(), 5);
    let s = pool.stats();
    assert_eq!(s.capture.captures, 1);
    assert_eq!(
        s.orders[5].free + s.orders[6].free,
        2,
        "the remainder is free:\n{s}"
    );
    assert_eq!(s.free_bytes, (16 * 32 - 128) << 10);
    pool.free(got);
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn timeout_with_a_block_arriving_at_the_deadline_leaks_nothing() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let mut blocks = fill(&pool, 9);
    let (mut ok, mut timeouts) = (0, 0);
    for round in 0..40 {
        let timeout = Duration::from_millis(5);
        let barrier = Barrier::new(2);
        let result = std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                barrier.wait();
                pool.alloc_wait(9, timeout)
            });
            barrier.wait();
            // Free right around the deadline: a little before, at, or after it.
            std::thread::sleep(
                timeout + Duration::from_micros(250 * (round % 8)) - Duration::from_millis(1),
            );
            pool.free(blocks.pop().unwrap());
            waiter.join().unwrap()
        });
        match result {
            Ok(block) => {
                ok += 1;
                blocks.push(block);
            }
            Err(AllocError::Timeout { order: 9 }) => {
                timeouts += 1;
                // The block was not captured, so it is on a free list: take it back.
                blocks.push(pool.alloc(9).expect("the freed block is free, not lost"));
            }
            Err(other) => panic!("unexpected {other}"),
        }
        let s = pool.stats();
        assert_eq!(
            s.allocated_bytes,
            2 * (2 << 20),
            "round {round}: a block leaked or doubled:\n{s}"
        );
        assert_eq!(s.capture.waiting, 0);
    }
    println!("{ok} captured, {timeouts} timed out");
    assert_eq!(pool.stats().capture.timeouts, timeouts);
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn several_waiters_of_one_order_are_served_first_come_first_served() {
    let pool = quiet(2, 1).cache_blocks(0).build().unwrap();
    let mut blocks = fill(&pool, 9); // 4 halves
    let served = AtomicUsize::new(0);
    let results = std::thread::scope(|s| {
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (pool, served) = (&pool, &served);
            waiters.push(s.spawn(move || {
                let block = pool.alloc_wait(9, Duration::from_secs(10)).unwrap();
                (i, served.fetch_add(1, Ordering::SeqCst), block)
            }));
            // Register in order 0, 1, 2.
            while pool.stats().capture.waiting < i as u64 + 1 {
                std::thread::yield_now();
            }
        }
        let mut freed = Vec::new();
        for _ in 0..3 {
            let b = blocks.pop().unwrap();
            freed.push(b.as_ptr() as usize);
            pool.free(b);
        }
        let got: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        (freed, got)
    });
    let (freed, got) = results;
    for (i, _, block) in &got {
        assert_eq!(
            block.as_ptr() as usize,
            freed[*i],
            "waiter {i} should get the {i}th freed block"
        );
    }
    for (_, _, b) in got {
        pool.free(b);
    }
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn waiters_of_different_orders_wait_at_once() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let mut blocks = fill(&pool, 0);
    let (a, b) = std::thread::scope(|s| {
        let big = s.spawn(|| pool.alloc_wait(8, Duration::from_secs(10)));
        while pool.stats().capture.waiting < 1 {
            std::thread::yield_now();
        }
        let small = s.spawn(|| pool.alloc_wait(3, Duration::from_secs(10)));
        while pool.stats().capture.waiting < 2 {
            std::thread::yield_now();
        }
        // Frames 0..8 coalesce to order 3 (too small for the older order-8 request, so the
        // order-3 one gets it), then frames 256..512 coalesce to order 8.
        let mut rest = blocks.split_off(8);
        let upper: Vec<Block> = rest.drain(248..504).collect();
        for b in blocks.drain(..).chain(upper) {
            pool.free(b);
        }
        blocks = rest;
        (big.join().unwrap(), small.join().unwrap())
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.order(), b.order()), (8, 3));
    pool.free(a);
    pool.free(b);
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn reclaim_callback_that_frees_in_pieces_gets_its_block() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let mut owned = fill(&pool, 0); // the buffer manager's pages
    // Evict in allocation order, 8 frames per round: the block forms after 4 rounds.
    owned.reverse();
    let block = pool
        .alloc_with_reclaim(5, || {
            for _ in 0..8 {
                match owned.pop() {
                    Some(b) => pool.free(b),
                    None => return false,
                }
            }
            true
        })
        .unwrap();
    assert_eq!(block.order(), 5);
    let s = pool.stats();
    assert_eq!(s.capture.reclaim_rounds, 4);
    assert_eq!(s.capture.captures, 1);
    assert_eq!(
        s.free_bytes, 0,
        "nothing else freed: the block went straight to the reclaimer"
    );
    pool.free(block);
    for b in owned {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn reclaim_that_cannot_succeed_reports_it() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let blocks = fill(&pool, 0);
    let mut rounds = 0;
    let err = pool
        .alloc_with_reclaim(4, || {
            rounds += 1;
            rounds < 3 // "evicts" twice without freeing anything, then gives up
        })
        .unwrap_err();
    assert_eq!(
        err,
        AllocError::ReclaimFailed {
            order: 4,
            rounds: 2
        }
    );
    assert_eq!(pool.stats().capture.waiting, 0, "the request was withdrawn");
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn a_panicking_reclaim_callback_leaves_nothing_behind() {
    // A 4 MiB pool exhausted with order-3 blocks.
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let mut blocks = fill(&pool, 3);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.alloc_with_reclaim(3, || panic!("the eviction callback failed"))
    }));
    assert!(panicked.is_err());
    let s = pool.stats();
    assert_eq!(s.capture.waiting, 0, "the request was left published:\n{s}");
    // Frees afterwards list their blocks; nothing goes to a dead request.
    let last = blocks.pop().unwrap();
    pool.free(last);
    assert_eq!(pool.stats().capture.captures, 0);
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
    pool.free(pool.alloc(10).expect("the whole chunk is free again"));

    // The callback frees a block (captured for the request), then panics: the captured
    // block is freed again, not leaked.
    let mut blocks = fill(&pool, 3);
    let mut spare = blocks.pop();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.alloc_with_reclaim(3, || {
            if let Some(b) = spare.take() {
                pool.free(b);
                return true;
            }
            panic!("second round fails")
        })
    }));
    // The first round's free may already have served the request.
    if let Ok(Ok(block)) = panicked {
        pool.free(block);
    }
    assert_eq!(pool.stats().capture.waiting, 0);
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
    pool.free(pool.alloc(10).expect("nothing leaked"));
}

#[test]
fn a_reclaim_callback_that_frees_nothing_is_bounded() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let blocks = fill(&pool, 0);
    let mut calls = 0u64;
    // Claims progress for ever but frees nothing: it used to run without end.
    let err = pool
        .alloc_with_reclaim(3, || {
            calls += 1;
            true
        })
        .unwrap_err();
    assert_eq!(
        err,
        AllocError::ReclaimFailed {
            order: 3,
            rounds: pagepool::RECLAIM_STALL_ROUNDS
        }
    );
    assert_eq!(calls, pagepool::RECLAIM_STALL_ROUNDS as u64);
    // The same below the capture order.
    let err = pool.alloc_with_reclaim(1, || true).unwrap_err();
    assert_eq!(
        err,
        AllocError::ReclaimFailed {
            order: 1,
            rounds: pagepool::RECLAIM_STALL_ROUNDS
        }
    );
    assert_eq!(pool.stats().capture.waiting, 0);
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn small_orders_never_wait() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let blocks = fill(&pool, 0);
    let start = Instant::now();
    assert_eq!(
        pool.alloc_wait(2, Duration::from_secs(10)).unwrap_err(),
        AllocError::Exhausted { order: 2 }
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "an order below the capture minimum waited"
    );
    assert_eq!(pool.stats().capture.waits, 0);
    for b in blocks {
        pool.free(b);
    }
}

#[test]
fn with_capture_off_a_waiter_polls_until_its_deadline() {
    let pool = quiet(1, 1).cache_blocks(0).capture(false).build().unwrap();
    let mut blocks = fill(&pool, 9);
    assert_eq!(
        pool.alloc_wait(9, Duration::from_millis(20)).unwrap_err(),
        AllocError::Timeout { order: 9 }
    );
    let got = std::thread::scope(|s| {
        let waiter = s.spawn(|| pool.alloc_wait(9, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        pool.free(blocks.pop().unwrap());
        waiter.join().unwrap()
    });
    let got = got.expect("polling finds the freed block");
    let s = pool.stats();
    assert_eq!(s.capture.captures, 0, "capture is off");
    assert_eq!(s.capture.timeouts, 1);
    pool.free(got);
    for b in blocks {
        pool.free(b);
    }
    assert_all_free(&pool);
}

#[test]
fn wait_returns_at_once_when_a_block_is_free() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let block = pool.alloc_wait(9, Duration::from_secs(10)).unwrap();
    assert_eq!(pool.stats().capture.waits, 0);
    pool.free(block);
    assert_eq!(
        pool.alloc_wait(11, Duration::from_secs(1)).unwrap_err(),
        AllocError::OrderTooLarge {
            order: 11,
            max_order: 10
        }
    );
}

/// A one-chunk pool cut into order-0 blocks, sorted by address, with the frames in `free`
/// freed again.
fn order0_pool(
    builder: PoolBuilder,
    free: impl Iterator<Item = usize>,
) -> (PagePool, Vec<Option<Block>>) {
    let pool = builder.build().unwrap();
    let mut blocks = fill(&pool, 0);
    blocks.sort_by_key(|b| b.as_ptr() as usize);
    let mut blocks: Vec<Option<Block>> = blocks.into_iter().map(Some).collect();
    for frame in free {
        pool.free(blocks[frame].take().unwrap());
    }
    (pool, blocks)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::yield_now();
    }
}

#[test]
fn a_waiter_reserves_the_fullest_region_and_others_cannot_take_its_pieces() {
    // Region 0 (frames 0..512) is half free, region 1 has ten free frames.
    let (pool, mut blocks) = order0_pool(quiet(1, 1).cache_blocks(0), (0..256).chain(600..610));
    let base = blocks[256].as_ref().unwrap().as_ptr() as usize - 256 * 4096;
    std::thread::scope(|s| {
        let waiter = s.spawn(|| pool.alloc_wait(9, Duration::from_secs(30)));
        wait_until("the region is reserved", || {
            pool.stats().capture.reservations == 1
        });
        pool.check_consistency().unwrap();
        // Only region 1's ten pieces are left to others.
        let mut taken = Vec::new();
        while let Ok(block) = pool.alloc(0) {
            assert!(
                block.as_ptr() as usize >= base + 512 * 4096,
                "took a reserved piece"
            );
            taken.push(block);
        }
        assert_eq!(taken.len(), 10);
        let s = pool.stats();
        assert_eq!(
            s.free_bytes,
            256 * 4096,
            "reserved pieces still count as free:\n{s}"
        );
        // The owners free the rest of region 0: the whole region goes to the waiter.
        for block in &mut blocks[256..512] {
            pool.free(block.take().unwrap());
        }
        let got = waiter.join().unwrap().expect("the region completes");
        assert_eq!(got.as_ptr() as usize, base, "the reserved region itself");
        assert_eq!(pool.stats().capture.captures, 1);
        pool.check_consistency().unwrap();
        pool.free(got);
        for block in taken {
            pool.free(block);
        }
    });
    for block in blocks.into_iter().flatten() {
        pool.free(block);
    }
    assert_all_free(&pool);
}

#[test]
fn a_timed_out_waiter_gives_its_reserved_pieces_back() {
    let (pool, blocks) = order0_pool(quiet(1, 1).cache_blocks(0), 0..300);
    let got = pool.alloc_wait(9, Duration::from_millis(20));
    assert_eq!(got.unwrap_err(), AllocError::Timeout { order: 9 });
    let s = pool.stats();
    assert_eq!(s.capture.reservations, 1);
    pool.check_consistency().unwrap();
    // Every free piece is allocatable again.
    let again: Vec<Block> = std::iter::from_fn(|| pool.alloc(0).ok()).collect();
    assert_eq!(again.len(), 300);
    for block in again.into_iter().chain(blocks.into_iter().flatten()) {
        pool.free(block);
    }
    assert_all_free(&pool);
}

#[test]
fn a_reclaiming_caller_reserves_too() {
    let (pool, mut blocks) = order0_pool(quiet(1, 1).cache_blocks(0), 0..128);
    let mut next = 128;
    let mut stolen = Vec::new();
    let got = pool
        .alloc_with_reclaim(9, || {
            // Another allocation between the callback's frees finds nothing to take in the
            // reserved region, so the frees complete it.
            if let Ok(block) = pool.alloc(0) {
                stolen.push(block);
            }
            for _ in 0..128 {
                pool.free(blocks[next].take().unwrap());
                next += 1;
            }
            true
        })
        .expect("the callback frees the region");
    assert!(stolen.is_empty(), "an allocation took a reserved piece");
    assert_eq!(
        got.as_ptr(),
        blocks[600]
            .as_ref()
            .unwrap()
            .as_ptr()
            .wrapping_sub(600 * 4096)
    );
    let s = pool.stats();
    assert_eq!((s.capture.reservations, s.capture.captures), (1, 1));
    pool.free(got);
    for block in blocks.into_iter().flatten() {
        pool.free(block);
    }
    assert_all_free(&pool);
}

#[test]
fn with_reservation_off_other_allocations_take_the_pieces() {
    let (pool, mut blocks) =
        order0_pool(quiet(1, 1).cache_blocks(0).capture_reserve(false), 0..256);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| pool.alloc_wait(9, Duration::from_secs(30)));
        wait_until("the request waits", || pool.stats().capture.waiting == 1);
        let taken: Vec<Block> = std::iter::from_fn(|| pool.alloc(0).ok()).collect();
        assert_eq!(taken.len(), 256);
        assert_eq!(pool.stats().capture.reservations, 0);
        // A whole region still reaches the waiter: free region 1 entirely.
        for block in &mut blocks[512..1024] {
            pool.free(block.take().unwrap());
        }
        let got = waiter.join().unwrap().expect("region 1 completes");
        assert_eq!(got.as_ptr(), taken[0].as_ptr().wrapping_add(512 * 4096));
        pool.free(got);
        for block in taken {
            pool.free(block);
        }
    });
    for block in blocks.into_iter().flatten() {
        pool.free(block);
    }
    assert_all_free(&pool);
}
