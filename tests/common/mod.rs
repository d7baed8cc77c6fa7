//! Helpers shared by the integration tests: quiet pools and the invariants every test
//! checks at the end.
//!
//! Each test file is its own crate and uses only some of these.
#![allow(dead_code, unreachable_pub)]

use pagepool::{Block, CpuCacheMode, PagePool, PoolBuilder, Stats, block_size};

/// Bytes in MiB.
pub const MIB: usize = 1 << 20;
/// A 4 MiB chunk (order 10), the default largest block.
pub const CHUNK: usize = 4 * MIB;

/// A quiet pool of the buddy core alone: `chunks` chunks of order 10 over `shards`
/// shards, no hinter thread, no per-CPU caches in front (so frees reach the shards at
/// once and blocks are handed out in address order, which tests of splitting, merging and
/// capture rely on).
pub fn quiet(chunks: usize, shards: usize) -> PoolBuilder {
    cached(chunks, shards).cpu_cache(CpuCacheMode::Off)
}

/// Like [`quiet`], with the per-CPU caches as the pool would have them (`Auto`: the
/// `PAGEPOOL_CPU_CACHE` environment variable picks the implementation).
pub fn cached(chunks: usize, shards: usize) -> PoolBuilder {
    PagePool::builder()
        .capacity(chunks * CHUNK)
        .max_order(10)
        .shards(shards)
        .hint_thread(false)
}

/// `free + allocated + in flight == capacity`, and the full audit of lists, frame table
/// and counters. Returns the snapshot it checked.
#[track_caller]
pub fn assert_balanced(pool: &PagePool) -> Stats {
    let s = pool.stats();
    assert_eq!(
        s.free_bytes + s.allocated_bytes + s.in_flight_bytes,
        s.capacity as u64,
        "free + allocated + in flight != capacity:\n{s}"
    );
    pool.check_consistency()
        .unwrap_or_else(|e| panic!("inconsistent pool: {e}\n{s}"));
    s
}

/// Everything freed: caches drained, balanced, every byte free, nothing waiting, nothing
/// held by a `LocalCache`.
#[track_caller]
pub fn assert_all_free(pool: &PagePool) -> Stats {
    pool.drain_caches();
    let s = assert_balanced(pool);
    assert_eq!(s.free_bytes, s.capacity as u64, "a block leaked:\n{s}");
    assert_eq!(
        s.capture.waiting, 0,
        "a capture request was left behind:\n{s}"
    );
    assert_eq!(s.local_cache_bytes, 0, "{s}");
    s
}

/// Everything freed and coalesced: every chunk whole and free.
#[track_caller]
pub fn assert_whole_chunks(pool: &PagePool) {
    let s = assert_all_free(pool);
    let max = pool.max_order() as usize;
    for o in &s.orders[..max] {
        assert_eq!(
            (o.free, o.allocated),
            (0, 0),
            "order {} is not coalesced:\n{s}",
            o.order
        );
    }
    let chunks = (s.capacity / block_size(max as u8)) as u64;
    assert_eq!(s.orders[max].free, chunks, "not every chunk is whole:\n{s}");
    assert_eq!(s.cached_bytes, 0);
}

/// Writes a pattern derived from `tag` at the start, middle and end of the block.
pub fn stamp(block: &mut Block, tag: u8) {
    let len = block.len();
    let bytes = block.as_mut_slice();
    bytes[0] = tag;
    bytes[len / 2] = tag.wrapping_add(1);
    bytes[len - 1] = tag.wrapping_add(2);
}

/// Checks the pattern [`stamp`] wrote.
#[track_caller]
pub fn verify(block: &Block, tag: u8) {
    let bytes = block.as_slice();
    let len = bytes.len();
    assert_eq!(
        (bytes[0], bytes[len / 2], bytes[len - 1]),
        (tag, tag.wrapping_add(1), tag.wrapping_add(2)),
        "block at {:p} (order {}) lost its contents",
        block.as_ptr(),
        block.order()
    );
}

/// Polls the pool's stats until `done` holds, or fails with `what` and the last stats
/// after `limit`.
#[track_caller]
pub fn eventually(
    pool: &PagePool,
    limit: std::time::Duration,
    what: &str,
    done: impl Fn(&Stats) -> bool,
) {
    let start = std::time::Instant::now();
    loop {
        let s = pool.stats();
        if done(&s) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not so after {limit:?}\n{s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits up to `limit` for `done`, polling, and fails with `what` after.
#[track_caller]
pub fn wait_until(limit: std::time::Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Runs `f` on a thread and fails the test if it does not finish within `limit` (a hang).
#[track_caller]
pub fn within<T: Send + 'static>(
    limit: std::time::Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what}: still running after {limit:?} (a hang)"))
}

/// `PF_EXITING` in a task's flags (`/proc/<tid>/stat` field 9): the kernel sets it when a
/// thread starts to exit, before a `join` of the thread can return.
const PF_EXITING: u64 = 0x4;

/// Thread ids of this process's live threads whose name (as the kernel keeps it: at most
/// 15 bytes) is `comm`. A joined thread stays in `/proc` for a moment while the kernel
/// tears it down; it is not counted. A thread names itself as it starts, so a thread just
/// spawned may not be counted yet.
pub fn live_threads_named(comm: &str) -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| {
                    let t = t.ok()?;
                    let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                    let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
                    let flags: u64 = rest.split(' ').nth(6)?.parse().ok()?;
                    (name == comm && flags & PF_EXITING == 0)
                        .then(|| t.file_name().to_str()?.parse().ok())?
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `Rss - LazyFree` of this process now, or `None` (with a note) where `/proc` cannot say.
pub fn held() -> Option<u64> {
    let mem = pagepool::ProcessMemory::read();
    if mem.is_none() {
        eprintln!("skipped: /proc/self/smaps_rollup is not available");
    }
    mem.map(|m| m.held())
}

/// The CPUs the calling thread may run on (empty if the kernel will not say).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is an empty set; the call gets its true size.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &allowed))
            .collect()
    }
}

/// Lets the calling thread run only on `cpus` (best effort: whether the kernel took it).
pub fn run_on(cpus: &[usize]) -> bool {
    // SAFETY: an all-zero cpu_set_t is an empty set; the calls get valid pointers and the
    // set's true size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    }
}
