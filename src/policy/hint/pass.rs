//! One hinting pass over a pool, and when the next one is due.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use crate::config::HintConfig;
use crate::frame_table::{FrameIdx, FreeClass};
use crate::os::advice::{Advisor, HintMode};
use crate::shard::{Budget, Isolation};
use crate::sync::{AtomicU64, Ordering};

/// Hinting counters, read by `stats()`.
#[derive(Default)]
pub(crate) struct HintCounters {
    pub(crate) passes: AtomicU64,
    pub(crate) madvise_calls: AtomicU64,
    pub(crate) bytes_hinted: AtomicU64,
    pub(crate) blocks_hinted: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) panics: AtomicU64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PassOutcome {
    pub(crate) blocks: u64,
    pub(crate) bytes: u64,
    pub(crate) failures: u64,
    /// The byte budget ran out, or a candidate did not fit in what was left of it: the
    /// next pass should come soon, after the interval.
    pub(crate) budget_spent: bool,
    /// Milliseconds until a too-warm candidate turns cold.
    pub(crate) next_cold_in: Option<u32>,
}

impl PassOutcome {
    /// Asks for the next pass within `wait` ms at the latest.
    pub(crate) fn come_back_within(&mut self, wait: u32) {
        self.next_cold_in = Some(self.next_cold_in.map_or(wait, |w| w.min(wait)));
    }

    /// Adds the blocks, bytes and failures of another pass (not when to come back).
    pub(crate) fn add_counts(&mut self, other: &PassOutcome) {
        self.blocks += other.blocks;
        self.bytes += other.bytes;
        self.failures += other.failures;
    }

    /// Adds what another pass of the same round did, and when it asks to come back.
    pub(crate) fn absorb(&mut self, other: &PassOutcome) {
        self.add_counts(other);
        self.budget_spent |= other.budget_spent;
        if let Some(wait) = other.next_cold_in {
            self.come_back_within(wait);
        }
    }
}

/// What one pass takes and how it advises the kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassPlan {
    /// Blocks free for at least this long; `None`: every block, however warm.
    pub(crate) cold_ms: Option<u32>,
    /// Bytes at most (a pass takes at least one block, however large).
    pub(crate) budget_bytes: u64,
    /// Orders taken, largest first.
    pub(crate) min_order: u8,
    pub(crate) max_order: u8,
    /// The advice.
    pub(crate) mode: HintMode,
    /// The blocks taken: unhinted ones, or (under memory pressure) hinted ones, whose
    /// `MADV_FREE` becomes a `MADV_DONTNEED` so that they stop counting against a cgroup.
    pub(crate) from: FreeClass,
}

/// What the hinter needs from a pool.
pub(crate) trait HintTarget {
    /// The shards to visit, shared pool included.
    fn shard_count(&self) -> usize;
    /// Isolates up to `max_blocks` blocks of shard `shard` that `plan` takes, within
    /// `budget` (first merging the shard's cached blocks that are cold: they are free
    /// memory too).
    fn isolate(
        &self,
        shard: usize,
        plan: &PassPlan,
        max_blocks: usize,
        budget: &mut Budget,
        out: &mut Vec<(FrameIdx, u8)>,
    ) -> Isolation;
    /// Returns isolated blocks of shard `shard` (class `None`: the advice failed).
    fn return_isolated(
        &self,
        shard: usize,
        blocks: &[(FrameIdx, u8)],
        classes: &[Option<FreeClass>],
    );
    /// Address of a frame.
    fn frame_addr(&self, idx: FrameIdx) -> usize;
    fn config(&self) -> &HintConfig;
    fn advisor(&self) -> &dyn Advisor;
    fn counters(&self) -> &HintCounters;
}

/// Runs one pass over every shard, as `plan` says.
pub(crate) fn run_pass(target: &impl HintTarget, plan: &PassPlan) -> PassOutcome {
    let config = *target.config();
    let counters = target.counters();
    let mut budget = Budget::new(plan.budget_bytes / crate::FRAME_SIZE as u64);
    let mut outcome = PassOutcome::default();
    let mut batch = Vec::with_capacity(config.batch_blocks);
    let mut ranges = Vec::with_capacity(config.batch_blocks);
    let mut ok = Vec::with_capacity(config.batch_blocks);
    let mut classes = Vec::with_capacity(config.batch_blocks);
    let success_class = match plan.mode {
        HintMode::Free => FreeClass::Hinted,
        HintMode::DontNeed => FreeClass::Zero,
    };
    'shards: for shard in 0..target.shard_count() {
        loop {
            batch.clear();
            let isolation =
                target.isolate(shard, plan, config.batch_blocks, &mut budget, &mut batch);
            if let Some(wait) = isolation.next_cold_in {
                outcome.next_cold_in =
                    Some(outcome.next_cold_in.map_or(wait, |w: u32| w.min(wait)));
            }
            // A candidate that did not fit is work left: come back next pass, never "done".
            outcome.budget_spent |= isolation.budget_hit;
            if batch.is_empty() {
                break;
            }
            ranges.clear();
            ranges.extend(
                batch
                    .iter()
                    .map(|&(idx, order)| (target.frame_addr(idx), crate::FRAME_SIZE << order)),
            );
            ok.clear();
            ok.resize(batch.len(), false);
            let advised = catch_unwind(AssertUnwindSafe(|| {
                target.advisor().advise(&ranges, plan.mode, &mut ok)
            }));
            match advised {
                Ok(calls) => {
                    counters.madvise_calls.fetch_add(calls, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.panics.fetch_add(1, Ordering::Relaxed);
                    ok.iter_mut().for_each(|ok| *ok = false);
                }
            }
            classes.clear();
            classes.extend(ok.iter().map(|&ok| ok.then_some(success_class)));
            target.return_isolated(shard, &batch, &classes);
            let mut failed = false;
            for (&(_, len), &ok) in ranges.iter().zip(&ok) {
                if ok {
                    outcome.blocks += 1;
                    outcome.bytes += len as u64;
                } else {
                    outcome.failures += 1;
                    failed = true;
                }
            }
            if failed {
                // Failed blocks are back on the lists, unhinted: retry them in a later
                // pass, not in a loop now.
                break;
            }
            if budget.frames < 1 << plan.min_order {
                outcome.budget_spent = true;
                break 'shards;
            }
        }
    }
    counters.passes.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes_hinted
        .fetch_add(outcome.bytes, Ordering::Relaxed);
    counters
        .blocks_hinted
        .fetch_add(outcome.blocks, Ordering::Relaxed);
    counters
        .failures
        .fetch_add(outcome.failures, Ordering::Relaxed);
    outcome
}

/// When the pass after `outcome` is due, if any: after the interval when the budget ran
/// out, when the next candidate turns cold (a little after, so it is), or never until a
/// free asks again.
pub(crate) fn next_pass(outcome: &PassOutcome, config: &HintConfig) -> Option<Duration> {
    if outcome.budget_spent {
        Some(config.interval)
    } else {
        outcome
            .next_cold_in
            .map(|ms| Duration::from_millis(ms as u64 + 5).max(config.interval))
    }
}

/// The hint delay in milliseconds (the builder caps it at 24 days, so it fits).
pub(crate) fn cold_ms(config: &HintConfig) -> u32 {
    config.delay.as_millis().min(u32::MAX as u128 / 2) as u32
}
