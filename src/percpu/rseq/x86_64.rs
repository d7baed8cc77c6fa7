//! The rseq critical sections for x86-64.
//!
//! Every operation is one `asm!` block built by the `critical_section!` macro:
//!
//! ```text
//!  2:  lea  cpu, [rip + 3f]            restart: publish the descriptor in
//!      mov  [rseq + RSEQ_CS], cpu        rseq->rseq_cs (the kernel clears it on abort)
//!  4:  mov  cpu:e, [rseq + CPU_ID]      start_ip: the CPU, read inside the section
//!      cmp  cpu, [class + CPUS]         -1 / -2 (not registered, failed) are huge
//!      jae  7f                            unsigned numbers: fail
//!      (push_if_on: cmp cpu, owner; jne 7f)
//!      area = base + cpu * stride
//!      cmp  qword [area + GATE], 0      stopped by a drain: fail
//!      jne  7f
//!      mov  qword [area + ACTIVE], 1    activity mark (idempotent)
//!      hdr  = area + count_off          &count
//!      area = area + slots_off          &slots[0]
//!      ... the operation's body: loads, bound checks, slot stores ...
//!      mov  [hdr], new count            THE COMMIT: one store, the last instruction
//!  5:  ...                              post_commit: report success
//!  7:                                   end (failures jump here)
//!
//!  section __rseq_cs:   3: { version 0, flags 0, start_ip 4b, post_commit_offset 5b-4b,
//!                            abort_ip 6f }
//!  section .text.unlikely:  ud1 with glibc's signature 0x53053053 as its displacement,
//!                       6: jmp 2b       abort: restart from the top
//! ```
//!
//! Normal flow never reaches the abort handler: it is in another section, reached only
//! by the kernel. The 4 bytes before it are the signature the kernel checks
//! (`0f b9 3d` + signature encodes `ud1 sig(%rip), %edi`, so jumping into it by mistake
//! traps, as in glibc and librseq). Only numeric local labels are used, because the
//! compiler may inline and so duplicate a block; each copy gets its own descriptor.
//! None of the labels is made only of the digits 0 and 1, which LLVM would read as
//! binary numbers in Intel syntax.
//!
//! No instruction in a section is an atomic read-modify-write: the kernel's abort is what
//! makes a section atomic with respect to other threads on the same CPU, and no thread of
//! another CPU writes these words while this CPU is open (a drain first closes the gate,
//! then fences the CPU with `membarrier`). x86 keeps loads in order with loads and
//! stores in order with stores, so the gate load needs no fence: a section that sees the
//! gate open (stored with release by a drain) also sees the drain's emptied counts.
//!
//! Registers hold nothing but inputs across a restart: every temporary is recomputed
//! from the inputs after label 2, and a result register is written only after the
//! commit, so an aborted attempt leaves no trace.
//!
//! # Safety
//!
//! For every function here the caller guarantees that `rseq` is the calling thread's rseq
//! area, registered with the kernel with [`RSEQ_SIG`], and that `class` describes
//! `cpus` live CPU areas of the layout in the module docs of `percpu` (8-byte aligned
//! words, `cap` slots at `slots_off`, the count word at `count_off`), valid for reads and
//! writes for the whole call, with a count word that only these sections (on its own
//! CPU) or a drain (with the CPU stopped and fenced) write.

use core::arch::asm;

use super::{CPU_ID, RSEQ_CS, RseqAbi};
use crate::percpu::{
    ACTIVE_OFF, ClassGeometry, G_BASE, G_CAP, G_COUNT_OFF, G_CPUS, G_SLOTS_OFF, G_STRIDE, GATE_OFF,
};

/// glibc's x86 rseq signature (`RSEQ_SIG` in `sysdeps/unix/sysv/linux/x86/bits/rseq.h`).
pub(super) const RSEQ_SIG: u32 = 0x5305_3053;

/// The thread pointer (`fs:0` holds the thread control block's address of itself).
#[inline(always)]
pub(super) fn thread_pointer() -> *mut u8 {
    let tp: *mut u8;
    // SAFETY: on x86-64 Linux, fs:0 is the thread control block's pointer to itself,
    // readable by its thread at any time.
    unsafe {
        asm!(
            "mov {}, qword ptr fs:[0]",
            out(reg) tp,
            options(nostack, readonly, preserves_flags, pure),
        );
    }
    tp
}

/// One rseq critical section: the restart point, the CPU lookup and checks, `body`
/// (which must end with the commit, then label `5:`, then its success code), the end
/// label `7:` failures jump to, the descriptor and the abort handler.
///
/// `checks` run right after the CPU number is validated. Named registers available to
/// both: `rseq`, `class` (inputs), `cpu` (the CPU number), `area` (after the prologue:
/// this CPU's slot 0 of the class), `hdr` (the class's count word). The caller declares
/// the body's own registers and constants. Every register an operation names is one the
/// compiler cannot use for the caller's values, and the fast paths are meant to inline
/// without a stack frame: the prologue publishes the descriptor through `cpu`, and `pop`
/// and `push` keep the count in `cpu` once the area is known.
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
            "lea {cpu}, [rip + 3f]",
            "mov qword ptr [{rseq} + {RSEQ_CS}], {cpu}",
            // start_ip. From here to label 5 the kernel aborts us on preemption,
            // migration, signal delivery or a membarrier fence.
            "4:",
            "mov {cpu:e}, dword ptr [{rseq} + {CPU_ID}]",
            "cmp {cpu}, qword ptr [{class} + {G_CPUS}]",
            "jae 7f",
            $($check,)*
            // area = base + cpu * stride
            "mov {area}, {cpu}",
            "imul {area}, qword ptr [{class} + {G_STRIDE}]",
            "add {area}, qword ptr [{class} + {G_BASE}]",
            // A drain stopped this CPU: fail.
            "cmp qword ptr [{area} + {GATE_OFF}], 0",
            "jne 7f",
            // Activity mark: a plain store of a constant, harmless to repeat.
            "mov qword ptr [{area} + {ACTIVE_OFF}], 1",
            "mov {hdr}, qword ptr [{class} + {G_COUNT_OFF}]",
            "add {hdr}, {area}",
            "add {area}, qword ptr [{class} + {G_SLOTS_OFF}]",
            $($body,)*
            "7:",
            // struct rseq_cs. Writable ("aw") only so that the dynamic linker can
            // relocate the addresses in a position-independent executable.
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "3:",
            ".long 0, 0",
            ".quad 4b, 5b - 4b, 6f",
            ".popsection",
            // The abort handler, after the signature the kernel checks.
            ".pushsection .text.unlikely, \"ax\"",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long {SIG}",
            "6:",
            "jmp 2b",
            ".popsection",
            rseq = in(reg) $rseq,
            class = in(reg) $class,
            cpu = out(reg) _,
            area = out(reg) _,
            hdr = out(reg) _,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            SIG = const RSEQ_SIG,
            G_BASE = const G_BASE,
            G_STRIDE = const G_STRIDE,
            G_CPUS = const G_CPUS,
            G_COUNT_OFF = const G_COUNT_OFF,
            G_SLOTS_OFF = const G_SLOTS_OFF,
            GATE_OFF = const GATE_OFF,
            ACTIVE_OFF = const ACTIVE_OFF,
            $($operands)*
        )
    };
}

/// Pops the top item of this CPU's stack.
///
/// # Safety
///
/// See the module docs.
#[inline(always)]
pub(super) unsafe fn pop(rseq: *mut RseqAbi, class: *const ClassGeometry) -> Option<u64> {
    let item: u64;
    let ok: usize;
    // SAFETY: the caller's guarantees (module docs); the section stays inside this
    // CPU's area: `count - 1 < cap` is checked before the slot is read.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                // cpu = count - 1; empty (0 wraps around) or corrupt (> cap): fail.
                "mov {cpu}, qword ptr [{hdr}]",
                "sub {cpu}, 1",
                "cmp {cpu}, qword ptr [{class} + {G_CAP}]",
                "jae 7f",
                "mov {item}, qword ptr [{area} + {cpu} * 8]",
                // Commit.
                "mov qword ptr [{hdr}], {cpu}",
                "5:",
                "mov {ok:e}, 1",
            ],
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
    // SAFETY: the caller's guarantees (module docs); `count < cap` is checked before the
    // slot is written.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                // cpu = count; full or corrupt: fail.
                "mov {cpu}, qword ptr [{hdr}]",
                "cmp {cpu}, qword ptr [{class} + {G_CAP}]",
                "jae 7f",
                // Above the count: invisible until the commit, overwritten by a restart.
                "mov qword ptr [{area} + {cpu} * 8], {item}",
                "add {cpu}, 1",
                // Commit.
                "mov qword ptr [{hdr}], {cpu}",
                "5:",
                "mov {ok:e}, 1",
            ],
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
                "cmp {cpu:e}, {owner:e}",
                "jne 7f",
            ],
            body: [
                // cpu = count (the owner check is done with the CPU number).
                "mov {cpu}, qword ptr [{hdr}]",
                "cmp {cpu}, qword ptr [{class} + {G_CAP}]",
                "jae 7f",
                "mov qword ptr [{area} + {cpu} * 8], {item}",
                "add {cpu}, 1",
                // Commit.
                "mov qword ptr [{hdr}], {cpu}",
                "5:",
                "mov {ok:e}, 1",
            ],
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
/// class's capacity (so the count fits in 32 bits).
#[inline(always)]
pub(super) unsafe fn pop_batch(
    rseq: *mut RseqAbi,
    class: *const ClassGeometry,
    out: *mut u64,
    len: usize,
) -> Option<(usize, u32)> {
    let result: u64;
    // SAFETY: the caller's guarantees; `n = min(len, count)` with `count <= cap` checked,
    // so the slots read are `slots[count - n .. count]` and the writes `out[0 .. n]`.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                "mov {cnt}, qword ptr [{hdr}]",
                "cmp {cnt}, qword ptr [{class} + {G_CAP}]",
                "ja 7f",
                // n = min(len, count)
                "mov {n}, {len}",
                "cmp {cnt}, {n}",
                "cmovb {n}, {cnt}",
                // area = &slots[count - 1] (not read when n == 0); cnt = new count
                "lea {area}, [{area} + {cnt} * 8 - 8]",
                "sub {cnt}, {n}",
                // for i in 0..n: out[i] = slots[count - 1 - i]
                "xor {i:e}, {i:e}",
                "8:",
                "cmp {i}, {n}",
                "jae 9f",
                "mov {t}, qword ptr [{area}]",
                "mov qword ptr [{dst} + {i} * 8], {t}",
                "sub {area}, 8",
                "add {i}, 1",
                "jmp 8b",
                "9:",
                // Commit.
                "mov qword ptr [{hdr}], {cnt}",
                "5:",
                // result = cpu << 32 | n
                "shl {cpu}, 32",
                "or {cpu}, {n}",
                "mov {result}, {cpu}",
            ],
            cnt = out(reg) _,
            n = out(reg) _,
            i = out(reg) _,
            t = out(reg) _,
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
    // SAFETY: the caller's guarantees; `n = min(len, cap - count)` with `count <= cap`
    // checked, so the writes are `slots[count .. count + n]`, the reads `items[0 .. n]`.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                "mov {cnt}, qword ptr [{hdr}]",
                // n = cap - count; count > cap (corrupt) borrows: fail.
                "mov {n}, qword ptr [{class} + {G_CAP}]",
                "sub {n}, {cnt}",
                "jb 7f",
                // n = min(n, len)
                "cmp {n}, {len}",
                "cmova {n}, {len}",
                // area = &slots[count]; cnt = new count
                "lea {area}, [{area} + {cnt} * 8]",
                "add {cnt}, {n}",
                // for i in 0..n: slots[count + i] = items[i]
                "xor {i:e}, {i:e}",
                "8:",
                "cmp {i}, {n}",
                "jae 9f",
                "mov {t}, qword ptr [{items} + {i} * 8]",
                "mov qword ptr [{area} + {i} * 8], {t}",
                "add {i}, 1",
                "jmp 8b",
                "9:",
                // Commit.
                "mov qword ptr [{hdr}], {cnt}",
                "5:",
                "mov {pushed}, {n}",
            ],
            cnt = out(reg) _,
            n = out(reg) _,
            i = out(reg) _,
            t = out(reg) _,
            items = in(reg) items,
            len = in(reg) len,
            pushed = inout(reg) 0usize => pushed,
            G_CAP = const G_CAP,
            options(nostack),
        );
    }
    pushed
}

/// Test only: `push`, but every attempt first waits (inside the critical section) until
/// `*release != 0` or `limit` checks have passed, so a test can interrupt it at a moment
/// of its choosing (by migrating the thread, sending it a signal, or fencing its CPU).
/// Returns whether it pushed, and how many attempts entered the body: every attempt after
/// the first is a restart after an abort.
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
    // SAFETY: as in `push`; the wait only reads `release`. `attempts` survives an abort
    // because the kernel leaves registers alone when it redirects to the abort handler.
    unsafe {
        critical_section!(
            rseq: rseq,
            class: class,
            checks: [],
            body: [
                "add {attempts}, 1",
                "mov {cnt}, {limit}",
                "8:",
                "cmp byte ptr [{release}], 0",
                "jne 9f",
                "sub {cnt}, 1",
                "jnz 8b",
                "9:",
                "mov {cnt}, qword ptr [{hdr}]",
                "cmp {cnt}, qword ptr [{class} + {G_CAP}]",
                "jae 7f",
                "mov qword ptr [{area} + {cnt} * 8], {item}",
                "add {cnt}, 1",
                // Commit.
                "mov qword ptr [{hdr}], {cnt}",
                "5:",
                "mov {ok:e}, 1",
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
