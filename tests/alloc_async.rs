//! `alloc_async` under a real executor (tokio), by hand-made wakers, cancelled, and with
//! bad input: a task waits for a large block without parking a thread, is woken by the
//! free that completes the block, and leaks nothing when dropped.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::{assert_all_free, assert_balanced, cached, quiet};
use pagepool::{AllocError, Block, PagePool};

/// Takes every order-0 block of the pool.
fn exhaust(pool: &PagePool) -> Vec<Block> {
    std::iter::from_fn(|| pool.alloc(0).ok()).collect()
}

/// A waker that counts wakes.
#[derive(Default)]
struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn ready_at_once_when_memory_is_free() {
    let pool = quiet(1, 1).build().unwrap();
    let mut fut = pin!(pool.alloc_async(9));
    let Poll::Ready(got) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("free memory: ready at the first poll");
    };
    let block = got.unwrap();
    assert_eq!(block.order(), 9);
    pool.free(block);
    assert_all_free(&pool);
}

/// Many tasks on a 2-worker runtime wait for order-9 blocks of an exhausted pool while
/// another task frees order-0 blocks one by one: every waiter completes, the worker
/// threads are never parked by the wait (a timer task keeps ticking meanwhile), and the
/// pool is whole at the end.
#[test]
fn tokio_tasks_wait_without_blocking_workers() {
    for builder in [quiet(2, 1), cached(2, 2)] {
        let pool = Arc::new(builder.capture_min_order(3).build().unwrap());
        let held = exhaust(&pool);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let waiters: Vec<_> = (0..4)
                .map(|_| {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        let mut block = pool.alloc_async(9).await.expect("captured");
                        block.as_mut_slice().fill(0x5a);
                        tokio::task::yield_now().await;
                        assert!(block.as_slice().iter().all(|&b| b == 0x5a));
                        block
                    })
                })
                .collect();
            let ticks = Arc::new(AtomicUsize::new(0));
            let ticker = {
                let ticks = ticks.clone();
                tokio::spawn(async move {
                    for _ in 0..5 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        ticks.fetch_add(1, Ordering::SeqCst);
                    }
                })
            };
            // The waiters publish before the frees start (not required, but the point).
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(pool.stats().capture.waiting, 4, "four tasks wait");
            ticker.await.unwrap();
            assert_eq!(ticks.load(Ordering::SeqCst), 5, "workers kept running");
            let freer = {
                let pool = pool.clone();
                tokio::spawn(async move {
                    for block in held {
                        pool.free(block);
                        if pool.stats().capture.waiting == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            };
            freer.await.unwrap();
            for w in waiters {
                let block = tokio::time::timeout(Duration::from_secs(10), w)
                    .await
                    .expect("every waiter completes")
                    .unwrap();
                pool.free(block);
            }
        });
        assert!(
            pool.stats().capture.captures >= 1,
            "frees handed blocks over"
        );
        assert_all_free(&pool);
    }
}

/// A waiter cancelled by `tokio::time::timeout` withdraws: nothing waits, nothing leaks,
/// and a later free is not handed to a ghost.
#[test]
fn cancelled_by_a_timeout() {
    let pool = Arc::new(quiet(1, 1).capture_min_order(3).build().unwrap());
    let held = exhaust(&pool);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let got = tokio::time::timeout(Duration::from_millis(10), pool.alloc_async(9)).await;
        assert!(got.is_err(), "nothing was freed: the timeout fires");
    });
    assert_eq!(pool.stats().capture.waiting, 0);
    for block in held {
        pool.free(block);
    }
    assert_eq!(pool.stats().capture.captures, 0);
    assert_all_free(&pool);
}

/// Cancellation racing the free that completes the block, many times, on two threads:
/// the block is either taken by the drop (and freed) or listed. The pool balances after
/// every round.
#[test]
fn cancellation_races_the_completing_free() {
    for builder in [quiet(1, 1), cached(1, 1)] {
        let pool = Arc::new(builder.capture_min_order(1).build().unwrap());
        for round in 0..300 {
            let mut held = exhaust(&pool);
            let last = held.pop().unwrap();
            // Free all but one order-1 pair's half: the last free completes an order-1 block.
            for block in held {
                pool.free(block);
            }
            let big: Vec<Block> = std::iter::from_fn(|| pool.alloc(1).ok()).collect();
            let freer = {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    if round % 3 == 0 {
                        std::thread::yield_now();
                    }
                    pool.free(last);
                })
            };
            {
                let mut fut = pin!(pool.alloc_async(1));
                let waker = Waker::from(Arc::new(Count::default()));
                if let Poll::Ready(got) = fut.as_mut().poll(&mut Context::from_waker(&waker)) {
                    pool.free(got.unwrap());
                }
            }
            freer.join().unwrap();
            for block in big {
                pool.free(block);
            }
            assert_eq!(pool.stats().capture.waiting, 0);
            assert_all_free(&pool);
        }
    }
}

/// The wake comes after the free released its locks: a waker that allocates from and
/// frees to the same pool inside `wake` (as an executor that polls inline would) does not
/// deadlock.
#[test]
fn a_waker_may_use_the_pool() {
    struct Reentrant(Arc<PagePool>, AtomicUsize);
    impl Wake for Reentrant {
        fn wake(self: Arc<Self>) {
            if let Ok(block) = self.0.alloc(0) {
                self.0.free(block);
            }
            let _ = self.0.stats();
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }
    let pool = Arc::new(quiet(1, 1).capture_min_order(1).build().unwrap());
    let mut held = exhaust(&pool);
    let a = held.pop().unwrap();
    let b = held.pop().unwrap();
    let waker = Arc::new(Reentrant(pool.clone(), AtomicUsize::new(0)));
    let w = Waker::from(waker.clone());
    let mut fut = pin!(pool.alloc_async(1));
    // Both halves of one order-1 block are what we hold last; whichever pairs up.
    assert!(fut.as_mut().poll(&mut Context::from_waker(&w)).is_pending());
    pool.free(a);
    pool.free(b);
    let block = loop {
        if let Poll::Ready(got) = fut.as_mut().poll(&mut Context::from_waker(&w)) {
            break got.unwrap();
        }
        // a and b were not buddies: free more until a pair forms.
        let next = held.pop().expect("some pair forms");
        pool.free(next);
    };
    assert!(waker.1.load(Ordering::SeqCst) >= 1, "woken");
    pool.free(block);
    for block in held {
        pool.free(block);
    }
    assert_balanced(&pool);
    assert_all_free(&pool);
}

/// Orders capture cannot serve do not wait: they complete at once with `Exhausted`, and
/// orders the pool cannot have fail as `alloc` does.
#[test]
fn orders_capture_cannot_serve_fail_at_once() {
    let pool = quiet(1, 1).capture_min_order(3).build().unwrap();
    let held = exhaust(&pool);
    let poll = |order| {
        let mut fut = pin!(pool.alloc_async(order));
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(got) => got.map(|b| b.order()),
            Poll::Pending => panic!("order {order} must not wait"),
        }
    };
    assert!(matches!(poll(2), Err(AllocError::Exhausted { .. })));
    assert!(matches!(poll(200), Err(AllocError::OrderTooLarge { .. })));
    for block in held {
        pool.free(block);
    }
    let off = quiet(1, 1).capture(false).build().unwrap();
    let held = exhaust(&off);
    let mut fut = pin!(off.alloc_async(9));
    assert!(matches!(
        fut.as_mut().poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Err(AllocError::Exhausted { .. }))
    ));
    for block in held {
        off.free(block);
    }
    assert_all_free(&off);
}

/// A pending async wait in a process that forks: the child, with the parent's queue
/// forgotten, may poll the future again (it waits anew) or drop it, without deadlock.
#[test]
fn a_pending_wait_survives_fork_in_the_child() {
    let pool = quiet(1, 1).capture_min_order(3).build().unwrap();
    let mut held = exhaust(&pool);
    let mut fut = Box::pin(pool.alloc_async(9));
    assert!(
        fut.as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    );
    // SAFETY: the child only uses the pool (async-signal-safe enough: one thread) and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_eq!(
                pool.stats().capture.waiting,
                0,
                "the child forgot the request"
            );
            // Polled again, it publishes anew; freeing everything completes it.
            assert!(
                fut.as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()))
                    .is_pending()
            );
            for block in held.drain(..) {
                pool.free(block);
            }
            match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(block)) => pool.free(block),
                other => panic!("{other:?}"),
            }
            pool.check_consistency().unwrap();
        }));
        // SAFETY: ends the child at once, without running the parent's atexit handlers.
        unsafe { libc::_exit(if ok.is_ok() { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: {status:#x}"
    );
    drop(fut); // cancelled in the parent
    for block in held {
        pool.free(block);
    }
    assert_all_free(&pool);
}
