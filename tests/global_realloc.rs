//! `realloc` through `PoolAlloc`: contents survive in-place growth, moves between slab
//! objects, page blocks, direct mappings (resized with `mremap`, alignment kept) and the
//! fallback, and in-place shrinking; in-place growth really happens.

use std::alloc::{GlobalAlloc, Layout};

use pagepool::{PoolAlloc, PoolBuilder};

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

/// A private adapter with one shard and no block cache, so block placement is
/// deterministic: nothing else allocates from it.
static LOCAL: PoolAlloc = PoolAlloc::with_config(
    PoolBuilder::new()
        .capacity(64 << 20)
        .max_order(10)
        .shards(1)
        .cache_blocks(0),
);

/// For the zeroing test, so it cannot disturb `LOCAL`'s deterministic layout.
static ZEROED: PoolAlloc = PoolAlloc::with_config(
    PoolBuilder::new()
        .capacity(16 << 20)
        .max_order(10)
        .shards(1),
);

fn fill(ptr: *mut u8, len: usize, seed: u8) {
    for i in 0..len {
        // SAFETY: the caller owns `len` bytes at `ptr`.
        unsafe { ptr.add(i).write(seed.wrapping_add((i % 251) as u8)) };
    }
}

fn check(ptr: *const u8, len: usize, seed: u8) {
    for i in 0..len {
        // SAFETY: the caller owns `len` initialised bytes at `ptr`.
        let got = unsafe { ptr.add(i).read() };
        assert_eq!(got, seed.wrapping_add((i % 251) as u8), "byte {i} of {len}");
    }
}

#[test]
fn doubling_grows_in_place_in_a_fresh_pool() {
    // Serialised too: its own bookkeeping allocates through GLOBAL.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let align = 8;
    // Above the small-object limit (8 KiB): a page block from the start.
    let mut size = 64 << 10;
    // SAFETY: non-zero size, valid alignment.
    let first = unsafe { LOCAL.alloc(Layout::from_size_align(size, align).unwrap()) };
    assert!(LOCAL.contains(first));
    fill(first, size, 3);
    let mut ptr = first;
    // 64 KiB -> 1 MiB (above it, requests are mapped directly until a mapping is freed):
    // the block is the lowest of a fresh chunk, all its buddies are free.
    while size < 1 << 20 {
        let new_size = size * 2;
        // SAFETY: `ptr` was allocated by LOCAL with this layout.
        ptr =
            unsafe { LOCAL.realloc(ptr, Layout::from_size_align(size, align).unwrap(), new_size) };
        assert_eq!(ptr, first, "grew in place to {new_size}");
        check(ptr, size, 3);
        fill(ptr, new_size, 3);
        size = new_size;
    }
    let stats = LOCAL.stats();
    assert_eq!(stats.grown_in_place, 4, "{stats}");
    assert_eq!(stats.moved_within_pool, 0, "{stats}");
    // Shrinking splits in place (100 000 bytes is still a page block: 128 KiB).
    // SAFETY: as above.
    let shrunk =
        unsafe { LOCAL.realloc(ptr, Layout::from_size_align(size, align).unwrap(), 100_000) };
    assert_eq!(shrunk, first);
    check(shrunk, 100_000, 3);
    // The freed upper part is available again: a 512 KiB block fits there.
    // SAFETY: non-zero size.
    let other = unsafe { LOCAL.alloc(Layout::from_size_align(512 << 10, 8).unwrap()) };
    assert_eq!(other as usize, first as usize + (512 << 10));
    // An occupied buddy forces a move, contents kept.
    // SAFETY: allocated by LOCAL with these layouts.
    let moved = unsafe {
        LOCAL.realloc(
            shrunk,
            Layout::from_size_align(100_000, align).unwrap(),
            768 << 10,
        )
    };
    assert_ne!(moved, first);
    check(moved, 100_000, 3);
    assert_eq!(LOCAL.stats().moved_within_pool, 1);
    // SAFETY: allocated by LOCAL with these layouts.
    unsafe {
        LOCAL.dealloc(moved, Layout::from_size_align(768 << 10, align).unwrap());
        LOCAL.dealloc(other, Layout::from_size_align(512 << 10, 8).unwrap());
    }
    LOCAL.drain_caches();
    LOCAL.check_consistency().unwrap();
    let pool = LOCAL.pool_stats().unwrap();
    assert_eq!(pool.allocated_bytes, 0, "{pool}");
}

/// Serialises the tests that watch `GLOBAL`'s placement, so their blocks' buddies are not
/// taken by each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn vec_growth_keeps_contents() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = GLOBAL.stats();
    let mut v: Vec<u32> = Vec::new();
    let (mut in_place, mut moved) = (0, 0);
    let (mut last_ptr, mut last_cap) = (v.as_ptr(), v.capacity());
    for i in 0..(8u32 << 20) {
        v.push(i.wrapping_mul(2_654_435_761));
        if v.capacity() != last_cap {
            // A page block: in the pool, more than 32 KiB (the small-object limit is 8 KiB).
            if last_cap * 4 > 32 << 10 && GLOBAL.contains(last_ptr.cast()) {
                if v.as_ptr() == last_ptr {
                    in_place += 1
                } else {
                    moved += 1
                }
            }
            (last_ptr, last_cap) = (v.as_ptr(), v.capacity());
        }
    }
    for (i, &x) in v.iter().enumerate() {
        assert_eq!(x, (i as u32).wrapping_mul(2_654_435_761));
    }
    let after = GLOBAL.stats();
    // As a page block the buffer goes from 64 KiB up to 1 MiB, or up to 32 MiB once the
    // direct-mapping threshold has risen (other tests free mappings): then it is mapped
    // and grows with mremap. A page block grows in place when its buddy is free.
    println!("page-block reallocs of the vector: {in_place} in place, {moved} moved\n{after}");
    assert!(
        (4..=9).contains(&(in_place + moved)),
        "{in_place} + {moved}"
    );
    assert!(
        after.grown_in_place - before.grown_in_place >= in_place,
        "{after}"
    );
}

/// Switched off in the test below; nothing else uses it.
static SWITCHABLE: PoolAlloc =
    PoolAlloc::with_config(PoolBuilder::new().capacity(64 << 20).max_order(10));

#[test]
fn moves_between_slabs_blocks_mappings_and_the_fallback() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = GLOBAL.stats();
    // SAFETY (whole test): every pointer is used with the layout it was allocated with.
    unsafe {
        let small = Layout::from_size_align(1000, 16).unwrap();
        let p = std::alloc::alloc(small);
        assert!(GLOBAL.contains(p), "a slab object");
        fill(p, 1000, 9);
        // In place while the class holds it.
        let q = std::alloc::realloc(p, small, 1010);
        assert_eq!(q, p);
        check(q, 1000, 9);
        // Growing past the small-object limit moves to a page block.
        let p = std::alloc::realloc(q, Layout::from_size_align(1010, 16).unwrap(), 100_000);
        assert!(GLOBAL.contains(p));
        check(p, 1000, 9);
        fill(p, 100_000, 10);
        // Growing past the largest block (32 MiB) moves into a mapping of its own ...
        let mid = Layout::from_size_align(100_000, 16).unwrap();
        let p = std::alloc::realloc(p, mid, 40 << 20);
        assert!(!GLOBAL.contains(p));
        check(p, 100_000, 10);
        fill(p, 40 << 20, 11);
        // ... which grows and shrinks with mremap, contents kept ...
        let big = Layout::from_size_align(40 << 20, 16).unwrap();
        let p = std::alloc::realloc(p, big, 90 << 20);
        check(p, 40 << 20, 11);
        let p = std::alloc::realloc(p, Layout::from_size_align(90 << 20, 16).unwrap(), 35 << 20);
        check(p, 35 << 20, 11);
        // ... and, shrunk below the largest block, moves back into the pool.
        let p = std::alloc::realloc(p, Layout::from_size_align(35 << 20, 16).unwrap(), 50_000);
        assert!(GLOBAL.contains(p));
        check(p, 50_000, 11);
        // A page block shrunk to a small size becomes a slab object.
        let p = std::alloc::realloc(p, Layout::from_size_align(50_000, 16).unwrap(), 100);
        assert!(GLOBAL.contains(p));
        check(p, 100, 11);
        std::alloc::dealloc(p, Layout::from_size_align(100, 16).unwrap());

        // With the pool switched off, new requests go to the fallback; a fallback
        // allocation that grows past the largest block (8 MiB here) becomes a mapping, and
        // one that grows while the pool is on again moves into it.
        SWITCHABLE.set_pool_enabled(false);
        let l = Layout::from_size_align(3000, 8).unwrap();
        let f = SWITCHABLE.alloc(l);
        assert!(!SWITCHABLE.contains(f));
        fill(f, 3000, 12);
        let g = SWITCHABLE.realloc(f, l, 9 << 20);
        assert!(!SWITCHABLE.contains(g) && SWITCHABLE.stats().huge_mappings == 1);
        check(g, 3000, 12);
        SWITCHABLE.dealloc(g, Layout::from_size_align(9 << 20, 8).unwrap());
        assert_eq!(SWITCHABLE.stats().huge_mappings, 0);
        let f = SWITCHABLE.alloc(l);
        fill(f, 3000, 13);
        SWITCHABLE.set_pool_enabled(true);
        let g = SWITCHABLE.realloc(f, l, 6000);
        assert!(SWITCHABLE.contains(g));
        check(g, 3000, 13);
        SWITCHABLE.dealloc(g, Layout::from_size_align(6000, 8).unwrap());
        assert_eq!(SWITCHABLE.stats().moved_to_pool, 1);
        SWITCHABLE.check_consistency().unwrap();
    }
    let stats = GLOBAL.stats();
    assert!(
        stats.moved_within_pool > before.moved_within_pool
            && stats.moved_out_of_pool > before.moved_out_of_pool
            && stats.huge_remaps >= before.huge_remaps + 2,
        "{stats}"
    );
}

#[test]
fn aligned_mappings_keep_their_alignment_through_mremap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for align in [4096usize, 64 << 10, 2 << 20, 64 << 20] {
        // SAFETY (whole loop): every pointer is used with the layout it was allocated
        // with.
        unsafe {
            let mut size = 33 << 20;
            let mut p = GLOBAL.alloc_zeroed(Layout::from_size_align(size, align).unwrap());
            assert!(
                !p.is_null() && (p as usize).is_multiple_of(align),
                "align {align}"
            );
            assert!(
                std::slice::from_raw_parts(p, size)
                    .iter()
                    .step_by(4096)
                    .all(|&b| b == 0)
            );
            fill(p, 1 << 20, 5);
            // Keep other mappings near it, so growing in place is not always possible.
            let blocker = GLOBAL.alloc(Layout::from_size_align(40 << 20, 8).unwrap());
            for new_size in [70 << 20, 34 << 20, 130 << 20] {
                let q = GLOBAL.realloc(p, Layout::from_size_align(size, align).unwrap(), new_size);
                assert!(
                    !q.is_null() && (q as usize).is_multiple_of(align),
                    "align {align}, {new_size}"
                );
                check(q, 1 << 20, 5);
                // The end of the mapping is usable.
                q.add(new_size - 1).write(7);
                (p, size) = (q, new_size);
            }
            GLOBAL.dealloc(p, Layout::from_size_align(size, align).unwrap());
            GLOBAL.dealloc(blocker, Layout::from_size_align(40 << 20, 8).unwrap());
        }
    }
}

#[test]
fn zeroed_blocks_read_zero_and_fresh_ones_skip_the_memset() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: every pointer is used with the layout it was allocated with.
    unsafe {
        let layout = Layout::from_size_align(256 << 10, 4096).unwrap();
        // Dirty a block, free it, and ask for zeroed memory of the same size: whichever
        // block comes back must read as zeros.
        let p = ZEROED.alloc(layout);
        std::ptr::write_bytes(p, 0xAB, layout.size());
        ZEROED.dealloc(p, layout);
        let z = ZEROED.alloc_zeroed(layout);
        assert!(
            std::slice::from_raw_parts(z, layout.size())
                .iter()
                .all(|&b| b == 0)
        );
        ZEROED.dealloc(z, layout);
    }
    // Fresh memory from the kernel is known-zero: at least one zeroed request skipped it.
    let big = vec![0u64; 4 << 20];
    assert!(big.iter().all(|&x| x == 0));
    assert!(
        GLOBAL.stats().zeroed_without_memset > 0,
        "{}",
        GLOBAL.stats()
    );
}

#[test]
fn random_realloc_chains_on_many_threads() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
                let steps = if cfg!(debug_assertions) { 300 } else { 1500 };
                for step in 0..steps {
                    let r = next();
                    if live.len() < 16 || r % 3 == 0 {
                        let size = 1 + (next() % (1 << (4 + next() % 18))) as usize;
                        let layout = Layout::from_size_align(size, 1 << (next() % 13)).unwrap();
                        // SAFETY: non-zero size.
                        let p = unsafe { GLOBAL.alloc(layout) };
                        assert!(!p.is_null());
                        assert_eq!(p as usize % layout.align(), 0);
                        fill(p, size, step as u8);
                        live.push((p, layout, step as u8));
                    } else {
                        let i = (r as usize / 3) % live.len();
                        let (p, layout, seed) = live[i];
                        if r % 5 == 0 {
                            check(p, layout.size(), seed);
                            // SAFETY: allocated with `layout`.
                            unsafe { GLOBAL.dealloc(p, layout) };
                            live.swap_remove(i);
                        } else {
                            let new_size = 1 + (next() % (1 << (4 + next() % 20))) as usize;
                            // SAFETY: allocated with `layout`; non-zero new size.
                            let q = unsafe { GLOBAL.realloc(p, layout, new_size) };
                            assert!(!q.is_null());
                            assert_eq!(q as usize % layout.align(), 0);
                            check(q, layout.size().min(new_size), seed);
                            fill(q, new_size, seed);
                            live[i] = (
                                q,
                                Layout::from_size_align(new_size, layout.align()).unwrap(),
                                seed,
                            );
                        }
                    }
                }
                for (p, layout, seed) in live {
                    check(p, layout.size(), seed);
                    // SAFETY: allocated with `layout`.
                    unsafe { GLOBAL.dealloc(p, layout) };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    GLOBAL.check_consistency().unwrap();
}
