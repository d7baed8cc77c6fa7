//! [`PoolAlloc`]: the pool as a process's global allocator.
//!
//! # Routing
//! - Requests smaller than [`DEFAULT_MIN_POOL_SIZE`] (2 KiB, half a page) go to the
//!   fallback allocator (`System` by default). The pool's smallest block is 4 KiB; below
//!   half a page more than half of every block would be waste, and `malloc`'s size classes
//!   serve small objects better than any page allocator. Change it with
//!   [`PoolAlloc::min_pool_size`].
//! - Requests the pool cannot serve go to the fallback too: size or alignment above the
//!   largest block, or the pool exhausted, or the pool failed to initialise.
//! - `dealloc` and `realloc` decide by address: a pointer inside the pool's region is the
//!   pool's, anything else is the fallback's. Nothing is ever freed to the wrong allocator,
//!   whatever the layout says (a block shrunk in place below the threshold stays a pool
//!   block).
//!
//! # Initialisation
//! The pool is created on the first request that should go to it. A three-state atomic
//! (uninitialised, initialising, ready/failed) lets exactly one thread build it; others
//! spin with [`Backoff`] until it is ready. With [`Backing::Mmap`](crate::Backing::Mmap)
//! (the default) region, frame table and shard array are mapped with `mmap` directly, and
//! the shard count is read with `sched_getaffinity` instead of
//! `std::thread::available_parallelism` (which reads cgroup files into heap buffers), so
//! initialisation allocates nothing through the global allocator. Anything that still
//! allocates while the pool is being built on this thread (a heap-backed configuration,
//! say) is served by the fallback through the re-entrancy guard.
//!
//! # Re-entrancy
//! A `thread_local!` `Cell<bool>` with a `const` initialiser and no destructor marks a
//! thread that is inside the pool (building it, or holding its locks across `fork`).
//! Requests made by such a thread go straight to the fallback. Such a thread-local needs
//! no registration and is usable even while other thread-locals are being destroyed.
//! Nothing on the adapter's `alloc`/`dealloc`/`realloc` paths spawns threads, boxes
//! closures or touches lazily allocated thread-locals.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
use std::fmt;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use crossbeam_utils::{Backoff, CachePadded};

use crate::config::PoolBuilder;
use crate::error::{AllocError, BuildError};
use crate::frame_table::FreeClass;
use crate::hint;
use crate::pool::{HintReport, PoolCore};
use crate::shard::{Env, Locked};
use crate::stats::Stats;
use crate::{FRAME_SIZE, order_for};

/// Requests of at least this many bytes go to the pool: half a page. See the module docs.
pub const DEFAULT_MIN_POOL_SIZE: usize = FRAME_SIZE / 2;

/// The largest block of [`PoolAlloc::new`]: order 13, 32 MiB.
///
/// glibc's `malloc` serves requests above its mmap threshold with a private `mmap` and
/// unmaps them on free, so their memory goes back at once; the threshold adapts upwards to
/// at most 32 MiB, and below it freed memory stays in `malloc`'s heap. The pool covers
/// exactly that range and hands back what it holds through hinting. Larger requests go to
/// the fallback.
pub const GLOBAL_MAX_ORDER: u8 = 13;

const UNINIT: u8 = 0;
const INITIALISING: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;
/// Building the pool panicked: like FAILED, without a stored error.
const PANICKED: u8 = 4;

/// What [`PoolAlloc::init`] reports after building the pool panicked.
static INIT_PANICKED: BuildError = BuildError::InvalidSetting("building the pool panicked");

/// Marks the pool as failed if building it unwinds, so no thread spins on it forever.
struct InitUnwind<'a>(&'a AtomicU8);

impl Drop for InitUnwind<'_> {
    fn drop(&mut self) {
        self.0.store(PANICKED, Ordering::Release);
    }
}

thread_local! {
    /// Set while this thread is inside the pool; see the module docs. `const`-initialised
    /// and without `Drop`, so reading it never allocates or registers a destructor.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the thread as inside the pool until dropped; `None` if it already was.
struct Reentry;

impl Reentry {
    #[inline]
    fn enter() -> Option<Self> {
        IN_POOL.with(|inside| {
            if inside.replace(true) {
                None
            } else {
                Some(Reentry)
            }
        })
    }
}

impl Drop for Reentry {
    #[inline]
    fn drop(&mut self) {
        IN_POOL.with(|inside| inside.set(false));
    }
}

/// Counters of the adapter (relaxed atomics, updated only on the pool's paths: requests
/// below the threshold are not counted, to keep the small-object path free of shared
/// writes).
#[derive(Default)]
struct Counters {
    pool_allocs: AtomicU64,
    pool_frees: AtomicU64,
    zeroed_free: AtomicU64,
    too_large: AtomicU64,
    exhausted: AtomicU64,
    nested: AtomicU64,
    grown_in_place: AtomicU64,
    shrunk_in_place: AtomicU64,
    moved_within_pool: AtomicU64,
    moved_to_pool: AtomicU64,
    moved_to_fallback: AtomicU64,
}

impl Counters {
    const fn new() -> Self {
        Self {
            pool_allocs: AtomicU64::new(0),
            pool_frees: AtomicU64::new(0),
            zeroed_free: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
            nested: AtomicU64::new(0),
            grown_in_place: AtomicU64::new(0),
            shrunk_in_place: AtomicU64::new(0),
            moved_within_pool: AtomicU64::new(0),
            moved_to_pool: AtomicU64::new(0),
            moved_to_fallback: AtomicU64::new(0),
        }
    }
}

#[inline]
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counters of a [`PoolAlloc`], from [`PoolAlloc::stats`]. Requests below the threshold
/// go to the fallback uncounted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolAllocStats {
    /// Whether the pool is built and serving (false before the first pool-sized request,
    /// or if building it failed).
    pub pool_ready: bool,
    /// Whether new requests may go to the pool (see [`PoolAlloc::set_pool_enabled`]).
    pub pool_enabled: bool,
    /// Allocations served by the pool (`alloc`, `alloc_zeroed`, moves into the pool).
    pub pool_allocs: u64,
    /// Pool blocks freed by `dealloc` or by a `realloc` that moved them.
    pub pool_frees: u64,
    /// `alloc_zeroed` calls that got a known-zero block and skipped the `memset`.
    pub zeroed_without_memset: u64,
    /// Pool-sized requests sent to the fallback because size or alignment exceed the
    /// largest block.
    pub too_large: u64,
    /// Requests sent to the fallback because the pool had no block left.
    pub exhausted: u64,
    /// Requests made from inside the pool (while building it, or during `fork`) and
    /// served by the fallback.
    pub nested: u64,
    /// `realloc`s that grew a pool block in place (its buddies were free).
    pub grown_in_place: u64,
    /// `realloc`s that shrank a pool block in place.
    pub shrunk_in_place: u64,
    /// `realloc`s that moved a pool block to another pool block.
    pub moved_within_pool: u64,
    /// `realloc`s that moved a fallback allocation into the pool (growing past the
    /// threshold).
    pub moved_to_pool: u64,
    /// `realloc`s that moved a pool block to the fallback (too large, or pool exhausted).
    pub moved_to_fallback: u64,
}

impl fmt::Display for PoolAllocStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "PoolAlloc: pool {}{}; {} pool allocs ({} zeroed without memset), {} pool frees",
            if self.pool_ready {
                "ready"
            } else {
                "not built"
            },
            if self.pool_enabled { "" } else { " (disabled)" },
            self.pool_allocs,
            self.zeroed_without_memset,
            self.pool_frees,
        )?;
        writeln!(
            f,
            "  to fallback: {} too large, {} exhausted, {} nested",
            self.too_large, self.exhausted, self.nested
        )?;
        write!(
            f,
            "  realloc: {} grown in place, {} shrunk in place, {} moved within pool, {} into pool, {} out of pool",
            self.grown_in_place,
            self.shrunk_in_place,
            self.moved_within_pool,
            self.moved_to_pool,
            self.moved_to_fallback
        )
    }
}

/// A [`GlobalAlloc`] that serves requests of half a page and more from a page pool (the
/// allocator inside [`PagePool`](crate::PagePool), held inline in the adapter) and
/// everything else from a fallback allocator `F` ([`System`] by default). With the
/// `allocator-api2` feature it is also an `allocator_api2::alloc::Allocator`.
///
/// ```
/// use pagepool::PoolAlloc;
///
/// #[global_allocator]
/// static GLOBAL: PoolAlloc = PoolAlloc::new();
///
/// fn main() {
///     // Optional: give free memory back to the OS in the background.
///     GLOBAL.start_hinter().expect("spawn the hinter thread");
///     let big = vec![7u8; 8 << 20]; // from the pool
///     let small = String::from("hi"); // from the system allocator
///     assert!(GLOBAL.contains(big.as_ptr()) && !GLOBAL.contains(small.as_ptr()));
/// }
/// ```
///
/// # Configuration
/// [`new`](Self::new) uses [`PoolBuilder::new`] with `max_order(`[`GLOBAL_MAX_ORDER`]`)`:
/// 32 MiB blocks (larger requests go to the fallback), a capacity equal to physical memory
/// (reserved with `MAP_NORESERVE`, so it costs nothing until touched), one shard per CPU in
/// the thread's affinity mask. [`with_config`](Self::with_config) takes any builder; every
/// builder setter is a `const fn`:
///
/// ```
/// use pagepool::{PoolAlloc, PoolBuilder};
/// static A: PoolAlloc = PoolAlloc::with_config(PoolBuilder::new().capacity(1 << 30).max_order(12))
///     .min_pool_size(8192);
/// ```
///
/// `hint_thread` in the builder is ignored: a global allocator must never spawn a thread
/// inside `alloc`. Start the hinter from `main` with [`start_hinter`](Self::start_hinter),
/// or call [`hint_now`](Self::hint_now) when convenient.
///
/// # Realloc and zeroing
/// `realloc` grows a pool block in place when the buddies it needs are free, shrinks in
/// place by splitting, and moves only when it must: to another block, into the pool when a
/// fallback allocation grows past the threshold, or out of it when it outgrows the largest
/// block. `alloc_zeroed` prefers known-zero blocks (never touched, or given back with
/// `MADV_DONTNEED`) and then skips the `memset`.
///
/// # fork
/// After `fork` the child has only the thread that forked: the hinter thread does not exist
/// there. Allocation keeps working in the child; [`start_hinter`](Self::start_hinter)
/// notices the changed process id and starts a new hinter (and
/// [`hinter_running`](Self::hinter_running) reports `false` until then). Blocks the parent's
/// hinter had isolated for a system call at the moment of the fork stay isolated (unused)
/// in the child: at most one batch (`hint_batch_blocks`, 32 by default).
///
/// Locks: if another thread held a shard lock at the moment of the fork, the child would
/// inherit it locked forever. [`install_fork_handlers`](Self::install_fork_handlers)
/// (done by `start_hinter`) registers `pthread_atfork` handlers that take every shard lock
/// before the fork and release them in parent and child afterwards, like glibc's `malloc`
/// does with its arenas. Without them, fork only from a process where no other thread
/// allocates, or exec right away. A thread that forks while inside `start_hinter` or
/// `stop_hinter` on another thread can leave the child unable to restart the hinter.
pub struct PoolAlloc<F: GlobalAlloc = System> {
    config: PoolBuilder,
    min_size: usize,
    fallback: F,
    state: AtomicU8,
    enabled: AtomicBool,
    /// The process that started building the pool (fork detection while initialising).
    init_pid: AtomicU32,
    core: UnsafeCell<MaybeUninit<PoolCore>>,
    error: UnsafeCell<MaybeUninit<BuildError>>,
    hinter: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The process the hinter thread runs in; 0 when none was started.
    hinter_pid: AtomicU32,
    fork_handlers: AtomicBool,
    counters: CachePadded<Counters>,
}

// SAFETY: `core` and `error` are written once, by the thread that wins the UNINIT ->
// INITIALISING transition, before a release store of READY or FAILED; every read follows
// an acquire load of that state. PoolCore is Sync (it is shared through Arc by PagePool),
// the other fields are atomics or a Mutex, and the fallback is shared only if it is Sync.
unsafe impl<F: GlobalAlloc + Sync> Sync for PoolAlloc<F> {}
// SAFETY: as above; moving the adapter moves the fallback, hence `F: Send`.
unsafe impl<F: GlobalAlloc + Send> Send for PoolAlloc<F> {}

impl PoolAlloc<System> {
    /// An adapter with the default configuration and [`System`] as fallback. See the type
    /// docs for the defaults.
    pub const fn new() -> Self {
        Self::with_config(PoolBuilder::new().max_order(GLOBAL_MAX_ORDER))
    }

    /// An adapter with `config` and [`System`] as fallback.
    pub const fn with_config(config: PoolBuilder) -> Self {
        Self::with_fallback(config, System)
    }
}

impl Default for PoolAlloc<System> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: GlobalAlloc> PoolAlloc<F> {
    /// An adapter with `config` and `fallback` for the requests the pool does not serve.
    pub const fn with_fallback(config: PoolBuilder, fallback: F) -> Self {
        Self {
            config: config.hint_thread(false),
            min_size: DEFAULT_MIN_POOL_SIZE,
            fallback,
            state: AtomicU8::new(UNINIT),
            enabled: AtomicBool::new(true),
            init_pid: AtomicU32::new(0),
            core: UnsafeCell::new(MaybeUninit::uninit()),
            error: UnsafeCell::new(MaybeUninit::uninit()),
            hinter: Mutex::new(None),
            hinter_pid: AtomicU32::new(0),
            fork_handlers: AtomicBool::new(false),
            counters: CachePadded::new(Counters::new()),
        }
    }

    /// Requests of at least `bytes` go to the pool (default [`DEFAULT_MIN_POOL_SIZE`],
    /// 2 KiB); smaller ones go to the fallback. Values below 1 are treated as 1.
    pub const fn min_pool_size(mut self, bytes: usize) -> Self {
        self.min_size = if bytes == 0 { 1 } else { bytes };
        self
    }

    /// The fallback allocator.
    pub fn fallback(&self) -> &F {
        &self.fallback
    }

    /// The configuration the pool is (or will be) built with.
    pub fn config(&self) -> &PoolBuilder {
        &self.config
    }

    // --- the pool's life cycle ---------------------------------------------------------

    /// The pool, if built.
    #[inline]
    fn ready_core(&self) -> Option<&PoolCore> {
        if self.state.load(Ordering::Acquire) == READY {
            // SAFETY: READY is stored (release) only after `core` was written, and the
            // core is never written again while `self` lives.
            Some(unsafe { (*self.core.get()).assume_init_ref() })
        } else {
            None
        }
    }

    /// The pool, building it if needed. The caller must be inside a [`Reentry`] guard, so
    /// whatever building allocates goes to the fallback.
    #[inline]
    fn core_or_init(&self) -> Option<&PoolCore> {
        match self.ready_core() {
            Some(core) => Some(core),
            None => self.init_slow(),
        }
    }

    #[cold]
    fn init_slow(&self) -> Option<&PoolCore> {
        let backoff = Backoff::new();
        let mut spins = 0u32;
        loop {
            match self.state.compare_exchange(
                UNINIT,
                INITIALISING,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return self.initialise(),
                Err(READY) => return self.ready_core(),
                Err(FAILED | PANICKED) => return None,
                Err(_) => {
                    // Another thread builds the pool; building maps memory and takes
                    // microseconds, so spin, then yield.
                    if backoff.is_completed() {
                        std::thread::yield_now();
                        spins += 1;
                        if spins.is_multiple_of(64) {
                            self.recover_forked_init();
                        }
                    } else {
                        backoff.snooze();
                    }
                }
            }
        }
    }

    /// A child forked while the parent was building the pool: nobody will finish it here.
    /// Start over (what the parent had mapped stays mapped and unused in the child).
    #[cold]
    fn recover_forked_init(&self) {
        let builder = self.init_pid.load(Ordering::Acquire);
        if builder != 0 && builder != current_pid() {
            let _ = self.state.compare_exchange(
                INITIALISING,
                UNINIT,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    #[cold]
    fn initialise(&self) -> Option<&PoolCore> {
        self.init_pid.store(current_pid(), Ordering::Release);
        let mut config = self.config.hint_thread(false);
        if config.shards.is_none() {
            config = config.shards(cpu_count());
        }
        let unwind = InitUnwind(&self.state);
        let built = PoolCore::new(&config);
        std::mem::forget(unwind);
        match built {
            Ok(core) => {
                // SAFETY: we won UNINIT -> INITIALISING, so no other thread reads or
                // writes `core` until the release store below.
                unsafe { (*self.core.get()).write(core) };
                self.state.store(READY, Ordering::Release);
                self.ready_core()
            }
            Err(err) => {
                // SAFETY: as above, for `error`, published by the FAILED store.
                unsafe { (*self.error.get()).write(err) };
                self.state.store(FAILED, Ordering::Release);
                None
            }
        }
    }

    /// Builds the pool now, if it is not built yet, instead of on the first pool-sized
    /// request, and reports why it could not be built. After a failure every request goes
    /// to the fallback (building is not retried): call this early in `main` to find out.
    ///
    /// # Errors
    /// The [`BuildError`] of the first attempt (for example `Map` when `mmap` is refused
    /// under a tight `ulimit -v`).
    pub fn init(&self) -> Result<(), &BuildError> {
        let built = match Reentry::enter() {
            Some(_guard) => self.core_or_init().is_some(),
            // Called from inside the pool on this thread (another atfork handler, say):
            // building here could wait for ourselves, so only report.
            None => self.ready_core().is_some(),
        };
        if built {
            return Ok(());
        }
        match self.state.load(Ordering::Acquire) {
            // SAFETY: FAILED is stored (release) only after `error` was written.
            FAILED => Err(unsafe { (*self.error.get()).assume_init_ref() }),
            PANICKED => Err(&INIT_PANICKED),
            // Re-entered from inside the pool on this thread: it is still being built.
            _ => Ok(()),
        }
    }

    /// The built pool, or why building it failed, or `None` if it is not built yet.
    fn built(&self) -> Option<Result<&PoolCore, &BuildError>> {
        match self.state.load(Ordering::Acquire) {
            // SAFETY: as in `ready_core`.
            READY => Some(Ok(unsafe { (*self.core.get()).assume_init_ref() })),
            // SAFETY: as in `init`.
            FAILED => Some(Err(unsafe { (*self.error.get()).assume_init_ref() })),
            PANICKED => Some(Err(&INIT_PANICKED)),
            _ => None,
        }
    }

    // --- routing -----------------------------------------------------------------------

    /// Whether `ptr` lies in the pool's region (so the pool, not the fallback, owns it).
    #[inline]
    pub fn contains(&self, ptr: *const u8) -> bool {
        self.ready_core().is_some_and(|core| core.contains(ptr))
    }

    /// Sends new requests to the pool (`true`, the default) or to the fallback only
    /// (`false`). Blocks already in the pool stay there and are freed to it. Meant for A/B
    /// measurements in one binary and for switching the pool off without a rebuild.
    pub fn set_pool_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// The order the pool would serve `(size, align)` with, if it should.
    #[inline]
    fn pool_order(&self, size: usize, align: usize) -> Option<u8> {
        if size < self.min_size || !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        match order_for(size, align) {
            Some(order) if order <= self.config.max_order => Some(order),
            _ => {
                bump(&self.counters.too_large);
                None
            }
        }
    }

    /// Allocates from the pool; `None` sends the request to the fallback.
    #[inline]
    fn alloc_pool(&self, order: u8, size: usize, zero: bool) -> Option<*mut u8> {
        let Some(_guard) = Reentry::enter() else {
            bump(&self.counters.nested);
            return None;
        };
        let core = self.core_or_init()?;
        match core.alloc_frame(order, zero, None) {
            Ok((idx, class)) => {
                let ptr = core.frame_ptr(idx).as_ptr();
                if zero {
                    if class == FreeClass::Zero {
                        bump(&self.counters.zeroed_free);
                    } else {
                        // SAFETY: the block was just handed to us and holds at least
                        // `size` bytes (its order was computed from `size`).
                        unsafe { ptr::write_bytes(ptr, 0, size) };
                    }
                }
                bump(&self.counters.pool_allocs);
                Some(ptr)
            }
            Err(AllocError::Exhausted { .. }) => {
                bump(&self.counters.exhausted);
                None
            }
            Err(_) => None,
        }
    }

    /// Frees a pool block by address.
    #[inline]
    fn free_pool(&self, core: &PoolCore, ptr: *mut u8) {
        let freed = core
            .frame_of(ptr)
            .and_then(|idx| core.free_frame(idx, None));
        match freed {
            Ok(_) => bump(&self.counters.pool_frees),
            Err(_) => fatal(b"pagepool: dealloc of a pointer that is not an allocated pool block (double free?)\n"),
        }
    }

    /// `realloc` of a pool block.
    ///
    /// # Safety
    /// `ptr` is a live pool block allocated with `layout`; `new_size` is non-zero and,
    /// rounded up to `layout.align()`, does not overflow `isize`.
    unsafe fn realloc_pool(
        &self,
        core: &PoolCore,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        let align = layout.align();
        // The order a block has always follows from its current layout: `alloc` and every
        // in-place resize below use `order_for(size, align)`.
        let old_order =
            order_for(layout.size(), align).expect("a pool block's layout has an order");
        let idx = match core.frame_of(ptr) {
            Ok(idx) => idx,
            Err(_) => fatal(b"pagepool: realloc of a pointer that is not a pool block\n"),
        };
        let new_order = order_for(new_size, align).filter(|&o| o <= core.max_order());
        if let Some(new_order) = new_order {
            if new_order == old_order {
                return ptr;
            }
            if new_order < old_order {
                core.shrink_frame(idx, old_order, new_order);
                bump(&self.counters.shrunk_in_place);
                return ptr;
            }
            if core.grow_frame(idx, old_order, new_order) {
                bump(&self.counters.grown_in_place);
                return ptr;
            }
            if let Some(new) = self.alloc_pool(new_order, new_size, false) {
                // SAFETY: both blocks are live, distinct, and hold at least
                // `layout.size()` bytes.
                unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size()) };
                self.free_pool(core, ptr);
                bump(&self.counters.moved_within_pool);
                return new;
            }
        }
        // Too large for the pool, or the pool is exhausted: move to the fallback.
        // SAFETY: the caller guarantees `new_size` with `align` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
        // SAFETY: `new_layout` has a non-zero size.
        let new = unsafe { self.fallback.alloc(new_layout) };
        if new.is_null() {
            return new; // the old block stays valid, as `realloc` requires
        }
        // SAFETY: both allocations are live and distinct; copy what both hold.
        unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        self.free_pool(core, ptr);
        bump(&self.counters.moved_to_fallback);
        new
    }

    // --- hinting, stats ----------------------------------------------------------------

    /// Starts the background hinter thread (`pagepool-hinter`) if it is not running in
    /// this process, building the pool first if needed, and installs the fork handlers
    /// ([`install_fork_handlers`](Self::install_fork_handlers)). Call it from `main`, never
    /// from inside an allocation. In a child after `fork` it starts a fresh thread.
    ///
    /// # Errors
    /// When the pool could not be built, or the thread could not be spawned.
    pub fn start_hinter(&'static self) -> std::io::Result<()>
    where
        F: Sync,
    {
        let core = match self.init() {
            Ok(()) => self
                .ready_core()
                .ok_or_else(|| std::io::Error::other("pagepool: the pool is being built"))?,
            Err(err) => {
                return Err(std::io::Error::other(format!(
                    "pagepool: the pool could not be built: {err}"
                )));
            }
        };
        self.install_fork_handlers()?;
        let pid = current_pid();
        let mut slot = self.hinter.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() && self.hinter_pid.load(Ordering::Acquire) == pid {
            return Ok(());
        }
        if let Some(stale) = slot.take() {
            // The thread belongs to the parent process: it does not exist here, and
            // joining or detaching its handle would act on a thread id of another process.
            std::mem::forget(stale);
        }
        // Requests the first pass before the thread exists, whatever state a stopped or
        // forked-away thread left.
        core.signal.start_listening();
        match crate::pool::spawn_hinter(move || hint::hinter_main(core, &core.signal)) {
            Ok(handle) => {
                *slot = Some(handle);
                self.hinter_pid.store(pid, Ordering::Release);
                Ok(())
            }
            Err(err) => {
                core.signal.stop();
                Err(err)
            }
        }
    }

    /// Stops the hinter thread and waits for it (no-op if it does not run in this process).
    pub fn stop_hinter(&self) {
        let handle = self.hinter.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(handle) = handle else { return };
        let Some(core) = self.ready_core() else {
            return;
        };
        core.signal.stop();
        if self.hinter_pid.swap(0, Ordering::AcqRel) == current_pid() {
            let _ = handle.join();
        } else {
            std::mem::forget(handle); // a thread of the parent process; see start_hinter
        }
    }

    /// Whether the hinter thread runs in this process (false in a child after `fork` until
    /// [`start_hinter`](Self::start_hinter) is called there).
    pub fn hinter_running(&self) -> bool {
        let pid = self.hinter_pid.load(Ordering::Acquire);
        pid != 0 && pid == current_pid()
    }

    /// Hints every unhinted free block at or above the hint order now, on this thread.
    /// Does nothing before the pool is built.
    pub fn hint_now(&self) -> HintReport {
        let Some(core) = self.ready_core() else {
            return HintReport::default();
        };
        let outcome = hint::run_pass(core, None, u64::MAX);
        HintReport {
            blocks: outcome.blocks,
            bytes: outcome.bytes,
            failures: outcome.failures,
        }
    }

    /// Merges the shards' small-block caches back into the buddy lists.
    pub fn drain_caches(&self) {
        if let Some(core) = self.ready_core() {
            core.drain_caches();
        }
    }

    /// The adapter's counters. Cheap and allocation-free.
    pub fn stats(&self) -> PoolAllocStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PoolAllocStats {
            pool_ready: self.ready_core().is_some(),
            pool_enabled: self.enabled.load(Ordering::Relaxed),
            pool_allocs: load(&c.pool_allocs),
            pool_frees: load(&c.pool_frees),
            zeroed_without_memset: load(&c.zeroed_free),
            too_large: load(&c.too_large),
            exhausted: load(&c.exhausted),
            nested: load(&c.nested),
            grown_in_place: load(&c.grown_in_place),
            shrunk_in_place: load(&c.shrunk_in_place),
            moved_within_pool: load(&c.moved_within_pool),
            moved_to_pool: load(&c.moved_to_pool),
            moved_to_fallback: load(&c.moved_to_fallback),
        }
    }

    /// The pool's own counters (per order, hinting, capture), or `None` before it is
    /// built. Allocates the snapshot's vectors (through the global allocator, which is
    /// fine outside an allocation).
    pub fn pool_stats(&self) -> Option<Stats> {
        self.ready_core().map(|core| core.stats())
    }

    /// Checks the pool's lists, frame table and counters against each other; `Ok` before
    /// the pool is built. Locks every shard while it runs; its own allocations go to the
    /// fallback. Meant for tests.
    ///
    /// # Errors
    /// A description of the first inconsistency.
    pub fn check_consistency(&self) -> Result<(), String> {
        let Some(core) = self.ready_core() else {
            return Ok(());
        };
        let Some(_guard) = Reentry::enter() else {
            return Ok(());
        };
        core.check_consistency()
    }

    /// Registers `pthread_atfork` handlers that hold every shard lock of this pool across
    /// `fork` (see the type docs). Idempotent; [`start_hinter`](Self::start_hinter) calls
    /// it. Builds the pool if needed (a pool that is not built holds no locks).
    ///
    /// # Errors
    /// When more than 8 pools registered handlers, or `pthread_atfork` failed.
    pub fn install_fork_handlers(&'static self) -> std::io::Result<()>
    where
        F: Sync,
    {
        if self.init().is_err() {
            return Ok(()); // no pool, no locks to hold
        }
        let Some(core) = self.ready_core() else {
            return Ok(());
        };
        // Exactly one registration per pool: a second one would make `fork_prepare` take
        // the same locks twice and wait for itself.
        if self
            .fork_handlers
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(());
        }
        install_fork_locks(core).inspect_err(|_| self.fork_handlers.store(false, Ordering::Release))
    }
}

impl<F: GlobalAlloc> fmt::Debug for PoolAlloc<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolAlloc")
            .field("config", &self.config)
            .field("min_pool_size", &self.min_size)
            .field("built", &self.built().map(|r| r.map(|_| ())))
            .finish_non_exhaustive()
    }
}

impl<F: GlobalAlloc> Drop for PoolAlloc<F> {
    fn drop(&mut self) {
        // A `static` is never dropped; this is for adapters with shorter lives, which can
        // have no hinter thread (`start_hinter` needs `&'static self`).
        match *self.state.get_mut() {
            // SAFETY: READY means `core` was initialised; `&mut self` means nobody uses it.
            READY => unsafe { self.core.get_mut().assume_init_drop() },
            // SAFETY: FAILED means `error` was initialised.
            FAILED => unsafe { self.error.get_mut().assume_init_drop() },
            _ => {}
        }
    }
}

// SAFETY: every path returns memory of the requested layout from either the pool (a block
// of `order_for(size, align)`, aligned to its size) or the fallback, and frees or resizes
// by address, so each pointer goes back to the allocator that produced it. Nothing here
// unwinds: the pool's paths do not panic on valid input, and invalid frees abort.
unsafe impl<F: GlobalAlloc> GlobalAlloc for PoolAlloc<F> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(order) = self.pool_order(layout.size(), layout.align())
            && let Some(ptr) = self.alloc_pool(order, layout.size(), false)
        {
            return ptr;
        }
        // SAFETY: forwarded with the caller's guarantees (non-zero size).
        unsafe { self.fallback.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(order) = self.pool_order(layout.size(), layout.align())
            && let Some(ptr) = self.alloc_pool(order, layout.size(), true)
        {
            return ptr;
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.fallback.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(core) = self.ready_core()
            && core.contains(ptr)
        {
            return self.free_pool(core, ptr);
        }
        // SAFETY: not in the pool's region, so the fallback allocated it with `layout`.
        unsafe { self.fallback.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if let Some(core) = self.ready_core()
            && core.contains(ptr)
        {
            // SAFETY: a pool block, with the caller's guarantees on `layout`/`new_size`.
            return unsafe { self.realloc_pool(core, ptr, layout, new_size) };
        }
        if new_size > layout.size()
            && let Some(order) = self.pool_order(new_size, layout.align())
            && let Some(new) = self.alloc_pool(order, new_size, false)
        {
            // Growing past the threshold: move into the pool.
            // SAFETY: both allocations are live and distinct; the old one holds
            // `layout.size()` bytes, fewer than the new one.
            unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size()) };
            // SAFETY: the fallback allocated `ptr` with `layout`.
            unsafe { self.fallback.dealloc(ptr, layout) };
            bump(&self.counters.moved_to_pool);
            return new;
        }
        // SAFETY: a fallback allocation, forwarded with the caller's guarantees.
        unsafe { self.fallback.realloc(ptr, layout, new_size) }
    }
}

// --- helpers -------------------------------------------------------------------------------

/// Writes `msg` to stderr and aborts, without allocating or unwinding (a global allocator
/// must not unwind).
#[cold]
fn fatal(msg: &[u8]) -> ! {
    // SAFETY: writes `msg.len()` bytes from a valid buffer to fd 2.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    std::process::abort()
}

/// The calling process's id (a system call: not for hot paths).
fn current_pid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// CPUs this thread may run on, without allocating.
fn cpu_count() -> usize {
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

// --- fork ------------------------------------------------------------------------------------

/// The locks of one pool, held across `fork`.
struct ForkLocks {
    core: &'static PoolCore,
    env: &'static Env<'static>,
    /// One slot per shard and one for the shared pool; filled by `fork_prepare`, emptied
    /// (unlocking) by `fork_parent` / `fork_child`.
    held: UnsafeCell<Box<[Option<Locked<'static>>]>>,
    /// The hinter's wake-up lock, taken after the shard locks (the order frees use).
    hint_wake: UnsafeCell<Option<crate::sync::MutexGuard<'static, bool>>>,
}

// SAFETY: `held` is touched only by the atfork handlers, which run on the forking thread
// with every one of the pool's shard locks held (glibc also serialises them under its
// atfork lock); the rest is shared read-only.
unsafe impl Sync for ForkLocks {}

const FORK_SLOTS: usize = 8;
static FORK_LOCKS: [AtomicPtr<ForkLocks>; FORK_SLOTS] =
    [const { AtomicPtr::new(ptr::null_mut()) }; FORK_SLOTS];
static ATFORK: Once = Once::new();
static ATFORK_RESULT: AtomicU32 = AtomicU32::new(0);
/// Set on the forking thread between prepare and parent/child: what `IN_POOL` was before.
static FORK_WAS_INSIDE: AtomicBool = AtomicBool::new(false);

fn install_fork_locks(core: &'static PoolCore) -> std::io::Result<()> {
    // Called from user code (`main`), not from inside an allocation: allocating is fine.
    let slots = core.all_shards().count();
    let env: &'static Env<'static> = Box::leak(Box::new(core.env()));
    let locks = Box::leak(Box::new(ForkLocks {
        core,
        env,
        held: UnsafeCell::new((0..slots).map(|_| None).collect()),
        hint_wake: UnsafeCell::new(None),
    }));
    let mut placed = false;
    for slot in &FORK_LOCKS {
        if slot
            .compare_exchange(ptr::null_mut(), locks, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            placed = true;
            break;
        }
    }
    if !placed {
        return Err(std::io::Error::other(
            "pagepool: fork handlers are limited to 8 pools",
        ));
    }
    ATFORK.call_once(|| {
        // SAFETY: the handlers are `extern "C" fn()` that live for the whole program.
        let rc = unsafe {
            libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child))
        };
        ATFORK_RESULT.store(rc as u32, Ordering::Release);
    });
    match ATFORK_RESULT.load(Ordering::Acquire) {
        0 => Ok(()),
        rc => Err(std::io::Error::from_raw_os_error(rc as i32)),
    }
}

/// Before `fork`: takes every registered pool's shard locks in the pool's lock order (per-CPU
/// shards by index, then the shared pool), so no other thread is inside a shard when the
/// address space is copied.
extern "C" fn fork_prepare() {
    FORK_WAS_INSIDE.store(
        IN_POOL.with(|inside| inside.replace(true)),
        Ordering::Relaxed,
    );
    for slot in &FORK_LOCKS {
        let locks = slot.load(Ordering::Acquire);
        if locks.is_null() {
            continue;
        }
        // SAFETY: registered entries are leaked, so they live forever.
        let locks = unsafe { &*locks };
        // SAFETY: only the forking thread touches `held`; see `ForkLocks`.
        let held = unsafe { &mut *locks.held.get() };
        for (slot, shard) in held.iter_mut().zip(locks.core.all_shards()) {
            *slot = Some(shard.lock(locks.env));
        }
        // SAFETY: as for `held`.
        unsafe { *locks.hint_wake.get() = Some(locks.core.signal.lock_for_fork()) };
    }
}

/// After `fork`, in the parent and in the child: releases what `fork_prepare` took, in
/// reverse order.
fn fork_release() {
    for slot in FORK_LOCKS.iter().rev() {
        let locks = slot.load(Ordering::Acquire);
        if locks.is_null() {
            continue;
        }
        // SAFETY: as in `fork_prepare`.
        drop(unsafe { (*(*locks).hint_wake.get()).take() });
        // SAFETY: as in `fork_prepare`.
        let held = unsafe { &mut *(*locks).held.get() };
        for slot in held.iter_mut().rev() {
            drop(slot.take());
        }
    }
    let was = FORK_WAS_INSIDE.load(Ordering::Relaxed);
    IN_POOL.with(|inside| inside.set(was));
}

extern "C" fn fork_parent() {
    fork_release();
}

extern "C" fn fork_child() {
    // The child's only thread is this one, so the futex-based locks it holds can simply be
    // released; no other thread of the child can be waiting on them.
    fork_release();
}
