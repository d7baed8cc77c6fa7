//! Growth by push: groups of `Vec`s grown side by side from empty to log-uniform lengths
//! (up to 1 MiB), `String`s built by concatenation, and `Vec`s and a `String` grown past
//! 32 MiB. Every step is a `realloc` of the allocator; some results are shrunk to fit.

use std::fmt::Write as _;

use crate::rng::{Rng, mix};
use crate::{Output, Params};

/// Grows, keeps some, drops the rest; the checksum covers every length and some contents.
pub fn run(p: &Params) -> Output {
    let mut rng = Rng::new(6);
    let mut checksum = 0u64;
    let mut kept_vecs: Vec<Vec<u32>> = Vec::new();

    // 1. Groups of 32 vectors growing in lockstep, so neighbours compete for space.
    for g in 0..p.n(400) {
        let mut targets: Vec<usize> = (0..32).map(|_| rng.log_uniform(1, 1 << 18)).collect();
        targets.sort_unstable_by(|a, b| b.cmp(a));
        let mut vs: Vec<Vec<u32>> = (0..32).map(|_| Vec::new()).collect();
        let mut active = targets.len();
        let mut step = 0;
        while active > 0 {
            for v in &mut vs[..active] {
                v.push(step as u32 ^ g as u32);
            }
            step += 1;
            while active > 0 && targets[active - 1] <= step {
                active -= 1;
            }
        }
        for (i, mut v) in vs.into_iter().enumerate() {
            checksum = checksum.wrapping_add(mix(v.len() as u64 ^ (v[v.len() - 1] as u64) << 32));
            if i % 8 == g % 8 {
                v.truncate(v.len() / 2 + 1);
                v.shrink_to_fit();
                kept_vecs.push(v);
            }
        }
    }

    // 2. Strings built by concatenation.
    let words: Vec<String> = (0..500).map(|i| rng.word(1 + i % 4)).collect();
    let mut kept_strings = Vec::new();
    for i in 0..p.n(8000) {
        let mut s = String::new();
        for j in 0..rng.log_uniform(1, 4000) {
            s.push_str(&words[rng.below(words.len())]);
            if j % 7 == 0 {
                s += "; ";
            } else {
                s.push(' ');
            }
        }
        checksum = checksum.wrapping_add(mix(s.len() as u64 ^ s.as_bytes()[0] as u64));
        if i % 16 == 0 {
            kept_strings.push(s);
        }
    }

    // 3. Beyond 32 MiB: two u64 vectors side by side, a byte vector by slices, a String by lines.
    let big_len = p.n(6 << 20);
    let mut a: Vec<u64> = Vec::new();
    let mut b: Vec<u64> = Vec::new();
    for i in 0..big_len as u64 {
        a.push(i.wrapping_mul(0x9e37_79b9));
        b.push(!i);
    }
    let chunk: Vec<u8> = (0..=255).collect();
    let mut bytes: Vec<u8> = Vec::new();
    while bytes.len() < p.n(40 << 20) {
        bytes.extend_from_slice(&chunk[..rng.range(1, 256)]);
    }
    let mut text = String::new();
    let mut line = 0u64;
    while text.len() < p.n(36 << 20) {
        let _ = writeln!(
            text,
            "{line} {} {}",
            words[line as usize % 500],
            mix(line) % 1000
        );
        line += 1;
    }
    checksum ^= mix(a.len() as u64 ^ a[a.len() / 3] ^ b[b.len() - 1])
        ^ mix(bytes.len() as u64 ^ bytes[bytes.len() / 2] as u64)
        ^ mix(text.len() as u64 ^ line);
    Output::new(checksum, (kept_vecs, kept_strings, a, b, bytes, text))
}
