//! Who did the UV work: accounts that the UVCs and kernel walks of one emulated thread (or one
//! VM) are charged to, the thread-local binding that says which accounts the calling thread
//! works for, thread CPU time, and the modelled clock (cost table, clock waits, and the kernel
//! mutex that moves a waiter's clock to the holder's).
//!
//! A caller binds its accounts once (`bind`); every UVC and walk it issues is then counted in
//! them, including the parts that run on pool workers: a walk captures the caller's binding and
//! each worker task runs with it bound (`run_task`), timing its own thread CPU time. Counters are
//! published per chunk of work, so a reader polling an account sees a long walk advance.
//!
//! The modelled clock is integer picoseconds: each unit of work adds its cost from the account's
//! `CostTable`, so the same work gives the same time on every machine, whatever the number of
//! pool workers that did it.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::uvc::{Uvc, NUM_UVCS};

/// Modelled hardware cost of each unit of work, in picoseconds (all zero by default: the Rust
/// core models nothing until a table is set; the Python package sets its documented defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostTable {
    /// Per execution of each UVC (indexed like `Uvc::ALL`).
    pub uvc_fixed: [u64; NUM_UVCS],
    /// Per page the UV itself processes inside one UVC (Destroy Config's cleaning, Set Unshare
    /// All's unsharing).
    pub uvc_per_page: [u64; NUM_UVCS],
    /// Per present PTE a kernel walk visits (`s390_uv_destroy_range`, the unmap at mm teardown).
    pub pte: u64,
    /// Per 4 KiB page the UV clears (destroy, Destroy Config cleaning, import of a fresh page).
    pub zero_page: u64,
    /// Per 4 KiB page the host kernel faults in (first touch: allocate and zero-fill).
    pub fault_page: u64,
}

impl Default for CostTable {
    fn default() -> Self {
        CostTable {
            uvc_fixed: [0; NUM_UVCS],
            uvc_per_page: [0; NUM_UVCS],
            pte: 0,
            zero_page: 0,
            fault_page: 0,
        }
    }
}

/// Counters of one account at one moment (see `Account`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSnapshot {
    /// UVC executions, indexed like `Uvc::ALL`.
    pub uvcs: [u64; NUM_UVCS],
    /// Pages the UV processed inside each UVC (where it does per-page work).
    pub uv_pages: [u64; NUM_UVCS],
    /// Present PTEs visited by kernel walks.
    pub ptes: u64,
    /// 4 KiB pages the UV cleared.
    pub zeroed: u64,
    /// 4 KiB pages faulted in (first touch).
    pub faulted: u64,
    /// Kernel walks (destroy ranges, mm teardowns, unmaps) started.
    pub walks: u64,
    /// Worker tasks run for this account on the UV's pools.
    pub tasks: u64,
    /// Thread CPU time of the work, caller's and workers', in ns.
    pub cpu_ns: u64,
    /// The part of `cpu_ns` that pool workers spent.
    pub worker_cpu_ns: u64,
    /// Modelled cost of the work counted here, in ps.
    pub work_ps: u64,
    /// The account's modelled clock, in ps (work plus waits; not reset).
    pub clock_ps: u64,
}

/// One account: the UV work of one emulated thread (or of one VM), with its modelled clock.
/// All counters are atomics; any thread may charge it.
pub struct Account {
    id: u64,
    owner: u64,
    costs: Arc<CostTable>,
    uvcs: [AtomicU64; NUM_UVCS],
    uv_pages: [AtomicU64; NUM_UVCS],
    ptes: AtomicU64,
    zeroed: AtomicU64,
    faulted: AtomicU64,
    walks: AtomicU64,
    tasks: AtomicU64,
    cpu_ns: AtomicU64,
    worker_cpu_ns: AtomicU64,
    work_ps: AtomicU64,
    clock_ps: AtomicU64,
}

static NEXT_ACCOUNT: AtomicU64 = AtomicU64::new(1);

impl Account {
    /// A fresh account of the UV with id `owner`, charged with `costs`, its clock at `start_ps`.
    pub fn new(owner: u64, costs: Arc<CostTable>, start_ps: u64) -> Account {
        Account {
            id: NEXT_ACCOUNT.fetch_add(1, Ordering::Relaxed),
            owner,
            costs,
            uvcs: std::array::from_fn(|_| AtomicU64::new(0)),
            uv_pages: std::array::from_fn(|_| AtomicU64::new(0)),
            ptes: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            walks: AtomicU64::new(0),
            tasks: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            worker_cpu_ns: AtomicU64::new(0),
            work_ps: AtomicU64::new(0),
            clock_ps: AtomicU64::new(start_ps),
        }
    }

    /// Unique id (never reused within the process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Id of the UV whose work this account counts.
    pub fn owner(&self) -> u64 {
        self.owner
    }

    pub fn costs(&self) -> &CostTable {
        &self.costs
    }

    /// Modelled work: both counters saturate at `u64::MAX` ps (about 213 days) instead of wrapping.
    #[inline]
    fn work(&self, ps: u64) {
        if ps != 0 {
            saturating_add(&self.work_ps, ps);
            saturating_add(&self.clock_ps, ps);
        }
    }

    /// `n` executions of `uvc`.
    #[inline]
    pub fn charge_uvc(&self, uvc: Uvc, n: u64) {
        if n != 0 {
            let i = uvc.index();
            self.uvcs[i].fetch_add(n, Ordering::Relaxed);
            self.work(n.saturating_mul(self.costs.uvc_fixed[i]));
        }
    }

    /// `n` pages processed by the UV inside `uvc`.
    #[inline]
    pub fn charge_uv_pages(&self, uvc: Uvc, n: u64) {
        if n != 0 {
            let i = uvc.index();
            self.uv_pages[i].fetch_add(n, Ordering::Relaxed);
            self.work(n.saturating_mul(self.costs.uvc_per_page[i]));
        }
    }

    /// `n` present PTEs visited by a kernel walk.
    #[inline]
    pub fn charge_ptes(&self, n: u64) {
        if n != 0 {
            self.ptes.fetch_add(n, Ordering::Relaxed);
            self.work(n.saturating_mul(self.costs.pte));
        }
    }

    /// `n` pages cleared by the UV.
    #[inline]
    pub fn charge_zeroed(&self, n: u64) {
        if n != 0 {
            self.zeroed.fetch_add(n, Ordering::Relaxed);
            self.work(n.saturating_mul(self.costs.zero_page));
        }
    }

    /// `n` pages faulted in by the host.
    #[inline]
    pub fn charge_faulted(&self, n: u64) {
        if n != 0 {
            self.faulted.fetch_add(n, Ordering::Relaxed);
            self.work(n.saturating_mul(self.costs.fault_page));
        }
    }

    /// One kernel walk started.
    #[inline]
    pub fn charge_walk(&self) {
        self.walks.fetch_add(1, Ordering::Relaxed);
    }

    /// Thread CPU time: `ns` in all, of which `worker` ns on a pool worker (one task if so).
    #[inline]
    pub fn charge_cpu(&self, ns: u64, worker: bool) {
        self.cpu_ns.fetch_add(ns, Ordering::Relaxed);
        if worker {
            self.worker_cpu_ns.fetch_add(ns, Ordering::Relaxed);
            self.tasks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The modelled clock in ps.
    #[inline]
    pub fn clock_ps(&self) -> u64 {
        self.clock_ps.load(Ordering::Acquire)
    }

    /// A wait: the clock moves to at least `ps`. Returns the clock afterwards.
    pub fn advance_to(&self, ps: u64) -> u64 {
        self.clock_ps.fetch_max(ps, Ordering::AcqRel).max(ps)
    }

    pub fn snapshot(&self) -> AccountSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AccountSnapshot {
            uvcs: std::array::from_fn(|i| load(&self.uvcs[i])),
            uv_pages: std::array::from_fn(|i| load(&self.uv_pages[i])),
            ptes: load(&self.ptes),
            zeroed: load(&self.zeroed),
            faulted: load(&self.faulted),
            walks: load(&self.walks),
            tasks: load(&self.tasks),
            cpu_ns: load(&self.cpu_ns),
            worker_cpu_ns: load(&self.worker_cpu_ns),
            work_ps: load(&self.work_ps),
            clock_ps: self.clock_ps(),
        }
    }

    /// Zero the usage counters. The clock is a position on the timeline and stays.
    pub fn reset(&self) {
        for c in self.uvcs.iter().chain(&self.uv_pages) {
            c.store(0, Ordering::Relaxed);
        }
        for c in [
            &self.ptes,
            &self.zeroed,
            &self.faulted,
            &self.walks,
            &self.tasks,
            &self.cpu_ns,
            &self.worker_cpu_ns,
            &self.work_ps,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------- binding

/// The accounts a thread's UV work is charged to: its emulated thread's, and the VM's it works
/// on (if any).
#[derive(Clone, Default)]
pub struct Binding {
    pub thread: Option<Arc<Account>>,
    pub vm: Option<Arc<Account>>,
}

thread_local! {
    static BOUND: RefCell<Binding> = const { RefCell::new(Binding { thread: None, vm: None }) };
    /// Nesting depth of timed scopes on this thread (only the outermost one reads the clock).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Accounting switched off (benchmarks only: the walk's cost without it).
static DISABLED: AtomicBool = AtomicBool::new(false);

/// Switch per-account counting and CPU timing off or on for the whole process (global UVC
/// statistics are counted either way). Only for measuring what accounting costs.
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

#[inline]
pub(crate) fn enabled() -> bool {
    !DISABLED.load(Ordering::Relaxed)
}

/// Bind the calling thread's accounts; returns the previous binding.
pub fn bind(binding: Binding) -> Binding {
    BOUND
        .try_with(|b| std::mem::replace(&mut *b.borrow_mut(), binding))
        .unwrap_or_default()
}

/// The calling thread's binding (cloned).
pub fn current() -> Binding {
    BOUND.try_with(|b| b.borrow().clone()).unwrap_or_default()
}

/// Run `f` on each account of the calling thread's binding that belongs to UV `owner`;
/// returns whether the thread account was among them.
#[inline]
pub(crate) fn with_bound(owner: u64, f: &dyn Fn(&Account)) -> bool {
    BOUND
        .try_with(|b| with_bound_in(&b.borrow(), owner, f))
        .unwrap_or(false)
}

/// The clock of the calling thread's thread account, if it has one.
pub fn current_clock_ps() -> Option<u64> {
    BOUND
        .try_with(|b| b.borrow().thread.as_ref().map(|t| t.clock_ps()))
        .ok()
        .flatten()
}

/// A wait of the calling thread: its bound thread account's clock moves to at least `ps`.
/// Returns the clock afterwards, or None if no thread account is bound.
pub fn advance_current_to(ps: u64) -> Option<u64> {
    BOUND
        .try_with(|b| b.borrow().thread.as_ref().map(|t| t.advance_to(ps)))
        .ok()
        .flatten()
}

// ---------------------------------------------------------------- CPU time

/// Thread CPU time of the calling thread, in ns.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// How a timed scope measures: thread CPU time (a system call, for work that can run long or
/// wait for pool workers), or elapsed time (for O(1) work that never sleeps, where the CPU
/// clock would cost more than the work).
#[derive(Clone, Copy)]
pub(crate) enum Timer {
    /// Not counted (accounting off): the scope changed nothing.
    Off,
    /// A nested scope: the outermost one measures.
    Nested,
    ThreadCpu(u64),
    Elapsed(Instant),
}

/// Begin a timed scope: the outermost one on this thread starts a timer.
#[inline]
pub(crate) fn scope_enter(cpu_clock: bool) -> Timer {
    if !enabled() {
        return Timer::Off;
    }
    DEPTH
        .try_with(|d| {
            let depth = d.get();
            d.set(depth + 1);
            if depth != 0 {
                Timer::Nested
            } else if cpu_clock {
                Timer::ThreadCpu(thread_cpu_ns())
            } else {
                Timer::Elapsed(Instant::now())
            }
        })
        .unwrap_or(Timer::Off)
}

/// End a scope begun by `scope_enter`; returns the ns it measured if it was the outermost one.
#[inline]
pub(crate) fn scope_leave(timer: Timer) -> Option<u64> {
    if matches!(timer, Timer::Off) {
        return None;
    }
    let _ = DEPTH.try_with(|d| d.set(d.get().saturating_sub(1)));
    match timer {
        Timer::Off | Timer::Nested => None,
        Timer::ThreadCpu(start) => Some(thread_cpu_ns().saturating_sub(start)),
        Timer::Elapsed(start) => Some(start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64),
    }
}

/// Run `f` on each account of `binding` that belongs to UV `owner`; returns whether the
/// thread account was among them.
pub(crate) fn with_bound_in(binding: &Binding, owner: u64, f: &dyn Fn(&Account)) -> bool {
    let mut hit = false;
    if let Some(t) = &binding.thread {
        if t.owner == owner {
            f(t);
            hit = true;
        }
    }
    if let Some(v) = &binding.vm {
        if v.owner == owner {
            f(v);
        }
    }
    hit
}

/// A stretch of worker tasks run for `binding` on one pool worker: while it lives the worker
/// has `binding` bound, and its thread CPU time is measured from `enter` to `leave` (one clock
/// read at each end however many tasks run inside, so short tasks cost nothing extra). On the
/// caller's own thread (a walk small enough to run inline) it does nothing: the caller's timed
/// scope covers it.
pub(crate) struct WorkerStretch {
    prev: Option<Binding>,
    depth: u32,
    start: u64,
}

impl WorkerStretch {
    pub(crate) fn enter(binding: &Binding) -> Option<WorkerStretch> {
        if !enabled() || rayon::current_thread_index().is_none() {
            return None;
        }
        let prev = bind(binding.clone());
        let depth = DEPTH.try_with(|d| d.replace(1)).unwrap_or(0);
        Some(WorkerStretch {
            prev: Some(prev),
            depth,
            start: thread_cpu_ns(),
        })
    }

    /// End the stretch: restore the worker's binding; returns the CPU ns it took.
    pub(crate) fn leave(mut self) -> u64 {
        let ns = thread_cpu_ns().saturating_sub(self.start);
        let _ = DEPTH.try_with(|d| d.set(self.depth));
        if let Some(prev) = self.prev.take() {
            bind(prev);
        }
        ns
    }
}

// ---------------------------------------------------------------- the kernel mutex

/// A mutex whose acquisition takes part in the modelled clock (the emulated `kvm->lock`).
///
/// Each holder's critical section is recorded as an interval of its modelled clock. A thread
/// that acquires the mutex at modelled time `t` inside the last non-empty interval of another
/// thread's hold waits, in modelled time, until that interval ends (its clock moves there). A
/// critical section without modelled work (bookkeeping) is an empty interval and never delays
/// anyone, so the model does not depend on how the host happened to interleave threads.
pub struct ModelMutex {
    state: Mutex<MutexState>,
    cv: Condvar,
}

#[derive(Default)]
struct MutexState {
    locked: bool,
    /// Threads blocked in `lock` (release wakes one only if there is one).
    waiters: u32,
    /// Id of the holder's thread account (0: none bound) and its clock when it took the lock.
    holder: u64,
    since_ps: u64,
    /// The last non-empty hold: (holder account id, from, to).
    last: Option<(u64, u64, u64)>,
}

impl Default for ModelMutex {
    fn default() -> Self {
        ModelMutex {
            state: Mutex::new(MutexState::default()),
            cv: Condvar::new(),
        }
    }
}

/// Run `f` on the calling thread's bound thread account, if any.
#[inline]
fn with_thread_account<R>(f: impl FnOnce(&Account) -> R) -> Option<R> {
    BOUND
        .try_with(|b| b.borrow().thread.as_deref().map(f))
        .ok()
        .flatten()
}

impl ModelMutex {
    pub fn new() -> Self {
        Self::default()
    }

    fn guard(&self) -> MutexGuard<'_, MutexState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(s: &mut MutexState) {
        s.locked = true;
        let last = s.last;
        let (holder, since) = with_thread_account(|me| {
            if let Some((id, from, to)) = last {
                let t = me.clock_ps();
                if id != me.id && from <= t && t < to {
                    me.advance_to(to);
                }
            }
            (me.id, me.clock_ps())
        })
        .unwrap_or((0, 0));
        s.holder = holder;
        s.since_ps = since;
    }

    /// Acquire without waiting; false if it is held.
    pub fn try_lock(&self) -> bool {
        let mut s = self.guard();
        if s.locked {
            return false;
        }
        Self::take(&mut s);
        true
    }

    /// Acquire, waiting at most `timeout` (None: for ever). False on timeout.
    pub fn lock(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.guard();
        while s.locked {
            s.waiters += 1;
            let (g, timed_out) = match deadline {
                None => (self.cv.wait(s).unwrap_or_else(|e| e.into_inner()), false),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    let (g, r) = self
                        .cv
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner());
                    (g, r.timed_out())
                }
            };
            s = g;
            s.waiters -= 1;
            if timed_out && s.locked {
                return false;
            }
        }
        Self::take(&mut s);
        true
    }

    /// Release; false if it was not held.
    pub fn unlock(&self) -> bool {
        let mut s = self.guard();
        if !s.locked {
            return false;
        }
        if s.holder != 0 {
            let holder = s.holder;
            // The holder's clock now (releases come from the holding thread).
            if let Some(to) =
                with_thread_account(|me| (me.id == holder).then(|| me.clock_ps())).flatten()
            {
                if to > s.since_ps {
                    s.last = Some((holder, s.since_ps, to));
                }
            }
        }
        s.locked = false;
        s.holder = 0;
        let wake = s.waiters != 0;
        drop(s);
        if wake {
            self.cv.notify_one();
        }
        true
    }

    pub fn is_locked(&self) -> bool {
        self.guard().locked
    }
}

/// `counter += ps`, saturating at `u64::MAX` (a plain `fetch_add` would wrap the clock to 0).
#[inline]
fn saturating_add(counter: &AtomicU64, ps: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(ps))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> Arc<CostTable> {
        let mut c = CostTable::default();
        c.uvc_fixed[Uvc::DestrSecStor.index()] = 1000;
        c.pte = 10;
        c.zero_page = 400;
        Arc::new(c)
    }

    #[test]
    fn modelled_work_saturates_instead_of_wrapping() {
        let costs = CostTable {
            pte: u64::MAX / 2,
            ..CostTable::default()
        };
        let a = Account::new(0, Arc::new(costs), 0);
        a.charge_ptes(1);
        a.charge_ptes(1);
        a.charge_ptes(1);
        assert_eq!(a.clock_ps(), u64::MAX);
        assert_eq!(a.snapshot().work_ps, u64::MAX);
    }

    #[test]
    fn charges_add_up_to_the_modelled_work() {
        let a = Account::new(1, costs(), 5);
        a.charge_uvc(Uvc::DestrSecStor, 3);
        a.charge_ptes(3);
        a.charge_zeroed(2);
        let s = a.snapshot();
        assert_eq!(s.uvcs[Uvc::DestrSecStor.index()], 3);
        assert_eq!(s.work_ps, 3 * 1000 + 3 * 10 + 2 * 400);
        assert_eq!(s.clock_ps, 5 + s.work_ps);
        a.reset();
        assert_eq!(a.snapshot().work_ps, 0);
        assert_eq!(a.clock_ps(), 5 + 3830, "reset keeps the clock");
    }

    #[test]
    fn a_waiter_inside_another_holders_interval_moves_to_its_end() {
        let m = ModelMutex::new();
        let b = Arc::new(Account::new(1, costs(), 0));
        let a = Arc::new(Account::new(1, costs(), 0));
        let prev = bind(Binding {
            thread: Some(Arc::clone(&b)),
            vm: None,
        });
        assert!(m.try_lock());
        b.charge_uvc(Uvc::DestrSecStor, 10); // 10 ns of modelled work while holding
        assert!(m.unlock());
        bind(Binding {
            thread: Some(Arc::clone(&a)),
            vm: None,
        });
        a.charge_uvc(Uvc::DestrSecStor, 1);
        assert!(m.lock(None));
        assert_eq!(
            a.clock_ps(),
            10_000,
            "a acquired at 1 ns inside b's [0, 10 ns)"
        );
        assert!(m.unlock());
        // An empty critical section (bookkeeping) delays nobody.
        bind(Binding {
            thread: Some(Arc::clone(&b)),
            vm: None,
        });
        b.charge_uvc(Uvc::DestrSecStor, 100);
        assert!(m.try_lock());
        assert!(m.unlock());
        bind(prev);
        assert!(!m.unlock(), "releasing an unlocked mutex fails");
    }
}
