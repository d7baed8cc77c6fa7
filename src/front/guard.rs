//! Blocks that free themselves: [`BlockGuard`] borrows its pool, [`OwnedBlock`] holds an
//! `Arc` of it. For code that would rather have `Box` semantics than remember to call
//! [`PagePool::free`].

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};

use crate::error::AllocError;
use crate::front::block::Block;
use crate::front::page_pool::PagePool;
use std::sync::Arc;

impl PagePool {
    /// Allocates a block that goes back to this pool when the guard is dropped.
    ///
    /// ```
    /// use pagepool::PagePool;
    ///
    /// let pool = PagePool::builder().capacity(16 << 20).hint_thread(false).build()?;
    /// {
    ///     let mut page = pool.alloc_guarded(0)?;
    ///     page[..5].copy_from_slice(b"hello");
    /// } // freed here
    /// assert_eq!(pool.stats().allocated_bytes, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`alloc`](Self::alloc).
    pub fn alloc_guarded(&self, order: u8) -> Result<BlockGuard<'_>, AllocError> {
        Ok(BlockGuard::new(self.alloc(order)?, self))
    }

    /// Allocates a block that holds an `Arc` of this pool and goes back to it when dropped:
    /// `'static`, `Send` and `Sync`, so it can move into spawned threads and tasks.
    ///
    /// ```
    /// use pagepool::PagePool;
    /// use std::sync::Arc;
    ///
    /// let pool = Arc::new(PagePool::builder().capacity(16 << 20).hint_thread(false).build()?);
    /// let page = pool.alloc_owned(0)?;
    /// std::thread::spawn(move || assert_eq!(page.len(), 4096)).join().unwrap();
    /// assert_eq!(pool.stats().allocated_bytes, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`alloc`](Self::alloc).
    pub fn alloc_owned(self: &Arc<Self>, order: u8) -> Result<OwnedBlock, AllocError> {
        Ok(OwnedBlock::new(self.alloc(order)?, self.clone()))
    }
}

/// A block of a borrowed pool, freed when dropped. Dereferences to its bytes.
///
/// Made by [`PagePool::alloc_guarded`] or [`BlockGuard::new`];
/// [`into_block`](Self::into_block) turns it back into a plain [`Block`].
pub struct BlockGuard<'pool> {
    block: ManuallyDrop<Block>,
    pool: &'pool PagePool,
}

impl<'pool> BlockGuard<'pool> {
    /// Frees `block` to `pool` when dropped.
    ///
    /// # Panics
    /// When the guard is dropped, if `block` does not belong to `pool` (as
    /// [`PagePool::free`]).
    pub fn new(block: Block, pool: &'pool PagePool) -> Self {
        Self {
            block: ManuallyDrop::new(block),
            pool,
        }
    }

    /// The block, no longer freed on drop.
    pub fn into_block(self) -> Block {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the block is taken exactly once.
        unsafe { ManuallyDrop::take(&mut this.block) }
    }

    /// The block.
    pub fn block(&self) -> &Block {
        &self.block
    }

    /// The pool it goes back to.
    pub fn pool(&self) -> &'pool PagePool {
        self.pool
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: dropped once; the field is not used after.
        self.pool
            .free(unsafe { ManuallyDrop::take(&mut self.block) });
    }
}

/// A block of a shared pool, freed when dropped; it keeps the pool alive. Dereferences
/// to its bytes.
///
/// Made by [`PagePool::alloc_owned`] or [`OwnedBlock::new`].
pub struct OwnedBlock {
    block: ManuallyDrop<Block>,
    pool: Arc<PagePool>,
}

impl OwnedBlock {
    /// Frees `block` to `pool` when dropped.
    ///
    /// # Panics
    /// When dropped, if `block` does not belong to `pool` (as [`PagePool::free`]).
    pub fn new(block: Block, pool: Arc<PagePool>) -> Self {
        Self {
            block: ManuallyDrop::new(block),
            pool,
        }
    }

    /// The block, no longer freed on drop, and the pool it belongs to.
    pub fn into_parts(self) -> (Block, Arc<PagePool>) {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so each field is taken exactly once.
        unsafe {
            (
                ManuallyDrop::take(&mut this.block),
                std::ptr::read(&this.pool),
            )
        }
    }

    /// The block.
    pub fn block(&self) -> &Block {
        &self.block
    }

    /// The pool it goes back to.
    pub fn pool(&self) -> &Arc<PagePool> {
        &self.pool
    }
}

impl Drop for OwnedBlock {
    fn drop(&mut self) {
        // SAFETY: dropped once; the field is not used after.
        self.pool
            .free(unsafe { ManuallyDrop::take(&mut self.block) });
    }
}

/// The bytes of both guards, through their block.
macro_rules! deref_to_bytes {
    ($guard:ty) => {
        impl Deref for $guard {
            type Target = [u8];
            fn deref(&self) -> &[u8] {
                self.block.as_slice()
            }
        }

        impl DerefMut for $guard {
            fn deref_mut(&mut self) -> &mut [u8] {
                self.block.as_mut_slice()
            }
        }

        impl std::fmt::Debug for $guard {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($guard))
                    .field("block", &*self.block)
                    .finish()
            }
        }
    };
}

deref_to_bytes!(BlockGuard<'_>);
deref_to_bytes!(OwnedBlock);
