//! The frame table: out-of-band metadata, one 16-byte entry per 4 KiB frame.
//!
//! ```text
//!  frame entry (16 bytes)
//!  +-----------+-----------+---------------------------+-------------+
//!  | next: u32 | prev: u32 | meta: u32                 | since: u32  |
//!  +-----------+-----------+---------------------------+-------------+
//!                           bits 0..4 state, 4..9 order  ms timestamp
//! ```
//!
//! Only the first frame of a block (its *head*) carries meaning; every other frame is
//! [`FrameState::Interior`]. Splits and merges keep that true with one write each, so a
//! pointer into the middle of a block is always recognised. `next`/`prev` link free blocks
//! into their shard's lists; `since` records when a block at or above the hint order became
//! free, so the hinter can tell cold blocks from warm ones.
//!
//! Every field is an atomic with relaxed accesses; what orders them is who may write:
//! - a *free* block's entries (and every interior entry) are written only under the lock
//!   of the shard that owns the block's chunk;
//! - an *allocated* block's head entry belongs to the block's owner, who may flip it
//!   between "allocated" and "held by a cache" without a lock (caches do), because nobody
//!   else writes it and every other reader treats both values as "not free";
//! - the chunk owner is read without a lock, to learn which lock to take.
//!
//! Layer 1. May call: `os`, `sync`.

use crate::sync::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Index of a 4 KiB frame from the region's base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct FrameIdx(pub(crate) u32);

/// Index of a maximum-order chunk from the region's base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkIdx(pub(crate) u32);

/// "No frame": the end of a list.
pub(crate) const NIL: u32 = u32::MAX;

impl FrameIdx {
    /// The buddy of the block of `order` that starts here.
    #[inline]
    pub(crate) fn buddy(self, order: u8) -> FrameIdx {
        FrameIdx(self.0 ^ (1 << order))
    }

    /// The chunk this frame lies in.
    #[inline]
    pub(crate) fn chunk(self, max_order: u8) -> ChunkIdx {
        ChunkIdx(self.0 >> max_order)
    }

    /// The frame `frames` after this one.
    #[inline]
    pub(crate) fn plus(self, frames: u32) -> FrameIdx {
        FrameIdx(self.0 + frames)
    }
}

impl ChunkIdx {
    /// The chunk's first frame.
    #[inline]
    pub(crate) fn head(self, max_order: u8) -> FrameIdx {
        FrameIdx(self.0 << max_order)
    }
}

/// What a block head's frame says about the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FrameState {
    /// Not the first frame of a block (or a chunk not yet handed out).
    Interior = 0,
    /// Handed out to a user.
    Allocated = 1,
    /// Free, resident, contents unknown.
    Unhinted = 2,
    /// Free and given back with `MADV_FREE`: contents undefined.
    Hinted = 3,
    /// Free and known to read as zeros.
    Zero = 4,
    /// Free in a shard's cache of small blocks: not merged, not in the buddy lists.
    Cached = 5,
    /// Taken off the free lists by the hinter while it advises the kernel.
    Isolated = 6,
    /// Held, free, by a [`LocalCache`](crate::LocalCache): allocated as far as the shards
    /// know. Written by the cache's owner without a lock (see `local_cache`).
    LocalCached = 7,
    /// Held, free, in a per-CPU cache: allocated as far as the shards know. Written by the
    /// block's owner (the freeing thread before the push, the allocating thread after the
    /// pop) without a lock.
    CpuCached = 8,
}

impl FrameState {
    fn from_bits(bits: u32) -> Self {
        match bits & 0xf {
            1 => Self::Allocated,
            2 => Self::Unhinted,
            3 => Self::Hinted,
            4 => Self::Zero,
            5 => Self::Cached,
            6 => Self::Isolated,
            7 => Self::LocalCached,
            8 => Self::CpuCached,
            _ => Self::Interior,
        }
    }

    /// The free class of a block in the buddy lists, if it is one.
    #[inline]
    pub(crate) fn free_class(self) -> Option<FreeClass> {
        match self {
            Self::Unhinted => Some(FreeClass::Unhinted),
            Self::Hinted => Some(FreeClass::Hinted),
            Self::Zero => Some(FreeClass::Zero),
            _ => None,
        }
    }
}

/// The three kinds of free block in the buddy lists, in allocation-preference order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FreeClass {
    /// Resident, possibly dirty.
    Unhinted = 0,
    /// Advised away with `MADV_FREE`.
    Hinted = 1,
    /// Known to read as zeros.
    Zero = 2,
}

/// Number of [`FreeClass`]es.
pub(crate) const CLASSES: usize = 3;

impl FreeClass {
    /// The frame state of a free block of this class.
    #[inline]
    pub(crate) fn state(self) -> FrameState {
        match self {
            Self::Unhinted => FrameState::Unhinted,
            Self::Hinted => FrameState::Hinted,
            Self::Zero => FrameState::Zero,
        }
    }

    /// The class of the block two free buddies of these classes merge into: any resident
    /// half makes the whole block resident; two zero halves stay zero; otherwise hinted.
    #[inline]
    pub(crate) fn merge(self, other: FreeClass) -> FreeClass {
        match (self, other) {
            (Self::Unhinted, _) | (_, Self::Unhinted) => Self::Unhinted,
            (Self::Zero, Self::Zero) => Self::Zero,
            _ => Self::Hinted,
        }
    }
}

/// One frame's entry.
#[repr(C)]
pub(crate) struct Frame {
    next: AtomicU32,
    prev: AtomicU32,
    meta: AtomicU32,
    since: AtomicU32,
}

#[cfg(not(loom))]
const _: () = assert!(
    size_of::<Frame>() == 16,
    "the frame table promises 16 bytes per frame"
);

impl Frame {
    /// An interior frame (all zeros, like a fresh mapping).
    pub(crate) fn new() -> Self {
        Self {
            next: AtomicU32::new(0),
            prev: AtomicU32::new(0),
            meta: AtomicU32::new(0),
            since: AtomicU32::new(0),
        }
    }

    #[inline]
    pub(crate) fn state(&self) -> FrameState {
        FrameState::from_bits(self.meta.load(Relaxed))
    }

    /// State and order in one load.
    #[inline]
    pub(crate) fn get(&self) -> (FrameState, u8) {
        let meta = self.meta.load(Relaxed);
        (FrameState::from_bits(meta), ((meta >> 4) & 0x1f) as u8)
    }

    /// Whether the entry says `state` and `order` (one load, one comparison).
    #[inline]
    pub(crate) fn is(&self, state: FrameState, order: u8) -> bool {
        self.meta.load(Relaxed) == state as u32 | (order as u32) << 4
    }

    /// The order, if the entry says `state`.
    #[inline]
    pub(crate) fn order_if(&self, state: FrameState) -> Option<u8> {
        let meta = self.meta.load(Relaxed);
        (meta & 0xf == state as u32).then_some((meta >> 4) as u8)
    }

    #[inline]
    pub(crate) fn set(&self, state: FrameState, order: u8) {
        self.meta.store(state as u32 | (order as u32) << 4, Relaxed);
    }

    #[inline]
    pub(crate) fn next(&self) -> u32 {
        self.next.load(Relaxed)
    }

    #[inline]
    pub(crate) fn prev(&self) -> u32 {
        self.prev.load(Relaxed)
    }

    #[inline]
    pub(crate) fn set_next(&self, next: u32) {
        self.next.store(next, Relaxed);
    }

    #[inline]
    pub(crate) fn set_prev(&self, prev: u32) {
        self.prev.store(prev, Relaxed);
    }

    #[inline]
    pub(crate) fn since(&self) -> u32 {
        self.since.load(Relaxed)
    }

    #[inline]
    pub(crate) fn set_since(&self, ms: u32) {
        self.since.store(ms, Relaxed);
    }
}

impl Default for Frame {
    fn default() -> Self {
        Self::new()
    }
}

// === impl FrameTable ===

/// Who owns a chunk: the shared pool of whole free chunks, or one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Not owned by a shard: a whole free chunk in the shared pool.
    Shared,
    /// Owned by the shard with this index.
    Shard(usize),
}

/// The frame entries of a region, the owner of each chunk, and which chunks are vacant.
pub(crate) struct FrameTable {
    frames: crate::os::mapping::MetaArray<Frame>,
    /// 0 = shared (so a fresh, zeroed table puts every chunk there), i + 1 = shard i.
    owners: crate::os::mapping::MetaArray<AtomicU32>,
    /// One bit per chunk and class: the chunk is vacant (see `shard::vacant`), free and
    /// hinted (first map) or known-zero (second map), its entries blank. Written only under
    /// the shared pool's lock.
    vacant: crate::os::mapping::MetaArray<AtomicU64>,
}

impl FrameTable {
    pub(crate) fn new(
        chunks: u32,
        max_order: u8,
        backing: crate::os::mapping::Backing,
    ) -> std::io::Result<Self> {
        let frames = (chunks as usize) << max_order;
        Ok(Self {
            frames: crate::os::mapping::MetaArray::new(frames, backing, true, |_| Frame::new())?,
            owners: crate::os::mapping::MetaArray::new(chunks as usize, backing, true, |_| {
                AtomicU32::new(0)
            })?,
            vacant: crate::os::mapping::MetaArray::new(
                2 * (chunks as usize).div_ceil(64),
                backing,
                true,
                |_| AtomicU64::new(0),
            )?,
        })
    }

    #[inline]
    pub(crate) fn frame(&self, idx: FrameIdx) -> &Frame {
        &self.frames[idx.0 as usize]
    }

    /// Number of frames.
    #[inline]
    pub(crate) fn len(&self) -> u32 {
        self.frames.len() as u32
    }

    /// Number of chunks.
    #[inline]
    pub(crate) fn chunks(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The chunk's owner. Read without a lock: the caller locks that owner and reads again.
    #[inline]
    pub(crate) fn owner(&self, chunk: ChunkIdx) -> Owner {
        match self.owners[chunk.0 as usize].load(crate::sync::Ordering::Acquire) {
            0 => Owner::Shared,
            i => Owner::Shard(i as usize - 1),
        }
    }

    /// Moves a chunk. Called with the locks of both the old and the new owner held.
    #[inline]
    pub(crate) fn set_owner(&self, chunk: ChunkIdx, owner: Owner) {
        let raw = match owner {
            Owner::Shared => 0,
            Owner::Shard(i) => i as u32 + 1,
        };
        self.owners[chunk.0 as usize].store(raw, crate::sync::Ordering::Release);
    }

    // --- vacant chunks (see `shard::vacant`) -------------------------------------------

    /// Words of one class's vacancy map.
    #[inline]
    pub(crate) fn vacant_words(&self) -> usize {
        self.vacant.len() / 2
    }

    /// Which vacancy map (and per-class count) `class` uses: hinted 0, zero 1.
    pub(crate) fn vacant_map(class: FreeClass) -> usize {
        match class {
            FreeClass::Hinted => 0,
            FreeClass::Zero => 1,
            FreeClass::Unhinted => unreachable!("resident chunks are never vacant"),
        }
    }

    /// Word `word` of the vacancy map of `class` (hinted or zero).
    #[inline]
    pub(crate) fn vacant_word(&self, class: FreeClass, word: usize) -> u64 {
        self.vacant[Self::vacant_map(class) * self.vacant_words() + word].load(Relaxed)
    }

    /// Marks `chunk` vacant as `class` (hinted or zero), or not vacant. Called under the
    /// shared pool's lock.
    pub(crate) fn set_vacant(&self, chunk: ChunkIdx, class: FreeClass, vacant: bool) {
        let word =
            &self.vacant[Self::vacant_map(class) * self.vacant_words() + chunk.0 as usize / 64];
        let bit = 1u64 << (chunk.0 % 64);
        let old = word.load(Relaxed);
        word.store(if vacant { old | bit } else { old & !bit }, Relaxed);
    }

    /// Word `word` of both vacancy maps together: the chunks vacant as any class.
    #[inline]
    pub(crate) fn vacant_any_word(&self, word: usize) -> u64 {
        self.vacant_word(FreeClass::Hinted, word) | self.vacant_word(FreeClass::Zero, word)
    }

    /// The class `chunk` is vacant as, if it is.
    pub(crate) fn vacant_class(&self, chunk: ChunkIdx) -> Option<FreeClass> {
        let (word, bit) = (chunk.0 as usize / 64, chunk.0 % 64);
        [FreeClass::Hinted, FreeClass::Zero]
            .into_iter()
            .find(|&class| self.vacant_word(class, word) >> bit & 1 != 0)
    }

    /// Gives the pages holding the entries of frames `from..to` back to the OS (whole
    /// pages only), so that every entry there reads as a blank interior entry.
    ///
    /// # Safety
    /// Every frame in the range must be interior or a blank head (its entry means nothing
    /// beyond "not the start of a block"), and nobody may write those entries meanwhile:
    /// the caller holds the lock of the shard that owns them, and no block there is
    /// allocated.
    pub(crate) unsafe fn release_entries(&self, from: FrameIdx, to: FrameIdx) {
        // SAFETY: an all-zero `Frame` is a blank interior entry (`Frame::new`), which is
        // what the caller promises the range means; the caller excludes writers.
        unsafe { self.frames.release_pages(from.0 as usize..to.0 as usize) };
    }
}
