//! What the UV does to one page for each page UVC. Every transition happens with the page's
//! lock bit held, so concurrent UVCs on one page are linearizable; the caller has already
//! counted the UVC and consumed injected failures.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::config::{Config, Tables};
use crate::memory::{mlock, ps, rlock, RegionMem};
use crate::region::Region;
use crate::state::Core;
use crate::uvc::{rc, UvcStatus};
use crate::zero::{store_fence, zero_page_nt};
use crate::PAGE_SIZE;

pub(crate) struct PageCtx<'a> {
    pub(crate) core: &'a Core,
    pub(crate) region: &'a Region,
    pub(crate) mem: &'a RegionMem,
}

impl<'a> PageCtx<'a> {
    #[inline]
    fn meta(&self, idx: u64) -> &'a AtomicU32 {
        &self.mem.metas()[idx as usize]
    }

    #[inline]
    pub(crate) fn paddr(&self, idx: u64) -> u64 {
        self.region.base + idx * PAGE_SIZE as u64
    }

    /// The page's bytes, to change in place (a state-only region records that the page now
    /// holds data). Only call with the page lock held.
    #[allow(clippy::mut_from_ref)]
    fn page_mut(&self, idx: u64) -> &mut [u8] {
        self.mem.mark_data(idx);
        // SAFETY: idx is a valid page index of this mapping (callers validated it) and the caller
        // holds the page's lock bit, which is the exclusive right to its bytes.
        unsafe { std::slice::from_raw_parts_mut(self.mem.page_ptr(idx), PAGE_SIZE) }
    }

    /// Zero a locked page (streaming stores + fence; in a state-only region only a page that
    /// holds data is written). Counted as one page cleared by the UV either way.
    fn zero(&self, idx: u64) {
        if self.mem.state_only() {
            self.mem.clear_data_page(idx);
        } else {
            // SAFETY: page lock held; the page is inside the mapping and 4 KiB aligned.
            unsafe { zero_page_nt(self.mem.page_ptr(idx)) };
            store_fence();
        }
        self.core.charge(|a| a.charge_zeroed(1));
    }

    /// Zero a locked page that is about to be used (import): plain stores, so the page stays
    /// in cache for the guest and no fence (write-combining drain) is needed.
    fn zero_for_use(&self, idx: u64) {
        if self.mem.state_only() {
            self.mem.clear_data_page(idx);
        } else {
            // SAFETY: page lock held; the page is inside the mapping.
            unsafe { std::ptr::write_bytes(self.mem.page_ptr(idx), 0, PAGE_SIZE) };
        }
        self.core.charge(|a| a.charge_zeroed(1));
    }

    /// Summary + owner counters for a transition (page lock held). The new reference is
    /// counted before the old one is dropped, so a dead owner's references never read 0 while
    /// a word names it (which would let its id be reused).
    pub(crate) fn account(&self, idx: u64, old: u32, new: u32) {
        self.mem.account_summary(idx, old, new);
        let (was, is) = (PageRef::of(old), PageRef::of(new));
        if was == is {
            return;
        }
        let tables = rlock(&self.core.tables);
        self.count(&tables, is, 1);
        self.count(&tables, was, -1);
    }

    fn count(&self, tables: &Tables, r: PageRef, d: i64) {
        match r {
            PageRef::None => {}
            PageRef::Secure(owner) => {
                if let Some(c) = tables.by_id(owner) {
                    c.secure_pages.fetch_add(d, Ordering::Relaxed);
                }
                self.core.secure_total.fetch_add(d, Ordering::Relaxed);
            }
            PageRef::Exported(owner, orphan) => {
                if let Some(c) = tables.by_id(owner) {
                    c.exported_pages.fetch_add(d, Ordering::Relaxed);
                    if orphan {
                        c.orphan_exports.fetch_add(d, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// A page configuration `id` exported while it lived, now that `id` is dead: it reads as
    /// NONSECURE already (nobody can import it back); make the word say so and drop its tag,
    /// so that no page refers to `id` any more. Other pages are left alone.
    pub(crate) fn forget_export(&self, idx: u64, id: u32) {
        let m = self.meta(idx);
        let old = self.mem.lock(m);
        if ps::kind(old) == ps::EXPORTED && ps::owner(old) == id && old & ps::ORPHAN_EXPORT == 0 {
            mlock(&self.region.exported).remove(&idx);
            self.set(idx, m, old, ps::make(ps::NONSECURE, 0));
        } else {
            self.mem.unlock(m, old);
        }
    }

    fn set(&self, idx: u64, m: &AtomicU32, old: u32, new: u32) {
        self.account(idx, old, new);
        self.mem.unlock(m, new);
    }

    fn owner_config(&self, s: u32) -> Option<Arc<Config>> {
        self.core.config_by_id(ps::owner(s))
    }

    /// DESTR_SEC_STOR 0x0202.
    pub(crate) fn destroy(&self, idx: u64) -> UvcStatus {
        let m = self.meta(idx);
        let old = self.mem.lock(m);
        if !ps::is_secure(old) {
            self.mem.unlock(m, old);
            return if self.core.opts.legacy_destroy_rc {
                UvcStatus::err_rrc(rc::LEGACY_NOT_SECURE, rc::LEGACY_NOT_SECURE_RRC)
            } else {
                UvcStatus::OK
            };
        }
        if self.owner_config(old).is_some_and(|c| c.refuses_destroy()) {
            self.mem.unlock(m, old);
            return UvcStatus::err(rc::OWNER_HAS_CPUS);
        }
        self.zero(idx);
        self.set(idx, m, old, ps::make(ps::NONSECURE, 0));
        UvcStatus::OK
    }

    /// CONV_FROM_SEC_STOR 0x0201: encrypt in place, keep nonce and tag aside.
    pub(crate) fn export(&self, idx: u64) -> UvcStatus {
        let m = self.meta(idx);
        let old = self.mem.lock(m);
        if !ps::is_secure(old) {
            // Non-secure (or already exported): nothing to do.
            self.mem.unlock(m, old);
            return UvcStatus::OK;
        }
        let Some(cfg) = self.owner_config(old) else {
            self.mem.unlock(m, old);
            return UvcStatus::err(rc::INV_STATE);
        };
        let paddr = self.paddr(idx);
        let Some(tag) = cfg.encrypt_page(paddr, self.page_mut(idx)) else {
            self.mem.unlock(m, old);
            return UvcStatus::err(rc::INV_STATE);
        };
        mlock(&self.region.exported).insert(idx, tag);
        let orphan = if cfg.is_alive() { 0 } else { ps::ORPHAN_EXPORT };
        self.set(idx, m, old, ps::make(ps::EXPORTED, ps::owner(old)) | orphan);
        UvcStatus::OK
    }

    /// CONV_TO_SEC_STOR 0x0200: NONSECURE/EXPORTED -> SECURE(cfg).
    pub(crate) fn import(&self, idx: u64, cfg: &Config) -> UvcStatus {
        let m = self.meta(idx);
        let old = self.mem.lock(m);
        let fail = |code| {
            self.mem.unlock(m, old);
            UvcStatus::err(code)
        };
        if old & ps::PRESENT == 0 {
            return fail(rc::PAGE_NOT_ACCESSIBLE);
        }
        // Checked under the page lock: a concurrent Destroy Config either sees this page
        // SECURE afterwards or we see the configuration dead.
        if !cfg.is_alive() {
            return fail(rc::INV_GUEST_HANDLE);
        }
        let owner = ps::owner(old);
        match ps::kind(old) {
            ps::NONSECURE => self.zero_for_use(idx),
            ps::EXPORTED => {
                let tag = mlock(&self.region.exported).get(&idx).copied();
                match tag {
                    Some(t) if t.owner == cfg.id => {
                        if !cfg.decrypt_page(self.paddr(idx), self.page_mut(idx), &t) {
                            return fail(rc::INTEGRITY);
                        }
                    }
                    None if owner == cfg.id => return fail(rc::INTEGRITY),
                    _ => self.zero_for_use(idx),
                }
                mlock(&self.region.exported).remove(&idx);
            }
            _ if owner == cfg.id => {
                self.mem.unlock(m, old);
                return UvcStatus::OK;
            }
            ps::SHARED
                if self.core.opts.feature_misc
                    && self.owner_config(old).is_some_and(|c| c.is_alive()) =>
            {
                // MISC: the UV moves a shared page of another configuration on import.
                self.zero_for_use(idx);
            }
            _ => return fail(rc::OTHER_OWNER),
        }
        self.set(idx, m, old, ps::make(ps::SECURE, cfg.id));
        UvcStatus::OK
    }

    /// CONV_TO_SEC_STOR 0x0200 on the run of pages `[lo, hi)` (one chunk at most) as `import`
    /// does it, page by page under each page's lock, for the pages that are NONSECURE or already
    /// the configuration's own; stops at the first page of another kind and returns it (`hi` when
    /// done). The owner counters are added once for the run. Returns (where it stopped, import
    /// UVCs issued, failed imports, rc of the first failure or 0). The caller counts the UVCs.
    pub(crate) fn import_fresh_run(&self, lo: u64, hi: u64, cfg: &Config) -> (u64, u64, u64, u16) {
        let (mut imports, mut failed, mut first_rc, mut made) = (0u64, 0u64, 0u16, 0u64);
        let mut idx = lo;
        while idx < hi {
            let m = self.meta(idx);
            let seen = m.load(Ordering::Acquire);
            if ps::is_secure(seen) && ps::owner(seen) == cfg.id {
                idx += 1;
                continue;
            }
            if ps::kind(seen) != ps::NONSECURE {
                break;
            }
            let old = self.mem.lock(m);
            if ps::is_secure(old) && ps::owner(old) == cfg.id {
                self.mem.unlock(m, old);
                idx += 1;
                continue;
            }
            if ps::kind(old) != ps::NONSECURE {
                self.mem.unlock(m, old);
                break;
            }
            imports += 1;
            let code = if old & ps::PRESENT == 0 {
                Some(rc::PAGE_NOT_ACCESSIBLE)
            } else if !cfg.is_alive() {
                Some(rc::INV_GUEST_HANDLE)
            } else {
                None
            };
            if let Some(code) = code {
                self.mem.unlock(m, old);
                failed += 1;
                if first_rc == 0 {
                    first_rc = code;
                }
                idx += 1;
                continue;
            }
            if self.mem.state_only() {
                self.mem.clear_data_page(idx);
            } else {
                // SAFETY: page lock held; the page is inside the mapping.
                unsafe { std::ptr::write_bytes(self.mem.page_ptr(idx), 0, PAGE_SIZE) };
            }
            let new = ps::make(ps::SECURE, cfg.id);
            self.mem.account_summary(idx, old, new);
            self.mem.unlock(m, new);
            made += 1;
            idx += 1;
        }
        if made != 0 {
            cfg.secure_pages.fetch_add(made as i64, Ordering::Relaxed);
            self.core
                .secure_total
                .fetch_add(made as i64, Ordering::Relaxed);
            self.core.charge(|a| a.charge_zeroed(made));
        }
        (idx, imports, failed, first_rc)
    }

    /// UNPACK_IMG 0x0301: decrypt an image page in place, feed the verifier.
    pub(crate) fn unpack(
        &self,
        idx: u64,
        cfg: &Config,
        gaddr: u64,
        tweak0: u64,
        tweak1: u64,
    ) -> UvcStatus {
        let m = self.meta(idx);
        let old = self.mem.lock(m);
        let fail = |code| {
            self.mem.unlock(m, old);
            UvcStatus::err(code)
        };
        if !cfg.is_alive() {
            return fail(rc::INV_GUEST_HANDLE);
        }
        let kind = ps::kind(old);
        if ps::is_secure(old) {
            return fail(if ps::owner(old) == cfg.id {
                rc::INV_STATE
            } else {
                rc::OTHER_OWNER
            });
        }
        let mut image = mlock(&cfg.image);
        if image.verified {
            drop(image);
            return fail(rc::CONFIG_STATE);
        }
        let image = &mut *image;
        let (Some(hdr), Some(ver)) = (image.header.as_deref(), image.verifier.as_mut()) else {
            return fail(rc::CONFIG_STATE);
        };
        if old & ps::PRESENT == 0 {
            return fail(rc::PAGE_NOT_ACCESSIBLE);
        }
        let page = self.page_mut(idx);
        hdr.decrypt_page(tweak0, tweak1, page);
        ver.add_page(gaddr, tweak0, tweak1, page);
        if kind == ps::EXPORTED {
            mlock(&self.region.exported).remove(&idx);
        }
        self.set(idx, m, old, ps::make(ps::SECURE, cfg.id));
        UvcStatus::OK
    }

    /// PIN_PAGE_SHARED 0x0341: only shared pages of a live configuration.
    pub(crate) fn pin(&self, idx: u64) -> UvcStatus {
        let m = self.meta(idx);
        let old = self.mem.lock(m);
        if ps::kind(old) == ps::SHARED && self.owner_config(old).is_some_and(|c| c.is_alive()) {
            self.mem.unlock(m, old | ps::PINNED);
            return UvcStatus::OK;
        }
        self.mem.unlock(m, old);
        UvcStatus::err(rc::INV_STATE)
    }

    /// Guest-side share/unshare and UNPIN: transitions among the owner's own states.
    pub(crate) fn owner_op(&self, idx: u64, cfg: &Config, op: OwnerOp) -> UvcStatus {
        let m = self.meta(idx);
        let old = self.mem.lock(m);
        let fail = |code| {
            self.mem.unlock(m, old);
            UvcStatus::err(code)
        };
        if ps::is_secure(old) && ps::owner(old) != cfg.id {
            return fail(rc::OTHER_OWNER);
        }
        let kind = ps::kind(old);
        let pinned = old & ps::PINNED != 0;
        let new = match (op, kind) {
            (OwnerOp::Share, ps::SECURE) => ps::make(ps::SHARED, cfg.id),
            (OwnerOp::Share, ps::SHARED) => old,
            (OwnerOp::Unshare, ps::SHARED) if !pinned => ps::make(ps::SECURE, cfg.id),
            (OwnerOp::Unshare, ps::SECURE) => old,
            (OwnerOp::Unpin, ps::SHARED) if pinned => old & !ps::PINNED,
            _ => return fail(rc::INV_STATE),
        };
        self.set(idx, m, old, new);
        UvcStatus::OK
    }
}

/// What a page state word refers to, for the owners' counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageRef {
    None,
    /// SECURE or SHARED (orphaned when the owner is dead).
    Secure(u32),
    /// EXPORTED, and whether it is an orphan export.
    Exported(u32, bool),
}

impl PageRef {
    fn of(s: u32) -> PageRef {
        match ps::kind(s) {
            ps::SECURE | ps::SHARED => PageRef::Secure(ps::owner(s)),
            ps::EXPORTED => PageRef::Exported(ps::owner(s), s & ps::ORPHAN_EXPORT != 0),
            _ => PageRef::None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnerOp {
    Share,
    Unshare,
    Unpin,
}
