//! Vacant chunks: whole free chunks whose frame entries the pool gave back to the OS.
//!
//! A free chunk that is hinted or known to be zero needs one entry of its frame table: its
//! head, which says "free, of the largest order" and links it into a list. The other
//! entries are blank, yet the pages holding them stay resident once a burst of small
//! blocks has written them: 16 bytes per 4 KiB frame, 0.4 % of the memory the burst
//! touched, which `release_idle` would otherwise never give back.
//!
//! `release_idle` therefore moves every whole free chunk of the shared pool that is hinted
//! or zero off the lists into the *vacant* set: its head entry is blanked, a bit in the
//! frame table's vacancy map (one map per class) remembers it, and the pages of entries
//! that only vacant chunks and chunks never handed out cover go back to the OS with
//! `MADV_DONTNEED`. A vacant chunk looks exactly like a chunk never handed out, except for
//! its bit: it is still counted as a free block of its class, of the largest order, and
//! allocation takes it back (before chunks never handed out) when the shared pool's lists
//! have no chunk of the class asked for. Pointers into it are refused like pointers into
//! untouched memory: its head reads "interior".
//!
//! Only the shared pool holds vacant chunks, under its lock; `release_idle` first has
//! every shard give its whole free chunks back to the shared pool.

use super::counters::{DEC, bump};
use super::{Locked, NIL, ShardId};
use crate::config::AllocPolicy;
use crate::frame_table::{ChunkIdx, FrameIdx, FrameState, FrameTable, FreeClass};

/// The classes a chunk can be vacant as, in the order of the vacancy maps.
static VACANT_CLASSES: [FreeClass; 2] = [FreeClass::Hinted, FreeClass::Zero];

/// Index of a vacant class in the shard's per-class counts (the frame table's map's).
fn slot(class: FreeClass) -> usize {
    FrameTable::vacant_map(class)
}

/// The shared pool's vacant chunks, per class: how many, and the first vacancy-map word
/// that may have a bit set.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Vacant {
    count: [u32; 2],
    low_word: [u32; 2],
}

impl Vacant {
    /// Vacant chunks of `class` (hinted or zero).
    pub(crate) fn count(&self, class: FreeClass) -> u32 {
        self.count[slot(class)]
    }
}

impl Locked<'_> {
    /// Gives every whole free chunk of this shard that is hinted or zero to the shared pool
    /// (a shard keeps a few for its next allocations, but the caller wants them released).
    pub(crate) fn surrender_free_chunks(&mut self) {
        if self.shard.id == ShardId::Shared {
            return;
        }
        let table = self.env.table;
        let max = self.env.max_order;
        for class in VACANT_CLASSES {
            let mut cursor = self.lists.head[max as usize][self.list(class)];
            while cursor != NIL {
                let idx = FrameIdx(cursor);
                cursor = table.frame(idx).next();
                // A resident chunk (one FIFO queue holds every class) stays.
                if let Some(listed_as @ (FreeClass::Hinted | FreeClass::Zero)) =
                    table.frame(idx).state().free_class()
                {
                    self.give_back(idx, listed_as);
                }
            }
        }
    }

    /// Makes every whole free chunk of the shared pool that is hinted or zero vacant, and
    /// gives back the pages of frame entries that only vacant chunks and chunks never handed
    /// out cover. Returns how many chunks it made vacant.
    pub(crate) fn vacate_free_chunks(&mut self) -> u32 {
        if self.shard.id != ShardId::Shared {
            return 0;
        }
        let env = self.env;
        let max = env.max_order;
        let mut vacated = 0;
        for class in VACANT_CLASSES {
            let list = self.list(class);
            let mut cursor = self.lists.head[max as usize][list];
            while cursor != NIL {
                let idx = FrameIdx(cursor);
                let frame = env.table.frame(idx);
                cursor = frame.next();
                let listed_as = frame.state().free_class().expect("listed block is free");
                if listed_as == FreeClass::Unhinted {
                    continue; // resident (one FIFO queue holds every class): stays listed
                }
                // Still counted as a free chunk of its class: taken off the list only.
                self.detach(idx, max, list);
                frame.set(FrameState::Interior, 0);
                frame.set_next(0);
                frame.set_prev(0);
                frame.set_since(0);
                let chunk = idx.chunk(max);
                env.table.set_vacant(chunk, listed_as, true);
                let s = slot(listed_as);
                self.lists.vacant.count[s] += 1;
                let word = chunk.0 / 64;
                self.lists.vacant.low_word[s] = self.lists.vacant.low_word[s].min(word);
                vacated += 1;
            }
        }
        if vacated > 0 {
            self.release_vacant_entries();
        }
        vacated
    }

    /// Gives back the entry pages of every run of chunks that are vacant or never handed
    /// out. Runs already given back cost a system call over unmapped pages.
    fn release_vacant_entries(&self) {
        let table = self.env.table;
        let max = self.env.max_order;
        let chunks = table.chunks();
        let fresh_from = self.lists.fresh_next;
        let blank = |chunk: u32| {
            chunk >= fresh_from
                || table.vacant_any_word(chunk as usize / 64) >> (chunk % 64) & 1 != 0
        };
        let words = table.vacant_words() as u32;
        let mut chunk = 0;
        while chunk < chunks {
            // Whole words of chunks that are neither vacant nor fresh at once.
            let word = chunk / 64;
            if chunk % 64 == 0
                && word < words
                && chunk + 64 <= fresh_from
                && table.vacant_any_word(word as usize) == 0
            {
                chunk += 64;
                continue;
            }
            if !blank(chunk) {
                chunk += 1;
                continue;
            }
            let start = chunk;
            while chunk < chunks && blank(chunk) {
                chunk += 1;
            }
            // SAFETY: every entry of a vacant chunk or of a chunk never handed out is blank
            // (vacating blanked the head; the rest are interior), and the shared pool's lock,
            // which we hold, is the only one under which they are written.
            unsafe { table.release_entries(ChunkIdx(start).head(max), ChunkIdx(chunk).head(max)) };
        }
    }

    /// Puts every vacant chunk of `class` back on the lists (the caller is about to advise
    /// them again; the next `vacate_free_chunks` makes them vacant again).
    pub(crate) fn restore_vacant(&mut self, class: FreeClass) {
        while self.materialize_vacant_of(class) {}
    }

    /// Takes one vacant chunk of `class` (any vacant class under FIFO) back onto the lists.
    /// Returns whether there was one.
    pub(super) fn materialize_vacant(&mut self, class: FreeClass) -> bool {
        let classes: &[FreeClass] = match (self.env.policy, class) {
            (AllocPolicy::Fifo, _) => &VACANT_CLASSES,
            (_, FreeClass::Unhinted) => &[],
            (_, FreeClass::Hinted) => &VACANT_CLASSES[..1],
            (_, FreeClass::Zero) => &VACANT_CLASSES[1..],
        };
        classes
            .iter()
            .any(|&class| self.materialize_vacant_of(class))
    }

    fn materialize_vacant_of(&mut self, class: FreeClass) -> bool {
        let s = slot(class);
        if self.lists.vacant.count[s] == 0 {
            return false;
        }
        let table = self.env.table;
        let words = table.vacant_words() as u32;
        let mut word = self.lists.vacant.low_word[s];
        while word < words && table.vacant_word(class, word as usize) == 0 {
            word += 1;
        }
        self.lists.vacant.low_word[s] = word;
        let bits = table.vacant_word(class, word as usize);
        assert!(
            word < words && bits != 0,
            "vacant count without a vacant chunk"
        );
        let chunk = ChunkIdx(word * 64 + bits.trailing_zeros());
        table.set_vacant(chunk, class, false);
        self.lists.vacant.count[s] -= 1;
        let max = self.env.max_order;
        // `push` counts the chunk, which never stopped being counted: uncount it first, so
        // a lock-free reader never sees it counted twice.
        let top = self.counters(max);
        bump(&top.freed, DEC);
        bump(
            match class {
                FreeClass::Hinted => &top.hinted,
                _ => &top.zero,
            },
            DEC,
        );
        self.push(chunk.head(max), max, class);
        true
    }
}
