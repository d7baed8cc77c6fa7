//! `fork` with `PoolAlloc` as the global allocator while other threads allocate: safe
//! without any call (the fork handlers install themselves when the pool is built), and
//! with the hinter running; the child keeps allocating, restarts the hinter (which the
//! fork left behind), and exits 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pagepool::PoolAlloc;

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

/// Runs in the child: only async-signal-unsafe things the allocator makes safe.
fn child_work() -> bool {
    if GLOBAL.hinter_running() {
        return false; // the parent's thread does not exist here
    }
    let mut vecs: Vec<Vec<u64>> = Vec::new();
    for i in 0..64u64 {
        vecs.push((0..(1u64 << 16) + i * 1000).map(|x| x ^ i).collect());
    }
    for (i, v) in vecs.iter().enumerate() {
        if v.iter().enumerate().any(|(x, &y)| y != x as u64 ^ i as u64) {
            return false;
        }
    }
    if GLOBAL.start_hinter().is_err() || !GLOBAL.hinter_running() {
        return false;
    }
    drop(vecs);
    let big = vec![3u8; 1 << 20]; // a pool block (above 1 MiB: a mapping of its own)
    if !GLOBAL.contains(big.as_ptr()) || big.iter().any(|&b| b != 3) {
        return false;
    }
    drop(big);
    GLOBAL.drain_caches();
    let report = GLOBAL.hint_now();
    GLOBAL.check_consistency().is_ok() && report.failures == 0
}

/// Forks `rounds` children that each run `work` while 3 threads allocate pool blocks, and
/// checks that every child exits 0 within its deadline.
fn fork_while_allocating(rounds: usize, work: fn() -> bool) {
    let stop = Arc::new(AtomicBool::new(false));
    // Threads that keep shard locks busy while we fork.
    let busy: Vec<_> = (0..3)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let v = vec![t as u8; 4096 << (n % 8)];
                    assert!(v.iter().all(|&b| b == t as u8));
                    n += 1;
                }
            })
        })
        .collect();
    for round in 0..rounds {
        // SAFETY: fork has no preconditions; the child only runs `work` and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = std::panic::catch_unwind(work).unwrap_or(false);
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child.
            let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if got == pid {
                break;
            }
            if Instant::now() > deadline {
                // SAFETY: our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("round {round}: the child hung (a lock inherited across fork?)");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            libc::WIFEXITED(status),
            "round {round}: child died: status {status:#x}"
        );
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "round {round}: child failed its checks"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in busy {
        t.join().unwrap();
    }
}

/// A child that only allocates pool blocks and frees them.
fn child_allocates() -> bool {
    let vecs: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8; 8192 << (i % 6)]).collect();
    vecs.iter()
        .enumerate()
        .all(|(i, v)| v.iter().all(|&b| b == i as u8))
        && GLOBAL.check_consistency().is_ok()
}

#[test]
fn fork_is_safe_by_default_then_with_the_hinter() {
    // Phase 1: the hinter was never started, nothing was installed by hand.
    let warm = vec![1u8; 1 << 20];
    assert!(GLOBAL.contains(warm.as_ptr()), "the pool is built");
    drop(warm);
    assert!(!GLOBAL.hinter_running());
    fork_while_allocating(100, child_allocates);
    // Phase 2: with the hinter running in the parent.
    GLOBAL.start_hinter().expect("hinter");
    assert!(GLOBAL.hinter_running());
    fork_while_allocating(12, child_work);
    // The parent's hinter is unaffected.
    assert!(GLOBAL.hinter_running());
    GLOBAL.check_consistency().unwrap();
}
