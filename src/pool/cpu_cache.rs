//! Per-CPU caches of free blocks in front of the shards: Linux's per-CPU page lists, built
//! on per-CPU stacks (`percpu`: restartable sequences where the kernel and glibc provide
//! them, a per-CPU lock taken with one swap otherwise).
//!
//! An allocation pops a block of its order from the stack of the CPU it runs on, a free
//! pushes it there: no lock, and with restartable sequences no atomic read-modify-write
//! either. Only an empty or full stack goes to the shards, for half a stack at a time under
//! one lock.
//!
//! # Protocol
//! - A cached block is allocated as far as the shards know. Its frame entry says "cached
//!   on a CPU", written by the block's owner without a lock: the freeing thread before the
//!   push (after which the block is the cache's), the allocating thread after the pop.
//!   Every other reader treats it as "not free", so a raw double free of a cached block
//!   is refused, and no shard merges it.
//! - The caches are bounded in bytes per CPU ([`capacities`]), not only in blocks.
//! - They are bypassed while a capture request waits (frees must coalesce for it), and
//!   drained into the shards: before an allocation reports exhaustion, when a capture
//!   request publishes itself, by `drain_caches`, when the pool is dropped, and by the
//!   hinter when a CPU ran no cache operation for the hint delay, so no cold block escapes
//!   hinting. Draining another CPU's stacks stops that CPU's operations for the moment it
//!   takes (with restartable sequences, `membarrier` restarts one in flight).
//!
//! Explicit-shard allocations (`alloc_on`) and zeroed allocations that prefer known-zero
//! memory (2 MiB and up) go to the shards directly.

use crate::FRAME_SIZE;
use crate::config::CpuCacheMode;
use crate::frame_table::{FrameIdx, FrameState, FreeClass};
use crate::os::mapping::{Backing, MetaArray};
use crate::percpu::{CpuCacheImpl, PerCpuStacks, possible_cpus};
use crate::shard::{ORDERS, PREFER_RESIDENT};
use crate::sync::{AtomicU32, Ordering};

use super::PoolCore;

/// The most blocks of one order a CPU keeps.
const MAX_SLOTS: u32 = 64;

/// Blocks of one order moved between a stack and the shards at once: half a stack.
fn batch(capacity: usize) -> usize {
    (capacity / 2).max(1)
}

/// A CPU caches no block larger than its budget divided by this: 2 MiB of the default
/// 8 MiB. One block of every order up to a large `max_order` would take the whole budget
/// (32 MiB blocks: one of each order up to 4 MiB is 8 MiB), leaving one 4 KiB block where
/// the small orders need dozens: such a pool ran a random 4 KiB-2 MiB mix 2.3-2.5x slower
/// on one thread than with `max_order` 9, and slower on two threads than on one.
const LARGEST_CACHED_SHARE: usize = 4;

/// Blocks per CPU for each cached order, so that a CPU holds at most `bytes`: first one
/// block of each order, smallest first, while the budget allows (so even the largest
/// cached order is served without a lock), then what is left in equal shares per order,
/// at most [`MAX_SLOTS`] blocks each. Orders at and above `max_order` are not cached, nor
/// blocks above a [`LARGEST_CACHED_SHARE`] of the budget (order 0 always, if it fits);
/// trailing orders with no slot are dropped. No heap allocation: pools are built inside
/// `malloc` when they serve as the global allocator.
pub(crate) fn capacities(bytes: usize, max_order: u8) -> Capacities {
    let mut orders = max_order as usize;
    while orders > 1 && FRAME_SIZE << (orders - 1) > bytes / LARGEST_CACHED_SHARE {
        orders -= 1;
    }
    let mut all = [0u32; ORDERS];
    let caps = &mut all[..orders];
    let mut left = bytes;
    for (o, cap) in caps.iter_mut().enumerate() {
        let size = FRAME_SIZE << o;
        if left < size {
            break;
        }
        *cap = 1;
        left -= size;
    }
    if let Some(share) = left.checked_div(orders) {
        for (o, cap) in caps.iter_mut().enumerate() {
            if *cap > 0 {
                let more = (share >> o) / FRAME_SIZE;
                *cap = (*cap as usize + more).min(MAX_SLOTS as usize) as u32;
            }
        }
    }
    let len = caps.iter().position(|&c| c == 0).unwrap_or(orders);
    Capacities { all, len }
}

/// Per-order capacities, orders `0..len`.
#[derive(Debug)]
pub(crate) struct Capacities {
    all: [u32; ORDERS],
    len: usize,
}

impl std::ops::Deref for Capacities {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        &self.all[..self.len]
    }
}

// === impl CpuCaches ===

/// A pool's per-CPU caches; see the module docs.
pub(crate) struct CpuCaches {
    stacks: PerCpuStacks,
    /// Orders `0..orders` are cached.
    orders: u8,
    /// Per CPU, when the hinter last saw an operation there (`now_ms` stamps; 0: never).
    last_active: MetaArray<AtomicU32>,
}

impl CpuCaches {
    /// Caches of `bytes` per CPU for a pool of `capacity` bytes and `max_order`, or `None`
    /// when the mode is off or the budget holds no block.
    ///
    /// A CPU gets no more than every possible CPU's share of half the pool, so the caches
    /// cannot hold most of a small pool (their refills would move a large part of it at a
    /// time, and an allocation would often find the shards empty and drain every cache).
    pub(crate) fn new(
        mode: CpuCacheMode,
        bytes: usize,
        capacity: usize,
        max_order: u8,
        backing: Backing,
    ) -> std::io::Result<Option<Self>> {
        let want = match mode.resolve() {
            CpuCacheMode::Off => return Ok(None),
            CpuCacheMode::Portable => CpuCacheImpl::Portable,
            CpuCacheMode::Rseq | CpuCacheMode::Auto => CpuCacheImpl::Rseq,
        };
        let cpus = possible_cpus();
        let caps = capacities(bytes.min(capacity / 2 / cpus), max_order);
        if caps.is_empty() {
            return Ok(None);
        }
        let stacks = PerCpuStacks::with_cpus(&caps, cpus, want, backing)?;
        if mode.resolve() == CpuCacheMode::Rseq && stacks.implementation() != CpuCacheImpl::Rseq {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "restartable sequences (rseq) are not available to this process",
            ));
        }
        let last_active = MetaArray::new(stacks.cpus(), backing, true, |_| AtomicU32::new(0))?;
        Ok(Some(Self {
            orders: caps.len() as u8,
            stacks,
            last_active,
        }))
    }

    /// Whether blocks of `order` are cached.
    #[inline]
    pub(crate) fn holds(&self, order: u8) -> bool {
        order < self.orders
    }

    /// Orders `0..orders()` are cached.
    pub(crate) fn orders(&self) -> u8 {
        self.orders
    }

    /// Which implementation runs.
    pub(crate) fn implementation(&self) -> CpuCacheImpl {
        self.stacks.implementation()
    }

    /// Reopens CPUs that a thread of the parent was draining (or, portable, had locked) at
    /// the moment of a `fork`.
    ///
    /// # Safety
    /// Only in a child after `fork`, before any other thread exists.
    #[cfg(not(any(loom, miri)))]
    pub(crate) unsafe fn reopen_after_fork(&self) {
        // SAFETY: the caller's guarantee.
        unsafe { self.stacks.reopen_after_fork() };
    }

    /// Number of CPUs with a cache.
    pub(crate) fn cpus(&self) -> usize {
        self.stacks.cpus()
    }

    /// Blocks of `order` that `cpu` holds now (a racy snapshot, for statistics).
    pub(crate) fn blocks(&self, cpu: usize, order: u8) -> u64 {
        if self.holds(order) {
            self.stacks.len(cpu, order as usize) as u64
        } else {
            0
        }
    }

    /// Bytes `cpu` holds now (a racy snapshot).
    pub(crate) fn bytes(&self, cpu: usize) -> u64 {
        (0..self.orders)
            .map(|o| self.blocks(cpu, o) * (FRAME_SIZE << o) as u64)
            .sum()
    }
}

// === the pool's cached paths ===

impl PoolCore {
    /// Allocates a block of `order` from this CPU's cache, refilling it from the shards
    /// when empty. `None`: the cache does not serve this request (the caller allocates
    /// from the shards as usual).
    #[inline(always)]
    pub(crate) fn alloc_cached(&self, order: u8) -> Option<(FrameIdx, FreeClass)> {
        if order >= self.cached_orders || self.capture.has_waiters() {
            return None;
        }
        let cpu = self.cpu.as_ref()?;
        if let Some(item) = cpu.stacks.pop(order as usize) {
            let idx = FrameIdx(item as u32);
            // The block is ours now: nobody else writes its entry.
            self.table.frame(idx).set(FrameState::Allocated, order);
            return Some((idx, FreeClass::Unhinted));
        }
        self.refill(cpu, order)
    }

    /// The common case of [`alloc_cached`](Self::alloc_cached) only: a block popped from
    /// this CPU's stack by rseq. `None` whenever anything else is needed (call
    /// `alloc_cached` then). Makes no call, so a caller that inlines it and tail-calls the
    /// fallback runs without a stack frame: a dozen fewer instructions per allocation.
    #[inline(always)]
    pub(crate) fn alloc_cached_fast(&self, order: u8) -> Option<FrameIdx> {
        if self.capture.has_waiters() {
            return None;
        }
        // An order the caches do not hold has no stack: `pop` says `None`.
        let item = self.cpu.as_ref()?.stacks.fast()?.pop(order as usize)?;
        let idx = FrameIdx(item as u32);
        // The block is ours now: nobody else writes its entry.
        self.table.frame(idx).set(FrameState::Allocated, order);
        Some(idx)
    }

    /// Frees the block at `idx` into this CPU's cache by rseq if that is all it takes: its
    /// entry says "allocated" (of `order`, if given; the caller owns the block, so nobody
    /// else writes the entry) and the stack has room. Returns the block's order when done;
    /// `None` when the caller must take the full path (nothing changed then).
    #[inline(always)]
    pub(crate) fn free_cached_fast(&self, idx: FrameIdx, order: Option<u8>) -> Option<u8> {
        let frame = self.table.frame(idx);
        let actual = match order {
            Some(given) => frame.is(FrameState::Allocated, given).then_some(given)?,
            None => frame.order_if(FrameState::Allocated)?,
        };
        if actual >= self.cached_orders || self.capture.has_waiters() {
            return None;
        }
        let stacks = self.cpu.as_ref()?.stacks.fast()?;
        // The cache owns the block from the push on: mark it before.
        frame.set(FrameState::CpuCached, actual);
        if !stacks.push(actual as usize, idx.0 as u64) {
            self.unmark_cached(idx, actual);
            return None;
        }
        self.block_entered_cache();
        Some(actual)
    }

    /// After a free pushed a block into a cache: the hinter must come to look at it some
    /// time, and a capture request published meanwhile must get it.
    #[inline(always)]
    fn block_entered_cache(&self) {
        // A capture request published after the caller's check, whose drain of this CPU
        // ended before the push: its drain reopened the gate the push passed, so this load
        // sees the request, and the block goes to the shards, where it can merge for it
        // (see `policy::capture`, async). Free on x86; a load barrier elsewhere.
        crate::sync::fence(Ordering::Acquire);
        // One load on the usual path: a hinter pass is requested already nearly always.
        if !self.signal.is_requested() || self.capture.has_waiters() {
            self.after_cached_free();
        }
    }

    /// Undoes the mark of a block that did not enter the cache after all. Out of line, so
    /// that the fast path keeps no pointer to the entry alive across the push.
    #[cold]
    #[inline(never)]
    fn unmark_cached(&self, idx: FrameIdx, order: u8) {
        self.table.frame(idx).set(FrameState::Allocated, order);
    }

    /// The rare follow-ups of a free into a cache: wake the hinter on the way out of
    /// idle, and hand the caches to a capture request that arrived.
    #[cold]
    #[inline(never)]
    fn after_cached_free(&self) {
        self.note_cached();
        if self.capture.has_waiters() {
            self.drain_cpu_caches();
        }
    }

    /// An empty stack: takes a batch from the home shard under one lock, keeps the first
    /// block and caches the rest.
    #[cold]
    #[inline(never)]
    fn refill(&self, cpu: &CpuCaches, order: u8) -> Option<(FrameIdx, FreeClass)> {
        let want = batch(cpu.stacks.capacity(order as usize));
        let mut spare = [0u64; MAX_SLOTS as usize];
        let mut count = 0;
        let env = self.env();
        let mut shard = self.shards[self.home_shard()].lock(&env);
        let (first, class) = shard.alloc(order, &PREFER_RESIDENT)?;
        while count + 1 < want {
            let Some((idx, _)) = shard.alloc(order, &PREFER_RESIDENT) else {
                break;
            };
            self.table.frame(idx).set(FrameState::CpuCached, order);
            spare[count] = idx.0 as u64;
            count += 1;
        }
        self.unlock(shard);
        let pushed = cpu.stacks.push_batch(order as usize, &spare[..count]);
        if pushed < count {
            // The stack filled up meanwhile (or is being drained): give the rest back.
            self.free_cached(&spare[pushed..count], order, crate::sync::now_ms());
        }
        // Blocks now sit in a cache: make sure the hinter comes to look at them.
        self.note_cached();
        Some((first, class))
    }

    /// Frees the allocated block `(idx, order)` into this CPU's cache; `false` when the
    /// cache does not take it (the caller frees it to its shard).
    #[inline]
    pub(super) fn free_to_cache(&self, idx: FrameIdx, order: u8) -> bool {
        if order >= self.cached_orders || self.capture.has_waiters() {
            return false;
        }
        let Some(cpu) = &self.cpu else {
            return false;
        };
        let frame = self.table.frame(idx);
        // The cache owns the block from the push on: mark it before.
        frame.set(FrameState::CpuCached, order);
        if cpu.stacks.push(order as usize, idx.0 as u64).is_ok()
            || (self.spill(cpu, order) && cpu.stacks.push(order as usize, idx.0 as u64).is_ok())
        {
            self.block_entered_cache();
            return true;
        }
        frame.set(FrameState::Allocated, order);
        false
    }

    /// A block entered a per-CPU cache: the hinter must come to look at it some time.
    /// One relaxed load while a pass is requested already (the hinter keeps coming back
    /// while caches hold blocks; a pool nobody hints stays "requested"); a wake-up only on
    /// the way out of idle, or, with a resident budget, once per pass.
    #[inline]
    fn note_cached(&self) {
        // One load on the fast path: a pass is requested already nearly always.
        if !self.signal.is_requested() {
            self.note_cached_slow();
        }
    }

    #[cold]
    #[inline(never)]
    fn note_cached_slow(&self) {
        if self.config.resident_free_limit.is_some() {
            self.signal.request_urgent();
        } else {
            self.signal.request();
        }
    }

    /// A full stack: gives half of it back to the shards, where it merges (the most
    /// recently pushed half: a stack pops from the top). `false` when nothing could be taken
    /// (the CPU is stopped for a drain, or busy).
    #[cold]
    fn spill(&self, cpu: &CpuCaches, order: u8) -> bool {
        let mut out = [0u64; MAX_SLOTS as usize];
        let want = batch(cpu.stacks.capacity(order as usize));
        let taken = cpu.stacks.pop_batch(order as usize, &mut out[..want]);
        if taken.len == 0 {
            return false;
        }
        self.free_cached(&out[..taken.len], order, crate::sync::now_ms());
        true
    }

    /// Frees blocks taken out of a cache (their entries say "cached on a CPU") to their
    /// shards, as free since `since`, locking each owner once per run of blocks it owns.
    fn free_cached(&self, items: &[u64], order: u8, since: u32) {
        self.free_batch_since(
            items.iter().map(|&item| FrameIdx(item as u32)),
            order,
            FrameState::CpuCached,
            since,
        );
    }

    /// Drains `cpu`'s caches into the shards, the blocks free since `since`. `false` when
    /// the CPU could not be fenced (its caches stay as they are).
    fn drain_cpu(&self, cpu: &CpuCaches, index: usize, since: u32) -> bool {
        cpu.stacks.drain_cpu(index, |order, items| {
            self.free_cached(items, order as u8, since);
        })
    }

    /// Drains the calling CPU's caches into the shards; whether it held anything.
    pub(crate) fn drain_this_cpu_cache(&self) -> bool {
        let Some(cpu) = &self.cpu else {
            return false;
        };
        let index = crate::sync::current_cpu();
        index < cpu.cpus()
            && cpu.bytes(index) > 0
            && self.drain_cpu(cpu, index, crate::sync::now_ms())
    }

    /// Drains every CPU's caches into the shards (exhaustion, capture, `drain_caches`,
    /// drop).
    pub(crate) fn drain_cpu_caches(&self) {
        if let Some(cpu) = &self.cpu {
            let now = crate::sync::now_ms();
            for index in 0..cpu.cpus() {
                if cpu.bytes(index) > 0 {
                    self.drain_cpu(cpu, index, now);
                }
            }
        }
    }

    /// Drains every CPU's caches, empty-looking ones too: after a capture request is
    /// published, a free that did not see it may be pushing to any CPU (see
    /// `free_to_cache`), and only a drain of that CPU orders the push.
    pub(crate) fn drain_every_cpu_cache(&self) {
        if let Some(cpu) = &self.cpu {
            let now = crate::sync::now_ms();
            for index in 0..cpu.cpus() {
                self.drain_cpu(cpu, index, now);
            }
        }
    }

    /// The hinter's look at the caches: drains those of CPUs that ran no cache operation
    /// for `idle_ms` (all of them for `None`), as free since they were last seen active.
    /// Returns the milliseconds until a CPU still holding blocks could turn idle.
    pub(crate) fn release_idle_cpu_caches(&self, idle_ms: Option<u32>) -> Option<u32> {
        let cpu = self.cpu.as_ref()?;
        let Some(idle_ms) = idle_ms else {
            self.drain_cpu_caches();
            return None;
        };
        let now = crate::sync::now_ms();
        let mut next: Option<u32> = None;
        for index in 0..cpu.cpus() {
            let seen = &cpu.last_active[index];
            if cpu.stacks.take_activity(index) || seen.load(Ordering::Relaxed) == 0 {
                seen.store(now.max(1), Ordering::Relaxed);
            }
            let since = seen.load(Ordering::Relaxed);
            let idle_for = now.wrapping_sub(since);
            if idle_for > idle_ms {
                // Idle long enough: keep the stamp no older than that, so that ages stay
                // far from the 24-day horizon of wrapping millisecond stamps (a CPU that
                // never runs again would otherwise look active once the clock wraps).
                seen.store(now.wrapping_sub(idle_ms).max(1), Ordering::Relaxed);
            }
            if cpu.bytes(index) == 0 {
                continue;
            }
            if idle_for >= idle_ms {
                self.drain_cpu(cpu, index, since);
            } else {
                let wait = idle_ms - idle_for;
                next = Some(next.map_or(wait, |w| w.min(wait)));
            }
        }
        next
    }
}

impl PoolCore {
    /// Milliseconds since the hinter last saw any CPU use its cache (it looks at every
    /// pass, see [`release_idle_cpu_caches`](Self::release_idle_cpu_caches)). `None`
    /// without per-CPU caches, or before any CPU was seen active: activity unknown.
    pub(crate) fn cpu_caches_quiet_ms(&self, now: u32) -> Option<u32> {
        let cpu = self.cpu.as_ref()?;
        (0..cpu.cpus())
            .map(|index| cpu.last_active[index].load(Ordering::Relaxed))
            .filter(|&seen| seen != 0)
            // The youngest age; stamps are kept recent (see `release_idle_cpu_caches`),
            // and one ahead of `now` (a racing look) means active just now.
            .map(|seen| match now.wrapping_sub(seen) {
                age if age > i32::MAX as u32 => 0,
                age => age,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_stay_within_the_budget_and_reach_the_largest_order() {
        for (bytes, max_order) in [
            (8 << 20, 10),
            (16 << 20, 13),
            (1 << 20, 10),
            (4096, 3),
            (0, 10),
        ] {
            let caps = capacities(bytes, max_order);
            let total: usize = caps
                .iter()
                .enumerate()
                .map(|(o, &c)| c as usize * (FRAME_SIZE << o))
                .sum();
            assert!(
                total <= bytes,
                "{bytes} {max_order}: {caps:?} holds {total}"
            );
            assert!(caps.len() <= max_order as usize);
            assert!(
                caps.iter().all(|&c| (1..=MAX_SLOTS).contains(&c)),
                "{caps:?}"
            );
        }
        // The default budget caches 2 MiB blocks in a pool of 4 MiB chunks.
        assert_eq!(capacities(8 << 20, 10).len(), 10);
        assert!(capacities(0, 10).is_empty());
    }

    #[test]
    fn small_orders_keep_their_depth_whatever_the_largest_order() {
        for bytes in [1 << 20, 4 << 20, 8 << 20, 64 << 20] {
            let shallow = capacities(bytes, 10);
            for max_order in 10..=crate::MAX_SUPPORTED_ORDER {
                let caps = capacities(bytes, max_order);
                // No cached block above a quarter of the budget...
                let largest = FRAME_SIZE << (caps.len() - 1);
                assert!(
                    largest <= (bytes / 4).max(FRAME_SIZE),
                    "{bytes} {max_order}"
                );
                // ...so the small orders hold as many blocks as with 4 MiB chunks.
                assert_eq!(&caps[..4], &shallow[..4], "{bytes} {max_order}: {caps:?}");
            }
        }
        // 32 MiB blocks, the default budget: dozens of 4 KiB blocks, not one.
        assert_eq!(capacities(8 << 20, 13)[0], MAX_SLOTS);
    }
}
