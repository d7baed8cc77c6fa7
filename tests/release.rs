//! Giving memory back on the embedder's terms: `release_idle` now, and a resident budget
//! (`resident_free_limit`) the hinter keeps, checked through the pool's counters and
//! through `/proc/self/smaps_rollup` (`Rss - LazyFree`).
//!
//! The tests of this file take turns: process-wide memory figures would see each other.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{MIB, assert_balanced, cached, eventually, held, quiet};
use pagepool::{Block, BuildError, CpuCacheMode, HintMode, PagePool, ProcessMemory};
use proptest::prelude::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Allocates about `bytes` in blocks of orders `0..=max` (a fixed mix), touching every
/// page, and returns them.
fn burst(pool: &PagePool, bytes: usize, max: u8) -> Vec<Block> {
    let mut live = Vec::new();
    let mut total = 0;
    let mut i = 0u32;
    while total < bytes {
        let order = (i.wrapping_mul(2654435761) >> 7) as u8 % (max + 1);
        i += 1;
        let Ok(mut block) = pool.alloc(order) else {
            break;
        };
        block.as_mut_slice().fill(0xa5);
        total += block.len();
        live.push(block);
    }
    live
}

#[test]
fn release_idle_gives_back_every_block_at_or_above_the_hint_order_now() {
    let _serial = serial();
    for builder in [quiet(32, 2), cached(32, 2)] {
        // A delay nobody waits for: only `release_idle` can hint anything here.
        let pool = builder
            .hint_delay(Duration::from_secs(3600))
            .build()
            .unwrap();
        let live = burst(&pool, 96 * MIB, 10);
        for block in live {
            pool.free(block);
        }
        let before = pool.stats();
        assert!(before.resident_free_bytes() >= 96 * MIB as u64);
        let report = pool.release_idle();
        let after = pool.stats();
        assert_eq!(after.cpu_cache_bytes, 0, "caches drained");
        for o in after.orders.iter().filter(|o| o.order >= 9) {
            assert_eq!(
                o.unhinted, 0,
                "order {}: everything at or above the hint order",
                o.order
            );
        }
        assert!(report.bytes >= 90 * MIB as u64, "{report:?}");
        // Small free blocks stay (a huge page split is the caller's choice) ...
        let small = after.resident_free_bytes();
        // ... until asked for.
        let more = pool.release_idle_down_to(0);
        assert_eq!(pool.stats().resident_free_bytes(), 0);
        assert_eq!(more.bytes, small, "{more:?} after {report:?}");
        assert_balanced(&pool);
    }
}

/// After a 1 GiB burst and free, `release_idle` brings `Rss - LazyFree` back to within
/// 1 % of the burst above where it was before, in well under a second (the benchmark
/// `pagepool-bench release` measures the time).
#[test]
fn release_idle_after_a_gib_burst_returns_to_the_baseline() {
    let _serial = serial();
    let pool = PagePool::builder()
        .capacity(1280 * MIB)
        .hint_thread(false)
        .build()
        .unwrap();
    let Some(base) = held() else { return };
    let live = burst(&pool, 1024 * MIB, 9);
    let peak = held().unwrap();
    assert!(peak >= base + 1000 * MIB as u64, "the burst is resident");
    for block in live {
        pool.free(block);
    }
    let report = pool.release_idle();
    let after = held().unwrap();
    let above = after.saturating_sub(base);
    assert!(
        above <= (1024 * MIB as u64) / 100,
        "{} KiB above the baseline after releasing {} MiB",
        above >> 10,
        report.bytes >> 20
    );
}

/// With a 64 MiB budget and a delay nobody waits for, the hinter brings free resident
/// memory down to the budget after a burst, and keeps it there: sampled from the stats
/// and from `/proc`.
#[test]
fn a_64_mib_budget_holds_for_an_idle_pool() {
    let _serial = serial();
    for mode in [CpuCacheMode::Off, CpuCacheMode::Auto] {
        let budget = 64 * MIB as u64;
        let Some(base) = held() else { return };
        let pool = PagePool::builder()
            .capacity(512 * MIB)
            .cpu_cache(mode)
            .hint_delay(Duration::from_secs(3600))
            .hint_interval(Duration::from_millis(5))
            .resident_free_limit(budget as usize)
            .build()
            .unwrap();
        let live = burst(&pool, 384 * MIB, 10);
        for block in live {
            pool.free(block);
        }
        // Blocks a hint pass holds while it advises them are resident too (and not counted
        // as free): judging by free memory alone may catch a pass with tens of MiB in
        // flight, which `/proc` then sees.
        let resident = |s: &pagepool::Stats| s.resident_free_bytes() + s.in_flight_bytes;
        eventually(&pool, Duration::from_secs(10), "down to the budget", |s| {
            resident(s) <= budget
        });
        // Idle for a while: it stays within the budget, by the counters and by /proc
        // (allowing 8 MiB for the pool's metadata and this test's own vectors).
        for _ in 0..20 {
            let stats = pool.stats();
            assert!(resident(&stats) <= budget, "{stats:#?}");
            let now = held().unwrap();
            assert!(
                now <= base + budget + 8 * MIB as u64,
                "{mode:?}: Rss - LazyFree {} MiB above the baseline, budget {} MiB\n{}\n{:?}",
                now.saturating_sub(base) >> 20,
                budget >> 20,
                pool.stats(),
                ProcessMemory::read()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The budget is not a cap on use: the pool still hands out all it has.
        let again = burst(&pool, 448 * MIB, 10);
        assert!(again.iter().map(|b| b.len()).sum::<usize>() >= 448 * MIB);
        for block in again {
            pool.free(block);
        }
    }
}

/// A zero budget gives every free block back at the hinter's next pass, small ones too.
#[test]
fn a_zero_budget_keeps_nothing_free_resident() {
    let _serial = serial();
    let pool = cached(8, 2)
        .hint_thread(true)
        .hint_delay(Duration::from_secs(3600))
        .hint_interval(Duration::from_millis(5))
        .resident_free_limit(0)
        .build()
        .unwrap();
    let live = burst(&pool, 16 * MIB, 4);
    for block in live {
        pool.free(block);
    }
    eventually(&pool, Duration::from_secs(10), "nothing resident", |s| {
        s.resident_free_bytes() == 0
    });
    assert_balanced(&pool);
}

#[test]
fn an_absurd_budget_is_refused() {
    for bytes in [(64 * MIB) + 1, usize::MAX] {
        let err = PagePool::builder()
            .capacity(64 * MIB)
            .resident_free_limit(bytes)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                err,
                BuildError::InvalidSetting {
                    setting: "resident_free_limit",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("resident_free_limit"), "{err}");
    }
    // The whole capacity is allowed: the budget never acts, which is what it says.
    assert!(
        PagePool::builder()
            .capacity(64 * MIB)
            .resident_free_limit(64 * MIB)
            .build()
            .is_ok()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Over random pools (orders, shards, caches, advice) and budgets, after churn and a
    /// free of everything, the hinter brings resident free memory within the budget.
    #[test]
    fn every_budget_is_kept(
        max_order in 9u8..=12,
        shards in 1usize..=4,
        mode in prop_oneof![Just(CpuCacheMode::Off), Just(CpuCacheMode::Auto)],
        dontneed in any::<bool>(),
        budget_frac in 0.0f64..0.9,
        seed in any::<u32>(),
    ) {
        let _serial = serial();
        let capacity = 64 * MIB;
        let budget = ((capacity as f64 * budget_frac) as usize) & !4095;
        let pool = PagePool::builder()
            .capacity(capacity)
            .max_order(max_order)
            .shards(shards)
            .cpu_cache(mode)
            .hint_mode(if dontneed { HintMode::DontNeed } else { HintMode::Free })
            .hint_delay(Duration::from_secs(3600))
            .hint_interval(Duration::from_millis(2))
            .resident_free_limit(budget)
            .build()
            .unwrap();
        let mut live = Vec::new();
        let mut x = seed | 1;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if x % 3 == 0 && !live.is_empty() {
                let i = x as usize % live.len();
                let block: Block = live.swap_remove(i);
                pool.free(block);
            } else if let Ok(mut block) = pool.alloc((x >> 8) as u8 % 6) {
                block.as_mut_slice()[0] = 1;
                live.push(block);
            }
        }
        for block in live {
            pool.free(block);
        }
        eventually(&pool, Duration::from_secs(10), "within the budget", |s| {
            s.resident_free_bytes() <= budget as u64
        });
        assert_balanced(&pool);
    }
}

/// Pages of `ranges` that are resident and still count in `Rss - LazyFree` (anonymous and
/// swap-backed, per `/proc/kpageflags`), or `None` (with a note) where the kernel does not
/// let this process read page flags (they need `CAP_SYS_ADMIN`).
fn resident_not_lazy(ranges: &[(usize, usize)]) -> Option<usize> {
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom};
    const KPF_ANON: u64 = 1 << 12;
    const KPF_SWAPBACKED: u64 = 1 << 14;
    let (Ok(mut pagemap), Ok(mut flags)) = (
        File::open("/proc/self/pagemap"),
        File::open("/proc/kpageflags"),
    ) else {
        eprintln!("skipped: /proc/self/pagemap or /proc/kpageflags cannot be read here");
        return None;
    };
    let mut count = 0;
    for &(addr, len) in ranges {
        for page in (addr..addr + len).step_by(4096) {
            let mut entry = [0u8; 8];
            pagemap.seek(SeekFrom::Start(page as u64 / 4096 * 8)).ok()?;
            pagemap.read_exact(&mut entry).ok()?;
            let entry = u64::from_le_bytes(entry);
            if entry >> 63 == 0 {
                continue; // not resident
            }
            let pfn = entry & ((1 << 55) - 1);
            if pfn == 0 {
                eprintln!("skipped: page frame numbers are hidden from this process");
                return None;
            }
            let mut word = [0u8; 8];
            flags.seek(SeekFrom::Start(pfn * 8)).ok()?;
            flags.read_exact(&mut word).ok()?;
            let word = u64::from_le_bytes(word);
            if word & KPF_ANON != 0 && word & KPF_SWAPBACKED != 0 {
                count += 1;
            }
        }
    }
    Some(count)
}

/// Linux marks lazily freed pages through a per-CPU batch of up to 31 folios; until it
/// drains, those pages still count in `Rss`. `release_idle` drains it, so every page it
/// gave back counts as `LazyFree` as soon as it returns. (Fewer blocks than the batch
/// holds, so without the drain none of them would.)
#[test]
fn release_idle_leaves_no_lazily_freed_page_counted_as_resident() {
    let _serial = serial();
    // The batch is per CPU: stay on one while the test frees and drains.
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu >= 0 {
        common::run_on(&[cpu as usize]);
    }
    let pool = PagePool::builder()
        .capacity(64 * MIB)
        .hint_thread(false)
        .build()
        .unwrap();
    let mut live = Vec::new();
    for _ in 0..8 {
        let mut block = pool.alloc(9).unwrap();
        block.as_mut_slice().fill(0x5a);
        live.push(block);
    }
    let ranges: Vec<(usize, usize)> = live
        .iter()
        .map(|b| (b.as_ptr() as usize, b.len()))
        .collect();
    let Some(touched) = resident_not_lazy(&ranges) else {
        return;
    };
    assert_eq!(touched, 8 * 512, "every page written is resident");
    for block in live {
        pool.free(block);
    }
    let report = pool.release_idle();
    assert_eq!(report.bytes, 16 * MIB as u64, "{report:?}");
    assert_eq!(resident_not_lazy(&ranges), Some(0));
}
