//! A free of a pool block from inside a fork handler that runs while the pool's own
//! handler holds every pool lock (another library's `pthread_atfork` prepare handler,
//! registered before the pool was built). It must not wait for a lock its own thread
//! holds: the free is deferred and done by the next pool operation.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pagepool::PoolAlloc;

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

/// The block the prepare handler frees, as an address (0: none).
static BLOCK: AtomicUsize = AtomicUsize::new(0);
const LAYOUT: Layout = match Layout::from_size_align(64 << 10, 8) {
    Ok(layout) => layout,
    Err(_) => panic!("valid layout"),
};

/// Registered before the pool: glibc runs prepare handlers in reverse order of
/// registration, so this one runs after the pool's, with the pool's locks held.
extern "C" fn prepare() {
    let block = BLOCK.swap(0, Ordering::AcqRel);
    if block != 0 {
        // SAFETY: allocated below with LAYOUT and not freed since.
        unsafe { GLOBAL.dealloc(block as *mut u8, LAYOUT) };
    }
}

/// Registers `prepare` before anything allocates (before the test harness runs): an ELF
/// constructor.
extern "C" fn register_before_the_pool() {
    // SAFETY: a handler that lives for the whole program.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), None, None) };
    REGISTERED.store(rc == 0, Ordering::Release);
}

#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = register_before_the_pool;

static REGISTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[test]
fn a_free_inside_a_fork_handler_is_deferred_not_deadlocked() {
    assert!(
        REGISTERED.load(Ordering::Acquire),
        "the constructor did not run"
    );
    // SAFETY: a non-zero layout; the pool is built by this first pool-sized request.
    let block = unsafe { GLOBAL.alloc(LAYOUT) };
    assert!(GLOBAL.contains(block), "served by the pool");
    BLOCK.store(block as usize, Ordering::Release);
    let before = GLOBAL.stats();
    // SAFETY: the child only calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed (or hung in the prepare handler)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = 0;
    // SAFETY: our own child.
    while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
        assert!(Instant::now() < deadline, "the child did not exit");
        std::thread::sleep(Duration::from_millis(1));
    }
    let after = GLOBAL.stats();
    assert_eq!(after.deferred_frees, before.deferred_frees + 1, "{after}");
    // The next page-block operation frees it (small objects take lock-free paths).
    let v = vec![0u8; 64 << 10];
    assert!(GLOBAL.contains(v.as_ptr()));
    drop(v);
    let s = GLOBAL.stats();
    assert!(
        s.pool_frees >= after.pool_frees + 2,
        "the deferred block and the vector are freed:\n{s}"
    );
    GLOBAL.check_consistency().unwrap();
}
