//! Producer/consumer: two producer threads allocate messages (byte buffers of mostly small,
//! some large sizes, formatted strings, boxed records) and send them over a bounded
//! crossbeam channel; two consumer threads check and free them. Every message is freed on
//! a thread other than the one that allocated it.

use std::thread;

use crossbeam_channel::bounded;

use crate::rng::{Rng, hash_bytes, mix};
use crate::{Output, Params};

enum Msg {
    Bytes(Vec<u8>),
    Text(String),
    Record(Box<(u64, [u64; 6], Vec<u32>)>),
}

fn tag(len: usize) -> u8 {
    (len.wrapping_mul(31) >> 2) as u8
}

/// Sends and receives; the checksum is the sum over all messages (order-independent).
pub fn run(p: &Params) -> Output {
    let per_producer = p.n(2_000_000);
    let (tx, rx) = bounded::<Msg>(4096);
    let producers: Vec<_> = (0..2u64)
        .map(|t| {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut rng = Rng::new(70 + t);
                for i in 0..per_producer as u64 {
                    let msg = match rng.below(10) {
                        0..=6 => {
                            let len = if rng.chance(0.01) {
                                rng.log_uniform(8 << 10, 256 << 10)
                            } else if rng.chance(0.1) {
                                rng.log_uniform(512, 8 << 10)
                            } else {
                                rng.log_uniform(8, 512)
                            };
                            Msg::Bytes(vec![tag(len); len])
                        }
                        7 | 8 => {
                            Msg::Text(format!("message {i} from producer {t}: {}", rng.word(3)))
                        }
                        _ => Msg::Record(Box::new((
                            i,
                            [i; 6],
                            (0..rng.range(0, 16) as u32).collect(),
                        ))),
                    };
                    tx.send(msg).expect("a consumer is listening");
                }
            })
        })
        .collect();
    drop(tx);
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let rx = rx.clone();
            thread::spawn(move || {
                let mut sum = 0u64;
                let mut kept = Vec::new();
                for (n, msg) in rx.iter().enumerate() {
                    sum = sum.wrapping_add(match &msg {
                        Msg::Bytes(v) => {
                            let t = tag(v.len());
                            assert!(v[0] == t && v[v.len() - 1] == t, "message intact");
                            mix(v.len() as u64)
                        }
                        Msg::Text(s) => hash_bytes(s.as_bytes()),
                        Msg::Record(r) => mix(r.0 ^ r.1[5] ^ (r.2.len() as u64) << 40),
                    });
                    if n % 1000 == 0 {
                        kept.push(msg); // freed by the main thread at the end
                    }
                }
                (sum, kept)
            })
        })
        .collect();
    drop(rx);
    for t in producers {
        t.join().expect("producer");
    }
    let mut checksum = 0u64;
    let mut kept = Vec::new();
    for t in consumers {
        let (sum, k) = t.join().expect("consumer");
        checksum = checksum.wrapping_add(sum);
        kept.push(k);
    }
    Output::new(checksum, kept)
}
