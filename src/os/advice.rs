//! Advice to the kernel about free memory: `madvise`, batched through `process_madvise`.
//!
//! The only place that gives memory back. The pool calls it through the [`Advisor`] trait,
//! so tests can inject failures and heap-backed pools (Miri, loom) can emulate it.

#[cfg(not(any(loom, miri)))]
use crate::sync::Ordering;

/// What the pool asks of the kernel for a free block it gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintMode {
    /// `MADV_FREE`: the kernel reclaims the pages only under memory pressure; until then a
    /// reuse costs no fault. Hinted blocks have undefined contents. Shows up as `LazyFree`
    /// in `/proc/self/smaps_rollup`, not as a drop in `Rss`.
    Free,
    /// `MADV_DONTNEED`: the pages go at once and `Rss` drops; the next touch faults in a zero
    /// page, so hinted blocks become *known-zero*. For users whose monitoring reads `Rss`.
    DontNeed,
}

// === impl Advisor ===

/// Gives advice about free ranges to the kernel. The pool uses the operating system's
/// `madvise`; tests substitute failing or panicking advisors.
#[doc(hidden)]
pub trait Advisor: Send + Sync {
    /// Advises each `(address, length)` range (page-aligned, inside the pool's region) with
    /// `mode`, and sets `ok[i]` for each range that succeeded. Returns the number of system
    /// calls made.
    fn advise(&self, ranges: &[(usize, usize)], mode: HintMode, ok: &mut [bool]) -> u64;

    /// Asks the kernel to account the pages this thread just advised with `MADV_FREE` at
    /// once. Does nothing by default.
    fn settle_lazy_free(&self) {}
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
    /// Linux marks pages lazily freed through a per-CPU batch (`lru_lazyfree`, up to 31
    /// folios) that it drains only when the batch fills or other LRU work comes along; until
    /// then the last pages advised still count in `Rss`, not `LazyFree`, and reclaim on
    /// another CPU cannot take them. `MADV_COLD` drains the calling CPU's batches before it
    /// walks its range (and never discards data); the range is a page of its own that is
    /// never touched, so the walk finds nothing and no huge page is split.
    #[cfg(not(any(loom, miri)))]
    fn settle_lazy_free(&self) {
        use std::sync::atomic::AtomicUsize;
        static PAGE: AtomicUsize = AtomicUsize::new(0);
        let mut page = PAGE.load(Ordering::Acquire);
        if page == 0 {
            // SAFETY: a fresh private anonymous mapping of one inaccessible page; no
            // existing memory is affected.
            let fresh = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE_BYTES,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if fresh == libc::MAP_FAILED {
                return; // the pages are still lazily freed, only counted a little later
            }
            page =
                match PAGE.compare_exchange(0, fresh as usize, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => fresh as usize,
                    Err(winner) => {
                        // SAFETY: our own mapping from above, never published.
                        unsafe { libc::munmap(fresh, PAGE_BYTES) };
                        winner
                    }
                };
        }
        // SAFETY: `page` is our own one-page mapping, kept for the life of the process.
        unsafe { libc::madvise(page as *mut libc::c_void, PAGE_BYTES, libc::MADV_COLD) };
    }

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
        if ranges.windows(2).all(|w| w[0].0 + w[0].1 != w[1].0) {
            return self.advise_each(ranges, advice, ok);
        }
        // Neighbouring ranges go to the kernel as one: one walk of the page tables instead
        // of one per range. A run that fails counts as failed for all its ranges.
        let mut runs: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        let mut run_of = Vec::with_capacity(ranges.len());
        for &(addr, len) in ranges {
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == addr => last.1 += len,
                _ => runs.push((addr, len)),
            }
            run_of.push(runs.len() - 1);
        }
        let mut run_ok = vec![false; runs.len()];
        let calls = self.advise_each(&runs, advice, &mut run_ok);
        for (ok, &run) in ok.iter_mut().zip(&run_of) {
            *ok = run_ok[run];
        }
        calls
    }
}

#[cfg(not(any(loom, miri)))]
impl OsAdvisor {
    /// Advises each range with `advice`, batched through `process_madvise` while it works.
    fn advise_each(&self, ranges: &[(usize, usize)], advice: libc::c_int, ok: &mut [bool]) -> u64 {
        let mut calls = 0;
        let mut done = 0;
        while done < ranges.len() {
            // Several ranges at once, where the kernel can: one system call (and one TLB
            // shootdown) instead of one per range.
            if ranges.len() - done > 1 && self.batched.load(Ordering::Relaxed) != 2 {
                calls += 1;
                match process_madvise_self(&ranges[done..], advice) {
                    Ok(bytes) => {
                        self.batched.store(1, Ordering::Relaxed);
                        let mut left = bytes;
                        let start = done;
                        while done < ranges.len() && left >= ranges[done].1 {
                            left -= ranges[done].1;
                            ok[done] = true;
                            done += 1;
                        }
                        if done > start {
                            continue; // the next batch; a range the kernel stopped at is
                            // retried below, alone
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
            let (addr, len) = ranges[done];
            calls += 1;
            // SAFETY: the range is a page-aligned block inside the pool's private anonymous
            // mapping that nobody touches meanwhile (isolated, or being freed by its owner).
            ok[done] = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } == 0;
            done += 1;
        }
        calls
    }
}

#[cfg(not(any(loom, miri)))]
const PAGE_BYTES: usize = 4096;

/// The most ranges one `process_madvise` call takes (`UIO_MAXIOV`).
#[cfg(not(any(loom, miri)))]
const MAX_IOV: usize = 1024;

/// One `process_madvise` call for the first (up to [`MAX_IOV`]) ranges; returns the bytes
/// advised (the kernel stops at the first range it fails on).
#[cfg(not(any(loom, miri)))]
fn process_madvise_self(ranges: &[(usize, usize)], advice: libc::c_int) -> std::io::Result<usize> {
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
