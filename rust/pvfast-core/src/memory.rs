//! Guest storage and its per-page metadata: lazily backed anonymous mappings, the packed
//! page-state word with its lock bit, the per-chunk summary that lets walks skip chunks
//! that hold no secure page, and (state-only regions) the bitmap of pages that hold data.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::CoreError;
use crate::PAGE_SIZE;

/// Pages per summary chunk (2 MiB of guest storage).
pub const CHUNK_PAGES: u64 = 512;

/// Lock helpers that never panic: a poisoned lock only means another thread panicked while
/// holding it, and our critical sections leave the data consistent at every step.
pub(crate) fn rlock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn wlock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn mlock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// An anonymous private mapping reserved without swap accounting; pages cost RAM only once
/// touched, and read as zero before that.
pub(crate) struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all shared access to its contents
// goes through atomics or through the per-page lock protocol of `RegionMem`.
unsafe impl Send for Mmap {}
// SAFETY: as above.
unsafe impl Sync for Mmap {}

impl Mmap {
    pub(crate) fn anon(len: usize) -> Result<Mmap, CoreError> {
        let len = len.max(PAGE_SIZE).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; no existing
        // memory is affected. The result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(CoreError::Os(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::ENOMEM),
            ));
        }
        match NonNull::new(ptr.cast::<u8>()) {
            Some(ptr) => Ok(Mmap { ptr, len }),
            None => Err(CoreError::Os(libc::ENOMEM)),
        }
    }

    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Ask the kernel to fault in `[off, off+len)` for writing in one go (Linux ≥ 5.14).
    /// Returns false if that is not supported, so the caller falls back to touching.
    pub(crate) fn populate_write(&self, off: usize, len: usize) -> bool {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: the range lies inside this mapping (checked above); populate only faults pages
        // in and never changes their contents.
        unsafe { libc::madvise(self.ptr.as_ptr().add(off).cast(), len, MADV_POPULATE_WRITE) == 0 }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping created in `anon`, unmapped once here.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The page-state word (one `AtomicU32` per page).
///
/// ```text
/// bit 31     PRESENT   page touched ("present PTE")
/// bit 30     BUSY      transition in progress (page lock)
/// bits 29-28 KIND      0 NONSECURE, 1 SECURE, 2 SHARED, 3 EXPORTED
/// bit 27     PINNED    shared page pinned by the host (PIN_PAGE_SHARED); on an EXPORTED
///                      page: ORPHAN_EXPORT (exported after its owner was gone)
/// bits 26-0  OWNER     configuration id (0 = none; reused only once no word names it)
/// ```
/// ORPHANED is not stored: it is SECURE/SHARED whose owner was removed by Destroy-Fast.
pub(crate) mod ps {
    pub const PRESENT: u32 = 1 << 31;
    pub const BUSY: u32 = 1 << 30;
    pub const KIND_SHIFT: u32 = 28;
    pub const KIND_MASK: u32 = 3 << KIND_SHIFT;
    pub const NONSECURE: u32 = 0;
    pub const SECURE: u32 = 1;
    pub const SHARED: u32 = 2;
    pub const EXPORTED: u32 = 3;
    pub const PINNED: u32 = 1 << 27;
    /// On an EXPORTED page (where PINNED has no meaning): exported after its owner was
    /// already gone (an orphan), so it still reads as exported.
    pub const ORPHAN_EXPORT: u32 = PINNED;
    pub const OWNER_MASK: u32 = (1 << 27) - 1;
    pub const MAX_OWNER: u32 = OWNER_MASK;

    #[inline]
    pub const fn kind(s: u32) -> u32 {
        (s & KIND_MASK) >> KIND_SHIFT
    }
    #[inline]
    pub const fn owner(s: u32) -> u32 {
        s & OWNER_MASK
    }
    /// SECURE or SHARED: the page belongs to a configuration and is counted as secure.
    #[inline]
    pub const fn is_secure(s: u32) -> bool {
        let k = kind(s);
        k == SECURE || k == SHARED
    }
    #[inline]
    pub const fn make(kind: u32, owner: u32) -> u32 {
        PRESENT | (kind << KIND_SHIFT) | (owner & OWNER_MASK)
    }
}

/// How a region's guest storage is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryMode {
    /// Every page the guest touches is a real 4 KiB page of host memory (the default).
    #[default]
    Real,
    /// A touched page costs only its 4-byte state word; host memory backs only the pages that
    /// hold data (written by the guest or the host, unpacked, exported as ciphertext). A page
    /// without data reads as zeroes, and clearing it (destroy, import) writes nothing.
    State,
}

impl MemoryMode {
    pub const fn name(self) -> &'static str {
        match self {
            MemoryMode::Real => "real",
            MemoryMode::State => "state",
        }
    }

    pub fn from_name(name: &str) -> Option<MemoryMode> {
        match name {
            "real" => Some(MemoryMode::Real),
            "state" => Some(MemoryMode::State),
            _ => None,
        }
    }
}

/// Summary word per chunk: low 16 bits present pages, high 16 bits secure pages.
pub(crate) const SUM_PRESENT_ONE: u32 = 1;
pub(crate) const SUM_SECURE_ONE: u32 = 1 << 16;

/// The mappings of one region: contents, page-state words, chunk summary, and for a
/// state-only region the data bitmap (one bit per page; a page whose bit is clear holds only
/// zeroes).
pub(crate) struct RegionMem {
    data: Mmap,
    meta: Mmap,
    summary: Mmap,
    data_bits: Option<Mmap>,
    pages: u64,
    chunks: u64,
}

impl RegionMem {
    pub(crate) fn new(pages: u64, mode: MemoryMode) -> Result<RegionMem, CoreError> {
        let chunks = pages.div_ceil(CHUNK_PAGES);
        let size = usize::try_from(
            pages
                .checked_mul(PAGE_SIZE as u64)
                .ok_or(CoreError::Os(libc::ENOMEM))?,
        )
        .map_err(|_| CoreError::Os(libc::ENOMEM))?;
        let meta_len = usize::try_from(pages * 4).map_err(|_| CoreError::Os(libc::ENOMEM))?;
        let sum_len = usize::try_from(chunks * 4).map_err(|_| CoreError::Os(libc::ENOMEM))?;
        let data_bits = match mode {
            MemoryMode::Real => None,
            MemoryMode::State => Some(Mmap::anon(
                usize::try_from(pages.div_ceil(64) * 8).map_err(|_| CoreError::Os(libc::ENOMEM))?,
            )?),
        };
        Ok(RegionMem {
            data: Mmap::anon(size)?,
            meta: Mmap::anon(meta_len)?,
            summary: Mmap::anon(sum_len)?,
            data_bits,
            pages,
            chunks,
        })
    }

    #[inline]
    pub(crate) fn state_only(&self) -> bool {
        self.data_bits.is_some()
    }

    /// The data bitmap words (state-only regions).
    #[inline]
    fn data_words(&self) -> Option<&[AtomicU64]> {
        self.data_bits.as_ref().map(|m| {
            // SAFETY: the bitmap mapping holds pages.div_ceil(64) zero-initialised u64 words
            // (page aligned); AtomicU64 has the layout of u64; the slice lives no longer than self.
            unsafe {
                std::slice::from_raw_parts(
                    m.as_ptr().cast::<AtomicU64>(),
                    self.pages.div_ceil(64) as usize,
                )
            }
        })
    }

    /// Whether page `idx` may hold non-zero bytes: always in a real region; in a state-only
    /// region only if something wrote to it since it was last cleared. Read it with the page
    /// lock held.
    #[inline]
    pub(crate) fn has_data(&self, idx: u64) -> bool {
        match self.data_words() {
            None => true,
            Some(w) => w[(idx / 64) as usize].load(Ordering::Acquire) & (1 << (idx % 64)) != 0,
        }
    }

    /// Page `idx` is about to receive data (page lock held). No-op in a real region.
    #[inline]
    pub(crate) fn mark_data(&self, idx: u64) {
        if let Some(w) = self.data_words() {
            w[(idx / 64) as usize].fetch_or(1 << (idx % 64), Ordering::AcqRel);
        }
    }

    /// Pages whose data bit is set (state-only regions; 0 otherwise).
    pub(crate) fn data_page_count(&self) -> u64 {
        self.data_words().map_or(0, |w| {
            w.iter()
                .map(|x| u64::from(x.load(Ordering::Relaxed).count_ones()))
                .sum()
        })
    }

    /// Whether any page of `chunk` holds data (always true in a real region).
    #[inline]
    pub(crate) fn chunk_has_data(&self, chunk: u64) -> bool {
        match self.data_words() {
            None => true,
            Some(w) => {
                let per = (CHUNK_PAGES / 64) as usize;
                let lo = chunk as usize * per;
                w[lo..(lo + per).min(w.len())]
                    .iter()
                    .any(|x| x.load(Ordering::Acquire) != 0)
            }
        }
    }

    /// Clear a locked page before it changes hands: in a real region always (streaming
    /// stores; the caller fences before publishing), in a state-only region only if it holds
    /// data (plain stores, cleared bit). Returns whether bytes were written.
    #[inline]
    pub(crate) fn clear_page_nt(&self, idx: u64) -> bool {
        if !self.state_only() {
            // SAFETY: the caller holds the page lock; idx is a page of this mapping, 4 KiB aligned.
            unsafe { crate::zero::zero_page_nt(self.page_ptr(idx)) };
            return true;
        }
        self.clear_data_page(idx)
    }

    /// State-only region: zero page `idx` with plain stores if it holds data and clear its
    /// bit (page lock held; no fence needed). Returns whether it held data.
    #[inline]
    pub(crate) fn clear_data_page(&self, idx: u64) -> bool {
        let Some(w) = self.data_words() else {
            return false;
        };
        let bit = 1u64 << (idx % 64);
        let word = &w[(idx / 64) as usize];
        if word.load(Ordering::Acquire) & bit == 0 {
            return false;
        }
        // SAFETY: the caller holds the page lock; idx is a page of this mapping.
        unsafe { std::ptr::write_bytes(self.page_ptr(idx), 0, PAGE_SIZE) };
        word.fetch_and(!bit, Ordering::AcqRel);
        true
    }

    #[inline]
    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    /// All page-state words.
    #[inline]
    pub(crate) fn metas(&self) -> &[AtomicU32] {
        // SAFETY: the meta mapping holds at least `pages` zero-initialised u32 words (page
        // aligned), AtomicU32 has the layout of u32, and the slice lives no longer than `self`.
        unsafe {
            std::slice::from_raw_parts(self.meta.as_ptr().cast::<AtomicU32>(), self.pages as usize)
        }
    }

    /// All chunk summary words.
    #[inline]
    pub(crate) fn summaries(&self) -> &[AtomicU32] {
        // SAFETY: as for `metas`, with `chunks` words.
        unsafe {
            std::slice::from_raw_parts(
                self.summary.as_ptr().cast::<AtomicU32>(),
                self.chunks as usize,
            )
        }
    }

    /// Host pointer to page `idx`. Only dereference while holding that page's lock bit.
    #[inline]
    pub(crate) fn page_ptr(&self, idx: u64) -> *mut u8 {
        debug_assert!(idx < self.pages);
        // SAFETY: idx < pages (callers validate indices), so the offset is inside the mapping.
        unsafe { self.data.as_ptr().add(idx as usize * PAGE_SIZE) }
    }

    pub(crate) fn data(&self) -> &Mmap {
        &self.data
    }

    /// Acquire the lock bit of a page; returns the state word as it was (without BUSY).
    #[inline]
    pub(crate) fn lock(&self, m: &AtomicU32) -> u32 {
        let mut spins = 0u32;
        loop {
            let cur = m.load(Ordering::Relaxed);
            if cur & ps::BUSY == 0
                && m.compare_exchange_weak(
                    cur,
                    cur | ps::BUSY,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                return cur;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Try once to lock a page whose word was just read as `cur`.
    #[inline]
    pub(crate) fn try_lock_from(&self, m: &AtomicU32, cur: u32) -> bool {
        cur & ps::BUSY == 0
            && m.compare_exchange(cur, cur | ps::BUSY, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }

    /// Release the lock bit, publishing the new state (which must not contain BUSY).
    #[inline]
    pub(crate) fn unlock(&self, m: &AtomicU32, new: u32) {
        m.store(new & !ps::BUSY, Ordering::Release);
    }

    /// Account a transition `old -> new` of a page in chunk `chunk` in the summary.
    #[inline]
    pub(crate) fn account_summary(&self, idx: u64, old: u32, new: u32) {
        let sum = &self.summaries()[(idx / CHUNK_PAGES) as usize];
        if old & ps::PRESENT == 0 && new & ps::PRESENT != 0 {
            sum.fetch_add(SUM_PRESENT_ONE, Ordering::Relaxed);
        }
        match (ps::is_secure(old), ps::is_secure(new)) {
            (false, true) => {
                sum.fetch_add(SUM_SECURE_ONE, Ordering::Relaxed);
            }
            (true, false) => {
                sum.fetch_sub(SUM_SECURE_ONE, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Present and secure page counts of one summary word.
#[inline]
pub(crate) fn summary_counts(word: u32) -> (u32, u32) {
    (word & 0xffff, word >> 16)
}
