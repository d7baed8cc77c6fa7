//! One CPU's heap: the slabs it owns, by class and occupancy, and the slow-path work done
//! under its lock (refills, spills, collecting remote frees, emptying slabs).
//!
//! ```text
//!  Heap (one per possible CPU)
//!  +-- remote: RemoteQueue           objects freed on other CPUs (lock-free, own lines)
//!  +-- state: Mutex<HeapState>
//!  |     bins[class][0..4]           partial slabs by occupancy: bin b holds slabs with
//!  |                                 b/4 <= used/objects < (b+1)/4
//!  |     spares[order]               at most one empty slab per slab order
//!  +-- counters                      bytes and objects, for statistics (written under
//!                                    the lock, read without it)
//! ```
//!
//! Full slabs are on no list: an object coming back finds its slab through the slab map.
//!
//! # Which slab serves a refill
//! Remote frees are collected first (they may complete slabs), then objects come from the
//! partial slab in the fullest non-empty bin: its free list first, then its never-carved
//! tail. Only when no slab of the class has a free object is a spare reused or a fresh
//! block taken from the pool. Taking from the fullest slabs leaves the sparse ones alone,
//! so their objects drain away as they are freed, the slab empties, and its block goes
//! back to the pool (tcmalloc's span prioritisation, with four occupancy bins). Measured
//! in the README (fragmentation workload).
//!
//! # Empty slabs
//! A slab whose last object comes back is kept as its order's spare if that slot is free
//! (so a class oscillating around a slab boundary does not take and free a block each
//! time), else its block goes back to the pool at once, where it coalesces and, once cold
//! and large enough, is given back to the OS by the hinter. Spares are released by the
//! idle release after the hint delay.

use std::ptr;

use crossbeam_utils::CachePadded;

use super::SlabAlloc;
use super::classes::{CLASSES, GRANULE_SHIFT, INFO, MAX_SLAB_ORDER, SLAB_MIN_ORDER};
use super::fatal;
use super::map::{SlabData, list};
use super::remote::{Links, RemoteQueue};
use crate::frame_table::FreeClass;
use crate::sync::{AtomicU32, AtomicU64, Mutex, MutexGuard, Ordering, now_ms};

/// Occupancy bins of partial slabs per class.
pub(crate) const BINS: usize = 4;
/// Slab orders, one spare slot each.
const SPARE_ORDERS: usize = (MAX_SLAB_ORDER - SLAB_MIN_ORDER + 1) as usize;

/// Tag bit of a cached item: the object was never handed out and its slab's memory was
/// known to be zero, so `alloc_zeroed` needs no `memset` (objects are 8-byte aligned, so
/// the bit is free).
pub(crate) const FRESH: u64 = 1;

// === impl Heap ===

/// One CPU's heap; see the module docs.
pub(crate) struct Heap {
    /// Objects freed on other CPUs, waiting for this heap (its own cache lines, the last
    /// padded too: every other CPU may write them).
    pub(crate) remote: CachePadded<RemoteQueue>,
    pub(crate) state: Mutex<HeapState>,
    pub(crate) counters: HeapCounters,
    /// When this CPU was last seen active (`now_ms`), for the idle release; written only
    /// by the releasing thread under the lock.
    pub(crate) last_active: AtomicU32,
}

/// What the heap lock protects.
pub(crate) struct HeapState {
    /// Partial slabs per class and occupancy bin: first granule + 1 of the list's first
    /// slab (0: empty).
    bins: [[u32; BINS]; CLASSES],
    /// At most one empty slab per order: first granule + 1 (0: none).
    spares: [u32; SPARE_ORDERS],
}

/// A heap's books, written only under its lock (plain stores), read by anyone.
pub(crate) struct HeapCounters {
    /// Bytes of the pool blocks this heap holds as slabs (spares included).
    pub(crate) slab_bytes: AtomicU64,
    /// Slabs it holds.
    pub(crate) slabs: AtomicU64,
    /// Objects out of its slabs (live, cached, or waiting in a remote queue), and bytes.
    pub(crate) out_objects: AtomicU64,
    pub(crate) out_bytes: AtomicU64,
    /// Refills of a CPU cache, spills of a full one, objects collected from the remote
    /// queue, slabs taken from and given back to the pool: totals.
    pub(crate) refills: AtomicU64,
    pub(crate) spills: AtomicU64,
    pub(crate) collected: AtomicU64,
    pub(crate) made: AtomicU64,
    pub(crate) released: AtomicU64,
}

impl HeapCounters {
    fn new() -> Self {
        Self {
            slab_bytes: AtomicU64::new(0),
            slabs: AtomicU64::new(0),
            out_objects: AtomicU64::new(0),
            out_bytes: AtomicU64::new(0),
            refills: AtomicU64::new(0),
            spills: AtomicU64::new(0),
            collected: AtomicU64::new(0),
            made: AtomicU64::new(0),
            released: AtomicU64::new(0),
        }
    }
}

/// Adds `delta` (wrapping, so a subtraction is the negated delta) with a load and a
/// store: only the heap lock's holder writes these counters.
#[inline]
pub(crate) fn add(counter: &AtomicU64, delta: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(delta),
        Ordering::Relaxed,
    );
}

impl Heap {
    pub(crate) fn new() -> Self {
        Self {
            remote: CachePadded::new(RemoteQueue::new()),
            state: Mutex::new(HeapState {
                bins: [[0; BINS]; CLASSES],
                spares: [0; SPARE_ORDERS],
            }),
            counters: HeapCounters::new(),
            last_active: AtomicU32::new(0),
        }
    }
}

/// Links of the remote queue: the object's first word, as an address.
pub(crate) struct ObjectLinks<'a>(pub(crate) &'a SlabAlloc);

impl Links for ObjectLinks<'_> {
    unsafe fn write(&self, obj: usize, next: usize) {
        // SAFETY: the caller's guarantee: a free object of the region, at least two words,
        // 8-byte aligned (every class is a multiple of 8 bytes in a 16 KiB-aligned slab).
        unsafe { self.0.ptr(obj).cast::<usize>().write(next) }
    }

    unsafe fn read(&self, obj: usize) -> usize {
        // SAFETY: as above; the link was written before the push that published it.
        unsafe { self.0.ptr(obj).cast::<usize>().read() }
    }
}

// === impl Locked ===

/// A heap with its lock held, and the layer it belongs to.
pub(crate) struct Locked<'a> {
    slab: &'a SlabAlloc,
    cpu: usize,
    heap: &'a Heap,
    state: MutexGuard<'a, HeapState>,
    /// For the idle release: slabs emptied under this lock go straight to the pool's
    /// shards as free since this time (the CPU's last activity), not through the calling
    /// CPU's block cache. Housekeeping is not the program's activity, and the memory has
    /// been unused since then (the pool hints small blocks once it rests).
    idle_since: Option<u32>,
}

impl SlabAlloc {
    /// Locks CPU `cpu`'s heap.
    pub(crate) fn lock(&self, cpu: usize) -> Locked<'_> {
        let heap = &self.heaps[cpu];
        Locked {
            slab: self,
            cpu,
            heap,
            state: heap.state.lock(),
            idle_since: None,
        }
    }
}

impl Locked<'_> {
    /// From now on, slabs emptied under this lock skip the pool's per-CPU caches and go
    /// back as unused since `since` (see `idle_since`): for the idle release.
    pub(crate) fn release_as_idle_since(&mut self, since: u32) {
        self.idle_since = Some(since);
    }

    /// The CPU whose heap this is.
    pub(crate) fn cpu(&self) -> usize {
        self.cpu
    }

    /// The state of the slab whose first granule is `first`.
    ///
    /// Every slab this is called for belongs to this heap (checked where objects come
    /// in), so the heap lock we hold makes the access exclusive. Callers keep at most one
    /// reference per slab alive at a time.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    fn desc(&self, first: usize) -> &mut SlabData {
        // SAFETY: the slab is owned by this heap (see above) and we hold the heap's lock
        // for as long as `self` lives, which bounds the reference.
        unsafe { self.slab.map.desc(first).data() }
    }

    // --- lists -------------------------------------------------------------------------

    /// Puts slab `first` (of `class`) at the front of partial bin `bin`.
    fn link(&mut self, first: usize, class: usize, bin: usize) {
        let old = std::mem::replace(&mut self.state.bins[class][bin], first as u32 + 1);
        {
            let d = self.desc(first);
            d.prev = 0;
            d.next = old;
            d.list = list::BIN0 + bin as u8;
        }
        if old != 0 {
            self.desc(old as usize - 1).prev = first as u32 + 1;
        }
    }

    /// Takes slab `first` off whatever list it is on.
    fn unlink(&mut self, first: usize) {
        let (class, which, prev, next) = {
            let d = self.desc(first);
            let out = (d.class as usize, d.list, d.prev, d.next);
            d.prev = 0;
            d.next = 0;
            d.list = list::NONE;
            out
        };
        if which < list::BIN0 {
            return;
        }
        if prev != 0 {
            self.desc(prev as usize - 1).next = next;
        } else {
            self.state.bins[class][(which - list::BIN0) as usize] = next;
        }
        if next != 0 {
            self.desc(next as usize - 1).prev = prev;
        }
    }

    /// Moves slab `first` to the list its count of objects out calls for: full, or the
    /// partial bin of its occupancy. (An empty slab is handled by `emptied`.)
    fn settle(&mut self, first: usize) {
        let (class, used, now) = {
            let d = self.desc(first);
            (d.class as usize, d.used, d.list)
        };
        let info = &INFO[class];
        let want = if used == info.objects {
            list::FULL
        } else {
            list::BIN0 + info.bin(used) as u8
        };
        if want == now {
            return;
        }
        self.unlink(first);
        if want == list::FULL {
            self.desc(first).list = list::FULL;
        } else {
            self.link(first, class, (want - list::BIN0) as usize);
        }
    }

    /// The partial slab of `class` a refill takes from: the fullest bin's first.
    fn best(&self, class: usize) -> Option<usize> {
        self.state.bins[class]
            .iter()
            .rev()
            .find(|&&head| head != 0)
            .map(|&head| head as usize - 1)
    }

    // --- slabs -------------------------------------------------------------------------

    /// A new, empty slab of `class` on bin 0: the spare of its order if there is one,
    /// else a fresh block from the pool. `None` when the pool has no block.
    fn new_slab(&mut self, class: usize) -> Option<usize> {
        let order = INFO[class].slab_order;
        let slot = (order - SLAB_MIN_ORDER) as usize;
        let (first, zero) = if self.state.spares[slot] != 0 {
            let first = std::mem::take(&mut self.state.spares[slot]) as usize - 1;
            (first, false)
        } else {
            let core = self.slab.core();
            let (idx, free_class) = core.alloc_frame(order, false, None).ok()?;
            let offset = self.slab.offset(core.frame_ptr(idx).as_ptr().addr());
            let c = &self.heap.counters;
            add(&c.slabs, 1);
            add(&c.slab_bytes, INFO[class].slab_bytes() as u64);
            add(&c.made, 1);
            (offset >> GRANULE_SHIFT, free_class == FreeClass::Zero)
        };
        // The entries first: no object of the slab is out yet, so nobody reads them.
        self.slab
            .map
            .set(first, 1 << (order - SLAB_MIN_ORDER), self.cpu, class);
        *self.desc(first) = SlabData {
            free: ptr::null_mut(),
            bump: 0,
            used: 0,
            prev: 0,
            next: 0,
            class: class as u8,
            list: list::NONE,
            zero,
            since: 0,
        };
        self.link(first, class, 0);
        Some(first)
    }

    /// Slab `first` has no object out any more: keep it as its order's spare, or give its
    /// block back to the pool.
    fn emptied(&mut self, first: usize) {
        self.unlink(first);
        let order = INFO[self.desc(first).class as usize].slab_order;
        let slot = (order - SLAB_MIN_ORDER) as usize;
        if self.state.spares[slot] == 0 {
            let d = self.desc(first);
            d.free = ptr::null_mut();
            d.bump = 0;
            d.zero = false;
            d.list = list::SPARE;
            d.since = now_ms();
            self.state.spares[slot] = first as u32 + 1;
        } else {
            self.release_slab(first, order, None);
        }
    }

    /// Gives slab `first`'s block (of `order`) back to the pool; `since`: unused since
    /// then (an idle spare), else as the lock says.
    fn release_slab(&mut self, first: usize, order: u8, since: Option<u32>) {
        self.slab.map.clear(first, 1 << (order - SLAB_MIN_ORDER));
        self.desc(first).list = list::NONE;
        let core = self.slab.core();
        let ptr = self.slab.ptr(self.slab.granule_addr(first));
        let freed = core
            .frame_of(ptr)
            .and_then(|idx| match since.or(self.idle_since) {
                Some(since) => core.free_frame_idle(idx, order, since),
                None => core.free_frame(idx, Some(order)).map(|_| ()),
            });
        if freed.is_err() {
            fatal(b"pagepool: a slab's block was not allocated in the pool (heap corruption)\n");
        }
        let c = &self.heap.counters;
        add(&c.slabs, 1u64.wrapping_neg());
        add(
            &c.slab_bytes,
            ((crate::FRAME_SIZE as u64) << order).wrapping_neg(),
        );
        add(&c.released, 1);
    }

    /// Releases the spares that have been spares for at least `idle_ms` (all for `None`);
    /// returns the milliseconds until the next one would be.
    pub(crate) fn release_spares(&mut self, now: u32, idle_ms: Option<u32>) -> Option<u32> {
        let mut wait: Option<u32> = None;
        for slot in 0..SPARE_ORDERS {
            let spare = self.state.spares[slot];
            if spare == 0 {
                continue;
            }
            let first = spare as usize - 1;
            let age = now.wrapping_sub(self.desc(first).since);
            match idle_ms {
                Some(ms) if age < ms => {
                    wait = Some(wait.map_or(ms - age, |w| w.min(ms - age)));
                }
                _ => {
                    self.state.spares[slot] = 0;
                    // A spare has been unused since it became one.
                    let since = self.desc(first).since;
                    self.release_slab(first, SLAB_MIN_ORDER + slot as u8, Some(since));
                }
            }
        }
        wait
    }

    // --- objects -----------------------------------------------------------------------

    /// Takes up to `out.len()` objects of `class` for a refill: the remote queue is
    /// collected first, then the fullest partial slabs give their free objects and their
    /// never-carved tails, then new slabs. Items are addresses, tagged [`FRESH`] when known
    /// to be zero. Returns how many it took (0: the pool is exhausted).
    pub(crate) fn fill(&mut self, class: usize, out: &mut [u64]) -> usize {
        self.collect_remote();
        let info = &INFO[class];
        let size = info.size as usize;
        let mut n = 0;
        while n < out.len() {
            let Some(first) = self.best(class).or_else(|| self.new_slab(class)) else {
                break;
            };
            let start = self.slab.granule_addr(first);
            {
                let d = self.desc(first);
                while n < out.len() && !d.free.is_null() {
                    let obj = d.free;
                    // SAFETY: objects on a slab's free list are free objects of the
                    // region; `put_back` wrote the link into their first word.
                    d.free = unsafe { obj.cast::<*mut u8>().read() };
                    out[n] = obj.addr() as u64;
                    d.used += 1;
                    n += 1;
                }
                let tag = if d.zero { FRESH } else { 0 };
                while n < out.len() && d.bump < info.objects {
                    out[n] = (start + d.bump as usize * size) as u64 | tag;
                    d.bump += 1;
                    d.used += 1;
                    n += 1;
                }
            }
            self.settle(first);
        }
        let c = &self.heap.counters;
        add(&c.out_objects, n as u64);
        add(&c.out_bytes, (n * size) as u64);
        add(&c.refills, 1);
        n
    }

    /// Puts the object at `addr` back on its slab's free list. The object must belong to
    /// this heap (refused with an abort otherwise: that is heap corruption or a double
    /// free that got past the mark).
    pub(crate) fn put_back(&mut self, addr: usize) {
        let offset = self.slab.offset(addr);
        let entry = if offset < self.slab.len {
            self.slab.map.entry(offset)
        } else {
            super::map::Entry::NONE
        };
        if !entry.is_slab() || entry.owner() != self.cpu {
            fatal(b"pagepool: a small object came back to a heap that does not own it (double free or heap corruption)\n");
        }
        let first = (offset >> GRANULE_SHIFT) - entry.back();
        let obj = self.slab.ptr(addr);
        let (class, used) = {
            let d = self.desc(first);
            if d.used == 0 || d.list < list::FULL || d.list == list::SPARE {
                fatal(b"pagepool: a small object was freed twice (its slab has none out)\n");
            }
            // SAFETY: the object is free (it came back from a cache, a remote queue or a
            // spill), and at least two words long: the link, and the free mark (already
            // there unless the object came straight from a refill, never handed out).
            unsafe {
                obj.cast::<*mut u8>().write(d.free);
                super::mark_word(obj).write(self.slab.key ^ addr as u64);
            }
            d.free = obj;
            d.used -= 1;
            (d.class as usize, d.used)
        };
        let info = &INFO[class];
        let c = &self.heap.counters;
        add(&c.out_objects, 1u64.wrapping_neg());
        add(&c.out_bytes, (info.size as u64).wrapping_neg());
        if used == 0 {
            self.emptied(first);
        } else if info.leaves_list_at(used + 1) {
            self.settle(first);
        }
    }

    /// Puts cached items (addresses, maybe tagged) back on their slabs.
    pub(crate) fn put_back_items(&mut self, items: &[u64]) {
        for &item in items {
            self.put_back((item & !FRESH) as usize);
        }
    }

    /// Collects this heap's remote frees onto their slabs; returns how many.
    pub(crate) fn collect_remote(&mut self) -> usize {
        let heap = self.heap;
        if heap.remote.is_empty() {
            return 0;
        }
        let links = ObjectLinks(self.slab);
        // The heap lock makes us the queue's one collector; `collect` reads each stack link
        // (an object's first word) before `put_back` rewrites it.
        // SAFETY: as just said.
        let n = unsafe { heap.remote.collect(&links, |obj| self.put_back(obj)) };
        add(&heap.counters.collected, n as u64);
        n
    }

    /// Counts a spill of a full cache.
    pub(crate) fn note_spill(&self) {
        add(&self.heap.counters.spills, 1);
    }

    // --- audit -------------------------------------------------------------------------

    /// The partial slabs of `class` in bin `bin`, first granules, in list order, checking
    /// the links on the way.
    pub(crate) fn bin_slabs(&self, class: usize, bin: usize) -> Result<Vec<usize>, String> {
        let mut out = Vec::new();
        let mut at = self.state.bins[class][bin];
        let mut prev = 0;
        while at != 0 {
            let first = at as usize - 1;
            let d = self.desc(first);
            if d.prev != prev {
                return Err(format!(
                    "slab at granule {first}: prev link {} != {prev}",
                    d.prev
                ));
            }
            if d.list != list::BIN0 + bin as u8 || d.class as usize != class {
                return Err(format!(
                    "slab at granule {first}: on bin {bin} of class {class} but says list {} class {}",
                    d.list, d.class
                ));
            }
            out.push(first);
            if out.len() > self.slab.map.granules() {
                return Err(format!("bin {bin} of class {class} loops"));
            }
            prev = at;
            at = d.next;
        }
        Ok(out)
    }

    /// The spares, first granules.
    pub(crate) fn spare_slabs(&self) -> impl Iterator<Item = usize> + '_ {
        self.state
            .spares
            .iter()
            .filter(|&&s| s != 0)
            .map(|&s| s as usize - 1)
    }

    /// A copy of slab `first`'s state (the slab must be this heap's).
    pub(crate) fn slab_state(&self, first: usize) -> SlabSnapshot {
        let d = self.desc(first);
        SlabSnapshot {
            free: d.free,
            bump: d.bump,
            used: d.used,
            class: d.class as usize,
            list: d.list,
        }
    }

    /// The heap's counters.
    pub(crate) fn counters(&self) -> &HeapCounters {
        &self.heap.counters
    }
}

/// What the audit reads of a slab.
pub(crate) struct SlabSnapshot {
    pub(crate) free: *mut u8,
    pub(crate) bump: u32,
    pub(crate) used: u32,
    pub(crate) class: usize,
    pub(crate) list: u8,
}
