//! Fragmentation of the small-object layer, measured: resident memory against live bytes.
//!
//! Four threads allocate `N` small objects each (sizes log-uniform from 8 bytes to 4 KiB),
//! then 90 % of all objects are freed in random order, each by a random thread (so most
//! frees are remote: the object was made on another CPU), then the survivors churn: a
//! random object is replaced by a new one of a random size, many times. After each phase,
//! and after an idle wait that lets the hinter drain caches and return empty slabs, it
//! prints the bytes the program holds (sum of requested sizes), the process's
//! `Rss - LazyFree`, and the allocator's own books.
//!
//! ```sh
//! cargo run --release --example slab_fragmentation            # PoolAlloc
//! PAGEPOOL_OFF=1 cargo run --release --example slab_fragmentation   # the system allocator
//! ```

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use pagepool::{PoolAlloc, ProcessMemory};

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

const THREADS: usize = 4;
const PER_THREAD: usize = 250_000;
const CHURN: usize = 1_000_000;

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Log-uniform in 8..=4096.
    fn size(&mut self) -> usize {
        let bits = 3 + self.next() % 10; // 8 .. 4096
        let lo = 1usize << bits;
        lo + (self.next() as usize % lo).min(4096 - lo)
    }
}

/// Filled with a byte that is never 0, so every page of it is written.
fn object(rng: &mut Rng) -> Box<[u8]> {
    let size = rng.size();
    vec![size as u8 | 1; size].into_boxed_slice()
}

fn report(phase: &str, live: usize) {
    let mem = ProcessMemory::read().expect("smaps_rollup");
    let s = GLOBAL.stats();
    let held = mem.rss.saturating_sub(mem.lazy_free);
    println!(
        "{phase:<22} live {:>8.1} MiB   Rss-LazyFree {:>8.1} MiB ({:>5.2}x live)   slabs {:>7.1} MiB, cached {:>5.1} MiB, slab-live {:>7.1} MiB",
        live as f64 / (1 << 20) as f64,
        held as f64 / (1 << 20) as f64,
        held as f64 / live.max(1) as f64,
        s.slab_bytes as f64 / (1 << 20) as f64,
        s.slab_cached_bytes as f64 / (1 << 20) as f64,
        s.slab_live_bytes as f64 / (1 << 20) as f64,
    );
}

fn main() {
    if std::env::var_os("PAGEPOOL_OFF").is_some() {
        GLOBAL.set_pool_enabled(false);
        println!("the pool is switched off: every small request goes to the system allocator");
    }
    if std::env::var_os("PAGEPOOL_NO_HINTER").is_none() {
        GLOBAL.start_hinter().expect("start the hinter");
    }
    let live_bytes =
        |objs: &[Option<Box<[u8]>>]| -> usize { objs.iter().flatten().map(|o| o.len()).sum() };

    // Phase 1: every thread allocates its share.
    let shards: Vec<Vec<Option<Box<[u8]>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                    (0..PER_THREAD).map(|_| Some(object(&mut rng))).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<Option<Box<[u8]>>> = shards.into_iter().flatten().collect();
    report("allocated", live_bytes(&all));
    let bad = all
        .iter()
        .flatten()
        .filter(|o| o.iter().any(|&b| b != o.len() as u8 | 1))
        .count();
    assert_eq!(bad, 0, "objects overwritten");

    // Phase 2: free 90 % at random, each on a random thread.
    let n = all.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng(42);
    for i in (1..n).rev() {
        order.swap(i, rng.next() as usize % (i + 1));
    }
    let doomed: Vec<Box<[u8]>> = order[..n * 9 / 10]
        .iter()
        .map(|&i| all[i].take().unwrap())
        .collect();
    let queues: Vec<Mutex<Vec<Box<[u8]>>>> = (0..THREADS).map(|_| Mutex::new(Vec::new())).collect();
    for (i, o) in doomed.into_iter().enumerate() {
        queues[i % THREADS].lock().unwrap().push(o);
    }
    std::thread::scope(|s| {
        for q in &queues {
            s.spawn(move || drop(std::mem::take(&mut *q.lock().unwrap())));
        }
    });
    let mut survivors: Vec<Option<Box<[u8]>>> = all.into_iter().filter(|o| o.is_some()).collect();
    report("90 % freed", live_bytes(&survivors));

    // Phase 3: churn on every thread, over its own part of the survivors.
    let parts: Vec<Vec<Option<Box<[u8]>>>> = {
        let per = survivors.len().div_ceil(THREADS);
        let mut parts = Vec::new();
        while !survivors.is_empty() {
            let rest = survivors.split_off(survivors.len().saturating_sub(per));
            parts.push(rest);
        }
        parts
    };
    let barrier = Arc::new(Barrier::new(parts.len()));
    let parts: Vec<Vec<Option<Box<[u8]>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .enumerate()
            .map(|(t, mut part)| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    let mut rng = Rng(7 + t as u64);
                    for _ in 0..CHURN / THREADS {
                        let i = rng.next() as usize % part.len();
                        part[i] = Some(object(&mut rng));
                    }
                    part
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let survivors: Vec<Option<Box<[u8]>>> = parts.into_iter().flatten().collect();
    report("churned", live_bytes(&survivors));
    std::thread::sleep(Duration::from_secs(3));
    report("idle 3 s", live_bytes(&survivors));
    drop(survivors);
    report("all freed", 0);
    std::thread::sleep(Duration::from_secs(3));
    report("all freed, idle 3 s", 0);
    println!("{}", GLOBAL.stats());
}
