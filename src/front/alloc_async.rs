//! [`AllocAsync`]: capture for async code. A future that waits for a large block without
//! parking a thread, woken by the free that completes the block.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::AllocError;
use crate::front::block::Block;
use crate::front::page_pool::PagePool;
use crate::pool::wait::AsyncWait;

impl PagePool {
    /// Allocates a block of `4 KiB << order` bytes; when the pool is exhausted, waits for
    /// one without blocking the thread: the request is queued for capture (see
    /// [`alloc_wait`](Self::alloc_wait)), and the free that coalesces a block of `order`
    /// hands it over and wakes the task.
    ///
    /// The future works under any executor: it keeps the task's `Waker` and needs no
    /// runtime, timer or thread. It has no deadline of its own; put one around it (for
    /// example `tokio::time::timeout`). Dropping it before it completes withdraws the
    /// request and ends its reservation; a block handed over at that very moment is freed,
    /// so cancelling leaks nothing.
    ///
    /// Only capture wakes a waiting task, so orders below
    /// [`capture_min_order`](crate::PoolBuilder::capture_min_order), or any order with
    /// capture switched off, do not wait: they complete at once with
    /// [`AllocError::Exhausted`] when the pool is exhausted.
    ///
    /// ```
    /// use pagepool::PagePool;
    /// use std::task::{Context, Poll, Waker};
    ///
    /// let pool = PagePool::builder().capacity(16 << 20).hint_thread(false).build()?;
    /// let mut fut = std::pin::pin!(pool.alloc_async(9));
    /// // Any executor polls it; with memory free it is ready at the first poll.
    /// let Poll::Ready(block) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) else {
    ///     unreachable!("the pool has free memory");
    /// };
    /// pool.free(block?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// The future's output: as [`alloc`](Self::alloc); `Exhausted` only as described above.
    pub fn alloc_async(&self, order: u8) -> AllocAsync<'_> {
        AllocAsync {
            pool: self,
            order,
            wait: AsyncWait::new(self.core(), order),
        }
    }
}

/// The future of [`PagePool::alloc_async`].
#[must_use = "futures do nothing unless polled; dropping it cancels the request"]
pub struct AllocAsync<'pool> {
    pool: &'pool PagePool,
    order: u8,
    wait: AsyncWait<'pool>,
}

impl Future for AllocAsync<'_> {
    type Output = Result<Block, AllocError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Nothing in it is self-referential: it is `Unpin`.
        let this = self.get_mut();
        this.wait
            .poll(cx)
            .map(|got| got.map(|idx| this.pool.block_at(idx, this.order)))
    }
}

impl std::fmt::Debug for AllocAsync<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllocAsync")
            .field("order", &self.order)
            .finish_non_exhaustive()
    }
}
