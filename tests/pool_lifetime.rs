//! A `Block` is a safe handle: its memory must stay valid even if its pool goes first.

use pagepool::PagePool;

#[test]
fn a_block_outliving_its_pool_stays_valid_memory() {
    let pool = PagePool::builder()
        .capacity(8 << 20)
        .hint_thread(true)
        .build()
        .unwrap();
    let mut block = pool.alloc(4).unwrap();
    block.as_mut_slice().fill(3);
    drop(pool); // stops the hinter; the region is leaked, not unmapped, since a block lives
    block.as_mut_slice().fill(4);
    assert!(block.as_slice().iter().all(|&b| b == 4));
}
