//! Kernel-side range helpers: what the s390 fault handlers and exit_mmap do per page (spec §4.7
//! and §6), expressed as UVC sequences. Each UVC is counted like a single call would be. Whether
//! to export before import is the caller's (KVM layer's) decision.

use std::sync::atomic::Ordering;

use crate::error::{invalid, CoreError};
use crate::memory::ps;
use crate::region::Region;
use crate::ultravisor::Ultravisor;
use crate::uvc::{rc, UvcStatus};
use crate::walk::{for_secure_pages, CancelToken};
use crate::PAGE_SIZE;

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

/// Outcome of `unpack_range` (KVM_PV_UNPACK's loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpackStatus {
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

impl Ultravisor {
    /// A protected guest touches pages `[start, start+npages)`: fault in, then per page the
    /// kernel's non-secure-access / secure-storage-violation handling (see the .pyi).
    pub fn import_range(
        &self,
        handle: u64,
        region: &Region,
        start: u64,
        npages: u64,
        export_first: bool,
    ) -> Result<ImportResult, CoreError> {
        self.check_region(region)?;
        let (lo, hi) = page_range(region, start, npages)?;
        let mut r = ImportResult::default();
        let owner_id = self.core.live_config(handle).map(|c| c.id);
        region.with_mem(|mem| {
            region.touch_pages(mem, lo, hi);
        })?;
        for idx in lo..hi {
            let paddr = region.base() + idx * PAGE_SIZE as u64;
            let gaddr = idx * PAGE_SIZE as u64;
            let s = region.with_mem(|mem| mem.metas()[idx as usize].load(Ordering::Acquire))?;
            let kind = ps::kind(s);
            let own = owner_id.is_some_and(|id| ps::owner(s) == id);
            if ps::is_secure(s) && own {
                continue;
            }
            if kind == ps::SECURE || (kind == ps::SHARED && !self.owner_alive(s)) {
                // Secure-storage violation: destroy, fall back to export.
                r.destroys += 1;
                if !self.destroy_page(paddr).is_ok() {
                    r.exports += 1;
                    let _ = self.convert_from_secure(paddr);
                }
            }
            if export_first {
                r.exports += 1;
                let _ = self.convert_from_secure(paddr);
            }
            r.imports += 1;
            let st = self.convert_to_secure(handle, gaddr);
            if !st.is_ok() {
                r.failed_pages += 1;
                if r.first_failure_rc == 0 {
                    r.first_failure_rc = st.rc;
                }
            }
        }
        Ok(r)
    }

    fn owner_alive(&self, s: u32) -> bool {
        self.core
            .config_by_id(ps::owner(s))
            .is_some_and(|c| c.is_alive())
    }

    /// Host (or a non-protected guest) touches pages: pin shared, else export, for every
    /// secure/shared/orphaned page. Returns (pinned, exported) successes.
    pub fn make_accessible_range(
        &self,
        region: &Region,
        start: u64,
        npages: u64,
    ) -> Result<(u64, u64, u64), CoreError> {
        self.check_region(region)?;
        let (lo, hi) = page_range(region, start, npages)?;
        // A page neither pinned nor exported stays secure: the access cannot proceed.
        let failed = std::sync::atomic::AtomicU64::new(0);
        let (pinned, exported) = for_secure_pages(&self.core, region, lo, hi, |ctx, idx| {
            let paddr = ctx.paddr(idx);
            if self.pin_shared(paddr).is_ok() {
                (1, 0)
            } else if self.convert_from_secure(paddr).is_ok() {
                (0, 1)
            } else {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (0, 0)
            }
        })?;
        Ok((pinned, exported, failed.into_inner()))
    }

    /// exit_mmap of a protected mm: destroy every present secure page (every present page with
    /// `all_present`), batched and parallel like the walk; export a page whose destroy fails.
    /// Returns (pages destroyed, successful exports).
    pub fn mm_teardown(&self, region: &Region, all_present: bool) -> Result<(u64, u64), CoreError> {
        self.check_region(region)?;
        crate::walk::mm_teardown(&self.core, region, all_present)
    }

    /// KVM_PV_UNPACK's loop over `[addr, addr+size)` with tweak0 = tweak, tweak1 = offset.
    #[allow(clippy::too_many_arguments)]
    pub fn unpack_range(
        &self,
        handle: u64,
        region: &Region,
        addr: u64,
        size: u64,
        tweak: u64,
        export_first: bool,
        cancel: Option<&CancelToken>,
    ) -> Result<UnpackResult, CoreError> {
        self.check_region(region)?;
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
            if export_first {
                let _ = self.convert_from_secure(region.base() + gaddr);
            }
            last = self.unpack(handle, gaddr, tweak, offset);
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
}
