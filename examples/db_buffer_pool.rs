//! A small database buffer manager on a pagepool.
//!
//! Umbra-style variable-size pages (64 KiB up to 2 MiB) share one fixed memory budget.
//! Pages are found through a page table, evicted by the clock algorithm, and a miss that
//! finds the pool full calls `alloc_with_reclaim`: the callback evicts a batch of pages
//! until a block of the needed size forms, and capture makes sure the pieces those
//! evictions (and other threads' evictions) free coalesce for this miss instead of being
//! taken by others.
//!
//! Evicted pages are clean (a copy is on "disk"), so each batch goes back with one
//! `free_batch(.., Advice::DontNeed)`: the memory leaves the process at once, with one
//! system call and one TLB flush per batch instead of one per page, and the blocks return
//! known-zero. A resident budget (`resident_free_limit`) bounds the free memory the pool
//! keeps between evictions and loads. At the end the manager shrinks to a quarter, as an
//! operator lowering its memory would make it, and reports what the process holds.
//!
//! Run: `cargo run --release --example db_buffer_pool -- [THREADS] [OPS_PER_THREAD] [BUDGET_MIB]`

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagepool::{Advice, Block, PagePool, ProcessMemory};

/// Pages evicted together: one `free_batch` each.
const EVICT_BATCH: usize = 16;

/// A page's size class: most pages are 64 KiB, fewer are larger (order 4 = 64 KiB,
/// order 9 = 2 MiB), a fixed function of the page id as in a real catalogue.
fn page_order(page: u64) -> u8 {
    let h = page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58; // 0..64
    match h {
        0..=39 => 4,
        40..=51 => 5,
        52..=57 => 6,
        58..=60 => 7,
        61..=62 => 8,
        _ => 9,
    }
}

/// A resident page.
struct Frame {
    page: u64,
    block: Block,
    referenced: bool,
}

/// Page table and clock under one lock (a real system would partition both).
struct Buffers {
    table: HashMap<u64, usize>,
    frames: Vec<Option<Frame>>,
    hand: usize,
}

struct BufferManager {
    pool: PagePool,
    buffers: Mutex<Buffers>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    batches: AtomicU64,
}

impl BufferManager {
    fn new(budget: usize) -> Result<Self, pagepool::BuildError> {
        Ok(Self {
            pool: PagePool::builder()
                .capacity(budget)
                // Free memory the pool may keep resident: an eighth of the budget; the
                // hinter gives back the oldest free blocks beyond it.
                .resident_free_limit(budget / 8)
                .build()?,
            buffers: Mutex::new(Buffers {
                table: HashMap::new(),
                frames: Vec::new(),
                hand: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        })
    }

    /// Reads the first word of a page, loading it on a miss. Returns the miss latency.
    fn read(&self, page: u64) -> Option<Duration> {
        {
            let mut buffers = self.buffers.lock().unwrap();
            if let Some(&slot) = buffers.table.get(&page) {
                let frame = buffers.frames[slot]
                    .as_mut()
                    .expect("table points at a frame");
                frame.referenced = true;
                let word = u64::from_ne_bytes(frame.block.as_slice()[..8].try_into().unwrap());
                assert_eq!(word, page, "page {page} holds another page's bytes");
                self.hits.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let order = page_order(page);
        let mut block = self
            .pool
            .alloc_with_reclaim(order, || self.evict_batch(EVICT_BATCH) > 0)
            .expect("eviction can always free a page");
        let latency = start.elapsed();
        // "Read from disk": the page's id at its start, a pattern in the rest of its first 4 KiB.
        block.as_mut_slice()[..8].copy_from_slice(&page.to_ne_bytes());
        block.as_mut_slice()[8..4096].fill(page as u8);
        let mut buffers = self.buffers.lock().unwrap();
        if buffers.table.contains_key(&page) {
            // Another thread loaded it meanwhile.
            drop(buffers);
            self.pool.free(block);
            return Some(latency);
        }
        let frame = Frame {
            page,
            block,
            referenced: true,
        };
        let slot = match buffers.frames.iter().position(Option::is_none) {
            Some(slot) => {
                buffers.frames[slot] = Some(frame);
                slot
            }
            None => {
                buffers.frames.push(Some(frame));
                buffers.frames.len() - 1
            }
        };
        buffers.table.insert(page, slot);
        Some(latency)
    }

    /// The clock: clears reference bits until it finds up to `max` unreferenced pages (or
    /// has gone round twice), and evicts them with one batched free. Returns how many.
    fn evict_batch(&self, max: usize) -> usize {
        let victims: Vec<Frame> = {
            let mut buffers = self.buffers.lock().unwrap();
            let mut victims = Vec::with_capacity(max);
            let mut steps = 2 * buffers.frames.len();
            while victims.len() < max && !buffers.table.is_empty() && steps > 0 {
                steps -= 1;
                let hand = buffers.hand % buffers.frames.len();
                buffers.hand = hand + 1;
                match &mut buffers.frames[hand] {
                    Some(frame) if frame.referenced => frame.referenced = false,
                    Some(_) => {
                        let frame = buffers.frames[hand].take().expect("just matched");
                        buffers.table.remove(&frame.page);
                        victims.push(frame);
                    }
                    None => {}
                }
            }
            victims
        };
        for victim in &victims {
            assert_eq!(
                victim.block.as_slice()[8],
                victim.page as u8,
                "evicted page was overwritten"
            );
        }
        let count = victims.len();
        if count > 0 {
            // Clean pages: their memory can go at once, and comes back zeroed.
            if let Err((error, _)) = self
                .pool
                .free_batch(victims.into_iter().map(|v| v.block), Advice::DontNeed)
            {
                panic!("a batch of our own pages was refused: {error}");
            }
            self.evictions.fetch_add(count as u64, Ordering::Relaxed);
            self.batches.fetch_add(1, Ordering::Relaxed);
        }
        count
    }

    /// Evicts until at most `bytes` of pages are resident.
    fn shrink_to(&self, bytes: u64) {
        while self.pool.stats().allocated_bytes > bytes && self.evict_batch(EVICT_BATCH) > 0 {}
    }
}

/// `Rss - LazyFree` of this process in MiB, where `/proc` says.
fn held_mib() -> String {
    ProcessMemory::read().map_or("n/a".into(), |m| {
        format!("{:.1} MiB", m.held() as f64 / (1 << 20) as f64)
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().map_or(Ok(4), |a| a.parse())?;
    let ops: usize = args.get(1).map_or(Ok(50_000), |a| a.parse())?;
    let budget_mib: usize = args.get(2).map_or(Ok(256), |a| a.parse())?;
    let pages: u64 = 20_000; // about 3.4 GiB in all: many times the budget
    let manager = BufferManager::new(budget_mib << 20)?;

    let start = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let manager = &manager;
                s.spawn(move || {
                    let mut rng = 0x853C_49E6_748F_EA9Bu64 ^ ((t as u64 + 1) * 0x9E37_79B9);
                    let mut latencies = Vec::new();
                    for _ in 0..ops {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        // Skewed access: a power law over page ids (hot pages have small ids).
                        let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                        let page = ((pages as f64).powf(u) - 1.0) as u64;
                        if let Some(latency) = manager.read(page) {
                            latencies.push(latency);
                        }
                    }
                    latencies
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker"))
            .collect()
    });
    let elapsed = start.elapsed();
    latencies.sort();

    let hits = manager.hits.load(Ordering::Relaxed);
    let misses = manager.misses.load(Ordering::Relaxed);
    let stats = manager.pool.stats();
    println!(
        "buffer pool: {budget_mib} MiB budget, {pages} pages of 64 KiB..2 MiB, {threads} threads x {ops} reads"
    );
    println!("elapsed            {elapsed:.2?}");
    println!(
        "hit rate           {:.1} % ({hits} hits, {misses} misses)",
        100.0 * hits as f64 / (hits + misses) as f64
    );
    println!(
        "evictions          {} in {} batched frees (MADV_DONTNEED)",
        manager.evictions.load(Ordering::Relaxed),
        manager.batches.load(Ordering::Relaxed)
    );
    println!(
        "captures           {} (reclaim rounds {}, waits {})",
        stats.capture.captures, stats.capture.reclaim_rounds, stats.capture.waits
    );
    println!(
        "miss allocation    p50 {:.1?}  p90 {:.1?}  p99 {:.1?}  max {:.1?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "pool in use        {:.1} MiB of {budget_mib} MiB",
        stats.allocated_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "resident free      {:.1} MiB (budget {:.1} MiB); process holds {}",
        stats.resident_free_bytes() as f64 / (1 << 20) as f64,
        (budget_mib << 20) as f64 / 8.0 / (1 << 20) as f64,
        held_mib()
    );
    let shrink = Instant::now();
    manager.shrink_to((budget_mib << 20) as u64 / 4);
    let shrink = shrink.elapsed();
    let after = manager.pool.stats();
    println!(
        "shrink to 1/4      {:.1?}: pages {:.1} MiB, process holds {}",
        shrink,
        after.allocated_bytes as f64 / (1 << 20) as f64,
        held_mib()
    );
    manager.pool.check_consistency()?;
    Ok(())
}
