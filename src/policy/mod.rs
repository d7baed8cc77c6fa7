//! Layer 3: the policies that make the buddy allocator more than one.
//!
//! - [`hint`]: free page hinting, the background return of cold free blocks to the OS.
//! - [`capture`]: waiting large requests take blocks as concurrent frees coalesce them.
//!
//! Each drives the shard through the narrow interfaces the shard defines (isolation,
//! reservations, the [`Handoff`](crate::shard::Handoff) trait). Neither knows the other.
//!
//! May call: `shard`, `frame_table`, `config`, `os`, `sync`.

pub(crate) mod capture;
pub(crate) mod hint;
