//! Layer 2: one shard, a buddy allocator over the chunks it owns.
//!
//! A shard keeps, under one lock:
//! - per order and [`FreeClass`], a doubly linked list of free blocks threaded through the
//!   frame table, plus a bitmask per class of which orders have a non-empty list, so
//!   finding the smallest fitting block is one `trailing_zeros`;
//! - per order below the maximum, a small cache of freed blocks that are not merged
//!   ([`cache`]: Linux's per-CPU lists, which since 5.13 also cover the THP order);
//! - for the shared shard only, the range of chunks never handed out ("fresh"), whose frame
//!   entries have never been written;
//! - reserved regions, and per order one more list that holds the free pieces inside them,
//!   out of reach of allocation ([`reservation`]);
//! - isolated blocks, taken off the lists while someone works on them outside the lock
//!   ([`isolate`]).
//!
//! Unhinted blocks go to the head of their list and are taken from the head (hot first);
//! hinted and zero blocks go to the tail. Isolation takes cold blocks from the tail of the
//! unhinted lists. Under [`AllocPolicy::Fifo`] every class shares one queue per order.
//! Counters live beside the lock, one [`OrderCounters`] per order ([`counters`]).
//!
//! # What the shard knows
//! Buddy lists and counters only. It knows nothing of hinting or capture: a free that
//! merges into a block of at least [`Env::handoff_min_order`] while [`Env::waiting`] is
//! non-zero is offered to the layer above through the [`Handoff`] trait this module
//! defines, and a free that lists an unhinted block at or above the hint order is
//! reported by [`Locked::take_news`], for the layer above to act on after unlocking.
//!
//! Layer 2. May call: `frame_table`, `config`, `error`, `sync`.

use crate::config::AllocPolicy;
use crate::error::FreeError;
use crate::frame_table::{CLASSES, FrameIdx, FrameState, FrameTable, FreeClass, NIL, Owner};
use crate::sync::{AtomicUsize, Mutex, MutexGuard, Ordering};

mod audit;
mod cache;
mod counters;
mod isolate;
mod reservation;
mod resize;
mod vacant;

pub(crate) use audit::AuditCounts;
pub(crate) use counters::OrderCounters;
use counters::{DEC, bump};
pub(crate) use isolate::{Budget, Isolation};
use reservation::Reservations;

/// Orders with list heads: 0..=MAX_SUPPORTED_ORDER (smaller under loom, to keep models small).
pub(crate) const ORDERS: usize = crate::MAX_SUPPORTED_ORDER as usize + 1;
/// Every order below the maximum can have a cache of unmerged blocks.
pub(crate) const CACHE_ORDERS: usize = ORDERS;
/// The list, after the class lists, of free pieces inside reserved regions.
const RESERVED: usize = CLASSES;
/// The list of isolated blocks (neither free nor allocated), so that they can be found
/// again without walking the frame table: by the audit, and after `fork`, where the
/// thread that isolated them does not exist.
const ISOLATED: usize = CLASSES + 1;
/// Lists per order: one per class, then [`RESERVED`] and [`ISOLATED`].
const LISTS: usize = CLASSES + 2;

/// The later of two free times (ms stamps of `now_ms`, which wrap every 49 days; their
/// difference is exact up to 24.8 days, the longest hint delay a pool accepts).
#[inline]
pub(crate) fn later(a: u32, b: u32) -> u32 {
    if (b.wrapping_sub(a) as i32) > 0 { b } else { a }
}

/// Allocation preference for ordinary allocations.
pub(crate) const PREFER_RESIDENT: [FreeClass; CLASSES] =
    [FreeClass::Unhinted, FreeClass::Hinted, FreeClass::Zero];
/// Allocation preference for `alloc_zeroed`: a known-zero block needs no memset.
pub(crate) const PREFER_ZERO: [FreeClass; CLASSES] =
    [FreeClass::Zero, FreeClass::Unhinted, FreeClass::Hinted];

// === impl Shard ===

/// Which shard this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShardId {
    /// The shared pool of whole free chunks (and of chunks never handed out).
    Shared,
    /// A per-CPU shard.
    Local(usize),
}

impl ShardId {
    fn owner(self) -> Owner {
        match self {
            Self::Shared => Owner::Shared,
            Self::Local(i) => Owner::Shard(i),
        }
    }
}

/// The lists a shard's lock protects.
struct Lists {
    head: [[u32; LISTS]; ORDERS],
    tail: [[u32; LISTS]; ORDERS],
    /// Bit `order` of `nonempty[list]` is set when that list is not empty.
    nonempty: [u32; LISTS],
    cache_head: [u32; CACHE_ORDERS],
    cache_len: [u32; CACHE_ORDERS],
    /// Blocks in the cache, all orders.
    cached_blocks: u32,
    /// Chunks `fresh_next..fresh_end` were never handed out (shared shard only).
    fresh_next: u32,
    fresh_end: u32,
    /// Whole free chunks whose entries were given back (shared shard only; [`vacant`]).
    vacant: vacant::Vacant,
    /// Regions whose free pieces wait on the [`RESERVED`] list for a capture request.
    reservations: Reservations,
    /// What happened under the lock that the hinter may care about, not yet reported.
    news: FreeNews,
}

/// What frees did under one shard lock that the layer above may act on once it unlocks
/// (see [`Locked::take_news`]).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FreeNews {
    /// An unhinted block at or above the hint order was listed: it will turn cold.
    pub(crate) listed_hintable: bool,
    /// The shard's small-block cache went from empty to holding a block: its blocks turn
    /// cold too, and only a hinting pass merges them if nothing else does.
    pub(crate) cache_started: bool,
}

/// One buddy allocator. See the module docs.
pub(crate) struct Shard {
    id: ShardId,
    lists: Mutex<Lists>,
    pub(crate) counters: [OrderCounters; ORDERS],
}

/// What a shard operation needs from the pool around it.
#[derive(Clone, Copy)]
pub(crate) struct Env<'a> {
    pub(crate) table: &'a FrameTable,
    pub(crate) shared: &'a Shard,
    /// Requests waiting for a block (kept by the layer above). While it is non-zero, frees
    /// skip the cache and offer merged blocks through `handoff`; when it is zero the free
    /// path pays one relaxed load for the whole mechanism.
    pub(crate) waiting: &'a AtomicUsize,
    /// Smallest order a waiting request may want.
    pub(crate) handoff_min_order: u8,
    /// Takes merged blocks for waiting requests.
    pub(crate) handoff: &'a dyn Handoff,
    pub(crate) policy: AllocPolicy,
    pub(crate) max_order: u8,
    /// A listed unhinted block of at least this order is news for the layer above (see
    /// [`FreeNews::listed_hintable`]): the hint order, or 0 when every free counts.
    pub(crate) news_min_order: u8,
    /// Blocks each order's cache may hold (0: no cache).
    pub(crate) cache_limits: &'a [u32; ORDERS],
    pub(crate) keep_chunks: u32,
}

impl Shard {
    /// A shard with empty lists. The shared shard starts with `fresh_chunks` never-used
    /// chunks, counted as free known-zero blocks of `max_order`.
    pub(crate) fn new(id: ShardId, fresh_chunks: u32, max_order: u8) -> Self {
        let shard = Self {
            id,
            lists: Mutex::new(Lists {
                head: [[NIL; LISTS]; ORDERS],
                tail: [[NIL; LISTS]; ORDERS],
                nonempty: [0; LISTS],
                cache_head: [NIL; CACHE_ORDERS],
                cache_len: [0; CACHE_ORDERS],
                cached_blocks: 0,
                fresh_next: 0,
                fresh_end: fresh_chunks,
                vacant: vacant::Vacant::default(),
                reservations: Reservations::default(),
                news: FreeNews::default(),
            }),
            counters: std::array::from_fn(|_| OrderCounters::default()),
        };
        let top = &shard.counters[max_order as usize];
        top.freed.store(fresh_chunks as u64, Ordering::Relaxed);
        top.zero.store(fresh_chunks as u64, Ordering::Relaxed);
        shard
    }

    /// Takes the lock.
    #[inline]
    pub(crate) fn lock<'a>(&'a self, env: &'a Env<'a>) -> Locked<'a> {
        Locked {
            lists: self.lists.lock(),
            shard: self,
            env,
            handed_over: HandedOver {
                handoff: env.handoff,
                any: false,
            },
        }
    }

    /// Takes the lock and keeps it until the returned hold is dropped, without the
    /// operations of [`Locked`] (the fork handlers hold every lock across `fork`).
    #[cfg(not(any(loom, miri)))]
    pub(crate) fn hold(&self) -> ShardHold<'_> {
        ShardHold(self.lists.lock())
    }

    /// Whether the counters (read without the lock) show a free block of `order` and
    /// `class` (any class under FIFO). A hint: the caller still takes the lock to look.
    fn may_hold(&self, class: FreeClass, order: u8, policy: AllocPolicy) -> bool {
        let c = &self.counters[order as usize];
        match (policy, class) {
            (AllocPolicy::Fifo, _) => c.free() > 0,
            (_, FreeClass::Unhinted) => c.unhinted() > 0,
            (_, FreeClass::Hinted) => c.hinted.load(Ordering::Acquire) > 0,
            (_, FreeClass::Zero) => c.zero.load(Ordering::Acquire) > 0,
        }
    }

    /// Unhinted free blocks at or above the hint order, from the counters (no lock).
    pub(crate) fn unhinted_at_or_above(&self, min_order: u8, max_order: u8) -> u64 {
        (min_order..=max_order)
            .map(|o| self.counters[o as usize].unhinted())
            .sum()
    }
}

/// A shard lock held with nothing to do but release it; see `Shard::hold`.
#[cfg(not(any(loom, miri)))]
pub(crate) struct ShardHold<'a>(#[allow(dead_code)] MutexGuard<'a, Lists>);

/// A locked shard: every list operation goes through here.
pub(crate) struct Locked<'a> {
    /// Dropped first: the lock is released before `handed_over` acts.
    lists: MutexGuard<'a, Lists>,
    shard: &'a Shard,
    env: &'a Env<'a>,
    handed_over: HandedOver<'a>,
}

/// Whether a block was handed to a waiting request under the lock; if so, the request's
/// waiter is woken once the lock is released ([`Handoff::after_unlock`]), so that a waker
/// runs no code under a shard lock.
struct HandedOver<'a> {
    handoff: &'a dyn Handoff,
    any: bool,
}

impl Drop for HandedOver<'_> {
    fn drop(&mut self) {
        if self.any {
            self.handoff.after_unlock();
        }
    }
}

/// How a shard hands merged free blocks to requests waiting for them (capture). Defined
/// here, implemented by the layer above, called with the shard lock held.
pub(crate) trait Handoff: Sync {
    /// Offers the free block `(idx, order)`. If a waiting request fits, `claim(wanted)`
    /// marks the block's lower part of order `wanted` allocated, the request gets it, and
    /// `Some(wanted)` tells the shard to place the rest.
    fn offer(&self, idx: FrameIdx, order: u8, claim: &mut dyn FnMut(u8)) -> Option<u8>;
    /// Hands the block `(idx, order of the request)`, a reserved region that just became
    /// whole, to the request `ticket` if it still waits, after `claim` marks it allocated.
    fn offer_reserved(&self, ticket: u64, idx: FrameIdx, claim: &mut dyn FnMut()) -> bool;
    /// Called once the lock under which blocks were handed over is released: wakes the
    /// waiters that asked to be woken outside any shard lock (async ones).
    fn after_unlock(&self);
}

impl<'a> Locked<'a> {
    #[inline]
    fn counters(&self, order: u8) -> &'a OrderCounters {
        &self.shard.counters[order as usize]
    }

    /// What frees did since the last call that the hinter may care about: an unhinted block
    /// at or above the hint order was listed (by a free, a merge, a failed isolation coming
    /// back), or the small-block cache started filling. Clears the report.
    #[inline]
    pub(crate) fn take_news(&mut self) -> FreeNews {
        std::mem::take(&mut self.lists.news)
    }

    /// The shard this lock belongs to.
    #[inline]
    pub(crate) fn shard(&self) -> &'a Shard {
        self.shard
    }

    #[inline]
    fn list(&self, class: FreeClass) -> usize {
        match self.env.policy {
            AllocPolicy::PreferUnhinted => class as usize,
            AllocPolicy::Fifo => 0,
        }
    }

    // --- list primitives -------------------------------------------------------------

    /// The list a free block belongs on: [`RESERVED`] inside a reserved region, else its
    /// class's list.
    #[inline]
    fn list_of(&self, idx: FrameIdx, order: u8, class: FreeClass) -> usize {
        if self.lists.reservations.covers(idx, order) {
            RESERVED
        } else {
            self.list(class)
        }
    }

    /// Puts a free block on its list and counts it. Unhinted blocks go to the head
    /// (reused first) unless the policy is FIFO.
    fn push(&mut self, idx: FrameIdx, order: u8, class: FreeClass) {
        self.env.table.frame(idx).set(class.state(), order);
        let list = self.list_of(idx, order, class);
        self.link(idx, order, class, list);
        self.counters(order).entered(class);
    }

    /// Links a free block into `list` without counting it.
    fn link(&mut self, idx: FrameIdx, order: u8, class: FreeClass, list: usize) {
        let table = self.env.table;
        let o = order as usize;
        let frame = table.frame(idx);
        let to_tail = class != FreeClass::Unhinted || self.env.policy == AllocPolicy::Fifo;
        let lists = &mut *self.lists;
        if lists.head[o][list] == NIL {
            frame.set_next(NIL);
            frame.set_prev(NIL);
            lists.head[o][list] = idx.0;
            lists.tail[o][list] = idx.0;
            lists.nonempty[list] |= 1 << order;
        } else if to_tail {
            let tail = lists.tail[o][list];
            frame.set_prev(tail);
            frame.set_next(NIL);
            table.frame(FrameIdx(tail)).set_next(idx.0);
            lists.tail[o][list] = idx.0;
        } else {
            let head = lists.head[o][list];
            frame.set_next(head);
            frame.set_prev(NIL);
            table.frame(FrameIdx(head)).set_prev(idx.0);
            lists.head[o][list] = idx.0;
        }
    }

    /// Takes a free block off its list and uncounts it. Its frame keeps its old state
    /// until the caller writes a new one.
    fn unlink(&mut self, idx: FrameIdx, order: u8, class: FreeClass) {
        let list = self.list_of(idx, order, class);
        self.detach(idx, order, list);
        self.counters(order).left(class);
    }

    /// Takes a free block out of `list` without uncounting it.
    fn detach(&mut self, idx: FrameIdx, order: u8, list: usize) {
        let table = self.env.table;
        let o = order as usize;
        let frame = table.frame(idx);
        let (prev, next) = (frame.prev(), frame.next());
        let lists = &mut *self.lists;
        if prev == NIL {
            lists.head[o][list] = next;
        } else {
            table.frame(FrameIdx(prev)).set_next(next);
        }
        if next == NIL {
            lists.tail[o][list] = prev;
        } else {
            table.frame(FrameIdx(next)).set_prev(prev);
        }
        if lists.head[o][list] == NIL {
            lists.nonempty[list] &= !(1 << order);
        }
    }

    /// The smallest order >= `order` whose list `list` is non-empty.
    #[inline]
    fn smallest_nonempty(&self, list: usize, order: u8) -> Option<u8> {
        let mask = self.lists.nonempty[list] >> order << order;
        (mask != 0).then(|| mask.trailing_zeros() as u8)
    }

    /// Moves one never-used chunk into the zero list (shared shard only). Its counters
    /// already include it.
    fn materialize_fresh(&mut self) -> bool {
        if self.lists.fresh_next >= self.lists.fresh_end {
            return false;
        }
        let chunk = crate::frame_table::ChunkIdx(self.lists.fresh_next);
        self.lists.fresh_next += 1;
        let max = self.env.max_order;
        let head = chunk.head(max);
        // `push` counts the block, but fresh chunks were counted at build: uncount it
        // first, so a lock-free reader never sees it counted twice (`stats()` over capacity).
        let top = self.counters(max);
        bump(&top.freed, DEC);
        bump(&top.zero, DEC);
        self.push(head, max, FreeClass::Zero);
        true
    }

    /// Takes a free block of at least `order` and of `class` (any class under FIFO) from
    /// this shard's buddy lists, without splitting. Returns it with its order and class.
    fn take_free(&mut self, order: u8, class: FreeClass) -> Option<(FrameIdx, u8, FreeClass)> {
        let list = self.list(class);
        loop {
            if let Some(o) = self.smallest_nonempty(list, order) {
                let idx = FrameIdx(self.lists.head[o as usize][list]);
                let class = self
                    .env
                    .table
                    .frame(idx)
                    .state()
                    .free_class()
                    .expect("listed block is free");
                self.unlink(idx, o, class);
                return Some((idx, o, class));
            }
            // Vacant chunks before fresh ones: reusing what was used keeps the touched
            // part of the region (and of the frame table) small.
            let fresh_fits = class == FreeClass::Zero || self.env.policy == AllocPolicy::Fifo;
            if !(self.materialize_vacant(class) || fresh_fits && self.materialize_fresh()) {
                return None;
            }
        }
    }

    /// Splits the free block `(idx, from)` down to `to`, putting the upper halves back
    /// on the lists with the same class. Returns the lower block's head.
    fn split(&mut self, idx: FrameIdx, from: u8, to: u8, class: FreeClass) -> FrameIdx {
        let since = self.env.table.frame(idx).since();
        for order in (to..from).rev() {
            let upper = idx.plus(1 << order);
            self.env.table.frame(upper).set_since(since);
            self.push(upper, order, class);
        }
        idx
    }

    fn mark_allocated(&self, idx: FrameIdx, order: u8) {
        self.env.table.frame(idx).set(FrameState::Allocated, order);
        bump(&self.counters(order).allocated, 1);
    }

    // --- allocation --------------------------------------------------------------------

    /// Allocates from this shard: the small-block cache, then for each class in order of
    /// preference this shard's lists and then a whole chunk of that class from the shared
    /// pool. Returns the block and the class it had while free.
    #[inline]
    pub(crate) fn alloc(
        &mut self,
        order: u8,
        prefs: &[FreeClass; CLASSES],
    ) -> Option<(FrameIdx, FreeClass)> {
        if prefs[0] != FreeClass::Zero
            && let Some(idx) = self.cache_pop(order)
        {
            self.mark_allocated(idx, order);
            return Some((idx, FreeClass::Unhinted));
        }
        self.alloc_lists(order, prefs, true)
    }

    /// Like [`alloc`](Self::alloc) without the cache, and looking into the shared pool
    /// under its lock even when its counters say it is empty: the last resort before an
    /// allocation fails.
    pub(crate) fn alloc_thorough(
        &mut self,
        order: u8,
        prefs: &[FreeClass; CLASSES],
    ) -> Option<(FrameIdx, FreeClass)> {
        self.alloc_lists(order, prefs, false)
    }

    /// For each class in order of preference: this shard's lists, then a whole chunk of
    /// that class from the shared pool (skipped when `check_counters` and the shared
    /// pool's counters say it has none).
    fn alloc_lists(
        &mut self,
        order: u8,
        prefs: &[FreeClass; CLASSES],
        check_counters: bool,
    ) -> Option<(FrameIdx, FreeClass)> {
        // FIFO keeps one queue per order, so one round covers every class.
        let classes = if self.env.policy == AllocPolicy::Fifo {
            &prefs[..1]
        } else {
            &prefs[..]
        };
        for &class in classes {
            if let Some(found) = self.alloc_class(order, class) {
                return Some(found);
            }
            if self.shard.id != ShardId::Shared && self.refill(class, check_counters) {
                return self.alloc_class(order, class);
            }
        }
        None
    }

    fn alloc_class(&mut self, order: u8, class: FreeClass) -> Option<(FrameIdx, FreeClass)> {
        let (idx, from, class) = self.take_free(order, class)?;
        let idx = self.split(idx, from, order, class);
        self.mark_allocated(idx, order);
        Some((idx, class))
    }

    /// Moves one whole free chunk of `class` (any class under FIFO) from the shared pool
    /// into this shard.
    fn refill(&mut self, class: FreeClass, check_counters: bool) -> bool {
        let env = self.env;
        if check_counters && !env.shared.may_hold(class, env.max_order, env.policy) {
            return false; // a lock-free look saves taking the shared lock in vain
        }
        let mut shared = env.shared.lock(env);
        let Some((idx, order, class)) = shared.take_free(env.max_order, class) else {
            return false;
        };
        debug_assert_eq!(order, env.max_order);
        env.table
            .set_owner(idx.chunk(env.max_order), self.shard.id.owner());
        drop(shared);
        self.push(idx, order, class);
        true
    }

    // --- free --------------------------------------------------------------------------

    /// Checks that `idx` is the head of an allocated block and returns its order.
    pub(crate) fn allocated_order(&self, idx: FrameIdx) -> Result<u8, FreeError> {
        match self.env.table.frame(idx).get() {
            (FrameState::Allocated, order) => Ok(order),
            (FrameState::Interior, _) => Err(FreeError::NotBlockStart),
            _ => Err(FreeError::AlreadyFree),
        }
    }

    /// Frees an allocated block (validated by the caller).
    #[inline]
    pub(crate) fn free(&mut self, idx: FrameIdx, order: u8) {
        bump(&self.counters(order).allocated, DEC);
        let o = order as usize;
        let now = crate::sync::now_ms();
        // The one extra cost of capture when nobody waits: a relaxed load.
        let capture_waiting = self.env.waiting.load(Ordering::Relaxed) != 0;
        let limit = self.env.cache_limits[o];
        // The shared pool has no cache: nothing would drain it (it holds a block smaller than
        // a chunk only when capture took part of a chunk returning from the hinter).
        if limit > 0 && !capture_waiting && self.shard.id != ShardId::Shared {
            self.cache_push(idx, order, now);
            if self.lists.cache_len[o] > limit {
                // Merge the older half back so the cache keeps the hottest blocks.
                self.drain_cache_order(order, limit / 2);
            }
            return;
        }
        self.insert_free(idx, order, FreeClass::Unhinted, now);
    }

    /// Frees an allocated block (validated by the caller) straight into the buddy lists,
    /// as free since `since`: for blocks coming out of a cache above the shard.
    pub(crate) fn free_since(&mut self, idx: FrameIdx, order: u8, since: u32) {
        self.free_as(idx, order, FreeClass::Unhinted, since);
    }

    /// Frees an allocated block (validated by the caller) straight into the buddy lists as
    /// `class`: for blocks the layer above already advised the kernel about.
    pub(crate) fn free_as(&mut self, idx: FrameIdx, order: u8, class: FreeClass, since: u32) {
        bump(&self.counters(order).allocated, DEC);
        self.insert_free(idx, order, class, since);
    }

    /// Puts a free block that became free at `since` (ms, `now_ms`) into the buddy lists,
    /// merging it with free buddies first. A merged block is as warm as its warmest
    /// resident part: it keeps the latest `since` of its unhinted parts.
    pub(crate) fn insert_free(
        &mut self,
        mut idx: FrameIdx,
        mut order: u8,
        mut class: FreeClass,
        mut since: u32,
    ) {
        let table = self.env.table;
        while order < self.env.max_order {
            let buddy = idx.buddy(order);
            let (state, buddy_order) = table.frame(buddy).get();
            let Some(buddy_class) = state.free_class() else {
                break;
            };
            if buddy_order != order {
                break;
            }
            self.unlink(buddy, order, buddy_class);
            // Only resident parts have a meaningful free time (a hinted or zero part was
            // given back already, or never used: its stamp may be long stale).
            since = match (class, buddy_class) {
                (FreeClass::Unhinted, FreeClass::Unhinted) => {
                    later(since, table.frame(buddy).since())
                }
                (FreeClass::Unhinted, _) => since,
                (_, FreeClass::Unhinted) => table.frame(buddy).since(),
                _ => later(since, table.frame(buddy).since()),
            };
            class = class.merge(buddy_class);
            let (lower, upper) = if buddy < idx {
                (buddy, idx)
            } else {
                (idx, buddy)
            };
            table.frame(upper).set(FrameState::Interior, 0);
            idx = lower;
            order += 1;
        }
        self.place(idx, order, class, since);
    }

    /// Puts a merged free block where it belongs: to a waiting capture request, or on a
    /// list (and, for a whole surplus chunk, to the shared pool).
    fn place(&mut self, idx: FrameIdx, order: u8, class: FreeClass, since: u32) {
        let env = self.env;
        // A reserved region just became whole: it belongs to the request that reserved it,
        // if that one still waits. Either hand-off marks the block allocated before the
        // waiter can see it (see `capture`'s protocol); `carve` then places the rest.
        if let Some(region) = self.lists.reservations.take_within(idx, order)
            && env
                .handoff
                .offer_reserved(region.ticket, region.start, &mut || {
                    self.mark_allocated(region.start, region.order)
                })
        {
            self.handed_over.any = true;
            self.carve(idx, order, region.start, region.order, class, since);
            return;
        }
        if order >= env.handoff_min_order
            && env.waiting.load(Ordering::Relaxed) != 0
            && let Some(wanted) = env
                .handoff
                .offer(idx, order, &mut |wanted| self.mark_allocated(idx, wanted))
        {
            self.handed_over.any = true;
            self.carve(idx, order, idx, wanted, class, since);
            return;
        }
        env.table.frame(idx).set_since(since);
        self.push(idx, order, class);
        if class == FreeClass::Unhinted && order >= env.news_min_order {
            self.lists.news.listed_hintable = true;
        }
        if order == env.max_order && self.shard.id != ShardId::Shared {
            let whole = self.counters(order).free();
            if whole > env.keep_chunks as u64 {
                self.give_back(idx, class);
            }
        }
    }

    /// Places the rest of the free block `(idx, order)`, free since `since`, once its part
    /// `(target, target_order)` was handed to a waiter (and marked allocated), halving
    /// towards the target. The pieces are exactly as warm as the block they came from.
    fn carve(
        &mut self,
        idx: FrameIdx,
        order: u8,
        target: FrameIdx,
        target_order: u8,
        class: FreeClass,
        since: u32,
    ) {
        let mut at = idx;
        for o in (target_order..order).rev() {
            let upper = at.plus(1 << o);
            let rest = if target >= upper {
                std::mem::replace(&mut at, upper)
            } else {
                upper
            };
            self.place(rest, o, class, since);
        }
        debug_assert_eq!(at, target);
    }

    /// Moves a whole free chunk to the shared pool.
    fn give_back(&mut self, idx: FrameIdx, class: FreeClass) {
        let env = self.env;
        let max = env.max_order;
        self.unlink(idx, max, class);
        let mut shared = env.shared.lock(env);
        env.table.set_owner(idx.chunk(max), Owner::Shared);
        shared.push(idx, max, class);
    }
}
