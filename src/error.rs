//! Errors: one enum per operation, so a caller matches only what can happen to it.

use std::fmt;

/// Why [`PoolBuilder::build`](crate::PoolBuilder::build) refused a configuration or
/// could not set the pool up.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// `capacity(0)` was requested.
    ZeroCapacity,
    /// The capacity does not hold even one block of the maximum order.
    CapacityTooSmall {
        /// Requested capacity in bytes.
        capacity: usize,
        /// The smallest capacity accepted: one maximum-order block.
        min: usize,
    },
    /// The capacity needs 2^32 frames (16 TiB) or more; the frame table indexes frames
    /// with 32 bits.
    CapacityTooLarge {
        /// Requested capacity in bytes.
        capacity: usize,
    },
    /// `max_order` is above [`MAX_SUPPORTED_ORDER`](crate::MAX_SUPPORTED_ORDER).
    MaxOrderTooLarge {
        /// Requested maximum order.
        max_order: u8,
        /// The largest supported maximum order.
        limit: u8,
    },
    /// `shards(0)` was requested.
    ZeroShards,
    /// More shards than [`MAX_SHARDS`](crate::MAX_SHARDS).
    TooManyShards {
        /// Requested shard count.
        shards: usize,
    },
    /// A setting is out of its allowed range.
    InvalidSetting {
        /// The builder method, e.g. `"hint_pass_bytes"`.
        setting: &'static str,
        /// What it accepts.
        allowed: &'static str,
    },
    /// Building a pool inside [`PoolAlloc`](crate::PoolAlloc) panicked (no error value
    /// exists to report).
    Panicked,
    /// The operating system refused to map the region or the frame table.
    Map(std::io::Error),
    /// The background hinter thread could not be started.
    SpawnHinter(std::io::Error),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroCapacity => write!(f, "pool capacity must be greater than zero"),
            Self::CapacityTooSmall { capacity, min } => write!(
                f,
                "pool capacity {capacity} B is smaller than one maximum-order block ({min} B)"
            ),
            Self::CapacityTooLarge { capacity } => {
                write!(
                    f,
                    "pool capacity {capacity} B needs 2^32 or more 4 KiB frames (16 TiB)"
                )
            }
            Self::MaxOrderTooLarge { max_order, limit } => {
                write!(
                    f,
                    "max_order {max_order} is above the supported limit {limit}"
                )
            }
            Self::ZeroShards => write!(f, "a pool needs at least one shard"),
            Self::TooManyShards { shards } => {
                write!(
                    f,
                    "{shards} shards requested, at most {} supported",
                    crate::MAX_SHARDS
                )
            }
            Self::InvalidSetting { setting, allowed } => {
                write!(f, "invalid setting {setting}: allowed is {allowed}")
            }
            Self::Panicked => write!(f, "building the pool panicked"),
            Self::Map(err) => write!(f, "mapping the pool's memory failed: {err}"),
            Self::SpawnHinter(err) => write!(f, "starting the hinter thread failed: {err}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Map(err) | Self::SpawnHinter(err) => Some(err),
            _ => None,
        }
    }
}

/// Why an allocation returned no block. The pool is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocError {
    /// The order is above the pool's maximum order.
    OrderTooLarge {
        /// Requested order.
        order: u8,
        /// The pool's maximum order.
        max_order: u8,
    },
    /// No shard holds a free block of this order or larger (outside regions reserved by
    /// waiting capture requests).
    Exhausted {
        /// Requested order.
        order: u8,
    },
    /// [`alloc_wait`](crate::PagePool::alloc_wait) waited its whole timeout.
    Timeout {
        /// Requested order.
        order: u8,
    },
    /// [`alloc_with_reclaim`](crate::PagePool::alloc_with_reclaim): the callback could free
    /// nothing more and no block of the order formed.
    ReclaimFailed {
        /// Requested order.
        order: u8,
        /// How many times the callback ran.
        rounds: u32,
    },
    /// A byte size or alignment no block can satisfy (zero, or above the largest block).
    UnsupportedLayout {
        /// Requested size in bytes.
        size: usize,
        /// Requested alignment in bytes.
        align: usize,
    },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OrderTooLarge { order, max_order } => {
                write!(
                    f,
                    "order {order} is above the pool's maximum order {max_order}"
                )
            }
            Self::Exhausted { order } => write!(f, "no free block of order {order} or larger"),
            Self::Timeout { order } => write!(f, "timed out waiting for a block of order {order}"),
            Self::ReclaimFailed { order, rounds } => write!(
                f,
                "reclaim freed nothing more after {rounds} rounds and no block of order {order} formed"
            ),
            Self::UnsupportedLayout { size, align } => {
                write!(f, "no block fits size {size} B with alignment {align} B")
            }
        }
    }
}

impl std::error::Error for AllocError {}

/// Why a free by pointer was refused. The pool is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FreeError {
    /// The pointer is not inside this pool's region.
    OutsideRegion,
    /// The pointer is inside the region but not at the start of a block.
    NotBlockStart,
    /// The block at this address is already free.
    AlreadyFree,
    /// The order given by the caller differs from the order the frame table records.
    WrongOrder {
        /// The order the caller passed.
        given: u8,
        /// The order of the allocated block at that address.
        actual: u8,
    },
}

impl fmt::Display for FreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutsideRegion => write!(f, "pointer is outside the pool's region"),
            Self::NotBlockStart => write!(f, "pointer is not the start of an allocated block"),
            Self::AlreadyFree => write!(f, "block is already free (double free)"),
            Self::WrongOrder { given, actual } => {
                write!(f, "block has order {actual}, not {given}")
            }
        }
    }
}

impl std::error::Error for FreeError {}

/// Why a [`PressureSource`](crate::PressureSource) was refused before any file was opened.
/// [`PagePool::watch_pressure`](crate::PagePool::watch_pressure) returns it inside an
/// [`std::io::Error`] of kind [`InvalidInput`](std::io::ErrorKind::InvalidInput)
/// (`err.get_ref()` and `downcast_ref` give it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PressureSourceError {
    /// A PSI trigger with a zero stall threshold (it would fire on any stall at all).
    ZeroStall,
    /// A PSI trigger whose stall threshold is longer than its window.
    StallAboveWindow {
        /// The stall threshold asked for.
        stall: std::time::Duration,
        /// The window asked for.
        window: std::time::Duration,
    },
    /// A PSI window outside what the kernel accepts (`Documentation/accounting/psi.rst`).
    WindowOutOfRange {
        /// The window asked for.
        window: std::time::Duration,
        /// The shortest window accepted.
        min: std::time::Duration,
        /// The longest window accepted.
        max: std::time::Duration,
    },
    /// A settle period outside the accepted range.
    SettleOutOfRange {
        /// The settle period asked for.
        settle: std::time::Duration,
        /// The shortest accepted.
        min: std::time::Duration,
        /// The longest accepted.
        max: std::time::Duration,
    },
    /// A cgroup v1 usage threshold of zero bytes (it would always be crossed).
    ZeroThreshold,
    /// An empty path.
    EmptyPath,
}

impl fmt::Display for PressureSourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroStall => write!(f, "a PSI trigger needs a stall threshold above zero"),
            Self::StallAboveWindow { stall, window } => write!(
                f,
                "PSI stall threshold {stall:?} is longer than its window {window:?}"
            ),
            Self::WindowOutOfRange { window, min, max } => write!(
                f,
                "PSI window {window:?} is outside the kernel's range {min:?} to {max:?}"
            ),
            Self::SettleOutOfRange { settle, min, max } => write!(
                f,
                "settle period {settle:?} is outside the range {min:?} to {max:?}"
            ),
            Self::ZeroThreshold => write!(f, "a usage threshold needs at least one byte"),
            Self::EmptyPath => write!(f, "a pressure source needs a path"),
        }
    }
}

impl std::error::Error for PressureSourceError {}

impl From<PressureSourceError> for std::io::Error {
    fn from(err: PressureSourceError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, err)
    }
}
