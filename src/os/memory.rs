//! Honest memory figures for the whole process: what the kernel would have to keep.
//!
//! `Rss` alone hides `MADV_FREE`: lazily freed pages stay in `Rss` until the kernel needs
//! them. The memory a process really holds is `Rss - LazyFree`, both read from
//! `/proc/self/smaps_rollup`; refaults show up as minor faults in `getrusage`.

/// A reading of the process's memory counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessMemory {
    /// Resident bytes (`Rss` in `/proc/self/smaps_rollup`).
    pub rss: u64,
    /// Resident bytes freed with `MADV_FREE` that the kernel may take at any time.
    pub lazy_free: u64,
    /// Minor page faults so far (`ru_minflt`).
    pub minor_faults: u64,
}

impl ProcessMemory {
    /// Reads the counters. `None` where `/proc/self/smaps_rollup` is missing (not Linux,
    /// or a kernel before 4.14).
    ///
    /// ```
    /// if let Some(mem) = pagepool::ProcessMemory::read() {
    ///     assert!(mem.held() <= mem.rss);
    /// }
    /// ```
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let kib: u64 = line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        };
        Some(Self {
            rss: field("Rss:")?,
            lazy_free: field("LazyFree:").unwrap_or(0),
            minor_faults: minor_faults(),
        })
    }

    /// `Rss - LazyFree`: the bytes the process really holds.
    pub fn held(&self) -> u64 {
        self.rss.saturating_sub(self.lazy_free)
    }
}

/// Minor faults of the calling process so far.
pub fn minor_faults() -> u64 {
    #[cfg(any(loom, miri))]
    {
        0
    }
    #[cfg(not(any(loom, miri)))]
    {
        // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable rusage.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        usage.ru_minflt as u64
    }
}
