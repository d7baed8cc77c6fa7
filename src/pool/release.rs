//! Giving memory back: the hinter's regular pass, hinting on demand, releasing everything
//! idle at once, the resident budget, and hinting under memory pressure.
//!
//! - A regular pass (the hinter thread) takes cold blocks at or above the hint order,
//!   within the pass budget.
//! - With a resident budget (`resident_free_limit`), a pass also takes the oldest free
//!   blocks of any order, warm or not, until the free memory that is resident (caches
//!   included) fits the budget: the operator sets bytes, not milliseconds.
//! - [`release_idle`](PoolCore::release_idle) drains every cache it can reach and hints
//!   every free block now.
//! - Under memory pressure (see the pressure watcher), advice is `MADV_DONTNEED`, whatever
//!   the configured mode: the memory must go now, not when the kernel gets to it.

use super::PoolCore;
use crate::FRAME_SIZE;
use crate::config::HintMode;
use crate::frame_table::FreeClass;
use crate::policy::hint::{PassOutcome, PassPlan, cold_ms, run_pass};
use crate::sync::Ordering;

/// What [`PagePool::hint_now`](crate::PagePool::hint_now) or
/// [`PagePool::release_idle`](crate::PagePool::release_idle) gave back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintReport {
    /// Blocks advised.
    pub blocks: u64,
    /// Bytes advised (what was resident of them left the process, or leaves it under
    /// `MADV_FREE` when the kernel needs the memory).
    pub bytes: u64,
    /// Blocks whose advice failed (they stay free and unhinted).
    pub failures: u64,
}

impl HintReport {
    fn add(&mut self, outcome: &PassOutcome) {
        self.blocks += outcome.blocks;
        self.bytes += outcome.bytes;
        self.failures += outcome.failures;
    }
}

impl PoolCore {
    /// The advice hinting uses now: the configured mode, or `MADV_DONTNEED` while the
    /// process is under memory pressure.
    pub(crate) fn hint_mode(&self) -> HintMode {
        if self.under_pressure.load(Ordering::Relaxed) {
            HintMode::DontNeed
        } else {
            self.config.hint.mode
        }
    }

    /// Switches pressure mode on or off (the pressure watcher).
    #[allow(dead_code)] // the pressure watcher comes next
    pub(crate) fn set_pressure(&self, on: bool) {
        self.under_pressure.store(on, Ordering::Relaxed);
    }

    /// Every block at or above the hint order, however warm, within `budget_bytes`.
    fn all_at_or_above_hint_order(&self, budget_bytes: u64) -> PassPlan {
        PassPlan {
            cold_ms: None,
            budget_bytes,
            min_order: self.resolved.hint_min_order,
            max_order: self.resolved.max_order,
            mode: self.hint_mode(),
            from: FreeClass::Unhinted,
        }
    }

    /// The hinter thread's pass: cold blocks at or above the hint order within the pass
    /// budget, then, over a resident budget, the oldest blocks of any order until it fits.
    pub(crate) fn regular_pass(&self) -> PassOutcome {
        let config = &self.config.hint;
        let mut outcome = run_pass(
            self,
            &PassPlan {
                cold_ms: Some(cold_ms(config)),
                budget_bytes: config.pass_bytes as u64,
                min_order: self.resolved.hint_min_order,
                max_order: self.resolved.max_order,
                mode: self.hint_mode(),
                from: FreeClass::Unhinted,
            },
        );
        self.idle_pass(&mut outcome);
        if let Some(limit) = self.config.resident_free_limit {
            let over = self.over_limit(limit as u64);
            if over > 0 {
                let extra = self.hint_down_to_limit(limit as u64, over);
                outcome.add_counts(&extra);
                // Still over (blocks cannot be given back as fast as they are freed, or
                // advice failed): come back after the interval.
                outcome.budget_spent |= self.over_limit(limit as u64) > 0;
            }
        }
        outcome
    }

    /// Once no CPU has used its cache for the hint delay, also hints the cold free blocks
    /// between the idle hint order and the hint order (`idle_hint_min_order`) and gives
    /// back the frame table's pages under whole hinted chunks (as `release_idle` does, see
    /// `shard::vacant`); while the pool is busy, only schedules the pass that will look
    /// again when it could be idle.
    fn idle_pass(&self, outcome: &mut PassOutcome) {
        let (low, high) = (
            self.resolved.idle_hint_min_order,
            self.resolved.hint_min_order,
        );
        if low >= high {
            return;
        }
        let config = &self.config.hint;
        let cold = cold_ms(config);
        let Some(quiet) = self.cpu_caches_quiet_ms(crate::sync::now_ms()) else {
            return;
        };
        if quiet < cold {
            let small_resident = self
                .all_shards()
                .any(|s| s.unhinted_at_or_above(low, high - 1) > 0);
            if small_resident {
                outcome.come_back_within(cold - quiet);
            }
            return;
        }
        let idle = run_pass(
            self,
            &PassPlan {
                cold_ms: Some(cold),
                budget_bytes: config.pass_bytes as u64,
                min_order: low,
                max_order: high - 1,
                mode: self.hint_mode(),
                from: FreeClass::Unhinted,
            },
        );
        outcome.absorb(&idle);
        self.vacate_free_chunks();
    }

    /// Bytes of resident free memory above `limit`.
    fn over_limit(&self, limit: u64) -> u64 {
        self.resident_free_bytes().saturating_sub(limit)
    }

    /// Free memory that is resident: free blocks neither hinted nor known to be zero
    /// (the shards' caches included), and what the per-CPU caches hold. Read without locks.
    pub(crate) fn resident_free_bytes(&self) -> u64 {
        let shards: u64 = self
            .all_shards()
            .flat_map(|s| s.counters.iter().enumerate())
            .map(|(order, c)| (c.unhinted() + c.cached.load(Ordering::Relaxed)) << order)
            .sum::<u64>()
            * FRAME_SIZE as u64;
        let cpu = self
            .cpu
            .as_ref()
            .map_or(0, |cpu| (0..cpu.cpus()).map(|c| cpu.bytes(c)).sum::<u64>());
        shards + cpu
    }

    /// Gives back about `over` bytes of resident free memory, oldest of the largest blocks
    /// first, warm or not: caches first merged back into the shards, so what they hold can
    /// go too.
    fn hint_down_to_limit(&self, limit: u64, over: u64) -> PassOutcome {
        let mut outcome = PassOutcome::default();
        let mut plan = PassPlan {
            cold_ms: None,
            budget_bytes: over,
            min_order: 0,
            max_order: self.resolved.max_order,
            mode: self.hint_mode(),
            from: FreeClass::Unhinted,
        };
        let first = run_pass(self, &plan);
        outcome.add_counts(&first);
        let over = self.over_limit(limit);
        if over > 0 {
            self.release_idle_caches(None);
            self.drain_caches();
            plan.budget_bytes = over;
            outcome.add_counts(&run_pass(self, &plan));
        }
        outcome
    }

    /// Hints every unhinted free block at or above the hint order now, whether cold or not.
    pub(crate) fn hint_now(&self) -> HintReport {
        let mut released = HintReport::default();
        released.add(&run_pass(self, &self.all_at_or_above_hint_order(u64::MAX)));
        released
    }

    /// Drains every cache this pool can reach (per-CPU caches, the shards' caches, the
    /// layer above's) and hints every free block at or above the hint order with the
    /// pool's advice, and, when `min_order` is lower, the smaller free blocks down to it
    /// with `MADV_DONTNEED` (which splits transparent huge pages).
    pub(crate) fn release_idle(&self, min_order: u8) -> HintReport {
        self.release_idle_caches(None);
        self.drain_caches();
        let mut released = self.hint_now();
        let hint_order = self.resolved.hint_min_order;
        if min_order < hint_order {
            let small = run_pass(
                self,
                &PassPlan {
                    cold_ms: None,
                    budget_bytes: u64::MAX,
                    min_order,
                    max_order: hint_order - 1,
                    mode: HintMode::DontNeed,
                    from: FreeClass::Unhinted,
                },
            );
            released.add(&small);
        }
        if self.under_pressure.load(Ordering::Relaxed) && self.config.hint.mode == HintMode::Free {
            // Lazily freed memory still counts against a cgroup's limit until the kernel
            // reclaims it, which is the stall pressure warns of: drop it now (vacant
            // chunks too, listed again for the pass).
            let env = self.env();
            let mut shared = self.shared.lock(&env);
            shared.restore_vacant(FreeClass::Hinted);
            self.unlock(shared);
            let lazy = run_pass(
                self,
                &PassPlan {
                    cold_ms: None,
                    budget_bytes: u64::MAX,
                    min_order,
                    max_order: self.resolved.max_order,
                    mode: HintMode::DontNeed,
                    from: FreeClass::Hinted,
                },
            );
            released.add(&lazy);
        }
        self.vacate_free_chunks();
        if released.bytes > 0 && self.config.hint.mode == HintMode::Free {
            // What was just lazily freed shows as `LazyFree` at once, not after the
            // kernel's per-CPU batch happens to drain.
            self.advisor.settle_lazy_free();
        }
        released
    }

    /// Every shard gives its hinted and zero whole chunks to the shared pool, which makes
    /// them vacant and gives back the frame table's pages that held their entries (see
    /// `shard::vacant`). Returns how many chunks became vacant.
    pub(crate) fn vacate_free_chunks(&self) -> u32 {
        let env = self.env();
        for shard in self.shards.iter() {
            let mut locked = shard.lock(&env);
            locked.surrender_free_chunks();
            self.unlock(locked);
        }
        let mut shared = self.shared.lock(&env);
        let vacated = shared.vacate_free_chunks();
        self.unlock(shared);
        vacated
    }
}
