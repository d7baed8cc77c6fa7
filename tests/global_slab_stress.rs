//! Multi-threaded stress of `PoolAlloc`'s small objects, checking invariants as it goes:
//!
//! - **no object is handed out twice**: every live allocation's address range is kept in a
//!   shared map, and a new one must not overlap any live one;
//! - **contents survive**: every allocation is filled with a pattern of its own id and
//!   checked before it is freed (or resized), so a write by anyone else shows;
//! - **frees on other threads**: a third of the allocations are sent to another thread,
//!   which frees them (remote frees, when the two run on different CPUs);
//! - **migration**: threads flip their CPU affinity (`sched_setaffinity`) every few hundred
//!   operations, so a thread's objects are freed from CPUs that do not own their slabs,
//!   and caches are refilled on one CPU and used on another;
//! - **idle release racing the fast paths**: a thread keeps calling `drain_caches` (drains
//!   every CPU's cache while others push and pop), and the hinter thread runs with a
//!   short hint delay.
//!
//! At the end everything is freed and the books must balance: no small object live, the
//! consistency check passes, and the pool holds no allocated block.
//!
//! `PAGEPOOL_STRESS_SECS` sets the run time (default 2 s; a release build does about
//! ten times the operations).

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use pagepool::{PoolAlloc, PoolBuilder};

/// The adapter under test, driven by hand (the test's own allocations go to `System`).
static UNDER_TEST: PoolAlloc = PoolAlloc::with_config(
    PoolBuilder::new()
        .capacity(1 << 30)
        .max_order(10)
        .hint_delay(Duration::from_millis(20))
        .hint_interval(Duration::from_millis(5)),
);

const THREADS: usize = 4;

/// Live allocations: start address -> (end, id).
static LIVE: Mutex<BTreeMap<usize, (usize, u64)>> = Mutex::new(BTreeMap::new());

/// Records a new allocation; panics if it overlaps a live one.
fn track(ptr: *mut u8, size: usize, id: u64) {
    let start = ptr as usize;
    let end = start + size;
    let mut live = LIVE.lock().unwrap();
    if let Some((&s, &(e, other))) = live.range(..end).next_back() {
        assert!(
            e <= start || s >= end,
            "allocation {id} at {start:#x}..{end:#x} overlaps live allocation {other} at {s:#x}..{e:#x}"
        );
    }
    live.insert(start, (end, id));
}

/// Forgets an allocation before it is freed.
fn untrack(ptr: *mut u8, id: u64) {
    let removed = LIVE.lock().unwrap().remove(&(ptr as usize));
    assert_eq!(
        removed.map(|(_, i)| i),
        Some(id),
        "freeing an allocation not tracked"
    );
}

/// The pattern byte `i` of allocation `id`.
#[inline]
fn pattern(id: u64, i: usize) -> u8 {
    (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (i as u8).wrapping_mul(31)
}

fn fill(ptr: *mut u8, size: usize, id: u64) {
    // SAFETY: the caller owns `size` bytes at `ptr`.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, size) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = pattern(id, i);
    }
}

fn check(ptr: *const u8, size: usize, id: u64) {
    // SAFETY: the caller owns `size` initialised bytes at `ptr`.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, size) };
    for (i, &b) in bytes.iter().enumerate() {
        assert_eq!(
            b,
            pattern(id, i),
            "allocation {id}: byte {i} of {size} changed"
        );
    }
}

/// One live allocation, sendable to another thread.
struct Obj {
    ptr: usize,
    layout: Layout,
    id: u64,
}

impl Obj {
    fn new(layout: Layout, id: u64, zeroed: bool) -> Self {
        // SAFETY: non-zero sizes only.
        let ptr = unsafe {
            if zeroed {
                UNDER_TEST.alloc_zeroed(layout)
            } else {
                UNDER_TEST.alloc(layout)
            }
        };
        assert!(!ptr.is_null(), "allocation of {layout:?} failed");
        assert_eq!(ptr as usize % layout.align(), 0, "misaligned {layout:?}");
        if zeroed {
            // SAFETY: just allocated with this size.
            let bytes = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            assert!(
                bytes.iter().all(|&b| b == 0),
                "alloc_zeroed: {layout:?} not zero"
            );
        }
        track(ptr, layout.size(), id);
        fill(ptr, layout.size(), id);
        Obj {
            ptr: ptr as usize,
            layout,
            id,
        }
    }

    fn free(self) {
        check(self.ptr as *const u8, self.layout.size(), self.id);
        untrack(self.ptr as *mut u8, self.id);
        // SAFETY: allocated by UNDER_TEST with this layout.
        unsafe { UNDER_TEST.dealloc(self.ptr as *mut u8, self.layout) };
    }

    fn realloc(&mut self, new_size: usize) {
        check(self.ptr as *const u8, self.layout.size(), self.id);
        untrack(self.ptr as *mut u8, self.id);
        // SAFETY: allocated by UNDER_TEST with this layout; non-zero new size.
        let new = unsafe { UNDER_TEST.realloc(self.ptr as *mut u8, self.layout, new_size) };
        assert!(!new.is_null());
        assert_eq!(new as usize % self.layout.align(), 0);
        check(new, self.layout.size().min(new_size), self.id);
        self.layout = Layout::from_size_align(new_size, self.layout.align()).unwrap();
        track(new, new_size, self.id);
        fill(new, new_size, self.id);
        self.ptr = new as usize;
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Mostly small sizes, log-uniform; sometimes up to 64 KiB.
    fn size(&mut self) -> usize {
        let max_shift = if self.below(20) == 0 { 16 } else { 12 };
        let shift = self.below(max_shift + 1) as u32;
        1 + self.below(1 << shift) as usize
    }
    fn align(&mut self) -> usize {
        match self.below(16) {
            0 => 64,
            1 => 4096,
            2 => 32,
            _ => 8,
        }
    }
}

/// Pins the calling thread to one CPU (`cpu` modulo those it may use), or to all.
fn pin(cpu: Option<usize>) {
    let cpus = common::allowed_cpus();
    if cpus.is_empty() {
        return;
    }
    match cpu {
        Some(c) => common::run_on(&[cpus[c % cpus.len()]]),
        None => common::run_on(&cpus),
    };
}

fn worker(
    t: usize,
    deadline: Instant,
    inbox: Receiver<Obj>,
    outboxes: Vec<Sender<Obj>>,
    ops: &AtomicU64,
) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((t as u64 + 1) * 0x9e37));
    let mut live: Vec<Obj> = Vec::new();
    let mut next_id = (t as u64) << 48;
    let mut n = 0u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            n += 1;
            match rng.below(12) {
                0..=4 => {
                    let layout = Layout::from_size_align(rng.size(), rng.align()).unwrap();
                    next_id += 1;
                    live.push(Obj::new(layout, next_id, rng.below(8) == 0));
                }
                5..=6 if !live.is_empty() => {
                    let i = rng.below(live.len() as u64) as usize;
                    live.swap_remove(i).free();
                }
                7 if !live.is_empty() => {
                    // Freed by another thread.
                    let i = rng.below(live.len() as u64) as usize;
                    let to = rng.below(outboxes.len() as u64) as usize;
                    let obj = live.swap_remove(i);
                    if let Err(back) = outboxes[to].send(obj) {
                        back.0.free();
                    }
                }
                8 if !live.is_empty() => {
                    let i = rng.below(live.len() as u64) as usize;
                    let new_size = rng.size();
                    live[i].realloc(new_size);
                }
                _ => {
                    while let Ok(obj) = inbox.try_recv() {
                        obj.free();
                    }
                }
            }
            if live.len() > 2000 {
                for obj in live.drain(..1000) {
                    obj.free();
                }
            }
        }
        // Migrate now and then: pinned to a CPU, or free to roam.
        if n % 512 < 64 {
            pin(match rng.below(3) {
                0 => None,
                c => Some(c as usize + t),
            });
        }
    }
    ops.fetch_add(n, Ordering::Relaxed);
    pin(None);
    for obj in live {
        obj.free();
    }
    // Whatever is still on its way to us.
    drop(outboxes);
    while let Ok(obj) = inbox.recv_timeout(Duration::from_millis(200)) {
        obj.free();
    }
}

#[test]
fn small_objects_under_stress_keep_their_invariants() {
    let secs: f64 = std::env::var("PAGEPOOL_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    UNDER_TEST.init().expect("build the pool");
    UNDER_TEST.start_hinter().expect("hinter");
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let ops = AtomicU64::new(0);
    let (senders, receivers): (Vec<Sender<Obj>>, Vec<Receiver<Obj>>) =
        (0..THREADS).map(|_| channel()).unzip();
    let stop = AtomicBool::new(false);
    let drains = AtomicU64::new(0);
    let start = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        // Drains every CPU's cache while the workers use them.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                UNDER_TEST.drain_caches();
                drains.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        let workers: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(t, inbox)| {
                let outboxes = senders.clone();
                let start = start.clone();
                let ops = &ops;
                s.spawn(move || {
                    start.wait();
                    worker(t, deadline, inbox, outboxes, ops)
                })
            })
            .collect();
        drop(senders);
        for w in workers {
            w.join().expect("worker");
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(LIVE.lock().unwrap().is_empty(), "allocations left behind");
    let stats = UNDER_TEST.stats();
    println!(
        "{} operations, {} drains\n{stats}",
        ops.load(Ordering::Relaxed),
        drains.load(Ordering::Relaxed)
    );
    assert!(
        stats.remote_frees > 0 && stats.slab_refills > 0 && stats.slab_spills > 0,
        "{stats}"
    );
    UNDER_TEST.drain_caches();
    UNDER_TEST.check_consistency().expect("books balance");
    let after = UNDER_TEST.stats();
    assert_eq!(after.slab_live_objects, 0, "{after}");
    assert_eq!(after.slab_cached_bytes, 0, "{after}");
    UNDER_TEST.stop_hinter();
    let pool = UNDER_TEST.pool_stats().unwrap();
    assert_eq!(
        pool.allocated_bytes, 0,
        "every slab went back to the pool:\n{pool}"
    );
}
