//! Layer 4: the sharded pool. Picks a shard, balances between shards, routes frees to the
//! owner of a block's chunk, and wires the policies (hinting, capture) into the shards.
//!
//! [`PoolCore`] is the allocator without any thread or reference count, so it can live
//! inside a `static` (the global allocator); the front ends (`front`) wrap it.
//!
//! # Shard choice and balancing
//! An allocation locks the shard of the CPU it runs on (`sched_getcpu() % shards`, a hint:
//! the thread may move, which costs only locality). If that shard has no fitting block it
//! takes a whole chunk from the shared pool; if that is empty too, it drains its own cache
//! of small blocks and then visits every other shard in turn, allocating there directly.
//! So an allocation fails only after it saw every shard. A block always belongs to the
//! shard that owns its chunk, whoever allocated it, and a free goes back there from any
//! thread. A shard that merges more than `keep_chunks` whole free chunks gives the surplus
//! back to the shared pool.
//!
//! Files: [`alloc`] (allocation, frees, in-place resize), [`wait`] (capture waits),
//! [`hinting`] (the pool as the hinter's target), [`stats`], [`audit`] (the consistency
//! check, off the hot path), [`registry`] (the process's pools: fork handlers, and the one
//! [`hinter`] thread that serves them all), [`fork_hold`] (what a pool holds across
//! `fork`), [`pressure`] (the memory pressure watcher, one thread for the process too),
//! [`background`] (how the global allocator tells those two threads apart).
//!
//! Lock order: a shard, then the shared pool; a shard, then the capture queue, then a
//! request. No code holds two per-CPU shards' locks except the audit, which takes them in
//! index order. The hinter's wake-up lock is taken with no shard lock held.
//!
//! Layer 4. May call: `policy`, `shard`, `frame_table`, `config`, `error`, `os`, `sync`.

use std::ptr::NonNull;

use crossbeam_utils::CachePadded;

use crate::config::{PoolBuilder, Resolved};
use crate::error::{BuildError, FreeError};
use crate::frame_table::{FrameIdx, FrameTable, FreeClass, Owner};
use crate::os::advice::{self, Advisor};
use crate::os::mapping::{MetaArray, Region};
use crate::policy::capture::CaptureRegistry;
use crate::policy::hint::{HintCounters, HintSignal};
use crate::shard::{Env, FreeNews, Locked, Shard, ShardId};
use crate::sync::Ordering;
use crate::{FRAME_SHIFT, FRAME_SIZE};

mod alloc;
mod audit;
pub(crate) mod background;
pub(crate) mod client;
pub(crate) mod cpu_cache;
pub(crate) mod evict;
#[cfg(not(any(loom, miri)))]
mod fork_hold;
mod hinter;
mod hinting;
pub(crate) mod pressure;
pub(crate) mod registry;
pub(crate) mod release;
pub(crate) mod stats;
pub(crate) mod wait;

pub(crate) use stats::Stats;

/// Unique pool ids, so a [`Block`] from another pool is recognised.
static NEXT_POOL_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

// === impl PoolCore ===

/// The allocator proper: region, frame table, shards, capture queue, hint signal.
pub(crate) struct PoolCore {
    id: u32,
    /// Unmapped on drop only when no block is allocated: see `impl Drop for PoolCore`.
    region: std::mem::ManuallyDrop<Region>,
    table: FrameTable,
    shards: MetaArray<CachePadded<Shard>>,
    shared: CachePadded<Shard>,
    pub(crate) capture: CaptureRegistry,
    pub(crate) signal: HintSignal,
    pub(crate) hint_counters: HintCounters,
    advisor: &'static dyn Advisor,
    pub(crate) config: PoolBuilder,
    pub(crate) resolved: Resolved,
    /// Blocks each order's small-block cache may hold.
    cache_limits: [u32; crate::shard::ORDERS],
    /// Per-CPU caches in front of the shards, unless switched off.
    pub(crate) cpu: Option<cpu_cache::CpuCaches>,
    /// Orders `0..cached_orders` go through the per-CPU caches (0 without them): one
    /// compare on the fast paths.
    cached_orders: u8,
    /// The process is under memory pressure: hint with `MADV_DONTNEED`.
    under_pressure: std::sync::atomic::AtomicBool,
    /// What the memory pressure watcher did to this pool (see [`pressure`]).
    pub(crate) pressure: pressure::PressureCounters,
    /// When an allocation about to fail last drained every per-CPU cache (`now_ms`).
    last_exhaustion_drain: crate::sync::AtomicU32,
    /// Its place in the process's registry of pools.
    pub(crate) entry: registry::Entry,
    /// The layer above that keeps some of its memory, if any (see [`client`]).
    client: std::sync::OnceLock<&'static dyn client::Client>,
    /// The locks the fork handlers hold across `fork` (see [`fork_hold`]).
    #[cfg(not(any(loom, miri)))]
    fork_holds: fork_hold::ForkHolds,
}

impl PoolCore {
    /// Sets up a pool. Allocates nothing through the global allocator when the backing is
    /// `Mmap`: region, frame table and shards all come from `mmap`.
    pub(crate) fn new(config: &PoolBuilder) -> Result<Self, BuildError> {
        let resolved = config.resolve()?;
        let chunk = FRAME_SIZE << resolved.max_order;
        let region = Region::new(resolved.capacity, chunk, config.backing, config.huge_pages)
            .map_err(BuildError::Map)?;
        let table = FrameTable::new(resolved.chunks, resolved.max_order, config.backing)
            .map_err(BuildError::Map)?;
        let shards = MetaArray::new(resolved.shards, config.backing, false, |i| {
            CachePadded::new(Shard::new(ShardId::Local(i), 0, resolved.max_order))
        })
        .map_err(BuildError::Map)?;
        let cpu = cpu_cache::CpuCaches::new(
            config.cpu_cache,
            config.cpu_cache_bytes,
            resolved.capacity,
            resolved.max_order,
            config.backing,
        )
        .map_err(BuildError::Map)?;
        let advisor: &'static dyn Advisor = match (config.hint.advisor, region.is_mapped()) {
            (Some(advisor), _) => advisor,
            (None, true) => &advice::OS_ADVISOR,
            (None, false) => &advice::HEAP_ADVISOR,
        };
        Ok(Self {
            id: NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            shared: CachePadded::new(Shard::new(
                ShardId::Shared,
                resolved.chunks,
                resolved.max_order,
            )),
            region: std::mem::ManuallyDrop::new(region),
            table,
            shards,
            capture: CaptureRegistry::new(config.capture, resolved.capture_min_order),
            signal: HintSignal::new(config.hint.high_water, &registry::registry().doorbell),
            hint_counters: HintCounters::default(),
            advisor,
            config: *config,
            resolved,
            cache_limits: cache_limits(config.cache_blocks, resolved.max_order),
            cached_orders: cpu.as_ref().map_or(0, |c| c.orders()),
            last_exhaustion_drain: crate::sync::AtomicU32::new(0),
            under_pressure: std::sync::atomic::AtomicBool::new(false),
            pressure: pressure::PressureCounters::default(),
            cpu,
            entry: registry::Entry::new(),
            client: std::sync::OnceLock::new(),
            #[cfg(not(any(loom, miri)))]
            fork_holds: fork_hold::ForkHolds::new(resolved.shards + 1, config.backing)
                .map_err(BuildError::Map)?,
        })
    }

    #[inline]
    pub(crate) fn env(&self) -> Env<'_> {
        Env {
            table: &self.table,
            shared: &self.shared,
            waiting: self.capture.waiting_counter(),
            handoff_min_order: self.capture.min_order(),
            handoff: &self.capture,
            policy: self.config.policy,
            max_order: self.resolved.max_order,
            news_min_order: if self.config.resident_free_limit.is_some() {
                0
            } else {
                self.resolved.hint_min_order
            },
            cache_limits: &self.cache_limits,
            keep_chunks: self.config.keep_chunks,
        }
    }

    #[inline]
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    #[inline]
    pub(crate) fn table(&self) -> &FrameTable {
        &self.table
    }

    /// The smallest order the hinter gives back.
    #[inline]
    pub(crate) fn hint_min_order(&self) -> u8 {
        self.resolved.hint_min_order
    }

    #[inline]
    pub(crate) fn max_order(&self) -> u8 {
        self.resolved.max_order
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard for the calling thread.
    #[inline]
    fn home_shard(&self) -> usize {
        let n = self.shards.len();
        if n == 1 {
            return 0;
        }
        crate::sync::current_cpu() % n
    }

    /// The shard that owns a chunk.
    #[inline]
    fn shard_of(&self, owner: Owner) -> &Shard {
        match owner {
            Owner::Shard(i) => &self.shards[i],
            Owner::Shared => &self.shared,
        }
    }

    #[inline]
    pub(crate) fn frame_ptr(&self, idx: FrameIdx) -> NonNull<u8> {
        // SAFETY: every frame index the pool hands around is below `table.len()`, so the
        // offset stays inside the region.
        unsafe { self.region.base().add((idx.0 as usize) << FRAME_SHIFT) }
    }

    /// The frame a block pointer starts at.
    #[inline]
    pub(crate) fn frame_of(&self, ptr: *const u8) -> Result<FrameIdx, FreeError> {
        let offset = self.region.offset_of(ptr).ok_or(FreeError::OutsideRegion)?;
        if offset & (FRAME_SIZE - 1) != 0 {
            return Err(FreeError::NotBlockStart);
        }
        Ok(FrameIdx((offset >> FRAME_SHIFT) as u32))
    }

    /// The frame of a block this pool handed out (a [`Block`](crate::Block) says so):
    /// no bounds check.
    #[inline]
    pub(crate) fn frame_of_own(&self, ptr: *const u8) -> FrameIdx {
        let offset = (ptr as usize).wrapping_sub(self.region.base().as_ptr() as usize);
        debug_assert!(self.region.offset_of(ptr).is_some());
        FrameIdx((offset >> FRAME_SHIFT) as u32)
    }

    /// Whether `ptr` lies inside the region.
    #[inline]
    pub(crate) fn contains(&self, ptr: *const u8) -> bool {
        self.region.offset_of(ptr).is_some()
    }

    // --- stats and audit ---------------------------------------------------------------

    /// All shards, the shared pool last.
    pub(crate) fn all_shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards
            .iter()
            .map(|s| &**s)
            .chain(std::iter::once(&*self.shared))
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats::collect(self)
    }
}

/// `blocks` per order up to order 3, halving with each order above (at least one), none at
/// the maximum order: a shard caches at most about 9 MiB with the defaults.
fn cache_limits(blocks: u32, max_order: u8) -> [u32; crate::shard::ORDERS] {
    std::array::from_fn(|order| match order {
        _ if blocks == 0 || order >= max_order as usize => 0,
        0..=3 => blocks,
        _ => (blocks >> (order - 3)).max(1),
    })
}

impl Drop for PoolCore {
    fn drop(&mut self) {
        // Cached blocks are free: count and release them as such.
        self.drain_cpu_caches();
        let allocated: u64 = self
            .all_shards()
            .flat_map(|s| s.counters.iter())
            .map(|c| c.allocated.load(Ordering::Acquire) + c.in_flight.load(Ordering::Acquire))
            .sum();
        if allocated == 0 {
            // SAFETY: dropped once, here, and nothing refers into the region any more: no
            // block is allocated, and the pool itself is going away.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.region) };
        } else {
            // Live `Block`s still point into the region. They are safe handles, so their
            // memory must stay valid: the region is leaked instead of unmapped, but every
            // free byte of it goes back to the OS.
            self.release_free_memory();
        }
    }
}

impl PoolCore {
    /// Gives every resident free range back with `MADV_DONTNEED` (for a pool dropped with
    /// live blocks, whose region stays mapped for them). Walks the chunks ever handed out,
    /// block by block, and advises each run of adjacent free blocks at once.
    fn release_free_memory(&self) {
        use crate::frame_table::{ChunkIdx, FrameState as S};
        let max = self.resolved.max_order;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut run: Option<(u32, u32)> = None; // first frame, frames
        for chunk in 0..self.table.chunks() {
            let mut idx = ChunkIdx(chunk).head(max);
            let end = idx.plus(1 << max);
            // A vacant chunk's head is blank; one vacant as hinted may still be resident.
            let vacant = self.table.vacant_class(ChunkIdx(chunk));
            if self.table.frame(idx).state() == S::Interior && vacant != Some(FreeClass::Hinted) {
                continue; // never handed out, or vacant and zero: nothing resident
            }
            while idx < end {
                let (state, order) = match vacant {
                    Some(_) => (S::Hinted, max),
                    None => self.table.frame(idx).get(),
                };
                let resident_free = matches!(state, S::Unhinted | S::Hinted | S::Cached);
                match (&mut run, resident_free) {
                    (Some((start, len)), true) if *start + *len == idx.0 => *len += 1 << order,
                    (_, true) => {
                        if let Some((start, len)) = run.replace((idx.0, 1 << order)) {
                            runs.push((start as usize, len as usize));
                        }
                    }
                    (_, false) => {
                        if let Some((start, len)) = run.take() {
                            runs.push((start as usize, len as usize));
                        }
                    }
                }
                idx = idx.plus(1 << order);
            }
        }
        runs.extend(run.map(|(start, len)| (start as usize, len as usize)));
        let ranges: Vec<(usize, usize)> = runs
            .iter()
            .map(|&(start, len)| {
                (
                    self.frame_ptr(FrameIdx(start as u32)).as_ptr() as usize,
                    len << FRAME_SHIFT,
                )
            })
            .collect();
        for batch in ranges.chunks(64) {
            let mut ok = [false; 64];
            // A failing advisor leaves memory resident, nothing worse; a panicking one must
            // not unwind out of `drop`.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.advisor.advise(
                    batch,
                    crate::config::HintMode::DontNeed,
                    &mut ok[..batch.len()],
                )
            }));
        }
    }
}

impl PoolCore {
    /// Unlocks `shard` and, if anything it did listed an unhinted block at or above the
    /// hint order, wakes the hinter when the shard now holds enough of them. The shard only
    /// reports; the pool decides, and the hinter's wake-up lock is never taken under a
    /// shard lock.
    #[inline]
    pub(crate) fn unlock(&self, mut locked: Locked<'_>) {
        let news = locked.take_news();
        let shard = locked.shard();
        drop(locked);
        if (news.listed_hintable || news.cache_started) && self.signal.listening() {
            self.note_news(shard, news);
        }
    }

    #[cold]
    fn note_news(&self, shard: &Shard, news: FreeNews) {
        if self.config.resident_free_limit.is_some() {
            // With a resident budget every free counts against it, now.
            self.signal.request_urgent();
        } else if news.cache_started {
            // Cached blocks are not counted as unhinted, only a pass merges them.
            self.signal.request();
        } else {
            let unhinted =
                shard.unhinted_at_or_above(self.resolved.hint_min_order, self.resolved.max_order);
            self.signal.note_unhinted(unhinted);
        }
    }
}
