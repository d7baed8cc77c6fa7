//! A pool that comes to rest gives back, with its cold memory, the pages of its frame table
//! that only whole hinted chunks use (what `release_idle` does on demand): a burst of
//! small blocks writes 16 bytes of table per 4 KiB block, which otherwise stays resident.
//!
//! One test in its own process: it measures the process's `Rss - LazyFree`.

use std::time::{Duration, Instant};

use pagepool::PagePool;

mod common;

use common::{MIB, held};

#[test]
fn a_resting_pool_gives_back_the_frame_table_under_its_hinted_chunks() {
    // `PoolAlloc`'s hinting: blocks of 64 KiB and up while busy, of 16 KiB and up at rest.
    let pool = PagePool::builder()
        .capacity(512 * MIB)
        .hint_min_order(4)
        .idle_hint_min_order(2)
        .hint_delay(Duration::from_millis(50))
        .hint_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let Some(base) = held() else { return };
    // 256 MiB of 4 KiB blocks: 1 MiB of frame table written.
    let mut live = Vec::with_capacity(256 * MIB / 4096);
    while let Ok(mut block) = pool.alloc(0) {
        block.as_mut_slice()[0] = 1;
        live.push(block);
        if live.len() == live.capacity() {
            break;
        }
    }
    assert_eq!(live.len(), 256 * MIB / 4096);
    for block in live.drain(..) {
        pool.free(block);
    }
    drop(live);
    // Lazily freed pages the kernel has not moved off its per-CPU batch yet still count
    // (up to 31 pages per CPU); the frame table alone would be 1 MiB.
    let slack = 512 * 1024;
    let start = Instant::now();
    let mut above = u64::MAX;
    while start.elapsed() < Duration::from_secs(20) {
        above = held().unwrap().saturating_sub(base);
        if above <= slack {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        above <= slack,
        "{} KiB above the baseline 20 s after the burst was freed\n{}",
        above >> 10,
        pool.stats()
    );
}
