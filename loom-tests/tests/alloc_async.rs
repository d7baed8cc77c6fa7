//! loom models of async capture: a task's request woken by the free that completes its
//! block, and a request cancelled (its future dropped) while that free runs.
#![cfg(loom)]

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};

use common::{Live, all_free, builder, give, give_on_thread, model, quiescent, take};
use loom::sync::Arc;
use pagepool::{CpuCacheMode, PagePool};

/// A waker that counts its wakes (the executor's side of the protocol).
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// An exhausted pool of one order-1 chunk; its two order-0 halves are held. One is freed
/// at once; another thread frees the second while this one polls `alloc_async(1)`: the
/// task gets the merged block at its first poll, or it is woken and gets it at the next.
/// A task left pending with nobody to wake it would hang an executor.
fn woken_or_ready(pool: PagePool) {
    let pool = Arc::new(pool);
    let live = Arc::new(Live::default());
    let a = take(&pool, &live, 0, 0).unwrap();
    let b = take(&pool, &live, 0, 0).unwrap();
    give(&pool, &live, a);
    let t = give_on_thread(&pool, &live, vec![b]);
    let counter = std::sync::Arc::new(CountingWaker::default());
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(pool.alloc_async(1));
    let first = fut.as_mut().poll(&mut cx);
    t.join().unwrap();
    let block = match first {
        Poll::Ready(got) => got.expect("a block of order 1"),
        Poll::Pending => {
            assert!(
                counter.0.load(SeqCst) >= 1,
                "the free that completed the block did not wake the task"
            );
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(got) => got.expect("a block of order 1"),
                Poll::Pending => panic!("woken, but the block is not there"),
            }
        }
    };
    live.add(&block);
    quiescent(&pool, &live);
    give(&pool, &live, block);
    all_free(&pool, &live);
}

#[test]
fn a_free_wakes_an_async_waiter() {
    model(|| woken_or_ready(builder(1, 1).capture_min_order(1).build().unwrap()));
}

/// The same with per-CPU caches: the freed half may go to a CPU's cache just as the
/// request is published, and must still reach the shards and merge for it.
#[test]
fn a_free_into_a_cpu_cache_wakes_an_async_waiter() {
    model(|| {
        woken_or_ready(
            builder(1, 1)
                .capture_min_order(1)
                .cpu_cache(CpuCacheMode::Portable)
                .build()
                .unwrap(),
        )
    });
}

/// The task polls once, then is cancelled (its future dropped) while another thread frees
/// the last piece: the block is handed to the request and taken back by the drop, or
/// listed. Either way it is free afterwards, and nothing waits.
#[test]
fn cancelling_an_async_wait_leaks_nothing() {
    model(|| {
        let pool = Arc::new(builder(1, 1).capture_min_order(1).build().unwrap());
        let live = Arc::new(Live::default());
        let a = take(&pool, &live, 0, 0).unwrap();
        let b = take(&pool, &live, 0, 0).unwrap();
        give(&pool, &live, a);
        let t = give_on_thread(&pool, &live, vec![b]);
        let waker = Waker::from(std::sync::Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        {
            let mut fut = pin!(pool.alloc_async(1));
            if let Poll::Ready(got) = fut.as_mut().poll(&mut cx) {
                let block = got.expect("a block of order 1");
                live.add(&block);
                give(&pool, &live, block);
            }
        } // cancelled here, perhaps while the free hands it the block
        t.join().unwrap();
        assert_eq!(pool.stats().capture.waiting, 0);
        quiescent(&pool, &live);
        all_free(&pool, &live);
    });
}
