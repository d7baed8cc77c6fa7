//! The consistency check of the layer (tests only; off every hot path).

use super::SlabAlloc;
use super::classes::{GRANULE_SHIFT, INFO, SLAB_MIN_ORDER};
use super::heap::{BINS, Locked};
use super::map::list;
use super::mark_word;
use crate::sync::Ordering;

impl SlabAlloc {
    /// Gives every cached and queued object back to its slab (and every spare to the
    /// pool), then checks the slab map, every slab's free list and lists, the heaps'
    /// counters, and that the pool holds each slab's block as allocated.
    ///
    /// Meant for tests; other threads may keep allocating and freeing. The caller is
    /// inside the allocator ([`Reentry`](super::reentry::Reentry) set): this allocates its
    /// report, which then goes to the fallback.
    pub(crate) fn check_consistency(&self) -> Result<(), String> {
        self.release(None);
        // With every heap locked, no slab changes: the fast paths of other threads touch
        // only caches and remote queues, never a slab, so the check holds even if they
        // run (it just cannot see their objects).
        let heaps: Vec<Locked<'_>> = (0..self.heaps.len()).map(|cpu| self.lock(cpu)).collect();
        let n = heaps.len();
        let mut slab_bytes = vec![0u64; n];
        let mut slabs = vec![0u64; n];
        let mut out_objects = vec![0u64; n];
        let mut out_bytes = vec![0u64; n];
        let mut binned = vec![0usize; n];
        let granules = self.map.granules();
        let mut g = 0;
        while g < granules {
            let entry = self.map.entry_at(g);
            if !entry.is_slab() {
                g += 1;
                continue;
            }
            if entry.back() != 0 {
                return Err(format!(
                    "granule {g}: entry {entry:?} without its slab's start"
                ));
            }
            let owner = entry.owner();
            if owner >= n {
                return Err(format!("granule {g}: owner {owner} is not a CPU heap"));
            }
            let heap = &heaps[owner];
            let s = heap.slab_state(g);
            let info = &INFO[s.class];
            let order = info.slab_order;
            let span = 1usize << (order - SLAB_MIN_ORDER);
            if s.class != entry.class() {
                return Err(format!(
                    "slab at granule {g}: class {} in its entry, {} in its descriptor",
                    entry.class(),
                    s.class
                ));
            }
            for back in 0..span {
                let e = self.map.entry_at(g + back);
                if !e.is_slab() || e.owner() != owner || e.class() != s.class || e.back() != back {
                    return Err(format!("slab at granule {g}: entry {} is {e:?}", g + back));
                }
            }
            let start = self.granule_addr(g);
            match self.core().order_of(self.ptr(start)) {
                Ok(o) if o == order => {}
                other => {
                    return Err(format!(
                        "slab at granule {g}: the pool says {other:?}, not an allocated block of order {order}"
                    ));
                }
            }
            let objects = info.objects;
            match s.list {
                list::FULL if s.used == objects => {}
                list::SPARE if s.used == 0 && heap.spare_slabs().any(|f| f == g) => {}
                l if l >= list::BIN0
                    && s.used < objects
                    && (l - list::BIN0) as usize == bin(s.used, objects) =>
                {
                    binned[owner] += 1;
                }
                l => {
                    return Err(format!(
                        "slab at granule {g}: list {l} with {} of {objects} objects out",
                        s.used
                    ));
                }
            }
            if s.bump > objects || s.used > s.bump {
                return Err(format!(
                    "slab at granule {g}: {} carved, {} out, of {objects}",
                    s.bump, s.used
                ));
            }
            // The free list: objects of this slab, carved, marked free, each once. Marks
            // are inverted while walking, so a second visit shows; then restored.
            let size = info.size as usize;
            let mut count = 0u32;
            let mut at = s.free;
            let mut walk = Ok(());
            while !at.is_null() {
                let addr = at.addr();
                let off = addr.wrapping_sub(start);
                if off >= s.bump as usize * size || !off.is_multiple_of(size) {
                    walk = Err(format!(
                        "slab at granule {g}: free object {at:p} is not a carved object"
                    ));
                    break;
                }
                let mark = self.key ^ addr as u64;
                // SAFETY: a carved object of a live slab, on its free list: ours.
                let word = unsafe { mark_word(at).read() };
                if word == !mark {
                    walk = Err(format!(
                        "slab at granule {g}: free object {at:p} is on the list twice"
                    ));
                    break;
                }
                if word != mark {
                    walk = Err(format!(
                        "slab at granule {g}: free object {at:p} lacks its free mark"
                    ));
                    break;
                }
                // SAFETY: as above.
                unsafe { mark_word(at).write(!mark) };
                count += 1;
                // SAFETY: as above: the first word is the link.
                at = unsafe { at.cast::<*mut u8>().read() };
            }
            let mut back = s.free;
            while back != at {
                let mark = self.key ^ back.addr() as u64;
                // SAFETY: visited above: a free object of this slab.
                unsafe {
                    mark_word(back).write(mark);
                    back = back.cast::<*mut u8>().read();
                }
            }
            walk?;
            if count != s.bump - s.used {
                return Err(format!(
                    "slab at granule {g}: {count} free objects listed, {} carved and {} out",
                    s.bump, s.used
                ));
            }
            slab_bytes[owner] += info.slab_bytes() as u64;
            slabs[owner] += 1;
            out_objects[owner] += s.used as u64;
            out_bytes[owner] += s.used as u64 * size as u64;
            g += span;
        }
        for (cpu, heap) in heaps.iter().enumerate() {
            let c = heap.counters();
            let load = |a: &crate::sync::AtomicU64| a.load(Ordering::Relaxed);
            let books = (
                load(&c.slab_bytes),
                load(&c.slabs),
                load(&c.out_objects),
                load(&c.out_bytes),
            );
            let found = (
                slab_bytes[cpu],
                slabs[cpu],
                out_objects[cpu],
                out_bytes[cpu],
            );
            if books != found {
                return Err(format!(
                    "heap {cpu}: counters say (slab bytes, slabs, objects out, bytes out) = {books:?}, the slabs {found:?}"
                ));
            }
            let mut listed = 0;
            for class in 0..INFO.len() {
                for b in 0..BINS {
                    for first in heap.bin_slabs(class, b)? {
                        let e = self.map.entry_at(first);
                        if !e.is_slab() || e.owner() != cpu || e.back() != 0 {
                            return Err(format!(
                                "heap {cpu}: bin {b} of class {class} lists granule {first}, entry {e:?}"
                            ));
                        }
                        listed += 1;
                    }
                }
            }
            if listed != binned[cpu] {
                return Err(format!(
                    "heap {cpu}: {listed} slabs on its bins, {} partial slabs in the map",
                    binned[cpu]
                ));
            }
        }
        let _ = GRANULE_SHIFT;
        Ok(())
    }
}

/// The occupancy bin of a partial slab (as the heap computes it).
fn bin(used: u32, objects: u32) -> usize {
    ((used as u64 * BINS as u64) / objects as u64).min(BINS as u64 - 1) as usize
}
