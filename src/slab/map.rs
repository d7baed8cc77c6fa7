//! The slab map: out-of-band metadata found by address, never a header in front of an
//! object.
//!
//! The pool's region is cut into 16 KiB *granules* (the smallest slab). Two arrays, mapped
//! with `mmap` like the pool's frame table and touched only where slabs live, describe them:
//!
//! ```text
//!  region:   | granule 0 | granule 1 | granule 2 | granule 3 | granule 4 | ...
//!             \____ slab A (32 KiB) _____/ \ page blocks /  \ slab B ...
//!  entries:  | A, back 0 | A, back 1 |     0     |     0     | B, back 0 | ...   4 bytes each
//!  descs:    | A's desc  |  (unused) |  (unused) |  (unused) | B's desc  | ...  64 bytes each
//! ```
//!
//! - An **entry** (one atomic `u32` per granule) is 0 where no slab lives, else it packs
//!   the slab's owner CPU, its class and how many granules back its first granule is. The
//!   free path reads only this word to find where an object goes. Entries are written by
//!   the owner heap (under its lock) before any object of the slab is handed out, and
//!   cleared before the slab's block goes back to the pool; a reader holding a live object
//!   of the slab therefore always sees the slab's entry (the object reached it after the
//!   write), and a live page block's granules always read 0.
//! - A **descriptor** (one 64-byte line per granule, used only at a slab's first granule)
//!   holds the state the owner heap changes under its lock: the free list, the carving
//!   point, the count of objects out, the list links. One line per slab, so two heaps
//!   never write the same line.

use std::cell::UnsafeCell;
use std::io;
use std::ptr;

use super::classes::GRANULE_SHIFT;
use crate::os::mapping::{Backing, MetaArray};
use crate::sync::{AtomicU32, Ordering};

// === impl Entry ===

/// A granule's entry: `owner << 16 | class << 8 | back << 1 | 1`, or 0 for no slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry(u32);

impl Entry {
    /// No slab here.
    pub(crate) const NONE: Entry = Entry(0);

    /// The entry of the granule `back` granules after the first of a slab of `class`
    /// owned by CPU heap `owner`.
    #[inline]
    pub(crate) fn new(owner: usize, class: usize, back: usize) -> Self {
        debug_assert!(owner <= u16::MAX as usize && class <= u8::MAX as usize && back < 128);
        Entry(((owner as u32) << 16) | ((class as u32) << 8) | ((back as u32) << 1) | 1)
    }

    /// Whether a slab lives here.
    #[inline(always)]
    pub(crate) fn is_slab(self) -> bool {
        self.0 & 1 != 0
    }

    /// The CPU heap that owns the slab.
    #[inline(always)]
    pub(crate) fn owner(self) -> usize {
        (self.0 >> 16) as usize
    }

    /// The slab's class.
    #[inline(always)]
    pub(crate) fn class(self) -> usize {
        ((self.0 >> 8) & 0xff) as usize
    }

    /// Granules from the slab's first granule to this one.
    #[inline(always)]
    pub(crate) fn back(self) -> usize {
        ((self.0 >> 1) & 0x7f) as usize
    }
}

// === impl SlabDesc ===

/// Which list a slab is on.
pub(crate) mod list {
    /// On no list: not a live slab.
    pub(crate) const NONE: u8 = 0;
    /// Every object is out (handed to a cache or a user): on no list, found by address
    /// when an object comes back.
    pub(crate) const FULL: u8 = 1;
    /// An empty slab kept for reuse (one per order and heap).
    pub(crate) const SPARE: u8 = 2;
    /// Partial, in occupancy bin `bin`: `BIN0 + bin`.
    pub(crate) const BIN0: u8 = 3;
}

/// A slab's state, written only by its owner heap under the heap's lock.
#[derive(Debug)]
pub(crate) struct SlabData {
    /// The first object of the slab's free list (linked through first words), or null.
    pub(crate) free: *mut u8,
    /// Objects carved so far: objects `bump..` have never been handed out.
    pub(crate) bump: u32,
    /// Objects out of the slab: in users' hands, in a CPU cache, or in a remote queue.
    pub(crate) used: u32,
    /// The previous and next slab on the same list, as first granule + 1 (0: none).
    pub(crate) prev: u32,
    pub(crate) next: u32,
    /// The slab's class (also in its map entries).
    pub(crate) class: u8,
    /// Which list it is on ([`list`]).
    pub(crate) list: u8,
    /// The never-carved part reads as zeros (the block was known-zero when taken).
    pub(crate) zero: bool,
    /// For a spare: when it became one (milliseconds, `now_ms`).
    pub(crate) since: u32,
}

/// One granule's descriptor slot; see the module docs.
#[repr(C, align(64))]
pub(crate) struct SlabDesc(UnsafeCell<SlabData>);

impl SlabDesc {
    fn new() -> Self {
        SlabDesc(UnsafeCell::new(SlabData {
            free: ptr::null_mut(),
            bump: 0,
            used: 0,
            prev: 0,
            next: 0,
            class: 0,
            list: list::NONE,
            zero: false,
            since: 0,
        }))
    }

    /// The slab's state.
    ///
    /// # Safety
    /// The caller holds the lock of the heap that owns this slab (the owner in its map
    /// entries, which changes only under that lock), or otherwise excludes every other
    /// access (a slab no heap owns yet), and drops the reference before releasing it.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // the heap lock makes the access exclusive
    pub(crate) unsafe fn data(&self) -> &mut SlabData {
        // SAFETY: exclusive under the owner's lock, which the caller holds.
        unsafe { &mut *self.0.get() }
    }
}

// SAFETY: the data is touched only under the lock of the heap that owns the slab (see
// `data`); the raw free-list pointer points into the pool's region.
unsafe impl Sync for SlabDesc {}
// SAFETY: as above.
unsafe impl Send for SlabDesc {}

// === impl SlabMap ===

/// The entries and descriptors of every granule of the region.
pub(crate) struct SlabMap {
    entries: MetaArray<AtomicU32>,
    descs: MetaArray<SlabDesc>,
}

impl SlabMap {
    /// A map of `granules` granules, all without a slab. Allocates nothing through the
    /// global allocator with [`Backing::Mmap`], and touches nothing until slabs are made.
    pub(crate) fn new(granules: usize, backing: Backing) -> io::Result<Self> {
        Ok(Self {
            entries: MetaArray::new(granules, backing, true, |_| AtomicU32::new(0))?,
            descs: MetaArray::new(granules, backing, true, |_| SlabDesc::new())?,
        })
    }

    /// Number of granules.
    pub(crate) fn granules(&self) -> usize {
        self.entries.len()
    }

    /// The entry of the granule holding region offset `offset` (inside the region).
    #[inline(always)]
    pub(crate) fn entry(&self, offset: usize) -> Entry {
        // Relaxed: a valid pointer's slab was published to this thread with the object;
        // for anything else the value only decides which check refuses it.
        Entry(self.entries[offset >> GRANULE_SHIFT].load(Ordering::Relaxed))
    }

    /// The entry of granule `granule`.
    #[inline]
    pub(crate) fn entry_at(&self, granule: usize) -> Entry {
        Entry(self.entries[granule].load(Ordering::Relaxed))
    }

    /// Writes the entries of a slab of `granules` granules starting at `first`.
    pub(crate) fn set(&self, first: usize, granules: usize, owner: usize, class: usize) {
        for back in 0..granules {
            self.entries[first + back].store(Entry::new(owner, class, back).0, Ordering::Relaxed);
        }
    }

    /// Clears the entries of a slab of `granules` granules starting at `first`.
    pub(crate) fn clear(&self, first: usize, granules: usize) {
        for e in &self.entries[first..first + granules] {
            e.store(0, Ordering::Relaxed);
        }
    }

    /// The descriptor of the slab whose first granule is `first`.
    #[inline(always)]
    pub(crate) fn desc(&self, first: usize) -> &SlabDesc {
        &self.descs[first]
    }
}
