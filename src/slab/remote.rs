//! Remote frees: objects freed on a CPU that does not own their slab, on their way to the
//! owner.
//!
//! Each CPU heap has one queue, a lock-free stack of objects linked through their first
//! word (the object is free, so its bytes are the allocator's): snmalloc's message queues
//! and mimalloc's thread-delayed free lists in their simplest form.
//!
//! ```text
//!  freeing thread (any CPU)                  owner (its heap lock held)
//!  loop:                                      list = head.swap(0, Acquire)
//!    h = head.load(Relaxed)                   for each object of the list:
//!    obj.word0 = h                              next = obj.word0
//!    CAS(head, h -> obj, Release)               put obj back on its slab
//! ```
//!
//! A push is one compare-and-swap on the owner's queue; the owner takes the whole stack
//! at once with one swap on its slow path (or the idle release takes it for an idle CPU).
//! There is no ABA problem: nobody pops single objects, and the swap takes the list as it
//! is at one instant. The release CAS publishes the link written just before it; the
//! acquire swap makes every link of the taken list visible (each push's release is
//! ordered before the next push's CAS that read it, and the swap reads the last one).
//!
//! Objects are named by address (`usize`); the caller turns them back into pointers from
//! the region's base, so provenance stays with the region. How a link is stored is the
//! caller's [`Links`]: the object's first word in the allocator, a loom-tracked cell in the
//! models.

use crate::sync::{AtomicUsize, Ordering};

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
    /// `obj` was taken from a queue with [`RemoteQueue::take`] (or reached through links
    /// of such a list) and is not yet reused.
    unsafe fn read(&self, obj: usize) -> usize;
}

/// One CPU heap's queue of remotely freed objects; see the module docs.
pub(crate) struct RemoteQueue {
    /// The most recently pushed object (0: empty).
    head: AtomicUsize,
}

impl RemoteQueue {
    /// An empty queue.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Self {
            head: AtomicUsize::new(0),
        }
    }

    /// An empty queue.
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Self {
            head: AtomicUsize::new(0),
        }
    }

    /// Pushes `obj`: one compare-and-swap (retried while other frees race for the head).
    ///
    /// # Safety
    /// As for [`Links::write`]: `obj` is free and the caller's to write until a `take`
    /// hands it to the owner.
    #[inline]
    pub(crate) unsafe fn push(&self, links: &impl Links, obj: usize) {
        debug_assert_ne!(obj, 0);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: the caller's guarantee; the object is on no list until the CAS.
            unsafe { links.write(obj, head) };
            match self
                .head
                .compare_exchange_weak(head, obj, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Whether the queue looks empty (a racy hint: one relaxed load).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed) == 0
    }

    /// Takes every object pushed so far: the first of a list linked through
    /// [`Links::read`] and ending with 0; 0 when the queue is empty.
    #[inline]
    pub(crate) fn take(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        self.head.swap(0, Ordering::Acquire)
    }
}

/// Walks a list taken from a queue.
///
/// # Safety
/// `first` came from [`RemoteQueue::take`] on a queue whose objects `links` describes, and
/// each object is read before the caller reuses it (the iterator reads an object's link
/// before yielding it).
pub(crate) unsafe fn drain_list<L: Links>(links: &L, first: usize) -> impl Iterator<Item = usize> {
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
