//! The rseq critical sections for aarch64.
//!
//! **Compile-checked only**: this file was written by analogy with `x86_64.rs` (and
//! tcmalloc's and librseq's aarch64 sections) and built for
//! `aarch64-unknown-linux-gnu`, but never run: no aarch64 machine was available.
//!
//! The structure is that of `x86_64.rs` (read its module docs first):
//!
//! ```text
//!  2:  adrp t, 3f; add t, t, :lo12:3f   restart: publish the descriptor
//!      str  t, [rseq, #RSEQ_CS]
//!  4:  ldr  cpu:w, [rseq, #CPU_ID]      start_ip; -1/-2 are huge unsigned: fail
//!      cmp  cpu, cpus; b.hs 7f
//!      area = base + cpu * stride       (madd)
//!      ldar t, [area]; cbnz t, 7f       the gate, with ACQUIRE (see below)
//!      str  1, [area, #ACTIVE]
//!      ... body ...
//!      str  new count, [hdr]            THE COMMIT
//!  5:  ...                              post_commit
//!  7:                                   end
//!  __rseq_cs:      3: { 0, 0, 4b, 5b - 4b, 6f }
//!  .text.unlikely: .inst 0xd428bc00 (glibc's signature, a `brk #0x45e0`)
//!                  6: b 2b
//! ```
//!
//! Differences from x86-64:
//!
//! - Loads may be reordered with later loads, so the gate is read with `ldar`: a section
//!   that sees the gate open (a drain stored 0 with release) must also see the counts the
//!   drain emptied, or it could pop an item the drain already handed out.
//! - The abort handler branches back into the function from `.text.unlikely`; when the
//!   two are far apart, the linker may route that branch through a veneer that clobbers
//!   `x16`/`x17`, so every section declares both clobbered (as tcmalloc does).
//! - Instructions are always little-endian; the signature *value* registered with the
//!   kernel is read as data, so it is byte-swapped on big-endian targets (glibc's
//!   `RSEQ_SIG_DATA`).
//!
//! # Safety
//!
//! As in `x86_64.rs`: `rseq` is the calling thread's registered rseq area and `class`
//! describes live CPU areas of the documented layout.

use core::arch::asm;

use super::{CPU_ID, RSEQ_CS, RseqAbi};
use crate::percpu::{
    ACTIVE_OFF, ClassGeometry, G_BASE, G_CAP, G_COUNT_OFF, G_CPUS, G_SLOTS_OFF, G_STRIDE, GATE_OFF,
};

/// The signature instruction placed before each abort handler (glibc's `RSEQ_SIG_CODE`).
const RSEQ_SIG_CODE: u32 = 0xd428_bc00;

/// The signature as registered with the kernel, which reads the 4 bytes before the abort
/// handler as data (glibc's `RSEQ_SIG_DATA`).
pub(super) const RSEQ_SIG: u32 = if cfg!(target_endian = "big") {
    RSEQ_SIG_CODE.swap_bytes()
} else {
    RSEQ_SIG_CODE
};

/// The thread pointer (`tpidr_el0`).
#[inline(always)]
pub(super) fn thread_pointer() -> *mut u8 {
    let tp: *mut u8;
    // SAFETY: reading tpidr_el0 has no side effects.
    unsafe {
        asm!(
            "mrs {}, tpidr_el0",
            out(reg) tp,
            options(nomem, nostack, preserves_flags, pure),
        );
    }
    tp
}

/// One rseq critical section; see `critical_section!` in `x86_64.rs`.
macro_rules! critical_section {
    (
        rseq: $rseq:expr,
        class: $class:expr,
        checks: [$($check:expr),* $(,)?],
        body: [$($body:expr),* $(,)?],
        $($operands:tt)*
    ) => {
        asm!(
            // Restart point: (re)publish this section's descriptor.
            "2:",
            "adrp {t}, 3f",
            "add {t}, {t}, :lo12:3f",
            "str {t}, [{rseq}, #{RSEQ_CS}]",
            // start_ip.
            "4:",
            "ldr {cpu:w}, [{rseq}, #{CPU_ID}]",
            "ldr {t}, [{class}, #{G_CPUS}]",
            "cmp {cpu}, {t}",
            "b.hs 7f",
            $($check,)*
            // area = base + cpu * stride
            "ldr {t}, [{class}, #{G_STRIDE}]",
            "ldr {area}, [{class}, #{G_BASE}]",
            "madd {area}, {cpu}, {t}, {area}",
            // A drain stopped this CPU: fail. Acquire: see the module docs.
            "ldar {t}, [{area}]",
            "cbnz {t}, 7f",
            // Activity mark: a plain store of a constant, harmless to repeat.
            "mov {t}, #1",
            "str {t}, [{area}, #{ACTIVE_OFF}]",
            "ldr {hdr}, [{class}, #{G_COUNT_OFF}]",
            "add {hdr}, {area}, {hdr}",
            "ldr {t}, [{class}, #{G_SLOTS_OFF}]",
            "add {area}, {area}, {t}",
            $($body,)*
            "7:",
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "3:",
            ".long 0, 0",
            ".quad 4b, 5b - 4b, 6f",
            ".popsection",
            ".pushsection .text.unlikely, \"ax\"",
            ".inst {SIG_CODE}",
            "6:",
            "b 2b",
            ".popsection",
            rseq = in(reg) $rseq,
            class = in(reg) $class,
            t = out(reg) _,
            cpu = out(reg) _,
            area = out(reg) _,
            hdr = out(reg) _,
            out("x16") _,
            out("x17") _,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            SIG_CODE = const RSEQ_SIG_CODE,
            G_BASE = const G_BASE,
            G_STRIDE = const G_STRIDE,
            G_CPUS = const G_CPUS,
            G_COUNT_OFF = const G_COUNT_OFF,
            G_SLOTS_OFF = const G_SLOTS_OFF,
            ACTIVE_OFF = const ACTIVE_OFF,
            $($operands)*
        )
    };
}

// `ldar` takes no offset: the gate must be the area's first word.
const _: () = assert!(GATE_OFF == 0);

/// Pops the top item of this CPU's stack.
///
/// # Safety
///
/// See the module docs.
#[inline(always)]
pub(super) unsafe fn pop(rseq: *mut RseqAbi, class: *const ClassGeometry) -> Option<u64> {
    let item: u64;
    let ok: usize;
    // SAFETY: the caller's guarantees; `count - 1 < cap` is checked before the read.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                "ldr {cnt}, [{hdr}]",
                "sub {cnt}, {cnt}, #1",
                "ldr {t}, [{class}, #{G_CAP}]",
                "cmp {cnt}, {t}",
                "b.hs 7f",
                "ldr {item}, [{area}, {cnt}, lsl #3]",
                // Commit.
                "str {cnt}, [{hdr}]",
                "5:",
                "mov {ok}, #1",
            ],
            cnt = out(reg) _,
            item = out(reg) item,
            ok = inout(reg) 0usize => ok,
            G_CAP = const G_CAP,
            options(nostack),
        );
    }
    (ok != 0).then_some(item)
}

/// Pushes `item` on this CPU's stack; false when full or failed.
///
/// # Safety
///
/// See the module docs.
#[inline(always)]
pub(super) unsafe fn push(rseq: *mut RseqAbi, class: *const ClassGeometry, item: u64) -> bool {
    let ok: usize;
    // SAFETY: the caller's guarantees; `count < cap` is checked before the write.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                "ldr {cnt}, [{hdr}]",
                "ldr {t}, [{class}, #{G_CAP}]",
                "cmp {cnt}, {t}",
                "b.hs 7f",
                "str {item}, [{area}, {cnt}, lsl #3]",
                "add {cnt}, {cnt}, #1",
                // Commit.
                "str {cnt}, [{hdr}]",
                "5:",
                "mov {ok}, #1",
            ],
            cnt = out(reg) _,
            item = in(reg) item,
            ok = inout(reg) 0usize => ok,
            G_CAP = const G_CAP,
            options(nostack),
        );
    }
    ok != 0
}

/// Pushes `item` only if this thread runs on CPU `owner`, checked inside the section.
///
/// # Safety
///
/// See the module docs.
#[inline(always)]
pub(super) unsafe fn push_if_on(
    rseq: *mut RseqAbi,
    class: *const ClassGeometry,
    item: u64,
    owner: u32,
) -> bool {
    let ok: usize;
    // SAFETY: as in `push`; the owner check only adds a way to fail.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [
                "cmp {cpu:w}, {owner:w}",
                "b.ne 7f",
            ],
            body: [
                "ldr {cnt}, [{hdr}]",
                "ldr {t}, [{class}, #{G_CAP}]",
                "cmp {cnt}, {t}",
                "b.hs 7f",
                "str {item}, [{area}, {cnt}, lsl #3]",
                "add {cnt}, {cnt}, #1",
                // Commit.
                "str {cnt}, [{hdr}]",
                "5:",
                "mov {ok}, #1",
            ],
            cnt = out(reg) _,
            item = in(reg) item,
            owner = in(reg) owner,
            ok = inout(reg) 0usize => ok,
            G_CAP = const G_CAP,
            options(nostack),
        );
    }
    ok != 0
}

/// Result register of a batch pop that failed before reaching a stack.
const FAILED: u64 = u64::MAX;

/// Pops up to `len` items (top first) into `out`; `(how many, CPU)`, or `None` if it
/// failed before reaching a stack.
///
/// # Safety
///
/// See the module docs; also `out` is valid for `len` writes and `len` is at most the
/// class's capacity.
#[inline(always)]
pub(super) unsafe fn pop_batch(
    rseq: *mut RseqAbi,
    class: *const ClassGeometry,
    out: *mut u64,
    len: usize,
) -> Option<(usize, u32)> {
    let result: u64;
    // SAFETY: the caller's guarantees; `n = min(len, count)` with `count <= cap` checked.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                "ldr {cnt}, [{hdr}]",
                "ldr {t}, [{class}, #{G_CAP}]",
                "cmp {cnt}, {t}",
                "b.hi 7f",
                // n = min(len, count)
                "cmp {cnt}, {len}",
                "csel {n}, {cnt}, {len}, lo",
                // area = &slots[count]; cnt = new count
                "add {area}, {area}, {cnt}, lsl #3",
                "sub {cnt}, {cnt}, {n}",
                // for i in 0..n: out[i] = slots[count - 1 - i]
                "mov {i}, #0",
                "8:",
                "cmp {i}, {n}",
                "b.hs 9f",
                "ldr {t}, [{area}, #-8]!",
                "str {t}, [{dst}, {i}, lsl #3]",
                "add {i}, {i}, #1",
                "b 8b",
                "9:",
                // Commit.
                "str {cnt}, [{hdr}]",
                "5:",
                // result = cpu << 32 | n
                "orr {result}, {n}, {cpu}, lsl #32",
            ],
            cnt = out(reg) _,
            n = out(reg) _,
            i = out(reg) _,
            dst = in(reg) out,
            len = in(reg) len,
            result = inout(reg) FAILED => result,
            G_CAP = const G_CAP,
            options(nostack),
        );
    }
    (result != FAILED).then_some(((result & 0xffff_ffff) as usize, (result >> 32) as u32))
}

/// Pushes as many of the `len` items at `items` as fit, in order; returns how many.
///
/// # Safety
///
/// See the module docs; also `items` is valid for `len` reads.
#[inline(always)]
pub(super) unsafe fn push_batch(
    rseq: *mut RseqAbi,
    class: *const ClassGeometry,
    items: *const u64,
    len: usize,
) -> usize {
    let pushed: usize;
    // SAFETY: the caller's guarantees; `n = min(len, cap - count)` with `count <= cap`.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                "ldr {cnt}, [{hdr}]",
                // n = cap - count; count > cap (corrupt) borrows: fail.
                "ldr {n}, [{class}, #{G_CAP}]",
                "subs {n}, {n}, {cnt}",
                "b.lo 7f",
                // n = min(n, len)
                "cmp {n}, {len}",
                "csel {n}, {n}, {len}, lo",
                // area = &slots[count]; cnt = new count
                "add {area}, {area}, {cnt}, lsl #3",
                "add {cnt}, {cnt}, {n}",
                // for i in 0..n: slots[count + i] = items[i]
                "mov {i}, #0",
                "8:",
                "cmp {i}, {n}",
                "b.hs 9f",
                "ldr {t}, [{items}, {i}, lsl #3]",
                "str {t}, [{area}, {i}, lsl #3]",
                "add {i}, {i}, #1",
                "b 8b",
                "9:",
                // Commit.
                "str {cnt}, [{hdr}]",
                "5:",
                "mov {pushed}, {n}",
            ],
            cnt = out(reg) _,
            n = out(reg) _,
            i = out(reg) _,
            items = in(reg) items,
            len = in(reg) len,
            pushed = inout(reg) 0usize => pushed,
            G_CAP = const G_CAP,
            options(nostack),
        );
    }
    pushed
}

/// Test only: `push`, but every attempt first waits inside the critical section until
/// `*release != 0` or `limit` checks have passed; see `push_after_wait` in `x86_64.rs`.
///
/// # Safety
///
/// See the module docs; also `release` is valid for reads for the whole call.
#[cfg(test)]
pub(super) unsafe fn push_after_wait(
    rseq: *mut RseqAbi,
    class: *const ClassGeometry,
    item: u64,
    release: *const u8,
    limit: usize,
) -> (bool, usize) {
    let ok: usize;
    let attempts: usize;
    // SAFETY: as in `push`; the wait only reads `release`.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                "add {attempts}, {attempts}, #1",
                "mov {cnt}, {limit}",
                "8:",
                "ldrb {t:w}, [{release}]",
                "cbnz {t:w}, 9f",
                "subs {cnt}, {cnt}, #1",
                "b.ne 8b",
                "9:",
                "ldr {cnt}, [{hdr}]",
                "ldr {t}, [{class}, #{G_CAP}]",
                "cmp {cnt}, {t}",
                "b.hs 7f",
                "str {item}, [{area}, {cnt}, lsl #3]",
                "add {cnt}, {cnt}, #1",
                // Commit.
                "str {cnt}, [{hdr}]",
                "5:",
                "mov {ok}, #1",
            ],
            cnt = out(reg) _,
            item = in(reg) item,
            release = in(reg) release,
            limit = in(reg) limit.max(1),
            attempts = inout(reg) 0usize => attempts,
            ok = inout(reg) 0usize => ok,
            G_CAP = const G_CAP,
            options(nostack),
        );
    }
    (ok != 0, attempts)
}
