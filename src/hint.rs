//! Free page hinting: cold, high-order free blocks go back to the OS in bounded batches.
//!
//! Seed 000 (2019) and Linux's `mm/page_reporting.c`, in userspace:
//!
//! - **Trigger.** A free that leaves an unhinted block at or above the hint order checks the
//!   shard's count of such blocks against a high-water mark and, if it is reached, requests
//!   a pass. A three-state atomic ([`IDLE`], [`REQUESTED`], [`ACTIVE`]) makes sure at most
//!   one wake-up is sent however many frees race; the thread sleeps on a condition variable
//!   otherwise, so an idle pool costs no CPU.
//! - **Isolate, advise, return.** Under the shard lock, up to a batch of cold blocks (free
//!   for at least the hint delay) is taken off the lists and marked isolated, so nobody
//!   allocates or merges them. The lock is dropped for the system call. Then, under the
//!   lock again, each block goes back through the normal free path, so it can merge: at the
//!   list tail as hinted (or known-zero after `MADV_DONTNEED`), or, if the advice failed,
//!   as unhinted and warm, to be retried after another delay. A pass stops after its byte
//!   budget; the thread then waits an interval before the next.
//! - **Batching.** Where `process_madvise` on the own process works (Linux 6.13+), a batch
//!   is one system call; otherwise one `madvise` per block.
//! - **Faults.** The advisor runs inside `catch_unwind`: a panic counts as a failure of the
//!   batch, the blocks return unhinted, and no lock is held while it runs.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use crate::config::{HintConfig, HintMode};
use crate::frame_table::{FrameIdx, FreeClass};
use crate::sync::{AtomicBool, AtomicU8, AtomicU64, Condvar, Mutex, Ordering};

/// No pass is requested.
pub(crate) const IDLE: u8 = 0;
/// A pass is requested and the thread has not started it.
pub(crate) const REQUESTED: u8 = 1;
/// The thread is running passes.
pub(crate) const ACTIVE: u8 = 2;

// === impl Advisor ===

/// Gives advice about free ranges to the kernel. The pool uses the operating system's
/// `madvise`; tests substitute failing or panicking advisors.
#[doc(hidden)]
pub trait Advisor: Send + Sync {
    /// Advises each `(address, length)` range (page-aligned, inside the pool's region) with
    /// `mode`, and sets `ok[i]` for each range that succeeded. Returns the number of system
    /// calls made.
    fn advise(&self, ranges: &[(usize, usize)], mode: HintMode, ok: &mut [bool]) -> u64;
}

/// `madvise`, batched through `process_madvise` where the kernel allows it.
pub(crate) struct OsAdvisor {
    /// 0 = not tried yet, 1 = works, 2 = unsupported. A cache of a probe, not part of any
    /// protocol, so it is a plain std atomic even under loom (and can live in a static).
    #[cfg_attr(loom, allow(dead_code))] // loom models make no syscalls
    batched: std::sync::atomic::AtomicU8,
}

pub(crate) static OS_ADVISOR: OsAdvisor = OsAdvisor {
    batched: std::sync::atomic::AtomicU8::new(0),
};

/// Heap-backed pools have nothing to give back: `MADV_FREE` leaves the bytes as they are,
/// and `MADV_DONTNEED` is emulated by zeroing, so known-zero stays true.
pub(crate) struct HeapAdvisor;

pub(crate) static HEAP_ADVISOR: HeapAdvisor = HeapAdvisor;

impl Advisor for HeapAdvisor {
    fn advise(&self, ranges: &[(usize, usize)], mode: HintMode, ok: &mut [bool]) -> u64 {
        for (i, &(addr, len)) in ranges.iter().enumerate() {
            if mode == HintMode::DontNeed {
                // SAFETY: the pool passes ranges of isolated free blocks inside its region;
                // nobody else may touch them until they are returned.
                unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) };
            }
            ok[i] = true;
        }
        0
    }
}

/// `PIDFD_SELF` (Linux 6.15+): the calling process, without opening a pidfd.
#[cfg(not(any(loom, miri)))]
const PIDFD_SELF: libc::c_int = -10000;

impl Advisor for OsAdvisor {
    #[cfg(any(loom, miri))]
    fn advise(&self, ranges: &[(usize, usize)], mode: HintMode, ok: &mut [bool]) -> u64 {
        HEAP_ADVISOR.advise(ranges, mode, ok)
    }

    #[cfg(not(any(loom, miri)))]
    fn advise(&self, ranges: &[(usize, usize)], mode: HintMode, ok: &mut [bool]) -> u64 {
        let advice = match mode {
            HintMode::Free => libc::MADV_FREE,
            HintMode::DontNeed => libc::MADV_DONTNEED,
        };
        let mut calls = 0;
        let mut done = 0;
        if ranges.len() > 1 && self.batched.load(Ordering::Relaxed) != 2 {
            calls += 1;
            match process_madvise_self(ranges, advice) {
                Ok(bytes) => {
                    self.batched.store(1, Ordering::Relaxed);
                    let mut left = bytes;
                    while done < ranges.len() && left >= ranges[done].1 {
                        left -= ranges[done].1;
                        ok[done] = true;
                        done += 1;
                    }
                }
                Err(_) => {
                    // Unsupported here (old kernel, or advice not allowed): stop trying.
                    if self.batched.load(Ordering::Relaxed) == 0 {
                        self.batched.store(2, Ordering::Relaxed);
                    }
                }
            }
        }
        for i in done..ranges.len() {
            let (addr, len) = ranges[i];
            calls += 1;
            // SAFETY: the range is a page-aligned free block inside the pool's private
            // anonymous mapping, isolated so that nobody touches it meanwhile.
            ok[i] = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } == 0;
        }
        calls
    }
}

/// One `process_madvise` call for all ranges (at most `IOV_MAX` = 1024 of them).
#[cfg(not(any(loom, miri)))]
fn process_madvise_self(ranges: &[(usize, usize)], advice: libc::c_int) -> std::io::Result<usize> {
    const MAX_IOV: usize = 64;
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_IOV];
    let n = ranges.len().min(MAX_IOV);
    for (slot, &(addr, len)) in iov.iter_mut().zip(ranges) {
        *slot = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
    }
    // SAFETY: `iov` holds `n` valid iovecs describing ranges of our own mapping.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            PIDFD_SELF,
            iov.as_ptr(),
            n,
            advice,
            0u32,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

// === impl HintSignal ===

/// Wakes the hinter thread; see the module docs.
pub(crate) struct HintSignal {
    state: AtomicU8,
    /// A thread is running and wants requests.
    listening: AtomicBool,
    high_water: u64,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl HintSignal {
    pub(crate) fn new(high_water: usize) -> Self {
        Self {
            state: AtomicU8::new(IDLE),
            listening: AtomicBool::new(false),
            high_water: high_water as u64,
            stop: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// Whether a thread listens (frees skip counting otherwise).
    #[inline]
    pub(crate) fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// Called by a free that left `unhinted` unhinted blocks at or above the hint order.
    #[inline]
    pub(crate) fn note_unhinted(&self, unhinted: u64) {
        if unhinted >= self.high_water {
            self.request();
        }
    }

    /// Requests a pass; wakes the thread only on the transition from idle.
    pub(crate) fn request(&self) {
        if self.state.load(Ordering::Relaxed) == REQUESTED {
            return;
        }
        if self.state.swap(REQUESTED, Ordering::AcqRel) == IDLE {
            let _stop = self.stop.lock();
            self.wake.notify_all();
        }
    }

    /// Marks the thread as started (again, after `stop`), with a pass requested: a thread
    /// stopped mid-pass left the state active, and the new one must not wait for a wake-up
    /// that the old state would swallow.
    pub(crate) fn start_listening(&self) {
        *self.stop.lock() = false;
        self.state.store(REQUESTED, Ordering::Release);
        self.listening.store(true, Ordering::Release);
    }

    /// Takes the wake-up lock, for holding across `fork` (after the shard locks, which is
    /// the order frees take them in).
    #[cfg(not(loom))]
    pub(crate) fn lock_for_fork(&self) -> crate::sync::MutexGuard<'_, bool> {
        self.stop.lock()
    }

    /// Asks the thread to exit.
    pub(crate) fn stop(&self) {
        self.listening.store(false, Ordering::Release);
        *self.stop.lock() = true;
        self.wake.notify_all();
    }

    /// Sleeps until a pass is requested; false when asked to stop.
    fn wait_for_request(&self) -> bool {
        let mut stop = self.stop.lock();
        loop {
            if *stop {
                return false;
            }
            if self.state.load(Ordering::Acquire) == REQUESTED {
                self.state.store(ACTIVE, Ordering::Release);
                return true;
            }
            stop = self.wake.wait(stop);
        }
    }

    /// Sleeps for `pause` unless asked to stop; false when asked to stop.
    fn pause(&self, pause: Duration) -> bool {
        let deadline = std::time::Instant::now() + pause;
        let mut stop = self.stop.lock();
        loop {
            if *stop {
                return false;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return true;
            }
            stop = self.wake.wait_timeout(stop, left);
        }
    }

    /// After a run of passes: back to idle unless a request came in meanwhile.
    fn finish(&self) {
        let _ = self
            .state
            .compare_exchange(ACTIVE, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }
}

// === impl HintCounters ===

/// Hinting counters, read by `stats()`.
#[derive(Default)]
pub(crate) struct HintCounters {
    pub(crate) passes: AtomicU64,
    pub(crate) madvise_calls: AtomicU64,
    pub(crate) bytes_hinted: AtomicU64,
    pub(crate) blocks_hinted: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) panics: AtomicU64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PassOutcome {
    pub(crate) blocks: u64,
    pub(crate) bytes: u64,
    pub(crate) failures: u64,
    /// The byte budget ran out with candidates left.
    pub(crate) budget_spent: bool,
    /// Milliseconds until a too-warm candidate turns cold.
    pub(crate) next_cold_in: Option<u32>,
}

/// What the hinter needs from a pool.
pub(crate) trait HintTarget {
    /// The shards to visit, shared pool included.
    fn shard_count(&self) -> usize;
    /// Isolates up to `max_blocks` cold blocks of shard `shard`.
    fn isolate(
        &self,
        shard: usize,
        cold_ms: Option<u32>,
        max_blocks: usize,
        budget_frames: &mut u64,
        out: &mut Vec<(FrameIdx, u8)>,
    ) -> crate::shard::Isolation;
    /// Returns isolated blocks of shard `shard` (class `None`: the advice failed).
    fn return_isolated(
        &self,
        shard: usize,
        blocks: &[(FrameIdx, u8)],
        classes: &[Option<FreeClass>],
    );
    /// Address of a frame.
    fn frame_addr(&self, idx: FrameIdx) -> usize;
    fn config(&self) -> &HintConfig;
    /// The smallest order hinted.
    fn min_order(&self) -> u8;
    fn advisor(&self) -> &dyn Advisor;
    fn counters(&self) -> &HintCounters;
}

/// Runs one pass over every shard. `cold_ms = None` hints every candidate at once.
pub(crate) fn run_pass(
    target: &impl HintTarget,
    cold_ms: Option<u32>,
    budget_bytes: u64,
) -> PassOutcome {
    let config = *target.config();
    let counters = target.counters();
    let mut budget_frames = budget_bytes / crate::FRAME_SIZE as u64;
    let mut outcome = PassOutcome::default();
    let mut batch = Vec::with_capacity(config.batch_blocks);
    let mut ranges = Vec::with_capacity(config.batch_blocks);
    let mut ok = Vec::with_capacity(config.batch_blocks);
    let mut classes = Vec::with_capacity(config.batch_blocks);
    let success_class = match config.mode {
        HintMode::Free => FreeClass::Hinted,
        HintMode::DontNeed => FreeClass::Zero,
    };
    'shards: for shard in 0..target.shard_count() {
        loop {
            batch.clear();
            let isolation = target.isolate(
                shard,
                cold_ms,
                config.batch_blocks,
                &mut budget_frames,
                &mut batch,
            );
            if let Some(wait) = isolation.next_cold_in {
                outcome.next_cold_in =
                    Some(outcome.next_cold_in.map_or(wait, |w: u32| w.min(wait)));
            }
            if batch.is_empty() {
                break;
            }
            ranges.clear();
            ranges.extend(
                batch
                    .iter()
                    .map(|&(idx, order)| (target.frame_addr(idx), crate::FRAME_SIZE << order)),
            );
            ok.clear();
            ok.resize(batch.len(), false);
            let advised = catch_unwind(AssertUnwindSafe(|| {
                target.advisor().advise(&ranges, config.mode, &mut ok)
            }));
            match advised {
                Ok(calls) => {
                    counters.madvise_calls.fetch_add(calls, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.panics.fetch_add(1, Ordering::Relaxed);
                    ok.iter_mut().for_each(|ok| *ok = false);
                }
            }
            classes.clear();
            classes.extend(ok.iter().map(|&ok| ok.then_some(success_class)));
            target.return_isolated(shard, &batch, &classes);
            let mut failed = false;
            for (&(_, len), &ok) in ranges.iter().zip(&ok) {
                if ok {
                    outcome.blocks += 1;
                    outcome.bytes += len as u64;
                } else {
                    outcome.failures += 1;
                    failed = true;
                }
            }
            if failed {
                // Failed blocks are back on the lists, unhinted: retry them in a later
                // pass, not in a loop now.
                break;
            }
            if budget_frames < 1 << target.min_order() {
                outcome.budget_spent = true;
                break 'shards;
            }
        }
    }
    counters.passes.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes_hinted
        .fetch_add(outcome.bytes, Ordering::Relaxed);
    counters
        .blocks_hinted
        .fetch_add(outcome.blocks, Ordering::Relaxed);
    counters
        .failures
        .fetch_add(outcome.failures, Ordering::Relaxed);
    outcome
}

/// The hinter thread's loop: sleep until requested, run passes until nothing is left or
/// everything left is too warm, sleep again.
pub(crate) fn hinter_main(target: &impl HintTarget, signal: &HintSignal) {
    let config = *target.config();
    let cold_ms = config.delay.as_millis().min(u32::MAX as u128 / 2) as u32;
    while signal.wait_for_request() {
        loop {
            let outcome = run_pass(target, Some(cold_ms), config.pass_bytes as u64);
            let pause = if outcome.budget_spent {
                Some(config.interval)
            } else {
                // Come back when the next candidate turns cold (a little after, so it is).
                outcome
                    .next_cold_in
                    .map(|ms| Duration::from_millis(ms as u64 + 5).max(config.interval))
            };
            match pause {
                Some(pause) => {
                    if !signal.pause(pause) {
                        return;
                    }
                }
                None => break,
            }
        }
        signal.finish();
        // Rate limit: frees that request a pass while one runs (or right after) are served
        // an interval later, so a busy allocator cannot keep the thread spinning.
        if !signal.pause(config.interval) {
            return;
        }
    }
}
