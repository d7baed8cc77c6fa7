//! What the machine has: physical memory and CPUs, read without allocating (a global
//! allocator calls these while it builds its pool).

/// Bytes of physical memory (1 GiB where it cannot be read, and under loom and Miri).
pub(crate) fn physical_memory() -> usize {
    #[cfg(any(loom, miri))]
    {
        1 << 30
    }
    #[cfg(not(any(loom, miri)))]
    {
        // SAFETY: sysconf has no preconditions.
        let (pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages <= 0 || page <= 0 {
            1 << 30
        } else {
            (pages as usize).saturating_mul(page as usize)
        }
    }
}

/// CPUs this thread may run on, without allocating.
#[cfg_attr(loom, allow(dead_code))] // only the global allocator, which loom does not build
pub(crate) fn cpu_count() -> usize {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    let got = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if got == 0 {
        // SAFETY: `set` was filled in by sched_getaffinity.
        let n = unsafe { libc::CPU_COUNT(&set) };
        if n > 0 {
            return (n as usize).min(crate::MAX_SHARDS);
        }
    }
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if online > 0 {
        (online as usize).min(crate::MAX_SHARDS)
    } else {
        1
    }
}
