//! Layer 3, policy: capture. A waiting large request takes blocks as concurrent frees
//! coalesce them.
//!
//! Whitcroft's capture of pages freed during direct reclaim (2008) and Linux's
//! `capture_control` (Gorman, 2019): when a large
//! request cannot be served, the pieces that frees are coalescing for it would otherwise be
//! eaten by concurrent small allocations before they ever merge. So the request registers
//! here and parks; every free whose merging reaches its order hands the block over instead
//! of listing it.
//!
//! # Protocol
//! 1. **Publish.** The waiter builds its [`Request`] completely, then pushes it onto the
//!    queue and raises `waiting`, both under the queue lock (Linux once published a
//!    half-initialised slot).
//! 2. **Re-check.** It then tries to allocate once more, touching every shard's lock. A
//!    free that ran before the publish left its block on a list, which this finds; a free
//!    that runs after it takes a shard lock the waiter released after raising `waiting`,
//!    so it sees `waiting > 0` and offers its block here. No block slips between the two.
//! 3. **Hand-off.** A free (holding its shard lock) calls [`CaptureRegistry::offer`]: the
//!    oldest request whose order fits is removed from the queue and filled, under the queue
//!    lock, and woken. The block's frame entry says "allocated" before the fill: the waiter
//!    may free it into a `LocalCache` at once, which writes the entry without the shard
//!    lock, and a mark written after that would overwrite it.
//! 4. **Reserve.** Still without a block, the waiter reserves the region of its order
//!    closest to whole (see `shard::reservation`): frees inside it merge out of reach of
//!    other allocations, and the region goes to this request, by ticket, once whole.
//! 5. **Withdraw.** On timeout the waiter removes its request under the queue lock *before*
//!    reading the result. If the request was already gone, a block was handed over in
//!    between, and the waiter takes it rather than leaking it (Linux's second bug). Then it
//!    ends its reservation; a region completed in between finds no request and is freed.
//!
//! 6. **Async.** An async request publishes its `Waker` with it. A free that fills it
//!    cannot wake it there (a waker runs the executor's code, which must not run under a
//!    shard lock): it parks the waker on a ready list, and the shard wakes the list once
//!    its lock is released ([`Handoff::after_unlock`]). Dropping the future withdraws as
//!    in 5. A free that read "nobody waits" just before a publish and put its block in a
//!    per-CPU cache looks again after the push (see `pool::cpu_cache`), so the block
//!    reaches the shards even though an async waiter has no thread to look for it.
//!
//! Lock order: shard, then queue, then request, then the ready list. The free path's cost when nobody waits is
//! one relaxed load of `waiting`, which the shard reads through its `Env`.
//!
//! May call: `shard` (the [`Handoff`] trait it defines), `frame_table`, `sync`.

use std::collections::VecDeque;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::frame_table::FrameIdx;
use crate::shard::Handoff;
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};

/// One waiting request.
pub(crate) struct Request {
    order: u8,
    /// Names the request in the reservation it may hold.
    ticket: u64,
    slot: Mutex<Slot>,
    /// Wakes a thread blocked in [`CaptureRegistry::wait`].
    wake: Condvar,
    /// The queue forgot the request (in a child after `fork`): nobody will fill it. Not in
    /// the slot, whose lock a thread of the parent may have held at the fork.
    forgotten: AtomicBool,
}

/// What a request has got, and how to tell its waiter.
#[derive(Default)]
struct Slot {
    filled: Option<FrameIdx>,
    /// An async waiter's waker, woken after the filling free releases its shard lock.
    waker: Option<Waker>,
}

/// How an async request stands, seen by its poll.
pub(crate) enum Polled {
    Filled(FrameIdx),
    Waiting,
    /// Forgotten after `fork`: publish again.
    Forgotten,
}

impl Request {
    /// The order it waits for.
    pub(crate) fn order(&self) -> u8 {
        self.order
    }

    /// The name its reservation goes by.
    pub(crate) fn ticket(&self) -> u64 {
        self.ticket
    }
}

/// The queue lock held with nothing to do but release it; see `CaptureRegistry::hold`.
#[cfg(not(any(loom, miri)))]
pub(crate) struct QueueHold<'a>(
    #[allow(dead_code)] crate::sync::MutexGuard<'a, VecDeque<Arc<Request>>>,
    #[allow(dead_code)] crate::sync::MutexGuard<'a, Vec<Waker>>,
);

/// Capture counters, read by `stats()`.
#[derive(Default)]
pub(crate) struct CaptureCounters {
    pub(crate) captures: AtomicU64,
    pub(crate) waits: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) reclaim_rounds: AtomicU64,
    pub(crate) reservations: AtomicU64,
}

/// The queue of waiting requests.
pub(crate) struct CaptureRegistry {
    /// `u8::MAX` when capture is off, so no order qualifies.
    min_order: u8,
    waiting: AtomicUsize,
    next_ticket: AtomicU64,
    queue: Mutex<VecDeque<Arc<Request>>>,
    /// Wakers of filled async requests, woken once the filling free unlocks its shard.
    ready: Mutex<Vec<Waker>>,
    pub(crate) counters: CaptureCounters,
}

impl CaptureRegistry {
    pub(crate) fn new(enabled: bool, min_order: u8) -> Self {
        Self {
            min_order: if enabled { min_order } else { u8::MAX },
            waiting: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
            ready: Mutex::new(Vec::new()),
            counters: CaptureCounters::default(),
        }
    }

    /// Smallest order that may wait (`u8::MAX` when capture is off).
    #[inline]
    pub(crate) fn min_order(&self) -> u8 {
        self.min_order
    }

    /// Whether any request waits. One relaxed load: the shard lock the caller holds
    /// orders it after any publish that could matter (see the module docs).
    #[inline]
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) != 0
    }

    /// Registers a request for a block of `order`; an async one brings its `waker`.
    pub(crate) fn publish(&self, order: u8, waker: Option<Waker>) -> Arc<Request> {
        let request = Arc::new(Request {
            order,
            ticket: self.next_ticket.fetch_add(1, Ordering::Relaxed),
            slot: Mutex::new(Slot {
                waker,
                ..Slot::default()
            }),
            wake: Condvar::new(),
            forgotten: AtomicBool::new(false),
        });
        let mut queue = self.queue.lock();
        queue.push_back(request.clone());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        request
    }

    /// Offers a free block of `order` at `idx`. If a request fits, `claim` marks the
    /// block's lower part of the requested order allocated, then the request is filled with
    /// it and woken; the caller frees the rest. Returns the order handed over.
    ///
    /// Called with the lock of the shard that owns `idx` held.
    pub(crate) fn offer(&self, idx: FrameIdx, order: u8, claim: &mut dyn FnMut(u8)) -> Option<u8> {
        let mut queue = self.queue.lock();
        let pos = queue.iter().position(|r| r.order <= order)?;
        let wanted = queue[pos].order;
        claim(wanted);
        self.fill(&mut queue, pos, idx);
        Some(wanted)
    }

    /// Hands the block at `idx`, of the request's order, to the request `ticket` if it
    /// still waits, after `claim` marks it allocated. Called with the lock of the shard
    /// that owns `idx` held.
    pub(crate) fn offer_to(&self, ticket: u64, idx: FrameIdx, claim: &mut dyn FnMut()) -> bool {
        let mut queue = self.queue.lock();
        let Some(pos) = queue.iter().position(|r| r.ticket == ticket) else {
            return false;
        };
        claim();
        self.fill(&mut queue, pos, idx);
        true
    }

    /// Removes the request at `pos`, fills it with `idx` and wakes it. The block must be
    /// marked allocated already: the waiter may use it, and write its frame entry without
    /// a lock (a `LocalCache` free), the moment it is filled.
    fn fill(&self, queue: &mut VecDeque<Arc<Request>>, pos: usize, idx: FrameIdx) {
        let request = queue.remove(pos).expect("position is in range");
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let mut slot = request.slot.lock();
        slot.filled = Some(idx);
        if let Some(waker) = slot.waker.take() {
            // Woken by `after_unlock`: a waker may run any code, none of it under our locks.
            self.ready.lock().push(waker);
        }
        drop(slot);
        request.wake.notify_all();
        self.counters.captures.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until the request is filled or `deadline` passes. Does not withdraw.
    pub(crate) fn wait(&self, request: &Request, deadline: Option<Instant>) -> Option<FrameIdx> {
        let mut slot = request.slot.lock();
        loop {
            if let Some(idx) = slot.filled.take() {
                return Some(idx);
            }
            let remaining = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if remaining.is_zero() {
                return None;
            }
            slot = request.wake.wait_timeout(slot, remaining);
        }
    }

    /// Takes the request back. Returns a block that was handed over before the withdrawal
    /// (the caller owns it), or `None` if the request was still queued.
    pub(crate) fn withdraw(&self, request: &Arc<Request>) -> Option<FrameIdx> {
        let mut queue = self.queue.lock();
        if let Some(pos) = queue.iter().position(|r| Arc::ptr_eq(r, request)) {
            queue.remove(pos);
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        drop(queue);
        if request.forgotten.load(Ordering::Relaxed) {
            return None;
        }
        // Gone from the queue: `offer` filled it under the queue lock we just took.
        let mut slot = request.slot.lock();
        slot.waker = None;
        let idx = slot.filled.take();
        debug_assert!(
            idx.is_some(),
            "a withdrawn request left the queue only by being filled"
        );
        idx
    }

    /// An async request's poll: takes the block if it was filled, or leaves `waker` to be
    /// woken when it is.
    pub(crate) fn poll(&self, request: &Request, waker: &Waker) -> Polled {
        if request.forgotten.load(Ordering::Relaxed) {
            return Polled::Forgotten;
        }
        let mut slot = request.slot.lock();
        if let Some(idx) = slot.filled.take() {
            return Polled::Filled(idx);
        }
        match &mut slot.waker {
            Some(old) if old.will_wake(waker) => {}
            other => *other = Some(waker.clone()),
        }
        Polled::Waiting
    }

    /// Wakes the async waiters whose requests were filled. Called with no shard lock held.
    pub(crate) fn wake_ready(&self) {
        let ready = std::mem::take(&mut *self.ready.lock());
        for waker in ready {
            waker.wake();
        }
    }

    /// Requests waiting right now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Takes the queue lock and keeps it until the hold is dropped (across `fork`).
    #[cfg(not(any(loom, miri)))]
    pub(crate) fn hold(&self) -> QueueHold<'_> {
        let queue = self.queue.lock();
        QueueHold(queue, self.ready.lock())
    }

    /// Forgets every waiting request: in a child after `fork` their threads do not exist.
    /// A block already handed to one stays allocated, like any memory those threads held.
    #[cfg(not(any(loom, miri)))]
    pub(crate) fn forget_waiters(&self) {
        let mut queue = self.queue.lock();
        self.waiting.fetch_sub(queue.len(), Ordering::SeqCst);
        for request in queue.drain(..) {
            // An async waiter of the forking thread may poll again: it publishes anew.
            request.forgotten.store(true, Ordering::Relaxed);
        }
        // Wakers of the parent's executor: forgotten (leaked), not run.
        std::mem::forget(std::mem::take(&mut *self.ready.lock()));
    }

    /// The count of waiting requests itself, for the shards' `Env`.
    pub(crate) fn waiting_counter(&self) -> &AtomicUsize {
        &self.waiting
    }
}

impl Handoff for CaptureRegistry {
    fn offer(&self, idx: FrameIdx, order: u8, claim: &mut dyn FnMut(u8)) -> Option<u8> {
        CaptureRegistry::offer(self, idx, order, claim)
    }

    fn offer_reserved(&self, ticket: u64, idx: FrameIdx, claim: &mut dyn FnMut()) -> bool {
        self.offer_to(ticket, idx, claim)
    }

    fn after_unlock(&self) {
        self.wake_ready();
    }
}
