//! Runs every (workload, allocator) pair as its own process, in interleaved rounds, checks
//! that all allocators computed the same results, and writes `apps.md`, `apps.json` and
//! the SVG plots. `runner --help` lists the options.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pagepool_apps::WORKLOADS;
use pagepool_apps::measure::MachineCpu;
use pagepool_apps::svg::{Bars, bar_chart};
use serde_json::{Map, Value, json};

const HELP: &str = "\
runner [options]

Runs each workload under each allocator as its own process (binaries apps-<allocator>
next to this one), R rounds, interleaved: in every round each workload runs once per
allocator, the allocators' order rotating from round to round and workload to workload.

options (defaults in brackets):
  --rounds N          rounds [5]
  --workloads LIST    comma-separated workloads [all]
  --allocators LIST   comma-separated allocators [system,mimalloc,jemalloc,pagepool];
                      also mimalloc-nothp (MIMALLOC_ALLOW_THP=0), jemalloc-bg
                      (_RJEM_MALLOC_CONF=background_thread:true) and pagepool-off
                      (PoolAlloc sending every request to the system allocator)
  --idle-ms N         idle wait after freeing, before the last memory reading [3000]
  --scale F           workload size factor [1.0]
  --timeout-s N       a run taking longer is killed and counted as failed [300]
  --max-foreign F     a run is disturbed when other processes used more than F of one
                      CPU on average while it worked (from /proc/stat) [0.1]
  --retries N         a disturbed run is repeated up to N times; the last try is kept [3]
  --quiet-wait-s N    before each run, wait up to N s for other processes to use less
                      than --max-foreign of one CPU [60]
  --out DIR           where apps.md, apps.json and the SVGs go [benches/results]
  --bin-dir DIR       where the apps-<allocator> binaries are [this binary's folder]
  --from-json FILE    run nothing: write apps.md and the plots again from an apps.json
";

/// The allocator the tables judge and the baseline; every other allocator of a run is a
/// peer, except variants of the judged one (`pagepool-off`).
const TARGET: &str = "pagepool";
const BASELINE: &str = "system";

fn peers(o: &Opts) -> Vec<&str> {
    o.allocators
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with(TARGET) && *a != BASELINE)
        .collect()
}

struct Opts {
    rounds: usize,
    workloads: Vec<String>,
    allocators: Vec<String>,
    idle_ms: u64,
    scale: f64,
    timeout: Duration,
    max_foreign: f64,
    retries: usize,
    quiet_wait: Duration,
    out: PathBuf,
    bin_dir: PathBuf,
    from_json: Option<PathBuf>,
}

fn die(msg: &str) -> ! {
    eprintln!("runner: {msg}\n\n{HELP}");
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let exe = std::env::current_exe().expect("own path");
    let mut o = Opts {
        rounds: 5,
        workloads: WORKLOADS.iter().map(|w| w.name.to_string()).collect(),
        allocators: ["system", "mimalloc", "jemalloc", "pagepool"]
            .map(String::from)
            .to_vec(),
        idle_ms: 3000,
        scale: 1.0,
        timeout: Duration::from_secs(300),
        max_foreign: 0.1,
        retries: 3,
        quiet_wait: Duration::from_secs(60),
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../results"),
        bin_dir: exe.parent().expect("a folder").to_path_buf(),
        from_json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "-h" || a == "--help" {
            print!("{HELP}");
            std::process::exit(0);
        }
        let v = args
            .next()
            .unwrap_or_else(|| die(&format!("{a} needs a value")));
        let num = |v: &str| -> f64 {
            v.parse()
                .unwrap_or_else(|_| die(&format!("bad value for {a}: {v}")))
        };
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        match a.as_str() {
            "--rounds" => o.rounds = num(&v) as usize,
            "--workloads" => o.workloads = list(&v),
            "--allocators" => o.allocators = list(&v),
            "--idle-ms" => o.idle_ms = num(&v) as u64,
            "--scale" => o.scale = num(&v),
            "--timeout-s" => o.timeout = Duration::from_secs_f64(num(&v)),
            "--max-foreign" => o.max_foreign = num(&v),
            "--retries" => o.retries = num(&v) as usize,
            "--quiet-wait-s" => o.quiet_wait = Duration::from_secs_f64(num(&v)),
            "--out" => o.out = PathBuf::from(v),
            "--bin-dir" => o.bin_dir = PathBuf::from(v),
            "--from-json" => o.from_json = Some(PathBuf::from(v)),
            _ => die(&format!("unknown option {a}")),
        }
    }
    for w in &o.workloads {
        if pagepool_apps::workload(w).is_none() {
            die(&format!("unknown workload {w}"));
        }
    }
    for a in &o.allocators {
        if o.from_json.is_none() && !bin(&o, a).exists() {
            die(&format!(
                "no binary {} (build with `cargo build --release` in benches/apps)",
                bin(&o, a).display()
            ));
        }
    }
    if o.rounds == 0 || o.workloads.is_empty() || o.allocators.is_empty() {
        die("nothing to run");
    }
    o
}

/// Environment variables of a run.
type EnvVars = &'static [(&'static str, &'static str)];

/// Allocator variants: the binary of another allocator run with settings in its
/// environment.
const VARIANTS: &[(&str, &str, EnvVars)] = &[
    // mimalloc without transparent huge pages.
    ("mimalloc-nothp", "mimalloc", &[("MIMALLOC_ALLOW_THP", "0")]),
    // jemalloc with its background thread, which purges while the program is idle.
    (
        "jemalloc-bg",
        "jemalloc",
        &[("_RJEM_MALLOC_CONF", "background_thread:true")],
    ),
    // PoolAlloc routing every request to the system allocator: the adapter's own cost.
    ("pagepool-off", "pagepool", &[("PAGEPOOL_APPS_POOL", "off")]),
];

/// The binary and environment of an allocator name.
fn spec(alloc: &str) -> (&str, EnvVars) {
    VARIANTS
        .iter()
        .find(|v| v.0 == alloc)
        .map_or((alloc, &[]), |v| (v.1, v.2))
}

fn bin(o: &Opts, alloc: &str) -> PathBuf {
    o.bin_dir.join(format!("apps-{}", spec(alloc).0))
}

/// Runs one child; its JSON line, or why there is none.
fn run_one(o: &Opts, alloc: &str, workload: &str) -> Result<Map<String, Value>, String> {
    let mut child = Command::new(bin(o, alloc))
        .envs(spec(alloc).1.iter().copied())
        .arg(workload)
        .arg("--idle-ms")
        .arg(o.idle_ms.to_string())
        .arg("--scale")
        .arg(o.scale.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break Some(status);
        }
        if start.elapsed() > o.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let tail = |s: &str| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    };
    match status {
        None => Err(format!("killed after {:?}", o.timeout)),
        Some(st) if !st.success() => Err(format!("{st}: {}", tail(&err))),
        Some(_) => out
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v.as_object().cloned())
            .map(|mut r| {
                // A variant reports its binary's name; the tables use the variant's.
                r.insert("binary".into(), format!("apps-{}", spec(alloc).0).into());
                r.insert("alloc".into(), alloc.into());
                r
            })
            .ok_or_else(|| format!("no result line in: {}", tail(&out))),
    }
}

/// A measured quantity of the tables.
struct Metric {
    key: &'static str,
    title: &'static str,
    /// Converts the raw value to the table's unit.
    factor: f64,
    decimals: usize,
}

const METRICS: &[Metric] = &[
    Metric {
        key: "wall_s",
        title: "Wall time of the work (s)",
        factor: 1.0,
        decimals: 3,
    },
    Metric {
        key: "cpu_s",
        title: "CPU time of the work, user + sys, all threads (s)",
        factor: 1.0,
        decimals: 3,
    },
    Metric {
        key: "peak_rss_kib",
        title: "Peak RSS, VmHWM (MiB)",
        factor: 1.0 / 1024.0,
        decimals: 1,
    },
    Metric {
        key: "work_held_kib",
        title: "Rss - LazyFree right after the work, before freeing (MiB)",
        factor: 1.0 / 1024.0,
        decimals: 1,
    },
    Metric {
        key: "idle_held_kib",
        title: "Rss - LazyFree after everything was freed and the idle wait (MiB)",
        factor: 1.0 / 1024.0,
        decimals: 1,
    },
    Metric {
        key: "minflt",
        title: "Minor page faults during the work",
        factor: 1.0,
        decimals: 0,
    },
];

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Geometric mean of the finite, positive values; with how many there were.
fn geomean(v: &[f64]) -> (f64, usize) {
    let ok: Vec<f64> = v
        .iter()
        .copied()
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    if ok.is_empty() {
        return (f64::NAN, 0);
    }
    let mean = ok.iter().map(|x| x.ln()).sum::<f64>() / ok.len() as f64;
    (mean.exp(), ok.len())
}

fn ratio(a: f64, b: f64) -> f64 {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn cell(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".into()
    }
}

/// Medians per (workload, allocator, metric key).
type Medians = BTreeMap<(String, String, String), f64>;

fn medians(o: &Opts, runs: &[Map<String, Value>]) -> Medians {
    let mut m = Medians::new();
    let keys: Vec<&str> = METRICS
        .iter()
        .map(|m| m.key)
        .chain([
            "pool_allocs",
            "free_s",
            "base_held_kib",
            "idle_lazyfree_kib",
        ])
        .collect();
    for w in &o.workloads {
        for a in &o.allocators {
            for k in &keys {
                let vals: Vec<f64> = runs
                    .iter()
                    .filter(|r| r["workload"] == w.as_str() && r["alloc"] == a.as_str())
                    .filter_map(|r| r.get(*k).and_then(Value::as_f64))
                    .collect();
                m.insert((w.clone(), a.clone(), k.to_string()), median(&vals));
            }
        }
    }
    m
}

fn get(m: &Medians, w: &str, a: &str, k: &str) -> f64 {
    m.get(&(w.to_string(), a.to_string(), k.to_string()))
        .copied()
        .unwrap_or(f64::NAN)
}

/// The target's ratio to the baseline and to the best (lowest) peer present.
fn ratios(o: &Opts, m: &Medians, w: &str, k: &str) -> (f64, f64, String) {
    let t = get(m, w, TARGET, k);
    let base = get(m, w, BASELINE, k);
    let mut best = (f64::NAN, String::new());
    for p in peers(o) {
        let v = get(m, w, p, k);
        if v.is_finite() && (!best.0.is_finite() || v < best.0) {
            best = (v, p.to_string());
        }
    }
    (ratio(t, base), ratio(t, best.0), best.1)
}

fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    let s = secs % 86400;
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn machine() -> Map<String, Value> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let mut m = Map::new();
    m.insert(
        "cpus".into(),
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .into(),
    );
    m.insert("cpu_model".into(), cpu.into());
    m.insert(
        "mem_gib".into(),
        ((mem_kib as f64) / 1048576.0).round().into(),
    );
    m.insert(
        "kernel".into(),
        read("/proc/sys/kernel/osrelease").trim().into(),
    );
    m.insert(
        "thp".into(),
        read("/sys/kernel/mm/transparent_hugepage/enabled")
            .trim()
            .into(),
    );
    m
}

/// What one invocation of the runner collected.
struct Report<'a> {
    command: &'a str,
    date: &'a str,
    machine: &'a Map<String, Value>,
    runs: &'a [Map<String, Value>],
    /// Disturbed tries that were repeated.
    repeated: usize,
    failures: &'a [String],
    mismatches: &'a [String],
}

fn markdown(o: &Opts, rep: &Report<'_>) -> String {
    let Report {
        command,
        date,
        machine: mach,
        runs,
        repeated,
        failures,
        mismatches,
    } = *rep;
    let m = medians(o, runs);
    let mut s = String::new();
    let _ = writeln!(s, "# Application benchmarks\n");
    let _ = writeln!(s, "- date: {date}");
    let _ = writeln!(s, "- command: `{command}` (in `benches/apps`)");
    let _ = writeln!(
        s,
        "- machine: {} CPUs ({}), {} GiB, Linux {}, THP `{}`",
        mach["cpus"],
        mach["cpu_model"].as_str().unwrap_or(""),
        mach["mem_gib"],
        mach["kernel"].as_str().unwrap_or(""),
        mach["thp"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- {} rounds, interleaved; every cell is the median of the rounds (every run is in `apps.json`); idle wait {} ms; scale {}",
        o.rounds, o.idle_ms, o.scale
    );
    let _ = writeln!(
        s,
        "- ratios: {TARGET} / {BASELINE}, and {TARGET} / the better of {} for that cell; below 1 means {TARGET} used less. Geometric means over the workloads with a finite, non-zero ratio.",
        if peers(o).is_empty() {
            "(no peer in this run)".to_string()
        } else {
            peers(o).join(" and ")
        }
    );
    if mismatches.is_empty() {
        let _ = writeln!(
            s,
            "- results: every allocator produced the same checksum for each workload"
        );
    } else {
        let _ = writeln!(s, "- **checksum mismatches**: {}", mismatches.join("; "));
    }
    let still: Vec<String> = runs
        .iter()
        .filter(|r| r.get("disturbed").and_then(Value::as_bool) == Some(true))
        .map(|r| {
            format!(
                "{} {} round {} (others used {:.2} CPU s in {:.2} s)",
                r["workload"].as_str().unwrap_or(""),
                r["alloc"].as_str().unwrap_or(""),
                r["round"],
                r["foreign_cpu_s"].as_f64().unwrap_or(0.0) + r["steal_s"].as_f64().unwrap_or(0.0),
                r["wall_s"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "- other load: before each run the runner waited for other processes to use less than {} of one CPU; a run during which they used more (from `/proc/stat`) was repeated, up to {} times: {} tries were repeated (they are in `apps.json`, not in the tables); {}",
        o.max_foreign,
        o.retries,
        repeated,
        if still.is_empty() {
            "no kept run was disturbed".to_string()
        } else {
            format!("kept although disturbed: {}", still.join(", "))
        }
    );
    if !failures.is_empty() {
        let _ = writeln!(s, "- **failed runs**: {}", failures.join("; "));
    }
    let _ = writeln!(s);

    // Summary of geometric means.
    let _ = writeln!(s, "## Summary (geometric means of the ratios)\n");
    let _ = writeln!(
        s,
        "| metric | {TARGET} / {BASELINE} | {TARGET} / best of {} |",
        if peers(o).is_empty() {
            "(none)".to_string()
        } else {
            peers(o).join(", ")
        }
    );
    let _ = writeln!(s, "|---|---:|---:|");
    for met in METRICS {
        let (mut rs, mut rp) = (Vec::new(), Vec::new());
        for w in &o.workloads {
            let (a, b, _) = ratios(o, &m, w, met.key);
            rs.push(a);
            rp.push(b);
        }
        let (gs, ns) = geomean(&rs);
        let (gp, np) = geomean(&rp);
        let n = o.workloads.len();
        let note = |k: usize| {
            if k < n {
                format!(" ({k} of {n})")
            } else {
                String::new()
            }
        };
        let _ = writeln!(
            s,
            "| {} | {}{} | {}{} |",
            met.title,
            cell(gs, 3),
            note(ns),
            cell(gp, 3),
            note(np)
        );
    }
    let _ = writeln!(s);

    for met in METRICS {
        let _ = writeln!(s, "## {}\n", met.title);
        let mut head = String::from("| workload |");
        let mut rule = String::from("|---|");
        for a in &o.allocators {
            let _ = write!(head, " {a} |");
            rule.push_str("---:|");
        }
        let _ = writeln!(
            s,
            "{head} {TARGET} / {BASELINE} | {TARGET} / best peer |\n{rule}---:|---:|"
        );
        let (mut rs, mut rp) = (Vec::new(), Vec::new());
        for w in &o.workloads {
            let mut row = format!("| {w} |");
            for a in &o.allocators {
                let _ = write!(
                    row,
                    " {} |",
                    cell(get(&m, w, a, met.key) * met.factor, met.decimals)
                );
            }
            let (r_base, r_peer, peer) = ratios(o, &m, w, met.key);
            rs.push(r_base);
            rp.push(r_peer);
            let peer = if r_peer.is_finite() {
                format!(" ({peer})")
            } else {
                String::new()
            };
            let _ = writeln!(s, "{row} {} | {}{peer} |", cell(r_base, 3), cell(r_peer, 3));
        }
        let mut row = String::from("| geometric mean |");
        for _ in &o.allocators {
            row.push_str(" |");
        }
        let _ = writeln!(
            s,
            "{row} **{}** | **{}** |\n",
            cell(geomean(&rs).0, 3),
            cell(geomean(&rp).0, 3)
        );
    }

    if o.allocators.iter().any(|a| a == TARGET) {
        let _ = writeln!(
            s,
            "## {TARGET}: requests served by the pool (median per run)\n\nPoolAlloc's own counter (`stats().pool_allocs`); requests it forwards to the system allocator are not counted.\n"
        );
        let _ = writeln!(s, "| workload | pool allocations |\n|---|---:|");
        for w in &o.workloads {
            let _ = writeln!(
                s,
                "| {w} | {} |",
                cell(get(&m, w, TARGET, "pool_allocs"), 0)
            );
        }
        let _ = writeln!(s);
    }
    s
}

fn plot(o: &Opts, runs: &[Map<String, Value>], key: &str, title: &str) -> String {
    let m = medians(o, runs);
    let series: Vec<Bars> = o
        .allocators
        .iter()
        .map(|a| Bars {
            name: a.clone(),
            values: o
                .workloads
                .iter()
                .map(|w| ratio(get(&m, w, a, key), get(&m, w, BASELINE, key)))
                .collect(),
        })
        .collect();
    bar_chart(
        title,
        &format!("median, {BASELINE} = 1"),
        &o.workloads,
        &series,
        1.0,
        4.0,
    )
}

/// Whether other processes used more than `max_foreign` of one CPU while the run worked.
fn disturbed(o: &Opts, r: &Map<String, Value>) -> bool {
    let foreign = r
        .get("foreign_cpu_s")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let steal = r.get("steal_s").and_then(Value::as_f64).unwrap_or(0.0);
    let wall = r.get("wall_s").and_then(Value::as_f64).unwrap_or(f64::NAN);
    // `/proc/stat` counts in ticks of 10 ms: allow two ticks of rounding.
    foreign + steal > o.max_foreign * wall + 0.02
}

/// Waits until other processes use less than `max_foreign` of one CPU (measured over half
/// a second), at most `quiet_wait`; returns the seconds waited and whether it got quiet.
fn wait_for_quiet(o: &Opts) -> (f64, bool) {
    let start = Instant::now();
    loop {
        let a = MachineCpu::read();
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let b = MachineCpu::read();
        let load = (b.busy_s - a.busy_s + b.steal_s - a.steal_s) / t.elapsed().as_secs_f64();
        if load < o.max_foreign {
            return (start.elapsed().as_secs_f64(), true);
        }
        if start.elapsed() >= o.quiet_wait {
            return (start.elapsed().as_secs_f64(), false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn main() {
    let mut o = parse_opts();
    if let Some(path) = o.from_json.clone() {
        let json = load(&mut o, &path);
        if !write_outputs(&o, &json) {
            std::process::exit(1);
        }
        return;
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let date = utc_now();
    let mach = machine();
    let total = o.rounds * o.workloads.len() * o.allocators.len();
    let mut runs: Vec<Map<String, Value>> = Vec::new();
    let mut failures = Vec::new();
    // Disturbed tries that were repeated (kept in apps.json, left out of the tables).
    let mut discarded: Vec<Map<String, Value>> = Vec::new();
    let started = Instant::now();
    let mut done = 0;
    for round in 0..o.rounds {
        for (wi, w) in o.workloads.iter().enumerate() {
            let k = o.allocators.len();
            for j in 0..k {
                let a = &o.allocators[(j + round + wi) % k];
                done += 1;
                let mut attempt = 0;
                loop {
                    let (waited, quiet) = wait_for_quiet(&o);
                    match run_one(&o, a, w) {
                        Ok(mut r) => {
                            let bad = disturbed(&o, &r);
                            eprintln!(
                                "[{done}/{total} {:.0} s] round {round} {w:<12} {a:<9} wall {:.3} s, cpu {:.3} s, peak {:.1} MiB, idle {:.1} MiB{}",
                                started.elapsed().as_secs_f64(),
                                r["wall_s"].as_f64().unwrap_or(f64::NAN),
                                r["cpu_s"].as_f64().unwrap_or(f64::NAN),
                                r["peak_rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                                r["idle_held_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                                if bad {
                                    format!(
                                        " DISTURBED (others used {:.2} CPU s)",
                                        r["foreign_cpu_s"].as_f64().unwrap_or(0.0)
                                            + r["steal_s"].as_f64().unwrap_or(0.0)
                                    )
                                } else {
                                    String::new()
                                }
                            );
                            r.insert("round".into(), round.into());
                            r.insert("attempt".into(), attempt.into());
                            r.insert("disturbed".into(), bad.into());
                            r.insert("quiet_wait_s".into(), waited.into());
                            r.insert("quiet_before".into(), quiet.into());
                            if bad && attempt < o.retries {
                                discarded.push(r);
                                attempt += 1;
                                continue;
                            }
                            runs.push(r);
                        }
                        Err(e) => {
                            eprintln!("[{done}/{total}] round {round} {w} {a}: FAILED: {e}");
                            failures.push(format!("round {round} {w} {a}: {e}"));
                        }
                    }
                    break;
                }
            }
        }
    }

    // Every allocator must have computed the same results.
    let mut mismatches = Vec::new();
    for w in &o.workloads {
        let sums: BTreeMap<String, Vec<String>> = runs
            .iter()
            .filter(|r| r["workload"] == w.as_str())
            .fold(BTreeMap::new(), |mut acc, r| {
                acc.entry(r["checksum"].as_str().unwrap_or("").to_string())
                    .or_default()
                    .push(r["alloc"].as_str().unwrap_or("").to_string());
                acc
            });
        if sums.len() > 1 {
            mismatches.push(format!("{w}: {sums:?}"));
        }
    }

    let json = json!({
        "command": command,
        "date": date,
        "machine": mach,
        "rounds": o.rounds,
        "idle_ms": o.idle_ms,
        "scale": o.scale,
        "workloads": o.workloads,
        "allocators": o.allocators,
        "failures": failures,
        "checksum_mismatches": mismatches,
        "max_foreign": o.max_foreign,
        "retries": o.retries,
        "runs": runs,
        "discarded_disturbed_runs": discarded,
    });
    if !write_outputs(&o, &json) {
        std::process::exit(1);
    }
}

/// The strings of a JSON array.
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The objects of a JSON array.
fn objects(v: &Value) -> Vec<Map<String, Value>> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_object().cloned()).collect())
        .unwrap_or_default()
}

/// Reads an `apps.json` written earlier and takes its settings.
fn load(o: &mut Opts, path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| die(&format!("read {}: {e}", path.display())));
    let json: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| die(&format!("parse {}: {e}", path.display())));
    o.workloads = strings(&json["workloads"]);
    o.allocators = strings(&json["allocators"]);
    o.rounds = json["rounds"].as_u64().unwrap_or(0) as usize;
    o.idle_ms = json["idle_ms"].as_u64().unwrap_or(0);
    o.scale = json["scale"].as_f64().unwrap_or(f64::NAN);
    o.max_foreign = json["max_foreign"].as_f64().unwrap_or(f64::NAN);
    o.retries = json["retries"].as_u64().unwrap_or(0) as usize;
    json
}

/// Writes `apps.md`, `apps.json` and the plots of a run (or of a loaded `apps.json`);
/// false if some run failed or the checksums disagree.
fn write_outputs(o: &Opts, json: &Value) -> bool {
    let runs = objects(&json["runs"]);
    let failures = strings(&json["failures"]);
    let mismatches = strings(&json["checksum_mismatches"]);
    let mach = json["machine"].as_object().cloned().unwrap_or_default();
    std::fs::create_dir_all(&o.out).expect("create the output folder");
    let md = markdown(
        o,
        &Report {
            command: json["command"].as_str().unwrap_or(""),
            date: json["date"].as_str().unwrap_or(""),
            machine: &mach,
            runs: &runs,
            repeated: objects(&json["discarded_disturbed_runs"]).len(),
            failures: &failures,
            mismatches: &mismatches,
        },
    );
    let write = |name: &str, text: &str| {
        let p = o.out.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        eprintln!("wrote {}", p.display());
    };
    write("apps.md", &md);
    write(
        "apps.json",
        &serde_json::to_string_pretty(json).expect("serialise"),
    );
    if o.allocators.iter().any(|a| a == BASELINE) {
        write(
            "apps-time.svg",
            &plot(o, &runs, "wall_s", "Wall time of the work"),
        );
        write(
            "apps-rss.svg",
            &plot(o, &runs, "peak_rss_kib", "Peak RSS (VmHWM)"),
        );
        write(
            "apps-idle.svg",
            &plot(
                o,
                &runs,
                "idle_held_kib",
                "Rss - LazyFree after freeing and idle",
            ),
        );
    }
    print!("{md}");
    failures.is_empty() && mismatches.is_empty()
}
