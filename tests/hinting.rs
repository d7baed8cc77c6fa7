//! Free page hinting: state transitions, merge rules, allocation preference, both modes,
//! advisor failures and panics, and the background thread.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagepool::{Advisor, AllocPolicy, Backing, Block, HintMode, PagePool, PoolBuilder};

mod common;

use common::{CHUNK, live_threads_named, wait_until};

/// One shard, no cache, 4 MiB chunks, hint at 2 MiB and up, no thread.
fn quiet(chunks: usize) -> PoolBuilder {
    common::quiet(chunks, 1)
        .cache_blocks(0)
        .keep_chunks(64)
        .hint_min_order(9)
}

fn in_block(ptr: *const u8, block_start: usize, len: usize) -> bool {
    (ptr as usize).wrapping_sub(block_start) < len
}

#[test]
fn fresh_memory_is_known_zero_and_freed_memory_unhinted() {
    let pool = quiet(4).build().unwrap();
    let s = pool.stats();
    assert_eq!(
        s.zero_bytes,
        4 * CHUNK as u64,
        "a fresh mapping is known-zero"
    );
    let mut block = pool.alloc(10).unwrap();
    block.as_mut_slice()[0] = 1;
    pool.free(block);
    let s = pool.stats();
    assert_eq!(s.zero_bytes, 3 * CHUNK as u64);
    assert_eq!(
        s.resident_free_bytes(),
        CHUNK as u64,
        "a freed block is unhinted"
    );
    pool.check_consistency().unwrap();
}

#[test]
fn hint_now_turns_unhinted_into_hinted_and_allocation_clears_it() {
    let pool = quiet(2).build().unwrap();
    let a = pool.alloc(10).unwrap();
    let b = pool.alloc(10).unwrap();
    pool.free(a);
    pool.free(b);
    let report = pool.hint_now();
    assert_eq!(report.blocks, 2);
    assert_eq!(report.bytes, 2 * CHUNK as u64);
    let s = pool.stats();
    assert_eq!(s.hinted_bytes, 2 * CHUNK as u64);
    assert_eq!(s.orders[10].hinted, 2);
    assert!(s.hint.madvise_calls >= 1);
    assert_eq!(s.hint.bytes_hinted_total, 2 * CHUNK as u64);
    // Allocating a hinted block takes it out of the hinted state.
    let c = pool.alloc(10).unwrap();
    assert_eq!(pool.stats().hinted_bytes, CHUNK as u64);
    pool.free(c);
    assert_eq!(
        pool.stats().hinted_bytes,
        CHUNK as u64,
        "a freed block is unhinted again"
    );
    // Blocks below the hint order are never hinted.
    let d = pool.alloc(8).unwrap();
    let e = pool.alloc(8).unwrap();
    pool.free(d);
    let before = pool.stats().hinted_bytes;
    pool.hint_now();
    assert!(pool.stats().hinted_bytes >= before);
    assert_eq!(pool.stats().orders[8].hinted, 0);
    pool.free(e);
    pool.check_consistency().unwrap();
}

#[test]
fn allocation_prefers_unhinted_then_hinted_then_zero() {
    let pool = quiet(4).build().unwrap();
    // Chunks 0 and 1 used, freed and hinted; chunks 2 and 3 never touched (zero).
    let c0 = pool.alloc(10).unwrap();
    let c1 = pool.alloc(10).unwrap();
    let (c0_addr, c1_addr) = (c0.as_ptr() as usize, c1.as_ptr() as usize);
    pool.free(c0);
    pool.free(c1);
    pool.hint_now();
    // Hinted before zero.
    let mut hot = pool.alloc(10).unwrap();
    let hot_addr = hot.as_ptr() as usize;
    assert!(
        hot_addr == c0_addr || hot_addr == c1_addr,
        "a hinted chunk before a zero one"
    );
    let cold_addr = if hot_addr == c0_addr {
        c1_addr
    } else {
        c0_addr
    };
    hot.as_mut_slice()[0] = 7;
    pool.free(hot);
    let s = pool.stats();
    assert_eq!(
        (
            s.orders[10].unhinted,
            s.orders[10].hinted,
            s.orders[10].zero
        ),
        (1, 1, 2)
    );

    // Small blocks split the unhinted chunk, not the hinted or zero ones.
    let small = pool.alloc(0).unwrap();
    assert!(
        in_block(small.as_ptr(), hot_addr, CHUNK),
        "order 0 should come from the unhinted chunk"
    );
    let half = pool.alloc(9).unwrap();
    assert!(
        in_block(half.as_ptr(), hot_addr, CHUNK),
        "the unhinted chunk's other half next"
    );
    // Only hinted and zero chunks are whole now: hinted first, zero last.
    let next = pool.alloc(10).unwrap();
    assert_eq!(
        next.as_ptr() as usize,
        cold_addr,
        "the hinted chunk before a zero one"
    );
    let zero = pool.alloc(10).unwrap();
    assert!(![c0_addr, c1_addr].contains(&(zero.as_ptr() as usize)));
    for b in [small, half, next, zero] {
        pool.free(b);
    }
    pool.check_consistency().unwrap();
}

#[test]
fn alloc_zeroed_prefers_known_zero_and_zeroes_the_rest() {
    let pool = quiet(2).build().unwrap();
    let mut dirty = pool.alloc(10).unwrap();
    dirty.as_mut_slice().fill(0xAB);
    let dirty_addr = dirty.as_ptr() as usize;
    pool.free(dirty);
    // The dirty chunk is preferred by alloc, but alloc_zeroed takes the zero chunk.
    let zeroed = pool.alloc_zeroed(10).unwrap();
    assert_ne!(zeroed.as_ptr() as usize, dirty_addr);
    assert!(zeroed.as_slice().iter().all(|&b| b == 0));
    // With no zero block left, the dirty one is zeroed by a memset.
    let zeroed2 = pool.alloc_zeroed(10).unwrap();
    assert_eq!(zeroed2.as_ptr() as usize, dirty_addr);
    assert!(zeroed2.as_slice().iter().all(|&b| b == 0));
    pool.free(zeroed);
    pool.free(zeroed2);
    pool.check_consistency().unwrap();
}

#[test]
fn fifo_policy_takes_the_oldest_free_block() {
    let pool = quiet(3).policy(AllocPolicy::Fifo).build().unwrap();
    let blocks: Vec<Block> = (0..3).map(|_| pool.alloc(10).unwrap()).collect();
    let addrs: Vec<usize> = blocks.iter().map(|b| b.as_ptr() as usize).collect();
    for b in blocks {
        pool.free(b);
    }
    pool.hint_now(); // all three hinted: FIFO ignores that
    let again = pool.alloc(10).unwrap();
    assert_eq!(
        again.as_ptr() as usize,
        addrs[0],
        "FIFO reuses the block freed first"
    );
    pool.free(again);
    // Under the preference policy the just-freed (unhinted) block would come back instead.
    let next = pool.alloc(10).unwrap();
    assert_eq!(next.as_ptr() as usize, addrs[1]);
    pool.free(next);
    pool.check_consistency().unwrap();

    let preferred = quiet(3).build().unwrap();
    let blocks: Vec<Block> = (0..3).map(|_| preferred.alloc(10).unwrap()).collect();
    for b in blocks {
        preferred.free(b);
    }
    preferred.hint_now();
    let hot = preferred.alloc(10).unwrap();
    let hot_addr = hot.as_ptr() as usize;
    preferred.free(hot);
    assert_eq!(
        preferred.alloc(10).map(|b| b.as_ptr() as usize).unwrap(),
        hot_addr,
        "unhinted first"
    );
}

/// Frees a buddy while the hinter has a block isolated: the hinted block then merges with
/// an unhinted buddy and the result is unhinted.
#[test]
fn hinted_block_merging_with_unhinted_buddy_is_unhinted() {
    struct FreeDuring(Mutex<Option<Box<dyn FnMut() + Send>>>);
    impl Advisor for FreeDuring {
        fn advise(&self, ranges: &[(usize, usize)], _: HintMode, ok: &mut [bool]) -> u64 {
            if let Some(mut f) = self.0.lock().unwrap().take() {
                f();
            }
            ok[..ranges.len()].iter_mut().for_each(|ok| *ok = true);
            1
        }
    }
    let advisor: &'static FreeDuring = Box::leak(Box::new(FreeDuring(Mutex::new(None))));
    let pool: &'static PagePool = Box::leak(Box::new(quiet(1).advisor(advisor).build().unwrap()));
    let lower = pool.alloc(9).unwrap();
    let upper = pool.alloc(9).unwrap();
    pool.free(upper);
    let lower = std::sync::Mutex::new(Some(lower));
    let lower: &'static Mutex<Option<Block>> = Box::leak(Box::new(lower));
    *advisor.0.lock().unwrap() = Some(Box::new(move || {
        // The upper half is isolated now: this free cannot merge with it.
        pool.free(lower.lock().unwrap().take().unwrap());
        let s = pool.stats();
        assert_eq!(s.orders[9].in_flight, 1);
        assert_eq!(s.orders[9].unhinted, 1);
    }));
    let report = pool.hint_now();
    assert!(report.blocks >= 1);
    let s = pool.stats();
    // The returned hinted half merged with the unhinted half into one chunk: unhinted, unless
    // the same pass then hinted that chunk too (it is a candidate at order 10).
    assert_eq!(s.orders[9].free, 0, "the halves merged");
    assert_eq!(s.orders[10].free, 1);
    pool.check_consistency().unwrap();
}

#[test]
fn dontneed_mode_makes_blocks_known_zero_and_non_resident() {
    let pool = quiet(2).hint_mode(HintMode::DontNeed).build().unwrap();
    let mut block = pool.alloc(10).unwrap();
    block.as_mut_slice().fill(0x5A);
    let addr = block.as_ptr();
    pool.free(block);
    let report = pool.hint_now();
    assert_eq!(report.blocks, 1);
    let s = pool.stats();
    assert_eq!(s.hinted_bytes, 0);
    assert_eq!(
        s.zero_bytes,
        2 * CHUNK as u64,
        "DONTNEED blocks are known-zero"
    );
    // The kernel really dropped the pages: mincore reports them not resident.
    let mut vec = vec![0u8; CHUNK / 4096];
    // SAFETY: addr..addr+CHUNK lies in the pool's mapping; `vec` has one byte per page.
    let rc = unsafe { libc::mincore(addr.cast(), CHUNK, vec.as_mut_ptr()) };
    if rc == 0 {
        assert!(
            vec.iter().all(|&v| v & 1 == 0),
            "pages still resident after MADV_DONTNEED"
        );
    } else {
        println!(
            "skipping residency check: mincore failed: {}",
            std::io::Error::last_os_error()
        );
    }
    // Known-zero means alloc_zeroed needs no memset, and the bytes really are zero.
    let again = pool.alloc_zeroed(10).unwrap();
    assert!(again.as_slice().iter().all(|&b| b == 0));
    pool.free(again);
    pool.check_consistency().unwrap();
}

#[test]
fn free_mode_keeps_contents_until_reclaim_and_counts_lazyfree() {
    let pool = quiet(1).build().unwrap();
    let mut block = pool.alloc(10).unwrap();
    block.as_mut_slice().fill(1);
    pool.free(block);
    pool.hint_now();
    assert_eq!(pool.stats().hinted_bytes, CHUNK as u64);
    // Reuse: contents are undefined (old bytes or zeros), and writing cancels the hint.
    let mut block = pool.alloc(10).unwrap();
    assert!(block.as_slice().iter().all(|&b| b == 0 || b == 1));
    block.as_mut_slice().fill(2);
    assert!(block.as_slice().iter().all(|&b| b == 2));
    pool.free(block);
}

struct Failing;
impl Advisor for Failing {
    fn advise(&self, ranges: &[(usize, usize)], _: HintMode, ok: &mut [bool]) -> u64 {
        ok[..ranges.len()].iter_mut().for_each(|ok| *ok = false);
        ranges.len() as u64
    }
}

#[test]
fn failing_madvise_leaves_blocks_unhinted_and_counted() {
    static FAILING: Failing = Failing;
    let pool = quiet(2).advisor(&FAILING).build().unwrap();
    let a = pool.alloc(10).unwrap();
    let b = pool.alloc(10).unwrap();
    pool.free(a);
    pool.free(b);
    let before = pool.stats();
    let report = pool.hint_now();
    assert_eq!(report.blocks, 0);
    assert_eq!(report.failures, 2);
    let after = pool.stats();
    assert_eq!(after.hint.failures, 2);
    assert_eq!(after.hinted_bytes, 0);
    assert_eq!(after.free_bytes, before.free_bytes, "no block lost");
    assert_eq!(after.orders[10].unhinted, 2);
    pool.check_consistency().unwrap();
    // The pool keeps working.
    let c = pool.alloc(10).unwrap();
    pool.free(c);
}

#[test]
fn panicking_advisor_does_not_poison_the_pool() {
    struct Panicking;
    impl Advisor for Panicking {
        fn advise(&self, _: &[(usize, usize)], _: HintMode, _: &mut [bool]) -> u64 {
            panic!("injected advisor panic");
        }
    }
    static PANICKING: Panicking = Panicking;
    let pool = quiet(2).advisor(&PANICKING).build().unwrap();
    let a = pool.alloc(10).unwrap();
    pool.free(a);
    let report = pool.hint_now();
    assert_eq!(report.failures, 1);
    let s = pool.stats();
    assert_eq!(s.hint.panics, 1);
    assert_eq!(s.in_flight_bytes, 0, "isolated blocks came back");
    pool.check_consistency().unwrap();
    let blocks: Vec<_> = (0..2).map(|_| pool.alloc(10).unwrap()).collect();
    for b in blocks {
        pool.free(b);
    }
}

#[test]
fn heap_backing_hints_as_bookkeeping() {
    let pool = quiet(1)
        .backing(Backing::Heap)
        .hint_mode(HintMode::DontNeed)
        .build()
        .unwrap();
    let mut block = pool.alloc(10).unwrap();
    block.as_mut_slice().fill(9);
    pool.free(block);
    pool.hint_now();
    let zeroed = pool.alloc_zeroed(10).unwrap();
    assert!(
        zeroed.as_slice().iter().all(|&b| b == 0),
        "DONTNEED on the heap is emulated by zeroing"
    );
    pool.free(zeroed);
}

fn hinter_thread_ids() -> Vec<u32> {
    live_threads_named("pagepool-hinter")
}

fn thread_cpu_ticks(tid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Serialises the tests that look for the hinter thread by name.
static THREAD_TESTS: Mutex<()> = Mutex::new(());

#[test]
fn background_thread_hints_cold_blocks_and_stops_cleanly() {
    let _serial = THREAD_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let pool = quiet(4)
        .hint_thread(true)
        .hint_delay(Duration::from_millis(100))
        .hint_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    assert!(pool.hinter_running());
    wait_until(
        Duration::from_secs(5),
        "the thread names itself as it starts",
        || !hinter_thread_ids().is_empty(),
    );
    let ids = hinter_thread_ids();
    assert!(!ids.is_empty(), "a thread named pagepool-hinter runs");
    let blocks: Vec<Block> = (0..4).map(|_| pool.alloc(10).unwrap()).collect();
    let freed = Instant::now();
    for b in blocks {
        pool.free(b);
    }
    // Not before the delay...
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        pool.stats().hinted_bytes,
        0,
        "blocks are hinted only once cold"
    );
    // ...but soon after.
    while pool.stats().hinted_bytes < 4 * CHUNK as u64 {
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "hinter did not run: {}",
            pool.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Idle: the thread sleeps without using CPU.
    if let Some(&tid) = ids.first()
        && let Some(before) = thread_cpu_ticks(tid)
    {
        std::thread::sleep(Duration::from_millis(500));
        let after = thread_cpu_ticks(tid).unwrap_or(before);
        assert!(
            after - before <= 1,
            "idle hinter used {} ticks of CPU",
            after - before
        );
    }
    pool.shutdown();
    assert!(!pool.hinter_running());
    assert!(!pool.stats().hint.thread_running);
    pool.check_consistency().unwrap();
    // Restartable.
    pool.start_hinter().unwrap();
    assert!(pool.hinter_running());
}

#[test]
fn high_water_mark_delays_the_wake_up() {
    let _serial = THREAD_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let pool = quiet(4)
        .hint_thread(true)
        .hint_delay(Duration::ZERO)
        .hint_interval(Duration::from_millis(5))
        .hint_high_water(3)
        .build()
        .unwrap();
    // The thread runs one pass as it starts; let it finish.
    let started = Instant::now();
    while pool.stats().hint.passes < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no start-up pass"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let blocks: Vec<Block> = (0..3).map(|_| pool.alloc(10).unwrap()).collect();
    let mut it = blocks.into_iter();
    pool.free(it.next().unwrap());
    pool.free(it.next().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        pool.stats().hint.passes,
        1,
        "two unhinted blocks are below the mark of three"
    );
    assert_eq!(pool.stats().hinted_bytes, 0);
    pool.free(it.next().unwrap());
    let start = Instant::now();
    while pool.stats().hinted_bytes < 3 * CHUNK as u64 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "mark reached but no pass: {}",
            pool.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn counters_are_monotonic_and_their_difference_is_the_free_count() {
    let pool = quiet(2).build().unwrap();
    let snapshot = pool.stats();
    let blocks: Vec<Block> = (0..64).map(|_| pool.alloc(3).unwrap()).collect();
    for b in blocks {
        pool.free(b);
    }
    let now = pool.stats();
    for (old, new) in snapshot.orders.iter().zip(&now.orders) {
        assert!(new.freed_total >= old.freed_total && new.bound_total >= old.bound_total);
        assert_eq!(new.freed_total - new.bound_total, new.free);
    }
    assert!(
        now.orders[3].freed_total - snapshot.orders[3].freed_total >= 64,
        "freed since the snapshot"
    );
    let hinted = AtomicU64::new(0);
    hinted.store(now.hinted_bytes, Ordering::Relaxed);
    assert_eq!(
        now.free_bytes + now.allocated_bytes + now.in_flight_bytes,
        now.capacity as u64
    );
}

#[test]
fn small_zeroed_allocations_reuse_resident_blocks_instead_of_fresh_memory() {
    // Known-zero memory is not resident: taking it for every small zeroed request would
    // touch the whole region, one block at a time (and make every `fork` copy its page
    // tables). Small zeroed blocks come from resident memory, zeroed by a memset.
    let pool = quiet(16).cache_blocks(32).build().unwrap();
    for i in 0..10_000u32 {
        let mut block = pool.alloc_zeroed((i % 4) as u8).unwrap();
        assert!(block.as_slice().iter().all(|&b| b == 0));
        block.as_mut_slice().fill(0xEE);
        pool.free(block);
    }
    let s = pool.stats();
    assert!(
        s.zero_bytes >= 15 * CHUNK as u64,
        "small zeroed allocations walked through fresh memory:\n{s}"
    );
    // Large ones still prefer known-zero memory (no memset, nothing touched).
    let big = pool.alloc_zeroed(9).unwrap();
    assert!(pool.stats().zero_bytes < s.zero_bytes);
    pool.free(big);
}
