//! Statistics: a snapshot of the lock-free counters, printable as a table. Read without
//! locks; the front ends add what their caches hold.

use std::fmt;

use super::PoolCore;
use crate::FRAME_SIZE;
use crate::sync::Ordering::{Acquire, Relaxed};

/// Counts for one order, summed over all shards and the shared pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrderStats {
    /// The order.
    pub order: u8,
    /// Bytes per block.
    pub block_size: usize,
    /// Free blocks (all kinds, cached ones included).
    pub free: u64,
    /// Free blocks that are resident and unhinted (cached ones included).
    pub unhinted: u64,
    /// Free blocks given back with `MADV_FREE`.
    pub hinted: u64,
    /// Free blocks known to read as zeros.
    pub zero: u64,
    /// Free blocks in the shards' small-block caches (unmerged).
    pub cached: u64,
    /// Blocks handed out (not counting those in per-CPU caches).
    pub allocated: u64,
    /// Free blocks in the per-CPU caches, all CPUs (not counted in `free`, which is the
    /// shards' count).
    pub cpu_cached: u64,
    /// Blocks the hinter holds while advising the kernel.
    pub in_flight: u64,
    /// Blocks that ever entered this order's free lists (monotonic).
    pub freed_total: u64,
    /// Blocks that ever left them (monotonic); `freed_total - bound_total == free`.
    pub bound_total: u64,
}

/// Hinting counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintStats {
    /// Passes run (by the thread or `hint_now`).
    pub passes: u64,
    /// `madvise` / `process_madvise` system calls.
    pub madvise_calls: u64,
    /// Bytes given back, in total.
    pub bytes_hinted_total: u64,
    /// Blocks given back, in total.
    pub blocks_hinted_total: u64,
    /// Blocks whose advice failed (they stayed unhinted).
    pub failures: u64,
    /// Panics caught in the advisor.
    pub panics: u64,
    /// Whether the hinter thread is listening.
    pub thread_running: bool,
}

/// Capture counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Blocks handed from a free to a waiting request.
    pub captures: u64,
    /// Requests that parked.
    pub waits: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Rounds of reclaim callbacks.
    pub reclaim_rounds: u64,
    /// Regions reserved by waiting requests.
    pub reservations: u64,
    /// Requests waiting right now.
    pub waiting: u64,
}

/// What the memory pressure watcher did to a pool (see
/// [`PagePool::watch_pressure`](crate::PagePool::watch_pressure)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PressureStats {
    /// The pool watches for memory pressure.
    pub watching: bool,
    /// Memory pressure lasts now: the pool advises `MADV_DONTNEED`.
    pub under_pressure: bool,
    /// Pressure events the pool reacted to (one release of its free memory each).
    pub events: u64,
    /// Bytes those releases advised.
    pub bytes_released: u64,
}

/// A snapshot of a pool's counters. Each counter is read atomically but not all at one
/// instant, so under concurrent use the totals may be off by the operations in progress;
/// at quiescence `free_bytes + allocated_bytes + in_flight_bytes == capacity`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of block memory.
    pub capacity: usize,
    /// Number of per-CPU shards.
    pub shards: usize,
    /// Bytes in allocated blocks.
    pub allocated_bytes: u64,
    /// Bytes in free blocks.
    pub free_bytes: u64,
    /// Bytes the hinter holds while advising.
    pub in_flight_bytes: u64,
    /// Free bytes given back with `MADV_FREE` (counted as `LazyFree` by the kernel).
    pub hinted_bytes: u64,
    /// Free bytes known to be zero (never touched, or `MADV_DONTNEED`).
    pub zero_bytes: u64,
    /// Free bytes in the small-block caches.
    pub cached_bytes: u64,
    /// Bytes held, free, by [`LocalCache`](crate::LocalCache)s: part of `allocated_bytes`,
    /// since no other allocation can take them.
    pub local_cache_bytes: u64,
    /// Free bytes in the per-CPU caches: part of `free_bytes` (the shards count them as
    /// allocated; no user holds them).
    pub cpu_cache_bytes: u64,
    /// Free bytes in each CPU's cache, by CPU number (empty without per-CPU caches).
    pub cpu_cache_bytes_per_cpu: Vec<u64>,
    /// Which per-CPU cache implementation runs (`Rseq` or `Portable`), `None` when off.
    pub cpu_cache: Option<crate::config::CpuCacheMode>,
    /// Free bytes per shard (the shared pool of whole chunks last).
    pub free_bytes_per_shard: Vec<u64>,
    /// Per-order counts, order 0 first.
    pub orders: Vec<OrderStats>,
    /// Hinting.
    pub hint: HintStats,
    /// Capture.
    pub capture: CaptureStats,
    /// Memory pressure.
    pub pressure: PressureStats,
}

impl Stats {
    pub(crate) fn collect(core: &PoolCore) -> Self {
        let max = core.max_order();
        let mut stats = Stats {
            capacity: core.resolved.capacity,
            shards: core.shard_count(),
            ..Default::default()
        };
        stats.orders = (0..=max)
            .map(|order| OrderStats {
                order,
                block_size: FRAME_SIZE << order,
                ..Default::default()
            })
            .collect();
        for shard in core.all_shards() {
            let mut shard_free = 0;
            for o in stats.orders.iter_mut() {
                let c = &shard.counters[o.order as usize];
                // Each counter read once, and the gauges clamped to the free count: every
                // order of a snapshot taken while the shard changes is self-consistent
                // (free == freed_total - bound_total == unhinted + hinted + zero,
                // cached <= unhinted) and never above the capacity.
                let (bound, freed) = free_pair(c, (core.resolved.capacity / o.block_size) as u64);
                let free = freed - bound;
                let hinted = c.hinted.load(Acquire).min(free);
                let zero = c.zero.load(Acquire).min(free - hinted);
                let cached = c.cached.load(Acquire).min(free - hinted - zero);
                o.free += free;
                o.unhinted += free - hinted - zero;
                o.hinted += hinted;
                o.zero += zero;
                o.cached += cached;
                o.allocated += c.allocated.load(Acquire);
                o.in_flight += c.in_flight.load(Acquire);
                o.freed_total += freed;
                o.bound_total += bound;
                shard_free += free * o.block_size as u64;
            }
            stats.free_bytes_per_shard.push(shard_free);
        }
        // A whole chunk moving between a shard and the shared pool while they were read
        // one after the other can count twice: keep each order within what fits, and its
        // figures consistent with each other.
        for o in stats.orders.iter_mut() {
            let fits = (core.resolved.capacity / o.block_size) as u64;
            if o.free > fits {
                o.bound_total += o.free - fits;
                o.free = fits;
                o.hinted = o.hinted.min(o.free);
                o.zero = o.zero.min(o.free - o.hinted);
                o.unhinted = o.free - o.hinted - o.zero;
                o.cached = o.cached.min(o.unhinted);
            }
        }
        // Blocks in per-CPU caches are allocated as far as the shards know, and free as far
        // as users do.
        if let Some(cpu) = &core.cpu {
            stats.cpu_cache = Some(match cpu.implementation() {
                crate::percpu::CpuCacheImpl::Rseq => crate::config::CpuCacheMode::Rseq,
                crate::percpu::CpuCacheImpl::Portable => crate::config::CpuCacheMode::Portable,
            });
            stats.cpu_cache_bytes_per_cpu = (0..cpu.cpus()).map(|c| cpu.bytes(c)).collect();
            for o in stats.orders.iter_mut() {
                let held: u64 = (0..cpu.cpus()).map(|c| cpu.blocks(c, o.order)).sum();
                o.cpu_cached = held.min(o.allocated);
                o.allocated -= o.cpu_cached;
            }
        }
        for o in &stats.orders {
            let size = o.block_size as u64;
            stats.allocated_bytes += o.allocated * size;
            stats.cpu_cache_bytes += o.cpu_cached * size;
            stats.free_bytes += (o.free + o.cpu_cached) * size;
            stats.in_flight_bytes += o.in_flight * size;
            stats.hinted_bytes += o.hinted * size;
            stats.zero_bytes += o.zero * size;
            stats.cached_bytes += o.cached * size;
        }
        // Orders are read one after another, so a block that moved between orders (split,
        // merge) while they were read can count twice: keep every total within capacity.
        let cap = stats.capacity as u64;
        for total in [
            &mut stats.allocated_bytes,
            &mut stats.free_bytes,
            &mut stats.in_flight_bytes,
            &mut stats.hinted_bytes,
            &mut stats.zero_bytes,
            &mut stats.cached_bytes,
            &mut stats.cpu_cache_bytes,
        ] {
            *total = (*total).min(cap);
        }
        let h = &core.hint_counters;
        stats.hint = HintStats {
            passes: h.passes.load(Relaxed),
            madvise_calls: h.madvise_calls.load(Relaxed),
            bytes_hinted_total: h.bytes_hinted.load(Relaxed),
            blocks_hinted_total: h.blocks_hinted.load(Relaxed),
            failures: h.failures.load(Relaxed),
            panics: h.panics.load(Relaxed),
            thread_running: super::registry::registry().hinting(core),
        };
        let c = &core.capture.counters;
        stats.capture = CaptureStats {
            captures: c.captures.load(Relaxed),
            waits: c.waits.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            reclaim_rounds: c.reclaim_rounds.load(Relaxed),
            reservations: c.reservations.load(Relaxed),
            waiting: core.capture.waiting() as u64,
        };
        let p = &core.pressure;
        stats.pressure = PressureStats {
            watching: p.watching.load(Relaxed),
            under_pressure: core.under_pressure(),
            events: p.events.load(Relaxed),
            bytes_released: p.bytes_released.load(Relaxed),
        };
        stats
    }

    /// Free bytes that are resident: free minus hinted minus known-zero.
    pub fn resident_free_bytes(&self) -> u64 {
        self.free_bytes
            .saturating_sub(self.hinted_bytes + self.zero_bytes)
    }
}

/// A `(bound, freed)` pair that the shard's counters held at one instant, so `freed -
/// bound` is a free count the shard really had (never more blocks than fit in `max_blocks`).
///
/// Only the shard's lock holder writes the counters, with release stores. `bound` is read
/// before and after `freed`: if it did not move, the `freed` read was stored while `bound`
/// had that value (a later `freed` store would carry the newer `bound` with it). If `bound`
/// keeps moving, after a few tries the last pair is clamped instead.
fn free_pair(c: &crate::shard::OrderCounters, max_blocks: u64) -> (u64, u64) {
    let mut tries = 0;
    loop {
        let bound = c.bound.load(Acquire);
        let freed = c.freed.load(Acquire);
        tries += 1;
        if c.bound.load(Acquire) == bound || tries == 8 {
            return (bound, freed.clamp(bound, bound + max_blocks));
        }
    }
}

/// Formats a byte count with a binary unit.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pagepool: capacity {}, {} shards | allocated {} (in local caches {}) | free {} (hinted {}, zero {}, shard caches {}, per-CPU caches {}{}) | in flight {}",
            human(self.capacity as u64),
            self.shards,
            human(self.allocated_bytes),
            human(self.local_cache_bytes),
            human(self.free_bytes),
            human(self.hinted_bytes),
            human(self.zero_bytes),
            human(self.cached_bytes),
            human(self.cpu_cache_bytes),
            match self.cpu_cache {
                Some(crate::config::CpuCacheMode::Rseq) => ", rseq",
                Some(_) => ", portable",
                None => ", off",
            },
            human(self.in_flight_bytes),
        )?;
        writeln!(
            f,
            "{:>5} {:>9} {:>10} {:>10} {:>9} {:>9} {:>8} {:>10} {:>9} {:>12}",
            "order",
            "size",
            "allocated",
            "free",
            "unhinted",
            "hinted",
            "zero",
            "cached",
            "per-CPU",
            "freed total"
        )?;
        for o in &self.orders {
            if o.free == 0
                && o.allocated == 0
                && o.freed_total == 0
                && o.in_flight == 0
                && o.cpu_cached == 0
            {
                continue;
            }
            writeln!(
                f,
                "{:>5} {:>9} {:>10} {:>10} {:>9} {:>9} {:>8} {:>10} {:>9} {:>12}",
                o.order,
                human(o.block_size as u64),
                o.allocated,
                o.free,
                o.unhinted,
                o.hinted,
                o.zero,
                o.cached,
                o.cpu_cached,
                o.freed_total
            )?;
        }
        let h = &self.hint;
        writeln!(
            f,
            "hinting: thread {}, {} passes, {} madvise calls, {} hinted in total, {} failures, {} panics",
            if h.thread_running { "on" } else { "off" },
            h.passes,
            h.madvise_calls,
            human(h.bytes_hinted_total),
            h.failures,
            h.panics
        )?;
        let c = &self.capture;
        write!(
            f,
            "capture: {} captures, {} waits, {} timeouts, {} reclaim rounds, {} reservations, {} waiting",
            c.captures, c.waits, c.timeouts, c.reclaim_rounds, c.reservations, c.waiting
        )?;
        let p = &self.pressure;
        if p.watching || p.events > 0 {
            write!(
                f,
                "\nmemory pressure: watching {}, under pressure {}, {} events, {} released",
                if p.watching { "on" } else { "off" },
                if p.under_pressure { "now" } else { "no" },
                p.events,
                human(p.bytes_released)
            )?;
        }
        Ok(())
    }
}
