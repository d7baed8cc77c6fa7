//! `pagepool-bench`: pagepool against its peers, all in one process, interleaved rounds.
//!
//! Run `cargo run --release -p pagepool-bench -- help` for the subcommands and flags.
//! Every table reports medians over rounds (with the min-max range) and ratios
//! pagepool / peer; plots go to `--out` as SVG.

mod allocs;
mod capture;
mod embed;
mod mem;
mod svg;
mod work;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use pagepool::{AllocPolicy, HintMode};

use allocs::{ALL, Allocs, Job, Kind, PoolOpts};
use work::{Bulk, Cross, Random, Repeat, median};

const HELP: &str = "\
pagepool-bench <command> [--flag value]...

commands (default: all):
  all          every workload below, then the hinting and capture figures
  repeat       alloc+touch+free one block, orders --orders (0,4,9)
  bulk         workload 2: allocate --bulk-frac of the pool in one order, free in order / random
  random       workload 3: free a random live block, allocate a random order (mix), --fills 50,90
  cross        workload 4: producer allocates, consumer frees (orders 0 and 9)
  scaling      workload 5: repeat (orders 0, 9) and random 50% with 1..=--max-threads threads
               (or the thread counts of --threads, e.g. 1,2,16 to oversubscribe)
  memory       burst-free-idle and reuse cycles, one child process per allocator
  hint-return  Rss-LazyFree after burst-free-idle as a fraction of peak
  hint-refault minor faults of a reuse workload, PreferUnhinted vs Fifo (DONTNEED)
  hint-cost    throughput of a 2-thread alloc/free loop, hinter on vs off
  capture      order-9 alloc_wait under order-0 churn, capture on vs off
  evict        free_raw_batch(DontNeed) vs madvise + free_raw per block, --evict-sizes 64,512
  release      release_idle() after a --release-mib 1024 burst: time, Rss-LazyFree vs baseline

flags (defaults in brackets):
  --allocs LIST        allocators, comma-separated [all: pagepool, pagepool+cache, pagepool raw,
                       pagepool portable, PoolAlloc, system, mimalloc, jemalloc, lgalloc, buddy_sys, mmap]
  --rounds N           interleaved rounds per measurement [5]
  --capacity-mib N     pagepool / buddy heap size [512]
  --target-ms N        time per timed measurement; iterations are calibrated to it [150]
  --orders LIST        repeat orders [0,4,9]
  --bulk-frac F        bulk: fraction of the pool [0.5]     --bulk-orders LIST [0,9]
  --fills LIST         random: fill percentages [50,90]
  --max-threads N      scaling: up to N threads [available_parallelism]
  --pin 0|1            pin worker t to the t-th allowed CPU (scaling, random, repeat) [0]
  --pool-shards N      shards of the pagepool kinds [0: one per CPU]
  --pool-max-order N   largest order of the pagepool kinds [0: the crate's default]
  --out DIR            where results.md and the SVGs go [bench-out]
  --mem-mib N          memory: bytes per burst [512]       --idle-ms N [4000]
  --reuse-rounds N     memory reuse cycle bursts [4]        --gap-ms N [300]
  --work-mib N         hint-refault working set [64]        --refault-rounds N [8]
  --cost-ms N          hint-cost: duration per round [2000]
  --cap-mib N          capture: pool size [256]   --requests N [40]   --churners N [1]
  --batches LIST       capture: churn batch sizes [1024,2048,3072,4096]   --keep N [all]   --pause-ms N [5]
  --cap-rounds N       capture: rounds per mode and batch [3]
  --deadline-ms N      capture: deadline [50]     --fill F [0.9]
  --evict-sizes LIST   evict: blocks per batch [64,512]   --release-mib N  release: burst [1024]
  --seed N             seed [42]
";

/// Parsed command line.
struct Args {
    cmd: String,
    flags: HashMap<String, String>,
}

impl Args {
    fn parse() -> Self {
        let mut it = std::env::args().skip(1);
        let mut cmd = String::from("all");
        let mut flags = HashMap::new();
        let mut first = true;
        while let Some(a) = it.next() {
            if let Some(k) = a.strip_prefix("--") {
                let v = it
                    .next()
                    .unwrap_or_else(|| die(&format!("--{k} needs a value")));
                flags.insert(k.to_string(), v);
            } else if first {
                cmd = a;
            } else {
                die(&format!("unexpected argument {a}"));
            }
            first = false;
        }
        Self { cmd, flags }
    }
    fn get<T: std::str::FromStr>(&self, k: &str, default: T) -> T {
        match self.flags.get(k) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("bad value for --{k}: {v}"))),
            None => default,
        }
    }
    fn list<T: std::str::FromStr>(&self, k: &str, default: &str) -> Vec<T> {
        let s = self.flags.get(k).map_or(default, |s| s.as_str());
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| die(&format!("bad list for --{k}: {s}")))
            })
            .collect()
    }
    fn kinds(&self) -> Vec<Kind> {
        match self.flags.get("allocs") {
            None => ALL.to_vec(),
            Some(s) => s
                .split(',')
                .map(|n| Kind::parse(n).unwrap_or_else(|| die(&format!("unknown allocator {n}"))))
                .collect(),
        }
    }
}

fn die(msg: &str) -> ! {
    eprintln!("pagepool-bench: {msg}\n\n{HELP}");
    std::process::exit(2)
}

/// Shared settings of the in-process workloads.
struct Ctx {
    kinds: Vec<Kind>,
    rounds: usize,
    capacity: usize,
    target: Duration,
    seed: u64,
    out: std::path::PathBuf,
    md: String,
}

impl Ctx {
    fn say(&mut self, text: &str) {
        print!("{text}");
        self.md.push_str(text);
    }
}

/// Median and range of one cell.
#[derive(Clone, Copy)]
struct Cell {
    med: f64,
    min: f64,
    max: f64,
}

impl Cell {
    fn of(xs: &[f64]) -> Option<Cell> {
        if xs.is_empty() {
            return None;
        }
        Some(Cell {
            med: median(xs),
            min: xs.iter().copied().fold(f64::INFINITY, f64::min),
            max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A table of medians (rows x allocators) and one of ratios pagepool / peer.
fn tables(ctx: &mut Ctx, unit: &str, rows: &[(String, Vec<Option<Cell>>)], lower_is_better: bool) {
    let kinds = ctx.kinds.clone();
    let mut s = String::new();
    let _ = write!(s, "| {unit} |");
    for k in &kinds {
        let _ = write!(s, " {} |", k.name());
    }
    s.push('\n');
    s.push_str(&"|---".repeat(kinds.len() + 1));
    s.push_str("|\n");
    for (label, cells) in rows {
        let _ = write!(s, "| {label} |");
        for c in cells {
            match c {
                Some(c) => {
                    let _ = write!(
                        s,
                        " {} [{}–{}] |",
                        fmt_num(c.med),
                        fmt_num(c.min),
                        fmt_num(c.max)
                    );
                }
                None => s.push_str(" n/a |"),
            }
        }
        s.push('\n');
    }
    let ours: Vec<(usize, Kind)> = kinds
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, k)| k.is_pagepool())
        .collect();
    for (pi, ours) in ours {
        let _ = write!(
            s,
            "\nRatios {} / peer ({}):\n\n| {unit} |",
            ours.name(),
            if lower_is_better {
                "below 1: pagepool faster"
            } else {
                "above 1: pagepool better"
            }
        );
        let peers: Vec<(usize, Kind)> = kinds
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, k)| !k.is_pagepool())
            .collect();
        for (_, k) in &peers {
            let _ = write!(s, " {} |", k.name());
        }
        let _ = writeln!(s, " best peer | {} / best |", ours.name());
        s.push_str(&"|---".repeat(peers.len() + 3));
        s.push_str("|\n");
        for (label, cells) in rows {
            let _ = write!(s, "| {label} |");
            let pp = cells[pi].map(|c| c.med);
            let mut best: Option<(f64, Kind)> = None;
            for &(i, k) in &peers {
                match (pp, cells[i]) {
                    (Some(p), Some(c)) => {
                        let _ = write!(s, " {:.2} |", p / c.med);
                        let better = best.is_none_or(|(b, _)| {
                            if lower_is_better {
                                c.med < b
                            } else {
                                c.med > b
                            }
                        });
                        if better {
                            best = Some((c.med, k));
                        }
                    }
                    _ => s.push_str(" n/a |"),
                }
            }
            match (pp, best) {
                (Some(p), Some((b, k))) => {
                    let _ = write!(s, " {} ({}) | {:.2} |", k.name(), fmt_num(b), p / b);
                }
                _ => s.push_str(" n/a | n/a |"),
            }
            s.push('\n');
        }
    }
    s.push('\n');
    ctx.say(&s);
}

/// Runs `job(iters)` to find iterations that take about the target time.
fn calibrate(
    target: Duration,
    min: usize,
    max: usize,
    mut once: impl FnMut(usize) -> f64,
) -> usize {
    let probe = min.max(1);
    let ns = once(probe).max(0.5);
    ((target.as_nanos() as f64 / ns) as usize).clamp(probe, max)
}

/// Interleaved rounds: every round visits every allocator once (in a rotated order, so no
/// allocator always runs right after the same neighbour). `make(kind)` builds the job.
fn interleave<J: Job<Out = f64>>(
    ctx: &Ctx,
    allocs: &Allocs,
    applies: impl Fn(Kind) -> bool,
    mut make: impl FnMut(Kind) -> J,
) -> Vec<Option<Cell>> {
    let kinds: Vec<Kind> = ctx.kinds.clone();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..ctx.rounds {
        for j in 0..kinds.len() {
            let i = (j + round) % kinds.len();
            if !applies(kinds[i]) {
                continue;
            }
            let mut job = make(kinds[i]);
            samples[i].push(allocs.visit(kinds[i], &mut job));
        }
    }
    samples.iter().map(|s| Cell::of(s)).collect()
}

// --- workload 1 and 5: repeat ---------------------------------------------------------

fn repeat_iters(
    ctx: &Ctx,
    allocs: &Allocs,
    order: u8,
    threads: usize,
) -> HashMap<&'static str, usize> {
    let mut map = HashMap::new();
    for &k in &ctx.kinds {
        if !k.supports(order) {
            continue;
        }
        // Warm up (first touches, caches), then calibrate.
        allocs.visit(
            k,
            &mut Repeat {
                order,
                threads,
                iters: 200,
            },
        );
        let n = calibrate(ctx.target, 2000, 20_000_000, |n| {
            allocs.visit(
                k,
                &mut Repeat {
                    order,
                    threads,
                    iters: n,
                },
            ) * threads as f64
        });
        map.insert(k.name(), (n / threads).max(1000));
    }
    map
}

fn repeat_cells(ctx: &Ctx, allocs: &Allocs, order: u8, threads: usize) -> Vec<Option<Cell>> {
    let iters = repeat_iters(ctx, allocs, order, threads);
    interleave(
        ctx,
        allocs,
        |k| k.supports(order),
        |k| Repeat {
            order,
            threads,
            iters: iters[k.name()],
        },
    )
}

fn cmd_repeat(ctx: &mut Ctx, orders: &[u8]) {
    let allocs = Allocs::new(ctx.capacity, &ctx.kinds, PoolOpts::default());
    ctx.say("### Workload 1, repeat: ns per alloc+touch+free, 1 thread\n\n");
    let rows: Vec<(String, Vec<Option<Cell>>)> = orders
        .iter()
        .map(|&o| {
            (
                format!("order {o} ({} KiB)", 4u64 << o),
                repeat_cells(ctx, &allocs, o, 1),
            )
        })
        .collect();
    tables(ctx, "ns/op", &rows, true);
}

// --- workload 2: bulk ------------------------------------------------------------------

fn cmd_bulk(ctx: &mut Ctx, orders: &[u8], frac: f64) {
    let allocs = Allocs::new(ctx.capacity, &ctx.kinds, PoolOpts::default());
    let bytes = (ctx.capacity as f64 * frac) as usize;
    let mut rows = Vec::new();
    for &order in orders {
        for random in [false, true] {
            let kinds = ctx.kinds.clone();
            let mut a: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
            let mut f: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
            for round in 0..=ctx.rounds {
                for j in 0..kinds.len() {
                    let i = (j + round) % kinds.len();
                    if !kinds[i].supports(order) {
                        continue;
                    }
                    let mut job = Bulk {
                        order,
                        bytes,
                        random,
                        seed: ctx.seed + round as u64,
                    };
                    let (na, nf) = allocs.visit(kinds[i], &mut job);
                    if round > 0 {
                        // Round 0 is a warm-up: first touch of fresh memory for everyone.
                        a[i].push(na);
                        f[i].push(nf);
                    }
                }
            }
            let how = if random { "random" } else { "in order" };
            rows.push((
                format!("order {order}, alloc (run freeing {how})"),
                a.iter().map(|s| Cell::of(s)).collect(),
            ));
            rows.push((
                format!("order {order}, free {how}"),
                f.iter().map(|s| Cell::of(s)).collect(),
            ));
        }
    }
    ctx.say(&format!(
        "### Workload 2, bulk: {} MiB ({}% of the pool) in one order, ns per alloc (+touch) and per free, 1 thread; first round discarded\n\n",
        bytes >> 20,
        (frac * 100.0).round()
    ));
    tables(ctx, "ns/op", &rows, true);
}

// --- workload 3 and 5: random ------------------------------------------------------------

fn random_cells(
    ctx: &Ctx,
    allocs: &Allocs,
    fill: f64,
    threads: usize,
    failures: &mut Vec<u64>,
) -> Vec<Option<Cell>> {
    let live = (ctx.capacity as f64 * fill) as usize;
    let applies = |k: Kind| k != Kind::Lgalloc;
    let mut ops: HashMap<&'static str, usize> = HashMap::new();
    for &k in &ctx.kinds {
        if !applies(k) {
            continue;
        }
        let n = calibrate(ctx.target, 2000, 2_000_000, |n| {
            allocs
                .visit(
                    k,
                    &mut Random {
                        live_bytes: live,
                        threads,
                        ops: n,
                        seed: ctx.seed,
                    },
                )
                .ns_per_op
                * threads as f64
        });
        ops.insert(k.name(), (n / threads).max(2000));
    }
    let kinds = ctx.kinds.clone();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    *failures = vec![0; kinds.len()];
    for round in 0..ctx.rounds {
        for j in 0..kinds.len() {
            let i = (j + round) % kinds.len();
            if !applies(kinds[i]) {
                continue;
            }
            let mut job = Random {
                live_bytes: live,
                threads,
                ops: ops[kinds[i].name()],
                seed: ctx.seed + round as u64,
            };
            let out = allocs.visit(kinds[i], &mut job);
            samples[i].push(out.ns_per_op);
            failures[i] += out.failures;
        }
    }
    samples.iter().map(|s| Cell::of(s)).collect()
}

fn cmd_random(ctx: &mut Ctx, fills: &[u32], max_threads: usize) {
    let allocs = Allocs::new(ctx.capacity, &ctx.kinds, PoolOpts::default());
    let mut rows = Vec::new();
    let mut notes = String::new();
    for &fill in fills {
        for threads in [1, max_threads.min(2)] {
            let mut failures = Vec::new();
            let cells = random_cells(ctx, &allocs, fill as f64 / 100.0, threads, &mut failures);
            for (k, f) in ctx.kinds.iter().zip(&failures) {
                if *f > 0 {
                    let _ = writeln!(
                        notes,
                        "- {fill}% fill, {threads} thread(s): {} failed {f} allocations (out of memory)",
                        k.name()
                    );
                }
            }
            rows.push((
                format!(
                    "{fill}% fill ({} MiB live), {threads} thr",
                    (ctx.capacity as u64 * fill as u64 / 100) >> 20
                ),
                cells,
            ));
            if threads == max_threads.min(2) && threads == 1 {
                break;
            }
        }
    }
    let mix: Vec<String> = work::MIX
        .iter()
        .map(|(o, w)| format!("order {o}: {w}%"))
        .collect();
    ctx.say(&format!(
        "### Workload 3, random: ns per free+alloc(+touch), aggregate over threads (wall / ops)\n\nOrder mix: {} (mean {:.0} KiB). Live set filled first, only the steady state timed; each thread owns its share of the live set. lgalloc: n/a (no blocks under 2 MiB).\n\n",
        mix.join(", "),
        work::mix_mean_bytes() / 1024.0
    ));
    tables(ctx, "ns/op", &rows, true);
    if !notes.is_empty() {
        ctx.say(&format!(
            "Allocation failures during the timed rounds:\n\n{notes}\n"
        ));
    }
}

// --- workload 4: cross-thread -------------------------------------------------------------

fn cmd_cross(ctx: &mut Ctx) {
    let allocs = Allocs::new(ctx.capacity, &ctx.kinds, PoolOpts::default());
    let mut rows = Vec::new();
    for order in [0u8, 9] {
        // At most (2 queued + 2 in hand) batches are live: keep them well inside the pool.
        let batch = if order == 0 { 64 } else { 8 };
        let mut blocks: HashMap<&'static str, usize> = HashMap::new();
        for &k in &ctx.kinds {
            if !k.supports(order) {
                continue;
            }
            let n = calibrate(ctx.target, 256, 5_000_000, |n| {
                allocs.visit(
                    k,
                    &mut Cross {
                        order,
                        blocks: n,
                        batch,
                    },
                )
            });
            blocks.insert(k.name(), n);
        }
        let cells = interleave(
            ctx,
            &allocs,
            |k| k.supports(order),
            |k| Cross {
                order,
                blocks: blocks[k.name()],
                batch,
            },
        );
        rows.push((format!("order {order}"), cells));
    }
    ctx.say("### Workload 4, cross-thread: one thread allocates (+touch), another frees, batches (64 blocks of order 0, 8 of order 9) through a channel of 2 batches; ns per block (wall / blocks)\n\n");
    tables(ctx, "ns/block", &rows, true);
}

// --- workload 5: scaling -------------------------------------------------------------------

fn cmd_scaling(ctx: &mut Ctx, threads: Vec<usize>) {
    let allocs = Allocs::new(ctx.capacity, &ctx.kinds, PoolOpts::default());
    let mut rows = Vec::new();
    let mut plots: Vec<(String, Vec<svg::Series>)> = Vec::new();
    for (name, order) in [
        ("repeat order 0", Some(0u8)),
        ("repeat order 9", Some(9)),
        ("random 50%", None),
    ] {
        let mut per_kind: Vec<Vec<(f64, f64)>> = vec![Vec::new(); ctx.kinds.len()];
        let mut by_t: Vec<Vec<Option<Cell>>> = Vec::new();
        for &t in &threads {
            let cells = match order {
                Some(o) => repeat_cells(ctx, &allocs, o, t),
                None => random_cells(ctx, &allocs, 0.5, t, &mut Vec::new()),
            };
            // Throughput in million operations per second (aggregate).
            let thr: Vec<Option<Cell>> = cells
                .iter()
                .map(|c| {
                    c.map(|c| Cell {
                        med: 1e3 / c.med,
                        min: 1e3 / c.max,
                        max: 1e3 / c.min,
                    })
                })
                .collect();
            for (i, c) in thr.iter().enumerate() {
                if let Some(c) = c {
                    per_kind[i].push((t as f64, c.med));
                }
            }
            rows.push((format!("{name}, {t} thr"), thr.clone()));
            by_t.push(thr);
        }
        if threads.len() > 1 {
            let sp: Vec<Option<Cell>> = (0..ctx.kinds.len())
                .map(|i| match (by_t[0][i], by_t[by_t.len() - 1][i]) {
                    (Some(a), Some(b)) => Some(Cell {
                        med: b.med / a.med,
                        min: b.min / a.max,
                        max: b.max / a.min,
                    }),
                    _ => None,
                })
                .collect();
            rows.push((
                format!(
                    "{name}: speed-up {}→{} thr",
                    threads[0],
                    threads[threads.len() - 1]
                ),
                sp,
            ));
        }
        let series = ctx
            .kinds
            .iter()
            .zip(per_kind)
            .filter(|(_, p)| !p.is_empty())
            .map(|(k, p)| svg::Series {
                name: k.name().into(),
                points: p,
            })
            .collect();
        plots.push((name.to_string(), series));
    }
    let (first, last) = (threads[0], threads[threads.len() - 1]);
    ctx.say(&format!(
        "### Workload 5, scaling: throughput in million alloc+free per second (aggregate), threads {threads:?}; speed-up = throughput at {last} / at {first}\n\n"
    ));
    tables(ctx, "Mops/s", &rows, false);
    scaling_ceiling(ctx, &threads);
    for (name, series) in plots {
        let file = format!(
            "scaling-{}.svg",
            name.replace([' ', '%'], "-")
                .replace("--", "-")
                .trim_end_matches('-')
        );
        let body = svg::line_chart(
            &format!("Throughput vs threads: {name}"),
            "threads",
            "million alloc+free / s",
            &series,
        );
        write_out(ctx, &file, &body);
    }
}

/// The machine's own ceiling for the same thread counts ([`work::ceiling`]): a speed-up
/// no allocator can beat on this machine, printed beside the allocators' so that a ratio
/// below the thread count can be told apart from the machine's (shared cores, the
/// hypervisor, frequency).
fn scaling_ceiling(ctx: &mut Ctx, threads: &[usize]) {
    let iters = calibrate(ctx.target, 10_000, 1 << 31, |n| work::ceiling(1, n));
    let cells: Vec<Cell> = threads
        .iter()
        .map(|&t| {
            let xs: Vec<f64> = (0..ctx.rounds)
                .map(|_| 1e3 / work::ceiling(t, iters))
                .collect();
            Cell::of(&xs).expect("at least one round")
        })
        .collect();
    let first = threads[0];
    let mut text = format!(
        "Machine ceiling: the same threads{} running a loop that allocates nothing (a \
         dependent arithmetic chain about as long as a cached alloc+free, one byte written \
         per round), median [min-max] of {} rounds:\n\n| threads | million rounds/s | \
         speed-up vs {first} thr |\n|---|---|---|\n",
        if work::PIN.load(std::sync::atomic::Ordering::Relaxed) {
            " (pinned)"
        } else {
            ""
        },
        ctx.rounds
    );
    for (t, c) in threads.iter().zip(&cells) {
        let _ = writeln!(
            text,
            "| {t} | {} [{}–{}] | {} [{}–{}] |",
            fmt_num(c.med),
            fmt_num(c.min),
            fmt_num(c.max),
            fmt_num(c.med / cells[0].med),
            fmt_num(c.min / cells[0].max),
            fmt_num(c.max / cells[0].min),
        );
    }
    text.push('\n');
    ctx.say(&text);
}

fn write_out(ctx: &mut Ctx, file: &str, body: &str) {
    let _ = std::fs::create_dir_all(&ctx.out);
    let path = ctx.out.join(file);
    std::fs::write(&path, body).unwrap_or_else(|e| eprintln!("write {}: {e}", path.display()));
    ctx.say(&format!("![{file}]({file})\n\n"));
}

// --- memory (child processes) --------------------------------------------------

fn mem_args(args: &Args, kind: Kind, cycle: &str, extra: &[(&str, String)]) -> Vec<String> {
    let mut v = vec![
        "mem-child".to_string(),
        "--alloc".into(),
        kind.name().into(),
        "--cycle".into(),
        cycle.into(),
    ];
    for key in ["mem-mib", "idle-ms", "gap-ms", "reuse-rounds", "seed"] {
        if let Some(val) = args.flags.get(key) {
            v.push(format!("--{key}"));
            v.push(val.clone());
        }
    }
    for (k, val) in extra {
        v.push(format!("--{k}"));
        v.push(val.clone());
    }
    v
}

fn mem_cfg(args: &Args) -> mem::MemCfg {
    mem::MemCfg {
        bytes: args.get::<usize>("mem-mib", 512) << 20,
        idle: Duration::from_millis(args.get("idle-ms", 4000)),
        period: Duration::from_millis(100),
        rounds: args.get("reuse-rounds", 4),
        gap: Duration::from_millis(args.get("gap-ms", 300)),
        only_order: args.flags.get("only-order").map(|v| v.parse().unwrap_or(9)),
        pool: PoolOpts {
            mode: if args.get::<String>("hint-mode", "free".into()) == "dontneed" {
                HintMode::DontNeed
            } else {
                HintMode::Free
            },
            policy: if args.get::<String>("policy", "prefer".into()) == "fifo" {
                AllocPolicy::Fifo
            } else {
                AllocPolicy::PreferUnhinted
            },
            ..PoolOpts::default()
        },
        seed: args.get("seed", 42),
    }
}

fn cmd_memory(ctx: &mut Ctx, args: &Args) {
    let cfg = mem_cfg(args);
    let mut rows_burst = Vec::new();
    let mut series = Vec::new();
    let mut outs: Vec<(Kind, mem::ChildOut, mem::ChildOut)> = Vec::new();
    for &k in &ctx.kinds {
        let extra: Vec<(&str, String)> = if k == Kind::Lgalloc {
            vec![("only-order", "9".into())]
        } else {
            Vec::new()
        };
        let burst = mem::run_child(&mem_args(args, k, "burst", &extra));
        let mut reuse_extra = extra.clone();
        reuse_extra.push(("idle-ms", "1000".into()));
        let reuse = mem::run_child(&mem_args(args, k, "reuse", &reuse_extra));
        let base = burst.get("base_kb");
        series.push(svg::Series {
            name: k.name().into(),
            points: burst
                .samples
                .iter()
                .map(|s| {
                    (
                        s.0 / 1e3,
                        s.1.saturating_sub(s.2) as f64 / 1024.0 - base / 1024.0,
                    )
                })
                .collect(),
        });
        outs.push((k, burst, reuse));
    }
    let mib = |kb: f64| kb / 1024.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Workload 6, memory: one child process per allocator; {} MiB burst (mixed orders; lgalloc: 2 MiB blocks only), every page written; `Rss - LazyFree` above the child's own baseline\n",
        cfg.bytes >> 20
    );
    let _ = writeln!(
        s,
        "| allocator | burst peak MiB | idle after {:.1} s MiB | idle / peak | faults first burst | reuse: peak MiB | reuse: idle after 1 s MiB | reuse: faults in bursts 2..{} |",
        cfg.idle.as_secs_f64(),
        cfg.rounds
    );
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for (k, b, r) in &outs {
        let base = b.get("base_kb");
        let rb = r.get("base_kb");
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.3} | {} | {:.1} | {:.1} | {} |",
            k.name(),
            mib(b.get("peak_kb") - base),
            mib(b.get("idle_kb") - base),
            (b.get("idle_kb") - base) / (b.get("peak_kb") - base),
            b.get("flt_first"),
            mib(r.get("peak_kb") - rb),
            mib(r.get("idle_kb") - rb),
            r.get("flt_reuse"),
        );
        rows_burst.push(k);
    }
    s.push('\n');
    ctx.say(&s);
    let body = svg::line_chart(
        &format!(
            "Burst-free-idle: Rss - LazyFree over time ({} MiB burst)",
            cfg.bytes >> 20
        ),
        "seconds",
        "MiB above baseline",
        &series,
    );
    write_out(ctx, "memory-burst.svg", &body);
}

// --- hinting ---------------------------------------------------------------------

fn cmd_hint_return(ctx: &mut Ctx, args: &Args) {
    let hint_delay_s = 1.0; // PoolBuilder::new()'s documented default hint_delay (1 s)
    let mut s = String::from(
        "### Hinting, memory returned: pagepool, burst of mixed orders (every page written), free all, idle; default hinter settings\n\n",
    );
    s.push_str("| mode | peak MiB | at delay+2 s after the last free, MiB | fraction of peak | at end of idle, MiB | fraction |\n|---|---|---|---|---|---|\n");
    let mut series = Vec::new();
    for mode in ["free", "dontneed"] {
        let out = mem::run_child(&mem_args(
            args,
            Kind::Pagepool,
            "burst",
            &[("hint-mode", mode.into())],
        ));
        let base = out.get("base_kb");
        let peak = out.get("peak_kb") - base;
        let t_free = out.get("free_ms");
        let at = t_free + (hint_delay_s + 2.0) * 1e3;
        let at_kb = out
            .samples
            .iter()
            .filter(|x| x.0 >= at)
            .map(|x| x.1.saturating_sub(x.2) as f64 - base)
            .next()
            .unwrap_or(f64::NAN);
        let end = out.get("idle_kb") - base;
        let _ = writeln!(
            s,
            "| MADV_{} | {:.1} | {:.1} | {:.3} | {:.1} | {:.3} |",
            mode.to_uppercase(),
            peak / 1024.0,
            at_kb / 1024.0,
            at_kb / peak,
            end / 1024.0,
            end / peak
        );
        series.push(svg::Series {
            name: format!("MADV_{}", mode.to_uppercase()),
            points: out
                .samples
                .iter()
                .map(|x| {
                    (
                        (x.0 - t_free) / 1e3,
                        (x.1.saturating_sub(x.2) as f64 - base) / 1024.0,
                    )
                })
                .collect(),
        });
        series.push(svg::Series {
            name: format!("Rss only, {}", mode),
            points: out
                .samples
                .iter()
                .map(|x| ((x.0 - t_free) / 1e3, (x.1 as f64 - base) / 1024.0))
                .collect(),
        });
    }
    s.push('\n');
    ctx.say(&s);
    // Negative x: before the free; keep only t >= -1 s for readability.
    for ser in &mut series {
        ser.points.retain(|p| p.0 >= -0.5);
    }
    let body = svg::line_chart(
        "pagepool: memory after the last free (t = 0)",
        "seconds after the free",
        "MiB above baseline",
        &series,
    );
    write_out(ctx, "hint-return.svg", &body);
}

fn cmd_hint_refault(ctx: &mut Ctx, args: &Args) {
    let rounds = args.get("rounds", 3usize);
    let work = args.get::<usize>("work-mib", 64);
    let mut faults: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut pages = 0.0;
    for _ in 0..rounds {
        for (i, pol) in ["prefer", "fifo"].iter().enumerate() {
            let mut a = vec![
                "refault-child".to_string(),
                "--policy".into(),
                pol.to_string(),
            ];
            for key in ["mem-mib", "work-mib", "refault-rounds", "seed"] {
                if let Some(v) = args.flags.get(key) {
                    a.push(format!("--{key}"));
                    a.push(v.clone());
                }
            }
            let out = mem::run_child(&a);
            faults[i].push(out.get("faults"));
            pages = out.get("touched_pages");
        }
    }
    let (p, f) = (median(&faults[0]), median(&faults[1]));
    ctx.say(&format!(
        "### Hinting, refaults: HintMode::DontNeed, a {} MiB burst of 2 MiB blocks freed and hinted (`hint_now`), then {} rounds of a {work} MiB mixed-order working set (every page written, then freed); minor faults of the working rounds, median of {rounds} child processes each\n\n| policy | minor faults (median) | all runs | pages written |\n|---|---|---|---|\n| PreferUnhinted | {p:.0} | {:?} | {pages:.0} |\n| Fifo | {f:.0} | {:?} | {pages:.0} |\n\nPreferUnhinted / Fifo = **{:.3}**\n\n",
        args.get::<usize>("mem-mib", 512),
        args.get::<usize>("refault-rounds", 8),
        faults[0],
        faults[1],
        p / f
    ));
}

/// A timed 2-thread random loop on one pool for `dur`; returns million ops per second.
fn loop_throughput(
    pool: &allocs::Pool,
    threads: usize,
    live: usize,
    dur: Duration,
    seed: u64,
) -> f64 {
    // Random with enough ops to last about `dur`: measure 20k ops first to size it.
    let mut job = Random {
        live_bytes: live,
        threads,
        ops: 20_000,
        seed,
    };
    let probe = job.run(pool, Kind::Pagepool).ns_per_op * threads as f64;
    let ops = ((dur.as_nanos() as f64 / probe) as usize).max(20_000);
    let mut job = Random {
        live_bytes: live,
        threads,
        ops,
        seed: seed + 1,
    };
    1e3 / job.run(pool, Kind::Pagepool).ns_per_op
}

fn cmd_hint_cost(ctx: &mut Ctx, args: &Args) {
    let threads = args.get("max-threads", nproc());
    let dur = Duration::from_millis(args.get("cost-ms", 2000));
    let rounds = ctx.rounds;
    let on = allocs::Pool(allocs::build_pool(
        ctx.capacity,
        PoolOpts {
            hinter: true,
            ..PoolOpts::default()
        },
    ));
    let off = allocs::Pool(allocs::build_pool(
        ctx.capacity,
        PoolOpts {
            hinter: false,
            ..PoolOpts::default()
        },
    ));
    let live = ctx.capacity / 2;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let seed = ctx.seed + r as u64;
        if r % 2 == 0 {
            a.push(loop_throughput(&on, threads, live, dur, seed));
            b.push(loop_throughput(&off, threads, live, dur, seed));
        } else {
            b.push(loop_throughput(&off, threads, live, dur, seed));
            a.push(loop_throughput(&on, threads, live, dur, seed));
        }
    }
    let st = on.0.stats();
    let (ma, mb) = (median(&a), median(&b));
    ctx.say(&format!(
        "### Hinting, cost of the hinter thread: {threads}-thread random loop (mix, 50% of a {} MiB pool live), {} ms per round, {rounds} interleaved rounds\n\n| hinter | Mops/s median | rounds |\n|---|---|---|\n| on | {ma:.3} | {a:.3?} |\n| off | {mb:.3} | {b:.3?} |\n\nCost = 1 - on/off = **{:.2} %**. Hinter work during the on rounds: {} passes, {} madvise calls, {} MiB hinted in total.\n\n",
        ctx.capacity >> 20,
        dur.as_millis(),
        (1.0 - ma / mb) * 100.0,
        st.hint.passes,
        st.hint.madvise_calls,
        st.hint.bytes_hinted_total >> 20
    ));
}

// --- capture -----------------------------------------------------------------------

fn cmd_capture(ctx: &mut Ctx, args: &Args) {
    let base = capture::CaptureCfg {
        capacity: args.get::<usize>("cap-mib", 256) << 20,
        fill: args.get("fill", 0.9),
        churners: args.get("churners", 1),
        batch: 0,
        order: 9,
        deadline: Duration::from_millis(args.get("deadline-ms", 50)),
        keep: args.get("keep", usize::MAX),
        pause: Duration::from_millis(args.get("pause-ms", 5)),
        requests: args.get("requests", 40),
    };
    let rounds = args.get("cap-rounds", 3usize);
    let batches = args.list::<usize>("batches", "1024,2048,3072,4096");
    let modes = [
        capture::Mode::On,
        capture::Mode::OnNoReserve,
        capture::Mode::OffOnce,
        capture::Mode::OffPoll,
    ];
    let mut s = format!(
        "### Capture: {} MiB pool, {:.0}% held in order-0 blocks (allocated in address order; the rest whole free chunks), {} churn thread(s) each freeing its `batch` oldest blocks, then allocating as many (retrying later when the pool is empty); the foreground asks for order 9 with a {} ms deadline, keeps {} blocks, pauses {} ms between requests; {} requests x {rounds} rounds per mode and batch, modes interleaved, a fresh pool per run. The first ~{} requests take the initially free chunks (\"at once\").\n\n",
        base.capacity >> 20,
        base.fill * 100.0,
        base.churners,
        base.deadline.as_millis(),
        if base.keep == usize::MAX {
            "all its".to_string()
        } else {
            format!("up to {}", base.keep)
        },
        base.pause.as_millis(),
        base.requests,
        ((1.0 - base.fill) * base.capacity as f64 / (2u64 << 20) as f64) as u64,
    );
    s.push_str("| batch | mode | success | per-round % | at once | success among waits | p50 µs | p99 µs | p50 / p99 of successes µs | captures | churn allocs | churn failures |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for &batch in &batches {
        let cfg = capture::CaptureCfg { batch, ..base };
        let mut outs: Vec<capture::CaptureOut> = vec![Default::default(); modes.len()];
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for r in 0..rounds {
            for j in 0..modes.len() {
                let i = (j + r) % modes.len();
                let o = capture::run(&cfg, modes[i]);
                rates[i].push(o.ok as f64 / o.total as f64 * 100.0);
                let acc = &mut outs[i];
                acc.lat_us.extend(o.lat_us);
                acc.ok_lat_us.extend(o.ok_lat_us);
                acc.ok += o.ok;
                acc.total += o.total;
                acc.churn_allocs += o.churn_allocs;
                acc.churn_failures += o.churn_failures;
                acc.captures += o.captures;
                acc.immediate += o.immediate;
            }
        }
        for (i, (m, o)) in modes.iter().zip(&outs).enumerate() {
            let waited = o.total - o.immediate;
            let _ = writeln!(
                s,
                "| {batch} | {} | {}/{} ({:.1} %) | {:.0?} | {} | {}/{} ({:.1} %) | {:.0} | {:.0} | {:.0} / {:.0} | {} | {} | {} |",
                m.label(),
                o.ok,
                o.total,
                o.ok as f64 / o.total as f64 * 100.0,
                rates[i],
                o.immediate,
                o.ok - o.immediate,
                waited,
                (o.ok - o.immediate) as f64 / waited.max(1) as f64 * 100.0,
                work::percentile(&o.lat_us, 50.0),
                work::percentile(&o.lat_us, 99.0),
                work::percentile(&o.ok_lat_us, 50.0),
                work::percentile(&o.ok_lat_us, 99.0),
                o.captures,
                o.churn_allocs,
                o.churn_failures
            );
        }
    }
    s.push('\n');
    ctx.say(&s);
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() {
    let args = Args::parse();
    match args.cmd.as_str() {
        "help" | "-h" => {
            print!("{HELP}");
            return;
        }
        "mem-child" => {
            let kind = Kind::parse(&args.get::<String>("alloc", "pagepool".into()))
                .unwrap_or_else(|| die("bad --alloc"));
            let reuse = args.get::<String>("cycle", "burst".into()) == "reuse";
            mem::child_main(kind, mem_cfg(&args), reuse);
            return;
        }
        "refault-child" => {
            let cfg = mem::MemCfg {
                rounds: args.get("refault-rounds", 8),
                ..mem_cfg(&args)
            };
            let policy = if args.get::<String>("policy", "prefer".into()) == "fifo" {
                AllocPolicy::Fifo
            } else {
                AllocPolicy::PreferUnhinted
            };
            mem::refault_child(cfg, args.get::<usize>("work-mib", 64) << 20, policy);
            return;
        }
        _ => {}
    }
    let mut ctx = Ctx {
        kinds: args.kinds(),
        rounds: args.get("rounds", 5),
        capacity: args.get::<usize>("capacity-mib", 512) << 20,
        target: Duration::from_millis(args.get("target-ms", 150)),
        seed: args.get("seed", 42),
        out: args.get::<String>("out", "bench-out".into()).into(),
        md: String::new(),
    };
    let max_threads = args.get("max-threads", nproc());
    work::PIN.store(
        args.get("pin", 0u8) == 1,
        std::sync::atomic::Ordering::Relaxed,
    );
    allocs::POOL_SHARDS.store(
        args.get("pool-shards", 0usize),
        std::sync::atomic::Ordering::Relaxed,
    );
    allocs::POOL_MAX_ORDER.store(
        args.get("pool-max-order", 0u8),
        std::sync::atomic::Ordering::Relaxed,
    );
    let started = Instant::now();
    let cmdline: Vec<String> = std::env::args().collect();
    ctx.say(&format!("<!-- {} -->\n\n", cmdline.join(" ")));
    let all = args.cmd == "all";
    let known = [
        "all",
        "repeat",
        "bulk",
        "random",
        "cross",
        "scaling",
        "memory",
        "hint-return",
        "hint-refault",
        "hint-cost",
        "capture",
        "evict",
        "release",
    ];
    if !known.contains(&args.cmd.as_str()) {
        die(&format!("unknown command {}", args.cmd));
    }
    let run = |name: &str| all || args.cmd == name;
    if run("repeat") {
        cmd_repeat(&mut ctx, &args.list::<u8>("orders", "0,4,9"));
    }
    if run("bulk") {
        cmd_bulk(
            &mut ctx,
            &args.list::<u8>("bulk-orders", "0,9"),
            args.get("bulk-frac", 0.5),
        );
    }
    if run("random") {
        cmd_random(&mut ctx, &args.list::<u32>("fills", "50,90"), max_threads);
    }
    if run("cross") {
        cmd_cross(&mut ctx);
    }
    if run("scaling") {
        let all: Vec<String> = (1..=max_threads).map(|t| t.to_string()).collect();
        cmd_scaling(&mut ctx, args.list::<usize>("threads", &all.join(",")));
    }
    if run("memory") {
        cmd_memory(&mut ctx, &args);
    }
    if run("hint-return") {
        cmd_hint_return(&mut ctx, &args);
    }
    if run("hint-refault") {
        cmd_hint_refault(&mut ctx, &args);
    }
    if run("hint-cost") {
        cmd_hint_cost(&mut ctx, &args);
    }
    if run("capture") {
        cmd_capture(&mut ctx, &args);
    }
    if run("evict") {
        embed::cmd_evict(&mut ctx, &args);
    }
    if run("release") {
        embed::cmd_release(&mut ctx, &args);
    }
    ctx.say(&format!(
        "_{} finished in {:.0} s._\n",
        args.cmd,
        started.elapsed().as_secs_f64()
    ));
    let _ = std::fs::create_dir_all(&ctx.out);
    let _ = std::fs::write(ctx.out.join(format!("results-{}.md", args.cmd)), &ctx.md);
}
