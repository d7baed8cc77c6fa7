//! The `pagepool-pressure` thread and its registration in the registry; see the parent
//! module's docs for the design.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::MAX_PRESSURE_SOURCES;
use crate::config::PressureSource;
use crate::os::pressure::{EventSource, Waker, poll};
use crate::pool::PoolCore;
use crate::pool::registry::{Registry, State, Thread};
use crate::sync::{MutexGuard, process_id};

/// What makes two requests the same source: the file (device, inode), the kind, and its
/// parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    kind: u8,
    file: (u64, u64),
    params: (u64, u64),
}

/// One open source and the pools that watch it.
struct Slot {
    source: EventSource,
    key: Key,
    settle: Duration,
    /// Pools watching it. At 0 it is closed: by the thread if one runs, else at once.
    refs: usize,
    /// It will report nothing more: not polled.
    gone: bool,
}

/// The watcher's share of the registry state, under the registry lock.
pub(crate) struct Watch {
    thread: Thread,
    /// Bumped to tell the running thread to exit.
    generation: u64,
    /// Pools watching.
    pools: usize,
    /// The pool the thread releases right now, if any (it must not leave meanwhile).
    busy: *const PoolCore,
    sources: [Option<Slot>; MAX_PRESSURE_SOURCES],
    /// Wakes the thread out of `poll`; exists while a thread may run.
    waker: Option<Waker>,
    /// Events so far; a watching pool is released once per event.
    epoch: u64,
    /// While pressure lasts: when it ends unless another event comes.
    until: Option<Instant>,
}

/// A pool's share of its registry entry, under the registry lock.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EntryWatch {
    /// The source it watches.
    slot: Option<usize>,
    /// The last event it was released for.
    seen: u64,
}

impl Watch {
    pub(crate) const fn new() -> Self {
        Self {
            thread: Thread::None,
            generation: 0,
            pools: 0,
            busy: ptr::null(),
            sources: [const { None }; MAX_PRESSURE_SOURCES],
            waker: None,
            epoch: 0,
            until: None,
        }
    }

    fn wake(&self) {
        if let Some(waker) = &self.waker {
            waker.wake();
        }
    }

    fn thread_runs(&self) -> bool {
        matches!(self.thread, Thread::Running { .. })
    }

    /// Takes `core` off its source; returns the source if it must be closed now (no
    /// thread runs to close it), to be dropped after the lock.
    fn unregister(&mut self, core: &PoolCore, entry: &mut EntryWatch) -> Option<Slot> {
        let slot = entry.slot.take()?;
        self.pools -= 1;
        core.pressure.watching.store(false, Ordering::Relaxed);
        let open = self.sources[slot].as_mut().expect("a watched slot is open");
        open.refs -= 1;
        if open.refs == 0 && !self.thread_runs() {
            self.sources[slot].take()
        } else {
            None
        }
    }
}

/// Opens `source` (in the caller's context: it allocates).
fn open(source: &PressureSource) -> io::Result<(EventSource, Key)> {
    let us = |d: Duration| d.as_micros().min(u64::MAX as u128) as u64;
    let (opened, kind, params) = match source {
        PressureSource::Psi {
            path,
            stall,
            window,
        } => (
            EventSource::psi(path, us(*stall), us(*window))?,
            0,
            (us(*stall), us(*window)),
        ),
        PressureSource::CgroupEvents { path } => (EventSource::cgroup_events(path)?, 1, (0, 0)),
        PressureSource::CgroupV1 {
            path,
            level,
            usage_threshold,
        } => (
            EventSource::cgroup_v1(path, level.as_str(), *usage_threshold)?,
            2,
            (*level as u64, usage_threshold.unwrap_or(0)),
        ),
        PressureSource::FileModified { path, settle } => {
            (EventSource::file_modified(path)?, 3, (us(*settle), 0))
        }
    };
    let key = Key {
        kind,
        file: opened.identity(),
        params,
    };
    Ok((opened, key))
}

impl Registry {
    /// Makes the watcher thread serve `core` with `source` (replacing the source it
    /// watched, if any), starting the thread if none runs in this process. While pressure
    /// lasts, `core` is released at once.
    ///
    /// # Errors
    /// An invalid source ([`io::ErrorKind::InvalidInput`], holding a
    /// [`PressureSourceError`](crate::PressureSourceError)); a missing kernel interface
    /// ([`io::ErrorKind::Unsupported`]) or another failure to open it; more distinct
    /// sources than [`MAX_PRESSURE_SOURCES`]; the thread could not be spawned. `core`
    /// then watches what it watched before (nothing after a failed spawn).
    pub(crate) fn start_watching(
        &'static self,
        core: &PoolCore,
        source: &PressureSource,
    ) -> io::Result<()> {
        source.validate()?;
        let (opened, key) = open(source)?;
        let settle = source.settle();
        let pid = process_id();
        // Dropped (closed) after the lock: a duplicate of an open source, a source left.
        let mut spare = Some(opened);
        let mut state = self.watch_settled();
        // SAFETY: under the registry lock.
        let entry = unsafe { &mut core.entry.get().watch };
        let w = &mut state.pressure;
        if let Thread::Running { pid: owner, .. } = &w.thread
            && *owner != pid
        {
            // A thread of the parent process (the fork handler normally cleared it).
            if let Thread::Running { handle, .. } = std::mem::replace(&mut w.thread, Thread::None) {
                std::mem::forget(handle);
            }
        }
        let same = w
            .sources
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.key == key));
        if same.is_some() && same == entry.slot {
            drop(state);
            return Ok(()); // already watching this source
        }
        let slot = match same.or_else(|| w.sources.iter().position(Option::is_none)) {
            Some(slot) => slot,
            None => {
                drop(state);
                drop(spare);
                return Err(io::Error::other(format!(
                    "pagepool: {MAX_PRESSURE_SOURCES} different pressure sources are \
                     watched already; watch one of those"
                )));
            }
        };
        if w.sources[slot].is_none() {
            w.sources[slot] = Some(Slot {
                source: spare.take().expect("opened above"),
                key,
                settle,
                refs: 0,
                gone: false,
            });
        }
        let left = w.unregister(core, entry);
        w.sources[slot].as_mut().expect("just filled").refs += 1;
        *entry = EntryWatch {
            slot: Some(slot),
            seen: 0, // released at once if pressure lasts now
        };
        w.pools += 1;
        core.pressure.watching.store(true, Ordering::Relaxed);
        if w.thread_runs() {
            w.wake(); // a new source to poll, or a pool to release now
            drop(state);
            drop((spare, left));
            return Ok(());
        }
        // No thread: start one (after a panic it may have left sources and pools behind).
        if w.waker.is_none() {
            // An eventfd: a system call, no allocation.
            match Waker::new() {
                Ok(waker) => w.waker = Some(waker),
                Err(err) => {
                    let closed = w.unregister(core, entry);
                    drop(state);
                    drop((spare, left, closed));
                    return Err(err);
                }
            }
        }
        w.thread = Thread::Spawning;
        let generation = w.generation;
        drop(state);
        drop((spare, left));
        // Spawning allocates: never under the registry lock.
        let spawned =
            crate::pool::background::spawn("pagepool-pressure", move || serve(self, generation));
        let mut state = self.state.lock();
        let mut closed = None;
        let result = match spawned {
            Ok(handle) => {
                state.pressure.thread = Thread::Running { pid, handle };
                Ok(())
            }
            Err(err) => {
                state.pressure.thread = Thread::None;
                // SAFETY: under the registry lock.
                let entry = unsafe { &mut core.entry.get().watch };
                closed = state.pressure.unregister(core, entry);
                Err(err)
            }
        };
        self.changed.notify_all();
        drop(state);
        drop(closed);
        result
    }

    /// Stops watching for `core` and waits while the thread releases it; leaves pressure
    /// mode. Stops the thread (and waits for it to exit) when no pool watches any more.
    pub(crate) fn stop_watching(&self, core: &PoolCore) {
        let mut state = self.watch_settled();
        // SAFETY: under the registry lock.
        let entry = unsafe { &mut core.entry.get().watch };
        if entry.slot.is_none() {
            return;
        }
        let closed = state.pressure.unregister(core, entry);
        while ptr::eq(state.pressure.busy, core) {
            state = self.changed.wait(state);
        }
        // After the release that may have run: nobody turns it back on now.
        core.set_pressure(false);
        let w = &mut state.pressure;
        if w.pools > 0 {
            w.wake(); // to close the source if nobody else watches it
            drop(state);
            drop(closed);
            return;
        }
        let (pid, handle) = match std::mem::replace(&mut w.thread, Thread::Stopping) {
            Thread::Running { pid, handle } => (pid, handle),
            other => {
                // No thread (it panicked): close what is left here.
                w.thread = other;
                let rest = w.close_all();
                drop(state);
                drop((closed, rest));
                return;
            }
        };
        w.generation += 1;
        w.wake();
        drop(state);
        drop(closed);
        if pid == process_id() {
            let _ = handle.join();
        } else {
            std::mem::forget(handle); // a thread of another process
        }
        let mut state = self.state.lock();
        state.pressure.thread = Thread::None;
        let rest = state.pressure.close_all();
        self.changed.notify_all();
        drop(state);
        drop(rest);
    }

    /// Whether `core` watches for pressure and the thread runs in this process.
    pub(crate) fn watching(&self, core: &PoolCore) -> bool {
        let state = self.state.lock();
        // SAFETY: under the registry lock.
        let entry = unsafe { core.entry.get() };
        entry.watch.slot.is_some()
            && matches!(state.pressure.thread, Thread::Running { pid, .. } if pid == process_id())
    }

    /// The registry lock, once no watcher spawn or join is in flight.
    fn watch_settled(&self) -> MutexGuard<'_, State> {
        let mut state = self.state.lock();
        while matches!(state.pressure.thread, Thread::Spawning | Thread::Stopping) {
            state = self.changed.wait(state);
        }
        state
    }
}

/// What [`Watch::close_all`] took out, closed when dropped (after the lock).
type Closed = ([Option<Slot>; MAX_PRESSURE_SOURCES], Option<Waker>);

impl Watch {
    /// Takes out every source nobody watches, to be closed after the lock. The running
    /// thread calls this on every round; nobody else while it runs.
    fn close_unwatched(&mut self) -> [Option<Slot>; MAX_PRESSURE_SOURCES] {
        let mut out: [Option<Slot>; MAX_PRESSURE_SOURCES] = [const { None }; MAX_PRESSURE_SOURCES];
        for (slot, out) in self.sources.iter_mut().zip(out.iter_mut()) {
            if slot.as_ref().is_some_and(|s| s.refs == 0) {
                *out = slot.take();
            }
        }
        out
    }

    /// With no pool watching and no thread running: takes out every source and the waker,
    /// and ends pressure.
    fn close_all(&mut self) -> Closed {
        debug_assert_eq!(self.pools, 0);
        self.until = None;
        (self.close_unwatched(), self.waker.take())
    }
}

/// In the child after `fork`, under the registry lock held by the fork handler: no
/// watcher thread exists here. Forgets it, closes the child's copies of the sources and
/// the waker (the parent's stay open in the parent), and makes every pool stop watching.
/// Allocates nothing.
pub(in crate::pool) fn forget_in_child(state: &mut State) {
    let w = &mut state.pressure;
    if let Thread::Running { handle, .. } = std::mem::replace(&mut w.thread, Thread::None) {
        std::mem::forget(handle);
    }
    w.generation += 1;
    w.busy = ptr::null();
    w.until = None;
    w.pools = 0;
    for slot in &mut w.sources {
        drop(slot.take());
    }
    drop(w.waker.take());
    for core in state.pools() {
        // SAFETY: under the registry lock.
        unsafe { core.entry.get() }.watch = EntryWatch::default();
        core.pressure.watching.store(false, Ordering::Relaxed);
        core.set_pressure(false);
    }
}

/// Marks the thread gone when it returns or unwinds (so a dead thread is never reported as
/// running), ends pressure if it dies, and wakes whoever waits for its release to end.
struct Exit {
    registry: &'static Registry,
    generation: u64,
}

impl Drop for Exit {
    fn drop(&mut self) {
        let mut state = self.registry.state.lock();
        state.pressure.busy = ptr::null();
        if state.pressure.generation == self.generation && state.pressure.thread_runs() {
            // Exiting on its own (a panic): nobody will join it.
            state.pressure.thread = Thread::None;
            state.pressure.until = None;
            for core in state.pools() {
                core.set_pressure(false);
            }
        }
        self.registry.changed.notify_all();
    }
}

const NO_FD: libc::pollfd = libc::pollfd {
    fd: -1,
    events: 0,
    revents: 0,
};

/// The thread's loop; see the parent module's docs.
fn serve(registry: &'static Registry, generation: u64) {
    let _exit = Exit {
        registry,
        generation,
    };
    // Entry 0 is the waker; `polled[i]` is the slot of entry `i`.
    let mut fds = [NO_FD; MAX_PRESSURE_SOURCES + 1];
    let mut polled = [0usize; MAX_PRESSURE_SOURCES + 1];
    loop {
        let mut state = registry.state.lock();
        if state.pressure.generation != generation {
            return;
        }
        // Sources nobody watches: only this thread closes them while it runs, so a
        // descriptor it polls is never closed and reused under it.
        let closing = state.pressure.close_unwatched();
        let now = Instant::now();
        if state.pressure.until.is_some_and(|until| until <= now) {
            state.pressure.until = None;
            for core in state.pools() {
                // SAFETY: under the registry lock.
                if unsafe { core.entry.get() }.watch.slot.is_some() {
                    core.set_pressure(false);
                }
            }
        }
        if state.pressure.until.is_some()
            && let Some(core) = next_to_release(&state)
        {
            state.pressure.busy = core;
            // SAFETY: `core` is listed and now `busy`: it cannot leave (or stop watching)
            // until we clear `busy`.
            let core = unsafe { &*core };
            // Under the lock, so a pool that stops watching turns it off after us.
            core.set_pressure(true);
            drop(state);
            drop(closing);
            let released = catch_unwind(AssertUnwindSafe(|| core.release_idle(0)));
            match released {
                Ok(report) => {
                    core.pressure.events.fetch_add(1, Ordering::Relaxed);
                    core.pressure
                        .bytes_released
                        .fetch_add(report.bytes, Ordering::Relaxed);
                }
                Err(_) => {
                    core.hint_counters.panics.fetch_add(1, Ordering::Relaxed);
                }
            }
            let mut state = registry.state.lock();
            state.pressure.busy = ptr::null();
            registry.changed.notify_all();
            continue;
        }
        let w = &state.pressure;
        let mut n = 0;
        if let Some(waker) = &w.waker {
            fds[0] = waker.poll_entry();
            n = 1;
        }
        for (i, slot) in w.sources.iter().enumerate() {
            if let Some(slot) = slot.as_ref().filter(|s| !s.gone) {
                fds[n] = slot.source.poll_entry();
                polled[n] = i;
                n += 1;
            }
        }
        // No timeout unless pressure lasts: idle, the thread costs nothing.
        let timeout = w.until.map(|until| until.saturating_duration_since(now));
        drop(state);
        drop(closing);
        let ready = poll(&mut fds[..n], timeout);
        if ready.is_err() {
            // Cannot happen with valid descriptors (ENOMEM at worst): do not spin.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let mut state = registry.state.lock();
        if state.pressure.generation != generation {
            return;
        }
        let now = Instant::now();
        let w = &mut state.pressure;
        let mut event = false;
        for i in 0..n {
            let revents = fds[i].revents;
            if revents == 0 {
                continue;
            }
            if i == 0
                && let Some(waker) = &w.waker
            {
                waker.drain();
                continue;
            }
            // The slot is still the one polled: only this thread empties slots.
            let Some(slot) = w.sources[polled[i]].as_mut() else {
                continue;
            };
            let got = slot.source.consume(revents);
            slot.gone |= got.gone;
            if got.event {
                event = true;
                let until = now + slot.settle;
                w.until = Some(w.until.map_or(until, |u| u.max(until)));
            }
        }
        if event {
            w.epoch += 1;
        }
    }
}

/// A watching pool not yet released for the latest event, marked as released.
fn next_to_release(state: &State) -> Option<*const PoolCore> {
    let epoch = state.pressure.epoch;
    state.pools().find_map(|core| {
        // SAFETY: under the registry lock (borrowed through `state`).
        let entry = unsafe { &mut core.entry.get().watch };
        if entry.slot.is_some() && entry.seen < epoch {
            entry.seen = epoch;
            Some(core as *const PoolCore)
        } else {
            None
        }
    })
}
