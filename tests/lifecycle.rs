//! The pool's life around its threads and processes: starting and stopping the hinter from
//! many threads at once, one hinter thread for many pools, `fork` in a process whose hinter
//! is busy, a pool dropped with live blocks, and free times that survive a capture.
//!
//! The tests share one process-wide hinter thread and count it, so they run one at a time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use pagepool::{PagePool, block_size};

mod common;

use common::{assert_balanced, live_threads_named, wait_until, within};

/// The tests of this file count the process's hinter threads: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Live threads of this process named `pagepool-hinter` (a joined thread lingering in
/// `/proc` is not counted).
fn hinter_threads() -> usize {
    live_threads_named("pagepool-hinter").len()
}

#[test]
fn starting_and_stopping_from_many_threads_is_linearisable() {
    let _serial = serial();
    let pool: &'static PagePool = Box::leak(Box::new(
        PagePool::builder()
            .capacity(16 << 20)
            .hint_thread(false)
            .build()
            .unwrap(),
    ));
    let other: &'static PagePool = Box::leak(Box::new(
        PagePool::builder()
            .capacity(16 << 20)
            .hint_thread(false)
            .build()
            .unwrap(),
    ));
    within(Duration::from_secs(60), "start/stop storm", move || {
        std::thread::scope(|s| {
            for t in 0..8u64 {
                s.spawn(move || {
                    let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    for _ in 0..200 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let target = if x & 4 == 0 { pool } else { other };
                        match x % 3 {
                            0 | 1 => target.start_hinter().unwrap(),
                            _ => target.shutdown(),
                        }
                        assert!(hinter_threads() <= 1, "two hinter threads at once");
                    }
                });
            }
        });
    });
    pool.start_hinter().unwrap();
    assert!(pool.hinter_running());
    other.shutdown();
    pool.shutdown();
    assert!(!pool.hinter_running() && !other.hinter_running());
    assert!(!pool.stats().hint.thread_running);
    assert_eq!(hinter_threads(), 0, "the thread outlived the last shutdown");
}

#[test]
fn one_thread_serves_every_pool() {
    let _serial = serial();
    let pools: Vec<PagePool> = (0..200)
        .map(|_| {
            PagePool::builder()
                .capacity(4 << 20)
                .hint_delay(Duration::from_millis(10))
                .build()
                .unwrap()
        })
        .collect();
    assert!(pools.iter().all(PagePool::hinter_running));
    wait_until(
        Duration::from_secs(5),
        "the thread names itself as it starts",
        || hinter_threads() > 0,
    );
    assert_eq!(hinter_threads(), 1);
    // Every pool is served: a freed chunk in each is hinted.
    for pool in &pools {
        let mut block = pool.alloc(10).unwrap();
        block.as_mut_slice()[0] = 1;
        pool.free(block);
    }
    let start = Instant::now();
    while pools.iter().any(|p| p.stats().hinted_bytes == 0) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "some pool was never hinted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(pools);
    assert_eq!(hinter_threads(), 0);
}

#[test]
fn fork_while_the_hinter_and_other_threads_work() {
    let _serial = serial();
    // The hinter runs constantly: no delay, one block per batch.
    let pool: &'static PagePool = Box::leak(Box::new(
        PagePool::builder()
            .capacity(64 << 20)
            .hint_delay(Duration::ZERO)
            .hint_interval(Duration::ZERO)
            .hint_batch_blocks(1)
            .hint_min_order(0)
            .build()
            .unwrap(),
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut b) = pool.alloc(((n + t) % 6) as u8) {
                        b.as_mut_slice()[0] = 1;
                        pool.free(b);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let mut children = Vec::new();
    for _ in 0..60 {
        // SAFETY: the child only calls the pool (whose fork handlers made it consistent)
        // and `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = child(pool);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        children.push(pid);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    for pid in children {
        assert_eq!(
            wait_child(pid, Duration::from_secs(20)),
            Some(0),
            "child {pid}"
        );
    }
    pool.shutdown();
    assert_balanced(pool);
}

/// In a forked child: the parent's thread is gone, a new one can be started and works,
/// allocation works, and dropping a pool does not panic.
fn child(pool: &PagePool) -> bool {
    if pool.hinter_running() || pool.stats().hint.thread_running {
        return false;
    }
    let Ok(mut block) = pool.alloc(0) else {
        return false;
    };
    block.as_mut_slice()[0] = 2;
    pool.free(block);
    if pool.check_consistency().is_err() || pool.stats().in_flight_bytes != 0 {
        return false; // isolated blocks of the parent's hinter must be back
    }
    let fresh = PagePool::builder()
        .capacity(8 << 20)
        .hint_delay(Duration::ZERO)
        .build();
    let Ok(fresh) = fresh else { return false };
    if !fresh.hinter_running() {
        return false;
    }
    let Ok(mut big) = fresh.alloc(10) else {
        return false;
    };
    big.as_mut_slice()[0] = 3;
    fresh.free(big);
    let start = Instant::now();
    while fresh.stats().hinted_bytes == 0 {
        if start.elapsed() > Duration::from_secs(5) {
            return false; // the child's hinter does nothing
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(fresh);
    true
}

/// Waits for a child; kills it and returns `None` if it does not exit within `limit`.
fn wait_child(pid: libc::pid_t, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            return libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        }
        if start.elapsed() > limit {
            // SAFETY: our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Resident 4 KiB pages of `[start, start + len)`, from `mincore`.
fn resident_pages(start: *const u8, len: usize) -> usize {
    let pages = len / 4096;
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is page-aligned and mapped (the pool leaked its region), and
    // `vec` has one byte per page.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore failed");
    vec.iter().filter(|&&v| v & 1 != 0).count()
}

#[test]
fn a_pool_dropped_with_a_live_block_gives_its_free_memory_back() {
    let _serial = serial();
    let pool = PagePool::builder()
        .capacity(64 << 20)
        .hint_thread(false)
        .build()
        .unwrap();
    // The first block comes from chunk 0, so the region starts at it.
    let mut live = pool.alloc(10).unwrap();
    let base = live.as_ptr();
    let mut others = Vec::new();
    while let Ok(mut block) = pool.alloc(10) {
        block.as_mut_slice().fill(1);
        others.push(block);
    }
    live.as_mut_slice().fill(7);
    for block in others {
        pool.free(block);
    }
    let rest = (64 << 20) - block_size(10);
    // SAFETY: the region is mapped.
    let before = resident_pages(unsafe { base.add(block_size(10)) }, rest);
    assert!(before > 0, "the freed blocks were resident");
    drop(pool);
    // SAFETY: the region stays mapped: a live block points into it.
    let after = resident_pages(unsafe { base.add(block_size(10)) }, rest);
    assert_eq!(after, 0, "free memory of a leaked region stayed resident");
    assert!(
        live.as_slice().iter().all(|&b| b == 7),
        "the live block lost its contents"
    );
}

/// A capture that takes part of a block just freed places the rest with the block's free
/// time, which is now: the rest must not look cold at once. (Before free times were kept
/// for every block, `carve` copied the block head's stale stamp, which the listing then
/// overwrote; now the stamp travels with the block, and this guards it.)
#[test]
fn pieces_left_by_a_capture_are_as_warm_as_the_free_that_made_them() {
    let _serial = serial();
    // Order-8 pieces are hintable; the delay is long enough to tell warm from cold.
    let pool = PagePool::builder()
        .capacity(4 << 20)
        .shards(1)
        .cache_blocks(0)
        .hint_min_order(8)
        .hint_thread(false)
        .hint_delay(Duration::from_millis(600))
        .hint_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let a = pool.alloc(9).unwrap();
    let b = pool.alloc(9).unwrap();
    // `b`'s frame records a free long ago.
    let b_addr = b.as_ptr();
    pool.free(b);
    std::thread::sleep(Duration::from_millis(800));
    let b = pool.alloc(9).unwrap();
    assert_eq!(b.as_ptr(), b_addr);
    pool.start_hinter().unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| pool.alloc_wait(8, Duration::from_secs(30)).unwrap());
        while pool.stats().capture.waiting == 0 {
            std::thread::yield_now();
        }
        // Freed now: the waiter takes half, the other half is listed, warm.
        pool.free(b);
        let got = waiter.join().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let s = pool.stats();
        assert_eq!(
            s.hinted_bytes, 0,
            "the other half was hinted at once, as if free since long ago:\n{s}"
        );
        pool.free(got);
    });
    pool.free(a);
    pool.shutdown();
}
