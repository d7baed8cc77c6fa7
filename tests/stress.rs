//! Randomized multi-threaded stress: threads allocate random orders, write a pattern, pass
//! some blocks to other threads to be checked and freed there, wait for large blocks with
//! capture, reclaim their own blocks for capture, and hint, while the hinter thread runs.
//!
//! Budget: `PAGEPOOL_STRESS_SECS`, the seconds each of the two tests runs (fractions
//! allowed; default 1.2). They run side by side, so that is also the wall time. Seed:
//! `PAGEPOOL_STRESS_SEED` (each run prints its seed with `--nocapture`).
//!
//! Invariants checked: no block is handed out twice (every live range is in one map and
//! checked for overlap on every allocation), a block's contents survive until it is freed
//! (checked before every free, so a hint, merge or capture that touched a live block is
//! caught, at once in `MADV_DONTNEED` mode), counter gauges never wrap, and at quiescence
//! `check_consistency()` and `free + allocated + in flight == capacity`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagepool::{AllocError, AllocPolicy, Block, HintMode, PagePool, PoolBuilder};

const MIB: usize = 1 << 20;
const THREADS: usize = 4;

fn budget() -> Duration {
    let secs = std::env::var("PAGEPOOL_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.2);
    Duration::from_secs_f64(secs.max(0.05))
}

fn seed() -> u64 {
    std::env::var("PAGEPOOL_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// xorshift64*: no dependency, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Live ranges: start -> (end, tag). Every allocation is checked against it.
struct Live(Mutex<BTreeMap<usize, (usize, u64)>>);

impl Live {
    fn insert(&self, block: &Block, tag: u64) {
        let (start, end) = (
            block.as_ptr() as usize,
            block.as_ptr() as usize + block.len(),
        );
        let mut map = self.0.lock().unwrap();
        if let Some((&s, &(e, t))) = map.range(..end).next_back() {
            assert!(
                e <= start,
                "block {start:#x}..{end:#x} handed out while {s:#x}..{e:#x} (tag {t:#x}) is live"
            );
        }
        map.insert(start, (end, tag));
    }

    fn remove(&self, block: &Block, tag: u64) {
        let start = block.as_ptr() as usize;
        let entry = self.0.lock().unwrap().remove(&start);
        assert_eq!(
            entry,
            Some((start + block.len(), tag)),
            "block {start:#x} was not live as expected"
        );
    }
}

/// Writes the owner's pattern: one word per 4 KiB page, plus the last word.
fn write_pattern(block: &mut Block, tag: u64) {
    let words = block.len() / 8;
    let ptr = block.as_mut_slice().as_mut_ptr().cast::<u64>();
    for (page, word) in (0..words).step_by(512).enumerate() {
        // SAFETY: `word < words`: inside the block, 8-aligned (blocks are page aligned).
        unsafe { ptr.add(word).write(tag ^ page as u64) };
    }
    // SAFETY: the last word of the block.
    unsafe { ptr.add(words - 1).write(!tag) };
}

fn check_pattern(block: &Block, tag: u64) {
    let words = block.len() / 8;
    let ptr = block.as_slice().as_ptr().cast::<u64>();
    for (page, word) in (0..words).step_by(512).enumerate() {
        // SAFETY: as in `write_pattern`.
        let got = unsafe { ptr.add(word).read() };
        assert_eq!(
            got,
            tag ^ page as u64,
            "block {:p} order {} page {page}: contents changed while it was live",
            block.as_ptr(),
            block.order()
        );
    }
    // SAFETY: as in `write_pattern`.
    assert_eq!(
        unsafe { ptr.add(words - 1).read() },
        !tag,
        "block {:p}: last word changed",
        block.as_ptr()
    );
}

/// Gauges must never wrap below zero or exceed the capacity.
fn check_snapshot(pool: &PagePool) {
    let s = pool.stats();
    let cap = s.capacity as u64;
    for o in &s.orders {
        let blocks = cap / o.block_size as u64;
        for (what, value) in [
            ("free", o.free),
            ("hinted", o.hinted),
            ("zero", o.zero),
            ("cached", o.cached),
            ("allocated", o.allocated),
            ("in flight", o.in_flight),
        ] {
            assert!(
                value <= blocks,
                "order {} {what} = {value} exceeds {blocks} blocks:\n{s}",
                o.order
            );
        }
    }
    assert!(s.allocated_bytes <= cap, "{s}");
}

struct Shared<'a> {
    pool: &'a PagePool,
    live: Live,
    deadline: Instant,
    tags: AtomicU64,
    ops: AtomicU64,
}

fn worker(
    me: usize,
    shared: &Shared<'_>,
    inbox: &Mutex<mpsc::Receiver<(Block, u64)>>,
    outboxes: Vec<mpsc::Sender<(Block, u64)>>,
    seed: u64,
) {
    let pool = shared.pool;
    let mut rng = Rng::new(seed ^ (me as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut held: Vec<(Block, u64)> = Vec::new();
    let new_tag = || {
        shared
            .tags
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            | 1
    };
    // Checks the owner's pattern and forgets the block: the caller frees it next.
    let retire = |block: &Block, tag: u64| {
        check_pattern(block, tag);
        shared.live.remove(block, tag);
    };
    let free_checked = |block: Block, tag: u64| {
        retire(&block, tag);
        pool.free(block);
    };
    // Some allocations and frees go through this worker's own lock-free cache.
    let mut cache = pool.local_cache_with(8);
    let mut ops = 0u64;
    while Instant::now() < shared.deadline {
        ops += 1;
        // Blocks other threads passed here: check and free.
        let inbox = inbox.lock().unwrap();
        while let Ok((block, tag)) = inbox.try_recv() {
            free_checked(block, tag);
        }
        drop(inbox);
        let roll = rng.below(1000);
        if roll < 420 && held.len() < 96 {
            // Mostly small, sometimes up to a whole chunk.
            let order = match rng.below(16) {
                0..=8 => rng.below(3) as u8,
                9..=13 => 3 + rng.below(4) as u8,
                _ => 7 + rng.below(4) as u8,
            };
            let result = match rng.below(4) {
                0 => pool.alloc_on(rng.below(8) as usize, order),
                1 => cache.alloc(order),
                _ => pool.alloc(order),
            };
            match result {
                Ok(mut block) => {
                    let tag = new_tag();
                    shared.live.insert(&block, tag);
                    write_pattern(&mut block, tag);
                    held.push((block, tag));
                }
                Err(AllocError::Exhausted { .. }) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        } else if roll < 700 && !held.is_empty() {
            let (block, tag) = held.swap_remove(rng.below(held.len() as u64) as usize);
            if rng.below(2) == 0 {
                retire(&block, tag);
                cache.free(block);
            } else {
                free_checked(block, tag);
            }
        } else if roll < 880 && !held.is_empty() {
            // Pass it on: another thread checks and frees it.
            let (block, tag) = held.swap_remove(rng.below(held.len() as u64) as usize);
            let to = (me + 1 + rng.below(THREADS as u64 - 1) as usize) % THREADS;
            outboxes[to]
                .send((block, tag))
                .expect("receivers live until the end");
        } else if roll < 950 {
            // Capture: wait briefly for a large block while others free.
            let order = 3 + rng.below(6) as u8;
            let timeout = Duration::from_micros(rng.below(2000));
            match pool.alloc_wait(order, timeout) {
                Ok(mut block) => {
                    let tag = new_tag();
                    shared.live.insert(&block, tag);
                    write_pattern(&mut block, tag);
                    held.push((block, tag));
                }
                Err(AllocError::Timeout { .. } | AllocError::Exhausted { .. }) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        } else if roll < 975 {
            // Reclaim own blocks until a large block forms.
            let order = 3 + rng.below(5) as u8;
            let mut budget = 1 + rng.below(8);
            let result = pool.alloc_with_reclaim(order, || {
                if budget == 0 || held.is_empty() {
                    return false;
                }
                budget -= 1;
                let (block, tag) = held.pop().unwrap();
                free_checked(block, tag);
                true
            });
            match result {
                Ok(mut block) => {
                    let tag = new_tag();
                    shared.live.insert(&block, tag);
                    write_pattern(&mut block, tag);
                    held.push((block, tag));
                }
                Err(AllocError::ReclaimFailed { .. }) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        } else if roll < 985 {
            pool.hint_now();
        } else if roll < 995 {
            check_snapshot(pool);
        } else if roll < 997 {
            pool.check_consistency()
                .unwrap_or_else(|e| panic!("inconsistent under load: {e}"));
        } else {
            pool.drain_caches();
        }
    }
    for (block, tag) in held {
        free_checked(block, tag);
    }
    drop(cache);
    shared.ops.fetch_add(ops, Ordering::Relaxed);
}

fn stress(builder: PoolBuilder, name: &str) {
    let pool = builder.build().unwrap();
    let seed = seed();
    let budget = budget();
    eprintln!(
        "stress {name}: seed {seed} (PAGEPOOL_STRESS_SEED), {:.2} s",
        budget.as_secs_f64()
    );
    let shared = Shared {
        pool: &pool,
        live: Live(Mutex::new(BTreeMap::new())),
        deadline: Instant::now() + budget,
        tags: AtomicU64::new(1),
        ops: AtomicU64::new(0),
    };
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel()).unzip();
    let inboxes: Vec<Mutex<mpsc::Receiver<(Block, u64)>>> =
        receivers.into_iter().map(Mutex::new).collect();
    let threads = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .unwrap();
    threads.scope(|scope| {
        for (me, inbox) in inboxes.iter().enumerate() {
            let (outboxes, shared) = (senders.clone(), &shared);
            scope.spawn(move |_| worker(me, shared, inbox, outboxes, seed));
        }
    });
    // Blocks sent to a worker after it stopped: check and free them here.
    for inbox in &inboxes {
        while let Ok((block, tag)) = inbox.lock().unwrap().try_recv() {
            check_pattern(&block, tag);
            shared.live.remove(&block, tag);
            pool.free(block);
        }
    }
    pool.shutdown();
    let s = pool.stats();
    eprintln!(
        "stress {name}: {} ops, {} captures, {} waits, {} timeouts, {} hint passes, {} hinted",
        shared.ops.load(Ordering::Relaxed),
        s.capture.captures,
        s.capture.waits,
        s.capture.timeouts,
        s.hint.passes,
        s.hint.blocks_hinted_total
    );
    assert!(
        shared.live.0.lock().unwrap().is_empty(),
        "blocks were lost in transit"
    );
    assert_eq!(s.allocated_bytes, 0, "{s}");
    assert_eq!(s.in_flight_bytes, 0, "{s}");
    assert_eq!(
        s.free_bytes + s.allocated_bytes + s.in_flight_bytes,
        s.capacity as u64,
        "{s}"
    );
    assert_eq!(s.capture.waiting, 0);
    pool.check_consistency().unwrap();
    pool.drain_caches();
    let s = pool.stats();
    let max = pool.max_order() as usize;
    assert_eq!(
        s.orders[max].free as usize * pagepool::block_size(max as u8),
        s.capacity,
        "not all coalesced:\n{s}"
    );
    pool.check_consistency().unwrap();
}

fn base(capacity: usize) -> PoolBuilder {
    PagePool::builder()
        .capacity(capacity)
        .max_order(10)
        .shards(3)
        .hint_thread(true)
        .hint_delay(Duration::from_millis(2))
        .hint_interval(Duration::from_millis(1))
        .hint_min_order(2)
        .hint_batch_blocks(8)
        .keep_chunks(1)
}

#[test]
fn stress_madv_free_prefer_unhinted() {
    stress(
        base(48 * MIB).hint_mode(HintMode::Free).cache_blocks(16),
        "MADV_FREE",
    );
}

#[test]
fn stress_madv_dontneed_fifo() {
    // With MADV_DONTNEED a hint of a live block zeroes it at once: the pattern check sees it.
    stress(
        base(32 * MIB)
            .hint_mode(HintMode::DontNeed)
            .policy(AllocPolicy::Fifo)
            .cache_blocks(4)
            .keep_chunks(0),
        "MADV_DONTNEED",
    );
}
