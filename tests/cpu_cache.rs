//! Per-CPU caches in front of the shards: what they hold is free memory that the pool
//! accounts for, gives back when it runs dry, when capture waits and when idle; bad input
//! is still refused on the lock-free paths; both implementations behave alike.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use pagepool::{AllocError, CpuCacheMode, FreeError, PagePool};

mod common;

use common::{assert_all_free, assert_balanced, cached};

/// The implementations to test: portable always, rseq where the process has it.
fn modes() -> Vec<CpuCacheMode> {
    let mut modes = vec![CpuCacheMode::Portable];
    match cached(1, 1).cpu_cache(CpuCacheMode::Rseq).build() {
        Ok(_) => modes.push(CpuCacheMode::Rseq),
        Err(err) => println!("skipping rseq: {err}"),
    }
    modes
}

fn pool(mode: CpuCacheMode, chunks: usize) -> PagePool {
    cached(chunks, 1)
        .cpu_cache(mode)
        .cache_blocks(0)
        .build()
        .unwrap()
}

#[test]
fn the_mode_asked_for_is_the_mode_that_runs() {
    for mode in modes() {
        let s = pool(mode, 1).stats();
        assert_eq!(s.cpu_cache, Some(mode), "{s}");
    }
    let off = cached(1, 1).cpu_cache(CpuCacheMode::Off).build().unwrap();
    assert_eq!(off.stats().cpu_cache, None);
    let none = cached(1, 1).cpu_cache_bytes(0).build().unwrap();
    assert_eq!(
        none.stats().cpu_cache,
        None,
        "a zero budget turns the caches off"
    );
}

#[test]
fn freed_blocks_wait_in_the_cache_and_count_as_free() {
    for mode in modes() {
        let pool = pool(mode, 4);
        let mut block = pool.alloc(2).unwrap();
        // The refill took a batch: the cache holds the rest of it.
        let refilled = pool.stats().cpu_cache_bytes;
        block.as_mut_slice()[0] = 9;
        let addr = block.as_ptr();
        pool.free(block);
        let s = assert_balanced(&pool);
        assert_eq!(s.cpu_cache_bytes, refilled + (16 << 10), "{s}");
        assert_eq!(
            s.allocated_bytes, 0,
            "cached blocks are not allocated:\n{s}"
        );
        assert_eq!(s.orders[2].cpu_cached * (16 << 10), s.cpu_cache_bytes);
        assert_eq!(
            s.cpu_cache_bytes_per_cpu.iter().sum::<u64>(),
            s.cpu_cache_bytes
        );
        // The hottest block comes back first, from the cache.
        let again = pool.alloc(2).unwrap();
        assert_eq!(again.as_ptr(), addr);
        assert_eq!(pool.stats().cpu_cache_bytes, refilled);
        pool.free(again);
        assert_all_free(&pool);
        assert_eq!(pool.stats().cpu_cache_bytes, 0, "drain_caches empties them");
    }
}

/// Allocates up to `n` blocks of every order and frees them, checking after each order
/// that no CPU's cache holds more than `limit` bytes; `each` sees each order's snapshot.
fn churn_every_order(
    pool: &PagePool,
    n: usize,
    limit: u64,
    what: &str,
    mut each: impl FnMut(u8, &pagepool::Stats),
) {
    for order in 0..10u8 {
        let blocks: Vec<_> = (0..n).map_while(|_| pool.alloc(order).ok()).collect();
        for b in blocks {
            pool.free(b);
        }
        let s = pool.stats();
        for (cpu, &bytes) in s.cpu_cache_bytes_per_cpu.iter().enumerate() {
            assert!(
                bytes <= limit,
                "{what}: cpu {cpu} holds {bytes} B, over its {limit} B:\n{s}"
            );
        }
        each(order, &s);
    }
}

#[test]
fn caches_are_bounded_in_bytes_per_cpu() {
    for mode in modes() {
        for budget in [64 << 10, 1 << 20, 8 << 20] {
            let pool = cached(16, 1)
                .cpu_cache(mode)
                .cpu_cache_bytes(budget)
                .build()
                .unwrap();
            churn_every_order(&pool, 100, budget as u64, "budget", |_, _| {});
            assert_all_free(&pool);
        }
    }
}

/// The default budget (8 MiB per CPU) is capped in a small pool: every CPU's cache holds
/// at most its share of half the capacity, whatever the orders churned, and the caches
/// still serve.
#[test]
fn a_small_pool_caps_each_cache_at_its_share_of_half_the_pool() {
    for mode in modes() {
        for chunks in [1, 2, 4] {
            let pool = cached(chunks, 1).cpu_cache(mode).build().unwrap();
            let capacity = pool.stats().capacity as u64;
            let cpus = pool.stats().cpu_cache_bytes_per_cpu.len() as u64;
            assert!(cpus >= 1);
            let share = capacity / 2 / cpus;
            churn_every_order(&pool, 64, share, &format!("{chunks} chunks"), |order, s| {
                if order == 0 && share >= 4096 {
                    assert!(s.cpu_cache_bytes > 0, "the caches still serve:\n{s}");
                }
            });
            assert_all_free(&pool);
        }
    }
}

#[test]
fn an_allocation_drains_the_caches_before_it_fails() {
    for mode in modes() {
        // One chunk: fill it with order-0 blocks, free them all (into the cache and, past
        // its bound, the shard), then ask for the whole chunk.
        let pool = pool(mode, 1);
        let blocks: Vec<_> = std::iter::from_fn(|| pool.alloc(0).ok()).collect();
        assert_eq!(blocks.len(), 1024);
        for b in blocks {
            pool.free(b);
        }
        assert!(pool.stats().cpu_cache_bytes > 0);
        let chunk = pool
            .alloc(10)
            .expect("cached blocks merged back into a chunk");
        assert_eq!(pool.stats().cpu_cache_bytes, 0);
        assert_eq!(
            pool.alloc(0).map(|b| pool.free(b)),
            Err(AllocError::Exhausted { order: 0 })
        );
        pool.free(chunk);
        assert_all_free(&pool);
    }
}

#[test]
fn a_waiting_capture_request_bypasses_and_drains_the_caches() {
    for mode in modes() {
        let pool = pool(mode, 1);
        let mut blocks: Vec<_> = std::iter::from_fn(|| pool.alloc(3).ok()).collect();
        // Two buddies freed before anyone waits: they sit in the cache, unmerged.
        let a = blocks.pop().unwrap();
        let b = blocks.pop().unwrap();
        pool.free(a);
        pool.free(b);
        assert_eq!(pool.stats().cpu_cache_bytes, 64 << 10);
        // The waiter drains them into the shard when it publishes, and frees while it
        // waits go to the shard, where they coalesce for it.
        let got = std::thread::scope(|s| {
            let waiter = s.spawn(|| pool.alloc_wait(6, Duration::from_secs(20)));
            while pool.stats().capture.waiting == 0 {
                std::thread::yield_now();
            }
            // Publishing drains the caches (right after the request shows as waiting).
            let start = Instant::now();
            while pool.stats().cpu_cache_bytes != 0 {
                assert!(start.elapsed() < Duration::from_secs(10), "never drained");
                std::thread::yield_now();
            }
            for b in blocks.drain(..16) {
                pool.free(b);
            }
            waiter.join().unwrap()
        })
        .expect("the frees coalesced for the waiter");
        assert_eq!(got.order(), 6);
        pool.free(got);
        for b in blocks {
            pool.free(b);
        }
        assert_all_free(&pool);
    }
}

#[test]
fn an_idle_cache_is_drained_and_hinted() {
    for mode in modes() {
        // Large enough that the default 8 MiB per CPU, which caches a 2 MiB block, is not
        // capped (see `a_small_pool_caps_each_cache_at_its_share_of_half_the_pool`).
        let cpus = cached(1, 1).cpu_cache(mode).build().unwrap();
        let cpus = cpus.stats().cpu_cache_bytes_per_cpu.len();
        let pool = cached(4 * cpus, 1)
            .cpu_cache(mode)
            .hint_thread(true)
            .hint_delay(Duration::from_millis(20))
            .hint_interval(Duration::from_millis(5))
            .build()
            .unwrap();
        // Let the hinter go idle first: the free below must wake it by itself.
        std::thread::sleep(Duration::from_millis(100));
        let mut block = pool.alloc(9).unwrap();
        block.as_mut_slice().fill(3);
        pool.free(block);
        assert_eq!(pool.stats().cpu_cache_bytes, 2 << 20);
        let start = Instant::now();
        loop {
            let s = pool.stats();
            if s.cpu_cache_bytes == 0 && s.resident_free_bytes() == 0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the cached block was never drained and hinted:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn frees_that_find_the_stack_full_fall_back_and_keep_every_block_once() {
    // One CPU, so every free lands on the same stacks and overflows them.
    let cpus = common::allowed_cpus();
    if !common::run_on(&cpus[..1]) {
        println!("skipping: cannot pin this thread");
        return;
    }
    for mode in modes() {
        let pool = cached(4, 1)
            .cpu_cache(mode)
            .cpu_cache_bytes(64 << 10)
            .build()
            .unwrap();
        for order in [0u8, 1] {
            let mut blocks: Vec<_> = (0..64).map(|_| pool.alloc(order).unwrap()).collect();
            for (i, b) in blocks.iter_mut().enumerate() {
                common::stamp(b, i as u8);
            }
            // Alternate the typed and the raw free: both fast paths meet a full stack.
            for (i, b) in blocks.into_iter().enumerate() {
                common::verify(&b, i as u8);
                if i % 2 == 0 {
                    pool.free(b);
                } else {
                    let ptr = b.into_raw();
                    // SAFETY: from `into_raw` of this pool, freed once.
                    assert_eq!(unsafe { pool.free_raw(ptr) }, Ok(order));
                    // SAFETY: the same pointer again: refused, nothing changes.
                    assert_eq!(unsafe { pool.free_raw(ptr) }, Err(FreeError::AlreadyFree));
                }
                let s = assert_balanced(&pool);
                assert!(s.cpu_cache_bytes <= 64 << 10, "{s}");
            }
            let again: Vec<_> = (0..64).map(|_| pool.alloc(order).unwrap()).collect();
            let mut addrs: Vec<_> = again.iter().map(|b| b.as_ptr() as usize).collect();
            addrs.sort_unstable();
            addrs.dedup();
            assert_eq!(addrs.len(), 64, "a block handed out twice");
            again.into_iter().for_each(|b| pool.free(b));
        }
        assert_all_free(&pool);
    }
}

#[test]
fn raw_frees_are_checked_without_a_lock_and_bad_input_is_still_refused() {
    for mode in modes() {
        let pool = pool(mode, 2);
        let block = pool.alloc(2).unwrap();
        let ptr = block.into_raw();
        // SAFETY (whole block): the pointers come from `into_raw` of this pool; the bad
        // ones are refused before anything changes.
        unsafe {
            assert_eq!(pool.order_of(ptr.as_ptr()), Ok(2));
            let inside = NonNull::new(ptr.as_ptr().add(4096)).unwrap();
            assert_eq!(pool.free_raw(inside), Err(FreeError::NotBlockStart));
            assert_eq!(
                pool.free_raw_order(ptr, 3),
                Err(FreeError::WrongOrder {
                    given: 3,
                    actual: 2
                })
            );
            assert_eq!(pool.free_raw(ptr), Ok(2));
            assert!(
                pool.stats().cpu_cache_bytes > 0,
                "the free went to the cache"
            );
            // Freeing it again: its entry says "cached on a CPU".
            assert_eq!(pool.free_raw(ptr), Err(FreeError::AlreadyFree));
            assert_eq!(pool.order_of(ptr.as_ptr()), Err(FreeError::AlreadyFree));
            let foreign = NonNull::new(0x1000 as *mut u8).unwrap();
            assert_eq!(pool.free_raw(foreign), Err(FreeError::OutsideRegion));
            let rebuilt = pool.alloc(2).unwrap().into_raw();
            assert_eq!(rebuilt, ptr, "the cached block is reused");
            let block = pool.block_from_raw(rebuilt).unwrap();
            assert_eq!(block.order(), 2);
            pool.free(block);
        }
        assert_all_free(&pool);
    }
}

#[test]
fn growing_in_place_finds_a_buddy_in_a_cache() {
    for mode in modes() {
        let pool = pool(mode, 1);
        // From the shard directly, in address order.
        let mut low = pool.alloc_on(0, 4).unwrap();
        let high = pool.alloc_on(0, 4).unwrap();
        assert_eq!(high.as_ptr() as usize, low.as_ptr() as usize + (64 << 10));
        pool.free(high); // cached, so not merged
        assert!(
            pool.try_grow(&mut low, 5),
            "the cached buddy was drained and absorbed"
        );
        assert_eq!(low.order(), 5);
        pool.free(low);
        assert_all_free(&pool);
    }
}

#[test]
fn a_pool_dropped_with_blocks_in_its_caches_frees_them() {
    for mode in modes() {
        let pool = pool(mode, 1);
        let live = pool.alloc(0).unwrap();
        let cached_block = pool.alloc(0).unwrap();
        pool.free(cached_block);
        assert!(pool.stats().cpu_cache_bytes > 0);
        drop(pool); // leaks the region for `live`, frees the cached block's memory
        assert_eq!(live.len(), 4096);
    }
}

/// Threads on every CPU allocate and free through the caches while their affinity flips
/// between CPUs (forcing migrations and, with restartable sequences, aborted critical
/// sections) and another thread drains the caches; owner patterns are checked before every
/// free, and at the end the pool is whole.
#[test]
fn migrations_and_drains_keep_every_block_once() {
    for mode in modes() {
        let pool = cached(8, 2).cpu_cache(mode).build().unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let stop = &stop;
            let drainer = {
                let pool = &pool;
                s.spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        pool.drain_caches();
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            };
            let workers: Vec<_> = (0..6u64)
                .map(|t| {
                    let pool = &pool;
                    s.spawn(move || {
                        let mut live = Vec::new();
                        let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                        for i in 0..20_000u64 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            if i % 500 == 0 {
                                common::run_on(&[(x as usize) % cpus]);
                            }
                            if live.len() < 64 && x & 1 == 0 {
                                if let Ok(mut b) = pool.alloc((x % 6) as u8) {
                                    let tag = t << 32 | i;
                                    b.as_mut_slice()[..8].copy_from_slice(&tag.to_ne_bytes());
                                    live.push((b, tag));
                                }
                            } else if let Some((b, tag)) = live.pop() {
                                let got = u64::from_ne_bytes(b.as_slice()[..8].try_into().unwrap());
                                assert_eq!(got, tag, "a block was handed out twice");
                                pool.free(b);
                            }
                        }
                        for (b, _) in live {
                            pool.free(b);
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            drainer.join().unwrap();
        });
        assert_all_free(&pool);
    }
}
