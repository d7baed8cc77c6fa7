//! rayon: millions of Strings generated in parallel, sorted with `par_sort` and
//! `par_sort_unstable_by`, mapped into `Vec`s and grouped with fold/reduce.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::rng::{Rng, mix};
use crate::{Output, Params};

/// Generates, sorts, maps and groups; the checksum covers the sorted order.
pub fn run(p: &Params) -> Output {
    let n = p.n(1_500_000);
    let strings: Vec<String> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut rng = Rng::new(i as u64 ^ 0x5eed);
            let len = rng.range(1, 4);
            let mut s = rng.word(len);
            s.push('-');
            s.push_str(&rng.below(100_000).to_string());
            s
        })
        .collect();

    let mut sorted = strings.clone();
    sorted.par_sort();
    let mut by_len = strings.clone();
    by_len.par_sort_unstable_by(|a, b| a.len().cmp(&b.len()).then_with(|| b.cmp(a)));

    let codes: Vec<Vec<u32>> = sorted
        .par_iter()
        .map(|s| s.chars().map(|c| c as u32).collect())
        .collect();
    let upper: Vec<String> = by_len.par_iter().map(|s| s.to_uppercase()).collect();
    let groups: HashMap<usize, Vec<&str>> = sorted
        .par_iter()
        .fold(HashMap::new, |mut m: HashMap<usize, Vec<&str>>, s| {
            m.entry(s.len()).or_default().push(s.as_str());
            m
        })
        .reduce(HashMap::new, |mut a, b| {
            for (k, mut v) in b {
                a.entry(k).or_default().append(&mut v);
            }
            a
        });

    let order: u64 = sorted
        .par_iter()
        .enumerate()
        .map(|(i, s)| mix(i as u64 ^ (s.len() as u64) << 32 ^ s.as_bytes()[0] as u64))
        .reduce(|| 0, u64::wrapping_add);
    let lens: u64 = by_len.par_iter().step_by(97).map(|s| s.len() as u64).sum();
    let code_sum: u64 = codes
        .par_iter()
        .map(|c| c.iter().map(|&x| x as u64).sum::<u64>())
        .sum();
    let group_sum: u64 = groups
        .iter()
        .map(|(k, v)| mix(*k as u64 ^ (v.len() as u64) << 8))
        .fold(0, u64::wrapping_add);
    let checksum =
        order ^ mix(lens) ^ mix(code_sum).rotate_left(7) ^ group_sum ^ upper.len() as u64;
    drop(groups);
    Output::new(checksum, (strings, sorted, by_len, codes, upper))
}
