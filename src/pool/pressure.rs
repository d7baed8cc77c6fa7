//! The memory pressure watcher: when the kernel reports memory pressure, every pool that
//! asked gives its free memory back at once, and advises `MADV_DONTNEED` while the
//! pressure lasts.
//!
//! # Why
//! Hinting gives cold free memory back after a delay (1 s by default) and, by default,
//! with `MADV_FREE`, which the kernel reclaims only when it needs the memory. A process
//! under an operator's memory limit (a cgroup) cannot wait for either: after a burst, the
//! pool's free blocks are still charged to the group, and the next allocation elsewhere in
//! the process (or the group) reclaims page cache, stalls, or is OOM-killed. The kernel
//! says so before it gets there; the watcher listens.
//!
//! # Sources
//! Each [`PressureSource`](crate::PressureSource) is one file descriptor that `poll`
//! reports ready on an event (`os::pressure`):
//!
//! - **PSI triggers** (`/proc/pressure/memory`, a cgroup2 group's `memory.pressure`): the
//!   kernel tracks how long tasks stall on memory, and a trigger `some <stall> <window>`
//!   makes the file `POLLPRI` when the stall within a window passes the threshold. This is
//!   the kernel's own answer to "is memory short *for the tasks*", not just "is memory
//!   full": a full page cache that is cheap to reclaim causes no stall. At most one event
//!   per window.
//! - **cgroup v2 `memory.events`**: `high`, `max`, `oom`, `oom_kill` counters; kernfs makes
//!   the file `POLLPRI` when one changes. Immediate, once the group is at its limit.
//! - **cgroup v1 `memory.pressure_level`**: an `eventfd` registered through
//!   `cgroup.event_control` is signalled as reclaim in the group reaches a level (a reclaim
//!   that finds nothing to take reports `critical` at once). The kernel delivers it from a
//!   work queue, and cgroup v1 has no `memory.high` to slow allocations before the limit:
//!   a group whose memory is all anonymous can be OOM-killed a few milliseconds after it
//!   reaches its limit, and in the cgroup test the watcher lost that race in 4 runs of 5.
//!   So the same `eventfd` can also be registered for `memory.usage_in_bytes` crossing a
//!   threshold below the limit, which the kernel checks as memory is charged:
//!   [`PressureSource::detect`](crate::PressureSource::detect) puts it 1/8 of the limit
//!   below, and then the pool is released before the group reaches its limit at all.
//!
//! Two pools naming the same source (same file, same parameters) share one descriptor;
//! at most [`MAX_PRESSURE_SOURCES`] distinct sources are watched at once. An event from any source
//! concerns every watching pool: they all live in this process, which is what the kernel
//! is short of memory for.
//!
//! # What an event does
//! For every watching pool, on the watcher thread: pressure mode on (the pool's advice
//! becomes `MADV_DONTNEED`, whatever its configured hint mode), then
//! `release_idle(0)`: every cache the pool can reach is drained and every unhinted free
//! block is given back at once, however warm, **down to order 0**. Blocks below the hint
//! order are advised with `MADV_DONTNEED` too, which splits the transparent huge pages
//! they sit in: under pressure the kernel is about to reclaim page cache or kill a task,
//! and a refault of a 4 KiB page (about 1.5 µs) is cheap next to either; small free blocks
//! add up (a shard caches up to about 9 MiB of them, and each CPU's cache 8 MiB). Blocks
//! the pool already gave back with `MADV_FREE` are left as they are: the kernel drops
//! lazily freed pages first when it reclaims, without writing them anywhere.
//!
//! # How long pressure lasts
//! Pressure is on from an event until a *settle period* passes without another: two
//! windows for a PSI trigger (it fires at most once per window while the stall goes on,
//! so one quiet window may be timing), [`DEFAULT_PRESSURE_SETTLE`](crate::DEFAULT_PRESSURE_SETTLE)
//! (1 s) for cgroup sources, which report every reclaim that reaches them. Every further
//! event releases again (what was freed meanwhile), and extends the period. When it ends,
//! pools go back to their configured advice.
//!
//! # What it costs when idle
//! Nothing: the thread sleeps in `poll` on its sources and an `eventfd` with no timeout;
//! it wakes only for an event or a request (a pool starting or stopping to watch). A
//! timeout is used only while pressure lasts, to notice its end. The kernel side: a PSI
//! trigger costs the kernel a check per window while there is any memory stall at all
//! (for unprivileged 2 s windows, in the averaging work that runs anyway); `memory.events`
//! and `memory.pressure_level` cost nothing until they fire.
//!
//! # Starting and stopping
//! As for the hinter (see `pool::hinter`): one thread per process (`pagepool-pressure`;
//! `/proc` shows the first 15 bytes, `pagepool-pressu`),
//! started by the first pool that watches and stopped (joined) when the last one stops or
//! leaves the registry; start, stop and leave are linearisable under the registry lock,
//! with the thread marked spawning or stopping while the lock is dropped for the spawn or
//! the join, and nothing allocated under the lock (sources are opened before it is taken
//! and closed after it is dropped). While the thread runs only it closes a source nobody
//! watches any more, so it never polls a descriptor number that was closed and reused. A
//! pool that stops watching waits while the thread releases it.
//!
//! # fork
//! The child has no watcher thread. Its fork handler forgets the parent's thread, closes
//! the child's copies of the sources (the parent's PSI triggers and cgroup registrations
//! live on in the parent's descriptors), and every pool of the child stops watching and
//! leaves pressure mode until asked again.
//!
//! Compiled out under loom and Miri (system calls); the counters stay.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::PoolCore;

#[cfg(not(any(loom, miri)))]
mod watcher;
#[cfg(not(any(loom, miri)))]
pub(super) use watcher::{EntryWatch, Watch, forget_in_child};

/// The most distinct pressure sources watched at once in a process.
pub const MAX_PRESSURE_SOURCES: usize = 8;

/// A pool's pressure counters, read without locks by `stats()`.
#[derive(Debug, Default)]
pub(crate) struct PressureCounters {
    /// The pool watches (set and cleared under the registry lock).
    pub(crate) watching: AtomicBool,
    /// Releases the watcher ran on this pool, one per pressure event.
    pub(crate) events: AtomicU64,
    /// Bytes those releases advised.
    pub(crate) bytes_released: AtomicU64,
}

impl PoolCore {
    /// Whether the pool is in pressure mode (advice `MADV_DONTNEED`).
    pub(crate) fn under_pressure(&self) -> bool {
        self.under_pressure.load(Ordering::Relaxed)
    }
}
