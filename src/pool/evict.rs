//! Batched eviction: many blocks freed at once with one piece of advice to the kernel, for
//! buffer managers that evict pages in batches (vmcache, LeanStore and Umbra evict one
//! `madvise` per page; exmap needed a kernel module to batch the work and the TLB flush).
//!
//! The whole batch is checked first, without changing anything: a foreign pointer, an
//! interior one, a free block or a block named twice refuses the batch. Then every block
//! is advised in as few system calls as the kernel allows (one `process_madvise` per 1024
//! blocks where it has it, one `madvise` per block otherwise), and each goes back to its
//! shard as hinted or known-zero, bypassing the caches: it is cold by definition.

use super::PoolCore;
use super::release::HintReport;
use crate::config::HintMode;
use crate::error::FreeError;
use crate::frame_table::{FrameIdx, FreeClass};
use crate::sync::Ordering;

/// What the kernel is told about memory freed by a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// Nothing: the blocks are freed like any other (through the caches), resident.
    Keep,
    /// `MADV_FREE`: reclaimed under memory pressure; the blocks are listed as hinted.
    Free,
    /// `MADV_DONTNEED`: gone at once; the blocks are listed as known-zero, so a later
    /// `alloc_zeroed` needs no memset.
    DontNeed,
}

/// Why a batch was refused: the first bad block and what is wrong with it. Nothing was
/// freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchError {
    /// Its position in the batch.
    pub index: usize,
    /// What is wrong with it. A block named twice is `AlreadyFree` at its second place.
    pub error: FreeError,
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block {} of the batch: {}; nothing was freed",
            self.index, self.error
        )
    }
}

impl std::error::Error for BatchError {}

impl PoolCore {
    /// Checks that every block of `batch` (frame, expected order if known) is allocated,
    /// and named once; fills in the orders. Changes nothing.
    pub(crate) fn check_batch(
        &self,
        batch: &mut [(FrameIdx, Option<u8>)],
    ) -> Result<(), BatchError> {
        for (index, (idx, order)) in batch.iter_mut().enumerate() {
            let fail = |error| BatchError { index, error };
            let actual = match self.owned_order(*idx) {
                Some(actual) => actual,
                // Not allocated: the locked look names what it is.
                None => {
                    return Err(fail(
                        self.locked_order(*idx)
                            .err()
                            .unwrap_or(FreeError::AlreadyFree),
                    ));
                }
            };
            if let Some(given) = *order
                && given != actual
            {
                return Err(fail(FreeError::WrongOrder { given, actual }));
            }
            *order = Some(actual);
        }
        // Named twice: the second would free a free block.
        let mut sorted: Vec<(u32, usize)> = batch
            .iter()
            .enumerate()
            .map(|(i, (idx, _))| (idx.0, i))
            .collect();
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(BatchError {
                index: pair[0].1.max(pair[1].1),
                error: FreeError::AlreadyFree,
            });
        }
        Ok(())
    }

    /// Frees checked blocks (see [`check_batch`](Self::check_batch)), advised as `advice`
    /// says. Returns what the advice covered.
    pub(crate) fn free_advised(&self, batch: &[(FrameIdx, u8)], advice: Advice) -> HintReport {
        let mode = match advice {
            Advice::Keep => {
                for &(idx, order) in batch {
                    let freed = self.free_frame(idx, Some(order));
                    debug_assert!(freed.is_ok(), "checked: {freed:?}");
                }
                return HintReport::default();
            }
            Advice::Free => HintMode::Free,
            Advice::DontNeed => HintMode::DontNeed,
        };
        // In address order, so that neighbours reach the kernel as one range.
        let mut sorted = batch.to_vec();
        sorted.sort_unstable_by_key(|&(idx, _)| idx.0);
        let batch = &sorted[..];
        let ranges: Vec<(usize, usize)> = batch
            .iter()
            .map(|&(idx, order)| {
                (
                    self.frame_ptr(idx).as_ptr() as usize,
                    crate::FRAME_SIZE << order,
                )
            })
            .collect();
        let mut ok = vec![false; batch.len()];
        // The blocks are still allocated, and the caller gave them up: nobody touches them.
        let calls = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.advisor.advise(&ranges, mode, &mut ok)
        }));
        match calls {
            Ok(calls) => {
                self.hint_counters
                    .madvise_calls
                    .fetch_add(calls, Ordering::Relaxed);
            }
            Err(_) => {
                self.hint_counters.panics.fetch_add(1, Ordering::Relaxed);
                ok.iter_mut().for_each(|ok| *ok = false);
            }
        }
        let advised = match mode {
            HintMode::Free => FreeClass::Hinted,
            HintMode::DontNeed => FreeClass::Zero,
        };
        let mut report = HintReport::default();
        let now = crate::sync::now_ms();
        self.free_each_as(batch.iter().zip(&ok).map(|(&(idx, order), &ok)| {
            if ok {
                report.blocks += 1;
                report.bytes += (crate::FRAME_SIZE << order) as u64;
            } else {
                report.failures += 1;
            }
            (
                idx,
                order,
                if ok { advised } else { FreeClass::Unhinted },
                now,
            )
        }));
        self.hint_counters
            .bytes_hinted
            .fetch_add(report.bytes, Ordering::Relaxed);
        self.hint_counters
            .blocks_hinted
            .fetch_add(report.blocks, Ordering::Relaxed);
        self.hint_counters
            .failures
            .fetch_add(report.failures, Ordering::Relaxed);
        report
    }
}
