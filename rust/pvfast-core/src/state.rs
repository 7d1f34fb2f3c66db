//! The state every part of the emulated UV shares (`Core`): options and the QUI answer, the
//! configuration/CPU tables, UVC counters and injected failures, and the worker pools.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use crate::account::{self, Account, Binding, CostTable};
use crate::config::{mix64, random_u64, Config, Tables};
use crate::error::CoreError;
use crate::image;
use crate::memory::{rlock, wlock};
use crate::uvc::{Injections, Stats, Uvc, UvcStatus};
use crate::{MIB, PAGE_SIZE};

/// Construction options (mirrors `Ultravisor.__init__`).
#[derive(Debug, Clone)]
pub struct UvOptions {
    /// Installed-call bit 23 (Destroy Secure Configuration Fast).
    pub destroy_fast: bool,
    /// Feature bit 0: importing a shared page of another configuration moves it.
    pub feature_misc: bool,
    /// Feature bit 1.
    pub feature_aiv: bool,
    /// Installed-call bits 24..27.
    pub dump: bool,
    pub max_guests: u32,
    pub max_cpus: u32,
    /// Destroy-page on a non-secure page answers cc 1, rc 0x0107, rrc 0x000d.
    pub legacy_destroy_rc: bool,
    /// Worker threads for walks; 0 = number of CPUs.
    pub threads: usize,
    /// Host key that SE headers are wrapped for.
    pub host_key: [u8; 32],
    /// The UV starts initialised, as after the host kernel's boot-time INIT_UV (the default).
    /// `false`: every UVC but QUI and INIT_UV answers 0x0003 until an INIT_UV donates
    /// `uv_base_stor_len` bytes (kvm-unit-tests uv-host.c runs against such a UV).
    pub initialised: bool,
}

impl Default for UvOptions {
    fn default() -> Self {
        UvOptions {
            destroy_fast: true,
            feature_misc: true,
            feature_aiv: true,
            dump: true,
            max_guests: 4096,
            max_cpus: 248,
            legacy_destroy_rc: false,
            threads: 0,
            host_key: image::HOST_KEY_DEFAULT,
            initialised: true,
        }
    }
}

/// The QUI answer a host gets (`uv_info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UvInfo {
    /// The host's installed calls: the guest-only calls (bits 8 and 9) are not indicated.
    pub inst_calls_list: [u64; 4],
    /// Storage INIT_UV takes (QUI @0x40); a 1 MiB multiple.
    pub uv_base_stor_len: u64,
    pub uv_feature_indications: u64,
    pub guest_base_stor_len: u64,
    pub guest_virt_base_stor_len: u64,
    pub guest_virt_var_stor_len: u64,
    pub guest_cpu_stor_len: u64,
    pub max_guest_cpu_id: u64,
    pub max_num_sec_conf: u64,
    pub max_sec_stor_addr: u64,
    pub conf_dump_storage_state_len: u64,
    pub conf_dump_finalize_len: u64,
}

/// Set MSB-0 bit `n` of a 4-word bit list.
pub fn set_bit_inv(words: &mut [u64; 4], n: u32) {
    if let Some(w) = words.get_mut((n / 64) as usize) {
        *w |= 1u64 << (63 - n % 64);
    }
}

/// Test MSB-0 bit `n` of a 4-word bit list (the kernel's test_bit_inv).
pub fn test_bit_inv(words: &[u64; 4], n: u32) -> bool {
    words
        .get((n / 64) as usize)
        .is_some_and(|w| w & (1u64 << (63 - n % 64)) != 0)
}

impl UvInfo {
    fn new(o: &UvOptions) -> UvInfo {
        let mut calls = [0u64; 4];
        for u in Uvc::ALL {
            let Some(bit) = u.bit() else { continue };
            let installed = match u {
                _ if u.is_guest_call() => false,
                Uvc::DestroySecConfFast => o.destroy_fast,
                Uvc::DumpInit | Uvc::DumpConfStorState | Uvc::DumpCpu | Uvc::DumpComplete => o.dump,
                _ => true,
            };
            if installed {
                set_bit_inv(&mut calls, bit);
            }
        }
        let mut feat = 0u64;
        if o.feature_misc {
            feat |= 1 << 63;
        }
        if o.feature_aiv {
            feat |= 1 << 62;
        }
        UvInfo {
            inst_calls_list: calls,
            uv_base_stor_len: UV_BASE_STOR_LEN,
            uv_feature_indications: feat,
            guest_base_stor_len: 0x10_0000,
            guest_virt_base_stor_len: 0x4000,
            guest_virt_var_stor_len: 0x20,
            guest_cpu_stor_len: 0x2000,
            max_guest_cpu_id: u64::from(o.max_cpus.saturating_sub(1)).min(u64::from(u16::MAX)),
            max_num_sec_conf: u64::from(o.max_guests),
            max_sec_stor_addr: (1u64 << 53) - 1,
            conf_dump_storage_state_len: 0x1000,
            conf_dump_finalize_len: 0x200,
        }
    }

    /// Variable storage a configuration of `guest_len` bytes needs: `guest_virt_var_stor_len`
    /// per MiB of guest memory, rounded up to whole pages, plus `guest_virt_base_stor_len`
    /// (the length `kvm_s390_pv_alloc_vm` allocates, arch/s390/kvm/pv.c @ f7866f582b1c).
    pub fn var_stor_len(&self, guest_len: u64) -> u64 {
        let per = self.guest_virt_var_stor_len.saturating_mul(guest_len / MIB);
        per.div_ceil(PAGE_SIZE as u64)
            .saturating_mul(PAGE_SIZE as u64)
            .saturating_add(self.guest_virt_base_stor_len)
    }

    /// Installed for a host (KVM). Destroy-page has no installed-calls bit and is always
    /// available.
    pub fn is_installed(&self, uvc: Uvc) -> bool {
        uvc.bit()
            .is_none_or(|b| test_bit_inv(&self.inst_calls_list, b))
    }

    /// The installed calls a protected guest sees: QUI and the two share calls (bits 0, 8, 9;
    /// kvm-unit-tests uv-guest.c test_query / test_invalid).
    pub fn guest_inst_calls_list(&self) -> [u64; 4] {
        let mut calls = [0u64; 4];
        for u in Uvc::ALL {
            if let (true, Some(bit)) = (is_guest_visible(*u), u.bit()) {
                set_bit_inv(&mut calls, bit);
            }
        }
        calls
    }

    /// Installed for a protected guest.
    pub fn is_guest_installed(&self, uvc: Uvc) -> bool {
        is_guest_visible(uvc)
    }
}

fn is_guest_visible(uvc: Uvc) -> bool {
    uvc == Uvc::Qui || uvc.is_guest_call()
}

/// QUI uv_base_stor_len: what INIT_UV must donate. Emulator-chosen (machines report tens of
/// MiB); only accounted, never allocated.
pub const UV_BASE_STOR_LEN: u64 = 64 * MIB;

/// State shared by the Ultravisor, its regions and the walks.
pub(crate) struct Core {
    pub(crate) opts: UvOptions,
    pub(crate) info: UvInfo,
    pub(crate) tables: RwLock<Tables>,
    pub(crate) stats: Stats,
    pub(crate) inject: Injections,
    pub(crate) secure_total: AtomicI64,
    pub(crate) donated: AtomicU64,
    /// INIT_UV done (at construction unless `opts.initialised` is false).
    initialised: AtomicBool,
    pub(crate) pool: rayon::ThreadPool,
    /// Workers for interruptible (PERFORM) walks. In the kernel PERFORM runs in its own thread
    /// while other ioctls go on; on one shared rayon pool a long walk would hold every worker and
    /// queue the foreground UV work of other threads behind it.
    bg_pool: OnceLock<Result<rayon::ThreadPool, CoreError>>,
    threads: usize,
    salt: u64,
    cpu_seq: AtomicU64,
    config_seq: AtomicU64,
    /// Bumped whenever a configuration is retired (its id may be reused): a cache of id ->
    /// configuration (the walks keep one) is valid only while this is unchanged.
    pub(crate) retire_epoch: AtomicU64,
    /// Unique id of this UV (accounts name the UV they count for).
    pub(crate) id: u64,
    /// The cost table new accounts are charged with.
    costs: RwLock<Arc<CostTable>>,
    /// Where work goes that no account of this UV is bound for (raw calls from a thread that
    /// never entered the emulated kernel).
    unattributed: RwLock<Arc<Account>>,
}

static NEXT_CORE: AtomicU64 = AtomicU64::new(1);

/// What a UVC returns, and what it returns when an injected failure stops it before it runs.
pub(crate) trait UvcReply {
    fn injected(status: UvcStatus) -> Self;
}

impl UvcReply for UvcStatus {
    fn injected(status: UvcStatus) -> Self {
        status
    }
}

/// A UVC that hands out a handle (Create CPU): no handle on failure.
impl UvcReply for (UvcStatus, u64) {
    fn injected(status: UvcStatus) -> Self {
        (status, 0)
    }
}

/// A UVC that returns data (the dump UVCs): no data on failure.
impl UvcReply for (UvcStatus, Vec<u8>) {
    fn injected(status: UvcStatus) -> Self {
        (status, Vec::new())
    }
}

/// A UVC body that goes on with a value once its checks passed.
impl<T> UvcReply for Result<T, UvcStatus> {
    fn injected(status: UvcStatus) -> Self {
        Err(status)
    }
}

impl Core {
    pub(crate) fn new(opts: UvOptions) -> Result<Core, CoreError> {
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            opts.threads
        };
        let pool = build_pool(threads, "pvfast-uv")?;
        let info = UvInfo::new(&opts);
        let id = NEXT_CORE.fetch_add(1, Ordering::Relaxed);
        let costs = Arc::new(CostTable::default());
        let unattributed = Arc::new(Account::new(id, Arc::clone(&costs), 0));
        Ok(Core {
            initialised: AtomicBool::new(opts.initialised),
            opts,
            info,
            tables: RwLock::new(Tables::default()),
            stats: Stats::new(),
            inject: Injections::new(),
            secure_total: AtomicI64::new(0),
            donated: AtomicU64::new(0),
            pool,
            bg_pool: OnceLock::new(),
            threads,
            salt: random_u64(),
            cpu_seq: AtomicU64::new(0),
            config_seq: AtomicU64::new(1),
            retire_epoch: AtomicU64::new(0),
            id,
            costs: RwLock::new(costs),
            unattributed: RwLock::new(unattributed),
        })
    }

    // ---------------------------------------------------------------- accounting

    /// Charge the calling thread's bound accounts of this UV (or, if no thread account of
    /// this UV is bound, the unattributed account).
    #[inline]
    pub(crate) fn charge(&self, f: impl Fn(&Account)) {
        if !account::enabled() {
            return;
        }
        if !account::with_bound(self.id, &f) {
            f(&rlock(&self.unattributed));
        }
    }

    /// A new account charged with the current cost table, its clock at `start_ps`.
    pub(crate) fn new_account(&self, start_ps: u64) -> Arc<Account> {
        Arc::new(Account::new(
            self.id,
            Arc::clone(&rlock(&self.costs)),
            start_ps,
        ))
    }

    /// Replace the cost table for accounts made from now on (and a fresh unattributed account).
    pub(crate) fn set_costs(&self, costs: CostTable) {
        let costs = Arc::new(costs);
        *wlock(&self.unattributed) = Arc::new(Account::new(self.id, Arc::clone(&costs), 0));
        *wlock(&self.costs) = costs;
    }

    pub(crate) fn costs(&self) -> Arc<CostTable> {
        Arc::clone(&rlock(&self.costs))
    }

    pub(crate) fn unattributed(&self) -> Arc<Account> {
        Arc::clone(&rlock(&self.unattributed))
    }

    /// Time the calling thread's work on this UV until the guard drops (only the outermost
    /// scope of a thread measures). `cpu_clock`: thread CPU time (work that can run long or
    /// wait for workers) rather than elapsed time (O(1) work that never sleeps).
    #[inline]
    pub(crate) fn timed(&self, cpu_clock: bool) -> TimedScope<'_> {
        TimedScope {
            core: self,
            timer: account::scope_enter(cpu_clock),
        }
    }

    /// Begin a stretch of worker tasks of a walk that `binding` issued (rayon's
    /// `for_each_init` makes one per split of the work): the tasks' UV work and thread CPU
    /// time count for the issuing thread's accounts.
    #[inline]
    pub(crate) fn tasks<'a>(&'a self, binding: &'a Binding) -> TaskStretch<'a> {
        TaskStretch {
            core: self,
            binding,
            stretch: account::WorkerStretch::enter(binding),
        }
    }

    /// The prologue of every single UVC: count one execution of `uvc`, then take the injected
    /// failure if one is pending. Prefer [`Core::execute`], which also skips the body.
    ///
    /// Guarantees: the UVC is counted in `stats()` whatever its outcome (success, UV error,
    /// malformed block, injected failure), exactly once; at most one injected failure is
    /// consumed. A caller that gets `Some` must return it without changing any state (the one
    /// architected exception is Create Config's NEED_DESTROY flag, see `create_config`).
    ///
    /// Before INIT_UV every UVC but QUI and INIT_UV answers 0x0003 (kvm-unit-tests uv-host.c
    /// test_uv_uninitialized); that answer also comes through here, after the injection.
    #[inline]
    pub(crate) fn begin(&self, uvc: Uvc) -> Option<UvcStatus> {
        self.begin_header(uvc).or_else(|| {
            (!matches!(uvc, Uvc::Qui | Uvc::InitUv) && !self.is_initialised())
                .then_some(UvcStatus::err(crate::uvc::rc::INV_STATE))
        })
    }

    /// [`Core::begin`] without the initialisation check: for a block refused by its header
    /// (command not offered, wrong length), which the UV answers before looking at its state.
    #[inline]
    pub(crate) fn begin_header(&self, uvc: Uvc) -> Option<UvcStatus> {
        self.stats.add(uvc, 1);
        self.charge(|a| a.charge_uvc(uvc, 1));
        self.inject.take(uvc)
    }

    #[inline]
    pub(crate) fn is_initialised(&self) -> bool {
        self.initialised.load(Ordering::Acquire)
    }

    /// INIT_UV's state change: false if the UV was initialised already.
    pub(crate) fn mark_initialised(&self) -> bool {
        self.initialised
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Run one UVC: [`Core::begin`], then `body` unless an injected failure is pending, in
    /// which case `body` does not run and the failure is returned. So the UVC is counted
    /// whatever its outcome, and an injected failure changes nothing.
    #[inline]
    pub(crate) fn execute<T: UvcReply>(&self, uvc: Uvc, body: impl FnOnce() -> T) -> T {
        // Destroy Config and Set Unshare All walk on the pool: time those on the CPU clock.
        let _timed = self.timed(matches!(uvc, Uvc::DestroySecConf | Uvc::SetUnshareAll));
        match self.begin(uvc) {
            Some(failure) => T::injected(failure),
            None => body(),
        }
    }

    /// The prologue of `n` executions of `uvc` issued as one batch by a walk that found no
    /// injection pending for `uvc` (`inject.pending`): counts them, consumes nothing. A walk
    /// with injections pending runs its UVCs one by one through [`Core::execute`] instead.
    #[inline]
    pub(crate) fn count_batch(&self, uvc: Uvc, n: u64) {
        self.stats.add(uvc, n);
        self.charge(|a| a.charge_uvc(uvc, n));
    }

    /// The pool for background (interruptible) walks, built on first use.
    pub(crate) fn bg_pool(&self) -> Result<&rayon::ThreadPool, CoreError> {
        self.bg_pool
            .get_or_init(|| build_pool(self.threads, "pvfast-uv-bg"))
            .as_ref()
            .map_err(|e| e.clone())
    }

    pub(crate) fn config_by_id(&self, id: u32) -> Option<Arc<Config>> {
        rlock(&self.tables).by_id(id).cloned()
    }

    pub(crate) fn live_config(&self, handle: u64) -> Option<Arc<Config>> {
        rlock(&self.tables).live(handle).cloned()
    }

    /// Sequence number of the next secure CPU (tagged so it never meets a config's).
    pub(crate) fn next_cpu_seq(&self) -> u64 {
        self.cpu_seq.fetch_add(1, Ordering::Relaxed) | (1 << 63)
    }

    /// Sequence number of the next configuration: never reused (unlike its id), so neither is
    /// its handle.
    pub(crate) fn next_config_seq(&self) -> u64 {
        self.config_seq.fetch_add(1, Ordering::Relaxed) & !(1 << 63)
    }

    /// Retire the dead configurations no page refers to (tables write lock held).
    pub(crate) fn retire(&self, t: &mut Tables) {
        if t.retire_unreferenced() != 0 {
            self.retire_epoch.fetch_add(1, Ordering::Release);
        }
    }

    /// An opaque handle: non-zero, unused, and with both neighbours unused (so that
    /// "handle + 1" is always invalid).
    pub(crate) fn fresh_handle(&self, t: &Tables, seq: u64) -> u64 {
        let taken = |h: u64| h == 0 || t.by_handle.contains_key(&h) || t.cpus.contains_key(&h);
        let mut attempt = 0u64;
        loop {
            let h = mix64(seq ^ self.salt ^ mix64(attempt)) & !0xff;
            if !taken(h) && !taken(h.wrapping_add(1)) && !taken(h.wrapping_sub(1)) {
                return h;
            }
            attempt += 1;
        }
    }
}

/// A timed scope of `Core::timed`: charges the measured ns to the bound accounts on drop.
pub(crate) struct TimedScope<'a> {
    core: &'a Core,
    timer: account::Timer,
}

impl Drop for TimedScope<'_> {
    fn drop(&mut self) {
        if let Some(ns) = account::scope_leave(self.timer) {
            self.core.charge(|a| a.charge_cpu(ns, false));
        }
    }
}

/// A stretch of worker tasks (`Core::tasks`): charges its CPU time to the issuing thread's
/// accounts when it ends.
pub(crate) struct TaskStretch<'a> {
    core: &'a Core,
    binding: &'a Binding,
    stretch: Option<account::WorkerStretch>,
}

impl Drop for TaskStretch<'_> {
    fn drop(&mut self) {
        if let Some(stretch) = self.stretch.take() {
            let ns = stretch.leave();
            let charge = |a: &Account| a.charge_cpu(ns, true);
            if !account::with_bound_in(self.binding, self.core.id, &charge) {
                charge(&self.core.unattributed());
            }
        }
    }
}

fn build_pool(threads: usize, name: &'static str) -> Result<rayon::ThreadPool, CoreError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|_| CoreError::Os(libc::EAGAIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> Core {
        Core::new(UvOptions {
            threads: 1,
            ..Default::default()
        })
        .expect("a one-thread pool")
    }

    #[test]
    fn execute_counts_every_outcome_and_skips_the_body_when_injected() {
        let core = core();
        core.inject.set(Uvc::Qui, 0x0999, 7, 1);
        let mut ran = false;
        let st = core.execute(Uvc::Qui, || {
            ran = true;
            UvcStatus::OK
        });
        assert!(!ran, "an injected failure must not run the UVC");
        assert_eq!(st, UvcStatus::err_rrc(0x0999, 7));
        let st = core.execute(Uvc::Qui, || {
            ran = true;
            UvcStatus::err(0x0002)
        });
        assert!(ran);
        assert_eq!(st, UvcStatus::err(0x0002));
        assert_eq!(core.execute(Uvc::Qui, || UvcStatus::OK), UvcStatus::OK);
        assert_eq!(
            core.stats.get(Uvc::Qui),
            3,
            "success, UV error and injection all count"
        );
    }

    #[test]
    fn injected_replies_carry_no_handle_or_data() {
        let core = core();
        core.inject.set(Uvc::CreateSecCpu, 0x0999, 0, 1);
        core.inject.set(Uvc::DumpCpu, 0x0998, 0, 1);
        core.inject.set(Uvc::DumpInit, 0x0997, 0, 1);
        let h: (UvcStatus, u64) = core.execute(Uvc::CreateSecCpu, || (UvcStatus::OK, 42));
        assert_eq!(h, (UvcStatus::err(0x0999), 0));
        let d: (UvcStatus, Vec<u8>) = core.execute(Uvc::DumpCpu, || (UvcStatus::OK, vec![1]));
        assert_eq!(d, (UvcStatus::err(0x0998), Vec::new()));
        let r: Result<u8, UvcStatus> = core.execute(Uvc::DumpInit, || Ok(1));
        assert_eq!(r, Err(UvcStatus::err(0x0997)));
    }

    #[test]
    fn count_batch_consumes_no_injection() {
        let core = core();
        core.inject.set(Uvc::DestrSecStor, 0x0999, 0, 1);
        core.count_batch(Uvc::DestrSecStor, 5);
        assert_eq!(core.stats.get(Uvc::DestrSecStor), 5);
        assert!(core.inject.pending(Uvc::DestrSecStor));
    }
}
