//! Layer 0: the operating system. Everything that makes a system call lives here.
//!
//! - [`mapping`]: the region (one private anonymous `MAP_NORESERVE` mapping) and the
//!   out-of-band metadata arrays, mapped straight from the OS so that a pool used as the
//!   global allocator never allocates through itself while it sets up.
//! - [`advice`]: `madvise` and `process_madvise`, behind the [`advice::Advisor`] trait.
//! - [`machine`]: physical memory and CPU counts.
//! - [`memory`]: honest process memory figures (`Rss - LazyFree`, minor faults).
//! - `pressure`: memory pressure events (PSI triggers, cgroup v2 `memory.events`, cgroup v1
//!   `memory.pressure_level`, `inotify` for tests) as descriptors to `poll` (not built
//!   under loom and Miri).
//! - `cgroup`: where the process's memory cgroups are, and whether they have a limit (not
//!   built under loom and Miri).
//!
//! May call: `sync` only. Knows nothing of blocks, shards or pools.

pub(crate) mod advice;
#[cfg(not(any(loom, miri)))]
pub(crate) mod cgroup;
pub(crate) mod machine;
pub(crate) mod mapping;
pub(crate) mod memory;
#[cfg(not(any(loom, miri)))]
pub(crate) mod pressure;
