//! `PoolAlloc` as the global allocator of a realistic program: build and query a large
//! in-memory inverted index with rayon, then watch memory go back to the OS.
//!
//! Run: `cargo run --release --example global_alloc -- [DOCS] [IDLE_SECONDS]`
//! (defaults: 300000 documents, 3 s of idle).
//!
//! It prints the build and query times, the adapter's and the pool's counters, and the
//! process's `Rss`, `LazyFree` and `Rss - LazyFree` (from `/proc/self/smaps_rollup`) at
//! the peak, right after the index is dropped, and after the idle time, during which the
//! hinter gives the free blocks back with `MADV_FREE`. `benches/global_workload.rs` runs
//! the same workload under the pool and under the system allocator.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pagepool::PoolAlloc;
use rayon::prelude::*;

/// The process's allocator: small objects from the pool's slabs, page-sized requests from
/// its blocks, the largest from mappings of their own.
#[global_allocator]
pub(crate) static GLOBAL: PoolAlloc = PoolAlloc::new();

/// `Rss` and `LazyFree` of the process, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    /// Resident bytes.
    pub(crate) rss: u64,
    /// Resident bytes freed with `MADV_FREE` that the kernel may take at any time.
    pub(crate) lazy_free: u64,
}

impl Memory {
    /// Reads `/proc/self/smaps_rollup` (zeros where it is missing).
    pub(crate) fn read() -> Self {
        let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        };
        Self {
            rss: field("Rss:"),
            lazy_free: field("LazyFree:"),
        }
    }

    /// `Rss - LazyFree`: what the process really holds.
    pub(crate) fn held(&self) -> u64 {
        self.rss.saturating_sub(self.lazy_free)
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        write!(
            f,
            "Rss {:7.1} MiB  LazyFree {:7.1} MiB  Rss - LazyFree {:7.1} MiB",
            mib(self.rss),
            mib(self.lazy_free),
            mib(self.held())
        )
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Report {
    /// Generating the documents and building the index.
    pub(crate) build: Duration,
    /// Answering the queries.
    pub(crate) query: Duration,
    /// Distinct terms indexed.
    pub(crate) terms: usize,
    /// Postings (term, document) in the index.
    pub(crate) postings: usize,
    /// Sum of all query answers: the same under every allocator.
    pub(crate) checksum: u64,
    /// Memory with the index built.
    pub(crate) peak: Memory,
    /// Memory right after dropping the index.
    pub(crate) dropped: Memory,
    /// Memory after the idle time.
    pub(crate) idle: Memory,
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A skewed term id in `0..vocab`: a few terms are very common (long posting lists), most
/// are rare (short ones).
fn term(r: u64, vocab: u64) -> u64 {
    let u = (r >> 11) as f64 / (1u64 << 53) as f64;
    ((vocab as f64).powf(u * u) as u64).min(vocab - 1)
}

/// The inverted index: term -> sorted document ids, plus each document's text.
struct Index {
    docs: Vec<String>,
    postings: HashMap<String, Vec<u32>>,
}

fn build(docs: usize) -> Index {
    const VOCAB: u64 = 200_000;
    let vocab: Vec<String> = (0..VOCAB)
        .map(|t| format!("w{:x}", mix(t) & 0xFF_FFFF))
        .collect();
    let docs: Vec<String> = (0..docs as u64)
        .into_par_iter()
        .map(|d| {
            let words = 20 + mix(d) % 120;
            let mut text = String::new();
            for w in 0..words {
                text.push_str(&vocab[term(mix(d * 1000 + w), VOCAB) as usize]);
                text.push(' ');
            }
            text
        })
        .collect();
    // Each rayon task indexes a slice of documents into its own map; maps are merged
    // pairwise, so posting lists grow by appending (realloc) and tables are rebuilt.
    let mut postings = docs
        .par_iter()
        .enumerate()
        .fold(HashMap::<String, Vec<u32>>::new, |mut map, (d, text)| {
            for word in text.split_ascii_whitespace() {
                let list = map.entry(word.to_owned()).or_default();
                if list.last() != Some(&(d as u32)) {
                    list.push(d as u32);
                }
            }
            map
        })
        .reduce(HashMap::new, |mut a, b| {
            if a.len() < b.len() {
                return merge(b, a);
            }
            for (k, mut v) in b {
                a.entry(k).or_default().append(&mut v);
            }
            a
        });
    postings
        .par_iter_mut()
        .for_each(|(_, list)| list.sort_unstable());
    Index { docs, postings }
}

fn merge(
    mut a: HashMap<String, Vec<u32>>,
    b: HashMap<String, Vec<u32>>,
) -> HashMap<String, Vec<u32>> {
    for (k, mut v) in b {
        a.entry(k).or_default().append(&mut v);
    }
    a
}

/// Documents containing every term, by intersecting sorted posting lists.
fn intersect(lists: &[&Vec<u32>]) -> Vec<u32> {
    let mut lists = lists.to_vec();
    lists.sort_by_key(|l| l.len());
    let mut acc: Vec<u32> = lists[0].clone();
    for l in &lists[1..] {
        let mut out = Vec::with_capacity(acc.len());
        let (mut i, mut j) = (0, 0);
        while i < acc.len() && j < l.len() {
            match acc[i].cmp(&l[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    out.push(acc[i]);
                    i += 1;
                    j += 1;
                }
            }
        }
        acc = out;
    }
    acc
}

fn query(index: &Index, queries: u64) -> u64 {
    let mut terms: Vec<&String> = index.postings.keys().collect();
    terms.sort();
    (0..queries)
        .into_par_iter()
        .map(|q| {
            let n = 2 + mix(q) % 2;
            let lists: Vec<&Vec<u32>> = (0..n)
                .map(|k| &index.postings[terms[term(mix(q * 7 + k), terms.len() as u64) as usize]])
                .collect();
            let hits = intersect(&lists);
            // Snippets of the first hits: string work on the documents.
            let snippet_len: usize = hits
                .iter()
                .take(3)
                .map(|&d| {
                    index.docs[d as usize]
                        .split_ascii_whitespace()
                        .take(8)
                        .collect::<Vec<_>>()
                        .join(" ")
                        .len()
                })
                .sum();
            hits.len() as u64 * 1_000 + snippet_len as u64
        })
        .sum()
}

/// Builds the index of `docs` documents, answers queries, drops it, idles for `idle`.
pub(crate) fn run(docs: usize, idle: Duration) -> Report {
    let start = Instant::now();
    let index = build(docs);
    let build_time = start.elapsed();
    let start = Instant::now();
    let checksum = query(&index, 20_000);
    let query_time = start.elapsed();
    let terms = index.postings.len();
    let postings = index.postings.values().map(Vec::len).sum();
    let peak = Memory::read();
    drop(index);
    let dropped = Memory::read();
    std::thread::sleep(idle);
    Report {
        build: build_time,
        query: query_time,
        terms,
        postings,
        checksum,
        peak,
        dropped,
        idle: Memory::read(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let docs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(300_000);
    let idle = Duration::from_secs(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3));
    // Start hinting from main: never from inside an allocation.
    GLOBAL.start_hinter().expect("start the hinter thread");
    println!(
        "indexing {docs} documents on {} threads",
        rayon::current_num_threads()
    );
    let report = run(docs, idle);
    println!(
        "build {:.0?}, 20000 queries {:.0?}: {} terms, {} postings, checksum {}",
        report.build, report.query, report.terms, report.postings, report.checksum
    );
    println!("{}", GLOBAL.stats());
    if let Some(stats) = GLOBAL.pool_stats() {
        println!("{stats}");
    }
    println!("{:<26}{}", "with the index built:", report.peak);
    println!("{:<26}{}", "index dropped:", report.dropped);
    println!("{:<26}{}", format!("after {idle:?} idle:"), report.idle);
}
