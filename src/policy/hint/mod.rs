//! Layer 3, policy: free page hinting. Cold, high-order free blocks go back to the OS in
//! bounded batches.
//!
//! Linux's free page reporting (`mm/page_reporting.c`, from the 2019 free page hinting
//! series), in userspace:
//!
//! - **Trigger.** A free that leaves an unhinted block at or above the hint order checks the
//!   shard's count of such blocks against a high-water mark and, if it is reached, requests
//!   a pass. A three-state atomic (idle, requested, active) makes sure at most one wake-up
//!   is sent however many frees race; the thread sleeps otherwise, so an idle pool costs
//!   no CPU. A free into a shard's empty small-block cache requests a pass too: cached
//!   blocks turn cold like any other, and a pass merges the cold ones so they can be
//!   hinted.
//! - **Isolate, advise, return.** Under the shard lock, up to a batch of cold blocks (free
//!   for at least the hint delay) is taken off the lists and marked isolated, so nobody
//!   allocates or merges them. The lock is dropped for the system call. Then, under the
//!   lock again, each block goes back through the normal free path, so it can merge: at the
//!   list tail as hinted (or known-zero after `MADV_DONTNEED`), or, if the advice failed,
//!   as unhinted and warm, to be retried after another delay. A pass stops after its byte
//!   budget (a pass whose first block is larger than the whole budget still takes that
//!   block, so every block can be hinted); the thread then waits an interval before the
//!   next. A budget miss always means "come back", never "done".
//! - **Batching.** Where `process_madvise` on the own process works (Linux 6.13+), a batch
//!   is one system call; otherwise one `madvise` per block.
//! - **Faults.** The advisor runs inside `catch_unwind`: a panic counts as a failure of the
//!   batch, the blocks return unhinted, and no lock is held while it runs.
//!
//! Files: [`signal`] (the wake-up state machine and the doorbell the thread sleeps on),
//! [`pass`] (one pass over a pool, and when the next is due). The thread itself serves
//! every pool of the process and lives with the pool registry (`pool::hinter`).
//!
//! Layer 3. May call: `shard` (isolation), `frame_table`, `config`, `os`, `sync`.

mod pass;
mod signal;

pub(crate) use pass::{
    HintCounters, HintTarget, PassOutcome, PassPlan, cold_ms, next_pass, run_pass,
};
pub(crate) use signal::{Doorbell, HintSignal};
