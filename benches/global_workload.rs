//! The `global_alloc` example's workload (build and query an inverted index with rayon)
//! under `PoolAlloc` and under the system allocator, in one run.
//!
//! The global allocator is fixed per binary, so this binary re-executes itself: each
//! child process runs the workload once, with the pool enabled (and its hinter started)
//! or with `PoolAlloc::set_pool_enabled(false)`, which sends every request to `System`
//! from the start. The modes alternate, round by round, and the parent prints a markdown
//! table of medians.
//!
//! Run: `cargo bench --bench global_workload` (environment: `PAGEPOOL_BENCH_ROUNDS`,
//! default 5; `PAGEPOOL_BENCH_DOCS`, default 150000; `PAGEPOOL_BENCH_IDLE_SECS`, default 3).

#[path = "../examples/global_alloc.rs"]
#[allow(dead_code)]
mod example;

use std::process::Command;
use std::time::Duration;

const MODE_VAR: &str = "PAGEPOOL_BENCH_MODE";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of this process so far (all threads, the hinter included).
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// One child run.
fn child(mode: &str) {
    let docs = env_or("PAGEPOOL_BENCH_DOCS", 150_000usize);
    let idle = Duration::from_secs(env_or("PAGEPOOL_BENCH_IDLE_SECS", 3u64));
    match mode {
        "pool" => example::GLOBAL.start_hinter().expect("hinter"),
        // For experiments (`PAGEPOOL_BENCH_MODE=pool-nohint <bench binary>`): the pool
        // without its hinter thread.
        "pool-nohint" => {}
        "system" => example::GLOBAL.set_pool_enabled(false),
        other => panic!("unknown mode {other}"),
    }
    let r = example::run(docs, idle);
    let cpu = cpu_seconds();
    let stats = example::GLOBAL.stats();
    if mode == "system" {
        assert_eq!(stats.pool_allocs, 0, "system mode must not touch the pool");
    }
    println!(
        "RESULT {} {} {} {} {} {} {} {} {}",
        r.build.as_secs_f64(),
        r.query.as_secs_f64(),
        r.checksum,
        r.peak.held(),
        r.idle.rss,
        r.idle.lazy_free,
        r.idle.held(),
        stats.pool_allocs,
        cpu,
    );
}

#[derive(Default)]
struct Samples {
    build: Vec<f64>,
    query: Vec<f64>,
    total: Vec<f64>,
    cpu: Vec<f64>,
    peak_held: Vec<f64>,
    idle_rss: Vec<f64>,
    idle_lazy: Vec<f64>,
    idle_held: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    if let Ok(mode) = std::env::var(MODE_VAR) {
        return child(&mode);
    }
    let rounds = env_or("PAGEPOOL_BENCH_ROUNDS", 5usize);
    let exe = std::env::current_exe().expect("own path");
    let mut pool = Samples::default();
    let mut system = Samples::default();
    let mut checksum = None;
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            ["pool", "system"]
        } else {
            ["system", "pool"]
        };
        for mode in order {
            let out = Command::new(&exe)
                .env(MODE_VAR, mode)
                .output()
                .expect("run child");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{mode} child failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix("RESULT "))
                .expect("a RESULT line");
            let f: Vec<f64> = line
                .split(' ')
                .map(|x| x.parse().expect("number"))
                .collect();
            let sum = f[2] as u64;
            assert_eq!(
                *checksum.get_or_insert(sum),
                sum,
                "both allocators must compute the same answers"
            );
            let s = if mode == "pool" {
                &mut pool
            } else {
                &mut system
            };
            let mib = (1u64 << 20) as f64;
            s.build.push(f[0]);
            s.query.push(f[1]);
            s.total.push(f[0] + f[1]);
            s.cpu.push(f[8]);
            s.peak_held.push(f[3] / mib);
            s.idle_rss.push(f[4] / mib);
            s.idle_lazy.push(f[5] / mib);
            s.idle_held.push(f[6] / mib);
            eprintln!(
                "round {round} {mode:>6}: build {:.2} s, query {:.3} s, CPU {:.2} s, Rss - LazyFree after idle {:.1} MiB",
                f[0],
                f[1],
                f[8],
                f[6] / mib
            );
        }
    }
    println!();
    println!(
        "| allocator | build (s) | query (s) | build + query (s) | CPU user+sys (s) | Rss - LazyFree at peak (MiB) | Rss after idle (MiB) | LazyFree after idle (MiB) | Rss - LazyFree after idle (MiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, s) in [("PoolAlloc", &pool), ("System", &system)] {
        println!(
            "| {name} | {:.2} | {:.3} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |",
            median(&s.build),
            median(&s.query),
            median(&s.total),
            median(&s.cpu),
            median(&s.peak_held),
            median(&s.idle_rss),
            median(&s.idle_lazy),
            median(&s.idle_held)
        );
    }
    println!(
        "| PoolAlloc / System | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | | {:.3} |",
        median(&pool.build) / median(&system.build),
        median(&pool.query) / median(&system.query),
        median(&pool.total) / median(&system.total),
        median(&pool.cpu) / median(&system.cpu),
        median(&pool.peak_held) / median(&system.peak_held),
        median(&pool.idle_rss) / median(&system.idle_rss),
        median(&pool.idle_held) / median(&system.idle_held)
    );
    println!();
    println!(
        "medians of {rounds} rounds per allocator, modes alternating; checksum {}",
        checksum.unwrap_or(0)
    );
}
