//! The small-object layer's unsafe code under Miri: a heap-backed `PoolAlloc` (Miri cannot
//! model `mmap`), driven by hand through `GlobalAlloc` on one thread, then on two. Under
//! Miri the per-CPU caches take their portable path (one CPU), and direct mappings are
//! served by the system allocator. Also runs as an ordinary test.
//!
//! ```sh
//! cargo +nightly miri test --test miri_slab     # .ci/miri.sh runs it
//! ```

use std::alloc::{GlobalAlloc, Layout};

use pagepool::{Backing, PoolAlloc, PoolBuilder};

fn adapter() -> PoolAlloc {
    PoolAlloc::with_config(
        PoolBuilder::new()
            .backing(Backing::Heap)
            .capacity(4 << 20)
            .max_order(8)
            .shards(1)
            // Per-CPU block caches in proportion to the 4 MiB pool: with the default
            // 8 MiB budget a refill takes a quarter of the pool, and Miri spends minutes
            // moving blocks between the caches and the shards.
            .cpu_cache_bytes(256 << 10),
    )
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

fn fill(p: *mut u8, size: usize, seed: u8) {
    for i in 0..size {
        // SAFETY: the caller owns `size` bytes at `p`.
        unsafe { p.add(i).write(seed ^ i as u8) };
    }
}

fn check(p: *const u8, size: usize, seed: u8) {
    for i in 0..size {
        // SAFETY: the caller owns `size` initialised bytes at `p`.
        assert_eq!(
            unsafe { p.add(i).read() },
            seed ^ i as u8,
            "byte {i} of {size}"
        );
    }
}

#[test]
fn objects_through_caches_slabs_and_back() {
    let a = adapter();
    let n = if cfg!(miri) { 200 } else { 1500 };
    let sizes = [1usize, 8, 16, 24, 100, 128, 300, 1000, 3000, 5000];
    let mut live = Vec::new();
    // SAFETY (whole test): every pointer is used with the layout it was allocated with.
    unsafe {
        for i in 0..n {
            let l = layout(sizes[i % sizes.len()], if i % 7 == 0 { 64 } else { 8 });
            let p = if i % 5 == 0 {
                a.alloc_zeroed(l)
            } else {
                a.alloc(l)
            };
            assert!(a.contains(p) && (p as usize).is_multiple_of(l.align()));
            if i % 5 == 0 {
                check_zero(p, l.size());
            }
            fill(p, l.size(), i as u8);
            live.push((p, l, i as u8));
        }
        // Free every other one, reuse the holes, resize some in place and some not.
        for (p, l, seed) in live.iter().step_by(2) {
            check(*p, l.size(), *seed);
            a.dealloc(*p, *l);
        }
        live = live.into_iter().skip(1).step_by(2).collect();
        for (i, (p, l, seed)) in live.iter_mut().enumerate() {
            let new_size = if i % 2 == 0 {
                l.size() + 1
            } else {
                l.size() * 3
            };
            let q = a.realloc(*p, *l, new_size);
            check(q, l.size().min(new_size), *seed);
            fill(q, new_size, *seed);
            *p = q;
            *l = layout(new_size, l.align());
        }
        let stats = a.stats();
        assert!(
            stats.slab_refills > 0 && stats.slab_live_objects > 0,
            "{stats}"
        );
        a.check_consistency().unwrap();
        for (p, l, seed) in live {
            check(p, l.size(), seed);
            a.dealloc(p, l);
        }
    }
    a.drain_caches();
    a.check_consistency().unwrap();
    let stats = a.stats();
    assert_eq!(stats.slab_live_objects, 0, "{stats}");
    assert_eq!(stats.slabs, 0, "every slab went back to the pool: {stats}");
    assert_eq!(a.pool_stats().unwrap().allocated_bytes, 0);
}

fn check_zero(p: *const u8, size: usize) {
    // SAFETY: the caller owns `size` bytes at `p`.
    let bytes = unsafe { std::slice::from_raw_parts(p, size) };
    assert!(bytes.iter().all(|&b| b == 0), "not zeroed");
}

#[test]
fn zeroed_objects_are_zero_after_reuse() {
    let a = adapter();
    let l = layout(200, 8);
    // SAFETY: every pointer is used with the layout it was allocated with.
    unsafe {
        let ps: Vec<*mut u8> = (0..40).map(|_| a.alloc(l)).collect();
        for &p in &ps {
            std::ptr::write_bytes(p, 0xAB, l.size());
            a.dealloc(p, l);
        }
        // The same objects come back (from the cache, then the free list): zeroed.
        let zs: Vec<*mut u8> = (0..40).map(|_| a.alloc_zeroed(l)).collect();
        for &z in &zs {
            check_zero(z, l.size());
            a.dealloc(z, l);
        }
    }
    a.check_consistency().unwrap();
}

#[test]
fn objects_freed_on_another_thread() {
    let a = adapter();
    let l = layout(48, 8);
    let n = if cfg!(miri) { 64 } else { 4000 };
    // SAFETY: allocated here with `l`, freed once, on the other thread.
    let ps: Vec<usize> = (0..n)
        .map(|i| {
            let p = unsafe { a.alloc(l) };
            fill(p, 48, i as u8);
            p as usize
        })
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for (i, &p) in ps.iter().enumerate() {
                check(p as *const u8, 48, i as u8);
                // SAFETY: as above.
                unsafe { a.dealloc(p as *mut u8, l) };
            }
        });
        s.spawn(|| {
            for i in 0..n {
                // SAFETY: a fresh allocation, freed right away.
                unsafe {
                    let p = a.alloc(l);
                    fill(p, 48, i as u8);
                    a.dealloc(p, l);
                }
            }
        });
    });
    a.check_consistency().unwrap();
    assert_eq!(a.stats().slab_live_objects, 0);
}

#[test]
fn large_requests_are_blocks_and_mappings() {
    let a = adapter();
    // SAFETY: every pointer is used with the layout it was allocated with.
    unsafe {
        let block = a.alloc(layout(100_000, 8));
        assert!(a.contains(block));
        fill(block, 100_000, 3);
        let mapped = a.realloc(block, layout(100_000, 8), 3 << 20); // above 1 MiB blocks
        assert!(!a.contains(mapped));
        check(mapped, 100_000, 3);
        let back = a.realloc(mapped, layout(3 << 20, 8), 2000);
        assert!(a.contains(back));
        check(back, 2000, 3);
        a.dealloc(back, layout(2000, 8));
        let aligned = a.alloc_zeroed(layout(2 << 20, 2 << 20));
        assert_eq!(aligned as usize % (2 << 20), 0);
        check_zero(aligned, 4096);
        a.dealloc(aligned, layout(2 << 20, 2 << 20));
    }
    a.check_consistency().unwrap();
    assert_eq!(a.stats().huge_mappings, 0);
}
