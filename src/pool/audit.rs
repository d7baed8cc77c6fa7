//! The consistency audit: every shard locked, lists, frame table and counters checked
//! against each other, and `free + allocated + in-flight == capacity`. O(memory in use);
//! for tests and debugging, never on an allocation path.

use super::PoolCore;
use crate::frame_table::{ChunkIdx, FrameState};
use crate::shard::{AuditCounts, Locked};
use crate::sync::Ordering;

impl PoolCore {
    /// Locks every shard and checks lists, frame table and counters against each other.
    pub(crate) fn check_consistency(&self) -> Result<(), String> {
        let env = self.env();
        let locked: Vec<Locked<'_>> = self.all_shards().map(|s| s.lock(&env)).collect();
        let max = self.resolved.max_order;
        let mut seen = AuditCounts::default();
        for shard in &locked {
            shard.audit(&mut seen)?;
        }
        // Walk every chunk that was ever handed out, block by block.
        let mut allocated = vec![0u64; max as usize + 1];
        let mut isolated = vec![0u64; max as usize + 1];
        let mut walked_free = vec![0u64; max as usize + 1];
        for chunk in 0..seen.first_fresh_chunk {
            let mut idx = ChunkIdx(chunk).head(max);
            let end = idx.plus(1 << max);
            if let Some(class) = self.table.vacant_class(ChunkIdx(chunk)) {
                if self.table.frame(idx).get() != (FrameState::Interior, 0) {
                    return Err(format!(
                        "vacant chunk {chunk} ({class:?}) has a written head"
                    ));
                }
                walked_free[max as usize] += 1;
                continue;
            }
            while idx < end {
                let (state, order) = self.table.frame(idx).get();
                use FrameState as S;
                match state {
                    S::Interior => {
                        return Err(format!(
                            "frame {} should start a block but is interior",
                            idx.0
                        ));
                    }
                    // A `LocalCache`'s blocks are allocated as far as the shards know.
                    // Cached blocks are allocated as far as the shards know.
                    S::Allocated | S::LocalCached | S::CpuCached => allocated[order as usize] += 1,
                    S::Isolated => isolated[order as usize] += 1,
                    S::Unhinted | S::Hinted | S::Zero | S::Cached => {
                        walked_free[order as usize] += 1
                    }
                }
                if idx.0 & ((1 << order) - 1) != 0 || order > max {
                    return Err(format!(
                        "block at frame {} has impossible order {order}",
                        idx.0
                    ));
                }
                idx = idx.plus(1 << order);
            }
        }
        for chunk in seen.first_fresh_chunk..self.table.chunks() {
            let head = ChunkIdx(chunk).head(max);
            if self.table.frame(head).get().0 != FrameState::Interior {
                return Err(format!("fresh chunk {chunk} has a written head"));
            }
        }
        let mut total_frames = 0u64;
        for order in 0..=max as usize {
            let listed: u64 = seen.free[order].iter().sum::<u64>() + seen.cached[order];
            let fresh = if order == max as usize {
                seen.fresh_chunks
            } else {
                0
            };
            if walked_free[order] + fresh != listed {
                return Err(format!(
                    "order {order}: the frame table holds {} free blocks, the lists {}",
                    walked_free[order] + fresh,
                    listed
                ));
            }
            let counted_alloc: u64 = self
                .all_shards()
                .map(|s| s.counters[order].allocated.load(Ordering::Acquire))
                .sum();
            if counted_alloc != allocated[order] {
                return Err(format!(
                    "order {order}: {} allocated blocks in the table, counters say {counted_alloc}",
                    allocated[order]
                ));
            }
            let counted_iso: u64 = self
                .all_shards()
                .map(|s| s.counters[order].in_flight.load(Ordering::Acquire))
                .sum();
            if counted_iso != isolated[order] {
                return Err(format!(
                    "order {order}: {} isolated blocks, counters say {counted_iso}",
                    isolated[order]
                ));
            }
            total_frames += (listed + allocated[order] + isolated[order]) << order;
        }
        // Frames marked "cached on a CPU" are not compared with what the per-CPU stacks
        // hold: those change without any shard lock, so only a quiescent pool could be
        // compared (the tests do, through `stats()`), and in a child after `fork` a block a
        // vanished thread was freeing stays marked but in no stack, like any memory that
        // thread held.
        if total_frames != self.table.len() as u64 {
            return Err(format!(
                "free + allocated + in-flight = {total_frames} frames, capacity is {}",
                self.table.len()
            ));
        }
        Ok(())
    }
}
