//! Per-CPU stacks: a bounded LIFO stack of `u64` items per CPU and per class, with a
//! restartable-sequence fast path and a portable fallback.
//!
//! This is the building block for per-CPU caches in front of a shared allocator (Linux's
//! per-CPU page lists, tcmalloc's per-CPU slabs): a thread pushes and pops items on the
//! stack of the CPU it runs on, with no lock and no atomic read-modify-write, and a
//! background thread drains a CPU's stacks when they sit idle. Items are opaque (frame
//! indices, object addresses); each class has a capacity per CPU fixed at construction.
//!
//! # Two implementations
//!
//! - **rseq** ([`CpuCacheImpl::Rseq`]): every operation is a *restartable sequence*
//!   (Linux `rseq(2)`, the design of tcmalloc's per-CPU slabs, see its `docs/rseq.md`).
//!   The kernel guarantees that a critical section either runs to its end on one CPU
//!   without another thread of that CPU running in between, or is aborted (on preemption,
//!   migration, signal delivery or a `membarrier` request) before its last instruction.
//!   Each section ends with exactly one store, its *commit*, so an aborted section has
//!   changed nothing that anybody reads. The architecture-specific sections live in
//!   `rseq/x86_64.rs` and `rseq/aarch64.rs`.
//! - **portable** ([`CpuCacheImpl::Portable`]): each CPU's area has a lock word taken with
//!   one atomic swap and released with one store. The CPU is a hint from `sched_getcpu`;
//!   a thread that migrated between reading it and taking the lock just works on another
//!   CPU's stack, which is still correct. A busy lock makes the operation fail (the caller
//!   takes its slow path); it never spins on the fast path.
//!
//! [`PerCpuStacks::new`] picks rseq when it was asked for and the process can run it: on
//! x86-64 and aarch64 Linux, outside Miri and loom, when the constructing thread has an
//! rseq area and the kernel can fence a CPU (`membarrier`, see "Draining" below).
//! [`PerCpuStacks::implementation`] says which one an instance uses.
//!
//! # Memory layout
//!
//! All CPUs' areas are one array of 8-byte words from [`MetaArray`]: with
//! [`Backing::Mmap`] it is an anonymous mapping that reads as zeros, and all zeros is the
//! initial state, so nothing is written at construction and a CPU that never runs an
//! operation never touches the pages that hold only its area (an area is a whole number
//! of pages long; with the skew below, its last 2 KiB share a page with the next CPU's
//! header, and only its fullest stacks reach them). Nothing is
//! allocated through the global allocator, so this type can live inside a
//! `#[global_allocator]`.
//!
//! ```text
//!  words: | skew | CPU 0's area | CPU 1's area | ... | CPU (cpus-1)'s area |
//!                |<-- stride -->|  stride: a multiple of 128 bytes (Heap) or 4096 (Mmap);
//!                                  skew: 2176 bytes, so headers are not page-aligned
//!
//!  one CPU's area, in 8-byte words (k classes):
//!  0       1        2         3                 k+1        (zeros up to 64 bytes)
//!  +------+--------+---------+---------+ ... +-----------+-----+
//!  | gate | active | count 0 | count 1 |     | count k-1 | pad |     header
//!  +------+--------+---------+---------+ ... +-----------+-----+
//!  | slots of class 0: cap 0 words | slots of class 1: cap 1 words | ... | pad |
//!  +----------------------------------------------------------------------------+
//!
//!  class c's stack: its first `count c` slots, the top one at slots[c][count c - 1]
//! ```
//!
//! - `gate` is 0 when the CPU's stacks are open. rseq: a drain sets it to stop the CPU.
//!   Portable: it is the CPU's lock (an operation or a drain holds it).
//! - `active` is set to 1 by every operation that runs on the CPU, failed ones included
//!   (an idempotent plain store, so a restarted rseq section may repeat it), and cleared
//!   by [`PerCpuStacks::take_activity`], the idle detector of a background thread.
//! - `count c` is the number of items of class c. It is the only word a commit writes.
//!
//! The bounds (where each class's slots start, its capacity) never change: they live in a
//! per-class [`ClassGeometry`] record, read-only after construction, so a commit can never
//! overwrite them. This plays the part of tcmalloc's per-CPU `Header {current, end, ...}`
//! with `begin` kept elsewhere: only `current` (our count) is ever committed, and the
//! stopped state is a separate word (tcmalloc's `stopped_[cpu]`).
//!
//! # The rseq protocol
//!
//! ```text
//!  restart:  rseq->rseq_cs = &descriptor          publish the section (the kernel
//!                                                   clears it whenever it aborts one)
//!  start:    cpu = rseq->cpu_id                    read inside the section: if the
//!            if cpu >= cpus: fail                   thread migrates, the section aborts
//!            area = base + cpu * stride             (negative "uninitialised" ids fail)
//!            if area.gate != 0: fail                a drain stopped this CPU
//!            area.active = 1
//!            n = area.count[c]; check bounds; move items between slots and caller
//!            area.count[c] = n'                    THE COMMIT: one store, last in the
//!  post_commit:                                     section
//!
//!  abort (4-byte signature before it):  jump to restart
//! ```
//!
//! The descriptor (`struct rseq_cs`: version 0, flags 0, `start_ip`, `post_commit_offset`,
//! `abort_ip`) sits in section `__rseq_cs`, the abort handler in `.text.unlikely` after
//! glibc's signature, so normal flow never reaches it. An abort restarts the section:
//! the restart re-reads the CPU number, so after a migration it works on the new CPU's
//! stack, and after a drain stopped the CPU it fails. Nothing before the commit is visible:
//! a push writes its item into a slot above the count, which no reader looks at until the
//! count covers it; a pop reads its item before the commit lowers the count.
//!
//! Each thread's rseq area is glibc's (found at run time through `__rseq_offset` and
//! `__rseq_size`) or, where glibc did not register one, one this module registers on the
//! thread's first operation (see `rseq.rs`). A thread with neither fails every operation.
//!
//! # Draining another CPU
//!
//! ```text
//!  drainer                                    threads on CPU `cpu`
//!  gate: CAS 0 -> 1 (serialises drains)       sections in flight may still commit
//!  membarrier(PRIVATE_EXPEDITED_RSEQ, cpu)    the kernel aborts any section running on
//!                                             or preempted from `cpu`; afterwards every
//!                                             new section there sees gate != 0 and fails
//!  read counts and slots, hand them to f,
//!  set counts to 0
//!  gate = 0 (release)                         sections read the gate with acquire
//! ```
//!
//! Same-CPU drains from two threads wait for each other on the gate (a drain spins with
//! a short backoff, then yields); drains of different CPUs run in parallel. While a drain
//! holds a CPU, every operation on that CPU fails. The portable implementation drains the
//! same way without the fence: taking the gate waits for the operation holding the lock.
//!
//! Operations never wait, so they are safe in signal handlers: a signal aborts the rseq
//! section it interrupts, and a handler finding a portable CPU locked simply fails.
//! Drains wait, and are not.
//!
//! Where `membarrier` cannot restart rseq critical sections (Linux before 5.10, or a
//! seccomp filter), there is no sound way to take items away from a CPU that others may be
//! pushing to at that moment, so [`PerCpuStacks::new`] chooses the portable
//! implementation. The other known alternative, pinning the draining thread to the CPU
//! with `sched_setaffinity` and popping there, needs the drainer to be allowed on every
//! CPU (cpusets, isolated CPUs and the application's own affinity settings forbid that),
//! and would change the affinity of a caller's thread behind its back.
//!
//! # fork
//!
//! A forked child keeps the forking thread's rseq registration and every CPU's stacks
//! (they are per CPU, not per thread, so they stay valid). `membarrier` registration is
//! renewed when the kernel says the child lacks it; no cached process id can go stale. A
//! drain or a portable operation that another thread of the parent had in progress at the
//! moment of the fork leaves that CPU's gate closed in the child: a fork handler calls
//! [`PerCpuStacks::reopen_after_fork`] in the child to reopen it.

use std::io;

use crate::os::mapping::Backing;
use crate::os::mapping::MetaArray;
use crate::sync::{AtomicU64, Ordering, current_cpu, fence, yield_now};

#[cfg_attr(
    not(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64"),
        not(any(loom, miri))
    )),
    path = "rseq/unsupported.rs"
)]
mod rseq;

#[cfg(all(test, loom))]
mod loom_models;
#[cfg(all(test, not(loom)))]
mod tests;

/// Which implementation an instance of [`PerCpuStacks`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuCacheImpl {
    /// Restartable sequences: no lock, no atomic read-modify-write.
    Rseq,
    /// A per-CPU lock taken with one swap; busy means the operation fails.
    Portable,
}

/// What [`PerCpuStacks::pop_batch`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Taken {
    /// Items written to the start of the output slice.
    pub(crate) len: usize,
    /// The CPU whose stack the operation looked at, when it got that far (also when the
    /// stack was empty); `None` when it failed before that (stopped, busy, no rseq area).
    pub(crate) cpu: Option<u32>,
}

// === layout ===

/// Word 0 of a CPU's area: 0 open; otherwise a drain holds the CPU (rseq) or an
/// operation or a drain holds its lock (portable).
const GATE_WORD: usize = 0;
/// Word 1: set by every operation on the CPU, cleared by `take_activity`.
const ACTIVE_WORD: usize = 1;
/// Words `COUNT_WORD + c`: the number of items of class c.
const COUNT_WORD: usize = 2;
/// Bytes in a word.
const WORD: usize = 8;
/// The slots start on a cache line of their own.
const LINE: usize = 64;
/// CPU areas are a multiple of this apart: two cache lines, because x86 prefetchers pull
/// lines in adjacent pairs, so two CPUs never share one.
const CPU_ALIGN: usize = 128;
/// With Mmap backing, CPU areas are whole pages, so an idle CPU costs no resident memory.
const PAGE: usize = 4096;
/// Words before CPU 0's area, so that the areas' headers do not start at a page
/// boundary: page-aligned blocks are written at their first bytes all the time, and a load
/// of a header word whose address matches a pending store's in its low 12 bits waits for
/// that store (4K aliasing: a loop of `PagePool::alloc`, a write to the block's first
/// byte and `free` of a 4 KiB block took 7.05-7.18 ns with page-aligned headers and
/// 6.67-7.06 ns with them 2 KiB in, over four runs each). A multiple of [`CPU_ALIGN`], so
/// that areas stay that far apart from anything else's lines.
const SKEW_WORDS: usize = 0x880 / WORD;
/// The most CPUs an instance accepts (Linux's `NR_CPUS` is at most 8192).
const MAX_CPUS: usize = 1 << 16;

/// Where one class's stacks are, for every CPU. Read-only after construction; the rseq
/// sections read it at the byte offsets below (`G_*`), so its layout is fixed.
///
/// One cache line per class: the sections read one line of it.
#[repr(C, align(64))]
#[derive(Debug)]
pub(super) struct ClassGeometry {
    /// Address of CPU 0's area.
    base: usize,
    /// Bytes from one CPU's area to the next.
    stride: usize,
    /// Number of areas: a CPU number at or above it has none (the operation fails).
    cpus: usize,
    /// Byte offset of this class's count word inside an area.
    count_off: usize,
    /// Byte offset of this class's slot 0 inside an area.
    slots_off: usize,
    /// Slots of this class per CPU.
    cap: usize,
}

pub(super) const G_BASE: usize = std::mem::offset_of!(ClassGeometry, base);
pub(super) const G_STRIDE: usize = std::mem::offset_of!(ClassGeometry, stride);
pub(super) const G_CPUS: usize = std::mem::offset_of!(ClassGeometry, cpus);
pub(super) const G_COUNT_OFF: usize = std::mem::offset_of!(ClassGeometry, count_off);
pub(super) const G_SLOTS_OFF: usize = std::mem::offset_of!(ClassGeometry, slots_off);
pub(super) const G_CAP: usize = std::mem::offset_of!(ClassGeometry, cap);
/// Byte offset of the gate word in an area (the aarch64 sections load it with `ldar`,
/// which takes no offset).
pub(super) const GATE_OFF: usize = GATE_WORD * WORD;
/// Byte offset of the activity word in an area.
pub(super) const ACTIVE_OFF: usize = ACTIVE_WORD * WORD;

const _: () = assert!(GATE_OFF == 0);
const _: () = assert!(size_of::<AtomicU64>() == WORD || cfg!(loom));
const _: () = assert!(size_of::<ClassGeometry>() == LINE);

// === impl PerCpuStacks ===

/// Bounded LIFO stacks of `u64` items, one per CPU and class; see the [module docs](self).
pub(crate) struct PerCpuStacks {
    imp: Imp,
    /// With rseq on the C library's areas, where a thread's area is (from its thread
    /// pointer): the case the fast paths handle, found here with one test.
    glibc_offset: Option<isize>,
    cpus: usize,
    /// Words from one CPU's area to the next.
    stride_words: usize,
    /// Per class, where its stacks are.
    classes: MetaArray<ClassGeometry>,
    /// Every CPU's area, back to back.
    words: MetaArray<AtomicU64>,
}

/// [`PerCpuStacks`]' `pop` and `push` for its common case, with no call inside, so that a
/// caller inlining them needs no stack frame. They fail where `pop` and `push` fail.
#[derive(Clone, Copy)]
pub(crate) struct FastStacks<'a> {
    glibc_offset: isize,
    classes: &'a [ClassGeometry],
}

impl FastStacks<'_> {
    /// As [`PerCpuStacks::pop`]; also `None` for a class out of range.
    #[inline(always)]
    pub(crate) fn pop(self, class: usize) -> Option<u64> {
        rseq::pop_glibc(self.glibc_offset, self.classes.get(class)?)
    }

    /// As [`PerCpuStacks::push`]; `false` when it did not push (a class out of range
    /// included).
    #[inline(always)]
    pub(crate) fn push(self, class: usize, item: u64) -> bool {
        self.classes
            .get(class)
            .is_some_and(|geometry| rseq::push_glibc(self.glibc_offset, geometry, item))
    }

    /// As [`PerCpuStacks::push_if_on`]; `false` when it did not push.
    #[inline(always)]
    pub(crate) fn push_if_on(self, class: usize, item: u64, owner: u32) -> bool {
        self.classes.get(class).is_some_and(|geometry| {
            rseq::push_if_on_glibc(self.glibc_offset, geometry, item, owner)
        })
    }
}

#[derive(Clone, Copy)]
enum Imp {
    /// How this process finds a thread's rseq area (uninhabited where rseq is unsupported).
    Rseq(rseq::Access),
    Portable,
}

impl PerCpuStacks {
    /// Stacks for every possible CPU (`/sys/devices/system/cpu/possible`), with
    /// `capacities[c]` slots of class c per CPU.
    ///
    /// `want` is a preference: rseq falls back to portable where it cannot run (see the
    /// module docs). With [`Backing::Mmap`] nothing is allocated through the global
    /// allocator and nothing is written until a CPU runs its first operation.
    pub(crate) fn new(
        capacities: &[u32],
        want: CpuCacheImpl,
        backing: Backing,
    ) -> io::Result<Self> {
        Self::with_cpus(capacities, possible_cpus(), want, backing)
    }

    /// Like [`new`](Self::new), for `cpus` CPUs: operations on a CPU numbered `cpus` or
    /// above fail.
    pub(crate) fn with_cpus(
        capacities: &[u32],
        cpus: usize,
        want: CpuCacheImpl,
        backing: Backing,
    ) -> io::Result<Self> {
        let invalid = |what| io::Error::new(io::ErrorKind::InvalidInput, what);
        if capacities.is_empty() {
            return Err(invalid("per-CPU stacks need at least one class"));
        }
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(invalid("per-CPU stacks: CPU count out of range"));
        }
        // Header: gate, active, one count per class; the slots start on a fresh line.
        let header = (COUNT_WORD + capacities.len()) * WORD;
        let header_end = header.next_multiple_of(LINE);
        let mut offset = header_end;
        for &cap in capacities {
            offset = (cap as usize)
                .checked_mul(WORD)
                .and_then(|b| offset.checked_add(b))
                .ok_or_else(|| invalid("per-CPU stacks too large"))?;
        }
        let align = match backing {
            Backing::Mmap => PAGE,
            Backing::Heap => CPU_ALIGN,
        };
        let stride = offset
            .checked_next_multiple_of(align)
            .filter(|&s| {
                s.checked_mul(cpus)
                    .is_some_and(|t| t <= isize::MAX as usize)
            })
            .ok_or_else(|| invalid("per-CPU stacks too large"))?;
        let stride_words = stride / WORD;

        let imp = match want {
            CpuCacheImpl::Rseq => rseq::probe().map_or(Imp::Portable, Imp::Rseq),
            CpuCacheImpl::Portable => Imp::Portable,
        };
        // All zeros is the initial state: open gates, no activity, empty stacks.
        let words = MetaArray::new(SKEW_WORDS + cpus * stride_words, backing, true, |_| {
            AtomicU64::new(0)
        })?;
        let base = words.as_ptr() as usize + SKEW_WORDS * WORD;
        // Classes' slots follow each other, in class order (`init` runs in index order).
        let mut slots_off = header_end;
        let classes = MetaArray::new(capacities.len(), backing, false, |c| {
            let geometry = ClassGeometry {
                base,
                stride,
                cpus,
                count_off: (COUNT_WORD + c) * WORD,
                slots_off,
                cap: capacities[c] as usize,
            };
            slots_off += geometry.cap * WORD;
            geometry
        })?;
        let glibc_offset = match imp {
            Imp::Rseq(access) => rseq::glibc_offset_of(access),
            Imp::Portable => None,
        };
        Ok(Self {
            imp,
            glibc_offset,
            cpus,
            stride_words,
            classes,
            words,
        })
    }

    /// Which implementation this instance uses.
    pub(crate) fn implementation(&self) -> CpuCacheImpl {
        match self.imp {
            Imp::Rseq(_) => CpuCacheImpl::Rseq,
            Imp::Portable => CpuCacheImpl::Portable,
        }
    }

    /// Number of CPUs: every CPU number an operation can use is below it.
    pub(crate) fn cpus(&self) -> usize {
        self.cpus
    }

    /// Number of classes.
    pub(crate) fn classes(&self) -> usize {
        self.classes.len()
    }

    /// Slots of `class` per CPU.
    pub(crate) fn capacity(&self, class: usize) -> usize {
        self.classes[class].cap
    }

    /// Pops the top item of the calling CPU's stack of `class`. `None` when it is empty,
    /// when a drain stopped that CPU, when (portable) another thread holds the CPU's lock,
    /// or when (rseq) this thread has no rseq area.
    ///
    /// Panics if `class` is out of range (as do all operations).
    #[inline]
    pub(crate) fn pop(&self, class: usize) -> Option<u64> {
        let geometry = &self.classes[class];
        match self.imp {
            Imp::Rseq(access) => rseq::pop(access, geometry),
            Imp::Portable => self.pop_on(current_cpu(), class),
        }
    }

    /// The common case of [`pop`](Self::pop) and [`push`](Self::push) (rseq with the C
    /// library's areas), or `None` where it does not apply (the caller then uses them).
    #[inline(always)]
    pub(crate) fn fast(&self) -> Option<FastStacks<'_>> {
        Some(FastStacks {
            glibc_offset: self.glibc_offset?,
            classes: &self.classes,
        })
    }

    /// Pushes `item` on the calling CPU's stack of `class`; gives it back when the stack is
    /// full or for the reasons [`pop`](Self::pop) fails.
    #[inline]
    pub(crate) fn push(&self, class: usize, item: u64) -> Result<(), u64> {
        let geometry = &self.classes[class];
        match self.imp {
            Imp::Rseq(access) => rseq::push(access, geometry, item),
            Imp::Portable => self.push_on(current_cpu(), class, item),
        }
    }

    /// Pushes `item` only if the calling thread runs on CPU `owner` (for items that must
    /// go back to the CPU they came from). With rseq the check is inside the critical
    /// section, so a migration between the check and the commit aborts the push.
    #[inline]
    pub(crate) fn push_if_on(&self, class: usize, item: u64, owner: u32) -> Result<(), u64> {
        let geometry = &self.classes[class];
        match self.imp {
            Imp::Rseq(access) => rseq::push_if_on(access, geometry, item, owner),
            Imp::Portable => {
                let cpu = current_cpu();
                if cpu != owner as usize {
                    return Err(item);
                }
                self.push_on(cpu, class, item)
            }
        }
    }

    /// Pops up to `out.len()` items of `class` from the calling CPU's stack into the
    /// start of `out`, the most recently pushed first (so `out[0]` is what
    /// [`pop`](Self::pop) would have returned), in one operation.
    #[inline]
    pub(crate) fn pop_batch(&self, class: usize, out: &mut [u64]) -> Taken {
        let geometry = &self.classes[class];
        if out.is_empty() {
            return Taken { len: 0, cpu: None };
        }
        match self.imp {
            Imp::Rseq(access) => rseq::pop_batch(access, geometry, out),
            Imp::Portable => self.pop_batch_on(current_cpu(), class, out),
        }
    }

    /// Pushes as many of `items` on the calling CPU's stack of `class` as fit, in order
    /// (so the last one pushed is on top), in one operation; returns how many it pushed:
    /// always a prefix of `items`.
    #[inline]
    pub(crate) fn push_batch(&self, class: usize, items: &[u64]) -> usize {
        let geometry = &self.classes[class];
        if items.is_empty() {
            return 0;
        }
        match self.imp {
            Imp::Rseq(access) => rseq::push_batch(access, geometry, items),
            Imp::Portable => self.push_batch_on(current_cpu(), class, items),
        }
    }

    /// Stops CPU `cpu` (every operation on it fails meanwhile), hands each class's items to
    /// `f(class, items)` (bottom of the stack first), empties the stacks and restarts the
    /// CPU. Safe from any thread at any time, concurrently with operations on that CPU and
    /// with other drains (two drains of one CPU take turns).
    ///
    /// Returns false, with the stacks untouched, only if the kernel refused to fence the
    /// CPU (rseq: an unexpected `membarrier` error). `f` runs while the CPU is stopped: it
    /// must not drain the same CPU of the same instance (that would wait for itself).
    /// If `f` panics, the classes handed over so far stay emptied and the CPU restarts.
    pub(crate) fn drain_cpu(&self, cpu: usize, mut f: impl FnMut(usize, &[u64])) -> bool {
        assert!(cpu < self.cpus, "drain_cpu: CPU {cpu} out of range");
        let area = self.area(cpu);
        let gate = &area[GATE_WORD];
        close_gate(gate);
        // Reopens the gate on every way out, panics included.
        let _reopen = Reopen(gate);
        if let Imp::Rseq(_) = self.imp {
            // Every section that was in flight on `cpu` has now committed or aborted, and
            // every section that starts from now on sees the closed gate.
            if !rseq::fence_cpu(cpu) {
                return false;
            }
            // The kernel ordered the memory (the fence runs a full barrier on `cpu`);
            // this keeps the compiler and the CPU from hoisting the reads above it.
            fence(Ordering::SeqCst);
        }
        for class in 0..self.classes.len() {
            let geometry = &self.classes[class];
            let count = &area[COUNT_WORD + class];
            // A count never exceeds the capacity; clamp all the same, so the slice below
            // stays inside this class's slots whatever the word holds.
            let n = (count.load(Ordering::Relaxed) as usize).min(geometry.cap);
            if n == 0 {
                continue;
            }
            // Empty first: items handed to `f` are `f`'s even if it panics.
            count.store(0, Ordering::Relaxed);
            let first = geometry.slots_off / WORD;
            let slots = &area[first..first + n];
            #[cfg(not(loom))]
            {
                // SAFETY: AtomicU64 has the size and alignment of u64, and while the gate
                // is closed (and, for rseq, after the fence) no thread writes these slots:
                // operations on this CPU fail before touching them, and other drains wait
                // for the gate. The slice is dropped before the gate reopens.
                let items = unsafe { std::slice::from_raw_parts(slots.as_ptr().cast::<u64>(), n) };
                f(class, items);
            }
            #[cfg(loom)]
            {
                let items: Vec<u64> = slots.iter().map(|s| s.load(Ordering::Relaxed)).collect();
                f(class, &items);
            }
        }
        true
    }

    /// Racy snapshot of the number of items CPU `cpu` holds in `class` (for statistics).
    pub(crate) fn len(&self, cpu: usize, class: usize) -> usize {
        if cpu >= self.cpus {
            return 0;
        }
        let count = self.area(cpu)[COUNT_WORD + class].load(Ordering::Relaxed) as usize;
        count.min(self.classes[class].cap)
    }

    /// Whether an operation ran on CPU `cpu` since the previous call, and clears that
    /// mark: the idle detector of a background thread that drains caches idle for a while.
    pub(crate) fn take_activity(&self, cpu: usize) -> bool {
        if cpu >= self.cpus {
            return false;
        }
        let active = &self.area(cpu)[ACTIVE_WORD];
        // Load first: an idle CPU's line is not written.
        active.load(Ordering::Relaxed) != 0 && active.swap(0, Ordering::Relaxed) != 0
    }

    /// Reopens every CPU that a thread of the parent was draining (or, portable, operating
    /// on) at the moment of `fork`: in the child that thread does not exist, so nobody else
    /// would. The stacks stay consistent: a count is only ever changed by one store.
    ///
    /// # Safety
    ///
    /// Call only in the child of `fork`, before it starts threads or uses this instance
    /// from a signal handler: no other thread may be inside an operation or a drain.
    pub(crate) unsafe fn reopen_after_fork(&self) {
        for cpu in 0..self.cpus {
            let gate = &self.area(cpu)[GATE_WORD];
            if gate.load(Ordering::Relaxed) != 0 {
                unlock(gate);
            }
        }
    }

    // --- portable implementation (also the explicit-CPU entry points for tests) ---

    /// The words of CPU `cpu`'s area.
    #[inline]
    fn area(&self, cpu: usize) -> &[AtomicU64] {
        &self.words
            [SKEW_WORDS + cpu * self.stride_words..SKEW_WORDS + (cpu + 1) * self.stride_words]
    }

    /// Runs `op` on CPU `cpu`'s area under its lock, or returns `busy` when the lock is
    /// held or `cpu` is out of range. Portable implementation only.
    #[inline]
    fn locked<R>(&self, cpu: usize, busy: R, op: impl FnOnce(&[AtomicU64]) -> R) -> R {
        debug_assert!(matches!(self.imp, Imp::Portable));
        if cpu >= self.cpus {
            return busy;
        }
        let area = self.area(cpu);
        let gate = &area[GATE_WORD];
        // One atomic read-modify-write takes the lock; a holder (an operation or a
        // drain) makes us fail.
        if !try_lock(gate) {
            return busy;
        }
        area[ACTIVE_WORD].store(1, Ordering::Relaxed);
        let result = op(area);
        unlock(gate);
        result
    }

    /// Pop from CPU `cpu`'s stack (portable only). Never inlined: it would crowd the
    /// rseq fast path it shares a `match` with.
    #[inline(never)]
    fn pop_on(&self, cpu: usize, class: usize) -> Option<u64> {
        let geometry = &self.classes[class];
        self.locked(cpu, None, |area| {
            let count = &area[COUNT_WORD + class];
            let n = count.load(Ordering::Relaxed) as usize;
            if n == 0 || n > geometry.cap {
                return None;
            }
            let item = area[geometry.slots_off / WORD + n - 1].load(Ordering::Relaxed);
            count.store(n as u64 - 1, Ordering::Relaxed);
            Some(item)
        })
    }

    /// Push on CPU `cpu`'s stack (portable only). Never inlined, as `pop_on`.
    #[inline(never)]
    fn push_on(&self, cpu: usize, class: usize, item: u64) -> Result<(), u64> {
        let geometry = &self.classes[class];
        self.locked(cpu, Err(item), |area| {
            let count = &area[COUNT_WORD + class];
            let n = count.load(Ordering::Relaxed) as usize;
            if n >= geometry.cap {
                return Err(item);
            }
            area[geometry.slots_off / WORD + n].store(item, Ordering::Relaxed);
            count.store(n as u64 + 1, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Batch pop from CPU `cpu`'s stack (portable only).
    fn pop_batch_on(&self, cpu: usize, class: usize, out: &mut [u64]) -> Taken {
        let geometry = &self.classes[class];
        let failed = Taken { len: 0, cpu: None };
        self.locked(cpu, failed, |area| {
            let count = &area[COUNT_WORD + class];
            let n = count.load(Ordering::Relaxed) as usize;
            if n > geometry.cap {
                return failed;
            }
            let take = n.min(out.len());
            let slots = &area[geometry.slots_off / WORD..];
            for (i, slot) in out[..take].iter_mut().enumerate() {
                *slot = slots[n - 1 - i].load(Ordering::Relaxed);
            }
            count.store((n - take) as u64, Ordering::Relaxed);
            Taken {
                len: take,
                cpu: Some(cpu as u32),
            }
        })
    }

    /// Batch push on CPU `cpu`'s stack (portable only).
    fn push_batch_on(&self, cpu: usize, class: usize, items: &[u64]) -> usize {
        let geometry = &self.classes[class];
        self.locked(cpu, 0, |area| {
            let count = &area[COUNT_WORD + class];
            let n = count.load(Ordering::Relaxed) as usize;
            if n > geometry.cap {
                return 0;
            }
            let put = (geometry.cap - n).min(items.len());
            let slots = &area[geometry.slots_off / WORD + n..];
            for (slot, &item) in slots.iter().zip(&items[..put]) {
                slot.store(item, Ordering::Relaxed);
            }
            count.store((n + put) as u64, Ordering::Relaxed);
            put
        })
    }
}

// SAFETY: the areas are atomics (the rseq sections access them only as the single-word
// loads and stores the protocol in the module docs describes), and the geometry records
// are read-only after construction; `Imp` is plain data.
unsafe impl Sync for PerCpuStacks {}
// SAFETY: as above; nothing in the instance is tied to the thread that made it.
unsafe impl Send for PerCpuStacks {}

/// Takes a portable CPU's lock with one swap, unless it is held.
#[cfg(not(loom))]
#[inline]
fn try_lock(gate: &AtomicU64) -> bool {
    gate.swap(1, Ordering::Acquire) == 0
}

/// Under loom, the same with a compare-exchange. loom 0.7 lets a plain store (here the
/// holder's release) slip between the read and the write of another thread's swap
/// (tokio-rs/loom#254, fixed in a pull request not yet released): a swap that read the
/// 1 from before the release would then write its 1 after it, and the lock would stay
/// held by nobody. The gate only ever holds 0 or 1, so `swap(1) == 0` and
/// `compare_exchange(0, 1).is_ok()` succeed in exactly the same cases (a failed swap
/// rewrites the 1 that was there; a failed compare-exchange writes nothing, so nothing
/// can slip under it).
#[cfg(loom)]
fn try_lock(gate: &AtomicU64) -> bool {
    gate.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Opens the gate: releases a portable lock or ends a drain, with one store.
#[inline]
fn unlock(gate: &AtomicU64) {
    // Release: whoever takes the gate next (acquire) sees what the holder wrote.
    gate.store(0, Ordering::Release);
}

/// Takes a CPU's gate for a drain: waits for a portable operation or another drain of the
/// same CPU to finish (spins briefly, then yields; drains are rare and short).
fn close_gate(gate: &AtomicU64) {
    let mut spins = 0u32;
    // Strong: a spurious failure would only cost another round, but loom explores each.
    while gate
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        if cfg!(loom) || spins >= 64 {
            yield_now();
        } else {
            std::hint::spin_loop();
            spins += 1;
        }
    }
}

/// Opens a drained CPU's gate again when dropped.
struct Reopen<'a>(&'a AtomicU64);

impl Drop for Reopen<'_> {
    fn drop(&mut self) {
        // An operation that sees the gate open (acquire) also sees the emptied counts.
        unlock(self.0);
    }
}

// === possible CPUs ===

/// Number of possible CPUs: one more than the highest number in
/// `/sys/devices/system/cpu/possible` (read without allocating), else the configured
/// count. Under loom and Miri, 1 (their `current_cpu` is always 0).
pub(crate) fn possible_cpus() -> usize {
    #[cfg(any(loom, miri))]
    {
        1
    }
    #[cfg(not(any(loom, miri)))]
    {
        read_possible_cpus().unwrap_or_else(|| {
            // SAFETY: sysconf has no preconditions.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            n.max(1) as usize
        })
    }
}

#[cfg(not(any(loom, miri)))]
fn read_possible_cpus() -> Option<usize> {
    let path = c"/sys/devices/system/cpu/possible";
    // SAFETY: `path` is a NUL-terminated string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 256];
    let mut len = 0;
    while len < buf.len() {
        // SAFETY: the destination is the unwritten rest of `buf`.
        let n = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    parse_cpu_list(&buf[..len])
}

/// One more than the highest CPU in a kernel CPU list such as `0-3,8-11\n`.
fn parse_cpu_list(text: &[u8]) -> Option<usize> {
    let mut highest = None;
    for range in text.split(|&b| b == b',') {
        let range = range.trim_ascii();
        if range.is_empty() {
            continue;
        }
        let last = range.rsplit(|&b| b == b'-').next()?;
        let mut value = 0usize;
        if last.is_empty() {
            return None;
        }
        for &digit in last {
            if !digit.is_ascii_digit() {
                return None;
            }
            value = value
                .checked_mul(10)?
                .checked_add((digit - b'0') as usize)?;
        }
        highest = highest.max(Some(value));
    }
    highest.map(|h| h + 1)
}
