//! loom models of the portable implementation: operations on CPU 0 (loom's only CPU)
//! race with drains of it, and every item must exist exactly once at the end.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p pagepool --lib --release -- percpu`
//! (`loom-tests/run.sh` does, with the repository's `LOOM_MAX_PREEMPTIONS=2`). The rseq
//! implementation cannot be modelled: its atomicity comes from the kernel.
//!
//! A bound of 3 does not finish `batches_race_with_two_drains`: when both drains wait for
//! the gate at once, loom 0.7 explores ever longer executions of the two spinning threads
//! (a plain three-thread spin lock built from `close_gate` shows the same), and stops at
//! its limit on branches.

use loom::thread;

use super::{CpuCacheImpl, PerCpuStacks};
use crate::os::mapping::Backing;
use crate::sync::Arc;

/// One CPU, one class of `capacity` slots.
fn stacks(capacity: u32) -> Arc<PerCpuStacks> {
    let stacks = PerCpuStacks::with_cpus(&[capacity], 1, CpuCacheImpl::Portable, Backing::Heap)
        .expect("heap-backed stacks");
    Arc::new(stacks)
}

/// Appends every item a drain of CPU 0 hands over to `into`.
fn drain(stacks: &PerCpuStacks, into: &mut Vec<u64>) {
    assert!(stacks.drain_cpu(0, |class, items| {
        assert_eq!(class, 0);
        into.extend_from_slice(items);
    }));
}

/// `found` holds exactly `expected`, in any order.
fn exactly_once(mut found: Vec<u64>, expected: &[u64]) {
    found.sort_unstable();
    assert_eq!(found, expected, "an item was lost or duplicated");
}

/// Two threads push and pop single items while the main thread drains the CPU.
#[test]
fn push_pop_race_with_a_drain() {
    loom::model(|| {
        let stacks = stacks(2);
        let workers: Vec<_> = [[1u64, 2], [3, 4]]
            .into_iter()
            .map(|items| {
                let stacks = stacks.clone();
                thread::spawn(move || {
                    let mut mine = Vec::new();
                    for item in items {
                        if let Err(item) = stacks.push(0, item) {
                            mine.push(item); // full or busy: the slow path keeps it
                        }
                    }
                    mine.extend(stacks.pop(0));
                    mine
                })
            })
            .collect();
        let mut found = Vec::new();
        drain(&stacks, &mut found);
        for worker in workers {
            found.extend(worker.join().unwrap());
        }
        drain(&stacks, &mut found);
        exactly_once(found, &[1, 2, 3, 4]);
        assert_eq!(stacks.len(0, 0), 0);
    });
}

/// Batches race with a drain, and two drains race with each other.
#[test]
fn batches_race_with_two_drains() {
    loom::model(|| {
        let stacks = stacks(3);
        let worker = {
            let stacks = stacks.clone();
            thread::spawn(move || {
                let items = [1u64, 2, 3];
                let pushed = stacks.push_batch(0, &items);
                let mut mine = items[pushed..].to_vec();
                let mut out = [0u64; 2];
                let taken = stacks.pop_batch(0, &mut out);
                if taken.len > 0 {
                    assert_eq!(taken.cpu, Some(0));
                }
                mine.extend_from_slice(&out[..taken.len]);
                mine
            })
        };
        let drainer = {
            let stacks = stacks.clone();
            thread::spawn(move || {
                let mut got = Vec::new();
                drain(&stacks, &mut got);
                got
            })
        };
        let mut found = Vec::new();
        drain(&stacks, &mut found);
        found.extend(worker.join().unwrap());
        found.extend(drainer.join().unwrap());
        drain(&stacks, &mut found);
        exactly_once(found, &[1, 2, 3]);
    });
}

/// A pop that overlaps a drain either takes the item or fails; the activity mark is
/// set by the operation and taken once.
#[test]
fn pop_races_with_a_drain_and_activity_is_taken_once() {
    loom::model(|| {
        let stacks = stacks(1);
        stacks.push(0, 7).unwrap();
        assert!(stacks.take_activity(0));
        let popper = {
            let stacks = stacks.clone();
            thread::spawn(move || stacks.pop(0))
        };
        let mut found = Vec::new();
        drain(&stacks, &mut found);
        let popped = popper.join().unwrap();
        found.extend(popped);
        exactly_once(found, &[7]);
        // The pop ran (and marked the CPU active) unless the drain held the lock.
        let active = stacks.take_activity(0);
        if popped.is_some() {
            assert!(active);
        }
        assert!(!stacks.take_activity(0));
    });
}
