//! Memory figures: `Rss - LazyFree` from `/proc/self/smaps_rollup`, minor faults from
//! `getrusage`, and the child processes of the memory and hinting benchmarks.

use std::time::{Duration, Instant};

use pagepool::{AllocPolicy, HintMode};

use crate::allocs::{
    Allocs, Job, Kind, LocalAlloc, PageAlloc, PoolOpts, size_of_order, touch_pages,
};
use crate::work::{Rng, mixed_order};

/// One reading of the process's memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Milliseconds since the child started its cycle.
    pub t_ms: f64,
    /// `Rss` in KiB.
    pub rss_kb: u64,
    /// `LazyFree` in KiB.
    pub lazy_kb: u64,
    /// Minor faults so far (`ru_minflt`).
    pub minflt: u64,
}

impl Sample {
    /// `Rss - LazyFree` in KiB.
    pub fn net_kb(&self) -> u64 {
        self.rss_kb.saturating_sub(self.lazy_kb)
    }
}

/// Reads `Rss` and `LazyFree` (KiB) from `/proc/self/smaps_rollup`.
pub fn smaps_rollup() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("LazyFree:"))
}

/// Minor faults of this process so far.
pub fn minflt() -> u64 {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_minflt as u64
}

/// A sample now, relative to `start`.
pub fn sample(start: Instant) -> Sample {
    let (rss_kb, lazy_kb) = smaps_rollup();
    Sample {
        t_ms: start.elapsed().as_secs_f64() * 1e3,
        rss_kb,
        lazy_kb,
        minflt: minflt(),
    }
}

/// Settings of one memory child.
#[derive(Debug, Clone, Copy)]
pub struct MemCfg {
    /// Bytes per burst.
    pub bytes: usize,
    /// Idle time after the last free, sampled.
    pub idle: Duration,
    /// Sampling period.
    pub period: Duration,
    /// Reuse cycle: bursts.
    pub rounds: usize,
    /// Reuse cycle: pause between bursts.
    pub gap: Duration,
    /// Only blocks of this order (for allocators that cannot do the mix), else [`crate::work::MIX`].
    pub only_order: Option<u8>,
    /// pagepool settings.
    pub pool: PoolOpts,
    /// Seed.
    pub seed: u64,
}

/// The burst-free-idle cycle or the reuse cycle, printing one `S` line per sample and a
/// final `R` line (see [`parse_child`]).
pub struct MemCycle {
    /// Settings.
    pub cfg: MemCfg,
    /// Reuse cycle instead of burst-free-idle.
    pub reuse: bool,
}

fn burst<A: PageAlloc>(
    l: &mut impl LocalAlloc<Handle = A::Handle>,
    cfg: &MemCfg,
    rng: &mut Rng,
) -> Vec<(A::Handle, u8)> {
    let mut live = 0;
    let mut blocks = Vec::new();
    while live < cfg.bytes {
        let order = cfg.only_order.unwrap_or_else(|| mixed_order(rng));
        let h = l.alloc(order).expect("memory burst: out of memory");
        touch_pages(A::ptr(&h), order);
        live += size_of_order(order);
        blocks.push((h, order));
    }
    blocks
}

fn free_all<L: LocalAlloc>(l: &mut L, blocks: Vec<(L::Handle, u8)>) {
    for (h, order) in blocks {
        // SAFETY: allocated through `l` with this order, freed once.
        unsafe { l.free(h, order) };
    }
}

fn emit(s: &Sample, phase: &str) {
    println!(
        "S {:.1} {} {} {} {}",
        s.t_ms, s.rss_kb, s.lazy_kb, s.minflt, phase
    );
}

impl Job for MemCycle {
    type Out = ();
    fn run<A: PageAlloc>(&mut self, a: &A, _: Kind) {
        let cfg = self.cfg;
        let mut rng = Rng::new(cfg.seed);
        let start = Instant::now();
        let base = sample(start);
        emit(&base, "base");
        let mut peak = base;
        let mut t_free_ms = 0.0;
        let rounds = if self.reuse { cfg.rounds.max(1) } else { 1 };
        let mut flt_first = 0;
        let mut l = a.local();
        for round in 0..rounds {
            let f0 = minflt();
            let blocks = burst::<A>(&mut l, &cfg, &mut rng);
            let s = sample(start);
            emit(&s, "peak");
            if s.net_kb() > peak.net_kb() {
                peak = s;
            }
            if round == 0 {
                flt_first = minflt() - f0;
            }
            free_all(&mut l, blocks);
            t_free_ms = start.elapsed().as_secs_f64() * 1e3;
            emit(&sample(start), "freed");
            if round + 1 < rounds {
                std::thread::sleep(cfg.gap);
            }
        }
        let flt_reuse_total = minflt() - base.minflt - flt_first;
        let idle_start = Instant::now();
        let mut last = sample(start);
        while idle_start.elapsed() < cfg.idle {
            std::thread::sleep(cfg.period);
            last = sample(start);
            emit(&last, "idle");
        }
        println!(
            "R base_kb={} peak_kb={} idle_kb={} free_ms={:.1} flt_first={} flt_reuse={} flt_total={}",
            base.net_kb(),
            peak.net_kb(),
            last.net_kb(),
            t_free_ms,
            flt_first,
            flt_reuse_total,
            last.minflt - base.minflt
        );
    }
}

/// What a memory child reported.
#[derive(Debug, Clone, Default)]
pub struct ChildOut {
    /// Samples: (ms, Rss KiB, LazyFree KiB, minflt, phase).
    pub samples: Vec<(f64, u64, u64, u64, String)>,
    /// `key=value` pairs of the `R` line.
    pub result: Vec<(String, f64)>,
}

impl ChildOut {
    /// A value of the `R` line.
    pub fn get(&self, key: &str) -> f64 {
        self.result
            .iter()
            .find(|(k, _)| k == key)
            .map_or(f64::NAN, |(_, v)| *v)
    }
}

/// Parses a child's stdout.
pub fn parse_child(out: &str) -> ChildOut {
    let mut res = ChildOut::default();
    for line in out.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("S") => {
                let v: Vec<&str> = it.collect();
                if v.len() == 5 {
                    res.samples.push((
                        v[0].parse().unwrap_or(0.0),
                        v[1].parse().unwrap_or(0),
                        v[2].parse().unwrap_or(0),
                        v[3].parse().unwrap_or(0),
                        v[4].to_string(),
                    ));
                }
            }
            Some("R") => {
                for kv in it {
                    if let Some((k, v)) = kv.split_once('=') {
                        res.result
                            .push((k.to_string(), v.parse().unwrap_or(f64::NAN)));
                    }
                }
            }
            _ => {}
        }
    }
    res
}

/// Runs this binary again with `args` and parses what it prints.
pub fn run_child(args: &[String]) -> ChildOut {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .args(args)
        .output()
        .expect("spawn child");
    if !out.status.success() {
        eprintln!(
            "child {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_child(&String::from_utf8_lossy(&out.stdout))
}

/// Child entry point: one allocator, one cycle.
pub fn child_main(kind: Kind, cfg: MemCfg, reuse: bool) {
    let capacity = (cfg.bytes * 2).next_multiple_of(4 << 20);
    let allocs = Allocs::new(capacity, &[kind], cfg.pool);
    allocs.visit(kind, &mut MemCycle { cfg, reuse });
}

/// Refaults of a reuse workload. A burst of `cfg.bytes` in 2 MiB blocks is
/// freed and hinted (`hint_now`, DONTNEED mode, hinter thread off so nothing else hints);
/// then `rounds` times a working set of `work_bytes` in the mixed orders is allocated,
/// every page written, and freed. Prints the minor faults of the working rounds.
pub fn refault_child(cfg: MemCfg, work_bytes: usize, policy: AllocPolicy) {
    let capacity = (cfg.bytes * 2).next_multiple_of(4 << 20);
    let pool = crate::allocs::build_pool(
        capacity,
        PoolOpts {
            hinter: false,
            mode: HintMode::DontNeed,
            policy,
            ..PoolOpts::default()
        },
    );
    let a = crate::allocs::Pool(pool);
    let mut rng = Rng::new(cfg.seed);
    let mut l = a.local();
    let big = burst::<crate::allocs::Pool>(
        &mut l,
        &MemCfg {
            only_order: Some(9),
            ..cfg
        },
        &mut rng,
    );
    free_all(&mut l, big);
    a.0.drain_caches();
    let report = a.0.hint_now();
    let f0 = minflt();
    let t0 = Instant::now();
    let work = MemCfg {
        bytes: work_bytes,
        only_order: None,
        ..cfg
    };
    for _ in 0..cfg.rounds {
        let blocks = burst::<crate::allocs::Pool>(&mut l, &work, &mut rng);
        free_all(&mut l, blocks);
    }
    let faults = minflt() - f0;
    let pages = (work_bytes / 4096 * cfg.rounds) as u64;
    println!(
        "R faults={faults} touched_pages={pages} hinted_mib={} ms={:.1} hinted_after_kb={}",
        report.bytes >> 20,
        t0.elapsed().as_secs_f64() * 1e3,
        a.0.stats().zero_bytes >> 10
    );
}
