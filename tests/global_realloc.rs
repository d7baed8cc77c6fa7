//! `realloc` through `PoolAlloc`: contents survive in-place growth, moves within the pool,
//! moves into and out of the pool, and in-place shrinking; in-place growth really happens.

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
    let mut size = 8 << 10;
    // SAFETY: non-zero size, valid alignment.
    let first = unsafe { LOCAL.alloc(Layout::from_size_align(size, align).unwrap()) };
    assert!(LOCAL.contains(first));
    fill(first, size, 3);
    let mut ptr = first;
    // 8 KiB -> 4 MiB: the block is the lowest of a fresh chunk, all its buddies are free.
    while size < 4 << 20 {
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
    assert_eq!(stats.grown_in_place, 9, "{stats}");
    assert_eq!(stats.moved_within_pool, 0, "{stats}");
    // Shrinking splits in place.
    // SAFETY: as above.
    let shrunk =
        unsafe { LOCAL.realloc(ptr, Layout::from_size_align(size, align).unwrap(), 20_000) };
    assert_eq!(shrunk, first);
    check(shrunk, 20_000, 3);
    // The freed upper part is available again: a 2 MiB block fits there.
    // SAFETY: non-zero size.
    let other = unsafe { LOCAL.alloc(Layout::from_size_align(2 << 20, 8).unwrap()) };
    assert_eq!(other as usize, first as usize + (2 << 20));
    // An occupied buddy forces a move, contents kept.
    // SAFETY: allocated by LOCAL with these layouts.
    let moved = unsafe {
        LOCAL.realloc(
            shrunk,
            Layout::from_size_align(20_000, align).unwrap(),
            3 << 20,
        )
    };
    assert_ne!(moved, first);
    check(moved, 20_000, 3);
    assert_eq!(LOCAL.stats().moved_within_pool, 1);
    // SAFETY: allocated by LOCAL with these layouts.
    unsafe {
        LOCAL.dealloc(moved, Layout::from_size_align(3 << 20, align).unwrap());
        LOCAL.dealloc(other, Layout::from_size_align(2 << 20, 8).unwrap());
    }
    LOCAL.check_consistency().unwrap();
    let pool = LOCAL.pool_stats().unwrap();
    assert_eq!(pool.allocated_bytes, 0, "{pool}");
}

/// Serialises the tests that watch `GLOBAL`'s placement, so their blocks' buddies are not
/// taken by each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn vec_growth_keeps_contents_and_sometimes_grows_in_place() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = GLOBAL.stats();
    let mut v: Vec<u32> = Vec::new();
    let (mut in_place, mut moved) = (0, 0);
    let (mut last_ptr, mut last_cap) = (v.as_ptr(), v.capacity());
    for i in 0..(8u32 << 20) {
        v.push(i.wrapping_mul(2_654_435_761));
        if v.capacity() != last_cap {
            if GLOBAL.contains(last_ptr.cast()) {
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
    // In the pool the buffer goes from 2 KiB to 32 MiB: 14 reallocs. The first (2 -> 4 KiB)
    // stays in its 4 KiB block; the others grow in place when the buddy is free, which
    // happens for several of them (the buddy of a fresh split is free until another
    // request of that order takes it).
    println!("pool reallocs of the vector: {in_place} in place, {moved} moved");
    assert_eq!(in_place + moved, 14);
    assert!(in_place >= 1, "{in_place} in place, {moved} moved");
    assert!(
        after.grown_in_place - before.grown_in_place >= in_place - 1,
        "{after}"
    );
}

#[test]
fn moves_between_fallback_and_pool() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY (whole test): every pointer is used with the layout it was allocated with.
    unsafe {
        let small = Layout::from_size_align(1000, 16).unwrap();
        let p = std::alloc::alloc(small);
        assert!(!GLOBAL.contains(p));
        fill(p, 1000, 9);
        // Growing past the threshold moves into the pool.
        let p = std::alloc::realloc(p, small, 100_000);
        assert!(GLOBAL.contains(p));
        check(p, 1000, 9);
        fill(p, 100_000, 10);
        // Growing past the largest block moves out to the fallback.
        let mid = Layout::from_size_align(100_000, 16).unwrap();
        let p = std::alloc::realloc(p, mid, 40 << 20);
        assert!(!GLOBAL.contains(p));
        check(p, 100_000, 10);
        // Shrinking a fallback allocation stays in the fallback.
        let big = Layout::from_size_align(40 << 20, 16).unwrap();
        let p = std::alloc::realloc(p, big, 50_000);
        assert!(!GLOBAL.contains(p));
        check(p, 50_000, 10);
        std::alloc::dealloc(p, Layout::from_size_align(50_000, 16).unwrap());

        // A pool block shrunk below the threshold stays in the pool and is freed to it.
        let q = std::alloc::alloc(Layout::from_size_align(64 << 10, 64).unwrap());
        assert!(GLOBAL.contains(q));
        fill(q, 64 << 10, 1);
        let r = std::alloc::realloc(q, Layout::from_size_align(64 << 10, 64).unwrap(), 100);
        assert_eq!(r, q);
        check(r, 100, 1);
        std::alloc::dealloc(r, Layout::from_size_align(100, 64).unwrap());
    }
    let stats = GLOBAL.stats();
    assert!(
        stats.moved_to_pool >= 1 && stats.moved_to_fallback >= 1 && stats.shrunk_in_place >= 1,
        "{stats}"
    );
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
