//! Differential stress test of `PoolAlloc` through the `GlobalAlloc` trait.
//!
//! The test binary keeps the system allocator as its global allocator; the adapters under
//! test are private statics driven by hand. Several threads run random sequences of
//! `alloc`, `alloc_zeroed`, `realloc` (growing and shrinking) and `dealloc` with sizes from
//! 1 byte to beyond the largest pool block (log-uniform) and power-of-two alignments up to
//! the largest block, and hand live allocations to each other before they are freed. Every
//! operation is repeated on `std::alloc::System` with the same layout, and the two are
//! compared:
//! - every live allocation holds a pattern derived from its (id, size), checked in both
//!   copies before every `realloc` and `dealloc`;
//! - `alloc_zeroed` memory is zero in both;
//! - after `realloc`, the preserved prefix is equal in both and equal to the pattern;
//! - pointers are aligned as asked, and no two live allocations of the adapter overlap (a
//!   shared map of address ranges).
//!
//! Seeds are fixed (a small xorshift generator). After each seed the pool is checked for
//! consistency and must hold no allocated bytes; the adapter's allocation and free counts
//! must match. `PAGEPOOL_DIFF_OPS` sets the operations per thread and seed (default 800),
//! `PAGEPOOL_DIFF_SEEDS` the number of seeds (default 4).
//!
//! Four adapters: `ROUTED` sends requests below 2 KiB to the system allocator
//! (`min_pool_size`), so allocations move between the fallback and the pool; `ALL_POOL`
//! serves everything, with hinting during the run; `SMALL` sees only small objects (up to
//! 8 KiB, alignments up to 4 KiB), many handed between threads, so slab caches, spills,
//! refills and remote frees dominate; `HUGE` sees sizes up to 48 MiB and alignments up to
//! 16 MiB, so direct mappings are made, resized with `mremap` (into aligned reservations
//! for large alignments) and moved in and out of the pool.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Barrier, Mutex, OnceLock};

use pagepool::{HintMode, PoolAlloc, PoolBuilder};

/// Largest pool block: order 8, 1 MiB.
const MAX_ORDER: u8 = 8;
const BLOCK_MAX: usize = 4096 << MAX_ORDER;
/// Sizes go up to three largest blocks, so some requests are mapped directly.
const MAX_SIZE: usize = 3 * BLOCK_MAX;
const THREADS: usize = 4;
/// Live allocations per thread before frees are forced.
const LIVE_CAP: usize = 24;

/// Below 2 KiB to the system allocator, the rest to a 32 MiB pool (small enough to run
/// out now and then, so the exhausted path is taken too).
static ROUTED: PoolAlloc =
    PoolAlloc::with_config(PoolBuilder::new().capacity(32 << 20).max_order(MAX_ORDER))
        .min_pool_size(2 << 10);

/// Every request to the pool (`min_pool_size(1)`, the default), hinting with
/// `MADV_DONTNEED` driven by `hint_now` during the run, so `alloc_zeroed` also gets
/// known-zero blocks.
/// Small objects only.
static SMALL: PoolAlloc =
    PoolAlloc::with_config(PoolBuilder::new().capacity(64 << 20).max_order(MAX_ORDER));

/// Large requests: 4 MiB blocks, sizes up to 48 MiB.
static HUGE: PoolAlloc =
    PoolAlloc::with_config(PoolBuilder::new().capacity(256 << 20).max_order(10));

static ALL_POOL: PoolAlloc = PoolAlloc::with_config(
    PoolBuilder::new()
        .capacity(32 << 20)
        .max_order(MAX_ORDER)
        .hint_mode(HintMode::DontNeed)
        .hint_delay(std::time::Duration::ZERO),
)
.min_pool_size(1);

// --- deterministic randomness ------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(mix(seed ^ 0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Log-uniform in `1..=hi`.
    fn log_uniform(&mut self, hi: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((((hi + 1) as f64).ln() * u).exp() as usize).clamp(1, hi)
    }
    /// A power of two from 1 to `max`: mostly small, sometimes up to `max`.
    fn align(&mut self, max: usize) -> usize {
        let max_shift = max.trailing_zeros() as usize;
        if self.below(10) < 7 {
            1 << self.below(5)
        } else {
            1 << self.below(max_shift + 1)
        }
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

// --- patterns -------------------------------------------------------------------------------

/// Period of the pattern: a prime, so patterns of different keys do not line up.
const PERIOD: usize = 4093;

/// Two periods of pseudo-random bytes: any window of one period starting in the first is
/// contiguous, so filling and checking are `memcpy` and `memcmp` even in debug builds.
fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut rng = Rng::new(7);
        let one: Vec<u8> = (0..PERIOD).map(|_| rng.next() as u8).collect();
        one.iter().chain(one.iter()).copied().collect()
    })
}

/// The window of the pattern of an allocation with this id and size.
fn window(id: u64, size: usize) -> &'static [u8] {
    let start = (mix(id ^ (size as u64) << 1) % PERIOD as u64) as usize;
    &table()[start..start + PERIOD]
}

/// Writes the (id, size) pattern over `len` bytes.
///
/// # Safety
/// `ptr` is valid for writing `len` bytes.
unsafe fn fill(ptr: *mut u8, len: usize, id: u64, size: usize) {
    let w = window(id, size);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(PERIOD);
        // SAFETY: `at + n <= len` bytes at `ptr` are writable; `w` is another allocation.
        unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), ptr.add(at), n) };
        at += n;
    }
}

/// Checks the first `len` bytes against the (id, size) pattern.
///
/// # Safety
/// `ptr` is valid for reading `len` initialised bytes.
unsafe fn check(ptr: *const u8, len: usize, id: u64, size: usize, what: &str) {
    let w = window(id, size);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(PERIOD);
        // SAFETY: the caller guarantees `len` readable bytes.
        let got = unsafe { std::slice::from_raw_parts(ptr.add(at), n) };
        if got != &w[..n] {
            let i = got.iter().zip(w).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "{what}: allocation {id:#x} of {size} bytes: byte {} of {len} is {:#04x}, expected {:#04x}",
                at + i,
                got[i],
                w[i]
            );
        }
        at += n;
    }
}

/// Checks that `len` bytes are zero.
///
/// # Safety
/// `ptr` is valid for reading `len` initialised bytes.
unsafe fn check_zero(ptr: *const u8, len: usize, what: &str) {
    static ZEROS: [u8; 4096] = [0; 4096];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(ZEROS.len());
        // SAFETY: the caller guarantees `len` readable bytes.
        let got = unsafe { std::slice::from_raw_parts(ptr.add(at), n) };
        assert!(
            got == &ZEROS[..n],
            "{what}: alloc_zeroed returned non-zero bytes near offset {at} of {len}"
        );
        at += n;
    }
}

// --- the model ------------------------------------------------------------------------------

/// One live allocation, in the adapter (`ptr`) and in the system allocator (`sys`).
struct Live {
    id: u64,
    ptr: usize,
    sys: usize,
    layout: Layout,
}

/// Live address ranges of one adapter: start -> (end, id).
type Ranges = Mutex<BTreeMap<usize, (usize, u64)>>;

fn claim(ranges: &Ranges, ptr: usize, size: usize, id: u64) {
    let mut map = ranges.lock().unwrap();
    let end = ptr + size;
    if let Some((&start, &(prev_end, other))) = map.range(..=ptr).next_back() {
        assert!(
            prev_end <= ptr,
            "allocation {id:#x} at {ptr:#x}..{end:#x} overlaps {other:#x} at {start:#x}..{prev_end:#x}"
        );
    }
    if let Some((&start, &(next_end, other))) = map.range(ptr..).next() {
        assert!(
            start >= end,
            "allocation {id:#x} at {ptr:#x}..{end:#x} overlaps {other:#x} at {start:#x}..{next_end:#x}"
        );
    }
    map.insert(ptr, (end, id));
}

fn release(ranges: &Ranges, ptr: usize, id: u64) {
    let removed = ranges.lock().unwrap().remove(&ptr);
    assert_eq!(
        removed.map(|r| r.1),
        Some(id),
        "range of {id:#x} was tracked"
    );
}

struct World<'a> {
    pool: &'a PoolAlloc,
    ranges: Ranges,
    /// Whether thread 0 calls `hint_now` now and then.
    hint: bool,
    /// The largest size and alignment requested.
    max_size: usize,
    max_align: usize,
    /// Whether each thread is pinned to a CPU of its own (so objects handed over are freed
    /// on another CPU than the one that made them).
    pin: bool,
}

/// Pins the calling thread to the `n`th CPU it may run on (round robin); returns how many
/// there are.
fn pin_to(n: usize) -> usize {
    let cpus = common::allowed_cpus();
    if cpus.is_empty() {
        return 1;
    }
    common::run_on(&[cpus[n % cpus.len()]]);
    cpus.len()
}

impl World<'_> {
    /// Checks both copies against the pattern of their current size.
    fn verify(&self, l: &Live, what: &str) {
        let size = l.layout.size();
        // SAFETY: both copies are live and were filled with `size` bytes of the pattern.
        unsafe {
            check(l.ptr as *const u8, size, l.id, size, what);
            check(l.sys as *const u8, size, l.id, size, "system copy");
        }
    }

    fn alloc(&self, rng: &mut Rng, id: u64) -> Live {
        let size = rng.log_uniform(self.max_size);
        let align = rng.align(self.max_align);
        let layout = Layout::from_size_align(size, align).unwrap();
        let zeroed = rng.below(3) == 0;
        // SAFETY: non-zero size, valid alignment.
        let (ptr, sys) = unsafe {
            if zeroed {
                (self.pool.alloc_zeroed(layout), System.alloc_zeroed(layout))
            } else {
                (self.pool.alloc(layout), System.alloc(layout))
            }
        };
        assert!(!ptr.is_null() && !sys.is_null(), "{layout:?} allocated");
        assert_eq!(ptr as usize % align, 0, "{layout:?} aligned");
        if zeroed {
            // SAFETY: `size` bytes were just allocated (zeroed) at each pointer.
            unsafe {
                check_zero(ptr, size, "pool");
                check_zero(sys, size, "system");
            }
        }
        claim(&self.ranges, ptr as usize, size, id);
        // SAFETY: `size` bytes were just allocated at each pointer.
        unsafe {
            fill(ptr, size, id, size);
            fill(sys, size, id, size);
        }
        Live {
            id,
            ptr: ptr as usize,
            sys: sys as usize,
            layout,
        }
    }

    fn realloc(&self, rng: &mut Rng, l: &mut Live) {
        self.verify(l, "before realloc");
        let old = l.layout.size();
        let new_size = match rng.below(4) {
            0 => rng.log_uniform(self.max_size),
            1 => (old * (2 + rng.below(3))).min(self.max_size),
            2 => (old + rng.below(old / 8 + 1)).min(self.max_size), // in place, often
            _ => (old / (2 + rng.below(3))).max(1),
        };
        release(&self.ranges, l.ptr, l.id);
        // SAFETY: both pointers are live with `l.layout`; `new_size` is non-zero and
        // small enough not to overflow when rounded up to the alignment.
        let (ptr, sys) = unsafe {
            (
                self.pool.realloc(l.ptr as *mut u8, l.layout, new_size),
                System.realloc(l.sys as *mut u8, l.layout, new_size),
            )
        };
        assert!(!ptr.is_null() && !sys.is_null(), "realloc to {new_size}");
        assert_eq!(
            ptr as usize % l.layout.align(),
            0,
            "realloc keeps alignment"
        );
        let kept = old.min(new_size);
        // SAFETY: `kept` bytes were preserved by realloc in both copies.
        unsafe {
            check(ptr, kept, l.id, old, "prefix after realloc");
            let (a, b) = (
                std::slice::from_raw_parts(ptr, kept),
                std::slice::from_raw_parts(sys, kept),
            );
            assert!(a == b, "pool and system agree after realloc");
        }
        l.layout = Layout::from_size_align(new_size, l.layout.align()).unwrap();
        l.ptr = ptr as usize;
        l.sys = sys as usize;
        claim(&self.ranges, l.ptr, new_size, l.id);
        // SAFETY: `new_size` bytes are allocated at each pointer.
        unsafe {
            fill(ptr, new_size, l.id, new_size);
            fill(sys, new_size, l.id, new_size);
        }
    }

    fn dealloc(&self, l: Live) {
        self.verify(&l, "before dealloc");
        release(&self.ranges, l.ptr, l.id);
        // SAFETY: both pointers are live with `l.layout` and freed once.
        unsafe {
            self.pool.dealloc(l.ptr as *mut u8, l.layout);
            System.dealloc(l.sys as *mut u8, l.layout);
        }
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One thread's part of one seed.
fn worker(
    world: &World<'_>,
    seed: u64,
    t: usize,
    ops: usize,
    outboxes: &[Sender<Live>],
    inbox: &Receiver<Live>,
    barrier: &Barrier,
) {
    if world.pin {
        pin_to(t);
    }
    let mut rng = Rng::new(seed << 8 | t as u64);
    let mut live: Vec<Live> = Vec::new();
    let mut next_id = 0u64;
    // A failed check must fail the test, not leave the other threads waiting at the
    // barrier for ever: meet them there first, then fail.
    let churned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for op in 0..ops {
            // Adopt what other threads handed over; check it at once.
            while let Ok(l) = inbox.try_recv() {
                world.verify(&l, "handed over");
                live.push(l);
            }
            if world.hint && t == 0 && op % 64 == 0 {
                world.pool.hint_now();
            }
            let r = rng.below(100);
            if live.is_empty() || (r < 40 && live.len() < LIVE_CAP) {
                let id = seed << 40 | (t as u64) << 32 | next_id;
                next_id += 1;
                let l = world.alloc(&mut rng, id);
                live.push(l);
            } else if r < 65 {
                let k = rng.below(live.len());
                world.realloc(&mut rng, &mut live[k]);
            } else if r < 88 {
                let k = rng.below(live.len());
                world.dealloc(live.swap_remove(k));
            } else {
                let k = rng.below(live.len());
                let to = (t + 1 + rng.below(THREADS - 1)) % THREADS;
                outboxes[to].send(live.swap_remove(k)).unwrap();
            }
        }
    }));
    // Everything sent was sent before this point; then adopt the rest and free it all.
    barrier.wait();
    if let Err(panic) = churned {
        std::panic::resume_unwind(panic);
    }
    while let Ok(l) = inbox.try_recv() {
        world.verify(&l, "handed over");
        live.push(l);
    }
    // Free in a shuffled order.
    while !live.is_empty() {
        let k = rng.below(live.len());
        world.dealloc(live.swap_remove(k));
    }
}

fn run(pool: &'static PoolAlloc, hint: bool) {
    run_with(pool, hint, MAX_SIZE, BLOCK_MAX, 1, false);
}

/// `ops_divisor` scales the operations down for expensive size ranges.
fn run_with(
    pool: &'static PoolAlloc,
    hint: bool,
    max_size: usize,
    max_align: usize,
    ops_divisor: usize,
    pin: bool,
) {
    let ops = env_or("PAGEPOOL_DIFF_OPS", 800) / ops_divisor;
    let seeds = env_or("PAGEPOOL_DIFF_SEEDS", 4) as u64;
    let world = World {
        pool,
        ranges: Mutex::new(BTreeMap::new()),
        hint,
        max_size,
        max_align,
        pin,
    };
    let baseline = pool.pool_stats().map_or(0, |s| s.allocated_bytes);
    for seed in 1..=seeds {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| channel::<Live>()).unzip();
        let barrier = Barrier::new(THREADS);
        std::thread::scope(|s| {
            for (t, rx) in rxs.into_iter().enumerate() {
                let (world, txs, barrier) = (&world, &txs, &barrier);
                s.spawn(move || worker(world, seed, t, ops, txs, &rx, barrier));
            }
        });
        assert!(
            world.ranges.lock().unwrap().is_empty(),
            "seed {seed}: all freed"
        );
        // Every cache (per-CPU object caches, the pool's block caches) gives back first.
        pool.drain_caches();
        pool.check_consistency()
            .unwrap_or_else(|e| panic!("seed {seed}: pool inconsistent: {e}"));
        let stats = pool.pool_stats().expect("the pool was built");
        assert_eq!(
            stats.allocated_bytes, baseline,
            "seed {seed}: nothing leaked in the pool"
        );
        assert_eq!(
            stats.free_bytes + stats.allocated_bytes + stats.in_flight_bytes,
            stats.capacity as u64,
            "seed {seed}: the pool's bytes add up"
        );
    }
    let a = pool.stats();
    eprintln!("{a}");
    assert_eq!(a.pool_allocs, a.pool_frees, "every pool allocation freed");
    assert_eq!(a.slab_live_objects, 0, "every small object freed");
    assert_eq!(a.huge_mappings, 0, "every mapping unmapped");
}

/// The checks of the adapters that see every size range.
fn saw_every_path(a: &pagepool::PoolAllocStats) {
    assert!(a.pool_allocs > 0, "the pool served page blocks: {a}");
    assert!(a.slab_refills > 0, "slabs served small objects: {a}");
    assert!(
        a.too_large > 0,
        "requests above the largest block were mapped: {a}"
    );
    assert!(
        a.grown_in_place + a.shrunk_in_place > 0,
        "some reallocs resized in place: {a}"
    );
    assert!(
        a.moved_within_pool + a.moved_to_pool + a.moved_to_fallback + a.moved_out_of_pool > 0,
        "some reallocs moved: {a}"
    );
}

#[test]
fn routed_adapter_matches_system() {
    run(&ROUTED, false);
    let a = ROUTED.stats();
    saw_every_path(&a);
    assert!(
        a.moved_to_pool > 0,
        "small fallback allocations grew into the pool"
    );
}

#[test]
fn all_pool_adapter_matches_system_with_hinting() {
    run(&ALL_POOL, true);
    saw_every_path(&ALL_POOL.stats());
    let s = ALL_POOL.pool_stats().expect("built");
    assert!(s.hint.blocks_hinted_total > 0, "hint_now gave blocks back");
}

#[test]
fn small_objects_match_system() {
    run_with(&SMALL, false, 8 << 10, 4096, 1, true);
    let a = SMALL.stats();
    assert!(a.slab_refills > 0 && a.slab_spills > 0, "{a}");
    if std::thread::spawn(|| pin_to(0)).join().unwrap() > 1 {
        assert!(a.remote_frees > 0, "objects handed between CPUs: {a}");
    }
    assert_eq!(a.too_large + a.nested + a.exhausted, 0, "{a}");
}

#[test]
fn huge_reallocs_match_system() {
    run_with(&HUGE, false, 48 << 20, 16 << 20, 8, false);
    let a = HUGE.stats();
    assert!(
        a.too_large > 0 && a.huge_remaps > 0,
        "mappings resized with mremap: {a}"
    );
    assert!(a.moved_out_of_pool > 0, "blocks grown into mappings: {a}");
}
