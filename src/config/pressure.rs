//! Where the memory pressure watcher hears about memory pressure: [`PressureSource`], as
//! plain data, checked before anything is opened.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::PressureSourceError;

/// Default PSI stall threshold of [`PressureSource::detect`] and [`PressureSource::psi`]
/// users who take the defaults: 100 ms of stall per window.
pub const DEFAULT_PSI_STALL: Duration = Duration::from_millis(100);

/// Default PSI window: 2 s, the shortest window the kernel accepts from a process without
/// `CAP_SYS_RESOURCE` (it must be a multiple of 2 s there).
pub const DEFAULT_PSI_WINDOW: Duration = Duration::from_secs(2);

/// The shortest PSI window: 500 ms, as `Documentation/accounting/psi.rst` documents
/// (Linux 6.4 and later accept shorter windows from privileged processes; older kernels
/// do not, so neither does this crate).
pub const PSI_MIN_WINDOW: Duration = Duration::from_millis(500);

/// The longest PSI window the kernel accepts: 10 s.
pub const PSI_MAX_WINDOW: Duration = Duration::from_secs(10);

/// How long pressure lasts after the last event of a cgroup source (`memory.events`,
/// `memory.pressure_level`): 1 s. Those sources report every reclaim that reaches them,
/// many times a second while a group is at its limit, so a second without one means
/// reclaim stopped.
pub const DEFAULT_PRESSURE_SETTLE: Duration = Duration::from_secs(1);

/// The accepted range of a settle period.
const SETTLE_RANGE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(600));

/// A cgroup v1 memory pressure level (`memory.pressure_level`, see the kernel's
/// `Documentation/admin-guide/cgroup-v1/memory.rst`). A listener hears its level and the
/// levels above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PressureLevel {
    /// The group is reclaiming memory for new allocations (page cache, usually): normal
    /// for a group at its limit.
    Low,
    /// Reclaim is struggling: the kernel swaps or drops active page cache. What
    /// [`PressureSource::detect`] listens for.
    Medium,
    /// Reclaim is failing: the group is about to run out of memory (an OOM kill, where it
    /// is not disabled).
    Critical,
}

impl PressureLevel {
    /// The word `cgroup.event_control` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::Critical => "critical",
        }
    }
}

/// Where the kernel reports memory pressure, for
/// [`PagePool::watch_pressure`](crate::PagePool::watch_pressure) and
/// [`PoolAlloc::watch_pressure`](crate::PoolAlloc::watch_pressure).
///
/// [`detect`](Self::detect) picks the best one available to this process. The constructors
/// check their input; a value built from the variants directly is checked when it is
/// watched.
///
/// ```no_run
/// use std::time::Duration;
/// use pagepool::{PressureLevel, PressureSource};
///
/// // Whatever this process has: its cgroup's limit, its cgroup's PSI, or the system's.
/// let auto = PressureSource::detect()?;
/// // The whole system: 100 ms of memory stall within 2 s.
/// let psi = PressureSource::psi(Duration::from_millis(100), Duration::from_secs(2))?;
/// // A cgroup2 group: its `memory.events` (`high`, `max`, `oom` rising).
/// let events = PressureSource::cgroup_events("/sys/fs/cgroup/my.service");
/// // A cgroup v1 memory group: its `memory.pressure_level`.
/// let v1 = PressureSource::cgroup_v1("/sys/fs/cgroup/memory/mygroup", PressureLevel::Medium);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PressureSource {
    /// A pressure stall information (PSI) trigger: an event whenever tasks stalled on
    /// memory for more than `stall` in total within a `window` ("some" stall: at least one
    /// task waiting). At most one event per window; pressure lasts until two windows pass
    /// without one.
    Psi {
        /// `/proc/pressure/memory` (the whole system), a cgroup2 group's `memory.pressure`,
        /// or the group's directory.
        path: PathBuf,
        /// The stall threshold, above zero and at most `window`.
        stall: Duration,
        /// The window, 500 ms to 10 s; a multiple of 2 s for processes without
        /// `CAP_SYS_RESOURCE`.
        window: Duration,
    },
    /// A cgroup2 group's `memory.events`: an event whenever its `high`, `max`, `oom` or
    /// `oom_kill` count rises (the group went over `memory.high`, hit `memory.max`, or ran
    /// out of memory). Pressure lasts [`DEFAULT_PRESSURE_SETTLE`] after the last one.
    CgroupEvents {
        /// The group's directory, or its `memory.events`.
        path: PathBuf,
    },
    /// A cgroup v1 memory group's `memory.pressure_level`, at `level` or above, for the
    /// group and its descendants; and, with a `usage_threshold`, its
    /// `memory.usage_in_bytes` rising to the threshold. Pressure lasts
    /// [`DEFAULT_PRESSURE_SETTLE`] after the last event.
    ///
    /// Why a threshold: cgroup v1 has no `memory.high` that slows allocations down before
    /// the limit, and the kernel delivers pressure levels from a work queue, while a group
    /// whose memory is all anonymous (nothing to reclaim, no swap) can run its OOM killer
    /// within milliseconds of reaching the limit. The threshold is checked as memory is
    /// charged, so the pool hears of it while there is still room.
    CgroupV1 {
        /// The group's directory (holding `memory.pressure_level`,
        /// `memory.usage_in_bytes` and `cgroup.event_control`).
        path: PathBuf,
        /// The lowest level that counts.
        level: PressureLevel,
        /// Bytes of usage (page cache included) at which the group counts as under
        /// pressure, if any; typically a little below `memory.limit_in_bytes`.
        usage_threshold: Option<u64>,
    },
    /// Any file whose modification counts as pressure (`inotify` `IN_MODIFY`), for tests
    /// that cannot make real memory pressure. Pressure lasts `settle` after the last write.
    #[doc(hidden)]
    FileModified {
        /// The file.
        path: PathBuf,
        /// How long pressure lasts after the last write.
        settle: Duration,
    },
}

impl PressureSource {
    /// A PSI trigger on the whole system's memory (`/proc/pressure/memory`).
    ///
    /// # Errors
    /// [`PressureSourceError`] when `stall` is zero or longer than `window`, or `window` is
    /// outside 500 ms to 10 s.
    pub fn psi(stall: Duration, window: Duration) -> Result<Self, PressureSourceError> {
        Self::psi_at("/proc/pressure/memory", stall, window)
    }

    /// A PSI trigger on `path`: `/proc/pressure/memory`, a cgroup2 group's
    /// `memory.pressure`, or the group's directory.
    ///
    /// # Errors
    /// As [`psi`](Self::psi), and [`PressureSourceError::EmptyPath`].
    pub fn psi_at(
        path: impl Into<PathBuf>,
        stall: Duration,
        window: Duration,
    ) -> Result<Self, PressureSourceError> {
        let source = Self::Psi {
            path: path.into(),
            stall,
            window,
        };
        source.validate()?;
        Ok(source)
    }

    /// A cgroup2 group's `memory.events` (`path`: the group's directory or the file).
    pub fn cgroup_events(path: impl Into<PathBuf>) -> Self {
        Self::CgroupEvents { path: path.into() }
    }

    /// A cgroup v1 memory group's `memory.pressure_level` at `level` or above (`path`: the
    /// group's directory, under the v1 memory controller's mount).
    pub fn cgroup_v1(path: impl Into<PathBuf>, level: PressureLevel) -> Self {
        Self::CgroupV1 {
            path: path.into(),
            level,
            usage_threshold: None,
        }
    }

    /// Like [`cgroup_v1`](Self::cgroup_v1), and pressure also when the group's usage
    /// (`memory.usage_in_bytes`) rises to `usage_threshold` bytes: the early warning a
    /// group at its limit needs in cgroup v1 (see [`CgroupV1`](Self::CgroupV1)).
    ///
    /// # Errors
    /// [`PressureSourceError::ZeroThreshold`].
    pub fn cgroup_v1_with_threshold(
        path: impl Into<PathBuf>,
        level: PressureLevel,
        usage_threshold: u64,
    ) -> Result<Self, PressureSourceError> {
        let source = Self::CgroupV1 {
            path: path.into(),
            level,
            usage_threshold: Some(usage_threshold),
        };
        source.validate()?;
        Ok(source)
    }

    /// Writes to `path` count as pressure, which lasts `settle` after the last write. For
    /// tests.
    ///
    /// # Errors
    /// [`PressureSourceError::SettleOutOfRange`] outside 10 ms to 10 minutes.
    #[doc(hidden)]
    pub fn file_modified(
        path: impl Into<PathBuf>,
        settle: Duration,
    ) -> Result<Self, PressureSourceError> {
        let source = Self::FileModified {
            path: path.into(),
            settle,
        };
        source.validate()?;
        Ok(source)
    }

    /// The best source this process has. Limits first, through the interfaces that report
    /// against a limit at once; stall information otherwise:
    ///
    /// 1. its cgroup v1 memory group, or the nearest ancestor, with a limit
    ///    (`memory.limit_in_bytes`): `memory.pressure_level` at
    ///    [`Medium`](PressureLevel::Medium), and a usage threshold 1/8 of the limit below
    ///    it (see [`CgroupV1`](Self::CgroupV1) for why);
    /// 2. its cgroup2 group, or the nearest ancestor, with `memory.high` or `memory.max`
    ///    set: that group's `memory.events` (over `high`, at `max`, OOM), reported as they
    ///    happen, where a PSI trigger of an unprivileged process is checked every 2 s;
    /// 3. its cgroup2 group's `memory.pressure` (PSI, [`DEFAULT_PSI_STALL`] within
    ///    [`DEFAULT_PSI_WINDOW`]), which for the root group is the whole system;
    /// 4. `/proc/pressure/memory`, same thresholds;
    /// 5. the cgroup v1 memory controller's root group (`memory.pressure_level` of the
    ///    whole system's reclaim), level `Medium`.
    ///
    /// Reads `/proc/self/cgroup`, `/proc/self/mountinfo` and the groups' limits; opens
    /// nothing it keeps.
    ///
    /// # Errors
    /// [`io::ErrorKind::Unsupported`] when none is there, saying what was looked for.
    pub fn detect() -> io::Result<Self> {
        #[cfg(any(loom, miri))]
        {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no memory pressure sources under loom or Miri",
            ))
        }
        #[cfg(not(any(loom, miri)))]
        {
            use crate::os::cgroup::{cgroup_places, v1_limit, v2_limited};
            use std::path::Path;
            let places = cgroup_places();
            // The group and its ancestors, up to the hierarchy's mount point.
            let chain = |dir: &Option<PathBuf>, mount: Option<&Path>| -> Vec<PathBuf> {
                let (Some(dir), Some(mount)) = (dir, mount) else {
                    return Vec::new();
                };
                dir.ancestors()
                    .take_while(|g| g.starts_with(mount))
                    .map(Path::to_path_buf)
                    .collect()
            };
            let v1_mount = places.v1_memory_mount.as_deref();
            for group in chain(&places.v1_memory, v1_mount) {
                if let Some(limit) = v1_limit(&group)
                    && group.join("memory.pressure_level").exists()
                {
                    return Ok(Self::CgroupV1 {
                        path: group,
                        level: PressureLevel::Medium,
                        usage_threshold: Some((limit - limit / 8).max(1)),
                    });
                }
            }
            for group in chain(&places.v2, places.v2_mount.as_deref()) {
                if v2_limited(&group) && group.join("memory.events").exists() {
                    return Ok(Self::cgroup_events(group));
                }
            }
            let readable = |path: &Path| std::fs::read_to_string(path).is_ok();
            let psi = |path: PathBuf| Self::Psi {
                path,
                stall: DEFAULT_PSI_STALL,
                window: DEFAULT_PSI_WINDOW,
            };
            if let Some(dir) = &places.v2 {
                let file = dir.join("memory.pressure");
                if readable(&file) {
                    return Ok(psi(file));
                }
            }
            let system = PathBuf::from("/proc/pressure/memory");
            if readable(&system) {
                return Ok(psi(system));
            }
            if let Some(mount) = v1_mount
                && mount.join("memory.pressure_level").exists()
            {
                return Ok(Self::cgroup_v1(mount, PressureLevel::Medium));
            }
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no memory pressure interface found: no cgroup v1 memory controller with \
                 memory.pressure_level, no cgroup2 memory.events or readable memory.pressure, \
                 and no /proc/pressure/memory (Linux 4.20+ with CONFIG_PSI, psi=1)",
            ))
        }
    }

    /// Checks the source against the kernel's documented limits, without opening
    /// anything.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), PressureSourceError> {
        let path = match self {
            Self::Psi {
                path,
                stall,
                window,
            } => {
                if stall.is_zero() {
                    return Err(PressureSourceError::ZeroStall);
                }
                if !(PSI_MIN_WINDOW..=PSI_MAX_WINDOW).contains(window) {
                    return Err(PressureSourceError::WindowOutOfRange {
                        window: *window,
                        min: PSI_MIN_WINDOW,
                        max: PSI_MAX_WINDOW,
                    });
                }
                if stall > window {
                    return Err(PressureSourceError::StallAboveWindow {
                        stall: *stall,
                        window: *window,
                    });
                }
                path
            }
            Self::CgroupV1 {
                usage_threshold: Some(0),
                ..
            } => return Err(PressureSourceError::ZeroThreshold),
            Self::CgroupEvents { path } | Self::CgroupV1 { path, .. } => path,
            Self::FileModified { path, settle } => {
                let (min, max) = SETTLE_RANGE;
                if !(min..=max).contains(settle) {
                    return Err(PressureSourceError::SettleOutOfRange {
                        settle: *settle,
                        min,
                        max,
                    });
                }
                path
            }
        };
        if path.as_os_str().is_empty() {
            return Err(PressureSourceError::EmptyPath);
        }
        Ok(())
    }

    /// How long pressure lasts after this source's last event: two windows for PSI (a
    /// trigger fires at most once per window while the stall goes on, so one quiet window
    /// may be timing), [`DEFAULT_PRESSURE_SETTLE`] for cgroup sources.
    pub fn settle(&self) -> Duration {
        match self {
            Self::Psi { window, .. } => *window * 2,
            Self::CgroupEvents { .. } | Self::CgroupV1 { .. } => DEFAULT_PRESSURE_SETTLE,
            Self::FileModified { settle, .. } => *settle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_input_is_checked() {
        let ms = Duration::from_millis;
        assert_eq!(
            PressureSource::psi(ms(0), ms(2000)),
            Err(PressureSourceError::ZeroStall)
        );
        assert!(matches!(
            PressureSource::psi(ms(100), ms(499)),
            Err(PressureSourceError::WindowOutOfRange { .. })
        ));
        assert!(matches!(
            PressureSource::psi(ms(100), Duration::from_secs(11)),
            Err(PressureSourceError::WindowOutOfRange { .. })
        ));
        assert!(matches!(
            PressureSource::psi(ms(3000), ms(2000)),
            Err(PressureSourceError::StallAboveWindow { .. })
        ));
        assert!(PressureSource::psi(ms(2000), ms(2000)).is_ok());
        assert_eq!(
            PressureSource::psi_at("", ms(100), ms(2000)),
            Err(PressureSourceError::EmptyPath)
        );
        assert!(matches!(
            PressureSource::file_modified("/tmp/x", Duration::ZERO),
            Err(PressureSourceError::SettleOutOfRange { .. })
        ));
        assert_eq!(
            PressureSource::psi(ms(100), ms(2000)).unwrap().settle(),
            ms(4000)
        );
        assert_eq!(
            PressureSource::cgroup_events("").validate(),
            Err(PressureSourceError::EmptyPath)
        );
    }
}
