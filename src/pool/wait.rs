//! Capture waits: a request that publishes itself, reserves a region and parks until a free
//! hands it a block (see `policy::capture` for the protocol).

use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::PoolCore;
use crate::error::AllocError;
use crate::frame_table::FrameIdx;
use crate::policy::capture::{Polled, Request};
use crate::sync::{Arc, Ordering};

impl PoolCore {
    /// Reserves for `request` the region of its order with the most free frames among the
    /// candidates of every shard (see `shard::reservation`). Returns the shard holding it.
    fn reserve_region(&self, request: &Request) -> Option<usize> {
        if !self.config.capture_reserve {
            return None;
        }
        let (order, ticket) = (request.order(), request.ticket());
        let env = self.env();
        let mut best: Option<(u32, usize, FrameIdx)> = None;
        for (i, shard) in self.shards.iter().enumerate() {
            let candidate = shard.lock(&env).reservation_candidate(order);
            if let Some((start, free)) = candidate
                && best.is_none_or(|(most, ..)| free > most)
            {
                best = Some((free, i, start));
            }
        }
        let (_, shard, start) = best?;
        // Pieces may have moved since the look: `reserve` checks the region again.
        if !self.shards[shard].lock(&env).reserve(start, order, ticket) {
            return None;
        }
        self.capture
            .counters
            .reservations
            .fetch_add(1, Ordering::Relaxed);
        Some(shard)
    }

    /// Ends a wait: withdraws the request unless it was `filled`, then ends the reservation
    /// `reserve_region` made, if it still stands. Withdrawing first means no free can hand
    /// the request a block any more when its region goes back. Returns the block it got.
    fn finish_wait(
        &self,
        request: &Arc<Request>,
        reserved: Option<usize>,
        filled: Option<FrameIdx>,
    ) -> Option<FrameIdx> {
        let outcome = filled.or_else(|| self.capture.withdraw(request));
        if let Some(shard) = reserved {
            let env = self.env();
            self.shards[shard].lock(&env).unreserve(request.ticket());
        }
        outcome
    }

    /// Frees the pool has seen so far (all shards, all orders; monotonic): a reclaim
    /// callback that claims progress but leaves this unchanged freed nothing.
    fn frees_so_far(&self) -> u64 {
        self.all_shards()
            .flat_map(|s| s.counters.iter())
            .map(|c| c.freed.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn alloc_wait(&self, order: u8, timeout: Duration) -> Result<FrameIdx, AllocError> {
        match self.alloc_plain(order) {
            Err(AllocError::Exhausted { .. }) if order >= self.resolved.capture_min_order => {}
            other => return other,
        }
        let deadline = Instant::now().checked_add(timeout);
        if order < self.capture.min_order() {
            return self.poll_until(order, deadline);
        }
        let mut wait = match Wait::publish(self, order) {
            Ok(idx) => return Ok(idx),
            Err(wait) => wait,
        };
        self.capture.counters.waits.fetch_add(1, Ordering::Relaxed);
        wait.reserve();
        let filled = self.wait_filled(&wait.request, deadline);
        match wait.finish(filled) {
            // Handed over, perhaps just at the deadline: it is ours.
            Some(idx) => Ok(idx),
            None => {
                self.capture
                    .counters
                    .timeouts
                    .fetch_add(1, Ordering::Relaxed);
                Err(AllocError::Timeout { order })
            }
        }
    }

    /// Waits for the request to be filled until `deadline`. Every few milliseconds it drains
    /// the per-CPU caches: a free that read "nobody waits" just before the request was
    /// published may have left its block in a cache, where it cannot coalesce.
    fn wait_filled(&self, request: &Request, deadline: Option<Instant>) -> Option<FrameIdx> {
        const RECHECK: Duration = Duration::from_millis(10);
        loop {
            let slice = match (deadline, Instant::now().checked_add(RECHECK)) {
                (Some(deadline), Some(next)) => Some(deadline.min(next)),
                (deadline, next) => deadline.or(next),
            };
            if let Some(idx) = self.capture.wait(request, slice) {
                return Some(idx);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            self.drain_cpu_caches();
        }
    }

    /// Capture switched off: retry with backoff until the deadline, as a caller without
    /// capture would. The baseline that capture is measured against.
    fn poll_until(&self, order: u8, deadline: Option<Instant>) -> Result<FrameIdx, AllocError> {
        self.capture.counters.waits.fetch_add(1, Ordering::Relaxed);
        let backoff = crossbeam_utils::Backoff::new();
        loop {
            if let Ok(idx) = self.alloc_plain(order) {
                return Ok(idx);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.capture
                    .counters
                    .timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Err(AllocError::Timeout { order });
            }
            if backoff.is_completed() {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                backoff.snooze();
            }
        }
    }

    /// See [`PagePool::alloc_with_reclaim`](crate::PagePool::alloc_with_reclaim). The
    /// request and reservation are undone however the callback returns, panics included.
    pub(crate) fn alloc_with_reclaim(
        &self,
        order: u8,
        mut reclaim: impl FnMut() -> bool,
    ) -> Result<FrameIdx, AllocError> {
        match self.alloc_plain(order) {
            Err(AllocError::Exhausted { .. }) => {}
            other => return other,
        }
        let mut rounds = Rounds::default();
        if order < self.capture.min_order() {
            // Too small to capture: reclaim and retry plainly.
            while rounds.reclaim(self, &mut reclaim) {
                if let Ok(idx) = self.alloc_plain(order) {
                    return Ok(idx);
                }
            }
            return Err(AllocError::ReclaimFailed {
                order,
                rounds: rounds.count,
            });
        }
        let mut wait = match Wait::publish(self, order) {
            Ok(idx) => return Ok(idx),
            Err(wait) => wait,
        };
        wait.reserve();
        let filled = loop {
            let more = rounds.reclaim(self, &mut reclaim);
            // Frees inside the callback may have been captured for us already.
            let filled = self.capture.wait(&wait.request, Some(Instant::now()));
            if filled.is_some() || !more {
                break filled;
            }
        };
        if let Some(idx) = wait.finish(filled) {
            return Ok(idx);
        }
        // One last look: a block may have formed while no longer registered.
        self.alloc_plain(order)
            .map_err(|_| AllocError::ReclaimFailed {
                order,
                rounds: rounds.count,
            })
    }

    /// An ordinary allocation of `order`, as a frame.
    fn alloc_plain(&self, order: u8) -> Result<FrameIdx, AllocError> {
        self.alloc_frame(order, false, None).map(|(idx, _)| idx)
    }
}

/// Rounds after which a reclaim callback that says it freed something, but the pool saw
/// no free, is taken at its deeds: `alloc_with_reclaim` gives up with `ReclaimFailed`.
pub const RECLAIM_STALL_ROUNDS: u32 = 64;

/// How a reclaim loop is going.
#[derive(Default)]
struct Rounds {
    /// Callback calls that reported progress.
    count: u32,
    /// Those in a row that freed nothing the pool saw.
    stalled: u32,
}

impl Rounds {
    /// Runs the callback once; whether to go on: it reported progress, and the pool saw a
    /// free within the last [`RECLAIM_STALL_ROUNDS`] rounds.
    fn reclaim(&mut self, core: &PoolCore, reclaim: &mut impl FnMut() -> bool) -> bool {
        let before = core.frees_so_far();
        if !reclaim() {
            return false;
        }
        self.count = self.count.saturating_add(1);
        core.capture
            .counters
            .reclaim_rounds
            .fetch_add(1, Ordering::Relaxed);
        if core.frees_so_far() == before {
            self.stalled += 1;
        } else {
            self.stalled = 0;
        }
        self.stalled < RECLAIM_STALL_ROUNDS
    }
}

/// A published request and the region it reserved. Finishing it, or unwinding past it (a
/// panicking reclaim callback), withdraws the request, ends the reservation and frees a
/// block handed over that nobody took, so nothing is left behind.
struct Wait<'a> {
    core: &'a PoolCore,
    request: Arc<Request>,
    reserved: Option<usize>,
    finished: bool,
}

impl<'a> Wait<'a> {
    /// Publishes a request for `order`, then tries every shard once more (see `capture`'s
    /// protocol). A block found then is returned at once, with the request withdrawn.
    fn publish(core: &'a PoolCore, order: u8) -> Result<FrameIdx, Self> {
        Self::publish_with(core, order, None)
    }

    /// [`publish`](Self::publish), for an async waiter woken by `waker`.
    fn publish_with(core: &'a PoolCore, order: u8, waker: Option<Waker>) -> Result<FrameIdx, Self> {
        let wait = Self {
            core,
            request: core.capture.publish(order, waker),
            reserved: None,
            finished: false,
        };
        // Cached small blocks may merge into what we wait for: merge them now, under
        // capture, so any block they form is handed straight to a waiter. Every CPU, not
        // only those that look busy: a free that missed the publish may be pushing now.
        core.drain_every_cpu_cache();
        core.drain_caches();
        match core.alloc_plain(order) {
            Ok(idx) => {
                // A block handed over between publish and re-check goes back (by `Drop`).
                drop(wait);
                Ok(idx)
            }
            Err(_) => Err(wait),
        }
    }

    /// Reserves the region of the request's order closest to whole, if allowed.
    fn reserve(&mut self) {
        self.reserved = self.core.reserve_region(&self.request);
    }

    /// Ends the wait; returns the block the request got, `filled` or handed over since.
    fn finish(mut self, filled: Option<FrameIdx>) -> Option<FrameIdx> {
        self.finished = true;
        self.core.finish_wait(&self.request, self.reserved, filled)
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(idx) = self.core.finish_wait(&self.request, self.reserved, None) {
            let _ = self.core.free_frame(idx, Some(self.request.order()));
        }
    }
}

/// An async capture wait (see [`PagePool::alloc_async`](crate::PagePool::alloc_async)):
/// the state of the future, polled by the layer above. Dropping it withdraws the request
/// and frees a block handed over that nobody took (through [`Wait`]'s `Drop`).
pub(crate) struct AsyncWait<'a> {
    core: &'a PoolCore,
    order: u8,
    wait: Option<Wait<'a>>,
}

impl<'a> AsyncWait<'a> {
    pub(crate) fn new(core: &'a PoolCore, order: u8) -> Self {
        Self {
            core,
            order,
            wait: None,
        }
    }

    /// Allocates, or publishes a request woken through `cx` and returns `Pending`.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<FrameIdx, AllocError>> {
        if let Some(wait) = &self.wait {
            match self.core.capture.poll(&wait.request, cx.waker()) {
                Polled::Filled(idx) => {
                    let wait = self.wait.take().expect("checked above");
                    return Poll::Ready(Ok(wait.finish(Some(idx)).unwrap_or(idx)));
                }
                Polled::Waiting => return Poll::Pending,
                // In a child after `fork`: the queue forgot the request. Start again.
                Polled::Forgotten => self.wait = None,
            }
        }
        let order = self.order;
        match self.core.alloc_plain(order) {
            Err(AllocError::Exhausted { .. })
                if order >= self.core.resolved.capture_min_order
                    && order >= self.core.capture.min_order() => {}
            other => return Poll::Ready(other),
        }
        match Wait::publish_with(self.core, order, Some(cx.waker().clone())) {
            Ok(idx) => Poll::Ready(Ok(idx)),
            Err(mut wait) => {
                self.core
                    .capture
                    .counters
                    .waits
                    .fetch_add(1, Ordering::Relaxed);
                // A region completed by the reservation is handed over at once, and the
                // waker set at the publish wakes us for it.
                wait.reserve();
                self.wait = Some(wait);
                Poll::Pending
            }
        }
    }
}
