//! Where restartable sequences cannot run (other architectures or systems, Miri, loom):
//! [`Access`] has no values, so an rseq instance cannot exist and every instance is
//! portable.

use super::{ClassGeometry, Taken};

/// How a thread would find its rseq area; uninhabited here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {}

/// Always fails: there is no rseq here.
pub(super) fn probe() -> Result<Access, &'static str> {
    if cfg!(miri) {
        Err("rseq is not available under Miri")
    } else if cfg!(loom) {
        Err("rseq is not available under loom")
    } else {
        Err("rseq critical sections exist for x86-64 and aarch64 Linux only")
    }
}

/// Never called: only rseq instances fence.
pub(super) fn fence_cpu(_cpu: usize) -> bool {
    false
}

pub(super) fn pop(access: Access, _: &ClassGeometry) -> Option<u64> {
    match access {}
}

pub(super) fn glibc_offset_of(access: Access) -> Option<isize> {
    match access {}
}

/// Never called: no offset exists.
pub(super) fn pop_glibc(_: isize, _: &ClassGeometry) -> Option<u64> {
    None
}

/// Never called: no offset exists.
pub(super) fn push_glibc(_: isize, _: &ClassGeometry, _: u64) -> bool {
    false
}

/// Never called: no offset exists.
pub(super) fn push_if_on_glibc(_: isize, _: &ClassGeometry, _: u64, _: u32) -> bool {
    false
}

pub(super) fn push(access: Access, _: &ClassGeometry, _: u64) -> Result<(), u64> {
    match access {}
}

pub(super) fn push_if_on(access: Access, _: &ClassGeometry, _: u64, _: u32) -> Result<(), u64> {
    match access {}
}

pub(super) fn pop_batch(access: Access, _: &ClassGeometry, _: &mut [u64]) -> Taken {
    match access {}
}

pub(super) fn push_batch(access: Access, _: &ClassGeometry, _: &[u64]) -> usize {
    match access {}
}
