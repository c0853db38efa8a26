//! Zero-initialised buffers for packed weights, placed on transparent huge pages where the system allows.
//!
//! A decode step at batch 1 streams every weight once from memory, so its speed is the memory bandwidth a
//! core reaches. On 4 KiB pages that stream takes a TLB miss every 4 KiB (a bf16 Qwen2.5-0.5B step: ~240 000),
//! and in a virtual machine each miss walks two page tables. On this project's 2-core VM, a C loop summing a
//! 1 GiB buffer read 25-29 GB/s on 4 KiB pages and 28-30 GB/s on 2 MiB pages (docs/PERFORMANCE.md). Linux
//! gives an anonymous mapping huge pages only when asked (`transparent_hugepage` = `madvise`, the common
//! default), and only before its memory is first touched: hence a mapping of our own, advised before the
//! packing writes it. Where the kernel declines (THP off, other systems) the buffer is plain memory and
//! everything else is the same; where it has no free 2 MiB page at hand it compacts memory or falls back to
//! 4 KiB pages at load (its `defrag` setting), which can slow loading but not the results. Only the whole
//! huge pages a buffer fills are advised: the alignment slack and the rest of the mapping past the buffer
//! are never touched, so they take no memory.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Huge page size on x86-64 and most aarch64 kernels; the alignment of mapped buffers.
const HUGE_PAGE: usize = 2 << 20;

/// Element types whose all-zero bit pattern is the value zero (what a fresh anonymous mapping holds).
pub(crate) trait Zeroed: Copy + Default + Send + Sync + 'static {}
impl Zeroed for f32 {}
impl Zeroed for u16 {}

/// `len` elements of `T`, zeroed, in memory of their own: a 2 MiB-aligned anonymous mapping with huge
/// pages advised when the buffer spans at least one huge page (smaller ones come from the heap).
pub(crate) struct PageBuf<T: Zeroed> {
    ptr: NonNull<T>,
    len: usize,
    /// The mapping behind `ptr` (start, bytes), or `None` for a heap block of `len` elements.
    map: Option<(NonNull<u8>, usize)>,
}

// SAFETY: the buffer owns its memory exclusively, like a `Vec<T>`; `T` is `Send + Sync`.
unsafe impl<T: Zeroed> Send for PageBuf<T> {}
// SAFETY: shared access only reads through `&[T]`.
unsafe impl<T: Zeroed> Sync for PageBuf<T> {}

impl<T: Zeroed> PageBuf<T> {
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        if bytes >= HUGE_PAGE {
            if let Some(b) = Self::mapped(len, bytes) {
                return b;
            }
        }
        let block: Box<[T]> = vec![T::default(); len].into_boxed_slice();
        PageBuf {
            // A boxed slice (capacity == len, what `Drop` rebuilds) never has a null pointer.
            ptr: NonNull::new(Box::into_raw(block) as *mut T).expect("a boxed slice's pointer"),
            len,
            map: None,
        }
    }

    /// A mapping of `bytes` rounded up to whole huge pages plus one (for the alignment), with the whole huge
    /// pages the buffer fills advised as huge (its last partial one stays on 4 KiB pages, so that no memory
    /// past the buffer is ever faulted in); `None` when the system refuses the mapping.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize, bytes: usize) -> Option<Self> {
        let total = bytes.div_ceil(HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let start = (base as usize).next_multiple_of(HUGE_PAGE);
        // SAFETY: [start, start + whole pages within `bytes`) lies inside the mapping.
        // A refusal (THP disabled, an old kernel) leaves ordinary pages, which is not an error.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                bytes / HUGE_PAGE * HUGE_PAGE,
                libc::MADV_HUGEPAGE,
            );
        }
        Some(PageBuf {
            ptr: NonNull::new(start as *mut T)?,
            len,
            map: Some((NonNull::new(base as *mut u8)?, total)),
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn mapped(_len: usize, _bytes: usize) -> Option<Self> {
        None
    }

    /// Whether the buffer is a mapping of its own (and so may be on huge pages).
    #[cfg(test)]
    fn is_mapped(&self) -> bool {
        self.map.is_some()
    }
}

impl<T: Zeroed> Drop for PageBuf<T> {
    fn drop(&mut self) {
        match self.map {
            #[cfg(target_os = "linux")]
            // SAFETY: the mapping was made by `mapped` with exactly this start and size, and is unmapped once.
            Some((base, total)) => unsafe {
                libc::munmap(base.as_ptr() as *mut libc::c_void, total);
            },
            #[cfg(not(target_os = "linux"))]
            Some(_) => unreachable!("mappings are made on Linux only"),
            // SAFETY: the block came from a boxed slice of exactly `len` elements, rebuilt once.
            None => unsafe {
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.ptr.as_ptr(),
                    self.len,
                )));
            },
        }
    }
}

impl<T: Zeroed> Deref for PageBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points to `len` initialised (zeroed, then written) elements owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroed> DerefMut for PageBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes this access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroed> Clone for PageBuf<T> {
    fn clone(&self) -> Self {
        let mut b = Self::zeroed(self.len);
        b.copy_from_slice(self);
        b
    }
}

impl<T: Zeroed + std::fmt::Debug> std::fmt::Debug for PageBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf")
            .field("len", &self.len)
            .field("mapped", &self.map.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small buffers come from the heap, large ones from a 2 MiB-aligned mapping; both start zeroed, keep
    /// what is written, clone equal and drop cleanly (run under the test binary's allocator checks).
    #[test]
    fn zeroed_writable_and_cloned_on_heap_and_mapped() {
        for (len, mapped) in [
            (0usize, false),
            (1000, false),
            (3 << 20, true),
            ((1 << 20) + 7, true),
        ] {
            let mut b = PageBuf::<u16>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0));
            #[cfg(target_os = "linux")]
            {
                assert_eq!(b.is_mapped(), mapped, "len {len}");
                if mapped {
                    assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
                }
            }
            for (i, v) in b.iter_mut().enumerate() {
                *v = (i * 7 % 65521) as u16;
            }
            let c = b.clone();
            assert_eq!(&c[..], &b[..]);
            drop(b);
            assert!(c
                .iter()
                .enumerate()
                .all(|(i, &v)| v == (i * 7 % 65521) as u16));
        }
        let f = PageBuf::<f32>::zeroed(1 << 20);
        assert!(f.iter().all(|&v| v == 0.0));
    }
}
