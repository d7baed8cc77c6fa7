//! Issue 2's first benchmark: order-0 and order-9 alloc+free (through the pool and through a
//! `LocalCache`) and a mixed-order random workload, pagepool against glibc's
//! `posix_memalign` of the same sizes and alignment, on 1 and 2 threads. Each block gets one
//! byte written, as in the harness.
//!
//! `cargo bench --bench alloc_free` (a few minutes). The side-by-side comparison with every
//! peer lives in the `pagepool-bench` harness (`benches/harness`).

use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pagepool::PagePool;

/// Pool size for the benchmarks: room for the random workload's live set.
const CAPACITY: usize = 512 << 20;
/// Bytes kept live by the random workload (half the pool).
const LIVE: usize = CAPACITY / 2;

/// The two allocators under test.
trait Alloc: Sync {
    type H: Send;
    fn alloc(&self, order: u8) -> Self::H;
    fn ptr(h: &Self::H) -> *mut u8;
    fn free(&self, h: Self::H, order: u8);
}

impl Alloc for PagePool {
    type H = pagepool::Block;
    #[inline]
    fn alloc(&self, order: u8) -> Self::H {
        PagePool::alloc(self, order).expect("pool has room")
    }
    #[inline]
    fn ptr(h: &Self::H) -> *mut u8 {
        h.as_ptr()
    }
    #[inline]
    fn free(&self, h: Self::H, _order: u8) {
        PagePool::free(self, h);
    }
}

/// glibc `posix_memalign(size, size)` / `free`.
struct Memalign;

/// A pointer from `posix_memalign`, owned by the benchmark thread holding it.
struct Raw(NonNull<u8>);
// SAFETY: a `Raw` uniquely owns its allocation, like a `Box`.
unsafe impl Send for Raw {}

impl Alloc for Memalign {
    type H = Raw;
    #[inline]
    fn alloc(&self, order: u8) -> Self::H {
        let size = 4096usize << order;
        let mut out = std::ptr::null_mut();
        // SAFETY: `out` is a valid place for the result; the alignment is a power of two
        // and a multiple of the pointer size.
        let rc = unsafe { libc::posix_memalign(&mut out, size, size) };
        assert_eq!(rc, 0, "posix_memalign failed");
        Raw(NonNull::new(out.cast()).expect("non-null on success"))
    }
    #[inline]
    fn ptr(h: &Self::H) -> *mut u8 {
        h.0.as_ptr()
    }
    #[inline]
    fn free(&self, h: Self::H, _order: u8) {
        // SAFETY: `h` came from posix_memalign and is freed once.
        unsafe { libc::free(h.0.as_ptr().cast()) }
    }
}

/// Writes the first byte of a block.
#[inline(always)]
fn touch(p: *mut u8) {
    // SAFETY: `p` is the first byte of a live block the caller owns.
    unsafe { p.write_volatile(1) };
}

/// Runs `body(thread, iters)` on `threads` threads released together; returns the wall time.
fn on_threads(threads: usize, iters: u64, body: impl Fn(usize, u64) + Sync) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (barrier, body) = (&barrier, &body);
            s.spawn(move || {
                barrier.wait();
                body(t, iters);
            });
        }
        barrier.wait();
        let start = Instant::now();
        // The scope joins every thread before returning.
        start
    })
    .elapsed()
}

/// xorshift64*: the same order and slot sequence for both allocators.
struct Rng(u64);
impl Rng {
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    #[inline]
    fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 32) * n as u64) >> 32) as usize
    }
    /// Mostly small, some 2 MiB: the harness's mix (percent per order).
    #[inline]
    fn order(&mut self) -> u8 {
        const MIX: [(u8, usize); 8] = [
            (0, 50),
            (1, 15),
            (2, 10),
            (3, 8),
            (4, 7),
            (5, 4),
            (6, 3),
            (9, 3),
        ];
        let mut r = self.below(100);
        for (o, w) in MIX {
            if r < w {
                return o;
            }
            r -= w;
        }
        0
    }
}

fn repeat<A: Alloc>(a: &A, order: u8, threads: usize, iters: u64) -> Duration {
    on_threads(threads, iters, |_, n| {
        for _ in 0..n {
            let h = a.alloc(black_box(order));
            touch(A::ptr(&h));
            a.free(h, order);
        }
    })
}

/// `repeat` through one `LocalCache` per thread (made before the loop, as a worker would).
fn repeat_cached(pool: &PagePool, order: u8, threads: usize, iters: u64) -> Duration {
    on_threads(threads, iters, |_, n| {
        let mut cache = pool.local_cache();
        for _ in 0..n {
            let b = cache.alloc(black_box(order)).expect("pool has room");
            touch(b.as_ptr());
            cache.free(b);
        }
    })
}

/// Each thread keeps `LIVE / threads` bytes live (filled before the clock starts, outside
/// the measured time only approximately: the fill is per sample and excluded below).
fn random<A: Alloc>(a: &A, threads: usize, iters: u64, seed: u64) -> Duration {
    let barrier = Barrier::new(threads + 1);
    let mut total = Duration::ZERO;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut rng = Rng(seed ^ (0x9E37_79B9_7F4A_7C15 * (t as u64 + 1)) | 1);
                    let mut live = 0;
                    let mut slots = Vec::new();
                    while live < LIVE / threads {
                        let o = rng.order();
                        let h = a.alloc(o);
                        touch(A::ptr(&h));
                        live += 4096 << o;
                        slots.push((h, o));
                    }
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        let i = rng.below(slots.len());
                        let o = rng.order();
                        let h = a.alloc(o);
                        touch(A::ptr(&h));
                        let (old, old_o) = std::mem::replace(&mut slots[i], (h, o));
                        a.free(old, old_o);
                    }
                    let elapsed = start.elapsed();
                    for (h, o) in slots {
                        a.free(h, o);
                    }
                    elapsed
                })
            })
            .collect();
        barrier.wait();
        total = handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default();
    });
    total
}

fn benches(c: &mut Criterion) {
    let pool = PagePool::builder()
        .capacity(CAPACITY)
        .build()
        .expect("pool");
    for (name, order) in [("order0", 0u8), ("order9", 9)] {
        let mut g = c.benchmark_group(format!("alloc_free_{name}"));
        g.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        for threads in [1usize, 2] {
            g.throughput(Throughput::Elements(threads as u64));
            g.bench_with_input(BenchmarkId::new("pagepool", threads), &threads, |b, &t| {
                b.iter_custom(|iters| repeat(&pool, order, t, iters))
            });
            g.bench_with_input(
                BenchmarkId::new("pagepool_local_cache", threads),
                &threads,
                |b, &t| b.iter_custom(|iters| repeat_cached(&pool, order, t, iters)),
            );
            g.bench_with_input(
                BenchmarkId::new("posix_memalign", threads),
                &threads,
                |b, &t| b.iter_custom(|iters| repeat(&Memalign, order, t, iters)),
            );
        }
        g.finish();
    }
    let mut g = c.benchmark_group("random_mixed_256MiB_live");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_with_input(BenchmarkId::new("pagepool", threads), &threads, |b, &t| {
            let mut seed = 1;
            b.iter_custom(|iters| {
                seed += 1;
                random(&pool, t, iters, seed)
            })
        });
        g.bench_with_input(
            BenchmarkId::new("posix_memalign", threads),
            &threads,
            |b, &t| {
                let mut seed = 1;
                b.iter_custom(|iters| {
                    seed += 1;
                    random(&Memalign, t, iters, seed)
                })
            },
        );
    }
    g.finish();
}

criterion_group!(alloc_free, benches);
criterion_main!(alloc_free);
