//! How long `fork()` takes in the parent with `PoolAlloc` as the global allocator while
//! other threads allocate, against the same program with the pool switched off (every
//! request to the system allocator). The pool's fork handlers take every pool lock before
//! the fork; the copy of the page tables grows with resident memory.
//!
//! ```sh
//! cargo run --release --example fork_latency            # pool and system, 3 threads
//! cargo run --release --example fork_latency -- 8 200   # 8 threads, 200 forks each
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pagepool::{PoolAlloc, ProcessMemory};

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

/// Forks `forks` children (each exits at once) while `threads` threads allocate vectors of
/// 4 KiB to 512 KiB; returns the parent's fork times in milliseconds, sorted.
fn measure(threads: usize, forks: usize) -> Vec<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..threads)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let v = vec![t as u8; 4096 << (n % 8)];
                    std::hint::black_box(&v);
                    n += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut times = Vec::with_capacity(forks);
    for _ in 0..forks {
        let start = Instant::now();
        // SAFETY: the child only calls `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        times.push(start.elapsed().as_secs_f64() * 1e3);
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    stop.store(true, Ordering::Relaxed);
    for t in busy {
        t.join().expect("allocating thread");
    }
    times.sort_by(f64::total_cmp);
    times
}

fn main() {
    let mut args = std::env::args().skip(1);
    let threads = args.next().map_or(3, |a| a.parse().expect("threads"));
    let forks: usize = args.next().map_or(100, |a| a.parse().expect("forks"));
    println!("{threads} threads allocating 4-512 KiB vectors, {forks} forks per mode");
    // Interleaved rounds, so both modes see the same machine.
    for round in 0..3 {
        for (mode, on) in [("pool", true), ("system", false)] {
            GLOBAL.set_pool_enabled(on);
            let t = measure(threads, forks);
            let held = ProcessMemory::read().map_or(0, |m| m.held() >> 20);
            let pick = |q: f64| t[((t.len() - 1) as f64 * q) as usize];
            println!(
                "round {round} {mode:>6}: fork in the parent p50 {:.3} ms, p90 {:.3} ms, max {:.3} ms; Rss - LazyFree {held} MiB",
                pick(0.5),
                pick(0.9),
                pick(1.0)
            );
        }
    }
}
