//! A multi-threaded workload of std collections with `PoolAlloc` as the global allocator:
//! vectors grown to many MiB, hash maps, strings and boxed trait objects, every result
//! checked; then the pool's books are audited.

use std::collections::{BTreeMap, HashMap};
use std::thread;

use pagepool::PoolAlloc;

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

trait Shape: Send {
    fn area(&self) -> u64;
    fn name(&self) -> String;
}

struct Rect(u64, u64);
struct Square(u64);
/// A shape with a page-sized payload (an 8 KiB slab object).
struct Blob(Box<[u64; 1024]>);

impl Shape for Rect {
    fn area(&self) -> u64 {
        self.0 * self.1
    }
    fn name(&self) -> String {
        format!("rect {}x{}", self.0, self.1)
    }
}
impl Shape for Square {
    fn area(&self) -> u64 {
        self.0 * self.0
    }
    fn name(&self) -> String {
        format!("square {}", self.0)
    }
}
impl Shape for Blob {
    fn area(&self) -> u64 {
        self.0.iter().sum()
    }
    fn name(&self) -> String {
        "blob".repeat(600) // 2400 bytes
    }
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn worker(t: u64) {
    // A vector grown element by element to 48 MiB: through the pool's orders, in place
    // where the buddies are free, and finally out to the fallback above 32 MiB.
    let n = 6usize << 20;
    let mut v: Vec<u64> = Vec::new();
    for i in 0..n as u64 {
        v.push(mix(i ^ t));
    }
    assert_eq!(v.len(), n);
    for (i, &x) in v.iter().enumerate().step_by(4099) {
        assert_eq!(x, mix(i as u64 ^ t), "thread {t}: v[{i}]");
    }
    let sum: u64 = v.iter().fold(0u64, |a, &x| a.wrapping_add(x));
    let expect: u64 = (0..n as u64).fold(0u64, |a, i| a.wrapping_add(mix(i ^ t)));
    assert_eq!(sum, expect);
    drop(v);

    // A hash map whose table grows to several MiB, with string values.
    let mut map: HashMap<u64, String> = HashMap::new();
    for i in 0..200_000u64 {
        map.insert(mix(i + t * 1_000_000), format!("value-{i}-{t}"));
    }
    assert_eq!(map.len(), 200_000);
    for i in (0..200_000u64).step_by(7) {
        assert_eq!(map[&mix(i + t * 1_000_000)], format!("value-{i}-{t}"));
    }
    map.retain(|k, _| k % 2 == 0);
    for (k, v) in &map {
        assert_eq!(k % 2, 0);
        assert!(v.starts_with("value-") && v.ends_with(&format!("-{t}")));
    }

    // Strings: one grown to 8 MiB by appending, and many mid-sized ones.
    let mut s = String::new();
    let mut count = 0;
    while s.len() < 8 << 20 {
        s.push_str("the quick brown fox jumps over the lazy dog; ");
        count += 1;
    }
    assert_eq!(s.matches("lazy dog").count(), count);
    let words: Vec<String> = (0..5_000).map(|i| "ab".repeat(1 + (i % 3000))).collect();
    for (i, w) in words.iter().enumerate() {
        assert_eq!(w.len(), 2 * (1 + (i % 3000)));
        assert!(
            w.bytes()
                .enumerate()
                .all(|(j, b)| b == if j % 2 == 0 { b'a' } else { b'b' })
        );
    }

    // Boxed trait objects, some of them pool-sized.
    let shapes: Vec<Box<dyn Shape>> = (0..20_000u64)
        .map(|i| -> Box<dyn Shape> {
            match i % 3 {
                0 => Box::new(Rect(i, i + 1)),
                1 => Box::new(Square(i)),
                _ => Box::new(Blob(Box::new([i; 1024]))),
            }
        })
        .collect();
    for (i, shape) in shapes.iter().enumerate() {
        let i = i as u64;
        let (area, name_len) = match i % 3 {
            0 => (i * (i + 1), format!("rect {}x{}", i, i + 1).len()),
            1 => (i * i, format!("square {i}").len()),
            _ => (i * 1024, 2400),
        };
        assert_eq!(shape.area(), area);
        assert_eq!(shape.name().len(), name_len);
    }

    // An ordered map of page-sized vectors, freed in a scattered order.
    let mut tree: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for i in 0..2_000u64 {
        tree.insert(
            mix(i),
            vec![(i % 251) as u8; 4096 + (i as usize % 7) * 1000],
        );
    }
    for (i, _) in (0..2_000u64).enumerate().filter(|(i, _)| i % 3 == 0) {
        let bytes = tree.remove(&mix(i as u64)).expect("present");
        assert!(bytes.iter().all(|&b| b == (i % 251) as u8));
    }
    for (k, bytes) in &tree {
        assert!(bytes.len() >= 4096);
        assert!(bytes.iter().all(|&b| b == bytes[0]), "key {k}");
    }
}

#[test]
fn collections_across_threads() {
    let threads: Vec<_> = (0..4u64)
        .map(|t| thread::spawn(move || worker(t)))
        .collect();
    for t in threads {
        t.join().expect("worker panicked");
    }
    let stats = GLOBAL.stats();
    assert!(stats.pool_ready, "{stats}");
    // Small objects come from slabs, page-sized ones from the pool, larger ones from
    // mappings of their own; vectors move from one to the next as they grow.
    assert!(stats.slab_refills > 1_000, "{stats}");
    assert!(stats.pool_allocs > 50, "{stats}");
    assert!(stats.grown_in_place > 0, "{stats}");
    assert!(stats.moved_within_pool > 0, "{stats}");
    assert!(stats.moved_out_of_pool > 0, "{stats}");
    assert_eq!(
        stats.nested + stats.exhausted,
        0,
        "nothing went to the fallback: {stats}"
    );
    GLOBAL.check_consistency().expect("pool books balance");
}

#[test]
fn small_and_big_vectors_live_in_the_pool_huge_ones_in_mappings() {
    let big = vec![1u8; 1 << 20];
    #[allow(clippy::useless_vec)] // the point is a (small) heap allocation
    let small = vec![1u8; 100];
    let huge = vec![1u8; 64 << 20]; // above the largest block: a mapping of its own
    assert!(GLOBAL.contains(big.as_ptr()));
    assert!(GLOBAL.contains(small.as_ptr()));
    assert!(!GLOBAL.contains(huge.as_ptr()));
    assert!(GLOBAL.stats().huge_mappings >= 1);
    assert_eq!(big.iter().map(|&b| b as usize).sum::<usize>(), 1 << 20);
    assert_eq!(huge.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
}
