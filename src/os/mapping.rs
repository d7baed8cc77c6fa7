//! The mapped region the blocks are carved from, and out-of-band metadata storage.
//!
//! ```text
//!  mapping (len = capacity + one chunk of slack for alignment)
//!  |<- slack ->|<------------------------ capacity ------------------------>|
//!              ^ base: aligned to the chunk size (4 KiB << max_order)
//!              | chunk 0 | chunk 1 | chunk 2 |   ...   | chunk n-1 |
//! ```
//!
//! Nothing here touches the blocks themselves: the kernel commits memory on first touch,
//! and hinted blocks must stay untouched until they are handed out again.

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;

/// Where the pool's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// One private anonymous `mmap` reserved with `MAP_NORESERVE`: nothing is committed
    /// until a block is touched, and hinting gives memory back with `madvise`.
    Mmap,
    /// A zeroed allocation from the Rust heap. Hinting is bookkeeping only (no `madvise`).
    /// Meant for tests, Miri and loom, which cannot model `mmap`.
    Heap,
}

// === impl Region ===

/// The block memory: one aligned span of `len` bytes.
pub(crate) struct Region {
    base: NonNull<u8>,
    len: usize,
    memory: Memory,
}

enum Memory {
    #[cfg(not(any(loom, miri)))]
    Mmap(#[allow(dead_code)] memmap2::MmapRaw),
    Heap {
        ptr: NonNull<u8>,
        layout: Layout,
    },
}

// SAFETY: the region is plain memory; the pool's frame table decides which thread may
// touch which block, and the region itself is never read or written through `&self`.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Reserves `len` bytes aligned to `align` (a power of two, at least 4 KiB).
    pub(crate) fn new(
        len: usize,
        align: usize,
        backing: Backing,
        huge_pages: bool,
    ) -> io::Result<Self> {
        debug_assert!(align.is_power_of_two() && len.is_multiple_of(align));
        match backing {
            #[cfg(not(any(loom, miri)))]
            Backing::Mmap => Self::map(len, align, huge_pages),
            #[cfg(any(loom, miri))]
            Backing::Mmap => {
                let _ = huge_pages;
                Self::heap(len, align)
            }
            Backing::Heap => Self::heap(len, align),
        }
    }

    #[cfg(not(any(loom, miri)))]
    fn map(len: usize, align: usize, huge_pages: bool) -> io::Result<Self> {
        let total = len
            .checked_add(align)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "region size overflows"))?;
        let map = memmap2::MmapOptions::new()
            .len(total)
            .no_reserve_swap()
            .map_anon()?;
        let map = memmap2::MmapRaw::from(map);
        let start = map.as_mut_ptr();
        let offset = start.align_offset(align);
        // SAFETY: `offset < align`, and the mapping is `len + align` bytes long, so the
        // aligned base and the `len` bytes after it lie inside the mapping.
        let base = unsafe { start.add(offset) };
        if huge_pages {
            // A hint only: when THP is off or unsupported the region still works.
            // SAFETY: [base, base + len) is inside our own mapping.
            unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
        }
        Ok(Self {
            base: NonNull::new(base).expect("mmap returned null"),
            len,
            memory: Memory::Mmap(map),
        })
    }

    fn heap(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len, align)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad region layout"))?;
        // SAFETY: `len` is non-zero (at least one chunk).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Self {
            base: ptr,
            len,
            memory: Memory::Heap { ptr, layout },
        })
    }

    /// First byte of the aligned span.
    #[inline]
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Offset of `ptr` from the base, if `ptr` lies inside the span.
    #[inline]
    pub(crate) fn offset_of(&self, ptr: *const u8) -> Option<usize> {
        let offset = (ptr as usize).wrapping_sub(self.base.as_ptr() as usize);
        (offset < self.len).then_some(offset)
    }

    /// Whether the memory comes from the OS (and so can be advised).
    pub(crate) fn is_mapped(&self) -> bool {
        !matches!(self.memory, Memory::Heap { .. })
    }
}

impl Drop for Region {
    // Under loom every region is heap-backed, so the pattern cannot fail there.
    #[cfg_attr(loom, allow(irrefutable_let_patterns))]
    fn drop(&mut self) {
        if let Memory::Heap { ptr, layout } = self.memory {
            // SAFETY: allocated in `heap` with this layout and freed only here.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
        // `MmapRaw` unmaps itself.
    }
}

// === impl MetaArray ===

/// A fixed-length array of metadata kept outside the blocks.
///
/// With [`Backing::Mmap`] its memory comes straight from the OS, so a pool used as the
/// global allocator never allocates through the global allocator while it sets itself
/// up, and untouched parts of a large frame table cost nothing.
pub(crate) struct MetaArray<T> {
    ptr: NonNull<T>,
    len: usize,
    #[cfg(not(any(loom, miri)))]
    _map: Option<memmap2::MmapRaw>,
}

// SAFETY: MetaArray owns its elements like a Box<[T]>.
unsafe impl<T: Send> Send for MetaArray<T> {}
// SAFETY: shared access only hands out `&T`.
unsafe impl<T: Sync> Sync for MetaArray<T> {}

impl<T> MetaArray<T> {
    /// An array of `len` elements, each made by `init(index)`.
    ///
    /// `zero_is_init` says that an all-zero `T` equals `init(i)` for every `i`; then a
    /// fresh OS mapping (which reads as zeros) needs no writes at all.
    pub(crate) fn new(
        len: usize,
        backing: Backing,
        zero_is_init: bool,
        mut init: impl FnMut(usize) -> T,
    ) -> io::Result<Self> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .filter(|&b| b > 0)
            .unwrap_or(size_of::<T>().max(1));
        let (ptr, map, zeroed) = Self::raw(bytes, backing)?;
        let ptr = ptr.cast::<T>();
        // loom's atomics are not plain integers, so zero is never a valid loom value.
        if !(zeroed && zero_is_init && !cfg!(loom)) {
            for i in 0..len {
                // SAFETY: `ptr` points to `len` properly aligned, writable slots of T
                // (mmap and the heap layout are aligned to at least align_of::<T>()).
                unsafe { ptr.as_ptr().add(i).write(init(i)) };
            }
        }
        let _ = &map;
        Ok(Self {
            ptr,
            len,
            #[cfg(not(any(loom, miri)))]
            _map: map,
        })
    }

    /// Gives the whole pages inside elements `range` back to the OS with `MADV_DONTNEED`,
    /// so that they read as zeros again and stop counting as resident. Does nothing on the
    /// heap backing (under loom and Miri too). A failure is ignored: the pages then stay
    /// resident with what they held, which the caller accepts either way.
    ///
    /// # Safety
    /// An all-zero `T` must be a valid value that every reader of the range takes to mean
    /// what the range holds now, and no thread may write to the range during the call.
    pub(crate) unsafe fn release_pages(&self, range: std::ops::Range<usize>) {
        #[cfg(not(any(loom, miri)))]
        if self._map.is_some() && range.start < range.end && range.end <= self.len {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let page = if page > 0 { page as usize } else { 4096 };
            let base = self.ptr.as_ptr() as usize;
            let start = (base + range.start * size_of::<T>()).next_multiple_of(page);
            let end = (base + range.end * size_of::<T>()) / page * page;
            if start < end {
                // SAFETY: [start, end) lies inside this array's own mapping; the caller
                // guarantees that the zeros the range reads afterwards are valid values
                // meaning what it held, and that nobody writes it meanwhile.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
                };
            }
        }
        #[cfg(any(loom, miri))]
        let _ = range;
    }

    #[cfg(not(any(loom, miri)))]
    #[allow(clippy::type_complexity)]
    fn raw(
        bytes: usize,
        backing: Backing,
    ) -> io::Result<(NonNull<u8>, Option<memmap2::MmapRaw>, bool)> {
        match backing {
            Backing::Mmap => {
                let map = memmap2::MmapOptions::new()
                    .len(bytes)
                    .no_reserve_swap()
                    .map_anon()?;
                let map = memmap2::MmapRaw::from(map);
                let ptr = NonNull::new(map.as_mut_ptr()).expect("mmap returned null");
                Ok((ptr, Some(map), true))
            }
            Backing::Heap => Self::heap(bytes).map(|p| (p, None, true)),
        }
    }

    #[cfg(any(loom, miri))]
    fn raw(bytes: usize, _backing: Backing) -> io::Result<(NonNull<u8>, Option<()>, bool)> {
        Self::heap(bytes).map(|p| (p, None, true))
    }

    fn heap(bytes: usize) -> io::Result<NonNull<u8>> {
        let layout = Layout::from_size_align(bytes, align_of::<T>().max(64))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `bytes` is non-zero.
        NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
    }

    fn heap_layout(&self) -> Layout {
        let bytes = (self.len * size_of::<T>()).max(size_of::<T>().max(1));
        Layout::from_size_align(bytes, align_of::<T>().max(64)).expect("checked in new")
    }
}

impl<T> std::ops::Deref for MetaArray<T> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        // SAFETY: `new` initialised all `len` elements, and they live until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for MetaArray<T> {
    fn drop(&mut self) {
        // SAFETY: the elements were initialised in `new` and are dropped once, here.
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ))
        };
        #[cfg(not(any(loom, miri)))]
        if self._map.is_some() {
            return; // the mapping unmaps itself
        }
        // SAFETY: heap memory allocated in `heap` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.heap_layout()) };
    }
}
