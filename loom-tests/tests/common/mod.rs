//! Shared set-up and invariant checks for the loom models.
//!
//! Models build a tiny heap-backed pool (syscalls are not modelled), pick shards explicitly
//! with `alloc_on` (loom has no CPU numbers), and track every live block in a plain std
//! set: loom runs one model thread at a time and the set is never held across a pool call,
//! so it records hand-outs and frees in exactly the order the model scheduled them.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use loom::sync::Arc;
use loom::thread::{self, JoinHandle};

use pagepool::{Backing, Block, CpuCacheMode, PagePool, PoolBuilder, block_size};

/// A pool of `chunks` chunks of order `max_order`, two shards, no hinter thread, no
/// small-block cache and no per-CPU caches (so every free merges at once): the buddy
/// protocols alone. The per-CPU caches have models of their own (`cpu_cache.rs`).
pub fn builder(chunks: usize, max_order: u8) -> PoolBuilder {
    PagePool::builder()
        .capacity(chunks * block_size(max_order))
        .max_order(max_order)
        .shards(2)
        .backing(Backing::Heap)
        .hint_thread(false)
        .cache_blocks(0)
        .cpu_cache(CpuCacheMode::Off)
}

/// Runs a model with the preemption bound from `LOOM_MAX_PREEMPTIONS` (2 if unset), and
/// prints how many executions loom explored.
#[track_caller]
pub fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    // The pool's operations are long straight lines of atomics; the default bound of
    // 1000 switches per execution is for spin loops, which the pool does not have.
    builder.max_branches = builder.max_branches.max(20_000);
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executions.clone();
    let started = std::time::Instant::now();
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    eprintln!(
        "loom model at {}: {} executions in {:.1} s",
        std::panic::Location::caller(),
        executions.load(std::sync::atomic::Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}

/// The live blocks of one execution: start -> end.
#[derive(Default)]
pub struct Live(StdMutex<BTreeMap<usize, usize>>);

impl Live {
    /// Records a hand-out; panics if the block overlaps a live one (a double hand-out).
    pub fn add(&self, block: &Block) {
        let (start, end) = (
            block.as_ptr() as usize,
            block.as_ptr() as usize + block.len(),
        );
        let mut map = self.0.lock().unwrap();
        if let Some((&s, &e)) = map.range(..end).next_back() {
            assert!(
                e <= start,
                "double hand-out: {start:#x}..{end:#x} overlaps live {s:#x}..{e:#x}"
            );
        }
        map.insert(start, end);
    }

    /// Records a free (before the pool sees it, so the address may be handed out again).
    pub fn remove(&self, block: &Block) {
        let start = block.as_ptr() as usize;
        assert_eq!(
            self.0.lock().unwrap().remove(&start),
            Some(start + block.len()),
            "freeing a block not live"
        );
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap().is_empty()
    }
}

/// Allocates on `shard` and records the block.
pub fn take(pool: &PagePool, live: &Live, shard: usize, order: u8) -> Option<Block> {
    let block = pool.alloc_on(shard, order).ok()?;
    live.add(&block);
    Some(block)
}

/// Records and frees a block.
pub fn give(pool: &PagePool, live: &Live, block: Block) {
    live.remove(&block);
    pool.free(block);
}

/// Records and frees `blocks`, in order, on a new model thread.
pub fn give_on_thread(
    pool: &Arc<PagePool>,
    live: &Arc<Live>,
    blocks: Vec<Block>,
) -> JoinHandle<()> {
    let (pool, live) = (pool.clone(), live.clone());
    thread::spawn(move || {
        for block in blocks {
            give(&pool, &live, block);
        }
    })
}

/// `alloc_wait(order)` on a new model thread, with a timeout loom never lets expire:
/// `certain` says why a block must come.
pub fn wait_on_thread(pool: &Arc<PagePool>, order: u8, certain: &'static str) -> JoinHandle<Block> {
    let pool = pool.clone();
    thread::spawn(move || {
        pool.alloc_wait(order, Duration::from_secs(3600))
            .expect(certain)
    })
}

/// The invariants at quiescence: the audit, `free + allocated + in flight == capacity`,
/// and the counters equal to what the model holds.
pub fn quiescent(pool: &PagePool, live: &Live) {
    pool.check_consistency()
        .unwrap_or_else(|e| panic!("inconsistent: {e}"));
    let s = pool.stats();
    assert_eq!(
        s.free_bytes + s.allocated_bytes + s.in_flight_bytes,
        s.capacity as u64,
        "{s}"
    );
    assert_eq!(s.in_flight_bytes, 0, "{s}");
    let held: u64 = live
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(s, e)| (e - s) as u64)
        .sum();
    assert_eq!(s.allocated_bytes, held, "lost or doubled block:\n{s}");
    assert_eq!(s.capture.waiting, 0, "a capture request was left behind");
}

/// Everything freed: no lost block, all memory back in whole chunks.
pub fn all_free(pool: &PagePool, live: &Live) {
    assert!(live.is_empty());
    pool.drain_caches();
    quiescent(pool, live);
    let s = pool.stats();
    let max = pool.max_order() as usize;
    assert_eq!(
        s.orders[max].free as usize * block_size(max as u8),
        s.capacity,
        "not coalesced:\n{s}"
    );
}
