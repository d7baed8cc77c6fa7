//! Remote frees: objects freed on a CPU that does not own their slab, on their way to the
//! owner.
//!
//! Each CPU heap has one queue with two parts: a bounded ring of object addresses (many
//! producers claim positions with a compare-and-swap and publish each cell with a
//! sequence number, as in Dmitry Vyukov's bounded queue; one consumer) and, for when the ring is
//! full, an unbounded lock-free stack of objects linked through their first word (the
//! object is free, so its bytes are the allocator's): snmalloc's message queues and
//! mimalloc's thread-delayed free lists in their simplest form.
//!
//! Why a ring first: the owner collects the queue on its slow path, and a linked list
//! makes it read the objects one after another, each a cache miss on a line the freeing
//! CPU last wrote, none of which can start before the previous one ended. Addresses in
//! a ring are read a cache line of eight at a time, and the owner's writes into the
//! objects (putting them back on their slabs) do not wait for each other. On the
//! application suite's producer/consumer workload, walking the list took a fifth of the
//! whole run's CPU time.
//!
//! ```text
//!  freeing thread (any CPU)                     owner (its heap lock held)
//!  ring: loop:                                  ring: t = tail
//!          pos = head                             while cells[t].seq == t + 1:
//!          if pos - tail >= RING: ring full         obj = cells[t].obj; t += 1
//!          CAS(head, pos -> pos + 1)                put obj back on its slab
//!        cells[pos].obj = obj                     tail = t                 (Release)
//!        cells[pos].seq = pos + 1   (Release)   stack: list = top.swap(0, Acquire)
//!  stack (ring full):                             for each object of the list:
//!    obj.word0 = top; CAS(top, old -> obj)          next = obj.word0; put obj back
//! ```
//!
//! Position `pos` lives in cell `pos % RING`; a cell whose sequence number is `pos + 1`
//! holds the object of position `pos`. A producer claims a position only while it is less
//! than a lap ahead of the owner's tail, so the cell's previous object was taken; the
//! owner's release store of `tail` orders its reads of those cells before the next lap's
//! writes. The owner only reads cells (no cache line goes back to the producers per
//! object): it writes one word per collection. A producer that stalls between its claim
//! and its write (preempted) holds up the owner at that cell, never loses an object; the
//! owner stops there and continues on its next collection. The release store of `seq`
//! publishes the object (and what the freeing thread wrote into it); the owner's acquire
//! load of `seq` sees it.
//!
//! The stack has no ABA problem: nobody pops single objects, and the swap takes the list
//! as it is at one instant. The release CAS publishes the link written just before it;
//! the acquire swap makes every link of the taken list visible.
//!
//! Objects are named by address (`usize`, never 0); the caller turns them back into
//! pointers from the region's base, so provenance stays with the region. How a link is
//! stored is the caller's [`Links`]: the object's first word in the allocator, a
//! loom-tracked cell in the models.

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicUsize, Ordering};

/// Cells per ring: 128 (2 KiB per heap). Two under loom, so the models fill it.
#[cfg(not(loom))]
const RING: usize = 128;
#[cfg(loom)]
const RING: usize = 2;

/// Where an object's link lives.
pub(crate) trait Links {
    /// Stores `next` as the link of `obj`.
    ///
    /// # Safety
    /// `obj` is a free object that the caller may write (it is being freed and is not on
    /// any list yet).
    unsafe fn write(&self, obj: usize, next: usize);

    /// The link of `obj`.
    ///
    /// # Safety
    /// `obj` was taken from a queue's stack by [`RemoteQueue::collect`] (or reached
    /// through links of such a list) and is not yet reused.
    unsafe fn read(&self, obj: usize) -> usize;
}

/// One cell of the ring.
struct Cell {
    /// One more than the position whose object the cell holds (see the module docs),
    /// stored minus the cell's index, so that all zeros reads as "no object yet".
    seq: AtomicUsize,
    obj: AtomicUsize,
}

impl Cell {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            seq: AtomicUsize::new(0),
            obj: AtomicUsize::new(0),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self {
            seq: AtomicUsize::new(0),
            obj: AtomicUsize::new(0),
        }
    }
}

/// One CPU heap's queue of remotely freed objects; see the module docs.
pub(crate) struct RemoteQueue {
    /// The ring's next position to claim, written by every freeing CPU; alone on its
    /// line, which the owner never reads.
    head: CachePadded<AtomicUsize>,
    /// The stack's most recently pushed object (0: empty), on a line of its own: the
    /// owner reads it on every collection.
    top: CachePadded<AtomicUsize>,
    /// The owner's next position: written only by [`collect`](Self::collect), whose
    /// callers hold the heap lock.
    tail: CachePadded<AtomicUsize>,
    cells: [Cell; RING],
}

impl RemoteQueue {
    /// An empty queue.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Self {
            head: CachePadded::new(AtomicUsize::new(0)),
            top: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
            cells: [const { Cell::new() }; RING],
        }
    }

    /// An empty queue.
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Self {
            head: CachePadded::new(AtomicUsize::new(0)),
            top: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
            cells: std::array::from_fn(|_| Cell::new()),
        }
    }

    /// The sequence number of cell `at % RING`.
    #[inline]
    fn seq(&self, at: usize, order: Ordering) -> usize {
        let i = at % RING;
        self.cells[i].seq.load(order).wrapping_add(i)
    }

    /// Sets the sequence number of cell `at % RING`.
    #[inline]
    fn set_seq(&self, at: usize, seq: usize) {
        let i = at % RING;
        self.cells[i]
            .seq
            .store(seq.wrapping_sub(i), Ordering::Release);
    }

    /// Pushes `obj`: into the ring (a compare-and-swap of its head, retried while other
    /// frees race for it), or, when the ring is full, on the stack (a compare-and-swap).
    ///
    /// # Safety
    /// As for [`Links::write`]: `obj` is free and the caller's to write until a `collect`
    /// hands it to the owner.
    #[inline]
    pub(crate) unsafe fn push(&self, links: &impl Links, obj: usize) {
        debug_assert_ne!(obj, 0);
        if !self.push_ring(obj) {
            // SAFETY: the caller's guarantee.
            unsafe { self.push_stack(links, obj) };
        }
    }

    /// Puts `obj` in the ring; `false` when it is full.
    #[inline]
    fn push_ring(&self, obj: usize) -> bool {
        let head = &self.head;
        let mut pos = head.load(Ordering::Relaxed);
        loop {
            // Acquire: the owner read every cell below its tail before it published it.
            if pos.wrapping_sub(self.tail.load(Ordering::Acquire)) >= RING {
                // The cell still holds the object of position `pos - RING`.
                return false;
            }
            match head.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    self.cells[pos % RING].obj.store(obj, Ordering::Relaxed);
                    // Publishes the object, and what the freeing thread wrote into it.
                    self.set_seq(pos, pos + 1);
                    return true;
                }
                Err(now) => pos = now,
            }
        }
    }

    /// Pushes `obj` on the stack.
    ///
    /// # Safety
    /// As for [`push`](Self::push).
    #[cold]
    unsafe fn push_stack(&self, links: &impl Links, obj: usize) {
        let top = &self.top;
        let mut old = top.load(Ordering::Relaxed);
        loop {
            // SAFETY: the caller's guarantee; the object is on no list until the CAS.
            unsafe { links.write(obj, old) };
            match top.compare_exchange_weak(old, obj, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => old = now,
            }
        }
    }

    /// Whether the queue looks empty (a racy hint: two relaxed loads).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        let tail = self.tail.load(Ordering::Relaxed);
        self.top.load(Ordering::Relaxed) == 0 && self.seq(tail, Ordering::Relaxed) != tail + 1
    }

    /// Hands every object pushed so far to `f` (up to a producer that has claimed a cell
    /// but not yet written it: the rest of the ring waits for the next call); returns how
    /// many. Only one thread at a time may call it (the heap lock's holder).
    ///
    /// # Safety
    /// `links` describes this queue's objects, and `f` may reuse an object only after it
    /// got it (the stack's links are read before each object is handed over).
    pub(crate) unsafe fn collect(&self, links: &impl Links, mut f: impl FnMut(usize)) -> usize {
        let mut n = 0;
        let mut tail = self.tail.load(Ordering::Relaxed);
        let start = tail;
        // At most one lap: producers wait for the new tail before they reuse a cell.
        while tail - start < RING && self.seq(tail, Ordering::Acquire) == tail + 1 {
            let obj = self.cells[tail % RING].obj.load(Ordering::Relaxed);
            tail += 1;
            // 0: abandoned by a thread that `fork` left behind (`repair_after_fork`).
            if obj != 0 {
                f(obj);
                n += 1;
            }
        }
        // Frees the cells read above for the next lap (release: after those reads).
        self.tail.store(tail, Ordering::Release);
        let top = &self.top;
        if top.load(Ordering::Relaxed) != 0 {
            let first = top.swap(0, Ordering::Acquire);
            // SAFETY: the list was just taken from this queue's stack; the caller's
            // guarantee covers the rest.
            for obj in unsafe { drain_list(links, first) } {
                f(obj);
                n += 1;
            }
        }
        n
    }

    /// In the child of `fork`: a thread of the parent that had claimed a cell but not yet
    /// written it does not exist here, and the owner would stop at that cell for ever.
    /// Marks such cells written, with no object (that thread's object is lost: one small
    /// object per such thread, in the child only).
    ///
    /// # Safety
    /// Call only in the child of `fork`, before it starts threads: no push or collect may
    /// be in progress.
    pub(crate) unsafe fn repair_after_fork(&self) {
        let head = self.head.load(Ordering::Relaxed);
        let mut at = self.tail.load(Ordering::Relaxed);
        while at != head {
            // Claimed (below the head) but not written: the cell still says an older lap.
            if self.seq(at, Ordering::Relaxed) != at + 1 {
                self.cells[at % RING].obj.store(0, Ordering::Relaxed);
                self.set_seq(at, at + 1);
            }
            at += 1;
        }
    }
}

/// Walks a list taken from a queue's stack.
///
/// # Safety
/// `first` heads a list taken from a queue's stack whose objects `links` describes, and
/// each object is read before the caller reuses it (the iterator reads an object's link
/// before yielding it).
unsafe fn drain_list<L: Links>(links: &L, first: usize) -> impl Iterator<Item = usize> {
    let mut at = first;
    std::iter::from_fn(move || {
        if at == 0 {
            return None;
        }
        let obj = at;
        // SAFETY: the caller's guarantee: `obj` is on the taken list and not reused yet.
        at = unsafe { links.read(obj) };
        Some(obj)
    })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Objects `1..=n`, their links in a vector.
    struct Words(Vec<AtomicUsize>);

    impl Words {
        fn new(n: usize) -> Self {
            Self((0..n).map(|_| AtomicUsize::new(0)).collect())
        }
    }

    impl Links for Words {
        unsafe fn write(&self, obj: usize, next: usize) {
            self.0[obj - 1].store(next, Ordering::Relaxed);
        }

        unsafe fn read(&self, obj: usize) -> usize {
            self.0[obj - 1].load(Ordering::Relaxed)
        }
    }

    fn collect_all(queue: &RemoteQueue, words: &Words) -> Vec<usize> {
        let mut seen = Vec::new();
        // SAFETY: one collector; objects are not reused.
        let n = unsafe { queue.collect(words, |obj| seen.push(obj)) };
        assert_eq!(n, seen.len());
        seen
    }

    #[test]
    fn a_full_ring_overflows_to_the_stack_and_nothing_is_lost() {
        let n = 3 * RING + 5;
        let (queue, words) = (RemoteQueue::new(), Words::new(n));
        assert!(queue.is_empty());
        for lap in 0..3 {
            for obj in 1..=n {
                // SAFETY: each object is pushed once per lap, collected before the next.
                unsafe { queue.push(&words, obj) };
            }
            assert!(!queue.is_empty());
            let mut seen = collect_all(&queue, &words);
            // The ring keeps the first RING in order; the rest came from the stack.
            assert_eq!(
                seen[..RING],
                (1..=RING).collect::<Vec<_>>()[..],
                "lap {lap}"
            );
            seen.sort_unstable();
            assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "lap {lap}");
            assert!(queue.is_empty());
        }
    }

    /// Claims the ring's next position as a producer does, without writing it yet.
    fn claim(queue: &RemoteQueue) -> usize {
        let pos = queue.head.load(Ordering::Relaxed);
        assert!(
            pos - queue.tail.load(Ordering::Relaxed) < RING,
            "ring not full"
        );
        queue.head.store(pos + 1, Ordering::Relaxed);
        pos
    }

    /// Pushes and collects `n` objects, so the ring's positions are `n` further on.
    fn turn(queue: &RemoteQueue, words: &Words, n: usize) {
        for obj in 1..=n {
            // SAFETY: each object is pushed once, collected before any reuse.
            unsafe { queue.push(words, obj % 8 + 1) };
            assert_eq!(collect_all(queue, words), [obj % 8 + 1]);
        }
    }

    #[test]
    fn a_stalled_producer_holds_up_only_the_cells_after_its_own() {
        let (queue, words) = (RemoteQueue::new(), Words::new(8));
        // Not on the first lap, where a cell's initial state could pass for anything.
        turn(&queue, &words, RING + 3);
        // SAFETY: each object pushed once.
        unsafe { queue.push(&words, 1) };
        let stalled = claim(&queue);
        for obj in 2..=4 {
            // SAFETY: as above.
            unsafe { queue.push(&words, obj) };
        }
        assert_eq!(collect_all(&queue, &words), [1]);
        assert_eq!(collect_all(&queue, &words), Vec::<usize>::new());
        // The producer resumes: its object and the ones behind it come through.
        queue.cells[stalled % RING].obj.store(5, Ordering::Relaxed);
        queue.set_seq(stalled, stalled + 1);
        assert_eq!(collect_all(&queue, &words), [5, 2, 3, 4]);
        assert!(queue.is_empty());
    }

    #[test]
    fn after_fork_a_cell_claimed_by_a_vanished_thread_is_skipped() {
        for laps_before in [0, 1, 2] {
            after_fork_repair(laps_before * RING + laps_before);
        }
    }

    fn after_fork_repair(before: usize) {
        let (queue, words) = (RemoteQueue::new(), Words::new(8));
        turn(&queue, &words, before);
        let _vanished = claim(&queue);
        for obj in 1..=3 {
            // SAFETY: each object pushed once.
            unsafe { queue.push(&words, obj) };
        }
        assert_eq!(collect_all(&queue, &words), Vec::<usize>::new());
        // SAFETY: no other thread uses the queue.
        unsafe { queue.repair_after_fork() };
        assert_eq!(collect_all(&queue, &words), [1, 2, 3]);
        // The ring works on afterwards, lap after lap.
        turn(&queue, &words, RING + 3);
    }

    #[test]
    fn concurrent_frees_and_collections_deliver_every_object_once() {
        const THREADS: usize = 4;
        const EACH: usize = 20_000;
        let queue = RemoteQueue::new();
        let words = Words::new(THREADS * EACH);
        let seen = Mutex::new(vec![0u8; THREADS * EACH]);
        let collect = || {
            let mut seen = seen.lock().unwrap();
            // SAFETY: the mutex makes us the only collector; objects are not reused.
            unsafe {
                queue.collect(&words, |obj| {
                    seen[obj - 1] += 1;
                })
            };
        };
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (queue, words) = (&queue, &words);
                s.spawn(move || {
                    for i in 0..EACH {
                        // SAFETY: each object is pushed once.
                        unsafe { queue.push(words, t * EACH + i + 1) };
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..2_000 {
                    collect();
                    std::thread::yield_now();
                }
            });
        });
        collect();
        let seen = seen.into_inner().unwrap();
        assert!(
            seen.iter().all(|&c| c == 1),
            "an object was lost or collected twice"
        );
        assert!(queue.is_empty());
    }
}
