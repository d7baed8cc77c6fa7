//! The pool as the hinter's target: which shards to visit, and isolation and return of
//! cold blocks under each shard's lock.

use super::PoolCore;
use crate::config::HintConfig;
use crate::frame_table::{FrameIdx, FreeClass};
use crate::os::advice::Advisor;
use crate::policy::hint::{HintCounters, HintTarget, PassPlan};
use crate::shard::{Budget, Isolation};

impl HintTarget for PoolCore {
    fn shard_count(&self) -> usize {
        self.shards.len() + 1
    }

    fn isolate(
        &self,
        shard: usize,
        plan: &PassPlan,
        max_blocks: usize,
        budget: &mut Budget,
        out: &mut Vec<(FrameIdx, u8)>,
    ) -> Isolation {
        let env = self.env();
        let shard = self.shards.get(shard).map_or(&*self.shared, |s| &**s);
        let mut shard = shard.lock(&env);
        // Cached blocks are free memory too: merge the cold ones so they can be hinted.
        let cache_warm_in = shard.drain_cold_cache(crate::sync::now_ms(), plan.cold_ms);
        let mut isolation = shard.isolate(
            plan.from,
            plan.min_order..=plan.max_order,
            plan.cold_ms,
            max_blocks,
            budget,
            out,
        );
        if let Some(wait) = cache_warm_in {
            isolation.next_cold_in = Some(isolation.next_cold_in.map_or(wait, |w| w.min(wait)));
        }
        // What the merges listed is being looked at now: no wake-up needed for it.
        shard.take_news();
        isolation
    }

    fn return_isolated(
        &self,
        shard: usize,
        blocks: &[(FrameIdx, u8)],
        classes: &[Option<FreeClass>],
    ) {
        let env = self.env();
        let shard = self.shards.get(shard).map_or(&*self.shared, |s| &**s);
        let mut shard = shard.lock(&env);
        for (&(idx, order), &class) in blocks.iter().zip(classes) {
            shard.return_isolated(idx, order, class);
        }
        self.unlock(shard);
    }

    fn frame_addr(&self, idx: FrameIdx) -> usize {
        self.frame_ptr(idx).as_ptr() as usize
    }

    fn config(&self) -> &HintConfig {
        &self.config.hint
    }

    fn advisor(&self) -> &dyn Advisor {
        self.advisor
    }

    fn counters(&self) -> &HintCounters {
        &self.hint_counters
    }
}
