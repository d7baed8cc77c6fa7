//! Batched eviction: many blocks freed with one piece of advice; bad batches refused whole.

use std::ptr::NonNull;

use pagepool::{Advice, BatchError, FreeError, PagePool};

mod common;

use common::{assert_all_free, assert_balanced, quiet};

/// Resident 4 KiB pages of `[start, start + len)`, from `mincore`.
fn resident_pages(start: *const u8, len: usize) -> usize {
    let mut vec = vec![0u8; len / 4096];
    // SAFETY: a page-aligned range of the pool's mapping; one byte per page.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0);
    vec.iter().filter(|&&v| v & 1 != 0).count()
}

#[test]
fn a_dontneed_batch_is_gone_at_once_and_comes_back_known_zero() {
    let pool = quiet(2, 1).build().unwrap();
    let mut blocks: Vec<_> = (0..512).map(|_| pool.alloc(0).unwrap()).collect();
    for b in &mut blocks {
        b.as_mut_slice().fill(0xAB);
    }
    let ptrs: Vec<*const u8> = blocks.iter().map(|b| b.as_ptr() as *const u8).collect();
    let report = pool.free_batch(blocks, Advice::DontNeed).unwrap();
    assert_eq!((report.blocks, report.failures), (512, 0));
    assert_eq!(report.bytes, 512 * 4096);
    for &p in &ptrs {
        assert_eq!(
            resident_pages(p, 4096),
            0,
            "an evicted page is still resident"
        );
    }
    let s = assert_balanced(&pool);
    assert_eq!(s.allocated_bytes, 0);
    assert!(
        s.zero_bytes >= 512 * 4096,
        "evicted blocks are known-zero:\n{s}"
    );
    // A zeroed allocation takes them without a memset, and they read as zeros.
    let again = pool.alloc_zeroed(0).unwrap();
    assert!(again.as_slice().iter().all(|&b| b == 0));
    pool.free(again);
    assert_all_free(&pool);
}

#[test]
fn a_free_batch_is_hinted_and_a_keep_batch_is_an_ordinary_free() {
    let pool = quiet(2, 1).build().unwrap();
    let blocks: Vec<_> = (0..64).map(|_| pool.alloc(2).unwrap()).collect();
    let report = pool.free_batch(blocks, Advice::Free).unwrap();
    assert_eq!(report.blocks, 64);
    let s = assert_balanced(&pool);
    assert!(s.hinted_bytes >= 64 * (16 << 10), "{s}");
    let blocks: Vec<_> = (0..64).map(|_| pool.alloc(1).unwrap()).collect();
    let report = pool.free_batch(blocks, Advice::Keep).unwrap();
    assert_eq!(report.blocks, 0, "nothing advised");
    assert_all_free(&pool);
}

#[test]
fn a_bad_batch_is_refused_whole_and_the_pool_is_unchanged() {
    let pool = quiet(2, 1).build().unwrap();
    let other = quiet(1, 1).build().unwrap();
    // A block of another pool: refused, and every block comes back.
    let mut blocks: Vec<_> = (0..8).map(|_| pool.alloc(0).unwrap()).collect();
    blocks.insert(5, other.alloc(0).unwrap());
    let before = pool.stats();
    let (err, back) = pool.free_batch(blocks, Advice::DontNeed).unwrap_err();
    assert_eq!(
        err,
        BatchError {
            index: 5,
            error: FreeError::OutsideRegion
        }
    );
    assert_eq!(pool.stats(), before, "nothing was freed");
    assert_eq!(back.len(), 9);
    let mut back = back;
    other.free(back.remove(5));
    let ptrs: Vec<NonNull<u8>> = back.into_iter().map(|b| b.into_raw()).collect();
    // SAFETY (the rest): pointers of live blocks of this pool, or deliberately bad ones that
    // the pool refuses before changing anything.
    unsafe {
        // An interior pointer, a pointer outside, a block named twice, a free block.
        let inside = NonNull::new(ptrs[2].as_ptr().add(64)).unwrap();
        let outside = NonNull::new(0x1000 as *mut u8).unwrap();
        for (bad, at, error) in [
            (inside, 3, FreeError::NotBlockStart),
            (outside, 0, FreeError::OutsideRegion),
            (ptrs[4], 7, FreeError::AlreadyFree),
        ] {
            let mut batch = ptrs.clone();
            batch.insert(at, bad);
            let before = pool.stats();
            let err = pool.free_raw_batch(&batch, Advice::DontNeed).unwrap_err();
            assert_eq!(err.error, error, "{err}");
            assert_eq!(
                err.index,
                if error == FreeError::AlreadyFree {
                    7
                } else {
                    at
                }
            );
            assert_eq!(pool.stats(), before, "nothing was freed");
        }
        let freed = pool.alloc(0).unwrap().into_raw();
        assert_eq!(pool.free_raw(freed), Ok(0));
        let mut batch = ptrs.clone();
        batch.push(freed);
        let err = pool.free_raw_batch(&batch, Advice::Free).unwrap_err();
        assert_eq!(
            err,
            BatchError {
                index: 8,
                error: FreeError::AlreadyFree
            }
        );
        // The good batch alone goes through.
        let report = pool.free_raw_batch(&ptrs, Advice::DontNeed).unwrap();
        assert_eq!(report.blocks, 8);
    }
    assert_all_free(&pool);
    assert_all_free(&other);
}

#[test]
fn an_empty_batch_does_nothing() {
    let pool: PagePool = quiet(1, 1).build().unwrap();
    let report = pool.free_batch(Vec::new(), Advice::DontNeed).unwrap();
    assert_eq!(report.blocks, 0);
    // SAFETY: no pointers.
    assert_eq!(
        unsafe { pool.free_raw_batch(&[], Advice::Free) }
            .unwrap()
            .blocks,
        0
    );
    assert_all_free(&pool);
}
