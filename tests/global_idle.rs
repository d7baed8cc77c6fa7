//! A program under `PoolAlloc` that comes to rest gets its small objects' per-CPU caches
//! drained, on every CPU, including the one the hinter thread wakes up on: the pool's own
//! threads allocate from the fallback allocator, so they never make a CPU look in use.

use std::time::{Duration, Instant};

use pagepool::{GLOBAL_HINT_MIN_ORDER, GLOBAL_IDLE_HINT_MIN_ORDER, GLOBAL_MAX_ORDER, PoolAlloc};
use pagepool::{PoolAllocStats, PoolBuilder};

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::with_config(
    PoolBuilder::new()
        .max_order(GLOBAL_MAX_ORDER)
        .hint_min_order(GLOBAL_HINT_MIN_ORDER)
        .idle_hint_min_order(GLOBAL_IDLE_HINT_MIN_ORDER)
        .hint_delay(Duration::from_millis(100))
        .hint_interval(Duration::from_millis(10)),
);

/// Small objects of many sizes, made and freed on `threads` threads, some freed on another
/// thread than their maker's: every CPU's caches end up holding objects.
fn churn(threads: usize) {
    let made: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..20_000usize {
                        let size = 8 + (i * 37 + t * 101) % 3000;
                        let object = vec![i as u8; size];
                        if i % 3 == 0 {
                            kept.push(object);
                        }
                    }
                    kept
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    drop(made);
}

/// The adapter's counters once no object is cached any more (polling allocates nothing),
/// or after `limit`: the check is the caller's.
fn once_cached_objects_drained(limit: Duration) -> PoolAllocStats {
    let start = Instant::now();
    loop {
        let stats = GLOBAL.stats();
        if stats.slab_cached_bytes == 0 || start.elapsed() > limit {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_resting_program_has_every_cpu_cache_drained() {
    GLOBAL.start_hinter().expect("spawn the hinter");
    churn(8);
    // Nothing below allocates until the check is decided: the hinter is the only thread
    // that runs, and the CPU it runs on must be drained too.
    let stats = once_cached_objects_drained(Duration::from_secs(20));
    assert_eq!(
        stats.slab_cached_bytes, 0,
        "objects still cached in per-CPU caches 20 s after the program came to rest:\n{stats}"
    );
    assert!(
        stats.slab_live_objects < 1_000,
        "the churn's objects were all freed: {stats}"
    );
}
