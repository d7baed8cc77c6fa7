//! Tests of [`PerCpuStacks`], for both implementations.
//!
//! The rseq tests (`rseq_*`) run wherever rseq works and print why they skip elsewhere;
//! `rseq_own_registration_without_glibc` runs them again in a child process with glibc's
//! registration turned off, so the path that registers areas itself is tested too. Under
//! Miri only the portable implementation on a heap-backed array runs, on CPU 0.
//!
//! Run the timing harness with
//! `cargo test --release --lib percpu::tests::timing -- --ignored --nocapture`.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
#[cfg(not(miri))]
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;
#[cfg(not(miri))]
use std::time::Instant;

use super::*;

// === helpers ===

/// Environment variable: the rseq tests must find rseq working (set by the parent of the
/// re-run without glibc's registration, when rseq worked in the parent).
const REQUIRE_RSEQ: &str = "PAGEPOOL_TEST_REQUIRE_RSEQ";
/// Environment variable: the areas must be this module's own registrations.
const EXPECT_OWN_AREA: &str = "PAGEPOOL_TEST_EXPECT_OWN_RSEQ_AREA";

/// Taken by the tests that load every CPU (the stress tests, the child process that runs
/// the rseq tests again) and by those that need quiet CPUs (the abort tests, which must
/// tell the abort they cause from preemption by other tests' threads).
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The CPUs this thread may run on.
#[cfg(not(miri))]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

#[cfg(miri)]
fn allowed_cpus() -> Vec<usize> {
    vec![0]
}

/// Restricts this thread to `cpus`; false if the kernel refused.
#[cfg(not(miri))]
fn set_affinity(cpus: &[usize]) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `set` is a valid set; CPU_SET ignores numbers beyond its size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0 }
}

#[cfg(miri)]
fn set_affinity(_cpus: &[usize]) -> bool {
    true
}

/// Keeps this thread on one CPU until dropped.
struct Pinned {
    cpu: usize,
    saved: Vec<usize>,
}

impl Pinned {
    /// Pins to the last CPU this thread may use (CPU 1 on a two-CPU machine, so a
    /// one-CPU instance sees it as out of range).
    fn last() -> Self {
        let saved = allowed_cpus();
        Self::to(*saved.last().expect("some CPU is allowed"))
    }

    fn to(cpu: usize) -> Self {
        let saved = allowed_cpus();
        assert!(set_affinity(&[cpu]), "pinning to CPU {cpu}");
        assert_eq!(current_cpu(), cpu, "pinned thread runs elsewhere");
        Self { cpu, saved }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        set_affinity(&self.saved);
    }
}

/// An rseq instance, or `None` (after printing why) where rseq cannot run, unless the
/// environment requires rseq.
fn rseq_stacks(capacities: &[u32], backing: Backing) -> Option<PerCpuStacks> {
    let stacks = PerCpuStacks::new(capacities, CpuCacheImpl::Rseq, backing).unwrap();
    if stacks.implementation() == CpuCacheImpl::Rseq {
        return Some(stacks);
    }
    let why = rseq::probe().err().unwrap_or("unknown");
    assert!(
        std::env::var_os(REQUIRE_RSEQ).is_none(),
        "rseq is required but unavailable: {why}"
    );
    eprintln!("skipped: rseq unavailable: {why}");
    None
}

fn portable_stacks(capacities: &[u32], backing: Backing) -> PerCpuStacks {
    let stacks = PerCpuStacks::new(capacities, CpuCacheImpl::Portable, backing).unwrap();
    assert_eq!(stacks.implementation(), CpuCacheImpl::Portable);
    stacks
}

/// A small xorshift generator: the tests need speed and reproducibility, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Every item of every class on every CPU, by draining them all.
fn drain_all(stacks: &PerCpuStacks) -> Vec<(usize, u64)> {
    let mut all = Vec::new();
    for cpu in 0..stacks.cpus() {
        assert!(stacks.drain_cpu(cpu, |class, items| {
            all.extend(items.iter().map(|&item| (class, item)));
        }));
    }
    all
}

// === construction and layout ===

#[test]
fn rejects_bad_shapes() {
    for kind in [CpuCacheImpl::Rseq, CpuCacheImpl::Portable] {
        assert!(PerCpuStacks::with_cpus(&[], 1, kind, Backing::Heap).is_err());
        assert!(PerCpuStacks::with_cpus(&[1], 0, kind, Backing::Heap).is_err());
        assert!(PerCpuStacks::with_cpus(&[1], MAX_CPUS + 1, kind, Backing::Heap).is_err());
        // 2^47 bytes per CPU, 2^63 in all: more than an address space.
        let huge = [u32::MAX; 4096];
        assert!(PerCpuStacks::with_cpus(&huge, MAX_CPUS, kind, Backing::Heap).is_err());
    }
}

#[test]
fn layout_keeps_cpus_apart() {
    let stacks =
        PerCpuStacks::with_cpus(&[3, 0, 9], 4, CpuCacheImpl::Portable, Backing::Heap).unwrap();
    assert_eq!(stacks.classes(), 3);
    assert_eq!(stacks.cpus(), 4);
    assert_eq!(
        (0..3).map(|c| stacks.capacity(c)).collect::<Vec<_>>(),
        [3, 0, 9]
    );
    let stride = stacks.stride_words * WORD;
    assert_eq!(stride % CPU_ALIGN, 0);
    assert_eq!(stacks.words.as_ptr() as usize % LINE, 0);
    let g: Vec<&ClassGeometry> = (0..3).map(|c| &stacks.classes[c]).collect();
    // The slots start after the header, on their own line, and classes do not overlap.
    assert_eq!(g[0].slots_off, LINE);
    assert_eq!(g[1].slots_off, LINE + 3 * WORD);
    assert_eq!(g[2].slots_off, LINE + 3 * WORD);
    assert!(g[2].slots_off + 9 * WORD <= stride);
    assert_eq!(g[2].count_off, (COUNT_WORD + 2) * WORD);
    assert!(g.iter().all(|g| g.stride == stride && g.cpus == 4));

    #[cfg(not(miri))]
    {
        let mapped =
            PerCpuStacks::with_cpus(&[1], 2, CpuCacheImpl::Portable, Backing::Mmap).unwrap();
        assert_eq!(mapped.stride_words * WORD, PAGE);
    }
}

#[test]
fn parses_cpu_lists() {
    assert_eq!(parse_cpu_list(b"0-1\n"), Some(2));
    assert_eq!(parse_cpu_list(b"0"), Some(1));
    assert_eq!(parse_cpu_list(b"0-3,8-11\n"), Some(12));
    assert_eq!(parse_cpu_list(b"0,5"), Some(6));
    assert_eq!(parse_cpu_list(b""), None);
    assert_eq!(parse_cpu_list(b"0-x"), None);
}

#[cfg(not(miri))]
#[test]
fn possible_cpus_cover_the_allowed_ones() {
    let cpus = possible_cpus();
    assert!(allowed_cpus().iter().all(|&c| c < cpus));
}

// === single-thread semantics, both implementations ===

/// Every operation on one pinned CPU, and on a CPU number out of range.
fn single_thread_semantics(make: impl Fn(&[u32], usize) -> PerCpuStacks) {
    let pin = Pinned::last();
    let cpu = pin.cpu;
    let stacks = make(&[4, 2, 0], cpu + 1);
    assert!(!stacks.take_activity(cpu), "a fresh instance is idle");

    // Capacity and LIFO order.
    assert_eq!(stacks.pop(0), None);
    for item in 1..=4 {
        assert_eq!(stacks.push(0, item), Ok(()));
    }
    assert_eq!(stacks.push(0, 5), Err(5), "full");
    assert_eq!(stacks.len(cpu, 0), 4);
    // Classes are separate stacks.
    assert_eq!(stacks.push(1, 100), Ok(()));
    assert_eq!(stacks.len(cpu, 1), 1);
    assert_eq!(stacks.pop(1), Some(100));
    for item in (1..=4).rev() {
        assert_eq!(stacks.pop(0), Some(item));
    }
    assert_eq!(stacks.pop(0), None);
    // A class of capacity 0 takes nothing.
    assert_eq!(stacks.push(2, 7), Err(7));
    assert_eq!(stacks.pop(2), None);
    assert_eq!(stacks.push_batch(2, &[1, 2]), 0);

    // Batches: a prefix is pushed; pops come top first and say where from.
    assert_eq!(stacks.push_batch(0, &[10, 11, 12, 13, 14, 15]), 4);
    assert_eq!(stacks.len(cpu, 0), 4);
    assert_eq!(stacks.push_batch(0, &[16]), 0, "full");
    let mut out = [0u64; 3];
    let taken = stacks.pop_batch(0, &mut out);
    assert_eq!(
        taken,
        Taken {
            len: 3,
            cpu: Some(cpu as u32)
        }
    );
    assert_eq!(out, [13, 12, 11]);
    let mut big = [0u64; 10];
    assert_eq!(stacks.pop_batch(0, &mut big).len, 1);
    assert_eq!(big[0], 10);
    let empty = stacks.pop_batch(0, &mut big);
    assert_eq!(empty.len, 0);
    assert_eq!(
        empty.cpu,
        Some(cpu as u32),
        "an empty stack was still reached"
    );
    assert_eq!(stacks.pop_batch(0, &mut []).len, 0);
    assert_eq!(stacks.push_batch(0, &[]), 0);
    assert_eq!(stacks.push_batch(0, &[20, 21]), 2);
    assert_eq!(stacks.push(0, 22), Ok(()));
    assert_eq!(stacks.pop_batch(0, &mut out).len, 3);
    assert_eq!(out, [22, 21, 20]);

    // push_if_on: only on the named CPU.
    assert_eq!(stacks.push_if_on(0, 30, cpu as u32), Ok(()));
    assert_eq!(stacks.push_if_on(0, 31, cpu as u32 + 1), Err(31));
    assert_eq!(stacks.push_if_on(0, 32, u32::MAX), Err(32));
    assert_eq!(stacks.pop(0), Some(30));

    // The activity mark.
    assert!(stacks.take_activity(cpu));
    assert!(!stacks.take_activity(cpu), "cleared");
    assert_eq!(stacks.pop(0), None);
    assert!(
        stacks.take_activity(cpu),
        "a failed pop still ran on the CPU"
    );
    assert!(!stacks.take_activity(cpu + 1), "out of range");

    // Drain: every item, once, by class, bottom first.
    stacks.push_batch(0, &[40, 41]);
    stacks.push(1, 42).unwrap();
    let mut seen = Vec::new();
    assert!(stacks.drain_cpu(cpu, |class, items| seen.push((class, items.to_vec()))));
    assert_eq!(seen, [(0, vec![40, 41]), (1, vec![42])]);
    assert_eq!(stacks.len(cpu, 0), 0);
    assert_eq!(stacks.pop(0), None);
    let mut calls = 0;
    assert!(stacks.drain_cpu(cpu, |_, _| calls += 1));
    assert_eq!(calls, 0, "nothing to hand over");
    assert_eq!(stacks.push(0, 43), Ok(()), "restarted after the drain");
    assert_eq!(stacks.pop(0), Some(43));

    // A CPU number beyond the instance's CPUs: every operation fails.
    if cpu > 0 {
        let narrow = make(&[4], cpu);
        assert_eq!(narrow.push(0, 1), Err(1));
        assert_eq!(narrow.pop(0), None);
        assert_eq!(narrow.push_batch(0, &[1, 2]), 0);
        assert_eq!(narrow.pop_batch(0, &mut out), Taken { len: 0, cpu: None });
        assert_eq!(narrow.push_if_on(0, 1, cpu as u32), Err(1));
        assert!(!narrow.take_activity(cpu));
        assert_eq!(narrow.len(cpu, 0), 0);
    }
}

#[test]
fn portable_single_thread() {
    single_thread_semantics(|caps, cpus| {
        let s = PerCpuStacks::with_cpus(caps, cpus, CpuCacheImpl::Portable, Backing::Heap);
        s.unwrap()
    });
}

#[cfg(not(miri))]
#[test]
fn rseq_single_thread() {
    if rseq_stacks(&[1], Backing::Heap).is_none() {
        return;
    }
    for backing in [Backing::Mmap, Backing::Heap] {
        single_thread_semantics(|caps, cpus| {
            let s = PerCpuStacks::with_cpus(caps, cpus, CpuCacheImpl::Rseq, backing).unwrap();
            assert_eq!(s.implementation(), CpuCacheImpl::Rseq);
            s
        });
    }
}

#[cfg(not(miri))]
#[test]
fn rseq_is_used() {
    let Some(stacks) = rseq_stacks(&[2], Backing::Mmap) else {
        return;
    };
    assert_eq!(stacks.implementation(), CpuCacheImpl::Rseq);
    let Imp::Rseq(access) = stacks.imp else {
        unreachable!()
    };
    if std::env::var_os(EXPECT_OWN_AREA).is_some() {
        assert_eq!(
            access,
            rseq::Access::Own,
            "glibc's registration was to be off"
        );
    }
    eprintln!("rseq areas: {access:?}");
    // Operations really run: pinned, a push is seen by a drain of that CPU.
    let pin = Pinned::last();
    stacks.push(0, 9).unwrap();
    assert_eq!(stacks.len(pin.cpu, 0), 1);
    assert_eq!(drain_all(&stacks), [(0, 9)]);
}

/// Runs the rseq tests again in a child process with glibc's registration turned off, so
/// each thread registers an area of its own.
#[cfg(not(miri))]
#[test]
fn rseq_own_registration_without_glibc() {
    if std::env::var_os(EXPECT_OWN_AREA).is_some() {
        return; // already the child
    }
    let rseq_works = rseq_stacks(&[1], Backing::Heap).is_some();
    let _heavy = heavy();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "percpu::tests::rseq_",
            "--skip",
            "own_registration",
            "--test-threads=2",
        ])
        .env("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
        .env(EXPECT_OWN_AREA, "1");
    if rseq_works {
        child.env(REQUIRE_RSEQ, "1");
    }
    let output = child.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("rseq_is_used ... ok"), "child ran: {text}");
    assert!(text.contains("rseq_stress ... ok"), "child ran: {text}");
}

// === aborts ===

/// Checks of the release flag inside `push_after_wait` before it gives up waiting: a few
/// seconds, far longer than the tests take to release it.
#[cfg(not(miri))]
const WAIT_LIMIT: usize = 3_000_000_000;

/// Restricts thread `tid` (of this process) to `cpus`.
#[cfg(not(miri))]
fn set_thread_affinity(tid: libc::pid_t, cpus: &[usize]) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `set` is a valid set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Pushes item 77 on class 0 with a critical section that waits, inside, for a release
/// flag. Another thread (on another CPU where possible) runs `interrupt` 10 ms after the
/// section started, then sets the flag (`interrupt` may set it earlier itself). Strays
/// (preemption by other tests) only add restarts: every attempt waits for the flag.
/// Returns `(pushed, attempts)`.
#[cfg(not(miri))]
fn interrupted_push(
    stacks: &PerCpuStacks,
    interrupt: impl FnOnce(libc::pid_t, libc::pthread_t, &AtomicBool) + Send + 'static,
) -> (bool, usize) {
    let Imp::Rseq(access) = stacks.imp else {
        unreachable!("an rseq instance")
    };
    // SAFETY: no preconditions.
    let (tid, thread) = unsafe { (libc::gettid(), libc::pthread_self()) };
    let here = current_cpu();
    // Not `allowed_cpus()`: this thread is usually pinned, and that is all it may use.
    let elsewhere: Vec<usize> = (0..possible_cpus()).filter(|&c| c != here).collect();
    let ready = Arc::new(Barrier::new(2));
    let release = Arc::new(AtomicBool::new(false));
    let helper = {
        let (ready, release) = (ready.clone(), release.clone());
        std::thread::spawn(move || {
            // Spawned threads inherit the affinity: move off the section's CPU (where
            // there is another one), so the section runs undisturbed until interrupted.
            set_affinity(&elsewhere);
            ready.wait();
            // Busy, not asleep: waking from a sleep may disturb the section's CPU (the
            // kernel can run the timer there) and abort the section before its time.
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(10) {
                std::hint::spin_loop();
            }
            interrupt(tid, thread, &release);
            release.store(true, Ordering::Release);
        })
    };
    ready.wait();
    let result = rseq::push_after_wait(access, &stacks.classes[0], 77, &release, WAIT_LIMIT);
    helper.join().unwrap();
    result.expect("this thread has an rseq area")
}

/// A migration aborts a section in flight; it restarts and commits on the new CPU (had
/// it not aborted, it would have committed to the old CPU's stack from the new CPU).
#[cfg(not(miri))]
#[test]
fn rseq_migration_aborts_and_restarts_on_the_new_cpu() {
    let _heavy = heavy();
    let allowed = allowed_cpus();
    if allowed.len() < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let Some(stacks) = rseq_stacks(&[4], Backing::Mmap) else {
        return;
    };
    let (from, to) = (allowed[0], allowed[1]);
    let pin = Pinned::to(from);
    let (pushed, attempts) = interrupted_push(&stacks, move |tid, _, _| {
        assert!(set_thread_affinity(tid, &[to]));
    });
    assert!(pushed);
    assert!(attempts >= 2, "the migration did not abort the section");
    assert_eq!(current_cpu(), to);
    assert_eq!((stacks.len(from, 0), stacks.len(to, 0)), (0, 1));
    drop(pin);
}

/// Each signal delivered inside a section aborts it; it restarts and commits once.
#[cfg(not(miri))]
#[test]
fn rseq_signals_abort_and_restart() {
    let _heavy = heavy();
    const SIGNALS: usize = 8;
    let Some(stacks) = rseq_stacks(&[4], Backing::Mmap) else {
        return;
    };
    install_noop_signal_handler();
    let pin = Pinned::last();
    let (pushed, attempts) = interrupted_push(&stacks, |_, thread, _| {
        for _ in 0..SIGNALS {
            let before = SIGNALS_HANDLED.load(Ordering::SeqCst);
            // SAFETY: `thread` is alive: it joins this helper before it returns.
            assert_eq!(unsafe { libc::pthread_kill(thread, NOOP_SIGNAL) }, 0);
            // One at a time: signals sent while the thread waits for a CPU would merge.
            let start = Instant::now();
            while SIGNALS_HANDLED.load(Ordering::SeqCst) == before {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "signal not handled"
                );
                std::hint::spin_loop();
            }
            while start.elapsed() < Duration::from_millis(1) {
                std::hint::spin_loop();
            }
        }
    });
    assert!(pushed);
    // Other interrupts may add restarts; each signal adds one.
    assert!(
        attempts > SIGNALS,
        "{attempts} attempts for {SIGNALS} signals"
    );
    assert_eq!(stacks.len(pin.cpu, 0), 1);
    assert_eq!(drain_all(&stacks), [(0, 77)], "committed exactly once");
}

/// A drain's membarrier fence aborts a section in flight on the drained CPU: the section
/// cannot commit while the CPU is stopped. (Without the fence it would go on and commit
/// into the stack the drain is emptying.)
#[cfg(not(miri))]
#[test]
fn rseq_drain_fence_aborts_a_section_in_flight() {
    let _heavy = heavy();
    let Some(stacks) = rseq_stacks(&[4], Backing::Mmap) else {
        return;
    };
    let stacks = Arc::new(stacks);
    let pin = Pinned::last();
    let cpu = pin.cpu;
    stacks.push(0, 1).unwrap(); // so the drain has something to hand over
    let committed_while_stopped = Arc::new(AtomicBool::new(false));
    let (pushed, _) = {
        let (stacks, flag) = (stacks.clone(), committed_while_stopped.clone());
        interrupted_push(&stacks.clone(), move |_, _, release| {
            let mut got = Vec::with_capacity(4);
            assert!(stacks.drain_cpu(cpu, |_, items| {
                got.extend_from_slice(items);
                // Let the section go on while the CPU is stopped, and give it time to
                // commit. No system call meanwhile: the interrupts one can cause might
                // abort the section too and hide a missing fence.
                release.store(true, Ordering::Release);
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(20) {
                    std::hint::spin_loop();
                }
                flag.store(stacks.len(cpu, 0) != 0, Ordering::SeqCst);
            }));
            assert_eq!(got, [1]);
        })
    };
    assert!(
        !committed_while_stopped.load(Ordering::SeqCst),
        "a section committed into a stopped CPU's stack"
    );
    // The restarted section failed on the stopped CPU or, if it only ran again after
    // the drain (a loaded machine), pushed normally.
    assert_eq!(stacks.len(cpu, 0), pushed as usize);
}

/// The signal the tests send to interrupt critical sections; its handler only counts.
#[cfg(not(miri))]
const NOOP_SIGNAL: libc::c_int = libc::SIGURG;

/// Signals the handler below has run for.
#[cfg(not(miri))]
static SIGNALS_HANDLED: AtomicUsize = AtomicUsize::new(0);

#[cfg(not(miri))]
fn install_noop_signal_handler() {
    extern "C" fn noop(_: libc::c_int) {
        // Atomics are async-signal-safe.
        SIGNALS_HANDLED.fetch_add(1, Ordering::SeqCst);
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is valid; the handler is async-signal-safe (it
        // does nothing), and SA_RESTART keeps interrupted system calls going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = noop as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            assert_eq!(
                libc::sigaction(NOOP_SIGNAL, &action, std::ptr::null_mut()),
                0
            );
        }
    });
}

// === drains ===

/// While a drain holds a CPU, operations on it fail; after it they work again.
fn ops_fail_during_drain(stacks: &PerCpuStacks) {
    let pin = Pinned::last();
    let cpu = pin.cpu;
    stacks.push(0, 1).unwrap();
    let mut inside = false;
    stacks.drain_cpu(cpu, |_, items| {
        assert_eq!(items, [1]);
        inside = true;
        assert_eq!(stacks.push(0, 2), Err(2));
        assert_eq!(stacks.pop(0), None);
        assert_eq!(stacks.push_batch(0, &[3]), 0);
        assert_eq!(stacks.pop_batch(0, &mut [0; 2]).len, 0);
        assert_eq!(stacks.push_if_on(0, 4, cpu as u32), Err(4));
    });
    assert!(inside);
    assert_eq!(stacks.push(0, 5), Ok(()));
    assert_eq!(stacks.pop(0), Some(5));
}

#[test]
fn portable_ops_fail_during_drain() {
    let stacks = PerCpuStacks::with_cpus(
        &[4],
        allowed_cpus().last().unwrap() + 1,
        CpuCacheImpl::Portable,
        Backing::Heap,
    )
    .unwrap();
    ops_fail_during_drain(&stacks);
}

#[cfg(not(miri))]
#[test]
fn rseq_ops_fail_during_drain() {
    if let Some(stacks) = rseq_stacks(&[4], Backing::Mmap) {
        ops_fail_during_drain(&stacks);
    }
}

/// A drain that panics restarts the CPU; the classes it handed over stay emptied.
#[test]
fn drain_restarts_after_a_panic() {
    let stacks =
        PerCpuStacks::with_cpus(&[2, 2], 1, CpuCacheImpl::Portable, Backing::Heap).unwrap();
    stacks.push_on(0, 0, 1).unwrap();
    stacks.push_on(0, 1, 2).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stacks.drain_cpu(0, |_, _| panic!("drain callback"));
    }));
    assert!(result.is_err());
    assert_eq!(stacks.len(0, 0), 0, "handed over before the panic");
    assert_eq!(stacks.len(0, 1), 1, "not reached");
    assert_eq!(stacks.pop_on(0, 1), Some(2), "the CPU is open again");
}

/// Two threads draining the same CPU take turns; different CPUs do not wait.
#[cfg(not(miri))]
#[test]
fn drains_of_one_cpu_take_turns() {
    let stacks = Arc::new(portable_stacks(&[1], Backing::Mmap));
    let inside = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (stacks, inside) = (stacks.clone(), inside.clone());
            std::thread::spawn(move || {
                for _ in 0..20 {
                    stacks.push_on(0, 0, 1).ok();
                    stacks.drain_cpu(0, |_, _| {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::sleep(Duration::from_micros(200));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

// === the stress test ===

/// `threads` threads move unique items between private sets and the stacks with every
/// operation, hopping between CPUs with `sched_setaffinity` (forcing migrations and rseq
/// aborts), while another thread drains every CPU over and over. At the end every item
/// exists exactly once, in its own class.
fn stress(stacks: PerCpuStacks, threads: usize, run_for: Duration) {
    const PER_CLASS: u64 = 48;
    let classes = stacks.classes();
    let stacks = Arc::new(stacks);
    let stop = Arc::new(AtomicBool::new(false));
    // Per class, the items drains handed over; workers take them back into circulation.
    let drained: Arc<Vec<Mutex<Vec<u64>>>> =
        Arc::new((0..classes).map(|_| Mutex::new(Vec::new())).collect());
    let allowed = allowed_cpus();
    let start = Arc::new(Barrier::new(threads + 2));
    // Item = class << 48 | thread << 32 | serial.
    let item = |class: usize, thread: usize, serial: u64| {
        (class as u64) << 48 | (thread as u64) << 32 | serial
    };
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (stacks, stop, allowed, start, drained) = (
                stacks.clone(),
                stop.clone(),
                allowed.clone(),
                start.clone(),
                drained.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1) << 20);
                let mut mine: Vec<Vec<u64>> = (0..classes)
                    .map(|c| (0..PER_CLASS).map(|s| item(c, t, s)).collect())
                    .collect();
                let mut buf = [0u64; 8];
                let (mut ops, mut moved) = (0u64, 0u64);
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    ops += 1;
                    let class = rng.below(classes);
                    let own = &mut mine[class];
                    if own.len() < 4
                        && let Ok(mut pool) = drained[class].try_lock()
                    {
                        let from = pool.len().saturating_sub(16);
                        own.extend(pool.drain(from..));
                    }
                    match rng.below(16) {
                        0..=3 => {
                            if let Some(x) = own.pop() {
                                match stacks.push(class, x) {
                                    Ok(()) => moved += 1,
                                    Err(x) => own.push(x),
                                }
                            }
                        }
                        4..=7 => {
                            if let Some(x) = stacks.pop(class) {
                                assert_eq!(x >> 48, class as u64, "item in a foreign class");
                                own.push(x);
                                moved += 1;
                            }
                        }
                        8 | 9 => {
                            let k = rng.below(buf.len()).min(own.len());
                            let batch = own.split_off(own.len() - k);
                            let pushed = stacks.push_batch(class, &batch);
                            own.extend_from_slice(&batch[pushed..]);
                            moved += pushed as u64;
                        }
                        10 | 11 => {
                            let k = rng.below(buf.len()) + 1;
                            let taken = stacks.pop_batch(class, &mut buf[..k]);
                            if taken.len > 0 {
                                let cpu = taken.cpu.expect("a stack was reached");
                                assert!((cpu as usize) < stacks.cpus());
                            }
                            for &x in &buf[..taken.len] {
                                assert_eq!(x >> 48, class as u64, "item in a foreign class");
                            }
                            own.extend_from_slice(&buf[..taken.len]);
                            moved += taken.len as u64;
                        }
                        12 | 13 => {
                            if let Some(x) = own.pop() {
                                let owner = allowed[rng.below(allowed.len())] as u32;
                                match stacks.push_if_on(class, x, owner) {
                                    Ok(()) => moved += 1,
                                    Err(x) => own.push(x),
                                }
                            }
                        }
                        14 => {
                            if rng.below(8) == 0 {
                                // Hop: to one CPU, or back to all of them.
                                if rng.below(3) == 0 {
                                    set_affinity(&allowed);
                                } else {
                                    set_affinity(&[allowed[rng.below(allowed.len())]]);
                                }
                            }
                        }
                        _ => {
                            if rng.below(64) == 0 {
                                std::thread::yield_now();
                            }
                        }
                    }
                }
                set_affinity(&allowed);
                (mine, ops, moved)
            })
        })
        .collect();
    let drainer = {
        let (stacks, stop, drained, start) =
            (stacks.clone(), stop.clone(), drained.clone(), start.clone());
        std::thread::spawn(move || {
            let (mut rounds, mut taken) = (0u64, 0u64);
            start.wait();
            while !stop.load(Ordering::Relaxed) {
                for cpu in 0..stacks.cpus() {
                    assert!(stacks.drain_cpu(cpu, |class, items| {
                        taken += items.len() as u64;
                        drained[class].lock().unwrap().extend_from_slice(items);
                    }));
                }
                rounds += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
            (rounds, taken)
        })
    };
    start.wait();
    std::thread::sleep(run_for);
    stop.store(true, Ordering::Relaxed);

    let mut count: HashMap<u64, usize> = HashMap::new();
    let (mut ops, mut moved) = (0, 0);
    for (t, worker) in workers.into_iter().enumerate() {
        let (mine, n, m) = worker.join().unwrap();
        ops += n;
        moved += m;
        for (class, items) in mine.into_iter().enumerate() {
            for x in items {
                assert_eq!(
                    x >> 48,
                    class as u64,
                    "thread {t} holds an item of another class"
                );
                *count.entry(x).or_default() += 1;
            }
        }
    }
    let (rounds, by_drains) = drainer.join().unwrap();
    let pools = drained.iter().enumerate().flat_map(|(class, pool)| {
        let items = std::mem::take(&mut *pool.lock().unwrap());
        items.into_iter().map(move |x| (class, x))
    });
    for (class, x) in pools
        .collect::<Vec<_>>()
        .into_iter()
        .chain(drain_all(&stacks))
    {
        assert_eq!(
            x >> 48,
            class as u64,
            "a drain handed over an item as another class"
        );
        *count.entry(x).or_default() += 1;
    }
    for c in 0..classes {
        for t in 0..threads {
            for s in 0..PER_CLASS {
                let x = item(c, t, s);
                assert_eq!(count.remove(&x), Some(1), "item {x:#x}: lost or duplicated");
            }
        }
    }
    assert!(count.is_empty(), "items that were never made: {count:?}");
    eprintln!(
        "stress: {ops} operations ({moved} moved items), {rounds} drain rounds \
         ({by_drains} items drained), {} threads on {} CPUs",
        threads,
        allowed.len()
    );
}

#[test]
fn portable_stress() {
    let _heavy = heavy();
    if cfg!(miri) {
        let stacks =
            PerCpuStacks::with_cpus(&[4, 2], 1, CpuCacheImpl::Portable, Backing::Heap).unwrap();
        stress(stacks, 2, Duration::from_millis(50));
    } else {
        stress(
            portable_stacks(&[16, 5, 1], Backing::Mmap),
            8,
            Duration::from_millis(1500),
        );
    }
}

#[cfg(not(miri))]
#[test]
fn rseq_stress() {
    let _heavy = heavy();
    if let Some(stacks) = rseq_stacks(&[16, 5, 1], Backing::Mmap) {
        stress(stacks, 8, Duration::from_millis(1500));
    }
}

// === fork ===

/// A forked child keeps the stacks of every CPU, reopens a CPU whose drain was in
/// progress in another thread of the parent at the fork, and can operate and drain
/// (rseq: with its inherited registration and a membarrier fence in the child).
#[cfg(not(miri))]
fn fork_child_keeps_working(stacks: PerCpuStacks) {
    let allowed = allowed_cpus();
    let stacks = Arc::new(stacks);
    let first = allowed[0];
    let other = *allowed.last().unwrap();
    {
        let _pin = Pinned::to(first);
        assert_eq!(stacks.push_batch(0, &[1, 2, 3]), 3);
    }
    // Another thread is inside a drain of `other` (in its callback) when we fork.
    let held = other != first;
    if held {
        let _pin = Pinned::to(other);
        assert_eq!(stacks.push(0, 100), Ok(()));
    }
    let holding = Arc::new(Barrier::new(2));
    let forked = Arc::new(Barrier::new(2));
    let holder = held.then(|| {
        let (stacks, holding, forked) = (stacks.clone(), holding.clone(), forked.clone());
        std::thread::spawn(move || {
            assert!(stacks.drain_cpu(other, |_, items| {
                assert_eq!(items, [100]);
                holding.wait();
                forked.wait();
            }));
        })
    });
    if held {
        holding.wait();
    }

    // SAFETY: the child only runs `child` and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            child(&stacks, first, other, held)
        }))
        .unwrap_or(99);
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    if let Some(holder) = holder {
        forked.wait();
        holder.join().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is a valid place to write.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: `pid` is our child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the child hangs");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "child check failed");
    // The parent's stacks are untouched by the child.
    assert_eq!(stacks.len(first, 0), 3);
    drain_all(&stacks);

    /// The child's checks; returns the exit code (0: all passed).
    fn child(stacks: &PerCpuStacks, first: usize, other: usize, held: bool) -> i32 {
        if held {
            let _pin = Pinned::to(other);
            if stacks.push(0, 7).is_ok() {
                return 1; // the gate closed at the fork must still be closed
            }
            // SAFETY: this is the child of fork and it has no other threads.
            unsafe { stacks.reopen_after_fork() };
            if stacks.push(0, 7) != Ok(()) || stacks.pop(0) != Some(7) {
                return 2;
            }
        }
        {
            let _pin = Pinned::to(first);
            if stacks.push(0, 4) != Ok(()) || stacks.pop(0) != Some(4) {
                return 3;
            }
        }
        let mut items = Vec::new();
        for cpu in 0..stacks.cpus() {
            if !stacks.drain_cpu(cpu, |_, got| items.extend_from_slice(got)) {
                return 4; // the fence failed in the child
            }
        }
        items.sort_unstable();
        if items != [1, 2, 3] {
            return 5;
        }
        0
    }
}

#[cfg(not(miri))]
#[test]
fn portable_fork() {
    fork_child_keeps_working(portable_stacks(&[4], Backing::Mmap));
}

#[cfg(not(miri))]
#[test]
fn rseq_fork() {
    if let Some(stacks) = rseq_stacks(&[4], Backing::Mmap) {
        fork_child_keeps_working(stacks);
    }
}

// === memory ===

/// With Mmap backing, a CPU that never ran an operation has no resident pages.
#[cfg(not(miri))]
#[test]
fn idle_cpus_cost_no_memory() {
    let pin = Pinned::last();
    let cpus = pin.cpu + 4;
    let stacks =
        PerCpuStacks::with_cpus(&[64, 64], cpus, CpuCacheImpl::Rseq, Backing::Mmap).unwrap();
    stacks.push(0, 1).unwrap();
    stacks.push(1, 2).unwrap();
    let stride = stacks.stride_words * WORD;
    let resident = |cpu: usize| {
        let start = stacks.words.as_ptr() as usize + cpu * stride;
        let mut vec = vec![0u8; stride / PAGE];
        // SAFETY: [start, start + stride) is inside the instance's mapping, page-aligned.
        let rc = unsafe { libc::mincore(start as *mut _, stride, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|&&b| b & 1 != 0).count()
    };
    assert!(resident(pin.cpu) > 0);
    for cpu in (0..cpus).filter(|&c| c != pin.cpu) {
        assert_eq!(resident(cpu), 0, "CPU {cpu} never ran an operation");
    }
}

// === timing ===

/// ns per push+pop pair, single thread, pinned: rseq, portable, and a `Mutex<Vec>`.
/// Each figure is the best of 5 runs of 10 million pairs.
#[cfg(not(miri))]
#[test]
#[ignore = "a timing harness, not a test: run with --release --ignored --nocapture"]
fn timing() {
    fn time(name: &str, mut pair: impl FnMut(u64)) {
        const N: u64 = 10_000_000;
        for i in 0..N / 10 {
            pair(i); // warm up
        }
        let best = (0..5)
            .map(|_| {
                let start = Instant::now();
                for i in 0..N {
                    pair(std::hint::black_box(i));
                }
                start.elapsed().as_nanos() as f64 / N as f64
            })
            .fold(f64::INFINITY, f64::min);
        println!("{name:>34}: {best:6.2} ns per push+pop");
    }
    let pin = Pinned::last();
    println!("pinned to CPU {}", pin.cpu);
    if let Some(stacks) = rseq_stacks(&[64], Backing::Mmap) {
        time("rseq", |i| {
            stacks.push(0, i).unwrap();
            assert_eq!(stacks.pop(0), Some(i));
        });
        time("rseq, batches of 8 (per item)", |i| {
            if i % 8 == 0 {
                let items = [i; 8];
                assert_eq!(stacks.push_batch(0, &items), 8);
                let mut out = [0; 8];
                assert_eq!(stacks.pop_batch(0, &mut out).len, 8);
            }
        });
    }
    let portable = portable_stacks(&[64], Backing::Mmap);
    time("portable", |i| {
        portable.push(0, i).unwrap();
        assert_eq!(portable.pop(0), Some(i));
    });
    let mutex = std::sync::Mutex::new(Vec::with_capacity(64));
    time("Mutex<Vec> (a lock per op)", |i| {
        mutex.lock().unwrap().push(i);
        assert_eq!(mutex.lock().unwrap().pop(), Some(i));
    });
    time("sched_getcpu (one per pair)", |_| {
        std::hint::black_box(current_cpu());
    });
    time("empty loop", |i| {
        std::hint::black_box(i);
    });
}
