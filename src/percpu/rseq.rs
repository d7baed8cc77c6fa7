//! The rseq side of [`PerCpuStacks`](super::PerCpuStacks): finding the calling thread's
//! rseq area, fencing a CPU with `membarrier`, and the calls into the architecture's
//! critical sections (`rseq/x86_64.rs`, `rseq/aarch64.rs`).
//!
//! # Registration
//!
//! Linux lets each thread register one `struct rseq` area with the kernel (`rseq(2)`,
//! since 4.18). glibc 2.35 and later registers one for every thread and publishes where:
//! `__rseq_offset` (from the thread pointer) and `__rseq_size` (0 when it did not
//! register, e.g. with `GLIBC_TUNABLES=glibc.pthread.rseq=0`). Those symbols are looked up
//! once per process with `dlsym`, not linked, so older C libraries work too.
//!
//! Where glibc did not register, each thread registers the area in its own
//! [`OWN_AREA`] thread-local on its first operation, with glibc's signature (so code that
//! expects glibc's, such as another library's sections, still works). The thread-local
//! has a constant initialiser and no destructor: it never allocates and never runs code
//! at thread exit, and the kernel forgets the registration when the thread exits. If
//! registration fails (`EBUSY`: another library registered an area first; `ENOSYS`;
//! `EPERM` from a seccomp filter), that thread's operations fail and callers take their
//! slow path.
//!
//! The kernel writes a registered area until the thread has exited. A thread-local of an
//! executable (or of a library loaded at start-up) lives in static TLS, next to the
//! thread's stack, which glibc reuses only after the thread is gone. In a library loaded
//! later with `dlopen`, thread-locals live in dynamic TLS, which glibc may free while a
//! detached thread is still finishing its exit: this fallback is not meant for such
//! libraries on C libraries that do not register areas themselves.
//!
//! # Fencing
//!
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, MEMBARRIER_CMD_FLAG_CPU, cpu)`
//! (Linux 5.10) interrupts `cpu` if it runs a thread of this process, so a critical
//! section in flight there aborts, and runs a full memory barrier there. Threads that
//! were preempted inside a section abort when they next run anyway. The process registers
//! for it once (`MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ`); when the kernel answers
//! `EPERM` (not registered, as in a forked child on a kernel that does not carry the
//! registration over), the fence registers again and retries, so there is no cached
//! process id to go stale after `fork`.

use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_int, c_long, c_uint};

use super::{ClassGeometry, Taken};
use crate::sync::{AtomicU8, AtomicUsize, Ordering};

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
use aarch64 as arch;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
use x86_64 as arch;

use arch::RSEQ_SIG;

// === the kernel's interface ===

/// The kernel's `struct rseq` (`include/uapi/linux/rseq.h`), the original 32-byte ABI.
/// The critical sections use two fields, at the offsets below.
#[repr(C, align(32))]
#[allow(dead_code, reason = "the kernel reads and writes the fields")]
pub(super) struct RseqAbi {
    cpu_id_start: u32,
    /// The CPU the thread runs on, or `RSEQ_CPU_ID_UNINITIALIZED` (-1) /
    /// `RSEQ_CPU_ID_REGISTRATION_FAILED` (-2), which read as huge unsigned numbers.
    cpu_id: u32,
    /// Address of the `struct rseq_cs` descriptor of the section the thread is in.
    rseq_cs: u64,
    flags: u32,
    node_id: u32,
    mm_cid: u32,
    reserved: u32,
}

/// Byte offset of `cpu_id` in the area.
pub(super) const CPU_ID: usize = std::mem::offset_of!(RseqAbi, cpu_id);
/// Byte offset of `rseq_cs` in the area.
pub(super) const RSEQ_CS: usize = std::mem::offset_of!(RseqAbi, rseq_cs);
const _: () = assert!(CPU_ID == 4 && RSEQ_CS == 8 && size_of::<RseqAbi>() == 32);

/// The smallest `__rseq_size` whose area covers the fields the sections use (glibc
/// reports 20 or 32 for the 32-byte area it registers).
const MIN_GLIBC_SIZE: u32 = (RSEQ_CS + 8) as u32;

impl RseqAbi {
    /// An area before registration: the CPU number reads as "uninitialised", so a
    /// section run on it fails.
    const UNREGISTERED: Self = Self {
        cpu_id_start: 0,
        cpu_id: u32::MAX,
        rseq_cs: 0,
        flags: 0,
        node_id: 0,
        mm_cid: 0,
        reserved: 0,
    };
}

// === finding the area ===

/// How this process finds a thread's rseq area, decided once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// glibc registered an area for every thread, at the thread pointer plus `offset`.
    Glibc { offset: isize },
    /// glibc did not: each thread registers its [`OWN_AREA`] on its first operation.
    Own,
}

impl Access {
    /// The calling thread's registered area, or `None` if it has none.
    #[inline(always)]
    fn area(self) -> Option<*mut RseqAbi> {
        match self {
            Access::Glibc { offset } => Some(glibc_area(offset)),
            Access::Own => own_area(),
        }
    }
}

/// The calling thread's area that glibc registered `offset` bytes from its thread pointer.
#[inline(always)]
fn glibc_area(offset: isize) -> *mut RseqAbi {
    arch::thread_pointer().wrapping_byte_offset(offset).cast()
}

const UNKNOWN: u8 = 0;
const GLIBC: u8 = 1;
const OWN: u8 = 2;

/// `UNKNOWN` until the first lookup, then `GLIBC` (with [`GLIBC_OFFSET`]) or `OWN`.
static LOOKUP: AtomicU8 = AtomicU8::new(UNKNOWN);
static GLIBC_OFFSET: AtomicUsize = AtomicUsize::new(0);

/// How to find a thread's area in this process (looked up once, then cached).
fn access() -> Access {
    match LOOKUP.load(Ordering::Acquire) {
        GLIBC => Access::Glibc {
            offset: GLIBC_OFFSET.load(Ordering::Relaxed) as isize,
        },
        OWN => Access::Own,
        _ => {
            // Racing first lookups find the same answer.
            let found = glibc_offset();
            if let Some(offset) = found {
                GLIBC_OFFSET.store(offset as usize, Ordering::Relaxed);
            }
            LOOKUP.store(if found.is_some() { GLIBC } else { OWN }, Ordering::Release);
            found.map_or(Access::Own, |offset| Access::Glibc { offset })
        }
    }
}

/// glibc's `__rseq_offset`, if the C library registers areas and did in this process.
fn glibc_offset() -> Option<isize> {
    // SAFETY: RTLD_DEFAULT searches the global scope; the names are NUL-terminated. dlsym
    // may allocate with the C library's malloc, never with the Rust global allocator.
    let (size, offset) = unsafe {
        (
            libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()),
            libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()),
        )
    };
    if size.is_null() || offset.is_null() {
        return None; // a C library without them (glibc before 2.35, musl)
    }
    // SAFETY: glibc defines `const unsigned int __rseq_size` and
    // `const ptrdiff_t __rseq_offset`, set before any user code runs and never changed.
    let (size, offset) = unsafe { (*size.cast::<c_uint>(), *offset.cast::<isize>()) };
    (size >= MIN_GLIBC_SIZE).then_some(offset)
}

/// A thread's own rseq area, for when glibc registered none.
#[repr(C, align(32))]
struct OwnArea {
    /// Registered with the kernel, which writes it whenever the thread returns to user
    /// space; Rust code only reads it with volatile loads and hands its address to the
    /// critical sections.
    abi: UnsafeCell<RseqAbi>,
    /// `NOT_TRIED`, `REGISTERED` or `FAILED`. A forked child inherits both the value and
    /// the kernel's registration of the forking thread.
    state: Cell<u8>,
}

const NOT_TRIED: u8 = 0;
const REGISTERED: u8 = 1;
const FAILED: u8 = 2;

thread_local! {
    /// Constant initialiser and no destructor: no allocation, no exit-time code.
    static OWN_AREA: OwnArea = const {
        OwnArea {
            abi: UnsafeCell::new(RseqAbi::UNREGISTERED),
            state: Cell::new(NOT_TRIED),
        }
    };
}

/// The calling thread's own area, registered on first use.
#[inline]
fn own_area() -> Option<*mut RseqAbi> {
    OWN_AREA.with(|own| match own.state.get() {
        REGISTERED => Some(own.abi.get()),
        FAILED => None,
        _ => register(own),
    })
}

#[cold]
fn register(own: &OwnArea) -> Option<*mut RseqAbi> {
    let area = own.abi.get();
    // SAFETY: `area` is 32 bytes, 32-byte aligned, in this thread's thread-local storage,
    // which outlives the registration (the kernel drops it when the thread exits, before
    // the storage is freed); the signature is the one our abort handlers carry.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rseq,
            area,
            size_of::<RseqAbi>() as c_uint,
            0 as c_int,
            RSEQ_SIG,
        )
    };
    if rc == 0 {
        own.state.set(REGISTERED);
        Some(area)
    } else {
        own.state.set(FAILED);
        None
    }
}

/// Whether rseq per-CPU stacks can run in this process, and how to find areas: the
/// calling thread has an area with a valid CPU number, and `membarrier` can fence a CPU.
pub(super) fn probe() -> Result<Access, &'static str> {
    let access = access();
    let Some(area) = access.area() else {
        return Err("this thread could not register an rseq area");
    };
    // SAFETY: `area` is this thread's registered area; the kernel writes it only while
    // this thread is in the kernel, so the read does not race.
    let cpu = unsafe { std::ptr::read_volatile(&raw const (*area).cpu_id) };
    if cpu as i32 <= -1 {
        return Err("this thread's rseq registration failed");
    }
    if !membarrier_ready() {
        return Err("membarrier cannot fence rseq critical sections (Linux < 5.10?)");
    }
    Ok(access)
}

// === membarrier ===

const MEMBARRIER_CMD_QUERY: c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ: c_int = 1 << 7;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ: c_int = 1 << 8;
const MEMBARRIER_CMD_FLAG_CPU: c_uint = 1 << 0;

fn membarrier(cmd: c_int, flags: c_uint, cpu: c_int) -> Result<c_long, c_int> {
    // SAFETY: membarrier takes integers only.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, cmd, flags, cpu) };
    if rc < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(rc)
    }
}

const READY: u8 = 1;
const UNAVAILABLE: u8 = 2;

/// `UNKNOWN`, `READY` or `UNAVAILABLE`.
static MEMBARRIER: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the kernel supports rseq fences, registering this process for them once.
fn membarrier_ready() -> bool {
    match MEMBARRIER.load(Ordering::Acquire) {
        READY => true,
        UNAVAILABLE => false,
        _ => {
            let needed = MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ
                | MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ;
            let ready = membarrier(MEMBARRIER_CMD_QUERY, 0, 0)
                .is_ok_and(|commands| commands & needed as c_long == needed as c_long)
                && register_membarrier();
            MEMBARRIER.store(if ready { READY } else { UNAVAILABLE }, Ordering::Release);
            ready
        }
    }
}

fn register_membarrier() -> bool {
    membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0).is_ok()
}

/// Aborts every rseq critical section of this process that is running on `cpu` or was
/// preempted there, with a full memory barrier on `cpu`. False if the kernel refused.
pub(super) fn fence_cpu(cpu: usize) -> bool {
    let Ok(cpu) = c_int::try_from(cpu) else {
        return false;
    };
    for _ in 0..4 {
        match membarrier(
            MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ,
            MEMBARRIER_CMD_FLAG_CPU,
            cpu,
        ) {
            Ok(_) => return true,
            // Not registered: a forked child on a kernel that does not carry the
            // registration over. Register and retry.
            Err(libc::EPERM) => {
                if !register_membarrier() {
                    return false;
                }
            }
            Err(libc::EINTR | libc::EAGAIN) => {}
            Err(_) => return false,
        }
    }
    false
}

// === operations ===
//
// SAFETY (for every call into `arch` below): `area` comes from `Access::area`, so it is
// the calling thread's rseq area, registered with the kernel with `RSEQ_SIG` (glibc uses
// the same signature); `geometry` belongs to a live `PerCpuStacks`, whose construction
// made every CPU area it describes valid, 8-byte aligned memory of the documented layout;
// the slices give the lengths passed along.

#[inline]
pub(super) fn pop(access: Access, geometry: &ClassGeometry) -> Option<u64> {
    let area = access.area()?;
    // SAFETY: see the comment above the operations.
    unsafe { arch::pop(area, geometry) }
}

/// Where each thread finds its area, when glibc registered it: at this offset from the
/// thread pointer. `None` for threads that register their own.
pub(super) fn glibc_offset_of(access: Access) -> Option<isize> {
    match access {
        Access::Glibc { offset } => Some(offset),
        Access::Own => None,
    }
}

/// [`pop`] for a process whose areas glibc registered ([`glibc_offset_of`]); no call on
/// the way, so that it inlines without a stack frame.
#[inline(always)]
pub(super) fn pop_glibc(offset: isize, geometry: &ClassGeometry) -> Option<u64> {
    // SAFETY: see the comment above the operations; glibc registered every thread's area
    // at `offset` from its thread pointer.
    unsafe { arch::pop(glibc_area(offset), geometry) }
}

/// [`push`] like [`pop_glibc`]; `false` when it did not push.
#[inline(always)]
pub(super) fn push_glibc(offset: isize, geometry: &ClassGeometry, item: u64) -> bool {
    // SAFETY: as in `pop_glibc`.
    unsafe { arch::push(glibc_area(offset), geometry, item) }
}

/// [`push_if_on`] like [`pop_glibc`]; `false` when it did not push.
#[inline(always)]
pub(super) fn push_if_on_glibc(
    offset: isize,
    geometry: &ClassGeometry,
    item: u64,
    owner: u32,
) -> bool {
    // SAFETY: as in `pop_glibc`.
    unsafe { arch::push_if_on(glibc_area(offset), geometry, item, owner) }
}

#[inline]
pub(super) fn push(access: Access, geometry: &ClassGeometry, item: u64) -> Result<(), u64> {
    let Some(area) = access.area() else {
        return Err(item);
    };
    // SAFETY: see the comment above the operations.
    if unsafe { arch::push(area, geometry, item) } {
        Ok(())
    } else {
        Err(item)
    }
}

#[inline]
pub(super) fn push_if_on(
    access: Access,
    geometry: &ClassGeometry,
    item: u64,
    owner: u32,
) -> Result<(), u64> {
    let Some(area) = access.area() else {
        return Err(item);
    };
    // SAFETY: see the comment above the operations.
    if unsafe { arch::push_if_on(area, geometry, item, owner) } {
        Ok(())
    } else {
        Err(item)
    }
}

#[inline]
pub(super) fn pop_batch(access: Access, geometry: &ClassGeometry, out: &mut [u64]) -> Taken {
    let failed = Taken { len: 0, cpu: None };
    let Some(area) = access.area() else {
        return failed;
    };
    // At most the capacity, so the count fits the 32 bits the section returns it in.
    let len = out.len().min(geometry.cap);
    // SAFETY: see the comment above the operations; `out` has at least `len` slots.
    match unsafe { arch::pop_batch(area, geometry, out.as_mut_ptr(), len) } {
        Some((len, cpu)) => Taken {
            len,
            cpu: Some(cpu),
        },
        None => failed,
    }
}

#[inline]
pub(super) fn push_batch(access: Access, geometry: &ClassGeometry, items: &[u64]) -> usize {
    let Some(area) = access.area() else {
        return 0;
    };
    let len = items.len().min(geometry.cap);
    // SAFETY: see the comment above the operations; `items` has at least `len` items.
    unsafe { arch::push_batch(area, geometry, items.as_ptr(), len) }
}

/// Test only: a push that waits inside its critical section until `release` is set;
/// `(pushed, attempts)`, or `None` without an rseq area. See `push_after_wait` in the
/// architecture files.
#[cfg(test)]
pub(super) fn push_after_wait(
    access: Access,
    geometry: &ClassGeometry,
    item: u64,
    release: &std::sync::atomic::AtomicBool,
    limit: usize,
) -> Option<(bool, usize)> {
    let area = access.area()?;
    // SAFETY: see the comment above the operations; `release` outlives the call.
    Some(unsafe { arch::push_after_wait(area, geometry, item, release.as_ptr().cast(), limit) })
}
