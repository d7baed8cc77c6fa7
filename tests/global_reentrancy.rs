//! Re-entrancy: building a heap-backed pool allocates its region through the global
//! allocator, i.e. from inside `PoolAlloc::alloc`; those nested requests must go to the
//! fallback instead of waiting for the pool they are building. Also: thread-local
//! destructors that allocate and free pool memory while the thread exits.

use std::cell::RefCell;
use std::time::Duration;

use pagepool::{Backing, PoolAlloc, PoolBuilder};

/// Region 8 MiB = one block of the largest order (11), so the region request itself is
/// pool-sized and re-enters the adapter.
#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::with_config(
    PoolBuilder::new()
        .backing(Backing::Heap)
        .capacity(8 << 20)
        .max_order(11)
        .shards(2),
);

fn watchdog() {
    // Without the guard the first pool-sized request would wait for itself forever.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        eprintln!("global_reentrancy: deadlock suspected, aborting");
        std::process::abort();
    });
}

#[test]
fn building_a_heap_backed_pool_reenters_and_is_served_by_the_fallback() {
    watchdog();
    let v = vec![5u8; 64 << 10];
    assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 5 * (64 << 10));
    let stats = GLOBAL.stats();
    assert!(stats.pool_ready, "{stats}");
    // Region (8 MiB) and frame table (32 KiB) are pool-sized requests made while building.
    assert!(stats.nested >= 2, "{stats}");
    assert!(GLOBAL.contains(v.as_ptr()));
    GLOBAL.check_consistency().unwrap();
}

struct AllocatesOnDrop(Vec<u8>);

impl Drop for AllocatesOnDrop {
    fn drop(&mut self) {
        // Allocate pool memory while the thread's locals are being destroyed.
        let copy = self.0.clone();
        assert_eq!(copy, self.0);
        let more = vec![7u8; 32 << 10];
        assert!(more.iter().all(|&b| b == 7));
    }
}

thread_local! {
    static BIG: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static DROPPER: RefCell<Option<AllocatesOnDrop>> = const { RefCell::new(None) };
}

#[test]
fn thread_local_destructors_allocate_and_free_pool_memory() {
    watchdog();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                BIG.with(|b| {
                    b.borrow_mut()
                        .extend(std::iter::repeat_n(t as u8, 256 << 10))
                });
                DROPPER.with(|d| *d.borrow_mut() = Some(AllocatesOnDrop(vec![t as u8; 16 << 10])));
                BIG.with(|b| assert!(b.borrow().iter().all(|&x| x == t as u8)));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    GLOBAL.check_consistency().unwrap();
}
