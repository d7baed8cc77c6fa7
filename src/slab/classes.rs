//! Size classes: which object size serves a request, how large a slab of each class is,
//! and how many objects of it a CPU may cache.
//!
//! ```text
//!  index   0   1   2  ...  14 | 15  16 ... 22 | 23  24 ... 30 | ...      | last
//!  size   16  24  32  ... 128 | 144 160 ... 256 | 288 320 ... 512 | ... | SMALL_LIMIT
//!         multiples of 8      | 8 classes per doubling: 2^k + j * 2^(k-3), j = 1..=8
//! ```
//!
//! A request takes the smallest class at least its size, so the waste inside an object is
//! below 8 bytes up to 128 bytes and below 1/8 (12.5 %) of the object above, as in
//! tcmalloc's and jemalloc's spacing. The smallest class is 16 bytes: a free object holds
//! two words, the free-list link and the double-free mark (see `mod.rs`).
//!
//! A class's *natural alignment* is the largest power of two dividing its size: slabs are
//! pool blocks aligned to their own size (at least 16 KiB), so every object of the class
//! starts at a multiple of it. A request aligned more strictly than its class takes the
//! smallest larger class whose natural alignment suffices, or a page block when none does.
//!
//! Each class has a slab order (the pool block its slabs are carved from): the smallest
//! order of at least 16 KiB holding [`MIN_OBJECTS`] objects with at most 1/8 of the block
//! left over at its end (never carved, so never touched). With [`SMALL_LIMIT`] at 32 KiB
//! the largest slabs are 128 KiB.
//!
//! Why slabs this small: a program that uses every class on every CPU holds at least one
//! slab per class and CPU however little it keeps alive, and a slab's carved part stays
//! resident. 16 KiB slabs with at least 4 objects put that floor at 3.1 MiB per CPU,
//! against 7.1 MiB with 64 KiB slabs of at least 8 objects; on the application suite's
//! producer/consumer workload (about 1 MiB of small objects live) peak RSS fell from
//! 20.6-23.5 MiB to 16.2-18.8 MiB, with the wall time unchanged (see the README).
//!
//! Everything here is computed at compile time.

use crate::FRAME_SIZE;

/// The smallest slab is a pool block of this order: 16 KiB (4 KiB under loom, whose
/// pools stop at order 3). It is also the granule of the slab map.
pub(crate) const SLAB_MIN_ORDER: u8 = if cfg!(loom) { 0 } else { 2 };
/// log2 of the slab map's granule.
pub(crate) const GRANULE_SHIFT: usize = crate::FRAME_SHIFT + SLAB_MIN_ORDER as usize;

/// The largest object a slab serves, in bytes; larger requests are pool blocks (or, above
/// the pool's largest block, direct mappings). Chosen by measurement: see the README's
/// PoolAlloc section. (256 bytes under loom, so every slab fits a loom pool.)
pub(crate) const SMALL_LIMIT: usize = if cfg!(loom) { 256 } else { 32 << 10 };

/// The smallest class: two words.
pub(crate) const MIN_SIZE: usize = 16;

/// A slab holds at least this many objects.
pub(crate) const MIN_OBJECTS: usize = 4;

/// Bytes of free objects a CPU may cache per class: 8 KiB (the count clamped to
/// `1..=MAX_CACHE`), or [`MIN_CACHE`] objects for the classes above 2 KiB while they fit
/// in [`CACHE_LARGE_CLASS_BYTES`]. A CPU caches at most about 1 MiB over all classes.
pub(crate) const CACHE_CLASS_BYTES: usize = 8 << 10;
/// The objects a CPU caches of a class above 2 KiB, as long as they fit in
/// [`CACHE_LARGE_CLASS_BYTES`]: with 8 KiB per class a CPU cached two 4 KiB objects and
/// one of 8 KiB or more, and a program churning buffers of those sizes took the heap lock
/// on nearly every other request. Four raised a random 4 KiB-2 MiB mix through `PoolAlloc`
/// by 15-17 % on one thread and 10-13 % on two, with peak and idle memory of the
/// application suite unchanged (README).
pub(crate) const MIN_CACHE: usize = 4;
/// The bytes [`MIN_CACHE`] objects of a large class may take: 32 KiB (so the 16 KiB
/// classes cache two objects and the 32 KiB class one).
pub(crate) const CACHE_LARGE_CLASS_BYTES: usize = 32 << 10;
/// The most objects a CPU caches per class (4 under loom, to keep the models small).
pub(crate) const MAX_CACHE: usize = if cfg!(loom) { 4 } else { 64 };
/// The most objects one refill or spill moves.
pub(crate) const MAX_BATCH: usize = MAX_CACHE / 2;

/// Number of classes.
pub(crate) const CLASSES: usize = class_index(SMALL_LIMIT) + 1;

const _: () = assert!(SMALL_LIMIT.is_power_of_two() && SMALL_LIMIT >= 256);
const _: () = assert!(CLASSES <= 255, "a class fits a byte of the slab map");

/// One class: its geometry and the constants its fast paths need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClassInfo {
    /// Object size in bytes.
    pub(crate) size: u32,
    /// Natural alignment: the largest power of two dividing `size`.
    pub(crate) align: u32,
    /// Order of the pool blocks its slabs are.
    pub(crate) slab_order: u8,
    /// Objects per slab.
    pub(crate) objects: u32,
    /// Objects a CPU may cache.
    pub(crate) cache: u32,
    /// Objects a refill takes and a spill gives back at once.
    pub(crate) batch: u32,
    /// Divisibility test (see [`ClassInfo::divides`]): the inverse of the odd part of
    /// `size` modulo 2^64 ...
    inverse: u64,
    /// ... the power of two in `size` ...
    shift: u32,
    /// ... and `u64::MAX / size`.
    limit: u64,
    /// Bytes of a slab that objects cover: `objects * size`.
    pub(crate) span: u32,
    /// Where the occupancy bins of a partial slab start: bin `k` (1..=3) holds the slabs
    /// with at least `bin_at[k - 1]` objects out, `ceil(k * objects / 4)`.
    pub(crate) bin_at: [u32; 3],
}

impl ClassInfo {
    /// The occupancy bin (0..=3) of a partial slab with `used` objects out: quarters of
    /// the slab, without a division.
    #[inline]
    pub(crate) fn bin(&self, used: u32) -> usize {
        (used >= self.bin_at[0]) as usize
            + (used >= self.bin_at[1]) as usize
            + (used >= self.bin_at[2]) as usize
    }

    /// Whether a slab that had `old` objects out changes list when one comes back: it was
    /// full, or `old` starts a bin.
    #[inline]
    pub(crate) fn leaves_list_at(&self, old: u32) -> bool {
        old == self.objects || self.bin_at.contains(&old)
    }

    /// Whether `offset` is a multiple of the object size: one multiplication and a rotate
    /// (the test compilers emit for `x % C == 0`: Hacker's Delight 10-17), so the free
    /// path can refuse a pointer into the middle of an object without dividing.
    #[inline(always)]
    pub(crate) fn divides(&self, offset: usize) -> bool {
        (offset as u64)
            .wrapping_mul(self.inverse)
            .rotate_right(self.shift)
            <= self.limit
    }

    /// Bytes of a slab of this class.
    #[inline]
    pub(crate) fn slab_bytes(&self) -> usize {
        FRAME_SIZE << self.slab_order
    }
}

/// The class table.
pub(crate) static INFO: [ClassInfo; CLASSES] = INFO_CONST;

/// The size of class `index`.
const fn class_size(index: usize) -> usize {
    if index < 15 {
        MIN_SIZE + 8 * index
    } else {
        let k = (index - 15) / 8;
        let j = (index - 15) % 8 + 1;
        (128 << k) + j * (16 << k)
    }
}

/// The smallest class holding `size` bytes (`size` at most [`SMALL_LIMIT`]; 0 counts as 1).
#[inline(always)]
pub(crate) const fn class_index(size: usize) -> usize {
    if size <= 128 {
        let size = if size < MIN_SIZE { MIN_SIZE } else { size };
        size.div_ceil(8) - 2
    } else {
        // size - 1 lies in [2^b, 2^(b+1)); the classes of that doubling are 2^(b-3) apart.
        let b = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
        15 + (b - 7) * 8 + ((size - 1 - (1 << b)) >> (b - 3))
    }
}

/// The class serving `size` bytes aligned to `align`, if a slab can: the smallest class
/// at least `size` whose natural alignment is at least `align`.
#[inline(always)]
pub(crate) fn class_for(size: usize, align: usize) -> Option<usize> {
    if size > SMALL_LIMIT {
        return None;
    }
    let class = class_index(size);
    if align <= INFO[class].align as usize {
        return Some(class);
    }
    aligned_class(class, align)
}

/// [`class_for`] for requests whose alignment the size's own class satisfies (nearly all);
/// `None` for the others too. Makes no call.
#[inline(always)]
pub(crate) fn natural_class_for(size: usize, align: usize) -> Option<usize> {
    if size > SMALL_LIMIT {
        return None;
    }
    let class = class_index(size);
    (align <= INFO[class].align as usize).then_some(class)
}

/// The first class from `class` up whose natural alignment is at least `align`.
#[cold]
fn aligned_class(class: usize, align: usize) -> Option<usize> {
    (class..CLASSES).find(|&c| INFO[c].align as usize >= align)
}

/// The modular inverse of an odd `x` modulo 2^64 (Newton's iteration: each step doubles
/// the number of correct low bits, and `x` itself is right to 3 bits).
const fn inverse(x: u64) -> u64 {
    let mut y = x;
    let mut i = 0;
    while i < 5 {
        y = y.wrapping_mul(2u64.wrapping_sub(x.wrapping_mul(y)));
        i += 1;
    }
    y
}

const fn build() -> [ClassInfo; CLASSES] {
    let mut info = [ClassInfo {
        size: 0,
        align: 0,
        slab_order: 0,
        objects: 0,
        cache: 0,
        batch: 0,
        inverse: 0,
        shift: 0,
        limit: 0,
        span: 0,
        bin_at: [0; 3],
    }; CLASSES];
    let mut i = 0;
    while i < CLASSES {
        let size = class_size(i);
        let shift = size.trailing_zeros();
        let mut order = SLAB_MIN_ORDER;
        loop {
            let bytes = FRAME_SIZE << order;
            let objects = bytes / size;
            if objects >= MIN_OBJECTS && (bytes - objects * size) * 8 <= bytes {
                break;
            }
            order += 1;
        }
        let mut cache = CACHE_CLASS_BYTES / size;
        let large = CACHE_LARGE_CLASS_BYTES / size;
        let large = if large < MIN_CACHE { large } else { MIN_CACHE };
        if cache < large {
            cache = large;
        }
        if cache > MAX_CACHE {
            cache = MAX_CACHE;
        }
        if cache < 1 {
            cache = 1;
        }
        let batch = if cache / 2 > 1 { cache / 2 } else { 1 };
        info[i] = ClassInfo {
            size: size as u32,
            align: 1 << shift,
            slab_order: order,
            objects: ((FRAME_SIZE << order) / size) as u32,
            cache: cache as u32,
            batch: batch as u32,
            inverse: inverse((size >> shift) as u64),
            shift,
            limit: u64::MAX / size as u64,
            span: (((FRAME_SIZE << order) / size) * size) as u32,
            bin_at: {
                let objects = (FRAME_SIZE << order) / size;
                [
                    objects.div_ceil(4) as u32,
                    (2 * objects).div_ceil(4) as u32,
                    (3 * objects).div_ceil(4) as u32,
                ]
            },
        };
        i += 1;
    }
    info
}

/// The largest slab order of any class.
pub(crate) const MAX_SLAB_ORDER: u8 = {
    let mut max = 0;
    let mut i = 0;
    while i < CLASSES {
        if INFO_CONST[i].slab_order > max {
            max = INFO_CONST[i].slab_order;
        }
        i += 1;
    }
    max
};

/// The table as a constant, for other constants.
const INFO_CONST: [ClassInfo; CLASSES] = build();

const _: () = assert!(class_size(CLASSES - 1) == SMALL_LIMIT);
const _: () = assert!(MAX_BATCH >= MAX_CACHE / 2);

/// The largest object size whose slabs fit blocks of at most `max_order`: the limit of
/// a pool whose largest block is smaller than the largest slab.
pub(crate) const fn small_limit(max_order: u8) -> usize {
    let mut limit = 0;
    let mut i = 0;
    while i < CLASSES {
        if INFO_CONST[i].slab_order <= max_order {
            limit = INFO_CONST[i].size as usize;
        }
        i += 1;
    }
    limit
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn every_size_gets_the_smallest_class_that_holds_it() {
        for size in 1..=SMALL_LIMIT {
            let c = class_index(size);
            assert!(INFO[c].size as usize >= size, "size {size}: class {c}");
            if c > 0 {
                assert!((INFO[c - 1].size as usize) < size, "size {size}: class {c}");
            }
        }
    }

    #[test]
    fn waste_is_bounded_and_sizes_grow() {
        for c in 1..CLASSES {
            let (lo, hi) = (INFO[c - 1].size as usize, INFO[c].size as usize);
            assert!(lo < hi);
            // A request of lo + 1 bytes takes hi: at most 8 bytes or 1/8 too many.
            assert!(
                hi - (lo + 1) < 8 || (hi - lo - 1) * 8 <= lo + 1,
                "{lo} -> {hi}"
            );
        }
    }

    #[test]
    fn slabs_hold_enough_objects_with_little_left_over() {
        for info in &INFO {
            let bytes = info.slab_bytes();
            assert!(info.objects as usize >= MIN_OBJECTS);
            assert_eq!(info.objects as usize, bytes / info.size as usize);
            assert!((bytes - info.objects as usize * info.size as usize) * 8 <= bytes);
            assert!(info.slab_order <= MAX_SLAB_ORDER);
            assert!(info.batch >= 1 && info.batch <= info.cache.max(1));
            assert!(info.cache as usize <= MAX_CACHE);
        }
    }

    #[test]
    fn cpu_caches_are_bounded_in_bytes() {
        let mut total = 0;
        for info in &INFO {
            let (size, cache) = (info.size as usize, info.cache as usize);
            let bytes = size * cache;
            // 8 KiB per class, or up to 4 objects within 32 KiB for the large classes, or
            // one object of a class larger than that.
            assert!(
                bytes <= CACHE_CLASS_BYTES.max(CACHE_LARGE_CLASS_BYTES) || cache == 1,
                "class {size}: {cache} objects"
            );
            if !cfg!(loom) && (2048..=8192).contains(&size) {
                assert!(cache >= MIN_CACHE, "class {size} caches {cache}");
            }
            total += bytes;
        }
        assert!(total <= 1100 << 10, "{total} bytes per CPU");
    }

    #[test]
    fn bins_are_quarters() {
        for info in &INFO {
            for used in 0..info.objects {
                let quarter = (used as u64 * 4 / info.objects as u64).min(3) as usize;
                assert_eq!(info.bin(used), quarter, "{used} of {}", info.objects);
                let moves = used + 1 == info.objects || info.bin(used) != info.bin(used + 1);
                assert_eq!(
                    info.leaves_list_at(used + 1),
                    moves,
                    "{used} + 1 of {}",
                    info.objects
                );
            }
        }
    }

    #[test]
    fn divisibility_test_matches_the_remainder() {
        for info in &INFO {
            let size = info.size as usize;
            for offset in (0..info.slab_bytes()).step_by(8) {
                assert_eq!(
                    info.divides(offset),
                    offset % size == 0,
                    "{offset} / {size}"
                );
            }
        }
    }

    #[test]
    fn alignment_picks_a_class_whose_objects_are_aligned() {
        for size in [1, 8, 17, 24, 100, 1000, 5000, 20_000] {
            for shift in 0..16 {
                let align = 1usize << shift;
                match class_for(size, align) {
                    Some(c) => {
                        assert!(INFO[c].size as usize >= size);
                        assert_eq!(INFO[c].size as usize % align, 0);
                    }
                    None => assert!(
                        (class_index(size)..CLASSES).all(|c| (INFO[c].align as usize) < align)
                    ),
                }
            }
        }
    }

    #[test]
    fn limits_follow_the_largest_block() {
        assert_eq!(small_limit(MAX_SLAB_ORDER), SMALL_LIMIT);
        assert!(small_limit(SLAB_MIN_ORDER) >= 4096);
        assert_eq!(small_limit(SLAB_MIN_ORDER.saturating_sub(1)), 0);
    }
}
