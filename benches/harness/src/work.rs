//! The timed workloads (repeat, random, bulk, cross-thread, scaling), generic over [`PageAlloc`].

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::allocs::{Job, Kind, LocalAlloc, PageAlloc, size_of_order, touch};

/// A small fast PRNG (xorshift64*), seeded per thread so every allocator sees the same
/// sequence of orders and slots.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    #[inline]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A value in `0..n`.
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 32) * n as u64) >> 32) as usize
    }
}

/// The "realistic" order mix of the random workload: mostly small, some 2 MiB.
/// (order, weight in percent).
pub const MIX: [(u8, u32); 8] = [
    (0, 50),
    (1, 15),
    (2, 10),
    (3, 8),
    (4, 7),
    (5, 4),
    (6, 3),
    (9, 3),
];

/// Draws an order from [`MIX`].
#[inline]
pub fn mixed_order(rng: &mut Rng) -> u8 {
    let mut r = rng.below(100) as u32;
    for (order, weight) in MIX {
        if r < weight {
            return order;
        }
        r -= weight;
    }
    0
}

/// Mean block size of [`MIX`] in bytes.
pub fn mix_mean_bytes() -> f64 {
    MIX.iter()
        .map(|&(o, w)| size_of_order(o) as f64 * w as f64 / 100.0)
        .sum()
}

/// Whether workers are pinned, worker `t` to the `t`-th CPU this process may use (modulo
/// their number): `--pin`. Unpinned is what a program sees; pinned takes the scheduler's
/// placement and migrations out of a scaling measurement.
pub static PIN: AtomicBool = AtomicBool::new(false);

/// Pins the calling worker `t` when [`PIN`] is set (best effort: a refused
/// `sched_setaffinity` leaves it unpinned, with a message).
pub fn pin_worker(t: usize) {
    if !PIN.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: `cpu_set_t` is plain data; both calls get a valid pointer and its size.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            return;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &allowed))
            .collect();
        if cpus.is_empty() {
            return;
        }
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus[t % cpus.len()], &mut one);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one) != 0 {
            eprintln!("--pin: sched_setaffinity refused; worker {t} runs unpinned");
        }
    }
}

/// The machine's own scaling ceiling: each thread runs `iters` rounds of a dependent
/// arithmetic chain about as long as a cached alloc+free, writing one byte of a page of
/// its own per round, and allocates nothing. Returns ns per round, aggregate (wall /
/// total rounds), measured like [`Repeat`]. Shared cores (SMT siblings), the hypervisor
/// and frequency changes limit this loop as much as any allocator's.
pub fn ceiling(threads: usize, iters: usize) -> f64 {
    let (wall, sums) = run_threads(threads, |t| {
        let mut page = vec![0u8; 4096];
        let mut x = Rng::new(t as u64 + 1);
        let mut acc = 0u64;
        for i in 0..iters {
            for _ in 0..6 {
                acc = acc.wrapping_add(x.next());
            }
            page[i & 4095] = acc as u8;
            std::hint::black_box(&mut page);
        }
        acc
    });
    std::hint::black_box(sums);
    wall.as_nanos() as f64 / (iters * threads) as f64
}

/// Runs `f(thread index)` on `threads` threads released together; returns the wall time
/// from the release until the last one finished, and the results.
pub fn run_threads<R: Send>(threads: usize, f: impl Fn(usize) -> R + Sync) -> (Duration, Vec<R>) {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                let barrier = &barrier;
                s.spawn(move || {
                    pin_worker(t);
                    barrier.wait();
                    let start = Instant::now();
                    let out = f(t);
                    (start, Instant::now(), out)
                })
            })
            .collect();
        barrier.wait();
        // From the first worker's start to the last one's end, as the workers saw them: the
        // spawning thread may not run again until long after the workers started (more
        // threads than CPUs), so its own clock would miss their work.
        let mut first: Option<Instant> = None;
        let mut last: Option<Instant> = None;
        let out: Vec<R> = handles
            .into_iter()
            .map(|h| {
                let (start, end, out) = h.join().expect("worker panicked");
                first = Some(first.map_or(start, |f| f.min(start)));
                last = Some(last.map_or(end, |l| l.max(end)));
                out
            })
            .collect();
        let wall = match (first, last) {
            (Some(first), Some(last)) => last.saturating_duration_since(first),
            _ => Duration::ZERO,
        };
        (wall, out)
    })
}

/// Workload 1, repeat: each thread allocates, touches and frees one block of `order`,
/// `iters` times. Returns nanoseconds per alloc+free, aggregate over threads
/// (wall time / total operations).
pub struct Repeat {
    /// Block order.
    pub order: u8,
    /// Threads.
    pub threads: usize,
    /// Operations per thread.
    pub iters: usize,
}

impl Job for Repeat {
    type Out = f64;
    fn run<A: PageAlloc>(&mut self, a: &A, _: Kind) -> f64 {
        let (order, iters) = (self.order, self.iters);
        let (wall, _) = run_threads(self.threads, |_| {
            let mut l = a.local();
            for _ in 0..iters {
                let h = l.alloc(order).expect("repeat: out of memory");
                touch(A::ptr(&h));
                // SAFETY: `h` came from `l.alloc(order)` just above.
                unsafe { l.free(h, order) };
            }
        });
        wall.as_nanos() as f64 / (iters * self.threads) as f64
    }
}

/// Workload 2, bulk: allocate `bytes` in blocks of `order` (touching each), then free them
/// all in allocation order or in a random order. Returns (ns per alloc, ns per free).
pub struct Bulk {
    /// Block order.
    pub order: u8,
    /// Bytes allocated in total.
    pub bytes: usize,
    /// Free in a random order instead of allocation order.
    pub random: bool,
    /// Seed of the free order.
    pub seed: u64,
}

impl Job for Bulk {
    type Out = (f64, f64);
    fn run<A: PageAlloc>(&mut self, a: &A, _: Kind) -> (f64, f64) {
        let n = self.bytes / size_of_order(self.order);
        let mut blocks = Vec::with_capacity(n);
        let mut l = a.local();
        let t0 = Instant::now();
        for _ in 0..n {
            let h = l.alloc(self.order).expect("bulk: out of memory");
            touch(A::ptr(&h));
            blocks.push(h);
        }
        let t_alloc = t0.elapsed();
        if self.random {
            let mut rng = Rng::new(self.seed);
            for i in (1..blocks.len()).rev() {
                blocks.swap(i, rng.below(i + 1));
            }
        }
        let t1 = Instant::now();
        for h in blocks {
            // SAFETY: every handle came from `l.alloc(self.order)` and is freed once.
            unsafe { l.free(h, self.order) };
        }
        let t_free = t1.elapsed();
        (
            t_alloc.as_nanos() as f64 / n as f64,
            t_free.as_nanos() as f64 / n as f64,
        )
    }
}

/// Result of a random-workload round.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomOut {
    /// ns per free+alloc, aggregate (wall / total operations).
    pub ns_per_op: f64,
    /// Allocations that failed (the slot stays empty until its next turn).
    pub failures: u64,
}

/// Workload 3, random: each thread fills its share of `live_bytes` with blocks from
/// [`MIX`], then `ops` times frees a random live block and allocates a new one of a random
/// order in its place. Only the steady state is timed.
pub struct Random {
    /// Bytes kept live, over all threads.
    pub live_bytes: usize,
    /// Threads.
    pub threads: usize,
    /// free+alloc pairs per thread.
    pub ops: usize,
    /// Seed.
    pub seed: u64,
}

impl Job for Random {
    type Out = RandomOut;
    fn run<A: PageAlloc>(&mut self, a: &A, _: Kind) -> RandomOut {
        let share = self.live_bytes / self.threads;
        let (ops, seed) = (self.ops, self.seed);
        let barrier = Barrier::new(self.threads + 1);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            for t in 0..self.threads {
                let barrier = &barrier;
                let tx = tx.clone();
                s.spawn(move || {
                    pin_worker(t);
                    let mut rng = Rng::new(seed ^ ((t as u64 + 1) * 0x51_7CC1_B727_220A));
                    let mut l = a.local();
                    let mut slots: Vec<Option<(A::Handle, u8)>> = Vec::new();
                    let mut live = 0usize;
                    let mut failures = 0u64;
                    while live < share {
                        let order = mixed_order(&mut rng);
                        match l.alloc(order) {
                            Some(h) => {
                                touch(A::ptr(&h));
                                live += size_of_order(order);
                                slots.push(Some((h, order)));
                            }
                            None => break,
                        }
                    }
                    barrier.wait(); // setup done
                    barrier.wait(); // go
                    let t0 = Instant::now();
                    for _ in 0..ops {
                        let i = rng.below(slots.len());
                        if let Some((h, order)) = slots[i].take() {
                            // SAFETY: allocated by `l` with this order, freed once.
                            unsafe { l.free(h, order) };
                        }
                        let order = mixed_order(&mut rng);
                        match l.alloc(order) {
                            Some(h) => {
                                touch(A::ptr(&h));
                                slots[i] = Some((h, order));
                            }
                            None => failures += 1,
                        }
                    }
                    let elapsed = t0.elapsed();
                    for (h, order) in slots.into_iter().flatten() {
                        // SAFETY: as above.
                        unsafe { l.free(h, order) };
                    }
                    tx.send((elapsed, failures)).expect("collector alive");
                });
            }
            barrier.wait();
            let start = Instant::now();
            barrier.wait();
            drop(tx);
            let results: Vec<(Duration, u64)> = rx.iter().collect();
            // Wall: from the go signal to the slowest thread's end of the timed loop.
            let slowest = results.iter().map(|r| r.0).max().unwrap_or_default();
            let wall = slowest.max(Duration::from_nanos(1)).min(start.elapsed());
            RandomOut {
                ns_per_op: wall.as_nanos() as f64 / (ops * self.threads) as f64,
                failures: results.iter().map(|r| r.1).sum(),
            }
        })
    }
}

/// Workload 4, cross-thread: a producer allocates and touches blocks of `order` and sends
/// them in batches of `batch` to a consumer that frees them. Returns ns per block
/// (wall / blocks).
pub struct Cross {
    /// Block order.
    pub order: u8,
    /// Blocks in total.
    pub blocks: usize,
    /// Blocks per message.
    pub batch: usize,
}

impl Job for Cross {
    type Out = f64;
    fn run<A: PageAlloc>(&mut self, a: &A, _: Kind) -> f64 {
        let (order, blocks, batch) = (self.order, self.blocks, self.batch);
        let (tx, rx) = mpsc::sync_channel::<Vec<A::Handle>>(2);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut l = a.local();
                let mut left = blocks;
                while left > 0 {
                    let n = left.min(batch);
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        let h = l.alloc(order).expect("cross: out of memory");
                        touch(A::ptr(&h));
                        v.push(h);
                    }
                    left -= n;
                    tx.send(v).expect("consumer alive");
                }
            });
            s.spawn(move || {
                let mut l = a.local();
                for v in rx {
                    for h in v {
                        // SAFETY: allocated with `order` on the producer, freed once.
                        unsafe { l.free(h, order) };
                    }
                }
            });
        });
        t0.elapsed().as_nanos() as f64 / blocks as f64
    }
}

/// Median of a sample (sorted copy).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Percentile `p` (0..=100) of a sample, nearest rank.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}
