//! std collections: `HashMap<String, u64>`, `BTreeMap<u64, String>`, `BTreeSet<String>`
//! and `HashMap<u64, Vec<u32>>` built, looked up (hits and misses), half removed and
//! partly refilled.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::rng::{Rng, mix};
use crate::{Output, Params};

fn key(x: u64) -> String {
    format!("key-{:x}-{}", mix(x), x % 97)
}

/// Builds, queries and thins the maps; the checksum is independent of iteration order.
pub fn run(p: &Params) -> Output {
    let n = p.n(400_000) as u64;
    let mut rng = Rng::new(4);
    let mut by_name: HashMap<String, u64> = HashMap::new();
    let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut lists: HashMap<u64, Vec<u32>> = HashMap::new();
    for i in 0..n {
        let k = key(i);
        by_name.insert(k.clone(), i);
        by_id.insert(mix(i), k.clone());
        if i % 2 == 0 {
            names.insert(k);
        }
        lists.entry(i % (n / 8).max(1)).or_default().push(i as u32);
    }

    let mut sum = 0u64;
    for _ in 0..n {
        let x = rng.below(2 * n as usize) as u64; // half of them miss
        if let Some(v) = by_name.get(&key(x)) {
            sum = sum.wrapping_add(*v);
        }
        if let Some(s) = by_id.get(&mix(x)) {
            sum = sum.wrapping_add(s.len() as u64);
        }
        if names.contains(&key(x)) {
            sum = sum.wrapping_add(3);
        }
    }
    // Range scans.
    for _ in 0..2000 {
        let from = rng.next_u64();
        sum = sum.wrapping_add(
            by_id
                .range(from..)
                .take(20)
                .map(|(k, _)| k >> 40)
                .sum::<u64>(),
        );
    }

    // Remove half, refill a quarter with new keys.
    for i in (0..n).step_by(2) {
        let k = key(i);
        by_name.remove(&k);
        by_id.remove(&mix(i));
        names.remove(&k);
        if let Some(l) = lists.get_mut(&(i % (n / 8).max(1))) {
            l.retain(|&v| v as u64 != i);
        }
    }
    for i in n..n + n / 4 {
        let k = key(i);
        by_name.insert(k.clone(), i);
        by_id.insert(mix(i), k.clone());
        names.insert(k);
    }

    let mut checksum = mix(sum) ^ by_name.len() as u64 ^ (by_id.len() as u64) << 20;
    checksum = checksum.wrapping_add(by_name.values().map(|&v| mix(v)).fold(0, u64::wrapping_add));
    checksum = checksum.wrapping_add(names.iter().take(1000).map(|s| s.len() as u64).sum::<u64>());
    checksum = checksum.wrapping_add(
        lists
            .values()
            .map(|l| mix(l.len() as u64 ^ l.first().copied().unwrap_or(0) as u64))
            .fold(0, u64::wrapping_add),
    );
    Output::new(checksum, (by_name, by_id, names, lists))
}
