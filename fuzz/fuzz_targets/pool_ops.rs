//! Random operation sequences, bad inputs included, against a model of the live blocks.
//!
//! Some operations go through a `LocalCache`, whose blocks count as allocated.
//!
//! Checks after every operation: no two live blocks overlap, contents survive until freed,
//! `check_consistency()` passes, allocated bytes equal the model's plus what the cache
//! holds, `free + allocated == capacity`; a raw free succeeds exactly when the address
//! starts a live block (with its order) and otherwise changes nothing; an allocation fails only when no free block of
//! that order or larger is left; and at the end everything coalesces into whole chunks.
#![no_main]

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagepool::{
    AllocError, AllocPolicy, Backing, Block, FreeError, HintMode, PagePool, block_size,
};

#[derive(Arbitrary, Debug)]
struct Config {
    max_order: u8,
    chunks: u8,
    shards: u8,
    cache_blocks: u8,
    keep_chunks: u8,
    hint_min_order: u8,
    capture_min_order: u8,
    fifo: bool,
    dontneed: bool,
    heap: bool,
    local_cache_blocks: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Alloc {
        order: u8,
        shard: u8,
    },
    AllocZeroed {
        order: u8,
    },
    AllocBytes {
        bytes: usize,
    },
    AllocWait {
        order: u8,
    },
    AllocWithReclaim {
        order: u8,
        frees: u8,
    },
    Free {
        which: u16,
    },
    FreeRaw {
        which: u16,
    },
    FreeRawOrder {
        which: u16,
        order: u8,
    },
    /// A raw free at an offset (in 512-byte steps) from a live block, or from the last
    /// freed address: mostly bad pointers.
    FreeAt {
        which: u16,
        offset: i32,
        from_freed: bool,
    },
    Grow {
        which: u16,
        order: u8,
    },
    Shrink {
        which: u16,
        order: u8,
    },
    OrderOf {
        which: u16,
        offset: i16,
    },
    DrainCaches,
    HintNow,
    /// Through the `LocalCache`.
    CacheAlloc {
        order: u8,
    },
    CacheFree {
        which: u16,
    },
    CacheFlush,
}

struct Model {
    live: BTreeMap<usize, (Block, u8)>,
    last_freed: Option<usize>,
    tag: u8,
}

impl Model {
    fn key(&self, which: u16) -> Option<usize> {
        if self.live.is_empty() {
            None
        } else {
            self.live
                .keys()
                .nth(which as usize % self.live.len())
                .copied()
        }
    }

    fn add(&mut self, mut block: Block) {
        let (start, end) = (
            block.as_ptr() as usize,
            block.as_ptr() as usize + block.len(),
        );
        if let Some((&s, (b, _))) = self.live.range(..end).next_back() {
            assert!(
                s + b.len() <= start,
                "double hand-out: {start:#x}..{end:#x} overlaps {s:#x}"
            );
        }
        self.tag = self.tag.wrapping_add(1);
        let len = block.len();
        let bytes = block.as_mut_slice();
        bytes[0] = self.tag;
        bytes[len - 1] = !self.tag;
        self.live.insert(start, (block, self.tag));
    }

    fn take(&mut self, key: usize) -> Block {
        let (block, tag) = self.live.remove(&key).unwrap();
        let len = block.len();
        assert_eq!(
            (block.as_slice()[0], block.as_slice()[len - 1]),
            (tag, !tag),
            "contents lost"
        );
        self.last_freed = Some(key);
        block
    }

    fn allocated(&self) -> u64 {
        self.live.values().map(|(b, _)| b.len() as u64).sum()
    }
}

fn no_fitting_block(pool: &PagePool, order: u8) {
    let s = pool.stats();
    let fitting: u64 = s.orders.iter().skip(order as usize).map(|o| o.free).sum();
    assert_eq!(
        fitting, 0,
        "an allocation of order {order} failed with fitting blocks free:\n{s}"
    );
}

fuzz_target!(|input: (Config, Vec<Op>)| {
    let (config, ops) = input;
    let max_order = config.max_order % 7;
    let chunks = 1 + config.chunks as usize % 6;
    let pool = PagePool::builder()
        .capacity(chunks * block_size(max_order))
        .max_order(max_order)
        .shards(1 + config.shards as usize % 3)
        .backing(if config.heap {
            Backing::Heap
        } else {
            Backing::Mmap
        })
        .hint_thread(false)
        .cache_blocks(config.cache_blocks as u32 % 5)
        .keep_chunks(config.keep_chunks as u32 % 3)
        .hint_min_order(config.hint_min_order % 8)
        .capture_min_order(config.capture_min_order % 8)
        .policy(if config.fifo {
            AllocPolicy::Fifo
        } else {
            AllocPolicy::PreferUnhinted
        })
        .hint_mode(if config.dontneed {
            HintMode::DontNeed
        } else {
            HintMode::Free
        })
        .build()
        .expect("a valid configuration");
    let mut cache = pool.local_cache_with(config.local_cache_blocks as u32 % 9);
    let mut model = Model {
        live: BTreeMap::new(),
        last_freed: None,
        tag: 0,
    };
    for op in ops.into_iter().take(256) {
        match op {
            Op::Alloc { order, shard } => match pool.alloc_on(shard as usize, order % 9) {
                Ok(block) => model.add(block),
                Err(AllocError::Exhausted { order }) => no_fitting_block(&pool, order),
                Err(AllocError::OrderTooLarge {
                    order,
                    max_order: m,
                }) => assert!(order > m && m == max_order),
                Err(other) => panic!("alloc: {other}"),
            },
            Op::AllocZeroed { order } => match pool.alloc_zeroed(order % 9) {
                Ok(block) => {
                    assert!(
                        block.as_slice().iter().all(|&b| b == 0),
                        "alloc_zeroed gave dirty memory"
                    );
                    model.add(block);
                }
                Err(AllocError::Exhausted { order }) => no_fitting_block(&pool, order),
                Err(AllocError::OrderTooLarge { .. }) => assert!(order % 9 > max_order),
                Err(other) => panic!("alloc_zeroed: {other}"),
            },
            Op::AllocBytes { bytes } => match pool.alloc_bytes(bytes) {
                Ok(block) => {
                    assert!(
                        block.len() >= bytes && (block.order() == 0 || block.len() / 2 < bytes)
                    );
                    model.add(block);
                }
                Err(AllocError::UnsupportedLayout { size, .. }) => assert_eq!(size, bytes),
                Err(AllocError::OrderTooLarge { .. } | AllocError::Exhausted { .. }) => {}
                Err(other) => panic!("alloc_bytes: {other}"),
            },
            Op::AllocWait { order } => match pool.alloc_wait(order % 9, Duration::ZERO) {
                Ok(block) => model.add(block),
                Err(
                    AllocError::Exhausted { .. }
                    | AllocError::Timeout { .. }
                    | AllocError::OrderTooLarge { .. },
                ) => {}
                Err(other) => panic!("alloc_wait: {other}"),
            },
            Op::AllocWithReclaim { order, frees } => {
                let mut left = frees % 4;
                let result = pool.alloc_with_reclaim(order % 9, || {
                    if left == 0 {
                        return false;
                    }
                    left -= 1;
                    let Some(key) = model.key(left as u16) else {
                        return false;
                    };
                    let block = model.take(key);
                    pool.free(block);
                    true
                });
                match result {
                    Ok(block) => model.add(block),
                    Err(AllocError::ReclaimFailed { .. } | AllocError::OrderTooLarge { .. }) => {}
                    Err(other) => panic!("alloc_with_reclaim: {other}"),
                }
            }
            Op::Free { which } => {
                if let Some(key) = model.key(which) {
                    pool.free(model.take(key));
                }
            }
            Op::FreeRaw { which } => {
                if let Some(key) = model.key(which) {
                    let block = model.take(key);
                    let order = block.order();
                    // SAFETY: a live block of this pool, freed once.
                    assert_eq!(unsafe { pool.free_raw(block.into_raw()) }, Ok(order));
                }
            }
            Op::FreeRawOrder { which, order } => {
                if let Some(key) = model.key(which) {
                    let actual = model.live[&key].0.order();
                    let ptr = model.live[&key].0.as_non_null();
                    if order == actual {
                        let block = model.take(key);
                        // SAFETY: a live block of this pool, freed once.
                        assert_eq!(
                            unsafe { pool.free_raw_order(block.into_raw(), order) },
                            Ok(())
                        );
                    } else {
                        let before = pool.stats();
                        // SAFETY: the wrong order is refused before anything changes.
                        let err = unsafe { pool.free_raw_order(ptr, order) };
                        assert_eq!(
                            err,
                            Err(FreeError::WrongOrder {
                                given: order,
                                actual
                            })
                        );
                        assert_eq!(pool.stats(), before);
                    }
                }
            }
            Op::FreeAt {
                which,
                offset,
                from_freed,
            } => {
                let base = if from_freed {
                    model.last_freed
                } else {
                    model.key(which)
                };
                let Some(base) = base else { continue };
                let addr = base.wrapping_add((offset as isize * 512) as usize);
                let Some(ptr) = NonNull::new(addr as *mut u8) else {
                    continue;
                };
                if let Some(key) = model.live.contains_key(&addr).then_some(addr) {
                    let block = model.take(key);
                    let order = block.order();
                    // SAFETY: the address starts a live block: a legal free.
                    assert_eq!(unsafe { pool.free_raw(block.into_raw()) }, Ok(order));
                } else {
                    let before = pool.stats();
                    // SAFETY: not a live block start: the pool must refuse it, touching
                    // nothing (it only compares the address and reads the frame table).
                    let err =
                        unsafe { pool.free_raw(ptr) }.expect_err("freed a block that is not live");
                    let inside = pool.contains(ptr.as_ptr());
                    match err {
                        FreeError::OutsideRegion => assert!(!inside),
                        FreeError::NotBlockStart | FreeError::AlreadyFree => assert!(inside),
                        other => panic!("free_raw: {other}"),
                    }
                    assert_eq!(pool.stats(), before, "a refused free changed the pool");
                }
            }
            Op::Grow { which, order } => {
                if let Some(key) = model.key(which) {
                    let (mut block, tag) = model.live.remove(&key).unwrap();
                    let from = block.order();
                    let grown = pool.try_grow(&mut block, order % 9);
                    assert_eq!(block.as_ptr() as usize, key);
                    assert_eq!(
                        block.order(),
                        if grown { (order % 9).max(from) } else { from }
                    );
                    assert_eq!(block.as_slice()[0], tag);
                    model.tag = tag.wrapping_sub(1);
                    model.add(block);
                }
            }
            Op::Shrink { which, order } => {
                if let Some(key) = model.key(which) {
                    let (mut block, tag) = model.live.remove(&key).unwrap();
                    let to = order % (block.order() + 1);
                    pool.shrink(&mut block, to);
                    assert_eq!(block.order(), to);
                    assert_eq!(block.as_slice()[0], tag);
                    model.tag = tag.wrapping_sub(1);
                    model.add(block);
                }
            }
            Op::OrderOf { which, offset } => {
                if let Some(key) = model.key(which) {
                    let addr = key.wrapping_add((offset as isize * 4096) as usize);
                    let got = pool.order_of(addr as *const u8);
                    match model.live.get(&addr) {
                        Some((block, _)) => assert_eq!(got, Ok(block.order())),
                        None => assert!(
                            got.is_err(),
                            "order_of({addr:#x}) = {got:?} for no live block"
                        ),
                    }
                }
            }
            Op::DrainCaches => pool.drain_caches(),
            Op::CacheAlloc { order } => match cache.alloc(order % 9) {
                Ok(block) => model.add(block),
                Err(AllocError::Exhausted { order }) => no_fitting_block(&pool, order),
                Err(AllocError::OrderTooLarge { .. }) => assert!(order % 9 > max_order),
                Err(other) => panic!("cache alloc: {other}"),
            },
            Op::CacheFree { which } => {
                if let Some(key) = model.key(which) {
                    cache.free(model.take(key));
                }
            }
            Op::CacheFlush => cache.flush(),
            Op::HintNow => {
                pool.hint_now();
            }
        }
        pool.check_consistency()
            .unwrap_or_else(|e| panic!("inconsistent: {e}"));
        let s = pool.stats();
        let cached = cache.held_bytes() as u64;
        assert_eq!(
            s.allocated_bytes,
            model.allocated() + cached,
            "allocated bytes disagree with the model (and {cached} B cached):\n{s}"
        );
        assert_eq!(s.local_cache_bytes, cached, "{s}");
        assert_eq!(
            s.free_bytes + s.allocated_bytes + s.in_flight_bytes,
            s.capacity as u64,
            "{s}"
        );
    }
    for key in model.live.keys().copied().collect::<Vec<_>>() {
        pool.free(model.take(key));
    }
    drop(cache);
    pool.drain_caches();
    pool.check_consistency().unwrap();
    let s = pool.stats();
    assert_eq!(
        s.orders[max_order as usize].free as usize * block_size(max_order),
        s.capacity,
        "not coalesced:\n{s}"
    );
});
