//! A guest-storage region as the host sees it: registration data, page states, host and guest
//! reads/writes with the secure-storage access rules, and first touch.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{ExportTag, Tables};
use crate::error::{invalid, CoreError};
use crate::memory::{mlock, ps, rlock, summary_counts, wlock, MemoryMode, RegionMem, CHUNK_PAGES};
use crate::state::Core;
use crate::PAGE_SIZE;

/// Page state as reported to callers. ORPHANED = secure/shared page of a dead configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    NonSecure,
    Secure,
    Shared,
    Exported,
    Orphaned,
}

impl PageState {
    pub const fn name(self) -> &'static str {
        match self {
            PageState::NonSecure => "nonsecure",
            PageState::Secure => "secure",
            PageState::Shared => "shared",
            PageState::Exported => "exported",
            PageState::Orphaned => "orphaned",
        }
    }
}

/// Pages per state over a region (see `Region::state_counts`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub nonsecure: u64,
    pub secure: u64,
    pub shared: u64,
    pub exported: u64,
    pub orphaned: u64,
    pub present: u64,
}

/// Largest single `read` (the result is one allocation).
pub const MAX_READ: u64 = 1 << 30;

pub struct Region {
    pub(crate) id: u64,
    pub(crate) base: u64,
    pub(crate) size: u64,
    pub(crate) pages: u64,
    pub(crate) mode: MemoryMode,
    pub(crate) core: Arc<Core>,
    pub(crate) mem: RwLock<Option<RegionMem>>,
    /// Nonce and tag of every EXPORTED page, by page index.
    pub(crate) exported: Mutex<HashMap<u64, ExportTag>>,
}

/// Classify a state word; `owner handle` is 0 for NONSECURE. ORPHANED and the non-secure view
/// of a dead configuration's exported pages are derived from the config table here.
pub(crate) fn classify(s: u32, tables: &Tables) -> (PageState, u64) {
    let kind = ps::kind(s);
    if kind == ps::NONSECURE {
        return (PageState::NonSecure, 0);
    }
    let cfg = tables.by_id(ps::owner(s));
    let handle = cfg.map_or(0, |c| c.handle);
    let alive = cfg.is_some_and(|c| c.is_alive());
    let state = match kind {
        // A page exported while its configuration lived becomes plain non-secure memory
        // (holding ciphertext) once the configuration is gone: nobody can import it back.
        // An orphan exported afterwards keeps reading as exported (by the dead handle).
        ps::EXPORTED if !alive && s & ps::ORPHAN_EXPORT == 0 => return (PageState::NonSecure, 0),
        ps::EXPORTED => PageState::Exported,
        _ if !alive => PageState::Orphaned,
        ps::SECURE => PageState::Secure,
        _ => PageState::Shared,
    };
    (state, handle)
}

impl Region {
    pub(crate) fn new(
        id: u64,
        base: u64,
        size: u64,
        core: Arc<Core>,
        mode: MemoryMode,
    ) -> Result<Region, CoreError> {
        let pages = size / PAGE_SIZE as u64;
        let mem = RegionMem::new(pages, mode)?;
        Ok(Region {
            id,
            base,
            size,
            pages,
            mode,
            core,
            mem: RwLock::new(Some(mem)),
            exported: Mutex::new(HashMap::new()),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// How the guest storage is backed (real pages, or state words only).
    pub fn mode(&self) -> MemoryMode {
        self.mode
    }

    /// Pages whose bytes may be non-zero: in a state-only region the pages that hold data
    /// (the ones backed by host memory), in a real region every present page.
    pub fn data_pages(&self) -> Result<u64, CoreError> {
        if self.mode == MemoryMode::Real {
            return self.present_pages();
        }
        self.with_mem(|mem| mem.data_page_count())
    }

    pub fn is_released(&self) -> bool {
        rlock(&self.mem).is_none()
    }

    /// Run `f` with the mapping held (shared); fails once the region was released.
    pub(crate) fn with_mem<R>(&self, f: impl FnOnce(&RegionMem) -> R) -> Result<R, CoreError> {
        let guard = rlock(&self.mem);
        match guard.as_ref() {
            Some(mem) => Ok(f(mem)),
            None => Err(CoreError::RegionReleased(self.id)),
        }
    }

    /// Unmap (the zap of every present PTE at mm teardown; charged as one kernel walk). Pages
    /// still secure stop counting for their owners.
    pub(crate) fn release(&self) {
        let _timed = self.core.timed(true);
        let mut guard = wlock(&self.mem);
        let Some(mem) = guard.take() else { return };
        let present: u64 = mem
            .summaries()
            .iter()
            .map(|s| u64::from(summary_counts(s.load(Ordering::Relaxed)).0))
            .sum();
        self.core.charge(|a| {
            a.charge_walk();
            a.charge_ptes(present);
        });
        let tables = rlock(&self.core.tables);
        let metas = mem.metas();
        for (chunk, sum) in mem.summaries().iter().enumerate() {
            if summary_counts(sum.load(Ordering::Relaxed)).1 == 0 {
                continue;
            }
            let lo = chunk as u64 * CHUNK_PAGES;
            let hi = (lo + CHUNK_PAGES).min(mem.pages());
            for m in &metas[lo as usize..hi as usize] {
                let s = m.load(Ordering::Acquire);
                if ps::is_secure(s) {
                    if let Some(cfg) = tables.by_id(ps::owner(s)) {
                        cfg.secure_pages.fetch_sub(1, Ordering::Relaxed);
                    }
                    self.core.secure_total.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        // Exported pages stop referring to their owners too (every EXPORTED word has a tag).
        for &idx in mlock(&self.exported).keys() {
            let s = metas
                .get(idx as usize)
                .map_or(0, |m| m.load(Ordering::Acquire));
            if ps::kind(s) == ps::EXPORTED {
                if let Some(cfg) = tables.by_id(ps::owner(s)) {
                    cfg.exported_pages.fetch_sub(1, Ordering::Relaxed);
                    if s & ps::ORPHAN_EXPORT != 0 {
                        cfg.orphan_exports.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
        drop(tables);
        mlock(&self.exported).clear();
        drop(mem);
    }

    /// Pages touched so far (sum of the chunk summaries).
    pub fn present_pages(&self) -> Result<u64, CoreError> {
        self.with_mem(|mem| {
            mem.summaries()
                .iter()
                .map(|s| u64::from(summary_counts(s.load(Ordering::Relaxed)).0))
                .sum()
        })
    }

    pub fn page_state(&self, index: u64) -> Result<(PageState, u64), CoreError> {
        if index >= self.pages {
            return Err(CoreError::IndexOutOfRange {
                arg: "index",
                index,
                len: self.pages,
            });
        }
        self.with_mem(|mem| {
            // Tables first: the owner id cannot be retired (and reused) between the two reads.
            let tables = rlock(&self.core.tables);
            let s = mem.metas()[index as usize].load(Ordering::Acquire);
            classify(s, &tables)
        })
    }

    /// Counts per state; only chunks with present pages are scanned.
    pub fn state_counts(&self) -> Result<StateCounts, CoreError> {
        self.with_mem(|mem| {
            let tables = rlock(&self.core.tables);
            let metas = mem.metas();
            let mut c = StateCounts::default();
            for (chunk, sum) in mem.summaries().iter().enumerate() {
                let (present, _) = summary_counts(sum.load(Ordering::Relaxed));
                if present == 0 {
                    continue;
                }
                let lo = chunk as u64 * CHUNK_PAGES;
                let hi = (lo + CHUNK_PAGES).min(mem.pages());
                for m in &metas[lo as usize..hi as usize] {
                    let s = m.load(Ordering::Acquire);
                    if s & ps::PRESENT == 0 {
                        continue;
                    }
                    c.present += 1;
                    match classify(s, &tables).0 {
                        PageState::NonSecure => c.nonsecure += 1,
                        PageState::Secure => c.secure += 1,
                        PageState::Shared => c.shared += 1,
                        PageState::Exported => c.exported += 1,
                        PageState::Orphaned => c.orphaned += 1,
                    }
                }
            }
            // Untouched pages are non-secure.
            c.nonsecure += self.pages - c.present;
            c
        })
    }

    fn check_range(&self, offset: u64, size: u64) -> Result<(), CoreError> {
        match offset.checked_add(size) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(invalid(
                "offset",
                format!(
                    "range {offset:#x}+{size:#x} outside region of {:#x} bytes",
                    self.size
                ),
            )),
        }
    }

    /// First touch of pages `[lo, hi)`: fault them in and mark them present. Returns how many
    /// became present.
    pub(crate) fn touch_pages(&self, mem: &RegionMem, lo: u64, hi: u64) -> u64 {
        let metas = mem.metas();
        if metas[lo as usize..hi as usize]
            .iter()
            .all(|m| m.load(Ordering::Relaxed) & ps::PRESENT != 0)
        {
            return 0;
        }
        // Populating never changes contents, so it may run without page locks. A state-only
        // region backs no page until it holds data: first touch only marks it present.
        let state_only = mem.state_only();
        let populated = state_only
            || mem
                .data()
                .populate_write(lo as usize * PAGE_SIZE, (hi - lo) as usize * PAGE_SIZE);
        let mut n = 0;
        for idx in lo..hi {
            let m = &metas[idx as usize];
            if m.load(Ordering::Relaxed) & ps::PRESENT != 0 {
                continue;
            }
            let old = mem.lock(m);
            if old & ps::PRESENT == 0 {
                if !populated {
                    let p = mem.page_ptr(idx);
                    // SAFETY: page lock held, so nobody else accesses the page; p is inside the
                    // mapping. Re-writing the byte it holds faults the page in without changing it.
                    unsafe { p.write_volatile(p.read_volatile()) };
                }
                let new = old | ps::PRESENT;
                mem.account_summary(idx, old, new);
                mem.unlock(m, new);
                n += 1;
            } else {
                mem.unlock(m, old);
            }
        }
        self.core.charge(|a| a.charge_faulted(n));
        n
    }

    /// Host page fault on `[offset, offset+size)`; returns the pages that became present.
    pub fn touch(&self, offset: u64, size: u64) -> Result<u64, CoreError> {
        self.check_range(offset, size)?;
        if size == 0 {
            return Ok(0);
        }
        // Up to 1 MiB the elapsed time is the CPU time (no pool, no sleep) and cheaper to read.
        let _timed = self.core.timed(size > crate::MIB);
        let lo = offset / PAGE_SIZE as u64;
        let hi = (offset + size).div_ceil(PAGE_SIZE as u64);
        self.with_mem(|mem| self.touch_pages(mem, lo, hi))
    }

    /// Access rule of one page for `as_config` (0 = host). Err = the state that forbids it.
    fn access_denied(&self, s: u32, as_config: u64, tables: &Tables) -> Option<(PageState, u64)> {
        let (state, owner) = classify(s, tables);
        let ok = if as_config == 0 {
            matches!(
                state,
                PageState::NonSecure | PageState::Exported | PageState::Shared
            )
        } else {
            match state {
                PageState::NonSecure => true,
                PageState::Secure | PageState::Shared => owner == as_config,
                _ => false,
            }
        };
        (!ok).then_some((state, owner))
    }

    /// Run `f(page pointer, done, n, holds_data)` for each page piece of `[offset, offset+len)`
    /// with the page locked, after the access rules of `as_config` allowed it. `f` returns
    /// whether it wrote the page (a state-only region then records that the page holds data).
    fn access(
        &self,
        offset: u64,
        len: u64,
        as_config: u64,
        mut f: impl FnMut(*mut u8, usize, usize, bool) -> bool,
    ) -> Result<(), CoreError> {
        self.check_range(offset, len)?;
        if as_config != 0 && rlock(&self.core.tables).live(as_config).is_none() {
            return Err(invalid(
                "as_config",
                format!("no live configuration {as_config:#x}"),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let _timed = self.core.timed(len > crate::MIB);
        self.with_mem(|mem| {
            let first = offset / PAGE_SIZE as u64;
            let last = (offset + len).div_ceil(PAGE_SIZE as u64);
            self.touch_pages(mem, first, last);
            let metas = mem.metas();
            let mut done = 0usize;
            for idx in first..last {
                let m = &metas[idx as usize];
                let s = mem.lock(m);
                let denied = self.access_denied(s, as_config, &rlock(&self.core.tables));
                if let Some((state, owner)) = denied {
                    mem.unlock(m, s);
                    return Err(CoreError::SecureStorageAccess {
                        offset: idx * PAGE_SIZE as u64,
                        state: state.name(),
                        owner,
                    });
                }
                let page_lo = idx * PAGE_SIZE as u64;
                let start = offset.max(page_lo) - page_lo;
                let end = (offset + len).min(page_lo + PAGE_SIZE as u64) - page_lo;
                let n = (end - start) as usize;
                // SAFETY: start < PAGE_SIZE, so the pointer stays inside page idx of the mapping.
                let p = unsafe { mem.page_ptr(idx).add(start as usize) };
                if f(p, done, n, mem.has_data(idx)) {
                    mem.mark_data(idx);
                }
                done += n;
                mem.unlock(m, s);
            }
            Ok(())
        })?
    }

    /// Benchmark floor only, not emulation: overwrite every byte of the region with zeroes,
    /// with streaming stores (`nontemporal`) or a plain memset, on the calling thread or on the
    /// UV's pool (`parallel`), without looking at or changing page states. Holds the mapping
    /// exclusively, so no UVC runs meanwhile. It exists so the destroy walk can be compared
    /// with zeroing of the *same* memory: on a VM the rate differs between mappings.
    #[doc(hidden)]
    pub fn bench_zero_all(&self, nontemporal: bool, parallel: bool) -> Result<(), CoreError> {
        let guard = wlock(&self.mem);
        let mem = guard.as_ref().ok_or(CoreError::RegionReleased(self.id))?;
        if mem.state_only() {
            return Err(invalid(
                "region",
                "a state-only region has no guest memory to zero",
            ));
        }
        let base = mem.page_ptr(0) as usize;
        let piece = crate::memory::CHUNK_PAGES as usize * PAGE_SIZE;
        let len = self.pages as usize * PAGE_SIZE;
        let zero = |off: usize, n: usize| {
            let p = (base + off) as *mut u8;
            if nontemporal {
                // SAFETY: [off, off+n) lies inside the data mapping, page aligned; the exclusive
                // mapping lock keeps every other access out.
                unsafe { crate::zero::zero_nt(p, n) };
            } else {
                // SAFETY: as above.
                unsafe { std::ptr::write_bytes(p, 0, n) };
            }
        };
        if parallel {
            use rayon::prelude::*;
            self.core.pool.install(|| {
                (0..len.div_ceil(piece))
                    .into_par_iter()
                    .for_each(|i| zero(i * piece, piece.min(len - i * piece)))
            });
        } else {
            zero(0, len);
        }
        Ok(())
    }

    /// Read with the access rules of `as_config` (0 = host).
    pub fn read(&self, offset: u64, size: u64, as_config: u64) -> Result<Vec<u8>, CoreError> {
        self.check_range(offset, size)?;
        if size > MAX_READ {
            return Err(invalid(
                "size",
                format!("{size:#x} bytes is more than one read may return ({MAX_READ:#x})"),
            ));
        }
        let mut out = vec![0u8; size as usize];
        self.access(offset, size, as_config, |p, at, n, holds_data| {
            // A page without data reads as zeroes, which `out` already holds.
            if holds_data {
                // SAFETY: p points to n readable bytes inside a page whose lock we hold; the
                // destination range at..at+n lies inside `out` (the pieces add up to `size`).
                unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().add(at), n) };
            }
            false
        })?;
        Ok(out)
    }

    /// Write with the access rules of `as_config` (0 = host).
    pub fn write(&self, offset: u64, data: &[u8], as_config: u64) -> Result<(), CoreError> {
        self.access(offset, data.len() as u64, as_config, |p, at, n, _| {
            // SAFETY: p points to n writable bytes inside a page whose lock we hold; the source
            // range at..at+n lies inside `data`.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(at), p, n) };
            true
        })
    }
}
