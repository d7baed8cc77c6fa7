//! Small-object costs through `PoolAlloc`, against the system allocator in the same binary
//! (`set_pool_enabled(false)` sends every request to it): nanoseconds per operation for
//!
//! - `pair`: allocate and free one object, again and again (the per-CPU cache's fast
//!   path: a pop and a push);
//! - `batch`: allocate 10 000 objects, then free them all (refills and spills of the
//!   cache, carving of fresh slabs, then empty slabs going back to the pool);
//! - `remote`: objects allocated on one thread and freed on another, pinned to different
//!   CPUs (remote frees: one compare-and-swap each, collected in batches by the owner).
//!
//! ```sh
//! cargo run --release --example small_objects
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use pagepool::PoolAlloc;

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

const SIZES: [usize; 4] = [16, 64, 256, 2048];

fn pair(layout: Layout, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: non-zero size; freed at once with the same layout.
        unsafe {
            let p = GLOBAL.alloc(layout);
            black_box(p).write(1);
            GLOBAL.dealloc(p, layout);
        }
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn batch(layout: Layout, rounds: usize) -> f64 {
    let mut ptrs = vec![std::ptr::null_mut::<u8>(); 10_000];
    let t = Instant::now();
    for _ in 0..rounds {
        for p in ptrs.iter_mut() {
            // SAFETY: non-zero size.
            *p = unsafe { GLOBAL.alloc(layout) };
            // SAFETY: just allocated.
            unsafe { p.write(1) };
        }
        for &p in ptrs.iter() {
            // SAFETY: allocated above with `layout`.
            unsafe { GLOBAL.dealloc(p, layout) };
        }
    }
    t.elapsed().as_nanos() as f64 / (rounds * ptrs.len() * 2) as f64
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t of our own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn remote(layout: Layout, n: usize) -> f64 {
    let (tx, rx) = sync_channel::<Vec<usize>>(4);
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            pin(0);
            for _ in 0..n / 1000 {
                let v: Vec<usize> = (0..1000)
                    // SAFETY: non-zero size.
                    .map(|_| unsafe { GLOBAL.alloc(layout) } as usize)
                    .collect();
                tx.send(v).unwrap();
            }
        });
        s.spawn(move || {
            pin(1);
            for v in rx {
                for p in v {
                    // SAFETY: allocated by the other thread with `layout`.
                    unsafe { GLOBAL.dealloc(p as *mut u8, layout) };
                }
            }
        });
    });
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("ns per operation (pair: alloc + free; batch: per alloc or free; remote: per object)");
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "size", "pair pool", "pair sys", "batch pool", "batch sys", "remote pool", "remote sys"
    );
    for size in SIZES {
        let layout = Layout::from_size_align(size, 8).unwrap();
        let mut row = Vec::new();
        for (what, f) in [
            ("pair", &(|l| pair(l, 5_000_000)) as &dyn Fn(Layout) -> f64),
            ("batch", &|l| batch(l, 200)),
            ("remote", &|l| {
                if cpus > 1 {
                    remote(l, 2_000_000)
                } else {
                    f64::NAN
                }
            }),
        ] {
            let _ = what;
            for on in [true, false] {
                GLOBAL.set_pool_enabled(on);
                f(layout); // warm up
                // Best of 3.
                let best = (0..3).map(|_| f(layout)).fold(f64::INFINITY, f64::min);
                row.push(best);
            }
            GLOBAL.set_pool_enabled(true);
        }
        println!(
            "{size:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            row[0], row[1], row[2], row[3], row[4], row[5]
        );
    }
    println!("{}", GLOBAL.stats());
}
