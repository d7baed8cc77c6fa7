//! Configuration: the builder, its defaults and why they were chosen.
//!
//! Every setter is a `const fn`, so a `#[global_allocator]` static can carry a whole
//! configuration (see [`PoolAlloc::with_config`](crate::PoolAlloc::with_config)).

use std::time::Duration;

use crate::error::BuildError;
use crate::os::advice::Advisor;
pub use crate::os::advice::HintMode;
pub use crate::os::mapping::Backing;
use crate::{FRAME_SIZE, MAX_SHARDS, MAX_SUPPORTED_ORDER};

mod pressure;
pub use pressure::{
    DEFAULT_PRESSURE_SETTLE, DEFAULT_PSI_STALL, DEFAULT_PSI_WINDOW, PSI_MAX_WINDOW, PSI_MIN_WINDOW,
    PressureLevel, PressureSource,
};

/// The longest `hint_delay` or `hint_interval` a pool accepts: 24 days. Free times are
/// kept as 32-bit millisecond stamps, whose differences are exact up to 24.8 days.
pub const MAX_HINT_DURATION: Duration = Duration::from_secs(24 * 24 * 3600);

/// Default bytes of free blocks a CPU's cache may hold: 8 MiB (with 4 MiB chunks, up to
/// 64 blocks of 4 KiB and at least one of 2 MiB).
pub const DEFAULT_CPU_CACHE_BYTES: usize = 8 << 20;

/// The most blocks one hinting batch takes (`IOV_MAX`).
const MAX_HINT_BATCH: usize = 1024;

/// Default largest block: order 10, a 4 MiB block. Two transparent huge pages per chunk,
/// so hinting whole 2 MiB blocks never has to split a chunk's metadata.
pub const DEFAULT_MAX_ORDER: u8 = 10;

/// Which free block an allocation takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocPolicy {
    /// Unhinted (resident) blocks first, splitting a larger unhinted block before touching
    /// a hinted one; hinted blocks next; known-zero blocks last. Freed blocks are reused
    /// hot-first. This is the point of the crate.
    PreferUnhinted,
    /// One first-in, first-out queue per order that ignores hint state: the block free the
    /// longest goes first. A baseline to measure the preference against.
    Fifo,
}

/// Which per-CPU cache implementation a pool uses (see [`PoolBuilder::cpu_cache`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuCacheMode {
    /// Restartable sequences where the kernel and glibc provide them, the portable
    /// implementation otherwise. The environment variable `PAGEPOOL_CPU_CACHE` (`rseq`,
    /// `portable` or `off`) overrides it at build time, for operators and test runs.
    Auto,
    /// Restartable sequences (Linux `rseq(2)`): no lock and no atomic read-modify-write
    /// on the fast path. `build` fails where the process cannot use them.
    Rseq,
    /// A per-CPU lock taken with one atomic swap, the CPU picked by `sched_getcpu`.
    Portable,
    /// No per-CPU caches: every allocation and free takes a shard lock.
    Off,
}

impl CpuCacheMode {
    /// `Auto` resolved through `PAGEPOOL_CPU_CACHE`; the others as they are.
    pub(crate) fn resolve(self) -> Self {
        if self != Self::Auto {
            return self;
        }
        match env_var(c"PAGEPOOL_CPU_CACHE") {
            Some(b"rseq") => Self::Rseq,
            Some(b"portable") => Self::Portable,
            Some(b"off") => Self::Off,
            _ => Self::Auto,
        }
    }
}

/// An environment variable's bytes, read without allocating (pools are built inside
/// `malloc` when they serve as the global allocator).
fn env_var(name: &std::ffi::CStr) -> Option<&'static [u8]> {
    #[cfg(any(loom, miri))]
    {
        let _ = name;
        None
    }
    #[cfg(not(any(loom, miri)))]
    {
        // SAFETY: `name` is a NUL-terminated string; getenv returns null or a pointer to
        // a NUL-terminated value that lives as long as the environment is not changed.
        let value = unsafe { libc::getenv(name.as_ptr()) };
        if value.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated, see above.
        Some(unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes())
    }
}

/// Hinting settings. See [`PoolBuilder`] for the setters and defaults.
#[derive(Clone, Copy)]
pub(crate) struct HintConfig {
    pub(crate) thread: bool,
    pub(crate) min_order: Option<u8>,
    pub(crate) idle_min_order: Option<u8>,
    pub(crate) delay: Duration,
    pub(crate) pass_bytes: usize,
    pub(crate) batch_blocks: usize,
    pub(crate) interval: Duration,
    pub(crate) high_water: usize,
    pub(crate) mode: HintMode,
    pub(crate) advisor: Option<&'static dyn Advisor>,
}

/// A pool configuration under construction. Start from [`PagePool::builder`](crate::PagePool::builder).
///
/// # Example
/// ```
/// use std::time::Duration;
/// let pool = pagepool::PagePool::builder()
///     .capacity(64 << 20)
///     .max_order(9)
///     .shards(2)
///     .hint_thread(false)
///     .hint_delay(Duration::from_millis(500))
///     .build()?;
/// assert_eq!(pool.capacity(), 64 << 20);
/// # Ok::<(), pagepool::BuildError>(())
/// ```
#[derive(Clone, Copy)]
pub struct PoolBuilder {
    pub(crate) capacity: Option<usize>,
    pub(crate) max_order: u8,
    pub(crate) shards: Option<usize>,
    pub(crate) backing: Backing,
    pub(crate) huge_pages: bool,
    pub(crate) policy: AllocPolicy,
    pub(crate) hint: HintConfig,
    pub(crate) capture: bool,
    pub(crate) capture_min_order: Option<u8>,
    pub(crate) capture_reserve: bool,
    pub(crate) cache_blocks: u32,
    pub(crate) keep_chunks: u32,
    pub(crate) cpu_cache: CpuCacheMode,
    pub(crate) cpu_cache_bytes: usize,
    pub(crate) resident_free_limit: Option<usize>,
}

impl std::fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("capacity", &self.capacity)
            .field("max_order", &self.max_order)
            .field("shards", &self.shards)
            .field("backing", &self.backing)
            .field("policy", &self.policy)
            .field("hint_mode", &self.hint.mode)
            .finish_non_exhaustive()
    }
}

impl Default for PoolBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PoolBuilder {
    /// The defaults, as listed on each setter.
    pub const fn new() -> Self {
        Self {
            capacity: None,
            max_order: DEFAULT_MAX_ORDER,
            shards: None,
            backing: Backing::Mmap,
            huge_pages: false,
            policy: AllocPolicy::PreferUnhinted,
            hint: HintConfig {
                thread: true,
                min_order: None,
                idle_min_order: None,
                delay: Duration::from_secs(1),
                pass_bytes: 64 << 20,
                batch_blocks: 32,
                interval: Duration::from_millis(100),
                high_water: 1,
                mode: HintMode::Free,
                advisor: None,
            },
            capture: true,
            capture_min_order: None,
            capture_reserve: true,
            cache_blocks: 32,
            keep_chunks: 2,
            cpu_cache: CpuCacheMode::Auto,
            cpu_cache_bytes: DEFAULT_CPU_CACHE_BYTES,
            resident_free_limit: None,
        }
    }

    /// Bytes of address space to reserve. Default: the machine's physical memory, rounded
    /// down to whole maximum-order blocks. The reservation is `MAP_NORESERVE`, so it costs
    /// no memory until blocks are touched; a pool cannot usefully hand out more than the
    /// machine has, and the frame table (16 bytes per 4 KiB frame, 0.4 %) is also only
    /// touched where blocks are used. The capacity is rounded down to whole chunks.
    pub const fn capacity(mut self, bytes: usize) -> Self {
        self.capacity = Some(bytes);
        self
    }

    /// The largest block is `4 KiB << max_order`. Default 10 (4 MiB); at most
    /// [`MAX_SUPPORTED_ORDER`]. Each shard owns whole blocks of this size ("chunks").
    ///
    /// Blocks of the largest order (whole chunks) never go through the per-CPU caches:
    /// each one takes a shard lock. A pool that mostly hands out blocks of one size should
    /// have a larger `max_order` than that size: 2 MiB blocks from a pool of 4 MiB chunks
    /// come from the caches (about 7 ns for an allocation and free on this project's
    /// machine), from a pool of 2 MiB chunks from the shards (about 60 ns). Caching whole
    /// chunks too was tried: that case ran at the cached speed, but a random mix of 4 KiB
    /// to 2 MiB blocks on two threads lost 12 % with two shards and 63 % with one (whole
    /// chunks are what large requests and the shards' exchange of chunks compete for).
    pub const fn max_order(mut self, order: u8) -> Self {
        self.max_order = order;
        self
    }

    /// Number of buddy allocators. Default: `available_parallelism()`, one per CPU; a
    /// thread uses the shard of the CPU it runs on.
    pub const fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Where memory comes from. Default [`Backing::Mmap`].
    pub const fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// Ask for transparent huge pages on the region (`MADV_HUGEPAGE`). Default off: with
    /// huge pages a single touched 4 KiB block can make 2 MiB resident; turn it on when
    /// most blocks are large.
    pub const fn huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }

    /// Which free block an allocation takes. Default [`AllocPolicy::PreferUnhinted`].
    pub const fn policy(mut self, policy: AllocPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Start the background hinter thread (`pagepool-hinter`) with the pool. Default on.
    /// Without it, call [`PagePool::hint_now`](crate::PagePool::hint_now) yourself.
    pub const fn hint_thread(mut self, on: bool) -> Self {
        self.hint.thread = on;
        self
    }

    /// Smallest order the hinter gives back. Default 9 (2 MiB), so a transparent huge page
    /// is never split; clamped to `max_order`. Lower it for pools with small maximum blocks.
    pub const fn hint_min_order(mut self, order: u8) -> Self {
        self.hint.min_order = Some(order);
        self
    }

    /// Smallest order the hinter gives back once the pool has been idle for the hint
    /// delay: no allocation or free on any CPU's cache since. Default: the hint order (no
    /// difference). At rest, such a pool also gives back the pages of its frame table that
    /// only whole hinted chunks use (16 bytes per 4 KiB frame a burst wrote), as
    /// [`release_idle`](crate::PagePool::release_idle) does on demand. Giving back small
    /// blocks while a program churns costs it refaults and, with several threads, a TLB
    /// shootdown per `madvise`; once it rests, scattered small free blocks are memory
    /// nobody is about to use. Clamped to the hint order. Needs the per-CPU caches (which
    /// see the activity): with them off it is the hint order. What counts as activity is
    /// what those caches see: a program that allocates only
    /// through a [`LocalCache`](crate::LocalCache), `alloc_on`, or orders too large to
    /// cache looks idle to it.
    ///
    /// [`PoolAlloc::new`](crate::PoolAlloc::new) uses 16 KiB (order 2), its smallest slab,
    /// under a 64 KiB hint order: measured with `examples/slab_fragmentation.rs`, 174-211
    /// MiB resident after 3 s idle with 97 MiB live against 495 MiB with 64 KiB alone, while a
    /// random mix of 4 KiB-2 MiB blocks on two threads ran at 13.5 million operations per
    /// second when 16 KiB blocks were hinted while it ran, and 32.8 million with 64 KiB.
    pub const fn idle_hint_min_order(mut self, order: u8) -> Self {
        self.hint.idle_min_order = Some(order);
        self
    }

    /// How long a block must stay free before it is cold enough to hint. Default 1 s
    /// (Linux reports after 2 s, mimalloc purges after 1 s): a block reused within the
    /// delay never pays a refault. At most [`MAX_HINT_DURATION`] (24 days); `build` rejects
    /// more.
    pub const fn hint_delay(mut self, delay: Duration) -> Self {
        self.hint.delay = delay;
        self
    }

    /// Bytes hinted per pass at most. Default 64 MiB, the batch of the free page hinting
    /// patches that Linux's free page reporting grew from: at the default interval a 1 GiB
    /// burst goes back in about 1.6 s of passes. A pass always hints at least one block,
    /// even one larger than the budget, so any budget makes progress; `build` rejects 0.
    pub const fn hint_pass_bytes(mut self, bytes: usize) -> Self {
        self.hint.pass_bytes = bytes;
        self
    }

    /// Blocks isolated under one lock hold. Default 32 (Linux's `PAGE_REPORTING_CAPACITY`);
    /// bounds how long an allocation can wait behind the hinter. 1 to 1024 (`IOV_MAX`,
    /// the most ranges one `process_madvise` call takes); `build` rejects the rest.
    pub const fn hint_batch_blocks(mut self, blocks: usize) -> Self {
        self.hint.batch_blocks = blocks;
        self
    }

    /// Pause between passes while work remains. Default 100 ms. At most
    /// [`MAX_HINT_DURATION`]; `build` rejects more.
    pub const fn hint_interval(mut self, interval: Duration) -> Self {
        self.hint.interval = interval;
        self
    }

    /// Wake the hinter when a shard holds this many unhinted free blocks at or above the
    /// hint order. Default 1: any such block is eventually returned. A larger mark wakes
    /// the thread less often but leaves up to `mark - 1` blocks per shard resident.
    pub const fn hint_high_water(mut self, blocks: usize) -> Self {
        self.hint.high_water = blocks;
        self
    }

    /// A budget for free memory that stays resident: the hinter keeps the pool's free but
    /// resident bytes (its caches included) at or below `bytes`, whatever `hint_delay`
    /// says, giving back the oldest of the largest blocks first (blocks of any order,
    /// warm or not, once the cold ones are not enough). So an operator sets bytes, not
    /// milliseconds. 0: every free block is given back on the next pass after its free
    /// (at most `hint_interval` later). Default: no budget, only `hint_delay`. Needs the
    /// hinter thread (or calls of `release_idle`). `build` rejects a budget above the
    /// capacity, which could never act.
    pub const fn resident_free_limit(mut self, bytes: usize) -> Self {
        self.resident_free_limit = Some(bytes);
        self
    }

    /// `MADV_FREE` (default) or `MADV_DONTNEED`.
    pub const fn hint_mode(mut self, mode: HintMode) -> Self {
        self.hint.mode = mode;
        self
    }

    /// Replace the `madvise` calls (testing hook, e.g. to inject failures).
    #[doc(hidden)]
    pub const fn advisor(mut self, advisor: &'static dyn Advisor) -> Self {
        self.hint.advisor = Some(advisor);
        self
    }

    /// Let frees hand coalesced blocks to waiting large requests. Default on.
    pub const fn capture(mut self, on: bool) -> Self {
        self.capture = on;
        self
    }

    /// Smallest order that waits and captures. Default 3, the kernel's
    /// `PAGE_ALLOC_COSTLY_ORDER` (smaller blocks are plentiful after any free), or
    /// `max_order` if that is smaller. `build` rejects an order above `max_order`, which
    /// would switch capture off without saying so (use [`capture`](Self::capture) for that).
    pub const fn capture_min_order(mut self, order: u8) -> Self {
        self.capture_min_order = Some(order);
        self
    }

    /// Let a waiting request reserve the region of its order closest to whole, so that
    /// frees inside it merge there instead of feeding other allocations. Default on (with
    /// capture). While a request waits, allocations cannot take the free pieces of its
    /// region: at most one block of the request's order is held back per waiter. Off, a
    /// waiter gets a block only when all its pieces happen to be free at once.
    pub const fn capture_reserve(mut self, on: bool) -> Self {
        self.capture_reserve = on;
        self
    }

    /// Freed blocks each shard keeps unmerged, per order, for fast reuse (Linux's per-CPU
    /// lists): `blocks` for orders 0..=3, half as many for each order above, at least one,
    /// none at the maximum order. Default 32 (at most about 9 MiB per shard with 4 MiB
    /// chunks); 0 disables the cache. Half is merged back when a list overflows; all of it
    /// when an allocation would otherwise fail, when capture waits, and before each
    /// hinting pass, so cached memory never escapes hinting for long.
    pub const fn cache_blocks(mut self, blocks: u32) -> Self {
        self.cache_blocks = blocks;
        self
    }

    /// Per-CPU caches of free blocks in front of the shards (Linux's per-CPU page lists):
    /// which implementation, or none. Default [`CpuCacheMode::Auto`].
    pub const fn cpu_cache(mut self, mode: CpuCacheMode) -> Self {
        self.cpu_cache = mode;
        self
    }

    /// Bytes of free blocks each CPU's cache may hold, all orders together. Default
    /// [`DEFAULT_CPU_CACHE_BYTES`] (8 MiB): each order below the largest, up to blocks of
    /// a quarter of the budget (2 MiB of 8 MiB), gets one block while the budget allows
    /// (smallest first), then an equal share of the rest, at most 64 blocks per order.
    /// Larger blocks always go to the shards. A cache idle for `hint_delay` is drained by
    /// the hinter, so this bounds only what busy CPUs hold. 0 turns the caches off.
    ///
    /// A small pool gets less: every possible CPU's share of half the capacity at most
    /// (a 64 MiB pool on a machine with 8 possible CPUs: 4 MiB per CPU), so the caches
    /// never hold most of the pool.
    pub const fn cpu_cache_bytes(mut self, bytes: usize) -> Self {
        self.cpu_cache_bytes = bytes;
        self
    }

    /// Whole free chunks a shard keeps before giving surplus ones back to the shared pool.
    /// Default 2: enough that a shard alternating between splitting and merging one chunk
    /// does not bounce it through the shared lock.
    pub const fn keep_chunks(mut self, chunks: u32) -> Self {
        self.keep_chunks = chunks;
        self
    }

    /// Checks the settings and fills in machine-dependent defaults.
    pub(crate) fn resolve(&self) -> Result<Resolved, BuildError> {
        if self.max_order > MAX_SUPPORTED_ORDER {
            return Err(BuildError::MaxOrderTooLarge {
                max_order: self.max_order,
                limit: MAX_SUPPORTED_ORDER,
            });
        }
        let chunk_bytes = FRAME_SIZE << self.max_order;
        let capacity = match self.capacity {
            Some(0) => return Err(BuildError::ZeroCapacity),
            Some(bytes) => bytes,
            None => crate::os::machine::physical_memory().max(chunk_bytes),
        };
        if capacity < chunk_bytes {
            return Err(BuildError::CapacityTooSmall {
                capacity,
                min: chunk_bytes,
            });
        }
        let chunks = capacity / chunk_bytes;
        let frames = chunks as u64 * (1u64 << self.max_order);
        if frames >= 1 << 32 {
            return Err(BuildError::CapacityTooLarge { capacity });
        }
        let shards = match self.shards {
            Some(0) => return Err(BuildError::ZeroShards),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if shards > MAX_SHARDS {
            return Err(BuildError::TooManyShards { shards });
        }
        let hint_min_order = self.hint.min_order.unwrap_or(9).min(self.max_order);
        let idle_hint_min_order = self
            .hint
            .idle_min_order
            .map_or(hint_min_order, |o| o.min(hint_min_order));
        let invalid = |setting, allowed| Err(BuildError::InvalidSetting { setting, allowed });
        if !(1..=MAX_HINT_BATCH).contains(&self.hint.batch_blocks) {
            return invalid("hint_batch_blocks", "1 to 1024 blocks");
        }
        if self.hint.high_water == 0 {
            return invalid("hint_high_water", "at least 1 block");
        }
        if self.hint.pass_bytes == 0 {
            return invalid("hint_pass_bytes", "at least 1 byte");
        }
        if self.hint.delay > MAX_HINT_DURATION {
            return invalid("hint_delay", "at most 24 days (MAX_HINT_DURATION)");
        }
        if self.hint.interval > MAX_HINT_DURATION {
            return invalid("hint_interval", "at most 24 days (MAX_HINT_DURATION)");
        }
        if self
            .resident_free_limit
            .is_some_and(|limit| limit > chunks * chunk_bytes)
        {
            return invalid("resident_free_limit", "at most the pool's capacity");
        }
        let capture_min_order = match self.capture_min_order {
            None => 3.min(self.max_order),
            Some(order) if order <= self.max_order => order,
            Some(_) => return invalid("capture_min_order", "an order up to max_order"),
        };
        Ok(Resolved {
            capacity: chunks * chunk_bytes,
            chunks: chunks as u32,
            max_order: self.max_order,
            shards,
            hint_min_order,
            idle_hint_min_order,
            capture_min_order,
        })
    }
}

/// A checked configuration with every default filled in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved {
    pub(crate) capacity: usize,
    pub(crate) chunks: u32,
    pub(crate) max_order: u8,
    pub(crate) shards: usize,
    pub(crate) hint_min_order: u8,
    /// At most `hint_min_order`: the smallest order hinted once the pool is idle.
    pub(crate) idle_hint_min_order: u8,
    pub(crate) capture_min_order: u8,
}
