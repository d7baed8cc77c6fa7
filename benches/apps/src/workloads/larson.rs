//! Larson-style churn: each thread keeps an array of live objects of random sizes (8 B to
//! 4 KiB mostly, 2 % up to 512 KiB), replaces random slots again and again, and regularly
//! hands objects to the next thread, which frees them later; a thread that has finished
//! keeps taking deliveries until all have. Objects are written only at both ends, as in
//! the original benchmark.

use std::mem::MaybeUninit;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crate::rng::{Rng, mix};
use crate::{Output, Params};

type Obj = Box<[MaybeUninit<u8>]>;

fn tag(len: usize) -> u8 {
    (len.wrapping_mul(151) >> 3) as u8
}

fn make(len: usize) -> Obj {
    let mut b = Box::<[u8]>::new_uninit_slice(len);
    b[0].write(tag(len));
    b[len - 1].write(tag(len));
    b
}

fn check(o: &Obj) {
    let t = tag(o.len());
    // SAFETY: `make` wrote the first and the last byte.
    let (a, z) = unsafe { (o[0].assume_init(), o[o.len() - 1].assume_init()) };
    assert!(a == t && z == t, "object intact");
}

fn size(rng: &mut Rng) -> usize {
    if rng.chance(0.02) {
        rng.log_uniform(4 << 10, 512 << 10)
    } else {
        rng.log_uniform(8, 4 << 10)
    }
}

const THREADS: usize = 4;

/// Takes the objects other threads handed over, each into a random slot of `live`
/// (freeing the object it replaces).
fn receive(mailbox: &Mutex<Vec<Obj>>, live: &mut [Obj], place: &mut Rng) {
    let inbox = std::mem::take(&mut *mailbox.lock().expect("mailbox"));
    for o in inbox {
        check(&o);
        let slot = place.below(live.len());
        check(&live[slot]);
        live[slot] = o;
    }
}

/// Churns; the checksum is the sum of all sizes allocated (deterministic per thread).
pub fn run(p: &Params) -> Output {
    let slots = p.n(6000);
    let iters = p.n(4_000_000);
    let mailboxes: Vec<Mutex<Vec<Obj>>> = (0..THREADS).map(|_| Mutex::new(Vec::new())).collect();
    let running = AtomicUsize::new(THREADS);
    let results: Vec<(u64, Vec<Obj>)> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (mailboxes, running) = (&mailboxes, &running);
                s.spawn(move || {
                    let mut rng = Rng::new(80 + t as u64);
                    // Where received objects go: how many arrive depends on timing, so
                    // they draw from their own generator and leave `rng`'s sizes alone.
                    let mut place = Rng::new(180 + t as u64);
                    let mut sum = 0u64;
                    let mut live: Vec<Obj> = (0..slots)
                        .map(|_| {
                            let n = size(&mut rng);
                            sum = sum.wrapping_add(mix(n as u64));
                            make(n)
                        })
                        .collect();
                    for i in 0..iters {
                        let n = size(&mut rng);
                        sum = sum.wrapping_add(mix(n as u64));
                        let slot = rng.below(slots);
                        let old = std::mem::replace(&mut live[slot], make(n));
                        check(&old);
                        if i % 64 == 0 {
                            // Hand the old object to the next thread instead of freeing it.
                            mailboxes[(t + 1) % THREADS]
                                .lock()
                                .expect("mailbox")
                                .push(old);
                        } else {
                            drop(old);
                        }
                        if i % 512 == 0 {
                            receive(&mailboxes[t], &mut live, &mut place);
                        }
                    }
                    // Keep taking deliveries until every thread is done: a finished
                    // thread's mailbox would otherwise grow with the others' lag, and the
                    // peak would measure the threads' relative speed, not the allocator.
                    running.fetch_sub(1, Ordering::AcqRel);
                    while running.load(Ordering::Acquire) > 0 {
                        receive(&mailboxes[t], &mut live, &mut place);
                        thread::sleep(Duration::from_micros(200));
                    }
                    (sum, live)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("larson thread"))
            .collect()
    });
    let checksum = results.iter().fold(0u64, |a, (s, _)| a.wrapping_add(*s));
    let live: Vec<Vec<Obj>> = results.into_iter().map(|(_, l)| l).collect();
    Output::new(checksum, (live, mailboxes))
}
