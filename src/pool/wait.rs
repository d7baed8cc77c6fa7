//! Capture waits: a request that publishes itself, reserves a region and parks until a free
//! hands it a block (see `policy::capture` for the protocol).

use std::time::{Duration, Instant};

use super::PoolCore;
use crate::error::AllocError;
use crate::frame_table::FrameIdx;
use crate::policy::capture::Request;
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

    /// Publishes a request, then tries every shard once more (see `capture`'s protocol).
    fn publish_and_recheck(&self, order: u8) -> (Arc<Request>, Option<FrameIdx>) {
        let request = self.capture.publish(order);
        // Cached small blocks may merge into what we wait for: merge them now, under
        // capture, so any block they form is handed straight to a waiter.
        self.drain_caches();
        let block = match self.alloc_frame(order, false, None) {
            Ok((idx, _)) => {
                if let Some(extra) = self.capture.withdraw(&request) {
                    // A block arrived between publish and re-check: give it back.
                    let _ = self.free_frame(extra, Some(order));
                }
                Some(idx)
            }
            Err(_) => None,
        };
        (request, block)
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
        let (request, block) = self.publish_and_recheck(order);
        if let Some(block) = block {
            return Ok(block);
        }
        self.capture.counters.waits.fetch_add(1, Ordering::Relaxed);
        let reserved = self.reserve_region(&request);
        let filled = self.capture.wait(&request, deadline);
        match self.finish_wait(&request, reserved, filled) {
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

    /// Capture switched off: retry with backoff until the deadline, as a caller without
    /// capture would. The baseline that capture is measured against.
    fn poll_until(&self, order: u8, deadline: Option<Instant>) -> Result<FrameIdx, AllocError> {
        self.capture.counters.waits.fetch_add(1, Ordering::Relaxed);
        let backoff = crossbeam_utils::Backoff::new();
        loop {
            if let Ok(block) = self.alloc_plain(order) {
                return Ok(block);
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

    pub(crate) fn alloc_with_reclaim(
        &self,
        order: u8,
        mut reclaim: impl FnMut() -> bool,
    ) -> Result<FrameIdx, AllocError> {
        match self.alloc_plain(order) {
            Err(AllocError::Exhausted { .. }) => {}
            other => return other,
        }
        let mut rounds = 0u32;
        if order < self.capture.min_order() {
            // Too small to capture: reclaim and retry plainly.
            loop {
                if !reclaim() {
                    return Err(AllocError::ReclaimFailed { order, rounds });
                }
                rounds += 1;
                self.capture
                    .counters
                    .reclaim_rounds
                    .fetch_add(1, Ordering::Relaxed);
                if let Ok(block) = self.alloc_plain(order) {
                    return Ok(block);
                }
            }
        }
        let (request, block) = self.publish_and_recheck(order);
        if let Some(block) = block {
            return Ok(block);
        }
        let reserved = self.reserve_region(&request);
        let filled = loop {
            let more = reclaim();
            if more {
                rounds += 1;
                self.capture
                    .counters
                    .reclaim_rounds
                    .fetch_add(1, Ordering::Relaxed);
            }
            // Frees inside the callback may have been captured for us already.
            let filled = self.capture.wait(&request, Some(Instant::now()));
            if filled.is_some() || !more {
                break filled;
            }
        };
        if let Some(idx) = self.finish_wait(&request, reserved, filled) {
            return Ok(idx);
        }
        // One last look: a block may have formed while no longer registered.
        self.alloc_plain(order)
            .map_err(|_| AllocError::ReclaimFailed { order, rounds })
    }

    /// An ordinary allocation of `order`, as a frame.
    fn alloc_plain(&self, order: u8) -> Result<FrameIdx, AllocError> {
        self.alloc_frame(order, false, None).map(|(idx, _)| idx)
    }
}
