//! The hinter thread: one per process, serving every pool that asked for hinting.
//!
//! It sleeps on the registry's doorbell until a free asks for a pass (through the pool's
//! `HintSignal`) or a pass it scheduled is due, runs one pass on one pool at a time, and
//! schedules that pool's next pass from what the pass found (`next_pass`). A pool whose
//! passes found nothing left goes idle until a free asks again, but not before an interval
//! has passed.
//!
//! # Starting and stopping
//! [`start_hinting`](Registry::start_hinting), [`stop_hinting`](Registry::stop_hinting) and
//! [`leave`](Registry::leave) are linearisable: each takes the registry lock, a spawn
//! happens outside it with the thread marked "spawning" (others wait for it), and a thread
//! runs only while the generation it was started with is current. Stopping the last pool
//! bumps the generation and joins the thread (marked "stopping" meanwhile, and a start
//! waits for that), so a start racing with a stop either finds the thread running or
//! starts a new one after the old one is gone: there is never more than one, and never an
//! old one waiting for a stop it cannot see. A stop waits while a pass runs on its pool.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::time::Instant;

use super::PoolCore;
use super::registry::{Registry, State, Thread};
use crate::policy::hint::{cold_ms, next_pass};
use crate::sync::{MutexGuard, Ordering, process_id};

impl Registry {
    /// Starts hinting `core`: the thread serves it from now on (spawned if none runs in
    /// this process), with a first pass requested.
    ///
    /// # Errors
    /// When the thread cannot be spawned; then `core` is not hinted.
    pub(crate) fn start_hinting(&'static self, core: &PoolCore) -> std::io::Result<()> {
        let pid = process_id();
        let mut state = self.settled();
        if let Thread::Running { pid: owner, .. } = &state.thread
            && *owner != pid
        {
            // A thread of the parent process: it does not exist here (fork handlers
            // normally cleared it already).
            if let Thread::Running { handle, .. } =
                std::mem::replace(&mut state.thread, Thread::None)
            {
                std::mem::forget(handle);
            }
        }
        // SAFETY: under the registry lock.
        let entry = unsafe { core.entry.get() };
        if !entry.hinting {
            entry.hinting = true;
            entry.due = None;
            entry.not_before = None;
            state.hinting += 1;
        }
        core.signal.start_listening();
        if matches!(state.thread, Thread::Running { .. }) {
            return Ok(());
        }
        state.thread = Thread::Spawning;
        let generation = state.generation;
        drop(state);
        // Spawning allocates: never under the registry lock.
        let spawned = super::background::spawn("pagepool-hinter", move || serve(self, generation));
        let mut state = self.state.lock();
        let result = match spawned {
            Ok(handle) => {
                state.thread = Thread::Running { pid, handle };
                Ok(())
            }
            Err(err) => {
                state.thread = Thread::None;
                // SAFETY: under the registry lock.
                let entry = unsafe { core.entry.get() };
                if entry.hinting {
                    entry.hinting = false;
                    state.hinting -= 1;
                }
                core.signal.stop_listening();
                Err(err)
            }
        };
        self.changed.notify_all();
        result
    }

    /// Stops hinting `core` and waits for a pass on it to end. Stops the thread (and waits
    /// for it to exit) when no pool is hinted any more.
    pub(crate) fn stop_hinting(&self, core: &PoolCore) {
        let mut state = self.settled();
        // SAFETY: under the registry lock.
        let entry = unsafe { core.entry.get() };
        if entry.hinting {
            entry.hinting = false;
            entry.due = None;
            state.hinting -= 1;
        }
        core.signal.stop_listening();
        while ptr::eq(state.busy, core) {
            state = self.changed.wait(state);
        }
        if state.hinting > 0 {
            return;
        }
        let (pid, handle) = match std::mem::replace(&mut state.thread, Thread::Stopping) {
            Thread::Running { pid, handle } => (pid, handle),
            other => {
                state.thread = other;
                return;
            }
        };
        state.generation += 1;
        drop(state);
        self.doorbell.ring();
        if pid == process_id() {
            let _ = handle.join();
        } else {
            std::mem::forget(handle); // a thread of another process
        }
        let mut state = self.state.lock();
        state.thread = Thread::None;
        self.changed.notify_all();
    }

    /// Whether the thread runs in this process and serves `core`.
    pub(crate) fn hinting(&self, core: &PoolCore) -> bool {
        let state = self.state.lock();
        // SAFETY: under the registry lock.
        let entry = unsafe { core.entry.get() };
        entry.hinting && matches!(state.thread, Thread::Running { pid, .. } if pid == process_id())
    }

    /// The registry lock, once no spawn or join is in flight.
    fn settled(&self) -> MutexGuard<'_, State> {
        let mut state = self.state.lock();
        while matches!(state.thread, Thread::Spawning | Thread::Stopping) {
            state = self.changed.wait(state);
        }
        state
    }
}

/// Marks the thread gone when it returns or unwinds, so a dead thread is never reported as
/// running, and wakes whoever waits for its pass to end.
struct Exit {
    registry: &'static Registry,
    generation: u64,
}

impl Drop for Exit {
    fn drop(&mut self) {
        let mut state = self.registry.state.lock();
        state.busy = ptr::null();
        if state.generation == self.generation && matches!(state.thread, Thread::Running { .. }) {
            // Exiting on its own (a panic): nobody will join it.
            state.thread = Thread::None;
        }
        self.registry.changed.notify_all();
    }
}

/// The thread's loop; see the module docs.
fn serve(registry: &'static Registry, generation: u64) {
    let _exit = Exit {
        registry,
        generation,
    };
    loop {
        let mut state = registry.state.lock();
        if state.generation != generation {
            return;
        }
        let now = Instant::now();
        let (chosen, wake_at) = choose(&state, now);
        let Some(core) = chosen else {
            drop(state);
            registry
                .doorbell
                .wait(wake_at.map(|at| at.saturating_duration_since(Instant::now())));
            continue;
        };
        state.busy = core;
        drop(state);
        // SAFETY: `core` is listed and `busy`: `leave` waits until we clear `busy`.
        let core = unsafe { &*core };
        let config = core.config.hint;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            // Caches above the pool first: what they give back can be hinted now.
            let cached_warm_in = core.release_idle_caches(Some(cold_ms(&config)));
            let mut outcome = core.regular_pass();
            if let Some(wait) = cached_warm_in {
                outcome.come_back_within(wait);
            }
            outcome
        }));
        let mut state = registry.state.lock();
        state.busy = ptr::null();
        // SAFETY: under the registry lock; still listed (see above).
        let entry = unsafe { core.entry.get() };
        let done = Instant::now();
        let next = match &outcome {
            Ok(outcome) => next_pass(outcome, &config),
            Err(_) => {
                core.hint_counters.panics.fetch_add(1, Ordering::Relaxed);
                Some(config.interval)
            }
        };
        // Whatever asks next, no pass before an interval has passed: a busy allocator's
        // requests cannot keep the thread spinning.
        entry.not_before = done.checked_add(config.interval);
        match next.and_then(|after| done.checked_add(after)) {
            Some(due) => entry.due = Some(due),
            None => {
                entry.due = None;
                core.signal.finish();
            }
        }
        registry.changed.notify_all();
    }
}

/// The pool whose pass is due now, if any, and otherwise when the next one is due.
fn choose(state: &State, now: Instant) -> (Option<*const PoolCore>, Option<Instant>) {
    let mut wake_at: Option<Instant> = None;
    for core in state.pools() {
        // SAFETY: under the registry lock (borrowed through `state`).
        let entry = unsafe { core.entry.get() };
        if !entry.hinting {
            continue;
        }
        if core.signal.take_request() {
            let at = entry.not_before.map_or(now, |t| t.max(now));
            entry.due = Some(entry.due.map_or(at, |due| due.min(at)));
        }
        match entry.due {
            Some(due) if due <= now => return (Some(core), None),
            Some(due) => wake_at = Some(wake_at.map_or(due, |w| w.min(due))),
            None => {}
        }
    }
    (None, wake_at)
}
