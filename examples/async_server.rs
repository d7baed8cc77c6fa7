//! An async server whose requests need large buffers from a bounded pool.
//!
//! Each request needs a 2 MiB buffer (plus a few 64 KiB scratch pages) for a while; the
//! pool holds far fewer buffers than there are requests in flight. A request that finds
//! the pool exhausted awaits `alloc_async`: its task is parked, not its worker thread, and
//! the free that completes a 2 MiB block hands it over and wakes the task (capture). A
//! heartbeat task on the same two workers shows they never stall.
//!
//! Run: `cargo run --release --example async_server -- [REQUESTS] [POOL_MIB]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagepool::PagePool;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let requests: usize = args.first().map_or(Ok(2000), |a| a.parse())?;
    let pool_mib: usize = args.get(1).map_or(Ok(64), |a| a.parse())?;
    let pool = Arc::new(PagePool::builder().capacity(pool_mib << 20).build()?);

    // The heartbeat: ticks every millisecond; its worst gap is how long a worker stalled.
    let worst_gap = Arc::new(AtomicU64::new(0));
    let beating = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let heartbeat = {
        let (worst_gap, beating) = (worst_gap.clone(), beating.clone());
        tokio::spawn(async move {
            let mut last = Instant::now();
            while beating.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let gap = last.elapsed().as_micros() as u64;
                worst_gap.fetch_max(gap, Ordering::Relaxed);
                last = Instant::now();
            }
        })
    };

    let start = Instant::now();
    let handles: Vec<_> = (0..requests)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let asked = Instant::now();
                // The buffer: waits (without blocking the worker) while the pool is full.
                let buffer = pool.alloc_async(9).await.expect("capture serves 2 MiB");
                let waited = asked.elapsed();
                let mut buffer = pagepool::BlockGuard::new(buffer, &pool);
                // Scratch pages, freed on drop.
                let scratch: Vec<_> = (0..4).filter_map(|_| pool.alloc_guarded(4).ok()).collect();
                buffer[..8].copy_from_slice(&(i as u64).to_ne_bytes());
                // "Serve" the request: some I/O wait, then check the buffer is still ours.
                tokio::time::sleep(Duration::from_micros(200 + (i as u64 % 7) * 100)).await;
                assert_eq!(
                    buffer[..8],
                    (i as u64).to_ne_bytes(),
                    "buffer {i} was overwritten"
                );
                drop(scratch);
                waited
            })
        })
        .collect();
    let mut waits = Vec::with_capacity(requests);
    for handle in handles {
        waits.push(handle.await?);
    }
    let elapsed = start.elapsed();
    beating.store(false, Ordering::Relaxed);
    heartbeat.await?;
    waits.sort();

    let stats = pool.stats();
    println!(
        "async server: {requests} requests of 2 MiB, pool of {pool_mib} MiB ({} buffers), 2 workers",
        pool_mib / 2
    );
    println!("elapsed            {elapsed:.2?}");
    println!(
        "waited for memory  {} requests; captures {}",
        stats.capture.waits, stats.capture.captures
    );
    println!(
        "wait for a buffer  p50 {:.1?}  p99 {:.1?}  max {:.1?}",
        percentile(&waits, 0.50),
        percentile(&waits, 0.99),
        waits.last().copied().unwrap_or_default()
    );
    println!(
        "worker stall       worst heartbeat gap {:.1} ms (the timer ticks every 1 ms)",
        worst_gap.load(Ordering::Relaxed) as f64 / 1000.0
    );
    assert_eq!(stats.allocated_bytes, 0, "every buffer went back");
    pool.check_consistency()?;
    Ok(())
}
