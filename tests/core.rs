//! Unit-level tests of the core through the public API: split and merge, frees from other
//! threads, shard balancing, in-place resize, and a property test of random alloc/free
//! sequences against a simple model.

use std::collections::BTreeMap;
use std::ptr::NonNull;

use pagepool::{AllocError, Backing, Block, FreeError, PagePool, Stats, block_size};
use proptest::prelude::*;

mod common;

use common::{CHUNK, assert_balanced, assert_whole_chunks, quiet, stamp, verify};

// --- split and merge ------------------------------------------------------------------------

#[test]
fn order0_from_a_fresh_pool_splits_one_chunk() {
    let pool = quiet(4, 1).cache_blocks(0).build().unwrap();
    let s = pool.stats();
    assert_eq!(s.orders[10].free, 4);
    assert_eq!(
        s.zero_bytes,
        4 * CHUNK as u64,
        "fresh chunks are known-zero"
    );

    let block = pool.alloc(0).unwrap();
    assert_eq!(block.len(), 4096);
    assert_eq!(
        block.as_ptr() as usize % CHUNK,
        0,
        "the lower half is kept at every split"
    );
    let s = assert_balanced(&pool);
    for order in 0..10 {
        assert_eq!(
            s.orders[order].free, 1,
            "one upper half of order {order} after splitting:\n{s}"
        );
    }
    assert_eq!(s.orders[10].free, 3);
    assert_eq!(s.orders[0].allocated, 1);
    assert_eq!(s.allocated_bytes, 4096);

    // A second order-0 block is the buddy of the first: no further split.
    let buddy = pool.alloc(0).unwrap();
    assert_eq!(buddy.as_ptr() as usize, block.as_ptr() as usize + 4096);
    let s = assert_balanced(&pool);
    assert_eq!(s.orders[0].free, 0);

    pool.free(block);
    pool.free(buddy);
    assert_whole_chunks(&pool);
}

#[test]
fn freeing_everything_coalesces_back_to_whole_chunks() {
    let pool = quiet(4, 2).build().unwrap();
    let mut blocks = Vec::new();
    for i in 0..300u32 {
        let order = (i % 6) as u8;
        let mut block = pool.alloc_on(i as usize, order).unwrap();
        stamp(&mut block, i as u8);
        blocks.push((block, i as u8));
    }
    assert_balanced(&pool);
    // Free in an order unrelated to allocation, so merges happen in every direction.
    let mut keyed: Vec<_> = blocks
        .into_iter()
        .enumerate()
        .map(|(i, b)| ((i * 7919) % 300, b))
        .collect();
    keyed.sort_by_key(|&(k, _)| k);
    for (_, (block, tag)) in keyed {
        verify(&block, tag);
        pool.free(block);
    }
    assert_whole_chunks(&pool);
}

#[test]
fn the_cache_holds_small_frees_until_drained() {
    let pool = quiet(2, 1).cache_blocks(8).build().unwrap();
    let blocks: Vec<_> = (0..4).map(|_| pool.alloc(0).unwrap()).collect();
    for block in blocks {
        pool.free(block);
    }
    let s = assert_balanced(&pool);
    assert_eq!(
        s.orders[0].cached, 4,
        "small frees are cached, not merged:\n{s}"
    );
    assert_eq!(s.cached_bytes, 4 * 4096);
    // A cached block is reused first (hot).
    let again = pool.alloc(0).unwrap();
    assert_eq!(pool.stats().orders[0].cached, 3);
    pool.free(again);
    assert_whole_chunks(&pool);
}

#[test]
fn every_order_can_be_allocated_and_merged() {
    let pool = quiet(2, 1).build().unwrap();
    for order in 0..=10u8 {
        let mut block = pool.alloc(order).unwrap();
        assert_eq!(block.order(), order);
        assert_eq!(block.len(), 4096 << order);
        assert_eq!(
            block.as_ptr() as usize % block.len(),
            0,
            "a block is aligned to its size"
        );
        stamp(&mut block, order);
        verify(&block, order);
        assert_eq!(pool.order_of(block.as_ptr()), Ok(order));
        pool.free(block);
    }
    assert_whole_chunks(&pool);
}

#[test]
fn alloc_zeroed_zeroes_dirty_memory() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let mut block = pool.alloc(3).unwrap();
    block.as_mut_slice().fill(0xAB);
    pool.free(block);
    let zeroed = pool.alloc_zeroed(3).unwrap();
    assert!(zeroed.as_slice().iter().all(|&b| b == 0));
    pool.free(zeroed);
    assert_whole_chunks(&pool);
}

#[test]
fn raw_round_trip_finds_the_order_in_the_frame_table() {
    let pool = quiet(1, 1).build().unwrap();
    let block = pool.alloc(5).unwrap();
    let ptr = block.into_raw();
    assert_eq!(pool.order_of(ptr.as_ptr()), Ok(5));
    // SAFETY: `ptr` came from `into_raw` and is freed once, through this handle.
    let block = unsafe { pool.block_from_raw(ptr) }.unwrap();
    assert_eq!(block.order(), 5);
    let ptr = block.into_raw();
    // SAFETY: `ptr` is a live block of this pool, freed once.
    assert_eq!(unsafe { pool.free_raw(ptr) }, Ok(5));
    let block = pool.alloc(2).unwrap();
    let ptr = block.into_raw();
    // SAFETY: as above.
    assert_eq!(unsafe { pool.free_raw_order(ptr, 2) }, Ok(()));
    assert_whole_chunks(&pool);
}

#[test]
fn grow_and_shrink_in_place() {
    let pool = quiet(1, 1).cache_blocks(0).build().unwrap();
    let mut block = pool.alloc(2).unwrap();
    stamp(&mut block, 7);
    let at = block.as_ptr();
    assert!(
        pool.try_grow(&mut block, 5),
        "the upper buddies of a fresh split are free"
    );
    assert_eq!((block.as_ptr(), block.order()), (at, 5));
    assert_eq!(
        block.as_slice()[0],
        7,
        "growing in place keeps the contents"
    );
    stamp(&mut block, 7);
    let s = assert_balanced(&pool);
    assert_eq!(s.orders[5].allocated, 1);
    assert_eq!(s.orders[2].allocated, 0);

    // A neighbour in the way stops the growth and changes nothing.
    let neighbour = pool.alloc(5).unwrap();
    assert_eq!(neighbour.as_ptr() as usize, at as usize + block_size(5));
    let before = pool.stats();
    assert!(!pool.try_grow(&mut block, 6));
    assert_eq!(block.order(), 5);
    assert_eq!(pool.stats(), before);

    pool.shrink(&mut block, 1);
    assert_eq!(block.order(), 1);
    assert_eq!(
        block.as_slice()[0],
        7,
        "shrinking keeps the start of the block"
    );
    let s = assert_balanced(&pool);
    assert_eq!(s.orders[1].allocated, 1);
    assert!(
        pool.try_grow(&mut block, 1),
        "growing to the same order is a no-op that succeeds"
    );
    assert!(pool.try_grow(&mut block, 3));
    pool.free(neighbour);
    pool.free(block);
    assert_whole_chunks(&pool);
}

// --- shards ---------------------------------------------------------------------------------

#[test]
fn a_free_from_another_thread_goes_back_to_the_owning_shard_and_merges() {
    let pool = quiet(4, 2).cache_blocks(0).keep_chunks(8).build().unwrap();
    let a = pool.alloc_on(0, 3).unwrap();
    let b = pool.alloc_on(0, 3).unwrap();
    assert_eq!(
        b.as_ptr() as usize,
        a.as_ptr() as usize + block_size(3),
        "buddies"
    );
    let s = pool.stats();
    assert_eq!(
        s.free_bytes_per_shard[0],
        (CHUNK - 2 * block_size(3)) as u64
    );
    assert_eq!(s.free_bytes_per_shard[1], 0);

    std::thread::scope(|scope| {
        scope.spawn(|| pool.free(a));
        scope.spawn(|| pool.free(b));
    });
    let s = assert_balanced(&pool);
    assert_eq!(
        s.free_bytes_per_shard[1], 0,
        "shard 1 never owned these blocks"
    );
    assert_eq!(
        s.free_bytes_per_shard[0], CHUNK as u64,
        "both buddies went home and merged"
    );
    assert_eq!(s.orders[10].free, 4);
    assert_whole_chunks(&pool);
}

#[test]
fn an_empty_shard_takes_a_chunk_from_the_shared_pool() {
    let pool = quiet(4, 2).build().unwrap();
    let s = pool.stats();
    assert_eq!(
        s.free_bytes_per_shard,
        vec![0, 0, 4 * CHUNK as u64],
        "everything starts shared"
    );
    let a = pool.alloc_on(1, 0).unwrap();
    let s = pool.stats();
    assert_eq!(s.free_bytes_per_shard[1], (CHUNK - 4096) as u64);
    assert_eq!(s.free_bytes_per_shard[2], 3 * CHUNK as u64);
    pool.free(a);
    assert_whole_chunks(&pool);
}

#[test]
fn surplus_whole_chunks_go_back_to_the_shared_pool() {
    let pool = quiet(4, 2).keep_chunks(0).build().unwrap();
    let blocks: Vec<_> = (0..4).map(|_| pool.alloc_on(0, 10).unwrap()).collect();
    assert_eq!(pool.stats().free_bytes, 0);
    for block in blocks {
        pool.free(block);
    }
    let s = assert_balanced(&pool);
    assert_eq!(
        s.free_bytes_per_shard,
        vec![0, 0, 4 * CHUNK as u64],
        "keep_chunks(0) keeps none:\n{s}"
    );

    let pool = quiet(4, 2).keep_chunks(1).build().unwrap();
    let blocks: Vec<_> = (0..4).map(|_| pool.alloc_on(0, 10).unwrap()).collect();
    for block in blocks {
        pool.free(block);
    }
    let s = assert_balanced(&pool);
    assert_eq!(
        s.free_bytes_per_shard,
        vec![CHUNK as u64, 0, 3 * CHUNK as u64],
        "keep_chunks(1):\n{s}"
    );
}

#[test]
fn allocation_never_fails_while_another_shard_holds_a_fitting_block() {
    let pool = quiet(4, 2).keep_chunks(8).build().unwrap();
    // Shard 0 takes every chunk.
    let chunks: Vec<_> = (0..4).map(|_| pool.alloc_on(0, 10).unwrap()).collect();
    assert_eq!(pool.stats().free_bytes, 0);
    for chunk in chunks {
        pool.free(chunk);
    }
    let s = pool.stats();
    assert_eq!(
        s.free_bytes_per_shard,
        vec![4 * CHUNK as u64, 0, 0],
        "shard 0 keeps its chunks:\n{s}"
    );

    // Shard 1 has nothing and the shared pool is empty: it must allocate from shard 0.
    let mut taken = Vec::new();
    let big = pool.alloc_on(1, 10).unwrap();
    taken.push(big);
    // Fragment shard 0 with small blocks, then ask shard 1 for every last frame.
    loop {
        match pool.alloc_on(1, 0) {
            Ok(block) => taken.push(block),
            Err(AllocError::Exhausted { order: 0 }) => break,
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    let s = assert_balanced(&pool);
    assert_eq!(
        s.free_bytes, 0,
        "allocation stopped while memory was free:\n{s}"
    );
    assert_eq!(taken.len(), 1 + 3 * (CHUNK / 4096));
    for block in taken {
        pool.free(block);
    }
    assert_whole_chunks(&pool);
}

#[test]
fn a_cached_block_in_another_shard_is_found_when_all_else_is_exhausted() {
    // One chunk, two shards: shard 0 caches a freed block; shard 1 must still get it.
    let pool = quiet(1, 2).cache_blocks(32).build().unwrap();
    let mut all = Vec::new();
    while let Ok(b) = pool.alloc_on(0, 0) {
        all.push(b);
    }
    assert_eq!(all.len(), CHUNK / 4096);
    let last = all.pop().unwrap();
    pool.free(last);
    assert_eq!(pool.stats().orders[0].cached, 1);
    let got = pool
        .alloc_on(1, 0)
        .expect("the cached block in shard 0 is free memory");
    all.push(got);
    assert!(matches!(
        pool.alloc_on(1, 0),
        Err(AllocError::Exhausted { order: 0 })
    ));
    for block in all {
        pool.free(block);
    }
    assert_whole_chunks(&pool);
}

#[test]
fn heap_backing_behaves_like_mmap() {
    let pool = quiet(2, 2).backing(Backing::Heap).build().unwrap();
    let mut blocks = Vec::new();
    for i in 0..64u8 {
        let mut block = pool.alloc_on(i as usize, i % 6).unwrap();
        stamp(&mut block, i);
        blocks.push((block, i));
    }
    for (block, tag) in blocks {
        verify(&block, tag);
        pool.free(block);
    }
    assert_whole_chunks(&pool);
}

#[test]
fn stats_display_is_a_readable_table() {
    let pool = quiet(1, 1).build().unwrap();
    let block = pool.alloc(3).unwrap();
    let text = pool.stats().to_string();
    assert!(text.contains("capacity 4.0 MiB"), "{text}");
    assert!(text.contains("order"), "{text}");
    pool.free(block);
}

// --- property test --------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        order: u8,
        shard: usize,
    },
    AllocZeroed {
        order: u8,
    },
    /// Free the live block at this index (modulo the number of live blocks).
    Free {
        which: usize,
    },
    /// Free it by raw pointer.
    FreeRaw {
        which: usize,
    },
    Grow {
        which: usize,
        by: u8,
    },
    Shrink {
        which: usize,
        by: u8,
    },
    DrainCaches,
    HintNow,
    /// A double free of the block freed last (if any).
    DoubleFree,
    /// A raw free of an interior pointer of a live block.
    InteriorFree {
        which: usize,
        frames: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..=6, 0usize..3).prop_map(|(order, shard)| Op::Alloc { order, shard }),
        1 => (7u8..=10, 0usize..3).prop_map(|(order, shard)| Op::Alloc { order, shard }),
        1 => (0u8..=6).prop_map(|order| Op::AllocZeroed { order }),
        5 => any::<usize>().prop_map(|which| Op::Free { which }),
        2 => any::<usize>().prop_map(|which| Op::FreeRaw { which }),
        1 => (any::<usize>(), 1u8..4).prop_map(|(which, by)| Op::Grow { which, by }),
        1 => (any::<usize>(), 1u8..4).prop_map(|(which, by)| Op::Shrink { which, by }),
        1 => Just(Op::DrainCaches),
        1 => Just(Op::HintNow),
        1 => Just(Op::DoubleFree),
        1 => (any::<usize>(), 1usize..16).prop_map(|(which, frames)| Op::InteriorFree { which, frames }),
    ]
}

/// The model: live blocks by address, each with its length and tag.
struct Model {
    live: BTreeMap<usize, (Block, u8)>,
    last_freed: Option<usize>,
    next_tag: u8,
}

impl Model {
    fn nth(&self, which: usize) -> Option<usize> {
        if self.live.is_empty() {
            None
        } else {
            self.live.keys().nth(which % self.live.len()).copied()
        }
    }

    fn insert(&mut self, mut block: Block) {
        let (start, len) = (block.as_ptr() as usize, block.len());
        if let Some((&prev, (b, _))) = self.live.range(..=start).next_back() {
            assert!(
                prev + b.len() <= start,
                "new block {start:#x}+{len} overlaps live block {prev:#x}+{}",
                b.len()
            );
        }
        if let Some((&next, _)) = self.live.range(start..).next() {
            assert!(
                start + len <= next,
                "new block {start:#x}+{len} overlaps live block at {next:#x}"
            );
        }
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(3);
        stamp(&mut block, tag);
        self.live.insert(start, (block, tag));
    }

    fn allocated_bytes(&self) -> u64 {
        self.live.values().map(|(b, _)| b.len() as u64).sum()
    }
}

fn run_ops(pool: &PagePool, ops: &[Op]) {
    let mut model = Model {
        live: BTreeMap::new(),
        last_freed: None,
        next_tag: 1,
    };
    for op in ops {
        match *op {
            Op::Alloc { order, shard } => match pool.alloc_on(shard, order) {
                Ok(block) => model.insert(block),
                Err(AllocError::Exhausted { order: o }) => {
                    assert_eq!(o, order);
                    // No shard may hold a fitting block when an allocation fails.
                    let s = pool.stats();
                    let fitting: u64 = s.orders[order as usize..].iter().map(|o| o.free).sum();
                    assert_eq!(
                        fitting, 0,
                        "alloc({order}) failed with fitting blocks free:\n{s}"
                    );
                }
                Err(other) => panic!("unexpected {other}"),
            },
            Op::AllocZeroed { order } => match pool.alloc_zeroed(order) {
                Ok(block) => {
                    assert!(
                        block.as_slice().iter().all(|&b| b == 0),
                        "alloc_zeroed returned dirty memory"
                    );
                    model.insert(block);
                }
                Err(AllocError::Exhausted { .. }) => {}
                Err(other) => panic!("unexpected {other}"),
            },
            Op::Free { which } | Op::FreeRaw { which } => {
                let Some(key) = model.nth(which) else {
                    continue;
                };
                let (block, tag) = model.live.remove(&key).unwrap();
                verify(&block, tag);
                let order = block.order();
                if matches!(op, Op::Free { .. }) {
                    pool.free(block);
                } else {
                    let ptr = block.into_raw();
                    // SAFETY: a live block of this pool, freed once.
                    assert_eq!(unsafe { pool.free_raw(ptr) }, Ok(order));
                }
                model.last_freed = Some(key);
            }
            Op::Grow { which, by } => {
                let Some(key) = model.nth(which) else {
                    continue;
                };
                let (mut block, tag) = model.live.remove(&key).unwrap();
                verify(&block, tag);
                let (from, target) = (block.order(), (block.order() + by).min(10));
                let grown = pool.try_grow(&mut block, target);
                assert_eq!(block.order(), if grown { target } else { from });
                assert_eq!(
                    block.as_ptr() as usize,
                    key,
                    "growing in place keeps the address"
                );
                assert_eq!(block.as_slice()[0], tag, "growing keeps the contents");
                // Growing must not overlap any other live block.
                let len = block.len();
                if let Some((&next, _)) = model.live.range(key..).next() {
                    assert!(key + len <= next, "grown block overlaps {next:#x}");
                }
                stamp(&mut block, tag);
                model.live.insert(key, (block, tag));
            }
            Op::Shrink { which, by } => {
                let Some(key) = model.nth(which) else {
                    continue;
                };
                let (mut block, tag) = model.live.remove(&key).unwrap();
                let target = block.order().saturating_sub(by);
                pool.shrink(&mut block, target);
                assert_eq!(block.order(), target);
                // The tag's middle and last bytes may be gone: re-tag.
                stamp(&mut block, tag);
                model.live.insert(key, (block, tag));
            }
            Op::DrainCaches => pool.drain_caches(),
            Op::HintNow => {
                pool.hint_now();
            }
            Op::DoubleFree => {
                let Some(addr) = model.last_freed else {
                    continue;
                };
                if model.live.contains_key(&addr) {
                    continue; // handed out again: freeing it would be a legal free
                }
                let before = pool.stats();
                let ptr = NonNull::new(addr as *mut u8).unwrap();
                // SAFETY: the address is not live, so the pool must refuse it and change
                // nothing; no memory is touched.
                let err = unsafe { pool.free_raw(ptr) }.unwrap_err();
                assert!(
                    matches!(err, FreeError::AlreadyFree | FreeError::NotBlockStart),
                    "{err:?}"
                );
                assert_eq!(
                    pool.stats(),
                    before,
                    "a refused double free changed the pool"
                );
            }
            Op::InteriorFree { which, frames } => {
                let Some(key) = model.nth(which) else {
                    continue;
                };
                let len = model.live[&key].0.len();
                let offset = (frames * 4096) % len;
                if offset == 0 {
                    continue;
                }
                let before = pool.stats();
                let ptr = NonNull::new((key + offset) as *mut u8).unwrap();
                // SAFETY: an interior pointer of a live block: the pool must refuse it.
                assert_eq!(unsafe { pool.free_raw(ptr) }, Err(FreeError::NotBlockStart));
                assert_eq!(pool.stats(), before);
            }
        }
        let s = assert_balanced(pool);
        assert_eq!(
            s.allocated_bytes,
            model.allocated_bytes(),
            "allocated bytes disagree with the model after {op:?}"
        );
    }
    for (_, (block, tag)) in std::mem::take(&mut model.live) {
        verify(&block, tag);
        pool.free(block);
    }
    assert_whole_chunks(pool);
}

proptest! {
    // 48 cases keep `cargo test` fast; PROPTEST_CASES=5000 searches harder.
    #![proptest_config(ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() { ProptestConfig::default().cases } else { 48 },
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_alloc_free_sequences_keep_the_invariants(
        ops in proptest::collection::vec(op(), 1..160),
        cache in prop_oneof![Just(0u32), Just(4), Just(32)],
        keep in 0u32..3,
    ) {
        // 3 chunks of 4 MiB over 2 shards: small enough to hit exhaustion and balancing.
        let pool = quiet(3, 2).cache_blocks(cache).keep_chunks(keep).hint_min_order(4).build().unwrap();
        run_ops(&pool, &ops);
    }
}

#[test]
fn the_model_catches_a_leak() {
    // Every check in `run_ops` must be able to fail: a block kept out of the model's sight
    // makes `allocated_bytes` disagree.
    let pool = quiet(1, 1).build().unwrap();
    let hidden = pool.alloc(0).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_ops(&pool, &[Op::DrainCaches])
    }));
    assert!(result.is_err(), "a leaked block went unnoticed");
    pool.free(hidden);
}

/// Regression: `stats()` read each counter of an order more than once (and `unhinted`
/// from a second read of `free`), so a snapshot taken during a split or merge could show
/// `unhinted > free`, `cached > free`, a free count above the capacity, or byte totals
/// above the capacity. Found by the loom model `snapshots_against_concurrent_split_and_merge`.
#[test]
fn snapshots_are_self_consistent_under_concurrent_updates() {
    let pool = quiet(2, 2)
        .cache_blocks(4)
        .keep_chunks(0)
        .hint_min_order(0)
        .build()
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let check = |s: &Stats| -> Result<(), String> {
        let cap = s.capacity as u64;
        for o in &s.orders {
            let consistent = o.unhinted + o.hinted + o.zero == o.free
                && o.cached <= o.unhinted
                && o.freed_total - o.bound_total == o.free
                && o.free <= cap / o.block_size as u64;
            if !consistent {
                return Err(format!("order {} is inconsistent:\n{s}", o.order));
            }
        }
        let totals = [
            s.free_bytes,
            s.allocated_bytes,
            s.hinted_bytes,
            s.zero_bytes,
            s.cached_bytes,
        ];
        if totals.iter().any(|&t| t > cap) {
            Err(format!("a total exceeds capacity:\n{s}"))
        } else {
            Ok(())
        }
    };
    let (snapshots, verdict) = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut order = 0u8;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let a = pool.alloc_on(order as usize, order % 10).unwrap();
                let b = pool.alloc_on(order as usize + 1, order % 3).unwrap();
                pool.free(a);
                pool.free(b);
                order = order.wrapping_add(1);
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        let mut snapshots = 0;
        let mut verdict = Ok(());
        while verdict.is_ok() && std::time::Instant::now() < deadline {
            verdict = check(&pool.stats());
            snapshots += 1;
        }
        // Stop the writer before asserting, so a failure cannot hang the scope.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (snapshots, verdict)
    });
    verdict.unwrap();
    assert!(snapshots > 100);
    assert_whole_chunks(&pool);
}

/// Holds every advice until `RELEASE_ADVICE` is set, so a test can act while the hinter
/// has a block isolated.
struct GatedAdvisor;

static RELEASE_ADVICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static GATED_ADVISOR: GatedAdvisor = GatedAdvisor;

impl pagepool::Advisor for GatedAdvisor {
    fn advise(
        &self,
        _ranges: &[(usize, usize)],
        _mode: pagepool::HintMode,
        ok: &mut [bool],
    ) -> u64 {
        while !RELEASE_ADVICE.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        ok.fill(true);
        0
    }
}

/// Regression: a chunk in the shared pool, isolated by the hinter while a capture request
/// registered, was handed over in part when it came back, leaving the rest of the chunk as
/// small free blocks in the shared pool, where no allocation looked (and the captured
/// block's free went to a cache of the shared pool that nothing drained). Allocations
/// then failed with memory free, and the chunk never coalesced again.
#[test]
fn capture_of_a_chunk_returning_to_the_shared_pool_strands_nothing() {
    let pool = quiet(2, 1)
        .keep_chunks(0)
        .hint_min_order(10)
        .capture_min_order(3)
        .advisor(&GATED_ADVISOR)
        .build()
        .unwrap();
    let a = pool.alloc(10).unwrap();
    let b = pool.alloc(10).unwrap();
    pool.free(a); // keep_chunks(0): straight back to the shared pool, unhinted
    std::thread::scope(|scope| {
        // Waits for a condition; on timeout releases the advisor first, so a failure
        // cannot leave the hinter thread (and so the scope) hanging.
        let wait_until = |what: &str, cond: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !cond() {
                if std::time::Instant::now() > deadline {
                    RELEASE_ADVICE.store(true, std::sync::atomic::Ordering::Release);
                    panic!("timed out waiting until {what}");
                }
                std::thread::yield_now();
            }
        };
        let hinter = scope.spawn(|| pool.hint_now());
        // The hinter holds the chunk: it is in flight, invisible to allocations.
        wait_until("the chunk is isolated", &|| {
            pool.stats().in_flight_bytes != 0
        });
        let waiter = scope.spawn(|| pool.alloc_wait(3, std::time::Duration::from_secs(20)));
        wait_until("the request waits", &|| pool.stats().capture.waiting != 0);
        RELEASE_ADVICE.store(true, std::sync::atomic::Ordering::Release);
        assert_eq!(hinter.join().unwrap().blocks, 1);
        let captured = waiter
            .join()
            .unwrap()
            .expect("the returning chunk is captured");
        assert_balanced(&pool);
        // The rest of the chunk is free memory: every order below the chunk must be
        // allocatable (B still holds the other chunk).
        let mut rest = Vec::new();
        for order in 3..10 {
            rest.push(
                pool.alloc(order)
                    .unwrap_or_else(|e| panic!("order {order}: {e}\n{}", pool.stats())),
            );
        }
        for block in rest {
            pool.free(block);
        }
        pool.free(captured);
    });
    pool.free(b);
    assert_whole_chunks(&pool);
    let chunks: Vec<_> = (0..2)
        .map(|_| pool.alloc(10).expect("both chunks whole again"))
        .collect();
    for chunk in chunks {
        pool.free(chunk);
    }
}
