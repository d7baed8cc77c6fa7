//! The capture benchmark: a pool 90 % full of order-0 blocks churned by background
//! threads; a foreground thread asks for order-9 blocks with a deadline.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagepool::{AllocError, PagePool};

use crate::allocs::{PoolOpts, build_pool};

/// Settings.
#[derive(Debug, Clone, Copy)]
pub struct CaptureCfg {
    /// Pool bytes.
    pub capacity: usize,
    /// Fraction of the pool held in order-0 blocks.
    pub fill: f64,
    /// Churn threads.
    pub churners: usize,
    /// Blocks each churner frees (oldest first) before allocating as many again.
    pub batch: usize,
    /// Requested order.
    pub order: u8,
    /// Deadline per request.
    pub deadline: Duration,
    /// Blocks the foreground keeps: beyond this many it frees its oldest after a success.
    /// Default unlimited: the foreground grows like a buffer pool taking memory from the
    /// churners, so once the initial free chunks are gone every request needs a newly
    /// coalesced block.
    pub keep: usize,
    /// Pause between requests.
    pub pause: Duration,
    /// Requests per mode and round.
    pub requests: usize,
}

/// How the foreground asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `alloc_wait` on a pool with capture on (the default: a waiter reserves a region).
    On,
    /// `alloc_wait` on a pool with capture on but `capture_reserve(false)`.
    OnNoReserve,
    /// Pool with `capture(false)`: `alloc_wait` retries with backoff until the deadline.
    OffOnce,
    /// Pool with `capture(false)`, the caller retrying `alloc` with a yield until the deadline.
    OffPoll,
}

impl Mode {
    /// Label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Mode::On => "capture on (alloc_wait, reserving)",
            Mode::OnNoReserve => "capture on, reservation off",
            Mode::OffOnce => "capture off (alloc_wait: the pool retries with backoff)",
            Mode::OffPoll => "capture off (caller spins on alloc + yield)",
        }
    }
}

/// One round's outcome.
#[derive(Debug, Clone, Default)]
pub struct CaptureOut {
    /// Latency of each request in microseconds, successful or not.
    pub lat_us: Vec<f64>,
    /// Latency of successful requests.
    pub ok_lat_us: Vec<f64>,
    /// Requests that got a block within the deadline.
    pub ok: usize,
    /// Requests.
    pub total: usize,
    /// Order-0 allocations the churners made.
    pub churn_allocs: u64,
    /// Churn allocations that failed (pool exhausted at that moment).
    pub churn_failures: u64,
    /// pagepool's capture counter.
    pub captures: u64,
    /// Of the successful requests, those served before any wait (a block was already free).
    pub immediate: usize,
}

/// Runs one round in `mode` on a fresh pool.
pub fn run(cfg: &CaptureCfg, mode: Mode) -> CaptureOut {
    let pool = build_pool(
        cfg.capacity,
        PoolOpts {
            capture: matches!(mode, Mode::On | Mode::OnNoReserve),
            capture_reserve: mode == Mode::On,
            ..PoolOpts::default()
        },
    );
    let total_frames = pool.capacity() / 4096;
    // Fill `fill` of the pool with order-0 blocks, sorted by address: the oldest blocks are
    // contiguous, so freeing the oldest does coalesce, and the rest of the pool is whole
    // free chunks, which the foreground takes first (see `keep`).
    let want = (cfg.fill * total_frames as f64) as usize;
    let mut all: Vec<pagepool::Block> = Vec::with_capacity(want);
    while all.len() < want {
        let b = pool.alloc(0).expect("fill");
        // SAFETY: a fresh block of 4 KiB that we own.
        unsafe { b.as_ptr().write_volatile(1) };
        all.push(b);
    }
    all.sort_by_key(|b| b.as_ptr() as usize);
    // Each churner owns a contiguous address range, oldest (lowest address) first.
    let per = all.len().div_ceil(cfg.churners);
    let mut queues: Vec<VecDeque<pagepool::Block>> = Vec::new();
    let mut it = all.into_iter();
    for _ in 0..cfg.churners {
        let q: VecDeque<_> = it.by_ref().take(per).collect();
        queues.push(q);
    }
    let stop = AtomicBool::new(false);
    let churn_allocs = AtomicU64::new(0);
    let churn_failures = AtomicU64::new(0);
    let captures_before = pool.stats().capture.captures;
    let mut out = CaptureOut::default();
    std::thread::scope(|s| {
        for mut q in queues {
            let (pool, stop, churn_allocs, churn_failures) =
                (&pool, &stop, &churn_allocs, &churn_failures);
            let batch = cfg.batch;
            s.spawn(move || {
                let mut owed = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..batch.min(q.len()) {
                        let b = q.pop_front().expect("non-empty");
                        pool.free(b);
                        owed += 1;
                    }
                    while owed > 0 {
                        match pool.alloc(0) {
                            Ok(b) => {
                                // SAFETY: a fresh block we own.
                                unsafe { b.as_ptr().write_volatile(1) };
                                q.push_back(b);
                                owed -= 1;
                                churn_allocs.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                churn_failures.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
                for b in q {
                    pool.free(b);
                }
            });
        }
        // Let the churn reach a steady state first.
        std::thread::sleep(Duration::from_millis(200));
        let mut held: VecDeque<pagepool::Block> = VecDeque::new();
        for _ in 0..cfg.requests {
            let t0 = Instant::now();
            let got = request(&pool, cfg, mode, &mut out.immediate);
            let lat = t0.elapsed().as_secs_f64() * 1e6;
            out.lat_us.push(lat);

            out.total += 1;
            if let Some(b) = got {
                out.ok += 1;
                out.ok_lat_us.push(lat);
                // SAFETY: a block we own.
                unsafe { b.as_ptr().write_volatile(1) };
                held.push_back(b);
                if held.len() > cfg.keep {
                    pool.free(held.pop_front().expect("non-empty"));
                }
            }
            std::thread::sleep(cfg.pause);
        }
        for b in held {
            pool.free(b);
        }
        stop.store(true, Ordering::Relaxed);
    });
    out.churn_allocs = churn_allocs.load(Ordering::Relaxed);
    out.churn_failures = churn_failures.load(Ordering::Relaxed);
    out.captures = pool.stats().capture.captures - captures_before;
    if let Err(e) = pool.check_consistency() {
        eprintln!("capture bench: pool inconsistent after round: {e}");
    }
    out
}

fn request(
    pool: &PagePool,
    cfg: &CaptureCfg,
    mode: Mode,
    immediate: &mut usize,
) -> Option<pagepool::Block> {
    if let Ok(b) = pool.alloc(cfg.order) {
        *immediate += 1;
        return Some(b);
    }
    match mode {
        Mode::On | Mode::OnNoReserve | Mode::OffOnce => {
            match pool.alloc_wait(cfg.order, cfg.deadline) {
                Ok(b) => Some(b),
                Err(AllocError::Timeout { .. } | AllocError::Exhausted { .. }) => None,
                Err(e) => panic!("alloc_wait: {e}"),
            }
        }
        Mode::OffPoll => {
            let end = Instant::now() + cfg.deadline;
            loop {
                if let Ok(b) = pool.alloc(cfg.order) {
                    return Some(b);
                }
                if Instant::now() >= end {
                    return None;
                }
                std::thread::yield_now();
            }
        }
    }
}
