//! Watch free memory go back to the OS.
//!
//! Allocates and writes about 1 GiB in mixed orders, frees it all, then stays idle,
//! printing once a second the process's `Rss`, `LazyFree` and `Rss - LazyFree` (from
//! `/proc/self/smaps_rollup`) next to the pool's hinted bytes.
//!
//! Run: `cargo run --release --example hinting -- [SIZE_MIB] [IDLE_SECONDS] [free|dontneed]`
//! (defaults: 1024 MiB, 5 s, free).

use std::time::{Duration, Instant};

use pagepool::{HintMode, PagePool, ProcessMemory};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size_mib: usize = args.first().map_or(Ok(1024), |a| a.parse())?;
    let idle_secs: u64 = args.get(1).map_or(Ok(5), |a| a.parse())?;
    let mode = match args.get(2).map(String::as_str) {
        None | Some("free") => HintMode::Free,
        Some("dontneed") => HintMode::DontNeed,
        Some(other) => return Err(format!("unknown mode {other:?}: use free or dontneed").into()),
    };
    let delay = Duration::from_secs(1);
    let pool = PagePool::builder()
        .capacity((size_mib << 20) * 2)
        .hint_mode(mode)
        .hint_delay(delay)
        .build()?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;

    // Allocate and write `size_mib` in mixed orders: many 4-64 KiB blocks, some 2 MiB.
    let target = (size_mib << 20) as u64;
    let mut live = Vec::new();
    let mut bytes = 0u64;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let start = Instant::now();
    while bytes < target {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let order = match rng % 10 {
            0..=5 => (rng >> 8) as u8 % 5,
            6..=8 => 5 + (rng >> 8) as u8 % 4,
            _ => 9,
        };
        let mut block = pool.alloc(order)?;
        block.as_mut_slice().fill(order + 1);
        bytes += block.len() as u64;
        live.push(block);
    }
    let peak = ProcessMemory::read();
    println!(
        "allocated and wrote {:.0} MiB in {} blocks in {:.0?}; mode {mode:?}, hint delay {delay:?}",
        mib(bytes),
        live.len(),
        start.elapsed()
    );
    for block in live {
        pool.free(block);
    }
    let freed_at = Instant::now();
    println!("freed everything; now idle\n");
    println!(
        "{:>6} {:>10} {:>10} {:>16} {:>12}",
        "time",
        "Rss",
        "LazyFree",
        "Rss - LazyFree",
        if mode == HintMode::Free {
            "pool hinted"
        } else {
            "pool zeroed"
        }
    );
    let print = |label: &str, mem: Option<ProcessMemory>| {
        let stats = pool.stats();
        match mem {
            Some(m) => println!(
                "{label:>6} {:>8.1}Mi {:>8.1}Mi {:>14.1}Mi {:>10.1}Mi",
                mib(m.rss),
                mib(m.lazy_free),
                mib(m.held()),
                mib(stats.hinted_bytes
                    + if mode == HintMode::DontNeed {
                        stats.zero_bytes
                    } else {
                        0
                    }),
            ),
            None => println!(
                "{label:>6} (no /proc/self/smaps_rollup) pool hinted {:.1} MiB",
                mib(stats.hinted_bytes)
            ),
        }
    };
    print("peak", peak);
    for second in 0..=idle_secs {
        let wake = freed_at + Duration::from_secs(second);
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        print(&format!("{second}s"), ProcessMemory::read());
    }
    let stats = pool.stats();
    println!(
        "\nhinter: {} passes, {} madvise calls, {:.0} MiB hinted, {} failures",
        stats.hint.passes,
        stats.hint.madvise_calls,
        mib(stats.hint.bytes_hinted_total),
        stats.hint.failures
    );
    if let (Some(peak), Some(now)) = (peak, ProcessMemory::read()) {
        println!(
            "Rss - LazyFree is {:.1} % of its peak",
            100.0 * now.held() as f64 / peak.held().max(1) as f64
        );
    }
    Ok(())
}
