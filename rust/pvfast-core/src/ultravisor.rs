//! The Ultravisor façade: region registry, inspection, fault injection, and one typed method
//! per UVC. Every UVC method starts with `Core::execute`, the shared counting/injection prologue.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::account::{Account, CostTable};
pub use crate::config::TableSizes;
use crate::config::{Config, Cpu, CFG_DESTROYED, CFG_FAST_DESTROYED};
use crate::error::{invalid, CoreError};
use crate::image;
use crate::memory::{mlock, rlock, wlock, MemoryMode};
use crate::pages::{OwnerOp, PageCtx};
use crate::region::{classify, PageState, Region};
use crate::state::Core;
pub use crate::state::{set_bit_inv, test_bit_inv, UvInfo, UvOptions};
use crate::uvc::{cpu_state, rc, Uvc, UvcStatus};
use crate::walk;
use crate::{MIB, PAGE_SIZE};

/// One emulated Ultravisor. All methods take `&self` and are thread-safe.
pub struct Ultravisor {
    pub(crate) core: Arc<Core>,
    regions: RwLock<BTreeMap<u64, Arc<Region>>>,
    next_base: Mutex<u64>,
    next_region_id: AtomicU64,
}

/// First host address handed out; regions are spaced by a 1 MiB guard gap.
const FIRST_BASE: u64 = 1 << 32;

/// ASCE private-space control (Linux asm/pgtable.h `_ASCE_PRIVATE_SPACE`): required.
pub const ASCE_PRIVATE_SPACE: u64 = 0x100;
/// ASCE real-space control (bit 58, `_ASCE_REAL_SPACE`): refused, the UV needs DAT tables.
pub const ASCE_REAL_SPACE: u64 = 0x20;
/// ASCE bits between the origin and the controls that Linux never sets (bits 52-54, 59):
/// refused as reserved.
pub const ASCE_RESERVED: u64 = 0xe10;
/// End of the absolute lowcore (two pages): donations may not overlap it.
pub const LOWCORE_END: u64 = 0x2000;
/// INIT_UV's storage must start at or above 2 GiB (kvm-unit-tests test_init).
const INIT_STOR_MIN: u64 = 1 << 31;

/// The fields of a raw CREATE_SEC_CONF block that the typed call has no parameter for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawCgc {
    pub(crate) guest_origin: u64,
    pub(crate) base_origin: u64,
    pub(crate) var_origin: u64,
}

/// Everything CREATE_SEC_CONF checks. `region` None: a raw block whose origin names no region.
pub(crate) struct ConfigRequest<'a> {
    pub(crate) region: Option<&'a Arc<Region>>,
    pub(crate) guest_len: u64,
    pub(crate) asce: u64,
    pub(crate) sca: u64,
    pub(crate) base_stor_len: u64,
    pub(crate) var_stor_len: u64,
    pub(crate) raw: Option<RawCgc>,
}

impl Ultravisor {
    pub fn new(opts: UvOptions) -> Result<Ultravisor, CoreError> {
        Ok(Ultravisor {
            core: Arc::new(Core::new(opts)?),
            regions: RwLock::new(BTreeMap::new()),
            next_base: Mutex::new(FIRST_BASE),
            next_region_id: AtomicU64::new(1),
        })
    }

    pub fn options(&self) -> &UvOptions {
        &self.core.opts
    }

    // ---------------------------------------------------------------- inspection

    pub fn info(&self) -> UvInfo {
        self.core.info.clone()
    }

    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        Uvc::ALL
            .iter()
            .map(|u| (u.name(), self.core.stats.get(*u)))
            .collect()
    }

    pub fn stat(&self, uvc: Uvc) -> u64 {
        self.core.stats.get(uvc)
    }

    pub fn reset_stats(&self) {
        self.core.stats.reset();
    }

    pub fn config_handles(&self) -> Vec<u64> {
        let t = rlock(&self.core.tables);
        t.by_handle
            .values()
            .filter(|c| c.is_alive())
            .map(|c| c.handle)
            .collect()
    }

    pub fn cpu_handles(&self, handle: u64) -> Result<Vec<u64>, CoreError> {
        let t = rlock(&self.core.tables);
        let cfg = t.live(handle).ok_or(CoreError::NoSuchConfig(handle))?;
        Ok(t.cpus
            .iter()
            .filter(|(_, c)| c.config.id == cfg.id)
            .map(|(h, _)| *h)
            .collect())
    }

    /// SECURE + SHARED + ORPHANED pages of `handle` (dead handles too), or of everyone.
    pub fn secure_pages(&self, handle: Option<u64>) -> u64 {
        match handle {
            None => self.core.secure_total.load(Ordering::Relaxed).max(0) as u64,
            Some(h) => rlock(&self.core.tables)
                .by_handle
                .get(&h)
                .map_or(0, |c| c.secure_pages.load(Ordering::Relaxed).max(0) as u64),
        }
    }

    pub fn donated_bytes(&self) -> u64 {
        self.core.donated.load(Ordering::Relaxed)
    }

    pub fn inject_failure(
        &self,
        uvc: u16,
        rc_: u16,
        rrc: u16,
        count: u64,
    ) -> Result<(), CoreError> {
        let u = Uvc::from_code(uvc)
            .ok_or_else(|| invalid("uvc", format!("unknown UVC code {uvc:#06x}")))?;
        if rc_ == rc::EXECUTED {
            return Err(invalid("rc", "0x0001 is success, not a failure"));
        }
        if count == 0 {
            return Err(invalid("count", "must be at least 1"));
        }
        let count = u32::try_from(count).map_err(|_| invalid("count", "must be below 2**32"))?;
        self.core.inject.set(u, rc_, rrc, count);
        Ok(())
    }

    pub fn clear_failures(&self) {
        self.core.inject.clear();
    }

    // ---------------------------------------------------------------- accounting

    /// A new account of this UV (charged with the current cost table), its clock at `start_ps`.
    /// Bind it with `account::bind` to have a thread's UV work counted in it.
    pub fn new_account(&self, start_ps: u64) -> Arc<Account> {
        self.core.new_account(start_ps)
    }

    /// The cost table accounts made from now on are charged with.
    pub fn set_costs(&self, costs: CostTable) {
        self.core.set_costs(costs);
    }

    pub fn costs(&self) -> Arc<CostTable> {
        self.core.costs()
    }

    /// The account of work no bound account of this UV claimed.
    pub fn unattributed(&self) -> Arc<Account> {
        self.core.unattributed()
    }

    // ---------------------------------------------------------------- regions

    pub fn create_region(&self, size: u64) -> Result<Arc<Region>, CoreError> {
        self.create_region_mode(size, MemoryMode::Real)
    }

    /// A region whose storage is backed as `mode` says (see `MemoryMode`).
    pub fn create_region_mode(
        &self,
        size: u64,
        mode: MemoryMode,
    ) -> Result<Arc<Region>, CoreError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(invalid(
                "size",
                format!("{size:#x} is not a positive multiple of {PAGE_SIZE}"),
            ));
        }
        if size > 1 << 46 {
            return Err(invalid("size", format!("{size:#x} is larger than 64 TiB")));
        }
        let base = {
            let mut next = mlock(&self.next_base);
            let base = *next;
            let end = base
                .checked_add(size)
                .and_then(|e| e.checked_add(MIB))
                .map(|e| e.div_ceil(MIB) * MIB)
                .ok_or_else(|| invalid("size", "host address space exhausted"))?;
            *next = end;
            base
        };
        let id = self.next_region_id.fetch_add(1, Ordering::Relaxed);
        let region = Arc::new(Region::new(id, base, size, Arc::clone(&self.core), mode)?);
        wlock(&self.regions).insert(base, Arc::clone(&region));
        Ok(region)
    }

    pub(crate) fn check_region(&self, region: &Region) -> Result<(), CoreError> {
        if Arc::ptr_eq(&region.core, &self.core) {
            Ok(())
        } else {
            Err(CoreError::ForeignRegion(region.id))
        }
    }

    pub fn release_region(&self, region: &Region) -> Result<(), CoreError> {
        self.check_region(region)?;
        wlock(&self.regions).remove(&region.base);
        region.release();
        // Its pages are gone: dead configurations only they referred to can be retired.
        self.sweep();
        Ok(())
    }

    pub fn regions(&self) -> Vec<Arc<Region>> {
        rlock(&self.regions).values().cloned().collect()
    }

    /// The registered region holding a configuration's guest storage (None once released).
    fn region_of(&self, cfg: &Config) -> Option<Arc<Region>> {
        rlock(&self.regions).get(&cfg.region_base).cloned()
    }

    /// The region and page index of a host absolute address.
    fn resolve_paddr(&self, paddr: u64) -> Option<(Arc<Region>, u64)> {
        if !paddr.is_multiple_of(PAGE_SIZE as u64) {
            return None;
        }
        let regions = rlock(&self.regions);
        let (_, r) = regions.range(..=paddr).next_back()?;
        (paddr < r.base + r.size).then(|| (Arc::clone(r), (paddr - r.base) / PAGE_SIZE as u64))
    }

    /// Run a page operation on `paddr`; INV_ADDR if it is not a page of a live region.
    fn on_paddr(&self, paddr: u64, f: impl FnOnce(&PageCtx<'_>, u64) -> UvcStatus) -> UvcStatus {
        let Some((region, idx)) = self.resolve_paddr(paddr) else {
            return UvcStatus::err(rc::INV_ADDR);
        };
        region
            .with_mem(|mem| {
                f(
                    &PageCtx {
                        core: &self.core,
                        region: &region,
                        mem,
                    },
                    idx,
                )
            })
            .unwrap_or(UvcStatus::err(rc::INV_ADDR))
    }

    /// Run a page operation on guest address `gaddr` of configuration `handle`.
    fn on_gaddr(
        &self,
        handle: u64,
        gaddr: u64,
        f: impl FnOnce(&PageCtx<'_>, &Config, u64) -> UvcStatus,
    ) -> UvcStatus {
        self.on_gaddr_or(handle, gaddr, rc::INV_ADDR, f)
    }

    /// [`Self::on_gaddr`], answering `beyond` for a gaddr at or above the guest storage length.
    fn on_gaddr_or(
        &self,
        handle: u64,
        gaddr: u64,
        beyond: u16,
        f: impl FnOnce(&PageCtx<'_>, &Config, u64) -> UvcStatus,
    ) -> UvcStatus {
        let Some(cfg) = self.core.live_config(handle) else {
            return UvcStatus::err(rc::INV_GUEST_HANDLE);
        };
        if gaddr >= cfg.guest_len {
            return UvcStatus::err(beyond);
        }
        if !gaddr.is_multiple_of(PAGE_SIZE as u64) {
            return UvcStatus::err(rc::INV_ADDR);
        }
        let Some(region) = self.region_of(&cfg) else {
            return UvcStatus::err(rc::INV_ADDR);
        };
        let idx = gaddr / PAGE_SIZE as u64;
        if idx >= region.pages {
            return UvcStatus::err(rc::INV_ADDR);
        }
        region
            .with_mem(|mem| {
                f(
                    &PageCtx {
                        core: &self.core,
                        region: &region,
                        mem,
                    },
                    &cfg,
                    idx,
                )
            })
            .unwrap_or(UvcStatus::err(rc::INV_ADDR))
    }

    // ---------------------------------------------------------------- UVCs

    /// QUI 0x0001.
    pub fn query(&self) -> UvcStatus {
        self.core.execute(Uvc::Qui, || UvcStatus::OK)
    }

    /// INIT_UV 0x000f: donate `stor_len` bytes at host address `stor_origin` to the UV.
    /// Checks (kvm-unit-tests test_init): already initialised 0x0101 (a UV built with
    /// `initialised: true`, the default, always answers this), stor_len != uv_base_stor_len
    /// 0x0103, origin below 2 GiB 0x0108, origin not 1 MiB aligned 0x0104, origin + len wraps
    /// 0x0105. Success counts the donation in `donated_bytes`.
    pub fn init_uv(&self, stor_origin: u64, stor_len: u64) -> UvcStatus {
        self.core.execute(Uvc::InitUv, || {
            if self.core.is_initialised() {
                return UvcStatus::err(rc::INIT_DOUBLE);
            }
            if stor_len != self.core.info.uv_base_stor_len {
                return UvcStatus::err(rc::INIT_STOR_LEN);
            }
            if stor_origin < INIT_STOR_MIN {
                return UvcStatus::err(rc::INIT_STOR_BELOW_2G);
            }
            if !stor_origin.is_multiple_of(MIB) {
                return UvcStatus::err(rc::INIT_STOR_ORIGIN);
            }
            if stor_origin.checked_add(stor_len).is_none() {
                return UvcStatus::err(rc::INIT_STOR_RANGE);
            }
            if !self.core.mark_initialised() {
                return UvcStatus::err(rc::INIT_DOUBLE);
            }
            self.core.donated.fetch_add(stor_len, Ordering::Relaxed);
            UvcStatus::OK
        })
    }

    /// Whether INIT_UV has been done (always true unless built with `initialised: false`).
    pub fn is_initialised(&self) -> bool {
        self.core.is_initialised()
    }

    /// CREATE_SEC_CONF 0x0100 -> (status, handle).
    pub fn create_config(
        &self,
        region: &Arc<Region>,
        guest_len: u64,
        asce: u64,
        sca: u64,
        base_stor_len: u64,
        var_stor_len: u64,
    ) -> Result<(UvcStatus, u64), CoreError> {
        self.check_region(region)?;
        Ok(self.create_config_req(&ConfigRequest {
            region: Some(region),
            guest_len,
            asce,
            sca,
            base_stor_len,
            var_stor_len,
            raw: None,
        }))
    }

    /// CREATE_SEC_CONF from a typed call or a raw block.
    pub(crate) fn create_config_req(&self, req: &ConfigRequest<'_>) -> (UvcStatus, u64) {
        let create = || self.create_config_checked(req);
        // Not `execute`: the one injected failure that changes something. An injected rc with
        // the 0x8000 flag means "failed, but a handle exists and must be destroyed", so the
        // configuration is created for real and its handle handed out.
        match self.core.begin(Uvc::CreateSecConf) {
            None => create(),
            Some(f) if f.rc & rc::NEED_DESTROY != 0 => {
                let (s, h) = create();
                (f, if s.is_ok() { h } else { 0 })
            }
            Some(f) => (f, 0),
        }
    }

    /// The checks, in this order: guest origin / end against max_guest_stor_addr (0x0101,
    /// 0x0102), ASCE controls (0x0105), raw donation origins in the lowcore (0x0109, 0x010e),
    /// SCA 0 (0x010c), too many configurations (0x010f), guest storage / region (0x0103),
    /// donation lengths (0x0106, 0x010a), ASCE origin in use (0x0104).
    fn create_config_checked(&self, req: &ConfigRequest<'_>) -> (UvcStatus, u64) {
        let info = &self.core.info;
        let fail = |code| (UvcStatus::err(code), 0);
        let guest_len = req.guest_len;
        // The typed call has no guest origin: KVM's is always 0.
        let mso = req.raw.map_or(0, |r| r.guest_origin);
        let max = info.max_sec_stor_addr;
        if mso > max {
            return fail(rc::GUEST_ORIGIN_TOO_HIGH);
        }
        if guest_len != 0 && mso.checked_add(guest_len - 1).is_none_or(|last| last > max) {
            return fail(rc::GUEST_END_TOO_HIGH);
        }
        if req.asce & ASCE_PRIVATE_SPACE == 0 || req.asce & (ASCE_REAL_SPACE | ASCE_RESERVED) != 0 {
            return fail(rc::INV_ASCE);
        }
        if let Some(raw) = req.raw {
            if raw.base_origin < LOWCORE_END {
                return fail(rc::BASE_STOR_LOWCORE);
            }
            if raw.var_origin < LOWCORE_END {
                return fail(rc::VAR_STOR_LOWCORE);
            }
        }
        if req.sca == 0 {
            return fail(rc::SCA_ZERO);
        }
        // Lock order is region mapping before tables: look at the mapping first.
        let released = req.region.is_none_or(|r| r.is_released());
        let mut t = wlock(&self.core.tables);
        self.core.retire(&mut t);
        if t.live as u64 >= info.max_num_sec_conf || t.ids_exhausted() {
            return fail(rc::TOO_MANY_CONFIGS);
        }
        let Some(region) = req.region.filter(|_| !released) else {
            return fail(rc::INV_GUEST_STOR);
        };
        if guest_len == 0 || !guest_len.is_multiple_of(MIB) || guest_len > region.size {
            return fail(rc::INV_GUEST_STOR);
        }
        if req.base_stor_len < info.guest_base_stor_len {
            return fail(rc::BASE_STOR_TOO_SHORT);
        }
        if req.var_stor_len < info.var_stor_len(guest_len) {
            return fail(rc::VAR_STOR_TOO_SHORT);
        }
        let origin = req.asce & !0xfff;
        if t.asce_in_use.contains(&origin) {
            return fail(rc::ASCE_IN_USE);
        }
        let Some(id) = t.next_id() else {
            return fail(rc::TOO_MANY_CONFIGS);
        };
        let handle = self.core.fresh_handle(&t, self.core.next_config_seq());
        let donated = req.base_stor_len.saturating_add(req.var_stor_len);
        let cfg = Arc::new(Config::new(
            id,
            handle,
            region.base,
            guest_len,
            origin,
            donated,
        ));
        t.insert(cfg);
        t.asce_in_use.insert(origin);
        t.live += 1;
        self.core.donated.fetch_add(donated, Ordering::Relaxed);
        (UvcStatus::OK, handle)
    }

    fn destroy_config_common(&self, handle: u64, uvc: Uvc) -> Result<Arc<Config>, UvcStatus> {
        let mut t = wlock(&self.core.tables);
        let Some(cfg) = t.live(handle).cloned() else {
            return Err(UvcStatus::err(rc::INV_GUEST_HANDLE));
        };
        if cfg.cpus.load(Ordering::SeqCst) != 0 {
            return Err(UvcStatus::err(rc::CONFIG_HAS_CPUS));
        }
        cfg.set_state(if uvc == Uvc::DestroySecConfFast {
            CFG_FAST_DESTROYED
        } else {
            CFG_DESTROYED
        });
        t.asce_in_use.remove(&cfg.asce_origin);
        t.live -= 1;
        self.core.donated.fetch_sub(cfg.donated, Ordering::Relaxed);
        drop(t);
        *mlock(&cfg.image) = Default::default();
        cfg.dumping.store(false, Ordering::SeqCst);
        Ok(cfg)
    }

    /// DESTROY_SEC_CONF 0x0101: refused while the config has CPUs; cleans all its pages, so
    /// no page refers to it afterwards and its record is retired at once.
    pub fn destroy_config(&self, handle: u64) -> UvcStatus {
        self.core.execute(Uvc::DestroySecConf, || {
            match self.destroy_config_common(handle, Uvc::DestroySecConf) {
                Ok(cfg) => {
                    if let Some(region) = self.region_of(&cfg) {
                        walk::clean_config(&self.core, &region, cfg.id);
                        self.forget_exports(&region, cfg.id);
                    }
                    // Only now: while its own clean-up walk runs, the id must stay its own.
                    wlock(&self.core.tables).mark_dead(cfg.id);
                    self.sweep();
                    UvcStatus::OK
                }
                Err(s) => s,
            }
        })
    }

    /// DESTROY_SEC_CONF_FAST 0x0102: O(1); the config's pages become ORPHANED. The record
    /// stays while orphaned (or orphan-exported) pages refer to it.
    pub fn destroy_config_fast(&self, handle: u64) -> UvcStatus {
        self.core.execute(Uvc::DestroySecConfFast, || {
            if !self.core.opts.destroy_fast {
                return UvcStatus::err(rc::INV_CMD);
            }
            match self.destroy_config_common(handle, Uvc::DestroySecConfFast) {
                Ok(cfg) => {
                    let mut t = wlock(&self.core.tables);
                    t.mark_dead(cfg.id);
                    self.core.retire(&mut t);
                    UvcStatus::OK
                }
                Err(s) => s,
            }
        })
    }

    /// Pages dead configuration `id` exported while it lived read as non-secure; rewrite them
    /// so (`PageCtx::forget_export`), dropping their references to `id`. O(exported pages of
    /// the region).
    fn forget_exports(&self, region: &Region, id: u32) {
        let pages: Vec<u64> = mlock(&region.exported)
            .iter()
            .filter(|(_, tag)| tag.owner == id)
            .map(|(idx, _)| *idx)
            .collect();
        if pages.is_empty() {
            return;
        }
        let _ = region.with_mem(|mem| {
            let ctx = PageCtx {
                core: &self.core,
                region,
                mem,
            };
            for idx in pages {
                ctx.forget_export(idx, id);
            }
        });
    }

    /// Retire every dead configuration no page refers to, first forgetting the exports of
    /// those only such pages still name. Runs after a destroy and a region release.
    fn sweep(&self) {
        let candidates = rlock(&self.core.tables).only_live_exports();
        for cfg in candidates {
            if let Some(region) = self.region_of(&cfg) {
                self.forget_exports(&region, cfg.id);
            }
        }
        self.core.retire(&mut wlock(&self.core.tables));
    }

    /// Sizes of the configuration tables (inspection; not a UVC).
    pub fn table_sizes(&self) -> TableSizes {
        rlock(&self.core.tables).sizes()
    }

    /// CREATE_SEC_CPU 0x0120 -> (status, cpu handle). Checks, in order: handle 0x0020,
    /// num > max_guest_cpu_id 0x0103, stor_len short 0x010c, num already defined 0x0104.
    pub fn create_cpu(&self, handle: u64, num: u64, stor_len: u64) -> (UvcStatus, u64) {
        self.create_cpu_at(handle, num, stor_len, None)
    }

    /// CREATE_SEC_CPU; `stor_origin` is the raw block's donation origin (checked against the
    /// lowcore after the cpu number: 0x0106).
    pub(crate) fn create_cpu_at(
        &self,
        handle: u64,
        num: u64,
        stor_len: u64,
        stor_origin: Option<u64>,
    ) -> (UvcStatus, u64) {
        self.core.execute(Uvc::CreateSecCpu, || {
            let mut t = wlock(&self.core.tables);
            let Some(cfg) = t.live(handle).cloned() else {
                return (UvcStatus::err(rc::INV_GUEST_HANDLE), 0);
            };
            if num > self.core.info.max_guest_cpu_id {
                return (UvcStatus::err(rc::INV_CPU_NUM), 0);
            }
            if stor_origin.is_some_and(|o| o < LOWCORE_END) {
                return (UvcStatus::err(rc::CPU_STOR_LOWCORE), 0);
            }
            if stor_len < self.core.info.guest_cpu_stor_len {
                return (UvcStatus::err(rc::CPU_STOR_TOO_SHORT), 0);
            }
            let num = num as u16;
            if t.cpus
                .values()
                .any(|c| c.config.id == cfg.id && c.num == num)
            {
                return (UvcStatus::err(rc::CPU_NUM_IN_USE), 0);
            }
            let cpu_handle = self.core.fresh_handle(&t, self.core.next_cpu_seq());
            cfg.cpus.fetch_add(1, Ordering::SeqCst);
            t.cpus.insert(
                cpu_handle,
                Cpu {
                    config: cfg,
                    num,
                    stor_len,
                },
            );
            self.core.donated.fetch_add(stor_len, Ordering::Relaxed);
            (UvcStatus::OK, cpu_handle)
        })
    }

    /// DESTROY_SEC_CPU 0x0121.
    pub fn destroy_cpu(&self, cpu_handle: u64) -> UvcStatus {
        self.core.execute(Uvc::DestroySecCpu, || {
            let mut t = wlock(&self.core.tables);
            let Some(cpu) = t.cpus.remove(&cpu_handle) else {
                return UvcStatus::err(rc::INV_CPU_HANDLE);
            };
            cpu.config.cpus.fetch_sub(1, Ordering::SeqCst);
            self.core.donated.fetch_sub(cpu.stor_len, Ordering::Relaxed);
            UvcStatus::OK
        })
    }

    /// The CPU resets (CPU_RESET, CPU_RESET_INITIAL, CPU_RESET_CLEAR): check the CPU handle.
    /// The emulator keeps no CPU register state, so a reset has nothing else to do. Any other
    /// `uvc` is not a CPU reset: counted, and answered 0x0002.
    pub fn cpu_uvc(&self, uvc: Uvc, cpu_handle: u64) -> UvcStatus {
        self.core.execute(uvc, || {
            if !matches!(
                uvc,
                Uvc::CpuReset | Uvc::CpuResetInitial | Uvc::CpuResetClear
            ) {
                UvcStatus::err(rc::INV_CMD)
            } else if rlock(&self.core.tables).cpus.contains_key(&cpu_handle) {
                UvcStatus::OK
            } else {
                UvcStatus::err(rc::INV_CPU_HANDLE)
            }
        })
    }

    /// CPU_SET_STATE 0x0330: CPU handle 0x0021, then the state (1 operating, 2 stopped,
    /// 3 check-stop, 5 operating-load; any other value 0x0101). The emulator does not run
    /// CPUs, so the state is checked, not kept.
    pub fn cpu_set_state(&self, cpu_handle: u64, state: u8) -> UvcStatus {
        self.core.execute(Uvc::CpuSetState, || {
            if !rlock(&self.core.tables).cpus.contains_key(&cpu_handle) {
                UvcStatus::err(rc::INV_CPU_HANDLE)
            } else if !cpu_state::is_valid(state) {
                UvcStatus::err(rc::INV_CPU_STATE)
            } else {
                UvcStatus::OK
            }
        })
    }

    /// CONV_TO_SEC_STOR 0x0200.
    pub fn convert_to_secure(&self, handle: u64, gaddr: u64) -> UvcStatus {
        self.core.execute(Uvc::ConvToSecStor, || {
            self.on_gaddr(handle, gaddr, |p, cfg, idx| p.import(idx, cfg))
        })
    }

    /// CONV_FROM_SEC_STOR 0x0201.
    pub fn convert_from_secure(&self, paddr: u64) -> UvcStatus {
        self.core.execute(Uvc::ConvFromSecStor, || {
            self.on_paddr(paddr, |p, idx| p.export(idx))
        })
    }

    /// DESTR_SEC_STOR 0x0202.
    pub fn destroy_page(&self, paddr: u64) -> UvcStatus {
        self.core.execute(Uvc::DestrSecStor, || {
            self.on_paddr(paddr, |p, idx| p.destroy(idx))
        })
    }

    /// PIN_PAGE_SHARED 0x0341.
    pub fn pin_shared(&self, paddr: u64) -> UvcStatus {
        self.core.execute(Uvc::PinPageShared, || {
            self.on_paddr(paddr, |p, idx| p.pin(idx))
        })
    }

    /// UNPIN_PAGE_SHARED 0x0342.
    pub fn unpin_shared(&self, handle: u64, gaddr: u64) -> UvcStatus {
        self.core.execute(Uvc::UnpinPageShared, || {
            self.on_gaddr(handle, gaddr, |p, cfg, idx| {
                p.owner_op(idx, cfg, OwnerOp::Unpin)
            })
        })
    }

    /// SET_SHARED_ACCESS 0x1000, issued by the protected guest `handle` (a host does not have
    /// this call: the raw dispatcher answers a host 0x0002). gaddr beyond the guest storage
    /// 0x0101 (kvm-unit-tests uv-guest.c test_sharing).
    pub fn set_shared_access(&self, handle: u64, gaddr: u64) -> UvcStatus {
        self.core.execute(Uvc::SetSharedAccess, || {
            self.on_gaddr_or(handle, gaddr, rc::SHARE_INV_ADDR, |p, cfg, idx| {
                p.owner_op(idx, cfg, OwnerOp::Share)
            })
        })
    }

    /// REMOVE_SHARED_ACCESS 0x1001, issued by the protected guest `handle`; as
    /// [`Self::set_shared_access`].
    pub fn remove_shared_access(&self, handle: u64, gaddr: u64) -> UvcStatus {
        self.core.execute(Uvc::RemoveSharedAccess, || {
            self.on_gaddr_or(handle, gaddr, rc::SHARE_INV_ADDR, |p, cfg, idx| {
                p.owner_op(idx, cfg, OwnerOp::Unshare)
            })
        })
    }

    /// SET_SEC_CONF_PARAMS 0x0300: parse and authenticate the SE header.
    pub fn set_sec_parms(&self, handle: u64, header: &[u8]) -> UvcStatus {
        self.set_sec_parms_with(handle, || Ok::<&[u8], UvcStatus>(header))
    }

    /// SET_SEC_CONF_PARAMS with the header fetched by `read` once the handle is checked
    /// (kvm-unit-tests test_set_se_header: handle 0x0020 comes before the header access
    /// 0x0103), then: header already set 0x0003, header content (image rcs). `read` runs with
    /// no lock held: it may take region locks.
    pub(crate) fn set_sec_parms_with<H: AsRef<[u8]>>(
        &self,
        handle: u64,
        read: impl FnOnce() -> Result<H, UvcStatus>,
    ) -> UvcStatus {
        self.core.execute(Uvc::SetSecConfParams, || {
            let Some(cfg) = self.core.live_config(handle) else {
                return UvcStatus::err(rc::INV_GUEST_HANDLE);
            };
            let header = match read() {
                Ok(h) => h,
                Err(s) => return s,
            };
            let mut image = mlock(&cfg.image);
            if image.header.is_some() {
                return UvcStatus::err(rc::CONFIG_STATE);
            }
            match image::parse_header(header.as_ref(), &self.core.opts.host_key) {
                Ok(hdr) => {
                    image.header = Some(Box::new(hdr));
                    image.verifier = Some(image::Verifier::new());
                    image.verified = false;
                    UvcStatus::OK
                }
                Err(e) => UvcStatus::err(e.rc()),
            }
        })
    }

    /// UNPACK_IMG 0x0301.
    pub fn unpack(&self, handle: u64, gaddr: u64, tweak0: u64, tweak1: u64) -> UvcStatus {
        self.core.execute(Uvc::UnpackImg, || {
            self.on_gaddr(handle, gaddr, |p, cfg, idx| {
                p.unpack(idx, cfg, gaddr, tweak0, tweak1)
            })
        })
    }

    /// VERIFY_IMG 0x0302.
    pub fn verify(&self, handle: u64) -> UvcStatus {
        self.core.execute(Uvc::VerifyImg, || {
            let Some(cfg) = self.core.live_config(handle) else {
                return UvcStatus::err(rc::INV_GUEST_HANDLE);
            };
            let mut image = mlock(&cfg.image);
            let (Some(hdr), Some(ver)) = (image.header.as_deref(), image.verifier.as_ref()) else {
                return UvcStatus::err(rc::CONFIG_STATE);
            };
            if image.verified {
                return UvcStatus::err(rc::CONFIG_STATE);
            }
            match ver.finish(hdr) {
                Ok(()) => {
                    image.verified = true;
                    UvcStatus::OK
                }
                Err(code) => UvcStatus::err(code),
            }
        })
    }

    /// Prologue of the configuration-level UVCs without input data: count, injection,
    /// installed check, live handle.
    fn nodata(&self, uvc: Uvc, handle: u64) -> Result<Arc<Config>, UvcStatus> {
        self.core.execute(uvc, || {
            if !self.core.info.is_installed(uvc) {
                return Err(UvcStatus::err(rc::INV_CMD));
            }
            self.core
                .live_config(handle)
                .ok_or(UvcStatus::err(rc::INV_GUEST_HANDLE))
        })
    }

    /// PREPARE_RESET 0x0320.
    pub fn prepare_reset(&self, handle: u64) -> UvcStatus {
        match self.nodata(Uvc::PrepareReset, handle) {
            Ok(_) => UvcStatus::OK,
            Err(s) => s,
        }
    }

    /// SET_UNSHARE_ALL 0x0340: every shared page of the config becomes secure again.
    pub fn unshare_all(&self, handle: u64) -> UvcStatus {
        match self.nodata(Uvc::SetUnshareAll, handle) {
            Ok(cfg) => {
                if let Some(region) = self.region_of(&cfg) {
                    walk::unshare_config(&self.core, &region, cfg.id);
                }
                UvcStatus::OK
            }
            Err(s) => s,
        }
    }

    /// DUMP_INIT 0x0400.
    pub fn dump_init(&self, handle: u64) -> UvcStatus {
        match self.nodata(Uvc::DumpInit, handle) {
            Ok(cfg) => {
                if cfg.dumping.swap(true, Ordering::SeqCst) {
                    UvcStatus::err(rc::CONFIG_STATE)
                } else {
                    UvcStatus::OK
                }
            }
            Err(s) => s,
        }
    }

    /// DUMP_CONF_STOR_STATE 0x0401: conf_dump_storage_state_len bytes for the 1 MiB at gaddr,
    /// 16 bytes per page: big-endian gaddr, state byte (0 nonsecure, 1 secure, 2 shared,
    /// 3 exported, 4 orphaned), 7 zero bytes.
    pub fn dump_conf_stor_state(&self, handle: u64, gaddr: u64) -> (UvcStatus, Vec<u8>) {
        let cfg = match self.nodata(Uvc::DumpConfStorState, handle) {
            Ok(c) => c,
            Err(s) => return (s, Vec::new()),
        };
        if !cfg.dumping.load(Ordering::SeqCst) {
            return (UvcStatus::err(rc::CONFIG_STATE), Vec::new());
        }
        if !gaddr.is_multiple_of(MIB) || gaddr >= cfg.guest_len {
            return (UvcStatus::err(rc::INV_DUMP_ADDR), Vec::new());
        }
        let len = self.core.info.conf_dump_storage_state_len as usize;
        let mut out = vec![0u8; len];
        if let Some(region) = self.region_of(&cfg) {
            let _ = region.with_mem(|mem| {
                let tables = rlock(&self.core.tables);
                let first = gaddr / PAGE_SIZE as u64;
                for (i, rec) in out.chunks_exact_mut(16).enumerate() {
                    let idx = first + i as u64;
                    if idx >= mem.pages() {
                        break;
                    }
                    let s = mem.metas()[idx as usize].load(Ordering::Acquire);
                    let code = match classify(s, &tables).0 {
                        PageState::NonSecure => 0,
                        PageState::Secure => 1,
                        PageState::Shared => 2,
                        PageState::Exported => 3,
                        PageState::Orphaned => 4,
                    };
                    rec[..8].copy_from_slice(&(idx * PAGE_SIZE as u64).to_be_bytes());
                    rec[8] = code;
                }
            });
        }
        (UvcStatus::OK, out)
    }

    /// DUMP_CPU 0x0402: guest_cpu_stor_len bytes (cpu handle, cpu number, config handle).
    pub fn dump_cpu(&self, cpu_handle: u64) -> (UvcStatus, Vec<u8>) {
        self.core.execute(Uvc::DumpCpu, || {
            if !self.core.info.is_installed(Uvc::DumpCpu) {
                return (UvcStatus::err(rc::INV_CMD), Vec::new());
            }
            let t = rlock(&self.core.tables);
            let Some(cpu) = t.cpus.get(&cpu_handle) else {
                return (UvcStatus::err(rc::INV_CPU_HANDLE), Vec::new());
            };
            if !cpu.config.dumping.load(Ordering::SeqCst) {
                return (UvcStatus::err(rc::NOT_DUMPING), Vec::new());
            }
            let mut out = vec![0u8; self.core.info.guest_cpu_stor_len as usize];
            out[..8].copy_from_slice(&cpu_handle.to_be_bytes());
            out[8..10].copy_from_slice(&cpu.num.to_be_bytes());
            out[16..24].copy_from_slice(&cpu.config.handle.to_be_bytes());
            (UvcStatus::OK, out)
        })
    }

    /// DUMP_COMPLETE 0x0403: conf_dump_finalize_len bytes; ends the dump.
    pub fn dump_complete(&self, handle: u64) -> (UvcStatus, Vec<u8>) {
        let cfg = match self.nodata(Uvc::DumpComplete, handle) {
            Ok(c) => c,
            Err(s) => return (s, Vec::new()),
        };
        if !cfg.dumping.swap(false, Ordering::SeqCst) {
            return (UvcStatus::err(rc::CONFIG_STATE), Vec::new());
        }
        let mut out = vec![0u8; self.core.info.conf_dump_finalize_len as usize];
        out[..8].copy_from_slice(&cfg.handle.to_be_bytes());
        out[8..16].copy_from_slice(&cfg.guest_len.to_be_bytes());
        (UvcStatus::OK, out)
    }
}
