use pagepool::*;
#[test]
fn smoke() {
    let pool = PagePool::builder().capacity(64 << 20).max_order(10).shards(2).hint_thread(false).build().unwrap();
    let mut blocks = vec![];
    for i in 0..200 { let mut b = pool.alloc((i % 5) as u8).unwrap(); b.as_mut_slice()[0] = i as u8; blocks.push(b); }
    pool.check_consistency().unwrap();
    for b in blocks { pool.free(b); }
    pool.check_consistency().unwrap();
    pool.drain_caches();
    pool.check_consistency().unwrap();
    let s = pool.stats();
    println!("{s}");
    assert_eq!(s.free_bytes, 64 << 20);
    // exhaust
    let mut all = vec![];
    while let Ok(b) = pool.alloc(10) { all.push(b); }
    assert_eq!(all.len(), 16);
    pool.check_consistency().unwrap();
    for b in all { pool.free(b); }
    let r = pool.hint_now();
    println!("{r:?}\n{}", pool.stats());
    pool.check_consistency().unwrap();
    let z = pool.alloc_zeroed(3).unwrap();
    assert!(z.as_slice().iter().all(|&x| x == 0));
    let p = z.into_raw();
    unsafe { assert_eq!(pool.free_raw(p), Ok(3)); assert_eq!(pool.free_raw(p), Err(FreeError::AlreadyFree)); }
    pool.check_consistency().unwrap();
}
