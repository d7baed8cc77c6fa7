//! Watching for memory pressure from a global allocator (see
//! [`PagePool::watch_pressure`](crate::PagePool::watch_pressure) for what it does).

use std::alloc::GlobalAlloc;
use std::io;

use super::PoolAlloc;
use crate::config::PressureSource;
#[cfg(not(miri))]
use crate::pool::registry::registry;

impl<F: GlobalAlloc> PoolAlloc<F> {
    /// Watches for memory pressure: when `source` reports it, the pool gives every free
    /// byte back at once and advises `MADV_DONTNEED` while the pressure lasts (see
    /// [`PagePool::watch_pressure`](crate::PagePool::watch_pressure)). Builds the pool
    /// first if needed and starts the process's `pagepool-pressure` thread if none runs.
    /// Call it from `main`, never from inside an allocation.
    ///
    /// ```no_run
    /// use pagepool::{PoolAlloc, PressureSource};
    ///
    /// #[global_allocator]
    /// static GLOBAL: PoolAlloc = PoolAlloc::new();
    ///
    /// fn main() {
    ///     GLOBAL.start_hinter().expect("spawn the hinter thread");
    ///     if let Err(err) = PressureSource::detect().and_then(|s| GLOBAL.watch_pressure(s)) {
    ///         eprintln!("memory pressure watcher off: {err}");
    ///     }
    ///     // ... the program ...
    /// }
    /// ```
    ///
    /// # Errors
    /// As [`PagePool::watch_pressure`](crate::PagePool::watch_pressure), and when the pool
    /// could not be built.
    pub fn watch_pressure(&self, source: PressureSource) -> io::Result<()> {
        if let Err(err) = self.init() {
            return Err(io::Error::other(format!(
                "pagepool: the pool could not be built: {err}"
            )));
        }
        let core = self
            .ready_core()
            .ok_or_else(|| io::Error::other("pagepool: the pool is being built"))?;
        #[cfg(not(miri))]
        {
            registry().start_watching(core, &source)
        }
        #[cfg(miri)]
        {
            let _ = (core, source);
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the memory pressure watcher is not built under Miri",
            ))
        }
    }

    /// Stops watching for memory pressure (see
    /// [`PagePool::unwatch_pressure`](crate::PagePool::unwatch_pressure)).
    pub fn unwatch_pressure(&self) {
        #[cfg(not(miri))]
        if let Some(core) = self.ready_core() {
            registry().stop_watching(core);
        }
    }

    /// Whether the pool watches for memory pressure and the watcher thread runs in this
    /// process (false in a child after `fork` until
    /// [`watch_pressure`](Self::watch_pressure) is called there).
    pub fn watching_pressure(&self) -> bool {
        #[cfg(not(miri))]
        {
            self.ready_core()
                .is_some_and(|core| registry().watching(core))
        }
        #[cfg(miri)]
        {
            false
        }
    }
}
