//! Application benchmarks: each workload is a real use of third-party crates (or a classic
//! allocator stress shape), run once per process under the allocator its binary installs.
//!
//! The binaries `apps-system`, `apps-mimalloc`, `apps-jemalloc` and `apps-pagepool` differ
//! only in their `#[global_allocator]`; each calls [`main`], which runs one workload, frees
//! everything, waits, and prints one JSON line of measurements. The `runner` binary runs
//! every (workload, allocator) pair in interleaved rounds and writes the tables and plots.
//! See `README.md` beside this file.

pub mod measure;
pub mod rng;
pub mod svg;
pub mod workloads;

use std::any::Any;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// What a workload hands back: a checksum of its results (equal under every allocator)
/// and the data it still holds at the end of the work, freed only after the memory
/// reading that follows the work.
pub struct Output {
    /// Checksum of the results; the runner checks that every allocator got the same one.
    pub checksum: u64,
    /// Everything the workload built and still holds.
    pub keep: Box<dyn Any>,
}

impl Output {
    /// An output holding `keep` until the measurement after the work.
    pub fn new<T: 'static>(checksum: u64, keep: T) -> Self {
        Self {
            checksum,
            keep: Box::new(keep),
        }
    }
}

/// Settings of one workload run.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Multiplies the workload's size (1.0: about 0.5-3 s on a 2-core machine).
    pub scale: f64,
}

impl Params {
    /// `n` scaled, at least 1.
    pub fn n(&self, n: usize) -> usize {
        ((n as f64 * self.scale).round() as usize).max(1)
    }
}

/// One workload: its name, what it does in a line, and the function.
pub struct Workload {
    /// Name on the command line and in the tables.
    pub name: &'static str,
    /// One-line description.
    pub about: &'static str,
    /// Runs the work.
    pub run: fn(&Params) -> Output,
}

/// Every workload, in table order.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "json",
        about: "serde_json: build a Value document, serialise, parse back; typed serde round trip",
        run: workloads::json::run,
    },
    Workload {
        name: "regex",
        about: "regex: compile a few hundred patterns, search a generated corpus",
        run: workloads::regex::run,
    },
    Workload {
        name: "parser",
        about: "syn + prettyplease: parse and print a generated Rust source of a few MB",
        run: workloads::parser::run,
    },
    Workload {
        name: "collections",
        about: "HashMap / BTreeMap / BTreeSet: build, look up, remove string and integer keys",
        run: workloads::collections::run,
    },
    Workload {
        name: "rayon",
        about: "rayon: parallel sort of millions of Strings, par_iter map/collect",
        run: workloads::rayon::run,
    },
    Workload {
        name: "growth",
        about: "Vecs and Strings grown by push from tiny to beyond 32 MiB (realloc)",
        run: workloads::growth::run,
    },
    Workload {
        name: "prodcons",
        about: "producer/consumer threads: allocated on one thread, freed on another",
        run: workloads::prodcons::run,
    },
    Workload {
        name: "larson",
        about: "larson-style churn: random slot replacement, objects handed between threads",
        run: workloads::larson::run,
    },
    Workload {
        name: "threads",
        about: "16 threads allocating and freeing mixed small sizes at once",
        run: workloads::threads::run,
    },
];

/// Finds a workload by name.
pub fn workload(name: &str) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name == name)
}

const USAGE: &str = "\
usage: apps-<allocator> <workload> [--idle-ms N] [--scale F]

Runs one workload, frees everything, waits --idle-ms (default 3000), and prints one JSON
line of measurements. Workloads:";

fn usage() -> ! {
    eprintln!("{USAGE}");
    for w in WORKLOADS {
        eprintln!("  {:<12} {}", w.name, w.about);
    }
    std::process::exit(2)
}

/// The entry point of every allocator binary. `alloc` names the allocator in the output;
/// `extra` adds allocator-specific fields, read after the idle wait (it may allocate).
pub fn main(alloc: &str, extra: &dyn Fn() -> Vec<(&'static str, Value)>) {
    let mut args = std::env::args().skip(1);
    let mut name = None;
    let mut idle_ms = 3000u64;
    let mut scale = 1.0f64;
    while let Some(a) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| {
                    eprintln!("{flag} needs a number");
                    usage()
                })
        };
        match a.as_str() {
            "--idle-ms" => idle_ms = value("--idle-ms") as u64,
            "--scale" => scale = value("--scale"),
            "-h" | "--help" => usage(),
            _ if name.is_none() && !a.starts_with('-') => name = Some(a),
            _ => usage(),
        }
    }
    let Some(w) = name.as_deref().and_then(workload) else {
        usage()
    };
    let params = Params { scale };

    let base = measure::Memory::read();
    let machine0 = measure::MachineCpu::read();
    let cpu0 = measure::cpu_seconds();
    let flt0 = measure::minor_faults();
    let t0 = Instant::now();
    let out = (w.run)(&params);
    let wall = t0.elapsed();
    let cpu = measure::cpu_seconds() - cpu0;
    let machine1 = measure::MachineCpu::read();
    let flt = measure::minor_faults() - flt0;
    let work = measure::Memory::read();

    let t1 = Instant::now();
    let Output { checksum, keep } = out;
    drop(keep);
    let free = t1.elapsed();
    let freed = measure::Memory::read();
    std::thread::sleep(Duration::from_millis(idle_ms));
    let idle = measure::Memory::read();
    let hwm = measure::vm_hwm_kib();
    let cpu_total = measure::cpu_seconds();

    let mut line = Map::new();
    let mut put = |k: &str, v: Value| {
        line.insert(k.to_string(), v);
    };
    put("alloc", alloc.into());
    put("workload", w.name.into());
    put("checksum", format!("{checksum:016x}").into());
    put("scale", scale.into());
    put("idle_ms", idle_ms.into());
    put("wall_s", wall.as_secs_f64().into());
    put("cpu_s", cpu.into());
    put("cpu_total_s", cpu_total.into());
    put("free_s", free.as_secs_f64().into());
    // CPU time other processes used while the work ran, and time the virtual machine was
    // not running at all: both disturb `wall_s`. `/proc/stat` counts in ticks (10 ms).
    put(
        "foreign_cpu_s",
        (machine1.busy_s - machine0.busy_s - cpu).max(0.0).into(),
    );
    put("steal_s", (machine1.steal_s - machine0.steal_s).into());
    put("minflt", flt.into());
    put("peak_rss_kib", hwm.into());
    put("base_held_kib", base.held_kib().into());
    put("work_rss_kib", work.rss_kib.into());
    put("work_lazyfree_kib", work.lazy_free_kib.into());
    put("work_held_kib", work.held_kib().into());
    put("work_anon_huge_kib", work.anon_huge_kib.into());
    put("freed_held_kib", freed.held_kib().into());
    put("idle_rss_kib", idle.rss_kib.into());
    put("idle_lazyfree_kib", idle.lazy_free_kib.into());
    put("idle_held_kib", idle.held_kib().into());
    for (k, v) in extra() {
        put(k, v);
    }
    println!("{}", Value::Object(line));
}
