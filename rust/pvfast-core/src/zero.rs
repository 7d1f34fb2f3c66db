//! Page zeroing with non-temporal stores: a destroyed page is not going to be read soon, so
//! the zeroes should not evict the cache (the UV's own clearing does not go through it either).

use crate::PAGE_SIZE;

/// Zero one 4 KiB page with streaming stores. The caller must issue [`store_fence`] before
/// publishing the page (e.g. before releasing its lock bit) so the zeroes are ordered first.
///
/// # Safety
/// `page` must be valid for writes of `PAGE_SIZE` bytes, 16-byte aligned, and not accessed
/// concurrently by anyone else.
#[inline]
pub(crate) unsafe fn zero_page_nt(page: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_stream_si128};
        let zero = _mm_setzero_si128();
        let mut p = page.cast::<__m128i>();
        // SAFETY: the caller guarantees PAGE_SIZE writable, 16-byte aligned bytes; 256 stores of 16
        // bytes cover exactly one page. SSE2 is part of the x86_64 baseline.
        unsafe {
            let end = p.add(PAGE_SIZE / 16);
            while p < end {
                _mm_stream_si128(p, zero);
                _mm_stream_si128(p.add(1), zero);
                _mm_stream_si128(p.add(2), zero);
                _mm_stream_si128(p.add(3), zero);
                _mm_stream_si128(p.add(4), zero);
                _mm_stream_si128(p.add(5), zero);
                _mm_stream_si128(p.add(6), zero);
                _mm_stream_si128(p.add(7), zero);
                p = p.add(8);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: the caller guarantees PAGE_SIZE writable bytes.
        unsafe { std::ptr::write_bytes(page, 0, PAGE_SIZE) };
    }
}

/// Order all earlier non-temporal stores before later stores (no-op without streaming stores).
#[inline]
pub(crate) fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no memory-safety preconditions; SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Zero `len` bytes (a multiple of PAGE_SIZE) with streaming stores and fence. Used by the
/// benchmark as the bandwidth floor the destroy walk is compared against.
///
/// # Safety
/// `ptr` must be page aligned and valid for writes of `len` bytes, with no concurrent access.
pub unsafe fn zero_nt(ptr: *mut u8, len: usize) {
    let mut off = 0;
    while off + PAGE_SIZE <= len {
        // SAFETY: in bounds by the loop condition and the caller's contract; page aligned.
        unsafe { zero_page_nt(ptr.add(off)) };
        off += PAGE_SIZE;
    }
    store_fence();
}
