//! A tour of pagepool: threads allocate and free mixed orders (freeing some of each other's
//! blocks), a `LocalCache` takes the lock off a hot loop, a large request captures a block as frees coalesce it, cold memory is hinted
//! back to the OS, and the stats table shows where every byte is.
//!
//! Run: `cargo run --release --example demo`

use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagepool::{PagePool, ProcessMemory};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let pool = PagePool::builder()
        .capacity(512 << 20)
        .hint_delay(Duration::from_millis(200))
        .hint_interval(Duration::from_millis(20))
        .build()?;
    println!(
        "pool: {} of address space, {} shards, blocks of 4 KiB to {} KiB\n",
        pagepool_human(pool.capacity() as u64),
        pool.shard_count(),
        pagepool::block_size(pool.max_order()) >> 10
    );

    // 1. Mixed orders on every thread; a quarter of the blocks are freed by the next thread.
    let start = Instant::now();
    let ops_per_thread = 200_000;
    std::thread::scope(|s| {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..threads)
            .map(|_| mpsc::channel::<pagepool::Block>())
            .unzip();
        for (t, inbox) in receivers.into_iter().enumerate() {
            let pool = &pool;
            let next = senders[(t + 1) % threads].clone();
            s.spawn(move || {
                let mut rng = t as u64 * 0x9E37_79B9_7F4A_7C15 + 1;
                let mut live: Vec<pagepool::Block> = Vec::new();
                for i in 0..ops_per_thread {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    // Mostly small blocks, some up to 2 MiB.
                    let order = match rng % 100 {
                        0..=59 => 0,
                        60..=84 => (rng % 4) as u8,
                        85..=98 => 4 + (rng % 5) as u8,
                        _ => 9,
                    };
                    if live.len() < 256 || rng.is_multiple_of(2) {
                        if let Ok(mut block) = pool.alloc(order) {
                            block.as_mut_slice()[0] = t as u8;
                            live.push(block);
                        }
                    } else {
                        let victim = live.swap_remove((rng as usize >> 8) % live.len());
                        assert_eq!(
                            victim.as_slice()[0],
                            t as u8,
                            "someone else wrote into our block"
                        );
                        if i % 4 == 0 {
                            let _ = next.send(victim); // the next thread frees it
                        } else {
                            pool.free(victim);
                        }
                    }
                    while let Ok(foreign) = inbox.try_recv() {
                        pool.free(foreign);
                    }
                }
                for block in live {
                    pool.free(block);
                }
                drop(next);
                for foreign in inbox.iter() {
                    pool.free(foreign);
                }
            });
        }
        drop(senders);
    });
    let elapsed = start.elapsed();
    println!(
        "1. {threads} threads did {} alloc/free operations of mixed orders in {:.0?} ({:.0} ns per op per thread)",
        threads * ops_per_thread,
        elapsed,
        elapsed.as_nanos() as f64 / ops_per_thread as f64
    );
    pool.check_consistency()?;

    // 1b. The same 64 KiB block allocated and freed a million times, through the pool (a
    //     shard lock per call) and through a LocalCache (no lock, no atomic RMW).
    let rounds = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..rounds {
        pool.free(pool.alloc(4)?);
    }
    let through_pool = t.elapsed() / rounds;
    let mut cache = pool.local_cache();
    let t = Instant::now();
    for _ in 0..rounds {
        let block = cache.alloc(4)?;
        cache.free(block);
    }
    let through_cache = t.elapsed() / rounds;
    drop(cache); // its blocks go back to the pool
    println!(
        "1b. alloc + free of one 64 KiB block: {through_pool:.0?} through the pool, {through_cache:.1?} through a LocalCache"
    );

    // 2. Capture: fill the pool with 2 MiB blocks, wait for a 4 MiB one while another thread
    //    frees two buddies; the free hands the merged block straight to the waiter.
    let mut halves = Vec::new();
    while let Ok(block) = pool.alloc(9) {
        halves.push(block);
    }
    let waited = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = Instant::now();
            let block = pool.alloc_wait(10, Duration::from_secs(5));
            (block, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        let a = halves.pop().expect("pool holds at least one chunk");
        let b = halves.pop().expect("and a second half");
        pool.free(a);
        pool.free(b);
        waiter.join().expect("waiter thread")
    });
    match waited {
        (Ok(block), took) => {
            println!(
                "2. alloc_wait(order 10) got a 4 MiB block after {took:.1?}, captured from coalescing frees"
            );
            pool.free(block);
        }
        (Err(err), _) => {
            println!("2. alloc_wait(order 10): {err} (the freed halves were not buddies)")
        }
    }
    for block in halves {
        pool.free(block);
    }

    // 3. Hinting: everything is free now; the hinter returns cold blocks to the OS.
    let before = ProcessMemory::read();
    std::thread::sleep(Duration::from_millis(1500));
    let after = ProcessMemory::read();
    let stats = pool.stats();
    // What the process really gave back is what was resident: blocks never touched were
    // never memory, whatever their size.
    match (before, after) {
        (Some(before), Some(after)) => println!(
            "3. after 1.5 s idle the hinter returned {} of resident memory: the process's \
             Rss - LazyFree went from {} to {} ({} of free blocks hinted, {} passes, {} madvise calls)",
            pagepool_human(before.held().saturating_sub(after.held())),
            pagepool_human(before.held()),
            pagepool_human(after.held()),
            pagepool_human(stats.hinted_bytes),
            stats.hint.passes,
            stats.hint.madvise_calls
        ),
        _ => println!(
            "3. after 1.5 s idle {} of free blocks are hinted ({} passes); /proc/self/smaps_rollup \
             is not readable here, so the resident memory returned is unknown",
            pagepool_human(stats.hinted_bytes),
            stats.hint.passes
        ),
    }
    pool.check_consistency()?;
    println!("\n{stats}");
    Ok(())
}

fn pagepool_human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
