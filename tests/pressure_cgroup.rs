//! The memory pressure watcher against a real memory limit: a process in a memory cgroup
//! bursts through a pool (filling most of the limit), frees, and at once makes a second,
//! different allocation (plain `mmap`'d memory, not from the pool) that does not fit
//! beside the pool's free memory. With the watcher on, the kernel's pressure report makes
//! the pool give its free memory back and the second allocation finishes without an OOM
//! kill; without it, the free memory is still resident and charged (the hinter waits for
//! its delay) and the group's OOM killer takes the process.
//!
//! Each run is a child process: this test binary again, running `child_workload` with
//! `PAGEPOOL_PRESSURE_CHILD` set, which moves itself into a fresh group first. The parent
//! creates the group (cgroup v1: a child of this process's memory cgroup with
//! `memory.limit_in_bytes`; cgroup v2 where its memory controller is available:
//! `memory.max` and `memory.high`), reads the group's counters after the run and removes
//! it, also on failure. Without permission to create a group (not root, read-only cgroup
//! file system) the test says why and skips. Run with `--nocapture` to see the report.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pagepool::{HintMode, PagePool, PressureLevel, PressureSource, block_size};

/// The group's memory limit.
const LIMIT: usize = 256 << 20;
/// The burst through the pool: three quarters of the limit.
const BURST: usize = LIMIT / 4 * 3;
/// The second allocation: half the limit (with the burst's memory still held, 125 %).
const SECOND: usize = LIMIT / 2;
const CHILD_ENV: &str = "PAGEPOOL_PRESSURE_CHILD";

/// How a run is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The watcher on (source: `PressureSource::detect()` in a v1 group, the group's
    /// `memory.events` in a v2 group).
    Watch,
    /// The watcher on a v1 group's `memory.pressure_level` alone, without the usage
    /// threshold `detect()` adds (reported, not judged: it races the OOM killer).
    WatchLevelOnly,
    /// No watcher, the second allocation at once.
    NoWatch,
    /// No watcher, but the second allocation waits 2 s: the hinter's `MADV_FREE` (after its
    /// 1 s delay) has made the free memory reclaimable by then.
    NoWatchAfterHinting,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Watch => "watch",
            Self::WatchLevelOnly => "watch-level",
            Self::NoWatch => "nowatch",
            Self::NoWatchAfterHinting => "nowatch-hinted",
        }
    }

    fn parse(name: &str) -> Self {
        [
            Self::Watch,
            Self::WatchLevelOnly,
            Self::NoWatch,
            Self::NoWatchAfterHinting,
        ]
        .into_iter()
        .find(|m| m.name() == name)
        .expect("a mode")
    }
}

// === the child ===

/// The child's work; a no-op unless this binary was started as a child.
#[test]
fn child_workload() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, '|');
    let (version, mode, dir) = (
        parts.next().unwrap(),
        Mode::parse(parts.next().unwrap()),
        PathBuf::from(parts.next().unwrap()),
    );
    // Into the group ("0": the writing process, in cgroup v1 and v2).
    std::fs::write(dir.join("cgroup.procs"), "0").expect("join the cgroup");
    let pool = PagePool::builder()
        .capacity(1 << 30)
        .hint_mode(HintMode::Free)
        .build()
        .unwrap();
    if matches!(mode, Mode::Watch | Mode::WatchLevelOnly) {
        let source = match (version, mode) {
            ("v1", Mode::Watch) => PressureSource::detect().unwrap(),
            ("v1", _) => PressureSource::cgroup_v1(&dir, PressureLevel::Medium),
            _ => PressureSource::cgroup_events(&dir),
        };
        println!("child: watching {source:?}");
        pool.watch_pressure(source).unwrap();
    }
    // The burst: 2 MiB blocks, every page written.
    let blocks: Vec<_> = (0..BURST / block_size(9))
        .map(|i| {
            let mut block = pool.alloc(9).unwrap();
            block.as_mut_slice().fill(i as u8 | 1);
            block
        })
        .collect();
    for block in blocks {
        pool.free(block);
    }
    if mode == Mode::NoWatchAfterHinting {
        std::thread::sleep(Duration::from_secs(2));
    }
    // The second allocation: not from the pool.
    let start = Instant::now();
    // SAFETY: a fresh private anonymous mapping, checked below.
    let second = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SECOND,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(second, libc::MAP_FAILED);
    for page in (0..SECOND).step_by(4096) {
        // SAFETY: inside the mapping just made.
        unsafe { second.cast::<u8>().add(page).write_volatile(1) };
    }
    let took = start.elapsed();
    // Stopping waits for a release in progress: the counters are complete after it.
    pool.unwatch_pressure();
    let stats = pool.stats();
    println!(
        "RESULT second_ms={:.1} pressure_events={} released_mib={} hinted_mib={}",
        took.as_secs_f64() * 1e3,
        stats.pressure.events,
        stats.pressure.bytes_released >> 20,
        stats.hint.bytes_hinted_total >> 20,
    );
}

// === the parent ===

/// A memory cgroup made for one run, removed on drop.
struct Group {
    version: &'static str,
    dir: PathBuf,
}

impl Group {
    /// A cgroup v1 memory group under this process's own, limited to [`LIMIT`].
    fn v1(name: &str) -> Result<Self, String> {
        let mount = mount_of(|fstype, opts| fstype == "cgroup" && opts.contains("memory"))
            .ok_or("no cgroup v1 memory controller mounted")?;
        let own = own_cgroup(|controllers| controllers.split(',').any(|c| c == "memory"))
            .unwrap_or_default();
        let parent = mount.join(own.trim_start_matches('/'));
        let group = Self::make(&parent, name, "v1")?;
        // (No memory+swap limit: where swap exists, the run without the watcher may swap
        // instead of being killed, which is its fate to report. With one, the kernel
        // fails the memsw counter first, and that one keeps no `failcnt`.)
        group.write("memory.limit_in_bytes", &LIMIT.to_string())?;
        Ok(group)
    }

    /// A cgroup v2 group under the hierarchy's root, with `memory.max` [`LIMIT`] and
    /// `memory.high` at 7/8 of it.
    fn v2(name: &str) -> Result<Self, String> {
        let mount = mount_of(|fstype, _| fstype == "cgroup2").ok_or("no cgroup2 hierarchy")?;
        let controllers = std::fs::read_to_string(mount.join("cgroup.controllers"))
            .map_err(|e| format!("{}: {e}", mount.display()))?;
        if !controllers.split_whitespace().any(|c| c == "memory") {
            return Err(format!(
                "the cgroup2 hierarchy at {} has no memory controller (controllers: {}); \
                 it is bound to cgroup v1 here",
                mount.display(),
                controllers.trim()
            ));
        }
        std::fs::write(mount.join("cgroup.subtree_control"), "+memory")
            .map_err(|e| format!("enabling the memory controller: {e}"))?;
        let group = Self::make(&mount, name, "v2")?;
        group.write("memory.max", &LIMIT.to_string())?;
        group.write("memory.high", &(LIMIT / 8 * 7).to_string())?;
        let _ = group.write("memory.swap.max", "0");
        Ok(group)
    }

    fn make(parent: &Path, name: &str, version: &'static str) -> Result<Self, String> {
        let dir = parent.join(format!("pagepool-test-{}-{name}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => format!(
                "cannot create a cgroup under {} ({e}): run as root",
                parent.display()
            ),
            _ => format!("cannot create {} ({e})", dir.display()),
        })?;
        Ok(Self { version, dir })
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.dir.join(file), value)
            .map_err(|e| format!("{}/{file}: {e}", self.dir.display()))
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// A `key value` line of a flat keyed file.
    fn keyed(&self, file: &str, key: &str) -> u64 {
        self.read(file)
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The counters a run is judged by: OOM kills, and how often the limit was hit.
    fn counters(&self) -> (u64, String) {
        if self.version == "v1" {
            (
                self.keyed("memory.oom_control", "oom_kill"),
                format!(
                    "memory.failcnt {:>5}, peak {} MiB",
                    self.read("memory.failcnt").trim(),
                    self.read("memory.max_usage_in_bytes")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0)
                        >> 20
                ),
            )
        } else {
            (
                self.keyed("memory.events", "oom_kill"),
                format!(
                    "memory.events high {} max {} oom {}",
                    self.keyed("memory.events", "high"),
                    self.keyed("memory.events", "max"),
                    self.keyed("memory.events", "oom")
                ),
            )
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Any process left in it (a child of a failed run) goes first.
        for pid in self.read("cgroup.procs").lines() {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: a plain kill of a process of ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// The mount point of the first cgroup hierarchy that `wanted(fstype, super options)`.
fn mount_of(wanted: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let right: Vec<&str> = right.split(' ').collect();
        let point = left.split(' ').nth(4)?;
        (right.len() >= 3 && wanted(right[0], right[2])).then(|| PathBuf::from(point))
    })
}

/// This process's cgroup path in the v1 hierarchy whose controllers match.
fn own_cgroup(wanted: impl Fn(&str) -> bool) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        wanted(controllers).then(|| path.to_owned())
    })
}

/// What one run did.
struct Run {
    mode: Mode,
    exit: String,
    killed: bool,
    oom_kills: u64,
    counters: String,
    result: String,
    wall: Duration,
}

/// Runs the child in a fresh group of `version`.
fn run(version: &str, mode: Mode) -> Result<Run, String> {
    let group = match version {
        "v1" => Group::v1(mode.name())?,
        _ => Group::v2(mode.name())?,
    };
    let start = Instant::now();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_workload",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{version}|{}|{}", mode.name(), group.dir.display()),
        )
        .output()
        .map_err(|e| format!("running the child: {e}"))?;
    let wall = start.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // (The harness prints "test child_workload ... " before the child's first line.)
    for line in stdout
        .lines()
        .filter_map(|l| l.find("child:").map(|at| &l[at..]))
    {
        println!("  [{version} {}] {line}", mode.name());
    }
    let (oom_kills, counters) = group.counters();
    use std::os::unix::process::ExitStatusExt;
    Ok(Run {
        mode,
        exit: match (output.status.code(), output.status.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(9)) => "killed (SIGKILL)".into(),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "unknown".into(),
        },
        killed: output.status.signal() == Some(libc::SIGKILL),
        oom_kills,
        counters,
        result: stdout
            .lines()
            .find_map(|l| l.find("RESULT ").map(|at| &l[at + 7..]))
            .unwrap_or("-")
            .to_owned(),
        wall,
    })
}

/// Runs every mode in groups of `version`; `Err` when the group cannot be made.
fn compare(version: &str) -> Result<(), String> {
    let mut runs = Vec::new();
    for mode in [
        Mode::Watch,
        Mode::WatchLevelOnly,
        Mode::NoWatch,
        Mode::NoWatchAfterHinting,
    ] {
        if mode == Mode::WatchLevelOnly && version != "v1" {
            continue;
        }
        runs.push(run(version, mode)?);
    }
    println!(
        "cgroup {version}: limit {} MiB, burst {} MiB through the pool (MADV_FREE hinting, 1 s \
         delay), freed, then {} MiB of plain mmap'd memory",
        LIMIT >> 20,
        BURST >> 20,
        SECOND >> 20
    );
    for r in &runs {
        println!(
            "  {:<15} {:<17} oom_kill {} | {} | {} | child wall {:.2} s",
            r.mode.name(),
            r.exit,
            r.oom_kills,
            r.counters,
            r.result,
            r.wall.as_secs_f64()
        );
    }
    let watched = &runs[0];
    assert!(
        !watched.killed && watched.exit == "exit 0",
        "with the watcher the child must finish: {}",
        watched.exit
    );
    assert_eq!(watched.oom_kills, 0, "an OOM kill with the watcher on");
    Ok(())
}

#[test]
fn a_burst_then_another_allocation_in_a_memory_limited_cgroup() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return; // a child runs only `child_workload`
    }
    for version in ["v1", "v2"] {
        if let Err(why) = compare(version) {
            println!("cgroup {version}: skipped: {why}");
        }
    }
}
