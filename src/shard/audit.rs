//! The shard's half of the consistency audit: its lists against the frame table and its
//! counters. Off the hot path; see `pool::audit` for the whole-pool walk.

use super::{CLASSES, ISOLATED, LISTS, Lists, Locked, NIL, ORDERS, ShardId};
use crate::frame_table::{FrameIdx, FrameState, FreeClass};
use crate::sync::Ordering;

/// Block counts gathered by [`Locked::audit`].
#[derive(Default)]
pub(crate) struct AuditCounts {
    pub(crate) free: [[u64; CLASSES]; ORDERS],
    pub(crate) cached: [u64; ORDERS],
    /// Isolated blocks, per order (not free: the hinter holds them).
    pub(crate) isolated: [u64; ORDERS],
    pub(crate) fresh_chunks: u64,
    pub(crate) first_fresh_chunk: u32,
}

impl Locked<'_> {
    /// Walks this shard's lists and checks them against the frame table and counters.
    /// Adds what it saw to `seen` (free, cached, per order and class).
    pub(crate) fn audit(&self, seen: &mut AuditCounts) -> Result<(), String> {
        let env = self.env;
        let table = env.table;
        let me = self.shard.id;
        let lists: &Lists = &self.lists;
        let mut counts = AuditCounts::default();
        for order in 0..=env.max_order {
            let o = order as usize;
            for list in 0..LISTS {
                let mut prev = NIL;
                let mut cursor = lists.head[o][list];
                if (cursor == NIL) == (lists.nonempty[list] & 1 << order != 0) {
                    return Err(format!(
                        "{me:?}: nonempty bit of order {order} list {list} is wrong"
                    ));
                }
                let mut steps = 0u64;
                while cursor != NIL {
                    let idx = FrameIdx(cursor);
                    let frame = table.frame(idx);
                    let (state, fo) = frame.get();
                    let class = if list == ISOLATED {
                        if state != FrameState::Isolated {
                            return Err(format!(
                                "{me:?}: frame {cursor} on the isolated list is {state:?}"
                            ));
                        }
                        FreeClass::Unhinted
                    } else {
                        state.free_class().ok_or_else(|| {
                            format!("{me:?}: frame {cursor} on a free list is {state:?}")
                        })?
                    };
                    if fo != order {
                        return Err(format!(
                            "{me:?}: frame {cursor} of order {fo} on list of order {order}"
                        ));
                    }
                    if list != ISOLATED && self.list_of(idx, order, class) != list {
                        return Err(format!("{me:?}: {class:?} frame {cursor} on list {list}"));
                    }
                    if frame.prev() != prev {
                        return Err(format!("{me:?}: broken prev link at frame {cursor}"));
                    }
                    if idx.0 & ((1 << order) - 1) != 0 {
                        return Err(format!(
                            "{me:?}: frame {cursor} misaligned for order {order}"
                        ));
                    }
                    if table.owner(idx.chunk(env.max_order)) != me.owner() {
                        return Err(format!(
                            "{me:?}: frame {cursor} lies in a chunk owned by another shard"
                        ));
                    }
                    if list == ISOLATED {
                        counts.isolated[o] += 1;
                    } else {
                        counts.free[o][class as usize] += 1;
                    }
                    prev = cursor;
                    cursor = frame.next();
                    steps += 1;
                    if steps > table.len() as u64 {
                        return Err(format!("{me:?}: cycle in list of order {order}"));
                    }
                }
                if lists.tail[o][list] != prev {
                    return Err(format!(
                        "{me:?}: tail of order {order} list {list} is wrong"
                    ));
                }
            }
            {
                let mut cursor = lists.cache_head[o];
                let mut len = 0;
                while cursor != NIL {
                    let (state, fo) = table.frame(FrameIdx(cursor)).get();
                    if state != FrameState::Cached || fo != order {
                        return Err(format!(
                            "{me:?}: cached frame {cursor} is {state:?} order {fo}"
                        ));
                    }
                    len += 1;
                    cursor = table.frame(FrameIdx(cursor)).next();
                    if len > table.len() {
                        return Err(format!("{me:?}: cycle in cache of order {order}"));
                    }
                }
                if len != lists.cache_len[o] {
                    return Err(format!(
                        "{me:?}: cache length of order {order} is {} but {len} listed",
                        lists.cache_len[o]
                    ));
                }
                counts.cached[o] = len as u64;
            }
        }
        // Fresh chunks count as free zero blocks of the top order, vacant ones as free
        // blocks of their class.
        let top = env.max_order as usize;
        counts.free[top][FreeClass::Zero as usize] += (lists.fresh_end - lists.fresh_next) as u64;
        for class in [FreeClass::Hinted, FreeClass::Zero] {
            let count = lists.vacant.count(class);
            if count != 0 && me != ShardId::Shared {
                return Err(format!("{me:?}: holds vacant chunks"));
            }
            if me == ShardId::Shared {
                let marked: u32 = (0..table.vacant_words())
                    .map(|w| table.vacant_word(class, w).count_ones())
                    .sum();
                if marked != count {
                    return Err(format!(
                        "{me:?}: {count} vacant {class:?} chunks counted, {marked} marked"
                    ));
                }
            }
            counts.free[top][class as usize] += count as u64;
        }
        for order in 0..=env.max_order as usize {
            let c = &self.shard.counters[order];
            let listed: u64 = counts.free[order].iter().sum::<u64>() + counts.cached[order];
            let check = |what: &str, counter: u64, walked: u64| {
                if counter == walked {
                    Ok(())
                } else {
                    Err(format!(
                        "{me:?}: order {order} {what} counter says {counter}, lists hold {walked}"
                    ))
                }
            };
            check("free", c.free(), listed)?;
            check(
                "hinted",
                c.hinted.load(Ordering::Acquire),
                counts.free[order][FreeClass::Hinted as usize],
            )?;
            check(
                "zero",
                c.zero.load(Ordering::Acquire),
                counts.free[order][FreeClass::Zero as usize],
            )?;
            check(
                "in-flight",
                c.in_flight.load(Ordering::Acquire),
                counts.isolated[order],
            )?;
            check(
                "cached",
                c.cached.load(Ordering::Acquire),
                counts.cached[order],
            )?;
            for class in 0..CLASSES {
                seen.free[order][class] += counts.free[order][class];
            }
            seen.cached[order] += counts.cached[order];
        }
        self.audit_reservations()?;
        seen.fresh_chunks += (lists.fresh_end - lists.fresh_next) as u64;
        if me == ShardId::Shared {
            seen.first_fresh_chunk = lists.fresh_next;
        }
        Ok(())
    }
}
