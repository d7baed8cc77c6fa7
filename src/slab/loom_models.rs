//! loom models of the small-object layer's concurrent protocols, driving the real code.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p pagepool --lib --release -- slab`
//! (`loom-tests/run.sh` does, with `LOOM_MAX_PREEMPTIONS=2`).
//!
//! - `remote_frees_race_a_collection`: two threads push three objects on a remote queue
//!   while the owner collects it. The ring has two cells under loom, so pushes also
//!   overflow to the stack; links are loom cells, so a push whose link write is not
//!   published by its compare-and-swap, or a walk that reads a link before the swap, fails
//!   the model, as does a cell reused before the owner read it (the owner's tail published
//!   too early, or without release and acquire). Every object is collected
//!   exactly once, including one whose producer stalled between claiming a cell and
//!   writing it (the first collection stops there, the second finds it).
//! - `a_free_races_a_drain_of_its_cpu`: the real layer over a heap-backed pool, one CPU
//!   (loom's): a thread frees an object (the fast path's `push_if_on`, or, with the CPU
//!   stopped by the drain, the slow path) while another drains the CPU and releases empty
//!   slabs (`release(None)`, the idle release). Afterwards every object is back and every
//!   slab returned to the pool: nothing lost, nothing freed twice.
//! - `a_remote_free_races_a_refill`: an object arrives on the heap's remote queue while
//!   the owner refills its cache (which collects the queue under the heap lock).
//!
//! loom sees one CPU (`current_cpu` is 0), so the models use the portable per-CPU stacks
//! (the rseq ones get their atomicity from the kernel, which loom cannot model).

use loom::thread;

use super::SlabAlloc;
use super::classes::INFO;
use super::remote::{Links, RemoteQueue};
use crate::config::PoolBuilder;
use crate::os::mapping::Backing;
use crate::pool::PoolCore;
use crate::sync::Arc;

// === the remote queue alone ===

/// Objects 1..=N whose links are loom cells.
struct Cells(Vec<loom::cell::UnsafeCell<usize>>);

impl Links for Cells {
    unsafe fn write(&self, obj: usize, next: usize) {
        self.0[obj - 1].with_mut(|p| {
            // SAFETY: loom checks that nobody else accesses the cell meanwhile.
            unsafe { *p = next }
        });
    }

    unsafe fn read(&self, obj: usize) -> usize {
        // SAFETY: as above.
        self.0[obj - 1].with(|p| unsafe { *p })
    }
}

#[test]
fn remote_frees_race_a_collection() {
    loom::model(|| {
        let queue = Arc::new(RemoteQueue::new());
        let cells = Arc::new(Cells(
            (0..3).map(|_| loom::cell::UnsafeCell::new(0)).collect(),
        ));
        let pushers: Vec<_> = [vec![1usize, 2], vec![3]]
            .into_iter()
            .map(|objs| {
                let (queue, cells) = (queue.clone(), cells.clone());
                thread::spawn(move || {
                    for obj in objs {
                        // SAFETY: each object is pushed once, by this thread.
                        unsafe { queue.push(&*cells, obj) };
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        // Let the pushers run first in loom's first execution: its search remembers only
        // the last access to an atomic, so it would never move a push before an earlier
        // load; from this order it explores the take before each push.
        thread::yield_now();
        // SAFETY: this thread is the only collector; objects are not reused.
        unsafe { queue.collect(&*cells, |obj| seen.push(obj)) };
        for p in pushers {
            p.join().unwrap();
        }
        // SAFETY: as above.
        unsafe { queue.collect(&*cells, |obj| seen.push(obj)) };
        seen.sort_unstable();
        assert_eq!(seen, [1, 2, 3], "an object was lost or collected twice");
        assert!(queue.is_empty());
    });
}

// === the layer over a pool ===

/// A pool of one 32 KiB chunk and the layer over it. The layer borrows the pool, so both
/// live in one allocation that is dropped layer first.
struct Setup {
    slab: std::mem::ManuallyDrop<SlabAlloc>,
    core: Box<PoolCore>,
}

impl Setup {
    fn new() -> Arc<Self> {
        let config = PoolBuilder::new()
            .backing(Backing::Heap)
            .capacity(32 << 10)
            .max_order(3)
            .shards(1)
            .hint_thread(false)
            .cache_blocks(0)
            // The pool's own per-CPU block caches have their models (`percpu`,
            // `loom-tests`); here they would only multiply the branches of every slab
            // refill and release past loom's limit.
            .cpu_cache(crate::CpuCacheMode::Off);
        let core = Box::new(PoolCore::new(&config).expect("a heap-backed pool"));
        // SAFETY: the core is boxed (a stable address) and outlives the layer (`Drop`).
        let slab = unsafe { SlabAlloc::new(&core, Backing::Heap) }.expect("the layer");
        Arc::new(Setup {
            slab: std::mem::ManuallyDrop::new(slab),
            core,
        })
    }

    /// Everything back: no object out, no slab held, the pool's books balanced.
    fn all_back(&self) {
        self.slab.release(None);
        let totals = self.slab.totals();
        assert_eq!(totals.live_objects, 0, "{totals:?}");
        assert_eq!(totals.slabs, 0, "{totals:?}");
        self.slab.check_consistency().unwrap();
        assert_eq!(self.core.stats().allocated_bytes, 0);
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // SAFETY: dropped once, before the core it borrows.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.slab) };
    }
}

/// An object of class 0 (16 bytes), through the refill path.
fn object(setup: &Setup) -> usize {
    let ptr = setup
        .slab
        .alloc(0)
        .or_else(|| setup.slab.alloc_slow(0, None));
    ptr.expect("the pool has room").as_ptr().addr()
}

/// Frees the object at `addr` through the real free path.
fn free(setup: &Setup, addr: usize) {
    let ptr = setup.slab.ptr(addr);
    match setup.slab.find(ptr) {
        // SAFETY: a live object of this layer, freed once.
        super::Found::Object(entry) => unsafe { setup.slab.free(ptr, entry) },
        other => panic!("{addr:#x} is {other:?}, not an object"),
    }
}

#[test]
fn a_free_races_a_drain_of_its_cpu() {
    loom::model(|| {
        let setup = Setup::new();
        let (a, b) = (object(&setup), object(&setup));
        let freer = {
            let setup = setup.clone();
            thread::spawn(move || free(&setup, a))
        };
        let drainer = {
            let setup = setup.clone();
            thread::spawn(move || {
                let _inside = super::reentry::Reentry::enter();
                setup.slab.release(None);
            })
        };
        freer.join().unwrap();
        drainer.join().unwrap();
        free(&setup, b);
        setup.all_back();
    });
}

#[test]
fn a_remote_free_races_a_refill() {
    loom::model(|| {
        let setup = Setup::new();
        let a = object(&setup);
        let remote = {
            let setup = setup.clone();
            // What a free on another CPU does: the object goes to its owner's queue.
            thread::spawn(move || {
                let ptr = setup.slab.ptr(a);
                // SAFETY: the object is live and freed once; the mark is what `free`
                // writes before choosing the remote path.
                unsafe { super::mark_word(ptr).write(setup.slab.key ^ a as u64) };
                setup.slab.free_remote(a, 0);
            })
        };
        // The owner empties its cache and refills (collecting the queue if the free has
        // arrived), then frees what it took. The yield lets the free go first in loom's
        // first execution (see `remote_frees_race_a_collection`).
        thread::yield_now();
        let mut taken = Vec::new();
        for _ in 0..INFO[0].batch as usize + 1 {
            taken.push(object(&setup));
        }
        remote.join().unwrap();
        for addr in taken {
            free(&setup, addr);
        }
        setup.all_back();
    });
}
