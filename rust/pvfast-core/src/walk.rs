//! Parallel page walks, as free functions over the shared `Core`: the kernel's
//! `__s390_uv_destroy_range` (the hot loop), exit_mmap's teardown, and the UV's own cleaning
//! passes (Destroy Config, Set Unshare All). Work is split into tasks of whole summary chunks; a
//! chunk without secure pages is skipped in O(1).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::account;
use crate::config::Config;
use crate::error::CoreError;
use crate::memory::{ps, summary_counts, RegionMem, CHUNK_PAGES, SUM_SECURE_ONE};
use crate::pages::PageCtx;
use crate::region::Region;
use crate::state::Core;
use crate::uvc::{rc, Uvc};
use crate::zero::{store_fence, zero_page_nt};
use crate::BATCH_PAGES;

/// Chunks per parallel task (32 × 2 MiB = 64 MiB of guest storage).
const TASK_CHUNKS: u64 = 32;

/// A fatal-signal flag shared between threads; walks check it once per batch.
#[derive(Clone, Default, Debug)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn clear(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    #[inline]
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Result of a destroy walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkResult {
    /// Present pages visited (= DESTR_SEC_STOR UVCs issued).
    pub visited: u64,
    /// Pages that went from secure/shared/orphaned to non-secure.
    pub destroyed: u64,
    pub interrupted: bool,
    /// First page not known to be done (= end when not interrupted).
    pub resume_page: u64,
}

/// Per-owner secure-page deltas of one batch, flushed to the configs at the end of the batch.
/// The cached id -> config lookup is redone when a configuration was retired meanwhile (its id
/// may now name another one).
struct OwnerTally {
    cache: Option<(u32, u64, Option<Arc<Config>>)>,
    counts: Vec<(u32, i64)>,
}

impl OwnerTally {
    fn new() -> Self {
        OwnerTally {
            cache: None,
            counts: Vec::new(),
        }
    }

    #[inline]
    fn config(&mut self, core: &Core, owner: u32) -> Option<&Arc<Config>> {
        let epoch = core.retire_epoch.load(Ordering::Acquire);
        if self
            .cache
            .as_ref()
            .is_none_or(|(id, e, _)| *id != owner || *e != epoch)
        {
            self.cache = Some((owner, epoch, core.config_by_id(owner)));
        }
        self.cache.as_ref().and_then(|(_, _, c)| c.as_ref())
    }

    #[inline]
    fn dec(&mut self, owner: u32) {
        match self.counts.iter_mut().find(|(o, _)| *o == owner) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((owner, 1)),
        }
    }

    fn flush(&mut self, core: &Core, mem: &RegionMem, chunk: u64) {
        let total: i64 = self.counts.iter().map(|(_, n)| n).sum();
        if total == 0 {
            return;
        }
        mem.summaries()[chunk as usize].fetch_sub(total as u32 * SUM_SECURE_ONE, Ordering::Relaxed);
        core.secure_total.fetch_sub(total, Ordering::Relaxed);
        let counts = std::mem::take(&mut self.counts);
        for &(owner, n) in &counts {
            if let Some(c) = self.config(core, owner) {
                c.secure_pages.fetch_sub(n, Ordering::Relaxed);
            }
        }
        self.counts = counts;
        self.counts.clear();
    }
}

/// Which pages a batch destroys.
#[derive(Clone, Copy)]
enum Mode {
    /// Destroy-page UVC semantics: any secure page whose owner has no CPUs.
    DestroyUvc,
    /// Destroy Config cleaning: the secure pages of one (dead) configuration.
    CleanOwner(u32),
}

/// Destroy the pages `batch` (all in chunk `chunk`, at most CHUNK_PAGES) in three phases: take every page lock,
/// zero the locked pages with streaming stores, then one fence and publish. Keeping the locked
/// RMWs out of the zeroing phase matters: a locked instruction waits for earlier streaming
/// stores to drain, which would serialize page after page. Returns how many were destroyed.
fn destroy_batch(
    core: &Core,
    mem: &RegionMem,
    chunk: u64,
    batch: &[u64],
    mode: Mode,
    tally: &mut OwnerTally,
    mut refused: Option<&mut Vec<u64>>,
) -> u64 {
    let metas = mem.metas();
    let mut locked = [(0u64, 0u32); CHUNK_PAGES as usize];
    let mut n = 0usize;
    for &idx in batch.iter().take(CHUNK_PAGES as usize) {
        let m = &metas[idx as usize];
        let mut s = m.load(Ordering::Acquire);
        if !ps::is_secure(s) && s & ps::BUSY == 0 {
            continue; // non-secure: the UVC is a no-op
        }
        if !(ps::is_secure(s) && mem.try_lock_from(m, s)) {
            s = mem.lock(m);
            if !ps::is_secure(s) {
                mem.unlock(m, s);
                continue;
            }
        }
        let owner = ps::owner(s);
        let allowed = match mode {
            Mode::DestroyUvc => !tally
                .config(core, owner)
                .is_some_and(|c| c.refuses_destroy()),
            Mode::CleanOwner(id) => owner == id,
        };
        if !allowed {
            mem.unlock(m, s);
            if let Some(r) = refused.as_deref_mut() {
                r.push(idx);
            }
            continue;
        }
        locked[n] = (idx, s);
        n += 1;
    }
    // We hold every page lock; each idx is a page of this mapping (batch built from its
    // range). A state-only region writes only the pages that hold data.
    for &(idx, _) in &locked[..n] {
        mem.clear_page_nt(idx);
    }
    store_fence();
    for &(idx, s) in &locked[..n] {
        tally.dec(ps::owner(s));
        mem.unlock(&metas[idx as usize], ps::make(ps::NONSECURE, 0));
    }
    tally.flush(core, mem, chunk);
    core.charge(|a| a.charge_zeroed(n as u64));
    n as u64
}

struct WalkShared<'a> {
    core: &'a Core,
    region: &'a Region,
    mem: &'a RegionMem,
    cancel: Option<&'a CancelToken>,
    visited: AtomicU64,
    destroyed: AtomicU64,
    interrupted: AtomicBool,
    resume: AtomicU64,
    /// Taken by the first worker that sees the fatal signal: the kernel's walk is one thread
    /// and finishes at most the one batch it is in, so only that worker's batch counts.
    last_batch: AtomicBool,
}

impl WalkShared<'_> {
    #[inline]
    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.is_set())
    }

    /// A worker that found the signal set after a batch: true if that batch may stand (it is
    /// the one batch the kernel would finish), false if another worker's already did.
    fn claim_last_batch(&self) -> bool {
        !self.last_batch.swap(true, Ordering::AcqRel)
    }

    /// Stop: everything below `page` that this task owns is done.
    fn stop_at(&self, page: u64) {
        self.interrupted.store(true, Ordering::Relaxed);
        self.resume.fetch_min(page, Ordering::Relaxed);
    }

    /// Count present pages of `[lo, hi)` without touching them.
    fn count_present(&self, lo: u64, hi: u64, full_chunk_word: u32) -> u64 {
        if hi - lo == CHUNK_PAGES {
            return u64::from(summary_counts(full_chunk_word).0);
        }
        self.mem.metas()[lo as usize..hi as usize]
            .iter()
            .filter(|m| m.load(Ordering::Relaxed) & ps::PRESENT != 0)
            .count() as u64
    }

    /// Destroy-walk `[lo, hi)` inside one chunk that holds secure pages. Phase 1 takes the lock
    /// of every destroyable page; phase 2 zeroes them with streaming stores in batches of
    /// BATCH_PAGES present pages, reading the cancel flag after each batch; phase 3 fences once
    /// and publishes. Phase 2 does no locked RMW (no atomics at all): on x86 a locked
    /// instruction, like the fence, waits for all earlier streaming stores to drain, so there
    /// is one drain per chunk instead of one per batch. Pages of a cancelled walk's unstarted
    /// batches are unlocked unchanged, and so are those of the batch in progress unless it is
    /// the walk's one batch after the signal (`claim_last_batch`): those pages were zeroed but
    /// stay secure, owned by a configuration being destroyed, whose contents nobody reads
    /// again. Returns (present pages visited, destroyed, resume page if cancelled).
    fn walk_secure_chunk(
        &self,
        chunk: u64,
        lo: u64,
        hi: u64,
        tally: &mut OwnerTally,
    ) -> (u64, u64, Option<u64>) {
        const N: usize = CHUNK_PAGES as usize;
        let metas = self.mem.metas();
        let mut present = [0u64; N];
        let mut np = 0usize;
        for idx in lo..hi {
            if np < N && metas[idx as usize].load(Ordering::Relaxed) & ps::PRESENT != 0 {
                present[np] = idx;
                np += 1;
            }
        }
        // Phase 1: lock. `held[i]` = state word of present[i] if we hold its lock.
        let mut held = [None::<u32>; N];
        for (slot, &idx) in held.iter_mut().zip(&present[..np]) {
            let m = &metas[idx as usize];
            let mut s = m.load(Ordering::Acquire);
            if !ps::is_secure(s) && s & ps::BUSY == 0 {
                continue; // non-secure: the UVC is a no-op
            }
            if !(ps::is_secure(s) && self.mem.try_lock_from(m, s)) {
                s = self.mem.lock(m);
                if !ps::is_secure(s) {
                    self.mem.unlock(m, s);
                    continue;
                }
            }
            if tally
                .config(self.core, ps::owner(s))
                .is_some_and(|c| c.refuses_destroy())
            {
                self.mem.unlock(m, s);
                continue;
            }
            *slot = Some(s);
        }
        // Phase 2: zero, batch by batch.
        let mut done = np;
        let mut cancelled = false;
        let mut pos = 0;
        while pos < np {
            let end = (pos + BATCH_PAGES).min(np);
            for i in pos..end {
                if held[i].is_some() {
                    // SAFETY: we hold this page's lock; present[i] is a page of this mapping.
                    unsafe { zero_page_nt(self.mem.page_ptr(present[i])) };
                }
            }
            let before = pos;
            pos = end;
            if self.cancelled() {
                done = if self.claim_last_batch() { pos } else { before };
                cancelled = true;
                break;
            }
        }
        // Phase 3: fence, publish.
        store_fence();
        let mut destroyed = 0;
        for (i, (&idx, h)) in present[..np].iter().zip(&held[..np]).enumerate() {
            let Some(s) = *h else { continue };
            let m = &metas[idx as usize];
            if i < done {
                tally.dec(ps::owner(s));
                self.mem.unlock(m, ps::make(ps::NONSECURE, 0));
                destroyed += 1;
            } else {
                self.mem.unlock(m, s);
            }
        }
        tally.flush(self.core, self.mem, chunk);
        let resume = cancelled.then(|| if done < np { present[done] } else { hi });
        (done as u64, destroyed, resume)
    }

    /// `walk_secure_chunk` of a state-only region: one pass, one page at a time (lock with a
    /// CAS, clear the data of a page that holds some with plain stores, publish), since there
    /// are no streaming stores to keep apart from the locked RMWs. The cancel flag is read
    /// after every BATCH_PAGES present pages, as in the real walk.
    fn walk_secure_chunk_state(
        &self,
        chunk: u64,
        lo: u64,
        hi: u64,
        tally: &mut OwnerTally,
    ) -> (u64, u64, Option<u64>) {
        let metas = self.mem.metas();
        let any_data = self.mem.chunk_has_data(chunk);
        let check_cancel = self.cancel.is_some();
        let (mut visited, mut destroyed, mut in_batch) = (0u64, 0u64, 0usize);
        let mut stop = None;
        for idx in lo..hi {
            let m = &metas[idx as usize];
            let mut s = m.load(Ordering::Relaxed);
            if s & ps::PRESENT == 0 {
                continue;
            }
            if check_cancel && in_batch == BATCH_PAGES {
                in_batch = 0;
                if self.cancelled() {
                    stop = Some(idx);
                    break;
                }
            }
            in_batch += 1;
            visited += 1;
            if !ps::is_secure(s) && s & ps::BUSY == 0 {
                continue; // non-secure: the UVC is a no-op
            }
            if !(ps::is_secure(s) && self.mem.try_lock_from(m, s)) {
                s = self.mem.lock(m);
                if !ps::is_secure(s) {
                    self.mem.unlock(m, s);
                    continue;
                }
            }
            if tally
                .config(self.core, ps::owner(s))
                .is_some_and(|c| c.refuses_destroy())
            {
                self.mem.unlock(m, s);
                continue;
            }
            if any_data {
                self.mem.clear_data_page(idx);
            }
            tally.dec(ps::owner(s));
            self.mem.unlock(m, ps::make(ps::NONSECURE, 0));
            destroyed += 1;
        }
        if stop.is_none() && check_cancel && in_batch != 0 && self.cancelled() {
            stop = Some(hi);
        }
        tally.flush(self.core, self.mem, chunk);
        (visited, destroyed, stop)
    }

    /// The first `max` present pages of `[lo, hi)`: how many, and the page after the last one.
    fn first_present(&self, lo: u64, hi: u64, max: u64) -> (u64, u64) {
        let metas = self.mem.metas();
        let mut n = 0;
        for idx in lo..hi {
            if metas[idx as usize].load(Ordering::Relaxed) & ps::PRESENT != 0 {
                n += 1;
                if n == max {
                    return (n, idx + 1);
                }
            }
        }
        (n, hi)
    }

    /// One DESTR_SEC_STOR per page while injections are pending (each counts and may consume
    /// one). Returns the pages destroyed.
    fn slow_batch(&self, batch: &[u64]) -> u64 {
        let ctx = PageCtx {
            core: self.core,
            region: self.region,
            mem: self.mem,
        };
        let mut n = 0;
        for &idx in batch {
            let before = self.mem.metas()[idx as usize].load(Ordering::Acquire);
            // An injected failure is an error status: the page is not counted as destroyed.
            let st = self.core.execute(Uvc::DestrSecStor, || ctx.destroy(idx));
            if st.is_ok() && ps::is_secure(before) {
                n += 1;
            }
        }
        n
    }

    /// Walk `[lo, hi)` (inside one task). Returns false when cancelled.
    fn walk_range(&self, lo: u64, hi: u64) -> bool {
        let metas = self.mem.metas();
        let sums = self.mem.summaries();
        let mut tally = OwnerTally::new();
        let mut chunk_lo = lo;
        while chunk_lo < hi {
            let chunk = chunk_lo / CHUNK_PAGES;
            let chunk_hi = ((chunk + 1) * CHUNK_PAGES).min(hi);
            let word = sums[chunk as usize].load(Ordering::Acquire);
            let (present, secure) = summary_counts(word);
            let injecting = self.core.inject.pending(Uvc::DestrSecStor);
            if present != 0 && secure == 0 && !injecting {
                // Nothing to destroy: the UVCs are no-ops; count them and move on.
                if self.cancelled() {
                    // Keep the batch granularity: one more batch of no-ops (if no other
                    // worker did it), then stop.
                    if !self.claim_last_batch() {
                        self.stop_at(chunk_lo);
                        return false;
                    }
                    let (n, next) = self.first_present(chunk_lo, chunk_hi, BATCH_PAGES as u64);
                    self.visited.fetch_add(n, Ordering::Relaxed);
                    self.core.count_batch(Uvc::DestrSecStor, n);
                    self.core.charge(|a| a.charge_ptes(n));
                    if n != 0 {
                        self.stop_at(next);
                        return false;
                    }
                } else {
                    let n = self.count_present(chunk_lo, chunk_hi, word);
                    self.visited.fetch_add(n, Ordering::Relaxed);
                    self.core.count_batch(Uvc::DestrSecStor, n);
                    self.core.charge(|a| a.charge_ptes(n));
                    if n != 0 && self.cancelled() {
                        self.stop_at(chunk_hi);
                        return false;
                    }
                }
            } else if present != 0 && !injecting {
                let (n, d, stop) = if self.mem.state_only() {
                    self.walk_secure_chunk_state(chunk, chunk_lo, chunk_hi, &mut tally)
                } else {
                    self.walk_secure_chunk(chunk, chunk_lo, chunk_hi, &mut tally)
                };
                self.core.count_batch(Uvc::DestrSecStor, n);
                self.core.charge(|a| {
                    a.charge_ptes(n);
                    a.charge_zeroed(d);
                });
                self.visited.fetch_add(n, Ordering::Relaxed);
                self.destroyed.fetch_add(d, Ordering::Relaxed);
                if let Some(resume) = stop {
                    self.stop_at(resume);
                    return false;
                }
            } else if present != 0 {
                // Injected DESTR_SEC_STOR failures pending: per-page slow path, one batch at a time.
                let mut batch = [0u64; BATCH_PAGES];
                let mut len = 0usize;
                let mut idx = chunk_lo;
                while idx < chunk_hi {
                    if metas[idx as usize].load(Ordering::Relaxed) & ps::PRESENT != 0 {
                        batch[len] = idx;
                        len += 1;
                    }
                    idx += 1;
                    if len == BATCH_PAGES || (idx == chunk_hi && len != 0) {
                        let b = &batch[..len];
                        let d = self.slow_batch(b);
                        self.core.charge(|a| a.charge_ptes(len as u64));
                        self.visited.fetch_add(len as u64, Ordering::Relaxed);
                        self.destroyed.fetch_add(d, Ordering::Relaxed);
                        len = 0;
                        if self.cancelled() {
                            self.stop_at(idx);
                            return false;
                        }
                    }
                }
            }
            chunk_lo = chunk_hi;
        }
        true
    }
}

/// Split `[start, end)` into chunk-aligned task ranges.
fn task_ranges(start: u64, end: u64) -> impl IndexedParallelIterator<Item = (u64, u64)> {
    let span = TASK_CHUNKS * CHUNK_PAGES;
    let first = start / span;
    let last = if end <= start {
        first
    } else {
        (end - 1) / span + 1
    };
    // Task counts fit usize: at most 2^46 bytes / 64 MiB tasks.
    ((first as usize)..(last as usize))
        .into_par_iter()
        .map(move |t| {
            (
                (t as u64 * span).max(start),
                ((t as u64 + 1) * span).min(end),
            )
        })
}

/// `__s390_uv_destroy_range`: one destroy-page UVC per present page of `[start, end)`
/// (`end` clamped to the region), results ignored, parallel, cancellable per batch. The caller
/// has checked that `region` belongs to `core`.
pub(crate) fn destroy_range(
    core: &Core,
    region: &Region,
    start: u64,
    end: Option<u64>,
    cancel: Option<&CancelToken>,
) -> Result<WalkResult, CoreError> {
    let end = end.unwrap_or(region.pages).min(region.pages);
    let start = start.min(end);
    let _timed = core.timed(true);
    core.charge(|a| a.charge_walk());
    let binding = account::current();
    // Interruptible (PERFORM) walks get their own workers, so foreground UV work of other
    // threads never queues behind them; a walk of one task's size runs on the caller.
    // With injected DESTR_SEC_STOR failures pending (per-page UVCs that cannot be undone) the
    // walk is sequential, so a signal stops it after at most one batch, as in the kernel.
    let inline = end - start <= TASK_CHUNKS * CHUNK_PAGES || core.inject.pending(Uvc::DestrSecStor);
    let pool = if inline {
        None
    } else if cancel.is_some() {
        Some(core.bg_pool()?)
    } else {
        Some(&core.pool)
    };
    region.with_mem(|mem| {
        let w = WalkShared {
            core,
            region,
            mem,
            cancel,
            visited: AtomicU64::new(0),
            destroyed: AtomicU64::new(0),
            interrupted: AtomicBool::new(false),
            resume: AtomicU64::new(end),
            last_batch: AtomicBool::new(false),
        };
        let body = || {
            task_ranges(start, end).for_each_init(
                || core.tasks(&binding),
                |_, (lo, hi)| {
                    if w.cancelled() && w.interrupted.load(Ordering::Relaxed) {
                        // Another worker already stopped; do not start new work.
                        w.stop_at(lo);
                        return;
                    }
                    w.walk_range(lo, hi);
                },
            );
        };
        match pool {
            Some(pool) => pool.install(body),
            None => body(),
        }
        WalkResult {
            visited: w.visited.load(Ordering::Relaxed),
            destroyed: w.destroyed.load(Ordering::Relaxed),
            interrupted: w.interrupted.load(Ordering::Relaxed),
            resume_page: w.resume.load(Ordering::Relaxed),
        }
    })
}

/// Run `f(chunk, lo, hi)` in parallel over the chunks of `mem` that hold a secure page.
fn for_secure_chunks(core: &Core, mem: &RegionMem, f: impl Fn(u64, u64, u64) + Sync) {
    for_chunks(core, mem, |word| summary_counts(word).1 != 0, f)
}

/// Run `f(chunk, lo, hi)` in parallel over the chunks whose summary word passes `want`.
fn for_chunks(
    core: &Core,
    mem: &RegionMem,
    want: impl Fn(u32) -> bool + Sync,
    f: impl Fn(u64, u64, u64) + Sync,
) {
    let pages = mem.pages();
    let sums = mem.summaries();
    let binding = account::current();
    core.pool.install(|| {
        task_ranges(0, pages).for_each_init(
            || core.tasks(&binding),
            |_, (lo, hi)| {
                let mut c = lo / CHUNK_PAGES;
                while c * CHUNK_PAGES < hi {
                    if want(sums[c as usize].load(Ordering::Acquire)) {
                        f(c, c * CHUNK_PAGES, ((c + 1) * CHUNK_PAGES).min(pages));
                    }
                    c += 1;
                }
            },
        )
    });
}

/// Destroy Config: zero and make non-secure every remaining page of config `id`.
pub(crate) fn clean_config(core: &Core, region: &Region, id: u32) {
    let _ = region.with_mem(|mem| {
        let metas = mem.metas();
        for_secure_chunks(core, mem, |chunk, lo, hi| {
            // The whole chunk is one batch: one fence per 2 MiB (nothing to cancel here).
            let mut tally = OwnerTally::new();
            let mut batch = [0u64; CHUNK_PAGES as usize];
            let mut len = 0;
            for idx in lo..hi {
                let s = metas[idx as usize].load(Ordering::Relaxed);
                if len < batch.len()
                    && (ps::is_secure(s) && ps::owner(s) == id || s & ps::BUSY != 0)
                {
                    batch[len] = idx;
                    len += 1;
                }
            }
            let n = destroy_batch(
                core,
                mem,
                chunk,
                &batch[..len],
                Mode::CleanOwner(id),
                &mut tally,
                None,
            );
            core.charge(|a| a.charge_uv_pages(Uvc::DestroySecConf, n));
        });
    });
}

/// Set Unshare All: every SHARED page of config `id` becomes SECURE (pins dropped).
pub(crate) fn unshare_config(core: &Core, region: &Region, id: u32) {
    let _timed = core.timed(true);
    let _ = region.with_mem(|mem| {
        let metas = mem.metas();
        for_secure_chunks(core, mem, |_, lo, hi| {
            let mut n = 0;
            for m in &metas[lo as usize..hi as usize] {
                let s = m.load(Ordering::Relaxed);
                if !(ps::kind(s) == ps::SHARED && ps::owner(s) == id) && s & ps::BUSY == 0 {
                    continue;
                }
                let s = mem.lock(m);
                if ps::kind(s) == ps::SHARED && ps::owner(s) == id {
                    mem.unlock(m, ps::make(ps::SECURE, id));
                    n += 1;
                } else {
                    mem.unlock(m, s);
                }
            }
            core.charge(|a| a.charge_uv_pages(Uvc::SetUnshareAll, n));
        });
    });
}

/// `mm_teardown` / `make_accessible` helper: run `f` on every present secure page of the
/// region, in parallel; returns the sum of what `f` returns.
pub(crate) fn for_secure_pages(
    core: &Core,
    region: &Region,
    lo: u64,
    hi: u64,
    f: impl Fn(&PageCtx<'_>, u64) -> (u64, u64) + Sync,
) -> Result<(u64, u64), CoreError> {
    // A few pages (a host access) run inline and never sleep: elapsed time, cheaper to read.
    let _timed = core.timed(hi.saturating_sub(lo) * crate::PAGE_SIZE as u64 > crate::MIB);
    let binding = account::current();
    region.with_mem(|mem| {
        let a = AtomicU64::new(0);
        let b = AtomicU64::new(0);
        let metas: &[AtomicU32] = mem.metas();
        let sums = mem.summaries();
        let run = |tlo: u64, thi: u64| {
            let ctx = PageCtx { core, region, mem };
            let mut idx = tlo;
            while idx < thi {
                let chunk = idx / CHUNK_PAGES;
                let chunk_hi = ((chunk + 1) * CHUNK_PAGES).min(thi);
                if summary_counts(sums[chunk as usize].load(Ordering::Acquire)).1 != 0 {
                    for i in idx..chunk_hi {
                        if ps::is_secure(metas[i as usize].load(Ordering::Acquire)) {
                            let (x, y) = f(&ctx, i);
                            a.fetch_add(x, Ordering::Relaxed);
                            b.fetch_add(y, Ordering::Relaxed);
                        }
                    }
                }
                idx = chunk_hi;
            }
        };
        if hi.saturating_sub(lo) <= TASK_CHUNKS * CHUNK_PAGES {
            // One task's worth (a host write of a few pages): on the caller's thread.
            run(lo, hi);
        } else {
            core.pool.install(|| {
                task_ranges(lo, hi)
                    .for_each_init(|| core.tasks(&binding), |_, (tlo, thi)| run(tlo, thi))
            });
        }
        (a.into_inner(), b.into_inner())
    })
}

/// exit_mmap of a protected mm: a destroy-page UVC on every present secure page (or, with
/// `all_present`, on every present page, as per-PTE teardown without the kernel's PG_arch_1
/// check would), batched like the walk; a page whose destroy fails is exported instead. The
/// legacy answer 0x0107/0x000d counts as success, as in the kernel. Returns
/// (destroyed, exported): pages made non-secure by a destroy, successful exports.
pub(crate) fn mm_teardown(
    core: &Core,
    region: &Region,
    all_present: bool,
) -> Result<(u64, u64), CoreError> {
    let _timed = core.timed(true);
    region.with_mem(|mem| {
        let destroyed = AtomicU64::new(0);
        let exported = AtomicU64::new(0);
        let metas = mem.metas();
        let want = |word: u32| {
            let (present, secure) = summary_counts(word);
            if all_present {
                present != 0
            } else {
                secure != 0
            }
        };
        for_chunks(core, mem, want, |chunk, lo, hi| {
            let ctx = PageCtx { core, region, mem };
            let mut tally = OwnerTally::new();
            let mut refused = Vec::new();
            // Like the walk: a whole chunk per batch, one fence per 2 MiB.
            let mut batch = [0u64; CHUNK_PAGES as usize];
            let mut len = 0;
            for idx in lo..hi {
                let s = metas[idx as usize].load(Ordering::Relaxed);
                let candidate = if all_present {
                    s & ps::PRESENT != 0
                } else {
                    ps::is_secure(s) || s & ps::BUSY != 0
                };
                if len < batch.len() && candidate {
                    batch[len] = idx;
                    len += 1;
                }
            }
            if len == 0 {
                return;
            }
            let b = &batch[..len];
            if core.inject.pending(Uvc::DestrSecStor) {
                for &p in b {
                    let was = ps::is_secure(metas[p as usize].load(Ordering::Acquire));
                    let st = core.execute(Uvc::DestrSecStor, || ctx.destroy(p));
                    if st.is_ok()
                        || st.rc == rc::LEGACY_NOT_SECURE && st.rrc == rc::LEGACY_NOT_SECURE_RRC
                    {
                        destroyed.fetch_add(u64::from(was && st.is_ok()), Ordering::Relaxed);
                    } else {
                        refused.push(p);
                    }
                }
            } else {
                // No injection pending: the batch's UVCs are counted at once.
                core.count_batch(Uvc::DestrSecStor, len as u64);
                let d = destroy_batch(
                    core,
                    mem,
                    chunk,
                    b,
                    Mode::DestroyUvc,
                    &mut tally,
                    Some(&mut refused),
                );
                destroyed.fetch_add(d, Ordering::Relaxed);
            }
            for &p in &refused {
                if core.execute(Uvc::ConvFromSecStor, || ctx.export(p)).is_ok() {
                    exported.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        (destroyed.into_inner(), exported.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CFG_FAST_DESTROYED;
    use crate::memory::wlock;
    use crate::state::UvOptions;

    #[test]
    fn the_owner_cache_forgets_a_retired_id() {
        let core = Core::new(UvOptions {
            threads: 1,
            ..Default::default()
        })
        .expect("a one-thread pool");
        let config = |handle| Arc::new(Config::new(1, handle, 0, 1 << 20, 0, 0));
        let old = config(0x100);
        {
            let mut t = wlock(&core.tables);
            t.insert(Arc::clone(&old));
            old.set_state(CFG_FAST_DESTROYED);
            t.mark_dead(1);
        }
        let mut tally = OwnerTally::new();
        assert!(tally.config(&core, 1).is_some_and(|c| Arc::ptr_eq(c, &old)));
        // No page names id 1 any more: it is retired and a new configuration gets it.
        {
            let mut t = wlock(&core.tables);
            core.retire(&mut t);
            assert_eq!(t.next_id(), Some(1));
            t.insert(config(0x200));
        }
        let now = tally.config(&core, 1).map(|c| c.handle);
        assert_eq!(
            now,
            Some(0x200),
            "a walk must not keep using the retired configuration"
        );
    }
}
