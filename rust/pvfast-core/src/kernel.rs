//! Kernel-side range helpers, as free functions over an [`Ultravisor`]: what the s390 fault
//! handlers, KVM_PV_UNPACK, exit_mmap and `__s390_uv_destroy_range` do to a range of pages,
//! expressed as UVC sequences. Each UVC is counted like a single call would be. Whether to export
//! before import is the caller's (KVM layer's) decision.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::Config;
use crate::error::{invalid, CoreError};
use crate::memory::{ps, summary_counts, RegionMem, CHUNK_PAGES};
use crate::pages::PageCtx;
use crate::region::Region;
use crate::ultravisor::Ultravisor;
use crate::uvc::{rc, Uvc, UvcStatus};
use crate::walk::{self, CancelToken, WalkResult};
use crate::{BATCH_PAGES, PAGE_SIZE};

/// Result of `import_range`: UVCs issued per kind, and the failed imports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportResult {
    pub imports: u64,
    pub exports: u64,
    pub destroys: u64,
    pub failed_pages: u64,
    /// rc of the first failed import (0 if none failed).
    pub first_failure_rc: u16,
}

/// Result of `make_accessible_range`: successful pins and exports, and the pages that stay
/// secure because both failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessResult {
    pub pinned: u64,
    pub exported: u64,
    pub failed: u64,
}

/// Result of `mm_teardown`: pages made non-secure by a destroy, and successful exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeardownResult {
    pub destroyed: u64,
    pub exported: u64,
}

/// Outcome of `unpack_range` (KVM_PV_UNPACK's loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpackStatus {
    /// Every page unpacked.
    Ok,
    /// Interrupted by a fatal signal while a page had to be faulted in (-EAGAIN).
    Eagain,
    /// UV error other than 0x010a (-EINVAL).
    Einval,
    /// No translation for the address (-EFAULT).
    Efault,
}

impl UnpackStatus {
    pub const fn name(self) -> &'static str {
        match self {
            UnpackStatus::Ok => "ok",
            UnpackStatus::Eagain => "eagain",
            UnpackStatus::Einval => "einval",
            UnpackStatus::Efault => "efault",
        }
    }
}

/// Result of `unpack_range`: the outcome, rc/rrc of the last unpack UVC (0, 0 if none), and
/// the pages unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackResult {
    pub status: UnpackStatus,
    pub rc: u16,
    pub rrc: u16,
    pub pages_done: u64,
}

fn page_range(region: &Region, start: u64, npages: u64) -> Result<(u64, u64), CoreError> {
    match start.checked_add(npages) {
        Some(end) if end <= region.pages() => Ok((start, end)),
        _ => Err(invalid(
            "npages",
            format!(
                "pages {start}+{npages} outside region of {} pages",
                region.pages()
            ),
        )),
    }
}

/// A protected guest touches pages `[start, start+npages)`: fault in, then per page the
/// kernel's non-secure-access / secure-storage-violation handling (see the .pyi).
pub fn import_range(
    uv: &Ultravisor,
    handle: u64,
    region: &Region,
    start: u64,
    npages: u64,
    export_first: bool,
) -> Result<ImportResult, CoreError> {
    uv.check_region(region)?;
    let (lo, hi) = page_range(region, start, npages)?;
    // Up to 1 MiB the elapsed time is the CPU time (no pool, no sleep) and cheaper to read.
    let _timed = uv.core.timed(npages * PAGE_SIZE as u64 > crate::MIB);
    let mut r = ImportResult::default();
    let cfg = uv.core.live_config(handle);
    let owner_id = cfg.as_ref().map(|c| c.id);
    region.with_mem(|mem| {
        region.touch_pages(mem, lo, hi);
    })?;
    // Fresh pages of a live configuration whose guest storage is this region take the fast
    // path (same transitions and counts, without the per-UVC lookups) while no failure is
    // injected; anything else goes page by page through the UVC methods below.
    let fast = cfg.filter(|c| {
        !export_first && c.region_base == region.base() && hi * PAGE_SIZE as u64 <= c.guest_len
    });
    let mut idx = lo;
    while idx < hi {
        if let Some(cfg) = fast.as_deref().filter(|_| !uv.core.inject.any()) {
            let run_hi = ((idx / CHUNK_PAGES + 1) * CHUNK_PAGES).min(hi);
            let next =
                region.with_mem(|mem| import_run(uv, region, mem, cfg, idx, run_hi, &mut r))?;
            if next > idx {
                idx = next;
                continue;
            }
        }
        import_page(uv, handle, region, idx, owner_id, export_first, &mut r)?;
        idx += 1;
    }
    Ok(r)
}

/// The fast path of `import_range` over `[lo, hi)` (one chunk at most): own secure pages are
/// left alone, non-secure pages imported (counted as one batch of import UVCs). Stops at the
/// first page of another kind and returns it (`hi` when done); that page goes the slow way.
fn import_run(
    uv: &Ultravisor,
    region: &Region,
    mem: &RegionMem,
    cfg: &Config,
    lo: u64,
    hi: u64,
    r: &mut ImportResult,
) -> u64 {
    let ctx = PageCtx {
        core: &uv.core,
        region,
        mem,
    };
    let (next, imports, failed, first_rc) = ctx.import_fresh_run(lo, hi, cfg);
    uv.core.count_batch(Uvc::ConvToSecStor, imports);
    r.imports += imports;
    r.failed_pages += failed;
    if r.first_failure_rc == 0 {
        r.first_failure_rc = first_rc;
    }
    next
}

/// One page of `import_range` the way the fault handlers resolve it, UVC by UVC.
fn import_page(
    uv: &Ultravisor,
    handle: u64,
    region: &Region,
    idx: u64,
    owner_id: Option<u32>,
    export_first: bool,
    r: &mut ImportResult,
) -> Result<(), CoreError> {
    {
        let paddr = region.base() + idx * PAGE_SIZE as u64;
        let gaddr = idx * PAGE_SIZE as u64;
        let s = region.with_mem(|mem| mem.metas()[idx as usize].load(Ordering::Acquire))?;
        let kind = ps::kind(s);
        let own = owner_id.is_some_and(|id| ps::owner(s) == id);
        if ps::is_secure(s) && own {
            return Ok(());
        }
        if kind == ps::SECURE || (kind == ps::SHARED && !owner_alive(uv, s)) {
            // Secure-storage violation: destroy, fall back to export.
            r.destroys += 1;
            if !uv.destroy_page(paddr).is_ok() {
                r.exports += 1;
                let _ = uv.convert_from_secure(paddr);
            }
        }
        if export_first {
            r.exports += 1;
            let _ = uv.convert_from_secure(paddr);
        }
        r.imports += 1;
        let st = uv.convert_to_secure(handle, gaddr);
        if !st.is_ok() {
            r.failed_pages += 1;
            if r.first_failure_rc == 0 {
                r.first_failure_rc = st.rc;
            }
        }
    }
    Ok(())
}

fn owner_alive(uv: &Ultravisor, s: u32) -> bool {
    uv.core
        .config_by_id(ps::owner(s))
        .is_some_and(|c| c.is_alive())
}

/// Host (or a non-protected guest) touches pages: the secure-storage-access handler
/// (`arch_make_page_accessible`: pin shared, else export) for every page the hardware refuses,
/// i.e. secure and orphaned pages. A page its live owner has shared is host-accessible: no
/// exception, no UVC.
pub fn make_accessible_range(
    uv: &Ultravisor,
    region: &Region,
    start: u64,
    npages: u64,
) -> Result<AccessResult, CoreError> {
    uv.check_region(region)?;
    let (lo, hi) = page_range(region, start, npages)?;
    // A page neither pinned nor exported stays secure: the access cannot proceed.
    let failed = AtomicU64::new(0);
    let (pinned, exported) = walk::for_secure_pages(&uv.core, region, lo, hi, |ctx, idx| {
        let paddr = ctx.paddr(idx);
        let s = ctx.mem.metas()[idx as usize].load(Ordering::Acquire);
        if ps::kind(s) == ps::SHARED && owner_alive(uv, s) {
            return (0, 0);
        }
        if uv.pin_shared(paddr).is_ok() {
            (1, 0)
        } else if uv.convert_from_secure(paddr).is_ok() {
            (0, 1)
        } else {
            failed.fetch_add(1, Ordering::Relaxed);
            (0, 0)
        }
    })?;
    Ok(AccessResult {
        pinned,
        exported,
        failed: failed.into_inner(),
    })
}

/// exit_mmap of a protected mm: destroy every present secure page (every present page with
/// `all_present`), batched and parallel like the walk; export a page whose destroy fails.
pub fn mm_teardown(
    uv: &Ultravisor,
    region: &Region,
    all_present: bool,
) -> Result<TeardownResult, CoreError> {
    uv.check_region(region)?;
    let (destroyed, exported) = walk::mm_teardown(&uv.core, region, all_present)?;
    Ok(TeardownResult {
        destroyed,
        exported,
    })
}

/// `__s390_uv_destroy_range`: one destroy-page UVC per present page of `[start, end)` (`end`
/// clamped to the region, `None` = its end), results ignored, parallel, and with `cancel`
/// interruptible after every batch of `BATCH_PAGES` present pages.
pub fn destroy_walk(
    uv: &Ultravisor,
    region: &Region,
    start: u64,
    end: Option<u64>,
    cancel: Option<&CancelToken>,
) -> Result<WalkResult, CoreError> {
    uv.check_region(region)?;
    walk::destroy_range(&uv.core, region, start, end, cancel)
}

/// `destroy_walk` with `__kvm_s390_pv_destroy_page`'s fallback (the newest kernels): every page
/// whose destroy failed gets an export UVC. Without injected destroy failures the only failures
/// are the UV's refusals (the owner still has secure CPUs): those pages are exported after the
/// walk. With injected failures pending the walk goes page by page, each failed destroy
/// followed by its export. Returns the walk's result and how many of those exports succeeded.
pub fn destroy_walk_export(
    uv: &Ultravisor,
    region: &Region,
    start: u64,
    end: Option<u64>,
    cancel: Option<&CancelToken>,
) -> Result<(WalkResult, u64), CoreError> {
    uv.check_region(region)?;
    if uv.core.inject.pending(Uvc::DestrSecStor) {
        return destroy_walk_per_page(uv, region, start, end, cancel);
    }
    let w = destroy_walk(uv, region, start, end, cancel)?;
    // The walk visited [start, resume_page); the pages it left secure there are the refused ones.
    let hi = w.resume_page.min(region.pages());
    let lo = start.min(hi);
    let any_secure = region.with_mem(|mem| {
        let sums = &mem.summaries()[(lo / CHUNK_PAGES) as usize..hi.div_ceil(CHUNK_PAGES) as usize];
        sums.iter()
            .any(|s| summary_counts(s.load(Ordering::Relaxed)).1 != 0)
    })?;
    if !any_secure {
        return Ok((w, 0)); // the common case (nothing refused): no second pass
    }
    let (exported, _) = walk::for_secure_pages(&uv.core, region, lo, hi, |ctx, idx| {
        let s = ctx.mem.metas()[idx as usize].load(Ordering::Acquire);
        let refused = uv
            .core
            .config_by_id(ps::owner(s))
            .is_some_and(|c| c.refuses_destroy());
        if refused && uv.convert_from_secure(ctx.paddr(idx)).is_ok() {
            (1, 0)
        } else {
            (0, 0)
        }
    })?;
    Ok((w, exported))
}

/// The export-fallback walk one page at a time (injected failures pending): destroy, export if
/// that failed, the fatal-signal test after every `BATCH_PAGES` present pages and at the end.
fn destroy_walk_per_page(
    uv: &Ultravisor,
    region: &Region,
    start: u64,
    end: Option<u64>,
    cancel: Option<&CancelToken>,
) -> Result<(WalkResult, u64), CoreError> {
    let end = end.unwrap_or(region.pages()).min(region.pages());
    let start = start.min(end);
    let mut w = WalkResult {
        visited: 0,
        destroyed: 0,
        interrupted: false,
        resume_page: end,
    };
    let mut exported = 0;
    let mut in_batch = 0;
    for idx in start..end {
        let s = region.with_mem(|mem| mem.metas()[idx as usize].load(Ordering::Acquire))?;
        if s & ps::PRESENT == 0 {
            continue;
        }
        let paddr = region.base() + idx * PAGE_SIZE as u64;
        let st = uv.destroy_page(paddr);
        w.visited += 1;
        if st.is_ok() {
            w.destroyed += u64::from(ps::is_secure(s));
        } else if uv.convert_from_secure(paddr).is_ok() {
            exported += 1;
        }
        in_batch += 1;
        if in_batch == BATCH_PAGES {
            in_batch = 0;
            if cancel.is_some_and(|c| c.is_set()) {
                w.interrupted = true;
                w.resume_page = idx + 1;
                return Ok((w, exported));
            }
        }
    }
    if in_batch != 0 && cancel.is_some_and(|c| c.is_set()) {
        w.interrupted = true;
    }
    Ok((w, exported))
}

/// KVM_PV_UNPACK's loop over `[addr, addr+size)` with tweak0 = tweak, tweak1 = offset. A page
/// that is not present yet gets no UVC: it is faulted in first (one export-before-import when
/// due and one UNPACK_IMG per page).
// The arguments are KVM_PV_UNPACK's (handle, addr, size, tweak) plus the emulator's context
// (UV, region, export policy, fatal-signal flag); a struct for them would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn unpack_range(
    uv: &Ultravisor,
    handle: u64,
    region: &Region,
    addr: u64,
    size: u64,
    tweak: u64,
    export_first: bool,
    cancel: Option<&CancelToken>,
) -> Result<UnpackResult, CoreError> {
    uv.check_region(region)?;
    let _timed = uv.core.timed(size > crate::MIB);
    let mut last = UvcStatus {
        cc: 0,
        rc: 0,
        rrc: 0,
    };
    let result = |status, last: UvcStatus, done| UnpackResult {
        status,
        rc: last.rc,
        rrc: last.rrc,
        pages_done: done,
    };
    let page = PAGE_SIZE as u64;
    if !addr.is_multiple_of(page) || size == 0 || !size.is_multiple_of(page) {
        return Ok(result(UnpackStatus::Einval, last, 0));
    }
    let mut done = 0;
    let mut offset = 0;
    while offset < size {
        let gaddr = match addr.checked_add(offset) {
            Some(g) if g < region.size() => g,
            _ => return Ok(result(UnpackStatus::Efault, last, done)),
        };
        let present = region.with_mem(|mem| {
            mem.metas()[(gaddr / page) as usize].load(Ordering::Acquire) & ps::PRESENT != 0
        })?;
        if !present {
            // make_secure finds no (writable) PTE: -ENXIO without any UVC; the kernel faults
            // the page in and retries (-EAGAIN: stop on a fatal signal).
            region.touch(gaddr, page)?;
            if cancel.is_some_and(|c| c.is_set()) {
                return Ok(result(UnpackStatus::Eagain, last, done));
            }
            continue;
        }
        if export_first {
            let _ = uv.convert_from_secure(region.base() + gaddr);
        }
        last = uv.unpack(handle, gaddr, tweak, offset);
        if last.is_ok() {
            done += 1;
            offset += page;
            continue;
        }
        if last.rc != rc::PAGE_NOT_ACCESSIBLE {
            return Ok(result(UnpackStatus::Einval, last, done));
        }
        // Fault the page in, then -EAGAIN: stop on a fatal signal, else retry.
        region.touch(gaddr, page)?;
        if cancel.is_some_and(|c| c.is_set()) {
            return Ok(result(UnpackStatus::Eagain, last, done));
        }
        std::thread::yield_now();
    }
    Ok(result(UnpackStatus::Ok, last, done))
}
