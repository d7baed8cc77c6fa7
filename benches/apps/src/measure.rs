//! Process measurements: CPU time and minor faults from `getrusage`, `Rss` and `LazyFree`
//! from `/proc/self/smaps_rollup`, the peak `VmHWM` from `/proc/self/status`.

/// `Rss` and `LazyFree` of the process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident memory.
    pub rss_kib: u64,
    /// Resident memory freed with `MADV_FREE`, which the kernel may take at any time.
    pub lazy_free_kib: u64,
    /// Resident memory backed by transparent huge pages.
    pub anon_huge_kib: u64,
}

impl Memory {
    /// Reads `/proc/self/smaps_rollup` (zeros where it is missing).
    pub fn read() -> Self {
        let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
        Self {
            rss_kib: kib_field(&text, "Rss:"),
            lazy_free_kib: kib_field(&text, "LazyFree:"),
            anon_huge_kib: kib_field(&text, "AnonHugePages:"),
        }
    }

    /// `Rss - LazyFree`: the memory the process really holds.
    pub fn held_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.lazy_free_kib)
    }
}

/// The value of a `Name:   123 kB` line.
fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The process's peak resident set (`VmHWM`), in KiB.
pub fn vm_hwm_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    kib_field(&text, "VmHWM:")
}

fn rusage() -> libc::rusage {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage
}

/// User + system CPU seconds of the whole process so far (all threads).
pub fn cpu_seconds() -> f64 {
    let u = rusage();
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// Minor page faults of the process so far.
pub fn minor_faults() -> u64 {
    rusage().ru_minflt as u64
}

/// Machine-wide CPU time from the `cpu` line of `/proc/stat`, in seconds: busy (user, nice,
/// system, irq, softirq) and steal (time this virtual machine was not running).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// Seconds all CPUs spent running anything, this process included.
    pub busy_s: f64,
    /// Seconds the hypervisor ran something else instead of this machine's CPUs.
    pub steal_s: f64,
}

impl MachineCpu {
    /// Reads `/proc/stat` (zeros where it is missing).
    pub fn read() -> Self {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = text
            .lines()
            .find_map(|l| l.strip_prefix("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // Fields: user nice system idle iowait irq softirq steal ...
        Self {
            busy_s: (at(0) + at(1) + at(2) + at(5) + at(6)) as f64 / hz,
            steal_s: at(7) as f64 / hz,
        }
    }
}
