//! What the layer holds, summed over its heaps and caches without taking a lock.

use super::SlabAlloc;
use super::classes::INFO;
use crate::sync::Ordering;

/// Totals of the small-object layer (racy sums of per-heap counters and cache lengths:
/// exact when nothing runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SlabTotals {
    /// Bytes of pool blocks held as slabs (spares included).
    pub(crate) slab_bytes: u64,
    /// Slabs held.
    pub(crate) slabs: u64,
    /// Free objects in per-CPU caches, and their bytes.
    pub(crate) cached_objects: u64,
    pub(crate) cached_bytes: u64,
    /// Objects out of the slabs and not in a cache: live, or freed on another CPU and
    /// waiting in a remote queue; and their bytes.
    pub(crate) live_objects: u64,
    pub(crate) live_bytes: u64,
    /// Cache refills, spills of full caches, objects collected from remote queues, slabs
    /// taken from the pool and given back: totals since the start.
    pub(crate) refills: u64,
    pub(crate) spills: u64,
    pub(crate) remote_frees: u64,
    pub(crate) slabs_made: u64,
    pub(crate) slabs_released: u64,
}

impl SlabAlloc {
    /// The layer's totals. Allocation-free and lock-free.
    pub(crate) fn totals(&self) -> SlabTotals {
        let mut t = SlabTotals::default();
        let mut out_objects = 0u64;
        let mut out_bytes = 0u64;
        for heap in self.heaps.iter() {
            let c = &heap.counters;
            let load = |a: &crate::sync::AtomicU64| a.load(Ordering::Relaxed);
            t.slab_bytes += load(&c.slab_bytes);
            t.slabs += load(&c.slabs);
            out_objects += load(&c.out_objects);
            out_bytes += load(&c.out_bytes);
            t.refills += load(&c.refills);
            t.spills += load(&c.spills);
            t.remote_frees += load(&c.collected);
            t.slabs_made += load(&c.made);
            t.slabs_released += load(&c.released);
        }
        for cpu in 0..self.heaps.len() {
            for (class, info) in INFO.iter().enumerate() {
                let n = self.caches.len(cpu, class) as u64;
                t.cached_objects += n;
                t.cached_bytes += n * info.size as u64;
            }
        }
        t.live_objects = out_objects.saturating_sub(t.cached_objects);
        t.live_bytes = out_bytes.saturating_sub(t.cached_bytes);
        t
    }
}
