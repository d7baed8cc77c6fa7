//! Figures for embedders: batched eviction against a per-block loop, and how fast and how
//! completely `release_idle` gives a burst back.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use pagepool::{Advice, PagePool};

use crate::allocs::{self, PoolOpts};
use crate::mem;
use crate::work::{Rng, median};
use crate::{Args, Ctx};

/// How the evicted blocks lie in the pool.
#[derive(Clone, Copy)]
enum Layout {
    /// The blocks in the order they were allocated (mostly adjacent addresses).
    InOrder,
    /// A random quarter of four times as many live blocks: no two adjacent, as a buffer
    /// manager's victims usually are.
    Scattered,
}

/// Allocates and touches the victims (and the blocks around them), then times one way of
/// evicting the victims. Returns nanoseconds for the whole batch.
fn evict_once(pool: &PagePool, n: usize, layout: Layout, batched: bool, rng: &mut Rng) -> f64 {
    let spread = match layout {
        Layout::InOrder => 1,
        Layout::Scattered => 4,
    };
    let mut live: Vec<NonNull<u8>> = (0..n * spread)
        .map(|_| {
            let b = pool.alloc(0).expect("pool has room");
            let p = b.into_raw();
            // SAFETY: a fresh 4 KiB block we own.
            unsafe { p.as_ptr().write_bytes(0xa5, 4096) };
            p
        })
        .collect();
    let victims: Vec<NonNull<u8>> = match layout {
        Layout::InOrder => std::mem::take(&mut live),
        Layout::Scattered => {
            for i in (1..live.len()).rev() {
                live.swap(i, rng.below(i + 1));
            }
            live.split_off(live.len() - n)
        }
    };
    let t = Instant::now();
    if batched {
        // SAFETY: each pointer is a live block of this pool, named once, not used again.
        unsafe { pool.free_raw_batch(&victims, Advice::DontNeed) }.expect("valid batch");
    } else {
        for &p in &victims {
            // SAFETY: a live 4 KiB block we own and give up.
            let rc = unsafe { libc::madvise(p.as_ptr().cast(), 4096, libc::MADV_DONTNEED) };
            assert_eq!(rc, 0, "madvise");
            // SAFETY: as above.
            unsafe { pool.free_raw(p) }.expect("live block");
        }
    }
    let ns = t.elapsed().as_nanos() as f64;
    for p in live {
        // SAFETY: the remaining live blocks, freed once.
        unsafe { pool.free_raw(p) }.expect("live block");
    }
    ns
}

/// The kernel's floor: one `madvise(MADV_DONTNEED)` over `n` touched contiguous pages of a
/// fresh mapping, in nanoseconds.
fn floor_once(n: usize) -> f64 {
    let len = n * 4096;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: the mapping is ours and `len` bytes long.
    unsafe {
        libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        p.cast::<u8>().write_bytes(0xa5, len);
    }
    let t = Instant::now();
    // SAFETY: as above.
    unsafe { libc::madvise(p, len, libc::MADV_DONTNEED) };
    let ns = t.elapsed().as_nanos() as f64;
    // SAFETY: as above; nothing refers to it any more.
    unsafe { libc::munmap(p, len) };
    ns
}

/// `evict`: `free_raw_batch(.., DontNeed)` against `madvise(MADV_DONTNEED)` + `free_raw` per
/// block, at `--evict-sizes` blocks of 4 KiB, with and without a second thread churning.
pub fn cmd_evict(ctx: &mut Ctx, args: &Args) {
    let sizes = args.list::<usize>("evict-sizes", "64,512");
    let pool = std::sync::Arc::new(allocs::build_pool(
        ctx.capacity,
        PoolOpts {
            hinter: false,
            ..PoolOpts::default()
        },
    ));
    let mut rng = Rng::new(ctx.seed);
    let mut s = format!(
        "### Batched eviction: {} rounds (median, min-max), 4 KiB blocks touched before eviction\n\n\
         | blocks | layout | churn thread | per-block loop (µs) | free_raw_batch (µs) | speed-up | kernel floor (µs) |\n|---|---|---|---|---|---|---|\n",
        ctx.rounds
    );
    for churn in [false, true] {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churner = churn.then(|| {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(b) = pool.alloc(0) {
                        pool.free(b);
                    }
                }
            })
        });
        for &n in &sizes {
            for (layout, name) in [
                (Layout::InOrder, "in order"),
                (Layout::Scattered, "scattered"),
            ] {
                let (mut lp, mut bt, mut fl) = (Vec::new(), Vec::new(), Vec::new());
                // Several batches per round, so each round is a few milliseconds.
                let reps = (4096 / n).max(4);
                for r in 0..ctx.rounds {
                    let mut one = |batched: bool| {
                        let total: f64 = (0..reps)
                            .map(|_| evict_once(&pool, n, layout, batched, &mut rng))
                            .sum();
                        total / reps as f64 / 1e3
                    };
                    fl.push((0..reps).map(|_| floor_once(n)).sum::<f64>() / reps as f64 / 1e3);
                    if r % 2 == 0 {
                        lp.push(one(false));
                        bt.push(one(true));
                    } else {
                        bt.push(one(true));
                        lp.push(one(false));
                    }
                }
                let range = |xs: &[f64]| {
                    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = xs.iter().copied().fold(0.0, f64::max);
                    format!("{:.1} ({lo:.1}-{hi:.1})", median(xs))
                };
                s.push_str(&format!(
                    "| {n} | {name} | {} | {} | {} | **{:.1}x** | {:.1} |\n",
                    if churn { "yes" } else { "no" },
                    range(&lp),
                    range(&bt),
                    median(&lp) / median(&bt),
                    median(&fl)
                ));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = churner {
            t.join().expect("churn thread");
        }
    }
    let st = pool.stats();
    s.push_str(&format!(
        "\nKernel floor: one `madvise(MADV_DONTNEED)` over as many contiguous touched pages. System calls of the batched frees: {} for {} MiB advised.\n\n",
        st.hint.madvise_calls,
        st.hint.bytes_hinted_total >> 20
    ));
    ctx.say(&s);
}

/// `release`: allocate and touch `--release-mib` in order-0..=9 blocks, free them all, then
/// time `release_idle()` and compare `Rss - LazyFree` with the baseline before the burst.
pub fn cmd_release(ctx: &mut Ctx, args: &Args) {
    let burst = args.get::<usize>("release-mib", 1024) << 20;
    let mut s = format!(
        "### release_idle after a {} MiB burst (Rss - LazyFree, KiB; {} rounds, fresh pool each)\n\n\
         | round | baseline | after free | after release_idle | above baseline | release_idle took | given back |\n|---|---|---|---|---|---|---|\n",
        burst >> 20,
        ctx.rounds
    );
    let mut worst_ms: f64 = 0.0;
    let mut worst_above: f64 = 0.0;
    let mut worst_above_base: f64 = 0.0;
    // glibc raises its mmap threshold to the size of a mapped chunk it frees, so from the
    // second round on the harness's list of blocks would come from (and stay in) the brk
    // heap. A fixed threshold keeps the list its own mapping, unmapped when dropped.
    // SAFETY: mallopt only changes glibc's tuning; 128 KiB is its default threshold.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
    for round in 0..ctx.rounds {
        let pool = allocs::build_pool(
            (burst * 2).max(ctx.capacity),
            PoolOpts {
                hinter: false,
                ..PoolOpts::default()
            },
        );
        let base = mem::sample(Instant::now()).net_kb();
        let mut rng = Rng::new(ctx.seed + round as u64);
        // The list of blocks is the harness's, not the pool's: big enough to be its own
        // mapping, so that dropping it before the readings leaves nothing behind.
        let mut live = Vec::with_capacity(burst >> 12);
        let mut bytes = 0;
        while bytes < burst {
            let order = rng.below(10) as u8;
            let Ok(b) = pool.alloc(order) else { break };
            // SAFETY: a fresh block we own.
            unsafe { b.as_ptr().write_bytes(1, b.len()) };
            bytes += b.len();
            live.push(b);
        }
        for b in live.drain(..) {
            pool.free(b);
        }
        drop(live);
        let freed = mem::sample(Instant::now()).net_kb();
        let t = Instant::now();
        let report = pool.release_idle();
        let took = t.elapsed();
        let after = mem::sample(Instant::now()).net_kb();
        let above_kib = after.saturating_sub(base);
        let above = above_kib as f64 * 1024.0 / burst as f64 * 100.0;
        let above_base = above_kib as f64 / base.max(1) as f64 * 100.0;
        worst_ms = worst_ms.max(took.as_secs_f64() * 1e3);
        worst_above = worst_above.max(above);
        worst_above_base = worst_above_base.max(above_base);
        s.push_str(&format!(
            "| {round} | {base} | {freed} | {after} | {above_kib} KiB: {above_base:.2} % of the baseline, {above:.3} % of the burst | {:.1} ms | {} MiB in {} blocks |\n",
            took.as_secs_f64() * 1e3,
            report.bytes >> 20,
            report.blocks
        ));
        drop(pool);
        std::thread::sleep(Duration::from_millis(50));
    }
    s.push_str(&format!(
        "\nWorst round: release_idle took {worst_ms:.1} ms and left {worst_above_base:.2} % of the baseline ({worst_above:.3} % of the burst) above the baseline. The harness's list of blocks is dropped before the readings.\n\n"
    ));
    ctx.say(&s);
}
