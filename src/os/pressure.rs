//! Memory pressure events from the kernel, each one a file descriptor that `poll` reports
//! ready when the kernel has something to say.
//!
//! | source | file | ready when | consumed by |
//! |---|---|---|---|
//! | PSI trigger (Linux 5.2+) | `/proc/pressure/memory` or a cgroup2 `memory.pressure` | `POLLPRI`: tasks stalled on memory for more than the trigger's threshold within its window | `poll` itself |
//! | cgroup v2 events | `memory.events` | `POLLPRI` (kernfs file-modified): a counter changed | reading the file again |
//! | cgroup v1 pressure level | `memory.pressure_level`, registered through `cgroup.event_control` | `POLLIN` on an `eventfd`: reclaim in the group reached the level | reading the `eventfd` |
//! | any file (tests) | the file | `POLLIN` on an `inotify` instance: `IN_MODIFY` | reading the `inotify` events |
//!
//! A PSI trigger is the text `some <stall µs> <window µs>` written to the open pressure
//! file (`Documentation/accounting/psi.rst`); the kernel copies at most the bytes written
//! and overwrites the last one with a NUL, so the text is written with its NUL. Without
//! `CAP_SYS_RESOURCE` the window must be a multiple of 2 s (the kernel then checks the
//! trigger from the 2 s averaging work instead of a real-time thread, Linux 6.4+).
//!
//! `memory.events` changes for every counter (`low` too); [`EventSource::consume`]
//! reports an event only when `high`, `max`, `oom` or `oom_kill` rose.
//!
//! Opening a source allocates (a path becomes a C string; error messages are formatted):
//! it runs in the caller's context. Polling and consuming use stack buffers only, so the
//! watcher thread can do them with the pool registry's lock held. Every descriptor is
//! close-on-exec.
//!
//! A missing interface gives an [`io::Error`] of kind [`io::ErrorKind::Unsupported`] whose
//! message names the file and what it would have needed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

// === impl EventSource ===

/// One open source of pressure events; see the module docs. Closing it (drop) removes a
/// PSI trigger or a cgroup v1 registration with it.
#[derive(Debug)]
pub(crate) struct EventSource {
    fd: OwnedFd,
    kind: Kind,
    /// Device and inode of the file watched, so two opens of one file can be told apart
    /// from two different files.
    identity: (u64, u64),
}

#[derive(Debug)]
enum Kind {
    Psi,
    /// The last `high`, `max`, `oom` and `oom_kill` counts read.
    Events {
        last: [u64; 4],
    },
    /// cgroup v1: the `eventfd`, and with a usage threshold, the group's open
    /// `memory.usage_in_bytes` and the threshold.
    Eventfd {
        usage: Option<(File, u64)>,
    },
    Inotify,
}

/// What a ready source had to say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Consumed {
    /// The kernel reported memory pressure.
    pub(crate) event: bool,
    /// The source will report nothing more (its cgroup or file was removed): stop polling
    /// it, or `poll` would return at once for ever.
    pub(crate) gone: bool,
}

/// The `memory.events` keys that mean pressure, in the order of `Kind::Events::last`.
const EVENT_KEYS: [&[u8]; 4] = [b"high", b"max", b"oom", b"oom_kill"];

impl EventSource {
    /// A PSI trigger on `path` (`/proc/pressure/memory`, or a cgroup2 `memory.pressure`):
    /// ready when tasks stalled on memory for more than `stall_us` within `window_us`.
    /// A directory stands for its `memory.pressure`.
    pub(crate) fn psi(path: &Path, stall_us: u64, window_us: u64) -> io::Result<Self> {
        let path = &in_dir(path, "memory.pressure");
        let mut file = open(
            path,
            OpenOptions::new().read(true).write(true),
            "no pressure stall information here (Linux 4.20+ built with CONFIG_PSI; \
             disabled unless booted with psi=1 where CONFIG_PSI_DEFAULT_DISABLED)",
        )?;
        let mut text = [0u8; 64];
        let len = {
            let mut out = &mut text[..];
            // Two u64 in 64 bytes always fit; the NUL is written too (see the module docs).
            write!(out, "some {stall_us} {window_us}\0").expect("fits");
            64 - out.len()
        };
        if let Err(err) = file.write_all(&text[..len]) {
            return Err(trigger_error(path, stall_us, window_us, err));
        }
        Ok(Self {
            identity: identity(&file)?,
            fd: file.into(),
            kind: Kind::Psi,
        })
    }

    /// `memory.events` of a cgroup2 directory (or the file itself): ready when a counter
    /// changes; an event when `high`, `max`, `oom` or `oom_kill` rose.
    pub(crate) fn cgroup_events(path: &Path) -> io::Result<Self> {
        let path = in_dir(path, "memory.events");
        let mut file = open(
            &path,
            OpenOptions::new().read(true),
            "no cgroup v2 memory controller for this group (memory.events needs the \
             memory controller enabled in the parent's cgroup.subtree_control)",
        )?;
        let last = read_events(&mut file).map_err(|err| annotate(&path, err))?;
        Ok(Self {
            identity: identity(&file)?,
            fd: file.into(),
            kind: Kind::Events { last },
        })
    }

    /// A cgroup v1 memory pressure notification: an `eventfd` registered through
    /// `<dir>/cgroup.event_control` for `<dir>/memory.pressure_level` at `level` (`low`,
    /// `medium` or `critical`) in `hierarchy` mode, so events of descendant groups arrive
    /// too, whoever else listens. With `threshold`, the same `eventfd` is also registered
    /// for `<dir>/memory.usage_in_bytes` crossing it, and a signal is an event only while
    /// the usage is at or above it (the kernel signals crossings both ways).
    pub(crate) fn cgroup_v1(dir: &Path, level: &str, threshold: Option<u64>) -> io::Result<Self> {
        let level_path = dir.join("memory.pressure_level");
        let level_file = open(
            &level_path,
            OpenOptions::new().read(true),
            "no cgroup v1 memory controller mounted here",
        )?;
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a descriptor we just opened and own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let control_path = dir.join("cgroup.event_control");
        let mut control = open(
            &control_path,
            OpenOptions::new().write(true),
            "no cgroup v1 event control here",
        )?;
        let mut line = [0u8; 64];
        let mut register = |mode: &str| {
            let mut out = &mut line[..];
            write!(
                out,
                "{} {} {level}{mode}",
                efd.as_raw_fd(),
                level_file.as_raw_fd()
            )
            .expect("fits");
            let len = 64 - out.len();
            control.write_all(&line[..len])
        };
        // Kernels before 4.10 know no modes: register in the default mode there.
        if let Err(err) = register(",hierarchy").or_else(|_| register("")) {
            return Err(annotate(&control_path, err));
        }
        let usage = match threshold {
            None => None,
            Some(bytes) => {
                let usage_path = dir.join("memory.usage_in_bytes");
                let usage = open(
                    &usage_path,
                    OpenOptions::new().read(true),
                    "no cgroup v1 memory usage here",
                )?;
                let mut out = &mut line[..];
                write!(out, "{} {} {bytes}", efd.as_raw_fd(), usage.as_raw_fd()).expect("fits");
                let len = 64 - out.len();
                if let Err(err) = control.write_all(&line[..len]) {
                    return Err(annotate(&control_path, err));
                }
                Some((usage, bytes))
            }
        };
        // The registrations hold the eventfd; the level file is no longer needed.
        Ok(Self {
            identity: identity(&level_file)?,
            fd: efd,
            kind: Kind::Eventfd { usage },
        })
    }

    /// `inotify` `IN_MODIFY` on `path`: every write to the file is an event. For tests
    /// that cannot make real memory pressure.
    pub(crate) fn file_modified(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path).map_err(|err| annotate(path, err))?;
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL"))?;
        // SAFETY: no memory preconditions; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
        let wd =
            unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cpath.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            return Err(annotate(path, io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            kind: Kind::Inotify,
            identity: (meta.dev(), meta.ino()),
        })
    }

    /// Device and inode of the watched file.
    pub(crate) fn identity(&self) -> (u64, u64) {
        self.identity
    }

    /// The entry for `poll`.
    pub(crate) fn poll_entry(&self) -> libc::pollfd {
        let events = match self.kind {
            Kind::Psi | Kind::Events { .. } => libc::POLLPRI,
            Kind::Eventfd { .. } | Kind::Inotify => libc::POLLIN,
        };
        libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events,
            revents: 0,
        }
    }

    /// Reads what made `poll` return `revents` for this source, re-arming it. Never
    /// blocks, never allocates.
    pub(crate) fn consume(&mut self, revents: libc::c_short) -> Consumed {
        let fd = self.fd.as_raw_fd();
        match &mut self.kind {
            Kind::Psi => Consumed {
                // `poll` consumed the event; an error means the trigger's cgroup is gone.
                event: revents & libc::POLLPRI != 0 && revents & libc::POLLERR == 0,
                gone: revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0,
            },
            Kind::Events { last } => {
                // kernfs reports a change as POLLERR | POLLPRI; reading re-arms it.
                // SAFETY: `fd` is open for as long as `self`; `ManuallyDrop` keeps the
                // temporary `File` from closing it.
                let mut file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
                match read_events(&mut file) {
                    Ok(now) => {
                        let rose = now.iter().zip(last.iter()).any(|(n, l)| n > l);
                        *last = now;
                        Consumed {
                            event: rose,
                            gone: false,
                        }
                    }
                    Err(_) => Consumed {
                        event: false,
                        gone: true,
                    },
                }
            }
            Kind::Eventfd { usage } => {
                let mut count = 0u64;
                // SAFETY: reads 8 bytes into `count`; the eventfd is non-blocking.
                let got = unsafe { libc::read(fd, (&raw mut count).cast(), 8) };
                let signalled = got == 8 && count > 0;
                // With a threshold: only while the usage is at or above it (a crossing
                // downwards signals too; a pressure level event comes with the group at
                // its limit, above any threshold below it).
                let above = match usage {
                    None => true,
                    Some((file, threshold)) => read_number(file).is_none_or(|u| u >= *threshold),
                };
                Consumed {
                    event: signalled && above,
                    gone: revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0,
                }
            }
            Kind::Inotify => drain_inotify(fd),
        }
    }
}

/// Reads every pending `inotify` event: an event if a file was modified, gone if its watch
/// was removed (the file deleted or its file system unmounted).
fn drain_inotify(fd: RawFd) -> Consumed {
    // Aligned for `inotify_event`, as inotify(7) asks.
    #[repr(C, align(8))]
    struct Buf([u8; 4096]);
    let mut buf = Buf([0; 4096]);
    let mut out = Consumed::default();
    loop {
        // SAFETY: reads at most 4096 bytes into `buf`; the descriptor is non-blocking.
        let got = unsafe { libc::read(fd, buf.0.as_mut_ptr().cast(), buf.0.len()) };
        if got <= 0 {
            return out; // EAGAIN: drained
        }
        let mut at = 0usize;
        let header = size_of::<libc::inotify_event>();
        while at + header <= got as usize {
            // SAFETY: the kernel wrote whole events; `at` is the start of one inside the
            // bytes read, and `read_unaligned` needs no alignment.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.0.as_ptr().add(at).cast()) };
            out.event |= event.mask & libc::IN_MODIFY != 0;
            out.gone |= event.mask & libc::IN_IGNORED != 0;
            at += header + event.len as usize;
        }
    }
}

/// Reads a number (`memory.usage_in_bytes`) from the start of an open file, into a stack
/// buffer.
fn read_number(file: &mut File) -> Option<u64> {
    let mut buf = [0u8; 32];
    file.seek(io::SeekFrom::Start(0)).ok()?;
    let len = file.read(&mut buf).ok()?;
    let digits = buf[..len].iter().take_while(|b| b.is_ascii_digit());
    Some(digits.fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add((d - b'0') as u64)
    }))
}

/// Reads the `high`, `max`, `oom` and `oom_kill` counts of an open `memory.events` from
/// its start, into a stack buffer.
fn read_events(file: &mut File) -> io::Result<[u64; 4]> {
    let mut buf = [0u8; 1024];
    file.seek(io::SeekFrom::Start(0))?;
    let mut len = 0;
    loop {
        let got = file.read(&mut buf[len..])?;
        if got == 0 || len + got == buf.len() {
            len += got;
            break;
        }
        len += got;
    }
    let mut counts = [0u64; 4];
    for line in buf[..len].split(|&b| b == b'\n') {
        let mut words = line.split(|&b| b == b' ');
        let (Some(key), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        if let Some(i) = EVENT_KEYS.iter().position(|k| *k == key) {
            counts[i] = value
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |n, &d| {
                    n.saturating_mul(10).saturating_add((d - b'0') as u64)
                });
        }
    }
    Ok(counts)
}

// === impl Waker ===

/// An `eventfd` the watcher thread polls beside its sources, so a stop request or a new
/// source wakes it without any timeout.
#[derive(Debug)]
pub(crate) struct Waker(OwnedFd);

impl Waker {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just opened and own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the next (or current) `poll` of [`poll_entry`](Self::poll_entry) return.
    pub(crate) fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one`. It fails only when the counter is at its
        // maximum, and then the thread is woken anyway.
        unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Clears pending wake-ups.
    pub(crate) fn drain(&self) {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count`; the eventfd is non-blocking.
        unsafe { libc::read(self.0.as_raw_fd(), (&raw mut count).cast(), 8) };
    }

    /// The entry for `poll`.
    pub(crate) fn poll_entry(&self) -> libc::pollfd {
        libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }
    }
}

/// `poll(2)` on `fds` for at most `timeout` (`None`: until something is ready). Returns
/// the number of ready entries; 0 on timeout or when a signal interrupted the wait.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Rounded up, so a deadline is never missed by a truncated millisecond.
        Some(t) => t.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int,
    };
    // SAFETY: `fds` is a valid, writable array of `fds.len()` pollfd entries.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if ready >= 0 {
        return Ok(ready as usize);
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::Interrupted {
        Ok(0)
    } else {
        Err(err)
    }
}

// === errors ===

/// `dir/name` if `path` is a directory, else `path` itself.
fn in_dir(path: &Path, name: &str) -> PathBuf {
    if path.is_dir() {
        path.join(name)
    } else {
        path.to_path_buf()
    }
}

/// Opens `path` close-on-exec and non-blocking; a missing file or a switched-off feature
/// becomes [`io::ErrorKind::Unsupported`] naming the file and `missing`.
fn open(path: &Path, options: &mut OpenOptions, missing: &str) -> io::Result<File> {
    options
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR | libc::EOPNOTSUPP) => io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: {missing} ({err})", path.display()),
            ),
            _ => annotate(path, err),
        })
}

/// Why the kernel refused a PSI trigger, in words.
fn trigger_error(path: &Path, stall_us: u64, window_us: u64, err: io::Error) -> io::Error {
    let why = match err.raw_os_error() {
        Some(libc::EINVAL) if !window_us.is_multiple_of(2_000_000) => {
            return io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: the kernel refused the trigger \"some {stall_us} {window_us}\": \
                     without CAP_SYS_RESOURCE the window must be a multiple of 2 s ({err})",
                    path.display()
                ),
            );
        }
        Some(libc::EOPNOTSUPP) => {
            return io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: pressure stall information is switched off here ({err})",
                    path.display()
                ),
            );
        }
        Some(libc::EBUSY) => "this file already holds a trigger",
        _ => "the kernel refused the trigger",
    };
    io::Error::new(
        err.kind(),
        format!(
            "{}: {why} \"some {stall_us} {window_us}\" ({err})",
            path.display()
        ),
    )
}

/// `err` with the file it happened on.
fn annotate(path: &Path, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// Device and inode of an open file.
fn identity(file: &File) -> io::Result<(u64, u64)> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_the_pressure_counters_only() {
        let dir = std::env::temp_dir().join(format!("pagepool-events-{}", std::process::id()));
        std::fs::write(
            &dir,
            "low 7\nhigh 3\nmax 2\noom 1\noom_kill 5\noom_group_kill 0\n",
        )
        .unwrap();
        let mut file = File::open(&dir).unwrap();
        assert_eq!(read_events(&mut file).unwrap(), [3, 2, 1, 5]);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_is_unsupported_and_named() {
        let path = Path::new("/nonexistent/pagepool/memory.pressure");
        let err = EventSource::psi(path, 100_000, 2_000_000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(
            err.to_string()
                .contains("/nonexistent/pagepool/memory.pressure")
        );
        let err = EventSource::cgroup_v1(Path::new("/nonexistent"), "low", None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("memory.pressure_level"), "{err}");
        let err = EventSource::cgroup_events(Path::new("/nonexistent")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
    }

    #[test]
    fn inotify_reports_a_write() {
        let path = std::env::temp_dir().join(format!("pagepool-inotify-{}", std::process::id()));
        std::fs::write(&path, "").unwrap();
        let mut source = EventSource::file_modified(&path).unwrap();
        let mut fds = [source.poll_entry()];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        std::fs::write(&path, "x").unwrap();
        assert_eq!(poll(&mut fds, Some(Duration::from_secs(10))).unwrap(), 1);
        let got = source.consume(fds[0].revents);
        assert!(got.event && !got.gone);
        fds[0].revents = 0;
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(poll(&mut fds, Some(Duration::from_secs(10))).unwrap(), 1);
        assert!(source.consume(fds[0].revents).gone);
    }

    #[test]
    fn the_waker_wakes_and_drains() {
        let waker = Waker::new().unwrap();
        let mut fds = [waker.poll_entry()];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        waker.wake();
        waker.wake();
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 1);
        waker.drain();
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
    }
}
