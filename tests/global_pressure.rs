//! The memory pressure watcher on a `#[global_allocator] static`: an event gives the
//! pool's free memory back at once, and unwatching stops the thread.

use std::time::{Duration, Instant};

use pagepool::{PoolAlloc, PressureSource};

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not after 20 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Pages of `[addr, addr + len)` resident now (`mincore`).
fn resident_pages(addr: usize, len: usize) -> usize {
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: the range lies inside the pool's mapping, page-aligned; one byte per page.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0);
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn a_pressure_event_releases_the_global_pool() {
    let path =
        std::env::temp_dir().join(format!("pagepool-global-pressure-{}", std::process::id()));
    std::fs::write(&path, "").unwrap();
    assert!(!GLOBAL.watching_pressure());
    GLOBAL
        .watch_pressure(PressureSource::file_modified(&path, Duration::from_millis(200)).unwrap())
        .unwrap();
    assert!(GLOBAL.watching_pressure());
    // 16 MiB from the pool in page blocks of 512 KiB (larger requests start out as
    // mappings of their own), touched, freed: resident free memory of the pool.
    let bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![5u8; 512 << 10]).collect();
    let ranges: Vec<(usize, usize)> = bufs
        .iter()
        .map(|b| (b.as_ptr() as usize, b.len()))
        .collect();
    assert!(bufs.iter().all(|b| GLOBAL.contains(b.as_ptr())));
    drop(bufs);
    let resident = || -> usize { ranges.iter().map(|&(a, l)| resident_pages(a, l)).sum() };
    assert!(resident() > 0);
    std::fs::write(&path, "pressure").unwrap();
    eventually("the release", || {
        GLOBAL.pool_stats().is_some_and(|s| s.pressure.events >= 1)
    });
    assert_eq!(resident(), 0, "the freed vectors are still resident");
    let stats = GLOBAL.pool_stats().unwrap();
    // The process keeps allocating (this test, the harness): a few small blocks may have
    // been freed since.
    assert!(stats.resident_free_bytes() < 1 << 20, "{stats}");
    eventually("the end of pressure", || {
        !GLOBAL.pool_stats().unwrap().pressure.under_pressure
    });
    GLOBAL.unwatch_pressure();
    assert!(!GLOBAL.watching_pressure());
    GLOBAL.check_consistency().unwrap();
    std::fs::remove_file(&path).unwrap();
}
