//! `allocator_api2::Allocator` for `&PagePool` and `PoolAlloc`: hashbrown maps and
//! allocator_api2 vectors that live in a given pool.
#![cfg(feature = "allocator-api2")]

use std::alloc::Layout;

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec as AVec;
use pagepool::{PagePool, PoolAlloc, PoolBuilder};

/// A private pool without caches in front of the buddy allocator, so that the tests can
/// reason about which buddies are free.
fn pool(shards: usize) -> PagePool {
    PagePool::builder()
        .capacity(128 << 20)
        .max_order(10)
        .shards(shards)
        .cache_blocks(0)
        .cpu_cache(pagepool::CpuCacheMode::Off)
        .hint_thread(false)
        .build()
        .expect("pool")
}

#[test]
fn hashbrown_map_lives_in_the_pool() {
    let pool = pool(2);
    {
        let mut map: hashbrown::HashMap<u64, u64, _, &PagePool> =
            hashbrown::HashMap::with_hasher_in(hashbrown::DefaultHashBuilder::default(), &pool);
        for i in 0..100_000u64 {
            map.insert(i, i * i);
        }
        for i in 0..100_000u64 {
            assert_eq!(map[&i], i * i);
        }
        let stats = pool.stats();
        // 100k (u64, u64) entries need a table of at least 1.6 MiB.
        assert!(stats.allocated_bytes >= 1 << 21, "{stats}");
        map.retain(|k, _| k % 10 == 0);
        map.shrink_to_fit();
        assert_eq!(map.len(), 10_000);
        assert!(map.iter().all(|(k, v)| k % 10 == 0 && *v == k * k));
        assert!(pool.stats().allocated_bytes < stats.allocated_bytes);
    }
    assert_eq!(pool.stats().allocated_bytes, 0);
    pool.check_consistency().unwrap();
}

#[test]
fn vec_grows_in_place_and_shrinks_in_place() {
    let pool = pool(1);
    let mut v: AVec<u64, &PagePool> = AVec::with_capacity_in(512, &pool); // 4 KiB
    let first = v.as_ptr();
    assert!(pool.contains(first.cast()));
    let mut moves = 0;
    for i in 0..(512u64 << 10) {
        // 4 MiB of u64s: every doubling finds its buddy free in this private pool.
        let before = v.as_ptr();
        v.push(i * 3);
        if v.as_ptr() != before {
            moves += 1;
        }
    }
    assert_eq!(moves, 0, "the buffer should have grown in place");
    assert_eq!(v.as_ptr(), first);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
    v.truncate(1000);
    v.shrink_to_fit();
    assert_eq!(v.as_ptr(), first, "shrink splits in place");
    assert!(
        v.capacity() >= 1000 && v.capacity() <= 1024,
        "an 8 KiB block"
    );
    assert_eq!(
        pool.stats().allocated_bytes,
        8 << 10,
        "the upper 4 MiB - 8 KiB went back"
    );
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
    drop(v);
    assert_eq!(pool.stats().allocated_bytes, 0);
    pool.check_consistency().unwrap();
}

#[test]
fn vec_moves_when_the_buddy_is_taken_and_keeps_contents() {
    let pool = pool(1);
    let mut a: AVec<u32, &PagePool> = AVec::with_capacity_in(1024, &pool); // 4 KiB
    let b: AVec<u8, &PagePool> = AVec::with_capacity_in(4096, &pool); // its buddy
    a.extend(0..1024u32);
    let before = a.as_ptr();
    a.push(1024);
    assert_ne!(a.as_ptr(), before, "the buddy is taken: must move");
    assert!(a.iter().enumerate().all(|(i, &x)| x == i as u32));
    drop(b);
}

#[test]
fn raw_allocator_calls() {
    let pool = pool(1);
    let a = &pool;
    // Zero-sized: dangling and aligned, no block.
    let z = a.allocate(Layout::from_size_align(0, 64).unwrap()).unwrap();
    assert_eq!(z.len(), 0);
    assert_eq!(z.cast::<u8>().as_ptr() as usize % 64, 0);
    assert_eq!(pool.stats().allocated_bytes, 0);
    // Too large for the largest block (4 MiB): refused.
    assert!(
        a.allocate(Layout::from_size_align(8 << 20, 8).unwrap())
            .is_err()
    );
    // allocate_zeroed and grow_zeroed read as zeros, even over dirty memory.
    let l1 = Layout::from_size_align(10_000, 8).unwrap();
    let p = a.allocate(l1).unwrap();
    assert_eq!(p.len(), 16 << 10, "the whole block is usable");
    // SAFETY: we own the 16 KiB block.
    unsafe { std::ptr::write_bytes(p.cast::<u8>().as_ptr(), 0xEE, p.len()) };
    // SAFETY: allocated with l1.
    unsafe { a.deallocate(p.cast(), l1) };
    let q = a.allocate_zeroed(l1).unwrap();
    // SAFETY: q is a live block of q.len() bytes.
    let bytes = unsafe { q.as_ref() };
    assert!(bytes.iter().all(|&b| b == 0));
    // SAFETY: we own the block.
    unsafe { std::ptr::write_bytes(q.cast::<u8>().as_ptr(), 0x11, 10_000) };
    let l2 = Layout::from_size_align(100_000, 8).unwrap();
    // SAFETY: q was allocated with l1; l2 is larger.
    let r = unsafe { a.grow_zeroed(q.cast(), l1, l2) }.unwrap();
    // SAFETY: r is a live block of r.len() bytes.
    let bytes = unsafe { r.as_ref() };
    assert!(bytes[..10_000].iter().all(|&b| b == 0x11));
    assert!(bytes[10_000..].iter().all(|&b| b == 0));
    // A stricter alignment on shrink is honoured.
    let l3 = Layout::from_size_align(4096, 256 << 10).unwrap();
    // SAFETY: r was allocated with l2; l3 is smaller.
    let s = unsafe { Allocator::shrink(a, r.cast(), l2, l3) }.unwrap();
    assert_eq!(s.cast::<u8>().as_ptr() as usize % (256 << 10), 0);
    // SAFETY: s holds at least 4096 bytes copied from r.
    assert!(unsafe { s.as_ref() }[..4096].iter().all(|&b| b == 0x11));
    // SAFETY: allocated (by shrink) with l3.
    unsafe { a.deallocate(s.cast(), l3) };
    assert_eq!(pool.stats().allocated_bytes, 0);
    pool.check_consistency().unwrap();
}

#[test]
fn owning_vec_and_hashbrown_version() {
    // A Vec that owns its pool (moved in), and a hashbrown set built on the same
    // allocator-api2 trait (this compiles only if hashbrown uses allocator-api2 0.2).
    let mut v: AVec<String, PagePool> = AVec::new_in(pool(1));
    for i in 0..10_000 {
        v.push(format!("item {i}"));
    }
    assert_eq!(v[9_999], "item 9999");
    let set: hashbrown::HashSet<u32, hashbrown::DefaultHashBuilder, &PagePool> = {
        let p: &'static PagePool = Box::leak(Box::new(pool(1)));
        let mut s = hashbrown::HashSet::with_hasher_in(Default::default(), p);
        s.extend(0..50_000u32);
        s
    };
    assert_eq!(set.len(), 50_000);
    assert!(set.contains(&49_999));
}

static ADAPTER: PoolAlloc = PoolAlloc::with_config(
    PoolBuilder::new()
        .capacity(64 << 20)
        .max_order(10)
        .shards(1),
);

#[test]
fn pool_alloc_as_allocator() {
    let mut small: AVec<u8, &PoolAlloc> = AVec::new_in(&ADAPTER);
    small.extend_from_slice(b"hello");
    assert!(
        ADAPTER.contains(small.as_ptr()),
        "small requests are slab objects in the pool"
    );
    let mut v: AVec<u64, &PoolAlloc> = AVec::new_in(&ADAPTER);
    for i in 0..(128u64 << 10) {
        v.push(i); // 1 MiB: starts as a slab object, moves to a page block, grows there
    }
    assert!(ADAPTER.contains(v.as_ptr().cast()));
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
    let stats = ADAPTER.stats();
    assert!(
        stats.moved_within_pool >= 1 && stats.grown_in_place >= 1,
        "{stats}"
    );
    let mut map: hashbrown::HashMap<u32, u32, hashbrown::DefaultHashBuilder, &PoolAlloc> =
        hashbrown::HashMap::with_hasher_in(Default::default(), &ADAPTER);
    map.extend((0..100_000).map(|i| (i, !i)));
    assert!(map.iter().all(|(k, v)| *v == !*k));
    // grow_zeroed through realloc zeroes only the new tail.
    let l1 = Layout::from_size_align(8192, 8).unwrap();
    let p = ADAPTER.allocate(l1).unwrap().cast::<u8>();
    // SAFETY: we own 8192 bytes.
    unsafe { std::ptr::write_bytes(p.as_ptr(), 0x5A, 8192) };
    let l2 = Layout::from_size_align(64 << 10, 8).unwrap();
    // SAFETY: allocated with l1.
    let q = unsafe { ADAPTER.grow_zeroed(p, l1, l2) }.unwrap();
    // SAFETY: q holds l2.size() bytes.
    let bytes = unsafe { &q.as_ref()[..l2.size()] };
    assert!(bytes[..8192].iter().all(|&b| b == 0x5A) && bytes[8192..].iter().all(|&b| b == 0));
    // SAFETY: allocated (by grow_zeroed) with l2.
    unsafe { ADAPTER.deallocate(q.cast(), l2) };
    drop((v, map, small));
    // Cached objects go back first, so every slab empties.
    ADAPTER.drain_caches();
    ADAPTER.check_consistency().unwrap();
    assert_eq!(ADAPTER.stats().slab_live_objects, 0);
    assert_eq!(ADAPTER.pool_stats().unwrap().allocated_bytes, 0);
}
