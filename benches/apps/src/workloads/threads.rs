//! Many threads at once: 16 threads (on however many cores there are) each allocate and
//! free mixed small objects (byte buffers, formatted strings, small vectors, boxed
//! records) in random order, keeping up to 512 alive.

use std::sync::Barrier;
use std::thread;

use crate::rng::{Rng, hash_bytes, mix};
use crate::{Output, Params};

enum Obj {
    Bytes(Box<[u8]>),
    Text(String),
    Words(Vec<u64>),
    Node(Box<[u64; 8]>),
}

const THREADS: usize = 16;

/// Allocates and frees; the checksum is the sum over all objects made.
pub fn run(p: &Params) -> Output {
    let ops = p.n(2_000_000);
    let barrier = Barrier::new(THREADS);
    let results: Vec<(u64, Vec<Obj>)> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut rng = Rng::new(90 + t as u64);
                    let mut live: Vec<Obj> = Vec::with_capacity(512);
                    let mut sum = 0u64;
                    barrier.wait();
                    for i in 0..ops as u64 {
                        if live.is_empty() || (live.len() < 512 && rng.chance(0.52)) {
                            let o = match rng.below(4) {
                                0 => {
                                    let n = rng.log_uniform(8, 1024);
                                    sum = sum.wrapping_add(mix(n as u64));
                                    Obj::Bytes(vec![n as u8; n].into_boxed_slice())
                                }
                                1 => {
                                    let s = format!("thread {t} object {i} {}", rng.below(1000));
                                    sum = sum.wrapping_add(hash_bytes(s.as_bytes()));
                                    Obj::Text(s)
                                }
                                2 => {
                                    let n = rng.range(1, 40);
                                    sum = sum.wrapping_add(n as u64);
                                    Obj::Words((0..n as u64).collect())
                                }
                                _ => {
                                    sum = sum.wrapping_add(i);
                                    Obj::Node(Box::new([i; 8]))
                                }
                            };
                            live.push(o);
                        } else {
                            let k = rng.below(live.len());
                            match live.swap_remove(k) {
                                Obj::Bytes(b) => assert_eq!(b[b.len() - 1], b.len() as u8),
                                Obj::Text(s) => assert!(s.starts_with("thread")),
                                Obj::Words(w) => assert_eq!(w[w.len() - 1], w.len() as u64 - 1),
                                Obj::Node(n) => assert_eq!(n[0], n[7]),
                            }
                        }
                    }
                    (sum, live)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });
    let checksum = results.iter().fold(0u64, |a, (s, _)| a.wrapping_add(*s));
    let live: Vec<Vec<Obj>> = results.into_iter().map(|(_, l)| l).collect();
    Output::new(checksum, live)
}
