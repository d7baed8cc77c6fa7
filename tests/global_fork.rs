//! `fork` with `PoolAlloc` as the global allocator while other threads allocate: the
//! child keeps allocating, restarts the hinter (which the fork left behind), and exits 0.

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
    let big = vec![3u8; 4 << 20];
    if !GLOBAL.contains(big.as_ptr()) || big.iter().any(|&b| b != 3) {
        return false;
    }
    drop(big);
    GLOBAL.drain_caches();
    let report = GLOBAL.hint_now();
    GLOBAL.check_consistency().is_ok() && report.failures == 0
}

#[test]
fn child_allocates_and_restarts_the_hinter() {
    GLOBAL.start_hinter().expect("hinter");
    assert!(GLOBAL.hinter_running());
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
    for round in 0..12 {
        // SAFETY: fork has no preconditions; the child only runs `child_work` and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = std::panic::catch_unwind(child_work).unwrap_or(false);
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
            std::thread::sleep(Duration::from_millis(5));
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
    // The parent's hinter is unaffected.
    assert!(GLOBAL.hinter_running());
    GLOBAL.check_consistency().unwrap();
}
