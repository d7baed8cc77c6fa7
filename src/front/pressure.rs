//! Watching for memory pressure: [`PagePool::watch_pressure`] and friends.
//!
//! When the kernel reports memory pressure (a PSI trigger, a cgroup's `memory.events` or
//! `memory.pressure_level`; see [`PressureSource`]), every watching pool of the process
//! gives its free memory back at once and advises `MADV_DONTNEED` while the pressure
//! lasts. One thread (`pagepool-pressure`) serves every watching pool of the process,
//! sleeping in `poll` with no timeout while there is no pressure. The design is in the
//! docs of the pool layer's `pressure` module; the [`PoolAlloc`](crate::PoolAlloc)
//! methods are in `front::global`.

use std::io;

use crate::config::PressureSource;
use crate::front::page_pool::PagePool;

impl PagePool {
    /// Watches for memory pressure: when `source` reports it, this pool gives every free
    /// byte back at once (as [`release_idle_down_to(0)`](Self::release_idle_down_to):
    /// caches drained, free blocks of every order advised), and advises `MADV_DONTNEED`
    /// instead of its configured hint mode while the pressure lasts (see
    /// [`PressureSource::settle`]). Events of any source watched in the process release
    /// every watching pool: they all share the memory the kernel is short of.
    ///
    /// Starts the process's watcher thread if none runs. Watching again replaces the
    /// source. In a child after `fork` no pool watches until this is called there.
    ///
    /// ```
    /// use pagepool::{PagePool, PressureSource};
    ///
    /// let pool = PagePool::builder().capacity(64 << 20).build()?;
    /// // The best interface this process has; absent or refused: run without.
    /// match PressureSource::detect().and_then(|source| pool.watch_pressure(source)) {
    ///     Ok(()) => assert!(pool.watching_pressure()),
    ///     Err(err) => eprintln!("memory pressure watcher off: {err}"),
    /// }
    /// pool.unwatch_pressure();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// - [`io::ErrorKind::InvalidInput`] for a source that fails
    ///   [`PressureSource::validate`] (the error holds the
    ///   [`PressureSourceError`](crate::PressureSourceError));
    /// - [`io::ErrorKind::Unsupported`] where the kernel interface is absent (no PSI, no
    ///   such cgroup controller or file), the message naming the file;
    /// - [`io::ErrorKind::PermissionDenied`] for a PSI window the kernel refuses without
    ///   `CAP_SYS_RESOURCE` (not a multiple of 2 s), or a file this process may not open;
    /// - [`MAX_PRESSURE_SOURCES`](crate::MAX_PRESSURE_SOURCES) different sources watched
    ///   already, or the thread could not be spawned.
    ///
    /// The pool then watches what it watched before (nothing after a failed spawn).
    pub fn watch_pressure(&self, source: PressureSource) -> io::Result<()> {
        #[cfg(not(any(loom, miri)))]
        {
            crate::pool::registry::registry().start_watching(self.core(), &source)
        }
        #[cfg(any(loom, miri))]
        {
            let _ = source;
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the memory pressure watcher is not built under loom or Miri",
            ))
        }
    }

    /// Stops watching for memory pressure, waiting while the watcher releases this pool,
    /// and goes back to the configured hint mode. The thread exits when no pool of the
    /// process watches any more. Also done by `Drop`.
    pub fn unwatch_pressure(&self) {
        #[cfg(not(any(loom, miri)))]
        crate::pool::registry::registry().stop_watching(self.core());
    }

    /// Whether this pool watches for memory pressure and the watcher thread runs in this
    /// process.
    pub fn watching_pressure(&self) -> bool {
        #[cfg(not(any(loom, miri)))]
        {
            crate::pool::registry::registry().watching(self.core())
        }
        #[cfg(any(loom, miri))]
        {
            false
        }
    }
}
