//! One shard: a buddy allocator over the chunks it owns.
//!
//! A shard keeps, under one lock:
//! - per order and [`FreeClass`], a doubly linked list of free blocks threaded through the
//!   frame table, plus a bitmask per class of which orders have a non-empty list, so
//!   finding the smallest fitting block is one `trailing_zeros`;
//! - per order below the maximum, a small cache of freed blocks that are not merged (Linux's
//!   per-CPU lists, which since 5.13 also cover the THP order): a free followed by an
//!   allocation of the same size touches one list head instead of merging and splitting;
//! - for the shared shard only, the range of chunks never handed out ("fresh"), whose frame
//!   entries have never been written;
//! - the regions reserved for waiting capture requests, and per order one more list that
//!   holds the free pieces inside them, out of reach of allocation (see [`reservation`]).
//!
//! Unhinted blocks go to the head of their list and are taken from the head (hot first);
//! hinted and zero blocks go to the tail. The hinter takes cold blocks from the tail of the
//! unhinted lists. Under [`AllocPolicy::Fifo`] every class shares one queue per order.
//!
//! Counters live beside the lock, one [`OrderCounters`] per order. Only the lock holder
//! writes them (a relaxed load and a release store, no read-modify-write), and anyone
//! reads them without the lock.

use crate::capture::CaptureRegistry;
use crate::config::AllocPolicy;
use crate::error::FreeError;
use crate::frame_table::{CLASSES, FrameIdx, FrameState, FrameTable, FreeClass, NIL, Owner};
use crate::hint::HintSignal;
use crate::sync::{AtomicU64, Mutex, MutexGuard, Ordering};

mod reservation;

use reservation::Reservations;

/// Orders with list heads: 0..=MAX_SUPPORTED_ORDER (smaller under loom, to keep models small).
pub(crate) const ORDERS: usize = crate::MAX_SUPPORTED_ORDER as usize + 1;
/// Every order below the maximum can have a cache of unmerged blocks.
pub(crate) const CACHE_ORDERS: usize = ORDERS;
/// The list, after the class lists, of free pieces inside capture reservations.
const RESERVED: usize = CLASSES;
/// Lists per order: one per class, then [`RESERVED`].
const LISTS: usize = CLASSES + 1;

/// Allocation preference for ordinary allocations.
pub(crate) const PREFER_RESIDENT: [FreeClass; CLASSES] =
    [FreeClass::Unhinted, FreeClass::Hinted, FreeClass::Zero];
/// Allocation preference for `alloc_zeroed`: a known-zero block needs no memset.
pub(crate) const PREFER_ZERO: [FreeClass; CLASSES] =
    [FreeClass::Zero, FreeClass::Unhinted, FreeClass::Hinted];

// === impl OrderCounters ===

/// Lock-free counters of one order in one shard.
///
/// `freed` and `bound` are monotonic, as in the seed: `freed` counts blocks that entered
/// this order's free lists or cache, `bound` those that left (allocated, split, merged,
/// isolated). Their difference is the free count, and a reader holding an older `freed`
/// knows how many blocks were freed since. The rest are gauges.
#[derive(Default)]
pub(crate) struct OrderCounters {
    pub(crate) freed: AtomicU64,
    pub(crate) bound: AtomicU64,
    /// Free blocks that are hinted.
    pub(crate) hinted: AtomicU64,
    /// Free blocks known to be zero.
    pub(crate) zero: AtomicU64,
    /// Free blocks in the small-block cache (counted in `freed - bound` too).
    pub(crate) cached: AtomicU64,
    /// Blocks handed out.
    pub(crate) allocated: AtomicU64,
    /// Blocks isolated by the hinter.
    pub(crate) in_flight: AtomicU64,
}

/// Adds `delta` (wrapping, so `u64::MAX` subtracts one). Only the shard's lock holder
/// writes, so a load and a store replace a locked read-modify-write.
#[inline]
fn bump(counter: &AtomicU64, delta: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(delta),
        Ordering::Release,
    );
}

const DEC: u64 = u64::MAX;

impl OrderCounters {
    fn entered(&self, class: FreeClass) {
        bump(&self.freed, 1);
        match class {
            FreeClass::Unhinted => {}
            FreeClass::Hinted => bump(&self.hinted, 1),
            FreeClass::Zero => bump(&self.zero, 1),
        }
    }

    fn left(&self, class: FreeClass) {
        match class {
            FreeClass::Unhinted => {}
            FreeClass::Hinted => bump(&self.hinted, DEC),
            FreeClass::Zero => bump(&self.zero, DEC),
        }
        bump(&self.bound, 1);
    }

    /// A consistent-enough free count: `bound` is read first, and `freed` never trails it.
    pub(crate) fn free(&self) -> u64 {
        let bound = self.bound.load(Ordering::Acquire);
        let freed = self.freed.load(Ordering::Acquire);
        freed.saturating_sub(bound)
    }

    /// Free blocks that are resident and neither cached nor hinted nor zero.
    pub(crate) fn unhinted(&self) -> u64 {
        let other = self.hinted.load(Ordering::Acquire)
            + self.zero.load(Ordering::Acquire)
            + self.cached.load(Ordering::Acquire);
        self.free().saturating_sub(other)
    }
}

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
    /// Chunks `fresh_next..fresh_end` were never handed out (shared shard only).
    fresh_next: u32,
    fresh_end: u32,
    /// Regions whose free pieces wait on the [`RESERVED`] list for a capture request.
    reservations: Reservations,
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
    pub(crate) capture: &'a CaptureRegistry,
    pub(crate) hint: &'a HintSignal,
    pub(crate) policy: AllocPolicy,
    pub(crate) max_order: u8,
    pub(crate) hint_min_order: u8,
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
                fresh_next: 0,
                fresh_end: fresh_chunks,
                reservations: Reservations::default(),
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
        }
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

/// A locked shard: every list operation goes through here.
pub(crate) struct Locked<'a> {
    lists: MutexGuard<'a, Lists>,
    shard: &'a Shard,
    env: &'a Env<'a>,
}

/// Why the hinter should come back later.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Isolation {
    /// Blocks taken.
    pub(crate) blocks: usize,
    /// Milliseconds until the next candidate turns cold, if some were too warm.
    pub(crate) next_cold_in: Option<u32>,
}

impl<'a> Locked<'a> {
    #[inline]
    fn counters(&self, order: u8) -> &'a OrderCounters {
        &self.shard.counters[order as usize]
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
            let fresh_fits = class == FreeClass::Zero || self.env.policy == AllocPolicy::Fifo;
            if !(fresh_fits && self.materialize_fresh()) {
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

    // --- the small-block cache ---------------------------------------------------------

    #[inline]
    fn cache_pop(&mut self, order: u8) -> Option<FrameIdx> {
        let o = order as usize;
        if self.lists.cache_head[o] == NIL {
            return None;
        }
        let idx = FrameIdx(self.lists.cache_head[o]);
        self.lists.cache_head[o] = self.env.table.frame(idx).next();
        self.lists.cache_len[o] -= 1;
        let c = self.counters(order);
        bump(&c.cached, DEC);
        bump(&c.bound, 1);
        Some(idx)
    }

    fn cache_push(&mut self, idx: FrameIdx, order: u8) {
        let o = order as usize;
        let frame = self.env.table.frame(idx);
        frame.set(FrameState::Cached, order);
        frame.set_next(self.lists.cache_head[o]);
        self.lists.cache_head[o] = idx.0;
        self.lists.cache_len[o] += 1;
        let c = self.counters(order);
        bump(&c.freed, 1);
        bump(&c.cached, 1);
    }

    /// Merges cached blocks back into the buddy lists: `keep` per order stay cached.
    pub(crate) fn drain_cache(&mut self, keep: u32) {
        for order in 0..self.env.max_order {
            while self.lists.cache_len[order as usize] > keep {
                let idx = self.cache_pop(order).expect("cache length says non-empty");
                self.insert_free(idx, order, FreeClass::Unhinted);
            }
        }
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
        // The one extra cost of capture when nobody waits: a relaxed load.
        let capture_waiting = self.env.capture.has_waiters();
        let limit = self.env.cache_limits[o];
        // The shared pool has no cache: nothing would drain it (it holds a block smaller than
        // a chunk only when capture took part of a chunk returning from the hinter).
        if limit > 0 && !capture_waiting && self.shard.id != ShardId::Shared {
            self.cache_push(idx, order);
            if self.lists.cache_len[o] > limit {
                // Merge the older half back so the cache keeps the hottest blocks.
                self.drain_cache_order(order, limit / 2);
            }
            return;
        }
        self.insert_free(idx, order, FreeClass::Unhinted);
    }

    fn drain_cache_order(&mut self, order: u8, keep: u32) {
        // The list is LIFO: skip the `keep` hottest and merge the rest.
        let table = self.env.table;
        let o = order as usize;
        let mut cursor = self.lists.cache_head[o];
        for _ in 1..keep {
            if cursor == NIL {
                return;
            }
            cursor = table.frame(FrameIdx(cursor)).next();
        }
        if cursor == NIL {
            return;
        }
        let mut rest = if keep == 0 {
            let all = self.lists.cache_head[o];
            self.lists.cache_head[o] = NIL;
            all
        } else {
            let rest = table.frame(FrameIdx(cursor)).next();
            table.frame(FrameIdx(cursor)).set_next(NIL);
            rest
        };
        while rest != NIL {
            let idx = FrameIdx(rest);
            rest = table.frame(idx).next();
            self.lists.cache_len[o] -= 1;
            let c = self.counters(order);
            bump(&c.cached, DEC);
            bump(&c.bound, 1);
            self.insert_free(idx, order, FreeClass::Unhinted);
        }
    }

    /// Puts a free block into the buddy lists, merging it with free buddies first.
    pub(crate) fn insert_free(&mut self, mut idx: FrameIdx, mut order: u8, mut class: FreeClass) {
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
        self.place(idx, order, class);
    }

    /// Puts a merged free block where it belongs: to a waiting capture request, or on a
    /// list (and, for a whole surplus chunk, to the shared pool).
    fn place(&mut self, idx: FrameIdx, order: u8, class: FreeClass) {
        let env = self.env;
        // A reserved region just became whole: it belongs to the request that reserved it,
        // if that one still waits. Either hand-off marks the block allocated before the
        // waiter can see it (see `capture`'s protocol); `carve` then places the rest.
        if let Some(region) = self.lists.reservations.take_within(idx, order)
            && env.capture.offer_to(region.ticket, region.start, || {
                self.mark_allocated(region.start, region.order)
            })
        {
            self.carve(idx, order, region.start, region.order, class);
            return;
        }
        if order >= env.capture.min_order()
            && env.capture.has_waiters()
            && let Some(wanted) = env
                .capture
                .offer(idx, order, |wanted| self.mark_allocated(idx, wanted))
        {
            self.carve(idx, order, idx, wanted, class);
            return;
        }
        let hintable = class == FreeClass::Unhinted && order >= env.hint_min_order;
        if hintable {
            env.table.frame(idx).set_since(crate::sync::now_ms());
        }
        self.push(idx, order, class);
        if hintable && env.hint.listening() {
            let unhinted = self
                .shard
                .unhinted_at_or_above(env.hint_min_order, env.max_order);
            env.hint.note_unhinted(unhinted);
        }
        if order == env.max_order && self.shard.id != ShardId::Shared {
            let whole = self.counters(order).free();
            if whole > env.keep_chunks as u64 {
                self.give_back(idx, class);
            }
        }
    }

    /// Places the rest of the free block `(idx, order)` once its part `(target,
    /// target_order)` was handed to a waiter (and marked allocated), halving towards the
    /// target.
    fn carve(
        &mut self,
        idx: FrameIdx,
        order: u8,
        target: FrameIdx,
        target_order: u8,
        class: FreeClass,
    ) {
        let since = self.env.table.frame(idx).since();
        let mut at = idx;
        for o in (target_order..order).rev() {
            let upper = at.plus(1 << o);
            let rest = if target >= upper {
                std::mem::replace(&mut at, upper)
            } else {
                upper
            };
            self.env.table.frame(rest).set_since(since);
            self.place(rest, o, class);
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

    // --- in-place resize ---------------------------------------------------------------

    /// Grows the allocated block `(idx, from)` to order `to` by absorbing its free upper
    /// buddies. Fails, changing nothing, unless every one is a whole free block.
    pub(crate) fn grow(&mut self, idx: FrameIdx, from: u8, to: u8) -> bool {
        if to > self.env.max_order || idx.0 & ((1 << to) - 1) != 0 {
            return false;
        }
        let table = self.env.table;
        let whole_free = |order: u8| {
            let (state, o) = table.frame(idx.buddy(order)).get();
            o == order && state.free_class().is_some()
        };
        if !(from..to).all(whole_free) {
            // A buddy that starts with a cached piece may be whole once the cache merges.
            let cached =
                (from..to).any(|o| table.frame(idx.buddy(o)).state() == FrameState::Cached);
            if !cached {
                return false;
            }
            self.drain_cache(0);
            if !(from..to).all(whole_free) {
                return false;
            }
        }
        for order in from..to {
            let buddy = idx.buddy(order);
            let class = table
                .frame(buddy)
                .state()
                .free_class()
                .expect("checked free");
            self.unlink(buddy, order, class);
            table.frame(buddy).set(FrameState::Interior, 0);
        }
        bump(&self.counters(from).allocated, DEC);
        self.mark_allocated(idx, to);
        true
    }

    /// Shrinks the allocated block `(idx, from)` to order `to`, freeing the upper parts.
    pub(crate) fn shrink(&mut self, idx: FrameIdx, from: u8, to: u8) {
        debug_assert!(to <= from);
        bump(&self.counters(from).allocated, DEC);
        self.mark_allocated(idx, to);
        for order in (to..from).rev() {
            self.insert_free(idx.plus(1 << order), order, FreeClass::Unhinted);
        }
    }

    // --- hinting -------------------------------------------------------------------------

    /// Takes cold unhinted blocks at or above `min_order` off the lists, marks them
    /// isolated and appends them to `out`, until `out` holds `max_blocks` or
    /// `budget_frames` is spent. `cold_ms = None` takes every candidate.
    pub(crate) fn isolate(
        &mut self,
        min_order: u8,
        cold_ms: Option<u32>,
        max_blocks: usize,
        budget_frames: &mut u64,
        out: &mut Vec<(FrameIdx, u8)>,
    ) -> Isolation {
        let table = self.env.table;
        let now = crate::sync::now_ms();
        let mut result = Isolation::default();
        let list = self.list(FreeClass::Unhinted);
        let fifo = self.env.policy == AllocPolicy::Fifo;
        for order in (min_order..=self.env.max_order).rev() {
            // Oldest first: from the tail of a LIFO list, from the head of a FIFO one.
            let mut cursor = if fifo {
                self.lists.head[order as usize][list]
            } else {
                self.lists.tail[order as usize][list]
            };
            while cursor != NIL {
                if out.len() >= max_blocks || *budget_frames < 1 << order {
                    return result;
                }
                let idx = FrameIdx(cursor);
                let frame = table.frame(idx);
                cursor = if fifo { frame.next() } else { frame.prev() };
                if frame.state() != FrameState::Unhinted {
                    continue; // FIFO lists mix classes
                }
                if let Some(cold) = cold_ms {
                    let age = now.wrapping_sub(frame.since());
                    if age < cold {
                        let wait = cold - age;
                        result.next_cold_in =
                            Some(result.next_cold_in.map_or(wait, |w| w.min(wait)));
                        if fifo {
                            continue;
                        }
                        break; // the rest of a LIFO list is warmer still
                    }
                }
                self.unlink(idx, order, FreeClass::Unhinted);
                frame.set(FrameState::Isolated, order);
                bump(&self.counters(order).in_flight, 1);
                *budget_frames -= 1 << order;
                out.push((idx, order));
                result.blocks += 1;
            }
        }
        result
    }

    /// Returns an isolated block: as `class` if the advice took, else as unhinted (and
    /// warm again, so a failing range is retried only after another delay).
    pub(crate) fn return_isolated(&mut self, idx: FrameIdx, order: u8, class: Option<FreeClass>) {
        let frame = self.env.table.frame(idx);
        debug_assert_eq!(frame.get(), (FrameState::Isolated, order));
        bump(&self.counters(order).in_flight, DEC);
        let class = class.unwrap_or(FreeClass::Unhinted);
        if class == FreeClass::Unhinted {
            frame.set_since(crate::sync::now_ms());
        }
        self.insert_free(idx, order, class);
    }

    // --- auditing ------------------------------------------------------------------------

    /// Walks this shard's lists and checks them against the frame table and counters.
    /// Adds what it saw to `seen` (free, cached, per order and class).
    pub(crate) fn audit(&self, seen: &mut AuditCounts) -> Result<(), String> {
        let env = self.env;
        let table = env.table;
        let me = self.shard.id;
        let lists: &Lists = &self.lists;
        let mut counts = AuditCounts::default();
        for order in 0..=env.max_order {
            let o = order as usize;
            for list in 0..LISTS {
                let mut prev = NIL;
                let mut cursor = lists.head[o][list];
                if (cursor == NIL) == (lists.nonempty[list] & 1 << order != 0) {
                    return Err(format!(
                        "{me:?}: nonempty bit of order {order} list {list} is wrong"
                    ));
                }
                let mut steps = 0u64;
                while cursor != NIL {
                    let idx = FrameIdx(cursor);
                    let frame = table.frame(idx);
                    let (state, fo) = frame.get();
                    let class = state.free_class().ok_or_else(|| {
                        format!("{me:?}: frame {cursor} on a free list is {state:?}")
                    })?;
                    if fo != order {
                        return Err(format!(
                            "{me:?}: frame {cursor} of order {fo} on list of order {order}"
                        ));
                    }
                    if self.list_of(idx, order, class) != list {
                        return Err(format!("{me:?}: {class:?} frame {cursor} on list {list}"));
                    }
                    if frame.prev() != prev {
                        return Err(format!("{me:?}: broken prev link at frame {cursor}"));
                    }
                    if idx.0 & ((1 << order) - 1) != 0 {
                        return Err(format!(
                            "{me:?}: frame {cursor} misaligned for order {order}"
                        ));
                    }
                    if table.owner(idx.chunk(env.max_order)) != me.owner() {
                        return Err(format!(
                            "{me:?}: frame {cursor} lies in a chunk owned by another shard"
                        ));
                    }
                    counts.free[o][class as usize] += 1;
                    prev = cursor;
                    cursor = frame.next();
                    steps += 1;
                    if steps > table.len() as u64 {
                        return Err(format!("{me:?}: cycle in list of order {order}"));
                    }
                }
                if lists.tail[o][list] != prev {
                    return Err(format!(
                        "{me:?}: tail of order {order} list {list} is wrong"
                    ));
                }
            }
            {
                let mut cursor = lists.cache_head[o];
                let mut len = 0;
                while cursor != NIL {
                    let (state, fo) = table.frame(FrameIdx(cursor)).get();
                    if state != FrameState::Cached || fo != order {
                        return Err(format!(
                            "{me:?}: cached frame {cursor} is {state:?} order {fo}"
                        ));
                    }
                    len += 1;
                    cursor = table.frame(FrameIdx(cursor)).next();
                    if len > table.len() {
                        return Err(format!("{me:?}: cycle in cache of order {order}"));
                    }
                }
                if len != lists.cache_len[o] {
                    return Err(format!(
                        "{me:?}: cache length of order {order} is {} but {len} listed",
                        lists.cache_len[o]
                    ));
                }
                counts.cached[o] = len as u64;
            }
        }
        // Fresh chunks count as free zero blocks of the top order.
        counts.free[env.max_order as usize][FreeClass::Zero as usize] +=
            (lists.fresh_end - lists.fresh_next) as u64;
        for order in 0..=env.max_order as usize {
            let c = &self.shard.counters[order];
            let listed: u64 = counts.free[order].iter().sum::<u64>() + counts.cached[order];
            let check = |what: &str, counter: u64, walked: u64| {
                if counter == walked {
                    Ok(())
                } else {
                    Err(format!(
                        "{me:?}: order {order} {what} counter says {counter}, lists hold {walked}"
                    ))
                }
            };
            check("free", c.free(), listed)?;
            check(
                "hinted",
                c.hinted.load(Ordering::Acquire),
                counts.free[order][FreeClass::Hinted as usize],
            )?;
            check(
                "zero",
                c.zero.load(Ordering::Acquire),
                counts.free[order][FreeClass::Zero as usize],
            )?;
            check(
                "cached",
                c.cached.load(Ordering::Acquire),
                counts.cached[order],
            )?;
            for class in 0..CLASSES {
                seen.free[order][class] += counts.free[order][class];
            }
            seen.cached[order] += counts.cached[order];
        }
        self.audit_reservations()?;
        seen.fresh_chunks += (lists.fresh_end - lists.fresh_next) as u64;
        if me == ShardId::Shared {
            seen.first_fresh_chunk = lists.fresh_next;
        }
        Ok(())
    }
}

/// Block counts gathered by [`Locked::audit`].
#[derive(Default)]
pub(crate) struct AuditCounts {
    pub(crate) free: [[u64; CLASSES]; ORDERS],
    pub(crate) cached: [u64; ORDERS],
    pub(crate) fresh_chunks: u64,
    pub(crate) first_fresh_chunk: u32,
}
