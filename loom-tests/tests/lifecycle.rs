//! loom model of the hinter thread's life: `start_hinter` and `shutdown` racing on two
//! threads, on top of the real registry, signal and thread loop. Whatever the
//! interleaving, no call waits for ever, a stop is never lost (the old "start finds the slot
//! empty and clears the stop flag" bug), and a final shutdown leaves no thread running.
#![cfg(loom)]

mod common;

use common::{builder, model};
use loom::sync::Arc;
use loom::thread;
use std::time::Duration;

#[test]
fn start_and_shutdown_race() {
    model(|| {
        let pool = Arc::new(
            builder(1, 1)
                .hint_delay(Duration::ZERO)
                .hint_interval(Duration::ZERO)
                .build()
                .unwrap(),
        );
        let racer = {
            let pool = pool.clone();
            thread::spawn(move || {
                pool.start_hinter().unwrap();
                pool.shutdown();
            })
        };
        pool.start_hinter().unwrap();
        racer.join().unwrap();
        // Started once more, then stopped: nothing may run afterwards.
        pool.start_hinter().unwrap();
        assert!(pool.hinter_running());
        pool.shutdown();
        assert!(!pool.hinter_running());
        assert!(!pool.stats().hint.thread_running);
    });
}

#[test]
fn dropping_a_pool_while_it_is_hinted() {
    model(|| {
        let pool = builder(1, 1)
            .hint_delay(Duration::ZERO)
            .hint_interval(Duration::ZERO)
            .build()
            .unwrap();
        pool.start_hinter().unwrap();
        let block = pool.alloc_on(0, 1).unwrap();
        let freer = {
            // A free that asks for a pass while the pool goes away.
            let pool = Arc::new(pool);
            let other = pool.clone();
            let t = thread::spawn(move || other.free(block));
            t.join().unwrap();
            pool
        };
        drop(freer); // leaves the registry: stops the thread after any pass on it
    });
}
