//! The memory pressure watcher, driven by a plain file whose modification counts as an
//! event (no real memory pressure needed): an event releases a pool's free memory at once,
//! pressure ends after the settle period, start and stop from many threads, the thread's
//! cost while idle, `fork`, bad input; and a real PSI trigger where the kernel has one.
//!
//! The tests count the process's watcher threads, so they run one at a time.

use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pagepool::{
    Block, HintMode, MAX_PRESSURE_SOURCES, PagePool, PressureLevel, PressureSource,
    PressureSourceError, block_size,
};

mod common;

use common::{live_threads_named, wait_until, within};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The watcher's thread name as the kernel keeps it (15 bytes).
const COMM: &str = "pagepool-pressu";

/// This process's live watcher threads.
fn watcher_threads() -> Vec<u32> {
    live_threads_named(COMM)
}

/// Waits for the watcher thread to be gone (joined threads leave `/proc` a moment after
/// the join returns).
fn no_watcher_thread() {
    wait_until(Duration::from_secs(10), "the watcher thread's exit", || {
        watcher_threads().is_empty()
    });
}

/// A fresh file to write events into, removed on drop.
struct EventFile(PathBuf);

impl EventFile {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "pagepool-pressure-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, "").unwrap();
        Self(path)
    }

    fn source(&self, settle: Duration) -> PressureSource {
        PressureSource::file_modified(&self.0, settle).unwrap()
    }

    /// One event.
    fn fire(&self) {
        std::fs::write(&self.0, "pressure").unwrap();
    }
}

impl Drop for EventFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Pages of `[addr, addr + len)` resident now (`mincore`).
fn resident_pages(addr: *const u8, len: usize) -> usize {
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: the range lies inside the pool's mapping (page-aligned blocks); `vec` has
    // one byte per page.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// A pool whose free memory stays resident unless the watcher releases it: `MADV_FREE`
/// configured, no hinter thread.
fn pool() -> PagePool {
    PagePool::builder()
        .capacity(64 << 20)
        .hint_mode(HintMode::Free)
        .hint_thread(false)
        .build()
        .unwrap()
}

/// Touches and frees `orders` blocks; returns their (address, length).
fn burst(pool: &PagePool, orders: &[u8]) -> Vec<(usize, usize)> {
    let blocks: Vec<Block> = orders
        .iter()
        .map(|&order| {
            let mut block = pool.alloc(order).unwrap();
            block.as_mut_slice().fill(7);
            block
        })
        .collect();
    let ranges = blocks
        .iter()
        .map(|b| (b.as_ptr() as usize, b.len()))
        .collect();
    for block in blocks {
        pool.free(block);
    }
    ranges
}

#[test]
fn an_event_releases_free_memory_at_once_and_pressure_ends_after_the_settle_period() {
    let _serial = serial();
    let file = EventFile::new();
    let pool = pool();
    // Large and small blocks, all touched, all freed: resident free memory.
    let ranges = burst(&pool, &[9, 9, 9, 9, 10, 0, 0, 1, 2, 3, 5]);
    let resident = |ranges: &[(usize, usize)]| -> usize {
        ranges
            .iter()
            .map(|&(a, l)| resident_pages(a as *const u8, l))
            .sum()
    };
    assert!(resident(&ranges) > 0);
    let before = pool.stats();
    assert!(before.resident_free_bytes() > 0);
    assert_eq!(before.pressure, Default::default());

    let settle = Duration::from_millis(300);
    pool.watch_pressure(file.source(settle)).unwrap();
    assert!(pool.watching_pressure());
    assert!(pool.stats().pressure.watching);
    // (The thread names itself once it runs.)
    wait_until(Duration::from_secs(10), "the thread's start", || {
        watcher_threads().len() == 1
    });
    // Nothing happens without an event.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(pool.stats().pressure.events, 0);
    assert!(!pool.stats().pressure.under_pressure);

    file.fire();
    wait_until(Duration::from_secs(10), "the release", || {
        pool.stats().pressure.events >= 1
    });
    let stats = pool.stats();
    // Everything free went back with MADV_DONTNEED (whatever the configured mode), small
    // blocks included: all of it is known-zero now, none of it resident.
    assert_eq!(stats.resident_free_bytes(), 0, "{stats}");
    assert_eq!(stats.hinted_bytes, 0, "MADV_FREE under pressure:\n{stats}");
    assert_eq!(stats.zero_bytes, stats.free_bytes);
    assert!(stats.pressure.bytes_released >= before.resident_free_bytes());
    assert!(stats.hint.bytes_hinted_total >= before.resident_free_bytes());
    assert_eq!(
        resident(&ranges),
        0,
        "pages still resident after the release"
    );
    println!("{stats}");

    // Pressure ends once a settle period passes without an event.
    wait_until(Duration::from_secs(30), "the end of pressure", || {
        !pool.stats().pressure.under_pressure
    });
    // Back to MADV_FREE: a block freed and hinted now is hinted, not known-zero.
    let mut block = pool.alloc(9).unwrap();
    block.as_mut_slice().fill(1);
    pool.free(block);
    pool.release_idle();
    assert!(pool.stats().hinted_bytes >= block_size(9) as u64);
    pool.check_consistency().unwrap();

    pool.unwatch_pressure();
    assert!(!pool.watching_pressure() && !pool.stats().pressure.watching);
    no_watcher_thread();
}

/// Memory the hinter already gave back with `MADV_FREE` still counts against a cgroup
/// until the kernel reclaims it (a reclaim stall for the next allocation): under pressure
/// it is dropped with `MADV_DONTNEED` too.
#[test]
fn lazily_freed_memory_is_dropped_under_pressure() {
    let _serial = serial();
    let file = EventFile::new();
    let pool = pool();
    let ranges = burst(&pool, &[9, 9, 10, 9]);
    pool.release_idle(); // MADV_FREE: no pressure yet
    let before = pool.stats();
    assert!(before.hinted_bytes >= 5 * block_size(9) as u64, "{before}");
    let resident = || -> usize {
        ranges
            .iter()
            .map(|&(a, l)| resident_pages(a as *const u8, l))
            .sum()
    };
    // MADV_FREE leaves the pages mapped until the kernel needs them.
    assert!(resident() > 0, "lazily freed pages are still resident");
    pool.watch_pressure(file.source(Duration::from_millis(300)))
        .unwrap();
    file.fire();
    wait_until(Duration::from_secs(10), "the release", || {
        pool.stats().pressure.events >= 1
    });
    let stats = pool.stats();
    assert_eq!(
        stats.hinted_bytes, 0,
        "lazily freed blocks dropped:\n{stats}"
    );
    assert_eq!(stats.zero_bytes, stats.free_bytes);
    assert_eq!(resident(), 0, "pages still resident after the release");
    pool.check_consistency().unwrap();
    pool.unwatch_pressure();
    no_watcher_thread();
}

#[test]
fn every_event_releases_again_and_extends_the_pressure() {
    let _serial = serial();
    let file = EventFile::new();
    let pool = pool();
    // A settle period far longer than the test's steps, so pressure lasts throughout.
    pool.watch_pressure(file.source(Duration::from_secs(20)))
        .unwrap();
    file.fire();
    wait_until(Duration::from_secs(10), "the first release", || {
        pool.stats().pressure.events >= 1
    });
    assert!(pool.stats().pressure.under_pressure);
    // Memory freed during the pressure goes at the next event.
    let ranges = burst(&pool, &[9, 4]);
    assert!(pool.stats().resident_free_bytes() > 0);
    let events = pool.stats().pressure.events;
    file.fire();
    wait_until(Duration::from_secs(10), "the second release", || {
        pool.stats().pressure.events > events
    });
    assert!(pool.stats().pressure.under_pressure);
    assert_eq!(pool.stats().resident_free_bytes(), 0);
    for (addr, len) in ranges {
        assert_eq!(resident_pages(addr as *const u8, len), 0);
    }
    // A pool that starts watching while the pressure lasts is released at once.
    let late = pool_with_free_memory();
    late.watch_pressure(file.source(Duration::from_secs(20)))
        .unwrap();
    wait_until(Duration::from_secs(10), "the late pool's release", || {
        late.stats().pressure.events >= 1
    });
    assert_eq!(late.stats().resident_free_bytes(), 0);
    assert!(late.stats().pressure.under_pressure);
    // Stopping leaves pressure mode at once, for that pool only.
    late.unwatch_pressure();
    assert!(!late.stats().pressure.under_pressure);
    assert!(pool.stats().pressure.under_pressure);
    drop(late);
    // Dropping a watching pool stops its watch; the last one stops the thread.
    drop(pool);
    no_watcher_thread();
}

fn pool_with_free_memory() -> PagePool {
    let pool = pool();
    burst(&pool, &[9, 9, 0, 3]);
    assert!(pool.stats().resident_free_bytes() > 0);
    pool
}

#[test]
fn starting_and_stopping_from_many_threads_is_linearisable() {
    let _serial = serial();
    let files: Vec<EventFile> = (0..3).map(|_| EventFile::new()).collect();
    let sources: Vec<PressureSource> = files
        .iter()
        .map(|f| f.source(Duration::from_millis(50)))
        .collect();
    let pools: &'static [PagePool] = Box::leak((0..4).map(|_| pool()).collect::<Vec<_>>().into());
    let sources: &'static [PressureSource] = Box::leak(sources.into());
    let firing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Events keep coming meanwhile, so releases run while pools start and stop.
    let fire = {
        let firing = firing.clone();
        let paths: Vec<PathBuf> = files.iter().map(|f| f.0.clone()).collect();
        std::thread::spawn(move || {
            while firing.load(Ordering::Relaxed) {
                for p in &paths {
                    let _ = std::fs::write(p, "x");
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    within(Duration::from_secs(120), "watch/unwatch storm", move || {
        std::thread::scope(|s| {
            for t in 0..8u64 {
                s.spawn(move || {
                    let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    for _ in 0..150 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let pool = &pools[(x % pools.len() as u64) as usize];
                        match (x >> 8) % 4 {
                            0 | 1 => {
                                let source = &sources[((x >> 16) % 3) as usize];
                                pool.watch_pressure(source.clone()).unwrap();
                            }
                            2 => pool.unwatch_pressure(),
                            _ => {
                                burst(pool, &[(x % 10) as u8]);
                            }
                        }
                        assert!(watcher_threads().len() <= 1, "two watcher threads at once");
                    }
                });
            }
        });
    });
    firing.store(false, Ordering::Relaxed);
    fire.join().unwrap();
    // A watch that returned is served; an unwatch that returned is not.
    pools[0].watch_pressure(sources[0].clone()).unwrap();
    assert!(pools[0].watching_pressure());
    for pool in pools {
        pool.unwatch_pressure();
        assert!(!pool.watching_pressure());
        assert!(!pool.stats().pressure.under_pressure);
        pool.check_consistency().unwrap();
    }
    no_watcher_thread();
    assert!(pools.iter().any(|p| p.stats().pressure.events > 0));
    // No descriptor of the sources is left open.
    assert_eq!(open_inotify_instances(), 0);
}

/// `inotify` instances this process holds.
fn open_inotify_instances() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("inotify"))
        .count()
}

#[test]
fn pools_watching_the_same_source_share_it() {
    let _serial = serial();
    let file = EventFile::new();
    let a = pool();
    let b = pool();
    a.watch_pressure(file.source(Duration::from_millis(100)))
        .unwrap();
    b.watch_pressure(file.source(Duration::from_millis(100)))
        .unwrap();
    // Watching the same source again changes nothing.
    b.watch_pressure(file.source(Duration::from_millis(100)))
        .unwrap();
    assert_eq!(open_inotify_instances(), 1);
    let ranges = [burst(&a, &[9]), burst(&b, &[9])];
    file.fire();
    wait_until(Duration::from_secs(10), "both releases", || {
        a.stats().pressure.events >= 1 && b.stats().pressure.events >= 1
    });
    for (addr, len) in ranges.iter().flatten() {
        assert_eq!(resident_pages(*addr as *const u8, *len), 0);
    }
    // A different source: a second instance; switching back closes it.
    let other = EventFile::new();
    b.watch_pressure(other.source(Duration::from_millis(100)))
        .unwrap();
    assert_eq!(open_inotify_instances(), 2);
    b.watch_pressure(file.source(Duration::from_millis(100)))
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the unwatched source's close",
        || open_inotify_instances() == 1,
    );
    a.unwatch_pressure();
    b.unwatch_pressure();
    assert_eq!(open_inotify_instances(), 0);
    no_watcher_thread();
}

#[test]
fn at_most_so_many_distinct_sources() {
    let _serial = serial();
    let files: Vec<EventFile> = (0..=MAX_PRESSURE_SOURCES)
        .map(|_| EventFile::new())
        .collect();
    let pools: Vec<PagePool> = files.iter().map(|_| pool()).collect();
    for (pool, file) in pools.iter().zip(&files).take(MAX_PRESSURE_SOURCES) {
        pool.watch_pressure(file.source(Duration::from_millis(100)))
            .unwrap();
    }
    let last = pools.last().unwrap();
    let err = last
        .watch_pressure(files.last().unwrap().source(Duration::from_millis(100)))
        .unwrap_err();
    assert!(
        err.to_string().contains("different pressure sources"),
        "{err}"
    );
    assert!(!last.watching_pressure());
    // A source already open is still fine.
    last.watch_pressure(files[0].source(Duration::from_millis(100)))
        .unwrap();
    assert_eq!(open_inotify_instances(), MAX_PRESSURE_SOURCES);
    drop(pools);
    no_watcher_thread();
    assert_eq!(open_inotify_instances(), 0);
}

#[test]
fn the_thread_costs_no_cpu_while_idle() {
    let _serial = serial();
    let file = EventFile::new();
    let pool = pool();
    pool.watch_pressure(file.source(Duration::from_millis(100)))
        .unwrap();
    wait_until(Duration::from_secs(10), "the thread's start", || {
        watcher_threads().len() == 1
    });
    let tid = watcher_threads()[0];
    let stat = format!("/proc/self/task/{tid}/stat");
    // utime and stime: fields 14 and 15, after the parenthesised name.
    let cpu_ticks = || -> u64 {
        let text = std::fs::read_to_string(&stat).unwrap();
        let rest = &text[text.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let state = || -> char {
        let text = std::fs::read_to_string(&stat).unwrap();
        text[text.rfind(')').unwrap() + 2..].chars().next().unwrap()
    };
    std::thread::sleep(Duration::from_millis(200)); // past its first round
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let after = cpu_ticks();
    assert_eq!(after, before, "the idle watcher used CPU time");
    assert_eq!(state(), 'S', "the idle watcher is not sleeping");
    // Where the kernel shows it: blocked in poll (syscall 7 on x86-64) with no timeout.
    if let Ok(syscall) = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")) {
        println!(
            "watcher thread {tid} while idle: syscall {}",
            syscall.trim()
        );
    }
    pool.unwatch_pressure();
    no_watcher_thread();
}

#[test]
fn a_forked_child_has_no_watcher_until_it_asks() {
    let _serial = serial();
    let file = EventFile::new();
    let pool: &'static PagePool = Box::leak(Box::new(pool()));
    pool.watch_pressure(file.source(Duration::from_millis(100)))
        .unwrap();
    let source = file.source(Duration::from_millis(100));
    // SAFETY: the child uses the pool (its fork handlers made it consistent), the file
    // system and `_exit`; the parent's other threads are the test harness's, idle.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = (|| {
            // No thread here, no watch, no pressure mode.
            if pool.watching_pressure() || pool.stats().pressure.watching {
                return false;
            }
            if !watcher_threads().is_empty() || open_inotify_instances() != 0 {
                return false;
            }
            // Asked again, it works in the child.
            if pool.watch_pressure(source).is_err() || !pool.watching_pressure() {
                return false;
            }
            let ranges = burst(pool, &[9]);
            let _ = std::fs::write(&file.0, "child");
            let start = Instant::now();
            while pool.stats().pressure.events == 0 {
                if start.elapsed() > Duration::from_secs(10) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            pool.unwatch_pressure();
            let start = Instant::now();
            while !watcher_threads().is_empty() {
                if start.elapsed() > Duration::from_secs(10) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            ranges
                .iter()
                .all(|&(a, l)| resident_pages(a as *const u8, l) == 0)
        })();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child failed (status {status:#x})"
    );
    // The parent still watches (and heard the child's write too: a shared file).
    assert!(pool.watching_pressure());
    wait_until(Duration::from_secs(10), "the parent's thread", || {
        watcher_threads().len() == 1
    });
    pool.unwatch_pressure();
    no_watcher_thread();
}

#[test]
fn bad_sources_are_refused_and_change_nothing() {
    let _serial = serial();
    let pool = pool();
    let invalid = PressureSource::Psi {
        path: "/proc/pressure/memory".into(),
        stall: Duration::ZERO,
        window: Duration::from_secs(2),
    };
    let err = pool.watch_pressure(invalid).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let typed = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<PressureSourceError>());
    assert_eq!(typed, Some(&PressureSourceError::ZeroStall));
    let absurd = PressureSource::Psi {
        path: "/proc/pressure/memory".into(),
        stall: Duration::from_secs(1),
        window: Duration::from_secs(3600),
    };
    assert_eq!(
        pool.watch_pressure(absurd).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
    // Absent interfaces: Unsupported, naming the file.
    for (source, file) in [
        (
            PressureSource::cgroup_v1("/nonexistent/cgroup", PressureLevel::Low),
            "memory.pressure_level",
        ),
        (
            PressureSource::cgroup_events("/nonexistent/cgroup"),
            "/nonexistent/cgroup",
        ),
        (
            PressureSource::psi_at(
                "/nonexistent/memory.pressure",
                Duration::from_millis(100),
                Duration::from_secs(2),
            )
            .unwrap(),
            "/nonexistent/memory.pressure",
        ),
    ] {
        let err = pool.watch_pressure(source).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
        assert!(err.to_string().contains(file), "{err}");
        println!("{err}");
    }
    assert!(!pool.watching_pressure());
    assert_eq!(pool.stats().pressure, Default::default());
    no_watcher_thread();
    // A failed switch keeps the source watched before.
    let file = EventFile::new();
    pool.watch_pressure(file.source(Duration::from_millis(100)))
        .unwrap();
    assert!(
        pool.watch_pressure(PressureSource::cgroup_events("/nonexistent"))
            .is_err()
    );
    assert!(pool.watching_pressure());
    pool.unwatch_pressure();
}

#[test]
fn a_real_psi_trigger() {
    let _serial = serial();
    if !std::path::Path::new("/proc/pressure/memory").exists() {
        println!("skipped: /proc/pressure/memory is absent (no PSI in this kernel)");
        return;
    }
    let pool = pool();
    let source = PressureSource::psi(Duration::from_millis(100), Duration::from_secs(2)).unwrap();
    match pool.watch_pressure(source) {
        Ok(()) => {}
        Err(err) => {
            println!("skipped: the kernel refused a PSI trigger: {err}");
            return;
        }
    }
    assert!(pool.watching_pressure());
    println!("PSI trigger \"some 100000 2000000\" on /proc/pressure/memory is armed");
    // A window that is not a multiple of 2 s needs CAP_SYS_RESOURCE: a clear error
    // without it.
    let one_second =
        PressureSource::psi(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
    match pool.watch_pressure(one_second) {
        Ok(()) => println!("1 s PSI window accepted (CAP_SYS_RESOURCE)"),
        Err(err) => {
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
            assert!(err.to_string().contains("multiple of 2 s"), "{err}");
            println!("1 s PSI window refused as expected: {err}");
            assert!(pool.watching_pressure(), "the 2 s trigger is still watched");
        }
    }
    match PressureSource::detect() {
        Ok(source) => {
            println!("detected: {source:?}");
            pool.watch_pressure(source).unwrap();
        }
        Err(err) => println!("detect: {err}"),
    }
    pool.unwatch_pressure();
    no_watcher_thread();
}

#[test]
fn cgroup2_memory_events_where_the_controller_is() {
    let _serial = serial();
    let Some(dir) = own_cgroup2_dir() else {
        println!("skipped: no cgroup2 hierarchy mounted");
        return;
    };
    if !dir.join("memory.events").exists() {
        println!(
            "skipped: {} has no memory.events (the cgroup2 hierarchy here has no memory \
             controller; it is bound to cgroup v1)",
            dir.display()
        );
        let err = pool()
            .watch_pressure(PressureSource::cgroup_events(&dir))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
        println!("as the watcher says: {err}");
        return;
    }
    let pool = pool();
    pool.watch_pressure(PressureSource::cgroup_events(&dir))
        .unwrap();
    assert!(pool.watching_pressure());
    pool.unwatch_pressure();
}

/// This process's cgroup2 directory.
fn own_cgroup2_dir() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let point = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split(' ').nth(4).map(str::to_owned))?
    })?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(PathBuf::from(point).join(path.trim_start_matches('/')))
}
